"""Known-answer vectors for every message type in every dialect.

The bytes are built with ctypes structures written from the C layouts in
reference/pfsync-wire-facts.md (not with our encoder), so a wrong offset or byte order
in wire.py shows up as a mismatch in decode AND in encode(decode(vector)) == vector.
"""

from __future__ import annotations

import ctypes
import socket
from ctypes import c_char, c_int32, c_uint8, c_uint16, c_uint32, c_uint64
from typing import Any

import pytest

from pfcluster.packet import addr_str
from pfcluster.pfsync import wire
from pfcluster.pfsync.wire import (
    Bus,
    Clr,
    DelC,
    Eof,
    InsAck,
    State,
    StateKey,
    StatePeer,
    Tdb,
    UpdC,
    UpdReq,
    WireError,
)

BE = ctypes.BigEndianStructure


def _s(name: str, fields: list[tuple[str, Any]]) -> type[ctypes.BigEndianStructure]:
    return type(name, (BE,), {"_pack_": 1, "_fields_": fields})


Addr = c_uint8 * 16
Header = _s("pfsync_header", [("version", c_uint8), ("_pad", c_uint8), ("len", c_uint16),
                              ("pfcksum", c_uint8 * 16)])
SubhV5 = _s("pfsync_subheader_v5", [("action", c_uint8), ("_pad", c_uint8), ("count", c_uint16)])
SubhV6 = _s("pfsync_subheader_v6", [("action", c_uint8), ("len", c_uint8), ("count", c_uint16)])
Peer = _s("pfsync_state_peer", [
    ("pfss_flags", c_uint16), ("pfss_ttl", c_uint8), ("scrub_flag", c_uint8),
    ("pfss_ts_mod", c_uint32), ("seqlo", c_uint32), ("seqhi", c_uint32), ("seqdiff", c_uint32),
    ("max_win", c_uint16), ("mss", c_uint16), ("state", c_uint8), ("wscale", c_uint8),
    ("pad", c_uint8 * 6)])
KeyV5 = _s("pfsync_state_key_v5", [("addr", Addr * 2), ("port", c_uint16 * 2)])
KeyV6 = _s("pfsync_state_key_v6", [("addr", Addr * 2), ("port", c_uint16 * 2),
                                   ("rdomain", c_uint16), ("af", c_uint8), ("pad", c_uint8)])


def _state_head(key: Any) -> list[tuple[str, Any]]:
    return [("id", c_uint64), ("ifname", c_char * 16), ("key", key * 2), ("src", Peer),
            ("dst", Peer), ("rt_addr", Addr), ("rule", c_uint32), ("anchor", c_uint32),
            ("nat_rule", c_uint32), ("creation", c_uint32), ("expire", c_uint32),
            ("packets", c_uint64 * 2), ("bytes", c_uint64 * 2), ("creatorid", c_uint32)]


_u8 = c_uint8
State45 = _s("pfsync_state_45", [*_state_head(KeyV5), ("af", _u8), ("proto", _u8),
             ("direction", _u8), ("log", _u8), ("state_flags", _u8), ("timeout", _u8),
             ("sync_flags", _u8), ("updates", _u8)])
State1301 = _s("pfsync_state_1301", [*_state_head(KeyV5), ("af", _u8), ("proto", _u8),
               ("direction", _u8), ("__spare", _u8 * 2), ("log", _u8), ("state_flags", _u8),
               ("timeout", _u8), ("sync_flags", _u8), ("updates", _u8)])
State1400 = _s("pfsync_state_1400", [*_state_head(KeyV5), ("af", _u8), ("proto", _u8),
               ("direction", _u8), ("state_flags", c_uint16), ("log", _u8), ("__spare", _u8),
               ("timeout", _u8), ("sync_flags", _u8), ("updates", _u8), ("qid", c_uint16),
               ("pqid", c_uint16), ("dnpipe", c_uint16), ("dnrpipe", c_uint16),
               ("rtableid", c_int32), ("min_ttl", _u8), ("set_tos", _u8), ("max_mss", c_uint16),
               ("set_prio", _u8 * 2), ("rt", _u8), ("rt_ifname", c_char * 16)])
StateO6 = _s("pfsync_state_obsd", [*_state_head(KeyV6), ("rtableid", c_int32 * 2),
             ("max_mss", c_uint16), ("af", _u8), ("proto", _u8), ("direction", _u8),
             ("log", _u8), ("rt", _u8), ("timeout", _u8), ("sync_flags", _u8),
             ("updates", _u8), ("min_ttl", _u8), ("set_tos", _u8), ("state_flags", c_uint16),
             ("set_prio", _u8 * 2)])
ClrC = _s("pfsync_clr", [("ifname", c_char * 16), ("creatorid", c_uint32)])
IdCreator = _s("pfsync_ins_ack", [("id", c_uint64), ("creatorid", c_uint32)])
UpdCV5 = _s("pfsync_upd_c_v5", [("id", c_uint64), ("src", Peer), ("dst", Peer),
            ("creatorid", c_uint32), ("expire", c_uint32), ("timeout", _u8), ("_pad", _u8 * 3)])
UpdCV6 = _s("pfsync_upd_c_v6", [("id", c_uint64), ("src", Peer), ("dst", Peer),
            ("creatorid", c_uint32), ("expire", c_uint32), ("timeout", _u8),
            ("state_flags", _u8), ("_pad", _u8 * 2)])
BusC = _s("pfsync_bus", [("creatorid", c_uint32), ("endtime", c_uint32), ("status", _u8),
                         ("_pad", _u8 * 3)])
TdbV5 = _s("pfsync_tdb_v5", [("spi", c_uint32), ("dst", _u8 * 28), ("rpl", c_uint32),
           ("cur_bytes", c_uint64), ("sproto", _u8), ("updates", _u8), ("_pad", _u8 * 2)])
TdbV6 = _s("pfsync_tdb_obsd", [("spi", c_uint32), ("dst", _u8 * 28), ("rpl", c_uint64),
           ("cur_bytes", c_uint64), ("sproto", _u8), ("updates", _u8), ("rdomain", c_uint16)])
EofC = _s("pfsync_eof", [("hmac", _u8 * 20)])


def test_documented_sizes() -> None:
    sizes = {Header: 20, SubhV5: 4, SubhV6: 4, Peer: 32, KeyV5: 36, KeyV6: 40, State45: 240,
             State1301: 242, State1400: 277, StateO6: 264, ClrC: 20, IdCreator: 12, UpdCV5: 84,
             UpdCV6: 84, BusC: 12, TdbV5: 48, TdbV6: 52, EofC: 20}
    for cls, size in sizes.items():
        assert ctypes.sizeof(cls) == size, cls.__name__
    expect = {
        "openbsd45": {"CLR": 20, "INS": 240, "INS_ACK": 12, "UPD": 240, "UPD_C": 84,
                      "UPD_REQ": 12, "DEL": 240, "DEL_C": 12, "BUS": 12, "TDB": 48, "EOF": 20},
        "freebsd1301": {"INS": 242, "UPD": 242, "DEL": 242, "UPD_C": 84, "TDB": 48, "EOF": 0},
        "freebsd1400": {"INS": 277, "UPD": 277, "INS_1301": 242, "DEL": 242, "EOF": 0},
        "openbsd6": {"INS": 264, "UPD": 264, "DEL": 264, "UPD_C": 84, "TDB": 52, "BUS": 12},
    }
    for dialect, table in expect.items():
        for name, size in table.items():
            assert wire.record_size(dialect, name) == size, (dialect, name)


def test_action_numbers() -> None:
    assert wire.ACTIONS["openbsd45"]["INS"] == 1 and wire.ACTIONS["openbsd45"]["UPD"] == 3
    assert wire.ACTIONS["openbsd45"]["EOF"] == 12
    assert wire.ACTIONS["openbsd6"]["INS"] == 13 and wire.ACTIONS["openbsd6"]["UPD"] == 14
    assert wire.ACTIONS["openbsd6"]["TDB"] == 15 and wire.ACTIONS["openbsd6"]["OINS"] == 1
    assert wire.ACTIONS["freebsd1400"]["INS"] == 13 and wire.ACTIONS["freebsd1400"]["INS_1301"] == 1
    assert wire.ACTIONS["freebsd1301"]["UPD_C"] == 4


# ------------------------------------------------------------------------ field values

V4A = socket.inet_aton("198.51.100.2") + bytes(12)
V4B = socket.inet_aton("203.0.113.10") + bytes(12)
V6A = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
V6B = socket.inet_pton(socket.AF_INET6, "2001:db8::2:3")


def _fill_peer(c: Any, base: int) -> StatePeer:
    vals = dict(pfss_flags=0x0001, pfss_ttl=64 + base, scrub_flag=1, pfss_ts_mod=0x11223344 + base,
                seqlo=0xA0000000 + base, seqhi=0xA0010000 + base, seqdiff=0x1234 + base,
                max_win=0xFFF0 - base, mss=1460 - base, state=4, wscale=0x80 | (base & 0x0F))
    for k, v in vals.items():
        setattr(c, k, v)
    return StatePeer(**vals)


def _copy_addr(dst: Any, raw: bytes) -> None:
    ctypes.memmove(ctypes.addressof(dst), raw, 16)


def _fill_state(c: Any, dialect: str) -> State:
    v6 = dialect == "openbsd6"
    c.id = 0x0102030405060708
    c.ifname = b"em1"
    keys = []
    for i, (a, b) in enumerate(((V4A, V4B), (V6A, V6B))):
        k = c.key[i]
        _copy_addr(k.addr[0], a)
        _copy_addr(k.addr[1], b)
        k.port[0], k.port[1] = 34512 + i, 5201 + i
        sk = StateKey([a, b], [34512 + i, 5201 + i])
        if v6:
            k.rdomain, k.af = 7 + i, (2, 24)[i]
            sk.rdomain, sk.af = 7 + i, (2, 24)[i]
        keys.append(sk)
    src, dst = _fill_peer(c.src, 1), _fill_peer(c.dst, 2)
    _copy_addr(c.rt_addr, V4B)
    c.rule, c.anchor, c.nat_rule = 3, 0xFFFFFFFF, 0xFFFFFFFE
    c.creation, c.expire = 0x00010203, 86399
    c.packets[0], c.packets[1] = 0x0000000100000002, 0x0000000300000004
    c.bytes[0], c.bytes[1] = 0x0000000500000006, 0xFFFFFFFF00000007
    c.creatorid = 0xA1B2C3D4
    c.af, c.proto, c.direction, c.log, c.timeout = 2, 6, 2, 1, 2
    c.sync_flags, c.updates = 0x04, 9
    exp = State(id=c.id, ifname="em1", key=keys, src=src, dst=dst, rt_addr=V4B, rule=3,
                anchor=0xFFFFFFFF, nat_rule=0xFFFFFFFE, creation=0x00010203, expire=86399,
                packets=[c.packets[0], c.packets[1]], bytes=[c.bytes[0], c.bytes[1]],
                creatorid=0xA1B2C3D4, af=2, proto=6, direction=2, log=1, timeout=2,
                sync_flags=0x04, updates=9)
    if dialect == "openbsd45":
        c.state_flags = 0x11
        exp.state_flags = 0x11
    elif dialect == "freebsd1301":
        c.state_flags = 0x12
        exp.state_flags = 0x12
    elif dialect == "freebsd1400":
        c.state_flags, c.qid, c.pqid, c.dnpipe, c.dnrpipe = 0x0123, 10, 11, 12, 13
        c.rtableid, c.min_ttl, c.set_tos, c.max_mss, c.rt = -1, 5, 0x10, 1400, 2
        c.set_prio[0], c.set_prio[1] = 3, 4
        c.rt_ifname = b"vtnet0"
        for k, v in dict(state_flags=0x0123, qid=10, pqid=11, dnpipe=12, dnrpipe=13, rtableid=-1,
                         min_ttl=5, set_tos=0x10, max_mss=1400, rt=2, set_prio=[3, 4],
                         rt_ifname="vtnet0").items():
            setattr(exp, k, v)
    else:
        c.rtableid[0], c.rtableid[1] = 1, -2
        c.max_mss, c.rt, c.min_ttl, c.set_tos, c.state_flags = 1400, 3, 6, 0x08, 0x0210
        c.set_prio[0], c.set_prio[1] = 5, 6
        for k, v in dict(rtableid=[1, -2], max_mss=1400, rt=3, min_ttl=6, set_tos=0x08,
                         state_flags=0x0210, set_prio=[5, 6]).items():
            setattr(exp, k, v)
    return exp


STATE_STRUCT = {"openbsd45": State45, "freebsd1301": State1301, "freebsd1400": State1400,
                "openbsd6": StateO6}


def _message(dialect: str, name: str) -> tuple[bytes, Any]:
    """(C bytes, expected object) of one message of ``name`` in ``dialect``."""
    v6 = dialect == "openbsd6"
    if name in ("INS", "UPD", "DEL", "INS_1301", "UPD_1301"):
        layout = State1301 if name.endswith("1301") or (name == "DEL" and dialect == "freebsd1400") \
            else STATE_STRUCT[dialect]
        c = layout()
        d = "freebsd1301" if layout is State1301 else dialect
        exp = _fill_state(c, d)
        return bytes(c), exp
    if name == "CLR":
        c = ClrC(b"pfsync0", 0xDEADBEEF)
        return bytes(c), Clr("pfsync0", 0xDEADBEEF)
    if name in ("INS_ACK", "UPD_REQ", "DEL_C"):
        c = IdCreator(0x5E5E000000000001, 0x01020304)
        cls = {"INS_ACK": InsAck, "UPD_REQ": UpdReq, "DEL_C": DelC}[name]
        return bytes(c), cls(0x5E5E000000000001, 0x01020304)
    if name == "UPD_C":
        c = (UpdCV6 if v6 else UpdCV5)()
        c.id, c.creatorid, c.expire, c.timeout = 0x1122334455667788, 0xCAFEBABE, 77, 4
        src, dst = _fill_peer(c.src, 3), _fill_peer(c.dst, 4)
        if v6:
            c.state_flags = 0x08
        return bytes(c), UpdC(c.id, src, dst, 0xCAFEBABE, 77, 4, 0x08 if v6 else 0)
    if name == "BUS":
        c = BusC(0x0A0B0C0D, 3725, 2)
        return bytes(c), Bus(0x0A0B0C0D, 3725, 2)
    if name == "TDB":
        sa = bytes([16, 2, 0, 0]) + socket.inet_aton("192.0.2.9") + bytes(20)
        if v6:
            c6 = TdbV6(0x1000ABCD, (c_uint8 * 28)(*sa), 0x1_0000_0001, 9999, 50, 3, 4)
            return bytes(c6), Tdb(0x1000ABCD, sa, 0x1_0000_0001, 9999, 50, 3, 4)
        c5 = TdbV5(0x1000ABCD, (c_uint8 * 28)(*sa), 16385, 9999, 50, 3)
        return bytes(c5), Tdb(0x1000ABCD, sa, 16385, 9999, 50, 3)
    raise AssertionError(name)


def _frame(dialect: str, action: int, body: bytes, count: int, msg_len: int) -> bytes:
    """Hand-assembled frame: header, one section, the dialect's EOF."""
    v6 = dialect == "openbsd6"
    subh = SubhV6(action, msg_len // 4, count) if v6 else SubhV5(action, 0, count)
    tail = b""
    if dialect == "openbsd45":
        tail = bytes(SubhV5(12, 0, 1)) + bytes(EofC((c_uint8 * 20)(*range(1, 21))))
    elif not v6:
        tail = bytes(SubhV5(12, 0, 1))
    total = 20 + 4 + len(body) + len(tail)
    hdr = Header(6 if v6 else 5, 0, total, (c_uint8 * 16)(*range(16)))
    return bytes(hdr) + bytes(subh) + body + tail


CASES = [
    (d, name)
    for d in wire.DIALECTS
    for name in wire.ACTIONS[d]
    if name not in ("INS_F", "DEL_F", "EOF", "OINS", "OUPD", "OTDB")
]


@pytest.mark.parametrize(("dialect", "name"), CASES)
def test_vector(dialect: str, name: str) -> None:
    raw, expected = _message(dialect, name)
    assert len(raw) == wire.record_size(dialect, name)
    action = wire.ACTIONS[dialect][name]
    vector = _frame(dialect, action, raw + raw, 2, len(raw))
    frame = wire.decode(vector, dialect)
    assert frame.version == (6 if dialect == "openbsd6" else 5)
    assert frame.len == len(vector)
    assert frame.pfcksum == bytes(range(16))
    sec = frame.sections[0]
    assert (sec.action, sec.action_id, sec.count) == (name, action, 2)
    assert sec.messages == [expected, expected]
    assert wire.encode(frame, dialect) == vector
    if dialect == "openbsd45":
        assert frame.sections[-1].messages == [Eof(bytes(range(1, 21)))]
    if name in ("INS", "INS_1301"):
        assert frame.errors == [] and frame.invalid == []


@pytest.mark.parametrize("dialect", wire.DIALECTS)
def test_state_helpers(dialect: str) -> None:
    c = STATE_STRUCT[dialect]()
    st = _fill_state(c, dialect)
    assert wire.signed32(st.anchor) == -1 and wire.signed32(st.rule) == 3
    assert wire.af_from_wire(dialect, wire.af_to_wire(dialect, socket.AF_INET6)) == socket.AF_INET6
    assert wire.af_to_wire(dialect, socket.AF_INET6) == (24 if "openbsd" in dialect else 28)
    assert addr_str(socket.AF_INET, st.key[0].addr[0]) == "198.51.100.2"


@pytest.mark.parametrize("dialect", ["openbsd45", "freebsd1301", "freebsd1400"])
@pytest.mark.parametrize("name", ["INS_F", "DEL_F"])
def test_unsupported_fragment_actions(dialect: str, name: str) -> None:
    vector = _frame(dialect, wire.ACTIONS[dialect][name], b"", 1, 0)
    with pytest.raises(WireError) as ei:
        wire.decode(vector, dialect)
    assert ei.value.reason == "badact"
    assert ei.value.frame is not None and ei.value.frame.sections[-1].action == name


@pytest.mark.parametrize("name", ["OINS", "OUPD", "INS_F", "DEL_F", "EOF", "OTDB"])
def test_openbsd6_deprecated_actions_are_badact(name: str) -> None:
    vector = _frame("openbsd6", wire.ACTIONS["openbsd6"][name], bytes(240), 1, 240)
    with pytest.raises(WireError) as ei:
        wire.decode(vector, "openbsd6")
    assert ei.value.reason == "badact"


def test_openbsd6_unknown_action_skipped_by_len() -> None:
    raw, expected = _message("openbsd6", "DEL_C")
    unknown = bytes(SubhV6(99, 2, 3)) + bytes(range(24))
    body = unknown + bytes(SubhV6(7, 3, 1)) + raw
    hdr = Header(6, 0, 20 + len(body), (c_uint8 * 16)())
    vector = bytes(hdr) + body
    frame = wire.decode(vector, "openbsd6")
    assert frame.sections[0].skipped and frame.sections[0].count == 3
    assert frame.sections[1].messages == [expected]
    assert wire.encode(frame, "openbsd6") == vector
    # unknown action with len 0: badact ends the frame
    bad = bytes(Header(6, 0, 28, (c_uint8 * 16)())) + bytes(SubhV6(99, 0, 3)) + bytes(4)
    with pytest.raises(WireError) as ei:
        wire.decode(bad, "openbsd6")
    assert ei.value.reason == "badact"


def test_openbsd6_larger_mlen_uses_sender_stride() -> None:
    raw, expected = _message("openbsd6", "INS_ACK")
    body = bytes(SubhV6(2, 4, 2)) + raw + bytes(4) + raw + bytes(4)
    vector = bytes(Header(6, 0, 20 + len(body), (c_uint8 * 16)())) + body
    frame = wire.decode(vector, "openbsd6")
    assert frame.sections[0].messages == [expected, expected]
    assert frame.sections[0].mlen == 16
    assert wire.encode(frame, "openbsd6") == vector


def test_receiver_errors() -> None:
    raw, _ = _message("openbsd45", "UPD_C")
    good = _frame("openbsd45", 4, raw, 1, 84)
    for data, reason in [
        (good[:19], "hdrops"),
        (bytes([6]) + good[1:], "badver"),
        (good[:-1], "badlen"),  # header.len larger than the frame
        (_frame("openbsd45", 4, raw, 2, 84), "badlen"),  # count says 2, one present
        (_frame("openbsd45", 13, b"", 0, 0), "badact"),
        (good + bytes(4), "badact"),  # EOF not at the end of the packet
    ]:
        with pytest.raises(WireError) as ei:
            wire.decode(data, "openbsd45")
        assert ei.value.reason == reason, (reason, ei.value)
    # 4.5 needs an EOF; FreeBSD stops at header.len
    no_eof = good[:-24]
    no_eof = bytes([5, 0]) + len(no_eof).to_bytes(2, "big") + no_eof[4:]
    with pytest.raises(WireError) as ei:
        wire.decode(no_eof, "openbsd45")
    assert ei.value.reason == "badlen"
    assert ei.value.frame is not None and ei.value.frame.sections[0].action == "UPD_C"
    assert wire.decode(no_eof, "freebsd1301").sections[0].action == "UPD_C"


def test_badval_keeps_decoding() -> None:
    c = State45()
    _fill_state(c, "openbsd45")
    good = bytes(c)
    c.timeout = 25
    bad = bytes(c)
    c.timeout, c.af = 2, 99
    bad_af = bytes(c)
    vector = _frame("openbsd45", 1, good + bad + bad_af, 3, 240)
    frame = wire.decode(vector, "openbsd45")
    assert len(frame.sections[0].messages) == 3
    assert frame.invalid == [(0, 1), (0, 2)]
    assert frame.errors == ["badval: INS[1] timeout 25", "badval: INS[2] af 99"]
    assert wire.encode(frame, "openbsd45") == vector
