"""route-to / reply-to: parsed and printed as pfctl does, refused where Linux cannot do
them (with file:line:col), and the verdict of the `in` test carrying the target's mark
for the state's packets (pf/route.py). pfsync's rt fields: tests/test_route_to_sync.py."""

from __future__ import annotations

import pytest
from scapy.all import IP, TCP, UDP, raw

from pfcluster.packet import parse
from pfcluster.pf.constants import PF_IN
from pfcluster.pf.filter import Filter
from pfcluster.pf.route import (
    ROUTE_MARK_BASE,
    ROUTE_MARK_MASK,
    RT_REPLYTO,
    RT_ROUTETO,
    verdict_mark,
)
from pfcluster.pf.router import ROUTE_PASS, route
from pfcluster.pf.rules import RuleSyntaxError, parse_rules

C, S = "192.0.2.10", "198.51.100.20"


def rules_text(text: str) -> list[str]:
    return [str(r) for r in parse_rules(text).rules]


@pytest.mark.parametrize(("line", "printed"), [
    ("pass in on em0 route-to (em2 192.0.2.9) proto tcp to port 80",
     "pass in on em0 proto tcp from any to any port = 80 flags S/SA keep state "
     "route-to (em2 192.0.2.9)"),
    # FreeBSD's place (after `on`) and OpenBSD's (among the options) parse alike
    ("pass in on em0 proto tcp to port 80 route-to (em2 192.0.2.9)",
     "pass in on em0 proto tcp from any to any port = 80 flags S/SA keep state "
     "route-to (em2 192.0.2.9)"),
    ("pass in on em0 proto udp reply-to em1", "pass in on em0 proto udp all keep state "
     "reply-to em1"),
    ("pass in on em1 route-to { (em2 192.0.2.9), (em3 192.0.2.10) } round-robin",
     "pass in on em1 all flags S/SA keep state "
     "route-to { (em2 192.0.2.9), (em3 192.0.2.10) } round-robin"),
    ("pass in inet6 route-to (em2 2001:db8::1)",
     "pass in inet6 all flags S/SA keep state route-to (em2 2001:db8::1)"),
])
def test_parse_print_round_trip(line: str, printed: str) -> None:
    assert rules_text(line) == [printed]
    assert rules_text(printed) == [printed]


@pytest.mark.parametrize(("line", "msg"), [
    ("pass out on em0 route-to (em2 192.0.2.9)", "'pass in' rules only: Linux has routed"),
    ("pass route-to em2", "'pass in' rules only"),
    ("pass in dup-to em2", "dup-to needs a gateway"),
    ("pass out dup-to (em2 192.0.2.9)", "'pass in' rules only"),
    ("pass in dup-to (em2 192.0.2.9) route-to em1", "exclusive"),
    ("block in route-to em2", "only applies to pass rules"),
    ("pass in route-to (em2 foo)", "invalid gateway address 'foo'"),
    ("pass in route-to (em2 192.0.2.9) reply-to em1", "exclusive"),
    ("pass in inet6 route-to (em2 192.0.2.9)", "does not match the rule's address family"),
    ("pass in route-to { em2, em2 }", "listed twice"),
    ("pass in route-to { em2, em3 } source-hash", "used round-robin"),
    ("pass in route-to (192.0.2.9)", "expected an interface name"),
])
def test_errors_are_clean(line: str, msg: str) -> None:
    with pytest.raises(RuleSyntaxError, match=msg) as ei:
        parse_rules(line, "t.conf")
    assert str(ei.value).startswith("t.conf:1:")


def test_targets_are_numbered_once_per_ruleset() -> None:
    rs = parse_rules("pass in on em0 route-to (em2 192.0.2.9)\n"
                     "pass in on em1 reply-to em3\n"
                     "pass in on em4 route-to (em2 192.0.2.9)\n")
    assert [(t.ifname, t.mark) for t in rs.route_targets] == [
        ("em2", ROUTE_MARK_BASE), ("em3", ROUTE_MARK_BASE | 1)]
    assert rs.rules[0].route is not None and rs.rules[2].route is not None
    assert rs.rules[0].route.targets[0] is rs.rules[2].route.targets[0]
    assert all(t.mark & ROUTE_MARK_MASK == t.mark for t in rs.route_targets)


def syn(sport: int, dport: int = 80) -> bytes:
    return raw(IP(src=C, dst=S) / TCP(sport=sport, dport=dport, flags="S"))


def synack(sport: int, dport: int = 80) -> bytes:
    return raw(IP(src=S, dst=C) / TCP(sport=dport, dport=sport, flags="SA", ack=1))


def test_route_to_marks_the_flow_and_its_state_not_the_replies() -> None:
    f = Filter(parse_rules("pass all\n"
                           "pass in on em0 proto tcp to port 80 route-to (em2 192.0.2.9)\n"))
    p = parse(syn(4000))
    rv = route(f, "em0", None, p, 1.0)  # the PREROUTING half
    assert rv.action == ROUTE_PASS and rv.v_in is not None
    st = rv.v_in.state
    assert st is not None and st.route is not None and st.route.kind == RT_ROUTETO
    assert (st.route.target.ifname, st.direction) == ("em2", PF_IN)
    assert verdict_mark(rv.v_in, p) == ROUTE_MARK_BASE
    # the reply comes in on the uplink (pf's `in` test: a state of its own), unmarked
    r = parse(synack(4000))
    rv2 = route(f, "em2", None, r, 1.1)
    assert rv2.v_in is not None and rv2.v_in.state is not st
    assert verdict_mark(rv2.v_in, r, f.states.by_key) == 0
    # the next packet of the flow: marked by its state
    ack = parse(raw(IP(src=C, dst=S) / TCP(sport=4000, dport=80, flags="A", seq=1, ack=1)))
    rv3 = route(f, "em0", None, ack, 1.2)
    assert rv3.v_in is not None and rv3.v_in.state is st
    assert verdict_mark(rv3.v_in, ack) == ROUTE_MARK_BASE
    # another flow, not matching the rule: no mark
    other = parse(syn(4001, 81))
    rv4 = route(f, "em0", None, other, 1.3)
    assert rv4.action == ROUTE_PASS and rv4.v_in is not None
    assert verdict_mark(rv4.v_in, other) == 0


def test_reply_to_marks_only_the_replies() -> None:
    f = Filter(parse_rules("pass all\npass in on em1 proto udp reply-to (em1 192.0.2.1)\n"))
    q = parse(raw(IP(src=C, dst=S) / UDP(sport=5000, dport=53)))
    rv = route(f, "em1", None, q, 1.0)
    assert rv.v_in is not None and rv.v_in.state is not None
    st = rv.v_in.state
    assert st.route is not None and st.route.kind == RT_REPLYTO
    assert verdict_mark(rv.v_in, q) == 0
    # the answer comes in on the LAN side: found as pf's `out` test would find it
    a = parse(raw(IP(src=S, dst=C) / UDP(sport=53, dport=5000)))
    rv2 = route(f, "em0", None, a, 1.1)
    assert rv2.v_in is not None and rv2.v_in.state is not st
    assert verdict_mark(rv2.v_in, a) == 0  # not without the state table
    assert verdict_mark(rv2.v_in, a, f.states.by_key) == ROUTE_MARK_BASE


def test_pool_round_robin_per_state() -> None:
    f = Filter(parse_rules("pass in on em0 proto tcp "
                           "route-to { (em2 192.0.2.9), (em3 192.0.2.10) }\n"))
    marks = []
    for i in range(4):
        p = parse(syn(4000 + i))
        rv = route(f, "em0", None, p, 1.0 + i)
        assert rv.v_in is not None
        marks.append(verdict_mark(rv.v_in, p))
    assert marks == [ROUTE_MARK_BASE, ROUTE_MARK_BASE | 1] * 2


def test_stateless_route_to_marks_every_match() -> None:
    f = Filter(parse_rules("pass in on em0 proto udp route-to (em2 192.0.2.9) no state\n"))
    p = parse(raw(IP(src=C, dst=S) / UDP(sport=5000, dport=53)))
    rv = route(f, "em0", None, p, 1.0)
    assert rv.v_in is not None and rv.v_in.state is None
    assert verdict_mark(rv.v_in, p) == ROUTE_MARK_BASE
