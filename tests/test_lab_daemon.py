"""Acceptance of the active-active lab with the real daemon (issue 6 on top of issue 5).

These tests FAIL, never skip, when the daemon cannot be imported, so a missing daemon
cannot hide behind a skip count; without root they skip and say so. Each test runs
<= 5 s of traffic.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pfcluster.lab.experiment import (
    DAEMON_MODULE,
    DAEMON_RUNTIME,
    RunConfig,
    daemon_available,
    run_one,
)
from pfcluster.lab.netns import default_prefix, leftovers

pytestmark = [pytest.mark.root]

MB = 1 << 20


@pytest.fixture
def daemon_lab(need_root: None) -> Iterator[None]:
    if not daemon_available():
        pytest.fail(f"{DAEMON_MODULE} (and {DAEMON_RUNTIME}) cannot be imported: "
                    "the lab's daemon mode has no daemon to run")
    assert leftovers(default_prefix()) == []
    yield
    assert leftovers(default_prefix()) == []


def test_split_v5_transfer_intact_no_mismatch(daemon_lab: None) -> None:
    """The issue's lab test: short split transfer, data intact, 0 state-mismatch."""
    doc = run_one(RunConfig(paths="split", sync="v5", firewall="daemon", seconds=3,
                            defer=True, integrity_bytes=8 * MB))
    assert doc["integrity"]["intact"], doc["integrity"]
    assert doc["state_mismatch"] == 0, doc["firewalls"]
    assert doc["ok"], doc["errors"]
    assert doc["stalled_streams"] == 0


@pytest.mark.parametrize("paths", ["split", "ecmp"])
def test_two_workers_split_and_ecmp_intact(daemon_lab: None, paths: str) -> None:
    """--workers 2 on every firewall: the integrity transfer's 8 connections come from 8
    client addresses, so both workers of each firewall carry some; data intact, no
    stream stalls, every worker of every firewall alive and in sync.

    Not asserted: 0 state-mismatch. With two workers per firewall a paced split run still
    drops 0-17 server ACKs at stream start in about one run in three (one worker per
    firewall: 0 in 5 paced runs; with the sibling bus switched off: still 0-9), an open
    defect of --workers noted in the README's known limits."""
    doc = run_one(RunConfig(paths=paths, sync="v5", firewall="daemon", seconds=3,
                            defer=True, integrity_bytes=8 * MB, workers=2, rate_pps=10000))
    assert doc["integrity"]["intact"], doc["integrity"]
    assert doc["integrity"]["conns"] == 8
    assert doc["ok"], doc["errors"]
    assert doc["stalled_streams"] == 0
    for fw in doc["firewalls"]:
        workers = fw["info"]["workers"]
        assert len(workers) == 2 and all(w["sync_ok"] for w in workers), workers
        assert all(w["restarts"] == 0 for w in workers), workers


def test_split_v5_near_symmetric_and_v4_stalls(daemon_lab: None) -> None:
    runs = {
        name: run_one(RunConfig(name=name, paths=paths, sync=sync, firewall="daemon",
                                seconds=4, defer=True))
        for name, paths, sync in (("symmetric", "symmetric", "v5"),
                                  ("split-v5", "split", "v5"),
                                  ("split-v4", "split", "v4"))
    }
    sym = runs["symmetric"]["goodput_bps"]
    assert sym > 0, runs["symmetric"]["errors"]
    assert runs["split-v5"]["goodput_bps"] >= 0.9 * sym, runs["split-v5"]["iperf"]
    assert runs["split-v5"]["stalled_streams"] == 0
    assert runs["split-v4"]["goodput_bps"] <= 0.2 * sym, runs["split-v4"]["iperf"]


def test_failover_no_reset(daemon_lab: None) -> None:
    doc = run_one(RunConfig(paths="split", sync="v5", firewall="daemon", seconds=4,
                            defer=True, failover=True))
    assert doc["failover"]["survived"], (doc["iperf"], doc["errors"])
    assert doc["resets"]["during"] == {"client": 0, "server": 0}
