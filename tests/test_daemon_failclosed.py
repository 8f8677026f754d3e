"""Issue 9: the daemon fails closed. A stopped (SIGTERM) or killed (SIGKILL) daemon
leaves its NFQUEUE rule in place without --queue-bypass, so the host drops what the
rules would have filtered; a restarted daemon takes the queue over and filters again;
an established transfer survives a restart because the states come back from the peer
by bulk update; `--fail-open` keeps the old open-on-exit behaviour only when asked;
`--uninstall` removes the rules for good; a second daemon on a busy queue (and the
other bad inputs of the daemon) prints one line, exits non-zero and leaves the first
daemon's rules and filtering alone.

Namespaces and addresses from nsfixtures (DESIGN.md's TEST-NET ranges); every
subprocess, poll and transfer is bounded in time and size.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

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
from pfcluster.io.iptables import list_rules

__all__ = ["netlab"]

pytestmark = [pytest.mark.root]

PORT_A = 5201  # passed by the rules
PORT_B = 5202  # blocked by the rules (block all)

RULES = f"""\
set skip on lo
block all
pass in proto tcp to port {PORT_A}
pass out proto tcp to port {PORT_A}
"""

# Accepts (and closes) connections on every port given, for `life` seconds.
LISTEN = r"""
import selectors, socket, sys, time
host, life, ports = sys.argv[1], float(sys.argv[2]), [int(p) for p in sys.argv[3:]]
sel = selectors.DefaultSelector()
for port in ports:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(64)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
deadline = time.monotonic() + life
while time.monotonic() < deadline:
    for key, _ in sel.select(0.2):
        c, _ = key.fileobj.accept()
        c.close()
"""

# Server side of the transfer: paced (so a restart lands in the middle), deterministic
# bytes, the SHA-256 of what was sent printed at the end.
SENDER = r"""
import hashlib, json, random, socket, sys, time
host, port, total, chunk, pause, life = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                         int(sys.argv[4]), float(sys.argv[5]),
                                         float(sys.argv[6]))
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(1)
s.settimeout(life)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(life)
rnd = random.Random(9)
h = hashlib.sha256()
sent = 0
while sent < total:
    data = rnd.randbytes(min(chunk, total - sent))
    c.sendall(data)
    h.update(data)
    sent += len(data)
    time.sleep(pause)
c.shutdown(socket.SHUT_WR)
c.recv(1)  # the client's close
print(json.dumps({"sent": sent, "sha256": h.hexdigest()}), flush=True)
"""

RECEIVER = r"""
import hashlib, json, socket, sys, time
host, port, life, mark = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
c = socket.create_connection((host, port), timeout=5)
c.settimeout(life)
print("connected", c.getsockname()[1], flush=True)
h = hashlib.sha256()
got = 0
told = False
t0 = time.monotonic()
gaps = []
last = t0
while True:
    try:
        d = c.recv(65536)
    except OSError as e:
        print(json.dumps({"error": repr(e), "received": got}), flush=True)
        sys.exit(1)
    now = time.monotonic()
    gaps.append(now - last)
    last = now
    if not d:
        break
    h.update(d)
    got += len(d)
    if not told and got >= mark:
        told = True
        print("progress", got, flush=True)
c.close()
print(json.dumps({"received": got, "sha256": h.hexdigest(), "seconds": round(last - t0, 3),
                  "longest_gap": round(max(gaps), 3)}), flush=True)
"""


# --- helpers ----------------------------------------------------------------------








def listen(lab: Netlab, t: Firewalled, *ports: int, life: float = 120.0) -> None:
    srv = popen_pipe(lab, t.server, LISTEN, t.server_ip, str(life), *map(str, ports))
    assert readline(srv) == "ready"


def connect(lab: Netlab, t: Firewalled, port: int, timeout: float = 1.0) -> str:
    return lab.exec(t.client, [sys.executable, "-c", CONNECT, t.server_ip, str(port),
                               str(timeout)], timeout=timeout + 10).stdout.strip()


def verdicts(lab: Netlab, t: Firewalled) -> tuple[str, str]:
    """(port A, port B) as seen from the client: "pass" or "block"."""
    def one(port: int) -> str:
        out = connect(lab, t, port)
        assert out == "connected" or out.startswith("failed"), out
        return "pass" if out == "connected" else "block"

    return one(PORT_A), one(PORT_B)


def queue_rules(lab: Netlab, ns: str) -> list[str]:
    return [line for line in list_rules(lab.prefix_argv(ns)) if "NFQUEUE" in line]


def log_of(lab: Netlab, name: str) -> str:
    path = lab.tmp / name
    return path.read_text() if path.exists() else ""


# --- 1. blocked before, while stopped (SIGTERM, SIGKILL), after restart ---------------


def test_stopped_daemon_fails_closed(netlab: Netlab, tmp_path: Path) -> None:
    t = client_fw_server(netlab)
    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    sock = str(tmp_path / "fw.sock")
    listen(netlab, t, PORT_A, PORT_B)

    d1 = start_daemon(netlab, t.fw, rules, sock, log="d1.log")
    assert verdicts(netlab, t) == ("pass", "block")
    installed = list_rules(netlab.prefix_argv(t.fw))
    queued = queue_rules(netlab, t.fw)
    assert len(queued) == 2 and not any("--queue-bypass" in q for q in queued), queued

    # SIGTERM: a clean exit, the rules stay as they were, and the host is closed
    assert netlab.stop(d1, signal.SIGTERM) == 0, log_of(netlab, "d1.log")
    assert "stays (fail-closed)" in log_of(netlab, "d1.log")
    assert list_rules(netlab.prefix_argv(t.fw)) == installed
    assert verdicts(netlab, t) == ("block", "block")

    # restart: filtering again, over the same rules (rewritten, not duplicated)
    d2 = start_daemon(netlab, t.fw, rules, sock, log="d2.log")
    assert verdicts(netlab, t) == ("pass", "block")
    assert list_rules(netlab.prefix_argv(t.fw)) == installed

    # SIGKILL (a crash no handler sees): closed as well
    netlab.stop(d2, signal.SIGKILL)
    assert d2.returncode is not None and d2.returncode != 0
    assert list_rules(netlab.prefix_argv(t.fw)) == installed
    assert verdicts(netlab, t) == ("block", "block")

    # restart after the crash (stale control socket and all)
    d3 = start_daemon(netlab, t.fw, rules, sock, log="d3.log")
    assert verdicts(netlab, t) == ("pass", "block")
    assert list_rules(netlab.prefix_argv(t.fw)) == installed
    assert netlab.stop(d3, signal.SIGTERM) == 0, log_of(netlab, "d3.log")
    assert verdicts(netlab, t) == ("block", "block")

    # removing the rules for good is an explicit command, and it says what it removed
    out = netlab.exec(t.fw, pfcluster_argv("daemon", "--uninstall", "--queue", "0"),
                      timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert "PFCLUSTER-0" in out.stdout and "NFQUEUE --queue-num 0" in out.stdout
    assert list_rules(netlab.prefix_argv(t.fw)) == []
    assert verdicts(netlab, t) == ("pass", "pass")  # no daemon, no rules: open, as asked
    again = netlab.exec(t.fw, pfcluster_argv("daemon", "--uninstall", "--queue", "0"),
                        timeout=30, check=False)
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_fail_open_is_explicit(netlab: Netlab, tmp_path: Path) -> None:
    t = client_fw_server(netlab)
    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    sock = str(tmp_path / "fw.sock")
    listen(netlab, t, PORT_A, PORT_B)
    d = start_daemon(netlab, t.fw, rules, sock, "--fail-open", log="open.log")
    assert verdicts(netlab, t) == ("pass", "block")
    queued = queue_rules(netlab, t.fw)
    assert len(queued) == 2 and all(q.endswith("--queue-bypass") for q in queued), queued
    # documented behaviour of --fail-open: on exit the rules go and everything passes
    assert netlab.stop(d, signal.SIGTERM) == 0, log_of(netlab, "open.log")
    assert list_rules(netlab.prefix_argv(t.fw)) == []
    assert verdicts(netlab, t) == ("pass", "pass")


# --- 2. an established transfer survives a restart (states from the peer) -------------


def test_transfer_survives_restart(netlab: Netlab, tmp_path: Path) -> None:
    """Client -> fw1 -> server, fw2 a pfsync peer on the sync link holding copies of fw1's
    states. fw1 is stopped (SIGTERM) and started again with the same hostid in the middle
    of a paced 4 MB transfer; its bulk update request brings its own states back from
    fw2, so the connection continues and the bytes arrive intact."""
    t = client_fw_server(netlab)
    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    sock1, sock2 = str(tmp_path / "fw1.sock"), str(tmp_path / "fw2.sock")
    fw2 = start_daemon(netlab, t.syncpeer, rules, sock2, "--hostid", "0xb", log="fw2.log")
    fw1 = start_daemon(netlab, t.fw, rules, sock1, "--hostid", "0xa", log="fw1.log")
    total, chunk, pause = 4 << 20, 16 << 10, 0.012  # ~3 s of paced sending
    sender = popen_pipe(netlab, t.server, SENDER, t.server_ip, str(PORT_A), str(total),
                        str(chunk), str(pause), "40")
    assert readline(sender) == "ready"
    receiver = popen_pipe(netlab, t.client, RECEIVER, t.server_ip, str(PORT_A), "30",
                          str(512 << 10))
    line = readline(receiver)
    assert line.startswith("connected "), line
    cport = int(line.split()[1])
    assert readline(receiver, 15).startswith("progress")

    def fw2_has_it() -> bool:
        st = request(sock2, "states", timeout=2)["data"]
        return any(cport in s["key"]["port"] and s["creatorid"] == "0000000a" for s in st)

    assert wait_for(fw2_has_it, 5), request(sock2, "states")["data"]

    # restart fw1 mid-transfer: stopped, closed, started again with the same creatorid
    assert netlab.stop(fw1, signal.SIGTERM) == 0, log_of(netlab, "fw1.log")
    fw1 = start_daemon(netlab, t.fw, rules, sock1, "--hostid", "0xa", log="fw1b.log")

    def fw1_got_it_back() -> bool:
        st = request(sock1, "states", timeout=2)["data"]
        return any(cport in s["key"]["port"] and s["creatorid"] == "0000000a" for s in st)

    try:
        back = wait_for(fw1_got_it_back, 10)
        assert back, ("fw1 did not get its state back from fw2 by bulk update: "
                      f"{request(sock1, 'info')['data']['pfsync']}\n"
                      + log_of(netlab, "fw1b.log")[-2000:])
        result_line = readline(receiver, 40)
        assert result_line.startswith("{"), result_line
        result = json.loads(result_line)
        assert "error" not in result, result
        sent_line = readline(sender, 20)
        assert sent_line.startswith("{"), sent_line
        sent = json.loads(sent_line)
        assert result["received"] == sent["sent"] == total
        assert result["sha256"] == sent["sha256"]
        print("transfer across the restart:", result)
    finally:
        rc = (netlab.stop(fw1), netlab.stop(fw2))
    assert rc == (0, 0)


# --- 3. a busy queue and the daemon's other bad inputs: one line, nothing touched ------


def test_busy_queue_and_bad_input_leave_the_running_daemon_alone(netlab: Netlab,
                                                                  tmp_path: Path) -> None:
    t = client_fw_server(netlab)
    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    bad_rules = tmp_path / "bad.conf"
    bad_rules.write_text("pass in proto tcp to port\n")
    sock = str(tmp_path / "fw.sock")
    listen(netlab, t, PORT_A, PORT_B)
    d1 = start_daemon(netlab, t.fw, rules, sock, log="d1.log")
    before = list_rules(netlab.prefix_argv(t.fw))
    assert verdicts(netlab, t) == ("pass", "block")
    other = str(tmp_path / "other.sock")
    cases = {
        "busy queue": (["--rules", str(rules), "--syncdev", "sync0", "--control", other],
                       "NFQUEUE 0 is already bound by another process"),
        "control in use": (["--rules", str(rules), "--syncdev", "sync0", "--control", sock,
                            "--queue", "1"], "another daemon is listening"),
        "control dir missing": (["--rules", str(rules), "--syncdev", "sync0", "--control",
                                 str(tmp_path / "nodir" / "x.sock"), "--queue", "1"],
                                "does not exist"),
        "no syncdev": (["--rules", str(rules), "--syncdev", "nosuch0", "--control", other,
                        "--queue", "1"], "syncdev nosuch0: no such interface"),
        "bad rules": (["--rules", str(bad_rules), "--syncdev", "sync0", "--control", other,
                       "--queue", "1"], "bad.conf:1:"),
        "missing rules": (["--rules", str(tmp_path / "none.conf"), "--syncdev", "sync0",
                           "--control", other, "--queue", "1"], "No such file"),
        "uninstall a running queue": (["--uninstall", "--queue", "0"],
                                      "NFQUEUE 0 is bound by a running process"),
    }
    for name, (args, want) in cases.items():
        res = netlab.exec(t.fw, pfcluster_argv("daemon", *args), timeout=30, check=False)
        lines = res.stderr.strip().splitlines()
        assert res.returncode != 0, (name, res.stdout, res.stderr)
        assert len(lines) == 1 and "Traceback" not in res.stderr, (name, res.stderr)
        assert lines[0].startswith("pfcluster daemon: ") and want in lines[0], (name, lines)
        # the first daemon's rules, socket and filtering are untouched
        assert list_rules(netlab.prefix_argv(t.fw)) == before, name
        assert Path(sock).exists(), name
        assert not Path(other).exists(), name
        assert d1.poll() is None, name
    assert request(sock, "info")["ok"]
    assert verdicts(netlab, t) == ("pass", "block")
    assert netlab.stop(d1) == 0, log_of(netlab, "d1.log")
