"""pf's kernel log lines: pf_print_state, pf_print_flags and the lines built on them.

These imitate what the OpenBSD kernel logs (`pf: BAD state: TCP in wire: ...`,
`pf: State failure on: ...`, `pf: key attach failed on ...`), not pfctl's views, which
live in `pfcluster.pf.pfctl`. The kernel names protocols its own way
(PF_LOG_PROTO_NAMES) and prints a port only when it is not 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pfcluster.packet import Packet, addr_str, host_port
from pfcluster.pf.constants import (
    DIR_NAMES,
    IPPROTO_TCP,
    PF_IN,
    PF_LOG_PROTO_NAMES,
    PF_OUT,
    PF_WSCALE_MASK,
    flags_str,
    proto_name,
)

if TYPE_CHECKING:
    from pfcluster.pf.ruleset import Rule
    from pfcluster.pf.state import State
    from pfcluster.pf.tcp import TrackFailure


def format_tcp_peers(st: State) -> str:
    """The `[lo=.. high=.. win=.. modulator=.. wscale=..]` pair of pf_print_state."""
    both_ws = bool(st.src.wscale and st.dst.wscale)
    out = []
    for p in (st.src, st.dst):
        s = f"[lo={p.seqlo} high={p.seqhi} win={p.max_win} modulator={p.seqdiff}"
        if both_ws:
            s += f" wscale={p.wscale & PF_WSCALE_MASK}"
        out.append(s + "]")
    return " ".join(out)


def print_state(st: State) -> str:
    """Modern pf_print_state: proto, direction, wire key, stack key, peers, states, rule."""
    af, proto, a0, a1, p0, p1 = st.key
    out = [PF_LOG_PROTO_NAMES.get(proto) or str(proto)]
    if st.direction == PF_IN:
        out.append(" in")
    elif st.direction == PF_OUT:
        out.append(" out")
    out.append(f" wire: (0) {host_port(af, a0, p0)} {host_port(af, a1, p1)}")
    out.append(" stack: (0) -")
    if proto == IPPROTO_TCP:
        out.append(" " + format_tcp_peers(st))
    out.append(f" {st.src.state}:{st.dst.state}")
    if st.rule is not None:
        out.append(f" @{st.rule.nr}")
    return "".join(out)


def print_flags(flags: int) -> str:
    """pf_print_flags: a blank and the flag letters, or nothing."""
    return (" " + flags_str(flags)) if flags else ""


def bad_state_lines(st: State, pkt: Packet, direction: int, fail: TrackFailure) -> list[str]:
    """The two lines pf logs for a packet that failed the window test."""
    first = (
        f"pf: BAD state: {print_state(st)}{print_flags(pkt.tcp_flags)}"
        f" seq={fail.seq} ({fail.orig_seq}) ack={fail.ack} len={fail.p_len} ackskew={fail.ackskew}"
        f" pkts={st.packets0}:{st.packets1}"
        f" dir={'in' if direction == PF_IN else 'out'},{'fwd' if direction == st.direction else 'rev'}"
    )
    return [first, f"pf: State failure on: {fail.checks}"]


def rule_log_line(rule: Rule, direction: int, ifname: str, pkt: Packet) -> str:
    """The line a `log` rule adds to a verdict (the rule, the packet's addresses, ports
    and protocol)."""
    action = "pass" if rule.action == "pass" else "block"
    return (
        f"rule {rule.nr}/(match) {action} {DIR_NAMES.get(direction, '?')} on {ifname}: "
        f"{addr_str(pkt.af, pkt.src)}.{pkt.sport} > {addr_str(pkt.af, pkt.dst)}.{pkt.dport}: "
        f"{proto_name(pkt.proto)}"
    )


__all__ = ["bad_state_lines", "format_tcp_peers", "print_flags", "print_state", "rule_log_line"]
