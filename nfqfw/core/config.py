"""The policy file: YAML in, validated plain config objects out.

The file is composed (not constructed) with PyYAML's SafeLoader so that every node keeps
its position; each problem is reported as ``FILE:LINE:COL: message`` (1-based) and all of
them are reported at once. Nothing here runs per packet: `nfqfw.core.policy` compiles the
result into matchers.

Shape (see config/policy.yaml for the commented version)::

    zones:    {external: [ifaces], internal: [ifaces],
               NAME: {faces: outside|inside, interfaces: [ifaces], networks: [nets]}}
    defaults: {ingress: drop, egress: accept, between: drop, invalid: drop}
    ingress:  [rules]       # first match wins
    egress:   [rules]
    between:  [rules]       # flows between two different inside zones
    nat:      {masquerade: [..], snat: [..], forward: [..]}
    options:  {max-flows, tcp-pickup, failure-mode, reload, log-denied, log-limit,
               log-limit-burst, log-format, gateway-addresses, prefilter, new-rate,
               new-rate-per-source, offload, antispoof, watch-sets}
    sets:     {NAME: [networks] | {file: PATH, networks: [...], comment: TEXT} | {}}
    include:  [paths or globs]  # more files with sets, rules and nat

Sets and includes. A rule's `from`/`to` and a nat entry's `from` may name sets (`@NAME`) beside
literal addresses; the set's networks (inline, from its file, and later the runtime entries)
are nfqfw.core.sets's. A set holds both families: a nat entry (of one family, from `family`,
`to`, else its literal networks, else IPv4) takes its family's members. A set file is read
with the policy: its bad lines are issues located in it (`FILE:LINE: message`, no column),
reported with the policy's. `include:` reads more files (paths relative to the including file,
globs expanded in file-name order) that may hold `sets`, rule lists, `nat` and includes: rule
lists and nat lists are appended in that order (after the main file's), sets merged, a name
(set, rule or forward) defined twice is an error naming both places. Every file read is a
`SourceFile` of the PolicyConfig; its `sha256` covers them all. Where the files come from is a
`PolicyFiles`: the disk (recording what it read, so the supervisor of --workers can hand its
workers exactly the validated bytes as a bundle) or such a bundle.

`ports`/`sports` take service names from SERVICES (IANA's names of common services, built in
so that a policy means the same on every machine).

A valid policy may still carry warnings (`PolicyConfig.warnings`, located like errors), which
`nfqfw check` prints: a choice that is allowed but weakens the firewall (antispoof off).

Zones: `external` and `internal` may be plain interface lists (they face the outside and the
inside); any other zone is a mapping that says which side it faces, so that a misspelt
`extrenal` can never turn the outside into an inside zone. A zone's `networks` are the
addresses reached through it: forwards must target one of them, and the offline tools route by
them. `nat` is validated here (families, a forward's target reached by a zone, one public port
for a `to-port`); the kernel rules are the firewall backend's, the forwards' implied accept the
policy's (nfqfw.core.forwards).

The flood protections (prefilter, new-rate, new-rate-per-source, offload and a rule's
`synproxy`) are validated here; what the kernel does with them is nfqfw.core.prefilter's and
the firewall backend's.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from nfqfw.core.conntrack import DEFAULT_MAX_FLOWS
from nfqfw.core.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP
from nfqfw.core.sets import SetContent, network_range, parse_set_text
from nfqfw.core.verdict import Action

ZONES = ("external", "internal")  # the zones that may be plain interface lists
OUTSIDE, INSIDE = "outside", "inside"
FACES = (OUTSIDE, INSIDE)
ZONE_FACES = {"external": OUTSIDE, "internal": INSIDE}  # what the two named zones face
ZONE_KEYS = ("faces", "interfaces", "networks")
SIDES = ("ingress", "egress", "between")
TOP_KEYS = ("zones", "defaults", "ingress", "egress", "between", "nat", "options", "sets", "include")
INCLUDE_KEYS = ("sets", "ingress", "egress", "between", "nat", "include")  # what an included file may hold
SET_KEYS = ("file", "networks", "comment")
# A set's name: also part of its kernel ipsets' names (nfqfw4-NAME, at most 31 characters).
_SET_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,23}")
SET_NAME_RULE = "a letter, then letters, digits, '-' or '_', at most 24 characters"
MAX_SET_FILE_ERRORS = 20  # bad lines reported per set file (then how many more there are)
DEFAULT_KEYS = ("ingress", "egress", "between", "invalid")
NAT_KEYS = ("masquerade", "snat", "forward")
MASQUERADE_KEYS = ("out", "from", "family")
SNAT_KEYS = ("out", "from", "to")
FORWARD_KEYS = (
    "name",
    "proto",
    "in",
    "ports",
    "to",
    "to-port",
    "from",
    "address",
    "pass",
    "log",
    "hairpin",
    "comment",
)
OPTION_KEYS = (
    "max-flows",
    "tcp-pickup",
    "failure-mode",
    "reload",
    "log-denied",
    "log-limit",
    "log-limit-burst",
    "log-format",
    "gateway-addresses",
    "prefilter",
    "new-rate",
    "new-rate-per-source",
    "offload",
    "antispoof",
    "watch-sets",
)
LOG_FORMATS = ("text", "json")  # options: log-format (nfqfw.observe.logsetup)
# options: antispoof: drop packets whose source the gateway would not route back out of the
# interface they came in by (strict), would not route at all (loose), or nothing (off)
ANTISPOOF_MODES = ("strict", "loose", "off")
RULE_KEYS = (
    "name",
    "action",
    "proto",
    "family",
    "from",
    "to",
    "ports",
    "sports",
    "icmp-types",
    "in",
    "out",
    "log",
    "limit",
    "limit-burst",
    "limit-per",
    "synproxy",
    "from-zone",
    "to-zone",
    "comment",
)

DEFAULT_LIMIT_BURST = 5  # as iptables -m limit
OFFLOAD_MODES = ("off", "established")

# Protocol names. "icmp" is ICMP for IPv4 *and* ICMPv6 for IPv6, so one rule covers ping on
# both families; "icmpv6" (58) is ICMPv6 only and the number 1 is ICMPv4 only.
PROTOCOLS: dict[str, tuple[int, ...]] = {
    "tcp": (PROTO_TCP,),
    "udp": (PROTO_UDP,),
    "icmp": (PROTO_ICMP, PROTO_ICMPV6),
    "icmpv6": (PROTO_ICMPV6,),
    "ipv6-icmp": (PROTO_ICMPV6,),
    "igmp": (2,),
    "ipip": (4,),
    "dccp": (33,),
    "gre": (47,),
    "esp": (50,),
    "ah": (51,),
    "ospf": (89,),
    "pim": (103,),
    "vrrp": (112,),
    "l2tp": (115,),
    "sctp": (132,),
    "udplite": (136,),
}
# Protocol number -> the name above (for logs and metrics); ICMP is "icmp", 58 is "icmpv6".
PROTOCOL_NAMES: dict[int, str] = {PROTO_ICMP: "icmp"} | {
    numbers[0]: name for name, numbers in reversed(PROTOCOLS.items()) if len(numbers) == 1
}
PORT_PROTOCOLS = frozenset({PROTO_TCP, PROTO_UDP})  # the only ones whose ports the decoder reads
ICMP_PROTOCOLS = frozenset({PROTO_ICMP, PROTO_ICMPV6})

# ICMP type names -> (ICMPv4 type, ICMPv6 type); None where the message does not exist in
# that family. A name present in both matches either: echo-request is ICMPv4 type 8 and
# ICMPv6 type 128.
ICMP_TYPES: dict[str, tuple[int | None, int | None]] = {
    "echo-reply": (0, 129),
    "destination-unreachable": (3, 1),
    "source-quench": (4, None),
    "redirect": (5, 137),
    "echo-request": (8, 128),
    "router-advertisement": (9, 134),
    "router-solicitation": (10, 133),
    "time-exceeded": (11, 3),
    "parameter-problem": (12, 4),
    "timestamp-request": (13, None),
    "timestamp-reply": (14, None),
    "address-mask-request": (17, None),
    "address-mask-reply": (18, None),
    "packet-too-big": (None, 2),
    "mld-query": (None, 130),
    "mld-report": (None, 131),
    "mld-done": (None, 132),
    "neighbor-solicitation": (None, 135),
    "neighbour-solicitation": (None, 135),  # ip6tables' spelling
    "neighbor-advertisement": (None, 136),
    "neighbour-advertisement": (None, 136),
    "mld2-report": (None, 143),
}

# Service names for ports/sports: IANA's service name registry, the common ones (a built-in
# table, not the machine's /etc/services, so a policy means the same everywhere).
SERVICES: dict[str, int] = {
    "ftp-data": 20,
    "ftp": 21,
    "ssh": 22,
    "telnet": 23,
    "smtp": 25,
    "time": 37,
    "whois": 43,
    "tacacs": 49,
    "domain": 53,
    "bootps": 67,
    "bootpc": 68,
    "tftp": 69,
    "gopher": 70,
    "finger": 79,
    "http": 80,
    "kerberos": 88,
    "pop3": 110,
    "sunrpc": 111,
    "auth": 113,
    "nntp": 119,
    "ntp": 123,
    "epmap": 135,
    "netbios-ns": 137,
    "netbios-dgm": 138,
    "netbios-ssn": 139,
    "imap": 143,
    "snmp": 161,
    "snmptrap": 162,
    "xdmcp": 177,
    "bgp": 179,
    "irc": 194,
    "ldap": 389,
    "https": 443,
    "microsoft-ds": 445,
    "kpasswd": 464,
    "submissions": 465,
    "isakmp": 500,
    "syslog": 514,
    "printer": 515,
    "dhcpv6-client": 546,
    "dhcpv6-server": 547,
    "rtsp": 554,
    "submission": 587,
    "ipp": 631,
    "ldaps": 636,
    "kerberos-adm": 749,
    "domain-s": 853,
    "rsync": 873,
    "ftps-data": 989,
    "ftps": 990,
    "telnets": 992,
    "imaps": 993,
    "pop3s": 995,
    "socks": 1080,
    "openvpn": 1194,
    "ms-sql-s": 1433,
    "l2tp": 1701,
    "pptp": 1723,
    "radius": 1812,
    "radius-acct": 1813,
    "mqtt": 1883,
    "ssdp": 1900,
    "nfs": 2049,
    "iscsi-target": 3260,
    "mysql": 3306,
    "ms-wbt-server": 3389,
    "stun": 3478,
    "nut": 3493,
    "sieve": 4190,
    "ipsec-nat-t": 4500,
    "sip": 5060,
    "sips": 5061,
    "xmpp-client": 5222,
    "xmpp-server": 5269,
    "mdns": 5353,
    "llmnr": 5355,
    "postgresql": 5432,
    "amqp": 5672,
    "x11": 6000,
    "redis": 6379,
    "syslog-tls": 6514,
    "http-alt": 8080,
    "secure-mqtt": 8883,
    "git": 9418,
    "zabbix-agent": 10050,
    "zabbix-trapper": 10051,
    "memcache": 11211,
    "mongodb": 27017,
}
SERVICE_NAMES: dict[int, str] = {}  # port -> its name (the first, for ports with several)
for _name, _port in SERVICES.items():
    SERVICE_NAMES.setdefault(_port, _name)
_SERVICE_RE = re.compile(r"[a-z][a-z0-9-]*")

_LIMIT_UNITS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}
_LIMIT_RE = re.compile(r"\s*([0-9]+)\s*/\s*([a-z]+)\s*")
_PORT_RE = re.compile(r"\s*([0-9]+)\s*")
_RANGE_RE = re.compile(r"\s*([0-9]+)\s*-\s*([0-9]+)\s*")
# Linux interface names: at most 15 bytes, no whitespace or '/'. A trailing '+' matches
# every name with that prefix (as iptables -i eth+).
_IFACE_RE = re.compile(r"[^\s/+]{1,15}\+?")

_TAG_NULL = "tag:yaml.org,2002:null"
_TAG_BOOL = "tag:yaml.org,2002:bool"
_TAG_INT = "tag:yaml.org,2002:int"
_TAG_STR = "tag:yaml.org,2002:str"
_CONSTRUCTOR = SafeConstructor()
_FAILED = object()  # a value that had errors (reported), where None means "off"
_FAST_LOADER = getattr(yaml, "CSafeLoader", None)  # absent when PyYAML was built without libyaml

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class ConfigIssue(NamedTuple):
    """One problem in a policy file; line and column are 1-based (column 0: a whole line, as in
    a set file)."""

    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        if not self.col:
            return f"{self.file}:{self.line}: {self.message}"
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class ConfigError(Exception):
    """The policy cannot be used; `issues` lists every problem found, in file order."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = issues


@dataclass(frozen=True, slots=True)
class AddressSet:
    """The `from`/`to` of a rule: the gateway itself and/or networks and/or named sets."""

    gateway: bool
    networks: tuple[Network, ...]
    sets: tuple[str, ...] = ()  # `@NAME`: names of the policy's sets, in the order written


@dataclass(frozen=True)
class SetConfig:
    """One set of `sets:`: its networks from the policy (inline and file), where it was
    defined, and its file (None: none). Runtime entries (nfqfw set add) are the engine's."""

    name: str
    content: SetContent
    line: int  # where it is defined
    defined_in: str  # the policy file (main or included) that defines it
    path: str | None = None  # the set file, as resolved
    comment: str | None = None
    runtime_only: bool = False  # written `{}`: filled at run time only
    inline: tuple[Network, ...] = ()  # the networks written in the policy (besides the file's)


class SourceFile(NamedTuple):
    """A file the policy was read from: the main file, an included file or a set file."""

    path: str
    sha256: str
    kind: str  # "policy" | "include" | "set"


@dataclass(frozen=True, slots=True)
class LimitConfig:
    """`limit: COUNT/PERIOD` with its burst; per_source gives every source address its own bucket."""

    count: int
    period: int  # seconds
    burst: int
    per_source: bool


class LogLimit(NamedTuple):
    """The packet log's token buckets: `count` lines per `period` seconds, bursts of `burst`."""

    count: int
    period: int  # seconds
    burst: int


# As ufw's and iptables' LOG rules (-m limit --limit 3/min --limit-burst 10).
DEFAULT_LOG_LIMIT = LogLimit(3, 60, 10)


class Rate(NamedTuple):
    """`N/PERIOD`: `count` per `period` seconds (the kernel's caps take bursts of `count`)."""

    count: int
    period: int  # seconds


# Packets that may start a flow, capped in the kernel before the queue (nfqfw.core.prefilter):
# all sources together, and each source address. Sized to what the queue consumer takes on the
# development machine: ~5,500 TCP connections/s on its full path (`make bench`), an accepted
# first packet costing its SYN and the server's SYN-ACK there. 5,000/s leaves the established
# flows and, with offload, the kernel's forwarding most of the CPU (20,000/s let a random-source
# SYN flood take 46% of a core: bench/README.md). One source may use half, so a single-source
# flood leaves the other half to everyone else.
DEFAULT_NEW_RATE = Rate(5000, 1)
DEFAULT_NEW_RATE_PER_SOURCE = Rate(2500, 1)


@dataclass(frozen=True, slots=True)
class RuleConfig:
    """One validated rule. None in a match field means "any"."""

    name: str
    action: Action
    line: int  # where the rule starts in the file (1-based)
    family: int | None = None  # 4 or 6
    protocols: frozenset[int] | None = None
    src: AddressSet | None = None
    dst: AddressSet | None = None
    dports: tuple[tuple[int, int], ...] | None = None  # sorted, merged inclusive ranges
    sports: tuple[tuple[int, int], ...] | None = None
    icmp_types_v4: frozenset[int] | None = None  # with icmp-types: allowed types per family
    icmp_types_v6: frozenset[int] | None = None
    in_ifaces: tuple[str, ...] | None = None
    out_ifaces: tuple[str, ...] | None = None
    log: bool = False
    limit: LimitConfig | None = None
    # pf's `synproxy state`: the kernel answers SYNs with cookies (ingress TCP accept rules only)
    synproxy: bool = False
    from_zones: tuple[str, ...] | None = None  # zone names (`from-zone`, `to-zone`)
    to_zones: tuple[str, ...] | None = None
    comment: str | None = None
    file: str | None = None  # the included file it comes from (None: the main policy file)


@dataclass(frozen=True, slots=True)
class DefaultsConfig:
    ingress: Action = Action.DROP
    egress: Action = Action.ACCEPT
    invalid: Action = Action.DROP  # accept or drop only
    between: Action = Action.DROP  # flows between two different inside zones


@dataclass(frozen=True, slots=True)
class ZoneDetail:
    """What a zone written as a mapping says besides its interfaces."""

    faces: str  # OUTSIDE or INSIDE
    networks: tuple[Network, ...] = ()


@dataclass(frozen=True, slots=True)
class SourceNatConfig:
    """One `masquerade` (to None: the outgoing interface's address) or `snat` entry, for one
    family: connections leaving by `out_ifaces` from `src` or from a member (of the entry's
    family) of one of `sets` get the source address `to`. `src` None (`sets` then empty): any
    source of the family."""

    line: int
    col: int
    family: int  # 4 or 6
    out_ifaces: tuple[str, ...]
    src: tuple[Network, ...] | None = None  # None: any source of the family
    to: Address | None = None
    sets: tuple[str, ...] = ()  # `@NAME` in `from`: names of the policy's sets, in the order written
    file: str | None = None  # the included file it comes from (None: the main policy file)


@dataclass(frozen=True, slots=True)
class ForwardConfig:
    """One port forward (DNAT) of a published service: connections of `protocols` arriving on
    `in_ifaces` to `ports` of `address` (None: any address of the gateway on the interface)
    from `src` or a member of one of `sets` (`src` None, `sets` empty: from anywhere) go to `to`,
    port `to_port` (None: the same port). `passes`: the forward also admits what it translates
    (as pf's rdr pass); `hairpin`: inside hosts reach it on the public address too, their source
    translated to the gateway's."""

    name: str
    line: int
    col: int
    family: int
    protocols: frozenset[int]
    in_ifaces: tuple[str, ...]
    ports: tuple[tuple[int, int], ...]
    to: Address
    to_port: int | None = None
    src: tuple[Network, ...] | None = None
    address: Address | None = None
    passes: bool = True
    log: bool = False
    hairpin: bool = True
    comment: str | None = None
    sets: tuple[str, ...] = ()  # `@NAME` in `from`, as in SourceNatConfig
    file: str | None = None  # the included file it comes from (None: the main policy file)

    def translated_port(self, port: int) -> int:
        return port if self.to_port is None else self.to_port

    @property
    def translated_ports(self) -> tuple[tuple[int, int], ...]:
        """The destination ports of the translated packets."""
        return self.ports if self.to_port is None else ((self.to_port, self.to_port),)


@dataclass(frozen=True, slots=True)
class NatConfig:
    """The policy's `nat:` sections: the main file's entries, then each included file's (in the
    order the files were read; `files` are the included files with a `nat:` section)."""

    masquerade: tuple[SourceNatConfig, ...] = ()
    snat: tuple[SourceNatConfig, ...] = ()
    forward: tuple[ForwardConfig, ...] = ()
    files: tuple[str, ...] = ()

    def _order(self, entry: SourceNatConfig | ForwardConfig) -> tuple[int, int, int]:
        """Where an entry stands: its file (the main one first), line, column."""
        rank = 0 if entry.file is None else 1 + self.files.index(entry.file)
        return rank, entry.line, entry.col

    def source_entries(self) -> list[SourceNatConfig]:
        """The masquerade and snat entries in the order the kernel tries them: the order written,
        file by file (the first that matches a connection translates it)."""
        return sorted(self.masquerade + self.snat, key=self._order)

    def _described(self) -> list[tuple[SourceNatConfig | ForwardConfig, str]]:
        """Every entry with what the messages call it, in file order."""
        found: list[tuple[SourceNatConfig | ForwardConfig, str]] = [
            (e, "masquerade") for e in self.masquerade
        ]
        found += [(e, "snat") for e in self.snat]
        found += [(e, f"forward '{e.name}'") for e in self.forward]
        return sorted(found, key=lambda pair: self._order(pair[0]))

    def ipv6_entries(self) -> list[tuple[str | None, int, int, str]]:
        """(file, line, col, what) of every entry that needs the kernel's IPv6 NAT, in file order
        (file None: the main policy file)."""
        return [(e.file, e.line, e.col, what) for e, what in self._described() if e.family == 6]

    def set_entries(self) -> list[tuple[str | None, int, int, str, tuple[str, ...]]]:
        """(file, line, col, what, set names) of every entry whose `from` names sets (matched in
        the kernel's nat table by ipsets), in file order."""
        return [(e.file, e.line, e.col, what, e.sets) for e, what in self._described() if e.sets]


@dataclass(frozen=True, slots=True)
class OptionsConfig:
    max_flows: int = DEFAULT_MAX_FLOWS
    tcp_pickup_loose: bool = False
    failure_mode: str = "closed"  # "closed" | "open"
    reload: str = "recheck"  # "recheck" | "keep"
    log_denied: bool = True  # as ufw, which logs blocked packets by default (rate-limited)
    log_limit: LogLimit = DEFAULT_LOG_LIMIT
    log_format: str = "text"  # one of LOG_FORMATS
    gateway_addresses: tuple[str, ...] = ()  # normalised text, for the offline tools
    prefilter: bool = True  # drop in the kernel the first packets no rule can accept
    new_rate: Rate | None = DEFAULT_NEW_RATE  # None: `off`, no global cap
    new_rate_per_source: Rate | None = DEFAULT_NEW_RATE_PER_SOURCE  # None: `off`
    offload: str = "off"  # OFFLOAD_MODES
    antispoof: str = "strict"  # ANTISPOOF_MODES
    watch_sets: bool = False  # re-read a set file when it changes on disk, not only at reload

    @property
    def gateway_address_bytes(self) -> frozenset[bytes]:
        """The gateway addresses as raw 4/16-byte values, comparable with Packet.dst."""
        return frozenset(ipaddress.ip_address(text).packed for text in self.gateway_addresses)


@dataclass(frozen=True)
class PolicyConfig:
    filename: str
    sha256: str  # hex digest of the file's bytes
    zones: dict[str, tuple[str, ...]]  # zone -> interfaces; always has "external" and "internal"
    defaults: DefaultsConfig
    ingress: tuple[RuleConfig, ...]
    egress: tuple[RuleConfig, ...]
    options: OptionsConfig
    between: tuple[RuleConfig, ...] = ()
    zone_details: dict[str, ZoneDetail] = field(default_factory=dict)  # zones written as mappings
    nat: NatConfig | None = None  # None: the policy has no `nat:` section
    warnings: tuple[ConfigIssue, ...] = ()  # allowed, but weakens the firewall; in file order
    sets: dict[str, SetConfig] = field(default_factory=dict)
    # Where it was read from (not compared: the same policy read from elsewhere is equal).
    sources: tuple[SourceFile, ...] = field(default=(), compare=False)  # every file, in the order read
    globs: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)  # include -> files

    def set_files(self) -> dict[str, str]:
        """Set file path -> the set reading it."""
        return {s.path: name for name, s in self.sets.items() if s.path is not None}

    def faces(self, zone: str) -> str:
        """OUTSIDE or INSIDE."""
        detail = self.zone_details.get(zone)
        return detail.faces if detail is not None else ZONE_FACES.get(zone, INSIDE)

    def networks(self, zone: str) -> tuple[Network, ...]:
        detail = self.zone_details.get(zone)
        return () if detail is None else detail.networks

    def interfaces_facing(self, faces: str) -> tuple[str, ...]:
        """The interfaces of every zone facing `faces` (OUTSIDE or INSIDE), in file order."""
        return tuple(
            name for zone, names in self.zones.items() if self.faces(zone) == faces for name in names
        )

    def rules(self, side: str) -> tuple[RuleConfig, ...]:
        return {"ingress": self.ingress, "egress": self.egress, "between": self.between}[side]


class PolicyFiles:
    """Where the loader reads the files of a policy: the disk. What it read is recorded
    (`read_files`, `globs`), so that `bundle()` can hand exactly those bytes on."""

    def __init__(self) -> None:
        self.read_files: dict[str, bytes] = {}
        self.globs: dict[str, list[str]] = {}

    def read(self, path: str) -> bytes:
        data = Path(path).read_bytes()
        self.read_files[path] = data
        return data

    def glob(self, pattern: str) -> list[str]:
        found = sorted(glob.glob(pattern))
        self.globs[pattern] = found
        return found

    def bundle(self, main: str) -> bytes:
        """Every file read (UTF-8 text: nothing else validates) and every glob's expansion, as
        one JSON document that `BundleFiles` reads back."""
        files = {path: data.decode("utf-8") for path, data in self.read_files.items()}
        return json.dumps({"version": 1, "main": main, "files": files, "globs": self.globs}).encode()


class BundleFiles(PolicyFiles):
    """The files of a policy as `PolicyFiles.bundle` recorded them (a worker of --workers reads
    the policy in force from its supervisor's bundle, never from files edited since)."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("version") != 1:
            raise ValueError("not a policy bundle")
        self.main: str = document["main"]
        self._files: dict[str, bytes] = {path: text.encode() for path, text in document["files"].items()}
        self._globs: dict[str, list[str]] = document["globs"]

    def read(self, path: str) -> bytes:
        if path not in self._files:
            raise FileNotFoundError(2, "No such file or directory (not in the policy bundle)", path)
        data = self._files[path]
        self.read_files[path] = data
        return data

    def glob(self, pattern: str) -> list[str]:
        found = list(self._globs.get(pattern, []))
        self.globs[pattern] = found
        return found


def combined_digest(sources: Iterable[SourceFile]) -> str:
    """The policy's sha256: the main file's own when it is the only file, else the sha256 of
    the `sha256sum`-style listing of every file read (so any of them changing changes it)."""
    sources = list(sources)
    if len(sources) == 1:
        return sources[0].sha256
    listing = "".join(f"{source.sha256}  {source.path}\n" for source in sources)
    return hashlib.sha256(listing.encode()).hexdigest()


def digest_on_disk(config: PolicyConfig) -> str | None:
    """The policy's sha256 as its files on disk are now (None: one cannot be read), comparable
    with `config.sha256`: the same files re-read, the include globs expanded again."""
    files = PolicyFiles()
    sources = []
    for source in config.sources:
        try:
            data = files.read(source.path)
        except OSError:
            return None
        sources.append(SourceFile(source.path, hashlib.sha256(data).hexdigest(), source.kind))
    for pattern, before in config.globs.items():
        if tuple(files.glob(pattern)) != before:  # a file added to or taken from conf.d
            sources.append(SourceFile(pattern, "changed", "include"))
    return combined_digest(sources) if sources else None


def parse_policy(text: str, filename: str = "<policy>", files: PolicyFiles | None = None) -> PolicyConfig:
    """Validate policy text (its includes and set files read from `files`, the disk by default);
    raises ConfigError listing every problem."""
    data = text.encode("utf-8")
    return _parse(text, filename, hashlib.sha256(data).hexdigest(), files or PolicyFiles())


def load_policy(path: str | os.PathLike[str], files: PolicyFiles | None = None) -> PolicyConfig:
    """Read and validate a policy file, its includes and set files (from `files`: the disk by
    default); raises ConfigError (also when a file cannot be read)."""
    filename = os.fspath(path)
    files = files or PolicyFiles()
    try:
        data = files.read(filename)
    except OSError as err:
        raise ConfigError([ConfigIssue(filename, 1, 1, f"cannot read: {err.strerror or err}")]) from err
    return _parse(_text_of(data, filename), filename, hashlib.sha256(data).hexdigest(), files)


def load_bundle(data: bytes) -> PolicyConfig:
    """The policy recorded by `PolicyFiles.bundle` (ConfigError when it is not one)."""
    try:
        files = BundleFiles(data)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError([ConfigIssue("<bundle>", 1, 1, f"not a policy bundle: {err}")]) from err
    return load_policy(files.main, files)


def refresh_set(config: PolicyConfig, name: str, files: PolicyFiles | None = None) -> PolicyConfig:
    """`config` with set `name`'s file read again (options watch-sets): the rest as it was;
    ConfigError with the set file's located issues when it is broken (the caller keeps `config`)."""
    found = config.sets[name]
    if found.path is None:
        return config
    checker = _Checker(config.filename, files or PolicyFiles())
    checker.filename = found.defined_in
    pairs: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    written = 0
    for network in found.inline:
        pairs[network.version].append(network_range(network))
        written += 1
    written += checker.set_file_issues(found.path, pairs)
    if checker.issues:
        raise ConfigError(checker.issues)
    (source,) = checker.sources
    content = SetContent.of(pairs[4], pairs[6], written)
    sets = {**config.sets, name: replace(found, content=content)}
    sources = tuple(source if old.path == source.path else old for old in config.sources)
    return replace(config, sha256=combined_digest(sources), sets=sets, sources=sources)


def _text_of(data: bytes, filename: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        col = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError([ConfigIssue(filename, line, col, "cannot read: not UTF-8 text")]) from err


def _parse(text: str, filename: str, digest: str, files: PolicyFiles) -> PolicyConfig:
    checker = _Checker(filename, files)
    checker.sources.append(SourceFile(filename, digest, "policy"))
    root = checker.compose(text)
    config = None if root is None else checker.policy(root)
    if checker.issues or config is None:
        raise ConfigError(sorted(checker.issues, key=checker.issue_order))
    return config


def _compose(text: str) -> Node | None:
    """The node tree, by libyaml when PyYAML was built with it (4x faster: a policy of 10,000
    rules is 130,000 nodes). A text libyaml refuses is composed again by the pure-Python
    composer, which raises the error the messages here are written for."""
    if _FAST_LOADER is not None:
        try:
            return yaml.compose(text, Loader=_FAST_LOADER)
        except yaml.YAMLError:
            pass
    return yaml.compose(text, Loader=yaml.SafeLoader)


def _yaml_problem(err: yaml.MarkedYAMLError) -> str:
    problem, context = err.problem or "", err.context or ""
    if problem.startswith("but "):  # the composer puts what it expected in the context
        return f"{context}, {problem}"
    if "'\\t'" in problem:
        return f"{problem} (YAML indents with spaces, not tabs)"
    if context and err.context_mark:
        return f"{problem} ({context} at line {err.context_mark.line + 1})"
    return problem or context


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _TAG_NULL:
        return "nothing"
    return f"'{node.value}'"


def _is_number(word: str) -> bool:
    return word.isascii() and word.isdigit()


def _is_value(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag != _TAG_NULL


def _hint(word: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    if len(choices) > 8:
        return ""  # too many to list
    return f" (expected one of: {', '.join(choices)})"


def _one_of(choices: Iterable[str]) -> str:
    choices = list(choices)
    return choices[0] if len(choices) == 1 else ", ".join(choices[:-1]) + " or " + choices[-1]


def _at(where: str, message: str) -> str:
    return f"{where}: {message}" if where else message


class _Rule:
    """What is known about a rule while its keys are checked one by one."""

    def __init__(self, side: str, where: str) -> None:
        self.side = side
        self.where = where
        self.family: int | None = None
        self.protocols: frozenset[int] | None = None
        self.proto_text = ""
        self.proto_failed = False  # proto had errors: checks that depend on it are skipped


class _Checker:
    """Walks the composed YAML, collecting every issue instead of stopping at the first."""

    def __init__(self, filename: str, files: PolicyFiles | None = None) -> None:
        self.filename = filename  # the file whose nodes are being checked (an include's, for a while)
        self.main = filename
        self.files = files or PolicyFiles()
        self.issues: list[ConfigIssue] = []
        self.zone_faces: dict[str, str] = dict(ZONE_FACES)  # zone -> OUTSIDE | INSIDE, once read
        self.warnings: list[ConfigIssue] = []
        self.antispoof_node: Node | None = None  # where options: antispoof was set
        self.sources: list[SourceFile] = []
        self.sets: dict[str, SetConfig] = {}
        self.broken_sets: set[str] = set()  # defined with errors: `@NAME` is not reported again
        self.name_files: dict[str, str] = {}  # rule name -> the file defining it (names: its line)
        self.included: list[tuple[str, dict[str, tuple[ScalarNode, Node]]]] = []  # (file, its keys)

    def issue_order(self, issue: ConfigIssue) -> tuple[int, int, int]:
        """Issues sorted by file (in the order read), line, column."""
        order = [source.path for source in self.sources]
        rank = order.index(issue.file) if issue.file in order else len(order)
        return rank, issue.line, issue.col

    @contextlib.contextmanager
    def reading(self, filename: str) -> Iterator[None]:
        """Nodes checked meanwhile are `filename`'s (an included file's)."""
        outer, self.filename = self.filename, filename
        try:
            yield
        finally:
            self.filename = outer

    def located(self, node: Node) -> str:
        """FILE:LINE of a node of the file being checked."""
        return f"{self.filename}:{node.start_mark.line + 1}"

    def error(self, node: Node, message: str) -> None:
        mark = node.start_mark
        self.issues.append(ConfigIssue(self.filename, mark.line + 1, mark.column + 1, message))

    def warn(self, node: Node, message: str) -> None:
        mark = node.start_mark
        self.warnings.append(
            ConfigIssue(self.filename, mark.line + 1, mark.column + 1, f"warning: {message}")
        )

    # -- YAML ---------------------------------------------------------------------------

    def compose(self, text: str, empty_ok: bool = False) -> Node | None:
        try:
            root = _compose(text)
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            message = f"invalid YAML: {_yaml_problem(err)}"
            self.issues.append(ConfigIssue(self.filename, line, col, message))
            return None
        except yaml.reader.ReaderError as err:
            line = text.count("\n", 0, err.position) + 1
            col = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
            code = err.character if isinstance(err.character, int) else ord(err.character)
            message = f"invalid YAML: unacceptable character #x{code:04x}: {err.reason}"
            self.issues.append(ConfigIssue(self.filename, line, col, message))
            return None
        if root is None and not empty_ok:
            self.issues.append(ConfigIssue(self.filename, 1, 1, "the policy is empty"))
        return root

    # -- generic shapes -------------------------------------------------------------------

    def mapping(
        self,
        node: Node,
        where: str,
        allowed: tuple[str, ...],
        required: tuple[str, ...] = (),
        kind: str = "key",
    ) -> dict[str, tuple[ScalarNode, Node]]:
        """Known keys -> (key node, value node); reports unknown, duplicate and missing keys."""
        if not isinstance(node, MappingNode):
            self.error(node, _at(where, f"expected a mapping, got {_describe(node)}"))
            return {}
        found: dict[str, tuple[ScalarNode, Node]] = {}
        for key, value in node.value:
            if not _is_value(key):
                self.error(key, _at(where, f"expected a {kind} name, got {_describe(key)}"))
            elif key.value in found:
                self.error(key, _at(where, f"duplicate {kind} '{key.value}'"))
            elif key.value in allowed:
                found[key.value] = (key, value)
            else:
                self.error(key, _at(where, f"unknown {kind} '{key.value}'{_hint(key.value, allowed)}"))
        for name in required:
            if name not in found:
                self.error(node, _at(where, f"missing required {kind} '{name}'"))
        return found

    def text(self, node: Node, where: str) -> str | None:
        """A single scalar, as written (YAML 1.1 typing ignored: `no` stays "no")."""
        if _is_value(node):
            return str(node.value)
        self.error(node, _at(where, f"expected a single value, got {_describe(node)}"))
        return None

    def items(self, node: Node, where: str, allow_empty: bool = False) -> list[ScalarNode]:
        """A single value or a list of single values."""
        if _is_value(node):
            return [node]  # type: ignore[list-item]
        if not isinstance(node, SequenceNode):
            self.error(node, _at(where, f"expected a value or a list, got {_describe(node)}"))
            return []
        if not node.value and not allow_empty:
            self.error(node, _at(where, "the list is empty"))
        found = []
        for item in node.value:
            if _is_value(item):
                found.append(item)
            else:
                self.error(item, _at(where, f"expected a single value, got {_describe(item)}"))
        return found

    def boolean(self, node: Node, where: str) -> bool | None:
        if isinstance(node, ScalarNode) and node.tag == _TAG_BOOL:
            return bool(SafeConstructor.bool_values[node.value.lower()])
        self.error(node, _at(where, f"expected true or false, got {_describe(node)}"))
        return None

    def positive_int(self, node: Node, where: str) -> int | None:
        if isinstance(node, ScalarNode) and node.tag == _TAG_INT:
            value = int(_CONSTRUCTOR.construct_yaml_int(node))
            if value >= 1:
                return value
        self.error(node, _at(where, f"expected a positive integer, got {_describe(node)}"))
        return None

    def choice(self, node: Node, where: str, choices: tuple[str, ...]) -> str | None:
        word = self.text(node, where)
        if word is None:
            return None
        if word in choices:
            return word
        hint = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
        suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
        self.error(node, _at(where, f"expected {_one_of(choices)}, got '{word}'{suffix}"))
        return None

    def action(
        self, node: Node, where: str, choices: tuple[str, ...] = ("accept", "drop", "reject")
    ) -> Action | None:
        word = self.choice(node, where, choices)
        return None if word is None else Action(word)

    def interface(self, node: ScalarNode, where: str) -> str | None:
        name = str(node.value)
        if _IFACE_RE.fullmatch(name):
            return name
        self.error(node, _at(where, f"'{name}' is not a valid interface name"))
        return None

    # -- the policy -------------------------------------------------------------------------

    def policy(self, root: Node) -> PolicyConfig | None:
        if not isinstance(root, MappingNode):
            message = f"expected a mapping with zones, defaults, ingress and egress, got {_describe(root)}"
            self.error(root, message)
            return None
        top = self.mapping(root, "", TOP_KEYS, required=("zones",))
        self.include(top, {os.path.realpath(self.filename)})
        self.all_sets(top)
        zones: dict[str, tuple[str, ...]] = {zone: () for zone in ZONES}
        details: dict[str, ZoneDetail] = {}
        if "zones" in top:
            zones, details = self.zones(top["zones"][1])
        self.zone_faces = {
            zone: details[zone].faces if zone in details else ZONE_FACES[zone] for zone in zones
        }
        defaults = self.defaults(top["defaults"][1]) if "defaults" in top else DefaultsConfig()
        names: dict[str, int] = {}
        sides = {side: self.side_rules(top, side, names) for side in SIDES}
        options = self.options(top["options"][1]) if "options" in top else OptionsConfig()
        nat = _NatChecker(self, zones, details).all_nat(top, names)
        outside = any(ifaces for zone, ifaces in zones.items() if self.zone_faces[zone] == OUTSIDE)
        if options.antispoof == "off" and outside and self.antispoof_node is not None:
            self.warn(
                self.antispoof_node,
                "options: antispoof is off: packets with a forged source address (an inside "
                "host's, the gateway's own) from the external zone are not dropped",
            )
        warnings = tuple(sorted(self.warnings, key=self.issue_order))
        sources = tuple(self.sources)
        return PolicyConfig(
            self.filename,
            combined_digest(sources),
            zones,
            defaults,
            sides["ingress"],
            sides["egress"],
            options,
            between=sides["between"],
            zone_details=details,
            nat=nat,
            warnings=warnings,
            sets=dict(self.sets),
            sources=sources,
            globs={pattern: tuple(found) for pattern, found in self.files.globs.items()},
        )

    # -- includes -------------------------------------------------------------------------

    def side_rules(
        self, top: dict[str, tuple[ScalarNode, Node]], side: str, names: dict[str, int]
    ) -> tuple[RuleConfig, ...]:
        """The side's rules: the main file's, then each included file's, in the order read."""
        rules = list(self.rules(top[side][1], side, names)) if side in top else []
        for filename, found in self.included:
            if side in found:
                with self.reading(filename):
                    rules += self.rules(found[side][1], side, names)
        return tuple(rules)

    def include(self, found: dict[str, tuple[ScalarNode, Node]], seen: set[str]) -> None:
        """`include:` of the file being checked: each file read, checked for its keys, and its
        own includes followed (`seen`: the real paths read so far, a file is read once)."""
        if "include" not in found:
            return
        where = "include"
        if isinstance(found["include"][1], ScalarNode) and found["include"][1].tag == _TAG_NULL:
            return
        base = os.path.dirname(self.filename)
        for item in self.items(found["include"][1], where):
            pattern = os.path.join(base, str(item.value))
            paths = self.files.glob(pattern) if glob.has_magic(pattern) else [pattern]
            for path in paths:
                real = os.path.realpath(path)
                if real in seen:
                    self.error(item, f"{where}: {path} is included already (a file is read once)")
                    continue
                seen.add(real)
                self.include_file(item, path, seen)

    def include_file(self, item: Node, path: str, seen: set[str]) -> None:
        try:
            data = self.files.read(path)
        except OSError as err:
            self.error(item, f"include: cannot read {path}: {err.strerror or err}")
            return
        self.sources.append(SourceFile(path, hashlib.sha256(data).hexdigest(), "include"))
        with self.reading(path):
            try:
                text = _text_of(data, path)
            except ConfigError as err:
                self.issues += err.issues
                return
            root = self.compose(text, empty_ok=True)
            if root is None or (isinstance(root, ScalarNode) and root.tag == _TAG_NULL):
                return
            if not isinstance(root, MappingNode):
                self.error(root, f"expected a mapping with sets, rule lists or nat, got {_describe(root)}")
                return
            kept = []
            for key, value in root.value:
                if _is_value(key) and key.value in TOP_KEYS and key.value not in INCLUDE_KEYS:
                    where = f"the main policy file ({self.main})"
                    self.error(key, f"'{key.value}' belongs in {where}, not in an included file")
                else:
                    kept.append((key, value))
            found = self.mapping(
                MappingNode(root.tag, kept, root.start_mark, root.end_mark), "", INCLUDE_KEYS
            )
            self.included.append((path, found))
            self.include(found, seen)

    # -- sets -----------------------------------------------------------------------------

    def all_sets(self, top: dict[str, tuple[ScalarNode, Node]]) -> None:
        """The sets of the main file and of every included file (read before the rules that
        name them, wherever they stand)."""
        if "sets" in top:
            self.set_section(top["sets"][1])
        for filename, found in self.included:
            if "sets" in found:
                with self.reading(filename):
                    self.set_section(found["sets"][1])

    def set_section(self, node: Node) -> None:
        if isinstance(node, ScalarNode) and node.tag == _TAG_NULL:
            return
        if not isinstance(node, MappingNode):
            self.error(node, f"sets: expected a mapping of set names, got {_describe(node)}")
            return
        for key, value in node.value:
            if not _is_value(key):
                self.error(key, f"sets: expected a set name, got {_describe(key)}")
                continue
            name = str(key.value)
            if not _SET_NAME_RE.fullmatch(name):
                self.error(key, f"sets: '{name}' is not a valid set name ({SET_NAME_RULE})")
                self.broken_sets.add(name)
                continue
            known = self.sets.get(name)
            if known is not None:
                self.error(
                    key, f"sets: duplicate set '{name}' (first defined at {known.defined_in}:{known.line})"
                )
                continue
            found = self.one_set(name, value)
            if found is None:
                self.broken_sets.add(name)
            else:
                self.sets[name] = found

    def one_set(self, name: str, node: Node) -> SetConfig | None:
        """`NAME: [networks]`, `NAME: {file: PATH, networks: [...], comment: TEXT}` or `NAME: {}`."""
        where = f"sets: {name}"
        line = node.start_mark.line + 1
        errors_before = len(self.issues)
        pairs: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        inline: list[Network] = []
        written = 0
        path = comment = None
        runtime_only = False
        if isinstance(node, MappingNode) or (isinstance(node, ScalarNode) and node.tag == _TAG_NULL):
            found = self.mapping(node, where, SET_KEYS) if isinstance(node, MappingNode) else {}
            runtime_only = not found
            if "networks" in found:
                written += self.inline_networks(found["networks"][1], f"{where}: networks", pairs, inline)
            if "comment" in found:
                comment = self.text(found["comment"][1], f"{where}: comment")
            if "file" in found:
                file_node = found["file"][1]
                word = self.text(file_node, f"{where}: file")
                if word is not None:
                    path = os.path.join(os.path.dirname(self.filename), word)
                    written += self.set_file(file_node, path, where, pairs)
        else:
            written += self.inline_networks(node, where, pairs, inline)
        if len(self.issues) > errors_before:
            return None
        content = SetContent.of(pairs[4], pairs[6], written)
        return SetConfig(name, content, line, self.filename, path, comment, runtime_only, tuple(inline))

    def inline_networks(
        self, node: Node, where: str, pairs: dict[int, list[tuple[int, int]]], inline: list[Network]
    ) -> int:
        count = 0
        for item in self.items(node, where, allow_empty=True):
            if str(item.value).startswith("@"):
                self.error(
                    item, f"{where}: a set holds addresses and networks, not other sets ('{item.value}')"
                )
                continue
            network = self.network(item, where)
            if network is not None:
                pairs[network.version].append(network_range(network))
                inline.append(network)
                count += 1
        return count

    def set_file(self, node: Node, path: str, where: str, pairs: dict[int, list[tuple[int, int]]]) -> int:
        """A set file's networks into `pairs`; its bad lines are issues located in it."""
        try:
            data = self.files.read(path)
        except OSError as err:
            self.error(node, f"{where}: file: cannot read {path}: {err.strerror or err}")
            return 0
        return self.set_data(path, data, pairs)

    def set_file_issues(self, path: str, pairs: dict[int, list[tuple[int, int]]]) -> int:
        """`set_file` for a file read again (refresh_set): a file that cannot be read is an issue
        of its own (there is no policy node to put it on)."""
        try:
            data = self.files.read(path)
        except OSError as err:
            self.issues.append(ConfigIssue(path, 1, 0, f"cannot read: {err.strerror or err}"))
            return 0
        return self.set_data(path, data, pairs)

    def set_data(self, path: str, data: bytes, pairs: dict[int, list[tuple[int, int]]]) -> int:
        self.sources.append(SourceFile(path, hashlib.sha256(data).hexdigest(), "set"))
        try:
            text = _text_of(data, path)
        except ConfigError as err:
            self.issues += err.issues
            return 0
        read = parse_set_text(text)
        for line, message in read.errors[:MAX_SET_FILE_ERRORS]:
            self.issues.append(ConfigIssue(path, line, 0, message))
        if len(read.errors) > MAX_SET_FILE_ERRORS:
            line = read.errors[MAX_SET_FILE_ERRORS][0]
            more = len(read.errors) - MAX_SET_FILE_ERRORS
            self.issues.append(ConfigIssue(path, line, 0, f"and {more} more bad lines from here on"))
        pairs[4] += read.pairs4
        pairs[6] += read.pairs6
        return read.entries

    def set_reference(self, node: ScalarNode, where: str) -> str | None:
        """`@NAME` in an address list: the name of a set of the policy, else an error (the one
        function every address list that takes sets calls)."""
        name = str(node.value)[1:]
        if name in self.sets:
            return name
        if name in self.broken_sets:
            return None  # its definition had errors, reported there
        self.error(node, f"{where}: unknown set '@{name}'{_hint(name, self.sets)}")
        return None

    def zones(self, node: Node) -> tuple[dict[str, tuple[str, ...]], dict[str, ZoneDetail]]:
        """zone -> interfaces (external and internal always present), and the details of the
        zones written as mappings."""
        zones: dict[str, tuple[str, ...]] = {zone: () for zone in ZONES}
        details: dict[str, ZoneDetail] = {}
        if not isinstance(node, MappingNode):
            self.error(node, f"zones: expected a mapping, got {_describe(node)}")
            return zones, details
        owner: dict[str, str] = {}
        seen: set[str] = set()
        outside = False
        for key, value in node.value:
            if not _is_value(key):
                self.error(key, f"zones: expected a zone name, got {_describe(key)}")
                continue
            zone = str(key.value)
            if zone in seen:
                self.error(key, f"zones: duplicate zone '{zone}'")
                continue
            seen.add(zone)
            where = f"zones: {zone}"
            if isinstance(value, MappingNode):
                detail, interfaces_node = self.zone_mapping(value, zone, where)
                if detail is None:
                    continue
                details[zone] = detail
            elif zone in ZONES:
                detail, interfaces_node = ZoneDetail(ZONE_FACES[zone]), value
            else:
                close = difflib.get_close_matches(zone, ZONES, n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                self.error(
                    key,
                    f"{where}: a zone other than external and internal is a mapping that says which side "
                    f"it faces, e.g. {{faces: inside, interfaces: [...]}}{hint}",
                )
                continue
            outside = outside or detail.faces == OUTSIDE
            zones[zone] = self.zone_interfaces(interfaces_node, zone, where, owner)
        if not outside:
            self.error(node, "zones: missing required zone 'external'")
        return zones, details

    def zone_mapping(self, node: MappingNode, zone: str, where: str) -> tuple[ZoneDetail | None, Node | None]:
        found = self.mapping(node, where, ZONE_KEYS, required=("interfaces",) if zone not in ZONES else ())
        faces = ZONE_FACES.get(zone)
        if "faces" in found:
            chosen = self.choice(found["faces"][1], f"{where}: faces", FACES)
            if chosen is not None and faces is not None and chosen != faces:
                self.error(found["faces"][1], f"{where}: faces: zone '{zone}' faces the {faces} by its name")
            faces = chosen or faces
        elif faces is None:
            self.error(node, f"{where}: missing required key 'faces' (outside or inside)")
        networks: list[Network] = []
        if "networks" in found:
            for item in self.items(found["networks"][1], f"{where}: networks"):
                network = self.network(item, f"{where}: networks")
                if network is not None:
                    networks.append(network)
        interfaces = found["interfaces"][1] if "interfaces" in found else None
        if faces is None:
            return None, None
        return ZoneDetail(faces, tuple(networks)), interfaces

    def zone_interfaces(
        self, node: Node | None, zone: str, where: str, owner: dict[str, str]
    ) -> tuple[str, ...]:
        if node is None:
            return ()
        names = []
        for item in self.items(node, where, allow_empty=True):
            name = self.interface(item, where)
            if name is None:
                continue
            if name in owner:
                other = owner[name]
                problem = f"listed twice in '{zone}'" if other == zone else f"already in zone '{other}'"
                self.error(item, f"{where}: interface '{name}' is {problem}")
                continue
            owner[name] = zone
            names.append(name)
        return tuple(names)

    def defaults(self, node: Node) -> DefaultsConfig:
        found = self.mapping(node, "defaults", DEFAULT_KEYS)
        chosen: dict[str, Action] = {}
        for key, (_, value) in found.items():
            choices = ("accept", "drop") if key == "invalid" else ("accept", "drop", "reject")
            action = self.action(value, f"defaults: {key}", choices)
            if action is not None:
                chosen[key] = action
        return DefaultsConfig(**chosen)

    def options(self, node: Node) -> OptionsConfig:
        found = self.mapping(node, "options", OPTION_KEYS)
        values: dict[str, object] = {}
        if "max-flows" in found:
            values["max_flows"] = self.positive_int(found["max-flows"][1], "options: max-flows")
        if "tcp-pickup" in found:
            pickup = self.choice(found["tcp-pickup"][1], "options: tcp-pickup", ("strict", "loose"))
            values["tcp_pickup_loose"] = pickup == "loose" if pickup else None
        if "failure-mode" in found:
            values["failure_mode"] = self.choice(
                found["failure-mode"][1], "options: failure-mode", ("closed", "open")
            )
        if "reload" in found:
            values["reload"] = self.choice(found["reload"][1], "options: reload", ("recheck", "keep"))
        if "log-denied" in found:
            values["log_denied"] = self.boolean(found["log-denied"][1], "options: log-denied")
        if "log-limit" in found or "log-limit-burst" in found:
            values["log_limit"] = self.log_limit(found)
        if "log-format" in found:
            values["log_format"] = self.choice(found["log-format"][1], "options: log-format", LOG_FORMATS)
        if "gateway-addresses" in found:
            values["gateway_addresses"] = self.gateway_addresses(found["gateway-addresses"][1])
        if "prefilter" in found:
            prefilter = self.choice(found["prefilter"][1], "options: prefilter", ("on", "off"))
            values["prefilter"] = None if prefilter is None else prefilter == "on"
        for key in ("new-rate", "new-rate-per-source"):
            if key in found:
                values[key.replace("-", "_")] = self.rate_or_off(found[key][1], f"options: {key}")
        if "offload" in found:
            values["offload"] = self.choice(found["offload"][1], "options: offload", OFFLOAD_MODES)
        if "watch-sets" in found:
            values["watch_sets"] = self.boolean(found["watch-sets"][1], "options: watch-sets")
        if "antispoof" in found:
            self.antispoof_node = found["antispoof"][1]
            values["antispoof"] = self.choice(self.antispoof_node, "options: antispoof", ANTISPOOF_MODES)
        chosen = {key: value for key, value in values.items() if value is not None and value is not _FAILED}
        for key in ("new_rate", "new_rate_per_source"):
            if key in values and values[key] is None:
                chosen[key] = None  # `off`
        return OptionsConfig(**chosen)  # type: ignore[arg-type]

    def rate_or_off(self, node: Node, where: str) -> Rate | object | None:
        """`N/PERIOD` or `off` (no cap); _FAILED when neither (the error is reported)."""
        if _is_value(node) and str(node.value) == "off":
            return None
        rate = self.rate(node, where, allow_off=True)
        return _FAILED if rate is None else Rate(*rate)

    def log_limit(self, found: dict[str, tuple[ScalarNode, Node]]) -> LogLimit | None:
        """`log-limit` and `log-limit-burst`, either one left out keeping its default."""
        count, period, burst = DEFAULT_LOG_LIMIT
        rate: tuple[int, int] | None = (count, period)
        if "log-limit" in found:
            rate = self.rate(found["log-limit"][1], "options: log-limit")
        if "log-limit-burst" in found:
            burst = self.positive_int(found["log-limit-burst"][1], "options: log-limit-burst") or 0
        if rate is None or not burst:
            return None
        return LogLimit(rate[0], rate[1], burst)

    def gateway_addresses(self, node: Node) -> tuple[str, ...]:
        where = "options: gateway-addresses"
        addresses = []
        for item in self.items(node, where):
            try:
                addresses.append(str(ipaddress.ip_address(str(item.value))))
            except ValueError:
                self.error(item, f"{where}: '{item.value}' is not an IP address")
        return tuple(addresses)

    # -- rules ------------------------------------------------------------------------------

    def rules(self, node: Node, side: str, names: dict[str, int]) -> tuple[RuleConfig, ...]:
        if isinstance(node, ScalarNode) and node.tag == _TAG_NULL:
            return ()  # `ingress:` with every rule commented out
        if not isinstance(node, SequenceNode):
            self.error(node, f"{side}: expected a list of rules, got {_describe(node)}")
            return ()
        rules = []
        for index, rule_node in enumerate(node.value):
            rule = self.rule(rule_node, side, index, names)
            if rule is not None:
                rules.append(rule)
        return tuple(rules)

    def rule(self, node: Node, side: str, index: int, names: dict[str, int]) -> RuleConfig | None:
        where = f"{side} rule {index + 1}"
        if not isinstance(node, MappingNode):
            self.error(node, f"{where}: expected a mapping with name and action, got {_describe(node)}")
            return None
        for key, value in node.value:
            if _is_value(key) and key.value == "name" and _is_value(value) and value.value:
                where = f"{side} rule '{value.value}'"
                break
        errors_before = len(self.issues)
        found = self.mapping(node, where, RULE_KEYS, required=("name", "action"))
        state = _Rule(side, where)
        fields: dict[str, object] = {}

        name = self.rule_name(found["name"][1], where, names) if "name" in found else None
        action = self.action(found["action"][1], f"{where}: action") if "action" in found else None
        if "family" in found:
            family = self.choice(found["family"][1], f"{where}: family", ("ipv4", "ipv6"))
            state.family = fields["family"] = None if family is None else int(family[-1])
        if "proto" in found:
            state.protocols = fields["protocols"] = self.protocols(found["proto"][1], state)
        for key, attr in (("from", "src"), ("to", "dst")):
            if key in found:
                fields[attr] = self.addresses(found[key][1], key, state)
        for key, attr in (("ports", "dports"), ("sports", "sports")):
            if key in found:
                fields[attr] = self.ports(*found[key], state)
        if "icmp-types" in found:
            fields["icmp_types_v4"], fields["icmp_types_v6"] = self.icmp_types(*found["icmp-types"], state)
        for key, attr in (("in", "in_ifaces"), ("out", "out_ifaces")):
            if key in found:
                ifaces = [
                    self.interface(item, f"{where}: {key}")
                    for item in self.items(found[key][1], f"{where}: {key}")
                ]
                fields[attr] = tuple(iface for iface in ifaces if iface is not None)
        for key, attr in (("from-zone", "from_zones"), ("to-zone", "to_zones")):
            if key in found:
                fields[attr] = self.rule_zones(found[key][1], key, state)
        if "log" in found:
            fields["log"] = self.boolean(found["log"][1], f"{where}: log")
        fields["limit"] = self.limit(found, where)
        if "synproxy" in found:
            fields["synproxy"] = self.synproxy(*found["synproxy"], state, action)
        if "comment" in found:
            fields["comment"] = self.text(found["comment"][1], f"{where}: comment")
        if self.filename != self.main:
            fields["file"] = self.filename
        self.check_families(node, fields, state)

        if len(self.issues) > errors_before or name is None or action is None:
            return None
        return RuleConfig(name=name, action=action, line=node.start_mark.line + 1, **fields)  # type: ignore[arg-type]

    def rule_name(self, node: Node, where: str, names: dict[str, int]) -> str | None:
        name = self.text(node, f"{where}: name")
        if name is None:
            return None
        if not name.strip():
            self.error(node, f"{where}: name: must not be empty")
            return None
        if name in names:
            first = self.name_files.get(name, self.main)
            at = f"line {names[name]}" if first == self.filename else f"{first}:{names[name]}"
            self.error(node, f"duplicate rule name '{name}' (first used at {at})")
            return None
        names[name] = node.start_mark.line + 1
        self.name_files[name] = self.filename
        return name

    def protocols(self, node: Node, state: _Rule) -> frozenset[int] | None:
        where = f"{state.where}: proto"
        items = self.items(node, where)
        words = [str(item.value).lower() for item in items]
        state.proto_text = ", ".join(words)
        if "any" in words:
            if len(words) > 1:
                self.error(
                    items[words.index("any")], f"{where}: 'any' cannot be combined with other protocols"
                )
            return None
        numbers: set[int] = set()
        errors_before = len(self.issues)
        for item, word in zip(items, words, strict=True):
            if _is_number(word):
                if int(word) > 255:
                    self.error(item, f"{where}: protocol number {word} is out of range 0-255")
                numbers.add(int(word))
            elif word in PROTOCOLS:
                numbers.update(PROTOCOLS[word])
            else:
                self.error(
                    item, f"{where}: unknown protocol '{item.value}'{_hint(word, [*PROTOCOLS, 'any'])}"
                )
        state.proto_failed = len(self.issues) > errors_before or not items
        if state.family is not None and numbers and numbers <= ICMP_PROTOCOLS and len(numbers) == 1:
            only = 6 if PROTO_ICMPV6 in numbers else 4
            if only != state.family:
                self.error(
                    node,
                    f"{where}: {state.proto_text} is IPv{only} only but the rule is family ipv{state.family}",
                )
        return frozenset(numbers)

    def addresses(self, node: Node, key: str, state: _Rule) -> AddressSet | None:
        where = f"{state.where}: {key}"
        items = self.items(node, where)
        words = [str(item.value) for item in items]
        if "any" in words:
            if len(words) > 1:
                self.error(items[words.index("any")], f"{where}: 'any' cannot be combined with addresses")
            return None
        gateway = False
        networks: list[Network] = []
        sets: list[str] = []
        for item, word in zip(items, words, strict=True):
            if word.startswith("@"):
                name = self.set_reference(item, where)
                if name is not None and name not in sets:
                    sets.append(name)
                continue
            if word == "gateway":
                if (state.side, key) in (("ingress", "from"), ("egress", "to")) or state.side == "between":
                    message = (
                        "'gateway' is only meaningful in 'to' of ingress rules and 'from' of egress rules"
                    )
                    self.error(item, f"{where}: {message}")
                gateway = True
                continue
            network = self.network(item, where)
            if network is None:
                continue
            if state.family is not None and network.version != state.family:
                self.error(
                    item,
                    f"{where}: '{word}' is IPv{network.version} but the rule is family ipv{state.family}",
                )
            networks.append(network)
        return AddressSet(gateway, tuple(networks), tuple(sets))

    # Which zones a side's flows can come from (`from-zone`) and go to (`to-zone`): ingress comes
    # from the outside, egress and between from the inside; between goes to the inside.
    ZONE_SIDES = {
        ("ingress", "from-zone"): OUTSIDE,
        ("egress", "from-zone"): INSIDE,
        ("between", "from-zone"): INSIDE,
        ("between", "to-zone"): INSIDE,
    }

    def rule_zones(self, node: Node, key: str, state: _Rule) -> tuple[str, ...]:
        where = f"{state.where}: {key}"
        zones = []
        for item in self.items(node, where):
            zone = str(item.value)
            faces = self.zone_faces.get(zone)
            if faces is None:
                self.error(item, f"{where}: unknown zone '{zone}'{_hint(zone, self.zone_faces)}")
                continue
            wanted = self.ZONE_SIDES.get((state.side, key))
            if wanted is not None and faces != wanted:
                flows = "come from" if key == "from-zone" else "go to"
                self.error(
                    item,
                    f"{where}: zone '{zone}' faces the {faces}, but {state.side} flows {flows} the {wanted}"
                    + (" (flows between inside zones are decided in between)" if faces == INSIDE else ""),
                )
                continue
            zones.append(zone)
        return tuple(zones)

    def network(self, node: ScalarNode, where: str) -> Network | None:
        word = str(node.value)
        try:
            return ipaddress.ip_network(word)
        except ValueError:
            pass
        try:
            network = ipaddress.ip_network(word, strict=False)
        except ValueError:
            self.error(node, f"{where}: '{word}' is not an IP address or network")
            return None
        self.error(node, f"{where}: '{word}' has host bits set (did you mean {network}?)")
        return None

    def ports(self, key_node: ScalarNode, node: Node, state: _Rule) -> tuple[tuple[int, int], ...] | None:
        key = str(key_node.value)
        where = f"{state.where}: {key}"
        if not state.proto_failed and (state.protocols is None or not state.protocols <= PORT_PROTOCOLS):
            proto = (
                f"the rule's proto is {state.proto_text}"
                if state.protocols is not None
                else "the rule has no proto"
            )
            self.error(key_node, f"{where}: needs proto tcp or udp, the only protocols with ports ({proto})")
        ranges = []
        for item in self.items(node, where):
            port_range = self.port_range(item, where)
            if port_range is not None:
                ranges.append(port_range)
        return _merge(ranges)

    def port_range(self, node: ScalarNode, where: str) -> tuple[int, int] | None:
        word = str(node.value)
        single = _PORT_RE.fullmatch(word) if node.tag in (_TAG_INT, _TAG_STR) else None
        double = _RANGE_RE.fullmatch(word) if node.tag == _TAG_STR else None
        if single:
            first = last = int(single.group(1))
        elif double:
            first, last = int(double.group(1)), int(double.group(2))
        elif node.tag == _TAG_STR and _SERVICE_RE.fullmatch(word.lower()):
            service = word.lower()
            if service not in SERVICES:
                self.error(node, f"{where}: unknown service '{word}'{_hint(service, SERVICES)}")
                return None
            first = last = SERVICES[service]
        else:
            self.error(node, f"{where}: '{word}' is not a port or a range like 8000-8100")
            return None
        bad = [port for port in (first, last) if not 1 <= port <= 65535]
        if bad:
            self.error(node, f"{where}: port {bad[0]} is out of range 1-65535")
            return None
        if first > last:
            self.error(node, f"{where}: range '{word}' starts after it ends")
            return None
        return first, last

    def icmp_types(
        self, key_node: ScalarNode, node: Node, state: _Rule
    ) -> tuple[frozenset[int], frozenset[int]]:
        where = f"{state.where}: icmp-types"
        protocols = state.protocols
        if state.proto_failed:
            protocols = ICMP_PROTOCOLS
        elif not protocols or not protocols <= ICMP_PROTOCOLS:
            proto = (
                f"the rule's proto is {state.proto_text}"
                if protocols is not None
                else "the rule has no proto"
            )
            self.error(key_node, f"{where}: needs proto icmp or icmpv6 ({proto})")
            protocols = ICMP_PROTOCOLS  # still check the names
        families = [
            family
            for family, proto in ((4, PROTO_ICMP), (6, PROTO_ICMPV6))
            if proto in protocols and state.family in (None, family)
        ]
        types: dict[int, set[int]] = {4: set(), 6: set()}
        for item in self.items(node, where):
            word = str(item.value).lower()
            if _is_number(word):
                self.icmp_number(item, int(word), families, types, where)
            elif word in ICMP_TYPES:
                self.icmp_name(item, word, families, types, where)
            else:
                self.error(item, f"{where}: unknown ICMP type '{item.value}'{_hint(word, ICMP_TYPES)}")
        return frozenset(types[4]), frozenset(types[6])

    def icmp_number(
        self, node: Node, number: int, families: list[int], types: dict[int, set[int]], where: str
    ) -> None:
        if number > 255:
            self.error(node, f"{where}: ICMP type {number} is out of range 0-255")
        elif len(families) > 1:
            # ICMPv4 and ICMPv6 number their types differently: a bare number would mean two
            # different messages on the two families.
            message = (
                f"type number {number} is ambiguous with proto icmp, which covers ICMPv4 and ICMPv6: "
                "use a name, or family ipv4 / ipv6"
            )
            self.error(node, f"{where}: {message}")
        elif families:  # none: proto and family conflict, reported already
            types[families[0]].add(number)

    def icmp_name(
        self, node: Node, word: str, families: list[int], types: dict[int, set[int]], where: str
    ) -> None:
        numbers = dict(zip((4, 6), ICMP_TYPES[word], strict=True))
        usable = [family for family in families if numbers[family] is not None]
        if families and not usable:  # without families, proto and family conflict: reported already
            names = " or ".join(f"ICMPv{family}" for family in families)
            self.error(node, f"{where}: '{word}' does not exist in {names}")
        for family in usable:
            types[family].add(numbers[family])  # type: ignore[arg-type]

    def synproxy(self, key_node: ScalarNode, node: Node, state: _Rule, action: Action | None) -> bool | None:
        """`synproxy: true`: only where the kernel's SYNPROXY can stand in for the rule, an
        ingress rule accepting TCP (and only TCP)."""
        where = f"{state.where}: synproxy"
        value = self.boolean(node, where)
        if not value:
            return value
        if state.side != "ingress":
            self.error(key_node, f"{where}: only for ingress rules (it answers SYNs from the outside)")
        elif action is not None and action is not Action.ACCEPT:
            self.error(key_node, f"{where}: only for rules with action accept (this one is {action.value})")
        elif not state.proto_failed and state.protocols != frozenset({PROTO_TCP}):
            proto = (
                f"the rule's proto is {state.proto_text}"
                if state.protocols is not None
                else "the rule has no proto"
            )
            self.error(key_node, f"{where}: needs proto tcp ({proto})")
        return value

    def limit(self, found: dict[str, tuple[ScalarNode, Node]], where: str) -> LimitConfig | None:
        rate = self.rate(found["limit"][1], f"{where}: limit") if "limit" in found else None
        burst = DEFAULT_LIMIT_BURST
        per_source = False
        for key in ("limit-burst", "limit-per"):
            if key in found and "limit" not in found:
                self.error(found[key][0], f"{where}: {key}: only meaningful together with limit")
        if "limit-burst" in found:
            burst = self.positive_int(found["limit-burst"][1], f"{where}: limit-burst") or burst
        if "limit-per" in found:
            per_source = (
                self.choice(found["limit-per"][1], f"{where}: limit-per", ("rule", "source")) == "source"
            )
        if rate is None:
            return None
        return LimitConfig(rate[0], rate[1], burst, per_source)

    def rate(self, node: Node, where: str, allow_off: bool = False) -> tuple[int, int] | None:
        word = self.text(node, where)
        if word is None:
            return None
        match = _LIMIT_RE.fullmatch(word.lower())
        if not match or match.group(2) not in _LIMIT_UNITS:
            off = " or off" if allow_off else ""
            self.error(node, f"{where}: expected N/second, N/minute, N/hour or N/day{off}, got '{word}'")
            return None
        if int(match.group(1)) < 1:
            self.error(node, f"{where}: the rate must be at least 1, got '{word}'")
            return None
        return int(match.group(1)), _LIMIT_UNITS[match.group(2)]

    def check_families(self, node: Node, fields: dict[str, object], state: _Rule) -> None:
        """Without `family`, a rule whose proto and addresses share no IP version could never match."""
        if state.family is not None:
            return  # mismatches against an explicit family are reported item by item
        possible = {4, 6}
        protocols = state.protocols
        if protocols and protocols <= ICMP_PROTOCOLS and len(protocols) == 1:
            possible &= {6} if PROTO_ICMPV6 in protocols else {4}
        for attr in ("src", "dst"):
            addresses = fields.get(attr)
            if (
                isinstance(addresses, AddressSet)
                and addresses.networks
                and not addresses.gateway
                and not addresses.sets  # a set may hold either family (and gain entries at run time)
            ):
                possible &= {network.version for network in addresses.networks}
        if not possible:
            self.error(
                node, f"{state.where}: can never match: its proto, from and to have no IP version in common"
            )


class _NatChecker:
    """The `nat:` section, checked with the policy checker's shapes (its issues are the checker's)."""

    def __init__(
        self, checker: _Checker, zones: dict[str, tuple[str, ...]], details: dict[str, ZoneDetail]
    ) -> None:
        self.c = checker
        self.zones = zones
        self.details = details

    def all_nat(self, top: dict[str, tuple[ScalarNode, Node]], names: dict[str, int]) -> NatConfig | None:
        """The main file's `nat:`, then each included file's, appended in the order read; None
        when no file has one."""
        sections = [(self.c.main, top["nat"][1])] if "nat" in top else []
        sections += [(filename, found["nat"][1]) for filename, found in self.c.included if "nat" in found]
        if not sections:
            return None
        masquerade: list[SourceNatConfig] = []
        snat: list[SourceNatConfig] = []
        forward: list[ForwardConfig] = []
        for filename, node in sections:
            with self.c.reading(filename):
                section = self.nat(node, names)
            masquerade += section.masquerade
            snat += section.snat
            forward += section.forward
        files = tuple(filename for filename, _ in sections if filename != self.c.main)
        return NatConfig(tuple(masquerade), tuple(snat), tuple(forward), files)

    def nat(self, node: Node, names: dict[str, int]) -> NatConfig:
        """One file's `nat:` section (the file being read)."""
        if isinstance(node, ScalarNode) and node.tag == _TAG_NULL:
            return NatConfig()  # `nat:` with every entry commented out
        found = self.c.mapping(node, "nat", NAT_KEYS)
        lists: dict[str, list[Node]] = {}
        for key, (_, value) in found.items():
            if isinstance(value, ScalarNode) and value.tag == _TAG_NULL:
                lists[key] = []
            elif isinstance(value, SequenceNode):
                lists[key] = list(value.value)
            else:
                self.c.error(value, f"nat: {key}: expected a list, got {_describe(value)}")
        masquerade = [
            entry
            for i, n in enumerate(lists.get("masquerade", []))
            for entry in self.source_nat(n, "masquerade", i)
        ]
        snat = [entry for i, n in enumerate(lists.get("snat", [])) for entry in self.source_nat(n, "snat", i)]
        forwards = [self.forward(n, i, names) for i, n in enumerate(lists.get("forward", []))]
        return NatConfig(tuple(masquerade), tuple(snat), tuple(f for f in forwards if f is not None))

    # -- source NAT -----------------------------------------------------------------------

    def source_nat(self, node: Node, kind: str, index: int) -> list[SourceNatConfig]:
        where = f"nat: {kind} {index + 1}"
        snat = kind == "snat"
        keys, required = (SNAT_KEYS, ("out", "to")) if snat else (MASQUERADE_KEYS, ("out",))
        if not isinstance(node, MappingNode):
            self.c.error(
                node, f"{where}: expected a mapping with {' and '.join(required)}, got {_describe(node)}"
            )
            return []
        errors_before = len(self.c.issues)
        found = self.c.mapping(node, where, keys, required=required)
        out = self.interfaces(found["out"][1], f"{where}: out") if "out" in found else ()
        to = self.address(found["to"][1], f"{where}: to") if "to" in found else None
        family = None
        if to is not None:
            family = to.version
        elif "family" in found:
            chosen = self.c.choice(found["family"][1], f"{where}: family", ("ipv4", "ipv6"))
            family = None if chosen is None else int(chosen[-1])
        sources, sets = (
            self.sources(found["from"][1], f"{where}: from", family) if "from" in found else (None, ())
        )
        if len(self.c.issues) > errors_before:
            return []
        if family is not None:
            families = [family]
        elif sources:
            families = sorted({network.version for network in sources})
        else:
            # masquerading is IPv4's habit; IPv6 needs `family: ipv6` or IPv6 networks (a set
            # holds both families and adds its members of the entry's family)
            families = [4]
        line, col = node.start_mark.line + 1, node.start_mark.column + 1
        return [
            SourceNatConfig(
                line,
                col,
                version,
                out,
                None if sources is None else tuple(n for n in sources if n.version == version),
                to,
                sets,
                self.c.filename if self.c.filename != self.c.main else None,
            )
            for version in families
        ]

    # -- forwards -------------------------------------------------------------------------

    def forward(self, node: Node, index: int, names: dict[str, int]) -> ForwardConfig | None:
        where = f"nat: forward {index + 1}"
        required = ("name", "proto", "ports", "to")
        if not isinstance(node, MappingNode):
            self.c.error(
                node, f"{where}: expected a mapping with {', '.join(required)}, got {_describe(node)}"
            )
            return None
        for key, value in node.value:
            if _is_value(key) and key.value == "name" and _is_value(value) and value.value:
                where = f"forward '{value.value}'"
                break
        errors_before = len(self.c.issues)
        found = self.c.mapping(node, where, FORWARD_KEYS, required=required)
        name = self.name(found["name"][1], where, names) if "name" in found else None
        state = _Rule("forward", where)
        protocols = frozenset[int]()
        if "proto" in found:
            state.protocols = self.c.protocols(found["proto"][1], state)
            protocols = state.protocols or frozenset()
            if not state.proto_failed and (not protocols or not protocols <= PORT_PROTOCOLS):
                self.c.error(
                    found["proto"][1],
                    f"{where}: proto: a forward translates ports: tcp, udp or both (not {state.proto_text})",
                )
                state.proto_failed = True
        ports = self.c.ports(*found["ports"], state) if "ports" in found else ()
        to = self.address(found["to"][1], f"{where}: to") if "to" in found else None
        family = None if to is None else to.version
        to_port = self.to_port(found, ports, where)
        fields: dict[str, object] = {}
        if "in" in found:
            fields["in_ifaces"] = self.interfaces(found["in"][1], f"{where}: in")
        if "from" in found:
            fields["src"], fields["sets"] = self.sources(found["from"][1], f"{where}: from", family)
        if self.c.filename != self.c.main:
            fields["file"] = self.c.filename
        if "address" in found:
            address = self.address(found["address"][1], f"{where}: address")
            if address is not None and family is not None and address.version != family:
                self.c.error(
                    found["address"][1],
                    f"{where}: address: {address} is IPv{address.version} but to is IPv{family}",
                )
            fields["address"] = address
        for key, attr in (("pass", "passes"), ("log", "log"), ("hairpin", "hairpin")):
            if key in found:
                fields[attr] = self.c.boolean(found[key][1], f"{where}: {key}")
        if "comment" in found:
            fields["comment"] = self.c.text(found["comment"][1], f"{where}: comment")
        if "in_ifaces" not in fields:
            fields["in_ifaces"] = self.outside_interfaces()
            if not fields["in_ifaces"]:
                self.c.error(node, f"{where}: no 'in', and no zone facing the outside has interfaces")
        if to is not None:
            self.reached(found["to"][1], to, where)
        if len(self.c.issues) > errors_before or name is None or to is None or family is None:
            return None
        return ForwardConfig(
            name=name,
            line=node.start_mark.line + 1,
            col=node.start_mark.column + 1,
            family=family,
            protocols=protocols,
            ports=ports or (),
            to=to,
            to_port=to_port,
            **{key: value for key, value in fields.items() if value is not None},  # type: ignore[arg-type]
        )

    def name(self, node: Node, where: str, names: dict[str, int]) -> str | None:
        name = self.c.text(node, f"{where}: name")
        if name is None:
            return None
        if not name.strip():
            self.c.error(node, f"{where}: name: must not be empty")
            return None
        if name in names:
            first = self.c.name_files.get(name, self.c.main)
            at = f"line {names[name]}" if first == self.c.filename else f"{first}:{names[name]}"
            self.c.error(node, f"duplicate name '{name}': a rule or forward at {at} has it already")
            return None
        names[name] = node.start_mark.line + 1
        self.c.name_files[name] = self.c.filename
        return name

    def to_port(self, found: dict[str, tuple[ScalarNode, Node]], ports: object, where: str) -> int | None:
        if "to-port" not in found:
            return None
        key_node, node = found["to-port"]
        port_range = self.c.port_range(node, f"{where}: to-port") if _is_value(node) else None
        if not _is_value(node):
            self.c.error(node, f"{where}: to-port: expected a single port, got {_describe(node)}")
            return None
        if port_range is None:
            return None
        if port_range[0] != port_range[1]:
            self.c.error(node, f"{where}: to-port: expected a single port, got '{node.value}'")
            return None
        if isinstance(ports, tuple) and sum(last - first + 1 for first, last in ports) > 1:
            public = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ports)
            self.c.error(
                key_node,
                f"{where}: to-port: maps a single public port, but ports has several ({public}): "
                "write one forward per port",
            )
            return None
        return port_range[0]

    def reached(self, node: Node, to: Address, where: str) -> None:
        """A forward's target must lie in the networks of some zone."""
        if any(to in network for detail in self.details.values() for network in detail.networks):
            return
        self.c.error(
            node,
            f"{where}: to: {to} is in no zone's networks; name the networks behind the zone that reaches "
            f"it, e.g. zones: internal: {{interfaces: [lan0], networks: [...]}}",
        )

    def outside_interfaces(self) -> tuple[str, ...]:
        return tuple(
            name
            for zone, names in self.zones.items()
            if (self.details[zone].faces if zone in self.details else ZONE_FACES.get(zone)) == OUTSIDE
            for name in names
        )

    # -- shapes ---------------------------------------------------------------------------

    def interfaces(self, node: Node, where: str) -> tuple[str, ...]:
        names = [self.c.interface(item, where) for item in self.c.items(node, where)]
        return tuple(name for name in names if name is not None)

    def address(self, node: Node, where: str) -> Address | None:
        word = self.c.text(node, where)
        if word is None:
            return None
        try:
            return ipaddress.ip_address(word)
        except ValueError:
            self.c.error(node, f"{where}: '{word}' is not an IP address")
            return None

    def sources(
        self, node: Node, where: str, family: int | None
    ) -> tuple[tuple[Network, ...] | None, tuple[str, ...]]:
        """`from`: its networks (None: any) and the sets it names (`@NAME`, in the kernel's nat
        table an ipset each: a set holds both families, the entry takes its own family's members)."""
        items = self.c.items(node, where)
        if [str(item.value) for item in items] == ["any"]:
            return None, ()
        networks = []
        sets: list[str] = []
        for item in items:
            if str(item.value).startswith("@"):
                name = self.c.set_reference(item, where)
                if name is not None and name not in sets:
                    sets.append(name)
                continue
            network = self.c.network(item, where)
            if network is None:
                continue
            if family is not None and network.version != family:
                self.c.error(
                    item, f"{where}: '{item.value}' is IPv{network.version} but the entry is IPv{family}"
                )
                continue
            networks.append(network)
        return tuple(networks), tuple(sets)


def ipv6_nat_issues(config: PolicyConfig, missing: str) -> list[ConfigIssue]:
    """Issues for every IPv6 entry of `config`'s nat when the kernel lacks IPv6 NAT (`missing`
    says what it lacks); empty when the policy translates no IPv6."""
    if config.nat is None:
        return []
    return [
        ConfigIssue(file or config.filename, line, col, f"nat: {what}: IPv6 NAT is not available: {missing}")
        for file, line, col, what in config.nat.ipv6_entries()
    ]


def nat_set_issues(config: PolicyConfig, missing: str) -> list[ConfigIssue]:
    """Issues for every nat entry whose `from` names a set when the kernel rules cannot match
    sets (`missing` says why): the nat table has no other way to follow a set, and leaving the
    set out would translate what the policy does not say. Empty when nat names no set."""
    if config.nat is None:
        return []
    return [
        ConfigIssue(
            file or config.filename,
            line,
            col,
            f"nat: {what}: from: '@{name}' needs the kernel's ipsets, which cannot be used here: {missing}",
        )
        for file, line, col, what, names in config.nat.set_entries()
        for name in names
    ]


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sort and join overlapping or adjacent port ranges."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return tuple(merged)
