"""pf/frag.py: fragments held until their datagram is whole, with pf's limits.

scapy's fragment() / fragment6() cut real datagrams; the core sees them in order, out of
order, duplicated, overlapping, late, and past its limits."""

from __future__ import annotations

import random

from scapy.all import IP, UDP, IPv6, IPv6ExtHdrFragment, Raw, fragment, fragment6, raw

from pfcluster.packet import parse
from pfcluster.pf.constants import PF_IN, PFRES_FRAG, PFRES_MEMORY
from pfcluster.pf.filter import Filter
from pfcluster.pf.frag import FragCache, Release
from pfcluster.pf.rules import parse_rules

C, S = "192.0.2.10", "198.51.100.20"
C6, S6 = "2001:db8::10", "2001:db8:1::20"


def frags4(size: int = 4000, ident: int = 7, dport: int = 5353, src: str = C) -> list[bytes]:
    d = IP(src=src, dst=S, id=ident) / UDP(sport=40000, dport=dport) / Raw(b"x" * size)
    return [raw(f) for f in fragment(d, fragsize=1400)]


def frags6(size: int = 4000, ident: int = 9, dport: int = 5353) -> list[bytes]:
    d = (IPv6(src=C6, dst=S6) / IPv6ExtHdrFragment(id=ident) / UDP(sport=40000, dport=dport)
         / Raw(b"y" * size))
    return [raw(f) for f in fragment6(d, 1280)]


def feed(fc: FragCache, pieces: list[bytes], now: float = 0.0, first_token: int = 0) -> list[Release]:
    out: list[Release] = []
    for i, b in enumerate(pieces):
        out += fc.add(parse(b), first_token + i, now)
    return out


def test_in_order_v4_gives_whole_datagram() -> None:
    fs = frags4()
    assert len(fs) == 3
    fc = FragCache()
    rel = feed(fc, fs)
    assert len(rel) == 1 and rel[0].reason is None
    assert sorted(rel[0].tokens) == [0, 1, 2]
    p = rel[0].packet
    assert p is not None and not p.fragment and p.dport == 5353 and p.sport == 40000
    assert p.ip_len == 20 + 8 + 4000 and p.p_len == 4000
    assert fc.held == 0 and len(fc) == 0 and fc.datagrams == 1


def test_nothing_released_until_complete() -> None:
    fs = frags4()
    fc = FragCache()
    assert feed(fc, fs[:-1]) == []
    assert fc.held == 2


def test_out_of_order_every_permutation_seed() -> None:
    fs = frags4(9000)
    for seed in range(10):
        order = list(range(len(fs)))
        random.Random(seed).shuffle(order)
        fc = FragCache()
        rel = []
        for i in order:
            rel += fc.add(parse(fs[i]), i, 0.0)
        assert len(rel) == 1 and rel[0].reason is None, order
        assert rel[0].packet is not None and rel[0].packet.dport == 5353


def test_duplicate_drops_the_datagram() -> None:
    fs = frags4()
    fc = FragCache()
    rel = feed(fc, [fs[0], fs[1], fs[1]])
    assert len(rel) == 1 and rel[0].reason == PFRES_FRAG and sorted(rel[0].tokens) == [0, 1, 2]
    assert fc.counters[PFRES_FRAG] == 3 and fc.held == 0
    # the last piece now starts a new queue that cannot complete
    assert fc.add(parse(fs[2]), 3, 1.0) == []


def test_overlap_drops_the_datagram() -> None:
    d = IP(src=C, dst=S, id=3) / UDP(sport=1, dport=53) / Raw(b"z" * 64)
    whole = raw(d)
    body = whole[20:]
    a = IP(src=C, dst=S, id=3, proto=17, flags="MF", frag=0) / Raw(body[:40])
    b = IP(src=C, dst=S, id=3, proto=17, frag=3) / Raw(body[24:])  # starts at 24 < 40
    fc = FragCache()
    assert fc.add(parse(raw(a)), "a", 0.0) == []
    rel = fc.add(parse(raw(b)), "b", 0.0)
    assert [(r.reason, r.tokens) for r in rel] == [(PFRES_FRAG, ["a", "b"])]


def test_overlapping_first_fragment_rewrites_ports_is_dropped() -> None:
    fs = frags4(dport=53)
    evil = frags4(dport=22)[0]
    fc = FragCache()
    rel = feed(fc, [fs[0], evil, fs[1], fs[2]])
    assert rel[0].reason == PFRES_FRAG and all(r.packet is None for r in rel)


def test_bad_mf_length_is_dropped() -> None:
    p = IP(src=C, dst=S, id=5, proto=17, flags="MF", frag=10) / Raw(b"q" * 13)
    fc = FragCache()
    rel = fc.add(parse(raw(p)), 1, 0.0)
    assert [(r.reason, r.tokens) for r in rel] == [(PFRES_FRAG, [1])] and fc.held == 0


def test_timeout_drops_and_counts() -> None:
    fs = frags4()
    fc = FragCache(timeout=60)
    assert feed(fc, fs[:2], now=100.0) == []
    assert fc.expire(159.0) == []
    rel = fc.expire(160.5)
    assert len(rel) == 1 and rel[0].reason == PFRES_FRAG and sorted(rel[0].tokens) == [0, 1]
    assert fc.timeouts == 1 and fc.held == 0
    # a late piece after the timeout is held alone, then expires too
    assert fc.add(parse(fs[2]), 2, 161.0) == []
    assert [r.tokens for r in fc.expire(300.0)] == [[2]]


def test_limit_evicts_oldest_datagram() -> None:
    fc = FragCache(limit=4, per_source=100)
    a, b = frags4(ident=1), frags4(ident=2)
    assert feed(fc, a[:2], 0.0, 0) == []
    assert feed(fc, b[:2], 1.0, 10) == []
    rel = fc.add(parse(frags4(ident=3)[0]), 20, 2.0)
    assert [(r.reason, sorted(r.tokens)) for r in rel] == [(PFRES_MEMORY, [0, 1])]
    assert fc.held == 3 and fc.evicted == 1
    assert fc.counters[PFRES_MEMORY] == 2
    done = fc.add(parse(b[2]), 12, 3.0)
    assert len(done) == 1 and done[0].reason is None


def test_per_source_bound_spares_other_sources() -> None:
    fc = FragCache(limit=1000, per_source=4)
    rel: list[Release] = []
    for ident in range(10):  # an attacker opens many datagrams, never completes them
        rel += fc.add(parse(frags4(ident=ident, src="192.0.2.66")[0]), ident, 0.0)
    assert fc.held == 4 and fc.src_limited == 6
    assert all(r.reason == PFRES_MEMORY for r in rel) and len(rel) == 6
    good = feed(fc, frags4(ident=99), 0.0, 100)
    assert len(good) == 1 and good[0].reason is None


def test_ipv6_reassembled() -> None:
    fs = frags6()
    assert len(fs) >= 4
    fc = FragCache()
    rel = feed(fc, list(reversed(fs)))
    assert len(rel) == 1 and rel[0].reason is None
    p = rel[0].packet
    assert p is not None and p.dport == 5353 and not p.fragment and p.p_len == 4000


def test_ipv6_and_ipv4_same_id_do_not_mix() -> None:
    fc = FragCache()
    assert feed(fc, frags4(ident=9)[:2], 0.0, 0) == []
    assert feed(fc, frags6(ident=9)[:2], 0.0, 10) == []
    assert len(fc) == 2


def test_copy_range_first_fragment_is_enough() -> None:
    """The daemon sees 256 bytes of each fragment: offsets come from the IP header."""
    from pfcluster.packet import Packet, parse_into
    fc = FragCache()
    rel: list[Release] = []
    for i, b in enumerate(frags4()):
        pkt = Packet.__new__(Packet)
        parse_into(pkt, b[:256], len(b))
        rel += fc.add(pkt, i, 0.0)
    assert len(rel) == 1 and rel[0].packet is not None and rel[0].packet.dport == 5353


def test_port_rule_matches_fragmented_udp_datagram() -> None:
    rs = parse_rules("block all\npass in proto udp to port 5353\n")
    f = Filter(rs)
    fs = frags4(dport=5353)
    # without reassembly the non-first fragment has no port: blocked
    assert not f.test(PF_IN, "em0", parse(fs[1]), 0.0).passed
    fc = FragCache()
    rel = feed(fc, fs)
    assert rel[0].packet is not None
    assert f.test(PF_IN, "em0", rel[0].packet, 0.0).passed
    other = feed(FragCache(), frags4(dport=5354))
    assert other[0].packet is not None
    assert not f.test(PF_IN, "em0", other[0].packet, 0.0).passed


def test_ruleset_limits_reach_the_cache() -> None:
    from pfcluster.pf.constants import PFTM
    rs = parse_rules("set limit frags 100\nset timeout frag 30\npass all\n")
    assert rs.frag_limit == 100 and rs.timeouts[PFTM.FRAG] == 30 and rs.reassemble
    d = parse_rules("pass all\n")
    assert d.frag_limit == 65536 and d.timeouts[PFTM.FRAG] == 60


def test_fuzz_pieces_keep_the_books() -> None:
    """Any mix of pieces: every token leaves exactly once (released or expired), the held
    count matches, and a release's datagram is whole only after real coverage."""
    from hypothesis import given
    from hypothesis import strategies as st

    from conftest import batched_fuzz_settings

    piece = st.tuples(st.integers(0, 3), st.integers(0, 40), st.integers(1, 30), st.booleans())

    @batched_fuzz_settings(200)  # scapy builds each piece: 500 lists by default
    @given(st.lists(piece, max_size=40))
    def run(pieces: list[tuple[int, int, int, bool]]) -> None:
        fc = FragCache(limit=16, per_source=12, timeout=10)
        out: list[Release] = []
        for n, (ident, off8, length, more) in enumerate(pieces):
            p = IP(src=C, dst=S, id=ident, proto=17, flags="MF" if more else 0, frag=off8)
            p = p / (UDP(sport=1, dport=2) if off8 == 0 else Raw(b"")) / Raw(b"p" * length)
            out += fc.add(parse(raw(p)), n, float(n))
        out += fc.expire(1e9)
        tokens = sorted(t for r in out for t in r.tokens)
        assert tokens == list(range(len(pieces)))
        assert fc.held == 0 and len(fc) == 0

    run()


def test_replay_reassembles_a_fragmented_capture_and_matches_by_port(tmp_path) -> None:
    """A scapy-built capture: a UDP datagram in 3 fragments, out of order, passes on the
    port rule as one datagram in `replay`; the same datagram to another port is blocked
    whole; a datagram never completed is blocked at the end."""
    import json as _json

    from click.testing import CliRunner
    from scapy.all import IP, UDP, Raw, fragment, wrpcap

    from pfcluster.cli.main import main

    conf = tmp_path / "pf.conf"
    conf.write_text("block all\npass in on lan proto udp to port 5300\npass out on wan\n")
    ok = fragment(IP(src="198.51.100.2", dst="203.0.113.2", id=7) / UDP(sport=1, dport=5300)
                  / Raw(b"x" * 3000), fragsize=1200)
    bad = fragment(IP(src="198.51.100.2", dst="203.0.113.2", id=8) / UDP(sport=1, dport=5301)
                   / Raw(b"y" * 3000), fragsize=1200)
    lost = fragment(IP(src="198.51.100.2", dst="203.0.113.2", id=9) / UDP(sport=1, dport=5300)
                    / Raw(b"z" * 3000), fragsize=1200)[:2]
    assert len(ok) == 3
    cap = tmp_path / "f.pcap"
    wrpcap(str(cap), [ok[2], ok[0], ok[1], *bad, *lost])
    res = CliRunner().invoke(main, ["replay", "--rules", str(conf), "--iface",
                                    "lan=198.51.100.1/24", "--iface", "wan=203.0.113.1/24",
                                    "--json", str(cap)])
    assert res.exit_code == 0, res.output
    lines = [_json.loads(x) for x in res.output.splitlines()]
    recs = {r["n"]: r for r in lines if "n" in r}
    assert [recs[i]["action"] for i in (1, 2, 3)] == ["pass"] * 3
    assert all(recs[i]["fragment"] and recs[i]["datagram"] == 1 for i in (1, 2, 3))
    assert [recs[i]["action"] for i in (4, 5, 6)] == ["block"] * 3
    assert [recs[i]["action"] for i in (7, 8)] == ["block"] * 2
    assert recs[7]["log"] == ["fragment: incomplete datagram"]
