"""pf.conf filter subset: lexer and recursive-descent parser producing a `Ruleset`.

Translation comes in both dialects: OpenBSD's nat-to/rdr-to/binat-to options on pass and
match rules (binat-to expands into an outbound nat-to rule and the inbound rdr-to rule
back, as pfctl does), and FreeBSD's `[no] nat|rdr|binat ... -> pool` rules, which land
in Ruleset.translation_rules. Pools are `pfcluster.pf.pool.Pool`.

Errors read like pfctl's (`file:line:col: message`, col 1-based at the offending token)
so an operator can jump to the spot; the first error stops the load and nothing is
returned, as pfctl loads all or nothing.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pfcluster.pf.constants import (
    AF_INET,
    AF_INET6,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    PF_IN,
    PF_INOUT,
    PF_OUT,
    PFTM,
    TCP_FLAG_LETTERS,
    TIMEOUT_NAMES,
)
from pfcluster.pf.ifaddrs import IfAddrs, UrpfCheck, is_link_local
from pfcluster.pf.pool import DYNAMIC_OPTS, Pool
from pfcluster.pf.route import (
    MAX_TARGETS,
    RT_DUPTO,
    RT_REPLYTO,
    RT_ROUTETO,
    RoutePool,
    RouteTarget,
)
from pfcluster.pf.ruleset import (
    ICMP6_TYPES,
    ICMP6_UNREACH_CODES,
    ICMP6_UNREACH_PORT,
    ICMP_CODES,
    ICMP_TYPES,
    ICMP_UNREACH_CODES,
    ICMP_UNREACH_PORT,
    PF_OP_EQ,
    PF_OP_GE,
    PF_OP_GT,
    PF_OP_IRG,
    PF_OP_LE,
    PF_OP_LT,
    PF_OP_NE,
    PF_OP_RRG,
    PF_OP_XRG,
    Addr,
    Rule,
    Ruleset,
    Table,
)
from pfcluster.pf.scrub import (
    PFSTATE_NODF,
    PFSTATE_RANDOMID,
    PFSTATE_SCRUB_TCP,
    PFSTATE_SETTOS,
    Scrub,
)
from pfcluster.pf.srcnode import SrcTrack
from pfcluster.pf.tags import TagError, tag_id

__all__ = ["RuleSyntaxError", "load_rules", "parse_rules"]

T = TypeVar("T")
_NUMBER_RE = re.compile(r"(?:[0-9]+|0[xX][0-9a-fA-F]+)\Z")
_DEC_RE = re.compile(r"[0-9]+\Z")


def _isdec(text: str) -> bool:
    """ASCII decimal digits only (str.isdigit also accepts '²', which int() rejects)."""
    return _DEC_RE.match(text) is not None


class RuleSyntaxError(ValueError):
    """A pf.conf mistake; str() is `file:line:col: message`."""

    def __init__(self, filename: str, line: int, col: int, message: str) -> None:
        super().__init__(f"{filename}:{line}:{col}: {message}")
        self.filename = filename
        self.line = line
        self.col = col
        self.message = message


PROTOCOLS: dict[str, int] = {
    "ip": 0, "hopopt": 0, "icmp": 1, "igmp": 2, "ggp": 3, "ipencap": 4, "ipip": 4,
    "st": 5, "tcp": 6, "egp": 8, "igp": 9, "pup": 12, "udp": 17, "hmp": 20,
    "xns-idp": 22, "rdp": 27, "iso-tp4": 29, "dccp": 33, "xtp": 36, "ddp": 37,
    "idpr-cmtp": 38, "ipv6": 41, "ipv6-route": 43, "ipv6-frag": 44, "idrp": 45,
    "rsvp": 46, "gre": 47, "esp": 50, "ah": 51, "skip": 57, "ipv6-icmp": 58, "icmp6": 58,
    "ipv6-nonxt": 59, "ipv6-opts": 60, "rspf": 73, "vmtp": 81, "eigrp": 88, "ospf": 89,
    "ax.25": 93, "etherip": 97, "encap": 98, "pim": 103, "ipcomp": 108, "vrrp": 112,
    "carp": 112, "l2tp": 115, "isis": 124, "sctp": 132, "udplite": 136,
    "mpls-in-ip": 137, "pfsync": 240,
}

# IANA service names used when /etc/services is missing (tcp and udp share these).
_BUILTIN_SERVICES: dict[str, int] = {
    "echo": 7, "discard": 9, "daytime": 13, "ftp-data": 20, "ftp": 21, "ssh": 22,
    "telnet": 23, "smtp": 25, "time": 37, "whois": 43, "domain": 53, "bootps": 67,
    "bootpc": 68, "tftp": 69, "gopher": 70, "finger": 79, "http": 80, "www": 80,
    "kerberos": 88, "pop3": 110, "sunrpc": 111, "auth": 113, "nntp": 119, "ntp": 123,
    "netbios-ns": 137, "netbios-dgm": 138, "netbios-ssn": 139, "imap": 143, "imap2": 143,
    "snmp": 161, "snmp-trap": 162, "bgp": 179, "irc": 194, "ldap": 389, "https": 443,
    "microsoft-ds": 445, "isakmp": 500, "syslog": 514, "submission": 587, "ldaps": 636,
    "rsync": 873, "imaps": 993, "pop3s": 995, "openvpn": 1194, "radius": 1812,
    "nfs": 2049, "mysql": 3306, "sip": 5060, "postgresql": 5432, "x11": 6000,
}


def _load_services() -> dict[tuple[str, str], int]:
    """Service names for tcp and udp: /etc/services when present, else the builtin list."""
    table: dict[tuple[str, str], int] = {}
    for name, port in _BUILTIN_SERVICES.items():
        table[(name, "tcp")] = port
        table[(name, "udp")] = port
    try:
        text = Path("/etc/services").read_text(errors="replace")
    except OSError:
        return table
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 2 or "/" not in words[1]:
            continue
        port_s, _, proto = words[1].partition("/")
        if not _isdec(port_s) or proto not in ("tcp", "udp"):
            continue
        for name in [words[0], *words[2:]]:
            table.setdefault((name, proto), int(port_s))
    return table


SERVICES = _load_services()

# Pool options (pfctl's pool_opts) and the rule options refused with a clear message.
POOL_WORDS = ("bitmask", "random", "source-hash", "round-robin", "least-states",
              "static-port", "sticky-address")
_SCRUB_WORDS = frozenset(("no-df", "random-id", "min-ttl", "max-mss", "set-tos", "reassemble",
                          "fragment"))
_TOS_NAMES = {"lowdelay": 0x10, "throughput": 0x08, "reliability": 0x04}

UNSUPPORTED_OPTS = ("af-to", "fastroute", "divert-to", "divert-reply", "divert-packet",
                    "rtable")
ROUTE_OPTS = {"route-to": RT_ROUTETO, "reply-to": RT_REPLYTO, "dup-to": RT_DUPTO}

KEYWORDS = frozenset((
    "pass", "block", "match", "in", "out", "log", "quick", "on", "inet", "inet6", "proto",
    "from", "to", "all", "any", "port", "flags", "icmp-type", "icmp6-type", "code", "keep",
    "no", "modulate", "synproxy", "state", "label", "table", "set", "persist", "const",
    "counters", "drop", "return", "return-rst", "return-icmp", "return-icmp6", "anchor",
    "antispoof", "for", "tag", "tagged", "load", "scrub",
    "nat", "rdr", "binat", "nat-to", "rdr-to", "binat-to", *POOL_WORDS,
))

STATE_FLAGS_OPTS = ("no-sync", "sloppy", "pflow", "if-bound", "floating")
SRCTRACK_OPTS = ("source-track", "max-src-nodes", "max-src-states", "max-src-conn",
                 "max-src-conn-rate", "overload")
DEBUG_LEVELS = ("none", "emerg", "alert", "crit", "err", "warning", "notice", "info",
                "debug", "urgent", "misc", "loud")
LIMIT_NAMES = ("states", "frags", "src-nodes", "tables", "table-entries", "pktdelay-pkts",
               "anchors")

_PUNCT2 = ("<=", ">=", "!=", "><", "<>")
_PUNCT1 = "{}(),<>!=/"
_NOT_WORD = set(' \t\r\n{}(),<>!=/#"\'$\\')


@dataclass(slots=True)
class Tok:
    kind: str  # "word" | "string" | "punct" | "nl" | "eof"
    text: str
    line: int
    col: int


class _Lexer:
    """Tokens on demand, so a macro defined on one line is expanded on the next."""

    def __init__(self, text: str, filename: str, macros: dict[str, str]) -> None:
        self.text = text
        self.filename = filename
        self.macros = macros

    def error(self, line: int, col: int, msg: str) -> RuleSyntaxError:
        return RuleSyntaxError(self.filename, line, col, msg)

    def tokens(self) -> Iterator[Tok]:
        last = None
        for last in self._lex(self.text, 1, 1, None, 0):
            yield last
        assert last is not None and last.kind == "eof"
        while True:  # reading past the end keeps returning end-of-file
            yield last

    def _lex(self, text: str, line: int, col: int, at: Tok | None, depth: int) -> Iterator[Tok]:
        """Tokens of text; inside a macro expansion every token takes the `$name` position."""
        i = 0
        n = len(text)

        def mk(kind: str, s: str, ln: int, c: int) -> Tok:
            if at is not None:
                return Tok(kind, s, at.line, at.col)
            return Tok(kind, s, ln, c)

        while i < n:
            ch = text[i]
            if ch in " \t\r":
                i += 1
                col += 1
                continue
            if ch == "\\" and text.startswith("\n", i + 1):
                i += 2
                line += 1
                col = 1
                continue
            if ch == "\\" and text.startswith("\r\n", i + 1):
                i += 3
                line += 1
                col = 1
                continue
            if ch == "#":
                while i < n and text[i] != "\n":
                    i += 1
                continue
            if ch == "\n":
                if at is None:
                    yield Tok("nl", "\n", line, col)
                i += 1
                line += 1
                col = 1
                continue
            if ch == '"':
                start_line, start_col = line, col
                i += 1
                col += 1
                buf = []
                while True:
                    if i >= n or text[i] == "\n":
                        raise self.error(*((at.line, at.col) if at else (start_line, start_col)),
                                         "unterminated quoted string")
                    c = text[i]
                    if c == "\\" and i + 1 < n and text[i + 1] in '"\\':
                        buf.append(text[i + 1])
                        i += 2
                        col += 2
                        continue
                    i += 1
                    col += 1
                    if c == '"':
                        break
                    buf.append(c)
                yield mk("string", "".join(buf), start_line, start_col)
                continue
            if ch == "$":
                j = i + 1
                while j < n and (text[j].isalnum() or text[j] == "_"):
                    j += 1
                name = text[i + 1:j]
                here = at or Tok("word", "$" + name, line, col)
                if not name:
                    raise self.error(here.line, here.col, "invalid macro reference '$'")
                if name not in self.macros:
                    raise self.error(here.line, here.col, f"macro '{name}' not defined")
                if depth >= 16:
                    raise self.error(here.line, here.col, f"macro '{name}' expands too deeply")
                value = self.macros[name]
                k = j
                while k < n and text[k] == ":" and k + 1 < n and text[k + 1].isalnum():
                    k += 1  # `$ext:network`: the suffix continues the word, as in pfctl
                    while k < n and (text[k].isalnum() or text[k] == "_"):
                        k += 1
                yield from self._lex(value + text[j:k], line, col, here, depth + 1)
                j = k
                col += j - i
                i = j
                continue
            two = text[i:i + 2]
            if two in _PUNCT2:
                yield mk("punct", two, line, col)
                i += 2
                col += 2
                continue
            if ch in _PUNCT1:
                yield mk("punct", ch, line, col)
                i += 1
                col += 1
                continue
            if ch == "'" or ch == "\\":
                raise self.error(*((at.line, at.col) if at else (line, col)),
                                 f"unexpected character {ch!r}")
            j = i
            while j < n and text[j] not in _NOT_WORD:
                j += 1
            yield mk("word", text[i:j], line, col)
            col += j - i
            i = j
        if at is None:
            yield Tok("nl", "\n", line, col)
            yield Tok("eof", "", line, col)


# --- intermediate, pre-expansion rule description -----------------------------------


@dataclass(slots=True)
class _Host:
    addr: Addr
    tok: Tok


@dataclass(slots=True)
class _Port:
    spec: tuple[int, int, int]
    tok: Tok


@dataclass
class _RuleSpec:
    """A rule as written, with lists still unexpanded."""

    action: str = "pass"
    tok: Tok | None = None
    return_mode: str | None = None
    return_icmp: int = ICMP_UNREACH_PORT
    return_icmp6: int = ICMP6_UNREACH_PORT
    direction: int = PF_INOUT
    log: bool = False
    log_all: bool = False
    quick: bool = False
    ifaces: list[tuple[str | None, bool]] = field(default_factory=lambda: [(None, False)])
    af: int = 0
    af_tok: Tok | None = None
    protos: list[tuple[int, Tok | None]] = field(default_factory=lambda: [(0, None)])
    src: list[_Host] = field(default_factory=list)
    dst: list[_Host] = field(default_factory=list)
    sports: list[_Port] = field(default_factory=list)
    dports: list[_Port] = field(default_factory=list)
    flags: tuple[int, int] | None = None  # None = not written
    flags_tok: Tok | None = None
    icmp: list[tuple[int, int | None]] = field(default_factory=list)
    icmp_kw: str | None = None
    icmp_tok: Tok | None = None
    state: str | None = None  # "keep" | "modulate" | "synproxy" | "no" | None (unwritten)
    state_tok: Tok | None = None
    max_states: int = 0
    srctrack: SrcTrack | None = None  # source-tracking options, when any is written
    no_sync: bool = False
    sloppy: bool = False
    pflow: bool = False
    if_bound: bool | None = None
    timeouts: dict[int, int] = field(default_factory=dict)
    label: str | None = None
    nat: _PoolSpec | None = None  # nat-to or binat-to
    rdr: _PoolSpec | None = None
    binat: bool = False
    natpass: bool = False  # FreeBSD `nat pass`
    no_xlate: bool = False  # FreeBSD `no nat`
    anchor: str | None = None  # `anchor "name"`: the anchor's path
    anchor_wild: bool = False  # `anchor "name/*"`
    tag: int = 0
    match_tag: int = 0
    match_tag_not: bool = False
    scrub: Scrub | None = None
    route: RoutePool | None = None
    route_tok: Tok | None = None


@dataclass
class _PoolSpec:
    """A translation pool as written (before the rule's address family is known)."""

    tok: Tok  # the nat-to / rdr-to / binat-to / -> token
    hosts: list[_Host] = field(default_factory=list)
    ifname: str | None = None
    if_noalias: bool = False
    table: Table | None = None
    port: tuple[int, int, bool] | None = None  # lo, hi, `lo:*`
    port_tok: Tok | None = None
    opts: str = "none"
    opts_tok: Tok | None = None
    hash_key: bytes = b""
    sticky: bool = False
    static_port: bool = False
    static_tok: Tok | None = None


class _Parser:
    def __init__(self, text: str, filename: str, base: str = "",
                 tables: dict[str, Table] | None = None,
                 ifaddrs: IfAddrs | None = None) -> None:
        """`base`: the anchor path the file's rules go to ("" for the main ruleset);
        `tables`: the main ruleset's tables an anchor's rules may name (pf falls back to
        the root table of a name the anchor does not define); `ifaddrs`: the host's
        interfaces (`em0`/`self` expand from them, `(em0)` follows them)."""
        self.filename = filename
        self.rs = Ruleset(filename)
        self.ifaddrs = ifaddrs if ifaddrs is not None else IfAddrs()
        self.rs.ifaddrs = self.ifaddrs
        self._noroute: UrpfCheck | None = None
        self.base = base
        self.anchor_path = base
        self.rules = self.rs.rules if not base else self.rs.anchor(base).rules
        if base:
            self.rs.defined_anchors.add(base)
        self._inherited: set[str] = set()
        if tables:
            self.rs.tables.update(tables)
            self._inherited.update(tables)
        self._anon = 0
        self.macros = self.rs.macros
        self._toks = _Lexer(text, filename, self.macros).tokens()
        self.tok = next(self._toks)
        self._ahead: list[Tok] = []
        self._explicit_timeouts: set[int] = set()
        self._auto_tables: set[str] = set()
        # route-to/reply-to targets by (ifname, gateway), numbered in order of appearance
        # (their marks and tables); shared with `load anchor` files. Anchors loaded at
        # run time may not route: the daemon installs the tables once, at start.
        self.targets: dict[tuple[str, bytes | None], RouteTarget] = {}
        self.route_ok = not base

    # -- token helpers --
    def error(self, tok: Tok, msg: str) -> RuleSyntaxError:
        return RuleSyntaxError(self.filename, tok.line, tok.col, msg)

    def advance(self) -> Tok:
        t = self.tok
        self.tok = self._ahead.pop() if self._ahead else next(self._toks)
        return t

    def peek2(self) -> Tok:
        """The token after the current one."""
        if not self._ahead:
            self._ahead.append(next(self._toks))
        return self._ahead[-1]

    def at(self, text: str) -> bool:
        return self.tok.kind in ("word", "punct") and self.tok.text == text

    def accept(self, text: str) -> bool:
        if self.at(text):
            self.advance()
            return True
        return False

    def expect(self, text: str, what: str | None = None) -> Tok:
        if not self.at(text):
            raise self.unexpected(f"expected '{text}'" if what is None else what)
        return self.advance()

    def describe(self, tok: Tok) -> str:
        if tok.kind == "nl":
            return "end of line"
        if tok.kind == "eof":
            return "end of file"
        if tok.kind == "string":
            return f'"{tok.text}"'
        return f"'{tok.text}'"

    def unexpected(self, hint: str | None = None) -> RuleSyntaxError:
        msg = f"unexpected {self.describe(self.tok)}"
        return self.error(self.tok, f"{msg}, {hint}" if hint else msg)

    def skip_nl(self) -> None:
        while self.tok.kind == "nl":
            self.advance()

    def end_of_statement(self) -> None:
        if self.tok.kind not in ("nl", "eof"):
            t = self.tok
            if t.kind == "word" and t.text not in KEYWORDS:
                raise self.error(t, f"unknown keyword '{t.text}'")
            raise self.unexpected()

    def word(self, what: str) -> Tok:
        if self.tok.kind not in ("word", "string"):
            raise self.unexpected(f"expected {what}")
        return self.advance()

    def scrub_opts(self, paren: bool) -> Scrub:
        """`scrub (opts)` on a pass/match rule, or an old `scrub` rule's bare options."""
        sc = Scrub(legacy=not paren)
        if paren:
            self.expect("(", "expected '(' after scrub")
        seen: set[str] = set()
        while True:
            if paren and self.accept(")"):
                break
            t = self.tok
            if t.kind != "word" or t.text not in _SCRUB_WORDS:
                if paren:
                    raise self.unexpected("expected a scrub option or ')'")
                break
            if t.text == "fragment":
                raise self.error(t, "'fragment' options are not supported: fragments are "
                                 "reassembled by 'set reassemble yes' (the default)")
            if t.text in seen:
                raise self.error(t, f"{t.text} cannot be respecified")
            seen.add(t.text)
            self.advance()
            if t.text == "no-df":
                sc.flags |= PFSTATE_NODF
            elif t.text == "random-id":
                sc.flags |= PFSTATE_RANDOMID
            elif t.text == "min-ttl":
                sc.min_ttl = self.number("min-ttl", 1, 255)
            elif t.text == "max-mss":
                sc.max_mss = self.number("max-mss", 1, 65535)
            elif t.text == "set-tos":
                sc.set_tos = self.tos_value()
                sc.flags |= PFSTATE_SETTOS
            else:  # reassemble
                self.expect("tcp", "expected 'tcp' after reassemble")
                sc.flags |= PFSTATE_SCRUB_TCP
            if paren:
                self.accept(",")
        if paren and not seen:
            raise self.error(self.tok, "empty scrub options")
        return sc

    def tos_value(self) -> int:
        """set-tos: a number (0x10) or lowdelay/throughput/reliability."""
        t = self.tok
        if t.kind == "word" and t.text in _TOS_NAMES:
            self.advance()
            return _TOS_NAMES[t.text]
        return self.number("tos", 0, 255)

    def number(self, what: str = "number", lo: int = 0, hi: int = 2**32 - 1) -> int:
        t = self.tok
        if t.kind not in ("word", "string"):
            raise self.unexpected(f"expected {what}")
        self.advance()
        text = t.text
        if not _NUMBER_RE.match(text):
            raise self.error(t, f"'{text}' is not a valid {what}")
        value = int(text, 16) if text[:2].lower() == "0x" else int(text, 10)
        if not lo <= value <= hi:
            raise self.error(t, f"{what} {value} out of range ({lo}-{hi})")
        return value

    def list_items(self, item: Callable[[], T], what: str) -> list[T]:
        """`{ a, b c }` (commas optional, newlines allowed) or a single item."""
        if not self.at("{"):
            return [item()]
        open_tok = self.advance()
        out = []
        while True:
            self.skip_nl()
            if self.tok.kind == "eof":
                raise self.error(open_tok, f"unterminated {what} list (missing '}}')")
            if self.accept("}"):
                break
            if self.tok.kind == "word" and self.tok.text in ("pass", "block", "match", "set",
                                                              "table", "nat", "rdr", "binat"):
                raise self.error(open_tok, f"unterminated {what} list (missing '}}')")
            out.append(item())
            self.skip_nl()
            self.accept(",")
        if not out:
            raise self.error(open_tok, f"empty {what} list")
        return out

    # -- statements --
    def parse(self) -> Ruleset:
        self.statements(None)
        rs = self.rs
        rs.route_targets = list(self.targets.values())
        rs.finish()
        return rs

    def statements(self, open_tok: Tok | None) -> None:
        """Statements to end of file, or to the `}` closing an inline anchor."""
        while True:
            self.skip_nl()
            t = self.tok
            if t.kind == "eof":
                if open_tok is not None:
                    raise self.error(open_tok, "unterminated anchor (missing '}')")
                break
            if open_tok is not None and self.accept("}"):
                return
            nested = self.anchor_path != ""
            if t.kind in ("word", "string") and self.peek2().kind == "punct" \
                    and self.peek2().text == "=":
                if open_tok is not None:
                    raise self.error(t, "macros cannot be defined inside an inline anchor")
                self.macro()
            elif t.kind == "word" and t.text in ("pass", "block", "match", "anchor", "scrub"):
                self.rule()
            elif t.kind == "word" and t.text == "no" and self.peek2().kind == "word" \
                    and self.peek2().text == "scrub":
                raise self.error(t, "'no scrub' is not supported (write the scrub rules "
                                 "so that they do not match instead)")
            elif t.kind == "word" and t.text == "antispoof":
                self.antispoof()
            elif t.kind == "word" and (t.text in ("nat", "rdr", "binat") or (
                    t.text == "no" and self.peek2().kind == "word"
                    and self.peek2().text in ("nat", "rdr", "binat"))):
                if nested:
                    raise self.error(t, f"'{t.text}' rules are not allowed inside an anchor")
                self.translation_rule()
            elif t.kind == "word" and t.text in ("nat-anchor", "rdr-anchor", "binat-anchor"):
                raise self.error(t, f"'{t.text}' is not supported")
            elif t.kind == "word" and t.text == "load":
                if nested:
                    raise self.error(t, "'load anchor' is only allowed in the main ruleset")
                self.load_anchor()
            elif t.kind == "word" and t.text == "set":
                if nested:
                    raise self.error(t, "options cannot be set inside an anchor")
                self.set_option()
            elif t.kind == "word" and t.text == "table":
                self.table()
            elif t.kind == "word":
                raise self.error(t, f"unknown keyword '{t.text}'")
            else:
                raise self.unexpected()
            self.end_of_statement()

    # -- anchors --
    def anchor_name(self) -> tuple[str, bool, Tok]:
        """The anchor's path (relative to the anchor being parsed, `/` for absolute,
        `..` for the parent) and whether it is a wildcard `name/*`."""
        t = self.tok
        if t.kind == "string" or (t.kind == "word" and t.text not in KEYWORDS):
            self.advance()
            name = t.text
        else:
            self._anon += 1  # `anchor { ... }`: pfctl names anonymous anchors _1, _2...
            return (self.join_path(f"_{self._anon}", t), False, t)
        wild = name == "*" or name.endswith("/*")
        if wild:
            name = name[:-1].rstrip("/")
        if len(name) >= 1024:
            raise self.error(t, "anchor name too long")
        return (self.join_path(name, t) if name or not wild else
                self.join_path("", t), wild, t)

    def join_path(self, name: str, t: Tok) -> str:
        parts = [] if name.startswith("/") else [p for p in self.anchor_path.split("/") if p]
        for comp in name.strip("/").split("/") if name.strip("/") else []:
            if comp == "..":
                if not parts:
                    raise self.error(t, f"anchor '{name}' goes above the main ruleset")
                parts.pop()
            elif comp in ("", ".") or comp == "*" or any(c.isspace() for c in comp):
                raise self.error(t, f"invalid anchor name '{name}'")
            else:
                parts.append(comp)
        return "/".join(parts)

    def inline_anchor(self, path: str, open_tok: Tok) -> None:
        """`anchor "name" ... {` newline, rules, `}`: the rules go to that anchor."""
        if self.tok.kind != "nl":
            raise self.unexpected("expected a newline after '{'")
        if path in self.rs.defined_anchors:
            raise self.error(open_tok, f"anchor '{path}' already has rules")
        saved = (self.anchor_path, self.rules)
        self.anchor_path = path
        self.rules = self.rs.anchor(path).rules
        self.rs.defined_anchors.add(path)
        try:
            self.statements(open_tok)
        finally:
            self.anchor_path, self.rules = saved

    def load_anchor(self) -> None:
        """`load anchor "name" from "file"`: the file's rules become the anchor's."""
        self.advance()
        self.expect("anchor", "expected 'anchor'")
        path, wild, nt = self.anchor_name()
        if wild or not path:
            raise self.error(nt, "cannot load into a wildcard anchor")
        self.expect("from", "expected 'from'")
        ft = self.tok
        if ft.kind != "string":
            raise self.unexpected("expected a quoted file name")
        self.advance()
        if path in self.rs.defined_anchors:
            raise self.error(nt, f"anchor '{path}' already has rules")
        try:
            text = Path(ft.text).read_text()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not text"
            raise self.error(ft, f"cannot read anchor file '{ft.text}': {why}") from None
        sub = _Parser(text, ft.text, path, self.rs.tables, self.ifaddrs)
        sub.targets = self.targets
        sub.route_ok = self.route_ok
        sub.statements(None)
        graft(self.rs, sub.rs)

    def macro(self) -> None:
        name_tok = self.advance()
        name = name_tok.text
        if not name or not (name[0].isalpha()) or not all(c.isalnum() or c == "_" for c in name):
            raise self.error(name_tok, f"invalid macro name '{name}'")
        if name in KEYWORDS:
            raise self.error(name_tok, f"macro name '{name}' is a reserved keyword")
        self.expect("=")
        parts = []
        while self.tok.kind not in ("nl", "eof"):
            t = self.advance()
            parts.append(t.text)
        if not parts:
            raise self.unexpected("expected a macro value")
        self.macros[name] = " ".join(parts)

    def set_option(self) -> None:
        self.advance()
        t = self.word("option name")
        opt = t.text
        rs = self.rs
        if opt == "timeout":
            def one() -> None:
                nt = self.word("timeout name")
                if nt.text not in TIMEOUT_NAMES:
                    raise self.error(nt, f"unknown timeout '{nt.text}'")
                idx = TIMEOUT_NAMES[nt.text]
                rs.timeouts[idx] = self.number("timeout value")
                self._explicit_timeouts.add(idx)
            self.list_items(one, "timeout")
        elif opt == "limit":
            def one_limit() -> None:
                nt = self.word("limit name")
                if nt.text not in LIMIT_NAMES:
                    raise self.error(nt, f"unknown limit '{nt.text}'")
                rs.limits[nt.text] = self.number("limit value")
            self.list_items(one_limit, "limit")
            rs.limit_states = rs.limits["states"]
            if PFTM.ADAPTIVE_START not in self._explicit_timeouts \
                    and PFTM.ADAPTIVE_END not in self._explicit_timeouts:
                rs.timeouts[PFTM.ADAPTIVE_START] = rs.limit_states // 10 * 6
                rs.timeouts[PFTM.ADAPTIVE_END] = rs.limit_states // 10 * 12
        elif opt == "skip":
            self.expect("on", "expected 'on'")
            for name, neg in self.list_items(self.iface_item, "interface"):
                if neg or name is None:
                    raise self.error(t, "set skip needs interface names")
                rs.skip_ifaces.add(name)
        elif opt == "block-policy":
            v = self.word("drop or return")
            if v.text not in ("drop", "return"):
                raise self.error(v, f"block-policy must be drop or return, not '{v.text}'")
            rs.block_policy = v.text
        elif opt == "state-policy":
            v = self.word("if-bound or floating")
            if v.text not in ("if-bound", "floating"):
                raise self.error(v, f"state-policy must be if-bound or floating, not '{v.text}'")
            rs.state_policy = v.text
        elif opt == "hostid":
            rs.hostid = self.number("hostid", 1, 2**32 - 1)
        elif opt == "debug":
            v = self.word("debug level")
            if v.text not in DEBUG_LEVELS:
                raise self.error(v, f"unknown debug level '{v.text}'")
            rs.debug = v.text
        elif opt in ("optimization", "ruleset-optimization", "loginterface", "fingerprints",
                     "syncookies", "reassemble", "state-defaults", "require-order"):
            words = []
            while self.tok.kind not in ("nl", "eof"):
                words.append(self.advance().text)
            if not words:
                raise self.unexpected(f"expected a value for set {opt}")
            if opt == "reassemble" and (words[0] not in ("yes", "no") or len(words) > 2
                                        or words[1:] not in ([], ["no-df"])):
                raise self.error(t, "set reassemble: expected 'yes' or 'no' [no-df]")
            rs.options[opt] = " ".join(words)
        else:
            raise self.error(t, f"unknown set option '{opt}'")

    def table_name(self) -> tuple[str, Tok]:
        lt = self.expect("<", "expected '<table>'")
        nt = self.tok
        if nt.kind != "word":
            raise self.unexpected("expected a table name")
        self.advance()
        if not self.at(">"):
            raise self.unexpected("expected '>' after table name")
        self.advance()
        if len(nt.text) > 31:
            raise self.error(nt, f"table name '{nt.text}' too long")
        return nt.text, lt

    def table(self) -> None:
        self.advance()
        name, lt = self.table_name()
        if name in self._inherited:  # an anchor's own table hides the main one's
            self._inherited.discard(name)
            del self.rs.tables[name]
        if name in self.rs.tables and name not in self._auto_tables:
            raise self.error(lt, f"table <{name}> already defined")
        tbl = Table(name)
        while self.tok.kind == "word" and self.tok.text in ("persist", "const", "counters"):
            setattr(tbl, self.advance().text, True)
        items: list[tuple[int, int, int, bool]] = []
        tbl.defined = True
        tbl.init_addr = self.at("{") or (self.tok.kind == "word" and self.tok.text == "file")
        if self.at("{"):
            def entry() -> None:
                neg = self.accept("!")
                et = self.tok
                a = self.address(allow_table=False)
                if a.kind != "net":
                    raise self.error(et, "table entries must be addresses")
                items.append((a.af, a.net, a.plen, neg))
            if self.peek2().kind == "punct" and self.peek2().text == "}":
                self.advance()
                self.advance()
            else:
                self.list_items(entry, "table")
        elif self.tok.kind == "word" and self.tok.text == "file":
            self.advance()
            ft = self.tok
            if ft.kind != "string":
                raise self.unexpected("expected a quoted file name")
            self.advance()
            items.extend(self._table_file(ft))
        tbl.add_many(items)
        old = self.rs.tables.get(name)
        if old is not None:  # auto-created by an earlier rule: fill it in place
            old.persist, old.const, old.counters = tbl.persist, tbl.const, tbl.counters
            old.init_addr, old.defined = tbl.init_addr, True
            old.add_many(items)
            self._auto_tables.discard(name)
        else:
            self.rs.tables[name] = tbl

    def _table_file(self, ft: Tok) -> list[tuple[int, int, int, bool]]:
        try:
            text = Path(ft.text).read_text()
        except OSError as e:
            raise self.error(ft, f"cannot read table file '{ft.text}': {e.strerror}") from None
        out: list[tuple[int, int, int, bool]] = []
        for word in " ".join(ln.split("#", 1)[0] for ln in text.splitlines()).split():
            neg = word.startswith("!")
            word = word.lstrip("!")
            addr, _, plen_s = word.partition("/")
            try:
                ip = ipaddress.ip_address(addr)
                bits = ip.max_prefixlen
                plen = int(plen_s) if _isdec(plen_s) else -1 if plen_s else bits
                if not 0 <= plen <= bits:
                    raise ValueError
            except ValueError:
                raise self.error(ft, f"bad address '{word}' in table file") from None
            af = AF_INET if ip.version == 4 else AF_INET6
            out.append((af, int(ip), plen, neg))
        return out

    # -- rule pieces --
    def iface_item(self) -> tuple[str | None, bool]:
        neg = self.accept("!")
        t = self.tok
        if t.kind not in ("word", "string") or (t.kind == "word" and t.text in KEYWORDS
                                                  and t.text != "any"):
            raise self.unexpected("expected an interface name")
        self.advance()
        if t.text == "any":
            if neg:
                raise self.error(t, "'! any' is not a valid interface")
            return (None, False)
        if len(t.text) >= 16:
            raise self.error(t, f"interface name '{t.text}' too long")
        if not t.text or any(c.isspace() or c in "{}()!,;\"'#$<>" for c in t.text):
            raise self.error(t, f"invalid interface name '{t.text}'")
        return (t.text, neg)

    def proto_item(self) -> tuple[int, Tok]:
        t = self.tok
        if t.kind not in ("word", "string"):
            raise self.unexpected("expected a protocol")
        self.advance()
        if _isdec(t.text):
            p = int(t.text)
            if p > 255:
                raise self.error(t, f"protocol number {p} out of range (0-255)")
            return (p, t)
        if t.text not in PROTOCOLS:
            raise self.error(t, f"unknown protocol '{t.text}'")
        return (PROTOCOLS[t.text], t)

    def address(self, allow_table: bool = True) -> Addr:
        """A host, network or table (no negation)."""
        t = self.tok
        if self.at("<"):
            if not allow_table:
                raise self.error(t, "tables cannot be nested")
            name, _lt = self.table_name()
            tbl = self.rs.tables.get(name)
            if tbl is None:  # pfctl creates a referenced table that was never defined
                tbl = Table(name)
                self.rs.tables[name] = tbl
                self._auto_tables.add(name)
            tbl.referenced = True  # pf keeps an unreferenced table only if it is persist
            return Addr("table", table=tbl)
        if t.kind not in ("word", "string"):
            raise self.unexpected("expected an address")
        self.advance()
        if t.text == "any":
            return Addr()
        try:
            ip = ipaddress.ip_address(t.text)
        except ValueError:
            if t.kind == "word" and t.text in KEYWORDS:
                raise self.error(t, f"unexpected '{t.text}', expected an address") from None
            raise self.error(t, f"invalid address '{t.text}'") from None
        bits: int = ip.max_prefixlen
        plen = bits
        if self.at("/"):
            self.advance()
            pt = self.tok
            if pt.kind in ("nl", "eof"):
                raise self.error(t, f"missing netmask after '{t.text}/'")
            if pt.kind != "word" or not _isdec(pt.text) or int(pt.text) > bits:
                raise self.error(pt, f"invalid netmask '{pt.text}' for {t.text}")
            self.advance()
            plen = int(pt.text)
        af = AF_INET if ip.version == 4 else AF_INET6
        return Addr("net", af=af, net=int(ip), plen=plen)

    def host_item(self) -> list[_Host]:
        """One written address; an interface name (`em0`, `em0:network`, `self`) stands
        for its addresses at load time, so it may give several (pfctl's host_if)."""
        t = self.tok
        neg = self.accept("!")
        if neg and self.at("{"):
            raise self.error(self.tok, "a list cannot be negated; negate its entries")
        at = self.tok
        if self.at("("):
            out = [self.dynaddr()]
        elif at.kind in ("word", "string") and at.text in ("self", "urpf-failed", "no-route"):
            self.advance()
            out = self.special_addr(at)
        elif at.kind in ("word", "string") and self._is_ifname(at.text):
            self.advance()
            out = self.iface_addrs(at)
        else:
            out = [self.address()]
        for a in out:
            a.neg = neg
        return [_Host(a, t) for a in out]

    def hosts(self) -> list[_Host]:
        if self.at("!") and self.peek2().kind == "punct" and self.peek2().text == "{":
            raise self.error(self.peek2(), "a list cannot be negated; negate its entries")
        return [h for group in self.list_items(self.host_item, "address") for h in group]

    def _is_ifname(self, text: str) -> bool:
        """A word naming one of the host's interfaces (with pfctl's modifiers)."""
        name = text.split(":", 1)[0]
        return bool(name) and name != "self" and self.ifaddrs.known(name) and all(
            m in ("network", "broadcast", "peer", "0") for m in text.split(":")[1:])

    def _modifiers(self, t: Tok, text: str) -> tuple[str, str, bool]:
        """`name[:network|:broadcast|:peer][:0]` -> (name, mode, noalias), pfctl's errors."""
        name, *mods = text.split(":")
        mode = ""
        noalias = False
        for m in mods:
            if m == "0":
                noalias = True
            elif m in ("network", "broadcast", "peer"):
                if mode:
                    raise self.error(t, "illegal combination of interface modifiers")
                mode = m
            else:
                raise self.error(t, f"interface {text} has bad modifier")
        if not name or len(name) >= 16 or any(
                c.isspace() or c in "{}()!,;\"'#$<>/" for c in name):
            raise self.error(t, f"invalid interface name '{name}'")
        return name, mode, noalias

    def dynaddr(self) -> Addr:
        """`(if[:mod][:0])`: the interface's addresses, followed as they change."""
        self.advance()
        it = self.tok
        if it.kind not in ("word", "string"):
            raise self.unexpected("expected an interface name")
        self.advance()
        name, mode, noalias = self._modifiers(it, it.text)
        self.expect(")", "expected ')' after the interface name")
        return Addr("dyn", dyn=self.ifaddrs.dyn(name, mode, noalias))

    def special_addr(self, t: Tok) -> list[Addr]:
        if t.text == "self":  # every address of the host, as of the load (pfctl)
            return self.iface_addrs(t)
        if self.rs.urpf is None:
            self.rs.urpf = UrpfCheck(self.ifaddrs, True)
            self._noroute = UrpfCheck(self.ifaddrs, False)
        return [Addr("urpf" if t.text == "urpf-failed" else "noroute",
                     dyn=self.rs.urpf if t.text == "urpf-failed" else self._noroute)]

    def iface_addrs(self, t: Tok) -> list[Addr]:
        """`em0`, `em0:network`, `self`...: the addresses now, one Addr each (host_if)."""
        name, mode, noalias = self._modifiers(t, t.text)
        out: list[Addr] = []
        seen: set[int] = set()
        bits: dict[int, int] = {AF_INET: 32, AF_INET6: 128}
        for a in self.ifaddrs.get(name):
            if noalias:
                if a.af in seen:
                    continue
                seen.add(a.af)
            if mode == "network":
                if is_link_local(a.af, a.addr):
                    continue  # one fe80::/64 on every link: without a scope it means all
                out.append(Addr("net", af=a.af, net=a.addr, plen=a.plen))
            elif mode in ("broadcast", "peer"):
                v = a.broadcast if mode == "broadcast" else a.peer
                if v is not None:
                    out.append(Addr("net", af=a.af, net=v, plen=bits[a.af]))
            else:
                out.append(Addr("net", af=a.af, net=a.addr, plen=bits[a.af]))
        if not out:
            raise self.error(t, f"no IP address found for {t.text}")
        return out

    def port_value(self, t: Tok, text: str) -> int:
        if _isdec(text):
            v = int(text)
            if v > 65535:
                raise self.error(t, f"illegal port value {v}")
            return v
        if not text:
            raise self.error(t, "missing port number")
        if t.kind == "word" and text in KEYWORDS:
            raise self.error(t, f"unexpected '{text}', expected a port")
        port = SERVICES.get((text, "tcp"), SERVICES.get((text, "udp")))
        if port is None:
            raise self.error(t, f"unknown port '{text}'")
        return port

    def port_item(self) -> _Port:
        t = self.tok
        unary = {"=": PF_OP_EQ, "!=": PF_OP_NE, "<": PF_OP_LT, "<=": PF_OP_LE,
                 ">": PF_OP_GT, ">=": PF_OP_GE}
        if t.kind == "punct" and t.text in unary:
            self.advance()
            vt = self.tok
            if vt.kind not in ("word", "string"):
                raise self.unexpected("expected a port")
            self.advance()
            return _Port((unary[t.text], self.port_value(vt, vt.text), 0), t)
        if t.kind not in ("word", "string"):
            raise self.unexpected("expected a port")
        self.advance()
        if t.kind == "word" and ":" in t.text:
            lo_s, _, hi_s = t.text.partition(":")
            lo = self.port_value(t, lo_s)
            hi = self.port_value(t, hi_s)
            if lo > hi:
                raise self.error(t, f"invalid port range {t.text}")
            return _Port((PF_OP_RRG, lo, hi), t)
        a1 = self.port_value(t, t.text)
        if self.tok.kind == "punct" and self.tok.text in ("><", "<>"):
            op_t = self.advance()
            vt = self.tok
            if vt.kind not in ("word", "string"):
                raise self.unexpected("expected a port")
            self.advance()
            a2 = self.port_value(vt, vt.text)
            if a1 > a2:
                raise self.error(t, f"invalid port range {a1} {op_t.text} {a2}")
            return _Port((PF_OP_IRG if op_t.text == "><" else PF_OP_XRG, a1, a2), t)
        return _Port((PF_OP_EQ, a1, 0), t)

    def ipportspec(self, kw: Tok) -> tuple[list[_Host], list[_Port]]:
        hosts: list[_Host] = []
        ports: list[_Port] = []
        if self.tok.kind in ("nl", "eof") or (self.tok.kind == "word" and self.tok.text in (
                "to", "flags", "keep", "no", "modulate", "synproxy", "label", "icmp-type",
                "icmp6-type")):
            raise self.error(self.tok, f"missing address after '{kw.text}'")
        if not self.at("port"):
            hosts = self.hosts()
            if kw.text == "to":
                for h in hosts:
                    if h.addr.kind == "urpf":
                        raise self.error(h.tok, '"urpf-failed" is not permitted in a '
                                         "destination address")
        if self.accept("port"):
            ports = self.list_items(self.port_item, "port")
        return hosts, ports

    def flags_spec(self, spec: _RuleSpec) -> None:
        ft = self.advance()
        if spec.flags is not None:
            raise self.error(ft, "flags already specified")
        spec.flags_tok = ft
        if self.tok.kind == "word" and self.tok.text == "any":
            self.advance()
            spec.flags = (0, 0)
            return

        def letters(t: Tok) -> int:
            v = 0
            for c in t.text:
                if c not in TCP_FLAG_LETTERS:
                    raise self.error(t, f"bad flags '{t.text}'")
                v |= 1 << TCP_FLAG_LETTERS.index(c)
            return v

        f = 0
        if self.tok.kind == "word":
            f = letters(self.advance())
        if not self.at("/"):
            raise self.unexpected("expected flags as <set>/<mask> or 'any'")
        self.advance()
        if self.tok.kind != "word":
            raise self.unexpected("expected flag mask")
        mask = letters(self.advance())
        if f & ~mask:
            raise self.error(ft, "flags always false: set flags outside the mask")
        spec.flags = (f, mask)

    def icmp_spec(self, spec: _RuleSpec) -> None:
        kw = self.advance()
        if spec.icmp_kw is not None:
            raise self.error(kw, "icmp type already specified")
        spec.icmp_kw = kw.text
        spec.icmp_tok = kw
        names = ICMP6_TYPES if kw.text == "icmp6-type" else ICMP_TYPES

        def item() -> tuple[int, int | None]:
            t = self.tok
            if t.kind not in ("word", "string"):
                raise self.unexpected("expected an icmp type")
            self.advance()
            if _isdec(t.text):
                ty = int(t.text)
                if ty > 255:
                    raise self.error(t, f"icmp type {ty} out of range (0-255)")
            elif t.text in names:
                ty = names[t.text]
            else:
                raise self.error(t, f"unknown {kw.text} '{t.text}'")
            code = None
            if self.accept("code"):
                ct = self.tok
                if ct.kind == "word" and ct.text in ICMP_CODES:
                    self.advance()
                    code = ICMP_CODES[ct.text]
                else:
                    code = self.number("icmp code", 0, 255)
            return (ty, code)

        spec.icmp = self.list_items(item, "icmp type")

    def srctrack_opt(self, spec: _RuleSpec, t: Tok, seen: set[str]) -> None:
        """One of max-src-*, overload, source-track (pf.conf(5) STATEFUL TRACKING)."""
        if t.text in seen:
            raise self.error(t, f"state option '{t.text}' multiple definitions")
        seen.add(t.text)
        st = spec.srctrack
        if st is None:
            st = spec.srctrack = SrcTrack()
        if t.text == "source-track":
            st.scope_written = True
            if self.tok.kind == "word" and self.tok.text in ("rule", "global"):
                st.rule_scope = self.advance().text == "rule"
        elif t.text == "max-src-nodes":
            st.max_nodes = self.number("max-src-nodes", 1)
        elif t.text == "max-src-states":
            st.max_states = self.number("max-src-states", 1)
        elif t.text == "max-src-conn":
            st.max_conn = self.number("max-src-conn", 1)
        elif t.text == "max-src-conn-rate":
            st.rate_limit = self.number("max-src-conn-rate limit", 1)
            self.expect("/", "expected '/' in max-src-conn-rate N/S")
            st.rate_seconds = self.number("max-src-conn-rate seconds", 1)
        else:  # overload <table> [flush [global]]
            name, lt = self.table_name()
            tbl = self.rs.tables.get(name)
            if tbl is None:  # created as pf creates an overload table it has not seen
                tbl = Table(name)
                self.rs.tables[name] = tbl
                self._auto_tables.add(name)
            if tbl.const:
                raise self.error(lt, f"overload table <{name}> is const")
            st.overload = tbl
            tbl.referenced = True  # listed by `ctl tables` and kept by a reload, as pf
            if self.tok.kind == "word" and self.tok.text == "flush":
                self.advance()
                st.flush = True
                if self.tok.kind == "word" and self.tok.text == "global":
                    self.advance()
                    st.flush_global = True
        if st.scope_written and not st.rule_scope:
            for opt, val in (("max-src-nodes", st.max_nodes), ("max-src-conn", st.max_conn),
                             ("max-src-conn-rate", st.rate_limit)):
                if val:
                    raise self.error(t, f"'{opt}' is incompatible with 'source-track global'")

    def state_opts(self, spec: _RuleSpec) -> None:
        open_tok = self.advance()
        seen: set[str] = set()

        def one() -> None:
            t = self.tok
            if t.kind != "word":
                raise self.unexpected("expected a state option")
            self.advance()
            if t.text == "max":
                spec.max_states = self.number("max states", 1)
            elif t.text in SRCTRACK_OPTS:
                self.srctrack_opt(spec, t, seen)
            elif t.text in STATE_FLAGS_OPTS:
                if t.text == "no-sync":
                    spec.no_sync = True
                elif t.text == "sloppy":
                    spec.sloppy = True
                elif t.text == "pflow":
                    spec.pflow = True
                else:
                    spec.if_bound = t.text == "if-bound"
            elif t.text in TIMEOUT_NAMES:
                if t.text in ("interval", "frag", "src.track"):
                    raise self.error(t, f"timeout '{t.text}' cannot be set per rule")
                spec.timeouts[TIMEOUT_NAMES[t.text]] = self.number("timeout value")
            else:
                raise self.error(t, f"unknown state option '{t.text}'")

        while True:
            self.skip_nl()
            if self.tok.kind == "eof":
                raise self.error(open_tok, "unterminated state option list (missing ')')")
            one()
            self.skip_nl()
            if self.tok.kind == "eof":
                raise self.error(open_tok, "unterminated state option list (missing ')')")
            if self.accept(")"):
                break
            if not self.accept(","):
                raise self.unexpected("expected ',' or ')'")
        st = spec.srctrack
        if st is not None and not st.scope_written:
            # pfctl: max-src-nodes, max-src-conn and max-src-conn-rate track per rule
            st.rule_scope = bool(st.max_nodes or st.max_conn or st.rate_limit)

    def rule(self) -> None:
        spec = _RuleSpec()
        at = self.advance()
        spec.tok = at
        spec.action = at.text
        legacy = at.text == "scrub"  # an old `scrub` rule: a match rule with scrub options
        if legacy:
            spec.action = "match"
        wild = False
        if at.text == "anchor":
            spec.anchor, wild, _nt = self.anchor_name()
            if not spec.anchor and not wild:
                raise self.error(_nt, "invalid anchor name")
        if at.text == "block" and self.tok.kind == "word" and self.tok.text in (
                "drop", "return", "return-rst", "return-icmp", "return-icmp6"):
            mt = self.advance()
            spec.return_mode = mt.text
            if self.at("(") and mt.text in ("return-icmp", "return-icmp6"):
                self.return_codes(spec, mt)
            elif self.at("("):
                raise self.unexpected("return options are not supported")
        if self.accept("in"):
            spec.direction = PF_IN
        elif self.accept("out"):
            spec.direction = PF_OUT
        if self.accept("log"):
            spec.log = True
            if self.at("("):
                self.advance()
                while True:
                    lt = self.word("log option")
                    if lt.text == "all":
                        spec.log_all = True
                    elif lt.text not in ("matches", "user"):
                        raise self.error(lt, f"unknown log option '{lt.text}'")
                    if self.accept(")"):
                        break
                    self.expect(",", "expected ',' or ')'")
        if self.accept("quick"):
            spec.quick = True
        if self.accept("on"):
            if self.at("!") and self.peek2().kind == "punct" and self.peek2().text == "{":
                raise self.error(self.peek2(), "a list cannot be negated; negate its entries")
            spec.ifaces = self.list_items(self.iface_item, "interface")
        if self.tok.kind == "word" and self.tok.text in ROUTE_OPTS:
            self.route_opt(spec)
        if self.at("inet") or self.at("inet6"):
            spec.af_tok = self.advance()
            spec.af = AF_INET if spec.af_tok.text == "inet" else AF_INET6
        if self.accept("proto"):
            spec.protos = self.list_items(self.proto_item, "protocol")
        if self.accept("all"):
            pass
        else:
            if self.at("from"):
                kw = self.advance()
                spec.src, spec.sports = self.ipportspec(kw)
            if self.at("to"):
                kw = self.advance()
                spec.dst, spec.dports = self.ipportspec(kw)
        if legacy:
            spec.scrub = self.scrub_opts(False)
        while self.tok.kind == "word" or (self.at("!") and self.peek2().kind == "word"
                                          and self.peek2().text == "tagged"):
            t = self.tok
            if t.text == "flags":
                self.flags_spec(spec)
            elif t.text in ("icmp-type", "icmp6-type"):
                self.icmp_spec(spec)
            elif t.text in ("keep", "modulate", "synproxy", "no"):
                if spec.state is not None:
                    raise self.error(t, "state already specified")
                self.advance()
                st = self.expect("state", "expected 'state'")
                spec.state = t.text
                spec.state_tok = t
                if t.text != "no" and self.at("("):
                    self.state_opts(spec)
                del st
            elif t.text == "label":
                self.advance()
                lt = self.tok
                if lt.kind not in ("string", "word"):
                    raise self.unexpected("expected a label string")
                self.advance()
                if len(lt.text) >= 64:
                    raise self.error(lt, "label too long (max 63 characters)")
                spec.label = lt.text
            elif t.text in ("nat-to", "binat-to"):
                if spec.nat is not None:
                    raise self.error(t, "cannot respecify nat-to/binat-to")
                self.advance()
                spec.nat = self.pool_spec(t)
                spec.binat = t.text == "binat-to"
            elif t.text == "rdr-to":
                if spec.rdr is not None:
                    raise self.error(t, "cannot respecify rdr-to")
                self.advance()
                spec.rdr = self.pool_spec(t)
            elif t.text == "scrub":
                if spec.scrub is not None:
                    raise self.error(t, "cannot respecify scrub")
                self.advance()
                spec.scrub = self.scrub_opts(True)
            elif t.text == "tag":
                spec.tag = self.tag_word(spec.tag, self.advance())
            elif t.text == "tagged":
                spec.match_tag = self.tag_word(spec.match_tag, self.advance())
            elif t.text in ROUTE_OPTS:
                self.route_opt(spec)
            elif t.text in UNSUPPORTED_OPTS:
                raise self.error(t, f"'{t.text}' is not supported")
            elif t.text in POOL_WORDS:
                raise self.error(t, f"'{t.text}' only follows a nat-to, rdr-to or binat-to "
                                 "address")
            elif t.text in ("from", "to", "all", "port"):
                raise self.error(t, f"'{t.text}' is out of place")
            elif t.text == "!":
                bang = self.advance()
                self.advance()
                spec.match_tag = self.tag_word(spec.match_tag, bang)
                spec.match_tag_not = True
            else:
                break
        open_tok = self.tok if self.at("{") else None
        if open_tok is not None and spec.action != "anchor":
            raise self.unexpected()
        if spec.anchor is not None:
            self.anchor_rule(spec, wild)
        self.expand(spec)
        if open_tok is not None:
            assert spec.anchor is not None
            if wild:
                raise self.error(open_tok, "a wildcard anchor cannot have inline rules")
            self.advance()
            self.inline_anchor(spec.anchor, open_tok)

    def route_opt(self, spec: _RuleSpec) -> None:
        """`route-to`/`reply-to` TARGET | { TARGET, ... } [round-robin], TARGET being
        `(if gateway)` or `if` (docs/route-to.md says what Linux allows)."""
        kw = self.advance()
        kind = ROUTE_OPTS[kw.text]
        if spec.route is not None:
            raise self.error(kw, "route-to, reply-to and dup-to are exclusive, and written once")
        if not self.route_ok:
            raise self.error(kw, f"'{kw.text}' in an anchor loaded at run time is not "
                             "supported: route targets are installed when the daemon starts; "
                             "write the rule in the main ruleset")
        targets = self.list_items(self.route_target, "route target")
        if len({t.ident for t in targets}) != len(targets):
            raise self.error(kw, "a route target is listed twice")
        if kind == RT_DUPTO and any(t.addr is None for t in targets):
            raise self.error(kw, "dup-to needs a gateway, '(if address)': Linux sends the "
                             "copy with TEE, which routes it to an address")
        for t in targets:
            t.dup = t.dup or kind == RT_DUPTO
        if self.accept("round-robin"):
            pass
        elif self.tok.kind == "word" and self.tok.text in POOL_WORDS:
            raise self.error(self.tok, f"'{self.tok.text}' is not supported for {kw.text}: "
                             "its targets are used round-robin")
        spec.route = RoutePool(kind, targets)
        spec.route_tok = kw

    def route_target(self) -> RouteTarget:
        paren = self.accept("(")
        it = self.tok
        if it.kind != "word" or it.text in KEYWORDS or it.text[:1].isdigit() or ":" in it.text:
            raise self.unexpected("expected an interface name")
        self.advance()
        addr: bytes | None = None
        af = AF_INET
        if paren and not self.at(")"):
            at = self.tok
            if at.kind != "word":
                raise self.unexpected("expected a gateway address")
            self.advance()
            for fam in (AF_INET, AF_INET6):
                try:
                    addr, af = socket.inet_pton(fam, at.text), fam
                    break
                except OSError:
                    continue
            else:
                raise self.error(at, f"invalid gateway address '{at.text}' (a single "
                                 "address: the next hop)")
        if paren:
            self.expect(")", "expected ')'")
        key = (it.text, addr)
        t = self.targets.get(key)
        if t is None:
            if len(self.targets) >= MAX_TARGETS:
                raise self.error(it, f"too many route targets (at most {MAX_TARGETS})")
            t = RouteTarget(it.text, addr, af)
            t.index = len(self.targets)
            self.targets[key] = t
        return t

    def tag_word(self, had: int, kw: Tok) -> int:
        if had:
            raise self.error(kw, "tag already specified")
        t = self.tok
        if t.kind not in ("word", "string") or (t.kind == "word" and t.text in KEYWORDS):
            raise self.unexpected("expected a tag name")
        self.advance()
        try:
            return tag_id(t.text)
        except TagError as e:
            raise self.error(t, str(e)) from None

    def anchor_rule(self, spec: _RuleSpec, wild: bool) -> None:
        """What an anchor rule cannot carry: state, translation, block modes."""
        assert spec.tok is not None
        if spec.state is not None:
            raise self.error(spec.state_tok or spec.tok, "anchor rules cannot keep state")
        if spec.nat is not None or spec.rdr is not None:
            raise self.error((spec.nat or spec.rdr).tok,  # type: ignore[union-attr]
                             "anchor rules cannot translate")
        self.rs.anchor(spec.anchor or "")  # made now, so a later runtime load finds it
        spec.anchor_wild = wild

    def antispoof(self) -> None:
        """`antispoof [log] [quick] for IF|{IF ..} [inet|inet6] [label "s"]`, expanded as
        pfctl does: per interface `block drop in on ! IF from IF's networks`, and unless
        it is the loopback `block drop in from IF's own addresses` (pf.conf(5)).
        IPv6 link-local networks are left out: without a scope fe80::/64 is every link."""
        at = self.advance()
        spec = _RuleSpec(action="block", tok=at, return_mode="drop", direction=PF_IN)
        if self.accept("log"):
            spec.log = True
        if self.accept("quick"):
            spec.quick = True
        self.expect("for", "expected 'for'")

        def iface() -> tuple[Tok, bool]:
            dynamic = self.accept("(")  # `(em0)`: the addresses followed, as pfctl's
            t = self.tok
            if t.kind not in ("word", "string") or t.text in KEYWORDS:
                raise self.unexpected("expected an interface name")
            self.advance()
            self._modifiers(t, t.text)
            if ":" in t.text:
                raise self.error(t, f"invalid interface name '{t.text}'")
            if dynamic:
                self.expect(")", "expected ')' after the interface name")
            elif not self.ifaddrs.known(t.text) or t.text == "self":
                raise self.error(t, f"no IP address found for {t.text}")
            return t, dynamic
        names = self.list_items(iface, "interface")
        if self.at("inet") or self.at("inet6"):
            spec.af_tok = self.advance()
            spec.af = AF_INET if spec.af_tok.text == "inet" else AF_INET6
        if self.accept("label"):
            lt = self.tok
            if lt.kind not in ("string", "word"):
                raise self.unexpected("expected a label string")
            self.advance()
            spec.label = lt.text
        for t, dynamic in names:
            if dynamic:  # pfctl: `from (IF:network)` on ! IF, `from (IF)` anywhere
                self.expand(_RuleSpec(**{**spec.__dict__, "ifaces": [(t.text, True)], "src": [
                    _Host(Addr("dyn", dyn=self.ifaddrs.dyn(t.text, "network")), t)]}))
                if t.text not in ("lo", "lo0"):
                    self.expand(_RuleSpec(**{**spec.__dict__, "src": [
                        _Host(Addr("dyn", dyn=self.ifaddrs.dyn(t.text)), t)]}))
                continue
            addrs = [a for a in self.ifaddrs.get(t.text) if not spec.af or a.af == spec.af]
            nets = [_Host(Addr("net", af=a.af, net=a.addr, plen=a.plen), t) for a in addrs
                    if not is_link_local(a.af, a.addr)]
            if nets:
                self.expand(_RuleSpec(**{**spec.__dict__, "ifaces": [(t.text, True)],
                                         "src": nets}))
            if t.text not in ("lo", "lo0") and addrs:
                bits: dict[int, int] = {AF_INET: 32, AF_INET6: 128}
                own = [_Host(Addr("net", af=a.af, net=a.addr, plen=bits[a.af]), t)
                       for a in addrs]
                self.expand(_RuleSpec(**{**spec.__dict__, "src": own}))

    def return_codes(self, spec: _RuleSpec, mt: Tok) -> None:
        """`return-icmp(code[, code6])`, `return-icmp6(code6)`: unreachable codes by name
        (pfctl's icmp_code / icmp6_code of type unreach) or number."""
        self.advance()

        def code(v6: bool) -> int:
            t = self.tok
            if t.kind not in ("word", "string"):
                raise self.unexpected("expected an icmp code")
            self.advance()
            if _isdec(t.text):
                n = int(t.text)
                if n > 255:
                    raise self.error(t, f"illegal icmp{'6' if v6 else ''}-code {n}")
                return n
            names = ICMP6_UNREACH_CODES if v6 else ICMP_UNREACH_CODES
            if t.text not in names:
                raise self.error(t, f"unknown icmp{'6' if v6 else ''} code {t.text}")
            return names[t.text]
        if mt.text == "return-icmp6":
            spec.return_icmp6 = code(True)
        else:
            spec.return_icmp = code(False)
            if self.accept(","):
                spec.return_icmp6 = code(True)
        self.expect(")", "expected ')'")

    # -- FreeBSD translation rules (pfctl -sn) --
    def translation_rule(self) -> None:
        """`[no] nat|rdr|binat [pass] [log] [on if] [af] [proto] from .. to .. [-> pool]`.

        They go to Ruleset.translation_rules, not the filter list: FreeBSD looks them up
        before the filter rules (Ruleset.translate_lookup).
        """
        spec = _RuleSpec()
        first = self.tok
        if first.text == "no":
            self.advance()
            spec.no_xlate = True
        at = self.advance()
        spec.tok, spec.action = first, at.text
        if self.at("pass"):
            pt = self.advance()
            if spec.no_xlate:
                raise self.error(pt, '"pass" not valid with "no"')
            spec.natpass = True
        if self.accept("log"):
            spec.log = True
            if self.at("("):
                self.advance()
                lt = self.word("log option")
                if lt.text != "all":
                    raise self.error(lt, f"unknown log option '{lt.text}'")
                spec.log_all = True
                self.expect(")", "expected ')'")
        if self.at("in") or self.at("out") or self.at("quick"):
            raise self.error(self.tok, f"'{self.tok.text}' is not valid on a {at.text} rule")
        if self.accept("on"):
            spec.ifaces = self.list_items(self.iface_item, "interface")
        if self.at("inet") or self.at("inet6"):
            spec.af_tok = self.advance()
            spec.af = AF_INET if spec.af_tok.text == "inet" else AF_INET6
        if self.accept("proto"):
            spec.protos = self.list_items(self.proto_item, "protocol")
        if at.text == "binat":
            kw = self.expect("from", "expected 'from'")
            spec.src = self.hosts()
            if self.at("to"):
                self.advance()
                spec.dst = self.hosts()
            del kw
        elif not self.accept("all"):
            if self.at("from"):
                kw = self.advance()
                spec.src, spec.sports = self.ipportspec(kw)
            if self.at("to"):
                kw = self.advance()
                spec.dst, spec.dports = self.ipportspec(kw)
        if self.tok.kind == "word" and self.tok.text in UNSUPPORTED_OPTS:
            raise self.error(self.tok, f"'{self.tok.text}' is not supported")
        arrow = None
        if self.at("-"):
            arrow = self.advance()
            if not self.at(">"):
                raise self.unexpected("expected '->'")
            self.advance()
            spec.nat = self.pool_spec(arrow)
        if spec.no_xlate and arrow is not None:
            raise self.error(arrow, f"'no {at.text}' rule does not need '->'")
        if not spec.no_xlate and arrow is None:
            raise self.error(self.tok, f"'{at.text}' rule requires '-> address'")
        self.expand_translation(spec)

    def expand_translation(self, spec: _RuleSpec) -> None:
        assert spec.tok is not None
        action = spec.action
        role = {"nat": "nat", "rdr": "rdr", "binat": "binat"}[action]
        for ports in (spec.sports, spec.dports):
            if ports:
                for p, _t in spec.protos:
                    if p not in (IPPROTO_TCP, IPPROTO_UDP):
                        raise self.error(ports[0].tok, "port only applies to tcp/udp")
        ps = spec.nat
        if action == "rdr":
            for port in spec.dports:
                if port.spec[0] not in (PF_OP_EQ, PF_OP_RRG):
                    raise self.error(port.tok, "invalid port operator for rdr destination port")
            if ps is not None and ps.port is not None:
                for p, _t in spec.protos:
                    if p not in (IPPROTO_TCP, IPPROTO_UDP):
                        raise self.error(ps.port_tok or ps.tok,
                                         "rpool port only applies to tcp/udp")
        if action == "binat":
            self.check_binat(spec)
        for ifname, ifnot, proto, sh, sp, dh, dp, _ic, af in self.combinations(spec, False):
            r = Rule()
            r.line = spec.tok.line
            r.action = action
            r.natpass = spec.natpass
            r.log, r.log_all = spec.log, spec.log_all
            r.ifname, r.ifnot = ifname, ifnot
            r.proto = proto
            r.src, r.dst = sh.addr, dh.addr
            r.sport = sp.spec if sp else None
            r.dport = dp.spec if dp else None
            if ps is not None:
                pool, af = self.make_pool(ps, role if role != "binat" else "nat", af, dp, True)
                pool.role = role
                if action == "rdr":
                    r.rdr = pool
                else:
                    r.nat = pool
            if action == "binat" and not af:
                raise self.error(spec.tok, "address family (inet/inet6) undefined")
            r.af = af
            self.rs.translation_rules.append(r)

    def check_binat(self, spec: _RuleSpec) -> None:
        """FreeBSD's binatrule checks: one source, one redirect address, same netmask."""
        assert spec.tok is not None
        if len(spec.ifaces) > 1:
            raise self.error(spec.tok, "binat takes a single interface")
        if len(spec.protos) > 1:
            raise self.error(spec.protos[1][1] or spec.tok, "binat takes a single protocol")
        for hosts in (spec.src, spec.dst):
            if len(hosts) > 1:
                raise self.error(hosts[1].tok, "multiple binat ip addresses")
        src = spec.src[0]
        if src.addr.kind == "table":
            assert isinstance(src.addr.table, Table)
            raise self.error(src.tok, f"invalid use of table <{src.addr.table.name}> as the "
                             "source address of a binat rule")
        ps = spec.nat
        if ps is None:
            return
        if ps.table is not None or ps.ifname is not None:
            raise self.error(ps.tok, "binat rule must redirect to a single address")
        if len(ps.hosts) != 1:
            raise self.error(ps.hosts[1].tok if len(ps.hosts) > 1 else ps.tok,
                             "binat rule must redirect to a single address")
        if ps.port is not None or ps.opts != "none" or ps.sticky or ps.static_port:
            raise self.error(ps.port_tok or ps.opts_tok or ps.static_tok or ps.tok,
                             "binat rules take no port or pool options")
        ext = ps.hosts[0].addr
        if src.addr.kind == "net" and src.addr.af and src.addr.af != ext.af:
            raise self.error(ps.hosts[0].tok, "binat ip versions must match")
        if src.addr.kind == "net" and src.addr.plen and src.addr.plen != ext.plen:
            raise self.error(ps.hosts[0].tok, "'binat' source mask and redirect mask must "
                             "be the same")

    # -- translation pools --
    def pool_host(self) -> _Host:
        t = self.tok
        if self.at("!"):
            raise self.error(t, "a translation address cannot be negated")
        if t.kind == "word" and t.text not in KEYWORDS and not t.text[:1].isdigit() \
                and ":" not in t.text:
            raise self.error(t, f"invalid address '{t.text}' (an interface's address is "
                             f"written ({t.text}))")
        a = self.address()
        if a.kind == "any":
            raise self.error(t, "'any' is not a translation address")
        return _Host(a, t)

    def pool_spec(self, kw: Tok) -> _PoolSpec:
        """nat-to/rdr-to/binat-to/`->` target: address(es), `(if)` or `<table>`, `port`,
        then pool options (pfctl's redirpool and pool_opts)."""
        ps = _PoolSpec(kw)
        t = self.tok
        if t.kind in ("nl", "eof"):
            raise self.error(t, f"missing address after '{kw.text}'")
        if self.at("("):
            self.advance()
            it = self.tok
            if it.kind not in ("word", "string"):
                raise self.unexpected("expected an interface name")
            self.advance()
            name, colon, mod = it.text.partition(":")
            if colon and mod != "0":
                raise self.error(it, f"interface modifier ':{mod}' is not supported in a "
                                 "translation address")
            if not name or len(name) >= 16 or any(
                    c.isspace() or c in "{}()!,;\"'#$<>/" for c in name):
                raise self.error(it, f"invalid interface name '{name}'")
            self.expect(")", "expected ')' after the interface name")
            ps.ifname, ps.if_noalias = name, bool(colon)
        elif self.at("<"):
            a = self.address()
            assert isinstance(a.table, Table)
            ps.table = a.table
        elif self.at("{"):
            def item() -> _Host:
                if self.at("<") or self.at("("):
                    raise self.error(self.tok, "only addresses can be listed in a "
                                     "translation pool")
                return self.pool_host()
            ps.hosts = self.list_items(item, "address")
        else:
            ps.hosts = [self.pool_host()]
        if self.at("port"):
            self.advance()
            ps.port_tok = pt = self.tok
            if pt.kind not in ("word", "string"):
                raise self.unexpected("expected a port")
            self.advance()
            lo_s, colon, hi_s = pt.text.partition(":")
            lo = self.port_value(pt, lo_s)
            if colon and hi_s == "*":
                ps.port = (lo, lo, True)
            elif colon:
                hi = self.port_value(pt, hi_s)
                if lo > hi:
                    raise self.error(pt, f"invalid port range {pt.text}")
                ps.port = (lo, hi, False)
            else:
                ps.port = (lo, lo, False)
        while self.tok.kind == "word" and self.tok.text in POOL_WORDS:
            ot = self.advance()
            if ot.text == "static-port":
                if ps.static_port:
                    raise self.error(ot, "static-port cannot be redefined")
                ps.static_port, ps.static_tok = True, ot
            elif ot.text == "sticky-address":
                if ps.sticky:
                    raise self.error(ot, "sticky-address cannot be redefined")
                ps.sticky = True
            elif ot.text == "least-states":
                raise self.error(ot, "'least-states' is not supported")
            else:
                if ps.opts != "none":
                    raise self.error(ot, "pool type cannot be redefined")
                ps.opts, ps.opts_tok = ot.text, ot
                if ot.text == "source-hash":
                    ps.hash_key = self.hash_key()
        return ps

    def hash_key(self) -> bytes:
        """`source-hash` key: 0x and 32 hex digits, or any other string (its MD5)."""
        kt = self.tok
        if kt.kind == "string" or (kt.kind == "word" and kt.text not in KEYWORDS
                                   and kt.text not in UNSUPPORTED_OPTS
                                   and kt.text not in ROUTE_OPTS):
            self.advance()
            if kt.text[:2] == "0x":
                if len(kt.text) != 34:
                    raise self.error(kt, "hex key must be 128 bits (32 hex digits) long")
                try:
                    return bytes.fromhex(kt.text[2:])
                except ValueError:
                    raise self.error(kt, "invalid hex key") from None
            return hashlib.md5(kt.text.encode()).digest()
        return b""

    # -- expansion (pfctl's expand_rule) --
    def expand(self, spec: _RuleSpec) -> None:
        assert spec.tok is not None
        if spec.action in ("block", "match") and spec.state not in (None, "no"):
            raise self.error(spec.state_tok or spec.tok,
                             f"keep state on {spec.action} rules doesn't make sense")
        self.check_translation(spec)
        keep = spec.action == "pass" and spec.state != "no"
        state_type = (spec.state if spec.state in ("keep", "modulate", "synproxy") else
                      "keep") if keep else None
        if spec.route is not None:
            self.check_route(spec)
        if not keep and (spec.max_states or spec.timeouts or spec.srctrack):
            raise self.error(spec.state_tok or spec.tok, "state options need a stateful rule")
        if spec.icmp_kw is not None:
            want = IPPROTO_ICMPV6 if spec.icmp_kw == "icmp6-type" else IPPROTO_ICMP
            for p, _t in spec.protos:
                if p != want:
                    assert spec.icmp_tok is not None
                    raise self.error(spec.icmp_tok, f"{spec.icmp_kw} only applies to proto "
                                     f"{'icmp6' if want == IPPROTO_ICMPV6 else 'icmp'}")
            iaf = AF_INET6 if want == IPPROTO_ICMPV6 else AF_INET
            if spec.af and spec.af != iaf:
                assert spec.icmp_tok is not None
                raise self.error(spec.icmp_tok, f"{spec.icmp_kw} does not match address family")
        for ports in (spec.sports, spec.dports):
            if ports:
                for p, _t in spec.protos:
                    if p not in (IPPROTO_TCP, IPPROTO_UDP):
                        raise self.error(ports[0].tok, "port only applies to tcp/udp")
        if spec.flags is not None and spec.flags != (0, 0):
            for p, _pt in spec.protos:
                if p not in (0, IPPROTO_TCP):
                    raise self.error(spec.flags_tok or spec.tok, "flags only apply to tcp")

        for ifname, ifnot, proto, sh, sp, dh, dp, ic, af in self.combinations(spec, True):
            r = self.make_rule(spec, ifname, ifnot, af, proto, sh, sp, dh, dp, ic, keep,
                               state_type)
            self.translate(spec, r, sh, sp, dh, dp)

    def check_route(self, spec: _RuleSpec) -> None:
        """Linux routes a forwarded packet between PREROUTING and FORWARD: only the `in`
        test runs before that, so only `pass in` rules can choose the route."""
        assert spec.route is not None and spec.route_tok is not None
        word = spec.route_tok.text
        if spec.action != "pass":
            raise self.error(spec.route_tok, f"'{word}' only applies to pass rules")
        if spec.direction != PF_IN:
            raise self.error(spec.route_tok, f"'{word}' is supported on 'pass in' rules only: "
                             "Linux has routed a packet before the out test sees it (FORWARD), "
                             "so write it on the rule of the interface the packet comes in on")
        for t in spec.route.targets:
            if spec.af and t.addr is not None and t.af != spec.af:
                raise self.error(spec.route_tok, f"{word} gateway {t} does not match the "
                                 "rule's address family")

    def combinations(self, spec: _RuleSpec, filtering: bool) -> Iterator[tuple[Any, ...]]:
        """pfctl's expand_rule: each (interface, ifnot, proto, src, sport, dst, dport, icmp
        type, address family) of a rule whose addresses agree on a family (a filter rule's
        icmp/icmp6 also with it); the family-mismatch error when none does."""
        assert spec.tok is not None
        srcs = spec.src or [_Host(Addr(), spec.tok)]
        dsts = spec.dst or [_Host(Addr(), spec.tok)]
        sports: list[_Port | None] = list(spec.sports) or [None]
        dports: list[_Port | None] = list(spec.dports) or [None]
        icmps: list[tuple[int, int | None] | None] = \
            (list(spec.icmp) or [None]) if filtering else [None]
        made = 0
        bad: Tok | None = None
        for (ifname, ifnot), (proto, _pt), sh, sp, dh, dp, ic in itertools.product(
                spec.ifaces, spec.protos, srcs, sports, dsts, dports, icmps):
            af = spec.af
            ok = True
            for h in (sh, dh):
                if h.addr.af:
                    if af and af != h.addr.af:
                        ok = False
                        bad = bad or h.tok
                    af = af or h.addr.af
            if filtering and ((proto == IPPROTO_ICMP and af == AF_INET6)
                              or (proto == IPPROTO_ICMPV6 and af == AF_INET)):
                ok = False
                bad = bad or spec.af_tok or sh.tok
            if ok:
                made += 1
                yield ifname, ifnot, proto, sh, sp, dh, dp, ic, af
        if not made:
            raise self.error(bad or spec.tok, "address family mismatch: rule expands to no "
                             "valid combination")

    def check_translation(self, spec: _RuleSpec) -> None:
        """pfctl's rule_consistent and binat-to checks that do not depend on expansion."""
        nat, rdr = spec.nat, spec.rdr
        if nat is None and rdr is None:
            return
        if spec.action != "match" and (spec.action != "pass" or spec.state == "no"):
            raise self.error((nat or rdr).tok,  # type: ignore[union-attr]
                             "nat-to and rdr-to require keep state")
        direction = spec.direction
        if nat is not None and spec.binat:
            if direction != PF_INOUT:
                raise self.error(nat.tok, "binat-to cannot be specified with a direction")
            if rdr is not None:
                raise self.error(rdr.tok, "rdr-to cannot be combined with binat-to")
            if nat.table is not None or nat.ifname is not None or len(nat.hosts) != 1:
                raise self.error(nat.tok, "binat-to requires a single redirect address")
            if nat.port is not None:
                raise self.error(nat.port_tok or nat.tok, "binat-to does not take a port")
            direction = PF_OUT
        if nat is not None and direction != PF_OUT:
            raise self.error(nat.tok, "nat-to can only be used outbound")
        if rdr is not None and direction != PF_IN:
            raise self.error(rdr.tok, "rdr-to can only be used inbound")

    def make_pool(self, ps: _PoolSpec, role: str, af: int, dport: _Port | None,
                  freebsd: bool = False) -> tuple[Pool, int]:
        """One expanded rule's Pool (pfctl's collapse_redirspec + apply_redirspec), and the
        rule's address family, which a pool of addresses decides when the rule had none."""
        pool = Pool(role)
        if ps.hosts:
            fams = {h.addr.af for h in ps.hosts}
            if not af and len(fams) > 1:
                raise self.error(ps.tok, "translation spec contains addresses with "
                                 "different address families")
            af = af or ps.hosts[0].addr.af
            pool.addrs = [h.addr for h in ps.hosts if h.addr.af == af]
            if not pool.addrs:
                raise self.error(ps.hosts[0].tok, "af mismatch in translation spec")
        pool.ifname, pool.if_noalias, pool.table = ps.ifname, ps.if_noalias, ps.table
        pool.opts, pool.hash_key, pool.sticky = ps.opts, ps.hash_key, ps.sticky
        if pool.opts == "none" and (pool.table is not None or len(pool.addrs) > 1
                                    or pool.multi_addr()):
            pool.opts = "round-robin"
        dynamic = ("round-robin",) if freebsd else DYNAMIC_OPTS
        where = ps.opts_tok or ps.tok
        if pool.opts not in dynamic:
            if len(pool.addrs) > 1:
                raise self.error(where, "only round-robin valid for multiple redirection "
                                 "addresses" if freebsd else "pool type is not valid for "
                                 "multiple translation addresses")
            if pool.table is not None:
                raise self.error(where, "tables are only supported in round-robin "
                                 "redirection pools" if freebsd else
                                 "tables are not supported by pool type")
            if pool.multi_addr():
                raise self.error(where, f"interface ({pool.ifname}) is not supported by pool "
                                 "type" if not freebsd else f"interface ({pool.ifname}) is "
                                 "only supported in round-robin redirection pools")
        if ps.port is not None:
            lo, hi, star = ps.port
            if role == "rdr" and star:
                hi = lo
                if dport is not None and dport.spec[0] == PF_OP_RRG:
                    hi = lo + dport.spec[2] - dport.spec[1]
                    if hi > 65535:
                        raise self.error(ps.port_tok or ps.tok, "invalid rdr-to port range")
            pool.proxy_port = (lo, hi)
        if ps.static_port:
            if role != "nat":
                raise self.error(ps.static_tok or ps.tok, "the 'static-port' option is only "
                                 "valid with nat rules")
            lo, hi = pool.proxy_port
            if ps.port is not None and lo != Pool.DEFAULT_NAT_PORTS[0] \
                    and hi != Pool.DEFAULT_NAT_PORTS[1]:
                raise self.error(ps.static_tok or ps.tok, "the 'static-port' option can't be "
                                 "used when specifying a port range")
            pool.proxy_port = (0, 0)
            pool.static_port = True
        return pool, af

    def translate(self, spec: _RuleSpec, r: Rule, sh: _Host, sp: _Port | None, dh: _Host,
                  dp: _Port | None) -> None:
        """Attach the pools to an expanded rule and add it; binat-to adds two rules, the
        outbound nat-to rule and the inbound rdr-to rule back (pfctl's expand_rule)."""
        af = r.af
        if spec.rdr is not None:
            r.rdr, af = self.make_pool(spec.rdr, "rdr", af, dp)
        if spec.nat is not None:
            r.nat, af = self.make_pool(spec.nat, "nat", af, dp)
        r.af = af
        if not spec.binat:
            self.rules.append(r)
            return
        assert r.nat is not None and spec.nat is not None
        if sh.addr.kind == "table":
            assert isinstance(sh.addr.table, Table)
            raise self.error(sh.tok, f"invalid use of table <{sh.addr.table.name}> as the "
                             "source address of a binat-to rule")
        if sh.addr.kind != "net" or sh.addr.neg:
            raise self.error(sh.tok if spec.src else spec.nat.tok,
                             "binat-to requires a specified source address")
        ext = r.nat.addrs[0]
        if ext.plen != sh.addr.plen:
            raise self.error(spec.nat.hosts[0].tok, "binat-to source and redirect address "
                             "must have the same netmask")
        r.direction = PF_OUT
        r.nat.static_port = True
        self.rules.append(r)
        back = self.make_rule(spec, r.ifname, r.ifnot, af, r.proto, dh, dp,
                              _Host(Addr("net", af=af, net=ext.net, plen=ext.plen), sh.tok),
                              sp, _icmp_of(r), r.keep_state, r.state_type)
        back.direction = PF_IN
        back.rdr = Pool("rdr")
        back.rdr.addrs = [Addr("net", af=af, net=sh.addr.net, plen=sh.addr.plen)]
        back.rdr.sticky = r.nat.sticky
        self.rules.append(back)

    def make_rule(self, spec: _RuleSpec, ifname: str | None, ifnot: bool, af: int,
                  proto: int, sh: _Host, sp: _Port | None, dh: _Host, dp: _Port | None,
                  ic: tuple[int, int | None] | None, keep: bool,
                  state_type: str | None) -> Rule:
        r = Rule()
        r.line = spec.tok.line if spec.tok else 0
        r.action = spec.action
        r.return_mode = spec.return_mode
        r.return_icmp = spec.return_icmp
        r.return_icmp6 = spec.return_icmp6
        r.direction = spec.direction
        r.log = spec.log
        r.log_all = spec.log_all
        r.quick = spec.quick
        r.ifname = ifname
        r.ifnot = ifnot
        r.af = af
        r.proto = proto
        r.src = sh.addr
        r.dst = dh.addr
        r.sport = sp.spec if sp else None
        r.dport = dp.spec if dp else None
        if spec.flags is not None:
            r.flags, r.flagset = spec.flags
        elif keep and proto in (0, IPPROTO_TCP):
            r.flags, r.flagset = 0x02, 0x12  # S/SA, pf's default on stateful rules
        if ic is not None:
            r.icmp_type, r.icmp_code = ic
        r.keep_state = keep
        r.state_type = state_type
        r.max_states = spec.max_states
        r.srctrack = spec.srctrack.copy() if spec.srctrack is not None else None
        r.no_sync = spec.no_sync
        r.sloppy = spec.sloppy
        r.pflow = spec.pflow
        r.if_bound = spec.if_bound
        r.timeouts = dict(spec.timeouts)
        if (spec.max_states and PFTM.ADAPTIVE_START not in spec.timeouts
                and PFTM.ADAPTIVE_END not in spec.timeouts):
            r.timeouts[PFTM.ADAPTIVE_START] = spec.max_states // 10 * 6
            r.timeouts[PFTM.ADAPTIVE_END] = spec.max_states // 10 * 12
            r.adaptive_default = True
        r.label = spec.label
        r.tag = spec.tag
        r.match_tag = spec.match_tag
        r.match_tag_not = spec.match_tag_not
        r.scrub = spec.scrub
        r.route = spec.route
        if spec.anchor is not None:
            r.anchor_wildcard = spec.anchor_wild
            r.anchor = self.rs.anchor(spec.anchor) if spec.anchor else self.rs.anchor_root
            r.anchor_call = self.anchor_call(spec.anchor, r.anchor_wildcard)
            r.keep_state = False
            r.state_type = None
            r.flags = r.flagset = 0
        return r

    def anchor_call(self, path: str, wild: bool) -> str:
        """The name as pfctl prints it: relative to the anchor the rule is in."""
        here = self.anchor_path
        name = path[len(here) + 1:] if here and path.startswith(here + "/") else (
            path if not here else "/" + path)
        if wild:
            return f"{name}/*" if name and name != "/" else "*"
        return name


def _icmp_of(r: Rule) -> tuple[int, int | None] | None:
    return None if r.icmp_type is None else (r.icmp_type, r.icmp_code)


def parse_rules(text: str, filename: str = "pf.conf", ifaddrs: IfAddrs | None = None) -> Ruleset:
    """Parse pf.conf text; raises RuleSyntaxError (`file:line:col: message`) on the first error.

    `ifaddrs`: the host's interfaces, for `em0`, `self` and `(em0)` (none known if None).
    """
    p = _Parser(text, filename, ifaddrs=ifaddrs)
    try:
        return p.parse()
    except RecursionError:
        raise RuleSyntaxError(filename, p.tok.line, p.tok.col, "input nested too deeply") from None


def graft(root: Ruleset, sub: Ruleset) -> None:
    """Move the anchors an anchor file defined (`sub`) into `root`: their rules, and
    their anchor rules pointed at `root`'s anchors of the same paths."""
    for path in sorted(sub.defined_anchors):
        rules = sub.anchors[path].rules
        for r in rules:
            if r.anchor is not None:
                r.anchor = root.anchor(r.anchor.path) if r.anchor.path else root.anchor_root
        root.load_anchor(path, rules)
        root.defined_anchors.add(path)


def anchor_path(name: str) -> str:
    """An anchor name from the command line ("a/b", "/a/b") as a path; ValueError if bad."""
    parts = name.strip("/").split("/")
    if not name.strip("/") or len(name) >= 1024 or any(
            p in ("", ".", "..", "*") or any(c.isspace() or c in "\"'" for c in p)
            for p in parts):
        raise ValueError(f"invalid anchor name '{name}'")
    return "/".join(parts)


def prepare_anchor(root: Ruleset, path: str, text: str, filename: str) -> Ruleset:
    """Parse `text` as anchor PATH's rules, for `graft` into `root` (which it leaves
    alone: a RuleSyntaxError changes nothing). Tables the file does not define are the
    main ruleset's."""
    p = _Parser(text, filename, path, root.tables, root.ifaddrs)
    try:
        p.statements(None)
    except RecursionError:
        raise RuleSyntaxError(filename, p.tok.line, p.tok.col, "input nested too deeply") from None
    return p.rs


def parse_anchor(root: Ruleset, path: str, text: str, filename: str) -> None:
    """`pfctl -a PATH -f FILE`: the anchor's rules replaced by the file's."""
    graft(root, prepare_anchor(root, path, text, filename))


def load_rules(path: str | Path, ifaddrs: IfAddrs | None = None) -> Ruleset:
    """Read and parse a pf.conf file (errors name the file as given)."""
    p = Path(path)
    return parse_rules(p.read_text(), str(path), ifaddrs)
