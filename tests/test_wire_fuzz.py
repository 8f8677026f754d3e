"""Decoders on hostile input raise WireError and nothing else (DESIGN.md: peers are
untrusted). Example counts come from PFCLUSTER_FUZZ_EXAMPLES (100k in CI)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from conftest import fuzz_settings
from pfcluster.pfsync import legacy, wire

ALL = (*wire.DIALECTS, "v4")


def _decode(data: bytes, dialect: str) -> None:
    try:
        if dialect == "v4":
            legacy.decode_v4(data)
        else:
            wire.decode(data, dialect)
    except wire.WireError as e:
        assert e.reason in {"hdrops", "badver", "badlen", "badact"}, e
        # past the header, the error carries the frame read so far, its reason last
        assert (e.frame is None) == (e.reason == "hdrops"), e
        if e.frame is not None:
            assert e.frame.errors[-1].startswith(e.reason + ":"), (e, e.frame.errors)


def _seed_frames() -> dict[str, bytes]:
    """One valid frame per dialect with several message types, to mutate."""
    out: dict[str, bytes] = {}
    for d in wire.DIALECTS:
        a = wire.ACTIONS[d]
        key = wire.StateKey(
            [wire.addr_from_str("192.0.2.1"), wire.addr_from_str("192.0.2.2")], [1, 2]
        )
        st_ = wire.State(key=[key, key], af=2, proto=6, timeout=2, ifname="em0")
        secs = [
            wire.Section("INS", a["INS"], messages=[st_]),
            wire.Section("UPD_C", a["UPD_C"], messages=[wire.UpdC(1), wire.UpdC(2)]),
            wire.Section("DEL_C", a["DEL_C"], messages=[wire.DelC(3, 4)]),
            wire.Section("BUS", a["BUS"], messages=[wire.Bus(1, 2, 1)]),
            wire.Section("CLR", a["CLR"], messages=[wire.Clr("em0", 5)]),
        ]
        out[d] = wire.encode(wire.Frame(wire.VERSION[d], sections=secs), d)
    upd = legacy.StateUpd(1, wire.StatePeer(), wire.StatePeer(), 2, 3, 2, 1)
    out["v4"] = legacy.encode_v4(legacy.V4Frame(4, [upd, upd, upd]))
    return out


SEEDS = _seed_frames()
# Byte offsets of the count (and, in openbsd6, len) fields of the first two subheaders:
# the INS section comes first, so the second subheader follows one state record.
COUNT_FIELDS = {
    d: (21, 22, 23, *(24 + wire.record_size(d, "INS") + k for k in (1, 2, 3)))
    for d in wire.DIALECTS
}


@fuzz_settings()
@given(st.sampled_from(ALL), st.binary(max_size=600))
def test_random_bytes(dialect: str, data: bytes) -> None:
    _decode(data, dialect)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    dialect = draw(st.sampled_from(ALL))
    data = bytearray(SEEDS[dialect])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "byte", "lenfield", "countfield", "extend"]))
        if not data:
            break
        if op == "flip":
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "byte":
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "lenfield" and len(data) >= 4:
            data[2:4] = draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
        elif op == "countfield":
            # corrupt a subheader count/len (v4: the u8 count at 3)
            i = 3 if dialect == "v4" else draw(st.sampled_from(COUNT_FIELDS[dialect]))
            if i < len(data):
                data[i] = draw(st.integers(0, 255))
        elif op == "extend":
            data += draw(st.binary(max_size=64))
    return dialect, bytes(data)


@fuzz_settings()
@given(mutated())
def test_mutated_frames(dm: tuple[str, bytes]) -> None:
    _decode(dm[1], dm[0])


@fuzz_settings(max(200, fuzz_settings().max_examples // 10))
@given(st.sampled_from(wire.DIALECTS), st.binary(max_size=200), st.integers(0, 255))
def test_decode_ip_random(dialect: str, data: bytes, ttl: int) -> None:
    hdr = bytearray(20)
    hdr[0], hdr[8], hdr[9] = 0x45, ttl, 240
    hdr[2:4] = (20 + len(data)).to_bytes(2, "big")
    for packet in (bytes(hdr) + data, data):
        try:
            env, _frame = wire.decode_ip(packet, dialect)
        except wire.WireError as e:
            assert e.reason in {"hdrops", "badproto", "badver", "badlen", "badact"}, e
        else:
            assert env.proto == 240 and env.version in (4, 6)


def test_seed_frames_are_valid() -> None:
    """The mutations start from real frames, and "countfield" hits count fields."""
    for d in wire.DIALECTS:
        frame = wire.decode(SEEDS[d], d)
        assert frame.errors == []
        assert [s.action for s in frame.sections][:5] == ["INS", "UPD_C", "DEL_C", "BUS", "CLR"]
        second = COUNT_FIELDS[d][3] - 1
        assert SEEDS[d][second] == wire.ACTIONS[d]["UPD_C"]
        assert int.from_bytes(SEEDS[d][second + 2 : second + 4], "big") == 2
    assert legacy.decode_v4(SEEDS["v4"]).count == 3
