"""`pfcluster wireshark`: where the shipped pfsync dissector is, and installing it.

Wireshark loads every ``*.lua`` in the personal plugin directory at start-up
(``~/.local/lib/wireshark/plugins``, Help > About > Folders); ``--install`` copies
``pfsync.lua`` there (or to ``--dir``), ``--path`` prints the shipped file, for
``tshark -X lua_script:$(pfcluster wireshark --path)``.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import click

from pfcluster.cli.errors import ReportingCommand

PLUGIN_DIR = Path("~/.local/lib/wireshark/plugins")
"""Wireshark's personal Lua plugin directory on Unix (XDG layout, Wireshark >= 2.5)."""


def shipped_path() -> Path:
    """The ``pfsync.lua`` installed with the package."""
    return Path(str(resources.files("pfcluster") / "data" / "pfsync.lua"))


@click.command("wireshark", cls=ReportingCommand)
@click.option("--install", "do_install", is_flag=True,
              help=f"copy pfsync.lua into Wireshark's plugin directory ({PLUGIN_DIR})")
@click.option("--dir", "target_dir", type=click.Path(file_okay=False),
              help="install into this directory instead")
@click.option("--path", "show_path", is_flag=True, help="print the path of the shipped pfsync.lua")
def wireshark(do_install: bool, target_dir: str | None, show_path: bool) -> None:
    """The pfsync Wireshark dissector: print its path or install it."""
    if do_install == show_path:
        raise click.UsageError("give exactly one of --install or --path")
    src = shipped_path()
    if show_path:
        if target_dir is not None:
            raise click.UsageError("--dir goes with --install")
        click.echo(str(src))
        return
    dest_dir = Path(target_dir) if target_dir is not None else PLUGIN_DIR.expanduser()
    dest_dir.mkdir(parents=True, exist_ok=True)  # OSError with a file name -> one line
    dest = dest_dir / src.name
    shutil.copyfile(src, dest)
    click.echo(f"installed {dest} (restart Wireshark, or reload Lua plugins with Ctrl+Shift+L)")
