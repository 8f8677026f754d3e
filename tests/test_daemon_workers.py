"""`pfcluster daemon --workers N`: one firewall in N processes, in real namespaces.

What must hold: the kernel spreads flows over the workers' queues; every worker holds the
whole table (its siblings' states too); ctl shows one firewall; a state killed through
the supervisor is gone in every worker; a worker killed with SIGKILL is started again and
gets its table back; stopping leaves the host closed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nsfixtures import (
    CLIENT_NET,
    PASS_5201,
    Netlab,
    client_fw_server,
    netlab,
    pfcluster_argv,
    popen_pipe,
    readline,
    start_daemon,
    wait_for,
)
from pfcluster.io.control import request
from pfcluster.io.iptables import list_rules

__all__ = ["netlab"]

pytestmark = [pytest.mark.root]  # network namespaces, iptables, NFQUEUE, raw sockets

RULES = PASS_5201

ECHO = r"""
import selectors, socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5201))
s.listen(64)
s.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    for key, _ in sel.select(0.5):
        if key.fileobj is s:
            c, _ = s.accept()
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ)
            continue
        try:
            d = key.fileobj.recv(4096)
        except OSError:
            d = b""
        if not d:
            sel.unregister(key.fileobj)
            key.fileobj.close()
        else:
            key.fileobj.sendall(d)
"""

# One connection from each source address; on each stdin line, one byte through every
# connection: prints how many echoed and the source ports, so the test can find states.
HOLDERS = r"""
import socket, sys
server, addrs = sys.argv[1], sys.argv[2:]
conns = []
for a in addrs:
    c = socket.create_connection((server, 5201), timeout=5, source_address=(a, 0))
    c.settimeout(2.0)
    conns.append(c)
print("up", " ".join(str(c.getsockname()[1]) for c in conns), flush=True)
for line in sys.stdin:
    ok = 0
    for c in conns:
        try:
            c.sendall(b"p")
            ok += c.recv(1) == b"p"
        except OSError:
            pass
    print("ok", ok, flush=True)
"""

NFLOWS = 16  # P(all on one of 2 queues) = 2 / 2**16


def _two_workers(lab: Netlab, tmp_path: Path, hostid: str
                 ) -> tuple[object, list[str], str, subprocess.Popen[bytes]]:
    """The namespaces and a `--workers 2` firewall (its control socket answers)."""
    t, addrs, rules, sock = _setup(lab, tmp_path)
    daemon = start_daemon(lab, t.fw, rules, sock, "--workers", "2",  # type: ignore[attr-defined]
                          "--hostid", hostid, up_timeout=40)
    return t, addrs, sock, daemon


def _setup(lab: Netlab, tmp_path: Path) -> tuple[object, list[str], Path, str]:
    t = client_fw_server(lab)
    addrs = [f"{CLIENT_NET}.{10 + i}" for i in range(NFLOWS)]
    for a in addrs:
        lab.exec(t.client, ["ip", "addr", "add", f"{a}/24", "dev", "eth0"])
    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    return t, addrs, rules, str(tmp_path / "fw.sock")


def _ping(holders: object) -> int:
    proc = holders
    proc.stdin.write("p\n")  # type: ignore[attr-defined]
    proc.stdin.flush()  # type: ignore[attr-defined]
    line = readline(proc, 20)  # type: ignore[arg-type]
    assert line.startswith("ok "), line
    return int(line.split()[1])


def _states(sock: str) -> list[dict]:  # type: ignore[type-arg]
    resp = request(sock, "states", timeout=10)
    assert resp["ok"], resp
    return list(resp["data"])


def _bound_queues(lab: Netlab, ns: str) -> set[int]:
    text = lab.exec(ns, ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout
    return {int(line.split()[0]) for line in text.splitlines() if line.strip()}


def test_two_workers_one_firewall(netlab: Netlab, tmp_path: Path) -> None:
    t, addrs, sock, daemon = _two_workers(netlab, tmp_path, "0x100")
    fw = t.fw  # type: ignore[attr-defined]
    try:
        rules_now = list_rules(netlab.prefix_argv(fw))
        assert any("--queue-balance 0:1" in line for line in rules_now), rules_now
        assert _bound_queues(netlab, fw) == {0, 1}
        srv = popen_pipe(netlab, t.server, ECHO, t.server_ip)  # type: ignore[attr-defined]
        assert readline(srv) == "ready"
        holders = popen_pipe(netlab, t.client, HOLDERS, t.server_ip,  # type: ignore[attr-defined]
                             *addrs)
        line = readline(holders, 20)
        assert line.startswith("up "), line
        ports = [int(p) for p in line.split()[1:]]
        assert _ping(holders) == NFLOWS

        # the kernel spread the flows over both workers
        info = request(sock, "info", timeout=20)
        assert info["ok"], info
        workers = info["data"]["workers"]
        assert [w["queue"] for w in workers] == [0, 1]
        assert all(w["packets"] > 0 for w in workers), workers
        assert info["data"]["dataplane"]["packets"] == sum(w["packets"] for w in workers)
        assert {w["hostid"] for w in workers} == {"00000100", "00000101"}
        assert "workers" in info["text"]

        # every worker holds the whole table: 2 states per flow, created by both workers
        def whole(path: str) -> bool:
            mine = [s for s in _states(path) if set(s["key"]["port"]) & set(ports)]
            return len(mine) == 2 * NFLOWS

        for path in (sock, sock + ".w0", sock + ".w1"):
            assert wait_for(lambda p=path: whole(p), 5.0), path  # type: ignore[misc]
        creators = {s["creatorid"] for s in _states(sock)}
        assert creators == {"00000100", "00000101"}, creators

        # kill through the supervisor a state worker 1 created: gone in worker 1 too
        victim = next(s for s in _states(sock) if s["creatorid"] == "00000101"
                      and s["direction"] == "in" and set(s["key"]["port"]) & set(ports))
        killed = request(sock, "kill", id=victim["id"], timeout=10)
        assert killed["ok"] and killed["data"]["killed"] == 1, killed
        assert wait_for(lambda: all(s["id"] != victim["id"]
                                    for s in _states(sock + ".w1")), 3.0)
        assert _ping(holders) == NFLOWS - 1  # that flow is blocked now, the others pass
        holders.kill()
        srv.kill()
    finally:
        rc = netlab.stop(daemon, signal.SIGTERM, grace=20)
    assert rc == 0, (netlab.tmp / "daemon.log").read_text()
    # fail closed: the balanced rule stays, without bypass, until --uninstall
    left = list_rules(netlab.prefix_argv(fw))
    queued = [line for line in left if "NFQUEUE" in line]
    assert len(queued) == 2 and not any("bypass" in line for line in queued), left
    assert _bound_queues(netlab, fw) == set()
    out = netlab.exec(fw, pfcluster_argv("daemon", "--uninstall", "--queue", "0",
                                         "--workers", "2"), timeout=30)
    assert "removed chain PFCLUSTER-0" in out.stdout
    assert list_rules(netlab.prefix_argv(fw)) == []


def test_killed_worker_restarts_with_its_table(netlab: Netlab, tmp_path: Path) -> None:
    t, addrs, sock, daemon = _two_workers(netlab, tmp_path, "0x200")
    try:
        srv = popen_pipe(netlab, t.server, ECHO, t.server_ip)  # type: ignore[attr-defined]
        assert readline(srv) == "ready"
        holders = popen_pipe(netlab, t.client, HOLDERS, t.server_ip,  # type: ignore[attr-defined]
                             *addrs)
        assert readline(holders, 20).startswith("up ")
        assert _ping(holders) == NFLOWS
        before = request(sock, "info", timeout=20)["data"]["workers"]
        pid1 = before[1]["pid"]
        os.kill(pid1, signal.SIGKILL)

        def back() -> bool:
            ws = request(sock, "info", timeout=5)["data"]["workers"]
            return bool(ws[1]["pid"] != pid1 and ws[1]["sync_ok"] and ws[1]["restarts"] == 1)

        assert wait_for(back, 30.0, interval=0.2), request(sock, "info")
        # the new worker 1 has the whole table back (from its sibling's bulk update), so
        # every established flow still passes, none is blocked as a stray mid-stream packet
        time.sleep(0.5)
        assert _ping(holders) == NFLOWS
        w1 = request(sock + ".w1", "info", timeout=10)["data"]
        assert w1["pfsync"]["bulk_done"] >= 1 or w1["pfsync"]["upd_received"] > 0, w1
        assert w1["pf"]["counters"]["state-mismatch"] == 0
        holders.kill()
        srv.kill()
    finally:
        rc = netlab.stop(daemon, signal.SIGTERM, grace=20)
    log = (netlab.tmp / "daemon.log").read_text()
    assert rc == 0, log
    assert "worker 1 exited with status -9" in log, log[-2000:]
