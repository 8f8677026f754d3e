"""The Wireshark dissector (data/pfsync.lua) against `pfcluster dump --json`, field by
field, through the real tshark run unprivileged (Wireshark refuses Lua as root by
design): every message type of every dialect, malformed frames, the shipped sample."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pfcluster.cli.dump import dump, frame_dict, guess_dialect
from pfcluster.cli.wireshark import shipped_path, wireshark
from pfcluster.io.capture import iter_pfsync
from pfcluster.pfsync import luagen, wire
from pfsync_samples import every_message, ip4, malformed, write_pcap

SAMPLE = Path(__file__).resolve().parent.parent / "src" / "pfcluster" / "data" / "sample.pcap"
REQUIRED = ("pfsync.version", "pfsync.len", "pfsync.pfcksum", "pfsync.action", "pfsync.count",
            "pfsync.state.id", "pfsync.state.creatorid", "pfsync.state.ifname",
            "pfsync.state.proto", "pfsync.state.af", "pfsync.state.timeout",
            "pfsync.state.key.addr", "pfsync.state.key.port", "pfsync.state.src.seqlo",
            "pfsync.state.dst.seqlo", "pfsync.eof.hmac")
REASONS = ("hdrops", "badver", "badlen", "badact", "badval")
SEP = "\x1f"  # never in a field: the dissector escapes non-printable bytes


def test_generated_tables_are_current() -> None:
    text = luagen.LUA_PATH.read_text()
    assert luagen.splice(text, luagen.render()) == text, \
        "run: python -m pfcluster.pfsync.luagen"


def test_cli_path_and_install(tmp_path: Path) -> None:
    res = CliRunner().invoke(wireshark, ["--path"])
    assert res.exit_code == 0 and Path(res.stdout.strip()) == shipped_path()
    assert shipped_path().read_text().startswith("-- pfsync.lua")
    res = CliRunner().invoke(wireshark, ["--install", "--dir", str(tmp_path / "plugins")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "plugins" / "pfsync.lua").read_bytes() == shipped_path().read_bytes()
    res = CliRunner().invoke(wireshark, [])
    assert res.exit_code == 2 and "exactly one of --install or --path" in res.output


# --------------------------------------------------------------------------- tshark


def _unprivileged(home: Path) -> list[str]:
    """The command prefix that runs tshark as nobody (runuser resets HOME, so env sets
    it again: the personal plugin directory lives under it)."""
    if os.geteuid() != 0:
        return ["env", f"HOME={home}"]
    if shutil.which("runuser"):
        return ["runuser", "-u", "nobody", "--", "env", f"HOME={home}"]
    pytest.skip("running as root and no runuser to drop to nobody (Wireshark refuses Lua as root)")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged tshark can read (pytest's tmp_path is root-only)."""
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed (scripts/install installs it)")
    d = Path(tempfile.mkdtemp(prefix="pfsync-lua-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def _tshark(d: Path, pcap: Path, args: list[str], lua: bool = True) -> str:
    pcap.chmod(0o644)
    cmd = [*_unprivileged(d), "tshark", "-n", "-r", str(pcap)]
    if lua:
        script = d / "pfsync.lua"
        shutil.copyfile(shipped_path(), script)
        script.chmod(0o644)
        cmd += ["-X", f"lua_script:{script}"]
    res = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Lua Error" not in res.stdout + res.stderr, res.stdout + res.stderr
    return res.stdout


def _tshark_fields(d: Path, pcap: Path, names: list[str], *extra: str) -> list[dict[str, str]]:
    cols = ["frame.number", "_ws.expert.message", *names]
    args = ["-T", "fields", "-E", "occurrence=a", "-E", f"aggregator={SEP}",
            "-E", "separator=/t", "-Y", "ip.proto == 240", *extra]
    for c in cols:
        args += ["-e", c]
    out = _tshark(d, pcap, args)
    return [dict(zip(cols, line.split("\t"), strict=True)) for line in out.splitlines()]


def _dump_json(pcap: Path) -> list[dict[str, Any]]:
    res = CliRunner().invoke(dump, [str(pcap), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.stdout.splitlines()]


def _addr_field(name: str, text: str) -> str:
    """Which of the dissector's fields an address dump printed lands in: IPv4, IPv6, or
    raw bytes when the af byte names neither (dump prints those as hex)."""
    return name + ("6" if ":" in text else "" if "." in text else "_raw")


def _message_fields(action: str, m: Any, put: Any) -> None:
    """The tshark fields one dump JSON message shows as, in tree order."""
    if isinstance(m, str):  # a skipped openbsd6 message, as hex
        put("raw", m)
        return
    prefix = {"CLR": "clr.", "BUS": "bus.", "TDB": "tdb.", "EOF": "eof."}.get(action, "state.")
    for name, v in m.items():
        if prefix == "tdb." and name == "dst":
            continue  # dump prints the sockaddr as text, the dissector as bytes
        if name == "key":
            for k in v:
                for a in k["addr"]:
                    put(_addr_field("state.key.addr", a), a)
                for p in k["port"]:
                    put("state.key.port", p)
                for extra in ("rdomain", "af"):
                    if extra in k:
                        put("state.key." + extra, k[extra])
        elif name in ("src", "dst"):
            for f, x in v.items():
                put(f"state.{name}.{f}", x)
        elif name == "rt_addr":
            put(_addr_field("state.rt_addr", v), v)
        elif isinstance(v, list):
            for x in v:
                put(prefix + name, x)
        else:
            put(prefix + name, v)


def _expected(frame: dict[str, Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}

    def put(name: str, v: Any) -> None:
        out.setdefault("pfsync." + name, []).append(v)

    if frame["pfcksum"] is not None:
        put("version", frame["version"])
        put("len", frame["len"])
        put("pfcksum", frame["pfcksum"])
    for sec in frame["sections"]:
        put("action", sec["action_id"])
        put("action.name", sec["action"])
        put("count", sec["count"])
        for m in sec["messages"]:
            _message_fields(sec["action"], m, put)
    return out


def _escaped(text: str) -> str:
    """dump's latin-1 text as the dissector shows C strings (non-printables as \\xNN)."""
    return "".join(c if " " <= c < "\x7f" and c != "\\" else f"\\x{ord(c):02x}" for c in text)


def _same(expected: list[Any], shown: str) -> bool:
    got = shown.split(SEP) if shown != "" else []
    if expected == [""] and got == []:
        return True
    if len(got) != len(expected):
        return False
    return all((int(g, 0) == e) if isinstance(e, int) else (g == _escaped(e))
               for e, g in zip(expected, got, strict=True))


def _dump_each(pcap: Path) -> list[dict[str, Any]]:
    """What `dump --json` prints for each frame as the first of its capture (no dialect
    carried over from the frame before, as the dissector has none)."""
    return [frame_dict(p, guess_dialect(p.payload), []) for p in iter_pfsync(pcap)]


def _compare(d: Path, pcap: Path, frames: list[dict[str, Any]] | None = None
             ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    frames = _dump_json(pcap) if frames is None else frames
    expected = [_expected(f) for f in frames]
    names = sorted({n for e in expected for n in e} | set(REQUIRED) | {"pfsync.dialect"})
    rows = _tshark_fields(d, pcap, names)
    assert len(rows) == len(frames)
    for f, exp, row in zip(frames, expected, rows, strict=True):
        where = f"frame {row['frame.number']}"
        for name in names:
            if name == "pfsync.dialect":
                continue
            assert _same(exp.get(name, []), row[name]), (where, name, exp.get(name), row[name])
        shown = [m for m in row["_ws.expert.message"].split(SEP) if m.split(":")[0] in REASONS]
        for err in f["errors"]:
            # dump names the version of the dialect it tried, the dissector both
            same = err if not err.startswith("badver") else err.split(",")[0] + ", expected 5 or 6"
            assert same in shown, (where, err, shown)
        if not f["errors"]:
            assert shown == [], (where, shown)
        if f["pfcksum"] is not None and not any(e.startswith("badver") for e in f["errors"]):
            assert row["pfsync.dialect"] == f["dialect"], where
    return frames, rows


def test_every_message_every_dialect(shared_dir: Path) -> None:
    pcap = write_pcap(shared_dir / "every.pcap",
                      [ip4(wire.encode(every_message(d), d)) for d in wire.DIALECTS])
    frames, rows = _compare(shared_dir, pcap)
    assert [f["dialect"] for f in frames] == list(wire.DIALECTS)
    # every field the issue names shows up, with the values dump printed
    for name in REQUIRED:
        assert any(r[name] for r in rows), name
    assert rows[0]["pfsync.eof.hmac"] == bytes(range(1, 21)).hex()
    assert "2001:db8::10" in rows[3]["pfsync.state.key.addr6"]


def test_malformed_frames(shared_dir: Path) -> None:
    cases = malformed()
    pcap = write_pcap(shared_dir / "bad.pcap", [ip4(p) for _, p in cases])
    _frames, rows = _compare(shared_dir, pcap)
    for (reason, _), row in zip(cases, rows, strict=True):
        assert reason in row["_ws.expert.message"], (reason, row["_ws.expert.message"])


def test_sample_capture_and_installed_plugin(shared_dir: Path) -> None:
    """The shipped sample (plain TCP) gives no pfsync rows; installed with --install into
    the unprivileged user's plugin dir, tshark loads the dissector without -X."""
    sample = shared_dir / "sample.pcap"
    shutil.copyfile(SAMPLE, sample)
    assert _dump_json(sample) == []
    assert _tshark_fields(shared_dir, sample, ["pfsync.version"]) == []
    plugins = shared_dir / ".local" / "lib" / "wireshark" / "plugins"
    res = CliRunner().invoke(wireshark, ["--install", "--dir", str(plugins)])
    assert res.exit_code == 0, res.output
    for p in (shared_dir / ".local", shared_dir / ".local" / "lib", plugins.parent, plugins):
        p.chmod(0o755)
    (plugins / "pfsync.lua").chmod(0o644)
    pcap = write_pcap(shared_dir / "one.pcap", [ip4(wire.encode(every_message("openbsd6"),
                                                                "openbsd6"))])
    out = _tshark(shared_dir, pcap, ["-T", "fields", "-e", "pfsync.dialect", "-e", "pfsync.count"],
                  lua=False)
    assert out.split("\t")[0] == "openbsd6"


def _mutants(n: int, seed: int = 13) -> list[bytes]:
    """Valid frames of every dialect with bytes overwritten, cut or grown: the kinds of
    damage the walkers must bound (counts, lengths, actions, af and timeout bytes)."""
    rng = random.Random(seed)
    good = [wire.encode(every_message(d), d) for d in wire.DIALECTS]
    out = []
    for _ in range(n):
        b = bytearray(rng.choice(good))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.5:
                b[rng.randrange(len(b))] = rng.randrange(256)
            elif op < 0.7:  # keep a byte: IP does not call a dissector on no payload
                del b[rng.randrange(1, len(b)):]
            elif op < 0.85:
                b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
            else:  # a subheader-looking spot: action or count
                off = rng.choice([20, 24, 44, 64, 284])
                if off + 4 <= len(b):
                    b[off + rng.choice([0, 2, 3])] = rng.randrange(256)
        out.append(bytes(b[:1400]))
    return out


def test_mutated_frames_match_dump(shared_dir: Path) -> None:
    """On damaged frames the dissector never hits a Lua error, and shows what dump shows
    for each frame on its own."""
    mutants = _mutants(int(os.environ.get("PFCLUSTER_LUA_MUTANTS", "300")))
    pcap = write_pcap(shared_dir / "mutants.pcap", [ip4(p) for p in mutants])
    frames = _dump_each(pcap)
    assert len(frames) == len(mutants)
    assert sum(bool(f["errors"]) for f in frames) > len(mutants) // 2  # really damaged
    _compare(shared_dir, pcap, frames)


def test_v5_layout_preference(shared_dir: Path) -> None:
    """The preference forces a layout: an OpenBSD 4.5 frame read as FreeBSD 1301 ends in
    the receiver's error (its EOF carries a body FreeBSD does not expect)."""
    pcap = write_pcap(shared_dir / "pref.pcap",
                      [ip4(wire.encode(every_message("openbsd45"), "openbsd45"))])
    (auto,) = _tshark_fields(shared_dir, pcap, ["pfsync.dialect"])
    (forced,) = _tshark_fields(shared_dir, pcap, ["pfsync.dialect"],
                               "-o", "pfsync.v5_layout:freebsd1301")
    assert auto["pfsync.dialect"] == "openbsd45" and "badlen" not in auto["_ws.expert.message"]
    assert forced["pfsync.dialect"] == "freebsd1301"
    assert "badlen" in forced["_ws.expert.message"] or "badact" in forced["_ws.expert.message"]


def test_sync_key_authenticator_fields(shared_dir: Path) -> None:
    """Frames sealed by `--sync-key` (4.5: in the EOF's hmac[20]; FreeBSD 14: a trailer):
    the dissector shows key id, sender, counter and tag as pfsync/auth.py wrote them."""
    from pfcluster.pfsync import auth

    keys = auth.parse_keys("7 " + "ab" * 32)
    frames, want = [], []
    for dialect in ("openbsd45", "freebsd1400"):
        sealed = auth.Sealer(keys, 0xC0FFEE01, dialect, clock=lambda: 0x123456789ABCDE).seal(
            wire.encode(every_message(dialect), dialect=dialect))
        got = auth.read(sealed, dialect)
        assert got is not None
        frames.append(ip4(sealed))
        want.append(got)
    pcap = write_pcap(shared_dir / "auth.pcap", frames)
    rows = _tshark_fields(shared_dir, pcap, ["pfsync.auth.keyid", "pfsync.auth.sender",
                                             "pfsync.auth.counter", "pfsync.auth.tag"])
    assert len(rows) == 2
    for row, a in zip(rows, want, strict=True):
        assert int(row["pfsync.auth.keyid"]) == a.key_id == 7
        assert int(row["pfsync.auth.sender"], 16) == a.sender == 0xC0FFEE01
        assert int(row["pfsync.auth.counter"]) == a.counter
        assert row["pfsync.auth.tag"].replace(":", "") == a.tag.hex()
