"""--metrics: the collector against a real Filter+Engine's figures, the in-loop HTTP
server (answers, bounds), the supervisor's sum, the histogram."""

from __future__ import annotations

import selectors
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pfcluster.io.config import ConfigError, DaemonConfig, load_config
from pfcluster.io.holdtimes import HoldTimes
from pfcluster.io.loop import Daemon
from pfcluster.io.metrics import (
    MAX_REQUEST,
    MetricsError,
    MetricsServer,
    exposition,
    parse_listen,
)
from pfcluster.io.workers import sum_figures
from pfcluster.sim.pair import Cluster, SyncLink
from pfcluster.sim.tcpsim import TcpTransfer


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def one(smp: dict[Any, float], name: str, **labels: str) -> float:
    return smp[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def node_b() -> Daemon:
    """Node B of a two-node simulated cluster after a split-path transfer with deferral,
    wrapped in a Daemon (no sockets: only its figures are used)."""
    c = Cluster(defer=True, link=SyncLink(latency=0.001))
    c.run_until(1.5)
    c.transfer(TcpTransfer(total_bytes=200_000), "A", "B", rate_pps=5000, max_time=10)
    b = c.node("B")
    cfg = DaemonConfig(rules="x", syncdev="sync0", hostid=b.filter.creatorid)
    d = Daemon(cfg, core=lambda *_: (b.filter, b.engine), loader=lambda _p: b.filter.ruleset,
               install_iptables=False, clock=lambda: c.now)
    d.hold_times.observe(0.003)
    return d


def test_scrape_matches_the_figures(node_b: Daemon) -> None:
    now = node_b.clock()
    data = node_b.counters(now)
    smp = samples(exposition(lambda: data))
    pf, ps = data["pf"], data["pfsync"]
    assert one(smp, "pf_states") == data["states"] > 0
    assert one(smp, "pf_state_inserts_total") == pf["states"]["inserts"] > 0
    assert one(smp, "pf_state_searches_total") == pf["states"]["searches"] > 0
    assert one(smp, "pf_state_removals_total") == pf["states"]["removals"]
    for reason, n in pf["counters"].items():
        assert one(smp, "pf_counters_total", reason=reason) == n
    assert one(smp, "pf_packets_total", direction="in", action="pass") == \
        pf["packets"]["passed-in"] > 0
    assert one(smp, "pf_packets_total", direction="out", action="block") == \
        pf["packets"]["blocked-out"]
    assert one(smp, "pfsync_packets_received_total") == ps["ipackets"] > 0
    assert one(smp, "pfsync_packets_sent_total") == ps["opackets"] > 0
    assert one(smp, "pfsync_bytes_received_total") == ps["ibytes"]
    assert one(smp, "pfsync_bytes_sent_total") == ps["obytes"]
    assert one(smp, "pfsync_packets_discarded_total", reason="stale") == ps["stale"]
    assert one(smp, "pfsync_messages_received_total", action="UPD_C") == ps["updc_received"]
    assert one(smp, "pfsync_messages_received_total", action="INS") == ps["ins_received"] > 0
    assert one(smp, "pfsync_messages_received_total", action="BUS") == \
        ps["bulk_starts_received"] + ps["bulk_ends_received"]
    assert one(smp, "pfsync_sync_ok") == 1
    assert one(smp, "pfsync_bulk_updates_total", result="done") == ps["bulk_done"]
    # the peer A (creator 0x1000) made the states and sent frames about them
    a = f"{0x1000:08x}"
    assert one(smp, "pfsync_peer_states", creatorid=a) == \
        data["peers"]["states"][a] > 0
    age = one(smp, "pfsync_peer_last_frame_seconds", creatorid=a)
    assert age == data["peers"]["last_frame_seconds"][a] and age >= 0
    # never our own id as a peer
    assert f"{node_b.filter.creatorid:08x}" not in data["peers"]["last_frame_seconds"]
    assert one(smp, "pfsync_defer_seconds_count") == 1
    assert one(smp, "pfsync_defer_seconds_bucket", le="0.002") == 0
    assert one(smp, "pfsync_defer_seconds_bucket", le="0.005") == 1
    assert one(smp, "pfsync_defer_seconds_sum") == pytest.approx(0.003)
    assert one(smp, "pfsync_deferred_packets") == 0


def test_nfqueue_verdicts_and_pflog_figures() -> None:
    data = {"dataplane": {"passed": 5, "released_pass": 2, "blocked": 3, "released_drop": 1,
                          "errors": 1},
            "pflog": {"written": 7, "dropped_rate": 2, "dropped_error": 1}}
    smp = samples(exposition(lambda: data))
    assert one(smp, "pfcluster_nfqueue_packets_total", verdict="accept") == 7
    assert one(smp, "pfcluster_nfqueue_packets_total", verdict="drop") == 5
    assert one(smp, "pfcluster_pflog_packets_total", result="written") == 7
    assert one(smp, "pfcluster_pflog_packets_total", result="dropped") == 3


def test_workers_sum() -> None:
    h1, h2 = HoldTimes(), HoldTimes()
    h1.observe(0.0001)
    h2.observe(0.5)
    h2.observe(5.0)
    peers = {"states": {"0000000a": 4}, "last_frame_seconds": {"0000000a": 0.2}}
    summed = sum_figures([{"defer_seconds": h1.as_dict(), "peers": peers},
                          {"defer_seconds": h2.as_dict(), "peers": dict(peers)}])
    assert summed["defer_seconds"]["count"] == 3
    assert summed["defer_seconds"]["le"]["0.0005"] == 1
    assert summed["defer_seconds"]["le"]["1.0"] == 2
    assert summed["defer_seconds"]["le"]["+Inf"] == 3
    assert summed["peers"] == peers  # the table is the same in every worker: not summed


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9107") == ("127.0.0.1", 9107)
    assert parse_listen("[::1]:9107") == ("::1", 9107)
    assert parse_listen(":9107") == ("", 9107)
    for bad in ("9107", "127.0.0.1:", "127.0.0.1:x", "host:99999", "example.com:80"):
        with pytest.raises(MetricsError):
            parse_listen(bad)
    with pytest.raises(ConfigError, match="metrics"):
        load_config(None, {"rules": "r", "syncdev": "s", "metrics": "nope"})


class Served:
    """A MetricsServer in a selector loop on a thread (test harness only)."""

    def __init__(self, source: Any) -> None:
        self.server = MetricsServer("127.0.0.1:0", source)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.server, selectors.EVENT_READ, ("listen", None))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.address[1]}"

    def _loop(self) -> None:
        while not self.stop.is_set():
            for key, mask in self.sel.select(0.05):
                kind, obj = key.data
                if kind == "listen":
                    self.server.accept_into(self.sel, "client")
                else:
                    self.server.service(self.sel, obj, mask, "client")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close(self.sel)


def raw(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_http_answers() -> None:
    calls = []

    def source() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("worker 1: no answer")
        return {"states": 42, "sync_ok": True}

    srv = Served(source)
    try:
        with urllib.request.urlopen(srv.url + "/metrics", timeout=5) as resp:
            body = resp.read()
            assert resp.headers["Content-Type"].startswith("text/plain; version=")
        assert one(samples(body), "pf_states") == 42
        assert one(samples(body), "pfsync_sync_ok") == 1
        head = raw(srv.url, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and head.endswith(b"\r\n\r\n")
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(srv.url + "/metrics", timeout=5)
        assert exc.value.code == 503  # the source failed: said so, the server lives on
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(srv.url + "/nope", timeout=5)
        assert exc.value.code == 404
        assert raw(srv.url, b"POST /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 405")
        assert raw(srv.url, b"garbage\r\n\r\n").startswith(b"HTTP/1.0 400")
        big = b"GET /metrics HTTP/1.0\r\nX: " + b"a" * (MAX_REQUEST + 10)
        assert raw(srv.url, big).startswith(b"HTTP/1.0 431")
        with urllib.request.urlopen(srv.url + "/metrics", timeout=5) as resp:
            assert resp.status == 200
        assert srv.server.scrapes == 4
        deadline = time.monotonic() + 5  # every connection closed after its answer
        while srv.server.clients and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.server.clients == {}
    finally:
        srv.close()


def test_port_in_use_is_one_line(tmp_path: Any) -> None:
    from pfcluster.io.loop import SetupError, open_metrics

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    cfg = DaemonConfig(rules="r", syncdev="s", metrics=f"127.0.0.1:{port}")
    with selectors.DefaultSelector() as sel, pytest.raises(SetupError) as exc:
        open_metrics(cfg, sel, dict)
    holder.close()
    assert str(exc.value) == f"metrics 127.0.0.1:{port}: Address already in use"


def test_grafana_dashboard_names_only_metrics_we_export(node_b: Daemon) -> None:
    import json
    import re
    from pathlib import Path

    dash = json.loads((Path(__file__).resolve().parent.parent / "docs" /
                       "grafana-pfcluster.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(?:pf|pfsync|pfcluster)_[a-z_]+", e)}
    data = node_b.counters(node_b.clock())
    data["dataplane"] = {"passed": 1}
    exported = {name for name, _labels in samples(exposition(lambda: data))}
    assert used and used <= exported, used - exported


def test_peer_clock_bounded_and_total_on_any_bytes() -> None:
    from hypothesis import given
    from hypothesis import strategies as hs

    from conftest import FUZZ_EXAMPLES, fuzz_settings
    from pfcluster.pfsync import wire
    from pfcluster.pfsync.engine import MAX_PEERS

    c = Cluster(link=SyncLink(latency=0.001))
    c.run_until(1.5)
    c.transfer(TcpTransfer(total_bytes=20_000), "A", "B", rate_pps=5000, max_time=5)
    a, b = c.node("A"), c.node("B")
    b.engine.take_output()
    frame = None
    for st in list(a.filter.states)[:1]:
        a.engine.state_updated(st, c.now)
        a.engine.flush(c.now)
        frame = a.engine.take_output()[0]  # from the pfsync header on
    assert frame is not None
    eng = b.engine
    eng.peer_seen.clear()
    eng.receive(frame, c.now)
    assert list(eng.peer_seen) == [a.filter.creatorid]
    for cid in range(1, MAX_PEERS + 50):  # many creator ids: the longest silent go
        eng._note_peers([("DEL_C", [wire.DelC(1, cid)])], float(cid))
    assert len(eng.peer_seen) == MAX_PEERS and min(eng.peer_seen) == 50

    @fuzz_settings(max(100, FUZZ_EXAMPLES // 100))
    @given(hs.binary(max_size=len(frame)), hs.integers(0, len(frame) - 1))
    def receive(noise: bytes, at: int) -> None:
        eng.receive(frame[:at] + noise + frame[at + len(noise):], c.now)  # never raises
        assert len(eng.peer_seen) <= MAX_PEERS

    receive()
