"""pfsync v4 (OpenBSD <= 4.4): the baseline the v5 thesis measured against.

The v4 wire format is what the thesis diff removes from ``if_pfsync.h`` 1.35: a
20-byte header carrying ONE action and a u8 count, followed by ``count`` records of
that action's type. The full state record is the same 240-byte ``pfsync_state`` as
OpenBSD 4.5 (pfvar.h 1.282 is shared), so it reuses ``wire.State``; the compressed
records have their own v4 layouts.
"""

from __future__ import annotations

import struct
from typing import Any

from pfcluster.pfsync import wire
from pfcluster.pfsync.layout import PEER_FMT, PEER_VALUES
from pfcluster.pfsync.wire import Codec, Message, State, StatePeer, Tdb, WireError, cstr

# --- v4 wire ---------------------------------------------------------------------

PFSYNC_V4_VERSION = 4

V4_ACTIONS: dict[str, int] = {
    "CLR": 0, "INS": 1, "UPD": 2, "DEL": 3, "UPD_C": 4, "DEL_C": 5, "INS_F": 6,
    "DEL_F": 7, "UREQ": 8, "BUS": 9, "TDB_UPD": 10,
}
V4_ACTION_NAMES: dict[int, str] = {v: k for k, v in V4_ACTIONS.items()}
V4_MAX_RECORDS = 255  # the header's count is a u8
V4_ACT_MAX = 11
# tcpdump 4.4 PFSYNC_ACTIONS strings.
V4_TCPDUMP_NAMES = ("CLR ST", "INS ST", "UPD ST", "DEL ST", "UPD ST COMP", "DEL ST COMP",
                    "INS FR", "DEL FR", "UPD REQ", "BLK UPD STAT", "TDB UPD")


class StateUpd(Message):
    """struct pfsync_state_upd (v4 "compressed" update, 88 bytes)."""

    __slots__ = ("id", "src", "dst", "creatorid", "expire", "timeout", "updates")  # noqa: RUF023 (C field order)

    def __init__(self, id: int = 0, src: StatePeer | None = None, dst: StatePeer | None = None,
                 creatorid: int = 0, expire: int = 0, timeout: int = 0, updates: int = 0) -> None:
        self.id = id
        self.src = src if src is not None else StatePeer()
        self.dst = dst if dst is not None else StatePeer()
        self.creatorid = creatorid
        self.expire = expire
        self.timeout = timeout
        self.updates = updates


class StateDel(Message):
    """struct pfsync_state_del (16 bytes); ``src_state``/``dst_state`` are the C
    ``src.state``/``dst.state`` bytes."""

    __slots__ = ("id", "creatorid", "src_state", "dst_state")  # noqa: RUF023 (C field order)

    def __init__(self, id: int = 0, creatorid: int = 0, src_state: int = 0,
                 dst_state: int = 0) -> None:
        self.id = id
        self.creatorid = creatorid
        self.src_state = src_state
        self.dst_state = dst_state


class StateUpdReq(wire.InsAck):
    """struct pfsync_state_upd_req (16 bytes: id, creatorid, pad)."""

    __slots__ = ()


class StateClr(wire.Clr):
    """struct pfsync_state_clr (24 bytes: ifname, creatorid, pad)."""

    __slots__ = ()


class StateBus(wire.Bus):
    """struct pfsync_state_bus (16 bytes: creatorid, endtime, status, pad[7])."""

    __slots__ = ()


def _peer(t: tuple[Any, ...], i: int) -> StatePeer:
    return StatePeer(*t[i : i + PEER_VALUES])


_SRC = 1  # StateUpd tuple: id, src peer, dst peer, creatorid, expire, timeout, updates
_DST = _SRC + PEER_VALUES
_TAIL = _DST + PEER_VALUES
_V4_CODECS: dict[int, Codec] = {
    V4_ACTIONS["CLR"]: Codec("!16sI4x", StateClr, lambda t: StateClr(cstr(t[0]), t[1]),
                             lambda m: (m.ifname.encode("latin-1"), m.creatorid)),
    V4_ACTIONS["UPD_C"]: Codec("!Q" + PEER_FMT + PEER_FMT + "IIBB6x", StateUpd,
                               lambda t: StateUpd(t[0], _peer(t, _SRC), _peer(t, _DST),
                                                  *t[_TAIL : _TAIL + 4]),
                               lambda m: (m.id, *m.src.astuple(), *m.dst.astuple(), m.creatorid,
                                          m.expire, m.timeout, m.updates)),
    V4_ACTIONS["DEL_C"]: Codec("!QIBB2x", StateDel, lambda t: StateDel(*t),
                               lambda m: (m.id, m.creatorid, m.src_state, m.dst_state)),
    V4_ACTIONS["UREQ"]: Codec("!QI4x", StateUpdReq, lambda t: StateUpdReq(*t),
                              lambda m: (m.id, m.creatorid)),
    V4_ACTIONS["BUS"]: Codec("!IIB7x", StateBus, lambda t: StateBus(*t),
                             lambda m: (m.creatorid, m.endtime, m.status)),
    V4_ACTIONS["TDB_UPD"]: Codec("!I28sIQBB2x", Tdb, lambda t: Tdb(*t),
                                 lambda m: (m.spi, m.dst, m.rpl, m.cur_bytes, m.sproto,
                                            m.updates)),
}
# INS, UPD and DEL carry the full OpenBSD 4.5 pfsync_state (pfvar.h 1.282 is shared).
_codec = wire.TABLES["openbsd45"][wire.ACTIONS["openbsd45"]["INS"]][2]
assert _codec is not None
_STATE_CODEC: Codec = _codec
for _name in ("INS", "UPD", "DEL"):
    _V4_CODECS[V4_ACTIONS[_name]] = _STATE_CODEC

_V4_CHECKS = {
    V4_ACTIONS["INS"]: wire.make_ins_check("openbsd45"),
    V4_ACTIONS["UPD"]: wire.peer_bad,
    V4_ACTIONS["UPD_C"]: wire.peer_bad,
}


def v4_message_size(action: int | str) -> int:
    """Size of one v4 record of ``action`` (0 for the unimplemented INS_F/DEL_F)."""
    if isinstance(action, str):
        action = V4_ACTIONS[action]
    codec = _V4_CODECS.get(action)
    if codec is None:
        if action in V4_ACTION_NAMES:
            return 0
        raise KeyError(action)
    return codec.size


class V4Frame:
    """A pfsync v4 packet: header (version, af, action, count, pf_chksum) + records."""

    __slots__ = ("action", "af", "count", "errors", "invalid", "messages", "pf_chksum", "version")

    def __init__(self, action: int = 0, messages: list[Any] | None = None, count: int | None = None,
                 af: int = 0, pf_chksum: bytes = bytes(16), version: int = PFSYNC_V4_VERSION,
                 errors: list[str] | None = None, invalid: list[int] | None = None) -> None:
        self.version = version
        self.af = af
        self.action = action
        self.messages = messages if messages is not None else []
        self.count = len(self.messages) if count is None else count
        self.pf_chksum = pf_chksum
        self.errors = errors if errors is not None else []
        self.invalid = invalid if invalid is not None else []

    @property
    def action_name(self) -> str:
        return V4_ACTION_NAMES.get(self.action, f"ACT{self.action}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, V4Frame):
            return NotImplemented
        return (self.version, self.af, self.action, self.count, bytes(self.pf_chksum),
                self.messages, self.errors) == (other.version, other.af, other.action,
                other.count, bytes(other.pf_chksum), other.messages, other.errors)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"V4Frame({self.action_name}, count={self.count}, messages={self.messages!r}, "
                f"errors={self.errors!r})")


_V4_HEADER = struct.Struct("!BBBB16s")
V4_HEADER_LEN = _V4_HEADER.size  # 20


def decode_v4(data: bytes | bytearray | memoryview) -> V4Frame:
    """Decode a v4 payload as OpenBSD 4.4 ``pfsync_input`` would: hdrops, badver, badact
    (action >= 11 or the unimplemented INS_F/DEL_F), badlen (count records do not fit);
    per-record badval notes go to ``errors``. Raises only ``WireError``."""
    mv = wire.byte_view(data)
    if len(mv) < V4_HEADER_LEN:
        raise WireError("hdrops", f"{len(mv)} bytes, header needs {V4_HEADER_LEN}")
    version, af, action, count, cksum = _V4_HEADER.unpack_from(mv, 0)
    frame = V4Frame(action, [], count, af, cksum, version)

    def fail(reason: str, detail: str) -> WireError:
        frame.errors.append(f"{reason}: {detail}")
        return WireError(reason, detail, frame)

    if version != PFSYNC_V4_VERSION:
        raise fail("badver", f"version {version}, expected {PFSYNC_V4_VERSION}")
    codec = _V4_CODECS.get(action)
    if codec is None:
        what = "unsupported" if action in V4_ACTION_NAMES else "unknown"
        raise fail("badact", f"{what} action {V4_ACTION_NAMES.get(action, action)}")
    # Every codec here has a nonzero size; the count is checked against what arrived
    # before any record is read, so no other exception can come out of the walk (one
    # that does is a bug, and the fuzzers should see it as such).
    size = codec.size
    avail = len(mv) - V4_HEADER_LEN
    if size * count > avail:
        frame.messages = codec.decode_many(mv, V4_HEADER_LEN, avail // size, size)
        raise fail("badlen", f"count {count} needs {size * count} bytes, {avail} left")
    frame.messages = codec.decode_many(mv, V4_HEADER_LEN, count, size)
    check = _V4_CHECKS.get(action)
    if check is not None:
        name = frame.action_name
        for i, m in enumerate(frame.messages):
            bad = check(m)
            if bad:
                frame.errors.append(f"badval: {name}[{i}] {bad}")
                frame.invalid.append(i)
    return frame


def encode_v4(frame: V4Frame) -> bytes:
    """Encode a v4 frame (count = number of records, at most 255)."""
    codec = _V4_CODECS.get(frame.action)
    if codec is None:
        raise WireError("encode", f"cannot encode v4 action {frame.action}")
    n = len(frame.messages)
    if n > V4_MAX_RECORDS:
        raise WireError("encode", f"{n} records; the v4 count is a u8")
    buf = bytearray(V4_HEADER_LEN + n * codec.size)
    try:
        _V4_HEADER.pack_into(buf, 0, frame.version, frame.af, frame.action, n,
                             bytes(frame.pf_chksum))
        off = V4_HEADER_LEN
        for m in frame.messages:
            codec.encode_into(buf, off, m)
            off += codec.size
    except (struct.error, AttributeError, TypeError, IndexError, UnicodeError) as e:
        raise WireError("encode", f"{type(e).__name__}: {e}") from None
    return bytes(buf)


__all__ = [
    "PFSYNC_V4_VERSION",
    "V4_ACTIONS",
    "V4_ACTION_NAMES",
    "State",
    "StateBus",
    "StateClr",
    "StateDel",
    "StateUpd",
    "StateUpdReq",
    "Tdb",
    "V4Frame",
    "decode_v4",
    "encode_v4",
    "v4_message_size",
]

# --- end of v4 wire (v4 behaviour goes below) --------------------------------------


# --- v4 behaviour ------------------------------------------------------------------

# The v4 record each engine message becomes (v4 calls the update request UREQ).
V4_ENGINE_ACTIONS = {"INS": "INS", "UPD": "UPD", "UPD_C": "UPD_C", "DEL_C": "DEL_C",
                     "UPD_REQ": "UREQ", "CLR": "CLR", "BUS": "BUS"}


class V4Policy:
    """pfsync before 2009, as the pfsync engine runs it: one message type per frame
    (a frame is sent whenever the next message is of another type, or at 255 records),
    only 1 s / maxupd / MTU pacing, no split-path detection, no deferral and no
    INS_ACK, and the whole-or-nothing merge. The state record is OpenBSD 4.5's."""

    name = "v4"
    dialect = "openbsd45"
    state_dialect = "openbsd45"
    split_detection = False
    defers = False
    subheader = 0

    def __init__(self) -> None:
        from pfcluster.pfsync.policy import IP_HEADER

        self.sizes = {name: v4_message_size(v4) for name, v4 in V4_ENGINE_ACTIONS.items()}
        self.sizes["INS_ACK"] = 0  # v4 has no insert acknowledgement
        self.min_frame = IP_HEADER + V4_HEADER_LEN

    def merge_rule(self, configured: str) -> Any:
        from pfcluster.pfsync.merge import merge_thesis

        return merge_thesis

    def must_send_before(self, kind: str, pending_kind: str | None, pending: int) -> str | None:
        if pending_kind is not None and pending_kind != kind:
            return "batch_sends"
        if pending >= V4_MAX_RECORDS:
            return "full_sends"
        return None

    def upd_c(self, st: Any, expire: int, updates: int) -> StateUpd:
        from pfcluster.pfsync.convert import peer_to_wire

        return StateUpd(st.id, peer_to_wire(st.src), peer_to_wire(st.dst), st.creatorid,
                        expire, st.timeout, updates & 0xFF)

    def del_c(self, st: Any) -> StateDel:
        return StateDel(st.id, st.creatorid, st.src.state, st.dst.state)

    def ins_ack(self, st: Any) -> Any:
        raise WireError("badact", "pfsync v4 has no INS_ACK")

    def ureq(self, state_id: int, creatorid: int) -> StateUpdReq:
        return StateUpdReq(state_id, creatorid)

    def clr(self, ifname: str, creatorid: int) -> StateClr:
        return StateClr(ifname, creatorid)

    def bus(self, creatorid: int, endtime: int, status: int) -> StateBus:
        return StateBus(creatorid, endtime, status)

    def layout(self, queued: list[tuple[str, list[Any]]], ureq: list[Any],
               plus: list[tuple[str, list[Any]]]) -> list[tuple[str, list[Any]]]:
        return [*queued, *([("UPD_REQ", ureq)] if ureq else []), *plus]

    def frames(self, sections: list[tuple[str, list[Any]]],
               checksum: bytes) -> list[tuple[bytes, list[tuple[str, int]]]]:
        out = []
        for name, msgs in sections:
            action = V4_ACTIONS[V4_ENGINE_ACTIONS[name]]
            for i in range(0, len(msgs), V4_MAX_RECORDS):
                chunk = msgs[i : i + V4_MAX_RECORDS]
                frame = V4Frame(action, chunk, pf_chksum=checksum)
                out.append((encode_v4(frame), [(name, len(chunk))]))
        return out

    def decode(self, payload: bytes | bytearray | memoryview,
               counters: dict[str, int]) -> tuple[list[tuple[str, list[Any]]], bytes] | None:
        try:
            frame = decode_v4(payload)
        except WireError as e:
            counters[e.reason if e.reason in counters else "badlen"] += 1
            return None
        if frame.invalid:
            counters["badval"] += len(frame.invalid)
        bad = set(frame.invalid)
        msgs = [m for i, m in enumerate(frame.messages) if i not in bad]
        if msgs and isinstance(msgs[0], State):
            # the v4 state record is the 4.5 one: hand the engine the same tuples
            msgs = [tuple(_STATE_CODEC.to_tuple(m)) for m in msgs]
        return [(frame.action_name, msgs)], bytes(frame.pf_chksum)
