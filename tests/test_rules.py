"""pf.conf parsing, printing, skip steps and rule evaluation."""

from __future__ import annotations

import socket

import pytest

from pfcluster.pf.constants import (
    AF_INET,
    AF_INET6,
    DEFAULT_TIMEOUTS,
    PF_IN,
    PF_INOUT,
    PF_OUT,
    PFTM,
    PFTM_MAX,
    TH_ACK,
    TH_FIN,
    TH_SYN,
)
from pfcluster.pf.rules import load_rules, parse_rules
from pfcluster.pf.ruleset import Rule, Table


class Pkt:
    """The packet descriptor fields evaluate() reads (see pfcluster.packet)."""

    def __init__(self, src: str = "198.51.100.1", dst: str = "203.0.113.1", proto: int = 6,
                 sport: int = 40000, dport: int = 80, tcp_flags: int = TH_SYN,
                 icmp_type: int = 0, icmp_code: int = 0, frag_off: int = 0) -> None:
        self.af = AF_INET6 if ":" in src else AF_INET
        self.src = socket.inet_pton(self.af, src)
        self.dst = socket.inet_pton(self.af, dst)
        self.proto = proto
        self.sport = sport
        self.dport = dport
        self.tcp_flags = tcp_flags
        self.icmp_type = icmp_type
        self.icmp_code = icmp_code
        self.frag_off = frag_off


def nr(rs, pkt, direction=PF_IN, ifname="em0"):
    r = rs.evaluate(pkt, direction, ifname)
    return None if r is None else r.nr


def lines(rs) -> list[str]:
    return [str(r) for r in rs.rules]


# --- parsing and printing -------------------------------------------------------------


def test_basic_rules_print_like_pfctl():
    rs = parse_rules("""
        block in all
        pass out all
        pass in quick on em0 inet proto tcp from any to 203.0.113.0/24 port = 5201 \\
            keep state (max 100)
    """)
    assert lines(rs) == [
        "block drop in all",
        "pass out all flags S/SA keep state",
        "pass in quick on em0 inet proto tcp from any to 203.0.113.0/24 port = 5201 "
        "flags S/SA keep state (max 100)",
    ]
    assert [r.nr for r in rs.rules] == [0, 1, 2]
    assert str(rs).splitlines()[0] == "@0 block drop in all"


def test_rule_attributes():
    rs = parse_rules("pass in log (all) quick on ! em1 inet6 proto tcp from 2001:db8::/32 "
                     "port > 1023 to ! 2001:db8::1 port 1000:2000 flags S/SAFR synproxy state "
                     "(max 50, no-sync, sloppy, pflow, if-bound, tcp.established 600, "
                     'adaptive.start 10, adaptive.end 40) label "web"')
    (r,) = rs.rules
    assert isinstance(r, Rule)
    assert (r.action, r.direction, r.quick, r.log, r.log_all) == ("pass", PF_IN, True, True, True)
    assert (r.ifname, r.ifnot, r.af, r.proto) == ("em1", True, AF_INET6, 6)
    assert (r.flags, r.flagset) == (0x02, 0x17)
    assert (r.keep_state, r.state_type, r.max_states) == (True, "synproxy", 50)
    assert (r.no_sync, r.sloppy, r.pflow, r.if_bound) == (True, True, True, True)
    assert r.timeouts == {PFTM.TCP_ESTABLISHED: 600, PFTM.ADAPTIVE_START: 10,
                          PFTM.ADAPTIVE_END: 40}
    assert r.label == "web"
    assert r.return_mode is None
    assert r.icmp_type is None and r.icmp_code is None
    assert (r.evaluations, r.packets, r.bytes, r.states_cur, r.states_tot) == (0, 0, 0, 0, 0)
    assert len(r.skip) == 9
    assert not hasattr(r, "__dict__")
    assert str(r) == (
        "pass in log (all) quick on ! em1 inet6 proto tcp from 2001:db8::/32 port > 1023 "
        "to ! 2001:db8::1 port 1000:2000 flags S/FSRA synproxy state (max 50, no-sync, "
        'if-bound, sloppy, pflow, tcp.established 600, adaptive.start 10, adaptive.end 40) '
        'label "web"')


def test_defaults_flags_and_state():
    rs = parse_rules("""
        pass in proto tcp
        pass in proto udp
        pass in
        pass in proto tcp no state
        pass in proto tcp flags any
        pass in proto tcp flags /SA
        block in proto tcp
        pass in proto tcp modulate state
        pass in inet proto icmp
    """)
    got = [(r.keep_state, r.state_type, r.flags, r.flagset) for r in rs.rules]
    assert got == [
        (True, "keep", 0x02, 0x12),
        (True, "keep", 0, 0),
        (True, "keep", 0x02, 0x12),
        (False, None, 0, 0),
        (True, "keep", 0, 0),
        (True, "keep", 0, 0x12),
        (False, None, 0, 0),
        (True, "modulate", 0x02, 0x12),
        (True, "keep", 0, 0),
    ]
    assert lines(rs) == [
        "pass in proto tcp all flags S/SA keep state",
        "pass in proto udp all keep state",
        "pass in all flags S/SA keep state",
        "pass in proto tcp all no state",
        "pass in proto tcp all flags any keep state",
        "pass in proto tcp all flags /SA keep state",
        "block drop in proto tcp all",
        "pass in proto tcp all flags S/SA modulate state",
        "pass in inet proto icmp all keep state",
    ]


def test_block_modes_and_policy():
    rs = parse_rules("""
        set block-policy return
        block in all
        block drop in all
        block return-rst in proto tcp all
        block return-icmp in all
        block return out all
    """)
    assert [r.return_mode for r in rs.rules] == [None, "drop", "return-rst", "return-icmp",
                                                 "return"]
    assert [rs.block_return(r) for r in rs.rules] == ["return", "drop", "return-rst",
                                                      "return-icmp", "return"]
    assert lines(rs)[0] == "block return in all"
    assert parse_rules("block all").block_return(parse_rules("block all").rules[0]) == "drop"


def test_direction():
    rs = parse_rules("pass in all\npass out all\npass all")
    assert [r.direction for r in rs.rules] == [PF_IN, PF_OUT, PF_INOUT]


def test_macros_comments_continuation():
    rs = parse_rules("""
        # comment line
        ext_if = "em0"   # trailing comment
        int_if = em1
        svc = "{ ssh, http }"
        both = "{" $ext_if $int_if "}"
        pass in on $both proto tcp \\
           to port $svc
    """)
    assert lines(rs) == [
        "pass in on em0 proto tcp from any to any port = 22 flags S/SA keep state",
        "pass in on em0 proto tcp from any to any port = 80 flags S/SA keep state",
        "pass in on em1 proto tcp from any to any port = 22 flags S/SA keep state",
        "pass in on em1 proto tcp from any to any port = 80 flags S/SA keep state",
    ]
    assert rs.macros["ext_if"] == "em0"
    # quoted text is not macro-expanded
    assert parse_rules('x = "y"\npass in label "$x"').rules[0].label == "$x"


def test_list_expansion_order_and_numbering():
    rs = parse_rules("pass in on { em0 em1 } proto { tcp, udp } from { 10.0.0.1 10.0.0.2 } "
                     "to any port { 53 80 }")
    assert len(rs.rules) == 16
    assert [r.nr for r in rs.rules] == list(range(16))
    first = [(r.ifname, r.proto, str(r.src), r.dport[1]) for r in rs.rules[:5]]
    assert first == [
        ("em0", 6, "10.0.0.1", 53), ("em0", 6, "10.0.0.1", 80),
        ("em0", 6, "10.0.0.2", 53), ("em0", 6, "10.0.0.2", 80),
        ("em0", 17, "10.0.0.1", 53),
    ]
    assert rs.rules[8].ifname == "em1"


def test_mixed_family_list_drops_mismatches():
    rs = parse_rules("pass in inet from { 10.0.0.1, 2001:db8::1 } to any")
    assert lines(rs) == ["pass in inet from 10.0.0.1 to any flags S/SA keep state"]
    rs = parse_rules("pass in from { 10.0.0.1, 2001:db8::1 } to { 10.0.0.2 2001:db8::2 }")
    assert [(r.af, str(r.dst)) for r in rs.rules] == [(AF_INET, "10.0.0.2"),
                                                     (AF_INET6, "2001:db8::2")]


def test_addresses_and_negation():
    rs = parse_rules("pass from { ! 10.1.2.3/8, 10.0.0.1/32, 2001:DB8::1/64, any } "
                     "to ! <t>")
    assert [str(r.src) for r in rs.rules] == ["! 10.0.0.0/8", "10.0.0.1", "2001:db8::/64", "any"]
    assert [r.af for r in rs.rules] == [AF_INET, AF_INET, AF_INET6, 0]
    assert str(rs.rules[0].dst) == "! <t>"
    assert "t" in rs.tables and len(rs.tables["t"]) == 0  # auto-created


def test_on_any_and_interface_lists():
    rs = parse_rules("pass on any all\npass in on { em0, ! em1 } all")
    assert rs.rules[0].ifname is None
    assert [(r.ifname, r.ifnot) for r in rs.rules[1:]] == [("em0", False), ("em1", True)]


def test_protocols():
    rs = parse_rules("pass proto { esp ah gre ospf carp pfsync vrrp 0 255 icmp6 ipv6-icmp }")
    assert [r.proto for r in rs.rules] == [50, 51, 47, 89, 112, 240, 112, 0, 255, 58, 58]
    assert str(rs.rules[0]) == "pass proto esp all keep state"


def test_ports_names_and_operators():
    rs = parse_rules("pass proto tcp from any port { = 1, != 2, < 3, <= 4, > 5, >= 6, "
                     "7 >< 9, 10 <> 20, 30:40, ssh, https, domain }")
    assert [r.sport for r in rs.rules] == [
        (2, 1, 0), (3, 2, 0), (4, 3, 0), (5, 4, 0), (6, 5, 0), (7, 6, 0), (1, 7, 9),
        (8, 10, 20), (9, 30, 40), (2, 22, 0), (2, 443, 0), (2, 53, 0),
    ]
    assert [str(r).split(" port ")[1].split(" to any")[0] for r in rs.rules[:9]] == [
        "= 1", "!= 2", "< 3", "<= 4", "> 5", ">= 6", "7 >< 9", "10 <> 20", "30:40"]


def test_icmp_types():
    rs = parse_rules("""
        pass in inet proto icmp icmp-type { echoreq, unreach code 3, timex, 0 }
        pass in inet6 proto icmp6 icmp6-type { echoreq echorep } keep state
        pass in proto icmp icmp-type unreach code needfrag
    """)
    assert [(r.icmp_type, r.icmp_code) for r in rs.rules] == [
        (8, None), (3, 3), (11, None), (0, None), (128, None), (129, None), (3, 4)]
    assert str(rs.rules[1]) == "pass in inet proto icmp all icmp-type unreach code 3 keep state"
    assert str(rs.rules[4]) == ("pass in inet6 proto ipv6-icmp all icmp6-type echoreq "
                                "keep state")


def test_options():
    rs = parse_rules("""
        set timeout { tcp.first 10, udp.first 20 }
        set timeout interval 5
        set limit states 50000
        set skip on { lo0 lo }
        set skip on pfsync0
        set block-policy return
        set hostid 0x1234
        set debug misc
        set state-policy if-bound
        set optimization aggressive
        set limit { frags 100, src-nodes 10 }
    """, "x.conf")
    want = list(DEFAULT_TIMEOUTS)
    want[PFTM.TCP_FIRST_PACKET] = 10
    want[PFTM.UDP_FIRST_PACKET] = 20
    want[PFTM.INTERVAL] = 5
    want[PFTM.ADAPTIVE_START] = 30000
    want[PFTM.ADAPTIVE_END] = 60000
    assert rs.timeouts == want and len(rs.timeouts) == PFTM_MAX
    assert rs.limit_states == 50000
    assert rs.limits["frags"] == 100
    assert rs.skip_ifaces == {"lo0", "lo", "pfsync0"}
    assert (rs.block_policy, rs.hostid, rs.debug, rs.state_policy) == ("return", 0x1234,
                                                                       "misc", "if-bound")
    assert rs.options["optimization"] == "aggressive"
    assert rs.source == "x.conf"


def test_defaults_of_an_empty_ruleset():
    rs = parse_rules("")
    assert rs.rules == [] and rs.limit_states == 100000 and rs.block_policy == "drop"
    assert rs.timeouts == list(DEFAULT_TIMEOUTS) and rs.hostid is None
    assert rs.evaluate(Pkt(), PF_IN, "em0") is None


def test_explicit_adaptive_timeouts_survive_limit():
    rs = parse_rules("set timeout adaptive.start 7\nset limit states 1000")
    assert rs.timeouts[PFTM.ADAPTIVE_START] == 7
    assert rs.timeouts[PFTM.ADAPTIVE_END] == 120000


def test_rule_max_gives_adaptive_defaults():
    (r,) = parse_rules("pass keep state (max 105)").rules
    assert r.timeouts == {PFTM.ADAPTIVE_START: 60, PFTM.ADAPTIVE_END: 120}
    assert str(r).endswith("keep state (max 105)")
    (r,) = parse_rules("pass keep state (max 100, adaptive.end 500)").rules
    assert r.timeouts == {PFTM.ADAPTIVE_END: 500}


def test_tables_definitions():
    rs = parse_rules("""
        table <a> persist const counters { 10.0.0.0/8, !10.1.0.0/16, 2001:db8::/32 }
        table <empty> { }
        pass from <a> to <later>
        table <later> { 192.0.2.1 }
    """)
    a = rs.tables["a"]
    assert (a.persist, a.const, a.counters, len(a)) == (True, True, True, 3)
    assert len(rs.tables["empty"]) == 0
    assert rs.rules[0].dst.table is rs.tables["later"]
    assert rs.tables["later"].contains(AF_INET, 0xC0000201)


def test_table_file(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# bad hosts\n10.0.0.1\n10.2.0.0/16 !10.2.3.4\n")
    rs = parse_rules(f'table <f> file "{f}"\nblock from <f>')
    t = rs.tables["f"]
    assert t.contains(AF_INET, int.from_bytes(socket.inet_aton("10.2.9.9"), "big"))
    assert not t.contains(AF_INET, int.from_bytes(socket.inet_aton("10.2.3.4"), "big"))


def test_load_rules(tmp_path):
    f = tmp_path / "pf.conf"
    f.write_text("pass in all\n")
    rs = load_rules(f)
    assert rs.source == str(f) and len(rs.rules) == 1


ROUND_TRIP = """
block drop in log all
block return out quick on em1 inet proto udp from any to 192.0.2.0/24 port = 53
pass in quick on em0 inet proto tcp from any to 203.0.113.0/24 port = 5201 flags S/SA keep state (max 100)
pass out all flags S/SA keep state
pass in on ! em0 inet6 proto tcp from 2001:db8::/48 port 1000:2000 to ! <t> port 10 >< 20 flags any modulate state (no-sync, tcp.established 600)
pass in proto udp from any to any port 5 <> 9 no state label "x y"
pass in inet proto icmp all icmp-type echoreq code 0 keep state (floating, sloppy, pflow)
block return-rst in proto tcp from <t> to any
pass log (all) proto tcp all flags /SA synproxy state (max 10, adaptive.start 1, adaptive.end 2)
"""


def test_round_trip_through_str():
    rs = parse_rules(ROUND_TRIP)
    for want, r in zip(ROUND_TRIP.strip().splitlines(), rs.rules, strict=True):
        assert str(r) == want
        again = parse_rules(str(r)).rules
        assert len(again) == 1 and str(again[0]) == want


def test_checksum_is_stable():
    a = parse_rules(ROUND_TRIP)
    b = parse_rules("# another file\n" + ROUND_TRIP.replace(" all", "   all"))
    c = parse_rules(ROUND_TRIP.replace("5201", "5202"))
    assert len(a.checksum) == 16
    assert a.checksum == b.checksum != c.checksum


# --- skip steps -----------------------------------------------------------------------

SKIP_EXAMPLE = """
block in on em0 all
pass in on em0 proto tcp to 10.0.0.1 port 22
pass in on em0 proto tcp to 10.0.0.1 port 80
pass out on em1 proto udp to 10.0.0.2 port 53
pass out on em1 all
"""


def test_skip_steps_by_hand():
    rs = parse_rules(SKIP_EXAMPLE)
    # fields: IFP DIR RDOM AF PROTO SRC DST SPORT DPORT; 5 = end of list
    assert [r.skip for r in rs.rules] == [
        [3, 3, 5, 1, 1, 5, 1, 5, 1],
        [3, 3, 5, 4, 3, 5, 3, 5, 2],
        [3, 3, 5, 4, 3, 5, 3, 5, 3],
        [5, 5, 5, 4, 4, 5, 4, 5, 4],
        [5, 5, 5, 5, 5, 5, 5, 5, 5],
    ]


def test_skip_steps_jump_and_count_evaluations():
    rs = parse_rules(SKIP_EXAMPLE)
    r = rs.evaluate(Pkt(dst="10.0.0.2", proto=17, dport=53), PF_OUT, "em1")
    assert r is not None and r.nr == 4
    assert [x.evaluations for x in rs.rules] == [1, 0, 0, 1, 1]
    # in on em0 to 10.0.0.9: rule 1 fails on dst and jumps past rule 2 to the em1 group
    r = rs.evaluate(Pkt(dst="10.0.0.9", dport=22), PF_IN, "em0")
    assert r is not None and r.nr == 0
    assert [x.evaluations for x in rs.rules] == [2, 1, 0, 2, 1]


# --- evaluation -----------------------------------------------------------------------


def test_last_match_wins_and_quick():
    rs = parse_rules("block in all\npass in proto tcp to port 80\nblock in from 10.0.0.1")
    assert nr(rs, Pkt(dport=80)) == 1
    assert nr(rs, Pkt(dport=81)) == 0
    assert nr(rs, Pkt(src="10.0.0.1", dport=80)) == 2
    assert nr(rs, Pkt(), PF_OUT) is None  # nothing matches: pf's default pass
    rs = parse_rules("block in quick all\npass in all")
    assert nr(rs, Pkt()) == 0
    assert rs.rules[1].evaluations == 0


def test_interface_matching():
    rs = parse_rules("pass in on em0 all\npass in on ! em1 proto udp all\npass on any proto icmp")
    assert nr(rs, Pkt(), ifname="em0") == 0
    assert nr(rs, Pkt(), ifname="em1") is None
    assert nr(rs, Pkt(proto=17), ifname="em2") == 1
    assert nr(rs, Pkt(proto=17), ifname="em1") is None
    assert nr(rs, Pkt(proto=1, icmp_type=8), ifname="whatever") == 2


def test_af_and_proto():
    rs = parse_rules("pass inet all\npass inet6 proto udp all")
    assert nr(rs, Pkt()) == 0
    assert nr(rs, Pkt(src="2001:db8::1", dst="2001:db8::2")) is None
    assert nr(rs, Pkt(src="2001:db8::1", dst="2001:db8::2", proto=17)) == 1


def test_cidr_and_negation():
    rs = parse_rules("pass from 198.51.100.0/25 to ! 203.0.113.7 no state")
    assert nr(rs, Pkt(src="198.51.100.127")) == 0
    assert nr(rs, Pkt(src="198.51.100.128")) is None
    assert nr(rs, Pkt(dst="203.0.113.7")) is None
    assert nr(rs, Pkt(src="2001:db8::1", dst="2001:db8::2")) is None


def test_table_longest_prefix_with_negation():
    rs = parse_rules("""
        table <t> { 10.0.0.0/8, !10.1.0.0/16, 10.1.2.0/24, 2001:db8::/32, !2001:db8::5 }
        pass from <t> no state
        block from ! <t>
    """)
    cases = {
        "10.9.9.9": 0, "10.1.9.9": 1, "10.1.2.3": 0, "11.0.0.1": 1,
        "2001:db8::4": 0, "2001:db8::5": 1, "2001:db9::1": 1,
    }
    for src, want in cases.items():
        dst = "2001:db8::ff" if ":" in src else "203.0.113.1"
        assert nr(rs, Pkt(src=src, dst=dst)) == want, src


def test_table_class_directly():
    t = Table("x")
    t.add(AF_INET, 0x0A000000, 8)
    t.add(AF_INET, 0x0A010000, 16, neg=True)
    assert t.contains(AF_INET, 0x0A020304)
    assert not t.contains(AF_INET, 0x0A010304)
    assert not t.contains(AF_INET6, 0x0A020304)
    assert str(t) == "table <x> { 10.0.0.0/8 !10.1.0.0/16 }"


@pytest.mark.parametrize(("spec", "yes", "no"), [
    ("= 80", [80], [79, 81]),
    ("!= 80", [79, 81], [80]),
    ("< 80", [0, 79], [80, 81]),
    ("<= 80", [79, 80], [81]),
    ("> 80", [81, 65535], [80, 79]),
    (">= 80", [80, 81], [79]),
    ("80 >< 90", [81, 89], [80, 90, 91]),
    ("80 <> 90", [79, 91], [80, 85, 90]),
    ("80:90", [80, 85, 90], [79, 91]),
    ("http", [80], [443]),
    ("{ 22 443 }", [22, 443], [80]),
])
def test_port_operators(spec, yes, no):
    rs = parse_rules(f"pass proto {{ tcp udp }} to port {spec}")
    for p in yes:
        assert rs.evaluate(Pkt(dport=p), PF_IN, "em0") is not None, p
        assert rs.evaluate(Pkt(dport=p, proto=17), PF_IN, "em0") is not None, p
    for p in no:
        assert rs.evaluate(Pkt(dport=p), PF_IN, "em0") is None, p


def test_source_ports():
    rs = parse_rules("pass proto tcp from any port 1024:65535 to any port 22")
    assert nr(rs, Pkt(sport=2000, dport=22)) == 0
    assert nr(rs, Pkt(sport=1000, dport=22)) is None


def test_port_rule_does_not_match_other_protocols():
    rs = parse_rules("pass proto { tcp udp } to port 0")
    assert nr(rs, Pkt(proto=1, dport=0)) is None


def test_tcp_flags():
    rs = parse_rules("block all\npass proto tcp flags S/SA\npass proto tcp flags F/F no state")
    assert nr(rs, Pkt(tcp_flags=TH_SYN)) == 1
    assert nr(rs, Pkt(tcp_flags=TH_SYN | TH_ACK)) == 0
    assert nr(rs, Pkt(tcp_flags=TH_ACK | TH_FIN)) == 2
    # the implied S/SA of a proto-less rule only applies to TCP packets
    rs = parse_rules("block all\npass all")
    assert nr(rs, Pkt(tcp_flags=TH_ACK)) == 0
    assert nr(rs, Pkt(proto=17)) == 1
    assert nr(parse_rules("block all\npass proto tcp flags any"), Pkt(tcp_flags=TH_ACK)) == 1


def test_icmp_type_code():
    rs = parse_rules("block all\npass inet proto icmp icmp-type echoreq\n"
                     "pass inet proto icmp icmp-type unreach code 4")
    assert nr(rs, Pkt(proto=1, icmp_type=8, dport=0)) == 1
    assert nr(rs, Pkt(proto=1, icmp_type=0, dport=0)) == 0
    assert nr(rs, Pkt(proto=1, icmp_type=3, icmp_code=4, dport=0)) == 2
    assert nr(rs, Pkt(proto=1, icmp_type=3, icmp_code=3, dport=0)) == 0


def test_fragments_skip_port_and_flag_rules():
    rs = parse_rules("block all\npass proto tcp to port 80 no state\npass proto tcp no state "
                     "flags any\npass proto tcp flags S/SA")
    assert nr(rs, Pkt(frag_off=8)) == 2


def test_evaluate_parsed_packets():
    packet = pytest.importorskip("pfcluster.packet")
    if not hasattr(packet, "parse"):
        pytest.skip("packet parser not written yet")
    from scapy.layers.inet import IP, TCP, UDP

    rs = parse_rules("block in all\npass in on em0 proto tcp to 203.0.113.0/24 port ssh")
    syn = packet.parse(bytes(IP(src="198.51.100.2", dst="203.0.113.9") / TCP(dport=22)))
    udp = packet.parse(bytes(IP(src="198.51.100.2", dst="203.0.113.9") / UDP(dport=22)))
    assert nr(rs, syn) == 1
    assert nr(rs, udp) == 0


def test_bench_ruleset_shape_and_speed():
    from pfcluster.bench.rules import bench_rule_eval, make_ruleset

    for n in (10, 100, 1000):
        rs = parse_rules(make_ruleset(n))
        assert len(rs.rules) == n
    assert make_ruleset(100) == make_ruleset(100)
    assert bench_rule_eval(10, 500) > 1000
