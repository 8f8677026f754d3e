"""NAT in the pf core: nat-to/rdr-to/binat-to and FreeBSD nat/rdr through the router
step, states with a wire and a stack key, port slices, pfsync of both keys.

Time is driven by hand; packets are built with scapy and the translated bytes read back
with scapy (with its own checksum computation as the oracle), not with our parser.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

scapy_all = pytest.importorskip("scapy.all")
from scapy.all import ICMP, IP, TCP, UDP, ICMPv6EchoRequest, IPerror, IPv6, Raw, UDPerror  # noqa: E402

from pfcluster.packet import parse  # noqa: E402
from pfcluster.pf import pfctl  # noqa: E402
from pfcluster.pf.constants import PFRES_TRANSLATE  # noqa: E402
from pfcluster.pf.filter import Filter  # noqa: E402
from pfcluster.pf.nat import NatSlice  # noqa: E402
from pfcluster.pf.router import ROUTE_BLOCK, ROUTE_PASS, route  # noqa: E402
from pfcluster.pf.rules import parse_rules  # noqa: E402

INSIDE, OUTSIDE = "em0", "em1"
CLIENT, SERVER, NATADDR = "198.51.100.10", "203.0.113.10", "192.0.2.100"

NAT_RULES = f"""\
block all
pass in on {INSIDE}
pass out on {OUTSIDE} inet nat-to {NATADDR}
pass out on {OUTSIDE} inet6 nat-to 2001:db8:ffff::100
pass in on {OUTSIDE} proto icmp
"""


def filt_for(rules: str, nat_slice: str = "1/1", hostid: int = 0x100) -> Filter:
    f = Filter(parse_rules(rules, "nat.conf"), hostid=hostid)
    f.nat.slice = NatSlice.parse(nat_slice)
    return f


def through(f: Filter, raw: bytes, to_server: bool, now: float = 1.0):
    """One router step: (RouteVerdict, the packet as it leaves, re-read by scapy)."""
    pkt = parse(raw)
    in_if, out_if = (INSIDE, OUTSIDE) if to_server else (OUTSIDE, INSIDE)
    rv = route(f, in_if, out_if, pkt, now)
    out = bytes(rv.payload) if rv.payload is not None else raw
    return rv, out


def checksums_ok(raw: bytes) -> bool:
    """scapy recomputes every checksum of the packet: equal bytes, valid sums."""
    if raw[0] >> 4 == 4:
        p = IP(raw)
        del p.chksum
        for layer in (TCP, UDP, ICMP):
            if layer in p:
                del p[layer].chksum
        if IPerror in p:
            del p[IPerror].chksum
    else:
        p = IPv6(raw)
        for layer in (TCP, UDP):
            if layer in p:
                del p[layer].chksum
        if ICMPv6EchoRequest in p:
            del p[ICMPv6EchoRequest].cksum
    return bytes(p.__class__(bytes(p))) == raw


def syn(sport: int = 4321, src: str = CLIENT, dst: str = SERVER, dport: int = 80) -> bytes:
    return bytes(IP(src=src, dst=dst, ttl=64) / TCP(sport=sport, dport=dport, flags="S", seq=1000,
                                                     window=65535))


def test_nat_to_translates_both_directions_and_prints_both_keys():
    f = filt_for(NAT_RULES)
    rv, out = through(f, syn(), True)
    assert rv.action == ROUTE_PASS and rv.payload is not None
    p = IP(out)
    assert p.src == NATADDR and p.dst == SERVER
    assert 50001 <= p[TCP].sport <= 65535 and p[TCP].dport == 80
    assert checksums_ok(out)
    nport = p[TCP].sport
    # pfctl -ss: the outbound state prints its wire key, the stack key in parentheses
    lines = [pfctl.format_state_line(st) for st in f.states]
    assert f"all tcp {NATADDR}:{nport} ({CLIENT}:4321) -> {SERVER}:80" in " ".join(lines)
    # the reply comes to the translated address and goes back to the client
    reply = bytes(IP(src=SERVER, dst=NATADDR) / TCP(sport=80, dport=nport, flags="SA",
                                                    seq=5000, ack=1001, window=65535))
    rv2, out2 = through(f, reply, False)
    assert rv2.action == ROUTE_PASS
    q = IP(out2)
    assert (q.src, q.dst, q[TCP].sport, q[TCP].dport) == (SERVER, CLIENT, 80, 4321)
    assert checksums_ok(out2)
    # the client's ACK takes the same port again
    ack = bytes(IP(src=CLIENT, dst=SERVER) / TCP(sport=4321, dport=80, flags="A", seq=1001,
                                                 ack=5001, window=65535))
    rv3, out3 = through(f, ack, True)
    assert rv3.action == ROUTE_PASS and IP(out3)[TCP].sport == nport
    js = pfctl.states_json(f, 1.0)
    out_state = next(s for s in js if s["direction"] == "out")
    assert out_state["keys"][0] == {"addr": [SERVER, NATADDR], "port": [80, nport]}
    assert out_state["keys"][1] == {"addr": [SERVER, CLIENT], "port": [80, 4321]}


def test_a_reply_to_the_stack_address_does_not_match_the_wire_side():
    """pf_find_state: `in` matches the wire key only; a packet to the untranslated client
    arriving from outside finds no state (and the ruleset blocks it)."""
    f = filt_for(NAT_RULES)
    _rv, out = through(f, syn(), True)
    nport = IP(out)[TCP].sport
    spoof = bytes(IP(src=SERVER, dst=CLIENT) / TCP(sport=80, dport=4321, flags="SA", seq=5000,
                                                   ack=1001))
    rv2, _ = through(f, spoof, False)
    assert rv2.action == ROUTE_BLOCK
    assert nport


@pytest.mark.parametrize("k", [1, 2])
def test_nat_slices_are_disjoint(k: int):
    f = filt_for(NAT_RULES, f"{k}/2")
    ports = set()
    for sport in range(20000, 20300):
        rv, out = through(f, syn(sport), True)
        assert rv.action == ROUTE_PASS
        ports.add(IP(out)[TCP].sport)
    assert len(ports) == 300
    mid = 50001 + (65535 - 50001 + 1) // 2
    if k == 1:
        assert max(ports) < mid
    else:
        assert min(ports) >= mid


def test_two_firewalls_with_slices_never_collide():
    a, b = filt_for(NAT_RULES, "1/2", 0x1), filt_for(NAT_RULES, "2/2", 0x2)
    pa = {IP(through(a, syn(s, src=f"198.51.100.{s % 200 + 1}"), True)[1])[TCP].sport
          for s in range(30000, 30500)}
    pb = {IP(through(b, syn(s, src=f"198.51.100.{s % 200 + 1}"), True)[1])[TCP].sport
          for s in range(30000, 30500)}
    assert pa and pb and not (pa & pb)


def test_port_search_skips_taken_ports_and_exhaustion_blocks():
    rules = f"""\
pass in on {INSIDE}
pass out on {OUTSIDE} inet nat-to {NATADDR} port 60000:60001
"""
    f = filt_for(rules)
    got = set()
    for sport in (1111, 2222):
        rv, out = through(f, syn(sport), True)
        assert rv.action == ROUTE_PASS
        got.add(IP(out)[TCP].sport)
    assert got == {60000, 60001}
    rv, _ = through(f, syn(3333), True)
    assert rv.action == ROUTE_BLOCK
    assert rv.v_out is not None and rv.v_out.reason == "translate"
    assert f.counters[PFRES_TRANSLATE] == 1


def test_static_port_keeps_the_source_port():
    rules = f"pass in on {INSIDE}\npass out on {OUTSIDE} inet nat-to {NATADDR} static-port\n"
    f = filt_for(rules)
    _rv, out = through(f, syn(4321), True)
    assert IP(out).src == NATADDR and IP(out)[TCP].sport == 4321


def test_rdr_to_moves_the_destination_and_the_reply_source():
    rules = f"""\
block all
pass in on {OUTSIDE} proto tcp to {NATADDR} port 80 rdr-to {CLIENT} port 8080
pass out on {INSIDE} proto tcp
"""
    f = filt_for(rules)
    raw = bytes(IP(src=SERVER, dst=NATADDR) / TCP(sport=5555, dport=80, flags="S", seq=7))
    rv, out = through(f, raw, False)
    assert rv.action == ROUTE_PASS
    p = IP(out)
    assert (p.dst, p[TCP].dport) == (CLIENT, 8080) and checksums_ok(out)
    lines = " ".join(pfctl.format_state_line(st) for st in f.states)
    assert f"all tcp {CLIENT}:8080 ({NATADDR}:80) <- {SERVER}:5555" in lines
    reply = bytes(IP(src=CLIENT, dst=SERVER) / TCP(sport=8080, dport=5555, flags="SA", seq=9,
                                                   ack=8))
    rv2, out2 = through(f, reply, True)
    assert rv2.action == ROUTE_PASS
    q = IP(out2)
    assert (q.src, q[TCP].sport) == (NATADDR, 80) and checksums_ok(out2)


def test_udp_and_the_icmp_error_quoting_it_are_translated_back():
    f = filt_for(NAT_RULES)
    raw = bytes(IP(src=CLIENT, dst=SERVER) / UDP(sport=5353, dport=53) / Raw(b"q" * 20))
    rv, out = through(f, raw, True)
    assert rv.action == ROUTE_PASS and checksums_ok(out)
    sent = IP(out)
    assert sent.src == NATADDR
    # the server answers with port unreachable, quoting what it got (the translated one)
    err = bytes(IP(src=SERVER, dst=NATADDR) / ICMP(type=3, code=3) / bytes(sent)[:28])
    rv2, out2 = through(f, err, False)
    assert rv2.action == ROUTE_PASS and rv2.payload is not None
    e = IP(out2)
    assert e.dst == CLIENT
    assert e[IPerror].src == CLIENT and e[UDPerror].sport == 5353
    assert checksums_ok(out2)


def test_icmp_echo_id_is_translated():
    f = filt_for(NAT_RULES)
    raw = bytes(IP(src=CLIENT, dst=SERVER) / ICMP(type=8, id=77, seq=1) / Raw(b"ping"))
    rv, out = through(f, raw, True)
    assert rv.action == ROUTE_PASS and checksums_ok(out)
    p = IP(out)
    assert p.src == NATADDR
    nid = p[ICMP].id
    rep = bytes(IP(src=SERVER, dst=NATADDR) / ICMP(type=0, id=nid, seq=1) / Raw(b"ping"))
    rv2, out2 = through(f, rep, False)
    assert rv2.action == ROUTE_PASS
    q = IP(out2)
    assert q.dst == CLIENT and q[ICMP].id == 77 and checksums_ok(out2)


def test_ipv6_nat_to():
    f = filt_for(NAT_RULES)
    raw = bytes(IPv6(src="2001:db8:1::10", dst="2001:db8:2::10") / TCP(sport=4000, dport=443,
                                                                      flags="S"))
    rv, out = through(f, raw, True)
    assert rv.action == ROUTE_PASS
    p = IPv6(out)
    assert p.src == "2001:db8:ffff::100" and p[TCP].sport >= 50001 and checksums_ok(out)


def test_freebsd_nat_translates_before_the_filter():
    rules = f"""\
nat on {OUTSIDE} inet from 198.51.100.0/24 to any -> {NATADDR}
block all
pass in on {INSIDE}
pass out on {OUTSIDE} inet proto tcp from {NATADDR} to any
"""
    f = filt_for(rules)
    rv, out = through(f, syn(), True)
    assert rv.action == ROUTE_PASS, rv
    assert IP(out).src == NATADDR


def test_no_nat_exempts():
    rules = f"""\
no nat on {OUTSIDE} inet from {CLIENT} to any
nat on {OUTSIDE} inet from 198.51.100.0/24 to any -> {NATADDR}
pass all
"""
    f = filt_for(rules)
    rv, out = through(f, syn(), True)
    assert rv.action == ROUTE_PASS and rv.payload is None and IP(out).src == CLIENT
    rv, out = through(f, syn(src="198.51.100.11"), True)
    assert IP(out).src == NATADDR


def test_match_nat_to_with_a_later_pass():
    rules = f"""\
match out on {OUTSIDE} inet nat-to {NATADDR}
block all
pass in on {INSIDE}
pass out on {OUTSIDE} proto tcp
"""
    f = filt_for(rules)
    rv, out = through(f, syn(), True)
    assert rv.action == ROUTE_PASS and IP(out).src == NATADDR
    # a block after the match: no translation, no state
    rv, _ = through(f, bytes(IP(src=CLIENT, dst=SERVER) / UDP(sport=1, dport=2)), True)
    assert rv.action == ROUTE_BLOCK


def test_a_peer_imports_both_keys_and_translates_the_reply_of_a_split_path():
    """fw A translates the SYN; fw B learns the states over pfsync and translates the
    SYN|ACK that the server sent to the translated address back to the client."""
    from pfcluster.sim.pair import Cluster

    rules = f"""\
pass in on em0
pass out on em1 inet nat-to {NATADDR}
"""
    c = Cluster(rules=rules, nodes=2)
    c.run_until(0.5)
    a, b = c.nodes
    pkt = parse(syn())
    rv = route(a.filter, "em0", "em1", pkt, 1.0)
    assert rv.action == ROUTE_PASS and rv.payload is not None
    nport = IP(bytes(rv.payload))[TCP].sport
    a.engine.end_of_batch(1.0)
    c.pump(a, 1.0)
    c.run_until(1.1)
    imported = [st for st in b.filter.states if st.nat is not None]
    assert len(imported) == 1
    assert imported[0].skey[3] == bytes([198, 51, 100, 10])
    reply = bytes(IP(src=SERVER, dst=NATADDR) / TCP(sport=80, dport=nport, flags="SA",
                                                    seq=5000, ack=1001, window=65535))
    rv2 = route(b.filter, "em1", "em0", parse(reply), 1.2)
    assert rv2.action == ROUTE_PASS and rv2.payload is not None
    q = IP(bytes(rv2.payload))
    assert (q.dst, q[TCP].dport) == (CLIENT, 4321) and checksums_ok(bytes(rv2.payload))
    # fw A is gone: the client's next packet crosses B and leaves with A's translation
    a.up = False
    ack = bytes(IP(src=CLIENT, dst=SERVER) / TCP(sport=4321, dport=80, flags="A", seq=1001,
                                                 ack=5001, window=65535))
    rv3 = route(b.filter, "em0", "em1", parse(ack), 1.3)
    assert rv3.action == ROUTE_PASS and rv3.payload is not None
    r = IP(bytes(rv3.payload))
    assert (r.src, r[TCP].sport) == (NATADDR, nport) and checksums_ok(bytes(rv3.payload))


@pytest.mark.parametrize("dialect", ["openbsd45", "freebsd1301", "freebsd1400", "openbsd6"])
def test_both_keys_and_nat_rule_round_trip_in_every_dialect(dialect: str):
    from pfcluster.pfsync import wire
    from pfcluster.pfsync.convert import export_state, import_state, pack_state

    f = filt_for(NAT_RULES)
    through(f, syn(), True)
    st = next(s for s in f.states if s.nat is not None)
    rec = export_state(st, 1.0, dialect, f.timeouts, len(f.states))
    assert rec.key[0].addr[1][:4] == bytes([192, 0, 2, 100])
    assert rec.key[1].addr[1][:4] == bytes([198, 51, 100, 10])
    assert rec.nat_rule == st.nat.rule.nr
    codec = wire.TABLES[dialect][wire.ACTIONS[dialect]["INS"]][2]
    buf = bytearray(codec.size)
    codec.encode_into(buf, 0, rec)
    assert pack_state(st, 1.0, dialect, f.timeouts, len(f.states)) == bytes(buf)
    back, _rule, _ack = import_state(rec, 1.0, dialect, f.timeouts)
    assert back.key == st.key and back.nat is not None and back.nat.skey == st.nat.skey


def test_replay_json_shows_the_translated_packet(tmp_path):
    from scapy.all import wrpcap

    from pfcluster.cli.main import main as cli

    conf = tmp_path / "pf.conf"
    conf.write_text("pass in on lan\npass out on wan inet nat-to (wan)\n")
    cap = tmp_path / "c.pcap"
    wrpcap(str(cap), [IP(syn())])
    res = CliRunner().invoke(cli, ["replay", "--rules", str(conf), "--iface",
                                   "lan=198.51.100.1/24", "--iface", "wan=203.0.113.1/24",
                                   "--json", str(cap)])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output.splitlines()[0])
    assert rec["action"] == "pass"
    assert rec["in"]["src"] == CLIENT
    assert rec["out"]["src"] == "203.0.113.1" and 50001 <= rec["out"]["sport"] <= 65535


def test_a_reopened_connection_keeps_its_translation():
    """A client reopening from the same port after a close keeps its translated port (the
    server may hold the old one in TIME_WAIT; a new port could meet another's)."""
    f = filt_for(NAT_RULES)
    _, out = through(f, syn(), True)
    nport = IP(out)[TCP].sport

    def c2s(flags: str, seq: int, ack: int) -> None:
        rv, _ = through(f, bytes(IP(src=CLIENT, dst=SERVER) / TCP(
            sport=4321, dport=80, flags=flags, seq=seq, ack=ack, window=65535)), True, 2.0)
        assert rv.action == ROUTE_PASS, flags

    def s2c(flags: str, seq: int, ack: int) -> None:
        rv, _ = through(f, bytes(IP(src=SERVER, dst=NATADDR) / TCP(
            sport=80, dport=nport, flags=flags, seq=seq, ack=ack, window=65535)), False, 2.0)
        assert rv.action == ROUTE_PASS, flags

    s2c("SA", 5000, 1001)
    c2s("A", 1001, 5001)
    s2c("FA", 5001, 1001)
    c2s("FA", 1001, 5002)
    s2c("A", 5002, 1002)
    rv, out2 = through(f, bytes(IP(src=CLIENT, dst=SERVER) / TCP(
        sport=4321, dport=80, flags="S", seq=90000)), True, 3.0)
    assert rv.action == ROUTE_PASS and f.extra["state-reuse"] >= 1
    assert IP(out2)[TCP].sport == nport


def test_an_import_whose_stack_key_a_closed_state_holds_replaces_it():
    """A peer translated a reopened connection to a new port (its DEL_C for the old state
    still on the way): the INS collides with the old state on the stack key only, and the
    finished old state makes room, as for the wire key."""
    from pfcluster.pf.constants import TCPS
    from pfcluster.pfsync.convert import export_state, import_state

    a, b = filt_for(NAT_RULES, "1/2", 0xA), filt_for(NAT_RULES, "2/2", 0xB)
    through(b, syn(), True)
    old = next(s for s in b.states if s.nat is not None)
    old.src.state = old.dst.state = int(TCPS.TIME_WAIT)  # a finished connection
    through(a, syn(), True)
    new = next(s for s in a.states if s.nat is not None)
    assert new.nat is not None and old.nat is not None
    assert new.nat.skey == old.nat.skey and new.key != old.key  # other slices: other ports
    rec = export_state(new, 1.0, "openbsd45", a.timeouts, 2)
    st, rule_nr, _ = import_state(rec, 1.0, "openbsd45", b.timeouts)
    assert b.import_state(st, rule_nr, 1.0)
    assert b.extra["key-attach-reuse"] == 1 and not old.linked
