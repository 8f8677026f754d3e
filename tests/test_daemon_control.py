"""Control protocol: NDJSON over a 0600 Unix socket, bounded, errors as answers."""

from __future__ import annotations

import json
import os
import selectors
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from pfcluster.io.config import ConfigError, load_config
from pfcluster.io.control import MAX_REQUEST, ControlError, ControlServer, request


def echo_handler(req: dict[str, Any]) -> dict[str, Any]:
    if req["cmd"] == "boom":
        raise RuntimeError("kaput")
    return {"ok": True, "text": [req["cmd"]], "data": req}


class Served:
    """A ControlServer driven by a tiny selector loop in a thread (test harness only)."""

    def __init__(self, path: Path) -> None:
        self.server = ControlServer(str(path), echo_handler)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.server, selectors.EVENT_READ, None)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            for key, mask in self.sel.select(0.05):
                if key.data is None:
                    client = self.server.accept()
                    if client is not None:
                        self.sel.register(client, selectors.EVENT_READ, client)
                    continue
                client = key.data
                if mask & selectors.EVENT_READ:
                    self.server.readable(client)
                self.server.writable(client)
                if self.server.done(client):
                    self.sel.unregister(client)
                    self.server.drop(client)
                elif client.outbuf or client.closing:
                    self.sel.modify(client, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
                else:
                    self.sel.modify(client, selectors.EVENT_READ, client)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()


@pytest.fixture
def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Served(tmp_path / "ctl.sock")
    try:
        yield s
    finally:
        s.close()


def raw_exchange(path: str, data: bytes, timeout: float = 5.0) -> bytes:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    try:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
            if out.endswith(b"\n") and out.count(b"\n") >= data.count(b"\n"):
                break
        return bytes(out)
    finally:
        sock.close()


def test_request_roundtrip_and_mode(served: Served) -> None:
    path = served.server.path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    resp = request(path, "states", verbose=True)
    assert resp == {"ok": True, "text": ["states"], "data": {"cmd": "states", "verbose": True}}


def test_bad_json_and_bad_shape_are_errors(served: Served) -> None:
    path = served.server.path
    out = raw_exchange(path, b'{not json\n[1,2]\n{"cmd": 5}\n{"cmd":"boom"}\n')
    lines = [line for line in out.split(b"\n") if line]

    answers = [json.loads(line) for line in lines]
    assert len(answers) == 4
    assert all(a["ok"] is False for a in answers)
    assert "bad JSON" in answers[0]["error"]
    assert "cmd" in answers[1]["error"]
    assert "kaput" in answers[3]["error"]
    # the server survived all of it
    assert request(path, "info")["ok"] is True


def test_oversize_request_is_refused_and_closed(served: Served) -> None:
    path = served.server.path
    out = raw_exchange(path, b"x" * (MAX_REQUEST + 100))

    answer = json.loads(out.split(b"\n")[0])
    assert answer["ok"] is False and "exceeds" in answer["error"]
    assert request(path, "info")["ok"] is True


def test_stale_socket_replaced_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # file stays, nobody listens
    s = Served(path)
    try:
        with pytest.raises(ControlError, match="another daemon"):
            ControlServer(str(path), echo_handler)
        assert request(str(path), "x")["ok"]
    finally:
        s.close()
    assert not path.exists()


def test_client_without_daemon(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="cannot connect"):
        request(str(tmp_path / "none.sock"), "info")


def test_config_file_and_flags(tmp_path: Path) -> None:
    conf = tmp_path / "d.toml"
    conf.write_text(
        'rules = "pf.conf"\nsyncdev = "sync0"\nmaxupd = 64\ndefer = true\n'
        "queue = 5\nfail_open = true\nhostid = 0x1234\n"
    )
    cfg = load_config(str(conf), {"queue": 9, "syncpeer": None})
    assert cfg.rules == str(tmp_path / "pf.conf")
    assert (cfg.syncdev, cfg.maxupd, cfg.defer, cfg.queue, cfg.fail_open, cfg.hostid) == (
        "sync0",
        64,
        True,
        9,
        True,
        0x1234,
    )
    conf.write_text('rules = "pf.conf"\nsyncdev = "s"\nbogus = 1\n')
    with pytest.raises(ConfigError, match="bogus"):
        load_config(str(conf), {})
    conf.write_text('rules = "pf.conf"\nsyncdev = "s"\nqueue = "x"\n')
    with pytest.raises(ConfigError, match="queue"):
        load_config(str(conf), {})
    with pytest.raises(ConfigError, match="syncdev"):
        load_config(None, {"rules": "x"})
