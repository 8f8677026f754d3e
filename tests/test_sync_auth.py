"""Authenticated sync (`--sync-key`, pfsync/auth.py) without root: sealing in every
dialect, every way a frame is refused, rotation, restart, the key file's checks, the
daemon's send/receive wiring (a forged or replayed frame touches no state; the same
frame without a key does), dump --key, and the verifier fuzzed."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import dpkt
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from conftest import FUZZ_EXAMPLES, fuzz_settings
from pfcluster.io.config import ConfigError, DaemonConfig
from pfcluster.io.keyfile import load_key_file
from pfcluster.pfsync import auth, wire

K1, K2 = bytes(range(32)), bytes(range(100, 132))
ACID = 0x0A0A0A0A  # the creator id of the sending firewall A in the daemon tests


def ring(*keys: tuple[int, bytes]) -> auth.KeyRing:
    return auth.KeyRing(keys or [(1, K1)])


def clr_frame(dialect: str, creatorid: int = 5) -> bytes:
    a = wire.ACTIONS[dialect]
    return wire.encode(wire.Frame(wire.VERSION[dialect], None, bytes(16), [
        wire.Section("CLR", a["CLR"], 1, [wire.Clr("", creatorid)])]), dialect)


class Clock:
    """A counter clock the test moves by hand (microseconds)."""

    def __init__(self, t: int = 1_700_000_000_000_000) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


@pytest.mark.parametrize("dialect", wire.DIALECTS)
def test_seal_verify_every_dialect(dialect: str) -> None:
    frame = clr_frame(dialect)
    sealed = auth.Sealer(ring(), 0x1234, dialect).seal(frame)
    assert len(sealed) == len(frame) + auth.overhead(dialect)
    if dialect == "openbsd45":  # the thesis' hmac field: same length, only its 20 bytes differ
        assert auth.overhead(dialect) == 0
        assert sealed[:-20] == frame[:-20] and frame[-20:] == bytes(20) != sealed[-20:]
    else:  # the frame untouched, the trailer after header.len
        assert sealed[: len(frame)] == frame
    verdict, body = auth.Verifier(ring(), dialect).check(sealed)
    assert verdict == auth.OK
    assert body == (sealed if dialect == "openbsd45" else frame)
    got = wire.decode(body, dialect)
    assert [s.action for s in got.sections][:1] == ["CLR"] and not got.errors
    fields = auth.read(sealed, dialect)
    assert fields is not None and (fields.key_id, fields.sender) == (1, 0x1234)


@pytest.mark.parametrize("dialect", ["openbsd45", "freebsd1400", "openbsd6"])
def test_every_refusal_is_counted(dialect: str) -> None:
    frame = clr_frame(dialect)
    sealer = auth.Sealer(ring(), 7, dialect)
    v = auth.Verifier(ring(), dialect)
    good = sealer.seal(frame)
    assert v.check(frame) == (auth.NONE, None)  # what an unkeyed sender sends
    assert v.check(frame[:30])[0] == auth.SHORT  # too short to carry one
    other_id = auth.Sealer(ring((9, K1)), 7, dialect).seal(frame)
    assert v.check(other_id) == (auth.KEYID, None)
    wrong_key = auth.Sealer(ring((1, K2)), 7, dialect).seal(frame)
    assert v.check(wrong_key) == (auth.MAC, None)
    for i in range(len(good)):  # every byte is covered, the tag included
        bad = bytearray(good)
        bad[i] ^= 0x01
        assert v.check(bytes(bad))[0] != auth.OK, i
    assert v.check(good)[0] == auth.OK
    assert v.check(good) == (auth.REPLAY, None)
    c = v.counters
    assert (c["auth_ok"], c["auth_replay"], c["auth_keyid"]) == (1, 1, 1)
    assert c["badauth"] == 4 + len(good)
    # none: the unkeyed frame, the short one, key id 1 flipped to 0, and (trailer) the
    # two header.len bytes flipped so that the trailer is no longer after header.len
    assert c["auth_none"] == 3 + 2 * (dialect != "openbsd45")


def test_counter_monotonic_reorder_window_and_restart() -> None:
    clock = Clock()
    s = auth.Sealer(ring(), 1, "openbsd45", clock=clock)
    frames = [s.seal(clr_frame("openbsd45")) for _ in range(auth.WINDOW + 10)]
    counters = [auth.read(f, "openbsd45").counter for f in frames]  # type: ignore[union-attr]
    assert counters == list(range(clock.t, clock.t + len(frames)))  # a stopped clock: +1 each
    v = auth.Verifier(ring(), "openbsd45")
    assert v.check(frames[5])[0] == auth.OK
    assert [v.check(f)[0] for f in frames[:5]] == [auth.OK] * 5  # reordered, within the window
    for f in frames[6:]:
        assert v.check(f)[0] == auth.OK
    assert v.check(frames[0])[0] == auth.REPLAY  # below the window's floor now
    assert v.check(frames[-3])[0] == auth.REPLAY  # within it, seen
    # a restarted sender (fresh counter state) seeds from the clock, which moved on
    clock.t += 10_000_000
    again = auth.Sealer(ring(), 1, "openbsd45", clock=clock).seal(clr_frame("openbsd45"))
    assert v.check(again)[0] == auth.OK
    assert v.check(frames[-1])[0] == auth.REPLAY
    # another sender has its own window: its low counter is not a replay of sender 1's
    assert v.check(auth.Sealer(ring(), 2, "openbsd45", clock=Clock(5)).seal(
        clr_frame("openbsd45")))[0] == auth.OK


def test_rotation_without_downtime() -> None:
    """Step 1: everyone accepts both keys (still sending key 1); step 2: senders switch
    to key 2; step 3: key 1 goes. No frame is refused at any step, and the sender's
    counter (and the receivers' window) carries over the key change."""
    clock = Clock()
    a = auth.Sealer(ring((1, K1)), 1, "openbsd6", clock=clock)
    b = auth.Verifier(ring((1, K1)), "openbsd6")
    f = clr_frame("openbsd6")
    assert b.check(a.seal(f))[0] == auth.OK
    b.keys = ring((1, K1), (2, K2))
    a.keys = ring((1, K1), (2, K2))
    assert b.check(a.seal(f))[0] == auth.OK
    a.keys = ring((2, K2), (1, K1))
    sent2 = a.seal(f)
    assert auth.read(sent2, "openbsd6").key_id == 2  # type: ignore[union-attr]
    assert b.check(sent2)[0] == auth.OK
    b.keys = a.keys = ring((2, K2))
    assert b.check(a.seal(f))[0] == auth.OK
    assert b.check(sent2)[0] == auth.REPLAY
    old = auth.Sealer(ring((1, K1)), 1, "openbsd6", clock=Clock(clock.t + 99)).seal(f)
    assert b.check(old)[0] == auth.KEYID  # the retired key is refused


def test_parse_keys_errors_never_show_the_key() -> None:
    good = auth.parse_keys(f"# comment\n\n2 {K2.hex()}  # sends\n1 {K1.hex()}\n")
    assert good.send_id == 2 and good.ids == (2, 1)
    secret = "ab" * 20
    for text, want in (
        ("", "no key"),
        (f"1 {secret}\n1 {secret}", "appears twice"),
        (f"0 {secret}", "not 1..255"),
        (f"300 {secret}", "not 1..255"),
        ("1 abcd", "2 bytes"),
        (f"1 {secret}zz", "not hexadecimal"),
        (f"x {secret}", "want `ID HEX`"),
        (f"1 {secret} extra", "want `ID HEX`"),
        (f"1 {secret}\n2 {secret}\n3 {secret}", "3 keys"),
    ):
        with pytest.raises(auth.KeyError_, match=want) as info:
            auth.parse_keys(text, "F")
        assert secret not in str(info.value)


def test_key_file_mode_and_kind(tmp_path: Path) -> None:
    p = tmp_path / "sync.key"
    p.write_text(f"1 {K1.hex()}\n")
    os.chmod(p, 0o644)
    with pytest.raises(auth.KeyError_, match=r"mode 0644 .* must be 0600 \(chmod 600"):
        load_key_file(str(p))
    os.chmod(p, 0o600)
    assert load_key_file(str(p)).send_id == 1
    link = tmp_path / "link.key"
    link.symlink_to(p)
    with pytest.raises(auth.KeyError_, match=r"link\.key: Too many levels of symbolic links"):
        load_key_file(str(link))
    with pytest.raises(auth.KeyError_, match="No such file"):
        load_key_file(str(tmp_path / "missing"))
    with pytest.raises(auth.KeyError_, match="not a regular file"):
        load_key_file(str(tmp_path))


def test_config_refuses_v4_with_a_key() -> None:
    with pytest.raises(ConfigError, match="v4"):
        DaemonConfig(rules="r", syncdev="s", protocol="v4", sync_key="k").validate()


# --- the daemon's wiring (io/loop.py), real Filter and Engine, no sockets --------------

RULES = "pass all\n"


def _key_file(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    os.chmod(p, 0o600)
    return str(p)


def _daemon(tmp_path: Path, key: str | None, hostid: int, dialect: str) -> Any:
    from pfcluster.io.loop import Daemon

    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    cfg = DaemonConfig(rules=str(rules), syncdev="sync0", hostid=hostid, sync_key=key,
                       dialect=dialect, control=str(tmp_path / f"{hostid}.sock")).validate()
    d = Daemon(cfg, install_iptables=False)
    sent: list[bytes] = []
    d.sync.send = sent.append  # type: ignore[method-assign]
    d.sent = sent
    return d


def _state(dialect: str, sid: int) -> wire.State:
    key = wire.StateKey([wire.addr_from_str("203.0.113.10"), wire.addr_from_str("198.51.100.2")],
                        [5201, 40000 + sid])
    return wire.State(
        id=sid, ifname="eth1", key=[key, wire.StateKey(list(key.addr), list(key.port))],
        src=wire.StatePeer(seqlo=1000, seqhi=66535, max_win=65535, state=4, wscale=0x87),
        dst=wire.StatePeer(seqlo=5000, seqhi=70535, max_win=65535, state=4, wscale=0x87),
        creatorid=ACID, af=2, proto=6, direction=2, timeout=2, expire=86399, creation=65,
        packets=[10, 20], bytes=[1000, 2000], rule=0xFFFFFFFF,
        **({"rtableid": 0} if dialect == "freebsd1400" else {}))


def _frame(dialect: str, action: str, msgs: list[Any]) -> bytes:
    a = wire.ACTIONS[dialect]
    return wire.encode(wire.Frame(wire.VERSION[dialect], None, bytes(16),
                                  [wire.Section(action, a[action], len(msgs), msgs)]), dialect)


@pytest.mark.parametrize("dialect", ["openbsd45", "freebsd1400"])
def test_daemon_drops_forged_and_replayed_frames(tmp_path: Path, dialect: str) -> None:
    key = _key_file(tmp_path, "k", f"1 {K1.hex()}\n")
    b = _daemon(tmp_path, key, 0x0B0B0B0B, dialect)
    assert b.engine.config.mtu == 1500 - auth.overhead(dialect)
    a = auth.Sealer(load_key_file(key), ACID, dialect)  # firewall A, holding the key
    ins = a.seal(_frame(dialect, "INS", [_state(dialect, 1), _state(dialect, 2)]))
    b._receive(ins, 1.0, "192.0.2.1")
    assert len(b.filter.states) == 2
    dele = a.seal(_frame(dialect, "DEL_C", [wire.DelC(2, ACID)]))
    b._receive(dele, 1.1, "192.0.2.1")
    assert len(b.filter.states) == 1
    forged = [
        _frame(dialect, "CLR", [wire.Clr("", ACID)]),  # no MAC
        _frame(dialect, "INS", [_state(dialect, 3)]),
        _frame(dialect, "DEL_C", [wire.DelC(1, ACID)]),
        auth.Sealer(ring((1, K2)), ACID, dialect).seal(  # a guessed key
            _frame(dialect, "CLR", [wire.Clr("", ACID)])),
        ins,  # replays: state 2 would come back, then state 1 would go
        dele,
    ]
    for frame in [*forged, ins]:
        b._receive(frame, 2.0, "192.0.2.66")
    assert sorted(s.id for s in b.filter.states) == [1]
    info = b.counters(2.0)["pfsync"]
    assert (info["badauth"], info["auth_replay"], info["auth_ok"]) == (4, 3, 2)
    assert info["ins_received"] == 2 and info["clr_received"] == 0
    # what B sends is sealed with its own creator id, and A's verifier accepts it; B's
    # own frame played back to B is a replay (B has no window for itself)
    b.engine.clear_states(3.0)
    b._flush()
    assert b.sent and auth.read(b.sent[-1], dialect).sender == 0x0B0B0B0B  # type: ignore[union-attr]
    assert auth.Verifier(load_key_file(key), dialect).check(b.sent[-1])[0] == auth.OK
    b._receive(b.sent[-1], 3.1, "192.0.2.66")
    assert b.verifier.counters["auth_replay"] == 4 and b.engine.counters["clr_received"] == 0


def test_without_a_key_the_same_frames_apply(tmp_path: Path) -> None:
    """The control: the forged CLR and the replayed INS do change an unkeyed daemon."""
    b = _daemon(tmp_path, None, 0x0B0B0B0B, "openbsd45")
    ins = _frame("openbsd45", "INS", [_state("openbsd45", 1)])
    b._receive(ins, 1.0, "192.0.2.1")
    b._receive(_frame("openbsd45", "CLR", [wire.Clr("", ACID)]), 1.1, "192.0.2.66")
    assert len(b.filter.states) == 0
    b._receive(ins, 1.2, "192.0.2.66")
    assert len(b.filter.states) == 1


def test_reload_swaps_keys_keeps_windows_refuses_bad_file(tmp_path: Path) -> None:
    key = _key_file(tmp_path, "k", f"1 {K1.hex()}\n")
    b = _daemon(tmp_path, key, 0x0B0B0B0B, "openbsd45")
    a = auth.Sealer(load_key_file(key), ACID, "openbsd45")
    first = a.seal(_frame("openbsd45", "INS", [_state("openbsd45", 1)]))
    b._receive(first, 1.0, "192.0.2.1")
    _key_file(tmp_path, "k", f"2 {K2.hex()}\n1 {K1.hex()}\n")
    assert b.reload()["ok"]
    assert b.sealer.keys.send_id == 2
    b._receive(first, 1.1, "192.0.2.1")
    assert b.verifier.counters["auth_replay"] == 1  # the window survived the reload
    os.chmod(key, 0o640)
    res = b.reload()
    assert not res["ok"] and "mode 0640" in res["error"]
    assert b.sealer.keys.send_id == 2


def test_daemon_command_refuses_an_open_key_file(tmp_path: Path) -> None:
    from pfcluster.cli.daemon import daemon

    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    key = tmp_path / "k"
    key.write_text(f"1 {K1.hex()}\n")
    os.chmod(key, 0o644)
    res = CliRunner().invoke(daemon, ["--rules", str(rules), "--syncdev", "sync0",
                                      "--sync-key", str(key)])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "mode 0644" in lines[0] and "chmod 600" in lines[0], res.output


# --- dump --key ---------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["openbsd45", "freebsd1301"])
def test_dump_shows_and_verifies(tmp_path: Path, dialect: str) -> None:
    import json

    from pfcluster.cli.dump import dump

    key = _key_file(tmp_path, "k", f"1 {K1.hex()}\n")
    sealer = auth.Sealer(load_key_file(key), ACID, dialect)
    good = sealer.seal(_frame(dialect, "INS", [_state(dialect, 1)]))
    tampered = bytearray(good)
    tampered[30] ^= 0xFF
    frames = [good, good, bytes(tampered), _frame(dialect, "CLR", [wire.Clr("", ACID)])]

    def ip(payload: bytes) -> bytes:
        hdr = wire.encode_ip(wire.Frame(5, sections=[]), "openbsd45", "192.0.2.1",
                             "224.0.0.240")[:20]
        total = (20 + len(payload)).to_bytes(2, "big")
        return hdr[:2] + total + hdr[4:10] + b"\0\0" + hdr[12:20] + payload

    path = tmp_path / "s.pcap"
    with open(path, "wb") as fh:
        w = dpkt.pcap.Writer(fh, linktype=101)
        for i, f in enumerate(frames):
            w.writepkt(ip(f), ts=1.0 + i)
    res = CliRunner().invoke(dump, ["--json", "--key", key, str(path)])
    assert res.exit_code == 0, res.output
    docs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [d["auth"]["verdict"] for d in docs] == ["ok", "replay", "mac", "none"]
    assert docs[0]["auth"]["sender"] == f"{ACID:08x}" and docs[0]["dialect"] == dialect
    assert docs[0]["sections"][0]["action"] == "INS" and not docs[0]["errors"]
    res = CliRunner().invoke(dump, [str(path)])
    assert res.exit_code == 0
    assert res.stdout.count(f"auth: key 1 sender {ACID:08x}") == 3 and "[" not in res.stdout
    os.chmod(key, 0o644)
    res = CliRunner().invoke(dump, ["--key", key, str(path)])
    assert res.exit_code == 1 and "mode 0644" in res.output


# --- fuzz -----------------------------------------------------------------------------

_VERIFIERS = {d: auth.Verifier(ring(), d) for d in ("openbsd45", "openbsd6")}
_SEALED = auth.Sealer(ring(), 3, "openbsd45").seal(clr_frame("openbsd45"))


# A quarter of the decoders' count each: the verifier reads 20 bytes at fixed offsets
# and one HMAC (the wire decoders behind it keep 100k); 100k each took 6 minutes.
AUTH_FUZZ = max(1, FUZZ_EXAMPLES // 4)


@fuzz_settings(AUTH_FUZZ)
@given(st.binary(max_size=200), st.sampled_from(sorted(_VERIFIERS)))
def test_fuzz_verifier_any_bytes(data: bytes, where: str) -> None:
    verdict, body = _VERIFIERS[where].check(data)
    assert verdict in (auth.BADAUTH | {auth.REPLAY}) and body is None


@fuzz_settings(AUTH_FUZZ)
@given(st.lists(st.tuples(st.integers(0, len(_SEALED) - 1), st.integers(1, 255)),
                min_size=1, max_size=4), st.booleans())
def test_fuzz_mutated_sealed_frame(flips: list[tuple[int, int]], cut: bool) -> None:
    data = bytearray(_SEALED)
    for i, x in flips:
        data[i] ^= x
    if cut:
        data = data[: flips[0][0]]
    v = auth.Verifier(ring(), "openbsd45")
    verdict, body = v.check(bytes(data))
    assert (verdict == auth.OK) == (bytes(data) == _SEALED)
    assert body is None or body == _SEALED


def test_mac_is_hmac_sha256() -> None:
    """auth.Mac (precomputed pads) gives what the hmac module gives, key sizes 0..100."""
    import hmac

    for n in (0, 1, 16, 32, 63, 64, 65, 100):
        key = secrets.token_bytes(n)
        for msg in (b"", b"x", secrets.token_bytes(1500)):
            want = hmac.digest(key, msg, "sha256")[: auth.TAG_LEN]
            assert auth.Mac(key).tag(msg) == want
            assert auth.Mac(key).tag(memoryview(msg)) == want


def test_random_keys_round_trip() -> None:
    frame = clr_frame("openbsd6")
    for _ in range(50):
        kid = secrets.randbelow(255) + 1
        r = ring((kid, secrets.token_bytes(secrets.choice((16, 32, 64)))))
        sealed = auth.Sealer(r, 9, "openbsd6").seal(frame)
        assert auth.Verifier(r, "openbsd6").check(sealed) == (auth.OK, frame)
        assert auth.Verifier(ring((kid, K1)), "openbsd6").check(sealed)[0] == auth.MAC


def test_workers_get_the_key_and_a_bad_key_stops_the_supervisor(tmp_path: Path) -> None:
    from pfcluster.io.workers import Supervisor, worker_argv

    rules = tmp_path / "pf.conf"
    rules.write_text(RULES)
    key = _key_file(tmp_path, "k", f"1 {K1.hex()}\n")
    cfg = DaemonConfig(rules=str(rules), syncdev="sync0", workers=2, sync_key=key).validate()
    argv = worker_argv(cfg, 1, 0x100)
    assert argv[argv.index("--sync-key") + 1] == key
    os.chmod(key, 0o604)
    with pytest.raises(auth.KeyError_, match="mode 0604"):
        Supervisor(cfg, install_iptables=False)
