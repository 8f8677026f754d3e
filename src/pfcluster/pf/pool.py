"""A translation target as written in pf.conf: the pool of nat-to / rdr-to / `->`.

The parser fills one `Pool` per expanded rule; the NAT core picks addresses and ports
from it (pf_map_addr / pf_get_sport). Only what pfctl keeps is kept, so `str()` prints
the pool back as pfctl does (`-sr` for nat-to/rdr-to, `-sn` after `->`), and printing
then parsing again gives the same pool.
"""

from __future__ import annotations

from pfcluster.pf.constants import AF_INET
from pfcluster.pf.ruleset import Addr, Table

POOL_OPTS = ("none", "bitmask", "random", "source-hash", "round-robin")
# pfctl's PF_POOL_DYNTYPE: the types that may pick from more than one address.
DYNAMIC_OPTS = ("random", "source-hash", "round-robin")


class Pool:
    """Addresses (hosts/networks), one `(if)` address, or a `<table>`, plus pool options.

    `proxy_port` is (lo, hi) as written, (0, 0) when no `port` was given: for nat-to that
    means pf's DEFAULT_NAT_PORTS, for rdr-to "keep the destination port". `role` is how
    the pool is used ("nat", "rdr" or "binat"), which decides how ports print.
    """

    __slots__ = ("addrs", "hash_key", "if_noalias", "ifname", "opts", "proxy_port", "role",
                 "static_port", "sticky", "table")

    DEFAULT_NAT_PORTS = (50001, 65535)  # PF_NAT_PROXY_PORT_LOW / _HIGH

    def __init__(self, role: str = "nat") -> None:
        self.role = role
        self.addrs: list[Addr] = []
        self.ifname: str | None = None
        self.if_noalias = False  # `(em0:0)`: the interface's first address only
        self.table: Table | None = None
        self.proxy_port: tuple[int, int] = (0, 0)
        self.opts = "none"
        self.hash_key = b""  # 16 bytes for `source-hash KEY`; b"" when no key was written
        self.sticky = False
        self.static_port = False

    @property
    def kind(self) -> str:
        """"addrs", "iface" or "table"."""
        if self.table is not None:
            return "table"
        if self.ifname is not None:
            return "iface"
        return "addrs"

    @property
    def af(self) -> int:
        """The pool's address family, 0 when it has none of its own (interface, table)."""
        return self.addrs[0].af if self.addrs else 0

    def multi_addr(self) -> bool:
        """pfctl's DYNIF_MULTIADDR for `(if)`: without `:0`, or a name not ending in a digit
        (a group such as `(egress)`), the interface may hold several addresses."""
        if self.ifname is None:
            return False
        return not self.if_noalias or not self.ifname[-1:].isdigit()

    def fixed_addr(self, orig: int) -> int | None:
        """The address pf_map_addr picks when it needs no state or choice, else None.

        One host or network with no type or `bitmask`: a host maps to itself; with
        `bitmask` the network part comes from the pool and the host part from `orig`
        (PF_POOLMASK); without it pf takes the network address as it stands.
        """
        if len(self.addrs) != 1 or self.opts not in ("none", "bitmask"):
            return None
        a = self.addrs[0]
        if self.opts == "bitmask":
            full = (1 << (32 if a.af == AF_INET else 128)) - 1
            return a.net | (orig & ~a.mask & full)
        return a.net

    def _target(self) -> str:
        if self.table is not None:
            return f"<{self.table.name}>"
        if self.ifname is not None:
            return f"({self.ifname}:0)" if self.if_noalias else f"({self.ifname})"
        if len(self.addrs) == 1:
            return str(self.addrs[0])
        return "{ " + ", ".join(str(a) for a in self.addrs) + " }"

    def __str__(self) -> str:
        out = [self._target()]
        lo, hi = self.proxy_port
        if self.role == "nat":
            # print_pool: the default range is not shown, and static-port stores 0:0
            if (lo, hi) != (0, 0) and (lo, hi) != self.DEFAULT_NAT_PORTS:
                out.append(f"port {lo}" if lo == hi else f"port {lo}:{hi}")
        elif self.role == "rdr" and lo:
            out.append(f"port {lo}:{hi}" if hi and hi != lo else f"port {lo}")
        if self.opts == "source-hash":
            out.append("source-hash" + (f" 0x{self.hash_key.hex()}" if self.hash_key else ""))
        elif self.opts != "none":
            out.append(self.opts)
        if self.sticky:
            out.append("sticky-address")
        if self.static_port:
            out.append("static-port")
        return " ".join(out)

    def __repr__(self) -> str:
        return f"<Pool {self.role} {self}>"


__all__ = ["DYNAMIC_OPTS", "POOL_OPTS", "Pool"]
