"""nfqfw.core.config: the policy file -> validated config objects, errors as FILE:LINE:COL."""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path
from textwrap import dedent

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from nfqfw.core.config import (
    AddressSet,
    ConfigError,
    ConfigIssue,
    DefaultsConfig,
    LimitConfig,
    LogLimit,
    OptionsConfig,
    PolicyConfig,
    RuleConfig,
    load_policy,
    parse_policy,
)
from nfqfw.core.verdict import Action

BRIEF_POLICY = """\
zones:
  external: [wan0]          # interfaces that face the outside
  internal: [lan0]          # interfaces of the private side
defaults:
  ingress: drop             # unsolicited traffic from outside
  egress: accept            # flows started inside; their replies come back as ESTABLISHED
  invalid: drop
ingress:                    # first match wins
  - name: mail
    proto: tcp
    to: [10.0.0.25, fd00::25]
    ports: [25, 587]
    action: accept
  - name: ping-gateway
    proto: icmp
    icmp-types: [echo-request]
    to: gateway             # the gateway itself rather than a host behind it
    limit: 5/second
    action: accept
  - name: ssh-office
    proto: tcp
    from: [198.51.100.0/24, 2001:db8:100::/48]
    to: gateway
    ports: [22]
    action: accept
egress:
  - name: no-smb-out
    proto: tcp
    ports: [445]
    action: reject
"""

ZONES = "zones:\n  external: [wan0]\n  internal: [lan0]\n"  # three lines: rules below start at line 4


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_policy(text, "p.yaml")
    return [str(issue) for issue in caught.value.issues]


def rule_policy(rule: str, side: str = "ingress") -> str:
    """A policy with one rule given as YAML mapping lines: the rule is at line 5, its keys at column 5."""
    lines = dedent(rule).strip().splitlines()
    body = "\n".join(("    " if index else "  - ") + line for index, line in enumerate(lines))
    return f"{ZONES}{side}:\n{body}\n"


def one_rule(rule: str, side: str = "ingress") -> RuleConfig:
    config = parse_policy(rule_policy(rule, side))
    rules = config.ingress if side == "ingress" else config.egress
    assert len(rules) == 1
    return rules[0]


def rule_errors(rule: str, side: str = "ingress") -> list[str]:
    return errors(rule_policy(rule, side))


# -- the policy as the brief writes it --------------------------------------------------------


def test_brief_policy_parses_to_exact_objects() -> None:
    config = parse_policy(BRIEF_POLICY, "policy.yaml")
    assert config == PolicyConfig(
        filename="policy.yaml",
        sha256=hashlib.sha256(BRIEF_POLICY.encode()).hexdigest(),
        zones={"external": ("wan0",), "internal": ("lan0",)},
        defaults=DefaultsConfig(Action.DROP, Action.ACCEPT, Action.DROP),
        ingress=(
            RuleConfig(
                name="mail",
                action=Action.ACCEPT,
                line=9,
                protocols=frozenset({6}),
                dst=AddressSet(False, (net("10.0.0.25/32"), net("fd00::25/128"))),
                dports=((25, 25), (587, 587)),
            ),
            RuleConfig(
                name="ping-gateway",
                action=Action.ACCEPT,
                line=14,
                protocols=frozenset({1, 58}),  # icmp: ICMP on IPv4, ICMPv6 on IPv6
                icmp_types_v4=frozenset({8}),  # echo-request is ICMPv4 type 8 ...
                icmp_types_v6=frozenset({128}),  # ... and ICMPv6 type 128
                dst=AddressSet(True, ()),
                limit=LimitConfig(count=5, period=1, burst=5, per_source=False),
            ),
            RuleConfig(
                name="ssh-office",
                action=Action.ACCEPT,
                line=20,
                protocols=frozenset({6}),
                src=AddressSet(False, (net("198.51.100.0/24"), net("2001:db8:100::/48"))),
                dst=AddressSet(True, ()),
                dports=((22, 22),),
            ),
        ),
        egress=(
            RuleConfig(
                name="no-smb-out",
                action=Action.REJECT,
                line=27,
                protocols=frozenset({6}),
                dports=((445, 445),),
            ),
        ),
        options=OptionsConfig(),
    )


def test_defaults_and_options_when_left_out() -> None:
    config = parse_policy("zones:\n  external: wan0\n")
    assert config.filename == "<policy>"
    assert config.zones == {"external": ("wan0",), "internal": ()}
    assert config.defaults == DefaultsConfig(ingress=Action.DROP, egress=Action.ACCEPT, invalid=Action.DROP)
    assert (config.ingress, config.egress) == ((), ())
    assert config.options == OptionsConfig(
        max_flows=65536,
        tcp_pickup_loose=False,
        failure_mode="closed",
        reload="recheck",
        log_denied=True,
        log_limit=LogLimit(count=3, period=60, burst=10),
        gateway_addresses=(),
    )


def test_every_option_set() -> None:
    config = parse_policy(
        ZONES
        + dedent("""\
            defaults: {ingress: reject, egress: drop, invalid: accept}
            options:
              max-flows: 1000
              tcp-pickup: loose
              failure-mode: open
              reload: keep
              log-denied: false
              log-limit: 20/hour
              log-limit-burst: 3
              gateway-addresses: [192.0.2.1, "2001:DB8::0001"]
            """)
    )
    assert config.defaults == DefaultsConfig(Action.REJECT, Action.DROP, Action.ACCEPT)
    assert config.options == OptionsConfig(
        max_flows=1000,
        tcp_pickup_loose=True,
        failure_mode="open",
        reload="keep",
        log_denied=False,
        log_limit=LogLimit(count=20, period=3600, burst=3),
        gateway_addresses=("192.0.2.1", "2001:db8::1"),
    )
    assert config.options.gateway_address_bytes == frozenset(
        {bytes([192, 0, 2, 1]), bytes.fromhex("20010db8000000000000000000000001")}
    )


def test_empty_rule_lists() -> None:
    config = parse_policy(ZONES + "ingress:\negress: []\n")  # `ingress:` with every rule commented out
    assert (config.ingress, config.egress) == ((), ())


# -- rule fields ----------------------------------------------------------------------------------


def test_single_values_and_lists_are_equivalent() -> None:
    single = one_rule(
        "name: a\nproto: udp\nfrom: 192.0.2.0/24\nto: 192.0.2.1\nports: 53\nin: wan0\naction: drop"
    )
    listed = one_rule(
        "name: a\nproto: [udp]\nfrom: [192.0.2.0/24]\nto: [192.0.2.1]\nports: [53]\nin: [wan0]\naction: drop"
    )
    assert single == listed
    assert single.src == AddressSet(False, (net("192.0.2.0/24"),))
    assert single.in_ifaces == ("wan0",)


def test_any_means_no_constraint() -> None:
    rule = one_rule("name: a\nproto: any\nfrom: any\nto: any\naction: accept")
    assert (rule.protocols, rule.src, rule.dst) == (None, None, None)


def test_protocol_names_and_numbers() -> None:
    rule = one_rule("name: a\nproto: [tcp, UDP, gre, esp, sctp, 47, 0, 255]\naction: accept")
    assert rule.protocols == frozenset({6, 17, 47, 50, 132, 0, 255})
    assert one_rule("name: a\nproto: icmp\naction: accept").protocols == frozenset({1, 58})
    assert one_rule("name: a\nproto: icmpv6\naction: accept").protocols == frozenset({58})
    # the number 1 is ICMPv4 only
    assert one_rule("name: a\nproto: 1\naction: accept").protocols == frozenset({1})


def test_port_ranges_are_sorted_and_merged() -> None:
    rule = one_rule(
        'name: a\nproto: tcp\nports: [8080, "8000-8100", 22, 23, 24-30, 65535]\nsports: 1024-65535\n'
        "action: accept"
    )
    assert rule.dports == ((22, 30), (8000, 8100), (65535, 65535))
    assert rule.sports == ((1024, 65535),)


def test_icmp_type_names_map_to_both_families() -> None:
    rule = one_rule(
        "name: a\nproto: icmp\nicmp-types: [echo-request, echo-reply, packet-too-big, source-quench]\n"
        "action: accept"
    )
    # packet-too-big exists only in ICMPv6 (2), source-quench only in ICMPv4 (4)
    assert rule.icmp_types_v4 == frozenset({8, 0, 4})
    assert rule.icmp_types_v6 == frozenset({128, 129, 2})


def test_icmp_type_numbers_follow_the_rules_family() -> None:
    v6 = one_rule("name: a\nproto: icmpv6\nicmp-types: [128, neighbour-solicitation]\naction: accept")
    assert (v6.icmp_types_v4, v6.icmp_types_v6) == (frozenset(), frozenset({128, 135}))
    v4 = one_rule("name: a\nproto: icmp\nfamily: ipv4\nicmp-types: [8, 13]\naction: accept")
    assert (v4.family, v4.icmp_types_v4, v4.icmp_types_v6) == (4, frozenset({8, 13}), frozenset())


def test_gateway_combined_with_addresses() -> None:
    rule = one_rule("name: a\nto: [gateway, 10.0.0.1]\naction: accept")
    assert rule.dst == AddressSet(True, (net("10.0.0.1/32"),))
    egress = one_rule("name: a\nfrom: gateway\naction: accept", side="egress")
    assert egress.src == AddressSet(True, ())


def test_log_interfaces_and_limits() -> None:
    rule = one_rule(
        "name: a\nin: [wan0, ppp+]\nout: lan0\nlog: true\nlimit: 30/min\nlimit-burst: 60\nlimit-per: source\n"
        "action: accept"
    )
    assert (rule.in_ifaces, rule.out_ifaces, rule.log) == (("wan0", "ppp+"), ("lan0",), True)
    assert rule.limit == LimitConfig(count=30, period=60, burst=60, per_source=True)
    for text, period in (
        ("2/s", 1),
        ("2/second", 1),
        ("2/m", 60),
        ("2/minute", 60),
        ("2/h", 3600),
        ("2/day", 86400),
    ):
        assert one_rule(f"name: a\nlimit: {text}\naction: accept").limit == LimitConfig(2, period, 5, False)


def test_yaml_words_are_taken_as_written() -> None:
    # YAML 1.1 reads `no` as false; as an interface or a rule name it stays the word.
    config = parse_policy("zones:\n  external: [no]\ningress:\n  - {name: on, action: drop}\n")
    assert config.zones["external"] == ("no",)
    assert config.ingress[0].name == "on"


# -- validation: one error each, exact place and message ---------------------------------------


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (
            "name: a\nprot: tcp\naction: accept",
            "p.yaml:6:5: ingress rule 'a': unknown key 'prot' (did you mean 'proto'?)",
        ),
        ("name: a\naction: accept\nwhatever: 1", "p.yaml:7:5: ingress rule 'a': unknown key 'whatever'"),
        ("action: accept", "p.yaml:5:5: ingress rule 1: missing required key 'name'"),
        ("name: a", "p.yaml:5:5: ingress rule 'a': missing required key 'action'"),
        (
            "name: a\naction: allow",
            "p.yaml:6:13: ingress rule 'a': action: expected accept, drop or reject, got 'allow'",
        ),
        (
            "name: a\naction: acept",
            "p.yaml:6:13: ingress rule 'a': action: expected accept, drop or reject, got 'acept' (did you "
            "mean 'accept'?)",
        ),
        ("name: ''\naction: drop", "p.yaml:5:11: ingress rule 1: name: must not be empty"),
        ("name: [a]\naction: drop", "p.yaml:5:11: ingress rule 1: name: expected a single value, got a list"),
        (
            "name: a\naction: drop\nproto: tpc",
            "p.yaml:7:12: ingress rule 'a': proto: unknown protocol 'tpc' (did you mean 'tcp'?)",
        ),
        (
            "name: a\naction: drop\nproto: 256",
            "p.yaml:7:12: ingress rule 'a': proto: protocol number 256 is out of range 0-255",
        ),
        (
            "name: a\naction: drop\nproto: [tcp, any]",
            "p.yaml:7:18: ingress rule 'a': proto: 'any' cannot be combined with other protocols",
        ),
        ("name: a\naction: drop\nproto: '²'", "p.yaml:7:12: ingress rule 'a': proto: unknown protocol '²'"),
        ("name: a\naction: drop\nproto: []", "p.yaml:7:12: ingress rule 'a': proto: the list is empty"),
        (
            "name: a\naction: drop\nproto: {tcp: 1}",
            "p.yaml:7:12: ingress rule 'a': proto: expected a value or a list, got a mapping",
        ),
        (
            "name: a\naction: drop\nproto: [[tcp]]",
            "p.yaml:7:13: ingress rule 'a': proto: expected a single value, got a list",
        ),
        (
            "name: a\naction: drop\nfamily: inet6",
            "p.yaml:7:13: ingress rule 'a': family: expected ipv4 or ipv6, got 'inet6'",
        ),
        (
            "name: a\naction: drop\nto: 10.0.0.256",
            "p.yaml:7:9: ingress rule 'a': to: '10.0.0.256' is not an IP address or network",
        ),
        (
            "name: a\naction: drop\nfrom: [10.0.0.0/33]",
            "p.yaml:7:12: ingress rule 'a': from: '10.0.0.0/33' is not an IP address or network",
        ),
        (
            "name: a\naction: drop\nfrom: fd00::1/64",
            "p.yaml:7:11: ingress rule 'a': from: 'fd00::1/64' has host bits set (did you mean fd00::/64?)",
        ),
        (
            "name: a\naction: drop\nto: [any, 10.0.0.1]",
            "p.yaml:7:10: ingress rule 'a': to: 'any' cannot be combined with addresses",
        ),
        (
            "name: a\naction: drop\nfrom: gateway",
            "p.yaml:7:11: ingress rule 'a': from: 'gateway' is only meaningful in 'to' of ingress rules and "
            "'from' of egress rules",
        ),
        (
            "name: a\naction: drop\nfamily: ipv4\nto: [10.0.0.1, fd00::1]",
            "p.yaml:8:20: ingress rule 'a': to: 'fd00::1' is IPv6 but the rule is family ipv4",
        ),
        (
            "name: a\naction: drop\nfrom: 10.0.0.0/8\nto: fd00::/8",
            "p.yaml:5:5: ingress rule 'a': can never match: its proto, from and to have no IP version in "
            "common",
        ),
        (
            "name: a\naction: drop\nproto: icmpv6\nto: 10.0.0.1",
            "p.yaml:5:5: ingress rule 'a': can never match: its proto, from and to have no IP version in "
            "common",
        ),
        (
            "name: a\naction: drop\nproto: icmpv6\nfamily: ipv4",
            "p.yaml:7:12: ingress rule 'a': proto: icmpv6 is IPv6 only but the rule is family ipv4",
        ),
        (
            "name: a\naction: drop\nproto: tcp\nports: [22, 70000]",
            "p.yaml:8:17: ingress rule 'a': ports: port 70000 is out of range 1-65535",
        ),
        (
            "name: a\naction: drop\nproto: tcp\nports: 0",
            "p.yaml:8:12: ingress rule 'a': ports: port 0 is out of range 1-65535",
        ),
        (
            "name: a\naction: drop\nproto: tcp\nports: 9000-8000",
            "p.yaml:8:12: ingress rule 'a': ports: range '9000-8000' starts after it ends",
        ),
        (
            "name: a\naction: drop\nproto: tcp\nsports: 1-70000",
            "p.yaml:8:13: ingress rule 'a': sports: port 70000 is out of range 1-65535",
        ),
        (
            "name: a\naction: drop\nproto: tcp\nports: 22:80",
            "p.yaml:8:12: ingress rule 'a': ports: '22:80' is not a port or a range like 8000-8100",
        ),
        (
            "name: a\naction: drop\nproto: tcp\nports: true",
            "p.yaml:8:12: ingress rule 'a': ports: 'true' is not a port or a range like 8000-8100",
        ),
        (
            "name: a\naction: drop\nproto: icmp\nports: 22",
            "p.yaml:8:5: ingress rule 'a': ports: needs proto tcp or udp, the only protocols with ports "
            "(the rule's proto is icmp)",
        ),
        (
            "name: a\naction: drop\nproto: [tcp, gre]\nsports: 22",
            "p.yaml:8:5: ingress rule 'a': sports: needs proto tcp or udp, the only protocols with ports "
            "(the rule's proto is tcp, gre)",
        ),
        (
            "name: a\naction: drop\nports: 22",
            "p.yaml:7:5: ingress rule 'a': ports: needs proto tcp or udp, the only protocols with ports "
            "(the rule has no proto)",
        ),
        (
            "name: a\naction: drop\nproto: tcp\nicmp-types: echo-request",
            "p.yaml:8:5: ingress rule 'a': icmp-types: needs proto icmp or icmpv6 (the rule's proto is tcp)",
        ),
        (
            "name: a\naction: drop\nicmp-types: echo-request",
            "p.yaml:7:5: ingress rule 'a': icmp-types: needs proto icmp or icmpv6 (the rule has no proto)",
        ),
        (
            "name: a\naction: drop\nproto: icmp\nicmp-types: [echo-requets]",
            "p.yaml:8:18: ingress rule 'a': icmp-types: unknown ICMP type 'echo-requets' (did you mean "
            "'echo-request'?)",
        ),
        (
            "name: a\naction: drop\nproto: icmp\nicmp-types: ping",
            "p.yaml:8:17: ingress rule 'a': icmp-types: unknown ICMP type 'ping'",
        ),
        (
            "name: a\naction: drop\nproto: icmp\nicmp-types: 8",
            "p.yaml:8:17: ingress rule 'a': icmp-types: type number 8 is ambiguous with proto icmp, which "
            "covers ICMPv4 and ICMPv6: use a name, or family ipv4 / ipv6",
        ),
        (
            "name: a\naction: drop\nproto: icmpv6\nicmp-types: 256",
            "p.yaml:8:17: ingress rule 'a': icmp-types: ICMP type 256 is out of range 0-255",
        ),
        (
            "name: a\naction: drop\nproto: icmpv6\nicmp-types: source-quench",
            "p.yaml:8:17: ingress rule 'a': icmp-types: 'source-quench' does not exist in ICMPv6",
        ),
        (
            "name: a\naction: drop\nproto: icmp\nfamily: ipv4\nicmp-types: packet-too-big",
            "p.yaml:9:17: ingress rule 'a': icmp-types: 'packet-too-big' does not exist in ICMPv4",
        ),
        (
            "name: a\naction: drop\nin: [wan0, 'a b']",
            "p.yaml:7:16: ingress rule 'a': in: 'a b' is not a valid interface name",
        ),
        (
            "name: a\naction: drop\nout: abcdefghijklmnop",
            "p.yaml:7:10: ingress rule 'a': out: 'abcdefghijklmnop' is not a valid interface name",
        ),
        (
            "name: a\naction: drop\nlog: yes please",
            "p.yaml:7:10: ingress rule 'a': log: expected true or false, got 'yes please'",
        ),
        (
            "name: a\naction: drop\nlimit: 5/week",
            "p.yaml:7:12: ingress rule 'a': limit: expected N/second, N/minute, N/hour or N/day, got "
            "'5/week'",
        ),
        (
            "name: a\naction: drop\nlimit: 5",
            "p.yaml:7:12: ingress rule 'a': limit: expected N/second, N/minute, N/hour or N/day, got '5'",
        ),
        (
            "name: a\naction: drop\nlimit: 0/second",
            "p.yaml:7:12: ingress rule 'a': limit: the rate must be at least 1, got '0/second'",
        ),
        (
            "name: a\naction: drop\nlimit: 1/s\nlimit-burst: 0",
            "p.yaml:8:18: ingress rule 'a': limit-burst: expected a positive integer, got '0'",
        ),
        (
            "name: a\naction: drop\nlimit: 1/s\nlimit-burst: many",
            "p.yaml:8:18: ingress rule 'a': limit-burst: expected a positive integer, got 'many'",
        ),
        (
            "name: a\naction: drop\nlimit: 1/s\nlimit-per: host",
            "p.yaml:8:16: ingress rule 'a': limit-per: expected rule or source, got 'host'",
        ),
        (
            "name: a\naction: drop\nlimit-burst: 3",
            "p.yaml:7:5: ingress rule 'a': limit-burst: only meaningful together with limit",
        ),
        ("name: a\naction: drop\nname: b", "p.yaml:7:5: ingress rule 'a': duplicate key 'name'"),
    ],
)
def test_rule_error(rule: str, expected: str) -> None:
    assert rule_errors(rule) == [expected]


def test_gateway_in_egress_to_is_an_error() -> None:
    assert rule_errors("name: a\naction: drop\nto: gateway", side="egress") == [
        "p.yaml:7:9: egress rule 'a': to: 'gateway' is only meaningful in 'to' of ingress rules and 'from' "
        "of egress rules"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "zone:\n  external: [wan0]\n",
            [
                "p.yaml:1:1: unknown key 'zone' (did you mean 'zones'?)",
                "p.yaml:1:1: missing required key 'zones'",
            ],
        ),
        (
            ZONES + "rules: []\n",
            ["p.yaml:4:1: unknown key 'rules'"],  # nine top keys: too many to list
        ),
        (ZONES + "zones: {}\n", ["p.yaml:4:1: duplicate key 'zones'"]),
        (
            "zones:\n  external: [wan0]\n  dmz: [dmz0]\n",
            [
                "p.yaml:3:3: zones: dmz: a zone other than external and internal is a mapping that says "
                "which side it faces, e.g. {faces: inside, interfaces: [...]}"
            ],
        ),
        (
            "zones:\n  extrenal: [wan0]\n",
            [
                "p.yaml:2:3: zones: extrenal: a zone other than external and internal is a mapping that "
                "says which side it faces, e.g. {faces: inside, interfaces: [...]} "
                "(did you mean 'external'?)",
                "p.yaml:2:3: zones: missing required zone 'external'",
            ],
        ),
        (
            "zones:\n  external: [wan0]\n  internal: [lan0, wan0]\n",
            ["p.yaml:3:20: zones: internal: interface 'wan0' is already in zone 'external'"],
        ),
        (
            "zones:\n  external: [wan0, wan0]\n",
            ["p.yaml:2:20: zones: external: interface 'wan0' is listed twice in 'external'"],
        ),
        (
            "zones:\n  external: [eth/0]\n",
            ["p.yaml:2:14: zones: external: 'eth/0' is not a valid interface name"],
        ),
        ("zones: [wan0]\n", ["p.yaml:1:8: zones: expected a mapping, got a list"]),
        ("zones:\n", ["p.yaml:1:7: zones: expected a mapping, got nothing"]),
        (
            ZONES + "defaults:\n  ingress: allow\n",
            ["p.yaml:5:12: defaults: ingress: expected accept, drop or reject, got 'allow'"],
        ),
        (
            ZONES + "defaults:\n  invalid: reject\n",
            ["p.yaml:5:12: defaults: invalid: expected accept or drop, got 'reject'"],
        ),
        (
            ZONES + "defaults:\n  egres: drop\n",
            ["p.yaml:5:3: defaults: unknown key 'egres' (did you mean 'egress'?)"],
        ),
        (ZONES + "ingress: {name: a}\n", ["p.yaml:4:10: ingress: expected a list of rules, got a mapping"]),
        (
            ZONES + "egress: [web]\n",
            ["p.yaml:4:10: egress rule 1: expected a mapping with name and action, got 'web'"],
        ),
        (
            ZONES + "options:\n  max-flows: 0\n",
            ["p.yaml:5:14: options: max-flows: expected a positive integer, got '0'"],
        ),
        (
            ZONES + "options:\n  max-flows: 1.5\n",
            ["p.yaml:5:14: options: max-flows: expected a positive integer, got '1.5'"],
        ),
        (
            ZONES + "options:\n  tcp-pickup: lose\n",
            [
                "p.yaml:5:15: options: tcp-pickup: expected strict or loose, got 'lose' (did you mean "
                "'loose'?)"
            ],
        ),
        (
            ZONES + "options:\n  failure-mode: fail-open\n",
            [
                "p.yaml:5:17: options: failure-mode: expected closed or open, got 'fail-open' (did you mean "
                "'open'?)"
            ],
        ),
        (
            ZONES + "options:\n  reload: always\n",
            ["p.yaml:5:11: options: reload: expected recheck or keep, got 'always'"],
        ),
        (
            ZONES + "options:\n  log-denied: 1\n",
            ["p.yaml:5:15: options: log-denied: expected true or false, got '1'"],
        ),
        (
            ZONES + "options:\n  log-limit: fast\n",
            ["p.yaml:5:14: options: log-limit: expected N/second, N/minute, N/hour or N/day, got 'fast'"],
        ),
        (
            ZONES + "options:\n  log-limit: 0/second\n",
            ["p.yaml:5:14: options: log-limit: the rate must be at least 1, got '0/second'"],
        ),
        (
            ZONES + "options:\n  log-limit: 10/fortnight\n  log-limit-burst: 0\n",
            [
                "p.yaml:5:14: options: log-limit: expected N/second, N/minute, N/hour or N/day, got "
                "'10/fortnight'",
                "p.yaml:6:20: options: log-limit-burst: expected a positive integer, got '0'",
            ],
        ),
        (
            ZONES + "options:\n  log-limit-burst: [5]\n",
            ["p.yaml:5:20: options: log-limit-burst: expected a positive integer, got a list"],
        ),
        (
            ZONES + "options:\n  log-limits: 3/minute\n",
            ["p.yaml:5:3: options: unknown key 'log-limits' (did you mean 'log-limit'?)"],
        ),
        (
            ZONES + "options:\n  gateway-addresses: [10.0.0.1, 10.0.0.0/24]\n",
            ["p.yaml:5:33: options: gateway-addresses: '10.0.0.0/24' is not an IP address"],
        ),
        (
            ZONES + "options:\n  max_flows: 10\n",
            ["p.yaml:5:3: options: unknown key 'max_flows' (did you mean 'max-flows'?)"],
        ),
    ],
)
def test_policy_error(text: str, expected: list[str]) -> None:
    assert errors(text) == expected


def test_duplicate_rule_names_across_sides() -> None:
    text = ZONES + "ingress:\n  - {name: web, action: accept}\negress:\n  - {name: web, action: drop}\n"
    assert errors(text) == ["p.yaml:7:12: duplicate rule name 'web' (first used at line 5)"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "zones: [wan0\n",
            "p.yaml:2:1: invalid YAML: expected ',' or ']', but got '<stream end>' (while parsing a flow "
            "sequence at line 1)",
        ),
        (
            "zones:\n  external: [wan0]\n ingress: []\n",
            "p.yaml:3:2: invalid YAML: expected <block end>, but found '<block mapping start>' (while "
            "parsing a block mapping at line 1)",
        ),
        ("zones: external: wan0\n", "p.yaml:1:16: invalid YAML: mapping values are not allowed here"),
        (
            "zones:\n\texternal: [wan0]\n",
            "p.yaml:2:1: invalid YAML: found character '\\t' that cannot start any token (YAML indents with "
            "spaces, not tabs)",
        ),
        (
            "zones: {}\n---\nzones: {}\n",
            "p.yaml:2:1: invalid YAML: expected a single document in the stream, but found another document",
        ),
        (
            "zones: {external: [wan0]}\n# bell \x07\n",
            "p.yaml:2:8: invalid YAML: unacceptable character #x0007: special characters are not allowed",
        ),
        ("", "p.yaml:1:1: the policy is empty"),
        ("# only a comment\n", "p.yaml:1:1: the policy is empty"),
        ("- zones\n", "p.yaml:1:1: expected a mapping with zones, defaults, ingress and egress, got a list"),
    ],
)
def test_yaml_syntax_errors_are_located(text: str, expected: str) -> None:
    assert errors(text) == [expected]


def node_tree(node: Node) -> list[tuple[object, ...]]:
    """Every node of a composed tree, depth first: its kind, tag, scalar value and position."""
    scalar = node.value if isinstance(node, ScalarNode) else None
    found: list[tuple[object, ...]] = [
        (type(node).__name__, node.tag, scalar, node.start_mark.line, node.start_mark.column)
    ]
    if isinstance(node, MappingNode):
        for key, value in node.value:
            found += node_tree(key) + node_tree(value)
    elif isinstance(node, SequenceNode):
        for item in node.value:
            found += node_tree(item)
    return found


@pytest.mark.skipif(not getattr(yaml, "__with_libyaml__", False), reason="PyYAML built without libyaml")
def test_libyaml_composes_the_same_tree_as_pure_python() -> None:
    """config composes with libyaml when it can (fast on large policies): positions, tags and
    values must be those of PyYAML's own composer, which the messages are checked against."""
    repo = Path(__file__).resolve().parents[3]
    texts = [path.read_text() for path in sorted((repo / "config").rglob("*.yaml"))]
    texts.append(
        "zones: {external: [wan0, 'ppp+'], internal: []}\n"
        'egress:\n  - &web {name: \'web out\', proto: "tcp", ports: [80, "8000-8100"], action: accept}\n'
        "  - name: >-\n      folded\n      name\n    in: no\n    log: yes\n    action: drop  # comment\n"
        "options: {max-flows: 0x10, log-limit: 3/min, gateway-addresses: ['2001:db8::1']}\n"
    )
    for text in texts:
        fast = yaml.compose(text, Loader=yaml.CSafeLoader)
        assert node_tree(fast) == node_tree(yaml.compose(text, Loader=yaml.SafeLoader))
    assert parse_policy(texts[-1]).egress[1].name == "folded name"


def test_all_errors_are_reported_at_once_in_file_order() -> None:
    text = dedent("""\
        zones:
          external: [wan0, lan0]
          internal: [lan0]
        defaults:
          ingress: allow
        ingress:
          - name: mail
            proto: tcp
            to: [10.0.0.256, fd00::25]
            ports: [25, 70000, 9000-8000]
            action: accept
          - name: mail
            prot: udp
            action: acept
          - proto: icmp
            icmp-types: [echo-request, bogus]
        egress:
          - name: dns
            proto: icmp
            ports: 53
            action: accept
        options:
          failure-mode: sometimes
        """)
    assert errors(text) == [
        "p.yaml:3:14: zones: internal: interface 'lan0' is already in zone 'external'",
        "p.yaml:5:12: defaults: ingress: expected accept, drop or reject, got 'allow'",
        "p.yaml:9:10: ingress rule 'mail': to: '10.0.0.256' is not an IP address or network",
        "p.yaml:10:17: ingress rule 'mail': ports: port 70000 is out of range 1-65535",
        "p.yaml:10:24: ingress rule 'mail': ports: range '9000-8000' starts after it ends",
        "p.yaml:12:11: duplicate rule name 'mail' (first used at line 7)",
        "p.yaml:13:5: ingress rule 'mail': unknown key 'prot' (did you mean 'proto'?)",
        "p.yaml:14:13: ingress rule 'mail': action: expected accept, drop or reject, got 'acept' (did you "
        "mean 'accept'?)",
        "p.yaml:15:5: ingress rule 3: missing required key 'name'",
        "p.yaml:15:5: ingress rule 3: missing required key 'action'",
        "p.yaml:16:32: ingress rule 3: icmp-types: unknown ICMP type 'bogus'",
        "p.yaml:20:5: egress rule 'dns': ports: needs proto tcp or udp, the only protocols with ports (the "
        "rule's proto is icmp)",
        "p.yaml:23:17: options: failure-mode: expected closed or open, got 'sometimes'",
    ]


def test_config_error_and_issue_strings() -> None:
    issues = [ConfigIssue("a.yaml", 1, 2, "first"), ConfigIssue("a.yaml", 3, 4, "second")]
    assert str(issues[0]) == "a.yaml:1:2: first"
    err = ConfigError(issues)
    assert str(err) == "a.yaml:1:2: first\na.yaml:3:4: second"
    assert err.issues == issues


# -- files ----------------------------------------------------------------------------------------


def test_load_policy_reads_file_and_hashes_bytes(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(BRIEF_POLICY.encode())
    config = load_policy(path)
    assert config.filename == str(path)
    assert config.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [rule.name for rule in config.ingress] == ["mail", "ping-gateway", "ssh-office"]


def test_load_policy_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("zones:\n  external: [wan0]\ndefaults: {ingress: allow}\n")
    with pytest.raises(ConfigError) as caught:
        load_policy(str(path))
    assert (
        str(caught.value) == f"{path}:3:21: defaults: ingress: expected accept, drop or reject, got 'allow'"
    )


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_policy(missing)
    assert str(caught.value) == f"{missing}:1:1: cannot read: No such file or directory"
    with pytest.raises(ConfigError) as caught:
        load_policy(tmp_path)
    assert str(caught.value) == f"{tmp_path}:1:1: cannot read: Is a directory"
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"zones:\n  external: [w\xffan0]\n")
    with pytest.raises(ConfigError) as caught:
        load_policy(binary)
    assert str(caught.value) == f"{binary}:2:15: cannot read: not UTF-8 text"


# -- robustness -----------------------------------------------------------------------------------

SHIPPED = [
    path.read_text() for path in sorted((Path(__file__).resolve().parents[3] / "config").rglob("*.yaml"))
]


def _outcome(text: str) -> None:
    """A policy text either parses or raises ConfigError with 1-based positions; nothing else."""
    try:
        parse_policy(text, "f.yaml")
    except ConfigError as err:
        assert err.issues
        assert all(issue.line >= 1 and issue.col >= 1 and issue.file == "f.yaml" for issue in err.issues)


@given(st.text())
def test_arbitrary_text_never_crashes(text: str) -> None:
    _outcome(text)


@given(
    st.sampled_from(SHIPPED),
    st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from("-:[]{},#&*!'\" \n\t09az/.+~")),
        max_size=6,
    ),
)
def test_mutated_policies_never_crash(text: str, edits: list[tuple[float, str]]) -> None:
    chars = list(text)
    for where, char in edits:
        chars[int(where * len(chars))] = char
    _outcome("".join(chars))
