"""io/nfq.py without a kernel: the message encoders, the packet-message decoder (hand-built
messages and a fuzzer: NfqError or a consistent descriptor, nothing else) and the verdict
batching rules (a batch verdict never covers a held id)."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import FUZZ_EXAMPLES, fuzz_settings
from pfcluster.io import mmsg, nfq
from pfcluster.io.nfq import (
    MSG_PACKET,
    MSG_VERDICT,
    MSG_VERDICT_BATCH,
    NF_ACCEPT,
    NF_DROP,
    NfqError,
    QueuedPacket,
    Verdicts,
    parse_packet,
    walk,
)
from pfcluster.packet import MalformedPacket, parse_into
from pfcluster.packet import Packet as PfPacket


def attr(atype: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), atype) + value + b"\0" * (-len(value) & 3)


def packet_msg(packet_id: int = 7, hook: int = 2, payload: bytes | None = b"\x45" + b"\0" * 19,
               indev: int | None = 3, outdev: int | None = 4, cap_len: int | None = None,
               extra: bytes = b"") -> bytes:
    attrs = attr(nfq.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, hook))
    if indev is not None:
        attrs += attr(nfq.NFQA_IFINDEX_INDEV, struct.pack("!I", indev))
    if outdev is not None:
        attrs += attr(nfq.NFQA_IFINDEX_OUTDEV, struct.pack("!I", outdev))
    attrs += extra
    if cap_len is not None:
        attrs += attr(nfq.NFQA_CAP_LEN, struct.pack("!I", cap_len))
    if payload is not None:
        attrs += attr(nfq.NFQA_PAYLOAD, payload)
    return nfq.message(MSG_PACKET, 0, attrs, flags=0)


def decode(msg: bytes) -> QueuedPacket:
    mv = memoryview(msg)
    ((mtype, _seq, off, end),) = walk(mv, len(mv))
    assert mtype == MSG_PACKET
    return parse_packet(mv, off + 4, end, QueuedPacket())


def verdicts_in(data: bytes, payloads: dict[int, bytes] | None = None
                ) -> list[tuple[str, int, int]]:
    """(kind, verdict, id) of each verdict message in one sendmsg buffer; kind is
    "payload" for a single verdict carrying NFQA_PAYLOAD (stored in ``payloads``)."""
    out = []
    mv = memoryview(data)
    for mtype, _seq, off, end in walk(mv, len(mv)):
        family, version, res_id = struct.unpack_from("!BBH", mv, off)
        assert (family, version, res_id) == (socket.AF_UNSPEC, 0, 5)
        alen, atype = struct.unpack_from("=HH", mv, off + 4)
        assert (alen, atype) == (12, nfq.NFQA_VERDICT_HDR)
        verdict, packet_id = struct.unpack_from("!II", mv, off + 8)
        kind = {MSG_VERDICT: "single", MSG_VERDICT_BATCH: "batch"}[mtype]
        if end - off > 16:
            assert kind == "single"
            plen, ptype = struct.unpack_from("=HH", mv, off + 16)
            assert ptype == nfq.NFQA_PAYLOAD
            assert end - off == 16 + ((plen + 3) & ~3)  # padded to 4, nothing after
            if payloads is not None:
                payloads[packet_id] = bytes(mv[off + 20:off + 16 + plen])
            kind = "payload"
        else:
            assert end - off == 16
        out.append((kind, verdict, packet_id))
    return out


# --- decoder -------------------------------------------------------------------------


def test_packet_message_fields() -> None:
    payload = bytes(range(40))
    qp = decode(packet_msg(packet_id=0xDEADBEEF, hook=3, payload=payload, indev=None,
                           outdev=9, extra=attr(nfq.NFQA_MARK, b"\0\0\0\1")))
    assert (qp.packet_id, qp.hook, qp.hw_protocol, qp.indev, qp.outdev) == \
        (0xDEADBEEF, 3, 0x0800, 0, 9)
    assert bytes(qp.payload) == payload and qp.wire_len == 40


def test_cap_len_gives_the_wire_length_of_a_cut_copy() -> None:
    qp = decode(packet_msg(payload=b"\x45" * 256, cap_len=1500))
    assert len(qp.payload) == 256 and qp.wire_len == 1500


def test_unaligned_payload_last_and_several_messages_in_one_datagram() -> None:
    a = packet_msg(packet_id=1, payload=b"abc")  # 3-byte payload: message not 4-aligned
    b = packet_msg(packet_id=2, payload=b"defgh")
    data = a + b"\0" * (-len(a) & 3) + b
    mv = memoryview(data)
    msgs = walk(mv, len(mv))
    assert [m[0] for m in msgs] == [MSG_PACKET, MSG_PACKET]
    got = [(q.packet_id, bytes(q.payload)) for q in
           (parse_packet(mv, off + 4, end, QueuedPacket()) for _, _, off, end in msgs)]
    assert got == [(1, b"abc"), (2, b"defgh")]


@pytest.mark.parametrize(("msg", "what", "packet_id"), [
    (nfq.message(MSG_PACKET, 0, attr(nfq.NFQA_PAYLOAD, b"x")), "without a packet header",
     None),
    (packet_msg(payload=None, extra=attr(nfq.NFQA_MARK, b"\0\0\0\0")), "without a payload", 7),
    (packet_msg(cap_len=10, payload=b"\x45" * 20), "captured length 10", 7),
])
def test_missing_or_inconsistent_attributes(msg: bytes, what: str, packet_id: int | None) -> None:
    mv = memoryview(msg)
    ((_t, _s, off, end),) = walk(mv, len(mv))
    with pytest.raises(NfqError, match=what) as info:
        parse_packet(mv, off + 4, end, QueuedPacket())
    assert info.value.packet_id == packet_id


def test_attribute_overrunning_the_message_is_refused() -> None:
    msg = bytearray(packet_msg())
    # the payload attribute claims 8 more bytes than the message holds
    off = len(msg) - 20 - 4
    struct.pack_into("=H", msg, off, 4 + 20 + 8)
    mv = memoryview(bytes(msg))
    ((_t, _s, o, end),) = walk(mv, len(mv))
    with pytest.raises(NfqError, match="overruns") as info:
        parse_packet(mv, o + 4, end, QueuedPacket())
    assert info.value.packet_id == 7  # the header came first: the packet can be dropped


def test_netlink_length_past_the_datagram_is_refused() -> None:
    msg = packet_msg()
    with pytest.raises(NfqError, match="netlink length"):
        walk(memoryview(msg[:-4]), len(msg) - 4)


@fuzz_settings(max(1, FUZZ_EXAMPLES // 4))
@given(st.binary(max_size=200), st.integers(0, 300))
def test_fuzz_decoder_only_raises_nfqerror(data: bytes, cut: int) -> None:
    """Any bytes, and any well-formed message cut or overwritten: NfqError or a
    descriptor whose payload lies inside the message."""
    for blob in (data, packet_msg(payload=data)[:cut] if cut else packet_msg(payload=data),
                 packet_msg(payload=b"p" * 8)[:16] + data):
        mv = memoryview(blob)
        try:
            msgs = walk(mv, len(mv))
        except NfqError:
            continue
        for _t, _s, off, end in msgs:
            assert off <= end <= len(blob)
            try:
                qp = parse_packet(mv, off + 4, end, QueuedPacket())
            except NfqError:
                continue
            assert qp.wire_len >= len(qp.payload) and len(qp.payload) <= end - off


# --- encoders ------------------------------------------------------------------------


def test_config_message_binds_and_configures_in_one_message() -> None:
    msg = nfq.config_message(3, seq=99, cmd=nfq.NFQNL_CFG_CMD_BIND, copy_range=256,
                             max_len=4096, flags=nfq.NFQA_CFG_F_FAIL_OPEN,
                             mask=nfq.NFQA_CFG_F_FAIL_OPEN)
    mv = memoryview(msg)
    ((mtype, seq, off, end),) = walk(mv, len(mv))
    assert (mtype, seq) == (nfq.MSG_CONFIG, 99)
    flags = struct.unpack_from("=H", mv, 6)[0]
    assert flags == nfq.NLM_F_REQUEST | nfq.NLM_F_ACK
    assert struct.unpack_from("!BBH", mv, off) == (0, 0, 3)
    attrs = {}
    o = off + 4
    while o < end:
        alen, atype = struct.unpack_from("=HH", mv, o)
        attrs[atype] = bytes(mv[o + 4 : o + alen])
        o += (alen + 3) & ~3
    assert attrs[nfq.NFQA_CFG_CMD] == bytes([nfq.NFQNL_CFG_CMD_BIND, 0, 0, 0])
    assert attrs[nfq.NFQA_CFG_PARAMS] == struct.pack("!IB", 256, nfq.NFQNL_COPY_PACKET)
    assert attrs[nfq.NFQA_CFG_QUEUE_MAXLEN] == struct.pack("!I", 4096)
    assert attrs[nfq.NFQA_CFG_MASK] == attrs[nfq.NFQA_CFG_FLAGS] == struct.pack("!I", 1)


def test_verdict_message_layout() -> None:
    assert verdicts_in(nfq.verdict_message(5, 0x01020304, NF_DROP)) == \
        [("single", NF_DROP, 0x01020304)]
    assert verdicts_in(nfq.verdict_message(5, 9, NF_ACCEPT, batch=True)) == \
        [("batch", NF_ACCEPT, 9)]


# --- verdict batching ----------------------------------------------------------------


def test_accept_run_is_one_batch_and_drops_go_first() -> None:
    v = Verdicts(5)
    v.accept(10)
    v.drop(11)
    v.accept(12)
    v.accept(13)
    assert verdicts_in(v.take()) == [("single", NF_DROP, 11), ("batch", NF_ACCEPT, 13)]
    assert v.take() == b""


def test_batch_never_covers_a_held_id() -> None:
    v = Verdicts(5)
    v.accept(1)
    v.accept(2)
    v.hold(3)
    v.accept(4)
    v.accept(5)
    assert verdicts_in(v.take()) == [("batch", NF_ACCEPT, 2), ("single", NF_ACCEPT, 4),
                                     ("single", NF_ACCEPT, 5)]
    v.accept(6)  # still held: single
    v.release(3, accept=False)
    v.accept(7)  # nothing held any more: batches again
    v.accept(8)
    assert verdicts_in(v.take()) == [("single", NF_ACCEPT, 6), ("single", NF_DROP, 3),
                                     ("batch", NF_ACCEPT, 8)]


def test_payload_verdict_layout() -> None:
    out = bytearray()
    nfq.payload_verdict_into(out, 5, 0xDEADBEEF, NF_ACCEPT, b"\x45abcde")  # 6: padded to 8
    assert len(out) == 16 + 4 + 12 + 4 + 8
    assert struct.unpack_from("=IHH", out) == (len(out), MSG_VERDICT, nfq.NLM_F_REQUEST)
    assert out[-2:] == b"\0\0"
    payloads: dict[int, bytes] = {}
    assert verdicts_in(bytes(out), payloads) == [("payload", NF_ACCEPT, 0xDEADBEEF)]
    assert payloads == {0xDEADBEEF: b"\x45abcde"}


def test_accept_payload_closes_the_run_below_it_first() -> None:
    v = Verdicts(5)
    v.accept(1)
    v.accept(2)
    v.accept_payload(3, b"new packet")
    v.accept(4)
    v.accept(5)
    payloads: dict[int, bytes] = {}
    assert verdicts_in(v.take(), payloads) == [("batch", NF_ACCEPT, 2),
                                               ("payload", NF_ACCEPT, 3),
                                               ("batch", NF_ACCEPT, 5)]
    assert payloads == {3: b"new packet"}


def test_release_with_a_payload_and_a_drop_ignoring_it() -> None:
    v = Verdicts(5)
    v.hold(1)
    v.hold(2)
    v.accept_payload(3, b"three")
    v.release(2, accept=False, payload=b"ignored")
    v.release(1, accept=True, payload=b"one")
    payloads: dict[int, bytes] = {}
    assert verdicts_in(v.take(), payloads) == [("payload", NF_ACCEPT, 3),
                                               ("single", NF_DROP, 2),
                                               ("payload", NF_ACCEPT, 1)]
    assert payloads == {3: b"three", 1: b"one"}
    assert not v.held


def test_too_long_payload_is_refused_and_nothing_queued() -> None:
    v = Verdicts(5)
    v.accept(1)
    with pytest.raises(ValueError, match="payload"):
        v.accept_payload(2, bytes(nfq.MAX_PAYLOAD + 1))
    v.hold(3)
    with pytest.raises(ValueError, match="payload"):
        v.release(3, accept=True, payload=bytes(nfq.MAX_PAYLOAD + 1))
    assert v.held == {3}
    v.accept_payload(4, bytes(nfq.MAX_PAYLOAD))  # the largest that fits
    assert [k for k, _, _ in verdicts_in(v.take())] == ["batch", "payload"]


def test_split_messages_cuts_at_message_boundaries() -> None:
    v = Verdicts(5)
    sizes = [1400, 30000, 20, 60000, 9000, 40000]
    for i, size in enumerate(sizes, 1):
        v.accept_payload(i * 2, bytes([i]) * size)
        v.drop(i * 2 + 1)
    data = v.take()
    pieces = nfq.split_messages(data, nfq.SEND_CHUNK)
    assert b"".join(bytes(p) for p in pieces) == data
    assert len(pieces) > 1
    ids = []
    for piece in pieces:
        assert len(piece) <= nfq.SEND_CHUNK
        ids += [pid for _, _, pid in verdicts_in(bytes(piece))]  # whole messages only
    assert ids == [n for i in range(1, 7) for n in (i * 2, i * 2 + 1)]
    one = nfq.split_messages(data[:16 + 20 + 1400 + 0], 100)  # one message over the limit
    assert [len(p) for p in one] == [1436]


def test_no_batches_after_an_unreadable_packet() -> None:
    v = Verdicts(5)
    v.accept(1)
    v.no_batches()
    v.accept(3)
    assert verdicts_in(v.take()) == [("batch", NF_ACCEPT, 1), ("single", NF_ACCEPT, 3)]


@fuzz_settings(max(1, FUZZ_EXAMPLES // 10))
@given(st.lists(st.sampled_from(["accept", "drop", "hold", "release", "take", "rewrite",
                                 "release-rewritten"]), max_size=60))
def test_fuzz_batches_never_cover_held_or_dropped_ids(ops: list[str]) -> None:
    """Simulate the kernel's queue: every id gets exactly the verdict (and payload) we
    meant, a held id leaves only by its release, and a packet accepted with a new payload
    leaves after every accepted packet queued before it that was not held."""
    v = Verdicts(5)
    queued: set[int] = set()
    meant: dict[int, int] = {}
    got: dict[int, int] = {}
    meant_payload: dict[int, bytes] = {}
    got_payload: dict[int, bytes] = {}
    held: list[int] = []
    ever_held: set[int] = set()
    left: list[int] = []  # accepted ids in the order the kernel lets them go
    next_id = 1

    def apply(data: bytes) -> None:
        for kind, verdict, pid in verdicts_in(data, got_payload):
            cover = sorted(i for i in queued if i <= pid) if kind == "batch" else [pid]
            for i in cover:
                assert i in queued
                queued.discard(i)
                got[i] = verdict
                if verdict == NF_ACCEPT:
                    left.append(i)

    for op in ops:
        if op in ("accept", "drop", "hold", "rewrite"):
            pid = next_id
            next_id += 1
            queued.add(pid)
            if op == "accept":
                v.accept(pid)
                meant[pid] = NF_ACCEPT
            elif op == "drop":
                v.drop(pid)
                meant[pid] = NF_DROP
            elif op == "rewrite":
                meant_payload[pid] = b"P" * (pid % 7 + 20)
                v.accept_payload(pid, meant_payload[pid])
                meant[pid] = NF_ACCEPT
            else:
                v.hold(pid)
                held.append(pid)
                ever_held.add(pid)
        elif op.startswith("release") and held:
            pid = held.pop(0)
            if op == "release":
                v.release(pid, accept=True)
            else:
                meant_payload[pid] = b"R" * (pid % 5 + 20)
                v.release(pid, accept=True, payload=meant_payload[pid])
            meant[pid] = NF_ACCEPT
        elif op == "take":
            apply(v.take())
            assert set(held) <= queued
    apply(v.take())
    assert queued == set(held)
    assert got == meant
    assert got_payload == meant_payload
    order = {pid: i for i, pid in enumerate(left)}
    for p in meant_payload:
        if p not in ever_held:
            assert all(order[q] < order[p] for q in order if q < p and q not in ever_held)


# --- a capture cut short through pf's parser ----------------------------------------------


def _tcp4(payload_len: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 1234, 80, 1, 2, 5 << 4, 0x10, 1000, 0, 0)
    total = 20 + len(tcp) + payload_len
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 6, 0,
                     socket.inet_aton("198.51.100.2"), socket.inet_aton("203.0.113.2"))
    return ip + tcp + b"d" * payload_len


def test_parse_into_takes_a_cut_capture_with_its_wire_length() -> None:
    whole = _tcp4(1460)
    pkt = parse_into(PfPacket(), whole[:256], len(whole))
    assert (pkt.ip_len, pkt.p_len, pkt.th_off, pkt.truncated) == (1500, 1460, 20, True)
    with pytest.raises(MalformedPacket):  # without the wire length: cut short
        parse_into(PfPacket(), whole[:256])
    with pytest.raises(MalformedPacket):  # the IP length may not exceed the wire length
        parse_into(PfPacket(), whole[:256], 1400)
    full = parse_into(PfPacket(), whole, len(whole))
    assert full.truncated is False and full.p_len == 1460


# --- recvmmsg ------------------------------------------------------------------------------


@pytest.mark.skipif(not mmsg.available(), reason="libc has no recvmmsg")
def test_multi_receiver_takes_several_datagrams_and_flags_a_cut_one() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        m = mmsg.MultiReceiver(a.fileno(), 4, 100)
        assert m.receive() == 0  # nothing waiting: 0, not an exception
        for data in (b"x" * 10, b"y" * 101, b"z" * 100):
            b.send(data)
        assert m.receive() == 3
        assert m.lengths(3) == [10, -1, 100]
        assert bytes(m.view[0:10]) == b"x" * 10 and bytes(m.view[200:300]) == b"z" * 100


def test_mark_is_read_and_a_verdict_can_set_it() -> None:
    """A translating daemon carries the pf tag from PREROUTING to FORWARD in the mark."""
    assert decode(packet_msg()).mark == 0
    got = decode(packet_msg(extra=attr(nfq.NFQA_MARK, struct.pack("!I", 0x00057066))))
    assert got.mark == 0x00057066
    out = bytearray()
    nfq.payload_verdict_into(out, 5, 9, NF_ACCEPT, None, 0x00037066)
    assert len(out) == 16 + 4 + 12 + 8
    assert struct.unpack_from("=IHH", out) == (len(out), MSG_VERDICT, nfq.NLM_F_REQUEST)
    assert struct.unpack_from("=HH", out, 32) == (8, nfq.NFQA_MARK)
    assert struct.unpack_from("!I", out, 36) == (0x00037066,)
    both = bytearray()
    nfq.payload_verdict_into(both, 5, 9, NF_ACCEPT, b"\x45abc", 1)
    assert len(both) == 16 + 4 + 12 + 8 + 4 + 4
    assert struct.unpack_from("=HH", both, 40) == (8, nfq.NFQA_PAYLOAD)
