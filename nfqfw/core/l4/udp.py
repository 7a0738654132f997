"""The UDP tracker (kernel nf_conntrack_proto_udp): no state but the flow flags.

A flow is UNREPLIED (30 s) until a reply; replied traffic that goes on past UDP_STREAM_AFTER
seconds from the flow's creation is a stream: ASSURED, 120 s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nfqfw.core.l4.base import ASSURED, REPLY, SEEN_REPLY, Tracker, ports_first_packet, ports_key
from nfqfw.core.packet import PROTO_UDP, Packet

if TYPE_CHECKING:
    from nfqfw.core.conntrack import Tracked

UDP_UNREPLIED = 30.0
UDP_REPLIED = 120.0
UDP_STREAM_AFTER = 2.0  # kernel: a replied flow still active 2 s after creation is a stream


class UdpTracker(Tracker):
    """UDP: any datagram starts a flow; the timeout follows whether it was replied to."""

    __slots__ = ()

    name = "udp"
    protos = (PROTO_UDP,)
    timeouts = {"UNREPLIED": UDP_UNREPLIED, "REPLIED": UDP_REPLIED}
    key = staticmethod(ports_key)
    first_packet = staticmethod(ports_first_packet)

    def new(self, pkt: Packet, key: bytes, is_a: bool, now: float) -> Tracked:
        return self.ct.open(key, is_a, now, UDP_UNREPLIED)

    # core.fastpath mirrors this for a replied flow.
    def packet(self, slot: int, bits: int, pkt: Packet, direction: int, now: float) -> Tracked:
        table = self.table
        state = self.ct.ctinfo(bits, direction)
        if direction == REPLY:
            bits |= SEEN_REPLY
            table.bits[slot] = bits
        if bits & SEEN_REPLY:
            if now > table.created[slot] + UDP_STREAM_AFTER:
                table.deadline[slot] = now + UDP_REPLIED
                if not bits & ASSURED:
                    self.ct.assure(slot)
            else:
                table.deadline[slot] = now + UDP_UNREPLIED
        else:
            table.deadline[slot] = now + UDP_UNREPLIED
        return state
