"""Fuzzing the parser: whatever the bytes, parse() returns a consistent Packet or raises
MalformedPacket, and nothing else.

Inputs are random bytes and mutations (bit flips, byte stores, truncations, splices,
insertions) of valid scapy-built packets. PFCLUSTER_FUZZ_EXAMPLES sets the count per test
(100k by default, as in conftest.py) and counts *inputs*: each hypothesis example checks
INPUTS_PER_EXAMPLE inputs derived from what it drew, because hypothesis's own cost per
example (~0.4 ms here) would otherwise dominate (parse + checks take ~15 us) and push a
100k run well past a minute.
"""

from __future__ import annotations

import socket

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, fragment
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Raw

from conftest import batched_fuzz_settings
from pfcluster.packet import (
    MalformedPacket,
    Packet,
    build_icmp_unreach,
    build_tcp_ack,
    build_tcp_rst,
    parse,
    parse_into,
)

INPUTS_PER_EXAMPLE = 4
FUZZ = batched_fuzz_settings(INPUTS_PER_EXAMPLE)

A4, B4 = "198.51.100.10", "203.0.113.20"
A6, B6 = "2001:db8:1::10", "2001:db8:2::20"


def _seeds() -> list[bytes]:
    syn_opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (7, 0)), ("NOP", None),
                ("WScale", 7)]
    tcp4 = IP(src=A4, dst=B4) / TCP(sport=40000, dport=443, flags="S", options=syn_opts)
    udp4 = IP(src=A4, dst=B4) / UDP(sport=5353, dport=53) / Raw(b"q" * 12)
    tcp6 = IPv6(src=A6, dst=B6) / TCP(flags="PA", options=[("NOP", None), ("NOP", None),
                                                          ("Timestamp", (1, 2))]) / Raw(b"d" * 8)
    seeds = [
        bytes(tcp4),
        bytes(IP(src=A4, dst=B4) / TCP(flags="A")),
        bytes(IP(src=A4, dst=B4, options=[IPOption_NOP()] * 4) / TCP(flags="FA") / Raw(b"x")),
        bytes(udp4),
        bytes(tcp6),
        bytes(IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2)),
        bytes(IP(src=A4, dst=B4) / ICMP(type=8, id=9) / Raw(b"ping")),
        bytes(IP(src="192.0.2.1", dst=A4) / ICMP(type=3, code=3) / bytes(udp4)[:28]),
        bytes(IP(src="192.0.2.1", dst=A4) / ICMP(type=11) / bytes(tcp4)),
        bytes(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(id=4, data=b"abc")),
        bytes(IPv6(src=B6, dst=A6) / ICMPv6DestUnreach(code=4) / bytes(tcp6)),
        bytes(IPv6(src=B6, dst=A6) / ICMPv6PacketTooBig() / bytes(tcp6)[:50]),
        bytes(
            IPv6(src=A6, dst=B6)
            / IPv6ExtHdrHopByHop()
            / IPv6ExtHdrRouting(addresses=["2001:db8::1"])
            / IPv6ExtHdrDestOpt()
            / IPv6ExtHdrFragment(m=1, id=5)
            / TCP(flags="S", options=syn_opts)
        ),
        bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(offset=9, id=5, nh=17) / Raw(b"f" * 16)),
    ]
    seeds += [bytes(f) for f in fragment(IP(src=A4, dst=B4) / udp4[UDP] / Raw(b"z" * 40), 24)]
    return seeds


SEEDS = _seeds()
_SCRATCH = Packet()


def check_invariants(data: bytes, p: Packet) -> None:
    """What any successfully parsed packet must satisfy."""
    assert p.af in (socket.AF_INET, socket.AF_INET6)
    assert len(p.src) == len(p.dst) == (4 if p.af == socket.AF_INET else 16)
    assert len(p.raw) == p.ip_len <= len(data)
    assert 20 <= p.ip_hl <= p.ip_len
    assert p.l4_off in (p.ip_hl, p.ip_len)
    assert p.l4_len == p.ip_len - p.l4_off >= 0
    assert 0 <= p.sport <= 0xFFFF and 0 <= p.dport <= 0xFFFF
    assert p.fragment == (p.more_frags or p.frag_off > 0)
    assert not p.truncated
    if p.proto == 6 and p.th_off:
        assert 20 <= p.th_off <= p.l4_len and p.p_len == p.l4_len - p.th_off
    if p.inner is not None:
        assert p.inner.inner is None and p.inner.af == p.af
        assert len(p.inner.raw) <= p.ip_len - p.l4_off - 8
    assert repr(p).startswith("<Packet ")


def comparable(p: Packet | None) -> dict | None:
    """Fields with raw as bytes and inner expanded, so two parses can be compared."""
    if p is None:
        return None
    f = p.fields()
    f["raw"] = bytes(f["raw"])
    f["inner"] = comparable(f["inner"])
    return f


def check_one(data: bytes) -> None:
    """Parse, check, and check that refilling and the reply builders agree."""
    before = _SCRATCH.fields()
    try:
        p = parse(data)
    except MalformedPacket:
        try:
            parse_into(_SCRATCH, data)
        except MalformedPacket:
            assert _SCRATCH.fields() == before  # a failed refill leaves the packet alone
            return
        raise AssertionError("parse_into accepted what parse rejected") from None
    check_invariants(data, p)
    parse_into(_SCRATCH, data)
    assert comparable(_SCRATCH) == comparable(p)
    reply = parse(build_icmp_unreach(p))
    assert reply.inner is not None
    if p.proto == 6 and p.th_off:
        rst = parse(build_tcp_rst(p))
        assert (rst.sport, rst.dport, rst.tcp_flags) == (p.dport, p.sport, 0x14)
        parse(build_tcp_ack(p, p.ack, p.seq))


def check_all(inputs: list[bytes]) -> None:
    for data in inputs:
        try:
            check_one(data)
        except Exception as exc:
            raise AssertionError(f"failing input: {data.hex()}") from exc


# The blob as drawn, then led by first bytes that send it down the IPv4 (IHL 5 and 15) and
# IPv6 paths: most random first bytes are just a bad version.
_LEADS = (b"", b"\x45", b"\x4f", b"\x60")


@FUZZ
@given(st.binary(max_size=120))
def test_random_bytes(blob: bytes) -> None:
    check_all([lead + blob for lead in _LEADS])


def mutate(seed: bytes, tape: bytes) -> bytes:
    """Apply the mutations a byte tape spells out: op, position, argument, ...

    A flat tape is far cheaper for hypothesis to generate than a list of tuples (its
    per-example cost dominates at 100k examples) and still shrinks towards fewer edits.
    """
    data = bytearray(seed)
    i = 0
    while i + 3 <= len(tape) and data:
        op, pos, arg = tape[i] % 6, tape[i + 1] % len(data), tape[i + 2]
        i += 3
        if op == 0:  # bit flip
            data[pos] ^= 1 << (arg & 7)
        elif op == 1:  # store a byte
            data[pos] = arg
        elif op == 2:  # truncate
            del data[pos:]
        elif op == 3:  # overwrite with the next tape bytes
            chunk = tape[i : i + (arg & 15)]
            i += len(chunk)
            data[pos : pos + len(chunk)] = chunk
        elif op == 4:  # insert the next tape bytes
            chunk = tape[i : i + 1 + (arg & 15)]
            i += len(chunk)
            data[pos:pos] = chunk
        else:  # graft the tail of another seed here
            other = SEEDS[arg % len(SEEDS)]
            data[pos:] = other[pos % len(other) :]
    return bytes(data)


@FUZZ
@given(st.integers(0, len(SEEDS) - 1), st.binary(min_size=3, max_size=30))
def test_mutated_packets(first: int, tape: bytes) -> None:
    # the same edits applied to seeds spread over the corpus (5 is coprime with its size)
    picks = [SEEDS[(first + 5 * k) % len(SEEDS)] for k in range(INPUTS_PER_EXAMPLE)]
    check_all([mutate(seed, tape) for seed in picks])


def test_seeds_are_valid() -> None:
    from math import gcd

    assert gcd(5, len(SEEDS)) == 1 and len(_LEADS) == INPUTS_PER_EXAMPLE
    for seed in SEEDS:
        check_one(seed)
        parse(seed)
