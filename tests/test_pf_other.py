"""Issue 2 acceptance: UDP, ICMP, ICMPv6 and other protocols through the pf engine."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.packet import Raw

from pfcluster.pf import pfctl
from pfcluster.pf.constants import (
    PF_IN,
    PF_OUT,
    PFTM,
    PFUDPS_MULTIPLE,
    PFUDPS_NO_TRAFFIC,
    PFUDPS_SINGLE,
)
from test_pf_helpers import CLIENT, CLIENT6, SERVER, SERVER6, TcpConn, make_filter, pk, udp

RULES = """
block all
pass in on em0 proto tcp to port 5201
pass in on em0 proto udp to port 53
pass in on em0 inet proto icmp icmp-type echoreq
pass in on em0 inet6 proto icmp6 icmp6-type echoreq
pass in on em0 proto gre
"""


def mismatches(f) -> int:
    return pfctl.counters_dict(f, 0)["counters"]["state-mismatch"]


# -- UDP -----------------------------------------------------------------------------


def test_udp_first_single_multiple() -> None:
    f = make_filter(RULES)
    q = pk(udp(CLIENT, SERVER, 5353, 53))
    r = pk(udp(SERVER, CLIENT, 53, 5353))
    v = f.test(PF_IN, "em0", q, 0)
    assert v.passed and v.new_state and v.rule.nr == 2
    st = v.state
    assert (st.src.state, st.dst.state) == (PFUDPS_SINGLE, PFUDPS_NO_TRAFFIC)
    assert st.timeout == PFTM.UDP_FIRST_PACKET
    v = f.test(PF_IN, "em0", q, 1)  # the source again, no answer yet
    assert v.state is st and st.timeout == PFTM.UDP_SINGLE
    assert (st.src.state, st.dst.state) == (PFUDPS_SINGLE, PFUDPS_NO_TRAFFIC)
    v = f.test(PF_OUT, "em0", r, 2)  # the answer
    assert v.passed and v.reason == "state" and v.state is st
    assert (st.src.state, st.dst.state) == (PFUDPS_MULTIPLE, PFUDPS_SINGLE)
    assert st.timeout == PFTM.UDP_SINGLE
    v = f.test(PF_IN, "em0", q, 3)
    assert (st.src.state, st.dst.state) == (PFUDPS_MULTIPLE, PFUDPS_MULTIPLE)
    assert st.timeout == PFTM.UDP_MULTIPLE and st.expire == 3
    assert (st.packets0, st.packets1) == (3, 1)
    # udp.multiple = 60
    assert f.expire(62.9) == 0 and f.expire(63.1) == 1


def test_udp_timeouts_expire() -> None:
    f = make_filter("set timeout { udp.first 7, udp.single 3 }\n" + RULES)
    st = f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, 5353, 53)), 0).state
    assert f._lookup(st.key, 6.9) is st and f._lookup(st.key, 7.1) is None
    st = f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, 5353, 53)), 10).state
    f.test(PF_OUT, "em0", pk(udp(SERVER, CLIENT, 53, 5353)), 11)
    assert f.expire(13.9) == 0 and f.expire(14.1) == 1


def test_udp_unrelated_reply_is_blocked() -> None:
    f = make_filter(RULES)
    f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, 5353, 53)), 0)
    v = f.test(PF_OUT, "em0", pk(udp(SERVER, CLIENT, 53, 5354)), 0)
    assert not v.passed and v.rule.nr == 0


def test_udp_router_two_states() -> None:
    f = make_filter("pass in on em0 proto udp\npass out on em1 proto udp\n")
    q = bytes(udp(CLIENT, SERVER, 5353, 53))
    a = f.test(PF_IN, "em0", pk(IP(q)), 0)
    b = f.test(PF_OUT, "em1", pk(IP(q)), 0)
    assert a.new_state and b.new_state and a.state is not b.state
    r = bytes(udp(SERVER, CLIENT, 53, 5353))
    assert f.test(PF_IN, "em1", pk(IP(r)), 1).state is b.state
    assert f.test(PF_OUT, "em0", pk(IP(r)), 1).state is a.state
    for st in (a.state, b.state):
        assert (st.src.state, st.dst.state) == (PFUDPS_MULTIPLE, PFUDPS_SINGLE)


def test_block_return_udp_gives_icmp_port_unreachable() -> None:
    f = make_filter("block return in on em0 proto udp to port 69\n")
    sent = udp(CLIENT, SERVER, 5353, 69, b"tftp")
    v = f.test(PF_IN, "em0", pk(sent), 0)
    assert not v.passed and v.reply is not None
    r = IP(v.reply)
    assert (r.src, r.dst) == (SERVER, CLIENT)
    assert (r[ICMP].type, r[ICMP].code) == (3, 3)
    quoted = r[IPerror]
    assert (quoted.src, quoted.dst) == (CLIENT, SERVER)
    assert (r[UDPerror].sport, r[UDPerror].dport) == (5353, 69)
    # the quote is the IP header + 8 bytes, and the checksums verify
    assert len(bytes(r[ICMP].payload)) == 28
    r2 = IP(v.reply)
    del r2.chksum
    del r2[ICMP].chksum
    r2 = IP(bytes(r2))
    assert (r2.chksum, r2[ICMP].chksum) == (r.chksum, r[ICMP].chksum)


def test_block_return_udp_v6_gives_icmp6_port_unreachable() -> None:
    f = make_filter("block return in on em0 proto udp to port 69\n")
    v = f.test(PF_IN, "em0", pk(udp(CLIENT6, SERVER6, 5353, 69, b"tftp")), 0)
    r = IPv6(v.reply)
    assert (r.src, r.dst) == (SERVER6, CLIENT6)
    u = r[ICMPv6DestUnreach]
    assert u.code == 4
    assert (u[UDPerror].sport, u[UDPerror].dport) == (5353, 69)


def test_block_return_never_answers_icmp_errors() -> None:
    f = make_filter("block return in on em0\n")
    err = IP(src=CLIENT, dst=SERVER) / ICMP(type=3, code=3) / bytes(udp(SERVER, CLIENT, 53, 5353))[:28]
    v = f.test(PF_IN, "em0", pk(err), 0)
    assert not v.passed and v.reply is None


# -- ICMP echo ------------------------------------------------------------------------------


def echo(src: str, dst: str, typ: int, ident: int = 0x4242, seq: int = 1):
    return IP(src=src, dst=dst) / ICMP(type=typ, id=ident, seq=seq) / b"ping"


def test_icmp_echo_request_and_reply() -> None:
    f = make_filter(RULES)
    v = f.test(PF_IN, "em0", pk(echo(CLIENT, SERVER, 8)), 0)
    assert v.passed and v.new_state and v.rule.nr == 3
    st = v.state
    assert st.timeout == PFTM.ICMP_FIRST_PACKET
    v = f.test(PF_OUT, "em0", pk(echo(SERVER, CLIENT, 0)), 1)
    assert v.passed and v.reason == "state" and v.state is st
    assert st.timeout == PFTM.ICMP_ERROR_REPLY and st.expire == 1
    assert pfctl.format_states(f, 1)[0].startswith("all icmp 203.0.113.10")
    # a reply with another id has no state and meets `block all`
    v = f.test(PF_OUT, "em0", pk(echo(SERVER, CLIENT, 0, ident=7)), 1)
    assert not v.passed and v.rule.nr == 0
    # icmp.error = 10
    assert f.expire(10.9) == 0 and f.expire(11.1) == 1


def test_icmp_reply_never_creates_state() -> None:
    f = make_filter("pass out on em0 proto icmp\n")
    v = f.test(PF_OUT, "em0", pk(echo(SERVER, CLIENT, 0)), 0)
    assert v.passed and v.state is None and len(f.states) == 0
    v = f.test(PF_OUT, "em0", pk(echo(SERVER, CLIENT, 8)), 0)
    assert v.passed and v.new_state


def test_icmpv6_echo() -> None:
    f = make_filter(RULES)
    req = IPv6(src=CLIENT6, dst=SERVER6) / ICMPv6EchoRequest(id=99, seq=1, data=b"six")
    v = f.test(PF_IN, "em0", pk(req), 0)
    assert v.passed and v.new_state and v.rule.nr == 4
    st = v.state
    rep = IPv6(src=SERVER6, dst=CLIENT6) / ICMPv6EchoReply(id=99, seq=1, data=b"six")
    v = f.test(PF_OUT, "em0", pk(rep), 1)
    assert v.passed and v.state is st and st.timeout == PFTM.ICMP_ERROR_REPLY
    # pfctl prints getprotobynumber(58)->p_name: "ipv6-icmp"
    assert pfctl.format_states(f, 1)[0].startswith("all ipv6-icmp 2001:db8:2::10")
    rep = IPv6(src=SERVER6, dst=CLIENT6) / ICMPv6EchoReply(id=100, seq=1)
    assert not f.test(PF_OUT, "em0", pk(rep), 1).passed


# -- ICMP errors about TCP / UDP states -------------------------------------------------------


def tcp_state():
    f = make_filter(RULES)
    conn = TcpConn(f)
    conn.handshake(now=0)
    conn.c("PA", b"d" * 100, now=1)
    conn.s("A", now=1)
    return f, conn, next(iter(f.states))


def icmp_error_about(conn: TcpConn, seq: int, quote_len: int = 28, outer_dst: str = CLIENT):
    """An ICMP port unreachable from the server side about a client segment."""
    inner = IP(src=CLIENT, dst=SERVER) / TCP(sport=40000, dport=5201, flags="PA", seq=seq,
                                             ack=conn.s_nxt) / (b"d" * 100)
    return IP(src=SERVER, dst=outer_dst) / ICMP(type=3, code=3) / Raw(bytes(inner)[:quote_len])


def test_icmp_error_quoting_tcp_in_window_passes_and_matches_state() -> None:
    f, conn, st = tcp_state()
    pkts = (st.packets0, st.packets1)
    v = f.test(PF_OUT, "em0", pk(icmp_error_about(conn, conn.c_nxt - 100)), 2)
    assert v.passed and v.reason == "state" and v.state is st
    assert (st.packets0, st.packets1) == (pkts[0], pkts[1] + 1)
    # a full quote works too
    v = f.test(PF_OUT, "em0", pk(icmp_error_about(conn, conn.c_nxt, quote_len=200)), 2)
    assert v.passed and v.state is st


def test_forged_icmp_error_with_seq_outside_window_is_blocked() -> None:
    f, conn, st = tcp_state()
    before = (st.src.as_tuple(), st.dst.as_tuple())
    seq = conn.c_nxt + 10**6
    v = f.test(PF_OUT, "em0", pk(icmp_error_about(conn, seq)), 2)
    assert not v.passed and v.reason == "state-mismatch" and v.state is st
    assert v.log == [
        f"pf: BAD ICMP 3:3 {SERVER} -> {CLIENT} state: TCP in wire: (0) "
        f"{CLIENT}:40000 {SERVER}:5201 stack: (0) - "
        f"[lo={st.src.seqlo} high={st.src.seqhi} win={st.src.max_win} modulator=0 wscale=7] "
        f"[lo={st.dst.seqlo} high={st.dst.seqhi} win={st.dst.max_win} modulator=0 wscale=7] "
        f"4:4 @1 seq={seq}"
    ]
    assert (st.src.as_tuple(), st.dst.as_tuple()) == before
    assert mismatches(f) == 1
    # too far back: seqlo - (max_win << dws)
    back = (st.src.seqlo - (st.dst.max_win << 7) - 1) & 0xFFFFFFFF
    assert not f.test(PF_OUT, "em0", pk(icmp_error_about(conn, back)), 2).passed
    assert f.test(PF_OUT, "em0", pk(icmp_error_about(conn, back + 1)), 2).passed


def test_icmp_error_outer_dst_must_be_inner_src() -> None:
    # pf checks this before any state lookup and drops without a state, so pf_test hands
    # the error to the ruleset (here `block all`)
    f, conn, _st = tcp_state()
    v = f.test(PF_OUT, "em0", pk(icmp_error_about(conn, conn.c_nxt, outer_dst="198.51.100.99")), 2)
    assert not v.passed and v.reason == "match" and v.state is None and v.rule.nr == 0
    assert v.log and v.log[0].startswith("pf: BAD ICMP 3:3 outer dst:")


def test_icmp_error_without_state_meets_the_rules() -> None:
    f = make_filter(RULES)
    conn = TcpConn(f)
    v = f.test(PF_OUT, "em0", pk(icmp_error_about(conn, 1000)), 0)
    assert not v.passed and v.rule.nr == 0


def test_icmp_error_from_a_router_on_the_path_passes() -> None:
    # outer src is a router, not the server: only outer dst == inner src is required
    f, conn, st = tcp_state()
    p = icmp_error_about(conn, conn.c_nxt)
    p[IP].src = "203.0.113.1"
    v = f.test(PF_OUT, "em0", pk(IP(bytes(p))), 2)
    assert v.passed and v.state is st


def test_icmp_error_inbound_about_server_segment() -> None:
    # the error travels in on em0 (towards the server) and quotes a server segment
    f, conn, st = tcp_state()
    inner = IP(src=SERVER, dst=CLIENT) / TCP(sport=5201, dport=40000, flags="A", seq=conn.s_nxt)
    err = IP(src=CLIENT, dst=SERVER) / ICMP(type=3, code=3) / Raw(bytes(inner)[:28])
    v = f.test(PF_IN, "em0", pk(err), 2)
    assert v.passed and v.state is st
    inner = IP(src=SERVER, dst=CLIENT) / TCP(sport=5201, dport=40000, flags="A", seq=conn.s_nxt + 10**6)
    err = IP(src=CLIENT, dst=SERVER) / ICMP(type=3, code=3) / Raw(bytes(inner)[:28])
    assert not f.test(PF_IN, "em0", pk(err), 2).passed


def test_icmp_error_quoting_udp_passes() -> None:
    f = make_filter(RULES)
    st = f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, 5353, 53)), 0).state
    err = IP(src=SERVER, dst=CLIENT) / ICMP(type=3, code=3) / bytes(udp(CLIENT, SERVER, 5353, 53))[:28]
    v = f.test(PF_OUT, "em0", pk(err), 1)
    assert v.passed and v.state is st
    # an error about a UDP flow that has no state is not passed by it
    err = IP(src=SERVER, dst=CLIENT) / ICMP(type=3, code=3) / bytes(udp(CLIENT, SERVER, 5354, 53))[:28]
    assert not f.test(PF_OUT, "em0", pk(err), 1).passed


def test_icmpv6_error_quoting_tcp() -> None:
    f = make_filter(RULES)
    conn = TcpConn(f, v6=True)
    conn.handshake()
    st = next(iter(f.states))
    inner = IPv6(src=CLIENT6, dst=SERVER6) / TCP(sport=40000, dport=5201, flags="A", seq=conn.c_nxt)
    err = IPv6(src=SERVER6, dst=CLIENT6) / ICMPv6DestUnreach(code=4) / Raw(bytes(inner)[:48])
    v = f.test(PF_OUT, "em0", pk(err), 1)
    assert v.passed and v.state is st
    inner[TCP].seq = conn.c_nxt + 10**6
    err = IPv6(src=SERVER6, dst=CLIENT6) / ICMPv6DestUnreach(code=4) / Raw(bytes(inner)[:48])
    v = f.test(PF_OUT, "em0", pk(err), 1)
    assert not v.passed and v.reason == "state-mismatch"


# -- other protocols -----------------------------------------------------------------------


def test_other_protocol_states() -> None:
    f = make_filter(RULES)
    gre = IP(src=CLIENT, dst=SERVER, proto=47) / b"\x00\x00\x08\x00payload"
    back = IP(src=SERVER, dst=CLIENT, proto=47) / b"\x00\x00\x08\x00payload"
    v = f.test(PF_IN, "em0", pk(gre), 0)
    assert v.passed and v.new_state and v.rule.nr == 5
    st = v.state
    assert st.timeout == PFTM.OTHER_FIRST_PACKET
    v = f.test(PF_OUT, "em0", pk(back), 1)
    assert v.state is st and st.timeout == PFTM.OTHER_SINGLE
    f.test(PF_IN, "em0", pk(gre), 2)
    assert st.timeout == PFTM.OTHER_MULTIPLE
    assert pfctl.format_states(f, 2) == ["all gre 203.0.113.10 <- 198.51.100.2       MULTIPLE:MULTIPLE"]
    # other.multiple = 60
    assert f.expire(61.9) == 0 and f.expire(62.1) == 1


def test_udp_v6_state() -> None:
    f = make_filter(RULES)
    v = f.test(PF_IN, "em0", pk(IPv6(src=CLIENT6, dst=SERVER6) / UDP(sport=5353, dport=53) / b"q"), 0)
    assert v.passed and v.new_state
    v2 = f.test(PF_OUT, "em0", pk(IPv6(src=SERVER6, dst=CLIENT6) / UDP(sport=53, dport=5353) / b"a"), 1)
    assert v2.state is v.state
    assert pfctl.format_states(f, 1) == [
        "all udp 2001:db8:2::10[53] <- 2001:db8:1::2[5353]       SINGLE:MULTIPLE"
    ]
