"""pf states and the state table.

A state key is the tuple ``(af, proto, addr0, addr1, port0, port1)`` built the way pf
builds it: for a packet tested ``in`` the source goes in slot 0, for ``out`` in slot 1.
So a connection forwarded by a router has two states (one per interface), and a reply
finds the state of its direction's interface — pf's semantics, and the reason a split
path needs both states synced.

A translated state (nat-to, rdr-to) has two keys, as in pf: `key` is the wire key (the
addresses on this state's interface) and `nat.skey` the stack key (the addresses on the
other side of the translation). Both index the table; a packet tested `in` must match the
wire key, one tested `out` the stack key (pf_find_state's check). Untranslated states
have `nat` None and one key.

The table is indexed twice, both O(1): by key (the packet path) and by
(creator id, 64-bit id) (the pfsync path). Purging walks a snapshot of the table in
slices, like pf's purge thread, so no packet ever pays for an O(n) scan.
"""

from __future__ import annotations

import math
import os
from array import array
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pfcluster.pf.constants import PFTM, PFTM_MAX

TM_FIRST_PACKET = int(PFTM.TCP_FIRST_PACKET)

if TYPE_CHECKING:
    from pfcluster.pf.route import StateRoute
    from pfcluster.pf.ruleset import Rule
    from pfcluster.pf.scrub import Scrub

StateKey = tuple[int, int, bytes, bytes, int, int]


class NatInfo:
    """What a translated state has beyond an untranslated one: the stack key and the
    rule that translated (pfsync's nat_rule). One object, so untranslated states pay a
    single empty slot."""

    __slots__ = ("rule", "skey")

    def __init__(self, skey: StateKey, rule: Rule | None = None) -> None:
        self.skey = skey
        self.rule = rule

    def __repr__(self) -> str:
        return f"NatInfo({self.skey!r})"

# pfsync queue membership of a state (PFSYNC_S_*); NONE = not queued.
SYNC_NONE = 0xFF

# Never heard from / never sent to a pfsync peer. One shared float: a fresh -inf per
# state would cost two boxed floats each.
NEVER = -math.inf

# A State's buffer: every field that is an unsigned 32-bit number and is not read by
# the pfsync engine on each packet, unboxed. First pf's two struct pf_state_peer, `src`
# at SRC and `dst` at DST, each field at that base plus its offset (SEQLO..WSCALE).
SEQLO, SEQHI, SEQDIFF, MAX_WIN, MSS, PSTATE, WSCALE = range(7)
PEER_FIELDS = ("seqlo", "seqhi", "seqdiff", "max_win", "mss", "state", "wscale")
PEER_LEN = len(PEER_FIELDS)
SRC = 0
DST = PEER_LEN
SRC_STATE = SRC + PSTATE
DST_STATE = DST + PSTATE
# The highest ack sent by src (ACK_SRC) and by dst (ACK_DST) beyond what we know the
# other end sent; 0 = none. On a split path the FIN and its ACK cross different
# firewalls, and pfsync must still be able to tell that a FIN was acknowledged.
ACK_SRC = 2 * PEER_LEN
ACK_DST = ACK_SRC + 1
# Then the state's direction (PF_IN/PF_OUT), creator id, log flag and whether it is in
# its table; State has a property of each name.
DIRECTION = ACK_DST + 1
CREATORID = DIRECTION + 1
LOG = CREATORID + 1
LINKED = LOG + 1
_ITEMS = LINKED + 1  # a multiple of 4: the allocator rounds buffers to 16 bytes
_ZERO = array("I", bytes(4 * _ITEMS))
_new_array: Any = array.__new__

if TYPE_CHECKING:
    _Base = array[int]
else:
    _Base = array


def _item(i: int, doc: str) -> Any:
    """A property for item `i` of a State's buffer."""

    def get(self: State) -> int:
        return self[i]

    def put(self: State, value: int) -> None:
        self[i] = value

    return property(get, put, doc=doc)


def _peer_field(off: int) -> Any:
    """A property for the field at `off` of the viewed peer."""

    def get(self: Peer) -> int:
        return self._st[self._base + off]

    def put(self: Peer, value: int) -> None:
        self._st[self._base + off] = value

    return property(get, put, doc=f"pf_state_peer.{PEER_FIELDS[off]}")


class Peer:
    """One end of a connection as pf tracks it (struct pf_state_peer): a view of the
    fields a State keeps in its buffer, for code off the packet path (which indexes
    the State directly)."""

    __slots__ = ("_base", "_st")

    seqlo = _peer_field(SEQLO)
    seqhi = _peer_field(SEQHI)
    seqdiff = _peer_field(SEQDIFF)
    max_win = _peer_field(MAX_WIN)
    mss = _peer_field(MSS)
    state = _peer_field(PSTATE)
    wscale = _peer_field(WSCALE)

    def __init__(self, st: State, base: int) -> None:
        self._st = st
        self._base = base

    def copy_from(self, other: Any) -> None:
        """Take every tracked field from a Peer or a pfsync_state_peer record."""
        self._st.set_peer(self._base, other)

    def as_tuple(self) -> tuple[int, ...]:
        b = self._base
        return tuple(self._st[b : b + PEER_LEN])

    def __repr__(self) -> str:
        return "Peer(" + ", ".join(f"{f}={v}" for f, v in zip(PEER_FIELDS, self.as_tuple())) + ")"


class State(_Base):
    """A pf state. `expire` is the time of the last accepted packet, as in pf.

    The state is an ``array("I")`` of its small unsigned fields (its two peers, indexed
    by SRC/DST plus SEQLO..WSCALE, the split-path acks, DIRECTION, CREATORID, LOG,
    LINKED), with objects, times, counters and what the pfsync engine reads on every
    packet in slots: a million states then hold no Peer objects and no boxed sequence
    numbers (docs/memory.md). The packet path indexes the buffer; everything else may
    use the `src`/`dst` views and the named properties. Equality and hashing are by
    identity, as for any object.
    """

    __slots__ = (
        "bytes0",
        "bytes1",
        "creation",
        "expire",
        "id",
        "ifname",
        "key",
        "packets0",
        "packets1",
        "pfsync_sent",
        "pfsync_time",
        "rule",
        "state_flags",
        "sync_state",
        "sync_updates",
        "timeout",
    )

    key: StateKey
    id: int
    # None here; a NatState (a translated state) has its own slot: untranslated states,
    # nearly all of them, do not pay 8 bytes for it
    nat: NatInfo | None = None
    scrub: Scrub | None = None  # a ScrubState's own slot
    route: StateRoute | None = None  # a RouteState's own slot (pf/route.py)
    ifname: str
    rule: Rule | None
    creation: float
    expire: float
    timeout: int
    packets0: int
    packets1: int
    bytes0: int
    bytes1: int
    state_flags: int
    sync_state: int
    sync_updates: int
    pfsync_time: float
    pfsync_sent: float

    def __new__(
        cls,
        key: StateKey,
        direction: int,
        creatorid: int,
        state_id: int,
        now: float,
        rule: Rule | None = None,
        ifname: str = "all",
        peers: tuple[int, ...] | None = None,
    ) -> State:
        """`peers`: both peers' fields in buffer order (an importer has them at hand)."""
        if peers is None:
            self: State = _new_array(cls, "I", _ZERO)
            self[DIRECTION] = direction
            self[CREATORID] = creatorid
        else:
            self = _new_array(cls, "I", (*peers, 0, 0, direction, creatorid, 0, 0))
        self.key = key
        self.id = state_id
        self.ifname = ifname
        self.rule = rule
        self.creation = now
        self.expire = now
        self.timeout = TM_FIRST_PACKET
        self.packets0 = 0
        self.packets1 = 0
        self.bytes0 = 0
        self.bytes1 = 0
        self.state_flags = 0
        self.sync_state = SYNC_NONE
        self.sync_updates = 0
        self.pfsync_time = NEVER
        self.pfsync_sent = NEVER
        return self

    direction = _item(DIRECTION, "PF_IN or PF_OUT: the direction of the packet that made it")
    creatorid = _item(CREATORID, "the host id of the firewall that made it")
    log = _item(LOG, "non-zero: log its packets")
    linked = _item(LINKED, "non-zero while it is in a StateTable")

    __hash__ = object.__hash__  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    # -- derived views -------------------------------------------------------------
    @property
    def src(self) -> Peer:
        return Peer(self, SRC)

    @property
    def dst(self) -> Peer:
        return Peer(self, DST)

    def set_peer(self, base: int, p: Any) -> None:
        """Peer `base` (SRC or DST) takes every tracked field of `p` (a Peer or a
        pfsync_state_peer record)."""
        self[base : base + PEER_LEN] = array(
            "I", (p.seqlo, p.seqhi, p.seqdiff, p.max_win, p.mss, p.state, p.wscale))

    @property
    def acks(self) -> list[int] | None:
        """[ACK_SRC, ACK_DST] as a list, None when neither was recorded."""
        a, b = self[ACK_SRC], self[ACK_DST]
        return [a, b] if a or b else None

    @acks.setter
    def acks(self, value: list[int] | None) -> None:
        self[ACK_SRC], self[ACK_DST] = value if value is not None else (0, 0)

    @property
    def skey(self) -> StateKey:
        """The stack key (the wire key when the state is not translated)."""
        nat = self.nat
        return self.key if nat is None else nat.skey

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


class NatState(State):
    """A translated state: `nat` holds its stack key (`key` is the wire key)."""

    __slots__ = ("nat",)

    nat: NatInfo | None


class ScrubState(NatState):
    """A state with scrub options (pf's s->min_ttl, max_mss, set_tos, scrub flags), kept
    apart like NatState so other states do not pay for the slot; `nat` may be None."""

    __slots__ = ("scrub",)

    scrub: Scrub | None


class RouteState(ScrubState):
    """A routed state (route-to/reply-to: pf's st->rt, rt_addr, rt_kif), apart like
    ScrubState; `nat` and `scrub` may be None."""

    __slots__ = ("route",)

    route: StateRoute | None


class StateTable:
    """States by key and by (creator id, id); a sliced purge walk."""

    __slots__ = ("_by_id", "_scan", "_scan_pos", "by_key", "inserts", "removals", "searches",
                 "translated")

    def __init__(self) -> None:
        # States by key. The packet path reads it directly (a method call and len()
        # through __len__ cost as much as the lookup); only this class changes it.
        self.by_key: dict[StateKey, State] = {}
        # translated states in the table: each holds two entries of by_key
        self.translated = 0
        self._by_id: dict[int, dict[int, State]] = {}
        self._scan: list[State] = []
        self._scan_pos = 0
        self.searches = 0
        self.inserts = 0
        self.removals = 0

    def __len__(self) -> int:
        return len(self.by_key) - self.translated

    def __iter__(self) -> Iterator[State]:
        if not self.translated:
            return iter(list(self.by_key.values()))
        return iter(list({id(st): st for st in self.by_key.values()}.values()))

    def get(self, key: StateKey) -> State | None:
        self.searches += 1
        return self.by_key.get(key)

    def peek(self, key: StateKey) -> State | None:
        """The state holding `key`, without counting a search (inserts use it)."""
        return self.by_key.get(key)

    def by_id(self, creatorid: int, state_id: int) -> State | None:
        ids = self._by_id.get(creatorid)
        return ids.get(state_id) if ids is not None else None

    def insert(self, st: State) -> bool:
        """Add a state; False if one of its keys or its (creatorid, id) is taken."""
        by_key = self.by_key
        if st.key in by_key:
            return False
        nat = st.nat
        if nat is not None and nat.skey in by_key:
            return False
        creatorid = st[CREATORID]
        ids = self._by_id.get(creatorid)
        if ids is None:
            ids = self._by_id[creatorid] = {}
        elif st.id in ids:
            return False
        by_key[st.key] = st
        if nat is not None:
            by_key[nat.skey] = st
            self.translated += 1
        ids[st.id] = st
        st[LINKED] = 1
        self.inserts += 1
        return True

    def remove(self, st: State) -> bool:
        if not st[LINKED]:
            return False
        st[LINKED] = 0
        if self.by_key.get(st.key) is st:
            del self.by_key[st.key]
        nat = st.nat
        if nat is not None:
            self.translated -= 1
            if self.by_key.get(nat.skey) is st:
                del self.by_key[nat.skey]
        creatorid = st[CREATORID]
        ids = self._by_id.get(creatorid)
        if ids is not None and ids.get(st.id) is st:
            del ids[st.id]
            if not ids:
                del self._by_id[creatorid]
        self.removals += 1
        return True

    def by_creator(self, creatorid: int) -> list[State]:
        return list(self._by_id.get(creatorid, {}).values())

    def count_by_creator(self) -> dict[int, int]:
        """States per creator id (one len() per creator, for metrics)."""
        return {cid: len(ids) for cid, ids in self._by_id.items() if ids}

    def next_purge_slice(self, count: int) -> list[State]:
        """The next `count` states of the purge walk; a new snapshot starts each lap."""
        if self._scan_pos >= len(self._scan):
            self._scan = list(self)
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
