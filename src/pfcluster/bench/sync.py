"""`pfcluster bench sync`: pfsync figures (codec rates for now; the engine adds more)."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

from pfcluster.pfsync import wire

DIALECT = "openbsd45"


def _sample_state(i: int) -> wire.State:
    key = wire.StateKey([wire.addr_from_str("198.51.100.2"), wire.addr_from_str("203.0.113.10")],
                        [30000 + i, 5201])  # fmt: skip
    return wire.State(
        id=(1 << 32) + i, ifname="eth1", key=[key, wire.StateKey(list(key.addr), list(key.port))],
        src=wire.StatePeer(seqlo=1000 + i, seqhi=66535 + i, max_win=65535, state=4, wscale=0x87),
        dst=wire.StatePeer(seqlo=5000 + i, seqhi=70535 + i, max_win=65535, state=4, wscale=0x87),
        creatorid=0xC0FFEE01, af=2, proto=6, direction=1, timeout=2, packets=[i, i], bytes=[i, i],
    )  # fmt: skip


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
    }  # fmt: skip
    dec: dict[str, float] = {}
    enc: dict[str, float] = {}
    for name, frame in frames.items():
        n = len(frame.sections[0].messages)
        data = wire.encode(frame, DIALECT)
        dec[name] = round(_rate(partial(wire.decode, data, DIALECT), n, seconds))
        enc[name] = round(_rate(partial(wire.encode, frame, DIALECT), n, seconds))
    return {"decode_msgs_per_s": dec, "encode_msgs_per_s": enc}


def run(quick: bool = False) -> dict[str, Any]:
    """All pfsync figures (the engine figures are added by the engine's author)."""
    return codec_rates(quick=quick)
