"""Shared helpers for the pf engine tests (no tests here).

Every packet is built with scapy (the independent oracle) and handed to the engine as
bytes through `pfcluster.packet.parse`; replies the engine produces are parsed back with
scapy. Time is an argument everywhere: tests drive it by hand.
"""

from __future__ import annotations

from typing import Any

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from pfcluster.packet import Packet, parse
from pfcluster.pf.constants import PF_IN, PF_OUT
from pfcluster.pf.filter import Filter, Verdict
from pfcluster.pf.rules import parse_rules

CLIENT = "198.51.100.2"
SERVER = "203.0.113.10"
CLIENT6 = "2001:db8:1::2"
SERVER6 = "2001:db8:2::10"
HOSTID = 0x0A0B0C0D

M32 = 0xFFFFFFFF


def make_filter(rules: str, now: float = 0.0) -> Filter:
    return Filter(parse_rules(rules), hostid=HOSTID, now=now)


def pk(scapy_pkt: Any) -> Packet:
    """scapy packet -> bytes -> the engine's descriptor."""
    return parse(bytes(scapy_pkt))


def ip(src: str, dst: str) -> Any:
    return IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x") -> Any:
    return ip(src, dst) / UDP(sport=sport, dport=dport) / payload


class TcpConn:
    """A scripted TCP conversation between a client and a server through one filter.

    Host mode (default): the filter guards the server on `ifname`; client segments are
    tested `in`, server segments `out`. Router mode: client segments go `in` on em0 then
    `out` on em1, server segments `in` on em1 then `out` on em0, and `send` returns the
    verdict of the *last* hop that was tested (a block on the first hop stops there).

    `c_nxt` / `s_nxt` are each side's next sequence number; a segment sent with the
    default seq advances its sender's counter (SYN and FIN count one).
    """

    def __init__(
        self,
        filt: Filter,
        *,
        v6: bool = False,
        sport: int = 40000,
        dport: int = 5201,
        c_isn: int = 1000,
        s_isn: int = 5000,
        c_win: int = 64240,
        s_win: int = 65160,
        c_ws: int | None = 7,
        s_ws: int | None = 7,
        router: bool = False,
        ifname: str = "em0",
    ) -> None:
        self.f = filt
        self.client = CLIENT6 if v6 else CLIENT
        self.server = SERVER6 if v6 else SERVER
        self.sport = sport
        self.dport = dport
        self.c_isn = c_isn & M32
        self.s_isn = s_isn & M32
        self.c_nxt = self.c_isn
        self.s_nxt = self.s_isn
        self.c_win = c_win
        self.s_win = s_win
        self.c_ws = c_ws
        self.s_ws = s_ws
        self.router = router
        self.ifname = ifname
        self.hops: list[Verdict] = []

    # -- building ---------------------------------------------------------------------
    def seg(self, from_client: bool, flags: str, payload: bytes = b"", *, seq: int | None = None,
            ack: int | None = None, win: int | None = None, options: list | None = None) -> Any:
        if from_client:
            src, dst, sp, dp = self.client, self.server, self.sport, self.dport
            nxt, peer = self.c_nxt, self.s_nxt
            w = self.c_win if win is None else win
        else:
            src, dst, sp, dp = self.server, self.client, self.dport, self.sport
            nxt, peer = self.s_nxt, self.c_nxt
            w = self.s_win if win is None else win
        if win is None and "S" not in flags and self.c_ws is not None and self.s_ws is not None:
            # after a scaled handshake a stack advertises its window >> its own shift
            w >>= self.c_ws if from_client else self.s_ws
        if seq is None:
            seq = nxt
        if ack is None:
            ack = peer if "A" in flags else 0
        if options is None:
            options = []
            if "S" in flags:
                options.append(("MSS", 1460))
                ws = self.c_ws if from_client else self.s_ws
                if ws is not None:
                    options.append(("WScale", ws))
        return ip(src, dst) / TCP(sport=sp, dport=dp, flags=flags, seq=seq & M32, ack=ack & M32,
                                  window=w, options=options) / payload

    def hop_plan(self, from_client: bool) -> list[tuple[int, str]]:
        if not self.router:
            return [(PF_IN if from_client else PF_OUT, self.ifname)]
        if from_client:
            return [(PF_IN, "em0"), (PF_OUT, "em1")]
        return [(PF_IN, "em1"), (PF_OUT, "em0")]

    def run(self, from_client: bool, scapy_pkt: Any, now: float) -> Verdict:
        """Test one packet on every hop of its path; stop at the first block."""
        self.hops = []
        raw = bytes(scapy_pkt)
        v: Verdict | None = None
        for direction, ifname in self.hop_plan(from_client):
            v = self.f.test(direction, ifname, parse(raw), now)
            self.hops.append(v)
            if not v.passed:
                break
        assert v is not None
        return v

    def send(self, from_client: bool, flags: str, payload: bytes = b"", *, now: float = 0.0,
             **kw: Any) -> Verdict:
        explicit = "seq" in kw and kw["seq"] is not None
        p = self.seg(from_client, flags, payload, **kw)
        v = self.run(from_client, p, now)
        if not explicit:
            adv = len(payload) + ("S" in flags) + ("F" in flags)
            if from_client:
                self.c_nxt = (self.c_nxt + adv) & M32
            else:
                self.s_nxt = (self.s_nxt + adv) & M32
        return v

    def c(self, flags: str, payload: bytes = b"", **kw: Any) -> Verdict:
        return self.send(True, flags, payload, **kw)

    def s(self, flags: str, payload: bytes = b"", **kw: Any) -> Verdict:
        return self.send(False, flags, payload, **kw)

    def handshake(self, now: float = 0.0) -> Verdict:
        v = self.c("S", now=now)
        assert v.passed, v
        v = self.s("SA", now=now)
        assert v.passed, v
        v = self.c("A", now=now)
        assert v.passed, v
        return v


def peers(st: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return st.src.as_tuple(), st.dst.as_tuple()


__all__ = [
    "CLIENT", "CLIENT6", "HOSTID", "M32", "SERVER", "SERVER6", "TCP", "TcpConn",
    "ip", "make_filter", "peers", "pk", "udp",
]
