"""docs/edge.conf on the real daemon (namespaces, root): the file with only its interface
macros changed (uplink eth1 towards the server namespace, office LAN eth0 towards the
client) loads, and real traffic shows its behaviour: the LAN leaves NATed to the uplink's
address (tagged in, `tagged` out), ssh to the firewall more than 3 times in 30 s puts the
source into <bruteforce> and its next connection fails."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nsfixtures import (
    CONNECT,
    Netlab,
    client_fw_server,
    netlab,
    pfcluster_argv,
    popen_pipe,
    readline,
    sh,
    start_daemon,
)

pytestmark = [pytest.mark.root]  # network namespaces, iptables, NFQUEUE
__all__ = ["netlab"]

EDGE = Path(__file__).resolve().parent.parent / "docs" / "edge.conf"

# A server that accepts connections until killed and prints who each came from.
ACCEPT_LOOP = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
try:
    while True:
        c, peer = s.accept()
        print("peer", peer[0], peer[1], flush=True)
        c.close()
except OSError as e:
    print("done", type(e).__name__, flush=True)
"""


def edge_for_lab(tmp_path: Path, web: str) -> Path:
    """docs/edge.conf with the lab's interface names and web server; nothing else changed."""
    text = EDGE.read_text()
    subs = {'ext = "em0"': 'ext = "eth1"', 'int = "em1"': 'int = "eth0"',
            'web = "192.0.2.10"': f'web = "{web}"'}
    for old, new in subs.items():
        assert text.count(old) == 1, old  # the file still has the macro this test rewrites
        text = text.replace(old, new)
    path = tmp_path / "edge.conf"
    path.write_text(text)
    return path


def connect(lab: Netlab, ns: str, ip: str, port: int, timeout: float = 1.5) -> str:
    res = lab.exec(ns, [sys.executable, "-c", CONNECT, ip, str(port), str(timeout)],
                   timeout=15)
    return res.stdout.strip()


def ctl(lab: Netlab, ns: str, sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.exec(ns, pfcluster_argv("ctl", "--control", sock, *args), check=False,
                    timeout=20)


class Edge:
    """The lab firewall running docs/edge.conf, with its control socket."""

    def __init__(self, lab: Netlab, tmp_path: Path) -> None:
        self.lab = lab
        self.t = t = client_fw_server(lab)
        rules = edge_for_lab(tmp_path, t.client_ip.rsplit(".", 1)[0] + ".10")
        self.sock = str(tmp_path / "fw.sock")
        self.fw_ext = t.server_ip.rsplit(".", 1)[0] + ".1"  # the uplink address (eth1)
        self.daemon = start_daemon(lab, t.fw, rules, self.sock)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return ctl(self.lab, self.t.fw, self.sock, *args)

    def stop(self) -> None:
        rc = self.lab.stop(self.daemon, signal.SIGTERM)
        assert rc == 0, (self.lab.tmp / "daemon.log").read_text()
        sh(["ip", "netns", "exec", self.t.fw,
            *pfcluster_argv("daemon", "--uninstall", "--queue", "0")])


def test_lan_leaves_natted_to_the_uplink_address(netlab: Netlab, tmp_path: Path) -> None:
    e = Edge(netlab, tmp_path)
    t = e.t
    try:
        # the outside cannot open a connection into the LAN (block log all)
        assert connect(netlab, t.server, t.client_ip, 8080, 1.0).startswith("failed")
        # the LAN goes out with the uplink's address (match ... nat-to ($ext), tagged)
        srv = popen_pipe(netlab, t.server, ACCEPT_LOOP, t.server_ip, "8080", "8",
                         stdin=subprocess.DEVNULL)
        assert readline(srv) == "ready"
        assert connect(netlab, t.client, t.server_ip, 8080) == "connected"
        peer = readline(srv).split()
        assert peer[:2] == ["peer", e.fw_ext], peer
    finally:
        e.stop()


def test_ssh_bruteforce_overload(netlab: Netlab, tmp_path: Path) -> None:
    """ssh to the firewall from outside: 3 connections in 30 s pass, the 4th puts the
    source into <bruteforce> (flush global: none of its states is left) and the next one
    is blocked."""
    e = Edge(netlab, tmp_path)
    t = e.t
    try:
        sshd = popen_pipe(netlab, t.fw, ACCEPT_LOOP, e.fw_ext, "22", "12",
                          stdin=subprocess.DEVNULL)
        assert readline(sshd) == "ready"
        shown = e.ctl("table", "bruteforce", "show")
        assert shown.returncode == 0 and t.server_ip not in shown.stdout, shown
        results = [connect(netlab, t.server, e.fw_ext, 22) for _ in range(4)]
        assert results[:3] == ["connected"] * 3, results
        shown = e.ctl("table", "bruteforce", "show")
        assert shown.returncode == 0 and t.server_ip in shown.stdout.split(), shown
        # the next connection from that source is blocked (block quick from <bruteforce>)
        assert connect(netlab, t.server, e.fw_ext, 22).startswith("failed")
        states = e.ctl("states").stdout
        assert not re.search(rf"{re.escape(t.server_ip)}:\d+ -> {re.escape(e.fw_ext)}:22",
                             states), states
        info = e.ctl("info").stdout
        assert re.search(r"overload table insertion\s+1\b", info), info
    finally:
        e.stop()
