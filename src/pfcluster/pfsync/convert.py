"""pf state <-> pfsync record (pf_state_export / pfsync_state_import).

Times travel as ages: `creation` is seconds since the state was made and `expire` the
seconds left before it times out, so two hosts with unrelated clocks agree. Addresses are
16-byte pf_addr on the wire and 4 or 16 bytes in our keys; AF_INET6 is 24 on OpenBSD and
28 on FreeBSD, so the dialect decides.
"""

from __future__ import annotations

from pfcluster.pf.constants import AF_INET, PFSTATE_ACK, PFTM_MAX
from pfcluster.pf.state import Peer, State, state_expires, timeout_seconds
from pfcluster.pfsync import wire

U32 = 0xFFFFFFFF
_ZERO12 = bytes(12)


def pad_addr(raw: bytes) -> bytes:
    return raw if len(raw) == 16 else raw + _ZERO12


def peer_to_wire(p: Peer) -> wire.StatePeer:
    return wire.StatePeer(0, 0, 0, 0, p.seqlo, p.seqhi, p.seqdiff, p.max_win, p.mss, p.state, p.wscale)


def peer_from_wire(dst: Peer, w: wire.StatePeer) -> None:
    dst.seqlo = w.seqlo
    dst.seqhi = w.seqhi
    dst.seqdiff = w.seqdiff
    dst.max_win = w.max_win
    dst.mss = w.mss
    dst.state = w.state
    dst.wscale = w.wscale


def seconds_left(st: State, now: float, timeouts: list[int], nstates: int) -> int:
    e = state_expires(st, timeouts, nstates)
    return 0 if e <= now else min(U32, int(e - now))


def export_state(st: State, now: float, dialect: str, timeouts: list[int], nstates: int) -> wire.State:
    """A pfsync_state record for `st` as `dialect` carries it."""
    af, proto, a0, a1, p0, p1 = st.key
    waf = wire.af_to_wire(dialect, af)
    v6 = dialect == "openbsd6"
    k0 = wire.StateKey([pad_addr(a0), pad_addr(a1)], [p0, p1], 0, waf if v6 else 0)
    k1 = wire.StateKey([pad_addr(a0), pad_addr(a1)], [p0, p1], 0, waf if v6 else 0)
    flags = st.state_flags if dialect in ("openbsd6", "freebsd1400") else st.state_flags & 0xFF
    return wire.State(
        id=st.id,
        ifname=st.ifname,
        key=[k0, k1],
        src=peer_to_wire(st.src),
        dst=peer_to_wire(st.dst),
        rule=(st.rule.nr & U32) if st.rule is not None else U32,
        creation=max(0, min(U32, int(now - st.creation))),
        expire=seconds_left(st, now, timeouts, nstates),
        packets=[st.packets0, st.packets1],
        bytes=[st.bytes0, st.bytes1],
        creatorid=st.creatorid,
        af=waf,
        proto=proto,
        direction=st.direction,
        log=st.log,
        state_flags=flags,
        timeout=st.timeout,
    )


class ImportError_(ValueError):
    """A record that cannot become a state (pfsync counts these as badval)."""


def import_state(rec: wire.State, now: float, dialect: str, timeouts: list[int]) -> tuple[State, int, bool]:
    """A pf state from a record: (state, rule number or -1, the sender asked for an INS_ACK)."""
    af = wire.af_from_wire(dialect, rec.af)
    if af is None:
        raise ImportError_(f"af {rec.af}")
    if rec.creatorid == 0:
        raise ImportError_("creatorid 0")
    if rec.timeout >= PFTM_MAX:
        raise ImportError_(f"timeout {rec.timeout}")
    k = rec.key[0]
    alen = 4 if af == AF_INET else 16
    key = (af, rec.proto, bytes(k.addr[0][:alen]), bytes(k.addr[1][:alen]), k.port[0], k.port[1])
    st = State(key, rec.direction, rec.creatorid, rec.id, now, None, rec.ifname or "all")
    peer_from_wire(st.src, rec.src)
    peer_from_wire(st.dst, rec.dst)
    st.creation = now - rec.creation
    st.timeout = rec.timeout
    st.expire = expire_from_age(st, rec.expire, now, timeouts)
    st.packets0, st.packets1 = rec.packets[0], rec.packets[1]
    st.bytes0, st.bytes1 = rec.bytes[0], rec.bytes[1]
    st.log = rec.log
    wants_ack = bool(rec.state_flags & PFSTATE_ACK)
    st.state_flags = rec.state_flags & ~PFSTATE_ACK
    st.pfsync_time = now
    rule = wire.signed32(rec.rule)
    return st, rule, wants_ack


def expire_from_age(st: State, remaining: int, now: float, timeouts: list[int]) -> float:
    """Rebuild the last-activity time from the seconds the sender had left."""
    if not remaining:
        return now
    full = timeout_seconds(st, timeouts)
    return now - max(0, full - remaining)
