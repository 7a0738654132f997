"""The kernel pre-filter: which first packets the kernel may drop (or reject) before the queue.

Pure: a validated policy in, an ordered list of kernel rules out, plus `evaluate`, the same
rules applied to one packet in Python (the property test holds it against the engine; the
iptables backend renders each field of a KernelMatch as exactly one match option).

What is pre-filtered. A *first packet* -- a TCP SYN (SYN set; ACK, RST, FIN clear), an ICMP /
ICMPv6 echo request, and optionally any UDP datagram -- that the kernel's conntrack calls NEW,
arriving on an interface outside the internal zone (INPUT or FORWARD): the policy's ingress
side. For each hook and family the ingress rules become kernel rules in their order:

- a rule that could accept the packet (accept, or any rule with a `limit`, whose bucket only
  nfqfw holds) -> RETURN: nfqfw decides, the packet goes on to the queue;
- a drop rule -> DROP, a reject rule -> REJECT with nfqfw's answer (tcp-reset,
  icmp-port-unreachable, icmp-admin-prohibited), rate-limited in the kernel;
- a rule none of whose packets is a first packet of these protocols, or that never matches on
  this hook (`out:` on INPUT, `to:` only the gateway on FORWARD) -> nothing;
- a set (`@NAME`) in a drop or reject rule -> a match on the set's kernel ipset (`src_set`,
  `dst_set`; with `kernel_sets`, the backend's), which holds the set's networks and runtime
  entries as nfqfw does; a set in a rule that RETURNs, or without kernel sets, widens that
  address to any (RETURN over a superset is safe): a set in the kernel only ever drops;
and the side's default last. A kernel rule that would take more than MAX_EXPANSION iptables
rules (addresses x interfaces x port chunks) is widened to a RETURN without the dimension
that made it large: RETURN over a superset is always safe.

Invariant (tests/unit/core/test_prefilter.py, a property test over random policies, histories
and packets): a packet `evaluate` drops (rejects) is one Engine.process drops (rejects the
same way), whatever the engine's flow table holds, provided the kernel's conntrack knows
every flow nfqfw tracks -- the kernel calls a packet NEW only when it has no entry for it,
and the two tables admit the same flows (both confirm an entry when its first packet is
accepted, with the same state machine). Where that proviso can fail:
- flows nfqfw restored from a snapshot after a reboot, which the kernel never saw: a UDP
  reply to such a flow is NEW to the kernel. Hence UDP is pre-filtered only when asked
  (`udp=True`); TCP SYNs and echo requests of a restored flow are NEW to the kernel only in
  shapes nfqfw accepts rarely (a SYN into an established connection, a simultaneous open);
- `defaults.invalid: accept`: a packet nfqfw finds malformed but the kernel NEW would be
  accepted by nfqfw; so nothing is pre-filtered unless invalid packets are dropped.

Zones and forwards. "Outside the internal zone" is outside every zone that faces the inside. A
rule's `from-zone` / `to-zone` become `-i` / `-o` the zones' interfaces when the kernel's
pattern match is the zones' own (no interface of another zone matches those patterns); otherwise
the dimension is dropped and the rule widened to a RETURN. The kernel rules see a forwarded
packet already translated (nat PREROUTING comes first): before the ingress rules, each forward
that admits what it translates (`pass`) is a RETURN on its translated destination, port, source
(any, when its `from` names a set) and interfaces: nfqfw decides it.

Besides, with `defaults.invalid: drop`, TCP packets whose flags nfqfw always calls INVALID
(INVALID_TCP_FLAGS, the kernel's tcp_valid_flags) are dropped statelessly, whatever either
table holds: a flood of fuzzed segments never reaches the queue.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from nfqfw.core.config import (
    INSIDE,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    AddressSet,
    PolicyConfig,
    RuleConfig,
)
from nfqfw.core.reject import ICMP_ADMIN_PROHIBITED, ICMP_PORT_UNREACHABLE, TCP_RESET
from nfqfw.core.sets import Ranges
from nfqfw.core.verdict import Action, Hook

RETURN, DROP, REJECT = "return", "drop", "reject"
MULTIPORT_SLOTS = 15  # iptables -m multiport: at most 15 ports, a range takes two
MAX_EXPANSION = 64  # kernel rules one policy rule may become before it is widened to a RETURN
HOOKS = (Hook.INPUT, Hook.FORWARD)
ECHO_REQUEST = {4: 8, 6: 128}
ICMP_OF = {4: PROTO_ICMP, 6: PROTO_ICMPV6}

# TCP flag bits as on the wire.
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_CHECKED = FIN | SYN | RST | ACK | URG  # ECE, CWR and PSH do not count (tcp_valid_flags)
_VALID = frozenset({SYN, SYN | URG, SYN | ACK, RST, RST | ACK, FIN | ACK, FIN | ACK | URG, ACK, ACK | URG})
# (mask, comp) pairs, as iptables --tcp-flags MASK COMP: together they match exactly the
# segments whose flags (ECE, CWR and PSH aside) are not in _VALID.
INVALID_TCP_FLAGS: tuple[tuple[int, int], ...] = (
    (SYN | FIN, SYN | FIN),  # SYN+FIN, with anything
    (SYN | RST, SYN | RST),  # SYN+RST
    (FIN | ACK, FIN),  # FIN without ACK (FIN alone, FIN+URG, FIN+RST, ...)
    (SYN | RST | ACK, 0),  # none of SYN, RST, ACK: NULL, URG alone, FIN(+URG) alone
    (RST | URG, RST | URG),  # RST+URG
    (SYN | ACK | URG, SYN | ACK | URG),  # SYN+ACK+URG
    (RST | FIN, RST | FIN),  # RST+FIN(+ACK)
)


def tcp_flags_invalid(flags: int) -> bool:
    """The kernel's (and nfqfw's) verdict on a flag combination alone."""
    return (flags & _CHECKED) not in _VALID


class KernelMatch(NamedTuple):
    """One iptables rule's matches; None matches anything. Ports as multiport takes them."""

    proto: int
    src: str | None = None  # a network, e.g. "203.0.113.0/24"
    dst: str | None = None
    dports: tuple[tuple[int, int], ...] | None = None
    sports: tuple[tuple[int, int], ...] | None = None
    in_iface: str | None = None  # as iptables -i: a name, or a prefix ending in '+'
    out_iface: str | None = None
    src_set: str | None = None  # a set of the policy (its kernel ipset): the source is in it
    dst_set: str | None = None


class SetRef(NamedTuple):
    """A set in an address dimension of a kernel rule (while it is being expanded)."""

    name: str


@dataclass(frozen=True)
class KernelSet:
    """One family's part of a set the pre-filter matches: its networks from the policy (the
    runtime entries follow through the firewall backend's set_entry)."""

    name: str
    family: int
    content: Ranges

    def cidrs(self) -> Iterator[str]:
        return self.content.cidrs()


class KernelRule(NamedTuple):
    match: KernelMatch
    action: str  # RETURN, DROP or REJECT
    reason: str  # "rule NAME" or "default ingress", as nfqfw's verdicts say it
    reject_with: str | None = None  # core.reject kinds, for REJECT
    log: bool = False  # a sample goes to nfqfw, so the packet log shows these drops too


@dataclass(frozen=True)
class Prefilter:
    """What the kernel may decide for nfqfw; empty when nothing (prefilter off, invalid accept)."""

    internal_ifaces: tuple[str, ...] = ()  # their packets are egress: RETURN first
    udp: bool = False  # UDP datagrams are first packets too
    chains: tuple[tuple[int, Hook, tuple[KernelRule, ...]], ...] = ()  # (family, hook, rules)
    invalid_tcp_flags: tuple[tuple[int, int], ...] = ()

    def rules(self, family: int, hook: Hook) -> tuple[KernelRule, ...]:
        for chain_family, chain_hook, rules in self.chains:
            if (chain_family, chain_hook) == (family, hook):
                return rules
        return ()

    def protocols(self, family: int) -> tuple[int, ...]:
        """The protocols of the first packets pre-filtered for `family`."""
        return (PROTO_TCP, *((PROTO_UDP,) if self.udp else ()), ICMP_OF[family])

    def sets(self, family: int) -> list[str]:
        """The names of the sets the kernel rules of `family` match, in order of first use."""
        found: dict[str, None] = {}
        for chain_family, _, rules in self.chains:
            if chain_family == family:
                for rule in rules:
                    for name in (rule.match.src_set, rule.match.dst_set):
                        if name is not None:
                            found[name] = None
        return list(found)

    @property
    def active(self) -> bool:
        return bool(self.invalid_tcp_flags) or any(
            rule.action != RETURN for _, _, rules in self.chains for rule in rules
        )


def derive(policy: PolicyConfig, udp: bool = False, kernel_sets: bool = False) -> Prefilter:
    """The pre-filter for `policy` (see the module docstring); `udp` adds UDP datagrams;
    `kernel_sets`: the backend can match sets (else a rule's sets widen it to a RETURN)."""
    if not policy.options.prefilter or policy.defaults.invalid is not Action.DROP:
        return Prefilter()
    log_denied = policy.options.log_denied
    shell = Prefilter(policy.interfaces_facing(INSIDE), udp, (), INVALID_TCP_FLAGS)
    zone_ifaces = _exact_zone_interfaces(policy)
    chains = []
    for family in (4, 6):
        for hook in HOOKS:
            rules: list[KernelRule] = _forward_returns(policy, family, shell.protocols(family))
            for rule in policy.ingress:
                rules += _rule(
                    rule, family, hook, shell.protocols(family), log_denied, zone_ifaces, kernel_sets
                )
            default = policy.defaults.ingress
            for proto in shell.protocols(family):
                rules.append(_kernel_rule(KernelMatch(proto), default, "default ingress", log_denied))
            chains.append((family, hook, _trim(rules)))
    prefilter = Prefilter(shell.internal_ifaces, udp, tuple(chains), INVALID_TCP_FLAGS)
    return prefilter


def _trim(rules: list[KernelRule]) -> tuple[KernelRule, ...]:
    """Without any DROP/REJECT the chain decides nothing: empty it (everything goes on)."""
    if all(rule.action == RETURN for rule in rules):
        return ()
    while rules and rules[-1].action == RETURN:
        rules.pop()  # a trailing RETURN is what the chain's end does anyway
    return tuple(rules)


def _kernel_rule(match: KernelMatch, action: Action, reason: str, log_denied: bool) -> KernelRule:
    if action is Action.ACCEPT:
        return KernelRule(match, RETURN, reason)
    if action is Action.DROP:
        return KernelRule(match, DROP, reason, None, log_denied)
    return KernelRule(match, REJECT, reason, _reject_kind(match.proto), log_denied)


def _reject_kind(proto: int) -> str:
    """As nfqfw.core.engine.reject_kind."""
    if proto == PROTO_TCP:
        return TCP_RESET
    if proto == PROTO_UDP:
        return ICMP_PORT_UNREACHABLE
    return ICMP_ADMIN_PROHIBITED


def _forward_returns(policy: PolicyConfig, family: int, protocols: tuple[int, ...]) -> list[KernelRule]:
    """RETURN for the translated packets of every forward that admits them (module docstring)."""
    if policy.nat is None:
        return []
    returns = []
    for forward in policy.nat.forward:
        if not forward.passes or forward.family != family:
            continue
        # A set in `from` widens the RETURN to any source (a set in the kernel only ever drops):
        # the nat table translated only its members, the rest is nfqfw's to drop.
        sources: list[str | None] = (
            [None] if forward.src is None or forward.sets else [str(n) for n in forward.src]
        )
        target = f"{forward.to}/{32 if family == 4 else 128}"
        for proto in sorted(forward.protocols):
            if proto not in protocols:
                continue
            for ports in port_chunks(forward.translated_ports):
                for iface in forward.in_ifaces:
                    for src in sources:
                        match = KernelMatch(proto, src, target, ports, None, iface)
                        returns.append(KernelRule(match, RETURN, f"forward {forward.name}"))
    return returns


def _exact_zone_interfaces(policy: PolicyConfig) -> dict[str, tuple[str, ...] | None]:
    """zone -> its interface patterns, when `-i PATTERN` matches exactly the zone's interfaces
    (no pattern of another zone overlaps one of them); None when the kernel cannot tell the
    zone apart (a wildcard over another zone's name, an exact name under a wildcard)."""
    owned = [(pattern, zone) for zone, names in policy.zones.items() for pattern in names]
    exact: dict[str, tuple[str, ...] | None] = {}
    for zone, names in policy.zones.items():
        clash = any(_overlap(mine, theirs) for mine in names for theirs, other in owned if other != zone)
        exact[zone] = None if clash else names
    return exact


def _overlap(first: str, second: str) -> bool:
    """Could one interface name match both patterns?"""
    a, b = first.rstrip("+"), second.rstrip("+")
    if first.endswith("+") and second.endswith("+"):
        return a.startswith(b) or b.startswith(a)
    if first.endswith("+"):
        return b.startswith(a)
    if second.endswith("+"):
        return a.startswith(b)
    return a == b


def _zone_patterns(
    zones: tuple[str, ...] | None, zone_ifaces: dict[str, tuple[str, ...] | None]
) -> list[str | None] | None:
    """The `-i`/`-o` patterns of `zones` ([None]: any; []: never), None when they cannot be told
    exactly (widen)."""
    if zones is None:
        return [None]
    patterns: list[str | None] = []
    for zone in zones:
        names = zone_ifaces.get(zone)
        if names is None:
            return None
        patterns += names
    return patterns


def kernel_sets(prefilter: Prefilter, policy: PolicyConfig) -> tuple[KernelSet, ...]:
    """The sets the pre-filter's rules match, per family, with the policy's networks."""
    return tuple(
        KernelSet(name, family, policy.sets[name].content.family(family))
        for family in (4, 6)
        for name in prefilter.sets(family)
    )


def _rule(
    rule: RuleConfig,
    family: int,
    hook: Hook,
    protocols: tuple[int, ...],
    log_denied: bool,
    zone_ifaces: dict[str, tuple[str, ...] | None] | None = None,
    kernel_sets: bool = False,
) -> list[KernelRule]:
    """The kernel rules standing for one policy rule on one hook and family."""
    if rule.family not in (None, family):
        return []
    if hook is Hook.INPUT and (rule.out_ifaces is not None or rule.to_zones is not None):
        return []  # nfqfw sees no output interface on INPUT: the rule never matches there
    from_zone = _zone_patterns(rule.from_zones, zone_ifaces or {})
    to_zone = _zone_patterns(rule.to_zones, zone_ifaces or {})
    if from_zone == [] or to_zone == []:
        return []  # zones without interfaces: never matches
    reason = f"rule {rule.name}"
    log = rule.log or log_denied
    kernel_rules: list[KernelRule] = []
    for proto in protocols:
        if rule.protocols is not None and proto not in rule.protocols:
            continue
        if proto == ICMP_OF[family] and rule.icmp_types_v4 is not None:
            allowed = rule.icmp_types_v4 if family == 4 else rule.icmp_types_v6
            if allowed is not None and ECHO_REQUEST[family] not in allowed:
                continue
        if proto not in (PROTO_TCP, PROTO_UDP) and (rule.dports or rule.sports):
            continue  # ports only exist for TCP and UDP: never matches
        action = Action.ACCEPT if rule.limit is not None else rule.action  # a bucket only nfqfw holds
        ifaces: dict[str, list[str | None]] = {
            "in_iface": list(rule.in_ifaces) if rule.in_ifaces is not None else [None],
            "out_iface": list(rule.out_ifaces)
            if rule.out_ifaces is not None and hook is Hook.FORWARD
            else [None],
        }
        # A zone is one more interface condition: as -i/-o when the rule names no interface on that
        # side and the kernel can tell the zone; otherwise left out, and only a RETURN may stand.
        for key, patterns in (("in_iface", from_zone), ("out_iface", to_zone)):
            if patterns == [None]:
                continue
            if patterns is not None and ifaces[key] == [None]:
                ifaces[key] = list(patterns)
            else:
                action = Action.ACCEPT
        # after the zones: a rule widened to a RETURN must not match a set in the kernel
        in_kernel = kernel_sets and action is not Action.ACCEPT
        sources = _networks(rule.src, family, hook, is_src=True, sets=in_kernel)
        destinations = _networks(rule.dst, family, hook, is_src=False, sets=in_kernel)
        if sources == [] or destinations == []:
            continue  # no address of this family (or on this hook) can match
        if not in_kernel and any(
            addresses is not None and addresses.sets for addresses in (rule.src, rule.dst)
        ):
            action = Action.ACCEPT  # a set nfqfw alone holds: let nfqfw decide (RETURN over any)
        dimensions: dict[str, list[object]] = {
            "src": sources,
            "dst": destinations,
            "dports": port_chunks(rule.dports),
            "sports": port_chunks(rule.sports),
            "in_iface": ifaces["in_iface"],
            "out_iface": ifaces["out_iface"],
        }
        if _size(dimensions) > MAX_EXPANSION:
            action = Action.ACCEPT  # widened below: only a RETURN may match more than the rule
            while _size(dimensions) > MAX_EXPANSION:
                widest = max(dimensions, key=lambda key: len(dimensions[key]))
                dimensions[widest] = [None]
        for fields in _product(dimensions):
            for side in ("src", "dst"):
                if isinstance(fields[side], SetRef):
                    fields[f"{side}_set"] = fields[side].name  # type: ignore[attr-defined]
                    fields[side] = None
            match = KernelMatch(proto, **fields)  # type: ignore[arg-type]
            kernel_rule = _kernel_rule(match, action, reason, log)
            kernel_rules.append(kernel_rule)
    return kernel_rules


def _networks(
    addresses: AddressSet | None, family: int, hook: Hook, is_src: bool, sets: bool = False
) -> list[str | SetRef | None]:
    """The networks of `addresses` for `family` on `hook` (with `sets`, its sets as SetRefs;
    without, a set makes it any); [None] for any, [] for none.

    `gateway` in `to` matches every packet on INPUT (nfqfw's to_gateway is hook INPUT) and
    none on FORWARD; ingress `from` never holds it (the config refuses it)."""
    if addresses is None:
        return [None]
    if addresses.gateway and not is_src and hook is Hook.INPUT:
        return [None]
    if addresses.sets and not sets:
        return [None]  # any set may hold any address of either family (runtime entries too)
    found: list[str | SetRef | None] = [
        str(network) for network in addresses.networks if network.version == family
    ]
    return found + [SetRef(name) for name in addresses.sets]


def port_chunks(ranges: tuple[tuple[int, int], ...] | None) -> list[tuple[tuple[int, int], ...] | None]:
    """Port ranges cut into pieces multiport takes (a range counts two slots, a port one)."""
    if ranges is None:
        return [None]
    chunks: list[tuple[tuple[int, int], ...]] = []
    current: list[tuple[int, int]] = []
    used = 0
    for first, last in ranges:
        slots = 1 if first == last else 2
        if used + slots > MULTIPORT_SLOTS:
            chunks.append(tuple(current))
            current, used = [], 0
        current.append((first, last))
        used += slots
    chunks.append(tuple(current))
    return list(chunks)


def _size(dimensions: dict[str, list[object]]) -> int:
    size = 1
    for values in dimensions.values():
        size *= len(values)
    return size


def _product(dimensions: dict[str, list[object]]) -> Iterator[dict[str, object]]:
    keys = list(dimensions)

    def walk(index: int, chosen: dict[str, object]) -> Iterator[dict[str, object]]:
        if index == len(keys):
            yield dict(chosen)
            return
        for value in dimensions[keys[index]]:
            chosen[keys[index]] = value
            yield from walk(index + 1, chosen)

    return walk(0, {})


# --- the same rules on one packet, as the kernel applies them ------------------------------------


class Probe(NamedTuple):
    """What the kernel rules look at: addresses as text or bytes, ports, flags, interfaces."""

    family: int
    proto: int
    src: bytes
    dst: bytes
    sport: int = 0
    dport: int = 0
    tcp_flags: int = 0
    icmp_type: int = -1
    in_iface: str | None = None
    out_iface: str | None = None


Member = Callable[[str, bytes], bool]  # (set name, raw address) -> is it in the set's kernel ipset


def evaluate(
    prefilter: Prefilter, probe: Probe, hook: Hook, kernel_new: bool, member: Member | None = None
) -> KernelRule | None:
    """The DROP/REJECT kernel rule that takes `probe`, None when it goes on to nfqfw.

    `kernel_new`: the kernel's conntrack has no entry for the packet (ctstate NEW); `member`:
    what the kernel's ipsets hold (required when a rule matches a set)."""
    if probe.proto == PROTO_TCP and any(
        probe.tcp_flags & mask == comp for mask, comp in prefilter.invalid_tcp_flags
    ):
        return KernelRule(KernelMatch(PROTO_TCP), DROP, "invalid: tcp flags")
    if hook not in HOOKS or not kernel_new or not _first_packet(prefilter, probe):
        return None
    if probe.in_iface is not None and _iface_in(probe.in_iface, prefilter.internal_ifaces):
        return None
    for rule in prefilter.rules(probe.family, hook):
        if _matches(rule.match, probe, member):
            return None if rule.action == RETURN else rule
    return None


def _first_packet(prefilter: Prefilter, probe: Probe) -> bool:
    if probe.proto == PROTO_TCP:
        return probe.tcp_flags & (SYN | ACK | RST | FIN) == SYN
    if probe.proto == PROTO_UDP:
        return prefilter.udp
    return probe.proto == ICMP_OF[probe.family] and probe.icmp_type == ECHO_REQUEST[probe.family]


def _iface_in(name: str, patterns: Iterable[str]) -> bool:
    return any(name.startswith(p[:-1]) if p.endswith("+") else name == p for p in patterns)


def _matches(match: KernelMatch, probe: Probe, member: Member | None = None) -> bool:
    if match.proto != probe.proto:
        return False
    for name, raw in ((match.src_set, probe.src), (match.dst_set, probe.dst)):
        if name is not None and (member is None or not member(name, raw)):
            return False
    for network, raw in ((match.src, probe.src), (match.dst, probe.dst)):
        if network is not None and ipaddress.ip_address(raw) not in ipaddress.ip_network(network):
            return False
    for ranges, port in ((match.dports, probe.dport), (match.sports, probe.sport)):
        if ranges is not None and not any(first <= port <= last for first, last in ranges):
            return False
    for pattern, name in ((match.in_iface, probe.in_iface), (match.out_iface, probe.out_iface)):
        if pattern is not None and (name is None or not _iface_in(name, (pattern,))):
            return False
    return True
