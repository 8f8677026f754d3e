"""NAT packet rewriting in place, with incremental checksum updates (sans I/O, pure).

The translated packet goes back to the kernel as an NFQUEUE verdict payload, so the
rewrite happens on a ``bytearray`` holding the whole IP packet, described by the
``Packet`` parsed from those same bytes (offsets come from it, nothing is parsed again).

Checksums are never recomputed over the data: each changed 16-bit word moves the
one's complement sum by (new - old), and since 2**16 == 1 (mod 0xffff) an address or
port of any width contributes ``int(new) - int(old)``; the stored checksum follows as in
RFC 1624 (eqn. 3), keeping the sum in 1..0xffff as a full recomputation would (covered
data is never all zero). An invalid checksum stays invalid by the same amount, as in pf.

What moves (OpenBSD pf_translate / pf_test_state_icmp):
- IPv4 header checksum: the addresses.
- TCP, UDP and ICMPv6 checksums: the pseudo-header addresses and the ports / echo id.
  A UDP checksum of 0 ("none") stays 0; a computed 0 is sent as 0xffff.
- ICMPv4 has no pseudo header: only an echo id change moves its checksum.
- ICMP/ICMPv6 echo request/reply: the echo id is the one "port" (``sport``, as pf uses
  the virtual id); other ICMP types carry no port.
- ICMP errors (rewrite_icmp_error): the quoted header's addresses and ports, its IPv4
  header checksum and its L4 checksum where the quote holds that field (UDP always, as
  its checksum is in the first 8 bytes; TCP only when 18 bytes of it are quoted; a quoted
  echo's ICMP checksum), then the outer ICMP checksum (it covers the quote) and the outer
  addresses. OpenBSD's current pf (pf_translate_icmp) leaves the quoted checksums as
  they were; fixing them costs little here and makes the quote exactly what the host
  sent, byte for byte.

Not handled: IPv6 routing headers (the pseudo header would use the final destination,
not the address rewritten here) and address-family translation (af-to).
"""

from __future__ import annotations

import socket
import struct

from pfcluster.packet import Packet

__all__ = ["RewriteError", "rewrite", "rewrite_icmp_error"]

_AF_INET = socket.AF_INET
_TCP = 6
_UDP = 17
_ICMP = 1
_ICMP6 = 58
_ECHO4 = frozenset((0, 8))  # echo reply, echo request
_ECHO6 = frozenset((128, 129))
_ICMP4_ERRORS = frozenset((3, 4, 5, 11, 12))
_ICMP6_ERRORS = frozenset((1, 2, 3, 4))

_U16 = struct.Struct("!H")
_get16 = _U16.unpack_from
_put16 = _U16.pack_into
_PORTS = struct.Struct("!HH")
_put_ports = _PORTS.pack_into
_IP4_SUM_ADDRS = struct.Struct("!HII")  # header checksum, source, destination at 10
_get_ip4 = _IP4_SUM_ADDRS.unpack_from
_put_ip4 = _IP4_SUM_ADDRS.pack_into
_from_bytes = int.from_bytes


class RewriteError(ValueError):
    """The packet cannot be translated as asked: a header to rewrite (or the checksum
    that covers it) is not in the buffer, the buffer is not the whole packet, an address
    has the wrong length, or a port change is asked of a packet that has no such port
    (a non-first fragment, a protocol without ports). The only error raised here."""


def _fix(ck: int, delta: int) -> int:
    """The checksum field after the data it covers grew by ``delta`` (any integer,
    taken mod 0xffff): RFC 1624 with the sum kept in 1..0xffff."""
    return 0xFFFE - (0xFFFE - ck + delta) % 0xFFFF


def rewrite(buf: bytearray, pkt: Packet, src: bytes | None, sport: int | None,
            dst: bytes | None, dport: int | None) -> None:
    """Translate the packet in ``buf`` (parsed as ``pkt``) in place; None = unchanged.

    ``sport``/``dport`` are TCP/UDP ports; for an ICMP/ICMPv6 echo the new id is
    ``sport`` (or ``dport`` when ``sport`` is None). ``pkt`` is updated afterwards (src,
    dst, sport, dport, icmp_id) so a later pf test sees the translated packet. ``buf``
    must hold the whole packet (it becomes the verdict payload, which replaces the packet
    in the kernel): a capture cut short (``pkt.truncated``) raises RewriteError.
    Raises RewriteError, and then ``buf`` and ``pkt`` are unchanged.
    """
    n = len(buf)
    if pkt.truncated or pkt.ip_len > n or n < 20:
        raise RewriteError(f"{n} bytes do not hold the whole {pkt.ip_len}-byte packet")
    proto = pkt.proto
    l4 = pkt.l4_off
    if pkt.af != _AF_INET or (proto != _TCP and proto != _UDP) or l4 + 18 > pkt.ip_len \
            or buf[0] >> 4 != 4:
        _translate(buf, 0, n, pkt, src, sport, dst, dport, False)
        return
    # IPv4 TCP/UDP with its header here (the common case): each field read and written
    # once, addresses as integers.
    ipck, osrc, odst = _get_ip4(buf, 10)
    if src is None:
        nsrc = osrc
    elif len(src) == 4:
        nsrc = _from_bytes(src, "big")
    else:
        raise RewriteError(f"address of {len(src)} bytes for IPv4")
    if dst is None:
        ndst = odst
    elif len(dst) == 4:
        ndst = _from_bytes(dst, "big")
    else:
        raise RewriteError(f"address of {len(dst)} bytes for IPv4")
    osp = pkt.sport
    odp = pkt.dport
    nsp = osp if sport is None else sport
    ndp = odp if dport is None else dport
    if not (0 <= nsp <= 0xFFFF and 0 <= ndp <= 0xFFFF):
        raise RewriteError(f"port {nsp}/{ndp} out of range")
    adelta = nsrc - osrc + ndst - odst
    if adelta or nsrc != osrc:
        _put_ip4(buf, 10, 0xFFFE - (0xFFFE - ipck + adelta) % 0xFFFF, nsrc, ndst)
        if src is not None:
            pkt.src = src
        if dst is not None:
            pkt.dst = dst
    pdelta = nsp - osp + ndp - odp
    if pdelta or nsp != osp:
        _put_ports(buf, l4, nsp, ndp)
        pkt.sport = nsp
        pkt.dport = ndp
    delta = adelta + pdelta
    if delta:
        ck_off = l4 + 6 if proto == _UDP else l4 + 16
        (old,) = _get16(buf, ck_off)
        if proto == _TCP:
            _put16(buf, ck_off, 0xFFFE - (0xFFFE - old + delta) % 0xFFFF)
        elif old:  # a UDP checksum of 0: the sender computed none; leave it so
            _put16(buf, ck_off, 0xFFFE - (0xFFFE - old + delta) % 0xFFFF or 0xFFFF)


def rewrite_icmp_error(buf: bytearray, pkt: Packet, outer_src: bytes | None,
                       outer_dst: bytes | None, inner_src: bytes | None,
                       inner_sport: int | None, inner_dst: bytes | None,
                       inner_dport: int | None) -> None:
    """Translate an ICMP/ICMPv6 error that quotes a translated packet, in place.

    The quoted packet (``pkt.inner``) gets ``inner_*`` (addresses, TCP/UDP ports or a
    quoted echo's id as ``inner_sport``) with its checksums where quoted; the outer
    packet gets ``outer_src``/``outer_dst`` and its ICMP checksum follows every change.
    None = unchanged. ``pkt`` and ``pkt.inner`` are updated afterwards. Raises
    RewriteError (``buf`` and ``pkt`` unchanged) when ``pkt`` is not an error with a
    readable quote of its own family, or when ``buf`` does not hold the whole packet.
    """
    n = len(buf)
    if pkt.truncated or pkt.ip_len > n or n < 20:
        raise RewriteError(f"{n} bytes do not hold the whole {pkt.ip_len}-byte packet")
    inner = pkt.inner
    v4 = pkt.af == _AF_INET
    errors = _ICMP4_ERRORS if v4 else _ICMP6_ERRORS
    if inner is None or pkt.proto != (_ICMP if v4 else _ICMP6) or \
            pkt.icmp_type not in errors or pkt.l4_off >= pkt.ip_len:
        raise RewriteError("not an ICMP error with a readable quoted packet")
    l4 = pkt.l4_off
    base = l4 + 8
    end = min(base + len(inner.raw), pkt.ip_len)
    if l4 + 8 > n or end < base + 20:
        raise RewriteError("ICMP error cut short")
    # the outer checks first, so a refusal leaves everything unchanged
    _check_outer(buf, outer_src, outer_dst, v4)
    delta = _translate(buf, base, end, inner, inner_src, inner_sport, inner_dst,
                       inner_dport, True)
    if delta:
        _put16(buf, l4 + 2, _fix(_get16(buf, l4 + 2)[0], delta))
    # the outer addresses; for ICMPv6 this also moves the checksum by the pseudo header
    _translate(buf, 0, n, pkt, outer_src, None, outer_dst, None, False)


def _check_outer(buf: bytearray, src: bytes | None, dst: bytes | None, v4: bool) -> None:
    if (buf[0] >> 4) != (4 if v4 else 6):
        raise RewriteError("the buffer's IP version does not match the parsed packet")
    alen = 4 if v4 else 16
    for a in (src, dst):
        if a is not None and len(a) != alen:
            raise RewriteError(f"address of {len(a)} bytes for a {alen}-byte family")


def _translate(buf: bytearray, base: int, end: int, pkt: Packet, src: bytes | None,
               sport: int | None, dst: bytes | None, dport: int | None,
               quoted: bool) -> int:
    """Rewrite the packet at buf[base:end] described by ``pkt`` (offsets from base) and
    update ``pkt``. Everything is checked before the first byte is written. Returns the
    change of the one's complement sum of buf[base:end] (for an outer ICMP checksum)."""
    v4 = pkt.af == _AF_INET
    if (buf[base] >> 4) != (4 if v4 else 6):
        raise RewriteError("the buffer's IP version does not match the parsed packet")
    alen = 4 if v4 else 16
    aoff = base + (12 if v4 else 8)
    if aoff + 2 * alen > end:
        raise RewriteError("IP header cut short")
    if (src is not None and len(src) != alen) or (dst is not None and len(dst) != alen):
        raise RewriteError(f"address of the wrong length for a {alen}-byte family")

    # --- plan the transport part (raises before anything is written) ---
    proto = pkt.proto
    l4 = base + pkt.l4_off
    osp = pkt.sport
    odp = pkt.dport
    nsp = osp if sport is None else sport
    ndp = odp if dport is None else dport
    ck_off = -1  # offset of the L4 checksum to fix, -1 for none
    pseudo = True  # the L4 checksum covers the addresses
    echo = False
    if pkt.l4_off >= pkt.ip_len:  # no upper-layer header here (non-first fragment)
        if nsp != osp or ndp != odp:
            raise RewriteError("port change asked of a packet without its L4 header")
    elif proto in (_TCP, _UDP):
        if l4 + 8 > end:
            raise RewriteError("TCP/UDP ports cut short")
        if not 0 <= nsp <= 0xFFFF or not 0 <= ndp <= 0xFFFF:
            raise RewriteError(f"port {nsp}/{ndp} out of range")
        if proto == _UDP:
            ck_off = l4 + 6
        elif l4 + 18 <= end:
            ck_off = l4 + 16
        elif not quoted:
            raise RewriteError("TCP checksum cut short")
    elif proto == (_ICMP if v4 else _ICMP6):
        ck_off = l4 + 2
        pseudo = not v4
        if pkt.icmp_type in (_ECHO4 if v4 else _ECHO6):
            if sport is not None and dport is not None and sport != dport:
                raise RewriteError(f"two ids ({sport}, {dport}) for one echo")
            if sport is None:
                nsp = ndp
            if not 0 <= nsp <= 0xFFFF:
                raise RewriteError(f"echo id {nsp} out of range")
            echo = True
        elif nsp != osp or ndp != odp:
            raise RewriteError(f"id change asked of ICMP type {pkt.icmp_type} (echo only)")
        if l4 + 8 > end:
            raise RewriteError("ICMP header cut short")
    elif nsp != osp or ndp != odp:
        raise RewriteError(f"port change asked of protocol {proto}")

    # --- addresses and the IPv4 header checksum ---
    adelta = 0
    if src is not None and src != pkt.src:
        adelta = _from_bytes(src, "big") - _from_bytes(pkt.src, "big")
        buf[aoff:aoff + alen] = src
        pkt.src = src
    if dst is not None and dst != pkt.dst:
        adelta += _from_bytes(dst, "big") - _from_bytes(pkt.dst, "big")
        buf[aoff + alen:aoff + 2 * alen] = dst
        pkt.dst = dst
    sum_delta = adelta
    if v4 and adelta:
        old = _get16(buf, base + 10)[0]
        new = _fix(old, adelta)
        _put16(buf, base + 10, new)
        sum_delta += new - old

    # --- transport header ---
    if echo:
        pdelta = nsp - osp
        if pdelta:
            _put16(buf, l4 + 4, nsp)
            pkt.sport = pkt.dport = pkt.icmp_id = nsp
    else:
        pdelta = nsp - osp + ndp - odp
        if pdelta:
            _put_ports(buf, l4, nsp, ndp)
            pkt.sport = nsp
            pkt.dport = ndp
    sum_delta += pdelta
    if ck_off >= 0:
        delta = adelta + pdelta if pseudo else pdelta
        if delta:
            old = _get16(buf, ck_off)[0]
            if proto == _UDP:
                if old:  # 0: the sender computed no checksum; leave it so
                    new = _fix(old, delta) or 0xFFFF
                    _put16(buf, ck_off, new)
                    sum_delta += new - old
            else:
                new = _fix(old, delta)
                _put16(buf, ck_off, new)
                sum_delta += new - old
    return sum_delta
