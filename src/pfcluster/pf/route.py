"""Policy routing: `route-to`, `reply-to` and `dup-to` targets of pass rules
(docs/route-to.md).

pf sends the packets of a routed state out of the named interface to the named gateway
instead of where the routing table says. On Linux the daemon does it with the skb mark:
the `in` test's verdict marks the packet with its target's mark (ROUTE_MARK_BASE plus
the target's index in the ruleset), an `ip rule fwmark` sends marked packets to a table
of their own whose default route is the target. The state keeps the target, so its later
packets (and a peer that imported the state) get the same mark. `dup-to` marks with
DUP_MARK_BASE instead; the daemon's iptables chain (io/iptables.py) sends a copy of a
packet so marked to the target with TEE, and the packet itself takes the main table.
"""

from __future__ import annotations

import socket
from typing import Any

from pfcluster.pf.constants import AF_INET, PF_IN

# The rule's kind, as OpenBSD numbers pf_state.rt (PF_NOPFROUTE, PF_ROUTETO, PF_DUPTO,
# PF_REPLYTO); FreeBSD has PF_FASTROUTE at 1 and the others one higher (see WIRE_RT).
RT_NONE = 0
RT_ROUTETO = 1
RT_DUPTO = 2
RT_REPLYTO = 3
RT_WORDS = {RT_ROUTETO: "route-to", RT_DUPTO: "dup-to", RT_REPLYTO: "reply-to"}

# Low bits of the skb mark for route targets: 0x0100 | index. The upper 16 bits carry pf
# tags between the daemon's hooks; GENERATED_MARK (0x7066) has bit 0x100 clear, so it
# never matches a route mark under ROUTE_MARK_MASK.
ROUTE_MARK_BASE = 0x0100
ROUTE_MARK_MASK = 0x01FF
# dup-to: 0x0200 | index under 0x02ff. pf allows one of route-to/reply-to/dup-to per
# rule, so a packet carries one of the two; under the other's mask each reads as a bare
# index (bit 0x100 or 0x200 clear), and GENERATED_MARK has both bits clear.
DUP_MARK_BASE = 0x0200
DUP_MARK_MASK = 0x02FF
# Bits a verdict clears before it sets a route or dup mark.
TARGET_MARK_BITS = ROUTE_MARK_MASK | DUP_MARK_MASK
MAX_TARGETS = 256
# Routing tables of the targets: ROUTE_TABLE_BASE + index (away from main/local/default).
ROUTE_TABLE_BASE = 0x7100


class RouteTarget:
    """One `(ifname gateway)` or bare `ifname` of a route-to/reply-to pool. `index` is
    its place in the ruleset's target list (its mark and table), -1 until numbered;
    `dup` is set when a dup-to rule names it (the daemon then installs its TEE rule)."""

    __slots__ = ("addr", "af", "dup", "ifname", "index")

    def __init__(self, ifname: str, addr: bytes | None, af: int = AF_INET) -> None:
        self.ifname = ifname
        self.addr = addr
        self.af = af
        self.index = -1
        self.dup = False

    @property
    def ident(self) -> tuple[str, bytes | None]:
        return (self.ifname, self.addr)

    @property
    def mark(self) -> int:
        return ROUTE_MARK_BASE | self.index if self.index >= 0 else 0

    @property
    def dup_mark(self) -> int:
        return DUP_MARK_BASE | self.index if self.index >= 0 else 0

    def mark_for(self, kind: int) -> int:
        """The mark of a packet of a `kind` (RT_*) state going to this target."""
        return self.dup_mark if kind == RT_DUPTO else self.mark

    def __str__(self) -> str:
        if self.addr is None:
            return self.ifname
        return f"({self.ifname} {socket.inet_ntop(self.af, self.addr)})"

    def __repr__(self) -> str:
        return f"<RouteTarget {self} mark={self.mark:#x}>"


class RoutePool:
    """A rule's `route-to`/`reply-to` list; several targets are used round-robin."""

    __slots__ = ("kind", "next", "targets")

    def __init__(self, kind: int, targets: list[RouteTarget]) -> None:
        self.kind = kind
        self.targets = targets
        self.next = 0

    def pick(self) -> RouteTarget:
        """The target of a new state: round-robin over the pool."""
        t = self.targets[self.next % len(self.targets)]
        self.next += 1
        return t

    def __str__(self) -> str:
        word = RT_WORDS[self.kind]
        if len(self.targets) == 1:
            return f"{word} {self.targets[0]}"
        return f"{word} {{ " + ", ".join(map(str, self.targets)) + " } round-robin"


class StateRoute:
    """What a routed state keeps (pf's st->rt, rt_addr, rt_kif)."""

    __slots__ = ("kind", "target")

    def __init__(self, kind: int, target: RouteTarget) -> None:
        self.kind = kind
        self.target = target


def packet_target(route: StateRoute, forward: bool) -> RouteTarget | None:
    """The target of a packet of a routed state: route-to and dup-to send (a copy of)
    the packets going the way of the packet that made the state (`forward`), reply-to
    the replies."""
    if route.kind == RT_ROUTETO or route.kind == RT_DUPTO:
        return route.target if forward else None
    if route.kind == RT_REPLYTO:
        return None if forward else route.target
    return None


def verdict_target(v: Any, pkt: Any, by_key: dict[Any, Any] | None = None) -> RouteTarget | None:
    """verdict_route's target."""
    r = verdict_route(v, pkt, by_key)
    return None if r is None else r[1]


def verdict_route(v: Any, pkt: Any,
                  by_key: dict[Any, Any] | None = None) -> tuple[int, RouteTarget] | None:
    """(kind, target) of a packet the `in` test passed with verdict `v` (None: the main
    routing table decides, no copy). Routed states come from `pass in` rules only, so a
    packet matching one in its `in` test goes the first packet's way (route-to, dup-to).
    A reply of such a state comes in on another interface and matches it only in pf's
    `out` test, which Linux runs after routing: `by_key` (the state table's dict) is
    looked up with the packet's key as the `out` test would build it, for reply-to."""
    r = v.route
    if r is not None:  # a state-less pass
        return (r.kind, r.target) if r.kind != RT_REPLYTO else None
    st = v.state
    if st is not None and st.route is not None:
        k = st.key
        sr = st.route
        t = packet_target(sr, pkt.src == k[2] and pkt.dst == k[3])
        return None if t is None else (sr.kind, t)
    if by_key is None:
        return None
    st = by_key.get((pkt.af, pkt.proto, pkt.dst, pkt.src, pkt.dport, pkt.sport))
    if st is None or st.route is None or st.direction != PF_IN:
        return None
    t = packet_target(st.route, False)
    return None if t is None else (st.route.kind, t)


def verdict_mark(v: Any, pkt: Any, by_key: dict[Any, Any] | None = None) -> int:
    """verdict_route's mark (0: none, or a peer's target not yet resolved)."""
    r = verdict_route(v, pkt, by_key)
    return 0 if r is None else r[1].mark_for(r[0])


# pf_state.rt on the wire: OpenBSD numbers PF_NOPFROUTE, PF_ROUTETO, PF_DUPTO, PF_REPLYTO
# from 0; FreeBSD has PF_FASTROUTE at 1, so route-to is 2 and reply-to 4 there.
_FREEBSD_RT = {RT_ROUTETO: 2, RT_DUPTO: 3, RT_REPLYTO: 4}
_FREEBSD_RT_IN = {0: RT_NONE, 1: RT_NONE, **{w: k for k, w in _FREEBSD_RT.items()}}
_OPENBSD_RT_IN = {RT_NONE: RT_NONE, RT_ROUTETO: RT_ROUTETO, RT_DUPTO: RT_DUPTO,
                  RT_REPLYTO: RT_REPLYTO}


def rt_to_wire(kind: int, freebsd: bool) -> int:
    return _FREEBSD_RT.get(kind, 0) if freebsd else kind


def rt_from_wire(value: int, freebsd: bool) -> int | None:
    """Our RT_* kind of a received pf_state.rt; None for a value no pf sends."""
    return (_FREEBSD_RT_IN if freebsd else _OPENBSD_RT_IN).get(value)


_ZERO16 = bytes(16)


def route_wire(st: Any, freebsd: bool) -> tuple[int, bytes, bytes]:
    """(rt, rt_addr padded to 16 bytes, rt_ifname) of a state for a pfsync_state."""
    r = st.route
    if r is None:
        return 0, _ZERO16, b""
    t = r.target
    addr = _ZERO16 if t.addr is None else t.addr + bytes(16 - len(t.addr))
    return rt_to_wire(r.kind, freebsd), addr, t.ifname.encode("latin-1")


def imported_route(kind: int, rt_addr: bytes, rt_ifname: str, af: int) -> StateRoute:
    """The route of a state a peer sent: its target is numbered (given a mark) by
    `resolve` against this firewall's own targets when a packet needs it."""
    alen = 4 if af == AF_INET else 16
    addr = rt_addr[:alen]
    t = RouteTarget(rt_ifname, None if not any(addr) else addr, af)
    return StateRoute(kind, t)


def resolve(t: RouteTarget, targets: list[RouteTarget]) -> int:
    """The mark of target `t` on this firewall, 0 when our rules name no such target.
    An imported target is matched by interface and gateway, or by the gateway alone
    when its dialect carries no interface (OpenBSD); the index found is kept on it."""
    if t.index >= 0:
        return t.mark
    for mine in targets:
        if mine.addr == t.addr and (not t.ifname or mine.ifname == t.ifname):
            t.index = mine.index
            t.ifname = mine.ifname
            return t.mark
    return 0


def in_only(kind: int) -> bool:
    """Linux routes a packet before FORWARD, so only `in` rules can choose its route;
    dup-to's mark is set by the same `in` verdict."""
    return kind in (RT_ROUTETO, RT_REPLYTO, RT_DUPTO)


__all__ = ["DUP_MARK_BASE", "DUP_MARK_MASK", "MAX_TARGETS", "ROUTE_MARK_BASE",
           "ROUTE_MARK_MASK", "ROUTE_TABLE_BASE", "RT_DUPTO", "RT_NONE", "RT_REPLYTO",
           "RT_ROUTETO", "RT_WORDS", "TARGET_MARK_BITS", "RoutePool", "RouteTarget",
           "StateRoute", "imported_route", "in_only", "packet_target", "resolve",
           "route_wire", "rt_from_wire", "rt_to_wire", "verdict_mark", "verdict_route",
           "verdict_target"]
