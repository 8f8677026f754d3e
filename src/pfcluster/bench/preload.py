"""Synthetic established TCP states for benchmarks (`pfcluster daemon --bench-preload N`).

`lab bulk` needs a firewall that already holds a large table before a fresh peer joins;
making a million real connections through the lab first would take far longer than the
thing measured. These states are built with the real State constructor and put in the
Filter's real table, so the bulk update walks, exports and imports exactly what it would
for states pf made: TCP, both peers ESTABLISHED with plausible windows, keyed
198.51.100.X:port -> 203.0.113.101:5201 with distinct (address, port) pairs, addresses
and port numbers shared between keys as the packet path shares them. They are inserted
without telling pfsync (no INS per state): they stand for states made before the peer
existed. A benchmark aid only; nothing else creates states this way.
"""

from __future__ import annotations

from pfcluster.pf.constants import PF_IN, PFTM, TCPS
from pfcluster.pf.filter import PORT_OBJECTS, Filter
from pfcluster.pf.state import State

PORTS_PER_ADDR = 60_000  # client ports 1024..61023 per client address
FIRST_PORT = 1024
CLIENT_HOSTS = 250  # 198.51.100.1 .. .250: room for 15 million states
SERVER = bytes((203, 0, 113, 101))
SERVER_PORT = 5201
MAX_PRELOAD = CLIENT_HOSTS * PORTS_PER_ADDR


class PreloadError(ValueError):
    """The table cannot take the states asked for (limit, or a key already taken)."""


def preload_states(filt: Filter, n: int, now: float, ifname: str = "cli") -> int:
    """Insert `n` established TCP states into `filt`'s table; returns how many went in."""
    if not 0 <= n <= MAX_PRELOAD:
        raise PreloadError(f"preload must be 0..{MAX_PRELOAD} states")
    if len(filt.states) + n > filt.limit_states:
        raise PreloadError(f"{n} states exceed `set limit states` ({filt.limit_states}); "
                           "raise it in the rules")
    clients = [bytes((198, 51, 100, 1 + h)) for h in range(CLIENT_HOSTS)]
    table = filt.states
    est = int(TCPS.ESTABLISHED)
    tm_est = int(PFTM.TCP_ESTABLISHED)
    creatorid = filt.creatorid
    sport = PORT_OBJECTS[SERVER_PORT]
    for i in range(n):
        host, port = divmod(i, PORTS_PER_ADDR)
        key = (2, 6, clients[host], SERVER, PORT_OBJECTS[FIRST_PORT + port], sport)
        seq = (i * 2654435761) & 0xFFFFFFFF
        # seqlo, seqhi, seqdiff, max_win, mss, state, wscale (pf.state's buffer order)
        peer_a = (seq, (seq + 65535) & 0xFFFFFFFF, 0, 65535, 1460, est, 7)
        seq_b = (seq ^ 0x5A5A5A5A) & 0xFFFFFFFF
        peer_b = (seq_b, (seq_b + 65535) & 0xFFFFFFFF, 0, 65535, 1460, est, 7)
        st = State(key, PF_IN, creatorid, filt.next_state_id(), now, ifname=ifname,
                   peers=peer_a + peer_b)
        st.timeout = tm_est
        if not table.insert(st):
            raise PreloadError(f"state {i}: key or id already in the table")
    return n
