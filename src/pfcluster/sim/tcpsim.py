"""A small TCP sender/receiver pair that emits real IPv4 packets, for in-process tests
and benchmarks of the firewall pair.

It is reactive where it matters to pf: the receiver acknowledges only what arrived in
order (a blocked segment is a lost segment), the sender is limited by the advertised
window and retransmits from the first unacknowledged byte after a timeout (go-back-N).
So when a firewall blocks, the transfer slows or stalls exactly as a real one would.
"""

from __future__ import annotations

import socket
import struct

from pfcluster.pf.constants import TH_ACK, TH_FIN, TH_PUSH, TH_SYN

M32 = 0xFFFFFFFF
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")


def tcp_packet(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
               flags: int, win: int, payload_len: int = 0, options: bytes = b"") -> bytes:
    """An IPv4+TCP packet with `payload_len` zero bytes of data (checksums left 0)."""
    opt = options + b"\x00" * (-len(options) % 4)
    th_off = (20 + len(opt)) // 4
    total = 20 + th_off * 4 + payload_len
    ip = _IP.pack(0x45, 0, total, 0, 0x4000, 64, 6, 0, src, dst)
    tcp = _TCP.pack(sport, dport, seq & M32, ack & M32, th_off << 4, flags, win, 0, 0)
    return ip + tcp + opt + bytes(payload_len)


def syn_options(mss: int, wscale: int) -> bytes:
    return struct.pack("!BBH", 2, 4, mss) + b"\x01" + struct.pack("!BBB", 3, 3, wscale)


class Segment:
    __slots__ = ("raw", "to_server")

    def __init__(self, raw: bytes, to_server: bool) -> None:
        self.raw = raw
        self.to_server = to_server


class TcpTransfer:
    """Client sends `total_bytes` to the server; the server only acknowledges."""

    def __init__(self, client: str = "198.51.100.2", server: str = "203.0.113.10",
                 sport: int = 40000, dport: int = 5201, total_bytes: int = 1448 * 5000,
                 mss: int = 1448, wscale: int = 7, window: int = 512 * 1024,
                 rto: float = 0.2, client_isn: int = 0x10000000, server_isn: int = 0x70000000,
                 ack_every: int = 2, server_closes_first: bool = False) -> None:
        self.c = socket.inet_aton(client)
        self.s = socket.inet_aton(server)
        self.sport = sport
        self.dport = dport
        self.total = total_bytes
        self.mss = mss
        self.wscale = wscale
        self.window = window
        self.rto = rto
        self.ack_every = ack_every
        # The server sends its FIN once it has everything (an HTTP/1.0-style server); the
        # client answers with its own and is done when that is acknowledged, so it keeps
        # no TIME_WAIT and may reuse its source port at once, as Linux clients do.
        self.server_closes_first = server_closes_first
        self.syn_rto = 1.0
        self.c_isn = client_isn
        self.s_isn = server_isn
        # client (sender) state
        self.snd_una = client_isn + 1
        self.snd_nxt = client_isn + 1
        self.snd_max = client_isn + 1
        self.peer_wnd = 65535
        self.established = False
        self.fin_sent = False
        self.peer_fin = False
        self.done = False
        self.last_progress = 0.0
        # server (receiver) state
        self.rcv_nxt = 0
        self.s_seq = server_isn + 1
        self.unacked_segments = 0
        self.server_fin_sent = False
        self.bytes_delivered = 0
        self.retransmits = 0
        self.data_segments = 0

    # client side -------------------------------------------------------------------
    def syn(self, now: float) -> Segment:
        self.last_progress = now
        return Segment(tcp_packet(self.c, self.s, self.sport, self.dport, self.c_isn, 0, TH_SYN,
                                  65535, 0, syn_options(self.mss, self.wscale)), True)

    def client_window_open(self) -> bool:
        inflight = (self.snd_nxt - self.snd_una) & M32
        limit = min(self.window, self.peer_wnd)
        return inflight + self.mss <= limit

    def client_next(self, now: float) -> Segment | None:
        """The client's next segment at `now`, or None if it must wait."""
        if self.done:
            return None
        if not self.established:
            if now - self.last_progress >= self.syn_rto:
                self.retransmits += 1
                return self.syn(now)
            return None
        sent_total = (self.snd_nxt - self.c_isn - 1) & M32
        if now - self.last_progress > self.rto and self.snd_una != self.snd_max:
            # Timeout: go back to the first unacknowledged byte.
            self.retransmits += 1
            self.snd_nxt = self.snd_una
            self.last_progress = now
            sent_total = (self.snd_nxt - self.c_isn - 1) & M32
            if self.fin_sent and sent_total >= self.total:
                self.fin_sent = False
        if sent_total < self.total:
            if not self.client_window_open():
                return None
            n = min(self.mss, self.total - sent_total)
            seg = tcp_packet(self.c, self.s, self.sport, self.dport, self.snd_nxt, self.s_seq,
                             TH_ACK | TH_PUSH, 1024, n)
            self.snd_nxt = (self.snd_nxt + n) & M32
            if (self.snd_nxt - self.snd_max) & 0x80000000 == 0:
                self.snd_max = self.snd_nxt
            self.data_segments += 1
            return Segment(seg, True)
        if not self.fin_sent and self.snd_una == self.snd_nxt and \
                (not self.server_closes_first or self.peer_fin):
            self.fin_sent = True
            seg = tcp_packet(self.c, self.s, self.sport, self.dport, self.snd_nxt, self.s_seq,
                             TH_ACK | TH_FIN, 1024)
            self.snd_nxt = (self.snd_nxt + 1) & M32
            self.snd_max = self.snd_nxt
            return Segment(seg, True)
        return None

    def client_receive(self, seg: bytes, now: float) -> list[Segment]:
        flags = seg[33]
        seq, ack = struct.unpack_from("!II", seg, 24)
        win = struct.unpack_from("!H", seg, 34)[0]
        out: list[Segment] = []
        if flags & TH_SYN and flags & TH_ACK and not self.established:
            self.established = True
            self.s_seq = (seq + 1) & M32
            self.peer_wnd = win << self.wscale
            self.last_progress = now
            out.append(Segment(tcp_packet(self.c, self.s, self.sport, self.dport, self.snd_nxt,
                                          self.s_seq, TH_ACK, 1024), True))
            return out
        if flags & TH_ACK and (ack - self.snd_una) & M32 and not (ack - self.snd_una) & 0x80000000:
            self.snd_una = ack
            self.last_progress = now
            self.peer_wnd = win << self.wscale
        if flags & TH_FIN:
            self.s_seq = (seq + 1) & M32
            self.peer_fin = True
            if self.server_closes_first and not self.fin_sent:
                # passive close: our FIN with the ACK of theirs; done when it is acked
                self.fin_sent = True
                out.append(Segment(tcp_packet(self.c, self.s, self.sport, self.dport,
                                              self.snd_nxt, self.s_seq, TH_ACK | TH_FIN,
                                              1024), True))
                self.snd_nxt = (self.snd_nxt + 1) & M32
                self.snd_max = self.snd_nxt
                return out
            self.done = True
            out.append(Segment(tcp_packet(self.c, self.s, self.sport, self.dport, self.snd_nxt,
                                          self.s_seq, TH_ACK, 1024), True))
        elif self.server_closes_first and self.fin_sent and self.snd_una == self.snd_nxt:
            self.done = True
        return out

    # server side -------------------------------------------------------------------
    def server_receive(self, seg: bytes, now: float) -> list[Segment]:
        flags = seg[33]
        th_off = (seg[32] >> 4) * 4
        seq = struct.unpack_from("!I", seg, 24)[0]
        plen = len(seg) - 20 - th_off
        s, c = self.s, self.c
        rwin = self.window >> self.wscale
        if flags & TH_SYN:
            self.rcv_nxt = (seq + 1) & M32
            return [Segment(tcp_packet(s, c, self.dport, self.sport, self.s_isn, self.rcv_nxt,
                                       TH_SYN | TH_ACK, 65535, 0,
                                       syn_options(self.mss, self.wscale)), False)]
        out: list[Segment] = []
        if plen and seq == self.rcv_nxt:
            self.rcv_nxt = (self.rcv_nxt + plen) & M32
            self.bytes_delivered += plen
            self.unacked_segments += 1
            if self.unacked_segments >= self.ack_every:
                self.unacked_segments = 0
                out.append(Segment(tcp_packet(s, c, self.dport, self.sport, self.s_seq,
                                              self.rcv_nxt, TH_ACK, rwin), False))
        elif plen:
            # Out of order or duplicate: acknowledge what we have.
            out.append(Segment(tcp_packet(s, c, self.dport, self.sport, self.s_seq, self.rcv_nxt,
                                          TH_ACK, rwin), False))
        if self.server_closes_first:
            if not self.server_fin_sent and self.bytes_delivered >= self.total:
                self.unacked_segments = 0
                out.append(Segment(tcp_packet(s, c, self.dport, self.sport, self.s_seq,
                                              self.rcv_nxt, TH_ACK | TH_FIN, rwin), False))
                self.s_seq = (self.s_seq + 1) & M32
                self.server_fin_sent = True
            elif flags & TH_FIN and seq == self.rcv_nxt:
                self.rcv_nxt = (self.rcv_nxt + 1) & M32
                out.append(Segment(tcp_packet(s, c, self.dport, self.sport, self.s_seq,
                                              self.rcv_nxt, TH_ACK, rwin), False))
            return out
        if flags & TH_FIN and seq == self.rcv_nxt:
            self.rcv_nxt = (self.rcv_nxt + 1) & M32
            out.append(Segment(tcp_packet(s, c, self.dport, self.sport, self.s_seq, self.rcv_nxt,
                                          TH_ACK | TH_FIN, rwin), False))
            self.s_seq = (self.s_seq + 1) & M32
            self.server_fin_sent = True
        return out

    def server_flush_ack(self) -> Segment | None:
        """A delayed ACK for an odd segment left unacknowledged."""
        if self.unacked_segments:
            self.unacked_segments = 0
            return Segment(tcp_packet(self.s, self.c, self.dport, self.sport, self.s_seq,
                                      self.rcv_nxt, TH_ACK, self.window >> self.wscale), False)
        return None
