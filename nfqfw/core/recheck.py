"""Re-judge the tracked flows against a new policy (live reload, policy option `reload: recheck`).

Each flow is judged by its first packet, rebuilt from the flow key (see `conntrack.flow_key`
for the layout) and the Meta the adapter gave that packet: the first packet is what the policy
decided on when the flow was created, so "would the new policy still let this flow start?" is
the question asked. Rate limits are ignored: a limit caps how fast flows start, not which ones
may exist.
"""

from __future__ import annotations

from collections.abc import Iterable

from nfqfw.core.conntrack import Flow
from nfqfw.core.engine import Engine
from nfqfw.core.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, SYN, Packet
from nfqfw.core.verdict import Action, Meta

_ADDR_LEN_FAMILY = {4: 4, 16: 6}


def first_packet(flow: Flow) -> Packet | None:
    """The originator's first packet, as far as the policy looks at it; None for a malformed key."""
    key, proto = flow.key, flow.key[0]
    pkt = Packet()
    pkt.proto = proto
    if proto in (PROTO_TCP, PROTO_UDP):
        size = (len(key) - 1) // 2 - 2
        a, b = key[1 : 1 + size + 2], key[3 + size :]
        (src, dst) = (a, b) if flow.orig_a else (b, a)
        pkt.src, pkt.sport = src[:size], int.from_bytes(src[size:], "big")
        pkt.dst, pkt.dport = dst[:size], int.from_bytes(dst[size:], "big")
        if proto == PROTO_TCP:
            pkt.tcp_flags = SYN
    elif proto in (PROTO_ICMP, PROTO_ICMPV6):
        # requester first: type, requester, responder, identifier, 2 bytes of zero
        size = (len(key) - 6) // 2
        pkt.icmp_type, pkt.icmp_code = key[1], 0
        pkt.src, pkt.dst = key[2 : 2 + size], key[2 + size : 2 + 2 * size]
        pkt.icmp_id = int.from_bytes(key[2 + 2 * size : 4 + 2 * size], "big")
    else:
        size = (len(key) - 1) // 2
        a, b = key[1 : 1 + size], key[1 + size :]
        pkt.src, pkt.dst = (a, b) if flow.orig_a else (b, a)
    family = _ADDR_LEN_FAMILY.get(size)
    if family is None or len(pkt.src) != size or len(pkt.dst) != size:
        return None
    pkt.family = family
    return pkt


def still_allowed(engine: Engine, flow: Flow) -> bool:
    """Would the engine's (new) policy accept this flow's first packet?  Flows whose first
    packet is unknown (no Meta recorded) are kept: there is nothing to judge them on."""
    meta = flow.meta
    if not isinstance(meta, Meta):
        return True
    pkt = first_packet(flow)
    if pkt is None:
        return True
    side, to_gateway, from_gateway = engine.classify(pkt, meta)
    policy = engine.policy
    decision = policy.match_standing(side, pkt, to_gateway, from_gateway, meta.in_iface, meta.out_iface)
    return decision.action is Action.ACCEPT


def stale_flows(engine: Engine, flows: Iterable[Flow]) -> list[Flow]:
    """The flows the engine's current policy would no longer allow."""
    return [flow for flow in flows if not still_allowed(engine, flow)]


def recheck(engine: Engine) -> list[Flow]:
    """Remove the flows the engine's current policy no longer allows; returns them."""
    stale = stale_flows(engine, engine.conntrack)
    for flow in stale:
        engine.conntrack.remove(flow)
    return stale
