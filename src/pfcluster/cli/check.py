"""`pfcluster check`: parse a pf.conf as the daemon would, load nothing (pfctl -nf).

For CI pipelines and as the step before `systemctl reload`: the same parser as the
daemon (`pfcluster.pf.rules.load_rules`), exit 0 when the daemon would accept the file,
1 with `file:line:col: message` when it would refuse it (a reload keeps the old rules
then). `-v` prints the rules as loaded (pfctl -nvf), `--config` also checks the daemon's
TOML file and takes the rules path from it.
"""

from __future__ import annotations

from typing import Any

import click

from pfcluster.cli.errors import CommandError, ReportingCommand, load_rules_file
from pfcluster.pf import pfctl


def _options(ruleset: object) -> list[str]:
    """The `set` options that change what the daemon does beyond the rules."""
    lines = []
    skip = sorted(getattr(ruleset, "skip_ifaces", ()))
    if skip:
        lines.append("set skip on { " + " ".join(skip) + " }")
    for name, value in sorted(getattr(ruleset, "limits", {}).items()):
        lines.append(f"set limit {name} {value}")
    policy = getattr(ruleset, "block_policy", "drop")
    if policy != "drop":
        lines.append(f"set block-policy {policy}")
    return lines


def _nested(ruleset: Any, rules: list[Any], indent: str) -> list[str]:
    """pfctl -nvf: an anchor the file gives rules (inline, `load anchor`) follows its
    anchor rule in braces, indented."""
    out = []
    for line, r in zip(pfctl.format_rules(rules), rules, strict=True):
        a = getattr(r, "anchor", None)
        if a is not None and a.path in getattr(ruleset, "defined_anchors", ()) \
                and not r.anchor_wildcard:
            out.append(f"{indent}{line} {{")
            out.extend(_nested(ruleset, a.rules, indent + "  "))
            out.append(f"{indent}}}")
        else:
            out.append(indent + line)
    return out


@click.command("check", cls=ReportingCommand)
@click.option("--rules", "rules_path", type=click.Path(dir_okay=True),
              help="pf.conf to check (default: the `rules` key of --config)")
@click.option("--config", "config_path", type=click.Path(),
              help="the daemon's TOML file: its keys are checked too")
@click.option("-v", "--verbose", is_flag=True, help="print the loaded rules (pfctl -nvf)")
def check(rules_path: str | None, config_path: str | None, verbose: bool) -> None:
    """Check a pf.conf (and a daemon config) without loading it; exit 0 if valid.

    \b
    pfcluster check --rules /etc/pfcluster/pf.conf && systemctl reload pfcluster
    """
    if config_path:
        from pfcluster.io.config import ConfigError, load_config

        try:
            cfg = load_config(config_path, {"rules": rules_path} if rules_path else {})
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
        rules_path = cfg.rules
    if not rules_path:
        raise click.UsageError("give --rules FILE or --config FILE")
    from pfcluster.io.loop import host_addresses

    # as the daemon reads them: `em0` and `self` stand for this host's addresses now
    ruleset = load_rules_file(rules_path, host_addresses())  # bad: one line, exit 1
    if verbose:
        for line in _options(ruleset):
            click.echo(line)
        for line in _nested(ruleset, ruleset.rules, ""):
            click.echo(line)
