"""The pfsync engine, sans I/O: pf state events and peer frames in; frames to send and
events (released packets, sync_ok changes, log lines) out.

It follows the 2009 rewrite the thesis describes, composed from one module per concept:
- `queues`: one queue per message type (a table), frames built only when sent;
- pacing (here): a frame leaves one second after its first message, when full, when a
  state reaches `maxupd` updates, or at `end_of_batch` when immediate work was queued
  during the batch (the softnet handler of the thesis);
- split-path detection (here): a local update to a state a peer touched less than two
  seconds ago is immediate, and so is one to a state that was split when both sides
  went quiet (`_resumed_split`);
- `defer`: the first packet of a new `out` state held until a peer's INS_ACK;
- `bulk`: the bulk update, both sides, as state machines;
- `merge`: how a peer's update is merged (per edge, or the thesis' whole-or-nothing);
- the protocol version as a policy object (`policy.V5Policy`, `legacy.V4Policy`):
  sizes, builders, frame layout, decoding. The engine never asks which it has.

The API, in the manner of aioquic: `receive(frame, now)`, `timer(now)` when
`next_deadline()` passes, `end_of_batch(now)` after each burst of work; then send what
`take_output()` returns and act on `take_events()`. `attach(filter, ...)` makes an
engine that hears the filter's state events.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pfcluster.pf.constants import (
    IPPROTO_PFSYNC,
    PF_TCPS_PROXY_DST,
    PFSTATE_ACK,
    PFSTATE_NOSYNC,
    PFTM_MAX,
)
from pfcluster.pf.filter import Filter
from pfcluster.pf.state import SYNC_NONE, State
from pfcluster.pf.tcp import NEVER
from pfcluster.pfsync import legacy, wire
from pfcluster.pfsync.bulk import BUS_END, BUS_START, BulkRequest, BulkSend
from pfcluster.pfsync.convert import (
    STATE_FIELDS,
    ImportError_,
    pack_state,
    seconds_left,
    state_importer,
)
from pfcluster.pfsync.defer import Deferrals
from pfcluster.pfsync.events import Event, LogLine, Released, SyncOk
from pfcluster.pfsync.layout import PEER_STATE, PEER_VALUES
from pfcluster.pfsync.merge import MERGE_RULES
from pfcluster.pfsync.policy import Policy, V5Policy
from pfcluster.pfsync.queues import (
    Q_DEL,
    Q_IACK,
    Q_INS,
    Q_UPD,
    Q_UPD_C,
    QUEUE_ACTION,
    QUEUES,
    queue_name,
    queue_order,
)

log = logging.getLogger("pfcluster.pfsync")

DEFAULT_TTL = 255
# Drop reasons, named as pfsyncstats names them.
# creator ids whose last frame time is kept (a hostile peer could name many)
MAX_PEERS = 256

STAT_NAMES = (
    "ipackets", "opackets", "obytes", "ibytes", "badif", "badttl", "hdrops", "badver",
    "badlen", "badact", "badval", "badauth", "badstate", "badproto", "stale", "stale_echo",
    "updates_immediate", "split_immediate", "split_resumed", "fin_acked", "maxupd_sends", "pace_sends", "full_sends",
    "batch_sends", "ins_received", "upd_received", "updc_received", "del_received",
    "clr_received", "iack_received", "iack_sent", "ureq_sent", "ureq_received",
    "bulk_requests_sent", "bulk_requests_received", "bulk_states_sent", "bulk_states_received",
    "bulk_starts_received", "bulk_ends_received", "bulk_done", "bulk_gave_up",
    "deferred", "defer_acked", "defer_update", "defer_timeout", "defer_overlimit", "defer_dropped",
    "import_failed", "tdb_received",
)




class EngineConfig:
    """Knobs of one pfsync instance (the ifconfig pfsync0 options and a few of ours)."""

    __slots__ = (
        "answers_bulk",
        "bulk_frames_per_tick",
        "bulk_max_tries",
        "bulk_retry",
        "bulk_tick",
        "defer",
        "defer_limit",
        "defer_timeout",
        "dialect",
        "echo_holdoff",
        "maxupd",
        "merge",
        "mtu",
        "pace",
        "protocol",
        "split_window",
    )

    def __init__(
        self,
        dialect: str = "openbsd45",
        protocol: str = "v5",
        maxupd: int = 128,
        defer: bool = False,
        defer_timeout: float = 0.020,
        defer_limit: int = 128,
        mtu: int = 1500,
        pace: float = 1.0,
        split_window: float = 2.0,
        bulk_retry: float = 5.0,
        bulk_max_tries: int = 12,
        bulk_tick: float = 0.01,
        # Bulk pacing: a burst of full frames per timer tick, the walk resumed next tick
        # (the loop stays responsive between bursts). OpenBSD sends one MTU-sized frame
        # per timeout (20 ms today, one tick before 2023): ~250 states/s at a 1500 MTU,
        # over an hour for a million states. 128 frames per 10 ms (~64k states/s at most)
        # keeps the shape and lets a million states cross the lab in about 25 s
        # without loss into the receiver's 16 MB socket buffer (lab bulk).
        bulk_frames_per_tick: int = 128,
        echo_holdoff: float = 0.1,
        merge: str = "edges",
        answers_bulk: bool = True,
    ) -> None:
        if protocol not in ("v5", "v4"):
            raise ValueError(f"protocol must be v5 or v4, not {protocol!r}")
        if dialect not in wire.DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}; one of {', '.join(wire.DIALECTS)}")
        if merge not in MERGE_RULES:
            raise ValueError(f"merge must be one of {', '.join(MERGE_RULES)}, not {merge!r}")
        if not 0 < maxupd <= 255:
            raise ValueError("maxupd must be 1..255")
        if mtu < 576:
            raise ValueError("sync MTU must be at least 576")
        self.dialect = dialect
        self.protocol = protocol
        self.maxupd = maxupd
        self.defer = defer
        self.defer_timeout = defer_timeout
        self.defer_limit = defer_limit
        self.mtu = mtu
        self.pace = pace
        self.split_window = split_window
        self.bulk_retry = bulk_retry
        self.bulk_max_tries = bulk_max_tries
        self.bulk_tick = bulk_tick
        self.bulk_frames_per_tick = bulk_frames_per_tick
        self.echo_holdoff = echo_holdoff
        self.merge = merge
        # the workers of one firewall each hold the whole table: one answer is enough
        self.answers_bulk = answers_bulk


class Engine:
    """One pfsync instance bound to one Filter (see `attach`)."""

    def __init__(self, filt: Filter, config: EngineConfig | None = None, now: float = 0.0,
                 **kw: Any) -> None:
        self.filter = filt
        self.config = cfg = config or EngineConfig(**kw)
        self.dialect = cfg.dialect
        self.policy: Policy = legacy.V4Policy() if cfg.protocol == "v4" else V5Policy(cfg.dialect)
        policy = self.policy
        self._merge_rule = policy.merge_rule(cfg.merge)
        self.counters: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self.frames_by_action: dict[str, int] = {}
        self.msgs_by_action: dict[str, int] = {}
        self.bytes_by_action: dict[str, int] = {}
        self._size = policy.sizes
        self._qsize = [self._size[q.action] for q in QUEUES]
        self._order = queue_order(self.dialect)
        self._queues: list[dict[State, None]] = [{} for _ in QUEUES]
        self._ureq: dict[tuple[int, int], None] = {}
        # idle split states resumed by a local update: split until this time
        self._resumed: dict[State, float] = {}
        self._plus: list[tuple[str, Any]] = []
        self._len = policy.min_frame
        self._deadline: float | None = None
        self._immediate = False
        self._pending_kind: str | None = None  # the one message type a v4 frame holds
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self.deferrals = Deferrals(cfg.defer_limit, cfg.defer_timeout, self.counters, self._events)
        self.bulk_send = BulkSend(cfg.bulk_tick, cfg.bulk_frames_per_tick)
        self.bulk_request = BulkRequest(cfg.bulk_retry, cfg.bulk_max_tries)
        self.sync_ok = True
        # creator id -> when a frame last carried its messages (metrics; MAX_PEERS ids)
        self.peer_seen: dict[int, float] = {}
        self._bind_rules = False
        self._acks_inserts = True
        sd = policy.state_dialect
        self._fields = STATE_FIELDS[sd]
        self._importer = state_importer(sd)
        # message builders per queue, the table the sender walks
        self._builders: tuple[Callable[[State, float, list[int], int], Any], ...] = (
            self._full_record, lambda st, *_: policy.ins_ack(st), self._full_record,
            self._upd_c, lambda st, *_: policy.del_c(st))
        self._handlers: dict[str, Callable[[list[Any], float], None]] = {
            "CLR": self._in_clr,
            "INS": self._in_ins,
            "INS_1301": self._in_ins,
            "INS_ACK": self._in_iack,
            "UPD": self._in_upd,
            "UPD_1301": self._in_upd,
            "UPD_C": self._in_upd_c,
            "UPD_REQ": self._in_ureq,
            "UREQ": self._in_ureq,
            "DEL": self._in_del_full,
            "DEL_C": self._in_del,
            "BUS": self._in_bus,
            "TDB": self._in_tdb,
            "TDB_UPD": self._in_tdb,
            "EOF": self._in_eof,
        }

    # ------------------------------------------------------------------ accessors
    @property
    def creatorid(self) -> int:
        return self.filter.creatorid

    def queued(self, st: State) -> str | None:
        """The name of the queue holding `st` (for tests and ctl), or None."""
        return queue_name(st)

    def pending_bytes(self) -> int:
        """The size of the frame the queues would make now, IP header included."""
        return self._len

    def empty_frame_bytes(self) -> int:
        """The size of a frame with nothing in it (headers and EOF)."""
        return self.policy.min_frame

    # ------------------------------------------------------------------ queues
    def _arm(self, now: float) -> None:
        if self._deadline is None:
            self._deadline = now + self.config.pace

    def _need(self, name: str, empty: bool) -> int:
        return self._size[name] + (self.policy.subheader if empty else 0)

    def _make_room(self, kind: str, nlen: int, now: float) -> None:
        why = self.policy.must_send_before(kind, self._pending_kind, self._count_pending())
        if why is not None:
            self._sendout(now, why)
        if self._len + nlen > self.config.mtu:
            self._sendout(now, "full_sends")

    def _count_pending(self) -> int:
        return sum(len(q) for q in self._queues) + len(self._ureq) + len(self._plus)

    def _add(self, kind: str, nlen: int, now: float) -> None:
        """Account for one message of `kind` (room already made) and arm the pace: after
        making room, since a send disarms it and this message must still leave."""
        self._arm(now)
        self._len += nlen
        self._pending_kind = kind

    def _q_ins(self, st: State, q: int, now: float) -> None:
        name = QUEUE_ACTION[q]
        queue = self._queues[q]
        self._make_room(name, self._need(name, not queue), now)
        self._add(name, self._need(name, not queue), now)
        queue[st] = None
        st.sync_state = q

    def _q_del(self, st: State) -> None:
        q = st.sync_state
        if q == SYNC_NONE:
            return
        queue = self._queues[q]
        if queue.pop(st, 0) is None:
            self._len -= self._qsize[q]
            if not queue:
                self._len -= self.policy.subheader
        st.sync_state = SYNC_NONE

    # ------------------------------------------------------------------ pf events
    def state_inserted(self, st: State, now: float) -> None:
        if st.state_flags & PFSTATE_NOSYNC or st.key[1] == IPPROTO_PFSYNC:
            st.state_flags |= PFSTATE_NOSYNC
            return
        self._q_ins(st, Q_INS, now)
        st.sync_updates = 0
        if st.state_flags & PFSTATE_ACK:
            self._immediate = True

    def _dequeue_nosync(self, st: State) -> bool:
        """A no-sync state is never sent (it may have turned no-sync while queued)."""
        if not st.state_flags & PFSTATE_NOSYNC:
            return False
        if st.sync_state != SYNC_NONE:
            self._q_del(st)
        return True

    def state_updated(self, st: State, now: float) -> None:
        if st.state_flags & PFSTATE_ACK:
            # A later packet of a deferred state: the held first packet goes before it
            # (pfsync_update_state releases it), so the two are never reordered.
            self.counters["defer_update"] += 1
            self.deferrals.release(st, accept=True)
        if self._dequeue_nosync(st):
            return
        q = st.sync_state
        sync = False
        if q in (Q_UPD_C, Q_UPD, Q_INS):
            st.sync_updates += 1
            if st.sync_updates >= self.config.maxupd:
                sync = True
        else:
            if q == Q_IACK:
                self._q_del(st)
            self._q_ins(st, Q_UPD_C, now)
            st.sync_updates = 0
        if sync:
            self.counters["maxupd_sends"] += 1
            self._immediate = True
        elif self.policy.split_detection:
            # split path (the thesis): a peer touched the state less than a window ago
            touched = st.pfsync_time
            if now - touched < self.config.split_window or (
                    touched != NEVER and self._resumed_split(st, now)):
                self.counters["split_immediate"] += 1
                self._immediate = True

    def _resumed_split(self, st: State, now: float) -> bool:
        """Split-path detection past the thesis' rule (no peer touched the state for a
        window), a departure for idle connections: when we have not sent the
        state for a window either, and its last peer update came within a window of our
        last send, both halves went quiet together; the state was split then, so it is
        split again for one window when it resumes (until the peer's updates come back).
        The thesis' rule alone paces the first burst's updates, and the peer drops the
        ACKs for it (docs/ecmp4.md). A state only we kept forwarding while the peers were
        silent is still unsplit after one window: its sends are never a window apart
        (the pace is shorter)."""
        window = self.config.split_window
        touched = st.pfsync_time
        resumed = self._resumed
        until = resumed.get(st)
        if until is not None:
            if now < until:
                return True
            del resumed[st]
            return False
        sent = st.pfsync_sent
        if sent != NEVER and now - sent >= window and sent - touched < window:
            resumed[st] = now + window
            self.counters["split_resumed"] += 1
            return True
        return False

    def state_removed(self, st: State, now: float) -> None:
        self._resumed.pop(st, None)
        if st.state_flags & PFSTATE_ACK:
            self.deferrals.release(st, accept=False)
        if self._dequeue_nosync(st):
            return
        q = st.sync_state
        if q == Q_INS:
            # The world never heard of it: forget it quietly.
            self._q_del(st)
            return
        if q != SYNC_NONE:
            self._q_del(st)
        self._q_ins(st, Q_DEL, now)

    # ------------------------------------------------------------------ deferral
    def defer(self, st: State, handle: object, now: float) -> bool:
        """Hold the packet that created `st` until a peer acknowledges the insert.

        True means the engine now owns the verdict of `handle`: it comes back as a
        `Released` event, accept (acked or timed out) or drop.
        """
        if not (self.config.defer and self.policy.defers) or st.state_flags & PFSTATE_NOSYNC:
            return False
        if st.sync_state != Q_INS:
            return False
        self.deferrals.hold(st, handle, now)
        self._immediate = True
        return True

    def release_all(self, now: float) -> None:
        """Let every held packet go (shutdown: better late than dropped)."""
        self.deferrals.release_all()

    def deferred_count(self) -> int:
        return len(self.deferrals)

    # ------------------------------------------------------------------ events
    def take_events(self) -> list[Event]:
        """What happened since the last call: released packets (give their verdicts
        before any later packet's) and sync_ok changes in order, then pf's log lines."""
        lines = self.filter.take_log()
        if lines:
            self._events.extend(LogLine(line) for line in lines)
        events = self._events[:]
        self._events.clear()
        return events

    def pending_releases(self) -> int:
        """Released packets not yet taken (a packet being decided released them)."""
        if not self._events:
            return 0
        return sum(1 for e in self._events if e.__class__ is Released)

    def _set_sync_ok(self, ok: bool) -> None:
        if ok != self.sync_ok:
            self._events.append(SyncOk(ok))
        self.sync_ok = ok

    # ------------------------------------------------------------------ requests
    def _request_update(self, creatorid: int, state_id: int, now: float) -> None:
        k = (creatorid, state_id)
        if k in self._ureq:
            return
        need = self._need("UPD_REQ", not self._ureq)
        self._make_room("UPD_REQ", need, now)
        self._add("UPD_REQ", self._need("UPD_REQ", not self._ureq), now)
        self._ureq[k] = None
        self.counters["ureq_sent"] += 1
        self._immediate = True

    def _update_state_req(self, st: State, now: float) -> None:
        q = st.sync_state
        if q in (Q_INS, Q_UPD, Q_DEL):
            return
        if q != SYNC_NONE:
            self._q_del(st)
        self._q_ins(st, Q_UPD, now)
        self._immediate = True

    def _send_plus(self, name: str, msg: Any, now: float) -> None:
        """CLR and BUS go out at once, with whatever else is queued."""
        self._make_room(name, self._need(name, True), now)
        self._add(name, self._need(name, True), now)
        self._plus.append((name, msg))
        self._sendout(now, "batch_sends")

    def clear_states(self, now: float, ifname: str = "") -> None:
        """Tell peers our states are gone (pfctl -F states): one CLR with our creator id."""
        self._send_plus("CLR", self.policy.clr(ifname, self.creatorid), now)

    # ------------------------------------------------------------------ bulk update
    def start(self, now: float) -> None:
        """Come up 'not ok' and ask the peers for their whole table (UPD_REQ 0/0)."""
        self._set_sync_ok(False)
        self.bulk_request.begin(now)
        self.counters["bulk_requests_sent"] += 1
        self._request_update(0, 0, now)

    def _bulk_timed_out(self, now: float) -> None:
        req = self.bulk_request
        tries = req.tries
        if req.timed_out(now):
            self.counters["bulk_requests_sent"] += 1
            self._ureq.pop((0, 0), None)
            self._request_update(0, 0, now)
            return
        log.info("pfsync: failed to receive bulk update after %d tries, assuming alone", tries)
        self.counters["bulk_gave_up"] += 1
        self._set_sync_ok(True)

    def _bulk_start(self, now: float) -> None:
        self.counters["bulk_requests_received"] += 1
        self.bulk_send.begin(now, list(self.filter.states))
        log.info("pfsync: bulk update start, %d states", len(self.bulk_send.states or ()))
        self._send_plus("BUS", self.policy.bus(self.creatorid, 0, BUS_START), now)

    def _bulk_per_frame(self) -> int:
        """How many full state records make the queue send a frame (as queueing them
        one by one would: the frame goes once another might not fit)."""
        size = self._size[QUEUE_ACTION[Q_UPD]]
        room = self.config.mtu - size - self.policy.subheader
        length = self.policy.min_frame + self.policy.subheader
        n = 0
        while True:
            length += size
            n += 1
            if length > room:
                return n

    def _bulk_step(self, now: float) -> None:
        room = self.config.mtu - self._size["UPD"] - self.policy.subheader

        def queue(st: State) -> None:
            self._update_state_req(st, now)
            self.counters["bulk_states_sent"] += 1
            if self._len > room:
                self._sendout(now, "full_sends")

        def send(batch: list[State]) -> None:
            if self._len == self.policy.min_frame and not self._plus and not self._ureq:
                self._bulk_frame(batch, now)
            else:  # something else is queued: the states join it, as one by one
                for st in batch:
                    queue(st)

        if self.bulk_send.step(now, self._bulk_per_frame(), send, queue):
            endtime = max(0, int(now - self.bulk_send.requested_at))
            log.info("pfsync: bulk update complete")
            self._send_plus("BUS", self.policy.bus(self.creatorid, endtime, BUS_END), now)

    def _bulk_frame(self, batch: list[State], now: float) -> None:
        """One frame of full state records, built straight from the states: what
        queueing them one by one and sending the full queue makes, without the queue."""
        filt = self.filter
        nstates = len(filt.states)
        timeouts = filt.timeouts
        build = self._builders[Q_UPD]
        msgs = [build(st, now, timeouts, nstates) for st in batch]
        if QUEUES[Q_UPD].tells_state:
            for st in batch:
                st.pfsync_sent = now
        self.counters["bulk_states_sent"] += len(batch)
        self.counters["full_sends"] += 1
        sections = [(QUEUE_ACTION[Q_UPD], msgs)]
        for data, counts in self.policy.frames(sections, filt.ruleset.checksum[:16]):
            self._account(data, counts)

    # ------------------------------------------------------------------ timers
    def next_deadline(self) -> float | None:
        cands = []
        if self._deadline is not None:
            cands.append(self._deadline)
        d = self.deferrals.next_deadline()
        if d is not None:
            cands.append(d)
        if self.bulk_send.active:
            cands.append(self.bulk_send.next_at)
        if self.bulk_request.fail_at is not None:
            cands.append(self.bulk_request.fail_at)
        return min(cands) if cands else None

    def timer(self, now: float) -> None:
        if len(self.deferrals):
            self.deferrals.expire(now)
        if self.bulk_send.active and now >= self.bulk_send.next_at:
            self._bulk_step(now)
        fail_at = self.bulk_request.fail_at
        if fail_at is not None and now >= fail_at:
            self._bulk_timed_out(now)
        if self._deadline is not None and now >= self._deadline:
            self._sendout(now, "pace_sends")
        self.end_of_batch(now)

    def end_of_batch(self, now: float) -> None:
        """The softnet handler: whatever immediate work the batch queued leaves now."""
        if self._immediate:
            self._immediate = False
            self._sendout(now, "batch_sends")

    # ------------------------------------------------------------------ output
    def take_output(self) -> list[bytes]:
        out = self._out
        self._out = []
        return out

    def flush(self, now: float) -> None:
        """Send whatever is queued now (used on shutdown)."""
        self._sendout(now, "batch_sends")

    def _full_record(self, st: State, now: float, timeouts: list[int], nstates: int) -> Any:
        return pack_state(st, now, self.policy.state_dialect, timeouts, nstates)

    def _upd_c(self, st: State, now: float, timeouts: list[int], nstates: int) -> Any:
        return self.policy.upd_c(st, seconds_left(st, now, timeouts, nstates), st.sync_updates)

    def _sendout(self, now: float, why: str) -> None:
        policy = self.policy
        if self._len == policy.min_frame and not self._plus:
            self._deadline = None
            return
        filt = self.filter
        nstates = len(filt.states)
        timeouts = filt.timeouts
        queued: list[tuple[str, list[Any]]] = []
        # Build the messages only now, from the states' current contents.
        for q in self._order:
            queue = self._queues[q]
            if not queue:
                continue
            build = self._builders[q]
            tells = QUEUES[q].tells_state
            msgs: list[Any] = []
            for st in queue:
                msgs.append(build(st, now, timeouts, nstates))
                st.sync_state = SYNC_NONE
                if tells:
                    st.pfsync_sent = now
            if q == Q_IACK:
                self.counters["iack_sent"] += len(queue)
            queue.clear()
            queued.append((QUEUE_ACTION[q], msgs))
        ureq = [policy.ureq(sid, cid) for (cid, sid) in self._ureq]
        self._ureq.clear()
        plus = self._plus
        self._plus = []
        sections = policy.layout(queued, ureq, [(n, [m]) for n, m in plus])
        self._len = policy.min_frame
        self._deadline = None
        self._pending_kind = None
        self.counters[why] += 1
        for data, counts in policy.frames(sections, filt.ruleset.checksum[:16]):
            self._account(data, counts)

    def _account(self, data: bytes, sections: list[tuple[str, int]]) -> None:
        self._out.append(data)
        c = self.counters
        c["opackets"] += 1
        c["obytes"] += len(data) + 20  # IP header
        for name, count in sections:
            self.frames_by_action[name] = self.frames_by_action.get(name, 0) + 1
            self.msgs_by_action[name] = self.msgs_by_action.get(name, 0) + count
            self.bytes_by_action[name] = self.bytes_by_action.get(name, 0) + count * self._size.get(name, 0)

    # ------------------------------------------------------------------ input
    def receive(self, payload: bytes | bytearray | memoryview, now: float, *, src: str = "",
                ttl: int = DEFAULT_TTL, sibling: bool = False) -> None:
        """One pfsync frame from a peer (starting at the pfsync header). `sibling`: from
        another worker of this firewall, which must not INS_ACK a deferred state — only
        a peer that holds the state may release the packet (see io/siblings.py)."""
        self._acks_inserts = not sibling
        c = self.counters
        c["ipackets"] += 1
        c["ibytes"] += len(payload)
        if ttl != DEFAULT_TTL:
            c["badttl"] += 1
            return
        decoded = self.policy.decode(payload, c)
        if decoded is None:
            return
        sections, pfcksum = decoded
        self._bind_rules = pfcksum == bytes(self.filter.ruleset.checksum[:16])
        handlers = self._handlers
        for action, msgs in sections:
            handler = handlers.get(action)
            if handler is not None:
                handler(msgs, now)
        self._note_peers(sections, now)

    def _note_peers(self, sections: list[tuple[str, list[Any]]], now: float) -> None:
        """When a frame last carried each peer's states: the first message of each
        section names a creator id (per section, not per message: a frame's states are
        mostly its sender's). Our own id (an INS_ACK or update request for our states)
        and 0 (a bulk request) name no peer."""
        seen = self.peer_seen
        cid_at = self._fields.creatorid
        own = self.filter.creatorid
        for _action, msgs in sections:
            if not msgs:
                continue
            m = msgs[0]
            cid = m[cid_at] if isinstance(m, tuple) else getattr(m, "creatorid", 0)
            if not cid or cid == own:
                continue
            if cid not in seen and len(seen) >= MAX_PEERS:
                del seen[min(seen, key=seen.__getitem__)]  # forget the longest silent
            seen[cid] = now

    def _in_clr(self, msgs: list[Any], now: float) -> None:
        filt = self.filter
        for m in msgs:
            self.counters["clr_received"] += 1
            for st in filt.states.by_creator(m.creatorid):
                if m.ifname and st.ifname != m.ifname:
                    continue
                st.state_flags |= PFSTATE_NOSYNC
                filt.remove_state(st, now)

    def _import(self, t: tuple[Any, ...], now: float) -> State | None:
        """A state from an unpacked pfsync_state tuple (INS, or UPD for an unknown id).

        Records with our own creator id are imported like any other: with a fixed
        hostid, a restarted node gets back the states it created before the restart.
        """
        filt = self.filter
        try:
            st, rule_nr, wants_ack = self._importer(t, now, filt.timeouts)
        except ImportError_:
            self.counters["badval"] += 1
            return None
        if not filt.import_state(st, rule_nr, now, bind_rule=self._bind_rules):
            self.counters["import_failed"] += 1
            return None
        if wants_ack and self.policy.defers and self._acks_inserts:
            self._q_ins(st, Q_IACK, now)
            self._immediate = True
        return st

    def _in_ins(self, msgs: list[Any], now: float) -> None:
        by_id = self.filter.states.by_id
        f = self._fields
        for t in msgs:
            self.counters["ins_received"] += 1
            if by_id(t[f.creatorid], t[f.id]) is not None:
                continue
            self._import(t, now)

    def _in_iack(self, msgs: list[Any], now: float) -> None:
        by_id = self.filter.states.by_id
        deferrals = self.deferrals
        for m in msgs:
            self.counters["iack_received"] += 1
            st = by_id(m.creatorid, m.id)
            if st is not None and st in deferrals:
                self.counters["defer_acked"] += 1
                deferrals.release(st, accept=True)

    def _in_upd(self, msgs: list[Any], now: float) -> None:
        by_id = self.filter.states.by_id
        f = self._fields
        s, d = f.src, f.dst
        for t in msgs:
            self.counters["upd_received"] += 1
            st = by_id(t[f.creatorid], t[f.id])
            if st is None:
                if self.bulk_request.waiting:
                    self.counters["bulk_states_received"] += 1
                self._import(t, now)
                continue
            timeout = t[f.timeout]
            if timeout >= PFTM_MAX or t[s + PEER_STATE] > PF_TCPS_PROXY_DST \
                    or t[d + PEER_STATE] > PF_TCPS_PROXY_DST:
                self.counters["badval"] += 1
                continue
            self._merge(st, wire.StatePeer(*t[s : s + PEER_VALUES]),
                        wire.StatePeer(*t[d : d + PEER_VALUES]), timeout, now)

    def _in_upd_c(self, msgs: list[Any], now: float) -> None:
        by_id = self.filter.states.by_id
        for m in msgs:
            self.counters["updc_received"] += 1
            st = by_id(m.creatorid, m.id)
            if st is None:
                self._request_update(m.creatorid, m.id, now)
                continue
            self._merge(st, m.src, m.dst, m.timeout, now)

    def _merge(self, st: State, src: Any, dst: Any, timeout: int, now: float) -> None:
        """Take what the peer knows better; where ours is fresher, send ours back."""
        if st.state_flags & PFSTATE_ACK:
            self.deferrals.release(st, accept=False)
        stale, derived = self._merge_rule(st, src, dst, timeout, now)
        st.pfsync_time = now
        if derived:
            # New knowledge the peer cannot have (it has not seen the ACK): send it
            # now, whatever the echo holdoff says.
            self.counters["fin_acked"] += derived
            self._immediate = True
        if stale:
            # The peer's copy is behind ours. If we sent this state recently, our update
            # is on the wire and will catch the peer up; echoing again would only make
            # the two firewalls answer each other's echoes for as long as traffic flows.
            self.counters["stale"] += 1
            if st.sync_state == SYNC_NONE:
                self._q_ins(st, Q_UPD_C, now)
                st.sync_updates = 0
            if now - st.pfsync_sent >= self.config.echo_holdoff:
                self.counters["stale_echo"] += 1
                self._immediate = True

    def _in_ureq(self, msgs: list[Any], now: float) -> None:
        by_id = self.filter.states.by_id
        for m in msgs:
            self.counters["ureq_received"] += 1
            if m.id == 0 and m.creatorid == 0:
                if self.config.answers_bulk:
                    self._bulk_start(now)
                continue
            st = by_id(m.creatorid, m.id)
            if st is None or st.state_flags & PFSTATE_NOSYNC:
                continue
            self._update_state_req(st, now)

    def _in_del(self, msgs: list[Any], now: float) -> None:
        filt = self.filter
        for m in msgs:
            self.counters["del_received"] += 1
            st = filt.states.by_id(m.creatorid, m.id)
            if st is None:
                self.counters["badstate"] += 1
                continue
            st.state_flags |= PFSTATE_NOSYNC
            filt.remove_state(st, now)

    def _in_del_full(self, msgs: list[Any], now: float) -> None:
        f = self._fields
        self._in_del([wire.DelC(t[f.id], t[f.creatorid]) for t in msgs], now)

    def _in_bus(self, msgs: list[Any], now: float) -> None:
        req = self.bulk_request
        for m in msgs:
            if not req.waiting:
                continue
            if m.status == BUS_START:
                self.counters["bulk_starts_received"] += 1
                per_frame = (self.config.mtu - self.policy.min_frame) // self._size["UPD"]
                req.started(now, self.filter.limit_states, per_frame)
                log.info("pfsync: received bulk update start")
            elif m.status == BUS_END:
                self.counters["bulk_ends_received"] += 1
                if req.ended(now, m.endtime):
                    self.counters["bulk_done"] += 1
                    log.info("pfsync: received valid bulk update end")
                    self._set_sync_ok(True)
                else:
                    log.info("pfsync: received invalid bulk update end: bad timestamp")

    def _in_tdb(self, msgs: list[Any], now: float) -> None:
        self.counters["tdb_received"] += len(msgs)

    def _in_eof(self, msgs: list[Any], now: float) -> None:
        return

    # ------------------------------------------------------------------ views
    def info(self) -> dict[str, Any]:
        return {
            "sync_ok": self.sync_ok,
            "protocol": self.config.protocol,
            "dialect": self.dialect,
            "merge": self.config.merge,
            "creatorid": f"{self.creatorid:08x}",
            "counters": dict(self.counters),
            "frames_by_action": dict(self.frames_by_action),
            "messages_by_action": dict(self.msgs_by_action),
            "bytes_by_action": dict(self.bytes_by_action),
            "deferred_now": len(self.deferrals),
            "bulk_sending": self.bulk_send.active,
            "bulk_progress": self.bulk_send.progress(),
            "bulk_tries": self.bulk_request.tries,
        }


def attach(filt: Filter, config: EngineConfig | None = None, now: float = 0.0,
           **kw: Any) -> Engine:
    """An engine that hears `filt`'s state events, as pf calls pfsync_insert_state,
    pfsync_update_state and pfsync_delete_state."""
    engine = Engine(filt, config, now, **kw)
    filt.listener = engine
    return engine
