"""`ctl anchor NAME load FILE | show | flush` and `ctl anchors`: the daemon's handler on a
Filter, and the command line through a real control socket to that handler."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

scapy_all = pytest.importorskip("scapy.all")
from scapy.all import IP, TCP  # noqa: E402

from pfcluster.cli.main import main  # noqa: E402
from pfcluster.io.anchorctl import anchor_request  # noqa: E402
from pfcluster.packet import parse  # noqa: E402
from pfcluster.pf.filter import Filter  # noqa: E402
from pfcluster.pf.router import ROUTE_BLOCK, ROUTE_PASS, route  # noqa: E402
from pfcluster.pf.rules import parse_rules  # noqa: E402
from test_daemon_control import Served  # noqa: E402

MAIN = 'block all\nanchor "relayd/*"\nanchor "ftp-proxy"\n'


def syn(dport: int, sport: int = 40000) -> Any:
    return parse(bytes(IP(src="198.51.100.10", dst="203.0.113.10")
                       / TCP(sport=sport, dport=dport, flags="S")))


@pytest.fixture
def filt() -> Filter:
    return Filter(parse_rules(MAIN, "pf.conf"), hostid=1)


def test_load_show_flush_through_the_handler(filt: Filter, tmp_path: Path) -> None:
    f = tmp_path / "web.conf"
    f.write_text("pass in quick proto tcp to port 80\n")
    assert route(filt, "em0", None, syn(80), 1.0).action == ROUTE_BLOCK
    a = anchor_request(filt, {"op": "load", "name": "relayd/web", "file": str(f)}, False)
    assert a == {"ok": True, "text": ["loaded 1 rules into anchor relayd/web"],
                 "data": {"anchor": "relayd/web", "rules": 1}}
    assert route(filt, "em0", None, syn(80, 40001), 2.0).action == ROUTE_PASS
    show = anchor_request(filt, {"op": "show", "name": "/relayd/web/"}, False)
    assert show["data"] == ["pass in quick proto tcp from any to any port = 80 flags S/SA "
                            "keep state"]
    assert anchor_request(filt, {"op": "list"}, False)["data"] == [
        "ftp-proxy", "relayd", "relayd/web"]
    fl = anchor_request(filt, {"op": "flush", "name": "relayd/web"}, False)
    assert fl["data"] == {"anchor": "relayd/web", "flushed": 1}
    assert route(filt, "em0", None, syn(80, 40002), 3.0).action == ROUTE_BLOCK
    assert anchor_request(filt, {"op": "show", "name": "nosuch"}, False)["data"] == []


@pytest.mark.parametrize(("req", "error"), [
    ({"op": "drop", "name": "x"}, "anchor: unknown operation 'drop' (one of load, show, "
     "flush, list)"),
    ({"op": "show"}, "anchor: a name is needed"),
    ({"op": "show", "name": "a//b"}, "invalid anchor name 'a//b'"),
    ({"op": "show", "name": "../x"}, "invalid anchor name '../x'"),
    ({"op": "load", "name": "x"}, "anchor load: a file is needed"),
    ({"op": "load", "name": "x", "file": "/nonexistent/x.conf"},
     "anchor load: cannot read /nonexistent/x.conf: No such file or directory"),
])
def test_bad_requests_are_errors(filt: Filter, req: dict[str, Any], error: str) -> None:
    assert anchor_request(filt, {"cmd": "anchor", **req}, False) == {"ok": False,
                                                                      "error": error}


def test_a_broken_or_translating_file_changes_nothing(filt: Filter, tmp_path: Path) -> None:
    good, bad, nat = tmp_path / "good", tmp_path / "bad", tmp_path / "nat"
    good.write_text("pass all no state\n")
    bad.write_text("pass all\npass from 10.0.0.300\n")
    nat.write_text("pass out nat-to 192.0.2.1\n")
    assert anchor_request(filt, {"op": "load", "name": "ftp-proxy", "file": str(good)},
                          False)["ok"]
    a = anchor_request(filt, {"op": "load", "name": "ftp-proxy", "file": str(bad)}, False)
    assert a == {"ok": False, "error": f"{bad}:2:11: invalid address '10.0.0.300'"}
    a = anchor_request(filt, {"op": "load", "name": "ftp-proxy", "file": str(nat)}, False)
    assert not a["ok"] and "PREROUTING" in a["error"]
    assert str(filt.ruleset.anchors["ftp-proxy"]) == "@0 pass all no state"
    assert anchor_request(filt, {"op": "load", "name": "ftp-proxy", "file": str(nat)},
                          True)["ok"]


def _served(path: Path, filt: Filter) -> Served:
    """test_daemon_control's served ControlServer with anchor_request on `filt`."""
    served = Served(path)
    served.server.handler = lambda req: anchor_request(filt, req, False)
    return served


def test_ctl_anchor_commands_through_the_control_socket(filt: Filter, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    sock = tmp_path / "ctl.sock"
    served = _served(sock, filt)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ftp.conf").write_text("pass in quick proto tcp to port 21\n")
    run = CliRunner().invoke
    try:
        r = run(main, ["ctl", "--control", str(sock), "anchor", "ftp-proxy", "load",
                       "ftp.conf"])  # relative: the CLI sends an absolute path
        assert r.exit_code == 0 and r.output == "loaded 1 rules into anchor ftp-proxy\n"
        assert route(filt, "em0", None, syn(21), 1.0).action == ROUTE_PASS
        r = run(main, ["ctl", "--control", str(sock), "anchor", "ftp-proxy", "show"])
        assert r.output == ("pass in quick proto tcp from any to any port = 21 flags S/SA "
                            "keep state\n")
        r = run(main, ["ctl", "--control", str(sock), "--json", "anchors"])
        assert json.loads(r.output) == ["ftp-proxy", "relayd"]
        r = run(main, ["ctl", "--control", str(sock), "anchor", "ftp-proxy", "flush"])
        assert r.exit_code == 0 and "1" in r.output
        r = run(main, ["ctl", "--control", str(sock), "anchor", "x", "load"])
        assert r.exit_code == 2 and "needs a FILE" in r.output
        r = run(main, ["ctl", "--control", str(sock), "anchor", "x/../y", "show"])
        assert r.exit_code == 1 and "invalid anchor name 'x/../y'" in r.output
        assert "Traceback" not in r.output
    finally:
        served.close()


def test_check_verbose_prints_inline_anchors_in_braces(tmp_path: Path) -> None:
    f = tmp_path / "pf.conf"
    f.write_text('block all\nanchor "lan" on em1 {\n  pass in proto tcp to port 22\n'
                 '  anchor "guests" {\n    block in quick from 192.0.2.0/24\n  }\n}\n'
                 'anchor "relayd/*"\n')
    r = CliRunner().invoke(main, ["check", "-v", "--rules", str(f)])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-8:] == [
        "block drop all",
        'anchor "lan" on em1 all {',
        "  pass in proto tcp from any to any port = 22 flags S/SA keep state",
        '  anchor "guests" all {',
        "    block drop in quick inet from 192.0.2.0/24 to any",
        "  }",
        "}",
        'anchor "relayd/*" all',
    ]


def test_supervisor_fans_load_and_flush_out_and_asks_worker_0_for_show() -> None:
    from pfcluster.io.workers import Supervisor

    sup = Supervisor.__new__(Supervisor)  # no workers spawned: only the routing is tested
    sup.workers = [object(), object(), object()]  # type: ignore[list-item]
    asked: list[tuple[int, dict[str, Any]]] = []

    def ask(w: object, cmd: str, **args: Any) -> dict[str, Any]:
        i = sup.workers.index(w)
        asked.append((i, {"cmd": cmd, **args}))
        if args.get("file") == "bad" and i == 2:
            return {"ok": False, "error": "bad:1:1: nope"}
        return {"ok": True, "text": [f"w{i}"], "data": i}

    sup._ask = ask  # type: ignore[method-assign]
    assert sup.handle_request({"cmd": "anchor", "op": "show", "name": "x"})["data"] == 0
    assert [i for i, _ in asked] == [0]
    asked.clear()
    r = sup.handle_request({"cmd": "anchor", "op": "load", "name": "x", "file": "/f"})
    assert r["ok"] and [i for i, _ in asked] == [0, 1, 2]
    assert all(a == {"cmd": "anchor", "op": "load", "name": "x", "file": "/f"}
               for _, a in asked)
    asked.clear()
    r = sup.handle_request({"cmd": "anchor", "op": "load", "name": "x", "file": "bad"})
    assert r == {"ok": False, "error": "bad:1:1: nope"}
    asked.clear()
    assert sup.handle_request({"cmd": "anchor", "op": "flush", "name": "x"})["ok"]
    assert [i for i, _ in asked] == [0, 1, 2]


def test_daemon_handler_loads_an_anchor_that_a_reload_keeps(tmp_path: Path) -> None:
    from nsfixtures import stub_core
    from pfcluster.io.config import DaemonConfig
    from pfcluster.io.loop import Daemon

    rules = tmp_path / "pf.conf"
    rules.write_text(MAIN)
    web = tmp_path / "web.conf"
    web.write_text("pass in quick proto tcp to port 80\n")
    d = Daemon(DaemonConfig(rules=str(rules), syncdev="sync0"), core=stub_core)
    r = d.handle_request({"cmd": "anchor", "op": "load", "name": "relayd/web",
                          "file": str(web)})
    assert r["ok"], r
    rules.write_text(MAIN + "pass out all\n")
    assert d.handle_request({"cmd": "reload"})["ok"]
    assert d.handle_request({"cmd": "anchor", "op": "show", "name": "relayd/web"})["data"] == [
        "pass in quick proto tcp from any to any port = 80 flags S/SA keep state"]
    assert route(d.filter, "em0", None, syn(80), 1.0).action == ROUTE_PASS
    assert d.handle_request({"cmd": "rules"})["data"][-1] == "pass out all flags S/SA keep state"
