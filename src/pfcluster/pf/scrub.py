"""pf's scrub options (`match ... scrub (opts)`, old `scrub` rules) and pf_scrub's rewrite.

pf accumulates the scrub options of every matching match rule and of the deciding rule
(pf_rule_to_actions: flags OR together, a later rule's min-ttl/max-mss/set-tos replaces
an earlier one) and stores them on the state, so every later packet of the connection,
both directions, is scrubbed the same way. The rewrite is in place with incremental
checksums, as pf/rewrite.py does for NAT: the IPv4 header checksum for tos, id, df and
ttl; the TCP checksum for the MSS option of a SYN (max-mss clamps only a larger MSS).

`reassemble tcp` is parsed, stored and printed but does nothing here (pf's TCP
normalization: timestamp modulation, no TTL decrease within a connection). IP fragments
are reassembled by `set reassemble` (pf/frag.py), not by scrub.
"""

from __future__ import annotations

import os
import struct

from pfcluster.packet import Packet
from pfcluster.pf.rewrite import RewriteError

__all__ = ["PFSTATE_NODF", "PFSTATE_RANDOMID", "PFSTATE_SCRUB_TCP", "PFSTATE_SETTOS",
           "Scrub", "scrub_packet"]

# OpenBSD pfvar.h state_flags bits for the scrub options
PFSTATE_NODF = 0x0020
PFSTATE_SETTOS = 0x0040
PFSTATE_RANDOMID = 0x0080
PFSTATE_SCRUB_TCP = 0x0100

_U16 = struct.Struct("!H")
_get16 = _U16.unpack_from
_put16 = _U16.pack_into
_IP_DF = 0x4000
_TH_SYN = 0x02
_TCPOPT_EOL = 0
_TCPOPT_NOP = 1
_TCPOPT_MSS = 2


def _fix(ck: int, delta: int) -> int:
    """RFC 1624 eqn. 3 with the sum kept in 1..0xffff (as pf/rewrite.py)."""
    return 0xFFFE - (0xFFFE - ck + delta) % 0xFFFF


class Scrub:
    """A rule's (or a state's accumulated) scrub options. `legacy`: written as an old
    `scrub` rule, printed back that way."""

    __slots__ = ("flags", "legacy", "max_mss", "min_ttl", "set_tos")

    def __init__(self, flags: int = 0, min_ttl: int = 0, max_mss: int = 0,
                 set_tos: int = 0, legacy: bool = False) -> None:
        self.flags = flags
        self.min_ttl = min_ttl
        self.max_mss = max_mss
        self.set_tos = set_tos
        self.legacy = legacy

    def merge(self, later: Scrub) -> Scrub:
        """pf_rule_to_actions: this accumulation followed by rule `later`'s options."""
        return Scrub(self.flags | later.flags, later.min_ttl or self.min_ttl,
                     later.max_mss or self.max_mss,
                     later.set_tos if later.flags & PFSTATE_SETTOS else self.set_tos)

    def options(self) -> list[str]:
        """The options in pfctl's print_rule order."""
        out = []
        if self.flags & PFSTATE_NODF:
            out.append("no-df")
        if self.flags & PFSTATE_RANDOMID:
            out.append("random-id")
        if self.min_ttl:
            out.append(f"min-ttl {self.min_ttl}")
        if self.flags & PFSTATE_SETTOS:
            out.append(f"set-tos 0x{self.set_tos:02x}")
        if self.flags & PFSTATE_SCRUB_TCP:
            out.append("reassemble tcp")
        if self.max_mss:
            out.append(f"max-mss {self.max_mss}")
        return out

    def __str__(self) -> str:
        return f"scrub ({' '.join(self.options())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scrub) and (self.flags, self.min_ttl, self.max_mss,
                                             self.set_tos) == (other.flags, other.min_ttl,
                                                               other.max_mss, other.set_tos)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Scrub {' '.join(self.options()) or 'none'}>"


def _random_id() -> int:
    return int.from_bytes(os.urandom(2), "big")


def scrub_packet(buf: bytearray | None, pkt: Packet, sc: Scrub,
                 random_id: object = _random_id) -> bytearray | None:
    """pf_scrub (and pf_normalize_mss for a TCP SYN) on the packet parsed as `pkt`:
    `buf` is the packet as already rewritten (None: `pkt.raw` unchanged so far). Returns
    the rewritten bytes, or `buf` when nothing changes. Raises RewriteError when a change
    is due but the packet is not all here (the verdict payload replaces the whole packet)."""
    raw = pkt.raw if buf is None else buf
    n = len(raw)
    if n < 20:
        return buf
    flags = sc.flags
    v4 = raw[0] >> 4 == 4
    # (offset, new 16-bit word) for the IP header; checksum follows on IPv4
    words: list[tuple[int, int]] = []
    if v4:
        w0 = (raw[0] << 8) | raw[1]
        tos = raw[1]
        if flags & PFSTATE_SETTOS and (sc.set_tos | (tos & 3)) != tos:
            words.append((0, (w0 & 0xFF00) | sc.set_tos | (tos & 3)))
        (off,) = _get16(raw, 6)
        if flags & PFSTATE_RANDOMID and not off & ~_IP_DF & 0xFFFF:
            words.append((4, random_id()))  # type: ignore[operator]
        if flags & PFSTATE_NODF and off & _IP_DF:
            words.append((6, off & ~_IP_DF))
        if sc.min_ttl and raw[8] < sc.min_ttl:
            words.append((8, (sc.min_ttl << 8) | raw[9]))
    else:
        if n < 40:
            return buf
        tc = ((raw[0] & 0x0F) << 4) | (raw[1] >> 4)
        if flags & PFSTATE_SETTOS and (sc.set_tos | (tc & 3)) != tc:
            ntc = sc.set_tos | (tc & 3)
            words.append((0, 0x6000 | (ntc << 4) | (raw[1] & 0x0F)))
        if sc.min_ttl and raw[7] < sc.min_ttl:
            words.append((6, (raw[6] << 8) | sc.min_ttl))
    mss_at = -1
    if sc.max_mss and pkt.proto == 6 and pkt.tcp_flags & _TH_SYN and not pkt.frag_off:
        mss_at = _mss_offset(raw, pkt)
        if mss_at >= 0 and _get16(raw, mss_at)[0] <= sc.max_mss:
            mss_at = -1
    if not words and mss_at < 0:
        return buf
    if pkt.truncated or pkt.ip_len > n:
        raise RewriteError(f"{n} bytes do not hold the whole {pkt.ip_len}-byte packet")
    if buf is None:
        buf = bytearray(raw)
    if words:
        delta = 0
        for at, new in words:
            delta += new - _get16(buf, at)[0]
            _put16(buf, at, new)
        if v4:
            _put16(buf, 10, _fix(_get16(buf, 10)[0], delta))
    if mss_at >= 0:
        (old,) = _get16(buf, mss_at)
        _put16(buf, mss_at, sc.max_mss)
        delta = sc.max_mss - old
        if (mss_at - pkt.l4_off) & 1:  # odd offset: the value's bytes sit in two words
            delta <<= 8
        ck = pkt.l4_off + 16
        _put16(buf, ck, _fix(_get16(buf, ck)[0], delta))
    pkt.raw = memoryview(buf)
    return buf


def _mss_offset(raw: bytearray | memoryview, pkt: Packet) -> int:
    """The offset of a SYN's MSS value in `raw`, -1 when it has none readable."""
    l4 = pkt.l4_off
    end = min(len(raw), pkt.ip_len)
    if l4 + 20 > end:
        return -1
    hl = (raw[l4 + 12] >> 4) * 4
    opt_end = min(l4 + hl, end)
    i = l4 + 20
    while i < opt_end:
        kind = raw[i]
        if kind == _TCPOPT_EOL:
            return -1
        if kind == _TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= opt_end:
            return -1
        olen = raw[i + 1]
        if olen < 2 or i + olen > opt_end:
            return -1
        if kind == _TCPOPT_MSS and olen == 4:
            return i + 2
        i += olen
    return -1
