"""pf_test: state lookup first, then the ruleset, then state creation.

`Filter.test(direction, ifname, pkt, now)` is the whole data-plane decision for one
packet on one interface. A router calls it twice per forwarded packet (in on the input
interface, out on the output interface), exactly as pf runs on OpenBSD.

The filter tells a listener (the pfsync engine) about every state insert, every accepted
packet on a state (an update) and every removal; it never does I/O itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from pfcluster.packet import (
    Packet,
    _build_tcp,
    addr_str,
    build_icmp_unreach,
    build_tcp_ack,
    build_tcp_rst,
)
from pfcluster.pf import tcp as tcpmod
from pfcluster.pf.constants import (
    AF_INET,
    ICMP4_ERRORS,
    ICMP4_MAPPING,
    ICMP6_ERRORS,
    ICMP6_MAPPING,
    IN6ADDR_LINKLOCAL_ALLNODES,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    MLD_LISTENER_QUERY,
    MLD_LISTENER_REPORT,
    ND_NEIGHBOR_ADVERT,
    ND_NEIGHBOR_SOLICIT,
    PF_IN,
    PF_OUT,
    PF_WSCALE_MASK,
    PFRES_BADSTATE,
    PFRES_FRAG,
    PFRES_MATCH,
    PFRES_MAXSTATES,
    PFRES_MEMORY,
    PFRES_NAMES,
    PFRES_NORM,
    PFRES_SHORT,
    PFRES_SRCLIMIT,
    PFRES_STATEINS,
    PFRES_TRANSLATE,
    PFSTATE_NOSYNC,
    PFSTATE_SLOPPY,
    PFTM,
    PFTM_MAX,
    PFUDPS_MULTIPLE,
    PFUDPS_SINGLE,
    TCPS,
    TH_ACK,
    TH_RST,
    TH_SYN,
)
from pfcluster.pf.log import bad_state_lines, print_flags, print_state, rule_log_line
from pfcluster.pf.nat import Translator
from pfcluster.pf.route import StateRoute
from pfcluster.pf.rules import graft, prepare_anchor
from pfcluster.pf.ruleset import Rule, Ruleset
from pfcluster.pf.scrub import Scrub
from pfcluster.pf.srcnode import PFSNODE_HIWAT, SrcNode, SrcNodes
from pfcluster.pf.state import (
    DIRECTION,
    DST_STATE,
    SRC_STATE,
    NatInfo,
    NatState,
    RouteState,
    ScrubState,
    State,
    StateKey,
    StateTable,
    new_creatorid,
    state_expires,
)

PASS = "pass"
BLOCK = "block"
MATCH = "match"  # never decides: Ruleset.evaluate returns only pass/block rules

ESTABLISHED = int(TCPS.ESTABLISHED)
FIN_WAIT_2 = int(TCPS.FIN_WAIT_2)
CLOSING = int(TCPS.CLOSING)
NEVER = -math.inf  # State.pfsync_time of a state no peer ever told us about

ZERO_ADDR6 = bytes(16)
_ND_MLD_TYPES = frozenset((MLD_LISTENER_QUERY, MLD_LISTENER_REPORT, ND_NEIGHBOR_SOLICIT,
                           ND_NEIGHBOR_ADVERT))


def icmp_mapping(pkt: Packet, quoted: bool = False) -> tuple[int, int, int, bool]:
    """pf_icmp_mapping: (icmp_dir, virtual id, virtual type, state-less) of an ICMP packet.

    Queries and replies share a state keyed by (virtual id, virtual type) in the port
    slots: the id in the source's slot for a query (icmp_dir PF_IN), in the destination's
    slot for a reply (PF_OUT). Echo, timestamp, information and address-mask messages
    use their id field; router solicitation/advertisement, where-are-you, mobile
    registration, node information and mtrace use id 0; MLD query/report and neighbour
    solicitation/advertisement use a 16-bit fold of the address they are about. Any
    other type gets a state of its own (id 0, its own type, PF_IN).

    State-less (pf's return value 1): the errors, which are matched through the packet
    they quote, and a neighbour advertisement, which never opens a state. For a quoted
    packet pf has read only the first 8 ICMP bytes, so its MLD/ND address counts as zero.
    """
    itype = pkt.icmp_type
    if pkt.proto == IPPROTO_ICMPV6:
        if itype in ICMP6_ERRORS:
            return PF_IN, 0, itype, True
        m = ICMP6_MAPPING.get(itype)
        if m is None:
            if itype not in _ND_MLD_TYPES:
                return PF_IN, 0, itype, False
            vid = 0 if quoted else _fold_addr(pkt)
            if itype == ND_NEIGHBOR_ADVERT:
                return PF_OUT, vid, ND_NEIGHBOR_SOLICIT, True
            vtype = ND_NEIGHBOR_SOLICIT if itype == ND_NEIGHBOR_SOLICIT else MLD_LISTENER_QUERY
            return PF_IN, vid, vtype, False
    else:
        if itype in ICMP4_ERRORS:
            return PF_IN, 0, itype, True
        m = ICMP4_MAPPING.get(itype)
        if m is None:
            return PF_IN, 0, itype, False
    vtype, icmp_dir, uses_id = m
    icmp_id = pkt.icmp_id
    return icmp_dir, (icmp_id if uses_id and icmp_id > 0 else 0), vtype, False


def _nd_addr(pkt: Packet) -> bytes | None:
    """The address an MLD or ND message is about (after the 8-byte ICMPv6 header)."""
    off = pkt.l4_off + 8
    raw = pkt.raw
    if len(raw) < off + 16:
        return None
    return bytes(raw[off : off + 16])


def _fold_addr(pkt: Packet) -> int:
    """pf's fake id for MLD/ND: the four 32-bit words XORed, then the halves XORed."""
    a = _nd_addr(pkt)
    if a is None:
        return 0
    h = int.from_bytes(a[0:4], "big") ^ int.from_bytes(a[4:8], "big") \
        ^ int.from_bytes(a[8:12], "big") ^ int.from_bytes(a[12:16], "big")
    return ((h >> 16) ^ h) & 0xFFFF


def _icmp_key_addrs(pkt: Packet, quoted: bool, multi: bool) -> tuple[bytes, bytes] | None:
    """pf_state_key_addr_setup for ICMP: (source, destination) as the key holds them.

    A neighbour solicitation is keyed on its target instead of its destination; an
    advertisement on its target instead of its source (and :: for a multicast
    destination). `multi` is pf's second lookup of an IPv6 reply, with ff02::1 in the
    source's place; it does not apply to neighbour discovery (None).
    """
    s, d = pkt.src, pkt.dst
    if pkt.proto == IPPROTO_ICMPV6 and pkt.af != AF_INET:
        t = pkt.icmp_type
        if t in (ND_NEIGHBOR_SOLICIT, ND_NEIGHBOR_ADVERT):
            if multi:
                return None
            target = ZERO_ADDR6 if quoted else (_nd_addr(pkt) or ZERO_ADDR6)
            if t == ND_NEIGHBOR_SOLICIT:
                d = target
            else:
                s = target
                if d[0] == 0xFF:
                    d = ZERO_ADDR6
        elif multi:
            s = IN6ADDR_LINKLOCAL_ALLNODES
    return s, d

TM_UDP_FIRST = int(PFTM.UDP_FIRST_PACKET)
TM_UDP_SINGLE = int(PFTM.UDP_SINGLE)
TM_UDP_MULTIPLE = int(PFTM.UDP_MULTIPLE)
TM_ICMP_FIRST = int(PFTM.ICMP_FIRST_PACKET)
TM_ICMP_ERROR = int(PFTM.ICMP_ERROR_REPLY)
TM_OTHER_FIRST = int(PFTM.OTHER_FIRST_PACKET)
TM_OTHER_SINGLE = int(PFTM.OTHER_SINGLE)
TM_OTHER_MULTIPLE = int(PFTM.OTHER_MULTIPLE)


class Verdict:
    """The decision for one packet on one interface."""

    __slots__ = ("action", "log", "new_state", "reason", "reply", "route", "rule", "scrub",
                 "state", "xlate")

    def __init__(
        self,
        action: str,
        reason: str,
        rule: Rule | None = None,
        state: State | None = None,
        new_state: bool = False,
        reply: bytes | None = None,
        log: list[str] | None = None,
    ) -> None:
        self.action = action
        self.reason = reason
        self.rule = rule
        self.state = state
        self.new_state = new_state
        self.reply = reply
        self.log = log if log is not None else []
        # a translation to apply before the packet goes on: (src, sport, dst, dport),
        # None for what stays; for an ICMP error the quoted packet's (see
        # Filter._icmp_error_xlate): (outer src, outer dst, inner src, inner sport,
        # inner dst, inner dport)
        self.xlate: tuple[Any, ...] | None = None
        # a state-less pass's scrub options (a state's are on the state)
        self.scrub: Scrub | None = None
        # a state-less route-to/reply-to pass's route (a state's is on the state)
        self.route: StateRoute | None = None

    @property
    def passed(self) -> bool:
        return self.action == PASS

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reason": self.reason,
            "rule": self.rule.nr if self.rule is not None else None,
            "state": f"{self.state.id:016x}" if self.state is not None else None,
        }

    def __repr__(self) -> str:
        return f"<Verdict {self.action} {self.reason} rule={self.to_dict()['rule']}>"


SKIPPED = Verdict(PASS, "skip")

# syslog priorities as `set debug` names them (FreeBSD's own names mapped onto them).
DEBUG_RANKS = {"none": -1, "emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4,
               "notice": 5, "info": 6, "debug": 7, "urgent": 3, "misc": 5, "loud": 7}
DEBUG_NOTICE = DEBUG_RANKS["notice"]
MAX_PENDING_LOG = 1024


def debug_rank(level: str | None) -> int:
    return DEBUG_RANKS.get(level or "err", DEBUG_RANKS["err"])

# One int object per port number, shared by every state key (ints above 256 are not
# cached by CPython, so each key would otherwise carry two 32-byte ints of its own).
PORT_OBJECTS: tuple[int, ...] = tuple(range(65536))
INTERN_LIMIT = 1 << 16


class StateListener(Protocol):
    """What pfsync hears from pf (pfsync_insert_state / _update_state / _delete_state)."""

    def state_inserted(self, st: State, now: float) -> None: ...

    def state_updated(self, st: State, now: float) -> None: ...

    def state_removed(self, st: State, now: float) -> None: ...


def packet_ports(pkt: Packet) -> tuple[int, int]:
    """The key's two port values of a packet as its source sends it: TCP/UDP ports, an
    ICMP query's (id, type) or a reply's (type, id) -- pf's virtual ICMP ports."""
    proto = pkt.proto
    if proto in (IPPROTO_TCP, IPPROTO_UDP):
        return pkt.sport, pkt.dport
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        icmp_dir, vid, vtype, _ = icmp_mapping(pkt)
        return (vid, vtype) if icmp_dir == PF_IN else (vtype, vid)
    return 0, 0


def packet_key(direction: int, pkt: Packet) -> StateKey:
    """The state key a packet's own addresses make for a test in `direction` (slot 0 is
    the far side of the interface, slot 1 the near side), as _create_state builds it."""
    proto = pkt.proto
    sp, dp = packet_ports(pkt)
    if direction == PF_IN:
        return (pkt.af, proto, pkt.src, pkt.dst, sp, dp)
    return (pkt.af, proto, pkt.dst, pkt.src, dp, sp)


def keys_xlate(direction: int, pkt: Packet, have: StateKey,
               want: StateKey) -> tuple[Any, ...] | None:
    """What to rewrite in `pkt` (matching key `have` in `direction`) so it matches
    `want`: (src, sport, dst, dport), None for each value that stays. For ICMP queries
    and replies the echo id moves and comes as `sport`."""
    if direction == PF_IN:
        src, dst, sp, dp = want[2], want[3], want[4], want[5]
        osp, odp = have[4], have[5]
    else:
        dst, src, dp, sp = want[2], want[3], want[4], want[5]
        osp, odp = have[5], have[4]
    nsrc = src if src != pkt.src else None
    ndst = dst if dst != pkt.dst else None
    nsp = ndp = None
    if pkt.proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        # the echo id sits in one port slot, the type in the other
        if sp != osp:
            nsp = sp
        elif dp != odp:
            nsp = dp
    else:
        nsp = sp if sp != osp else None
        ndp = dp if dp != odp else None
    if nsrc is None and ndst is None and nsp is None and ndp is None:
        return None
    return (nsrc, nsp, ndst, ndp)


def state_xlate(st: State, direction: int, pkt: Packet) -> tuple[Any, ...] | None:
    """A packet found its translated state by the key of its side (`in`: wire, `out`:
    stack); it leaves with the other side's addresses and ports."""
    nat = st.nat
    assert nat is not None
    if direction == PF_IN:
        return keys_xlate(direction, pkt, st.key, nat.skey)
    return keys_xlate(direction, pkt, nat.skey, st.key)


def icmp_error_xlate(st: State, direction: int, pkt: Packet,
                     inner: Packet) -> tuple[Any, ...] | None:
    """An ICMP error quoting a packet of a translated state (pf_test_state_icmp): the
    quoted header takes the other key's addresses and ports, and the outer address that
    equals a quoted one follows it: a new quoted source moves the outer destination, a
    new quoted destination the outer source. Returns (outer src, outer dst, inner src,
    inner sport, inner dst, inner dport), None for what stays."""
    nat = st.nat
    assert nat is not None
    want = nat.skey if direction == PF_IN else st.key
    # the quote travelled against the error: its source sits in slot 1 for `in`
    if direction == PF_IN:
        isrc, idst, isp, idp = want[3], want[2], want[5], want[4]
    else:
        isrc, idst, isp, idp = want[2], want[3], want[4], want[5]
    n_isrc = isrc if isrc != inner.src else None
    n_idst = idst if idst != inner.dst else None
    n_isp = isp if isp != inner.sport else None
    n_idp = idp if idp != inner.dport else None
    if n_isrc is None and n_idst is None and n_isp is None and n_idp is None:
        return None
    o_dst = n_isrc if n_isrc is not None and pkt.dst == inner.src else None
    o_src = n_idst if n_idst is not None and pkt.src == inner.dst else None
    return (o_src, o_dst, n_isrc, n_isp, n_idst, n_idp)


class Filter:
    """pf for one host: the ruleset, the state table and the counters.

    `id_seed` starts the 64-bit state-id counter, as pf starts it at the boot time in the
    high 32 bits: the daemon passes the wall clock's seconds (the core reads no clock);
    the default 0 keeps tests deterministic. pfctl's views of it are in `pf.pfctl`.
    """

    def __init__(self, ruleset: Ruleset, hostid: int | None = None, now: float = 0.0,
                 id_seed: int = 0) -> None:
        self.ruleset = ruleset
        self.creatorid = hostid or ruleset.hostid or new_creatorid()
        self.states = StateTable()
        self.listener: StateListener | None = None
        self.counters = [0] * len(PFRES_NAMES)
        self.extra: dict[str, int] = {
            "challenge-ack": 0,
            "state-reuse": 0,
            "state-reuse-closing": 0,
            "split-window-slack": 0,
            "key-attach-reuse": 0,
            "key-attach-failed": 0,
            "loose-match": 0,
            "bad-icmp": 0,
            "translate-short": 0,
            "passed-in": 0,
            "passed-out": 0,
            "blocked-in": 0,
            "blocked-out": 0,
        }
        self.started = now
        self._next_id = (id_seed & 0xFFFFFFFF) << 32
        self._last_purge = now
        self.log_enabled = True
        # Lines pf logs outside any packet's verdict (an import from a peer that replaced
        # a closed state); the I/O shell drains them with take_log().
        self._pending_log: list[str] = []
        self.log_dropped = 0
        self._intern: dict[bytes, bytes] = {}
        # nat-to/rdr-to: addresses and ports for new translated states (pf/nat.py)
        self.nat = Translator(self.states)
        # the wire key of a translated state a SYN is reusing (port reuse), meanwhile
        self._reuse_wire: StateKey | None = None
        # source tracking (pf/srcnode.py); _sn_links is its state -> node dict, empty
        # (falsy) while no tracked state exists, which is all the packet path tests
        self.srcnodes = SrcNodes()
        self._sn_links = self.srcnodes.by_state
        self._sn_pending = self.srcnodes.pending
        # The tag of the packet under test (pf's mbuf tag, a pf.tags number): the router
        # clears it per packet and carries it from the `in` test to the `out` test.
        self.pkt_tag = 0
        self._apply_ruleset(ruleset)

    # -- configuration ------------------------------------------------------------
    def _apply_ruleset(self, ruleset: Ruleset) -> None:
        self.ruleset = ruleset
        self.timeouts = list(ruleset.timeouts)
        self.skip_ifaces = frozenset(ruleset.skip_ifaces)
        self.limit_states = ruleset.limit_states
        self.srcnodes.limit = ruleset.limits.get("src-nodes", PFSNODE_HIWAT)
        floor = min(t for i, t in enumerate(self.timeouts[: PFTM.FRAG]))
        every = list(ruleset.rules)
        for a in ruleset.anchors.values():
            every.extend(a.rules)
        for r in every:
            if r.timeouts:
                vals = [v for k, v in r.timeouts.items() if k < PFTM.FRAG]
                if vals:
                    floor = min(floor, *vals)
        self._expiry_floor = float(max(0, floor))
        self._debug_notice = debug_rank(getattr(ruleset, "debug", "err")) >= DEBUG_NOTICE
        self._adaptive_start = self.timeouts[PFTM.ADAPTIVE_START]
        # Tags in use anywhere (the router then carries the packet's tag); the rules
        # step is chosen per ruleset so rulesets without tags pay no test for them.
        self.tagging = ruleset.tagging
        self.pkt_tag = 0
        self._test_rules: Callable[[int, str, Packet, float], Verdict] = (
            self._test_rules_tagged if ruleset.tagging else self._test_rules_untagged)

    def load(self, ruleset: Ruleset) -> None:
        """Swap in a new ruleset; states keep pointing at their old rules, as in pf (and
        keep their translations; the new rules' pools start afresh). Anchors the new
        file does not define keep their rules (`pfctl -f` replaces the main ruleset only)."""
        if ruleset is not self.ruleset:
            ruleset.adopt_anchors(self.ruleset)
        self._apply_ruleset(ruleset)
        self.nat.forget_pools()

    def next_state_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFFFFFFFFFFFFFF
        return self._next_id

    # -- the packet path ------------------------------------------------------------
    def test(self, direction: int, ifname: str, pkt: Packet, now: float) -> Verdict:
        if ifname in self.skip_ifaces:
            return SKIPPED
        proto = pkt.proto
        if not pkt.frag_off:
            if proto in (IPPROTO_TCP, IPPROTO_UDP):
                if direction == PF_IN:
                    key = (pkt.af, proto, pkt.src, pkt.dst, pkt.sport, pkt.dport)
                else:
                    key = (pkt.af, proto, pkt.dst, pkt.src, pkt.dport, pkt.sport)
                st = self._lookup(key, now, direction)
                if st is not None:
                    if proto == IPPROTO_TCP:
                        v = self._test_tcp_state(st, direction, ifname, pkt, now)
                    else:
                        v = self._test_udp_state(st, direction, pkt, now, TM_UDP_SINGLE, TM_UDP_MULTIPLE)
                    if v is not None:
                        if st.nat is not None and v.state is st and v.action == PASS:
                            v.xlate = state_xlate(st, direction, pkt)
                        return v
            elif proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
                v = self._test_icmp(direction, ifname, pkt, now)
                if v is not None:
                    return v
            else:
                if direction == PF_IN:
                    key = (pkt.af, proto, pkt.src, pkt.dst, 0, 0)
                else:
                    key = (pkt.af, proto, pkt.dst, pkt.src, 0, 0)
                st = self._lookup(key, now, direction)
                if st is not None:
                    v = self._test_udp_state(st, direction, pkt, now, TM_OTHER_SINGLE, TM_OTHER_MULTIPLE)
                    if v is not None:
                        if st.nat is not None:
                            v.xlate = state_xlate(st, direction, pkt)
                        return v
        return self._test_rules(direction, ifname, pkt, now)

    def _lookup(self, key: tuple, now: float, direction: int = PF_IN) -> State | None:
        table = self.states
        table.searches += 1
        by_key = table.by_key
        st = by_key.get(key)
        if st is None:
            return None
        nat = st.nat
        if nat is not None and key != (st.key if direction == PF_IN else nat.skey):
            # pf_find_state: `in` finds a state by its wire key, `out` by its stack key
            return None
        if (now - st.expire >= self._expiry_floor or len(by_key) > self._adaptive_start) \
                and state_expires(st, self.timeouts, len(by_key)) <= now:
            self.remove_state(st, now)
            return None
        return st

    def _count_pass(self, st: State, direction: int, fwd: bool, pkt: Packet, now: float) -> None:
        """Count a passed packet: `fwd` when it flows along the state's direction."""
        if fwd:
            st.packets0 += 1
            st.bytes0 += pkt.ip_len
        else:
            st.packets1 += 1
            st.bytes1 += pkt.ip_len
        rule = st.rule
        if rule is not None:
            rule.packets += 1
            rule.bytes += pkt.ip_len
        if direction == PF_IN:
            self.extra["passed-in"] += 1
        else:
            self.extra["passed-out"] += 1
        listener = self.listener
        if listener is not None:
            listener.state_updated(st, now)

    def _block(self, direction: int, reason: int, rule: Rule | None = None, state: State | None = None,
               reply: bytes | None = None, log: list[str] | None = None) -> Verdict:
        self.counters[reason] += 1
        if direction == PF_IN:
            self.extra["blocked-in"] += 1
        else:
            self.extra["blocked-out"] += 1
        return Verdict(BLOCK, PFRES_NAMES[reason], rule, state, False, reply, log)

    def _test_tcp_state(self, st: State, direction: int, ifname: str, pkt: Packet, now: float) -> Verdict | None:
        flags = pkt.tcp_flags
        if flags & (TH_SYN | TH_ACK) == TH_SYN:
            ss, ds = st.src.state, st.dst.state
            if (ss >= FIN_WAIT_2 and ds >= FIN_WAIT_2) or (
                    ss >= CLOSING and ds >= CLOSING and st.pfsync_time > NEVER):
                # Port reuse: the old connection is gone; the SYN meets the rules afresh.
                # pf asks for both peers at FIN_WAIT_2. A state shared with a pfsync
                # peer may have seen both FINs but not the last ACK, which crossed the
                # other firewall a moment before this SYN (a client can only reuse its
                # port once that ACK reached it): both FINs are enough there.
                if ss < FIN_WAIT_2 or ds < FIN_WAIT_2:
                    self.extra["state-reuse-closing"] += 1
                reuse_log = []
                if self.log_enabled:
                    reuse_log.append(f"pf: state reuse {print_state(st)}{print_flags(flags)}")
                self.extra["state-reuse"] += 1
                self.remove_state(st, now)
                # a translated connection reopened from the same port keeps its
                # translation when it can (see Translator.source)
                self._reuse_wire = st.key if st.nat is not None else None
                try:
                    v = self._test_rules(direction, ifname, pkt, now)
                finally:
                    self._reuse_wire = None
                v.log[:0] = reuse_log
                return v
            if st.src.state >= ESTABLISHED and st.dst.state >= ESTABLISHED:
                # A SYN on a live connection: answer with a challenge ACK, drop the SYN.
                fwd = direction == st[DIRECTION]
                src, dst = (st.src, st.dst) if fwd else (st.dst, st.src)
                self.extra["challenge-ack"] += 1
                reply = build_tcp_ack(pkt, dst.seqlo, src.seqlo)
                return Verdict(BLOCK, "challenge-ack", st.rule, st, False, reply)
        fwd = direction == st[DIRECTION]
        if st.state_flags & PFSTATE_SLOPPY:
            res: int | tcpmod.TrackFailure = tcpmod.track_sloppy(st, pkt, fwd, now)
        else:
            res = tcpmod.track_full(st, pkt, fwd, now)
        if res.__class__ is int:
            if res:
                self.extra["loose-match" if res == tcpmod.TRACK_LOOSE else "split-window-slack"] += 1
            if self._sn_pending and st[SRC_STATE] >= ESTABLISHED \
                    and st[DST_STATE] >= ESTABLISHED and id(st) in self._sn_pending:
                over = self._src_connlimit(st, direction, now)
                if over is not None:
                    return over
            self._count_pass(st, direction, fwd, pkt, now)
            return Verdict(PASS, "state", st.rule, st)
        assert isinstance(res, tcpmod.TrackFailure)
        if not res.checks:
            # Handshake mismatch: pf_send_tcp(..., seq = th_ack, ack = 0, TH_RST) -- a bare
            # RST, not the RST|ACK of `block return`.
            rst = None if flags & TH_RST else _build_tcp(pkt, pkt.ack, 0, TH_RST, 64)
            return self._block(direction, PFRES_BADSTATE, st.rule, st, rst)
        log: list[str] = []
        if self.log_enabled:
            log = bad_state_lines(st, pkt, direction, res)
        return self._block(direction, PFRES_BADSTATE, st.rule, st, None, log)

    def _test_udp_state(self, st: State, direction: int, pkt: Packet, now: float,
                        tm_single: int, tm_multiple: int) -> Verdict:
        fwd = direction == st[DIRECTION]
        s, d = (SRC_STATE, DST_STATE) if fwd else (DST_STATE, SRC_STATE)
        src_state = st[s]
        if src_state < PFUDPS_SINGLE:
            st[s] = src_state = PFUDPS_SINGLE
        dst_state = st[d]
        if dst_state == PFUDPS_SINGLE:
            st[d] = dst_state = PFUDPS_MULTIPLE
        st.expire = now
        st.timeout = tm_multiple if (src_state == PFUDPS_MULTIPLE and dst_state == PFUDPS_MULTIPLE) else tm_single
        self._count_pass(st, direction, fwd, pkt, now)
        return Verdict(PASS, "state", st.rule, st)

    def _test_icmp(self, direction: int, ifname: str, pkt: Packet, now: float) -> Verdict | None:
        """pf_test_state_icmp for a query or reply: find the state its virtual key names.

        None sends the packet to the ruleset (pf_test_rule): no state was found. A state
        found with the message flowing the wrong way for its type (a query against the
        state's direction, or a reply along it) drops the packet with that state, when
        the state's rule named an icmp-type; a sloppy state skips that check. A match passes and sets the icmp.error timeout.
        """
        icmp_dir, vid, vtype, stateless = icmp_mapping(pkt)
        if stateless:
            return self._test_icmp_error(direction, ifname, pkt, now)
        st, right_way = self._icmp_state(direction, pkt, icmp_dir, vid, vtype, False, now)
        if st is None:
            return None
        if not right_way:
            return self._icmp_wrong_direction(direction, st, vtype, icmp_dir)
        st.expire = now
        st.timeout = TM_ICMP_ERROR
        self._count_pass(st, direction, direction == st[DIRECTION], pkt, now)
        v = Verdict(PASS, "state", st.rule, st)
        if st.nat is not None:
            v.xlate = state_xlate(st, direction, pkt)
        return v

    def _icmp_state(self, direction: int, pkt: Packet, icmp_dir: int, vid: int, vtype: int,
                    quoted: bool, now: float) -> tuple[State | None, bool]:
        """pf_icmp_state_lookup, with pf's second ("multi") try for an IPv6 reply.

        Returns (state or None, True if the message flows the right way for it). A quoted
        ICMP packet travelled against the error quoting it: its key takes the opposite
        slots, and it must have travelled along the state for a query (PF_IN).
        """
        st, ok = self._icmp_lookup(direction, pkt, icmp_dir, vid, vtype, quoted, False, now)
        if (st is None or not ok) and icmp_dir == PF_OUT and pkt.af != AF_INET:
            st2, ok2 = self._icmp_lookup(direction, pkt, icmp_dir, vid, vtype, quoted, True, now)
            if st2 is not None:
                return st2, ok2
        return st, ok

    def _icmp_lookup(self, direction: int, pkt: Packet, icmp_dir: int, vid: int, vtype: int,
                     quoted: bool, multi: bool, now: float) -> tuple[State | None, bool]:
        addrs = _icmp_key_addrs(pkt, quoted, multi)
        if addrs is None:
            return None, True
        s, d = addrs
        ps, pd = (vid, vtype) if icmp_dir == PF_IN else (vtype, vid)
        if (direction == PF_IN) != quoted:
            key = (pkt.af, pkt.proto, s, d, ps, pd)
        else:
            key = (pkt.af, pkt.proto, d, s, pd, ps)
        st = self._lookup(key, now, direction)
        if st is None:
            return None, True
        rule = st.rule
        if st.state_flags & PFSTATE_SLOPPY or rule is None or rule.icmp_type is None:
            # pf checks the direction only for states whose rule named an icmp-type
            # (`rule.ptr->type`); an unbound import has pf's default rule, which names none
            return st, True
        along = st[DIRECTION] == direction
        return st, (PF_IN if along != quoted else PF_OUT) == icmp_dir

    def _icmp_wrong_direction(self, direction: int, st: State, vtype: int, icmp_dir: int) -> Verdict:
        # pf drops with the state and sets no reason: no counter moves.
        log = [f"pf: icmp type {vtype} in wrong direction ({icmp_dir}): {print_state(st)}"] \
            if self.log_enabled else []
        if direction == PF_IN:
            self.extra["blocked-in"] += 1
        else:
            self.extra["blocked-out"] += 1
        return Verdict(BLOCK, PFRES_NAMES[PFRES_MATCH], st.rule, st, False, None, log)

    def _test_icmp_error(self, direction: int, ifname: str, pkt: Packet, now: float) -> Verdict | None:
        """pf_test_state_icmp for an error: the state of the packet it quotes decides.

        In pf's order: a quote too short to read (PFRES_SHORT) or a non-first fragment
        (PFRES_FRAG), then an outer destination other than the quoted source (PFRES_BADSTATE,
        "BAD ICMP ... outer dst"), then no state for the quoted packet: each sends the
        error to the ruleset (None, or the ruleset's verdict carrying the log line), since
        pf_test runs pf_test_rule for a drop without a state. With a state: a quoted TCP
        sequence number outside the window drops it with the state (PFRES_BADSTATE,
        "BAD ICMP ... state: ... seq="), and so does a quoted ICMP message flowing the
        wrong way for its state; anything else passes on the state without touching its
        timeout. An error quoting an error finds no state (errors never open one).
        """
        inner = pkt.inner
        if inner is None:
            self.counters[PFRES_SHORT] += 1
            return None
        if inner.frag_off:
            self.counters[PFRES_FRAG] += 1
            return None
        if pkt.dst != inner.src:
            self.counters[PFRES_BADSTATE] += 1
            self.extra["bad-icmp"] += 1
            v = self._test_rules(direction, ifname, pkt, now)
            if self.log_enabled:
                v.log.insert(0, f"pf: BAD ICMP {pkt.icmp_type}:{pkt.icmp_code} outer dst: "
                                f"{addr_str(pkt.af, pkt.src)} -> {addr_str(pkt.af, pkt.dst)} inner src: "
                                f"{addr_str(inner.af, inner.src)} -> {addr_str(inner.af, inner.dst)}")
            return v
        iproto = inner.proto
        # The quoted packet travelled against the error: its source takes the key slot
        # of the error's destination.
        src_first = direction != PF_IN
        if iproto in (IPPROTO_TCP, IPPROTO_UDP):
            if src_first:
                key = (inner.af, iproto, inner.src, inner.dst, inner.sport, inner.dport)
            else:
                key = (inner.af, iproto, inner.dst, inner.src, inner.dport, inner.sport)
            st = self._lookup(key, now, direction)
            if st is None:
                return None
            if iproto == IPPROTO_TCP and not (st.state_flags & PFSTATE_SLOPPY):
                if direction == st[DIRECTION]:
                    src, dst = st.dst, st.src
                else:
                    src, dst = st.src, st.dst
                dws = dst.wscale & PF_WSCALE_MASK if (src.wscale and dst.wscale) else 0
                seq = (inner.seq - src.seqdiff) & tcpmod.M32
                if not (tcpmod.sdiff(src.seqhi, seq) >= 0
                        and tcpmod.sdiff(seq, src.seqlo - (dst.max_win << dws)) >= 0):
                    self.extra["bad-icmp"] += 1
                    log = [f"pf: BAD ICMP {pkt.icmp_type}:{pkt.icmp_code} {addr_str(pkt.af, pkt.src)} -> "
                           f"{addr_str(pkt.af, pkt.dst)} state: {print_state(st)} seq={seq}"] \
                        if self.log_enabled else []
                    return self._block(direction, PFRES_BADSTATE, st.rule, st, None, log)
        elif iproto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            if (iproto == IPPROTO_ICMP) != (inner.af == AF_INET):
                self.counters[PFRES_NORM] += 1
                return None
            icmp_dir, vid, vtype, _ = icmp_mapping(inner, True)
            st, right_way = self._icmp_state(direction, inner, icmp_dir, vid, vtype, True, now)
            if st is None:
                return None
            if not right_way:
                return self._icmp_wrong_direction(direction, st, vtype, icmp_dir)
        else:
            if src_first:
                key = (inner.af, iproto, inner.src, inner.dst, 0, 0)
            else:
                key = (inner.af, iproto, inner.dst, inner.src, 0, 0)
            st = self._lookup(key, now, direction)
            if st is None:
                return None
        self._count_pass(st, direction, direction == st[DIRECTION], pkt, now)
        v = Verdict(PASS, "state", st.rule, st)
        if st.nat is not None and iproto not in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            v.xlate = icmp_error_xlate(st, direction, pkt, inner)
        return v

    def load_anchor(self, path: str, text: str, filename: str,
                    check: Callable[[list[Rule]], None] | None = None) -> int:
        """`pfctl -a PATH -f FILE`: the anchor's rules replaced (RuleSyntaxError, or a
        ValueError from `check` given the new rules, leaves them as they were); the
        number of rules loaded."""
        sub = prepare_anchor(self.ruleset, path, text, filename)
        if check is not None:
            check([r for a in sub.anchors.values() for r in a.rules])
        graft(self.ruleset, sub)
        self._apply_ruleset(self.ruleset)
        return len(self.ruleset.anchors[path].rules)

    def flush_anchor(self, path: str) -> int:
        """`pfctl -a PATH -F rules`: the number of rules removed (0: no such anchor)."""
        a = self.ruleset.anchors.get(path)
        if a is None:
            return 0
        n = len(a.rules)
        self.ruleset.load_anchor(path, [])
        self._apply_ruleset(self.ruleset)
        return n

    def _test_rules_tagged(self, direction: int, ifname: str, pkt: Packet,
                           now: float) -> Verdict:
        """The rules see the packet's tag (`tagged`); the tag they leave goes on with
        the packet and onto a new state (pf_tag_packet, s->tag). States keep it in
        state_flags bits 16-31; pfsync has no field for it, so imported states have none."""
        ruleset = self.ruleset
        ruleset.tag = self.pkt_tag
        v = self._test_rules_untagged(direction, ifname, pkt, now)
        tag = ruleset.tag
        self.pkt_tag = tag
        st = v.state
        if tag and v.new_state and st is not None:
            st.state_flags = (st.state_flags & 0xFFFF) | (tag << 16)
        return v

    def _test_rules_untagged(self, direction: int, ifname: str, pkt: Packet,
                             now: float) -> Verdict:
        ruleset = self.ruleset
        if ruleset.translation_rules:
            return self._test_translated_first(direction, ifname, pkt, now)
        rule = ruleset.evaluate(pkt, direction, ifname)
        pool_rule = ruleset.last_nat if direction != PF_IN else ruleset.last_rdr
        if pool_rule is not None and rule is not None and rule.action == PASS:
            key = packet_key(direction, pkt)
            other = self._translate(pool_rule, direction, key)
            if other is None:
                return self._block(direction, PFRES_TRANSLATE, rule)
            return self._decide(rule, direction, ifname, pkt, now, (key, other, pool_rule))
        return self._decide(rule, direction, ifname, pkt, now, None)

    def _translate(self, pool_rule: Rule, direction: int, key: StateKey) -> StateKey | None:
        """The other key of a new translated state: for `out` (nat-to) `key` is the stack
        key and the wire key is returned; for `in` (rdr-to) the reverse."""
        if direction == PF_IN:
            return self.nat.destination(pool_rule.rdr, key, pool_rule)
        return self.nat.source(pool_rule.nat, key, self._reuse_wire)

    def _test_translated_first(self, direction: int, ifname: str, pkt: Packet,
                               now: float) -> Verdict:
        """FreeBSD's order: the first matching nat/rdr/binat rule translates, then the
        filter rules see the translated packet (`nat pass`/`rdr pass` skip them)."""
        ruleset = self.ruleset
        tr = ruleset.translate_lookup(pkt, direction, ifname)
        pool = None if tr is None else (tr.nat if direction != PF_IN else tr.rdr)
        if tr is None or pool is None:  # no rule, or `no nat`/`no rdr`
            return self._decide(ruleset.evaluate(pkt, direction, ifname), direction,
                                ifname, pkt, now, None)
        key = packet_key(direction, pkt)
        other = self._translate(tr, direction, key)
        if other is None:
            return self._block(direction, PFRES_TRANSLATE, tr)
        if getattr(tr, "natpass", False):
            rule: Rule | None = tr
        else:
            saved = (pkt.src, pkt.sport, pkt.dst, pkt.dport)
            if direction == PF_IN:
                pkt.src, pkt.dst, pkt.sport, pkt.dport = other[2], other[3], other[4], other[5]
            else:
                pkt.dst, pkt.src, pkt.dport, pkt.sport = other[2], other[3], other[4], other[5]
            try:
                rule = ruleset.evaluate(pkt, direction, ifname)
            finally:
                pkt.src, pkt.sport, pkt.dst, pkt.dport = saved
        return self._decide(rule, direction, ifname, pkt, now, (key, other, tr))

    def _decide(self, rule: Rule | None, direction: int, ifname: str, pkt: Packet,
                now: float, xl: tuple[StateKey, StateKey, Rule] | None) -> Verdict:
        """The verdict of the deciding rule; `xl` = (the packet's key, the translated
        key, the translating rule) for a translated connection."""
        self.counters[PFRES_MATCH] += 1
        if rule is None:
            # pf's default rule: pass, no state.
            if direction == PF_IN:
                self.extra["passed-in"] += 1
            else:
                self.extra["passed-out"] += 1
            v = Verdict(PASS, "match")
            v.scrub = self.ruleset.last_scrub  # the match rules' (pf's default rule)
            return v
        rule.packets += 1
        rule.bytes += pkt.ip_len
        log = [rule_log_line(rule, direction, ifname, pkt)] if rule.log and self.log_enabled else []
        if rule.action != PASS:
            reply = self._block_reply(rule, pkt)
            if direction == PF_IN:
                self.extra["blocked-in"] += 1
            else:
                self.extra["blocked-out"] += 1
            return Verdict(BLOCK, "match", rule, None, False, reply, log)
        if (not rule.keep_state and not getattr(rule, "natpass", False)) or pkt.frag_off:
            if direction == PF_IN:
                self.extra["passed-in"] += 1
            else:
                self.extra["passed-out"] += 1
            v = Verdict(PASS, "match", rule, None, False, None, log)
            v.scrub = self.ruleset.last_scrub
            if rule.route is not None:
                v.route = StateRoute(rule.route.kind, rule.route.pick())
            if xl is not None:
                v.xlate = keys_xlate(direction, pkt, xl[0], xl[1])
            return v
        proto = pkt.proto
        if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6) and icmp_mapping(pkt)[3]:
            # Errors and neighbour advertisements never open a state (replies do not get
            # here: the ruleset skips a stateful rule for them unless it is sloppy).
            if direction == PF_IN:
                self.extra["passed-in"] += 1
            else:
                self.extra["passed-out"] += 1
            return Verdict(PASS, "match", rule, None, False, None, log)
        # pf_create_state: the rule's `max` first (PFRES_MAXSTATES, "state-limit"); a full
        # state pool (`set limit states`) makes pool_get fail: PFRES_MEMORY, "memory".
        if rule.max_states and rule.states_cur >= rule.max_states:
            return self._block(direction, PFRES_MAXSTATES, rule, None, None, log)
        sn: SrcNode | None = None
        if rule.srctrack is not None:
            # pf_insert_src_node: max-src-nodes, max-src-states, `set limit src-nodes`
            sn = self.srcnodes.find_or_insert(rule, rule.srctrack, pkt.af, pkt.src, now)
            if sn is None:
                return self._block(direction, PFRES_SRCLIMIT, rule, None, None, log)
        if len(self.states) >= self.limit_states:
            if sn is not None:
                self.srcnodes.release_if_unused(sn, now)
            return self._block(direction, PFRES_MEMORY, rule, None, None, log)
        st = self._create_state(rule, direction, pkt, now, xl)
        if st is None:
            if sn is not None:
                self.srcnodes.release_if_unused(sn, now)
            return self._block(direction, PFRES_STATEINS, rule, None, None, log)
        if sn is not None:
            self.srcnodes.link(st, sn, pkt.proto == IPPROTO_TCP)
        if direction == PF_IN:
            self.extra["passed-in"] += 1
        else:
            self.extra["passed-out"] += 1
        v = Verdict(PASS, "match", rule, st, True, None, log)
        if st.nat is not None:
            v.xlate = state_xlate(st, direction, pkt)
        return v

    def _create_state(self, rule: Rule, direction: int, pkt: Packet, now: float,
                      xl: tuple[StateKey, StateKey, Rule] | None = None) -> State | None:
        proto = pkt.proto
        sp, dp = packet_ports(pkt)
        # Share address and port objects between states: a table of a million states
        # holds far fewer distinct hosts than states.
        intern = self._intern
        src = intern.get(pkt.src)
        if src is None:
            if len(intern) >= INTERN_LIMIT:
                intern.clear()
            src = intern.setdefault(pkt.src, pkt.src)
        dst = intern.get(pkt.dst)
        if dst is None:
            dst = intern.setdefault(pkt.dst, pkt.dst)
        sp = PORT_OBJECTS[sp]
        dp = PORT_OBJECTS[dp]
        if direction == PF_IN:
            key = (pkt.af, proto, src, dst, sp, dp)
        else:
            key = (pkt.af, proto, dst, src, dp, sp)
        translated = xl is not None and xl[1] != key
        scrub = self.ruleset.last_scrub
        st: State
        if rule.route is not None:
            rst = RouteState(key, direction, self.creatorid, self.next_state_id(), now, rule)
            rst.nat = None
            rst.scrub = scrub
            rst.route = StateRoute(rule.route.kind, rule.route.pick())
            st = rst
        elif scrub is None:
            st = (NatState if translated else State)(
                key, direction, self.creatorid, self.next_state_id(), now, rule)
        else:
            st = ScrubState(key, direction, self.creatorid, self.next_state_id(), now, rule)
            st.nat = None
            st.scrub = scrub  # pf keeps the scrub options on the state
        if proto == IPPROTO_TCP:
            tcpmod.init_src_peer(st, pkt)
        elif proto == IPPROTO_UDP:
            st[SRC_STATE] = PFUDPS_SINGLE
            st.timeout = TM_UDP_FIRST
        elif proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            st.timeout = TM_ICMP_FIRST
            if pkt.icmp_type == ND_NEIGHBOR_SOLICIT and proto == IPPROTO_ICMPV6:
                s_, d_ = _icmp_key_addrs(pkt, False, False) or (src, dst)
                st.key = key = (pkt.af, proto, s_, d_, sp, dp) if direction == PF_IN \
                    else (pkt.af, proto, d_, s_, dp, sp)
        else:
            st[SRC_STATE] = PFUDPS_SINGLE
            st.timeout = TM_OTHER_FIRST
        if rule.no_sync:
            st.state_flags |= PFSTATE_NOSYNC
        if rule.sloppy:
            st.state_flags |= PFSTATE_SLOPPY
        st.log = 1 if rule.log else 0
        st.packets0 = 1
        st.bytes0 = pkt.ip_len
        if translated:
            assert xl is not None
            # the packet's key is the wire key of an `in` state (rdr-to) and the stack
            # key of an `out` one (nat-to)
            if direction == PF_IN:
                st.nat = NatInfo(xl[1], xl[2])
            else:
                st.nat = NatInfo(st.key, xl[2])
                st.key = xl[1]
        if not self.attach_state(st, now, from_peer=False):
            return None
        rule.states_cur += 1
        rule.states_tot += 1
        if self.listener is not None:
            self.listener.state_inserted(st, now)
        return st

    def _src_connlimit(self, st: State, direction: int, now: float) -> Verdict | None:
        """pf_src_connlimit once the handshake completed: count the connection on its
        source node; over max-src-conn[-rate] the source goes into the overload table
        (its states killed with `flush`: this rule's, or all with `flush global`) and
        this state is killed, the packet dropped (PFRES_SRCLIMIT)."""
        rule = st.rule
        opts = rule.srctrack if rule is not None else None
        if opts is None:
            return None
        sn = self.srcnodes.connlimit(st, opts, now)
        if sn is None:
            return None
        killed = 0
        lc = self.srcnodes.limit_counters
        if opts.overload is not None:
            lc["overload-table-insertion"] += 1
            table = self.ruleset.tables.get(opts.overload.name, opts.overload)
            table.add(sn.af, int.from_bytes(sn.addr, "big"), len(sn.addr) * 8)
            if opts.flush:
                lc["overload-flush-states"] += 1
                # pf_overload_task: the source is addr[0] of an `in` state's wire key,
                # addr[1] of an `out` one's (a forwarded connection has both)
                for other in list(self.states):
                    k = other.key
                    slot = 2 if other[DIRECTION] == PF_IN else 3
                    if (other is not st and k[0] == sn.af and k[slot] == sn.addr
                            and (opts.flush_global or other.rule is rule)
                            and self.remove_state(other, now)):
                        killed += 1
            self._debug_log(f"pf: pf_src_connlimit: blocking address {addr_str(sn.af, sn.addr)}"
                            + (f", {killed} states killed" if opts.flush else ""))
        self.remove_state(st, now)
        return self._block(direction, PFRES_SRCLIMIT, rule, None)

    def _block_reply(self, rule: Rule, pkt: Packet) -> bytes | None:
        mode = rule.return_mode
        if mode is None:
            mode = "return" if self.ruleset.block_policy == "return" else "drop"
        if mode == "drop":
            return None
        is_tcp = pkt.proto == IPPROTO_TCP
        if mode in ("return", "return-rst") and is_tcp:
            if pkt.tcp_flags & TH_RST:
                return None
            return build_tcp_rst(pkt)
        if (mode in ("return", "return-icmp", "return-icmp6") and not is_tcp) or mode in (
                "return-icmp", "return-icmp6"):
            if pkt.proto in (IPPROTO_ICMP, IPPROTO_ICMPV6) and pkt.inner is not None:
                return None  # never answer an error with an error
            return build_icmp_unreach(
                pkt, code=rule.return_icmp if pkt.af == AF_INET else rule.return_icmp6)
        return None

    # -- state management (used by purge, ctl and pfsync) ---------------------------
    def attach_state(self, st: State, now: float, from_peer: bool) -> bool:
        """Link a new state into the table, as pf_state_key_attach does.

        A key already held by a TCP state whose peers are both at or past FIN_WAIT_2 is
        a finished connection whose ports are being reused: the old state goes and the
        new one takes the key (either of a translated state's two keys). Any other collision refuses the new state. This matters
        most for states learnt from a peer: the firewall that saw the new SYN has already
        replaced its closed state, and its INS can reach us before its DEL_C for the old
        one (INS sections come first in a frame). The old state is then removed without
        a DEL_C of ours when the news came from a peer, which already knows.
        """
        table = self.states
        by_key = table.by_key
        olds = [by_key.get(st.key)]
        nat = st.nat
        if nat is not None:  # a translated state holds its stack key too
            olds.append(by_key.get(nat.skey))
        for old in olds:
            if old is None or not old.linked:  # none, or the same old state twice
                continue
            reuse = (old.key[1] == IPPROTO_TCP and old.src.state >= FIN_WAIT_2
                     and old.dst.state >= FIN_WAIT_2)
            if not reuse or table.by_id(st.creatorid, st.id) is not None:
                self.extra["key-attach-failed"] += 1
                self._debug_log(f"pf: key attach failed on {st.ifname}: {print_state(st)}, "
                                f"existing: {print_state(old)}")
                return False
            self.extra["key-attach-reuse"] += 1
            self._debug_log(f"pf: key attach reuse on {st.ifname}: {print_state(st)}, "
                            f"existing: {print_state(old)}")
            if from_peer:
                old.state_flags |= PFSTATE_NOSYNC
            self.remove_state(old, now)
        return table.insert(st)

    def _debug_log(self, line: str) -> None:
        """A line pf logs at LOG_NOTICE (`set debug notice` or louder); bounded."""
        if not (self._debug_notice and self.log_enabled):
            return
        if len(self._pending_log) >= MAX_PENDING_LOG:
            self.log_dropped += 1
            return
        self._pending_log.append(line)

    def take_log(self) -> list[str]:
        lines = self._pending_log
        self._pending_log = []
        return lines

    def remove_state(self, st: State, now: float, notify: bool = True) -> bool:
        if not self.states.remove(st):
            return False
        if st.rule is not None:
            st.rule.states_cur -= 1
        if self._sn_links:
            self.srcnodes.unlink(st, now, self.timeouts[PFTM.SRC_NODE])
        if notify and self.listener is not None:
            self.listener.state_removed(st, now)
        return True

    def import_state(self, st: State, rule_nr: int, now: float, bind_rule: bool = False) -> bool:
        """Insert a state learned from a peer. Its rule is bound only if the rulesets agree.

        A peer is held to `set limit states` like local traffic: without that, anyone on
        the sync link could grow the table without bound.
        """
        if len(self.states) >= self.limit_states:
            self.counters[PFRES_MEMORY] += 1
            return False
        st.rule = None
        if bind_rule and 0 <= rule_nr < len(self.ruleset.rules):
            st.rule = self.ruleset.rules[rule_nr]
        if not self.attach_state(st, now, from_peer=True):
            return False
        if st.rule is not None:
            st.rule.states_cur += 1
        return True

    def expire(self, now: float, full: bool = False) -> int:
        """Purge a slice of the table, so the whole table is walked once per `interval`."""
        n = len(self.states)
        interval = max(1, self.timeouts[PFTM.INTERVAL])
        elapsed = max(0.0, now - self._last_purge)
        self._last_purge = now
        count = n + 1 if full else max(1024, math.ceil(n * elapsed / interval))
        removed = 0
        timeouts = self.timeouts
        # Collect first, remove afterwards (pf_purge_expired_states' gcl list): every
        # state of the slice is judged against the same state counts, global and per rule.
        expired = [st for st in self.states.next_purge_slice(count)
                   if st.linked and state_expires(st, timeouts, n) <= now]
        for st in expired:
            if self.remove_state(st, now):
                removed += 1
        if self.srcnodes.idle:
            self.srcnodes.purge(now)
        return removed

    def next_deadline(self) -> float:
        return self._last_purge + 1.0

    def flush_states(self, now: float) -> int:
        """pfctl -F states: every state goes, marked no-sync first as pf does, so pfsync
        sends no DEL_C for each; the caller tells peers with one CLR instead."""
        count = 0
        for st in self.states:
            st.state_flags |= PFSTATE_NOSYNC
            if self.remove_state(st, now):
                count += 1
        return count

    def kill_states(self, now: float, host: str | None = None, host2: str | None = None,
                    state_id: str | None = None) -> int:
        """pfctl -k src [-k dst] / -k id: remove matching states, returning the count.

        As pfctl: one host kills the states originating from it; a second one narrows
        that to states towards it. "Originating" is the creating packet's source.
        """
        import ipaddress

        def addr_of(text: str) -> bytes:
            return ipaddress.ip_address(text).packed

        count = 0
        want_id = want_creator = None
        if state_id is not None:
            part = state_id.split("/")
            want_id = int(part[0], 16)
            want_creator = int(part[1], 16) if len(part) > 1 else None
        h1 = addr_of(host) if host else None
        h2 = addr_of(host2) if host2 else None
        for st in self.states:
            if want_id is not None:
                if st.id != want_id or (want_creator is not None and st.creatorid != want_creator):
                    continue
            else:
                a0, a1 = st.key[2], st.key[3]
                # slot 0 holds the source of an inbound state, slot 1 of an outbound one
                srcaddr, dstaddr = (a0, a1) if st.direction == PF_IN else (a1, a0)
                if h1 is not None and h1 != srcaddr:
                    continue
                if h2 is not None and h2 != dstaddr:
                    continue
            if self.remove_state(st, now):
                count += 1
        return count


__all__ = ["BLOCK", "MATCH", "PASS", "PFSTATE_NOSYNC", "PFTM_MAX", "Filter", "StateListener", "Verdict"]
