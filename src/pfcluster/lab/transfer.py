"""A bounded TCP transfer of a known byte stream, checked by SHA-256 on the receiver.

iperf3 counts bytes but never checks them; a firewall that mangles a sequence number or
window would still look fine. Here each connection carries a deterministic pseudo-random
stream (seeded per connection), the receiver hashes what arrived and the lab compares the
digest with the expected one. Both ends run inside lab namespaces:

    python -m pfcluster.lab.transfer recv --bind ADDR --port P --conns K --timeout T
    python -m pfcluster.lab.transfer send --to ADDR --port P --conns K --bytes N --seed S

Each prints one JSON object; every socket call and the whole run are time-bounded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import sys
import threading
import time
from collections.abc import Iterator

BLOCK = 64 * 1024


def pattern(seed: int, conn: int, nbytes: int) -> Iterator[bytes]:
    """The byte stream of connection `conn`: the same on sender and in the check."""
    rng = random.Random(seed * 1_000_003 + conn)
    left = nbytes
    while left > 0:
        n = min(BLOCK, left)
        yield rng.randbytes(n)
        left -= n


def expected_digest(seed: int, conn: int, nbytes: int) -> str:
    h = hashlib.sha256()
    for block in pattern(seed, conn, nbytes):
        h.update(block)
    return h.hexdigest()


def split_bytes(total: int, conns: int) -> list[int]:
    """How many bytes connection i carries (the first ones take the remainder)."""
    base, extra = divmod(total, conns)
    return [base + (1 if i < extra else 0) for i in range(conns)]


def receive(bind: str, port: int, conns: int, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    results: list[dict[str, object]] = []
    lock = threading.Lock()

    def serve(sock: socket.socket, peer: str) -> None:
        h = hashlib.sha256()
        n = 0
        err = None
        first = b""
        try:
            with sock:
                # the sender's first 4 bytes say which connection this is
                while len(first) < 4:
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    chunk = sock.recv(4 - len(first))
                    if not chunk:
                        raise ConnectionError("closed before the header")
                    first += chunk
                while True:
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    chunk = sock.recv(BLOCK)
                    if not chunk:
                        break
                    h.update(chunk)
                    n += len(chunk)
        except OSError as exc:
            err = f"{type(exc).__name__}: {exc}"
        index = int.from_bytes(first, "big") if len(first) == 4 else -1
        with lock:
            results.append(
                {"conn": index, "peer": peer, "bytes": n, "sha256": h.hexdigest(), "error": err}
            )

    threads: list[threading.Thread] = []
    start = time.monotonic()
    with socket.socket(family, socket.SOCK_STREAM) as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((bind, port))
        ls.listen(conns)
        print(json.dumps({"listening": port}), file=sys.stderr, flush=True)
        while len(threads) < conns and time.monotonic() < deadline:
            ls.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock, addr = ls.accept()
            except TimeoutError:
                break
            t = threading.Thread(target=serve, args=(sock, addr[0]), daemon=True)
            t.start()
            threads.append(t)
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()) + 1)
    return {
        "role": "recv",
        "conns": sorted(results, key=lambda r: int(r["conn"])),  # type: ignore[call-overload]
        "accepted": len(threads),
        "elapsed": time.monotonic() - start,
    }


def send(to: str, port: int, conns: int, nbytes: int, seed: int, timeout: float,
         sources: list[str] | None = None) -> dict[str, object]:
    """`sources`: connection i binds sources[i % len] (several address pairs, so that a
    `--workers` firewall spreads them over its workers)."""
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in to else socket.AF_INET
    results: list[dict[str, object]] = []
    lock = threading.Lock()

    def one(index: int, size: int) -> None:
        h = hashlib.sha256()
        sent = 0
        err = None
        try:
            # the receiver may still be starting: retry the connect until the deadline
            while True:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
                try:
                    if sources:
                        sock.bind((sources[index % len(sources)], 0))
                    sock.connect((to, port))
                    break
                except OSError:
                    sock.close()
                    if time.monotonic() > deadline - 0.2:
                        raise
                    time.sleep(0.1)
            with sock:
                sock.sendall(index.to_bytes(4, "big"))
                for block in pattern(seed, index, size):
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    sock.sendall(block)
                    h.update(block)
                    sent += len(block)
                sock.shutdown(socket.SHUT_WR)
                # wait for the receiver's close so "sent" means "delivered to its socket"
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                while sock.recv(4096):
                    pass
        except OSError as exc:
            err = f"{type(exc).__name__}: {exc}"
        with lock:
            results.append({"conn": index, "bytes": sent, "sha256": h.hexdigest(), "error": err})

    start = time.monotonic()
    threads = [
        threading.Thread(target=one, args=(i, size), daemon=True)
        for i, size in enumerate(split_bytes(nbytes, conns))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()) + 1)
    return {
        "role": "send",
        "conns": sorted(results, key=lambda r: int(r["conn"])),  # type: ignore[call-overload]
        "elapsed": time.monotonic() - start,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pfcluster.lab.transfer")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--bind", default="0.0.0.0")
    r.add_argument("--port", type=int, default=5301)
    r.add_argument("--conns", type=int, default=1)
    r.add_argument("--timeout", type=float, default=10.0)
    s = sub.add_parser("send")
    s.add_argument("--to", required=True)
    s.add_argument("--port", type=int, default=5301)
    s.add_argument("--conns", type=int, default=1)
    s.add_argument("--bytes", type=int, default=1 << 20)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--timeout", type=float, default=10.0)
    s.add_argument("--sources", default="", help="comma-separated source addresses")
    a = ap.parse_args(argv)
    if a.cmd == "recv":
        out = receive(a.bind, a.port, a.conns, a.timeout)
    else:
        sources = [x for x in a.sources.split(",") if x]
        out = send(a.to, a.port, a.conns, a.bytes, a.seed, a.timeout, sources or None)
    print(json.dumps(out), flush=True)
    return 0 if all(c["error"] is None for c in out["conns"]) else 1  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
