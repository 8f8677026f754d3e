"""Compiled pf ruleset: rules, tables, skip steps and first-packet evaluation.

The parser (`pfcluster.pf.rules`) builds these objects; the filter engine calls
`Ruleset.evaluate` for packets that match no state. Evaluation follows pf_match_rule:
top to bottom, skip steps on the eight skippable fields, the last matching pass/block
rule wins and `quick` stops at once; match rules only carry translation (last_nat,
last_rdr), and FreeBSD's translation rules are looked up apart (translate_lookup).
Everything that can be decided at load time (masked address ints, port operators, skip
targets) is, so the per-packet loop only compares small ints.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from pfcluster.packet import addr_str
from pfcluster.pf.constants import (
    AF_INET,
    AF_INET6,
    DEFAULT_TIMEOUTS,
    ICMP4_REPLY_TYPES,
    ICMP6_REPLY_TYPES,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    PF_IN,
    PF_INOUT,
    PF_OUT,
    PFSTATE_HIWAT,
    PFTM,
    TIMEOUT_NAMES,
    flags_str,
    proto_name,
)
from pfcluster.pf.frag import FRAG_LIMIT_DEFAULT
from pfcluster.pf.route import RoutePool, RouteTarget
from pfcluster.pf.scrub import Scrub
from pfcluster.pf.tags import tag_name

if TYPE_CHECKING:
    from pfcluster.pf.ifaddrs import IfAddrs, UrpfCheck
    from pfcluster.pf.pool import Pool
    from pfcluster.pf.srcnode import SrcTrack


class AddrSet(Protocol):
    """What the rule loop asks of a table or a followed address set."""

    def contains(self, af: int, addr: int) -> bool: ...

# FreeBSD translation rules (pfctl -sn), kept apart from the filter rules.
TRANSLATION_ACTIONS = ("nat", "rdr", "binat")

# Skip-step slots, in pf's order (PF_SKIP_*).
PF_SKIP_IFP = 0
PF_SKIP_DIR = 1
PF_SKIP_RDOM = 2
PF_SKIP_AF = 3
PF_SKIP_PROTO = 4
PF_SKIP_SRC_ADDR = 5
PF_SKIP_DST_ADDR = 6
PF_SKIP_SRC_PORT = 7
PF_SKIP_DST_PORT = 8
PF_SKIP_COUNT = 9

# Port operators (pf's PF_OP_*): the numbers only matter inside this package.
PF_OP_NONE = 0
PF_OP_IRG = 1  # a >< b
PF_OP_EQ = 2
PF_OP_NE = 3
PF_OP_LT = 4
PF_OP_LE = 5
PF_OP_GT = 6
PF_OP_GE = 7
PF_OP_XRG = 8  # a <> b
PF_OP_RRG = 9  # a:b
PORT_OP_NAMES = {
    PF_OP_EQ: "=", PF_OP_NE: "!=", PF_OP_LT: "<", PF_OP_LE: "<=",
    PF_OP_GT: ">", PF_OP_GE: ">=", PF_OP_IRG: "><", PF_OP_XRG: "<>", PF_OP_RRG: ":",
}

ICMP_TYPES = {
    "echorep": 0, "unreach": 3, "squench": 4, "redir": 5, "althost": 6, "echoreq": 8,
    "routeradv": 9, "routersol": 10, "timex": 11, "paramprob": 12, "timereq": 13,
    "timerep": 14, "inforeq": 15, "inforep": 16, "maskreq": 17, "maskrep": 18,
    "trace": 30, "dataconv": 31, "mobredir": 32, "ipv6-where": 33, "ipv6-here": 34,
    "mobregreq": 35, "mobregrep": 36, "skip": 39, "photuris": 40,
}
ICMP6_TYPES = {
    "unreach": 1, "toobig": 2, "timex": 3, "paramprob": 4, "echoreq": 128, "echorep": 129,
    "groupqry": 130, "listqry": 130, "grouprep": 131, "listenrep": 131, "groupterm": 132,
    "listendone": 132, "routersol": 133, "routeradv": 134, "neighbrsol": 135,
    "neighbradv": 136, "redir": 137, "routrrenum": 138, "wrureq": 139, "wrurep": 140,
    "mtraceresp": 200, "mtrace": 201,
}
ICMP_CODES = {
    "net-unr": 0, "host-unr": 1, "proto-unr": 2, "port-unr": 3, "needfrag": 4,
    "srcfail": 5, "net-unk": 6, "host-unk": 7, "isolate": 8, "net-prohib": 9,
    "host-prohib": 10, "net-tos": 11, "host-tos": 12, "filter-prohib": 13,
    "host-preced": 14, "cutoff-preced": 15, "transit": 0, "reassemb": 1,
}
# The codes return-icmp / return-icmp6 take by name (pfctl: type unreach only).
ICMP_UNREACH_CODES = {k: v for k, v in ICMP_CODES.items() if k not in ("transit", "reassemb")}
ICMP6_UNREACH_CODES = {"noroute-unr": 0, "admin-unr": 1, "beyond-unr": 2, "addr-unr": 3,
                       "port-unr": 4}
ICMP_UNREACH_PORT = 3
ICMP6_UNREACH_PORT = 4
_UNREACH_PRINT = {v: k for k, v in ICMP_UNREACH_CODES.items()}
_UNREACH6_PRINT = {v: k for k, v in ICMP6_UNREACH_CODES.items()}
_ICMP_TYPE_PRINT = {v: k for k, v in reversed(ICMP_TYPES.items())}
_ICMP6_TYPE_PRINT = {v: k for k, v in reversed(ICMP6_TYPES.items())}


def port_match(op: int, a1: int, a2: int, p: int) -> bool:
    """pf_match for ports (facts 3.4)."""
    if op == PF_OP_EQ:
        return p == a1
    if op == PF_OP_NE:
        return p != a1
    if op == PF_OP_LT:
        return p < a1
    if op == PF_OP_LE:
        return p <= a1
    if op == PF_OP_GT:
        return p > a1
    if op == PF_OP_GE:
        return p >= a1
    if op == PF_OP_IRG:
        return a1 < p < a2
    if op == PF_OP_XRG:
        return p < a1 or p > a2
    if op == PF_OP_RRG:
        return a1 <= p <= a2
    return False


def port_str(spec: tuple[int, int, int]) -> str:
    op, a1, a2 = spec
    if op == PF_OP_RRG:
        return f"port {a1}:{a2}"
    if op in (PF_OP_IRG, PF_OP_XRG):
        return f"port {a1} {PORT_OP_NAMES[op]} {a2}"
    return f"port {PORT_OP_NAMES[op]} {a1}"


def _bits(af: int) -> int:
    return 32 if af == AF_INET else 128


def _mask(af: int, plen: int) -> int:
    bits = 32 if af == AF_INET else 128
    return ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)


def net_str(af: int, value: int) -> str:
    """An address held as an int (tables and rules keep them so), as text."""
    return addr_str(af, value.to_bytes(_bits(af) // 8, "big"))


class Table:
    """A pf table: longest-prefix match over hosts and networks, with `!` entries.

    Entries live in one dict per (family, prefix length) keyed by the masked address
    int; lookups try the longest prefix first, so a negated /32 inside a positive /24
    makes that host "not in the table", as pfr_match_addr does. Adding or deleting an
    entry touches one dict (the per-family level list is re-sorted only when a prefix
    length appears or disappears), so a runtime `ctl table add` costs O(1), not O(n).

    `defined` (a `table` line), `init_addr` (it gave `{ ... }` or `file`) and
    `referenced` (a rule uses it) decide what a reload keeps and whether the table is active (pf/tables.py).
    """

    __slots__ = ("_levels", "_lpm", "const", "counters", "defined", "entries", "init_addr",
                 "name", "persist", "referenced")

    def __init__(self, name: str, persist: bool = False, const: bool = False,
                 counters: bool = False) -> None:
        self.name = name
        self.persist = persist
        self.const = const
        self.counters = counters
        self.defined = False  # a `table <name>` line (its flags win on reload)
        self.init_addr = False
        self.referenced = False
        # (af, prefixlen, address int) -> negated
        self.entries: dict[tuple[int, int, int], bool] = {}
        # af -> prefixlen -> {masked address int: matches (not negated)}
        self._levels: dict[int, dict[int, dict[int, bool]]] = {AF_INET: {}, AF_INET6: {}}
        self._lpm: dict[int, list[tuple[int, dict[int, bool]]]] = {AF_INET: [], AF_INET6: []}

    def add(self, af: int, addr: int, plen: int, neg: bool = False) -> None:
        """Insert or overwrite one entry (host bits of `addr` are masked off)."""
        self.put(af, addr & _mask(af, plen), plen, neg)

    def add_many(self, items: Iterable[tuple[int, int, int, bool]]) -> None:
        for af, addr, plen, neg in items:
            self.put(af, addr & _mask(af, plen), plen, neg)

    def put(self, af: int, net: int, plen: int, neg: bool) -> None:
        """Insert or overwrite the entry for a network already masked to `plen`."""
        self.entries[(af, plen, net)] = neg
        levels = self._levels[af]
        level = levels.get(plen)
        if level is None:
            level = levels[plen] = {}
            self._order(af)
        level[net] = not neg

    def remove(self, af: int, net: int, plen: int) -> bool:
        """Delete one exact entry; False when it was not there."""
        if self.entries.pop((af, plen, net), None) is None:
            return False
        levels = self._levels[af]
        level = levels[plen]
        del level[net]
        if not level:
            del levels[plen]
            self._order(af)
        return True

    def clear(self) -> int:
        n = len(self.entries)
        self.entries = {}
        self._levels = {AF_INET: {}, AF_INET6: {}}
        self._lpm = {AF_INET: [], AF_INET6: []}
        return n

    def take_contents(self, other: Table) -> None:
        """Adopt `other`'s entries (a reload keeping a table's runtime contents)."""
        self.entries, self._levels, self._lpm = other.entries, other._levels, other._lpm

    def _order(self, af: int) -> None:
        levels = self._levels[af]
        self._lpm[af] = [(_mask(af, plen), levels[plen]) for plen in sorted(levels, reverse=True)]

    def lookup(self, af: int, net: int, plen: int) -> bool | None:
        """The exact entry's negation flag, None when absent."""
        return self.entries.get((af, plen, net))

    def contains(self, af: int, addr: int) -> bool:
        """True when the longest matching entry exists and is not negated."""
        for mask, d in self._lpm[af]:
            hit = d.get(addr & mask)
            if hit is not None:
                return hit
        return False

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        flags = "".join(f" {f}" for f in ("persist", "const", "counters") if getattr(self, f))
        items = []
        for (af, plen, net), neg in sorted(self.entries.items()):
            text = net_str(af, net) + ("" if plen == _bits(af) else f"/{plen}")
            items.append(("!" if neg else "") + text)
        body = " ".join(items)
        return f"table <{self.name}>{flags} {{ {body} }}" if items else f"table <{self.name}>{flags}"


class Addr:
    """One side of `from`/`to`: any, a host/network (pre-masked int), a table, or an
    address set kept current elsewhere (`(em0)`, `urpf-failed`, `no-route`:
    pfcluster.pf.ifaddrs), which the loop reads through the same `contains` as a table."""

    __slots__ = ("af", "kind", "mask", "neg", "net", "plen", "table")

    def __init__(self, kind: str = "any", af: int = 0, net: int = 0, plen: int = 0,
                 neg: bool = False, table: Table | None = None,
                 dyn: AddrSet | None = None) -> None:
        self.kind = kind  # "any" | "net" | "table" | "dyn" | "urpf" | "noroute"
        self.table: Table | AddrSet | None = table if dyn is None else dyn
        self.af = af
        self.plen = plen
        self.neg = neg
        if kind == "net":
            bits = _bits(af)
            self.mask = ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)
            self.net = net & self.mask
        else:
            self.mask = 0
            self.net = 0

    def key(self) -> tuple[Any, ...]:
        """What pf_addr_wrap_neq compares (plus negation) for skip steps."""
        t = self.table
        return (self.kind, self.neg, self.af, self.net, self.plen,
                t.name if isinstance(t, Table) else None if t is None else str(t))

    def __str__(self) -> str:
        neg = "! " if self.neg else ""
        if self.kind == "any":
            return neg + "any"
        if self.kind == "table":
            assert isinstance(self.table, Table)
            return f"{neg}<{self.table.name}>"
        if self.kind != "net":
            return f"{neg}{self.table}"
        text = net_str(self.af, self.net)
        return neg + (text if self.plen == _bits(self.af) else f"{text}/{self.plen}")


ANY = Addr()


class Rule:
    """One expanded pf rule, with pf's field names where the engine reads them."""

    __slots__ = (
        "action", "adaptive_default", "af", "anchor", "anchor_call", "anchor_wildcard",
        "bytes", "direction", "dport", "dst",
        "evaluations", "flags", "flagset", "icmp_code", "icmp_type", "if_bound", "ifname",
        "ifnot", "keep_state", "label", "line", "log", "log_all", "match_tag",
        "match_tag_not", "max_states", "nat",
        "natpass", "no_sync", "nr", "packets", "pflow", "policy", "proto", "quick", "rdr",
        "return_icmp", "return_icmp6", "return_mode", "route", "scrub", "skip", "sloppy", "sport", "src",
        "srctrack", "state_type", "states_cur", "states_tot", "tag", "timeouts",
    )

    def __init__(self) -> None:
        self.nr = 0
        self.line = 0
        self.action = "pass"
        self.direction = PF_INOUT
        self.quick = False
        self.log = False
        self.log_all = False
        self.return_mode: str | None = None
        # the unreachable codes of return-icmp/return-icmp6 (pf's return_icmp & 255)
        self.return_icmp = ICMP_UNREACH_PORT
        self.return_icmp6 = ICMP6_UNREACH_PORT
        self.policy = "drop"  # the ruleset's block-policy, for printing plain `block`
        self.ifname: str | None = None
        self.ifnot = False
        self.af = 0
        self.proto = 0
        self.src: Addr = ANY
        self.dst: Addr = ANY
        self.sport: tuple[int, int, int] | None = None
        self.dport: tuple[int, int, int] | None = None
        self.flags = 0
        self.flagset = 0
        self.icmp_type: int | None = None
        self.icmp_code: int | None = None
        self.keep_state = False
        self.state_type: str | None = None
        self.max_states = 0
        self.srctrack: SrcTrack | None = None  # source-tracking options (pf/srcnode.py)
        self.no_sync = False
        self.sloppy = False
        self.pflow = False
        self.if_bound: bool | None = None
        self.timeouts: dict[int, int] = {}
        self.adaptive_default = False
        self.label: str | None = None
        # Translation: nat-to / rdr-to on pass and match rules; on FreeBSD `nat`/`binat`
        # rules the pool after `->` is `nat`, on `rdr` rules it is `rdr` (None: `no nat`).
        self.nat: Pool | None = None
        self.rdr: Pool | None = None
        self.natpass = False  # FreeBSD `nat pass`: translated packets skip the filter rules
        # `anchor "name"` rules (action "anchor"): the anchor evaluated when the rule
        # matches, the name as written, and `name/*` (every child of `anchor`).
        self.anchor: Anchor | None = None
        self.anchor_call = ""
        self.anchor_wildcard = False
        # `tag NAME` and `[!] tagged NAME` as tag numbers (pfcluster.pf.tags), 0: none
        self.tag = 0
        self.match_tag = 0
        self.match_tag_not = False
        self.scrub: Scrub | None = None  # `scrub (...)` options (pfcluster.pf.scrub)
        self.route: RoutePool | None = None  # route-to/reply-to targets (pf/route.py)
        self.evaluations = 0
        self.packets = 0
        self.bytes = 0
        self.states_cur = 0
        self.states_tot = 0
        self.skip: list[int] = [0] * PF_SKIP_COUNT

    def _return_str(self) -> str:
        """print_rule's block mode: return-icmp shows its codes, by the rule's family."""
        mode = self.return_mode or self.policy
        if mode not in ("return-icmp", "return-icmp6"):
            return mode
        c4 = _UNREACH_PRINT.get(self.return_icmp, str(self.return_icmp))
        c6 = _UNREACH6_PRINT.get(self.return_icmp6, str(self.return_icmp6))
        if self.af == AF_INET:
            return f"return-icmp({c4})"
        if self.af == AF_INET6:
            return f"return-icmp6({c6})"
        return f"return-icmp({c4}, {c6})"

    def _state_opts(self) -> list[str]:
        opts = []
        if self.max_states:
            opts.append(f"max {self.max_states}")
        if self.no_sync:
            opts.append("no-sync")
        if self.srctrack is not None:
            opts.extend(self.srctrack.options_text())
        if self.if_bound is not None:
            opts.append("if-bound" if self.if_bound else "floating")
        if self.sloppy:
            opts.append("sloppy")
        if self.pflow:
            opts.append("pflow")
        names = {v: k for k, v in TIMEOUT_NAMES.items()}
        for idx in sorted(self.timeouts):
            if self.adaptive_default and idx in (PFTM.ADAPTIVE_START, PFTM.ADAPTIVE_END):
                continue
            opts.append(f"{names[idx]} {self.timeouts[idx]}")
        return opts

    @property
    def pool(self) -> Pool | None:
        """A FreeBSD translation rule's pool (None for `no nat`/`no rdr`/`no binat`)."""
        return self.rdr if self.action == "rdr" else self.nat

    def _fromto(self, out: list[str]) -> None:
        if (self.src.kind == "any" and not self.src.neg and self.dst.kind == "any"
                and not self.dst.neg and self.sport is None and self.dport is None):
            out.append("all")
        else:
            out.append(f"from {self.src}")
            if self.sport is not None:
                out.append(port_str(self.sport))
            out.append(f"to {self.dst}")
            if self.dport is not None:
                out.append(port_str(self.dport))

    def _translation_str(self) -> str:
        """A FreeBSD translation rule as `pfctl -sn` prints it."""
        pool = self.pool
        out = [self.action if pool is not None else f"no {self.action}"]
        if self.natpass:
            out.append("pass")
        if self.log:
            out.append("log (all)" if self.log_all else "log")
        if self.ifname is not None:
            out.append(f"on ! {self.ifname}" if self.ifnot else f"on {self.ifname}")
        if self.af:
            out.append("inet" if self.af == AF_INET else "inet6")
        if self.proto:
            out.append(f"proto {proto_name(self.proto)}")
        self._fromto(out)
        if pool is not None:
            out.append(f"-> {pool}")
        return " ".join(out)

    def __str__(self) -> str:
        """The rule as `pfctl -sr` prints it (ports numerically); translation rules as -sn."""
        if self.action in TRANSLATION_ACTIONS:
            return self._translation_str()
        out = [self.action if self.anchor is None else f'anchor "{self.anchor_call}"']
        if self.action == "block":
            out.append(self._return_str())
        if self.direction == PF_IN:
            out.append("in")
        elif self.direction == PF_OUT:
            out.append("out")
        if self.log:
            out.append("log (all)" if self.log_all else "log")
        if self.quick:
            out.append("quick")
        if self.ifname is not None:
            out.append(f"on ! {self.ifname}" if self.ifnot else f"on {self.ifname}")
        if self.af:
            out.append("inet" if self.af == AF_INET else "inet6")
        if self.proto:
            out.append(f"proto {proto_name(self.proto)}")
        self._fromto(out)
        if self.flags or self.flagset:
            out.append(f"flags {flags_str(self.flags)}/{flags_str(self.flagset)}")
        elif (self.action == "pass" and self.keep_state
              and self.proto in (0, IPPROTO_TCP)):
            out.append("flags any")
        if self.icmp_type is not None:
            kw = "icmp6-type" if self.proto == IPPROTO_ICMPV6 else "icmp-type"
            names = _ICMP6_TYPE_PRINT if self.proto == IPPROTO_ICMPV6 else _ICMP_TYPE_PRINT
            out.append(f"{kw} {names.get(self.icmp_type, str(self.icmp_type))}")
            if self.icmp_code is not None:
                out.append(f"code {self.icmp_code}")
        if self.action == "pass":
            if not self.keep_state:
                out.append("no state")
            else:
                out.append(f"{self.state_type or 'keep'} state")
                opts = self._state_opts()
                if opts:
                    out.append("(" + ", ".join(opts) + ")")
        if self.label is not None:
            out.append('label "' + self.label.replace("\\", "\\\\").replace('"', '\\"') + '"')
        if self.tag:
            out.append(f"tag {tag_name(self.tag)}")
        if self.match_tag:
            out.append(f"{'! ' if self.match_tag_not else ''}tagged {tag_name(self.match_tag)}")
        # print_rule shows the pools after label/tag/rtable; pfctl prints only nat-to when
        # a rule has both, we print both so the text parses back to the same rule.
        if self.nat is not None:
            out.append(f"nat-to {self.nat}")
        if self.rdr is not None:
            out.append(f"rdr-to {self.rdr}")
        if self.route is not None:
            out.append(str(self.route))
        if self.scrub is not None:
            if self.scrub.legacy:  # an old `scrub` rule, as FreeBSD's pfctl prints it
                out[0] = "scrub"
                out.extend(self.scrub.options())
            else:
                out.append(str(self.scrub))
        return " ".join(out)

    def __repr__(self) -> str:
        return f"<Rule @{self.nr} {self}>"


def calc_skip_steps(rules: list[Rule]) -> None:
    """pf_calc_skip_steps: skip[i] = index of the first later rule whose field i differs."""
    n = len(rules)
    keys = [
        lambda r: (r.ifname, r.ifnot),
        lambda r: r.direction,
        lambda r: (-1, r.ifnot),  # onrdomain is always "none" here
        lambda r: r.af,
        lambda r: r.proto,
        lambda r: r.src.key(),
        lambda r: r.dst.key(),
        lambda r: r.sport,
        lambda r: r.dport,
    ]
    for field, key in enumerate(keys):
        head = 0
        for cur in range(1, n + 1):
            if cur == n or key(rules[cur]) != key(rules[cur - 1]):
                for j in range(head, cur):
                    rules[j].skip[field] = cur
                head = cur


# The packet's "virtual protocol" class, decided once per packet.
_V_FRAG = 0
_V_TCP = 1
_V_UDP = 2
_V_ICMP = 3
_V_OTHER = 4


class Ruleset:
    """A loaded pf.conf: rules plus options, tables and the compiled evaluation program."""

    def __init__(self, source: str = "pf.conf") -> None:
        self.source = source
        self.rules: list[Rule] = []
        self.tables: dict[str, Table] = {}
        self.timeouts: list[int] = list(DEFAULT_TIMEOUTS)
        self.limit_states = PFSTATE_HIWAT
        self.limits: dict[str, int] = {"states": PFSTATE_HIWAT}
        self.skip_ifaces: set[str] = set()
        self.block_policy = "drop"
        self.state_policy = "floating"
        self.hostid: int | None = None
        self.debug = "err"
        self.options: dict[str, str] = {}
        self.macros: dict[str, str] = {}
        self.checksum = b""
        self._prog: list[tuple[Any, ...]] = []
        # FreeBSD `nat`/`rdr`/`binat` rules, looked up before the filter (translate_lookup).
        self.translation_rules: list[Rule] = []
        # route-to/reply-to targets, by index (their marks and routing tables)
        self.route_targets: list[RouteTarget] = []
        # The scrub options the last walk accumulated (match rules and the deciding rule).
        self.last_scrub: Scrub | None = None
        # Set by evaluate: the last matching rule, among the match rules and the deciding
        # rule, that carries nat-to (resp. rdr-to) -- the one whose pool applies.
        self.last_nat: Rule | None = None
        self.last_rdr: Rule | None = None
        # The NAT core's address/port choice for a match rule, so later rules see the
        # packet as translated: (rule, pkt, src, sport, dst, dport) -> the new four.
        # None: only choices that need no state are previewed (Pool.fixed_addr).
        self.transaddr: Callable[[Rule, Any, int, int, int, int],
                                 tuple[int, int, int, int]] | None = None
        self._full = False  # any match rule or nat-to/rdr-to: the slower walk
        # The interface addresses and routes `(em0)`, `self`, urpf-failed and no-route
        # read (set by the parser); urpf is told the interface before each walk.
        self.ifaddrs: IfAddrs | None = None
        self.urpf: UrpfCheck | None = None
        # Anchors by path ("a/b"); anchor_root holds the top-level ones as children (for
        # `anchor "*"`); defined_anchors: the paths this file gave rules (inline or `load
        # anchor`), which a reload replaces rather than keeps.
        self.anchor_root = Anchor("")
        self.anchors: dict[str, Anchor] = {}
        self.defined_anchors: set[str] = set()
        self._nested = False  # anchor rules or tags: the anchor walk
        # Tags: any rule with `tag`/`tagged`; `tag` is the packet's tag in and out of
        # evaluate (the filter sets it before, reads the rules' tag after).
        self.tagging = False
        self.tag = 0

    @property
    def reassemble(self) -> bool:
        """`set reassemble yes|no`: OpenBSD's default is yes (pf/frag.py holds fragments)."""
        return not self.options.get("reassemble", "yes").startswith("no")

    @property
    def frag_limit(self) -> int:
        """`set limit frags` (pf's default PFFRAG_FRENT_HIWAT)."""
        return self.limits.get("frags", FRAG_LIMIT_DEFAULT)

    def block_return(self, rule: Rule) -> str:
        """The block mode in force for a rule: its own, or the ruleset's block-policy."""
        return rule.return_mode or self.block_policy

    def finish(self) -> None:
        """Number the rules, compute skip steps, checksum and the evaluation program."""
        for rules in (self.translation_rules, self.rules):
            for i, r in enumerate(rules):
                r.nr = i
                r.policy = self.block_policy
        calc_skip_steps(self.rules)
        for path in self.defined_anchors:
            a = self.anchors[path]
            a.set_rules(a.rules, self.block_policy)
        md5 = hashlib.md5()
        for r in self.translation_rules + self.rules:  # no translation: same sum as before
            md5.update(str(r).encode())
            md5.update(b"\n")
        self.checksum = md5.digest()
        self._compile()

    def _compile(self) -> None:
        self._prog = _program(self.rules)
        self.refresh()

    def refresh(self) -> None:
        """Choose the walk: the plain loop, `_evaluate_full` (match rules, translation) or
        the anchor walk (anchor rules or tags anywhere); called again after a runtime
        anchor load or flush, since an anchor's rules may bring match rules or tags."""
        every = list(self.rules)
        for a in self.anchors.values():
            every.extend(a.rules)
        self.tagging = any(r.tag or r.match_tag for r in every)
        self._nested = self.tagging or any(r.anchor is not None for r in self.rules)
        self._full = self._nested or any(
            r.action == "match" or r.nat is not None or r.rdr is not None
            or r.scrub is not None for r in self.rules)

    # -- anchors (pf_anchor, pfctl -a) --
    def anchor(self, path: str) -> Anchor:
        """The anchor at `path` ("a/b"), made with its parents if new, as pf_find_or_create_ruleset."""
        a = self.anchors.get(path)
        if a is not None:
            return a
        parent_path, _, leaf = path.rpartition("/")
        parent = self.anchor(parent_path) if parent_path else self.anchor_root
        a = Anchor(path)
        parent.children[leaf] = a
        self.anchors[path] = a
        return a

    def load_anchor(self, path: str, rules: list[Rule]) -> Anchor:
        """`pfctl -a PATH -f FILE`: replace the anchor's rules (numbered from 0)."""
        a = self.anchor(path)
        a.set_rules(rules, self.block_policy)
        self.refresh()
        return a

    def adopt_anchors(self, old: Ruleset) -> None:
        """What a main-ruleset reload keeps: pf replaces only the main ruleset (and the
        anchors the file defines inline or by `load anchor`); every other anchor keeps its
        rules, whether or not the new file still has an anchor rule calling it."""
        for path, oa in old.anchors.items():
            if not oa.rules or path in self.defined_anchors:
                continue
            self.anchor(path).set_rules(oa.rules, self.block_policy, renumber=False)
        self.refresh()

    def evaluate(self, pkt: Any, direction: int, ifname: str) -> Rule | None:
        """pf_test_rule's rule walk: the winning pass/block rule, or None (default pass).

        Rulesets with match rules or nat-to/rdr-to take `_evaluate_full`; the others keep
        this loop, whose only extra cost is the `_full` test (last_nat/last_rdr stay None).
        """
        if self.urpf is not None:
            self.urpf.ifname = ifname
        if self._full:
            return self._evaluate_full(pkt, direction, ifname)
        af = pkt.af
        proto = pkt.proto
        src = int.from_bytes(pkt.src, "big")
        dst = int.from_bytes(pkt.dst, "big")
        icmp_reply = False
        if getattr(pkt, "frag_off", 0):
            v = _V_FRAG
        elif proto == IPPROTO_TCP:
            v = _V_TCP
        elif proto == IPPROTO_UDP:
            v = _V_UDP
        elif proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            v = _V_ICMP
            # pf_match_rule: a stateful rule (not sloppy) never matches an ICMP reply.
            icmp_reply = pkt.icmp_type in (
                ICMP6_REPLY_TYPES if proto == IPPROTO_ICMPV6 else ICMP4_REPLY_TYPES)
        else:
            v = _V_OTHER
        prog = self._prog
        n = len(prog)
        match = None
        i = 0
        while i < n:
            r, sk, rif, rifnot, rdir, raf, rproto, sa, da, sp, dp, fl, ic = prog[i]
            r.evaluations += 1
            if rif is not None and (rif == ifname) is rifnot:
                i = sk[PF_SKIP_IFP]
                continue
            if rdir and rdir != direction:
                i = sk[PF_SKIP_DIR]
                continue
            if raf and raf != af:
                i = sk[PF_SKIP_AF]
                continue
            if rproto and rproto != proto:
                i = sk[PF_SKIP_PROTO]
                continue
            if sa is not None:
                mask, net, neg, table = sa
                if table is None:
                    if ((src & mask) == net) is neg:
                        i = sk[PF_SKIP_SRC_ADDR]
                        continue
                elif table.contains(af, src) is neg:
                    i = sk[PF_SKIP_SRC_ADDR]
                    continue
            if da is not None:
                mask, net, neg, table = da
                if table is None:
                    if ((dst & mask) == net) is neg:
                        i = sk[PF_SKIP_DST_ADDR]
                        continue
                elif table.contains(af, dst) is neg:
                    i = sk[PF_SKIP_DST_ADDR]
                    continue
            if v == _V_TCP:
                if fl is not None and (pkt.tcp_flags & fl[1]) != fl[0]:
                    i += 1
                    continue
            elif v == _V_FRAG:
                if sp is not None or dp is not None or ic is not None or (
                        fl is not None and proto == IPPROTO_TCP):
                    i += 1
                    continue
                sp = dp = None
            elif v == _V_ICMP:
                if ic is not None and (
                        (ic[0] is not None and ic[0] != pkt.icmp_type)
                        or (ic[1] is not None and ic[1] != pkt.icmp_code)):
                    i += 1
                    continue
                if icmp_reply and r.keep_state and not r.sloppy:
                    i += 1
                    continue
            if sp is not None:
                op, a1, a2 = sp
                if not (pkt.sport == a1 if op == PF_OP_EQ else port_match(op, a1, a2, pkt.sport)):
                    i = sk[PF_SKIP_SRC_PORT]
                    continue
            if dp is not None:
                op, a1, a2 = dp
                if not (pkt.dport == a1 if op == PF_OP_EQ else port_match(op, a1, a2, pkt.dport)):
                    i = sk[PF_SKIP_DST_PORT]
                    continue
            match = r
            if r.quick:
                break
            i += 1
        return match

    def _evaluate_full(self, pkt: Any, direction: int, ifname: str) -> Rule | None:
        """The walk of `evaluate` with match rules and translation, as pf_match_rule.

        A match rule never decides; when it carries nat-to/rdr-to, pf_get_transaddr runs at
        once and the rules after it see the packet as translated -- pf.c tests them against
        pd->nsaddr/ndaddr, and pf.conf(5) says so: "If specified on a match rule,
        subsequent rules will see packets as they look after any addresses and ports have
        been translated." A pass/block rule's own nat-to/rdr-to applies only if it decides
        (pf_test_rule calls pf_get_transaddr for the final rule after the walk), so no
        rule sees it. `quick` stops the walk on any rule, a match rule included.
        last_nat/last_rdr name the rules whose pools apply; the caller translates.
        """
        if self._nested:
            return self._evaluate_nested(pkt, direction, ifname)
        self.last_nat = self.last_rdr = None
        af = pkt.af
        proto = pkt.proto
        src = int.from_bytes(pkt.src, "big")
        dst = int.from_bytes(pkt.dst, "big")
        sport = pkt.sport
        dport = pkt.dport
        icmp_reply = False
        if getattr(pkt, "frag_off", 0):
            v = _V_FRAG
        elif proto in (IPPROTO_TCP, IPPROTO_UDP):
            v = _V_TCP if proto == IPPROTO_TCP else _V_UDP
        elif proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            v = _V_ICMP
            icmp_reply = pkt.icmp_type in (
                ICMP6_REPLY_TYPES if proto == IPPROTO_ICMPV6 else ICMP4_REPLY_TYPES)
        else:
            v = _V_OTHER
        prog = self._prog
        n = len(prog)
        match = last_nat = last_rdr = None
        scrub: Scrub | None = None
        i = 0
        while i < n:
            r, sk, rif, rifnot, rdir, raf, rproto, sa, da, sp, dp, fl, ic = prog[i]
            r.evaluations += 1
            if rif is not None and (rif == ifname) is rifnot:
                i = sk[PF_SKIP_IFP]
                continue
            if rdir and rdir != direction:
                i = sk[PF_SKIP_DIR]
                continue
            if raf and raf != af:
                i = sk[PF_SKIP_AF]
                continue
            if rproto and rproto != proto:
                i = sk[PF_SKIP_PROTO]
                continue
            if sa is not None:
                mask, net, neg, table = sa
                if (((src & mask) == net) if table is None else table.contains(af, src)) is neg:
                    i = sk[PF_SKIP_SRC_ADDR]
                    continue
            if da is not None:
                mask, net, neg, table = da
                if (((dst & mask) == net) if table is None else table.contains(af, dst)) is neg:
                    i = sk[PF_SKIP_DST_ADDR]
                    continue
            if v == _V_TCP:
                if fl is not None and (pkt.tcp_flags & fl[1]) != fl[0]:
                    i += 1
                    continue
            elif v == _V_FRAG:
                if sp is not None or dp is not None or ic is not None or (
                        fl is not None and proto == IPPROTO_TCP):
                    i += 1
                    continue
                sp = dp = None
            elif v == _V_ICMP:
                if ic is not None and (
                        (ic[0] is not None and ic[0] != pkt.icmp_type)
                        or (ic[1] is not None and ic[1] != pkt.icmp_code)):
                    i += 1
                    continue
                if icmp_reply and r.keep_state and not r.sloppy:
                    i += 1
                    continue
            if sp is not None and not port_match(sp[0], sp[1], sp[2], sport):
                i = sk[PF_SKIP_SRC_PORT]
                continue
            if dp is not None and not port_match(dp[0], dp[1], dp[2], dport):
                i = sk[PF_SKIP_DST_PORT]
                continue
            if r.action == "match":
                if r.scrub is not None:
                    scrub = r.scrub if scrub is None else scrub.merge(r.scrub)
                if r.nat is not None or r.rdr is not None:
                    if r.nat is not None:
                        last_nat = r
                    if r.rdr is not None:
                        last_rdr = r
                    hook = self.transaddr or _preview_transaddr
                    src, sport, dst, dport = hook(r, pkt, src, sport, dst, dport)
            else:
                match = r
            if r.quick:
                break
            i += 1
        if match is not None:
            if match.nat is not None:
                last_nat = match
            if match.rdr is not None:
                last_rdr = match
            if match.scrub is not None:
                scrub = match.scrub if scrub is None else scrub.merge(match.scrub)
        self.last_nat = last_nat
        self.last_rdr = last_rdr
        self.last_scrub = scrub
        return match

    def _evaluate_nested(self, pkt: Any, direction: int, ifname: str) -> Rule | None:
        """pf_match_rule with anchors and tags: the walk of `_evaluate_full`, stepping
        into an anchor when its anchor rule matches (pf_step_into_anchor).

        A `quick` rule inside an anchor ends the whole evaluation; a `quick` anchor rule
        ends it after the anchor when the deciding rule was found directly in that
        anchor (pf compares the deciding rule's anchor with it). `anchor "a/*"` walks the
        children of "a" in name order. Deeper than ANCHOR_STACK_MAX blocks the packet
        (pf's PF_TEST_FAIL). `tagged` compares the packet's tag as the rules so far left
        it; `tag` on any matching rule sets it.
        """
        c = _Walk(pkt, direction, ifname, self.tag)
        hook = self.transaddr or _preview_transaddr
        rv = _walk(self._prog, c, None, hook)
        self.last_nat = c.last_nat
        self.last_rdr = c.last_rdr
        self.last_scrub = scrub = c.scrub
        self.tag = c.tag
        if rv == _FAIL:
            self.last_nat = self.last_rdr = self.last_scrub = None
            return ANCHOR_OVERFLOW
        match = c.match
        if match is not None:
            if match.nat is not None:
                self.last_nat = match
            if match.rdr is not None:
                self.last_rdr = match
            if match.scrub is not None:
                self.last_scrub = match.scrub if scrub is None else scrub.merge(match.scrub)
        return match

    def translate_lookup(self, pkt: Any, direction: int, ifname: str) -> Rule | None:
        """FreeBSD's pf_get_translation: the translation rule for a packet, or None.

        FreeBSD looks these up before the filter rules, first match wins, in pf's order:
        outbound the binat rules then the nat rules, inbound the rdr rules then the binat
        rules. An inbound binat rule matches packets from its `to` address to its `->`
        address (pf_match_translation). A `no nat`/`no rdr`/`no binat` rule is returned too
        (its pool is None: do not translate).
        """
        rules = self.translation_rules
        if not rules:
            return None
        order = ("binat", "nat") if direction == PF_OUT else ("rdr", "binat")
        af = pkt.af
        src = int.from_bytes(pkt.src, "big")
        dst = int.from_bytes(pkt.dst, "big")
        for action in order:
            for r in rules:
                if r.action != action:
                    continue
                r.evaluations += 1
                if r.ifname is not None and (r.ifname == ifname) is r.ifnot:
                    continue
                if (r.af and r.af != af) or (r.proto and r.proto != pkt.proto):
                    continue
                if action == "binat" and direction == PF_IN:
                    pool = r.nat
                    if not _addr_match(r.dst, af, src):
                        continue
                    if pool is not None and pool.addrs and not _addr_match(
                            pool.addrs[0], af, dst):
                        continue
                else:
                    if not (_addr_match(r.src, af, src) and _addr_match(r.dst, af, dst)):
                        continue
                    if r.sport is not None and not port_match(*r.sport, pkt.sport):
                        continue
                    if r.dport is not None and not port_match(*r.dport, pkt.dport):
                        continue
                return r
        return None

    def __str__(self) -> str:
        """`pfctl -sa` order: the translation rules (-sn) before the filter rules (-sr)."""
        return "\n".join(f"@{r.nr} {r}" for r in self.translation_rules + self.rules)


def _program(rules: list[Rule]) -> list[tuple[Any, ...]]:
    """The evaluation program: one tuple per rule of what the loop compares."""
    return [(
        r, tuple(r.skip), r.ifname, r.ifnot, r.direction, r.af, r.proto,
        _addr_test(r.src), _addr_test(r.dst), r.sport, r.dport,
        (r.flags, r.flagset) if r.flagset else None,
        (r.icmp_type, r.icmp_code)
        if (r.icmp_type is not None or r.icmp_code is not None) else None,
    ) for r in rules]


class Anchor:
    """A named ruleset called by `anchor` rules (pf_anchor): its rules and children."""

    __slots__ = ("children", "path", "prog", "rules")

    def __init__(self, path: str) -> None:
        self.path = path
        self.rules: list[Rule] = []
        self.prog: list[tuple[Any, ...]] = []
        self.children: dict[str, Anchor] = {}

    def set_rules(self, rules: list[Rule], policy: str, renumber: bool = True) -> None:
        if renumber:
            for i, r in enumerate(rules):
                r.nr = i
                r.policy = policy
            calc_skip_steps(rules)
        self.rules = rules
        self.prog = _program(rules)

    def sorted_children(self) -> list[Anchor]:
        return [self.children[k] for k in sorted(self.children)]

    def __str__(self) -> str:
        """`pfctl -a PATH -sr`."""
        return "\n".join(f"@{r.nr} {r}" for r in self.rules)


ANCHOR_STACK_MAX = 64  # PF_ANCHOR_STACK_MAX

# The rule a packet is blocked by when anchors nest deeper than ANCHOR_STACK_MAX.
ANCHOR_OVERFLOW = Rule()
ANCHOR_OVERFLOW.action = "block"
ANCHOR_OVERFLOW.nr = -1

_OK = 0
_QUICK = 1
_FAIL = 2


class _Walk:
    """One evaluation's context (pf_test_ctx): the packet as rules see it and results."""

    __slots__ = ("af", "am", "depth", "direction", "dport", "dst", "icmp_reply", "ifname",
                 "last_nat", "last_rdr", "match", "pkt", "proto", "scrub", "sport", "src", "tag",
                 "v")

    def __init__(self, pkt: Any, direction: int, ifname: str, tag: int) -> None:
        self.pkt = pkt
        self.direction = direction
        self.ifname = ifname
        self.tag = tag
        self.af = pkt.af
        self.proto = proto = pkt.proto
        self.src = int.from_bytes(pkt.src, "big")
        self.dst = int.from_bytes(pkt.dst, "big")
        self.sport = pkt.sport
        self.dport = pkt.dport
        self.icmp_reply = False
        if getattr(pkt, "frag_off", 0):
            self.v = _V_FRAG
        elif proto == IPPROTO_TCP:
            self.v = _V_TCP
        elif proto == IPPROTO_UDP:
            self.v = _V_UDP
        elif proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            self.v = _V_ICMP
            self.icmp_reply = pkt.icmp_type in (
                ICMP6_REPLY_TYPES if proto == IPPROTO_ICMPV6 else ICMP4_REPLY_TYPES)
        else:
            self.v = _V_OTHER
        self.match: Rule | None = None
        self.scrub: Scrub | None = None
        self.am: Rule | None = None  # the anchor rule the deciding rule was found under
        self.last_nat: Rule | None = None
        self.last_rdr: Rule | None = None
        self.depth = 0


def _miss(e: tuple[Any, ...], c: _Walk) -> int:
    """-1 when the rule's criteria match, else the index to go on at (0: the next)."""
    r, sk, rif, rifnot, rdir, raf, rproto, sa, da, sp, dp, fl, ic = e
    af = c.af
    if rif is not None and (rif == c.ifname) is rifnot:
        return sk[PF_SKIP_IFP]
    if rdir and rdir != c.direction:
        return sk[PF_SKIP_DIR]
    if raf and raf != af:
        return sk[PF_SKIP_AF]
    if rproto and rproto != c.proto:
        return sk[PF_SKIP_PROTO]
    if sa is not None:
        mask, net, neg, table = sa
        if (((c.src & mask) == net) if table is None else table.contains(af, c.src)) is neg:
            return sk[PF_SKIP_SRC_ADDR]
    if da is not None:
        mask, net, neg, table = da
        if (((c.dst & mask) == net) if table is None else table.contains(af, c.dst)) is neg:
            return sk[PF_SKIP_DST_ADDR]
    v = c.v
    pkt = c.pkt
    if v == _V_TCP:
        if fl is not None and (pkt.tcp_flags & fl[1]) != fl[0]:
            return 0
    elif v == _V_FRAG:
        if sp is not None or dp is not None or ic is not None or (
                fl is not None and c.proto == IPPROTO_TCP):
            return 0
        sp = dp = None
    elif v == _V_ICMP:
        if ic is not None and (
                (ic[0] is not None and ic[0] != pkt.icmp_type)
                or (ic[1] is not None and ic[1] != pkt.icmp_code)):
            return 0
        if c.icmp_reply and r.keep_state and not r.sloppy:
            return 0
    if sp is not None and not port_match(sp[0], sp[1], sp[2], c.sport):
        return sk[PF_SKIP_SRC_PORT]
    if dp is not None and not port_match(dp[0], dp[1], dp[2], c.dport):
        return sk[PF_SKIP_DST_PORT]
    if r.match_tag and (c.tag == r.match_tag) is r.match_tag_not:
        return 0
    return -1


def _walk(prog: list[tuple[Any, ...]], c: _Walk, a: Rule | None,
          hook: Callable[[Rule, Any, int, int, int, int], tuple[int, int, int, int]]) -> int:
    """pf_match_rule over one ruleset; `a` is the anchor rule that called it."""
    n = len(prog)
    i = 0
    while i < n:
        e = prog[i]
        r = e[0]
        r.evaluations += 1
        j = _miss(e, c)
        if j >= 0:
            i = j or i + 1
            continue
        if r.tag:
            c.tag = r.tag
        if r.anchor is None:
            if r.action == "match":
                if r.scrub is not None:
                    c.scrub = r.scrub if c.scrub is None else c.scrub.merge(r.scrub)
                if r.nat is not None or r.rdr is not None:
                    if r.nat is not None:
                        c.last_nat = r
                    if r.rdr is not None:
                        c.last_rdr = r
                    c.src, c.sport, c.dst, c.dport = hook(r, c.pkt, c.src, c.sport, c.dst,
                                                          c.dport)
            else:
                c.match = r
                c.am = a
            if r.quick:
                return _QUICK
        else:
            rv = _step_into(r, c, hook)
            if rv != _OK:
                return rv
        i += 1
    return _OK


def _step_into(r: Rule, c: _Walk,
               hook: Callable[[Rule, Any, int, int, int, int], tuple[int, int, int, int]]) -> int:
    """pf_step_into_anchor."""
    if c.depth >= ANCHOR_STACK_MAX:
        return _FAIL
    anchor = r.anchor
    assert anchor is not None
    c.depth += 1
    if r.anchor_wildcard:
        rv = _OK
        for child in anchor.sorted_children():
            rv = _walk(child.prog, c, r, hook)
            if rv != _OK:
                break
    else:
        rv = _walk(anchor.prog, c, r, hook)
        if rv == _OK and r.quick and c.am is r:
            rv = _QUICK
    c.depth -= 1
    return rv


def _addr_match(a: Addr, af: int, addr: int) -> bool:
    t = _addr_test(a)
    if t is None:
        return True
    mask, net, neg, table = t
    hit = ((addr & mask) == net) if table is None else table.contains(af, addr)
    return hit is not neg


def _preview_transaddr(r: Rule, pkt: Any, src: int, sport: int, dst: int,
                       dport: int) -> tuple[int, int, int, int]:
    """A match rule's translation where no choice or state is needed (no NAT core hook).

    nat-to to one host (or a network with `bitmask`) gives the new source; rdr-to to one
    host gives the new destination and its `port` the new destination port (a range keeps
    the offset within the rule's port range, as pf's rdr does). Pools that need a choice
    (round-robin, random, source-hash, tables, interfaces) leave the address as it was.
    """
    if r.nat is not None:
        a = r.nat.fixed_addr(src)
        if a is not None:
            src = a
        if r.nat.proxy_port[0] and r.nat.proxy_port[0] == r.nat.proxy_port[1]:
            sport = r.nat.proxy_port[0]
    if r.rdr is not None:
        a = r.rdr.fixed_addr(dst)
        if a is not None:
            dst = a
        lo, hi = r.rdr.proxy_port
        if lo:
            if hi > lo and r.dport is not None and r.dport[0] == PF_OP_RRG:
                dport = lo + (dport - r.dport[1])
            else:
                dport = lo
    return src, sport, dst, dport


def _addr_test(a: Addr) -> tuple[int, int, bool, Table | AddrSet | None] | None:
    """(mask, net, neg, table) for the loop; None when the address cannot fail."""
    if a.kind == "any":
        return None if not a.neg else (0, 1, False, None)  # "! any" never matches
    if a.kind != "net":  # a table or a followed set: asked through `contains`
        return (0, 0, a.neg, a.table)
    return (a.mask, a.net, a.neg, None)
