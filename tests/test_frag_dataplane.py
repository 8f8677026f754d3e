"""The daemon's data plane holds IP fragments until their datagram is whole, then gives
all of them the datagram's verdict (fake NFQUEUE, a 256-byte copy range; no root)."""

from __future__ import annotations

import pytest
from scapy.all import IP, UDP, Raw, fragment, raw

from pfcluster.io.dataplane import Dataplane
from pfcluster.pf.constants import PFRES_FRAG
from pfcluster.pf.filter import Filter
from pfcluster.pf.rules import parse_rules
from test_dataplane_order import EM0, EM1, FakePacket, FakeQueue, fake_nfq  # noqa: F401

RULES = """\
block all
pass in on em0 proto udp to port 5353
pass out on em1 proto udp
"""


def cut(b: bytes) -> FakePacket:
    fp = FakePacket(b, EM0, EM1)
    fp.qp.payload = memoryview(b)[:256]  # --copy-range 256
    return fp


def frags(dport: int, ident: int) -> list[FakePacket]:
    d = IP(src="192.0.2.10", dst="198.51.100.20", id=ident) / UDP(sport=40000, dport=dport) \
        / Raw(b"x" * 4000)
    return [cut(raw(f)) for f in fragment(d, fragsize=1400)]


def plane(rules: str = RULES, clock: list[float] | None = None) -> Dataplane:
    t = clock if clock is not None else [0.0]
    dp = Dataplane(0, Filter(parse_rules(rules, "frag.conf")), clock=lambda: t[0])
    dp._ifnames.update({EM0: "em0", EM1: "em1"})
    return dp


def verdicts(fps: list[FakePacket]) -> list[str | None]:
    return [FakeQueue.verdict_of.get(p.qp.packet_id) for p in fps]


@pytest.mark.usefixtures("fake_nfq")
def test_fragments_held_then_all_accepted_by_port_rule() -> None:
    dp = plane()
    fs = frags(5353, 1)
    FakeQueue.script = list(reversed(fs))[:-1]  # out of order, the first piece last
    dp.on_readable()
    assert verdicts(fs) == [None, None, None]
    FakeQueue.script = [fs[0]]
    dp.on_readable()
    assert verdicts(fs) == ["accept"] * 3
    c = dp.counters
    assert (c.frag_datagrams, c.frag_passed, c.frag_held) == (1, 3, 0)


@pytest.mark.usefixtures("fake_nfq")
def test_fragments_of_blocked_port_all_dropped() -> None:
    dp = plane()
    fs = frags(5354, 2)
    FakeQueue.script = list(fs)
    dp.on_readable()
    assert verdicts(fs) == ["drop"] * 3
    assert dp.counters.frag_dropped == 3


@pytest.mark.usefixtures("fake_nfq")
def test_incomplete_datagram_times_out_dropped_and_counted() -> None:
    t = [100.0]
    dp = plane("set timeout frag 30\n" + RULES, t)
    fs = frags(5353, 3)
    FakeQueue.script = fs[:2]
    dp.on_readable()
    t[0] = 129.0
    dp.expire_frags(t[0])
    assert verdicts(fs) == [None, None, None]
    t[0] = 131.0
    dp.expire_frags(t[0])
    assert verdicts(fs)[:2] == ["drop", "drop"]
    assert dp.filt.counters[PFRES_FRAG] == 2


@pytest.mark.usefixtures("fake_nfq")
def test_reassemble_no_keeps_per_fragment_rules() -> None:
    dp = plane("set reassemble no\n" + RULES)
    fs = frags(5353, 4)
    FakeQueue.script = list(fs)
    dp.on_readable()
    # pf without reassembly: the first fragment has the port, the others do not
    assert verdicts(fs) == ["accept", "drop", "drop"]
    assert dp.counters.frag_held == 0


@pytest.mark.usefixtures("fake_nfq")
def test_scrub_does_not_drop_fragments() -> None:
    dp = plane("match out on em1 scrub (no-df, min-ttl 70)\n" + RULES)
    fs = frags(5353, 5)
    FakeQueue.script = list(fs)
    dp.on_readable()
    assert verdicts(fs) == ["accept"] * 3


@pytest.mark.usefixtures("fake_nfq")
def test_translated_datagram_is_dropped() -> None:
    dp = plane(RULES.replace("pass out on em1 proto udp",
                             "pass out on em1 proto udp nat-to 203.0.113.1"))
    fs = frags(5353, 6)
    FakeQueue.script = list(fs)
    dp.on_readable()
    assert verdicts(fs) == ["drop"] * 3 and dp.counters.frag_translate == 1
