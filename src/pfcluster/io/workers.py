"""`pfcluster daemon --workers N`: one firewall, N processes, all cores.

The supervisor holds no state table. It checks the rules, starts N worker daemons (each a
whole `Daemon` on queue base+i, pfsync node hostid+i, with a sibling bus between them; see
io/siblings.py and docs/workers.md), waits until every worker has its queue bound, then
installs one iptables chain whose NFQUEUE target spreads packets with `--queue-balance`.
The kernel's balance hash is symmetric in the address pair, so both directions of a flow
meet the same worker, and that worker's pf sees the whole conversation.

It serves the control socket as one firewall: `info` sums the workers' counters (the
state table is the same in every worker, so its figures come from worker 0), `states` and
`rules` and `anchor show` come from worker 0, `anchor load|flush` go to every worker,
`kill` goes to worker 0 (its DELs reach the siblings and the
peers like any pfsync DEL), `flush` and `reload` go to every worker.

Fail closed, as the single daemon: a worker that dies leaves its queue unread, so the
kernel drops its share of the traffic (no --queue-bypass) until the supervisor has started
it again; the new worker gets its table back by bulk update. A worker that dies again and
again stops the whole firewall, rules left in place. Stopping the supervisor stops the
workers and leaves the rules; only fail_open removes them, before the queues go.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from pfcluster.io.config import DaemonConfig, worker_config
from pfcluster.io.control import ControlError, request
from pfcluster.io.iptables import IptablesError, IptablesRules
from pfcluster.io.keyfile import load_key_file
from pfcluster.io.loop import (
    SetupError,
    leave_rules,
    load_ruleset,
    open_control,
    open_metrics,
    skip_ifaces,
    translates,
)
from pfcluster.io.sdnotify import sd_notify
from pfcluster.io.signals import SignalWakeup
from pfcluster.io.vrrp import TrackFile, Transitions, notify_request, syncok_answer
from pfcluster.pf import pfctl
from pfcluster.pf.state import new_creatorid
from pfcluster.procfs import cpu_seconds

log = logging.getLogger("pfcluster.workers")

K_LISTEN, K_CLIENT, K_SIGNAL, K_METRICS, K_MCLIENT = range(5)
START_TIMEOUT = 30.0
POLL = 0.25
MAX_RESTARTS = 5  # per worker within RESTART_WINDOW, then the firewall stops (closed)
RESTART_WINDOW = 60.0
STOP_GRACE = 10.0
# Figures a table-wide view takes from worker 0 instead of summing: every worker holds
# the same table, and a sum would count each state N times.
TABLE_KEYS = frozenset({"current", "limit", "running_seconds", "peers"})


def worker_argv(cfg: DaemonConfig, index: int, hostid: int) -> list[str]:
    """The flags that make `pfcluster daemon` worker `index` of `cfg`'s firewall."""
    argv = ["--rules", cfg.rules, "--syncdev", cfg.syncdev, "--maxupd", str(cfg.maxupd),
            "--defer" if cfg.defer else "--no-defer", "--dialect", cfg.dialect,
            "--protocol", cfg.protocol, "--merge", cfg.merge, "--queue", str(cfg.queue),
            "--workers", str(cfg.workers), "--control", cfg.control,
            "--fail-open" if cfg.fail_open else "--fail-closed", "--hostid", hex(hostid),
            "--syslog" if cfg.syslog else "--stderr", "--copy-range", str(cfg.copy_range),
            "--worker-index", str(index)]
    if cfg.syncpeer:
        argv += ["--syncpeer", cfg.syncpeer]
    if cfg.syncgroup6:
        argv += ["--syncgroup6", cfg.syncgroup6]
    if cfg.pflog:  # each worker writes FILE.w<index> (see config.worker_config)
        argv += ["--pflog", cfg.pflog, "--pflog-size", str(cfg.pflog_size),
                 "--pflog-rate", str(cfg.pflog_rate)]
    if cfg.sync_key:
        argv += ["--sync-key", cfg.sync_key]
    if cfg.verbose:
        argv.append("-v")
    return argv


def sum_figures(parts: Sequence[Any]) -> Any:
    """Sum dicts of counters leaf by leaf; max_* keys take the maximum, table-wide keys
    (TABLE_KEYS) and non-numbers the first part's value."""
    first = parts[0]
    if isinstance(first, dict):
        out: dict[str, Any] = {}
        for key, value in first.items():
            values = [p.get(key) for p in parts if isinstance(p, dict) and key in p]
            if key in TABLE_KEYS or not values:
                out[key] = value
            elif key.startswith("max_"):
                out[key] = max((v for v in values if isinstance(v, (int, float))), default=value)
            else:
                out[key] = sum_figures(values)
        return out
    if isinstance(first, bool) or not isinstance(first, (int, float)):
        return first
    return sum(p for p in parts if isinstance(p, (int, float)) and not isinstance(p, bool))


class Worker:
    """One worker process and what the supervisor knows of it."""

    __slots__ = ("cfg", "index", "popen", "restarts")

    def __init__(self, cfg: DaemonConfig, index: int) -> None:
        self.cfg = cfg
        self.index = index
        self.popen: subprocess.Popen[bytes] | None = None
        self.restarts: list[float] = []

    @property
    def control(self) -> str:
        return self.cfg.control


class Supervisor:
    """Runs the workers of one firewall; see the module docstring."""

    def __init__(self, cfg: DaemonConfig, *, install_iptables: bool = True,
                 command: Sequence[str] | None = None) -> None:
        if cfg.workers < 2 or cfg.worker is not None:
            raise ValueError("a supervisor runs 2 or more workers")
        self.cfg = cfg
        self.install_iptables = install_iptables
        self.command = list(command or [sys.executable, "-m", "pfcluster.cli.main", "daemon"])
        self.ruleset = load_ruleset(cfg.rules)  # a broken file stops us before anything
        if cfg.sync_key:  # so does an unusable sync key, before any worker starts
            load_key_file(cfg.sync_key)
        self.hostid = cfg.hostid or new_creatorid()
        self.workers = [Worker(worker_config(cfg, i, self.hostid), i)
                        for i in range(cfg.workers)]
        self.sel = selectors.DefaultSelector()
        self.signals = SignalWakeup()
        self.control: Any = None
        self.metrics: Any = None  # --metrics: one endpoint, the workers' figures summed
        self.iptables: IptablesRules | None = None
        self.stop_signal: int | None = None
        self.status = 0
        self.started = time.monotonic()
        # the firewall's keepalived track file: the workers' sync_ok, polled
        self.track = TrackFile(cfg.track_file, cfg.track_demote)
        self.vrrp = Transitions()
        self.next_track = 0.0

    # --- workers ---------------------------------------------------------------------

    def _spawn(self, w: Worker) -> None:
        argv = [*self.command, *worker_argv(self.cfg, w.index, self.hostid)]
        w.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        log.info("worker %d started: pid %d, queue %d, hostid %08x", w.index, w.popen.pid,
                 w.cfg.queue, w.cfg.hostid or 0)

    def _wait_ready(self, w: Worker, deadline: float) -> None:
        """Until the worker answers on its control socket (it serves requests only once
        its queue is bound), or it exits, or time runs out."""
        assert w.popen is not None
        while time.monotonic() < deadline:
            rc = w.popen.poll()
            if rc is not None:
                raise SetupError(f"worker {w.index} exited with status {rc} while starting "
                                 "(its error is above)")
            with contextlib.suppress(ControlError):
                if request(w.control, "info", timeout=1.0).get("ok"):
                    return
            time.sleep(0.05)
        raise SetupError(f"worker {w.index} did not start within {START_TIMEOUT:.0f} s")

    def _stop_workers(self) -> None:
        for w in self.workers:
            if w.popen is not None and w.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for w in self.workers:
            if w.popen is None:
                continue
            try:
                w.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop; killed", w.index)
                w.popen.kill()
                w.popen.wait(5)

    def _check_workers(self, now: float) -> None:
        """Start again a worker that died (its queue drops meanwhile); one that keeps
        dying stops the firewall, closed."""
        for w in self.workers:
            if w.popen is None or (rc := w.popen.poll()) is None:
                continue
            w.restarts = [t for t in w.restarts if now - t < RESTART_WINDOW]
            if len(w.restarts) >= MAX_RESTARTS:
                log.error("worker %d exited with status %s, %d times in %.0f s: stopping "
                          "(fail-closed: the rules stay)", w.index, rc, len(w.restarts) + 1,
                          RESTART_WINDOW)
                self.stop_signal = signal.SIGTERM
                self.status = 1
                return
            log.error("worker %d exited with status %s; its queue drops until it is back: "
                      "restarting", w.index, rc)
            w.restarts.append(now)
            self._spawn(w)

    # --- setup / loop / teardown -----------------------------------------------------

    def run(self) -> int:
        try:
            self.setup()
            self.loop()
        finally:
            self.teardown()
        return self.status

    def setup(self) -> None:
        if translates(self.ruleset):
            raise SetupError("the rules translate addresses (nat-to/rdr-to): --workers is not "
                             "supported with translation yet; run one process")
        cfg = self.cfg
        self.track.write(False)
        self.signals.install(self.sel, (K_SIGNAL, None))
        self.control = open_control(cfg.control, self.handle_request)
        self.sel.register(self.control, selectors.EVENT_READ, (K_LISTEN, None))
        self.metrics = open_metrics(cfg, self.sel, self._figures, K_METRICS)
        for w in self.workers:
            self._spawn(w)
        deadline = time.monotonic() + START_TIMEOUT
        for w in self.workers:
            self._wait_ready(w, deadline)
        if self.install_iptables:  # every queue is bound: now the kernel may use them
            rules = IptablesRules(cfg.queue, skip_ifaces(cfg, self.ruleset), cfg.fail_open,
                                  balance=cfg.workers)
            try:
                rules.install()
            except IptablesError as exc:
                if cfg.fail_open:
                    with contextlib.suppress(Exception):
                        rules.remove()
                raise SetupError(f"iptables: {exc}") from exc
            self.iptables = rules
            log.info("iptables: chain %s installed (queues %d..%d balanced, %s)", rules.chain,
                     cfg.queue, cfg.queue + cfg.workers - 1,
                     "fail-open" if cfg.fail_open else "fail-closed")
        sd_notify(f"READY=1\nMAINPID={os.getpid()}")
        log.info("pfcluster daemon up: %d workers, queues %d..%d, hostid %08x..., control %s",
                 cfg.workers, cfg.queue, cfg.queue + cfg.workers - 1, self.hostid, cfg.control)

    def loop(self) -> None:
        while self.stop_signal is None:
            for key, mask in self.sel.select(POLL):
                kind, obj = key.data
                if kind == K_LISTEN:
                    self.control.accept_into(self.sel, K_CLIENT)
                elif kind == K_CLIENT:
                    self.control.service(self.sel, obj, mask, K_CLIENT)
                elif kind == K_SIGNAL:
                    self.signals.drain()
                elif kind == K_METRICS:
                    self.metrics.accept_into(self.sel, K_MCLIENT)
                elif kind == K_MCLIENT:
                    self.metrics.service(self.sel, obj, mask, K_MCLIENT)
            self._handle_signals()
            if self.stop_signal is None:
                now = time.monotonic()
                self._check_workers(now)
                if self.track.path is not None and now >= self.next_track:
                    self.next_track = now + 1.0
                    self.track.write(self.sync_ok())

    def _handle_signals(self) -> None:
        sig = self.signals.take(self.reload)
        if sig is not None:
            log.info("%s: shutting down %d workers", signal.Signals(sig).name,
                     len(self.workers))
            self.stop_signal = sig

    def teardown(self) -> None:
        self.track.write(False)
        sd_notify("STOPPING=1")
        leave_rules(self.iptables, self.cfg)  # fail_open: before the queues go
        self._stop_workers()
        if self.control is not None:
            with contextlib.suppress(Exception):
                self.control.close()
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.close(self.sel)
        self.signals.restore()
        self.sel.close()

    # --- control -------------------------------------------------------------------

    def _ask(self, w: Worker, cmd: str, **args: Any) -> dict[str, Any]:
        try:
            return request(w.control, cmd, timeout=10.0, **args)
        except ControlError as exc:
            return {"ok": False, "error": f"worker {w.index}: {exc}"}

    def _ask_all(self, cmd: str, **args: Any) -> list[dict[str, Any]]:
        return [self._ask(w, cmd, **args) for w in self.workers]

    def reload(self) -> dict[str, Any]:
        try:
            ruleset = load_ruleset(self.cfg.rules)
        except Exception as exc:  # RuleSyntaxError, OSError: old rules stay everywhere
            return {"ok": False, "error": str(exc)}
        answers = self._ask_all("reload")
        failed = [a["error"] for a in answers if not a.get("ok")]
        old_skip = skip_ifaces(self.cfg, self.ruleset)
        self.ruleset = ruleset
        new_skip = skip_ifaces(self.cfg, ruleset)
        if self.iptables is not None and new_skip != old_skip:
            try:
                self.iptables.update_skip(new_skip)
            except Exception as exc:
                log.error("iptables skip update failed: %s", exc)
        if failed:
            return {"ok": False, "error": "; ".join(failed)}
        return answers[0]

    def sync_ok(self) -> bool:
        """Every worker answers and has its bulk update (one that is down: false)."""
        return all(a.get("ok") and a["data"]["sync_ok"] for a in self._ask_all("syncok"))

    def info(self) -> dict[str, Any]:
        answers = self._ask_all("info")
        datas = [a["data"] for a in answers if a.get("ok")]
        if len(datas) != len(answers):
            errors = [a.get("error", "?") for a in answers if not a.get("ok")]
            return {"ok": False, "error": "; ".join(errors)}
        now = time.monotonic()
        data = {
            "pf": sum_figures([d["pf"] for d in datas]),
            "pfsync": sum_figures([d["pfsync"] for d in datas]),
            "dataplane": sum_figures([d["dataplane"] for d in datas]),
            "sync_ok": all(d["sync_ok"] for d in datas),
            "states": datas[0]["states"],
            **{key: sum_figures([d[key] for d in datas])
               for key in ("deferred_packets", "defer_seconds", "peers", "pflog")
               if all(key in d for d in datas)},
            "uptime": round(now - self.started, 3),
            "pid": os.getpid(),
            "workers": [self._worker_line(w, d) for w, d in zip(self.workers, datas)],
            "vrrp": self.vrrp.as_dict(),
        }
        text = pfctl.format_daemon_info_data(data["pf"], data["pfsync"], data["sync_ok"],
                                             data["dataplane"])
        text.append("workers")
        for wl in data["workers"]:
            text.append(f"  {wl['index']:<3} pid {wl['pid']:<8} queue {wl['queue']:<6} "
                        f"hostid {wl['hostid']}  packets {wl['packets']:>12}  "
                        f"cpu {wl['cpu_seconds']:>9.2f} s  sync_ok "
                        f"{str(wl['sync_ok']).lower()}")
        text.extend(self.vrrp.lines())
        return {"ok": True, "text": text, "data": data}

    def _figures(self) -> dict[str, Any]:
        """What a scrape reads: `info`'s data (the workers asked in turn, as `ctl info`)."""
        answer = self.info()
        if not answer["ok"]:
            raise RuntimeError(answer["error"])
        data: dict[str, Any] = answer["data"]
        return data

    def _worker_line(self, w: Worker, d: dict[str, Any]) -> dict[str, Any]:
        return {"index": w.index, "pid": d.get("pid"), "queue": w.cfg.queue,
                "hostid": d["pf"].get("hostid"),
                "packets": d["dataplane"].get("packets", 0), "sync_ok": d["sync_ok"],
                "cpu_seconds": cpu_seconds(d.get("pid")),
                "restarts": len(w.restarts)}

    def handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        args = {k: v for k, v in req.items() if k != "cmd"}
        if cmd == "info":
            return self.info()
        if cmd == "sources":
            # source nodes are each worker's own (pfsync carries none): all of them
            answers = self._ask_all(cmd, **args)
            if not all(a.get("ok") for a in answers):
                return {"ok": False, "error": "; ".join(a.get("error", "?") for a in answers
                                                        if not a.get("ok"))}
            return {"ok": True, "text": [t for a in answers for t in a["text"]],
                    "data": [d for a in answers for d in a["data"]]}
        if cmd in ("states", "rules", "kill", "tables") or (
                cmd == "table" and args.get("op") in ("show", "test")):
            return self._ask(self.workers[0], cmd, **args)
        if cmd == "table":  # every worker holds the tables: each applies the change
            answers = self._ask_all(cmd, **args)
            bad = [a.get("error", "?") for a in answers if not a.get("ok")]
            if bad:  # the same input fails the same way everywhere: one message
                return {"ok": False, "error": "; ".join(dict.fromkeys(bad))}
            return answers[0]
        if cmd == "flush":
            answers = self._ask_all(cmd, **args)
            if not all(a.get("ok") for a in answers):
                return {"ok": False,
                        "error": "; ".join(a.get("error", "?") for a in answers
                                           if not a.get("ok"))}
            n = answers[0]["data"]["flushed"]
            return {"ok": True, "text": [f"{n} states cleared"], "data": {"flushed": n}}
        if cmd == "anchor":
            # show/list from worker 0; load/flush to every worker (each reads the file)
            if args.get("op") in ("show", "list"):
                return self._ask(self.workers[0], cmd, **args)
            answers = self._ask_all(cmd, **args)
            failed = [a.get("error", "?") for a in answers if not a.get("ok")]
            if failed:
                return {"ok": False, "error": "; ".join(dict.fromkeys(failed))}
            return answers[0]
        if cmd == "reload":
            return self.reload()
        if cmd == "syncok":
            return syncok_answer(self.sync_ok())
        if cmd == "notify":
            return notify_request(req, self.vrrp, self.sync_ok())
        return {"ok": False, "error": f"unknown command {cmd!r}"}
