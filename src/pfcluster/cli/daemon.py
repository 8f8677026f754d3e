"""`pfcluster daemon`: run one firewall node (NFQUEUE data plane + pfsync)."""

from __future__ import annotations

import logging
import logging.handlers
import sys

import click

from pfcluster.io.config import DIALECTS, MERGES, PROTOCOLS, ConfigError, load_config


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
@click.option("--queue", type=click.IntRange(0, 65535), default=None, help="NFQUEUE number")
@click.option("--control", help="control socket path (default /run/pfcluster.sock)")
@click.option("--fail-open/--fail-closed", "fail_open", default=None,
              help="--queue-bypass: let packets through when the daemon is gone")
@click.option("--hostid", type=str, default=None, help="pfsync creatorid (hex or decimal)")
@click.option("--syslog/--stderr", "syslog", default=None, help="where log lines go")
@click.option("-v", "--verbose", is_flag=True, default=None)
def daemon(config_path: str | None, hostid: str | None, **flags: object) -> None:
    """Run a pf firewall node: iptables -> NFQUEUE -> pf, states shared by pfsync."""
    overrides = dict(flags)
    if hostid is not None:
        try:
            overrides["hostid"] = int(hostid, 0)
        except ValueError as exc:
            raise click.BadParameter(f"{hostid!r} is not a number", param_hint="--hostid") \
                from exc
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    setup_logging(cfg.syslog, cfg.verbose)
    from pfcluster.io.loop import Daemon

    try:
        d = Daemon(cfg)
    except Exception as exc:  # RuleSyntaxError (file:line:col: message), OSError
        click.echo(f"pfcluster daemon: {exc}", err=True)
        sys.exit(1)
    try:
        sys.exit(d.run())
    except Exception as exc:
        logging.getLogger("pfcluster.daemon").exception("daemon failed: %s", exc)
        sys.exit(1)
