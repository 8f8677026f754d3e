"""How long deferred packets were held: a fixed-bucket histogram kept by the daemon (one
bisect per released packet) and read by `ctl info` and the metrics endpoint."""

from __future__ import annotations

import bisect
from typing import Any

# pfsync's defer timeout is 20 ms; past it a packet leaves without its ack
DEFER_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


class HoldTimes:
    """Counts per bucket (the last one is +Inf) and the sum of the observed seconds."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = DEFER_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    def as_dict(self) -> dict[str, Any]:
        """Cumulative counts by upper bound, as Prometheus has them (and summable leaf by
        leaf across the workers of a --workers firewall)."""
        out: dict[str, int] = {}
        total = 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts):
            total += n
            out[bound] = total
        return {"le": out, "sum": round(self.sum, 6), "count": total}
