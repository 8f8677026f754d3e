"""Fuzzing the pf.conf parser: any text either loads or raises RuleSyntaxError.

PFCLUSTER_FUZZ_EXAMPLES sets the scale (100000 in CI; 2000 while developing); each of
these fuzzers runs a fifth of it. pf.conf is the operator's file, not a peer's bytes, and
hypothesis spends ~20 ms generating each of these examples (lists of 40 tokens, mutated
files): 100k each took 18 of a 39-minute suite. The decoders of peer input keep 100k.
"""

from __future__ import annotations

import os
import socket

from hypothesis import given
from hypothesis import strategies as st

from pfcluster.pf.constants import PF_IN, PF_OUT
from pfcluster.pf.rules import RuleSyntaxError, parse_rules

EXAMPLES = max(1, int(os.environ.get("PFCLUSTER_FUZZ_EXAMPLES", "100000")) // 5)
try:
    from conftest import fuzz_settings
except ImportError:  # pragma: no cover - run outside pytest's rootdir
    from hypothesis import settings

    def fuzz_settings(examples: int = EXAMPLES) -> settings:
        return settings(max_examples=examples, deadline=None, database=None, derandomize=True)


VALID = """\
ext_if = "em0"
svc = "{ ssh, http, 5201 }"
set timeout { tcp.first 60, udp.first 30 }
set limit states 20000
set skip on lo
set block-policy return
table <bad> persist { 198.51.100.0/24, !198.51.100.7, 2001:db8:bad::/48 }
block in log all
block drop in quick from <bad>
pass out all
pass in quick on $ext_if inet proto tcp from any to 203.0.113.0/24 port = 5201 \\
    keep state (max 100, no-sync)
pass in on { em0 ! em1 } proto { tcp udp } from any port > 1023 to any port $svc
pass in inet proto icmp icmp-type { echoreq unreach code 3 }
pass in inet6 proto icmp6 icmp6-type echoreq
pass in proto tcp to port 8000 >< 8100 flags any modulate state (tcp.established 600)
pass in proto tcp from 10.0.0.0/8 to ! 10.1.0.0/16 port 1000:2000 flags S/SA no state
block return-rst in proto tcp to port 10 <> 20 label "rst"
pass log (all) proto udp to port { < 10, >= 60000 } synproxy state
nat on $ext_if inet from 10.0.0.0/8 to any -> ($ext_if) round-robin
no nat on $ext_if from 10.0.0.5 to any
rdr pass on $ext_if proto tcp to 192.0.2.1 port 8000:8010 -> 10.0.0.9 port 80:*
binat on $ext_if from 10.0.0.7 to any -> 192.0.2.7
match out on $ext_if from 10.0.0.0/8 nat-to { 192.0.2.1 192.0.2.2 } source-hash "k"
match in on $ext_if proto tcp to 192.0.2.1 port 80 rdr-to 10.0.0.9 port 8080
pass out on $ext_if proto udp from 10.1.0.0/16 nat-to 192.0.2.0/24 bitmask static-port
pass on $ext_if from 10.0.0.8 binat-to 192.0.2.8
"""

TOKENS = [
    "pass", "block", "in", "out", "log", "quick", "on", "inet", "inet6", "proto", "from",
    "to", "all", "any", "port", "flags", "icmp-type", "icmp6-type", "code", "keep", "no",
    "modulate", "synproxy", "state", "label", "table", "set", "timeout", "limit", "skip",
    "persist", "const", "drop", "return", "return-rst", "max", "no-sync", "sloppy",
    "tcp", "udp", "icmp", "icmp6", "em0", "lo", "S/SA", "/SA", "FSRPAUEW", "10.0.0.1",
    "10.0.0.0/8", "2001:db8::1", "::/0", "<bad>", "<", ">", "{", "}", "(", ")", ",", "!",
    "=", "!=", "<=", ">=", "><", "<>", ":", "/", "22", "80", "1000:2000", "65536", "ssh",
    "$ext_if", "$nope", "x", '"q"', '"', "\\\n", "\n", "#c\n", "tcp.first", "states",
    "echoreq", "block-policy", "hostid", "debug", "0x10", "-1", "   ", "\t",
    "match", "nat-to", "rdr-to", "binat-to", "nat", "rdr", "binat", "->", "-", "(em0)",
    "(em0:0)", "bitmask", "random", "source-hash", "round-robin", "static-port",
    "sticky-address", "least-states", "pass", "af-to", "route-to", "192.0.2.1", "<ext>",
    "0x0123456789abcdef0123456789abcdef", "8080:*", "8000:8010",
]


def check(text: str) -> None:
    try:
        rs = parse_rules(text, "fuzz.conf")
    except RuleSyntaxError as e:
        assert str(e).startswith("fuzz.conf:")
        assert e.line >= 1 and e.col >= 1
        return
    # a loaded ruleset prints, re-parses to the same rules and evaluates without surprises
    str(rs)
    for r in rs.translation_rules:
        again = parse_rules(str(r)).translation_rules
        assert [str(x) for x in again] == [str(r)]
    for r in rs.rules:
        again = parse_rules(str(r)).rules
        assert [str(x) for x in again] == [str(r)]
    for af, src, dst in ((socket.AF_INET, "198.51.100.7", "203.0.113.1"),
                         (socket.AF_INET6, "2001:db8::1", "2001:db8::2")):
        pkt = _Pkt(af, socket.inet_pton(af, src), socket.inet_pton(af, dst))
        for proto in (6, 17, 1, 58, 50):
            pkt.proto = proto
            for direction, ifname in ((PF_IN, "em0"), (PF_OUT, "em1")):
                won = rs.evaluate(pkt, direction, ifname)
                # the winner is a rule of this ruleset (None: no rule matched, default pass)
                assert won is None or any(won is r for r in rs.rules), won
                assert won is None or won.action in ("pass", "block")
                for last in (rs.last_nat, rs.last_rdr):
                    assert last is None or any(last is r for r in rs.rules)
                tr = rs.translate_lookup(pkt, direction, ifname)
                assert tr is None or any(tr is r for r in rs.translation_rules)


class _Pkt:
    def __init__(self, af: int, src: bytes, dst: bytes) -> None:
        self.af, self.src, self.dst = af, src, dst
        self.proto, self.sport, self.dport, self.tcp_flags = 6, 1234, 22, 2
        self.icmp_type = self.icmp_code = self.frag_off = 0


@fuzz_settings(EXAMPLES)
@given(st.text(max_size=200))
def test_random_text(text: str) -> None:
    check(text)


@fuzz_settings(EXAMPLES)
@given(st.lists(st.sampled_from(TOKENS), max_size=40),
       st.lists(st.sampled_from([" ", "", "\n"]), min_size=40, max_size=40))
def test_token_soup(tokens: list[str], seps: list[str]) -> None:
    check("".join(t + s for t, s in zip(tokens, seps)))


_mutation = st.tuples(
    st.sampled_from(["delete", "insert", "replace", "token", "dup"]),
    st.integers(0, len(VALID)),
    st.integers(1, 30),
    st.one_of(st.characters(), st.sampled_from(TOKENS)),
)


@fuzz_settings(EXAMPLES)
@given(st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_valid_file(mutations: list[tuple[str, int, int, str]]) -> None:
    text = VALID
    for kind, pos, length, piece in mutations:
        pos = min(pos, len(text))
        if kind == "delete":
            text = text[:pos] + text[pos + length:]
        elif kind == "insert":
            text = text[:pos] + piece + text[pos:]
        elif kind == "replace":
            text = text[:pos] + piece + text[pos + 1:]
        elif kind == "token":
            text = text[:pos] + " " + piece + " " + text[pos:]
        else:
            text = text[:pos] + text[pos:pos + length] + text[pos:]
    check(text)


def test_valid_corpus_loads() -> None:
    rs = parse_rules(VALID)
    assert len(rs.rules) > 20
    assert len(rs.translation_rules) == 4
    assert sum(r.nat is not None or r.rdr is not None for r in rs.rules) == 5
    check(VALID)
