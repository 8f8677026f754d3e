"""Runtime table operations with `pfctl -t NAME -T ...` semantics, and what a reload keeps.

The daemon answers `ctl tables` / `ctl table NAME OP` with these functions; they work on
a ruleset's `tables` dict, so the rules see a change at once (they hold the same `Table`
objects). Messages are pfctl's (xprintf lines, which pfctl writes to stderr): "1/1
addresses added.", "2/2 addresses deleted.", "1/1 addresses match." (exit status 2 when
some do not), "1 table created.". As pf:

- `add` / `replace` to an unknown (or inactive) table create it, persist (pfctl's
  CREATE_TABLE); the other operations answer "Table does not exist.";
- a `const` table refuses add/delete/replace/flush ("Operation not permitted.");
- an entry already there with the other negation is a conflict: neither added nor
  counted (pfr_add_addrs), and `delete` of `!a` does not delete `a`;
- `replace` sets the contents: new entries added, missing ones deleted, a negation flip
  "changed";
- `test` takes hosts only and counts hits whose longest match is not negated;
- a table is active (listed, usable) when a rule references it or it is persist;
- a network with host bits set (10.1.2.3/8) is refused, as the kernel's
  pfr_validate_addr does; names are not resolved (give addresses).

Reload (`carry_over`): pfctl -f replaces the contents of a table the file defines with
`{ ... }` or `file "..."` (PFR_FLAG_ADDRSTOO), takes the file's flags for every table it
defines, keeps the runtime contents of a table the file only declares (`table <t>
persist`) or only references, and leaves persist tables the file does not mention as
they are; non-persist tables the new rules no longer reference go away.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from typing import Any

from pfcluster.pf.constants import AF_INET, AF_INET6
from pfcluster.pf.ruleset import Table, net_str

Entry = tuple[int, int, int, bool]  # (af, masked address int, prefix length, negated)

OPS = ("show", "add", "delete", "replace", "flush", "test")
CHANGES = ("add", "delete", "replace", "flush")
DEFAULT_TABLE_ENTRIES = 200_000  # pf's PFR_KENTRY_HIWAT, `set limit table-entries`
NAME_MAX = 31  # PF_TABLE_NAME_SIZE - 1


class TableError(ValueError):
    """Bad input or a refused operation; str() is one line."""


def parse_entry(word: str) -> Entry:
    """`192.0.2.7`, `10.0.0.0/8`, `!2001:db8::/32` -> an entry, or TableError."""
    neg = word.startswith("!")
    text = word[1:] if neg else word
    addr, slash, plen_s = text.partition("/")
    if ":" in addr:
        af, fam, bits = AF_INET6, socket.AF_INET6, 128
    else:
        af, fam, bits = AF_INET, socket.AF_INET, 32
    try:
        value = int.from_bytes(socket.inet_pton(fam, addr), "big")
    except (OSError, ValueError):
        raise TableError(f"{word!r} is not an address (names are not resolved)") from None
    if slash:
        if not plen_s.isdigit() or len(plen_s) > 3 or int(plen_s) > bits:
            raise TableError(f"{word!r}: bad prefix length")
        plen = int(plen_s)
    else:
        plen = bits
    if value & ((1 << (bits - plen)) - 1):
        raise TableError(f"{word!r}: host bits set beyond /{plen} (Invalid argument)")
    return af, value, plen, neg


def parse_words(words: Iterable[str], where: str = "") -> list[Entry]:
    out = []
    for word in words:
        try:
            out.append(parse_entry(word))
        except TableError as exc:
            raise TableError(f"{where}{exc}") from None
    return out


def parse_text(text: str, source: str) -> list[Entry]:
    """A table file as pfctl reads one: whitespace-separated entries, `#` comments;
    errors name `source:line`."""
    out: list[Entry] = []
    append = out.append
    for lineno, line in enumerate(text.splitlines(), 1):
        body = line.split("#", 1)[0]
        for word in body.split():
            try:
                append(parse_entry(word))
            except TableError as exc:
                raise TableError(f"{source}:{lineno}: {exc}") from None
    return out


def read_file(path: str) -> list[Entry]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise TableError(f"{path}: {exc.strerror or exc}") from None
    return parse_text(text, path)


def entry_str(af: int, net: int, plen: int, neg: bool = False) -> str:
    text = net_str(af, net)
    if plen != (32 if af == AF_INET else 128):
        text += f"/{plen}"
    return ("!" if neg else "") + text


def check_name(name: str) -> None:
    if not name or len(name) > NAME_MAX or any(c.isspace() or c in "<>{}!,\"'#/"
                                               for c in name):
        raise TableError(f"invalid table name {name!r}")


def active(t: Table) -> bool:
    return t.referenced or t.persist


def flags(t: Table) -> str:
    """pfctl -sTables -v's flag column: c(onst) p(ersist) a(ctive) i(nactive)
    r(eferenced) h (anchor reference) C(ounters)."""
    return "".join((
        "c" if t.const else "-", "p" if t.persist else "-", "a" if active(t) else "-",
        "-", "r" if t.referenced else "-", "-", "C" if t.counters else "-"))


def list_tables(tables: dict[str, Table], verbose: int = 0) -> dict[str, Any]:
    """`pfctl -s Tables` (names), `-v` (flags and name), `-vv` (plus the entry count)."""
    text: list[str] = []
    data = []
    for name in sorted(tables):
        t = tables[name]
        if not active(t):
            continue
        data.append({"name": name, "flags": flags(t), "persist": t.persist,
                     "const": t.const, "counters": t.counters, "referenced": t.referenced,
                     "addresses": len(t)})
        if verbose:
            text.append(f"{flags(t)}\t{name}")
            if verbose > 1:
                text.append(f"\tAddresses:   {len(t)}")
        else:
            text.append(name)
    return {"ok": True, "text": text, "data": data}


def _show(t: Table) -> list[str]:
    """pfctl -T show: three columns of padding, `!` in the third."""
    return [("  !" if neg else "   ") + entry_str(af, net, plen)
            for (af, plen, net), neg in sorted(t.entries.items(),
                                               key=lambda kv: (kv[0][0], kv[0][2], kv[0][1]))]


def run(tables: dict[str, Table], name: str, op: str, entries: Sequence[Entry],
        limit: int = DEFAULT_TABLE_ENTRIES) -> dict[str, Any]:
    """One `pfctl -t NAME -T OP` on `tables`: the control answer, with `messages` (what
    pfctl prints on stderr) and `exit` (its status)."""
    check_name(name)
    if op not in OPS:
        raise TableError(f"unknown table command {op!r} (one of {', '.join(OPS)})")
    t = tables.get(name)
    if t is not None and not active(t):
        t = None
    messages: list[str] = []
    created = False
    if t is None:
        if op not in ("add", "replace"):
            raise TableError(f"<{name}>: Table does not exist.")
        t = tables.get(name) or Table(name)
        t.persist = True
        tables[name] = t
        created = True
        messages.append("1 table created.")
    if op in CHANGES and t.const:
        raise TableError(f"<{name}>: Operation not permitted (the table is const).")
    data: dict[str, Any] = {"table": name, "op": op, "created": created}
    text: list[str] = []
    code = 0
    if op == "show":
        text = _show(t)
        data["addresses"] = [line[2:].lstrip() for line in text]
    elif op == "flush":
        n = t.clear()
        messages.append(f"{n} addresses deleted.")
        data["deleted"] = n
    elif op == "test":
        nets = [e for e in entries if e[2] != (32 if e[0] == AF_INET else 128)]
        if nets:
            raise TableError(f"test: {entry_str(*nets[0])}: not a host (Invalid argument)")
        contains = t.contains
        hits = [entry_str(af, a, plen) for af, a, plen, _ in entries if contains(af, a)]
        messages.append(f"{len(hits)}/{len(entries)} addresses match.")
        data.update(matched=len(hits), given=len(entries), match=hits)
        code = 0 if len(hits) == len(entries) else 2
    elif op == "add":
        n = _add(tables, t, entries, limit)
        messages.append(f"{n}/{len(entries)} addresses added.")
        data.update(added=n, given=len(entries))
    elif op == "delete":
        n = _delete(t, entries)
        messages.append(f"{n}/{len(entries)} addresses deleted.")
        data.update(deleted=n, given=len(entries))
    else:
        nadd, ndel, nchange = _replace(tables, t, entries, limit)
        messages.extend(f"{n} addresses {what}." for n, what in
                        ((nadd, "added"), (ndel, "deleted"), (nchange, "changed")) if n)
        if not (nadd or ndel or nchange):
            messages.append("no changes.")
        data.update(added=nadd, deleted=ndel, changed=nchange)
    return {"ok": True, "text": text, "messages": messages, "exit": code, "data": data}


def _room(tables: dict[str, Table], limit: int, extra: int) -> None:
    total = sum(len(t) for t in tables.values())
    if total + extra > limit:
        raise TableError(f"Cannot allocate memory ({total} + {extra} entries would exceed "
                         f"set limit table-entries {limit}).")


def _add(tables: dict[str, Table], t: Table, entries: Sequence[Entry], limit: int) -> int:
    seen: set[tuple[int, int, int]] = set()
    new: list[Entry] = []
    lookup = t.entries.get
    for e in entries:
        key = (e[0], e[2], e[1])
        if key in seen or lookup(key) is not None:  # duplicate, existing or conflict
            continue
        seen.add(key)
        new.append(e)
    _room(tables, limit, len(new))  # all or nothing, as the kernel's ENOMEM
    put = t.put
    for af, net, plen, neg in new:
        put(af, net, plen, neg)
    return len(new)


def _delete(t: Table, entries: Sequence[Entry]) -> int:
    n = 0
    for af, net, plen, neg in entries:
        have = t.entries.get((af, plen, net))
        if have is not None and bool(have) == neg and t.remove(af, net, plen):
            n += 1
    return n


def _replace(tables: dict[str, Table], t: Table, entries: Sequence[Entry],
             limit: int) -> tuple[int, int, int]:
    want: dict[tuple[int, int, int], bool] = {}
    for af, net, plen, neg in entries:
        want.setdefault((af, plen, net), neg)
    have = t.entries
    added = [k for k in want if k not in have]
    deleted = [k for k in have if k not in want]
    changed = [k for k, neg in want.items() if k in have and have[k] != neg]
    _room(tables, limit, len(added) - len(deleted))
    for af, plen, net in deleted:
        t.remove(af, net, plen)
    for key in (*added, *changed):
        af, plen, net = key
        t.put(af, net, plen, want[key])
    return len(added), len(deleted), len(changed)


def carry_over(old: dict[str, Table], new: dict[str, Table]) -> None:
    """A reload: fill `new` (the freshly parsed ruleset's tables) from `old` as pfctl -f
    does (see the module docstring). Contents move, not copy: O(1) per table."""
    for name, prev in old.items():
        if not active(prev):
            continue
        t = new.get(name)
        if t is None:
            if prev.persist:  # runtime-created or persist: outlives the rules
                new[name] = prev
            continue
        if t.init_addr:  # the file gives the contents
            continue
        t.take_contents(prev)
        if not t.defined:  # only referenced: keeps the flags it had
            t.persist, t.const, t.counters = prev.persist, prev.const, prev.counters


def entries_text(entries: Iterable[Entry]) -> list[str]:
    return [entry_str(*e) for e in entries]


__all__ = ["CHANGES", "OPS", "Entry", "TableError", "active", "carry_over", "check_name",
           "entries_text", "entry_str", "flags", "list_tables", "parse_entry", "parse_text",
           "parse_words", "read_file", "run"]
