"""systemd's readiness protocol (Type=notify): one datagram to $NOTIFY_SOCKET.

READY=1 once the queue is bound and the iptables chain is in place, so units ordered
after pfcluster.service (keepalived) start on a firewall that filters; STOPPING=1 when a
stop begins. Nothing happens outside systemd (no NOTIFY_SOCKET)."""

from __future__ import annotations

import contextlib
import os
import socket


def sd_notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1"); False when not under systemd or the send failed."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or path[0] not in "/@":
        return False
    addr = "\0" + path[1:] if path[0] == "@" else path  # '@': the abstract namespace
    with contextlib.suppress(OSError), \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(message.encode(), addr)
        return True
    return False
