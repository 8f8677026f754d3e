"""Bulk update of a large table to a fresh peer (issue 11 section 4): `lab bulk`.

The root test builds two firewalls joined by the sync LAN, fills fw1 with 20 000
synthetic states (`daemon --bench-preload`), starts fw2 and asserts that it reaches
sync_ok holding every state, with nothing lost to its socket. The other tests check the
pieces without root: the preload, the /proc/net/raw parser, the rules, the CLI refusals.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pfcluster.bench.preload import PreloadError, preload_states
from pfcluster.cli.main import main as cli
from pfcluster.lab.bulk import BulkConfig, raw_drops, run_bulk
from pfcluster.lab.experiment import DAEMON_MODULE, daemon_available
from pfcluster.lab.netns import default_prefix, leftovers
from pfcluster.pf.constants import TCPS
from pfcluster.pf.filter import Filter
from pfcluster.pf.rules import parse_rules


@pytest.mark.root
def test_lab_bulk_20k_states_reach_the_new_peer(need_root: None) -> None:
    if not daemon_available():
        pytest.fail(f"{DAEMON_MODULE} cannot be imported: no daemon to measure")
    assert leftovers(default_prefix()) == []
    doc = run_bulk(BulkConfig(states=20_000, timeout=120))
    assert leftovers(default_prefix()) == []
    assert doc["errors"] == [], doc
    assert doc["received_states"] == 20_000
    assert doc["bulk_states_received"] == 20_000 and doc["bulk_done"] == 1
    assert doc["kernel_drops"] == 0
    assert doc["seconds"] < 60, doc  # ~1-2 s on an idle machine
    assert doc["receiver_rss_kib"] and doc["sender_rss_kib"]


def _filter(limit: int) -> Filter:
    return Filter(parse_rules(f"set limit states {limit}\npass all\n", "t.conf"), hostid=7)


def test_preload_makes_established_tcp_states_with_distinct_keys() -> None:
    filt = _filter(200_000)
    assert preload_states(filt, 61_000, now=5.0) == 61_000
    states = list(filt.states)
    assert len(states) == len({s.key for s in states}) == 61_000
    assert len({(s.creatorid, s.id) for s in states}) == 61_000
    est = int(TCPS.ESTABLISHED)
    assert all(s.src.state == est and s.dst.state == est and s.key[1] == 6 for s in states)
    # addresses are shared objects, as the packet path shares them
    assert len({id(s.key[2]) for s in states}) == 2


def test_preload_respects_the_state_limit() -> None:
    filt = _filter(1000)
    with pytest.raises(PreloadError, match="limit states"):
        preload_states(filt, 1001, now=0.0)
    assert len(filt.states) == 0


def test_raw_drops_sums_the_pfsync_rows_only() -> None:
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
        "   uid  timeout inode ref pointer drops\n"
        " 240: 00000000:00F0 00000000:0000 07 00000000:00000000 00:00000000 00000000"
        "     0        0 1 2 0000000000000000 17\n"
        " 1: 00000000:0001 00000000:0000 07 00000000:00000000 00:00000000 00000000"
        "     0        0 1 2 0000000000000000 5\n"
        "garbage line\n"
    )
    assert raw_drops(text) == 17


def test_bulk_rules_keep_adaptive_timeouts_off() -> None:
    rs = parse_rules(BulkConfig(states=1_000_000).rules(), "bulk.conf")
    assert rs.limit_states >= 2_000_000
    with pytest.raises(ValueError):
        BulkConfig(states=0).check()


def test_bulk_cli_refuses_bad_states() -> None:
    res = CliRunner().invoke(cli, ["lab", "bulk", "--states", "0"])
    assert res.exit_code == 2 and "Traceback" not in res.output
