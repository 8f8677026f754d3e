"""Bulk update through the lab: a firewall holding N states, a fresh peer joins.

Two firewall namespaces joined by the sync LAN (the lab topology; no traffic crosses
the data legs). fw1's daemon starts with N synthetic established TCP states
(`daemon --bench-preload N`, pfcluster/bench/preload.py) and is ready once its control
socket reports them. Then fw2's daemon starts: it asks for a bulk update (UPD_REQ 0/0),
fw1 walks its table at the engine's bulk pacing, and fw2 reports sync_ok after BUS end.
The clock runs from fw2's spawn to the first `info` answer with sync_ok (polled every
`poll` seconds over the control socket, in this process); fw2's log gives the bulk phase
alone (BUS start to BUS end received). Reported: states, seconds, states per second,
both daemons' VmRSS, and what was lost on the way: states missing at fw2, and the
kernel's drop counter of fw2's raw pfsync socket (/proc/net/raw in its namespace).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pfcluster.io.control import ControlError, request
from pfcluster.lab.experiment import LAB_RULES, DaemonRunner, RunConfig
from pfcluster.lab.netns import Lab, LabError, Proc, run
from pfcluster.lab.topology import FirewallNode, Topology

ProgressFn = Callable[[str, float], None]
IPPROTO_PFSYNC = 240
MAX_STATES = 5_000_000
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass
class BulkConfig:
    states: int = 100_000
    timeout: float = 300.0  # bound on the wait for fw2's sync_ok
    poll: float = 0.1  # seconds between `info` polls of fw2
    keep_logs: bool = False

    def check(self) -> None:
        if not 1 <= self.states <= MAX_STATES:
            raise ValueError(f"states must be 1..{MAX_STATES}")
        if not 1 <= self.timeout <= 3600:
            raise ValueError("timeout must be 1..3600 seconds")
        if not 0.01 <= self.poll <= 5:
            raise ValueError("poll must be 0.01..5 seconds")

    def rules(self) -> str:
        """The lab ruleset with room for the table on both sides. The limit is twice
        the table, so adaptive timeouts (from 60% of the limit) stay off: with them on,
        an exported state's remaining time is scaled down by the sender and its import
        is scaled again by the receiver (as in pf), and states expire on the way."""
        limit = 2 * self.states + 10_000
        return f"set limit states {limit}\n{LAB_RULES}"


def vm_rss_kib(pid: int) -> int | None:
    """VmRSS of `pid` in KiB, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def raw_drops(text: str, proto: int = IPPROTO_PFSYNC) -> int:
    """Sum of the `drops` column of /proc/net/raw rows bound to `proto`."""
    total = 0
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 13 or ":" not in parts[1]:
            continue
        try:
            if int(parts[1].rsplit(":", 1)[1], 16) == proto:
                total += int(parts[-1])
        except ValueError:
            continue
    return total


def log_times(log: Path | None, *phrases: str) -> dict[str, float]:
    """Wall-clock time (epoch seconds) of the first log line containing each phrase."""
    out: dict[str, float] = {}
    if log is None or not log.exists():
        return out
    for line in log.read_text(errors="replace").splitlines():
        m = LOG_TIME.match(line)
        if not m:
            continue
        for p in phrases:
            if p not in out and p in line:
                stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
                out[p] = stamp.timestamp()
    return out


def _info(runner: DaemonRunner, fw: FirewallNode) -> dict[str, Any]:
    resp = request(str(runner.controls[fw.index]), "info", timeout=10.0)
    data = resp.get("data")
    if not resp.get("ok") or not isinstance(data, dict):
        raise LabError(f"fw{fw.index} info: {resp.get('error', 'no data')}")
    return data


def _alive(lab: Lab, proc: Proc) -> None:
    if proc.popen.poll() is not None:
        raise LabError(f"{proc.name} exited with {proc.popen.returncode}:\n"
                       + lab.log_tail(proc))


def _wait(lab: Lab, runner: DaemonRunner, fw: FirewallNode, proc: Proc, timeout: float,
          poll: float, done: Callable[[dict[str, Any]], bool]) -> tuple[dict[str, Any], float]:
    """Poll fw's info until `done`; returns the answer and the monotonic time seen."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        _alive(lab, proc)
        if runner.controls[fw.index].exists():
            try:
                info = _info(runner, fw)
            except (ControlError, LabError) as exc:
                last = str(exc)
            else:
                if done(info):
                    return info, time.monotonic()
                last = f"states {info.get('states')}, sync_ok {info.get('sync_ok')}"
        time.sleep(poll)
    raise LabError(f"{proc.name}: not done after {timeout:g}s ({last})")


def run_bulk(cfg: BulkConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Build the lab, fill fw1, start fw2, time its bulk update, tear down."""
    cfg.check()
    note = progress or (lambda what, frac: None)
    doc: dict[str, Any] = {"kind": "bulk", "config": asdict(cfg),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "errors": []}
    with Lab(keep_logs=cfg.keep_logs) as lab:
        note("building namespaces", 0.0)
        topo = Topology(lab, firewalls=2).build()
        fw1, fw2 = topo.fws
        runner = DaemonRunner()
        rcfg = RunConfig(paths="split", sync="v5", firewall="daemon", rules=None)
        runner.lab, runner.cfg, runner.fws = lab, rcfg, [fw1, fw2]
        rules = lab.path("pf.conf")
        rules.write_text(cfg.rules())
        for fw in (fw1, fw2):
            runner.controls[fw.index] = lab.path(f"fw{fw.index}.ctl")
        note(f"fw1: preloading {cfg.states} states", 0.05)
        argv1 = [*runner.argv(fw1, topo, rcfg, rules), "--bench-preload", str(cfg.states)]
        p1 = runner.procs[1] = lab.spawn("daemon-fw1", fw1.ns, argv1)
        t_fill = time.monotonic()
        info1, _ = _wait(lab, runner, fw1, p1, cfg.timeout, 0.2,
                         lambda i: i.get("states", 0) >= cfg.states)
        doc["preload_s"] = round(time.monotonic() - t_fill, 2)
        note("fw2: joining", 0.3)
        drops_before = raw_drops(run(fw2.ns, ["cat", "/proc/net/raw"]).stdout)
        wall0 = time.time()
        t0 = time.monotonic()
        p2 = runner.procs[2] = lab.spawn("daemon-fw2", fw2.ns, runner.argv(fw2, topo, rcfg,
                                                                          rules))
        info2, t_ok = _wait(lab, runner, fw2, p2, cfg.timeout, cfg.poll,
                            lambda i: bool(i.get("sync_ok")))
        seconds = t_ok - t0
        # the counters once the last frames are in (sync_ok comes with the last one)
        info1 = _info(runner, fw1)
        info2 = _info(runner, fw2)
        raw = run(fw2.ns, ["cat", "/proc/net/raw"]).stdout
        sync2 = info2.get("pfsync", {})
        sync1 = info1.get("pfsync", {})
        got = int(info2.get("states", 0))
        marks = log_times(p2.log, "daemon up", "received bulk update start",
                          "received valid bulk update end")
        bus_s = None
        if "received bulk update start" in marks and \
                "received valid bulk update end" in marks:
            bus_s = round(marks["received valid bulk update end"]
                          - marks["received bulk update start"], 3)
        up = marks.get("daemon up")
        doc.update(
            states=cfg.states,
            seconds=round(seconds, 3),
            states_per_s=round(got / seconds) if seconds > 0 else None,
            startup_s=round(up - wall0, 3) if up else None,
            bulk_phase_s=bus_s,
            bulk_phase_states_per_s=round(got / bus_s) if bus_s else None,
            received_states=got,
            missing_states=cfg.states - got,
            bulk_states_received=sync2.get("bulk_states_received"),
            bulk_done=sync2.get("bulk_done"),
            kernel_drops=raw_drops(raw) - drops_before,
            frames_sent=sync1.get("opackets"),
            frames_received=sync2.get("ipackets"),
            sender_rss_kib=vm_rss_kib(int(info1["pid"])),
            receiver_rss_kib=vm_rss_kib(int(info2["pid"])),
            sender_states=info1.get("states"),
        )
        if got != cfg.states:
            doc["errors"].append(f"fw2 holds {got} of {cfg.states} states")
        if doc["kernel_drops"]:
            doc["errors"].append(f"fw2's pfsync socket dropped {doc['kernel_drops']} frames")
        if cfg.keep_logs:
            doc["logs"] = str(lab.workdir)
        note("tearing down", 0.95)
    note("done", 1.0)
    return doc


def main() -> None:  # pragma: no cover - `python -m pfcluster.lab.bulk N` for quick runs
    import json

    print(json.dumps(run_bulk(BulkConfig(states=int(sys.argv[1]) if len(sys.argv) > 1
                                         else 20_000)), indent=1))


if __name__ == "__main__":  # pragma: no cover
    main()
