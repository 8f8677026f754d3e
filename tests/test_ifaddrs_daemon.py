"""Issue 15: the daemon follows an interface's addresses at run time (netlink), in netns.

`pass in on eth0 proto tcp to (eth0)`: an address the firewall holds on another interface
is blocked; once it moves to eth0 (`ip addr add`), connections to it pass without a
reload. With no listener a passed SYN gets the kernel's RST ("refused"), a blocked one
times out ("failed").
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nsfixtures import (
    CLIENT_NET,
    CONNECT,
    Netlab,
    client_fw_server,
    netlab,
    sh,
    start_daemon,
    wait_for,
)
from pfcluster.io.control import request

__all__ = ["netlab"]

pytestmark = [pytest.mark.root]  # network namespaces, iptables, NFQUEUE

RULES = """\
set skip on lo
block all
pass in on eth0 proto tcp to (eth0) port 7000
pass out all
"""
MOVED = f"{CLIENT_NET}.7"


def test_daemon_follows_an_address_added_at_run_time(netlab: Netlab, tmp_path: Path) -> None:
    t = client_fw_server(netlab)
    # the firewall answers for MOVED from the start (on lo), so only the rules decide
    sh(["ip", "-n", t.fw, "addr", "add", f"{MOVED}/32", "dev", "lo"])
    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    sock = str(tmp_path / "fw.sock")
    daemon = start_daemon(netlab, t.fw, rules, sock)

    def connect(dst: str) -> str:
        return netlab.exec(t.client, [sys.executable, "-c", CONNECT, dst, "7000", "1.0"],
                           timeout=15).stdout.strip()
    try:
        assert connect(f"{CLIENT_NET}.1") == "refused"  # eth0's address: passed
        assert connect(MOVED).startswith("failed")  # not eth0's: blocked
        sh(["ip", "-n", t.fw, "addr", "del", f"{MOVED}/32", "dev", "lo"])
        sh(["ip", "-n", t.fw, "addr", "add", f"{MOVED}/24", "dev", "eth0"])
        assert wait_for(lambda: connect(MOVED) == "refused", 10), "the new address stayed blocked"
        sh(["ip", "-n", t.fw, "addr", "del", f"{MOVED}/24", "dev", "eth0"])
        sh(["ip", "-n", t.fw, "addr", "add", f"{MOVED}/32", "dev", "lo"])
        assert wait_for(lambda: connect(MOVED).startswith("failed"), 10)
        assert request(sock, "info")["ok"]
    finally:
        netlab.stop(daemon)
    log = (netlab.tmp / "daemon.log").read_text()
    assert "interface addresses changed" in log
