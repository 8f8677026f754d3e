"""`pfcluster dump` on captures written here from frames we encode."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

import dpkt
import pytest
from click.testing import CliRunner

from pfcluster.cli.dump import dump
from pfcluster.pfsync import legacy, wire

CLIENT, SERVER = "198.51.100.2", "203.0.113.10"


def _state(dialect: str) -> wire.State:
    key = wire.StateKey([wire.addr_from_str(SERVER), wire.addr_from_str(CLIENT)], [5201, 34512])
    return wire.State(
        id=0x5F00000000000001, ifname="eth1", key=[key, wire.StateKey(list(key.addr), list(key.port))],
        src=wire.StatePeer(seqlo=1000, seqhi=66535, max_win=65535, state=4, wscale=0x87),
        dst=wire.StatePeer(seqlo=5000, seqhi=70535, max_win=65535, state=4, wscale=0x87),
        creatorid=0xC0FFEE01, af=2, proto=6, direction=2, timeout=2, expire=86399, creation=65,
        packets=[10, 20], bytes=[1000, 2000], rule=0,
        **({"rtableid": 0} if dialect == "freebsd1400" else {}),
    )


def _frame(dialect: str) -> wire.Frame:
    a = wire.ACTIONS[dialect]
    return wire.Frame(wire.VERSION[dialect], sections=[
        wire.Section("INS", a["INS"], messages=[_state(dialect)]),
        wire.Section("UPD_C", a["UPD_C"], messages=[
            wire.UpdC(0x5F00000000000001 + i, wire.StatePeer(seqlo=i, state=4),
                      wire.StatePeer(state=4), 0xC0FFEE01, 0, 2) for i in range(3)]),
        wire.Section("BUS", a["BUS"], messages=[wire.Bus(0xC0FFEE01, 3725, 2)]),
    ])


def _eth(ip: bytes, v6: bool = False) -> bytes:
    return b"\x01\x00\x5e\x00\x00\xf0" + b"\x02\x00\x00\x00\x00\x01" + \
        struct.pack("!H", 0x86DD if v6 else 0x0800) + ip


def _vlan_eth(ip: bytes) -> bytes:
    return b"\x01\x00\x5e\x00\x00\xf0" + b"\x02\x00\x00\x00\x00\x01" + \
        struct.pack("!HHH", 0x8100, 5, 0x0800) + ip


def _write(path: Path, linktype: int, records: list[bytes], ng: bool = False) -> Path:
    with open(path, "wb") as fh:
        w = (dpkt.pcapng.Writer if ng else dpkt.pcap.Writer)(fh, linktype=linktype)
        for i, rec in enumerate(records):
            w.writepkt(rec, ts=1700000000.0 + i)
    return path


def _ip4(dialect: str, frame: wire.Frame | None = None, ttl: int = 255) -> bytes:
    return wire.encode_ip(frame or _frame(dialect), dialect, "192.0.2.1", "224.0.0.240", ttl=ttl)


def _truncated() -> bytes:
    ip = _ip4("openbsd45")
    return ip[: 20 + 20 + 4 + 240 + 4 + 84 + 10]  # cut inside the 2nd UPD_C


def _run(*args: str) -> tuple[str, str]:
    res = CliRunner().invoke(dump, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.stdout, res.stderr


@pytest.fixture
def eth_pcap(tmp_path: Path) -> Path:
    tcp = dpkt.ethernet.Ethernet(dst=b"\x00" * 6, src=b"\x00" * 6, data=dpkt.ip.IP(
        src=socket.inet_aton(CLIENT), dst=socket.inet_aton(SERVER), p=6,
        data=dpkt.tcp.TCP(sport=1, dport=2)))
    records = [_eth(_ip4("openbsd45")), bytes(tcp), _eth(_truncated()),
               _vlan_eth(_ip4("openbsd45", ttl=64))]
    return _write(tmp_path / "eth.pcap", 1, records)


def test_text_default_and_verbose(eth_pcap: Path) -> None:
    out, _ = _run("--dialect", "openbsd45", str(eth_pcap))
    lines = out.splitlines()
    assert lines[0] == "1700000000.000000 192.0.2.1 > 224.0.0.240: PFSYNCv5 len 560 (ttl 255)"
    assert lines[1:5] == ["    act INS ST count 1", "    act UPD ST COMP count 3",
                          "    act BULK UPD STAT count 1", "    act EOF count 1"]
    # truncated frame: what decoded, the reason, then the next frame
    t = out
    assert "1700000002.000000 192.0.2.1 > 224.0.0.240: PFSYNCv5 len 560 (ttl 255)" in t
    assert "    act UPD ST COMP count 3" in t
    assert "    error: badlen: header len 560 > 362 bytes" in t
    assert "1700000003.000000 192.0.2.1 > 224.0.0.240: PFSYNCv5 len 560 (ttl 64)" in t
    assert "    error: badttl: ttl 64" in t
    assert out.count("PFSYNCv5") == 3  # the TCP packet is not pfsync
    verbose, _ = _run("-v", str(eth_pcap))
    assert (
        "\teth1 tcp 198.51.100.2:34512 -> 203.0.113.10:5201       ESTABLISHED:ESTABLISHED"
        in verbose
    )
    assert "\t   [1000 + 65535] wscale 7  [5000 + 65535] wscale 7" in verbose
    assert "\t   age 00:01:05, expires in 23:59:59, 10:20 pkts, 1000:2000 bytes, rule 0" in verbose
    assert "\tid: 5f00000000000002 creatorid: c0ffee01" in verbose
    assert "\tcreatorid: c0ffee01 age: 01:02:05 status: end" in verbose
    assert "\t hmac: " + "00" * 20 in verbose
    assert "dump: dialect openbsd45" in _run(str(eth_pcap))[1]


def test_json(eth_pcap: Path) -> None:
    out, _ = _run("--json", str(eth_pcap))
    objs = [json.loads(line) for line in out.splitlines()]
    assert len(objs) == 3
    o = objs[0]
    for k in ("ts", "src", "dst", "ttl", "version", "len", "pfcksum", "sections", "errors"):
        assert k in o
    assert (o["ts"], o["src"], o["dst"], o["ttl"], o["version"], o["len"]) == (
        1700000000.0,
        "192.0.2.1",
        "224.0.0.240",
        255,
        5,
        560,
    )
    assert o["pfcksum"] == "00" * 16 and o["errors"] == [] and o["dialect"] == "openbsd45"
    ins = o["sections"][0]
    assert (ins["action"], ins["action_id"], ins["count"]) == ("INS", 1, 1)
    st = ins["messages"][0]
    assert st["id"] == 0x5F00000000000001 and st["creatorid"] == 0xC0FFEE01
    assert st["key"] == [{"addr": [SERVER, CLIENT], "port": [5201, 34512]}] * 2
    assert st["src"]["seqlo"] == 1000 and st["src"]["wscale"] == 0x87 and st["src"]["state"] == 4
    assert st["packets"] == [10, 20] and st["bytes"] == [1000, 2000]
    assert st["rt_addr"] == "0.0.0.0" and st["anchor"] == 0xFFFFFFFF and st["rule"] == 0
    assert st["ifname"] == "eth1" and st["timeout"] == 2 and st["expire"] == 86399
    upd = o["sections"][1]
    assert upd["action"] == "UPD_C" and upd["messages"][1]["id"] == 0x5F00000000000002
    assert "state_flags" not in upd["messages"][1]
    assert o["sections"][2]["messages"] == [{"creatorid": 0xC0FFEE01, "endtime": 3725, "status": 2}]
    assert o["sections"][3] == {"action": "EOF", "action_id": 12, "count": 1,
                                "messages": [{"hmac": "00" * 20}]}
    bad = objs[1]
    assert bad["errors"] == ["badlen: header len 560 > 362 bytes"]
    assert [s["action"] for s in bad["sections"]] == ["INS", "UPD_C"]
    assert len(bad["sections"][1]["messages"]) == 1
    assert objs[2]["ttl"] == 64 and objs[2]["errors"][0] == "badttl: ttl 64"


@pytest.mark.parametrize("dialect", wire.DIALECTS)
def test_raw_ipv6_auto_dialect(tmp_path: Path, dialect: str) -> None:
    ip6 = wire.encode_ip(_frame(dialect), dialect, "2001:db8::1", "ff12::f0")
    path = _write(tmp_path / "v6.pcap", 101, [ip6])
    out, err = _run("--json", str(path))
    o = json.loads(out)
    assert o["dialect"] == dialect and f"dialect {dialect}" in err
    assert (o["src"], o["dst"], o["ttl"]) == ("2001:db8::1", "ff12::f0", 255)
    assert o["errors"] == []
    assert [s["action"] for s in o["sections"]][:3] == ["INS", "UPD_C", "BUS"]
    if dialect == "openbsd6":
        assert o["sections"][0]["messages"][0]["key"][0]["rdomain"] == 0
        assert "state_flags" in o["sections"][1]["messages"][0]


def test_linux_sll_and_sll2_and_pcapng(tmp_path: Path) -> None:
    ip = _ip4("freebsd1400")
    sll = struct.pack("!HHH8sH", 0, 1, 6, b"\x02" * 8, 0x0800) + ip
    sll2 = struct.pack("!HHIHBB8s", 0x0800, 0, 2, 1, 0, 6, b"\x02" * 8) + ip
    for name, lt, rec, ng in [("sll.pcap", 113, sll, False), ("sll2.pcap", 276, sll2, False),
                              ("eth.pcapng", 1, _eth(ip), True)]:
        path = _write(tmp_path / name, lt, [rec], ng=ng)
        out, _ = _run("--dialect", "freebsd1400", "--json", str(path))
        o = json.loads(out)
        assert o["sections"][0]["action"] == "INS" and o["sections"][0]["action_id"] == 13, name
        assert o["sections"][0]["messages"][0]["rtableid"] == 0


def test_pfsync_linktype_and_v4(tmp_path: Path) -> None:
    payload = wire.encode(_frame("openbsd45"), "openbsd45")
    v4 = legacy.encode_v4(legacy.V4Frame(5, [legacy.StateDel(7, 8, 4, 4)]))
    path = _write(tmp_path / "pfsync.pcap", 246, [payload, _ip4("openbsd45"), v4])
    out, _ = _run(str(path))
    assert out.startswith("1700000000.000000 PFSYNCv5 len 560\n")
    assert "1700000001.000000 192.0.2.1 > 224.0.0.240: PFSYNCv5 len 560 (ttl 255)" in out
    assert "1700000002.000000 PFSYNCv4 count 1\n    act DEL ST COMP count 1" in out


def test_subprocess(eth_pcap: Path) -> None:
    exe = Path(sys.executable).parent / "pfcluster"
    res = subprocess.run([str(exe), "dump", "--json", str(eth_pcap)], capture_output=True,
                         text=True, timeout=60, check=True)
    assert len(res.stdout.splitlines()) == 3
    assert json.loads(res.stdout.splitlines()[0])["len"] == 560


@pytest.mark.root
def test_live_loopback() -> None:
    """-i reads an AF_PACKET socket; send one pfsync packet over lo while it listens."""
    import os
    import threading
    import time

    if os.geteuid() != 0:
        pytest.skip("needs root for AF_PACKET / raw sockets")
    payload = wire.encode(_frame("openbsd45"), "openbsd45")

    def send() -> None:
        time.sleep(0.5)
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 240)
        try:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)
            s.sendto(payload, ("127.0.0.1", 0))
        finally:
            s.close()

    t = threading.Thread(target=send)
    t.start()
    try:
        out, _ = _run("-i", "lo", "--count", "1", "--seconds", "5", "--json")
    finally:
        t.join()
    o = json.loads(out.splitlines()[0])
    assert (o["src"], o["dst"], o["ttl"], o["len"]) == ("127.0.0.1", "127.0.0.1", 255, 560)
