"""The kernel's SYN proxy as nfqfw sees it: ingress rules with `synproxy: true`.

The kernel answers the SYNs such a rule covers with cookies (nfqfw.firewall renders the rules),
and once a client's ACK proves its cookie it sends the server a SYN of its own from the
gateway's OUTPUT hook: the client's addresses, ports and initial sequence number, the options
the cookie kept, and in the ACK field (without the ACK flag) the proxy's initial sequence
number, the one the client acknowledges (the kernel's synproxy->isn). That SYN is all nfqfw
sees of the handshake, and the engine judges it as the forwarded SYN it stands for. The
server's SYN-ACK then fixes the offset between the two sequence spaces, which the TCP tracker
takes off the client's acknowledgements (l4.tcp). The proxy's own ACKs, to the server and to
the client, never reach nfqfw, as they never reach the kernel's conntrack in the filter hooks
(the kernel rules let them by).

Invariants:
- Only forwarded connections are proxied: a SYN to the gateway itself is never answered by
  the proxy (its handshake would pass the loopback, where nfqfw does not look).
- A SYN leaving the gateway from an address that is not the gateway's, while the policy has a
  synproxy rule, is the proxy's.
- The interface the client's packets came in on is lost with the proxy's SYN: it is judged as
  if it came in on each interface the kernel proxies for (`ifaces`), and accepted only when
  all of them give the same verdict by the same rule.
"""

from __future__ import annotations

from nfqfw.core.config import OUTSIDE, PolicyConfig, RuleConfig
from nfqfw.core.packet import ACK, FIN, PROTO_TCP, RST, SYN, Packet


def rule_ifaces(rule: RuleConfig, external: tuple[str, ...]) -> tuple[str | None, ...]:
    """The interfaces the kernel proxies `rule`'s SYNs from: the rule's `in`, else those of the
    zones facing the outside, else any (None)."""
    return tuple(rule.in_ifaces or external) or (None,)


def ifaces(config: PolicyConfig) -> tuple[str | None, ...] | None:
    """The interfaces the kernel proxies SYNs from, for all synproxy rules (in order, once
    each); None when no rule has `synproxy: true`."""
    external = config.interfaces_facing(OUTSIDE)
    found: dict[str | None, None] = {}
    for rule in config.ingress:
        if rule.synproxy:
            found.update(dict.fromkeys(rule_ifaces(rule, external)))
    return tuple(found) if found else None


def from_proxy(pkt: Packet, local_addresses: frozenset[bytes]) -> bool:
    """Is `pkt`, queued from the OUTPUT hook, the SYN the proxy sends a server? (Not when the
    gateway's addresses are unknown.)"""
    return (
        bool(local_addresses)
        and pkt.proto == PROTO_TCP
        and pkt.tcp_flags & (SYN | ACK | FIN | RST) == SYN
        and pkt.src not in local_addresses
    )
