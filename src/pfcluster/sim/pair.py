"""An in-process active-active cluster: N Filter+Engine nodes joined by an in-memory
sync link with latency, loss, duplication and reordering, carrying a simulated TCP
transfer whose two directions may cross different nodes.

Time is simulated (a heap of events), so a 10 000-packet transfer with a 1 ms sync link
runs in well under a second and is exactly repeatable for a given seed.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from pfcluster.packet import parse
from pfcluster.pf.constants import PFRES_BADSTATE
from pfcluster.pf.filter import Filter
from pfcluster.pf.router import ROUTE_BLOCK, ROUTE_PASS, route
from pfcluster.pf.rules import parse_rules
from pfcluster.pfsync.engine import EngineConfig, attach
from pfcluster.pfsync.events import Event, Released
from pfcluster.sim.tcpsim import Segment, TcpTransfer

CLIENT_IF = "em0"
SERVER_IF = "em1"

DEFAULT_RULES = """\
block all
pass in on em0 proto tcp to port 5201
pass out on em1 proto tcp
pass in on em0 proto icmp
pass out on em1 proto icmp
"""


class Node:
    """One firewall: its filter, its pfsync engine and what it did."""

    def __init__(self, name: str, rules: str, config: EngineConfig, now: float, hostid: int) -> None:
        self.name = name
        self.filter = Filter(parse_rules(rules, f"{name}.conf"), hostid=hostid, now=now)
        self.engine = attach(self.filter, config, now)
        self.passed = 0
        self.blocked = 0
        self.up = True
        self.events: list[Event] = []  # sync_ok changes and log lines, in order

    @property
    def state_mismatch(self) -> int:
        return self.filter.counters[PFRES_BADSTATE]


class SyncLink:
    """The sync LAN: every frame goes to every other node after `latency` (+ jitter)."""

    def __init__(self, latency: float = 0.001, loss: float = 0.0, duplicate: float = 0.0,
                 reorder: float = 0.0, seed: int = 1) -> None:
        self.latency = latency
        self.loss = loss
        self.duplicate = duplicate
        self.reorder = reorder
        self.rng = random.Random(seed)
        self.frames = 0
        self.bytes = 0
        self.lost = 0

    def deliveries(self, now: float) -> list[float]:
        """Arrival times for one frame at one receiver (empty if lost)."""
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return []
        t = now + self.latency
        if self.reorder:
            t += self.rng.random() * self.reorder
        times = [t]
        if self.duplicate and self.rng.random() < self.duplicate:
            times.append(t + self.rng.random() * max(self.latency, 1e-4))
        return times


class Cluster:
    def __init__(self, rules: str = DEFAULT_RULES, nodes: int = 2, protocol: str = "v5",
                 dialect: str = "openbsd45", defer: bool = False, maxupd: int = 128,
                 link: SyncLink | None = None, host_delay: float = 0.00005,
                 defer_timeout: float = 0.02, start: float = 0.0,
                 start_nodes: bool = True) -> None:
        self.now = start
        self.link = link or SyncLink()
        self.host_delay = host_delay
        self.config = EngineConfig(dialect=dialect, protocol=protocol, maxupd=maxupd,
                                   defer=defer, defer_timeout=defer_timeout, bulk_retry=1.0)
        self.rules = rules
        self.nodes: list[Node] = []
        self._events: list[tuple[float, int, Callable[[float], None]]] = []
        self._seq = itertools.count()
        for _i in range(nodes):
            self.add_node(start=start_nodes)

    # -- wiring -------------------------------------------------------------------------
    def add_node(self, start: bool = True) -> Node:
        i = len(self.nodes)
        node = Node(chr(ord("A") + i), self.rules, self.config, self.now, 0x1000 + i)
        self.nodes.append(node)
        if start:
            node.engine.start(self.now)
            node.engine.end_of_batch(self.now)
            self.pump(node, self.now)
        return node

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def at(self, t: float, fn: Callable[[float], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn))

    def pump(self, node: Node, now: float) -> None:
        """Ship what the node's engine produced: frames to peers, released packets on."""
        if not node.up:
            node.engine.take_output()
            return
        for frame in node.engine.take_output():
            self.link.frames += 1
            self.link.bytes += len(frame) + 20
            for peer in self.nodes:
                if peer is node or not peer.up:
                    continue
                for t in self.link.deliveries(now):
                    self.at(t, partial(self._deliver_frame, peer, frame))
        self._release(node, now)

    def _release(self, node: Node, now: float) -> None:
        """Deliver the held packets the engine let go (dropped ones just vanish)."""
        for ev in node.engine.take_events():
            if isinstance(ev, Released):
                if ev.accept:
                    self.at(now + self.host_delay, cast(Callable[[float], None], ev.handle))
            else:
                node.events.append(ev)

    def _deliver_frame(self, node: Node, frame: bytes, now: float) -> None:
        if not node.up:
            return
        node.engine.receive(frame, now, src="sync", ttl=255)
        node.engine.end_of_batch(now)
        self.pump(node, now)

    def _run_timers(self, upto: float) -> None:
        for node in self.nodes:
            if not node.up:
                continue
            for _ in range(10000):
                dl = node.engine.next_deadline()
                if dl is None or dl > upto:
                    break
                node.engine.timer(dl)
                self.pump(node, dl)

    def run_until(self, t_end: float, stop: Callable[[], bool] | None = None,
                  max_events: int = 5_000_000) -> None:
        n = 0
        while n < max_events:
            t_ev = self._events[0][0] if self._events else None
            t_tm = self._next_timer()
            if t_tm is not None and (t_ev is None or t_tm < t_ev):
                if t_tm > t_end:
                    break
                self.now = max(self.now, t_tm)
                self._run_timers(t_tm)
                continue
            if t_ev is None or t_ev > t_end:
                break
            t, _, fn = heapq.heappop(self._events)
            self.now = max(self.now, t)
            fn(self.now)
            n += 1
            if stop is not None and stop():
                return
        self.now = max(self.now, t_end)

    def _next_timer(self) -> float | None:
        best = None
        for node in self.nodes:
            if node.up:
                dl = node.engine.next_deadline()
                if dl is not None and (best is None or dl < best):
                    best = dl
        return best

    # -- packets through a firewall ----------------------------------------------------
    def forward(self, node: Node, raw: bytes, to_server: bool, now: float,
                deliver: Callable[[float], None]) -> bool:
        """The router step the daemon runs (`pf.router.route`); deliver what passes."""
        if not node.up:
            return False
        pkt = parse(raw)
        in_if, out_if = (CLIENT_IF, SERVER_IF) if to_server else (SERVER_IF, CLIENT_IF)
        rv = route(node.filter, in_if, out_if, pkt, now, node.engine, deliver)
        ok = rv.action != ROUTE_BLOCK
        if ok:
            node.passed += 1
            # packets this one released from deferral leave before it, as in the daemon
            self._release(node, now)
            if rv.action == ROUTE_PASS:
                self.at(now + self.host_delay, deliver)
        else:
            node.blocked += 1
        node.engine.end_of_batch(now)
        self.pump(node, now)
        return ok

    def _forward_at(self, node: Node, raw: bytes, to_server: bool,
                    deliver: Callable[[float], None], now: float) -> None:
        self.forward(node, raw, to_server, now, deliver)

    # -- a TCP transfer ----------------------------------------------------------------
    def transfer(self, xfer: TcpTransfer, c2s: str = "A", s2c: str = "B",
                 rate_pps: float = 10000.0, max_time: float = 30.0,
                 route: Callable[[float], tuple[str, str]] | None = None) -> dict[str, Any]:
        """Run `xfer` with client->server via node `c2s` and server->client via `s2c`.

        `route(now)` may override both per packet (for failover runs).
        """
        t0 = self.now
        gap = 1.0 / rate_pps
        counters = {"c2s_packets": 0, "s2c_packets": 0}

        def path(to_server: bool, now: float) -> Node:
            a, b = route(now) if route else (c2s, s2c)
            return self.node(a if to_server else b)

        def send(seg: Segment, now: float) -> None:
            counters["c2s_packets" if seg.to_server else "s2c_packets"] += 1
            node = path(seg.to_server, now)
            host = to_server_host if seg.to_server else to_client_host
            self.at(now + self.host_delay,
                    partial(self._forward_at, node, seg.raw, seg.to_server, partial(host, seg.raw)))

        def to_server_host(raw: bytes, now: float) -> None:
            for seg in xfer.server_receive(raw, now):
                send(seg, now)

        def to_client_host(raw: bytes, now: float) -> None:
            for seg in xfer.client_receive(raw, now):
                send(seg, now)

        def client_tick(now: float) -> None:
            seg = xfer.client_next(now)
            if seg is not None:
                send(seg, now)
            if not xfer.done and now - t0 < max_time:
                self.at(now + gap, client_tick)

        def ack_tick(now: float) -> None:
            seg = xfer.server_flush_ack()
            if seg is not None:
                send(seg, now)
            if not xfer.done and now - t0 < max_time:
                self.at(now + 0.04, ack_tick)

        send(xfer.syn(self.now), self.now)
        self.at(self.now + gap, client_tick)
        self.at(self.now + 0.04, ack_tick)
        self.run_until(t0 + max_time, stop=lambda: xfer.done)
        elapsed = self.now - t0
        data_packets = counters["c2s_packets"] + counters["s2c_packets"]
        data_bytes = xfer.bytes_delivered
        return {
            "completed": xfer.done,
            "seconds": elapsed,
            "bytes_delivered": data_bytes,
            "goodput_bps": data_bytes * 8 / elapsed if elapsed > 0 else 0.0,
            "retransmit_timeouts": xfer.retransmits,
            "packets": data_packets,
            "blocked": sum(n.blocked for n in self.nodes),
            "state_mismatch": sum(n.state_mismatch for n in self.nodes),
            "sync_frames": self.link.frames,
            "sync_bytes": self.link.bytes,
            "sync_bytes_per_data_byte": self.link.bytes / data_bytes if data_bytes else float("inf"),
            "frames_per_data_packet": self.link.frames / data_packets if data_packets else 0.0,
        }
