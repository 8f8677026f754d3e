"""The host's interface addresses and routes, as the ruleset sees them.

pf follows an interface's addresses for `(em0)`, `(em0:network)`, `(em0:broadcast)`,
`(em0:peer)`, `(em0:0)` and `(self)` (pfi_dynaddr): the rule holds an address set that the
kernel refreshes when the interface changes. Here `IfAddrs` is that source of truth, fed
by whoever knows the host (the daemon from netlink, `replay` from its --iface options, a
test by hand); each `DynAddr` is a precomputed set refreshed on every change, so a packet
pays one set lookup (one per distinct prefix length for `:network`).

`urpf-failed` and `no-route` need the routing table (pf_routable). A route lookup per packet
through netlink is far too slow, so `IfAddrs` also keeps a small longest-prefix table of
the routes (prefix -> the interfaces it leaves by), rebuilt when the routes change.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

# The modifiers of `(if:...)` (PFI_AFLAG_*); "" is the interface's addresses themselves.
MODES = ("", "network", "broadcast", "peer")
SELF = "self"  # pf's name for every interface (the `all` group)
LOOPBACK = "lo"  # where a route to one of our own addresses leaves (as lo0 on OpenBSD)


def _bits(af: int) -> int:
    return 32 if af == AF_INET else 128


def _mask(af: int, plen: int) -> int:
    bits = _bits(af)
    return ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)


def is_link_local(af: int, addr: int) -> bool:
    """fe80::/10: one network per link, told apart only by a scope we do not carry."""
    return af == AF_INET6 and (addr >> 118) == 0x3FA


class IfAddr:
    """One address of an interface: the address, its prefix, and its broadcast or peer."""

    __slots__ = ("addr", "af", "broadcast", "peer", "plen")

    def __init__(self, af: int, addr: int, plen: int, broadcast: int | None = None,
                 peer: int | None = None) -> None:
        self.af = af
        self.addr = addr
        self.plen = plen
        self.broadcast = broadcast
        self.peer = peer

    @classmethod
    def parse(cls, text: str) -> IfAddr:
        """`192.0.2.1/24` or `2001:db8::1/64` (ValueError otherwise); IPv4 gets the
        prefix's broadcast address, as the kernel fills in for `ip addr add .. brd +`."""
        ifa = ipaddress.ip_interface(text)
        af = AF_INET if ifa.version == 4 else AF_INET6
        plen = ifa.network.prefixlen
        brd = None
        if af == AF_INET and plen < 31:
            brd = int(ifa.network.broadcast_address)
        return cls(af, int(ifa.ip), plen, broadcast=brd)

    def key(self) -> tuple[int, int, int, int | None, int | None]:
        return (self.af, self.addr, self.plen, self.broadcast, self.peer)

    def __repr__(self) -> str:
        return f"IfAddr({ipaddress.ip_address(self.addr.to_bytes(_bits(self.af) // 8, 'big'))}/{self.plen})"


class DynAddr:
    """The address set of `(ifname[:mode][:0])` for one family filter, kept current.

    `contains(af, addr)` is what the rule loop calls (the same duck type as a table).
    """

    __slots__ = ("_hosts", "_nets", "ifname", "mode", "noalias")

    def __init__(self, ifname: str, mode: str = "", noalias: bool = False) -> None:
        self.ifname = ifname
        self.mode = mode
        self.noalias = noalias
        self._hosts: frozenset[tuple[int, int]] = frozenset()
        # (af, mask, {masked nets}) per prefix length, for :network
        self._nets: tuple[tuple[int, int, frozenset[int]], ...] = ()

    def refresh(self, addrs: Iterable[IfAddr]) -> None:
        """Recompute from the interface's (or, for self, the host's) current addresses."""
        chosen: list[IfAddr] = []
        if self.noalias:  # `:0`: the first address of each family only (PFI_AFLAG_NOALIAS)
            seen: set[int] = set()
            for a in addrs:
                if a.af not in seen:
                    seen.add(a.af)
                    chosen.append(a)
        else:
            chosen = list(addrs)
        hosts: set[tuple[int, int]] = set()
        nets: dict[tuple[int, int], set[int]] = {}
        for a in chosen:
            if self.mode == "":
                hosts.add((a.af, a.addr))
            elif self.mode == "broadcast":
                if a.broadcast is not None:
                    hosts.add((a.af, a.broadcast))
            elif self.mode == "peer":
                if a.peer is not None:
                    hosts.add((a.af, a.peer))
            else:
                m = _mask(a.af, a.plen)
                nets.setdefault((a.af, a.plen), set()).add(a.addr & m)
        self._hosts = frozenset(hosts)
        self._nets = tuple((af, _mask(af, plen), frozenset(v))
                           for (af, plen), v in sorted(nets.items(), key=lambda kv: -kv[0][1]))

    def contains(self, af: int, addr: int) -> bool:
        if (af, addr) in self._hosts:
            return True
        return any(naf == af and (addr & mask) in nets for naf, mask, nets in self._nets)

    def __len__(self) -> int:
        return len(self._hosts) + sum(len(n) for _a, _m, n in self._nets)

    def __str__(self) -> str:
        mod = f":{self.mode}" if self.mode else ""
        return f"({self.ifname}{mod}{':0' if self.noalias else ''})"


class RouteTable:
    """Longest-prefix match over the routes: prefix -> the interfaces it leaves by."""

    __slots__ = ("_lpm",)

    def __init__(self, routes: Iterable[tuple[int, int, int, str]] = ()) -> None:
        per: dict[int, dict[int, dict[int, frozenset[str]]]] = {AF_INET: {}, AF_INET6: {}}
        for af, net, plen, ifname in routes:
            d = per[af].setdefault(plen, {})
            key = net & _mask(af, plen)
            d[key] = d.get(key, frozenset()) | {ifname}
        self._lpm: dict[int, tuple[tuple[int, dict[int, frozenset[str]]], ...]] = {
            af: tuple((_mask(af, plen), by_len[plen]) for plen in sorted(by_len, reverse=True))
            for af, by_len in per.items()
        }

    def lookup(self, af: int, addr: int) -> frozenset[str] | None:
        """The interfaces of the most specific route to addr (several: multipath)."""
        for mask, d in self._lpm.get(af, ()):
            hit = d.get(addr & mask)
            if hit is not None:
                return hit
        return None


class UrpfCheck:
    """`urpf-failed` and `no-route` as the rule loop's `contains` (pf_routable).

    urpf-failed matches a source whose route back does not leave by the interface the
    packet is being tested on (no route at all fails too); `ifname` is set by the ruleset
    before each walk. no-route matches an address with no route at all.
    """

    __slots__ = ("ifaddrs", "ifname", "urpf")

    def __init__(self, ifaddrs: IfAddrs, urpf: bool) -> None:
        self.ifaddrs = ifaddrs
        self.urpf = urpf
        self.ifname = ""

    def contains(self, af: int, addr: int) -> bool:
        out = self.ifaddrs.routes.lookup(af, addr)
        if not self.urpf:
            return out is None
        return out is None or self.ifname not in out

    def __str__(self) -> str:
        return "urpf-failed" if self.urpf else "no-route"


class IfAddrs:
    """The host's interfaces (name -> addresses) and routes; the dynamic sets follow them."""

    __slots__ = ("_dyn", "addrs", "changes", "routes")

    def __init__(self, addrs: dict[str, list[IfAddr]] | None = None) -> None:
        self.addrs: dict[str, list[IfAddr]] = dict(addrs or {})
        self.routes = RouteTable()
        # shared by every ruleset loaded against us: one per distinct (ifname, mode, :0)
        self._dyn: dict[tuple[str, str, bool], DynAddr] = {}
        self.changes = 0

    @classmethod
    def from_texts(cls, items: Iterable[tuple[str, str]]) -> IfAddrs:
        """From (name, "addr/plen") pairs (replay's --iface); each prefix becomes a route
        out of its interface, each address a route to the loopback."""
        ia = cls()
        for name, text in items:
            ia.addrs.setdefault(name, []).append(IfAddr.parse(text))
        ia.routes = ia.connected_routes()
        return ia

    def connected_routes(self) -> RouteTable:
        """The routes the kernel adds by itself for the addresses: prefix out of the
        interface, the address itself local."""
        routes = []
        for name, lst in self.addrs.items():
            for a in lst:
                routes.append((a.af, a.addr, a.plen, name))
                routes.append((a.af, a.addr, _bits(a.af), LOOPBACK))
        return RouteTable(routes)

    def get(self, ifname: str) -> list[IfAddr]:
        """An interface's addresses; `self` is every address of every interface."""
        if ifname == SELF:
            return [a for lst in self.addrs.values() for a in lst]
        return list(self.addrs.get(ifname, ()))

    def known(self, ifname: str) -> bool:
        return ifname == SELF or ifname in self.addrs

    def dyn(self, ifname: str, mode: str = "", noalias: bool = False) -> DynAddr:
        key = (ifname, mode, noalias)
        d = self._dyn.get(key)
        if d is None:
            d = self._dyn[key] = DynAddr(ifname, mode, noalias)
            d.refresh(self.get(ifname))
        return d

    def update(self, addrs: dict[str, list[IfAddr]]) -> bool:
        """Replace the addresses; refresh every dynamic set. True when anything changed."""
        old = {k: [a.key() for a in v] for k, v in self.addrs.items()}
        new = {k: [a.key() for a in v] for k, v in addrs.items()}
        if old == new:
            return False
        self.addrs = {k: list(v) for k, v in addrs.items()}
        for d in self._dyn.values():
            d.refresh(self.get(d.ifname))
        self.changes += 1
        return True

    def set_routes(self, routes: Iterable[tuple[int, int, int, str]]) -> None:
        self.routes = RouteTable(routes)

    def flat(self) -> dict[str, list[tuple[int, bytes]]]:
        """{name: [(af, packed)]}: the form the NAT core's `(em0)` pools read."""
        return {name: [(a.af, a.addr.to_bytes(_bits(a.af) // 8, "big")) for a in lst]
                for name, lst in self.addrs.items()}
