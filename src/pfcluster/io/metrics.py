"""`daemon --metrics ADDR:PORT`: Prometheus metrics, collected when scraped.

Nothing here runs per packet. The figures are the ones `ctl info --json` returns (the
daemon's `counters()`, or a --workers supervisor's sum of its workers'); a scrape asks for
that dict and turns it into metric families (`figures_to_families`). The HTTP server is
non-blocking and lives in the daemon's own selector loop, like the control socket, so a
scrape reads the core between two packets and no thread ever touches it; a slow or
hostile client costs a bounded buffer (MAX_REQUEST bytes, MAX_CLIENTS connections, each
closed after CLIENT_TIMEOUT seconds).

Names follow Prometheus conventions (base units, `_total` counters) and the figures of
`pfctl -si` and `pfsync` statistics; see README "Watching a cluster".
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("pfcluster.metrics")

MAX_REQUEST = 8192
MAX_CLIENTS = 16
CLIENT_TIMEOUT = 10.0
DISCARD_REASONS = ("badif", "badttl", "hdrops", "badver", "badlen", "badact", "badval",
                   "badauth", "badstate", "stale")
# pfsync_messages_received_total{action}: the engine's counter of each message type
MESSAGE_COUNTERS = (("CLR", ("clr_received",)), ("INS", ("ins_received",)),
                    ("INS_ACK", ("iack_received",)), ("UPD", ("upd_received",)),
                    ("UPD_C", ("updc_received",)), ("UPD_REQ", ("ureq_received",)),
                    ("DEL", ("del_received",)),  # DEL and DEL_C
                    ("BUS", ("bulk_starts_received", "bulk_ends_received")),
                    ("TDB", ("tdb_received",)))


class MetricsError(ValueError):
    """A --metrics value that is not ADDR:PORT; str() says why."""


def parse_listen(text: str) -> tuple[str, int]:
    """`127.0.0.1:9107`, `[::1]:9107`, `:9107` (all addresses) -> (host, port)."""
    host, sep, port_s = text.rpartition(":")
    if not sep or not port_s.isdigit():
        raise MetricsError(f"{text!r}: expected ADDR:PORT, e.g. 127.0.0.1:9107")
    port = int(port_s)
    if port > 65535:
        raise MetricsError(f"{text!r}: port {port} is not 0..65535 (0: any free port)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError as exc:
            raise MetricsError(f"{text!r}: {host!r} is not an IP address") from exc
    return host, port


def _num(d: dict[str, Any], *keys: str) -> float:
    return float(sum(d.get(k, 0) or 0 for k in keys))


def figures_to_families(data: dict[str, Any]) -> Iterator[Metric]:
    """Metric families from `ctl info --json`'s data (a daemon's or a supervisor's)."""
    pf = data.get("pf", {})
    st = pf.get("states", {})
    yield GaugeMetricFamily("pf_states", "States in the table", value=data.get("states", 0))
    for name, key, what in (("searches", "searches", "State table lookups"),
                            ("inserts", "inserts", "States inserted"),
                            ("removals", "removals", "States removed")):
        yield CounterMetricFamily(f"pf_state_{name}", what, value=st.get(key, 0))
    c = CounterMetricFamily("pf_counters", "pf's reason counters (pfctl -si Counters)",
                            labels=["reason"])
    for reason, n in pf.get("counters", {}).items():
        c.add_metric([reason], n)
    yield c
    packets = pf.get("packets", {})
    c = CounterMetricFamily("pf_packets", "Packets pf passed or blocked, by direction",
                            labels=["direction", "action"])
    for action, word in (("pass", "passed"), ("block", "blocked")):
        for direction in ("in", "out"):
            c.add_metric([direction, action], packets.get(f"{word}-{direction}", 0))
    yield c
    ps = data.get("pfsync", {})
    for name, key, what in (("packets_received", "ipackets", "pfsync frames received"),
                            ("packets_sent", "opackets", "pfsync frames sent"),
                            ("bytes_received", "ibytes", "pfsync bytes received"),
                            ("bytes_sent", "obytes", "pfsync bytes sent (with IP header)")):
        yield CounterMetricFamily(f"pfsync_{name}", what, value=ps.get(key, 0))
    c = CounterMetricFamily("pfsync_packets_discarded", "pfsync frames or messages dropped",
                            labels=["reason"])
    for reason in DISCARD_REASONS:
        c.add_metric([reason], ps.get(reason, 0))
    yield c
    c = CounterMetricFamily("pfsync_messages_received", "pfsync messages received by type",
                            labels=["action"])
    for action, keys in MESSAGE_COUNTERS:
        c.add_metric([action], _num(ps, *keys))
    yield c
    yield GaugeMetricFamily("pfsync_sync_ok", "1 once the bulk update is done (or none needed)",
                            value=1 if data.get("sync_ok") else 0)
    c = CounterMetricFamily("pfsync_bulk_updates", "Bulk updates requested, by outcome",
                            labels=["result"])
    c.add_metric(["done"], ps.get("bulk_done", 0))
    c.add_metric(["gave_up"], ps.get("bulk_gave_up", 0))
    yield c
    peers = data.get("peers", {})
    g = GaugeMetricFamily("pfsync_peer_last_frame_seconds",
                          "Age of the newest frame carrying each creator id's messages",
                          labels=["creatorid"])
    for cid, age in sorted(peers.get("last_frame_seconds", {}).items()):
        g.add_metric([cid], age)
    yield g
    g = GaugeMetricFamily("pfsync_peer_states", "States in the table by creator id",
                          labels=["creatorid"])
    for cid, n in sorted(peers.get("states", {}).items()):
        g.add_metric([cid], n)
    yield g
    yield GaugeMetricFamily("pfsync_deferred_packets", "Packets held until a peer acks",
                            value=data.get("deferred_packets", 0))
    hold = data.get("defer_seconds")
    if isinstance(hold, dict) and isinstance(hold.get("le"), dict):
        h = HistogramMetricFamily("pfsync_defer_seconds",
                                  "How long deferred packets were held")
        h.add_metric([], list(hold["le"].items()), hold.get("sum", 0.0))
        yield h
    dp = data.get("dataplane", {})
    c = CounterMetricFamily("pfcluster_nfqueue_packets", "NFQUEUE verdicts given",
                            labels=["verdict"])
    if dp:
        c.add_metric(["accept"], _num(dp, "passed", "released_pass"))
        c.add_metric(["drop"], _num(dp, "blocked", "released_drop", "errors"))
    yield c
    if "pflog" in data:
        lg = data["pflog"]
        c = CounterMetricFamily("pfcluster_pflog_packets", "Packets for the pflog file",
                                labels=["result"])
        c.add_metric(["written"], lg.get("written", 0))
        c.add_metric(["dropped"], lg.get("dropped_rate", 0) + lg.get("dropped_error", 0))
        yield c


class FiguresCollector:
    """A prometheus-client collector reading `source()` (the `info` data) on each scrape."""

    def __init__(self, source: Callable[[], dict[str, Any]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        yield from figures_to_families(self.source())


def exposition(source: Callable[[], dict[str, Any]]) -> bytes:
    """The text exposition of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FiguresCollector(source))
    return generate_latest(registry)


class _Client:
    __slots__ = ("born", "inbuf", "outbuf", "sock")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.born = now
        self.inbuf = bytearray()
        self.outbuf = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()


def _response(status: str, body: bytes, ctype: str = "text/plain; charset=utf-8") -> bytes:
    head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


class MetricsServer:
    """HTTP/1.0 GET /metrics, non-blocking, in a selectors loop; one answer per connection."""

    def __init__(self, listen: str, source: Callable[[], dict[str, Any]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        host, port = parse_listen(listen)
        family = socket.AF_INET6 if ":" in host or not host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and not host:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host or "::", port))
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock
        self.source = source
        self.clock = clock
        self.clients: dict[int, _Client] = {}
        self.scrapes = 0

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept_into(self, sel: selectors.BaseSelector, kind: Any) -> None:
        now = self.clock()
        self.expire(sel, now)
        for _ in range(16):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(self.clients) >= MAX_CLIENTS:
                conn.close()
                continue
            conn.setblocking(False)
            client = _Client(conn, now)
            self.clients[conn.fileno()] = client
            sel.register(client, selectors.EVENT_READ, (kind, client))

    def expire(self, sel: selectors.BaseSelector, now: float) -> None:
        """Close connections older than CLIENT_TIMEOUT (a client that never finishes)."""
        for client in [c for c in self.clients.values() if now - c.born > CLIENT_TIMEOUT]:
            self._drop(sel, client)

    def service(self, sel: selectors.BaseSelector, client: _Client, mask: int,
                kind: Any) -> None:
        if mask & selectors.EVENT_READ and not client.outbuf:
            try:
                data = client.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                self._drop(sel, client)
                return
            if data == b"":
                self._drop(sel, client)
                return
            if data:
                client.inbuf += data
                end = client.inbuf.find(b"\r\n\r\n")
                if end < 0:
                    end = client.inbuf.find(b"\n\n")
                if end >= 0:
                    client.outbuf += self.answer(bytes(client.inbuf[:end]))
                    client.inbuf.clear()
                elif len(client.inbuf) > MAX_REQUEST:
                    client.outbuf += _response("431 Request Header Fields Too Large", b"")
        if client.outbuf:
            try:
                n = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._drop(sel, client)
                return
            del client.outbuf[:n]
            if not client.outbuf:
                self._drop(sel, client)
                return
            sel.modify(client, selectors.EVENT_WRITE, (kind, client))

    def answer(self, head: bytes) -> bytes:
        """The response to one request head (only the request line matters)."""
        line = head.split(b"\n", 1)[0].strip().split()
        if len(line) < 2:
            return _response("400 Bad Request", b"bad request\n")
        method, target = line[0], line[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _response("405 Method Not Allowed", b"GET only\n")
        if target == b"/metrics":
            self.scrapes += 1
            try:
                body = exposition(self.source)
            except Exception as exc:  # a worker not answering, or a bug: not our end
                log.error("metrics: scrape failed: %s", exc)
                return _response("503 Service Unavailable", f"{exc}\n".encode())
            resp = _response("200 OK", body, CONTENT_TYPE_LATEST)
        elif target == b"/":
            resp = _response("200 OK", b"pfcluster: metrics at /metrics\n")
        else:
            return _response("404 Not Found", b"not found; try /metrics\n")
        if method == b"HEAD":
            return resp.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
        return resp

    def _drop(self, sel: selectors.BaseSelector, client: _Client) -> None:
        self.clients.pop(client.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(client)
        client.sock.close()

    def close(self, sel: selectors.BaseSelector | None = None) -> None:
        for client in list(self.clients.values()):
            if sel is not None:
                self._drop(sel, client)
            else:
                client.sock.close()
        self.clients.clear()
        self.sock.close()
