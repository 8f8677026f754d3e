"""Read pfsync frames (and plain IP packets for replay) from pcap / pcapng files.

Link types handled: Ethernet (1, VLAN tags skipped), raw IP (101, 12, 14, 228, 229),
Linux cooked SLL (113) and SLL2 (276), BSD loopback/null (0, 108) and the pfsync
interface types (OpenBSD DLT_PFSYNC 18, pcap LINKTYPE_PFSYNC 246), whose records start
either at pfsync_header (4.5..2015, FreeBSD) or at the IP header (current OpenBSD):
the first nibble tells which, as pfsync versions are < 16.

Both file formats are read here with explicit length checks (no third-party reader), so
that every problem with a file is one documented exception, `CaptureError`, whose str()
is `FILE: problem`: a missing or unreadable file, an empty file, a file that is neither
pcap nor pcapng, an unsupported link type, and a file cut inside a record or block. The
readers are generators: records before a cut are yielded first, then the error is raised
(as tcpdump prints what it read and then "truncated dump file"). pcap: both byte orders,
microsecond and nanosecond magics, and the "modified" (Kuznetzov) record header.
pcapng: every section, every interface (each with its own link type, if_tsresol and
if_tsoffset), enhanced, simple and obsolete packet blocks; other blocks are skipped.
Input may be a pipe (nothing is seeked).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from pfcluster.pf.constants import IPPROTO_PFSYNC
from pfcluster.pfsync.wire import WireError, split_ip

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_ALIASES = (12, 14, 101)
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
DLT_PFSYNC_OPENBSD = 18
LINKTYPE_PFSYNC = 246
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
_VLAN_TYPES = (0x8100, 0x88A8, 0x9100)

PFSYNC_LINKTYPES = (DLT_PFSYNC_OPENBSD, LINKTYPE_PFSYNC)
SUPPORTED_LINKTYPES = frozenset(
    (LINKTYPE_NULL, LINKTYPE_ETHERNET, *LINKTYPE_RAW_ALIASES, LINKTYPE_IPV4, LINKTYPE_IPV6,
     LINKTYPE_LOOP, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, *PFSYNC_LINKTYPES)
)

# A record longer than this is a corrupt length field, not a packet (libpcap's largest
# per-link-type maximum is 256 KiB; pcapng blocks also hold options).
MAX_RECORD = 1 << 20


class CaptureError(Exception):
    """A capture file (or live source) that cannot be read; str() is `PATH: message`."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.message = message


class PfsyncPacket(NamedTuple):
    """One pfsync frame found in a capture; src/dst/ttl are None for pfsync-interface
    records that carry no IP header."""

    ts: float
    src: str | None
    dst: str | None
    ttl: int | None
    payload: bytes


def _ethertype_payload(etype: int, buf: bytes, off: int) -> bytes | None:
    while etype in _VLAN_TYPES and off + 4 <= len(buf):
        etype = struct.unpack_from("!H", buf, off + 2)[0]
        off += 4
    if etype in (ETH_P_IP, ETH_P_IPV6):
        return buf[off:]
    return None


def ip_from_link(linktype: int, buf: bytes) -> bytes | None:
    """The IP packet inside one link-layer record, or None if it is not IP."""
    if linktype == LINKTYPE_ETHERNET:
        if len(buf) < 14:
            return None
        return _ethertype_payload(struct.unpack_from("!H", buf, 12)[0], buf, 14)
    if linktype in LINKTYPE_RAW_ALIASES or linktype in (LINKTYPE_IPV4, LINKTYPE_IPV6):
        return buf if buf and buf[0] >> 4 in (4, 6) else None
    if linktype == LINKTYPE_LINUX_SLL:
        if len(buf) < 16:
            return None
        return _ethertype_payload(struct.unpack_from("!H", buf, 14)[0], buf, 16)
    if linktype == LINKTYPE_LINUX_SLL2:
        if len(buf) < 20:
            return None
        return _ethertype_payload(struct.unpack_from("!H", buf, 0)[0], buf, 20)
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        # 4-byte address family in host (0) or network (108) order; trust the IP nibble.
        return buf[4:] if len(buf) > 4 and buf[4] >> 4 in (4, 6) else None
    if linktype in PFSYNC_LINKTYPES:
        return buf if buf and buf[0] >> 4 in (4, 6) else None
    return None


# --------------------------------------------------------------------------- readers

PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_IDB = 0x00000001
PCAPNG_PB = 0x00000002  # obsolete packet block
PCAPNG_SPB = 0x00000003
PCAPNG_EPB = 0x00000006
PCAPNG_BOM = 0x1A2B3C4D
_OPT_IF_TSRESOL = 9
_OPT_IF_TSOFFSET = 14

# pcap magic (as read little-endian) -> (struct byte order, record header size, divisor)
_PCAP_MAGIC: dict[bytes, tuple[str, int, float]] = {
    b"\xd4\xc3\xb2\xa1": ("<", 16, 1e6),
    b"\xa1\xb2\xc3\xd4": (">", 16, 1e6),
    b"\x4d\x3c\xb2\xa1": ("<", 16, 1e9),
    b"\xa1\xb2\x3c\x4d": (">", 16, 1e9),
    b"\x34\xcd\xb2\xa1": ("<", 24, 1e6),  # "modified" pcap (Alexey Kuznetzov's patches)
    b"\xa1\xb2\xcd\x34": (">", 24, 1e6),
}


def _read(fh: BinaryIO, n: int, path: str, what: str) -> bytes:
    """Exactly n bytes, or CaptureError naming what was cut."""
    buf = fh.read(n)
    if len(buf) != n:
        raise CaptureError(path, f"truncated dump file: {what} cut after {len(buf)} of {n} bytes")
    return buf


def _check_linktype(path: str, linktype: int, where: str = "") -> None:
    if linktype not in SUPPORTED_LINKTYPES:
        supported = ", ".join(str(t) for t in sorted(SUPPORTED_LINKTYPES))
        raise CaptureError(path, f"unsupported link type {linktype}{where} "
                                 f"(supported: {supported})")


def _pcap_records(fh: BinaryIO, path: str, head: bytes) -> Iterator[tuple[float, int, bytes]]:
    order, hdr_len, divisor = _PCAP_MAGIC[head[:4]]
    _vmaj, _vmin, _zone, _sigfigs, _snaplen, linkinfo = struct.unpack(order + "HHiIII", head[4:])
    linktype = linkinfo & 0xFFFF  # the upper bits may carry the FCS length
    _check_linktype(path, linktype)
    n = 0
    while True:
        hdr = fh.read(hdr_len)
        if not hdr:
            return
        n += 1
        if len(hdr) < hdr_len:
            raise CaptureError(path, f"truncated dump file: record {n} header cut after "
                                     f"{len(hdr)} of {hdr_len} bytes")
        sec, frac, caplen, _origlen = struct.unpack_from(order + "IIII", hdr)
        if caplen > MAX_RECORD:
            raise CaptureError(path, f"record {n}: capture length {caplen} exceeds "
                                     f"{MAX_RECORD} (corrupt file)")
        buf = _read(fh, caplen, path, f"record {n}")
        yield sec + frac / divisor, linktype, buf


class _Iface(NamedTuple):
    linktype: int
    snaplen: int
    divisor: float
    offset: int


def _idb(path: str, body: bytes, order: str, nblock: int) -> _Iface:
    if len(body) < 8:
        raise CaptureError(path, f"block {nblock}: interface description block too short")
    linktype, _reserved, snaplen = struct.unpack_from(order + "HHI", body)
    _check_linktype(path, linktype, f" (interface block {nblock})")
    divisor, offset = 1e6, 0
    off = 8
    while off + 4 <= len(body):
        code, olen = struct.unpack_from(order + "HH", body, off)
        off += 4
        if code == 0:  # opt_endofopt
            break
        val = body[off : off + olen]
        if len(val) != olen:
            raise CaptureError(path, f"block {nblock}: option {code} runs past the block")
        if code == _OPT_IF_TSRESOL and olen >= 1:
            res = val[0]
            divisor = float(2 ** (res & 0x7F)) if res & 0x80 else float(10 ** (res & 0x7F))
        elif code == _OPT_IF_TSOFFSET and olen >= 8:
            offset = struct.unpack_from(order + "q", val)[0]
        off += (olen + 3) & ~3
    return _Iface(linktype, snaplen, divisor, offset)


def _pcapng_records(fh: BinaryIO, path: str, head: bytes) -> Iterator[tuple[float, int, bytes]]:
    order = "<"
    ifaces: list[_Iface] = []
    last_ts = 0.0
    nblock = 0
    pending = head  # the first block's first bytes were already read to sniff the format
    while True:
        start = pending + fh.read(8 - len(pending)) if len(pending) < 8 else pending
        pending = b""
        if not start:
            return
        nblock += 1
        if len(start) < 8:
            raise CaptureError(path, f"truncated dump file: block {nblock} header cut after "
                                     f"{len(start)} of 8 bytes")
        btype = struct.unpack_from(order + "I", start)[0]  # SHB: same in both orders
        if btype == PCAPNG_SHB:  # a new section: its byte-order magic decides
            bom = _read(fh, 4, path, f"block {nblock} (section header)")
            if bom == b"\x4d\x3c\x2b\x1a":
                order = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                order = ">"
            else:
                raise CaptureError(path, f"block {nblock}: section header has a bad byte-order "
                                         f"magic 0x{bom.hex()}")
            ifaces = []
            rest_head = bom
        else:
            rest_head = b""
        blen = struct.unpack_from(order + "I", start, 4)[0]
        if blen < 12 + len(rest_head) or blen % 4 or blen > MAX_RECORD:
            raise CaptureError(path, f"block {nblock}: bad block length {blen} (corrupt file)")
        body = rest_head + _read(fh, blen - 12 - len(rest_head), path, f"block {nblock}")
        trailer = _read(fh, 4, path, f"block {nblock}")
        if struct.unpack(order + "I", trailer)[0] != blen:
            raise CaptureError(path, f"block {nblock}: trailing length differs from {blen} "
                                     "(corrupt file)")
        if btype == PCAPNG_SHB:
            major = struct.unpack_from(order + "H", body, 4)[0] if len(body) >= 6 else None
            if major != 1:
                raise CaptureError(path, f"block {nblock}: pcapng version {major} "
                                         "is not supported")
            continue
        if btype == PCAPNG_IDB:
            ifaces.append(_idb(path, body, order, nblock))
            continue
        if btype in (PCAPNG_EPB, PCAPNG_PB):
            if len(body) < 20:
                raise CaptureError(path, f"block {nblock}: packet block too short")
            if btype == PCAPNG_EPB:
                ifid, hi, lo, caplen, _origlen = struct.unpack_from(order + "IIIII", body)
            else:
                ifid, _drops, hi, lo, caplen, _origlen = struct.unpack_from(order + "HHIIII", body)
            if ifid >= len(ifaces):
                raise CaptureError(path, f"block {nblock}: packet for interface {ifid}, "
                                         f"but {len(ifaces)} interface(s) described")
            if 20 + caplen > len(body):
                raise CaptureError(path, f"block {nblock}: capture length {caplen} runs past "
                                         "the block (corrupt file)")
            iface = ifaces[ifid]
            last_ts = iface.offset + ((hi << 32) | lo) / iface.divisor
            yield last_ts, iface.linktype, body[20 : 20 + caplen]
            continue
        if btype == PCAPNG_SPB:
            if not ifaces:
                raise CaptureError(path, f"block {nblock}: simple packet block before any "
                                         "interface description")
            if len(body) < 4:
                raise CaptureError(path, f"block {nblock}: simple packet block too short")
            origlen = struct.unpack_from(order + "I", body)[0]
            caplen = min(origlen, len(body) - 4)
            if ifaces[0].snaplen:
                caplen = min(caplen, ifaces[0].snaplen)
            # no timestamp in an SPB: it keeps the previous packet's
            yield last_ts, ifaces[0].linktype, body[4 : 4 + caplen]
        # any other block (name resolution, statistics, custom...) is skipped


def _records(fh: BinaryIO, path: str) -> Iterator[tuple[float, int, bytes]]:
    head = fh.read(4)
    if not head:
        raise CaptureError(path, "empty file (not a pcap or pcapng capture)")
    if head == b"\x0a\x0d\x0d\x0a":
        yield from _pcapng_records(fh, path, head)
        return
    if head not in _PCAP_MAGIC:
        if len(head) < 4:
            raise CaptureError(path, f"not a pcap or pcapng capture ({len(head)} bytes)")
        raise CaptureError(path, f"not a pcap or pcapng capture (magic 0x{head.hex()})")
    rest = fh.read(20)
    if len(rest) < 20:
        raise CaptureError(path, f"truncated dump file: pcap file header cut after "
                                 f"{4 + len(rest)} of 24 bytes")
    yield from _pcap_records(fh, path, head + rest)


def iter_link(path: str | Path) -> Iterator[tuple[float, int, bytes]]:
    """(ts, linktype, record bytes) for every record of a pcap or pcapng file; raises
    CaptureError (after yielding every complete record before the problem)."""
    name = str(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, also when the caller stops early
    except OSError as exc:
        raise CaptureError(name, exc.strerror or str(exc)) from exc
    try:
        yield from _records(fh, name)
    except OSError as exc:  # EISDIR on the first read, EIO...
        raise CaptureError(name, exc.strerror or str(exc)) from exc
    finally:
        fh.close()


def iter_ip_packets(path: str | Path) -> Iterator[tuple[float, bytes]]:
    """(ts, ip_bytes) for every IPv4/IPv6 packet of a capture (used by replay)."""
    for ts, linktype, buf in iter_link(path):
        ip = ip_from_link(linktype, buf)
        if ip is not None:
            yield ts, ip


def pfsync_from_record(ts: float, linktype: int, buf: bytes) -> PfsyncPacket | None:
    """The pfsync frame in one record, or None when the record is something else."""
    if linktype in PFSYNC_LINKTYPES and buf and buf[0] >> 4 not in (4, 6):
        return PfsyncPacket(ts, None, None, None, buf)
    ip = ip_from_link(linktype, buf)
    if ip is None:
        return None
    try:
        env, payload = split_ip(ip)
    except WireError:
        return None
    if env.proto != IPPROTO_PFSYNC:
        return None
    return PfsyncPacket(ts, env.src, env.dst, env.ttl, bytes(payload))


def iter_pfsync(path: str | Path) -> Iterator[PfsyncPacket]:
    """(ts, src, dst, ttl, pfsync payload) for every IP protocol 240 packet."""
    for ts, linktype, buf in iter_link(path):
        pkt = pfsync_from_record(ts, linktype, buf)
        if pkt is not None:
            yield pkt
