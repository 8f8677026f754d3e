"""The Linux anchor rows of `lab compare --anchors`: kernel conntrack + iptables +
conntrackd FTFW. The unit tests check the generated rules and config and the counter
parsers; the root test runs the anchor rows for 2-3 s each and checks that they produce
figures (not that the figures are good: the anchor's split rows may fail, and that is
the measurement)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from pfcluster.lab.anchor import (
    ESTABLISHED_TAG,
    INVALID_TAG,
    NEW_TAG,
    conntrackd_conf,
    forward_rules,
    missing_tools,
    parse_conntrack_stats,
    parse_forward_counters,
)
from pfcluster.lab.experiment import RunConfig, anchor_configs, run_compare, summarize
from pfcluster.lab.netns import default_prefix, leftovers
from pfcluster.lab.report import compare_markdown
from pfcluster.lab.topology import FirewallNode

FW = FirewallNode(2, "pfc1-fw2", "198.51.100.2", "203.0.113.2", "192.0.2.2",
                  "2001:db8:c::2", "2001:db8:5::2", "2001:db8:a::2")

LISTING = """\
Chain FORWARD (policy DROP 12 packets, 480 bytes)
    pkts      bytes target     prot opt in     out     source               destination
       7      280 DROP       0    --  *      *       0.0.0.0/0            0.0.0.0/0            ctstate INVALID /* anchor-invalid */
  582922 871234 ACCEPT     0    --  *      *       0.0.0.0/0            0.0.0.0/0            ctstate RELATED,ESTABLISHED /* anchor-established */
       5      300 ACCEPT     6    --  cli    srv     198.51.100.0/24      203.0.113.0/24       tcp flags:0x17/0x02 ctstate NEW /* anchor-new */
       1       84 ACCEPT     1    --  cli    srv     198.51.100.0/24      203.0.113.0/24       icmptype 8 ctstate NEW /* anchor-new */
"""


def test_rules_drop_invalid_first_and_new_needs_a_syn() -> None:
    rules = forward_rules()
    assert rules[0][-2:] == ["-j", "DROP"] and "INVALID" in rules[0]
    assert "ESTABLISHED,RELATED" in rules[1] and rules[1][-1] == "ACCEPT"
    tcp_new = rules[2]
    assert "--syn" in tcp_new and "NEW" in tcp_new and tcp_new[-1] == "ACCEPT"
    assert all("NEW" not in r or "-i" in r for r in rules)  # NEW only from the client LAN


def test_forward_counters_parsed_by_tag_and_policy() -> None:
    got = parse_forward_counters(LISTING)
    assert got == {"policy-drop": 12, INVALID_TAG: 7, ESTABLISHED_TAG: 582922, NEW_TAG: 6}
    assert parse_forward_counters("") == {"policy-drop": 0, INVALID_TAG: 0,
                                          ESTABLISHED_TAG: 0, NEW_TAG: 0}


def test_conntrack_stats_summed_over_cpus() -> None:
    text = ("cpu=0   \tfound=0 invalid=3 insert=0 drop=1\n"
            "cpu=1   \tfound=2 invalid=4 insert=0 drop=0\n")
    assert parse_conntrack_stats(text) == {"found": 2, "invalid": 7, "insert": 0, "drop": 1}


@pytest.mark.parametrize(("mode", "cache"), [("cache", "off"), ("direct", "on")])
def test_conntrackd_conf_ftfw_on_the_sync_link(mode: str, cache: str) -> None:
    conf = conntrackd_conf(FW, Path("/tmp/x"), mode)
    assert "Mode FTFW" in conf and f"DisableExternalCache {cache}" in conf
    assert "IPv4_interface 192.0.2.2" in conf and "Interface sync" in conf
    assert "Path /tmp/x/conntrackd-fw2.ctl" in conf and "LockFile /tmp/x/conntrackd-fw2.lock" in conf
    for own in ("198.51.100.2", "203.0.113.2", "192.0.2.2"):
        assert f"IPv4_address {own}" in conf  # never sync the firewall's own traffic
    assert conf.count("{") == conf.count("}")
    with pytest.raises(ValueError):
        conntrackd_conf(FW, Path("/tmp/x"), "notrack")


def test_anchor_rows_compare_to_the_anchor_symmetric_pair() -> None:
    def run(name: str, gbps: float, anchor: str | None, during: dict[str, int] | None) -> dict:
        cfg = RunConfig(name=name, paths="symmetric", anchor=anchor)
        return {"name": name, "config": asdict(cfg), "goodput_bps": gbps * 1e9,
                "resets": {"during": during}, "iperf": {"error": None}}

    rows = summarize([
        run("single", 0.2, None, {"client": 0, "server": 0}),
        run("anchor-symmetric", 2.0, "cache", {"client": 1, "server": 2}),
        run("anchor-split", 1.0, "direct", None),
    ])
    by = {r["name"]: r for r in rows}
    assert by["anchor-split"]["ratio_symmetric"] == 0.5
    assert by["anchor-split"]["ratio_single"] is None
    assert by["anchor-symmetric"]["resets"] == 3 and by["anchor-split"]["resets"] is None
    assert by["anchor-symmetric"]["sync"] == "conntrackd-ftfw-cache"
    assert by["single"]["ratio_single"] == 1.0
    md = compare_markdown({"summary": rows})
    assert "| resets |" in md and "| anchor-split |" in md
    assert "port reuse" not in md  # no row did the reuse phase: no empty column
    reused = {**run("anchor-symmetric", 2.0, "cache", None),
              "port_reuse": {"n": 20, "reuse_ok": 19, "reuse_slow": 2, "fw_state_mismatch": 1}}
    row = summarize([reused])[0]
    assert row["port_reuse"] == "19/20, 2 slow, 1 mism."
    assert "| port reuse ok |" in compare_markdown({"summary": [row]})


@pytest.fixture
def anchor_lab(need_root: None) -> Iterator[None]:
    missing = missing_tools()
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/install installs them)")
    assert leftovers(default_prefix()) == []
    yield
    assert leftovers(default_prefix()) == []


@pytest.mark.root
def test_anchor_rows_run_and_produce_figures(anchor_lab: None) -> None:
    """Every anchor row runs (2-4 s of traffic each) and yields goodput, resets, INVALID
    drops per firewall; the failover row crashed fw1 mid-transfer and ran the
    primary-backup commit on fw2."""
    base = RunConfig(seconds=2, streams=2)
    configs = [c for c in anchor_configs(base) if c.anchor]
    configs = [replace(c, seconds=4) if c.failover else replace(c, reuse_port=min(c.reuse_port, 3))
               for c in configs]
    doc = run_compare(base, configs=configs)
    assert [r["name"] for r in doc["summary"]] == [c.name for c in configs]
    for run in doc["runs"]:
        assert run["firewall"] == "anchor" and not run["errors"], run.get("errors")
        assert isinstance(run["goodput_bps"], float)
        assert isinstance(run["state_mismatch"], int)  # INVALID drops, summed over fws
        assert run["resets"]["total"] is not None
        for fw in run["firewalls"]:
            anchor = fw["info"]["anchor"]
            assert set(anchor["sysctls"]) == {"nf_conntrack_tcp_be_liberal",
                                             "nf_conntrack_tcp_loose"}
            assert anchor["sysctls"]["nf_conntrack_tcp_be_liberal"] == int(
                run["config"]["tcp_liberal"])
            assert "invalid" in anchor["conntrack_stats"]
        # every row's traffic crossed fw1 (the only client->server path)
        assert run["firewalls"][0]["links"]["cli"]["rx_packets"] > 0
    by = {r["name"]: r for r in doc["runs"]}
    sym = by["anchor-symmetric"]
    assert sym["goodput_bps"] > 0 and sym["sync_bytes"] > 0  # conntrackd did sync
    for name in ("anchor-symmetric", "anchor-split", "anchor-split-liberal"):
        reuse = by[name]["port_reuse"]
        assert reuse["n"] == 3 and isinstance(reuse["fw_state_mismatch"], int), reuse
    fo = by["anchor-failover"]["failover"]
    assert fo["fw1_packets_before"] > 0
    assert set(fo["takeover"]["steps"]) == {"-c", "-f", "-R", "-B"}
    assert all(s["rc"] == 0 for s in fo["takeover"]["steps"].values()), fo
