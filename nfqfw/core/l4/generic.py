"""The generic tracker (kernel nf_conntrack_proto_generic): for every protocol without a
tracker of its own. A flow is the two addresses; 600 s, ASSURED once replied to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nfqfw.core.l4.base import ASSURED, REPLY, SEEN_REPLY, Tracker, with_family
from nfqfw.core.packet import Packet

if TYPE_CHECKING:
    from nfqfw.core.conntrack import Tracked

OTHER_TIMEOUT = 600.0


class GenericTracker(Tracker):
    """Any other protocol: the key is the protocol and the two addresses, lower first."""

    __slots__ = ()

    name = "generic"
    protos = ()  # the registry gives it every protocol no other tracker claims
    timeouts = {"TIMEOUT": OTHER_TIMEOUT}

    @staticmethod
    def key(pkt: Packet) -> tuple[bytes, bool]:
        a, b = pkt.src, pkt.dst
        if a <= b:
            return bytes((pkt.proto,)) + a + b, True
        return bytes((pkt.proto,)) + b + a, False

    @staticmethod
    def first_packet(key: bytes, orig_a: bool) -> Packet | None:
        size = (len(key) - 1) // 2
        a, b = key[1 : 1 + size], key[1 + size :]
        pkt = Packet()
        pkt.proto = key[0]
        pkt.src, pkt.dst = (a, b) if orig_a else (b, a)
        return with_family(pkt, size)

    def new(self, pkt: Packet, key: bytes, is_a: bool, now: float) -> Tracked:
        return self.ct.open(key, is_a, now, OTHER_TIMEOUT)

    def packet(self, slot: int, bits: int, pkt: Packet, direction: int, now: float) -> Tracked:
        table = self.table
        state = self.ct.ctinfo(bits, direction)
        if direction == REPLY:
            bits |= SEEN_REPLY
            table.bits[slot] = bits
        table.deadline[slot] = now + OTHER_TIMEOUT
        if bits & SEEN_REPLY and not bits & ASSURED:
            self.ct.assure(slot)
        return state
