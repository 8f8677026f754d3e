"""The daemon's iptables chain: installed atomically over whatever a previous run left
(one iptables-restore commit per family, no unfiltered instant), idempotent, and removed
completely only when asked."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nsfixtures import Netlab, client_fw_server, netlab
from pfcluster.io.iptables import IptablesRules, list_rules

__all__ = ["netlab"]

pytestmark = [pytest.mark.root]  # network namespaces, iptables, NFQUEUE, raw sockets


def family(lines: list[str], tool: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in lines if line.startswith(tool + ":")]


def test_install_remove_in_namespace(netlab: Netlab) -> None:
    ns = netlab.add_ns("ipt")
    prefix = netlab.prefix_argv(ns)
    rules = IptablesRules(queue=7, skip_ifaces=["sync0"], prefix=prefix)
    rules.install()
    got = list_rules(prefix)
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        mine = family(got, tool)
        assert mine[:4] == ["-N PFCLUSTER-7", "-A INPUT -j PFCLUSTER-7",
                            "-A FORWARD -j PFCLUSTER-7", "-A OUTPUT -j PFCLUSTER-7"]
        assert "-A PFCLUSTER-7 -i sync0 -j RETURN" in mine
        assert "-A PFCLUSTER-7 -o sync0 -j RETURN" in mine
        assert "-A PFCLUSTER-7 -p 240 -j RETURN" in mine
        # the queue rule is last (pfsync and skipped interfaces return before it) and
        # fails closed: no --queue-bypass by default
        assert mine[-1] == "-A PFCLUSTER-7 -j NFQUEUE --queue-num 7"
    # a second install (a restart) leaves exactly one copy
    IptablesRules(queue=7, skip_ifaces=["sync0"], prefix=prefix).install()
    assert list_rules(prefix) == got
    assert rules.present() == got
    assert rules.remove() == got  # says what it removed
    assert list_rules(prefix) == []
    assert rules.remove() == []  # idempotent


def test_install_rewrites_leftovers_in_place(netlab: Netlab) -> None:
    """A previous run's chain (other skip set, --queue-bypass, a stray rule) is rewritten
    to exactly the new content; existing jumps stay where they are, missing ones are
    added, nobody else's rules move."""
    ns = netlab.add_ns("ipt")
    prefix = netlab.prefix_argv(ns)
    ipt = ["iptables-legacy", "-w"]
    IptablesRules(queue=3, skip_ifaces=["sync0", "lo"], prefix=prefix, fail_open=True).install()
    netlab.exec(ns, [*ipt, "-A", "PFCLUSTER-3", "-p", "udp", "-j", "ACCEPT"])
    netlab.exec(ns, [*ipt, "-I", "FORWARD", "1", "-p", "icmp", "-j", "ACCEPT"])
    netlab.exec(ns, [*ipt, "-D", "OUTPUT", "-j", "PFCLUSTER-3"])
    netlab.exec(ns, ["ip6tables-legacy", "-w", "-D", "INPUT", "-j", "PFCLUSTER-3"])
    other = IptablesRules(queue=4, prefix=prefix)
    other.install()
    theirs = other.present()

    fresh = IptablesRules(queue=3, skip_ifaces=["sync0"], prefix=prefix)
    fresh.install()
    v4 = netlab.exec(ns, [*ipt, "-S", "FORWARD"]).stdout.splitlines()
    # FORWARD keeps its order: PFCLUSTER-4 (inserted last, at 1), the icmp rule, ours
    assert v4[1:] == ["-A FORWARD -j PFCLUSTER-4", "-A FORWARD -p icmp -j ACCEPT",
                      "-A FORWARD -j PFCLUSTER-3"], v4
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        chain = netlab.exec(ns, [tool, "-w", "-S", "PFCLUSTER-3"]).stdout.splitlines()
        assert chain == ["-N PFCLUSTER-3", *fresh.chain_rules()], (tool, chain)
        for hook in ("INPUT", "FORWARD", "OUTPUT"):
            lines = netlab.exec(ns, [tool, "-w", "-S", hook]).stdout.splitlines()
            assert lines.count(f"-A {hook} -j PFCLUSTER-3") == 1, (tool, hook, lines)
    assert other.present() == theirs  # the other queue's daemon is untouched
    fresh.remove()
    assert other.present() == theirs
    assert all("PFCLUSTER-3" not in line for line in list_rules(prefix))
    other.remove()
    assert list_rules(prefix) == []


def test_update_skip_keeps_queue_rule(netlab: Netlab) -> None:
    ns = netlab.add_ns("ipt")
    prefix = netlab.prefix_argv(ns)
    rules = IptablesRules(queue=0, skip_ifaces=["sync0"], prefix=prefix)
    rules.install()
    try:
        rules.update_skip(["sync0", "lo"])
        lines = list_rules(prefix)
        assert any("-i lo -j RETURN" in line for line in lines)
        assert sum(line.endswith("NFQUEUE --queue-num 0") for line in lines) == 2
    finally:
        rules.remove()
    assert list_rules(prefix) == []


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_install_is_one_table_commit_per_family(netlab: Netlab, tmp_path: Path) -> None:
    """Over an existing chain (a restart), install() hands the kernel exactly one table
    replacement per family: legacy iptables-restore's IPT_SO_SET_REPLACE swaps the whole
    table at once, so no packet meets a flushed or half-written chain."""
    ns = netlab.add_ns("ipt")
    prefix = netlab.prefix_argv(ns)
    IptablesRules(queue=5, skip_ifaces=["sync0"], prefix=prefix).install()
    netlab.exec(ns, ["iptables-legacy", "-w", "-D", "FORWARD", "-j", "PFCLUSTER-5"])
    trace = tmp_path / "strace.txt"
    traced = [*prefix, "strace", "-f", "-qq", "-A", "-o", str(trace), "-e",
              "trace=setsockopt"]
    IptablesRules(queue=5, skip_ifaces=["sync1"], prefix=traced).install()
    calls = trace.read_text().splitlines()
    replaces = [c for c in calls if "SO_SET_REPLACE" in c]
    assert len(replaces) == 2, calls  # IPT_SO_SET_REPLACE + IP6T_SO_SET_REPLACE
    lines = list_rules(prefix)
    assert "iptables-legacy: -A FORWARD -j PFCLUSTER-5" in lines  # the jump came back
    assert "iptables-legacy: -A PFCLUSTER-5 -i sync1 -j RETURN" in lines


BLAST = r"""
import socket, sys, time
dst, seconds = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
print("sending", flush=True)
n = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        s.sendto(b"x" * 32, (dst, 9999))
        n += 1
    except OSError:
        time.sleep(0.0005)
print(n, flush=True)
"""

COUNT = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 9999))
s.settimeout(0.2)
print("ready", flush=True)
n = 0
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        s.recv(64)
        n += 1
    except OSError:
        pass
print(n, flush=True)
"""


def _leak_while(netlab: Netlab, action: object, seconds: float = 3.0) -> tuple[int, int]:
    """(packets the client sent, packets that reached the server) while `action()`
    runs with no daemon on the queue: with the host closed, every packet that arrives
    went through an instant without our NFQUEUE rule."""
    t = client_fw_server(netlab)
    counter = subprocess.Popen(["ip", "netns", "exec", t.server, sys.executable, "-c", COUNT,
                                t.server_ip, str(seconds + 2)], stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    netlab.procs.append(counter)  # type: ignore[arg-type]
    assert counter.stdout is not None and counter.stdout.readline().strip() == "ready"
    prefix = netlab.prefix_argv(t.fw)
    IptablesRules(queue=0, skip_ifaces=["sync0"], prefix=prefix).install()
    blast = subprocess.Popen(["ip", "netns", "exec", t.client, sys.executable, "-c", BLAST,
                              t.server_ip, str(seconds)], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    netlab.procs.append(blast)  # type: ignore[arg-type]
    assert blast.stdout is not None and blast.stdout.readline().strip() == "sending"
    time.sleep(0.3)
    assert callable(action)
    action(prefix)
    sent, _ = blast.communicate(timeout=seconds + 10)
    got, _ = counter.communicate(timeout=seconds + 10)
    return int(sent), int(got)


def test_reinstall_has_no_unfiltered_instant(netlab: Netlab) -> None:
    """Ten restarts' worth of install() (each changing the chain's content) while UDP
    floods through a host closed by our rule: not one packet gets through."""
    def reinstall(prefix: list[str]) -> None:
        for i in range(10):
            skip = ["sync0"] if i % 2 else ["sync0", "lo"]
            IptablesRules(queue=0, skip_ifaces=skip, prefix=prefix).install()

    sent, got = _leak_while(netlab, reinstall)
    print(f"atomic reinstall: {sent} sent, {got} through")
    assert sent > 1000
    assert got == 0


def test_leak_check_sees_a_remove_then_install(netlab: Netlab) -> None:
    """The check above can fail: the old start-up (remove, then install) lets packets
    through in the gap."""
    def remove_then_install(prefix: list[str]) -> None:
        for _ in range(5):
            rules = IptablesRules(queue=0, skip_ifaces=["sync0"], prefix=prefix)
            rules.remove()
            rules.install()

    sent, got = _leak_while(netlab, remove_then_install)
    print(f"remove + install: {sent} sent, {got} through")
    assert got > 0
