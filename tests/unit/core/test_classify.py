"""nfqfw.core.classify: the rule index decides exactly as the rule-by-rule scan.

The property tests build random rule lists straight as RuleConfig (so they also cover
combinations the config checker would refuse, e.g. ports on a GRE rule: the index must agree with
`RuleMatcher.matches` on any rule) and random packets drawn near the rules' boundaries.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from nfqfw.core.build import addr, ipv4, tcp
from nfqfw.core.classify import Interner, IntervalMap, RuleIndex, merge_ranges
from nfqfw.core.config import (
    INSIDE,
    OUTSIDE,
    AddressSet,
    DefaultsConfig,
    ForwardConfig,
    LimitConfig,
    NatConfig,
    OptionsConfig,
    PolicyConfig,
    RuleConfig,
    ZoneDetail,
    parse_policy,
)
from nfqfw.core.engine import Engine
from nfqfw.core.forwards import ForwardTable
from nfqfw.core.packet import FRAG_FIRST, FRAG_LATER, FRAG_NONE, Packet
from nfqfw.core.policy import CompiledPolicy, InterfaceMatcher, RuleMatcher
from nfqfw.core.verdict import Action, Hook, Meta
from nfqfw.core.zones import ZoneMap

NETWORKS = {
    4: [
        "0.0.0.0/0",
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/24",
        "10.1.2.128/25",
        "10.1.2.4/31",
        "10.1.2.3/32",
        "192.0.2.0/24",
        "255.255.255.255/32",
    ],
    6: ["::/0", "2001:db8::/32", "2001:db8:1::/48", "2001:db8:1::1/128", "fd00::/8", "ffff::/16"],
}
ADDRESSES = {
    4: [
        "0.0.0.0",
        "9.255.255.255",
        "10.0.0.0",
        "10.1.2.3",
        "10.1.2.4",
        "10.1.2.5",
        "10.1.2.127",
        "10.1.2.128",
        "10.1.2.255",
        "10.1.3.0",
        "10.255.255.255",
        "11.0.0.0",
        "192.0.2.1",
        "203.0.113.9",
        "255.255.255.255",
    ],
    6: [
        "::",
        "2001:db8::1",
        "2001:db8:1::",
        "2001:db8:1::1",
        "2001:db8:1::2",
        "2001:db8:2::1",
        "fd00::9",
        "ffff::",
    ],
}
PROTOCOLS = (0, 1, 6, 17, 47, 58, 132, 255)
ICMP4, ICMP6 = (0, 3, 8, 11), (1, 2, 128, 129, 135)
RULE_IFACES = ("wan0", "lan0", "ppp+", "pp+", "wan+", "eth1")
PACKET_IFACES = ("wan0", "lan0", "ppp0", "ppp", "pp", "wan", "wan01", "eth1", "eth2", None)
LIMITS = st.builds(LimitConfig, st.just(1), st.integers(1, 3), st.integers(1, 2), st.booleans())
# Zones over those names: wildcards overlapping ("pp+" and "ppp+": the longest prefix wins; "wan0"
# exact and "wan+"), and names in no zone ("eth2", None).
ZONE_IFACES = {"external": ("wan0", "wan+"), "internal": ("lan0",), "dmz": ("eth1", "pp+"), "vpn": ("ppp+",)}
ZONE_DETAILS = {"dmz": ZoneDetail(INSIDE), "vpn": ZoneDetail(INSIDE), "external": ZoneDetail(OUTSIDE)}
ZONE_NAMES = tuple(ZONE_IFACES)


def networks(version: int) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(text) for text in NETWORKS[version]]


address_sets = st.builds(
    AddressSet,
    st.booleans(),
    st.lists(st.sampled_from(networks(4) + networks(6)), max_size=3).map(tuple),
)
port_ranges = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 12), st.integers(0, 4)).map(lambda r: (r[0], r[0] + r[1])),
        st.sampled_from([(1024, 65535), (65535, 65535), (1, 65535)]),
    ),
    min_size=1,
    max_size=3,
).map(lambda ranges: tuple(merge_ranges(ranges)))
icmp_types = st.tuples(st.frozensets(st.sampled_from(ICMP4)), st.frozensets(st.sampled_from(ICMP6)))
ifaces = st.lists(st.sampled_from(RULE_IFACES), min_size=1, max_size=2).map(tuple)
zone_lists = st.lists(st.sampled_from(ZONE_NAMES), min_size=1, max_size=2).map(tuple)


protocol_sets = st.frozensets(st.sampled_from(PROTOCOLS), min_size=1, max_size=3)


@st.composite
def rules(draw: st.DrawFn, count: int, open_weight: int = 1) -> tuple[RuleConfig, ...]:
    """`count` rules; each match field is left open with probability open_weight/(open_weight+1)."""

    def maybe(strategy: st.SearchStrategy[Any]) -> Any:
        return None if draw(st.integers(0, open_weight)) else draw(strategy)

    made = []
    for number in range(count):
        types = maybe(icmp_types)
        made.append(
            RuleConfig(
                name=f"r{number}",
                action=draw(st.sampled_from(list(Action))),
                line=number + 1,
                family=maybe(st.sampled_from([4, 6])),
                protocols=maybe(protocol_sets),
                src=maybe(address_sets),
                dst=maybe(address_sets),
                dports=maybe(port_ranges),
                sports=maybe(port_ranges),
                icmp_types_v4=None if types is None else types[0],
                icmp_types_v6=None if types is None else types[1],
                in_ifaces=maybe(ifaces),
                out_ifaces=maybe(ifaces),
                log=draw(st.booleans()),
                limit=maybe(LIMITS),
                from_zones=maybe(zone_lists),
                to_zones=maybe(zone_lists),
            )
        )
    return tuple(made)


def address(version: int) -> st.SearchStrategy[bytes]:
    pool = st.sampled_from(ADDRESSES[version]).map(lambda text: ipaddress.ip_address(text).packed)
    size = 4 if version == 4 else 16
    return pool | st.integers(0, (1 << (8 * size)) - 1).map(lambda value: value.to_bytes(size, "big"))


ports = st.integers(0, 16) | st.sampled_from([1023, 1024, 65534, 65535]) | st.integers(0, 65535)


@st.composite
def packets(draw: st.DrawFn) -> Packet:
    pkt = Packet()
    pkt.family = draw(st.sampled_from([4, 6]))
    pkt.src, pkt.dst = draw(address(pkt.family)), draw(address(pkt.family))
    pkt.proto = draw(st.sampled_from(PROTOCOLS))
    pkt.sport, pkt.dport = draw(ports), draw(ports)
    pkt.icmp_type = draw(st.sampled_from((-1, *ICMP4, *ICMP6)))
    pkt.frag = draw(st.sampled_from([FRAG_NONE, FRAG_NONE, FRAG_FIRST, FRAG_LATER]))
    return pkt


@dataclass(frozen=True)
class Step:
    side: str
    pkt: Packet
    to_gateway: bool
    from_gateway: bool
    in_iface: str | None
    out_iface: str | None

    @property
    def args(self) -> tuple[str, Packet, bool, bool, str | None, str | None]:
        return self.side, self.pkt, self.to_gateway, self.from_gateway, self.in_iface, self.out_iface


steps = st.builds(
    Step,
    st.sampled_from(["ingress", "egress", "between"]),
    packets(),
    st.booleans(),
    st.booleans(),
    st.sampled_from(PACKET_IFACES),
    st.sampled_from(PACKET_IFACES),
)


def policy_of(
    ingress: tuple[RuleConfig, ...],
    egress: tuple[RuleConfig, ...],
    log_denied: bool,
    between: tuple[RuleConfig, ...] = (),
    forwards: tuple[ForwardConfig, ...] = (),
) -> PolicyConfig:
    return PolicyConfig(
        "<random>",
        "0" * 64,
        dict(ZONE_IFACES),
        DefaultsConfig(ingress=Action.DROP, egress=Action.ACCEPT, between=Action.REJECT),
        ingress,
        egress,
        OptionsConfig(log_denied=log_denied),
        between=between,
        zone_details=dict(ZONE_DETAILS),
        nat=NatConfig(forward=forwards),
    )


ZONE_OF = ZoneMap(policy_of((), (), False)).zone_of


@settings(max_examples=250, deadline=None)
@given(
    st.integers(0, 24).flatmap(lambda count: rules(count, open_weight=2)),
    st.lists(steps, min_size=1, max_size=20),
)
def test_candidates_are_exactly_the_matching_rules(
    rule_list: tuple[RuleConfig, ...], walk: list[Step]
) -> None:
    matchers = [RuleMatcher(rule, True, zone_of=ZONE_OF) for rule in rule_list]
    index = RuleIndex(rule_list, matchers, zone_of=ZONE_OF)
    for step in walk:
        args = step.args[1:]
        candidates = index.candidates(*args)
        found = [rule.decision.rule for bit, rule in enumerate(index.by_bit) if candidates >> bit & 1]
        expected = [matcher.decision.rule for matcher in reversed(matchers) if matcher.matches(*args)]
        assert found == expected
        event(f"matching rules: {min(len(expected), 3)}")


@settings(max_examples=250, deadline=None)
@given(
    st.integers(0, 16).flatmap(lambda count: rules(count, open_weight=3)),
    st.integers(0, 8).flatmap(lambda count: rules(count, open_weight=3)),
    st.integers(0, 8).flatmap(lambda count: rules(count, open_weight=3)),
    st.booleans(),
    st.lists(steps, min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0.0, 0.0, 0.0, 0.4, 1.0, 2.5])), max_size=40),
)
def test_policy_match_equals_the_scan_limits_included(
    ingress: tuple[RuleConfig, ...],
    egress: tuple[RuleConfig, ...],
    between: tuple[RuleConfig, ...],
    log_denied: bool,
    distinct: list[Step],
    walk: list[tuple[int, float]],
) -> None:
    """Two policies from the same config, each with its own token buckets: the index on one, the
    rule-by-rule scan on the other, fed the same packets at the same times (a few packets,
    repeated, so that limits run out and refill)."""
    egress = tuple(RuleConfig(**{**_fields(rule), "name": f"e{rule.name}"}) for rule in egress)
    between = tuple(RuleConfig(**{**_fields(rule), "name": f"b{rule.name}"}) for rule in between)
    config = policy_of(ingress, egress, log_denied, between)
    indexed, scanned = CompiledPolicy(config), CompiledPolicy(config)
    now = 100.0
    for choice, delay in walk:
        step = distinct[choice % len(distinct)]
        now += delay
        decided = indexed.match(*step.args, now)
        assert decided == scanned.scan(*step.args, now)
        standing = indexed.match_standing(*step.args)
        assert standing == scanned.scan_standing(*step.args)
        if decided != standing:
            event("a limit made the difference: " + ("a later rule" if decided.rule else "the default"))
        else:
            event("a rule" if decided.rule is not None else "the default")


def _fields(rule: RuleConfig) -> dict[str, object]:
    return {name: getattr(rule, name) for name in RuleConfig.__dataclass_fields__}


# -- forwards: the same index over the forward list ------------------------------------------------

FORWARD_TARGETS = {4: ["10.1.2.3", "10.1.2.4", "192.0.2.1"], 6: ["2001:db8:1::1", "fd00::9"]}
INSIDE_IFACES = ("lan0", "eth1", "pp+", "ppp+")


@st.composite
def forwards(draw: st.DrawFn, count: int) -> tuple[ForwardConfig, ...]:
    made = []
    for number in range(count):
        family = draw(st.sampled_from([4, 6]))
        ports = draw(port_ranges)
        single = sum(last - first + 1 for first, last in ports) == 1
        source = draw(st.none() | st.lists(st.sampled_from(networks(family)), min_size=1, max_size=2))
        made.append(
            ForwardConfig(
                name=f"f{number}",
                line=number + 1,
                col=1,
                family=family,
                protocols=draw(st.sampled_from([frozenset({6}), frozenset({17}), frozenset({6, 17})])),
                in_ifaces=draw(ifaces),
                ports=ports,
                to=ipaddress.ip_address(draw(st.sampled_from(FORWARD_TARGETS[family]))),
                to_port=draw(st.none() | st.integers(1, 12)) if single else None,
                src=None if source is None else tuple(source),
                address=draw(st.none() | st.sampled_from(ADDRESSES[family]).map(ipaddress.ip_address)),
                passes=draw(st.booleans()),
                hairpin=draw(st.booleans()),
            )
        )
    return tuple(made)


def forward_scan(
    table: tuple[ForwardConfig, ...], pkt: Packet, in_iface: str | None, translated: bool, to_gateway: bool
) -> str | None:
    """The reference: the first forward, in order, that translated (or will translate) `pkt`."""
    for forward in table:
        names = forward.in_ifaces + (INSIDE_IFACES if forward.hairpin else ())
        if pkt.family != forward.family or pkt.proto not in forward.protocols or pkt.frag == FRAG_LATER:
            continue
        if in_iface not in InterfaceMatcher(names):
            continue
        source = ipaddress.ip_address(pkt.src)
        if forward.src is not None and not any(source in network for network in forward.src):
            continue
        if translated:
            ports, wanted = forward.translated_ports, pkt.dst == forward.to.packed
        else:
            ports = forward.ports
            wanted = to_gateway if forward.address is None else pkt.dst == forward.address.packed
        if wanted and any(first <= pkt.dport <= last for first, last in ports):
            return forward.name
    return None


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 12).flatmap(forwards),
    st.lists(st.tuples(packets(), st.sampled_from(PACKET_IFACES), st.booleans()), min_size=1, max_size=20),
)
def test_the_forward_lookups_are_the_forward_scan(
    table: tuple[ForwardConfig, ...], walk: list[tuple[Packet, str | None, bool]]
) -> None:
    compiled = ForwardTable(table, INSIDE_IFACES)
    for pkt, in_iface, to_gateway in walk:
        for translated in (True, False):
            if translated:
                found = compiled.translated(pkt, in_iface)
            else:
                found = compiled.public(pkt, to_gateway, in_iface)
            assert (found and found.name) == forward_scan(table, pkt, in_iface, translated, to_gateway)
            event(f"{'translated' if translated else 'public'}: {'a forward' if found else 'none'}")


def test_forward_packets_hit_their_targets() -> None:
    """The packet pool reaches the forwards' targets (else the property test would test misses)."""
    addresses = {ipaddress.ip_address(text) for family in (4, 6) for text in ADDRESSES[family]}
    assert {ipaddress.ip_address(t) for family in (4, 6) for t in FORWARD_TARGETS[family]} <= addresses


# -- the parts ------------------------------------------------------------------------------------


def test_merge_ranges() -> None:
    assert merge_ranges([(5, 9), (1, 2), (3, 3), (20, 30), (25, 26), (11, 12)]) == [
        (1, 3),
        (5, 9),
        (11, 12),
        (20, 30),
    ]
    assert merge_ranges([]) == []


def test_interval_map_boundaries_and_shared_bitsets() -> None:
    intern = Interner()
    # bit 2 open, bit 1 on 10-19 and 30-39 (given overlapping), bit 0 on 15-34
    table = IntervalMap({1: [(10, 19), (30, 35), (33, 39)], 0: [(15, 34)]}, 0b100, 3, intern)
    assert table.starts == [0, 10, 15, 20, 30, 35, 40]
    assert [table[value] for value in (0, 9, 10, 14, 15, 19, 20, 29, 30, 34, 35, 39, 40, 65535)] == [
        0b100,
        0b100,
        0b110,
        0b110,
        0b111,
        0b111,
        0b101,
        0b101,
        0b111,
        0b111,
        0b110,
        0b110,
        0b100,
        0b100,
    ]
    assert table.masks[0] is table.masks[-1]  # one int per distinct bitset
    assert len(intern) == 4


def test_interval_map_joins_neighbours_with_equal_bitsets() -> None:
    table = IntervalMap({0: [(0, 9)], 1: [(10, 19)], 2: [(5, 14)]}, 0, 3, Interner())
    assert table.starts == [0, 5, 10, 15, 20]
    same = IntervalMap({0: [(0, 4), (5, 9)]}, 0, 1, Interner())  # adjacent ranges of one rule
    assert same.starts == [0, 10]
    assert (same[0], same[9], same[10]) == (1, 1, 0)


def test_rule_index_leaves_out_fields_no_rule_names() -> None:
    config = parse_policy(
        "zones: {external: [wan0]}\n"
        "ingress:\n"
        "  - {name: web, proto: tcp, to: 10.0.0.0/24, ports: [80, 443], action: accept}\n"
        "  - {name: ping, proto: icmp, icmp-types: echo-request, in: wan0, action: accept}\n"
    )
    index = RuleIndex(config.ingress, [RuleMatcher(rule, True) for rule in config.ingress])
    assert [type(dimension).__name__ for dimension in index.dimensions] == [
        "DestinationAddress",
        "DestinationPort",
        "IcmpType",
        "InInterface",
    ]
    assert [rule.decision.rule for rule in index.by_bit] == ["ping", "web"]


def syn(src: str, dst: str, sport: int, dport: int) -> bytes:
    source, destination = addr(src), addr(dst)
    return ipv4(source, destination, 6, tcp(source, destination, sport, dport, 1000, 0, 0x02))


def test_the_engine_never_walks_the_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """New flows are decided by the index: a scan would call RuleMatcher.matches."""
    rules = "".join(
        f"  - {{name: r{n}, proto: tcp, to: 10.0.{n}.1, ports: {1000 + n}, action: accept}}\n"
        for n in range(50)
    )
    policy = CompiledPolicy(parse_policy("zones: {external: [wan0], internal: [lan0]}\ningress:\n" + rules))

    def no_scan(*args: object) -> bool:
        raise AssertionError("RuleMatcher.matches called on the packet path")

    monkeypatch.setattr(RuleMatcher, "matches", no_scan)
    engine = Engine(policy)
    inbound = Meta(Hook.FORWARD, "wan0", "lan0")
    verdict = engine.process(syn("203.0.113.9", "10.0.42.1", 40000, 1042), inbound, 1.0)
    assert (verdict.action, verdict.rule) == (Action.ACCEPT, "r42")
    verdict = engine.process(syn("203.0.113.9", "10.0.42.1", 40001, 1041), inbound, 1.0)
    assert (verdict.action, verdict.reason) == (Action.DROP, "default ingress")
