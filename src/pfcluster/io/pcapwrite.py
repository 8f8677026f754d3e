"""A pcap file writer (the classic libpcap format, microsecond stamps, native byte order),
for `pfcluster dump -w`: what tcpdump -r, tshark and our own reader all read."""

from __future__ import annotations

import struct
from typing import BinaryIO

PCAP_MAGIC = 0xA1B2C3D4
_GLOBAL = struct.Struct("=IHHiIII")
_RECORD = struct.Struct("=IIII")


class PcapWriter:
    """Writes the file header on open and one record per `write`, flushed at once so a
    capture stopped by a signal is complete up to the last frame."""

    __slots__ = ("_fh", "path", "snaplen")

    def __init__(self, path: str, linktype: int, snaplen: int = 262144) -> None:
        self.path = path
        self.snaplen = snaplen
        self._fh: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._fh.write(_GLOBAL.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, linktype))
        self._fh.flush()

    def write(self, ts: float, data: bytes) -> None:
        sec = int(ts)
        usec = min(999999, round((ts - sec) * 1e6))
        cap = data[: self.snaplen]
        self._fh.write(_RECORD.pack(sec, usec, len(cap), len(data)) + cap)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
