"""pfsync v5/v6 wire codecs, one table per dialect.

Every dialect is described by ONE table, ``action -> (name, record size, codec, check)``;
the frame walkers are shared, so the whole protocol of a dialect can be read in one
place (DESIGN.md, "tables, not switches"). Layouts follow
``reference/pfsync-wire-facts.md`` section 2; validation mirrors each dialect's
``pfsync_input`` (facts section 4) and names errors after the ``pfsyncstats`` counters.

Conventions (shared with dump, the engine and the tests):

* Numeric fields hold the integer the C field holds after byte-order conversion.
  ``id`` and ``creatorid`` are read big-endian (as tcpdump prints them), ports are host
  ints, ``rule``/``anchor`` keep the raw u32 (``signed32`` gives -1 back).
* Addresses are raw 16-byte ``pf_addr`` values (IPv4 in the first 4 bytes).
* ``af`` is the sender OS's number (``af_to_wire`` / ``af_from_wire`` convert).
* Padding is written as zero; a frame round-trips byte for byte when its pads are zero
  (as every sender writes them), except the 4.5 EOF body which is kept verbatim.

Decoding never raises anything but ``WireError``; per-message problems the receiver
counts as ``badval`` are appended to ``Frame.errors`` and the message index to
``Frame.invalid`` while decoding continues. The walkers check every length (header,
subheader, count * record size, EOF position) before they read, and nothing converts
other exceptions into ``WireError``: an IndexError or struct.error out of ``decode`` is a
bug in the walk, and the fuzzers (tests/test_wire_*fuzz.py) are there to see it.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pfcluster.pf.constants import IPPROTO_PFSYNC, PF_OUT, PF_TCPS_PROXY_DST, PFTM_MAX
from pfcluster.pfsync.layout import (
    ACT_EOF,
    ACTION_IDS,
    AF_INET6_WIRE,
    AF_INET_WIRE,
    DIALECTS,
    HEADER_FMT,
    HEADER_LEN,
    KEY_VALUES,
    KINDS,
    PEER_FMT,
    PEER_VALUES,
    STATE_LAYOUTS,
    SUBHEADER_FMT,
    SUBHEADER_LEN,
    VERSION,
    StateLayout,
    compile_generated,
)

__all__ = [
    "ACTIONS",
    "DIALECTS",
    "HEADER_LEN",
    "PFSYNC_DFLTTL",
    "STATE_FIELDS",
    "SUBHEADER_LEN",
    "VERSION",
    "Bus",
    "Clr",
    "Codec",
    "DelC",
    "Eof",
    "Frame",
    "InsAck",
    "IpEnvelope",
    "Message",
    "Section",
    "State",
    "StateKey",
    "StatePeer",
    "Tdb",
    "UpdC",
    "UpdReq",
    "WireError",
    "addr_from_str",
    "af_from_wire",
    "af_to_wire",
    "byte_view",
    "cstr",
    "decode",
    "decode_ip",
    "encode",
    "encode_ip",
    "make_ins_check",
    "peer_bad",
    "record_size",
    "signed32",
]

# DIALECTS, VERSION, HEADER_LEN and SUBHEADER_LEN are layout facts (pfsync.layout),
# re-exported here because callers know them as wire.*.
PFSYNC_DFLTTL = 255
IPTOS_LOWDELAY = 0x10
IP_DF = 0x4000


class WireError(ValueError):
    """The one exception decoders raise: ``reason`` is a pfsyncstats counter name
    (hdrops, badver, badlen, badact, ...), ``frame`` what decoded before the error."""

    def __init__(self, reason: str, detail: str = "", frame: Any = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.frame = frame


# --------------------------------------------------------------------------- helpers


def signed32(value: int) -> int:
    """The signed view of a raw u32 (``rule``/``anchor`` 0xffffffff -> -1)."""
    return value - 0x100000000 if value & 0x80000000 else value


def af_to_wire(dialect: str, socket_af: int) -> int:
    """Local ``socket.AF_*`` -> the sender OS's ``sa_family_t`` value on the wire."""
    if socket_af == socket.AF_INET:
        return AF_INET_WIRE
    if socket_af == socket.AF_INET6:
        return AF_INET6_WIRE[dialect]
    return socket_af


def af_from_wire(dialect: str, value: int) -> int | None:
    """Wire ``af`` byte -> local ``socket.AF_*``; None when it is neither family."""
    if value == AF_INET_WIRE:
        return socket.AF_INET
    if value == AF_INET6_WIRE.get(dialect, -1):
        return socket.AF_INET6
    return None


def addr_from_str(text: str) -> bytes:
    """Text address -> 16-byte pf_addr (IPv4 in the first 4 bytes, rest zero)."""
    a = ipaddress.ip_address(text)
    return a.packed.ljust(16, b"\0")


def byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """``data`` as a flat, contiguous view of unsigned bytes, what the walkers index and
    unpack: a view of format "b" or "c" would index as negative ints or as bytes (an
    IPv6 extension length byte 0xff read as -1 made split_ip loop forever), and a strided
    view cannot be unpacked from (BufferError). Plain bytes pass through uncopied."""
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1 or not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    return mv


def cstr(raw: bytes) -> str:
    """A NUL-padded C char array as text. latin-1 maps every byte, so a peer's ifname
    can never make decoding fail (and encodes back to the same bytes)."""
    return raw.split(b"\0", 1)[0].decode("latin-1")


# --------------------------------------------------------------------------- messages


class Message:
    """Base for the message records (here and in ``legacy``): field-wise equality and a
    readable repr.

    ``_fields`` lists every slot along the MRO (subclasses such as ``UpdReq`` add none),
    in C order.
    """

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls._fields = tuple(
            s for c in reversed(cls.__mro__) for s in c.__dict__.get("__slots__", ())
        )

    def __eq__(self, other: object) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in self._fields)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        body = ", ".join(f"{s}={getattr(self, s)!r}" for s in self._fields)
        return f"{type(self).__name__}({body})"


class StatePeer(Message):
    """struct pfsync_state_peer (with the scrub part flattened, C names kept)."""

    __slots__ = ("pfss_flags", "pfss_ttl", "scrub_flag", "pfss_ts_mod", "seqlo", "seqhi",  # noqa: RUF023 (C field order)
                 "seqdiff", "max_win", "mss", "state", "wscale")

    def __init__(self, pfss_flags: int = 0, pfss_ttl: int = 0, scrub_flag: int = 0,
                 pfss_ts_mod: int = 0, seqlo: int = 0, seqhi: int = 0, seqdiff: int = 0,
                 max_win: int = 0, mss: int = 0, state: int = 0, wscale: int = 0) -> None:
        self.pfss_flags = pfss_flags
        self.pfss_ttl = pfss_ttl
        self.scrub_flag = scrub_flag
        self.pfss_ts_mod = pfss_ts_mod
        self.seqlo = seqlo
        self.seqhi = seqhi
        self.seqdiff = seqdiff
        self.max_win = max_win
        self.mss = mss
        self.state = state
        self.wscale = wscale

    def astuple(self) -> tuple[int, ...]:
        return (self.pfss_flags, self.pfss_ttl, self.scrub_flag, self.pfss_ts_mod, self.seqlo,
                self.seqhi, self.seqdiff, self.max_win, self.mss, self.state, self.wscale)


class StateKey(Message):
    """struct pfsync_state_key: ``addr`` two raw pf_addr, ``port`` two host ints;
    ``rdomain``/``af`` exist on the wire only in openbsd6 (0 elsewhere)."""

    __slots__ = ("addr", "port", "rdomain", "af")  # noqa: RUF023 (C field order)

    def __init__(self, addr: list[bytes] | None = None, port: list[int] | None = None,
                 rdomain: int = 0, af: int = 0) -> None:
        self.addr = addr if addr is not None else [bytes(16), bytes(16)]
        self.port = port if port is not None else [0, 0]
        self.rdomain = rdomain
        self.af = af


class Clr(Message):
    """struct pfsync_clr."""

    __slots__ = ("ifname", "creatorid")  # noqa: RUF023 (C field order)

    def __init__(self, ifname: str = "", creatorid: int = 0) -> None:
        self.ifname = ifname
        self.creatorid = creatorid


class InsAck(Message):
    """struct pfsync_ins_ack."""

    __slots__ = ("id", "creatorid")  # noqa: RUF023 (C field order)

    def __init__(self, id: int = 0, creatorid: int = 0) -> None:
        self.id = id
        self.creatorid = creatorid


class UpdReq(InsAck):
    """struct pfsync_upd_req (id 0 + creatorid 0 asks for a bulk update)."""

    __slots__ = ()


class DelC(InsAck):
    """struct pfsync_del_c."""

    __slots__ = ()


class UpdC(Message):
    """struct pfsync_upd_c (``state_flags`` is a pad byte before openbsd6)."""

    __slots__ = ("id", "src", "dst", "creatorid", "expire", "timeout", "state_flags")  # noqa: RUF023 (C field order)

    def __init__(self, id: int = 0, src: StatePeer | None = None,
                 dst: StatePeer | None = None, creatorid: int = 0, expire: int = 0,
                 timeout: int = 0, state_flags: int = 0) -> None:
        self.id = id
        self.src = src if src is not None else StatePeer()
        self.dst = dst if dst is not None else StatePeer()
        self.creatorid = creatorid
        self.expire = expire
        self.timeout = timeout
        self.state_flags = state_flags


class Bus(Message):
    """struct pfsync_bus (status 1 START, 2 END)."""

    __slots__ = ("creatorid", "endtime", "status")

    def __init__(self, creatorid: int = 0, endtime: int = 0, status: int = 0) -> None:
        self.creatorid = creatorid
        self.endtime = endtime
        self.status = status


class Tdb(Message):
    """struct pfsync_tdb; ``dst`` is the raw 28-byte sockaddr_union, ``rdomain`` exists
    only in openbsd6 (a pad before)."""

    __slots__ = ("spi", "dst", "rpl", "cur_bytes", "sproto", "updates", "rdomain")  # noqa: RUF023 (C field order)

    def __init__(self, spi: int = 0, dst: bytes = bytes(28), rpl: int = 0, cur_bytes: int = 0,
                 sproto: int = 0, updates: int = 0, rdomain: int = 0) -> None:
        self.spi = spi
        self.dst = dst
        self.rpl = rpl
        self.cur_bytes = cur_bytes
        self.sproto = sproto
        self.updates = updates
        self.rdomain = rdomain


class Eof(Message):
    """struct pfsync_eof (4.5 only: 20 bytes, never written by the sender)."""

    __slots__ = ("hmac",)

    def __init__(self, hmac: bytes = bytes(20)) -> None:
        self.hmac = hmac


_STATE_DEFAULTS: dict[str, Any] = {
    "id": 0, "ifname": "", "key": None, "src": None, "dst": None, "rt_addr": bytes(16),
    "rule": 0xFFFFFFFF, "anchor": 0xFFFFFFFF, "nat_rule": 0xFFFFFFFF, "creation": 0,
    "expire": 0, "packets": None, "bytes": None, "creatorid": 0, "af": 0, "proto": 0,
    "direction": 0, "log": 0, "state_flags": 0, "timeout": 0, "sync_flags": 0, "updates": 0,
    "rtableid": None, "max_mss": 0, "min_ttl": 0, "set_tos": 0, "rt": 0, "set_prio": None,
    "qid": 0, "pqid": 0, "dnpipe": 0, "dnrpipe": 0, "rt_ifname": "", "spare": 0,
}
_LIST_DEFAULTS: dict[str, Callable[[], Any]] = {
    "key": lambda: [StateKey(), StateKey()],
    "src": StatePeer,
    "dst": StatePeer,
    "packets": lambda: [0, 0],
    "bytes": lambda: [0, 0],
    "rtableid": lambda: [0, 0],
    "set_prio": lambda: [0, 0],
}


class State(Message):
    """struct pfsync_state, the superset of all dialects' fields (C names).

    Fields a dialect's layout does not have keep their defaults (``STATE_FIELDS`` lists
    each dialect's fields in wire order). ``rtableid`` is ``[wire, stack]`` in openbsd6
    and a single int in freebsd1400; the encoders accept either form.
    """

    __slots__ = tuple(_STATE_DEFAULTS)

    def __init__(self, **fields: Any) -> None:  # replaced by _gen_state_init() below
        raise NotImplementedError
    id: int
    ifname: str
    key: list[StateKey]
    src: StatePeer
    dst: StatePeer
    rt_addr: bytes
    rule: int
    anchor: int
    nat_rule: int
    creation: int
    expire: int
    packets: list[int]
    bytes: list[int]
    creatorid: int
    af: int
    proto: int
    direction: int
    log: int
    state_flags: int
    timeout: int
    sync_flags: int
    updates: int
    rtableid: Any
    max_mss: int
    min_ttl: int
    set_tos: int
    rt: int
    set_prio: list[int]
    qid: int
    pqid: int
    dnpipe: int
    dnrpipe: int
    rt_ifname: str
    spare: int



def _gen_state_init() -> Callable[..., None]:
    """State.__init__ with one keyword per field, generated so that building a record
    (once per state in a bulk transfer) is plain attribute stores, not a setattr loop."""
    params, body = [], []
    for name in _STATE_DEFAULTS:
        params.append(f"{name}=_D_{name}")
        if name in _LIST_DEFAULTS:
            body.append(f"    self.{name} = _F_{name}() if {name} is _D_{name} else {name}")
        else:
            body.append(f"    self.{name} = {name}")
    src = f"def __init__(self, *, {', '.join(params)}):\n" + "\n".join(body) + "\n"
    env: dict[str, Any] = {}
    for name, default in _STATE_DEFAULTS.items():
        env[f"_D_{name}"] = default if name not in _LIST_DEFAULTS else _MISSING
        if name in _LIST_DEFAULTS:
            env[f"_F_{name}"] = _LIST_DEFAULTS[name]
    init: Callable[..., None] = compile_generated(src, "<pfsync-generated State.__init__>", env,
                                                  "__init__")
    init.__qualname__ = "State.__init__"
    init.__doc__ = "Keyword per C field; omitted fields take their defaults."
    return init


_MISSING: Any = object()
State.__init__ = _gen_state_init()  # type: ignore[method-assign]


class PackedRecord(bytes):
    """A message already in wire form (the pfsync engine packs states straight from the
    state table); `encode` copies it as is."""


class RawMessage(bytes):
    """Bytes of a message in a section the receiver skips (openbsd6 unknown action)."""


# --------------------------------------------------------------------------- codecs


def _AS_TUPLE(t: tuple[Any, ...]) -> tuple[Any, ...]:
    return t


class Codec:
    """One message layout: a precompiled Struct plus tuple <-> object converters. Public
    so that ``legacy`` builds its v4 codecs the same way."""

    __slots__ = ("cls", "from_tuple", "size", "st", "to_tuple")

    def __init__(self, fmt: str, cls: type, from_tuple: Callable[[tuple[Any, ...]], Any],
                 to_tuple: Callable[[Any], Sequence[Any]]) -> None:
        self.st = struct.Struct(fmt)
        self.size = self.st.size
        self.cls = cls
        self.from_tuple = from_tuple
        self.to_tuple = to_tuple

    def raw(self) -> Codec:
        """This layout decoding to plain tuples (for receivers that build their own
        objects from the fields, as the pfsync engine does for state records)."""
        return Codec(self.st.format, tuple, _AS_TUPLE, self.to_tuple)

    def decode_many(self, mv: memoryview, off: int, count: int, stride: int) -> list[Any]:
        """``count`` records every ``stride`` bytes from ``off``. The caller has checked
        that they lie inside ``mv`` (the walkers do, before every call); a read past the
        end is a walker bug and surfaces as struct.error, never as a WireError."""
        conv = self.from_tuple
        if conv is _AS_TUPLE:
            if stride == self.size:
                return list(self.st.iter_unpack(mv[off : off + count * stride]))
            return [self.st.unpack_from(mv, off + k * stride) for k in range(count)]
        if stride == self.size:
            return [conv(t) for t in self.st.iter_unpack(mv[off : off + count * stride])]
        unpack = self.st.unpack_from
        return [conv(unpack(mv, off + k * stride)) for k in range(count)]

    def encode_into(self, buf: bytearray, off: int, msg: Any) -> None:
        if msg.__class__ is PackedRecord:
            if len(msg) != self.size:
                raise WireError("encode", f"packed record of {len(msg)} bytes, expected {self.size}")
            buf[off : off + self.size] = msg
            return
        self.st.pack_into(buf, off, *self.to_tuple(msg))


def _id_creator_codec(cls: type) -> Codec:
    return Codec("!QI", cls, lambda t: cls(t[0], t[1]), lambda m: (m.id, m.creatorid))


def _clr_codec() -> Codec:
    return Codec("!16sI", Clr, lambda t: Clr(cstr(t[0]), t[1]),
                  lambda m: (m.ifname.encode("latin-1"), m.creatorid))


def _upd_c_codec(v6: bool) -> Codec:
    # id, then two peers of PEER_VALUES (11) values each: t[1:12] and t[12:23]
    if v6:
        fmt = "!Q" + PEER_FMT + PEER_FMT + "IIBB2x"

        def from_t(t: tuple[Any, ...]) -> UpdC:
            return UpdC(t[0], StatePeer(*t[1:12]), StatePeer(*t[12:23]), t[23], t[24], t[25],
                        t[26])

        def to_t(m: UpdC) -> tuple[Any, ...]:
            return (m.id, *m.src.astuple(), *m.dst.astuple(), m.creatorid, m.expire,
                    m.timeout, m.state_flags)
    else:
        fmt = "!Q" + PEER_FMT + PEER_FMT + "IIB3x"

        def from_t(t: tuple[Any, ...]) -> UpdC:
            return UpdC(t[0], StatePeer(*t[1:12]), StatePeer(*t[12:23]), t[23], t[24], t[25])

        def to_t(m: UpdC) -> tuple[Any, ...]:
            return (m.id, *m.src.astuple(), *m.dst.astuple(), m.creatorid, m.expire,
                    m.timeout)

    return Codec(fmt, UpdC, from_t, to_t)


def _bus_codec() -> Codec:
    return Codec("!IIB3x", Bus, lambda t: Bus(*t), lambda m: (m.creatorid, m.endtime, m.status))


def _tdb_codec(variant: str) -> Codec:
    """variant: "v5" (rpl u32, pad), "v6" (rpl u32, rdomain), "v6r64" (rpl u64, rdomain)."""
    rpl = "Q" if variant == "v6r64" else "I"
    tail = "2x" if variant == "v5" else "H"
    fmt = f"!I28s{rpl}QBB{tail}"
    if variant == "v5":
        return Codec(fmt, Tdb, lambda t: Tdb(*t),
                      lambda m: (m.spi, m.dst, m.rpl, m.cur_bytes, m.sproto, m.updates))
    return Codec(fmt, Tdb, lambda t: Tdb(*t),
                  lambda m: (m.spi, m.dst, m.rpl, m.cur_bytes, m.sproto, m.updates, m.rdomain))


def _eof_codec() -> Codec:
    return Codec("!20s", Eof, lambda t: Eof(t[0]), lambda m: (m.hmac,))


# The pfsync_state layouts live in pfsync.layout; the record's field names per dialect in
# wire order, as dump and the tests know them:
STATE_FIELDS: dict[str, tuple[str, ...]] = {d: lay.names for d, lay in STATE_LAYOUTS.items()}
# (attribute, kind) lists, the form tests/test_wire_roundtrip.py reads.
_STATE_LAYOUTS: dict[str, list[tuple[str, str]]] = {
    d: list(lay.fields) for d, lay in STATE_LAYOUTS.items()
}


def _state_codec(layout: StateLayout) -> Codec:
    """A codec for one pfsync_state layout, its two converters generated as straight-line
    code (unpacked tuple -> record, record -> tuple to pack): the loop over fields is
    unrolled once here instead of on every message. The functions are named and filed
    per layout (``state_from_tuple_openbsd45`` in ``<pfsync-generated state codec
    openbsd45>``) so a traceback shows which one and the line."""
    d = layout.dialect
    present = set(layout.names)
    dec = [f"def state_from_tuple_{d}(t):", "    st = new(State)"]
    for name, value in _STATE_DEFAULTS.items():
        if name in present:
            continue
        if name in _LIST_DEFAULTS:
            dec.append(f"    st.{name} = F_{name}()")
        else:
            dec.append(f"    st.{name} = {value!r}")
    enc_items: list[str] = []
    i = 0
    for attr, kind in layout.fields:
        if kind == "peer":
            dec.append(f"    st.{attr} = StatePeer(*t[{i}:{i + PEER_VALUES}])")
            enc_items.append(f"*m.{attr}.astuple()")
        elif kind in ("keys5", "keys6"):
            per = KEY_VALUES[kind]
            keys = []
            for k in (0, 1):
                v = [f"t[{i + k * per + j}]" for j in range(per)]
                keys.append(f"StateKey([{v[0]}, {v[1]}], [{v[2]}, {v[3]}]{''.join(', ' + x for x in v[4:])})")
                enc = [f"m.{attr}[{k}].addr[0]", f"m.{attr}[{k}].addr[1]",
                       f"m.{attr}[{k}].port[0]", f"m.{attr}[{k}].port[1]",
                       f"m.{attr}[{k}].rdomain", f"m.{attr}[{k}].af"]
                enc_items.append(", ".join(enc[:per]))
            dec.append(f"    st.{attr} = [{keys[0]}, {keys[1]}]")
        elif kind == "ifname":
            dec.append(f"    st.{attr} = cstr(t[{i}])")
            enc_items.append(f"m.{attr}.encode('latin-1')")
        elif kind in ("u64pair", "u8pair"):
            dec.append(f"    st.{attr} = [t[{i}], t[{i + 1}]]")
            enc_items.append(f"m.{attr}[0], m.{attr}[1]")
        elif kind == "i32pair":
            dec.append(f"    st.{attr} = [t[{i}], t[{i + 1}]]")
            enc_items.append(f"*pair(m.{attr})")
        elif kind == "i32":
            dec.append(f"    st.{attr} = t[{i}]")
            enc_items.append(f"one(m.{attr})")
        else:
            dec.append(f"    st.{attr} = t[{i}]")
            enc_items.append(f"m.{attr}")
        i += KINDS[kind].nvalues
    dec.append("    return st")
    enc_fn = [f"def state_to_tuple_{d}(m):", f"    return ({', '.join(enc_items)},)"]
    env: dict[str, Any] = {
        "new": State.__new__, "State": State, "StatePeer": StatePeer, "StateKey": StateKey,
        "cstr": cstr, "pair": _as_pair, "one": _as_one,
    }
    env.update({f"F_{n}": f for n, f in _LIST_DEFAULTS.items()})
    src = "\n".join(dec) + "\n\n" + "\n".join(enc_fn) + "\n"
    name = f"<pfsync-generated state codec {d}>"
    from_t = compile_generated(src, name, env, f"state_from_tuple_{d}")
    return Codec(layout.fmt, State, from_t, env[f"state_to_tuple_{d}"])


def _as_pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (v[0], v[1])


def _as_one(v: Any) -> int:
    return v if isinstance(v, int) else v[0]


# --------------------------------------------------------------------------- checks


def peer_bad(m: State | UpdC) -> str | None:
    """pfsync_input's badval test of an update (full or compressed; v4 ``StateUpd`` too):
    a timeout index or a peer TCP state out of range. The reason, or None if sound."""
    if m.timeout >= PFTM_MAX:
        return f"timeout {m.timeout}"
    if m.src.state > PF_TCPS_PROXY_DST:
        return f"src.state {m.src.state}"
    if m.dst.state > PF_TCPS_PROXY_DST:
        return f"dst.state {m.dst.state}"
    return None


def make_ins_check(dialect: str) -> Callable[[Any], str | None]:
    """The badval test of an inserted state as ``dialect`` receives it (``peer_bad`` plus
    direction and address family; openbsd6 also each key's af). v4 INS reuses 4.5's."""
    inet6 = AF_INET6_WIRE[dialect]
    v6 = dialect == "openbsd6"

    def check(m: State) -> str | None:
        bad = peer_bad(m)
        if bad:
            return bad
        if m.direction > PF_OUT:
            return f"direction {m.direction}"
        if m.af not in (AF_INET_WIRE, inet6):
            return f"af {m.af}"
        if v6:
            for k in m.key:
                if k.af and k.af not in (AF_INET_WIRE, inet6):
                    return f"key.af {k.af}"
        return None

    return check


# --------------------------------------------------------------------------- tables

# (name, record size, codec or None when unsupported, check or None)
Entry = tuple[str, int, "Codec | None", "Callable[[Any], str | None] | None"]

Spec = tuple[int, "Codec | None", "Callable[[Any], str | None] | None"]


def _entry(codec: Codec | None, check: Callable[[Any], str | None] | None = None) -> Spec:
    return (codec.size if codec is not None else 0, codec, check)


_UNSUPPORTED: Spec = (0, None, None)


def _build_tables() -> dict[str, dict[int, Entry]]:
    """Each dialect's action -> Entry table: what each message name is in that dialect,
    numbered by ``layout.ACTION_IDS``."""
    iack, ureq, delc = _id_creator_codec(InsAck), _id_creator_codec(UpdReq), _id_creator_codec(DelC)
    clr, bus = _entry(_clr_codec()), _entry(_bus_codec())
    common: dict[str, Spec] = {
        "CLR": clr, "INS_ACK": _entry(iack), "UPD_REQ": _entry(ureq), "DEL_C": _entry(delc),
        "INS_F": _UNSUPPORTED, "DEL_F": _UNSUPPORTED, "BUS": bus,
    }
    state = {d: _state_codec(STATE_LAYOUTS[d]) for d in DIALECTS}

    def v5(dialect: str, state: Codec, eof: Codec | None) -> dict[str, Spec]:
        return {
            **common,
            "INS": _entry(state, make_ins_check(dialect)),
            "UPD": _entry(state, peer_bad),
            "UPD_C": _entry(_upd_c_codec(False), peer_bad),
            "DEL": _entry(state),
            "TDB": _entry(_tdb_codec("v5")),
            "EOF": _entry(eof),
        }

    s1301 = state["freebsd1301"]
    ins14 = make_ins_check("freebsd1400")
    specs: dict[str, dict[str, Spec]] = {
        "openbsd45": v5("openbsd45", state["openbsd45"], _eof_codec()),
        "freebsd1301": v5("freebsd1301", s1301, None),
        # FreeBSD 14 keeps the 1301 record under 1/3 and for DEL; 13/14 carry the 1400 one
        "freebsd1400": {
            **v5("freebsd1400", s1301, None),
            "INS_1301": _entry(s1301, ins14),
            "UPD_1301": _entry(s1301, peer_bad),
            "INS": _entry(state["freebsd1400"], ins14),
            "UPD": _entry(state["freebsd1400"], peer_bad),
        },
        "openbsd6": {
            **common,
            "OINS": _UNSUPPORTED,
            "OUPD": _UNSUPPORTED,
            "UPD_C": _entry(_upd_c_codec(True), peer_bad),
            "DEL": _entry(state["openbsd6"]),
            "OTDB": (_tdb_codec("v6").size, None, None),  # known size, ignored
            "EOF": _UNSUPPORTED,
            "INS": _entry(state["openbsd6"], make_ins_check("openbsd6")),
            "UPD": _entry(state["openbsd6"], peer_bad),
            "TDB": _entry(_tdb_codec("v6r64")),
        },
    }
    return {
        d: {aid: (name, *specs[d][name]) for name, aid in ACTION_IDS[d].items()} for d in DIALECTS
    }


TABLES: dict[str, dict[int, Entry]] = _build_tables()
# The same tables with full state records left as unpacked tuples and unchecked: the
# pfsync engine validates and imports them in one step (convert.state_importer).
STATE_ACTIONS = frozenset(("INS", "UPD", "DEL", "INS_1301", "UPD_1301"))
RAW_STATE_TABLES: dict[str, dict[int, Entry]] = {
    d: {a: ((e[0], e[1], e[2].raw(), None) if e[0] in STATE_ACTIONS and e[2] is not None else e)
        for a, e in t.items()}
    for d, t in TABLES.items()
}
ACTIONS: dict[str, dict[str, int]] = {d: {e[0]: a for a, e in t.items()} for d, t in TABLES.items()}
ACTION_NAMES: dict[str, dict[int, str]] = {
    d: {a: e[0] for a, e in t.items()} for d, t in TABLES.items()
}

# tcpdump's PFSYNC_ACTIONS strings, for the text printer.
TCPDUMP_NAMES: dict[str, str] = {
    "CLR": "CLR ST", "INS": "INS ST", "INS_ACK": "INS ST ACK", "UPD": "UPD ST",
    "UPD_C": "UPD ST COMP", "UPD_REQ": "UPD ST REQ", "DEL": "DEL ST", "DEL_C": "DEL ST COMP",
    "INS_F": "INS FR", "DEL_F": "DEL FR", "BUS": "BULK UPD STAT", "TDB": "TDB UPD", "EOF": "EOF",
    "OINS": "INS ST OLD", "OUPD": "UPD ST OLD", "OTDB": "UPD TDB OLD",
    "INS_1301": "INS ST 1301", "UPD_1301": "UPD ST 1301",
}


def _table(dialect: str) -> dict[int, Entry]:
    try:
        return TABLES[dialect]
    except KeyError:
        raise WireError("baddialect", f"unknown dialect {dialect!r}") from None


def record_size(dialect: str, action: int | str) -> int:
    """Size in bytes of one message of ``action`` (number or name) in ``dialect``."""
    table = _table(dialect)
    if isinstance(action, str):
        action = ACTIONS[dialect][action]
    return table[action][1]


# --------------------------------------------------------------------------- frames


class Section:
    """One subheader and its messages.

    ``mlen`` is the openbsd6 per-message length when it differs from ours (None
    otherwise); ``skipped`` marks an openbsd6 section the receiver steps over (unknown
    action or short ``mlen``: its messages are ``RawMessage`` bytes); ``truncated``
    marks the section an error cut short (only in ``WireError.frame``).
    """

    __slots__ = ("action", "action_id", "count", "messages", "mlen", "skipped", "truncated")

    def __init__(self, action: str, action_id: int, count: int | None = None,
                 messages: list[Any] | None = None, mlen: int | None = None,
                 skipped: bool = False, truncated: bool = False) -> None:
        self.action = action
        self.action_id = action_id
        self.messages = messages if messages is not None else []
        self.count = len(self.messages) if count is None else count
        self.mlen = mlen
        self.skipped = skipped
        self.truncated = truncated

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Section):
            return NotImplemented
        return (self.action, self.action_id, self.count, self.messages, self.mlen,
                self.skipped) == (other.action, other.action_id, other.count, other.messages,
                                  other.mlen, other.skipped)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Section({self.action!r}, {self.action_id}, count={self.count}, "
                f"messages={self.messages!r})")


class Frame:
    """A decoded pfsync frame (pfsync_header + sections).

    ``len`` is the header's length field as received (``encode`` always recomputes it);
    ``errors`` holds per-message ``badval`` notes ("badval: INS[3] timeout 25") and, in a
    ``WireError.frame``, the fatal reason; ``invalid`` the (section, message) indices of
    messages a receiver would skip.
    """

    __slots__ = ("errors", "invalid", "len", "pfcksum", "sections", "version")

    def __init__(self, version: int = 5, len: int | None = None,
                 pfcksum: bytes = bytes(16), sections: list[Section] | None = None,
                 errors: list[str] | None = None,
                 invalid: list[tuple[int, int]] | None = None) -> None:
        self.version = version
        self.len = len
        self.pfcksum = pfcksum
        self.sections = sections if sections is not None else []
        self.errors = errors if errors is not None else []
        self.invalid = invalid if invalid is not None else []

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        if self.len is not None and other.len is not None and self.len != other.len:
            return False
        return (self.version, bytes(self.pfcksum), self.sections, self.errors) == (
            other.version, bytes(other.pfcksum), other.sections, other.errors)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Frame(version={self.version}, len={self.len}, sections={self.sections!r}, "
                f"errors={self.errors!r})")

    def messages(self, action: str) -> Iterable[Any]:
        """All messages of sections named ``action`` (convenience for the engine)."""
        for s in self.sections:
            if s.action == action and not s.skipped:
                yield from s.messages


_HEADER = struct.Struct(HEADER_FMT)
_SUBH = struct.Struct(SUBHEADER_FMT)


def decode(data: bytes | bytearray | memoryview, dialect: str = "openbsd45",
           raw_states: bool = False) -> Frame:
    """Decode a pfsync payload (starting at pfsync_header) as ``dialect`` sends it.

    Raises only ``WireError`` (reason = pfsyncstats name, ``.frame`` = partial frame).
    With ``raw_states`` the full state records (INS, UPD, DEL) come back as the unpacked
    field tuples of their layout, unchecked.
    """
    table = _table(dialect)
    if raw_states:
        table = RAW_STATE_TABLES[dialect]
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1 or not mv.c_contiguous:  # byte_view, inlined
        mv = byte_view(mv)
    total = len(mv)
    if total < HEADER_LEN:
        raise WireError("hdrops", f"{total} bytes, header needs {HEADER_LEN}")
    version, _pad, hlen, cksum = _HEADER.unpack_from(mv, 0)
    frame = Frame(version, hlen, cksum)
    want = VERSION[dialect]
    if version != want:
        frame.errors.append(f"badver: version {version}, expected {want}")
        raise WireError("badver", f"version {version}, expected {want}", frame)
    if hlen > total:
        # The receiver drops the packet; walk what arrived so the caller can show it.
        # Only WireError is expected here: anything else is a bug in the walk.
        try:
            if version == 6:
                _walk_v6(mv, total, frame, table)
            else:
                _walk_v5(mv, total, total, frame, table, dialect)
        except WireError:
            pass
        frame.invalid.clear()
        frame.errors[:] = [f"badlen: header len {hlen} > {total} bytes"]
        raise WireError("badlen", f"header len {hlen} > {total} bytes", frame)
    # The walkers bound every read by explicit length checks and raise WireError; no
    # other exception is converted, so a fuzzer sees a walk bug as the bug it is.
    try:
        if version == 6:
            _walk_v6(mv, hlen, frame, table)
        else:
            _walk_v5(mv, total, hlen, frame, table, dialect)
    except WireError as e:
        e.frame = frame
        frame.errors.append(str(e))
        raise
    return frame


def _check_section(frame: Frame, sec: Section, check: Callable[[Any], str | None]) -> None:
    si = len(frame.sections) - 1
    for mi, m in enumerate(sec.messages):
        bad = check(m)
        if bad:
            frame.errors.append(f"badval: {sec.action}[{mi}] {bad}")
            frame.invalid.append((si, mi))


def _walk_v5(mv: memoryview, total: int, hlen: int, frame: Frame, table: dict[int, Entry],
             dialect: str) -> None:
    """4.5: loop until EOF (reading past the packet = badlen, EOF not at the end =
    badact). FreeBSD: loop while a subheader fits in header.len; EOF ends the frame."""
    obsd = dialect == "openbsd45"
    end = total if obsd else hlen
    off = HEADER_LEN
    while True:
        if off + SUBHEADER_LEN > end:
            if obsd:
                raise WireError("badlen", f"no EOF: subheader at {off} beyond {end}")
            return
        action, _pad, count = _SUBH.unpack_from(mv, off)
        off += SUBHEADER_LEN
        entry = table.get(action)
        if entry is None:
            frame.sections.append(Section(f"ACT{action}", action, count, truncated=True))
            raise WireError("badact", f"unknown action {action} at {off - SUBHEADER_LEN}")
        name, size, codec, check = entry
        if name == "EOF":
            sec = Section(name, action, count)
            frame.sections.append(sec)
            if obsd:
                if off != total - size:
                    raise WireError("badact", f"EOF at {off}, packet ends at {total}")
                assert codec is not None
                sec.messages = codec.decode_many(mv, off, 1, size)
            elif off != total:
                raise WireError("badlen", f"EOF at {off}, packet ends at {total}")
            return
        if codec is None:
            frame.sections.append(Section(name, action, count, truncated=True))
            raise WireError("badact", f"{name} unsupported")
        need = size * count
        if off + need > end:
            fit = max(0, (end - off) // size) if size else 0
            msgs = codec.decode_many(mv, off, min(fit, count), size)
            frame.sections.append(Section(name, action, count, msgs, truncated=True))
            raise WireError("badlen", f"{name} count {count} needs {need} bytes, {end - off} left")
        sec = Section(name, action, count, codec.decode_many(mv, off, count, size))
        frame.sections.append(sec)
        if check is not None:
            _check_section(frame, sec, check)
        off += need


def _walk_v6(mv: memoryview, hlen: int, frame: Frame, table: dict[int, Entry]) -> None:
    """OpenBSD 4.8..2015: bounded by header.len; stride = the sender's subh.len; unknown
    actions or a too-short len are skipped when count and len are nonzero."""
    end = hlen
    off = HEADER_LEN
    while off + SUBHEADER_LEN <= end:
        action, dwords, count = _SUBH.unpack_from(mv, off)
        off += SUBHEADER_LEN
        mlen = dwords << 2
        entry = table.get(action)
        name = entry[0] if entry else f"ACT{action}"
        codec = entry[2] if entry else None
        size = entry[1] if entry else 0
        if entry is None or (codec is not None and mlen < size):
            if count > 0 and mlen > 0:
                need = count * mlen
                if off + need > end:
                    frame.sections.append(Section(name, action, count, mlen=mlen, skipped=True,
                                                  truncated=True))
                    raise WireError(
                        "badlen", f"skipped {name} needs {need} bytes, {end - off} left"
                    )
                raw = [RawMessage(mv[off + k * mlen : off + (k + 1) * mlen]) for k in range(count)]
                frame.sections.append(Section(name, action, count, raw, mlen=mlen, skipped=True))
                off += need
                continue
            frame.sections.append(Section(name, action, count, mlen=mlen, truncated=True))
            raise WireError("badact", f"action {action} len {mlen} count {count}")
        if codec is None:
            frame.sections.append(Section(name, action, count, mlen=mlen, truncated=True))
            raise WireError("badact", f"{name} deprecated")
        need = mlen * count
        if off + need > end:
            fit = max(0, (end - off) // mlen) if mlen else 0
            msgs = codec.decode_many(mv, off, min(fit, count), mlen)
            frame.sections.append(Section(name, action, count, msgs,
                                          mlen=None if mlen == size else mlen, truncated=True))
            raise WireError("badlen", f"{name} count {count} needs {need} bytes, {end - off} left")
        sec = Section(name, action, count, codec.decode_many(mv, off, count, mlen),
                      mlen=None if mlen == size else mlen)
        frame.sections.append(sec)
        if entry[3] is not None:
            _check_section(frame, sec, entry[3])
        off += need


def _section_layout(sec: Section, table: dict[int, Entry], v6: bool) -> tuple[int, int, Any]:
    """(message stride, count to write, codec or None for raw) for encoding a section."""
    entry = table.get(sec.action_id)
    if sec.skipped or entry is None or entry[2] is None:
        if not v6 and entry is not None and entry[0] == "EOF":
            return 0, sec.count, None
        stride = sec.mlen if sec.mlen is not None else (len(sec.messages[0]) if sec.messages else 0)
        return stride, len(sec.messages) if sec.messages else sec.count, None
    size = entry[1]
    stride = sec.mlen if (v6 and sec.mlen is not None) else size
    if size == 0:  # FreeBSD EOF: subheader only
        return 0, sec.count, None
    return stride, len(sec.messages), entry[2]


def encode(frame: Frame, dialect: str = "openbsd45") -> bytes:
    """Encode ``frame`` as ``dialect`` sends it; header.len is recomputed. v5 dialects
    get an EOF section appended when the frame does not end with one."""
    table = _table(dialect)
    v6 = VERSION[dialect] == 6
    sections = list(frame.sections)
    if not v6 and (not sections or sections[-1].action_id != ACT_EOF):
        eof = Section("EOF", ACT_EOF, 1, [Eof()] if dialect == "openbsd45" else [])
        sections.append(eof)
    plan = []
    total = HEADER_LEN
    for sec in sections:
        stride, count, codec = _section_layout(sec, table, v6)
        if v6 and stride & 3:
            raise WireError("encode", f"{sec.action}: message length {stride} not a dword multiple")
        n = len(sec.messages) if (codec is not None or sec.messages) else 0
        plan.append((sec, stride, count, codec, n))
        total += SUBHEADER_LEN + stride * n
    if total > 0xFFFF:
        raise WireError("encode", f"frame of {total} bytes exceeds 65535")
    buf = bytearray(total)
    try:
        _HEADER.pack_into(buf, 0, VERSION[dialect], 0, total, bytes(frame.pfcksum))
        off = HEADER_LEN
        for sec, stride, count, codec, n in plan:
            _SUBH.pack_into(buf, off, sec.action_id, (stride >> 2) if v6 else 0, count)
            off += SUBHEADER_LEN
            if codec is not None:
                enc = codec.encode_into
                for m in sec.messages:
                    enc(buf, off, m)
                    off += stride
            else:
                for m in sec.messages[:n]:
                    raw = bytes(m.hmac) if isinstance(m, Eof) else bytes(m)
                    buf[off : off + len(raw[:stride])] = raw[:stride]
                    off += stride
    except (struct.error, AttributeError, TypeError, IndexError, UnicodeError) as e:
        raise WireError("encode", f"{type(e).__name__}: {e}") from None
    return bytes(buf)


# --------------------------------------------------------------------------- IP envelope


class IpEnvelope(Message):
    """What the IP header said: addresses as text, ``ttl`` (hop limit for IPv6)."""

    __slots__ = ("version", "src", "dst", "ttl", "tos", "proto", "ident", "df", "hlen",  # noqa: RUF023 (C field order)
                 "total_len")

    def __init__(self, version: int, src: str, dst: str, ttl: int, tos: int = 0, proto: int = 240,
                 ident: int = 0, df: bool = False, hlen: int = 20, total_len: int = 0) -> None:
        self.version = version
        self.src = src
        self.dst = dst
        self.ttl = ttl
        self.tos = tos
        self.proto = proto
        self.ident = ident
        self.df = df
        self.hlen = hlen
        self.total_len = total_len


_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_IP6_EXT = (0, 43, 60)  # hop-by-hop, routing, destination options


def split_ip(data: bytes | bytearray | memoryview) -> tuple[IpEnvelope, memoryview]:
    """Parse an IPv4/IPv6 header -> (envelope, payload view trimmed to the IP length).

    Raises WireError("hdrops") when the header does not fit.
    """
    mv = byte_view(data)
    if len(mv) < 1:
        raise WireError("hdrops", "empty packet")
    ver = mv[0] >> 4
    if ver == 4:
        if len(mv) < 20:
            raise WireError("hdrops", f"IPv4 header needs 20 bytes, have {len(mv)}")
        vhl, tos, tlen, ident, frag, ttl, proto, _ck, src, dst = _IP4.unpack_from(mv, 0)
        hl = (vhl & 0x0F) * 4
        if hl < 20 or hl > len(mv):
            raise WireError("hdrops", f"IPv4 header length {hl}")
        end = min(len(mv), tlen) if tlen >= hl else len(mv)
        env = IpEnvelope(4, socket.inet_ntop(socket.AF_INET, bytes(src)),
                         socket.inet_ntop(socket.AF_INET, bytes(dst)), ttl, tos, proto, ident,
                         bool(frag & IP_DF), hl, tlen)
        return env, mv[hl:end]
    if ver == 6:
        if len(mv) < 40:
            raise WireError("hdrops", f"IPv6 header needs 40 bytes, have {len(mv)}")
        vtf, plen, nxt, hlim, src, dst = _IP6.unpack_from(mv, 0)
        end = min(len(mv), 40 + plen)
        off = 40
        while nxt in _IP6_EXT:
            if off + 8 > end:
                raise WireError("hdrops", "IPv6 extension header truncated")
            nxt, elen = mv[off], (mv[off + 1] + 1) * 8
            off += elen
        if off > end:
            raise WireError("hdrops", "IPv6 extension header truncated")
        env = IpEnvelope(6, socket.inet_ntop(socket.AF_INET6, bytes(src)),
                         socket.inet_ntop(socket.AF_INET6, bytes(dst)), hlim,
                         (vtf >> 20) & 0xFF, nxt, 0, False, off, 40 + plen)
        return env, mv[off:end]
    raise WireError("hdrops", f"not IP (version nibble {ver})")


def decode_ip(
    data: bytes | bytearray | memoryview, dialect: str = "openbsd45"
) -> tuple[IpEnvelope, Frame]:
    """Decode an IP packet carrying pfsync. A TTL other than 255 is noted as
    ``badttl`` in ``frame.errors`` (the receiver would drop it) but still decoded."""
    env, payload = split_ip(data)
    if env.proto != IPPROTO_PFSYNC:
        raise WireError("badproto", f"IP protocol {env.proto}, not {IPPROTO_PFSYNC}")
    try:
        frame = decode(payload, dialect)
    except WireError as e:
        if e.frame is not None and env.ttl != PFSYNC_DFLTTL:
            e.frame.errors.insert(0, f"badttl: ttl {env.ttl}")
        raise
    if env.ttl != PFSYNC_DFLTTL:
        frame.errors.insert(0, f"badttl: ttl {env.ttl}")
    return env, frame


def _ip_checksum(hdr: bytes | bytearray) -> int:
    s = sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def encode_ip(frame: Frame, dialect: str, src: str, dst: str, ttl: int = PFSYNC_DFLTTL,
              ident: int = 0) -> bytes:
    """The frame in an IP packet as pfsync sends it: IPv4 tos 0x10, DF, TTL 255, proto
    240, no options; IPv6 next header 240, hop limit ``ttl``."""
    payload = encode(frame, dialect)
    a_src, a_dst = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a_src.version != a_dst.version:
        raise WireError("encode", "src and dst address families differ")
    if a_src.version == 4:
        hdr = bytearray(_IP4.pack(0x45, IPTOS_LOWDELAY, 20 + len(payload), ident & 0xFFFF, IP_DF,
                                  ttl, IPPROTO_PFSYNC, 0, a_src.packed, a_dst.packed))
        struct.pack_into("!H", hdr, 10, _ip_checksum(hdr))
        return bytes(hdr) + payload
    hdr6 = _IP6.pack(6 << 28, len(payload), IPPROTO_PFSYNC, ttl, a_src.packed, a_dst.packed)
    return hdr6 + payload
