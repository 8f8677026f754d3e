"""Scrub on the daemon path with real Linux traffic (namespaces, root): `match out on eth1
scrub (max-mss 1200, no-df, min-ttl 10)` rewrites what leaves towards the server. The
server's own capture (tcpdump in its namespace, read back with scapy) shows the client's
SYN with MSS 1200 instead of 1460 and a UDP datagram without DF and with TTL raised to 10;
the accepted socket's TCP_MAXSEG shows the kernel took the clamped MSS (and the client's,
since the SYN/ACK belongs to the same state)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nsfixtures import (
    Netlab,
    client_fw_server,
    netlab,
    popen_pipe,
    readline,
    start_daemon,
    wait_for,
)

pytestmark = [pytest.mark.root]  # network namespaces, iptables, NFQUEUE
__all__ = ["netlab"]

RULES = """\
set skip on lo
match out on eth1 scrub (max-mss 1200, no-df, min-ttl 10)
block all
pass in proto tcp to port 5201
pass out proto tcp to port 5201
pass in proto udp to port 5300
pass out proto udp to port 5300
"""

# The server: accepts one connection and prints the MSS its socket uses (TCP_MAXSEG).
ACCEPT_MSS = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5201))
s.listen(4)
s.settimeout(10)
print("ready", flush=True)
try:
    c, _ = s.accept()
    print("maxseg", c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), flush=True)
    c.close()
except OSError as e:
    print("failed", type(e).__name__, flush=True)
"""

# The client: a TCP connect (its own MSS printed) and one UDP datagram with DF and TTL 3.
CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], 5201), timeout=5)
print("maxseg", c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), flush=True)
c.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER, IP_PMTUDISC_DO (Linux)
u.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 3)
u.sendto(b"x" * 32, (sys.argv[1], 5300))
print("sent", flush=True)
"""


def test_max_mss_no_df_min_ttl_on_the_wire(netlab: Netlab, tmp_path: Path) -> None:
    from scapy.all import IP, TCP, UDP, rdpcap

    t = client_fw_server(netlab)
    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    sock = str(tmp_path / "fw.sock")
    daemon = start_daemon(netlab, t.fw, rules, sock)
    pcap = tmp_path / "server.pcap"
    try:
        dump = netlab.spawn(t.server, ["timeout", "15", "tcpdump", "-n", "-U", "-i", "eth0",
                                       "-c", "2", "-w", str(pcap),
                                       "(tcp[tcpflags] & tcp-syn != 0 and tcp dst port 5201)"
                                       " or udp dst port 5300"], log="tcpdump.log")
        # tcpdump says "listening on" once its socket is open
        assert wait_for(lambda: b"listening on" in (tmp_path / "tcpdump.log").read_bytes(),
                        10), (tmp_path / "tcpdump.log").read_text()
        srv = popen_pipe(netlab, t.server, ACCEPT_MSS, t.server_ip, stdin=subprocess.DEVNULL)
        assert readline(srv) == "ready"
        res = netlab.exec(t.client, [sys.executable, "-c", CLIENT, t.server_ip], timeout=15)
        assert res.stdout.split()[-1:] == ["sent"], res.stdout + res.stderr
        client_mss = int(res.stdout.split()[1])
        server_seen = readline(srv).split()
        assert server_seen[0] == "maxseg", server_seen
        dump.wait(timeout=15)
        pkts = rdpcap(str(pcap))
    finally:
        rc = netlab.stop(daemon, signal.SIGTERM)
    assert rc == 0, (netlab.tmp / "daemon.log").read_text()
    syns = [p for p in pkts if TCP in p and p[TCP].dport == 5201]
    udps = [p for p in pkts if UDP in p and p[UDP].dport == 5300]
    assert len(syns) == 1 and len(udps) == 1, [p.summary() for p in pkts]
    syn = syns[0]
    assert dict(syn[TCP].options)["MSS"] == 1200  # the client sent 1460 (MTU 1500)
    # checksums still right after the rewrite: scapy recomputes them and compares
    fresh = IP(bytes(syn[IP]))
    del fresh[IP].chksum, fresh[TCP].chksum
    fresh = IP(bytes(fresh))
    assert (fresh[IP].chksum, fresh[TCP].chksum) == (syn[IP].chksum, syn[TCP].chksum)
    # the server's kernel took it: its MSS is 1200 less the TCP options it carries
    assert 1150 <= int(server_seen[1]) <= 1200, server_seen
    # the SYN/ACK (in on eth1) belongs to the same state, whose max-mss pf applies to every
    # packet of it (pf_test scrubs with the state's options): the client is clamped too
    assert 1150 <= client_mss <= 1200, client_mss
    udp = udps[0]
    assert not udp[IP].flags.DF  # the client set DF (IP_PMTUDISC_DO)
    assert udp[IP].ttl == 10  # sent with 3, 2 after forwarding, raised to min-ttl 10
    fresh = IP(bytes(udp[IP]))
    del fresh[IP].chksum
    assert IP(bytes(fresh))[IP].chksum == udp[IP].chksum
