"""The pfsync transport: raw IP protocol 240 on the sync interface.

Two sockets per address family, because the two jobs want opposite things:
- the *receive* socket is not bound to a device, so a frame arriving on another interface
  still reaches us and is counted `badif` (pfsync_input's check) instead of vanishing
  unseen; IP_PKTINFO / IPV6_RECVPKTINFO say where it came in, the IPv4 header (raw
  sockets deliver it) or IPV6_RECVHOPLIMIT give the TTL, checked against 255 (`badttl`:
  only a neighbour on the link can produce TTL 255, which is pfsync's only authentication);
- the *send* socket is SO_BINDTODEVICE'd to the sync interface with TTL/hop limit 255,
  multicast loopback off; a drop-all BPF filter stops it from queueing a copy of every
  received frame.
Both carry SO_MARK so the daemon's own iptables chain lets them pass unqueued.
Receive is bounded per wakeup so a flood on the sync link cannot starve the data plane.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from pfcluster.io.iptables import GENERATED_MARK

IPPROTO_PFSYNC = 240
PFSYNC_GROUP4 = "224.0.0.240"
PFSYNC_GROUP6 = "ff02::f0"
PFSYNC_TTL = 255
MAX_FRAMES_PER_WAKEUP = 256
RCVBUF = 16 << 20  # a 1M-state bulk update outruns a briefly stalled receiver (lab bulk)

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IPV6_RECVHOPLIMIT = getattr(socket, "IPV6_RECVHOPLIMIT", 51)
IPV6_HOPLIMIT = getattr(socket, "IPV6_HOPLIMIT", 52)


@dataclass(slots=True)
class SyncFrame:
    """One accepted frame: the pfsync payload (from the pfsync header on) and its sender."""

    payload: bytes
    src: str
    ttl: int


@dataclass
class SyncCounters:
    """Drops decided here, before the engine sees the frame (pfsyncstats names)."""

    rx: int = 0
    badttl: int = 0
    badif: int = 0
    hdrops: int = 0
    tx: int = 0
    txerr: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"rx": self.rx, "badttl": self.badttl, "badif": self.badif,
                "hdrops": self.hdrops, "tx": self.tx, "txerr": self.txerr}


def _attach_drop_all(sock: socket.socket) -> None:
    """Classic BPF `ret #0`: the socket receives nothing (it only sends)."""
    insn = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))
    prog = struct.pack("HL", 1, ctypes.addressof(insn))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)


def set_rcvbuf(sock: socket.socket, size: int) -> None:
    """As large as asked (SO_RCVBUFFORCE passes rmem_max as root), else what the cap allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


class SyncSocket:
    """pfsync over raw IPv4 or IPv6 on `ifname`, to a multicast group or a unicast peer."""

    def __init__(self, ifname: str, *, peer: str | None = None, group: str | None = None,
                 af: int | None = None, mark: int = GENERATED_MARK) -> None:
        self.ifname = ifname
        self.ifindex = socket.if_nametoindex(ifname)
        if af is None:
            probe = peer or group
            af = (socket.AF_INET6 if probe and ipaddress.ip_address(probe).version == 6
                  else socket.AF_INET)
        self.af = af
        if peer is None:
            group = group or (PFSYNC_GROUP6 if af == socket.AF_INET6 else PFSYNC_GROUP4)
        self.peer = peer
        self.group = group
        self.dest = peer or group
        assert self.dest is not None
        self.counters = SyncCounters()
        self.rx = socket.socket(af, socket.SOCK_RAW, IPPROTO_PFSYNC)
        self.tx = socket.socket(af, socket.SOCK_RAW, IPPROTO_PFSYNC)
        try:
            self._setup(mark)
        except Exception:
            self.close()
            raise

    def _setup(self, mark: int) -> None:
        rx, tx = self.rx, self.tx
        rx.setblocking(False)
        tx.setblocking(False)
        set_rcvbuf(rx, RCVBUF)
        _attach_drop_all(tx)
        for s in (rx, tx):
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            except OSError:
                pass
        tx.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, self.ifname.encode())
        if self.af == socket.AF_INET:
            rx.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, PFSYNC_TTL)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, PFSYNC_TTL)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            mreqn = struct.pack("4s4si", b"\0" * 4, b"\0" * 4, self.ifindex)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
            rx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            if self.group is not None:
                mreq = struct.pack("4s4si", socket.inet_aton(self.group), b"\0" * 4,
                                   self.ifindex)
                rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        else:
            rx.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            rx.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
            tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, PFSYNC_TTL)
            tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, PFSYNC_TTL)
            tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self.ifindex)
            rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            if self.group is not None:
                mreq = socket.inet_pton(socket.AF_INET6, self.group) + struct.pack(
                    "I", self.ifindex)
                rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)

    def fileno(self) -> int:
        return self.rx.fileno()

    def close(self) -> None:
        self.rx.close()
        self.tx.close()

    # --- send -------------------------------------------------------------------

    def send(self, payload: bytes) -> bool:
        """One pfsync frame (from its header on); the kernel adds the IP header."""
        v6 = self.af == socket.AF_INET6
        addr: tuple[Any, ...] = (self.dest, 0, 0, self.ifindex) if v6 else (self.dest, 0)
        try:
            self.tx.sendto(payload, addr)
        except OSError:
            self.counters.txerr += 1
            return False
        self.counters.tx += 1
        return True

    # --- receive ----------------------------------------------------------------

    def receive(self, limit: int = MAX_FRAMES_PER_WAKEUP) -> list[SyncFrame]:
        """Up to `limit` frames that passed the interface and TTL checks."""
        out: list[SyncFrame] = []
        c = self.counters
        v6 = self.af == socket.AF_INET6
        for _ in range(limit):
            try:
                data, anc, _flags, addr = self.rx.recvmsg(65535, 256)
            except (BlockingIOError, InterruptedError):
                break
            c.rx += 1
            ifindex = -1
            ttl = -1
            for level, ctype, cdata in anc:
                if not v6 and level == socket.IPPROTO_IP and ctype == IP_PKTINFO:
                    ifindex = struct.unpack_from("i", cdata)[0]
                elif v6 and level == socket.IPPROTO_IPV6 and ctype == IPV6_PKTINFO:
                    ifindex = struct.unpack_from("16si", cdata)[1]
                elif v6 and level == socket.IPPROTO_IPV6 and ctype == IPV6_HOPLIMIT:
                    ttl = struct.unpack_from("i", cdata)[0]
            if v6:
                payload = data
                src = addr[0].split("%", 1)[0]
            else:
                if len(data) < 20 or data[0] >> 4 != 4 or (data[0] & 0x0F) * 4 > len(data):
                    c.hdrops += 1
                    continue
                hl = (data[0] & 0x0F) * 4
                ttl = data[8]
                src = socket.inet_ntoa(data[12:16])
                payload = data[hl:]
            if ifindex != self.ifindex:
                c.badif += 1
                continue
            if ttl != PFSYNC_TTL:
                c.badttl += 1
                continue
            out.append(SyncFrame(payload, src, ttl))
        return out


@dataclass
class SyncSet:
    """Zero or more sync sockets (IPv4 and/or IPv6) seen by the loop as one transport."""

    sockets: list[SyncSocket] = field(default_factory=list)

    def send(self, payload: bytes) -> None:
        for s in self.sockets:
            s.send(payload)

    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for s in self.sockets:
            for k, v in s.counters.as_dict().items():
                total[k] = total.get(k, 0) + v
        return total

    def close(self) -> None:
        for s in self.sockets:
            s.close()
