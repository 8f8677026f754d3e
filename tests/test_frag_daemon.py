"""Fragment reassembly on the daemon path with real Linux traffic (namespaces, root): a
4000-byte UDP datagram (three fragments at MTU 1500) to the one port the rules pass
arrives whole at the server, one to another port does not; with `set reassemble no` the
passed port's datagram is lost too (its later fragments carry no port), which shows the
kernel did not reassemble in front of the queue."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from nsfixtures import Netlab, client_fw_server, netlab, popen_pipe, readline, start_daemon

pytestmark = [pytest.mark.root]  # network namespaces, iptables, NFQUEUE
__all__ = ["netlab"]

RULES = """\
set skip on lo
block all
pass in proto udp to port 5300
pass out proto udp to port 5300
"""

# The server: prints "got PORT SIZE" for each datagram within 3 s, then "done".
SERVER = r"""
import select, socket, sys, time
socks = []
for port in (5300, 5301):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], port))
    socks.append(s)
print("ready", flush=True)
end = time.monotonic() + 3
while (left := end - time.monotonic()) > 0:
    for s in select.select(socks, [], [], left)[0]:
        data = s.recv(65535)
        print("got", s.getsockname()[1], len(data), flush=True)
print("done", flush=True)
"""

CLIENT = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in (5300, 5301):
    u.sendto(b"x" * 4000, (sys.argv[1], port))
print("sent", flush=True)
"""


def received(netlab: Netlab, tmp_path: Path, rules_text: str) -> list[str]:
    t = client_fw_server(netlab)
    rules = tmp_path / "pf.conf"
    rules.write_text(rules_text)
    sock = str(tmp_path / "fw.sock")
    daemon = start_daemon(netlab, t.fw, rules, sock, "--copy-range", "256")
    try:
        srv = popen_pipe(netlab, t.server, SERVER, t.server_ip)
        assert readline(srv) == "ready"
        res = netlab.exec(t.client, [sys.executable, "-c", CLIENT, t.server_ip], timeout=15)
        assert res.stdout.split()[-1:] == ["sent"], res.stdout + res.stderr
        lines = []
        while (line := readline(srv)) != "done":
            lines.append(line)
    finally:
        rc = netlab.stop(daemon, signal.SIGTERM)
    assert rc == 0, (netlab.tmp / "daemon.log").read_text()
    return lines


def test_fragmented_udp_datagram_passes_whole_by_port(netlab: Netlab, tmp_path: Path) -> None:
    assert received(netlab, tmp_path, RULES) == ["got 5300 4000"]


def test_without_reassembly_the_datagram_is_lost(netlab: Netlab, tmp_path: Path) -> None:
    assert received(netlab, tmp_path, "set reassemble no\n" + RULES) == []
