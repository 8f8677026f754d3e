"""Network-namespace helpers for the lab, and a `Lab` that removes everything it made.

Everything the lab builds lives inside namespaces named ``<prefix>-<role>`` where the
prefix carries the pid (``pfc1234``), so a run never touches the host's interfaces,
routes or iptables, two runs never collide, and a leak check can find strays by name.
Links are created inside namespaces (a veth pair is born in the switch namespace with its
peer placed straight into the target namespace), so nothing appears on the host even
briefly. Deleting a namespace after killing its processes removes its links, bridges,
routes and iptables rules with it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from pyroute2 import IPRoute, netns

IFNAMSIZ = 15  # usable characters in a Linux interface name
NETNS_DIR = Path("/run/netns")
DEFAULT_TIMEOUT = 10.0
IPTABLES = "iptables-legacy"  # the kernel here has NFQUEUE only in the legacy backend


class LabError(RuntimeError):
    """A lab step failed; the message says which command or object."""


def default_prefix() -> str:
    """A short prefix carrying our pid: unique per run, greppable by the leak check."""
    return f"pfc{os.getpid()}"


def ipr_in(ns: str) -> IPRoute:
    """Netlink inside an existing namespace. flags=0: pyroute2's default (O_CREAT) would
    silently create a missing namespace, turning a vanished one into a leak."""
    return IPRoute(netns=ns, flags=0)


def check_ifname(name: str) -> str:
    if not 0 < len(name) <= IFNAMSIZ:
        raise LabError(f"interface name {name!r} is not 1..{IFNAMSIZ} characters")
    return name


# --- running commands ---------------------------------------------------------------


def ns_argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    """argv that runs `argv` inside namespace `ns` (or on the host when ns is None)."""
    return ["ip", "netns", "exec", ns, *argv] if ns else list(argv)


def run(
    ns: str | None,
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command in a namespace with a hard timeout (every lab command is bounded)."""
    full = ns_argv(ns, argv)
    try:
        proc = subprocess.run(
            full,
            capture_output=True,
            timeout=timeout,
            check=False,
            input=input.decode() if input is not None else None,
            text=True,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout:g}s: {' '.join(full)}") from exc
    if check and proc.returncode != 0:
        raise LabError(
            f"exit {proc.returncode}: {' '.join(full)}: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def sysctl(ns: str, values: Mapping[str, str | int]) -> None:
    """Set sysctls inside a namespace (net.* sysctls are per namespace)."""
    args = [f"{k}={v}" for k, v in values.items()]
    run(ns, ["sysctl", "-q", "-w", *args])


def offloads_off(ns: str, ifname: str) -> None:
    """GRO/GSO/TSO off so the firewalls see (and the daemon queues) real MTU-sized packets."""
    run(ns, ["ethtool", "-K", ifname, "gro", "off", "gso", "off", "tso", "off"], check=False)


def list_namespaces() -> list[str]:
    names: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        names = [p.name for p in NETNS_DIR.iterdir()]
    return sorted(names)


def ns_pids(ns: str) -> list[int]:
    proc = run(None, ["ip", "netns", "pids", ns], check=False, timeout=5)
    return [int(x) for x in proc.stdout.split() if x.isdigit()]


def kill_ns_processes(ns: str, grace: float = 2.0) -> None:
    """SIGTERM then SIGKILL every process inside one of *our* namespaces (by pid)."""
    pids = ns_pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = [p for p in pids if _alive(p)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); treat it as gone
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _ours(name: str, prefix: str) -> bool:
    """`pfc12-fw1` is ours for prefix `pfc12` but `pfc123-fw1` is not; `pfc` matches all."""
    if prefix[-1:].isdigit():
        return name == prefix or name.startswith(prefix + "-")
    return name.startswith(prefix)


def leftovers(prefix: str) -> list[str]:
    """Namespaces, host links and host iptables rules whose name carries `prefix`.

    An empty list after a run is the proof that it cleaned up (the tests assert it).
    """
    found = [f"netns {n}" for n in list_namespaces() if _ours(n, prefix)]
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get("ifname") or ""
            if _ours(name, prefix):
                found.append(f"link {name}")
    if shutil.which(IPTABLES + "-save"):
        save = run(None, [IPTABLES + "-save"], check=False, timeout=5).stdout
        found += [
            f"iptables {line}"
            for line in save.splitlines()
            if any(_ours(word.strip('"'), prefix) for word in line.split())
        ]
    return found


# --- the Lab ------------------------------------------------------------------------


@dataclass
class Proc:
    """A process the lab started; stopped (and reaped) on teardown."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path | None = None


@dataclass
class Lab:
    """Records every namespace and process it creates and removes them in reverse.

    Use as a context manager; teardown runs on normal exit, on exceptions and on
    KeyboardInterrupt (a second Ctrl-C during teardown is deferred until it is done).
    """

    prefix: str = field(default_factory=default_prefix)
    namespaces: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    workdir: Path | None = None
    keep_logs: bool = False
    owner: int = field(default_factory=os.getpid)
    _closed: bool = False

    def __enter__(self) -> Lab:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except LabError as teardown:
            if exc is None:
                raise
            # keep the original error; the teardown trouble goes into its notes
            exc.add_note(str(teardown))

    # names
    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def path(self, name: str) -> Path:
        if self.workdir is None:
            raise LabError("Lab used outside its `with` block")
        return self.workdir / name

    # namespaces
    def add_ns(self, role: str) -> str:
        """Create namespace `<prefix>-<role>` with lo up and forwarding off."""
        name = self.ns(role)
        if name in list_namespaces():
            raise LabError(f"namespace {name} already exists")
        netns.create(name)
        self.namespaces.append(name)
        with ipr_in(name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return name

    # links
    def add_bridge(self, ns: str, ifname: str) -> None:
        """A plain learning bridge, STP off, so ports forward at once."""
        with ipr_in(ns) as ipr:
            ipr.link("add", ifname=check_ifname(ifname), kind="bridge", br_stp_state=0,
                     br_forward_delay=0)
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
        offloads_off(ns, ifname)

    def add_port(
        self, switch_ns: str, bridge: str, port: str, peer_ns: str, peer_ifname: str
    ) -> None:
        """A veth from `bridge` in the switch namespace to `peer_ifname` in `peer_ns`."""
        with ipr_in(switch_ns) as ipr:
            ipr.link(
                "add",
                ifname=check_ifname(port),
                kind="veth",
                peer={"ifname": check_ifname(peer_ifname), "net_ns_fd": peer_ns},
            )
            idx = ipr.link_lookup(ifname=port)[0]
            br = ipr.link_lookup(ifname=bridge)[0]
            ipr.link("set", index=idx, master=br, state="up")
        with ipr_in(peer_ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=peer_ifname)[0], state="up")
        offloads_off(switch_ns, port)
        offloads_off(peer_ns, peer_ifname)

    def add_addr(self, ns: str, ifname: str, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        kw: dict[str, object] = {}
        if iface.version == 6:
            kw["flags"] = 0x02  # IFA_F_NODAD: usable at once, no 1-2 s DAD wait
        with ipr_in(ns) as ipr:
            ipr.addr(
                "add",
                index=ipr.link_lookup(ifname=ifname)[0],
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                **kw,
            )

    def set_route(self, ns: str, dst: str, gateways: Sequence[str]) -> None:
        """Replace the route to `dst` with one gateway or an equal-cost multipath set."""
        with ipr_in(ns) as ipr:
            if len(gateways) == 1:
                ipr.route("replace", dst=dst, gateway=gateways[0])
            else:
                ipr.route("replace", dst=dst, multipath=[{"gateway": g} for g in gateways])

    def link_state(self, ns: str, ifname: str, up: bool) -> None:
        with ipr_in(ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up" if up else "down")

    def link_stats(self, ns: str) -> dict[str, dict[str, int]]:
        """Per-interface kernel counters (rx/tx packets and bytes) inside a namespace."""
        out: dict[str, dict[str, int]] = {}
        with ipr_in(ns) as ipr:
            for link in ipr.get_links():
                stats = link.get("stats64") or link.get("stats") or {}
                out[link.get("ifname")] = {k: int(v) for k, v in dict(stats).items()}
        return out

    # processes
    def spawn(self, name: str, ns: str | None, argv: Sequence[str], *, log: bool = True) -> Proc:
        """Start a background process in a namespace; its output goes to a log file."""
        logpath = self.path(f"{name}.log") if log else None
        out = open(logpath, "wb") if logpath else subprocess.DEVNULL  # noqa: SIM115
        try:
            popen = subprocess.Popen(
                ns_argv(ns, argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
            )
        finally:
            if logpath and not isinstance(out, int):
                out.close()
        proc = Proc(name, popen, logpath)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, grace: float = 3.0) -> int | None:
        """Signal one process we started (by pid) and reap it; SIGKILL after `grace`."""
        p = proc.popen
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(grace)
        return p.returncode

    def log_tail(self, proc: Proc, lines: int = 20) -> str:
        if not proc.log or not proc.log.exists():
            return ""
        return "\n".join(proc.log.read_text(errors="replace").splitlines()[-lines:])

    # teardown
    def close(self) -> None:
        """Stop processes, delete namespaces (newest first), remove the work directory."""
        if self._closed or os.getpid() != self.owner:
            # a forked child (pyroute2 forks to enter namespaces) unwinding on a signal
            # must not tear down the parent's lab
            return
        self._closed = True
        previous = signal.getsignal(signal.SIGINT)
        interrupted: list[int] = []
        with contextlib.suppress(ValueError):  # not in the main thread: no handler swap
            signal.signal(signal.SIGINT, lambda s, f: interrupted.append(s))
        try:
            errors: list[str] = []
            for proc in reversed(self.procs):
                try:
                    self.stop(proc, grace=2.0)
                except Exception as exc:  # keep tearing down
                    errors.append(f"{proc.name}: {exc}")
            for name in reversed(self.namespaces):
                if name not in list_namespaces():
                    # removed behind our back: nothing left to delete, but say so
                    errors.append(f"netns {name} vanished during the run")
                    continue
                try:
                    kill_ns_processes(name)
                    netns.remove(name)
                except Exception as exc:
                    errors.append(f"netns {name}: {exc}")
            self.namespaces.clear()
            if self.workdir and not self.keep_logs:
                shutil.rmtree(self.workdir, ignore_errors=True)
            if errors:
                raise LabError("teardown: " + "; ".join(errors))
        finally:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGINT, previous)
        if interrupted:
            raise KeyboardInterrupt


@contextlib.contextmanager
def lab(prefix: str | None = None) -> Iterator[Lab]:
    with Lab(prefix=prefix or default_prefix()) as the_lab:
        yield the_lab
