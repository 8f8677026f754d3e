"""pf state <-> pfsync_state record, for every dialect."""

from __future__ import annotations

import socket

import pytest

from pfcluster.packet import parse
from pfcluster.pf.constants import (
    AF_INET6,
    PF_IN,
    PFSTATE_ACK,
    PFSTATE_NOSYNC,
    PFTM,
    TH_ACK,
    TH_SYN,
)
from pfcluster.pf.filter import Filter
from pfcluster.pf.rules import parse_rules
from pfcluster.pfsync import wire
from pfcluster.pfsync.convert import ImportError_, export_state, import_state
from pfcluster.sim.tcpsim import syn_options, tcp_packet

RULES = "pass in on em0 proto tcp\npass in on em0 inet6 proto tcp\n"


def established(now: float = 100.0) -> Filter:
    f = Filter(parse_rules(RULES), hostid=0xABCD1234, now=now)
    c, s = socket.inet_aton("198.51.100.2"), socket.inet_aton("203.0.113.10")
    f.test(
        PF_IN,
        "em0",
        parse(tcp_packet(c, s, 40000, 5201, 1000, 0, TH_SYN, 65535, 0, syn_options(1460, 7))),
        now,
    )
    f.test(
        2,
        "em0",
        parse(
            tcp_packet(
                s, c, 5201, 40000, 9000, 1001, TH_SYN | TH_ACK, 65535, 0, syn_options(1460, 7)
            )
        ),
        now,
    )
    f.test(
        PF_IN, "em0", parse(tcp_packet(c, s, 40000, 5201, 1001, 9001, TH_ACK, 1024, 100)), now + 5
    )
    return f


@pytest.mark.parametrize("dialect", wire.DIALECTS)
def test_export_import_round_trip(dialect: str) -> None:
    f = established()
    (st,) = list(f.states)
    now = 130.0
    rec = export_state(st, now, dialect, f.timeouts, len(f.states))
    # the record survives the wire byte for byte
    frame = wire.Frame(
        wire.VERSION[dialect],
        sections=[wire.Section("INS", wire.ACTIONS[dialect]["INS"], messages=[rec])],
    )
    data = wire.encode(frame, dialect)
    (back,) = list(wire.decode(data, dialect).messages("INS"))
    assert back.creation == 30 and back.expire == f.timeouts[PFTM.TCP_ESTABLISHED] - 25
    assert back.rule == 0 and back.anchor == 0xFFFFFFFF
    st2, rule, wants_ack = import_state(back, 500.0, dialect, f.timeouts)
    assert (st2.key, st2.direction, st2.id, st2.creatorid) == (
        st.key,
        st.direction,
        st.id,
        st.creatorid,
    )
    assert st2.src.as_tuple() == st.src.as_tuple() and st2.dst.as_tuple() == st.dst.as_tuple()
    assert st2.timeout == st.timeout == PFTM.TCP_ESTABLISHED
    assert (st2.packets0, st2.packets1, st2.bytes0, st2.bytes1) == (
        st.packets0,
        st.packets1,
        st.bytes0,
        st.bytes1,
    )
    assert st2.creation == 470.0  # ages, not clocks
    assert st2.expire == 500.0 - 25  # last activity rebuilt from the seconds left
    assert rule == 0 and not wants_ack


@pytest.mark.parametrize(
    ("dialect", "af6"),
    [("openbsd45", 24), ("openbsd6", 24), ("freebsd1301", 28), ("freebsd1400", 28)],
)
def test_inet6_value_is_os_specific(dialect: str, af6: int) -> None:
    f = Filter(parse_rules(RULES), hostid=7)
    c, s = socket.inet_pton(AF_INET6, "2001:db8::2"), socket.inet_pton(AF_INET6, "2001:db8:1::10")
    from scapy.layers.inet import TCP
    from scapy.layers.inet6 import IPv6

    raw = bytes(IPv6(src="2001:db8::2", dst="2001:db8:1::10") / TCP(sport=1, dport=2, flags="S"))
    assert f.test(PF_IN, "em0", parse(raw), 0.0).passed
    (st,) = list(f.states)
    rec = export_state(st, 0.0, dialect, f.timeouts, 1)
    assert rec.af == af6
    assert rec.key[0].addr == [c, s]
    st2, _, _ = import_state(rec, 0.0, dialect, f.timeouts)
    assert st2.key == st.key


def test_ack_flag_travels_and_is_cleared_on_import() -> None:
    f = established()
    (st,) = list(f.states)
    st.state_flags |= PFSTATE_ACK | PFSTATE_NOSYNC
    rec = export_state(st, 100.0, "openbsd45", f.timeouts, 1)
    assert rec.state_flags & PFSTATE_ACK
    st2, _, wants_ack = import_state(rec, 100.0, "openbsd45", f.timeouts)
    assert wants_ack and not st2.state_flags & PFSTATE_ACK and st2.state_flags & PFSTATE_NOSYNC


@pytest.mark.parametrize("field,value", [("af", 99), ("creatorid", 0), ("timeout", 20)])
def test_bad_records_are_refused(field: str, value: int) -> None:
    f = established()
    rec = export_state(next(iter(f.states)), 100.0, "openbsd45", f.timeouts, 1)
    setattr(rec, field, value)
    with pytest.raises(ImportError_):
        import_state(rec, 100.0, "openbsd45", f.timeouts)


def test_stateless_rule_number_is_minus_one() -> None:
    f = established()
    st = next(iter(f.states))
    st.rule = None
    rec = export_state(st, 100.0, "openbsd6", f.timeouts, 1)
    assert rec.rule == 0xFFFFFFFF and wire.signed32(rec.rule) == -1


@pytest.mark.parametrize("dialect", wire.DIALECTS)
def test_packed_state_equals_encoded_record(dialect: str) -> None:
    from pfcluster.pfsync.convert import pack_state

    f = established()
    for st in f.states:
        st.state_flags |= PFSTATE_NOSYNC
        rec = export_state(st, 140.0, dialect, f.timeouts, 1)
        codec = wire.TABLES[dialect][wire.ACTIONS[dialect]["INS"]][2]
        buf = bytearray(codec.size)
        codec.encode_into(buf, 0, rec)
        assert pack_state(st, 140.0, dialect, f.timeouts, 1) == bytes(buf)
