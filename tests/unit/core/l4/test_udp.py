"""nfqfw.core.l4.udp: the UDP lifecycle (clock injected)."""

from __future__ import annotations

from conntrack_packets import LAN, WAN, admit, pkt, udp4

from nfqfw.core.conntrack import Conntrack
from nfqfw.core.verdict import Ct, Direction


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
