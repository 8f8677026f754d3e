"""Packets per second through one `pfcluster daemon`, against the same topology whose
NFQUEUE is drained by a consumer that accepts everything untouched (same run, same
namespaces, same iptables chain), and the plain kernel for scale. Two accept-all
consumers: the python netfilterqueue package (the issue's baseline, `accept_all`: whole
packets copied, one verdict per packet) and our own binding (`accept_all_nfq`: the
daemon's 256-byte copies and batched verdicts), so the ratio to each is reported.

client (198.51.100.2) — fw — server (203.0.113.2); fw also has a sync link to a peer
namespace (192.0.2.0/24). GRO/GSO/TSO are off on every veth and the MTU is 1500, so each
wire-sized packet is one queued packet. Packet rates are read from the firewall's own
interface counters (packets it transmitted on both data interfaces = packets forwarded,
both directions), throughput from iperf3's receiver side.

Workers: the same daemon with `--workers 1` and `--workers 2` forwards FLOWS TCP flows at
once, each from its own client address (the kernel's --queue-balance hash is per address
pair, so one flow can use only one worker). `workers_scaling` is 2 workers' pps over 1
worker's; each worker's CPU seconds are reported beside it, since on a 2-core machine the
traffic generators and the kernel's forwarding share the same cores.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pfcluster.io.iptables import IptablesRules
from pfcluster.lab.netns import Lab, ns_argv, offloads_off, sysctl
from pfcluster.lab.netns import run as ns_run
from pfcluster.procfs import cpu_seconds

QUEUE = 0
FLOWS = 4
PORTS = f"5201:{5200 + FLOWS}"
RULES = f"""\
set skip on lo
block all
pass in proto tcp to port {PORTS}
pass out proto tcp to port {PORTS}
pass in proto udp to port 5201
pass out proto udp to port 5201
"""

# --watching: the same rules with `log` on the pass rule (each flow's first packet and the
# blocked ones go to the pflog file), for the daemon with and without --metrics/--pflog
RULES_LOG = RULES.replace("block all", "block log all").replace(
    f"pass in proto tcp to port {PORTS}", f"pass in log proto tcp to port {PORTS}")
METRICS_AT = "127.0.0.1:9107"
# a Prometheus stand-in inside the firewall's namespace: one scrape a second
SCRAPER = r"""
import sys, time, urllib.request
while True:
    with urllib.request.urlopen("http://%s/metrics" % sys.argv[1], timeout=5) as r:
        r.read()
    time.sleep(1)
"""

ACCEPT_ALL = r"""
import signal, sys
from netfilterqueue import NetfilterQueue
q = NetfilterQueue()
q.bind(int(sys.argv[1]), lambda p: p.accept(), max_len=4096)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print("ready", flush=True)
try:
    q.run()
finally:
    q.unbind()
"""

CLIENT, FW, SERVER = "198.51.100.2", "198.51.100.1", "203.0.113.2"
FLOW_CLIENTS = [f"198.51.100.{10 + i}" for i in range(FLOWS)]


def _veth(a: str, a_if: str, b: str, b_if: str, a_cidr: str, b_cidr: str) -> None:
    ns_run(a, ["ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b])
    for ns, ifname, cidr in ((a, a_if, a_cidr), (b, b_if, b_cidr)):
        ns_run(ns, ["ip", "addr", "add", cidr, "dev", ifname])
        ns_run(ns, ["ip", "link", "set", ifname, "mtu", "1500", "up"])
        offloads_off(ns, ifname)


def _fw_tx_packets(lab: Lab, fw: str) -> int:
    stats = lab.link_stats(fw)
    return sum(stats.get(i, {}).get("tx_packets", 0) for i in ("eth0", "eth1"))


def _wait_ready(path: Path, needle: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if needle in path.read_text(errors="replace"):
                return True
        time.sleep(0.05)
    return False


def _iperf(lab: Lab, c: str, s: str, fw: str, seconds: float, udp: bool) -> dict[str, Any]:
    """One bounded iperf3 run; pps from the firewall's transmit counters."""
    server = lab.spawn("iperf3-s", s, ["iperf3", "-s", "-1", "-B", SERVER])
    try:
        time.sleep(0.3)
        argv = ["iperf3", "-c", SERVER, "-t", str(int(seconds)), "-J", "--connect-timeout", "3000"]
        if udp:
            argv += ["-u", "-l", "64", "-b", "0"]
        before = _fw_tx_packets(lab, fw)
        t0 = time.monotonic()
        proc = ns_run(c, argv, timeout=seconds + 20, check=False)
        elapsed = time.monotonic() - t0
        forwarded = _fw_tx_packets(lab, fw) - before
    finally:
        lab.stop(server, grace=2.0)
    out: dict[str, Any] = {"forwarded_packets": forwarded, "seconds": round(elapsed, 3),
                           "pps": round(forwarded / max(elapsed, 1e-9))}
    try:
        end = json.loads(proc.stdout)["end"]
        if udp:
            summ = end["sum"]
            out["mbit_s"] = round(summ["bits_per_second"] / 1e6, 2)
            out["udp_packets_sent"] = summ.get("packets")
            out["udp_lost_percent"] = round(summ.get("lost_percent", 0.0), 2)
            out["udp_received_pps"] = round(
                (summ.get("packets", 0) - summ.get("lost_packets", 0)) / max(summ["seconds"], 1e-9))
        else:
            out["mbit_s"] = round(end["sum_received"]["bits_per_second"] / 1e6, 2)
            out["retransmits"] = end["sum_sent"].get("retransmits")
    except (ValueError, KeyError, TypeError):
        out["error"] = (proc.stdout + proc.stderr)[-300:]
    return out


def _measure(lab: Lab, c: str, s: str, fw: str, seconds: float) -> dict[str, Any]:
    return {"tcp": _iperf(lab, c, s, fw, seconds, udp=False),
            "udp64": _iperf(lab, c, s, fw, seconds, udp=True)}


def _iperf_flows(lab: Lab, c: str, s: str, fw: str, seconds: float) -> dict[str, Any]:
    """FLOWS TCP iperf3 runs at once, one per client address and server port; pps from
    the firewall's transmit counters, Mbit/s summed from the receivers."""
    servers = [lab.spawn(f"iperf3-s{i}", s, ["iperf3", "-s", "-1", "-B", SERVER,
                                              "-p", str(5201 + i)]) for i in range(FLOWS)]
    try:
        time.sleep(0.3)
        before = _fw_tx_packets(lab, fw)
        t0 = time.monotonic()
        clients = [subprocess.Popen(
            ns_argv(c, ["iperf3", "-c", SERVER, "-p", str(5201 + i), "-B", addr,
                        "-t", str(int(seconds)), "-J", "--connect-timeout", "3000"]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i, addr in enumerate(FLOW_CLIENTS)]
        outs = []
        for proc in clients:
            try:
                outs.append(proc.communicate(timeout=seconds + 20)[0])
            except subprocess.TimeoutExpired:
                proc.kill()
                outs.append(proc.communicate()[0])
        elapsed = time.monotonic() - t0
        forwarded = _fw_tx_packets(lab, fw) - before
    finally:
        for srv in servers:
            lab.stop(srv, grace=2.0)
    mbit = 0.0
    errors = []
    for out in outs:
        try:
            mbit += json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
        except (ValueError, KeyError, TypeError):
            errors.append(out[-200:])
    res: dict[str, Any] = {"flows": FLOWS, "forwarded_packets": forwarded,
                           "seconds": round(elapsed, 3),
                           "pps": round(forwarded / max(elapsed, 1e-9)), "mbit_s": round(mbit, 2)}
    if errors:
        res["errors"] = errors
    return res


def _start_daemon(lab: Lab, fw: str, argv: Sequence[str], name: str,
                  rules: str = RULES) -> tuple[Any, str]:
    conf = lab.path("pf.conf")
    conf.write_text(rules)
    ctl = str(lab.path(f"{name}.sock"))
    daemon = lab.spawn(name, fw, [*argv, "--rules", str(conf), "--syncdev", "sync0",
                                  "--control", ctl, "--queue", str(QUEUE)])
    from pfcluster.io.control import ControlError, request

    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:  # it answers once every queue is bound, rules in
        with contextlib.suppress(ControlError):
            if request(ctl, "info", timeout=2)["ok"]:
                return daemon, ctl
        if daemon.popen.poll() is not None:
            break
        time.sleep(0.1)
    lab.stop(daemon, grace=10.0)
    raise RuntimeError(f"{name} did not start: " + lab.log_tail(daemon))


def _worker_cpu(ctl: str, fallback_pid: int) -> list[float]:
    """CPU seconds so far of each worker (a single daemon is its own worker)."""
    from pfcluster.io.control import request

    with contextlib.suppress(Exception):
        data = request(ctl, "info", timeout=10)["data"]
        if "workers" in data:
            return [float(w["cpu_seconds"]) for w in data["workers"]]
    return [cpu_seconds(fallback_pid)]


def _workers_run(lab: Lab, c: str, s: str, fw: str, seconds: float, argv: Sequence[str],
                 workers: int) -> dict[str, Any]:
    daemon, ctl = _start_daemon(lab, fw, [*argv, "--workers", str(workers)],
                                f"daemon-w{workers}")
    try:
        cpu0 = _worker_cpu(ctl, daemon.popen.pid)
        res = _iperf_flows(lab, c, s, fw, seconds)
        cpu1 = _worker_cpu(ctl, daemon.popen.pid)
        res["worker_cpu_seconds"] = [round(b - a, 2) for a, b in zip(cpu0, cpu1)]
        res["worker_cpu_share"] = [round((b - a) / max(res["seconds"], 1e-9), 2)
                                   for a, b in zip(cpu0, cpu1)]
        from pfcluster.io.control import request

        with contextlib.suppress(Exception):
            info = request(ctl, "info", timeout=10)["data"]
            res["state_mismatch"] = info["pf"]["counters"].get("state-mismatch")
            res["worker_packets"] = [w["packets"] for w in info.get("workers", [])]
    finally:
        res_exit = lab.stop(daemon, grace=20.0)
    res["exit"] = res_exit
    return res


def _watching(lab: Lab, c: str, s: str, fw: str, seconds: float, argv: Sequence[str],
              rounds: int) -> dict[str, Any]:
    """The daemon without and with --metrics (scraped every second) and --pflog, back to
    back, the order swapped each round; pps medians and their ratio."""
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "watching": []}
    for r in range(rounds):
        order = ("plain", "watching") if r % 2 == 0 else ("watching", "plain")
        for variant in order:
            extra = [] if variant == "plain" else \
                ["--metrics", METRICS_AT, "--pflog", str(lab.path(f"pflog.{r}"))]
            daemon, ctl = _start_daemon(lab, fw, [*argv, *extra], f"{variant}{r}", RULES_LOG)
            scraper = lab.spawn(f"scraper{r}", fw, [sys.executable, "-c", SCRAPER, METRICS_AT]) \
                if variant == "watching" else None
            try:
                res = _measure(lab, c, s, fw, seconds)
                from pfcluster.io.control import request

                with contextlib.suppress(Exception):
                    res["pflog"] = request(ctl, "info")["data"].get("pflog")
                runs[variant].append(res)
            finally:
                if scraper is not None:
                    lab.stop(scraper)
                lab.stop(daemon, grace=10.0)
    out: dict[str, Any] = {"rounds": rounds, "runs": runs}
    for proto in ("tcp", "udp64"):
        med = {}
        for variant, results in runs.items():
            pps = sorted(x.get(proto, {}).get("pps") or 0 for x in results)
            med[variant] = pps[len(pps) // 2]
        out[f"{proto}_pps_median"] = med
        if med["plain"]:
            out[f"{proto}_watching_vs_plain"] = round(med["watching"] / med["plain"], 3)
    return out


def run_bench(seconds: float = 3.0, daemon_argv: Sequence[str] | None = None,
              kernel_baseline: bool = True, workers: bool = True,
              watching: int = 0) -> dict[str, Any]:
    """The three measurements in one lab; raises if the lab cannot be built."""
    if daemon_argv is None:
        daemon_argv = [sys.executable, "-m", "pfcluster.cli.main", "daemon"]
    figures: dict[str, Any] = {"seconds": seconds, "mtu": 1500, "offloads": "gro/gso/tso off",
                               "queue": QUEUE}
    with Lab() as lab:
        c, fw, s, p = (lab.add_ns(r) for r in ("bc", "bfw", "bs", "bp"))
        sysctl(fw, {"net.ipv4.ip_forward": 1})
        _veth(c, "eth0", fw, "eth0", f"{CLIENT}/24", f"{FW}/24")
        _veth(fw, "eth1", s, "eth0", "203.0.113.1/24", f"{SERVER}/24")
        _veth(fw, "sync0", p, "sync0", "192.0.2.1/24", "192.0.2.2/24")
        ns_run(c, ["ip", "route", "replace", "default", "via", FW])
        for addr in FLOW_CLIENTS:
            ns_run(c, ["ip", "addr", "add", f"{addr}/24", "dev", "eth0"])
        ns_run(s, ["ip", "route", "replace", "default", "via", "203.0.113.1"])

        if kernel_baseline:
            figures["kernel"] = _measure(lab, c, s, fw, seconds)

        # (b) the same chain, drained by an accept-everything consumer: the python
        # netfilterqueue package (the baseline), then our own binding (io/nfq.py:
        # 256-byte copies, one verdict message per 32 packets)
        rules = IptablesRules(QUEUE, ["sync0", "lo"], prefix=["ip", "netns", "exec", fw])
        for key, argv in (
            ("accept_all", [sys.executable, "-c", ACCEPT_ALL, str(QUEUE)]),
            ("accept_all_nfq", [sys.executable, "-m", "pfcluster.io.nfq", "accept-all",
                                "--queue", str(QUEUE)]),
        ):
            consumer = lab.spawn(key, fw, argv)
            try:
                assert consumer.log is not None
                if not _wait_ready(consumer.log, "ready", 10):
                    raise RuntimeError(f"{key} consumer did not start: "
                                       + lab.log_tail(consumer))
                rules.install()
                figures[key] = _measure(lab, c, s, fw, seconds)
            finally:
                rules.remove()
                lab.stop(consumer)

        # (a) through the daemon
        daemon, ctl = _start_daemon(lab, fw, daemon_argv, "daemon")
        try:
            cpu0 = cpu_seconds(daemon.popen.pid)
            figures["daemon"] = _measure(lab, c, s, fw, seconds)
            figures["daemon"]["cpu_seconds"] = round(cpu_seconds(daemon.popen.pid) - cpu0, 2)
            from pfcluster.io.control import request

            with contextlib.suppress(Exception):
                info = request(ctl, "info")["data"]
                figures["daemon"]["dataplane"] = info.get("dataplane")
        finally:
            figures["daemon_exit"] = lab.stop(daemon, grace=10.0)

        # (a') the daemon without and with --metrics and --pflog, `watching` rounds
        if watching:
            figures["watching"] = _watching(lab, c, s, fw, seconds, daemon_argv, watching)

        # (c) FLOWS flows through 1 worker, then through 2
        if workers:
            one = figures["workers_1"] = _workers_run(lab, c, s, fw, seconds, daemon_argv, 1)
            two = figures["workers_2"] = _workers_run(lab, c, s, fw, seconds, daemon_argv, 2)
            if one.get("pps") and two.get("pps"):
                figures["workers_scaling"] = round(two["pps"] / one["pps"], 3)
    for proto in ("tcp", "udp64"):
        a = figures.get("daemon", {}).get(proto, {}).get("pps")
        b = figures.get("accept_all", {}).get(proto, {}).get("pps")
        if a and b:
            figures[f"{proto}_daemon_vs_accept_all"] = round(a / b, 3)
        b2 = figures.get("accept_all_nfq", {}).get(proto, {}).get("pps")
        if a and b2:
            figures[f"{proto}_daemon_vs_accept_all_nfq"] = round(a / b2, 3)
    return figures


def run(seconds: float = 3.0, **kwargs: Any) -> dict[str, Any]:
    """Entry point for `pfcluster bench daemon`."""
    return run_bench(seconds, **kwargs)
