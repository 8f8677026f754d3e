"""`pfcluster bench`: measured figures as one JSON object per run.

An unwritable `--json FILE` (missing directory, a directory, no permission) is refused
before the benchmark runs: one line on stderr, exit status 1."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pfcluster.cli.errors import ReportingGroup, check_output_file


def write_json(path: str | None, figures: dict[str, object]) -> None:
    text = json.dumps(figures, indent=2, sort_keys=True)
    if path:
        Path(path).write_text(text + "\n")
    click.echo(text)


@click.group(cls=ReportingGroup)
def bench() -> None:
    """Benchmarks that print figures (engine, sync)."""
    from pfcluster.tuning import tune_gc

    tune_gc()  # as the daemon runs


@bench.command("engine")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write figures here")
@click.option("--quick", is_flag=True, help="smaller sizes (for tests)")
def bench_engine(json_path: str | None, quick: bool) -> None:
    """pf engine: fast path, rule evaluation, state inserts, bytes per state."""
    check_output_file(json_path)
    from pfcluster.bench.engine import run

    write_json(json_path, run(quick=quick))


@bench.command("sync")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write figures here")
@click.option("--quick", is_flag=True, help="smaller sizes (for tests)")
def bench_sync(json_path: str | None, quick: bool) -> None:
    """pfsync: codec rates, bulk transfer, split-path overhead v5 vs v4."""
    check_output_file(json_path)
    from pfcluster.bench.sync import run

    write_json(json_path, run(quick=quick))


@bench.command("daemon")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write figures here")
@click.option("--seconds", type=float, default=3.0, show_default=True, help="iperf3 run length")
def bench_daemon(json_path: str | None, seconds: float) -> None:
    """One daemon in namespaces: pps through it vs. a queue that accepts everything (root)."""
    check_output_file(json_path)
    from pfcluster.bench.daemon import run

    write_json(json_path, run(seconds))
