"""One line on stderr for every documented failure of a `pfcluster` command.

A command that meets bad input (a missing, unreadable, empty, cut or foreign capture, an
unsupported link type, a pf.conf mistake, a control socket that is missing or answers
garbage, an output path that cannot be written) prints exactly one line,

    pfcluster <command>: <file or resource>: <problem>

and exits with status 1. A usage error (a bad option value, a missing argument) is one
line too, with click's exit status 2. Only the documented error types below are turned
into a line; any other exception is a bug and keeps its traceback.

- `pfcluster.io.capture.CaptureError` (str: `FILE: problem`)
- `pfcluster.pf.rules.RuleSyntaxError` (str: `file:line:col: message`, as pfctl)
- `pfcluster.io.control.ControlError` (str: `SOCKET: problem`)
- `OSError` that carries a file name (`FILE: strerror`)
- `CommandError`, raised by the commands themselves

The conversion lives in `invoke` of `ReportingCommand` / `ReportingGroup`, so it holds
whether a command runs under the `pfcluster` group or on its own (click's CliRunner).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from pfcluster.pf.ruleset import Ruleset


class CommandError(click.ClickException):
    """A runtime failure reported as `<command path>: <message>`, exit status 1."""

    exit_code = 1

    def __init__(self, message: str, command_path: str | None = None) -> None:
        super().__init__(message)
        if command_path is None:
            ctx = click.get_current_context(silent=True)
            command_path = ctx.command_path if ctx is not None else "pfcluster"
        self.command_path = command_path

    def show(self, file: IO[Any] | None = None) -> None:
        message = " ".join(self.format_message().splitlines())  # one line, always
        click.echo(f"{self.command_path}: {message}", file=file or sys.stderr)


class OneLineUsageError(click.UsageError):
    """click's usage error on one line: `<command path>: <message> (try '... --help')`."""

    def show(self, file: IO[Any] | None = None) -> None:
        path = self.ctx.command_path if self.ctx is not None else "pfcluster"
        hint = f" (try '{path} --help')" if self.ctx is not None else ""
        click.echo(f"{path}: {self.format_message()}{hint}", file=file or sys.stderr)


def describe(exc: BaseException) -> str | None:
    """The one-line message for a documented error type, None for anything else (a bug).

    The error classes are looked up in modules already imported: an exception cannot be
    an instance of a class whose module was never loaded, and `--help` stays cheap."""
    for modname, clsname in (
        ("pfcluster.io.capture", "CaptureError"),
        ("pfcluster.pf.rules", "RuleSyntaxError"),
        ("pfcluster.io.control", "ControlError"),
    ):
        mod = sys.modules.get(modname)
        cls = getattr(mod, clsname, None) if mod is not None else None
        if cls is not None and isinstance(exc, cls):
            return str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        where = os.fsdecode(exc.filename)
        if exc.filename2 is not None:
            where += f" -> {os.fsdecode(exc.filename2)}"
        return f"{where}: {exc.strerror or exc}"
    return None


def _one_line_usage(exc: click.UsageError) -> click.UsageError:
    if isinstance(exc, OneLineUsageError):
        return exc
    # "no arguments: show the help" is a usage error whose show() prints the help page
    no_args = getattr(click.exceptions, "NoArgsIsHelpError", None)
    if no_args is not None and isinstance(exc, no_args):
        return exc
    return OneLineUsageError(exc.format_message(), exc.ctx)


class _Reporting:
    """Mixin for click commands: documented errors and usage errors become one line."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)  # type: ignore[misc]
        except click.UsageError as exc:
            raise _one_line_usage(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except click.ClickException as exc:
            if isinstance(exc, click.UsageError):
                raise _one_line_usage(exc) from None
            raise
        except Exception as exc:
            message = describe(exc)
            if message is None:
                raise  # not a documented error: a bug, keep the traceback
            raise CommandError(message, _failing_command(ctx)) from None


def _failing_command(ctx: click.Context) -> str:
    """`pfcluster dump` also when the error passed through the group from a plain
    click.Command (one that is not a ReportingCommand and so did not name itself)."""
    sub = ctx.invoked_subcommand if isinstance(ctx.command, click.Group) else None
    return f"{ctx.command_path} {sub}" if sub else ctx.command_path


class ReportingCommand(_Reporting, click.Command):
    """A click command whose documented failures print one line."""


class ReportingGroup(_Reporting, click.Group):
    """A click group whose subcommands (and itself) print one line per failure."""

    command_class = ReportingCommand


ReportingGroup.group_class = ReportingGroup


def check_output_file(path: str | None, make_parents: bool = False) -> None:
    """Refuse, before any work is done, an output file that cannot be written: a
    directory, a missing parent (unless the command creates parents), a parent that is a
    file, no write permission."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise CommandError(f"{path}: is a directory")
    if p.exists() and not os.access(p, os.W_OK):
        raise CommandError(f"{path}: permission denied")
    _check_parent(path, p.parent, make_parents)


def check_output_dir(path: str | None) -> None:
    """Refuse an output directory (created with its parents) that cannot be made."""
    if not path:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CommandError(f"{path}: not a directory")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise CommandError(f"{path}: permission denied")
        return
    _check_parent(path, p.parent, True)


def _check_parent(path: str, parent: Path, make_parents: bool) -> None:
    parent = parent if str(parent) else Path(".")
    if not make_parents and not parent.exists():
        raise CommandError(f"{path}: directory {parent} does not exist")
    while not parent.exists():  # the nearest ancestor that exists must be a writable dir
        parent = parent.parent
    if not parent.is_dir():
        raise CommandError(f"{path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CommandError(f"{path}: cannot write in {parent}: permission denied")


def load_rules_file(path: str, ifaddrs: Any = None) -> Ruleset:
    """load_rules, with a binary file reported as one line instead of UnicodeDecodeError
    (RuleSyntaxError and OSError are documented errors and pass through). `ifaddrs`: the
    interfaces `em0`, `self` and `(em0)` name (pfcluster.pf.ifaddrs.IfAddrs)."""
    from pfcluster.pf.rules import load_rules

    try:
        return load_rules(path, ifaddrs)
    except UnicodeDecodeError as exc:
        raise CommandError(f"{path}: not a text file (byte 0x{exc.object[exc.start]:02x} "
                           f"at offset {exc.start} is not UTF-8)") from None
