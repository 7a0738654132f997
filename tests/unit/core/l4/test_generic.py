"""nfqfw.core.l4.generic: protocols without a tracker of their own, keyed by their addresses."""

from __future__ import annotations

from conntrack_packets import LAN, LAN6, WAN, WAN6, admit, pkt

from nfqfw.core.build import ipv4, ipv6
from nfqfw.core.conntrack import Conntrack, first_packet
from nfqfw.core.l4.generic import GenericTracker
from nfqfw.core.verdict import Ct, Direction

GRE = 47


def test_first_packet_is_new_for_600s_and_a_reply_assures_the_flow() -> None:
    ct = Conntrack()
    tracked = admit(ct, ipv4(LAN, WAN, GRE, b"\0" * 8), 100.0)
    flow = tracked.flow
    assert flow is not None and (tracked.ct, tracked.reason) == (Ct.NEW, "new")
    assert (flow.deadline, flow.state_name) == (700.0, "UNREPLIED")
    again = ct.track(pkt(ipv4(LAN, WAN, GRE, b"\0" * 8)), 110.0)
    assert (again.ct, again.flow, flow.deadline, flow.state_name) == (Ct.NEW, flow, 710.0, "UNREPLIED")
    reply = ct.track(pkt(ipv4(WAN, LAN, GRE, b"\0" * 8)), 120.0)
    assert (reply.ct, reply.direction, reply.flow) == (Ct.ESTABLISHED, Direction.REPLY, flow)
    assert flow.assured and (flow.deadline, flow.state_name) == (720.0, "ASSURED")


def test_the_key_is_the_two_addresses_lower_first_and_reads_back_originator_first() -> None:
    for src, dst in ((LAN, WAN), (WAN, LAN), (LAN6, WAN6), (WAN6, LAN6)):
        data = (ipv4 if len(src) == 4 else ipv6)(src, dst, GRE, b"\0" * 8)
        key, is_a = GenericTracker.key(pkt(data))
        assert (key, is_a) == (bytes((GRE,)) + min(src, dst) + max(src, dst), src < dst)
        ct = Conntrack()
        flow = admit(ct, data, 1.0).flow
        assert flow is not None and flow.key == key
        first = first_packet(flow)
        assert first is not None
        assert (first.proto, first.src, first.dst, first.family) == (GRE, src, dst, 4 if len(src) == 4 else 6)


def test_a_key_of_no_address_length_reads_back_as_nothing() -> None:
    assert GenericTracker.first_packet(bytes((GRE,)) + bytes(10), True) is None
