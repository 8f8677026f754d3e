"""iperf3 in the lab: start a one-shot server, run a client with -J, read the figures.

The figures we keep are the receiver's goodput (what really crossed the firewalls), the
sender's retransmits, bytes per stream, and stalls: a stream that moved ~0 bytes in a
reporting interval is a connection the firewalls stopped forwarding (the symptom of a
split path without state sync). A client that hangs (its control connection blocked too)
is interrupted at a hard deadline and reported as failed, never waited on forever.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from pfcluster.lab.netns import Lab, LabError, Proc, ns_argv, run

IPERF = "iperf3"
PORT = 5201
INTERVAL = 0.5  # seconds per iperf3 report interval (stall resolution)
STALL_FRACTION = 0.01  # an interval below 1 % of the stream's mean counts as stalled


@dataclass
class IperfResult:
    ok: bool
    error: str | None
    seconds: float
    streams: int
    goodput_bps: float  # receiver side, all streams
    sent_bps: float
    bytes_received: int
    bytes_sent: int
    retransmits: int
    stream_bytes: list[int] = field(default_factory=list)
    stalled_streams: int = 0  # streams with at least one ~0-byte interval (not the first)
    longest_stall_s: float = 0.0
    intervals: list[float] = field(default_factory=list)  # total bits/s per interval

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def start_server(lab: Lab, ns: str, bind: str, port: int = PORT, name: str = "iperf3-s") -> Proc:
    """A one-off (-1) iperf3 server: it exits after one test, so nothing lingers."""
    proc = lab.spawn(name, ns, [IPERF, "-s", "-1", "-B", bind, "-p", str(port)])
    wait_listening(ns, port, proc)
    return proc


def wait_listening(ns: str, port: int, proc: Proc, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = run(ns, ["ss", "-Hltn", f"sport = :{port}"], check=False, timeout=3).stdout
        if out.strip():
            return
        if proc.popen.poll() is not None:
            raise LabError(f"{proc.name} exited with {proc.popen.returncode}")
        time.sleep(0.05)
    raise LabError(f"nothing listening on port {port} in {ns} after {timeout:g}s")


def client_argv(
    server: str,
    *,
    seconds: float,
    streams: int,
    port: int = PORT,
    bitrate: str | None = None,
    mss: int | None = None,
    length: int | None = None,
) -> list[str]:
    argv = [
        IPERF, "-c", server, "-p", str(port), "-J",
        "-t", str(max(1, round(seconds))),  # iperf3 reads whole seconds
        "-P", str(streams), "-i", f"{INTERVAL:g}",
        "--connect-timeout", "3000",
    ]
    if bitrate:
        argv += ["-b", bitrate]
    if mss:
        argv += ["-M", str(mss)]
    if length:
        argv += ["-l", str(length)]
    return argv


def run_client(
    ns: str,
    argv: Sequence[str],
    seconds: float,
    *,
    tick: Callable[[float], None] | None = None,
    grace: float = 8.0,
) -> IperfResult:
    """Run the client; `tick(elapsed)` is called ~5x a second (progress, failover)."""
    # stdout to a file, not a pipe: iperf3 -J writes its whole report at the end, and a
    # report over the pipe's 64 KiB (many streams, long runs) would block it until killed
    outfile = tempfile.TemporaryFile()  # noqa: SIM115 (closed below)
    popen = subprocess.Popen(
        ns_argv(ns, argv), stdout=outfile, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    start = time.monotonic()
    deadline = start + seconds + grace
    interrupted = False
    try:
        while popen.poll() is None:
            now = time.monotonic()
            if tick:
                tick(now - start)
            if now > deadline and not interrupted:
                # a stuck client (control connection blocked): SIGINT makes iperf3 print
                # what it has; SIGKILL below if even that hangs
                interrupted = True
                popen.send_signal(signal.SIGINT)
                deadline = now + 3.0
            elif now > deadline:
                popen.kill()
                break
            time.sleep(0.2)
        _, err = popen.communicate(timeout=5)
        outfile.seek(0)
        out = outfile.read()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            popen.kill()
        popen.wait(5)
        raise
    finally:
        outfile.close()
    streams = int(argv[argv.index("-P") + 1]) if "-P" in argv else 1
    result = parse(out.decode(errors="replace"), streams=streams)
    if interrupted and result.error is None:
        result.ok = False
        result.error = "client hung past its deadline (interrupted)"
    if not out.strip():
        result.error = (err.decode(errors="replace").strip() or "no output")[-300:]
    return result


def parse(text: str, streams: int = 0) -> IperfResult:
    """Figures from iperf3 -J output; a broken or partial report gives ok=False."""
    try:
        doc = json.loads(text)
    except ValueError:
        return IperfResult(False, "unparsable iperf3 output", 0.0, streams, 0.0, 0.0, 0, 0, 0)
    end = doc.get("end") or {}
    recv = end.get("sum_received") or {}
    sent = end.get("sum_sent") or {}
    error = doc.get("error")
    per_stream: list[int] = []
    for s in end.get("streams") or []:
        r = s.get("receiver") or {}
        per_stream.append(int(r.get("bytes", 0)))
    nstreams = len(per_stream) or streams
    # per-interval bytes per stream; iperf3 reports on the sender, which is fine: a
    # blocked connection fills its send buffer and the sender's count drops to zero
    intervals = doc.get("intervals") or []
    series: dict[int, list[tuple[float, int]]] = {}
    totals: list[float] = []
    for iv in intervals:
        ssum = iv.get("sum") or {}
        totals.append(float(ssum.get("bits_per_second", 0.0)))
        for s in iv.get("streams") or []:
            series.setdefault(int(s.get("socket", 0)), []).append(
                (float(s.get("seconds", 0.0)), int(s.get("bytes", 0)))
            )
    stalled = 0
    longest = 0.0
    for points in series.values():
        total = sum(b for _, b in points)
        dur = sum(d for d, _ in points) or 1.0
        mean_rate = total / dur
        run_s = 0.0
        hit = False
        # skip the first interval (slow start) and a short trailing one
        for d, b in points[1:]:
            if d < INTERVAL * 0.5:
                continue
            if b <= STALL_FRACTION * mean_rate * d or b == 0:
                run_s += d
                hit = True
                longest = max(longest, run_s)
            else:
                run_s = 0.0
        if hit or total == 0:
            stalled += 1
            if total == 0:
                longest = max(longest, dur)
    seconds = float(recv.get("seconds") or sent.get("seconds") or 0.0)
    ok = error is None and bool(recv)
    return IperfResult(
        ok=ok,
        error=error,
        seconds=seconds,
        streams=nstreams,
        goodput_bps=float(recv.get("bits_per_second", 0.0)),
        sent_bps=float(sent.get("bits_per_second", 0.0)),
        bytes_received=int(recv.get("bytes", 0)),
        bytes_sent=int(sent.get("bytes", 0)),
        retransmits=int(sent.get("retransmits", 0)),
        stream_bytes=per_stream,
        stalled_streams=stalled,
        longest_stall_s=round(longest, 3),
        intervals=totals,
    )
