"""Bad input to every `pfcluster` command: one line on stderr naming the file or
resource and the problem, a non-zero exit status, never a traceback (issue 9, section 6).

`dump`, `replay`, `bench` and `lab` run as the user runs them (a subprocess of the
installed `pfcluster`); `ctl` talks to a fake control socket served from a thread here.
`daemon` is covered with its own code (NFQUEUE and iptables)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import dpkt
import pytest
from click.testing import CliRunner

from pfcluster.cli.errors import CommandError, ReportingCommand, describe
from pfcluster.io.capture import CaptureError, iter_link
from pfcluster.io.control import ControlError, request
from pfcluster.pfsync import wire

CLIENT, SERVER = "198.51.100.2", "203.0.113.10"


def pfcluster(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("pfcluster")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "pfcluster.cli.main"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def cli(*args: str) -> Any:
    """In-process run of the whole `pfcluster` group (faster than a subprocess)."""
    from pfcluster.cli.main import main

    return CliRunner().invoke(main, list(args), prog_name="pfcluster")


def assert_one_line(res: Any, *names: str, code: int | None = None) -> str:
    """Exit status non-zero (or `code`), no traceback, stderr exactly one line that names
    every one of `names`; returns that line."""
    out, err = res.stdout, res.stderr
    rc = res.returncode if hasattr(res, "returncode") else res.exit_code
    if not hasattr(res, "returncode"):  # CliRunner: an uncaught exception is kept aside
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exc_info
    assert "Traceback" not in out + err, out + err
    assert rc != 0, (out, err)
    if code is not None:
        assert rc == code, (rc, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- captures


def _pfsync_ip() -> bytes:
    a = wire.ACTIONS["openbsd45"]
    frame = wire.Frame(wire.VERSION["openbsd45"], sections=[
        wire.Section("BUS", a["BUS"], messages=[wire.Bus(0xC0FFEE01, 3725, 2)])])
    return wire.encode_ip(frame, "openbsd45", "192.0.2.1", "224.0.0.240", ttl=255)


def _tcp_ip(sport: int) -> bytes:
    return bytes(dpkt.ip.IP(src=socket.inet_aton(CLIENT), dst=socket.inet_aton(SERVER), p=6,
                            data=dpkt.tcp.TCP(sport=sport, dport=80, flags=dpkt.tcp.TH_SYN)))


def _pcap_header(linktype: int = 101) -> bytes:
    return struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)


def _pcap_record(data: bytes, ts: int = 1700000000) -> bytes:
    return struct.pack("<IIII", ts, 0, len(data), len(data)) + data


def _block(btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack("<II", btype, len(body) + 12) + body + struct.pack("<I", len(body) + 12)


def _pcapng(records: list[bytes], linktype: int = 101) -> bytes:
    shb = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    idb = _block(1, struct.pack("<HHI", linktype, 0, 65535))
    epbs = b"".join(_block(6, struct.pack("<IIIII", 0, 0, i, len(r), len(r)) + r)
                    for i, r in enumerate(records))
    return shb + idb + epbs


def bad_captures(tmp: Path) -> dict[str, tuple[Path, str]]:
    """kind -> (path, a word the error line must contain)."""
    one = _pcap_record(_pfsync_ip())
    files: dict[str, tuple[bytes | None, str]] = {
        "missing": (None, "No such file"),
        "empty": (b"", "empty"),
        "text": (b"this is not a capture\n", "not a pcap"),
        "short-header": (_pcap_header()[:10], "truncated"),
        "linktype-147": (_pcap_header(147) + one, "link type 147"),
        "huge-caplen": (_pcap_header() + struct.pack("<IIII", 0, 0, 1 << 30, 1 << 30), "corrupt"),
        "pcapng-bad-block": (_pcapng([])[:28] + struct.pack("<II", 1, 7), "bad block length"),
        "pcapng-linktype-147": (_pcapng([_pfsync_ip()], linktype=147), "link type 147"),
    }
    out: dict[str, tuple[Path, str]] = {}
    for kind, (data, word) in files.items():
        path = tmp / f"{kind}.pcap"
        if data is not None:
            path.write_bytes(data)
        out[kind] = (path, word)
    out["directory"] = (tmp, "Is a directory")
    return out


KINDS = ["missing", "empty", "text", "short-header", "linktype-147", "huge-caplen",
         "pcapng-bad-block", "pcapng-linktype-147", "directory"]


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "pf.conf"
    path.write_text("pass all\n")
    return path


IFACES = ["--iface", "em0=198.51.100.0/24", "--iface", "em1=203.0.113.0/24"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_dump_bad_capture(tmp_path: Path, kind: str, json_flag: list[str]) -> None:
    path, word = bad_captures(tmp_path)[kind]
    res = pfcluster("dump", *json_flag, str(path))
    line = assert_one_line(res, str(path), word, code=1)
    assert line.startswith("pfcluster dump: ")
    assert res.stdout == ""


@pytest.mark.parametrize("kind", KINDS)
def test_replay_bad_capture(tmp_path: Path, rules: Path, kind: str) -> None:
    path, word = bad_captures(tmp_path)[kind]
    res = pfcluster("replay", "--rules", str(rules), *IFACES, str(path))
    assert_one_line(res, "pfcluster replay: ", str(path), word, code=1)
    assert res.stdout == ""  # nothing replayed: no summary either


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file anyway")
def test_unreadable_capture(tmp_path: Path, rules: Path) -> None:
    path = tmp_path / "secret.pcap"
    path.write_bytes(_pcap_header())
    path.chmod(0)
    assert_one_line(pfcluster("dump", str(path)), str(path), "Permission denied", code=1)
    res = pfcluster("replay", "--rules", str(rules), *IFACES, str(path))
    assert_one_line(res, str(path), "Permission denied", code=1)


def test_unreadable_capture_as_root_too(tmp_path: Path, rules: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Root opens a mode-000 file, so the EACCES is simulated where the reader opens."""
    from pfcluster.io import capture

    path = tmp_path / "secret.pcap"
    path.write_bytes(_pcap_header())

    def denied(file: Any, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(capture, "open", denied, raising=False)
    line = assert_one_line(cli("dump", str(path)), str(path), "Permission denied", code=1)
    assert line == f"pfcluster dump: {path}: Permission denied"
    res = cli("replay", "--rules", str(rules), *IFACES, str(path))
    assert_one_line(res, "pfcluster replay: ", str(path), "Permission denied", code=1)


def _cut(data: bytes, n: int) -> bytes:
    return data[:-n]


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_dump_truncated_prints_frames_before_the_cut(tmp_path: Path, fmt: str) -> None:
    ip = _pfsync_ip()
    if fmt == "pcap":
        data = _pcap_header() + _pcap_record(ip) + _pcap_record(ip, 1700000001)[:30]
    else:
        data = _cut(_pcapng([ip, ip]), 9)
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data)
    res = pfcluster("dump", "--json", str(path))
    assert res.returncode == 1 and "Traceback" not in res.stdout + res.stderr
    frames = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(frames) == 1 and frames[0]["sections"][0]["action"] == "BUS"
    last = res.stderr.splitlines()[-1]  # after "dump: dialect ..."
    assert last.startswith(f"pfcluster dump: {path}: truncated dump file")
    text = pfcluster("dump", str(path))
    assert text.returncode == 1 and "PFSYNC" in text.stdout
    assert text.stderr.splitlines()[-1] == last


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_replay_truncated_prints_summary_then_error(tmp_path: Path, rules: Path,
                                                    fmt: str) -> None:
    a, b = _tcp_ip(40000), _tcp_ip(40001)
    if fmt == "pcap":
        data = _pcap_header() + _pcap_record(a) + _pcap_record(b)[:-5]
    else:
        data = _cut(_pcapng([a, b]), 9)
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data)
    res = pfcluster("replay", "--json", "--rules", str(rules), *IFACES, str(path))
    line = assert_one_line(res, str(path), "truncated dump file", code=1)
    assert line.startswith("pfcluster replay: ")
    recs = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r.get("n") for r in recs[:-1]] == [1] and recs[0]["action"] == "pass"
    assert recs[-1]["summary"]["packets"]["total"] == 1


# --------------------------------------------------------------------------- rules, options


@pytest.mark.parametrize("kind", ["missing", "directory", "binary", "syntax"])
def test_replay_bad_rules(tmp_path: Path, kind: str) -> None:
    cap = tmp_path / "ok.pcap"
    cap.write_bytes(_pcap_header() + _pcap_record(_tcp_ip(1)))
    path = {"missing": tmp_path / "none.conf", "directory": tmp_path}.get(kind, tmp_path / "r")
    if kind == "binary":
        path.write_bytes(b"\xff\xfe\x00pass")
    if kind == "syntax":
        path.write_text("pass all\npass in proto tcp to port 99999\n")
    res = pfcluster("replay", "--rules", str(path), *IFACES, str(cap))
    line = assert_one_line(res, str(path), code=1)
    word = {"missing": "No such file", "directory": "Is a directory", "binary": "not a text file",
            "syntax": f"{path}:2:"}[kind]
    assert word in line


@pytest.mark.parametrize("spec", ["em0", "em0=", "=198.51.100.0/24", "em0=198.51.100.0/99",
                                  "em0=banana"])
def test_replay_bad_iface(tmp_path: Path, rules: Path, spec: str) -> None:
    cap = tmp_path / "ok.pcap"
    cap.write_bytes(_pcap_header() + _pcap_record(_tcp_ip(1)))
    res = pfcluster("replay", "--rules", str(rules), "--iface", spec, str(cap))
    assert_one_line(res, "--iface", repr(spec), code=2)


@pytest.mark.parametrize("argv", [
    ["dump", "--dialect", "openbsd99", "x.pcap"],
    ["dump"],
    ["dump", "-i", "bad name", "--count", "1"],
    ["dump", "--action", "NOPE", "x.pcap"],
    ["dump", "--creatorid", "c0ffee0g", "x.pcap"],
    ["dump", "--creatorid", "1ffffffff", "x.pcap"],
    ["dump", "-w", "out.pcap", "x.pcap"],
    ["dump", "--count", "0", "x.pcap"],
    ["replay", "--iface", "em0=198.51.100.0/24", "x.pcap"],
    ["lab", "run", "--dialect", "openbsd99"],
    ["lab", "run", "--paths", "diagonal"],
    ["nosuchcommand"],
])
def test_usage_errors_are_one_line(argv: list[str]) -> None:
    res = pfcluster(*argv)
    line = assert_one_line(res, code=2)
    assert line.startswith("pfcluster")
    if "--dialect" in argv:
        assert "'openbsd99'" in line and "--dialect" in line


@pytest.mark.root
def test_dump_live_missing_interface(need_root: None) -> None:
    res = pfcluster("dump", "-i", "pfcnosuch0", "--count", "1", "--seconds", "1")
    assert_one_line(res, "pfcluster dump: pfcnosuch0", "No such device", code=1)


# --------------------------------------------------------------------------- bench, lab


@pytest.mark.parametrize("argv, word", [
    (["bench", "engine", "--quick", "--json", "{tmp}/no/such/dir/figures.json"], "does not exist"),
    (["bench", "sync", "--quick", "--json", "{tmp}/file/figures.json"], "not a directory"),
    (["bench", "daemon", "--json", "{tmp}/no/figures.json"], "does not exist"),
    (["lab", "run", "--json", "{tmp}/file/figures.json"], "not a directory"),
    (["lab", "compare", "--out", "{tmp}/file"], "is a file"),  # click's check: status 2
    (["lab", "compare", "--json", "{tmp}/file/x/compare.json"], "not a directory"),
    (["lab", "sweep", "--out", "{tmp}/file/sweep"], "not a directory"),
    (["lab", "run", "--rules", "{tmp}/bad.conf"], "bad.conf:1:"),
    (["lab", "compare", "--rules", "{tmp}/bad.conf"], "bad.conf:1:"),
])
def test_bench_and_lab_refuse_bad_paths_before_running(tmp_path: Path, argv: list[str],
                                                       word: str) -> None:
    (tmp_path / "file").write_text("a file, not a directory\n")
    (tmp_path / "bad.conf").write_text("pass in proto tcp to port 99999\n")
    args = [a.format(tmp=tmp_path) for a in argv]
    res = pfcluster(*args, timeout=30)
    line = assert_one_line(res, code=2 if word == "is a file" else 1)
    assert word in line and str(tmp_path) in line
    assert line.startswith(f"pfcluster {argv[0]} {argv[1]}: ")


# --------------------------------------------------------------------------- ctl


@contextlib.contextmanager
def fake_daemon(path: Path, answer: Callable[[socket.socket], object]) -> Iterator[None]:
    """A Unix socket at `path` that reads one request line and lets `answer` reply."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                buf = b""
                with contextlib.suppress(OSError):
                    while b"\n" not in buf:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        buf += chunk
                    answer(conn)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(5)
        srv.close()


def _reply(data: bytes) -> Callable[[socket.socket], object]:
    return lambda conn: conn.sendall(data)


CTL_CMDS = [["states"], ["states", "-v"], ["info"], ["rules"], ["kill", "--id", "1"],
            ["flush", "states"], ["reload"], ["--json", "info"], ["info", "--json"]]

REPLIES: dict[str, tuple[bytes, str]] = {
    "garbage": (b"hello, I am not a daemon\n", "not JSON"),
    "binary": (b"\xff\xfe\x00\x01\n", "not JSON"),
    "closes-early": (b"", "without answering"),
    "cut-short": (b'{"ok": true, "text": ["ab', "cut short"),
    "not-an-object": (b"[1, 2, 3]\n", "bad answer"),
    "no-ok": (b'{"text": []}\n', "bad answer"),
    "text-not-list": (b'{"ok": true, "text": 5}\n', "'text'"),
}


@pytest.fixture
def sock_path() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes: pytest's tmp_path can be longer
    d = Path(f"/tmp/pfc-badinput-{os.getpid()}")
    d.mkdir(exist_ok=True)
    try:
        yield d / "ctl.sock"
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("cmd", CTL_CMDS, ids=" ".join)
def test_ctl_missing_socket(sock_path: Path, cmd: list[str]) -> None:
    res = pfcluster("ctl", "--control", str(sock_path), *cmd)
    assert_one_line(res, "pfcluster ctl", str(sock_path), "No such file", code=1)


@pytest.mark.parametrize("what", ["regular-file", "directory", "nobody-listens"])
def test_ctl_socket_not_usable(sock_path: Path, what: str) -> None:
    if what == "regular-file":
        sock_path.write_text("x")
    elif what == "directory":
        sock_path.mkdir()
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(sock_path))
        s.close()
    res = pfcluster("ctl", "--control", str(sock_path), "info")
    word = "Connection refused" if what == "nobody-listens" else "not a socket"
    assert_one_line(res, str(sock_path), word, code=1)


@pytest.mark.parametrize("reply", list(REPLIES))
@pytest.mark.parametrize("cmd", CTL_CMDS, ids=" ".join)
def test_ctl_bad_reply(sock_path: Path, reply: str, cmd: list[str]) -> None:
    data, word = REPLIES[reply]
    with fake_daemon(sock_path, _reply(data)):
        res = cli("ctl", "--control", str(sock_path), *cmd)
        if cmd == ["info"]:  # and once as the user runs it
            assert assert_one_line(pfcluster("ctl", "--control", str(sock_path), *cmd)) == \
                assert_one_line(res)
    line = assert_one_line(res, str(sock_path), word, code=1)
    assert line.startswith("pfcluster ctl")


def test_ctl_refused_request_is_the_daemons_error(sock_path: Path) -> None:
    err = b'{"ok": false, "error": "pf.conf:6:3: syntax error\\nsecond line"}\n'
    with fake_daemon(sock_path, _reply(err)):
        res = pfcluster("ctl", "--control", str(sock_path), "reload")
        as_json = pfcluster("ctl", "--control", str(sock_path), "reload", "--json")
    assert assert_one_line(res, code=1) == \
        "pfcluster ctl reload: pf.conf:6:3: syntax error second line"
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["ok"] is False


def test_ctl_no_answer_in_time(sock_path: Path) -> None:
    gate = threading.Event()
    with fake_daemon(sock_path, lambda conn: gate.wait(5)):
        with pytest.raises(ControlError, match=r"no answer within 0\.2 s") as exc:
            request(str(sock_path), "info", timeout=0.2)
        gate.set()
    assert str(exc.value).startswith(f"{sock_path}: ")


# --------------------------------------------------------------------------- the helper


def test_commands_run_alone_also_print_one_line(tmp_path: Path) -> None:
    """The conversion is in the commands, not only in the `pfcluster` group."""
    from pfcluster.cli.dump import dump
    from pfcluster.cli.replay import replay

    junk = tmp_path / "junk.pcap"
    junk.write_text("junk\n")
    res = CliRunner().invoke(dump, [str(junk)])
    assert res.exit_code == 1 and res.stderr == f"dump: {junk}: not a pcap or pcapng " \
        "capture (magic 0x6a756e6b)\n"
    conf = tmp_path / "pf.conf"
    conf.write_text("pass all\n")
    res = CliRunner().invoke(replay, ["--rules", str(conf), *IFACES, str(junk)])
    assert res.exit_code == 1 and res.stderr.startswith(f"replay: {junk}: not a pcap")


def test_bugs_keep_their_traceback() -> None:
    """Only documented error types become one line; anything else is a bug."""

    @click.command(cls=ReportingCommand)
    def buggy() -> None:
        raise KeyError("a bug")

    res = CliRunner().invoke(buggy, [])
    assert isinstance(res.exception, KeyError)
    assert describe(KeyError("x")) is None
    assert describe(ValueError("invalid tcpdump header")) is None
    assert describe(OSError(5, "Input/output error")) is None  # no file named: not ours
    assert describe(FileNotFoundError(2, "No such file or directory", "x")) == \
        "x: No such file or directory"
    assert describe(CaptureError("c.pcap", "empty file")) == "c.pcap: empty file"


def test_command_error_is_one_line() -> None:
    @click.command(cls=ReportingCommand)
    def fails() -> None:
        raise CommandError("thing: broke\nacross lines")

    res = CliRunner().invoke(fails, [])
    assert res.exit_code == 1 and res.stderr == "fails: thing: broke across lines\n"


# --------------------------------------------------------------------------- the readers


def test_readers_agree_with_dpkt_and_read_every_interface(tmp_path: Path) -> None:
    ip = _pfsync_ip()
    path = tmp_path / "ns.pcap"
    with open(path, "wb") as fh:
        w = dpkt.pcap.Writer(fh, linktype=101, nano=True)
        w.writepkt(ip, ts=1700000000.5)
    assert list(iter_link(path)) == [(1700000000.5, 101, ip)]
    # big-endian pcapng: two sections, interfaces of different link types, an SPB
    def blk(btype: int, body: bytes) -> bytes:
        body += b"\0" * (-len(body) % 4)
        return struct.pack(">II", btype, len(body) + 12) + body + struct.pack(">I", len(body) + 12)

    eth = b"\0" * 12 + b"\x08\x00" + ip
    tsresol = struct.pack(">HHB3x", 9, 1, 3) + b"\0" * 4  # milliseconds, then opt_endofopt
    data = (blk(0x0A0D0D0A, struct.pack(">IHHq", 0x1A2B3C4D, 1, 0, -1))
            + blk(1, struct.pack(">HHI", 101, 0, 0))
            + blk(1, struct.pack(">HHI", 1, 0, 0) + tsresol)
            + blk(6, struct.pack(">IIIII", 1, 0, 2500, len(eth), len(eth)) + eth)
            + blk(3, struct.pack(">I", len(ip)) + ip)
            + blk(0x0A0D0D0A, struct.pack(">IHHq", 0x1A2B3C4D, 1, 0, -1))
            + blk(1, struct.pack(">HHI", 113, 0, 0)))
    path = tmp_path / "be.pcapng"
    path.write_bytes(data)
    assert list(iter_link(path)) == [(2.5, 1, eth), (2.5, 101, ip)]
    path.write_bytes(data + blk(6, struct.pack(">IIIII", 1, 0, 0, 4, 4) + b"abcd"))
    with pytest.raises(CaptureError, match="interface 1, but 1 interface"):
        list(iter_link(path))
