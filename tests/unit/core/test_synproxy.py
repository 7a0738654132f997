"""nfqfw.core.synproxy: the interfaces the kernel proxies SYNs from, and which SYN is the proxy's."""

from __future__ import annotations

from nfqfw.core import synproxy
from nfqfw.core.build import addr
from nfqfw.core.config import parse_policy
from nfqfw.core.packet import ACK, SYN, Packet


def ifaces_of(zones: str, rules: str) -> tuple[str | None, ...] | None:
    return synproxy.ifaces(parse_policy(f"zones: {zones}\ningress:\n{rules}"))


def test_the_interfaces_of_every_synproxy_rule_once_each_in_order() -> None:
    plain = "  - {name: web, proto: tcp, ports: 443, action: accept}\n"
    assert ifaces_of("{external: [wan0]}", plain) is None  # no synproxy rule
    proxied = "  - {name: mail, proto: tcp, ports: 25, action: accept, synproxy: true}\n"
    assert ifaces_of("{external: [wan0, wan1]}", proxied) == ("wan0", "wan1")  # the external zone
    assert ifaces_of("{external: [], internal: [lan0]}", proxied) == (None,)  # none external: any
    own = "  - {name: web, proto: tcp, in: [wan2, wan1], ports: 443, action: accept, synproxy: true}\n"
    assert ifaces_of("{external: [wan0, wan1]}", proxied + own) == ("wan0", "wan1", "wan2")


def syn(src: str, flags: int = SYN) -> Packet:
    pkt = Packet()
    pkt.proto, pkt.tcp_flags, pkt.src = 6, flags, addr(src)
    return pkt


def test_the_proxys_syn_leaves_from_an_address_not_the_gateways() -> None:
    gateway = frozenset({addr("203.0.113.1")})
    assert synproxy.from_proxy(syn("198.51.100.7"), gateway)
    assert not synproxy.from_proxy(syn("203.0.113.1"), gateway)  # the gateway's own connection
    assert not synproxy.from_proxy(syn("198.51.100.7", SYN | ACK), gateway)
    assert not synproxy.from_proxy(syn("198.51.100.7"), frozenset())  # addresses unknown: never
