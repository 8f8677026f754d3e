"""Authenticated sync under attack (issue 14, part 1), in namespaces with the real daemon.

Two firewalls with `--sync-key` carry a split-path iperf3 transfer. Meanwhile another
host on the sync LAN listens to their pfsync traffic for a second, then sends structurally
valid pfsync frames at TTL 255 to the pfsync group: CLR of each firewall's states, DEL_C
of every state it heard of, UPD of those states with their windows shrunk, INS of a state
of its own (creator id 0xbadbad01) for traffic the rules block — once without a MAC and
once sealed with a guessed key — and then every genuine frame it captured, replayed
verbatim (IP header included, so with the firewall's own source address). Without a key
the first ones are what issue 14 found being applied (and what test_sync_auth shows
sans I/O). With the key: every forged frame is counted badauth, every replay
auth_replay, no CLR reaches the engine, the forged state exists nowhere, the transfer's
states are still there and the transfer ends with no stall and no reset.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from pfcluster.lab import iperf
from pfcluster.lab.experiment import (
    READY_TIMEOUT,
    DaemonRunner,
    RunConfig,
    _rst_count,
    _rst_rules,
    daemon_available,
)
from pfcluster.lab.netns import Lab, default_prefix, leftovers, run
from pfcluster.lab.topology import FW_SYNC_IF, SYNC_NET4, Topology

pytestmark = [pytest.mark.root]

FORGED_CREATOR = 0xBADBAD01
ATTACKER = f"{SYNC_NET4}.66"

# Runs in the attacker's namespace: argv = ifname, seconds to listen, dialect.
ATTACK = r"""
import json, secrets, socket, struct, sys, time
from pfcluster.pfsync import auth, wire

ifname, listen_s, dialect = sys.argv[1], float(sys.argv[2]), sys.argv[3]
idx = socket.if_nametoindex(ifname)
rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 240)
rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
              struct.pack("4s4si", socket.inet_aton("224.0.0.240"), b"\0" * 4, idx))
rx.settimeout(0.1)
print("listening", flush=True)
captured = []
end = time.monotonic() + listen_s
while time.monotonic() < end:
    try:
        captured.append(rx.recv(65535))
    except TimeoutError:
        pass
senders, states, ids = set(), {}, set()
for pkt in captured:
    payload = pkt[(pkt[0] & 15) * 4:]
    a = auth.read(payload, dialect)
    if a is not None:
        senders.add(a.sender)
    body = payload[: len(payload) - auth.overhead(dialect)]
    try:
        frame = wire.decode(body, dialect)
    except wire.WireError:
        continue
    for sec in frame.sections:
        for m in sec.messages:
            if sec.action in ("INS", "UPD"):
                states[(m.id, m.creatorid)] = m
            if sec.action in ("INS", "UPD", "UPD_C"):
                ids.add((m.id, m.creatorid))

acts = wire.ACTIONS[dialect]
def frame(action, msgs):
    return wire.encode(wire.Frame(wire.VERSION[dialect], None, bytes(16),
                                  [wire.Section(action, acts[action], len(msgs), msgs)]), dialect)

forged = [frame("CLR", [wire.Clr("", c) for c in sorted(senders)])]
forged += [frame("DEL_C", [wire.DelC(i, c)]) for (i, c) in sorted(ids)]
shrunk = []
for st in states.values():
    st.src.seqlo = st.src.seqhi = st.dst.seqlo = st.dst.seqhi = 1
    st.src.max_win = st.dst.max_win = 1
    shrunk.append(st)
if shrunk:
    forged.append(frame("UPD", shrunk[:4]))
if states:
    mine = next(iter(states.values()))
    mine.creatorid, mine.id = 0xBADBAD01, 0x0BAD
    mine.key[0].port = [22, 40022]
    mine.key[1].port = [22, 40022]
    forged.append(frame("INS", [mine]))
guessed = auth.Sealer(auth.KeyRing([(1, secrets.token_bytes(32))]), 0x0A0A0A0A, dialect)
forged += [guessed.seal(f) for f in list(forged)]

tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 240)
tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
              struct.pack("4s4si", b"\0" * 4, b"\0" * 4, idx))
tx.setsockopt(socket.SOL_SOCKET, 25, ifname.encode())
for f in forged:
    tx.sendto(f, ("224.0.0.240", 0))
    time.sleep(0.002)
# replays: verbatim (IP header included: the firewall's source address, TTL 255), then
# the same frames from our own address
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
raw.setsockopt(socket.SOL_SOCKET, 25, ifname.encode())
by_src = {}
for pkt in captured:
    raw.sendto(pkt, ("224.0.0.240", 0))
    src = socket.inet_ntoa(pkt[12:16])
    by_src[src] = by_src.get(src, 0) + 1
    time.sleep(0.001)
for pkt in captured:
    tx.sendto(pkt[(pkt[0] & 15) * 4:], ("224.0.0.240", 0))
    time.sleep(0.001)
print(json.dumps({"captured": len(captured), "senders": sorted(senders),
                  "states_heard": len(states), "ids_heard": len(ids), "forged": len(forged),
                  "replayed_by_src": by_src}))
"""


@pytest.fixture
def auth_lab(need_root: None) -> Iterator[None]:
    if not daemon_available():
        pytest.fail("the daemon cannot be imported")
    assert leftovers(default_prefix()) == []
    yield
    assert leftovers(default_prefix()) == []


def _states(runner: DaemonRunner, fw: Any) -> list[dict[str, Any]]:
    out = run(None, [sys.executable, "-m", "pfcluster.cli.main", "ctl", "--control",
                     str(runner.controls[fw.index]), "states", "--json"], timeout=10)
    doc = json.loads(out.stdout)
    return list(doc if isinstance(doc, list) else doc.get("states", doc))


def test_forged_and_replayed_frames_touch_nothing(auth_lab: None) -> None:
    seconds = 8
    with Lab() as lab:
        topo = Topology(lab, firewalls=2).build()
        topo.set_paths("split")
        key = lab.path("sync.key")
        key.write_text(f"1 {secrets.token_hex(32)}\n")
        os.chmod(key, 0o600)
        attacker = lab.add_ns("x")
        lab.add_port(topo.switch, "bry", "y-x", attacker, FW_SYNC_IF)
        lab.add_addr(attacker, FW_SYNC_IF, f"{ATTACKER}/24")
        c, s = topo.client_hosts[0], topo.server_hosts[0]
        for host in (c, s):
            _rst_rules(lab, host.ns)
        cfg = RunConfig(paths="split", firewall="daemon", defer=True, sync_key=str(key))
        runner = DaemonRunner()
        runner.start(lab, topo, cfg)
        runner.wait_ready(READY_TIMEOUT)
        srv = iperf.start_server(lab, s.ns, s.ip4)
        rst0 = (_rst_count(c.ns), _rst_count(s.ns))
        attack: dict[str, Any] = {}
        during: dict[int, list[dict[str, Any]]] = {}

        proc = subprocess.Popen(["ip", "netns", "exec", attacker, sys.executable, "-c", ATTACK,
                                 FW_SYNC_IF, "2.5", "openbsd45"], stdout=subprocess.PIPE,
                                text=True, start_new_session=True)

        def strike() -> None:
            out, _ = proc.communicate(timeout=40)
            if proc.returncode == 0:
                attack.update(json.loads(out.strip().splitlines()[-1]))
            for fw in topo.fws:  # the transfer's states, right after the attack
                during[fw.index] = _states(runner, fw)

        striker = threading.Thread(target=strike, daemon=True)

        # resets up to a second before the end (iperf3 may reset its own sockets when
        # it stops, as the lab's run_one notes)
        snap = threading.Timer(seconds - 1.0, lambda: during_rst.extend(
            (_rst_count(c.ns) - rst0[0], _rst_count(s.ns) - rst0[1])))
        during_rst: list[int] = []
        snap.start()
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "listening"  # before the connections open
        striker.start()
        # paced (4 x 20 Mbit/s): unpaced split runs may drop a few ACKs (README), and a
        # forged window applied would show as state-mismatch drops
        res = iperf.run_client(c.ns, iperf.client_argv(s.ip4, seconds=seconds, streams=4,
                                                       bitrate="20M"), seconds)
        striker.join(30)
        snap.join(5)
        lab.stop(srv, grace=2.0)
        infos = {fw.index: runner.info(fw) for fw in topo.fws}
        after = {fw.index: _states(runner, fw) for fw in topo.fws}

    assert attack.get("forged"), attack
    assert attack["states_heard"] >= 4 and attack["ids_heard"] >= 8, attack
    assert len(attack["senders"]) == 2, attack
    assert res.ok and res.error is None, res.to_dict()
    assert res.stalled_streams == 0 and res.goodput_bps > 0, res.to_dict()
    assert during_rst == [0, 0], attack
    for idx, info in infos.items():
        p = info["pfsync"]
        assert p["badauth"] == attack["forged"], (idx, p)
        # every frame captured, from the attacker's address; verbatim, only the other
        # firewall's (the kernel drops a packet whose source address is its own)
        other = topo.fws[2 - idx].sync_ip4
        want = attack["captured"] + attack["replayed_by_src"].get(other, 0)
        assert p["auth_replay"] == want, (idx, p, attack)
        assert p["clr_received"] == 0, (idx, p)
        # that no forged frame was applied is shown by the counters above (every one
        # refused, no CLR taken) and the tables below; a split transfer on a starved
        # 2-core machine drops a few ACKs on its own (README, known limits: 0-7 per 3 s),
        # so this bound only catches a window that stayed shrunk
        assert info["pf"]["counters"].get("state-mismatch", 0) <= 20, (idx, info["pf"])
        for table in (during[idx], after[idx]):
            text = json.dumps(table)
            assert f"{FORGED_CREATOR:08x}" not in text and "40022" not in text
        ports = json.dumps(during[idx])
        assert ports.count("5201") >= 4, (idx, during[idx])
