"""The daemon's iptables chain: installed atomically, idempotent, removed completely."""

from __future__ import annotations

from nsfixtures import Netlab, netlab
from pfcluster.io.iptables import IptablesRules, list_rules

__all__ = ["netlab"]


def test_install_remove_in_namespace(netlab: Netlab) -> None:
    ns = netlab.add_ns("ipt")
    prefix = netlab.prefix_argv(ns)
    rules = IptablesRules(queue=7, skip_ifaces=["sync0"], prefix=prefix)
    rules.install()
    got = list_rules(prefix)
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        mine = [line.split(": ", 1)[1] for line in got if line.startswith(tool + ":")]
        assert mine[:4] == ["-N PFCLUSTER-7", "-A INPUT -j PFCLUSTER-7",
                            "-A FORWARD -j PFCLUSTER-7", "-A OUTPUT -j PFCLUSTER-7"]
        assert "-A PFCLUSTER-7 -i sync0 -j RETURN" in mine
        assert "-A PFCLUSTER-7 -o sync0 -j RETURN" in mine
        assert "-A PFCLUSTER-7 -p 240 -j RETURN" in mine
        # the queue rule is last (pfsync and skipped interfaces return before it) and
        # fails closed: no --queue-bypass by default
        assert mine[-1] == "-A PFCLUSTER-7 -j NFQUEUE --queue-num 7"
    # a second install (a restart after a crash) leaves exactly one copy
    IptablesRules(queue=7, skip_ifaces=["sync0"], prefix=prefix).install()
    assert list_rules(prefix) == got
    rules.remove()
    assert list_rules(prefix) == []
    rules.remove()  # idempotent


def test_fail_open_and_leftovers(netlab: Netlab) -> None:
    ns = netlab.add_ns("ipt")
    prefix = netlab.prefix_argv(ns)
    IptablesRules(queue=3, skip_ifaces=["sync0"], prefix=prefix, fail_open=True).install()
    assert any(line.endswith("--queue-num 3 --queue-bypass") for line in list_rules(prefix))
    # simulate a crashed run: an extra duplicate jump and a half-built chain
    netlab.exec(ns, ["iptables-legacy", "-I", "FORWARD", "-j", "PFCLUSTER-3"])
    other = IptablesRules(queue=4, prefix=prefix)
    other.install()
    fresh = IptablesRules(queue=3, prefix=prefix)
    fresh.remove()
    left = list_rules(prefix)
    assert left and all("PFCLUSTER-4" in line for line in left)  # the other daemon's stay
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
