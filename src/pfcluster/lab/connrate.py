"""Connection rate through the lab: many short TCP connections, per path, in one run.

One lab (two firewalls, one client, one server) is built once and measured on each
requested path, in this order:

- ``kernel``: no daemon, the firewalls are plain Linux routers (measured first, before
  any daemon has touched the firewall namespaces), both directions via fw1;
- ``symmetric``: ``pfcluster daemon --defer`` on both firewalls with pfsync, both
  directions via fw1;
- ``split``: the same daemons, client->server via fw1 and server->client via fw2.

The daemon paths run in the order given, on the same daemons (so a later path meets the
closed states of the earlier ones, as a busy cluster does). Per path: optionally N
sequential connections from fresh ports and N from one fixed source port (issue 9's
reuse case), then `conns` short connections with at most `parallel` in flight. The
server closes first, so the client keeps no TIME_WAIT and Linux may reuse its ports at
once. The client and server are `pfcluster.lab.connclient` inside the namespaces.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from pfcluster.lab.experiment import (
    READY_TIMEOUT,
    DaemonRunner,
    RunConfig,
    _flatten,
    _norm,
    extra_sources,
)
from pfcluster.lab.iperf import wait_listening
from pfcluster.lab.netns import Lab, LabError, Proc, run, sysctl
from pfcluster.lab.topology import Host, Topology

CONN_PATHS = ("kernel", "symmetric", "split", "ecmp")
DAEMON_PATHS = ("symmetric", "split", "ecmp")
# what a plain `lab connrate` measures (ecmp on request: with --nat it is the path on
# which both firewalls translate, each for part of the flows)
DEFAULT_PATHS = ("kernel", "symmetric", "split")
SERVER_PORT = 8080
REUSE_PORT_BASE = 20001  # fixed source ports for --reuse-port: below the ephemeral range
# firewall counters reported per path (leaf names of `ctl info --json`, `-`/`_` ignored)
FW_COUNTERS = (
    "ins_received", "import_failed", "deferred", "defer_acked", "defer_timeout",
    "defer_update", "defer_overlimit", "defer_dropped", "badstate", "stale",
    "ureq_sent", "ureq_received", "state_reuse", "state_mismatch", "state_insert",
    "challenge_ack", "blocked",
)
# ... and any counter whose name says it is about key collisions or reuse (new names
# from the core fix show up without a change here)
FW_COUNTER_HINTS = ("reuse", "attach", "collision", "replace")

ProgressFn = Callable[[str, float], None]


@dataclass
class ConnRateConfig:
    conns: int = 3000
    parallel: int = 50
    paths: tuple[str, ...] = DEFAULT_PATHS
    reuse_port: int = 0  # N sequential connections from one source port (and N fresh)
    timeout: float = 15.0  # a connection not done within this counts as failed
    max_seconds: float = 120.0  # bound on each path's load phase
    defer: bool = True
    merge: str | None = None  # daemon --merge
    dialect: str | None = None
    workers: int = 1  # daemon --workers N
    nat: bool = False  # the daemons translate the clients (nat-to, --nat-slice K/N)
    keep_logs: bool = False
    # the client's ephemeral port range (net.ipv4.ip_local_port_range in its namespace);
    # a range smaller than `conns` makes every run reuse ports (None: Linux's default)
    port_range: tuple[int, int] | None = None

    def check(self) -> None:
        if not self.paths:
            raise ValueError("no paths to measure")
        for p in self.paths:
            if p not in CONN_PATHS:
                raise ValueError(f"path {p!r} is not one of {', '.join(CONN_PATHS)}")
        if len(set(self.paths)) != len(self.paths):
            raise ValueError("a path is listed twice")
        if not 0 <= self.conns <= 200_000:
            raise ValueError("conns must be 0..200000")
        if not 1 <= self.parallel <= 1000:
            raise ValueError("parallel must be 1..1000")
        if not 0 <= self.reuse_port <= 1000:
            raise ValueError("reuse-port must be 0..1000")
        if not 0 < self.timeout <= 120:
            raise ValueError("timeout must be in (0, 120] seconds")
        if not 1 <= self.max_seconds <= 3600:
            raise ValueError("max-seconds must be 1..3600")
        if self.conns == 0 and self.reuse_port == 0:
            raise ValueError("nothing to measure: conns and reuse-port are both 0")
        if self.port_range is not None:
            lo, hi = self.port_range
            if not 1024 <= lo < hi <= 65535 or hi - lo < self.parallel * 2:
                raise ValueError("port range must be LO-HI within 1024..65535, wider than "
                                 "twice --parallel")
            if lo <= REUSE_PORT_BASE + len(CONN_PATHS) and hi >= REUSE_PORT_BASE:
                raise ValueError(f"port range must leave {REUSE_PORT_BASE}.."
                                 f"{REUSE_PORT_BASE + len(CONN_PATHS)} free (--reuse-port)")

    def ordered_paths(self) -> list[str]:
        """kernel first (before the daemons start), then the daemon paths as given."""
        return (["kernel"] if "kernel" in self.paths else []) + [
            p for p in self.paths if p != "kernel"
        ]

    def path_budget(self) -> float:
        """Upper bound on one path's wall time (reuse phase + load phase)."""
        return 2 * self.reuse_port * (self.timeout + 0.5) + self.max_seconds + 10


def fw_counters(info: dict[str, Any]) -> dict[str, int]:
    """The counters above from one `ctl info --json`, by leaf name, shallowest first."""
    wanted = {_norm(k) for k in FW_COUNTERS}
    out: dict[str, int] = {}
    flat = _flatten(info)
    for key in sorted(flat, key=lambda k: k.count(".")):
        leaf = _norm(key.rsplit(".", 1)[-1])
        v = flat[key]
        if not isinstance(v, int) or isinstance(v, bool) or leaf in out:
            continue
        if leaf in wanted or any(h in leaf for h in FW_COUNTER_HINTS):
            out[leaf] = v
    return out


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items()}


def _client(lab: Lab, ns: str, args: list[str], timeout: float) -> dict[str, Any]:
    out = run(ns, [sys.executable, "-m", "pfcluster.lab.connclient", *args],
              timeout=timeout, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise LabError(f"connclient {args[0]} exited {out.returncode}: "
                       f"{out.stderr.strip()[-800:]}")
    doc = json.loads(lines[-1])
    if not isinstance(doc, dict):
        raise LabError(f"connclient {args[0]}: not a JSON object")
    return doc


def measure_path(lab: Lab, cfg: ConnRateConfig, client: Host, server: Host,
                 src_port: int, seen_ports: set[int],
                 sources: list[str] | None = None) -> dict[str, Any]:
    """The reuse phase (if asked) and the load phase on whatever routing is set now
    (the load from `sources` in turn when given: --workers)."""
    row: dict[str, Any] = {}
    if cfg.reuse_port:
        r = _client(lab, client.ns, [
            "reuse", "--to", server.ip4, "--port", str(SERVER_PORT),
            "--count", str(cfg.reuse_port), "--bind-ip", client.ip4,
            "--src-port", str(src_port), "--timeout", f"{cfg.timeout:g}",
        ], timeout=cfg.path_budget())
        fresh, reuse = r["fresh"], r["reuse"]
        ratio = None
        if fresh["median_ms"] and reuse["median_ms"] is not None:
            ratio = round(reuse["median_ms"] / fresh["median_ms"], 2)
        row["reuse"] = {
            "n": cfg.reuse_port,
            "src_port": src_port,
            "fresh_median_ms": fresh["median_ms"],
            "reuse_median_ms": reuse["median_ms"],
            "reuse_over_fresh": ratio,
            "fresh_ok": fresh["ok"],
            "reuse_ok": reuse["ok"],
            "fresh_max_ms": fresh["max_ms"],
            "reuse_max_ms": reuse["max_ms"],
            "fresh_retrans": fresh["retrans"],
            "reuse_retrans": reuse["retrans"],
            "fresh_syn_retrans": fresh["nstat"].get("TcpExtTCPSynRetrans"),
            "reuse_syn_retrans": reuse["nstat"].get("TcpExtTCPSynRetrans"),
            "reuse_slow": sum(1 for c in reuse["conns"] if not c["ok"] or c["ms"] > 500),
            # local waits for the previous connection's close to finish (not in medians)
            "reuse_bind_wait_ms": reuse.get("bind_wait_ms"),
            "fresh_conns": fresh["conns"],
            "reuse_conns": reuse["conns"],
        }
    if cfg.conns:
        d = _client(lab, client.ns, [
            "load", "--to", server.ip4, "--port", str(SERVER_PORT),
            "--conns", str(cfg.conns), "--parallel", str(cfg.parallel),
            "--timeout", f"{cfg.timeout:g}", "--max-seconds", f"{cfg.max_seconds:g}",
            *(["--sources", ",".join(sources)] if sources else []),
        ], timeout=cfg.max_seconds + cfg.timeout + 15)
        ports = [int(p) for p in d.pop("ports", [])]
        row.update(
            conns=d["conns"],
            completed=d["completed"],
            failed=d["failed"],
            failed_by_reason=d["failed_by_reason"],
            conn_per_s=d["conn_per_s"],
            elapsed_s=d["elapsed_s"],
            latency_ms=d["latency_ms"],
            syn_retrans=d["nstat"].get("TcpExtTCPSynRetrans"),
            retrans_segs=d["nstat"].get("TcpRetransSegs"),
            tcpinfo_retrans=d["tcpinfo_retrans"],
            conns_with_retrans=d["conns_with_retrans"],
            client_nstat=d["nstat"],
            distinct_ports=d["distinct_ports"],
            # connections that got a source port an earlier connection of this path had
            port_reuses=len(ports) - d["distinct_ports"],
            # ports this path used that an earlier path (or phase) had already used
            ports_used_before=len(set(ports) & seen_ports),
            failures=d["failures"][:20],
        )
        seen_ports.update(ports)
    return row


def run_connrate(cfg: ConnRateConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Build the lab once, measure every path, tear down. Returns the figures."""
    cfg.check()
    note = progress or (lambda what, frac: None)
    paths = cfg.ordered_paths()
    doc: dict[str, Any] = {
        "kind": "connrate", "config": {**asdict(cfg), "paths": paths},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": {}, "errors": [],
    }
    steps = len(paths) + 1
    with Lab(keep_logs=cfg.keep_logs) as lab:
        doc["prefix"] = lab.prefix
        if cfg.keep_logs:
            doc["logs"] = str(lab.workdir)
        note("building namespaces", 0.0)
        topo = Topology(lab, firewalls=2).build()
        c, s = topo.client_hosts[0], topo.server_hosts[0]
        if cfg.port_range:
            sysctl(c.ns, {"net.ipv4.ip_local_port_range": "{} {}".format(*cfg.port_range)})
        lifetime = len(paths) * cfg.path_budget() + READY_TIMEOUT + 60
        srv = lab.spawn("connserver", s.ns, [
            sys.executable, "-m", "pfcluster.lab.connclient", "serve", "--bind", s.ip4,
            "--port", str(SERVER_PORT), "--seconds", f"{lifetime:g}",
        ])
        wait_listening(s.ns, SERVER_PORT, srv)
        # --workers N: the load comes from N*4 client addresses on every path, the
        # kernel's included, so the firewalls' workers share it
        sources = extra_sources(lab, topo, cfg.workers)
        runner: DaemonRunner | None = None
        seen: set[int] = set()
        for i, path in enumerate(paths):
            if path in DAEMON_PATHS and runner is None:
                note("starting daemons", (i + 0.05) / steps)
                runner = DaemonRunner()
                runner.start(lab, topo, RunConfig(
                    paths="split", sync="v5", firewall="daemon", defer=cfg.defer,
                    merge=cfg.merge, dialect=cfg.dialect, workers=cfg.workers, nat=cfg.nat,
                ))
                runner.wait_ready(READY_TIMEOUT)
            topo.set_paths("symmetric" if path == "kernel" else path)
            note(f"{path}: {cfg.conns} connections", (i + 0.1) / steps)
            before = {}
            if runner is not None:
                before = {fw.index: fw_counters(runner.info(fw)) for fw in topo.fws}
            t0 = time.monotonic()
            try:
                row = measure_path(lab, cfg, c, s, REUSE_PORT_BASE + i, seen, sources)
            except LabError as exc:
                doc["errors"].append(f"{path}: {exc}")
                row = {"error": str(exc)}
            row["path"] = path
            row["wall_s"] = round(time.monotonic() - t0, 3)
            if runner is not None:
                fws: dict[str, Any] = {}
                for fw in topo.fws:
                    try:
                        fws[f"fw{fw.index}"] = _delta(fw_counters(runner.info(fw)),
                                                      before[fw.index])
                    except (LabError, ValueError) as exc:
                        doc["errors"].append(f"{path}: fw{fw.index} info: {exc}")
                row["firewalls"] = fws
                for idx, proc in runner.procs.items():
                    if proc.popen.poll() is not None:
                        doc["errors"].append(f"{path}: daemon fw{idx} died "
                                             f"({proc.popen.returncode}): "
                                             f"{lab.log_tail(proc, 5)}")
            doc["rows"][path] = row
        if runner is not None and cfg.keep_logs:
            doc["daemon_logs"] = {f"fw{i}": str(p.log) for i, p in runner.procs.items()}
        note("tearing down", 0.98)
        lab.stop(srv, grace=2.0)
        doc["server"] = _server_summary(srv)
    doc["ratios"] = ratios(doc["rows"])
    note("done", 1.0)
    return doc


def _server_summary(srv: Proc) -> dict[str, Any] | None:
    if srv.log is None or not srv.log.exists():
        return None
    for line in reversed(srv.log.read_text(errors="replace").splitlines()):
        if line.startswith("{") and '"role"' in line:
            try:
                got = json.loads(line)
            except ValueError:
                return None
            return got if isinstance(got, dict) else None
    return None


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Connections/s of each daemon path against the kernel, and split against symmetric."""
    def rate(p: str) -> float | None:
        v = rows.get(p, {}).get("conn_per_s")
        return float(v) if isinstance(v, int | float) else None

    out: dict[str, float | None] = {}
    k, sy, sp = rate("kernel"), rate("symmetric"), rate("split")
    if k:
        if sy is not None:
            out["symmetric_over_kernel"] = round(sy / k, 3)
        if sp is not None:
            out["split_over_kernel"] = round(sp / k, 3)
    if sy and sp is not None:
        out["split_over_symmetric"] = round(sp / sy, 3)
    ec = rate("ecmp")
    if k and ec is not None:
        out["ecmp_over_kernel"] = round(ec / k, 3)
    return out


def table_rows(doc: dict[str, Any]) -> list[list[str]]:
    """The short table: one line per path."""
    def f(v: Any, spec: str = "") -> str:
        if v is None:
            return "-"
        return format(v, spec) if spec and isinstance(v, int | float) else str(v)

    lines = []
    for path, r in doc["rows"].items():
        lat = r.get("latency_ms") or {}
        fw = r.get("firewalls") or {}
        imp = sum(v.get("import_failed", 0) for v in fw.values()) if fw else None
        dto = sum(v.get("defer_timeout", 0) for v in fw.values()) if fw else None
        ru = r.get("reuse") or {}
        lines.append([
            path, f(r.get("conn_per_s"), ".0f"), f(r.get("completed")), f(r.get("failed")),
            f(lat.get("p50"), ".1f"), f(lat.get("p90"), ".1f"), f(lat.get("p99"), ".1f"),
            f(lat.get("max"), ".0f"), f(r.get("syn_retrans")), f(imp), f(dto),
            f(ru.get("fresh_median_ms"), ".1f"), f(ru.get("reuse_median_ms"), ".1f"),
        ])
    return lines


TABLE_HEAD = ("path", "conn/s", "completed", "failed", "p50 ms", "p90 ms", "p99 ms",
              "max ms", "SYN rexmit", "import_failed", "defer_timeout",
              "fresh-port median ms", "one-port median ms")
