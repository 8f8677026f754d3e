"""pf state <-> pfsync record (pf_state_export / pfsync_state_import).

Times travel as ages: `creation` is seconds since the state was made and `expire` the
seconds left before it times out, so two hosts with unrelated clocks agree. Addresses are
16-byte pf_addr on the wire and 4 or 16 bytes in our keys; AF_INET6 is 24 on OpenBSD and
28 on FreeBSD, so the dialect decides.

The record layouts come from ``pfsync.layout``; the fast paths (``state_importer``,
``pack_state``) are generated from them once per dialect, each under its own name
(``import_state_openbsd45``, ``pack_state_openbsd45``) and file name in ``linecache``
(``<pfsync-generated importer openbsd45>``), so tracebacks and profiles show which one
ran and the generated line.
"""

from __future__ import annotations

import struct
from typing import Any

from pfcluster.pf.constants import (
    AF_INET,
    AF_INET6,
    PF_OUT,
    PF_TCPS_PROXY_DST,
    PFSTATE_ACK,
    PFSYNC_FLAG_SRCNODE,
    PFTM_MAX,
)
from pfcluster.pf.filter import PORT_OBJECTS
from pfcluster.pf.route import imported_route, route_wire, rt_from_wire
from pfcluster.pf.state import (
    CREATORID,
    DIRECTION,
    DST,
    LOG,
    PEER_FIELDS,
    PEER_LEN,
    SRC,
    NatInfo,
    NatState,
    Peer,
    RouteState,
    State,
    state_expires,
)
from pfcluster.pfsync import wire
from pfcluster.pfsync.layout import (
    AF_INET_WIRE,
    KEY_ADDR0,
    KEY_ADDR1,
    KEY_AF,
    KEY_PORT0,
    KEY_PORT1,
    KEY_VALUES,
    PEER_SCRUB_VALUES,
    PEER_STATE,
    PEER_TCP_FIELDS,
    STATE_INDEX,
    STATE_LAYOUTS,
    StateIndex,
    compile_generated,
)

U32 = 0xFFFFFFFF
assert PEER_TCP_FIELDS == PEER_FIELDS  # a State holds its peers' fields in wire order
_ZERO12 = bytes(12)


def pad_addr(raw: bytes) -> bytes:
    return raw if len(raw) == 16 else raw + _ZERO12


def peer_to_wire(p: Peer) -> wire.StatePeer:
    return wire.StatePeer(0, 0, 0, 0, *p.as_tuple())


def seconds_left(st: State, now: float, timeouts: list[int], nstates: int) -> int:
    e = state_expires(st, timeouts, nstates)
    return 0 if e <= now else min(U32, int(e - now))


def _sync_flags(st: State) -> int:
    """PFSYNC_FLAG_SRCNODE when the state's rule tracks sources: a state such a rule
    created here holds a source node (pf sets the flag from st->src_node). Peers
    create no node for it (pf neither): source nodes stay on the firewall that made
    them, so an overload limit is per firewall in an active-active cluster."""
    r = st.rule
    return 0 if r is None or r.srctrack is None else PFSYNC_FLAG_SRCNODE


def export_state(st: State, now: float, dialect: str, timeouts: list[int], nstates: int) -> wire.State:
    """A pfsync_state record for `st` as `dialect` carries it."""
    af, proto, a0, a1, p0, p1 = st.key
    waf = wire.af_to_wire(dialect, af)
    layout = STATE_LAYOUTS[dialect]
    keys6 = layout.kinds["key"] == "keys6"  # keys with rdomain + af
    k0 = wire.StateKey([pad_addr(a0), pad_addr(a1)], [p0, p1], 0, waf if keys6 else 0)
    nat = st.nat
    if nat is None:
        k1 = wire.StateKey([pad_addr(a0), pad_addr(a1)], [p0, p1], 0, waf if keys6 else 0)
        nat_rule = U32
    else:  # key[PF_SK_STACK] of a translated state
        _, _, b0, b1, q0, q1 = nat.skey
        k1 = wire.StateKey([pad_addr(b0), pad_addr(b1)], [q0, q1], 0, waf if keys6 else 0)
        nat_rule = (nat.rule.nr & U32) if nat.rule is not None else U32
    # bits 16-31 hold the state's tag (pf.tags), which no pfsync_state layout carries
    flags = st.state_flags & (0xFFFF if layout.kinds["state_flags"] == "u16" else 0xFF)
    rt, rt_addr, rt_ifname = route_wire(st, dialect.startswith("freebsd"))
    return wire.State(
        id=st.id,
        ifname=st.ifname,
        key=[k0, k1],
        src=peer_to_wire(st.src),
        dst=peer_to_wire(st.dst),
        rule=(st.rule.nr & U32) if st.rule is not None else U32,
        nat_rule=nat_rule,
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
        sync_flags=_sync_flags(st),
        rt=rt,
        rt_addr=rt_addr,
        rt_ifname=rt_ifname.decode("latin-1"),
    )


class ImportError_(ValueError):
    """A record that cannot become a state (pfsync counts these as badval)."""


def import_state(rec: wire.State, now: float, dialect: str, timeouts: list[int]) -> tuple[State, int, bool]:
    """A pf state from a record: (state, rule number or -1, the sender asked for an INS_ACK)."""
    codec = wire.TABLES[dialect][wire.ACTIONS[dialect]["INS"]][2]
    assert codec is not None
    return state_importer(dialect)(tuple(codec.to_tuple(rec)), now, timeouts)


# The engine's names for layout.StateIndex / layout.STATE_INDEX (where the fields it reads
# sit in an unpacked pfsync_state tuple, per dialect).
StateFields = StateIndex
STATE_FIELDS: dict[str, StateIndex] = STATE_INDEX


def _gen_importer(dialect: str) -> Any:
    """Unpacked pfsync_state tuple -> pf State, with pfsync's checks, in one generated
    function: validating and importing straight from the tuple spares a bulk update the
    five record objects per state that decoding into wire.State would build."""
    layout = STATE_LAYOUTS[dialect]
    ix = layout.index
    keys6 = layout.kinds["key"] == "keys6"
    k = ix["key"]  # the wire key's values come first
    sk = k + KEY_VALUES[layout.kinds["key"]]  # then the stack key's
    src = ix["src"] + PEER_SCRUB_VALUES  # pf's Peer fields start after the scrub part
    dst = ix["dst"] + PEER_SCRUB_VALUES
    s_state = ix["src"] + PEER_STATE
    d_state = ix["dst"] + PEER_STATE
    name = f"import_state_{dialect}"
    lines = [
        f"def {name}(t, now, timeouts):",
        f"    waf = t[{ix['af']}]",
        "    af = AFMAP.get(waf)",
        "    if af is None:",
        "        raise Err(f'af {waf}')",
        f"    if not t[{ix['creatorid']}]:",
        "        raise Err('creatorid 0')",
        f"    tm = t[{ix['timeout']}]",
        "    if tm >= PFTM_MAX:",
        "        raise Err(f'timeout {tm}')",
        f"    if t[{s_state}] > PEER_MAX or t[{d_state}] > PEER_MAX:",
        "        raise Err('peer state')",
        f"    direction = t[{ix['direction']}]",
        f"    if direction > {PF_OUT}:",
        "        raise Err(f'direction {direction}')",
    ]
    if keys6:
        kaf = k + KEY_AF
        lines += [f"    if t[{kaf}] and t[{kaf}] not in AFMAP:", "        raise Err('key af')"]
    lines += [
        "    alen = 4 if af == AF_INET else 16",
        f"    a0 = t[{k + KEY_ADDR0}][:alen]",
        "    a0 = ADDRS.get(a0) or intern_addr(a0)",
        f"    a1 = t[{k + KEY_ADDR1}][:alen]",
        "    a1 = ADDRS.get(a1) or intern_addr(a1)",
        f"    key = (af, t[{ix['proto']}], a0, a1, PORTS[t[{k + KEY_PORT0}]],"
        f" PORTS[t[{k + KEY_PORT1}]])",
        # key[PF_SK_STACK]: a translated state's other key
        f"    b0 = t[{sk + KEY_ADDR0}][:alen]",
        f"    b1 = t[{sk + KEY_ADDR1}][:alen]",
        f"    q0 = t[{sk + KEY_PORT0}]",
        f"    q1 = t[{sk + KEY_PORT1}]",
        "    if b0 != a0 or b1 != a1 or q0 != key[4] or q1 != key[5]:",
        "        skey = (af, key[1], ADDRS.get(b0) or intern_addr(b0),"
        " ADDRS.get(b1) or intern_addr(b1), PORTS[q0], PORTS[q1])",
        "    else:",
        "        skey = None",
        f"    ifn = t[{ix['ifname']}]",
        *_route_import_lines(ix),
        f"    st = (RouteState if rtk else State if skey is None else NatState)(key, direction,"
        f" t[{ix['creatorid']}],"
        f" t[{ix['id']}], now, None,"
        f" IFNAMES.get(ifn) or intern_ifname(ifn), (" + "".join(
            f"t[{base + j}], " for base in (src, dst) for j in range(len(PEER_TCP_FIELDS))) + "))",
        "    if rtk:",
        "        st.nat = st.scrub = None",
        f"        st.route = imported_route(rtk, t[{ix['rt_addr']}], "
        + (f"cstr(t[{ix['rt_ifname']}])" if "rt_ifname" in ix else "''") + ", af)",
        "    if skey is not None:",
        "        st.nat = NatInfo(skey)",
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
        f"    st[{LOG}] = t[{ix['log']}]",
        f"    fl = t[{ix['state_flags']}]",
        "    st.state_flags = fl & ~ACK",
        "    st.pfsync_time = now",
        f"    r = t[{ix['rule']}]",
        "    return st, (r - 0x100000000 if r & 0x80000000 else r), bool(fl & ACK)",
    ]
    inet6 = wire.af_to_wire(dialect, AF_INET6)
    env: dict[str, Any] = {
        "AFMAP": {AF_INET_WIRE: AF_INET, inet6: AF_INET6}, "Err": ImportError_,
        "PFTM_MAX": PFTM_MAX, "PEER_MAX": PF_TCPS_PROXY_DST, "AF_INET": AF_INET, "State": State,
        "ACK": PFSTATE_ACK, "ADDRS": _ADDRS, "intern_addr": _intern_addr,
        "PORTS": PORT_OBJECTS, "IFNAMES": _IFNAMES, "intern_ifname": _intern_ifname,
        "NatInfo": NatInfo, "NatState": NatState, "RouteState": RouteState,
        "imported_route": imported_route, "cstr": wire.cstr, "rt_from_wire": rt_from_wire,
        "FREEBSD": dialect.startswith("freebsd"),
    }
    src_text = "\n".join(lines) + "\n"
    return compile_generated(src_text, f"<pfsync-generated importer {dialect}>", env, name)


# Imported keys share their address bytes and port ints, as the packet path's keys do
# (pf/filter.py's intern table and PORT_OBJECTS): a million imported states would
# otherwise carry two address objects and two port ints of their own each (about 130
# bytes). Peers choose the addresses, so the tables are bounded: full, they start over.
ADDR_INTERN_LIMIT = 1 << 16
_ADDRS: dict[bytes, bytes] = {}
_IFNAMES: dict[bytes, str] = {}


def _intern_addr(a: bytes) -> bytes:
    if len(_ADDRS) >= ADDR_INTERN_LIMIT:
        _ADDRS.clear()
    return _ADDRS.setdefault(a, a)


def _intern_ifname(raw: bytes) -> str:
    """The wire's NUL-padded name as text ('all' when empty), cached for 256 names."""
    name = wire.cstr(raw) or "all"
    if len(_IFNAMES) < 256:
        _IFNAMES[raw] = name
    return name


_IMPORTERS: dict[str, Any] = {}


def _route_import_lines(ix: dict[str, int]) -> list[str]:
    """`rtk`, the state's route kind (pf/route.py RT_*), checked; 0 when the dialect
    carries no `rt` (its routed states arrive unrouted: docs/route-to.md)."""
    if "rt" not in ix:
        return ["    rtk = 0"]
    return [f"    rtk = rt_from_wire(t[{ix['rt']}], FREEBSD)",
            "    if rtk is None:",
            f"        raise Err(f'rt {{t[{ix['rt']}]}}')"]


def state_importer(dialect: str) -> Any:
    """The (tuple, now, timeouts) -> (State, rule, wants_ack) importer for `dialect`."""
    imp = _IMPORTERS.get(dialect)
    if imp is None:
        imp = _IMPORTERS[dialect] = _gen_importer(dialect)
    return imp


# Per-field expressions over a pf State (`st`, its peers `s`/`d`) and the values the
# caller works out once per state (`cre`, `exp`, `rule`, `waf`, `flags`, `a0`, `a1`).
_FIELD_EXPR: dict[str, str] = {
    "id": "st.id", "ifname": "IFN.get(st.ifname) or ifname_bytes(st.ifname)",
    "rt_addr": "rtw[1]", "rule": "rule", "anchor": "U32", "nat_rule": "nat_rule",
    "creation": "cre", "expire": "exp", "packets": "st.packets0, st.packets1",
    "bytes": "st.bytes0, st.bytes1", "creatorid": f"st[{CREATORID}]", "af": "waf",
    "proto": "k[1]", "direction": f"st[{DIRECTION}]", "log": f"st[{LOG}]",
    "state_flags": "flags", "timeout": "st.timeout", "rtableid": "0", "set_prio": "0, 0",
    "rt_ifname": "rtw[2]", "rt": "rtw[0]",
    "sync_flags": f"(0 if r is None or r.srctrack is None else {PFSYNC_FLAG_SRCNODE})",
}
# A peer: the scrub values are zero (we do not scrub), then pf's Peer fields.
_PEER_EXPR = ", ".join(["0"] * PEER_SCRUB_VALUES + [f"pv[{{p}} + {j}]" for j in range(PEER_LEN)])


# Interface names as the packer writes them; bounded, since peers choose the names of
# the states they send us.
_IFNAME_BYTES: dict[str, bytes] = {}


def _ifname_bytes(name: str) -> bytes:
    b = name.encode("latin-1")
    if len(_IFNAME_BYTES) < 256:
        _IFNAME_BYTES[name] = b
    return b


def _gen_packer(dialect: str) -> Any:
    """pf State -> packed pfsync_state bytes for `dialect`, without the record objects:
    a bulk update spends most of its time building and taking apart those objects."""
    layout = STATE_LAYOUTS[dialect]
    codec = wire.TABLES[dialect][wire.ACTIONS[dialect]["INS"]][2]
    assert codec is not None
    items = []
    for attr, kind in layout.fields:
        if kind in ("keys5", "keys6"):
            # pf key k = (af, proto, addr0, addr1, port0, port1); both wire keys alike
            tail = ", 0, waf" if kind == "keys6" else ""
            items.append(f"a0, a1, k[4], k[5]{tail}, b0, b1, s[4], s[5]{tail}")
        elif kind == "peer":
            items.append(_PEER_EXPR.format(p=SRC if attr == "src" else DST))
        elif kind == "i32pair":
            items.append("0, 0")
        else:
            items.append(_FIELD_EXPR.get(attr, "0"))
    u16 = layout.kinds["state_flags"] == "u16"
    flags = "st.state_flags & 0xFFFF" if u16 else "st.state_flags & 0xFF"
    name = f"pack_state_{dialect}"
    src = (
        f"def {name}(st, now, timeouts, nstates):\n"
        "    k = st.key\n"
        "    pv = PEERS(st)\n"
        "    a0 = k[2] if len(k[2]) == 16 else k[2] + ZERO12\n"
        "    a1 = k[3] if len(k[3]) == 16 else k[3] + ZERO12\n"
        "    n = st.nat\n"
        "    if n is None:\n"
        "        s, b0, b1, nat_rule = k, a0, a1, U32\n"
        "    else:\n"
        "        s = n.skey\n"
        "        b0 = s[2] if len(s[2]) == 16 else s[2] + ZERO12\n"
        "        b1 = s[3] if len(s[3]) == 16 else s[3] + ZERO12\n"
        "        nat_rule = U32 if n.rule is None else n.rule.nr & U32\n"
        "    cre = int(now - st.creation)\n"
        "    cre = 0 if cre < 0 else (U32 if cre > U32 else cre)\n"
        "    e = expires(st, timeouts, nstates)\n"
        "    exp = 0 if e <= now else min(U32, int(e - now))\n"
        "    r = st.rule\n"
        "    rule = (r.nr & U32) if r is not None else U32\n"
        f"    waf = {AF_INET_WIRE} if k[0] == AF_INET else AF6\n"
        f"    flags = {flags}\n"
        "    rtw = NORT if st.route is None else ROUTE_WIRE(st, FREEBSD)\n"
        f"    return Packed(PACK({', '.join(items)}))\n"
    )
    env: dict[str, Any] = {"ZERO16": bytes(16), "ZERO12": _ZERO12, "U32": U32,
                           "PACK": codec.st.pack, "Packed": wire.PackedRecord,
                           "expires": state_expires, "AF_INET": AF_INET,
                           "PEERS": struct.Struct(f"{2 * PEER_LEN}I").unpack_from,
                           "IFN": _IFNAME_BYTES, "ifname_bytes": _ifname_bytes,
                           "AF6": wire.af_to_wire(dialect, AF_INET6),
                           "NORT": (0, bytes(16), b""), "ROUTE_WIRE": route_wire,
                           "FREEBSD": dialect.startswith("freebsd")}
    return compile_generated(src, f"<pfsync-generated packer {dialect}>", env, name)


_PACKERS: dict[str, Any] = {}


def pack_state(st: State, now: float, dialect: str, timeouts: list[int], nstates: int) -> wire.PackedRecord:
    """The wire bytes of export_state(st, ...) in one step (same fields, same values)."""
    packer = _PACKERS.get(dialect)
    if packer is None:
        packer = _PACKERS[dialect] = _gen_packer(dialect)
    return packer(st, now, timeouts, nstates)
