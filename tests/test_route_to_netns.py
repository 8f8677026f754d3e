"""route-to on the daemon path with real Linux traffic (namespaces, root): a firewall
with two uplinks to one server; `pass in on eth0 route-to (eth2 GW2)` for port 5201
sends that connection out of the second uplink (eth2) although the main table routes
the server's network via eth1, while a connection to port 5202 (no route-to) takes
eth1. Counted on the firewall's links (tx packets, `ip -s link`). At exit the daemon's
ip rule and table are gone."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from nsfixtures import Netlab, netlab, popen_pipe, readline, sh, start_daemon

pytestmark = [pytest.mark.root]  # network namespaces, iptables, NFQUEUE, ip rule
__all__ = ["netlab"]

SERVER = "203.0.113.2"
GW2 = "198.51.100.130"  # the server's address on the second uplink
RULES = f"""\
set skip on lo
block all
pass in on eth0 proto tcp to port 5201 route-to (eth2 {GW2})
pass in on eth0 proto tcp to port 5202
pass out on {{ eth1 eth2 }} proto tcp
"""

SINK = r"""
import socket, sys, threading
def serve(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], port))
    s.listen(4)
    while True:
        c, _ = s.accept()
        n = 0
        while True:
            b = c.recv(65536)
            if not b:
                break
            n += len(b)
        c.sendall(b"ok")
        c.close()
        print("got", port, n, flush=True)
for p in (5201, 5202):
    threading.Thread(target=serve, args=(p,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

SEND = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
c.sendall(b"x" * 200000)
c.shutdown(socket.SHUT_WR)
print(c.recv(2).decode(), flush=True)
"""


def send_and_count(lab: Netlab, client: str, sink: subprocess.Popen[str],
                   count: Callable[[], tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """200 kB to ports 5201 and 5202 in turn; what `count` (two link counters) moved
    for each. Closes the sink's stdin."""
    counts = {}
    for port in (5201, 5202):
        before = count()
        res = lab.exec(client, [sys.executable, "-c", SEND, SERVER, str(port)], timeout=15)
        assert res.stdout.strip() == "ok", res.stdout + res.stderr
        assert readline(sink) == f"got {port} 200000"
        after = count()
        counts[port] = (after[0] - before[0], after[1] - before[1])
    assert sink.stdin is not None
    sink.stdin.close()
    return counts


def tx_packets(lab: Netlab, ns: str, ifname: str) -> int:
    out = sh(["ip", "-n", ns, "-s", "-j", "link", "show", ifname]).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["packets"])


def test_route_to_takes_the_second_uplink(netlab: Netlab, tmp_path: Path) -> None:
    c = netlab.add_ns("c")
    fw = netlab.add_ns("fw", forward=True)
    s = netlab.add_ns("s")
    p = netlab.add_ns("p")
    # offloads off: each segment is one packet on the counters
    netlab.veth(c, "eth0", fw, "eth0", "198.51.100.2/25", "198.51.100.1/25", offloads_off=True)
    netlab.veth(fw, "eth1", s, "eth0", "203.0.113.1/24", f"{SERVER}/24", offloads_off=True)
    netlab.veth(fw, "eth2", s, "eth1", "198.51.100.129/25", f"{GW2}/25", offloads_off=True)
    netlab.veth(fw, "sync0", p, "sync0", "192.0.2.1/24", "192.0.2.2/24")
    netlab.route(c, "default", "198.51.100.1")
    netlab.route(s, "default", "203.0.113.1")  # replies always come back via eth1
    for ns in (s, fw):  # a packet may come in on the other uplink than its reply leaves
        netlab.exec(ns, ["sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=0",
                         "net.ipv4.conf.default.rp_filter=0"])
    netlab.exec(s, ["sysctl", "-q", "-w", "net.ipv4.conf.eth1.rp_filter=0"])
    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    sock = str(tmp_path / "fw.sock")
    daemon = start_daemon(netlab, fw, rules, sock)
    try:
        ip_rules = sh(["ip", "-n", fw, "rule", "show"]).stdout
        assert "fwmark 0x100/0x1ff" in ip_rules, ip_rules
        sink = popen_pipe(netlab, s, SINK, SERVER)
        assert readline(sink) == "ready"
        counts = send_and_count(netlab, c, sink, lambda: (
            tx_packets(netlab, fw, "eth1"), tx_packets(netlab, fw, "eth2")))
    finally:
        rc = netlab.stop(daemon, signal.SIGTERM)
    log = (netlab.tmp / "daemon.log").read_text()
    assert rc == 0, log
    # 200 kB is about 140 segments at MTU 1500; a few others (IPv6 router solicitations,
    # ARP) may leave either link meanwhile
    via1, via2 = counts[5201]
    assert via2 >= 100 and via1 <= 10, (counts, log)
    via1, via2 = counts[5202]
    assert via1 >= 100 and via2 <= 10, (counts, log)
    after_exit = sh(["ip", "-n", fw, "rule", "show"]).stdout
    assert "fwmark" not in after_exit, after_exit
    routes = subprocess.run(["ip", "-n", fw, "route", "show", "table", str(0x7100)],
                            capture_output=True, text=True, check=False)
    assert routes.stdout.strip() == "", routes.stdout
