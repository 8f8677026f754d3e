"""pfsync carries a routed state's target (pf_state rt, rt_addr, rt_ifname) in the
dialects that have the fields: export, the packer and the importer agree, and a peer
resolves the target to its own mark (pf/route.py resolve)."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st_
from scapy.all import IP, TCP, raw

from conftest import fuzz_settings
from pfcluster.packet import parse
from pfcluster.pf.filter import Filter
from pfcluster.pf.route import RT_REPLYTO, RT_ROUTETO, resolve
from pfcluster.pf.router import route
from pfcluster.pf.rules import parse_rules
from pfcluster.pfsync import wire
from pfcluster.pfsync.convert import ImportError_, export_state, import_state, pack_state

RULES = ("pass all\n"
         "pass in on em0 proto tcp to port 80 route-to (em2 192.0.2.9)\n"
         "pass in on em0 proto tcp to port 81 reply-to em1\n")
WITH_RT = {"freebsd1400": (2, 4), "openbsd6": (1, 3)}  # wire values of route-to, reply-to


def routed(dport: int) -> tuple[Filter, object]:
    f = Filter(parse_rules(RULES), hostid=0xABCD1234, now=100.0)
    p = parse(raw(IP(src="198.51.100.2", dst="203.0.113.10") /
                  TCP(sport=40000, dport=dport, flags="S")))
    rv = route(f, "em0", None, p, 100.0)
    assert rv.v_in is not None and rv.v_in.state is not None
    return f, rv.v_in.state


def wire_round_trip(rec: wire.State, dialect: str) -> wire.State:
    frame = wire.Frame(wire.VERSION[dialect], sections=[
        wire.Section("INS", wire.ACTIONS[dialect]["INS"], messages=[rec])])
    (back,) = list(wire.decode(wire.encode(frame, dialect), dialect).messages("INS"))
    return back


@pytest.mark.parametrize("dialect", wire.DIALECTS)
@pytest.mark.parametrize(("dport", "kind"), [(80, RT_ROUTETO), (81, RT_REPLYTO)])
def test_rt_fields_round_trip(dialect: str, dport: int, kind: int) -> None:
    f, st = routed(dport)
    rec = export_state(st, 110.0, dialect, f.timeouts, 1)
    codec = wire.TABLES[dialect][wire.ACTIONS[dialect]["INS"]][2]
    buf = bytearray(codec.size)
    codec.encode_into(buf, 0, rec)
    assert pack_state(st, 110.0, dialect, f.timeouts, 1) == bytes(buf)
    back = wire_round_trip(rec, dialect)
    st2, _, _ = import_state(back, 200.0, dialect, f.timeouts)
    if dialect not in WITH_RT:  # openbsd45, freebsd1301 carry no rt: arrives unrouted
        assert st2.route is None
        return
    assert back.rt == WITH_RT[dialect][0 if kind == RT_ROUTETO else 1]
    assert st2.route is not None and st2.route.kind == kind
    t = st2.route.target
    if kind == RT_ROUTETO:
        assert t.addr == socket.inet_aton("192.0.2.9")
        assert back.rt_addr[:4] == socket.inet_aton("192.0.2.9")
    else:
        assert t.addr is None
    if dialect == "freebsd1400":
        assert t.ifname == ("em2" if kind == RT_ROUTETO else "em1")
    else:  # OpenBSD's state has no rt_ifname: the peer's own rules name the interface
        assert t.ifname == ""
    # the peer (same rules) gives it the mark its own target has
    mine = st.route.target
    assert resolve(t, f.ruleset.route_targets) == mine.mark != 0
    assert t.ifname == mine.ifname
    # and the state exports again as it came
    rec2 = export_state(st2, 210.0, dialect, f.timeouts, 1)
    assert (rec2.rt, rec2.rt_addr, rec2.rt_ifname) == (rec.rt, rec.rt_addr, rec.rt_ifname)


def test_unknown_target_resolves_to_no_mark() -> None:
    f, st = routed(80)
    rec = export_state(st, 110.0, "freebsd1400", f.timeouts, 1)
    rec.rt_ifname = "em9"
    st2, _, _ = import_state(wire_round_trip(rec, "freebsd1400"), 200.0, "freebsd1400",
                             f.timeouts)
    assert st2.route is not None
    assert resolve(st2.route.target, f.ruleset.route_targets) == 0


@pytest.mark.parametrize(("dialect", "bad"), [("openbsd6", 4), ("freebsd1400", 5)])
def test_bad_rt_is_refused(dialect: str, bad: int) -> None:
    f, st = routed(80)
    rec = export_state(st, 110.0, dialect, f.timeouts, 1)
    rec.rt = bad
    with pytest.raises(ImportError_, match="rt"):
        import_state(wire_round_trip(rec, dialect), 200.0, dialect, f.timeouts)


@fuzz_settings(2000)
@given(rt=st_.integers(0, 255), addr=st_.binary(min_size=16, max_size=16),
       ifname=st_.text(alphabet=st_.characters(min_codepoint=0, max_codepoint=255),
                       max_size=15),
       dialect=st_.sampled_from(sorted(WITH_RT)))
def test_importer_takes_any_rt_fields(rt: int, addr: bytes, ifname: str, dialect: str) -> None:
    f, st = routed(80)
    rec = export_state(st, 110.0, dialect, f.timeouts, 1)
    rec.rt, rec.rt_addr, rec.rt_ifname = rt, addr, ifname
    back = wire_round_trip(rec, dialect)
    try:
        st2, _, _ = import_state(back, 200.0, dialect, f.timeouts)
    except ImportError_:
        return
    if st2.route is not None:
        assert resolve(st2.route.target, f.ruleset.route_targets) in (0, 0x100)
