"""The data plane: NFQUEUE packets through pf, in batches, with pfsync deferral.

One queue serves the three iptables hooks; netfilterqueue reports which hook queued the
packet (`Packet.hook`: NF_INET_LOCAL_IN 1, FORWARD 2, LOCAL_OUT 3), so no second queue
is needed to tell a forwarded packet from a local one. A forwarded packet is tested `in`
on its input interface and then `out` on its output interface by the router step shared
with the simulation and replay (`pf.router.route`); a packet to the firewall gets only
the `in` test, one from it only the `out` test.

Batching: the netfilterqueue callback only records (packet, payload) — the payload must be
copied inside the callback because the library frees its buffer afterwards. When
`run(block=False)` has drained the netlink socket, the batch is decided, verdicts are
issued, then the pfsync engine's `end_of_batch` runs once (so one frame carries the
updates of a whole batch, like pfsync's per-softnet flush).

Deferral: a verdict can be given after the callback returned (the Packet keeps the queue
handle and packet id), so a deferred packet is simply kept in the engine as its opaque
handle until a `Released` event says accept or drop. The kernel keeps the packet meanwhile
(bounded by the queue length, which is why the engine's defer limit must stay below it).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pfcluster.io.iptables import GENERATED_MARK
from pfcluster.pf.router import ROUTE_BLOCK, ROUTE_DEFER, route
from pfcluster.pfsync.events import Released

log = logging.getLogger("pfcluster.dataplane")

NF_INET_LOCAL_IN = 1
NF_INET_FORWARD = 2
NF_INET_LOCAL_OUT = 3
QUEUE_MAXLEN = 4096
SO_MARK = getattr(socket, "SO_MARK", 36)


@dataclass
class DataplaneCounters:
    packets: int = 0
    passed: int = 0
    blocked: int = 0
    malformed: int = 0
    deferred: int = 0
    released_pass: int = 0
    released_drop: int = 0
    replies: int = 0
    reply_errors: int = 0
    batches: int = 0
    max_batch: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class ReplySender:
    """Raw sockets for pf's own packets (RST, ICMP unreachable, challenge ACK): the whole
    IP packet is built by the core, marked so our iptables chain does not queue it."""

    def __init__(self, mark: int = GENERATED_MARK) -> None:
        self.v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.v4.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        self.v6: socket.socket | None
        try:
            # AF_INET6 + IPPROTO_RAW means "header included" on Linux.
            self.v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except OSError:
            self.v6 = None
        for s in (self.v4, self.v6):
            if s is None:
                continue
            s.setblocking(False)
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            except OSError:
                pass

    def send(self, packet: bytes) -> bool:
        if not packet:
            return False
        version = packet[0] >> 4
        try:
            if version == 4 and len(packet) >= 20:
                self.v4.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))
                return True
            if version == 6 and len(packet) >= 40 and self.v6 is not None:
                dst = socket.inet_ntop(socket.AF_INET6, packet[24:40])
                self.v6.sendto(packet, (dst, 0))
                return True
        except OSError as exc:
            log.debug("reply not sent: %s", exc)
        return False

    def close(self) -> None:
        self.v4.close()
        if self.v6 is not None:
            self.v6.close()


@dataclass
class Dataplane:
    """Binds the queue and runs batches through `filt` (a pf Filter) and `engine`."""

    queue_num: int
    filt: Any
    engine: Any | None = None
    replies: ReplySender | None = None
    parse: Callable[[bytes], Any] | None = None
    max_len: int = QUEUE_MAXLEN
    clock: Callable[[], float] = time.monotonic
    counters: DataplaneCounters = field(default_factory=DataplaneCounters)
    log_verdicts: bool = True
    # Packets decided per pfsync flush. pfsync's softnet run covers what one interrupt
    # brought in; draining a whole NFQUEUE burst (thousands of packets under load) first
    # would hold every state update, and every verdict, for tens of milliseconds, which
    # on a split path is more than pf's window fuzz allows for.
    mini_batch: int = 32
    # ...and at most this many bytes: a peer checks the ACKs it forwards against the data
    # we forwarded, within pf's 67035-byte fuzz, so our updates must trail our data by
    # well under that (16 full-size segments), while ACK-only batches may run longer.
    mini_batch_bytes: int = 24 * 1024
    # Called before and after each mini-batch: the loop sends the engine's frames and reads
    # what the peers sent meanwhile, so both firewalls' views stay within a mini-batch of
    # each other, and a peer's update that reached us before a packet of the batch (while
    # the batch was being read) is applied before that packet is decided, as pf's softnet
    # order does (docs/ecmp4.md).
    between_batches: Callable[[], None] | None = None
    # Where the engine's events go (the daemon's dispatcher); by default only the held
    # packets' verdicts are applied.
    dispatch: Callable[[list[Any]], None] | None = None

    def __post_init__(self) -> None:
        if self.dispatch is None:
            self.dispatch = self._apply_releases
        from netfilterqueue import NetfilterQueue

        if self.parse is None:
            from pfcluster.packet import parse

            self.parse = parse
        self._batch: list[tuple[Any, bytes]] = []
        self._ifnames: dict[int, str] = {}
        self.pending = 0  # deferred packets whose verdict the engine still holds
        self.nfq = NetfilterQueue()
        batch = self._batch
        append = batch.append
        limit = self.mini_batch
        byte_limit = self.mini_batch_bytes
        self._held_bytes = 0

        def on_packet(p: Any) -> None:
            # The callback runs inside nfq_handle_packet; the payload buffer dies with it.
            payload = p.get_payload()
            append((p, payload))
            self._held_bytes += len(payload)
            if len(batch) >= limit or self._held_bytes >= byte_limit:
                self._decide_batch()

        self.nfq.bind(self.queue_num, on_packet, max_len=self.max_len)

    def fileno(self) -> int:
        return int(self.nfq.get_fd())

    def ifname(self, index: int) -> str:
        """ifindex -> name, cached; interfaces renamed or created later are looked up
        again on a miss, and an unknown index keeps its number as a name."""
        name = self._ifnames.get(index)
        if name is None:
            try:
                name = socket.if_indextoname(index)
            except OSError:
                return f"if{index}"
            self._ifnames[index] = name
        return name

    # --- the batch ---------------------------------------------------------------

    def on_readable(self) -> int:
        """Drain the queue socket in mini-batches; returns the packets decided."""
        before = self.counters.packets
        self.nfq.run(block=False)
        self._decide_batch()
        return self.counters.packets - before

    def _decide_batch(self) -> None:
        """Decide what the callback collected, then flush pfsync once for all of it."""
        self._held_bytes = 0
        batch = self._batch
        n = len(batch)
        if not n:
            return
        if self.between_batches is not None:
            self.between_batches()
        now = self.clock()
        try:
            for pkt, payload in batch:
                try:
                    self._decide(pkt, payload, now)
                except Exception:
                    # a core bug on one packet must not take the firewall down (which
                    # would remove its rules): drop that packet, count and log it
                    self.counters.errors += 1
                    if self.counters.errors <= 10:
                        log.exception("packet dropped after an internal error")
                    with contextlib.suppress(RuntimeError):
                        pkt.drop()
        finally:
            batch.clear()
        c = self.counters
        c.batches += 1
        if n > c.max_batch:
            c.max_batch = n
        if self.engine is not None:
            self.engine.end_of_batch(now)
        if self.between_batches is not None:
            self.between_batches()

    def _decide(self, pkt: Any, payload: bytes, now: float) -> None:
        c = self.counters
        c.packets += 1
        try:
            parsed = self.parse(payload)  # type: ignore[misc]
        except ValueError:  # MalformedPacket is a ValueError
            c.malformed += 1
            c.blocked += 1
            pkt.drop()
            return
        hook = pkt.hook
        in_if = None if hook == NF_INET_LOCAL_OUT else self.ifname(pkt.indev)
        out_if = None if hook == NF_INET_LOCAL_IN else self.ifname(pkt.outdev)
        engine = self.engine
        rv = route(self.filt, in_if, out_if, parsed, now, engine, pkt)
        for v in rv.verdicts:
            self._emit(v)
        if rv.action == ROUTE_BLOCK:
            c.blocked += 1
            pkt.drop()
            return
        if engine is not None and engine.pending_releases():
            # this packet released a held one of its state: that one goes first
            dispatch = self.dispatch
            assert dispatch is not None
            dispatch(engine.take_events())
        if rv.action == ROUTE_DEFER:
            c.deferred += 1
            self.pending += 1
            return
        c.passed += 1
        pkt.accept()

    def _emit(self, v: Any) -> None:
        """pf's log lines and its own reply packet (RST, unreachable, challenge ACK)."""
        if v.log and self.log_verdicts:
            for line in v.log:
                log.info("%s", line)
        if v.reply:
            self._reply(v.reply)

    def _reply(self, packet: bytes) -> None:
        if self.replies is not None and self.replies.send(packet):
            self.counters.replies += 1
        else:
            self.counters.reply_errors += 1

    def apply_release(self, handle: Any, accept: bool) -> None:
        """The verdict of a deferred packet the engine let go (ack, timeout, update)."""
        c = self.counters
        self.pending -= 1
        try:
            if accept:
                handle.accept()
                c.released_pass += 1
            else:
                handle.drop()
                c.released_drop += 1
        except RuntimeError as exc:  # verdict already given / queue gone
            log.warning("deferred packet release failed: %s", exc)

    def _apply_releases(self, events: list[Any]) -> None:
        """Without a loop to dispatch to (tests, benchmarks): releases only."""
        for ev in events:
            if isinstance(ev, Released):
                self.apply_release(ev.handle, ev.accept)

    def close(self) -> None:
        self.nfq.unbind()
