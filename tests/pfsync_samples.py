"""pfsync frames for tests that read captures with outside tools: one frame per dialect
carrying every message type that dialect sends (IPv4 and IPv6 states), and malformed
payloads for each error a receiver counts. Written as Ethernet pcap with dpkt."""

from __future__ import annotations

import struct
from pathlib import Path

import dpkt

from pfcluster.pfsync import wire
from pfcluster.pfsync.layout import AF_INET6_WIRE

CID = 0xC0FFEE01
SRC, GROUP = "192.0.2.1", "224.0.0.240"


def state(dialect: str, n: int, v6: bool = False) -> wire.State:
    """A TCP state; ``v6`` gives it IPv6 documentation addresses."""
    if v6:
        a, b = wire.addr_from_str("2001:db8::10"), wire.addr_from_str("2001:db8:1::2")
    else:
        a, b = wire.addr_from_str("203.0.113.10"), wire.addr_from_str("198.51.100.2")
    af = AF_INET6_WIRE[dialect] if v6 else 2
    kaf = af if dialect == "openbsd6" else 0
    keys = [wire.StateKey([a, b], [5201, 34512 + n], rdomain=n, af=kaf),
            wire.StateKey([a, b], [5201, 34512 + n], af=kaf)]
    extra: dict[str, object] = {}
    if dialect == "freebsd1400":
        extra = {"rtableid": 3, "qid": 7, "max_mss": 1400, "set_prio": [1, 2],
                 "rt_ifname": "vtnet1"}
    elif dialect == "openbsd6":
        extra = {"rtableid": [4, 5], "max_mss": 1460, "set_prio": [3, 4], "state_flags": 0x204}
    return wire.State(
        id=0x5F00000000000001 + n, ifname=f"eth{n}", key=keys,
        src=wire.StatePeer(seqlo=1000 + n, seqhi=66535, max_win=65535, state=4, wscale=7,
                           mss=1460),
        dst=wire.StatePeer(seqlo=5000 + n, seqhi=70535, max_win=64240, state=4, wscale=7),
        rt_addr=b if n == 2 else bytes(16),
        creatorid=CID, af=af, proto=6, direction=1 + n % 2, timeout=2, expire=86399 - n,
        creation=65 + n, packets=[10, 20 + n], bytes=[1000, 2000 + n], rule=n, log=1,
        sync_flags=4, updates=n, **extra)


def every_message(dialect: str) -> wire.Frame:
    """A frame with one section of every action ``dialect`` can send."""
    a = wire.ACTIONS[dialect]
    upd_c = [wire.UpdC(0x5F00000000000010 + i, wire.StatePeer(seqlo=100 + i, state=4),
                       wire.StatePeer(seqlo=200 + i, state=4), CID, 30 + i, 2,
                       5 if dialect == "openbsd6" else 0) for i in range(2)]
    tdb = wire.Tdb(0x1234, bytes([16, 2]) + bytes(26), 77, 4096, 50, 3,
                   9 if dialect == "openbsd6" else 0)
    secs = [
        wire.Section("CLR", a["CLR"], messages=[wire.Clr("vio0", CID)]),
        wire.Section("INS", a["INS"], messages=[state(dialect, 0), state(dialect, 1, v6=True)]),
        wire.Section("INS_ACK", a["INS_ACK"], messages=[wire.InsAck(0x5F00000000000001, CID)]),
        wire.Section("UPD", a["UPD"], messages=[state(dialect, 2)]),
        wire.Section("UPD_C", a["UPD_C"], messages=upd_c),
        wire.Section("UPD_REQ", a["UPD_REQ"], messages=[wire.UpdReq(0, 0)]),
        wire.Section("DEL", a["DEL"], messages=[state(dialect, 3, v6=True)]),
        wire.Section("DEL_C", a["DEL_C"], messages=[wire.DelC(0x5F00000000000002, CID)]),
        wire.Section("BUS", a["BUS"], messages=[wire.Bus(CID, 3725, 2)]),
        wire.Section("TDB", a["TDB"], messages=[tdb]),
    ]
    if dialect == "freebsd1400":
        secs.insert(2, wire.Section("INS_1301", a["INS_1301"], messages=[state("freebsd1301", 4)]))
        secs.insert(4, wire.Section("UPD_1301", a["UPD_1301"], messages=[state("freebsd1301", 5)]))
    if dialect == "openbsd45":
        secs.append(wire.Section("EOF", a["EOF"], messages=[wire.Eof(bytes(range(1, 21)))]))
    return wire.Frame(wire.VERSION[dialect], pfcksum=bytes(range(16)), sections=secs)


def ip4(payload: bytes, ttl: int = 255) -> bytes:
    """``payload`` in an IPv4 packet as pfsync sends it (proto 240, TTL 255, DF)."""
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0x10, 20 + len(payload), 0, 0x4000,
                                ttl, 240, 0, bytes([192, 0, 2, 1]), bytes([224, 0, 0, 240])))
    s = sum(struct.unpack("!10H", hdr))
    s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", hdr, 10, ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF)
    return bytes(hdr) + payload


def malformed() -> list[tuple[str, bytes]]:
    """(expected reason, pfsync payload) for each error the dissectors must report."""
    obsd = bytearray(wire.encode(every_message("openbsd45"), "openbsd45"))
    fbsd = bytearray(wire.encode(every_message("freebsd1301"), "freebsd1301"))
    v6 = bytearray(wire.encode(every_message("openbsd6"), "openbsd6"))
    out: list[tuple[str, bytes]] = [("hdrops", bytes(obsd[:10])), ("badver", b"\x07" + obsd[1:])]
    longer = bytearray(fbsd)
    struct.pack_into("!H", longer, 2, len(fbsd) + 100)
    out.append(("badlen", bytes(longer)))
    overrun = bytearray(obsd)
    struct.pack_into("!H", overrun, 20 + 2, 500)  # CLR count 500
    out.append(("badlen", bytes(overrun)))
    cut = bytearray(v6[:300])
    struct.pack_into("!H", cut, 2, 300)
    out.append(("badlen", bytes(cut)))
    f = every_message("openbsd45")
    f.sections[4].messages[1].timeout = 25  # UPD_C[1]
    out.append(("badval", wire.encode(f, "openbsd45")))
    unknown = bytearray(fbsd)
    unknown[20] = 99
    out.append(("badact", bytes(unknown)))
    skipped = bytearray(v6)
    skipped[20] = 99  # CLR section becomes an unknown action the receiver skips
    out.append(("skipped", bytes(skipped)))
    return out


def eth(ip: bytes) -> bytes:
    return b"\x01\x00\x5e\x00\x00\xf0\x02\x00\x00\x00\x00\x01\x08\x00" + ip


def write_pcap(path: Path, ips: list[bytes]) -> Path:
    with open(path, "wb") as fh:
        w = dpkt.pcap.Writer(fh, linktype=1)
        for i, ip in enumerate(ips):
            w.writepkt(eth(ip), ts=1700000000.0 + i)
    return path
