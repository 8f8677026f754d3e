"""nfnetlink_queue spoken directly: bind one queue, receive packets, give verdicts.

Why not the `netfilterqueue` package: it copies every packet whole, allocates a Packet
object per packet and sends one verdict message (one syscall) per packet, and it cannot
set the queue flags. Here:

- copy range: only the first `copy_range` bytes of each packet reach us (default 256,
  see DEFAULT_COPY_RANGE); a plain verdict makes the kernel forward its own skb, so the
  rest never needs to cross into user space. NFQA_CAP_LEN then gives the wire length.
- verdicts are collected in an output buffer and sent in one sendmsg per mini-batch; a
  run of accepts becomes one NFQNL_MSG_VERDICT_BATCH ("accept every queued id <= N").
  A batch verdict also releases a *held* (deferred) packet below N, so while any packet
  is held the accepts are sent one by one (see `Verdicts`).
- NFQA_CFG_F_FAIL_OPEN on request: the kernel accepts instead of dropping when the queue
  or our socket is full. Default fail closed: a full queue drops.

Facts (constants, struct layouts) are from the kernel's uapi headers
linux/netlink.h, linux/netfilter/nfnetlink.h and linux/netfilter/nfnetlink_queue.h.
Netlink headers are in host byte order, nfnetlink payloads big endian.

The decoders raise only NfqError; `python -m pfcluster.io.nfq accept-all --queue N` is
an accept-everything consumer on this binding (a baseline for `bench daemon`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from pfcluster.io import mmsg
from pfcluster.io.mmsg import MultiReceiver

log = logging.getLogger("pfcluster.nfq")

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

# linux/netlink.h
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

# linux/netfilter/nfnetlink.h
NFNL_SUBSYS_QUEUE = 3
NFNETLINK_V0 = 0

# linux/netfilter/nfnetlink_queue.h
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
MSG_PACKET = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
MSG_VERDICT = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT
MSG_CONFIG = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
MSG_VERDICT_BATCH = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
NFQA_TIMESTAMP = 4
NFQA_IFINDEX_INDEV = 5
NFQA_IFINDEX_OUTDEV = 6
NFQA_HWADDR = 9
NFQA_PAYLOAD = 10
NFQA_CAP_LEN = 13
NFQA_SKB_INFO = 14

NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_CFG_CMD_PF_BIND = 3
NFQNL_CFG_CMD_PF_UNBIND = 4
NFQNL_COPY_PACKET = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1 << 0

NF_DROP = 0
NF_ACCEPT = 1

# What pf reads of a packet: IPv4 header (<= 60) + TCP header with options (<= 60) = 120;
# an ICMP error: outer IPv4 (60) + ICMP (8) + quoted IPv4 (60) + 8 bytes of its upper
# layer = 136; IPv6: 40 + extension headers + TCP (<= 60), an ND target at +64. 256
# leaves 156 bytes for IPv6 extension headers before a TCP header; a packet whose headers
# end past the copy is dropped as malformed (fail closed), `--copy-range` raises it.
DEFAULT_COPY_RANGE = 256
MAX_COPY_RANGE = 0xFFFF - 4  # the kernel caps copy_range at 0xffff - NLA_HDRLEN
DEFAULT_MAX_LEN = 4096
RECV_BUFFER = 0x10000 + 4096  # one whole-packet message (copy range up to 64 KiB)
# recvmmsg: datagrams per call, and room per datagram beyond the copied bytes (netlink and
# nfgen headers, packet header, interfaces, hardware address, timestamp, lengths: ~150).
MULTI_SLOTS = 64
MESSAGE_OVERHEAD = 1024

_NLMSGHDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_NFGEN = struct.Struct("!BBH")
_PACKET_HDR = struct.Struct("!IHB")
_BE32 = struct.Struct("!I")
_BE32X2 = struct.Struct("!II")
_NLMSGERR = struct.Struct("=i")
_CFG_CMD = struct.Struct("!BxH")
_CFG_PARAMS = struct.Struct("!IB")

_unpack_hdr = _NLMSGHDR.unpack_from
_unpack_nla = _NLA.unpack_from
_unpack_pkt_hdr = _PACKET_HDR.unpack_from
_unpack_be32 = _BE32.unpack_from


class NfqError(ValueError):
    """A netlink message from the queue that cannot be read; the only error the decoders
    raise. `packet_id` is set when the packet's id was read (it can still be dropped)."""

    def __init__(self, message: str, packet_id: int | None = None) -> None:
        super().__init__(message)
        self.packet_id = packet_id


class QueuedPacket:
    """One queued packet, refilled in place for every message (no object per packet).

    `payload` is a view into the receive buffer: valid until the next receive.
    `wire_len` is the packet's full length (NFQA_CAP_LEN when the copy was cut short)."""

    __slots__ = ("hook", "hw_protocol", "indev", "mark", "outdev", "packet_id", "payload",
                 "wire_len")

    def __init__(self) -> None:
        self.packet_id = 0
        self.hw_protocol = 0
        self.hook = 0
        self.indev = 0
        self.outdev = 0
        self.mark = 0  # the packet's skb mark (NFQA_MARK; 0 when the kernel sent none)
        self.payload = memoryview(b"")
        self.wire_len = 0


# --- encoders ------------------------------------------------------------------------


def _attr(atype: int, value: bytes) -> bytes:
    pad = (-len(value)) & 3
    return _NLA.pack(4 + len(value), atype) + value + b"\0" * pad


def message(mtype: int, queue: int, attrs: bytes, *, seq: int = 0, flags: int = NLM_F_REQUEST,
            family: int = socket.AF_UNSPEC) -> bytes:
    """One nfnetlink message: nlmsghdr + nfgenmsg (res_id = queue number) + attributes."""
    body = _NFGEN.pack(family, NFNETLINK_V0, queue) + attrs
    return _NLMSGHDR.pack(16 + len(body), mtype, flags, seq, 0) + body


def config_message(queue: int, *, seq: int, cmd: int | None = None, pf: int = 0,
                   copy_range: int | None = None, max_len: int | None = None,
                   flags: int | None = None, mask: int | None = None,
                   family: int = socket.AF_UNSPEC) -> bytes:
    """NFQNL_MSG_CONFIG with the attributes given (one message binds and configures)."""
    attrs = b""
    if cmd is not None:
        attrs += _attr(NFQA_CFG_CMD, _CFG_CMD.pack(cmd, pf))
    if copy_range is not None:
        attrs += _attr(NFQA_CFG_PARAMS, _CFG_PARAMS.pack(copy_range, NFQNL_COPY_PACKET))
    if max_len is not None:
        attrs += _attr(NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(max_len))
    if flags is not None:
        attrs += _attr(NFQA_CFG_MASK, _BE32.pack(flags if mask is None else mask))
        attrs += _attr(NFQA_CFG_FLAGS, _BE32.pack(flags))
    return message(MSG_CONFIG, queue, attrs, seq=seq, flags=NLM_F_REQUEST | NLM_F_ACK,
                   family=family)


def verdict_prefix(queue: int, batch: bool, verdict: int) -> bytes:
    """A 32-byte verdict message without its last 4 bytes (the packet id, big endian)."""
    whole = message(MSG_VERDICT_BATCH if batch else MSG_VERDICT, queue,
                    _attr(NFQA_VERDICT_HDR, _BE32X2.pack(verdict, 0)))
    return whole[:-4]


def verdict_message(queue: int, packet_id: int, verdict: int, batch: bool = False) -> bytes:
    return verdict_prefix(queue, batch, verdict) + _BE32.pack(packet_id)


# NFQA_PAYLOAD's length is the attribute's 16-bit length less its 4-byte header.
MAX_PAYLOAD = 0xFFFF - 4


def payload_verdict_into(out: bytearray, queue: int, packet_id: int, verdict: int,
                         payload: bytes | bytearray | memoryview | None,
                         mark: int | None = None) -> None:
    """Append a single verdict carrying NFQA_PAYLOAD and/or NFQA_MARK: the kernel
    replaces the queued packet with ``payload`` (nfqnl_mangle trims or grows the skb to
    its length, so it must be the whole packet; its checksum is then not verified) and
    sets the packet's mark to ``mark``."""
    size = len(payload) if payload is not None else 0
    if size > MAX_PAYLOAD:
        raise ValueError(f"verdict payload of {size} bytes > {MAX_PAYLOAD}")
    pad = (-size) & 3
    length = 32 + (8 if mark is not None else 0) + (4 + size + pad if payload is not None else 0)
    out += _NLMSGHDR.pack(length, MSG_VERDICT, NLM_F_REQUEST, 0, 0)
    out += _NFGEN.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue)
    out += _NLA.pack(12, NFQA_VERDICT_HDR)
    out += _BE32X2.pack(verdict, packet_id)
    if mark is not None:
        out += _NLA.pack(8, NFQA_MARK)
        out += _BE32.pack(mark & 0xFFFFFFFF)
    if payload is not None:
        out += _NLA.pack(4 + size, NFQA_PAYLOAD)
        out += payload
        if pad:
            out += b"\0" * pad


# --- decoders ------------------------------------------------------------------------


def parse_packet(buf: memoryview, off: int, end: int, out: QueuedPacket) -> QueuedPacket:
    """Fill `out` from the NFQNL_MSG_PACKET message whose attributes span buf[off:end]
    (`off` just past the nfgenmsg). Raises NfqError on any length that does not fit."""
    packet_id = -1
    indev = outdev = mark = 0
    payload = None
    cap_len = -1
    hook = hw = 0
    while off < end:
        if end - off < 4:
            raise NfqError(f"{end - off} stray bytes after the attributes", _id(packet_id))
        alen, atype = _unpack_nla(buf, off)
        if alen < 4 or off + alen > end:
            raise NfqError(f"attribute length {alen} at {off} overruns the message",
                           _id(packet_id))
        atype &= NLA_TYPE_MASK
        if atype == NFQA_PAYLOAD:
            payload = buf[off + 4 : off + alen]
        elif atype == NFQA_PACKET_HDR:
            if alen < 11:
                raise NfqError(f"packet header attribute of {alen} bytes")
            packet_id, hw, hook = _unpack_pkt_hdr(buf, off + 4)
        elif atype in (NFQA_IFINDEX_INDEV, NFQA_IFINDEX_OUTDEV, NFQA_CAP_LEN, NFQA_MARK):
            if alen < 8:
                raise NfqError(f"attribute {atype} of {alen} bytes", _id(packet_id))
            value = _unpack_be32(buf, off + 4)[0]
            if atype == NFQA_IFINDEX_INDEV:
                indev = value
            elif atype == NFQA_IFINDEX_OUTDEV:
                outdev = value
            elif atype == NFQA_MARK:
                mark = value
            else:
                cap_len = value
        off += (alen + 3) & ~3
    if packet_id < 0:
        raise NfqError("packet message without a packet header")
    if payload is None:
        raise NfqError("packet message without a payload", packet_id)
    if cap_len >= 0 and cap_len < len(payload):
        raise NfqError(f"captured length {cap_len} < {len(payload)} bytes copied", packet_id)
    out.packet_id = packet_id
    out.hw_protocol = hw
    out.hook = hook
    out.indev = indev
    out.outdev = outdev
    out.mark = mark
    out.payload = payload
    out.wire_len = cap_len if cap_len >= 0 else len(payload)
    return out


def _id(packet_id: int) -> int | None:
    return packet_id if packet_id >= 0 else None


def walk(buf: memoryview, n: int, off: int = 0) -> list[tuple[int, int, int, int]]:
    """The netlink messages in buf[off:n]: (type, seq, offset of the payload, end). A
    message whose length does not fit raises NfqError (the rest of the datagram with it)."""
    msgs = []
    while off < n:
        if n - off < 16:
            raise NfqError(f"{n - off} bytes: shorter than a netlink header")
        mlen, mtype, _flags, seq, _pid = _unpack_hdr(buf, off)
        if mlen < 16 or off + mlen > n:
            raise NfqError(f"netlink length {mlen} at {off} with {n - off} bytes left")
        msgs.append((mtype, seq, off + 16, off + mlen))
        off += (mlen + 3) & ~3
    return msgs


def error_code(buf: memoryview, off: int, end: int) -> int:
    """The errno of an NLMSG_ERROR message (0: an acknowledgement)."""
    if end - off < 4:
        raise NfqError("netlink error message cut short")
    return -_NLMSGERR.unpack_from(buf, off)[0]


# A netlink sendmsg longer than the socket's send buffer (net.core.wmem_default, 208 KiB
# by default) fails whole with EMSGSIZE; verdicts with payloads are sent in pieces.
SEND_CHUNK = 0x10000


def split_messages(data: bytes, limit: int) -> list[memoryview]:
    """``data`` (whole netlink messages, as Verdicts builds them) cut at message
    boundaries into pieces of at most ``limit`` bytes, or one message when a single
    one is longer."""
    mv = memoryview(data)
    pieces = []
    start = off = 0
    n = len(data)
    while off < n:
        mlen = _unpack_hdr(mv, off)[0]
        if mlen < 16:
            raise ValueError(f"netlink length {mlen} at {off}")
        step = (mlen + 3) & ~3
        if off > start and off + step - start > limit:
            pieces.append(mv[start:off])
            start = off
        off += step
    if start < n:
        pieces.append(mv[start:n])
    return pieces


# --- verdict batching ----------------------------------------------------------------


class Verdicts:
    """Verdict messages for one queue, collected and sent in one sendmsg.

    Accepts are kept as a run ending at `run_last` and sent as one batch verdict when
    no packet is held; a hold first closes the run below it (ids only grow, so the run
    is below the held id), and while anything is held every verdict is a single one,
    since a batch verdict would release the held ids under it. Drops are single
    messages placed before the batch message, so the kernel drops them first.
    An accept with a new payload (a translated packet) is a single verdict that first
    closes the run below it, so the packets queued before it leave before it, in order;
    a later batch verdict covering its id finds it already gone.
    """

    __slots__ = ("_accept", "_batch", "_drop", "batch_ok", "batches", "held", "out",
                 "queue", "run_last", "singles")

    def __init__(self, queue: int) -> None:
        self.queue = queue
        self._accept = verdict_prefix(queue, False, NF_ACCEPT)
        self._drop = verdict_prefix(queue, False, NF_DROP)
        self._batch = verdict_prefix(queue, True, NF_ACCEPT)
        self.out = bytearray()
        self.run_last = -1  # last id of the pending accept run, -1 for none
        self.held: set[int] = set()
        self.batch_ok = True  # cleared for good after a packet whose id we could not read
        self.batches = 0
        self.singles = 0

    def accept(self, packet_id: int) -> None:
        if self.held or not self.batch_ok:
            self.out += self._accept
            self.out += _BE32.pack(packet_id)
            self.singles += 1
        else:
            self.run_last = packet_id

    def drop(self, packet_id: int) -> None:
        self.out += self._drop
        self.out += _BE32.pack(packet_id)
        self.singles += 1

    def accept_payload(self, packet_id: int, payload: bytes | bytearray | memoryview | None,
                       mark: int | None = None) -> None:
        """Accept `packet_id` with `payload` (the whole rewritten packet) in its place
        and/or with a new skb `mark`. ValueError for a payload longer than a netlink
        attribute carries (MAX_PAYLOAD)."""
        if payload is not None and len(payload) > MAX_PAYLOAD:
            raise ValueError(f"verdict payload of {len(payload)} bytes > {MAX_PAYLOAD}")
        self.close_run()
        payload_verdict_into(self.out, self.queue, packet_id, NF_ACCEPT, payload, mark)
        self.singles += 1

    def hold(self, packet_id: int) -> None:
        """`packet_id` stays queued until release(): no batch may cover it."""
        self.close_run()
        self.held.add(packet_id)

    def release(self, packet_id: int, accept: bool,
                payload: bytes | bytearray | memoryview | None = None) -> None:
        """The verdict for a held packet; `payload` (accept only, ignored for a drop)
        replaces the packet as in accept_payload."""
        if accept and payload is not None and len(payload) > MAX_PAYLOAD:
            raise ValueError(f"verdict payload of {len(payload)} bytes > {MAX_PAYLOAD}")
        self.held.discard(packet_id)
        if accept and payload is not None:
            payload_verdict_into(self.out, self.queue, packet_id, NF_ACCEPT, payload)
        elif accept:
            self.out += self._accept
            self.out += _BE32.pack(packet_id)
        else:
            self.out += self._drop
            self.out += _BE32.pack(packet_id)
        self.singles += 1

    def no_batches(self) -> None:
        """An unreadable packet message: some queued id is unknown, so never again a
        verdict that covers ids we have not decided."""
        self.close_run()
        self.batch_ok = False

    def close_run(self) -> None:
        if self.run_last >= 0:
            self.out += self._batch
            self.out += _BE32.pack(self.run_last)
            self.run_last = -1
            self.batches += 1

    def take(self) -> bytes:
        """Everything pending as one buffer (the run closed), and empty the buffer."""
        self.close_run()
        data = bytes(self.out)
        self.out.clear()
        return data


# --- the queue -----------------------------------------------------------------------


def _kernel_before(major: int, minor: int) -> bool:
    try:
        parts = os.uname().release.split(".")
        return (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)) \
            < (major, minor)
    except (ValueError, IndexError):
        return False


class NfQueue:
    """One bound NFQUEUE. `drain(handle)` reads until the socket is empty (or `budget`
    packets) and calls handle(QueuedPacket) per packet; the handler gives verdicts
    through `verdicts`, and `flush()` sends them (drain flushes at its end too)."""

    def __init__(self, queue: int, *, copy_range: int = DEFAULT_COPY_RANGE,
                 max_len: int = DEFAULT_MAX_LEN, fail_open: bool = False,
                 rcvbuf: int | None = None, use_recvmmsg: bool = True) -> None:
        if not 0 <= queue <= 65535:
            raise ValueError(f"queue {queue} is not 0..65535")
        if not 1 <= copy_range <= MAX_COPY_RANGE:
            raise ValueError(f"copy range {copy_range} is not 1..{MAX_COPY_RANGE}")
        self.queue = queue
        self.copy_range = copy_range
        self.max_len = max_len
        self.fail_open = fail_open
        self.verdicts = Verdicts(queue)
        self.packet = QueuedPacket()
        self.buf = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buf)
        self._backlog: list[bytes] = []
        self._seq = int(time.time()) & 0xFFFF
        self.received = 0
        self.enobufs = 0
        self.malformed = 0
        self.verdict_errors = 0
        self.send_errors = 0
        self._last_log = -1e9
        self._unlogged = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            self._set_rcvbuf(rcvbuf or max(1 << 20, max_len * (min(copy_range, 2048) + 1024)))
            self._bind()
            self.sock.setblocking(False)
            self._multi = MultiReceiver(self.sock.fileno(), MULTI_SLOTS,
                                        copy_range + MESSAGE_OVERHEAD) \
                if use_recvmmsg and mmsg.available() else None
        except BaseException:
            self.sock.close()
            raise

    def _set_rcvbuf(self, size: int) -> None:
        """Room for a full queue of messages: SO_RCVBUFFORCE (root) else SO_RCVBUF
        (capped by net.core.rmem_max). A fuller socket makes the kernel drop (or, with
        fail-open, accept) and us see ENOBUFS once."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def _bind(self) -> None:
        q = self.queue
        if _kernel_before(3, 8):  # older kernels needed the per-family queue handler
            for af in (socket.AF_INET, socket.AF_INET6):
                self._request(config_message(0, seq=self._next_seq(), family=af,
                                             cmd=NFQNL_CFG_CMD_PF_UNBIND, pf=af))
                self._request(config_message(0, seq=self._next_seq(), family=af,
                                             cmd=NFQNL_CFG_CMD_PF_BIND, pf=af))
        # bind, copy range, queue length and flags in one message: one acknowledgement
        flags = NFQA_CFG_F_FAIL_OPEN if self.fail_open else 0
        self._request(config_message(q, seq=self._next_seq(), cmd=NFQNL_CFG_CMD_BIND,
                                     copy_range=self.copy_range, max_len=self.max_len,
                                     flags=flags, mask=NFQA_CFG_F_FAIL_OPEN))

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _request(self, msg: bytes, timeout: float = 5.0) -> None:
        """Send a config message and wait for its acknowledgement (OSError on refusal:
        EPERM when another process has the queue). Packets that arrive meanwhile (a
        restarted daemon's rules are already in place) are kept for drain()."""
        seq = _NLMSGHDR.unpack_from(msg, 0)[3]
        self.sock.send(msg)
        self.sock.settimeout(timeout)
        try:
            while True:
                n = self.sock.recv_into(self.buf)
                for mtype, mseq, off, end in walk(self.view, n):
                    if mtype == NLMSG_ERROR and mseq == seq:
                        err = error_code(self.view, off, end)
                        if err:
                            raise OSError(err, os.strerror(err))
                        return
                    if mtype == MSG_PACKET:
                        self._backlog.append(bytes(self.view[off - 16 : end]))
        except TimeoutError as exc:
            raise OSError(errno.ETIMEDOUT, "no answer from nfnetlink_queue") from exc
        finally:
            self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self, handle: Callable[[QueuedPacket], Any], budget: int = 1 << 30, *,
              flush: bool = True) -> int:
        """Receive and hand over packets until the socket is empty or `budget` packets
        were handled; then send the verdicts, unless `flush` is False (the data plane
        sends its pfsync frame for the last packets first, then flushes itself).
        Returns the packets handled."""
        done = 0
        if self._backlog:
            backlog, self._backlog = self._backlog, []
            for data in backlog:
                done += self._datagram(memoryview(data), 0, len(data), handle)
        multi = self._multi
        if multi is None:
            done += self._drain_single(handle, budget - done)
            if flush:
                self.flush()
            return done
        view = multi.view
        slot = multi.slot_size
        datagram = self._datagram
        while done < budget:
            try:
                k = multi.receive()
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._overflow()
                continue
            start = 0
            for n in multi.lengths(k):
                if n < 0:
                    self._cut(view, start, start + slot)
                else:
                    done += datagram(view, start, start + n, handle)
                start += slot
            if not k:
                break  # the socket is empty
        if flush:
            self.flush()
        return done

    def _drain_single(self, handle: Callable[[QueuedPacket], Any], budget: int) -> int:
        """recv_into, one datagram per system call (no recvmmsg in this libc)."""
        done = 0
        recv_into = self.sock.recv_into
        buf, view = self.buf, self.view
        while done < budget:
            try:
                n = recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._overflow()
                    continue
                if exc.errno == errno.EINTR:
                    continue
                raise
            done += self._datagram(view, 0, n, handle)
        return done

    def _datagram(self, view: memoryview, start: int, end: int,
                  handle: Callable[[QueuedPacket], Any]) -> int:
        """The messages of one datagram view[start:end]; returns the packets handled."""
        # fast path: one packet message (the kernel's unicast of a queued packet)
        if end - start >= 20:
            mlen, mtype = _unpack_hdr(view, start)[:2]
            if mtype == MSG_PACKET and 20 <= mlen <= end - start and \
                    (mlen + 3) & ~3 >= end - start:
                try:
                    parse_packet(view, start + 20, start + mlen, self.packet)
                except NfqError as exc:
                    self._bad_packet(exc)
                    return 0
                self.received += 1
                handle(self.packet)
                return 1
        try:
            msgs = walk(view, end, start)
        except NfqError as exc:
            # a datagram we cannot split may hide packet ids: no more batch verdicts
            self._bad_packet(exc)
            return 0
        done = 0
        for mtype, _seq, off, mend in msgs:
            if mtype == MSG_PACKET:
                try:
                    parse_packet(view, off + 4, mend, self.packet)
                except NfqError as exc:
                    self._bad_packet(exc)
                    continue
                self.received += 1
                handle(self.packet)
                done += 1
            elif mtype == NLMSG_ERROR:
                try:
                    err = error_code(view, off, mend)
                except NfqError:
                    err = errno.EBADMSG
                if err:  # a verdict the kernel refused (id gone): count, log rate-limited
                    self.verdict_errors += 1
                    self._rate_log("verdict refused by the kernel: %s", os.strerror(err))
            elif mtype == NLMSG_OVERRUN:
                self._overflow()
        return done

    def _cut(self, view: memoryview, start: int, end: int) -> None:
        """A datagram longer than its slot (never with the slot sizes chosen here): drop
        its packet if the id can be read, else stop batch verdicts."""
        try:
            packet_id = parse_packet(view, start + 20, end, QueuedPacket()).packet_id
        except NfqError as exc:
            self._bad_packet(exc)
        else:
            self._bad_packet(NfqError("datagram longer than its receive slot", packet_id))

    def _bad_packet(self, exc: NfqError) -> None:
        self.malformed += 1
        if exc.packet_id is not None:
            self.verdicts.drop(exc.packet_id)  # fail closed
        else:
            self.verdicts.no_batches()
        self._rate_log("unreadable queue message dropped: %s", exc)

    def _overflow(self) -> None:
        """ENOBUFS: our socket was full, the kernel dropped (fail-open: accepted) what it
        could not deliver. Nothing is waiting on us for those packets; go on reading."""
        self.enobufs += 1
        self._rate_log("NFQUEUE %d: socket overflow (ENOBUFS), %d so far; packets dropped "
                       "by the kernel%s", self.queue, self.enobufs,
                       " (fail-open: accepted)" if self.fail_open else "")

    def _rate_log(self, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_log >= 10.0:
            if self._unlogged:
                log.warning("(%d similar messages suppressed)", self._unlogged)
            log.warning(fmt, *args)
            self._last_log = now
            self._unlogged = 0
        else:
            self._unlogged += 1

    def flush(self) -> None:
        """Send every pending verdict in one sendmsg (several, in order, when verdicts
        carrying payloads make the buffer longer than SEND_CHUNK)."""
        v = self.verdicts
        if not v.out and v.run_last < 0:
            return
        data = v.take()
        if len(data) <= SEND_CHUNK:
            self._send(data)
        else:
            for chunk in split_messages(data, SEND_CHUNK):
                self._send(chunk)

    def _send(self, data: bytes | memoryview) -> None:
        for attempt in (1, 2):
            try:
                self.sock.send(data)
                return
            except (BlockingIOError, InterruptedError) as exc:
                if attempt == 2:
                    self._send_failed(exc)
            except OSError as exc:
                self._send_failed(exc)
                return

    def _send_failed(self, exc: OSError) -> None:
        self.send_errors += 1
        self._rate_log("NFQUEUE %d: verdicts not sent (%s): those packets wait in the kernel "
                       "queue until it is unbound", self.queue, exc)

    def kernel_stats(self) -> dict[str, int]:
        """queue_total, queue_dropped (queue full) and user_dropped (socket full) from
        /proc/net/netfilter/nfnetlink_queue; empty if the queue is not listed."""
        return read_proc_stats(self.queue)

    def counters(self) -> dict[str, int]:
        v = self.verdicts
        return {"nl_received": self.received, "nl_malformed": self.malformed,
                "nl_enobufs": self.enobufs, "verdict_errors": self.verdict_errors,
                "verdict_send_errors": self.send_errors, "verdict_batches": v.batches,
                "verdict_singles": v.singles}

    def close(self) -> None:
        """Unbind (the kernel drops what it still holds for us) and close."""
        with contextlib.suppress(OSError):
            self.flush()
            self.sock.send(config_message(self.queue, seq=self._next_seq(),
                                          cmd=NFQNL_CFG_CMD_UNBIND))
        self.sock.close()


NFQUEUE_PROC = "/proc/net/netfilter/nfnetlink_queue"
_PROC_COLUMNS = ("queue", "portid", "queue_total", "copy_mode", "copy_range",
                 "queue_dropped", "user_dropped", "id_sequence")


def read_proc_stats(queue: int, path: str = NFQUEUE_PROC) -> dict[str, int]:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for line in lines:
        cols = line.split()
        if len(cols) >= len(_PROC_COLUMNS) and all(c.isdigit() for c in cols[:8]) \
                and int(cols[0]) == queue:
            return dict(zip(_PROC_COLUMNS, map(int, cols[:8])))
    return {}


# --- accept-all ------------------------------------------------------------------------


def accept_all(queue: int, copy_range: int = DEFAULT_COPY_RANGE,
               max_len: int = DEFAULT_MAX_LEN, mini_batch: int = 32) -> int:
    """Accept every packet, with the daemon's copy range and one verdict message per
    mini-batch: the cost of the queue itself on this binding."""
    import selectors

    q = NfQueue(queue, copy_range=copy_range, max_len=max_len)
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    verdicts = q.verdicts
    count = [0]

    def handle(p: QueuedPacket) -> None:
        verdicts.accept(p.packet_id)
        count[0] += 1
        if count[0] >= mini_batch:
            count[0] = 0
            q.flush()

    sel = selectors.DefaultSelector()
    sel.register(q.fileno(), selectors.EVENT_READ)
    print("ready", flush=True)
    try:
        while not stop:
            if sel.select(1.0):
                q.drain(handle)
    finally:
        q.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pfcluster.io.nfq",
                                 description="nfnetlink_queue tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    aa = sub.add_parser("accept-all", help="accept every packet of a queue (a baseline)")
    aa.add_argument("--queue", type=int, default=0)
    aa.add_argument("--copy-range", type=int, default=DEFAULT_COPY_RANGE)
    aa.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN)
    args = ap.parse_args(argv)
    if not 0 <= args.queue <= 65535:
        ap.error(f"--queue {args.queue} is not 0..65535")
    if not 1 <= args.copy_range <= MAX_COPY_RANGE:
        ap.error(f"--copy-range {args.copy_range} is not 1..{MAX_COPY_RANGE}")
    if args.max_len < 1:
        ap.error(f"--max-len {args.max_len} is not positive")
    try:
        return accept_all(args.queue, args.copy_range, args.max_len)
    except OSError as exc:
        print(f"nfq accept-all: queue {args.queue}: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
