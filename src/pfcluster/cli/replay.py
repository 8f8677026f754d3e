"""`pfcluster replay`: run a capture through the filter as a router would.

Each IP packet is tested `in` on the interface whose network holds its source, then
`out` on the interface whose network holds its destination, at its capture time.

Bad input is one line on stderr and exit status 1 (see `pfcluster.cli.errors`): a rules
file that is missing, not text or wrong (`file:line:col: message`, as pfctl), a capture
that is missing, unreadable, empty, not pcap/pcapng or of an unsupported link type. A
capture cut inside a record is replayed up to the cut, the summary of what was replayed
is printed (so `--json` output stays complete), then the one-line error, exit status 1.
A bad `--iface` is a usage error (status 2).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
from collections.abc import Iterator
from typing import Any, TypeVar

import click

from pfcluster.cli.errors import CommandError, ReportingCommand, load_rules_file
from pfcluster.packet import MalformedPacket, addr_str, parse
from pfcluster.pf import pfctl
from pfcluster.pf.constants import IPPROTO_TCP, PFRES_FRAG, PFRES_NAMES, PFTM, flags_str, proto_name
from pfcluster.pf.filter import Filter, Verdict
from pfcluster.pf.frag import FragCache, Release
from pfcluster.pf.ifaddrs import IfAddrs
from pfcluster.pf.router import ROUTE_BLOCK, route

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_iface(text: str) -> tuple[str, Network]:
    name, sep, cidr = text.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"{text!r}: expected NAME=CIDR, e.g. em0=198.51.100.0/24")
    try:
        return name, ipaddress.ip_network(cidr, strict=False)
    except ValueError as e:
        raise click.BadParameter(f"{text!r}: {e}") from None


def _iface_option(ctx: click.Context, param: click.Parameter,
                  value: tuple[str, ...]) -> list[tuple[str, Network]]:
    parsed = [parse_iface(t) for t in value]
    ctx.meta["iface_texts"] = {name: t.partition("=")[2] for (name, _), t in zip(parsed, value)}
    return parsed


T = TypeVar("T")


def _until_cut(items: Iterator[T], cut: list[Exception]) -> Iterator[T]:
    """Items until the capture turns out cut or corrupt; the CaptureError is kept in `cut`
    so the summary of what was replayed can still be printed before it is reported."""
    from pfcluster.io.capture import CaptureError

    try:
        yield from items
    except CaptureError as exc:
        cut.append(exc)


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


def verdict_json(v: Verdict | None, after: dict[str, Any] | None = None
                 ) -> dict[str, Any] | None:
    """A test's verdict; `after`: the packet's addresses and ports as that test let it
    go (translated, if it was)."""
    if v is None:
        return None
    d = v.to_dict()
    if after is not None:
        d.update(after)
    return d


def packet_ends(pkt: Any) -> dict[str, Any]:
    return {"src": addr_str(pkt.af, pkt.src), "dst": addr_str(pkt.af, pkt.dst),
            "sport": pkt.sport, "dport": pkt.dport}


def iface_addresses(ifaces: list[tuple[str, Network]],
                    texts: dict[str, str]) -> dict[str, list[tuple[int, bytes]]]:
    """The firewall's own address on each --iface, for `(em0)` translation pools: the
    address written (em0=192.0.2.1/24), or the network's first host when only the
    network was given (em0=192.0.2.0/24)."""
    out: dict[str, list[tuple[int, bytes]]] = {}
    for name, net in ifaces:
        ip = ipaddress.ip_interface(texts[name]).ip
        if ip == net.network_address and net.num_addresses > 1:
            ip = net.network_address + 1
        af = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        out.setdefault(name, []).append((af, ip.packed))
    return out


def replay_ifaddrs(ifaces: list[tuple[str, Network]], texts: dict[str, str]) -> IfAddrs:
    """The firewall's interfaces as --iface gives them, for `em0`, `self`, `(em0)` and
    urpf-failed: each address (chosen as for translation pools) with its prefix, whose
    route leaves by that interface."""
    flat = iface_addresses(ifaces, texts)
    return IfAddrs.from_texts(
        (name, f"{ipaddress.ip_address(raw)}/{net.prefixlen}")
        for (name, net), (_af, raw) in zip(ifaces, (flat[n].pop(0) for n, _ in ifaces)))


@click.command(cls=ReportingCommand)
@click.option("--rules", "rules_path", required=True, type=click.Path(), help="pf.conf to load")
@click.option("--iface", "ifaces", multiple=True, required=True, metavar="NAME=CIDR",
              callback=_iface_option, help="an interface and the network behind it (repeat)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per packet, then a summary")
@click.option("--pflog", "pflog_path", metavar="FILE", default=None,
              help="write the packets of `log` rules to FILE as a pflog pcap, with the "
              "capture's times (tcpdump -n -e -r FILE)")
@click.argument("capture", type=click.Path())
def replay(rules_path: str, ifaces: list[tuple[str, Network]], as_json: bool,
           pflog_path: str | None, capture: str) -> None:
    """Replay CAPTURE (pcap/pcapng) through the filter as a router."""
    from pfcluster.io.capture import iter_ip_packets
    from pfcluster.io.pflog import PflogError, PflogWriter

    ruleset = load_rules_file(rules_path, replay_ifaddrs(
        ifaces, click.get_current_context().meta.get("iface_texts", {})))
    pflog = None
    if pflog_path is not None:
        try:
            pflog = PflogWriter(pflog_path, rate=None, fresh=True)
        except PflogError as exc:
            raise CommandError(str(exc)) from exc
    try:
        _replay(ruleset, ifaces, as_json, capture, iter_ip_packets, pflog)
    finally:
        if pflog is not None:
            pflog.close()


class _Judged:
    """One packet's (or one datagram's) two tests, as replay prints them."""

    __slots__ = ("action", "after_in", "after_out", "in_if", "logs", "out_if", "v_in", "v_out")

    def __init__(self, action: str, in_if: str, out_if: str, v_in: Verdict,
                 v_out: Verdict | None, after_in: dict[str, Any] | None,
                 after_out: dict[str, Any] | None, logs: list[str]) -> None:
        self.action, self.in_if, self.out_if = action, in_if, out_if
        self.v_in, self.v_out = v_in, v_out
        self.after_in, self.after_out, self.logs = after_in, after_out, logs


def _judge(filt: Filter, ifaces: list[tuple[str, Network]], pkt: Any, raw: bytes,
           ts: float, pflog: Any) -> _Judged:
    in_if = pick_iface(ifaces, pkt.src, pkt.dst)
    # the route is chosen after the `in` test, which may have rewritten the
    # destination (rdr-to, or a reply to nat-to), as the daemon's PREROUTING does
    rv = route(filt, in_if, None, pkt, ts)
    if pflog is not None:
        pflog.route(rv, in_if, None, raw, len(raw), ts, ts)
    v_in = rv.v_in
    assert v_in is not None
    after_in: dict[str, Any] | None = packet_ends(pkt)
    out_if = pick_iface(ifaces, pkt.dst, pkt.src)
    v_out = after_out = None
    logs = rv.log_lines()
    translated = rv.payload is not None
    if rv.action != ROUTE_BLOCK:
        rv = route(filt, None, out_if, pkt, ts, tag=filt.pkt_tag)  # the in half's tag
        if pflog is not None:
            pflog.route(rv, None, out_if, bytes(pkt.raw), len(pkt.raw), ts, ts)
        v_out = rv.v_out
        after_out = packet_ends(pkt)
        logs += rv.log_lines()
        translated = translated or rv.payload is not None
    if not translated:  # the addresses and ports are shown only when they moved
        after_in = after_out = None
    return _Judged(rv.action, in_if, out_if, v_in, v_out, after_in, after_out, logs)


def _write(out: Any, as_json: bool, n: int, ts: float, what: str, j: _Judged,
           extra: dict[str, Any] | None = None) -> None:
    if as_json:
        rec = {"n": n, "ts": ts, "action": j.action, "in": verdict_json(j.v_in, j.after_in),
               "out": verdict_json(j.v_out, j.after_out), "log": j.logs}
        if extra:
            rec.update(extra)
        out.write(json.dumps(rec) + "\n")
        return
    parts = [f"in {j.in_if}: {_short(j.v_in)}"]
    if j.v_out is not None:
        parts.append(f"out {j.out_if}: {_short(j.v_out)}")
    last_ends = j.after_out or j.after_in
    if last_ends is not None:  # translated
        parts.append(f"as {last_ends['src']}.{last_ends['sport']} > "
                     f"{last_ends['dst']}.{last_ends['dport']}")
    if extra:
        parts.append(f"fragment of datagram {extra['datagram']}")
    out.write(f"{n} {ts:.6f} {j.action:<5} {what}  " + "; ".join(parts) + "\n")
    for line in j.logs:
        out.write(f"    {line}\n")


def _frag_lines(out: Any, as_json: bool, rel: Release, j: _Judged | None,
                why: str | None = None) -> None:
    """One line per fragment of a datagram: its verdict, or a drop with the reason."""
    tokens: list[tuple[int, float, str]] = sorted(rel.tokens)  # type: ignore[arg-type]
    first = tokens[0][0]
    for n, ts, what in tokens:
        if j is not None:
            _write(out, as_json, n, ts, what, j, {"fragment": True, "datagram": first})
            continue
        reason = why or PFRES_NAMES[rel.reason if rel.reason is not None else PFRES_FRAG]
        if as_json:
            out.write(json.dumps({"n": n, "ts": ts, "action": "block", "in": None, "out": None,
                                  "log": [f"fragment: {reason}"], "fragment": True,
                                  "datagram": first}) + "\n")
        else:
            out.write(f"{n} {ts:.6f} block {what}  fragment of datagram {first}: {reason}\n")


def _replay(ruleset: Any, ifaces: list[tuple[str, Network]], as_json: bool, capture: str,
            iter_ip_packets: Any, pflog: Any) -> None:
    cut: list[Exception] = []
    filt: Filter | None = None
    out = sys.stdout
    n = 0
    last = 0.0
    malformed = 0
    frags: FragCache | None = None
    for ts, raw in _until_cut(iter_ip_packets(capture), cut):
        n += 1
        if filt is None:
            # pf seeds its state ids with the boot time: here the capture's first second
            filt = Filter(ruleset, now=ts, id_seed=int(ts))
            filt.nat.iface_addrs = iface_addresses(
                ifaces, click.get_current_context().meta.get("iface_texts", {}))
            if getattr(ruleset, "reassemble", False):
                frags = FragCache(ruleset.frag_limit, float(filt.timeouts[PFTM.FRAG]))
        last = ts
        if ts >= filt.next_deadline():  # the purge's once-a-second slice, as the daemon runs it
            filt.expire(ts)
        try:
            pkt = parse(raw)
        except MalformedPacket as e:
            malformed += 1
            rec = {"n": n, "ts": ts, "action": "block", "in": None, "out": None,
                   "log": [f"malformed: {e}"]}
            out.write((json.dumps(rec) if as_json else f"{n} {ts:.6f} block malformed: {e}") + "\n")
            continue
        what = (f"{addr_str(pkt.af, pkt.src)}.{pkt.sport} > {addr_str(pkt.af, pkt.dst)}"
                f".{pkt.dport} {proto_name(pkt.proto)}")
        if pkt.proto == IPPROTO_TCP:
            what += f" [{flags_str(pkt.tcp_flags) or '.'}]"
        if frags is not None and pkt.fragment:
            # held until its datagram is whole, then all its fragments get its verdict
            # (the daemon's order); their lines come when the datagram is decided
            for rel in frags.add(pkt, (n, ts, what), ts):
                _frag_lines(out, as_json, rel,
                            None if rel.packet is None else
                            _judge(filt, ifaces, rel.packet, raw, ts, pflog))
            continue
        _write(out, as_json, n, ts, what, _judge(filt, ifaces, pkt, raw, ts, pflog))
    if frags is not None:  # datagrams the capture never completed
        for rel in frags.flush():
            _frag_lines(out, as_json, rel, None, "incomplete datagram")
    if cut and n == 0:
        raise cut[0]  # nothing replayed (no header, not a capture...): only the error
    if filt is None:
        filt = Filter(ruleset)
    summary = pfctl.counters_dict(filt, last)
    summary["packets"]["total"] = n
    summary["packets"]["malformed"] = malformed
    if as_json:
        out.write(json.dumps({"summary": summary, "states": pfctl.states_json(filt, last)}) + "\n")
    else:
        out.write("\n" + "\n".join(pfctl.format_info(filt, last)) + "\n\n")
        out.write("\n".join(pfctl.format_states(filt, last, verbose=True)) + "\n")
    if cut:
        raise cut[0]  # after the summary of what was replayed: the cut, exit status 1


def _short(v: Verdict) -> str:
    bits = [v.action, v.reason]
    if v.rule is not None:
        bits.append(f"@{v.rule.nr}")
    if v.state is not None:
        bits.append(f"state {v.state.id:016x}")
    return " ".join(bits)
