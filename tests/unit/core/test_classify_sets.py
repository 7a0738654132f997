"""nfqfw.core.classify with named sets: the index decides exactly as the rule-by-rule scan when
rules name sets (their networks folded into the address intervals), with runtime entries added
and removed (consulted beside the intervals), and a big set keeps its lookups exact."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import replace

from hypothesis import event, given, settings
from hypothesis import strategies as st
from test_classify import NETWORKS, Step, rules, steps

from nfqfw.core.classify import Interner, IntervalMap, RuleIndex
from nfqfw.core.config import AddressSet, RuleConfig, parse_policy
from nfqfw.core.packet import Packet
from nfqfw.core.policy import CompiledPolicy, RuleMatcher
from nfqfw.core.sets import NamedSet, Ranges, SetContent, network_range

SET_NAMES = ("s0", "s1", "s2")
POOL = [ipaddress.ip_network(text) for family in (4, 6) for text in NETWORKS[family]]
extra_networks = st.sampled_from(POOL) | st.tuples(st.integers(0, (1 << 32) - 1), st.integers(8, 32)).map(
    lambda v: ipaddress.IPv4Network((v[0] >> (32 - v[1]) << (32 - v[1]), v[1]))
)
set_contents = st.lists(extra_networks, max_size=6)


@st.composite
def with_sets(draw: st.DrawFn, rule_list: tuple[RuleConfig, ...]) -> tuple[RuleConfig, ...]:
    """The rules, each address list given some of the sets (or made of sets only)."""
    out = []
    for rule in rule_list:
        fields = {}
        for attr in ("src", "dst"):
            addresses = getattr(rule, attr)
            if draw(st.integers(0, 2)) == 0:
                continue
            names = tuple(draw(st.lists(st.sampled_from(SET_NAMES), min_size=1, max_size=2, unique=True)))
            base = addresses if addresses is not None else AddressSet(False, ())
            fields[attr] = AddressSet(base.gateway, base.networks, names)
        out.append(replace(rule, **fields))
    return tuple(out)


def contents_of(
    networks: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]],
) -> dict[str, SetContent]:
    return {
        name: SetContent.of(
            [network_range(n) for n in nets if n.version == 4],
            [network_range(n) for n in nets if n.version == 6],
            0,
        )
        for name, nets in networks.items()
    }


def check(index: RuleIndex[RuleMatcher], matchers: list[RuleMatcher], walk: list[Step]) -> None:
    for step in walk:
        args = step.args[1:]
        candidates = index.candidates(*args)
        found = [rule.decision.rule for bit, rule in enumerate(index.by_bit) if candidates >> bit & 1]
        expected = [matcher.decision.rule for matcher in reversed(matchers) if matcher.matches(*args)]
        assert found == expected
        event(f"matching rules: {min(len(expected), 3)}")


@settings(max_examples=250, deadline=None)
@given(
    st.integers(0, 16).flatmap(lambda count: rules(count, open_weight=2)).flatmap(with_sets),
    st.fixed_dictionaries({name: set_contents for name in SET_NAMES}),
    st.lists(st.tuples(st.sampled_from(SET_NAMES), extra_networks), max_size=6),
    st.lists(steps, min_size=1, max_size=20),
)
def test_candidates_with_sets_and_runtime_entries_are_exactly_the_matching_rules(
    rule_list: tuple[RuleConfig, ...],
    networks: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]],
    runtime: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]],
    walk: list[Step],
) -> None:
    contents = contents_of(networks)
    named = {name: NamedSet(name, content) for name, content in contents.items()}
    matchers = [RuleMatcher(rule, True, named) for rule in rule_list]
    index = RuleIndex(rule_list, matchers, contents)
    check(index, matchers, walk)  # the policy's networks only
    for name, network in runtime:
        named[name].runtime.add(network, None)
    index.refresh_runtime(lambda name: named[name].runtime)
    event(f"runtime entries: {min(len(runtime), 2)}")
    check(index, matchers, walk)
    for name, network in runtime[::2]:  # some taken away again
        named[name].runtime.remove(network)
    index.refresh_runtime(lambda name: named[name].runtime)
    check(index, matchers, walk)


def test_a_set_used_by_several_rules_goes_in_once() -> None:
    config = parse_policy(
        "zones: {external: [wan0]}\n"
        "sets:\n  s: [10.0.0.0/8, 192.0.2.0/24]\n"
        "ingress:\n"
        '  - {name: a, from: "@s", proto: tcp, action: drop}\n'
        '  - {name: b, from: ["@s", 203.0.113.0/24], proto: udp, action: drop}\n'
        "  - {name: c, from: 192.0.2.128/25, action: accept}\n"
    )
    policy = CompiledPolicy(config)
    dimension = policy._index["ingress"].dimensions[0]
    assert [name for name, _ in dimension.set_bits] == ["s"]
    assert dimension.set_bits[0][1] == 0b110  # a (bit 2) and b (bit 1) together
    starts = list(dimension.v4.starts)
    v4 = lambda text: int(ipaddress.IPv4Address(text))  # noqa: E731
    assert starts == [0, v4("10.0.0.0"), v4("11.0.0.0"), v4("192.0.2.0"), v4("192.0.2.128"), v4("192.0.3.0"),
                      v4("203.0.113.0"), v4("203.0.114.0")]  # fmt: skip
    assert [
        dimension.v4[v4(a)] for a in ("9.9.9.9", "10.1.1.1", "192.0.2.1", "192.0.2.200", "203.0.113.1")
    ] == [
        0,
        0b110,
        0b110,
        0b111,
        0b010,
    ]


def test_a_big_set_keeps_starts_in_an_array_and_lookups_exact() -> None:
    rng = random.Random(7)
    nets = sorted({rng.randrange(1 << 24) << 8 for _ in range(3000)})
    content = SetContent(Ranges(4, [(n, n + 255) for n in nets]), Ranges(6), len(nets))
    table = IntervalMap({0: [(nets[10], nets[10] + 99)]}, 0, 2, Interner(), [(0b10, content.v4)])
    assert table.starts.typecode == "I"  # type: ignore[union-attr]
    for value in [n + off for n in nets[:50] for off in (-1, 0, 99, 100, 255, 256)]:
        expected = (0b10 if value in content.v4 else 0) | (1 if nets[10] <= value <= nets[10] + 99 else 0)
        assert table[value] == expected


def test_an_overlay_at_the_ends_of_the_address_space() -> None:
    everything = Ranges(4, [(0, 10), ((1 << 32) - 5, (1 << 32) - 1)])
    table = IntervalMap({}, 0, 1, Interner(), [(1, everything)])
    assert [table[v] for v in (0, 10, 11, (1 << 32) - 6, (1 << 32) - 5, (1 << 32) - 1)] == [1, 1, 0, 0, 1, 1]


def test_runtime_lookups_only_while_a_set_has_entries() -> None:
    config = parse_policy(
        "zones: {external: [wan0]}\nsets:\n  banned: {}\n"
        'ingress:\n  - {name: drop-banned, from: "@banned", action: drop}\n'
    )
    policy = CompiledPolicy(config)
    index = policy._index["ingress"]
    dimension = index.dimensions[0]
    assert index.lookups == (dimension.lookup,)
    policy.sets["banned"].runtime.add(ipaddress.ip_network("203.0.113.9/32"), None)
    policy.refresh_runtime()
    assert index.lookups == (dimension.lookup_runtime,)
    pkt = Packet()
    pkt.family, pkt.proto = 4, 6
    pkt.src, pkt.dst = ipaddress.ip_address("203.0.113.9").packed, bytes(4)
    assert policy.match_standing("ingress", pkt, False, False, "wan0", None).rule == "drop-banned"
    policy.sets["banned"].runtime.remove(ipaddress.ip_network("203.0.113.9/32"))
    policy.refresh_runtime()
    assert index.lookups == (dimension.lookup,)
    assert policy.match_standing("ingress", pkt, False, False, "wan0", None).rule is None
