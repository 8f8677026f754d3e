"""`pfcluster ctl`: talk to a running daemon over its control socket (pfctl-like text,
or the daemon's JSON answer with --json).

Failures are one line on stderr, exit status 1: a socket that is missing, not a socket,
not listened on, or that answers garbage, closes early or does not answer in time
(`pfcluster ctl CMD: SOCKET: problem`), and a request the daemon refuses (its error,
e.g. `pf.conf:6:3: message` for a broken reload; with --json the answer is printed
instead)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

import click

from pfcluster.cli.errors import CommandError, ReportingGroup
from pfcluster.io.control import DEFAULT_CONTROL, ControlError, request
from pfcluster.io.tablectl import MAX_INLINE
from pfcluster.pf import tables as pft

json_option = click.option("--json", "as_json", is_flag=True, help="print the JSON answer")


def _call(ctx: click.Context, cmd: str, as_json: bool, **args: Any) -> None:
    path = ctx.obj["control"]
    resp = request(path, cmd, **args)  # ControlError: one line, exit 1 (cli.errors)
    text = resp.get("text", [])
    if resp["ok"] and not (isinstance(text, list) and all(isinstance(t, str) for t in text)):
        raise ControlError(f"{path}: bad answer ('text' is not a list of strings)")
    if as_json or ctx.obj.get("json"):
        click.echo(json.dumps(resp.get("data") if resp.get("ok") else resp, indent=None))
    elif resp["ok"]:
        for line in text:
            click.echo(line)
        for line in resp.get("messages", []):  # pfctl's xprintf lines go to stderr
            click.echo(str(line), err=True)
    if not resp["ok"]:
        if not (as_json or ctx.obj.get("json")):
            raise CommandError(str(resp.get("error", "failed")))
        sys.exit(1)
    code = resp.get("exit", 0)
    if isinstance(code, int) and code:
        sys.exit(code)


@click.group("ctl", cls=ReportingGroup)
@click.option("--control", default=DEFAULT_CONTROL, show_default=True,
              help="the daemon's control socket")
@json_option
@click.pass_context
def ctl(ctx: click.Context, control: str, as_json: bool) -> None:
    """Query and steer a running `pfcluster daemon`."""
    ctx.obj = {"control": control, "json": as_json}


@ctl.command()
@click.option("-v", "--verbose", is_flag=True, help="pfctl -ss -v: windows, age, ids")
@json_option
@click.pass_context
def states(ctx: click.Context, verbose: bool, as_json: bool) -> None:
    """State table (pfctl -ss)."""
    _call(ctx, "states", as_json, verbose=verbose)


@ctl.command()
@click.option("-v", "--verbose", is_flag=True, help="pfctl -sS -v: age, expiry, packets, rule")
@json_option
@click.pass_context
def sources(ctx: click.Context, verbose: bool, as_json: bool) -> None:
    """Source-tracking nodes (pfctl -sS)."""
    _call(ctx, "sources", as_json, verbose=verbose)


def _plain(name: str, summary: str) -> None:
    """`ctl NAME [--json]`: a request with no arguments."""

    @ctl.command(name, help=summary)
    @json_option
    @click.pass_context
    def command(ctx: click.Context, as_json: bool) -> None:
        _call(ctx, name, as_json)


_plain("info", "pf and pfsync counters, sync_ok (pfctl -si).")
_plain("rules", "Loaded rules (pfctl -sr).")
_plain("reload", "Reload the rules file atomically (a broken file is refused, old rules stay).")


@ctl.command()
@click.option("--host", multiple=True,
              help="kill states from this address (pfctl -k host); twice: from A to B")
@click.option("--id", "state_id", help="kill the state with this id (hex, or id/creatorid)")
@json_option
@click.pass_context
def kill(ctx: click.Context, host: tuple[str, ...], state_id: str | None,
         as_json: bool) -> None:
    """Kill states by host or by id (pfctl -k)."""
    if not host and not state_id:
        raise click.UsageError("give --host ADDR or --id ID")
    args: dict[str, Any] = {}
    if len(host) > 2:
        raise click.UsageError("--host at most twice (source, destination)")
    if host:
        args["host"] = host[0]
    if len(host) == 2:
        args["host2"] = host[1]
    if state_id:
        args["id"] = state_id
    _call(ctx, "kill", as_json, **args)


@ctl.command()
@click.argument("name")
@click.argument("op", type=click.Choice(["load", "show", "flush"]))
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@json_option
@click.pass_context
def anchor(ctx: click.Context, name: str, op: str, file: str | None, as_json: bool) -> None:
    """Rules of anchor NAME: load FILE (pfctl -a NAME -f FILE), show (-sr), flush (-F rules).

    The daemon reads FILE; a broken file changes nothing. The main ruleset evaluates
    the anchor where it has an `anchor "NAME"` rule; a reload keeps the loaded rules.
    """
    if op == "load":
        if not file:
            raise click.UsageError("anchor NAME load needs a FILE")
        _call(ctx, "anchor", as_json, op=op, name=name, file=os.path.abspath(file))
    else:
        if file:
            raise click.UsageError(f"anchor NAME {op} takes no FILE")
        _call(ctx, "anchor", as_json, op=op, name=name)


@ctl.command()
@json_option
@click.pass_context
def anchors(ctx: click.Context, as_json: bool) -> None:
    """Every anchor by path (pfctl -sA)."""
    _call(ctx, "anchor", as_json, op="list")


@ctl.command()
@click.argument("what", type=click.Choice(["states"]))
@json_option
@click.pass_context
def flush(ctx: click.Context, what: str, as_json: bool) -> None:
    """Flush the state table (pfctl -F states); peers get a CLR."""
    _call(ctx, "flush", as_json, what=what)


@ctl.command()
@json_option
@click.pass_context
def syncok(ctx: click.Context, as_json: bool) -> None:
    """Exit 0 if the bulk update is done (sync_ok), 1 if not or no daemon answers: a
    keepalived track_script (see docs/keepalived.conf)."""
    path = ctx.obj["control"]
    resp = request(path, "syncok", timeout=2.0)
    if not resp.get("ok"):
        raise CommandError(str(resp.get("error", "failed")))
    data = resp.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("sync_ok"), bool):
        raise ControlError(f"{path}: bad answer (no boolean sync_ok)")
    if as_json or ctx.obj.get("json"):
        click.echo(json.dumps(data))
    else:
        click.echo(f"sync_ok {str(data['sync_ok']).lower()}")
    sys.exit(0 if data["sync_ok"] else 1)


@ctl.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, required=True)
@json_option
@click.pass_context
def notify(ctx: click.Context, args: tuple[str, ...], as_json: bool) -> None:
    """Record a VRRP transition: `notify STATE`, or keepalived's notify arguments
    `TYPE NAME STATE [PRIORITY]` (keepalived.conf: notify "/usr/bin/pfcluster ctl notify").

    \b
    STATE is MASTER, BACKUP, FAULT, STOP or DELETED; the daemon logs it with its sync_ok
    and shows the last state per instance in `ctl info`."""
    req: dict[str, Any] = {}
    if len(args) == 1:
        req["state"] = args[0]
    elif 3 <= len(args) <= 4:
        req["kind"], req["name"], req["state"] = args[:3]
        if len(args) == 4:
            try:
                req["priority"] = int(args[3])
            except ValueError:
                raise click.BadParameter(f"{args[3]!r} is not a number",
                                         param_hint="PRIORITY") from None
    else:
        raise click.UsageError("give STATE, or TYPE NAME STATE [PRIORITY]")
    _call(ctx, "notify", as_json, **req)


@ctl.command()
@click.option("-v", "--verbose", count=True, help="flags (pfctl -vsTables); twice: counts")
@json_option
@click.pass_context
def tables(ctx: click.Context, verbose: int, as_json: bool) -> None:
    """Tables (pfctl -s Tables): names; -v flags c p a i r h C; -vv entry counts."""
    _call(ctx, "tables", as_json, verbose=verbose)


@ctl.command("table")
@click.argument("name")
@click.argument("op", type=click.Choice(pft.OPS))
@click.argument("addrs", nargs=-1)
@click.option("-f", "--file", "path", type=click.Path(dir_okay=False, allow_dash=True),
              help="also the entries in FILE (pfctl -T ... -f; '-' reads stdin)")
@click.option("-k", "--kill", is_flag=True,
              help="then kill the states from addresses the table matches (pfctl -k)")
@json_option
@click.pass_context
def table(ctx: click.Context, name: str, op: str, addrs: tuple[str, ...], path: str | None,
          kill: bool, as_json: bool) -> None:
    """pfctl -t NAME -T OP: show, add, delete, replace, flush or test ADDR... (host, CIDR,
    !negated). `add`/`replace` create an unknown table (persist); a const table refuses
    changes; `test` exits 2 unless every address matches. Messages go to stderr, as
    pfctl's."""
    try:
        pft.check_name(name)
        pft.parse_words(addrs)  # the daemon checks again; this gives the error here
    except pft.TableError as exc:
        raise click.BadParameter(str(exc), param_hint="ADDR") from None
    if op in ("show", "flush") and (addrs or path):
        raise click.UsageError(f"{op} takes no addresses")
    if op in ("add", "delete", "test") and not addrs and path is None:
        raise click.UsageError(f"{op} needs ADDR... or -f FILE")
    if kill and op not in ("add", "replace"):
        raise click.UsageError("--kill goes with add or replace")
    args: dict[str, Any] = {"name": name, "op": op, "addrs": list(addrs)}
    if kill:
        args["kill"] = True
    if len(addrs) > MAX_INLINE:  # a long argument list: hand it over as a file
        path, args["addrs"] = "-", []
        stdin_text = "\n".join(addrs)
    else:
        stdin_text = None
    tmp = None
    try:
        if path == "-":
            text = stdin_text if stdin_text is not None else sys.stdin.read()
            try:
                pft.parse_text(text, "stdin")
            except pft.TableError as exc:
                raise CommandError(str(exc)) from None
            fd, tmp = tempfile.mkstemp(prefix="pfcluster-table-", suffix=".txt")
            with os.fdopen(fd, "w") as f:  # mkstemp: mode 0600, ours alone
                f.write(text)
            args["file"] = tmp
        elif path is not None:
            args["file"] = os.path.abspath(path)
            try:
                pft.read_file(args["file"])
            except pft.TableError as exc:
                raise CommandError(str(exc)) from None
        _call(ctx, "table", as_json, **args)
    finally:
        if tmp is not None:
            os.unlink(tmp)
