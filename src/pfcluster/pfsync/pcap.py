"""Read pfsync frames (and plain IP packets for replay) from pcap / pcapng files.

Link types handled: Ethernet (1, VLAN tags skipped), raw IP (101, 12, 14, 228, 229),
Linux cooked SLL (113) and SLL2 (276), BSD loopback/null (0, 108) and the pfsync
interface types (OpenBSD DLT_PFSYNC 18, pcap LINKTYPE_PFSYNC 246), whose records start
either at pfsync_header (4.5..2015, FreeBSD) or at the IP header (current OpenBSD):
the first nibble tells which, as pfsync versions are < 16.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import dpkt

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


def _open_reader(fh: BinaryIO) -> tuple[int, Iterator[tuple[float, bytes]]]:
    magic = fh.read(4)
    fh.seek(0)
    is_ng = magic == b"\x0a\x0d\x0d\x0a"
    r = dpkt.pcapng.Reader(fh) if is_ng else dpkt.pcap.Reader(fh)
    return r.datalink(), iter(r)


def iter_link(path: str | Path) -> Iterator[tuple[float, int, bytes]]:
    """(ts, linktype, record bytes) for every record of a pcap or pcapng file."""
    with open(path, "rb") as fh:
        linktype, records = _open_reader(fh)
        for ts, buf in records:
            yield float(ts), linktype, bytes(buf)


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
