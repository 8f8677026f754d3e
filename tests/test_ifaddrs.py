"""Issue 15 (addresses, replies): `(if)` forms, `self`, urpf-failed, no-route, antispoof,
return-icmp codes and IPv6 block replies, in the pure core (routes and addresses by hand)."""

from __future__ import annotations

import socket

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6

from pfcluster.pf.constants import PF_IN
from pfcluster.pf.filter import Filter
from pfcluster.pf.ifaddrs import IfAddr, IfAddrs
from pfcluster.pf.rules import RuleSyntaxError, parse_rules
from test_pf_helpers import CLIENT, CLIENT6, SERVER, SERVER6, pk, udp

A4 = socket.AF_INET
A6 = socket.AF_INET6


def host() -> IfAddrs:
    ia = IfAddrs.from_texts([("em0", "192.0.2.1/24"), ("em0", "2001:db8::1/64"),
                             ("em0", "fe80::1/64"), ("em0", "192.0.2.77/24"),
                             ("em1", "198.51.100.1/24"), ("lo", "127.0.0.1/8"),
                             ("lo", "::1/128")])
    ia.addrs["ppp0"] = [IfAddr(A4, 0x0A000001, 32, peer=0x0A000002)]
    return ia


def rules_text(text: str, ia: IfAddrs | None = None) -> list[str]:
    return [str(r) for r in parse_rules(text, ifaddrs=ia or host()).rules]


@pytest.mark.parametrize("text,printed", [
    ("pass in on em0 to (em0)", "pass in on em0 from any to (em0) flags S/SA keep state"),
    ("pass in to (em0:network)", "pass in from any to (em0:network) flags S/SA keep state"),
    ("block in from (em0:broadcast)", "block drop in from (em0:broadcast) to any"),
    ("block in from ! (ppp0:peer)", "block drop in from ! (ppp0:peer) to any"),
    ("pass in inet to (em0:0)", "pass in inet from any to (em0:0) flags S/SA keep state"),
    ("pass out from (self)", "pass out from (self) to any flags S/SA keep state"),
    ("block in quick from urpf-failed", "block drop in quick from urpf-failed to any"),
    ("block in from no-route to any", "block drop in from no-route to any"),
    ("pass in from ! no-route", "pass in from ! no-route to any flags S/SA keep state"),
    ("block return-icmp in all", "block return-icmp(port-unr, port-unr) in all"),
    ("block return-icmp(host-unr) in inet all", "block return-icmp(host-unr) in inet all"),
    ("block return-icmp6 in inet6 all", "block return-icmp6(port-unr) in inet6 all"),
    ("block return-icmp6(admin-unr) in inet6 all", "block return-icmp6(admin-unr) in inet6 all"),
    ("block return-icmp(13, 1) in all", "block return-icmp(filter-prohib, admin-unr) in all"),
    ("block return-icmp(200) in inet all", "block return-icmp(200) in inet all"),
])
def test_print_and_round_trip(text: str, printed: str) -> None:
    assert rules_text(text) == [printed]
    assert rules_text(printed) == [printed]  # what pfctl prints loads back the same


def test_static_forms_expand_at_load() -> None:
    got = rules_text("pass in proto tcp to em0 port 22")
    assert [g.split(" to ")[1].split(" ")[0] for g in got] == [
        "192.0.2.1", "2001:db8::1", "fe80::1", "192.0.2.77"]
    # :0 keeps the first address of each family; :network the prefixes (no link-local)
    assert [r.split(" to ")[1].split(" ")[0] for r in rules_text("pass in to em0:0")] == [
        "192.0.2.1", "2001:db8::1"]
    assert [r.split(" to ")[1].split(" ")[0] for r in rules_text("pass in to em0:network")] == [
        "192.0.2.0/24", "2001:db8::/64", "192.0.2.0/24"]
    assert rules_text("block in from em1:broadcast") == [
        "block drop in inet from 198.51.100.255 to any"]
    assert rules_text("block in from ppp0:peer") == ["block drop in inet from 10.0.0.2 to any"]
    selfs = rules_text("pass in inet to self")
    assert len(selfs) == 5 and any("to 127.0.0.1 " in r for r in selfs)


def test_antispoof_expands_as_pfctl() -> None:
    assert rules_text("antispoof for lo") == [
        "block drop in on ! lo inet from 127.0.0.0/8 to any",
        "block drop in on ! lo inet6 from ::1 to any",
    ]
    assert rules_text("antispoof log quick for em1 inet") == [
        "block drop in log quick on ! em1 inet from 198.51.100.0/24 to any",
        "block drop in log quick inet from 198.51.100.1 to any",
    ]
    # fe80::/64 is on every link: left out of the network rule, kept as an own address
    got = rules_text('antispoof for { em0 } inet6 label "spoof"')
    assert got == [
        'block drop in on ! em0 inet6 from 2001:db8::/64 to any label "spoof"',
        'block drop in inet6 from 2001:db8::1 to any label "spoof"',
        'block drop in inet6 from fe80::1 to any label "spoof"',
    ]
    # block-policy return does not change antispoof's drop
    assert rules_text("set block-policy return\nantispoof for em1 inet")[0].startswith(
        "block drop in on ! em1")


@pytest.mark.parametrize("text,err", [
    ("pass in to (em0:foo)", "pf.conf:1:13: interface em0:foo has bad modifier"),
    ("pass in to (em0:network:peer)",
     "pf.conf:1:13: illegal combination of interface modifiers"),
    ("pass in to (em0", "pf.conf:1:16: unexpected end of line, expected ')' after the "
     "interface name"),
    ("pass in to urpf-failed",
     "pf.conf:1:12: \"urpf-failed\" is not permitted in a destination address"),
    ("pass in to em9", "pf.conf:1:12: invalid address 'em9'"),
    ("pass in to ppp0:broadcast", "pf.conf:1:12: no IP address found for ppp0:broadcast"),
    ("antispoof for em9", "pf.conf:1:15: no IP address found for em9"),
    ("antispoof em0", "pf.conf:1:11: unexpected 'em0', expected 'for'"),
    ("block return-icmp(bogus) in all", "pf.conf:1:19: unknown icmp code bogus"),
    ("block return-icmp6(host-unr) in all", "pf.conf:1:20: unknown icmp6 code host-unr"),
    ("block return-icmp(300) in all", "pf.conf:1:19: illegal icmp-code 300"),
    ("block return-rst(ttl 9) in all", "pf.conf:1:17: unexpected '(', return options are "
     "not supported"),
])
def test_errors(text: str, err: str) -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse_rules(text, ifaddrs=host())
    assert str(info.value) == err


def test_dynamic_address_follows_changes_without_reload() -> None:
    ia = IfAddrs.from_texts([("em0", "192.0.2.1/24")])
    f = Filter(parse_rules("block in all\npass in on em0 to (em0) keep state\n"
                           "pass in on em0 proto udp to (em0:network) port 7 no state\n",
                           ifaddrs=ia), now=0)
    old, new = "192.0.2.1", "203.0.113.5"
    sports = iter(range(1024, 2048))

    def verdict(dst: str, dport: int = 53) -> str:  # a new flow each time: no state hit
        return f.test(PF_IN, "em0", pk(udp(CLIENT, dst, next(sports), dport)), 0).action
    assert verdict(old) == "pass" and verdict(new) == "block"
    assert verdict("192.0.2.9", 7) == "pass" and verdict("203.0.113.9", 7) == "block"
    # the address moves (RTM_DELADDR + RTM_NEWADDR): the same loaded rules follow it
    assert ia.update({"em0": [IfAddr.parse(new + "/24")]})
    assert not ia.update({"em0": [IfAddr.parse(new + "/24")]})  # no change, no refresh
    assert verdict(new) == "pass" and verdict(old) == "block"
    assert verdict("203.0.113.9", 7) == "pass" and verdict("192.0.2.9", 7) == "block"
    # a second ruleset loaded against the same host shares the followed set
    rs2 = parse_rules("pass in to (em0)", ifaddrs=ia)
    assert rs2.rules[0].dst.table is f.ruleset.rules[1].dst.table


def test_urpf_failed_blocks_a_spoofed_source() -> None:
    ia = IfAddrs()
    # em0 is the inside (192.0.2.0/24), em1 the uplink with the default route
    ia.set_routes([(A4, 0xC0000200, 24, "em0"), (A4, 0, 0, "em1"),
                   (A6, 0x20010DB8 << 96, 32, "em0")])
    f = Filter(parse_rules("block in quick from urpf-failed\npass all no state\n",
                           ifaddrs=ia), now=0)

    def action(ifname: str, src: str, dst: str) -> str:
        return f.test(PF_IN, ifname, pk(udp(src, dst, 1234, 53)), 0).action
    assert action("em0", "192.0.2.5", SERVER) == "pass"
    assert action("em1", "192.0.2.5", SERVER) == "block"  # inside source on the uplink
    assert action("em1", CLIENT, "192.0.2.5") == "pass"  # the default route leaves by em1
    assert action("em0", CLIENT, SERVER) == "block"  # its route back is em1, not em0
    assert action("em1", "2001:db8::5", SERVER6) == "block"
    assert action("em1", CLIENT6.replace("2001:db8", "2001:db9"), SERVER6) == "block"  # none
    # routes change (RTM_NEWROUTE): the loaded rules see the new table at once
    ia.set_routes([(A4, 0xC0000200, 24, "em1"), (A4, 0, 0, "em1")])
    assert action("em1", "192.0.2.5", SERVER) == "pass"


def test_no_route() -> None:
    ia = IfAddrs.from_texts([("em0", "192.0.2.1/24")])
    f = Filter(parse_rules("block in from no-route\n", ifaddrs=ia), now=0)
    assert f.test(PF_IN, "em0", pk(udp("192.0.2.9", SERVER, 1, 53)), 0).action == "pass"
    assert f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, 1, 53)), 0).action == "block"


def filt(text: str) -> Filter:
    return Filter(parse_rules(text), now=0)


def test_return_icmp_codes_v4_and_v6() -> None:
    f = filt("block return-icmp(host-unr, admin-unr) in all\n")
    r = IP(f.test(PF_IN, "em0", pk(udp(CLIENT, SERVER, 5353, 69)), 0).reply)
    assert (r.src, r.dst, r[ICMP].type, r[ICMP].code) == (SERVER, CLIENT, 3, 1)
    r6 = IPv6(f.test(PF_IN, "em0", pk(udp(CLIENT6, SERVER6, 5353, 69)), 0).reply)
    assert (r6.src, r6.dst) == (SERVER6, CLIENT6)
    assert r6[ICMPv6DestUnreach].code == 1
    # TCP gets ICMP too under return-icmp (pf only sends RST for return/return-rst)
    syn6 = IPv6(src=CLIENT6, dst=SERVER6) / TCP(sport=4000, dport=22, flags="S", seq=7)
    r6 = IPv6(f.test(PF_IN, "em0", pk(syn6), 0).reply)
    assert r6[ICMPv6DestUnreach].code == 1


def test_return_icmp6_and_its_checksum() -> None:
    f = filt("block return-icmp6(addr-unr) in inet6 all\n")
    raw = f.test(PF_IN, "em0", pk(udp(CLIENT6, SERVER6, 5353, 69, b"q")), 0).reply
    r6 = IPv6(raw)
    u = r6[ICMPv6DestUnreach]
    assert (u.type, u.code) == (1, 3)
    ck = u.cksum
    del u.cksum
    assert IPv6(bytes(r6))[ICMPv6DestUnreach].cksum == ck  # scapy recomputes the same


def test_block_return_v6_tcp_is_a_checked_rst() -> None:
    f = filt("block return in inet6 proto tcp all\n")
    syn = IPv6(src=CLIENT6, dst=SERVER6) / TCP(sport=4000, dport=22, flags="S", seq=1000)
    r6 = IPv6(f.test(PF_IN, "em0", pk(syn), 0).reply)
    t = r6[TCP]
    assert (r6.src, r6.dst, t.sport, t.dport) == (SERVER6, CLIENT6, 22, 4000)
    assert t.flags == "RA" and t.ack == 1001
    ck = t.chksum
    del t.chksum
    assert IPv6(bytes(r6))[TCP].chksum == ck


def test_replay_reads_interface_addresses_from_iface(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from click.testing import CliRunner
    from scapy.utils import wrpcap

    from pfcluster.cli.replay import replay

    rules = tmp_path / "pf.conf"
    rules.write_text("block in all\npass in on em0 proto udp to (em1) no state\n"
                     "pass in proto udp to em0 port 7 no state\nantispoof for em0 inet\n")
    cap = tmp_path / "c.pcap"
    pkts = [udp("192.0.2.5", "198.51.100.1", 1, 53), udp("192.0.2.5", "198.51.100.9", 1, 53),
            udp("198.51.100.9", "192.0.2.1", 1, 7)]
    for i, p in enumerate(pkts):
        p.time = 1000 + i
    wrpcap(str(cap), pkts)
    res = CliRunner().invoke(replay, ["--rules", str(rules), "--iface", "em0=192.0.2.1/24",
                                      "--iface", "em1=198.51.100.1/24", "--json", str(cap)])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in res.output.splitlines() if '"n"' in line]
    assert [r["in"]["action"] for r in recs] == ["pass", "block", "pass"]
