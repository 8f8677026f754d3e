"""Structure-aware fuzzing of the pfsync decoders: mutate *valid* frames where it hurts.

Random bytes rarely get past the header; edits aimed at the fields a walk trusts (header
length, subheader action/len/count, section boundaries, truncation, duplicated or
deleted sections, an IP envelope around the frame) get deep into every walk.
Each mutated frame is decoded in every dialect of its version, with ``raw_states`` on
and off, and v4 frames with ``decode_v4``.

Oracle (DESIGN.md, "peers are untrusted"): only ``WireError`` escapes, with a
pfsyncstats reason; a partial frame is consistent with what was read; the raw and
object walks agree section for section; and a frame that decodes re-encodes to bytes
that decode to the same messages; a decoder that loops fails after 5 s. Now that the
decoders no longer turn IndexError, struct.error and friends into "badlen", any such
exception fails here as the bug it is.

PFCLUSTER_FUZZ_EXAMPLES counts mutated *inputs* (each hypothesis example derives
INPUTS_PER_EXAMPLE of them from one edit tape, as tests/test_packet_fuzz.py does, so
hypothesis's per-example cost does not dominate a 100k run).
"""

from __future__ import annotations

import signal
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import batched_fuzz_settings
from pfcluster.pf.constants import PFTM_MAX
from pfcluster.pfsync import legacy, wire

INPUTS_PER_EXAMPLE = 4
FUZZ = batched_fuzz_settings(INPUTS_PER_EXAMPLE)

WALK_REASONS = {"hdrops", "badver", "badlen", "badact"}
IP_REASONS = WALK_REASONS | {"badproto"}
DIALECTS_OF_VERSION = {
    v: tuple(d for d in wire.DIALECTS if wire.VERSION[d] == v) for v in (5, 6)
}

# --------------------------------------------------------------------------- seeds


def _state(i: int, af: int, **kw: Any) -> wire.State:
    if af == 2:
        a, b = wire.addr_from_str("192.0.2.1"), wire.addr_from_str("198.51.100.2")
    else:
        a, b = wire.addr_from_str("2001:db8::1"), wire.addr_from_str("2001:db8::2")
    key = wire.StateKey([a, b], [1000 + i, 443])
    fields: dict[str, Any] = dict(
        id=(1 << 40) + i, ifname="em0\xe9" if i & 1 else "vio0", key=[key, key], af=af, proto=6,
        direction=1, timeout=2, creatorid=0xC0FFEE00 + i, packets=[i, 2 * i],
        bytes=[3 * i, 4 * i], src=wire.StatePeer(seqlo=i, seqhi=i + 1, state=4, wscale=0x87),
        dst=wire.StatePeer(seqlo=2 * i, state=4),
    )
    fields.update(kw)
    return wire.State(**fields)


def _messages(dialect: str, name: str) -> list[Any]:
    """Two messages of ``name``; the second state of INS is invalid (badval), so the
    walks also carry ``Frame.invalid`` entries through the mutations."""
    inet6 = wire.af_to_wire(dialect, 10)
    if name in ("INS", "UPD", "DEL", "INS_1301", "UPD_1301"):
        bad = {"timeout": PFTM_MAX} if name.startswith("INS") else {}
        return [_state(1, 2), _state(2, inet6, **bad)]
    if name == "UPD_C":
        return [wire.UpdC(7, wire.StatePeer(seqlo=5, state=4), creatorid=9, timeout=2),
                wire.UpdC(8, timeout=PFTM_MAX + 3)]
    if name in ("INS_ACK", "UPD_REQ", "DEL_C"):
        cls = {"INS_ACK": wire.InsAck, "UPD_REQ": wire.UpdReq, "DEL_C": wire.DelC}[name]
        return [cls(1, 2), cls(0, 0)]
    if name == "CLR":
        return [wire.Clr("em0", 5), wire.Clr("", 0)]
    if name == "BUS":
        return [wire.Bus(1, 2, 1), wire.Bus(1, 3, 2)]
    if name == "TDB":
        rdomain = {"rdomain": 3} if dialect == "openbsd6" else {}
        return [wire.Tdb(0x1000, bytes(range(28)), 16385, 99, 50, 3, **rdomain)]
    raise AssertionError(name)


def _full_frame(dialect: str) -> bytes:
    """One section of every action the dialect decodes (EOF appended by encode)."""
    secs = []
    for action, (name, _size, codec, _check) in sorted(wire.TABLES[dialect].items()):
        if codec is None or name == "EOF":
            continue
        secs.append(wire.Section(name, action, messages=_messages(dialect, name)))
    return wire.encode(wire.Frame(wire.VERSION[dialect], sections=secs), dialect)


def _v6_extras() -> list[bytes]:
    """openbsd6 frames with what only that walk has: a skipped unknown action, a sender
    whose records are longer than ours, a zero count."""
    iack = struct.pack("!QI", 5, 6)
    body = struct.pack("!BBH", 99, 2, 3) + bytes(range(24))  # unknown action, 8-byte msgs
    body += struct.pack("!BBH", 2, 4, 2) + iack + bytes(4) + iack + bytes(4)  # mlen 16 > 12
    body += struct.pack("!BBH", 7, 3, 0)  # DEL_C, count 0
    return [struct.pack("!BBH16s", 6, 0, 20 + len(body), bytes(16)) + body]


class Seed:
    """A valid frame and the offsets of its subheaders (where the walk's trust lies)."""

    __slots__ = ("data", "dialect", "subheaders")

    def __init__(self, dialect: str, data: bytes) -> None:
        self.dialect = dialect
        self.data = data
        self.subheaders: list[int] = []
        if dialect == "v4":
            return
        off = wire.HEADER_LEN
        while off + wire.SUBHEADER_LEN <= len(data):
            self.subheaders.append(off)
            action, dwords, count = struct.unpack_from("!BBH", data, off)
            entry = wire.TABLES[dialect].get(action)
            if dialect == "openbsd6":
                stride = dwords << 2
            else:
                stride = entry[1] if entry else 0
                if entry and entry[0] == "EOF":
                    break
            off += wire.SUBHEADER_LEN + stride * count


def _seeds() -> list[Seed]:
    out = []
    for d in wire.DIALECTS:
        out.append(Seed(d, _full_frame(d)))
        small = wire.Frame(wire.VERSION[d],
                           sections=[wire.Section("DEL_C", wire.ACTIONS[d]["DEL_C"],
                                                  messages=[wire.DelC(1, 2)])])
        out.append(Seed(d, wire.encode(small, d)))
    out += [Seed("openbsd6", data) for data in _v6_extras()]
    v4msgs: dict[int, list[Any]] = {
        0: [legacy.StateClr("em0", 1)],
        1: [_state(1, 2), _state(2, 24, timeout=PFTM_MAX)],
        2: [_state(3, 2)],
        3: [_state(4, 24)],
        4: [legacy.StateUpd(1, wire.StatePeer(), wire.StatePeer(state=4), 2, 3, 2, 1)] * 3,
        5: [legacy.StateDel(1, 2, 3, 4)] * 2,
        8: [legacy.StateUpdReq(1, 2)],
        9: [legacy.StateBus(1, 2, 1)],
        10: [wire.Tdb(1, bytes(28), 2, 3, 50, 1)],
    }
    out += [Seed("v4", legacy.encode_v4(legacy.V4Frame(a, m))) for a, m in v4msgs.items()]
    return out


SEEDS = _seeds()

# --------------------------------------------------------------------------- mutation


def _set16(data: bytearray, off: int, value: int) -> None:
    if off + 2 <= len(data):
        data[off : off + 2] = (value & 0xFFFF).to_bytes(2, "big")


def mutate(seed: Seed, tape: bytes) -> bytes:
    """Apply the edits the tape spells out, four bytes each: op, which, arg, arg.

    Unless an edit set the header length itself, it is rewritten to the new size at the
    end, so the walk goes past the "header len > packet" check into the sections.
    """
    data = bytearray(seed.data)
    subs = seed.subheaders or [2]  # v4: the action/count bytes sit at 2 and 3
    v4 = seed.dialect == "v4"
    fix_len = not v4
    i = 0
    while i + 4 <= len(tape) and data:
        op, a, b, c = tape[i] % 10, tape[i + 1], tape[i + 2], tape[i + 3]
        i += 4
        k = subs[a % len(subs)]
        v16 = (b << 8) | c
        if op == 0:  # a subheader count (v4: the u8 count)
            if v4:
                if len(data) > 3:
                    data[3] = (0, 1, data[3] - 1, data[3] + 1, 255, c)[b % 6] & 0xFF
            elif k + 4 <= len(data):
                orig = int.from_bytes(data[k + 2 : k + 4], "big")
                _set16(data, k + 2, (0, 1, 2, orig - 1, orig + 1, 2 * orig, 0xFFFF, v16)[b % 8])
        elif op == 1:  # openbsd6 message length in dwords (v5: the pad byte)
            if k + 1 < len(data):
                data[k + 1] = (0, 1, data[k + 1] - 1, data[k + 1] + 1, 0xFF, c)[b % 6] & 0xFF
        elif op == 2:  # an action: a plausible one or any byte
            if k < len(data):
                data[k] = c if b & 1 else c % 17
        elif op == 3:  # the header length (v4: the version byte)
            if v4:
                data[0] = 4 if b & 1 else c
                continue
            fix_len = False
            n = len(data)
            _set16(data, 2, (0, 19, 20, 21, n - 1, n + 1, n - c % 64, 0xFFFF, v16)[b % 9])
        elif op == 4:  # truncate near a subheader or anywhere
            cut = k + c % 24 - 8 if b & 1 else v16 % (len(data) + 1)
            del data[max(0, cut) :]
        elif op == 5:  # extend: tape bytes, zeros, or a copy of the frame's own tail
            n = c % 48
            if b % 3 == 0:
                data += tape[i : i + n]
                i += n
            elif b % 3 == 1:
                data += bytes(n)
            else:
                data += data[k:][:n]
        elif op == 6:  # bit flip
            data[v16 % len(data)] ^= 1 << (c & 7)
        elif op in (7, 8) and not v4:  # duplicate or delete one section
            j = a % len(subs)
            end = subs[j + 1] if j + 1 < len(subs) else len(data)
            piece = bytes(data[k:end])
            if op == 7:
                data[k:k] = piece
            else:
                del data[k:end]
        elif op == 9 and not v4:  # insert a subheader: action c, len/pad b, small count
            data[k:k] = struct.pack("!BBH", c % 17 if a & 1 else c, b, a % 4)
    if fix_len and len(data) >= 4:
        _set16(data, 2, len(data))
    return bytes(data)


# --------------------------------------------------------------------------- oracle


def _shape(frame: wire.Frame) -> list[tuple[Any, ...]]:
    return [(s.action, s.action_id, s.count, len(s.messages), s.mlen, s.skipped, s.truncated)
            for s in frame.sections]


def _no_badval(errors: list[str]) -> list[str]:
    return [e for e in errors if not e.startswith("badval:")]


def _check_frame(frame: wire.Frame, failed: bool) -> None:
    """What any frame a decoder hands back (whole or partial) must satisfy."""
    for n, s in enumerate(frame.sections):
        if s.truncated:
            assert failed and n == len(frame.sections) - 1, "only an error's last section"
            assert len(s.messages) <= s.count
        elif not (s.action == "EOF" and len(s.messages) <= 1):
            assert len(s.messages) == s.count, (s.action, s.count, len(s.messages))
    for si, mi in frame.invalid:
        assert 0 <= si < len(frame.sections) and 0 <= mi < len(frame.sections[si].messages)
    assert len(frame.invalid) == sum(e.startswith("badval:") for e in frame.errors)


def _decode(data: bytes, dialect: str, raw: bool) -> tuple[str | None, wire.Frame | None]:
    """(reason or None, frame) after checking what came out."""
    try:
        frame = wire.decode(data, dialect, raw_states=raw)
    except wire.WireError as e:
        assert e.reason in WALK_REASONS, e
        if e.reason == "hdrops":
            assert e.frame is None
            return e.reason, None
        f = e.frame
        assert isinstance(f, wire.Frame)
        assert f.errors and f.errors[-1].startswith(e.reason + ":"), (e, f.errors)
        _check_frame(f, True)
        return e.reason, f
    _check_frame(frame, False)
    return None, frame


def _roundtrip(frame: wire.Frame, dialect: str) -> None:
    """A frame that decoded re-encodes, and the result decodes to the same messages."""
    try:
        again = wire.encode(frame, dialect)
    except wire.WireError as e:  # only size can stop it: the input was bigger than a frame
        assert e.reason == "encode" and "exceeds 65535" in e.detail, e
        return
    back = wire.decode(again, dialect)

    def body(f: wire.Frame) -> list[tuple[Any, ...]]:
        return [(s.action, s.messages, s.skipped) for s in f.sections if s.action != "EOF"]

    assert body(back) == body(frame)
    assert back.errors == frame.errors and back.invalid == frame.invalid


def check(data: bytes, version_dialects: tuple[str, ...]) -> None:
    for dialect in version_dialects:
        reason, frame = _decode(data, dialect, False)
        raw_reason, raw_frame = _decode(data, dialect, True)
        assert raw_reason == reason, (dialect, reason, raw_reason)
        if frame is not None:
            assert raw_frame is not None
            assert _shape(raw_frame) == _shape(frame)
            assert _no_badval(raw_frame.errors) == _no_badval(frame.errors)
            if reason is None:
                _roundtrip(frame, dialect)


def check_v4(data: bytes) -> None:
    try:
        frame = legacy.decode_v4(data)
    except wire.WireError as e:
        assert e.reason in WALK_REASONS, e
        if e.reason == "hdrops":
            assert e.frame is None
            return
        f = e.frame
        assert isinstance(f, legacy.V4Frame) and f.errors[-1].startswith(e.reason + ":")
        assert len(f.messages) <= f.count
        return
    assert len(frame.messages) == frame.count
    assert all(0 <= i < frame.count for i in frame.invalid)
    assert legacy.decode_v4(legacy.encode_v4(frame)) == frame


def check_ip(data: bytes, dialect: str, tape: bytes) -> None:
    """The frame inside an IPv4 or IPv6 packet whose header the tape also edits."""
    t = (tape + bytes(4))[:4]
    if t[0] & 1:
        hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0x10, 20 + len(data), 0, 0x4000,
                                    255, 240, 0, bytes(4), bytes(4)))
        if t[1] & 1:
            hdr[0] = 0x40 | (t[2] & 0x0F)  # any IHL
        if t[1] & 2:
            hdr[2:4] = ((t[2] << 8) | t[3]).to_bytes(2, "big")  # any total length
        if t[1] & 4:
            hdr[8] = t[3]  # ttl
    else:
        ext = b""
        if t[1] & 1:  # a hop-by-hop header of (t[2] % 4 + 1) * 8 bytes, maybe saying
            # it is longer, maybe followed by another (next header 0) that is not there
            size_byte = t[2] if t[0] & 4 else t[2] % 4
            ext = bytes([0 if t[0] & 8 else 240, size_byte]) + bytes((t[2] % 4 + 1) * 8 - 2)
        plen = len(ext) + len(data)
        if t[1] & 2:
            plen = (t[2] << 8) | t[3]
        hdr = bytearray(struct.pack("!IHBB16s16s", 6 << 28, plen & 0xFFFF,
                                    0 if ext else 240, 255, bytes(16), bytes(16)))
        hdr += ext
    packet: bytes | memoryview = bytes(hdr) + data
    if t[1] & 8:
        packet = packet[: (t[3] * 3) % (len(packet) + 1)]
    if t[1] & 16:  # a view of signed bytes: indexing it must not give the walk negatives
        packet = memoryview(packet).cast("b")
    try:
        env, frame = wire.decode_ip(packet, dialect)
    except wire.WireError as e:
        assert e.reason in IP_REASONS, e
        return
    assert env.proto == 240 and env.version in (4, 6)
    _check_frame(frame, False)


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Fail instead of hanging when a decoder loops (SIGALRM, main thread only)."""

    def expire(_sig: int, _frame: Any) -> None:
        raise AssertionError(f"decoder still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _inputs(first: int, tape: bytes) -> list[tuple[Seed, bytes]]:
    # the same edits applied to seeds spread over the corpus (7 is coprime with its size)
    seeds = [SEEDS[(first + 7 * k) % len(SEEDS)] for k in range(INPUTS_PER_EXAMPLE)]
    return [(s, mutate(s, tape)) for s in seeds]


def check_all(first: int, tape: bytes) -> None:
    with _deadline(5.0):  # a decoder that loops fails the example instead of hanging
        _check_all(first, tape)


def _check_all(first: int, tape: bytes) -> None:
    for seed, data in _inputs(first, tape):
        try:
            if seed.dialect == "v4":
                check_v4(data)
            else:
                check(data, DIALECTS_OF_VERSION[wire.VERSION[seed.dialect]])
                check_ip(data, seed.dialect, tape)
        except Exception as exc:
            raise AssertionError(f"{seed.dialect} failing input: {data.hex()}") from exc


@FUZZ
@given(st.integers(0, len(SEEDS) - 1), st.binary(min_size=4, max_size=40))
def test_mutated_valid_frames(first: int, tape: bytes) -> None:
    check_all(first, tape)


def test_seeds_are_valid() -> None:
    from math import gcd

    assert gcd(7, len(SEEDS)) == 1
    for seed in SEEDS:
        if seed.dialect == "v4":
            v4 = legacy.decode_v4(seed.data)
            assert v4.count == len(v4.messages) > 0
            continue
        frame = wire.decode(seed.data, seed.dialect)
        assert not [e for e in frame.errors if not e.startswith("badval:")]
        assert len(seed.subheaders) == len(frame.sections) >= 1
        check(seed.data, (seed.dialect,))
    # the full frames reach every decodable action, with badval notes to carry
    for d in wire.DIALECTS:
        full = wire.decode(SEEDS[[s.dialect for s in SEEDS].index(d)].data, d)
        assert full.invalid
        decodable = {e[0] for e in wire.TABLES[d].values() if e[2] is not None}
        assert {s.action for s in full.sections} - {"EOF"} == decodable - {"EOF"}


# --------------------------------------------------------------------------- regressions


def test_ipv6_extension_walk_on_a_signed_byte_view() -> None:
    """Found by check_ip: split_ip read the extension header length as mv[off + 1], which
    a memoryview of format "b" returns signed, so a length byte 0xff made the header
    (-1 + 1) * 8 = 0 bytes long and the loop never advanced (0x80: a negative offset,
    IndexError). Views are now normalised to contiguous unsigned bytes first."""
    hop_by_hop = bytes([0, 0xFF]) + bytes(14)  # next header: hop-by-hop again
    packet = struct.pack("!IHBB16s16s", 6 << 28, 16, 0, 255, bytes(16), bytes(16)) + hop_by_hop
    views: list[Any] = [memoryview(packet), memoryview(packet).cast("b"),
                        memoryview(packet).cast("c")]
    for view in views:
        with _deadline(2.0), pytest.raises(wire.WireError) as ei:
            wire.decode_ip(view, "openbsd45")
        assert ei.value.reason == "hdrops"
    delc = wire.Section("DEL_C", 7, messages=[wire.DelC(1, 2)])
    frame = wire.encode(wire.Frame(5, sections=[delc]))
    v4 = SEEDS[-1].data
    strided = memoryview(bytes(b for x in frame for b in (x, 0)))[::2]
    odd: list[Any] = [memoryview(frame).cast("b"), memoryview(frame).cast("c"), strided]
    for view in odd:  # a strided view was a BufferError before it was copied
        assert wire.decode(view).sections[0] == delc
    assert legacy.decode_v4(memoryview(v4).cast("b")) == legacy.decode_v4(v4)


def test_oracle_fails_on_a_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle must be able to fail: a partial frame that claims more messages than
    it holds, or a decoder exception other than WireError, is reported."""
    with pytest.raises(AssertionError):
        _check_frame(wire.Frame(5, sections=[wire.Section("DEL_C", 7, 2, [wire.DelC()])]), False)

    def leaky(*a: Any, **kw: Any) -> wire.Frame:
        raise IndexError("walk bug")

    monkeypatch.setattr(wire, "decode", leaky)
    with pytest.raises(AssertionError, match="failing input"):
        check_all(0, b"\x06\x00\x00\x00")
