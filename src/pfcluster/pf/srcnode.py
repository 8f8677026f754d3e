"""Source tracking: pf's source nodes (pf_insert_src_node, pf_src_connlimit).

A rule with `max-src-nodes`, `max-src-states`, `max-src-conn`, `max-src-conn-rate` or
`source-track` keeps one node per source address -- per rule (`source-track rule`) or
shared by every rule tracking globally (the default, as pfctl's). A node counts the
states it holds and the TCP connections whose handshake completed; the limits refuse a
new state (PFRES_SRCLIMIT, "src-limit"), and a connection over `max-src-conn[-rate]`
puts its source into the `overload` table and, with `flush`, kills that source's states.

The cost is paid at state creation, at the handshake's completion and at state removal
only: the filter keeps the state -> node link in a dict (no slot on every State), so a
state lookup does no more work with tracking on. Nodes are bounded by `set limit
src-nodes` and go `src.track` seconds after their last state. pfsync carries no nodes
(pf does not either): a state imported from a peer has none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pfcluster.packet import addr_str

if TYPE_CHECKING:
    from pfcluster.pf.ruleset import Rule, Table

# pf's thresholds count in thousandths of a connection (PF_THRESHOLD_MULT).
THRESHOLD_MULT = 1000
# pf's default `set limit src-nodes` (PFSNODE_HIWAT).
PFSNODE_HIWAT = 10000

# The Limit Counters of pfctl -si that source tracking raises (pf's LCNT_* names).
LIMIT_COUNTERS = ("max-src-states", "max-src-nodes", "max-src-conn", "max-src-conn-rate",
                  "overload-table-insertion", "overload-flush-states")


class SrcTrack:
    """A rule's source-tracking options, and how many nodes the rule holds."""

    __slots__ = ("flush", "flush_global", "max_conn", "max_nodes", "max_states",
                 "nodes", "overload", "rate_limit", "rate_seconds", "rule_scope",
                 "scope_written")

    def __init__(self) -> None:
        self.rule_scope = False  # `source-track rule`: nodes of this rule only
        self.scope_written = False
        self.max_nodes = 0
        self.max_states = 0
        self.max_conn = 0
        self.rate_limit = 0
        self.rate_seconds = 0
        self.overload: Table | None = None
        self.flush = False
        self.flush_global = False
        self.nodes = 0  # pf's rule->src_nodes

    def copy(self) -> SrcTrack:
        c = SrcTrack()
        for name in SrcTrack.__slots__:
            setattr(c, name, getattr(self, name))
        c.nodes = 0
        return c

    def options_text(self) -> list[str]:
        """The state options as pfctl -sr prints them."""
        out = [f"source-track {'rule' if self.rule_scope else 'global'}"]
        if self.max_states:
            out.append(f"max-src-states {self.max_states}")
        if self.max_conn:
            out.append(f"max-src-conn {self.max_conn}")
        if self.rate_limit:
            out.append(f"max-src-conn-rate {self.rate_limit}/{self.rate_seconds}")
        if self.max_nodes:
            out.append(f"max-src-nodes {self.max_nodes}")
        if self.overload is not None:
            text = f"overload <{self.overload.name}>"
            if self.flush:
                text += " flush global" if self.flush_global else " flush"
            out.append(text)
        return out


class SrcNode:
    """struct pf_src_node: one source address, with its counts and conn-rate window."""

    __slots__ = ("addr", "af", "bytes", "conn", "creation", "expire", "owner", "packets",
                 "rate_count", "rate_last", "rate_seconds", "rule", "states")

    def __init__(self, rule: Rule | None, owner: SrcTrack, af: int, addr: bytes, now: float,
                 rate_seconds: int) -> None:
        self.rule = rule  # None: a global node
        self.owner = owner  # the options of the rule that created it (its node count)
        self.af = af
        self.addr = addr
        self.states = 0
        self.conn = 0
        self.rate_count = 0  # thousandths, decaying over rate_seconds (pf_threshold)
        self.rate_last = now
        self.rate_seconds = rate_seconds
        self.creation = now
        self.expire = 0.0
        self.packets = 0  # of its states already gone
        self.bytes = 0

    def add_conn(self, now: float) -> None:
        """pf_add_threshold: decay the count linearly over the window, add one."""
        diff = int(now) - int(self.rate_last)
        secs = self.rate_seconds
        if diff >= secs:
            self.rate_count = 0
        else:
            self.rate_count -= self.rate_count * diff // secs
        self.rate_count += THRESHOLD_MULT
        self.rate_last = now


NodeKey = tuple[Any, int, bytes]


class SrcNodes:
    """pf's tree_src_tracking plus the state -> node links (by state identity)."""

    __slots__ = ("by_state", "established", "idle", "inserts", "limit", "limit_counters",
                 "nodes", "pending", "removals", "searches")

    def __init__(self, limit: int = PFSNODE_HIWAT) -> None:
        self.nodes: dict[NodeKey, SrcNode] = {}
        self.idle: dict[NodeKey, SrcNode] = {}  # nodes with no state, waiting to expire
        self.by_state: dict[int, tuple[Any, SrcNode]] = {}  # id(state) -> (state, node)
        self.established: set[int] = set()  # id(state): counted in node.conn
        # id(state) of tracked TCP states whose handshake has not completed: the only
        # ones the packet path looks at (empty: it tests one truth value)
        self.pending: set[int] = set()
        self.limit = limit
        self.searches = 0
        self.inserts = 0
        self.removals = 0
        self.limit_counters = dict.fromkeys(LIMIT_COUNTERS, 0)

    def __len__(self) -> int:
        return len(self.nodes)

    def find_or_insert(self, rule: Rule, opts: SrcTrack, af: int, addr: bytes,
                       now: float) -> SrcNode | None:
        """pf_insert_src_node: the node for this source, or None when a limit refuses."""
        key = (rule if opts.rule_scope else None, af, addr)
        self.searches += 1
        sn = self.nodes.get(key)
        if sn is None:
            if opts.max_nodes and opts.nodes >= opts.max_nodes:
                self.limit_counters["max-src-nodes"] += 1
                return None
            if len(self.nodes) >= self.limit:
                return None
            sn = SrcNode(key[0], opts, af, addr, now, opts.rate_seconds)
            self.nodes[key] = sn
            opts.nodes += 1
            self.inserts += 1
        elif opts.max_states and sn.states >= opts.max_states:
            self.limit_counters["max-src-states"] += 1
            return None
        return sn

    def link(self, st: Any, sn: SrcNode, tcp: bool) -> None:
        """A new state holds the node (a TCP one waits for its handshake)."""
        if sn.states == 0:
            self.idle.pop((sn.rule, sn.af, sn.addr), None)
        sn.states += 1
        self.by_state[id(st)] = (st, sn)
        if tcp:
            self.pending.add(id(st))

    def release_if_unused(self, sn: SrcNode, now: float) -> None:
        """A state that was refused after its node was found: a node left with no
        state expires at once (pf's csfailed path)."""
        if sn.states == 0:
            sn.expire = now
            self.idle[(sn.rule, sn.af, sn.addr)] = sn

    def unlink(self, st: Any, now: float, timeout: int) -> None:
        """pf_src_tree_remove_state: a state goes; the node expires `timeout` s after
        its last state."""
        ent = self.by_state.pop(id(st), None)
        if ent is None:
            return
        sn = ent[1]
        self.pending.discard(id(st))
        if id(st) in self.established:
            self.established.discard(id(st))
            sn.conn -= 1
        sn.packets += st.packets0 + st.packets1
        sn.bytes += st.bytes0 + st.bytes1
        sn.states -= 1
        if sn.states == 0:
            sn.expire = now + timeout
            self.idle[(sn.rule, sn.af, sn.addr)] = sn

    def connlimit(self, st: Any, opts: SrcTrack, now: float) -> SrcNode | None:
        """pf_src_connlimit at the handshake's completion: count the connection; the
        node when it is over max-src-conn or max-src-conn-rate, else None."""
        ent = self.by_state.get(id(st))
        if ent is None or id(st) in self.established:
            return None
        self.pending.discard(id(st))
        sn = ent[1]
        sn.conn += 1
        self.established.add(id(st))
        sn.add_conn(now)
        bad = False
        if opts.max_conn and opts.max_conn < sn.conn:
            self.limit_counters["max-src-conn"] += 1
            bad = True
        if opts.rate_limit and sn.rate_count > opts.rate_limit * THRESHOLD_MULT:
            self.limit_counters["max-src-conn-rate"] += 1
            bad = True
        return sn if bad else None

    def purge(self, now: float) -> int:
        """pf_purge_expired_src_nodes: drop idle nodes whose time has come."""
        gone = [k for k, sn in self.idle.items() if sn.expire <= now]
        for k in gone:
            sn = self.idle.pop(k)
            del self.nodes[k]
            self.removals += 1
            sn.owner.nodes -= 1
        return len(gone)

    def counters(self) -> dict[str, int]:
        return {"current": len(self.nodes), "searches": self.searches,
                "inserts": self.inserts, "removals": self.removals, "limit": self.limit}

    def live_totals(self) -> dict[int, tuple[int, int]]:
        """id(node) -> packets, bytes of its live states (for pfctl -sS -v)."""
        out: dict[int, tuple[int, int]] = {}
        for st, sn in self.by_state.values():
            p, b = out.get(id(sn), (0, 0))
            out[id(sn)] = (p + st.packets0 + st.packets1, b + st.bytes0 + st.bytes1)
        return out


def _hms(secs: int) -> str:
    secs = max(0, secs)
    return f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"


def node_json(sn: SrcNode, now: float, live: tuple[int, int]) -> dict[str, Any]:
    return {
        "address": addr_str(sn.af, sn.addr),
        "rule": sn.rule.nr if sn.rule is not None else None,
        "states": sn.states,
        "connections": sn.conn,
        "rate": round(sn.rate_count / THRESHOLD_MULT, 3),
        "rate_seconds": sn.rate_seconds,
        "age": int(now - sn.creation),
        "expires_in": max(0, int(sn.expire - now)) if sn.states == 0 else None,
        "packets": sn.packets + live[0],
        "bytes": sn.bytes + live[1],
    }


def format_sources(nodes: SrcNodes, now: float, verbose: bool = False) -> list[str]:
    """pfctl -sS [-v]: one line per node, and an age/expiry/counts line with -v."""
    out = []
    live = nodes.live_totals() if verbose else {}
    for sn in nodes.nodes.values():
        c = sn.rate_count
        out.append(f"{addr_str(sn.af, sn.addr)} ( states {sn.states}, connections {sn.conn}, "
                   f"rate {c // 1000}.{c % 1000 // 100}/{sn.rate_seconds}s )")
        if verbose:
            p, b = live.get(id(sn), (0, 0))
            line = f"   age {_hms(int(now - sn.creation))}"
            if sn.states == 0:
                line += f", expires in {_hms(int(sn.expire - now))}"
            line += f", {sn.packets + p} pkts, {sn.bytes + b} bytes"
            if sn.rule is not None:
                line += f", rule {sn.rule.nr}"
            out.append(line)
    return out


def sources_json(nodes: SrcNodes, now: float) -> list[dict[str, Any]]:
    live = nodes.live_totals()
    return [node_json(sn, now, live.get(id(sn), (0, 0))) for sn in nodes.nodes.values()]


__all__ = ["LIMIT_COUNTERS", "PFSNODE_HIWAT", "THRESHOLD_MULT", "SrcNode", "SrcNodes",
           "SrcTrack", "format_sources", "sources_json"]
