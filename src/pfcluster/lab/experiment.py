"""Lab experiments: one run, the five-way comparison, failover and the rate sweep.

A run builds a fresh topology, starts one firewall per firewall namespace through a
pluggable runner, measures real TCP through it with iperf3 and collects every counter,
then tears everything down (also on Ctrl-C or an error). Two runners exist:

- ``plain``: the firewalls are stateless Linux routers (ip_forward=1, no daemon). It is
  the baseline and lets the lab itself be tested before and without the daemon. With
  plain routers a split path works, because nothing keeps state.
- ``daemon``: ``pfcluster daemon`` in each firewall namespace, filtering through NFQUEUE
  and syncing over the sync LAN; counters come from ``pfcluster ctl info --json``.

Everything the daemon contract depends on is a constant in this file (flags, JSON keys),
so agreeing the final names with the daemon is a one-line change.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from pfcluster.lab import iperf
from pfcluster.lab.anchor import ANCHOR_KIND, ANCHOR_MODES, AnchorRunner
from pfcluster.lab.netns import IPTABLES, Lab, LabError, Proc, run
from pfcluster.lab.topology import (
    CLIENT_NET4,
    FW_CLIENT_IF,
    FW_SERVER_IF,
    FW_SYNC_IF,
    HOST_IF,
    PATHS,
    SERVER_NET4,
    FirewallNode,
    Topology,
)
from pfcluster.procfs import busy_share, cpu_seconds, host_cpu_times

# --- the daemon contract (issue 5) ------------------------------------------------------
DAEMON_MODULE = "pfcluster.cli.daemon"
DAEMON_RUNTIME = "pfcluster.io.loop"  # imported lazily by the command; must import too
SYNC_MODES = ("v5", "v4", "off")
SYNC_OFF_SYNCDEV = "none"  # `--syncdev none`: the daemon filters but does not sync
SYNC_PROTOCOL_FLAGS: dict[str, tuple[str, ...]] = {
    "v5": (),
    "v4": ("--protocol", "v4"),  # pfsync v4 behaviour (legacy.py), the thesis' baseline
    "off": (),
}
LAB_INSTALLS_QUEUE = False  # True if the daemon expects the lab to add the NFQUEUE rules
QUEUE_NUM = 0
READY_TIMEOUT = 20.0  # bounded wait for sync_ok
# `ctl info --json` keys: our name -> accepted names, tried in order. A dotted name is a
# full path in the answer (`dataplane.packets`); a bare one matches the last component at
# any depth. Case, `-` and `_` are ignored.
COUNTER_KEYS: dict[str, tuple[str, ...]] = {
    "packets": ("dataplane.packets", "pf.counters.match", "packets", "pkts"),
    "blocked": ("dataplane.blocked", "blocked", "drops"),
    "state-mismatch": ("pf.state-mismatch", "pf.counters.state-mismatch", "state-mismatch"),
    "sync-frames-in": ("pfsync.ipackets", "sync-frames-in", "ipackets"),
    "sync-frames-out": ("pfsync.opackets", "sync-frames-out", "opackets"),
    "sync-bytes-in": ("pfsync.ibytes", "sync-bytes-in", "ibytes"),
    "sync-bytes-out": ("pfsync.obytes", "sync-bytes-out", "obytes"),
    "deferrals": ("dataplane.deferred", "pfsync.deferred", "deferrals", "deferred"),
}
SYNC_OK_KEY = "sync_ok"

# The lab ruleset: clients may open TCP and ping towards the servers; nothing else passes.
# `block all` matters: without it a split path's return traffic would pass statelessly
# and the comparison would measure nothing.
LAB_RULES = f"""\
# pfcluster lab ruleset (generated)
pass quick on lo
pass quick on {FW_SYNC_IF}
block all
pass in on {FW_CLIENT_IF} proto tcp from {CLIENT_NET4}.0/24 to {SERVER_NET4}.0/24 flags S/SA keep state
pass out on {FW_SERVER_IF} proto tcp from {CLIENT_NET4}.0/24 to {SERVER_NET4}.0/24 flags S/SA keep state
pass in on {FW_CLIENT_IF} proto icmp from {CLIENT_NET4}.0/24 to {SERVER_NET4}.0/24 keep state
pass out on {FW_SERVER_IF} proto icmp from {CLIENT_NET4}.0/24 to {SERVER_NET4}.0/24 keep state
"""

# `--nat`: the firewalls translate the clients to one address that is not on the server
# LAN; the servers route it back through the firewalls (it lies in the client network,
# which the servers reach via the firewalls), and nobody holds it, so only a firewall's
# translation can deliver a reply. Each firewall owns its slice of the port range
# (--nat-slice K/N), so the two never hand out the same port.
NAT_ADDR4 = f"{CLIENT_NET4}.99"


def lab_rules(nat: bool) -> str:
    """LAB_RULES, or with `nat` the same rules translating on the server side."""
    if not nat:
        return LAB_RULES
    out = []
    for line in LAB_RULES.splitlines():
        if line.startswith(f"pass out on {FW_SERVER_IF} "):
            line += f" nat-to {NAT_ADDR4}"
        out.append(line)
    return "\n".join(out) + "\n"


ProgressFn = Callable[[str, float], None]  # (what is happening, fraction of this run)


def daemon_available() -> bool:
    """The daemon command imports with everything it needs (not a half-written tree)."""
    if importlib.util.find_spec(DAEMON_MODULE) is None:
        return False
    try:
        importlib.import_module(DAEMON_MODULE)
        importlib.import_module(DAEMON_RUNTIME)
    except Exception:
        return False
    return True


def resolve_mode(mode: str) -> str:
    """`auto` picks the daemon when it is installed, else plain routers."""
    if mode == "auto":
        return "daemon" if daemon_available() else "plain"
    if mode not in ("plain", "daemon"):
        raise ValueError("firewall mode must be auto, plain or daemon")
    if mode == "daemon" and not daemon_available():
        raise LabError(f"--firewall daemon: {DAEMON_MODULE} is not installed yet")
    return mode


@dataclass
class RunConfig:
    name: str = ""
    paths: str = "split"
    sync: str = "v5"
    firewalls: int = 2
    seconds: float = 5.0
    streams: int = 4
    firewall: str = "auto"  # plain | daemon | auto
    failover: bool = False
    rate_pps: int | None = None  # sweep: offered packets per second (all streams)
    mss: int | None = None
    defer: bool = False
    rules: str | None = None  # a pf.conf file instead of LAB_RULES
    dialect: str | None = None
    syncpeer: bool = False  # unicast to the peer instead of multicast (2 firewalls)
    integrity_bytes: int = 0  # also move this many checked bytes after iperf3
    keep_logs: bool = False
    merge: str | None = None  # daemon --merge edges|thesis (None: the daemon's default)
    workers: int = 1  # daemon --workers N (flows spread by client/server address pair)
    nat: bool = False  # the firewalls translate the clients to NAT_ADDR4 (nat-to)
    sync_key: str | None = None  # daemon --sync-key FILE (authenticated sync)
    anchor: str | None = None  # conntrack + conntrackd instead of pfcluster: cache | direct
    tcp_liberal: bool = False  # anchor: nf_conntrack_tcp_be_liberal=1 (window tracking off)
    reuse_port: int = 0  # after iperf3: N connections from one fixed source port (seed 000)

    def label(self) -> str:
        if self.name:
            return self.name
        if self.anchor:
            return f"anchor-{self.paths} {self.anchor}" + (" failover" if self.failover else "")
        n = "single" if self.firewalls == 1 else f"{self.paths}"
        return (f"{n} sync={self.sync}" + (" nat" if self.nat else "")
                + (" failover" if self.failover else ""))

    def check(self) -> None:
        if self.paths not in PATHS:
            raise ValueError(f"paths must be one of {PATHS}")
        if self.sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}")
        if not 1 <= self.seconds <= 600 or self.seconds != int(self.seconds):
            raise ValueError("seconds must be a whole number 1..600 (iperf3 -t)")
        if self.paths != "symmetric" and self.firewalls < 2:
            raise ValueError(f"{self.paths} paths need at least 2 firewalls")
        if self.failover and self.firewalls < 2:
            raise ValueError("failover needs at least 2 firewalls")
        if self.nat and (self.rules or self.firewall == "plain" or self.anchor):
            raise ValueError("--nat uses the lab's own rules on pfcluster daemons "
                             "(not with --rules or plain routers)")
        if self.anchor is not None and self.anchor not in ANCHOR_MODES:
            raise ValueError(f"anchor must be one of {ANCHOR_MODES}")
        if not 0 <= self.reuse_port <= 1000:
            raise ValueError("reuse_port must be 0..1000")


# --- firewall runners ---------------------------------------------------------------


class FirewallRunner(Protocol):
    kind: str

    def start(self, lab: Lab, topo: Topology, cfg: RunConfig) -> None: ...
    def wait_ready(self, timeout: float) -> None: ...
    def info(self, fw: FirewallNode) -> dict[str, Any]: ...
    def crash(self, fw: FirewallNode) -> None: ...


def _leg_stats(lab: Lab, fw: FirewallNode) -> dict[str, dict[str, int]]:
    keep = ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_dropped", "tx_dropped")
    stats = lab.link_stats(fw.ns)
    return {
        ifname: {k: stats.get(ifname, {}).get(k, 0) for k in keep}
        for ifname in (FW_CLIENT_IF, FW_SERVER_IF, FW_SYNC_IF)
    }


def _down(lab: Lab, fw: FirewallNode) -> None:
    """A crashed box forwards nothing: take its data legs down."""
    for ifname in (FW_CLIENT_IF, FW_SERVER_IF):
        lab.link_state(fw.ns, ifname, up=False)


class PlainRunner:
    """Firewalls as stateless Linux routers: the baseline, and the lab's own test mode."""

    kind = "plain"

    def __init__(self) -> None:
        self.lab: Lab | None = None

    def start(self, lab: Lab, topo: Topology, cfg: RunConfig) -> None:
        self.lab = lab  # forwarding is already on (topology)

    def wait_ready(self, timeout: float) -> None:
        return None

    def info(self, fw: FirewallNode) -> dict[str, Any]:
        assert self.lab is not None
        legs = _leg_stats(self.lab, fw)
        return {
            "packets": legs[FW_CLIENT_IF]["rx_packets"] + legs[FW_SERVER_IF]["rx_packets"],
            "blocked": 0,
            "state-mismatch": 0,  # a stateless router has no state to mismatch
            SYNC_OK_KEY: True,
        }

    def crash(self, fw: FirewallNode) -> None:
        assert self.lab is not None
        _down(self.lab, fw)


class DaemonRunner:
    """`pfcluster daemon` per firewall namespace, queried with `pfcluster ctl`."""

    kind = "daemon"

    def __init__(self) -> None:
        self.lab: Lab | None = None
        self.cfg: RunConfig | None = None
        self.procs: dict[int, Proc] = {}
        self.controls: dict[int, Path] = {}
        self.fws: list[FirewallNode] = []

    def argv(self, fw: FirewallNode, topo: Topology, cfg: RunConfig, rules: Path) -> list[str]:
        syncdev = SYNC_OFF_SYNCDEV if cfg.sync == "off" else FW_SYNC_IF
        argv = [
            sys.executable, "-m", "pfcluster.cli.main", "daemon",
            "--rules", str(rules), "--syncdev", syncdev,
            "--control", str(self.controls[fw.index]),
            *SYNC_PROTOCOL_FLAGS[cfg.sync],
        ]
        if cfg.sync != "off" and cfg.syncpeer and len(topo.fws) == 2:
            argv += ["--syncpeer", topo.fws[2 - fw.index].sync_ip4]
        if cfg.defer and cfg.sync != "off":
            argv.append("--defer")
        if cfg.dialect:
            argv += ["--dialect", cfg.dialect]
        if cfg.merge and cfg.sync != "off":
            argv += ["--merge", cfg.merge]
        if cfg.workers > 1:
            argv += ["--workers", str(cfg.workers)]
        if cfg.nat:
            argv += ["--nat-slice", f"{fw.index}/{len(topo.fws)}"]
        if cfg.sync_key and cfg.sync != "off":
            argv += ["--sync-key", str(Path(cfg.sync_key).resolve())]
        return argv

    def start(self, lab: Lab, topo: Topology, cfg: RunConfig) -> None:
        self.lab, self.cfg, self.fws = lab, cfg, list(topo.fws)
        rules = lab.path("pf.conf")
        rules.write_text(Path(cfg.rules).read_text() if cfg.rules else lab_rules(cfg.nat))
        for fw in topo.fws:
            if LAB_INSTALLS_QUEUE:
                run(fw.ns, [IPTABLES, "-w", "-A", "FORWARD", "-j", "NFQUEUE",
                            "--queue-num", str(QUEUE_NUM)])
            self.controls[fw.index] = lab.path(f"fw{fw.index}.ctl")
            self.procs[fw.index] = lab.spawn(
                f"daemon-fw{fw.index}", fw.ns, self.argv(fw, topo, cfg, rules)
            )

    def ctl_info(self, fw: FirewallNode, timeout: float = 5.0) -> dict[str, Any]:
        out = run(
            None,
            [sys.executable, "-m", "pfcluster.cli.main", "ctl",
             "--control", str(self.controls[fw.index]), "info", "--json"],
            timeout=timeout,
        )
        doc = json.loads(out.stdout)
        if not isinstance(doc, dict):
            raise LabError(f"ctl info on fw{fw.index}: not a JSON object")
        return doc

    def wait_ready(self, timeout: float) -> None:
        """Every daemon answers ctl and (when syncing) reports sync_ok, within `timeout`."""
        assert self.lab is not None and self.cfg is not None
        deadline = time.monotonic() + timeout
        pending = {fw.index: fw for fw in self.fws}
        last: dict[int, str] = {}
        while pending and time.monotonic() < deadline:
            for idx, fw in list(pending.items()):
                proc = self.procs[idx]
                if proc.popen.poll() is not None:
                    raise LabError(
                        f"daemon on fw{idx} exited with {proc.popen.returncode}:\n"
                        + self.lab.log_tail(proc)
                    )
                if not self.controls[idx].exists():
                    continue
                try:
                    info = self.ctl_info(fw, timeout=3.0)
                except (LabError, ValueError) as exc:
                    last[idx] = str(exc)
                    continue
                if self.cfg.sync == "off" or len(self.fws) == 1 or info.get(SYNC_OK_KEY):
                    del pending[idx]
            time.sleep(0.2)
        if pending:
            names = ", ".join(f"fw{i}" for i in pending)
            detail = "; ".join(f"fw{i}: {m}" for i, m in last.items() if i in pending)
            raise LabError(f"no {SYNC_OK_KEY} from {names} after {timeout:g}s {detail}")

    def info(self, fw: FirewallNode) -> dict[str, Any]:
        if self.procs[fw.index].popen.poll() is not None:
            return {"dead": True}
        return self.ctl_info(fw)

    def crash(self, fw: FirewallNode) -> None:
        assert self.lab is not None
        self.lab.stop(self.procs[fw.index], sig=9, grace=2.0)  # SIGKILL: no goodbye
        _down(self.lab, fw)


def make_runner(kind: str, cfg: RunConfig | None = None) -> FirewallRunner:
    if kind == ANCHOR_KIND:
        assert cfg is not None and cfg.anchor is not None
        return AnchorRunner(cfg.anchor, cfg.tcp_liberal)
    return DaemonRunner() if kind == "daemon" else PlainRunner()


# --- counters -----------------------------------------------------------------------


def _flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = doc
    return out


def _norm(key: str) -> str:
    return key.lower().replace("-", "_")


def pick_counters(info: dict[str, Any]) -> dict[str, int | None]:
    """Our counter names from a daemon's `ctl info --json`, whatever its nesting."""
    flat = {_norm(k): v for k, v in _flatten(info).items()}
    by_leaf: dict[str, Any] = {}
    # shallow keys first, so a top-level `packets` beats a nested one
    for key in sorted(flat, key=lambda k: k.count(".")):
        by_leaf.setdefault(key.rsplit(".", 1)[-1], flat[key])
    out: dict[str, int | None] = {}
    for name, accepted in COUNTER_KEYS.items():
        value = None
        for cand in map(_norm, accepted):
            v = flat.get(cand) if "." in cand else by_leaf.get(cand)
            if isinstance(v, int | float) and not isinstance(v, bool):
                value = int(v)
                break
        out[name] = value
    return out


def fw_cpu(runner: Any, fw: FirewallNode, info: dict[str, Any] | None = None) -> list[float]:
    """CPU seconds so far of each daemon process of `fw` (its workers with --workers);
    empty for plain routers or a firewall that is gone."""
    if runner.kind != "daemon":
        return []
    try:
        info = info or runner.info(fw)
    except (LabError, ValueError):
        return []
    if info.get("dead"):
        return []
    workers = info.get("workers")
    if isinstance(workers, list):
        return [float(w.get("cpu_seconds", 0.0)) for w in workers]
    pid = info.get("pid")
    return [cpu_seconds(pid)] if isinstance(pid, int) else []


def _delta(after: dict[str, int | None], before: dict[str, int | None]) -> dict[str, int | None]:
    return {
        k: (None if after.get(k) is None else after[k] - (before.get(k) or 0))  # type: ignore[operator]
        for k in after
    }


def _rst_rules(lab: Lab, ns: str) -> None:
    """Counting-only iptables rules (no target) for TCP resets, in our end-host namespace."""
    for chain in ("INPUT", "OUTPUT"):
        run(ns, [IPTABLES, "-w", "-A", chain, "-p", "tcp", "--tcp-flags", "RST", "RST"])


def _peer_addresses(ns: str) -> list[str]:
    """The remote addresses of the established TCP connections in `ns` (ss -tn)."""
    try:
        out = run(ns, ["ss", "-Htn", "state", "established"], timeout=5.0).stdout
    except LabError:
        return []
    peers = set()
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 4:
            peers.add(cols[-1].rsplit(":", 1)[0].strip("[]"))
    return sorted(peers)


def _rst_count(ns: str) -> int:
    out = run(ns, [IPTABLES, "-w", "-L", "-n", "-v", "-x"], check=False).stdout
    total = 0
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0].isdigit() and "flags:0x04/0x04" in line:
            total += int(parts[0])
    return total


# --- one run ------------------------------------------------------------------------


def integrity_transfer(
    lab: Lab, topo: Topology, nbytes: int, conns: int = 4, timeout: float = 15.0, seed: int = 7,
    sources: list[str] | None = None,
) -> dict[str, Any]:
    """Move `nbytes` of a known stream client->server and compare SHA-256 digests
    (connection i from sources[i % len], when given)."""
    from pfcluster.lab.transfer import expected_digest, split_bytes

    c, s = topo.client_hosts[0], topo.server_hosts[0]
    if sources:
        conns = max(conns, len(sources))
    port = 5301
    recv = lab.spawn("xfer-recv", s.ns, [
        sys.executable, "-m", "pfcluster.lab.transfer", "recv", "--bind", s.ip4,
        "--port", str(port), "--conns", str(conns), "--timeout", f"{timeout:g}",
    ])
    iperf.wait_listening(s.ns, port, recv)
    start = time.monotonic()
    sent = run(c.ns, [
        sys.executable, "-m", "pfcluster.lab.transfer", "send", "--to", s.ip4,
        "--port", str(port), "--conns", str(conns), "--bytes", str(nbytes),
        "--seed", str(seed), "--timeout", f"{timeout:g}",
        *(["--sources", ",".join(sources)] if sources else []),
    ], timeout=timeout + 5, check=False)
    elapsed = time.monotonic() - start
    try:
        recv.popen.wait(timeout + 5)
    except Exception:
        lab.stop(recv)
    assert recv.log is not None
    lines = [ln for ln in recv.log.read_text(errors="replace").splitlines() if ln.startswith("{")]
    got = json.loads(lines[-1]) if lines else {"conns": []}
    if got.get("listening") is not None:
        got = {"conns": []}
    want = [
        {"conn": i, "bytes": n, "sha256": expected_digest(seed, i, n)}
        for i, n in enumerate(split_bytes(nbytes, conns))
    ]
    received = {int(r["conn"]): r for r in got.get("conns", [])}
    intact = all(
        i in received
        and received[i]["bytes"] == w["bytes"]
        and received[i]["sha256"] == w["sha256"]
        and received[i]["error"] is None
        for i, w in enumerate(want)
    )
    return {
        "bytes": nbytes,
        "conns": conns,
        "intact": intact,
        "seconds": round(elapsed, 3),
        "bytes_received": sum(int(r["bytes"]) for r in received.values()),
        "sender_exit": sent.returncode,
        "sender_errors": [r.get("error") for r in _json_conns(sent.stdout) if r.get("error")],
        "receiver_errors": [r["error"] for r in received.values() if r.get("error")],
    }


# --workers: the integrity transfer's connections come from this many client addresses,
# so the kernel's per-address-pair hash spreads them over the workers
SOURCES_PER_WORKER = 4


def extra_sources(lab: Lab, topo: Topology, workers: int) -> list[str] | None:
    """With --workers N, give the client N*4 more addresses (198.51.100.200...) and
    return them; None with one worker (one address is the plain lab)."""
    if workers <= 1:
        return None
    c = topo.client_hosts[0]
    addrs = [f"{CLIENT_NET4}.{200 + i}" for i in range(min(workers * SOURCES_PER_WORKER, 50))]
    for a in addrs:
        lab.add_addr(c.ns, HOST_IF, f"{a}/24")
    return addrs


REUSE_TIMEOUT = 5.0  # seconds a reuse-phase connection may take before it counts as failed


def port_reuse(lab: Lab, topo: Topology, count: int, runner: FirewallRunner) -> dict[str, Any]:
    """Seed 000's pattern: `count` sequential connections from one fixed client port
    (each while the firewall still holds the previous one's closed state), against as
    many from fresh ports; connclient's `reuse` phase, as `lab connrate --reuse-port`.
    The firewalls' state-mismatch and blocked counts during the phase are added."""
    from pfcluster.lab.connrate import REUSE_PORT_BASE, SERVER_PORT, ConnRateConfig, measure_path

    c, s = topo.client_hosts[0], topo.server_hosts[0]
    cfg = ConnRateConfig(conns=0, reuse_port=count, timeout=REUSE_TIMEOUT)
    srv = lab.spawn("reuse-server", s.ns, [
        sys.executable, "-m", "pfcluster.lab.connclient", "serve", "--bind", s.ip4,
        "--port", str(SERVER_PORT), "--seconds", f"{cfg.path_budget():g}",
    ])
    try:
        iperf.wait_listening(s.ns, SERVER_PORT, srv)
        before = [pick_counters(runner.info(fw)) for fw in topo.fws]
        row = measure_path(lab, cfg, c, s, REUSE_PORT_BASE, set())["reuse"]
        after = [pick_counters(runner.info(fw)) for fw in topo.fws]
    except (LabError, ValueError) as exc:
        return {"n": count, "error": str(exc)}
    finally:
        lab.stop(srv, grace=2.0)
    out = {k: v for k, v in row.items() if k not in ("fresh_conns", "reuse_conns")}
    for key in ("state-mismatch", "blocked"):
        deltas = [_delta(a, b)[key] for a, b in zip(after, before)]
        known = [d for d in deltas if d is not None]
        out[f"fw_{key.replace('-', '_')}"] = sum(known) if known else None
    return out


def _json_conns(text: str) -> list[dict[str, Any]]:
    try:
        return list(json.loads(text.strip().splitlines()[-1]).get("conns", []))
    except (ValueError, IndexError, AttributeError):
        return []


def run_one(cfg: RunConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Build, start firewalls, measure, collect, tear down. Returns the figures."""
    cfg.check()
    kind = ANCHOR_KIND if cfg.anchor else resolve_mode(cfg.firewall)
    note = progress or (lambda what, frac: None)
    result: dict[str, Any] = {
        "name": cfg.label(), "config": asdict(cfg), "firewall": kind,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "errors": [],
    }
    with Lab(keep_logs=cfg.keep_logs) as lab:
        result["prefix"] = lab.prefix
        if cfg.keep_logs:
            result["logs"] = str(lab.workdir)
        note("building namespaces", 0.0)
        topo = Topology(lab, firewalls=cfg.firewalls).build()
        topo.set_paths(cfg.paths)
        c, s = topo.client_hosts[0], topo.server_hosts[0]
        for host in (c, s):
            _rst_rules(lab, host.ns)
        runner = make_runner(kind, cfg)
        note(f"starting {kind} firewalls", 0.02)
        runner.start(lab, topo, cfg)
        note("waiting for sync", 0.04)
        runner.wait_ready(READY_TIMEOUT)
        srv = iperf.start_server(lab, s.ns, s.ip4)

        before_info = {fw.index: pick_counters(runner.info(fw)) for fw in topo.fws}
        before_cpu = {fw.index: fw_cpu(runner, fw) for fw in topo.fws}
        host_before = host_cpu_times()
        before_legs = {fw.index: _leg_stats(lab, fw) for fw in topo.fws}
        before_host = lab.link_stats(s.ns)[HOST_IF]

        bitrate = None
        if cfg.rate_pps:
            bitrate = f"{max(1, cfg.rate_pps * payload(cfg.mss or 1000) * 8 // cfg.streams)}"
        argv = iperf.client_argv(
            s.ip4, seconds=cfg.seconds, streams=cfg.streams, bitrate=bitrate,
            mss=cfg.mss or (1000 if cfg.rate_pps else None),
        )
        failed_over: dict[str, Any] = {}
        last_words: dict[int, dict[str, Any]] = {}
        # iperf3 itself may reset its sockets when a test ends, so resets are counted
        # up to shortly before the end ("during") as well as in total
        rst_start = {"client": _rst_count(c.ns), "server": _rst_count(s.ns)}
        rst_during: dict[str, int] = {}
        snap_at = max(cfg.seconds - 1.0, cfg.seconds * 0.75)

        server_peers: list[str] = []

        def snapshot() -> None:
            rst_during.update(client=_rst_count(c.ns) - rst_start["client"],
                              server=_rst_count(s.ns) - rst_start["server"])
            if cfg.nat:  # whom the server believes it talks to
                server_peers.extend(_peer_addresses(s.ns))

        # On its own timer: a slow tick (the failover, a ctl query to a busy daemon) can
        # last over a second, and the window before iperf3's own teardown RSTs is short.
        snap_timer = threading.Timer(snap_at, snapshot)
        snap_timer.daemon = True

        def tick(elapsed: float) -> None:
            note(f"iperf3 {elapsed:4.1f}/{cfg.seconds:g}s", 0.05 + 0.85 * min(1.0, elapsed / cfg.seconds))
            if cfg.failover and not failed_over and elapsed >= cfg.seconds / 2:
                try:  # fw1's counters up to its death (it cannot answer afterwards)
                    last_words[1] = runner.info(topo.fw(1))
                except (LabError, ValueError):
                    pass
                # proof that the transfer really crossed fw1 before it died
                legs = _leg_stats(lab, topo.fw(1))
                failed_over["fw1_packets_before"] = (
                    legs[FW_CLIENT_IF]["rx_packets"] - before_legs[1][FW_CLIENT_IF]["rx_packets"]
                    + legs[FW_SERVER_IF]["rx_packets"] - before_legs[1][FW_SERVER_IF]["rx_packets"]
                )
                t0 = time.monotonic()
                runner.crash(topo.fw(1))
                topo.fail_over(1)
                failed_over.update(at_s=round(elapsed, 2), took_s=round(time.monotonic() - t0, 3))
                take_over = getattr(runner, "take_over", None)
                if take_over is not None:  # the anchor: keepalived's notify script, after the VIP moved
                    failed_over["takeover"] = take_over(topo.fw(2))

        snap_timer.start()
        try:
            res = iperf.run_client(c.ns, argv, cfg.seconds, tick=tick)
        finally:
            snap_timer.cancel()
        host_busy = busy_share(host_before, host_cpu_times())
        lab.stop(srv, grace=2.0)
        note("collecting counters", 0.92)
        after_host = lab.link_stats(s.ns)[HOST_IF]
        fws_out: list[dict[str, Any]] = []
        for fw in topo.fws:
            raw: dict[str, Any] = {}
            try:
                raw = last_words.get(fw.index) or runner.info(fw)
            except (LabError, ValueError) as exc:
                result["errors"].append(f"fw{fw.index} info: {exc}")
            legs_after = _leg_stats(lab, fw)
            legs = {
                ifn: {k: legs_after[ifn][k] - before_legs[fw.index][ifn][k] for k in v}
                for ifn, v in legs_after.items()
            }
            counters = _delta(pick_counters(raw), before_info[fw.index]) if raw else {}
            cpu = [round(max(0.0, b - a) / max(res.seconds or cfg.seconds, 1e-9), 3)
                   for a, b in zip(before_cpu[fw.index], fw_cpu(runner, fw, raw))]
            # the sync link's kernel counters are the ground truth for sync volume
            counters.setdefault("sync-frames-out", None)
            fws_out.append({
                "name": f"fw{fw.index}", "counters": counters, "links": legs,
                "cpu_share": cpu,
                "sync_link": {
                    "frames_out": legs[FW_SYNC_IF]["tx_packets"],
                    "frames_in": legs[FW_SYNC_IF]["rx_packets"],
                    "bytes_out": legs[FW_SYNC_IF]["tx_bytes"],
                    "bytes_in": legs[FW_SYNC_IF]["rx_bytes"],
                },
                "info": raw,
            })
        resets = {
            "during": rst_during or None,
            "total": {"client": _rst_count(c.ns) - rst_start["client"],
                      "server": _rst_count(s.ns) - rst_start["server"]},
        }
        integrity = None
        if cfg.integrity_bytes:
            note("integrity transfer", 0.95)
            integrity = integrity_transfer(lab, topo, cfg.integrity_bytes,
                                           sources=extra_sources(lab, topo, cfg.workers))
        reuse = None
        if cfg.reuse_port:
            note("port reuse", 0.96)
            reuse = port_reuse(lab, topo, cfg.reuse_port, runner)
        if kind in ("daemon", ANCHOR_KIND):
            for idx, proc in runner.procs.items():  # type: ignore[attr-defined]
                if proc.popen.poll() is not None and not (cfg.failover and idx == 1):
                    result["errors"].append(
                        f"{'daemon' if kind == 'daemon' else 'conntrackd'} fw{idx} died "
                        f"({proc.popen.returncode}): {lab.log_tail(proc, 5)}"
                    )
        note("tearing down", 0.98)

    sync_bytes = sum(f["sync_link"]["bytes_out"] for f in fws_out)
    mismatch = [f["counters"].get("state-mismatch") for f in fws_out]
    known = [m for m in mismatch if m is not None]
    data_packets = after_host["rx_packets"] - before_host["rx_packets"]
    result.update(
        iperf=res.to_dict(),
        ok=res.ok and not result["errors"],
        goodput_bps=res.goodput_bps,
        retransmits=res.retransmits,
        stalled_streams=res.stalled_streams,
        longest_stall_s=res.longest_stall_s,
        data_bytes=res.bytes_received,
        server_rx_pps=round(data_packets / max(res.seconds or cfg.seconds, 1e-9), 1),
        state_mismatch=sum(known) if known else None,
        # the busiest daemon process (a worker, with --workers): ~1.0 means CPU-bound
        max_cpu_share=max((x for f in fws_out for x in f["cpu_share"]), default=None),
        host_cpu_busy=host_busy,  # the whole machine (every core), generators included
        sync_bytes=sync_bytes,
        sync_bytes_per_data_byte=(sync_bytes / res.bytes_received) if res.bytes_received else None,
        firewalls=fws_out,
        resets=resets,
    )
    if cfg.failover:
        result["failover"] = {
            **failed_over,
            "survived": bool(res.ok and failed_over and res.error is None
                             and failed_over.get("fw1_packets_before", 0) > 1000
                             and resets["during"] == {"client": 0, "server": 0}),
            "no_reset": resets["during"] == {"client": 0, "server": 0}
            and "reset" not in str(res.error or "").lower(),
        }
    if cfg.nat:
        # the server must have seen the translated address only: a client address there
        # would mean a packet left untranslated
        result["nat"] = {"address": NAT_ADDR4, "server_saw": server_peers,
                         "translated": bool(server_peers) and set(server_peers) == {NAT_ADDR4}}
    if integrity is not None:
        result["integrity"] = integrity
    if reuse is not None:
        result["port_reuse"] = reuse
    if cfg.rate_pps:
        result["rate_pps"] = cfg.rate_pps
    note("done", 1.0)
    return result


# --- compare and sweep --------------------------------------------------------------


def compare_configs(base: RunConfig, anchors: bool = False) -> list[RunConfig]:
    """The main job: single firewall, symmetric pair, split v5, split v5 with the thesis'
    all-or-nothing TCP merge (the merge rule's effect alone), split v4, ECMP v5, split v5
    with NAT (daemons with the lab's own rules only; one process each); with `anchors`,
    a pfcluster failover row and the Linux anchor's rows after them."""
    nat = [] if base.firewall == "plain" or base.rules or base.workers > 1 else [
        replace(base, name="split-v5-nat", paths="split", sync="v5", nat=True)]
    rows = [
        replace(base, name="single", firewalls=1, paths="symmetric", sync="off"),
        replace(base, name="symmetric", paths="symmetric", sync="v5"),
        replace(base, name="split-v5", paths="split", sync="v5"),
        replace(base, name="split-v5-thesis-merge", paths="split", sync="v5", merge="thesis"),
        replace(base, name="split-v4", paths="split", sync="v4"),
        replace(base, name="ecmp-v5", paths="ecmp", sync="v5"),
        *nat,
    ]
    if not anchors:
        return rows
    # side by side with the anchor, pfcluster's symmetric and split rows also do the
    # port-reuse phase
    rows = [replace(r, reuse_port=REUSE_CONNS) if r.name in ("symmetric", "split-v5") else r
            for r in rows]
    return rows + anchor_configs(base)


REUSE_CONNS = 20  # connections per port-reuse phase in compare --anchors


def anchor_configs(base: RunConfig) -> list[RunConfig]:
    """pfcluster's symmetric failover, then kernel conntrack + conntrackd FTFW: the
    documented active-backup set-up (external cache) on symmetric paths and through a
    failover, and the external cache disabled (states injected into the kernel) on split
    paths, with TCP window tracking at its default and then off (be_liberal=1)."""
    return [
        replace(base, name="failover-v5", paths="symmetric", sync="v5", failover=True),
        replace(base, name="anchor-symmetric", paths="symmetric", anchor="cache",
                reuse_port=REUSE_CONNS),
        replace(base, name="anchor-split", paths="split", anchor="direct",
                reuse_port=REUSE_CONNS),
        replace(base, name="anchor-split-liberal", paths="split", anchor="direct",
                tcp_liberal=True, reuse_port=REUSE_CONNS),
        replace(base, name="anchor-failover", paths="symmetric", anchor="cache", failover=True),
    ]


def _resets_during(r: dict[str, Any]) -> int | None:
    during = (r.get("resets") or {}).get("during")
    return None if not during else int(during["client"]) + int(during["server"])


def _reuse_summary(r: dict[str, Any]) -> str | None:
    """`ok/n` of the fixed-port connections, with how many were slow (> 500 ms)."""
    ru = r.get("port_reuse")
    if not ru:
        return None
    if ru.get("error"):
        return "error"
    mismatch = ru.get("fw_state_mismatch")
    return (f"{ru['reuse_ok']}/{ru['n']}, {ru['reuse_slow']} slow"
            + ("" if mismatch is None else f", {mismatch} mism."))


def _sync_name(cfg: dict[str, Any]) -> str:
    if cfg.get("anchor"):
        return f"conntrackd-ftfw-{cfg['anchor']}" + ("-liberal" if cfg.get("tcp_liberal") else "")
    return str(cfg["sync"])


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per run, with goodput ratios to the single firewall and symmetric pair
    (an anchor row: to the anchor's own symmetric pair, and no single-firewall ratio)."""
    by = {r["name"]: r for r in runs}
    single = by.get("single", {}).get("goodput_bps") or None
    sym = by.get("symmetric", {}).get("goodput_bps") or None
    anchor_sym = by.get("anchor-symmetric", {}).get("goodput_bps") or None
    rows = []
    for r in runs:
        g = r.get("goodput_bps") or 0.0
        is_anchor = bool(r["config"].get("anchor"))
        base_single, base_sym = (None, anchor_sym) if is_anchor else (single, sym)
        rows.append({
            "name": r["name"],
            "paths": r["config"]["paths"],
            "sync": _sync_name(r["config"]),
            "firewalls": r["config"]["firewalls"],
            "goodput_mbps": round(g / 1e6, 1),
            "ratio_single": round(g / base_single, 3) if base_single else None,
            "ratio_symmetric": round(g / base_sym, 3) if base_sym else None,
            "retransmits": r.get("retransmits"),
            "resets": _resets_during(r),
            "port_reuse": _reuse_summary(r),
            "survived_failover": (r.get("failover") or {}).get("survived"),
            "nat_seen": (r.get("nat") or {}).get("translated"),
            "error": (r.get("iperf") or {}).get("error"),
            "state_mismatch": r.get("state_mismatch"),
            "sync_bytes_per_data_byte": r.get("sync_bytes_per_data_byte"),
            "stalled_streams": r.get("stalled_streams"),
            "ok": r.get("ok"),
        })
    return rows


def acceptance(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's acceptance checks, evaluated on one compare run."""
    by = {r["name"]: r for r in runs}
    sym = (by.get("symmetric") or {}).get("goodput_bps") or 0.0
    out: dict[str, Any] = {}
    v5 = by.get("split-v5")
    if v5 and sym:
        out["split_v5_ge_0.9_symmetric"] = bool(
            v5["goodput_bps"] >= 0.9 * sym and not v5["stalled_streams"] and v5["iperf"]["ok"]
        )
    v4 = by.get("split-v4")
    if v4 and sym:
        out["split_v4_le_0.2_symmetric"] = bool(v4["goodput_bps"] <= 0.2 * sym)
    return out


def run_compare(
    base: RunConfig,
    progress: Callable[[int, int, str, str, float], None] | None = None,
    configs: list[RunConfig] | None = None,
) -> dict[str, Any]:
    """Run every configuration in turn; progress(i, n, name, what, fraction)."""
    configs = configs or compare_configs(base)
    runs = []
    for i, cfg in enumerate(configs):
        def note(what: str, frac: float, i: int = i, name: str = cfg.label()) -> None:
            if progress:
                progress(i, len(configs), name, what, frac)
        try:
            runs.append(run_one(cfg, note))
        except LabError as exc:
            runs.append({"name": cfg.label(), "config": asdict(cfg), "ok": False,
                         "errors": [str(exc)], "goodput_bps": 0.0, "stalled_streams": None,
                         "iperf": {"ok": False}})
    kind = resolve_mode(base.firewall)
    return {
        "kind": "compare",
        "firewall": kind,
        "seconds": base.seconds,
        "streams": base.streams,
        "runs": runs,
        "summary": summarize(runs),
        # stateless plain routers pass split paths whatever the "sync": no verdict there
        "acceptance": acceptance(runs) if kind == "daemon" else {},
    }


def payload(mss: int) -> int:
    """TCP payload per segment for `iperf3 -M mss`: Linux spends 12 bytes on timestamps."""
    return mss - 12


DEFAULT_RATES = (2_000, 5_000, 10_000, 20_000, 40_000, 80_000)


def run_sweep(
    base: RunConfig,
    rates: tuple[int, ...] = DEFAULT_RATES,
    progress: Callable[[int, int, str, str, float], None] | None = None,
) -> dict[str, Any]:
    """Split v5 at rising offered packet rates (iperf3 -b with a fixed MSS)."""
    mss = base.mss or 1000
    configs = [
        replace(base, name=f"{pps}pps", paths="split", sync=base.sync or "v5",
                rate_pps=pps, mss=mss)
        for pps in rates
    ]
    result = run_compare(base, progress, configs)
    points = []
    for r in result["runs"]:
        pps = r["config"]["rate_pps"]
        offered = pps * payload(mss) * 8
        points.append({
            "pps": pps,
            "offered_bps": offered,
            "goodput_bps": r.get("goodput_bps", 0.0),
            "goodput_ratio": round((r.get("goodput_bps") or 0.0) / offered, 3),
            "measured_pps": r.get("server_rx_pps"),
            "state_mismatch": r.get("state_mismatch"),
            "retransmits": r.get("retransmits"),
            "stalled_streams": r.get("stalled_streams"),
            "max_cpu_share": r.get("max_cpu_share"),
            "host_cpu_busy": r.get("host_cpu_busy"),
            "sync_bytes_per_data_byte": r.get("sync_bytes_per_data_byte"),
        })
    result.update(kind="sweep", mss=mss, points=points)
    result.pop("acceptance", None)
    return result
