"""The active-active lab topology: two LANs, N firewalls between them, a sync LAN.

```
 client ns --eth0--+                +--cli-- fw1 ns --srv--+                +--eth0-- server ns
                   |  [brc]  (sw)   |        sync          |  [brs]  (sw)   |
 client ns --eth0--+ 198.51.100/24  +--cli-- fw2 ns --srv--+ 203.0.113/24   +--eth0-- server ns
                                             sync
                                    [bry] 192.0.2.0/24 (sync LAN, pfsync multicast)
```

The three bridges live in one "switch" namespace, so the host's own network is never
touched. Routing decides which firewall each direction of a connection crosses:
`symmetric` (both via fw1), `split` (client->server via fw1, server->client via fw2) and
`ecmp` (multipath default routes on both sides; the L4 hash spreads parallel streams, and
the two directions of one connection hash independently).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pfcluster.lab.netns import Lab, sysctl

PATHS = ("symmetric", "split", "ecmp")

CLIENT_NET4, SERVER_NET4, SYNC_NET4 = "198.51.100", "203.0.113", "192.0.2"
CLIENT_NET6, SERVER_NET6, SYNC_NET6 = "2001:db8:c::", "2001:db8:5::", "2001:db8:a::"
HOST_BASE = 100  # clients/servers are .101, .102 ...; firewall N is .N

# interface names inside a firewall namespace (the daemon's rules and --syncdev use them)
FW_CLIENT_IF, FW_SERVER_IF, FW_SYNC_IF = "cli", "srv", "sync"
HOST_IF = "eth0"

FORWARDING = {
    "net.ipv4.ip_forward": 1,
    "net.ipv6.conf.all.forwarding": 1,
    "net.ipv4.conf.all.rp_filter": 0,  # split paths: replies arrive on the other box
    "net.ipv4.conf.default.rp_filter": 0,
    "net.ipv4.conf.all.send_redirects": 0,
    "net.ipv4.conf.default.send_redirects": 0,
}
END_HOST = {
    "net.ipv4.conf.all.accept_redirects": 0,  # the route we set is the path taken
    "net.ipv6.conf.all.accept_redirects": 0,
    "net.ipv4.fib_multipath_hash_policy": 1,  # L4 hash so ECMP spreads parallel streams
    "net.ipv6.fib_multipath_hash_policy": 1,
}


@dataclass
class Host:
    ns: str
    ip4: str
    ip6: str


@dataclass
class FirewallNode:
    index: int  # 1-based
    ns: str
    client_ip4: str
    server_ip4: str
    sync_ip4: str
    client_ip6: str
    server_ip6: str
    sync_ip6: str


@dataclass
class Topology:
    """Builds the lab inside `lab`; `set_paths` and `fail_over` change the routing."""

    lab: Lab
    firewalls: int = 2
    clients: int = 1
    servers: int = 1
    switch: str = ""
    fws: list[FirewallNode] = field(default_factory=list)
    client_hosts: list[Host] = field(default_factory=list)
    server_hosts: list[Host] = field(default_factory=list)
    paths: str = ""

    def build(self) -> Topology:
        if not 1 <= self.firewalls <= 9 or not 1 <= self.clients <= 50 or not 1 <= self.servers <= 50:
            raise ValueError("firewalls 1..9, clients and servers 1..50")
        lab = self.lab
        self.switch = lab.add_ns("sw")
        for br in ("brc", "brs", "bry"):
            lab.add_bridge(self.switch, br)
        for i in range(1, self.firewalls + 1):
            ns = lab.add_ns(f"fw{i}")
            fw = FirewallNode(
                i, ns,
                f"{CLIENT_NET4}.{i}", f"{SERVER_NET4}.{i}", f"{SYNC_NET4}.{i}",
                f"{CLIENT_NET6}{i}", f"{SERVER_NET6}{i}", f"{SYNC_NET6}{i}",
            )
            lab.add_port(self.switch, "brc", f"c-fw{i}", ns, FW_CLIENT_IF)
            lab.add_port(self.switch, "brs", f"s-fw{i}", ns, FW_SERVER_IF)
            lab.add_port(self.switch, "bry", f"y-fw{i}", ns, FW_SYNC_IF)
            for ifname, a4, a6 in (
                (FW_CLIENT_IF, fw.client_ip4, fw.client_ip6),
                (FW_SERVER_IF, fw.server_ip4, fw.server_ip6),
                (FW_SYNC_IF, fw.sync_ip4, fw.sync_ip6),
            ):
                lab.add_addr(ns, ifname, f"{a4}/24")
                lab.add_addr(ns, ifname, f"{a6}/64")
            sysctl(ns, FORWARDING)
            self.fws.append(fw)
        for side, count, bridge, net4, net6, hosts in (
            ("c", self.clients, "brc", CLIENT_NET4, CLIENT_NET6, self.client_hosts),
            ("s", self.servers, "brs", SERVER_NET4, SERVER_NET6, self.server_hosts),
        ):
            for j in range(1, count + 1):
                ns = lab.add_ns(f"{side}{j}")
                host = Host(ns, f"{net4}.{HOST_BASE + j}", f"{net6}{HOST_BASE + j:x}")
                lab.add_port(self.switch, bridge, f"{side}-{side}{j}", ns, HOST_IF)
                lab.add_addr(ns, HOST_IF, f"{host.ip4}/24")
                lab.add_addr(ns, HOST_IF, f"{host.ip6}/64")
                sysctl(ns, END_HOST)
                hosts.append(host)
        return self

    # routing
    def gateways(self, side: str, fws: list[int]) -> tuple[list[str], list[str]]:
        nodes = [self.fws[i - 1] for i in fws]
        if side == "client":
            return [f.client_ip4 for f in nodes], [f.client_ip6 for f in nodes]
        return [f.server_ip4 for f in nodes], [f.server_ip6 for f in nodes]

    def route_via(self, client_fws: list[int], server_fws: list[int]) -> None:
        """Clients reach the server LAN via `client_fws`, servers the client LAN via `server_fws`."""
        for hosts, side, fws, dst4, dst6 in (
            (self.client_hosts, "client", client_fws, f"{SERVER_NET4}.0/24", f"{SERVER_NET6}/64"),
            (self.server_hosts, "server", server_fws, f"{CLIENT_NET4}.0/24", f"{CLIENT_NET6}/64"),
        ):
            gw4, gw6 = self.gateways(side, fws)
            for host in hosts:
                self.lab.set_route(host.ns, dst4, gw4)
                self.lab.set_route(host.ns, dst6, gw6)

    def set_paths(self, paths: str) -> None:
        if paths not in PATHS:
            raise ValueError(f"paths must be one of {PATHS}")
        n = len(self.fws)
        if paths == "symmetric" or n == 1:
            self.route_via([1], [1])
        elif paths == "split":
            self.route_via([1], [2])
        else:
            every = list(range(1, n + 1))
            self.route_via(every, every)
        self.paths = paths

    def fail_over(self, dead: int = 1) -> None:
        """Move every route that used firewall `dead` to the survivors (as VRRP/CARP would)."""
        alive = [f.index for f in self.fws if f.index != dead]
        if not alive:
            raise ValueError("no firewall left to fail over to")
        if self.paths == "ecmp":
            self.route_via(alive, alive)
        elif self.paths == "split":
            self.route_via([alive[0]], [2] if dead != 2 else [alive[0]])
        else:
            self.route_via([alive[0]], [alive[0]])

    def fw(self, index: int) -> FirewallNode:
        return self.fws[index - 1]
