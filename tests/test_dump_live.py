"""`pfcluster dump -i IF` live, in a namespace pair: frames print as they arrive, SIGINT
and SIGTERM end it cleanly with the count tcpdump-style, -c stops by itself, the filters
select frames and -w writes a pcap that tcpdump and our reader read back."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nsfixtures import Netlab, netlab, pfcluster_argv, wait_for
from pfcluster.io.capture import iter_pfsync
from pfcluster.pfsync import wire
from pfsync_samples import CID, every_message

__all__ = ["netlab"]

pytestmark = pytest.mark.root

OTHER = 0x11111111

SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 240)
s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)
for hexed in sys.argv[2:]:
    s.sendto(bytes.fromhex(hexed), (sys.argv[1], 0))
"""


def _frames() -> list[bytes]:
    """Three frames: every message from CID (openbsd45), a BUS from OTHER (FreeBSD), an
    UPD_C from CID (openbsd6)."""
    a = wire.ACTIONS
    bus = wire.Frame(5, sections=[wire.Section("BUS", a["freebsd1301"]["BUS"],
                                               messages=[wire.Bus(OTHER, 12, 2)])])
    upd = wire.Frame(6, sections=[wire.Section("UPD_C", a["openbsd6"]["UPD_C"], messages=[
        wire.UpdC(7, wire.StatePeer(seqlo=1), wire.StatePeer(seqlo=2), CID, 10, 2)])])
    return [wire.encode(every_message("openbsd45"), "openbsd45"),
            wire.encode(bus, "freebsd1301"), wire.encode(upd, "openbsd6")]


class Lines:
    """Lines of a process's stdout with a timeout each. Reads the pipe with os.read, so
    lines that arrived together are not stuck in a file object's buffer while select()
    waits on an empty pipe."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def next(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"no line within {timeout}s (have {self.buf!r})")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError(f"output ended (have {self.buf!r})")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()


def _pair(lab: Netlab) -> tuple[str, str]:
    a, b = lab.add_ns("a"), lab.add_ns("b")
    lab.veth(a, "sync0", b, "sync0", "192.0.2.1/24", "192.0.2.2/24")
    return a, b


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job


def _start(lab: Netlab, ns: str, *args: str, sigint_ignored: bool = False
           ) -> tuple[subprocess.Popen[bytes], Path]:
    err = lab.tmp / f"dump{len(lab.procs)}.err"
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *pfcluster_argv("dump", "-i", "sync0",
                                                                         *args)],
                            stdout=subprocess.PIPE, stderr=open(err, "w"),  # noqa: SIM115
                            start_new_session=True,
                            preexec_fn=_ignore_sigint if sigint_ignored else None)
    lab.procs.append(proc)
    assert wait_for(lambda: "listening on sync0" in err.read_text(), 15), err.read_text()
    return proc, err


def _send(lab: Netlab, ns: str, frames: list[bytes]) -> None:
    lab.exec(ns, [sys.executable, "-c", SEND, "192.0.2.2", *(f.hex() for f in frames)])


@pytest.mark.parametrize("sig, ignored", [(signal.SIGINT, False), (signal.SIGTERM, False),
                                          (signal.SIGINT, True)])
def test_live_until_signal(netlab: Netlab, sig: int, ignored: bool) -> None:
    """Stops cleanly on either signal, also when started with SIGINT ignored (`cmd &` in
    a script), where Python alone would never raise KeyboardInterrupt."""
    a, b = _pair(netlab)
    proc, err = _start(netlab, b, "--json", sigint_ignored=ignored)
    frames = _frames()
    _send(netlab, a, frames)
    out = Lines(proc)
    lines = [out.next() for _ in frames]  # printed as they arrive, before any exit
    assert [json.loads(line)["dialect"] for line in lines] == \
        ["openbsd45", "freebsd1301", "openbsd6"]
    assert proc.poll() is None
    proc.send_signal(sig)
    assert proc.wait(timeout=10) == 0
    text = err.read_text()
    assert "3 pfsync frames seen" in text and "Traceback" not in text, text


def test_live_count_filters_and_write(netlab: Netlab) -> None:
    a, b = _pair(netlab)
    out = netlab.tmp / "bus.pcap"
    proc, err = _start(netlab, b, "-c", "1", "--action", "bus", "--creatorid", f"{OTHER:x}",
                       "-w", str(out))
    _send(netlab, a, _frames())
    assert proc.wait(timeout=15) == 0  # -c 1: stops at the first frame that matches
    assert proc.stdout is not None and proc.stdout.read() == b""  # -w: saved, not printed
    assert "2 pfsync frames seen, 1 filtered out, 1 written to" in err.read_text()
    saved = list(iter_pfsync(out))
    assert [p.payload for p in saved] == [_frames()[1]]
    assert saved[0].src == "192.0.2.1" and saved[0].ttl == 255
    if shutil.which("tcpdump"):
        res = subprocess.run(["tcpdump", "-n", "-r", str(out)], capture_output=True,
                             text=True, timeout=30)
        assert res.returncode == 0 and "192.0.2.1 > 192.0.2.2:  ip-proto-240" in res.stdout, res


def test_live_creatorid_filter_prints_text(netlab: Netlab) -> None:
    a, b = _pair(netlab)
    proc, err = _start(netlab, b, "--creatorid", f"0x{CID:08X}", "--seconds", "30")
    _send(netlab, a, _frames())
    lines: list[str] = []
    out = Lines(proc)
    while sum("PFSYNCv" in line for line in lines) < 2 and len(lines) < 40:
        lines.append(out.next())
    lines.append(out.next())  # the openbsd6 frame's section line
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0
    heads = [line for line in lines if "PFSYNCv" in line]
    assert ["PFSYNCv5 len 1328" in heads[0], "PFSYNCv6 len 108" in heads[1]] == [True, True], heads
    assert lines[-1] == "    act UPD ST COMP count 1", lines
    assert "3 pfsync frames seen, 1 filtered out" in err.read_text()


def test_verdict_hook_shows_with_each_frame(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook the sync-key check plugs into: its string follows each frame's head line
    (text) or sits under "verdict" (JSON); None adds nothing."""
    from click.testing import CliRunner

    from pfcluster.cli import dump as dump_mod
    from pfsync_samples import ip4, write_pcap

    pcap = write_pcap(tmp_path / "three.pcap", [ip4(f) for f in _frames()])
    said = iter(["auth ok", None, "auth bad: counter replayed"])
    monkeypatch.setattr(dump_mod, "make_verdict", lambda: lambda payload: next(said))
    res = CliRunner().invoke(dump_mod.dump, [str(pcap)], catch_exceptions=False)
    heads = [line for line in res.stdout.splitlines() if "PFSYNCv" in line]
    assert [h.endswith(t) for h, t in zip(heads, ["(ttl 255) [auth ok]", "(ttl 255)",
                                                  "(ttl 255) [auth bad: counter replayed]"],
                                          strict=True)] == [True] * 3, heads
    said = iter(["auth ok", None, "x"])
    res = CliRunner().invoke(dump_mod.dump, [str(pcap), "--json"], catch_exceptions=False)
    assert [json.loads(line).get("verdict") for line in res.stdout.splitlines()] == \
        ["auth ok", None, "x"]
