"""pfsync v4 wire: ctypes vectors from the structs the thesis diff removes, round trips."""

from __future__ import annotations

import ctypes
from ctypes import c_char, c_uint8, c_uint16, c_uint32, c_uint64

import pytest

from pfcluster.pfsync import legacy
from pfcluster.pfsync.wire import Tdb, WireError
from test_wire_vectors import Peer, State45, TdbV5, _fill_peer, _fill_state


def _s(name, fields):  # type: ignore[no-untyped-def]
    return type(name, (ctypes.BigEndianStructure,), {"_pack_": 1, "_fields_": fields})


V4Header = _s("pfsync_header_v4", [("version", c_uint8), ("af", c_uint8), ("action", c_uint8),
                                   ("count", c_uint8), ("pf_chksum", c_uint8 * 16)])
StateUpdC = _s("pfsync_state_upd", [("id", c_uint32 * 2), ("src", Peer), ("dst", Peer),
               ("creatorid", c_uint32), ("expire", c_uint32), ("timeout", c_uint8),
               ("updates", c_uint8), ("pad", c_uint8 * 6)])
StateDelC = _s("pfsync_state_del", [("id", c_uint32 * 2), ("creatorid", c_uint32),
               ("src_state", c_uint8), ("dst_state", c_uint8), ("pad", c_uint8 * 2)])
StateUpdReqC = _s("pfsync_state_upd_req", [("id", c_uint64), ("creatorid", c_uint32),
                  ("pad", c_uint32)])
StateClrC = _s("pfsync_state_clr", [("ifname", c_char * 16), ("creatorid", c_uint32),
               ("pad", c_uint32)])
StateBusC = _s("pfsync_state_bus", [("creatorid", c_uint32), ("endtime", c_uint32),
               ("status", c_uint8), ("pad", c_uint8 * 7)])


def test_sizes() -> None:
    assert ctypes.sizeof(V4Header) == 20
    for cls, size, action in [(StateUpdC, 88, "UPD_C"), (StateDelC, 16, "DEL_C"),
                              (StateUpdReqC, 16, "UREQ"), (StateClrC, 24, "CLR"),
                              (StateBusC, 16, "BUS"), (State45, 240, "INS"),
                              (TdbV5, 48, "TDB_UPD")]:
        assert ctypes.sizeof(cls) == size
        assert legacy.v4_message_size(action) == size
    assert legacy.v4_message_size("INS_F") == 0


def _vectors():  # type: ignore[no-untyped-def]
    st = State45()
    exp_st = _fill_state(st, "openbsd45")
    u = StateUpdC()
    u.id[0], u.id[1] = 0x01020304, 0x05060708
    src, dst = _fill_peer(u.src, 1), _fill_peer(u.dst, 2)
    u.creatorid, u.expire, u.timeout, u.updates = 0xA1B2C3D4, 30, 2, 7
    d = StateDelC()
    d.id[0], d.id[1], d.creatorid, d.src_state, d.dst_state = 1, 2, 3, 4, 10
    sa = bytes([16, 2, 0, 0, 192, 0, 2, 9]) + bytes(20)
    return [
        ("INS", bytes(st), exp_st),
        ("UPD", bytes(st), exp_st),
        ("DEL", bytes(st), exp_st),
        ("UPD_C", bytes(u), legacy.StateUpd(0x0102030405060708, src, dst, 0xA1B2C3D4, 30, 2, 7)),
        ("DEL_C", bytes(d), legacy.StateDel((1 << 32) | 2, 3, 4, 10)),
        ("UREQ", bytes(StateUpdReqC(99, 0xDEAD)), legacy.StateUpdReq(99, 0xDEAD)),
        ("CLR", bytes(StateClrC(b"fxp0", 0xBEEF)), legacy.StateClr("fxp0", 0xBEEF)),
        ("BUS", bytes(StateBusC(5, 61, 1)), legacy.StateBus(5, 61, 1)),
        (
            "TDB_UPD",
            bytes(TdbV5(0x100, (c_uint8 * 28)(*sa), 7, 8, 50, 1)),
            Tdb(0x100, sa, 7, 8, 50, 1),
        ),
    ]


@pytest.mark.parametrize(("name", "raw", "expected"), _vectors())
def test_vector(name: str, raw: bytes, expected: object) -> None:
    action = legacy.V4_ACTIONS[name]
    vector = bytes(V4Header(4, 0, action, 2, (c_uint8 * 16)(*range(16)))) + raw + raw
    frame = legacy.decode_v4(vector)
    assert (frame.version, frame.action, frame.count) == (4, action, 2)
    assert frame.messages == [expected, expected]
    assert frame.errors == []
    assert legacy.encode_v4(frame) == vector


def test_errors() -> None:
    upd = bytes(StateUpdC())
    good = bytes(V4Header(4, 0, 4, 1, (c_uint8 * 16)())) + upd
    cases = [(good[:10], "hdrops"), (bytes([5]) + good[1:], "badver"),
             (good[:2] + bytes([11]) + good[3:], "badact"),
             (good[:2] + bytes([6]) + good[3:], "badact"),  # INS_F not implemented
             (good[:3] + bytes([2]) + good[4:], "badlen")]
    for data, reason in cases:
        with pytest.raises(WireError) as ei:
            legacy.decode_v4(data)
        assert ei.value.reason == reason
    with pytest.raises(WireError):
        legacy.encode_v4(legacy.V4Frame(4, [legacy.StateUpd()] * 256))


def test_v4_badval_noted() -> None:
    st = State45()
    _fill_state(st, "openbsd45")
    st.src.state = 13
    vector = bytes(V4Header(4, 0, 1, 1, (c_uint8 * 16)())) + bytes(st)
    frame = legacy.decode_v4(vector)
    assert frame.invalid == [0] and frame.errors == ["badval: INS[0] src.state 13"]
    assert isinstance(c_uint16, type)
