"""keepalived glue: pfsync's carp demotion, Linux style, and a record of VRRP transitions.

On OpenBSD, pfsync demotes carp until its bulk update is done, so a firewall that has just
come up with an empty table does not take the virtual address from a peer that holds the
states. keepalived reads a `track_file`: an integer, multiplied by the configured weight
and added to the instance's priority (below -253: FAULT). `TrackFile` writes 0 there
while sync_ok holds and `-demote` otherwise, and `-demote` again when the daemon stops:
with weight 1, demote 253 puts the priority at 1 (never master while a synced peer is
there, master when alone), demote 254 forces FAULT. The file is replaced by rename, so
keepalived never reads half a number.

`Transitions` keeps what keepalived's notify hook (`pfcluster ctl notify`) reported.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger("pfcluster.vrrp")

STATES = ("MASTER", "BACKUP", "FAULT", "STOP", "DELETED")
DEFAULT_DEMOTE = 253
MAX_KEPT = 32


class TrackFile:
    """The keepalived track_file of this firewall (None path: nothing is written)."""

    __slots__ = ("demote", "path", "value")

    def __init__(self, path: str | None, demote: int = DEFAULT_DEMOTE) -> None:
        self.path = path
        self.demote = demote
        self.value: int | None = None

    def write(self, sync_ok: bool) -> None:
        """0 when synced, -demote otherwise; written only when the value changes. A
        failure is logged, never raised: the data plane must not stop for it."""
        value = 0 if sync_ok else -self.demote
        if self.path is None or value == self.value:
            return
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(f"{value}\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.error("track file %s: %s", self.path, exc.strerror or exc)
            return
        self.value = value
        log.info("vrrp: track file %s = %d (%s)", self.path, value,
                 "sync_ok" if sync_ok else "demoted until the bulk update is done")


class Transitions:
    """The VRRP states keepalived reported, per instance, and the last few changes."""

    __slots__ = ("history", "instances")

    def __init__(self) -> None:
        self.instances: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []

    def record(self, state: str, name: str = "", kind: str = "INSTANCE",
               priority: int | None = None, sync_ok: bool | None = None) -> dict[str, Any]:
        """One notify call; logs it with the sync state the firewall had then."""
        entry = {"time": round(time.time(), 3), "kind": kind, "name": name, "state": state,
                 "priority": priority, "sync_ok": sync_ok}
        prev = self.instances.get(name)
        entry["changes"] = (prev["changes"] + 1) if prev else 1
        self.instances[name] = entry
        self.history.append(entry)
        del self.history[:-MAX_KEPT]
        log.info("vrrp: %s %s -> %s%s (sync_ok %s)", kind.lower(), name or "-", state,
                 "" if priority is None else f" priority {priority}",
                 "?" if sync_ok is None else str(sync_ok).lower())
        return entry

    def lines(self) -> list[str]:
        """`ctl info`'s vrrp section (nothing until keepalived has reported)."""
        if not self.instances:
            return []
        out = ["vrrp"]
        for name, e in sorted(self.instances.items()):
            when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
            out.append(f"  {name or '-':<25}{e['state']:>14}  since {when}, "
                       f"{e['changes']} reports")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"instances": dict(self.instances), "history": list(self.history)}


def notify_request(req: dict[str, Any], trans: Transitions, sync_ok: bool) -> dict[str, Any]:
    """The control socket's `notify` command: validate and record."""
    state = str(req.get("state", "")).upper()
    if state not in STATES:
        return {"ok": False, "error": f"notify: state {state!r} is not one of "
                f"{', '.join(STATES)}"}
    prio = req.get("priority")
    if prio is not None and (isinstance(prio, bool) or not isinstance(prio, int)):
        return {"ok": False, "error": "notify: priority must be an integer"}
    entry = trans.record(state, str(req.get("name", ""))[:64], str(req.get("kind", "INSTANCE"))
                         [:16].upper(), prio, sync_ok)
    return {"ok": True, "text": [f"recorded {entry['name'] or '-'} {state}"], "data": entry}


def syncok_answer(sync_ok: bool) -> dict[str, Any]:
    """The control socket's `syncok` command (`ctl syncok` exits 1 when false)."""
    return {"ok": True, "text": [f"sync_ok {str(sync_ok).lower()}"],
            "data": {"sync_ok": sync_ok}}
