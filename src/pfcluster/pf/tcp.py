"""pf's TCP sequence-window tracking (pf_tcp_track_full / _sloppy) and the timeout ladder.

All sequence arithmetic is modulo 2**32 and compared as signed 32-bit differences, as the
BSD SEQ_* macros do. The function is written flat, with locals, because it runs for every
packet of every TCP connection.
"""

from __future__ import annotations

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

if TYPE_CHECKING:
    from pfcluster.packet import Packet
    from pfcluster.pf.state import Peer, State

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
NEVER = float("-inf")  # State.pfsync_time of a state no pfsync peer ever told us about


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
    """Remember an ack beyond the other end's data as we know it (see State.acks)."""
    acks = st.acks
    if acks is None:
        acks = st.acks = [0, 0]
    i = 0 if fwd else 1
    if not acks[i] or sdiff(ack, acks[i]) > 0:
        acks[i] = ack


def fin_acked(st: State) -> int:
    """Move a peer from CLOSING to FIN_WAIT_2 when the other end's recorded ack covers
    its FIN (which its seqlo includes): the transition pf makes on that ACK, made late
    because the FIN reached us through pfsync after the ACK had passed. Returns how
    many peers moved."""
    acks = st.acks
    if acks is None:
        return 0
    moved = 0
    for peer, ack in ((st.dst, acks[0]), (st.src, acks[1])):
        # The ack that covers a FIN equals the seqlo that includes it; a window's slack
        # allows for our view of seqlo, and rules out an ack recorded gigabytes ago.
        if peer.state == CLOSING and ack and 0 <= sdiff(ack, peer.seqlo) <= MAXACKWINDOW:
            peer.state = FIN_WAIT_2
            moved += 1
    return moved


def init_src_peer(st: State, pkt: Packet) -> None:
    """pf_create_state for TCP: the initiator's window from its first packet."""
    src = st.src
    dst = st.dst
    flags = pkt.tcp_flags
    src.seqlo = pkt.seq
    seqhi = pkt.seq + pkt.p_len + 1
    src.seqdiff = 0
    if flags & TH_SYN:
        seqhi += 1
        src.wscale = get_wscale(pkt)
    max_win = pkt.win if pkt.win > 1 else 1
    ws = src.wscale & PF_WSCALE_MASK
    if ws:
        max_win = (max_win + (1 << ws) - 1) >> ws
    src.max_win = max_win
    if flags & TH_FIN:
        seqhi += 1
    src.seqhi = seqhi & M32
    dst.seqhi = 1
    dst.max_win = 1
    src.state = SYN_SENT
    dst.state = CLOSED
    st.timeout = TM_FIRST


def set_timeout_ladder(st: State, src: Peer, dst: Peer) -> None:
    ss = src.state
    ds = dst.state
    if ss >= FIN_WAIT_2 and ds >= FIN_WAIT_2:
        st.timeout = TM_CLOSED
    elif ss >= CLOSING and ds >= CLOSING:
        st.timeout = TM_FIN_WAIT
    elif ss < ESTABLISHED or ds < ESTABLISHED:
        st.timeout = TM_OPENING
    elif ss >= CLOSING or ds >= CLOSING:
        st.timeout = TM_CLOSING
    else:
        st.timeout = TM_ESTABLISHED


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
    """
    if fwd:
        src = st.src
        dst = st.dst
    else:
        src = st.dst
        dst = st.src
    flags = pkt.tcp_flags
    win = pkt.win
    p_len = pkt.p_len
    seq = pkt.seq
    th_ack = pkt.ack

    if src.wscale and dst.wscale and not (flags & TH_SYN):
        sws = src.wscale & PF_WSCALE_MASK
        dws = dst.wscale & PF_WSCALE_MASK
    else:
        sws = dws = 0

    orig_seq = seq
    if src.seqlo == 0:
        # First packet from this end: normally the responder's SYN|ACK.
        ack = th_ack
        end = (seq + p_len) & M32
        if flags & TH_SYN:
            end = (end + 1) & M32
            if dst.wscale & PF_WSCALE_FLAG:
                src.wscale = get_wscale(pkt)
                if src.wscale & PF_WSCALE_FLAG:
                    sws = src.wscale & PF_WSCALE_MASK
                    win = (win + (1 << sws) - 1) >> sws
                    dws = dst.wscale & PF_WSCALE_MASK
                else:
                    dst.max_win = min(TCP_MAXWIN, dst.max_win << (dst.wscale & PF_WSCALE_MASK))
                    dst.wscale = 0
        data_end = end
        if flags & TH_FIN:
            end = (end + 1) & M32
        src.seqlo = seq
        if src.state < SYN_SENT:
            src.state = SYN_SENT
        fwd_win = dst.max_win << dws
        if fwd_win < 1:
            fwd_win = 1
        if src.seqhi == 1 or sdiff(end + fwd_win, src.seqhi) >= 0:
            src.seqhi = (end + fwd_win) & M32
        if win > src.max_win:
            src.max_win = win
    else:
        # pf rewrites th_seq to seq + src->seqdiff on the wire, but tracks the sender's
        # own (unmodulated) seq against src->seqlo; only the ack is demodulated, and only
        # when this side is modulated (both are, once the responder has spoken).
        ack = (th_ack - dst.seqdiff) & M32 if src.seqdiff else th_ack
        end = (seq + p_len) & M32
        if flags & TH_SYN:
            end = (end + 1) & M32
        data_end = end
        if flags & TH_FIN:
            end = (end + 1) & M32

    if not (flags & TH_ACK) or (ack == 0 and (flags & (TH_ACK | TH_RST)) == (TH_ACK | TH_RST)) or dst.state < SYN_SENT:
        ack = dst.seqlo

    if seq == end:
        # No data: ease the sequence test.
        seq = src.seqlo
        data_end = end = seq

    ackskew = sdiff(dst.seqlo, ack)
    back_win = dst.max_win << dws
    c1 = sdiff(src.seqhi, data_end) >= 0
    slack = False
    if not c1 and st.pfsync_time > NEVER and sdiff(src.seqhi + back_win, data_end) >= 0:
        # A state shared with a pfsync peer: on a split path the receiver's ACKs, which
        # move this edge, cross the other firewall and reach us a flush later. Data up
        # to one receiver window beyond the edge we know is let through (a departure
        # from pf, counted); anything further still fails.
        c1 = slack = True
    c2 = sdiff(seq, src.seqlo - back_win) >= 0
    c3 = ackskew >= -MAXACKWINDOW
    c4 = ackskew <= (MAXACKWINDOW << sws)
    if c1 and c2 and c3 and c4:
        if flags & TH_RST:
            slo = src.seqlo
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
            if ackskew < 0 and flags & TH_ACK and dst.state >= ESTABLISHED:
                # acking data we never saw: the other half of a split path
                note_ack(st, fwd, ack)
            if win > src.max_win:
                src.max_win = win
            if sdiff(end, src.seqlo) > 0:
                src.seqlo = end
            rwin = win << sws
            if sdiff(ack + rwin, dst.seqhi) >= 0:
                dst.seqhi = (ack + (rwin if rwin > 1 else 1)) & M32
            if flags & TH_SYN and src.state < SYN_SENT:
                src.state = SYN_SENT
            if flags & TH_FIN and src.state < CLOSING:
                src.state = CLOSING
            if flags & TH_ACK:
                if dst.state == SYN_SENT:
                    dst.state = ESTABLISHED
                elif dst.state == CLOSING:
                    dst.state = FIN_WAIT_2
            if flags & TH_RST:
                src.state = dst.state = TIME_WAIT
            st.expire = now
            set_timeout_ladder(st, src, dst)
            return TRACK_SLACK if slack else TRACK_PASS

    c5 = sdiff(src.seqhi + MAXACKWINDOW, data_end) >= 0
    c6 = sdiff(seq, src.seqlo - MAXACKWINDOW) >= 0
    if (
        (dst.state < SYN_SENT or dst.state >= FIN_WAIT_2 or src.state >= FIN_WAIT_2)
        and c5
        and c6
    ):
        # Loose match: shotgunned SYNs, picked-up connections, late ACK|FINs after close.
        if win > src.max_win:
            src.max_win = win
        if sdiff(end, src.seqlo) > 0:
            src.seqlo = end
        rwin = win << sws
        if sdiff(ack + rwin, dst.seqhi) >= 0:
            dst.seqhi = (ack + (rwin if rwin > 1 else 1)) & M32
        if flags & TH_FIN and src.state < CLOSING:
            src.state = CLOSING
        if flags & TH_RST:
            src.state = dst.state = TIME_WAIT
        return TRACK_LOOSE

    if dst.state == SYN_SENT and src.state == SYN_SENT:
        src.seqlo = 0
        src.seqhi = 1
        src.max_win = 1
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
    if fwd:
        src = st.src
        dst = st.dst
    else:
        src = st.dst
        dst = st.src
    flags = pkt.tcp_flags
    if flags & TH_SYN and src.state < SYN_SENT:
        src.state = SYN_SENT
    if flags & TH_FIN and src.state < CLOSING:
        src.state = CLOSING
    if flags & TH_ACK:
        if dst.state == SYN_SENT:
            dst.state = ESTABLISHED
        elif dst.state == CLOSING:
            dst.state = FIN_WAIT_2
        elif src.state == SYN_SENT and dst.state < SYN_SENT:
            # Only one half of the connection is visible here.
            src.state = dst.state = ESTABLISHED
        elif src.state == CLOSING and dst.state == ESTABLISHED and dst.seqlo == 0:
            dst.state = CLOSING
    if flags & TH_RST:
        src.state = dst.state = TIME_WAIT
    st.expire = now
    set_timeout_ladder(st, src, dst)
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
    "track_full",
    "track_sloppy",
]
