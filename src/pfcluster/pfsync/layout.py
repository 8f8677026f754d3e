"""The pfsync wire layout: the one place that says what the bytes are.

Everything here is a fact about the wire, not code that reads it:

* the frame: header and subheader sizes, the header version of each dialect, and the
  action numbers (``PFSYNC_ACT_*``) each dialect gives its message types;
* the ``pfsync_state`` record: the field kinds (struct format + how many unpacked values
  each yields), the per-dialect layouts with the ``pfvar.h`` revision each follows, and
  where every field lands in the unpacked tuple (``STATE_INDEX``);
* the parts of a record: the 32-byte ``pfsync_state_peer`` and the two
  ``pfsync_state_key`` slots, with named positions for their values.

Who uses it: ``wire`` builds its codecs and action tables from it, ``convert`` generates
its state importer/packer from it, ``legacy`` (pfsync v4) reuses the peer layout, and the
engine reads unpacked state tuples at ``STATE_INDEX`` positions. It imports nothing from
the rest of the package, so it reads (and imports) on its own.

Facts: ``reference/pfsync-wire-facts.md`` sections 1.1 (action numbers) and 2.3/2.4
(state parts and records). ``compile_generated`` lives here too because every generated
function in pfsync is unrolled from these layouts; it gives each one a real file name in
``linecache`` so tracebacks and profilers show the generated line.
"""

from __future__ import annotations

import linecache
import struct
from typing import Any, NamedTuple

__all__ = [
    "ACTION_IDS",
    "ACT_EOF",
    "AF_INET6_WIRE",
    "AF_INET_WIRE",
    "DIALECTS",
    "HEADER_FMT",
    "HEADER_LEN",
    "KEY_ADDR0",
    "KEY_ADDR1",
    "KEY_AF",
    "KEY_PORT0",
    "KEY_PORT1",
    "KEY_RDOMAIN",
    "KEY_VALUES",
    "KINDS",
    "PEER_FIELDS",
    "PEER_FMT",
    "PEER_SCRUB_VALUES",
    "PEER_STATE",
    "PEER_TCP_FIELDS",
    "PEER_VALUES",
    "STATE_INDEX",
    "STATE_LAYOUTS",
    "SUBHEADER_FMT",
    "SUBHEADER_LEN",
    "VERSION",
    "Kind",
    "StateIndex",
    "StateLayout",
    "compile_generated",
]

# --------------------------------------------------------------------------- frame

DIALECTS = ("openbsd45", "freebsd1301", "freebsd1400", "openbsd6")
"""The wire dialects, in the order DESIGN.md lists them."""

VERSION = {"openbsd45": 5, "freebsd1301": 5, "freebsd1400": 5, "openbsd6": 6}
"""``pfsync_header.version`` each dialect sends (FreeBSD never left 5)."""

HEADER_FMT = "!BBH16s"
"""struct pfsync_header: version, pad, len (whole frame), pfcksum[16]."""
HEADER_LEN = struct.calcsize(HEADER_FMT)  # 20

SUBHEADER_FMT = "!BBH"
"""struct pfsync_subheader: action, pad (openbsd6: len in dwords), count."""
SUBHEADER_LEN = struct.calcsize(SUBHEADER_FMT)  # 4

AF_INET_WIRE = 2
"""``sa_family_t`` of IPv4 on every sender."""
AF_INET6_WIRE = {"openbsd45": 24, "openbsd6": 24, "freebsd1301": 28, "freebsd1400": 28}
"""``sa_family_t`` of IPv6 as the sending OS numbers it (the record carries it raw)."""

_ACT_V5 = ("CLR", "INS", "INS_ACK", "UPD", "UPD_C", "UPD_REQ", "DEL", "DEL_C",
           "INS_F", "DEL_F", "BUS", "TDB", "EOF")
_ACT_V6 = ("CLR", "OINS", "INS_ACK", "OUPD", "UPD_C", "UPD_REQ", "DEL", "DEL_C",
           "INS_F", "DEL_F", "BUS", "OTDB", "EOF", "INS", "UPD", "TDB")
_ACT_F14 = (*({"INS": "INS_1301", "UPD": "UPD_1301"}.get(n, n) for n in _ACT_V5), "INS", "UPD")

ACTION_IDS: dict[str, dict[str, int]] = {
    # OpenBSD 4.5 if_pfsync.h (the thesis), kept unchanged by FreeBSD <= 13.
    "openbsd45": {n: i for i, n in enumerate(_ACT_V5)},
    "freebsd1301": {n: i for i, n in enumerate(_ACT_V5)},
    # FreeBSD 14: 1/3 keep the 1301 record, 13/14 carry the 1400 one (names as ours).
    "freebsd1400": {n: i for i, n in enumerate(_ACT_F14)},
    # OpenBSD >= 2018 (if_pfsync.h 1.54): 1/3/11 deprecated, INS/UPD 13/14, TDB 15.
    "openbsd6": {n: i for i, n in enumerate(_ACT_V6)},
}
"""Action name -> ``PFSYNC_ACT_*`` number, per dialect (facts section 1.1). The codec
tables in ``wire`` are keyed by these numbers."""

ACT_EOF = 12
"""PFSYNC_ACT_EOF in every dialect: the v5 dialects end each frame with it."""
assert all(ids["EOF"] == ACT_EOF for ids in ACTION_IDS.values())

# --------------------------------------------------------------------------- parts

PEER_FMT = "HBBIIIIHHBB6x"
"""struct pfsync_state_peer (32 bytes): the scrub part, then the TCP window part."""
PEER_FIELDS = ("pfss_flags", "pfss_ttl", "scrub_flag", "pfss_ts_mod", "seqlo", "seqhi",
               "seqdiff", "max_win", "mss", "state", "wscale")
"""The values a peer unpacks to, in C order (``wire.StatePeer`` takes them so)."""
PEER_VALUES = len(PEER_FIELDS)  # 11
PEER_SCRUB_VALUES = 4
"""The scrub values lead the peer; pf's own ``Peer`` starts after them."""
PEER_TCP_FIELDS = PEER_FIELDS[PEER_SCRUB_VALUES:]
"""The peer values a pf state keeps (seqlo .. wscale)."""
PEER_STATE = PEER_FIELDS.index("state")  # 9
"""Position of the TCP state byte inside a peer's values (pfsync checks it)."""

# Positions inside one pfsync_state_key's values. A "keys5" slot has the first four,
# a "keys6" slot (OpenBSD >= 4.8) all six; the two keys (wire, stack) follow each other.
KEY_ADDR0 = 0
KEY_ADDR1 = 1
KEY_PORT0 = 2
KEY_PORT1 = 3
KEY_RDOMAIN = 4
KEY_AF = 5
KEY_VALUES = {"keys5": KEY_PORT1 + 1, "keys6": KEY_AF + 1}
"""Values of ONE key in each key kind (a state has two keys, wire then stack)."""


class Kind(NamedTuple):
    """How one layout field is stored: its struct format and how many values it
    unpacks to (a peer unpacks to 11, the two keys to 8 or 12)."""

    fmt: str
    nvalues: int


KINDS: dict[str, Kind] = {
    "u8": Kind("B", 1), "u16": Kind("H", 1), "u32": Kind("I", 1), "i32": Kind("i", 1),
    "u64": Kind("Q", 1), "ifname": Kind("16s", 1), "addr": Kind("16s", 1),
    "peer": Kind(PEER_FMT, PEER_VALUES),
    "keys5": Kind("16s16sHH" * 2, 2 * KEY_VALUES["keys5"]),
    "keys6": Kind("16s16sHHHBx" * 2, 2 * KEY_VALUES["keys6"]),
    "u64pair": Kind("QQ", 2), "i32pair": Kind("ii", 2), "u8pair": Kind("BB", 2),
}
"""Field kinds of the state layouts. ``keys5``/``keys6`` are both keys of a state."""

# --------------------------------------------------------------------------- records


class StateLayout:
    """One dialect's ``struct pfsync_state``: ``fields`` is (attribute, kind) in wire
    order, ``revision`` the header it follows, ``fmt`` the struct format, ``index``
    where each attribute's first value sits in the unpacked tuple."""

    __slots__ = ("dialect", "fields", "fmt", "index", "kinds", "names", "nvalues", "revision",
                 "size")

    def __init__(self, dialect: str, revision: str, size: int,
                 fields: list[tuple[str, str]]) -> None:
        self.dialect = dialect
        self.revision = revision
        self.fields: tuple[tuple[str, str], ...] = tuple(fields)
        self.names = tuple(a for a, _ in fields)
        self.kinds = dict(fields)
        self.fmt = "!" + "".join(KINDS[k].fmt for _, k in fields)
        self.size = struct.calcsize(self.fmt)
        if self.size != size:  # the size the C header documents
            raise AssertionError(f"{dialect} pfsync_state is {self.size} bytes, not {size}")
        index: dict[str, int] = {}
        i = 0
        for attr, kind in fields:
            index[attr] = i
            i += KINDS[kind].nvalues
        self.index = index
        self.nvalues = i

    def __repr__(self) -> str:
        return f"StateLayout({self.dialect!r}, {self.revision!r}, {self.size} bytes)"


_STATE_HEAD: list[tuple[str, str]] = [
    ("id", "u64"), ("ifname", "ifname"), ("key", "keys5"), ("src", "peer"), ("dst", "peer"),
    ("rt_addr", "addr"), ("rule", "u32"), ("anchor", "u32"), ("nat_rule", "u32"),
    ("creation", "u32"), ("expire", "u32"), ("packets", "u64pair"), ("bytes", "u64pair"),
    ("creatorid", "u32"),
]
"""The first 232 bytes, common to every layout (openbsd6 widens ``key``)."""

STATE_LAYOUTS: dict[str, StateLayout] = {
    "openbsd45": StateLayout("openbsd45", "OpenBSD pfvar.h 1.282 (2009/01/29)", 240, [
        *_STATE_HEAD, ("af", "u8"), ("proto", "u8"), ("direction", "u8"), ("log", "u8"),
        ("state_flags", "u8"), ("timeout", "u8"), ("sync_flags", "u8"), ("updates", "u8")]),
    # the 4.5 layout with __spare[2] after direction
    "freebsd1301": StateLayout("freebsd1301", "FreeBSD pfvar.h struct pfsync_state_1301", 242, [
        *_STATE_HEAD, ("af", "u8"), ("proto", "u8"), ("direction", "u8"), ("spare", "u16"),
        ("log", "u8"), ("state_flags", "u8"), ("timeout", "u8"), ("sync_flags", "u8"),
        ("updates", "u8")]),
    "freebsd1400": StateLayout("freebsd1400", "FreeBSD pfvar.h struct pfsync_state_1400", 277, [
        *_STATE_HEAD, ("af", "u8"), ("proto", "u8"), ("direction", "u8"),
        ("state_flags", "u16"), ("log", "u8"), ("spare", "u8"), ("timeout", "u8"),
        ("sync_flags", "u8"), ("updates", "u8"), ("qid", "u16"), ("pqid", "u16"),
        ("dnpipe", "u16"), ("dnrpipe", "u16"), ("rtableid", "i32"), ("min_ttl", "u8"),
        ("set_tos", "u8"), ("max_mss", "u16"), ("set_prio", "u8pair"), ("rt", "u8"),
        ("rt_ifname", "ifname")]),
    # keys carry rdomain + af; fields carved out of 4.8's padding, size kept at 264
    "openbsd6": StateLayout("openbsd6", "OpenBSD pfvar.h 1.543 (current)", 264, [
        *[(("key", "keys6") if a == "key" else (a, k)) for a, k in _STATE_HEAD],
        ("rtableid", "i32pair"), ("max_mss", "u16"), ("af", "u8"), ("proto", "u8"),
        ("direction", "u8"), ("log", "u8"), ("rt", "u8"), ("timeout", "u8"),
        ("sync_flags", "u8"), ("updates", "u8"), ("min_ttl", "u8"), ("set_tos", "u8"),
        ("state_flags", "u16"), ("set_prio", "u8pair")]),
}
"""Per-dialect ``pfsync_state`` records (facts section 2.4)."""


class StateIndex:
    """Where the fields the engine reads sit in one dialect's unpacked pfsync_state
    tuple (``src``/``dst`` are the first of a peer's ``PEER_VALUES`` values)."""

    __slots__ = ("creatorid", "dst", "id", "src", "timeout")

    def __init__(self, index: dict[str, int]) -> None:
        self.id = index["id"]
        self.creatorid = index["creatorid"]
        self.timeout = index["timeout"]
        self.src = index["src"]
        self.dst = index["dst"]


STATE_INDEX: dict[str, StateIndex] = {d: StateIndex(STATE_LAYOUTS[d].index) for d in DIALECTS}

# --------------------------------------------------------------------------- generated code

GENERATED_SOURCES: dict[str, str] = {}
"""File name -> source of every function generated from these layouts (kept so that
the ``linecache`` entries can be restored after ``linecache.clearcache()``)."""


def compile_generated(source: str, filename: str, env: dict[str, Any], name: str) -> Any:
    """Compile generated ``source`` as ``filename`` in ``env`` and return ``env[name]``.

    The file name (``<pfsync-generated WHAT DIALECT>``) goes into ``linecache``, so a
    traceback, pdb or a profiler shows the generated line instead of ``File "<string>"``;
    callers give each dialect's function its own name for the same reason.
    """
    GENERATED_SOURCES[filename] = source
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), env)  # generated from the tables above
    return env[name]
