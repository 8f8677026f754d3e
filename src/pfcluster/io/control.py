"""The control socket: newline-delimited JSON over a Unix stream socket (mode 0600).

One request per line, one response per line: `{"cmd": "states", "verbose": true}` ->
`{"ok": true, "text": [...], "data": ...}` or `{"ok": false, "error": "..."}`. The server
is non-blocking and lives in the daemon's one selector loop, so a slow or hostile client
can cost a little memory (bounded: MAX_REQUEST bytes per client, MAX_CLIENTS) but never
stalls the packet path. The client side is a plain blocking socket used by `ctl`.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import stat
from collections.abc import Callable
from typing import Any

DEFAULT_CONTROL = "/run/pfcluster.sock"
MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 32
MAX_PENDING_OUT = 16 << 20

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(RuntimeError):
    """The daemon answered with an error, or could not be reached."""


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def handle_line(line: bytes, handler: Handler) -> dict[str, Any]:
    """Decode one request and run it; any failure becomes an error response."""
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return {"ok": False, "error": f"bad JSON: {exc}"}
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        return {"ok": False, "error": "request must be an object with a string 'cmd'"}
    try:
        return handler(req)
    except Exception as exc:  # a bug in one command must not kill the firewall
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


class ControlClientConn:
    """One accepted connection: input buffer, pending output."""

    __slots__ = ("closing", "inbuf", "outbuf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closing = False

    def fileno(self) -> int:
        return self.sock.fileno()


class ControlServer:
    """Listening socket plus connections; the loop calls `accept`, `readable`, `writable`."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.clients: dict[int, ControlClientConn] = {}
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the file is born 0600: no window with wider access
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        self.sock = sock

    def _remove_stale(self) -> None:
        """Delete a socket file nobody listens on; refuse if a live daemon owns it."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)
            return
        finally:
            probe.close()
        raise ControlError(f"{self.path}: another daemon is listening")

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> ControlClientConn | None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        if len(self.clients) >= MAX_CLIENTS:
            conn.close()
            return None
        conn.setblocking(False)
        client = ControlClientConn(conn)
        self.clients[conn.fileno()] = client
        return client

    def readable(self, client: ControlClientConn) -> None:
        """Read what is there, answer every complete line; oversize -> error + close."""
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            client.closing = True
            client.outbuf.clear()
            return
        if not data:
            client.closing = True
            return
        client.inbuf += data
        while True:
            nl = client.inbuf.find(b"\n")
            if nl < 0:
                break
            line = bytes(client.inbuf[:nl])
            del client.inbuf[: nl + 1]
            if len(line) > MAX_REQUEST:
                self._oversize(client)
                return
            if line.strip():
                client.outbuf += encode(handle_line(line, self.handler))
                if len(client.outbuf) > MAX_PENDING_OUT:
                    client.closing = True
                    return
        if len(client.inbuf) > MAX_REQUEST:
            self._oversize(client)

    def _oversize(self, client: ControlClientConn) -> None:
        client.inbuf.clear()
        client.outbuf += encode({"ok": False, "error": f"request exceeds {MAX_REQUEST} bytes"})
        client.closing = True

    def writable(self, client: ControlClientConn) -> None:
        if client.outbuf:
            try:
                n = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                client.outbuf.clear()
                client.closing = True
                return
            del client.outbuf[:n]

    def done(self, client: ControlClientConn) -> bool:
        """True when the connection should be closed now (after flushing its answer)."""
        return client.closing and not client.outbuf

    def drop(self, client: ControlClientConn) -> None:
        self.clients.pop(client.fileno(), None)
        client.sock.close()

    # --- in a selectors loop (the daemon's and the --workers supervisor's) ---------

    def accept_into(self, sel: selectors.BaseSelector, kind: Any) -> None:
        """Accept what is waiting (bounded per wakeup); each client is registered with
        `(kind, client)` as its key data."""
        for _ in range(16):
            client = self.accept()
            if client is None:
                break
            sel.register(client, selectors.EVENT_READ, (kind, client))

    def service(self, sel: selectors.BaseSelector, client: ControlClientConn, mask: int,
                kind: Any) -> None:
        """Read, answer, write; close when done; watch for writability only while an
        answer is pending."""
        if mask & selectors.EVENT_READ:
            self.readable(client)
        if client.outbuf:
            self.writable(client)
        if self.done(client):
            sel.unregister(client)
            self.drop(client)
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.outbuf else 0)
        if client.closing:
            want = selectors.EVENT_WRITE
        sel.modify(client, want, (kind, client))

    def close(self) -> None:
        for client in list(self.clients.values()):
            self.drop(client)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


MAX_ANSWER = 64 << 20  # far above what the server sends (MAX_PENDING_OUT + one line)


def request(path: str, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Send one request and return the decoded response.

    Every failure is a ControlError whose str() is `PATH: problem`: the socket is missing
    or not a socket, nobody listens, the connection breaks, no answer within `timeout`,
    the daemon closes without answering, or the answer is not one JSON object."""
    req = {"cmd": cmd, **args}
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ControlError(f"{path}: cannot connect: {exc.strerror or exc} "
                           "(is the daemon running? see --control)") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path}: cannot connect: not a socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    buf = bytearray()
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise ControlError(f"{path}: cannot connect: {exc.strerror or exc}") from exc
        try:
            sock.sendall(encode(req))
            while b"\n" not in buf:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_ANSWER:
                    raise ControlError(f"{path}: answer exceeds {MAX_ANSWER} bytes")
        except TimeoutError as exc:
            raise ControlError(f"{path}: no answer within {timeout:g} s") from exc
        except OSError as exc:
            raise ControlError(f"{path}: connection lost: {exc.strerror or exc}") from exc
    finally:
        sock.close()
    if not buf:
        raise ControlError(f"{path}: the daemon closed the connection without answering")
    line, nl, _ = bytes(buf).partition(b"\n")
    try:
        resp = json.loads(line)
    except ValueError as exc:  # also UnicodeDecodeError
        what = "answer cut short" if not nl else "bad answer (not JSON)"
        raise ControlError(f"{path}: {what}: {line[:80]!r}") from exc
    if not isinstance(resp, dict) or not isinstance(resp.get("ok"), bool):
        raise ControlError(f"{path}: bad answer (not an object with a boolean 'ok'): "
                           f"{line[:80]!r}")
    return resp
