"""dup-to: parsed and printed as pfctl does, the `in` verdict carrying the target's dup
mark (0x0200|i, apart from route-to's 0x0100|i) for the packets going the state's way,
the daemon's FORWARD chain getting one TEE rule per dup-to target (io/iptables.py), and
pfsync's rt value of a dup-to state (OpenBSD 2, FreeBSD 3) round-tripping."""

from __future__ import annotations

import socket

import pytest
from scapy.all import IP, TCP, UDP, raw

from pfcluster.io.iptables import IptablesRules, dup_rules
from pfcluster.packet import parse
from pfcluster.pf.filter import Filter
from pfcluster.pf.route import (
    DUP_MARK_BASE,
    DUP_MARK_MASK,
    ROUTE_MARK_BASE,
    ROUTE_MARK_MASK,
    RT_DUPTO,
    resolve,
    verdict_mark,
)
from pfcluster.pf.router import ROUTE_PASS, route
from pfcluster.pf.rules import parse_rules
from pfcluster.pfsync import wire
from pfcluster.pfsync.convert import export_state, import_state

C, S = "192.0.2.10", "198.51.100.20"
RULES = ("pass all\n"
         "pass in on em0 proto tcp to port 80 route-to (em2 192.0.2.9)\n"
         "pass in on em0 proto tcp to port 81 dup-to (em3 192.0.2.33)\n")


@pytest.mark.parametrize(("line", "printed"), [
    ("pass in on em0 dup-to (em2 192.0.2.9)",
     "pass in on em0 all flags S/SA keep state dup-to (em2 192.0.2.9)"),
    ("pass in on em0 proto tcp to port 80 dup-to (em2 192.0.2.9)",
     "pass in on em0 proto tcp from any to any port = 80 flags S/SA keep state "
     "dup-to (em2 192.0.2.9)"),
    ("pass in on em0 dup-to { (em2 192.0.2.9), (em3 192.0.2.10) } round-robin",
     "pass in on em0 all flags S/SA keep state "
     "dup-to { (em2 192.0.2.9), (em3 192.0.2.10) } round-robin"),
])
def test_parse_print_round_trip(line: str, printed: str) -> None:
    got = [str(r) for r in parse_rules(line).rules]
    assert got == [printed]
    assert [str(r) for r in parse_rules(printed).rules] == [printed]


def test_marks_do_not_meet() -> None:
    rs = parse_rules(RULES)
    rt, dup = rs.route_targets
    assert (rt.dup, dup.dup) == (False, True)
    assert (rt.mark, dup.dup_mark) == (ROUTE_MARK_BASE, DUP_MARK_BASE | 1)
    # each kind's mark read under the other's mask is not one of the other's marks
    for t in rs.route_targets:
        assert t.dup_mark & ROUTE_MARK_MASK & ROUTE_MARK_BASE == 0
        assert t.mark & DUP_MARK_MASK & DUP_MARK_BASE == 0
    assert 0x7066 & DUP_MARK_BASE == 0  # GENERATED_MARK


def syn(sport: int, dport: int) -> bytes:
    return raw(IP(src=C, dst=S) / TCP(sport=sport, dport=dport, flags="S"))


def test_dup_to_marks_the_flow_not_the_replies() -> None:
    f = Filter(parse_rules(RULES))
    p = parse(syn(4000, 81))
    rv = route(f, "em0", None, p, 1.0)
    assert rv.action == ROUTE_PASS and rv.v_in is not None
    st = rv.v_in.state
    assert st is not None and st.route is not None and st.route.kind == RT_DUPTO
    assert verdict_mark(rv.v_in, p) == DUP_MARK_BASE | 1
    # later packets of the state: copied too
    ack = parse(raw(IP(src=C, dst=S) / TCP(sport=4000, dport=81, flags="A", seq=1, ack=1)))
    rv2 = route(f, "em0", None, ack, 1.1)
    assert rv2.v_in is not None and rv2.v_in.state is st
    assert verdict_mark(rv2.v_in, ack) == DUP_MARK_BASE | 1
    # the reply (in on the uplink): neither routed nor copied
    r = parse(raw(IP(src=S, dst=C) / TCP(sport=81, dport=4000, flags="SA", ack=1)))
    rv3 = route(f, "em3", None, r, 1.2)
    assert rv3.v_in is not None
    assert verdict_mark(rv3.v_in, r, f.states.by_key) == 0
    # the route-to flow keeps route-to's mark
    q = parse(syn(4001, 80))
    rv4 = route(f, "em0", None, q, 1.3)
    assert rv4.v_in is not None and verdict_mark(rv4.v_in, q) == ROUTE_MARK_BASE


def test_stateless_dup_to_marks_every_match() -> None:
    f = Filter(parse_rules("pass in on em0 proto udp dup-to (em2 192.0.2.9) no state\n"))
    p = parse(raw(IP(src=C, dst=S) / UDP(sport=5000, dport=53)))
    rv = route(f, "em0", None, p, 1.0)
    assert rv.v_in is not None and rv.v_in.state is None
    assert verdict_mark(rv.v_in, p) == DUP_MARK_BASE


def test_tee_rules_in_the_forward_chain_only() -> None:
    rs = parse_rules(RULES + "pass in on em1 dup-to (em4 2001:db8::9)\n")
    dups = dup_rules(rs.route_targets)
    assert dups == [(DUP_MARK_BASE | 1, "192.0.2.33", "em3", "iptables-legacy"),
                    (DUP_MARK_BASE | 2, "2001:db8::9", "em4", "ip6tables-legacy")]
    r = IptablesRules(7, nat=True, dups=dups)
    fwd = r.chain_rules()
    tee = "-A PFCLUSTER-7 -m mark --mark 0x201/0x2ff -j TEE --gateway 192.0.2.33 --oif em3"
    assert tee in fwd
    assert fwd.index(tee) < len(fwd) - 1 and fwd[-1].startswith("-A PFCLUSTER-7 -j NFQUEUE")
    assert not any("TEE" in line for line in r.chain_rules(r.in_chain))
    v6 = r.chain_rules(tool="ip6tables-legacy")
    assert [line for line in v6 if "TEE" in line] == [
        "-A PFCLUSTER-7 -m mark --mark 0x202/0x2ff -j TEE --gateway 2001:db8::9 --oif em4"]
    # the plain (filter) layout has no mark to copy by
    assert not any("TEE" in line for line in IptablesRules(7, dups=dups).chain_rules())


WITH_RT = {"freebsd1400": 3, "openbsd6": 2}


@pytest.mark.parametrize("dialect", wire.DIALECTS)
def test_rt_round_trip(dialect: str) -> None:
    f = Filter(parse_rules(RULES), hostid=0xABCD1234, now=100.0)
    p = parse(syn(40000, 81))
    rv = route(f, "em0", None, p, 100.0)
    assert rv.v_in is not None and rv.v_in.state is not None
    st = rv.v_in.state
    rec = export_state(st, 110.0, dialect, f.timeouts, 1)
    frame = wire.Frame(wire.VERSION[dialect], sections=[
        wire.Section("INS", wire.ACTIONS[dialect]["INS"], messages=[rec])])
    (back,) = list(wire.decode(wire.encode(frame, dialect), dialect).messages("INS"))
    st2, _, _ = import_state(back, 200.0, dialect, f.timeouts)
    if dialect not in WITH_RT:
        assert st2.route is None
        return
    assert back.rt == WITH_RT[dialect]
    assert back.rt_addr[:4] == socket.inet_aton("192.0.2.33")
    assert st2.route is not None and st2.route.kind == RT_DUPTO
    assert resolve(st2.route.target, f.ruleset.route_targets) != 0
    assert st2.route.target.dup_mark == DUP_MARK_BASE | 1
