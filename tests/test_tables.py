"""Runtime tables: Table's incremental ops, pfctl -T semantics and messages, what a reload
keeps, and `ctl tables` / `ctl table` end to end over a control socket."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from nsfixtures import stub_core
from pfcluster.cli.main import main as cli
from pfcluster.io.config import DaemonConfig
from pfcluster.io.loop import Daemon
from pfcluster.pf import tables as pft
from pfcluster.pf.constants import AF_INET, AF_INET6
from pfcluster.pf.ruleset import Table
from test_daemon_control import Served

V4 = AF_INET


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def run(tables: dict[str, Table], name: str, op: str, *words: str) -> dict[str, Any]:
    return pft.run(tables, name, op, pft.parse_words(words))


def test_incremental_add_remove_keeps_longest_prefix() -> None:
    t = Table("t")
    t.add(V4, ip("10.0.0.0"), 8)
    t.add(V4, ip("10.1.2.3"), 32, neg=True)
    assert t.contains(V4, ip("10.9.9.9")) and not t.contains(V4, ip("10.1.2.3"))
    assert [m for m, _ in t._lpm[V4]] == [0xFFFFFFFF, 0xFF000000]
    assert t.remove(V4, ip("10.1.2.3"), 32)
    assert t.contains(V4, ip("10.1.2.3")) and [m for m, _ in t._lpm[V4]] == [0xFF000000]
    assert not t.remove(V4, ip("10.1.2.3"), 32)
    t.add(V4, ip("2.2.2.2"), 32)
    t.add(V4, ip("2.2.2.3"), 32)
    assert t.remove(V4, ip("2.2.2.2"), 32) and t.contains(V4, ip("2.2.2.3"))
    assert len(t) == 2 and not t.contains(AF_INET6, 0)


def test_parse_entry_refuses_names_host_bits_and_bad_prefixes() -> None:
    assert pft.parse_entry("!2001:db8::/32") == (AF_INET6, ip("2001:db8::"), 32, True)
    for bad in ("example.com", "10.1.2.3/8", "10.0.0.0/33", "10.0.0.0/x", "1.2.3", "::/129"):
        with pytest.raises(pft.TableError):
            pft.parse_entry(bad)
    with pytest.raises(pft.TableError, match=r"f\.txt:2: "):
        pft.parse_text("192.0.2.1 # ok\n  192.0.2.300\n", "f.txt")


def test_pfctl_messages_and_counts() -> None:
    tables: dict[str, Table] = {}
    a = run(tables, "bad", "add", "192.0.2.7", "192.0.2.7", "198.51.100.0/24")
    assert a["messages"] == ["1 table created.", "2/3 addresses added."]
    assert tables["bad"].persist and a["data"]["created"]
    assert run(tables, "bad", "add", "!192.0.2.7")["messages"] == ["0/1 addresses added."]
    assert run(tables, "bad", "delete", "!192.0.2.7")["messages"] == ["0/1 addresses deleted."]
    assert run(tables, "bad", "show")["text"] == ["   192.0.2.7", "   198.51.100.0/24"]
    t = run(tables, "bad", "test", "192.0.2.7", "198.51.100.9", "203.0.113.1")
    assert t["messages"] == ["2/3 addresses match."] and t["exit"] == 2
    assert run(tables, "bad", "test", "192.0.2.7")["exit"] == 0
    r = run(tables, "bad", "replace", "192.0.2.8", "!198.51.100.0/24")
    assert r["messages"] == ["1 addresses added.", "1 addresses deleted.",
                             "1 addresses changed."]
    assert run(tables, "bad", "show")["data"]["addresses"] == ["192.0.2.8", "!198.51.100.0/24"]
    assert run(tables, "bad", "replace", "192.0.2.8", "!198.51.100.0/24")["messages"] == \
        ["no changes."]
    assert run(tables, "bad", "delete", "192.0.2.8")["messages"] == ["1/1 addresses deleted."]
    assert run(tables, "bad", "flush")["messages"] == ["1 addresses deleted."]
    with pytest.raises(pft.TableError, match="not a host"):
        run(tables, "bad", "test", "10.0.0.0/8")
    with pytest.raises(pft.TableError, match="Table does not exist"):
        run(tables, "nope", "show")
    tables["c"] = Table("c", const=True)
    tables["c"].referenced = True
    for op in ("add", "delete", "replace"):
        with pytest.raises(pft.TableError, match="Operation not permitted"):
            run(tables, "c", op, "192.0.2.1")
    with pytest.raises(pft.TableError, match="table-entries"):
        pft.run(tables, "big", "add", pft.parse_words(["192.0.2.1", "192.0.2.2"]), limit=1)
    assert "big" in tables and len(tables["big"]) == 0  # created, nothing added: as pf


def test_tables_listing_flags() -> None:
    tables = {"bad": Table("bad", persist=True), "c": Table("c", const=True),
              "idle": Table("idle")}
    tables["c"].referenced = True
    tables["bad"].add(V4, ip("192.0.2.7"), 32)
    assert pft.list_tables(tables)["text"] == ["bad", "c"]  # idle: not active, as pf
    assert pft.list_tables(tables, 2)["text"] == [
        "-pa----\tbad", "\tAddresses:   1", "c-a-r--\tc", "\tAddresses:   0"]


RULES = """\
table <file> { 192.0.2.1 }
table <decl> persist
table <gone> { 192.0.2.9 }
block in quick from <bad>
block in quick from <decl>
block in quick from <file>
pass all
"""


def daemon(tmp_path: Path, rules: str = RULES) -> Daemon:
    path = tmp_path / "pf.conf"
    path.write_text(rules)
    return Daemon(DaemonConfig(rules=str(path), syncdev="sync0"), core=stub_core,
                  install_iptables=False)


def test_reload_keeps_runtime_contents_as_pfctl_f(tmp_path: Path) -> None:
    d = daemon(tmp_path)
    for name in ("bad", "decl", "file", "rt"):
        assert d.handle_request({"cmd": "table", "name": name, "op": "add",
                                 "addrs": ["198.51.100.7"]})["ok"]
    assert d.handle_request({"cmd": "reload"})["ok"]
    tabs = d.ruleset.tables
    assert tabs["bad"].contains(V4, ip("198.51.100.7"))  # only referenced: kept
    assert tabs["decl"].contains(V4, ip("198.51.100.7"))  # declared without entries: kept
    assert not tabs["file"].contains(V4, ip("198.51.100.7"))  # the file's entries win
    assert tabs["file"].contains(V4, ip("192.0.2.1"))
    assert tabs["rt"].persist and tabs["rt"].contains(V4, ip("198.51.100.7"))
    listed = d.handle_request({"cmd": "tables"})["text"]
    assert listed == ["bad", "decl", "file", "rt"]  # <gone>: unreferenced, not persist
    # the rules see the change: the new ruleset's <bad> is the one that matched
    rule_tables = {r.src.table.name: r.src.table for r in d.ruleset.rules
                   if r.src.kind == "table"}
    assert rule_tables["bad"] is tabs["bad"]


def test_bad_requests_are_one_line_errors(tmp_path: Path) -> None:
    d = daemon(tmp_path)
    for req in ({"name": "bad", "op": "add", "addrs": "192.0.2.1"},
                {"name": "bad", "op": "frob"}, {"name": 3, "op": "add"},
                {"name": "bad", "op": "add", "addrs": ["nothost"]},
                {"name": "bad", "op": "add", "file": "relative.txt"},
                {"name": "bad", "op": "add", "file": str(tmp_path / "missing")},
                {"name": "x" * 40, "op": "add", "addrs": ["192.0.2.1"]},
                {"name": "bad", "op": "add"}):
        ans = d.handle_request({"cmd": "table", **req})
        assert not ans["ok"] and "\n" not in ans["error"], req


@pytest.fixture
def served_daemon(tmp_path: Path):  # type: ignore[no-untyped-def]
    d = daemon(tmp_path)
    s = Served(tmp_path / "ctl.sock")
    s.server.handler = d.handle_request
    try:
        yield str(tmp_path / "ctl.sock"), d
    finally:
        s.close()


def test_ctl_table_cli(served_daemon: tuple[str, Daemon], tmp_path: Path) -> None:
    sock, _d = served_daemon
    r = CliRunner()
    out = r.invoke(cli, ["ctl", "--control", sock, "table", "bad", "add", "192.0.2.7"])
    assert out.exit_code == 0 and out.stderr == "1/1 addresses added.\n" and out.stdout == ""
    out = r.invoke(cli, ["ctl", "--control", sock, "table", "bad", "test", "192.0.2.7",
                         "192.0.2.8"])
    assert out.exit_code == 2 and out.stderr == "1/2 addresses match.\n"
    out = r.invoke(cli, ["ctl", "--control", sock, "table", "bad", "show", "--json"])
    assert out.exit_code == 0 and '"addresses": ["192.0.2.7"]' in out.stdout
    out = r.invoke(cli, ["ctl", "--control", sock, "table", "bad", "add", "192.0.2.300"])
    assert out.exit_code == 2 and len(out.stderr.splitlines()) == 1
    assert "Traceback" not in out.output
    out = r.invoke(cli, ["ctl", "--control", sock, "table", "file", "add", "192.0.2.1"])
    assert out.exit_code == 0 and out.stderr == "0/1 addresses added.\n"
    out = r.invoke(cli, ["ctl", "--control", sock, "table", "nope", "flush"])
    assert out.exit_code == 1 and out.stderr.strip().endswith("Table does not exist.")
    out = r.invoke(cli, ["ctl", "--control", sock, "tables", "-v"])
    assert out.stdout.splitlines()[0] == "--a-r--\tbad"
    bad = tmp_path / "bad.txt"
    bad.write_text("192.0.2.1\n192.0.2.x\n")
    out = r.invoke(cli, ["ctl", "--control", sock, "table", "bad", "add", "-f", str(bad)])
    assert out.exit_code == 1 and f"{bad}:2:" in out.stderr and len(out.stderr.splitlines()) == 1


def test_ctl_table_loads_100k_from_file_and_stdin(served_daemon: tuple[str, Daemon],
                                                  tmp_path: Path) -> None:
    sock, d = served_daemon
    big = tmp_path / "big.txt"
    big.write_text("".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}\n"
                           for i in range(100_000)))
    r = CliRunner()
    t0 = time.perf_counter()
    out = r.invoke(cli, ["ctl", "--control", sock, "table", "big", "add", "-f", str(big)])
    took = time.perf_counter() - t0
    assert out.exit_code == 0, out.output
    assert out.stderr == "1 table created.\n100000/100000 addresses added.\n"
    assert took < 10, took  # a few hundred ms here; generous for a loaded machine
    assert d.ruleset.tables["big"].contains(V4, ip("10.1.134.159"))
    out = r.invoke(cli, ["ctl", "--control", sock, "table", "big", "replace", "-f", "-"],
                   input="10.0.0.1\n10.0.0.2\n")
    assert out.stderr == "99998 addresses deleted.\n" and len(d.ruleset.tables["big"]) == 2
