"""The daemon translating real Linux traffic in namespaces (root): nat-to an interface's
own address (the reply comes to the firewall itself, so its destination must be rewritten
at PREROUTING, before routing), rdr-to, ICMP echo, and `ctl states` with both keys."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
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

pytestmark = [pytest.mark.root]  # network namespaces, iptables, NFQUEUE, raw sockets
__all__ = ["netlab"]  # the fixture, imported for pytest

NAT_RULES = """\
block all
pass in on eth0 proto { tcp icmp }
pass out on eth1 inet proto { tcp icmp } nat-to (eth1)
"""

# The server's side: who connected (as the server sees it)
ACCEPT_ONE = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
try:
    c, peer = s.accept()
    print("peer", peer[0], peer[1], flush=True)
    data = c.recv(100)
    c.sendall(data.upper())
    c.close()
except OSError as e:
    print("failed", type(e).__name__, flush=True)
"""

SEND_ONE = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    c.sendall(b"hello")
    print("got", c.recv(100).decode(), flush=True)
except OSError as e:
    print("failed", type(e).__name__, flush=True)
"""


def ctl(lab: Netlab, ns: str, sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.exec(ns, pfcluster_argv("ctl", "--control", sock, *args), check=False,
                    timeout=20)


def test_nat_to_interface_address(netlab: Netlab, tmp_path: Path) -> None:
    t = client_fw_server(netlab)
    rules = tmp_path / "pf.conf"
    rules.write_text(NAT_RULES)
    sock = str(tmp_path / "fw.sock")
    daemon = start_daemon(netlab, t.fw, rules, sock)
    fw_out = "203.0.113.1"  # the firewall's own address on eth1
    try:
        # translating: the in test runs at PREROUTING (mangle table)
        mangle = sh(["ip", "netns", "exec", t.fw, "iptables-legacy", "-t", "mangle", "-S"]).stdout
        assert "PFCLUSTER-0-in" in mangle and "-A PREROUTING -j PFCLUSTER-0-in" in mangle
        srv = popen_pipe(netlab, t.server, ACCEPT_ONE, t.server_ip, "8080", "10",
                         stdin=subprocess.DEVNULL)
        assert readline(srv) == "ready"
        res = netlab.exec(t.client, [sys.executable, "-c", SEND_ONE, t.server_ip, "8080"],
                          timeout=15)
        assert res.stdout.strip() == "got HELLO", res.stdout + res.stderr
        peer = readline(srv).split()
        # the server saw the firewall's address and a port from the NAT range
        assert peer[0] == "peer" and peer[1] == fw_out, peer
        assert 50001 <= int(peer[2]) <= 65535
        # pfctl -ss: wire key first, the client's own address in parentheses
        states = ctl(netlab, t.fw, sock, "states").stdout
        assert re.search(rf"{fw_out}:{peer[2]} \({t.client_ip}:\d+\) -> {t.server_ip}:8080",
                         states), states
        js = json.loads(ctl(netlab, t.fw, sock, "states", "--json").stdout)
        out = [s for s in js if s["direction"] == "out" and s["key"]["port"][0] == 8080]
        assert out and out[0]["keys"][0]["addr"][1] == fw_out
        assert out[0]["keys"][1]["addr"][1] == t.client_ip
        # ICMP echo through the translation
        ping = netlab.exec(t.client, ["ping", "-c", "2", "-W", "2", "-i", "0.2", t.server_ip],
                           timeout=15, check=False)
        assert ping.returncode == 0, ping.stdout
        # a connection the rules do not allow is still blocked
        res = netlab.exec(t.server, [sys.executable, "-c", CONNECT, t.client_ip, "22", "1"],
                          timeout=15)
        assert res.stdout.strip().startswith("failed")
        info = json.loads(ctl(netlab, t.fw, sock, "info", "--json").stdout)
        assert info["dataplane"]["translated"] >= 4
    finally:
        rc = netlab.stop(daemon, signal.SIGTERM)
    assert rc == 0, (netlab.tmp / "daemon.log").read_text()
    sh(["ip", "netns", "exec", t.fw, *pfcluster_argv("daemon", "--uninstall", "--queue", "0")])
    left = sh(["ip", "netns", "exec", t.fw, "iptables-legacy", "-t", "mangle", "-S"]).stdout
    assert "PFCLUSTER" not in left


def test_rdr_to_and_reload_refusal(netlab: Netlab, tmp_path: Path) -> None:
    """rdr-to sends a connection to the firewall's address on to the server; a daemon
    started without translation refuses a reload that adds it (keeps the old rules)."""
    t = client_fw_server(netlab)
    rules = tmp_path / "pf.conf"
    rules.write_text(f"""\
block all
pass in on eth0 proto tcp to {t.client_ip.rsplit('.', 1)[0]}.1 port 9000 rdr-to {t.server_ip} port 8080
pass out on eth1 proto tcp
""")
    sock = str(tmp_path / "fw.sock")
    daemon = start_daemon(netlab, t.fw, rules, sock)
    try:
        srv = popen_pipe(netlab, t.server, ACCEPT_ONE, t.server_ip, "8080", "10",
                         stdin=subprocess.DEVNULL)
        assert readline(srv) == "ready"
        fw_in = t.client_ip.rsplit(".", 1)[0] + ".1"
        res = netlab.exec(t.client, [sys.executable, "-c", SEND_ONE, fw_in, "9000"],
                          timeout=15)
        assert res.stdout.strip() == "got HELLO", res.stdout + res.stderr
        peer = readline(srv).split()
        assert peer[1] == t.client_ip  # rdr-to keeps the source
    finally:
        netlab.stop(daemon, signal.SIGTERM)
    sh(["ip", "netns", "exec", t.fw, *pfcluster_argv("daemon", "--uninstall", "--queue", "0")])
    # a plain daemon refuses a reload that would translate
    rules.write_text("pass all\n")
    daemon = start_daemon(netlab, t.fw, rules, sock, log="plain.log")
    try:
        rules.write_text("pass in all\npass out on eth1 inet nat-to (eth1)\n")
        res = ctl(netlab, t.fw, sock, "reload")
        assert res.returncode != 0 and "PREROUTING" in (res.stdout + res.stderr)
        assert "nat-to" not in ctl(netlab, t.fw, sock, "rules").stdout
        time.sleep(0.1)
    finally:
        netlab.stop(daemon, signal.SIGTERM)
    sh(["ip", "netns", "exec", t.fw, *pfcluster_argv("daemon", "--uninstall", "--queue", "0")])
