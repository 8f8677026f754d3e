"""How a peer's copy of a state is merged into ours: pure functions, no engine state.

Each rule takes our state, the peer's two peers and timeout, and returns
``(stale, derived)``: `stale` non-zero when some part of ours is fresher than the
peer's (so ours must go back), `derived` non-zero when the merge itself made new
knowledge the peer cannot have (it must go back at once).

- ``thesis``: OpenBSD 4.5's pfsync_upd_tcp (and pfsync v4's): the update is taken whole
  or refused whole, named by its sfail code. On a split path each firewall is ahead on
  the half it forwards, so both keep refusing: the stall the thesis measured for v4.
- ``edges`` (pfcluster's default, a departure): every sequence edge and peer state is
  taken from whichever side is further on and never moves backwards, and a FIN whose
  ACK crossed the other firewall is recognised (`fin_acked`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pfcluster.pf.constants import IPPROTO_TCP, PF_TCPS_PROXY_SRC, PFTM_MAX, TCPS
from pfcluster.pf.state import (
    DST,
    DST_STATE,
    MAX_WIN,
    MSS,
    PSTATE,
    SEQDIFF,
    SEQHI,
    SEQLO,
    SRC,
    SRC_STATE,
    WSCALE,
    State,
)
from pfcluster.pf.tcp import TM_FIRST, fin_acked, sdiff, set_timeout_ladder

# OpenBSD 4.5's sfail codes (pfsync_upd_tcp and its non-TCP twin); 0 = applied.
SFAIL_OK = 0
SFAIL_SRC_STATE = 1  # our src peer is further on
SFAIL_SRC_SEQ = 3  # our src seqlo is ahead
SFAIL_DST_SEQ = 4  # our dst seqlo is ahead
SFAIL_OTHER_SRC = 5  # non-TCP: our src state is further on
SFAIL_OTHER_DST = 6  # non-TCP: our dst state is further on
SFAIL_PARTIAL = 7  # src taken, dst refused

SYN_SENT = int(TCPS.SYN_SENT)

MergeRule = Callable[[State, Any, Any, int, float], tuple[int, int]]


def merge_peer_edges(st: State, p: int, remote: Any) -> int:
    """Merge one TCP peer (`p` = SRC or DST) edge by edge; 1 if ours was fresher anywhere.

    State, seqlo (what this end sent) and seqhi (what the other end allows) only grow.
    On a split path one firewall sees the sender's data (seqlo) and the other the
    receiver's ACKs (seqhi) for the same peer, so taking or refusing a peer whole, as
    OpenBSD 4.5 did, loses half of it.
    """
    ls = st[p + PSTATE]
    rs = remote.state
    if ls >= PF_TCPS_PROXY_SRC or rs >= PF_TCPS_PROXY_SRC:
        # synproxy states: trust the later phase only.
        if ls > rs:
            return 1
        st.set_peer(p, remote)
        return 0
    seqlo = st[p + SEQLO]
    if seqlo == 0 and ls <= rs:
        st.set_peer(p, remote)
        return 0
    if remote.seqlo == 0 and rs <= ls:
        return 1 if (ls > rs or seqlo) else 0
    stale = 0
    if ls > rs:
        stale = 1
    elif rs > ls:
        st[p + PSTATE] = rs
    d = sdiff(seqlo, remote.seqlo)
    if d > 0:
        stale = 1
    elif d < 0:
        st[p + SEQLO] = remote.seqlo
    d = sdiff(st[p + SEQHI], remote.seqhi)
    if d > 0:
        stale = 1
    elif d < 0:
        st[p + SEQHI] = remote.seqhi
    max_win = st[p + MAX_WIN]
    if max_win > remote.max_win:
        stale = 1
    elif remote.max_win > max_win:
        st[p + MAX_WIN] = remote.max_win
    if remote.wscale and not st[p + WSCALE]:
        st[p + WSCALE] = remote.wscale
    if remote.seqdiff and not st[p + SEQDIFF]:
        st[p + SEQDIFF] = remote.seqdiff
    if remote.mss and not st[p + MSS]:
        st[p + MSS] = remote.mss
    return stale


def merge_edges(st: State, src: Any, dst: Any, timeout: int, now: float) -> tuple[int, int]:
    """pfcluster's rule: per edge for TCP, per peer state for the rest."""
    if st.key[1] == IPPROTO_TCP:
        stale = merge_peer_edges(st, SRC, src) + merge_peer_edges(st, DST, dst)
        derived = fin_acked(st)
        st.expire = now
        # tcp.first lasts until some node sees a second packet; then the ladder.
        if st.timeout != TM_FIRST or timeout != TM_FIRST:
            set_timeout_ladder(st)
        return stale + derived, derived
    stale = 0
    for local, remote in ((SRC_STATE, src), (DST_STATE, dst)):
        if st[local] > remote.state:
            stale += 1
        else:
            st[local] = remote.state
    if stale < 2:
        st.expire = now
        if timeout < PFTM_MAX:
            st.timeout = timeout
    return stale, 0


def merge_thesis(st: State, src: Any, dst: Any, timeout: int, now: float) -> tuple[int, int]:
    """OpenBSD 4.5 (and pfsync v4): whole update or none; returns (sfail code, 0)."""
    return sfail(st, src, dst, timeout, now), 0


def sfail(st: State, src: Any, dst: Any, timeout: int, now: float) -> int:
    """The sfail code of an update, applying it when the code is SFAIL_OK (and the src
    half only for SFAIL_PARTIAL), as pfsync_upd_tcp and pfsync_in_upd did."""
    ls, ld = st[SRC_STATE], st[DST_STATE]
    if st.key[1] == IPPROTO_TCP:
        if ls > src.state and (ls < PF_TCPS_PROXY_SRC or src.state >= PF_TCPS_PROXY_SRC):
            return SFAIL_SRC_STATE
        if sdiff(st[SRC + SEQLO], src.seqlo) > 0:
            return SFAIL_SRC_SEQ
        if ld > dst.state:
            st.set_peer(SRC, src)
            return SFAIL_PARTIAL
        if ld >= SYN_SENT and sdiff(st[DST + SEQLO], dst.seqlo) > 0:
            return SFAIL_DST_SEQ
    else:
        if ls > src.state:
            return SFAIL_OTHER_SRC
        if ld > dst.state:
            return SFAIL_OTHER_DST
    st.set_peer(SRC, src)
    st.set_peer(DST, dst)
    st.expire = now
    if timeout < PFTM_MAX:
        st.timeout = timeout
    return SFAIL_OK


MERGE_RULES: dict[str, MergeRule] = {"edges": merge_edges, "thesis": merge_thesis}
