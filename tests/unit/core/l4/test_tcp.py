"""nfqfw.core.l4.tcp: the TCP tracker in the flow table (clock injected)."""

from __future__ import annotations

from conntrack_packets import LAN, WAN, admit, pkt, tcp4

from nfqfw.core.conntrack import Conntrack
from nfqfw.core.packet import ACK, RST, SYN
from nfqfw.core.verdict import Ct


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
