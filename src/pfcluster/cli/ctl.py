"""`pfcluster ctl`: talk to a running daemon over its control socket (pfctl-like text,
or the daemon's JSON answer with --json)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from pfcluster.io.control import DEFAULT_CONTROL, ControlError, request

json_option = click.option("--json", "as_json", is_flag=True, help="print the JSON answer")


def _call(ctx: click.Context, cmd: str, as_json: bool, **args: Any) -> None:
    path = ctx.obj["control"]
    try:
        resp = request(path, cmd, **args)
    except (ControlError, OSError) as exc:
        click.echo(f"pfcluster ctl: {exc}", err=True)
        sys.exit(2)
    if as_json or ctx.obj.get("json"):
        click.echo(json.dumps(resp.get("data") if resp.get("ok") else resp, indent=None))
    elif resp.get("ok"):
        for line in resp.get("text", []):
            click.echo(line)
    if not resp.get("ok"):
        if not (as_json or ctx.obj.get("json")):
            click.echo(f"pfcluster ctl: {resp.get('error', 'failed')}", err=True)
        sys.exit(1)


@click.group("ctl")
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
@json_option
@click.pass_context
def info(ctx: click.Context, as_json: bool) -> None:
    """pf and pfsync counters, sync_ok (pfctl -si)."""
    _call(ctx, "info", as_json)


@ctl.command()
@json_option
@click.pass_context
def rules(ctx: click.Context, as_json: bool) -> None:
    """Loaded rules (pfctl -sr)."""
    _call(ctx, "rules", as_json)


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
@click.argument("what", type=click.Choice(["states"]))
@json_option
@click.pass_context
def flush(ctx: click.Context, what: str, as_json: bool) -> None:
    """Flush the state table (pfctl -F states); peers get a CLR."""
    _call(ctx, "flush", as_json, what=what)


@ctl.command()
@json_option
@click.pass_context
def reload(ctx: click.Context, as_json: bool) -> None:
    """Reload the rules file atomically (a broken file is refused, old rules stay)."""
    _call(ctx, "reload", as_json)
