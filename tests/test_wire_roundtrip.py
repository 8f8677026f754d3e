"""Hypothesis round trips: Frame -> encode -> decode == Frame, and decode -> encode == bytes,
for every message type of every dialect."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from pfcluster.pfsync import wire
from pfcluster.pfsync.wire import State, StateKey, StatePeer

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
i32 = st.integers(-(2**31), 2**31 - 1)
addr = st.binary(min_size=16, max_size=16)
ifname = st.text(st.characters(min_codepoint=1, max_codepoint=255), max_size=16)

peer = st.builds(StatePeer, u16, u8, u8, u32, u32, u32, u32, u16, u16, u8, u8)


def keys(v6: bool) -> st.SearchStrategy[list[StateKey]]:
    key = st.builds(StateKey, st.lists(addr, min_size=2, max_size=2),
                    st.lists(u16, min_size=2, max_size=2),
                    u16 if v6 else st.just(0), u8 if v6 else st.just(0))
    return st.lists(key, min_size=2, max_size=2)


_KIND_STRAT: dict[str, Any] = {"u8": u8, "u16": u16, "u32": u32, "u64": u64, "i32": i32,
                               "ifname": ifname, "addr": addr, "peer": peer,
                               "u64pair": st.lists(u64, min_size=2, max_size=2),
                               "i32pair": st.lists(i32, min_size=2, max_size=2),
                               "u8pair": st.lists(u8, min_size=2, max_size=2)}


def state_for(layout: str) -> st.SearchStrategy[State]:
    fields: dict[str, Any] = {}
    for name, kind in wire._STATE_LAYOUTS[layout]:
        if kind in ("keys5", "keys6"):
            fields[name] = keys(kind == "keys6")
        else:
            fields[name] = _KIND_STRAT[kind]
    return st.fixed_dictionaries(fields).map(lambda d: State(**d))


def message_strategy(dialect: str, name: str) -> st.SearchStrategy[Any]:
    v6 = dialect == "openbsd6"
    if name in ("INS", "UPD", "DEL", "INS_1301", "UPD_1301"):
        layout = dialect
        if name.endswith("1301") or (dialect == "freebsd1400" and name == "DEL"):
            layout = "freebsd1301"
        return state_for(layout)
    return {
        "CLR": st.builds(wire.Clr, ifname, u32),
        "INS_ACK": st.builds(wire.InsAck, u64, u32),
        "UPD_REQ": st.builds(wire.UpdReq, u64, u32),
        "DEL_C": st.builds(wire.DelC, u64, u32),
        "UPD_C": st.builds(wire.UpdC, u64, peer, peer, u32, u32, u8, u8 if v6 else st.just(0)),
        "BUS": st.builds(wire.Bus, u32, u32, u8),
        "TDB": st.builds(
            wire.Tdb,
            u32,
            st.binary(min_size=28, max_size=28),
            u64 if v6 else u32,
            u64,
            u8,
            u8,
            u16 if v6 else st.just(0),
        ),
    }[name]


NAMES = {d: [n for n in wire.ACTIONS[d] if wire.TABLES[d][wire.ACTIONS[d][n]][2] is not None
             and n != "EOF"] for d in wire.DIALECTS}


@st.composite
def frames(draw: st.DrawFn) -> tuple[str, wire.Frame]:
    dialect = draw(st.sampled_from(wire.DIALECTS))
    sections = []
    budget = 4000
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(NAMES[dialect]))
        size = wire.record_size(dialect, name)
        n = draw(st.integers(0, max(0, min(3, budget // size))))
        budget -= n * size
        msgs = draw(st.lists(message_strategy(dialect, name), min_size=n, max_size=n))
        sections.append(wire.Section(name, wire.ACTIONS[dialect][name], messages=msgs))
    if dialect == "openbsd45":
        eof = draw(st.builds(wire.Eof, st.binary(min_size=20, max_size=20)))
        sections.append(wire.Section("EOF", 12, 1, [eof]))
    elif dialect != "openbsd6":
        sections.append(wire.Section("EOF", 12, 1, []))
    cksum = draw(st.binary(min_size=16, max_size=16))
    return dialect, wire.Frame(wire.VERSION[dialect], None, cksum, sections)


@given(frames())
def test_encode_decode_roundtrip(df: tuple[str, wire.Frame]) -> None:
    dialect, frame = df
    data = wire.encode(frame, dialect)
    back = wire.decode(data, dialect)
    assert back.len == len(data)
    assert back.sections == frame.sections
    assert back.pfcksum == frame.pfcksum
    assert wire.encode(back, dialect) == data
    # every badval note points at a message the checks reject, and nothing else
    assert len(back.errors) == len(back.invalid)


@given(frames(), st.sampled_from(["192.0.2.1", "2001:db8::1"]))
def test_ip_roundtrip(df: tuple[str, wire.Frame], src: str) -> None:
    dialect, frame = df
    dst = "224.0.0.240" if ":" not in src else "ff12::f0"
    packet = wire.encode_ip(frame, dialect, src, dst)
    env, back = wire.decode_ip(packet, dialect)
    assert (env.src, env.dst, env.ttl, env.proto) == (src, dst, 255, 240)
    if env.version == 4:
        assert env.tos == 0x10 and env.df
    assert back.sections == frame.sections
