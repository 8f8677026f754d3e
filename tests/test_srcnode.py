"""Source tracking (pf/srcnode.py): max-src-*, overload tables, flush, node expiry,
pfctl -sS/-si views, printing and errors. Packets are built with scapy; time by hand."""

from __future__ import annotations

import ipaddress

import pytest

from pfcluster.pf.constants import AF_INET, PF_IN, PFSYNC_FLAG_SRCNODE
from pfcluster.pf.pfctl import format_info, format_rules
from pfcluster.pf.rules import RuleSyntaxError, parse_rules
from pfcluster.pf.srcnode import format_sources, sources_json
from pfcluster.pfsync import wire
from pfcluster.pfsync.convert import export_state, pack_state
from test_pf_helpers import CLIENT, SERVER, TcpConn, make_filter, pk, udp

OVERLOAD = """
table <bad> persist
block in quick from <bad>
pass in proto tcp to port 5201 keep state (max-src-conn-rate 3/5, overload <bad> {flush})
pass in proto tcp to port 22 keep state
"""


def _in_bad(filt, addr: str) -> bool:
    return filt.ruleset.tables["bad"].contains(AF_INET, int(ipaddress.ip_address(addr)))


@pytest.mark.parametrize("flush", ["flush global", "flush", ""])
def test_conn_rate_overload_flush(flush: str) -> None:
    f = make_filter(OVERLOAD.format(flush=flush))
    ssh = TcpConn(f, sport=39000, dport=22)
    ssh.handshake(now=0.0)
    conns = []
    # three connections in 5 s: at the limit, not over it (pf's counter decays linearly
    # over the window, in whole seconds: 1000, 2000, 2600 thousandths)
    for i in range(3):
        c = TcpConn(f, sport=40000 + i)
        c.handshake(now=0.5 * i)
        conns.append(c)
    assert len(f.states) == 4
    assert not _in_bad(f, CLIENT)
    fourth = TcpConn(f, sport=40003)
    assert fourth.c("S", now=1.5).passed
    assert fourth.s("SA", now=1.5).passed
    v = fourth.c("A", now=1.5)  # the 4th handshake completes within 5 s: 3600 > 3000
    assert not v.passed and v.reason == "src-limit"
    assert f.counters[13] == 1  # PFRES_SRCLIMIT
    assert f.srcnodes.limit_counters["max-src-conn-rate"] == 1
    assert _in_bad(f, CLIENT)
    if not flush:
        assert len(f.states) == 4  # no flush: only the offending connection dies
        return
    assert f.srcnodes.limit_counters["overload-table-insertion"] == 1
    remaining = {st.key[4] for st in f.states}
    if flush == "flush global":
        assert remaining == set()  # the ssh state of another rule went too
    else:
        assert remaining == {39000}  # only this rule's states
    # the source now meets `block in quick from <bad>`
    v = TcpConn(f, sport=40010).c("S", now=4.0)
    assert not v.passed and v.rule is not None and v.rule.action == "block"
    # another source is not affected
    other = f.test(PF_IN, "em0", pk(udp("198.51.100.77", SERVER, 1, 2)), 4.0)
    assert other.passed


def test_conn_rate_window_decays() -> None:
    f = make_filter(OVERLOAD.format(flush="flush global"))
    for i in range(6):  # one connection every 2 s stays under 3 per 5 s
        c = TcpConn(f, sport=41000 + i)
        v = c.handshake(now=2.0 * i)
        assert v.passed
    assert not _in_bad(f, CLIENT)


def test_max_src_conn_counts_established_only() -> None:
    f = make_filter("pass in proto tcp keep state (max-src-conn 2)\n")
    half = TcpConn(f, sport=42000)
    assert half.c("S").passed  # a handshake never completed does not count
    for i in range(2):
        TcpConn(f, sport=42001 + i).handshake()
    sn = next(iter(f.srcnodes.nodes.values()))
    assert (sn.states, sn.conn) == (3, 2)
    c = TcpConn(f, sport=42010)
    assert c.c("S").passed and c.s("SA").passed
    v = c.c("A")
    assert not v.passed and v.reason == "src-limit"
    assert f.srcnodes.limit_counters["max-src-conn"] == 1
    assert (sn.states, sn.conn) == (3, 2)  # the killed state gave its count back


def test_max_src_states() -> None:
    f = make_filter("pass in proto udp keep state (max-src-states 2)\n")
    for port in (1000, 1001):
        assert f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, port, 53)), 0.0).passed
    v = f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, 1002, 53)), 0.0)
    assert not v.passed and v.reason == "src-limit"
    assert f.srcnodes.limit_counters["max-src-states"] == 1
    assert f.test(PF_IN, "em0", pk(udp("198.51.100.3", SERVER, 1002, 53)), 0.0).passed
    # packets of the existing states still pass
    assert f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, 1000, 53)), 0.5).passed


def test_max_src_nodes_rule_scope() -> None:
    f = make_filter("pass in proto udp keep state (source-track rule, max-src-nodes 2)\n")
    for i in range(2):
        assert f.test(PF_IN, "em0", pk(udp(f"198.51.100.{i + 1}", SERVER, 9, 53)), 0.0).passed
    v = f.test(PF_IN, "em0", pk(udp("198.51.100.9", SERVER, 9, 53)), 0.0)
    assert not v.passed and v.reason == "src-limit"
    assert f.srcnodes.limit_counters["max-src-nodes"] == 1
    # a known source still opens states
    assert f.test(PF_IN, "em0", pk(udp("198.51.100.1", SERVER, 10, 53)), 0.0).passed
    assert len(f.srcnodes) == 2


def test_global_nodes_are_shared_and_limit_src_nodes() -> None:
    f = make_filter("set limit src-nodes 1\n"
                    "pass in proto udp to port 53 keep state (max-src-states 1)\n"
                    "pass in proto udp to port 54 keep state (max-src-states 1)\n")
    assert f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, 9, 53)), 0.0).passed
    # one global node for the source: the second rule's state finds it full
    v = f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, 9, 54)), 0.0)
    assert not v.passed and v.reason == "src-limit"
    # the table of nodes is full (set limit src-nodes 1): a new source is refused
    v = f.test(PF_IN, "em0", pk(udp("198.51.100.3", SERVER, 9, 53)), 0.0)
    assert not v.passed and v.reason == "src-limit"
    assert len(f.srcnodes) == 1


def test_nodes_expire_src_track_seconds_after_last_state() -> None:
    f = make_filter("set timeout src.track 10\n"
                    "pass in proto udp keep state (max-src-states 5)\n")
    assert f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, 9, 53)), 0.0).passed
    assert f.srcnodes.inserts == 1 and f.srcnodes.searches == 1
    assert f.kill_states(1.0, host=CLIENT) == 1
    sn = next(iter(f.srcnodes.nodes.values()))
    assert sn.states == 0 and sn.expire == 11.0
    f.expire(10.9, full=True)
    assert len(f.srcnodes) == 1
    lines = format_sources(f.srcnodes, 5.0, verbose=True)
    assert lines[0] == f"{CLIENT} ( states 0, connections 0, rate 0.0/0s )"
    assert lines[1].startswith("   age 00:00:05, expires in 00:00:06, 1 pkts,")
    f.expire(11.0, full=True)
    assert len(f.srcnodes) == 0 and f.srcnodes.removals == 1
    assert not f.srcnodes.by_state and not f.srcnodes.pending


def test_node_reused_before_expiry() -> None:
    f = make_filter("set timeout src.track 10\n"
                    "pass in proto udp keep state (max-src-states 5)\n")
    f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, 9, 53)), 0.0)
    f.kill_states(1.0, host=CLIENT)
    assert len(f.srcnodes.idle) == 1
    f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, 10, 53)), 2.0)
    assert f.srcnodes.inserts == 1 and not f.srcnodes.idle  # found again, busy again
    f.expire(12.0, full=True)  # past the old expiry; the new state (udp.first 60) lives
    (sn,) = f.srcnodes.nodes.values()
    assert sn.states == 1 and f.srcnodes.removals == 0


def test_untracked_rules_make_no_nodes() -> None:
    f = make_filter("pass in proto tcp keep state\n")
    TcpConn(f).handshake()
    assert len(f.srcnodes) == 0 and not f.srcnodes.by_state and not f.srcnodes.pending
    assert f.srcnodes.searches == 0


def test_views_and_sync_flags() -> None:
    f = make_filter("pass in proto tcp keep state (max-src-conn-rate 10/5)\n"
                    "pass in proto udp keep state\n")
    TcpConn(f).handshake(now=0.0)
    f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, 9, 53)), 0.0)
    lines = format_sources(f.srcnodes, 1.0)
    assert lines == [f"{CLIENT} ( states 1, connections 1, rate 1.0/5s )"]
    (js,) = sources_json(f.srcnodes, 1.0)
    assert js["address"] == CLIENT and js["connections"] == 1 and js["rule"] == 0
    assert "Source Tracking Table" not in format_info(f, 2.0)  # pfctl -si shows it with -v
    info = format_info(f, 2.0, verbose=True)
    i = info.index("Source Tracking Table")
    assert info[i + 1].split() == ["current", "entries", "1"]
    assert info[i + 2].split()[:2] == ["searches", "1"]
    assert any(line.split()[:2] == ["src-limit", "0"] for line in info)
    assert "Limit Counters" in info
    tcp = next(st for st in f.states if st.key[1] == 6)
    udp_st = next(st for st in f.states if st.key[1] == 17)
    for dialect in ("openbsd45", "freebsd1400"):
        rec = export_state(tcp, 2.0, dialect, f.timeouts, len(f.states))
        assert rec.sync_flags == PFSYNC_FLAG_SRCNODE
        assert export_state(udp_st, 2.0, dialect, f.timeouts, len(f.states)).sync_flags == 0
        # the fast packer writes the same flag as the record encoder
        codec = wire.TABLES[dialect][wire.ACTIONS[dialect]["INS"]][2]
        assert codec is not None
        buf = bytearray(codec.size)
        codec.encode_into(buf, 0, rec)
        assert pack_state(tcp, 2.0, dialect, f.timeouts, len(f.states)) == bytes(buf)


ROUND = """table <bad> persist
pass in proto tcp to port 22 keep state (max 50, source-track rule, max-src-states 3, \
max-src-conn 10, max-src-conn-rate 15/5, max-src-nodes 20, overload <bad> flush global)
pass in proto tcp to port 80 keep state (max-src-conn 100, overload <bad> flush)
pass in proto udp keep state (source-track global, max-src-states 2)
pass in proto udp to port 53 keep state (source-track)
"""


def test_print_round_trip() -> None:
    first = format_rules(parse_rules(ROUND).rules)
    assert "source-track rule, max-src-states 3, max-src-conn 10, max-src-conn-rate 15/5, " \
           "max-src-nodes 20, overload <bad> flush global" in first[0]
    # max-src-conn alone tracks per rule, as pfctl prints it
    assert first[1].endswith("(source-track rule, max-src-conn 100, overload <bad> flush)")
    assert first[2].endswith("(source-track global, max-src-states 2)")
    assert first[3].endswith("(source-track global)")
    again = format_rules(parse_rules("table <bad> persist\n" + "\n".join(first) + "\n").rules)
    assert again == first


@pytest.mark.parametrize("text, where, msg", [
    ("pass keep state (source-track global, max-src-conn 3)\n", "1:39",
     "'max-src-conn' is incompatible with 'source-track global'"),
    ("pass keep state (max-src-nodes 3, source-track global)\n", "1:35",
     "'max-src-nodes' is incompatible with 'source-track global'"),
    ("pass keep state (max-src-conn-rate 3 5)\n", "1:38", "expected '/'"),
    ("pass keep state (max-src-conn-rate 3/0)\n", "1:38", ""),
    ("pass keep state (max-src-states 0)\n", "1:33", ""),
    ("pass keep state (max-src-conn 3, max-src-conn 4)\n", "1:34", "multiple definitions"),
    ("pass keep state (overload bad)\n", "1:27", "expected '<table>'"),
    ("table <c> const { 192.0.2.1 }\npass keep state (overload <c>)\n", "2:27", "const"),
    ("pass no state (max-src-states 3)\n", "1:", ""),
    ("block in all (max-src-states 3)\n", "1:", ""),
])
def test_errors_at_file_line_col(text: str, where: str, msg: str) -> None:
    with pytest.raises(RuleSyntaxError) as ei:
        parse_rules(text, "pf.conf")
    s = str(ei.value)
    assert s.startswith(f"pf.conf:{where}"), s
    assert msg in s
