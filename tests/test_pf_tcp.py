"""Issue 2 acceptance: pf TCP state tracking, scripted with scapy.

Expected values are worked out by hand from pf_tcp_track_full as
reference/pf-behaviour-facts.md §1-§2 quotes it, not read back from the engine.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from pfcluster.pf import pfctl
from pfcluster.pf.constants import (
    MAXACKWINDOW,
    PF_IN,
    PF_OUT,
    PFTM,
    TCPS,
)
from test_pf_helpers import CLIENT, CLIENT6, SERVER, SERVER6, TcpConn, make_filter, peers

RULES = """
block all
pass in on em0 proto tcp to port 5201
"""
RULES6 = RULES  # the same rules, address-family free

ESTABLISHED = int(TCPS.ESTABLISHED)
SYN_SENT = int(TCPS.SYN_SENT)
CLOSED = int(TCPS.CLOSED)
CLOSING = int(TCPS.CLOSING)
FIN_WAIT_2 = int(TCPS.FIN_WAIT_2)
TIME_WAIT = int(TCPS.TIME_WAIT)
WS7 = 0x80 | 7


def mismatches(f) -> int:
    return pfctl.counters_dict(f, 0)["counters"]["state-mismatch"]


@pytest.fixture
def conn() -> TcpConn:
    return TcpConn(make_filter(RULES))


# -- the handshake and window scaling ------------------------------------------------


def test_first_packet_creates_state_as_pf_create_state(conn: TcpConn) -> None:
    v = conn.c("S", now=1.0)
    assert v.passed and v.new_state and v.reason == "match" and v.rule.nr == 1
    st = v.state
    # seqhi = seq + len + 1, +1 more for the SYN; max_win unscaled, rounded up.
    assert st.src.as_tuple() == (1000, 1002, 0, (64240 + 127) >> 7, 0, SYN_SENT, WS7)
    assert (st.dst.seqlo, st.dst.seqhi, st.dst.max_win, st.dst.state) == (0, 1, 1, CLOSED)
    assert st.timeout == PFTM.TCP_FIRST_PACKET
    assert st.direction == PF_IN and st.creation == 1.0 and st.expire == 1.0


def test_window_scaling_negotiated_and_unscaled(conn: TcpConn) -> None:
    st = conn.c("S").state
    conn.s("SA")
    # SYN|ACK: responder's window unscaled (65160 -> 510); its seqhi opens the
    # initiator's window scaled back up: end + (502 << 7).
    assert st.dst.wscale == WS7 and st.dst.max_win == (65160 + 127) >> 7 == 510
    assert st.dst.seqhi == 5001 + (502 << 7) == 69257
    # the client may send up to ack + (win << sws) = 1001 + (510 << 7)
    assert st.src.seqhi == 1001 + (510 << 7) == 66281
    assert (st.src.state, st.dst.state) == (ESTABLISHED, SYN_SENT)
    conn.c("A")
    assert peers(st) == (
        (1000, 66281, 0, 502, 0, ESTABLISHED, WS7),
        (5001, 69257, 0, 510, 0, ESTABLISHED, WS7),
    )


def test_window_scaling_refused_by_responder_undoes_scale() -> None:
    conn = TcpConn(make_filter(RULES), s_ws=None)
    st = conn.c("S").state
    conn.s("SA")
    # responder sent no wscale: dst->max_win = MIN(TCP_MAXWIN, 502 << 7), wscale = 0
    assert st.src.wscale == 0 and st.dst.wscale == 0
    assert st.src.max_win == min(65535, 502 << 7) == 64256
    assert st.dst.max_win == 65160
    assert st.dst.seqhi == 5001 + 64256
    v = conn.c("A")
    assert v.passed
    assert (st.src.state, st.dst.state) == (ESTABLISHED, ESTABLISHED)


def test_no_window_scaling_at_all() -> None:
    conn = TcpConn(make_filter(RULES), c_ws=None, s_ws=None)
    st = conn.c("S").state
    assert st.src.wscale == 0 and st.src.max_win == 64240
    conn.s("SA")
    conn.c("A")
    assert st.dst.seqhi == 5001 + 64240
    assert st.src.seqhi == 1001 + 65160


# -- a whole conversation and the timeout ladder ----------------------------------------


def test_conversation_handshake_data_fin_close(conn: TcpConn) -> None:
    ladder = []
    v = conn.c("S", now=0)
    st = v.state
    ladder.append(st.timeout)
    for who, flags, data, t in [
        ("s", "SA", b"", 0.1),
        ("c", "A", b"", 0.2),
        ("c", "PA", b"q" * 100, 1),
        ("s", "A", b"", 1.1),
        ("s", "PA", b"r" * 1400, 2),
        ("c", "A", b"", 2.1),
        ("c", "FA", b"", 3),
        ("s", "A", b"", 3.1),
        ("s", "FA", b"", 4),
        ("c", "A", b"", 4.1),
    ]:
        v = conn.send(who == "c", flags, data, now=t)
        assert v.passed and v.reason == "state" and v.state is st, (flags, v)
        ladder.append(st.timeout)
    assert ladder == [
        PFTM.TCP_FIRST_PACKET,  # SYN
        PFTM.TCP_OPENING,  # SYN|ACK: server still SYN_SENT
        PFTM.TCP_ESTABLISHED,  # ACK
        PFTM.TCP_ESTABLISHED,
        PFTM.TCP_ESTABLISHED,
        PFTM.TCP_ESTABLISHED,
        PFTM.TCP_ESTABLISHED,
        PFTM.TCP_CLOSING,  # first FIN
        PFTM.TCP_CLOSING,  # its ACK: client FIN_WAIT_2, server ESTABLISHED
        PFTM.TCP_FIN_WAIT,  # second FIN: both >= CLOSING
        PFTM.TCP_CLOSED,  # last ACK: both FIN_WAIT_2
    ]
    assert (st.src.state, st.dst.state) == (FIN_WAIT_2, FIN_WAIT_2)
    assert (st.packets0, st.packets1) == (6, 5)
    assert st.src.seqlo == conn.c_nxt and st.dst.seqlo == conn.s_nxt
    assert st.expire == 4.1
    assert len(conn.f.states) == 1 and mismatches(conn.f) == 0


def test_retransmission_within_window_passes(conn: TcpConn) -> None:
    conn.handshake()
    st = conn.c("PA", b"d" * 500, now=1).state
    seqlo = st.src.seqlo
    assert seqlo == 1001 + 500
    v = conn.c("PA", b"d" * 500, seq=1001, now=2)
    assert v.passed and v.reason == "state"
    assert st.src.seqlo == seqlo and st.expire == 2


# -- out-of-window data, the BAD state log, the checks -------------------------------------

STATE4 = (
    "TCP in wire: (0) 198.51.100.2:40000 203.0.113.10:5201 stack: (0) -"
    " [lo=1000 high=66281 win=502 modulator=0 wscale=7]"
    " [lo=5001 high=69257 win=510 modulator=0 wscale=7] 4:4 @1"
)


def test_data_beyond_seqhi_is_blocked_with_exact_log(conn: TcpConn) -> None:
    conn.handshake()
    st = conn.f.states.get(next(iter(conn.f.states)).key)
    before = peers(st)
    seq = 1001 + 200000
    v = conn.c("PA", b"x" * 100, seq=seq, now=1)
    assert not v.passed and v.reason == "state-mismatch" and v.state is st
    assert v.log == [
        f"pf: BAD state: {STATE4} PA seq={seq} ({seq}) ack=5001 len=100 ackskew=0"
        " pkts=2:1 dir=in,fwd",
        "pf: State failure on: 1       | 5  ",
    ]
    assert peers(st) == before and st.expire == 0
    assert mismatches(conn.f) == 1
    assert pfctl.counters_dict(conn.f, 1)["packets"]["blocked-in"] == 1


def test_data_just_past_seqhi_fails_only_check_1(conn: TcpConn) -> None:
    conn.handshake()
    st = next(iter(conn.f.states))
    # last octet = seqhi + 1: outside the strict window, inside seqhi + MAXACKWINDOW
    seq = st.src.seqhi - 100
    v = conn.c("PA", b"x" * 101, seq=seq)
    assert not v.passed
    assert v.log[1] == "pf: State failure on: 1       |    "
    # one octet less fits: data_end == seqhi
    v = conn.c("PA", b"x" * 100, seq=seq)
    assert v.passed


def test_old_data_fails_check_2_and_6(conn: TcpConn) -> None:
    conn.handshake()
    conn.c("PA", b"y" * 100)
    seq = (1101 - 200000) & 0xFFFFFFFF
    v = conn.c("PA", b"z" * 10, seq=seq)
    assert not v.passed
    assert v.log[0].endswith(f"PA seq={seq} ({seq}) ack=5001 len=10 ackskew=0 pkts=3:1 dir=in,fwd")
    assert v.log[1] == "pf: State failure on:   2     |   6"


def test_ack_too_far_forward_fails_check_3(conn: TcpConn) -> None:
    conn.handshake()
    ack = 5001 + MAXACKWINDOW + 1
    v = conn.c("A", b"w" * 10, ack=ack)
    assert not v.passed
    assert f"ack={ack} len=10 ackskew={-(MAXACKWINDOW + 1)} " in v.log[0]
    assert v.log[1] == "pf: State failure on:     3   |    "
    v = conn.c("A", b"w" * 10, ack=5001 + MAXACKWINDOW)  # exactly -MAXACKWINDOW is fine
    assert v.passed


def test_ack_too_far_back_fails_check_4_scaled_by_sws(conn: TcpConn) -> None:
    conn.handshake()
    # ackskew <= MAXACKWINDOW << sws (sws = 7 here): a plain 100000 back is fine ...
    assert conn.c("A", ack=5001 - 100000).passed
    # ... one more than the scaled limit is not
    ack = (5001 - (MAXACKWINDOW << 7) - 1) & 0xFFFFFFFF
    v = conn.c("A", ack=ack)
    assert not v.passed
    assert v.log[1] == "pf: State failure on:       4 |    "


def test_server_side_failure_logs_out_rev(conn: TcpConn) -> None:
    conn.handshake()
    v = conn.s("PA", b"s" * 10, seq=5001 + 300000)
    assert not v.passed
    # the client's seqlo is still its ISN (the handshake ACK carried no data), so the
    # server's ack of ISN+1 is one ahead: ackskew = -1, as pf computes it
    assert v.log[0].endswith("len=10 ackskew=-1 pkts=2:1 dir=out,rev")
    assert v.log[0].startswith(f"pf: BAD state: {STATE4} PA seq=305001 (305001) ack=1001 ")


def test_logging_can_be_switched_off(conn: TcpConn) -> None:
    conn.handshake()
    conn.f.log_enabled = False
    v = conn.c("PA", b"x", seq=1001 + 10**6)
    assert not v.passed and v.log == [] and mismatches(conn.f) == 1


# -- RSTs ------------------------------------------------------------------------------


def test_spoofed_rst_wrong_seq_is_blocked_and_state_intact(conn: TcpConn) -> None:
    conn.handshake()
    conn.c("PA", b"a" * 100, now=1)
    st = next(iter(conn.f.states))
    before = peers(st)
    for flags, seq, ack in [
        ("R", conn.c_nxt + 1000, None),  # in window, not exact, no ACK
        ("RA", conn.c_nxt + 1000, conn.s_nxt + 1),  # in window, ack not exact
        ("R", conn.c_nxt + 2, None),  # +2 is not one of seqlo, seqlo+1, seqlo-1
        ("R", conn.c_nxt - 2, None),
    ]:
        v = conn.c(flags, seq=seq, ack=ack, now=2)
        assert not v.passed and v.reason == "state-mismatch", (flags, seq)
        assert peers(st) == before and st.timeout == PFTM.TCP_ESTABLISHED
    assert mismatches(conn.f) == 4
    # the spoofed server-side RST is blocked too
    v = conn.s("R", seq=conn.s_nxt + 5000, now=2)
    assert not v.passed and peers(st) == before
    assert st.expire == 1


@pytest.mark.parametrize("delta", [0, 1, -1])
def test_exact_rst_closes_state(conn: TcpConn, delta: int) -> None:
    conn.handshake()
    conn.c("PA", b"a" * 100, now=1)
    st = next(iter(conn.f.states))
    seqlo = st.src.seqlo
    v = conn.c("R", seq=seqlo + delta, now=3)
    assert v.passed and v.state is st
    assert (st.src.state, st.dst.state) == (TIME_WAIT, TIME_WAIT)
    assert st.timeout == PFTM.TCP_CLOSED and st.expire == 3


def test_rst_ack_in_window_with_exact_ack_closes_state(conn: TcpConn) -> None:
    conn.handshake()
    conn.c("PA", b"a" * 100, now=1)
    st = next(iter(conn.f.states))
    v = conn.c("RA", seq=st.src.seqlo - 5000, ack=st.dst.seqlo, now=2)
    assert v.passed
    assert (st.src.state, st.dst.state) == (TIME_WAIT, TIME_WAIT)


# -- SYNs on existing states -------------------------------------------------------------


def test_syn_on_established_state_gets_challenge_ack(conn: TcpConn) -> None:
    conn.handshake()
    conn.c("PA", b"a" * 100, now=1)
    conn.s("A", now=1)
    st = next(iter(conn.f.states))
    before = peers(st)
    v = conn.c("S", seq=777777, now=2)
    assert not v.passed and v.state is st and v.reply is not None
    assert peers(st) == before and st.expire == 1
    r = IP(v.reply)
    assert (r.src, r.dst) == (SERVER, CLIENT)
    t = r[TCP]
    assert (t.sport, t.dport) == (5201, 40000)
    assert t.flags == "A"
    # pf_send_challenge_ack: seq = dst->seqlo, ack = src->seqlo
    assert t.seq == st.dst.seqlo == conn.s_nxt
    assert t.ack == st.src.seqlo == conn.c_nxt
    # checksums are right: scapy recomputes and compares
    assert IP(bytes(r)).chksum == r.chksum
    r2 = IP(v.reply)
    del r2[TCP].chksum
    assert IP(bytes(r2))[TCP].chksum == t.chksum
    assert mismatches(conn.f) == 0 and len(conn.f.states) == 1


def test_port_reuse_after_full_close_makes_fresh_state(conn: TcpConn) -> None:
    """Seed 000: the client reuses its port at once; modern pf purges the old state."""
    conn.handshake(now=0)
    conn.c("FA", now=1)
    conn.s("FA", now=1)
    conn.c("A", now=1)
    old = next(iter(conn.f.states))
    assert (old.src.state, old.dst.state) == (FIN_WAIT_2, FIN_WAIT_2)
    new_isn = 2345137961
    v = conn.c("S", seq=new_isn, now=2)
    assert v.passed and v.new_state and v.reason == "match" and v.rule.nr == 1
    st = v.state
    assert st is not old and st.id != old.id and not old.linked
    assert conn.f.states.get(old.key) is st and len(conn.f.states) == 1
    assert st.src.seqlo == new_isn and st.src.state == SYN_SENT and st.dst.state == CLOSED
    assert st.timeout == PFTM.TCP_FIRST_PACKET and st.creation == 2
    assert v.log and v.log[0].startswith("pf: state reuse TCP in wire: (0) ")
    assert v.log[0].endswith(" 9:9 @1 S")
    assert mismatches(conn.f) == 0
    assert pfctl.counters_dict(conn.f, 2)["states"]["removals"] == 1
    # the new connection then runs normally
    conn.c_nxt = new_isn + 1
    conn.s_nxt = 900000
    assert conn.s("SA", seq=899999, now=2).passed
    assert conn.c("A", now=2).passed
    assert (st.src.state, st.dst.state) == (ESTABLISHED, ESTABLISHED)


def test_port_reuse_after_rst(conn: TcpConn) -> None:
    conn.handshake()
    old = next(iter(conn.f.states))
    assert conn.c("R", seq=1001).passed
    v = conn.c("S", seq=99, now=1)
    assert v.passed and v.new_state and v.state.id != old.id


def test_port_reuse_syn_still_meets_the_rules() -> None:
    f = make_filter("block all\npass in on em0 proto tcp to port 5201\n")
    conn = TcpConn(f)
    conn.handshake()
    conn.c("R", seq=1001)
    old = next(iter(f.states))
    f.load(__import__("pfcluster.pf.rules", fromlist=["parse_rules"]).parse_rules("block all\n"))
    v = conn.c("S", seq=5, now=1)
    # the old state is purged all the same, then the SYN is blocked by the new rules
    assert not v.passed and v.rule.nr == 0 and not old.linked and len(f.states) == 0


def test_synack_on_closed_state_is_not_port_reuse(conn: TcpConn) -> None:
    conn.handshake()
    conn.c("R", seq=1001)
    st = next(iter(conn.f.states))
    v = conn.s("SA", seq=123456, now=1)
    assert st.linked and v.state is st
    assert conn.f.extra["state-reuse"] == 0


def test_retransmitted_syn_passes_on_opening_state(conn: TcpConn) -> None:
    st = conn.c("S").state
    v = conn.c("S", seq=1000, now=1)
    assert v.passed and v.state is st and not v.new_state


def test_handshake_mismatch_answers_rst_and_resets_sender(conn: TcpConn) -> None:
    st = conn.c("S").state
    # a SYN|ACK acking far beyond the client's ISN: check 3 fails while both peers
    # are SYN_SENT -> pf sends RST(seq = th_ack) and resets the sender, logs nothing
    bad_ack = 1001 + 10**6
    v = conn.s("SA", ack=bad_ack)
    assert not v.passed and v.reason == "state-mismatch" and v.log == []
    assert (st.dst.seqlo, st.dst.seqhi, st.dst.max_win) == (0, 1, 1)
    r = IP(v.reply)
    assert (r.src, r.dst) == (CLIENT, SERVER)
    t = r[TCP]
    assert (t.sport, t.dport) == (40000, 5201)
    assert t.flags == "R" and t.seq == bad_ack and t.ack == 0
    # the real SYN|ACK then passes
    conn.s_nxt = 5000
    assert conn.s("SA").passed and conn.c("A").passed


# -- loose matching ----------------------------------------------------------------------


def test_loose_match_after_close_does_not_refresh_expiry(conn: TcpConn) -> None:
    conn.handshake()
    conn.c("FA", now=1)
    conn.s("FA", now=1)
    conn.c("A", now=10)
    st = next(iter(conn.f.states))
    assert st.expire == 10 and st.timeout == PFTM.TCP_CLOSED
    # acking beyond what the server sent: strict check 3 fails, loose checks pass
    v = conn.c("A", ack=conn.s_nxt + MAXACKWINDOW + 10, now=20)
    assert v.passed and v.state is st
    assert conn.f.extra["loose-match"] == 1
    assert st.expire == 10


# -- a router: two states per connection -------------------------------------------------

ROUTER_RULES = """
block all
pass in on em0 proto tcp to port 5201
pass out on em1 proto tcp to port 5201
"""


def test_router_flow_creates_two_states_that_both_track() -> None:
    f = make_filter(ROUTER_RULES)
    conn = TcpConn(f, router=True)
    v = conn.c("S", now=0)
    assert [h.new_state for h in conn.hops] == [True, True]
    s_in, s_out = (h.state for h in conn.hops)
    assert s_in is not s_out and s_in.id != s_out.id
    assert (s_in.direction, s_out.direction) == (PF_IN, PF_OUT)
    assert (s_in.rule.nr, s_out.rule.nr) == (1, 2)
    conn.s("SA", now=0.1)
    assert [h.state for h in conn.hops] == [s_out, s_in]
    conn.c("A", now=0.2)
    conn.c("PA", b"p" * 1000, now=1)
    v = conn.s("PA", b"q" * 2000, now=1.1)
    assert v.passed
    conn.c("A", now=1.2)
    for st in (s_in, s_out):
        assert (st.src.state, st.dst.state) == (ESTABLISHED, ESTABLISHED)
        assert st.src.seqlo == conn.c_nxt and st.dst.seqlo == conn.s_nxt
        assert (st.packets0, st.packets1) == (4, 2)
        assert st.timeout == PFTM.TCP_ESTABLISHED
    assert peers(s_in) == peers(s_out)
    lines = pfctl.format_states(f, 2)
    assert "all tcp 203.0.113.10:5201 <- 198.51.100.2:40000       ESTABLISHED:ESTABLISHED" in lines
    assert "all tcp 198.51.100.2:40000 -> 203.0.113.10:5201       ESTABLISHED:ESTABLISHED" in lines
    # out-of-window data is caught at the first hop
    v = conn.c("PA", b"x", seq=conn.c_nxt + 10**6, now=3)
    assert not v.passed and len(conn.hops) == 1 and mismatches(f) == 1
    conn.c("R", now=4)
    for st in (s_in, s_out):
        assert (st.src.state, st.dst.state) == (TIME_WAIT, TIME_WAIT)


# -- rule options: sloppy, no state, flags, block return -----------------------------------


def test_sloppy_state_ignores_sequence_numbers() -> None:
    f = make_filter("block all\npass in on em0 proto tcp to port 5201 keep state (sloppy)\n")
    conn = TcpConn(f)
    conn.handshake()
    st = next(iter(f.states))
    assert st.state_flags & 0x02
    v = conn.c("PA", b"x" * 100, seq=1001 + 10**7, now=1)
    assert v.passed and v.reason == "state" and st.expire == 1
    assert conn.c("R", seq=12345, now=2).passed
    assert (st.src.state, st.dst.state) == (TIME_WAIT, TIME_WAIT)
    assert st.timeout == PFTM.TCP_CLOSED and mismatches(f) == 0


def test_sloppy_one_sided_view_establishes_and_half_closes() -> None:
    f = make_filter("block all\npass in on em0 proto tcp to port 5201 keep state (sloppy)\n")
    conn = TcpConn(f)
    st = conn.c("S").state
    conn.c("A", now=1)  # never see the SYN|ACK (asymmetric path)
    assert (st.src.state, st.dst.state) == (ESTABLISHED, ESTABLISHED)
    assert st.timeout == PFTM.TCP_ESTABLISHED
    conn.c("F", now=2)
    assert st.src.state == CLOSING and st.dst.state == ESTABLISHED
    assert st.timeout == PFTM.TCP_CLOSING
    conn.c("A", now=3)  # dst.seqlo == 0: half-connection close
    assert st.dst.state == CLOSING and st.timeout == PFTM.TCP_FIN_WAIT
    # a FIN|ACK does both at once (FIN first, then the ACK rule)
    conn2 = TcpConn(make_filter("pass in on em0 proto tcp keep state (sloppy)\n"))
    st2 = conn2.c("S").state
    conn2.c("A")
    conn2.c("FA")
    assert (st2.src.state, st2.dst.state) == (CLOSING, CLOSING)


def test_no_state_rules_create_no_state() -> None:
    f = make_filter(
        "block all\n"
        "pass in on em0 proto tcp to port 5201 no state\n"
        "pass out on em0 proto tcp from port 5201 no state\n"
    )
    conn = TcpConn(f)
    conn.handshake()
    v = conn.c("PA", b"x", seq=10**9)  # nothing tracks the window
    assert v.passed and v.state is None and v.rule.nr == 1 and not v.new_state
    assert len(f.states) == 0


def test_default_flags_s_sa_blocks_midstream_ack() -> None:
    f = make_filter(RULES)
    conn = TcpConn(f)
    v = conn.c("A", seq=1001, ack=5001)
    assert not v.passed and v.rule.nr == 0 and v.state is None and len(f.states) == 0
    v = conn.c("SA", seq=1001, ack=5001)
    assert not v.passed and len(f.states) == 0
    assert conn.c("S").passed and len(f.states) == 1


def test_flags_any_picks_up_midstream_connection() -> None:
    f = make_filter("block all\npass in on em0 proto tcp to port 5201 flags any\n")
    conn = TcpConn(f, c_ws=None, s_ws=None)
    v = conn.c("PA", b"m" * 10, seq=1001, ack=5001)
    assert v.passed and v.new_state
    st = v.state
    assert st.src.as_tuple()[:2] == (1001, 1001 + 10 + 1)
    # the server's first packet sets its side (src->seqlo == 0 path); the client's
    # state was SYN_SENT so the server's ACK establishes it
    v = conn.s("A", seq=5001, ack=1011)
    assert v.passed
    assert st.src.state == ESTABLISHED and st.dst.state == SYN_SENT


def test_block_return_tcp_sends_rst() -> None:
    f = make_filter("block return in on em0 proto tcp to port 23\n")
    conn = TcpConn(f, dport=23)
    v = conn.c("S", seq=4242)
    assert not v.passed and v.reply is not None
    r = IP(v.reply)
    assert (r.src, r.dst) == (SERVER, CLIENT)
    t = r[TCP]
    assert (t.sport, t.dport) == (23, 40000)
    assert t.flags == "RA" and t.seq == 0 and t.ack == 4243
    # data: ack = seq + len, seq = the segment's ack
    v = conn.c("PA", b"z" * 7, seq=100, ack=200)
    t = IP(v.reply)[TCP]
    assert (t.seq, t.ack, str(t.flags)) == (200, 107, "RA")
    # never answer an RST
    assert conn.c("R", seq=5).reply is None


def test_block_drop_and_policy() -> None:
    f = make_filter("block in on em0 proto tcp to port 23\n")
    v = TcpConn(f, dport=23).c("S")
    assert not v.passed and v.reply is None
    f = make_filter("set block-policy return\nblock in on em0 proto tcp to port 23\n")
    v = TcpConn(f, dport=23).c("S")
    assert not v.passed and IP(v.reply)[TCP].flags == "RA"


# -- IPv6 -------------------------------------------------------------------------------


def test_ipv6_handshake_data_close() -> None:
    f = make_filter(RULES6)
    conn = TcpConn(f, v6=True)
    conn.handshake()
    st = next(iter(f.states))
    assert st.af == 10
    assert conn.c("PA", b"6" * 1000, now=1).passed
    assert conn.s("A", now=1).passed
    assert conn.c("FA", now=2).passed
    assert conn.s("FA", now=2).passed
    assert conn.c("A", now=2).passed
    assert (st.src.state, st.dst.state) == (FIN_WAIT_2, FIN_WAIT_2)
    assert st.timeout == PFTM.TCP_CLOSED
    assert pfctl.format_states(f, 3) == [
        "all tcp 2001:db8:2::10[5201] <- 2001:db8:1::2[40000]       FIN_WAIT_2:FIN_WAIT_2"
    ]


def test_ipv6_spoofed_rst_and_exact_rst() -> None:
    f = make_filter(RULES6)
    conn = TcpConn(f, v6=True)
    conn.handshake()
    st = next(iter(f.states))
    before = peers(st)
    v = conn.c("R", seq=conn.c_nxt + 3000)
    assert not v.passed and peers(st) == before
    assert v.log[0].startswith(
        "pf: BAD state: TCP in wire: (0) 2001:db8:1::2[40000] 2001:db8:2::10[5201] stack: (0) - "
    )
    assert conn.c("R").passed
    assert (st.src.state, st.dst.state) == (TIME_WAIT, TIME_WAIT)


def test_ipv6_port_reuse_and_challenge_ack() -> None:
    f = make_filter(RULES6)
    conn = TcpConn(f, v6=True)
    conn.handshake()
    v = conn.c("S", seq=31337)
    r = IPv6(v.reply)
    assert (r.src, r.dst) == (SERVER6, CLIENT6)
    assert r[TCP].flags == "A" and r[TCP].seq == 5001 and r[TCP].ack == 1000
    old = next(iter(f.states))
    assert conn.c("R").passed
    v = conn.c("S", seq=31337, now=1)
    assert v.passed and v.new_state and v.state.id != old.id and not old.linked


def test_modulated_state_tracks_in_the_real_sequence_space(conn: TcpConn) -> None:
    """A state from a `modulate state` peer (via pfsync) carries seqdiffs.

    pf_tcp_track_full rewrites th_seq to seq + src->seqdiff on the wire but compares the
    sender's own (unmodulated) seq with src->seqlo; only acks are demodulated.
    """
    conn.handshake()
    st = next(iter(conn.f.states))
    dc, ds = 0x10000000, 0x20000000
    st.src.seqdiff, st.dst.seqdiff = dc, ds
    v = conn.c("PA", b"x" * 100, ack=conn.s_nxt + ds, now=1)
    assert v.passed, v.log
    assert st.src.seqlo == conn.c_nxt
    v = conn.s("PA", b"y" * 50, ack=conn.c_nxt + dc, now=2)
    assert v.passed, v.log
    assert st.dst.seqlo == conn.s_nxt
    assert mismatches(conn.f) == 0
