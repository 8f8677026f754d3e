"""Numbers pf and pfsync share, with the values OpenBSD's headers give them.

Keeping them in one module means the wire codecs, the state table and the log printer
cannot disagree about what a peer state 9 or a timeout index 5 means.
"""

from __future__ import annotations

import socket
from enum import IntEnum

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
IPPROTO_PFSYNC = 240

# Directions as pf numbers them (pfvar.h): PF_INOUT 0, PF_IN 1, PF_OUT 2.
PF_INOUT = 0
PF_IN = 1
PF_OUT = 2
DIR_NAMES = {PF_INOUT: "inout", PF_IN: "in", PF_OUT: "out"}

# TCP header flags.
TH_FIN = 0x01
TH_SYN = 0x02
TH_RST = 0x04
TH_PUSH = 0x08
TH_ACK = 0x10
TH_URG = 0x20
TH_ECE = 0x40
TH_CWR = 0x80
TCP_FLAG_LETTERS = "FSRPAUEW"


def flags_str(flags: int) -> str:
    """Flags as pfctl prints them: one letter per set bit, FIN first."""
    return "".join(c for i, c in enumerate(TCP_FLAG_LETTERS) if flags & (1 << i))


class TCPS(IntEnum):
    """Peer states (netinet/tcp_fsm.h); pf uses a subset for each peer of a TCP state."""

    CLOSED = 0
    LISTEN = 1
    SYN_SENT = 2
    SYN_RECEIVED = 3
    ESTABLISHED = 4
    CLOSE_WAIT = 5
    FIN_WAIT_1 = 6
    CLOSING = 7
    LAST_ACK = 8
    FIN_WAIT_2 = 9
    TIME_WAIT = 10


TCP_NSTATES = 11
PF_TCPS_PROXY_SRC = TCP_NSTATES + 0
PF_TCPS_PROXY_DST = TCP_NSTATES + 1

TCPS_NAMES = (
    "CLOSED", "LISTEN", "SYN_SENT", "SYN_RCVD", "ESTABLISHED", "CLOSE_WAIT",
    "FIN_WAIT_1", "CLOSING", "LAST_ACK", "FIN_WAIT_2", "TIME_WAIT",
    "PROXY_SRC", "PROXY_DST",
)

# UDP and other-protocol peer states.
PFUDPS_NO_TRAFFIC = 0
PFUDPS_SINGLE = 1
PFUDPS_MULTIPLE = 2
PFUDPS_NAMES = ("NO_TRAFFIC", "SINGLE", "MULTIPLE")
PFOTHERS_NAMES = PFUDPS_NAMES

PF_WSCALE_FLAG = 0x80
PF_WSCALE_MASK = 0x0F
TCP_MAX_WINSHIFT = 14
TCP_MAXWIN = 65535
MAXACKWINDOW = 0xFFFF + 1500  # pf's "fuzz": one max window plus a fragment


class PFTM(IntEnum):
    """Timeout indices (pfvar.h); the `timeout` byte of a pfsync state record."""

    TCP_FIRST_PACKET = 0
    TCP_OPENING = 1
    TCP_ESTABLISHED = 2
    TCP_CLOSING = 3
    TCP_FIN_WAIT = 4
    TCP_CLOSED = 5
    UDP_FIRST_PACKET = 6
    UDP_SINGLE = 7
    UDP_MULTIPLE = 8
    ICMP_FIRST_PACKET = 9
    ICMP_ERROR_REPLY = 10
    OTHER_FIRST_PACKET = 11
    OTHER_SINGLE = 12
    OTHER_MULTIPLE = 13
    FRAG = 14
    INTERVAL = 15
    ADAPTIVE_START = 16
    ADAPTIVE_END = 17
    SRC_NODE = 18
    TS_DIFF = 19
    MAX = 20
    PURGE = 21
    UNLINKED = 22


PFTM_MAX = int(PFTM.MAX)

# pf.conf names of the timeouts, in PFTM order (pfctl's pf_timeouts table).
TIMEOUT_NAMES: dict[str, int] = {
    "tcp.first": PFTM.TCP_FIRST_PACKET,
    "tcp.opening": PFTM.TCP_OPENING,
    "tcp.established": PFTM.TCP_ESTABLISHED,
    "tcp.closing": PFTM.TCP_CLOSING,
    "tcp.finwait": PFTM.TCP_FIN_WAIT,
    "tcp.closed": PFTM.TCP_CLOSED,
    "udp.first": PFTM.UDP_FIRST_PACKET,
    "udp.single": PFTM.UDP_SINGLE,
    "udp.multiple": PFTM.UDP_MULTIPLE,
    "icmp.first": PFTM.ICMP_FIRST_PACKET,
    "icmp.error": PFTM.ICMP_ERROR_REPLY,
    "other.first": PFTM.OTHER_FIRST_PACKET,
    "other.single": PFTM.OTHER_SINGLE,
    "other.multiple": PFTM.OTHER_MULTIPLE,
    "frag": PFTM.FRAG,
    "interval": PFTM.INTERVAL,
    "adaptive.start": PFTM.ADAPTIVE_START,
    "adaptive.end": PFTM.ADAPTIVE_END,
    "src.track": PFTM.SRC_NODE,
}

PFSTATE_HIWAT = 100000
PFSTATE_ADAPT_START = 60000
PFSTATE_ADAPT_END = 120000

# Defaults from OpenBSD pfvar.h (seconds), indexed by PFTM.
DEFAULT_TIMEOUTS: tuple[int, ...] = (
    120, 30, 86400, 900, 45, 90,   # tcp first opening established closing finwait closed
    60, 30, 60,                    # udp first single multiple
    20, 10,                        # icmp first error
    60, 30, 60,                    # other first single multiple
    60, 10,                        # frag, interval
    PFSTATE_ADAPT_START, PFSTATE_ADAPT_END,
    0, 30,                         # src.track, ts diff
)

# PFSTATE_* flags carried by a state (and, truncated to 8 bits, by pfsync v5 records).
PFSTATE_ALLOWOPTS = 0x01
PFSTATE_SLOPPY = 0x02
PFSTATE_PFLOW = 0x04
PFSTATE_NOSYNC = 0x08
PFSTATE_ACK = 0x10

# pfsync_state.sync_flags bits pfctl reports (pfvar.h).
PFSYNC_FLAG_SRCNODE = 0x04
PFSYNC_FLAG_NATSRCNODE = 0x08

# Reasons, as pfctl -si prints the counters (pfvar.h PFRES_*).
PFRES_NAMES = (
    "match", "bad-offset", "fragment", "short", "normalize", "memory",
    "bad-timestamp", "congestion", "ip-option", "proto-cksum", "state-mismatch",
    "state-insert", "state-limit", "src-limit", "synproxy", "translate", "no-route",
)
PFRES_MATCH = 0
PFRES_BADOFF = 1
PFRES_FRAG = 2
PFRES_SHORT = 3
PFRES_NORM = 4
PFRES_MEMORY = 5
PFRES_TS = 6
PFRES_CONGEST = 7
PFRES_IPOPTIONS = 8
PFRES_PROTCKSUM = 9
PFRES_BADSTATE = 10
PFRES_STATEINS = 11
PFRES_MAXSTATES = 12
PFRES_SRCLIMIT = 13
PFRES_SYNPROXY = 14
PFRES_TRANSLATE = 15
PFRES_NOROUTE = 16

# The one protocol-name table: what pfctl prints, getprotobynumber()'s official name from
# OpenBSD's /etc/protocols (58 is "ipv6-icmp", with icmp6 only an alias); a number not in
# it prints as the number (proto_name). Used by every view: pfctl -ss/-sr, the JSON state
# view, dump -v, replay and the rule log line.
PROTO_NAMES: dict[int, str] = {
    1: "icmp", 2: "igmp", 4: "ipencap", 6: "tcp", 17: "udp", 41: "ipv6", 47: "gre",
    50: "esp", 51: "ah", 58: "ipv6-icmp", 89: "ospf", 103: "pim", 108: "ipcomp",
    112: "carp", 132: "sctp", 240: "pfsync",
}

# The kernel's own spelling in pf_print_state (pf.c), the `pf: BAD state: TCP ...` log
# lines: it switches on the protocol itself rather than asking /etc/protocols, so these
# differ from PROTO_NAMES on purpose; other protocols print as the number.
PF_LOG_PROTO_NAMES: dict[int, str] = {
    IPPROTO_TCP: "TCP", IPPROTO_UDP: "UDP", IPPROTO_ICMP: "ICMP", IPPROTO_ICMPV6: "ICMPv6",
}


def proto_name(proto: int) -> str:
    """pfctl's name of a protocol number (PROTO_NAMES), else the number."""
    return PROTO_NAMES.get(proto) or str(proto)

# -- ICMP state keys: pf_icmp_mapping (OpenBSD sys/net/pf.c) --------------------------------
# An ICMP query and its reply share one state whose key holds, in place of the two ports,
# a virtual id and a virtual type: the query's type, so an echo state reads
# "host:8 <- peer:id". The packet's icmp_dir says which port slot takes the id: PF_IN
# (a query: the id goes in the source's slot) or PF_OUT (a reply: the id goes in the
# destination's slot, so the reply finds the query's state travelling back).
# Each table maps type -> (virtual type, icmp_dir, uses the id field); a type missing
# from it gets a state of its own: (type, PF_IN, id 0).
ICMP4_MAPPING: dict[int, tuple[int, int, bool]] = {
    8: (8, PF_IN, True), 0: (8, PF_OUT, True),          # echo / echo reply
    13: (13, PF_IN, True), 14: (13, PF_OUT, True),      # timestamp
    15: (15, PF_IN, True), 16: (15, PF_OUT, True),      # information request
    17: (17, PF_IN, True), 18: (17, PF_OUT, True),      # address mask
    33: (33, PF_IN, False), 34: (33, PF_OUT, False),    # IPv6 where-are-you / I-am-here
    35: (35, PF_IN, False), 36: (35, PF_OUT, False),    # mobile registration
    10: (10, PF_IN, False), 9: (10, PF_OUT, False),     # router solicitation / advert
}
ICMP6_MAPPING: dict[int, tuple[int, int, bool]] = {
    128: (128, PF_IN, True), 129: (128, PF_OUT, True),  # echo / echo reply
    139: (139, PF_IN, False), 140: (139, PF_OUT, False),  # node information (WRU, FQDN)
    201: (201, PF_IN, False), 200: (201, PF_OUT, False),  # mtrace / mtrace response
}
# Errors map to another connection's state (pf_icmp_mapping returns 1 for them).
ICMP4_ERRORS = frozenset((3, 4, 5, 11, 12))
ICMP6_ERRORS = frozenset((1, 2, 3, 4))
# MLD and neighbour discovery: the virtual id is a 16-bit fold of the address the message
# is about; a neighbour solicitation's key holds its target in the destination slot; an
# advertisement never gets or matches a state (pf_icmp_mapping returns 1 for it too).
MLD_LISTENER_QUERY = 130
MLD_LISTENER_REPORT = 131
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
# The replies: a stateful rule never matches them (pf_match_rule skips a keep-state rule
# that is not sloppy when icmp_dir != PF_IN and the type is not state-less).
ICMP4_REPLY_TYPES = frozenset(t for t, m in ICMP4_MAPPING.items() if m[1] == PF_OUT)
ICMP6_REPLY_TYPES = frozenset(t for t, m in ICMP6_MAPPING.items() if m[1] == PF_OUT)
# ff02::1, which pf puts in the source slot for its second ("multi") lookup of an IPv6
# reply, so the answer to a multicast echo request finds the request's state.
IN6ADDR_LINKLOCAL_ALLNODES = bytes.fromhex("ff020000000000000000000000000001")
