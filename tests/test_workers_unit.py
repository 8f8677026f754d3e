"""--workers without root: the engine's sibling rules, the supervisor's sums, the worker
command line, the balanced iptables rule and the sibling bus on real unix sockets."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from pfcluster.io.config import ConfigError, DaemonConfig, load_config, worker_config
from pfcluster.io.iptables import IptablesRules
from pfcluster.io.siblings import SiblingBus
from pfcluster.io.workers import sum_figures, worker_argv
from pfcluster.pfsync import wire
from test_engine_unit import HOST_A, HOST_B, actions, make, msgs, pfsync_frame, releases, syn


def _deferred_insert() -> tuple[object, bytes]:
    a = make(defer=True)
    st = syn(a, 1, 0.0)
    assert a.defer(st, "pkt", 0.0)
    a.end_of_batch(0.0)
    (ins,) = a.take_output()
    return a, ins


def test_sibling_never_acks_a_deferred_insert() -> None:
    """A sibling worker must not release the packet: only a peer holding the state may."""
    a, ins = _deferred_insert()
    sibling = make(HOST_B)
    sibling.receive(ins, 0.001, sibling=True)
    sibling.end_of_batch(0.001)
    assert sibling.filter.states.by_id(HOST_A, a.filter.states.by_creator(HOST_A)[0].id)
    assert sibling.take_output() == []
    assert sibling.counters["iack_sent"] == 0
    # the same frame from a peer is acknowledged, and the next sibling frame is again not
    peer = make(HOST_B)
    peer.receive(ins, 0.001)
    peer.end_of_batch(0.001)
    (ack,) = peer.take_output()
    assert actions(ack) == ["INS_ACK", "EOF"]
    a.receive(ack, 0.002)
    assert releases(a) == [("pkt", True)]


def test_only_the_answering_worker_starts_a_bulk_update() -> None:
    request = pfsync_frame([("UPD_REQ", [wire.UpdReq(0, 0)])])
    for answers, expect in ((True, ["BUS", "EOF"]), (False, None)):
        eng = make(answers_bulk=answers)
        syn(eng, 1, 0.0)
        eng.flush(1.0)
        eng.take_output()
        eng.receive(request, 2.0)
        out = eng.take_output()
        if expect is None:
            assert out == [] and not eng.bulk_send.active
        else:
            assert actions(out[0]) == expect
            assert msgs(out[0], "BUS")[0].status == 1


def test_sum_figures_counts_packets_once_and_the_table_once() -> None:
    w0 = {"states": {"current": 10, "searches": 5, "limit": 100}, "packets": 7,
          "max_batch": 3, "hostid": "00000100", "ok": True, "running_seconds": 9.0}
    w1 = {"states": {"current": 10, "searches": 2, "limit": 100}, "packets": 1,
          "max_batch": 9, "hostid": "00000101", "ok": False, "running_seconds": 8.0}
    out = sum_figures([w0, w1])
    assert out == {"states": {"current": 10, "searches": 7, "limit": 100}, "packets": 8,
                   "max_batch": 9, "hostid": "00000100", "ok": True, "running_seconds": 9.0}


def test_worker_command_line_gives_the_worker_config(tmp_path: object) -> None:
    from pfcluster.cli.daemon import daemon

    cfg = DaemonConfig(rules="/x/pf.conf", syncdev="sync0", syncpeer="192.0.2.2", queue=7,
                       workers=3, control="/run/fw.sock", defer=True, hostid=0xFFFFFFFF,
                       merge="thesis", copy_range=300).validate()
    seen: dict[str, object] = {}

    class Stop(Exception):
        pass

    def fake_daemon_init(self: object, c: DaemonConfig, **kw: object) -> None:
        seen["cfg"] = c
        raise Stop

    import pfcluster.io.loop as loop

    orig = loop.Daemon.__init__
    loop.Daemon.__init__ = fake_daemon_init  # type: ignore[method-assign,assignment]
    try:
        res = CliRunner().invoke(daemon, worker_argv(cfg, 2, 0xFFFFFFFF))
    finally:
        loop.Daemon.__init__ = orig  # type: ignore[method-assign]
    assert "cfg" in seen, res.output
    w = seen["cfg"]
    assert isinstance(w, DaemonConfig)
    assert (w.worker, w.workers, w.queue, w.base_queue) == (2, 3, 9, 7)
    assert w.control == "/run/fw.sock.w2"
    assert w.hostid == 2  # hostid + index wraps past 0xffffffff and skips 0
    assert (w.syncpeer, w.defer, w.merge, w.copy_range) == ("192.0.2.2", True, "thesis", 300)
    assert worker_config(cfg, 0, 0x100).hostid == 0x100


@pytest.mark.parametrize(("kw", "msg"), [
    ({"workers": 0}, "workers: 0 is not 1..64"),
    ({"workers": 65}, "workers: 65 is not 1..64"),
    ({"workers": 3, "queue": 65534}, "workers: queues 65534..65536 go past 65535"),
])
def test_workers_bad_values(kw: dict[str, int], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
        load_config(None, {"rules": "r", "syncdev": "s", **kw})


def test_worker_key_is_not_a_file_key(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "d.toml")
    with open(path, "w") as f:
        f.write('rules = "r"\nsyncdev = "s"\nworker = 1\n')
    with pytest.raises(ConfigError, match="unknown key 'worker'"):
        load_config(path, {})


def test_balanced_rule() -> None:
    assert IptablesRules(4, balance=3).chain_rules()[-1] == \
        "-A PFCLUSTER-4 -j NFQUEUE --queue-balance 4:6"
    assert IptablesRules(4, fail_open=True).chain_rules()[-1] == \
        "-A PFCLUSTER-4 -j NFQUEUE --queue-num 4 --queue-bypass"


def test_sibling_bus_delivers_between_siblings_only() -> None:
    queue = 40000 + os.getpid() % 20000
    buses = [SiblingBus(queue, i, 3) for i in range(3)]
    try:
        buses[0].send(b"frame-from-0")
        for b in buses[1:]:
            assert b.receive() == [b"frame-from-0"]
        assert buses[0].receive() == []  # never to itself
        # a datagram from a socket that is not a sibling's is dropped and counted
        import socket

        stranger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        stranger.sendto(b"forged", buses[1].name)
        stranger.close()
        assert buses[1].receive() == []
        assert buses[1].counters.foreign == 1
        # a sibling that is gone costs a counted drop, not an exception
        buses[2].close()
        buses[0].send(b"x")
        assert buses[0].counters.send_dropped == 1
        with pytest.raises(OSError):
            SiblingBus(queue, 0, 3)  # that name is taken: a second firewall on this queue
        with pytest.raises(ValueError):
            SiblingBus(queue, 3, 3)
    finally:
        for b in buses:
            b.close()
