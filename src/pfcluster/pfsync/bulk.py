"""Bulk update as two small state machines, one per side of the exchange.

Requesting side (a node coming up): send UPD_REQ 0/0, be "not ok" until a peer's
BUS end arrives with a plausible end time; retry every `retry` seconds up to
`max_tries`, then assume it is alone. A BUS start extends the wait by the time the
whole table could take to arrive.

Sending side: on UPD_REQ 0/0, announce BUS start, then walk a snapshot of the table a
few frames per tick, queueing a full UPD for each state nobody updated since the
request, and finish with BUS end carrying the seconds the walk took.
"""

from __future__ import annotations

from collections.abc import Callable

from pfcluster.pf.constants import PFSTATE_NOSYNC, PFTM_MAX
from pfcluster.pf.state import SYNC_NONE, State

BUS_START = 1
BUS_END = 2
# A BUS start buys this much time plus the table's transfer time at 100 frames/s.
BUS_START_GRACE = 4.0
FRAMES_PER_SECOND_ASSUMED = 100


class BulkRequest:
    """The requesting side: idle, or waiting for a peer's bulk update."""

    __slots__ = ("fail_at", "max_tries", "retry", "sent_at", "tries")

    def __init__(self, retry: float, max_tries: int) -> None:
        self.retry = retry
        self.max_tries = max_tries
        self.sent_at: float | None = None
        self.fail_at: float | None = None
        self.tries = 0

    @property
    def waiting(self) -> bool:
        return self.sent_at is not None

    def begin(self, now: float) -> None:
        self.sent_at = now
        self.tries = 0
        self.fail_at = now + self.retry

    def started(self, now: float, limit_states: int, states_per_frame: int) -> None:
        """A peer's BUS start: wait for as long as the largest table could take."""
        self.fail_at = now + BUS_START_GRACE + limit_states / (
            max(1, states_per_frame) * FRAMES_PER_SECOND_ASSUMED)

    def ended(self, now: float, endtime: int) -> bool:
        """A peer's BUS end: done if it covers our request (its walk began after it)."""
        assert self.sent_at is not None
        if now - endtime < self.sent_at - 1.0:
            return False
        self._reset()
        return True

    def timed_out(self, now: float) -> bool:
        """The wait ran out: True to ask again, False to give up (assume alone)."""
        if self.tries < self.max_tries:
            self.tries += 1
            self.fail_at = now + self.retry
            return True
        self._reset()
        return False

    def _reset(self) -> None:
        self.sent_at = None
        self.fail_at = None
        self.tries = 0


class BulkSend:
    """The sending side: idle, or walking a snapshot of the table."""

    __slots__ = ("frames_per_tick", "next_at", "pos", "requested_at", "states", "tick")

    def __init__(self, tick: float, frames_per_tick: int) -> None:
        self.tick = tick
        self.frames_per_tick = frames_per_tick
        self.states: list[State] | None = None
        self.pos = 0
        self.next_at = 0.0
        self.requested_at = 0.0

    @property
    def active(self) -> bool:
        return self.states is not None

    def begin(self, now: float, states: list[State]) -> None:
        self.requested_at = now
        self.states = states
        self.pos = 0
        self.next_at = now

    def wants(self, st: State) -> bool:
        """A state goes in the bulk update unless it is gone, already queued, expiring,
        no-sync, or was updated by a peer since the request (the peer has it)."""
        return (st.linked and st.sync_state == SYNC_NONE and st.timeout < PFTM_MAX
                and st.pfsync_time <= self.requested_at
                and not st.state_flags & PFSTATE_NOSYNC)

    def step(self, now: float, per_frame: int, send: Callable[[list[State]], None],
             queue: Callable[[State], None]) -> bool:
        """Hand the next states to `send` a full frame's worth (`per_frame`) at a time,
        up to `frames_per_tick` frames; the walk's last, partial batch goes to `queue`
        one state at a time (it leaves with the BUS end). True when the walk is done."""
        states = self.states
        if states is None:
            return False
        frames = 0
        i = self.pos
        n = len(states)
        wants = self.wants
        batch: list[State] = []
        while i < n:
            st = states[i]
            i += 1
            if wants(st):
                batch.append(st)
                if len(batch) >= per_frame:
                    send(batch)
                    batch = []
                    frames += 1
                    if frames >= self.frames_per_tick:
                        break
        for st in batch:
            queue(st)
        self.pos = i
        if i >= n:
            self.states = None
            return True
        self.next_at = now + self.tick
        return False

    def progress(self) -> list[int] | None:
        return [self.pos, len(self.states)] if self.states else None


__all__ = ["BUS_END", "BUS_START", "BulkRequest", "BulkSend"]
