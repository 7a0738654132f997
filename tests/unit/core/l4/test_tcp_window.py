"""nfqfw.core.l4.tcp_window: sequence arithmetic and the van Rooij window checks (kernel tcp_in_window)."""

from __future__ import annotations

import pytest
from tcp_segments import seg

from nfqfw.core.l4.tcp_states import FLAG_CLASS_BY_FLAGS, IGNORE, INVALID, FlagClass, TcpResult, TcpState
from nfqfw.core.l4.tcp_window import (
    ACK_OVER_UPPER_BOUND,
    ACK_UNDER_LOWER_BOUND,
    F_BE_LIBERAL,
    F_DATA_UNACKNOWLEDGED,
    F_MAXACK_SET,
    F_SACK_PERM,
    F_WINDOW_SCALE,
    MORE_THAN_WINDOW,
    SEQ_OVER_UPPER_BOUND,
    SEQ_UNDER_LOWER_BOUND,
    TcpWindow,
    after,
    before,
    init_from_syn,
    init_picked_up,
    segment_end,
    tcp_in_window,
)
from nfqfw.core.packet import ACK, FIN, PSH, RST, SYN, Packet

ORIG, REPLY = 0, 1
C_ISN = 1000  # client initial sequence number
S_ISN = 5000  # server initial sequence number


def check(w: TcpWindow, pkt: Packet, direction: int, state: int = TcpState.ESTABLISHED) -> TcpResult | None:
    return tcp_in_window(w, pkt, direction, FLAG_CLASS_BY_FLAGS[pkt.tcp_flags], state)


def handshake(
    c_isn: int = C_ISN,
    s_isn: int = S_ISN,
    c_ws: int = -1,
    s_ws: int = -1,
    c_win: int = 64240,
    s_win: int = 65160,
    sack_perm: bool = False,
) -> TcpWindow:
    """SYN and SYN-ACK as conntrack feeds them: init from the SYN, then both through the check."""
    w = TcpWindow()
    syn = seg(SYN, c_isn, win=c_win, wscale=c_ws, sack_perm=sack_perm)
    init_from_syn(w.td, syn)
    assert check(w, syn, ORIG, TcpState.NONE) is None
    synack = seg(SYN | ACK, s_isn, c_isn + 1, win=s_win, wscale=s_ws, sack_perm=sack_perm)
    assert check(w, synack, REPLY, TcpState.SYN_SENT) is None
    return w


def established(c_win: int = 502, **handshake_args: int) -> TcpWindow:
    """After the third ACK (window c_win)."""
    w = handshake(**handshake_args)
    assert check(w, seg(ACK, C_ISN + 1, S_ISN + 1, win=c_win), ORIG, TcpState.SYN_RECV) is None
    return w


# --- sequence arithmetic -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "is_before", "is_after"),
    [
        (1, 2, True, False),
        (2, 1, False, True),
        (7, 7, False, False),
        (0xFFFFFFF0, 5, True, False),  # wraps: 5 comes after 0xFFFFFFF0
        (5, 0xFFFFFFF0, False, True),
        (0, 0x7FFFFFFF, True, False),
        (0, 0x80000000, True, True),  # exactly half the space apart: (s32) says both, as the kernel
        (-1, 0, True, False),  # unmasked arguments are reduced modulo 2**32
    ],
)
def test_before_after(a: int, b: int, is_before: bool, is_after: bool) -> None:
    assert before(a, b) is is_before
    assert after(a, b) is is_after


@pytest.mark.parametrize(
    ("flags", "seq", "length", "end"),
    [
        (SYN, 1000, 0, 1001),
        (SYN | ACK, 1000, 0, 1001),
        (ACK, 1000, 0, 1000),
        (ACK | PSH, 1000, 1460, 2460),
        (FIN | ACK, 1000, 0, 1001),
        (FIN | ACK, 1000, 10, 1011),
        (ACK, 0xFFFFFFFF, 2, 1),  # wraps
    ],
)
def test_segment_end(flags: int, seq: int, length: int, end: int) -> None:
    assert segment_end(seg(flags, seq, length=length)) == end


# --- initialisation and window scaling ----------------------------------------------------------


def test_syn_initialises_original_direction() -> None:
    w = TcpWindow()
    init_from_syn(w.td, seg(SYN, C_ISN, win=64240, wscale=7, sack_perm=True))
    assert w.side(ORIG) == {
        "td_end": 1001,
        "td_maxend": 1001,
        "td_maxwin": 64240,
        "td_maxack": 0,
        "td_scale": 7,
        "flags": F_WINDOW_SCALE | F_SACK_PERM,
    }
    assert w.side(REPLY) == dict.fromkeys(w.side(REPLY), 0)


def test_syn_with_zero_window_counts_one() -> None:
    w = TcpWindow()
    init_from_syn(w.td, seg(SYN, C_ISN, win=0))
    assert w.side(ORIG)["td_maxwin"] == 1


def test_both_syns_with_wscale_7_scale_later_windows() -> None:
    w = handshake(c_ws=7, s_ws=7, c_win=64240, s_win=65160)
    # The SYN-ACK's window is not scaled: the client may send up to ack + 65160.
    assert w.side(ORIG)["td_maxend"] == 1001 + 65160
    assert w.side(REPLY)["td_maxend"] == 5001
    assert (w.side(ORIG)["td_scale"], w.side(REPLY)["td_scale"]) == (7, 7)
    # The third ACK's window 502 is scaled: 502 << 7 = 64256.
    assert check(w, seg(ACK, 1001, 5001, win=502), ORIG, TcpState.SYN_RECV) is None
    assert w.side(REPLY)["td_maxend"] == 5001 + 64256
    assert w.side(ORIG)["td_maxwin"] == 64256
    # So the server may send 60000 bytes ahead, not just 502.
    assert check(w, seg(ACK | PSH, 5001 + 60000, 1001, win=509, length=100), REPLY) is None
    assert (
        check(w, seg(ACK | PSH, 5001 + 64256 + 65000, 1001, win=509, length=1), REPLY) == SEQ_OVER_UPPER_BOUND
    )


@pytest.mark.parametrize(("c_ws", "s_ws"), [(7, -1), (-1, 8)])
def test_window_scale_only_on_one_side_means_no_scaling(c_ws: int, s_ws: int) -> None:
    w = handshake(c_ws=c_ws, s_ws=s_ws)
    assert (w.side(ORIG)["td_scale"], w.side(REPLY)["td_scale"]) == (0, 0)
    assert check(w, seg(ACK, 1001, 5001, win=502), ORIG, TcpState.SYN_RECV) is None
    assert w.side(REPLY)["td_maxend"] == 5001 + 502  # raw, not shifted
    assert check(w, seg(ACK | PSH, 5001 + 60000, 1001, win=509, length=100), REPLY) == MORE_THAN_WINDOW


def test_window_scale_capped_at_14() -> None:
    w = handshake(c_ws=20, s_ws=14)
    assert (w.side(ORIG)["td_scale"], w.side(REPLY)["td_scale"]) == (14, 14)


def test_reply_seen_first_mid_stream_takes_packet_data() -> None:
    # A flow picked up from an ORIGINAL ACK; the first REPLY packet initialises its side.
    w = TcpWindow()
    first = seg(ACK, 70000, 90000, win=1000, length=10)
    init_picked_up(w.td, first)
    assert w.side(ORIG) == {
        "td_end": 70010,
        "td_maxend": 71010,
        "td_maxwin": 1000,
        "td_maxack": 0,
        "td_scale": 0,
        "flags": F_SACK_PERM | F_BE_LIBERAL,
    }
    assert check(w, first, ORIG) is None  # liberal: III fails (reply td_end 0) but passes
    reply = seg(ACK, 90000, 70010, win=2000, length=5)
    assert check(w, reply, REPLY) is None
    assert w.side(REPLY)["td_end"] == 90005
    assert w.side(REPLY)["td_maxend"] == 92005  # end + window at first sight
    assert w.side(ORIG)["td_maxend"] == 72010  # ack + window


# --- the four checks ------------------------------------------------------------------------------


def test_data_in_window_accepted_and_tracked() -> None:
    w = established()
    assert check(w, seg(ACK | PSH, 1001, 5001, win=502, length=1000), ORIG) is None
    orig = w.side(ORIG)
    assert orig["td_end"] == 2001
    assert orig["flags"] & F_DATA_UNACKNOWLEDGED
    # The server acknowledges everything: unacknowledged flag cleared.
    assert check(w, seg(ACK, 5001, 2001, win=509), REPLY) is None
    assert not w.side(ORIG)["flags"] & F_DATA_UNACKNOWLEDGED
    assert w.side(REPLY)["td_maxack"] == 2001
    assert w.side(REPLY)["flags"] & F_MAXACK_SET


def test_I_seq_over_upper_bound_invalid_and_state_untouched() -> None:
    w = established()
    limit = w.side(ORIG)["td_maxend"]  # set by the SYN-ACK: ack + window
    assert limit == 1001 + 65160
    before_state = (w.side(ORIG), w.side(REPLY))
    result = check(w, seg(ACK | PSH, limit + 70000, 5001, length=100), ORIG)
    assert result == SEQ_OVER_UPPER_BOUND
    assert result.kind == INVALID
    assert result.reason == "tcp: SEQ is over the upper bound (over the window of the receiver)"
    assert (w.side(ORIG), w.side(REPLY)) == before_state


def test_I_small_overshoot_ignored_but_tracked() -> None:
    w = established()
    limit = w.side(ORIG)["td_maxend"]
    result = check(w, seg(ACK | PSH, limit + 1, 5001, length=100), ORIG)
    assert result == MORE_THAN_WINDOW
    assert result.kind == IGNORE
    # td_end moved so that the server's ACK for these bytes passes III.
    assert w.side(ORIG)["td_end"] == limit + 101
    assert w.side(ORIG)["flags"] & F_DATA_UNACKNOWLEDGED
    assert check(w, seg(ACK, 5001, limit + 101, win=509), REPLY) is None


def test_I_seq_exactly_at_upper_bound_accepted() -> None:
    w = established()
    limit = w.side(ORIG)["td_maxend"]
    assert check(w, seg(ACK, limit, 5001, win=502), ORIG) is None


def test_III_ack_for_data_never_sent_invalid() -> None:
    w = established()
    result = check(w, seg(ACK, 5001, 1001 + 1, win=509), REPLY)  # client sent nothing after its SYN
    assert result == ACK_OVER_UPPER_BOUND
    assert result.reason == "tcp: ACK is over the upper bound (ACKed data not seen yet)"
    assert check(w, seg(ACK, 5001, 1001, win=509), REPLY) is None


def test_II_retransmission_of_acked_data_ignored() -> None:
    w = established(c_win=65535)
    # 70 segments of 1000 bytes, each acknowledged by the server with window 65535.
    seq = 1001
    for _ in range(70):
        assert check(w, seg(ACK | PSH, seq, 5001, win=65535, length=1000), ORIG) is None
        seq += 1000
        assert check(w, seg(ACK, 5001, seq, win=65535), REPLY) is None
    assert w.side(REPLY)["td_maxwin"] == 65535
    # Bytes 1001..2001 again: end 2001 is below td_end (71001) - receiver td_maxwin (65535).
    result = check(w, seg(ACK | PSH, 1001, 5001, win=65535, length=1000), ORIG)
    assert result == SEQ_UNDER_LOWER_BOUND
    assert result.kind == IGNORE
    # A retransmission still inside the receiver window passes.
    assert check(w, seg(ACK | PSH, 70001 - 60000, 5001, win=65535, length=1000), ORIG) is None


def test_IV_overly_delayed_ack_ignored() -> None:
    w = established(c_win=65535)
    seq = 1001
    for _ in range(80):  # 80 KB from the client, acknowledged
        assert check(w, seg(ACK | PSH, seq, 5001, win=65535, length=1000), ORIG) is None
        seq += 1000
        assert check(w, seg(ACK, 5001, seq, win=65535), REPLY) is None
    # The server's td_maxwin is 65535 < 66000: MAXACKWINDOW is 66000.
    old_ack = seq - 66001
    result = check(w, seg(ACK, 5001, old_ack, win=65535), REPLY)
    assert result == ACK_UNDER_LOWER_BOUND
    assert result.reason == "tcp: ACK is under the lower bound (possible overly delayed)"
    assert check(w, seg(ACK, 5001, old_ack + 1, win=65535), REPLY) is None


def test_maxackwindow_grows_with_a_large_scaled_window() -> None:
    w = established(c_win=65535, s_win=4096, c_ws=7, s_ws=7)
    # Server window 4096 << 7 = 524288: MAXACKWINDOW(server) = its td_maxwin.
    assert check(w, seg(ACK, 5001, 1001, win=4096), REPLY) is None
    assert w.side(REPLY)["td_maxwin"] == 524288
    seq = 1001
    for _ in range(200):  # 200 KB from the client
        assert check(w, seg(ACK | PSH, seq, 5001, win=4096, length=1000), ORIG) is None
        seq += 1000
        assert check(w, seg(ACK, 5001, seq, win=4096), REPLY) is None
    assert check(w, seg(ACK, 5001, seq - 150000, win=4096), REPLY) is None  # > 66000 back, < maxwin


def test_sack_blocks_extend_the_ack() -> None:
    w = established(s_win=1000, sack_perm=True)
    assert w.side(ORIG)["td_maxend"] == 2001
    # 3000 bytes from 1001: the start is in the window, the end grows the server's td_maxwin.
    assert check(w, seg(ACK | PSH, 1001, 5001, win=502, length=3000), ORIG) is None
    assert w.side(REPLY)["td_maxwin"] == 3000
    # The server acks 1001 and SACKs 2001..4001: the right edge counts for III and the window.
    assert check(w, seg(ACK, 5001, 1001, win=1000, sack=((2001, 4001),)), REPLY) is None
    assert w.side(REPLY)["td_maxwin"] == 1000 + (4001 - 1001)
    assert w.side(ORIG)["td_maxend"] == 4001 + 1000
    # A SACK block beyond anything sent acknowledges unseen data.
    assert check(w, seg(ACK, 5001, 1001, win=1000, sack=((2001, 4002),)), REPLY) == ACK_OVER_UPPER_BOUND


def test_sack_blocks_ignored_without_sack_permitted() -> None:
    w = established(s_win=1000, sack_perm=False)
    assert check(w, seg(ACK | PSH, 1001, 5001, win=502, length=3000), ORIG) is None
    assert check(w, seg(ACK, 5001, 1001, win=1000, sack=((2001, 9999),)), REPLY) is None
    assert w.side(ORIG)["td_maxend"] == 2001  # ack + window only: the block was not used
    assert w.side(REPLY)["td_maxwin"] == 3000


def test_sequence_numbers_wrap() -> None:
    c_isn = 0xFFFFFF00
    w = handshake(c_isn=c_isn)
    assert check(w, seg(ACK, c_isn + 1, S_ISN + 1, win=502), ORIG, TcpState.SYN_RECV) is None
    # 1000 bytes from 0xFFFFFF01 cross zero.
    assert check(w, seg(ACK | PSH, c_isn + 1, S_ISN + 1, win=502, length=1000), ORIG) is None
    assert w.side(ORIG)["td_end"] == (c_isn + 1001) & 0xFFFFFFFF == 0x2E9
    assert check(w, seg(ACK, S_ISN + 1, 0x2E9, win=509), REPLY) is None
    assert check(w, seg(ACK, S_ISN + 1, 0x2EA, win=509), REPLY) == ACK_OVER_UPPER_BOUND


def test_zero_window_never_shrinks_maxend() -> None:
    w = established()
    assert check(w, seg(ACK, 5001, 1001, win=0), REPLY) is None
    assert w.side(ORIG)["td_maxend"] == 1001 + 65160


def test_zero_window_leaves_room_for_a_one_byte_probe() -> None:
    w = established(s_win=10)
    assert w.side(ORIG)["td_maxend"] == 1011
    assert check(w, seg(ACK | PSH, 1001, 5001, win=502, length=10), ORIG) is None
    assert check(w, seg(ACK, 5001, 1011, win=0), REPLY) is None
    assert w.side(ORIG)["td_maxend"] == 1011 + 1


# --- retransmissions, RST details, re-initialisation ---------------------------------------------


def test_identical_acks_count_as_retransmissions() -> None:
    w = established()
    data = seg(ACK | PSH, 1001, 5001, win=502, length=100)
    assert check(w, data, ORIG) is None
    assert w.retrans == 0
    for expected in (1, 2, 3, 4):
        assert check(w, data, ORIG) is None
        assert w.retrans == expected
    assert check(w, seg(ACK, 5001, 1101, win=509), REPLY) is None  # anything else resets
    assert w.retrans == 0
    assert w.last_dir == REPLY


def test_retransmission_needs_the_same_raw_window() -> None:
    w = established()
    assert check(w, seg(ACK | PSH, 1001, 5001, win=502, length=100), ORIG) is None
    assert check(w, seg(ACK | PSH, 1001, 5001, win=501, length=100), ORIG) is None
    assert w.retrans == 0


def test_rst_with_seq_zero_answering_syn() -> None:
    w = TcpWindow()
    syn = seg(SYN, C_ISN, win=64240)
    init_from_syn(w.td, syn)
    assert check(w, syn, ORIG, TcpState.NONE) is None
    # "Connection refused": RST+ACK seq 0 ack isn+1, the server's side never seen before.
    assert check(w, seg(RST | ACK, 0, C_ISN + 1, win=0), REPLY, TcpState.SYN_SENT) is None
    assert w.side(REPLY)["td_end"] == 0


def test_rst_ack_with_zero_ack_treated_as_acking_everything() -> None:
    w = established()
    assert check(w, seg(RST | ACK, 5001, 0, win=0), REPLY) is None


def test_higher_syn_in_syn_sent_reinitialises() -> None:
    w = TcpWindow()
    syn = seg(SYN, C_ISN, win=64240, wscale=7)
    init_from_syn(w.td, syn)
    assert check(w, syn, ORIG, TcpState.NONE) is None
    newer = seg(SYN, C_ISN + 100000, win=29200, wscale=2)
    assert check(w, newer, ORIG, TcpState.SYN_SENT) is None
    assert w.side(ORIG) == {
        "td_end": C_ISN + 100001,
        "td_maxend": C_ISN + 100001,
        "td_maxwin": 29200,
        "td_maxack": 0,
        "td_scale": 2,
        "flags": F_WINDOW_SCALE,
    }


def test_liberal_tracking_accepts_failed_checks() -> None:
    w = TcpWindow()
    first = seg(ACK, 70000, 90000, win=1000)
    init_picked_up(w.td, first)
    assert check(w, first, ORIG) is None
    assert check(w, seg(ACK, 90000, 70000, win=1000), REPLY) is None
    assert check(w, seg(ACK | PSH, 70000 + 500000, 90000, win=1000, length=10), ORIG) is None


def test_flag_class_index_is_what_counts_retransmissions() -> None:
    w = established()
    fin = seg(FIN | ACK, 1001, 5001, win=502)
    assert tcp_in_window(w, fin, ORIG, FlagClass.FIN, TcpState.ESTABLISHED) is None
    assert tcp_in_window(w, fin, ORIG, FlagClass.FIN, TcpState.FIN_WAIT) is None
    assert w.retrans == 0
