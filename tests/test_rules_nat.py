"""Translation rules: nat-to/rdr-to/binat-to and match rules (OpenBSD), nat/rdr/binat
(FreeBSD), their pools, errors, printing as pfctl and evaluation semantics."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pfcluster.cli.replay import replay
from pfcluster.pf.constants import AF_INET, AF_INET6, PF_IN, PF_OUT, TH_SYN
from pfcluster.pf.filter import MATCH
from pfcluster.pf.pool import Pool
from pfcluster.pf.rules import RuleSyntaxError, parse_rules
from pfcluster.pf.ruleset import Rule


class Pkt:
    def __init__(self, src: str = "10.0.0.5", dst: str = "198.51.100.9", proto: int = 6,
                 sport: int = 40000, dport: int = 80) -> None:
        self.af = AF_INET6 if ":" in src else AF_INET
        self.src = socket.inet_pton(self.af, src)
        self.dst = socket.inet_pton(self.af, dst)
        self.proto, self.sport, self.dport = proto, sport, dport
        self.tcp_flags, self.icmp_type, self.icmp_code, self.frag_off = TH_SYN, 0, 0, 0


def ip(text: str) -> int:
    return int.from_bytes(socket.inet_pton(AF_INET6 if ":" in text else AF_INET, text), "big")


# written -> printed (pfctl -sr / -sn); the printed text must parse back to itself
FORMS = [
    ("match out on em0 inet from 10.0.0.0/8 to any nat-to (em0)",
     "match out on em0 inet from 10.0.0.0/8 to any nat-to (em0) round-robin"),
    ("match out on em0 from 10.0.0.0/8 nat-to (em0:0)",
     "match out on em0 inet from 10.0.0.0/8 to any nat-to (em0:0)"),
    ("match out on em0 from 10.0.0.0/8 nat-to 192.0.2.1 port 50001:65535",
     "match out on em0 inet from 10.0.0.0/8 to any nat-to 192.0.2.1"),
    ("pass out on em0 proto udp from 10.0.0.0/8 nat-to 192.0.2.1 port 1024:2047",
     "pass out on em0 inet proto udp from 10.0.0.0/8 to any keep state "
     "nat-to 192.0.2.1 port 1024:2047"),
    ("pass out on em0 from 10.0.0.0/8 nat-to 192.0.2.1 port 5000",
     "pass out on em0 inet from 10.0.0.0/8 to any flags S/SA keep state "
     "nat-to 192.0.2.1 port 5000"),
    ("pass out on em0 from 10.0.0.0/8 nat-to 192.0.2.0/28 bitmask static-port",
     "pass out on em0 inet from 10.0.0.0/8 to any flags S/SA keep state "
     "nat-to 192.0.2.0/28 bitmask static-port"),
    ("pass out from 10.0.0.0/8 nat-to { 192.0.2.1 192.0.2.2 } random sticky-address",
     "pass out inet from 10.0.0.0/8 to any flags S/SA keep state "
     "nat-to { 192.0.2.1, 192.0.2.2 } random sticky-address"),
    ("pass out from 10.0.0.0/8 nat-to { 192.0.2.1, 192.0.2.2 }",
     "pass out inet from 10.0.0.0/8 to any flags S/SA keep state "
     "nat-to { 192.0.2.1, 192.0.2.2 } round-robin"),
    ("pass out from 10.0.0.0/8 nat-to 192.0.2.0/24 source-hash "
     "0x0123456789abcdef0123456789ABCDEF",
     "pass out inet from 10.0.0.0/8 to any flags S/SA keep state "
     "nat-to 192.0.2.0/24 source-hash 0x0123456789abcdef0123456789abcdef"),
    ("match out on egress inet6 nat-to (egress:0)",
     "match out on egress inet6 all nat-to (egress:0) round-robin"),
    ("table <ext> { 192.0.2.0/24 }\npass out nat-to <ext>",
     "pass out all flags S/SA keep state nat-to <ext> round-robin"),
    ("match in on em0 proto tcp to 192.0.2.1 port 80 rdr-to 10.0.0.9 port 8080",
     "match in on em0 inet proto tcp from any to 192.0.2.1 port = 80 "
     "rdr-to 10.0.0.9 port 8080"),
    ("pass in proto tcp to 192.0.2.1 port 8000:8009 rdr-to 10.0.0.9 port 9000:*",
     "pass in inet proto tcp from any to 192.0.2.1 port 8000:8009 flags S/SA keep state "
     "rdr-to 10.0.0.9 port 9000:9009"),
    ("pass in inet6 proto tcp to 2001:db8::1 port 443 rdr-to 2001:db8:1::7",
     "pass in inet6 proto tcp from any to 2001:db8::1 port = 443 flags S/SA keep state "
     "rdr-to 2001:db8:1::7"),
    ("match in log quick on em0 proto tcp to port 22 rdr-to 10.0.0.22 label \"ssh\"",
     "match in log quick on em0 inet proto tcp from any to any port = 22 label \"ssh\" "
     "rdr-to 10.0.0.22"),
    # FreeBSD (pfctl -sn)
    ("nat on em0 inet from 10.0.0.0/8 to any -> (em0)",
     "nat on em0 inet from 10.0.0.0/8 to any -> (em0) round-robin"),
    # pfctl refuses static-port with a range only when neither end is the default's
    ("nat pass log on em0 from 10.0.0.0/8 -> 192.0.2.1 port 1024:65535 static-port",
     "nat pass log on em0 inet from 10.0.0.0/8 to any -> 192.0.2.1 static-port"),
    ("nat on em0 proto udp from 10.0.0.0/8 to any -> 192.0.2.1 static-port",
     "nat on em0 inet proto udp from 10.0.0.0/8 to any -> 192.0.2.1 static-port"),
    ("nat pass log on em0 all -> { 192.0.2.1 192.0.2.2 } sticky-address",
     "nat pass log on em0 inet all -> { 192.0.2.1, 192.0.2.2 } round-robin sticky-address"),
    ("no nat on em0 from 10.0.0.5 to any", "no nat on em0 inet from 10.0.0.5 to any"),
    ("rdr on em0 proto tcp from any to 192.0.2.1 port 80 -> 10.0.0.9 port 8080",
     "rdr on em0 inet proto tcp from any to 192.0.2.1 port = 80 -> 10.0.0.9 port 8080"),
    ("rdr pass on em0 proto tcp to 192.0.2.1 port 8000:8010 -> 10.0.0.9 port 80:*",
     "rdr pass on em0 inet proto tcp from any to 192.0.2.1 port 8000:8010 "
     "-> 10.0.0.9 port 80:90"),
    ("no rdr on em0 proto tcp from 10.0.0.0/8 to any port 80",
     "no rdr on em0 inet proto tcp from 10.0.0.0/8 to any port = 80"),
    ("binat on em0 from 10.0.0.7 to any -> 192.0.2.7",
     "binat on em0 inet from 10.0.0.7 to any -> 192.0.2.7"),
    ("binat on em0 inet from 10.0.1.0/24 to ! 10.0.0.0/8 -> 192.0.2.0/24",
     "binat on em0 inet from 10.0.1.0/24 to ! 10.0.0.0/8 -> 192.0.2.0/24"),
    ("no binat on em0 from 10.0.0.7 to 10.9.0.0/16",
     "no binat on em0 inet from 10.0.0.7 to 10.9.0.0/16"),
]


def rules_of(rs: Any) -> list[Rule]:
    return list(rs.translation_rules) + list(rs.rules)


@pytest.mark.parametrize(("text", "printed"), FORMS, ids=[f[0][:50] for f in FORMS])
def test_parse_print_parse(text: str, printed: str) -> None:
    rs = parse_rules(text)
    got = [str(r) for r in rules_of(rs)]
    assert got == [printed]
    again = parse_rules(printed)
    assert [str(r) for r in rules_of(again)] == [printed]
    # the reparsed pool is the same pool, field by field
    for a, b in zip(rules_of(rs), rules_of(again)):
        for pa, pb in ((a.nat, b.nat), (a.rdr, b.rdr)):
            assert (pa is None) == (pb is None)
            if pa is not None and pb is not None:
                for f in Pool.__slots__:
                    va, vb = getattr(pa, f), getattr(pb, f)
                    if f == "addrs":
                        va, vb = [x.key() for x in va], [x.key() for x in vb]
                    elif f == "table":
                        va = va.name if va is not None else None
                        vb = vb.name if vb is not None else None
                    elif f == "proxy_port" and pa.role == "nat":
                        # the default range written out equals "not given"
                        va = (0, 0) if va == Pool.DEFAULT_NAT_PORTS else va
                    assert va == vb, f


def test_pool_fields() -> None:
    assert Pool.DEFAULT_NAT_PORTS == (50001, 65535)
    r = parse_rules("match out from 10.0.0.0/8 nat-to 192.0.2.1").rules[0]
    assert r.action == MATCH and r.nat is not None and r.rdr is None
    assert r.nat.proxy_port == (0, 0) and r.nat.opts == "none" and r.nat.kind == "addrs"
    assert not r.nat.static_port and not r.nat.sticky and r.nat.hash_key == b""
    r = parse_rules("pass out from 10.0.0.0/8 nat-to 192.0.2.0/24 source-hash \"secret\" "
                    "sticky-address").rules[0]
    assert r.nat is not None and r.nat.hash_key == hashlib.md5(b"secret").digest()
    assert r.nat.opts == "source-hash" and r.nat.sticky
    r = parse_rules("pass out on em0 nat-to (em0)").rules[0]
    assert r.nat is not None and r.nat.kind == "iface" and r.nat.ifname == "em0"
    assert r.af == 0  # an interface pool does not decide the family
    r = parse_rules("pass in proto tcp to port 80 rdr-to 10.0.0.1 port 8080").rules[0]
    assert r.rdr is not None and r.rdr.proxy_port == (8080, 8080) and r.rdr.role == "rdr"
    assert r.af == AF_INET  # the pool's addresses decide it (collapse_redirspec)


def test_binat_to_expands_to_nat_out_and_rdr_in() -> None:
    rs = parse_rules("pass on em0 proto tcp from 10.0.0.7 port 80 to 203.0.113.0/24 "
                     "binat-to 192.0.2.7")
    assert [str(r) for r in rs.rules] == [
        "pass out on em0 inet proto tcp from 10.0.0.7 port = 80 to 203.0.113.0/24 "
        "flags S/SA keep state nat-to 192.0.2.7 static-port",
        "pass in on em0 inet proto tcp from 203.0.113.0/24 to 192.0.2.7 port = 80 "
        "flags S/SA keep state rdr-to 10.0.0.7",
    ]
    out, back = rs.rules
    assert out.direction == PF_OUT and back.direction == PF_IN
    assert back.nat is None and out.rdr is None


def test_match_binat_network() -> None:
    rs = parse_rules("match on em0 from 10.0.1.0/24 binat-to 192.0.2.0/24")
    assert [str(r) for r in rs.rules] == [
        "match out on em0 inet from 10.0.1.0/24 to any nat-to 192.0.2.0/24 static-port",
        "match in on em0 inet from any to 192.0.2.0/24 rdr-to 10.0.1.0/24",
    ]


ERRORS = [
    ("pass in from 10.0.0.0/8 nat-to 192.0.2.1",
     "pf.conf:1:25: nat-to can only be used outbound"),
    ("pass from 10.0.0.0/8 nat-to 192.0.2.1", "pf.conf:1:22: nat-to can only be used outbound"),
    ("match out proto tcp to port 80 rdr-to 10.0.0.1",
     "pf.conf:1:32: rdr-to can only be used inbound"),
    ("block out nat-to 192.0.2.1", "pf.conf:1:11: nat-to and rdr-to require keep state"),
    ("pass out nat-to 192.0.2.1 no state", "pf.conf:1:10: nat-to and rdr-to require keep state"),
    ("pass out nat-to 192.0.2.1 nat-to 192.0.2.2",
     "pf.conf:1:27: cannot respecify nat-to/binat-to"),
    ("pass in rdr-to 10.0.0.1 rdr-to 10.0.0.2", "pf.conf:1:25: cannot respecify rdr-to"),
    ("pass out nat-to", "pf.conf:1:16: missing address after 'nat-to'"),
    ("pass out nat-to em0", "pf.conf:1:17: invalid address 'em0' (an interface's address is "
     "written (em0))"),
    ("pass out nat-to (em0:network)",
     "pf.conf:1:18: interface modifier ':network' is not supported in a translation address"),
    ("pass out nat-to ! 192.0.2.1", "pf.conf:1:17: a translation address cannot be negated"),
    ("pass out nat-to any", "pf.conf:1:17: 'any' is not a translation address"),
    ("nat on em0 inet6 all -> 192.0.2.1", "pf.conf:1:25: af mismatch in translation spec"),
    ("pass out nat-to { 192.0.2.1 <t> }",
     "pf.conf:1:29: only addresses can be listed in a translation pool"),
    ("pass out nat-to { 192.0.2.1 192.0.2.2 } bitmask",
     "pf.conf:1:41: pool type is not valid for multiple translation addresses"),
    ("pass out nat-to <t> bitmask", "pf.conf:1:21: tables are not supported by pool type"),
    ("pass out nat-to (em0) bitmask",
     "pf.conf:1:23: interface (em0) is not supported by pool type"),
    ("pass out nat-to 192.0.2.1 random bitmask", "pf.conf:1:34: pool type cannot be redefined"),
    ("pass out nat-to 192.0.2.1 port 1024:2048 static-port",
     "pf.conf:1:42: the 'static-port' option can't be used when specifying a port range"),
    ("pass in rdr-to 10.0.0.1 static-port",
     "pf.conf:1:25: the 'static-port' option is only valid with nat rules"),
    ("pass out nat-to 192.0.2.1 source-hash 0x1234",
     "pf.conf:1:39: hex key must be 128 bits (32 hex digits) long"),
    ("pass out nat-to 192.0.2.1 source-hash 0x0123456789abcdef0123456789abcdeg",
     "pf.conf:1:39: invalid hex key"),
    ("pass out nat-to 192.0.2.1 least-states", "pf.conf:1:27: 'least-states' is not supported"),
    ("pass out static-port", "pf.conf:1:10: 'static-port' only follows a nat-to, rdr-to or "
     "binat-to address"),
    ("pass out inet6 nat-to 192.0.2.1", "pf.conf:1:23: af mismatch in translation spec"),
    ("pass out nat-to { 192.0.2.1 2001:db8::1 }", "pf.conf:1:10: translation spec contains "
     "addresses with different address families"),
    ("pass out af-to inet6 from 2001:db8::/96", "pf.conf:1:10: 'af-to' is not supported"),
    ("pass out route-to (em1 192.0.2.254) nat-to 192.0.2.1",
     "pf.conf:1:10: 'route-to' is supported on 'pass in' rules only: Linux has routed a "
     "packet before the out test sees it (FORWARD), so write it on the rule of the interface "
     "the packet comes in on"),
    ("pass out nat-to 192.0.2.1 route-to (em1 192.0.2.254)",
     "pf.conf:1:27: 'route-to' is supported on 'pass in' rules only: Linux has routed a "
     "packet before the out test sees it (FORWARD), so write it on the rule of the interface "
     "the packet comes in on"),
    ("pass in on em0 from 10.0.0.1 binat-to 192.0.2.1",
     "pf.conf:1:30: binat-to cannot be specified with a direction"),
    ("pass on em0 from <t> binat-to 192.0.2.1",
     "pf.conf:1:18: invalid use of table <t> as the source address of a binat-to rule"),
    ("pass on em0 binat-to 192.0.2.1",
     "pf.conf:1:13: binat-to requires a specified source address"),
    ("pass on em0 from 10.0.0.0/24 binat-to 192.0.2.0/25",
     "pf.conf:1:39: binat-to source and redirect address must have the same netmask"),
    ("pass on em0 from 10.0.0.1 binat-to <t>",
     "pf.conf:1:27: binat-to requires a single redirect address"),
    ("pass on em0 from 10.0.0.1 binat-to 192.0.2.1 port 80",
     "pf.conf:1:51: binat-to does not take a port"),
    ("pass on em0 from 10.0.0.1 binat-to 192.0.2.1 rdr-to 10.0.0.2",
     "pf.conf:1:46: rdr-to cannot be combined with binat-to"),
    # FreeBSD
    ("nat on em0 from 10.0.0.0/8 to any", "pf.conf:1:34: 'nat' rule requires '-> address'"),
    ("no nat on em0 from 10.0.0.0/8 to any -> 192.0.2.1",
     "pf.conf:1:38: 'no nat' rule does not need '->'"),
    ("no nat pass on em0 all", "pf.conf:1:8: \"pass\" not valid with \"no\""),
    ("nat in on em0 all -> 192.0.2.1", "pf.conf:1:5: 'in' is not valid on a nat rule"),
    ("nat on em0 all - 192.0.2.1", "pf.conf:1:18: unexpected '192.0.2.1', expected '->'"),
    ("nat pass log on em0 from 10.0.0.0/8 -> 192.0.2.1 port 1024:2048 static-port",
     "pf.conf:1:65: the 'static-port' option can't be used when specifying a port range"),
    ("nat on em0 all -> { 192.0.2.1 192.0.2.2 } random",
     "pf.conf:1:43: only round-robin valid for multiple redirection addresses"),
    ("nat on em0 all -> <t> source-hash",
     "pf.conf:1:23: tables are only supported in round-robin redirection pools"),
    ("rdr on em0 proto tcp to port > 80 -> 10.0.0.1",
     "pf.conf:1:30: invalid port operator for rdr destination port"),
    ("rdr on em0 to 192.0.2.1 -> 10.0.0.1 port 80",
     "pf.conf:1:42: rpool port only applies to tcp/udp"),
    ("rdr on em0 proto tcp to port 80 -> 10.0.0.1 static-port",
     "pf.conf:1:45: the 'static-port' option is only valid with nat rules"),
    ("binat on em0 from <t> to any -> 192.0.2.1",
     "pf.conf:1:19: invalid use of table <t> as the source address of a binat rule"),
    ("binat on em0 from { 10.0.0.1 10.0.0.2 } -> 192.0.2.1",
     "pf.conf:1:30: multiple binat ip addresses"),
    ("binat on em0 from 10.0.0.1 -> { 192.0.2.1 192.0.2.2 }",
     "pf.conf:1:43: binat rule must redirect to a single address"),
    ("binat on em0 from 10.0.0.0/24 -> 192.0.2.0/25",
     "pf.conf:1:34: 'binat' source mask and redirect mask must be the same"),
    ("binat on em0 from 10.0.0.1 -> 2001:db8::1",
     "pf.conf:1:31: binat ip versions must match"),
    ("binat on em0 from any -> (em0)",
     "pf.conf:1:23: binat rule must redirect to a single address"),
    ("binat on em0 from 10.0.0.1 -> 192.0.2.1 port 80",
     "pf.conf:1:46: binat rules take no port or pool options"),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS, ids=[e[1][12:60] for e in ERRORS])
def test_errors_name_file_line_col(text: str, expected: str) -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_rules(text)
    assert str(info.value) == expected


def test_error_on_a_later_line() -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_rules("pass all\n\nmatch out on em0 nat-to (em0) bitmask\n", "nat.conf")
    assert str(info.value) == "nat.conf:3:31: interface (em0) is not supported by pool type"


# -- evaluation --------------------------------------------------------------------


def test_match_never_decides_and_last_nat_wins() -> None:
    rs = parse_rules(
        "match out on em0 from 10.0.0.0/8 nat-to 192.0.2.1\n"
        "match out on em0 to 198.51.100.0/24 nat-to 192.0.2.2\n"
        "match out on em0 to 203.0.113.0/24 nat-to 192.0.2.3\n"
    )
    assert rs.evaluate(Pkt(), PF_OUT, "em0") is None  # default pass: match rules only
    assert rs.last_nat is rs.rules[1] and rs.last_rdr is None
    assert rs.evaluate(Pkt(dst="203.0.113.1"), PF_OUT, "em0") is None
    assert rs.last_nat is rs.rules[2]
    assert rs.evaluate(Pkt(src="172.16.0.1", dst="192.0.2.99"), PF_OUT, "em0") is None
    assert rs.last_nat is None  # reset on every call


def test_match_rule_after_a_translation_sees_the_new_source() -> None:
    rs = parse_rules(
        "match out on em0 from 10.0.0.0/8 nat-to 192.0.2.1\n"
        "match out on em0 from 10.0.0.0/16 nat-to 192.0.2.2\n"
    )
    rs.evaluate(Pkt(), PF_OUT, "em0")
    assert rs.last_nat is rs.rules[0]  # the source is 192.0.2.1 by the second rule


def test_deciding_rule_nat_and_block() -> None:
    rs = parse_rules(
        "match out on em0 to 198.51.100.0/24 nat-to 192.0.2.1\n"
        "pass out on em0 all\n"
        "pass out on em0 to 198.51.100.9 nat-to 192.0.2.9\n"
        "block out on em0 to 198.51.100.66\n"
    )
    assert rs.evaluate(Pkt(dst="198.51.100.1"), PF_OUT, "em0") is rs.rules[1]
    assert rs.last_nat is rs.rules[0]
    assert rs.evaluate(Pkt(dst="198.51.100.9"), PF_OUT, "em0") is rs.rules[2]
    assert rs.last_nat is rs.rules[2]  # the deciding rule's own nat-to comes last
    won = rs.evaluate(Pkt(dst="198.51.100.66"), PF_OUT, "em0")
    assert won is rs.rules[3] and won.action == "block"
    assert rs.last_nat is rs.rules[0]  # the caller drops it: the packet is blocked


def test_overridden_pass_rule_nat_does_not_count() -> None:
    rs = parse_rules("pass out from 10.0.0.0/8 nat-to 192.0.2.9\n"
                     "pass out from 10.0.0.0/8\n")
    assert rs.evaluate(Pkt(), PF_OUT, "em0") is rs.rules[1]
    assert rs.last_nat is None


def test_quick_stops_on_match_and_pass_rules() -> None:
    rs = parse_rules(
        "pass out from 10.0.0.0/8\n"
        "match out quick from 10.0.0.0/8 nat-to 192.0.2.1\n"
        "block out all\n"
    )
    assert rs.evaluate(Pkt(), PF_OUT, "em0") is rs.rules[0]
    assert rs.last_nat is rs.rules[1]
    rs = parse_rules(
        "match out to 198.51.100.0/24 nat-to 192.0.2.1\n"
        "pass out quick all\n"
        "match out to 198.51.100.0/24 nat-to 192.0.2.2\n"
    )
    assert rs.evaluate(Pkt(), PF_OUT, "em0") is rs.rules[1]
    assert rs.last_nat is rs.rules[0]


def test_rules_after_match_rdr_see_the_translated_destination() -> None:
    rs = parse_rules(
        "match in on em0 proto tcp to 192.0.2.1 port 80 rdr-to 10.0.0.9 port 8080\n"
        "block in on em0 all\n"
        "pass in on em0 proto tcp to 10.0.0.9 port 8080\n"
    )
    pkt = Pkt(src="198.51.100.7", dst="192.0.2.1", dport=80)
    # the pass rule sees the translated destination 10.0.0.9:8080, as pf.conf(5) says
    assert rs.evaluate(pkt, PF_IN, "em0") is rs.rules[2]
    assert rs.last_rdr is rs.rules[0] and rs.last_nat is None
    # without the match rule's translation the packet would be blocked
    assert rs.evaluate(Pkt(src="198.51.100.7", dst="192.0.2.1", dport=81), PF_IN,
                       "em0") is rs.rules[1]
    assert rs.last_rdr is None


def test_later_rules_see_nat_source_and_hook() -> None:
    rs = parse_rules(
        "match out on em0 from 10.0.0.0/8 nat-to 192.0.2.0/24 bitmask\n"
        "block out on em0 all\n"
        "pass out on em0 from 192.0.2.5\n"
    )
    # bitmask keeps the host part: 10.0.0.5 -> 192.0.2.5
    assert rs.evaluate(Pkt(src="10.0.0.5"), PF_OUT, "em0") is rs.rules[2]
    assert rs.evaluate(Pkt(src="10.0.0.6"), PF_OUT, "em0") is rs.rules[1]
    # the NAT core's choice replaces the preview
    seen = []

    def hook(r: Rule, pkt: Any, src: int, sport: int, dst: int,
             dport: int) -> tuple[int, int, int, int]:
        seen.append((r.nr, src, sport))
        return ip("192.0.2.5"), 50001, dst, dport

    rs.transaddr = hook
    assert rs.evaluate(Pkt(src="10.0.0.6"), PF_OUT, "em0") is rs.rules[2]
    assert seen == [(0, ip("10.0.0.6"), 40000)]


def test_interface_pool_leaves_address_without_hook() -> None:
    rs = parse_rules("match out on em0 from 10.0.0.0/8 nat-to (em0)\n"
                     "block out on em0 from 10.0.0.0/8\n")
    assert rs.evaluate(Pkt(), PF_OUT, "em0") is rs.rules[1]
    assert rs.last_nat is rs.rules[0]


def test_plain_ruleset_takes_the_plain_walk() -> None:
    rs = parse_rules("block all\npass out on em0 from 10.0.0.0/8\n")
    assert not rs._full
    assert rs.evaluate(Pkt(), PF_OUT, "em0") is rs.rules[1]
    assert rs.last_nat is None and rs.last_rdr is None
    assert parse_rules("match out all\npass all\n")._full
    assert parse_rules("pass out nat-to 192.0.2.1\n")._full


def test_checksum_unchanged_without_translation_rules() -> None:
    text = "block all\npass out on em0 from 10.0.0.0/8\n"
    rs = parse_rules(text)
    md5 = hashlib.md5()
    for r in rs.rules:
        md5.update(str(r).encode() + b"\n")
    assert rs.checksum == md5.digest()
    assert parse_rules(text + "nat on em0 all -> 192.0.2.1\n").checksum != rs.checksum


# -- FreeBSD translation rules ----------------------------------------------------------

FREEBSD = """\
no nat on em0 from 10.0.0.5 to any
nat on em0 from 10.0.0.0/8 to any -> 192.0.2.1
nat on em0 from 10.0.0.0/16 to any -> 192.0.2.2
binat on em0 from 10.0.0.7 to any -> 192.0.2.7
rdr on em0 proto tcp from any to 192.0.2.1 port 80 -> 10.0.0.9 port 8080
no rdr on em0 proto tcp from 198.51.100.66 to any port 80
rdr on em0 proto tcp from any to any port 80 -> 10.0.0.10
pass all
"""


def test_translation_rules_are_a_separate_list_printed_first() -> None:
    rs = parse_rules(FREEBSD)
    assert [r.action for r in rs.translation_rules] == ["nat", "nat", "nat", "binat", "rdr",
                                                        "rdr", "rdr"]
    assert [str(r) for r in rs.rules] == ["pass all flags S/SA keep state"]
    text = str(rs).splitlines()
    assert text[0] == "@0 no nat on em0 inet from 10.0.0.5 to any"
    assert text[-1].startswith("@0 pass all")
    assert len(text) == 8
    assert not rs._full  # FreeBSD rules do not slow the filter walk


def test_translate_lookup_first_match_and_no_nat() -> None:
    rs = parse_rules(FREEBSD)
    tr = rs.translation_rules
    got = rs.translate_lookup(Pkt(src="10.0.0.5"), PF_OUT, "em0")
    assert got is tr[0] and got.pool is None  # `no nat` is returned, with no pool
    got = rs.translate_lookup(Pkt(src="10.0.3.4"), PF_OUT, "em0")
    assert got is tr[1] and got.pool is not None and str(got.pool) == "192.0.2.1"
    assert rs.translate_lookup(Pkt(src="10.0.3.4"), PF_OUT, "em1") is None
    assert rs.translate_lookup(Pkt(src="172.16.0.1"), PF_OUT, "em0") is None
    # nat applies outbound only
    assert rs.translate_lookup(Pkt(src="10.0.3.4", dport=443), PF_IN, "em0") is None


def test_translate_lookup_binat_before_nat_and_both_ways() -> None:
    rs = parse_rules(FREEBSD)
    tr = rs.translation_rules
    assert rs.translate_lookup(Pkt(src="10.0.0.7"), PF_OUT, "em0") is tr[3]
    back = Pkt(src="198.51.100.1", dst="192.0.2.7", sport=80, dport=5555)
    assert rs.translate_lookup(back, PF_IN, "em0") is tr[3]


def test_translate_lookup_rdr_inbound_first_match() -> None:
    rs = parse_rules(FREEBSD)
    tr = rs.translation_rules
    web = Pkt(src="198.51.100.1", dst="192.0.2.1", dport=80)
    assert rs.translate_lookup(web, PF_IN, "em0") is tr[4]
    other = Pkt(src="198.51.100.66", dst="192.0.2.3", dport=80)
    got = rs.translate_lookup(other, PF_IN, "em0")
    assert got is tr[5] and got.pool is None
    assert rs.translate_lookup(Pkt(src="198.51.100.2", dst="192.0.2.3", dport=80), PF_IN,
                               "em0") is tr[6]
    assert rs.translate_lookup(web, PF_OUT, "em0") is None  # rdr is inbound only
    assert rs.translate_lookup(Pkt(proto=17, dst="192.0.2.1"), PF_IN, "em0") is None


def test_replay_accepts_translation_rules(tmp_path: Path) -> None:
    data = Path(__file__).resolve().parents[1] / "src" / "pfcluster" / "data"
    conf = tmp_path / "nat.conf"
    conf.write_text((data / "sample.conf").read_text() + "\n"
                    "nat on em1 from 198.51.100.0/24 to any -> 203.0.113.254\n"
                    "match out on em1 from 198.51.100.0/24 nat-to 203.0.113.253\n"
                    "match in on em0 proto tcp to port 2222 rdr-to 203.0.113.10 port 22\n")
    res = CliRunner().invoke(replay, ["--rules", str(conf), "--iface", "em0=198.51.100.0/24",
                                      "--iface", "em1=203.0.113.0/24", "--json",
                                      str(data / "sample.pcap")])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.output.splitlines()]
    assert lines[0]["action"] == "pass" and "summary" in lines[-1]


def test_whole_ruleset_prints_and_reparses_to_itself() -> None:
    text = FREEBSD + (
        "table <pool> { 192.0.2.64/26 }\n"
        "match out on em0 inet from 10.0.0.0/8 to any nat-to (em0)\n"
        "match in on em0 proto tcp to 192.0.2.1 port 80 rdr-to 10.0.0.9 port 8080\n"
        "pass out on em0 from 10.1.0.0/16 nat-to <pool> source-hash \"k\" sticky-address\n"
        "pass on em0 from 10.0.0.8 binat-to 192.0.2.8\n"
    )
    rs = parse_rules(text)
    printed = "\n".join(str(r) for r in rules_of(rs))
    again = parse_rules("table <pool> { 192.0.2.64/26 }\n" + printed)
    assert str(again) == str(rs)
    assert again.checksum == rs.checksum
    assert len(again.translation_rules) == 7 and len(again.rules) == 6  # binat-to: 2 rules
