"""The send queues as a table: one queue per message type, each state in at most one.

A state records which queue holds it (`State.sync_state`), so it moves between queues
in O(1), and its message is built only when the frame is sent, from its contents then.
The table says, per queue, which message it makes and whether sending it counts as
having told the peers about the state (for the echo holdoff).
"""

from __future__ import annotations

from typing import NamedTuple

from pfcluster.pf.state import SYNC_NONE, State

# Queue ids: PFSYNC_S_* of OpenBSD 4.5 (and FreeBSD).
Q_INS = 0
Q_IACK = 1
Q_UPD = 2
Q_UPD_C = 3
Q_DEL = 4


class QueueKind(NamedTuple):
    action: str  # the message a queued state becomes
    full_record: bool  # a whole pfsync_state (INS, UPD) rather than a short message
    tells_state: bool  # sending it brings the peers up to date with the state


QUEUES: tuple[QueueKind, ...] = (
    QueueKind("INS", True, True),
    QueueKind("INS_ACK", False, False),
    QueueKind("UPD", True, True),
    QueueKind("UPD_C", False, True),
    QueueKind("DEL_C", False, False),
)
QUEUE_ACTION = tuple(q.action for q in QUEUES)

# Section order in a frame: OpenBSD 4.5 and FreeBSD send the queues in id order;
# OpenBSD >= 4.8 renumbered them (IACK, UPD_C, DEL, INS, UPD).
ORDER_45 = (Q_INS, Q_IACK, Q_UPD, Q_UPD_C, Q_DEL)
ORDER_48 = (Q_IACK, Q_UPD_C, Q_DEL, Q_INS, Q_UPD)
QUEUE_ORDER = {"openbsd6": ORDER_48}


def queue_order(dialect: str) -> tuple[int, ...]:
    return QUEUE_ORDER.get(dialect, ORDER_45)


def queue_name(st: State) -> str | None:
    """The message the state is queued as, or None."""
    q = st.sync_state
    return None if q == SYNC_NONE else QUEUE_ACTION[q]


__all__ = [
    "QUEUES",
    "QUEUE_ACTION",
    "Q_DEL",
    "Q_IACK",
    "Q_INS",
    "Q_UPD",
    "Q_UPD_C",
    "QueueKind",
    "queue_name",
    "queue_order",
]
