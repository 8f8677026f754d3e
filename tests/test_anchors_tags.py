"""Anchors and tags: parse/print round trips, errors, evaluation into anchors (quick,
nested, inline, wildcard, loaded from a file, loaded at run time), reloads keeping
runtime-loaded anchors, and tags carried from the `in` test to the `out` test and on
states, with scapy-built packets through pf.router.route.
"""

from __future__ import annotations

import pytest

scapy_all = pytest.importorskip("scapy.all")
from scapy.all import IP, TCP, UDP  # noqa: E402

from pfcluster.packet import parse  # noqa: E402
from pfcluster.pf.constants import PF_IN  # noqa: E402
from pfcluster.pf.filter import Filter  # noqa: E402
from pfcluster.pf.router import ROUTE_BLOCK, ROUTE_PASS, route  # noqa: E402
from pfcluster.pf.rules import RuleSyntaxError, parse_anchor, parse_rules  # noqa: E402
from pfcluster.pf.ruleset import ANCHOR_OVERFLOW, Rule  # noqa: E402

LAN, WAN = "em0", "em1"
CLIENT, SERVER, BAD = "198.51.100.10", "203.0.113.10", "192.0.2.66"


def tcp(src: str = CLIENT, dst: str = SERVER, sport: int = 40000, dport: int = 80,
        flags: str = "S") -> bytes:
    return bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=1000))


def udp(src: str = CLIENT, dst: str = SERVER, dport: int = 53) -> bytes:
    return bytes(IP(src=src, dst=dst) / UDP(sport=5353, dport=dport))


def decide(rules: str, raw: bytes, direction: int = PF_IN, ifname: str = LAN) -> Rule | None:
    rs = parse_rules(rules, "t.conf")
    return rs.evaluate(parse(raw), direction, ifname)


def desc(r: Rule | None) -> str:
    return "default" if r is None else str(r)


# -- parse and print -------------------------------------------------------------------

ROUND_TRIP = [
    'anchor "foo" all',
    'anchor "foo" in on em0 inet proto tcp from 192.0.2.0/24 to any port = 80',
    'anchor "foo" quick all',
    'anchor "a/b" out all',
    'anchor "relayd/*" all',
    'anchor "*" all',
    "pass in all flags S/SA keep state tag WEB",
    "pass out all flags S/SA keep state tagged WEB",
    "block drop out all ! tagged WEB",
    "match in all tag LAN",
    'pass in proto tcp from any to any port = 22 flags S/SA keep state label "ssh" tag SSH',
    'anchor "t" all tagged WEB',
]


@pytest.mark.parametrize("line", ROUND_TRIP)
def test_print_parses_back_to_itself(line: str) -> None:
    rs = parse_rules(line + "\n")
    printed = str(rs.rules[0])
    assert printed == line
    assert str(parse_rules(printed + "\n").rules[0]) == printed


def test_inline_anchor_rules_are_numbered_per_anchor_and_print_as_pfctl_a() -> None:
    rs = parse_rules('pass all\nanchor "web" in on em0 {\n  block all\n  pass in quick '
                     'proto tcp to port 80\n  anchor "deep" {\n    block quick from '
                     '192.0.2.66\n  }\n}\nblock out all\n')
    assert str(rs).splitlines() == ["@0 pass all flags S/SA keep state",
                                    '@1 anchor "web" in on em0 all',
                                    "@2 block drop out all"]
    assert str(rs.anchors["web"]).splitlines() == [
        "@0 block drop all",
        "@1 pass in quick proto tcp from any to any port = 80 flags S/SA keep state",
        '@2 anchor "deep" all']
    assert str(rs.anchors["web/deep"]) == "@0 block drop quick inet from 192.0.2.66 to any"
    assert list(rs.anchors["web"].children) == ["deep"]


def test_nested_names_print_relative_to_their_anchor() -> None:
    rs = parse_rules('anchor "a" {\n  anchor "b"\n  anchor "/top"\n  anchor "../c"\n'
                     '  anchor "x/*"\n}\n')
    assert [r.anchor.path for r in rs.anchors["a"].rules if r.anchor] == ["a/b", "top", "c",
                                                                          "a/x"]
    assert [str(r) for r in rs.anchors["a"].rules] == [
        'anchor "b" all', 'anchor "/top" all', 'anchor "/c" all', 'anchor "x/*" all']


ERRORS = [
    ('anchor "x" keep state\n', "t.conf:1:12: anchor rules cannot keep state"),
    ('anchor "x" {\npass all\n', "t.conf:1:12: unterminated anchor (missing '}')"),
    ('anchor "x" { pass all }\n', "t.conf:1:14: unexpected 'pass', expected a newline "
     "after '{'"),
    ('anchor "x/*" {\npass all\n}\n', "t.conf:1:14: a wildcard anchor cannot have inline "
     "rules"),
    ('anchor "x" {\nset block-policy return\n}\n', "t.conf:2:1: options cannot be set "
     "inside an anchor"),
    ('anchor "x" {\nnat on em0 from any to any -> 192.0.2.1\n}\n',
     "t.conf:2:1: 'nat' rules are not allowed inside an anchor"),
    ('anchor "x" {\npass all\n}\nanchor "x" {\nblock all\n}\n',
     "t.conf:4:12: anchor 'x' already has rules"),
    ('anchor "../x"\n', "t.conf:1:8: anchor '../x' goes above the main ruleset"),
    ('anchor "a//b"\n', "t.conf:1:8: invalid anchor name 'a//b'"),
    ("pass all tag\n", "t.conf:1:13: unexpected end of line, expected a tag name"),
    ("pass all tag A tag B\n", "t.conf:1:16: tag already specified"),
    ("pass all tagged " + "x" * 64 + "\n", "t.conf:1:17: invalid tag name '" + "x" * 64 + "'"),
    ('load anchor "x" from "/nonexistent/a.conf"\n',
     "t.conf:1:22: cannot read anchor file '/nonexistent/a.conf': No such file or directory"),
    ('load anchor "x/*" from "f"\n', "t.conf:1:13: cannot load into a wildcard anchor"),
    ("pass all {\n", "t.conf:1:10: unexpected '{'"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_errors_name_file_line_and_column(text: str, message: str) -> None:
    with pytest.raises(RuleSyntaxError) as ei:
        parse_rules(text, "t.conf")
    assert str(ei.value) == message


def test_load_anchor_from_file_reports_errors_in_that_file(tmp_path) -> None:
    f = tmp_path / "a.conf"
    f.write_text("pass all\nblock from 192.0.2.300\n")
    with pytest.raises(RuleSyntaxError) as ei:
        parse_rules(f'load anchor "x" from "{f}"\n', "t.conf")
    assert str(ei.value).startswith(f"{f}:2:12:")


# -- evaluation ------------------------------------------------------------------------

def test_anchor_rules_are_evaluated_when_the_anchor_rule_matches() -> None:
    rules = 'block all\nanchor "web" in on em0 proto tcp {\n  pass in proto tcp to port 80\n}\n'
    assert desc(decide(rules, tcp())).startswith("pass in proto tcp")
    assert desc(decide(rules, tcp(), ifname=WAN)) == "block drop all"  # anchor rule misses
    assert desc(decide(rules, udp())) == "block drop all"


def test_last_match_wins_across_the_anchor_boundary() -> None:
    rules = 'anchor "a" {\n  pass all\n}\nblock all\n'
    assert desc(decide(rules, tcp())) == "block drop all"


def test_quick_inside_an_anchor_ends_the_whole_evaluation() -> None:
    rules = 'anchor "a" {\n  pass quick all no state\n}\nblock all\n'
    assert desc(decide(rules, tcp())) == "pass quick all no state"


def test_quick_anchor_rule_stops_after_the_anchor_when_one_of_its_rules_decided() -> None:
    rules = 'anchor "a" quick {\n  pass proto tcp all\n}\nblock all\n'
    assert desc(decide(rules, tcp())).startswith("pass proto tcp")
    assert desc(decide(rules, udp())) == "block drop all"  # nothing inside matched


def test_quick_anchor_does_not_stop_for_a_nested_anchors_rule_as_pf() -> None:
    # pf_step_into_anchor compares the deciding rule's own anchor rule with the quick one
    rules = 'anchor "a" quick {\n  anchor "b" {\n    pass all no state\n  }\n}\nblock all\n'
    assert desc(decide(rules, tcp())) == "block drop all"
    rules = 'anchor "a" quick {\n  pass all no state\n  anchor "b"\n}\nblock all\n'
    assert desc(decide(rules, tcp())) == "pass all no state"


def test_nested_anchor_quick_rule_and_match_rule_tags() -> None:
    rules = ('block all\nanchor "a" {\n  match in proto tcp tag T\n  anchor "b" in {\n'
             '    block in quick from 192.0.2.66 tagged T\n  }\n  pass in all\n}\n')
    assert desc(decide(rules, tcp(src=BAD))) == ("block drop in quick inet from 192.0.2.66 to any "
                                                  "tagged T")
    assert desc(decide(rules, tcp())).startswith("pass in all")
    assert desc(decide(rules, udp(src=BAD))).startswith("pass in all")  # not tagged


def test_wildcard_anchor_walks_the_children_in_name_order() -> None:
    rs = parse_rules('block all\nanchor "relayd/*"\n')
    parse_anchor(rs, "relayd/b", "block quick all\n", "b.conf")
    parse_anchor(rs, "relayd/a", "pass quick proto tcp all\n", "a.conf")
    assert desc(rs.evaluate(parse(tcp()), PF_IN, LAN)).startswith("pass quick proto tcp")
    assert desc(rs.evaluate(parse(udp()), PF_IN, LAN)) == "block drop quick all"


def test_anchor_loaded_from_a_file_in_the_main_ruleset(tmp_path) -> None:
    f = tmp_path / "ftp.conf"
    f.write_text("pass in quick proto tcp to port 21\n")
    rs = parse_rules(f'block all\nanchor "ftp-proxy"\nload anchor "ftp-proxy" from "{f}"\n')
    assert desc(rs.evaluate(parse(tcp(dport=21)), PF_IN, LAN)).startswith("pass in quick")
    assert desc(rs.evaluate(parse(tcp()), PF_IN, LAN)) == "block drop all"


def test_anchor_file_tables_fall_back_to_the_main_rulesets() -> None:
    rs = parse_rules(f"table <bad> {{ {BAD} }}\npass all no state\nanchor \"x\"\n")
    parse_anchor(rs, "x", "block quick from <bad>\n", "x.conf")
    assert desc(rs.evaluate(parse(tcp(src=BAD)), PF_IN, LAN)) == "block drop quick from <bad> to any"
    assert rs.anchors["x"].rules[0].src.table is rs.tables["bad"]


def test_runtime_load_is_atomic_on_error() -> None:
    rs = parse_rules('anchor "x"\n')
    parse_anchor(rs, "x", "block all\n", "x.conf")
    with pytest.raises(RuleSyntaxError):
        parse_anchor(rs, "x", "pass all\npass from nowhere\n", "x.conf")
    assert str(rs.anchors["x"]) == "@0 block drop all"


def test_anchors_nested_too_deep_block_the_packet() -> None:
    rs = parse_rules('pass all no state\nanchor "loop"\n')
    parse_anchor(rs, "loop", 'anchor "/loop"\n', "loop.conf")
    assert rs.evaluate(parse(tcp()), PF_IN, LAN) is ANCHOR_OVERFLOW
    v = Filter(rs, hostid=1).test(PF_IN, LAN, parse(tcp()), 1.0)
    assert v.action == "block"


# -- the filter: runtime anchors, reloads, tags on states --------------------------------

def test_runtime_anchor_survives_a_main_reload_and_flush_empties_it() -> None:
    f = Filter(parse_rules('block all\nanchor "relayd"\n'), hostid=1)
    assert f.load_anchor("relayd", "pass in quick proto tcp to port 80 no state\n", "r") == 1
    assert route(f, LAN, None, parse(tcp()), 1.0).action == ROUTE_PASS
    f.load(parse_rules('block all\nanchor "relayd"\npass out all\n'))
    assert str(f.ruleset.anchors["relayd"]).startswith("@0 pass in quick")
    assert route(f, LAN, None, parse(tcp()), 2.0).action == ROUTE_PASS
    # a file that defines the anchor inline replaces it
    f.load(parse_rules('block all\nanchor "relayd" {\n  block all\n}\n'))
    assert str(f.ruleset.anchors["relayd"]) == "@0 block drop all"
    assert f.flush_anchor("relayd") == 1
    assert f.ruleset.anchors["relayd"].rules == []
    assert f.flush_anchor("nosuch") == 0


def test_runtime_anchor_without_anchor_point_is_kept_but_not_evaluated() -> None:
    f = Filter(parse_rules("block all\n"), hostid=1)
    f.load_anchor("orphan", "pass quick all no state\n", "o")
    assert route(f, LAN, None, parse(tcp()), 1.0).action == ROUTE_BLOCK
    f.load(parse_rules('block all\nanchor "orphan"\n'))
    assert route(f, LAN, None, parse(tcp()), 2.0).action == ROUTE_PASS


TAG_RULES = f"""\
block all
pass in on {LAN} proto tcp to port 80 tag WEB
pass in on {LAN} proto udp
pass out on {WAN} all flags any tagged WEB
block out on {WAN} proto tcp ! tagged WEB
"""


def test_tag_on_in_is_matched_by_tagged_on_out_and_sticks_to_the_states() -> None:
    f = Filter(parse_rules(TAG_RULES), hostid=1)
    rv = route(f, LAN, WAN, parse(tcp()), 1.0)
    assert rv.action == ROUTE_PASS
    assert rv.v_out is not None and "tagged WEB" in str(rv.v_out.rule)
    assert rv.v_in is not None and rv.v_in.state is not None and rv.v_out.state is not None
    assert rv.v_in.state.state_flags >> 16 == rv.v_out.state.state_flags >> 16 != 0
    # udp is not tagged on the way in: `pass out tagged WEB` does not match it
    assert route(f, LAN, WAN, parse(udp()), 1.0).action == ROUTE_BLOCK
    # a later packet of the tcp connection, and the reply, ride the states
    rv = route(f, WAN, LAN, parse(tcp(src=SERVER, dst=CLIENT, sport=80, dport=40000,
                                      flags="SA")), 2.0)
    assert rv.action == ROUTE_PASS and rv.v_in is not None and rv.v_in.reason == "state"


def test_state_tag_goes_on_a_later_packet_for_a_new_out_state() -> None:
    # the SYN makes only the `in` state (tagged WEB); the next packet of the connection
    # matches it on the way in and is tested out by the rules, which see the state's tag
    for tagged, want in ((True, ROUTE_PASS), (False, ROUTE_BLOCK)):
        text = TAG_RULES if tagged else TAG_RULES.replace(" tag WEB", "")
        f = Filter(parse_rules(text), hostid=1)
        v = route(f, LAN, None, parse(tcp()), 1.0)
        assert v.action == ROUTE_PASS and v.v_in is not None and v.v_in.new_state
        rv = route(f, LAN, WAN, parse(tcp(flags="A")), 2.0)
        assert rv.v_in is not None and rv.v_in.reason == "state"
        assert rv.action == want
        if tagged:
            assert rv.v_out is not None and "tagged WEB" in str(rv.v_out.rule)


def test_tag_is_not_carried_to_the_next_packet() -> None:
    f = Filter(parse_rules(TAG_RULES), hostid=1)
    assert route(f, LAN, WAN, parse(tcp()), 1.0).action == ROUTE_PASS
    # a host's own packet (no `in` test) starts untagged
    assert route(f, None, WAN, parse(tcp(sport=40001)), 1.0).action == ROUTE_BLOCK


@pytest.mark.parametrize("dialect", ["openbsd45", "freebsd1301", "freebsd1400", "openbsd6"])
def test_pfsync_carries_no_tag_so_a_peers_imported_state_has_none(dialect: str) -> None:
    from pfcluster.pfsync import convert

    f = Filter(parse_rules(TAG_RULES + "pass in on em0 proto tcp to port 80 keep state "
                           "(sloppy) tag WEB\n"), hostid=1)
    rv = route(f, LAN, WAN, parse(tcp()), 1.0)
    st = rv.v_in.state if rv.v_in is not None else None
    assert st is not None and st.state_flags >> 16 and st.state_flags & 0xFFFF
    rec = convert.export_state(st, 1.0, dialect, f.timeouts, 1)
    assert rec.state_flags == st.state_flags & 0xFFFF & (0xFF if dialect in (
        "openbsd45", "freebsd1301") else 0xFFFF)
    packed = convert.pack_state(st, 1.0, dialect, f.timeouts, 1)
    assert packed is not None  # packing a tagged state does not overflow the u8/u16 field
    imported = convert.import_state(rec, 1.0, dialect, f.timeouts)[0]
    assert imported.state_flags >> 16 == 0


def test_replay_carries_the_tag_from_its_in_half_to_its_out_half(tmp_path) -> None:
    import json

    from click.testing import CliRunner
    from scapy.all import wrpcap

    from pfcluster.cli.replay import replay

    rules = tmp_path / "pf.conf"
    rules.write_text(TAG_RULES)
    cap = tmp_path / "c.pcap"
    wrpcap(str(cap), [IP(src=CLIENT, dst=SERVER) / TCP(sport=40000, dport=80, flags="S"),
                      IP(src=CLIENT, dst=SERVER) / UDP(sport=5353, dport=53)])
    res = CliRunner().invoke(replay, ["--rules", str(rules), "--iface",
                                      f"{LAN}=198.51.100.0/24", "--iface",
                                      f"{WAN}=203.0.113.0/24", "--json", str(cap)])
    assert res.exit_code == 0, res.output
    tcp_v, udp_v = [json.loads(line) for line in res.output.splitlines()[:2]]
    assert tcp_v["action"] == "pass" and tcp_v["out"]["rule"] == 3  # pass out ... tagged WEB
    assert udp_v["action"] == "block" and udp_v["out"]["rule"] == 0
