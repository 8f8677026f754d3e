"""One router step: what a forwarding host running pf decides for one packet.

pf runs twice on a router, `in` on the input interface and `out` on the output one, and
the packet goes on only if both pass. This module is the single home of that step, so the
daemon, the in-process cluster simulation and `pfcluster replay` decide alike: a proof
made in the simulation holds for the daemon by construction.

Deferral follows pf_test: only a state created by the `out` test is offered to pfsync
(`dir == PF_OUT` in pf_test_rule), because that is the last test before the packet
leaves. A forwarded connection's `in` state travels in the same pfsync frame as its `out`
state, so the peer's INS_ACK for the `out` state means both have arrived. A packet to the
firewall itself (no `out` test) is never deferred, as in pf.

Translation: a test whose verdict carries a translation (nat-to, rdr-to, or a packet of
a translated state) rewrites the packet before the next test sees it, as pf_translate
does inside pf_test; the rewritten bytes come back in `RouteVerdict.payload` for the
caller to send on in place of the original. On Linux the daemon runs the two tests at
two hooks (PREROUTING for `in`, FORWARD/OUTPUT for `out`) when the ruleset translates,
since a destination must be rewritten before the route is chosen; each hook then calls
this step with one of the interfaces None.

Scrub: after each passing test (and its translation), the scrub options of the packet's
state, or of the rules for a state-less pass, rewrite it as pf_scrub does in pf_test
(pf/scrub.py); the bytes come back in `payload` the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from pfcluster.packet import Packet
from pfcluster.pf.constants import PF_IN, PF_OUT
from pfcluster.pf.filter import PASS, Filter, Verdict
from pfcluster.pf.rewrite import RewriteError, rewrite, rewrite_icmp_error
from pfcluster.pf.scrub import scrub_packet
from pfcluster.pf.state import State

ROUTE_PASS = "pass"
ROUTE_BLOCK = "block"
ROUTE_DEFER = "defer"


class Deferrer(Protocol):
    """pfsync_defer as pf sees it: True when pfsync now owns the packet's verdict."""

    def defer(self, st: State, handle: object, now: float) -> bool: ...


class RouteVerdict:
    """The outcome of one router step: pass, block, or defer (pfsync holds the packet)."""

    __slots__ = ("action", "payload", "v_in", "v_out")

    def __init__(self, action: str, v_in: Verdict | None, v_out: Verdict | None,
                 payload: bytearray | None = None) -> None:
        self.action = action
        self.v_in = v_in
        self.v_out = v_out
        # the whole packet as translated, None when it goes on unchanged
        self.payload = payload

    @property
    def verdicts(self) -> Iterator[Verdict]:
        if self.v_in is not None:
            yield self.v_in
        if self.v_out is not None:
            yield self.v_out

    def log_lines(self) -> list[str]:
        """pf's log lines of both tests, in order."""
        lines: list[str] = []
        for v in self.verdicts:
            lines.extend(v.log)
        return lines

    def replies(self) -> list[bytes]:
        """pf's own packets (RST, ICMP unreachable, challenge ACK) from both tests."""
        return [v.reply for v in self.verdicts if v.reply]

    def __repr__(self) -> str:
        return f"<RouteVerdict {self.action} in={self.v_in!r} out={self.v_out!r}>"


def translate(pkt: Packet, xlate: tuple, buf: bytearray | None) -> bytearray:
    """Rewrite `pkt` as a verdict's translation says; the packet's fields follow, so the
    next test sees the translated packet. Raises RewriteError for a packet whose
    headers are not all there (a truncated copy)."""
    if buf is None:
        buf = bytearray(pkt.raw)
    if len(xlate) == 4:
        rewrite(buf, pkt, xlate[0], xlate[1], xlate[2], xlate[3])
    else:
        rewrite_icmp_error(buf, pkt, *xlate)
    pkt.raw = memoryview(buf)
    return buf


def route(filt: Filter, in_if: str | None, out_if: str | None, pkt: Packet, now: float,
          deferrer: Deferrer | None = None, handle: object = None,
          tag: int = 0, rewrite: bool = True) -> RouteVerdict:
    """Test `pkt` in on `in_if`, then out on `out_if` (either may be None: traffic to or
    from the host itself, or one hook of a translating daemon), translate it where a
    test says so, and offer a state the `out` test created to `deferrer`. `tag` is the
    packet's pf tag on entry: the out half of a split step passes the `filt.pkt_tag`
    its in half left (tags cross the two halves only that way). `rewrite` False: decide
    only (a reassembled datagram's fragments are forwarded as they came; the caller
    reads the verdicts' xlate)."""
    v_in = v_out = None
    payload = None
    tagging = filt.tagging
    if tagging:
        filt.pkt_tag = tag
    try:
        if in_if is not None:
            v_in = filt.test(PF_IN, in_if, pkt, now)
            if v_in.action != PASS:
                return RouteVerdict(ROUTE_BLOCK, v_in, None)
            if tagging and v_in.state is not None and not v_in.new_state:
                filt.pkt_tag = v_in.state.state_flags >> 16  # the state's tag, on the packet
            if v_in.xlate is not None and rewrite:
                payload = translate(pkt, v_in.xlate, payload)
            st = v_in.state
            sc = v_in.scrub if st is None else st.scrub
            if sc is not None and rewrite:
                payload = scrub_packet(payload, pkt, sc)
        if out_if is not None:
            v_out = filt.test(PF_OUT, out_if, pkt, now)
            if v_out.action != PASS:
                return RouteVerdict(ROUTE_BLOCK, v_in, v_out)
            if v_out.xlate is not None and rewrite:
                payload = translate(pkt, v_out.xlate, payload)
            st = v_out.state
            sc = v_out.scrub if st is None else st.scrub
            if sc is not None and rewrite:
                payload = scrub_packet(payload, pkt, sc)
    except RewriteError:
        filt.extra["translate-short"] += 1
        return RouteVerdict(ROUTE_BLOCK, v_in, v_out)
    st = v_out.state if v_out is not None else None
    if deferrer is not None and st is not None and v_out is not None and v_out.new_state \
            and deferrer.defer(st, handle, now):
        return RouteVerdict(ROUTE_DEFER, v_in, v_out, payload)
    return RouteVerdict(ROUTE_PASS, v_in, v_out, payload)


__all__ = ["ROUTE_BLOCK", "ROUTE_DEFER", "ROUTE_PASS", "Deferrer", "RouteVerdict", "route",
           "translate"]
