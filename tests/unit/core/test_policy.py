"""nfqfw.core.policy: compiled matchers on hand-built packets (no decoder involved)."""

from __future__ import annotations

import ipaddress
from textwrap import dedent

from nfqfw.core.config import parse_policy
from nfqfw.core.packet import FRAG_FIRST, FRAG_LATER, FRAG_NONE, Packet
from nfqfw.core.policy import SMALL_PORT_SET, CompiledPolicy, PortRanges, RuleDecision, compile_ports
from nfqfw.core.verdict import Action

TCP, UDP, ICMP, ICMPV6, GRE = 6, 17, 1, 58, 47

BRIEF_POLICY = """\
zones:
  external: [wan0]
  internal: [lan0]
defaults:
  ingress: drop
  egress: accept
  invalid: drop
ingress:
  - name: mail
    proto: tcp
    to: [10.0.0.25, fd00::25]
    ports: [25, 587]
    action: accept
  - name: ping-gateway
    proto: icmp
    icmp-types: [echo-request]
    to: gateway
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

ACCEPT_MAIL = RuleDecision(Action.ACCEPT, "mail", False, "rule mail")
ACCEPT_PING = RuleDecision(Action.ACCEPT, "ping-gateway", False, "rule ping-gateway")
ACCEPT_SSH = RuleDecision(Action.ACCEPT, "ssh-office", False, "rule ssh-office")
DROP_DEFAULT = RuleDecision(Action.DROP, None, True, "default ingress")
ACCEPT_EGRESS_DEFAULT = RuleDecision(Action.ACCEPT, None, False, "default egress")


def packet(
    src: str,
    dst: str,
    proto: int,
    sport: int = 0,
    dport: int = 0,
    icmp_type: int = -1,
    frag: int = FRAG_NONE,
) -> Packet:
    pkt = Packet()
    source, destination = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    pkt.family = source.version
    pkt.src, pkt.dst = source.packed, destination.packed
    pkt.proto = proto
    pkt.sport, pkt.dport = sport, dport
    pkt.icmp_type = icmp_type
    pkt.icmp_code = 0 if icmp_type >= 0 else -1
    pkt.frag = frag
    return pkt


def compiled(text: str) -> CompiledPolicy:
    return CompiledPolicy(parse_policy(dedent(text)))


def policy_with(rules: str, side: str = "ingress", extra: str = "") -> CompiledPolicy:
    """Zones wan0 (external), lan0 (internal) and the given rules (YAML list, indented 2)."""
    return compiled(f"zones:\n  external: [wan0]\n  internal: [lan0]\n{extra}{side}:\n{dedent(rules)}")


def ingress(policy: CompiledPolicy, pkt: Packet, to_gateway: bool = False, now: float = 0.0) -> RuleDecision:
    return policy.match("ingress", pkt, to_gateway, False, "wan0", None if to_gateway else "lan0", now)


def egress(policy: CompiledPolicy, pkt: Packet, from_gateway: bool = False, now: float = 0.0) -> RuleDecision:
    return policy.match("egress", pkt, False, from_gateway, None if from_gateway else "lan0", "wan0", now)


# -- the brief's policy --------------------------------------------------------------------------


def test_brief_policy_ingress_v4_and_v6() -> None:
    policy = compiled(BRIEF_POLICY)
    assert ingress(policy, packet("203.0.113.9", "10.0.0.25", TCP, 40000, 25)) == ACCEPT_MAIL
    assert ingress(policy, packet("2001:db8::9", "fd00::25", TCP, 40000, 587)) == ACCEPT_MAIL
    assert ingress(policy, packet("203.0.113.9", "10.0.0.26", TCP, 40000, 25)) == DROP_DEFAULT
    assert ingress(policy, packet("203.0.113.9", "10.0.0.25", TCP, 40000, 26)) == DROP_DEFAULT
    assert ingress(policy, packet("203.0.113.9", "10.0.0.25", UDP, 40000, 25)) == DROP_DEFAULT
    assert ingress(policy, packet("2001:db8::9", "fd00::26", TCP, 40000, 25)) == DROP_DEFAULT


def test_brief_policy_ssh_from_office_to_gateway_only() -> None:
    policy = compiled(BRIEF_POLICY)
    office4, office6 = "198.51.100.77", "2001:db8:100:ffff::1"
    assert ingress(policy, packet(office4, "192.0.2.1", TCP, 50000, 22), to_gateway=True) == ACCEPT_SSH
    assert ingress(policy, packet(office6, "2001:db8::1", TCP, 50000, 22), to_gateway=True) == ACCEPT_SSH
    # through the gateway to a host behind it: not "to: gateway"
    assert ingress(policy, packet(office4, "10.0.0.22", TCP, 50000, 22)) == DROP_DEFAULT
    # just outside the office networks
    assert (
        ingress(policy, packet("198.51.101.0", "192.0.2.1", TCP, 50000, 22), to_gateway=True) == DROP_DEFAULT
    )
    assert (
        ingress(policy, packet("2001:db8:101::1", "2001:db8::1", TCP, 50000, 22), to_gateway=True)
        == DROP_DEFAULT
    )


def test_brief_policy_ping_both_families_with_the_same_name() -> None:
    policy = compiled(BRIEF_POLICY)
    assert (
        ingress(policy, packet("203.0.113.9", "192.0.2.1", ICMP, icmp_type=8), to_gateway=True) == ACCEPT_PING
    )
    assert ingress(policy, packet("2001:db8::9", "2001:db8::1", ICMPV6, icmp_type=128), True) == ACCEPT_PING
    # the other family's number is a different message (ICMPv6 type 8 does not exist, ICMPv4 128 neither)
    assert ingress(policy, packet("203.0.113.9", "192.0.2.1", ICMP, icmp_type=128), True) == DROP_DEFAULT
    assert ingress(policy, packet("2001:db8::9", "2001:db8::1", ICMPV6, icmp_type=8), True) == DROP_DEFAULT
    assert ingress(policy, packet("203.0.113.9", "192.0.2.1", ICMP, icmp_type=0), True) == DROP_DEFAULT
    assert (
        ingress(policy, packet("203.0.113.9", "10.0.0.5", ICMP, icmp_type=8)) == DROP_DEFAULT
    )  # not the gateway


def test_brief_policy_egress() -> None:
    policy = compiled(BRIEF_POLICY)
    smb = RuleDecision(Action.REJECT, "no-smb-out", True, "rule no-smb-out")
    assert egress(policy, packet("10.0.0.5", "203.0.113.9", TCP, 40000, 445)) == smb
    assert egress(policy, packet("fd00::5", "2001:db8::9", TCP, 40000, 445)) == smb
    assert egress(policy, packet("10.0.0.5", "203.0.113.9", TCP, 40000, 443)) == ACCEPT_EGRESS_DEFAULT
    assert egress(policy, packet("10.0.0.5", "203.0.113.9", UDP, 40000, 445)) == ACCEPT_EGRESS_DEFAULT


def test_limit_exhausted_falls_through_and_refills_exactly() -> None:
    policy = compiled(BRIEF_POLICY)  # ping-gateway: 5/second, burst 5 (the default)
    ping = packet("203.0.113.9", "192.0.2.1", ICMP, icmp_type=8)
    assert [ingress(policy, ping, True, now=10.0) for _ in range(6)] == [ACCEPT_PING] * 5 + [DROP_DEFAULT]
    assert ingress(policy, ping, True, now=10.199) == DROP_DEFAULT
    assert ingress(policy, ping, True, now=10.2) == ACCEPT_PING  # one token per 0.2 s
    assert ingress(policy, ping, True, now=10.2) == DROP_DEFAULT
    assert [ingress(policy, ping, True, now=11.2) for _ in range(6)] == [ACCEPT_PING] * 5 + [DROP_DEFAULT]


def test_limit_falls_through_to_the_next_rule() -> None:
    policy = policy_with("""\
        - name: few
          proto: udp
          limit: 1/minute
          limit-burst: 1
          action: accept
        - name: rest
          proto: udp
          log: true
          action: reject
        """)
    pkt = packet("203.0.113.9", "10.0.0.5", UDP, 5000, 53)
    assert ingress(policy, pkt, now=0.0) == RuleDecision(Action.ACCEPT, "few", False, "rule few")
    assert ingress(policy, pkt, now=1.0) == RuleDecision(Action.REJECT, "rest", True, "rule rest")
    assert ingress(policy, pkt, now=60.0) == RuleDecision(Action.ACCEPT, "few", False, "rule few")


def test_limit_tokens_are_only_taken_by_packets_that_match() -> None:
    policy = policy_with("""\
        - name: dns
          proto: udp
          ports: 53
          limit: 1/hour
          limit-burst: 1
          action: accept
        """)
    for _ in range(10):
        assert ingress(policy, packet("203.0.113.9", "10.0.0.5", UDP, 5000, 54)) == DROP_DEFAULT
    accept = RuleDecision(Action.ACCEPT, "dns", False, "rule dns")
    assert ingress(policy, packet("203.0.113.9", "10.0.0.5", UDP, 5000, 53)) == accept


def test_limit_per_source() -> None:
    policy = policy_with("""\
        - name: ping
          proto: icmp
          icmp-types: echo-request
          limit: 1/second
          limit-burst: 2
          limit-per: source
          action: accept
        """)
    accept = RuleDecision(Action.ACCEPT, "ping", False, "rule ping")
    a = packet("203.0.113.1", "10.0.0.5", ICMP, icmp_type=8)
    b = packet("2001:db8::2", "fd00::5", ICMPV6, icmp_type=128)
    assert [ingress(policy, a, now=0.0) for _ in range(3)] == [accept, accept, DROP_DEFAULT]
    assert [ingress(policy, b, now=0.0) for _ in range(3)] == [accept, accept, DROP_DEFAULT]  # its own bucket
    assert [ingress(policy, a, now=1.0) for _ in range(2)] == [accept, DROP_DEFAULT]


# -- rule order and matching details -------------------------------------------------------------


def test_first_match_wins() -> None:
    policy = policy_with("""\
        - name: block-one-host
          from: 203.0.113.66
          action: drop
        - name: web
          proto: tcp
          ports: [80, 443]
          action: accept
        - name: web-again
          proto: tcp
          ports: 80
          action: reject
        """)
    drop = RuleDecision(Action.DROP, "block-one-host", True, "rule block-one-host")
    web = RuleDecision(Action.ACCEPT, "web", False, "rule web")
    assert ingress(policy, packet("203.0.113.66", "10.0.0.5", TCP, 4000, 80)) == drop
    assert ingress(policy, packet("203.0.113.67", "10.0.0.5", TCP, 4000, 80)) == web
    assert ingress(policy, packet("203.0.113.67", "10.0.0.5", TCP, 4000, 443)) == web


def test_port_ranges_and_source_ports() -> None:
    policy = policy_with("""\
        - name: range
          proto: [tcp, udp]
          ports: [8000-8100, 9000]
          sports: 1024-65535
          action: accept
        """)
    accept = RuleDecision(Action.ACCEPT, "range", False, "rule range")
    results = [
        ingress(policy, packet("203.0.113.1", "10.0.0.5", proto, sport, dport))
        for proto, sport, dport in (
            (TCP, 1024, 8000),
            (UDP, 65535, 8100),
            (TCP, 2000, 9000),
            (TCP, 2000, 7999),
            (TCP, 2000, 8101),
            (TCP, 1023, 8050),
            (GRE, 0, 0),
        )
    ]
    assert results == [accept, accept, accept, DROP_DEFAULT, DROP_DEFAULT, DROP_DEFAULT, DROP_DEFAULT]


def test_large_port_sets_become_ranges() -> None:
    assert compile_ports(((1, 10), (20, 20))) == frozenset({*range(1, 11), 20})
    big = compile_ports(((1, 1023), (2000, 2000), (5000, SMALL_PORT_SET + 5000)))
    assert isinstance(big, PortRanges)
    inside = (1, 1023, 2000, 5000, SMALL_PORT_SET + 5000)
    outside = (0, 1024, 1999, 2001, 4999, SMALL_PORT_SET + 5001, 65535)
    assert [port in big for port in inside] == [True] * len(inside)
    assert [port in big for port in outside] == [False] * len(outside)


def test_later_fragments_never_match_rules_with_ports() -> None:
    policy = policy_with("""\
        - name: web
          proto: tcp
          ports: 80
          action: accept
        - name: ping
          proto: icmp
          icmp-types: echo-request
          action: accept
        - name: any-tcp
          proto: tcp
          action: reject
        """)
    first = packet("203.0.113.1", "10.0.0.5", TCP, 4000, 80, frag=FRAG_FIRST)
    later = packet("203.0.113.1", "10.0.0.5", TCP, frag=FRAG_LATER)
    icmp_later = packet("203.0.113.1", "10.0.0.5", ICMP, frag=FRAG_LATER)
    assert ingress(policy, first).rule == "web"
    assert ingress(policy, later).rule == "any-tcp"  # a rule without ports still matches it
    assert ingress(policy, icmp_later) == DROP_DEFAULT


def test_networks_mask_exactly() -> None:
    policy = policy_with("""\
        - name: nets
          from: [10.1.0.0/16, 192.0.2.128/25, 2001:db8:8000::/33, 0.0.0.0/0]
          to: [10.9.9.9, fd00::/8]
          action: accept
        """)
    assert ingress(policy, packet("1.2.3.4", "10.9.9.9", UDP, 1, 2)).rule == "nets"  # via 0.0.0.0/0
    assert ingress(policy, packet("1.2.3.4", "10.9.9.8", UDP, 1, 2)) == DROP_DEFAULT
    v6 = [
        ingress(policy, packet(src, "fdff::1", UDP, 1, 2)).rule
        for src in ("2001:db8:8000::1", "2001:db8:ffff:ffff::1", "2001:db8:7fff::1", "2001:db9::1")
    ]
    assert v6 == ["nets", "nets", None, None]


def test_family_protocol_any_and_numbers() -> None:
    policy = policy_with("""\
        - name: v6-gre
          proto: gre
          family: ipv6
          action: accept
        - name: esp
          proto: 50
          action: accept
        - name: everything-v4
          family: ipv4
          proto: any
          action: reject
        """)
    assert ingress(policy, packet("2001:db8::1", "fd00::1", GRE)).rule == "v6-gre"
    assert ingress(policy, packet("203.0.113.1", "10.0.0.1", GRE)).rule == "everything-v4"
    assert ingress(policy, packet("2001:db8::1", "fd00::1", 50)).rule == "esp"
    assert ingress(policy, packet("2001:db8::1", "fd00::1", 132)) == DROP_DEFAULT


def test_icmpv6_numbers_and_v6_only_names() -> None:
    policy = policy_with("""\
        - name: pmtu
          proto: icmp
          icmp-types: [packet-too-big, destination-unreachable]
          action: accept
        - name: nd
          proto: icmpv6
          icmp-types: [135, 136]
          action: accept
        """)
    assert ingress(policy, packet("2001:db8::1", "fd00::1", ICMPV6, icmp_type=2)).rule == "pmtu"
    assert ingress(policy, packet("2001:db8::1", "fd00::1", ICMPV6, icmp_type=1)).rule == "pmtu"
    assert ingress(policy, packet("203.0.113.1", "10.0.0.1", ICMP, icmp_type=3)).rule == "pmtu"
    assert ingress(policy, packet("203.0.113.1", "10.0.0.1", ICMP, icmp_type=2)) == DROP_DEFAULT
    assert ingress(policy, packet("2001:db8::1", "fd00::1", ICMPV6, icmp_type=135)).rule == "nd"
    assert ingress(policy, packet("203.0.113.1", "10.0.0.1", ICMP, icmp_type=135)) == DROP_DEFAULT


def test_gateway_in_egress_from() -> None:
    policy = policy_with(
        """\
        - name: gateway-dns
          from: gateway
          proto: udp
          ports: 53
          action: accept
        """,
        side="egress",
        extra="defaults: {egress: drop}\n",
    )
    dns = packet("192.0.2.1", "203.0.113.53", UDP, 5353, 53)
    assert egress(policy, dns, from_gateway=True).rule == "gateway-dns"
    assert egress(policy, dns, from_gateway=False) == RuleDecision(Action.DROP, None, True, "default egress")


def test_gateway_mixed_with_addresses() -> None:
    policy = policy_with("""\
        - name: gw-or-host
          to: [gateway, 10.0.0.7]
          action: accept
        """)
    assert (
        ingress(policy, packet("203.0.113.1", "192.0.2.1", UDP, 1, 2), to_gateway=True).rule == "gw-or-host"
    )
    assert ingress(policy, packet("203.0.113.1", "10.0.0.7", UDP, 1, 2)).rule == "gw-or-host"
    assert ingress(policy, packet("203.0.113.1", "10.0.0.8", UDP, 1, 2)).rule is None
    assert ingress(policy, packet("2001:db8::1", "fd00::7", UDP, 1, 2)).rule is None


def test_interfaces_exact_and_wildcard() -> None:
    policy = policy_with("""\
        - name: from-ppp
          in: ppp+
          out: [lan0, lan1]
          action: accept
        """)
    pkt = packet("203.0.113.1", "10.0.0.1", UDP, 1, 2)
    assert policy.match("ingress", pkt, False, False, "ppp7", "lan1", 0.0).rule == "from-ppp"
    assert (
        policy.match("ingress", pkt, False, False, "ppp", "lan1", 0.0).rule == "from-ppp"
    )  # empty suffix too
    assert policy.match("ingress", pkt, False, False, "wan0", "lan1", 0.0).rule is None
    assert policy.match("ingress", pkt, False, False, "ppp7", "lan2", 0.0).rule is None
    assert policy.match("ingress", pkt, True, False, "ppp7", None, 0.0).rule is None  # no out interface


def test_logging_rules_and_denied_defaults() -> None:
    rules = """\
        - name: quiet-drop
          proto: udp
          action: drop
        - name: loud-accept
          proto: tcp
          log: true
          action: accept
        """
    plain = policy_with(rules, extra="options: {log-denied: false}\n")
    udp, tcp, gre = (packet("203.0.113.1", "10.0.0.1", proto, 1, 2) for proto in (UDP, TCP, GRE))
    assert [ingress(plain, pkt).log for pkt in (udp, tcp, gre)] == [False, True, False]
    denied = policy_with(rules)  # log-denied: true is the default (as ufw)
    assert [ingress(denied, pkt).log for pkt in (udp, tcp, gre)] == [True, True, True]
    assert ingress(denied, gre) == RuleDecision(Action.DROP, None, True, "default ingress")
    assert egress(denied, gre) == RuleDecision(
        Action.ACCEPT, None, False, "default egress"
    )  # accepts: no log


# -- zones and policy-wide attributes ---------------------------------------------------------------


def test_zone_of() -> None:
    policy = compiled("""\
        zones:
          external: [wan0, ppp+, vlan1+]
          internal: [lan0, vlan+, ppp9]
        """)
    assert [
        policy.zone_of(name) for name in ("wan0", "lan0", "ppp0", "ppp9", "vlan10", "vlan2", "eth0", None)
    ] == [
        "external",  # exact
        "internal",  # exact
        "external",  # ppp+
        "internal",  # an exact name beats a wildcard
        "external",  # vlan1+ is longer than vlan+
        "internal",  # vlan+
        None,
        None,
    ]
    assert policy.zone_of("ppp0") == "external"  # again, from the cache


def test_policy_wide_attributes() -> None:
    policy = compiled("""\
        zones: {external: [wan0]}
        defaults: {invalid: accept}
        options: {gateway-addresses: [192.0.2.1, "2001:db8::1"]}
        """)
    assert policy.invalid_action is Action.ACCEPT
    assert policy.gateway_addresses == frozenset(
        {bytes([192, 0, 2, 1]), ipaddress.ip_address("2001:db8::1").packed}
    )
    assert policy.config.options.gateway_addresses == ("192.0.2.1", "2001:db8::1")
    assert policy.zone_of("lan0") is None
