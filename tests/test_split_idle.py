"""A split connection that idles longer than the split-detection window, then bursts
(docs/ecmp4.md): the lab's 4-firewall ECMP drops traced to this.

Client->server crosses A, server->client crosses B, C and D only listen (4 firewalls,
as ECMP hashes the two directions of one connection independently). The handshake
makes the state split on A and B; then nothing for longer than the window (in the lab:
iperf3 waiting 2 s for a stream whose SYN-ACK lost the race to the INS); then A forwards
a burst. The thesis' rule ("a peer touched it less than 2 s ago") calls the state
unsplit by then, so A's updates wait for the 1 s pace and B drops the server's ACKs for
data A forwarded beyond pf's 67035-byte ack window. Simulated time; no timing luck.
"""

from __future__ import annotations

import socket

import pytest

from pfcluster.pf.constants import TH_ACK, TH_SYN
from pfcluster.pf.tcp import NEVER
from pfcluster.sim.pair import Cluster, Node, SyncLink
from pfcluster.sim.tcpsim import syn_options, tcp_packet

CLIENT = socket.inet_aton("198.51.100.2")
SERVER = socket.inet_aton("203.0.113.10")
C_ISN, S_ISN = 0x10000000, 0x70000000
MSS = 1448
LATENCY = 0.0002  # sync link, one way
GAP = 20e-6  # between two data segments of the burst
SERVER_TURN = 100e-6  # data leaving A -> the server's ACK reaching B


def client_pkt(seq: int, ack: int, flags: int, plen: int = 0, opts: bytes = b"") -> bytes:
    return tcp_packet(CLIENT, SERVER, 40000, 5201, seq, ack, flags, 4096, plen, opts)


def server_pkt(seq: int, ack: int, flags: int, opts: bytes = b"", win: int = 4096) -> bytes:
    """4096 << 7: a 512 KiB window once scaling is on; the SYN-ACK's is unscaled."""
    return tcp_packet(SERVER, CLIENT, 5201, 40000, seq, ack, flags, win, 0, opts)


def handshake(c: Cluster, a: Node, b: Node, t: float) -> float:
    """SYN via A (deferred until a peer's INS_ACK), SYN-ACK and later ACKs via B."""
    opts = syn_options(MSS, 7)
    steps = [
        (a, client_pkt(C_ISN, 0, TH_SYN, 0, opts), True),
        (b, server_pkt(S_ISN, C_ISN + 1, TH_SYN | TH_ACK, opts, 65535), False),
        (a, client_pkt(C_ISN + 1, S_ISN + 1, TH_ACK), True),
    ]
    for node, raw, to_server in steps:
        c.run_until(t)
        assert c.forward(node, raw, to_server, t, lambda _t: None)
        t += 0.05
    c.run_until(t)
    return t


def burst(c: Cluster, a: Node, b: Node, t0: float, segments: int) -> list[bool]:
    """A forwards `segments` full segments back to back; the server acknowledges every
    second one through B. Returns B's verdicts on those ACKs."""
    verdicts: list[bool] = []
    seq = C_ISN + 1
    for i in range(segments):
        t = t0 + i * GAP
        c.at(t, lambda now, s=seq: c.forward(
            a, client_pkt(s, S_ISN + 1, TH_ACK, MSS), True, now, lambda _t: None) and None)
        seq += MSS
        if i % 2:
            c.at(t + SERVER_TURN, lambda now, k=seq: verdicts.append(c.forward(
                b, server_pkt(S_ISN + 1, k, TH_ACK), False, now, lambda _t: None)))
    c.run_until(t0 + segments * GAP + 0.01)
    return verdicts


@pytest.mark.parametrize("idle", [0.5, 3.0, 30.0])
def test_split_state_resumed_after_idle_keeps_its_acks(idle: float) -> None:
    c = Cluster(nodes=4, defer=True, link=SyncLink(latency=LATENCY))
    c.run_until(1.5)
    a, b = c.node("A"), c.node("B")
    t = handshake(c, a, b, 2.0)
    assert c.node("C").filter.states and c.node("D").filter.states  # they hold copies
    before = a.engine.counters["split_immediate"]
    segments = 60  # 86 880 bytes: more than pf's ack window (67 035) in one burst
    verdicts = burst(c, a, b, t + idle, segments)
    assert len(verdicts) == segments // 2
    assert all(verdicts), f"B dropped {verdicts.count(False)} ACKs after {idle} s idle"
    assert b.state_mismatch == 0 and a.state_mismatch == 0
    # every data segment's update left A at once, as during the handshake
    assert a.engine.counters["split_immediate"] - before >= segments


def test_state_only_we_forward_stops_being_split_after_the_window() -> None:
    """The other half of the rule is kept: when the peers fall silent while we keep
    forwarding (paths merged onto us), the state stops being split one window later and
    its updates go back to the pace."""
    c = Cluster(nodes=2, defer=True, link=SyncLink(latency=LATENCY))
    c.run_until(1.5)
    a, b = c.node("A"), c.node("B")
    t = handshake(c, a, b, 2.0)
    seq = C_ISN + 1
    imm = []
    for i in range(50):  # 5 s of client data through A only, one segment per 100 ms
        now = t + 0.1 * i
        c.run_until(now)
        before = a.engine.counters["split_immediate"]
        assert c.forward(a, client_pkt(seq, S_ISN + 1, TH_ACK, MSS), True, now, lambda _t: None)
        imm.append(a.engine.counters["split_immediate"] - before)
        seq += MSS
    # the last peer update (B's, during the handshake) is < 2 s old for the first ~20
    assert imm[:15] == [2] * 15  # two states (in and out) per routed connection
    assert imm[-20:] == [0] * 20


def test_resumed_rule_in_engine_time() -> None:
    """The rule on one engine with hand-driven time: a peer's update at 1.0, our send at
    1.2, silence, then local updates at 10.0 (split again, counted once), 11.9 (still,
    the peer has not answered), 12.0 (the window is over: paced)."""
    c = Cluster(nodes=2, link=SyncLink(latency=LATENCY))
    a = c.node("A").engine
    b = c.node("B")
    syn = client_pkt(C_ISN, 0, TH_SYN, 0, syn_options(MSS, 7))
    assert c.forward(b, syn, True, 0.5, lambda _t: None)
    b.engine.flush(0.5)
    for frame in b.engine.take_output():
        a.receive(frame, 1.0)
    st = next(iter(a.filter.states))
    assert st.pfsync_time == 1.0
    a.state_updated(st, 1.2)
    a.end_of_batch(1.2)
    assert len(a.take_output()) == 1 and st.pfsync_sent == 1.2
    imm = []
    for now in (10.0, 10.5, 11.9, 12.0, 13.0):
        before = a.counters["split_immediate"]
        a.state_updated(st, now)
        a.end_of_batch(now)
        a.take_output()
        imm.append(a.counters["split_immediate"] - before)
    assert imm == [1, 1, 1, 0, 0]
    assert a.counters["split_resumed"] == 1
    # an update never sent by us (imported only) keeps the thesis' rule
    other = next(s for s in a.filter.states if s is not st)
    assert other.pfsync_sent == NEVER
    before = a.counters["split_immediate"]
    a.state_updated(other, 20.0)
    assert a.counters["split_immediate"] == before
