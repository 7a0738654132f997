"""nfqfw.core.l4: the trackers by protocol number, and what a new protocol's tracker plugs into."""

from __future__ import annotations

import pytest
from conntrack_packets import LAN, WAN, WAN6, admit, echo4, echo6, pkt, tcp4, udp4

from nfqfw.core import l4
from nfqfw.core.build import icmp, ipv4
from nfqfw.core.conntrack import Conntrack, Tracked, first_packet
from nfqfw.core.l4.base import PROTO_STATE, SMALL, Tracker
from nfqfw.core.l4.generic import GenericTracker
from nfqfw.core.l4.icmp import IcmpTracker
from nfqfw.core.l4.tcp import TcpTracker
from nfqfw.core.l4.tcp_states import DEFAULT_TIMEOUTS
from nfqfw.core.l4.udp import UdpTracker
from nfqfw.core.packet import ACK, FIN, PSH, SYN, URG, Packet
from nfqfw.core.verdict import Ct

EXPERIMENT = 253  # RFC 3692: for experimentation


def test_each_protocol_has_its_tracker_and_every_other_the_generic_one() -> None:
    trackers = l4.TRACKERS
    assert len(trackers) == 256
    assert (trackers[6], trackers[17], trackers[1], trackers[58]) == (
        TcpTracker,
        UdpTracker,
        IcmpTracker,
        IcmpTracker,
    )
    assert {trackers[proto] for proto in range(256) if proto not in (1, 6, 17, 58)} == {GenericTracker}


def test_a_protocol_claimed_by_two_trackers_is_refused() -> None:
    class UdpToo(UdpTracker):
        name = "udp-too"

    with pytest.raises(ValueError) as refused:
        l4.by_proto((*l4.REGISTERED, UdpToo))
    assert str(refused.value) == "protocol 17 has two trackers: udp, udp-too"


def test_default_timeouts_are_the_kernels() -> None:
    assert TcpTracker.timeouts is DEFAULT_TIMEOUTS
    assert UdpTracker.timeouts == {"UNREPLIED": 30.0, "REPLIED": 120.0}
    assert IcmpTracker.timeouts == {"TIMEOUT": 30.0}
    assert GenericTracker.timeouts == {"TIMEOUT": 600.0}


class Counting(Tracker):
    """A new protocol's tracker, as small as one gets: flows keyed as the generic tracker keys
    them, 5 s, their packets counted in the state byte of their protocol area."""

    __slots__ = ()

    name = "counting"
    protos = (EXPERIMENT,)
    timeouts = {"TIMEOUT": 5.0}
    key = staticmethod(GenericTracker.key)
    first_packet = staticmethod(GenericTracker.first_packet)

    @staticmethod
    def state_name(bits: int, state: int) -> str:
        return f"SEEN {state}" if bits & PROTO_STATE else Tracker.state_name(bits, state)

    def new(self, pkt: Packet, key: bytes, is_a: bool, now: float) -> Tracked:
        tracked = self.ct.open(key, is_a, now, 5.0)
        self.table.small[tracked.slot * SMALL] = 1
        self.table.bits[tracked.slot] |= PROTO_STATE
        return tracked

    def packet(self, slot: int, bits: int, pkt: Packet, direction: int, now: float) -> Tracked:
        self.table.small[slot * SMALL] += 1
        self.table.deadline[slot] = now + 5.0
        return self.ct.ctinfo(bits, direction)


def test_a_new_protocol_is_one_tracker_and_one_registry_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(l4, "TRACKERS", l4.by_proto((*l4.REGISTERED, Counting)))
    ct = Conntrack()
    data, back = ipv4(LAN, WAN, EXPERIMENT, b"\0" * 8), ipv4(WAN, LAN, EXPERIMENT, b"\0" * 8)
    tracked = admit(ct, data, 10.0)
    flow = tracked.flow
    assert flow is not None and (tracked.ct, flow.deadline, flow.state_name) == (Ct.NEW, 15.0, "SEEN 1")
    assert ct.track(pkt(back), 12.0).ct is Ct.ESTABLISHED
    assert (flow.deadline, flow.state_name) == (17.0, "SEEN 2")
    assert ct.census(12.0) == {(EXPERIMENT, "SEEN 2"): 1}
    first = first_packet(flow)
    assert first is not None and (first.proto, first.src, first.dst) == (EXPERIMENT, LAN, WAN)
    assert flow.row()[6] == bytes((2,)) + bytes(SMALL - 1)  # its protocol area goes with the flow
    slot = ct.slots()[0]
    ct.remove(flow)
    assert flow.state_name == "SEEN 2"  # the removed flow's handle keeps its values
    udp = admit(ct, udp4(LAN, WAN, 40000, 53), 13.0)
    assert udp.slot == slot and ct.table.small[slot * SMALL] == 0  # the area was cleared for reuse


def test_which_packets_could_start_a_flow() -> None:
    """Conntrack.starts_flow (for the gateway's own ICMP errors): each tracker's first-packet
    rule, with no state touched."""
    ct = Conntrack()
    starts = {
        "syn": tcp4(LAN, WAN, 1000, 80, SYN, 1),
        "ack": tcp4(LAN, WAN, 1000, 80, ACK, 1, 1),
        "xmas": tcp4(LAN, WAN, 1000, 80, FIN | PSH | URG, 1),
        "udp": udp4(LAN, WAN, 1000, 53),
        "echo request": echo4(LAN, WAN, 8, 7),
        "echo reply": echo4(LAN, WAN, 0, 7),
        "echo request v6": echo6(WAN6, WAN6, 128, 7),
        "echo reply v6": echo6(WAN6, WAN6, 129, 7),
        "error": ipv4(LAN, WAN, 1, icmp(11, 0, bytes(4), udp4(WAN, LAN, 1, 2))),
        "gre": ipv4(LAN, WAN, 47, bytes(8)),
        "later fragment": ipv4(LAN, WAN, 17, bytes(16), ident=7, frag_offset=8),
    }
    answers = {name: ct.starts_flow(pkt(data)) for name, data in starts.items()}
    assert answers == {
        "syn": True,
        "ack": False,  # strict pick-up
        "xmas": False,
        "udp": True,
        "echo request": True,
        "echo reply": False,
        "echo request v6": True,
        "echo reply v6": False,
        "error": False,
        "gre": True,
        "later fragment": False,
    }
    ct.loose = True
    assert ct.starts_flow(pkt(starts["ack"]))
    assert len(ct) == 0 and ct.track(pkt(starts["syn"]), 1.0).new  # nothing was left pending
