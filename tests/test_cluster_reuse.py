"""Issue 9: a client reusing its source port across a split path, the orderings pfsync
can deliver the old and the new state in, the shared router step and its deferral rule,
and the pfsync engine faults found by reading it against the thesis.

Pure core: time is driven by hand, frames are passed between engines by the test.
"""

from __future__ import annotations

import socket
import statistics
import struct
from typing import Any

import pytest

from pfcluster.packet import parse
from pfcluster.pf.constants import (
    PF_IN,
    PF_OUT,
    PFSTATE_ACK,
    PFSTATE_NOSYNC,
    TCPS,
    TH_ACK,
    TH_FIN,
    TH_SYN,
)
from pfcluster.pf.filter import Filter
from pfcluster.pf.router import ROUTE_BLOCK, ROUTE_DEFER, ROUTE_PASS, route
from pfcluster.pf.rules import parse_rules
from pfcluster.pf.state import State
from pfcluster.pf.tcp import fin_acked
from pfcluster.pfsync import wire
from pfcluster.pfsync.engine import Engine, EngineConfig, attach
from pfcluster.pfsync.events import LogLine, Released
from pfcluster.pfsync.policy import deletions_first
from pfcluster.sim.pair import Cluster, SyncLink
from pfcluster.sim.tcpsim import TcpTransfer, tcp_packet

RULES = """\
set debug notice
block all
pass in on em0 proto tcp to port 5201
pass out on em1 proto tcp
pass in on em0 proto udp to port 53
pass out on em1 proto udp
"""
CLIENT = socket.inet_aton("198.51.100.2")
SERVER = socket.inet_aton("203.0.113.10")
HOST_A = 0xA
HOST_B = 0xB
FIN_WAIT_2 = int(TCPS.FIN_WAIT_2)
CLOSING = int(TCPS.CLOSING)
ESTABLISHED = int(TCPS.ESTABLISHED)


def node(hostid: int, **kw: Any) -> Engine:
    filt = Filter(parse_rules(RULES, "reuse.conf"), hostid=hostid, now=0.0)
    return attach(filt, EngineConfig(**kw), 0.0)


def forward(eng: Engine, raw: bytes, now: float, handle: object = None, to_server: bool = True):
    in_if, out_if = ("em0", "em1") if to_server else ("em1", "em0")
    return route(eng.filter, in_if, out_if, parse(raw), now, eng, handle)


def syn(sport: int, isn: int) -> bytes:
    return tcp_packet(CLIENT, SERVER, sport, 5201, isn, 0, TH_SYN, 65535)


def close_all(eng: Engine) -> None:
    """Every TCP state of `eng` finished: both peers FIN_WAIT_2, as after a close."""
    for st in eng.filter.states:
        st.src.state = st.dst.state = FIN_WAIT_2


def reuse_frames(isn: int = 0x20000000) -> tuple[Engine, Engine, list[State], bytes]:
    """A knows an old, finished connection from port 40000 and B has A's copies of its
    states; a new SYN from the same port reaches A. Returns A, B, the old states as B
    holds them, and A's frame announcing the change (INS new, DEL_C old)."""
    a, b = node(HOST_A), node(HOST_B)
    assert forward(a, syn(40000, 0x10000000), 0.0).action == ROUTE_PASS
    a.flush(0.0)
    for f in a.take_output():
        b.receive(f, 0.001)
    close_all(a)
    close_all(b)
    old_b = list(b.filter.states)
    assert len(old_b) == 2
    assert forward(a, syn(40000, isn), 1.0).action == ROUTE_PASS
    assert a.filter.extra["state-reuse"] == 2
    a.flush(1.0)
    (frame,) = a.take_output()
    return a, b, old_b, frame


def split_frame(frame: bytes) -> dict[str, wire.Section]:
    return {s.action: s for s in wire.decode(frame).sections if s.action != "EOF"}


def encode(*sections: wire.Section) -> bytes:
    acts = wire.ACTIONS["openbsd45"]
    secs = [wire.Section(s.action, acts[s.action], messages=list(s.messages)) for s in sections]
    return wire.encode(wire.Frame(5, sections=secs))


def keys(eng: Engine) -> dict[tuple, tuple[int, int]]:
    return {st.key: (st.creatorid, st.id) for st in eng.filter.states}


# ----------------------------------------------------------------- orderings of old and new


def test_ins_before_del_c_in_one_frame_replaces_the_closed_state() -> None:
    a, b, old_b, frame = reuse_frames()
    assert [s.action for s in wire.decode(frame).sections][:2] == ["INS", "DEL_C"]
    b.receive(frame, 1.001)
    assert keys(b) == keys(a)
    assert b.counters["import_failed"] == 0 and b.counters["badstate"] == 0
    assert all(not st.linked for st in old_b)


def test_del_c_before_ins_in_separate_frames() -> None:
    a, b, _old, frame = reuse_frames()
    secs = split_frame(frame)
    b.receive(encode(secs["DEL_C"]), 1.001)
    assert len(b.filter.states) == 0
    b.receive(encode(secs["INS"]), 1.002)
    assert keys(b) == keys(a) and b.counters["import_failed"] == 0


def test_ins_alone_replaces_a_closed_state_and_del_c_later_finds_nothing() -> None:
    a, b, _old, frame = reuse_frames()
    secs = split_frame(frame)
    b.receive(encode(secs["INS"]), 1.001)
    assert keys(b) == keys(a)
    assert b.filter.extra["key-attach-reuse"] == 2
    # the old states went quietly: the peer that replaced them already knows
    b.timer(5.0)
    assert b.take_output() == []
    lines = [e.text for e in b.take_events() if isinstance(e, LogLine)]
    assert len(lines) == 2 and all(line.startswith("pf: key attach reuse on all: ") for line in lines)
    b.receive(encode(secs["DEL_C"]), 1.002)
    assert keys(b) == keys(a) and b.counters["badstate"] == 2


def test_upd_for_the_new_id_before_its_ins() -> None:
    a, b, _old, frame = reuse_frames()
    ins = split_frame(frame)["INS"]
    b.receive(encode(wire.Section("UPD", 0, messages=list(ins.messages))), 1.001)
    assert keys(b) == keys(a)
    b.receive(frame, 1.002)  # the INS is a duplicate now, the DEL_C finds nothing
    assert keys(b) == keys(a) and b.counters["import_failed"] == 0


def test_bulk_update_carrying_the_old_closed_state_after_the_new_one_is_refused() -> None:
    _a, b, old_b, frame = reuse_frames()
    b.receive(frame, 1.001)
    new = keys(b)
    # a bulk update (UPD) that still carries an old closed copy of the same keys
    old_recs = [_record(st) for st in old_b]
    b.receive(encode(wire.Section("UPD", 0, messages=old_recs)), 1.5)
    assert keys(b) == new
    assert b.filter.extra["key-attach-failed"] == 2 and b.counters["import_failed"] == 2


def test_collision_with_a_live_state_is_refused_and_counted() -> None:
    a, b = node(HOST_A), node(HOST_B)
    forward(a, syn(40000, 0x10000000), 0.0)
    forward(b, syn(40000, 0x30000000), 0.0)  # both firewalls saw a SYN (ECMP)
    a.flush(0.0)
    for f in a.take_output():
        b.receive(f, 0.001)
    assert b.counters["import_failed"] == 2 and b.filter.extra["key-attach-failed"] == 2
    assert {cid for cid, _ in keys(b).values()} == {HOST_B}


def test_local_insert_replaces_a_closed_state_with_the_same_key() -> None:
    a = node(HOST_A)
    forward(a, syn(40000, 0x10000000), 0.0)
    close_all(a)
    old = next(iter(a.filter.states))
    new = State(old.key, old.direction, HOST_A, a.filter.next_state_id(), 1.0)
    assert a.filter.attach_state(new, 1.0, from_peer=False)
    assert not old.linked and a.filter.states.peek(old.key) is new
    old.src.state = ESTABLISHED  # a live state keeps its key
    newer = State(new.key, new.direction, HOST_A, a.filter.next_state_id(), 1.0)
    new.src.state = new.dst.state = ESTABLISHED
    assert not a.filter.attach_state(newer, 1.0, from_peer=False)


def _record(st: State) -> wire.State:
    from pfcluster.pfsync.convert import export_state

    return export_state(st, 1.0, "openbsd45", Filter(parse_rules(RULES)).timeouts, 1)


def test_deletions_are_applied_first_whatever_their_place() -> None:
    _a, _b, _old, frame = reuse_frames()
    order = [sec.action for _, sec in deletions_first(wire.decode(frame).sections)]
    assert order[0] == "DEL_C" and order.index("INS") > 0


# ----------------------------------------------------------------- the whole story, simulated


def _reconnects(reuse: bool, c2s: str, s2c: str, n: int = 12, gap: float = 0.0005) -> tuple[list[float], Cluster, list[TcpTransfer]]:
    c = Cluster(defer=True, link=SyncLink(latency=0.0002))
    c.run_until(0.5)
    times, xfers = [], []
    for i in range(n):
        x = TcpTransfer(sport=40000 if reuse else 40000 + i, total_bytes=1448 * 4,
                        client_isn=0x10000000 + i * 0x01000000,
                        server_isn=0x70000000 + i * 0x00100000, server_closes_first=True)
        r = c.transfer(x, c2s, s2c, max_time=5.0)
        times.append(r["seconds"] if r["completed"] else float("inf"))
        xfers.append(x)
        c.run_until(c.now + gap)
    return times, c, xfers


@pytest.mark.parametrize("paths", [("A", "B"), ("A", "A")], ids=["split", "symmetric"])
def test_reconnects_from_one_source_port_are_as_fast_as_fresh_ports(paths: tuple[str, str]) -> None:
    fresh, _, _ = _reconnects(False, *paths)
    reused, c, xfers = _reconnects(True, *paths)
    assert all(t != float("inf") for t in reused), reused
    assert all(x.retransmits == 0 for x in xfers)  # no SYN (or data) retransmission
    assert statistics.median(reused) <= 3 * statistics.median(fresh)
    for n in c.nodes:
        assert n.engine.counters["import_failed"] == 0
        assert n.engine.counters["defer_timeout"] == 0
        assert n.filter.extra["challenge-ack"] == 0
    assert c.node("A").engine.counters["defer_acked"] == 12


def test_split_close_reaches_fin_wait_2_on_both_firewalls() -> None:
    _, c, _ = _reconnects(True, "A", "B", n=1)
    c.run_until(c.now + 0.01)
    for n in c.nodes:
        for st in n.filter.states:
            assert (st.src.state, st.dst.state) == (FIN_WAIT_2, FIN_WAIT_2), (n.name, st)
    assert sum(n.engine.counters["fin_acked"] for n in c.nodes) >= 1


def test_fin_acked_moves_closing_only_when_the_ack_covers_the_fin() -> None:
    st = State((2, 6, CLIENT, SERVER, 1, 2), PF_IN, 1, 1, 0.0)
    st.src.state = st.dst.state = CLOSING
    st.src.seqlo, st.dst.seqlo = 1000, 5000
    assert fin_acked(st) == 0
    st.acks = [4999, 0]  # src acknowledged short of dst's FIN
    assert fin_acked(st) == 0 and st.dst.state == CLOSING
    st.acks = [5000, 999]
    assert fin_acked(st) == 1 and st.dst.state == FIN_WAIT_2 and st.src.state == CLOSING


# ----------------------------------------------------------------- the router step and deferral


def udp(sport: int) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + 4, 0, 0, 64, 17, 0, CLIENT, SERVER)
    return ip + struct.pack("!HHHH", sport, 53, 12, 0) + b"abcd"


def test_router_defers_the_out_state_only() -> None:
    a = node(HOST_A, defer=True)
    rv = forward(a, syn(40000, 1), 0.0, handle="syn")
    assert rv.action == ROUTE_DEFER
    assert rv.v_in is not None and rv.v_out is not None and rv.v_in.new_state
    assert rv.v_out.state is not None and rv.v_out.state.state_flags & PFSTATE_ACK
    assert not rv.v_in.state.state_flags & PFSTATE_ACK
    assert rv.v_out.state.direction == PF_OUT
    # a packet to the firewall itself (no out test) is never deferred
    local = route(a.filter, "em0", None, parse(syn(40001, 1)), 0.0, a, "local")
    assert local.action == ROUTE_PASS


def test_router_blocks_on_either_test() -> None:
    a = node(HOST_A)
    rv = forward(a, tcp_packet(SERVER, CLIENT, 5201, 40000, 1, 0, TH_SYN, 100), 0.0, to_server=False)
    assert rv.action == ROUTE_BLOCK and rv.v_out is None
    rv = route(a.filter, "em0", "em2", parse(udp(5000)), 0.0)
    assert rv.action == ROUTE_BLOCK and rv.v_out is not None and rv.v_out.action == "block"


def test_later_packet_releases_the_held_one_first() -> None:
    a = node(HOST_A, defer=True)
    assert forward(a, udp(5000), 0.0, handle="first").action == ROUTE_DEFER
    assert a.pending_releases() == 0
    rv = forward(a, udp(5000), 0.001, handle="second")
    assert rv.action == ROUTE_PASS
    assert a.pending_releases() == 1
    assert [(e.handle, e.accept) for e in a.take_events() if isinstance(e, Released)] == [
        ("first", True)]
    assert a.counters["defer_update"] == 1 and a.deferred_count() == 0


class _RecordingVerdicts:
    """Stands in for io.nfq.Verdicts: records the order of the verdicts given."""

    def __init__(self, names: dict[int, str], order: list[tuple[str, str]]) -> None:
        self.names, self.order = names, order

    def accept(self, packet_id: int) -> None:
        self.order.append((self.names[packet_id], "accept"))

    def drop(self, packet_id: int) -> None:
        self.order.append((self.names[packet_id], "drop"))

    def hold(self, packet_id: int) -> None:
        self.order.append((self.names[packet_id], "hold"))

    def release(self, packet_id: int, accept: bool, payload: Any = None) -> None:
        self.order.append((self.names[packet_id], "accept" if accept else "drop"))


def _queued(packet_id: int, raw: bytes) -> Any:
    from pfcluster.io.nfq import QueuedPacket

    qp = QueuedPacket()
    qp.packet_id, qp.hook, qp.indev, qp.outdev = packet_id, 2, 1, 2
    qp.payload, qp.wire_len = memoryview(raw), len(raw)
    return qp


def test_dataplane_gives_the_released_verdict_before_the_releasing_one() -> None:
    from pfcluster.io.dataplane import Dataplane, DataplaneCounters
    from pfcluster.packet import Packet

    a = node(HOST_A, defer=True)
    dp = Dataplane.__new__(Dataplane)  # no NFQUEUE: only the decision path
    dp.filt, dp.engine, dp.replies, dp._scratch = a.filter, a, None, Packet()
    dp.counters, dp.log_verdicts, dp.pending = DataplaneCounters(), False, 0
    dp._ifnames = {1: "em0", 2: "em1"}
    dp.dispatch = dp._apply_releases
    dp.nfq, dp._deciding = None, True
    dp.split_hooks, dp._held_payload, dp.route_targets = False, {}, []
    order: list[tuple[str, str]] = []
    dp.verdicts = _RecordingVerdicts({1: "first", 2: "second"}, order)
    dp._decide(_queued(1, udp(5000)), 0.0)
    assert order == [("first", "hold")] and dp.pending == 1
    dp._decide(_queued(2, udp(5000)), 0.001)
    assert order == [("first", "hold"), ("first", "accept"), ("second", "accept")]
    assert dp.pending == 0


# ----------------------------------------------------------------- engine faults (issue 9 §4)


def test_last_message_of_a_burst_leaves_within_the_pace() -> None:
    a = node(HOST_A)
    now = 0.0
    i = 0
    while a.counters["full_sends"] == 0:
        forward(a, syn(20000 + i, 1), now)
        i += 1
        assert i < 1000
    # the message that did not fit went into a fresh frame: it must have a timer
    assert a.pending_bytes() > a.empty_frame_bytes()
    dl = a.next_deadline()
    assert dl is not None and dl <= now + 1.0
    a.take_output()
    a.timer(dl)
    assert len(a.take_output()) == 1 and a.pending_bytes() == a.empty_frame_bytes()


def test_frame_longer_than_its_datagram_is_dropped_whole() -> None:
    a, b = node(HOST_A), node(HOST_B)
    forward(a, syn(40000, 1), 0.0)
    a.flush(0.0)
    (frame,) = a.take_output()
    cut = frame[:-10]  # the EOF is gone; the INS section is whole
    b.receive(cut, 0.001)
    assert len(b.filter.states) == 0 and b.counters["badlen"] == 1


def test_a_restarted_node_gets_back_the_states_it_created() -> None:
    a, b = node(HOST_A), node(HOST_B)
    forward(a, syn(40000, 1), 0.0)
    a.flush(0.0)
    for f in a.take_output():
        b.receive(f, 0.001)
    mine = keys(a)
    a2 = node(HOST_A)  # same hostid, empty table
    a2.start(1.0)
    a2.end_of_batch(1.0)
    for f in a2.take_output():
        b.receive(f, 1.001)
    for _ in range(10):
        b.timer(b.next_deadline() or 1.1)
        for f in b.take_output():
            a2.receive(f, 1.2)
    assert keys(a2) == mine and a2.sync_ok


def test_nosync_marks_prevent_echo_of_replaced_imports() -> None:
    _a, b, old_b, frame = reuse_frames()
    b.receive(frame, 1.001)
    assert all(st.state_flags & PFSTATE_NOSYNC for st in old_b)


def test_key_attach_lines_need_debug_notice() -> None:
    quiet = Filter(parse_rules(RULES.replace("set debug notice\n", ""), "q.conf"), hostid=1)
    st = State((2, 6, CLIENT, SERVER, 1, 2), PF_IN, 5, 1, 0.0)
    st.src.state = st.dst.state = FIN_WAIT_2
    assert quiet.import_state(st, -1, 0.0)
    assert quiet.import_state(State(st.key, PF_IN, 5, 2, 0.0), -1, 0.0)
    assert quiet.take_log() == [] and quiet.extra["key-attach-reuse"] == 1


def test_fin_ack_packet_path_unchanged_on_one_box() -> None:
    """One firewall seeing both halves: pf's own transitions; a recorded ack (pf's one
    byte of slack after a SYN) never moves a peer past what was really acknowledged."""
    f = Filter(parse_rules(RULES, "one.conf"), hostid=1)
    c, s = CLIENT, SERVER
    steps = [
        (True, tcp_packet(c, s, 40000, 5201, 100, 0, TH_SYN, 65535)),
        (False, tcp_packet(s, c, 5201, 40000, 900, 101, TH_SYN | TH_ACK, 65535)),
        (True, tcp_packet(c, s, 40000, 5201, 101, 901, TH_ACK, 65535)),
        (False, tcp_packet(s, c, 5201, 40000, 901, 101, TH_FIN | TH_ACK, 65535)),
        (True, tcp_packet(c, s, 40000, 5201, 101, 902, TH_FIN | TH_ACK, 65535)),
        (False, tcp_packet(s, c, 5201, 40000, 902, 102, TH_ACK, 65535)),
    ]
    for to_server, raw in steps:
        in_if, out_if = ("em0", "em1") if to_server else ("em1", "em0")
        assert route(f, in_if, out_if, parse(raw), 1.0).action == ROUTE_PASS
    for st in f.states:
        assert (st.src.state, st.dst.state) == (FIN_WAIT_2, FIN_WAIT_2)
        st.src.state = st.dst.state = CLOSING
        st.src.seqlo, st.dst.seqlo = 102, 902  # both FINs, as the peers' seqlo hold them
        before = list(st.acks or [0, 0])
        fin_acked(st)
        assert (st.src.state == FIN_WAIT_2) == (before[1] != 0 and before[1] >= 102)


@pytest.mark.parametrize("shared", [False, True], ids=["one-box", "shared-with-peer"])
def test_syn_on_both_fins_reuses_only_a_state_a_peer_shares(shared: bool) -> None:
    """pf's rule on one box (both FIN_WAIT_2, else a challenge ACK); on a state a pfsync
    peer updates, both FINs suffice: the last ACK may have crossed the other firewall."""
    a = node(HOST_A)
    forward(a, syn(40000, 0x10000000), 0.0)
    for st in a.filter.states:
        st.src.state = st.dst.state = CLOSING
        st.src.seqlo, st.dst.seqlo = 0x10000100, 0x70000100
        if shared:
            st.pfsync_time = 0.5
    rv = forward(a, syn(40000, 0x20000000), 1.0)
    if shared:
        assert rv.action == ROUTE_PASS
        assert a.filter.extra["state-reuse-closing"] == 2
    else:
        assert rv.action == ROUTE_BLOCK and rv.v_in is not None
        assert rv.v_in.reason == "challenge-ack" and rv.v_in.reply
        assert a.filter.extra["state-reuse-closing"] == 0


def test_clr_after_inserts_is_applied_in_frame_order() -> None:
    """4.5 and FreeBSD send CLR after the queues: states of that frame are flushed too."""
    a, b = node(HOST_A), node(HOST_B)
    forward(a, syn(40000, 1), 0.0)
    a.flush(0.0)
    (frame,) = a.take_output()
    ins = split_frame(frame)["INS"]
    acts = wire.ACTIONS["openbsd45"]
    clr = wire.Section("CLR", acts["CLR"], messages=[wire.Clr("", HOST_A)])
    b.receive(wire.encode(wire.Frame(5, sections=[
        wire.Section("INS", acts["INS"], messages=list(ins.messages)), clr])), 0.001)
    assert len(b.filter.states) == 0


def test_fin_acked_ignores_an_ack_recorded_long_before() -> None:
    st = State((2, 6, CLIENT, SERVER, 1, 2), PF_IN, 1, 1, 0.0)
    st.acks = [1000, 0]
    st.dst.state = CLOSING
    st.dst.seqlo = (1000 + 3 * 2**30) & 0xFFFFFFFF  # gigabytes later: sdiff wraps positive
    assert fin_acked(st) == 0 and st.dst.state == CLOSING


@pytest.mark.parametrize("shared", [False, True], ids=["one-box", "shared-with-peer"])
def test_data_just_past_the_known_window_edge(shared: bool) -> None:
    """On a split path the receiver's ACKs reach us through pfsync a flush late: a state
    a peer shares lets data through up to one receiver window beyond the edge it knows
    (counted); a one-box state keeps pf's check; further than that fails on both."""
    from pfcluster.pf.tcp import TRACK_SLACK, track_full

    f = Filter(parse_rules(RULES, "slack.conf"), hostid=1)
    c, s = CLIENT, SERVER
    for to_server, raw in (
        (True, tcp_packet(c, s, 40000, 5201, 100, 0, TH_SYN, 65535)),
        (False, tcp_packet(s, c, 5201, 40000, 900, 101, TH_SYN | TH_ACK, 1000)),
        (True, tcp_packet(c, s, 40000, 5201, 101, 901, TH_ACK, 65535)),
    ):
        in_if, out_if = ("em0", "em1") if to_server else ("em1", "em0")
        assert route(f, in_if, out_if, parse(raw), 1.0).action == ROUTE_PASS
    st = f.states.peek((2, 6, CLIENT, SERVER, 40000, 5201))
    assert st is not None
    if shared:
        st.pfsync_time = 0.5
    edge = st.src.seqhi
    just_past = tcp_packet(c, s, 40000, 5201, edge, 901, TH_ACK, 65535, 500)
    res = track_full(st, parse(just_past), True, 1.1)
    assert (res == TRACK_SLACK) if shared else not isinstance(res, int)
    far = tcp_packet(c, s, 40000, 5201, (edge + 5 * 65536) & 0xFFFFFFFF, 901, TH_ACK, 65535, 500)
    assert not isinstance(track_full(st, parse(far), True, 1.2), int)
