"""The namespace lab in plain mode (firewalls are Linux routers, no daemon needed).

Proves the topology, the three routing modes (by the firewalls' own interface counters),
iperf3 parsing, the SHA-256 integrity transfer, failover, the CLI, and that nothing is
left behind after any test. The daemon-mode acceptance tests are in test_lab_daemon.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from pfcluster.lab import iperf
from pfcluster.lab.experiment import RunConfig, integrity_transfer, pick_counters, run_one
from pfcluster.lab.netns import Lab, LabError, default_prefix, leftovers
from pfcluster.lab.topology import FW_CLIENT_IF, FW_SERVER_IF, Topology


@pytest.fixture
def no_leftovers(need_root: None) -> Iterator[None]:
    """Every root test must leave no namespace, link or iptables rule with our prefix."""
    assert leftovers(default_prefix()) == [], "stale lab objects before the test"
    yield
    assert leftovers(default_prefix()) == []


def fw_packets(lab: Lab, topo: Topology) -> dict[str, dict[str, int]]:
    out = {}
    for fw in topo.fws:
        stats = lab.link_stats(fw.ns)
        out[f"fw{fw.index}"] = {
            "c2s": stats[FW_CLIENT_IF]["rx_packets"],  # client->server enters on cli
            "s2c": stats[FW_SERVER_IF]["rx_packets"],  # server->client enters on srv
        }
    return out


def delta(a: dict[str, dict[str, int]], b: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {fw: {k: a[fw][k] - b[fw][k] for k in a[fw]} for fw in a}


MB = 1 << 20


@pytest.mark.root
@pytest.mark.parametrize("paths", ["symmetric", "split", "ecmp"])
def test_routing_modes_take_their_paths(no_leftovers: None, paths: str) -> None:
    with Lab() as lab:
        topo = Topology(lab, firewalls=2).build()
        topo.set_paths(paths)
        before = fw_packets(lab, topo)
        conns = 16 if paths == "ecmp" else 2
        res = integrity_transfer(lab, topo, 4 * MB, conns=conns, timeout=10)
        assert res["intact"], res
        d = delta(fw_packets(lab, topo), before)
    # 4 MB is ~2900 full-size segments; stray ARP/ND packets are a handful
    data, few = 2000, 50
    if paths == "symmetric":
        assert d["fw1"]["c2s"] > data and d["fw1"]["s2c"] > few, d
        assert d["fw2"]["c2s"] < few and d["fw2"]["s2c"] < few, d
    elif paths == "split":
        assert d["fw1"]["c2s"] > data and d["fw1"]["s2c"] < few, d
        assert d["fw2"]["s2c"] > few and d["fw2"]["c2s"] < few, d
    else:
        # 16 flows hashed over 2 paths: both carry data (all on one: p = 2**-15)
        assert d["fw1"]["c2s"] > 100 and d["fw2"]["c2s"] > 100, d
        assert d["fw1"]["c2s"] + d["fw2"]["c2s"] > data, d


@pytest.mark.root
def test_ecmp_routes_are_multipath_with_l4_hash(no_leftovers: None) -> None:
    from pfcluster.lab.netns import run

    with Lab() as lab:
        topo = Topology(lab, firewalls=3).build()
        topo.set_paths("ecmp")
        c = topo.client_hosts[0]
        routes = run(c.ns, ["ip", "route", "show", "203.0.113.0/24"]).stdout
        assert routes.count("nexthop via") == 3, routes
        policy = run(c.ns, ["sysctl", "-n", "net.ipv4.fib_multipath_hash_policy"]).stdout
        assert policy.strip() == "1"


@pytest.mark.root
def test_iperf_run_parses(no_leftovers: None) -> None:
    doc = run_one(RunConfig(paths="symmetric", firewall="plain", seconds=2, streams=3))
    assert doc["ok"], doc["errors"]
    assert doc["iperf"]["streams"] == 3 and len(doc["iperf"]["stream_bytes"]) == 3
    assert doc["goodput_bps"] > 10e6
    assert doc["stalled_streams"] == 0
    assert doc["resets"]["during"] == {"client": 0, "server": 0}
    assert [f["name"] for f in doc["firewalls"]] == ["fw1", "fw2"]
    assert doc["firewalls"][0]["counters"]["packets"] > 1000


@pytest.mark.root
def test_split_transfer_arrives_intact(no_leftovers: None) -> None:
    """The issue's lab test, plain mode: a short split transfer, intact, 0 state-mismatch."""
    doc = run_one(RunConfig(paths="split", firewall="plain", seconds=2, integrity_bytes=16 * MB))
    assert doc["integrity"]["intact"], doc["integrity"]
    assert doc["state_mismatch"] == 0
    assert doc["ok"] and doc["stalled_streams"] == 0
    # split really split: the data went through fw1, the ACKs through fw2
    fw1, fw2 = doc["firewalls"]
    assert fw1["links"]["cli"]["rx_packets"] > 10 * fw1["links"]["srv"]["rx_packets"]
    assert fw2["links"]["srv"]["rx_packets"] > 10 * fw2["links"]["cli"]["rx_packets"]


@pytest.mark.root
def test_failover_keeps_connections(no_leftovers: None) -> None:
    doc = run_one(RunConfig(paths="split", firewall="plain", seconds=3, failover=True))
    assert doc["failover"]["survived"], doc
    assert doc["resets"]["during"] == {"client": 0, "server": 0}
    fw1 = doc["firewalls"][0]["links"]["cli"]["rx_packets"]
    fw2 = doc["firewalls"][1]["links"]["cli"]["rx_packets"]
    assert fw1 > 1000 and fw2 > 1000  # data crossed fw1, then fw2


@pytest.mark.root
def test_lab_removes_everything_on_error_and_interrupt(no_leftovers: None) -> None:
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), Lab() as lab:
            Topology(lab, firewalls=2).build()
            assert len(leftovers(lab.prefix)) >= 5
            raise exc
        assert leftovers(default_prefix()) == []


@pytest.mark.root
def test_interface_names_fit_ifnamsiz(no_leftovers: None) -> None:
    with Lab() as lab, pytest.raises(LabError):
        ns = lab.add_ns("x")
        lab.add_bridge(ns, "a-name-longer-than-15")


@pytest.mark.root
def test_cli_compare_writes_table_chart_json(no_leftovers: None, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pfcluster.cli.lab import lab as lab_cmd

    out = tmp_path / "cmp"
    result = CliRunner().invoke(
        lab_cmd, ["compare", "--firewall", "plain", "--seconds", "1", "--streams", "2",
                  "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in doc["summary"]] == [
        "single", "symmetric", "split-v5", "split-v5-thesis-merge", "split-v4", "ecmp-v5"]
    assert all(r["goodput_mbps"] > 0 for r in doc["summary"])
    assert all(r["iperf"]["streams"] == 2 and r["ok"] for r in doc["runs"])
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "| single |" in (out / "compare.md").read_text()


# --- no root needed -------------------------------------------------------------------


def _iperf_doc(stream_bytes: list[list[int]], error: str | None = None) -> str:
    intervals = []
    for i in range(len(stream_bytes[0])):
        streams = [{"socket": 5 + s, "seconds": 0.5, "bytes": b[i]}
                   for s, b in enumerate(stream_bytes)]
        total = sum(s["bytes"] for s in streams)
        intervals.append({"streams": streams, "sum": {"bits_per_second": total * 16.0}})
    total = sum(map(sum, stream_bytes))
    doc = {
        "intervals": intervals,
        "end": {
            "streams": [{"receiver": {"bytes": sum(b)}} for b in stream_bytes],
            "sum_sent": {"bytes": total, "retransmits": 7, "bits_per_second": 1e6,
                         "seconds": 2.0},
            "sum_received": {"bytes": total, "bits_per_second": 9e5, "seconds": 2.0},
        },
    }
    if error:
        doc["error"] = error
    return json.dumps(doc)


def test_iperf_parse_figures_and_stalls() -> None:
    ok = iperf.parse(_iperf_doc([[100, 100, 100, 100], [90, 100, 110, 100]]))
    assert ok.ok and ok.goodput_bps == 9e5 and ok.retransmits == 7
    assert ok.stream_bytes == [400, 400] and ok.stalled_streams == 0
    stalled = iperf.parse(_iperf_doc([[100, 100, 100, 100], [100, 0, 0, 100]]))
    assert stalled.stalled_streams == 1 and stalled.longest_stall_s == 1.0
    dead = iperf.parse(_iperf_doc([[1000, 0, 0, 0]], error="unable to send: reset"))
    assert not dead.ok and dead.stalled_streams == 1
    assert not iperf.parse("iperf3: error").ok


def test_pick_counters_from_daemon_info() -> None:
    info = {
        "pf": {"state-mismatch": 3, "match": 10},
        "pfsync": {"ipackets": 5, "opackets": 6, "obytes": 700},
        "dataplane": {"packets": 100, "blocked": 2, "deferred": 1},
        "sync_ok": True,
    }
    got = pick_counters(info)
    assert got == {
        "packets": 100, "blocked": 2, "state-mismatch": 3, "sync-frames-in": 5,
        "sync-frames-out": 6, "sync-bytes-in": None, "sync-bytes-out": 700, "deferrals": 1,
    }


def test_transfer_pattern_is_deterministic() -> None:
    from pfcluster.lab.transfer import expected_digest, split_bytes

    assert split_bytes(10, 3) == [4, 3, 3]
    assert expected_digest(1, 0, 100_000) == expected_digest(1, 0, 100_000)
    assert expected_digest(1, 0, 100_000) != expected_digest(1, 1, 100_000)
