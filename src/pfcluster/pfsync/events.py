"""What the pfsync engine tells its caller besides frames to send, pulled from one
place (`Engine.take_events()`), in the order they happened."""

from __future__ import annotations


class Released:
    """A held (deferred) packet's verdict: give it now, before any later packet's.
    `since` is when it was held (the caller's clock), for the hold-time histogram."""

    __slots__ = ("accept", "handle", "since")

    def __init__(self, handle: object, accept: bool, since: float = 0.0) -> None:
        self.handle = handle
        self.accept = accept
        self.since = since

    def __repr__(self) -> str:
        return f"Released({self.handle!r}, {self.accept})"


class SyncOk:
    """sync_ok changed: False while a bulk update is awaited, True once done or alone
    (what pfsync's carp demotion follows)."""

    __slots__ = ("ok",)

    def __init__(self, ok: bool) -> None:
        self.ok = ok

    def __repr__(self) -> str:
        return f"SyncOk({self.ok})"


class LogLine:
    """A line pf or pfsync logs outside any packet's verdict."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"LogLine({self.text!r})"


Event = Released | SyncOk | LogLine

__all__ = ["Event", "LogLine", "Released", "SyncOk"]
