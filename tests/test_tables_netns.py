"""`ctl table bad add CLIENT` on a live daemon (namespaces, root): with `block in quick
from <bad>` the client's new connections stop while its established one continues (pf:
states are looked up before rules), and `--kill` then ends that one too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nsfixtures import Netlab, client_fw_server, netlab, pfcluster_argv, start_daemon
from test_daemon_acceptance import echo_server, hold, ping

__all__ = ["netlab"]

pytestmark = [pytest.mark.root]

RULES = """\
set skip on lo
table <bad> persist
block in quick from <bad>
pass in proto tcp to port 5201
pass out proto tcp to port 5201
"""

CONNECT = ("import socket, sys\n"
           "try:\n"
           "    socket.create_connection((sys.argv[1], 5201), timeout=1.5).close()\n"
           "    print('connected')\n"
           "except OSError as e:\n"
           "    print('failed', type(e).__name__)\n")


def connect(lab: Netlab, ns: str, ip: str) -> str:
    out = lab.exec(ns, [sys.executable, "-c", CONNECT, ip], timeout=10)
    return out.stdout.strip()


def ctl(lab: Netlab, ns: str, sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns,
                           *pfcluster_argv("ctl", "--control", sock, *args)],
                          capture_output=True, text=True, timeout=20)


def test_table_add_blocks_new_connections_kill_ends_states(netlab: Netlab,
                                                          tmp_path: Path) -> None:
    t = client_fw_server(netlab)
    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    sock = str(tmp_path / "ctl.sock")
    daemon = start_daemon(netlab, t.fw, rules, sock)
    try:
        echo_server(netlab, t)
        holder, _port = hold(netlab, t)
        assert connect(netlab, t.client, t.server_ip) == "connected"
        r = ctl(netlab, t.fw, sock, "table", "bad", "add", t.client_ip)
        assert r.returncode == 0 and r.stderr == "1/1 addresses added.\n", r
        assert connect(netlab, t.client, t.server_ip).startswith("failed")
        assert ping(holder) == "ok"  # established: its state still passes it
        r = ctl(netlab, t.fw, sock, "table", "bad", "test", t.client_ip)
        assert r.returncode == 0 and r.stderr == "1/1 addresses match.\n"
        r = ctl(netlab, t.fw, sock, "table", "bad", "add", "--kill", t.client_ip)
        assert r.returncode == 0 and "0/1 addresses added." in r.stderr
        # in+out states of the held connection and of the first (closing) one
        assert "killed 4 states" in r.stderr, r.stderr
        assert ping(holder).startswith("blocked")
        r = ctl(netlab, t.fw, sock, "table", "bad", "delete", t.client_ip)
        assert r.stderr == "1/1 addresses deleted.\n"
        assert connect(netlab, t.client, t.server_ip) == "connected"
    finally:
        netlab.stop(daemon)
