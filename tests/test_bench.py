"""The benchmarks run and report every key the issues name (sizes reduced; figures are
printed by `pfcluster bench`, not asserted as timings)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from pfcluster.cli.bench import bench


def test_bench_engine_quick(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    res = CliRunner().invoke(bench, ["engine", "--quick", "--json", str(out)])
    assert res.exit_code == 0, res.output
    fig = json.loads(out.read_text())
    for key in ("fastpath_pps", "state_insert_per_s", "bytes_per_state", "nat_rewrite_ns"):
        assert fig[key] > 0
    assert set(fig["rule_eval_pps"]) == {"10", "100", "1000"}
    assert fig["fastpath_state_mismatch"] == 0  # the fast path really matched states
