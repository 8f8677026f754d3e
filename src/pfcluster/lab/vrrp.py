"""`lab run --vrrp`: keepalived on the firewalls, the hosts routed via virtual gateways.

Two firewalls (fw1 priority 150, fw2 100, 1 s adverts) run `pfcluster daemon` and Debian's
keepalived; one sync group holds 198.51.100.254 (client LAN) and 203.0.113.254 (server
LAN), and the hosts route via these addresses. Each keepalived tracks its daemon's
track file (io/vrrp.py: 0 when sync_ok, -253 until the bulk update is done), and reports
its transitions with `pfcluster ctl notify`. While iperf3 streams and a 20 Hz ping run:

- `failover`: fw1 (master) dies: links down, daemon and keepalived SIGKILLed. fw2 takes
  the addresses after keepalived's master-down interval (3 x 1 s + skew = 3.6 s). Later
  fw1 comes back as after a reboot (no iptables chain, empty /run): keepalived first,
  then its daemon `hold` seconds later. It must stay backup while its table is empty and
  take the addresses back only after its bulk update (sync_ok).
- `rolling`: the rolling upgrade: each firewall's daemon in turn is stopped (SIGTERM) and
  started again; the stopping daemon demotes itself first, so keepalived moves the
  addresses away, and the new daemon takes them back after its bulk update.

A poller reads, every 20 ms, which firewall holds the addresses and each track file's
value; the figures are the times between these events, the longest gap in the ping
replies, iperf3's longest stall and the TCP resets the hosts saw.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pfcluster.lab import iperf
from pfcluster.lab.experiment import LAB_RULES, ProgressFn, _rst_count, _rst_rules
from pfcluster.lab.netns import Lab, LabError, Proc, ipr_in, run
from pfcluster.lab.topology import (
    CLIENT_NET4,
    FW_CLIENT_IF,
    FW_SERVER_IF,
    FW_SYNC_IF,
    SERVER_NET4,
    FirewallNode,
    Topology,
)

VIP_HOST = 254
VIP_CLIENT, VIP_SERVER = f"{CLIENT_NET4}.{VIP_HOST}", f"{SERVER_NET4}.{VIP_HOST}"
PRIORITY = {1: 150, 2: 100}
ADVERT_S = 1
DEMOTE = 253
POLL_S = 0.02
# VRRP (IP protocol 112, pf's "carp") between the firewalls, stateless: pass it first
VRRP_RULES = LAB_RULES.replace(
    f"pass quick on {FW_SYNC_IF}\n",
    f"pass quick on {FW_SYNC_IF}\npass quick on {{ {FW_CLIENT_IF} {FW_SERVER_IF} }} proto carp "
    "no state\n")


def keepalived_available() -> bool:
    return shutil.which("keepalived") is not None


def master_down_s(priority: int, advert: float = ADVERT_S) -> float:
    """RFC 5798: 3 adverts plus the skew (256 - priority) / 256 of one."""
    return 3 * advert + (256 - priority) / 256 * advert


def keepalived_conf(fw: FirewallNode, track: Path, notify: Path) -> str:
    """One firewall's keepalived.conf (the lab form of docs/keepalived.conf)."""
    inst = []
    for name, ifname, vrid, vip in (("CLI", FW_CLIENT_IF, 51, VIP_CLIENT),
                                    ("SRV", FW_SERVER_IF, 52, VIP_SERVER)):
        inst.append(f"""vrrp_instance {name} {{
    state BACKUP
    interface {ifname}
    virtual_router_id {vrid}
    priority {PRIORITY[fw.index]}
    advert_int {ADVERT_S}
    virtual_ipaddress {{
        {vip}/24 dev {ifname}
    }}
    track_file {{
        pfsync
    }}
}}
""")
    return f"""global_defs {{
    router_id fw{fw.index}
    script_user root
    vrrp_garp_master_delay 1
    vrrp_garp_master_repeat 3
}}
track_file pfsync {{
    file "{track}"
    weight 1
    init_file -{DEMOTE}
}}
vrrp_sync_group FW {{
    group {{
        CLI
        SRV
    }}
    sync_group_tracking_weight
    notify "{notify}"
}}
""" + "".join(inst)


@dataclass
class VrrpConfig:
    seconds: int = 24
    streams: int = 2
    failover: bool = False
    rolling: bool = False
    hold: float = 3.0  # a rejoining fw1: keepalived alone this long before its daemon
    keep_logs: bool = False

    def check(self) -> None:
        if not self.failover and not self.rolling:
            raise ValueError("--vrrp needs --failover and/or --rolling")
        need = (20 if self.failover else 0) + (16 if self.rolling else 0)
        if self.seconds < need:
            raise ValueError(f"--vrrp with these steps needs --seconds >= {need}")
        if not 0 <= self.hold <= 30:
            raise ValueError("hold must be 0..30 s")


@dataclass
class Node:
    """One firewall of the VRRP lab: its daemon, its keepalived, their files."""

    fw: FirewallNode
    control: Path
    track: Path
    conf: Path
    pidfile: Path
    vrrp_pidfile: Path
    daemon: Proc | None = None
    keepalived: Proc | None = None
    starts: int = 0
    kstarts: int = 0


@dataclass
class Timeline:
    """What the poller saw: (seconds since start, event) in order."""

    t0: float = field(default_factory=time.monotonic)
    events: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, what: str) -> float:
        t = round(time.monotonic() - self.t0, 3)
        with self.lock:
            self.events.append((t, what))
        return t

    def first(self, what: str, after: float = 0.0) -> float | None:
        with self.lock:
            return next((t for t, w in self.events if w == what and t >= after), None)


class Poller(threading.Thread):
    """Every POLL_S: who holds the client-LAN address, and each track file's value."""

    def __init__(self, nodes: list[Node], tl: Timeline) -> None:
        super().__init__(daemon=True)
        self.nodes, self.tl = nodes, tl
        self.stop_event = threading.Event()
        self.holder: list[int] = []
        self.track: dict[int, str] = {}

    def run(self) -> None:
        iprs = {}
        try:
            for n in self.nodes:
                iprs[n.fw.index] = ipr_in(n.fw.ns)
            while not self.stop_event.wait(POLL_S):
                self._poll(iprs)
        finally:
            for ipr in iprs.values():
                with contextlib.suppress(Exception):
                    ipr.close()

    def _poll(self, iprs: dict[int, Any]) -> None:
        holder = []
        for idx, ipr in iprs.items():
            try:
                addrs = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2)}
            except Exception:
                addrs = set()
            if VIP_CLIENT in addrs:
                holder.append(idx)
        if holder != self.holder:
            self.holder = holder
            self.tl.add("holder " + (",".join(f"fw{i}" for i in holder) or "none"))
        for n in self.nodes:
            try:
                value = n.track.read_text().strip()
            except OSError:
                value = "absent"
            if value != self.track.get(n.fw.index):
                self.track[n.fw.index] = value
                self.tl.add(f"fw{n.fw.index} track {value}")


class VrrpLab:
    """The lab's processes and the steps of the scenario."""

    def __init__(self, lab: Lab, topo: Topology, rules: Path, tl: Timeline) -> None:
        self.lab, self.topo, self.rules, self.tl = lab, topo, rules, tl
        self.nodes = [self._node(fw) for fw in topo.fws]
        self.poller: Poller | None = None
        self.resets: Any = dict  # -> the hosts' TCP resets so far (set once streaming)

    def holder(self) -> list[int]:
        return self.poller.holder if self.poller is not None else []

    def _node(self, fw: FirewallNode) -> Node:
        p = self.lab.path
        i = fw.index
        node = Node(fw, p(f"fw{i}.ctl"), p(f"fw{i}.track"), p(f"fw{i}-keepalived.conf"),
                    p(f"fw{i}-keepalived.pid"), p(f"fw{i}-vrrp.pid"))
        notify = p(f"fw{i}-notify.sh")
        notify.write_text("#!/bin/sh\n"
                          f"export PYTHONPATH={':'.join(_src_path())}\n"
                          f"exec {sys.executable} -m pfcluster.cli.main ctl --control "
                          f"{node.control} notify \"$@\"\n")
        notify.chmod(0o755)
        node.conf.write_text(keepalived_conf(fw, node.track, notify))
        return node

    def node(self, index: int) -> Node:
        return self.nodes[index - 1]

    def start_daemon(self, n: Node) -> None:
        n.starts += 1
        n.daemon = self.lab.spawn(f"daemon-fw{n.fw.index}-{n.starts}", n.fw.ns, [
            sys.executable, "-m", "pfcluster.cli.main", "daemon", "--rules", str(self.rules),
            "--syncdev", FW_SYNC_IF, "--control", str(n.control), "--track-file", str(n.track),
            "--hostid", str(n.fw.index)])
        self.tl.add(f"fw{n.fw.index} daemon start")

    def start_keepalived(self, n: Node) -> None:
        n.kstarts += 1
        n.keepalived = self.lab.spawn(f"keepalived-fw{n.fw.index}-{n.kstarts}", n.fw.ns, [
            "keepalived", "-n", "-l", "-D", "-G", "-P", "-f", str(n.conf), "-p", str(n.pidfile),
            "-r", str(n.vrrp_pidfile), "-c", str(n.pidfile) + ".chk"])
        self.tl.add(f"fw{n.fw.index} keepalived start")

    def sync_ok(self, n: Node) -> bool:
        res = run(None, [sys.executable, "-m", "pfcluster.cli.main", "ctl", "--control",
                         str(n.control), "syncok"], check=False, timeout=10)
        return res.returncode == 0

    def wait(self, what: str, predicate: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        logs = "\n".join(self.lab.log_tail(p, 8) for p in self.lab.procs[-4:])
        raise LabError(f"vrrp lab: {what} not within {timeout:g}s\n{logs}")

    def crash(self, n: Node) -> None:
        """The box dies: links first (no goodbye advert escapes), then its processes."""
        for ifname in (FW_CLIENT_IF, FW_SERVER_IF, FW_SYNC_IF):
            self.lab.link_state(n.fw.ns, ifname, up=False)
        self.tl.add(f"fw{n.fw.index} crash")
        self._kill_keepalived(n)
        if n.daemon is not None:
            self.lab.stop(n.daemon, sig=signal.SIGKILL, grace=2.0)

    def _kill_keepalived(self, n: Node) -> None:
        """SIGKILL keepalived's VRRP child (by its pid file) and the parent we started."""
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(n.vrrp_pidfile.read_text().split()[0]), signal.SIGKILL)
        if n.keepalived is not None:
            self.lab.stop(n.keepalived, sig=signal.SIGKILL, grace=2.0)

    def reboot(self, n: Node) -> None:
        """Back as after a reboot: no iptables chain, empty /run, links up."""
        run(n.fw.ns, [sys.executable, "-m", "pfcluster.cli.main", "daemon", "--uninstall",
                      "--queue", "0"], timeout=30)
        with contextlib.suppress(FileNotFoundError):
            n.track.unlink()
        for ifname in (FW_CLIENT_IF, FW_SERVER_IF, FW_SYNC_IF):
            self.lab.link_state(n.fw.ns, ifname, up=True)
        self.tl.add(f"fw{n.fw.index} links up")

    def restart_daemon(self, n: Node) -> None:
        """`systemctl restart pfcluster` on one firewall: SIGTERM, then a new daemon."""
        assert n.daemon is not None
        self.tl.add(f"fw{n.fw.index} daemon stop")
        rc = self.lab.stop(n.daemon, sig=signal.SIGTERM, grace=10.0)
        if rc != 0:
            raise LabError(f"fw{n.fw.index} daemon exited {rc} on SIGTERM: "
                           f"{self.lab.log_tail(n.daemon, 5)}")
        self.start_daemon(n)


def _src_path() -> list[str]:
    import pfcluster

    return [str(Path(pfcluster.__file__).resolve().parent.parent)]


PING_CODE = r"""
import subprocess, sys, time
# ping -D: [epoch] per reply; a gap between replies is an outage
p = subprocess.run(["ping", "-n", "-D", "-i", "0.05", "-W", "1", "-w", sys.argv[2], sys.argv[1]],
                   capture_output=True, text=True)
print(p.stdout)
"""


def ping_gaps(text: str) -> dict[str, Any]:
    """The longest interval between two echo replies, and the replies counted."""
    stamps = []
    for line in text.splitlines():
        if line.startswith("[") and "bytes from" in line:
            with contextlib.suppress(ValueError):
                stamps.append(float(line[1:line.index("]")]))
    gaps = sorted((b - a, a) for a, b in itertools.pairwise(stamps))
    return {"replies": len(stamps),
            "longest_gap_s": round(gaps[-1][0], 3) if gaps else None,
            "gaps_over_0.5s": [round(g, 3) for g, _ in gaps if g > 0.5]}


def _between(tl: Timeline, start: str, end: str, after: float = 0.0) -> float | None:
    t1 = tl.first(start, after)
    if t1 is None:
        return None
    t2 = tl.first(end, t1)
    return None if t2 is None else round(t2 - t1, 3)


def failover_steps(v: VrrpLab, tl: Timeline, cfg: VrrpConfig, at: float) -> dict[str, Any]:
    """fw1 dies; fw2 takes over; fw1 comes back and waits for its bulk update."""
    fw1 = v.node(1)
    t_crash = tl.add("failover begins")
    v.crash(fw1)
    v.wait("fw2 master", lambda: tl.first("holder fw2", t_crash) is not None, 15)
    rst_takeover = v.resets()
    time.sleep(max(0.0, at + 0.35 * cfg.seconds - (time.monotonic() - tl.t0)))
    v.reboot(fw1)
    v.start_keepalived(fw1)
    t_k = tl.first("fw1 keepalived start", t_crash) or 0.0
    time.sleep(cfg.hold)
    held = tl.first("holder fw1", t_k) is None and tl.first("holder fw1,fw2", t_k) is None
    v.start_daemon(fw1)
    t_d = tl.first("fw1 daemon start", t_k) or 0.0
    v.wait("fw1 back as master", lambda: tl.first("holder fw1", t_d) is not None, 20)
    t_sync = tl.first("fw1 track 0", t_d)
    t_back = tl.first("holder fw1", t_d)
    return {
        "resets_after_takeover": rst_takeover,
        "resets_after_rejoin": v.resets(),
        "crash_at_s": t_crash,
        "takeover_s": _between(tl, "fw1 crash", "holder fw2", t_crash),
        "master_down_interval_s": round(master_down_s(PRIORITY[2]), 3),
        "rejoin_keepalived_alone_s": cfg.hold,
        "rejoin_stayed_backup_while_unsynced": held,
        "rejoin_sync_ok_after_daemon_start_s": None if t_sync is None else round(t_sync - t_d, 3),
        "rejoin_master_after_sync_ok_s": None if t_sync is None or t_back is None
        else round(t_back - t_sync, 3),
        "rejoin_master_before_sync_ok": t_sync is None or (t_back is not None and t_back < t_sync),
        "fw2_still_holding_before_sync_ok": tl.first("holder fw2", t_crash) is not None,
    }


def rolling_steps(v: VrrpLab, tl: Timeline) -> dict[str, Any]:
    """Restart each firewall's daemon in turn, waiting for sync_ok between them."""
    out: dict[str, Any] = {"steps": []}
    for n in v.nodes:
        t0 = tl.add(f"rolling fw{n.fw.index}")
        v.restart_daemon(n)
        v.wait(f"fw{n.fw.index} sync_ok after restart",
               lambda n=n, t0=t0: tl.first(f"fw{n.fw.index} track 0", t0) is not None, 20)
        # the preferred firewall (fw1) holds the addresses again once synced
        v.wait("fw1 holds the addresses", lambda: v.holder() == [1], 10)
        moved_away = tl.first("holder fw2", t0) is not None
        out["steps"].append({
            "firewall": f"fw{n.fw.index}",
            "addresses_moved_away": moved_away,
            "demoted_after_stop_s": _between(tl, f"fw{n.fw.index} daemon stop",
                                             f"fw{n.fw.index} track -{DEMOTE}", t0),
            "sync_ok_after_start_s": _between(tl, f"fw{n.fw.index} daemon start",
                                              f"fw{n.fw.index} track 0", t0),
            "resets_so_far": v.resets(),
        })
        time.sleep(1.0)
    return out


def run_vrrp(cfg: VrrpConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Build, start daemons and keepalived, stream, run the steps, collect."""
    cfg.check()
    if not keepalived_available():
        raise LabError("--vrrp: keepalived is not installed (scripts/install installs it)")
    note = progress or (lambda what, frac: None)
    result: dict[str, Any] = {"name": "vrrp", "config": asdict(cfg), "errors": [],
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with Lab(keep_logs=cfg.keep_logs) as lab:
        if cfg.keep_logs:
            result["logs"] = str(lab.workdir)
        note("building namespaces", 0.0)
        topo = Topology(lab, firewalls=2).build()
        c, s = topo.client_hosts[0], topo.server_hosts[0]
        lab.set_route(c.ns, f"{SERVER_NET4}.0/24", [VIP_CLIENT])
        lab.set_route(s.ns, f"{CLIENT_NET4}.0/24", [VIP_SERVER])
        for host in (c, s):
            _rst_rules(lab, host.ns)
        rules = lab.path("pf.conf")
        rules.write_text(VRRP_RULES)
        tl = Timeline()
        v = VrrpLab(lab, topo, rules, tl)
        note("starting daemons and keepalived", 0.02)
        for n in v.nodes:
            v.start_daemon(n)
        for n in v.nodes:
            v.wait(f"fw{n.fw.index} sync_ok", lambda n=n: n.control.exists() and v.sync_ok(n), 30)
        poller = Poller(v.nodes, tl)
        v.poller = poller
        poller.start()
        for n in v.nodes:
            v.start_keepalived(n)
        v.wait("fw1 master", lambda: poller.holder == [1], 20)
        srv = iperf.start_server(lab, s.ns, s.ip4)
        rst0 = {"client": _rst_count(c.ns), "server": _rst_count(s.ns)}

        def resets_now() -> dict[str, int]:
            return {"client": _rst_count(c.ns) - rst0["client"],
                    "server": _rst_count(s.ns) - rst0["server"]}

        # iperf3 resets its own sockets when a test ends: count up to shortly before
        rst_during: dict[str, int] = {}
        snap = threading.Timer(max(cfg.seconds - 1.0, cfg.seconds * 0.9),
                               lambda: rst_during.update(resets_now()))
        snap.daemon = True
        v.resets = resets_now
        ping = subprocess.Popen(
            ["ip", "netns", "exec", c.ns, sys.executable, "-c", PING_CODE, s.ip4,
             str(cfg.seconds)], stdout=subprocess.PIPE, text=True, start_new_session=True)
        steps: dict[str, Any] = {}
        step_error: list[str] = []

        def scenario() -> None:
            try:
                t_start = time.monotonic() - tl.t0
                time.sleep(0.2 * cfg.seconds)
                if cfg.failover:
                    steps["failover"] = failover_steps(v, tl, cfg, t_start + 0.2 * cfg.seconds)
                if cfg.rolling:
                    time.sleep(1.0)
                    steps["rolling"] = rolling_steps(v, tl)
            except Exception as exc:
                step_error.append(f"{type(exc).__name__}: {exc}")

        runner = threading.Thread(target=scenario, daemon=True)
        argv = iperf.client_argv(s.ip4, seconds=cfg.seconds, streams=cfg.streams)
        note("streaming", 0.05)
        runner.start()
        snap.start()
        res = iperf.run_client(c.ns, argv, cfg.seconds,
                               tick=lambda e: note(f"iperf3 {e:4.1f}/{cfg.seconds}s",
                                                   0.05 + 0.85 * min(1.0, e / cfg.seconds)))
        runner.join(60)
        snap.cancel()
        rst_end = resets_now()
        ping_out = ""
        with contextlib.suppress(subprocess.TimeoutExpired):
            ping_out = ping.communicate(timeout=15)[0]
        if ping.poll() is None:
            ping.kill()
            ping.wait(5)
        poller.stop_event.set()
        poller.join(5)
        lab.stop(srv, grace=2.0)
        note("collecting", 0.95)
        infos = {}
        for n in v.nodes:
            with contextlib.suppress(LabError, ValueError):
                out = run(None, [sys.executable, "-m", "pfcluster.cli.main", "ctl", "--control",
                                 str(n.control), "info", "--json"], check=False, timeout=10)
                infos[f"fw{n.fw.index}"] = json.loads(out.stdout)
        result["errors"].extend(step_error)
        for n in v.nodes:
            for p in (n.daemon, n.keepalived):
                if p is not None and p.popen.poll() is not None and p.popen.returncode not in (
                        0, -signal.SIGKILL) and not (p is n.daemon and n.starts > 1):
                    result["errors"].append(f"{p.name} exited {p.popen.returncode}: "
                                            f"{lab.log_tail(p, 5)}")
        for n in v.nodes:
            if n.keepalived is not None:
                lab.stop(n.keepalived, grace=5.0)
            if n.daemon is not None:
                lab.stop(n.daemon, grace=10.0)
    result.update(
        iperf=res.to_dict(),
        goodput_bps=res.goodput_bps,
        longest_stall_s=res.longest_stall_s,
        retransmits=res.retransmits,
        resets={"during": rst_during or None, "total": rst_end},
        ping=ping_gaps(ping_out),
        steps=steps,
        timeline=[{"t": t, "event": w} for t, w in tl.events],
        vrrp_reports={k: (d.get("vrrp") or {}).get("history", []) for k, d in infos.items()},
        counters={k: {"pf": d.get("pf"), "pfsync": d.get("pfsync"),
                      "dataplane": d.get("dataplane")} for k, d in infos.items()},
        ok=res.ok and not result["errors"] and rst_during == {"client": 0, "server": 0},
    )
    note("done", 1.0)
    return result


def vrrp_lines(doc: dict[str, Any]) -> list[str]:
    """The figures of one `lab run --vrrp`, as text."""
    r = doc.get("resets", {})
    ping = doc.get("ping", {})
    out = [f"vrrp lab: goodput {(doc.get('goodput_bps') or 0) / 1e6:.1f} Mbit/s, TCP resets "
           f"during the transfer {r.get('during')}, longest TCP stall "
           f"{doc.get('longest_stall_s')} s, longest ping gap {ping.get('longest_gap_s')} s "
           f"({ping.get('replies')} replies)"]
    fo = doc.get("steps", {}).get("failover")
    if fo:
        out.append(f"failover: fw2 took the addresses {fo['takeover_s']} s after fw1 died "
                   f"(master-down interval {fo['master_down_interval_s']} s)")
        out.append(f"rejoin: fw1 stayed backup while unsynced: "
                   f"{fo['rejoin_stayed_backup_while_unsynced']}; sync_ok "
                   f"{fo['rejoin_sync_ok_after_daemon_start_s']} s after its daemon started, "
                   f"master {fo['rejoin_master_after_sync_ok_s']} s after sync_ok")
    for step in doc.get("steps", {}).get("rolling", {}).get("steps", []):
        out.append(f"rolling {step['firewall']}: demoted {step['demoted_after_stop_s']} s "
                   f"after SIGTERM, addresses moved away {step['addresses_moved_away']}, "
                   f"sync_ok {step['sync_ok_after_start_s']} s after the new daemon started, "
                   f"resets so far {step['resets_so_far']}")
    out.append("ok" if doc.get("ok") else "FAILED")
    return out
