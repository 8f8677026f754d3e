"""Signals as events of a selectors loop: the handlers only record the signal and the
wakeup fd makes select() return, so the loop acts on it between two batches — never in
the middle of a packet's decision (used by the daemon and by the --workers supervisor)."""

from __future__ import annotations

import contextlib
import logging
import selectors
import signal
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pfcluster.daemon")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class SignalWakeup:
    """Installs the handlers and the wakeup fd; `pending` holds what arrived, in order."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self._old_handlers: dict[int, Any] = {}
        self._sigr: socket.socket | None = None
        self._sigw: socket.socket | None = None
        self._old_wakeup = -1

    def install(self, sel: selectors.BaseSelector, data: Any) -> None:
        self._sigr, self._sigw = socket.socketpair()
        self._sigr.setblocking(False)
        self._sigw.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._sigw.fileno(), warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        sel.register(self._sigr, selectors.EVENT_READ, data)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.pending.append(signum)

    def drain(self) -> None:
        """Empty the wakeup fd (the signals themselves are in `pending`)."""
        if self._sigr is None:
            return
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._sigr.recv(4096):
                pass

    def take(self, reload: Callable[[], dict[str, Any]]) -> int | None:
        """Act on what arrived: SIGHUP reloads (a refused reload keeps the old rules and
        is logged); the first SIGTERM/SIGINT is returned, for the loop to stop on."""
        stop = None
        pending = self.pending
        while pending:
            sig = pending.pop(0)
            if sig == signal.SIGHUP:
                res = reload()
                if not res["ok"]:
                    log.error("reload refused, old rules stay: %s", res["error"])
            elif stop is None:
                stop = sig
        return stop

    def restore(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()
        if self._sigw is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            self._sigw.close()
        if self._sigr is not None:
            self._sigr.close()
        self._sigr = self._sigw = None
