"""Issue 2 acceptance: the state table, expiry, limits, kill/flush and the pfctl views."""

from __future__ import annotations

import re

from pfcluster.pf import pfctl
from pfcluster.pf.constants import PF_IN, PF_OUT, PFTM, TCPS
from test_pf_helpers import CLIENT, HOSTID, SERVER, TcpConn, make_filter, udp

RULES = """
block all
pass in on em0 proto tcp to port 5201
pass in on em0 proto udp to port 53
"""

FIN_WAIT_2 = int(TCPS.FIN_WAIT_2)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, float]] = []

    def state_inserted(self, st, now):
        self.events.append(("ins", st.id, now))

    def state_updated(self, st, now):
        self.events.append(("upd", st.id, now))

    def state_removed(self, st, now):
        self.events.append(("del", st.id, now))


def printf(fmt: str, *args: object) -> str:
    """C printf, for pfctl's own format strings."""
    return fmt % args


def syn_flood(f, n: int, now: float = 0.0, start: int = 30000) -> list:
    out = []
    for i in range(n):
        out.append(TcpConn(f, sport=start + i).c("S", now=now))
    return out


# -- tcp.closed purge, by lookup and by the purge walk -----------------------------------


def closed_filter(now_rst: float = 10.0):
    f = make_filter("set timeout tcp.closed 5\n" + RULES)
    conn = TcpConn(f)
    conn.handshake(now=0)
    v = conn.c("R", now=now_rst)
    assert v.passed
    st = v.state
    assert st.timeout == PFTM.TCP_CLOSED and st.expire == now_rst
    return f, conn, st


def test_tcp_closed_timeout_purges_after_5s_via_lookup() -> None:
    f, _conn, st = closed_filter()
    assert f._lookup(st.key, 14.9) is st
    assert st.linked
    assert f._lookup(st.key, 15.1) is None
    assert not st.linked and len(f.states) == 0


def test_tcp_closed_timeout_purges_after_5s_via_expire() -> None:
    f, _conn, st = closed_filter()
    rec = Recorder()
    f.listener = rec
    assert f.expire(14.9) == 0 and st.linked and len(f.states) == 1
    assert f.expire(15.1) == 1 and not st.linked and len(f.states) == 0
    assert rec.events == [("del", st.id, 15.1)]
    assert pfctl.counters_dict(f, 16)["states"]["removals"] == 1


def test_tcp_closed_timeout_seen_by_packets() -> None:
    _f, conn, st = closed_filter()
    # at 14.9 a late ACK still matches the (closed) state ...
    v = conn.c("A", now=14.9)
    assert v.passed and v.state is st
    # ... which restarted its 5 s; without state a bare ACK meets `flags S/SA` and is blocked
    v = conn.c("A", now=19.8)
    assert v.passed and v.state is st
    v = conn.c("A", now=25.0)
    assert not v.passed and v.state is None and v.rule.nr == 0
    assert not st.linked


def test_every_default_timeout_is_applied() -> None:
    f = make_filter(RULES)
    conn = TcpConn(f)
    st = conn.c("S", now=100).state
    n = len(f.states)
    from pfcluster.pf.state import state_expires

    assert state_expires(st, f.timeouts, n) == 100 + 120  # tcp.first
    conn.s("SA", now=101)
    assert state_expires(st, f.timeouts, n) == 101 + 30  # tcp.opening
    conn.c("A", now=102)
    assert state_expires(st, f.timeouts, n) == 102 + 86400  # tcp.established
    conn.c("FA", now=103)
    assert state_expires(st, f.timeouts, n) == 103 + 900  # tcp.closing
    conn.s("FA", now=104)
    assert state_expires(st, f.timeouts, n) == 104 + 45  # tcp.finwait
    conn.c("A", now=105)
    assert state_expires(st, f.timeouts, n) == 105 + 90  # tcp.closed


def test_rule_timeout_overrides_global() -> None:
    f = make_filter("pass in on em0 proto tcp to port 5201 keep state (tcp.first 7)\n")
    st = TcpConn(f).c("S", now=0).state
    assert f.expire(6.9) == 0 and st.linked
    assert f.expire(7.0) == 1 and not st.linked


# -- adaptive timeouts ------------------------------------------------------------------


def test_adaptive_timeouts_shorten_expiry_above_start() -> None:
    f = make_filter("set timeout { adaptive.start 2, adaptive.end 10 }\n" + RULES)
    syn_flood(f, 6, now=0)
    # 6 states > start 2: tcp.first 120 * (10 - 6) / (10 - 2) = 60
    assert f.expire(59.9) == 0 and len(f.states) == 6
    assert f.expire(60.1) == 6 and len(f.states) == 0


def test_adaptive_timeouts_do_not_apply_below_start() -> None:
    f = make_filter("set timeout { adaptive.start 2, adaptive.end 10 }\n" + RULES)
    syn_flood(f, 2, now=0)
    assert f.expire(119.9) == 0 and len(f.states) == 2
    assert f.expire(120.0) == 2


def test_adaptive_at_end_expires_at_once() -> None:
    f = make_filter("set timeout { adaptive.start 2, adaptive.end 5 }\n" + RULES)
    syn_flood(f, 5, now=0)
    assert f.expire(0.5) == 5


def test_adaptive_timeouts_via_lookup() -> None:
    f = make_filter("set timeout { adaptive.start 2, adaptive.end 10 }\n" + RULES)
    vs = syn_flood(f, 6, now=0)
    st = vs[0].state
    assert f._lookup(st.key, 59.9) is st
    assert f._lookup(st.key, 60.1) is None


def test_limit_states_sets_adaptive_defaults() -> None:
    # set limit states 10 -> adaptive.start 6, adaptive.end 12 (pfctl_load_options)
    f = make_filter("set limit states 10\n" + RULES)
    syn_flood(f, 9, now=0)
    # 120 * (12 - 9) / (12 - 6) = 60
    assert f.expire(59.9) == 0
    assert f.expire(60.1) == 9


def test_rule_max_gives_rule_adaptive_timeouts() -> None:
    # `max 10` -> the rule's own adaptive.start 6 / end 12, counted on states_cur;
    # the purge walk collects expired states first and removes them afterwards, as pf
    # does, so every state is judged against the same count.
    f = make_filter("pass in on em0 proto tcp to port 5201 keep state (max 10)\n")
    syn_flood(f, 9, now=0)
    assert f.ruleset.rules[0].states_cur == 9
    assert f.expire(59.9) == 0
    assert f.expire(60.1) == 9
    assert f.ruleset.rules[0].states_cur == 0


# -- limits ----------------------------------------------------------------------------


def test_set_limit_states_drops_new_states() -> None:
    """A full state pool: pool_get fails in pf_create_state -> PFRES_MEMORY."""
    f = make_filter("set limit states 3\n" + RULES)
    vs = syn_flood(f, 4, now=0)
    assert [v.passed for v in vs] == [True, True, True, False]
    assert vs[3].reason == "memory" and vs[3].state is None and vs[3].rule.nr == 1
    c = pfctl.counters_dict(f, 1)["counters"]
    assert c["memory"] == 1 and c["state-limit"] == 0
    assert pfctl.counters_dict(f, 1)["states"]["limit"] == 3
    # existing states still pass traffic
    assert TcpConn(f, sport=30000, c_isn=1000).s("SA").passed


def test_rule_max_drops_with_state_limit_and_frees_on_removal() -> None:
    f = make_filter(
        "pass in on em0 proto tcp to port 5201 keep state (max 2)\n"
        "pass in on em0 proto tcp to port 5202 keep state\n"
    )
    vs = syn_flood(f, 3, now=0)
    assert [v.passed for v in vs] == [True, True, False]
    assert vs[2].reason == "state-limit"
    assert pfctl.counters_dict(f, 1)["counters"]["state-limit"] == 1
    # another rule is not limited
    assert TcpConn(f, dport=5202).c("S").passed
    # removing one of the rule's states frees a slot
    f.remove_state(vs[0].state, 1)
    assert f.ruleset.rules[0].states_cur == 1
    assert TcpConn(f, sport=31000).c("S", now=1).passed


# -- kill / flush -------------------------------------------------------------------------


def populated():
    f = make_filter(RULES)
    TcpConn(f).handshake(now=0)
    f.test(PF_IN, "em0", __import__("test_pf_helpers").pk(udp(CLIENT, SERVER, 5353, 53)), 0)
    f.test(PF_IN, "em0", __import__("test_pf_helpers").pk(udp("198.51.100.7", SERVER, 5353, 53)), 0)
    assert len(f.states) == 3
    return f


def test_kill_by_host() -> None:
    # pfctl -k host: the states originating from that host, nothing towards it.
    f = populated()
    rec = Recorder()
    f.listener = rec
    assert f.kill_states(1, host=CLIENT) == 2
    assert len(f.states) == 1 and [e[0] for e in rec.events] == ["del", "del"]
    # a single host does not match states towards it
    assert f.kill_states(1, host=SERVER) == 0 and len(f.states) == 1
    assert f.kill_states(1, host="198.51.100.7") == 1 and len(f.states) == 0


def test_kill_by_host_pair_and_none() -> None:
    f = populated()
    assert f.kill_states(1, host=SERVER, host2=CLIENT) == 0  # the source must come first
    assert f.kill_states(1, host="198.51.100.7", host2=SERVER) == 1
    assert f.kill_states(1, host="192.0.2.99") == 0
    assert len(f.states) == 2


def test_kill_by_id() -> None:
    f = populated()
    st = next(iter(f.states))
    assert f.kill_states(1, state_id=f"{st.id:016x}/{HOSTID + 1:08x}") == 0
    assert f.kill_states(1, state_id=f"{st.id:016x}/{HOSTID:08x}") == 1
    st2 = next(iter(f.states))
    assert f.kill_states(1, state_id=f"{st2.id:x}") == 1
    assert len(f.states) == 1


def test_flush() -> None:
    f = populated()
    rules = f.ruleset.rules
    assert f.flush_states(1) == 3 and len(f.states) == 0
    assert all(r.states_cur == 0 for r in rules)
    assert f.flush_states(2) == 0


def test_state_ids_are_unique_and_indexed() -> None:
    f = populated()
    sts = list(f.states)
    assert len({st.id for st in sts}) == 3
    for st in sts:
        assert f.states.by_id(HOSTID, st.id) is st and st.creatorid == HOSTID
    assert pfctl.counters_dict(f, 0)["states"]["inserts"] == 3


def test_listener_hears_insert_update_remove() -> None:
    f = make_filter(RULES)
    rec = Recorder()
    f.listener = rec
    conn = TcpConn(f)
    conn.handshake(now=1)
    st = next(iter(f.states))
    f.kill_states(2, state_id=f"{st.id:x}")
    assert rec.events == [("ins", st.id, 1), ("upd", st.id, 1), ("upd", st.id, 1), ("del", st.id, 2)]


# -- pfctl -ss / -ss -v / -si -------------------------------------------------------------


def test_format_states_established() -> None:
    f = make_filter(RULES)
    conn = TcpConn(f)
    conn.handshake(now=0)
    conn.c("PA", b"x" * 100, now=1)
    conn.s("A", now=1)
    assert pfctl.format_states(f, 9) == [
        "all tcp 203.0.113.10:5201 <- 198.51.100.2:40000       ESTABLISHED:ESTABLISHED"
    ]
    st = next(iter(f.states))
    lines = pfctl.format_states(f, 9, verbose=True)
    # an inbound state prints its peers the way round pfctl does (src = st->dst first)
    assert lines == [
        "all tcp 203.0.113.10:5201 <- 198.51.100.2:40000       ESTABLISHED:ESTABLISHED",
        f"   [{st.dst.seqlo} + {st.dst.seqhi - st.dst.seqlo}] wscale 7"
        f"  [{st.src.seqlo} + {st.src.seqhi - st.src.seqlo}] wscale 7",
        "   age 00:00:09, expires in 23:59:52, 3:2 pkts, 228:88 bytes, rule 1",
        f"   id: {st.id:016x} creatorid: {HOSTID:08x}",
    ]
    assert st.src.seqlo == 1101 and st.dst.seqlo == 5001


def test_format_states_inbound_half_open_prints_dst_first() -> None:
    """pfctl print_state: for an inbound state src = &s->dst, dst = &s->src."""
    f = make_filter(RULES)
    TcpConn(f).c("S", now=0)
    assert pfctl.format_states(f, 0) == ["all tcp 203.0.113.10:5201 <- 198.51.100.2:40000       CLOSED:SYN_SENT"]
    lines = pfctl.format_states(f, 0, verbose=True)
    assert lines[1] == "   [0 + 1]  [1000 + 2]"  # no wscale: the responder has not spoken


def test_format_states_outbound() -> None:
    f = make_filter("pass out on em1 proto tcp to port 5201\n")
    conn = TcpConn(f, router=True)
    conn.c("S", now=0)
    assert pfctl.format_states(f, 0) == ["all tcp 198.51.100.2:40000 -> 203.0.113.10:5201       SYN_SENT:CLOSED"]


def test_format_states_udp_and_expiry_clock() -> None:
    from test_pf_helpers import pk

    f = make_filter(RULES)
    f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, 5353, 53)), 0)
    assert pfctl.format_states(f, 0) == ["all udp 203.0.113.10:53 <- 198.51.100.2:5353       NO_TRAFFIC:SINGLE"]
    f.test(PF_OUT, "em0", pk(udp(SERVER, CLIENT, 53, 5353)), 1)
    assert pfctl.format_states(f, 1) == ["all udp 203.0.113.10:53 <- 198.51.100.2:5353       SINGLE:MULTIPLE"]
    f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, 5353, 53)), 2)
    lines = pfctl.format_states(f, 3, verbose=True)
    assert lines[0] == "all udp 203.0.113.10:53 <- 198.51.100.2:5353       MULTIPLE:MULTIPLE"
    assert lines[1] == "   age 00:00:03, expires in 00:00:59, 2:1 pkts, 58:29 bytes, rule 2"
    assert re.fullmatch(r"   id: [0-9a-f]{16} creatorid: 0a0b0c0d", lines[2])


def test_states_json() -> None:
    f = make_filter(RULES)
    TcpConn(f).handshake(now=0)
    (d,) = pfctl.states_json(f, 5)
    assert d["states"] == "ESTABLISHED:ESTABLISHED" and d["direction"] == "in"
    assert d["key"] == {"addr": [CLIENT, SERVER], "port": [40000, 5201]}
    assert d["expires_in"] == 86400 - 5 and d["age"] == 5 and d["rule"] == 1
    assert d["packets"] == [2, 1] and d["creatorid"] == f"{HOSTID:08x}"


def test_format_info_matches_pfctl_si() -> None:
    f = make_filter("set limit states 1\n" + RULES, now=0)
    conn = TcpConn(f)
    conn.handshake(now=0)
    conn.c("PA", b"x", seq=10**8, now=1)  # state-mismatch
    TcpConn(f, sport=1).c("S", now=1)  # memory (state table full)
    TcpConn(f, dport=23).c("S", now=1)  # blocked by rule (match)
    lines = pfctl.format_info(f, 10)
    assert lines[0].startswith("Status: Enabled for 0 days 00:00:10")
    # "%-44s" then "%15s" for the debug level
    assert lines[0] == printf("%-44s%15s", "Status: Enabled for 0 days 00:00:10", "Debug: " + lines[0].split("Debug: ")[1])
    # pfctl print_status, printf for printf
    i = lines.index(printf("%-27s %14s %16s", "State Table", "Total", "Rate"))
    assert lines[i + 1] == printf("  %-25s %14u %14s", "current entries", 1, "")
    assert lines[i + 2] == printf("  %-25s %14u %14.1f/s", "searches", 6, 0.6)
    assert lines[i + 3] == printf("  %-25s %14u %14.1f/s", "inserts", 1, 0.1)
    assert lines[i + 4] == printf("  %-25s %14u %14.1f/s", "removals", 0, 0.0)
    assert lines[i + 5] == "Counters"
    counters = dict(re.fullmatch(r"  (\S+) +(\d+) +[\d.]+/s", ln).groups() for ln in lines[i + 6:])
    assert counters["state-mismatch"] == "1"
    assert counters["memory"] == "1"
    assert counters["match"] == "3"
    assert lines[i + 6] == printf("  %-25s %14u %14.1f/s", "match", 3, 0.3)
    assert lines[i + 6 + 10] == printf("  %-25s %14u %14.1f/s", "state-mismatch", 1, 0.1)
    d = pfctl.counters_dict(f, 10)
    assert d["hostid"] == f"{HOSTID:08x}" and d["running_seconds"] == 10
    assert d["states"] == {"current": 1, "searches": 6, "inserts": 1, "removals": 0, "limit": 1}
    assert d["counters"]["state-mismatch"] == 1 and d["counters"]["memory"] == 1
    assert d["packets"]["blocked-in"] == 3 and d["packets"]["passed-in"] == 2
    assert d["packets"]["passed-out"] == 1
