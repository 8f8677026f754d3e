"""`pfcluster.bench.daemon.run`: the three figures come out of one short run."""

from __future__ import annotations

import pytest

from pfcluster.bench.daemon import run_bench
from pfcluster.lab.netns import leftovers

pytestmark = [pytest.mark.root]  # network namespaces, iptables, NFQUEUE


def test_bench_daemon_short(need_root: None) -> None:
    figures = run_bench(1.0, kernel_baseline=False)
    for setup in ("accept_all", "accept_all_nfq", "daemon"):
        for proto in ("tcp", "udp64"):
            row = figures[setup][proto]
            assert "error" not in row, row
            assert row["pps"] > 0 and row["mbit_s"] > 0
    assert figures["daemon_exit"] == 0
    assert figures["daemon"]["dataplane"]["packets"] > 0
    for n in (1, 2):  # the same 4 flows through 1 and 2 workers, every worker busy
        row = figures[f"workers_{n}"]
        assert "errors" not in row, row
        assert row["exit"] == 0 and row["pps"] > 0 and row["flows"] == 4
        assert len(row["worker_cpu_seconds"]) == n
    assert len(figures["workers_2"]["worker_packets"]) == 2
    assert figures["workers_scaling"] > 0
    assert not [x for x in leftovers("pfc") if "-b" in x]
