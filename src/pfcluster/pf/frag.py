"""IP fragment reassembly, sans I/O: hold fragments until their datagram is whole.

pf reassembles fragments (``set reassemble yes``, OpenBSD's default) so port rules and
states see whole datagrams. Here fragments are keyed as pf_fragment keys them (IPv4:
src, dst, id, proto; IPv6: src, dst, fragment header id) and each caller-supplied
``token`` (a queue packet id, say) is held until the datagram is complete, then all of
them are released together: the caller tests the datagram once and applies that one
verdict to every token. The caller forwards the original fragments, not a rebuilt
datagram, so no payload bytes are kept: only the first fragment's headers (enough for
rules and state) and each fragment's offset and length, which is also why a capture
cut short (NFQUEUE copy range) is enough.

Fail closed, as pf does for IPv6 (RFC 5722): any overlap, duplicates included, drops the
whole datagram (PFRES_FRAG); so do malformed fragments (MF with a length not a multiple
of 8, past 65535 bytes, past a known end, more than ``PER_QUEUE`` pieces). Memory is
bounded: ``limit`` fragments in all (``set limit frags``; at the limit the oldest
datagrams are dropped, PFRES_MEMORY, as pf_flush_fragments does) and ``per_source``
per source address so one peer cannot take them all. A datagram not complete within
``timeout`` seconds (``set timeout frag``) is dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from pfcluster.packet import AF_INET, MalformedPacket, Packet, parse_into
from pfcluster.pf.constants import PFRES_FRAG, PFRES_MEMORY

__all__ = ["FRAG_LIMIT_DEFAULT", "FRAG_TIMEOUT_DEFAULT", "PER_QUEUE", "FragCache", "Release"]

FRAG_LIMIT_DEFAULT = 65536  # pf's PFFRAG_FRENT_HIWAT, the default of `set limit frags`
FRAG_TIMEOUT_DEFAULT = 60.0  # `set timeout frag`
PER_QUEUE = 64  # pf's PF_FRAG_ENTRY_LIMIT: pieces per datagram
IP_MAXPACKET = 65535

FragKey = tuple[Any, ...]


class Release:
    """Tokens leaving the cache together. ``packet`` is the whole datagram (first
    fragment's headers, lengths of the datagram) when ``reason`` is None: test it and
    apply the verdict to all tokens; else drop them all and count ``reason``."""

    __slots__ = ("packet", "reason", "tokens")

    def __init__(self, tokens: list[Hashable], packet: Packet | None, reason: int | None) -> None:
        self.tokens = tokens
        self.packet = packet
        self.reason = reason

    def __repr__(self) -> str:
        return f"Release({len(self.tokens)} tokens, reason={self.reason})"


class _Queue:
    """One datagram being collected: sorted (start, end) pieces, no payload."""

    __slots__ = ("created", "first", "first_wire", "have", "pieces", "src", "tokens", "total")

    def __init__(self, now: float, src: bytes) -> None:
        self.pieces: list[tuple[int, int]] = []
        self.tokens: list[Hashable] = []
        self.first: bytes | None = None  # the first fragment's bytes (headers)
        self.first_wire = 0
        self.total = -1  # datagram payload length, known once the last fragment came
        self.have = 0
        self.created = now
        self.src = src


class FragCache:
    """Fragment queues with pf's limits; ``add`` and ``expire`` return what leaves."""

    __slots__ = (
        "_by_src",
        "_held",
        "_queues",
        "counters",
        "datagrams",
        "evicted",
        "limit",
        "per_source",
        "src_limited",
        "timeout",
        "timeouts",
    )

    def __init__(self, limit: int = FRAG_LIMIT_DEFAULT, timeout: float = FRAG_TIMEOUT_DEFAULT,
                 per_source: int | None = None) -> None:
        self.limit = max(1, limit)
        self.per_source = per_source if per_source is not None else max(PER_QUEUE, self.limit // 8)
        self.timeout = timeout
        self._queues: OrderedDict[FragKey, _Queue] = OrderedDict()  # oldest first
        self._held = 0
        self._by_src: dict[bytes, int] = {}
        self.counters: dict[int, int] = {}  # PFRES_* -> fragments dropped
        self.datagrams = 0  # reassembled
        self.timeouts = 0  # datagrams timed out
        self.evicted = 0  # datagrams dropped to make room
        self.src_limited = 0  # fragments refused by the per-source bound

    @property
    def held(self) -> int:
        """Fragments held now."""
        return self._held

    def __len__(self) -> int:
        return len(self._queues)

    @staticmethod
    def key(pkt: Packet) -> FragKey:
        if pkt.af == AF_INET:
            return (AF_INET, pkt.src, pkt.dst, pkt.ip_id, pkt.proto)
        return (pkt.af, pkt.src, pkt.dst, pkt.ip_id)

    def add(self, pkt: Packet, token: Hashable, now: float) -> list[Release]:
        """Take one fragment (``pkt.fragment`` must be true). Returns the releases it
        causes: none while its datagram is incomplete."""
        out = self.expire(now)
        key = self.key(pkt)
        q = self._queues.get(key)
        start = pkt.frag_off
        end = start + (pkt.ip_len - pkt.ip_hl)
        if (end <= start or end > IP_MAXPACKET
                or (pkt.more_frags and (end - start) & 7)
                or (q is not None and not _fits(q, start, end, pkt.more_frags))):
            if q is not None:
                self._drop(key, q)
                out.append(Release([*q.tokens, token], None, PFRES_FRAG))
                self._count(PFRES_FRAG, len(q.tokens) + 1)
            else:
                out.append(Release([token], None, PFRES_FRAG))
                self._count(PFRES_FRAG, 1)
            return out
        src = pkt.src
        if self._by_src.get(src, 0) >= self.per_source:
            self.src_limited += 1
            if q is not None:
                self._drop(key, q)
                out.append(Release([*q.tokens, token], None, PFRES_MEMORY))
                self._count(PFRES_MEMORY, len(q.tokens) + 1)
            else:
                out.append(Release([token], None, PFRES_MEMORY))
                self._count(PFRES_MEMORY, 1)
            return out
        while self._held >= self.limit:
            okey, oq = next(iter(self._queues.items()))
            self._drop(okey, oq)
            self.evicted += 1
            self._count(PFRES_MEMORY, len(oq.tokens))
            out.append(Release(oq.tokens, None, PFRES_MEMORY))
            if okey == key:
                q = None
        if q is None:
            q = self._queues[key] = _Queue(now, src)
        _insert(q.pieces, start, end)
        q.tokens.append(token)
        q.have += end - start
        if not pkt.more_frags:
            q.total = end
        if start == 0:
            q.first = bytes(pkt.raw)
            q.first_wire = pkt.ip_len
        self._held += 1
        self._by_src[src] = self._by_src.get(src, 0) + 1
        if q.have == q.total:
            self._drop(key, q)
            whole = _datagram(q)
            if whole is None:  # cannot happen for a first fragment the parser accepted
                self._count(PFRES_FRAG, len(q.tokens))
                out.append(Release(q.tokens, None, PFRES_FRAG))
            else:
                self.datagrams += 1
                out.append(Release(q.tokens, whole, None))
        return out

    def expire(self, now: float) -> list[Release]:
        """Drop datagrams older than the timeout (oldest first, so stop at a young one)."""
        out: list[Release] = []
        limit = now - self.timeout
        while self._queues:
            key, q = next(iter(self._queues.items()))
            if q.created > limit:
                break
            self._drop(key, q)
            self.timeouts += 1
            self._count(PFRES_FRAG, len(q.tokens))
            out.append(Release(q.tokens, None, PFRES_FRAG))
        return out

    def flush(self) -> list[Release]:
        """Drop everything held (shutdown, `set reassemble no` on reload)."""
        out = [Release(q.tokens, None, PFRES_FRAG) for q in self._queues.values()]
        self._queues.clear()
        self._by_src.clear()
        self._held = 0
        return out

    def _drop(self, key: FragKey, q: _Queue) -> None:
        del self._queues[key]
        n = len(q.tokens)
        self._held -= n
        left = self._by_src[q.src] - n if q.src in self._by_src else 0
        if left > 0:
            self._by_src[q.src] = left
        else:
            self._by_src.pop(q.src, None)

    def _count(self, reason: int, n: int) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + n


def _fits(q: _Queue, start: int, end: int, more: bool) -> bool:
    """False for an overlap, a second or moved end, data past the end, too many pieces."""
    if len(q.tokens) >= PER_QUEUE:
        return False
    if q.total >= 0 and (end > q.total or (not more and end != q.total)):
        return False
    if not more and q.pieces and q.pieces[-1][1] > end:
        return False
    pieces = q.pieces
    lo, hi = 0, len(pieces)
    while lo < hi:  # first piece ending after start
        mid = (lo + hi) >> 1
        if pieces[mid][1] <= start:
            lo = mid + 1
        else:
            hi = mid
    return lo == len(pieces) or pieces[lo][0] >= end


def _insert(pieces: list[tuple[int, int]], start: int, end: int) -> None:
    i = len(pieces)
    while i and pieces[i - 1][0] > start:
        i -= 1
    pieces.insert(i, (start, end))


def _datagram(q: _Queue) -> Packet | None:
    """The whole datagram as the rules see it: the first fragment's headers with the
    datagram's lengths (``truncated``: raw holds only the first fragment)."""
    if q.first is None:
        return None
    pkt = Packet.__new__(Packet)
    try:
        parse_into(pkt, q.first, q.first_wire)
    except MalformedPacket:
        return None
    ip_len = pkt.ip_hl + q.total
    pkt.ip_len = ip_len
    pkt.l4_len = ip_len - pkt.l4_off
    if pkt.th_off:
        pkt.p_len = ip_len - pkt.l4_off - pkt.th_off
    pkt.more_frags = False
    pkt.fragment = False
    pkt.truncated = True
    return pkt
