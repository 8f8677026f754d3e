"""Daemon options: command-line flags or the same keys in a TOML file (flags win).

    rules = "/etc/pfcluster/pf.conf"
    syncdev = "sync0"          # "none": filter only, no pfsync transport
    syncpeer = "192.0.2.2"     # omit for multicast 224.0.0.240 (IPv6: ff02::f0)
    syncgroup6 = "ff02::f0"    # optional second transport over IPv6
    maxupd = 128
    defer = false
    dialect = "openbsd45"
    protocol = "v5"            # "v4": the pre-2009 pfsync behaviour, for comparison
    merge = "edges"            # "thesis": OpenBSD 4.5's all-or-nothing TCP merge
    queue = 0
    workers = 1                # N: N processes on queues queue..queue+N-1 (--queue-balance)
    control = "/run/pfcluster.sock"
    fail_open = false          # true: --queue-bypass, the queue's fail-open flag, rules
                               # removed on exit
    copy_range = 256           # bytes of each packet copied from the kernel (headers)
    hostid = 0x1234            # pfsync creatorid; random when absent
    nat_slice = "1/2"          # this firewall owns slice K of N of every NAT port range
    sync_key = "/etc/pfcluster/sync.key"  # authenticated sync (mode 0600; README)
    syslog = false
    metrics = "127.0.0.1:9107" # Prometheus /metrics here (off when absent)
    pflog = "/var/log/pfcluster/pflog"  # pcap of `log` rules' packets (off when absent)
    pflog_size = 100           # MiB before FILE is renamed FILE.1 and a new one begun
    pflog_rate = 1000          # packets per second written at most (the rest counted)
    track_file = "/run/pfcluster/vrrp-track"  # keepalived track_file: 0 when sync_ok,
    track_demote = 253         # -track_demote until the bulk update is done (254: FAULT)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pfcluster.io.control import DEFAULT_CONTROL
from pfcluster.io.nfq import DEFAULT_COPY_RANGE, MAX_COPY_RANGE
from pfcluster.pf.nat import NatSlice

DIALECTS = ("openbsd45", "freebsd1301", "freebsd1400", "openbsd6")
PROTOCOLS = ("v5", "v4")
MERGES = ("edges", "thesis")
MAX_WORKERS = 64
NO_SYNC = "none"  # --syncdev none: a filtering node without pfsync transport


class ConfigError(ValueError):
    """A config file or option is unusable; the message names the key."""


@dataclass
class DaemonConfig:
    rules: str = ""
    syncdev: str = ""
    syncpeer: str | None = None
    syncgroup6: str | None = None
    maxupd: int = 128
    defer: bool = False
    dialect: str = "openbsd45"
    protocol: str = "v5"
    merge: str = "edges"
    queue: int = 0
    workers: int = 1
    control: str = DEFAULT_CONTROL
    fail_open: bool = False
    copy_range: int = DEFAULT_COPY_RANGE
    hostid: int | None = None
    nat_slice: str = "1/1"
    sync_key: str | None = None
    syslog: bool = False
    verbose: bool = False
    metrics: str | None = None
    pflog: str | None = None
    pflog_size: int = 100
    pflog_rate: int = 1000
    track_file: str | None = None
    track_demote: int = 253
    # set only in the processes a `--workers N` supervisor starts (never from a file)
    worker: int | None = None

    @property
    def sync_enabled(self) -> bool:
        return self.syncdev != NO_SYNC

    @property
    def base_queue(self) -> int:
        """The first queue of the firewall (a worker's own queue is base + index)."""
        return self.queue - (self.worker or 0)

    def validate(self) -> DaemonConfig:
        if not self.rules:
            raise ConfigError("rules: a pf.conf path is required")
        if not self.syncdev:
            raise ConfigError("syncdev: the sync interface is required")
        if self.dialect not in DIALECTS:
            raise ConfigError(f"dialect: {self.dialect!r} is not one of {', '.join(DIALECTS)}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol: {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if self.merge not in MERGES:
            raise ConfigError(f"merge: {self.merge!r} is not one of {', '.join(MERGES)}")
        if not 0 <= self.queue <= 65535:
            raise ConfigError(f"queue: {self.queue} is not 0..65535")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers: {self.workers} is not 1..{MAX_WORKERS}")
        if self.worker is None and self.queue + self.workers - 1 > 65535:
            raise ConfigError(f"workers: queues {self.queue}..{self.queue + self.workers - 1} "
                              "go past 65535")
        if self.worker is not None and not 0 <= self.worker < self.workers:
            raise ConfigError(f"worker: {self.worker} is not 0..{self.workers - 1}")
        if not DEFAULT_COPY_RANGE <= self.copy_range <= MAX_COPY_RANGE:
            raise ConfigError(f"copy_range: {self.copy_range} is not "
                              f"{DEFAULT_COPY_RANGE}..{MAX_COPY_RANGE}")
        if not 1 <= self.maxupd <= 255:
            raise ConfigError(f"maxupd: {self.maxupd} is not 1..255")
        try:
            NatSlice.parse(self.nat_slice)
        except ValueError as exc:
            raise ConfigError(f"nat_slice: {exc}") from exc
        if self.metrics is not None:
            from pfcluster.io.metrics import MetricsError, parse_listen

            try:
                parse_listen(self.metrics)
            except MetricsError as exc:
                raise ConfigError(f"metrics: {exc}") from exc
        if not 1 <= self.pflog_size <= 1 << 20:
            raise ConfigError(f"pflog_size: {self.pflog_size} is not 1..{1 << 20} MiB")
        if not 1 <= self.pflog_rate <= 1_000_000:
            raise ConfigError(f"pflog_rate: {self.pflog_rate} is not 1..1000000")
        if self.sync_key is not None and self.protocol == "v4":
            raise ConfigError("sync_key: pfsync v4 frames have no place for an "
                              "authenticator; use --protocol v5")
        if not 1 <= self.track_demote <= 254:
            raise ConfigError(f"track_demote: {self.track_demote} is not 1..254")
        if self.hostid is not None and not 0 < self.hostid <= 0xFFFFFFFF:
            raise ConfigError(f"hostid: {self.hostid} is not a non-zero 32-bit value")
        return self


_TYPES: dict[str, tuple[type, ...]] = {
    "rules": (str,), "syncdev": (str,), "syncpeer": (str,), "syncgroup6": (str,),
    "maxupd": (int,), "defer": (bool,), "dialect": (str,), "protocol": (str,), "merge": (str,),
    "queue": (int,), "workers": (int,),
    "control": (str,), "fail_open": (bool,), "copy_range": (int,), "hostid": (int,),
    "nat_slice": (str,), "sync_key": (str,),
    "syslog": (bool,), "verbose": (bool,), "metrics": (str,), "pflog": (str,),
    "pflog_size": (int,), "pflog_rate": (int,), "track_file": (str,), "track_demote": (int,),
}


def load_config(path: str | None, overrides: dict[str, Any], *,
                validate: bool = True) -> DaemonConfig:
    """File values, then every override that is not None (a click flag left unset).
    `validate=False` (`daemon --uninstall`, which needs only the queue number) skips
    the checks of the keys a running daemon needs."""
    values: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        data = {k.replace("-", "_"): v for k, v in data.items()}
        known = set(_TYPES)
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"{path}: unknown key {key!r}")
            want = _TYPES[key]
            if isinstance(value, bool) and bool not in want:
                raise ConfigError(f"{path}: {key} must be {want[0].__name__}")
            if not isinstance(value, want):
                raise ConfigError(f"{path}: {key} must be {want[0].__name__}")
            values[key] = value
        for key in ("rules", "sync_key"):  # relative to the config file
            if key in values and not Path(values[key]).is_absolute():
                values[key] = str(Path(path).parent / values[key])
    for key, value in overrides.items():
        if value is not None:
            values[key] = value
    cfg = DaemonConfig(**values)
    return cfg.validate() if validate else cfg


def worker_config(cfg: DaemonConfig, index: int, hostid: int) -> DaemonConfig:
    """What worker `index` of a `--workers N` firewall runs: its own queue of the balanced
    range, its own control socket beside the firewall's, and its own pfsync creator id
    (each worker is a pfsync node; see io/siblings.py). The supervisor serves the
    metrics of all and writes the keepalived track file; each worker writes its own
    pflog file, FILE.w<index>."""
    return replace(cfg, worker=index, queue=cfg.queue + index, track_file=None,
                   control=f"{cfg.control}.w{index}", metrics=None,
                   pflog=None if cfg.pflog is None else f"{cfg.pflog}.w{index}",
                   hostid=(hostid + index - 1) % 0xFFFFFFFF + 1).validate()
