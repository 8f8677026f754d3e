"""Authenticated pfsync (`--sync-key`), sans I/O: seal the frames we send, verify the
frames we receive before the engine sees them.

pfsync itself trusts any neighbour that can send a TTL-255 datagram on the sync link
(both BSD pfsync(4) pages say so). The 2009 thesis reserved a place for more:
OpenBSD 4.5's EOF message is ``hmac[PFSYNC_HMAC_LEN]`` (20 bytes) and its
``pfsync_input_hmac()`` sits under ``#if 0``. We complete that stub. The 20 bytes are:

    offset  size  field
    0       1     key id   1..255 (0: no authenticator, what an unkeyed 4.5 sender writes)
    1       4     sender   the sending node's creator id (hostid; hostid+i for worker i)
    5       7     counter  per sender, strictly increasing: max(last + 1, microseconds
                           since the epoch), so a restarted sender starts above every
                           counter it used before (the 56 bits last until the year 4253)
    12      8     tag      HMAC-SHA256(K', every byte of the frame before the tag),
                           first 8 bytes; K' = HMAC-SHA256(key, LABEL + key id)

Where the 20 bytes go: in ``openbsd45`` they ARE the EOF body, so an authenticated frame
keeps the 4.5 layout byte for byte. The other dialects have no such field (FreeBSD's EOF
is a bare subheader, OpenBSD >= 4.8 has no EOF), so there the 20 bytes follow the frame
as a trailer outside ``header.len``: the frame proper is untouched and a decoder that
bounds its walk by ``header.len`` never reads them. Either way the authenticator is the
last 20 bytes of the IP payload and the tag covers every byte before it.

Why a sender field and a 64-bit tag rather than the 96-bit tag IPsec uses: the replay
window must be kept per authenticated sender. Keyed by the (unauthenticated) source
address, a captured frame replayed from another address would meet an empty window and
pass. The 4 bytes come from the tag. A 64-bit tag is forged with probability 2^-64 per
attempt, and every attempt is one frame the victim receives and counts (``badauth``).

Replay window: per sender, the highest counter accepted and the last WINDOW counters
accepted. A counter above the highest passes; one at or below the window's floor, or one
already seen, is a replay. Frames reordered by fewer than WINDOW frames still pass. A
frame that claims our own sender id is one of ours played back: a replay too.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pfcluster.pfsync.layout import ACT_EOF, HEADER_LEN, SUBHEADER_LEN

AUTH_LEN = 20  # PFSYNC_HMAC_LEN
TAG_LEN = 8
TAG_AT = AUTH_LEN - TAG_LEN  # offset of the tag inside the authenticator
COUNTER_MAX = (1 << 56) - 1
WINDOW = 256
MIN_KEY, MAX_KEY = 16, 64  # bytes
MAX_KEYS = 2  # the sending key and, during a rotation, one more accepted
LABEL = b"pfcluster pfsync v5 auth key "
EMBEDDED = frozenset({"openbsd45"})  # dialects whose EOF body holds the authenticator

# key id, sender, counter (56 bits as 8 + 16 + 32): the 12 bytes before the tag
_HEAD = struct.Struct("!BIBHI")
_LEN = struct.Struct("!H")

# Verdicts of Verifier.check; every one but OK drops the frame.
OK, NONE, SHORT, KEYID, MAC, REPLAY = "ok", "none", "short", "keyid", "mac", "replay"
BADAUTH = frozenset({NONE, SHORT, KEYID, MAC})


class KeyError_(ValueError):
    """A key file that cannot be used; the message is one line naming the problem."""


def overhead(dialect: str) -> int:
    """Bytes a key adds to every frame of ``dialect`` (0 where the EOF body holds it)."""
    return 0 if dialect in EMBEDDED else AUTH_LEN


def _derive(key: bytes, key_id: int) -> bytes:
    return hmac.digest(key, LABEL + bytes((key_id,)), "sha256")


class Mac:
    """HMAC-SHA256 under one key, truncated to TAG_LEN, with the keyed inner and outer
    hash states computed once (RFC 2104: H(K^opad, H(K^ipad, m))): per frame, two hash
    copies instead of hmac.digest's key schedule, a third of the time
    (tests/test_sync_auth.py checks it against hmac.digest)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:  # the SHA-256 block size; ours are 32-byte derived keys
            key = hashlib.sha256(key).digest()
        block = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def tag(self, data: bytes | bytearray | memoryview, more: bytes = b"") -> bytes:
        """The tag of ``data`` followed by ``more``."""
        inner = self._inner.copy()
        inner.update(data)
        if more:
            inner.update(more)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:TAG_LEN]


class KeyRing:
    """The keys of one firewall: the first sends, every one is accepted."""

    __slots__ = ("derived", "ids", "send_id")

    def __init__(self, keys: Iterable[tuple[int, bytes]]) -> None:
        keys = list(keys)
        if not 1 <= len(keys) <= MAX_KEYS:
            raise KeyError_(f"{len(keys)} keys: a key file holds 1 or {MAX_KEYS}")
        self.derived: dict[int, Mac] = {}
        for kid, key in keys:
            if not 1 <= kid <= 255:
                raise KeyError_(f"key id {kid} is not 1..255")
            if kid in self.derived:
                raise KeyError_(f"key id {kid} appears twice")
            if not MIN_KEY <= len(key) <= MAX_KEY:
                raise KeyError_(f"key {kid}: {len(key)} bytes, want {MIN_KEY}..{MAX_KEY}")
            self.derived[kid] = Mac(_derive(key, kid))
        self.ids = tuple(kid for kid, _ in keys)
        self.send_id = self.ids[0]


def parse_keys(text: str, name: str = "key file") -> KeyRing:
    """``ID HEX`` per line (``#`` comments, blank lines ignored): the first line's key
    sends, both are accepted. Errors read ``NAME:LINE: problem`` (never the key)."""
    keys: list[tuple[int, bytes]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdecimal():
            raise KeyError_(f"{name}:{lineno}: want `ID HEX` (a key id 1..255, then the "
                            "key in hexadecimal)")
        try:
            key = bytes.fromhex(parts[1])
        except ValueError:
            raise KeyError_(f"{name}:{lineno}: the key is not hexadecimal") from None
        keys.append((int(parts[0]), key))
    if not keys:
        raise KeyError_(f"{name}: no key (want lines `ID HEX`)")
    try:
        return KeyRing(keys)
    except KeyError_ as exc:
        raise KeyError_(f"{name}: {exc}") from None


def micros() -> int:
    """The default counter clock: microseconds since the epoch."""
    return time.time_ns() // 1000


class Sealer:
    """Authenticates the frames one sender (one creator id) sends."""

    __slots__ = ("_clock", "_embedded", "counter", "keys", "sender")

    def __init__(self, keys: KeyRing, sender: int, dialect: str,
                 clock: Callable[[], int] = micros) -> None:
        self.keys = keys
        self.sender = sender & 0xFFFFFFFF
        self._embedded = dialect in EMBEDDED
        self._clock = clock
        self.counter = 0

    def seal(self, frame: bytes) -> bytes:
        """``frame`` as encoded by wire.encode, authenticated with the sending key."""
        counter = max(self.counter + 1, self._clock())
        if counter > COUNTER_MAX:
            raise OverflowError("sync key counter exhausted")
        self.counter = counter
        kid = self.keys.send_id
        if self._embedded:
            if len(frame) < HEADER_LEN + SUBHEADER_LEN + AUTH_LEN or \
                    frame[-AUTH_LEN - SUBHEADER_LEN] != ACT_EOF:
                raise ValueError("an openbsd45 frame must end with its EOF message")
            frame = frame[:-AUTH_LEN]
        head = _HEAD.pack(kid, self.sender, counter >> 48, (counter >> 32) & 0xFFFF,
                          counter & 0xFFFFFFFF)
        return b"".join((frame, head, self.keys.derived[kid].tag(frame, head)))


@dataclass(slots=True)
class Authenticator:
    """The 20 bytes as read from a frame (for `dump`)."""

    key_id: int
    sender: int
    counter: int
    tag: bytes


def locate(payload: bytes | bytearray | memoryview, dialect: str) -> int | None:
    """Offset of the authenticator in ``payload`` (a pfsync frame from its header on),
    or None when the frame cannot carry one: too short, or (trailer dialects) not
    exactly AUTH_LEN bytes longer than its header.len."""
    n = len(payload)
    if n < HEADER_LEN + AUTH_LEN:
        return None
    if dialect in EMBEDDED:
        return n - AUTH_LEN
    (hlen,) = _LEN.unpack_from(payload, 2)
    return hlen if hlen == n - AUTH_LEN else None


def read(payload: bytes | bytearray | memoryview, dialect: str) -> Authenticator | None:
    """The authenticator fields, or None where there is none (see ``locate``)."""
    at = locate(payload, dialect)
    if at is None:
        return None
    kid, sender, c0, c1, c2 = _HEAD.unpack_from(payload, at)
    return Authenticator(kid, sender, c0 << 48 | c1 << 32 | c2,
                         bytes(payload[at + TAG_AT : at + AUTH_LEN]))


class _Window:
    """One sender's replay window."""

    __slots__ = ("floor", "highest", "order", "seen")

    def __init__(self) -> None:
        self.highest = -1
        self.floor = -1  # counters at or below this are too old to judge: replays
        self.seen: set[int] = set()
        self.order: deque[int] = deque()

    def fresh(self, counter: int) -> bool:
        return counter > self.highest or (counter > self.floor and counter not in self.seen)

    def accept(self, counter: int) -> None:
        if counter > self.highest:
            self.highest = counter
        self.seen.add(counter)
        self.order.append(counter)
        if len(self.order) > WINDOW:
            old = self.order.popleft()
            self.seen.discard(old)
            if old > self.floor:
                self.floor = old


class Verifier:
    """Checks the frames a node receives. ``check`` never raises: any bytes give a
    verdict, and the window moves only for a frame whose tag verified."""

    __slots__ = ("_embedded", "counters", "keys", "own", "windows")

    def __init__(self, keys: KeyRing, dialect: str, own: int | None = None) -> None:
        self.keys = keys
        # our own sender id: no peer sends with it, so such a frame is one of ours
        # played back (a receiver has no window for itself; without this, the first
        # replay of our own frame would open one)
        self.own = own
        self._embedded = dialect in EMBEDDED
        self.windows: dict[int, _Window] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            ("auth_ok", "badauth", "auth_none", "auth_keyid", "auth_mac", "auth_replay"), 0)

    def check(self, payload: bytes) -> tuple[str, bytes | None]:
        """(verdict, the frame the engine may read) — the frame is None unless OK. The
        frame is ``payload`` itself (4.5) or ``payload`` without its trailer."""
        verdict, body = self._check(payload)
        c = self.counters
        if verdict == OK:
            c["auth_ok"] += 1
        elif verdict == REPLAY:
            c["auth_replay"] += 1
        else:
            c["badauth"] += 1
            c["auth_" + ("none" if verdict == SHORT else verdict)] += 1
        return verdict, body

    def _check(self, payload: bytes) -> tuple[str, bytes | None]:
        n = len(payload)
        if n < HEADER_LEN + AUTH_LEN:
            return SHORT, None
        at = n - AUTH_LEN
        if not self._embedded and _LEN.unpack_from(payload, 2)[0] != at:
            return NONE, None
        kid, sender, c0, c1, c2 = _HEAD.unpack_from(payload, at)
        if kid == 0:
            return NONE, None
        mac = self.keys.derived.get(kid)
        if mac is None:
            return KEYID, None
        end = at + TAG_AT
        want = mac.tag(memoryview(payload)[:end])
        if not hmac.compare_digest(want, payload[end:]):
            return MAC, None
        if sender == self.own:
            return REPLAY, None
        counter = c0 << 48 | c1 << 32 | c2
        window = self.windows.get(sender)
        if window is None:
            window = self.windows[sender] = _Window()
        elif not window.fresh(counter):
            return REPLAY, None
        window.accept(counter)
        return OK, (payload if self._embedded else payload[:at])


__all__ = [
    "AUTH_LEN",
    "BADAUTH",
    "KEYID",
    "MAC",
    "NONE",
    "OK",
    "REPLAY",
    "SHORT",
    "Authenticator",
    "KeyError_",
    "KeyRing",
    "Mac",
    "Sealer",
    "Verifier",
    "locate",
    "overhead",
    "parse_keys",
    "read",
]
