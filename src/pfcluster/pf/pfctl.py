"""pfctl's views, in one module: `-ss`, `-ss -v`, `-si`, `-sr` and the JSON state view.

Every command that shows pf's state prints it from here: `ctl states|info|rules` (the
daemon's control answers), `replay`'s summary, and `dump -v`, whose state records are
printed the way OpenBSD's tcpdump prints them (with pfctl's print_state, as tcpdump's
pfsync printer does). A state from the table and a pfsync state record are both turned
into a `StateView` first, so the two print alike.

pf's kernel log lines (`pf: BAD state: ...`, pf_print_state) are not pfctl's: they live
in `pfcluster.pf.log`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from pfcluster.packet import addr_str, host_port
from pfcluster.pf.constants import (
    AF_INET,
    DIR_NAMES,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    PF_OUT,
    PF_TCPS_PROXY_DST,
    PF_TCPS_PROXY_SRC,
    PF_WSCALE_MASK,
    PFRES_NAMES,
    PFSYNC_FLAG_NATSRCNODE,
    PFSYNC_FLAG_SRCNODE,
    PFUDPS_NAMES,
    TCPS,
    TCPS_NAMES,
    proto_name,
)
from pfcluster.pf.state import state_expires

if TYPE_CHECKING:
    from pfcluster.pf.filter import Filter
    from pfcluster.pf.ruleset import Rule
    from pfcluster.pf.state import Peer, State

# One side of a state key as pfctl prints it: (address 0, address 1, port 0, port 1).
KeySide = tuple[bytes, bytes, int, int]


class StateView(NamedTuple):
    """What pfctl's print_state reads of a state, from the table or from a pfsync record.

    `src`/`dst` are the state's peers (anything with seqlo, seqhi, seqdiff, wscale and
    state). `stack` and `wire` are the two keys; they differ only for a translated state,
    which prints the wire side in parentheses. `rule` and `anchor` are None when unset.
    """

    ifname: str
    af: int | None
    proto: int
    direction: int
    stack: KeySide
    wire: KeySide
    src: Any
    dst: Any
    id: int
    creatorid: int
    age: int = 0
    expires_in: int = 0
    packets: tuple[int, int] = (0, 0)
    bytes: tuple[int, int] = (0, 0)
    rule: int | None = None
    anchor: int | None = None
    flags: tuple[str, ...] = ()  # trailing words of the counters line (", source-track")


# -- pfctl -ss / -ss -v -----------------------------------------------------------------


def peer_states(proto: int, src: int, dst: int) -> str:
    """Two peers' state levels as pfctl's print_state names them: TCP states up to
    TIME_WAIT, the synproxy phases, UDP and other-protocol levels; ICMP, which has no
    state levels, and anything out of range as numbers."""
    if proto == IPPROTO_TCP:
        if src <= TCPS.TIME_WAIT and dst <= TCPS.TIME_WAIT:
            return f"{TCPS_NAMES[src]}:{TCPS_NAMES[dst]}"
        if PF_TCPS_PROXY_SRC in (src, dst):
            return "PROXY:SRC"
        if PF_TCPS_PROXY_DST in (src, dst):
            return "PROXY:DST"
        return f"<BAD STATE LEVELS {src}:{dst}>"
    if proto not in (IPPROTO_ICMP, IPPROTO_ICMPV6) and src < len(PFUDPS_NAMES) \
            and dst < len(PFUDPS_NAMES):
        return f"{PFUDPS_NAMES[src]}:{PFUDPS_NAMES[dst]}"  # PFOTHERS_NAMES are the same
    return f"{src}:{dst}"


def _print_peers(v: StateView) -> tuple[Any, Any]:
    """The peers in pfctl's print order (src = &s->dst for a state that is not PF_OUT),
    so the left-hand peer state always belongs to the left-hand host."""
    if v.direction == PF_OUT:
        return v.src, v.dst
    return v.dst, v.src


def state_line(v: StateView) -> str:
    """The `pfctl -ss` line: `all tcp 198.51.100.2:40000 -> 203.0.113.10:5201  ESTABLISHED:ESTABLISHED`.

    As pfctl's print_state: an outbound state prints its wire key (`->`), an inbound one
    its stack key (`<-`), slot 1 first; a slot the other key holds differently follows
    in parentheses, so a nat-to state reads `192.0.2.1:50001 (10.0.0.5:4321) -> ...`
    and an rdr-to state `10.0.0.5:80 (192.0.2.1:80) <- ...`.
    """
    af, proto = v.af, v.proto
    always = proto in (IPPROTO_TCP, IPPROTO_UDP)
    if v.direction == PF_OUT:
        shown, other = v.wire, v.stack
    else:
        shown, other = v.stack, v.wire
    na0, na1, np0, np1 = shown
    oa0, oa1, op0, op1 = other
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):  # the echo id is not a translated slot
        if v.direction == PF_OUT:
            op0 = np0
        else:
            op1 = np1
    left = host_port(af, na1, np1, always)
    if (na1, np1) != (oa1, op1):
        left += f" ({host_port(af, oa1, op1, always)})"
    right = host_port(af, na0, np0, always)
    if (na0, np0) != (oa0, op0):
        right += f" ({host_port(af, oa0, op0, always)})"
    arrow = "->" if v.direction == PF_OUT else "<-"
    src, dst = _print_peers(v)
    states = peer_states(proto, src.state, dst.state)
    return f"{v.ifname} {proto_name(proto)} {left} {arrow} {right}       {states}"


def hms(seconds: int) -> str:
    """pfctl's age/expiry notation, hours unbounded: 00:01:05."""
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _window(p: Any, both_wscale: bool) -> str:
    s = f"[{p.seqlo} + {(p.seqhi - p.seqlo) & 0xFFFFFFFF}]"
    if p.seqdiff:
        s += f"(+{p.seqdiff})"
    if both_wscale:
        s += f" wscale {p.wscale & PF_WSCALE_MASK}"
    return s


def state_text(v: StateView, verbose: bool) -> list[str]:
    """pfctl -ss (one line) or -ss -v: then the TCP windows, age/expiry/counters, ids."""
    lines = [state_line(v)]
    if not verbose:
        return lines
    if v.proto == IPPROTO_TCP:
        src, dst = _print_peers(v)
        both = bool(v.src.wscale and v.dst.wscale)
        lines.append(f"   {_window(src, both)}  {_window(dst, both)}")
    more = (f"   age {hms(v.age)}, expires in {hms(v.expires_in)}, "
            f"{v.packets[0]}:{v.packets[1]} pkts, {v.bytes[0]}:{v.bytes[1]} bytes")
    if v.anchor is not None:
        more += f", anchor {v.anchor}"
    if v.rule is not None:
        more += f", rule {v.rule}"
    lines.append(more + "".join(v.flags))
    lines.append(f"   id: {v.id:016x} creatorid: {v.creatorid:08x}")
    return lines


def state_view(st: State, now: float | None = None, timeouts: list[int] | None = None,
               nstates: int = 0) -> StateView:
    """A table state as pfctl sees it; age and expiry only when `now` and the timeouts
    are given (the -v lines)."""
    _af, _proto, a0, a1, p0, p1 = st.key
    key = (a0, a1, p0, p1)
    nat = st.nat
    skey = key if nat is None else (nat.skey[2], nat.skey[3], nat.skey[4], nat.skey[5])
    age = exp = 0
    if now is not None and timeouts is not None:
        age = int(now - st.creation)
        exp = max(0, int(state_expires(st, timeouts, nstates) - now))
    return StateView(st.ifname, st.af, st.proto, st.direction, skey, key, st.src, st.dst,
                     st.id, st.creatorid, age, exp, (st.packets0, st.packets1),
                     (st.bytes0, st.bytes1), st.rule.nr if st.rule is not None else None)


def format_state_line(st: State) -> str:
    """The `pfctl -ss` line of a table state."""
    return state_line(state_view(st))


def format_states(filt: Filter, now: float, verbose: bool = False) -> list[str]:
    """pfctl -ss (-v) of a whole state table."""
    out: list[str] = []
    n = len(filt.states)
    timeouts = filt.timeouts
    for st in filt.states:
        out.extend(state_text(state_view(st, now, timeouts, n), verbose))
    return out


def record_view(st: Any, af: int | None) -> StateView:
    """A pfsync state record (`pfcluster.pfsync.wire.State`) as pfctl sees it; `af` is
    the record's address family as a socket AF (None if unknown). Age and expiry are the
    record's own seconds; a rule or anchor of 0xffffffff is unset."""
    kw, ks = st.key[0], st.key[1]
    flags = []
    if st.sync_flags & PFSYNC_FLAG_SRCNODE:
        flags.append(", source-track")
    if st.sync_flags & PFSYNC_FLAG_NATSRCNODE:
        flags.append(", sticky-address")
    return StateView(
        st.ifname or "all", af, st.proto, st.direction,
        (ks.addr[0], ks.addr[1], ks.port[0], ks.port[1]),
        (kw.addr[0], kw.addr[1], kw.port[0], kw.port[1]),
        st.src, st.dst, st.id, st.creatorid, st.creation, st.expire,
        (st.packets[0], st.packets[1]), (st.bytes[0], st.bytes[1]),
        None if st.rule == 0xFFFFFFFF else st.rule,
        None if st.anchor == 0xFFFFFFFF else st.anchor, tuple(flags),
    )


# -- the JSON state view ------------------------------------------------------------------


def _peer_json(p: Peer) -> dict[str, int]:
    return {
        "seqlo": p.seqlo,
        "seqhi": p.seqhi,
        "max_win": p.max_win,
        "wscale": p.wscale,
        "state": p.state,
        "seqdiff": p.seqdiff,
    }


def state_to_dict(st: State, now: float, timeouts: list[int], nstates: int) -> dict[str, Any]:
    """A JSON view for ctl/replay (pf names, hex ids)."""
    af, proto, a0, a1, p0, p1 = st.key
    exp = state_expires(st, timeouts, nstates)
    return {
        "id": f"{st.id:016x}",
        "creatorid": f"{st.creatorid:08x}",
        "ifname": st.ifname,
        "proto": proto_name(proto),
        "af": "inet" if af == AF_INET else "inet6",
        "direction": DIR_NAMES.get(st.direction, "?"),
        "key": {"addr": [addr_str(af, a0), addr_str(af, a1)], "port": [p0, p1]},
        # key[PF_SK_WIRE], key[PF_SK_STACK] as pfsync carries them (equal untranslated)
        "keys": [{"addr": [addr_str(af, k[2]), addr_str(af, k[3])], "port": [k[4], k[5]]}
                 for k in (st.key, st.skey)],
        "src": _peer_json(st.src),
        "dst": _peer_json(st.dst),
        "states": peer_states(proto, st.src.state, st.dst.state),
        "timeout": int(st.timeout),
        "age": round(now - st.creation, 3),
        "expires_in": max(0.0, round(exp - now, 3)),
        "packets": [st.packets0, st.packets1],
        "bytes": [st.bytes0, st.bytes1],
        "rule": st.rule_nr,
        "line": format_state_line(st),
    }


def states_json(filt: Filter, now: float) -> list[dict[str, Any]]:
    n = len(filt.states)
    return [state_to_dict(st, now, filt.timeouts, n) for st in filt.states]


# -- pfctl -si ------------------------------------------------------------------------------


def counters_dict(filt: Filter, now: float) -> dict[str, Any]:
    """The figures of pfctl -si as JSON: state table, reasons, packets by direction."""
    t = filt.states
    return {
        "hostid": f"{filt.creatorid:08x}",
        "checksum": filt.ruleset.checksum.hex(),
        "debug": getattr(filt.ruleset, "debug", "err") or "err",
        "running_seconds": round(now - filt.started, 3),
        "states": {
            "current": len(t),
            "searches": t.searches,
            "inserts": t.inserts,
            "removals": t.removals,
            "limit": filt.limit_states,
        },
        "counters": {name: filt.counters[i] for i, name in enumerate(PFRES_NAMES)},
        "src_nodes": filt.srcnodes.counters(),
        "limit_counters": dict(filt.srcnodes.limit_counters),
        "packets": dict(filt.extra),
    }


def format_info(filt: Filter, now: float, verbose: bool = False) -> list[str]:
    """pfctl -si [-v], printf for printf (pfctl's print_status)."""
    return format_info_data(counters_dict(filt, now), verbose)


def format_info_data(data: dict[str, Any], verbose: bool = False) -> list[str]:
    """pfctl -si from `counters_dict`'s figures (a --workers firewall sums its workers');
    `verbose` adds -v's Source Tracking Table and Limit Counters."""
    up = max(0, int(data["running_seconds"]))
    d, rem = divmod(up, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    status = f"Status: Enabled for {d} days {h:02d}:{m:02d}:{s:02d}"
    debug = f"Debug: {data['debug']}"
    lines = [
        f"{status:<44}{debug:>15}",
        "",
        f"Hostid:   0x{data['hostid']}",
        f"Checksum: 0x{data['checksum']}",
        "",
        f"{'State Table':<27} {'Total':>14} {'Rate':>16}",
    ]
    t = data["states"]

    def rate(total: int) -> str:
        # pfctl divides by whole seconds of runtime and prints no rate before the first
        return f"{total / up:>14.1f}/s" if up > 0 else f"{'':>14}"

    lines.append(f"  {'current entries':<25} {t['current']:>14} {'':>14}")
    for name in ("searches", "inserts", "removals"):
        lines.append(f"  {name:<25} {t[name]:>14} {rate(t[name])}")
    sn = data.get("src_nodes")
    if verbose and sn is not None:
        lines.append("Source Tracking Table")
        lines.append(f"  {'current entries':<25} {sn['current']:>14} {'':>14}")
        for name in ("searches", "inserts", "removals"):
            lines.append(f"  {name:<25} {sn[name]:>14} {rate(sn[name])}")
    lines.append("Counters")
    for name in PFRES_NAMES:
        total = data["counters"][name]
        lines.append(f"  {name:<25} {total:>14} {rate(total)}")
    lc = data.get("limit_counters")
    if verbose and lc is not None:
        lines.append("Limit Counters")
        for name, total in lc.items():
            label = name.replace("-table-", " table ").replace("-flush-", " flush ")
            lines.append(f"  {label:<25} {total:>14} {rate(total)}")
    return lines


def format_daemon_info(filt: Filter, now: float, pfsync: dict[str, Any], sync_ok: bool,
                       dataplane: dict[str, Any]) -> list[str]:
    """`ctl info`: pfctl -si, then the pfsync counters and sync_ok, then the data plane's."""
    return format_daemon_info_data(counters_dict(filt, now), pfsync, sync_ok, dataplane)


def format_daemon_info_data(pf: dict[str, Any], pfsync: dict[str, Any], sync_ok: bool,
                            dataplane: dict[str, Any]) -> list[str]:
    text = format_info_data(pf, verbose=True)
    text.append("pfsync")
    text.extend(f"  {k:<25}{v:>14}" for k, v in sorted(pfsync.items()))
    text.append(f"  {'sync_ok':<25}{str(sync_ok).lower():>14}")
    text.append("dataplane")
    text.extend(f"  {k:<25}{v:>14}" for k, v in sorted(dataplane.items()))
    return text


# -- pfctl -sr ------------------------------------------------------------------------------


def format_rules(rules: Iterable[Rule]) -> list[str]:
    """pfctl -sr: each rule in pf.conf syntax, as Rule prints itself."""
    return [str(r) for r in rules]


__all__ = [
    "StateView",
    "counters_dict",
    "format_daemon_info",
    "format_daemon_info_data",
    "format_info",
    "format_info_data",
    "format_rules",
    "format_state_line",
    "format_states",
    "hms",
    "peer_states",
    "record_view",
    "state_line",
    "state_text",
    "state_to_dict",
    "state_view",
    "states_json",
]
