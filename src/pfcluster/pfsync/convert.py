"""pf state <-> pfsync record (pf_state_export / pfsync_state_import).

Times travel as ages: `creation` is seconds since the state was made and `expire` the
seconds left before it times out, so two hosts with unrelated clocks agree. Addresses are
16-byte pf_addr on the wire and 4 or 16 bytes in our keys; AF_INET6 is 24 on OpenBSD and
28 on FreeBSD, so the dialect decides.
"""

from __future__ import annotations

from typing import Any

from pfcluster.pf.constants import AF_INET, AF_INET6, PF_TCPS_PROXY_DST, PFSTATE_ACK, PFTM_MAX
from pfcluster.pf.state import Peer, State, state_expires
from pfcluster.pfsync import wire

U32 = 0xFFFFFFFF
_ZERO12 = bytes(12)


def pad_addr(raw: bytes) -> bytes:
    return raw if len(raw) == 16 else raw + _ZERO12


def peer_to_wire(p: Peer) -> wire.StatePeer:
    return wire.StatePeer(0, 0, 0, 0, p.seqlo, p.seqhi, p.seqdiff, p.max_win, p.mss, p.state, p.wscale)


def seconds_left(st: State, now: float, timeouts: list[int], nstates: int) -> int:
    e = state_expires(st, timeouts, nstates)
    return 0 if e <= now else min(U32, int(e - now))


def export_state(st: State, now: float, dialect: str, timeouts: list[int], nstates: int) -> wire.State:
    """A pfsync_state record for `st` as `dialect` carries it."""
    af, proto, a0, a1, p0, p1 = st.key
    waf = wire.af_to_wire(dialect, af)
    v6 = dialect == "openbsd6"
    k0 = wire.StateKey([pad_addr(a0), pad_addr(a1)], [p0, p1], 0, waf if v6 else 0)
    k1 = wire.StateKey([pad_addr(a0), pad_addr(a1)], [p0, p1], 0, waf if v6 else 0)
    flags = st.state_flags if dialect in ("openbsd6", "freebsd1400") else st.state_flags & 0xFF
    return wire.State(
        id=st.id,
        ifname=st.ifname,
        key=[k0, k1],
        src=peer_to_wire(st.src),
        dst=peer_to_wire(st.dst),
        rule=(st.rule.nr & U32) if st.rule is not None else U32,
        creation=max(0, min(U32, int(now - st.creation))),
        expire=seconds_left(st, now, timeouts, nstates),
        packets=[st.packets0, st.packets1],
        bytes=[st.bytes0, st.bytes1],
        creatorid=st.creatorid,
        af=waf,
        proto=proto,
        direction=st.direction,
        log=st.log,
        state_flags=flags,
        timeout=st.timeout,
    )


class ImportError_(ValueError):
    """A record that cannot become a state (pfsync counts these as badval)."""


def import_state(rec: wire.State, now: float, dialect: str, timeouts: list[int]) -> tuple[State, int, bool]:
    """A pf state from a record: (state, rule number or -1, the sender asked for an INS_ACK)."""
    codec = wire.TABLES[dialect][wire.ACTIONS[dialect]["INS"]][2]
    assert codec is not None
    return state_importer(dialect)(tuple(codec.to_tuple(rec)), now, timeouts)


class StateFields:
    """Where the fields the engine reads sit in an unpacked pfsync_state tuple."""

    __slots__ = ("creatorid", "dst", "id", "src", "timeout")

    def __init__(self, index: dict[str, int]) -> None:
        self.id = index["id"]
        self.creatorid = index["creatorid"]
        self.timeout = index["timeout"]
        self.src = index["src"]
        self.dst = index["dst"]


def _field_index(dialect: str) -> dict[str, int]:
    index: dict[str, int] = {}
    i = 0
    for attr, kind in wire._STATE_LAYOUTS[dialect]:
        index[attr] = i
        i += wire._KINDS[kind][1]
    return index


STATE_FIELDS: dict[str, StateFields] = {d: StateFields(_field_index(d)) for d in wire.DIALECTS}

# Offsets inside the 11 values of a pfsync_state_peer (after the 4 scrub fields).
_PEER_FIELDS = ("seqlo", "seqhi", "seqdiff", "max_win", "mss", "state", "wscale")


def _gen_importer(dialect: str) -> Any:
    """Unpacked pfsync_state tuple -> pf State, with pfsync's checks, in one generated
    function: validating and importing straight from the tuple spares a bulk update the
    five record objects per state that decoding into wire.State would build."""
    ix = _field_index(dialect)
    layout = dict(wire._STATE_LAYOUTS[dialect])
    keys6 = layout["key"] == "keys6"
    k = ix["key"]
    src = ix["src"]
    dst = ix["dst"]
    lines = [
        "def imp(t, now, timeouts):",
        f"    waf = t[{ix['af']}]",
        "    af = AFMAP.get(waf)",
        "    if af is None:",
        "        raise Err(f'af {waf}')",
        f"    if not t[{ix['creatorid']}]:",
        "        raise Err('creatorid 0')",
        f"    tm = t[{ix['timeout']}]",
        "    if tm >= PFTM_MAX:",
        "        raise Err(f'timeout {tm}')",
        f"    if t[{src + 9}] > PEER_MAX or t[{dst + 9}] > PEER_MAX:",
        "        raise Err('peer state')",
        f"    direction = t[{ix['direction']}]",
        "    if direction > 2:",
        "        raise Err(f'direction {direction}')",
    ]
    if keys6:
        lines += [f"    if t[{k + 5}] and t[{k + 5}] not in AFMAP:", "        raise Err('key af')"]
    lines += [
        "    alen = 4 if af == AF_INET else 16",
        f"    key = (af, t[{ix['proto']}], t[{k}][:alen], t[{k + 1}][:alen], t[{k + 2}], t[{k + 3}])",
        f"    st = State(key, direction, t[{ix['creatorid']}], t[{ix['id']}], now, None,"
        f" cstr(t[{ix['ifname']}]) or 'all')",
        "    s = st.src",
        *(f"    s.{name} = t[{src + 4 + j}]" for j, name in enumerate(_PEER_FIELDS)),
        "    d = st.dst",
        *(f"    d.{name} = t[{dst + 4 + j}]" for j, name in enumerate(_PEER_FIELDS)),
        f"    st.creation = now - t[{ix['creation']}]",
        "    st.timeout = tm",
        # rebuild the last-activity time from the seconds the sender had left; an
        # imported state has no rule, so its timeout is the global one for its index
        f"    rem = t[{ix['expire']}]",
        "    st.expire = now - max(0, timeouts[tm] - rem) if rem else now",
        f"    st.packets0 = t[{ix['packets']}]",
        f"    st.packets1 = t[{ix['packets'] + 1}]",
        f"    st.bytes0 = t[{ix['bytes']}]",
        f"    st.bytes1 = t[{ix['bytes'] + 1}]",
        f"    st.log = t[{ix['log']}]",
        f"    fl = t[{ix['state_flags']}]",
        "    st.state_flags = fl & ~ACK",
        "    st.pfsync_time = now",
        f"    r = t[{ix['rule']}]",
        "    return st, (r - 0x100000000 if r & 0x80000000 else r), bool(fl & ACK)",
    ]
    inet6 = wire.af_to_wire(dialect, AF_INET6)
    env: dict[str, Any] = {
        "AFMAP": {2: AF_INET, inet6: AF_INET6}, "Err": ImportError_, "PFTM_MAX": PFTM_MAX,
        "PEER_MAX": PF_TCPS_PROXY_DST, "AF_INET": AF_INET, "State": State, "cstr": _cstr,
        "ACK": PFSTATE_ACK,
    }  # fmt: skip
    exec("\n".join(lines) + "\n", env)  # generated from the layout table
    return env["imp"]


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("latin-1")


_IMPORTERS: dict[str, Any] = {}


def state_importer(dialect: str) -> Any:
    """The (tuple, now, timeouts) -> (State, rule, wants_ack) importer for `dialect`."""
    imp = _IMPORTERS.get(dialect)
    if imp is None:
        imp = _IMPORTERS[dialect] = _gen_importer(dialect)
    return imp


# Per-field expressions over a pf State (`st`, its peers `s`/`d`) and the values the
# caller works out once per state (`cre`, `exp`, `rule`, `waf`, `flags`, `a0`, `a1`).
_FIELD_EXPR: dict[str, str] = {
    "id": "st.id", "ifname": "st.ifname.encode('latin-1')",
    "rt_addr": "ZERO16", "rule": "rule", "anchor": "U32", "nat_rule": "U32",
    "creation": "cre", "expire": "exp", "packets": "st.packets0, st.packets1",
    "bytes": "st.bytes0, st.bytes1", "creatorid": "st.creatorid", "af": "waf",
    "proto": "k[1]", "direction": "st.direction", "log": "st.log",
    "state_flags": "flags", "timeout": "st.timeout", "rtableid": "0", "set_prio": "0, 0",
    "rt_ifname": "b''",
}  # fmt: skip
_PEER_EXPR = "0, 0, 0, 0, {p}.seqlo, {p}.seqhi, {p}.seqdiff, {p}.max_win, {p}.mss, {p}.state, {p}.wscale"


def _gen_packer(dialect: str) -> Any:
    """pf State -> packed pfsync_state bytes for `dialect`, without the record objects:
    a bulk update spends most of its time building and taking apart those objects."""
    layout = wire._STATE_LAYOUTS[dialect]
    codec = wire.TABLES[dialect][wire.ACTIONS[dialect]["INS"]][2]
    assert codec is not None
    items = []
    for attr, kind in layout:
        if kind in ("keys5", "keys6"):
            one = "a0, a1, k[4], k[5]" + (", 0, waf" if kind == "keys6" else "")
            items.append(f"{one}, {one}")
        elif kind == "peer":
            items.append(_PEER_EXPR.format(p="st.src" if attr == "src" else "st.dst"))
        elif kind == "i32pair":
            items.append("0, 0")
        else:
            items.append(_FIELD_EXPR.get(attr, "0"))
    flags = "st.state_flags" if dialect in ("openbsd6", "freebsd1400") else "st.state_flags & 0xFF"
    src = (
        "def pack(st, now, timeouts, nstates):\n"
        "    k = st.key\n"
        "    a0 = k[2] if len(k[2]) == 16 else k[2] + ZERO12\n"
        "    a1 = k[3] if len(k[3]) == 16 else k[3] + ZERO12\n"
        "    cre = int(now - st.creation)\n"
        "    cre = 0 if cre < 0 else (U32 if cre > U32 else cre)\n"
        "    e = expires(st, timeouts, nstates)\n"
        "    exp = 0 if e <= now else min(U32, int(e - now))\n"
        "    r = st.rule\n"
        "    rule = (r.nr & U32) if r is not None else U32\n"
        "    waf = 2 if k[0] == AF_INET else AF6\n"
        f"    flags = {flags}\n"
        f"    return Packed(PACK({', '.join(items)}))\n"
    )
    env: dict[str, Any] = {"ZERO16": bytes(16), "ZERO12": _ZERO12, "U32": U32,
                           "PACK": codec.st.pack, "Packed": wire.PackedRecord,
                           "expires": state_expires, "AF_INET": AF_INET,
                           "AF6": wire.af_to_wire(dialect, AF_INET6)}  # fmt: skip
    exec(src, env)  # generated from the layout table, no outside input
    return env["pack"]


_PACKERS: dict[str, Any] = {}


def pack_state(st: State, now: float, dialect: str, timeouts: list[int], nstates: int) -> wire.PackedRecord:
    """The wire bytes of export_state(st, ...) in one step (same fields, same values)."""
    packer = _PACKERS.get(dialect)
    if packer is None:
        packer = _PACKERS[dialect] = _gen_packer(dialect)
    return packer(st, now, timeouts, nstates)
