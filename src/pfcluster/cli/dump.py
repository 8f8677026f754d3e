"""`pfcluster dump`: print the pfsync frames of a capture (or a live interface).

Text output follows OpenBSD tcpdump's pfsync printer (``PFSYNCv5 len N``, one
``act NAME count N`` line per section, messages with ``-v``, states in ``pfctl -ss -v``
style); ``--json`` prints one object per frame per line with the keys DESIGN.md fixes.
A frame that fails to decode prints what decoded plus the reason, then dumping goes on.

Live (``-i IF``) it runs like tcpdump: frames print as they arrive until Ctrl-C or SIGTERM
(or ``-c N`` / ``--seconds S``), then one stderr line says how many were seen; ``-w FILE``
saves them as pcap instead; ``--action`` / ``--creatorid`` keep only matching frames (in
files too). ``FrameVerdict`` is the hook a sync-key check plugs into (``make_verdict``).

A capture that cannot be read (missing, unreadable, empty, not pcap/pcapng, unsupported
link type) prints one line `pfcluster dump: FILE: problem` and exits 1. A capture cut
inside a record prints every frame before the cut, then that line (`FILE: truncated dump
file: ...`), exit status 1, as tcpdump does. A live interface that does not exist or
cannot be opened: `pfcluster dump: IF: problem`, exit 1.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import click

from pfcluster.cli.errors import CommandError, ReportingCommand
from pfcluster.io.capture import (
    LINKTYPE_ETHERNET,
    CaptureError,
    PfsyncPacket,
    iter_pfsync,
    pfsync_from_record,
)
from pfcluster.io.pcapwrite import PcapWriter
from pfcluster.packet import addr_str
from pfcluster.pf import pfctl
from pfcluster.pfsync import auth, legacy, wire
from pfcluster.pfsync.layout import STATE_LAYOUTS

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


def record_layout(dialect: str, action_id: int | None) -> str:
    """The dialect whose pfsync_state layout a section's records use: freebsd1400 keeps
    the 1301 record under INS_1301, UPD_1301 and DEL (the sizes tell them apart)."""
    wd = dialect if dialect in wire.DIALECTS else "openbsd45"
    entry = wire.TABLES[wd].get(action_id) if action_id is not None else None
    if entry is not None:
        for d, lay in STATE_LAYOUTS.items():
            if lay.size == entry[1]:
                return d
    return wd


def _state_dict(st: wire.State, dialect: str, action_id: int | None) -> dict[str, Any]:
    wd = dialect if dialect in wire.DIALECTS else "openbsd45"
    af = wire.af_from_wire(wd, st.af)
    out: dict[str, Any] = {}
    for name in wire.STATE_FIELDS[record_layout(wd, action_id)]:
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


def message_dict(msg: Any, dialect: str, action_id: int | None = None) -> Any:
    """A message as JSON-able data with the C field names (DESIGN.md JSON rules); a state
    record shows the fields of the layout its section carries."""
    if isinstance(msg, wire.State):
        return _state_dict(msg, dialect, action_id)
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
                              "messages": [message_dict(m, dec.dialect, s.action_id)
                                           for m in s.messages]}
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


# --------------------------------------------------------------------------- hooks

FrameVerdict = Callable[[bytes], "str | None"]
"""A per-frame judgement on the pfsync payload (from pfsync_header on): a short string
shown with the frame ("auth ok", "auth bad: ..."), or None to say nothing."""


def no_verdict(payload: bytes) -> str | None:
    """The hook while no key is given: nothing to say about any frame.

    The authenticated-sync work plugs in here: ``make_verdict`` returns a closure that
    checks the EOF authenticator of each frame with the sync key.
    """
    return None


def make_verdict() -> FrameVerdict:
    """The verdict hook for this run (a key option will choose a verifying one)."""
    return no_verdict


# --------------------------------------------------------------------------- filters


def _action_names() -> frozenset[str]:
    return frozenset(n for names in wire.ACTIONS.values() for n in names)


def _check_actions(ctx: click.Context, param: click.Parameter,
                   value: tuple[str, ...]) -> frozenset[str]:
    known = _action_names()
    out = set()
    for v in value:
        name = v.upper()
        if name not in known:
            raise click.BadParameter(f"{v!r}: not a pfsync action (one of "
                                     f"{', '.join(sorted(known))})")
        out.add(name)
    return frozenset(out)


def _check_creatorids(ctx: click.Context, param: click.Parameter,
                      value: tuple[str, ...]) -> frozenset[int]:
    out = set()
    for v in value:
        text = v[2:] if v.lower().startswith("0x") else v
        try:
            n = int(text, 16)
        except ValueError:
            n = -1
        if not 0 <= n <= 0xFFFFFFFF or not text:
            raise click.BadParameter(f"{v!r}: not a 32-bit hex creator id (e.g. c0ffee01)")
        out.add(n)
    return frozenset(out)


def frame_matches(dec: Decoded, actions: frozenset[str], creatorids: frozenset[int]) -> bool:
    """Whether a decoded frame passes the filters: some section of one of ``actions``
    and some message from one of ``creatorids`` (an empty set passes everything)."""
    f = dec.frame
    if f is None:
        return not actions and not creatorids
    if isinstance(f, legacy.V4Frame):
        names = {f.action_name}
        messages: list[Any] = list(f.messages)
    else:
        names = {s.action for s in f.sections}
        messages = [m for s in f.sections for m in s.messages]
    if actions and not names & actions:
        return False
    if creatorids:
        return any(getattr(m, "creatorid", None) in creatorids for m in messages)
    return True


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


class Captured(NamedTuple):
    """A pfsync frame seen live, with the raw link-layer bytes ``-w`` saves."""

    linktype: int
    raw: bytes
    pkt: PfsyncPacket


class Stopped(Exception):
    """SIGINT or SIGTERM arrived: stop, say how many frames were seen, exit 0."""


def _on_stop_signal(signum: int, frame: Any) -> None:
    raise Stopped


class LiveCapture:
    """An AF_PACKET socket on one interface (needs CAP_NET_RAW); ``linktype`` is the
    pcap link type of what it reads (Ethernet, or raw IP for tun-like devices)."""

    __slots__ = ("ifname", "linktype", "sock")

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        eth_p_all = 0x0003
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(eth_p_all))
        except OSError as exc:
            raise CaptureError(ifname, f"cannot open a packet socket: {exc.strerror or exc} "
                                       "(needs CAP_NET_RAW)") from exc
        try:
            self.sock.bind((ifname, 0))
        except OSError as exc:
            self.sock.close()
            raise CaptureError(ifname, exc.strerror or str(exc)) from exc
        hatype = self.sock.getsockname()[3]
        self.linktype = LINKTYPE_ETHERNET if hatype in (1, 772) else 101

    def frames(self, seconds: float | None) -> Iterator[Captured]:
        """pfsync frames as they arrive, until ``seconds`` have passed (or forever)."""
        deadline = time.monotonic() + seconds if seconds is not None else None
        while True:
            wait = 1.0
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return
            self.sock.settimeout(min(wait, 1.0))
            try:
                buf = self.sock.recv(262144)
            except TimeoutError:
                continue
            except OSError as exc:  # e.g. ENETDOWN: the interface went away
                raise CaptureError(self.ifname, exc.strerror or str(exc)) from exc
            pkt = pfsync_from_record(time.time(), self.linktype, buf)
            if pkt is not None:
                yield Captured(self.linktype, buf, pkt)

    def close(self) -> None:
        self.sock.close()


def _check_ifname(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and (not 0 < len(value.encode()) < 16
                              or any(c in "\0/" or c.isspace() for c in value)):
        raise click.BadParameter(f"{value!r}: not an interface name (1..15 bytes, no NUL, "
                                 "slash or blanks)")
    return value


class _Printer:
    """Decodes, filters and prints frames; counts what it saw and showed."""

    __slots__ = ("actions", "as_json", "auth_view", "creatorids", "dialect", "last_choice",
                 "seen", "shown", "verbose", "verdict")

    def __init__(self, dialect: str, as_json: bool, verbose: int, actions: frozenset[str],
                 creatorids: frozenset[int], verdict: FrameVerdict,
                 auth_view: AuthView | None = None) -> None:
        self.auth_view = auth_view or AuthView(None)
        self.dialect = dialect
        self.as_json = as_json
        self.verbose = verbose
        self.actions = actions
        self.creatorids = creatorids
        self.verdict = verdict
        self.last_choice: str | None = None
        self.seen = 0
        self.shown = 0

    def take(self, pkt: PfsyncPacket, echo: bool = True) -> bool:
        """Decode ``pkt``; print it when it passes the filters (and ``echo``). Returns
        whether it passed."""
        self.seen += 1
        dialect = self.dialect
        frame = self.auth_view.strip(pkt.payload, dialect)
        dec = guess_dialect(frame, self.last_choice) if dialect == "auto" \
            else _try(frame, dialect)
        if not frame_matches(dec, self.actions, self.creatorids):
            return False
        self.shown += 1
        if not echo:
            return True
        if dialect == "auto" and dec.dialect != self.last_choice:
            click.echo(f"dump: dialect {dec.dialect}", err=True)
            self.last_choice = dec.dialect
        extra: list[str] = []
        if pkt.ttl is not None and pkt.ttl != wire.PFSYNC_DFLTTL:
            has = dec.frame is not None and any(e.startswith("badttl") for e in dec.frame.errors)
            if not has:
                extra.append(f"badttl: ttl {pkt.ttl}")
        said = self.verdict(pkt.payload)
        shown = self.auth_view.show(pkt.payload, dec.dialect)
        if self.as_json:
            obj = frame_dict(pkt, dec, extra)
            if said is not None:
                obj["verdict"] = said
            if shown is not None:
                obj["auth"] = shown
            click.echo(json.dumps(obj))
        else:
            text = frame_text(pkt, dec, self.verbose, extra)
            if said is not None:
                head, sep, rest = text.partition("\n")
                text = f"{head} [{said}]{sep}{rest}"
            click.echo(text if shown is None else f"{text}\n{auth_line(shown)}")
        return True


def _run_live(ifname: str, printer: _Printer, max_count: int | None, seconds: float | None,
              write: str | None, also_print: bool) -> None:
    """Print (or save) frames until -c/--seconds is reached or SIGINT/SIGTERM arrives,
    then say how many were seen, as tcpdump does."""
    cap = LiveCapture(ifname)
    writer: PcapWriter | None = None
    # both set explicitly, as tcpdump does: a shell starts background jobs with SIGINT
    # ignored, and Python then never raises KeyboardInterrupt
    old = {sig: signal.signal(sig, _on_stop_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            if write is not None:
                writer = PcapWriter(write, cap.linktype)
            click.echo(f"dump: listening on {ifname}, link type "
                       f"{'EN10MB' if cap.linktype == LINKTYPE_ETHERNET else 'RAW'}", err=True)
            for got in cap.frames(seconds):
                if not printer.take(got.pkt, echo=writer is None or also_print):
                    continue
                if writer is not None:
                    writer.write(got.pkt.ts, got.raw)
                sys.stdout.flush()
                if max_count is not None and printer.shown >= max_count:
                    break
        except Stopped:
            pass
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        cap.close()
        if writer is not None:
            writer.close()
    filtered = printer.seen - printer.shown
    click.echo(f"dump: {printer.seen} pfsync frame{'s' if printer.seen != 1 else ''} seen"
               + (f", {filtered} filtered out" if filtered else "")
               + (f", {printer.shown} written to {write}" if write else ""), err=True)


@click.command("dump", cls=ReportingCommand)
@click.argument("capture", required=False, type=click.Path())
@click.option("--dialect", type=click.Choice(DIALECT_CHOICES), default="auto", show_default=True,
              help="wire dialect; auto picks it from the version byte and section sizes")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per frame per line")
@click.option("-v", "--verbose", count=True, help="print every message")
@click.option("-i", "--interface", "ifname", callback=_check_ifname,
              help="read live from this interface (AF_PACKET) until Ctrl-C or SIGTERM")
@click.option("-c", "--count", "max_count", type=click.IntRange(min=1),
              help="stop after N frames (that pass the filters)")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True),
              help="stop live capture after S seconds")
@click.option("-w", "write", type=click.Path(dir_okay=False),
              help="live: save the frames (that pass the filters) to this pcap file instead "
                   "of printing them")
@click.option("--print", "also_print", is_flag=True, help="with -w: print the frames as well")
@click.option("--action", "actions", multiple=True, callback=_check_actions,
              help="only frames with a section of this action (INS, UPD_C, BUS, ...); repeatable")
@click.option("--creatorid", "creatorids", multiple=True, callback=_check_creatorids,
              help="only frames with a message from this creator id (hex); repeatable")
@click.option("--key", "key_path", type=click.Path(dir_okay=False),
              help="a daemon's --sync-key file: verify each frame's authenticator "
              "(ok, mac, keyid, none, replay)")
def dump(capture: str | None, dialect: str, as_json: bool, verbose: int, ifname: str | None,
         max_count: int | None, seconds: float | None, write: str | None, also_print: bool,
         actions: frozenset[str], creatorids: frozenset[int],
         key_path: str | None = None) -> None:
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
    printer = _Printer(dialect, as_json, verbose, actions, creatorids, make_verdict(), auth_view)
    if ifname is not None:
        _run_live(ifname, printer, max_count, seconds, write, also_print)
        return
    if write is not None or seconds is not None:
        raise click.UsageError("-w and --seconds go with -i IF")
    assert capture is not None
    for pkt in iter_pfsync(capture):
        if printer.take(pkt) and max_count is not None and printer.shown >= max_count:
            break
