"""Choosing a translation for a new state: pf_get_transaddr, pf_map_addr, pf_get_sport.

A rule's pool (nat-to, rdr-to, or a FreeBSD nat/rdr rule's `-> ...`) names where a new
connection goes; this module picks the address and the port, and builds the state's
second key. It reads the state table (to find a free port) and nothing else; it never
touches packet bytes (pf/rewrite.py does, in the router step).

Active-active port allocation. pf picks a NAT source port at random in the pool's port
range and walks up, then down, to the first one no state uses. Two firewalls doing that
at the same time for two different flows can pick the same (address, port) before either
one's state has reached the other over pfsync. So each firewall owns a slice of every
port range: `NatSlice(k, n)` (daemon `--nat-slice K/N`) gives firewall k of n the k-th of
n disjoint sub-ranges, and it never hands out a port outside it. Two firewalls with
different k can then never collide, whatever the timing; the state-table check still runs
before a port is used, so a peer's synced state (a connection it translated before a
failover) is never reused either. Static ports (`static-port`, a single proxy port) cannot
be sliced; they are as safe as in pf alone (the table check), and the README says so.
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING, Any

from pfcluster.pf.constants import (
    AF_INET,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
)

if TYPE_CHECKING:
    from pfcluster.pf.state import StateKey, StateTable

# pf's default source-port range for nat-to (PF_NAT_PROXY_PORT_LOW/HIGH)
NAT_PORT_LOW = 50001
NAT_PORT_HIGH = 65535
# ICMP echo ids are translated over the whole id space
ICMP_ID_LOW = 1
ICMP_ID_HIGH = 65535
# per-pool sticky-address memory, bounded (peers and clients choose source addresses)
STICKY_LIMIT = 65536


class NatSlice:
    """Firewall `k` of `n` (1-based) owns the k-th of n disjoint slices of a port range."""

    __slots__ = ("k", "n")

    def __init__(self, k: int = 1, n: int = 1) -> None:
        if not (1 <= k <= n <= 1024):
            raise ValueError(f"nat slice {k}/{n}: need 1 <= K <= N <= 1024")
        self.k = k
        self.n = n

    @classmethod
    def parse(cls, text: str) -> NatSlice:
        """`K/N`, as `--nat-slice` takes it."""
        k, sep, n = text.partition("/")
        if not sep or not k.strip().isdigit() or not n.strip().isdigit():
            raise ValueError(f"nat slice {text!r}: expected K/N, e.g. 1/2")
        return cls(int(k), int(n))

    def range(self, low: int, high: int) -> tuple[int, int]:
        """This firewall's part of [low, high]; a range too small to cut is not cut
        (fewer ports than firewalls: each gets the same port, the table check decides)."""
        count = high - low + 1
        if self.n == 1 or count < self.n:
            return low, high
        size = count // self.n
        lo = low + (self.k - 1) * size
        hi = high if self.k == self.n else lo + size - 1
        return lo, hi

    def __str__(self) -> str:
        return f"{self.k}/{self.n}"


def _bits(af: int) -> int:
    return 32 if af == AF_INET else 128


def _to_bytes(af: int, value: int) -> bytes:
    return value.to_bytes(4 if af == AF_INET else 16, "big")


class PoolTargets:
    """A pool's addresses as (network int, prefix length) of one family, resolved at
    the time of use (an interface's address or a table's entries may change)."""

    __slots__ = ("af", "nets")

    def __init__(self, af: int, nets: list[tuple[int, int]]) -> None:
        self.af = af
        self.nets = nets

    def count(self) -> int:
        bits = _bits(self.af)
        return sum(1 << (bits - plen) for _, plen in self.nets)

    def nth(self, i: int) -> int:
        """The i-th address of the pool, networks walked in order."""
        bits = _bits(self.af)
        for net, plen in self.nets:
            size = 1 << (bits - plen)
            if i < size:
                return net + i
            i -= size
        raise IndexError(i)


def _holds(targets: PoolTargets, value: int) -> bool:
    bits = _bits(targets.af)
    return any(net <= value < net + (1 << (bits - plen)) for net, plen in targets.nets)


class PoolState:
    """What pf keeps per pool between connections: the round-robin position and the
    sticky-address map."""

    __slots__ = ("rr", "sticky")

    def __init__(self) -> None:
        self.rr = -1
        self.sticky: dict[bytes, bytes] = {}


class Translator:
    """pf_get_transaddr for one firewall: addresses from pools, ports from the table.

    `iface_addrs` maps an interface name to its addresses [(af, bytes)], for `(em0)`
    pools; the daemon fills it from netlink, replay from its --iface options.
    """

    __slots__ = ("_pools", "failed", "iface_addrs", "rng", "slice", "table")

    def __init__(self, table: StateTable, nat_slice: NatSlice | None = None,
                 rng: random.Random | None = None) -> None:
        self.table = table
        self.slice = nat_slice or NatSlice()
        self.rng = rng or random.Random()
        self.iface_addrs: dict[str, list[tuple[int, bytes]]] = {}
        self._pools: dict[int, PoolState] = {}
        self.failed = 0

    # -- addresses --------------------------------------------------------------------
    def targets(self, pool: Any, af: int) -> PoolTargets | None:
        """The pool's addresses of family `af` right now; None if it has none."""
        nets: list[tuple[int, int]] = []
        ifname = pool.ifname
        if ifname is not None:
            for a_af, raw in self.iface_addrs.get(ifname, ()):
                if a_af == af:
                    nets.append((int.from_bytes(raw, "big"), _bits(af)))
                    if pool.if_noalias:
                        break  # `(em0:0)`: the first address only
        for addr in pool.addrs:
            if addr.kind == "net" and addr.af == af:
                nets.append((addr.net, addr.plen))
        table = pool.table
        if table is not None:
            for (t_af, plen, net), neg in sorted(table.entries.items()):
                if t_af == af and not neg:
                    nets.append((net, plen))
        return PoolTargets(af, nets) if nets else None

    def forget_pools(self) -> None:
        """A reload: the old rules' round-robin positions and sticky maps go."""
        self._pools.clear()

    def _state(self, pool: Any) -> PoolState:
        ps = self._pools.get(id(pool))
        if ps is None:
            ps = self._pools[id(pool)] = PoolState()
        return ps

    def map_addr(self, pool: Any, af: int, saddr: bytes, targets: PoolTargets) -> bytes:
        """pf_map_addr: the translated address for a connection from `saddr`."""
        ps = self._state(pool)
        if pool.sticky:
            hit = ps.sticky.get(saddr)
            if hit is not None:
                return hit
        opts = pool.opts
        nets = targets.nets
        if len(nets) == 1 and (opts in ("none", "bitmask") or nets[0][1] == _bits(af)):
            net, plen = nets[0]
            if opts == "bitmask":
                host = (1 << (_bits(af) - plen)) - 1
                value = net | (int.from_bytes(saddr, "big") & host)
            else:  # one host, or a network taken as it stands (PF_POOL_NONE)
                value = net
        elif opts == "random":
            value = targets.nth(self.rng.randrange(targets.count()))
        elif opts == "source-hash":
            key = pool.hash_key or b""
            digest = hashlib.blake2b(saddr, key=key[:64], digest_size=16).digest()
            value = targets.nth(int.from_bytes(digest, "big") % targets.count())
        else:  # round-robin: the only type for lists, tables and interface groups
            ps.rr = (ps.rr + 1) % targets.count()
            value = targets.nth(ps.rr)
        out = _to_bytes(af, value)
        if pool.sticky:
            if len(ps.sticky) >= STICKY_LIMIT:
                ps.sticky.clear()
            ps.sticky[saddr] = out
        return out

    # -- ports ------------------------------------------------------------------------
    def port_range(self, pool: Any, proto: int) -> tuple[int, int]:
        """(low, high) to search; (0, 0) keeps the connection's own port."""
        if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            return self.slice.range(ICMP_ID_LOW, ICMP_ID_HIGH)
        if proto not in (IPPROTO_TCP, IPPROTO_UDP):
            return 0, 0
        if pool.static_port:
            return 0, 0
        low, high = pool.proxy_port
        if not low and not high:
            low, high = NAT_PORT_LOW, NAT_PORT_HIGH
        if high < low:
            low, high = high, low
        return self.slice.range(low, high)

    def free_port(self, head: tuple[int, int, bytes, bytes, int], own: int, low: int,
                  high: int) -> int | None:
        """pf_get_sport: a port p such that no state holds the key `head + (p,)`. Static
        (0, 0) tries the connection's own port; a range starts at a random port and walks
        up, then down, as pf does."""
        by_key = self.table.by_key
        if low == 0 and high == 0:
            return own if (*head, own) not in by_key else None
        if low == high:
            return low if (*head, low) not in by_key else None
        cut = self.rng.randint(low, high)
        for port in range(cut, high + 1):
            if (*head, port) not in by_key:
                return port
        for port in range(cut - 1, low - 1, -1):
            if (*head, port) not in by_key:
                return port
        return None

    # -- whole translations -----------------------------------------------------------
    def source(self, pool: Any, skey: StateKey,
               reuse: StateKey | None = None) -> StateKey | None:
        """nat-to for a state created `out` with stack key `skey` (slot 1 = the source
        side): its wire key, or None when the pool has no address or no free port
        (pf's PFRES_TRANSLATE).

        `reuse`: the wire key of the closed state this connection's SYN replaced (a
        client reopening from the same port). Its translation is kept when it is free
        and still in this pool and slice, where pf would pick a new random port: the
        server may still hold the old connection in TIME_WAIT under the translated
        port, and only the same translation lets it see the new SYN as the same
        client's (a new port could meet another client's TIME_WAIT, whose timestamps
        it would refuse; the lab's split connrate lost 51 of 3000 SYNs that way)."""
        af, proto, a0, a1, p0, p1 = skey
        targets = self.targets(pool, af)
        if targets is None:
            self.failed += 1
            return None
        low, high = self.port_range(pool, proto)
        if reuse is not None and reuse[:3] == skey[:3] and reuse[4] == p0 \
                and reuse not in self.table.by_key \
                and ((low == high == 0 and reuse[5] == p1) or low <= reuse[5] <= high) \
                and _holds(targets, int.from_bytes(reuse[3], "big")):
            return reuse
        tries = max(1, min(targets.count(), 64)) if len(targets.nets) > 1 or \
            targets.nets[0][1] != _bits(af) else 1
        for _ in range(tries):
            naddr = self.map_addr(pool, af, a1, targets)
            port = self.free_port((af, proto, a0, naddr, p0), p1, low, high)
            if port is not None:
                return (af, proto, a0, naddr, p0, port)
        self.failed += 1
        return None

    def destination(self, pool: Any, wkey: StateKey, rule: Any = None) -> StateKey | None:
        """rdr-to for a state created `in` with wire key `wkey` (slot 1 = the
        destination side): its stack key. The destination port becomes the pool's port;
        with a pool port range and a rule port range, the port keeps its offset (pf:
        `rdr-to ... port 8000:*` maps 80:90 onto 8000:8010)."""
        af, proto, a0, _a1, p0, p1 = wkey
        targets = self.targets(pool, af)
        if targets is None:
            self.failed += 1
            return None
        naddr = self.map_addr(pool, af, a0, targets)
        port = p1
        if proto in (IPPROTO_TCP, IPPROTO_UDP):
            low, high = pool.proxy_port
            if low:
                port = low
                dport = getattr(rule, "dport", None)
                if high > low and dport is not None:
                    port = low + (p1 - dport[1]) % (high - low + 1)
        return (af, proto, a0, naddr, p0, port)


__all__ = ["NAT_PORT_HIGH", "NAT_PORT_LOW", "NatSlice", "PoolTargets", "Translator"]
