"""Process settings for a packet filter holding many long-lived objects.

CPython's cyclic collector runs every 700 allocations and re-scans the older generations
as they grow; a state table of 100k states is ~400k tracked objects, so the default makes
state inserts and bulk imports spend a third of their time in collections that never
find garbage (states hold no cycles). The daemon and the benchmarks use the same
setting, so the figures describe what runs.
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (100_000, 50, 100)


def tune_gc() -> None:
    gc.set_threshold(*GC_THRESHOLDS)
