"""`ctl anchor NAME load FILE | show | flush` and `ctl anchors`: the daemon's handler.

What `pfctl -a NAME -f FILE`, `pfctl -a NAME -sr`, `pfctl -a NAME -F rules` and
`pfctl -sA` do, and how relayd, ftp-proxy and pfSense/OPNsense put rules into a running
pf. The daemon reads FILE itself (the control socket is root's, mode 0600; the CLI sends
an absolute path), so a file of any size loads, and every worker of `--workers` reads
the same one. A file that does not parse, or that translates addresses when the daemon
started without the PREROUTING hook, changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pfcluster.pf.filter import Filter
from pfcluster.pf.rules import RuleSyntaxError, anchor_path
from pfcluster.pf.ruleset import Rule

OPS = ("load", "show", "flush", "list")


def anchor_request(filt: Filter, req: dict[str, Any], translating: bool) -> dict[str, Any]:
    """Answer one `anchor` request: {"op", "name", "file"}."""
    op = req.get("op")
    if op not in OPS:
        return {"ok": False, "error": f"anchor: unknown operation {op!r} "
                f"(one of {', '.join(OPS)})"}
    rs = filt.ruleset
    if op == "list":  # pfctl -sA: every anchor that exists, by path
        names = sorted(rs.anchors)
        return {"ok": True, "text": [f"  {n}" for n in names], "data": names}
    name = req.get("name")
    try:
        if not isinstance(name, str):
            raise ValueError("anchor: a name is needed")
        path = anchor_path(name)
    except ValueError as exc:
        return {"ok": False, "error": str(exc)}
    if op == "show":
        a = rs.anchors.get(path)
        lines = [str(r) for r in a.rules] if a is not None else []
        return {"ok": True, "text": lines, "data": lines}
    if op == "flush":
        n = filt.flush_anchor(path)
        return {"ok": True, "text": [f"rules cleared in anchor {path}: {n}"],
                "data": {"anchor": path, "flushed": n}}
    file = req.get("file")
    if not isinstance(file, str) or not file:
        return {"ok": False, "error": "anchor load: a file is needed"}
    try:
        text = Path(file).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not a text file"
        return {"ok": False, "error": f"anchor load: cannot read {file}: {why}"}

    def check(rules: list[Rule]) -> None:
        if not translating and any(r.nat is not None or r.rdr is not None for r in rules):
            raise ValueError(f"{file}: the anchor's rules translate addresses, which needs "
                             "the PREROUTING hook this daemon did not start with (restart "
                             "it with a ruleset that translates); the anchor is unchanged")

    try:
        n = filt.load_anchor(path, text, file, check)
    except (RuleSyntaxError, ValueError) as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "text": [f"loaded {n} rules into anchor {path}"],
            "data": {"anchor": path, "rules": n}}


__all__ = ["OPS", "anchor_request"]
