"""pf's TCP sequence-window tracking (pf_tcp_track_full / _sloppy) and the timeout ladder.

All sequence arithmetic is modulo 2**32 and compared as signed 32-bit differences, as the
BSD SEQ_* macros do. The function is written flat, with locals, because it runs for every
packet of every TCP connection.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from pfcluster.pf.constants import (
    MAXACKWINDOW,
    PF_WSCALE_FLAG,
    PF_WSCALE_MASK,
    PFTM,
    TCP_MAX_WINSHIFT,
    TCP_MAXWIN,
    TCPS,
    TH_ACK,
    TH_FIN,
    TH_RST,
    TH_SYN,
    flags_str,
)
from pfcluster.pf.state import (
    ACK_DST,
    ACK_SRC,
    DST,
    MAX_WIN,
    NEVER,
    PEER_LEN,
    PSTATE,
    SEQHI,
    SEQLO,
    SRC,
    WSCALE,
)

if TYPE_CHECKING:
    from pfcluster.packet import Packet
    from pfcluster.pf.state import State

M32 = 0xFFFFFFFF

SYN_SENT = int(TCPS.SYN_SENT)
ESTABLISHED = int(TCPS.ESTABLISHED)
CLOSING = int(TCPS.CLOSING)
FIN_WAIT_2 = int(TCPS.FIN_WAIT_2)
TIME_WAIT = int(TCPS.TIME_WAIT)
CLOSED = int(TCPS.CLOSED)

TM_FIRST = int(PFTM.TCP_FIRST_PACKET)
TM_OPENING = int(PFTM.TCP_OPENING)
TM_ESTABLISHED = int(PFTM.TCP_ESTABLISHED)
TM_CLOSING = int(PFTM.TCP_CLOSING)
TM_FIN_WAIT = int(PFTM.TCP_FIN_WAIT)
TM_CLOSED = int(PFTM.TCP_CLOSED)

# Results of tracking.
TRACK_PASS = 0
TRACK_LOOSE = 1
TRACK_SLACK = 2  # passed only thanks to the split-path window slack (see track_full)


def sdiff(a: int, b: int) -> int:
    """a - b as a signed 32-bit number (the SEQ_* comparison)."""
    d = (a - b) & M32
    return d - 0x100000000 if d & 0x80000000 else d


def get_wscale(pkt: Packet) -> int:
    """pf_get_wscale: the window-scale option clamped to 14, with the 'seen' flag."""
    ws = pkt.wscale
    if ws < 0:
        return 0
    return min(ws, TCP_MAX_WINSHIFT) | PF_WSCALE_FLAG


def note_ack(st: State, fwd: bool, ack: int) -> None:
    """Remember an ack beyond the other end's data as we know it (see ACK_SRC)."""
    i = ACK_SRC if fwd else ACK_DST
    old = st[i]
    if not old or sdiff(ack, old) > 0:
        st[i] = ack


def fin_acked(st: State) -> int:
    """Move a peer from CLOSING to FIN_WAIT_2 when the other end's recorded ack covers
    its FIN (which its seqlo includes): the transition pf makes on that ACK, made late
    because the FIN reached us through pfsync after the ACK had passed. Returns how
    many peers moved."""
    moved = 0
    for peer, ack in ((DST, st[ACK_SRC]), (SRC, st[ACK_DST])):
        # The ack that covers a FIN equals the seqlo that includes it; a window's slack
        # allows for our view of seqlo, and rules out an ack recorded gigabytes ago.
        if ack and st[peer + PSTATE] == CLOSING and 0 <= sdiff(ack, st[peer + SEQLO]) <= MAXACKWINDOW:
            st[peer + PSTATE] = FIN_WAIT_2
            moved += 1
    return moved


def init_src_peer(st: State, pkt: Packet) -> None:
    """pf_create_state for TCP: the initiator's window from its first packet."""
    flags = pkt.tcp_flags
    seqhi = pkt.seq + pkt.p_len + 1
    ws = 0
    if flags & TH_SYN:
        seqhi += 1
        ws = get_wscale(pkt)
    max_win = pkt.win if pkt.win > 1 else 1
    shift = ws & PF_WSCALE_MASK
    if shift:
        max_win = (max_win + (1 << shift) - 1) >> shift
    if flags & TH_FIN:
        seqhi += 1
    st[SRC + SEQLO] = pkt.seq
    st[SRC + SEQHI] = seqhi & M32
    st[SRC + MAX_WIN] = max_win
    st[SRC + PSTATE] = SYN_SENT
    st[SRC + WSCALE] = ws
    st[DST + SEQHI] = 1
    st[DST + MAX_WIN] = 1
    st[DST + PSTATE] = CLOSED
    st.timeout = TM_FIRST


def timeout_ladder(ss: int, ds: int) -> int:
    """The TCP timeout index for peer states `ss` and `ds`."""
    if ss >= FIN_WAIT_2 and ds >= FIN_WAIT_2:
        return TM_CLOSED
    if ss >= CLOSING and ds >= CLOSING:
        return TM_FIN_WAIT
    if ss < ESTABLISHED or ds < ESTABLISHED:
        return TM_OPENING
    if ss >= CLOSING or ds >= CLOSING:
        return TM_CLOSING
    return TM_ESTABLISHED


def set_timeout_ladder(st: State) -> None:
    """Set the state's TCP timeout from its peers' states."""
    st.timeout = timeout_ladder(st[SRC + PSTATE], st[DST + PSTATE])


# Both peers' fields in buffer order (see pf.state).
_PEERS = struct.Struct(f"{2 * PEER_LEN}I").unpack_from
# Buffer indices of the fields track_full writes (src seqlo, seqhi, max_win, state,
# wscale, then dst seqhi, max_win, state, wscale) for a packet along the state's
# direction and against it.
_FWD = (*(SRC + f for f in (SEQLO, SEQHI, MAX_WIN, PSTATE, WSCALE)),
        *(DST + f for f in (SEQHI, MAX_WIN, PSTATE, WSCALE)))
_REV = (*(DST + f for f in (SEQLO, SEQHI, MAX_WIN, PSTATE, WSCALE)),
        *(SRC + f for f in (SEQHI, MAX_WIN, PSTATE, WSCALE)))


class TrackFailure:
    """What pf prints when a packet fails the window test (kept off the fast path)."""

    __slots__ = ("ack", "ackskew", "checks", "orig_seq", "p_len", "seq")

    def __init__(
        self, seq: int, orig_seq: int, ack: int, p_len: int, ackskew: int, checks: str
    ) -> None:
        self.seq = seq
        self.orig_seq = orig_seq
        self.ack = ack
        self.p_len = p_len
        self.ackskew = ackskew
        self.checks = checks


def track_full(st: State, pkt: Packet, fwd: bool, now: float) -> int | TrackFailure:
    """Run pf's strict then loose window test; update the state when the packet fits.

    Returns TRACK_PASS, TRACK_LOOSE, or a TrackFailure describing the failed checks
    (its `checks` string is the "State failure on:" tail). A failure where both peers
    are still in SYN_SENT resets the sender's window as pf does and returns a
    TrackFailure with checks == "" (pf logs nothing then and answers with an RST).

    `src` is the sender of this packet and `dst` the other end: the s_*/d_* names are
    the buffer indices of their fields in the state.
    """
    # One read of both peers: indexing the buffer field by field costs more.
    if fwd:
        (src_seqlo, src_seqhi, src_seqdiff, src_max_win, _, src_state, src_wscale,
         dst_seqlo, dst_seqhi, dst_seqdiff, dst_max_win, _, dst_state, dst_wscale) = _PEERS(st)
    else:
        (dst_seqlo, dst_seqhi, dst_seqdiff, dst_max_win, _, dst_state, dst_wscale,
         src_seqlo, src_seqhi, src_seqdiff, src_max_win, _, src_state, src_wscale) = _PEERS(st)
    s_lo, s_hi, s_win, s_st, s_ws, d_hi, d_win, d_st, d_ws = _FWD if fwd else _REV
    flags = pkt.tcp_flags
    win = pkt.win
    p_len = pkt.p_len
    seq = pkt.seq
    th_ack = pkt.ack

    if src_wscale and dst_wscale and not (flags & TH_SYN):
        sws = src_wscale & PF_WSCALE_MASK
        dws = dst_wscale & PF_WSCALE_MASK
    else:
        sws = dws = 0

    orig_seq = seq
    if src_seqlo == 0:
        # First packet from this end: normally the responder's SYN|ACK.
        ack = th_ack
        end = (seq + p_len) & M32
        if flags & TH_SYN:
            end = (end + 1) & M32
            if dst_wscale & PF_WSCALE_FLAG:
                src_wscale = st[s_ws] = get_wscale(pkt)
                if src_wscale & PF_WSCALE_FLAG:
                    sws = src_wscale & PF_WSCALE_MASK
                    win = (win + (1 << sws) - 1) >> sws
                    dws = dst_wscale & PF_WSCALE_MASK
                else:
                    dst_max_win = st[d_win] = min(
                        TCP_MAXWIN, dst_max_win << (dst_wscale & PF_WSCALE_MASK))
                    st[d_ws] = 0
        data_end = end
        if flags & TH_FIN:
            end = (end + 1) & M32
        st[s_lo] = src_seqlo = seq
        if src_state < SYN_SENT:
            st[s_st] = src_state = SYN_SENT
        fwd_win = dst_max_win << dws
        if fwd_win < 1:
            fwd_win = 1
        if src_seqhi == 1 or sdiff(end + fwd_win, src_seqhi) >= 0:
            src_seqhi = st[s_hi] = (end + fwd_win) & M32
        if win > src_max_win:
            src_max_win = st[s_win] = win
    else:
        # pf rewrites th_seq to seq + src->seqdiff on the wire, but tracks the sender's
        # own (unmodulated) seq against src->seqlo; only the ack is demodulated, and only
        # when this side is modulated (both are, once the responder has spoken).
        ack = (th_ack - dst_seqdiff) & M32 if src_seqdiff else th_ack
        end = (seq + p_len) & M32
        if flags & TH_SYN:
            end = (end + 1) & M32
        data_end = end
        if flags & TH_FIN:
            end = (end + 1) & M32

    if not (flags & TH_ACK) or (ack == 0 and (flags & (TH_ACK | TH_RST)) == (TH_ACK | TH_RST)) \
            or dst_state < SYN_SENT:
        ack = dst_seqlo

    if seq == end:
        # No data: ease the sequence test.
        seq = src_seqlo
        data_end = end = seq

    ackskew = sdiff(dst_seqlo, ack)
    back_win = dst_max_win << dws
    c1 = sdiff(src_seqhi, data_end) >= 0
    slack = False
    if not c1 and st.pfsync_time > NEVER and sdiff(src_seqhi + back_win, data_end) >= 0:
        # A state shared with a pfsync peer: on a split path the receiver's ACKs, which
        # move this edge, cross the other firewall and reach us a flush later. Data up
        # to one receiver window beyond the edge we know is let through (a departure
        # from pf, counted); anything further still fails.
        c1 = slack = True
    c2 = sdiff(seq, src_seqlo - back_win) >= 0
    c3 = ackskew >= -MAXACKWINDOW
    c4 = ackskew <= (MAXACKWINDOW << sws)
    if c1 and c2 and c3 and c4:
        if flags & TH_RST:
            slo = src_seqlo
            rst_ok = (
                orig_seq == slo
                or orig_seq == ((slo + 1) & M32)
                or ((orig_seq + 1) & M32) == slo
                or (
                    sdiff(orig_seq, slo - back_win) >= 0
                    and sdiff(orig_seq, slo + 1) <= 0
                    and ackskew == 0
                    and (flags & (TH_ACK | TH_RST)) == (TH_ACK | TH_RST)
                )
            )
        else:
            rst_ok = True
        if rst_ok:
            if ackskew < 0 and flags & TH_ACK and dst_state >= ESTABLISHED:
                # acking data we never saw: the other half of a split path
                note_ack(st, fwd, ack)
            if win > src_max_win:
                st[s_win] = win
            if sdiff(end, src_seqlo) > 0:
                st[s_lo] = end
            rwin = win << sws
            if sdiff(ack + rwin, dst_seqhi) >= 0:
                st[d_hi] = (ack + (rwin if rwin > 1 else 1)) & M32
            new_src, new_dst = src_state, dst_state
            if flags & TH_SYN and new_src < SYN_SENT:
                new_src = SYN_SENT
            if flags & TH_FIN and new_src < CLOSING:
                new_src = CLOSING
            if flags & TH_ACK:
                if new_dst == SYN_SENT:
                    new_dst = ESTABLISHED
                elif new_dst == CLOSING:
                    new_dst = FIN_WAIT_2
            if flags & TH_RST:
                new_src = new_dst = TIME_WAIT
            if new_src != src_state:
                st[s_st] = new_src
            if new_dst != dst_state:
                st[d_st] = new_dst
            st.expire = now
            st.timeout = TM_ESTABLISHED if new_src == new_dst == ESTABLISHED \
                else timeout_ladder(new_src, new_dst)
            return TRACK_SLACK if slack else TRACK_PASS

    c5 = sdiff(src_seqhi + MAXACKWINDOW, data_end) >= 0
    c6 = sdiff(seq, src_seqlo - MAXACKWINDOW) >= 0
    if (
        (dst_state < SYN_SENT or dst_state >= FIN_WAIT_2 or src_state >= FIN_WAIT_2)
        and c5
        and c6
    ):
        # Loose match: shotgunned SYNs, picked-up connections, late ACK|FINs after close.
        if win > src_max_win:
            st[s_win] = win
        if sdiff(end, src_seqlo) > 0:
            st[s_lo] = end
        rwin = win << sws
        if sdiff(ack + rwin, dst_seqhi) >= 0:
            st[d_hi] = (ack + (rwin if rwin > 1 else 1)) & M32
        if flags & TH_FIN and src_state < CLOSING:
            st[s_st] = CLOSING
        if flags & TH_RST:
            st[s_st] = st[d_st] = TIME_WAIT
        return TRACK_LOOSE

    if dst_state == SYN_SENT and src_state == SYN_SENT:
        st[s_lo] = 0
        st[s_hi] = 1
        st[s_win] = 1
        return TrackFailure(seq, orig_seq, ack, p_len, ackskew, "")

    checks = "{} {} {} {} | {} {}".format(
        " " if c1 else "1",
        " " if c2 else "2",
        " " if c3 else "3",
        " " if c4 else "4",
        " " if c5 else "5",
        " " if c6 else "6",
    )
    return TrackFailure(seq, orig_seq, ack, p_len, ackskew, checks)


def track_sloppy(st: State, pkt: Packet, fwd: bool, now: float) -> int:
    """pf_tcp_track_sloppy: follow the flags, never the sequence numbers."""
    s, d = (SRC, DST) if fwd else (DST, SRC)
    src_state = st[s + PSTATE]
    dst_state = st[d + PSTATE]
    flags = pkt.tcp_flags
    if flags & TH_SYN and src_state < SYN_SENT:
        src_state = SYN_SENT
    if flags & TH_FIN and src_state < CLOSING:
        src_state = CLOSING
    if flags & TH_ACK:
        if dst_state == SYN_SENT:
            dst_state = ESTABLISHED
        elif dst_state == CLOSING:
            dst_state = FIN_WAIT_2
        elif src_state == SYN_SENT and dst_state < SYN_SENT:
            # Only one half of the connection is visible here.
            src_state = dst_state = ESTABLISHED
        elif src_state == CLOSING and dst_state == ESTABLISHED and st[d + SEQLO] == 0:
            dst_state = CLOSING
    if flags & TH_RST:
        src_state = dst_state = TIME_WAIT
    st[s + PSTATE] = src_state
    st[d + PSTATE] = dst_state
    st.expire = now
    st.timeout = timeout_ladder(src_state, dst_state)
    return TRACK_PASS


__all__ = [
    "TRACK_LOOSE",
    "TRACK_PASS",
    "TRACK_SLACK",
    "TrackFailure",
    "fin_acked",
    "flags_str",
    "init_src_peer",
    "note_ack",
    "sdiff",
    "set_timeout_ladder",
    "timeout_ladder",
    "track_full",
    "track_sloppy",
]
