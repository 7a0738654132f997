"""The ICMP and ICMPv6 tracker (kernel nf_conntrack_proto_icmp, _icmpv6).

Only queries start a flow (echo, timestamp, info, address mask; ICMPv6 echo and node
information), keyed requester-first by (query type, requester, responder, identifier), so a
packet's direction follows from its type: a reply without its request is INVALID. Errors are
RELATED to the flow whose header they quote, or INVALID; ICMPv6 neighbour discovery and MLD are
untracked; every other type is INVALID. 30 s, refreshed by every packet.

The gateway's own errors (`own_error`, for errors queued from the OUTPUT hook, which forwarded
packets never traverse) follow the kernel, which attaches the quoted packet's conntrack to the
error it sends (nf_ct_attach in icmp_send / icmp6_send): RELATED whenever that packet had a
conntrack, i.e. its flow is in the table or it could start one. A packet whose TTL runs out at
the gateway, or that is too big for the next link, is answered before FORWARD, so its flow
never reaches the table: the error is RELATED all the same.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from nfqfw.core.l4.base import REPLY, SEEN_REPLY, Tracker, with_family
from nfqfw.core.packet import PROTO_ICMP, PROTO_ICMPV6, Packet
from nfqfw.core.verdict import Ct

if TYPE_CHECKING:
    from nfqfw.core.conntrack import Tracked

ICMP_TIMEOUT = 30.0

# ICMP query request type -> its reply type (kernel valid_new / invmap).
ICMP_QUERIES = {8: 0, 13: 14, 15: 16, 17: 18}
ICMPV6_QUERIES = {128: 129, 139: 140}
ICMP_REPLIES = {reply: request for request, reply in ICMP_QUERIES.items()}
ICMPV6_REPLIES = {reply: request for request, reply in ICMPV6_QUERIES.items()}
ICMP_ERRORS = frozenset({3, 4, 5, 11, 12})
ICMPV6_UNTRACKED = frozenset({130, 131, 132, 133, 134, 135, 136, 137, 143})  # MLD, RS, RA, NS, NA, redirect
ICMP_MAX_TYPE = 18
OWN_ERROR = "related: the gateway's own icmp error"  # no flow: its packet never reached the table

_IDENT = struct.Struct("!HH").pack  # the identifier and two bytes of zero


class IcmpTracker(Tracker):
    """ICMP and ICMPv6: query/reply flows, errors related to the flow they quote."""

    __slots__ = ()

    name = "icmp"
    protos = (PROTO_ICMP, PROTO_ICMPV6)
    timeouts = {"TIMEOUT": ICMP_TIMEOUT}
    direction_by_key = True

    @staticmethod
    def key(pkt: Packet) -> tuple[bytes, bool] | None:
        """Requester first: True for a query, False for its reply; None for any other type."""
        proto = pkt.proto
        v4 = proto == PROTO_ICMP
        queries = ICMP_QUERIES if v4 else ICMPV6_QUERIES
        replies = ICMP_REPLIES if v4 else ICMPV6_REPLIES
        kind = pkt.icmp_type
        ident = _IDENT(pkt.icmp_id, 0)
        if kind in queries:
            return bytes((proto, kind)) + pkt.src + pkt.dst + ident, True
        request = replies.get(kind)
        if request is not None:
            return bytes((proto, request)) + pkt.dst + pkt.src + ident, False
        return None

    @staticmethod
    def first_packet(key: bytes, orig_a: bool) -> Packet | None:
        # type, requester, responder, identifier, 2 bytes of zero
        size = (len(key) - 6) // 2
        pkt = Packet()
        pkt.proto = key[0]
        pkt.icmp_type, pkt.icmp_code = key[1], 0
        pkt.src, pkt.dst = key[2 : 2 + size], key[2 + size : 2 + 2 * size]
        pkt.icmp_id = int.from_bytes(key[2 + 2 * size : 4 + 2 * size], "big")
        return with_family(pkt, size)

    def error(self, pkt: Packet) -> Tracked:
        """Errors (RELATED or INVALID), untracked ICMPv6 ND/MLD, types that cannot start a flow."""
        ct = self.ct
        kind = pkt.icmp_type
        if pkt.proto == PROTO_ICMP:
            if kind in ICMP_ERRORS:
                return self._related(pkt)
            if kind > ICMP_MAX_TYPE:
                return ct.answer(Ct.INVALID, f"icmp: unknown type {kind}")
            return ct.answer(Ct.INVALID, f"icmp: type {kind} cannot start a flow")
        if kind < 128:
            return self._related(pkt)
        if kind in ICMPV6_UNTRACKED:
            return ct.answer(Ct.UNTRACKED, "untracked: icmpv6 neighbour discovery / MLD")
        return ct.answer(Ct.INVALID, f"icmpv6: type {kind} cannot start a flow")

    def _related(self, pkt: Packet) -> Tracked:
        ct = self.ct
        inner = pkt.inner
        if inner is None:
            return ct.answer(Ct.INVALID, "icmp error: no embedded header")
        slot = ct.lookup(inner)
        if slot is None:
            return ct.answer(Ct.INVALID, "icmp error: embedded header matches no flow")
        if pkt.dst != inner.src:
            return ct.answer(Ct.INVALID, "icmp error: outer destination is not the flow's endpoint")
        return ct.related(slot)

    def own_error(self, pkt: Packet) -> Tracked:
        """An error the gateway itself sent, back to the source of the packet it quotes: RELATED
        to that packet's flow, or RELATED with no flow (OWN_ERROR) when the packet could start
        one; INVALID when it could not (the kernel gave it no conntrack to attach)."""
        ct = self.ct
        inner = pkt.inner
        if inner is None:
            return ct.answer(Ct.INVALID, "icmp error: no embedded header")
        if pkt.dst != inner.src:
            return ct.answer(Ct.INVALID, "icmp error: outer destination is not the flow's endpoint")
        slot = ct.lookup(inner)
        if slot is not None:
            return ct.related(slot)
        if ct.starts_flow(inner):
            return ct.answer(Ct.RELATED, OWN_ERROR)
        return ct.answer(Ct.INVALID, "icmp error from the gateway: the packet it quotes starts no flow")

    def starts_flow(self, pkt: Packet) -> bool:
        """Only a query (echo, timestamp, ... request) starts a flow."""
        return pkt.icmp_type in (ICMP_QUERIES if pkt.proto == PROTO_ICMP else ICMPV6_QUERIES)

    def new(self, pkt: Packet, key: bytes, is_a: bool, now: float) -> Tracked:
        if not is_a:
            return self.ct.answer(Ct.INVALID, "icmp: reply without a request")
        return self.ct.open(key, is_a, now, ICMP_TIMEOUT)

    def packet(self, slot: int, bits: int, pkt: Packet, direction: int, now: float) -> Tracked:
        table = self.table
        state = self.ct.ctinfo(bits, direction)
        if direction == REPLY:
            table.bits[slot] = bits | SEEN_REPLY
        table.deadline[slot] = now + ICMP_TIMEOUT
        return state
