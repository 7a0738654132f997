"""nfqfw.core.engine with zones beyond two and port forwards: the side each first packet is decided
by, the forwards' implied accept on translated packets (their `from` sets too), zone-pair counts,
and reload recheck."""

from __future__ import annotations

import ipaddress

from nfqfw.core.build import addr, ipv4, tcp
from nfqfw.core.config import parse_policy
from nfqfw.core.decode import decode
from nfqfw.core.engine import VERDICT_CACHE_SIZE, Engine
from nfqfw.core.packet import ACK, SYN
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.recheck import recheck
from nfqfw.core.verdict import Action, Ct, Hook, Meta, Verdict

POLICY = """\
zones:
  external: [wan0]
  internal: {interfaces: [lan0, lan1], networks: [10.0.0.0/24, 10.0.1.0/24]}
  dmz: {faces: inside, interfaces: [dmz0], networks: [10.0.2.0/24]}
  vpn: {faces: inside, interfaces: ['wg+'], networks: [10.8.0.0/24]}
defaults: {ingress: drop, egress: accept, between: drop}
ingress:
  - {name: web-in, proto: tcp, to: 10.0.2.80, ports: 80, action: accept}
egress:
  - {name: no-smb-out, proto: tcp, ports: 445, action: reject}
between:
  - {name: lan-to-dmz-web, from-zone: internal, to-zone: dmz, proto: tcp, ports: 80, action: accept}
  - {name: vpn-to-lan-ssh, from-zone: vpn, to-zone: internal, proto: tcp, ports: 22, action: accept}
  - {name: dmz-to-lan, from-zone: dmz, to-zone: internal, action: reject}
nat:
  masquerade:
    - {out: wan0, from: 10.0.0.0/24}
  forward:
    - {name: smtp, proto: tcp, in: wan0, ports: [25, 587], to: 10.0.0.25, address: 203.0.113.1}
    - {name: alt-web, proto: tcp, in: wan0, ports: 8080, to: 10.0.2.80, to-port: 80, pass: false}
    - {name: office-ssh, proto: tcp, in: wan0, ports: 2222, to: 10.0.0.22, to-port: 22,
       from: 198.51.100.0/24, hairpin: false}
"""

OUTSIDE = addr("198.51.100.7")
STRANGER = addr("192.0.2.9")
LAN_HOST = addr("10.0.0.5")
MAIL = addr("10.0.0.25")
DMZ_WEB = addr("10.0.2.80")
VPN_HOST = addr("10.8.0.2")

FORWARDED_IN = Meta(Hook.FORWARD, "wan0", "lan0", forwarded=True)
HAIRPIN = Meta(Hook.FORWARD, "lan0", "lan0", forwarded=True)


def engine(text: str = POLICY) -> Engine:
    return Engine(CompiledPolicy(parse_policy(text)))


def syn(src: bytes, dst: bytes, dport: int, sport: int = 40000) -> bytes:
    return ipv4(src, dst, 6, tcp(src, dst, sport, dport, seq=1000, flags=SYN))


def decided(verdict: Verdict) -> tuple[Action, str]:
    return verdict.action, verdict.reason


def test_a_forward_admits_what_it_translated_and_only_that() -> None:
    e = engine()
    verdict = e.process(syn(STRANGER, MAIL, 25), FORWARDED_IN, 1.0)
    assert (verdict.action, verdict.ct, verdict.rule, verdict.reason) == (
        Action.ACCEPT,
        Ct.NEW,
        "smtp",
        "forward smtp",
    )
    assert decided(e.process(syn(STRANGER, MAIL, 587, 40001), FORWARDED_IN, 1.0)) == (
        Action.ACCEPT,
        "forward smtp",
    )
    # The same packet addressed to the inside host directly was not translated: the rules decide.
    direct = Meta(Hook.FORWARD, "wan0", "lan0")
    assert decided(e.process(syn(STRANGER, MAIL, 25, 40002), direct, 1.0)) == (Action.DROP, "default ingress")
    # Marked as translated, but no forward translates to this port: the rules decide.
    assert decided(e.process(syn(STRANGER, MAIL, 26, 40003), FORWARDED_IN, 1.0)) == (
        Action.DROP,
        "default ingress",
    )
    assert e.counts() == {"accept forward smtp": 2, "drop default ingress": 2}


def test_a_forward_without_pass_only_translates_and_the_ingress_rules_decide() -> None:
    e = engine()
    verdict = e.process(syn(STRANGER, DMZ_WEB, 80), Meta(Hook.FORWARD, "wan0", "dmz0", forwarded=True), 1.0)
    assert decided(verdict) == (Action.ACCEPT, "rule web-in")
    text = POLICY.replace("  - {name: web-in, proto: tcp, to: 10.0.2.80, ports: 80, action: accept}\n", "")
    verdict = engine(text).process(
        syn(STRANGER, DMZ_WEB, 80), Meta(Hook.FORWARD, "wan0", "dmz0", forwarded=True), 1.0
    )
    assert decided(verdict) == (Action.DROP, "default ingress")


def test_a_forward_restricted_by_from_and_hairpin() -> None:
    e = engine()
    ssh = Meta(Hook.FORWARD, "wan0", "lan0", forwarded=True)
    assert decided(e.process(syn(OUTSIDE, addr("10.0.0.22"), 22), ssh, 1.0)) == (
        Action.ACCEPT,
        "forward office-ssh",
    )
    # From elsewhere the kernel does not translate; a stray mark still finds no forward.
    assert decided(e.process(syn(STRANGER, addr("10.0.0.22"), 22), ssh, 1.0)) == (
        Action.DROP,
        "default ingress",
    )
    # Hairpin: an inside host to the public address, translated on lan0, admitted by the forward.
    assert decided(e.process(syn(LAN_HOST, MAIL, 25), HAIRPIN, 1.0)) == (Action.ACCEPT, "forward smtp")
    # office-ssh has hairpin off: from the inside it is an ordinary egress flow (lan0 to lan0).
    assert decided(e.process(syn(LAN_HOST, addr("10.0.0.22"), 22), HAIRPIN, 1.0)) == (
        Action.ACCEPT,
        "default egress",
    )


def test_flows_between_inside_zones_are_decided_by_between() -> None:
    e = engine()
    lan_to_dmz = Meta(Hook.FORWARD, "lan0", "dmz0")
    assert decided(e.process(syn(LAN_HOST, DMZ_WEB, 80), lan_to_dmz, 1.0)) == (
        Action.ACCEPT,
        "rule lan-to-dmz-web",
    )
    assert decided(e.process(syn(LAN_HOST, DMZ_WEB, 443), lan_to_dmz, 1.0)) == (
        Action.DROP,
        "default between",
    )
    vpn_to_lan = Meta(Hook.FORWARD, "wg0", "lan1")
    assert decided(e.process(syn(VPN_HOST, LAN_HOST, 22), vpn_to_lan, 1.0)) == (
        Action.ACCEPT,
        "rule vpn-to-lan-ssh",
    )
    dmz_to_lan = Meta(Hook.FORWARD, "dmz0", "lan0")
    verdict = e.process(syn(DMZ_WEB, LAN_HOST, 22), dmz_to_lan, 1.0)
    assert (decided(verdict), verdict.reject_with) == ((Action.REJECT, "rule dmz-to-lan"), "tcp-reset")
    # Within one zone (lan0 to lan1), to the outside, and to the gateway: egress, as with two zones.
    assert decided(
        e.process(syn(LAN_HOST, addr("10.0.1.5"), 445), Meta(Hook.FORWARD, "lan0", "lan1"), 1.0)
    ) == (
        Action.REJECT,
        "rule no-smb-out",
    )
    assert decided(e.process(syn(DMZ_WEB, STRANGER, 80), Meta(Hook.FORWARD, "dmz0", "wan0"), 1.0)) == (
        Action.ACCEPT,
        "default egress",
    )
    assert decided(e.process(syn(DMZ_WEB, addr("10.0.2.1"), 53), Meta(Hook.INPUT, "dmz0"), 1.0)) == (
        Action.ACCEPT,
        "default egress",
    )
    # The reply of an accepted between flow is ESTABLISHED, not judged again.
    reply = ipv4(DMZ_WEB, LAN_HOST, 6, tcp(DMZ_WEB, LAN_HOST, 80, 40000, seq=5000, ack=1001, flags=SYN | ACK))
    assert e.process(reply, Meta(Hook.FORWARD, "dmz0", "lan0"), 1.1).ct is Ct.ESTABLISHED


def test_the_sides_of_the_zones() -> None:
    zones = CompiledPolicy(parse_policy(POLICY)).zones
    assert zones.side(Hook.FORWARD, "lan0", "dmz0") == "between"
    assert zones.side(Hook.FORWARD, "wg7", "dmz0") == "between"
    assert zones.side(Hook.FORWARD, "lan0", "lan1") == "egress"
    assert zones.side(Hook.FORWARD, "lan0", "wan0") == "egress"
    assert zones.side(Hook.FORWARD, "lan0", "eth9") == "egress"  # out by an interface in no zone
    assert zones.side(Hook.FORWARD, "wan0", "dmz0") == "ingress"
    assert zones.side(Hook.FORWARD, "eth9", "dmz0") == "ingress"  # in by an interface in no zone
    assert zones.side(Hook.INPUT, "dmz0", None) == "egress"
    assert zones.side(Hook.OUTPUT, None, "dmz0") == "egress"
    assert zones.pair(Hook.FORWARD, "wg3", "lan1") == ("vpn", "internal")
    assert zones.pair(Hook.INPUT, "eth9", None) == ("-", "gateway")
    assert zones.pair(Hook.OUTPUT, None, "wan0") == ("gateway", "external")
    assert zones.route(addr("10.0.2.9")) == "dmz"
    assert zones.route(addr("10.8.0.1")) == "vpn"
    assert zones.route(addr("192.0.2.1")) == "external"  # the default route: the one outside zone
    assert zones.interface_of("vpn") == "wg0"
    assert zones.interface_of("dmz") == "dmz0"


def test_zone_counts_count_first_packets_per_zone_pair() -> None:
    e = engine()
    e.process(syn(LAN_HOST, DMZ_WEB, 80), Meta(Hook.FORWARD, "lan0", "dmz0"), 1.0)
    e.process(syn(LAN_HOST, DMZ_WEB, 80, 40001), Meta(Hook.FORWARD, "lan0", "dmz0"), 1.0)
    e.process(syn(LAN_HOST, DMZ_WEB, 81, 40002), Meta(Hook.FORWARD, "lan0", "dmz0"), 1.0)
    e.process(syn(STRANGER, MAIL, 25), FORWARDED_IN, 1.0)
    e.process(syn(addr("203.0.113.1"), STRANGER, 80), Meta(Hook.OUTPUT, None, "wan0"), 1.0)
    # Not first packets (the handshake's second one) and INVALID ones are not counted.
    reply = ipv4(DMZ_WEB, LAN_HOST, 6, tcp(DMZ_WEB, LAN_HOST, 80, 40000, seq=5000, ack=1001, flags=SYN | ACK))
    e.process(reply, Meta(Hook.FORWARD, "dmz0", "lan0"), 1.1)
    assert e.zone_counts() == {
        "internal->dmz accept": 2,
        "internal->dmz drop": 1,
        "external->internal accept": 1,
        "gateway->external accept": 1,
    }


def test_a_reload_that_moves_an_interface_to_another_zone_re_sides_its_meta() -> None:
    e = engine()
    to_dmz = Meta(Hook.FORWARD, "lan1", "dmz0")  # one object, as the adapter interns it
    assert decided(e.process(syn(LAN_HOST, DMZ_WEB, 22), to_dmz, 1.0)) == (Action.DROP, "default between")
    # lan1 now in no zone: its first packets are ingress ones (the ingress default drops them).
    e.replace_policy(CompiledPolicy(parse_policy(POLICY.replace("[lan0, lan1]", "[lan0]"))))
    assert decided(e.process(syn(LAN_HOST, DMZ_WEB, 22, 40001), to_dmz, 2.0)) == (
        Action.DROP,
        "default ingress",
    )
    # lan1 in the vpn zone: between again, and vpn->dmz has no rule.
    vpn = POLICY.replace("[lan0, lan1]", "[lan0]").replace("['wg+']", "['wg+', lan1]")
    e.replace_policy(CompiledPolicy(parse_policy(vpn)))
    assert decided(e.process(syn(LAN_HOST, DMZ_WEB, 80, 40002), to_dmz, 3.0)) == (
        Action.DROP,
        "default between",
    )
    e.replace_policy(CompiledPolicy(parse_policy(POLICY)))
    assert decided(e.process(syn(LAN_HOST, DMZ_WEB, 80, 40003), to_dmz, 4.0)) == (
        Action.ACCEPT,
        "rule lan-to-dmz-web",
    )
    # Counted by the Meta's interfaces, named with the current zones.
    assert e.zone_counts() == {"internal->dmz drop": 3, "internal->dmz accept": 1}


def test_zone_counts_survive_more_distinct_metas_than_are_kept() -> None:
    e = engine()
    for port in range(VERDICT_CACHE_SIZE + 10):  # a new Meta object each: not interned
        e.process(syn(LAN_HOST, DMZ_WEB, 80, 10000 + port), Meta(Hook.FORWARD, "lan0", "dmz0"), 1.0)
    assert e.zone_counts() == {"internal->dmz accept": VERDICT_CACHE_SIZE + 10}


def test_recheck_keeps_forwarded_flows_while_their_forward_stays() -> None:
    e = engine()
    e.process(syn(STRANGER, MAIL, 25), FORWARDED_IN, 1.0)
    e.process(syn(LAN_HOST, DMZ_WEB, 80), Meta(Hook.FORWARD, "lan0", "dmz0"), 1.0)
    assert len(e.conntrack) == 2
    e.replace_policy(CompiledPolicy(parse_policy(POLICY.replace("ports: [25, 587]", "ports: [587]"))))
    assert len(recheck(e)) == 1  # port 25 is no longer forwarded: the ingress default drops it
    assert len(e.conntrack) == 1
    e.replace_policy(CompiledPolicy(parse_policy(POLICY)))
    assert recheck(e) == []
    e.replace_policy(
        CompiledPolicy(
            parse_policy(POLICY.replace("from-zone: internal, to-zone: dmz", "from-zone: vpn, to-zone: dmz"))
        )
    )
    assert len(recheck(e)) == 1
    assert len(e.conntrack) == 0


SETS_POLICY = """\
zones:
  external: [wan0]
  internal: {interfaces: [lan0], networks: [10.0.0.0/24]}
sets:
  partners: [198.51.100.0/24]
  later: {}
nat:
  forward:
    - {name: office-ssh, proto: tcp, in: wan0, ports: 2222, to: 10.0.0.22, to-port: 22,
       from: ['@partners', '@later', 203.0.113.9], hairpin: false}
"""


def test_a_forward_s_from_takes_its_sets_and_their_runtime_entries() -> None:
    """The forward admits what its `from` holds: the networks, the sets' networks and, once
    refreshed, their runtime entries; a recheck after an entry goes cuts what it had admitted."""
    e = engine(SETS_POLICY)
    ssh = Meta(Hook.FORWARD, "wan0", "lan0", forwarded=True)
    server = addr("10.0.0.22")
    assert decided(e.process(syn(OUTSIDE, server, 22, 40000), ssh, 1.0)) == (
        Action.ACCEPT,
        "forward office-ssh",
    )
    assert decided(e.process(syn(addr("203.0.113.9"), server, 22), ssh, 1.0))[1] == "forward office-ssh"
    assert decided(e.process(syn(STRANGER, server, 22, 40001), ssh, 1.0)) == (Action.DROP, "default ingress")
    later = e.runtime_sets.entries("later")
    later.add(ipaddress.ip_network("192.0.2.0/28"), None)
    e.policy.refresh_runtime()
    assert decided(e.process(syn(STRANGER, server, 22, 40002), ssh, 2.0)) == (
        Action.ACCEPT,
        "forward office-ssh",
    )
    public = e.policy.forwards.public(decode(syn(STRANGER, addr("203.0.113.1"), 2222)), True, "wan0")
    assert public is not None and public.name == "office-ssh"  # the public side (explain, replay) too
    later.remove(ipaddress.ip_network("192.0.2.0/28"))
    e.policy.refresh_runtime()
    assert [flow.meta for flow in recheck(e)] == [ssh]  # the stranger's connection, no longer admitted
    assert decided(e.process(syn(STRANGER, server, 22, 40003), ssh, 3.0)) == (Action.DROP, "default ingress")
