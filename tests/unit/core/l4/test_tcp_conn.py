"""nfqfw.core.l4.tcp_conn: the per-flow tracker (kernel tcp_new / nf_conntrack_tcp_packet).

Packets are built directly; `Flow` drives one TcpConn the way the conntrack table does
(tcp_new, then tcp_packet for every packet including the first, SEEN_REPLY set after an
accepted or ignored reply). The kernel's packetdrill cases are re-created packet by packet.
"""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tcp_segments import seg

from nfqfw.core.l4.tcp_conn import (
    ACCEPT,
    IGNORE,
    INVALID,
    KILL,
    REOPEN,
    TcpConn,
    TcpResult,
    TcpState,
    TcpTimeouts,
    tcp_new,
    tcp_packet,
    tcp_timeouts,
)
from nfqfw.core.l4.tcp_window import ACK_OVER_UPPER_BOUND, SEQ_OVER_UPPER_BOUND, SEQ_UNDER_LOWER_BOUND
from nfqfw.core.packet import ACK, FIN, PSH, RST, SYN, Packet

ORIG, REPLY = 0, 1
C = 1000  # client ISN
S = 5000  # server ISN

SS = TcpState.SYN_SENT
SR = TcpState.SYN_RECV
ES = TcpState.ESTABLISHED
FW = TcpState.FIN_WAIT
CW = TcpState.CLOSE_WAIT
LA = TcpState.LAST_ACK
TW = TcpState.TIME_WAIT
CL = TcpState.CLOSE
S2 = TcpState.SYN_SENT2


def ok(state: TcpState, timeout: float | None, assure: bool = False) -> TcpResult:
    return TcpResult(ACCEPT, f"tcp: {state.name}", timeout, assure)


def ignored(reason: str) -> TcpResult:
    return TcpResult(IGNORE, reason, None, False)


def invalid(reason: str, timeout: float | None = None) -> TcpResult:
    return TcpResult(INVALID, reason, timeout, False)


class Flow:
    """One flow as the conntrack table drives it."""

    def __init__(self, first: Packet, loose: bool = False, timeouts: TcpTimeouts | None = None) -> None:
        conn = tcp_new(first, loose)
        assert isinstance(conn, TcpConn), conn
        self.conn = conn
        self.timeouts = timeouts or TcpTimeouts()
        self.seen_reply = False
        self.first = tcp_packet(conn, first, ORIG, False, self.timeouts)

    def orig(self, pkt: Packet) -> TcpResult:
        return tcp_packet(self.conn, pkt, ORIG, self.seen_reply, self.timeouts)

    def reply(self, pkt: Packet) -> TcpResult:
        result = tcp_packet(self.conn, pkt, REPLY, self.seen_reply, self.timeouts)
        if result.kind in (ACCEPT, IGNORE):
            self.seen_reply = True  # the kernel sets IPS_SEEN_REPLY after the TCP tracker ran
        return result

    @property
    def state(self) -> TcpState:
        return TcpState(self.conn.state)


def established_flow(timeouts: TcpTimeouts | None = None) -> Flow:
    """Client C -> server S with window scale 7 on both sides, assured."""
    flow = Flow(seg(SYN, C, win=64240, wscale=7, sack_perm=True, mss=1460), timeouts=timeouts)
    assert flow.reply(seg(SYN | ACK, S, C + 1, win=65160, wscale=7, sack_perm=True, mss=1460)).kind == ACCEPT
    assert flow.orig(seg(ACK, C + 1, S + 1, win=502)).assure
    return flow


# --- tcp_new ---------------------------------------------------------------------------------------


def test_syn_creates_flow_in_syn_sent_with_120s() -> None:
    flow = Flow(seg(SYN, C, win=64240))
    assert flow.first == ok(SS, 120.0)
    assert flow.state == SS


def test_tcp_new_leaves_state_to_tcp_packet() -> None:
    conn = tcp_new(seg(SYN, C))
    assert isinstance(conn, TcpConn)
    assert conn.state == TcpState.NONE


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (SYN | ACK, "tcp: SYN-ACK in state NONE"),
        (FIN | ACK, "tcp: FIN in state NONE"),
        (RST, "tcp: RST in state NONE"),
        (RST | ACK, "tcp: RST in state NONE"),
        (SYN | FIN, "tcp: invalid flags FIN+SYN"),
        (0, "tcp: invalid flags none"),
        (FIN | PSH | 0x20, "tcp: invalid flags FIN+PSH+URG"),
    ],
)
@pytest.mark.parametrize("loose", [False, True])
def test_first_packet_that_cannot_create_a_flow(flags: int, reason: str, loose: bool) -> None:
    assert tcp_new(seg(flags, C, C), loose) == reason


def test_strict_pickup_rejects_mid_stream_ack() -> None:
    assert tcp_new(seg(ACK, C, S)) == "tcp: ACK without a connection (mid-stream pick-up disabled)"
    assert (
        tcp_new(seg(ACK | PSH, C, S, length=100))
        == "tcp: ACK without a connection (mid-stream pick-up disabled)"
    )


def test_malformed_first_packet() -> None:
    pkt = seg(SYN, C)
    pkt.malformed = "tcp: data offset 4 < 5"
    assert tcp_new(pkt) == "tcp: data offset 4 < 5"


def test_loose_pickup_of_mid_stream_flow() -> None:
    flow = Flow(seg(ACK | PSH, 700000, 900000, win=1000, length=100), loose=True)
    # No reply seen yet: ESTABLISHED, but only the UNACK timeout.
    assert flow.first == ok(ES, 300.0)
    # The first reply: still counted as unreplied while it is processed.
    assert flow.reply(seg(ACK, 900000, 700100, win=2000)) == ok(ES, 300.0)
    # An answer after a reply was seen makes the flow ASSURED.
    assert flow.orig(seg(ACK, 700100, 900000, win=1000)) == ok(ES, 432000.0, assure=True)
    assert flow.orig(seg(ACK, 700100, 900000, win=1000)) == ok(ES, 432000.0)


def test_loose_pickup_tracks_liberally() -> None:
    flow = Flow(seg(ACK, 700000, 900000, win=1000), loose=True)
    flow.reply(seg(ACK, 900000, 700000, win=1000))
    # Far beyond any window: accepted (the window scale of a picked-up flow is unknown), and
    # like any failed check under liberal tracking it leaves the window data alone.
    before = flow.conn.side(ORIG)
    assert flow.orig(seg(ACK | PSH, 700000 + 5_000_000, 900000, win=1000, length=10)) == ok(
        ES, 432000.0, True
    )
    assert flow.conn.side(ORIG) == before


# --- the normal life of a connection ------------------------------------------------------------


def test_three_way_handshake_and_data() -> None:
    flow = Flow(seg(SYN, C, win=64240, wscale=7, sack_perm=True, mss=1460))
    assert flow.first == ok(SS, 120.0)
    synack = seg(SYN | ACK, S, C + 1, win=65160, wscale=7, sack_perm=True, mss=1460)
    assert flow.reply(synack) == ok(SR, 60.0)
    assert flow.reply(synack) == ignored("tcp: reply SYN-ACK ignored in state SYN_RECV")
    assert flow.orig(seg(ACK, C + 1, S + 1, win=502)) == ok(ES, 432000.0, assure=True)
    # Data not yet acknowledged: the shorter UNACK timeout.
    assert flow.orig(seg(ACK | PSH, C + 1, S + 1, win=502, length=1000)) == ok(ES, 300.0)
    assert flow.reply(seg(ACK, S + 1, C + 1001, win=509)) == ok(ES, 432000.0)
    assert flow.conn.assured


def test_normal_close_through_every_closing_state() -> None:
    flow = established_flow()
    assert flow.orig(seg(FIN | ACK, C + 1, S + 1, win=502)) == ok(FW, 120.0)
    assert flow.reply(seg(ACK, S + 1, C + 2, win=509)) == ok(CW, 60.0)
    assert flow.reply(seg(FIN | ACK, S + 1, C + 2, win=509)) == ok(LA, 30.0)
    assert flow.orig(seg(ACK, C + 2, S + 2, win=502)) == ok(TW, 120.0)
    assert flow.orig(seg(ACK, C + 2, S + 2, win=502)) == ok(TW, 120.0)  # retransmitted last ACK


def test_syn_in_time_wait_reopens() -> None:
    flow = established_flow()
    flow.orig(seg(FIN | ACK, C + 1, S + 1, win=502))
    flow.reply(seg(FIN | ACK, S + 1, C + 2, win=509))
    assert flow.orig(seg(ACK, C + 2, S + 2, win=502)) == ok(TW, 120.0)
    new_syn = seg(SYN, C + 100000, win=64240)
    assert flow.orig(new_syn) == TcpResult(REOPEN, "tcp: SYN reopens a closed connection", None, False)
    assert flow.state == TW  # the old flow is left as it was; conntrack deletes it
    assert Flow(new_syn).first == ok(SS, 120.0)


def test_syn_from_server_in_time_wait_reopens_with_roles_switched() -> None:
    flow = established_flow()
    flow.orig(seg(FIN | ACK, C + 1, S + 1, win=502))
    flow.reply(seg(FIN | ACK, S + 1, C + 2, win=509))
    flow.orig(seg(ACK, C + 2, S + 2, win=502))
    assert flow.reply(seg(SYN, S + 100000, win=64240)).kind == REOPEN


def test_syn_in_close_after_own_rst_reopens() -> None:
    flow = established_flow()
    assert flow.orig(seg(RST | ACK, C + 1, S + 1, win=0)) == ok(CL, 10.0)
    assert flow.orig(seg(SYN, C + 7, win=64240)).kind == REOPEN


def test_syn_in_close_after_peer_rst_is_ignored_then_synack_resynchronises() -> None:
    flow = established_flow()
    assert flow.reply(seg(RST, S + 1, win=0)) == ok(CL, 10.0)
    syn = seg(SYN, C + 50000, win=29200, wscale=2)
    assert flow.orig(syn) == ignored("tcp: SYN ignored in state CLOSE")
    assert flow.state == CL
    # The server answers that SYN: both endpoints agree, conntrack gets back in sync.
    assert flow.reply(seg(SYN | ACK, S + 90000, C + 50001, win=65160, wscale=3)) == ok(SR, 60.0)
    assert flow.conn.side(ORIG)["td_end"] == C + 50001
    assert flow.conn.side(ORIG)["td_scale"] == 2
    assert flow.conn.side(REPLY)["td_scale"] == 3
    assert flow.orig(seg(ACK, C + 50001, S + 90001, win=1000)) == ok(ES, 432000.0)


def test_ignored_syn_in_established_resynchronises_on_matching_synack() -> None:
    flow = established_flow()
    assert flow.orig(seg(SYN, 777777, win=29200)) == ignored("tcp: SYN ignored in state ESTABLISHED")
    assert flow.state == ES
    # A SYN-ACK for some other SYN is just ignored.
    assert flow.reply(seg(SYN | ACK, 999, 123, win=65160)) == ignored(
        "tcp: reply SYN-ACK ignored in state ESTABLISHED"
    )
    assert flow.orig(seg(SYN, 777777, win=29200)).kind == IGNORE
    assert flow.reply(seg(SYN | ACK, 999, 777778, win=65160)) == ok(SR, 60.0)
    assert flow.orig(seg(ACK, 777778, 1000, win=29200)) == ok(ES, 432000.0)  # already assured


def test_rst_answering_an_ignored_syn_closes_without_window_check() -> None:
    flow = established_flow()
    flow.orig(seg(SYN, 777777, win=29200))
    # The server rejects the SYN; its ACK 777778 is nowhere near the tracked window.
    assert flow.reply(seg(RST | ACK, 0, 777778, win=0)) == ok(CL, 10.0)


def test_simultaneous_open() -> None:
    flow = Flow(seg(SYN, C, win=64240))
    # A SYN leaving SYN_SENT before any reply does not refresh the timeout (kernel check is on
    # the flag class and the old state only, so this holds for the reply's SYN too).
    assert flow.reply(seg(SYN, S, win=65160)) == ok(S2, None)
    assert flow.reply(seg(SYN, S, win=65160)) == ok(S2, 120.0)  # retransmitted, a reply was seen
    assert flow.orig(seg(SYN | ACK, C, S + 1, win=64240)) == ok(SR, 60.0)
    assert flow.reply(seg(SYN | ACK, S, C + 1, win=65160)) == ignored(
        "tcp: reply SYN-ACK ignored in state SYN_RECV"
    )
    assert flow.reply(seg(ACK, S + 1, C + 1, win=65160)) == ok(ES, 432000.0, assure=True)


def test_reply_ack_in_syn_recv_without_simultaneous_open_stays() -> None:
    flow = Flow(seg(SYN, C, win=64240))
    flow.reply(seg(SYN | ACK, S, C + 1, win=65160))
    assert flow.reply(seg(ACK, S + 1, C + 1, win=65160)) == ok(SR, 60.0)


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (ACK, "tcp: ACK in state SYN_SENT"),
        (FIN | ACK, "tcp: FIN in state SYN_SENT"),
        (SYN | ACK, "tcp: SYN-ACK in state SYN_SENT"),
    ],
)
def test_client_packets_invalid_before_synack(flags: int, reason: str) -> None:
    flow = Flow(seg(SYN, C, win=64240))
    assert flow.orig(seg(flags, C + 1, S + 1)) == invalid(reason)
    assert flow.state == SS


def test_invalid_flags_on_a_known_flow() -> None:
    flow = established_flow()
    assert flow.orig(seg(SYN | RST, C + 1, S + 1)) == invalid("tcp: invalid flags SYN+RST")
    assert flow.orig(seg(FIN | SYN | PSH | ACK | 0x20, C + 1, S + 1)) == invalid(
        "tcp: invalid flags FIN+SYN+PSH+ACK+URG"
    )
    assert flow.state == ES


def test_malformed_packet_on_a_known_flow() -> None:
    flow = established_flow()
    pkt = seg(ACK, C + 1, S + 1)
    pkt.malformed = "tcp: truncated header (12 bytes)"
    assert flow.orig(pkt) == invalid("tcp: truncated header (12 bytes)")


def test_reply_syn_in_established_is_invalid() -> None:
    flow = established_flow()
    assert flow.reply(seg(SYN, S + 1)) == invalid("tcp: reply SYN in state ESTABLISHED")


# --- RST ---------------------------------------------------------------------------------------------


def test_rst_before_any_reply_kills() -> None:
    flow = Flow(seg(SYN, C, win=64240))
    # "Connection refused": seen_reply is still False while this reply is processed.
    assert flow.reply(seg(RST | ACK, 0, C + 1, win=0)) == TcpResult(
        KILL, "tcp: RST before any reply, flow removed", None, False
    )


def test_client_rst_in_syn_sent_kills() -> None:
    flow = Flow(seg(SYN, C, win=64240))
    assert flow.orig(seg(RST, C + 1, win=0)).kind == KILL


def test_exact_rst_closes() -> None:
    flow = established_flow()
    flow.orig(seg(ACK | PSH, C + 1, S + 1, win=502, length=100))
    flow.reply(seg(ACK, S + 1, C + 101, win=509))
    assert flow.orig(seg(RST, C + 101, win=0)) == ok(CL, 10.0)
    assert flow.state == CL


def test_inexact_rst_in_window_keeps_state() -> None:
    flow = established_flow()
    flow.orig(seg(ACK | PSH, C + 1, S + 1, win=502, length=100))
    flow.reply(seg(ACK, S + 1, C + 101, win=509))
    # 500 bytes ahead of what the server acknowledged, inside the window: the kernel keeps
    # ESTABLISHED (expecting the peer's challenge ACK) but gives the CLOSE timeout.
    result = flow.orig(seg(RST, C + 601, win=0))
    assert result == TcpResult(ACCEPT, "tcp: inexact RST in window, ESTABLISHED kept", 10.0, False)
    assert flow.state == ES
    # The server's challenge ACK refreshes the flow; the RST moved the client's td_end, so
    # there is "unacknowledged data" until the client sends again.
    assert flow.reply(seg(ACK, S + 1, C + 101, win=509)) == ok(ES, 300.0)
    assert flow.conn.side(ORIG)["td_end"] == C + 601


def test_rst_right_after_own_data_closes() -> None:
    flow = established_flow()
    flow.orig(seg(ACK | PSH, C + 1, S + 1, win=502, length=100))
    flow.reply(seg(ACK, S + 1, C + 101, win=509))
    flow.reply(seg(ACK | PSH, S + 1, C + 101, win=509, length=19))
    # Data then RST at its end: the "RST train" (seq = last segment's end) closes.
    assert flow.reply(seg(RST, S + 20, win=0)) == ok(CL, 10.0)


def test_rst_below_acknowledged_data_is_invalid_and_survives() -> None:
    flow = established_flow()
    flow.orig(seg(ACK | PSH, C + 1, S + 1, win=502, length=100))
    flow.reply(seg(ACK, S + 1, C + 101, win=509))
    assert flow.orig(seg(RST, C + 50, win=0)) == invalid("tcp: RST outside window")
    assert flow.state == ES
    assert flow.orig(seg(ACK, C + 101, S + 1, win=502)) == ok(ES, 432000.0)


def test_rst_in_closing_states_is_not_window_checked() -> None:
    flow = established_flow()
    flow.reply(seg(FIN | ACK, S + 1, C + 1, win=509))
    assert flow.orig(seg(ACK, C + 1, S + 2, win=502)) == ok(CW, 60.0)
    # Far outside any window: the tuple may have been reused already, the kernel closes anyway.
    assert flow.reply(seg(RST, S + 50_000_000, win=0)) == ok(CL, 10.0)


def test_rst_seq_zero_before_established_skips_the_max_ack_check() -> None:
    flow = Flow(seg(SYN, C, win=64240))
    flow.reply(seg(SYN | ACK, S, C + 1, win=65160))
    # Seq 0 is below what the server acknowledged (C + 1), but before ESTABLISHED+ASSURED
    # the kernel takes it as an answer to something it let through.
    assert flow.orig(seg(RST, 0, win=0)) == ok(CL, 10.0)


# --- LAST_ACK challenge ACK (RFC 5961) ---------------------------------------------------------------


def test_challenge_ack_in_last_ack_does_not_count_as_last_ack() -> None:
    flow = established_flow()
    flow.orig(seg(FIN | ACK, C + 1, S + 1, win=502))
    assert flow.reply(seg(FIN | ACK, S + 1, C + 2, win=509)) == ok(LA, 30.0)
    # The client reuses the port before the server got the last ACK.
    assert flow.orig(seg(SYN, C + 100000, win=64240, wscale=7)) == ignored(
        "tcp: SYN ignored in state LAST_ACK"
    )
    # The server answers with a challenge ACK: LAST_ACK stays.
    assert flow.reply(seg(ACK, S + 2, C + 2, win=509)) == ignored(
        "tcp: challenge ACK in LAST_ACK ignored (RFC 5961)"
    )
    assert flow.state == LA
    # The client resets (seq = the challenge ACK's ack), then its SYN reopens.
    assert flow.orig(seg(RST, C + 2, win=0)) == ok(CL, 10.0)
    assert flow.orig(seg(SYN, C + 100000, win=64240, wscale=7)).kind == REOPEN


def test_ack_in_last_ack_without_ignored_syn_is_the_last_ack() -> None:
    flow = established_flow()
    flow.reply(seg(FIN | ACK, S + 1, C + 1, win=509))
    flow.orig(seg(FIN | ACK, C + 1, S + 2, win=502))
    assert flow.reply(seg(ACK, S + 2, C + 2, win=509)) == ok(TW, 120.0)


# --- timeouts ------------------------------------------------------------------------------------------


def test_tcp_timeouts_are_the_kernel_defaults() -> None:
    assert tcp_timeouts() == {
        "SYN_SENT": 120.0,
        "SYN_RECV": 60.0,
        "ESTABLISHED": 432000.0,
        "FIN_WAIT": 120.0,
        "CLOSE_WAIT": 60.0,
        "LAST_ACK": 30.0,
        "TIME_WAIT": 120.0,
        "CLOSE": 10.0,
        "SYN_SENT2": 120.0,
        "RETRANS": 300.0,
        "UNACK": 300.0,
    }


def test_syn_retransmissions_do_not_refresh_before_a_reply() -> None:
    flow = Flow(seg(SYN, C, win=64240))
    for _ in range(5):
        assert flow.orig(seg(SYN, C, win=64240)) == ok(SS, None)


DISTINCT = TcpTimeouts({"RETRANS": 200, "UNACK": 250})


def test_timeout_choice_retransmissions_then_unack() -> None:
    flow = established_flow(DISTINCT)
    data = seg(ACK | PSH, C + 1, S + 1, win=502, length=1000)
    assert flow.orig(data) == ok(ES, 250.0)  # unacknowledged
    assert flow.orig(data) == ok(ES, 250.0)  # retransmission 1
    assert flow.orig(data) == ok(ES, 250.0)  # 2
    assert flow.orig(data) == ok(ES, 200.0)  # 3: RETRANS wins over UNACK
    assert flow.orig(data) == ok(ES, 200.0)
    assert flow.reply(seg(ACK, S + 1, C + 1001, win=509)) == ok(ES, 432000.0)


def test_timeout_retrans_only_if_shorter() -> None:
    flow = established_flow(DISTINCT)
    flow.orig(seg(FIN | ACK, C + 1, S + 1, win=502))
    flow.reply(seg(FIN | ACK, S + 1, C + 2, win=509))
    assert flow.state == LA
    fin = seg(FIN | ACK, S + 1, C + 2, win=509)
    for _ in range(4):
        assert flow.reply(fin) == ok(LA, 30.0)
    ack = seg(ACK, C + 2, S + 1, win=502)  # the client still acking only the data, not the FIN
    for _ in range(4):
        assert flow.orig(ack) == ok(TW, 120.0)


def test_timeout_zero_window_uses_retrans() -> None:
    flow = established_flow(DISTINCT)
    assert flow.reply(seg(ACK, S + 1, C + 1, win=0)) == ok(ES, 200.0)
    assert flow.reply(seg(ACK, S + 1, C + 1, win=10)) == ok(ES, 432000.0)


def test_timeout_rst_gives_close_even_with_unacked_data() -> None:
    flow = established_flow(DISTINCT)
    flow.orig(seg(ACK | PSH, C + 1, S + 1, win=502, length=1000))
    assert flow.orig(seg(RST | ACK, C + 1001, S + 1, win=0)) == ok(CL, 10.0)


def test_timeout_unack_applies_only_when_shorter() -> None:
    flow = established_flow()
    # FIN counts one byte, unacknowledged: FIN_WAIT's 120 s is shorter than UNACK's 300 s.
    assert flow.orig(seg(FIN | ACK, C + 1, S + 1, win=502)) == ok(FW, 120.0)


def test_custom_timeouts_per_state() -> None:
    flow = established_flow(TcpTimeouts({"ESTABLISHED": 7200, "SYN_RECV": 30}))
    assert flow.reply(seg(ACK, S + 1, C + 1, win=509)) == ok(ES, 7200.0)
    fresh = Flow(seg(SYN, C, win=64240), timeouts=TcpTimeouts({"SYN_SENT": 20, "SYN_RECV": 30}))
    assert fresh.first == ok(SS, 20.0)
    assert fresh.reply(seg(SYN | ACK, S, C + 1, win=65160)) == ok(SR, 30.0)


def test_out_of_window_fin_from_both_sides_shortens_assured_flow() -> None:
    flow = established_flow()
    far = 5_000_000
    assert flow.orig(seg(FIN | ACK, C + far, S + 1, win=502)) == invalid(SEQ_OVER_UPPER_BOUND.reason)
    assert flow.orig(seg(FIN | ACK, C + far, S + 1, win=502)) == invalid(SEQ_OVER_UPPER_BOUND.reason)
    # Now the other side too: endpoints and conntrack are out of sync, cap the lifetime.
    assert flow.reply(seg(FIN | ACK, S + far, C + 1, win=509)) == invalid(SEQ_OVER_UPPER_BOUND.reason, 300.0)
    assert flow.state == ES


def test_out_of_window_fin_on_unassured_flow_has_no_timeout() -> None:
    flow = Flow(seg(SYN, C, win=64240))
    flow.reply(seg(SYN | ACK, S, C + 1, win=65160))
    assert flow.orig(seg(FIN | ACK, C + 5_000_000, S + 1)) == invalid(SEQ_OVER_UPPER_BOUND.reason)
    assert flow.reply(seg(FIN | ACK, S + 5_000_000, C + 1)) == invalid(SEQ_OVER_UPPER_BOUND.reason)


# --- kernel packetdrill cases (tools/testing/selftests/net/netfilter/packetdrill) ------------------


def test_packetdrill_conntrack_ack_loss_stall() -> None:
    # The local host is the server; the remote client sends 46 segments, all acknowledged, then
    # retransmits the first one. It must not be INVALID (the kernel ignores it: old data).
    client, server = 0, 4162510438
    flow = Flow(seg(SYN, client, win=32792, mss=1000))
    assert flow.reply(seg(SYN | ACK, server, client + 1, win=65535, mss=1460)) == ok(SR, 60.0)
    assert flow.orig(seg(ACK, client + 1, server + 1, win=65535)) == ok(ES, 432000.0, assure=True)
    seq = client + 1
    for _ in range(46):
        assert flow.orig(seg(ACK | PSH, seq, server + 1, win=257, length=1460)) == ok(ES, 300.0)
        seq += 1460
        assert flow.reply(seg(ACK, server + 1, seq, win=65535)) == ok(ES, 432000.0)
    assert seq == client + 67161
    retransmit = seg(ACK | PSH, client + 1, server + 1, win=257, length=1460)
    assert flow.orig(retransmit) == SEQ_UNDER_LOWER_BOUND
    assert SEQ_UNDER_LOWER_BOUND.kind == IGNORE
    assert flow.reply(seg(ACK, server + 1, client + 67161, win=65535)) == ok(ES, 432000.0)


def test_packetdrill_conntrack_synack_old() -> None:
    # Local client; the first SYN-ACK belongs to an old incarnation and ACKs nothing we sent.
    client = 2375731741
    syn = seg(SYN, client, win=65535, wscale=8, sack_perm=True, mss=1460)
    flow = Flow(syn)
    assert flow.first == ok(SS, 120.0)
    stale = seg(SYN | ACK, 145824453, client + 643160523, win=240, wscale=0, mss=1440)
    assert flow.reply(stale) == invalid(ACK_OVER_UPPER_BOUND.reason)
    assert flow.state == SS
    assert not flow.seen_reply
    assert flow.orig(syn) == ok(SS, None)  # retransmitted SYN, still unreplied: no refresh
    correct = seg(SYN | ACK, 145758918, client + 1, win=250, wscale=0, mss=1460)
    assert flow.reply(correct) == ok(SR, 60.0)
    data = seg(ACK | PSH, client + 1, 145758919, win=256, length=1)
    assert flow.orig(data) == ok(ES, 300.0, assure=True)
    assert flow.conn.side(ORIG)["td_scale"] == 8  # both SYNs carried the option


def test_stale_synack_with_old_ack_then_newer_synack() -> None:
    # The tcpdump in the same packetdrill file: the stale ACK number lies *behind* our ISN.
    client = 2375731741
    flow = Flow(seg(SYN, client, win=29200, wscale=7, sack_perm=True, mss=1460))
    stale = seg(SYN | ACK, 145824453, 643160523, win=65535, wscale=5, mss=8952)
    assert flow.reply(stale) == ignored("tcp: ACK is under the lower bound (possible overly delayed)")
    assert flow.state == SS
    correct = seg(SYN | ACK, 162602410, client + 1, win=65535, wscale=5, mss=8952)
    assert flow.reply(correct) == ok(SR, 60.0)  # higher SYN-ACK: this direction starts over
    assert flow.conn.side(REPLY)["td_end"] == 162602411


def test_packetdrill_conntrack_syn_challenge_ack() -> None:
    # S >, . < (challenge ACK from an old incarnation), R. >, S >, S. <, . >: nothing INVALID.
    client = 1_000_000
    syn = seg(SYN, client, win=65535, wscale=8, sack_perm=True, mss=1460)
    flow = Flow(syn)
    challenge = seg(ACK, 145824453, client + 643160523, win=240)
    assert flow.reply(challenge) == ignored("tcp: reply ACK ignored in state SYN_SENT")
    assert flow.seen_reply
    # The client resets with seq = the challenge ACK's ack: accepted (no window check).
    assert flow.orig(seg(RST, client + 643160523, win=0)) == ok(CL, 10.0)
    assert flow.orig(syn).kind == REOPEN
    again = Flow(syn)
    assert again.first == ok(SS, 120.0)
    assert again.reply(seg(SYN | ACK, 0, client + 1, win=250, wscale=0, mss=1460)) == ok(SR, 60.0)
    assert again.orig(seg(ACK, client + 1, 1, win=256)) == ok(ES, 432000.0, assure=True)


def test_syn_challenge_ack_rst_kills_when_the_ack_was_not_counted_as_reply() -> None:
    client = 1_000_000
    flow = Flow(seg(SYN, client, win=65535))
    challenge = seg(ACK, 145824453, client + 643160523, win=240)
    assert tcp_packet(flow.conn, challenge, REPLY, False).kind == IGNORE
    assert tcp_packet(flow.conn, seg(RST, client + 643160523, win=0), ORIG, False).kind == KILL


def test_packetdrill_conntrack_synack_reuse() -> None:
    # Local server. An established flow sees a new SYN from the client: the server sends a
    # challenge ACK, the client resets, its next SYN starts a new flow reaching SYN_RECV.
    client, server = 0, 0x12345678
    flow = Flow(seg(SYN, client, win=32792, wscale=7, mss=1000))
    assert flow.reply(seg(SYN | ACK, server, client + 1, win=65160, wscale=8, mss=1460)) == ok(SR, 60.0)
    assert flow.orig(seg(ACK, client + 1, server + 1, win=257)) == ok(ES, 432000.0, assure=True)
    assert flow.orig(seg(ACK | PSH, client + 1, server + 1, win=257, length=100)) == ok(ES, 300.0)
    assert flow.reply(seg(ACK, server + 1, client + 101, win=256)) == ok(ES, 432000.0)
    new_syn = seg(SYN, 2000, win=32792, wscale=7, mss=1000)
    assert flow.orig(new_syn) == ignored("tcp: SYN ignored in state ESTABLISHED")
    assert flow.reply(seg(ACK, server + 1, client + 101, win=256)) == ok(ES, 432000.0)  # challenge ACK
    assert flow.orig(seg(RST | ACK, client + 101, server + 1, win=257)) == ok(CL, 10.0)
    new_syn = seg(SYN, 2000, win=32792, wscale=0, mss=1000)
    assert flow.orig(new_syn).kind == REOPEN
    again = Flow(new_syn)
    assert again.first == ok(SS, 120.0)
    assert again.reply(seg(SYN | ACK, 0x55555555, 2001, win=65160, mss=1460)) == ok(SR, 60.0)


def _rst_invalid_prefix() -> tuple[Flow, int]:
    """Local client, remote server with ISN 1 (SYN-ACK 1:1), 3000 bytes from the server, acked."""
    client = 0x10000000
    flow = Flow(seg(SYN, client, win=65535, wscale=8, sack_perm=True, mss=1460))
    assert flow.reply(seg(SYN | ACK, 1, client + 1, win=65535, mss=1460)) == ok(SR, 60.0)
    assert flow.orig(seg(ACK, client + 1, 1, win=65535)) == ok(ES, 432000.0, assure=True)
    for start in (1, 1001, 2001):
        assert flow.reply(seg(ACK, start, client + 1, win=65535, length=1000)) == ok(ES, 300.0)
    assert flow.orig(seg(ACK, client + 1, 1001, win=65535)) == ok(ES, 300.0)
    assert flow.orig(seg(ACK, client + 1, 2001, win=65535)) == ok(ES, 300.0)
    assert flow.orig(seg(ACK, client + 1, 3001, win=65535)) == ok(ES, 432000.0)
    return flow, client


def test_packetdrill_conntrack_rst_invalid() -> None:
    flow, client = _rst_invalid_prefix()
    invalid_count = 0
    for rst in (seg(RST, 0, win=0), seg(RST, 1000000, win=0), seg(RST, 42, win=0)):
        result = flow.reply(rst)
        assert result.kind == INVALID
        invalid_count += 1
        assert flow.state == ES
    assert flow.orig(seg(ACK | PSH, client + 1, 3001, win=65535, length=1000)) == ok(ES, 300.0)
    assert flow.reply(seg(ACK, 3001, client + 1001, win=65535)) == ok(ES, 432000.0)
    assert flow.reply(seg(RST | ACK, 3000, client + 1001, win=0)) == invalid("tcp: RST outside window")
    invalid_count += 1
    assert flow.state == ES
    assert flow.reply(seg(RST | ACK, 3001, client + 1001, win=0)) == ok(CL, 10.0)  # exact
    assert invalid_count == 4


def test_packetdrill_conntrack_rst_invalid_reasons() -> None:
    flow, _client = _rst_invalid_prefix()
    assert flow.reply(seg(RST, 0, win=0)) == invalid("tcp: RST outside window")  # below the max ACK
    assert flow.reply(seg(RST, 1000000, win=0)) == invalid(SEQ_OVER_UPPER_BOUND.reason)  # way ahead
    assert flow.reply(seg(RST, 42, win=0)) == invalid("tcp: RST outside window")


def test_packetdrill_conntrack_inexact_rst() -> None:
    flow, client = _rst_invalid_prefix()
    assert flow.orig(seg(ACK | PSH, client + 1, 3001, win=65535, length=1000)) == ok(ES, 300.0)
    assert flow.reply(seg(FIN | ACK, 3001, client + 1001, win=65535)) == ok(FW, 120.0)
    assert flow.orig(seg(ACK, client + 1001, 3002, win=65535)) == ok(CW, 60.0)
    assert flow.orig(seg(RST | ACK, client + 1001, 3002, win=65535)) == ok(CL, 10.0)
    # Spurious RST from the peer, below what the client acknowledged: the flow is closing
    # already, so it is not checked (not INVALID).
    assert flow.reply(seg(RST, 2001, win=0)) == ok(CL, 10.0)


# --- footprint and per-packet cost -------------------------------------------------------------------


def test_conn_is_compact() -> None:
    conn = established_flow().conn
    assert not hasattr(conn, "__dict__")
    assert sys.getsizeof(conn) + sys.getsizeof(conn.td) <= 256


def test_common_results_are_prebuilt() -> None:
    flow = established_flow()
    first = flow.orig(seg(ACK, C + 1, S + 1, win=502))
    second = flow.reply(seg(ACK, S + 1, C + 1, win=509))
    assert first is second
    data = flow.orig(seg(ACK | PSH, C + 1, S + 1, win=502, length=10))
    assert data is flow.orig(seg(ACK | PSH, C + 11, S + 1, win=502, length=10))


# --- robustness ------------------------------------------------------------------------------------

u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
packets = st.tuples(
    st.sampled_from([0, 1]),  # direction
    st.sampled_from([SYN, SYN | ACK, FIN | ACK, ACK, ACK | PSH, RST, RST | ACK, FIN, SYN | FIN, 0]),
    u32,  # seq
    u32,  # ack
    st.integers(min_value=0, max_value=0xFFFF),  # window
    st.integers(min_value=0, max_value=1500),  # payload
    st.integers(min_value=-1, max_value=14),  # wscale
    st.booleans(),  # seen_reply
)


@settings(max_examples=300, deadline=None)
@given(st.booleans(), u32, st.lists(packets, max_size=30))
def test_any_packet_sequence_is_tracked_without_errors(
    loose: bool, isn: int, sequence: list[tuple[int, int, int, int, int, int, int, bool]]
) -> None:
    conn = tcp_new(seg(SYN if not loose else ACK, isn, isn), loose)
    assert isinstance(conn, TcpConn)
    for direction, flags, seq, ack, win, length, wscale, seen_reply in sequence:
        before = conn.state
        result = tcp_packet(conn, seg(flags, seq, ack, win, length, wscale), direction, seen_reply)
        assert result.kind in (ACCEPT, IGNORE, INVALID, KILL, REOPEN)
        assert result.reason.startswith("tcp: ")
        if result.kind in (IGNORE, INVALID, REOPEN):
            assert conn.state == before
        assert 0 <= conn.state <= 9
