"""Issue 13 (parts 1 and 2) in namespaces: the live daemon's /metrics scraped over HTTP and
compared with `ctl info --json`; its --pflog file read back with tcpdump and tshark, and
reopened on SIGHUP.

client — fw (A, --defer, --metrics, --pflog) — server, A's peer B on the sync link (also
--metrics). Every wait is bounded.
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nsfixtures import (
    CONNECT,
    Firewalled,
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

__all__ = ["netlab"]

pytestmark = [pytest.mark.root]

RULES = """\
set skip on lo
block log all
pass in log (all) proto tcp to port 5201
pass out proto tcp to port 5201
"""
METRICS = "127.0.0.1:9107"

# accepts connections on 5201 and reads each to its end, for `life` seconds
SINK = r"""
import socket, sys, threading, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5201))
s.listen(8)
s.settimeout(30)
print("ready", flush=True)
def drain(c):
    c.settimeout(10)
    try:
        while c.recv(65536):
            pass
    except OSError:
        pass
    c.close()
while True:
    try:
        c, _ = s.accept()
    except OSError:
        break
    threading.Thread(target=drain, args=(c,), daemon=True).start()
"""
# connects to 5201, sends argv[2] bytes, closes
SEND = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], 5201), timeout=5)
c.sendall(b"x" * int(sys.argv[2]))
c.shutdown(socket.SHUT_WR)
c.settimeout(5)
c.recv(1)
c.close()
print("sent")
"""
SCRAPE = r"""
import sys, urllib.request
with urllib.request.urlopen("http://%s/metrics" % sys.argv[1], timeout=10) as r:
    sys.stdout.write(r.read().decode())
"""


def scrape(lab: Netlab, ns: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    res = lab.exec(ns, [sys.executable, "-c", SCRAPE, METRICS], timeout=20)
    out = {}
    for fam in text_string_to_metric_families(res.stdout):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def ctl_info(lab: Netlab, ns: str, sock: str) -> dict[str, Any]:
    res = lab.exec(ns, pfcluster_argv("ctl", "--control", sock, "info", "--json"), timeout=20)
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def figures(info: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What each scraped sample must equal, read from `ctl info --json`."""
    pf, ps, dp = info["pf"], info["pfsync"], info["dataplane"]
    want = {
        ("pf_states", ()): info["states"],
        ("pf_state_inserts_total", ()): pf["states"]["inserts"],
        ("pf_state_removals_total", ()): pf["states"]["removals"],
        ("pfsync_packets_sent_total", ()): ps["opackets"],
        ("pfsync_packets_received_total", ()): ps["ipackets"],
        ("pfsync_sync_ok", ()): int(info["sync_ok"]),
        ("pfcluster_nfqueue_packets_total", (("verdict", "accept"),)):
            dp["passed"] + dp["released_pass"],
        ("pfcluster_nfqueue_packets_total", (("verdict", "drop"),)):
            dp["blocked"] + dp["released_drop"] + dp["errors"],
        ("pfsync_defer_seconds_count", ()): info["defer_seconds"]["count"],
        ("pfsync_deferred_packets", ()): info["deferred_packets"],
    }
    for reason, n in pf["counters"].items():
        want[("pf_counters_total", (("reason", reason),))] = n
    for word, action in (("passed", "pass"), ("blocked", "block")):
        for d in ("in", "out"):
            want[("pf_packets_total", (("action", action), ("direction", d)))] = \
                pf["packets"][f"{word}-{d}"]
    for cid, n in info["peers"]["states"].items():
        want[("pfsync_peer_states", (("creatorid", cid),))] = n
    return want


def assert_scrape_matches(lab: Netlab, ns: str, sock: str) -> dict[Any, float]:
    """Scraped between two `ctl info --json`: every figure lies between the two answers
    (they are equal on an idle firewall)."""
    before = figures(ctl_info(lab, ns, sock))
    got = scrape(lab, ns)
    after = figures(ctl_info(lab, ns, sock))
    for key, lo in before.items():
        hi = after.get(key, lo)
        assert key in got, f"{key} not scraped"
        assert min(lo, hi) <= got[key] <= max(lo, hi), (key, lo, got[key], hi)
    return got


def send(lab: Netlab, t: Firewalled, nbytes: int) -> None:
    res = lab.exec(t.client, [sys.executable, "-c", SEND, t.server_ip, str(nbytes)],
                   timeout=20, check=False)
    assert res.stdout.strip() == "sent", res.stdout + res.stderr


def blocked_connect(lab: Netlab, t: Firewalled, port: int) -> None:
    res = lab.exec(t.client, [sys.executable, "-c", CONNECT, t.server_ip, str(port), "1"],
                   timeout=15)
    assert res.stdout.startswith("failed"), res.stdout


def records(path: Path) -> list[tuple[int, int]]:
    data = path.read_bytes()
    out, off = [], 24
    while off + 16 <= len(data):
        caplen, wire = struct.unpack_from("<II", data, off + 8)
        out.append((caplen, wire))
        off += 16 + caplen
    return out


def test_metrics_and_pflog_live(netlab: Netlab, tmp_path: Path) -> None:
    t = client_fw_server(netlab)
    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    sock_a, sock_b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    pflog = tmp_path / "a.pflog"
    a = start_daemon(netlab, t.fw, rules, sock_a, "--defer", "--hostid", "0xa", "--metrics",
                     METRICS, "--pflog", str(pflog), log="a.log")
    b = start_daemon(netlab, t.syncpeer, rules, sock_b, "--hostid", "0xb", "--metrics",
                     METRICS, log="b.log")
    try:
        sink = popen_pipe(netlab, t.server, SINK, t.server_ip)
        assert readline(sink) == "ready"
        for _ in range(3):
            send(netlab, t, 3000)  # pass, logged (all); the SYN deferred until B acks
        blocked_connect(netlab, t, 22)  # block, logged
        assert wait_for(lambda: request(sock_b, "info")["data"]["states"] > 0, 3.0)

        got_a = assert_scrape_matches(netlab, t.fw, sock_a)
        assert got_a[("pf_state_inserts_total", ())] >= 6  # in and out, three connections
        assert got_a[("pf_packets_total", (("action", "block"), ("direction", "in")))] >= 1
        assert got_a[("pfsync_defer_seconds_count", ())] >= 3
        assert got_a[("pfcluster_pflog_packets_total", (("result", "written"),))] >= 10
        # B started after A: A answered its bulk request (A's own waits for its retries)
        assert wait_for(lambda: request(sock_b, "info")["data"]["sync_ok"], 5.0)
        got_b = assert_scrape_matches(netlab, t.syncpeer, sock_b)
        assert got_b[("pfsync_sync_ok", ())] == 1
        assert got_b[("pfsync_bulk_updates_total", (("result", "done"),))] == 1
        assert got_b[("pfsync_peer_states", (("creatorid", "0000000a"),))] >= 1
        age = got_b[("pfsync_peer_last_frame_seconds", (("creatorid", "0000000a"),))]
        assert 0 <= age < 30

        # the pflog file, as tcpdump and tshark read it
        recs = records(pflog)
        assert recs and any(cap < wire for cap, wire in recs), recs  # copy-range cut
        if shutil.which("tcpdump"):
            out = subprocess.run(["tcpdump", "-n", "-e", "-r", str(pflog)], text=True,
                                 capture_output=True, timeout=30, check=True).stdout
            assert f"rule 0/0(match): block in on eth0: {t.client_ip}." in out, out
            assert f"> {t.server_ip}.22: Flags [S]" in out, out
            assert f"rule 1/0(match): pass in on eth0: {t.client_ip}." in out, out
            assert f"rule 1/0(match): pass out on eth0: {t.server_ip}.5201 > " in out, out
        if shutil.which("tshark"):
            rows = subprocess.run(["tshark", "-r", str(pflog), "-T", "fields", "-e",
                                   "pflog.rulenr", "-e", "pflog.action", "-e", "pflog.dir",
                                   "-e", "pflog.ifname", "-e", "tcp.dstport"], text=True,
                                  capture_output=True, timeout=60, check=True).stdout
            seen = {tuple(r.split("\t")) for r in rows.splitlines()}
            assert ("0", "1", "1", "eth0", "22") in seen, seen
            assert ("1", "0", "1", "eth0", "5201") in seen, seen

        # logrotate's way: move the file, SIGHUP; the daemon starts a new one there
        pflog.rename(tmp_path / "a.pflog.old")
        a.send_signal(signal.SIGHUP)  # `ip netns exec` became the daemon: same pid
        assert wait_for(pflog.exists, 5.0)
        blocked_connect(netlab, t, 23)
        assert wait_for(lambda: len(records(pflog)) >= 1, 5.0)
        if shutil.which("tcpdump"):
            out = subprocess.run(["tcpdump", "-n", "-e", "-r", str(pflog)], text=True,
                                 capture_output=True, timeout=30, check=True).stdout
            assert ".23: Flags [S]" in out and ".22:" not in out, out
        sink.kill()
    finally:
        rc = (netlab.stop(a), netlab.stop(b))
    assert rc == (0, 0), (netlab.tmp / "a.log").read_text()
    log = (netlab.tmp / "a.log").read_text()
    assert "metrics: http://127.0.0.1:9107/metrics" in log


def test_workers_one_endpoint_summed(netlab: Netlab, tmp_path: Path) -> None:
    """--workers 2: the supervisor serves one /metrics with the workers' figures summed
    (as `ctl info` sums them); each worker writes its own pflog file, FILE.w<index>."""
    t = client_fw_server(netlab)
    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    sock = str(tmp_path / "fw.sock")
    pflog = tmp_path / "fw.pflog"
    fw = start_daemon(netlab, t.fw, rules, sock, "--workers", "2", "--hostid", "0x20",
                      "--metrics", METRICS, "--pflog", str(pflog), up_timeout=40)
    try:
        sink = popen_pipe(netlab, t.server, SINK, t.server_ip)
        assert readline(sink) == "ready"
        for _ in range(4):
            send(netlab, t, 2000)
        blocked_connect(netlab, t, 22)
        got = assert_scrape_matches(netlab, t.fw, sock)
        assert got[("pfcluster_nfqueue_packets_total", (("verdict", "accept"),))] >= 20
        workers = ctl_info(netlab, t.fw, sock)["workers"]
        assert len(workers) == 2
        verdicts = got[("pfcluster_nfqueue_packets_total", (("verdict", "accept"),))] + \
            got[("pfcluster_nfqueue_packets_total", (("verdict", "drop"),))]
        assert 0 < verdicts <= sum(w["packets"] for w in workers)  # scraped first
        files = [Path(f"{pflog}.w{i}") for i in range(2)]
        assert all(f.exists() for f in files) and not pflog.exists()
        # (link-local IPv6 the rules block may be logged after the scrape)
        assert sum(len(records(f)) for f in files) >= \
            got[("pfcluster_pflog_packets_total", (("result", "written"),))] >= 20
        sink.kill()
    finally:
        rc = netlab.stop(fw)
    assert rc == 0
