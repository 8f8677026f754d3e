"""recvmmsg(2) through ctypes: many datagrams per system call into one preallocated buffer.

Python's socket module has no recvmmsg, and on this kind of host a system call costs
microseconds (an empty non-blocking recv_into measured ~4 us under load), which is as
much as the rest of a queued packet's Python path. NFQUEUE delivers one skb per packet,
so a plain recv_into costs one system call per packet; recvmmsg takes everything the
socket holds (up to `slots`) in one.

Datagram i lands at offset i * slot_size of `view`; `lengths(k)` gives the byte count of
each, and a datagram longer than its slot is reported as truncated (MSG_TRUNC) rather
than silently cut. `available()` is False where libc has no recvmmsg (callers then use
recv_into).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from typing import Any

MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def _libc_recvmmsg() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.recvmmsg
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_RECVMMSG = _libc_recvmmsg()


def available() -> bool:
    return _RECVMMSG is not None


class MultiReceiver:
    """Up to `slots` datagrams of up to `slot_size` bytes per receive() call."""

    __slots__ = ("_fd", "_iov", "_layout", "_msgs", "_mview", "buf", "slot_size", "slots",
                 "view")

    def __init__(self, fd: int, slots: int, slot_size: int) -> None:
        if _RECVMMSG is None:
            raise OSError(errno.ENOSYS, "recvmmsg is not available")
        self._fd = fd
        self.slots = slots
        self.slot_size = slot_size
        self.buf = bytearray(slots * slot_size)
        self.view = memoryview(self.buf)
        base = ctypes.addressof((ctypes.c_char * len(self.buf)).from_buffer(self.buf))
        self._iov = (_Iovec * slots)()
        self._msgs = (_Mmsghdr * slots)()
        for i in range(slots):
            self._iov[i].iov_base = base + i * slot_size
            self._iov[i].iov_len = slot_size
            hdr = self._msgs[i].msg_hdr
            hdr.msg_iov = ctypes.pointer(self._iov[i])
            hdr.msg_iovlen = 1
        self._mview = memoryview(self._msgs).cast("B")
        size = ctypes.sizeof(_Mmsghdr)
        flags_off = _Mmsghdr.msg_hdr.offset + _Msghdr.msg_flags.offset
        len_off = _Mmsghdr.msg_len.offset
        assert flags_off + 4 <= len_off and len_off + 4 <= size
        # (msg_flags, msg_len) of every entry in one iter_unpack
        self._layout = struct.Struct(f"={flags_off}xi{len_off - flags_off - 4}xI"
                                     f"{size - len_off - 4}x")

    def receive(self) -> int:
        """Datagrams received (0: none waiting). OSError for anything but EAGAIN/EINTR
        (ENOBUFS: the socket overflowed; call again to go on reading)."""
        assert _RECVMMSG is not None
        n: int = _RECVMMSG(self._fd, ctypes.addressof(self._msgs), self.slots,
                           MSG_DONTWAIT, None)
        if n >= 0:
            return n
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EINTR):
            return 0
        raise OSError(err, os.strerror(err))

    def lengths(self, k: int) -> list[int]:
        """Bytes of each of the first k datagrams; -1 for one longer than its slot (cut)."""
        return [-1 if flags & MSG_TRUNC else n
                for flags, n in self._layout.iter_unpack(self._mview[: k * self._layout.size])]
