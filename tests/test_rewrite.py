"""pf/rewrite.py: NAT rewriting in place with incremental checksums.

scapy is the independent oracle: a packet built by scapy with the old values and
rewritten by us must equal, byte for byte, the packet scapy builds with the new values
(checksums recomputed by scapy). Hypothesis adds random packets (every checksum verified
by a full recomputation afterwards) and mangled bytes (only RewriteError comes out)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.all import (
    ICMP,
    IP,
    TCP,
    UDP,
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6TimeExceeded,
    IPOption,
    IPv6,
    IPv6ExtHdrHopByHop,
    Raw,
    raw,
)

from conftest import FUZZ_EXAMPLES, fuzz_settings
from pfcluster.packet import MalformedPacket, Packet, internet_checksum, parse, parse_into
from pfcluster.pf.rewrite import RewriteError, rewrite, rewrite_icmp_error


def a4(s: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, s)


def a6(s: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, s)


def addr(b: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(b) == 4 else socket.AF_INET6, b)


# client 10.0.0.5:4321 behind the firewall, translated to 192.0.2.1:50001; server
# 198.51.100.7 (and the IPv6 equivalents in 2001:db8::/32)
C4, N4, S4, R4 = "10.0.0.5", "192.0.2.1", "198.51.100.7", "203.0.113.9"
C6, N6, S6, R6 = "2001:db8:1::5", "2001:db8:2::1", "2001:db8:3::7", "2001:db8:4::9"


def l4_tcp(sport: int, dport: int) -> Any:
    return TCP(sport=sport, dport=dport, flags="PA", seq=1000, ack=2000,
               options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]) / b"payload!"


def l4_udp(sport: int, dport: int) -> Any:
    return UDP(sport=sport, dport=dport) / b"some udp data"


def ip4(src: str, dst: str, **kw: Any) -> Any:
    return IP(src=src, dst=dst, id=7, ttl=63, **kw)


def ip6(src: str, dst: str) -> Any:
    return IPv6(src=src, dst=dst, hlim=63)


# (name, builder(src, sport, dst, dport) -> scapy packet, address maker, addresses)
Builder = Callable[[str, int, str, int], Any]
CASES: list[tuple[str, Builder, bool]] = [
    ("tcp4", lambda s, sp, d, dp: ip4(s, d) / l4_tcp(sp, dp), True),
    ("udp4", lambda s, sp, d, dp: ip4(s, d) / l4_udp(sp, dp), True),
    ("udp4-no-checksum", lambda s, sp, d, dp: ip4(s, d) / UDP(sport=sp, dport=dp, chksum=0)
     / (b"x" * 11), True),
    ("tcp4-ip-options", lambda s, sp, d, dp: ip4(s, d, options=IPOption(b"\x94\x04\x00\x00"))
     / l4_tcp(sp, dp), True),
    ("udp4-ip-options", lambda s, sp, d, dp: ip4(s, d, options=IPOption(b"\x94\x04\x00\x00"))
     / l4_udp(sp, dp), True),
    ("icmp4-echo", lambda s, sp, d, dp: ip4(s, d) / ICMP(type=8, id=sp, seq=3) / b"ping", True),
    ("icmp4-echo-reply", lambda s, sp, d, dp: ip4(s, d) / ICMP(type=0, id=sp, seq=3) / b"pong",
     True),
    ("tcp6", lambda s, sp, d, dp: ip6(s, d) / l4_tcp(sp, dp), False),
    ("udp6", lambda s, sp, d, dp: ip6(s, d) / l4_udp(sp, dp), False),
    ("udp6-hop-by-hop", lambda s, sp, d, dp: ip6(s, d) / IPv6ExtHdrHopByHop() / l4_udp(sp, dp),
     False),
    ("icmp6-echo", lambda s, sp, d, dp: ip6(s, d) / ICMPv6EchoRequest(id=sp, seq=3, data=b"ping"),
     False),
    ("icmp6-echo-reply", lambda s, sp, d, dp: ip6(s, d) / ICMPv6EchoReply(id=sp, seq=3,
                                                                          data=b"pong"), False),
]


def _ports(name: str, sp: int, dp: int) -> tuple[int, int]:
    """An echo has one id: both 'ports' are it."""
    return (sp, sp) if "icmp" in name else (sp, dp)


@pytest.mark.parametrize("name,build,v4", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("what", ["nat", "rdr", "both", "none"])
def test_rewrite_equals_scapy_built_packet(name: str, build: Builder, v4: bool,
                                           what: str) -> None:
    c, n, s, r = (C4, N4, S4, R4) if v4 else (C6, N6, S6, R6)
    mk = a4 if v4 else a6
    old = build(c, 4321, s, 53)
    buf = bytearray(raw(old))
    pkt = parse(buf)
    src = mk(n) if what in ("nat", "both") else None
    sport = 50001 if what in ("nat", "both") else None
    dst = mk(r) if what in ("rdr", "both") else None
    dport = 8053 if what in ("rdr", "both") and "icmp" not in name else None
    rewrite(buf, pkt, src, sport, dst, dport)
    want = build(n if src else c, sport or 4321, r if dst else s, dport or 53)
    assert bytes(buf) == raw(want)
    if "no-checksum" in name:
        assert buf[pkt.l4_off + 6:pkt.l4_off + 8] == b"\0\0"
    # the descriptor now tells what a new parse of the bytes tells
    again = parse(buf)
    for f in ("src", "dst", "sport", "dport", "icmp_id"):
        assert getattr(pkt, f) == getattr(again, f), f
    exp_sp, exp_dp = _ports(name, sport or 4321, dport or 53)
    assert (addr(pkt.src), pkt.sport) == (n if src else c, exp_sp)
    if "icmp" not in name:
        assert (addr(pkt.dst), pkt.dport) == (r if dst else s, exp_dp)


@pytest.mark.parametrize("v4", [True, False])
def test_udp_checksum_that_computes_to_zero_is_sent_as_ffff(v4: bool) -> None:
    c, n, s = (C4, N4, S4) if v4 else (C6, N6, S6)
    mk, ip = (a4, ip4) if v4 else (a6, ip6)

    def build(src: str, sport: int, word: int) -> Any:
        return ip(src, s) / UDP(sport=sport, dport=53) / (struct.pack("!H", word) + b"data")

    # choose the payload word that makes the translated datagram's sum 0xffff (checksum 0)
    c0 = struct.unpack_from("!H", raw(build(n, 50001, 0)), 26 if v4 else 46)[0]
    want = raw(build(n, 50001, c0))
    assert struct.unpack_from("!H", want, 26 if v4 else 46)[0] == 0xFFFF  # scapy's rule too
    buf = bytearray(raw(build(c, 4321, c0)))
    rewrite(buf, parse(buf), mk(n), 50001, None, None)
    assert bytes(buf) == want


# --- ICMP errors quoting a translated packet --------------------------------------------


def _quoted(pkt: Any, length: int) -> bytes:
    return raw(pkt)[:length]


ERROR_CASES = [
    # name, v4, quoted packet builder (src, sport, dst, dport), bytes quoted (None: all)
    ("udp4-all", True, lambda s, sp, d, dp: ip4(s, d) / l4_udp(sp, dp), None),
    ("udp4-8", True, lambda s, sp, d, dp: ip4(s, d) / l4_udp(sp, dp), 28),
    ("udp4-no-checksum", True,
     lambda s, sp, d, dp: ip4(s, d) / UDP(sport=sp, dport=dp, chksum=0) / b"abc", None),
    ("tcp4-8", True, lambda s, sp, d, dp: ip4(s, d) / l4_tcp(sp, dp), 28),
    ("tcp4-all", True, lambda s, sp, d, dp: ip4(s, d) / l4_tcp(sp, dp), None),
    ("tcp4-16", True, lambda s, sp, d, dp: ip4(s, d) / l4_tcp(sp, dp), 36),
    ("tcp4-18", True, lambda s, sp, d, dp: ip4(s, d) / l4_tcp(sp, dp), 38),
    ("tcp4-options", True, lambda s, sp, d, dp: ip4(s, d, options=IPOption(b"\x94\x04\0\0"))
     / l4_tcp(sp, dp), None),
    ("echo4", True, lambda s, sp, d, dp: ip4(s, d) / ICMP(type=8, id=sp) / b"ping", None),
    ("udp6", False, lambda s, sp, d, dp: ip6(s, d) / l4_udp(sp, dp), None),
    ("tcp6", False, lambda s, sp, d, dp: ip6(s, d) / l4_tcp(sp, dp), None),
    ("tcp6-8", False, lambda s, sp, d, dp: ip6(s, d) / l4_tcp(sp, dp), 48),
    ("echo6", False, lambda s, sp, d, dp: ip6(s, d) / ICMPv6EchoRequest(id=sp, data=b"p"),
     None),
]


def _error(v4: bool, echo: bool, outer_src: str, outer_dst: str, quote: bytes) -> Any:
    if v4:
        icmp = ICMP(type=11, code=0) if echo else ICMP(type=3, code=3)
        return ip4(outer_src, outer_dst) / icmp / Raw(quote)
    icmp6 = ICMPv6TimeExceeded() if echo else ICMPv6DestUnreach(code=4)
    return ip6(outer_src, outer_dst) / icmp6 / Raw(quote)


@pytest.mark.parametrize("name,v4,build,qlen", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_icmp_error_equals_scapy_built_packet(name: str, v4: bool, build: Builder,
                                              qlen: int | None) -> None:
    """The server (or router r) answers the translated packet n:50001 -> s:53 with an
    error; back through the firewall it must quote c:4321 -> s:53 and go to c."""
    c, n, s, r = (C4, N4, S4, R4) if v4 else (C6, N6, S6, R6)
    mk = a4 if v4 else a6
    echo = "echo" in name
    translated = build(n, 50001, s, 53)
    qlen = qlen or len(raw(translated))
    buf = bytearray(raw(_error(v4, echo, r, n, _quoted(translated, qlen))))
    pkt = parse(buf)
    assert pkt.inner is not None
    rewrite_icmp_error(buf, pkt, None, mk(c), mk(c), 4321, None, None)
    want = _error(v4, echo, r, c, _quoted(build(c, 4321, s, 53), qlen))
    assert bytes(buf) == raw(want)
    assert addr(pkt.dst) == c and addr(pkt.inner.src) == c and pkt.inner.sport == 4321
    again = parse(buf)
    assert again.inner is not None
    for f in ("src", "dst", "sport", "dport", "icmp_id"):
        assert getattr(pkt.inner, f) == getattr(again.inner, f), f
    assert internet_checksum(buf[pkt.l4_off:] if v4 else _pseudo6(buf, pkt)) == 0


def test_half_quoted_tcp_checksum_is_left_alone() -> None:
    """17 bytes of TCP quoted: one byte of its checksum, which cannot be updated alone
    (the carry depends on the missing byte); the outer checksum still comes out valid."""
    translated = raw(ip4(N4, S4) / l4_tcp(50001, 53))[:37]
    buf = bytearray(raw(_error(True, False, R4, N4, translated)))
    pkt = parse(buf)
    half = buf[-1]
    rewrite_icmp_error(buf, pkt, None, a4(C4), a4(C4), 4321, None, None)
    assert buf[-1] == half and pkt.inner is not None and pkt.inner.sport == 4321
    assert internet_checksum(buf[pkt.l4_off:]) == 0


def _pseudo6(buf: bytearray, pkt: Packet) -> bytes:
    seg = bytes(buf[pkt.l4_off:pkt.ip_len])
    return bytes(buf[8:40]) + struct.pack("!I3xB", len(seg), pkt.proto) + seg


# --- refusals -------------------------------------------------------------------------


def _udp4() -> bytearray:
    return bytearray(raw(ip4(C4, S4) / l4_udp(4321, 53)))


def test_refusals_leave_buffer_and_descriptor_unchanged() -> None:
    buf = _udp4()
    before = bytes(buf)
    pkt = parse(buf)
    fields = pkt.fields().copy()
    for args in [(a6(N6), None, None, None),           # address of the other family
                 (a4(N4), 70000, None, None),          # port out of range
                 (None, None, b"\1\2\3", None)]:
        with pytest.raises(RewriteError):
            rewrite(buf, pkt, *args)
        assert bytes(buf) == before
        assert {k: v for k, v in pkt.fields().items() if k != "raw"} == \
            {k: v for k, v in fields.items() if k != "raw"}
    with pytest.raises(RewriteError, match="ICMP error"):
        rewrite_icmp_error(buf, pkt, None, a4(C4), a4(C4), 1, None, None)
    with pytest.raises(RewriteError, match="whole"):
        rewrite(buf[:-1], pkt, a4(N4), None, None, None)
    assert bytes(buf) == before


def test_cut_capture_is_refused() -> None:
    full = _udp4()
    pkt = parse_into(Packet(), full[:40], wire_len=len(full))
    assert pkt.truncated
    with pytest.raises(RewriteError, match="whole"):
        rewrite(bytearray(full[:40]), pkt, a4(N4), 50001, None, None)


def test_non_first_fragment_takes_addresses_but_not_ports() -> None:
    frags = (ip4(C4, S4) / UDP(sport=4321, dport=53) / (b"z" * 64)).fragment(32)
    assert len(frags) >= 2
    buf = bytearray(raw(frags[1]))
    pkt = parse(buf)
    assert pkt.fragment and pkt.l4_off == pkt.ip_len
    with pytest.raises(RewriteError, match="port"):
        rewrite(buf, pkt, a4(N4), 50001, None, None)
    rewrite(buf, pkt, a4(N4), None, None, None)
    want = frags[1].copy()
    want.src = N4
    del want.chksum
    assert bytes(buf) == raw(want)


def test_other_protocol_takes_addresses_only() -> None:
    gre = ip4(C4, S4, proto=47) / Raw(b"\0\0\x08\0" + b"g" * 20)
    buf = bytearray(raw(gre))
    pkt = parse(buf)
    rewrite(buf, pkt, a4(N4), None, None, None)
    assert bytes(buf) == raw(ip4(N4, S4, proto=47) / Raw(b"\0\0\x08\0" + b"g" * 20))
    with pytest.raises(RewriteError, match="protocol 47"):
        rewrite(buf, pkt, None, 1, None, None)


def test_echo_with_two_different_ids_is_refused() -> None:
    buf = bytearray(raw(ip4(C4, S4) / ICMP(type=8, id=5)))
    with pytest.raises(RewriteError, match="two ids"):
        rewrite(buf, parse(buf), None, 6, None, 7)


# --- hypothesis: random packets keep valid checksums ----------------------------------


def _csum_ok(buf: bytes) -> bool:
    """Every checksum of an unfragmented IPv4/IPv6 TCP/UDP/ICMP packet, recomputed."""
    pkt = parse(buf)
    v4 = pkt.af == socket.AF_INET
    if v4 and internet_checksum(buf[:pkt.ip_hl]) != 0:
        return False
    seg = bytes(buf[pkt.l4_off:pkt.ip_len])
    if pkt.proto == 1:
        return internet_checksum(seg) == 0
    if pkt.proto == 17 and seg[6:8] == b"\0\0":
        return v4
    if v4:
        pseudo = bytes(buf[12:20]) + struct.pack("!xBH", pkt.proto, len(seg))
    else:
        pseudo = bytes(buf[8:40]) + struct.pack("!I3xB", len(seg), pkt.proto)
    return internet_checksum(pseudo + seg) == 0


def _build(v4: bool, proto: int, src: bytes, dst: bytes, sport: int, dport: int,
           payload: bytes, zero_udp: bool = False) -> bytearray:
    """A packet with correct checksums, built here (no scapy: hypothesis runs many)."""
    if proto == 6:
        seg = bytearray(struct.pack("!HHIIBBHHH", sport, dport, 1, 2, 0x50, 0x18, 512, 0, 0)
                        + payload)
        ck_off = 16
    elif proto == 17:
        seg = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
        ck_off = 6
    else:
        proto = 1 if v4 else 58
        seg = bytearray(struct.pack("!BBHHH", 8 if v4 else 128, 0, 0, sport, 9) + payload)
        ck_off = 2
    if v4:
        hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), 1, 0, 64, proto,
                                    0, src, dst))
        hdr[10:12] = internet_checksum(hdr).to_bytes(2, "big")
        pseudo = src + dst + struct.pack("!xBH", proto, len(seg))
    else:
        hdr = bytearray(struct.pack("!IHBB16s16s", 6 << 28, len(seg), proto, 64, src, dst))
        pseudo = src + dst + struct.pack("!I3xB", len(seg), proto)
    if not (proto == 17 and zero_udp):
        ck = internet_checksum(bytes(seg) if proto == 1 else pseudo + bytes(seg))
        if proto == 17 and ck == 0:
            ck = 0xFFFF
        seg[ck_off:ck_off + 2] = ck.to_bytes(2, "big")
    return hdr + seg


@st.composite
def packets(draw: st.DrawFn) -> tuple[bytearray, bytes, int, bytes, int]:
    v4 = draw(st.booleans())
    alen = 4 if v4 else 16
    addrs = st.binary(min_size=alen, max_size=alen)
    ports = st.integers(0, 0xFFFF)
    proto = draw(st.sampled_from([6, 17, 1]))
    buf = _build(v4, proto, draw(addrs), draw(addrs), draw(ports), draw(ports),
                 draw(st.binary(max_size=40)), zero_udp=v4 and draw(st.booleans()))
    return buf, draw(addrs), draw(ports), draw(addrs), draw(ports)


@fuzz_settings(max(1, FUZZ_EXAMPLES // 20))
@given(packets(), st.sampled_from(["src", "dst", "both"]))
def test_fuzz_random_translations_keep_valid_checksums(
        case: tuple[bytearray, bytes, int, bytes, int], which: str) -> None:
    buf, src, sport, dst, dport = case
    assert _csum_ok(buf)
    pkt = parse(buf)
    icmp = pkt.proto in (1, 58)
    zero_udp = pkt.proto == 17 and buf[pkt.l4_off + 6:pkt.l4_off + 8] == b"\0\0"
    new_src, new_sport = (src, sport) if which != "dst" else (None, None)
    new_dst, new_dport = (dst, dport) if which != "src" else (None, None)
    if icmp:
        new_dport = None
    rewrite(buf, pkt, new_src, new_sport, new_dst, new_dport)
    assert _csum_ok(buf)
    again = parse(buf)
    for f in ("src", "dst", "sport", "dport", "icmp_id"):
        assert getattr(pkt, f) == getattr(again, f), f
    if zero_udp:
        assert buf[pkt.l4_off + 6:pkt.l4_off + 8] == b"\0\0"


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """A valid packet (plain or an ICMP error quoting one) with some bytes overwritten
    and perhaps cut: mostly still parseable, so rewrite sees odd but parsed packets."""
    v4 = draw(st.booleans())
    alen = 4 if v4 else 16
    inner = _build(v4, draw(st.sampled_from([6, 17, 1])), b"\1" * alen, b"\2" * alen,
                   1, 2, draw(st.binary(max_size=24)))
    if draw(st.booleans()):
        quote = bytes(inner[:draw(st.integers(0, len(inner)))])
        seg = struct.pack("!BBHI", 3 if v4 else 1, 3, 0, 0) + quote
        if v4:
            hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), 1, 0, 64, 1, 0,
                              b"\3" * 4, b"\1" * 4)
        else:
            hdr = struct.pack("!IHBB16s16s", 6 << 28, len(seg), 58, 64, b"\3" * 16,
                              b"\1" * 16)
        data = bytearray(hdr + seg)
    else:
        data = inner
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)


# each example parses and makes three calls; a tenth of the decoder count keeps the
# suite's time (100k examples took 12 minutes on the shared 2-core machine)
@fuzz_settings(max(1, FUZZ_EXAMPLES // 10))
@given(mangled(), st.binary(min_size=4, max_size=4) | st.binary(min_size=16, max_size=16)
       | st.none(), st.integers(0, 0xFFFF) | st.none(), st.integers(-1, 0x10000) | st.none(),
       st.integers(0, 8))
def test_fuzz_rewrite_raises_only_rewrite_error(data: bytes, address: bytes | None,
                                                port: int | None, odd_port: int | None,
                                                cut: int) -> None:
    try:
        pkt = parse(data)
    except MalformedPacket:
        return
    for call in range(3):
        buf = bytearray(data)
        if call == 2:
            buf = buf[:len(buf) - cut]  # a buffer shorter than the parsed packet
        before = bytes(buf)
        try:
            if call == 1:
                rewrite_icmp_error(buf, parse(data), address, address, address, port,
                                   None, odd_port)
            else:
                rewrite(buf, parse(data), address, port, address, odd_port)
        except RewriteError:
            assert bytes(buf) == before  # refused: nothing written
    del pkt
