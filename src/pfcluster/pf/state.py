"""pf states and the state table.

A state key is the tuple ``(af, proto, addr0, addr1, port0, port1)`` built the way pf
builds it: for a packet tested ``in`` the source goes in slot 0, for ``out`` in slot 1.
So a connection forwarded by a router has two states (one per interface), and a reply
finds the state of its direction's interface — pf's semantics, and the reason a split
path needs both states synced.

The table is indexed twice, both O(1): by key (the packet path) and by
(creator id, 64-bit id) (the pfsync path). Purging walks a snapshot of the table in
slices, like pf's purge thread, so no packet ever pays for an O(n) scan.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pfcluster.pf.constants import PFTM, PFTM_MAX

if TYPE_CHECKING:
    from pfcluster.pf.ruleset import Rule

StateKey = tuple[int, int, bytes, bytes, int, int]

# pfsync queue membership of a state (PFSYNC_S_*); NONE = not queued.
SYNC_NONE = 0xFF


class Peer:
    """One end of a connection as pf tracks it (struct pf_state_peer)."""

    __slots__ = ("max_win", "mss", "seqdiff", "seqhi", "seqlo", "state", "wscale")

    def __init__(self) -> None:
        self.seqlo = 0
        self.seqhi = 0
        self.seqdiff = 0
        self.max_win = 0
        self.mss = 0
        self.state = 0
        self.wscale = 0

    def copy_from(self, other: Any) -> None:
        """Take every tracked field from a Peer or a pfsync_state_peer record."""
        self.seqlo = other.seqlo
        self.seqhi = other.seqhi
        self.seqdiff = other.seqdiff
        self.max_win = other.max_win
        self.mss = other.mss
        self.state = other.state
        self.wscale = other.wscale

    def as_tuple(self) -> tuple[int, int, int, int, int, int, int]:
        return (self.seqlo, self.seqhi, self.seqdiff, self.max_win, self.mss, self.state, self.wscale)


class State:
    """A pf state. `expire` is the time of the last accepted packet, as in pf."""

    __slots__ = (
        "acks",
        "bytes0",
        "bytes1",
        "creation",
        "creatorid",
        "direction",
        "dst",
        "expire",
        "id",
        "ifname",
        "key",
        "linked",
        "log",
        "packets0",
        "packets1",
        "pfsync_sent",
        "pfsync_time",
        "rule",
        "src",
        "state_flags",
        "sync_state",
        "sync_updates",
        "timeout",
    )

    def __init__(
        self,
        key: StateKey,
        direction: int,
        creatorid: int,
        state_id: int,
        now: float,
        rule: Rule | None = None,
        ifname: str = "all",
    ) -> None:
        self.key = key
        self.direction = direction
        self.creatorid = creatorid
        self.id = state_id
        self.ifname = ifname
        self.rule = rule
        self.src = Peer()
        self.dst = Peer()
        self.creation = now
        self.expire = now
        self.timeout = int(PFTM.TCP_FIRST_PACKET)
        self.packets0 = 0
        self.packets1 = 0
        self.bytes0 = 0
        self.bytes1 = 0
        self.state_flags = 0
        self.log = 0
        self.sync_state = SYNC_NONE
        self.sync_updates = 0
        self.pfsync_time = -math.inf
        self.pfsync_sent = -math.inf
        self.linked = False
        # [highest ack sent by src, by dst], kept only for acks beyond what we know the
        # other end sent: on a split path the FIN and its ACK cross different firewalls,
        # and pfsync must still be able to tell that a FIN was acknowledged.
        self.acks: list[int] | None = None

    # -- derived views -------------------------------------------------------------
    @property
    def af(self) -> int:
        return self.key[0]

    @property
    def proto(self) -> int:
        return self.key[1]

    @property
    def rule_nr(self) -> int:
        return self.rule.nr if self.rule is not None else -1

    def __repr__(self) -> str:
        from pfcluster.pf.pfctl import format_state_line

        return f"<State {self.id:016x}/{self.creatorid:08x} {format_state_line(self)}>"


class StateTable:
    """States by key and by (creator id, id); a sliced purge walk."""

    __slots__ = ("_by_id", "_by_key", "_scan", "_scan_pos", "inserts", "removals", "searches")

    def __init__(self) -> None:
        self._by_key: dict[StateKey, State] = {}
        self._by_id: dict[int, dict[int, State]] = {}
        self._scan: list[State] = []
        self._scan_pos = 0
        self.searches = 0
        self.inserts = 0
        self.removals = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[State]:
        return iter(list(self._by_key.values()))

    def get(self, key: StateKey) -> State | None:
        self.searches += 1
        return self._by_key.get(key)

    def peek(self, key: StateKey) -> State | None:
        """The state holding `key`, without counting a search (inserts use it)."""
        return self._by_key.get(key)

    def by_id(self, creatorid: int, state_id: int) -> State | None:
        ids = self._by_id.get(creatorid)
        return ids.get(state_id) if ids is not None else None

    def insert(self, st: State) -> bool:
        """Add a state; False if its key or its (creatorid, id) is already taken."""
        if st.key in self._by_key:
            return False
        ids = self._by_id.get(st.creatorid)
        if ids is None:
            ids = self._by_id[st.creatorid] = {}
        elif st.id in ids:
            return False
        self._by_key[st.key] = st
        ids[st.id] = st
        st.linked = True
        self.inserts += 1
        return True

    def remove(self, st: State) -> bool:
        if not st.linked:
            return False
        st.linked = False
        if self._by_key.get(st.key) is st:
            del self._by_key[st.key]
        ids = self._by_id.get(st.creatorid)
        if ids is not None and ids.get(st.id) is st:
            del ids[st.id]
            if not ids:
                del self._by_id[st.creatorid]
        self.removals += 1
        return True

    def by_creator(self, creatorid: int) -> list[State]:
        return list(self._by_id.get(creatorid, {}).values())

    def next_purge_slice(self, count: int) -> list[State]:
        """The next `count` states of the purge walk; a new snapshot starts each lap."""
        if self._scan_pos >= len(self._scan):
            self._scan = list(self._by_key.values())
            self._scan_pos = 0
        start = self._scan_pos
        self._scan_pos = min(len(self._scan), start + count)
        return self._scan[start : self._scan_pos]


def new_creatorid() -> int:
    """A random non-zero 32-bit host id, as pf picks one at boot."""
    while True:
        v = int.from_bytes(os.urandom(4), "big")
        if v:
            return v


def timeout_seconds(st: State, timeouts: list[int]) -> int:
    """The rule's own timeout for the state's current timeout index, or the global one."""
    t = st.timeout
    rule = st.rule
    if rule is not None and rule.timeouts:
        v = rule.timeouts.get(t)
        if v is not None:
            return int(v)
    return timeouts[t] if t < PFTM_MAX else 0


def state_expires(st: State, timeouts: list[int], nstates: int) -> float:
    """pf_state_expires: last activity + the timeout, scaled down adaptively."""
    if st.timeout >= PFTM_MAX:
        return st.expire
    timeout = timeout_seconds(st, timeouts)
    rule = st.rule
    start = end = 0
    states = nstates
    if rule is not None and rule.timeouts and PFTM.ADAPTIVE_START in rule.timeouts:
        start = rule.timeouts.get(PFTM.ADAPTIVE_START, 0)
        end = rule.timeouts.get(PFTM.ADAPTIVE_END, 0)
        states = rule.states_cur
    else:
        start = timeouts[PFTM.ADAPTIVE_START]
        end = timeouts[PFTM.ADAPTIVE_END]
    if end and states > start and start < end:
        if states >= end:
            return st.expire
        return st.expire + timeout * (end - states) / (end - start)
    return st.expire + timeout
