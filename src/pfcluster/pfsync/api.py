"""The pfsync engine as the I/O shell sees it: the one interface the daemon loop, the
data plane and the simulation call (the real `Engine` and the tests' stub both have
it), so the shell never probes an engine with getattr."""

from __future__ import annotations

from typing import Protocol

from pfcluster.pf.state import State
from pfcluster.pfsync.events import Event


class SyncEngine(Protocol):
    sync_ok: bool
    counters: dict[str, int]

    def start(self, now: float) -> None: ...

    def receive(self, payload: bytes, now: float, *, src: str, ttl: int,
                sibling: bool = False) -> None: ...

    def timer(self, now: float) -> None: ...

    def next_deadline(self) -> float | None: ...

    def end_of_batch(self, now: float) -> None: ...

    def take_output(self) -> list[bytes]: ...

    def take_events(self) -> list[Event]: ...

    def pending_releases(self) -> int: ...

    def defer(self, st: State, handle: object, now: float) -> bool: ...

    def release_all(self, now: float) -> None: ...

    def flush(self, now: float) -> None: ...

    def clear_states(self, now: float, ifname: str = "") -> None: ...


__all__ = ["SyncEngine"]
