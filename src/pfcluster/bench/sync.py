"""`pfcluster bench sync`: pfsync figures: codec rates, bulk-update throughput between two
in-process engines, and the sync cost of a split-path TCP transfer (v5 and v4 behaviour)."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

from pfcluster.pf.constants import TCPS
from pfcluster.pf.filter import Filter
from pfcluster.pf.rules import parse_rules
from pfcluster.pf.state import State
from pfcluster.pfsync import wire
from pfcluster.pfsync.engine import Engine, EngineConfig, attach

DIALECT = "openbsd45"


def _sample_state(i: int) -> wire.State:
    key = wire.StateKey([wire.addr_from_str("198.51.100.2"), wire.addr_from_str("203.0.113.10")],
                        [30000 + i, 5201])
    return wire.State(
        id=(1 << 32) + i, ifname="eth1", key=[key, wire.StateKey(list(key.addr), list(key.port))],
        src=wire.StatePeer(seqlo=1000 + i, seqhi=66535 + i, max_win=65535, state=4, wscale=0x87),
        dst=wire.StatePeer(seqlo=5000 + i, seqhi=70535 + i, max_win=65535, state=4, wscale=0x87),
        creatorid=0xC0FFEE01, af=2, proto=6, direction=1, timeout=2, packets=[i, i], bytes=[i, i],
    )


def _full_frame(action: str, make: Callable[[int], Any], size: int) -> wire.Frame:
    """As many messages as fit a 1500-byte pfsync packet (IP + header + EOF)."""
    room = 1500 - 20 - wire.HEADER_LEN - wire.SUBHEADER_LEN - (wire.SUBHEADER_LEN + 20)
    n = room // size
    msgs = [make(i) for i in range(n)]
    return wire.Frame(
        5, sections=[wire.Section(action, wire.ACTIONS[DIALECT][action], messages=msgs)]
    )


def _rate(fn: Callable[[], Any], msgs_per_call: int, seconds: float) -> float:
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            fn()
        calls += 50
        now = time.perf_counter()
        if now >= deadline:
            return calls * msgs_per_call / (now - start)


def codec_rates(quick: bool = False) -> dict[str, dict[str, float]]:
    """Messages per second decoding/encoding 1500-byte frames full of UPD_C or INS."""
    seconds = 0.2 if quick else 1.5
    frames = {
        "UPD_C": _full_frame("UPD_C", lambda i: wire.UpdC(i, wire.StatePeer(seqlo=i, state=4),
                                                          wire.StatePeer(seqlo=i, state=4),
                                                          0xC0FFEE01, 0, 2),
                             wire.record_size(DIALECT, "UPD_C")),
        "INS": _full_frame("INS", _sample_state, wire.record_size(DIALECT, "INS")),
    }
    dec: dict[str, float] = {}
    enc: dict[str, float] = {}
    for name, frame in frames.items():
        n = len(frame.sections[0].messages)
        data = wire.encode(frame, DIALECT)
        dec[name] = round(_rate(partial(wire.decode, data, DIALECT), n, seconds))
        enc[name] = round(_rate(partial(wire.encode, frame, DIALECT), n, seconds))
    return {"decode_msgs_per_s": dec, "encode_msgs_per_s": enc}


BULK_RULES = "block all\npass in on em0 proto tcp to port 5201\npass out on em1 proto tcp\n"


def _bulk_engines(n: int) -> tuple[Engine, Engine]:
    """A sender holding `n` established TCP states and an empty receiver, paced for speed."""
    cfg = EngineConfig(bulk_tick=0.0, bulk_frames_per_tick=1 << 30, bulk_retry=60.0)
    sender = attach(Filter(parse_rules(BULK_RULES, "bulk.conf"), hostid=0x0B00_0001), cfg)
    receiver = attach(Filter(parse_rules(BULK_RULES, "bulk.conf"), hostid=0x0B00_0002), cfg)
    table = sender.filter.states
    client = wire.addr_from_str("198.51.100.2")[:4]
    est = int(TCPS.ESTABLISHED)
    for i in range(n):
        server = bytes((10, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF))
        st = State((2, 6, client, server, 40000, 5201), 1, sender.creatorid, (1 << 40) + i, 0.0)
        for p, base in ((st.src, 1000 + i), (st.dst, 900000 + i)):
            p.seqlo, p.seqhi, p.max_win, p.state, p.wscale = base, base + 65535, 65535, est, 0x87
        st.timeout = 2
        st.packets0 = st.packets1 = i
        st.bytes0 = st.bytes1 = i * 1000
        table.insert(st)
    return sender, receiver


def bulk_rate(n: int = 100_000) -> dict[str, Any]:
    """States per second for a whole bulk update: export + encode + decode + import.

    The clock runs from the receiver's UPD_REQ 0/0 reaching the sender until the receiver
    holds every state and has taken the BUS END; timer() is driven with no pacing delay.
    """
    sender, receiver = _bulk_engines(n)
    receiver.start(1.0)
    receiver.end_of_batch(1.0)
    (request,) = receiver.take_output()
    start = time.perf_counter()
    now = 1.0
    sender.receive(request, now)
    frames = sender.take_output()
    while sender.next_deadline() is not None and not receiver.sync_ok:
        sender.timer(now)
        frames += sender.take_output()
        for f in frames:
            receiver.receive(f, now)
        frames = []
        now += 0.001
    for f in frames:
        receiver.receive(f, now)
    elapsed = time.perf_counter() - start
    held = len(receiver.filter.states)
    if held != n or not receiver.sync_ok:
        raise RuntimeError(f"bulk update incomplete: {held}/{n} states, sync_ok {receiver.sync_ok}")
    return {
        "bulk_states": n,
        "bulk_seconds": round(elapsed, 4),
        "bulk_states_per_s": round(n / elapsed),
        "bulk_frames": sender.counters["opackets"],
    }


def split_overhead(packets: int = 10_000) -> dict[str, Any]:
    """Sync cost of a split-path transfer (client->server via A, replies via B) with
    1500-byte IP packets: v5 with deferral, then the v4 behaviour."""
    from pfcluster.sim.pair import Cluster, SyncLink
    from pfcluster.sim.tcpsim import TcpTransfer

    mss = 1460  # 20 IP + 20 TCP + 1460 = 1500-byte data packets
    out: dict[str, Any] = {}
    for proto, suffix in (("v5", ""), ("v4", "_v4")):
        c = Cluster(protocol=proto, defer=proto == "v5", link=SyncLink(latency=0.001))
        c.run_until(1.5)
        f0, b0 = c.link.frames, c.link.bytes
        # ack_every=2: about 2 data packets for each ACK
        xfer = TcpTransfer(total_bytes=mss * (packets * 2 // 3), mss=mss)
        r = c.transfer(xfer, "A", "B", rate_pps=10000, max_time=20)
        frames, nbytes = c.link.frames - f0, c.link.bytes - b0
        data = r["bytes_delivered"]
        out[f"split_sync_bytes_per_data_byte{suffix}"] = round(nbytes / data, 5) if data else None
        out[f"frames_per_data_packet{suffix}"] = (
            round(frames / r["packets"], 4) if r["packets"] else None
        )
        out[f"split_completed{suffix}"] = r["completed"]
        out[f"split_goodput_mbps{suffix}"] = round(r["goodput_bps"] / 1e6, 2)
        out[f"split_blocked{suffix}"] = r["blocked"]
        out[f"split_packets{suffix}"] = r["packets"]
    return out


def run(quick: bool = False) -> dict[str, Any]:
    """All pfsync figures."""
    out: dict[str, Any] = dict(codec_rates(quick=quick))
    out.update(bulk_rate(10_000 if quick else 100_000))
    out.update(split_overhead(2_000 if quick else 10_000))
    return out
