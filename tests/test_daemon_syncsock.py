"""The pfsync socket in two namespaces: TTL 255 on the sync interface only."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nsfixtures import SYNC_NET, Netlab, netlab

__all__ = ["netlab"]

pytestmark = [pytest.mark.root]  # network namespaces, iptables, NFQUEUE, raw sockets

RECEIVER = r"""
import json, select, sys, time
from pfcluster.io.syncsock import SyncSocket
ifname, group, seconds, want = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
s = SyncSocket(ifname, group=None if group == "-" else group)
print("ready", flush=True)
frames = []
deadline = time.monotonic() + seconds
while time.monotonic() < deadline and s.counters.rx < want:
    select.select([s], [], [], 0.05)
    frames += [[f.payload.hex(), f.src, f.ttl] for f in s.receive()]
print(json.dumps({"frames": frames, "counters": s.counters.as_dict()}), flush=True)
"""

SYNCSEND = r"""
import sys
from pfcluster.io.syncsock import SyncSocket
ifname, dest, payload = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
multicast = dest.startswith(("224.", "ff"))
s = SyncSocket(ifname, group=dest if multicast else None, peer=None if multicast else dest)
assert s.send(payload)
"""

RAWSEND = r"""
import socket, struct, sys
ifname, dest, ttl, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 240)
s.setsockopt(socket.SOL_SOCKET, 25, ifname.encode())
s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
idx = socket.if_nametoindex(ifname)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, struct.pack("4s4si", bytes(4), bytes(4), idx))
s.sendto(payload, (dest, 0))
"""


def two_nodes(lab: Netlab) -> tuple[str, str]:
    a = lab.add_ns("a")
    b = lab.add_ns("b")
    lab.veth(a, "sync0", b, "sync0", f"{SYNC_NET}.1/26", f"{SYNC_NET}.2/26")
    lab.veth(a, "eth1", b, "eth1", f"{SYNC_NET}.65/26", f"{SYNC_NET}.66/26")
    for ns, last in ((a, 1), (b, 2)):
        lab.exec(ns, ["ip", "addr", "add", f"2001:db8:f0::{last}/64", "dev", "sync0", "nodad"])
    return a, b


def start_receiver(lab: Netlab, ns: str, group: str, want: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", RECEIVER,
                             "sync0", group, "8", str(want)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def finish(proc: subprocess.Popen[str]) -> dict:  # type: ignore[type-arg]
    out, _ = proc.communicate(timeout=15)
    return json.loads(out.strip().splitlines()[-1])


def test_ipv4_ttl_and_interface_checks(netlab: Netlab) -> None:
    a, b = two_nodes(netlab)
    recv = start_receiver(netlab, b, "-", want=4)
    try:
        py = sys.executable
        netlab.exec(a, [py, "-c", SYNCSEND, "sync0", "224.0.0.240", "05aa01"])
        netlab.exec(a, [py, "-c", RAWSEND, "sync0", "224.0.0.240", "64", "05bb02"])
        netlab.exec(a, [py, "-c", RAWSEND, "eth1", f"{SYNC_NET}.66", "255", "05cc03"])
        netlab.exec(a, [py, "-c", SYNCSEND, "sync0", f"{SYNC_NET}.2", "05dd04"])
        res = finish(recv)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait(5)
    assert res["frames"] == [["05aa01", f"{SYNC_NET}.1", 255], ["05dd04", f"{SYNC_NET}.1", 255]]
    c = res["counters"]
    assert (c["rx"], c["badttl"], c["badif"]) == (4, 1, 1)


def test_ipv6_multicast_group(netlab: Netlab) -> None:
    a, b = two_nodes(netlab)
    recv = start_receiver(netlab, b, "ff02::f0", want=2)
    try:
        py = sys.executable
        netlab.exec(a, [py, "-c", SYNCSEND, "sync0", "ff02::f0", "05ee05"])
        netlab.exec(a, [py, "-c", SYNCSEND, "sync0", "2001:db8:f0::2", "05ff06"])
        res = finish(recv)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait(5)
    payloads = [f[0] for f in res["frames"]]
    assert payloads == ["05ee05", "05ff06"]
    assert all(f[2] == 255 for f in res["frames"])
    assert res["frames"][1][1] == "2001:db8:f0::1"
    assert res["counters"]["badttl"] == res["counters"]["badif"] == 0
