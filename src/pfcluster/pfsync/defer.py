"""Insert deferral (pfsync_defer): the packet that created a state is held until a peer
acknowledges the insert, so the peer knows the state before any reply can reach it.

A held packet leaves as `Released(handle, accept)`: accepted when acknowledged, timed
out, pushed out by the limit, or overtaken by a later packet of its state; dropped when
a peer's update or a removal makes the held packet stale.
"""

from __future__ import annotations

from pfcluster.pf.constants import PFSTATE_ACK
from pfcluster.pf.state import State
from pfcluster.pfsync.events import Event, Released


class Deferrals:
    """The held packets, oldest first (a dict keeps insertion order)."""

    __slots__ = ("_held", "counters", "events", "limit", "timeout")

    def __init__(self, limit: int, timeout: float, counters: dict[str, int],
                 events: list[Event]) -> None:
        self._held: dict[State, tuple[object, float]] = {}
        self.limit = limit
        self.timeout = timeout
        self.counters = counters
        self.events = events

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, st: State) -> bool:
        return st in self._held

    def hold(self, st: State, handle: object, now: float) -> None:
        if st in self._held:  # never lose a held packet's verdict
            self.release(st, accept=True)
        if len(self._held) >= self.limit:
            self.counters["defer_overlimit"] += 1
            self.release(next(iter(self._held)), accept=True)
        st.state_flags |= PFSTATE_ACK
        self._held[st] = (handle, now + self.timeout)
        self.counters["deferred"] += 1

    def release(self, st: State, accept: bool) -> None:
        """Let the held packet of `st` go (or drop it); no-op if none is held."""
        st.state_flags &= ~PFSTATE_ACK
        held = self._held.pop(st, None)
        if held is None:
            return
        if not accept:
            self.counters["defer_dropped"] += 1
        self.events.append(Released(held[0], accept, held[1] - self.timeout))

    def next_deadline(self) -> float | None:
        for _handle, deadline in self._held.values():
            return deadline
        return None

    def expire(self, now: float) -> None:
        for st, (_handle, deadline) in list(self._held.items()):
            if deadline > now:
                break
            self.counters["defer_timeout"] += 1
            self.release(st, accept=True)

    def release_all(self) -> None:
        for st in list(self._held):
            self.release(st, accept=True)
