"""The daemon: one selectors loop over NFQUEUE, the pfsync socket(s), the control socket
and a signal wakeup fd; the timeout is the core's next deadline (capped at 1 s).

Everything the core needs from the world is passed in here and nowhere else: `now` is
time.monotonic() read once per wakeup, frames go in through `engine.receive`, packets
through `filter.test`; the engine's output frames and released deferrals are collected
after every wakeup (`_flush`). No thread touches the packet path; signal handlers only
record the signal (the wakeup fd makes select return), and the loop acts on it.

Start order matters for a firewall: the queue is bound before the iptables rules are
touched (no packet is queued to nobody, and a queue another process holds stops us before
we touch anything), then the chain is (re)written in one atomic commit over whatever a
previous run left (io/iptables.py). Stop: fail closed by default — the rules stay, without
--queue-bypass, so once the queue is unbound the kernel drops what nobody reads; a restarted
daemon takes the queue over with no unfiltered instant and gets its states back from its
peers by bulk update. Only `fail_open` removes the rules on exit (before unbinding, so no
packet is queued to nobody); `pfcluster daemon --uninstall` removes them for good.

Errors the user can fix (queue already bound, no such sync interface, control socket in
use or in a missing directory, iptables refusing the rules) raise SetupError, whose
message is the one line the command prints; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from pfcluster.io.anchorctl import anchor_request
from pfcluster.io.config import MAX_WORKERS, DaemonConfig
from pfcluster.io.control import ControlError, ControlServer
from pfcluster.io.holdtimes import HoldTimes
from pfcluster.io.iptables import IptablesError, IptablesRules, dup_rules, queue_owner
from pfcluster.io.keyfile import load_key_file
from pfcluster.io.nfq import MAX_COPY_RANGE
from pfcluster.io.sdnotify import sd_notify
from pfcluster.io.siblings import SiblingBus
from pfcluster.io.signals import SignalWakeup
from pfcluster.io.syncsock import SyncSet, SyncSocket
from pfcluster.io.tablectl import kill_sources, table_request, tables_request
from pfcluster.io.vrrp import TrackFile, Transitions, notify_request, syncok_answer
from pfcluster.pf import pfctl
from pfcluster.pf.nat import NatSlice
from pfcluster.pf.srcnode import format_sources, sources_json
from pfcluster.pf.tables import DEFAULT_TABLE_ENTRIES, carry_over
from pfcluster.pfsync.api import SyncEngine
from pfcluster.pfsync.auth import Sealer, Verifier, overhead
from pfcluster.pfsync.events import Event, Released, SyncOk
from pfcluster.tuning import tune_gc

log = logging.getLogger("pfcluster.daemon")

MAX_TIMEOUT = 1.0
SYNC_MTU = 1500
AUTH_LOG_LINES = 10  # frames dropped for authentication logged per daemon, then counted

# selector keys' data: what kind of fd it is
K_QUEUE, K_SYNC, K_LISTEN, K_CLIENT, K_SIGNAL, K_BUS, K_METRICS, K_MCLIENT, K_IFADDR = range(9)


class SetupError(RuntimeError):
    """The daemon cannot start for a reason the user can fix; str() is one line naming
    the resource and the problem."""


def load_ruleset(path: str, ifaddrs: Any = None) -> Any:
    """The rules, with `em0`/`self`/`(em0)` read against `ifaddrs` (the host's, dumped
    now, when None)."""
    from pfcluster.pf.rules import load_rules

    return load_rules(path, ifaddrs if ifaddrs is not None else host_addresses())


def host_addresses() -> Any:
    """The host's interfaces and routes from netlink; none known if netlink refuses."""
    from pfcluster.io.ifwatch import host_ifaddrs
    from pfcluster.pf.ifaddrs import IfAddrs

    try:
        return host_ifaddrs()
    except Exception as exc:
        log.error("interface addresses: %s", exc)
        return IfAddrs()


def make_core(cfg: DaemonConfig, ruleset: Any, now: float) -> tuple[Any, SyncEngine]:
    """The real pf Filter and pfsync Engine (the core, sans I/O)."""
    from pfcluster.pf.filter import Filter
    from pfcluster.pfsync.engine import attach

    # pf seeds its state ids with the boot time; the core reads no clock, so we do. A
    # --workers firewall's worker i takes seconds * MAX_WORKERS + i: id spaces apart even
    # when its siblings read the clock in another second
    seed = int(time.time())
    if cfg.worker is not None:
        seed = seed * MAX_WORKERS + cfg.worker
    filt = Filter(ruleset, hostid=cfg.hostid, now=now, id_seed=seed)
    filt.nat.slice = NatSlice.parse(cfg.nat_slice)
    # a key's trailer (dialects whose EOF has no hmac field) must fit in the MTU too
    mtu = SYNC_MTU - (overhead(cfg.dialect) if cfg.sync_key else 0)
    engine = attach(filt, dialect=cfg.dialect, protocol=cfg.protocol, maxupd=cfg.maxupd,
                    mtu=mtu,
                    defer=cfg.defer and cfg.sync_enabled, merge=cfg.merge, now=now,
                    answers_bulk=not cfg.worker)  # one worker answers for the firewall
    return filt, engine


def translates(ruleset: Any) -> bool:
    """Whether a ruleset rewrites addresses (nat-to, rdr-to, binat-to, FreeBSD nat/rdr)
    or routes (route-to, reply-to): then the `in` test must run before routing (the
    PREROUTING layout), to rewrite the destination or mark the packet for its table."""
    if getattr(ruleset, "translation_rules", None) or getattr(ruleset, "route_targets", None):
        return True
    rules = list(getattr(ruleset, "rules", ()))
    for a in getattr(ruleset, "anchors", {}).values():
        rules.extend(a.rules)
    return any(getattr(r, "nat", None) is not None or getattr(r, "rdr", None) is not None
               for r in rules)


def scrubs(ruleset: Any) -> bool:
    """Whether any rule carries scrub options: then the whole packet is copied from the
    kernel (a rewritten verdict payload replaces the packet), but no PREROUTING layout."""
    rules = list(getattr(ruleset, "rules", ()))
    for a in getattr(ruleset, "anchors", {}).values():
        rules.extend(a.rules)
    return any(getattr(r, "scrub", None) is not None for r in rules)


def skip_ifaces(cfg: DaemonConfig, ruleset: Any) -> list[str]:
    """Interfaces whose packets are never queued: the sync link and pf.conf's `set skip`."""
    sync = [cfg.syncdev] if cfg.sync_enabled else []
    return [*sync, *sorted(getattr(ruleset, "skip_ifaces", ()))]


def leave_rules(rules: IptablesRules | None, cfg: DaemonConfig) -> None:
    """On exit: fail_open removes our rules (before the queues are unbound); fail closed
    leaves them, so the kernel drops what nobody reads, and says how to remove them."""
    if rules is None:
        return
    if cfg.fail_open:
        try:
            rules.remove()
            log.info("iptables: chain %s removed (fail-open)", rules.chain)
        except Exception as exc:
            log.error("iptables cleanup failed: %s", exc)
        return
    if cfg.workers > 1:
        queues = (f"queues {cfg.queue}..{cfg.queue + cfg.workers - 1} drop until daemons "
                  "bind them")
        again = f"--queue {cfg.queue} --workers {cfg.workers}"
    else:
        queues, again = f"queue {cfg.queue} drops until a daemon binds it", f"--queue {cfg.queue}"
    log.info("iptables: chain %s stays (fail-closed): %s again; `pfcluster daemon "
             "--uninstall %s` removes it", rules.chain, queues, again)


def open_control(path: str, handler: Callable[[dict[str, Any]], dict[str, Any]]
                 ) -> ControlServer:
    """The control socket, or a SetupError naming what is wrong with `path`."""
    try:
        return ControlServer(path, handler)
    except ControlError as exc:
        raise SetupError(f"control socket {exc}") from exc
    except FileNotFoundError as exc:
        raise SetupError(f"control socket {path}: directory "
                         f"{os.path.dirname(path) or '.'} does not exist") from exc
    except OSError as exc:
        raise SetupError(f"control socket {path}: {exc.strerror or exc}") from exc


def open_metrics(cfg: DaemonConfig, sel: selectors.BaseSelector,
                 source: Callable[[], dict[str, Any]], kind: int = K_METRICS) -> Any:
    """--metrics: the HTTP endpoint in `sel` (key data `(kind, None)`), or None."""
    if not cfg.metrics:
        return None
    from pfcluster.io.metrics import MetricsServer

    try:
        server = MetricsServer(cfg.metrics, source)
    except OSError as exc:
        raise SetupError(f"metrics {cfg.metrics}: {exc.strerror or exc}") from exc
    sel.register(server, selectors.EVENT_READ, (kind, None))
    host, port = server.address
    log.info("metrics: http://%s/metrics", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return server


def open_pflog(cfg: DaemonConfig) -> Any:
    """--pflog: the writer of logged packets, or None."""
    if not cfg.pflog:
        return None
    from pfcluster.io.pflog import PflogWriter

    try:
        return PflogWriter(cfg.pflog, max_bytes=cfg.pflog_size << 20, rate=cfg.pflog_rate)
    except OSError as exc:
        raise SetupError(f"pflog {exc}") from exc


class Daemon:
    """One firewall node. `core` and `loader` replace the real core in tests."""

    def __init__(
        self,
        cfg: DaemonConfig,
        *,
        core: Callable[[DaemonConfig, Any, float], tuple[Any, SyncEngine]] | None = None,
        loader: Callable[[str], Any] | None = None,
        install_iptables: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        # the host's interfaces and routes: rules read them for `(em0)`, `self`,
        # urpf-failed; netlink events keep them current (setup opens the watch)
        self.ifaddrs = host_addresses()
        self.ifwatch: Any = None
        # looked up at call time so a test can swap the module's make_core/load_ruleset
        self.loader = loader or (lambda path: load_ruleset(path, self.ifaddrs))
        self.clock = clock
        self.install_iptables = install_iptables
        self.started = clock()
        self.ruleset = self.loader(cfg.rules)  # a broken file stops us before touching anything
        # fixed for the daemon's life: translation needs the PREROUTING layout
        self.translating = translates(self.ruleset)
        self.scrubbing = scrubs(self.ruleset)  # whole packets copied (fixed, as above)
        self.filter, engine = (core or make_core)(cfg, self.ruleset, self.started)
        self.engine: SyncEngine = engine
        # --sync-key: every frame we send is sealed, every frame we receive verified
        # before the engine sees it (pfsync/auth.py); a bad key file stops us here
        self.sealer: Sealer | None = None
        self.verifier: Verifier | None = None
        self.auth_logged = 0
        if cfg.sync_key:
            keys = load_key_file(cfg.sync_key)
            self.sealer = Sealer(keys, self.filter.creatorid, cfg.dialect)
            self.verifier = Verifier(keys, cfg.dialect, own=self.filter.creatorid)
        self.sel = selectors.DefaultSelector()
        self.stop_signal: int | None = None
        self.signals = SignalWakeup()
        self.sync = SyncSet()
        self.bus: SiblingBus | None = None  # --workers: frames to and from the siblings
        self.dataplane: Any = None
        self.control: ControlServer | None = None
        self.iptables: IptablesRules | None = None
        self.replies: Any = None
        self.engine_errors = 0
        self.metrics: Any = None  # --metrics: io/metrics.MetricsServer
        self.pflog: Any = None  # --pflog: io/pflog.PflogWriter
        self.hold_times = HoldTimes()  # deferred packets' hold times
        self.track = TrackFile(cfg.track_file, cfg.track_demote)  # keepalived's view
        self.vrrp = Transitions()
        self.policy_routes: Any = None  # route-to: io/policyroute.PolicyRoutes

    # --- setup / teardown -----------------------------------------------------

    def skip_ifaces(self) -> list[str]:
        return skip_ifaces(self.cfg, self.ruleset)

    def setup(self) -> None:
        from pfcluster.io.dataplane import Dataplane, ReplySender

        cfg = self.cfg
        self.track.write(False)  # demoted until our bulk update is done
        self.signals.install(self.sel, (K_SIGNAL, None))
        if cfg.sync_enabled:
            self._open_sync()
        for s in self.sync.sockets:
            self.sel.register(s, selectors.EVENT_READ, (K_SYNC, s))
        if cfg.worker is not None:
            try:
                self.bus = SiblingBus(cfg.base_queue, cfg.worker, cfg.workers)
            except OSError as exc:
                raise SetupError(f"worker {cfg.worker}: sibling bus {exc.strerror or exc} "
                                 "(another firewall with the same --queue here?)") from exc
            self.sel.register(self.bus, selectors.EVENT_READ, (K_BUS, self.bus))
        self.control = open_control(cfg.control, self.handle_request)
        self.sel.register(self.control, selectors.EVENT_READ, (K_LISTEN, None))
        self.metrics = open_metrics(cfg, self.sel, lambda: self.counters(self.clock()))
        self.pflog = open_pflog(cfg)
        self._watch_addresses()
        try:
            self.replies = ReplySender()
        except OSError as exc:  # raw sockets: root (CAP_NET_RAW) needed
            raise SetupError(f"raw socket for pf's replies: {exc.strerror or exc}") from exc
        if self.translating:
            if cfg.workers > 1:
                raise SetupError("the rules translate addresses or route (nat-to/rdr-to/"
                                 "route-to/reply-to): --workers is not supported with them "
                                 "yet; run one process")
            self._learn_addresses()
        # the queue first: if another process holds it we stop here, its rules untouched
        try:
            self.dataplane = Dataplane(cfg.queue, self.filter, self.engine, self.replies,
                                       clock=self.clock, between_batches=self._between_batches,
                                       dispatch=self._dispatch,
                                       copy_range=MAX_COPY_RANGE
                                       if self.translating or self.scrubbing
                                       else cfg.copy_range,
                                       fail_open=cfg.fail_open, split_hooks=self.translating,
                                       pflog=self.pflog)
        except OSError as exc:
            owner = queue_owner(cfg.queue)
            if owner is not None:
                raise SetupError(f"NFQUEUE {cfg.queue} is already bound by another process "
                                 f"(netlink port {owner}); pick another --queue") from exc
            raise SetupError(f"cannot bind NFQUEUE {cfg.queue}: {exc}") from exc
        self.sel.register(self.dataplane.fileno(), selectors.EVENT_READ, (K_QUEUE, None))
        self._install_routes()
        if self.install_iptables and cfg.worker is None:  # a supervisor owns a worker's
            rules = IptablesRules(cfg.queue, self.skip_ifaces(), cfg.fail_open,
                                  nat=self.translating,
                                  dups=dup_rules(getattr(self.ruleset, "route_targets", ())))
            try:
                rules.install()  # one atomic commit over a previous run's chain
            except IptablesError as exc:
                if cfg.fail_open:  # what was committed goes; fail closed leaves it closed
                    with contextlib.suppress(Exception):
                        rules.remove()
                raise SetupError(f"iptables: {exc}") from exc
            self.iptables = rules
            log.info("iptables: chain %s installed (queue %d, %s)", self.iptables.chain,
                     cfg.queue, "fail-open" if cfg.fail_open else "fail-closed")
        now = self.clock()
        if cfg.sync_enabled:
            self.engine.start(now)  # bulk update request; sync_ok once answered
        self._flush()
        self.track.write(bool(self.engine.sync_ok))  # no pfsync: nothing to wait for
        if cfg.worker is None:  # the supervisor speaks for a --workers firewall
            sd_notify(f"READY=1\nMAINPID={os.getpid()}")
        log.info("pfcluster daemon up: syncdev %s, %s, dialect %s, protocol %s, queue %d, "
                 "control %s%s", cfg.syncdev,
                 f"peer {cfg.syncpeer}" if cfg.syncpeer else "multicast", cfg.dialect,
                 cfg.protocol, cfg.queue, cfg.control,
                 "" if cfg.worker is None else f", worker {cfg.worker} of {cfg.workers}")

    def _install_routes(self) -> None:
        """route-to/reply-to: the targets' ip rules and tables (io/policyroute.py),
        before iptables sends us the packets to mark."""
        targets = list(getattr(self.ruleset, "route_targets", ()))
        self.dataplane.route_targets = targets
        if not targets or not self.install_iptables or self.cfg.worker is not None:
            return
        from pfcluster.io.policyroute import PolicyRouteError, PolicyRoutes

        try:
            self.policy_routes = PolicyRoutes()
            self.policy_routes.install(targets)
        except (PolicyRouteError, OSError) as exc:
            raise SetupError(f"route-to: {exc}") from exc

    def _learn_addresses(self) -> None:
        """Interface addresses for `(em0)` pools, from the followed host view."""
        self.filter.nat.iface_addrs = self.ifaddrs.flat()

    def _watch_addresses(self) -> None:
        """Follow address and route changes (RTM_NEWADDR & co) in the loop. Without it
        the rules keep the addresses seen at start: logged, not fatal."""
        from pfcluster.io.ifwatch import IfWatch

        try:
            self.ifwatch = IfWatch(self.ifaddrs)
        except Exception as exc:
            log.error("netlink address events: %s (interface addresses not followed)", exc)
            return
        self.sel.register(self.ifwatch, selectors.EVENT_READ, (K_IFADDR, None))

    def _addresses_changed(self) -> None:
        if self.ifwatch.on_readable():
            log.info("interface addresses changed: %s", ", ".join(
                f"{name} {len(lst)}" for name, lst in sorted(self.ifaddrs.addrs.items())))
            if self.translating:
                self._learn_addresses()

    def _open_sync(self) -> None:
        cfg = self.cfg
        try:
            socket.if_nametoindex(cfg.syncdev)
        except OSError as exc:
            raise SetupError(f"syncdev {cfg.syncdev}: no such interface") from exc
        try:
            self.sync.sockets.append(SyncSocket(cfg.syncdev, peer=cfg.syncpeer))
            if cfg.syncgroup6:
                self.sync.sockets.append(SyncSocket(cfg.syncdev, group=cfg.syncgroup6))
        except OSError as exc:
            raise SetupError(f"syncdev {cfg.syncdev}: {exc.strerror or exc}") from exc

    def teardown(self) -> None:
        """Each step guarded. Fail closed: the iptables rules stay (the kernel drops what
        is queued to nobody); with fail_open they are removed first, before the queue is
        unbound. Held (deferred) packets get the engine's verdicts, the peers get what
        the engine still had queued, then the queue is unbound and the sockets closed."""
        self.track.write(False)  # keepalived moves the address away first
        if self.cfg.worker is None:
            sd_notify("STOPPING=1")
        leave_rules(self.iptables, self.cfg)
        if self.dataplane is not None:
            try:
                # deferred packets were passed by pf and only wait for a peer's ack: let
                # them go (pfsync does the same when it is destroyed); a verdict the
                # engine already made (drop after a peer's update) stands
                self.engine.release_all(self.clock())
                self._dispatch(self.engine.take_events())
            except Exception as exc:
                log.error("releasing deferred packets failed: %s", exc)
        if self.sync.sockets:
            try:
                # our last updates leave now, so a peer's copy (which a restarted daemon
                # gets back by bulk update) is as fresh as ours
                self.engine.flush(self.clock())
                self._send(self.engine.take_output())
            except Exception as exc:
                log.error("final pfsync flush failed: %s", exc)
        if self.dataplane is not None:
            with contextlib.suppress(Exception):
                self.dataplane.close()  # unbind: what the kernel still holds is dropped
        if self.policy_routes is not None:  # nothing is marked any more: unused now
            with contextlib.suppress(Exception):
                self.policy_routes.close()
        if self.control is not None:
            with contextlib.suppress(Exception):
                self.control.close()
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.close(self.sel)
        if self.pflog is not None:
            self.pflog.flush()
            self.pflog.close()
        self.sync.close()
        if self.bus is not None:
            self.bus.close()
        if self.replies is not None:
            self.replies.close()
        if self.ifwatch is not None:
            self.ifwatch.close()
        self.signals.restore()
        self.sel.close()

    def _dispatch(self, events: list[Event]) -> None:
        """The engine's events, in order: held packets' verdicts, sync_ok, log lines."""
        for ev in events:
            if isinstance(ev, Released):
                if self.dataplane is not None:
                    self.dataplane.apply_release(ev.handle, ev.accept)
                if ev.since:
                    self.hold_times.observe(self.clock() - ev.since)
            elif isinstance(ev, SyncOk):
                self.track.write(ev.ok)
                if ev.ok:
                    log.info("pfsync: sync_ok (bulk update done or not needed)")
                else:
                    log.info("pfsync: sync_ok cleared, waiting for a bulk update")
            else:
                log.info("%s", ev.text)

    # --- the loop ---------------------------------------------------------------

    def run(self) -> int:
        """Set up, loop until SIGTERM/SIGINT, tear down. Returns the exit status."""
        tune_gc()
        try:
            self.setup()
            self.loop()
        finally:
            self.teardown()
        return 0

    def timeout(self, now: float) -> float:
        deadline = now + MAX_TIMEOUT
        for d in (self.engine.next_deadline(), self.filter.next_deadline()):
            if d is not None and d < deadline:
                deadline = d
        return max(0.0, deadline - now)

    def loop(self) -> None:
        sel = self.sel
        while self.stop_signal is None:
            now = self.clock()
            events = sel.select(self.timeout(now))
            # Peer updates first: packets decided after them see the freshest windows.
            events.sort(key=lambda ev: ev[0].data[0] != K_SYNC)
            for key, mask in events:
                kind, obj = key.data
                if kind == K_QUEUE:
                    self.dataplane.on_readable()
                elif kind == K_SYNC:
                    self._sync_readable(obj)
                elif kind == K_LISTEN:
                    assert self.control is not None
                    self.control.accept_into(sel, K_CLIENT)
                elif kind == K_CLIENT:
                    assert self.control is not None
                    self.control.service(sel, obj, mask, K_CLIENT)
                elif kind == K_BUS:
                    self._bus_readable()
                elif kind == K_SIGNAL:
                    self.signals.drain()
                elif kind == K_METRICS:
                    self.metrics.accept_into(sel, K_MCLIENT)
                elif kind == K_MCLIENT:
                    self.metrics.service(sel, obj, mask, K_MCLIENT)
                elif kind == K_IFADDR:
                    self._addresses_changed()
            now = self.clock()
            d = self.engine.next_deadline()
            if d is not None and d <= now:
                self.engine.timer(now)
            d = self.filter.next_deadline()
            if d is not None and d <= now:
                self.filter.expire(now)
            if self.dataplane is not None:
                self.dataplane.expire_frags(now)
            self._flush()
            if self.pflog is not None and self.pflog.dirty:
                self.pflog.flush()
            self._handle_signals()

    def _flush(self) -> None:
        """Send what the engine queued, and act on what it reported."""
        self._send(self.engine.take_output())
        events = self.engine.take_events()
        if events:
            self._dispatch(events)

    def _send(self, frames: list[bytes]) -> None:
        bus = self.bus
        sealer = self.sealer
        for frame in frames:
            if sealer is not None:
                frame = sealer.seal(frame)
            self.sync.send(frame)
            if bus is not None:
                bus.send(frame)

    def _between_batches(self) -> None:
        """Between two mini-batches of packets: our frames out, the peers' frames in."""
        self._flush()
        for sock in self.sync.sockets:
            self._sync_readable(sock)
        if self.bus is not None:
            self._bus_readable()
        self._flush()

    def _bus_readable(self) -> None:
        """Frames from the other workers of this firewall (see io/siblings.py)."""
        assert self.bus is not None
        frames = self.bus.receive()
        if not frames:
            return
        now = self.clock()
        for payload in frames:
            self._receive(payload, now, "sibling", sibling=True)
        self.engine.end_of_batch(now)

    def _sync_readable(self, sock: SyncSocket) -> None:
        now = self.clock()
        frames = sock.receive()
        for frame in frames:
            self._receive(frame.payload, now, frame.src, ttl=frame.ttl)
        if frames:
            # like pfsync's softnet run after input: immediate work (INS_ACK for a peer's
            # deferred packet, update requests) leaves now, not at the 1 s pace
            self.engine.end_of_batch(now)

    def _receive(self, payload: bytes, now: float, src: str, *, ttl: int = 255,
                 sibling: bool = False) -> None:
        verifier = self.verifier
        if verifier is not None:
            verdict, body = verifier.check(payload)
            if body is None:  # no, unknown or bad MAC, or a replay: no state touched
                self.auth_logged += 1
                if self.auth_logged <= AUTH_LOG_LINES:
                    log.warning("pfsync: frame from %s dropped: authentication %s%s", src,
                                verdict, " (further drops only counted)"
                                if self.auth_logged == AUTH_LOG_LINES else "")
                return
            payload = body
        try:
            self.engine.receive(payload, now, src=src, ttl=ttl, sibling=sibling)
        except Exception:  # the engine promises counters, not exceptions; be sure
            self.engine_errors += 1
            if self.engine_errors <= 10:
                log.exception("pfsync frame from %s dropped after an internal error", src)

    def _handle_signals(self) -> None:
        sig = self.signals.take(self.hangup)
        if sig is not None:
            log.info("%s: shutting down", signal.Signals(sig).name)
            self.stop_signal = sig

    # --- control -------------------------------------------------------------------

    def hangup(self) -> dict[str, Any]:
        """SIGHUP: a new pflog file (after logrotate moved the old one), then reload."""
        if self.pflog is not None:
            self.pflog.reopen()
        return self.reload()

    def reload(self) -> dict[str, Any]:
        """Parse the rules (and the sync key file) again; swap only if both are valid.
        New keys keep the replay windows: a sender's counter outlives its key."""
        try:
            ruleset = self.loader(self.cfg.rules)
            keys = load_key_file(self.cfg.sync_key) if self.cfg.sync_key else None
        except Exception as exc:  # RuleSyntaxError, OSError, KeyError_: old ones stay
            return {"ok": False, "error": str(exc)}
        old_t = [(t.ident, t.dup) for t in getattr(self.ruleset, "route_targets", ())]
        if [(t.ident, t.dup) for t in getattr(ruleset, "route_targets", ())] != old_t:
            return {"ok": False, "error": "the new rules' route-to/reply-to/dup-to targets differ "
                    "from those the daemon installed at start: restart it with them (the old "
                    "rules stay)"}
        if translates(ruleset) and not self.translating:
            return {"ok": False, "error": "the new rules translate addresses, which needs the "
                    "PREROUTING hook this daemon did not start with: restart it with them "
                    "(the old rules stay)"}
        if scrubs(ruleset) and not self.scrubbing:
            return {"ok": False, "error": "the new rules scrub packets, which needs whole "
                    "packets copied, and this daemon did not start with scrub rules: restart "
                    "it with them (the old rules stay)"}
        if keys is not None and self.sealer is not None and self.verifier is not None:
            self.sealer.keys = self.verifier.keys = keys
            log.info("sync key reloaded: sending with key %d, accepting %s", keys.send_id,
                     ", ".join(map(str, keys.ids)))
        carry_over(getattr(self.ruleset, "tables", {}), ruleset.tables)  # as pfctl -f
        self.filter.load(ruleset)
        if self.dataplane is not None:
            self.dataplane.route_targets = list(getattr(ruleset, "route_targets", ()))
        if self.translating:
            self._learn_addresses()
        old_skip = self.skip_ifaces()
        self.ruleset = ruleset
        if self.iptables is not None and self.skip_ifaces() != old_skip:
            try:
                self.iptables.update_skip(self.skip_ifaces())
            except Exception as exc:
                log.error("iptables skip update failed: %s", exc)
        n = len(getattr(ruleset, "rules", ()))
        log.info("rules reloaded from %s: %d rules", self.cfg.rules, n)
        return {"ok": True, "text": [f"reloaded {self.cfg.rules}: {n} rules"],
                "data": {"rules": n}}

    def table(self, req: dict[str, Any], now: float) -> dict[str, Any]:
        """`ctl table NAME OP`: the rules see the change at once (same Table objects);
        with `kill`, the states from what the table now matches go too."""
        tables = self.ruleset.tables
        limit = self.ruleset.limits.get("table-entries", DEFAULT_TABLE_ENTRIES)
        answer = table_request(tables, req, limit)
        if answer["ok"] and req.get("kill") and req.get("name") in tables:
            n = kill_sources(self.filter, tables[req["name"]], now)
            self.engine.end_of_batch(now)
            self._flush()
            answer["messages"].append(f"killed {n} states from addresses in <{req['name']}>.")
            answer["data"]["killed"] = n
        if answer["ok"] and req.get("op") not in ("show", "test"):
            log.info("table <%s> %s: %s", req.get("name"), req.get("op"),
                     " ".join(answer["messages"]))
        return answer

    def counters(self, now: float) -> dict[str, Any]:
        pfsync = dict(self.engine.counters)
        for key, value in self.sync.counters().items():
            if key in ("badttl", "badif"):  # counted here or by the engine: the sum is true
                pfsync[key] = pfsync.get(key, 0) + value
            else:
                pfsync[f"sock_{key}"] = value
        pfsync["engine_errors"] = self.engine_errors
        if self.verifier is not None:  # badauth: the engine's (never set) + ours
            for key, value in self.verifier.counters.items():
                pfsync[key] = pfsync.get(key, 0) + value
        if self.bus is not None:
            pfsync.update(self.bus.counters.as_dict())
        seen = getattr(self.engine, "peer_seen", {})
        extra: dict[str, Any] = {
            "deferred_packets": self.dataplane.pending if self.dataplane else 0,
            "defer_seconds": self.hold_times.as_dict(),
            "peers": {
                "last_frame_seconds": {f"{cid:08x}": round(now - t, 3)
                                       for cid, t in seen.items()},
                "states": {f"{cid:08x}": n
                           for cid, n in self.filter.states.count_by_creator().items()},
            },
        }
        if self.pflog is not None:
            extra["pflog"] = self.pflog.counters()
        return {
            "pf": pfctl.counters_dict(self.filter, now),
            "pfsync": pfsync,
            "dataplane": self.dataplane.counters.as_dict() if self.dataplane else {},
            "sync_ok": bool(self.engine.sync_ok),
            "states": len(self.filter.states),
            "uptime": round(now - self.started, 3),
            "pid": os.getpid(),
            "vrrp": self.vrrp.as_dict(),
            **extra,
        }

    def handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        now = self.clock()
        if cmd == "states":
            verbose = bool(req.get("verbose"))
            return {"ok": True, "text": pfctl.format_states(self.filter, now, verbose),
                    "data": pfctl.states_json(self.filter, now)}
        if cmd == "sources":
            nodes = self.filter.srcnodes
            return {"ok": True,
                    "text": format_sources(nodes, now, bool(req.get("verbose"))),
                    "data": sources_json(nodes, now)}
        if cmd == "info":
            data = self.counters(now)
            text = pfctl.format_daemon_info(self.filter, now, data["pfsync"], data["sync_ok"],
                                            data["dataplane"])
            text.extend(self.vrrp.lines())
            return {"ok": True, "text": text, "data": data}
        if cmd == "rules":
            # FreeBSD's translation rules first, as `pfctl -sa` shows -sn before -sr
            rules = pfctl.format_rules([*getattr(self.ruleset, "translation_rules", ()),
                                        *getattr(self.ruleset, "rules", ())])
            return {"ok": True, "text": rules, "data": rules}
        if cmd == "kill":
            host, host2, sid = req.get("host"), req.get("host2"), req.get("id")
            if not host and sid is None:
                return {"ok": False, "error": "kill needs host or id"}
            try:
                n = self.filter.kill_states(now, host=host or None, host2=host2 or None,
                                            state_id=None if sid is None else str(sid))
            except ValueError as exc:
                return {"ok": False, "error": f"kill: {exc}"}
            self.engine.end_of_batch(now)
            self._flush()
            return {"ok": True, "text": [f"killed {n} states"], "data": {"killed": n}}
        if cmd == "flush":
            what = req.get("what", "states")
            if what != "states":
                return {"ok": False, "error": f"cannot flush {what!r} (only 'states')"}
            n = self.filter.flush_states(now)
            self.engine.clear_states(now)
            self.engine.end_of_batch(now)
            self._flush()
            log.info("flushed %d states, CLR sent", n)
            return {"ok": True, "text": [f"{n} states cleared"], "data": {"flushed": n}}
        if cmd == "reload":
            return self.reload()
        if cmd == "tables":
            return tables_request(self.ruleset.tables, req)
        if cmd == "table":
            return self.table(req, now)
        if cmd == "anchor":
            return anchor_request(self.filter, req, self.translating)
        if cmd == "syncok":
            return syncok_answer(bool(self.engine.sync_ok))
        if cmd == "notify":
            return notify_request(req, self.vrrp, bool(self.engine.sync_ok))
        return {"ok": False, "error": f"unknown command {cmd!r}"}

