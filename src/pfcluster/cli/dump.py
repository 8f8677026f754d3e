"""`pfcluster dump`: print the pfsync frames of a capture (or a live interface).

Text output follows OpenBSD tcpdump's pfsync printer (``PFSYNCv5 len N``, one
``act NAME count N`` line per section, messages with ``-v``, states in ``pfctl -ss -v``
style); ``--json`` prints one object per frame per line with the keys DESIGN.md fixes.
A frame that fails to decode prints what decoded plus the reason, then dumping goes on.

A capture that cannot be read (missing, unreadable, empty, not pcap/pcapng, unsupported
link type) prints one line `pfcluster dump: FILE: problem` and exits 1. A capture cut
inside a record prints every frame before the cut, then that line (`FILE: truncated dump
file: ...`), exit status 1, as tcpdump does. A live interface that does not exist or
cannot be opened: `pfcluster dump: IF: problem`, exit 1.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import click

from pfcluster.cli.errors import CommandError, ReportingCommand
from pfcluster.io.capture import (
    LINKTYPE_ETHERNET,
    CaptureError,
    PfsyncPacket,
    iter_pfsync,
    pfsync_from_record,
)
from pfcluster.packet import addr_str
from pfcluster.pf import pfctl
from pfcluster.pfsync import auth, legacy, wire

DIALECT_CHOICES = (*wire.DIALECTS, "v4", "auto")
_V5_CANDIDATES = ("openbsd45", "freebsd1301", "freebsd1400")


# --------------------------------------------------------------------------- decoding


class Decoded:
    """One frame's decode result: the frame (maybe partial), the fatal error if any."""

    __slots__ = ("dialect", "error", "frame")

    def __init__(self, dialect: str, frame: Any, error: wire.WireError | None) -> None:
        self.dialect = dialect
        self.frame = frame
        self.error = error


def _try(payload: bytes, dialect: str) -> Decoded:
    try:
        if dialect == "v4":
            return Decoded(dialect, legacy.decode_v4(payload), None)
        return Decoded(dialect, wire.decode(payload, dialect), None)
    except wire.WireError as e:
        return Decoded(dialect, e.frame, e)


def guess_dialect(payload: bytes, prefer: str | None = None) -> Decoded:
    """Decode with the dialect the frame fits best: the version byte picks v4 / v5 /
    openbsd6; among the v5 dialects the first whose sections tile the frame to its EOF
    cleanly wins (EOF body size tells OpenBSD 4.5 from FreeBSD; action 13/14 or the
    state size tells 1400 from 1301). A frame no dialect decodes cleanly is shown in
    ``prefer`` (the dialect of the previous frames) when that is a v5 dialect."""
    version = payload[0] if payload else -1
    if version == 4:
        return _try(payload, "v4")
    if version == 6:
        return _try(payload, "openbsd6")
    if version != 5:
        return _try(payload, "openbsd45")
    results = [_try(payload, d) for d in _V5_CANDIDATES]
    for r in results:
        if r.error is None and not r.frame.errors:
            return r
    for r in results:
        if r.error is None:
            return r
    for r in results:
        if r.dialect == prefer:
            return r

    def score(r: Decoded) -> int:
        return sum(len(s.messages) for s in r.frame.sections) if r.frame is not None else -1

    return max(results, key=score)


# --------------------------------------------------------------------------- JSON


def _peer_dict(p: wire.StatePeer) -> dict[str, int]:
    return {f: getattr(p, f) for f in p._fields}


def _sockaddr_str(raw: bytes, dialect: str) -> str:
    fam = raw[1] if len(raw) > 1 else 0
    af = wire.af_from_wire(dialect if dialect in wire.DIALECTS else "openbsd45", fam)
    if af == socket.AF_INET:
        return addr_str(af, raw[4:8])
    if af == socket.AF_INET6:
        return addr_str(af, raw[8:24])
    return raw.hex()


def _state_dict(st: wire.State, dialect: str) -> dict[str, Any]:
    wd = dialect if dialect in wire.DIALECTS else "openbsd45"
    af = wire.af_from_wire(wd, st.af)
    out: dict[str, Any] = {}
    for name in wire.STATE_FIELDS[wd]:
        v = getattr(st, name)
        if name == "key":
            keys = []
            for k in v:
                kaf = wire.af_from_wire(wd, k.af) if k.af else af
                kd: dict[str, Any] = {"addr": [addr_str(kaf, a) for a in k.addr],
                                      "port": list(k.port)}
                if wd == "openbsd6":
                    kd["rdomain"] = k.rdomain
                    kd["af"] = k.af
                keys.append(kd)
            out[name] = keys
        elif name in ("src", "dst"):
            out[name] = _peer_dict(v)
        elif name == "rt_addr":
            out[name] = addr_str(af, v)
        elif isinstance(v, list):
            out[name] = list(v)
        else:
            out[name] = v
    return out


def message_dict(msg: Any, dialect: str) -> Any:
    """A message as JSON-able data with the C field names (DESIGN.md JSON rules)."""
    if isinstance(msg, wire.State):
        return _state_dict(msg, dialect)
    if isinstance(msg, bytes):  # RawMessage of a skipped section
        return msg.hex()
    out: dict[str, Any] = {}
    for name in msg._fields:
        v = getattr(msg, name)
        if isinstance(v, wire.StatePeer):
            out[name] = _peer_dict(v)
        elif isinstance(msg, wire.Tdb) and name == "dst":
            out[name] = _sockaddr_str(v, dialect)
        elif isinstance(v, bytes):
            out[name] = v.hex()
        else:
            out[name] = v
    if isinstance(msg, wire.UpdC) and dialect != "openbsd6":
        out.pop("state_flags", None)  # a pad byte before v6
    if isinstance(msg, wire.Tdb) and dialect != "openbsd6":
        out.pop("rdomain", None)
    return out


def frame_dict(pkt: PfsyncPacket, dec: Decoded, extra_errors: list[str]) -> dict[str, Any]:
    f = dec.frame
    obj: dict[str, Any] = {"ts": pkt.ts, "src": pkt.src, "dst": pkt.dst, "ttl": pkt.ttl}
    if f is None:
        obj.update(version=pkt.payload[0] if pkt.payload else None, len=len(pkt.payload),
                   pfcksum=None, sections=[])
        errors = [str(dec.error)] if dec.error else []
    elif isinstance(f, legacy.V4Frame):
        obj.update(version=f.version, len=len(pkt.payload), pfcksum=bytes(f.pf_chksum).hex(),
                   sections=[{"action": f.action_name, "action_id": f.action, "count": f.count,
                              "messages": [message_dict(m, "v4") for m in f.messages]}])
        errors = list(f.errors)
    else:
        obj.update(version=f.version, len=f.len, pfcksum=bytes(f.pfcksum).hex(),
                   sections=[{"action": s.action, "action_id": s.action_id, "count": s.count,
                              "messages": [message_dict(m, dec.dialect) for m in s.messages]}
                             for s in f.sections])
        errors = list(f.errors)
    obj["errors"] = extra_errors + errors
    obj["dialect"] = dec.dialect
    return obj


# --------------------------------------------------------------------------- text


def state_lines(st: wire.State, dialect: str, verbose: int) -> list[str]:
    """pfctl -ss (-v) style lines for one pfsync_state, indented by a tab (tcpdump)."""
    wd = dialect if dialect in wire.DIALECTS else "openbsd45"
    view = pfctl.record_view(st, wire.af_from_wire(wd, st.af))
    return ["\t" + line for line in pfctl.state_text(view, bool(verbose))]


def message_lines(msg: Any, dialect: str, verbose: int) -> list[str]:
    if isinstance(msg, wire.State):
        return state_lines(msg, dialect, verbose)
    if isinstance(msg, legacy.StateDel):
        return [f"\tid: {msg.id:016x} creatorid: {msg.creatorid:08x}"]
    if isinstance(msg, wire.Clr):
        s = f"\tcreatorid: {msg.creatorid:08x}"
        return [s + (f" interface: {msg.ifname}" if msg.ifname else "")]
    if isinstance(msg, wire.Bus):
        status = {1: "start", 2: "end"}.get(msg.status, "UNKNOWN")
        return [f"\tcreatorid: {msg.creatorid:08x} age: {pfctl.hms(msg.endtime)} status: {status}"]
    if isinstance(msg, wire.Tdb):
        return [f"\tspi: {msg.spi:08x} rpl: {msg.rpl} cur_bytes: {msg.cur_bytes}"]
    if isinstance(msg, wire.Eof):
        return [f"\t hmac: {bytes(msg.hmac).hex()}"]
    if isinstance(msg, bytes):
        return [f"\traw: {msg.hex()}"]
    if hasattr(msg, "id") and hasattr(msg, "creatorid"):
        return [f"\tid: {msg.id:016x} creatorid: {msg.creatorid:08x}"]
    return [f"\t{msg!r}"]


def _ts(ts: float) -> str:
    return f"{ts:.6f}"


def frame_text(pkt: PfsyncPacket, dec: Decoded, verbose: int, extra_errors: list[str]) -> str:
    head = _ts(pkt.ts) + " "
    if pkt.src is not None:
        head += f"{pkt.src} > {pkt.dst}: "
    f = dec.frame
    lines: list[str] = []
    if f is None:
        head += f"PFSYNC [|pfsync] {len(pkt.payload)} bytes"
        errors = [str(dec.error)] if dec.error else []
    elif isinstance(f, legacy.V4Frame):
        head += f"PFSYNCv{f.version} count {f.count}"
        name = (legacy.V4_TCPDUMP_NAMES[f.action] if f.action < len(legacy.V4_TCPDUMP_NAMES)
                else f"{f.action}?")
        lines.append(f"    act {name} count {f.count}")
        if verbose:
            for m in f.messages:
                lines.extend(message_lines(m, "openbsd45", verbose))
        errors = list(f.errors)
    else:
        head += f"PFSYNCv{f.version} len {f.len}"
        for s in f.sections:
            label = wire.TCPDUMP_NAMES.get(s.action, s.action)
            extra = " (skipped)" if s.skipped else ""
            lines.append(f"    act {label} count {s.count}{extra}")
            if verbose:
                for m in s.messages:
                    lines.extend(message_lines(m, dec.dialect, verbose))
        errors = list(f.errors)
    if pkt.ttl is not None:
        head += f" (ttl {pkt.ttl})"
    for e in extra_errors + errors:
        lines.append(f"    error: {e}")
    return "\n".join([head, *lines])


# --------------------------------------------------------------------------- --sync-key


class AuthView:
    """The authenticator of each frame (pfsync/auth.py) and, with ``--key``, its verdict;
    one Verifier per placement, so replays within the capture show as ``replay``."""

    def __init__(self, keys: auth.KeyRing | None) -> None:
        self.verifiers = ({d: auth.Verifier(keys, d) for d in ("openbsd45", "openbsd6")}
                          if keys is not None else {})

    @staticmethod
    def strip(payload: bytes, dialect: str) -> bytes:
        """The frame without a trailer authenticator (dialects other than 4.5)."""
        if dialect in auth.EMBEDDED or dialect == "v4" or payload[:1] not in (b"\5", b"\6") \
                or auth.locate(payload, "openbsd6") is None:
            return payload
        return payload[: -auth.AUTH_LEN]

    def show(self, payload: bytes, dialect: str) -> dict[str, Any] | None:
        """The fields and verdict, or None for a frame with no authenticator and no key."""
        where = "openbsd45" if dialect in auth.EMBEDDED else "openbsd6"
        fields = None if dialect == "v4" else auth.read(payload, where)
        if fields is not None and where == "openbsd45" and fields.key_id == 0:
            fields = None  # an unkeyed 4.5 sender's EOF body
        if fields is None and not self.verifiers:
            return None
        out: dict[str, Any] = {"verdict": None}
        if fields is not None:
            out.update(key_id=fields.key_id, sender=f"{fields.sender:08x}",
                       counter=fields.counter, tag=fields.tag.hex())
        if self.verifiers:
            out["verdict"] = self.verifiers[where].check(payload)[0] if dialect != "v4" \
                else auth.NONE
        return out


def auth_line(view: dict[str, Any]) -> str:
    head = (f"    auth: key {view['key_id']} sender {view['sender']} counter "
            f"{view['counter']} tag {view['tag']}" if "key_id" in view else "    auth: none")
    return head + (f" [{view['verdict']}]" if view["verdict"] else "")


# --------------------------------------------------------------------------- sources


def _live(ifname: str, count: int | None, seconds: float | None) -> Iterator[PfsyncPacket]:
    """pfsync frames seen on ``ifname`` through an AF_PACKET socket (needs CAP_NET_RAW)."""
    eth_p_all = 0x0003
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(eth_p_all))
    except OSError as exc:
        raise CaptureError(ifname, f"cannot open a packet socket: {exc.strerror or exc} "
                                   "(needs CAP_NET_RAW)") from exc
    try:
        try:
            sock.bind((ifname, 0))
        except OSError as exc:
            raise CaptureError(ifname, exc.strerror or str(exc)) from exc
        deadline = time.monotonic() + seconds if seconds is not None else None
        seen = 0
        while count is None or seen < count:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                sock.settimeout(min(left, 1.0))
            else:
                sock.settimeout(1.0)
            try:
                buf, addr = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError as exc:  # e.g. ENETDOWN: the interface went away
                raise CaptureError(ifname, exc.strerror or str(exc)) from exc
            hatype = addr[3] if len(addr) > 3 else 1
            linktype = LINKTYPE_ETHERNET if hatype in (1, 772) else 101
            pkt = pfsync_from_record(time.time(), linktype, buf)
            if pkt is not None:
                seen += 1
                yield pkt
    finally:
        sock.close()


def _check_ifname(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and (not 0 < len(value.encode()) < 16
                              or any(c in "\0/" or c.isspace() for c in value)):
        raise click.BadParameter(f"{value!r}: not an interface name (1..15 bytes, no NUL, "
                                 "slash or blanks)")
    return value


@click.command("dump", cls=ReportingCommand)
@click.argument("capture", required=False, type=click.Path())
@click.option("--dialect", type=click.Choice(DIALECT_CHOICES), default="auto", show_default=True,
              help="wire dialect; auto picks it from the version byte and section sizes")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per frame per line")
@click.option("-v", "--verbose", count=True, help="print every message")
@click.option("-i", "--interface", "ifname", callback=_check_ifname,
              help="read live from this interface (AF_PACKET)")
@click.option("--count", "max_count", type=click.IntRange(min=1), help="stop after N pfsync frames")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True),
              help="stop live capture after S seconds")
@click.option("--key", "key_path", type=click.Path(dir_okay=False),
              help="a daemon's --sync-key file: verify each frame's authenticator "
              "(ok, mac, keyid, none, replay)")
def dump(capture: str | None, dialect: str, as_json: bool, verbose: int, ifname: str | None,
         max_count: int | None, seconds: float | None, key_path: str | None = None) -> None:
    """Print every pfsync frame of CAPTURE (pcap/pcapng) or of a live interface."""
    keys = None
    if key_path is not None:
        from pfcluster.io.keyfile import load_key_file

        try:
            keys = load_key_file(key_path)
        except auth.KeyError_ as exc:
            raise CommandError(str(exc)) from None
    auth_view = AuthView(keys)
    if (capture is None) == (ifname is None):
        raise click.UsageError("give exactly one of CAPTURE or -i IF")
    if ifname is not None:
        if max_count is None and seconds is None:
            raise click.UsageError("live capture needs --count and/or --seconds")
        source: Iterator[PfsyncPacket] = _live(ifname, max_count, seconds)
    else:
        assert capture is not None
        source = iter_pfsync(capture)
    last_choice: str | None = None
    for n, pkt in enumerate(source):
        if max_count is not None and n >= max_count:
            break
        frame = auth_view.strip(pkt.payload, dialect)
        dec = (
            guess_dialect(frame, last_choice)
            if dialect == "auto"
            else _try(frame, dialect)
        )
        shown = auth_view.show(pkt.payload, dec.dialect)
        if dialect == "auto" and dec.dialect != last_choice:
            click.echo(f"dump: dialect {dec.dialect}", err=True)
            last_choice = dec.dialect
        extra: list[str] = []
        if pkt.ttl is not None and pkt.ttl != wire.PFSYNC_DFLTTL:
            has = dec.frame is not None and any(e.startswith("badttl") for e in dec.frame.errors)
            if not has:
                extra.append(f"badttl: ttl {pkt.ttl}")
        if as_json:
            obj = frame_dict(pkt, dec, extra)
            if shown is not None:
                obj["auth"] = shown
            click.echo(json.dumps(obj))
        else:
            text = frame_text(pkt, dec, verbose, extra)
            click.echo(text if shown is None else f"{text}\n{auth_line(shown)}")
