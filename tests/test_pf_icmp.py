"""ICMP state semantics as current OpenBSD pf (issue 9, section 8).

The filter runs as a router: a packet is tested `in` on the interface its source lives
behind, then `out` on the one its destination lives behind (em0: clients, em1: servers).
Packets are built with scapy and handed over as bytes, so scapy is the oracle for the
wire format; the expected keys follow pf_icmp_mapping / pf_icmp_state_lookup and the
order of checks in pf_test_state_icmp.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6TimeExceeded,
    IPv6,
)
from scapy.packet import Raw
from scapy.utils import wrpcap

from pfcluster.cli.replay import replay
from pfcluster.packet import parse
from pfcluster.pf import pfctl
from pfcluster.pf.constants import PF_IN, PF_OUT, PFTM
from pfcluster.pf.filter import Filter, Verdict
from pfcluster.pf.log import print_state
from test_pf_helpers import CLIENT, CLIENT6, SERVER, SERVER6, TcpConn, make_filter, pk

ROUTER = "203.0.113.1"  # a router on the server side of the path
ROUTER6 = "2001:db8:2::1"

RULES = """
block all
pass in on em0 all
pass out all
"""


def side(addr: str) -> str:
    return "em0" if addr.startswith(("198.51.100.", "2001:db8:1:")) else "em1"


def route(f: Filter, p: Any, now: float = 0.0) -> tuple[Verdict, Verdict | None]:
    """In on the source's interface, then out on the destination's (if the first passed)."""
    raw = bytes(p)
    src, dst = (p[IPv6].src, p[IPv6].dst) if IPv6 in p else (p[IP].src, p[IP].dst)
    v_in = f.test(PF_IN, side(src), parse(raw), now)
    if not v_in.passed:
        return v_in, None
    return v_in, f.test(PF_OUT, side(dst), parse(raw), now)


def passed(vs: tuple[Verdict, Verdict | None]) -> bool:
    return vs[1] is not None and vs[1].passed


def a4(s: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, s)


def a6(s: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, s)


def counter(f: Filter, name: str) -> int:
    return pfctl.counters_dict(f, 0)["counters"][name]


def echo(src: str, dst: str, typ: int, ident: int = 0x1234, seq: int = 1) -> Any:
    return IP(src=src, dst=dst) / ICMP(type=typ, id=ident, seq=seq) / b"ping"


# -- queries and replies ------------------------------------------------------------------


def test_echo_v4_keys_and_reply() -> None:
    f = make_filter(RULES)
    v_in, v_out = route(f, echo(CLIENT, SERVER, 8))
    assert v_in.new_state and v_in.rule.nr == 1 and v_out is not None and v_out.new_state
    st_in, st_out = v_in.state, v_out.state
    # the id in the source's port slot, the query type in the destination's
    assert st_in.key == (socket.AF_INET, 1, a4(CLIENT), a4(SERVER), 0x1234, 8)
    assert st_out.key == (socket.AF_INET, 1, a4(SERVER), a4(CLIENT), 8, 0x1234)
    assert st_in.timeout == PFTM.ICMP_FIRST_PACKET
    assert sorted(pfctl.format_states(f, 0)) == [
        "all icmp 198.51.100.2:4660 -> 203.0.113.10:8       0:0",
        "all icmp 203.0.113.10:8 <- 198.51.100.2:4660       0:0",
    ]
    r_in, r_out = route(f, echo(SERVER, CLIENT, 0), now=1)
    assert r_in.reason == "state" and r_in.state is st_out
    assert r_out is not None and r_out.reason == "state" and r_out.state is st_in
    assert st_in.timeout == st_out.timeout == PFTM.ICMP_ERROR_REPLY
    assert (st_in.packets0, st_in.packets1) == (1, 1)


def test_echo_v6_keys_and_reply() -> None:
    f = make_filter(RULES)
    req = IPv6(src=CLIENT6, dst=SERVER6) / ICMPv6EchoRequest(id=99, seq=1, data=b"six")
    v_in, v_out = route(f, req)
    assert v_in.state.key == (socket.AF_INET6, 58, a6(CLIENT6), a6(SERVER6), 99, 128)
    assert v_out is not None and v_out.state.key[4:] == (128, 99)
    rep = IPv6(src=SERVER6, dst=CLIENT6) / ICMPv6EchoReply(id=99, seq=1, data=b"six")
    r_in, r_out = route(f, rep, 1)
    assert r_in.state is v_out.state and r_out is not None and r_out.state is v_in.state
    assert "all ipv6-icmp 2001:db8:2::10[128] <- 2001:db8:1::2[99]       0:0" in pfctl.format_states(f, 1)


def test_reply_without_state_skips_stateful_rule() -> None:
    # pf_match_rule: `pass ... keep state` (the default) does not match a reply, so the
    # unsolicited echo reply meets `block all`; a stateless rule passes it
    f = make_filter(RULES)
    v_in, _ = route(f, echo(CLIENT, SERVER, 0))
    assert not v_in.passed and v_in.rule.nr == 0 and len(f.states) == 0
    f = make_filter("block all\npass in on em0 all no state\npass out all no state\n")
    vs = route(f, echo(CLIENT, SERVER, 0))
    assert passed(vs) and vs[0].rule.nr == 1 and len(f.states) == 0
    # a sloppy rule is not skipped, and keys the state as the reply travels
    f = make_filter("block all\npass in on em0 all keep state (sloppy)\n")
    v = f.test(PF_IN, "em0", pk(echo(CLIENT, SERVER, 0)), 0)
    assert v.new_state and v.state.key[4:] == (8, 0x1234)


def test_timestamp_query_and_reply() -> None:
    f = make_filter(RULES)
    v_in, v_out = route(f, IP(src=CLIENT, dst=SERVER) / ICMP(type=13, id=77))
    assert v_in.state.key[4:] == (77, 13)
    r_in, r_out = route(f, IP(src=SERVER, dst=CLIENT) / ICMP(type=14, id=77), 1)
    assert r_in.state is v_out.state and r_out is not None and r_out.state is v_in.state
    # an echo reply with that id is another key: type is part of it
    assert not route(f, echo(SERVER, CLIENT, 0, ident=77), 1)[0].passed


def test_reply_with_other_id_meets_the_rules() -> None:
    f = make_filter(RULES)
    route(f, echo(CLIENT, SERVER, 8))
    v_in, v_out = route(f, echo(SERVER, CLIENT, 0, ident=0x4321), 1)
    assert not v_in.passed and v_in.reason == "match" and v_in.rule.nr == 0 and v_out is None


TYPED_RULES = """
block all
pass in on em0 proto icmp icmp-type echoreq
pass out proto icmp icmp-type echoreq
"""


def test_query_in_wrong_direction_dropped_with_state() -> None:
    # with id 8 the echo request's key is symmetric: the server's own request of id 8
    # finds the client's state, flowing against it (pf_icmp_state_lookup's check, made
    # for states whose rule names an icmp-type)
    f = make_filter(TYPED_RULES)
    _, v_out = route(f, echo(CLIENT, SERVER, 8, ident=8))
    assert v_out is not None
    v_in, _ = route(f, echo(SERVER, CLIENT, 8, ident=8), 1)
    assert not v_in.passed and v_in.state is v_out.state and v_in.reason == "match"
    assert v_in.log and v_in.log[0].startswith("pf: icmp type 8 in wrong direction (1): ICMP out")
    assert counter(f, "state-mismatch") == 0


def test_neighbour_solicitation_keyed_on_target_advert_stateless() -> None:
    f = make_filter("pass all\n")
    target = "2001:db8:1::99"
    ns = IPv6(src=CLIENT6, dst="ff02::1:ff00:99", hlim=255) / ICMPv6ND_NS(tgt=target)
    v = f.test(PF_IN, "em0", pk(ns), 0)
    h = int.from_bytes(a6(target)[0:4], "big") ^ int.from_bytes(a6(target)[4:8], "big") \
        ^ int.from_bytes(a6(target)[8:12], "big") ^ int.from_bytes(a6(target)[12:16], "big")
    assert v.new_state and v.state.key == (socket.AF_INET6, 58, a6(CLIENT6), a6(target),
                                           ((h >> 16) ^ h) & 0xFFFF, 135)
    na = IPv6(src=target, dst=CLIENT6, hlim=255) / ICMPv6ND_NA(tgt=target)
    v = f.test(PF_OUT, "em0", pk(na), 0)
    assert v.passed and v.reason == "match" and v.state is None and len(f.states) == 1


# -- errors ---------------------------------------------------------------------------------


def tcp_conn(f: Filter) -> TcpConn:
    conn = TcpConn(f, router=True)
    conn.handshake(now=0)
    conn.c("PA", b"d" * 100, now=1)
    conn.s("A", now=1)
    assert len(f.states) == 2
    return conn


def error_about_client_segment(conn: TcpConn, seq: int, outer_dst: str = CLIENT,
                               quote: int = 28, typ: int = 3, code: int = 4) -> Any:
    inner = IP(src=CLIENT, dst=SERVER) / TCP(sport=40000, dport=5201, flags="PA", seq=seq,
                                             ack=conn.s_nxt) / (b"d" * 100)
    return IP(src=ROUTER, dst=outer_dst) / ICMP(type=typ, code=code, nexthopmtu=1400) \
        / Raw(bytes(inner)[:quote])


def test_error_quoting_tcp_in_window_passes_on_both_states() -> None:
    f = make_filter(RULES)
    conn = tcp_conn(f)
    states = {st.direction: st for st in f.states}
    v_in, v_out = route(f, error_about_client_segment(conn, conn.c_nxt - 100), 2)
    assert v_in.reason == "state" and v_in.state is states[PF_OUT]
    assert v_out is not None and v_out.reason == "state" and v_out.state is states[PF_IN]
    # an error does not touch the state's timeout
    assert states[PF_IN].timeout == PFTM.TCP_ESTABLISHED


def test_error_quoting_tcp_out_of_window_blocked_with_state() -> None:
    f = make_filter(RULES)
    conn = tcp_conn(f)
    seq = (conn.c_nxt + 10**6) & 0xFFFFFFFF
    v_in, v_out = route(f, error_about_client_segment(conn, seq), 2)
    st = v_in.state
    assert not v_in.passed and v_out is None and v_in.reason == "state-mismatch"
    assert st is not None and st.direction == PF_OUT
    assert v_in.log == [f"pf: BAD ICMP 3:4 {ROUTER} -> {CLIENT} state: {print_state(st)} seq={seq}"]
    assert counter(f, "state-mismatch") == 1


def test_error_quoting_udp_state() -> None:
    f = make_filter(RULES)
    q = IP(src=CLIENT, dst=SERVER) / UDP(sport=5353, dport=53) / b"q"
    assert passed(route(f, q))
    err = IP(src=SERVER, dst=CLIENT) / ICMP(type=3, code=3) / Raw(bytes(q)[:28])
    v_in, v_out = route(f, err, 1)
    assert v_in.reason == "state" and v_out is not None and v_out.reason == "state"


def test_error_outer_dst_not_inner_src_meets_the_rules() -> None:
    f = make_filter(RULES)
    conn = tcp_conn(f)
    err = error_about_client_segment(conn, conn.c_nxt, outer_dst="198.51.100.99")
    v_in, _ = route(f, err, 2)
    # checked before the state lookup; a drop without a state goes to pf_test_rule
    assert not v_in.passed and v_in.reason == "match" and v_in.state is None and v_in.rule.nr == 0
    assert v_in.log == [f"pf: BAD ICMP 3:4 outer dst: {ROUTER} -> 198.51.100.99 "
                        f"inner src: {CLIENT} -> {SERVER}"]
    assert counter(f, "state-mismatch") == 1
    # so a ruleset that passes it without state lets it through
    f = make_filter("pass all no state\n")
    vs = route(f, err, 2)
    assert passed(vs) and vs[0].state is None and vs[0].log[0].startswith("pf: BAD ICMP 3:4 outer dst:")


def test_error_quoting_icmp_echo_state() -> None:
    f = make_filter(RULES)
    req = echo(CLIENT, SERVER, 8)
    v_in, v_out = route(f, req)
    assert v_out is not None
    err = IP(src=ROUTER, dst=CLIENT) / ICMP(type=11, code=0) / Raw(bytes(req)[:28])
    e_in, e_out = route(f, err, 1)
    assert e_in.reason == "state" and e_in.state is v_out.state
    assert e_out is not None and e_out.state is v_in.state
    # v6: time exceeded quoting an echo request
    req6 = IPv6(src=CLIENT6, dst=SERVER6) / ICMPv6EchoRequest(id=5, seq=1)
    s_in, s_out = route(f, req6)
    err6 = IPv6(src=ROUTER6, dst=CLIENT6) / ICMPv6TimeExceeded() / Raw(bytes(req6)[:48])
    e_in, e_out = route(f, err6, 1)
    assert e_in.state is s_out.state and e_out is not None and e_out.state is s_in.state


def test_error_without_state_meets_the_rules() -> None:
    f = make_filter(RULES)
    conn = TcpConn(f, router=True)
    v_in, _ = route(f, error_about_client_segment(conn, 1000), 0)
    assert not v_in.passed and v_in.reason == "match" and v_in.rule.nr == 0 and v_in.state is None
    f = make_filter("block all\npass in proto icmp all\npass out all\n")
    vs = route(f, error_about_client_segment(conn, 1000), 0)
    assert passed(vs) and vs[0].rule.nr == 1 and len(f.states) == 0  # errors open no state


def test_error_quoting_an_error_meets_the_rules() -> None:
    f = make_filter(RULES)
    conn = tcp_conn(f)
    first = error_about_client_segment(conn, conn.c_nxt)
    second = IP(src=CLIENT, dst=ROUTER) / ICMP(type=3, code=3) / Raw(bytes(first)[:28])
    v_in, _ = route(f, second, 2)
    assert v_in.passed and v_in.reason == "match" and v_in.rule.nr == 1 and v_in.state is None


def test_truncated_inner_header_meets_the_rules() -> None:
    f = make_filter(RULES)
    conn = tcp_conn(f)
    for quote in (10, 24):  # inside the quoted IP header; 4 bytes of TCP
        err = error_about_client_segment(conn, conn.c_nxt, quote=quote)
        before = counter(f, "short")
        v_in, _ = route(f, err, 2)
        assert not v_in.passed and v_in.reason == "match" and v_in.rule.nr == 0 and v_in.state is None
        assert counter(f, "short") == before + 1


def test_error_quoting_non_first_fragment_meets_the_rules() -> None:
    f = make_filter(RULES)
    conn = tcp_conn(f)
    inner = IP(src=CLIENT, dst=SERVER, frag=100, proto=6) / Raw(b"x" * 16)
    err = IP(src=ROUTER, dst=CLIENT) / ICMP(type=3, code=4) / Raw(bytes(inner))
    v_in, _ = route(f, err, 2)
    assert not v_in.passed and v_in.rule.nr == 0 and counter(f, "fragment") == 1
    assert len(conn.hops) == 2


# -- through `pfcluster replay --json` on a pcap --------------------------------------------


def test_replay_json_on_scapy_pcap(tmp_path: Path) -> None:
    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    pkts = [
        echo(CLIENT, SERVER, 8),
        echo(SERVER, CLIENT, 0),
        echo(SERVER, CLIENT, 0, ident=0x4321),
    ]
    c = TcpConn(make_filter(RULES), router=True)
    syn = c.seg(True, "S")
    c.c_nxt += 1
    synack = c.seg(False, "SA")
    c.s_nxt += 1
    ack = c.seg(True, "A")
    pkts += [syn, synack, ack]
    pkts.append(IP(src=ROUTER, dst=CLIENT) / ICMP(type=3, code=4) / Raw(bytes(
        IP(src=CLIENT, dst=SERVER) / TCP(sport=40000, dport=5201, flags="A", seq=c.c_nxt))[:28]))
    pkts.append(IP(src=ROUTER, dst=CLIENT) / ICMP(type=3, code=4) / Raw(bytes(
        IP(src=CLIENT, dst=SERVER) / TCP(sport=40000, dport=5201, flags="A",
                                         seq=(c.c_nxt + 10**6) & 0xFFFFFFFF))[:28]))
    for i, p in enumerate(pkts):
        p.time = 1000 + i * 0.1
    cap = tmp_path / "icmp.pcap"
    wrpcap(str(cap), pkts)
    res = CliRunner().invoke(replay, ["--rules", str(rules), "--iface", "em0=198.51.100.0/24",
                                      "--iface", "em1=203.0.113.0/24", "--json", str(cap)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.output.splitlines()]
    recs, summary = lines[:-1], lines[-1]
    assert [r["action"] for r in recs] == ["pass", "pass", "block", "pass", "pass", "pass", "pass", "block"]
    assert recs[0]["in"]["rule"] == 1 and recs[0]["out"]["rule"] == 2
    assert recs[1]["in"]["reason"] == "state" and recs[1]["in"]["state"] == recs[0]["out"]["state"]
    assert recs[2]["in"] == {"action": "block", "reason": "match", "rule": 0, "state": None}
    assert recs[6]["in"]["reason"] == "state" and recs[6]["out"]["state"] == recs[3]["in"]["state"]
    assert recs[7]["in"]["reason"] == "state-mismatch" and recs[7]["in"]["state"] == recs[3]["out"]["state"]
    assert recs[7]["log"][0].startswith(f"pf: BAD ICMP 3:4 {ROUTER} -> {CLIENT} state: TCP out")
    assert summary["summary"]["counters"]["state-mismatch"] == 1
    icmp_states = [s for s in summary["states"] if s["proto"] in (1, "icmp")]
    assert len(icmp_states) == 2


def test_wrong_direction_check_needs_a_rule_naming_an_icmp_type() -> None:
    """pf_icmp_state_lookup checks the direction only when the state's rule named an
    icmp-type (`rule.ptr->type`): with a typeless rule the same message passes."""
    f = make_filter(RULES)
    _, v_out = route(f, echo(CLIENT, SERVER, 8, ident=8))
    assert v_out is not None and v_out.state is not None
    v_in, _ = route(f, echo(SERVER, CLIENT, 8, ident=8), 1)
    assert v_in.passed and v_in.state is v_out.state and v_in.reason == "state"
