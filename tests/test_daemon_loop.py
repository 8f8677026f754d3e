"""The daemon's loop with the real pf Filter and a stand-in pfsync engine: iptables in
place while it runs and gone after SIGTERM/SIGINT, SIGHUP/ctl reload refuse broken
rules, `block return` answers with a RST, the control socket answers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nsfixtures import (
    Firewalled,
    Netlab,
    assert_closed_then_uninstall,
    client_fw_server,
    daemon_with_stub_argv,
    netlab,
    pfcluster_argv,
    wait_for,
)
from pfcluster.io.iptables import list_rules

__all__ = ["netlab"]

pytestmark = [pytest.mark.root]  # network namespaces, iptables, NFQUEUE, raw sockets

RULES = """\
set skip on lo
block all
pass in proto tcp to port 5201
pass out proto tcp to port 5201
block return in proto tcp to port 23
"""

CONNECT = r"""
import socket, sys, time
t0 = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except ConnectionRefusedError:
    print("refused %.3f" % (time.monotonic() - t0))
except OSError as e:
    print("failed", type(e).__name__)
"""


def connect(lab: Netlab, t: Firewalled, port: int, timeout: float = 2.0) -> str:
    return lab.exec(t.client, [sys.executable, "-c", CONNECT, t.server_ip, str(port),
                               str(timeout)], timeout=timeout + 10).stdout.strip()


def ctl(lab: Netlab, t: Firewalled, sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.exec(t.fw, pfcluster_argv("ctl", "--control", sock, *args), check=False,
                    timeout=20)


def start(lab: Netlab, t: Firewalled, rules: Path, sock: str) -> subprocess.Popen[bytes]:
    proc = lab.spawn(t.fw, daemon_with_stub_argv("--rules", str(rules), "--syncdev", "sync0",
                                                 "--control", sock, "--queue", "3"),
                     log="daemon.log")
    if not wait_for(lambda: ctl(lab, t, sock, "info").returncode == 0, 15):
        proc.kill()
        pytest.fail("daemon did not come up:\n" + (lab.tmp / "daemon.log").read_text())
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_loop_lifecycle(netlab: Netlab, tmp_path: Path, sig: int) -> None:
    t = client_fw_server(netlab)
    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    sock = str(tmp_path / "ctl.sock")
    prefix = netlab.prefix_argv(t.fw)
    # pre-existing leftovers of a "crashed" daemon on the same queue are cleaned up
    netlab.exec(t.fw, ["iptables-legacy", "-N", "PFCLUSTER-3"])
    netlab.exec(t.fw, ["iptables-legacy", "-A", "FORWARD", "-j", "PFCLUSTER-3"])
    proc = start(netlab, t, rules, sock)
    try:
        lines = list_rules(prefix)
        assert sum("-j PFCLUSTER-3" in line for line in lines) == 6  # 3 hooks x 2 families
        assert "NFQUEUE --queue-num 3" in "\n".join(lines)
        assert "--queue-bypass" not in "\n".join(lines)

        assert connect(netlab, t, 5201).startswith("refused")  # passed; the server RSTs
        assert connect(netlab, t, 22, timeout=1.0).startswith("failed")  # dropped
        refused = connect(netlab, t, 23)
        assert refused.startswith("refused"), refused  # block return: our RST

        rules_out = ctl(netlab, t, sock, "rules")
        assert rules_out.returncode == 0
        assert any("5201" in line for line in rules_out.stdout.splitlines())
        before = rules_out.stdout

        # a broken file is refused, by SIGHUP and by ctl reload; the old rules stay
        rules.write_text(RULES + "pass in proto tcp to port\n")
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reload refused" in (netlab.tmp / "daemon.log").read_text(), 5)
        assert "pf.conf:6:" in (netlab.tmp / "daemon.log").read_text()  # file:line:col logged
        assert ctl(netlab, t, sock, "rules").stdout == before  # the SIGHUP kept the old set
        assert connect(netlab, t, 23).startswith("refused")  # and they still filter
        bad = ctl(netlab, t, sock, "reload")
        assert bad.returncode == 1 and "pf.conf:6:" in bad.stderr
        bad_json = json.loads(ctl(netlab, t, sock, "reload", "--json").stdout)
        assert bad_json["ok"] is False and "pf.conf:6:" in bad_json["error"]
        assert ctl(netlab, t, sock, "rules").stdout == before
        assert connect(netlab, t, 23).startswith("refused")

        rules.write_text(RULES.replace("port 23", "port 24"))
        good = ctl(netlab, t, sock, "--json", "reload")
        assert json.loads(good.stdout)["rules"] >= 4
        assert connect(netlab, t, 24).startswith("refused")

        info = json.loads(ctl(netlab, t, sock, "info", "--json").stdout)
        assert info["dataplane"]["packets"] > 0 and info["dataplane"]["replies"] >= 2
        assert info["pfsync"]["sock_tx"] >= 1  # the engine's start() frame went out
        assert info["sync_ok"] is True
        assert ctl(netlab, t, sock, "flush", "states").returncode == 0
    finally:
        rc = netlab.stop(proc, sig)
    assert rc == 0, (netlab.tmp / "daemon.log").read_text()
    assert_closed_then_uninstall(netlab, t.fw)
    assert not Path(sock).exists()
