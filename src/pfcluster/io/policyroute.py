"""The kernel half of route-to/reply-to (docs/route-to.md): per target an `ip rule
fwmark MARK/MASK lookup TABLE` and a table whose default route is the target.

The daemon's PREROUTING verdict sets the mark (io/dataplane.py); the kernel's routing
lookup, which follows PREROUTING, then takes the target's table. Rules and tables are
ours alone (priority ROUTE_RULE_PRIORITY, tables ROUTE_TABLE_BASE + index): install
first removes what a previous run left, remove takes them away at exit. A stopped daemon
marks nothing, so what stays behind after a crash routes nothing either.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from pfcluster.pf.route import ROUTE_MARK_MASK, ROUTE_TABLE_BASE, RouteTarget

log = logging.getLogger("pfcluster.policyroute")

# Before `main` (32766): a marked packet is looked up in its target's table first.
ROUTE_RULE_PRIORITY = 0x7100


class PolicyRouteError(Exception):
    """A target that cannot be installed (no such interface, netlink refused)."""


class PolicyRoutes:
    """The rules and tables of one ruleset's targets, through pyroute2."""

    __slots__ = ("_ipr", "installed")

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self._ipr: Any = IPRoute()
        self.installed: list[tuple[int, int, int]] = []  # (family, mark, table)

    def install(self, targets: list[RouteTarget]) -> None:
        """Rules and default routes for `targets`; PolicyRouteError leaves none."""
        self.remove_stale()
        try:
            for t in targets:
                self._install_one(t)
        except Exception:
            self.remove()
            raise

    def _install_one(self, t: RouteTarget) -> None:
        ipr = self._ipr
        idx = ipr.link_lookup(ifname=t.ifname)
        if not idx:
            raise PolicyRouteError(f"route target {t}: no interface {t.ifname}")
        table = ROUTE_TABLE_BASE + t.index
        fam = t.af
        dst = "0.0.0.0/0" if fam == socket.AF_INET else "::/0"
        kw: dict[str, Any] = {"dst": dst, "oif": idx[0], "table": table, "family": fam}
        if t.addr is not None:
            kw["gateway"] = socket.inet_ntop(fam, t.addr)
        else:
            kw["scope"] = 253  # RT_SCOPE_LINK: the interface alone (point-to-point)
        try:
            ipr.route("replace", **kw)
            ipr.rule("add", family=fam, table=table, priority=ROUTE_RULE_PRIORITY,
                     fwmark=t.mark, fwmask=ROUTE_MARK_MASK)
        except Exception as exc:
            raise PolicyRouteError(f"route target {t}: {exc}") from exc
        self.installed.append((fam, t.mark, table))
        log.info("route target %s: fwmark %#x/%#x -> table %d", t, t.mark, ROUTE_MARK_MASK,
                 table)

    def remove_stale(self) -> None:
        """Our priority's rules and their tables, left by a run that did not clean up."""
        for fam in (socket.AF_INET, socket.AF_INET6):
            try:
                rules = self._ipr.get_rules(family=fam)
            except Exception:
                continue
            for r in rules:
                if r.get_attr("FRA_PRIORITY") == ROUTE_RULE_PRIORITY:
                    table = r.get_attr("FRA_TABLE") or r["table"]
                    self._delete(fam, r.get_attr("FRA_FWMARK") or 0, table)

    def _delete(self, fam: int, mark: int, table: int) -> None:
        ipr = self._ipr
        try:
            ipr.rule("del", family=fam, table=table, priority=ROUTE_RULE_PRIORITY,
                     fwmark=mark, fwmask=ROUTE_MARK_MASK)
        except Exception as exc:
            log.debug("rule fwmark %#x: %s", mark, exc)
        try:
            ipr.flush_routes(table=table, family=fam)
        except Exception as exc:
            log.debug("table %d: %s", table, exc)

    def remove(self) -> None:
        """Every rule and table this object installed (each step guarded)."""
        while self.installed:
            self._delete(*self.installed.pop())

    def close(self) -> None:
        self.remove()
        self._ipr.close()
