"""nfqfw.core.conntrack: UDP/ICMP lifecycles, RELATED errors, table bound, fragments (clock injected)."""

from __future__ import annotations

import struct

from nfqfw.core.build import addr, icmp, icmpv6, ipv4, ipv6, tcp, udp
from nfqfw.core.conntrack import Conntrack, Tracked
from nfqfw.core.decode import decode
from nfqfw.core.packet import ACK, RST, SYN, Packet
from nfqfw.core.verdict import Ct, Direction

LAN = addr("10.0.0.5")
LAN2 = addr("10.0.0.6")
WAN = addr("203.0.113.7")
ROUTER = addr("198.51.100.1")
LAN6 = addr("fd00::5")
WAN6 = addr("2001:db8::7")
ROUTER6 = addr("2001:db8::1")


def udp4(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes = b"x") -> bytes:
    return ipv4(src, dst, 17, udp(src, dst, sport, dport, payload))


def echo4(src: bytes, dst: bytes, type_: int, ident: int, seq: int = 1) -> bytes:
    return ipv4(src, dst, 1, icmp(type_, 0, (ident, seq), b"ping"))


def echo6(src: bytes, dst: bytes, type_: int, ident: int, seq: int = 1) -> bytes:
    return ipv6(src, dst, 58, icmpv6(src, dst, type_, 0, struct.pack("!HH", ident, seq) + b"ping"))


def pkt(data: bytes) -> Packet:
    decoded = decode(data)
    assert decoded.malformed is None, decoded.malformed
    return decoded


def admit(ct: Conntrack, data: bytes, now: float) -> Tracked:
    """Track a packet and confirm its flow if new (as the engine does for an accepted packet)."""
    tracked = ct.track(pkt(data), now)
    if tracked.new:
        assert tracked.flow is not None
        assert ct.confirm(tracked.flow)
    return tracked


# -- TCP: RST before any reply -------------------------------------------------------------


def tcp4(src: bytes, dst: bytes, sport: int, dport: int, flags: int, seq: int, ack: int = 0) -> bytes:
    return ipv4(src, dst, 6, tcp(src, dst, sport, dport, seq=seq, ack=ack, flags=flags))


def test_rst_before_any_reply_removes_the_flow_and_keeps_its_direction_state() -> None:
    # Kernel: the entry is killed; the RST itself is NEW from the originator (ctinfo IP_CT_NEW:
    # nothing came back yet) and ESTABLISHED from the other side (IP_CT_ESTABLISHED_REPLY).
    for sender, state in (("originator", Ct.NEW), ("responder", Ct.ESTABLISHED)):
        ct = Conntrack()
        admit(ct, tcp4(LAN, WAN, 40000, 80, SYN, seq=1000), 1.0)
        rst = tcp4(LAN, WAN, 40000, 80, RST, seq=1001)
        if sender == "responder":
            rst = tcp4(WAN, LAN, 80, 40000, RST | ACK, seq=0, ack=1001)
        tracked = ct.track(pkt(rst), 1.1)
        assert (tracked.ct, tracked.reason, tracked.flow) == (
            state,
            f"{state.value}: RST before any reply (flow removed)",
            None,
        ), sender
        assert len(ct) == 0


# -- UDP -----------------------------------------------------------------------------------


def test_udp_first_packet_is_new_with_30s_deadline() -> None:
    ct = Conntrack()
    tracked = admit(ct, udp4(LAN, WAN, 40000, 53), 100.0)
    assert tracked.ct is Ct.NEW
    assert tracked.reason == "new"
    assert tracked.direction == Direction.ORIGINAL
    flow = tracked.flow
    assert flow is not None
    assert flow.deadline == 130.0
    assert flow.created == 100.0
    assert flow.state_name == "UNREPLIED"
    assert len(ct) == 1


def test_udp_original_direction_before_reply_stays_new() -> None:
    ct = Conntrack()
    admit(ct, udp4(LAN, WAN, 40000, 53), 100.0)
    tracked = ct.track(pkt(udp4(LAN, WAN, 40000, 53)), 101.0)
    assert tracked.ct is Ct.NEW
    assert tracked.new is False
    assert tracked.flow is not None and tracked.flow.deadline == 131.0


def test_udp_reply_within_two_seconds_is_established_keeps_30s() -> None:
    ct = Conntrack()
    flow = admit(ct, udp4(LAN, WAN, 40000, 53), 100.0).flow
    assert flow is not None
    tracked = ct.track(pkt(udp4(WAN, LAN, 53, 40000)), 101.5)
    assert tracked.ct is Ct.ESTABLISHED
    assert tracked.direction == Direction.REPLY
    assert tracked.flow is flow
    assert flow.seen_reply and not flow.assured
    assert flow.deadline == 131.5
    assert flow.state_name == "REPLIED"
    # exactly 2 s after creation is not "more than 2 s": still 30 s
    assert ct.track(pkt(udp4(LAN, WAN, 40000, 53)), 102.0).ct is Ct.ESTABLISHED
    assert flow.deadline == 132.0 and not flow.assured


def test_udp_stream_after_two_seconds_gets_120s_and_assured() -> None:
    ct = Conntrack()
    flow = admit(ct, udp4(LAN, WAN, 40000, 53), 100.0).flow
    assert flow is not None
    ct.track(pkt(udp4(WAN, LAN, 53, 40000)), 101.0)
    tracked = ct.track(pkt(udp4(LAN, WAN, 40000, 53)), 102.5)
    assert tracked.ct is Ct.ESTABLISHED
    assert tracked.direction == Direction.ORIGINAL
    assert flow.deadline == 222.5
    assert flow.assured
    assert flow.state_name == "ASSURED"


def test_udp_without_reply_after_two_seconds_stays_30s_unassured() -> None:
    ct = Conntrack()
    flow = admit(ct, udp4(LAN, WAN, 40000, 53), 100.0).flow
    assert flow is not None
    assert ct.track(pkt(udp4(LAN, WAN, 40000, 53)), 110.0).ct is Ct.NEW
    assert flow.deadline == 140.0 and not flow.assured


def test_udp_expires_exactly_at_deadline() -> None:
    ct = Conntrack()
    flow = admit(ct, udp4(LAN, WAN, 40000, 53), 100.0).flow
    assert flow is not None
    ct.track(pkt(udp4(WAN, LAN, 53, 40000)), 101.0)
    assert flow.deadline == 131.0
    tracked = ct.track(pkt(udp4(LAN, WAN, 40000, 53)), 131.0)
    assert tracked.ct is Ct.NEW
    assert tracked.new is True
    assert tracked.flow is not flow
    assert tracked.flow is not None and tracked.flow.deadline == 161.0
    assert ct.expired == 1
    assert len(ct) == 0


def test_udp_alive_just_before_deadline() -> None:
    ct = Conntrack()
    flow = admit(ct, udp4(LAN, WAN, 40000, 53), 100.0).flow
    assert flow is not None
    tracked = ct.track(pkt(udp4(WAN, LAN, 53, 40000)), 129.5)
    assert tracked.ct is Ct.ESTABLISHED
    assert tracked.flow is flow
    assert flow.deadline == 249.5
    assert ct.expired == 0


def test_expire_sweeps_due_flows() -> None:
    ct = Conntrack()
    admit(ct, udp4(LAN, WAN, 40000, 53), 100.0)
    admit(ct, echo4(LAN, WAN, 8, 7), 100.0)
    ct.expire(129.0)
    assert len(ct) == 2
    ct.expire(131.0)
    assert len(ct) == 0
    assert ct.expired == 2


def test_unconfirmed_flow_is_not_in_table() -> None:
    ct = Conntrack()
    tracked = ct.track(pkt(udp4(LAN, WAN, 40000, 53)), 100.0)
    assert tracked.new and len(ct) == 0
    again = ct.track(pkt(udp4(LAN, WAN, 40000, 53)), 101.0)
    assert again.new and again.ct is Ct.NEW


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


# -- fragments -----------------------------------------------------------------------------


def test_non_first_fragment_is_untracked() -> None:
    data = ipv4(LAN, WAN, 17, b"\0" * 16, more_fragments=False, frag_offset=8)
    tracked = Conntrack().track(pkt(data), 1.0)
    assert tracked.ct is Ct.UNTRACKED
    assert tracked.reason == "untracked: non-first fragment"
    assert tracked.flow is None


# -- table bound ---------------------------------------------------------------------------


def test_full_table_evicts_oldest_unassured() -> None:
    ct = Conntrack(max_flows=3)
    flows = [admit(ct, udp4(LAN, WAN, 40000 + i, 53), 1.0 + i).flow for i in range(3)]
    assert len(ct) == 3
    fourth = admit(ct, udp4(LAN, WAN, 40003, 53), 5.0).flow
    assert len(ct) == 3
    assert ct.early_drops == 1
    assert flows[0] is not None and ct.get(flows[0].key) is None
    assert all(f is not None and ct.get(f.key) is f for f in (flows[1], flows[2], fourth))


def test_full_table_skips_assured_flows() -> None:
    ct = Conntrack(max_flows=2)
    first = admit(ct, udp4(LAN, WAN, 40000, 53), 1.0).flow
    second = admit(ct, udp4(LAN, WAN, 40001, 53), 1.0).flow
    assert first is not None and second is not None
    ct.track(pkt(udp4(WAN, LAN, 53, 40000)), 2.0)
    ct.track(pkt(udp4(LAN, WAN, 40000, 53)), 4.0)
    assert first.assured
    admit(ct, udp4(LAN, WAN, 40002, 53), 5.0)
    assert ct.get(first.key) is first
    assert ct.get(second.key) is None


def test_full_table_of_assured_flows_refuses() -> None:
    ct = Conntrack(max_flows=1)
    first = admit(ct, udp4(LAN, WAN, 40000, 53), 1.0).flow
    assert first is not None
    ct.track(pkt(udp4(WAN, LAN, 53, 40000)), 2.0)
    ct.track(pkt(udp4(LAN, WAN, 40000, 53)), 4.0)
    assert first.assured
    tracked = ct.track(pkt(udp4(LAN, WAN, 40001, 53)), 5.0)
    assert tracked.new and tracked.flow is not None
    assert ct.confirm(tracked.flow) is False
    assert len(ct) == 1
    assert ct.early_drops == 0


def test_a_removed_flow_confirmed_again_goes_to_the_back_of_the_early_drop_order() -> None:
    ct = Conntrack(max_flows=3)
    first, second, third = (admit(ct, udp4(LAN, WAN, 40000 + i, 53), 1.0 + i).flow for i in range(3))
    assert first is not None and second is not None and third is not None
    ct.remove(first)
    assert ct.get(first.key) is None and first.deadline == 31.0  # the handle keeps its values
    assert ct.confirm(first)  # back in, as the newest
    assert ct.get(first.key) is first
    admit(ct, udp4(LAN, WAN, 40003, 53), 5.0)  # full: the oldest not-ASSURED flow goes
    assert ct.early_drops == 1
    assert ct.get(second.key) is None
    assert ct.get(first.key) is first and ct.get(third.key) is third
