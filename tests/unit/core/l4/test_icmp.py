"""nfqfw.core.l4.icmp: ICMP/ICMPv6 query flows, RELATED errors, untracked types (clock injected)."""

from __future__ import annotations

import struct

from conntrack_packets import LAN, LAN2, LAN6, ROUTER, ROUTER6, WAN, WAN6, admit, echo4, echo6, pkt, udp4

from nfqfw.core.build import addr, icmp, icmpv6, ipv4, ipv6, tcp
from nfqfw.core.conntrack import Conntrack
from nfqfw.core.packet import SYN
from nfqfw.core.verdict import Ct, Direction

# -- ICMP queries --------------------------------------------------------------------------


def test_icmp_echo_request_then_reply() -> None:
    ct = Conntrack()
    tracked = admit(ct, echo4(LAN, WAN, 8, 0x1234), 50.0)
    assert tracked.ct is Ct.NEW
    flow = tracked.flow
    assert flow is not None
    assert flow.deadline == 80.0
    assert flow.key == bytes((1, 8)) + LAN + WAN + struct.pack("!HH", 0x1234, 0)
    reply = ct.track(pkt(echo4(WAN, LAN, 0, 0x1234)), 51.0)
    assert reply.ct is Ct.ESTABLISHED
    assert reply.direction == Direction.REPLY
    assert reply.flow is flow
    assert flow.deadline == 81.0
    # a second request on the same id after the reply is established too
    assert ct.track(pkt(echo4(LAN, WAN, 8, 0x1234, 2)), 52.0).ct is Ct.ESTABLISHED


def test_icmp_echo_reply_with_other_id_is_invalid() -> None:
    ct = Conntrack()
    admit(ct, echo4(LAN, WAN, 8, 0x1234), 50.0)
    tracked = ct.track(pkt(echo4(WAN, LAN, 0, 0x9999)), 51.0)
    assert tracked.ct is Ct.INVALID
    assert tracked.reason == "icmp: reply without a request"
    assert len(ct) == 1


def test_icmp_unsolicited_echo_reply_is_invalid() -> None:
    tracked = Conntrack().track(pkt(echo4(WAN, LAN, 0, 1)), 1.0)
    assert tracked.ct is Ct.INVALID
    assert tracked.reason == "icmp: reply without a request"
    assert tracked.new is False


def test_icmp_echo_reply_from_other_host_is_invalid() -> None:
    ct = Conntrack()
    admit(ct, echo4(LAN, WAN, 8, 5), 1.0)
    tracked = ct.track(pkt(echo4(ROUTER, LAN, 0, 5)), 2.0)
    assert tracked.ct is Ct.INVALID
    assert tracked.reason == "icmp: reply without a request"


def test_icmpv6_echo_128_129() -> None:
    ct = Conntrack()
    request = admit(ct, echo6(LAN6, WAN6, 128, 77), 10.0)
    assert request.ct is Ct.NEW
    assert request.flow is not None and request.flow.deadline == 40.0
    reply = ct.track(pkt(echo6(WAN6, LAN6, 129, 77)), 11.0)
    assert reply.ct is Ct.ESTABLISHED
    assert reply.flow is request.flow
    other = ct.track(pkt(echo6(WAN6, LAN6, 129, 78)), 11.0)
    assert other.ct is Ct.INVALID
    assert other.reason == "icmp: reply without a request"


def test_icmp_type_that_cannot_start_a_flow() -> None:
    tracked = Conntrack().track(pkt(ipv4(LAN, WAN, 1, icmp(9, 0))), 1.0)
    assert tracked.ct is Ct.INVALID
    assert tracked.reason == "icmp: type 9 cannot start a flow"


# -- RELATED -------------------------------------------------------------------------------


def unreachable4(src: bytes, dst: bytes, quoted: bytes) -> bytes:
    return ipv4(src, dst, 1, icmp(3, 3, b"\0\0\0\0", quoted[:28]))


def test_icmp_dest_unreachable_for_tracked_flow_is_related() -> None:
    ct = Conntrack()
    original = udp4(LAN, WAN, 40000, 53)
    flow = admit(ct, original, 1.0).flow
    tracked = ct.track(pkt(unreachable4(ROUTER, LAN, original)), 2.0)
    assert tracked.ct is Ct.RELATED
    assert tracked.reason == "related"
    assert tracked.flow is flow
    assert tracked.new is False


def test_icmp_error_matching_no_flow_is_invalid() -> None:
    ct = Conntrack()
    admit(ct, udp4(LAN, WAN, 40000, 53), 1.0)
    tracked = ct.track(pkt(unreachable4(ROUTER, LAN, udp4(LAN, WAN, 40001, 53))), 2.0)
    assert tracked.ct is Ct.INVALID
    assert tracked.reason == "icmp error: embedded header matches no flow"


def test_icmp_error_to_wrong_host_is_invalid() -> None:
    ct = Conntrack()
    original = udp4(LAN, WAN, 40000, 53)
    admit(ct, original, 1.0)
    tracked = ct.track(pkt(unreachable4(ROUTER, LAN2, original)), 2.0)
    assert tracked.ct is Ct.INVALID
    assert tracked.reason == "icmp error: outer destination is not the flow's endpoint"


def test_icmpv6_packet_too_big_for_tracked_tcp_flow_is_related() -> None:
    ct = Conntrack()
    syn = ipv6(LAN6, WAN6, 6, tcp(LAN6, WAN6, 50000, 443, seq=1000, flags=SYN))
    flow = admit(ct, syn, 1.0).flow
    assert flow is not None
    mtu = struct.pack("!I", 1280)
    error = ipv6(ROUTER6, LAN6, 58, icmpv6(ROUTER6, LAN6, 2, 0, mtu + syn))
    tracked = ct.track(pkt(error), 2.0)
    assert tracked.ct is Ct.RELATED
    assert tracked.flow is flow


def test_icmpv6_neighbour_solicitation_is_untracked() -> None:
    target = addr("fe80::1")
    src, dst = addr("fe80::2"), addr("ff02::1:ff00:1")
    ns = ipv6(src, dst, 58, icmpv6(src, dst, 135, 0, bytes(4) + target), hop_limit=255)
    tracked = Conntrack().track(pkt(ns), 1.0)
    assert tracked.ct is Ct.UNTRACKED
    assert tracked.reason == "untracked: icmpv6 neighbour discovery / MLD"
