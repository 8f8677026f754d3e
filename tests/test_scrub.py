"""pf/scrub.py: scrub options parsed and printed as pfctl does, and pf_scrub's rewrite.

scapy is the oracle: a packet scrubbed by us equals the packet scapy builds with the new
field values (its checksums recomputed by scapy)."""

from __future__ import annotations

import pytest
from scapy.all import IP, TCP, UDP, IPv6, raw

from pfcluster.packet import Packet, parse, parse_into
from pfcluster.pf.filter import Filter
from pfcluster.pf.rewrite import RewriteError
from pfcluster.pf.router import ROUTE_BLOCK, ROUTE_PASS, route
from pfcluster.pf.rules import RuleSyntaxError, parse_rules
from pfcluster.pf.scrub import PFSTATE_NODF, PFSTATE_RANDOMID, Scrub, scrub_packet

C, S = "192.0.2.10", "198.51.100.20"


def rules_text(text: str) -> list[str]:
    return [str(r) for r in parse_rules(text).rules]


@pytest.mark.parametrize(("line", "printed"), [
    ("match out all scrub (max-mss 1200)", "match out all scrub (max-mss 1200)"),
    ("match in all scrub (no-df, random-id, min-ttl 5, set-tos 0x10, reassemble tcp, "
     "max-mss 1400)",
     "match in all scrub (no-df random-id min-ttl 5 set-tos 0x10 reassemble tcp max-mss 1400)"),
    ("match in all scrub (set-tos lowdelay)", "match in all scrub (set-tos 0x10)"),
    ("pass out proto tcp scrub (no-df)",
     "pass out proto tcp all flags S/SA keep state scrub (no-df)"),
    ("scrub in all", "scrub in all"),
    ("scrub out on em0 all no-df random-id max-mss 1440",
     "scrub out on em0 all no-df random-id max-mss 1440"),
])
def test_parse_print_round_trip(line: str, printed: str) -> None:
    assert rules_text(line) == [printed]
    assert rules_text(printed) == [printed]


@pytest.mark.parametrize(("line", "msg"), [
    ("match all scrub (max-mss 0)", "out of range"),
    ("match all scrub (min-ttl 256)", "out of range"),
    ("match all scrub (no-df no-df)", "cannot be respecified"),
    ("match all scrub (bogus)", "expected a scrub option"),
    ("match all scrub ()", "empty scrub options"),
    ("match all scrub (reassemble udp)", "expected 'tcp'"),
    ("scrub in all fragment reassemble", "set reassemble yes"),
    ("no scrub in all", "'no scrub' is not supported"),
    ("set reassemble maybe", "expected 'yes' or 'no'"),
    ("set reassemble yes no-df extra", "expected 'yes' or 'no'"),
    ("match all scrub (no-df) scrub (random-id)", "cannot respecify scrub"),
])
def test_errors_are_clean(line: str, msg: str) -> None:
    with pytest.raises(RuleSyntaxError, match=msg) as ei:
        parse_rules(line, "t.conf")
    assert str(ei.value).startswith("t.conf:1:")


def test_set_reassemble_yes_and_no_are_accepted() -> None:
    assert parse_rules("set reassemble no\npass all").options["reassemble"] == "no"
    assert parse_rules("set reassemble yes no-df\npass all").options["reassemble"] == "yes no-df"
    assert parse_rules("set reassemble yes\npass all").reassemble
    assert not parse_rules("set reassemble no\npass all").reassemble
    assert parse_rules("pass all").reassemble  # OpenBSD's default


def _scrubbed(pkt_bytes: bytes, sc: Scrub, rid: int = 0x1234) -> bytes:
    p = parse(pkt_bytes)
    out = scrub_packet(None, p, sc, lambda: rid)
    return bytes(out) if out is not None else pkt_bytes


@pytest.mark.parametrize("opts", [
    dict(flags="DF"), dict(ttl=3), dict(tos=0x03), dict(tos=0xB9), dict(ttl=200, tos=0x11)])
def test_ipv4_rewrites_equal_scapy(opts: dict) -> None:
    flags = opts.get("flags", "DF")
    ttl = opts.get("ttl", 64)
    tos = opts.get("tos", 0)
    old = IP(src=C, dst=S, id=7, flags=flags, ttl=ttl, tos=tos) / UDP(sport=1, dport=2) / b"x"
    sc = Scrub(PFSTATE_NODF | PFSTATE_RANDOMID | 0x40, min_ttl=10, set_tos=0x20)
    want = IP(src=C, dst=S, id=0x1234, flags=0, ttl=max(ttl, 10), tos=0x20 | (tos & 3)) \
        / UDP(sport=1, dport=2) / b"x"
    assert _scrubbed(raw(old), sc) == raw(want)


def test_random_id_skips_fragments() -> None:
    frag = raw(IP(src=C, dst=S, id=7, flags="MF", proto=17) / (b"y" * 16))
    assert _scrubbed(frag, Scrub(PFSTATE_RANDOMID)) == frag


def test_ipv6_hop_limit_and_traffic_class() -> None:
    old = IPv6(src="2001:db8::1", dst="2001:db8::2", hlim=2, tc=0x01) / UDP(sport=1, dport=2)
    want = IPv6(src="2001:db8::1", dst="2001:db8::2", hlim=9, tc=0x21) / UDP(sport=1, dport=2)
    assert _scrubbed(raw(old), Scrub(0x40, min_ttl=9, set_tos=0x20)) == raw(want)


@pytest.mark.parametrize("pad", [[], [("NOP", None)], [("NOP", None), ("NOP", None),
                                                       ("NOP", None)]])
@pytest.mark.parametrize(("mss", "clamped"), [(1460, 1200), (1200, 1200), (536, 536)])
def test_max_mss_clamps_only_larger(pad: list, mss: int, clamped: int) -> None:
    def syn(m: int) -> bytes:
        return raw(IP(src=C, dst=S) / TCP(sport=4000, dport=80, flags="S",
                                         options=[*pad, ("MSS", m), ("SAckOK", b"")]))
    assert _scrubbed(syn(mss), Scrub(max_mss=1200)) == syn(clamped)


def test_max_mss_leaves_non_syn_alone() -> None:
    ack = raw(IP(src=C, dst=S) / TCP(flags="A", options=[("MSS", 1460)]))
    assert _scrubbed(ack, Scrub(max_mss=1200)) == ack


def test_truncated_copy_refused_only_when_a_change_is_due() -> None:
    full = raw(IP(src=C, dst=S, ttl=1) / UDP() / (b"z" * 100))
    with pytest.raises(RewriteError):
        scrub_packet(None, parse_into(Packet(), full[:40], len(full)), Scrub(min_ttl=5))
    assert scrub_packet(None, parse_into(Packet(), full[:40], len(full)),
                        Scrub(min_ttl=1)) is None


def test_match_rules_accumulate_like_pf() -> None:
    a = Scrub(PFSTATE_NODF, min_ttl=5, max_mss=1400)
    b = Scrub(PFSTATE_RANDOMID, max_mss=1200)
    m = a.merge(b)
    assert (m.flags, m.min_ttl, m.max_mss) == (PFSTATE_NODF | PFSTATE_RANDOMID, 5, 1200)


def test_route_clamps_syn_and_keeps_options_on_the_state() -> None:
    f = Filter(parse_rules("match out all scrub (max-mss 1200)\n"
                           "match out all scrub (no-df)\npass all\nblock in proto udp"))
    syn = raw(IP(src=C, dst=S, flags="DF") / TCP(sport=4000, dport=80, flags="S",
                                                 options=[("MSS", 1460)]))
    rv = route(f, "em0", "em1", parse(syn), 1.0)
    assert rv.action == ROUTE_PASS and rv.payload is not None
    want = raw(IP(src=C, dst=S, flags=0) / TCP(sport=4000, dport=80, flags="S",
                                               options=[("MSS", 1200)]))
    assert bytes(rv.payload) == want
    assert rv.v_out is not None and rv.v_out.state is not None
    assert rv.v_out.state.scrub is not None
    # the reply (in on em1, matching the states) loses DF too: pf scrubs a state's packets
    synack = raw(IP(src=S, dst=C, flags="DF") / TCP(sport=80, dport=4000, flags="SA",
                                                    ack=1, options=[("MSS", 1460)]))
    rv2 = route(f, "em1", "em0", parse(synack), 1.1)
    assert rv2.action == ROUTE_PASS and rv2.payload is not None
    assert IP(bytes(rv2.payload)).flags == 0
    assert IP(bytes(rv2.payload))[TCP].options[0] == ("MSS", 1200)
    # a blocked packet is not scrubbed into a pass
    udp = raw(IP(src=C, dst=S) / UDP(sport=1, dport=2))
    assert route(f, "em0", "em1", parse(udp), 1.2).action == ROUTE_BLOCK


def test_no_scrub_rules_no_payload() -> None:
    f = Filter(parse_rules("pass all"))
    syn = raw(IP(src=C, dst=S) / TCP(flags="S", options=[("MSS", 1460)]))
    assert route(f, "em0", "em1", parse(syn), 1.0).payload is None
