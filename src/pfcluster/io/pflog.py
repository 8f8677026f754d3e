"""`--pflog FILE`: the packets of `log` rules as a pcap of link type PFLOG (117).

Each record is a `struct pfloghdr` and the packet, as pflogd writes them, so
`tcpdump -n -e -r FILE` prints `rule 3/0(match): block in on c0: ...` and Wireshark's
pflog dissector reads it. The header is the layout OpenBSD (before 5.x) and FreeBSD share
up to `dir`: length 61 (`PFLOG_REAL_HDRLEN`, the readers' signature), padded to 64 (the
readers skip BPF_WORDALIGN(length)); rule numbers in network byte order, address
families as BSD numbers them (AF_INET 2, AF_INET6 24), so readers on any system decode it.

What is logged, as pf_test decides it: a packet that a `log` rule matched (the rule's
verdict, pass or block, including a state it could not create), and every packet of a
state created by a `log (all)` rule. A peer's state carries no rule here, so its packets
are not logged.

The daemon sees only the first --copy-range bytes of a packet: caplen says what is in the
file, len what was on the wire (tcpdump marks the cut). Writes are bounded (`rate`
packets per second, a burst of as many; the rest counted in `dropped_rate`); past
`max_bytes` the file is renamed FILE.1 (an older FILE.1 goes) and a new one started;
`reopen()` (SIGHUP) starts a new file after an outside rotation. A write error stops
writing until the next reopen (counted in `dropped_error`), never the firewall.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from typing import Any, BinaryIO

from pfcluster.pf.constants import PF_IN, PF_OUT, PFRES_NAMES

log = logging.getLogger("pfcluster.pflog")

LINKTYPE_PFLOG = 117
PFLOG_REAL_HDRLEN = 61
# length, af, action, reason, ifname[16], ruleset[16], rulenr, subrulenr, uid, pid,
# rule_uid, rule_pid, dir, pad[3]
PFLOGHDR = struct.Struct("!BBBB16s16sIIIiIiB3x")
PFLOG_HDRLEN = PFLOGHDR.size  # 64
BSD_AF_INET = 2
BSD_AF_INET6 = 24
PF_PASS = 0
PF_DROP = 1
# No socket owner looked up. pf writes uid and pid in its host's byte order (only rulenr
# and subrulenr are in network order), so readers differ; all-ones reads the same in
# either: tcpdump omits the [uid] then, Wireshark shows -1.
UID_NONE = 0xFFFFFFFF
NO_PID = -1
SUBRULE_NONE = 0xFFFFFFFF  # the main ruleset: tcpdump prints `rule N/`
PCAP_HEADER = struct.Struct("<IHHiIII")
PCAP_RECORD = struct.Struct("<IIII")
PCAP_MAGIC = 0xA1B2C3D4
SNAPLEN = 65535
REASON_CODES = {name: i for i, name in enumerate(PFRES_NAMES)}
DEFAULT_MAX_BYTES = 100 << 20
DEFAULT_RATE = 1000


class PflogError(OSError):
    """The pflog file cannot be used; str() is `FILE: problem`."""


def pfloghdr(action: int, reason: int, ifname: str, rulenr: int, direction: int,
             af: int) -> bytes:
    """One `struct pfloghdr` (64 bytes, length field 61)."""
    return PFLOGHDR.pack(PFLOG_REAL_HDRLEN, af, action, reason,
                         ifname.encode("latin-1", "replace")[:15], b"", rulenr & 0xFFFFFFFF,
                         SUBRULE_NONE, UID_NONE, NO_PID, UID_NONE, NO_PID, direction)


def wanted(v: Any) -> bool:
    """Whether pf logs the packet of verdict `v`: a `log` rule matched it (the rule's
    own verdict, or a state it could not create), or a `log (all)` state passed it."""
    rule = v.rule
    if rule is None or not rule.log:
        return False
    if v.state is None or v.new_state:
        return True
    return bool(v.action == "pass" and rule.log_all)


def pcap_header(snaplen: int = SNAPLEN) -> bytes:
    return PCAP_HEADER.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_PFLOG)


class PflogWriter:
    """The pflog file: records, rotation, a bounded rate; see the module docstring."""

    __slots__ = ("_fh", "_tokens", "_tokens_at", "dirty", "dropped_error", "dropped_rate",
                 "fresh", "max_bytes", "path", "rate", "rotations", "size", "written")

    def __init__(self, path: str, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 rate: float | None = DEFAULT_RATE, fresh: bool = False) -> None:
        self.path = path
        self.fresh = fresh  # replay: an earlier pflog file at `path` is started over
        self.max_bytes = max_bytes
        self.rate = rate  # None: unlimited (replay)
        self._tokens = float(rate or 0)
        self._tokens_at: float | None = None
        self._fh: BinaryIO | None = None
        self.size = 0
        self.written = 0
        self.dropped_rate = 0
        self.dropped_error = 0
        self.rotations = 0
        self.dirty = False
        self._open()

    def _open(self) -> None:
        """Append to a pflog pcap already there (a restarted daemon; `fresh`: start it
        over), start one otherwise; a file that is something else is refused rather than
        overwritten."""
        path = self.path
        try:
            fh = open(path, "ab")  # noqa: SIM115 (kept open for the daemon's life)
        except OSError as exc:
            raise PflogError(f"{path}: {exc.strerror or exc}") from exc
        try:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                fh.write(pcap_header())
                fh.flush()
            else:
                with open(path, "rb") as rd:
                    head = rd.read(PCAP_HEADER.size)
                if len(head) < PCAP_HEADER.size or PCAP_HEADER.unpack(head)[0] != PCAP_MAGIC \
                        or PCAP_HEADER.unpack(head)[6] != LINKTYPE_PFLOG:
                    raise PflogError(f"{path}: exists and is not a pflog pcap; move it away")
                if self.fresh:
                    fh.truncate(0)
                    fh.write(pcap_header())
                    fh.flush()
                    self.fresh = False
        except OSError:
            fh.close()
            raise
        self._fh = fh
        self.size = fh.tell()

    def reopen(self) -> None:
        """Close and open FILE again (SIGHUP after an outside rotation); on failure writing
        stops until the next reopen."""
        self.close()
        try:
            self._open()
        except OSError as exc:
            log.error("pflog: %s; not writing until the next SIGHUP", exc)

    def _rotate(self) -> None:
        self.close()
        try:
            os.replace(self.path, self.path + ".1")
        except OSError as exc:
            log.error("pflog: cannot rotate %s: %s", self.path, exc.strerror or exc)
        self.rotations += 1
        self.reopen()

    def _admit(self, now: float) -> bool:
        rate = self.rate
        if rate is None:
            return True
        last = self._tokens_at
        self._tokens_at = now
        if last is not None:
            self._tokens = min(rate, self._tokens + (now - last) * rate)
        if self._tokens < 1.0:
            self.dropped_rate += 1
            return False
        self._tokens -= 1.0
        return True

    def packet(self, v: Any, direction: int, ifname: str | None, payload: bytes | memoryview,
               wire_len: int, now: float, ts: float | None = None) -> None:
        """Write one packet with its verdict (`payload` may be cut short of `wire_len`)."""
        if not self._admit(now):
            return
        fh = self._fh
        if fh is None:
            self.dropped_error += 1
            return
        if ts is None:
            ts = time.time()
        af = BSD_AF_INET6 if payload and payload[0] >> 4 == 6 else BSD_AF_INET
        rule = v.rule
        hdr = pfloghdr(PF_PASS if v.action == "pass" else PF_DROP,
                       REASON_CODES.get(v.reason, 0), ifname or "", rule.nr if rule else 0,
                       direction, af)
        caplen = min(len(payload), SNAPLEN - PFLOG_HDRLEN)
        sec = int(ts)
        usec = round((ts - sec) * 1e6)
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        rec = PCAP_RECORD.pack(sec, usec, PFLOG_HDRLEN + caplen,
                               PFLOG_HDRLEN + max(wire_len, caplen))
        try:
            fh.write(rec)
            fh.write(hdr)
            fh.write(payload[:caplen])
        except OSError as exc:
            self.dropped_error += 1
            log.error("pflog: write to %s failed: %s; not writing until the next SIGHUP",
                      self.path, exc.strerror or exc)
            self.close()
            return
        self.written += 1
        self.dirty = True
        self.size += PCAP_RECORD.size + PFLOG_HDRLEN + caplen
        if self.size >= self.max_bytes:
            self._rotate()

    def route(self, rv: Any, in_if: str | None, out_if: str | None,
              payload: bytes | memoryview, wire_len: int, now: float,
              ts: float | None = None) -> None:
        """Both tests of a routed packet (`pf.router.route`'s result), each if pf logs it.
        Runs for every packet: a verdict whose rule has no `log` costs two lookups."""
        v = rv.v_in
        if v is not None and v.rule is not None and v.rule.log and wanted(v):
            self.packet(v, PF_IN, in_if, payload, wire_len, now, ts)
        v = rv.v_out
        if v is not None and v.rule is not None and v.rule.log and wanted(v):
            self.packet(v, PF_OUT, out_if, payload, wire_len, now, ts)

    def flush(self) -> None:
        self.dirty = False
        if self._fh is not None:
            try:
                self._fh.flush()
            except OSError as exc:
                self.dropped_error += 1
                log.error("pflog: write to %s failed: %s", self.path, exc.strerror or exc)
                self.close()

    def counters(self) -> dict[str, int]:
        return {"written": self.written, "dropped_rate": self.dropped_rate,
                "dropped_error": self.dropped_error, "rotations": self.rotations,
                "bytes": self.size}

    def close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError as exc:
                log.error("pflog: closing %s: %s", self.path, exc.strerror or exc)
