"""dup-to on the daemon path with real Linux traffic (namespaces, root): a firewall
between a client and a server, with a third link (eth2) to a listener (namespace d).
`pass in on eth0 proto tcp to port 5201 dup-to (eth2 GWD)`: the connection reaches the
server whole AND copies of its client-to-server packets arrive at the listener (counted
on d's link, rx packets); a connection to port 5202 (no dup-to) sends it nothing. The
copies are TEE'd by the daemon's FORWARD chain for packets its PREROUTING verdict marked
(io/iptables.py)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from nsfixtures import Netlab, netlab, popen_pipe, readline, sh, start_daemon
from test_route_to_netns import SINK, send_and_count  # the same sink, sender, counts

pytestmark = [pytest.mark.root]  # network namespaces, iptables, NFQUEUE, TEE
__all__ = ["netlab"]

SERVER = "203.0.113.2"
GWD = "198.51.100.130"  # the listener's address behind eth2
RULES = f"""\
set skip on lo
block all
pass in on eth0 proto tcp to port 5201 dup-to (eth2 {GWD})
pass in on eth0 proto tcp to port 5202
pass out on {{ eth1 eth2 }} proto tcp
"""

def link_packets(ns: str, ifname: str, way: str) -> int:
    out = sh(["ip", "-n", ns, "-s", "-j", "link", "show", ifname]).stdout
    return int(json.loads(out)[0]["stats64"][way]["packets"])


def test_dup_to_copies_the_flow_to_the_listener(netlab: Netlab, tmp_path: Path) -> None:
    c = netlab.add_ns("c")
    fw = netlab.add_ns("fw", forward=True)
    s = netlab.add_ns("s")
    d = netlab.add_ns("d")
    p = netlab.add_ns("p")
    # offloads off: each segment is one packet on the counters
    netlab.veth(c, "eth0", fw, "eth0", "198.51.100.2/25", "198.51.100.1/25", offloads_off=True)
    netlab.veth(fw, "eth1", s, "eth0", "203.0.113.1/24", f"{SERVER}/24", offloads_off=True)
    netlab.veth(fw, "eth2", d, "eth0", "198.51.100.129/25", f"{GWD}/25", offloads_off=True)
    netlab.veth(fw, "sync0", p, "sync0", "192.0.2.1/24", "192.0.2.2/24")
    netlab.route(c, "default", "198.51.100.1")
    netlab.route(s, "default", "203.0.113.1")
    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    sock = str(tmp_path / "fw.sock")
    daemon = start_daemon(netlab, fw, rules, sock)
    try:
        mangle = sh(["ip", "netns", "exec", fw, "iptables-legacy", "-t", "mangle", "-S"]).stdout
        assert f"-j TEE --gateway {GWD} --oif eth2" in mangle, mangle
        sink = popen_pipe(netlab, s, SINK, SERVER)
        assert readline(sink) == "ready"
        counts = send_and_count(netlab, c, sink, lambda: (
            link_packets(s, "eth0", "rx"), link_packets(d, "eth0", "rx")))
    finally:
        rc = netlab.stop(daemon, signal.SIGTERM)
    log = (netlab.tmp / "daemon.log").read_text()
    assert rc == 0, log
    # 200 kB is about 140 segments at MTU 1500: the server gets them all, the listener a
    # copy of each (a few others, ARP and IPv6 solicitations, may cross either link)
    to_s, to_d = counts[5201]
    assert to_s >= 100 and to_d >= to_s - 10, (counts, log)
    to_s, to_d = counts[5202]
    assert to_s >= 100 and to_d <= 10, (counts, log)
    print("dup-to counts (server rx, listener rx):", counts)
