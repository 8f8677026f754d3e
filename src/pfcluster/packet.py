"""One-pass parser of IPv4/IPv6 packets into a slotted descriptor.

CONTRACT (the pf engine codes against these names; the parser fills them):

Packet fields
  raw          memoryview of the whole IP packet (no copy)
  af           socket.AF_INET or socket.AF_INET6
  src, dst     addresses as bytes (4 or 16)
  proto        final upper-layer protocol number (after IPv6 extension headers)
  ip_len       total length in bytes from the IP header (IPv6: 40 + payload length)
  ttl          IPv4 TTL / IPv6 hop limit
  tos          IPv4 TOS / IPv6 traffic class
  ip_id        IPv4 id, or the IPv6 fragment header id (0 if none)
  frag_off     fragment offset in bytes (0 for unfragmented and first fragments)
  more_frags   MF set
  df           IPv4 DF bit (False for IPv6)
  fragment     True if the packet is any fragment (offset > 0 or MF)
  l4_off       offset of the upper-layer header in raw (== ip_len when there is none)
  l4_len       bytes from l4_off to the end of the IP payload (ip_len - l4_off)
  ip_opts      True if IPv4 options or IPv6 hop-by-hop/destination options are present
  sport,dport  TCP/UDP ports; for ICMP/ICMPv6 echo request/reply both are the echo id;
               0 otherwise
  tcp_flags, seq, ack, win, th_off (TCP header length in bytes), p_len (TCP/UDP payload bytes)
  mss, wscale  TCP option values, -1 when absent (wscale raw, not clamped)
  sack_ok      TCP SACK-permitted option present
  ts_val, ts_ecr  TCP timestamps, -1 when absent
  icmp_type, icmp_code, icmp_id  ICMP/ICMPv6 (icmp_id -1 when not an echo/query)
  inner        for ICMP/ICMPv6 errors: a Packet parsed from the quoted datagram (partial
               upper layer allowed: only the first 8 bytes of TCP/UDP need be present), else None
"""

from __future__ import annotations


class MalformedPacket(ValueError):
    """The bytes are not a parseable IPv4/IPv6 packet; the only error parse() raises."""
