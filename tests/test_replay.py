"""`pfcluster replay` on the capture shipped with the package."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from pfcluster.cli.replay import replay

DATA = Path(__file__).resolve().parents[1] / "src" / "pfcluster" / "data"
ARGS = ["--rules", str(DATA / "sample.conf"), "--iface", "em0=198.51.100.0/24",
        "--iface", "em1=203.0.113.0/24"]


def run(*extra: str) -> str:
    res = CliRunner().invoke(replay, [*ARGS, *extra, str(DATA / "sample.pcap")])
    assert res.exit_code == 0, res.output
    return res.output


def test_json_verdicts_follow_pf() -> None:
    lines = [json.loads(line) for line in run("--json").splitlines()]
    packets, final = lines[:-1], lines[-1]
    actions = [p["action"] for p in packets]
    # handshake, data, ack pass; spoofed RST and out-of-window data block; close passes;
    # the reused port's SYN passes; ssh is blocked by rule; ping and its reply pass.
    assert actions == ["pass"] * 5 + ["block", "block"] + ["pass"] * 4 + ["block", "pass", "pass"]
    syn = packets[0]
    assert syn["in"]["rule"] == 1 and syn["out"]["rule"] == 3
    assert syn["in"]["state"] != syn["out"]["state"]  # a router holds one state per side
    assert packets[5]["in"]["reason"] == "state-mismatch"
    assert any(line.startswith("pf: BAD state: TCP") for line in packets[6]["log"])
    assert "pf: State failure on: 1       | 5  " in packets[6]["log"]
    reuse = packets[10]
    assert reuse["in"]["reason"] == "match" and reuse["in"]["state"] != syn["in"]["state"]
    assert any(line.startswith("pf: state reuse") for line in reuse["log"])
    assert packets[11]["in"]["rule"] == 0
    assert final["summary"]["counters"]["state-mismatch"] == 2
    assert len(final["states"]) == 4


def test_text_output_has_pfctl_views() -> None:
    out = run()
    assert "State Table" in out and "state-mismatch" in out
    assert "all tcp 203.0.113.10:5201 <- 198.51.100.2:40000" in out


def test_bad_iface_spec_is_refused() -> None:
    res = CliRunner().invoke(replay, ["--rules", str(DATA / "sample.conf"), "--iface", "em0",
                                      str(DATA / "sample.pcap")])
    assert res.exit_code != 0 and "NAME=CIDR" in res.output


def test_rule_error_is_reported_like_pfctl(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("pass in on em0 proto tcp to port 99999\n")
    res = CliRunner().invoke(replay, ["--rules", str(bad), "--iface", "em0=198.51.100.0/24",
                                      str(DATA / "sample.pcap")])
    assert res.exit_code == 1
    assert f"{bad}:1:" in res.output
