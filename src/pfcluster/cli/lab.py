"""`pfcluster lab`: the active-active namespace lab (run, compare, sweep, clean).

Bad input that can be seen before the lab is built is refused first, before the root
check, as one line on stderr with exit status 1: an output file or directory that cannot
be written (`--json`, `--out`), a `--rules` file with a mistake (`file:line:col: ...`).
Usage errors (a bad `--dialect`, `--paths`...) are one line with status 2."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from pfcluster.cli.errors import (
    ReportingGroup,
    check_output_dir,
    check_output_file,
    load_rules_file,
)
from pfcluster.io.config import DIALECTS

console = Console(stderr=True)


def stdout_console() -> Console:
    """Tables on stdout; wide enough when piped to a file (rich would use 80 columns)."""
    return Console() if sys.stdout.isatty() else Console(width=180)

firewall_option = click.option(
    "--firewall", "firewall", type=click.Choice(["auto", "daemon", "plain"]), default="auto",
    show_default=True,
    help="daemon: pfcluster daemon per firewall; plain: stateless Linux routers; "
         "auto: the daemon when it is installed",
)
seconds_option = click.option("--seconds", type=click.IntRange(1, 600), default=10,
                              show_default=True, help="iperf3 duration per run")
workers_option = click.option(
    "--workers", type=click.IntRange(1, 64), default=1, show_default=True,
    help="daemon --workers N (the kernel spreads flows by address pair)")
streams_option = click.option("--streams", type=click.IntRange(1, 64), default=4,
                              show_default=True, help="parallel TCP streams (iperf3 -P)")


def _need_root() -> None:
    if os.geteuid() != 0:
        raise click.UsageError("the lab needs root (network namespaces, iptables)")


@contextlib.contextmanager
def progress_display(total_runs: int) -> Iterator[Callable[[int, int, str, str, float], None]]:
    """A rich progress display: one bar for all runs, one for the current run."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[what]}"),
        TimeElapsedColumn(), console=console, transient=False,
    ) as prog:
        overall = prog.add_task("all runs", total=total_runs, what="")
        current = prog.add_task("", total=1.0, what="")

        def update(i: int, n: int, name: str, what: str, frac: float) -> None:
            prog.update(overall, completed=i + frac, total=n, what=f"{i + 1}/{n}")
            prog.update(current, description=name, completed=frac, what=what)

        yield update


def _interrupted() -> None:
    console.print("[yellow]interrupted: the lab was removed[/]")
    sys.exit(130)


def _run_single(cmd: str, label: str, work: Callable[[Callable[[str, float], None]], Any],
                json_path: str | None) -> Any:
    """One lab experiment under a progress bar: a lab error is one red line and exit 1,
    Ctrl-C removes the lab; the JSON is written when asked for."""
    from pfcluster.lab.netns import LabError
    from pfcluster.lab.report import write_json

    try:
        with progress_display(1) as update:
            doc = work(lambda what, frac: update(0, 1, label, what, frac))
    except KeyboardInterrupt:
        _interrupted()
    except LabError as exc:
        console.print(f"[red]pfcluster lab {cmd}: {exc}[/]")
        sys.exit(1)
    if json_path:
        write_json(json_path, doc)
    return doc


_OWNER = os.getpid()


def _sigterm(signum: int, frame: object) -> None:
    """SIGTERM: the same clean teardown as Ctrl-C, but only in this process: children
    forked by pyroute2 inherit the handler and must simply die."""
    if os.getpid() != _OWNER:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise KeyboardInterrupt


@click.group("lab", cls=ReportingGroup)
def lab() -> None:
    """Namespace lab: real TCP through N firewalls, symmetric, split or ECMP paths."""
    with contextlib.suppress(ValueError):  # not the main thread (e.g. in a test runner)
        signal.signal(signal.SIGTERM, _sigterm)


@lab.command("run")
@click.option("--paths", type=click.Choice(["symmetric", "split", "ecmp"]), default="split",
              show_default=True)
@click.option("--sync", type=click.Choice(["v5", "v4", "off"]), default="v5", show_default=True)
@seconds_option
@streams_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write figures here")
@click.option("--firewalls", type=click.IntRange(1, 9), default=2, show_default=True)
@firewall_option
@click.option("--failover", is_flag=True,
              help="halfway through, kill fw1 and move its routes to fw2")
@click.option("--integrity-mb", type=click.IntRange(0, 1024), default=0,
              help="after iperf3, move this many MB of a known stream and check SHA-256")
@click.option("--defer", is_flag=True, help="daemon --defer")
@click.option("--rules", type=click.Path(exists=True, dir_okay=False),
              help="pf.conf for the daemons (default: the lab ruleset)")
@click.option("--dialect", type=click.Choice(DIALECTS), default=None, help="daemon --dialect")
@click.option("--syncpeer", is_flag=True, help="unicast to the peer instead of multicast")
@click.option("--keep-logs", is_flag=True, help="keep daemon and iperf3 logs (prints the dir)")
@click.option("--nat", is_flag=True,
              help="the firewalls translate the clients to one address (nat-to, "
              "--nat-slice K/N per firewall); the JSON says what the server saw")
@click.option("--sync-key", "sync_key", type=click.Path(dir_okay=False), default=None,
              help="daemon --sync-key FILE on every firewall (authenticated sync)")
@workers_option
@click.option("--vrrp", is_flag=True,
              help="keepalived on 2 firewalls, hosts routed via virtual gateways; with "
              "--failover (kill the master, rejoin) and/or --rolling (restart each daemon)")
@click.option("--rolling", is_flag=True, help="--vrrp: rolling restart of the daemons")
@click.option("--hold", type=click.FloatRange(0, 30), default=3.0, show_default=True,
              help="--vrrp --failover: the rejoining fw1 runs keepalived this long before "
              "its daemon")
def run_cmd(json_path: str | None, integrity_mb: int, vrrp: bool, rolling: bool, hold: float,
            **opts: Any) -> None:
    """One configuration: build, start firewalls, iperf3, counters, tear down."""
    check_output_file(json_path, make_parents=True)
    if vrrp or rolling:
        _run_vrrp(json_path, opts, rolling, hold)
        return
    if opts.get("rules"):
        load_rules_file(opts["rules"])
    _need_root()
    from pfcluster.lab.experiment import RunConfig, run_one
    from pfcluster.lab.report import run_table

    cfg = RunConfig(integrity_bytes=integrity_mb << 20, **opts)
    try:
        cfg.check()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    doc = _run_single("run", cfg.label(), lambda progress: run_one(cfg, progress), json_path)
    stdout_console().print(run_table(doc))
    for err in doc["errors"]:
        console.print(f"[yellow]{err}[/]")
    failed = not doc["ok"] or (cfg.failover and not doc["failover"]["survived"])
    if cfg.nat and not doc["nat"]["translated"]:
        failed = True
    if cfg.integrity_bytes and not doc["integrity"]["intact"]:
        failed = True
    sys.exit(1 if failed else 0)


def _run_vrrp(json_path: str | None, opts: dict[str, Any], rolling: bool, hold: float) -> None:
    """`lab run --vrrp`: see pfcluster.lab.vrrp."""
    from pfcluster.lab.vrrp import VrrpConfig, run_vrrp, vrrp_lines

    cfg = VrrpConfig(seconds=opts["seconds"], streams=opts["streams"],
                     failover=opts["failover"], rolling=rolling, hold=hold,
                     keep_logs=opts["keep_logs"])
    try:
        cfg.check()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    _need_root()
    doc = _run_single("run", "vrrp", lambda progress: run_vrrp(cfg, progress), json_path)
    for line in vrrp_lines(doc):
        click.echo(line)
    for err in doc["errors"]:
        console.print(f"[yellow]{err}[/]")
    sys.exit(0 if doc["ok"] else 1)


@lab.command("compare")
@seconds_option
@streams_option
@firewall_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="out/compare",
              show_default=True, help="writes compare.json, compare.png, compare.md here")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="also write the JSON here")
@click.option("--rules", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--defer/--no-defer", default=True, show_default=True,
              help="daemon --defer on the synced pairs (split paths race the state insert "
                   "without it)")
@click.option("--only", "only", default=None, metavar="NAME[,NAME...]",
              help="run only these rows (e.g. split-v5,split-v5-thesis-merge)")
@click.option("--anchors", is_flag=True,
              help="also the Linux anchor: kernel conntrack + iptables + conntrackd FTFW "
                   "(symmetric, split, split with window tracking off, failover), and "
                   "pfcluster's own failover row")
@workers_option
def compare_cmd(seconds: int, streams: int, firewall: str, out_dir: str,
                json_path: str | None, rules: str | None, defer: bool,
                only: str | None = None, workers: int = 1, anchors: bool = False) -> None:
    """The main job: single firewall, symmetric pair, split v5 (and with the thesis' TCP
    merge), split v4, ECMP v5, split v5 with NAT; --anchors adds kernel conntrack +
    conntrackd rows."""
    check_output_dir(out_dir)
    check_output_file(json_path, make_parents=True)
    if rules:
        load_rules_file(rules)
    _need_root()
    from pfcluster.lab.experiment import RunConfig, compare_configs, resolve_mode, run_compare
    from pfcluster.lab.report import compare_chart, compare_markdown, print_compare, write_json

    base = RunConfig(seconds=seconds, streams=streams, firewall=firewall, rules=rules,
                     defer=defer, workers=workers)
    kind = resolve_mode(firewall)
    base = replace(base, firewall=kind)
    if kind == "plain":
        console.print("[yellow]firewalls are plain Linux routers (no pf, no pfsync): "
                      "the sync columns mean nothing in this mode[/]")
    if anchors:
        from pfcluster.lab.anchor import missing_tools

        missing = missing_tools()
        if missing:
            raise click.UsageError(f"--anchors needs {', '.join(missing)} "
                                   "(scripts/install installs them)")
    configs = compare_configs(base, anchors=anchors)
    if only:
        wanted = [w.strip() for w in only.split(",") if w.strip()]
        names = [c.name for c in configs]
        unknown = [w for w in wanted if w not in names]
        if unknown or not wanted:
            raise click.BadParameter(f"unknown row {', '.join(unknown) or only!r}; "
                                     f"rows: {', '.join(names)}", param_hint="--only")
        configs = [c for c in configs if c.name in wanted]
    try:
        with progress_display(len(configs)) as update:
            doc = run_compare(base, update, configs)
    except KeyboardInterrupt:
        _interrupted()
    out = Path(out_dir)
    write_json(out / "compare.json", doc)
    if json_path:
        write_json(json_path, doc)
    (out / "compare.md").write_text(compare_markdown(doc))
    compare_chart(doc, out / "compare.png")
    print_compare(doc, stdout_console())
    console.print(f"wrote {out / 'compare.json'}, {out / 'compare.png'}, {out / 'compare.md'}")


def _rates(text: str) -> tuple[int, ...]:
    try:
        rates = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise click.BadParameter("comma-separated packets per second") from exc
    if not rates or any(r <= 0 for r in rates):
        raise click.BadParameter("positive packets per second")
    return rates


@lab.command("sweep")
@click.option("--rates", default="2000,5000,10000,20000,40000,80000", show_default=True,
              help="offered packets per second, comma-separated")
@click.option("--mss", type=click.IntRange(536, 1448), default=1000, show_default=True,
              help="fixed segment size (iperf3 -M)")
@click.option("--sync", type=click.Choice(["v5", "v4"]), default="v5", show_default=True)
@click.option("--defer/--no-defer", default=True, show_default=True, help="daemon --defer")
@seconds_option
@streams_option
@firewall_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="out/sweep",
              show_default=True, help="writes sweep.json and sweep.png here")
@workers_option
def sweep_cmd(rates: str, mss: int, sync: str, defer: bool, seconds: int, streams: int,
              firewall: str, out_dir: str, workers: int = 1) -> None:
    """Split paths at rising packet rates: goodput ratio and state-mismatch vs pps."""
    check_output_dir(out_dir)
    _need_root()
    from pfcluster.lab.experiment import RunConfig, resolve_mode, run_sweep
    from pfcluster.lab.report import sweep_chart, sweep_table, write_json

    kind = resolve_mode(firewall)
    base = RunConfig(seconds=seconds, streams=streams, firewall=kind, mss=mss, sync=sync,
                     defer=defer, workers=workers)
    parsed = _rates(rates)
    try:
        with progress_display(len(parsed)) as update:
            doc = run_sweep(base, parsed, update)
    except KeyboardInterrupt:
        _interrupted()
    out = Path(out_dir)
    write_json(out / "sweep.json", doc)
    sweep_chart(doc, out / "sweep.png")
    stdout_console().print(sweep_table(doc))
    console.print(f"wrote {out / 'sweep.json'}, {out / 'sweep.png'}")


def _paths_list(text: str) -> tuple[str, ...]:
    from pfcluster.lab.connrate import CONN_PATHS

    paths = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in paths if p not in CONN_PATHS]
    if not paths or bad:
        raise click.BadParameter(f"comma-separated, from {', '.join(CONN_PATHS)}")
    return paths


def _port_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise click.BadParameter("LO-HI, e.g. 40000-40999", param_hint="--port-range")
    return int(lo), int(hi)


@lab.command("connrate")
@click.option("--conns", type=click.IntRange(0, 200_000), default=3000, show_default=True,
              help="short connections per path (server closes first)")
@click.option("--parallel", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="connections in flight")
@click.option("--paths", "paths_text", default="kernel,symmetric,split", show_default=True,
              help="kernel (no daemon) is measured first; daemon paths in the order given")
@click.option("--reuse-port", type=click.IntRange(0, 1000), default=0, show_default=True,
              help="also N sequential connections from one fixed source port vs N fresh")
@click.option("--timeout", type=click.FloatRange(0.1, 120), default=15.0, show_default=True,
              help="a connection not done within this many seconds counts as failed")
@click.option("--max-seconds", type=click.FloatRange(1, 3600), default=120.0,
              show_default=True, help="bound on each path's load phase")
@click.option("--merge", type=click.Choice(["edges", "thesis"]), default=None,
              help="daemon --merge (default: the daemon's)")
@click.option("--defer/--no-defer", default=True, show_default=True, help="daemon --defer")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write figures here")
@click.option("--port-range", "port_range", default=None, metavar="LO-HI",
              help="the client's ephemeral port range (fewer ports than --conns forces "
                   "port reuse); default: Linux's")
@click.option("--keep-logs", is_flag=True, help="keep daemon logs (prints the dir)")
@click.option("--nat", is_flag=True, help="the daemons translate the clients (nat-to, "
              "each firewall its --nat-slice): port allocation under load")
@workers_option
def connrate_cmd(conns: int, parallel: int, paths_text: str, reuse_port: int, timeout: float,
                 max_seconds: float, merge: str | None, defer: bool, json_path: str | None,
                 keep_logs: bool, port_range: str | None, workers: int = 1,
                 nat: bool = False) -> None:
    """New connections per second: kernel, symmetric and split paths in one run."""
    check_output_file(json_path, make_parents=True)
    _need_root()
    from rich.table import Table

    from pfcluster.lab.connrate import TABLE_HEAD, ConnRateConfig, run_connrate, table_rows
    from pfcluster.lab.experiment import daemon_available

    cfg = ConnRateConfig(conns=conns, parallel=parallel, paths=_paths_list(paths_text),
                         reuse_port=reuse_port, timeout=timeout, max_seconds=max_seconds,
                         merge=merge, defer=defer, keep_logs=keep_logs, workers=workers,
                         nat=nat, port_range=_port_range(port_range) if port_range else None)
    try:
        cfg.check()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if any(p != "kernel" for p in cfg.paths) and not daemon_available():
        raise click.UsageError("the daemon cannot be imported: only --paths kernel works")
    doc = _run_single("connrate", "connrate", lambda progress: run_connrate(cfg, progress),
                      json_path)
    table = Table(title=f"pfcluster lab connrate — {conns} connections, {parallel} in flight, "
                        f"server closes first, timeout {timeout:g} s")
    for head in TABLE_HEAD:
        table.add_column(head, justify="left" if head == "path" else "right")
    for row in table_rows(doc):
        table.add_row(*row)
    stdout_console().print(table)
    for name, value in doc["ratios"].items():
        console.print(f"  {name}: {value}")
    if doc.get("logs"):
        console.print(f"logs kept in {doc['logs']}")
    for err in doc["errors"]:
        console.print(f"[yellow]{err}[/]")
    sys.exit(1 if doc["errors"] else 0)


@lab.command("bulk")
@click.option("--states", type=click.IntRange(1, 5_000_000), default=100_000,
              show_default=True, help="states fw1 holds before fw2 joins")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=300.0, show_default=True,
              help="bound on the wait for fw2's sync_ok (seconds)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write figures here")
@click.option("--keep-logs", is_flag=True, help="keep daemon logs (prints the dir)")
def bulk_cmd(states: int, timeout: float, json_path: str | None, keep_logs: bool) -> None:
    """Bulk update: fw1 holds N states, a fresh fw2 joins; seconds to its sync_ok."""
    check_output_file(json_path, make_parents=True)
    _need_root()
    import json

    from pfcluster.lab.bulk import BulkConfig, run_bulk
    from pfcluster.lab.experiment import daemon_available

    if not daemon_available():
        raise click.UsageError("the daemon cannot be imported")
    cfg = BulkConfig(states=states, timeout=timeout, keep_logs=keep_logs)
    doc = _run_single("bulk", "bulk", lambda progress: run_bulk(cfg, progress), json_path)
    click.echo(json.dumps({k: v for k, v in doc.items() if k not in ("config", "errors")},
                          indent=1))
    if doc.get("logs"):
        console.print(f"logs kept in {doc['logs']}")
    for err in doc["errors"]:
        console.print(f"[yellow]{err}[/]")
    sys.exit(1 if doc["errors"] else 0)


@lab.command("clean")
@click.option("--dry-run", is_flag=True, help="only list what would be removed")
def clean_cmd(dry_run: bool) -> None:
    """Remove lab namespaces left by runs whose process is gone (e.g. after SIGKILL)."""
    _need_root()
    from pyroute2 import netns

    from pfcluster.lab.netns import kill_ns_processes, list_namespaces

    stale = []
    for name in list_namespaces():
        m = re.fullmatch(r"pfc(\d+)-\w+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            stale.append(name)
    for name in stale:
        click.echo(("would remove " if dry_run else "removing ") + name)
        if not dry_run:
            kill_ns_processes(name)
            netns.remove(name)
    if not stale:
        click.echo("nothing to clean")
