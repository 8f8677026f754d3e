"""Unit tests of the sans-I/O pfsync engine (issue 4): queues, pacing, split detection,
deferral, receiving and merge, bulk update, no-sync, counters and the v4 behaviour.

Time is an argument everywhere: each test drives `now` by hand and passes frames between
engines itself, so every run is identical.
"""

from __future__ import annotations

import random
import socket
import struct

import pytest

from pfcluster.packet import parse
from pfcluster.pf.constants import (
    PF_IN,
    PF_OUT,
    PFSTATE_ACK,
    PFSTATE_NOSYNC,
    TCPS,
    TH_SYN,
)
from pfcluster.pf.filter import Filter
from pfcluster.pf.rules import parse_rules
from pfcluster.pf.state import State
from pfcluster.pfsync import legacy, wire
from pfcluster.pfsync.convert import export_state, peer_to_wire
from pfcluster.pfsync.engine import Engine, EngineConfig, attach
from pfcluster.pfsync.events import Released, SyncOk
from pfcluster.sim.tcpsim import tcp_packet

RULES = """\
block all
pass in on em0 proto tcp to port 5201
pass out on em1 proto tcp
pass in on em0 proto tcp to port 7000 keep state (no-sync)
pass in on em0 proto 240
"""

CLIENT = socket.inet_aton("198.51.100.2")
SERVER = socket.inet_aton("203.0.113.10")
HOST_A = 0x1000A
HOST_B = 0x2000B
HOST_C = 0x3000C
IP = 20
TCPS_ESTABLISHED = int(TCPS.ESTABLISHED)


# --------------------------------------------------------------------------- helpers


def make(hostid: int = HOST_A, now: float = 0.0, **kw: object) -> Engine:
    filt = Filter(parse_rules(RULES, "unit.conf"), hostid=hostid, now=now)
    return attach(filt, EngineConfig(**kw), now)  # type: ignore[arg-type]


def releases(eng: Engine) -> list[tuple[object, bool]]:
    """The held packets the engine let go since the last look: (handle, accept)."""
    return [(e.handle, e.accept) for e in eng.take_events() if isinstance(e, Released)]


def sync_oks(eng: Engine) -> list[bool]:
    """The sync_ok changes since the last look."""
    return [e.ok for e in eng.take_events() if isinstance(e, SyncOk)]


def syn(eng: Engine, i: int, now: float, dport: int = 5201) -> State:
    """A new TCP state on `eng` made by a SYN through its filter (in on em0)."""
    raw = tcp_packet(CLIENT, SERVER, 10000 + i, dport, 1000 * i + 1, 0, TH_SYN, 65535)
    v = eng.filter.test(PF_IN, "em0", parse(raw), now)
    assert v.action == "pass" and v.new_state and v.state is not None
    return v.state


def proto240(eng: Engine, now: float) -> State:
    raw = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 255, 240, 0, CLIENT, SERVER) + bytes(20)
    v = eng.filter.test(PF_IN, "em0", parse(raw), now)
    assert v.action == "pass" and v.state is not None
    return v.state


def established(st: State, seq: int = 5000) -> None:
    st.src.state = st.dst.state = TCPS_ESTABLISHED
    st.src.seqlo, st.src.seqhi, st.src.max_win = seq, seq + 65535, 65535
    st.dst.seqlo, st.dst.seqhi, st.dst.max_win = seq + 100000, seq + 165535, 65535


def flush(eng: Engine, now: float) -> list[bytes]:
    """Send whatever is queued (the 1 s timer fired) and return the frames."""
    eng.flush(now)
    return eng.take_output()


def deliver(frames: list[bytes], dst: Engine, now: float) -> None:
    for f in frames:
        dst.receive(f, now)
    dst.end_of_batch(now)


def actions(frame: bytes, dialect: str = "openbsd45") -> list[str]:
    return [s.action for s in wire.decode(frame, dialect).sections]


def msgs(frame: bytes, action: str, dialect: str = "openbsd45") -> list:
    return list(wire.decode(frame, dialect).messages(action))


def pfsync_frame(sections: list[tuple[str, list]], dialect: str = "openbsd45") -> bytes:
    acts = wire.ACTIONS[dialect]
    secs = [wire.Section(name, acts[name], messages=m) for name, m in sections]
    return wire.encode(wire.Frame(wire.VERSION[dialect], sections=secs), dialect)


def record(
    st: State, now: float = 0.0, dialect: str = "openbsd45", **changes: object
) -> wire.State:
    rec = export_state(st, now, dialect, Filter(parse_rules(RULES)).timeouts, 1)
    for k, v in changes.items():
        setattr(rec, k, v)
    return rec


def updc(st: State, **changes: object) -> wire.UpdC:
    m = wire.UpdC(st.id, peer_to_wire(st.src), peer_to_wire(st.dst), st.creatorid, 10, st.timeout)
    for k, v in changes.items():
        setattr(m, k, v)
    return m


def snapshot(eng: Engine) -> dict:
    return {(s.creatorid, s.id): (s.key, s.src.as_tuple(), s.dst.as_tuple(), s.timeout)
            for s in eng.filter.states}


def paired(**kw: object) -> tuple[Engine, Engine]:
    return make(HOST_A, **kw), make(HOST_B, **kw)


# --------------------------------------------------------------------------- 1. queues


def test_insert_queues_ins_and_counts_bytes() -> None:
    a = make()
    base = a.pending_bytes()
    st = syn(a, 1, 0.0)
    assert a.queued(st) == "INS"
    assert a.pending_bytes() == base + wire.SUBHEADER_LEN + wire.record_size("openbsd45", "INS")
    st2 = syn(a, 2, 0.0)
    assert a.queued(st2) == "INS"
    assert a.pending_bytes() == base + wire.SUBHEADER_LEN + 2 * wire.record_size("openbsd45", "INS")
    # an update of a queued insert stays an insert
    a.state_updated(st, 0.1)
    assert a.queued(st) == "INS" and st.sync_updates == 1


def test_update_request_moves_upd_c_to_upd() -> None:
    a = make()
    st = syn(a, 1, 0.0)
    flush(a, 1.0)
    base = a.pending_bytes()
    a.state_updated(st, 2.0)
    assert a.queued(st) == "UPD_C"
    a.receive(pfsync_frame([("UPD_REQ", [wire.UpdReq(st.id, st.creatorid)])]), 2.1)
    assert a.queued(st) == "UPD"
    assert a.pending_bytes() == base + wire.SUBHEADER_LEN + wire.record_size("openbsd45", "UPD")
    a.end_of_batch(2.1)  # an update request is answered at once
    (frame,) = a.take_output()
    assert actions(frame) == ["UPD", "EOF"]
    assert [m.id for m in msgs(frame, "UPD")] == [st.id]
    assert a.counters["ureq_received"] == 1


def test_delete_cancels_queued_insert() -> None:
    a = make()
    base = a.pending_bytes()
    st = syn(a, 1, 0.0)
    a.filter.remove_state(st, 0.5)
    assert a.queued(st) is None
    assert a.pending_bytes() == base
    a.timer(1.0)
    assert a.take_output() == []


def test_delete_of_announced_state_sends_del_c() -> None:
    a = make()
    st = syn(a, 1, 0.0)
    flush(a, 1.0)
    a.state_updated(st, 1.5)
    a.filter.remove_state(st, 1.6)
    assert a.queued(st) == "DEL_C"
    (frame,) = flush(a, 2.6)
    assert actions(frame) == ["DEL_C", "EOF"]
    assert [(m.id, m.creatorid) for m in msgs(frame, "DEL_C")] == [(st.id, HOST_A)]


def test_frame_built_at_send_time() -> None:
    a = make()
    st = syn(a, 1, 0.0)
    st.src.seqlo = 0x12345678
    st.packets0 = 77
    st.dst.state = TCPS_ESTABLISHED
    a.timer(1.0)
    (frame,) = a.take_output()
    (rec,) = msgs(frame, "INS")
    assert (
        rec.src.seqlo == 0x12345678 and rec.packets[0] == 77 and rec.dst.state == TCPS_ESTABLISHED
    )


SECTION_ORDER = {
    "openbsd45": ["INS", "INS_ACK", "UPD", "UPD_C", "DEL_C", "UPD_REQ", "CLR", "EOF"],
    "openbsd6": ["UPD_REQ", "CLR", "INS_ACK", "UPD_C", "DEL_C", "INS", "UPD"],
}


@pytest.mark.parametrize("dialect", sorted(SECTION_ORDER))
def test_one_frame_mixes_types_in_reference_order(dialect: str) -> None:
    a = make(dialect=dialect)
    p = make(HOST_B, dialect=dialect, defer=True)
    s_upd, s_updc, s_del = (syn(a, i, 0.0) for i in (1, 2, 3))
    flush(a, 1.0)
    # the peer inserts a deferred state: its INS asks for an acknowledgement
    ps = syn(p, 50, 1.0)
    assert p.defer(ps, "h", 1.0)
    p.end_of_batch(1.0)
    (pins,) = p.take_output()
    s_ins = syn(a, 4, 2.0)
    a.state_updated(s_updc, 2.0)
    a.filter.remove_state(s_del, 2.0)
    a.receive(pfsync_frame([("UPD_REQ", [wire.UpdReq(s_upd.id, HOST_A)])], dialect), 2.0)
    a.receive(pins, 2.0)
    a.receive(pfsync_frame([("UPD_C", [updc(ps, id=999)])], dialect), 2.0)  # unknown: UPD_REQ
    assert [a.queued(s) for s in (s_ins, s_upd, s_updc, s_del)] == ["INS", "UPD", "UPD_C", "DEL_C"]
    assert a.take_output() == []  # nothing leaves before the batch ends
    a.clear_states(2.0)  # CLR goes out at once, with everything queued
    (frame,) = a.take_output()
    assert actions(frame, dialect) == SECTION_ORDER[dialect]
    assert len(frame) + IP <= 1500
    dec = wire.decode(frame, dialect)
    counts = {s.action: s.count for s in dec.sections}
    assert counts["INS"] == counts["UPD"] == counts["UPD_C"] == counts["DEL_C"] == 1
    assert [m.id for m in dec.messages("UPD_REQ")] == [999]
    assert [m.id for m in dec.messages("INS_ACK")] == [ps.id]


@pytest.mark.parametrize("mtu", [1500, 600])
@pytest.mark.parametrize("dialect", wire.DIALECTS)
def test_frames_never_exceed_mtu_and_end_as_dialect_wants(dialect: str, mtu: int) -> None:
    a = make(dialect=dialect, mtu=mtu)
    states = [syn(a, i, 0.0) for i in range(120)]
    out = a.take_output()  # full frames left already
    assert out and a.counters["full_sends"] == len(out)
    out += flush(a, 1.0)
    for st in states[:60]:
        a.state_updated(st, 2.0)
    for st in states[60:90]:
        a.filter.remove_state(st, 2.0)
    for i in range(30):
        syn(a, 1000 + i, 2.0)
    out += a.take_output() + flush(a, 3.0)
    seen: dict[str, int] = {}
    for frame in out:
        assert len(frame) + IP <= mtu
        dec = wire.decode(frame, dialect)
        assert not dec.errors
        names = [s.action for s in dec.sections]
        if dialect == "openbsd6":
            assert "EOF" not in names
        else:
            assert names[-1] == "EOF" and names.count("EOF") == 1
        for s in dec.sections:
            seen[s.action] = seen.get(s.action, 0) + s.count
    assert seen["INS"] == 150 and seen["UPD_C"] == 60 and seen["DEL_C"] == 30
    # full frames are full: no room left for another state record
    ins = wire.record_size(dialect, "INS")
    assert max(len(f) for f in out) + IP > mtu - ins


def test_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        EngineConfig(protocol="v3")
    with pytest.raises(ValueError):
        EngineConfig(mtu=100)
    with pytest.raises(ValueError):
        EngineConfig(maxupd=0)


# --------------------------------------------------------------------------- 2. pacing


def test_frame_leaves_one_second_after_first_message() -> None:
    a = make()
    syn(a, 1, 0.0)
    assert a.next_deadline() == pytest.approx(1.0)
    syn(a, 2, 0.5)  # a later message does not move the deadline
    assert a.next_deadline() == pytest.approx(1.0)
    a.end_of_batch(0.5)
    a.timer(0.99)
    assert a.take_output() == []
    a.timer(1.0)
    (frame,) = a.take_output()
    assert wire.decode(frame).sections[0].count == 2
    assert a.counters["pace_sends"] == 1
    assert a.next_deadline() is None


def test_full_frame_leaves_at_once() -> None:
    a = make()
    per_frame = (1500 - IP - wire.HEADER_LEN - 28 - 4) // wire.record_size("openbsd45", "INS")
    for i in range(per_frame):
        syn(a, i, 0.0)
    assert a.take_output() == []
    syn(a, per_frame, 0.0)
    (frame,) = a.take_output()
    assert wire.decode(frame).sections[0].count == per_frame
    assert a.counters["full_sends"] == 1


def test_maxupd_updates_send_at_end_of_batch() -> None:
    a = make(maxupd=5)
    st = syn(a, 1, 0.0)
    flush(a, 1.0)
    a.state_updated(st, 5.0)  # queues an UPD_C
    for _ in range(4):
        a.state_updated(st, 5.0)
        a.end_of_batch(5.0)
        assert a.take_output() == []
    a.state_updated(st, 5.0)  # the 5th update of the queued state
    assert a.take_output() == []
    a.end_of_batch(5.0)
    (frame,) = a.take_output()
    assert actions(frame) == ["UPD_C", "EOF"]
    assert a.counters["maxupd_sends"] == 1


@pytest.mark.parametrize("n", [15, 40])
def test_immediate_burst_leaves_in_as_few_frames_as_possible(n: int) -> None:
    a, b = paired()
    states = [syn(b, i, 0.0) for i in range(n)]
    deliver(flush(b, 1.0), a, 1.0)
    assert len(a.filter.states) == n
    assert a.take_output() == []
    for st in states:  # n split-state updates in one batch
        a.state_updated(a.filter.states.by_id(HOST_B, st.id), 1.5)
    a.end_of_batch(1.5)
    out = a.take_output()
    # 1500 - IP - header - subheader - EOF (28) leaves room for 17 UPD_C of 84 bytes
    per_frame = (1500 - IP - wire.HEADER_LEN - 4 - 24) // wire.record_size("openbsd45", "UPD_C")
    assert len(out) == -(-n // per_frame)
    assert [wire.decode(f).sections[0].count for f in out] == [per_frame] * (len(out) - 1) + [
        n - per_frame * (len(out) - 1)
    ]
    assert all(actions(f) == ["UPD_C", "EOF"] for f in out)
    assert a.counters["split_immediate"] == n
    assert a.counters["batch_sends"] == 1 and a.counters["full_sends"] == len(out) - 1


# --------------------------------------------------------------------------- 3. split detection


@pytest.mark.parametrize(
    ("age", "immediate"), [(0.0, True), (1.99, True), (2.0, False), (5.0, False)]
)
def test_split_detection_window(age: float, immediate: bool) -> None:
    a, b = paired()
    st_b = syn(b, 1, 0.0)
    deliver(flush(b, 1.0), a, 1.0)
    st = a.filter.states.by_id(HOST_B, st_b.id)
    assert st is not None and st.pfsync_time == 1.0
    now = 1.0 + age
    a.state_updated(st, now)
    a.end_of_batch(now)
    out = a.take_output()
    if immediate:
        assert len(out) == 1 and actions(out[0]) == ["UPD_C", "EOF"]
    else:
        assert out == []
        assert a.next_deadline() == pytest.approx(now + 1.0)
        a.timer(now + 1.0)
        assert len(a.take_output()) == 1


# --------------------------------------------------------------------------- 4. deferral


def test_deferral_released_by_ins_ack() -> None:
    a = make(defer=True)
    b = make(HOST_B)
    st = syn(a, 1, 0.0)
    assert a.defer(st, "pkt", 0.0)
    assert releases(a) == []
    assert st.state_flags & PFSTATE_ACK
    a.end_of_batch(0.0)  # the insert leaves at once
    (ins,) = a.take_output()
    (rec,) = msgs(ins, "INS")
    assert rec.state_flags & PFSTATE_ACK
    b.receive(ins, 0.001)
    assert b.take_output() == []
    b.end_of_batch(0.001)  # the acknowledgement leaves at once
    (ack,) = b.take_output()
    assert actions(ack) == ["INS_ACK", "EOF"]
    assert b.counters["iack_sent"] == 1
    imported = b.filter.states.by_id(HOST_A, st.id)
    assert imported is not None and not imported.state_flags & PFSTATE_ACK
    a.receive(ack, 0.002)
    assert releases(a) == [("pkt", True)]
    assert not st.state_flags & PFSTATE_ACK
    assert a.counters["deferred"] == 1 and a.counters["defer_acked"] == 1
    assert a.counters["iack_received"] == 1
    assert a.deferred_count() == 0 and a.next_deadline() is None


def test_deferral_times_out() -> None:
    a = make(defer=True)
    st = syn(a, 1, 10.0)
    assert a.defer(st, "pkt", 10.0)
    assert a.next_deadline() == pytest.approx(10.020)
    a.timer(10.019)
    assert releases(a) == []
    a.timer(10.020)
    assert releases(a) == [("pkt", True)]
    assert a.counters["defer_timeout"] == 1 and a.deferred_count() == 0


def test_deferral_limit_releases_oldest() -> None:
    a = make(defer=True)
    for i in range(128):
        assert a.defer(syn(a, i, 0.0), i, 0.0)
    assert releases(a) == []
    assert a.defer(syn(a, 500, 0.0), 500, 0.0)
    assert releases(a) == [(0, True)]
    assert a.counters["defer_overlimit"] == 1 and a.deferred_count() == 128


def test_deferral_off_unless_enabled() -> None:
    a = make()
    assert not a.defer(syn(a, 1, 0.0), "pkt", 0.0)
    v4 = make(protocol="v4", defer=True)
    assert not v4.defer(syn(v4, 1, 0.0), "pkt", 0.0)
    nosync = make(defer=True)
    assert not nosync.defer(syn(nosync, 1, 0.0, dport=7000), "pkt", 0.0)
    assert a.counters["deferred"] == v4.counters["deferred"] == 0


def test_update_for_deferred_state_drops_held_packet() -> None:
    a = make(defer=True)
    b = make(HOST_B)
    st = syn(a, 1, 0.0)
    a.defer(st, "pkt", 0.0)
    a.end_of_batch(0.0)
    b.receive(a.take_output()[0], 0.001)
    peer = b.filter.states.by_id(HOST_A, st.id)
    a.receive(pfsync_frame([("UPD_C", [updc(peer)])]), 0.002)
    assert releases(a) == [("pkt", False)]
    assert a.counters["defer_dropped"] == 1


# --------------------------------------------------------------------------- 5. receiving


def test_ins_creates_and_duplicate_ins_is_ignored() -> None:
    a, b = paired()
    st = syn(b, 1, 0.0)
    frames = flush(b, 1.0)
    deliver(frames, a, 1.0)
    got = a.filter.states.by_id(HOST_B, st.id)
    assert got is not None and got.key == st.key and got.creatorid == HOST_B
    deliver(frames, a, 1.1)
    assert len(a.filter.states) == 1 and a.counters["ins_received"] == 2


def test_upd_creates_or_updates() -> None:
    a, b = paired()
    st = syn(b, 1, 0.0)
    a.receive(pfsync_frame([("UPD", [record(st)])]), 1.0)
    got = a.filter.states.by_id(HOST_B, st.id)
    assert got is not None
    established(st, 9000)
    a.receive(pfsync_frame([("UPD", [record(st)])]), 2.0)
    assert got.src.as_tuple() == st.src.as_tuple() and got.dst.state == TCPS_ESTABLISHED
    assert len(a.filter.states) == 1 and a.counters["upd_received"] == 2


def test_upd_c_updates_known_state() -> None:
    a, b = paired()
    st = syn(b, 1, 0.0)
    deliver(flush(b, 1.0), a, 1.0)
    established(st, 9000)
    a.receive(pfsync_frame([("UPD_C", [updc(st)])]), 2.0)
    got = a.filter.states.by_id(HOST_B, st.id)
    assert got.src.as_tuple() == st.src.as_tuple() and got.pfsync_time == 2.0
    a.end_of_batch(2.0)
    assert a.take_output() == []  # fresher news is not echoed


def test_upd_c_for_unknown_state_requests_it_once() -> None:
    a, b = paired()
    st = syn(b, 1, 0.0)
    flush(b, 1.0)  # lost on the way to a
    frame = pfsync_frame([("UPD_C", [updc(st), updc(st)])])
    a.receive(frame, 2.0)
    a.receive(frame, 2.0)
    a.end_of_batch(2.0)
    (req,) = a.take_output()
    assert actions(req) == ["UPD_REQ", "EOF"]
    assert [(m.id, m.creatorid) for m in msgs(req, "UPD_REQ")] == [(st.id, HOST_B)]
    assert a.counters["ureq_sent"] == 1
    # the creator answers with a full UPD at once; a imports it
    b.receive(req, 2.001)
    assert b.counters["ureq_received"] == 1
    b.end_of_batch(2.001)
    (upd,) = b.take_output()
    assert actions(upd) == ["UPD", "EOF"]
    deliver([upd], a, 2.002)
    assert a.filter.states.by_id(HOST_B, st.id) is not None


@pytest.mark.parametrize("kind", ["DEL_C", "DEL"])
def test_delete_removes_without_echo(kind: str) -> None:
    a, b = paired()
    st = syn(b, 1, 0.0)
    deliver(flush(b, 1.0), a, 1.0)
    mine = syn(a, 2, 1.0)
    flush(a, 2.0)
    msg = wire.DelC(st.id, HOST_B) if kind == "DEL_C" else record(st)
    deliver([pfsync_frame([(kind, [msg])])], a, 3.0)
    assert a.filter.states.by_id(HOST_B, st.id) is None
    assert a.filter.states.by_id(HOST_A, mine.id) is not None
    a.timer(10.0)
    assert a.take_output() == []  # no DEL_C back
    assert a.counters["del_received"] == 1
    deliver([pfsync_frame([(kind, [msg])])], a, 11.0)
    assert a.counters["badstate"] == 1


def test_clr_removes_by_creator_and_ifname() -> None:
    a = make()
    b, c = make(HOST_B), make(HOST_C)
    recs = []
    for eng, host in ((b, HOST_B), (c, HOST_C)):
        for i, ifname in enumerate(("em0", "em1", "em0")):
            st = syn(eng, i + (10 if host == HOST_C else 0), 0.0)
            recs.append(record(st, ifname=ifname))
    a.receive(pfsync_frame([("INS", recs)]), 1.0)
    mine = syn(a, 99, 1.0)
    flush(a, 1.5)
    assert len(a.filter.states) == 7
    a.receive(pfsync_frame([("CLR", [wire.Clr("em0", HOST_B)])]), 2.0)
    left = sorted((s.creatorid, s.ifname) for s in a.filter.states)
    assert left == sorted([(HOST_A, "all"), (HOST_B, "em1"), (HOST_C, "em0"), (HOST_C, "em1"),
                           (HOST_C, "em0")])
    a.receive(pfsync_frame([("CLR", [wire.Clr("", HOST_C)])]), 2.1)
    assert sorted(s.creatorid for s in a.filter.states) == [HOST_A, HOST_B]
    assert a.filter.states.by_id(HOST_A, mine.id) is not None
    a.timer(5.0)
    assert a.take_output() == []  # no DEL_C for cleared states
    assert a.counters["clr_received"] == 2


def test_ureq_zero_starts_bulk_and_ureq_state_queues_upd() -> None:
    a = make()
    st = syn(a, 1, 0.0)
    flush(a, 1.0)
    a.receive(pfsync_frame([("UPD_REQ", [wire.UpdReq(0, 0)])]), 2.0)
    (frame,) = a.take_output()
    assert actions(frame) == ["BUS", "EOF"]
    (bus,) = msgs(frame, "BUS")
    assert bus.status == 1 and bus.creatorid == HOST_A
    assert a.counters["bulk_requests_received"] == 1
    a.receive(pfsync_frame([("UPD_REQ", [wire.UpdReq(st.id, HOST_A)])]), 2.0)
    assert a.queued(st) == "UPD"


# merge ------------------------------------------------------------------------------


def _shared_state() -> tuple[Engine, Engine, State, State]:
    a, b = paired()
    st_b = syn(b, 1, 0.0)
    established(st_b, 5000)
    deliver(flush(b, 1.0), a, 1.0)
    st_a = a.filter.states.by_id(HOST_B, st_b.id)
    assert st_a is not None
    return a, b, st_a, st_b


def test_merge_stale_update_not_applied_and_ours_sent_back() -> None:
    a, b, st_a, st_b = _shared_state()
    st_a.src.seqlo += 3000  # a saw newer data
    st_a.dst.seqhi += 3000
    ours = (st_a.src.as_tuple(), st_a.dst.as_tuple())
    stale = updc(st_b)  # b's older view
    a.receive(pfsync_frame([("UPD_C", [stale])]), 5.0)
    assert (st_a.src.as_tuple(), st_a.dst.as_tuple()) == ours
    assert a.counters["stale"] == 1 and a.counters["stale_echo"] == 1
    a.end_of_batch(5.0)
    (frame,) = a.take_output()
    (m,) = msgs(frame, "UPD_C")
    assert m.src.seqlo == st_a.src.seqlo and m.dst.seqhi == st_a.dst.seqhi
    # b takes the echo: its copy moves forward
    b.receive(frame, 5.001)
    assert st_b.src.seqlo == st_a.src.seqlo and st_b.dst.seqhi == st_a.dst.seqhi


def test_merge_never_moves_backwards_per_edge() -> None:
    a, _b, st_a, st_b = _shared_state()
    m = updc(st_b)
    m.src.seqlo = st_a.src.seqlo - 100  # older data edge
    m.src.seqhi = st_a.src.seqhi + 7000  # newer window edge
    st_a.dst.max_win = 1000
    m.dst.max_win = 2000
    lo = st_a.src.seqlo
    a.receive(pfsync_frame([("UPD_C", [m])]), 5.0)
    assert st_a.src.seqlo == lo  # kept ours
    assert st_a.src.seqhi == m.src.seqhi  # took theirs
    assert st_a.dst.max_win == m.dst.max_win
    assert a.counters["stale"] == 1
    # a lower TCP state never replaces a higher one
    m2 = updc(st_b)
    m2.src.state = 3
    a.receive(pfsync_frame([("UPD_C", [m2])]), 6.0)
    assert st_a.src.state == TCPS_ESTABLISHED


def test_merge_fresher_update_applied_without_echo() -> None:
    a, _b, st_a, st_b = _shared_state()
    st_b.src.seqlo += 4000
    st_b.src.seqhi += 4000
    a.receive(pfsync_frame([("UPD_C", [updc(st_b)])]), 5.0)
    assert st_a.src.as_tuple() == st_b.src.as_tuple()
    assert a.counters["stale"] == 0
    a.end_of_batch(5.0)
    a.timer(10.0)
    assert a.take_output() == []


# validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"src": wire.StatePeer(state=13)},
        {"dst": wire.StatePeer(state=200)},
        {"timeout": 20},
        {"direction": 3},
        {"af": 99},
    ],
)
def test_invalid_message_skipped_rest_applied(bad: dict) -> None:
    a, b = paired()
    sts = [syn(b, i, 0.0) for i in range(3)]
    recs = [record(s) for s in sts]
    for k, v in bad.items():
        setattr(recs[1], k, v)
    a.receive(
        pfsync_frame([("INS", recs), ("UPD_C", [updc(sts[0], timeout=25), updc(sts[2])])]), 1.0
    )
    assert a.counters["badval"] == 2
    assert a.filter.states.by_id(HOST_B, sts[0].id) is not None
    assert a.filter.states.by_id(HOST_B, sts[1].id) is None
    assert a.filter.states.by_id(HOST_B, sts[2].id) is not None
    assert a.counters["updc_received"] == 1


def test_bad_ttl_dropped() -> None:
    a, b = paired()
    syn(b, 1, 0.0)
    (frame,) = flush(b, 1.0)
    a.receive(frame, 1.0, ttl=64)
    assert a.counters["badttl"] == 1 and len(a.filter.states) == 0


def test_garbage_counted_never_raises() -> None:
    a, b = paired()
    syn(b, 1, 0.0)
    (good,) = flush(b, 1.0)
    cases = {
        "hdrops": b"\x05\x00",
        "badver": bytes([4]) + good[1:],
        "badlen": good[:2] + struct.pack("!H", len(good) + 50) + good[4:],
        "badact": good[:20] + bytes([99, 0, 0, 1]) + good[24:],
    }
    for reason, data in cases.items():
        before = a.counters[reason]
        a.receive(data, 1.0)
        a.end_of_batch(1.0)
        assert a.counters[reason] == before + 1, reason
    rng = random.Random(4)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        a.receive(bytes(data[: rng.randint(0, len(data))]), 2.0)
        a.receive(bytes(rng.randrange(256) for _ in range(rng.randint(0, 80))), 2.0)
        a.end_of_batch(2.0)
    a.timer(10.0)
    assert a.counters["ipackets"] == 4 + 6000


# --------------------------------------------------------------------------- 6. bulk


def test_bulk_request_retries_then_assumes_alone() -> None:
    calls: list[bool] = []
    a = make(bulk_retry=5.0)
    a.start(0.0)
    calls += sync_oks(a)
    assert not a.sync_ok and calls == [False]
    a.end_of_batch(0.0)
    (req,) = a.take_output()
    assert [(m.id, m.creatorid) for m in msgs(req, "UPD_REQ")] == [(0, 0)]
    sent = 1
    now = 0.0
    while not a.sync_ok:
        dl = a.next_deadline()
        assert dl is not None and dl == pytest.approx(now + 5.0)
        now = dl
        a.timer(now)
        out = a.take_output()
        sent += sum(1 for f in out for m in msgs(f, "UPD_REQ") if (m.id, m.creatorid) == (0, 0))
    assert sent == 13  # the first request and 12 retries
    assert now == pytest.approx(65.0)
    calls += sync_oks(a)
    assert calls == [False, True]
    assert a.counters["bulk_gave_up"] == 1 and a.counters["bulk_requests_sent"] == 13
    assert a.next_deadline() is None


def test_bulk_update_paced_over_ticks() -> None:
    a = make(bulk_frames_per_tick=2, bulk_tick=0.01)
    states = [syn(a, i, 0.0) for i in range(50)]
    for st in states[:10]:
        established(st, 7000 + st.id % 1000)
    flush(a, 1.0)
    b = make(HOST_B)
    calls: list[bool] = []
    b.start(10.0)
    b.end_of_batch(10.0)
    a.receive(b.take_output()[0], 10.001)
    (start,) = a.take_output()
    assert [m.status for m in msgs(start, "BUS")] == [1]
    assert a.info()["bulk_sending"]
    b.receive(start, 10.002)
    now = 10.001
    ticks = 0
    frames = [start]
    while True:
        dl = a.next_deadline()
        assert dl is not None
        now = dl
        a.timer(now)
        out = a.take_output()
        ticks += 1
        frames += out
        upd_frames = [f for f in out if "UPD" in actions(f)]
        assert len(upd_frames) <= 2
        if any(m.status == 2 for f in out for m in msgs(f, "BUS")):
            break
        assert a.info()["bulk_progress"][0] < 50
    assert ticks >= 4  # 50 states, 5 per frame, 2 frames per tick
    assert a.counters["bulk_states_sent"] == 50
    for f in frames[1:]:
        b.receive(f, now + 0.001)
    calls += sync_oks(b)
    assert b.sync_ok and calls == [False, True]
    assert b.counters["bulk_done"] == 1 and b.counters["bulk_states_received"] == 50
    assert snapshot(b) == snapshot(a)


def test_bulk_with_empty_table_ends_at_once() -> None:
    a = make()
    b = make(HOST_B)
    b.start(0.0)
    b.end_of_batch(0.0)
    a.receive(b.take_output()[0], 0.001)
    out = a.take_output()
    a.timer(a.next_deadline())
    out += a.take_output()
    assert [m.status for f in out for m in msgs(f, "BUS")] == [1, 2]
    deliver(out, b, 0.01)
    assert b.sync_ok


# --------------------------------------------------------------------------- 7. no-sync


def test_no_sync_and_pfsync_states_never_sent() -> None:
    a = make()
    ns = syn(a, 1, 0.0, dport=7000)
    ps = proto240(a, 0.0)
    assert ns.state_flags & PFSTATE_NOSYNC and ps.state_flags & PFSTATE_NOSYNC
    assert a.queued(ns) is None and a.queued(ps) is None
    for st in (ns, ps):
        st.pfsync_time = 0.0  # even a "split" state stays quiet
        a.state_updated(st, 0.5)
        assert a.queued(st) is None
    a.end_of_batch(0.5)
    a.timer(2.0)
    assert a.take_output() == []
    # a peer asking for them gets nothing, nor does a bulk update carry them
    a.receive(
        pfsync_frame([("UPD_REQ", [wire.UpdReq(ns.id, HOST_A), wire.UpdReq(ps.id, HOST_A)])]), 3.0
    )
    a.end_of_batch(3.0)
    assert a.take_output() == []
    a.receive(pfsync_frame([("UPD_REQ", [wire.UpdReq(0, 0)])]), 4.0)
    out = a.take_output()
    while a.next_deadline() is not None:
        a.timer(a.next_deadline())
        out += a.take_output()
    assert all("UPD" not in actions(f) for f in out)
    assert a.counters["bulk_states_sent"] == 0
    for st in (ns, ps):
        a.filter.remove_state(st, 5.0)
    a.timer(7.0)
    assert a.take_output() == []
    assert a.counters["opackets"] == 2  # BUS START, BUS END


# --------------------------------------------------------------------------- 8. counters


def test_counters_and_info() -> None:
    a, b = paired()
    for i in range(3):
        syn(b, i, 0.0)
    frames = flush(b, 1.0)
    deliver(frames, a, 1.0)
    c = a.info()["counters"]
    assert c["ipackets"] == 1 and c["ibytes"] == len(frames[0]) and c["ins_received"] == 3
    bi = b.info()
    assert bi["counters"]["opackets"] == 1
    assert bi["counters"]["obytes"] == len(frames[0]) + IP
    assert bi["frames_by_action"] == {"INS": 1}
    assert bi["messages_by_action"] == {"INS": 3}
    assert bi["bytes_by_action"] == {"INS": 3 * wire.record_size("openbsd45", "INS")}
    assert bi["creatorid"] == f"{HOST_B:08x}" and bi["protocol"] == "v5" and bi["sync_ok"]
    assert bi["deferred_now"] == 0 and bi["bulk_progress"] is None


# --------------------------------------------------------------------------- 9. v4 behaviour


def test_v4_one_message_type_per_frame() -> None:
    a = make(protocol="v4")
    sts = [syn(a, i, 0.0) for i in range(4)]
    flush(a, 1.0)
    # interleave the types: every switch closes the frame
    a.state_updated(sts[0], 2.0)
    syn(a, 10, 2.0)
    a.filter.remove_state(sts[1], 2.0)
    a.state_updated(sts[2], 2.0)
    a.receive(legacy.encode_v4(legacy.V4Frame(legacy.V4_ACTIONS["UREQ"],
                                              [legacy.StateUpdReq(sts[3].id, HOST_A)])), 2.0)
    a.end_of_batch(2.0)
    out = a.take_output() + flush(a, 3.0)
    kinds = []
    for f in out:
        fr = legacy.decode_v4(f)
        assert fr.count == len(fr.messages) and not fr.errors
        kinds.append(fr.action_name)
    assert kinds == ["UPD_C", "INS", "DEL_C", "UPD_C", "UPD"]
    assert a.frames_by_action == {"INS": 2, "UPD_C": 2, "DEL_C": 1, "UPD": 1}


def test_v4_no_split_detection_paced_only() -> None:
    a = make(protocol="v4", maxupd=5)
    b = make(HOST_B, protocol="v4")
    st_b = syn(b, 1, 0.0)
    deliver(flush(b, 1.0), a, 1.0)
    st = a.filter.states.by_id(HOST_B, st_b.id)
    assert st is not None
    a.state_updated(st, 1.1)
    a.end_of_batch(1.1)
    assert a.take_output() == []
    assert a.next_deadline() == pytest.approx(2.1)
    for _ in range(5):  # maxupd still sends
        a.state_updated(st, 1.2)
    a.end_of_batch(1.2)
    (frame,) = a.take_output()
    assert legacy.decode_v4(frame).action_name == "UPD_C"
    assert a.counters["split_immediate"] == 0 and a.counters["maxupd_sends"] == 1
    # and the v4 peer merges it
    deliver([frame], b, 1.3)
    assert b.counters["updc_received"] == 1


def test_v4_frames_respect_mtu_and_count() -> None:
    a = make(protocol="v4", mtu=600)
    for i in range(30):
        syn(a, i, 0.0)
    out = a.take_output() + flush(a, 1.0)
    assert sum(legacy.decode_v4(f).count for f in out) == 30
    assert all(len(f) + IP <= 600 for f in out)


def test_v4_bulk_update_roundtrip() -> None:
    a = make(protocol="v4")
    for i in range(12):
        syn(a, i, 0.0)
    flush(a, 1.0)
    b = make(HOST_B, protocol="v4")
    b.start(5.0)
    b.end_of_batch(5.0)
    deliver(b.take_output(), a, 5.0)
    out = a.take_output()
    while a.next_deadline() is not None:
        a.timer(a.next_deadline())
        out += a.take_output()
    assert all(len({legacy.decode_v4(f).action}) == 1 for f in out)
    deliver(out, b, 6.0)
    assert b.sync_ok and len(b.filter.states) == 12


def test_out_direction_state_roundtrips() -> None:
    a, b = paired()
    raw = tcp_packet(CLIENT, SERVER, 4444, 5201, 1, 0, TH_SYN, 65535)
    v = b.filter.test(PF_OUT, "em1", parse(raw), 0.0)
    assert v.state is not None and v.state.direction == PF_OUT
    deliver(flush(b, 1.0), a, 1.0)
    got = a.filter.states.by_id(HOST_B, v.state.id)
    assert got is not None and got.direction == PF_OUT and got.key == v.state.key


def test_merge_keeps_first_packet_timeout_when_nobody_saw_more() -> None:
    """Regression: merging an unchanged half-open state must not move its timeout from
    tcp.first to tcp.opening (it did: the ladder was recomputed on every merge)."""
    a, b = paired()
    st = syn(a, 1, 0.0)
    deliver(flush(a, 1.0), b, 1.0)
    first = st.timeout
    a.receive(pfsync_frame([("UPD", [record(b.filter.states.by_id(HOST_A, st.id), 2.0)])]), 2.0)
    assert st.timeout == first
    # once a node has seen a second packet, the ladder applies on both
    peer = b.filter.states.by_id(HOST_A, st.id)
    raw = tcp_packet(CLIENT, SERVER, 10001, 5201, 1001, 0, TH_SYN, 65535)
    assert b.filter.test(PF_IN, "em0", parse(raw), 3.0).action == "pass"
    assert peer.timeout != first
    a.receive(pfsync_frame([("UPD_C", [updc(peer)])]), 3.0)
    assert st.timeout == peer.timeout


def test_peer_inserts_respect_the_state_limit() -> None:
    """A flood of INS from the sync link cannot grow the table past `set limit states`."""
    from pfcluster.pf.filter import Filter
    from pfcluster.pf.rules import parse_rules
    from pfcluster.pfsync import wire
    from pfcluster.pfsync.engine import EngineConfig

    eng = attach(Filter(parse_rules("set limit states 50\npass\n"), hostid=1), EngineConfig())
    recs = [
        wire.State(
            id=i + 1,
            creatorid=0xBEEF,
            af=2,
            proto=17,
            direction=1,
            timeout=6,
            key=[
                wire.StateKey([bytes([10, 0, 0, i % 250]) + bytes(12), bytes(16)], [i, 53]),
                wire.StateKey([bytes([10, 0, 0, i % 250]) + bytes(12), bytes(16)], [i, 53]),
            ],
        )
        for i in range(200)
    ]
    for k in range(0, 200, 5):
        frame = wire.Frame(5, sections=[wire.Section("INS", 1, messages=recs[k : k + 5])])
        eng.receive(wire.encode(frame, "openbsd45"), 1.0)
    assert len(eng.filter.states) == 50
    assert eng.counters["import_failed"] == 150


def test_flush_sends_one_clr_and_no_del_c() -> None:
    """pfctl -F states: states go no-sync first, so the peer hears one CLR, not a DEL_C each."""
    from pfcluster.sim.pair import Cluster

    c = Cluster(nodes=2)
    c.run_until(1.5)
    a, b = c.nodes
    from pfcluster.sim.tcpsim import tcp_packet

    for i in range(5):
        raw = tcp_packet(bytes([198, 51, 100, 2]), bytes([203, 0, 113, 10]), 40000 + i, 5201,
                         1000, 0, 0x02, 65535)
        c.forward(a, raw, True, 2.0, lambda t: None)
    c.run_until(4.0)
    assert len(b.filter.states) == 10
    before = dict(a.engine.msgs_by_action)
    n = a.filter.flush_states(4.0)
    a.engine.clear_states(4.0)
    c.pump(a, 4.0)
    c.run_until(4.1)
    assert n == 10
    sent = {k: v - before.get(k, 0) for k, v in a.engine.msgs_by_action.items()}
    assert sent.get("CLR") == 1 and not sent.get("DEL_C")
    assert len(b.filter.states) == 0
