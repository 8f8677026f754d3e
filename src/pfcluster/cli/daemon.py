"""`pfcluster daemon`: run one firewall node (NFQUEUE data plane + pfsync)."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import sys
from typing import NoReturn

import click

from pfcluster.io.config import (
    DIALECTS,
    MAX_WORKERS,
    MERGES,
    PROTOCOLS,
    ConfigError,
    load_config,
    worker_config,
)
from pfcluster.io.nfq import DEFAULT_COPY_RANGE, MAX_COPY_RANGE


def setup_logging(use_syslog: bool, verbose: bool) -> None:
    """pf's log lines, bulk and sync events: stderr by default, syslog on request."""
    handler: logging.Handler
    if use_syslog:
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("pfcluster[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def fail(message: str) -> NoReturn:
    """One line on stderr, exit status 1: the user can fix this, no traceback."""
    click.echo(f"pfcluster daemon: {message}", err=True)
    sys.exit(1)


def describe(exc: BaseException) -> str:
    """An OSError as `file: reason` rather than `[Errno 2] ...: 'file'`."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


def die_with_parent() -> None:
    """A worker stops (closed: its queue drops) when its supervisor dies, so a restarted
    supervisor can bind the queues again instead of meeting orphans holding them."""
    import ctypes
    import os
    import signal

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() == 1:  # the supervisor was already gone before prctl took effect
        fail("worker: the supervisor is gone")


def uninstall_rules(queue: int, workers: int = 1) -> None:
    """`--uninstall`: remove chain PFCLUSTER-<queue> and its jumps (both families) for
    good, print what was removed. Refused while a process has the queue bound: removing
    a running daemon's rules would open the host under it."""
    from pfcluster.io.iptables import IptablesError, IptablesRules, queue_owner

    for q in range(queue, queue + max(1, workers)):  # --workers: every balanced queue
        owner = queue_owner(q)
        if owner is not None:
            fail(f"NFQUEUE {q} is bound by a running process (netlink port {owner}); "
                 "stop that daemon first")
    rules = IptablesRules(queue)
    try:
        removed = rules.remove()
        left = rules.present()
    except IptablesError as exc:
        fail(f"iptables: {exc}")
    if left:
        fail(f"could not remove {len(left)} rules of {rules.chain}: " + "; ".join(left))
    if not removed:
        click.echo(f"no iptables rules for queue {queue} (chain {rules.chain}): "
                   "nothing to remove")
        return
    click.echo(f"removed chain {rules.chain} and its jumps ({len(removed)} lines):")
    for line in removed:
        click.echo(f"  {line}")


def preload(d: object, n: int) -> None:
    """--bench-preload N: the synthetic states go in before the loop starts."""
    from pfcluster.bench.preload import PreloadError, preload_states
    from pfcluster.io.loop import Daemon

    if not isinstance(d, Daemon):
        fail("--bench-preload needs a single process (no --workers)")
    try:
        preload_states(d.filter, n, d.started)
    except PreloadError as exc:
        fail(f"--bench-preload: {exc}")
    logging.getLogger("pfcluster.daemon").info("bench preload: %d synthetic states", n)


@click.command("daemon")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="TOML file with the same keys (flags override it)")
@click.option("--rules", type=click.Path(dir_okay=False), help="pf.conf to load")
@click.option("--syncdev", help="sync interface (pfsync runs here; `set skip` implied); "
              "'none' filters without pfsync")
@click.option("--syncpeer", help="unicast peer address instead of multicast 224.0.0.240")
@click.option("--syncgroup6", help="also sync over IPv6 to this group or peer")
@click.option("--maxupd", type=click.IntRange(1, 255), default=None,
              help="updates per state before a frame is sent (default 128)")
@click.option("--defer/--no-defer", default=None, help="hold first packets until a peer acks")
@click.option("--dialect", type=click.Choice(DIALECTS), default=None)
@click.option("--protocol", type=click.Choice(PROTOCOLS), default=None,
              help="v5 (default) or v4: pre-2009 pfsync behaviour, the thesis baseline")
@click.option("--merge", type=click.Choice(MERGES), default=None,
              help="TCP merge of peer updates: edges (default, per sequence edge) or thesis "
              "(OpenBSD 4.5: whole update or none)")
@click.option("--queue", type=click.IntRange(0, 65535), default=None,
              help="NFQUEUE number (default 0); the iptables chain is PFCLUSTER-<queue>")
@click.option("--workers", type=click.IntRange(1, MAX_WORKERS), default=None,
              help="processes (default 1): N workers on queues QUEUE..QUEUE+N-1, flows "
              "spread by the kernel's --queue-balance; one firewall to ctl and to peers")
@click.option("--worker-index", type=int, default=None, hidden=True)
# A benchmark aid (`pfcluster lab bulk`), hidden: start with N synthetic established TCP
# states in the table (pfcluster/bench/preload.py), so a joining peer has a large table
# to bulk-update from. Needs `set limit states` >= N in the rules; single process only.
@click.option("--bench-preload", "bench_preload", type=click.IntRange(0, None), default=0,
              hidden=True)
@click.option("--control", help="control socket path (default /run/pfcluster.sock)")
@click.option("--fail-open/--fail-closed", "fail_open", default=None,
              help="fail-closed (default): the rules stay when the daemon stops, so the "
              "host drops everything it would have queued, and a full queue drops; fail-open: "
              "--queue-bypass, the queue's fail-open flag (a full queue accepts) and the rules "
              "removed on exit, so the host forwards everything while no daemon keeps up")
@click.option("--copy-range", "copy_range", type=click.IntRange(DEFAULT_COPY_RANGE, MAX_COPY_RANGE),
              default=None, help="bytes of each packet the kernel copies to the daemon "
              f"(default {DEFAULT_COPY_RANGE}: the headers pf reads; a packet whose headers "
              "end past it is dropped as malformed)")
@click.option("--nat-slice", "nat_slice", default=None, metavar="K/N",
              help="active-active NAT: this firewall hands out only slice K of N of every "
              "nat-to port range (e.g. 1/2 and 2/2 on a pair), so two firewalls never give "
              "the same port to two flows (default 1/1: the whole range)")
@click.option("--uninstall", is_flag=True, default=False,
              help="remove the rules of --queue for good (chain PFCLUSTER-<queue> and its "
              "jumps, IPv4 and IPv6), print what was removed and exit; refused while a "
              "process has the queue bound")
@click.option("--metrics", metavar="ADDR:PORT", default=None,
              help="serve Prometheus metrics at http://ADDR:PORT/metrics (e.g. "
              "127.0.0.1:9107; default off); with --workers the supervisor serves the sum")
@click.option("--pflog", metavar="FILE", default=None,
              help="write the packets of `log` rules to FILE as a pflog pcap (tcpdump -n -e "
              "-r FILE); SIGHUP reopens it; with --workers each worker writes FILE.wN")
@click.option("--pflog-size", "pflog_size", type=click.IntRange(1, 1 << 20), default=None,
              help="MiB before FILE is renamed FILE.1 and a new one begun (default 100)")
@click.option("--pflog-rate", "pflog_rate", type=click.IntRange(1, 1_000_000), default=None,
              help="pflog packets per second at most, the rest counted as dropped "
              "(default 1000)")
@click.option("--track-file", "track_file", default=None,
              help="keepalived track_file this daemon writes: 0 while sync_ok, "
              "-TRACK_DEMOTE until its bulk update is done and after it stops")
@click.option("--track-demote", "track_demote", type=click.IntRange(1, 254), default=None,
              help="demotion written to --track-file (default 253: priority 1 with weight "
              "1; 254: FAULT)")
@click.option("--hostid", type=str, default=None, help="pfsync creatorid (hex or decimal)")
@click.option("--sync-key", "sync_key", type=click.Path(dir_okay=False), default=None,
              help="authenticate pfsync: seal every frame sent, drop every frame received "
              "without a valid HMAC (counted badauth) or replayed; the file (mode 0600) holds "
              "`ID HEX` lines, the first sends, all are accepted (README: Securing the sync "
              "link)")
@click.option("--syslog/--stderr", "syslog", default=None, help="where log lines go")
@click.option("-v", "--verbose", is_flag=True, default=None)
def daemon(config_path: str | None, hostid: str | None, uninstall: bool,
           worker_index: int | None, bench_preload: int = 0, **flags: object) -> None:
    """Run a pf firewall node: iptables -> NFQUEUE -> pf, states shared by pfsync.

    \b
    Fail closed: the daemon's iptables rules (chain PFCLUSTER-<queue>, jumped to from
    INPUT, FORWARD and OUTPUT, IPv4 and IPv6) stay when it stops or crashes, without
    --queue-bypass, so the kernel drops what nobody reads. A restarted daemon rewrites
    them in one atomic commit and takes the queue over with no unfiltered instant (its
    states come back from its peers by bulk update). --fail-open restores the old
    behaviour. Remove the rules for good with:
        pfcluster daemon --uninstall --queue N
    """
    overrides = dict(flags)
    if hostid is not None:
        try:
            overrides["hostid"] = int(hostid, 0)
        except ValueError as exc:
            raise click.BadParameter(f"{hostid!r} is not a number", param_hint="--hostid") \
                from exc
    try:
        cfg = load_config(config_path, overrides, validate=not uninstall)
        if worker_index is not None and not uninstall:  # started by a --workers supervisor
            if cfg.hostid is None:
                raise ConfigError("worker: --hostid is required")
            cfg = worker_config(cfg, worker_index, cfg.hostid)
            die_with_parent()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if uninstall:
        if not 0 <= cfg.queue <= 65535:
            raise click.UsageError(f"queue: {cfg.queue} is not 0..65535")
        uninstall_rules(cfg.queue, cfg.workers)
        return
    setup_logging(cfg.syslog, cfg.verbose)
    from pfcluster.io.loop import Daemon, SetupError
    from pfcluster.io.workers import Supervisor

    try:
        d: Daemon | Supervisor = Supervisor(cfg) if cfg.workers > 1 and cfg.worker is None \
            else Daemon(cfg)
    except Exception as exc:  # RuleSyntaxError (file:line:col: message), OSError
        fail(describe(exc))
    if bench_preload:
        preload(d, bench_preload)
    try:
        status = d.run()
    except SetupError as exc:  # queue busy, no such syncdev, control socket, iptables
        fail(str(exc))
    except Exception as exc:  # a bug: keep the traceback
        logging.getLogger("pfcluster.daemon").exception("daemon failed: %s", exc)
        sys.exit(1)
    sys.exit(status)

