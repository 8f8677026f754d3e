"""What the engine asks of a pfsync protocol version: message sizes and builders, how a
frame is laid out and decoded, and which of the thesis' mechanisms apply.

`V5Policy` here is the protocol of the thesis (and its later dialects); `V4Policy` in
`legacy.py` is the pre-2009 behaviour the thesis measured against. The engine is given
one and never asks which it has.
"""

from __future__ import annotations

from typing import Any, Protocol

from pfcluster.pf.state import DST, PEER_LEN, SRC, State
from pfcluster.pfsync import wire
from pfcluster.pfsync.merge import MERGE_RULES, MergeRule

IP_HEADER = 20
PFSYNC_HEADER = 20
SUBHEADER = 4
# Moved ahead of a frame's inserts on receipt. Not CLR: 4.5 and FreeBSD send it after
# the queues, which may still hold the updates of states the CLR is about to flush.
DELETIONS = frozenset(("DEL", "DEL_C"))
# Bytes the EOF section adds to every frame, by dialect (4.5: subheader + hmac[20]).
EOF_BYTES = {"openbsd45": SUBHEADER + 20, "openbsd6": 0}
ENGINE_ACTIONS = ("INS", "INS_ACK", "UPD", "UPD_C", "DEL_C", "UPD_REQ", "CLR", "BUS")

Sections = list[tuple[str, list[Any]]]


class Policy(Protocol):
    """One pfsync protocol version as the engine sees it."""

    name: str
    dialect: str
    state_dialect: str
    sizes: dict[str, int]
    subheader: int
    min_frame: int
    split_detection: bool
    defers: bool

    def merge_rule(self, configured: str) -> MergeRule: ...

    def must_send_before(self, kind: str, pending_kind: str | None, pending: int) -> str | None: ...

    def upd_c(self, st: State, expire: int, updates: int) -> Any: ...

    def del_c(self, st: State) -> Any: ...

    def ins_ack(self, st: State) -> Any: ...

    def ureq(self, state_id: int, creatorid: int) -> Any: ...

    def clr(self, ifname: str, creatorid: int) -> Any: ...

    def bus(self, creatorid: int, endtime: int, status: int) -> Any: ...

    def layout(self, queued: Sections, ureq: list[Any], plus: Sections) -> Sections: ...

    def frames(self, sections: Sections, checksum: bytes) -> list[tuple[bytes, list[tuple[str, int]]]]: ...

    def decode(self, payload: bytes | bytearray | memoryview,
               counters: dict[str, int]) -> tuple[Sections, bytes] | None: ...


SRC_END = SRC + PEER_LEN
DST_END = DST + PEER_LEN


class V5Policy:
    """pfsync v5 (and the openbsd6 layout): mixed frames, split detection, deferral."""

    name = "v5"
    split_detection = True
    defers = True
    subheader = SUBHEADER

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        self.state_dialect = dialect
        self.sizes = {name: wire.record_size(dialect, name) for name in ENGINE_ACTIONS}
        self.min_frame = IP_HEADER + PFSYNC_HEADER + EOF_BYTES.get(dialect, SUBHEADER)
        self._actions = wire.ACTIONS[dialect]
        self._version = wire.VERSION[dialect]
        self._sends_48_order = dialect == "openbsd6"

    def merge_rule(self, configured: str) -> MergeRule:
        return MERGE_RULES[configured]

    def must_send_before(self, kind: str, pending_kind: str | None, pending: int) -> str | None:
        return None  # v5 frames mix every message type; only the MTU bounds them

    def upd_c(self, st: State, expire: int, updates: int) -> Any:
        # straight from the state's buffer: this runs for every state in every frame
        peer = wire.StatePeer
        return wire.UpdC(st.id, peer(0, 0, 0, 0, *st[SRC:SRC_END]),
                         peer(0, 0, 0, 0, *st[DST:DST_END]), st.creatorid, expire,
                         st.timeout, 0)

    def del_c(self, st: State) -> Any:
        return wire.DelC(st.id, st.creatorid)

    def ins_ack(self, st: State) -> Any:
        return wire.InsAck(st.id, st.creatorid)

    def ureq(self, state_id: int, creatorid: int) -> Any:
        return wire.UpdReq(state_id, creatorid)

    def clr(self, ifname: str, creatorid: int) -> Any:
        return wire.Clr(ifname, creatorid)

    def bus(self, creatorid: int, endtime: int, status: int) -> Any:
        return wire.Bus(creatorid, endtime, status)

    def layout(self, queued: Sections, ureq: list[Any], plus: Sections) -> Sections:
        """OpenBSD >= 4.8 sends requests and CLR/BUS before the queues; 4.5 and FreeBSD
        after them."""
        sections: Sections = []
        if self._sends_48_order:
            if ureq:
                sections.append(("UPD_REQ", ureq))
            sections.extend(plus)
            sections.extend(queued)
        else:
            sections.extend(queued)
            if ureq:
                sections.append(("UPD_REQ", ureq))
            sections.extend(plus)
        return sections

    def frames(self, sections: Sections, checksum: bytes) -> list[tuple[bytes, list[tuple[str, int]]]]:
        acts = self._actions
        merged: list[wire.Section] = []
        for name, msgs in sections:
            if not msgs:
                continue
            if merged and merged[-1].action == name:
                # two BUS in one frame share a subheader
                merged[-1].messages.extend(msgs)
                merged[-1].count = len(merged[-1].messages)
            else:
                merged.append(wire.Section(name, acts[name], len(msgs), list(msgs)))
        frame = wire.Frame(self._version, None, checksum, merged)
        return [(wire.encode(frame, self.dialect), [(s.action, s.count) for s in merged])]

    def decode(self, payload: bytes | bytearray | memoryview,
               counters: dict[str, int]) -> tuple[Sections, bytes] | None:
        """The sections to apply, deletions first, bad messages left out; None when the
        frame is dropped whole."""
        try:
            frame = wire.decode(payload, self.dialect, raw_states=True)
        except wire.WireError as e:
            counters[e.reason if e.reason in counters else "badlen"] += 1
            frame = e.frame
            # A header claiming more bytes than arrived: pfsync_input drops the whole
            # packet. An error later in the walk keeps the sections before it, as the
            # kernel has already applied them when it meets the bad one.
            if frame is None or (frame.len is not None and frame.len > len(payload)):
                return None
        invalid = set(frame.invalid)
        if invalid:
            counters["badval"] += len(invalid)
        out: Sections = []
        for si, sec in deletions_first(frame.sections):
            if sec.truncated or sec.skipped:
                continue
            msgs = sec.messages
            if invalid:
                msgs = [m for mi, m in enumerate(msgs) if (si, mi) not in invalid]
            out.append((sec.action, msgs))
        return out, bytes(frame.pfcksum)


def deletions_first(sections: list[Any]) -> list[tuple[int, Any]]:
    """The frame's sections with its deletions (DEL, DEL_C) moved to the front.

    A state sits in one queue at a time, so no frame both inserts and deletes the same
    state, and applying its deletions first changes nothing for any single state. It
    matters for two states that share a key: a client reusing its source port makes the
    sender replace a closed state by a new one, and the 4.5 section order (INS before
    DEL_C) would have us refuse the new state because the old one still holds its key.
    OpenBSD 4.8 moved DEL_C ahead of INS on the sending side for the same reason; doing
    it on receipt also covers senders that keep the 4.5 order.
    """
    indexed = list(enumerate(sections))
    if not any(sec.action in DELETIONS for sec in sections[1:]):
        return indexed
    return sorted(indexed, key=lambda item: item[1].action not in DELETIONS)


__all__ = ["IP_HEADER", "PFSYNC_HEADER", "SUBHEADER", "Policy", "V5Policy", "deletions_first"]
