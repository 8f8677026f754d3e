"""The pfsync engine, sans I/O: pf state events and peer frames in, frames and packet
releases out.

It follows the 2009 rewrite the thesis describes:
- one queue per message type, with each state recording which queue holds it, so a
  state moves between queues in O(1) and a frame is serialised only when it is sent;
- frames mix message types (v5 subheaders) and never exceed the sync MTU;
- pacing: a frame leaves one second after its first message, when full, when a state
  reaches `maxupd` updates, or at `end_of_batch` when immediate work was queued during
  the batch (the softnet handler of the thesis);
- a local update to a state a peer touched less than two seconds ago is immediate
  (split-path detection);
- the first packet of a state leaving through an `out` pass may be deferred until a
  peer's INS_ACK or a short timeout;
- bulk update on start, update requests for unknown states, and the TCP merge rule.

`protocol="v4"` reproduces the pre-2009 behaviour the thesis measured against: one
message type per frame, only 1 s / maxupd / MTU pacing, no split detection, no deferral.

Time is always an argument; the caller (the daemon or a test harness) calls `timer(now)`
when `next_deadline()` passes and `end_of_batch(now)` after each burst of work, then
sends what `take_output()` returns and applies `take_releases()`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pfcluster.pf.constants import (
    IPPROTO_PFSYNC,
    IPPROTO_TCP,
    PF_TCPS_PROXY_DST,
    PF_TCPS_PROXY_SRC,
    PFSTATE_ACK,
    PFSTATE_NOSYNC,
    PFTM_MAX,
    TCPS,
)
from pfcluster.pf.filter import Filter
from pfcluster.pf.state import SYNC_NONE, State
from pfcluster.pf.tcp import TM_FIRST, fin_acked, sdiff, set_timeout_ladder
from pfcluster.pfsync import legacy, wire
from pfcluster.pfsync.convert import (
    STATE_FIELDS,
    ImportError_,
    pack_state,
    peer_to_wire,
    seconds_left,
    state_importer,
)

log = logging.getLogger("pfcluster.pfsync")

# Queue ids (PFSYNC_S_* of OpenBSD 4.5); their order is the order of sections in a frame.
Q_INS = 0
Q_IACK = 1
Q_UPD = 2
Q_UPD_C = 3
Q_DEL = 4
Q_COUNT = 5
QUEUE_ACTION = ("INS", "INS_ACK", "UPD", "UPD_C", "DEL_C")
# OpenBSD >= 4.8 puts the queues in this order instead.
V6_QUEUE_ORDER = (Q_IACK, Q_UPD_C, Q_DEL, Q_INS, Q_UPD)
V5_QUEUE_ORDER = (Q_INS, Q_IACK, Q_UPD, Q_UPD_C, Q_DEL)

IP_HEADER = 20
PFSYNC_HEADER = 20
SUBHEADER = 4
BUS_START = 1
BUS_END = 2
DEFAULT_TTL = 255

V4_ACTION = {"INS": "INS", "UPD": "UPD", "UPD_C": "UPD_C", "DEL_C": "DEL_C", "UPD_REQ": "UREQ",
             "CLR": "CLR", "BUS": "BUS"}  # fmt: skip

# Drop reasons, named as pfsyncstats names them.
STAT_NAMES = (
    "ipackets", "opackets", "obytes", "ibytes", "badif", "badttl", "hdrops", "badver",
    "badlen", "badact", "badval", "badauth", "badstate", "badproto", "stale", "stale_echo",
    "updates_immediate", "split_immediate", "fin_acked", "maxupd_sends", "pace_sends", "full_sends",
    "batch_sends", "ins_received", "upd_received", "updc_received", "del_received",
    "clr_received", "iack_received", "iack_sent", "ureq_sent", "ureq_received",
    "bulk_requests_sent", "bulk_requests_received", "bulk_states_sent", "bulk_states_received",
    "bulk_starts_received", "bulk_ends_received", "bulk_done", "bulk_gave_up",
    "deferred", "defer_acked", "defer_update", "defer_timeout", "defer_overlimit", "defer_dropped",
    "import_failed", "tdb_received",
)  # fmt: skip


# How a TCP update from a peer is merged into our copy: "edges" (ours: each sequence edge
# only grows, so a split path keeps both halves) or "thesis" (OpenBSD 4.5's sfail rule:
# the update is taken whole or refused whole). v4 always uses the thesis rule.
MERGE_RULES = ("edges", "thesis")


class EngineConfig:
    """Knobs of one pfsync instance (the ifconfig pfsync0 options and a few of ours)."""

    __slots__ = (
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
        bulk_frames_per_tick: int = 4,
        echo_holdoff: float = 0.1,
        merge: str = "edges",
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


class Deferral:
    __slots__ = ("deadline", "handle")

    def __init__(self, handle: object, deadline: float) -> None:
        self.handle = handle
        self.deadline = deadline


class Engine:
    """One pfsync instance bound to one Filter."""

    def __init__(self, filt: Filter, config: EngineConfig | None = None, now: float = 0.0,
                 **kw: Any) -> None:
        self.filter = filt
        self.config = cfg = config or EngineConfig(**kw)
        self.dialect = cfg.dialect
        self.v4 = cfg.protocol == "v4"
        self.counters: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self.frames_by_action: dict[str, int] = {}
        self.msgs_by_action: dict[str, int] = {}
        self.bytes_by_action: dict[str, int] = {}
        if self.v4:
            self._size = {name: legacy.v4_message_size(V4_ACTION[name]) for name in V4_ACTION}
            self._size["INS_ACK"] = 0  # v4 has no insert acknowledgement
            self._sub = 0
            self._minpkt = IP_HEADER + legacy.V4_HEADER_LEN
        else:
            self._size = {name: wire.record_size(self.dialect, name)
                          for name in ("INS", "INS_ACK", "UPD", "UPD_C", "DEL_C", "UPD_REQ",
                                       "CLR", "BUS")}  # fmt: skip
            self._sub = SUBHEADER
            eof = {"openbsd45": SUBHEADER + 20, "openbsd6": 0}.get(self.dialect, SUBHEADER)
            self._minpkt = IP_HEADER + PFSYNC_HEADER + eof
        self._qsize = [self._size[QUEUE_ACTION[q]] for q in range(Q_COUNT)]
        self._queues: list[dict[State, None]] = [{} for _ in range(Q_COUNT)]
        self._ureq: dict[tuple[int, int], None] = {}
        self._plus: list[tuple[str, Any]] = []
        self._len = self._minpkt
        self._deadline: float | None = None
        self._immediate = False
        self._v4_kind: str | None = None
        self._out: list[bytes] = []
        self._deferrals: dict[State, Deferral] = {}
        self._releases: list[tuple[object, bool]] = []
        # bulk update, sending side
        self._bulk_list: list[State] | None = None
        self._bulk_pos = 0
        self._bulk_next = 0.0
        self._ureq_received = 0.0
        # bulk update, requesting side
        self._ureq_sent: float | None = None
        self._bulk_tries = 0
        self._bulkfail: float | None = None
        self.sync_ok = True
        self.on_sync_ok: Callable[[bool], None] | None = None
        self._now = now
        state_dialect = "openbsd45" if self.v4 else self.dialect  # v4 shares the 4.5 record
        self._fields = STATE_FIELDS[state_dialect]
        self._importer = state_importer(state_dialect)
        self._state_codec = wire.TABLES[state_dialect][wire.ACTIONS[state_dialect]["INS"]][2]
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
        filt.listener = self

    # ------------------------------------------------------------------ accessors
    @property
    def creatorid(self) -> int:
        return self.filter.creatorid

    def queued(self, st: State) -> str | None:
        """The name of the queue holding `st` (for tests and ctl), or None."""
        q = st.sync_state
        return None if q == SYNC_NONE else QUEUE_ACTION[q]

    def pending_bytes(self) -> int:
        """The size of the frame the queues would make now, IP header included."""
        return self._len

    # ------------------------------------------------------------------ queues
    def _arm(self, now: float) -> None:
        if self._deadline is None:
            self._deadline = now + self.config.pace

    def _need(self, name: str, empty: bool) -> int:
        return self._size[name] + (self._sub if empty else 0)

    def _make_room(self, kind: str, nlen: int, now: float) -> None:
        if self.v4:
            if self._v4_kind is not None and self._v4_kind != kind:
                self._sendout(now, "batch_sends")
            elif self._count_pending() >= 255:
                self._sendout(now, "full_sends")
        if self._len + nlen > self.config.mtu:
            self._sendout(now, "full_sends")

    def _count_pending(self) -> int:
        return sum(len(q) for q in self._queues) + len(self._ureq) + len(self._plus)

    def _q_ins(self, st: State, q: int, now: float) -> None:
        name = QUEUE_ACTION[q]
        queue = self._queues[q]
        self._make_room(name, self._need(name, not queue), now)
        # Arm only now: making room may have sent a frame, which disarms the timer, and
        # this message must still leave within `pace` even if nothing else happens.
        self._arm(now)
        nlen = self._need(name, not queue)
        self._len += nlen
        queue[st] = None
        st.sync_state = q
        if self.v4:
            self._v4_kind = name

    def _q_del(self, st: State) -> None:
        q = st.sync_state
        if q == SYNC_NONE:
            return
        queue = self._queues[q]
        if queue.pop(st, 0) is None:
            self._len -= self._qsize[q]
            if not queue:
                self._len -= self._sub
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

    def state_updated(self, st: State, now: float) -> None:
        if st.state_flags & PFSTATE_ACK:
            # A later packet of a deferred state: the held first packet goes before it
            # (pfsync_update_state releases it), so the two are never reordered.
            self.counters["defer_update"] += 1
            self._undefer(st, drop=False)
        if st.state_flags & PFSTATE_NOSYNC:
            if st.sync_state != SYNC_NONE:
                self._q_del(st)
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
        elif not self.v4 and now - st.pfsync_time < self.config.split_window:
            self.counters["split_immediate"] += 1
            self._immediate = True

    def state_removed(self, st: State, now: float) -> None:
        if st.state_flags & PFSTATE_ACK:
            self._undefer(st, drop=True)
        if st.state_flags & PFSTATE_NOSYNC:
            if st.sync_state != SYNC_NONE:
                self._q_del(st)
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

        True means the engine now owns the verdict of `handle`: it comes back through
        `take_releases()` as accept (acked or timed out) or drop.
        """
        if not self.config.defer or self.v4 or st.state_flags & PFSTATE_NOSYNC:
            return False
        if st.sync_state != Q_INS:
            return False
        if len(self._deferrals) >= self.config.defer_limit:
            oldest = next(iter(self._deferrals))
            self.counters["defer_overlimit"] += 1
            self._undefer(oldest, drop=False)
        st.state_flags |= PFSTATE_ACK
        self._deferrals[st] = Deferral(handle, now + self.config.defer_timeout)
        self.counters["deferred"] += 1
        self._immediate = True
        return True

    def _undefer(self, st: State, drop: bool) -> None:
        d = self._deferrals.pop(st, None)
        st.state_flags &= ~PFSTATE_ACK
        if d is None:
            return
        if drop:
            self.counters["defer_dropped"] += 1
        self._releases.append((d.handle, not drop))

    def release_all(self, now: float) -> None:
        """Let every held packet go (shutdown: better late than dropped)."""
        for st in list(self._deferrals):
            self._undefer(st, drop=False)

    def deferred_count(self) -> int:
        return len(self._deferrals)

    def pending_releases(self) -> int:
        """Held packets released but not yet taken: the caller gives their verdicts
        before the verdict of the packet it is deciding."""
        return len(self._releases)

    def take_log(self) -> list[str]:
        """pf's log lines raised outside a packet's verdict (e.g. by an import)."""
        return self.filter.take_log()

    # ------------------------------------------------------------------ requests
    def _request_update(self, creatorid: int, state_id: int, now: float) -> None:
        k = (creatorid, state_id)
        if k in self._ureq:
            return
        self._make_room("UPD_REQ", self._need("UPD_REQ", not self._ureq), now)
        self._arm(now)
        self._len += self._need("UPD_REQ", not self._ureq)
        self._ureq[k] = None
        if self.v4:
            self._v4_kind = "UPD_REQ"
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
        self._arm(now)
        self._len += self._need(name, True)
        self._plus.append((name, msg))
        if self.v4:
            self._v4_kind = name
        self._sendout(now, "batch_sends")

    def clear_states(self, now: float, ifname: str = "") -> None:
        """Tell peers our states are gone (pfctl -F states): one CLR with our creator id."""
        if self.v4:
            msg: Any = legacy.StateClr(ifname, self.creatorid)
        else:
            msg = wire.Clr(ifname, self.creatorid)
        self._send_plus("CLR", msg, now)

    # ------------------------------------------------------------------ bulk update
    def start(self, now: float) -> None:
        """Come up 'not ok' and ask the peers for their whole table (UPD_REQ 0/0)."""
        self._set_sync_ok(False)
        self._ureq_sent = now
        self._bulk_tries = 0
        self._bulkfail = now + self.config.bulk_retry
        self.counters["bulk_requests_sent"] += 1
        self._request_update(0, 0, now)

    def _set_sync_ok(self, ok: bool) -> None:
        changed = ok != self.sync_ok
        self.sync_ok = ok
        if changed and self.on_sync_ok is not None:
            self.on_sync_ok(ok)

    def _bulk_fail(self, now: float) -> None:
        if self._bulk_tries < self.config.bulk_max_tries:
            self._bulk_tries += 1
            self._bulkfail = now + self.config.bulk_retry
            self.counters["bulk_requests_sent"] += 1
            self._ureq.pop((0, 0), None)
            self._request_update(0, 0, now)
            return
        # Nobody answered: assume we are alone.
        log.info("pfsync: failed to receive bulk update after %d tries, assuming alone", self._bulk_tries)
        self.counters["bulk_gave_up"] += 1
        self._ureq_sent = None
        self._bulkfail = None
        self._bulk_tries = 0
        self._set_sync_ok(True)

    def _bulk_start(self, now: float) -> None:
        self.counters["bulk_requests_received"] += 1
        self._ureq_received = now
        self._bulk_list = [st for st in self.filter.states]
        self._bulk_pos = 0
        self._bulk_next = now
        log.info("pfsync: bulk update start, %d states", len(self._bulk_list))
        self._send_plus("BUS", self._bus(BUS_START, 0), now)

    def _bus(self, status: int, endtime: int) -> Any:
        if self.v4:
            return legacy.StateBus(self.creatorid, endtime, status)
        return wire.Bus(self.creatorid, endtime, status)

    def _bulk_update(self, now: float) -> None:
        lst = self._bulk_list
        if lst is None:
            return
        frames = 0
        limit = self.config.bulk_frames_per_tick
        room = self.config.mtu - self._size["UPD"] - self._sub
        i = self._bulk_pos
        n = len(lst)
        while i < n:
            st = lst[i]
            i += 1
            if (st.linked and st.sync_state == SYNC_NONE and st.timeout < PFTM_MAX
                    and st.pfsync_time <= self._ureq_received
                    and not st.state_flags & PFSTATE_NOSYNC):  # fmt: skip
                self._update_state_req(st, now)
                self.counters["bulk_states_sent"] += 1
                if self._len > room:
                    self._sendout(now, "full_sends")
                    frames += 1
                    if frames >= limit:
                        break
        self._bulk_pos = i
        if i >= n:
            self._bulk_list = None
            endtime = max(0, int(now - self._ureq_received))
            log.info("pfsync: bulk update complete")
            self._send_plus("BUS", self._bus(BUS_END, endtime), now)
        else:
            self._bulk_next = now + self.config.bulk_tick

    # ------------------------------------------------------------------ timers
    def next_deadline(self) -> float | None:
        cands = []
        if self._deadline is not None:
            cands.append(self._deadline)
        if self._deferrals:
            cands.append(next(iter(self._deferrals.values())).deadline)
        if self._bulk_list is not None:
            cands.append(self._bulk_next)
        if self._bulkfail is not None:
            cands.append(self._bulkfail)
        return min(cands) if cands else None

    def timer(self, now: float) -> None:
        self._now = now
        if self._deferrals:
            for st, d in list(self._deferrals.items()):
                if d.deadline > now:
                    break
                self.counters["defer_timeout"] += 1
                self._undefer(st, drop=False)
        if self._bulk_list is not None and now >= self._bulk_next:
            self._bulk_update(now)
        if self._bulkfail is not None and now >= self._bulkfail:
            self._bulk_fail(now)
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

    def take_releases(self) -> list[tuple[object, bool]]:
        r = self._releases
        self._releases = []
        return r

    def flush(self, now: float) -> None:
        """Send whatever is queued now (used on shutdown)."""
        self._sendout(now, "batch_sends")

    def _sendout(self, now: float, why: str) -> None:
        if self._len == self._minpkt and not self._plus:
            self._deadline = None
            return
        filt = self.filter
        nstates = len(filt.states)
        timeouts = filt.timeouts
        sections: list[tuple[str, list[Any]]] = []
        queues = self._queues
        order = V6_QUEUE_ORDER if self.dialect == "openbsd6" else V5_QUEUE_ORDER
        dialect = self.dialect
        # Build the messages only now, from the states' current contents.
        built: dict[int, tuple[str, list[Any]]] = {}
        for q in order:
            queue = queues[q]
            if not queue:
                continue
            msgs: list[Any] = []
            if q in (Q_INS, Q_UPD):
                for st in queue:
                    msgs.append(pack_state(st, now, dialect, timeouts, nstates))
                    st.sync_state = SYNC_NONE
                    st.pfsync_sent = now
            elif q == Q_UPD_C:
                for st in queue:
                    msgs.append(self._upd_c(st, now, timeouts, nstates))
                    st.sync_state = SYNC_NONE
                    st.pfsync_sent = now
            elif q == Q_IACK:
                for st in queue:
                    msgs.append(wire.InsAck(st.id, st.creatorid))
                    st.sync_state = SYNC_NONE
                self.counters["iack_sent"] += len(queue)
            else:
                for st in queue:
                    if self.v4:
                        msgs.append(legacy.StateDel(st.id, st.creatorid, st.src.state, st.dst.state))
                    else:
                        msgs.append(wire.DelC(st.id, st.creatorid))
                    st.sync_state = SYNC_NONE
            queue.clear()
            built[q] = (QUEUE_ACTION[q], msgs)
        ureq: list[Any] = []
        if self._ureq:
            cls = legacy.StateUpdReq if self.v4 else wire.UpdReq
            ureq = [cls(sid, cid) for (cid, sid) in self._ureq]
            self._ureq.clear()
        plus = self._plus
        self._plus = []
        if dialect == "openbsd6" and not self.v4:
            if ureq:
                sections.append(("UPD_REQ", ureq))
            sections.extend((n, [m]) for n, m in plus)
            sections.extend(built[q] for q in order if q in built)
        else:
            sections.extend(built[q] for q in order if q in built)
            if ureq:
                sections.append(("UPD_REQ", ureq))
            sections.extend((n, [m]) for n, m in plus)
        self._len = self._minpkt
        self._deadline = None
        self._v4_kind = None
        self.counters[why] += 1
        if self.v4:
            for name, msgs in sections:
                self._emit_v4(name, msgs)
        else:
            self._emit_v5(sections)

    def _upd_c(self, st: State, now: float, timeouts: list[int], nstates: int) -> Any:
        expire = seconds_left(st, now, timeouts, nstates)
        if self.v4:
            return legacy.StateUpd(st.id, peer_to_wire(st.src), peer_to_wire(st.dst),
                                   st.creatorid, expire, st.timeout, st.sync_updates & 0xFF)  # fmt: skip
        return wire.UpdC(st.id, peer_to_wire(st.src), peer_to_wire(st.dst), st.creatorid,
                         expire, st.timeout, 0)  # fmt: skip

    def _emit_v5(self, sections: list[tuple[str, list[Any]]]) -> None:
        acts = wire.ACTIONS[self.dialect]
        secs = [wire.Section(name, acts[name], len(msgs), msgs) for name, msgs in sections if msgs]
        # Merge same-action neighbours (two BUS in one frame share a subheader).
        merged: list[wire.Section] = []
        for s in secs:
            if merged and merged[-1].action_id == s.action_id:
                merged[-1].messages.extend(s.messages)
                merged[-1].count = len(merged[-1].messages)
            else:
                merged.append(s)
        frame = wire.Frame(wire.VERSION[self.dialect], None, self.filter.ruleset.checksum[:16], merged)
        data = wire.encode(frame, self.dialect)
        self._account(data, [(s.action, s.count) for s in merged])

    def _emit_v4(self, name: str, msgs: list[Any]) -> None:
        action = legacy.V4_ACTIONS[V4_ACTION[name]]
        for i in range(0, len(msgs), 255):
            chunk = msgs[i : i + 255]
            frame = legacy.V4Frame(action, chunk, pf_chksum=self.filter.ruleset.checksum[:16])
            self._account(legacy.encode_v4(frame), [(name, len(chunk))])

    def _account(self, data: bytes, sections: list[tuple[str, int]]) -> None:
        self._out.append(data)
        c = self.counters
        c["opackets"] += 1
        c["obytes"] += len(data) + IP_HEADER
        for name, count in sections:
            self.frames_by_action[name] = self.frames_by_action.get(name, 0) + 1
            self.msgs_by_action[name] = self.msgs_by_action.get(name, 0) + count
            self.bytes_by_action[name] = self.bytes_by_action.get(name, 0) + count * self._size.get(name, 0)

    # ------------------------------------------------------------------ input
    def receive(self, payload: bytes | bytearray | memoryview, now: float, *, src: str = "",
                ttl: int = DEFAULT_TTL) -> None:
        """One pfsync frame from a peer (starting at the pfsync header)."""
        self._now = now
        c = self.counters
        c["ipackets"] += 1
        c["ibytes"] += len(payload)
        if ttl != DEFAULT_TTL:
            c["badttl"] += 1
            return
        if self.v4:
            self._receive_v4(payload, now)
            return
        try:
            frame = wire.decode(payload, self.dialect, raw_states=True)
        except wire.WireError as e:
            c[e.reason if e.reason in c else "badlen"] += 1
            frame = e.frame
            # A header claiming more bytes than arrived: pfsync_input drops the whole
            # packet. An error later in the walk keeps the sections before it, as the
            # kernel has already applied them when it meets the bad one.
            if frame is None or (frame.len is not None and frame.len > len(payload)):
                return
        invalid = set(frame.invalid)
        if invalid:
            c["badval"] += len(invalid)
        self._bind_rules = bytes(frame.pfcksum) == bytes(self.filter.ruleset.checksum[:16])
        for si, sec in _deletions_first(frame.sections):
            if sec.truncated or sec.skipped:
                continue
            handler = self._handlers.get(sec.action)
            if handler is None:
                continue
            msgs = sec.messages
            if invalid:
                msgs = [m for mi, m in enumerate(msgs) if (si, mi) not in invalid]
            handler(msgs, now)

    _bind_rules = False

    def _receive_v4(self, payload: bytes | bytearray | memoryview, now: float) -> None:
        c = self.counters
        try:
            frame = legacy.decode_v4(payload)
        except wire.WireError as e:
            c[e.reason if e.reason in c else "badlen"] += 1
            return
        if frame.invalid:
            c["badval"] += len(frame.invalid)
        bad = set(frame.invalid)
        msgs = [m for i, m in enumerate(frame.messages) if i not in bad]
        if msgs and isinstance(msgs[0], wire.State):
            # the v4 state record is the 4.5 one: hand the handlers the same tuples
            codec = self._state_codec
            assert codec is not None
            msgs = [tuple(codec.to_tuple(m)) for m in msgs]
        self._bind_rules = bytes(frame.pf_chksum) == bytes(self.filter.ruleset.checksum[:16])
        handler = self._handlers.get(frame.action_name)
        if handler is not None:
            handler(msgs, now)

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
        """A state from an unpacked pfsync_state tuple (INS, or UPD for an unknown id)."""
        filt = self.filter
        # Records with our own creator id are imported like any other: with a fixed
        # hostid, a restarted node gets back the states it created before the restart.
        try:
            st, rule_nr, wants_ack = self._importer(t, now, filt.timeouts)
        except ImportError_:
            self.counters["badval"] += 1
            return None
        if not filt.import_state(st, rule_nr, now, bind_rule=self._bind_rules):
            self.counters["import_failed"] += 1
            return None
        if wants_ack:
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
        for m in msgs:
            self.counters["iack_received"] += 1
            st = by_id(m.creatorid, m.id)
            if st is not None and st in self._deferrals:
                self.counters["defer_acked"] += 1
                self._undefer(st, drop=False)

    def _in_upd(self, msgs: list[Any], now: float) -> None:
        by_id = self.filter.states.by_id
        f = self._fields
        for t in msgs:
            self.counters["upd_received"] += 1
            st = by_id(t[f.creatorid], t[f.id])
            if st is None:
                if self._ureq_sent is not None:
                    self.counters["bulk_states_received"] += 1
                self._import(t, now)
                continue
            timeout = t[f.timeout]
            s, d = f.src, f.dst
            if timeout >= PFTM_MAX or t[s + 9] > PF_TCPS_PROXY_DST or t[d + 9] > PF_TCPS_PROXY_DST:
                self.counters["badval"] += 1
                continue
            self._merge(st, wire.StatePeer(*t[s : s + 11]), wire.StatePeer(*t[d : d + 11]),
                        timeout, now)  # fmt: skip

    def _in_upd_c(self, msgs: list[Any], now: float) -> None:
        by_id = self.filter.states.by_id
        for m in msgs:
            self.counters["updc_received"] += 1
            st = by_id(m.creatorid, m.id)
            if st is None:
                self._request_update(m.creatorid, m.id, now)
                continue
            self._merge(st, m.src, m.dst, m.timeout, now)

    def _merge(self, st: State, src: wire.StatePeer, dst: wire.StatePeer, timeout: int,
               now: float) -> None:
        """Take what the peer knows better; where ours is fresher, send ours back."""
        if st.state_flags & PFSTATE_ACK:
            self._undefer(st, drop=True)
        if self.v4 or self.config.merge == "thesis":
            sync = _merge_sfail(st, src, dst, timeout, now)
        elif st.key[1] == IPPROTO_TCP:
            sync = _merge_tcp_peer(st.src, src) + _merge_tcp_peer(st.dst, dst)
            if fin_acked(st):
                # New knowledge the peer cannot derive (it has not seen the ACK): send
                # it now, whatever the echo holdoff says.
                sync += 1
                self.counters["fin_acked"] += 1
                self._immediate = True
            st.expire = now
            # tcp.first lasts until some node sees a second packet; then the ladder.
            if st.timeout != TM_FIRST or timeout != TM_FIRST:
                set_timeout_ladder(st, st.src, st.dst)
        else:
            sync = 0
            for local, remote in ((st.src, src), (st.dst, dst)):
                if local.state > remote.state:
                    sync += 1
                else:
                    local.state = remote.state
            if sync < 2:
                st.expire = now
                if timeout < PFTM_MAX:
                    st.timeout = timeout
        st.pfsync_time = now
        if sync:
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
        for m in msgs:
            if self._ureq_sent is None:
                continue
            if m.status == BUS_START:
                self.counters["bulk_starts_received"] += 1
                per_frame = max(1, (self.config.mtu - self._minpkt) // self._size["UPD"])
                self._bulkfail = now + 4 + self.filter.limit_states / (per_frame * 100)
                log.info("pfsync: received bulk update start")
            elif m.status == BUS_END:
                self.counters["bulk_ends_received"] += 1
                if now - m.endtime >= self._ureq_sent - 1.0:
                    self.counters["bulk_done"] += 1
                    self._ureq_sent = None
                    self._bulkfail = None
                    self._bulk_tries = 0
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
            "creatorid": f"{self.creatorid:08x}",
            "counters": dict(self.counters),
            "frames_by_action": dict(self.frames_by_action),
            "messages_by_action": dict(self.msgs_by_action),
            "bytes_by_action": dict(self.bytes_by_action),
            "deferred_now": len(self._deferrals),
            "bulk_sending": self._bulk_list is not None,
            "bulk_progress": [self._bulk_pos, len(self._bulk_list)] if self._bulk_list else None,
            "bulk_tries": self._bulk_tries,
        }


_DELETIONS = frozenset(("CLR", "DEL", "DEL_C"))


def _deletions_first(sections: list[Any]) -> list[tuple[int, Any]]:
    """The frame's sections with its deletions (CLR, DEL, DEL_C) moved to the front.

    A state sits in one queue at a time, so no frame both inserts and deletes the same
    state, and applying its deletions first changes nothing for any single state. It
    matters for two states that share a key: a client reusing its source port makes the
    sender replace a closed state by a new one, and the 4.5 section order (INS before
    DEL_C) would have us refuse the new state because the old one still holds its key.
    OpenBSD 4.8 moved DEL_C ahead of INS on the sending side for the same reason; doing
    it on receipt also covers senders that keep the 4.5 order.
    """
    indexed = list(enumerate(sections))
    if not any(sec.action in _DELETIONS for sec in sections[1:]):
        return indexed
    return sorted(indexed, key=lambda item: item[1].action not in _DELETIONS)


def _merge_tcp_peer(local: Any, remote: wire.StatePeer) -> int:
    """Merge one peer: take every part the remote knows better, keep every part we know
    better, and return 1 if ours was fresher anywhere (so ours must go back).

    Each edge only grows: state, seqlo (what this end has sent) and seqhi (what the other
    end allows) never move backwards. On a split path this matters: one firewall sees the
    sender's data (seqlo) and the other the receiver's ACKs (seqhi) for the same peer, so
    keeping or dropping a peer wholesale, as OpenBSD 4.5 did, loses half of it.
    """
    ls = local.state
    rs = remote.state
    if ls >= PF_TCPS_PROXY_SRC or rs >= PF_TCPS_PROXY_SRC:
        # synproxy states: trust the later phase only.
        if ls > rs:
            return 1
        local.copy_from(remote)
        return 0
    if local.seqlo == 0 and ls <= rs:
        local.copy_from(remote)
        return 0
    if remote.seqlo == 0 and rs <= ls:
        return 1 if (ls > rs or local.seqlo) else 0
    stale = 0
    if ls > rs:
        stale = 1
    elif rs > ls:
        local.state = rs
    d = sdiff(local.seqlo, remote.seqlo)
    if d > 0:
        stale = 1
    elif d < 0:
        local.seqlo = remote.seqlo
    d = sdiff(local.seqhi, remote.seqhi)
    if d > 0:
        stale = 1
    elif d < 0:
        local.seqhi = remote.seqhi
    if local.max_win > remote.max_win:
        stale = 1
    elif remote.max_win > local.max_win:
        local.max_win = remote.max_win
    if remote.wscale and not local.wscale:
        local.wscale = remote.wscale
    if remote.seqdiff and not local.seqdiff:
        local.seqdiff = remote.seqdiff
    if remote.mss and not local.mss:
        local.mss = remote.mss
    return stale


def _merge_sfail(st: State, src: wire.StatePeer, dst: wire.StatePeer, timeout: int,
                 now: float) -> int:  # fmt: skip
    """The pre-2009 merge (pfsync v4, and OpenBSD 4.5's "sfail" codes): an update is
    taken whole or refused whole, except that a fresher src peer is kept when only the
    dst is stale. On a split path each firewall is ahead on the peer it forwards for, so
    it refuses the half it is missing — the stall the thesis measured. Returns the sfail
    code (0 = applied)."""
    ls, ld = st.src, st.dst
    if st.key[1] == IPPROTO_TCP:
        if ls.state > src.state and (ls.state < PF_TCPS_PROXY_SRC or src.state >= PF_TCPS_PROXY_SRC):
            return 1
        if sdiff(ls.seqlo, src.seqlo) > 0:
            return 3
        if ld.state > dst.state:
            ls.copy_from(src)
            return 7
        if ld.state >= TCPS.SYN_SENT and sdiff(ld.seqlo, dst.seqlo) > 0:
            return 4
    else:
        if ls.state > src.state:
            return 5
        if ld.state > dst.state:
            return 6
    ls.copy_from(src)
    ld.copy_from(dst)
    st.expire = now
    if timeout < PFTM_MAX:
        st.timeout = timeout
    return 0
