"""nfqfw.core.config: zones beyond two, the between rule list, from-zone/to-zone and the nat
section (masquerade, snat, forward), with their located errors."""

from __future__ import annotations

import ipaddress

import pytest

from nfqfw.core.config import (
    INSIDE,
    OUTSIDE,
    ConfigError,
    ConfigIssue,
    DefaultsConfig,
    ForwardConfig,
    NatConfig,
    SourceNatConfig,
    ZoneDetail,
    ipv6_nat_issues,
    nat_set_issues,
    parse_policy,
)
from nfqfw.core.verdict import Action

ZONES = "zones:\n  external: [wan0]\n  internal: {interfaces: [lan0], networks: [10.0.0.0/24, fd00::/64]}\n"

ISSUE_POLICY = """\
zones:
  external: [wan0]
  internal:
    interfaces: [lan0]
    networks: [10.0.0.0/24, 10.0.1.0/24, fd00::/64]
nat:
  masquerade:                      # source NAT to the outgoing interface's address
    - {out: wan0, from: 10.0.0.0/24}
  snat:                            # source NAT to a fixed address
    - {out: wan0, from: 10.0.1.0/24, to: 203.0.113.5}
  forward:                         # port forwards (DNAT) of published services
    - name: smtp
      proto: tcp
      in: wan0                     # arriving on this interface
      ports: [25, 587]             # the public ports (ranges too)
      to: 10.0.0.25                # the inside host
      from: [198.51.100.0/24]      # optional: only these sources are forwarded
      address: 203.0.113.1         # optional: only this public address
    - name: submission-alt
      proto: tcp
      ports: 2525
      to: 10.0.0.25
      to-port: 25
"""


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_policy(text, "p.yaml")
    return [str(issue) for issue in err.value.issues]


def test_the_issue_s_nat_section_parses_to_exact_objects() -> None:
    config = parse_policy(ISSUE_POLICY, "p.yaml")
    assert config.nat == NatConfig(
        masquerade=(SourceNatConfig(8, 7, 4, ("wan0",), (net("10.0.0.0/24"),)),),
        snat=(
            SourceNatConfig(10, 7, 4, ("wan0",), (net("10.0.1.0/24"),), ipaddress.ip_address("203.0.113.5")),
        ),
        forward=(
            ForwardConfig(
                name="smtp",
                line=12,
                col=7,
                family=4,
                protocols=frozenset({6}),
                in_ifaces=("wan0",),
                ports=((25, 25), (587, 587)),
                to=ipaddress.ip_address("10.0.0.25"),
                src=(net("198.51.100.0/24"),),
                address=ipaddress.ip_address("203.0.113.1"),
            ),
            ForwardConfig(
                name="submission-alt",
                line=19,
                col=7,
                family=4,
                protocols=frozenset({6}),
                in_ifaces=("wan0",),  # no `in`: the interfaces of the zones facing the outside
                ports=((2525, 2525),),
                to=ipaddress.ip_address("10.0.0.25"),
                to_port=25,
            ),
        ),
    )
    assert config.nat.forward[1].translated_ports == ((25, 25),)
    assert config.nat.forward[0].translated_ports == ((25, 25), (587, 587))


def test_a_policy_without_nat_has_none_and_an_empty_nat_section_is_empty() -> None:
    assert parse_policy(ZONES).nat is None
    assert parse_policy(ZONES + "nat:\n").nat == NatConfig()
    assert parse_policy(ZONES + "nat: {masquerade: []}\n").nat == NatConfig()


def test_masquerade_families_follow_from_or_family() -> None:
    text = ZONES + (
        "nat:\n  masquerade:\n"
        "    - {out: wan0}\n"
        "    - {out: [wan0, 'ppp+'], from: [10.0.0.0/24, fd00::/64]}\n"
        "    - {out: wan0, family: ipv6}\n"
        "    - {out: wan0, from: any}\n"
    )
    entries = parse_policy(text).nat.masquerade  # type: ignore[union-attr]
    assert entries == (
        SourceNatConfig(6, 7, 4, ("wan0",)),
        SourceNatConfig(7, 7, 4, ("wan0", "ppp+"), (net("10.0.0.0/24"),)),
        SourceNatConfig(7, 7, 6, ("wan0", "ppp+"), (net("fd00::/64"),)),
        SourceNatConfig(8, 7, 6, ("wan0",)),
        SourceNatConfig(9, 7, 4, ("wan0",)),
    )


def test_ipv6_nat_entries_are_located_for_a_kernel_without_ipv6_nat() -> None:
    text = ZONES + (
        "nat:\n  masquerade:\n    - {out: wan0, from: [10.0.0.0/24, fd00::/64]}\n"
        "  forward:\n    - {name: web6, proto: tcp, ports: 80, to: 'fd00::80'}\n"
    )
    config = parse_policy(text, "p.yaml")
    assert ipv6_nat_issues(config, "no ip6tables nat table") == [
        ConfigIssue("p.yaml", 6, 7, "nat: masquerade: IPv6 NAT is not available: no ip6tables nat table"),
        ConfigIssue("p.yaml", 8, 7, "nat: forward 'web6': IPv6 NAT is not available: no ip6tables nat table"),
    ]
    assert ipv6_nat_issues(parse_policy(ISSUE_POLICY), "whatever") == []
    assert ipv6_nat_issues(parse_policy(ZONES), "whatever") == []


NAT_SETS = "sets:\n  office: [10.0.0.0/28, 'fd00::/120']\n  partners: {}\n"  # lines 4-6


def test_sets_in_nat_from_beside_networks() -> None:
    text = (
        ZONES
        + NAT_SETS
        + (
            "nat:\n  masquerade:\n"
            "    - {out: wan0, from: '@office'}\n"
            "    - {out: wan0, from: ['@office', 'fd00::/64'], family: ipv6}\n"
            "    - {out: wan0, from: [10.0.0.0/24, '@office', 'fd00::/64', '@office']}\n"
            "  snat:\n    - {out: wan0, from: ['@partners', 10.0.0.0/24], to: 203.0.113.5}\n"
            "  forward:\n"
            "    - {name: web, proto: tcp, ports: 80, to: 10.0.0.80, from: ['@partners', '@office']}\n"
        )
    )
    nat = parse_policy(text).nat
    assert nat is not None
    # Without `family` an entry is IPv4 unless its networks say otherwise (a set holds both
    # families: the entry takes the members of its own).
    assert nat.masquerade == (
        SourceNatConfig(9, 7, 4, ("wan0",), (), None, ("office",)),
        SourceNatConfig(10, 7, 6, ("wan0",), (net("fd00::/64"),), None, ("office",)),
        SourceNatConfig(11, 7, 4, ("wan0",), (net("10.0.0.0/24"),), None, ("office",)),
        SourceNatConfig(11, 7, 6, ("wan0",), (net("fd00::/64"),), None, ("office",)),
    )
    assert nat.snat == (
        SourceNatConfig(
            13, 7, 4, ("wan0",), (net("10.0.0.0/24"),), ipaddress.ip_address("203.0.113.5"), ("partners",)
        ),
    )
    (forward,) = nat.forward
    assert (forward.family, forward.src, forward.sets) == (4, (), ("partners", "office"))
    assert nat_set_issues(parse_policy(text, "p.yaml"), "no ipsets") == [
        ConfigIssue("p.yaml", 9, 7, f"nat: masquerade: from: '@office' {NEEDS_IPSETS}: no ipsets"),
        ConfigIssue("p.yaml", 10, 7, f"nat: masquerade: from: '@office' {NEEDS_IPSETS}: no ipsets"),
        ConfigIssue("p.yaml", 11, 7, f"nat: masquerade: from: '@office' {NEEDS_IPSETS}: no ipsets"),
        ConfigIssue("p.yaml", 11, 7, f"nat: masquerade: from: '@office' {NEEDS_IPSETS}: no ipsets"),
        ConfigIssue("p.yaml", 13, 7, f"nat: snat: from: '@partners' {NEEDS_IPSETS}: no ipsets"),
        ConfigIssue("p.yaml", 15, 7, f"nat: forward 'web': from: '@partners' {NEEDS_IPSETS}: no ipsets"),
        ConfigIssue("p.yaml", 15, 7, f"nat: forward 'web': from: '@office' {NEEDS_IPSETS}: no ipsets"),
    ]
    assert nat_set_issues(parse_policy(ISSUE_POLICY), "no ipsets") == []
    assert nat_set_issues(parse_policy(ZONES), "no ipsets") == []


NEEDS_IPSETS = "needs the kernel's ipsets, which cannot be used here"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "nat:\n  masquerade:\n    - {out: wan0, from: ['@ofice', 10.0.0.0/24]}\n",
            ["p.yaml:9:26: nat: masquerade 1: from: unknown set '@ofice' (did you mean 'office'?)"],
        ),
        (
            "nat:\n  snat:\n    - {out: wan0, from: '@nobody', to: 203.0.113.5}\n",
            ["p.yaml:9:25: nat: snat 1: from: unknown set '@nobody' (expected one of: office, partners)"],
        ),
        (
            "nat:\n  forward:\n    - {name: x, proto: tcp, ports: 25, to: 10.0.0.25, from: ['@partner']}\n",
            ["p.yaml:9:62: forward 'x': from: unknown set '@partner' (did you mean 'partners'?)"],
        ),
        (
            "nat:\n  masquerade:\n    - {out: wan0, from: ['@office', 'fd00::/64'], family: ipv4}\n",
            ["p.yaml:9:37: nat: masquerade 1: from: 'fd00::/64' is IPv6 but the entry is IPv4"],
        ),
    ],
)
def test_nat_set_errors(text: str, expected: list[str]) -> None:
    assert errors(ZONES + NAT_SETS + text) == expected


def test_a_broken_set_named_in_nat_is_reported_once_where_it_is_defined() -> None:
    text = ZONES + "sets:\n  office: [10.0.0.1/24]\nnat:\n  masquerade: [{out: wan0, from: '@office'}]\n"
    assert errors(text) == [
        "p.yaml:5:12: sets: office: '10.0.0.1/24' has host bits set (did you mean 10.0.0.0/24?)"
    ]


def test_forward_options() -> None:
    text = ZONES + (
        "nat:\n  forward:\n"
        "    - {name: dns, proto: [tcp, udp], in: [wan0, wan1], ports: ['53', '5300-5310'], to: 10.0.0.53,"
        " pass: false, log: true, hairpin: false, comment: the resolver}\n"
    )
    (forward,) = parse_policy(text).nat.forward  # type: ignore[union-attr]
    assert forward.comment == "the resolver"
    assert forward.protocols == frozenset({6, 17})
    assert forward.in_ifaces == ("wan0", "wan1")
    assert forward.ports == ((53, 53), (5300, 5310))
    assert (forward.passes, forward.log, forward.hairpin) == (False, True, False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "nat:\n  forward:\n    - {name: smtp, proto: tcp, ports: [25, 587], to: 10.0.0.25, "
            "to-port: 2525}\n",
            [
                "p.yaml:6:65: forward 'smtp': to-port: maps a single public port, but ports has several "
                "(25, 587): write one forward per port"
            ],
        ),
        (
            "nat:\n  forward:\n    - {name: smtp, proto: tcp, ports: 25, to: 192.168.9.9}\n",
            [
                "p.yaml:6:47: forward 'smtp': to: 192.168.9.9 is in no zone's networks; name the networks "
                "behind the zone that reaches it, e.g. zones: internal: {interfaces: [lan0], networks: [...]}"
            ],
        ),
        (
            "ingress:\n  - {name: smtp, action: accept}\nnat:\n  forward:\n"
            "    - {name: smtp, proto: tcp, ports: 25, to: 10.0.0.25}\n",
            ["p.yaml:8:14: duplicate name 'smtp': a rule or forward at line 5 has it already"],
        ),
        (
            "nat:\n  forward:\n    - {name: a, proto: tcp, ports: 25, to: 10.0.0.25}\n"
            "    - {name: a, proto: tcp, ports: 26, to: 10.0.0.25}\n",
            ["p.yaml:7:14: duplicate name 'a': a rule or forward at line 6 has it already"],
        ),
        (
            "nat:\n  forward:\n    - {name: x, proto: icmp, ports: 25, to: 10.0.0.25}\n",
            ["p.yaml:6:24: forward 'x': proto: a forward translates ports: tcp, udp or both (not icmp)"],
        ),
        (
            "nat:\n  forward:\n"
            "    - {name: x, proto: tcp, ports: 25, to: 10.0.0.25, from: fd00::/8, address: 2001:db8::1}\n",
            [
                "p.yaml:6:61: forward 'x': from: 'fd00::/8' is IPv6 but the entry is IPv4",
                "p.yaml:6:80: forward 'x': address: 2001:db8::1 is IPv6 but to is IPv4",
            ],
        ),
        (
            "nat:\n  forward:\n    - {name: x, proto: tcp, to: 10.0.0.0/24}\n",
            [
                "p.yaml:6:7: forward 'x': missing required key 'ports'",
                "p.yaml:6:33: forward 'x': to: '10.0.0.0/24' is not an IP address",
            ],
        ),
        (
            "nat:\n  forward:\n    - {name: x, proto: tcp, ports: 25, to: 10.0.0.25, to-port: [25]}\n",
            ["p.yaml:6:64: forward 'x': to-port: expected a single port, got a list"],
        ),
        (
            "nat:\n  forward:\n    - [smtp]\n",
            ["p.yaml:6:7: nat: forward 1: expected a mapping with name, proto, ports, to, got a list"],
        ),
        (
            "nat:\n  masquerade:\n    - {out: wan0, from: 10.0.0.5/24}\n    - {from: 10.0.0.0/24}\n"
            "  snat:\n    - {out: wan0, from: fd00::/64, to: 203.0.113.5}\n    - {out: wan0}\n",
            [
                "p.yaml:6:25: nat: masquerade 1: from: '10.0.0.5/24' has host bits set (did you mean "
                "10.0.0.0/24?)",
                "p.yaml:7:7: nat: masquerade 2: missing required key 'out'",
                "p.yaml:9:25: nat: snat 1: from: 'fd00::/64' is IPv6 but the entry is IPv4",
                "p.yaml:10:7: nat: snat 2: missing required key 'to'",
            ],
        ),
        (
            "nat:\n  masquerade: {out: wan0}\n",
            ["p.yaml:5:15: nat: masquerade: expected a list, got a mapping"],
        ),
        (
            "nat:\n  bogus: []\n",
            ["p.yaml:5:3: nat: unknown key 'bogus' (expected one of: masquerade, snat, forward)"],
        ),
        (
            "nat:\n  masquerade:\n    - {out: wan0, family: ipv5}\n",
            [
                "p.yaml:6:27: nat: masquerade 1: family: expected ipv4 or ipv6, got 'ipv5' (did you "
                "mean 'ipv6'?)"
            ],
        ),
    ],
)
def test_nat_errors(text: str, expected: list[str]) -> None:
    assert errors(ZONES + text) == expected


def test_a_forward_needs_an_in_when_no_zone_faces_the_outside_with_interfaces() -> None:
    text = (
        "zones:\n  external: []\n  internal: {interfaces: [lan0], networks: [10.0.0.0/24]}\n"
        "nat:\n  forward:\n    - {name: x, proto: tcp, ports: 25, to: 10.0.0.25}\n"
    )
    assert errors(text) == [
        "p.yaml:6:7: forward 'x': no 'in', and no zone facing the outside has interfaces",
    ]


# -- zones ------------------------------------------------------------------------------------


def test_zones_beyond_two() -> None:
    text = (
        "zones:\n"
        "  external: [wan0]\n"
        "  internal: {interfaces: [lan0], networks: [10.0.0.0/24]}\n"
        "  dmz: {faces: inside, interfaces: [dmz0], networks: [10.0.2.0/24, 'fd00:2::/64']}\n"
        "  vpn: {faces: inside, interfaces: ['wg+']}\n"
        "  uplink2: {faces: outside, interfaces: [wan1]}\n"
        "defaults: {between: accept}\n"
        "between:\n  - {name: vpn-to-dmz, from-zone: vpn, to-zone: [dmz], action: reject}\n"
    )
    config = parse_policy(text)
    assert config.zones == {
        "external": ("wan0",),
        "internal": ("lan0",),
        "dmz": ("dmz0",),
        "vpn": ("wg+",),
        "uplink2": ("wan1",),
    }
    assert config.zone_details == {
        "internal": ZoneDetail(INSIDE, (net("10.0.0.0/24"),)),
        "dmz": ZoneDetail(INSIDE, (net("10.0.2.0/24"), net("fd00:2::/64"))),
        "vpn": ZoneDetail(INSIDE),
        "uplink2": ZoneDetail(OUTSIDE),
    }
    assert [config.faces(zone) for zone in config.zones] == [OUTSIDE, INSIDE, INSIDE, INSIDE, OUTSIDE]
    assert config.interfaces_facing(INSIDE) == ("lan0", "dmz0", "wg+")
    assert config.interfaces_facing(OUTSIDE) == ("wan0", "wan1")
    assert config.defaults == DefaultsConfig(between=Action.ACCEPT)
    (rule,) = config.between
    assert (rule.name, rule.from_zones, rule.to_zones, rule.action) == (
        "vpn-to-dmz",
        ("vpn",),
        ("dmz",),
        Action.REJECT,
    )


def test_the_two_named_zones_keep_working_and_another_outside_zone_replaces_external() -> None:
    config = parse_policy("zones:\n  external: [wan0]\n  internal: [lan0]\n")
    assert config.zones == {"external": ("wan0",), "internal": ("lan0",)}
    assert config.zone_details == {}
    assert config.defaults.between is Action.DROP
    config = parse_policy("zones:\n  wan: {faces: outside, interfaces: [eth0]}\n")
    assert config.zones == {"external": (), "internal": (), "wan": ("eth0",)}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "zones:\n  lan: {faces: inside, interfaces: [lan0]}\n  wan: {faces: upside, interfaces: [wan0]}\n"
            "  internal: {faces: outside}\n",
            [
                "p.yaml:3:16: zones: wan: faces: expected outside or inside, got 'upside' (did you "
                "mean 'outside'?)",
                "p.yaml:4:21: zones: internal: faces: zone 'internal' faces the inside by its name",
            ],
        ),
        (
            "zones:\n  wan: {interfaces: [wan0]}\n",
            [
                "p.yaml:2:3: zones: missing required zone 'external'",
                "p.yaml:2:8: zones: wan: missing required key 'faces' (outside or inside)",
            ],
        ),
        (
            "zones:\n  external: [wan0]\n  dmz: {faces: inside}\n",
            ["p.yaml:3:8: zones: dmz: missing required key 'interfaces'"],
        ),
        (
            "zones:\n  external: [wan0]\n  dmz: {faces: inside, interfaces: [wan0], networks: "
            "[10.0.2.1/24]}\n",
            [
                "p.yaml:3:37: zones: dmz: interface 'wan0' is already in zone 'external'",
                "p.yaml:3:55: zones: dmz: networks: '10.0.2.1/24' has host bits set (did you mean "
                "10.0.2.0/24?)",
            ],
        ),
        (
            "zones:\n  external: [wan0]\n  dmz: {faces: inside, interfaces: [dmz0]}\n"
            "ingress:\n  - {name: a, action: accept, from-zone: dmz}\n"
            "between:\n  - {name: b, action: accept, to-zone: external, from: gateway}\n"
            "  - {name: c, action: accept, to-zone: dmx}\n"
            "egress:\n  - {name: d, action: accept, from-zone: external}\n",
            [
                "p.yaml:5:42: ingress rule 'a': from-zone: zone 'dmz' faces the inside, but ingress "
                "flows come "
                "from the outside (flows between inside zones are decided in between)",
                "p.yaml:7:40: between rule 'b': to-zone: zone 'external' faces the outside, but "
                "between flows "
                "go to the inside",
                "p.yaml:7:56: between rule 'b': from: 'gateway' is only meaningful in 'to' of "
                "ingress rules and "
                "'from' of egress rules",
                "p.yaml:8:40: between rule 'c': to-zone: unknown zone 'dmx' (did you mean 'dmz'?)",
                "p.yaml:10:42: egress rule 'd': from-zone: zone 'external' faces the outside, but "
                "egress flows "
                "come from the inside",
            ],
        ),
        (
            "zones:\n  external: [wan0]\ndefaults: {between: maybe}\n",
            ["p.yaml:3:21: defaults: between: expected accept, drop or reject, got 'maybe'"],
        ),
    ],
)
def test_zone_errors(text: str, expected: list[str]) -> None:
    assert errors(text) == expected
