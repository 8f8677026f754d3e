"""The daemon's own iptables rules: everything pf should see goes to one NFQUEUE.

Layout (identical in iptables-legacy and ip6tables-legacy, table `filter`):

    INPUT/FORWARD/OUTPUT  -j PFCLUSTER-<queue>          (inserted at position 1)
    PFCLUSTER-<queue>     -m mark --mark GEN -j RETURN  (packets the daemon generated:
                                                         RSTs, ICMP, challenge ACKs)
                          -i/-o <skip iface> -j RETURN  (the sync interface, `set skip on`)
                          -p 240 -j RETURN              (pfsync is never queued)
                          -m mark --mark M/0x2ff -j TEE --gateway GW --oif IF
                          (dup-to, translation layout only: see below)
                          -j NFQUEUE --queue-num N [--queue-bypass]
                          (--workers W: --queue-balance N:N+W-1 instead of --queue-num)

One chain per queue number, so several daemons (one per namespace or per queue) never
touch each other's rules, and a stopped run's rules are found by name.

Translation (`nat=True`, a ruleset with nat-to/rdr-to/binat-to or FreeBSD nat/rdr): the
route is chosen after PREROUTING, so a destination must be rewritten before it. Then the
chains live in table `mangle`: PREROUTING jumps to PFCLUSTER-<queue>-in (the `in` test,
which rewrites destinations), FORWARD and OUTPUT to PFCLUSTER-<queue> (the `out` test,
which rewrites sources); INPUT is not queued, its `in` test ran at PREROUTING. A switch
between the two layouts installs the new one before it removes the old one, so no packet
is unfiltered in between (some are tested twice).

dup-to (pf/route.py): the PREROUTING verdict marks a packet of a dup-to state with its
target's dup mark; the packet reaches FORWARD (or, for the host itself, nothing: see
docs/route-to.md) and the FORWARD chain's TEE rule, placed before the NFQUEUE rule, sends
a copy to the target's gateway out of its interface. The copy leaves through LOCAL_OUT,
where the same chain queues it to the daemon (its `out` test on the target's interface);
TEE does not copy a copy (the kernel's duplicate flag is set while the copy is sent).

Fail closed (the default): the rules outlive the daemon. Without `--queue-bypass` the
kernel drops what is queued to a queue nobody reads, so a stopped or crashed daemon leaves
the host closed, and only `remove()` (`pfcluster daemon --uninstall`) takes the rules away.
`fail_open` adds `--queue-bypass` (the daemon then also removes the rules on exit).

`install()` is idempotent and atomic: per family it is ONE `iptables-restore --noflush`
commit that declares the chain (`:PFCLUSTER-N - [0:0]` creates it, or flushes an existing
one inside the same commit), appends its rules and inserts whichever hook jumps are missing
(`iptables -C` first). Legacy iptables-restore builds the whole table in user space and
hands it to the kernel with a single IPT_SO_SET_REPLACE (checked with strace: one
SET_REPLACE per family per commit), so there is no instant in which a packet meets an
empty or half-written chain — a restarted daemon takes its queue over with no unfiltered
packet. Rules of other chains and tables are left as they are (`--noflush`).
"""

from __future__ import annotations

import shlex
import socket
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pfcluster.pf.route import DUP_MARK_MASK

# fwmark the daemon puts (SO_MARK) on every packet it sends itself, so its own RSTs and
# pfsync frames skip the queue, as pf skips packets tagged PF_TAG_GENERATED.
GENERATED_MARK = 0x7066

HOOKS = ("INPUT", "FORWARD", "OUTPUT")
NAT_HOOKS = ("PREROUTING", "FORWARD", "OUTPUT")
TABLES = ("filter", "mangle")
TOOLS = ("iptables-legacy", "ip6tables-legacy")
TIMEOUT = 20.0


class IptablesError(RuntimeError):
    """An iptables command failed; the message carries its stderr."""


def chain_name(queue: int) -> str:
    return f"PFCLUSTER-{queue}"


def dup_rules(targets: Iterable[Any]) -> list[tuple[int, str, str, str]]:
    """IptablesRules.dups of a ruleset's route targets: those a dup-to rule names."""
    out = []
    for t in targets:
        if t.dup and t.addr is not None:
            fam = socket.AF_INET6 if len(t.addr) == 16 else socket.AF_INET
            out.append((t.dup_mark, socket.inet_ntop(fam, t.addr), t.ifname,
                        TOOLS[1] if fam == socket.AF_INET6 else TOOLS[0]))
    return out


def restore_tool(tool: str) -> str:
    """iptables-legacy -> iptables-legacy-restore (same for ip6tables)."""
    return tool.replace("tables-legacy", "tables-legacy-restore")


@dataclass
class IptablesRules:
    """Install/remove the daemon's chain and jumps. `prefix` runs the tools elsewhere
    (tests: ["ip", "netns", "exec", NS])."""

    queue: int
    skip_ifaces: Sequence[str] = ()
    fail_open: bool = False
    prefix: Sequence[str] = ()
    # --workers N: the kernel spreads flows over queues queue..queue+N-1 by a hash of the
    # address pair that is the same in both directions, so each worker owns whole flows
    balance: int = 1
    mark: int = GENERATED_MARK
    families: Sequence[str] = TOOLS
    # translation: table mangle, the in test at PREROUTING (see the module doc)
    nat: bool = False
    # dup-to targets: (mark, gateway, interface, tool) -> one TEE rule each (nat only)
    dups: Sequence[tuple[int, str, str, str]] = ()
    installed: bool = field(default=False, init=False)

    @property
    def chain(self) -> str:
        return chain_name(self.queue)

    @property
    def in_chain(self) -> str:
        """The PREROUTING chain of the translation layout (no `-o` there)."""
        return self.chain + "-in"

    @property
    def table(self) -> str:
        return "mangle" if self.nat else "filter"

    def _jumps(self) -> list[tuple[str, str]]:
        """(hook, chain) of every jump of this layout."""
        if not self.nat:
            return [(hook, self.chain) for hook in HOOKS]
        return [("PREROUTING", self.in_chain), ("FORWARD", self.chain), ("OUTPUT", self.chain)]

    # --- commands ---------------------------------------------------------------

    def _run(self, tool: str, args: Sequence[str], *, check: bool = True,
             stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [*self.prefix, tool, *args]
        try:
            proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                                  timeout=TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:  # tool missing, lock held
            raise IptablesError(f"{' '.join(cmd)}: {exc}") from exc
        if check and proc.returncode != 0:
            raise IptablesError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc

    def chain_rules(self, chain: str | None = None, tool: str = TOOLS[0]) -> list[str]:
        """The `-A` lines of our chain (iptables-save syntax) for `tool`, in order;
        `chain` = in_chain gives the PREROUTING chain's, which cannot match an output
        device (nor copy a packet: its mark is set by the verdict of that chain)."""
        c = chain or self.chain
        lines = [f"-A {c} -m mark --mark {self.mark:#x} -j RETURN"]
        for ifname in dict.fromkeys(self.skip_ifaces):
            lines.append(f"-A {c} -i {ifname} -j RETURN")
            if c != self.in_chain:
                lines.append(f"-A {c} -o {ifname} -j RETURN")
        lines.append(f"-A {c} -p 240 -j RETURN")
        if self.nat and c != self.in_chain:
            lines += [f"-A {c} -m mark --mark {mark:#x}/{DUP_MARK_MASK:#x} -j TEE "
                      f"--gateway {gw} --oif {ifname}"
                      for mark, gw, ifname, t in self.dups if t == tool]
        if self.balance > 1:
            queue = (f"-A {c} -j NFQUEUE --queue-balance "
                     f"{self.queue}:{self.queue + self.balance - 1}")
        else:
            queue = f"-A {c} -j NFQUEUE --queue-num {self.queue}"
        if self.fail_open:
            queue += " --queue-bypass"
        lines.append(queue)
        return lines

    def _restore_text(self, jumps: Iterable[tuple[str, str]] = (),
                      tool: str = TOOLS[0]) -> str:
        """One commit: the chains declared (created, or flushed if they exist), their
        rules, then `-I HOOK 1 -j CHAIN` for each (hook, chain) in `jumps`."""
        chains = [self.in_chain, self.chain] if self.nat else [self.chain]
        lines = [f"*{self.table}"]
        lines += [f":{c} - [0:0]" for c in chains]
        for c in chains:
            lines += self.chain_rules(c, tool)
        lines += [f"-I {hook} 1 -j {chain}" for hook, chain in jumps]
        return "\n".join([*lines, "COMMIT", ""])

    def _has_jump(self, tool: str, hook: str, chain: str) -> bool:
        return self._run(tool, ["-w", "-t", self.table, "-C", hook, "-j", chain],
                         check=False).returncode == 0

    def _commit(self, tool: str, jumps: Iterable[tuple[str, str]] = ()) -> None:
        self._run(restore_tool(tool), ["-w", "--noflush"], stdin=self._restore_text(jumps, tool))

    def install(self) -> None:
        """Idempotent and atomic (see the module doc): rewrite the chain's contents and add
        the missing hook jumps in one commit per family. Nothing is removed first, so a
        restart over a previous run's rules never opens the host; the other layout's
        chains (a run with or without translation before) go only after ours are in.
        A failure leaves what was committed in place (closed) and raises IptablesError."""
        for tool in self.families:
            missing = [(h, c) for h, c in self._jumps() if not self._has_jump(tool, h, c)]
            self._commit(tool, missing)
        self._remove_tables([t for t in TABLES if t != self.table])
        self.installed = True

    def update_skip(self, skip_ifaces: Iterable[str]) -> None:
        """Rewrite the chain (one commit per family) after a reload changed `set skip`."""
        self.skip_ifaces = tuple(skip_ifaces)
        for tool in self.families:
            self._commit(tool)

    def present(self) -> list[str]:
        """`tool: rule` lines of our chains and of every jump to them (both families,
        both tables)."""
        return (list_rules(self.prefix, families=self.families, chain=self.chain)
                + list_rules(self.prefix, families=self.families, chain=self.chain,
                             table="mangle")
                + list_rules(self.prefix, families=self.families, chain=self.in_chain,
                             table="mangle"))

    def remove(self) -> list[str]:
        """Idempotent: delete every jump to our chain, then the chain; never raises for
        "not there" (a crashed earlier run may have left any subset behind). Returns the
        `tool: rule` lines that were there before (what was removed)."""
        removed = self._remove_tables(TABLES)
        self.installed = False
        return removed

    def _remove_tables(self, tables: Iterable[str]) -> list[str]:
        """Remove our chains and their jumps from `tables` (both layouts' names)."""
        removed: list[str] = []
        ours = (self.chain, self.in_chain)
        for tool in self.families:
            for table in tables:
                proc = self._run(tool, ["-w", "-t", table, "-S"], check=False)
                lines = proc.stdout.splitlines() if proc.returncode == 0 else []
                mine = [line for line in lines if any(_mentions(line, c) for c in ours)]
                removed.extend(f"{tool}: {line}" if table == "filter"
                               else f"{tool} -t {table}: {line}" for line in mine)
                for line in mine:  # every jump, duplicates from repeated crashes included
                    words = shlex.split(line)
                    if len(words) > 2 and words[0] == "-A" and words[1] not in ours:
                        self._run(tool, ["-w", "-t", table, "-D", *words[1:]], check=False)
                for c in ours:
                    if self._run(tool, ["-w", "-t", table, "-n", "-L", c],
                                 check=False).returncode == 0:
                        self._run(tool, ["-w", "-t", table, "-F", c], check=False)
                        self._run(tool, ["-w", "-t", table, "-X", c], check=False)
        return removed

    def list_rules(self) -> list[str]:
        return list_rules(self.prefix, families=self.families, needle=self.chain)


def _mentions(line: str, chain: str) -> bool:
    """An `iptables -S` line that defines, fills or jumps to `chain` (exact name, so
    PFCLUSTER-1 does not match PFCLUSTER-10)."""
    words = line.split()
    return chain in words


def list_rules(prefix: Sequence[str] = (), *, families: Sequence[str] = TOOLS,
               needle: str = "PFCLUSTER", chain: str | None = None,
               table: str = "filter") -> list[str]:
    """Every `iptables -S` line (both families, one table) mentioning `needle` (or,
    with `chain`, naming exactly that chain): the check of what a daemon left in place."""
    found: list[str] = []
    for tool in families:
        try:
            proc = subprocess.run([*prefix, tool, "-w", "-t", table, "-S"],
                                  capture_output=True, text=True,
                                  timeout=TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise IptablesError(f"{tool} -S: {exc}") from exc
        if proc.returncode != 0:
            raise IptablesError(f"{tool} -S: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            if _mentions(line, chain) if chain is not None else needle in line:
                found.append(f"{tool}: {line}" if table == "filter"
                             else f"{tool} -t {table}: {line}")
    return found


NFQUEUE_PROC = "/proc/net/netfilter/nfnetlink_queue"


def queue_owner(queue: int, proc_path: str = NFQUEUE_PROC) -> int | None:
    """The netlink port id (usually the pid) of whoever has `queue` bound in this network
    namespace, or None if nobody has (no file: the nfnetlink_queue module is not loaded,
    so nobody has). Columns: queue_number peer_portid queue_total copy_mode ..."""
    try:
        with open(proc_path) as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 2 and cols[0].isdigit() and int(cols[0]) == queue:
            return int(cols[1]) if cols[1].isdigit() else 0
    return None
