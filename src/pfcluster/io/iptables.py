"""The daemon's own iptables rules: everything pf should see goes to one NFQUEUE.

Layout (identical in iptables-legacy and ip6tables-legacy, table `filter`):

    FORWARD/INPUT/OUTPUT  -j PFCLUSTER-<queue>          (inserted at position 1)
    PFCLUSTER-<queue>     -m mark --mark GEN -j RETURN  (packets the daemon generated:
                                                         RSTs, ICMP, challenge ACKs)
                          -i/-o <skip iface> -j RETURN  (the sync interface, `set skip on`)
                          -p 240 -j RETURN              (pfsync is never queued)
                          -j NFQUEUE --queue-num N [--queue-bypass]

One chain per queue number, so several daemons (one per namespace or per queue) never
touch each other's rules, and a crashed run's leftovers are found by name. The chain is
written with `iptables-restore --noflush` so its content changes in one table commit:
there is no instant in which the chain exists without its NFQUEUE rule (fail closed).
Without `--queue-bypass` the kernel drops queued packets when no daemon listens, which is
the documented default (fail closed); `fail_open` adds the flag.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# fwmark the daemon puts (SO_MARK) on every packet it sends itself, so its own RSTs and
# pfsync frames skip the queue, as pf skips packets tagged PF_TAG_GENERATED.
GENERATED_MARK = 0x7066

HOOKS = ("INPUT", "FORWARD", "OUTPUT")
TOOLS = ("iptables-legacy", "ip6tables-legacy")
TIMEOUT = 20.0


class IptablesError(RuntimeError):
    """An iptables command failed; the message carries its stderr."""


def chain_name(queue: int) -> str:
    return f"PFCLUSTER-{queue}"


@dataclass
class IptablesRules:
    """Install/remove the daemon's chain and jumps. `prefix` runs the tools elsewhere
    (tests: ["ip", "netns", "exec", NS])."""

    queue: int
    skip_ifaces: Sequence[str] = ()
    fail_open: bool = False
    prefix: Sequence[str] = ()
    mark: int = GENERATED_MARK
    families: Sequence[str] = TOOLS
    installed: bool = field(default=False, init=False)

    @property
    def chain(self) -> str:
        return chain_name(self.queue)

    # --- commands ---------------------------------------------------------------

    def _run(self, tool: str, args: Sequence[str], *, check: bool = True,
             stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [*self.prefix, tool, *args]
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)
        if check and proc.returncode != 0:
            raise IptablesError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc

    def chain_rules(self) -> list[str]:
        """The `-A` lines of our chain (iptables-save syntax), in order."""
        c = self.chain
        lines = [f"-A {c} -m mark --mark {self.mark:#x} -j RETURN"]
        for ifname in dict.fromkeys(self.skip_ifaces):
            lines.append(f"-A {c} -i {ifname} -j RETURN")
            lines.append(f"-A {c} -o {ifname} -j RETURN")
        lines.append(f"-A {c} -p 240 -j RETURN")
        queue = f"-A {c} -j NFQUEUE --queue-num {self.queue}"
        if self.fail_open:
            queue += " --queue-bypass"
        lines.append(queue)
        return lines

    def _restore_text(self) -> str:
        return "\n".join(["*filter", f":{self.chain} - [0:0]", *self.chain_rules(), "COMMIT", ""])

    def install(self) -> None:
        """Remove leftovers, write the chain atomically, then insert the jumps."""
        self.remove()
        try:
            for tool in self.families:
                restore = tool.replace("tables-legacy", "tables-legacy-restore")
                self._run(restore, ["-w", "--noflush"], stdin=self._restore_text())
                for hook in HOOKS:
                    self._run(tool, ["-w", "-I", hook, "1", "-j", self.chain])
            self.installed = True
        except Exception:
            self.remove()
            raise

    def update_skip(self, skip_ifaces: Iterable[str]) -> None:
        """Rewrite the chain (one commit per family) after a reload changed `set skip`."""
        self.skip_ifaces = tuple(skip_ifaces)
        for tool in self.families:
            restore = tool.replace("tables-legacy", "tables-legacy-restore")
            self._run(restore, ["-w", "--noflush"], stdin=self._restore_text())

    def remove(self) -> None:
        """Idempotent: delete every jump to our chain, then the chain; never raises for
        "not there" (a crashed earlier run may have left any subset behind)."""
        for tool in self.families:
            for hook in HOOKS:
                for _ in range(64):  # bounded: duplicates from repeated crashes
                    if self._run(tool, ["-w", "-D", hook, "-j", self.chain],
                                 check=False).returncode != 0:
                        break
            if self._run(tool, ["-w", "-n", "-L", self.chain], check=False).returncode == 0:
                self._run(tool, ["-w", "-F", self.chain], check=False)
                self._run(tool, ["-w", "-X", self.chain], check=False)
        self.installed = False

    def list_rules(self) -> list[str]:
        return list_rules(self.prefix, families=self.families, needle=self.chain)


def list_rules(prefix: Sequence[str] = (), *, families: Sequence[str] = TOOLS,
               needle: str = "PFCLUSTER") -> list[str]:
    """Every `iptables -S` line (both families, table filter) mentioning `needle`:
    the check that a daemon left nothing behind."""
    found: list[str] = []
    for tool in families:
        proc = subprocess.run([*prefix, tool, "-w", "-S"], capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)
        if proc.returncode != 0:
            raise IptablesError(f"{tool} -S: {proc.stderr.strip()}")
        found.extend(f"{tool}: {line}" for line in proc.stdout.splitlines() if needle in line)
    return found
