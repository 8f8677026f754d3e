"""What `--sync-key` costs per pfsync frame: seals and verifications per second for a
small frame (one CLR), a typical one (10 UPD_C) and a full one (1500-byte MTU of
UPD_C), beside decoding the same frame (`wire.decode`), which every received frame
costs anyway. openbsd45 (the EOF body holds the authenticator) and freebsd1400 (a
trailer after header.len)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pfcluster.pfsync import auth, wire

KEY = bytes(range(32))


def _frame(dialect: str, n_updc: int) -> bytes:
    a = wire.ACTIONS[dialect]
    if n_updc == 0:
        secs = [wire.Section("CLR", a["CLR"], 1, [wire.Clr("", 1)])]
    else:
        msgs = [wire.UpdC(i + 1, wire.StatePeer(seqlo=i, state=4), wire.StatePeer(state=4),
                          0x1234, 30, 2) for i in range(n_updc)]
        secs = [wire.Section("UPD_C", a["UPD_C"], n_updc, msgs)]
    return wire.encode(wire.Frame(wire.VERSION[dialect], None, bytes(16), secs), dialect)


def _rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (best of 3 slices)."""
    best = 0.0
    for _ in range(3):
        n, start = 0, time.perf_counter()
        end = start + seconds / 3
        while True:
            for _ in range(200):
                fn()
            n += 200
            now = time.perf_counter()
            if now >= end:
                break
        best = max(best, n / (now - start))
    return best


def run(quick: bool = False) -> dict[str, Any]:
    seconds = 0.3 if quick else 1.5
    keys = auth.KeyRing([(1, KEY)])
    out: dict[str, Any] = {"tag_bits": auth.TAG_LEN * 8, "mac": "HMAC-SHA256"}
    for dialect in ("openbsd45", "freebsd1400"):
        size = wire.record_size(dialect, "UPD_C")
        full = (1500 - 20 - 20 - 4 - auth.AUTH_LEN - 4) // size
        for label, n in (("small", 0), ("typical", 10), ("full", full)):
            frame = _frame(dialect, n)
            sealer = auth.Sealer(keys, 7, dialect)
            sealed = sealer.seal(frame)
            verifier = auth.Verifier(keys, dialect)
            window = verifier.windows

            def verify(v: auth.Verifier = verifier, f: bytes = sealed,
                       w: dict[int, Any] = window) -> object:
                w.clear()  # the same frame again: start a fresh window each time
                return v.check(f)

            def seal(s: auth.Sealer = sealer, f: bytes = frame) -> object:
                return s.seal(f)

            def decode(f: bytes = frame, d: str = dialect) -> object:
                return wire.decode(f, d)

            seal_rate = _rate(seal, seconds)
            verify_rate = _rate(verify, seconds)
            decode_rate = _rate(decode, seconds)
            out[f"{dialect}_{label}"] = {
                "bytes": len(sealed), "messages": max(1, n),
                "seal_per_s": round(seal_rate), "verify_per_s": round(verify_rate),
                "decode_per_s": round(decode_rate),
                "seal_us": round(1e6 / seal_rate, 2), "verify_us": round(1e6 / verify_rate, 2),
                "decode_us": round(1e6 / decode_rate, 2),
            }
    return out
