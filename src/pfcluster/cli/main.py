"""The `pfcluster` command: one click group whose subcommands load on first use.

Failures are one line on stderr (see `pfcluster.cli.errors`): `pfcluster CMD: FILE:
problem` with exit status 1 for bad input met at run time (missing, unreadable, empty,
cut or foreign files, pf.conf mistakes, a control socket that is missing or answers
garbage), and `pfcluster CMD: message (try 'pfcluster CMD --help')` with status 2 for
usage errors. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from pfcluster.cli.errors import ReportingGroup

# subcommand name -> (module, attribute); imported only when that subcommand runs, so
# `pfcluster dump` does not pay for matplotlib or pyroute2.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "replay": ("pfcluster.cli.replay", "replay"),
    "dump": ("pfcluster.cli.dump", "dump"),
    "bench": ("pfcluster.cli.bench", "bench"),
    "daemon": ("pfcluster.cli.daemon", "daemon"),
    "ctl": ("pfcluster.cli.ctl", "ctl"),
    "check": ("pfcluster.cli.check", "check"),
    "lab": ("pfcluster.cli.lab", "lab"),
    "wireshark": ("pfcluster.cli.wireshark", "wireshark"),
}


class LazyGroup(ReportingGroup):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n, (mod, _) in SUBCOMMANDS.items() if importlib.util.find_spec(mod))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module = importlib.import_module(target[0])
        command: click.Command = getattr(module, target[1])
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pfcluster")
def main() -> None:
    """pf stateful filtering and pfsync v5 for active-active Linux firewalls."""


if __name__ == "__main__":
    main(prog_name="pfcluster")
