"""One-pass parser of IPv4/IPv6 packets into a slotted descriptor.

CONTRACT (the pf engine codes against these names; the parser fills them):

Packet fields
  raw          memoryview of the whole IP packet (no copy)
  af           socket.AF_INET or socket.AF_INET6
  src, dst     addresses as bytes (4 or 16)
  proto        final upper-layer protocol number (after IPv6 extension headers)
  ip_len       total length in bytes from the IP header (IPv6: 40 + payload length)
  ttl          IPv4 TTL / IPv6 hop limit
  tos          IPv4 TOS / IPv6 traffic class
  ip_id        IPv4 id, or the IPv6 fragment header id (0 if none)
  frag_off     fragment offset in bytes (0 for unfragmented and first fragments)
  more_frags   MF set
  df           IPv4 DF bit (False for IPv6)
  fragment     True if the packet is any fragment (offset > 0 or MF)
  l4_off       offset of the upper-layer header in raw (== ip_len when there is none)
  l4_len       bytes from l4_off to the end of the IP payload (ip_len - l4_off)
  ip_opts      True if IPv4 options or IPv6 hop-by-hop/destination options are present
  sport,dport  TCP/UDP ports; for ICMP/ICMPv6 echo request/reply both are the echo id;
               0 otherwise
  tcp_flags, seq, ack, win, th_off (TCP header length in bytes), p_len (TCP/UDP payload bytes)
  mss, wscale  TCP option values, -1 when absent (wscale raw, not clamped)
  sack_ok      TCP SACK-permitted option present
  ts_val, ts_ecr  TCP timestamps, -1 when absent
  icmp_type, icmp_code, icmp_id  ICMP/ICMPv6 (icmp_id -1 when not an echo/query)
  inner        for ICMP/ICMPv6 errors: a Packet parsed from the quoted datagram (partial
               upper layer allowed: only the first 8 bytes of TCP/UDP need be present), else None
               (also None for an error whose quote cannot be read)

Additional fields (extensions to the contract)
  ip_hl        length of the IP header chain: IPv4 IHL*4; IPv6 40 + the extension headers
               walked (for a non-first IPv6 fragment: up to and including the fragment
               header). The fragment data / upper-layer header starts here, so it equals
               l4_off except when there is no upper-layer header (non-first fragments,
               IPv6 no-next-header), where l4_off == ip_len.
  truncated    for a quoted datagram (``inner``): True when fewer than ip_len bytes
               were quoted; raw then holds what was quoted and l4_len still counts from
               the claimed ip_len. For a packet given to parse(): always False; given to
               parse_into() with ``wire_len`` (a capture cut short, e.g. NFQUEUE's copy
               range): True when raw holds fewer than ip_len bytes (every header must
               still be there in full).

Defaults when a field does not apply: ports, seq, ack, win, th_off, p_len, tcp_flags,
icmp_type and icmp_code are 0; mss, wscale, ts_val, ts_ecr and icmp_id are -1; inner None.
"""

from __future__ import annotations

import socket
import struct
import sys
from typing import Any

from pfcluster.pf.constants import flags_str

__all__ = [
    "MalformedPacket",
    "Packet",
    "addr_str",
    "build_icmp_unreach",
    "build_tcp_ack",
    "build_tcp_rst",
    "host_port",
    "internet_checksum",
    "parse",
    "parse_into",
]

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

_TCP = 6
_UDP = 17
_ICMP = 1
_ICMP6 = 58

TH_FIN = 0x01
TH_SYN = 0x02
TH_RST = 0x04
TH_ACK = 0x10

# ICMP types whose id field identifies a query/reply pair (pf's ICMP "virtual ports").
_ICMP4_QUERY = frozenset((0, 8, 13, 14, 15, 16, 17, 18))
_ICMP4_ERROR = frozenset((3, 4, 5, 11, 12))
_ICMP6_QUERY = frozenset((128, 129))
_ICMP6_ERROR = frozenset((1, 2, 3, 4))

# IPv6 extension headers that are walked; everything else ends the chain.
_IP6_HBH = 0
_IP6_ROUTING = 43
_IP6_FRAGMENT = 44
_IP6_AH = 51
_IP6_NONXT = 59
_IP6_DSTOPTS = 60
_IP6_MAX_EXT = 16
_IP6_MIN_MTU = 1280

# Precompiled layouts, bound once: attribute lookups per packet are what costs in CPython.
_IP4 = struct.Struct("!BBHHHBBH4s4s").unpack_from
_IP6 = struct.Struct("!IHBB16s16s").unpack_from
_FRAG6 = struct.Struct("!BxHI").unpack_from
_TCPH = struct.Struct("!HHIIBBH").unpack_from
_TCP8 = struct.Struct("!HHI").unpack_from
_UDPH = struct.Struct("!HHH").unpack_from
_ICMPH = struct.Struct("!BBxxH").unpack_from
_U16 = struct.Struct("!H").unpack_from
_U32X2 = struct.Struct("!II").unpack_from
_U32X3 = struct.Struct("!III").unpack_from
# NOP NOP TIMESTAMP(len 10): the option block of almost every established-flow segment.
_NOP_NOP_TS = 0x0101080A

_IP4_HDR = struct.Struct("!BBHHHBBH4s4s")
_IP6_HDR = struct.Struct("!IHBB16s16s")
_TCP_HDR = struct.Struct("!HHIIBBHHH")
_ICMP_HDR = struct.Struct("!BBHI")
_PSEUDO6 = struct.Struct("!16s16sI3xB")
_PSEUDO4 = struct.Struct("!4s4sxBH")


class MalformedPacket(ValueError):
    """The bytes are not a parseable IPv4/IPv6 packet; the only error parse() raises."""


_FIELDS = (
    "raw", "af", "src", "dst", "proto", "ip_len", "ttl", "tos", "ip_id", "frag_off",
    "more_frags", "df", "fragment", "l4_off", "l4_len", "ip_opts", "ip_hl", "truncated",
    "sport", "dport", "tcp_flags", "seq", "ack", "win", "th_off", "p_len",
    "mss", "wscale", "sack_ok", "ts_val", "ts_ecr",
    "icmp_type", "icmp_code", "icmp_id", "inner",
)


class Packet:
    """Flat descriptor of one packet; see the module CONTRACT for every field's meaning.

    Slotted and refillable (parse_into) so the hot path allocates nothing per packet
    beyond the address bytes and the memoryview.
    """

    __slots__ = _FIELDS

    raw: memoryview
    af: int
    src: bytes
    dst: bytes
    proto: int
    ip_len: int
    ttl: int
    tos: int
    ip_id: int
    frag_off: int
    more_frags: bool
    df: bool
    fragment: bool
    l4_off: int
    l4_len: int
    ip_opts: bool
    ip_hl: int
    truncated: bool
    sport: int
    dport: int
    tcp_flags: int
    seq: int
    ack: int
    win: int
    th_off: int
    p_len: int
    mss: int
    wscale: int
    sack_ok: bool
    ts_val: int
    ts_ecr: int
    icmp_type: int
    icmp_code: int
    icmp_id: int
    inner: Packet | None

    def __init__(self) -> None:
        """An empty descriptor (0.0.0.0, proto 0) meant to be refilled by parse_into."""
        self.raw = memoryview(b"")
        self.af = AF_INET
        self.src = self.dst = b"\0\0\0\0"
        self.proto = self.ip_len = self.ttl = self.tos = self.ip_id = self.frag_off = 0
        self.more_frags = self.df = self.fragment = self.ip_opts = self.truncated = False
        self.l4_off = self.l4_len = self.ip_hl = 0
        self.sport = self.dport = self.tcp_flags = self.seq = self.ack = self.win = 0
        self.th_off = self.p_len = self.icmp_type = self.icmp_code = 0
        self.mss = self.wscale = self.ts_val = self.ts_ecr = self.icmp_id = -1
        self.sack_ok = False
        self.inner = None

    def __repr__(self) -> str:
        try:
            return f"<Packet {self._summary()}>"
        except Exception:  # a half-built object must still be printable in a debugger
            return "<Packet ?>"

    def _summary(self) -> str:
        src, dst = addr_str(self.af, self.src), addr_str(self.af, self.dst)
        if self.af == AF_INET6:
            src, dst = f"[{src}]", f"[{dst}]"
        proto = self.proto
        if proto in (_TCP, _UDP) and self.l4_off < self.ip_len:
            s = f"{'TCP' if proto == _TCP else 'UDP'} {src}:{self.sport} > {dst}:{self.dport}"
            if proto == _TCP:
                s += f" {flags_str(self.tcp_flags) or '.'} seq={self.seq}"
                if self.tcp_flags & TH_ACK:
                    s += f" ack={self.ack}"
                s += f" win={self.win}"
                opts = [
                    f"{name}={val}"
                    for name, val in (("mss", self.mss), ("ws", self.wscale),
                                      ("tsval", self.ts_val), ("tsecr", self.ts_ecr))
                    if val >= 0
                ]
                if self.sack_ok:
                    opts.append("sackOK")
                if opts:
                    s += " <" + ",".join(opts) + ">"
            s += f" len={self.p_len}"
        elif proto in (_ICMP, _ICMP6) and self.l4_off < self.ip_len:
            s = f"{'ICMP' if proto == _ICMP else 'ICMP6'} {src} > {dst} {self.icmp_type}/{self.icmp_code}"
            if self.icmp_id >= 0:
                s += f" id={self.icmp_id}"
        else:
            s = f"proto {proto} {src} > {dst}"
        s += f" ip_len={self.ip_len}"
        if self.fragment:
            s += f" frag={self.ip_id}:{self.frag_off}{'+' if self.more_frags else ''}"
        if self.truncated:
            s += " truncated"
        if self.inner is not None:
            s += f" [{self.inner._summary()}]"
        return s

    def fields(self) -> dict[str, Any]:
        """Every field by name (for tests, logs and JSON; not for the hot path)."""
        return {name: getattr(self, name) for name in _FIELDS}


def parse(data: bytes | bytearray | memoryview) -> Packet:
    """Parse one IP packet (starting at the IP header) into a new Packet."""
    pkt = Packet.__new__(Packet)
    _fill(pkt, _byte_view(data), False)
    return pkt


def parse_into(pkt: Packet, data: bytes | bytearray | memoryview, wire_len: int = 0) -> Packet:
    """Refill ``pkt`` from ``data`` and return it; on MalformedPacket ``pkt`` is untouched.

    ``pkt.raw`` keeps a view of ``data``: a bytearray cannot be resized while it is held.
    ``wire_len`` > len(data) says ``data`` is the start of a longer packet (a capture cut
    short): the IP length may then exceed the bytes present, up to ``wire_len``; the
    headers must still be present in full.
    """
    _fill(pkt, _byte_view(data), False, wire_len)
    return pkt


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    t = type(data)
    if t is bytes or t is bytearray:
        return memoryview(data)
    mv = memoryview(data)
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    elif mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")  # signed/char/multi-byte views would index as the wrong type
    return mv


def _fill(pkt: Packet, mv: memoryview, quoted: bool, wire_len: int = 0) -> None:
    """Parse ``mv`` and store every field of ``pkt`` at the end (all or nothing).

    ``quoted`` selects the tolerant rules for the datagram inside an ICMP error: ip_len may
    exceed the bytes present and the upper layer may be cut after 8 bytes.
    """
    n = len(mv)
    if n < 20:
        raise MalformedPacket(f"{n} bytes: shorter than an IP header")
    version = mv[0] >> 4
    truncated = False
    if version == 4:
        vhl, tos, ip_len, ip_id, off, ttl, proto, _, src, dst = _IP4(mv)
        hl = (vhl & 0x0F) << 2
        if hl < 20:
            raise MalformedPacket(f"IPv4 header length {hl} < 20")
        if ip_len < hl:
            raise MalformedPacket(f"IPv4 total length {ip_len} < header length {hl}")
        if ip_len > n:
            if not quoted and ip_len > wire_len:
                raise MalformedPacket(f"IPv4 total length {ip_len} > {n} bytes received")
            if hl > n:
                raise MalformedPacket("IPv4 header cut short")
            truncated = True
            end = n
        else:
            end = ip_len
        af = AF_INET
        frag_off = (off & 0x1FFF) << 3
        more_frags = (off & 0x2000) != 0
        df = (off & 0x4000) != 0
        ip_opts = hl > 20
        l4 = hl
    elif version == 6:
        if n < 40:
            raise MalformedPacket(f"{n} bytes: shorter than an IPv6 header")
        vtcfl, plen, proto, ttl, src, dst = _IP6(mv)
        tos = (vtcfl >> 20) & 0xFF
        ip_len = 40 + plen
        if ip_len > n:
            if not quoted and ip_len > wire_len:
                raise MalformedPacket(f"IPv6 length {ip_len} > {n} bytes received")
            truncated = True
            end = n
        else:
            end = ip_len
        af = AF_INET6
        ip_id = frag_off = 0
        more_frags = df = ip_opts = False
        l4 = 40
        if proto in _IP6_WALKED:
            proto, l4, ip_id, frag_off, more_frags, ip_opts = _walk6(mv, proto, end)
    else:
        raise MalformedPacket(f"IP version {version}")

    fragment = more_frags or frag_off != 0
    sport = dport = tcp_flags = seq = ack = win = th_off = p_len = icmp_type = icmp_code = 0
    mss = wscale = ts_val = ts_ecr = icmp_id = -1
    sack_ok = False
    inner = None
    ip_hl = l4
    avail = end - l4  # upper-layer bytes actually present

    if frag_off or (proto == _IP6_NONXT and af == AF_INET6):
        l4 = ip_len  # no upper-layer header in this packet
    elif proto == _TCP:
        if avail >= 20:
            sport, dport, seq, ack, x2, tcp_flags, win = _TCPH(mv, l4)
            th_off = (x2 >> 4) << 2
            if th_off < 20:
                if not quoted:
                    raise MalformedPacket(f"TCP header length {th_off} < 20")
                th_off = 0
            elif th_off > avail:
                if not quoted:
                    raise MalformedPacket(f"TCP header length {th_off} > {avail} bytes")
                # quoted header cut inside the options: keep the fixed part only
                p_len = ip_len - l4 - th_off
                if p_len < 0:
                    p_len = 0
            else:
                p_len = ip_len - l4 - th_off
                if th_off == 32:
                    kind, tv, te = _U32X3(mv, l4 + 20)
                    if kind == _NOP_NOP_TS:
                        ts_val, ts_ecr = tv, te
                    else:
                        mss, wscale, sack_ok, ts_val, ts_ecr = _tcp_options(mv, l4 + 20, l4 + 32)
                elif th_off > 20:
                    mss, wscale, sack_ok, ts_val, ts_ecr = _tcp_options(mv, l4 + 20, l4 + th_off)
        elif quoted and avail >= 8:
            sport, dport, seq = _TCP8(mv, l4)
        else:
            raise MalformedPacket(f"TCP header cut short: {avail} bytes")
    elif proto == _UDP:
        if avail < 8:
            raise MalformedPacket(f"UDP header cut short: {avail} bytes")
        sport, dport, ulen = _UDPH(mv, l4)
        if quoted:
            p_len = ulen - 8 if ulen >= 8 else 0
        else:
            # a first fragment carries only part of the datagram its length describes
            if ulen < 8 or (ulen > ip_len - l4 and not more_frags):
                raise MalformedPacket(f"UDP length {ulen} with {avail} bytes of IP payload")
            p_len = ulen - 8
    elif (proto == _ICMP and af == AF_INET) or (proto == _ICMP6 and af == AF_INET6):
        if avail < 8:
            raise MalformedPacket(f"ICMP header cut short: {avail} bytes")
        icmp_type, icmp_code, echo_id = _ICMPH(mv, l4)
        if proto == _ICMP:
            queries, errors = _ICMP4_QUERY, _ICMP4_ERROR
        else:
            queries, errors = _ICMP6_QUERY, _ICMP6_ERROR
        if icmp_type in queries:
            icmp_id = sport = dport = echo_id
        elif icmp_type in errors and not quoted:
            # the quote is parsed with quoted=True, so an error inside it is not followed.
            # A quote pf cannot read (cut inside the IP header or the first 8 bytes of
            # TCP/UDP/ICMP, or of the other family) leaves inner None: pf_test_state_icmp
            # then finds no state and the error meets the ruleset, as in pf.
            q_pkt = Packet.__new__(Packet)
            try:
                _fill(q_pkt, mv[l4 + 8 : end], True)
            except MalformedPacket:
                pass
            else:
                if q_pkt.af == af:
                    inner = q_pkt

    if end != n:
        mv = mv[:end]  # drop link-layer padding (or bytes quoted past the datagram)
    pkt.raw = mv
    pkt.af = af
    pkt.src = src
    pkt.dst = dst
    pkt.proto = proto
    pkt.ip_len = ip_len
    pkt.ttl = ttl
    pkt.tos = tos
    pkt.ip_id = ip_id
    pkt.frag_off = frag_off
    pkt.more_frags = more_frags
    pkt.df = df
    pkt.fragment = fragment
    pkt.l4_off = l4
    pkt.l4_len = ip_len - l4
    pkt.ip_opts = ip_opts
    pkt.ip_hl = ip_hl
    pkt.truncated = truncated
    pkt.sport = sport
    pkt.dport = dport
    pkt.tcp_flags = tcp_flags
    pkt.seq = seq
    pkt.ack = ack
    pkt.win = win
    pkt.th_off = th_off
    pkt.p_len = p_len
    pkt.mss = mss
    pkt.wscale = wscale
    pkt.sack_ok = sack_ok
    pkt.ts_val = ts_val
    pkt.ts_ecr = ts_ecr
    pkt.icmp_type = icmp_type
    pkt.icmp_code = icmp_code
    pkt.icmp_id = icmp_id
    pkt.inner = inner


_IP6_WALKED = frozenset((_IP6_HBH, _IP6_ROUTING, _IP6_FRAGMENT, _IP6_AH, _IP6_DSTOPTS))


def _walk6(mv: memoryview, nxt: int, end: int) -> tuple[int, int, int, int, bool, bool]:
    """Walk IPv6 extension headers from offset 40; returns
    (proto, offset after the chain, frag id, frag offset, more fragments, options seen)."""
    off = 40
    ip_id = frag_off = 0
    more_frags = ip_opts = False
    for _ in range(_IP6_MAX_EXT):
        if nxt == _IP6_FRAGMENT:
            if off + 8 > end:
                raise MalformedPacket("IPv6 fragment header cut short")
            nh, offlg, ip_id = _FRAG6(mv, off)
            frag_off = offlg & 0xFFF8
            more_frags = (offlg & 1) != 0
            off += 8
            nxt = nh
            if frag_off:
                return nxt, off, ip_id, frag_off, more_frags, ip_opts  # fragment data follows
        elif nxt in (_IP6_HBH, _IP6_DSTOPTS, _IP6_ROUTING, _IP6_AH):
            if off + 2 > end:
                raise MalformedPacket(f"IPv6 extension header {nxt} cut short")
            nh = mv[off]
            hlen = mv[off + 1]
            if nxt == _IP6_AH:
                size = (hlen + 2) << 2
            else:
                size = (hlen + 1) << 3
                if nxt != _IP6_ROUTING:
                    ip_opts = True
            if off + size > end:
                raise MalformedPacket(f"IPv6 extension header {nxt} ({size} bytes) cut short")
            off += size
            nxt = nh
        else:
            return nxt, off, ip_id, frag_off, more_frags, ip_opts
    if nxt in _IP6_WALKED:
        raise MalformedPacket(f"more than {_IP6_MAX_EXT} IPv6 extension headers")
    return nxt, off, ip_id, frag_off, more_frags, ip_opts


def _tcp_options(mv: memoryview, i: int, end: int) -> tuple[int, int, bool, int, int]:
    """Scan TCP options; a bad length ends the scan (as pf does) instead of failing."""
    mss = wscale = ts_val = ts_ecr = -1
    sack_ok = False
    while i < end:
        kind = mv[i]
        if kind == 1:  # NOP
            i += 1
            continue
        if kind == 0 or i + 1 >= end:  # EOL, or no room for a length byte
            break
        olen = mv[i + 1]
        if olen < 2 or i + olen > end:
            break
        if kind == 2:
            if olen == 4:
                mss = _U16(mv, i + 2)[0]
        elif kind == 3:
            if olen == 3:
                wscale = mv[i + 2]
        elif kind == 4:
            if olen == 2:
                sack_ok = True
        elif kind == 8 and olen == 10:
            ts_val, ts_ecr = _U32X2(mv, i + 2)
        i += olen
    return mss, wscale, sack_ok, ts_val, ts_ecr


# ---------------------------------------------------------------------------------------
# Helpers and reply builders


def addr_str(af: int | None, raw: bytes | bytearray | memoryview) -> str:
    """The one address-to-text helper: inet_ntop for logs, pfctl views, dump and JSON.

    ``raw`` may be longer than the address (a 16-byte pf_addr holding an IPv4 address in
    its first 4 bytes); an address family that is neither AF_INET nor AF_INET6 (a peer's
    unknown af byte) prints the bytes in hex.
    """
    if af == AF_INET:
        return socket.inet_ntop(AF_INET, bytes(raw[:4]))
    if af == AF_INET6:
        return socket.inet_ntop(AF_INET6, bytes(raw[:16]))
    return bytes(raw).hex()


def host_port(af: int | None, raw: bytes | bytearray | memoryview, port: int,
              always: bool = False) -> str:
    """BSD host:port notation (host[port] for IPv6), the port left out when it is 0
    unless ``always`` (pfctl prints TCP and UDP ports even when 0; pf's log does not)."""
    a = addr_str(af, raw)
    if port or always:
        return f"{a}[{port}]" if af == AF_INET6 else f"{a}:{port}"
    return a


_LITTLE = sys.byteorder == "little"


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 checksum of ``data``, as the integer to store big-endian in a header.

    Sums native-order 16-bit words (the one's-complement sum is byte-order independent)
    and swaps once at the end: far faster than unpacking big-endian words in Python.
    A buffer that already holds a correct checksum yields 0.
    """
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1 or not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    if len(mv) & 1:
        mv = memoryview(mv.tobytes() + b"\0")
    s = sum(mv.cast("H"))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    s = ~s & 0xFFFF
    if _LITTLE:
        s = ((s >> 8) | (s << 8)) & 0xFFFF
    return s


def _ip_header(pkt: Packet, proto: int, payload_len: int, ttl: int, tos: int, df: bool) -> bytes:
    """A reply's IP header, from pkt.dst to pkt.src."""
    if pkt.af == AF_INET:
        total = 20 + payload_len
        hdr = bytearray(
            _IP4_HDR.pack(0x45, tos, total, 0, 0x4000 if df else 0, ttl, proto, 0, pkt.dst, pkt.src)
        )
        hdr[10:12] = internet_checksum(hdr).to_bytes(2, "big")
        return bytes(hdr)
    return _IP6_HDR.pack((6 << 28) | (tos << 20), payload_len, proto, ttl, pkt.dst, pkt.src)


def _l4_checksum(pkt: Packet, proto: int, segment: bytes) -> int:
    """L4 checksum over the reply's pseudo-header (reply: src = pkt.dst, dst = pkt.src)."""
    if pkt.af == AF_INET:
        pseudo = _PSEUDO4.pack(pkt.dst, pkt.src, proto, len(segment))
    else:
        pseudo = _PSEUDO6.pack(pkt.dst, pkt.src, len(segment), proto)
    return internet_checksum(pseudo + segment)


def _build_tcp(pkt: Packet, seq: int, ack: int, flags: int, ttl: int) -> bytes:
    if pkt.proto != _TCP or pkt.l4_off >= pkt.ip_len or pkt.th_off == 0:
        raise ValueError("reply needs a parsed TCP packet")
    seg = bytearray(
        _TCP_HDR.pack(
            pkt.dport, pkt.sport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, 0, 0, 0
        )
    )
    seg[16:18] = _l4_checksum(pkt, _TCP, bytes(seg)).to_bytes(2, "big")
    # pf_build_tcp: IPTOS_LOWDELAY and DF (path MTU discovery on) for IPv4.
    return _ip_header(pkt, _TCP, len(seg), ttl, 0x10 if pkt.af == AF_INET else 0, True) + seg


def build_tcp_rst(pkt: Packet, ttl: int = 64) -> bytes:
    """The RST|ACK that ``block return-rst`` sends back for ``pkt`` (as pf_send_tcp).

    seq = pkt.ack (pf uses th_ack whatever the flags); ack = pkt.seq + payload (+1 for SYN,
    +1 for FIN).
    Callers must not answer an RST with an RST; this builder does not judge.
    """
    ack = pkt.seq + pkt.p_len
    if pkt.tcp_flags & TH_SYN:
        ack += 1
    if pkt.tcp_flags & TH_FIN:
        ack += 1
    return _build_tcp(pkt, pkt.ack, ack, TH_RST | TH_ACK, ttl)


def build_tcp_ack(pkt: Packet, seq: int, ack: int, ttl: int = 64) -> bytes:
    """A bare ACK from pkt's destination to its source (pf's challenge ACK), window 0."""
    return _build_tcp(pkt, seq, ack, TH_ACK, ttl)


def build_icmp_unreach(pkt: Packet, ttl: int = 64, code: int | None = None) -> bytes:
    """ICMP destination unreachable (v4 type 3, v6 type 1), by default port (3/3, 1/4);
    `code` picks another (return-icmp(host-unr), return-icmp6(admin-unr)).

    Quotes the original IP header + 8 bytes for IPv4 and as much as keeps the reply within
    the IPv6 minimum MTU (1280) for IPv6, as icmp_error/icmp6_error do. The reply comes from
    pkt.dst. Policy (never answer ICMP errors, non-first fragments or broadcast) is the
    caller's.
    """
    raw = pkt.raw
    if pkt.af == AF_INET:
        quote = bytes(raw[: min(pkt.ip_hl + 8, pkt.ip_len, len(raw))])
        icmp_type, code = 3, 3 if code is None else code
    else:
        quote = bytes(raw[: min(_IP6_MIN_MTU - 48, pkt.ip_len, len(raw))])
        icmp_type, code = 1, 4 if code is None else code
    msg = bytearray(_ICMP_HDR.pack(icmp_type, code, 0, 0)) + quote
    if pkt.af == AF_INET:
        csum = internet_checksum(msg)
        proto = _ICMP
    else:
        csum = _l4_checksum(pkt, _ICMP6, bytes(msg))
        proto = _ICMP6
    msg[2:4] = csum.to_bytes(2, "big")
    return _ip_header(pkt, proto, len(msg), ttl, 0, False) + bytes(msg)
