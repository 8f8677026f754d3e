"""`pfcluster bench`: measured figures as one JSON object per run.

An unwritable `--json FILE` (missing directory, a directory, no permission) is refused
before the benchmark runs: one line on stderr, exit status 1."""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path

import click

from pfcluster.cli.errors import ReportingGroup, check_output_file


def write_json(path: str | None, figures: Mapping[str, object]) -> None:
    text = json.dumps(figures, indent=2, sort_keys=True)
    if path:
        Path(path).write_text(text + "\n")
    click.echo(text)


@click.group(cls=ReportingGroup)
def bench() -> None:
    """Benchmarks that print figures (engine, sync, parse, daemon)."""
    from pfcluster.tuning import tune_gc

    tune_gc()  # as the daemon runs


def _in_process(name: str, summary: str) -> None:
    """`bench NAME [--quick] [--json FILE]`: the figures of pfcluster.bench.NAME.run()."""

    @bench.command(name, help=summary)
    @click.option("--json", "json_path", type=click.Path(dir_okay=False),
                  help="write figures here")
    @click.option("--quick", is_flag=True, help="smaller sizes (for tests)")
    def command(json_path: str | None, quick: bool) -> None:
        check_output_file(json_path)
        module = importlib.import_module(f"pfcluster.bench.{name}")
        write_json(json_path, module.run(quick=quick))


_in_process("engine", "pf engine: fast path, rule evaluation, state inserts, bytes per state.")
_in_process("sync", "pfsync: codec rates, bulk transfer, split-path overhead v5 vs v4.")
_in_process("parse", "Packet parser: parses per second of typical packets (parse and parse_into).")
_in_process("auth", "--sync-key: frames sealed and verified per second (beside decoding them).")


@bench.command("daemon")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write figures here")
@click.option("--seconds", type=float, default=3.0, show_default=True, help="iperf3 run length")
@click.option("--workers/--no-workers", default=True, show_default=True,
              help="also 4 flows through --workers 1 and --workers 2 (workers_scaling)")
@click.option("--watching", type=click.IntRange(0, 20), default=0, show_default=True,
              metavar="ROUNDS", help="also ROUNDS back-to-back runs without and with "
              "--metrics (scraped every second) and --pflog, rules with `log`")
@click.option("--sync-key", "sync_key", type=click.Path(dir_okay=False),
              help="run the daemon with this --sync-key file (its frames sealed)")
def bench_daemon(json_path: str | None, seconds: float, workers: bool, watching: int,
                 sync_key: str | None) -> None:
    """One daemon in namespaces: pps through it vs. a queue that accepts everything (root)."""
    check_output_file(json_path)
    import sys

    from pfcluster.bench.daemon import run

    argv = [sys.executable, "-m", "pfcluster.cli.main", "daemon"]
    if sync_key:
        argv += ["--sync-key", sync_key]
    write_json(json_path, run(seconds, workers=workers, watching=watching, daemon_argv=argv))
