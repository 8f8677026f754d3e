"""Issue 14, parts 2 and 4: `pfcluster check`, the keepalived glue (track file, ctl syncok,
ctl notify), sd_notify, the systemd unit and the example configurations."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from conftest import fuzz_settings
from nsfixtures import stub_core
from pfcluster.io.config import ConfigError, DaemonConfig, load_config, worker_config
from pfcluster.io.loop import Daemon
from pfcluster.io.sdnotify import sd_notify
from pfcluster.io.vrrp import TrackFile, Transitions, notify_request
from test_daemon_control import Served

REPO = Path(__file__).resolve().parent.parent
GOOD = """\
set skip on lo
set limit states 5000
block all
pass in on em0 proto tcp to port 22
"""


def cli(*args: str) -> Any:
    from pfcluster.cli.main import main

    return CliRunner().invoke(main, list(args), prog_name="pfcluster")


def one_line(res: Any) -> str:
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exc_info
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return str(lines[0])


# --- pfcluster check --------------------------------------------------------------------


def test_check_valid_file_quiet_and_verbose(tmp_path: Path) -> None:
    f = tmp_path / "pf.conf"
    f.write_text(GOOD)
    res = cli("check", "--rules", str(f))
    assert res.exit_code == 0 and res.output == ""
    res = cli("check", "-v", "--rules", str(f))
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert "set skip on { lo }" in lines and "set limit states 5000" in lines
    assert "block drop all" in lines
    assert any(line.startswith("pass in on em0 proto tcp") and "port = 22" in line
               for line in lines), lines


def test_check_errors_are_file_line_col(tmp_path: Path) -> None:
    f = tmp_path / "pf.conf"
    f.write_text(GOOD + "pass in proto tcp to port\n")
    res = cli("check", "--rules", str(f))
    assert res.exit_code == 1
    assert one_line(res).startswith(f"pfcluster check: {f}:5:")
    for path, why in ((tmp_path / "missing", "No such file"), (tmp_path, "Is a directory"),
                      (Path(sys.executable).resolve(), "not a text file")):
        res = cli("check", "--rules", str(path))
        assert res.exit_code == 1 and why in one_line(res), res.stderr
    res = cli("check")
    assert res.exit_code == 2 and "--rules" in one_line(res)


def test_check_config_file(tmp_path: Path) -> None:
    rules = tmp_path / "pf.conf"
    rules.write_text(GOOD)
    conf = tmp_path / "pfcluster.toml"
    conf.write_text('rules = "pf.conf"\nsyncdev = "sync0"\ntrack_file = "/run/x"\n')
    assert cli("check", "--config", str(conf)).exit_code == 0
    conf.write_text('rules = "pf.conf"\nsyncdev = "sync0"\ntrack_demote = 300\n')
    res = cli("check", "--config", str(conf))
    assert res.exit_code == 1 and "track_demote" in one_line(res)
    rules.write_text("pass in proto bogus\n")
    conf.write_text('rules = "pf.conf"\nsyncdev = "sync0"\n')
    res = cli("check", "--config", str(conf))
    assert res.exit_code == 1 and "pf.conf:1:" in one_line(res)


def test_check_uses_the_daemons_parser(tmp_path: Path) -> None:
    """Whatever the daemon's loader refuses, check refuses with the same message."""
    from pfcluster.io.loop import load_ruleset

    f = tmp_path / "pf.conf"
    for text in ("pass in on em0 proto tcp to port 5201 flags S/SA\n", "block all\npass out on\n",
                 "match in all\n", "table <t> { 10.0.0.0/8 }\npass in from <t>\n"):
        f.write_text(text)
        try:
            load_ruleset(str(f))
            daemon_error = None
        except Exception as exc:  # RuleSyntaxError
            daemon_error = str(exc)
        res = cli("check", "--rules", str(f))
        if daemon_error is None:
            assert res.exit_code == 0, res.stderr
        else:
            assert res.exit_code == 1 and one_line(res) == f"pfcluster check: {daemon_error}"


@fuzz_settings(60)
@given(st.text(alphabet=st.sampled_from(list("pass block in out on em0 proto tcp from to any "
                                              "port{}<>=!/:,.$\n\"#0123456789set limit")),
               max_size=200))
def test_check_any_text_no_traceback(tmp_path_factory: Any, text: str) -> None:
    f = tmp_path_factory.mktemp("fz") / "pf.conf"
    f.write_text(text)
    res = cli("check", "-v", "--rules", str(f))
    assert res.exit_code in (0, 1), res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exc_info
    if res.exit_code == 1:
        assert res.stderr.startswith(f"pfcluster check: {f}:")


# --- the track file, notify, syncok -------------------------------------------------------


def test_track_file_values_and_rename(tmp_path: Path) -> None:
    path = tmp_path / "track"
    t = TrackFile(str(path), 253)
    t.write(False)
    assert path.read_text() == "-253\n"
    ino = path.stat().st_ino
    t.write(False)  # unchanged: not rewritten
    assert path.stat().st_ino == ino
    t.write(True)
    assert path.read_text() == "0\n" and path.stat().st_ino != ino  # replaced, by rename
    assert not (tmp_path / "track.tmp").exists()
    TrackFile(str(tmp_path / "nodir" / "track")).write(True)  # logged, not raised
    TrackFile(None).write(True)  # no file configured: nothing


def test_track_config_keys(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('rules = "r"\nsyncdev = "s"\ntrack_file = "/run/t"\ntrack_demote = 254\n')
    cfg = load_config(str(conf), {})
    assert cfg.track_file == "/run/t" and cfg.track_demote == 254
    with pytest.raises(ConfigError, match="track_demote"):
        load_config(None, {"rules": "r", "syncdev": "s", "track_demote": 0})
    with pytest.raises(ConfigError, match="track_file"):
        conf.write_text('rules = "r"\nsyncdev = "s"\ntrack_file = 1\n')
        load_config(str(conf), {})
    # the supervisor writes the firewall's file; its workers do not
    assert worker_config(replace(cfg, workers=2), 1, 7).track_file is None


def test_notify_request_validation() -> None:
    tr = Transitions()
    assert notify_request({"state": "master"}, tr, True)["ok"]
    bad = notify_request({"state": "LEADER"}, tr, True)
    assert not bad["ok"] and "LEADER" in bad["error"]
    assert not notify_request({"state": "BACKUP", "priority": "x"}, tr, True)["ok"]
    ok = notify_request({"kind": "instance", "name": "VI_1", "state": "FAULT", "priority": 100},
                        tr, False)
    assert ok["ok"] and ok["data"]["sync_ok"] is False and ok["data"]["kind"] == "INSTANCE"
    notify_request({"name": "VI_1", "state": "BACKUP"}, tr, True)
    assert tr.instances["VI_1"]["state"] == "BACKUP" and tr.instances["VI_1"]["changes"] == 2
    assert [e["state"] for e in tr.history] == ["MASTER", "FAULT", "BACKUP"]
    assert any("VI_1" in line and "BACKUP" in line for line in tr.lines())


def test_daemon_answers_syncok_and_notify(tmp_path: Path) -> None:
    rules = tmp_path / "pf.conf"
    rules.write_text(GOOD)
    d = Daemon(DaemonConfig(rules=str(rules), syncdev="sync0"), core=stub_core)
    assert d.handle_request({"cmd": "syncok"})["data"] == {"sync_ok": True}
    d.engine.sync_ok = False
    assert d.handle_request({"cmd": "syncok"})["data"] == {"sync_ok": False}
    res = d.handle_request({"cmd": "notify", "kind": "GROUP", "name": "FW", "state": "MASTER"})
    assert res["ok"] and res["data"]["sync_ok"] is False
    info = d.handle_request({"cmd": "info"})
    assert info["data"]["vrrp"]["instances"]["FW"]["state"] == "MASTER"
    assert "vrrp" in info["text"]


def _fake_daemon(tmp_path: Path, sync_ok: bool) -> Served:
    """A control socket answering `syncok` with `sync_ok` and echoing anything else."""

    def handler(req: dict[str, Any]) -> dict[str, Any]:
        if req["cmd"] == "syncok":
            return {"ok": True, "text": [], "data": {"sync_ok": sync_ok}}
        return {"ok": True, "text": [f"recorded {req}"], "data": req}

    served = Served(tmp_path / "ctl.sock")
    served.server.handler = handler
    return served


@pytest.mark.parametrize("sync_ok", [True, False])
def test_ctl_syncok_exit_status(tmp_path: Path, sync_ok: bool) -> None:
    served = _fake_daemon(tmp_path, sync_ok)
    try:
        res = cli("ctl", "--control", str(tmp_path / "ctl.sock"), "syncok")
        assert res.exit_code == (0 if sync_ok else 1)
        assert res.output.strip() == f"sync_ok {str(sync_ok).lower()}"
    finally:
        served.close()


def test_ctl_syncok_without_daemon_fails(tmp_path: Path) -> None:
    res = cli("ctl", "--control", str(tmp_path / "none.sock"), "syncok")
    assert res.exit_code == 1 and "none.sock" in one_line(res)


def test_ctl_notify_takes_keepalived_arguments(tmp_path: Path) -> None:
    served = _fake_daemon(tmp_path, True)
    sock = str(tmp_path / "ctl.sock")
    try:
        res = cli("ctl", "--control", sock, "--json", "notify", "INSTANCE", "VI_1", "MASTER", "150")
        assert res.exit_code == 0, res.output
        assert '"priority": 150' in res.output and '"name": "VI_1"' in res.output
        assert cli("ctl", "--control", sock, "notify", "BACKUP").exit_code == 0
        assert cli("ctl", "--control", sock, "notify", "A", "B").exit_code == 2
        res = cli("ctl", "--control", sock, "notify", "INSTANCE", "VI_1", "MASTER", "x")
        assert res.exit_code == 2 and "PRIORITY" in one_line(res)
    finally:
        served.close()


def test_sd_notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1") is True
        assert s.recv(100) == b"READY=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sd_notify("READY=1") is False


# --- the unit and the example files -------------------------------------------------------


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    script = Path(sys.executable).with_name("pfcluster")
    if not script.exists():
        pytest.skip(f"no installed pfcluster script beside {sys.executable} to point at")
    text = (REPO / "packaging" / "pfcluster.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text and "Type=notify" in text
    assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW" in text
    unit = tmp_path / "pfcluster.service"
    unit.write_text(text.replace("/opt/pfcluster/.venv/bin/pfcluster", str(script)))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60, check=False)
    # verify warns about unknown keys and bad values on stderr but exits 0: both must be clean
    problems = [line for line in res.stderr.splitlines() if "pfcluster.service" in line]
    assert res.returncode == 0 and not problems, res.stderr


def test_example_config_is_valid(tmp_path: Path) -> None:
    cfg = load_config(str(REPO / "packaging" / "pfcluster.toml"), {})
    assert cfg.track_file and cfg.control.startswith("/run/pfcluster/")
    assert not cfg.fail_open


@pytest.mark.root
def test_example_keepalived_conf(need_root: None, tmp_path: Path) -> None:
    """keepalived's own config test, in a new network namespace with the example's two
    interfaces (keepalived refuses interfaces that do not exist)."""
    if shutil.which("keepalived") is None or shutil.which("unshare") is None:
        pytest.skip("keepalived (scripts/install installs it) or unshare is not installed")
    conf = tmp_path / "keepalived.conf"
    conf.write_text((REPO / "docs" / "keepalived.conf").read_text()
                    .replace("/opt/pfcluster/.venv/bin/pfcluster", shutil.which("true") or "true"))
    res = subprocess.run(["unshare", "-n", "sh", "-c", "ip link add lan0 type veth peer name "
                          f"dmz0 && keepalived -t -f {conf}"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr + res.stdout


def test_lab_vrrp_conf_and_rules() -> None:
    from pfcluster.lab.topology import FirewallNode
    from pfcluster.lab.vrrp import VRRP_RULES, keepalived_conf, master_down_s
    from pfcluster.pf.rules import parse_rules

    rs = parse_rules(VRRP_RULES)
    assert any(r.proto == 112 for r in rs.rules)  # carp/VRRP passes, stateless
    fw = FirewallNode(1, "ns", "198.51.100.1", "203.0.113.1", "192.0.2.1", "", "", "")
    text = keepalived_conf(fw, Path("/run/t"), Path("/run/n.sh"))
    assert 'file "/run/t"' in text and "priority 150" in text and "init_file -253" in text
    assert round(master_down_s(100), 3) == 3.609


@pytest.mark.root
def test_lab_vrrp_failover_and_rolling(need_root: None) -> None:
    """Short lab run: fw1 dies, fw2 takes over within the master-down interval plus one
    advert, fw1 rejoins and waits for its bulk update, then each daemon restarts; no
    TCP reset."""
    if shutil.which("keepalived") is None:
        pytest.skip("keepalived is not installed (scripts/install installs it)")
    if shutil.which("ping") is None:
        pytest.skip("ping is not installed (iputils-ping; scripts/install installs it)")
    from pfcluster.lab.vrrp import VrrpConfig, run_vrrp

    doc = run_vrrp(VrrpConfig(seconds=36, failover=True, rolling=True, hold=2.0))
    assert doc["errors"] == [], doc["errors"]
    assert doc["resets"]["during"] == {"client": 0, "server": 0}
    fo = doc["steps"]["failover"]
    assert fo["takeover_s"] is not None and fo["takeover_s"] <= fo["master_down_interval_s"] + 1.0
    assert fo["rejoin_stayed_backup_while_unsynced"] is True
    assert fo["rejoin_master_before_sync_ok"] is False
    assert doc["ping"]["longest_gap_s"] <= fo["master_down_interval_s"] + 1.5
    assert len(doc["steps"]["rolling"]["steps"]) == 2
    assert doc["ok"] is True



def test_supervisor_track_file_follows_every_worker(tmp_path: Path) -> None:
    """A --workers firewall is synced only when every worker is; one that does not answer
    (dead, restarting) counts as not synced."""
    from pfcluster.io.workers import Supervisor

    rules = tmp_path / "pf.conf"
    rules.write_text(GOOD)
    track = tmp_path / "track"
    sup = Supervisor(DaemonConfig(rules=str(rules), syncdev="sync0", workers=2,
                                  track_file=str(track)))
    answers: list[dict[str, Any]] = []
    sup._ask_all = lambda cmd, **args: list(answers)  # type: ignore[method-assign]
    answers[:] = [{"ok": True, "data": {"sync_ok": True}}] * 2
    assert sup.handle_request({"cmd": "syncok"})["data"] == {"sync_ok": True}
    sup.track.write(sup.sync_ok())
    assert track.read_text() == "0\n"
    answers[1] = {"ok": False, "error": "worker 1: gone"}
    assert sup.sync_ok() is False
    sup.track.write(sup.sync_ok())
    assert track.read_text() == "-253\n"
    res = sup.handle_request({"cmd": "notify", "state": "FAULT", "name": "FW"})
    assert res["ok"] and res["data"]["sync_ok"] is False
    assert [w.cfg.track_file for w in sup.workers] == [None, None]
