"""--pflog: struct pfloghdr, the pcap records, rotation and rate; read back by tcpdump,
tshark and dpkt, not only by our own code."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import dpkt
import pytest
from click.testing import CliRunner

from pfcluster.cli.replay import replay
from pfcluster.io.pflog import (
    LINKTYPE_PFLOG,
    PFLOG_HDRLEN,
    PflogError,
    PflogWriter,
    pfloghdr,
    wanted,
)

DATA = Path(__file__).resolve().parent.parent / "src" / "pfcluster" / "data"
IFACES = ["--iface", "em0=198.51.100.0/24", "--iface", "em1=203.0.113.0/24"]
# a minimal IPv4/TCP SYN 198.51.100.2:40000 -> 203.0.113.10:5201, checksum left 0
SYN = bytes.fromhex("45000028000100004006 0000 c6336402 cb00710a"
                    "9c401451 000003e8 00000000 5002faf0 0000 0000".replace(" ", ""))


def records(path: Path) -> list[tuple[int, int, bytes]]:
    """(caplen, len, data) of each record, read with explicit offsets."""
    data = path.read_bytes()
    magic, _, _, _, _, _, linktype = struct.unpack_from("<IHHiIII", data, 0)
    assert (magic, linktype) == (0xA1B2C3D4, LINKTYPE_PFLOG)
    out, off = [], 24
    while off < len(data):
        _, _, caplen, wire = struct.unpack_from("<IIII", data, off)
        out.append((caplen, wire, data[off + 16:off + 16 + caplen]))
        off += 16 + caplen
    assert off == len(data)
    return out


def verdict(action: str = "block", reason: str = "match", nr: int = 3, log: bool = True,
            log_all: bool = False, state: object = None, new_state: bool = False) -> object:
    rule = SimpleNamespace(nr=nr, log=log, log_all=log_all)
    return SimpleNamespace(action=action, reason=reason, rule=rule, state=state,
                           new_state=new_state)


def test_pfloghdr_layout() -> None:
    h = pfloghdr(1, 10, "c0", 7, 2, 24)
    assert len(h) == PFLOG_HDRLEN == 64
    length, af, action, reason = h[:4]
    assert (length, af, action, reason) == (61, 24, 1, 10)  # PFLOG_REAL_HDRLEN, BSD AF_INET6
    assert h[4:20].rstrip(b"\0") == b"c0" and h[20:36] == bytes(16)  # ifname, main ruleset
    assert struct.unpack_from("!II", h, 36) == (7, 0xFFFFFFFF)  # rulenr, no subrule
    assert struct.unpack_from("!IiIi", h, 44) == (0xFFFFFFFF, -1, 0xFFFFFFFF, -1)  # no uid/pid
    assert h[60] == 2  # dir PF_OUT
    long = pfloghdr(0, 0, "x" * 40, 1, 1, 2)
    assert long[4:20] == b"x" * 15 + b"\0"  # IFNAMSIZ with its NUL


def test_what_pf_logs() -> None:
    assert wanted(verdict())  # a `log` rule's own verdict
    assert not wanted(verdict(log=False))
    assert not wanted(SimpleNamespace(rule=None, state=None, new_state=False, action="pass"))
    st = object()
    assert wanted(verdict("pass", state=st, new_state=True))  # the packet making the state
    # later packets of the state: only with log (all)
    assert not wanted(verdict("pass", "state", state=st))
    assert wanted(verdict("pass", "state", log_all=True, state=st))
    # a state's packet that failed the window check: pf logs it only when forced
    assert not wanted(verdict("block", "state-mismatch", log_all=True, state=st))


def test_caplen_is_honest_and_rate_bounded(tmp_path: Path) -> None:
    path = tmp_path / "pflog"
    w = PflogWriter(str(path), rate=5)
    for _ in range(20):
        w.packet(verdict(), 1, "c0", SYN, 1500, now=100.0, ts=1700000000.5)
    assert (w.written, w.dropped_rate) == (5, 15)
    w.packet(verdict(), 1, "c0", SYN, 1500, now=100.4, ts=1700000001.0)  # 2 tokens back
    w.packet(verdict(), 1, "c0", SYN, 1500, now=100.4, ts=1700000001.0)
    w.packet(verdict(), 1, "c0", SYN, 1500, now=100.4, ts=1700000001.0)
    assert (w.written, w.dropped_rate) == (7, 16)
    w.close()
    recs = records(path)
    assert len(recs) == 7
    caplen, wire, data = recs[0]
    assert (caplen, wire) == (64 + len(SYN), 64 + 1500)
    assert data[64:] == SYN
    # dpkt reads the same file and link type
    with path.open("rb") as fh:
        reader = dpkt.pcap.Reader(fh)
        assert reader.datalink() == LINKTYPE_PFLOG
        assert [len(buf) for _ts, buf in reader] == [caplen] * 7


def test_rotation_reopen_and_refusal(tmp_path: Path) -> None:
    path = tmp_path / "pflog"
    w = PflogWriter(str(path), max_bytes=24 + 3 * (16 + 64 + len(SYN)), rate=None)
    for _ in range(4):
        w.packet(verdict(), 1, "c0", SYN, len(SYN), now=0.0)
    w.flush()
    assert w.rotations == 1
    assert len(records(Path(str(path) + ".1"))) == 3 and len(records(path)) == 1
    # an outside rotation, then SIGHUP's reopen: a new file at the same path
    path.rename(tmp_path / "old")
    w.reopen()
    w.packet(verdict(), 1, "c0", SYN, len(SYN), now=0.0)
    w.flush()
    assert len(records(path)) == 1
    w.close()
    # a restarted daemon appends; replay (fresh) starts over
    PflogWriter(str(path), rate=None).close()
    assert len(records(path)) == 1
    PflogWriter(str(path), rate=None, fresh=True).close()
    assert records(path) == []
    other = tmp_path / "notes.txt"
    other.write_text("not a capture\n")
    with pytest.raises(PflogError, match="not a pflog pcap"):
        PflogWriter(str(other))
    assert other.read_text() == "not a capture\n"
    with pytest.raises(PflogError, match="No such file"):
        PflogWriter(str(tmp_path / "missing" / "pflog"))


def test_write_error_stops_writing_not_the_caller(tmp_path: Path) -> None:
    w = PflogWriter(str(tmp_path / "pflog"), rate=None)
    w.close()  # as after a failed write or reopen
    w.packet(verdict(), 1, "c0", SYN, len(SYN), now=0.0)
    assert (w.written, w.dropped_error) == (0, 1)


def replay_pflog(tmp_path: Path) -> Path:
    """sample.pcap through sample.conf (`block log all`) plus a `log (all)` pass rule."""
    conf = tmp_path / "log.conf"
    conf.write_text((DATA / "sample.conf").read_text().replace(
        "pass in on $client proto tcp", "pass in log (all) on $client proto tcp"))
    out = tmp_path / "out.pflog"
    res = CliRunner().invoke(replay, ["--rules", str(conf), *IFACES, "--pflog", str(out),
                                      str(DATA / "sample.pcap")])
    assert res.exit_code == 0, res.output
    return out


def test_replay_pflog_read_by_our_reader(tmp_path: Path) -> None:
    recs = records(replay_pflog(tmp_path))
    blocks = [r for r in recs if r[2][2] == 1]
    passes = [r for r in recs if r[2][2] == 0]
    assert blocks and passes
    assert {struct.unpack_from("!I", r[2], 36)[0] for r in blocks} == {0}
    assert {struct.unpack_from("!I", r[2], 36)[0] for r in passes} == {1}


def test_replay_pflog_refuses_a_foreign_file(tmp_path: Path) -> None:
    other = tmp_path / "x.txt"
    other.write_text("hello\n")
    res = CliRunner().invoke(replay, ["--rules", str(DATA / "sample.conf"), *IFACES,
                                      "--pflog", str(other), str(DATA / "sample.pcap")])
    assert res.exit_code == 1
    assert "not a pflog pcap" in res.output and "Traceback" not in res.output
    assert other.read_text() == "hello\n"


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump not installed "
                    "(scripts/install installs it)")
def test_tcpdump_prints_rule_action_direction_interface(tmp_path: Path) -> None:
    out = replay_pflog(tmp_path)
    res = subprocess.run(["tcpdump", "-n", "-e", "-r", str(out)], capture_output=True,
                         text=True, timeout=30, check=True)
    lines = res.stdout.splitlines()
    assert "link-type PFLOG" in res.stderr
    blocked = [ln for ln in lines if "rule 0/0(match): block in on em0: " in ln]
    assert blocked and all("203.0.113.10.22: Flags [S]" in ln for ln in blocked), lines
    assert any("rule 1/0(match): pass in on em0: 198.51.100.2.40000 > 203.0.113.10.5201: "
               "Flags [S]" in ln for ln in lines), lines
    # log (all): the state's replies are logged too, on the interface they were tested on
    assert any("rule 1/0(match): pass out on em0: 203.0.113.10.5201 > " in ln
               for ln in lines), lines


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed "
                    "(scripts/install installs it)")
def test_tshark_decodes_the_pflog_header(tmp_path: Path) -> None:
    out = replay_pflog(tmp_path)
    res = subprocess.run(["tshark", "-r", str(out), "-T", "fields", "-e", "pflog.rulenr",
                          "-e", "pflog.action", "-e", "pflog.dir", "-e", "pflog.ifname",
                          "-e", "pflog.reason", "-e", "tcp.dstport", "-e", "pflog.pid"],
                         capture_output=True, text=True, timeout=60, check=True)
    rows = {tuple(line.split("\t")) for line in res.stdout.splitlines() if line}
    assert ("0", "1", "1", "em0", "0", "22", "-1") in rows, rows  # block in on em0, port 22
    assert ("1", "0", "1", "em0", "0", "5201", "-1") in rows, rows  # pass in on em0
    assert ("1", "0", "2", "em0", "0", "40000", "-1") in rows, rows  # the reply, out on em0
