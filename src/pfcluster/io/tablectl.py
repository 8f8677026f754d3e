"""The daemon's side of `ctl tables` and `ctl table NAME OP`: validate the request, read
the entries (inline `addrs`, or a `file` the daemon reads itself), run the pf/tables
operation.

Why the daemon reads `-f FILE` itself: a control request is at most MAX_REQUEST (64 KiB)
so that 32 clients cannot make the daemon hold much; a 100k-entry list is ~1.5 MB. The
socket is root's (0600), so reading a path the client names gives the client nothing it
did not have; the client sends an absolute path (stdin becomes a private temporary file).
Each worker of `--workers N` reads the file for itself. A replace from a file is then one
atomic step, as pfctl's.
"""

from __future__ import annotations

from typing import Any

from pfcluster.pf import tables as pft
from pfcluster.pf.ruleset import Table

MAX_INLINE = 4096  # addresses in one request (the request size bounds it anyway)


def entries_of(req: dict[str, Any]) -> list[pft.Entry]:
    addrs = req.get("addrs", [])
    if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
        raise pft.TableError("'addrs' must be a list of strings")
    if len(addrs) > MAX_INLINE:
        raise pft.TableError(f"more than {MAX_INLINE} inline addresses: use a file")
    entries = pft.parse_words(addrs)
    path = req.get("file")
    if path is not None:
        if not isinstance(path, str) or not path.startswith("/"):
            raise pft.TableError("'file' must be an absolute path")
        entries.extend(pft.read_file(path))
    return entries


def tables_request(tables: dict[str, Table], req: dict[str, Any]) -> dict[str, Any]:
    verbose = req.get("verbose", 0)
    if not isinstance(verbose, int) or isinstance(verbose, bool):
        verbose = 1 if verbose else 0
    return pft.list_tables(tables, verbose)


def table_request(tables: dict[str, Table], req: dict[str, Any], limit: int
                  ) -> dict[str, Any]:
    """One `table` request; bad input is an error answer, never an exception."""
    name, op = req.get("name"), req.get("op")
    try:
        if not isinstance(name, str) or not isinstance(op, str):
            raise pft.TableError("table needs a string 'name' and 'op'")
        if op not in pft.OPS:
            raise pft.TableError(f"unknown table command {op!r} "
                                 f"(one of {', '.join(pft.OPS)})")
        entries = entries_of(req) if op not in ("show", "flush") else []
        if op in ("add", "delete", "test") and not entries and req.get("file") is None:
            raise pft.TableError(f"{op}: give at least one address")
        return pft.run(tables, name, op, entries, limit)
    except pft.TableError as exc:
        return {"ok": False, "error": str(exc)}


def kill_sources(filt: Any, table: Table, now: float) -> int:
    """`--kill`: remove the states created by a packet from an address the table now
    matches (pfctl -k for each entry; the peers hear of it as for `ctl kill`)."""
    from pfcluster.pf.constants import PF_IN

    contains = table.contains
    doomed = []
    for st in filt.states:
        af, _proto, a0, a1 = st.key[:4]
        src = a0 if st.direction == PF_IN else a1
        if contains(af, int.from_bytes(src, "big")):
            doomed.append(st)
    return sum(1 for st in doomed if filt.remove_state(st, now))


__all__ = ["MAX_INLINE", "entries_of", "kill_sources", "table_request", "tables_request"]
