"""Parser and reply builders checked against scapy, the independent oracle.

Packets are built with scapy; expected field values come from scapy's own dissection of
the same bytes (`oracle`), never from pfcluster's builders.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_RR, fragment
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6NDOptSrcLLAddr,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.packet import Packet as ScapyPacket
from scapy.packet import Raw
from scapy.utils import checksum as scapy_checksum

from pfcluster.packet import (
    MalformedPacket,
    Packet,
    addr_str,
    build_icmp_unreach,
    build_tcp_ack,
    build_tcp_rst,
    internet_checksum,
    parse,
    parse_into,
)

A4, B4 = "198.51.100.10", "203.0.113.20"
A6, B6 = "2001:db8:1::10", "2001:db8:2::20"
ROUTER6 = "2001:db8:ff::1"

AF = {4: socket.AF_INET, 6: socket.AF_INET6}
EXT6 = (IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting, IPv6ExtHdrFragment, AH)


# ---------------------------------------------------------------------------------------
# The oracle: field values as scapy dissects them


def _offset(whole: bytes, layer: ScapyPacket) -> int:
    return len(whole) - len(bytes(layer))


def oracle(data: bytes) -> dict[str, Any]:
    """Every contract field of an un-truncated packet, read from scapy's dissection."""
    version = data[0] >> 4
    s = IP(data) if version == 4 else IPv6(data)
    data = data[: s.len if version == 4 else 40 + s.plen]  # drop link-layer padding
    s = IP(data) if version == 4 else IPv6(data)
    whole = bytes(s)
    af = AF[version]
    f: dict[str, Any] = {
        "af": af,
        "src": socket.inet_pton(af, s.src),
        "dst": socket.inet_pton(af, s.dst),
        "ttl": s.ttl if version == 4 else s.hlim,
        "tos": s.tos if version == 4 else s.tc,
        "sport": 0, "dport": 0, "tcp_flags": 0, "seq": 0, "ack": 0, "win": 0,
        "th_off": 0, "p_len": 0, "mss": -1, "wscale": -1, "sack_ok": False,
        "ts_val": -1, "ts_ecr": -1, "icmp_type": 0, "icmp_code": 0, "icmp_id": -1,
        "truncated": False,
    }
    if version == 4:
        f.update(
            proto=s.proto,
            ip_len=s.len,
            ip_id=s.id,
            frag_off=s.frag * 8,
            more_frags=bool(s.flags.MF),
            df=bool(s.flags.DF),
            ip_opts=s.ihl > 5,
            ip_hl=s.ihl * 4,
        )
        upper = s.payload
    else:
        f.update(ip_len=40 + s.plen, ip_id=0, frag_off=0, more_frags=False, df=False)
        f["ip_opts"] = False
        layer = s.payload
        proto = s.nh
        while isinstance(layer, EXT6):
            if isinstance(layer, IPv6ExtHdrFragment):
                f.update(ip_id=layer.id, frag_off=layer.offset * 8, more_frags=bool(layer.m))
            if isinstance(layer, (IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt)):
                f["ip_opts"] = True
            proto = layer.nh
            layer = layer.payload
        f["proto"] = proto
        f["ip_hl"] = _offset(whole, layer) if layer else f["ip_len"]
        upper = layer
    f["fragment"] = f["more_frags"] or f["frag_off"] > 0
    no_l4 = f["frag_off"] > 0 or (version == 6 and f["proto"] == 59)
    f["l4_off"] = f["ip_len"] if no_l4 else f["ip_hl"]
    f["l4_len"] = f["ip_len"] - f["l4_off"]
    if no_l4:
        return f
    if isinstance(upper, Raw) and f["proto"] in (6, 17):
        upper = (TCP if f["proto"] == 6 else UDP)(bytes(upper))  # scapy's AH stops dissecting
    if isinstance(upper, TCP):
        f.update(
            sport=upper.sport,
            dport=upper.dport,
            seq=upper.seq,
            ack=upper.ack,
            tcp_flags=int(upper.flags),
            win=upper.window,
            th_off=upper.dataofs * 4,
            p_len=len(bytes(upper.payload)),
        )
        for name, value in upper.options:
            if name == "MSS":
                f["mss"] = value
            elif name == "WScale":
                f["wscale"] = value
            elif name == "SAckOK":
                f["sack_ok"] = True
            elif name == "Timestamp":
                f["ts_val"], f["ts_ecr"] = value
    elif isinstance(upper, UDP):
        f.update(sport=upper.sport, dport=upper.dport, p_len=upper.len - 8)
    elif isinstance(upper, ICMP) or (version == 6 and f["proto"] == 58):
        icmp_type, icmp_code = bytes(upper)[0], bytes(upper)[1]
        f.update(icmp_type=icmp_type, icmp_code=icmp_code)
        if hasattr(upper, "id") and icmp_type in (0, 8, 13, 14, 15, 16, 17, 18, 128, 129):
            f.update(icmp_id=upper.id, sport=upper.id, dport=upper.id)
    return f


def check(data: bytes, **overrides: Any) -> Packet:
    """Parse ``data`` and compare every field with the oracle (plus ``overrides``)."""
    p = parse(data)
    want = oracle(data)
    want.update(overrides)
    got = p.fields()
    assert bytes(got.pop("raw")) == data[: want["ip_len"]]
    inner = got.pop("inner")
    if "inner" not in overrides:
        assert inner is None
    want.pop("inner", None)
    assert got == want
    return p


def check_inner(outer: Packet, quoted_original: bytes, quoted_len: int) -> Packet:
    """The quote inside an ICMP error parses like the original packet it came from."""
    inner = outer.inner
    assert inner is not None
    assert inner.inner is None
    full = parse(quoted_original)
    assert bytes(inner.raw) == quoted_original[:quoted_len]
    assert inner.truncated == (quoted_len < len(quoted_original))
    want = full.fields()
    got = inner.fields()
    for key in ("raw", "inner", "truncated"):
        want.pop(key)
        got.pop(key)
    if inner.truncated and full.proto == 6 and quoted_len - full.l4_off < 20:
        # only ports and sequence number survive an 8-byte quote
        for key in ("tcp_flags", "ack", "win", "th_off", "p_len"):
            want[key] = 0
        for key in ("mss", "wscale", "ts_val", "ts_ecr"):
            want[key] = -1
        want["sack_ok"] = False
    assert got == want
    return inner


def ip4(**kw: Any) -> IP:
    return IP(src=A4, dst=B4, **kw)


def ip6(**kw: Any) -> IPv6:
    return IPv6(src=A6, dst=B6, **kw)


# ---------------------------------------------------------------------------------------
# IPv4 and TCP


TCP_OPTION_CASES = [
    [],
    [("MSS", 1460)],
    [("WScale", 7)],
    [("WScale", 14)],
    [("WScale", 200)],  # raw, not clamped
    [("SAckOK", b"")],
    [("Timestamp", (123456789, 987654321))],
    [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))],
    [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (0xFFFFFFFF, 0)), ("NOP", None),
     ("WScale", 7)],
    [("MSS", 536), ("NOP", None), ("WScale", 3), ("EOL", None)],
    [("NOP", None), ("NOP", None), ("SAck", (1000, 2000))],  # SACK blocks: ignored
]


@pytest.mark.parametrize(
    "options", TCP_OPTION_CASES, ids=lambda o: "+".join(n for n, _ in o) or "none"
)
@pytest.mark.parametrize("version", [4, 6])
def test_tcp_options(version: int, options: list[Any]) -> None:
    l3 = ip4(ttl=61, tos=0x28, id=4242, flags="DF") if version == 4 else ip6(hlim=33, tc=0xB8)
    data = bytes(
        l3 / TCP(sport=40000, dport=443, seq=0xDEADBEEF, ack=0x01020304, flags="SA",
                 window=29200, options=options)
    )
    check(data)


@pytest.mark.parametrize("flags", ["A", "S", "SA", "F", "FA", "R", "RA", "PA", "UAPRSFEC", ""])
def test_tcp_flags_and_payload(flags: str) -> None:
    data = bytes(ip4() / TCP(sport=1, dport=2, flags=flags, seq=7, ack=9) / Raw(b"x" * 37))
    p = check(data)
    assert p.p_len == 37


def test_tcp_bad_option_length_ends_walk() -> None:
    # MSS, then an option with length 1 (bad), then a timestamp that must not be read
    opts = b"\x02\x04\x05\xb4" + b"\x05\x01" + b"\x08\x0a" + b"\0\0\0\1\0\0\0\2" + b"\0\0\0\0"
    data = bytes(ip4() / TCP(dataofs=(20 + len(opts)) // 4, flags="S") / Raw(opts))
    p = parse(data)
    assert (p.mss, p.ts_val, p.th_off, p.p_len) == (1460, -1, 20 + len(opts), 0)


def test_tcp_option_running_past_header_ends_walk() -> None:
    opts = b"\x01\x03\x03\x07" + b"\x08\x0a\0\0"  # TIMESTAMP claims 10 bytes, 4 present
    data = bytes(ip4() / TCP(dataofs=7, flags="S") / Raw(opts + b"payload"))
    p = parse(data)
    assert (p.wscale, p.ts_val, p.ts_ecr, p.p_len) == (7, -1, -1, 7)


def test_tcp_options_wrong_fixed_length_skipped() -> None:
    # an MSS option of length 3 is skipped by its length; the window scale after it counts
    opts = b"\x02\x03\x05" + b"\x03\x03\x05" + b"\x00\x00"
    p = parse(bytes(ip4() / TCP(dataofs=7, flags="S") / Raw(opts)))
    assert (p.mss, p.wscale) == (-1, 5)


def test_tcp_eol_ends_walk() -> None:
    opts = b"\x00" + b"\x02\x04\x05\xb4" + b"\0\0\0"
    p = parse(bytes(ip4() / TCP(dataofs=7, flags="S") / Raw(opts)))
    assert p.mss == -1


def test_ipv4_options() -> None:
    data = bytes(
        ip4(options=[IPOption_RR(routers=["192.0.2.1", "192.0.2.2"]), IPOption_NOP()])
        / TCP(sport=5, dport=6, flags="A", options=[("MSS", 1400)])
        / Raw(b"abc")
    )
    p = check(data)
    assert p.ip_opts and p.ip_hl > 20 and p.l4_off == p.ip_hl


def test_trailing_bytes_beyond_ip_len_ignored() -> None:
    data = bytes(ip4() / TCP(flags="A"))
    p = check(data + b"\0" * 6)  # Ethernet minimum-frame padding
    assert len(p.raw) == 40
    data6 = bytes(ip6() / UDP(sport=1, dport=2) / Raw(b"q"))
    assert len(check(data6 + b"\xff" * 9).raw) == len(data6)


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_ipv4_fragments(proto: str) -> None:
    l4 = UDP(sport=5353, dport=53) if proto == "udp" else TCP(sport=4000, dport=80, flags="PA")
    whole = ip4(id=777) / l4 / Raw(b"x" * 100)
    frags = [bytes(f) for f in fragment(whole, fragsize=32)]
    assert len(frags) == 4
    first = check(frags[0])
    assert first.fragment and first.more_frags and first.frag_off == 0 and first.ip_id == 777
    assert first.sport in (5353, 4000) and first.l4_off == 20
    if proto == "udp":
        assert first.p_len == 100  # from the UDP length: the whole datagram
    for middle in frags[1:3]:
        p = check(middle)
        assert p.fragment and p.more_frags and p.frag_off > 0
        want = (0, 0, 17 if proto == "udp" else 6, p.ip_len, 0, 20)
        assert (p.sport, p.dport, p.proto, p.l4_off, p.l4_len, p.ip_hl) == want
    last = check(frags[3])
    assert last.fragment and not last.more_frags and last.frag_off == 96


def test_ipv4_fragment_keeps_proto() -> None:
    frags = [bytes(f) for f in fragment(ip4() / UDP() / Raw(b"y" * 64), fragsize=24)]
    assert all(parse(f).proto == 17 for f in frags)


def test_tiny_tcp_first_fragment_is_malformed() -> None:
    frags = [bytes(f) for f in fragment(ip4() / TCP() / Raw(b"z" * 64), fragsize=16)]
    with pytest.raises(MalformedPacket):
        parse(frags[0])
    assert parse(frags[1]).frag_off == 16


def test_df_flag() -> None:
    assert check(bytes(ip4(flags="DF") / UDP())).df
    assert not check(bytes(ip4() / UDP())).df


def test_other_protocol() -> None:
    data = bytes(ip4(proto=47) / Raw(b"\0" * 12))  # GRE: not parsed, l4_off still marks it
    p = check(data)
    assert (p.proto, p.l4_off, p.l4_len, p.sport) == (47, 20, 12, 0)


# ---------------------------------------------------------------------------------------
# IPv6 extension headers


def test_ipv6_hbh_dstopt_fragment_first() -> None:
    data = bytes(
        ip6()
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrFragment(offset=0, m=1, id=0xCAFEF00D)
        / TCP(sport=2222, dport=22, flags="S", options=[("MSS", 1220), ("WScale", 6)])
    )
    p = check(data)
    assert p.ip_opts and p.fragment and p.more_frags and p.ip_id == 0xCAFEF00D
    assert (p.l4_off, p.mss, p.wscale) == (40 + 8 + 8 + 8, 1220, 6)


def test_ipv6_fragment_non_first_stops_walk() -> None:
    data = bytes(
        ip6()
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrFragment(offset=185, m=1, id=99, nh=6)
        / Raw(b"\x00" * 64)
    )
    p = check(data)
    assert (p.proto, p.frag_off, p.sport, p.l4_off, p.ip_hl) == (6, 1480, 0, p.ip_len, 56)


def test_ipv6_fragment_last() -> None:
    data = bytes(ip6() / IPv6ExtHdrFragment(offset=3, m=0, id=5, nh=17) / Raw(b"\x01" * 10))
    p = check(data)
    assert p.fragment and not p.more_frags and p.frag_off == 24 and p.proto == 17


def test_ipv6_atomic_fragment_is_not_a_fragment() -> None:
    data = bytes(ip6() / IPv6ExtHdrFragment(offset=0, m=0, id=5) / UDP(sport=9, dport=10))
    p = check(data)
    assert not p.fragment and p.ip_id == 5 and p.sport == 9


def test_ipv6_routing_and_dstopts() -> None:
    data = bytes(
        ip6()
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrRouting(addresses=["2001:db8::1", "2001:db8::2"])
        / IPv6ExtHdrDestOpt()
        / UDP(sport=1000, dport=2000)
        / Raw(b"hello")
    )
    p = check(data)
    assert p.ip_opts and p.l4_off == 40 + 8 + 40 + 8 and p.p_len == 5


def test_ipv6_routing_alone_is_not_options() -> None:
    data = bytes(ip6() / IPv6ExtHdrRouting(addresses=["2001:db8::1"]) / UDP())
    assert not check(data).ip_opts


def test_ipv6_ah() -> None:
    data = bytes(ip6() / AH(nh=6, payloadlen=4, icv=b"\x11" * 12) / TCP(sport=7, dport=8))
    p = check(data)
    assert (p.proto, p.l4_off, p.sport) == (6, 40 + 24, 7)


def test_ipv6_no_next_header() -> None:
    data = bytes(ip6() / IPv6ExtHdrDestOpt(nh=59) / Raw(b"ignored!"))
    p = check(data)
    assert (p.proto, p.l4_off, p.l4_len, p.ip_hl) == (59, p.ip_len, 0, 48)
    assert parse(bytes(ip6(nh=59))).l4_off == 40


def test_ipv6_extension_header_limit() -> None:
    chain = ip6()
    for _ in range(16):
        chain = chain / IPv6ExtHdrDestOpt()
    assert parse(bytes(chain / UDP())).proto == 17
    with pytest.raises(MalformedPacket):
        parse(bytes(chain / IPv6ExtHdrDestOpt() / UDP()))


def test_ipv6_extension_header_beyond_payload() -> None:
    data = bytearray(bytes(ip6() / IPv6ExtHdrDestOpt() / UDP()))
    data[41] = 5  # header length 48 bytes, only 16 present
    with pytest.raises(MalformedPacket):
        parse(bytes(data))


# ---------------------------------------------------------------------------------------
# UDP


@pytest.mark.parametrize("version", [4, 6])
def test_udp(version: int) -> None:
    l3 = ip4() if version == 4 else ip6()
    p = check(bytes(l3 / UDP(sport=5353, dport=53) / Raw(b"\x12" * 30)))
    assert (p.sport, p.dport, p.p_len, p.l4_len) == (5353, 53, 30, 38)


def test_udp_length_shorter_than_payload_is_accepted() -> None:
    data = bytes(ip4() / UDP(sport=1, dport=2, len=10) / Raw(b"abcdef"))
    assert parse(data).p_len == 2


@pytest.mark.parametrize("ulen", [0, 7, 15])
def test_udp_bad_length(ulen: int) -> None:
    with pytest.raises(MalformedPacket):
        parse(bytes(ip4() / UDP(len=ulen) / Raw(b"123456")))


# ---------------------------------------------------------------------------------------
# ICMP


@pytest.mark.parametrize(("icmp_type", "is_query"), [(8, True), (0, True), (13, True), (14, True),
                                                     (15, True), (16, True), (17, True), (18, True),
                                                     (9, False), (10, False)])
def test_icmp_queries(icmp_type: int, is_query: bool) -> None:
    data = bytes(ip4() / ICMP(type=icmp_type, id=0x4321, seq=9) / Raw(b"ping" * 4))
    p = check(data)
    if is_query:
        assert (p.icmp_id, p.sport, p.dport) == (0x4321, 0x4321, 0x4321)
    else:
        assert (p.icmp_id, p.sport) == (-1, 0)


def icmp4_error(orig: bytes, icmp_type: int, code: int, quote: int) -> bytes:
    return bytes(IP(src="192.0.2.1", dst=A4) / ICMP(type=icmp_type, code=code) / orig[:quote])


def test_icmp_port_unreachable_quoting_udp() -> None:
    orig = bytes(ip4(id=31) / UDP(sport=33434, dport=33435) / Raw(b"t" * 20))
    data = icmp4_error(orig, 3, 3, 28)
    p = check(data, inner=True)
    assert (p.icmp_type, p.icmp_code, p.icmp_id, p.sport) == (3, 3, -1, 0)
    inner = check_inner(p, orig, 28)
    assert inner.truncated and inner.ip_len == len(orig) and inner.sport == 33434
    assert inner.p_len == 20  # from the quoted UDP length


def test_icmp_port_unreachable_quoting_tcp_8_bytes() -> None:
    orig = bytes(ip4() / TCP(sport=40000, dport=25, seq=1234567, ack=99, flags="PA",
                             options=[("Timestamp", (5, 6))]) / Raw(b"MAIL"))
    p = check(icmp4_error(orig, 3, 3, 28), inner=True)
    inner = check_inner(p, orig, 28)
    assert (inner.sport, inner.dport, inner.seq, inner.tcp_flags, inner.th_off) == (
        40000, 25, 1234567, 0, 0)


def test_icmp_time_exceeded_quoting_tcp_with_options() -> None:
    orig = bytes(ip4(ttl=1, options=[IPOption_NOP()] * 4)
                 / TCP(sport=1, dport=2, flags="S", options=[("MSS", 1460)]))
    whole = check(icmp4_error(orig, 11, 0, len(orig)), inner=True)
    inner = check_inner(whole, orig, len(orig))
    assert not inner.truncated and inner.mss == 1460 and inner.ip_opts
    cut = check(icmp4_error(orig, 11, 0, 24 + 8), inner=True)
    assert check_inner(cut, orig, 32).mss == -1


def test_icmp_error_quote_cut_inside_tcp_options() -> None:
    orig = bytes(ip4() / TCP(flags="S", options=[("MSS", 1460), ("WScale", 2)] * 2))
    p = parse(icmp4_error(orig, 11, 0, 20 + 22))
    assert p.inner is not None and p.inner.tcp_flags == 2 and p.inner.mss == -1


def test_icmp_error_quoting_icmp_echo_and_error() -> None:
    echo = bytes(ip4() / ICMP(type=8, id=77, seq=1) / Raw(b"x" * 40))
    p = check(icmp4_error(echo, 11, 0, 28), inner=True)
    assert check_inner(p, echo, 28).icmp_id == 77
    err = icmp4_error(bytes(ip4() / UDP()), 3, 1, 28)
    q = check(icmp4_error(err, 3, 3, 28), inner=True)
    assert q.inner is not None and q.inner.icmp_type == 3 and q.inner.inner is None


@pytest.mark.parametrize("icmp_type", [4, 5, 12])
def test_icmp_other_errors_parse_quote(icmp_type: int) -> None:
    orig = bytes(ip4() / UDP(sport=1, dport=2))
    assert check(icmp4_error(orig, icmp_type, 0, 28), inner=True).inner is not None


def test_icmp_error_quote_longer_than_quoted_datagram() -> None:
    orig = bytes(ip4() / UDP(sport=7, dport=9))
    data = bytes(IP(src="192.0.2.1", dst=A4) / ICMP(type=3, code=3) / (orig + b"junk"))
    p = check(data, inner=True)
    assert check_inner(p, orig, len(orig)).raw.nbytes == 28


def test_icmp_error_quote_too_short() -> None:
    # pf reads such an error (the quote is only data to it) and finds no state for it, so
    # the parser keeps the outer packet and leaves inner None
    orig = bytes(ip4() / TCP())
    for data in (icmp4_error(orig, 3, 3, 27),  # 7 bytes of TCP
                 icmp4_error(orig, 3, 3, 19),  # not even the IP header
                 bytes(IP() / ICMP(type=3) / bytes(ip6() / UDP()))):  # other family
        p = parse(data)
        assert (p.proto, p.icmp_type, p.inner) == (1, 3, None)


def test_icmp_header_too_short() -> None:
    with pytest.raises(MalformedPacket):
        parse(bytes(ip4(proto=1) / Raw(b"\x08\x00\x00\x00")))


# ---------------------------------------------------------------------------------------
# ICMPv6


def test_icmp6_echo() -> None:
    p = check(bytes(ip6() / ICMPv6EchoRequest(id=0xBEEF, seq=3, data=b"abc")))
    assert (p.icmp_type, p.icmp_id, p.sport, p.dport) == (128, 0xBEEF, 0xBEEF, 0xBEEF)
    p = check(bytes(ip6() / ICMPv6EchoReply(id=7)))
    assert (p.icmp_type, p.icmp_id) == (129, 7)


def test_icmp6_neighbour_solicitation_has_no_id() -> None:
    data = bytes(IPv6(src="fe80::1", dst="ff02::1:ff00:2", hlim=255)
                 / ICMPv6ND_NS(tgt="fe80::2") / ICMPv6NDOptSrcLLAddr(lladdr="02:00:00:00:00:01"))
    p = check(data)
    assert (p.icmp_type, p.icmp_id, p.inner) == (135, -1, None)


@pytest.mark.parametrize(
    "error",
    [ICMPv6DestUnreach(code=4), ICMPv6PacketTooBig(mtu=1280), ICMPv6TimeExceeded(),
     ICMPv6ParamProblem(ptr=6)],
    ids=["unreach", "toobig", "timex", "paramprob"],
)
def test_icmp6_errors(error: ScapyPacket) -> None:
    orig = bytes(ip6() / IPv6ExtHdrDestOpt()
                 / TCP(sport=443, dport=50000, flags="SA", options=[("MSS", 1440)]) / Raw(b"d" * 9))
    data = bytes(IPv6(src=ROUTER6, dst=A6) / error / orig)
    p = check(data, inner=True)
    inner = check_inner(p, orig, len(orig))
    assert inner.mss == 1440 and inner.ip_opts and inner.p_len == 9


def test_icmp6_error_quote_truncated() -> None:
    orig = bytes(ip6() / UDP(sport=53, dport=5353) / Raw(b"r" * 3000))
    data = bytes(IPv6(src=ROUTER6, dst=A6) / ICMPv6PacketTooBig(mtu=1280) / orig[:1232])
    p = check(data, inner=True)
    inner = check_inner(p, orig, 1232)
    assert inner.truncated and inner.ip_len == len(orig) and inner.p_len == 3000


def test_icmp6_error_quoting_icmp6_echo() -> None:
    orig = bytes(ip6() / ICMPv6EchoRequest(id=12))
    p = check(bytes(IPv6(src=ROUTER6, dst=A6) / ICMPv6TimeExceeded() / orig), inner=True)
    assert check_inner(p, orig, len(orig)).icmp_id == 12


def test_icmp6_error_quoting_ipv4_has_no_inner() -> None:
    p = parse(bytes(ip6() / ICMPv6DestUnreach() / bytes(ip4() / UDP())))
    assert (p.proto, p.icmp_type, p.inner) == (58, 1, None)


def test_icmp_in_wrong_family_not_parsed() -> None:
    p = parse(bytes(ip6(nh=1) / Raw(bytes(ICMP(type=8, id=5)))))
    assert (p.proto, p.icmp_id, p.icmp_type) == (1, -1, 0)


# ---------------------------------------------------------------------------------------
# Truncated and corrupted inputs


def _malformed_cases() -> list[tuple[str, bytes]]:
    tcp4 = bytes(ip4() / TCP(flags="S", options=[("MSS", 1460)]))
    tcp6 = bytes(ip6() / TCP())
    cases = [
        ("empty", b""),
        ("19 bytes", tcp4[:19]),
        ("version 5", bytes([0x55]) + tcp4[1:]),
        ("version 0", bytes(40)),
        ("ihl 4", bytes([0x44]) + tcp4[1:]),
        ("ihl beyond ip_len", bytes([0x4F]) + tcp4[1:]),
        ("ip_len < ihl", tcp4[:2] + struct.pack("!H", 19) + tcp4[4:]),
        ("ip_len > buffer", tcp4[:-1]),
        ("v6 short header", tcp6[:39]),
        ("v6 payload > buffer", tcp6[:-1]),
        ("tcp header short", bytes(ip4(proto=6) / Raw(b"\0" * 19))),
        ("tcp th_off < 20", bytes(ip4() / TCP(dataofs=4))),
        ("tcp th_off beyond packet", bytes(ip4() / TCP(dataofs=15))),
        ("v6 tcp th_off beyond packet", bytes(ip6() / TCP(dataofs=6))),
        ("udp header short", bytes(ip4(proto=17) / Raw(b"\0" * 7))),
        ("v6 udp header short", bytes(ip6(nh=17) / Raw(b"\0" * 7))),
        ("icmp6 short", bytes(ip6(nh=58) / Raw(b"\x80\0\0\0\0\0\0"))),
        ("v6 fragment header short", bytes(ip6(nh=44) / Raw(b"\x06\0\0"))),
    ]
    return cases


@pytest.mark.parametrize(
    ("name", "data"), _malformed_cases(), ids=[n for n, _ in _malformed_cases()]
)
def test_malformed(name: str, data: bytes) -> None:
    with pytest.raises(MalformedPacket):
        parse(data)


def test_malformed_is_value_error() -> None:
    assert issubclass(MalformedPacket, ValueError)


def test_every_truncation_of_valid_packets_raises_malformed() -> None:
    samples = [
        bytes(ip4() / TCP(flags="S", options=[("MSS", 1460), ("SAckOK", b"")])),
        bytes(ip6() / IPv6ExtHdrHopByHop() / UDP() / Raw(b"abc")),
        icmp4_error(bytes(ip4() / TCP()), 3, 3, 28),
    ]
    for data in samples:
        for cut in range(len(data)):
            with pytest.raises(MalformedPacket):
                parse(data[:cut])


# ---------------------------------------------------------------------------------------
# Input types, refilling, repr


def test_input_buffer_types() -> None:
    data = bytes(ip4() / TCP(sport=3, dport=4, flags="A"))
    for buf in (data, bytearray(data), memoryview(data), memoryview(b"xx" + data)[2:],
                memoryview(data).cast("c"), memoryview(data).cast("b")):
        p = parse(buf)
        assert (p.sport, p.dport, p.src) == (3, 4, socket.inet_pton(socket.AF_INET, A4))
        assert isinstance(p.src, bytes) and isinstance(p.raw, memoryview)
    strided = memoryview(bytes(b for c in data for b in (c, 0xEE)))[::2]  # not contiguous
    assert parse(strided).fields() | {"raw": None} == parse(data).fields() | {"raw": None}


def test_parse_into_refills_every_field() -> None:
    syn = bytes(ip6() / TCP(flags="S", options=[("MSS", 1220), ("Timestamp", (1, 2))]))
    err = icmp4_error(bytes(ip4() / UDP(sport=1, dport=2)), 3, 3, 28)
    udp = bytes(ip4() / UDP(sport=9, dport=10))
    pkt = Packet()
    parse_into(pkt, syn)
    parse_into(pkt, err)
    assert pkt.mss == -1 and pkt.inner is not None
    assert parse_into(pkt, udp) is pkt
    assert pkt.fields() | {"raw": None} == parse(udp).fields() | {"raw": None}


def test_parse_into_leaves_packet_alone_on_error() -> None:
    pkt = parse(bytes(ip4() / TCP(flags="S", options=[("MSS", 1460)])))
    before = pkt.fields()
    for bad in (bytes(ip4() / TCP(dataofs=3)), bytes(ip4() / ICMP(type=3))[:27]):
        with pytest.raises(MalformedPacket):
            parse_into(pkt, bad)
        assert pkt.fields() == before


def test_repr() -> None:
    p = parse(bytes(ip4() / TCP(sport=1234, dport=80, flags="SA", seq=5, ack=6,
                                options=[("MSS", 1460)])))
    r = repr(p)
    assert "198.51.100.10:1234 > 203.0.113.20:80" in r and "SA" in r and "mss=1460" in r
    assert "2001:db8:1::10" in repr(parse(bytes(ip6() / UDP())))
    e = repr(parse(icmp4_error(bytes(ip4() / UDP()), 3, 3, 28)))
    assert "ICMP" in e and "truncated" not in e.split("[")[0] and "UDP" in e
    assert repr(Packet()).startswith("<Packet ")


def test_slots() -> None:
    p = parse(bytes(ip4() / UDP()))
    assert not hasattr(p, "__dict__")
    with pytest.raises(AttributeError):
        p.bogus = 1  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------
# Helpers


def test_addr_str() -> None:
    assert addr_str(socket.AF_INET, socket.inet_pton(socket.AF_INET, A4)) == A4
    assert addr_str(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, B6)) == B6


@pytest.mark.parametrize("size", [0, 1, 2, 3, 20, 21, 1499, 1500])
def test_internet_checksum_matches_scapy(size: int) -> None:
    data = bytes((i * 37 + 11) & 0xFF for i in range(size))
    assert internet_checksum(data) == scapy_checksum(data)
    assert internet_checksum(bytearray(data)) == internet_checksum(memoryview(data))


def test_internet_checksum_of_checksummed_header_is_zero() -> None:
    hdr = bytes(ip4(options=[IPOption_NOP()] * 4) / UDP())[:24]
    assert internet_checksum(hdr) == 0


# ---------------------------------------------------------------------------------------
# Reply builders, verified by scapy recomputing lengths and checksums


def recomputed(data: bytes) -> bytes:
    """``data`` rebuilt by scapy after deleting every length and checksum field."""
    s = IP(data) if data[0] >> 4 == 4 else IPv6(data)
    layer: Any = s
    # stop at the quoted datagram of an ICMP error: its fields are data, not to recompute
    while layer and not isinstance(layer, Raw) and "error" not in type(layer).__name__:
        for name in ("chksum", "cksum", "len", "plen"):
            if name in layer.fields:
                delattr(layer, name)
        layer = layer.payload
    return bytes(s)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize(
    ("flags", "payload", "want_seq", "want_ack"),
    # pf_return sends seq = th_ack whatever the flags (not RFC 793's 0 for a non-ACK)
    [("S", 0, 5000, 1001), ("A", 0, 5000, 1000), ("PA", 10, 5000, 1010), ("FA", 3, 5000, 1004),
     ("SA", 0, 5000, 1001), ("", 0, 5000, 1000)],
)
def test_build_tcp_rst(
    version: int, flags: str, payload: int, want_seq: int, want_ack: int
) -> None:
    l3 = ip4() if version == 4 else ip6()
    orig = parse(bytes(l3 / TCP(sport=40000, dport=80, seq=1000, ack=5000, flags=flags)
                       / Raw(b"p" * payload)))
    out = build_tcp_rst(orig)
    assert recomputed(out) == out
    s = IP(out) if version == 4 else IPv6(out)
    assert (s.src, s.dst) == ((B4, A4) if version == 4 else (B6, A6))
    t = s[TCP]
    assert (t.sport, t.dport, t.seq, t.ack, str(t.flags), t.window) == (
        80, 40000, want_seq, want_ack, "RA", 0)
    if version == 4:
        assert s.flags.DF and s.tos == 0x10 and s.ttl == 64
    else:
        assert s.hlim == 64


def test_build_tcp_rst_sequence_wraps() -> None:
    orig = parse(bytes(ip4() / TCP(seq=0xFFFFFFFF, flags="F")))
    t = IP(build_tcp_rst(orig))[TCP]
    assert t.ack == 0


def test_build_tcp_rst_needs_tcp() -> None:
    with pytest.raises(ValueError):
        build_tcp_rst(parse(bytes(ip4() / UDP())))


@pytest.mark.parametrize("version", [4, 6])
def test_build_tcp_ack(version: int) -> None:
    l3 = ip4() if version == 4 else ip6()
    orig = parse(bytes(l3 / TCP(sport=1111, dport=2222, flags="S", seq=10)))
    out = build_tcp_ack(orig, 0xFFFFFFF0, 11, ttl=128)
    assert recomputed(out) == out
    s = IP(out) if version == 4 else IPv6(out)
    t = s[TCP]
    assert (t.sport, t.dport, t.seq, t.ack, str(t.flags)) == (2222, 1111, 0xFFFFFFF0, 11, "A")
    assert (s.ttl if version == 4 else s.hlim) == 128
    ours = parse(out)
    assert (ours.sport, ours.dport, ours.tcp_flags, ours.p_len) == (2222, 1111, 0x10, 0)


def test_build_icmp_unreach_v4() -> None:
    orig_bytes = bytes(
        ip4(options=[IPOption_NOP()] * 4) / UDP(sport=5000, dport=53) / Raw(b"q" * 50)
    )
    out = build_icmp_unreach(parse(orig_bytes))
    assert recomputed(out) == out
    s = IP(out)
    assert (s.src, s.dst, s[ICMP].type, s[ICMP].code) == (B4, A4, 3, 3)
    assert bytes(s[ICMP].payload) == orig_bytes[: 24 + 8]
    p = parse(out)
    assert p.inner is not None and (p.inner.sport, p.inner.dport) == (5000, 53)


def test_build_icmp_unreach_v4_short_packet() -> None:
    orig_bytes = bytes(ip4(proto=17) / UDP(sport=1, dport=2))
    out = build_icmp_unreach(parse(orig_bytes))
    assert bytes(IP(out)[ICMP].payload) == orig_bytes


@pytest.mark.parametrize("payload", [10, 1300, 3000])
def test_build_icmp_unreach_v6(payload: int) -> None:
    orig_bytes = bytes(
        ip6() / IPv6ExtHdrDestOpt() / UDP(sport=5000, dport=53) / Raw(b"q" * payload)
    )
    out = build_icmp_unreach(parse(orig_bytes))
    assert recomputed(out) == out
    s = IPv6(out)
    assert (s.src, s.dst, s.nh, s.hlim) == (B6, A6, 58, 64)
    assert s[ICMPv6DestUnreach].code == 4
    assert len(out) == min(1280, 48 + len(orig_bytes))
    assert out[48:] == orig_bytes[: len(out) - 48]
    p = parse(out)
    assert p.inner is not None and (p.inner.sport, p.inner.dport) == (5000, 53)
    assert p.inner.truncated == (len(orig_bytes) > 1232)


def test_bench_parse_runs() -> None:
    from pfcluster.bench.parse import bench_parse

    figures = bench_parse(n=50, repeat=1)
    assert {"tcp_ack_v4", "tcp_syn_opts_v4", "tcp_ack_v6", "icmp_unreach_v4"} <= set(figures)
    assert all(f["parse_per_s"] > 0 and f["parse_into_per_s"] > 0 for f in figures.values())
