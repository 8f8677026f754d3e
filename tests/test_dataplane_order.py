"""The data plane applies a peer's pfsync frame that reached us before a packet before it
decides that packet (docs/ecmp4.md).

A fake NFQUEUE delivers a mini-batch in which a peer's update lands in the sync socket
between two packets of the batch: B forwards the server's ACKs of a split connection
whose data crossed A, and the second ACK acknowledges more than pf's 67 035-byte window
beyond what B knew before A's update. Reading the peers only after deciding the batch
dropped that ACK, although the update had arrived first. No root, no timing.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest

from pfcluster.io import dataplane
from pfcluster.io.dataplane import NF_INET_FORWARD, Dataplane
from pfcluster.io.nfq import NF_ACCEPT, NFQNL_MSG_VERDICT_BATCH, QueuedPacket, Verdicts
from pfcluster.packet import parse
from pfcluster.pf.constants import PFRES_BADSTATE, TH_ACK, TH_SYN
from pfcluster.pf.filter import Filter
from pfcluster.pf.router import ROUTE_BLOCK, route
from pfcluster.pf.rules import parse_rules
from pfcluster.pfsync.engine import Engine, EngineConfig, attach
from pfcluster.sim.tcpsim import syn_options, tcp_packet

RULES = """\
block all
pass in on em0 proto tcp to port 5201
pass out on em1 proto tcp
"""
CLIENT = socket.inet_aton("198.51.100.2")
SERVER = socket.inet_aton("203.0.113.10")
C_ISN, S_ISN, MSS = 0x10000000, 0x70000000, 1448
EM0, EM1 = 1, 2  # fake ifindexes


class FakePacket:
    """A queued packet the test can ask for its verdict."""

    _ids = iter(range(1, 1 << 30))

    def __init__(self, raw: bytes, indev: int, outdev: int) -> None:
        self.qp = QueuedPacket()
        self.qp.packet_id = next(FakePacket._ids)
        self.qp.hook = NF_INET_FORWARD
        self.qp.indev, self.qp.outdev = indev, outdev
        self.qp.payload = memoryview(raw)
        self.qp.wire_len = len(raw)
        self.verdicts: Verdicts | None = None

    @property
    def verdict(self) -> str | None:
        """What the flushed verdict messages say about this packet."""
        assert self.verdicts is not None
        return FakeQueue.verdict_of.get(self.qp.packet_id)


class FakeQueue:
    """io.nfq.NfQueue with a script: packets, and callables standing for a peer's frame
    landing in the sync socket before the read that returns the packets after it. One
    drain() is one read of everything scripted (recvmmsg returns a burst at once)."""

    script: list[Any] = []
    verdict_of: dict[int, str] = {}

    def __init__(self, queue: int, **kw: Any) -> None:
        self.verdicts = Verdicts(queue)

    def drain(self, handle: Callable[[QueuedPacket], Any], budget: int = 1 << 30, *,
              flush: bool = True) -> int:
        packets = [x for x in FakeQueue.script if isinstance(x, FakePacket)]
        for item in FakeQueue.script:  # everything scripted happened before the read
            if not isinstance(item, FakePacket):
                item()
        FakeQueue.script = []
        for p in packets:
            p.verdicts = self.verdicts
            handle(p.qp)
        if flush:  # as the real drain does
            self.flush()
        return len(packets)

    events: list[str] = []

    def flush(self) -> None:
        if self.verdicts.out or self.verdicts.run_last >= 0:
            FakeQueue.events.append("verdicts")
        v = self.verdicts
        v.close_run()
        out = bytes(v.out)
        v.out.clear()
        off = 0
        while off < len(out):  # nlmsghdr + nfgenmsg + NFQA_VERDICT_HDR(verdict, id)
            length, mtype = struct.unpack_from("=IH", out, off)
            verdict, packet_id = struct.unpack_from("!II", out, off + 24)
            batch = (mtype & 0xFF) == NFQNL_MSG_VERDICT_BATCH
            name = "accept" if verdict == NF_ACCEPT else "drop"
            if batch:
                for pid in range(packet_id + 1):
                    FakeQueue.verdict_of.setdefault(pid, name)
            else:
                FakeQueue.verdict_of[packet_id] = name
            off += length

    def fileno(self) -> int:
        return -1

    def kernel_stats(self) -> dict[str, int]:
        return {}

    def counters(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


def node(hostid: int) -> Engine:
    return attach(Filter(parse_rules(RULES, "order.conf"), hostid=hostid, now=0.0),
                  EngineConfig(), 0.0)


def exchange(src: Engine, dsts: list[Engine], now: float) -> None:
    src.end_of_batch(now)
    src.flush(now)
    for frame in src.take_output():
        for d in dsts:
            d.receive(frame, now + 0.0001)
            d.end_of_batch(now + 0.0001)


def fwd(eng: Engine, raw: bytes, to_server: bool, now: float) -> bool:
    i, o = ("em0", "em1") if to_server else ("em1", "em0")
    return route(eng.filter, i, o, parse(raw), now, eng, None).action != ROUTE_BLOCK


def c2s(seq: int, ack: int, flags: int, plen: int = 0, opts: bytes = b"") -> bytes:
    return tcp_packet(CLIENT, SERVER, 40000, 5201, seq, ack, flags, 4096, plen, opts)


def s2c(seq: int, ack: int, flags: int, win: int = 4096, opts: bytes = b"") -> bytes:
    return tcp_packet(SERVER, CLIENT, 5201, 40000, seq, ack, flags, win, 0, opts)


@pytest.fixture
def fake_nfq(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataplane, "NfQueue", FakeQueue)
    FakeQueue.script = []
    FakeQueue.verdict_of = {}
    FakeQueue.events = []


def split_handshake(t: float) -> tuple[Engine, Engine]:
    """A forwards the SYN, B the SYN-ACK, each hearing of the other by pfsync: a split
    state on both from then on."""
    a, b = node(0xA), node(0xB)
    opts = syn_options(MSS, 7)
    assert fwd(a, c2s(C_ISN, 0, TH_SYN, 0, opts), True, t)
    exchange(a, [b], t)
    assert fwd(b, s2c(S_ISN, C_ISN + 1, TH_SYN | TH_ACK, 65535, opts), False, t + 0.01)
    exchange(b, [a], t + 0.01)
    return a, b


def test_update_arriving_within_a_batch_is_applied_before_its_packets(fake_nfq: None) -> None:
    t = 1.0
    a, b = split_handshake(t)
    assert fwd(a, c2s(C_ISN + 1, S_ISN + 1, TH_ACK), True, t + 0.02)
    exchange(a, [b], t + 0.02)
    # A forwards 50 segments (72 400 bytes); its update for them is the peer frame
    seq = C_ISN + 1
    for _ in range(50):
        assert fwd(a, c2s(seq, S_ISN + 1, TH_ACK, MSS), True, t + 0.03)
        seq += MSS
    a.end_of_batch(t + 0.03)
    update = a.take_output()
    assert update

    sync_socket: list[bytes] = []

    def read_peers() -> None:  # the daemon loop's _between_batches, reduced
        for frame in sync_socket:
            b.receive(frame, t + 0.04)
        sync_socket.clear()
        b.end_of_batch(t + 0.04)
        b.take_output()

    dp = Dataplane(0, b.filter, b, between_batches=read_peers, clock=lambda: t + 0.04)
    dp._ifnames.update({EM0: "em0", EM1: "em1"})
    early = FakePacket(s2c(S_ISN + 1, C_ISN + 1 + 4 * MSS, TH_ACK), EM1, EM0)
    late = FakePacket(s2c(S_ISN + 1, seq, TH_ACK), EM1, EM0)  # acks all 50 segments
    FakeQueue.script = [early, lambda: sync_socket.extend(update), late]
    dp.on_readable()
    assert (early.verdict, late.verdict) == ("accept", "accept")
    assert b.filter.counters[PFRES_BADSTATE] == 0
    assert dp.counters.batches == 1 and dp.counters.blocked == 0


def test_a_short_burst_sends_its_update_before_its_verdicts(fake_nfq: None) -> None:
    """A burst smaller than a mini-batch (the usual case: ~17 packets per wakeup at
    300 Mbit/s) must still send its pfsync frame before the kernel forwards the packets,
    or the peer on a split path meets the receiver's ACK first. The data plane once let
    the queue flush the tail's verdicts at the end of its read, before the frame: 1-15
    state-mismatch per 3 s split lab run."""
    t = 1.0
    a, _ = split_handshake(t)  # A's updates for the split state leave at once
    t += 0.02
    sent: list[bytes] = []

    def send_frames() -> None:  # the daemon loop's _between_batches, reduced
        a.end_of_batch(t)
        frames = a.take_output()
        if frames:
            FakeQueue.events.append("pfsync")
            sent.extend(frames)

    dp = Dataplane(0, a.filter, a, between_batches=send_frames, clock=lambda: t)
    dp._ifnames.update({EM0: "em0", EM1: "em1"})
    data = FakePacket(c2s(C_ISN + 1, S_ISN + 1, TH_ACK, MSS), EM0, EM1)
    FakeQueue.script = [data]
    dp.on_readable()
    assert data.verdict == "accept"
    assert FakeQueue.events == ["pfsync", "verdicts"], FakeQueue.events
    assert sent and dp.counters.batches == 1
