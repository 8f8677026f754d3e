"""Every pf.conf mistake gives `file:line:col: message` pointing at the offending token."""

from __future__ import annotations

import pytest

from pfcluster.pf.rules import RuleSyntaxError, load_rules, parse_rules

CASES = [
    # (text, expected error)
    ("pas in all", "pf.conf:1:1: unknown keyword 'pas'"),
    # found by the fuzzer: an empty quoted name used to load and then print as `on `
    ('pass in on "" all', "pf.conf:1:12: invalid interface name ''"),
    ('pass in on "em 0" all', "pf.conf:1:12: invalid interface name 'em 0'"),
    ("pass in quick foo", "pf.conf:1:15: unknown keyword 'foo'"),
    ("pass in on $ext all", "pf.conf:1:12: macro 'ext' not defined"),
    ("pass in from 10.0.0.256", "pf.conf:1:14: invalid address '10.0.0.256'"),
    ("pass in from 10.0.0.0/33", "pf.conf:1:23: invalid netmask '33' for 10.0.0.0"),
    ("pass in from 2001:db8::/129", "pf.conf:1:25: invalid netmask '129' for 2001:db8::"),
    ("pass in from 10.0.0.1/", "pf.conf:1:14: missing netmask after '10.0.0.1/'"),
    ("pass in proto tcp to port 70000", "pf.conf:1:27: illegal port value 70000"),
    ("pass in proto tcp to port 2000:1000", "pf.conf:1:27: invalid port range 2000:1000"),
    ("pass in proto tcp to port 8000 >< 10", "pf.conf:1:27: invalid port range 8000 >< 10"),
    ("pass in proto foo", "pf.conf:1:15: unknown protocol 'foo'"),
    ("pass in proto 300", "pf.conf:1:15: protocol number 300 out of range (0-255)"),
    ("pass in proto tcp to port nosuchsvc", "pf.conf:1:27: unknown port 'nosuchsvc'"),
    ('pass in label "abc', "pf.conf:1:15: unterminated quoted string"),
    ("pass in proto tcp to port { 22 80",
     "pf.conf:1:27: unterminated port list (missing '}')"),
    ("pass in proto { tcp udp\npass out all",
     "pf.conf:1:15: unterminated protocol list (missing '}')"),
    ("set timeout tcp.foo 5", "pf.conf:1:13: unknown timeout 'tcp.foo'"),
    ("set limit states abc", "pf.conf:1:18: 'abc' is not a valid limit value"),
    ("set limit { states 10, frogs 3 }", "pf.conf:1:24: unknown limit 'frogs'"),
    ("pass in proto tcp flags SX/SA", "pf.conf:1:25: bad flags 'SX'"),
    ("pass in proto tcp flags", "pf.conf:1:24: unexpected end of line, expected flags as "
     "<set>/<mask> or 'any'"),
    ("pass in from any to", "pf.conf:1:20: missing address after 'to'"),
    ("pass in from to any", "pf.conf:1:14: missing address after 'from'"),
    ("table <t> { 10.0.0.1 }\ntable <t> { 10.0.0.2 }", "pf.conf:2:7: table <t> already defined"),
    ("pass in inet from 2001:db8::1",
     "pf.conf:1:19: address family mismatch: rule expands to no valid combination"),
    ("pass in icmp-type echoreq", "pf.conf:1:9: icmp-type only applies to proto icmp"),
    ("pass in proto icmp6 icmp-type echoreq",
     "pf.conf:1:21: icmp-type only applies to proto icmp"),
    ("pass in inet6 proto icmp icmp-type echoreq",
     "pf.conf:1:26: icmp-type does not match address family"),
    ("pass in to port 22", "pf.conf:1:17: port only applies to tcp/udp"),
    ("pass in proto { tcp icmp } to port 22", "pf.conf:1:36: port only applies to tcp/udp"),
    ("pass in proto udp flags S/SA", "pf.conf:1:19: flags only apply to tcp"),
    ("block in all keep state", "pf.conf:1:14: keep state on block rules doesn't make sense"),
    ("match in all keep state",
     "pf.conf:1:14: keep state on match rules doesn't make sense"),
    ("set bogus 1", "pf.conf:1:5: unknown set option 'bogus'"),
    ("pass in keep state (max 10, bogus)", "pf.conf:1:29: unknown state option 'bogus'"),
    ("pass in keep state (max 10", "pf.conf:1:20: unterminated state option list (missing ')')"),
    ("pass in keep state (max -1)", "pf.conf:1:25: '-1' is not a valid max states"),
    ("pass in on ! { em0 em1 }", "pf.conf:1:14: a list cannot be negated; negate its entries"),
    ("set block-policy maybe", "pf.conf:1:18: block-policy must be drop or return, not 'maybe'"),
    ("pass in 'x'", "pf.conf:1:9: unexpected character \"'\""),
    ("pass in inet6 proto icmp6 icmp6-type echoreq code bad",
     "pf.conf:1:51: 'bad' is not a valid icmp code"),
    ("pass in inet proto icmp icmp-type bogus", "pf.conf:1:35: unknown icmp-type 'bogus'"),
    ("set debug chatty", "pf.conf:1:11: unknown debug level 'chatty'"),
    ("pass = 1", "pf.conf:1:1: macro name 'pass' is a reserved keyword"),
    ("pass in proto tcp from any port = to any", "pf.conf:1:35: unexpected 'to', "
     "expected a port"),
    ("pass in from self", "pf.conf:1:14: no IP address found for self"),
    ("pass in from www.example.com", "pf.conf:1:14: invalid address 'www.example.com'"),
    ("pass in all flags S/SA flags any", "pf.conf:1:24: flags already specified"),
    ("pass in all keep state no state", "pf.conf:1:24: state already specified"),
    ("pass in on", "pf.conf:1:11: unexpected end of line, expected an interface name"),
    ("pass in all }", "pf.conf:1:13: unexpected '}'"),
    ("nat-anchor foo", "pf.conf:1:1: 'nat-anchor' is not supported"),
    ("set timeout interval 99999999999", "pf.conf:1:22: timeout value 99999999999 out of "
     "range (0-4294967295)"),
    ('x = "$x"\npass in on $x', "pf.conf:2:12: macro 'x' expands too deeply"),
    ("pass in from 10.0.0.1 port 22", "pf.conf:1:28: port only applies to tcp/udp"),
    ("set skip on any", "pf.conf:1:5: set skip needs interface names"),
    ("pass in proto tcp all flags S/SA label", "pf.conf:1:39: unexpected end of line, "
     "expected a label string"),
    ("# first\n\npass in all\n  block   in from 1.2.3/24",
     "pf.conf:4:19: invalid address '1.2.3'"),
    ("ports = \"{ 22 99999 }\"\npass in proto tcp to port $ports",
     "pf.conf:2:27: illegal port value 99999"),
    ("pass in proto tcp \\\n    to port 99999", "pf.conf:2:13: illegal port value 99999"),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[c[1].split(": ", 1)[1][:40]
                                                           for c in CASES])
def test_error_message(text: str, expected: str) -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_rules(text)
    assert str(info.value) == expected


def test_error_is_a_value_error_with_position() -> None:
    with pytest.raises(ValueError) as info:
        parse_rules("pass in all\npass in proto bogus", "my.conf")
    e = info.value
    assert isinstance(e, RuleSyntaxError)
    assert (e.filename, e.line, e.col, e.message) == ("my.conf", 2, 15,
                                                      "unknown protocol 'bogus'")


def test_load_rules_names_the_file(tmp_path) -> None:
    f = tmp_path / "bad.conf"
    f.write_text("pass in all\nblock in from 300.1.1.1\n")
    with pytest.raises(RuleSyntaxError) as info:
        load_rules(f)
    assert str(info.value) == f"{f}:2:15: invalid address '300.1.1.1'"


def test_nothing_loaded_on_error() -> None:
    # all or nothing: the first error stops the load and no ruleset is returned
    with pytest.raises(RuleSyntaxError):
        parse_rules("pass in all\npass out all\nbogus\npass all")
