"""Small network-namespace helpers for the daemon tests (subprocess `ip`, nothing else).

Every name carries the test process's pid (`pfd<pid><n>-<role>`), links are created inside
namespaces (`ip -n A link add ... peer ... netns B`) so nothing appears on the host, and
`Netlab.close()` (called from the fixture's finally) kills what it started, deletes every
namespace and then checks that none is left. Addresses come from DESIGN.md only.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pfcluster.pfsync.events import Released

TIMEOUT = 15.0
_serial = itertools.count()

CLIENT_NET = "198.51.100"
SERVER_NET = "203.0.113"
SYNC_NET = "192.0.2"

# The daemon tests' ruleset: TCP to port 5201 passes (a state each way), the rest blocks.
PASS_5201 = """\
set skip on lo
block all
pass in proto tcp to port 5201
pass out proto tcp to port 5201
"""


def sh(argv: Sequence[str], *, timeout: float = TIMEOUT, check: bool = True,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def list_netns() -> list[str]:
    out = sh(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@dataclass
class Netlab:
    """Namespaces, veths and processes of one test; `close()` removes all of it."""

    tmp: Path
    prefix: str = field(default_factory=lambda: f"pfd{os.getpid()}x{next(_serial)}")
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def add_ns(self, role: str, *, forward: bool = False) -> str:
        name = self.ns(role)
        sh(["ip", "netns", "add", name])
        self.namespaces.append(name)
        sh(["ip", "-n", name, "link", "set", "lo", "up"])
        # no duplicate address detection: addresses (link-local too) usable at once
        self.exec(name, ["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"])
        self.exec(name, ["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0"])
        if forward:
            self.exec(name, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            self.exec(name, ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        return name

    def exec(self, ns: str, argv: Sequence[str], *, timeout: float = TIMEOUT,
             check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return sh(["ip", "netns", "exec", ns, *argv], timeout=timeout, check=check, input=input)

    def prefix_argv(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def veth(self, a: str, a_if: str, b: str, b_if: str, a_cidr: str | None = None,
             b_cidr: str | None = None, *, offloads_off: bool = False) -> None:
        """A veth pair born in namespace a with its peer placed straight into b."""
        sh(["ip", "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if,
            "netns", b])
        for ns, ifname, cidr in ((a, a_if, a_cidr), (b, b_if, b_cidr)):
            if cidr:
                sh(["ip", "-n", ns, "addr", "add", cidr, "dev", ifname] +
                   (["nodad"] if ":" in cidr else []))
            sh(["ip", "-n", ns, "link", "set", ifname, "mtu", "1500", "up"])
            if offloads_off:
                self.exec(ns, ["ethtool", "-K", ifname, "gro", "off", "gso", "off", "tso",
                               "off"], check=False)

    def route(self, ns: str, dst: str, via: str) -> None:
        sh(["ip", "-n", ns, "route", "replace", dst, "via", via])

    def spawn(self, ns: str, argv: Sequence[str], *, log: str | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(self.tmp / log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out,
                                stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                                env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
             grace: float = 10.0) -> int | None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        return proc.returncode

    def ns_pids(self, ns: str) -> list[int]:
        out = sh(["ip", "netns", "pids", ns], check=False).stdout
        return [int(p) for p in out.split()]

    def close(self) -> list[str]:
        """Kill our processes and namespaces; return what could not be removed."""
        for proc in self.procs:
            with contextlib.suppress(Exception):
                self.stop(proc, signal.SIGKILL, grace=5)
        for ns in self.namespaces:
            for pid in self.ns_pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for ns in reversed(self.namespaces):
            sh(["ip", "netns", "del", ns], check=False)
        deadline = time.monotonic() + 5
        left = [n for n in list_netns() if n.startswith(self.prefix + "-")]
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [n for n in list_netns() if n.startswith(self.prefix + "-")]
        return left


@pytest.fixture
def netlab(need_root: None, tmp_path: Path) -> Iterator[Netlab]:
    lab = Netlab(tmp_path)
    try:
        yield lab
    finally:
        left = lab.close()
    assert not left, f"namespaces left behind: {left}"


# --- topologies ----------------------------------------------------------------------


@dataclass
class Firewalled:
    """client — fw — server (+ fw's sync link to a peer namespace)."""

    lab: Netlab
    client: str
    fw: str
    server: str
    syncpeer: str
    client_ip: str = f"{CLIENT_NET}.2"
    server_ip: str = f"{SERVER_NET}.2"
    fw_sync_ip: str = f"{SYNC_NET}.1"
    peer_sync_ip: str = f"{SYNC_NET}.2"


def client_fw_server(lab: Netlab, *, offloads_off: bool = False, v6: bool = False,
                     fw_role: str = "fw") -> Firewalled:
    c = lab.add_ns("c")
    fw = lab.add_ns(fw_role, forward=True)
    s = lab.add_ns("s")
    peer = lab.add_ns("p")
    lab.veth(c, "eth0", fw, "eth0", f"{CLIENT_NET}.2/24", f"{CLIENT_NET}.1/24",
             offloads_off=offloads_off)
    lab.veth(fw, "eth1", s, "eth0", f"{SERVER_NET}.1/24", f"{SERVER_NET}.2/24",
             offloads_off=offloads_off)
    lab.veth(fw, "sync0", peer, "sync0", f"{SYNC_NET}.1/24", f"{SYNC_NET}.2/24")
    lab.route(c, "default", f"{CLIENT_NET}.1")
    lab.route(s, "default", f"{SERVER_NET}.1")
    if v6:
        for ns, ifname, addr in ((c, "eth0", "2001:db8:1::2/64"), (fw, "eth0", "2001:db8:1::1/64"),
                                 (fw, "eth1", "2001:db8:2::1/64"), (s, "eth0", "2001:db8:2::2/64")):
            sh(["ip", "-n", ns, "addr", "add", addr, "dev", ifname, "nodad"])
        sh(["ip", "-n", c, "-6", "route", "replace", "default", "via", "2001:db8:1::1"])
        sh(["ip", "-n", s, "-6", "route", "replace", "default", "via", "2001:db8:2::1"])
    return Firewalled(lab, c, fw, s, peer)


def python_argv(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def pfcluster_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "pfcluster.cli.main", *args]


def wait_for(predicate: object, timeout: float, interval: float = 0.05) -> bool:
    """Poll a callable until it returns truthy or the time is up (bounded)."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return True
        time.sleep(interval)
    return False


# --- a stand-in pfsync engine (loop and data-plane tests before/without pfsync) --------


class StubEngine:
    """Implements the Engine surface the daemon calls; records what it was given."""

    def __init__(self, filt: object, **kwargs: object) -> None:
        self.filt = filt
        self.kwargs = kwargs
        self.sync_ok = True
        self.on_sync_ok = None
        self.counters: dict[str, int] = {"ipackets": 0, "opackets": 0, "batches": 0}
        self.output: list[bytes] = []
        self.releases: list[tuple[object, bool]] = []
        self.received: list[tuple[bytes, str, int]] = []

    def start(self, now: float) -> None:
        self.output.append(b"stub-bulk-request")

    def receive(self, payload: bytes, now: float, *, src: str, ttl: int,
                sibling: bool = False) -> None:
        self.counters["ipackets"] += 1
        self.received.append((payload, src, ttl))

    def defer(self, state: object, handle: object, now: float) -> bool:
        return False

    def end_of_batch(self, now: float) -> None:
        self.counters["batches"] += 1

    def timer(self, now: float) -> None:
        pass

    def next_deadline(self) -> float | None:
        return None

    def take_output(self) -> list[bytes]:
        out, self.output = self.output, []
        self.counters["opackets"] += len(out)
        return out

    def take_events(self) -> list[object]:
        out = [Released(h, ok) for h, ok in self.releases]
        self.releases = []
        return out

    def release_all(self, now: float) -> None:
        pass

    def flush(self, now: float) -> None:
        pass

    def pending_releases(self) -> int:
        return len(self.releases)

    def clear_states(self, now: float) -> None:
        self.output.append(b"stub-clr")


def stub_core(cfg: object, ruleset: object, now: float) -> tuple[object, object]:
    """The real Filter with the stand-in engine."""
    from pfcluster.pf.filter import Filter

    filt = Filter(ruleset, hostid=getattr(cfg, "hostid", None), now=now)  # type: ignore[arg-type]
    return filt, StubEngine(filt)


TESTS_DIR = str(Path(__file__).resolve().parent)


def daemon_with_stub_argv(*args: str) -> list[str]:
    """`pfcluster daemon ARGS` but with the stand-in engine (real Filter)."""
    code = (
        f"import sys; sys.path.insert(0, {TESTS_DIR!r})\n"
        "import nsfixtures, pfcluster.io.loop as L\n"
        "L.make_core = nsfixtures.stub_core\n"
        "from pfcluster.cli.daemon import daemon\n"
        f"daemon.main(args={list(args)!r}, prog_name='pfcluster daemon')\n"
    )
    return [sys.executable, "-c", code]


def assert_closed_then_uninstall(lab: Netlab, ns: str) -> None:
    """A stopped daemon leaves the host closed (its NFQUEUE rule stays, without bypass);
    only `pfcluster daemon --uninstall` removes the rules, and then none is left."""
    import re

    from pfcluster.io.iptables import list_rules

    prefix = lab.prefix_argv(ns)
    left = list_rules(prefix)
    queued = [line for line in left if "-j NFQUEUE --queue-num" in line]
    assert len(queued) == 2, f"no NFQUEUE rule in both families after stop: {left}"
    assert not any("bypass" in line for line in queued), queued
    queues = {m.group(1) for line in queued if (m := re.search(r"--queue-num (\d+)", line))}
    for queue in queues:
        lab.exec(ns, pfcluster_argv("daemon", "--uninstall", "--queue", queue), timeout=30)
    assert list_rules(prefix) == []


def start_daemon(lab: Netlab, ns: str, rules: Path, sock: str, *extra: str,
                 log: str = "daemon.log", up_timeout: float = 20.0) -> subprocess.Popen[bytes]:
    """`pfcluster daemon` in `ns` with the sync0 link; fails the test (with its log) if the
    control socket does not answer within `up_timeout` seconds."""
    from pfcluster.io.control import request

    proc = lab.spawn(ns, pfcluster_argv("daemon", "--rules", str(rules), "--syncdev", "sync0",
                                        "--control", sock, *extra), log=log)

    def up() -> bool:
        return bool(request(sock, "info", timeout=2)["ok"])

    if not wait_for(up, up_timeout):
        lab.stop(proc)
        pytest.fail(f"daemon in {ns} did not come up:\n" + (lab.tmp / log).read_text())
    return proc


def popen_pipe(lab: Netlab, ns: str, code: str, *args: str,
               stdin: int = subprocess.PIPE) -> subprocess.Popen[str]:
    """A Python snippet in `ns` whose stdout the test reads line by line."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
                            stdin=stdin, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    lab.procs.append(proc)  # type: ignore[arg-type]
    return proc


def readline(proc: subprocess.Popen[str], timeout: float = 10.0) -> str:
    """The next line of `proc`'s output, or an AssertionError after `timeout` seconds."""
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no output within {timeout}s")
    return proc.stdout.readline().strip()


# A client connect from inside a namespace: prints connected, refused or failed <error>.
CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("failed", type(e).__name__)
"""
