"""nfqfw.core.offline: the kernel's translation, hook and route, and its source NAT, worked out for
explain and replay."""

from __future__ import annotations

import ipaddress

import pytest

from nfqfw.core.build import addr, ipv4, ipv6, tcp, udp
from nfqfw.core.config import parse_policy
from nfqfw.core.offline import OfflineGateway, _peek, _rewrite, source_nat
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.verdict import Hook, Meta

POLICY = """\
zones:
  external: [wan0]
  internal: {interfaces: [lan0], networks: [10.0.0.0/24, 'fd00::/64']}
options: {gateway-addresses: [203.0.113.1, '2001:db8:1::1']}
nat:
  forward:
    - {name: smtp, proto: tcp, in: wan0, ports: [25, 587], to: 10.0.0.25, address: 203.0.113.1}
    - {name: dns, proto: udp, in: wan0, ports: 5353, to: 10.0.0.53, to-port: 53}
    - {name: web6, proto: tcp, in: wan0, ports: 443, to: 'fd00::80', to-port: 8443}
"""
OUTSIDER, PUBLIC, MAIL = addr("198.51.100.7"), addr("203.0.113.1"), addr("10.0.0.25")


def gateway(text: str = POLICY) -> OfflineGateway:
    return OfflineGateway(CompiledPolicy(parse_policy(text)))


def syn(src: bytes, dst: bytes, sport: int, dport: int, flags: int = 0x02) -> bytes:
    return ipv4(src, dst, 6, tcp(src, dst, sport, dport, seq=7, flags=flags, window=512))


@pytest.mark.parametrize("with_checksum", [True, False])
def test_the_rewritten_packet_is_the_one_built_with_the_new_addresses(with_checksum: bool) -> None:
    before = syn(OUTSIDER, PUBLIC, 40000, 25)
    header = _peek(before)
    assert header is not None
    assert _rewrite(before, header, dst=(MAIL, 2525)) == syn(OUTSIDER, MAIL, 40000, 2525)
    assert _rewrite(before, header, src=(MAIL, 2525)) == syn(MAIL, PUBLIC, 2525, 25)
    datagram = ipv4(OUTSIDER, PUBLIC, 17, udp(OUTSIDER, PUBLIC, 999, 5353, b"q"))
    if not with_checksum:
        datagram = datagram[:26] + b"\0\0" + datagram[28:]  # UDP over IPv4 may carry none
    moved = _rewrite(datagram, _peek(datagram), dst=(addr("10.0.0.53"), 53))  # type: ignore[arg-type]
    expected = ipv4(OUTSIDER, addr("10.0.0.53"), 17, udp(OUTSIDER, addr("10.0.0.53"), 999, 53, b"q"))
    assert moved == (expected if with_checksum else expected[:26] + b"\0\0" + expected[28:])
    six = ipv6(
        addr("2001:db8::7"), addr("2001:db8:1::1"), 6, tcp(addr("2001:db8::7"), addr("2001:db8:1::1"), 1, 443)
    )
    expected6 = ipv6(
        addr("2001:db8::7"), addr("fd00::80"), 6, tcp(addr("2001:db8::7"), addr("fd00::80"), 1, 8443)
    )
    assert _rewrite(six, _peek(six), dst=(addr("fd00::80"), 8443)) == expected6  # type: ignore[arg-type]


def test_a_connection_is_translated_both_ways_and_marked_forwarded() -> None:
    g = gateway()
    first = g.arrive(syn(OUTSIDER, PUBLIC, 40000, 587), "wan0")
    assert first.data == syn(OUTSIDER, MAIL, 40000, 587)
    assert first.meta == Meta(Hook.FORWARD, "wan0", "lan0", forwarded=True)
    assert first.forward is not None and first.forward.name == "smtp"
    assert first.public == (PUBLIC, 587)
    later = g.arrive(syn(OUTSIDER, PUBLIC, 40000, 587, 0x10), "wan0")
    assert later.data == syn(OUTSIDER, MAIL, 40000, 587, 0x10) and later.meta.forwarded
    reply = g.arrive(syn(PUBLIC, OUTSIDER, 587, 40000, 0x12), "wan0")  # seen outside: from the public side
    assert reply.data == syn(MAIL, OUTSIDER, 587, 40000, 0x12)
    assert (reply.meta.hook, reply.forward) == (Hook.FORWARD, None)
    inside = g.arrive(syn(MAIL, OUTSIDER, 587, 40000, 0x12), "lan0")  # seen inside: as it is
    assert inside.data == syn(MAIL, OUTSIDER, 587, 40000, 0x12)


def test_only_first_packets_to_a_published_port_are_translated() -> None:
    g = gateway()
    ack = syn(OUTSIDER, PUBLIC, 40001, 25, 0x10)
    assert g.arrive(ack, "wan0").data == ack  # no connection: the kernel does not translate it
    closed = g.arrive(syn(OUTSIDER, PUBLIC, 40002, 22), "wan0")
    assert (closed.meta.hook, closed.forward) == (Hook.INPUT, None)  # the gateway's own port 22
    elsewhere = g.arrive(syn(OUTSIDER, PUBLIC, 40003, 25), "lan1")  # not on the forward's `in`
    assert elsewhere.forward is None
    # No address: any of the gateway's (gateway-addresses), the port mapped.
    dns = g.arrive(ipv4(OUTSIDER, PUBLIC, 17, udp(OUTSIDER, PUBLIC, 999, 5353, b"q")), "wan0")
    assert dns.forward is not None and dns.data == ipv4(
        OUTSIDER, addr("10.0.0.53"), 17, udp(OUTSIDER, addr("10.0.0.53"), 999, 53, b"q")
    )


def test_hook_and_route_without_forwards() -> None:
    g = gateway(POLICY.split("nat:")[0])
    assert g.arrive(syn(OUTSIDER, MAIL, 1, 25), "wan0").meta == Meta(Hook.FORWARD, "wan0", "lan0")
    assert g.arrive(syn(MAIL, OUTSIDER, 1, 25), "lan0").meta == Meta(
        Hook.FORWARD, "lan0", "wan0"
    )  # default route
    assert g.arrive(syn(OUTSIDER, PUBLIC, 1, 25), "wan0").meta == Meta(Hook.INPUT, "wan0", None)
    assert g.arrive(syn(PUBLIC, OUTSIDER, 1, 25), "wan0").meta == Meta(Hook.OUTPUT, None, "wan0")
    legacy = gateway("zones: {external: [wan0], internal: [lan0]}\n")
    packet = syn(OUTSIDER, MAIL, 1, 25)
    arrival = legacy.arrive(packet, "wan0")
    assert (arrival.data, arrival.meta) == (packet, Meta(Hook.FORWARD, "wan0", None))  # as before zones


def test_source_nat_of_a_set_s_member() -> None:
    """The masquerade or snat entry the kernel applies: the first in file order whose `from`
    (networks, or a set's members of the entry's family) holds the source."""
    policy = CompiledPolicy(
        parse_policy(
            "zones:\n  external: [wan0]\n"
            "  internal: {interfaces: [lan0], networks: [10.0.0.0/24, 'fd00::/64']}\n"
            "sets:\n  office: [10.0.0.0/28, 'fd00::/120']\n"
            "nat:\n"
            "  snat: [{out: wan0, from: ['@office', 10.0.0.200/32], to: 203.0.113.5}]\n"
            "  masquerade: [{out: wan0, from: 10.0.0.0/24}, {out: wan0, from: '@office', family: ipv6}]\n"
        )
    )
    found = {
        text: source_nat(policy, addr(text), "wan0")
        for text in ("10.0.0.7", "10.0.0.200", "10.0.0.99", "fd00::7", "fd00::1:7")
    }
    assert {text: None if entry is None else (entry.line, entry.to) for text, entry in found.items()} == {
        "10.0.0.7": (7, ipaddress.ip_address("203.0.113.5")),  # in @office: the snat, written first
        "10.0.0.200": (7, ipaddress.ip_address("203.0.113.5")),
        "10.0.0.99": (8, None),  # the masquerade of 10.0.0.0/24
        "fd00::7": (8, None),  # the IPv6 masquerade of @office's IPv6 members
        "fd00::1:7": None,
    }
    policy.sets["office"].runtime.add(ipaddress.ip_network("fd00::1:0/112"), None)  # as a live set's
    assert source_nat(policy, addr("fd00::1:7"), "wan0") is not None
    assert source_nat(policy, addr("10.0.0.7"), "lan0") is None  # not leaving by wan0
