"""io/nfq.py against the kernel (root, one namespace): UDP datagrams to 127.0.0.1 are
queued from OUTPUT; a helper in the namespace binds the queue, gives verdicts and reports
what the receiving socket got. Checks accept/drop, the copy range and wire length, that
a batch verdict never releases a held packet, and the fail-open flag (a full queue
accepts with it, drops without it). Then a namespace pair: a verdict carrying a packet
rewritten by pf/rewrite.py reaches the receiver on the new port with a valid checksum."""

from __future__ import annotations

import errno
import json
import sys
from typing import Any

import pytest

from nsfixtures import Netlab
from nsfixtures import netlab as netlab  # the fixture

pytestmark = pytest.mark.root

QUEUE = 7
PORT = 9999

HELPER = r"""
import json, socket, sys, time
from pfcluster.io.nfq import NfQueue, read_proc_stats

scenario = sys.argv[1]
QUEUE, PORT = int(sys.argv[2]), int(sys.argv[3])
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.bind(("127.0.0.1", PORT))
rx.setblocking(False)
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

def send(*sizes):
    for i, size in enumerate(sizes):
        tx.sendto(bytes([65 + i]) * size, ("127.0.0.1", PORT))

def received(wait=0.3):
    time.sleep(wait)
    got = []
    while True:
        try:
            got.append(rx.recv(65535))
        except BlockingIOError:
            return [(d[0] - 65, len(d)) for d in got]

def collect(q, n, timeout=5.0):
    pkts = []
    def grab(p):
        pkts.append({"id": p.packet_id, "hook": p.hook, "copied": len(p.payload),
                     "wire": p.wire_len, "tag": p.payload[28] - 65 if len(p.payload) > 28 else -1})
    deadline = time.monotonic() + timeout
    while len(pkts) < n and time.monotonic() < deadline:
        q.drain(grab)
        time.sleep(0.01)
    return pkts

out = {}
if scenario == "verdicts":
    q = NfQueue(QUEUE, copy_range=256)
    send(1000, 10, 100)
    pkts = collect(q, 3)
    out["pkts"] = pkts
    q.verdicts.accept(pkts[0]["id"])
    q.verdicts.drop(pkts[1]["id"])
    q.verdicts.accept(pkts[2]["id"])
    q.flush()
    out["received"] = received()
    out["batches"], out["singles"] = q.verdicts.batches, q.verdicts.singles
    out["proc"] = read_proc_stats(QUEUE)
elif scenario == "held":
    q = NfQueue(QUEUE)
    send(10, 10, 10, 10)
    ids = [p["id"] for p in collect(q, 4)]
    q.verdicts.accept(ids[0])
    q.verdicts.hold(ids[1])
    q.verdicts.accept(ids[2])
    q.verdicts.accept(ids[3])
    q.flush()
    out["before_release"] = received()
    out["queued_while_held"] = read_proc_stats(QUEUE).get("queue_total")
    q.verdicts.release(ids[1], accept=True)
    q.flush()
    out["after_release"] = received()
    out["queued_after"] = read_proc_stats(QUEUE).get("queue_total")
elif scenario in ("fail-open", "fail-closed"):
    q = NfQueue(QUEUE, max_len=2, fail_open=scenario == "fail-open")
    send(10, 10, 10, 10, 10)  # nobody reads: two wait in the queue, three find it full
    out["received"] = received()
    out["proc"] = read_proc_stats(QUEUE)
    ids = [p["id"] for p in collect(q, 2)]
    for i in ids:
        q.verdicts.drop(i)
    q.flush()
    out["after"] = received()
q.close()
print(json.dumps(out), flush=True)
"""


def run_scenario(lab: Netlab, scenario: str) -> dict[str, Any]:
    ns = lab.add_ns("q")
    lab.exec(ns, ["iptables-legacy", "-A", "OUTPUT", "-o", "lo", "-p", "udp", "--dport",
                  str(PORT), "-j", "NFQUEUE", "--queue-num", str(QUEUE)])
    proc = lab.exec(ns, [sys.executable, "-c", HELPER, scenario, str(QUEUE), str(PORT)],
                    timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_accept_drop_copy_range_and_batch(netlab: Netlab) -> None:
    out = run_scenario(netlab, "verdicts")
    pkts = out["pkts"]
    assert [p["hook"] for p in pkts] == [3, 3, 3]  # NF_INET_LOCAL_OUT
    # 1000-byte datagram: 1028 on the wire, 256 copied; small ones whole
    assert [(p["copied"], p["wire"]) for p in pkts] == [(256, 1028), (38, 38), (128, 128)]
    assert [p["tag"] for p in pkts] == [0, 1, 2]
    assert sorted(out["received"]) == [[0, 1000], [2, 100]]  # the dropped one never came
    assert out["batches"] == 1  # the two accepts left as one batch verdict
    assert out["proc"]["copy_range"] == 256 and out["proc"]["queue_total"] == 0


def test_batch_verdict_never_releases_a_held_packet(netlab: Netlab) -> None:
    out = run_scenario(netlab, "held")
    assert sorted(t for t, _ in out["before_release"]) == [0, 2, 3]
    assert out["queued_while_held"] == 1
    assert [t for t, _ in out["after_release"]] == [1]
    assert out["queued_after"] == 0


@pytest.mark.parametrize("mode", ["fail-open", "fail-closed"])
def test_full_queue_accepts_only_with_fail_open(netlab: Netlab, mode: str) -> None:
    out = run_scenario(netlab, mode)
    if mode == "fail-open":
        assert len(out["received"]) == 3  # the three that found the queue full passed
        assert out["proc"]["queue_dropped"] == 0
    else:
        assert out["received"] == []
        assert out["proc"]["queue_dropped"] == 3
    assert out["proc"]["queue_total"] == 2
    assert out["after"] == []  # the two queued ones were dropped by verdict


def test_second_binding_of_a_queue_is_refused(netlab: Netlab) -> None:
    ns = netlab.add_ns("q")
    code = (f"from pfcluster.io.nfq import NfQueue\nq = NfQueue({QUEUE})\n"
            f"try:\n    NfQueue({QUEUE})\nexcept OSError as e:\n    print('refused', e.errno)\n")
    proc = netlab.exec(ns, [sys.executable, "-c", code], check=False)
    # the kernel answers EPERM: the queue belongs to another netlink port
    assert proc.stdout.split() == ["refused", str(errno.EPERM)], proc.stderr


# --- a verdict carrying a rewritten packet --------------------------------------------

OLD_PORT, NEW_PORT = 9999, 10099
REWRITE_HELPER = r"""
import json, socket, subprocess, sys, time
from pfcluster.io import nfq
from pfcluster.packet import parse
from pfcluster.pf.rewrite import rewrite

QUEUE, OLD, NEW = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
TX, RX_ADDR, V6 = sys.argv[4], sys.argv[5], sys.argv[6] == "6"
fam = socket.AF_INET6 if V6 else socket.AF_INET
socks = {}
for port in (OLD, NEW):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind(("::" if V6 else "0.0.0.0", port))
    s.setblocking(False)
    socks[port] = s

def csum_errors():
    if V6:
        for line in open("/proc/net/snmp6"):
            if line.startswith("Udp6InCsumErrors"):
                return int(line.split()[1])
    lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Udp:")]
    return int(lines[1][lines[0].index("InCsumErrors")])

q = nfq.NfQueue(QUEUE, copy_range=nfq.MAX_COPY_RANGE)
send = ("import socket, sys\n"
        f"s = socket.socket({int(fam)}, socket.SOCK_DGRAM)\n"
        f"s.sendto(b'good datagram', ({RX_ADDR!r}, {OLD}))\n"
        f"s.sendto(b'bad datagram!', ({RX_ADDR!r}, {OLD}))\n")
subprocess.run(["ip", "netns", "exec", TX, sys.executable, "-c", send], check=True)
pkts = []
def grab(p):
    pkts.append((p.packet_id, bytearray(p.payload), p.wire_len))
deadline = time.monotonic() + 5
while len(pkts) < 2 and time.monotonic() < deadline:
    q.drain(grab, flush=False)
    time.sleep(0.01)
before = csum_errors()
out = {"queued": len(pkts), "whole": [len(b) == w for _, b, w in pkts]}
for i, (pid, buf, _) in enumerate(pkts):
    pkt = parse(buf)
    rewrite(buf, pkt, None, None, None, NEW)
    out.setdefault("dport_after", []).append(pkt.dport)
    if i == 1:
        buf[-1] ^= 0xFF  # a payload byte the checksum no longer covers: must be dropped
    q.verdicts.accept_payload(pid, buf)
q.flush()
time.sleep(0.3)
got = {}
for port, s in socks.items():
    got[port] = []
    while True:
        try:
            data, peer = s.recvfrom(2048)
        except BlockingIOError:
            break
        got[port].append([data.decode(), peer[0]])
out["received"] = got
out["csum_errors"] = csum_errors() - before
out["queue_total"] = nfq.read_proc_stats(QUEUE).get("queue_total")
q.close()
print(json.dumps(out), flush=True)
"""


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_verdict_payload_delivers_the_rewritten_datagram(netlab: Netlab, v6: bool) -> None:
    """tx sends two UDP datagrams to rx:9999; rx queues them in raw PREROUTING (before
    conntrack), rewrites the destination port to 10099 and accepts each with its new
    bytes. The kernel marks a mangled packet's checksum unverified, so UDP checks it:
    the first arrives on the new port (so its checksum was valid), the second, whose
    payload we spoiled after the rewrite, is counted as a checksum error and lost."""
    tx, rx = netlab.add_ns("tx"), netlab.add_ns("rx")
    if v6:
        tx_addr, rx_addr, plen, tool = "2001:db8:77::1", "2001:db8:77::2", 64, "ip6tables-legacy"
    else:
        tx_addr, rx_addr, plen, tool = "198.51.100.1", "198.51.100.2", 24, "iptables-legacy"
    netlab.veth(tx, "tx0", rx, "rx0", f"{tx_addr}/{plen}", f"{rx_addr}/{plen}")
    netlab.exec(rx, [tool, "-t", "raw", "-A", "PREROUTING", "-i", "rx0", "-p", "udp",
                     "--dport", str(OLD_PORT), "-j", "NFQUEUE", "--queue-num", str(QUEUE)])
    proc = netlab.exec(rx, [sys.executable, "-c", REWRITE_HELPER, str(QUEUE), str(OLD_PORT),
                            str(NEW_PORT), tx, rx_addr, "6" if v6 else "4"],
                       timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["queued"] == 2 and out["whole"] == [True, True]
    assert out["dport_after"] == [NEW_PORT, NEW_PORT]
    assert out["received"] == {str(OLD_PORT): [], str(NEW_PORT): [["good datagram", tx_addr]]}
    assert out["csum_errors"] == 1
    assert out["queue_total"] == 0
