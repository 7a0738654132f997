"""The compiled policy: every rule turned into a matcher with precomputed fields, and each rule
list into a `RuleIndex` (nfqfw.core.classify) that finds the first matching rule without
walking the list.

`match`/`match_standing` use the index: their cost hardly grows with the number of rules.
`scan`/`scan_standing` walk the rules one by one with `RuleMatcher.matches`: the reference the
index is tested against (same decisions, rule names and rate-limit behaviour), not used per
packet. Matching works on the raw packet record: protocol numbers, addresses as integers
(int.from_bytes of the 4/16 raw bytes, no ipaddress objects per packet), ports, ICMP types
per family.

A non-first fragment (pkt.frag == FRAG_LATER) carries no L4 header, so its ports and ICMP
type are unknown: it never matches a rule that names ports, sports or icmp-types.

Sets: `sets` holds a NamedSet per set of the policy (its networks from the file, and the
runtime entries bound by `bind_runtime`: the engine's RuntimeSets, which outlive a reload).
After a runtime entry changes, `refresh_runtime` lets the indexes see it.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Mapping

from nfqfw.core.classify import RuleIndex
from nfqfw.core.config import INSIDE, SIDES, AddressSet, PolicyConfig, RuleConfig
from nfqfw.core.forwards import ForwardTable
from nfqfw.core.packet import FRAG_LATER, Packet
from nfqfw.core.ratelimit import Limiter, RuleLimiter, SourceLimiter
from nfqfw.core.sets import NamedSet, RuntimeSets
from nfqfw.core.verdict import Action, RuleDecision
from nfqfw.core.zones import ZoneMap

SMALL_PORT_SET = 4096  # up to this many ports a frozenset; beyond, sorted ranges

__all__ = ["CompiledPolicy", "RuleDecision", "RuleMatcher", "compile_ports"]


class PortRanges:
    """Sorted, disjoint inclusive ranges; `port in ranges` by bisection."""

    __slots__ = ("_firsts", "_lasts")

    def __init__(self, ranges: tuple[tuple[int, int], ...]) -> None:
        self._firsts = [first for first, _ in ranges]
        self._lasts = [last for _, last in ranges]

    def __contains__(self, port: int) -> bool:
        index = bisect_right(self._firsts, port) - 1
        return index >= 0 and port <= self._lasts[index]


def compile_ports(ranges: tuple[tuple[int, int], ...]) -> frozenset[int] | PortRanges:
    if sum(last - first + 1 for first, last in ranges) <= SMALL_PORT_SET:
        return frozenset(port for first, last in ranges for port in range(first, last + 1))
    return PortRanges(ranges)


class AddressMatcher:
    """`from`/`to` of a rule: the gateway flag, exact hosts, (network, mask) pairs per family,
    and the named sets."""

    __slots__ = ("gateway", "hosts4", "hosts6", "nets4", "nets6", "sets")

    def __init__(self, addresses: AddressSet, sets: Mapping[str, NamedSet] | None = None) -> None:
        self.gateway = addresses.gateway
        self.sets = tuple((sets or {})[name] for name in addresses.sets)
        hosts: dict[int, set[int]] = {4: set(), 6: set()}
        nets: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for network in addresses.networks:
            value, mask = int(network.network_address), int(network.netmask)
            if network.prefixlen == network.max_prefixlen:
                hosts[network.version].add(value)
            else:
                nets[network.version].append((value, mask))
        self.hosts4, self.hosts6 = frozenset(hosts[4]), frozenset(hosts[6])
        self.nets4, self.nets6 = tuple(nets[4]), tuple(nets[6])

    def matches(self, raw: bytes, is_gateway: bool) -> bool:
        if is_gateway and self.gateway:
            return True
        value = int.from_bytes(raw, "big")
        if len(raw) == 4:
            hosts, nets = self.hosts4, self.nets4
        else:
            hosts, nets = self.hosts6, self.nets6
        return (
            value in hosts
            or any(value & mask == network for network, mask in nets)
            or any(named.contains(raw) for named in self.sets)
        )


class InterfaceMatcher:
    """Interface names, exact or with a trailing '+' (prefix match, as iptables -i eth+)."""

    __slots__ = ("exact", "prefixes")

    def __init__(self, names: tuple[str, ...]) -> None:
        self.exact = frozenset(name for name in names if not name.endswith("+"))
        self.prefixes = tuple(name[:-1] for name in names if name.endswith("+"))

    def __contains__(self, name: str | None) -> bool:
        if name is None:
            return False
        return name in self.exact or name.startswith(self.prefixes)


class RuleMatcher:
    """One rule, compiled. Fields left None match anything."""

    __slots__ = (
        "decision",
        "dports",
        "dst",
        "family",
        "from_zones",
        "icmp4",
        "icmp6",
        "in_ifaces",
        "limiter",
        "needs_l4",
        "out_ifaces",
        "protocols",
        "sports",
        "src",
        "to_zones",
        "zone_of",
    )

    def __init__(
        self,
        rule: RuleConfig,
        log_denied: bool,
        sets: Mapping[str, NamedSet] | None = None,
        zone_of: Callable[[str | None], str | None] | None = None,
    ) -> None:
        log = rule.log or (log_denied and rule.action is not Action.ACCEPT)
        self.decision = RuleDecision(rule.action, rule.name, log, f"rule {rule.name}")
        self.family = rule.family
        self.protocols = rule.protocols
        self.src = None if rule.src is None else AddressMatcher(rule.src, sets)
        self.dst = None if rule.dst is None else AddressMatcher(rule.dst, sets)
        self.dports = None if rule.dports is None else compile_ports(rule.dports)
        self.sports = None if rule.sports is None else compile_ports(rule.sports)
        self.icmp4 = rule.icmp_types_v4
        self.icmp6 = rule.icmp_types_v6
        self.needs_l4 = rule.dports is not None or rule.sports is not None or rule.icmp_types_v4 is not None
        self.in_ifaces = None if rule.in_ifaces is None else InterfaceMatcher(rule.in_ifaces)
        self.out_ifaces = None if rule.out_ifaces is None else InterfaceMatcher(rule.out_ifaces)
        self.from_zones = None if rule.from_zones is None else frozenset(rule.from_zones)
        self.to_zones = None if rule.to_zones is None else frozenset(rule.to_zones)
        self.zone_of = zone_of or _no_zone
        self.limiter = _limiter(rule)

    def matches(
        self, pkt: Packet, to_gateway: bool, from_gateway: bool, in_iface: str | None, out_iface: str | None
    ) -> bool:
        """Everything but the rate limit, cheapest tests first."""
        if self.family is not None and pkt.family != self.family:
            return False
        if self.protocols is not None and pkt.proto not in self.protocols:
            return False
        if self.needs_l4:
            if pkt.frag == FRAG_LATER:
                return False
            if self.dports is not None and pkt.dport not in self.dports:
                return False
            if self.sports is not None and pkt.sport not in self.sports:
                return False
            if self.icmp4 is not None and pkt.icmp_type not in (
                self.icmp4 if pkt.family == 4 else self.icmp6
            ):
                return False
        if self.in_ifaces is not None and in_iface not in self.in_ifaces:
            return False
        if self.out_ifaces is not None and out_iface not in self.out_ifaces:
            return False
        if self.from_zones is not None and self.zone_of(in_iface) not in self.from_zones:
            return False
        if self.to_zones is not None and self.zone_of(out_iface) not in self.to_zones:
            return False
        if self.src is not None and not self.src.matches(pkt.src, from_gateway):
            return False
        return self.dst is None or self.dst.matches(pkt.dst, to_gateway)


def _no_zone(iface: str | None) -> str | None:
    return None


def _limiter(rule: RuleConfig) -> Limiter | None:
    limit = rule.limit
    if limit is None:
        return None
    if limit.per_source:
        return SourceLimiter(limit.count, limit.period, limit.burst)
    return RuleLimiter(limit.count, limit.period, limit.burst)


class CompiledPolicy:
    """A validated policy ready for the per-packet path. Holds the rate-limit state."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        options = config.options
        self.invalid_action: Action = config.defaults.invalid
        self.log_denied: bool = options.log_denied  # every drop/reject is logged, not only rules'
        self.gateway_addresses: frozenset[bytes] = options.gateway_address_bytes
        self.zones = ZoneMap(config)
        zone_of = self.zones.zone_of
        self.sets: dict[str, NamedSet] = {name: NamedSet(name, s.content) for name, s in config.sets.items()}
        contents = {name: s.content for name, s in config.sets.items()}
        self._rules: dict[str, tuple[RuleMatcher, ...]] = {
            side: tuple(
                RuleMatcher(rule, options.log_denied, self.sets, zone_of) for rule in config.rules(side)
            )
            for side in SIDES
        }
        self._index: dict[str, RuleIndex[RuleMatcher]] = {
            side: RuleIndex(config.rules(side), self._rules[side], contents, zone_of) for side in SIDES
        }
        defaults = config.defaults
        self._defaults: dict[str, RuleDecision] = {
            side: RuleDecision(
                action, None, options.log_denied and action is not Action.ACCEPT, f"default {side}"
            )
            for side, action in (
                ("ingress", defaults.ingress),
                ("egress", defaults.egress),
                ("between", defaults.between),
            )
        }
        forwards = () if config.nat is None else config.nat.forward
        self.forwards = ForwardTable(forwards, config.interfaces_facing(INSIDE), sets=contents)

    def bind_runtime(self, runtime: RuntimeSets) -> None:
        """Use `runtime`'s entries for the policy's sets (an engine's, kept across reloads)."""
        for name, named in self.sets.items():
            named.runtime = runtime.entries(name)
        self.refresh_runtime()

    def refresh_runtime(self) -> None:
        """A set's runtime entries changed: the indexes (the rules' and the forwards') consult
        the sets that have some."""
        sets = self.sets
        for index in self._index.values():
            index.refresh_runtime(lambda name: sets[name].runtime)
        self.forwards.refresh_runtime(lambda name: sets[name].runtime)

    def zone_of(self, iface: str | None) -> str | None:
        """The zone of an interface, None for one in no zone (or no interface)."""
        return self.zones.zone_of(iface)

    def match(
        self,
        side: str,
        pkt: Packet,
        to_gateway: bool,
        from_gateway: bool,
        in_iface: str | None,
        out_iface: str | None,
        now: float,
    ) -> RuleDecision:
        """First matching rule of `side` ("ingress" | "egress" | "between"), else the side's default.

        A rule whose rate limit is exhausted does not match: evaluation goes on with the next
        rule (as iptables -m limit). Tokens are only taken from rules that otherwise match.
        """
        index = self._index[side]
        candidates = index.candidates(pkt, to_gateway, from_gateway, in_iface, out_iface)
        by_bit = index.by_bit
        while candidates:
            top = candidates.bit_length() - 1
            rule = by_bit[top]
            limiter = rule.limiter
            if limiter is None or limiter.allow(pkt.src, now):
                return rule.decision
            candidates ^= 1 << top  # limit used up: the next matching rule
        return self._defaults[side]

    def match_standing(
        self,
        side: str,
        pkt: Packet,
        to_gateway: bool,
        from_gateway: bool,
        in_iface: str | None,
        out_iface: str | None,
    ) -> RuleDecision:
        """As `match`, but rate limits are neither checked nor charged: a flow that is already
        up is re-judged on what the rules say (reload recheck), not on token buckets."""
        index = self._index[side]
        candidates = index.candidates(pkt, to_gateway, from_gateway, in_iface, out_iface)
        if candidates:
            return index.by_bit[candidates.bit_length() - 1].decision
        return self._defaults[side]

    # -- the reference: rule by rule ----------------------------------------------------------
    def scan(
        self,
        side: str,
        pkt: Packet,
        to_gateway: bool,
        from_gateway: bool,
        in_iface: str | None,
        out_iface: str | None,
        now: float,
    ) -> RuleDecision:
        """`match` by walking the rules in order (the reference for the index)."""
        for rule in self._rules[side]:
            if rule.matches(pkt, to_gateway, from_gateway, in_iface, out_iface):
                limiter = rule.limiter
                if limiter is None or limiter.allow(pkt.src, now):
                    return rule.decision
        return self._defaults[side]

    def scan_standing(
        self,
        side: str,
        pkt: Packet,
        to_gateway: bool,
        from_gateway: bool,
        in_iface: str | None,
        out_iface: str | None,
    ) -> RuleDecision:
        """`match_standing` by walking the rules in order (the reference for the index)."""
        for rule in self._rules[side]:
            if rule.matches(pkt, to_gateway, from_gateway, in_iface, out_iface):
                return rule.decision
        return self._defaults[side]
