"""pfsync between the workers of one firewall (`daemon --workers N`).

Each worker is a pfsync node of its own (creator id hostid+index): it sends every frame
it makes to the sync link, as any node does, and also to its siblings over this bus, so
every worker holds the whole state table — its own states, its siblings' and the peers'
(which every worker's raw socket receives anyway). The kernel's `--queue-balance` hash
keeps both directions of an address pair on one worker, but a packet about a flow can
still come from another address pair (an ICMP error from a router on the path, say), and
a restarted worker must find its flows' states without waiting for a peer.

The bus is one unix datagram socket per worker in the abstract namespace, which is per
network namespace, named after the base queue: `pfcluster-q<queue>-w<index>`. Datagrams
keep frame boundaries; a sibling whose buffer is full loses the frame (counted), exactly
what a lossy sync link does, and pfsync's update requests repair it. Only the siblings'
own addresses are accepted as senders, so another local process cannot inject frames
(binding one of those names first would stop a worker from starting instead).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from pfcluster.io.syncsock import set_rcvbuf

MAX_FRAME = 65535
RCVBUF = 4 << 20
MAX_FRAMES_PER_WAKEUP = 256


def bus_name(queue: int, index: int) -> str:
    return f"\0pfcluster-q{queue}-w{index}"


@dataclass
class BusCounters:
    sent: int = 0
    send_dropped: int = 0  # the sibling is down or its buffer is full
    received: int = 0
    foreign: int = 0  # a datagram from an address that is not a sibling's

    def as_dict(self) -> dict[str, int]:
        return {f"bus_{k}": v for k, v in self.__dict__.items()}


class SiblingBus:
    """Frames to and from the other workers of this firewall."""

    def __init__(self, queue: int, index: int, count: int) -> None:
        if not 0 <= index < count:
            raise ValueError(f"worker index {index} is not 0..{count - 1}")
        self.index = index
        self.name = bus_name(queue, index)
        self.siblings = [bus_name(queue, j) for j in range(count) if j != index]
        self._accepted = {name.encode() for name in self.siblings}
        self.counters = BusCounters()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.bind(self.name)
            self.sock.setblocking(False)
            set_rcvbuf(self.sock, RCVBUF)
        except OSError:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: bytes) -> None:
        c = self.counters
        for name in self.siblings:
            try:
                self.sock.sendto(frame, name)
                c.sent += 1
            except OSError:  # not started yet, restarting, or its buffer is full
                c.send_dropped += 1

    def receive(self, limit: int = MAX_FRAMES_PER_WAKEUP) -> list[bytes]:
        """Up to `limit` frames from siblings (bounded, so the data plane is not starved)."""
        frames: list[bytes] = []
        c = self.counters
        accepted = self._accepted
        recvfrom = self.sock.recvfrom
        for _ in range(limit):
            try:
                data, addr = recvfrom(MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                break
            sender = addr.encode() if isinstance(addr, str) else addr
            if sender not in accepted:
                c.foreign += 1
                continue
            c.received += 1
            frames.append(data)
        return frames

    def close(self) -> None:
        self.sock.close()
