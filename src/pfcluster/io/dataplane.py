"""The data plane: NFQUEUE packets through pf, in mini-batches, with pfsync deferral.

One queue serves the three iptables hooks; the queue reports which hook queued the packet
(NF_INET_LOCAL_IN 1, FORWARD 2, LOCAL_OUT 3), so no second queue is needed to tell a
forwarded packet from a local one. A forwarded packet is tested `in` on its input
interface and then `out` on its output interface by the router step shared with the
simulation and replay (`pf.router.route`); a packet to the firewall gets only the `in`
test, one from it only the `out` test.

A translating ruleset (`split_hooks`): the daemon's iptables rules queue at PREROUTING
(NF_INET_PRE_ROUTING 0) for the `in` test and at FORWARD/LOCAL_OUT for the `out` test,
since a rewritten destination must be routed anew; a translated packet's verdict
carries the rewritten packet (so the whole packet is copied: `copy_range` 65535), and a
packet the `in` test tagged carries its tag to the `out` test in its mark.

The queue is read through our own nfnetlink_queue binding (io/nfq.py): only the first
`copy_range` bytes of a packet are copied to us (pf reads headers only; the kernel
forwards its own skb on a plain verdict) and parsed into one reused descriptor. Each
packet is decided as it is read; after a mini-batch (32 packets or 24 KiB of wire
bytes) the pfsync engine's `end_of_batch` runs once (one frame carries the updates of a
whole mini-batch, like pfsync's per-softnet flush), the loop exchanges frames with the
peers, and then the mini-batch's verdicts leave in one sendmsg (a run of accepts as one
batch verdict): a peer on a split path learns of our data before the data leaves.

Deferral: the packet id is the handle the engine keeps until a `Released` event says
accept or drop; the binding never lets a batch verdict cover a held id. The kernel keeps
the packet meanwhile (bounded by the queue length, which is why the engine's defer limit
must stay below it).

Fragments (`set reassemble yes`, the default): each IP fragment is held the same way
while pf/frag.py collects its datagram's offsets; once the datagram is whole it is
tested once (the first fragment's headers, the datagram's length) and every fragment
gets that verdict; an overlap, a timeout or a limit drops them all. The kernel then
forwards the original fragments, not a rebuilt datagram as pf would. A datagram whose
verdict would translate it (NAT) is dropped (fragments cannot carry a rewrite of ports
they do not hold); scrub options are not applied to fragments; pfsync deferral does not
hold a fragmented datagram's new state. `set reassemble no`: fragments meet the
rules one by one, as before.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pfcluster.io.iptables import GENERATED_MARK
from pfcluster.io.nfq import DEFAULT_COPY_RANGE, NfQueue, QueuedPacket
from pfcluster.packet import Packet, parse_into
from pfcluster.pf.constants import PFTM
from pfcluster.pf.frag import FragCache, Release
from pfcluster.pf.route import TARGET_MARK_BITS, resolve, verdict_route
from pfcluster.pf.router import ROUTE_BLOCK, ROUTE_DEFER, route
from pfcluster.pfsync.events import Released

log = logging.getLogger("pfcluster.dataplane")

NF_INET_PRE_ROUTING = 0
# pf tags between the two hooks of a translating daemon: the upper half of the skb mark
# (the lower half is left as it was: GENERATED_MARK and the user's own marks live there)
TAG_SHIFT = 16
LOW_MARK = (1 << TAG_SHIFT) - 1
NF_INET_LOCAL_IN = 1
NF_INET_FORWARD = 2
NF_INET_LOCAL_OUT = 3
QUEUE_MAXLEN = 4096
SO_MARK = getattr(socket, "SO_MARK", 36)
# How often the kernel's own drop counters (queue full, socket full) are looked at.
KERNEL_STATS_EVERY = 5.0


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
    translated: int = 0
    translate_short: int = 0
    routed: int = 0  # packets marked for a route-to/reply-to target
    route_unknown: int = 0  # dropped: a peer's state names a target our rules do not
    reply_errors: int = 0
    batches: int = 0
    max_batch: int = 0
    errors: int = 0
    frag_held: int = 0  # fragments held for reassembly
    frag_datagrams: int = 0  # datagrams reassembled and tested
    frag_passed: int = 0  # fragments released with an accept
    frag_dropped: int = 0  # fragments released with a drop (rules, overlap, timeout, limits)
    frag_translate: int = 0  # datagrams dropped: their verdict would rewrite them
    # the binding's and the kernel's counters are read from here when asked for
    queue: Any = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, int]:
        d = {k: v for k, v in self.__dict__.items() if k != "queue"}
        q = self.queue
        if q is not None:
            d.update(q.counters())
            k = q.kernel_stats()
            for key in ("queue_total", "queue_dropped", "user_dropped"):
                if key in k:
                    d[f"kernel_{key}"] = k[key]
        return d


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
    """Binds the queue and runs its packets through `filt` (a pf Filter) and `engine`."""

    queue_num: int
    filt: Any
    engine: Any | None = None
    replies: ReplySender | None = None
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
    # Bytes of each packet copied from the kernel (headers; see io/nfq.py).
    copy_range: int = DEFAULT_COPY_RANGE
    # NFQA_CFG_F_FAIL_OPEN: the kernel accepts what it cannot queue (queue or socket full).
    fail_open: bool = False
    # Packets read per wakeup at most, so the control socket and timers get their turn.
    budget: int = 4096
    # the `in` test at PREROUTING, the `out` test at FORWARD/LOCAL_OUT (translation)
    split_hooks: bool = False
    # --pflog: the writer of logged packets (io/pflog.py), or None
    pflog: Any = None
    # route-to/reply-to/dup-to targets (pf/route.py; io/policyroute.py installed their
    # rules and tables, io/iptables.py dup-to's TEE): the `in` half marks what goes to
    # one. Empty: no routing.
    route_targets: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.dispatch is None:
            self.dispatch = self._apply_releases
        self._ifnames: dict[int, str] = {}
        # rewritten packets of held (deferred) ids, sent with their release
        self._held_payload: dict[int, bytes] = {}
        self.pending = 0  # deferred packets whose verdict the engine still holds
        self.nfq: NfQueue | None = NfQueue(self.queue_num, copy_range=self.copy_range,
                                           max_len=self.max_len, fail_open=self.fail_open)
        self.verdicts = self.nfq.verdicts
        self.counters.queue = self.nfq
        self._scratch = Packet()
        self._in_batch = 0  # packets decided since the last mini-batch end
        self._batch_bytes = 0
        self._now = 0.0
        self._deciding = False
        self._kernel_seen: dict[str, int] = {}
        self._kernel_next = 0.0
        self.frags: FragCache | None = None
        self._frag_rs: Any = None  # the ruleset the cache's limits came from

    def _frag_cache(self) -> FragCache | None:
        """The reassembly cache when the loaded ruleset reassembles (limits follow a
        reload; `set reassemble no` drops what was held)."""
        rs = getattr(self.filt, "ruleset", None)
        if rs is self._frag_rs:
            return self.frags
        self._frag_rs = rs
        if rs is None or not rs.reassemble:
            if self.frags is not None:
                for rel in self.frags.flush():
                    self._frag_drop(rel)
                self.frags = None
            return None
        timeout = float(rs.timeouts[PFTM.FRAG])
        if self.frags is None:
            self.frags = FragCache(rs.frag_limit, timeout)
        else:
            self.frags.limit = max(1, rs.frag_limit)
            self.frags.timeout = timeout
        return self.frags

    def expire_frags(self, now: float) -> None:
        """Drop datagrams not completed within `set timeout frag` (called by the loop)."""
        fc = self.frags
        if fc is not None and len(fc):
            rels = fc.expire(now)
            for rel in rels:
                self._frag_drop(rel)
            if rels and not self._deciding and self.nfq is not None:
                self.nfq.flush()

    def _frag_drop(self, rel: Release) -> None:
        c = self.counters
        if rel.reason is not None and hasattr(self.filt, "counters"):
            self.filt.counters[rel.reason] += len(rel.tokens)
        pid: Any
        for pid in rel.tokens:
            self.verdicts.release(pid, False)
        c.frag_dropped += len(rel.tokens)
        c.frag_held -= len(rel.tokens)
        c.blocked += len(rel.tokens)

    def _frag_pass(self, rel: Release) -> None:
        c = self.counters
        pid: Any
        for pid in rel.tokens:
            self.verdicts.release(pid, True)
        c.frag_passed += len(rel.tokens)
        c.frag_held -= len(rel.tokens)
        c.passed += len(rel.tokens)

    def _frag_hold(self, fc: FragCache, qp: QueuedPacket, pkt: Packet, in_if: str | None,
                   out_if: str | None, tag: int, now: float) -> None:
        """Hold a fragment; if it completes its datagram, decide the datagram."""
        self.verdicts.hold(qp.packet_id)
        self.counters.frag_held += 1
        for rel in fc.add(pkt, qp.packet_id, now):
            whole = rel.packet
            if whole is None:
                self._frag_drop(rel)
                continue
            self.counters.frag_datagrams += 1
            rv = route(self.filt, in_if, out_if, whole, now, None, None, tag, rewrite=False)
            xlate = False
            for v in (rv.v_in, rv.v_out):
                if v is not None:
                    xlate = xlate or v.xlate is not None
                    if v.log or v.reply:
                        self._emit(v)
            if rv.action == ROUTE_BLOCK:
                self._frag_drop(Release(rel.tokens, None, None))
            elif xlate:
                self.counters.frag_translate += 1
                self._frag_drop(Release(rel.tokens, None, None))
            else:
                self._frag_pass(rel)

    def fileno(self) -> int:
        assert self.nfq is not None
        return self.nfq.fileno()

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

    # --- the mini-batches ---------------------------------------------------------

    def on_readable(self) -> int:
        """Read the queue (up to `budget` packets), deciding in mini-batches; returns
        the packets decided."""
        assert self.nfq is not None
        before = self.counters.packets
        self._now = self.clock()
        # the last mini-batch's verdicts wait for _end_batch: its pfsync frame goes first
        self.nfq.drain(self._on_packet, self.budget, flush=False)
        self._end_batch()
        if self._now >= self._kernel_next:
            self._check_kernel_drops()
        return self.counters.packets - before

    def _on_packet(self, qp: QueuedPacket) -> None:
        if not self._in_batch:
            # a new mini-batch: what the peers sent while its packets were queued is
            # applied before they are decided, as pf's softnet order has it (ecmp4.md)
            if self.between_batches is not None:
                self.between_batches()
            self._now = self.clock()
        self._deciding = True
        try:
            self._decide(qp, self._now)
        except Exception:
            # a core bug on one packet must not take the firewall down (which would
            # remove its rules): drop that packet, count and log it
            self.counters.errors += 1
            if self.counters.errors <= 10:
                log.exception("packet dropped after an internal error")
            self.verdicts.drop(qp.packet_id)
        finally:
            self._deciding = False
        self._in_batch += 1
        self._batch_bytes += qp.wire_len
        if self._in_batch >= self.mini_batch or self._batch_bytes >= self.mini_batch_bytes:
            self._end_batch()

    def _end_batch(self) -> None:
        """pfsync's flush once for the mini-batch, then its verdicts in one message.

        The updates leave before the packets they describe: on a split path the peer
        forwards the receiver's ACKs for this data, and an ACK that reaches it before our
        update is checked against an old edge (state-mismatch). With the verdicts first,
        the kernel forwarded the whole mini-batch (and the receiver acknowledged it,
        in the same softirq) before our frame was even built."""
        n = self._in_batch
        if n:
            self._in_batch = 0
            self._batch_bytes = 0
            c = self.counters
            c.batches += 1
            if n > c.max_batch:
                c.max_batch = n
            if self.engine is not None:
                self.engine.end_of_batch(self._now)
            if self.between_batches is not None:
                self.between_batches()
        if self.nfq is not None:
            self.nfq.flush()

    def _decide(self, qp: QueuedPacket, now: float) -> None:
        c = self.counters
        c.packets += 1
        verdicts = self.verdicts
        packet_id = qp.packet_id
        try:
            pkt = parse_into(self._scratch, qp.payload, qp.wire_len)
        except ValueError:  # MalformedPacket is a ValueError
            c.malformed += 1
            c.blocked += 1
            verdicts.drop(packet_id)
            return
        hook = qp.hook
        names = self._ifnames
        if hook == NF_INET_FORWARD:
            in_if = None if self.split_hooks else names.get(qp.indev) or self.ifname(qp.indev)
            out_if = names.get(qp.outdev) or self.ifname(qp.outdev)
        elif hook == NF_INET_LOCAL_OUT:
            in_if = None
            out_if = names.get(qp.outdev) or self.ifname(qp.outdev)
        else:  # LOCAL_IN, or PRE_ROUTING when translating
            in_if = names.get(qp.indev) or self.ifname(qp.indev)
            out_if = None
        engine = self.engine
        filt = self.filt
        # Two hooks (translation): the `in` half's pf tag reaches the `out` half in the
        # upper 16 bits of the packet's mark, set by the PREROUTING verdict below
        tag = qp.mark >> TAG_SHIFT if self.split_hooks and in_if is None else 0
        if pkt.fragment:
            fc = self._frag_cache()
            if fc is not None:
                self._frag_hold(fc, qp, pkt, in_if, out_if, tag, now)
                return
        rv = route(filt, in_if, out_if, pkt, now, engine, packet_id, tag)
        mark = None
        if self.split_hooks and out_if is None and filt.tagging \
                and filt.pkt_tag != qp.mark >> TAG_SHIFT:
            mark = (qp.mark & LOW_MARK) | (filt.pkt_tag << TAG_SHIFT)
        if self.route_targets and out_if is None and rv.v_in is not None \
                and rv.action != ROUTE_BLOCK:
            vr = verdict_route(rv.v_in, pkt, filt.states.by_key)
            if vr is not None:
                target = vr[1]
                if not resolve(target, self.route_targets):
                    # fail closed: not where the rules said, so nowhere
                    c.route_unknown += 1
                    c.blocked += 1
                    verdicts.drop(packet_id)
                    return
                base = qp.mark if mark is None else mark
                mark = (base & ~TARGET_MARK_BITS) | target.mark_for(vr[0])
                c.routed += 1
        v = rv.v_in
        if v is not None and (v.log or v.reply):
            self._emit(v)
        v = rv.v_out
        if v is not None and (v.log or v.reply):
            self._emit(v)
        if self.pflog is not None:
            self.pflog.route(rv, in_if, out_if, qp.payload, qp.wire_len, now)
        action = rv.action
        if action == ROUTE_BLOCK:
            c.blocked += 1
            verdicts.drop(packet_id)
            return
        if engine is not None and engine.pending_releases():
            # this packet released a held one of its state: that one goes first
            dispatch = self.dispatch
            assert dispatch is not None
            dispatch(engine.take_events())
        payload = rv.payload
        if action == ROUTE_DEFER:
            c.deferred += 1
            self.pending += 1
            verdicts.hold(packet_id)
            if payload is not None:
                self._held_payload[packet_id] = bytes(payload)
            return
        if payload is None and mark is None:
            c.passed += 1
            verdicts.accept(packet_id)
        elif payload is not None and len(qp.payload) < qp.wire_len:
            # a partial copy cannot carry a rewrite: the kernel would cut the packet
            # to what we send back (nfqnl_mangle)
            c.blocked += 1
            c.translate_short += 1
            verdicts.drop(packet_id)
        else:
            c.passed += 1
            if payload is not None:
                c.translated += 1
            verdicts.accept_payload(packet_id, payload, mark)

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
        """The verdict of a deferred packet the engine let go (ack, timeout, update);
        `handle` is its packet id. Sent at once unless a mini-batch is being decided
        (then with the mini-batch's verdicts, before the releasing packet's own)."""
        c = self.counters
        self.pending -= 1
        packet_id = int(handle)
        payload = self._held_payload.pop(packet_id, None) if self._held_payload else None
        self.verdicts.release(packet_id, accept, payload)
        if accept:
            c.released_pass += 1
        else:
            c.released_drop += 1
        if not self._deciding and self.nfq is not None:
            self.nfq.flush()

    def _apply_releases(self, events: list[Any]) -> None:
        """Without a loop to dispatch to (tests, benchmarks): releases only."""
        for ev in events:
            if isinstance(ev, Released):
                self.apply_release(ev.handle, ev.accept)

    def _check_kernel_drops(self) -> None:
        """The kernel counts what it could not queue (queue full: queue_dropped; our
        socket full: user_dropped); log growth, at most every KERNEL_STATS_EVERY s."""
        assert self.nfq is not None
        self._kernel_next = self._now + KERNEL_STATS_EVERY
        stats = self.nfq.kernel_stats()
        for key, what in (("queue_dropped", "queue full"), ("user_dropped", "socket full")):
            new = stats.get(key, 0) - self._kernel_seen.get(key, stats.get(key, 0))
            if new > 0:
                log.warning("NFQUEUE %d: %d packets %s by the kernel (%s)", self.queue_num,
                            new, "accepted unfiltered" if self.fail_open else "dropped", what)
        self._kernel_seen = stats

    def close(self) -> None:
        if self.nfq is not None:
            self.nfq.close()
            self.nfq = None
