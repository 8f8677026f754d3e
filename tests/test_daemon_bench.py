"""`pfcluster.bench.daemon.run`: the three figures come out of one short run."""

from __future__ import annotations

import pytest

from pfcluster.bench.daemon import run_bench
from pfcluster.lab.netns import leftovers

pytestmark = [pytest.mark.root]  # network namespaces, iptables, NFQUEUE


def test_bench_daemon_short(need_root: None) -> None:
    figures = run_bench(1.0, kernel_baseline=False)
    for setup in ("accept_all", "daemon"):
        for proto in ("tcp", "udp64"):
            row = figures[setup][proto]
            assert "error" not in row, row
            assert row["pps"] > 0 and row["mbit_s"] > 0
    assert figures["daemon_exit"] == 0
    assert figures["daemon"]["dataplane"]["packets"] > 0
    assert not [x for x in leftovers("pfc") if "-b" in x]
