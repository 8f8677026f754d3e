"""`pfcluster replay`: run a capture through the filter as a router would.

Each IP packet is tested `in` on the interface whose network holds its source, then
`out` on the interface whose network holds its destination, at its capture time.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from typing import Any

import click

from pfcluster.packet import MalformedPacket, addr_str, parse
from pfcluster.pf.constants import PF_IN, PF_OUT, PROTO_NAMES
from pfcluster.pf.filter import Filter, Verdict
from pfcluster.pf.rules import RuleSyntaxError, load_rules

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_iface(text: str) -> tuple[str, Network]:
    name, sep, cidr = text.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"{text!r}: expected NAME=CIDR, e.g. em0=198.51.100.0/24")
    try:
        return name, ipaddress.ip_network(cidr, strict=False)
    except ValueError as e:
        raise click.BadParameter(f"{text!r}: {e}") from None


def pick_iface(ifaces: list[tuple[str, Network]], addr: bytes, other: bytes) -> str:
    """The interface whose network holds `addr`; failing that, one that does not hold
    the other end (a router's default route), else the first."""
    ip = ipaddress.ip_address(addr)
    for name, net in ifaces:
        if ip.version == net.version and ip in net:
            return name
    oip = ipaddress.ip_address(other)
    for name, net in ifaces:
        if not (oip.version == net.version and oip in net):
            return name
    return ifaces[0][0]


def verdict_json(v: Verdict | None) -> dict[str, Any] | None:
    return v.to_dict() if v is not None else None


@click.command()
@click.option("--rules", "rules_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="pf.conf to load")
@click.option("--iface", "ifaces_text", multiple=True, required=True, metavar="NAME=CIDR",
              help="an interface and the network behind it (repeat)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per packet, then a summary")
@click.argument("capture", type=click.Path(exists=True, dir_okay=False))
def replay(rules_path: str, ifaces_text: tuple[str, ...], as_json: bool, capture: str) -> None:
    """Replay CAPTURE (pcap/pcapng) through the filter as a router."""
    from pfcluster.pfsync.pcap import iter_ip_packets

    ifaces = [parse_iface(t) for t in ifaces_text]
    try:
        ruleset = load_rules(rules_path)
    except RuleSyntaxError as e:
        click.echo(str(e), err=True)
        sys.exit(1)
    filt: Filter | None = None
    out = sys.stdout
    n = 0
    last = 0.0
    malformed = 0
    for ts, raw in iter_ip_packets(capture):
        n += 1
        if filt is None:
            filt = Filter(ruleset, now=ts)
        last = ts
        if ts >= filt.next_deadline(ts):  # the purge's once-a-second slice, as the daemon runs it
            filt.expire(ts)
        try:
            pkt = parse(raw)
        except MalformedPacket as e:
            malformed += 1
            rec = {"n": n, "ts": ts, "action": "block", "in": None, "out": None,
                   "log": [f"malformed: {e}"]}  # fmt: skip
            out.write((json.dumps(rec) if as_json else f"{n} {ts:.6f} block malformed: {e}") + "\n")
            continue
        in_if = pick_iface(ifaces, pkt.src, pkt.dst)
        out_if = pick_iface(ifaces, pkt.dst, pkt.src)
        v_in = filt.test(PF_IN, in_if, pkt, ts)
        v_out: Verdict | None = None
        logs = list(v_in.log)
        if v_in.action == "pass":
            v_out = filt.test(PF_OUT, out_if, pkt, ts)
            logs.extend(v_out.log)
        action = "pass" if v_out is not None and v_out.action == "pass" else "block"
        if as_json:
            rec = {"n": n, "ts": ts, "action": action, "in": verdict_json(v_in),
                   "out": verdict_json(v_out), "log": logs}  # fmt: skip
            out.write(json.dumps(rec) + "\n")
        else:
            proto = PROTO_NAMES.get(pkt.proto, str(pkt.proto))
            what = f"{addr_str(pkt.af, pkt.src)}.{pkt.sport} > {addr_str(pkt.af, pkt.dst)}.{pkt.dport} {proto}"
            if pkt.proto == 6:
                from pfcluster.pf.constants import flags_str

                what += f" [{flags_str(pkt.tcp_flags) or '.'}]"
            parts = [f"in {in_if}: {_short(v_in)}"]
            if v_out is not None:
                parts.append(f"out {out_if}: {_short(v_out)}")
            out.write(f"{n} {ts:.6f} {action:<5} {what}  " + "; ".join(parts) + "\n")
            for line in logs:
                out.write(f"    {line}\n")
    if filt is None:
        filt = Filter(ruleset)
    summary = filt.counters_dict(last)
    summary["packets"]["total"] = n
    summary["packets"]["malformed"] = malformed
    if as_json:
        out.write(json.dumps({"summary": summary, "states": filt.states_json(last)}) + "\n")
    else:
        out.write("\n" + "\n".join(filt.format_info(last)) + "\n\n")
        out.write("\n".join(filt.format_states(last, verbose=True)) + "\n")


def _short(v: Verdict) -> str:
    bits = [v.action, v.reason]
    if v.rule is not None:
        bits.append(f"@{v.rule.nr}")
    if v.state is not None:
        bits.append(f"state {v.state.id:016x}")
    return " ".join(bits)
