"""The host's addresses and routes from netlink, kept current for the ruleset.

`read_host` dumps the addresses and routes (tables main and local) once; `IfWatch`
subscribes to RTM_NEWADDR/DELADDR/NEWROUTE/DELROUTE/NEWLINK on a socket the daemon's
selector watches, and on any such event dumps again into the shared `IfAddrs` (a whole
dump is a few messages on a firewall, and it cannot miss an event the way applying deltas
can after an overrun). Packets never wait on netlink: they read the sets the last
refresh built.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Any

from pfcluster.pf.ifaddrs import LOOPBACK, IfAddr, IfAddrs

log = logging.getLogger(__name__)

# rtnetlink multicast groups (linux/rtnetlink.h RTMGRP_*)
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR
          | RTMGRP_IPV6_ROUTE)

RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255
RTN_UNICAST = 1
RTN_LOCAL = 2
# blackhole, unreachable, prohibit: a route exists but leaves by no interface
RTN_NOWHERE = (6, 7, 8)


def _int(af: int, text: str) -> int:
    return int.from_bytes(socket.inet_pton(af, text), "big")


def read_host(ipr: Any) -> tuple[dict[str, list[IfAddr]], list[tuple[int, int, int, str]]]:
    """Addresses by interface name and routes (af, net, plen, out interface)."""
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    addrs: dict[str, list[IfAddr]] = {}
    for msg in ipr.get_addr():
        name = names.get(msg["index"])
        af = msg["family"]
        if name is None or af not in (socket.AF_INET, socket.AF_INET6):
            continue
        local = msg.get_attr("IFA_LOCAL")
        address = msg.get_attr("IFA_ADDRESS")
        mine = local or address
        if mine is None:
            continue
        # point-to-point: IFA_LOCAL is ours and IFA_ADDRESS the peer (rtnetlink(7))
        peer = address if local is not None and address not in (None, local) else None
        brd = msg.get_attr("IFA_BROADCAST")
        addrs.setdefault(name, []).append(IfAddr(
            af, _int(af, mine), msg["prefixlen"],
            broadcast=_int(af, brd) if brd else None,
            peer=_int(af, peer) if peer else None))
    routes: list[tuple[int, int, int, str]] = []
    for af in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=af):
            table = msg.get_attr("RTA_TABLE") or msg["table"]
            if table not in (RT_TABLE_MAIN, RT_TABLE_LOCAL):
                continue
            kind = msg["type"]
            dst = msg.get_attr("RTA_DST")
            net = _int(af, dst) if dst else 0
            plen = msg["dst_len"]
            if kind == RTN_LOCAL or kind in RTN_NOWHERE:
                routes.append((af, net, plen, LOOPBACK))  # as pf sees lo0 routes
                continue
            if kind != RTN_UNICAST or table != RT_TABLE_MAIN:
                continue
            oifs = [names.get(msg.get_attr("RTA_OIF"))]
            for hop in msg.get_attr("RTA_MULTIPATH") or ():
                oifs.append(names.get(hop["oif"]))
            for oif in oifs:
                if oif is not None:
                    routes.append((af, net, plen, oif))
    return addrs, routes


def refresh(ifaddrs: IfAddrs, ipr: Any) -> bool:
    """Dump again into `ifaddrs`; True when the addresses changed."""
    addrs, routes = read_host(ipr)
    ifaddrs.set_routes(routes)
    return ifaddrs.update(addrs)


def host_ifaddrs() -> IfAddrs:
    """The host as now, for loading rules outside the daemon (check, the supervisor)."""
    from pyroute2 import IPRoute

    ia = IfAddrs()
    with IPRoute() as ipr:
        refresh(ia, ipr)
    return ia


class IfWatch:
    """The event socket (for the selector) and the dump socket; `on_readable` refreshes."""

    __slots__ = ("_dump", "_events", "ifaddrs", "refreshes")

    def __init__(self, ifaddrs: IfAddrs) -> None:
        from pyroute2 import IPRoute

        self.ifaddrs = ifaddrs
        self.refreshes = 0
        self._events = IPRoute()
        try:
            self._events.bind(groups=GROUPS)
            self._dump = IPRoute()
        except Exception:
            self._events.close()
            raise
        refresh(ifaddrs, self._dump)

    def fileno(self) -> int:
        return int(self._events.fileno())

    def on_readable(self) -> bool:
        """Read the pending events (one recv), then dump; True when addresses changed."""
        try:
            self._events.get()
        except Exception as exc:  # ENOBUFS after an overrun: the dump below catches up
            log.debug("netlink events: %s", exc)
        self.refreshes += 1
        return refresh(self.ifaddrs, self._dump)

    def close(self) -> None:
        for s in (self._events, self._dump):
            with contextlib.suppress(Exception):
                s.close()
