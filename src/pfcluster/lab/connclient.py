"""Short TCP connections for the connection-rate lab: a server and two client modes.

Every connection is: connect, send a small request, the server answers with a small
response and closes first, the client reads to EOF and closes. The server therefore
holds the TIME_WAIT and the client ends in CLOSED, so Linux may hand the same source
port to a later connection at once (the port-reuse pattern of issue 9).

    python -m pfcluster.lab.connclient serve --bind ADDR --port P --seconds S
    python -m pfcluster.lab.connclient load  --to ADDR --port P --conns N --parallel K \
        --timeout T --max-seconds M
    python -m pfcluster.lab.connclient reuse --to ADDR --port P --count N \
        --bind-ip ADDR --src-port SP --timeout T

`load` keeps at most K connections in flight (non-blocking sockets and `selectors`);
`reuse` makes N sequential connections from fresh ports, then N from one fixed source
port (SO_REUSEADDR + bind). Both print one JSON object on stdout with per-connection
figures, SYN retransmissions from TCP_INFO and the namespace's own TCP counters
(/proc/net/snmp and /proc/net/netstat, read before and after). Every loop is bounded in
count and in time.
"""

from __future__ import annotations

import argparse
import errno
import json
import selectors
import signal
import socket
import statistics
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

REQUEST = b"GET /conn HTTP/1.0\r\n\r\n"
REQUEST_END = b"\r\n\r\n"
RESPONSE = b"HTTP/1.0 200 OK\r\nContent-Length: 16\r\n\r\n0123456789abcdef"
MAX_REQUEST = 4096  # the server drops a peer that sends more than this before the end
RECV = 4096

# struct tcp_info (linux/tcp.h): u8 state, ca_state, retransmits, probes, backoff,
# options, wscale, flags; then u32 fields, tcpi_total_retrans is the 24th (offset 100).
TCP_INFO_LEN = 104
_TCPI_RETRANSMITS = 2
_TCPI_TOTAL_RETRANS = 100

# namespace counters reported as deltas (nstat names)
NSTAT_KEYS = ("TcpActiveOpens", "TcpAttemptFails", "TcpEstabResets", "TcpRetransSegs",
              "TcpOutRsts", "TcpExtTCPSynRetrans", "TcpExtTCPTimeouts")


def nstat() -> dict[str, int]:
    """The calling namespace's TCP counters, as nstat names them (Tcp*, TcpExt*)."""
    out: dict[str, int] = {}
    for path, prefixes in (("/proc/net/snmp", ("Tcp",)), ("/proc/net/netstat", ("TcpExt",))):
        try:
            lines = open(path).read().splitlines()  # noqa: SIM115 - tiny procfs file
        except OSError:
            continue
        for head, vals in zip(lines[::2], lines[1::2], strict=False):
            hname, _, hkeys = head.partition(":")
            _, _, hvals = vals.partition(":")
            if hname not in prefixes:
                continue
            for k, v in zip(hkeys.split(), hvals.split(), strict=False):
                try:
                    out[hname + k] = int(v)
                except ValueError:
                    continue
    return out


def nstat_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in NSTAT_KEYS}


def tcp_retrans(sock: socket.socket) -> int:
    """Segments this socket retransmitted so far (SYNs included), from TCP_INFO."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    except OSError:
        return 0
    if len(raw) >= _TCPI_TOTAL_RETRANS + 4:
        return int(struct.unpack_from("I", raw, _TCPI_TOTAL_RETRANS)[0])
    return raw[_TCPI_RETRANSMITS] if len(raw) > _TCPI_RETRANSMITS else 0


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max in milliseconds (nearest rank), None when nothing completed."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    v = sorted(values)

    def rank(p: float) -> float:
        i = max(0, min(len(v) - 1, int(-(-p * len(v) // 100)) - 1))
        return round(v[i] * 1000, 3)

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": round(v[-1] * 1000, 3)}


def family_of(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


# --- server ---------------------------------------------------------------------------


@dataclass
class _Peer:
    sock: socket.socket
    buf: bytes = b""
    out: bytes = b""
    since: float = 0.0


def serve(bind: str, port: int, seconds: float, idle_timeout: float = 30.0) -> dict[str, Any]:
    """Answer every request with RESPONSE and close first; stop after `seconds` or SIGTERM."""
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    deadline = time.monotonic() + seconds
    sel = selectors.DefaultSelector()
    ls = socket.socket(family_of(bind), socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((bind, port))
    ls.listen(4096)
    ls.setblocking(False)
    sel.register(ls, selectors.EVENT_READ, None)
    print(json.dumps({"listening": port}), file=sys.stderr, flush=True)
    peers: dict[int, _Peer] = {}
    counts = {"accepted": 0, "served": 0, "errors": 0, "idle_closed": 0, "oversize": 0}
    last_sweep = time.monotonic()

    def drop(p: _Peer) -> None:
        sel.unregister(p.sock)
        peers.pop(p.sock.fileno(), None)
        p.sock.close()

    while not stop:
        now = time.monotonic()
        if now >= deadline:
            break
        for key, mask in sel.select(timeout=min(0.2, deadline - now)):
            if key.data is None:  # the listener: accept a bounded batch
                for _ in range(256):
                    try:
                        s, _addr = ls.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        counts["errors"] += 1
                        break
                    s.setblocking(False)
                    p = _Peer(s, since=now)
                    peers[s.fileno()] = p
                    sel.register(s, selectors.EVENT_READ, p)
                    counts["accepted"] += 1
                continue
            p = key.data
            try:
                if mask & selectors.EVENT_READ and not p.out:
                    chunk = p.sock.recv(RECV)
                    if not chunk:
                        counts["errors"] += 1  # the client gave up before its request
                        drop(p)
                        continue
                    p.buf += chunk
                    if REQUEST_END not in p.buf:
                        if len(p.buf) > MAX_REQUEST:
                            counts["oversize"] += 1
                            drop(p)
                        continue
                    p.out = RESPONSE
                    sel.modify(p.sock, selectors.EVENT_WRITE, p)
                    mask = selectors.EVENT_WRITE  # the socket is almost surely writable
                if mask & selectors.EVENT_WRITE and p.out:
                    n = p.sock.send(p.out)
                    p.out = p.out[n:]
                    if not p.out:
                        counts["served"] += 1
                        drop(p)  # the server closes first: TIME_WAIT stays here
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                counts["errors"] += 1
                drop(p)
        if now - last_sweep >= 1.0:  # bounded: peers idle beyond idle_timeout go
            last_sweep = now
            for p in [p for p in peers.values() if now - p.since > idle_timeout]:
                counts["idle_closed"] += 1
                drop(p)
    for p in list(peers.values()):
        drop(p)
    sel.close()
    ls.close()
    return {"role": "serve", **counts}


# --- load: many short connections, bounded parallelism ------------------------------


@dataclass
class _Conn:
    index: int
    sock: socket.socket
    start: float
    sent: int = 0
    got: int = 0
    port: int = 0


@dataclass
class LoadResult:
    conns: int
    parallel: int
    started: int = 0
    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    retrans: int = 0  # TCP_INFO total_retrans summed over completed connections
    conns_with_retrans: int = 0
    ports: list[int] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0


def _fail(res: LoadResult, c: _Conn, why: str, now: float, keep: int = 50) -> None:
    res.failed[why] = res.failed.get(why, 0) + 1
    if len(res.failures) < keep:
        res.failures.append({"n": c.index, "port": c.port, "why": why,
                             "after_ms": round((now - c.start) * 1000, 1)})


def load(to: str, port: int, conns: int, parallel: int, timeout: float,
         max_seconds: float, sources: list[str] | None = None) -> dict[str, Any]:
    """`conns` short connections, at most `parallel` in flight, each bounded by `timeout`,
    the whole run by `max_seconds` (connections not started by then count as failed).
    `sources`: connection i binds sources[i % len] (several address pairs, so that a
    `--workers` firewall spreads them)."""
    fam = family_of(to)
    sel = selectors.DefaultSelector()
    res = LoadResult(conns, parallel)
    active: dict[int, _Conn] = {}  # insertion order == start order: oldest first
    before = nstat()
    t0 = time.monotonic()
    hard = t0 + max_seconds

    def finish(c: _Conn, why: str | None, now: float) -> None:
        with_retrans = 0
        if why is None:
            with_retrans = tcp_retrans(c.sock)
        sel.unregister(c.sock)
        del active[c.sock.fileno()]
        c.sock.close()
        if why is None:
            res.completed += 1
            res.latencies.append(now - c.start)
            res.retrans += with_retrans
            res.conns_with_retrans += 1 if with_retrans else 0
        else:
            _fail(res, c, why, now)

    while (res.started < conns or active) and time.monotonic() < hard:
        now = time.monotonic()
        while res.started < conns and len(active) < parallel:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setblocking(False)
            c = _Conn(res.started, s, time.monotonic())
            if sources:
                s.bind((sources[res.started % len(sources)], 0))
            res.started += 1
            err = s.connect_ex((to, port))
            if err not in (0, errno.EINPROGRESS):
                s.close()
                _fail(res, c, errno.errorcode.get(err, str(err)), now)
                continue
            try:  # the source port is chosen by connect(): known even if it never opens
                c.port = s.getsockname()[1]
            except OSError:
                c.port = 0
            active[s.fileno()] = c
            sel.register(s, selectors.EVENT_WRITE, c)
        for key, _mask in sel.select(timeout=0.02):
            c = key.data
            now = time.monotonic()
            try:
                if c.sent == 0:
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        finish(c, errno.errorcode.get(err, str(err)), now)
                        continue
                    res.ports.append(c.port)
                    c.sent = c.sock.send(REQUEST)
                    sel.modify(c.sock, selectors.EVENT_READ, c)
                    continue
                chunk = c.sock.recv(RECV)
                if chunk:
                    c.got += len(chunk)
                    continue
                finish(c, None if c.got else "eof_without_response", now)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                finish(c, errno.errorcode.get(exc.errno or 0, type(exc).__name__), now)
        now = time.monotonic()
        for c in list(active.values()):  # oldest first: stop at the first young one
            if now - c.start < timeout:
                break
            finish(c, "timeout", now)
    now = time.monotonic()
    for c in list(active.values()):
        finish(c, "timeout" if now - c.start >= timeout else "run_deadline", now)
    if res.started < conns:
        res.failed["not_started"] = conns - res.started
    res.elapsed = time.monotonic() - t0
    sel.close()
    failed = sum(res.failed.values())
    return {
        "role": "load",
        "conns": conns,
        "parallel": parallel,
        "timeout": timeout,
        "completed": res.completed,
        "failed": failed,
        "failed_by_reason": res.failed,
        "elapsed_s": round(res.elapsed, 3),
        "conn_per_s": round(res.completed / res.elapsed, 1) if res.elapsed > 0 else None,
        "latency_ms": percentiles(res.latencies),
        "tcpinfo_retrans": res.retrans,
        "conns_with_retrans": res.conns_with_retrans,
        "nstat": nstat_delta(before, nstat()),
        "distinct_ports": len(set(res.ports)),
        "ports": res.ports,
        "failures": res.failures,
    }


# --- reuse: sequential connections, fresh ports vs one fixed source port ------------


def one_conn(to: str, port: int, timeout: float, src: tuple[str, int] | None) -> dict[str, Any]:
    """One blocking connection; with `src`, bound to that address and port (SO_REUSEADDR).

    If the previous connection from the same port is still finishing its close (our FIN
    not yet acked: EADDRNOTAVAIL on connect), retry every millisecond within `timeout`;
    that local wait is reported as `bind_wait_ms`, and `ms` (connect + request +
    response + close) starts at the attempt that got the port.
    """
    first = time.monotonic()
    deadline = first + timeout
    waits = 0
    got = 0
    while True:
        start = time.monotonic()
        s = socket.socket(family_of(to), socket.SOCK_STREAM)
        try:
            if src is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(src)
            s.settimeout(max(0.01, deadline - time.monotonic()))
            s.connect((to, port))
            break
        except OSError as exc:
            s.close()
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE) and \
                    time.monotonic() + 0.001 < deadline:
                waits += 1
                time.sleep(0.001)
                continue
            failed = "timeout" if isinstance(exc, TimeoutError) else \
                errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            return {"ok": False, "why": failed, "ms": round((time.monotonic() - start) * 1000, 3),
                    "retrans": 0, "bind_waits": waits,
                    "bind_wait_ms": round((start - first) * 1000, 3)}
    why: str | None = None
    retrans = 0
    with s:
        try:
            s.sendall(REQUEST)
            while time.monotonic() < deadline:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(RECV)
                if not chunk:
                    break
                got += len(chunk)
            else:
                why = "timeout"
        except TimeoutError:
            why = "timeout"
        except OSError as exc:
            why = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        if why is None and not got:
            why = "eof_without_response"
        retrans = tcp_retrans(s)
    return {"ok": why is None, "why": why, "ms": round((time.monotonic() - start) * 1000, 3),
            "retrans": retrans, "bind_waits": waits,
            "bind_wait_ms": round((start - first) * 1000, 3)}


def _series(conns: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [c["ms"] for c in conns if c["ok"]]
    return {
        "count": len(conns),
        "ok": len(ok),
        "median_ms": round(statistics.median(ok), 3) if ok else None,
        "max_ms": max((c["ms"] for c in conns), default=None),
        "retrans": sum(c["retrans"] for c in conns),
        "bind_wait_ms": round(sum(c["bind_wait_ms"] for c in conns), 3),
        "conns": conns,
    }


def reuse(to: str, port: int, count: int, bind_ip: str, src_port: int,
          timeout: float) -> dict[str, Any]:
    """`count` sequential connections from fresh ports, then `count` from `src_port`."""
    out: dict[str, Any] = {"role": "reuse", "src_port": src_port}
    for name, src in (("fresh", None), ("reuse", (bind_ip, src_port))):
        before = nstat()
        conns = [one_conn(to, port, timeout, src) for _ in range(count)]
        out[name] = {**_series(conns), "nstat": nstat_delta(before, nstat())}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pfcluster.lab.connclient")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--seconds", type=float, default=600.0, help="lifetime bound")
    lo = sub.add_parser("load")
    lo.add_argument("--to", required=True)
    lo.add_argument("--port", type=int, default=8080)
    lo.add_argument("--conns", type=int, default=3000)
    lo.add_argument("--parallel", type=int, default=50)
    lo.add_argument("--timeout", type=float, default=15.0)
    lo.add_argument("--max-seconds", type=float, default=120.0)
    lo.add_argument("--sources", default="", help="comma-separated source addresses")
    r = sub.add_parser("reuse")
    r.add_argument("--to", required=True)
    r.add_argument("--port", type=int, default=8080)
    r.add_argument("--count", type=int, default=15)
    r.add_argument("--bind-ip", required=True)
    r.add_argument("--src-port", type=int, required=True)
    r.add_argument("--timeout", type=float, default=15.0)
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        if not 0 < a.seconds <= 86400:
            ap.error("--seconds must be in (0, 86400]")
        out = serve(a.bind, a.port, a.seconds)
    elif a.cmd == "load":
        if not (0 <= a.conns <= 1_000_000 and 1 <= a.parallel <= 10_000
                and 0 < a.timeout <= 600 and 0 < a.max_seconds <= 3600):
            ap.error("conns 0..1e6, parallel 1..1e4, timeout (0, 600], max-seconds (0, 3600]")
        sources = [x for x in a.sources.split(",") if x]
        out = load(a.to, a.port, a.conns, a.parallel, a.timeout, a.max_seconds, sources or None)
    else:
        if not (0 <= a.count <= 10_000 and 0 < a.timeout <= 600 and 0 < a.src_port < 65536):
            ap.error("count 0..10000, timeout (0, 600], src-port 1..65535")
        out = reuse(a.to, a.port, a.count, a.bind_ip, a.src_port, a.timeout)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
