"""Per-flow TCP connection tracking: the kernel's `tcp_new()` and `nf_conntrack_tcp_packet()`.

A packet's next state comes from the table in `tcp_states` (`TRANSITIONS[direction][flag
class][state]`). A few target states carry kernel special cases; they are hooks looked up by
target state in `_HOOKS` below, each mirroring one `case` of the kernel's switch. Then the
window check (`tcp_window.tcp_in_window`), then the state update and the timeout choice.

The TCP tracker (`l4.tcp`) calls `tcp_new()` for the first packet of a flow and `tcp_packet()`
for every packet including that first one, as the kernel does. It owns expiry, ASSURED and
SEEN_REPLY; `seen_reply` must say whether a REPLY-direction packet was accepted *before* this
one (the kernel sets IPS_SEEN_REPLY after the TCP tracker has run). The fast path
(core.fastpath) mirrors `tcp_packet` for an ACK-class segment in a steady state.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from nfqfw.core.l4.tcp_states import (
    ACCEPT,
    DEFAULT_TIMEOUTS,
    FLAG_CLASS_BY_FLAGS,
    IGNORE,
    IGNORED_BY_CELL,
    INVALID,
    INVALID_BY_CELL,
    INVALID_FLAGS_RESULT,
    KERNEL_TIMEOUTS,
    KILL,
    MAX_RETRANS,
    REOPEN,
    STATE_COUNT,
    STATE_NAMES,
    T_CLOSE,
    T_KEEP,
    T_RETRANS,
    T_STATE,
    T_UNACK,
    TRANSITIONS,
    FlagClass,
    TcpResult,
    TcpState,
    TcpTimeouts,
    flag_class,
    invalid_flags_reason,
    sCL,
    sCW,
    sES,
    sFW,
    sLA,
    sNO,
    sS2,
    sSR,
    sSS,
    sTW,
)
from nfqfw.core.l4.tcp_window import (
    END,
    F_BE_LIBERAL,
    F_CLOSE_INIT,
    F_DATA_UNACKNOWLEDGED,
    F_MAXACK_SET,
    F_SACK_PERM,
    F_WINDOW_SCALE,
    FLAGS,
    LAST_ACK,
    LAST_END,
    LAST_SEQ,
    LAST_WIN,
    MAX_WSCALE,
    MAXACK,
    MAXEND,
    MAXWIN,
    SCALE,
    SIDE,
    TcpWindow,
    before,
    init_from_syn,
    init_picked_up,
    segment_end,
    tcp_in_window,
)
from nfqfw.core.packet import RST, Packet
from nfqfw.core.verdict import Direction

__all__ = [
    "ACCEPT",
    "IGNORE",
    "INVALID",
    "KILL",
    "REOPEN",
    "TcpConn",
    "TcpResult",
    "TcpState",
    "TcpTimeouts",
    "flag_class",
    "invalid_flags_reason",
    "steady_states",
    "tcp_new",
    "tcp_packet",
    "tcp_timeouts",
]

ORIGINAL = int(Direction.ORIGINAL)
REPLY = int(Direction.REPLY)

_SYN = int(FlagClass.SYN)
_SYNACK = int(FlagClass.SYNACK)
_FIN = int(FlagClass.FIN)
_ACK = int(FlagClass.ACK)
_RST = int(FlagClass.RST)
_NONE = int(FlagClass.NONE)

# Flow-wide flags in TcpConn.last_flags (kernel ct->proto.tcp.last_flags).
EXP_CHALLENGE_ACK = 0x40  # a SYN was ignored in LAST_ACK: the peer may answer with a challenge ACK
SIMULTANEOUS_OPEN = 0x80

REOPENED = TcpResult(REOPEN, "tcp: SYN reopens a closed connection", None, False)
RST_OUTSIDE_WINDOW = TcpResult(INVALID, "tcp: RST outside window", None, False)
RST_BEFORE_REPLY = TcpResult(KILL, "tcp: RST before any reply, flow removed", None, False)
CHALLENGE_ACK_IGNORED = TcpResult(IGNORE, "tcp: challenge ACK in LAST_ACK ignored (RFC 5961)", None, False)
NO_PICKUP = "tcp: ACK without a connection (mid-stream pick-up disabled)"


class TcpConn(TcpWindow):
    """TCP state of one flow: the conntrack state, both directions' windows, the last packet."""

    __slots__ = ("assured", "last_flags", "last_index", "last_wscale", "state")

    def __init__(self) -> None:
        super().__init__()
        self.state = sNO
        self.last_index = _NONE  # flag class of the last packet that updated the flow
        self.last_flags = 0  # options of an ignored SYN, EXP_CHALLENGE_ACK, SIMULTANEOUS_OPEN
        self.last_wscale = 0  # window scale of an ignored SYN
        self.assured = False

    def __repr__(self) -> str:
        return f"<TcpConn {STATE_NAMES[self.state]} orig={self.side(0)} reply={self.side(1)}>"


def tcp_timeouts() -> dict[str, float]:
    """The kernel's default TCP timeouts in seconds, by state name plus RETRANS and UNACK."""
    return dict(DEFAULT_TIMEOUTS)


def tcp_new(pkt: Packet, loose: bool = False) -> TcpConn | str:
    """Start tracking a flow from its first packet, or say why it cannot start one.

    Strict (loose=False): only a SYN creates a flow. loose=True also picks up a mid-stream
    ACK (kernel nf_conntrack_tcp_loose): window tracking is then liberal for the whole flow.
    """
    if pkt.malformed is not None:
        return pkt.malformed
    flags = pkt.tcp_flags
    bad = INVALID_FLAGS_RESULT[flags]
    if bad is not None:
        return bad.reason
    index = FLAG_CLASS_BY_FLAGS[flags]
    first = TRANSITIONS[ORIGINAL][index][sNO]
    if first == sSS:
        conn = TcpConn()
        init_from_syn(conn.td, pkt)
        return conn
    if first != sES:
        return INVALID_BY_CELL[ORIGINAL][index][sNO].reason
    if not loose:
        return NO_PICKUP
    conn = TcpConn()
    init_picked_up(conn.td, pkt)
    return conn


# ---------------------------------------------------------------------------------------------
# Special cases, by target state. A hook returns either a final result, or the state to go on
# with plus these bits:
_SKIP_WINDOW = 0x100  # accept without the window check (an RST answering a packet we let pass)
_RESYNC = 0x200  # SYN-ACK answering an ignored SYN: continue as SYN_SENT -> SYN_RECV
_INEXACT_RST = 0x400  # in-window RST whose seq is not the expected one: the state is kept
_STATE_BITS = 0xFF

Step = TcpResult | int
Hook = Callable[[TcpConn, Packet, int, int, int, bool], Step]


def _to_syn_sent(conn: TcpConn, pkt: Packet, direction: int, index: int, old: int, seen_reply: bool) -> Step:
    if old < sTW:
        return sSS  # a new SYN, or its retransmission
    # SYN in TIME_WAIT / CLOSE (RFC 1122 reopen), or the client aborted and starts over.
    td = conn.td
    if (td[FLAGS] | td[SIDE + FLAGS]) & F_CLOSE_INIT or (
        conn.last_dir == direction and conn.last_index == _RST
    ):
        return REOPENED
    return _ignored(conn, pkt, direction, index, old, seen_reply)


def _ignored(conn: TcpConn, pkt: Packet, direction: int, index: int, old: int, seen_reply: bool) -> Step:
    """The table says ignore: we may be out of sync with the endpoints. Remember the packet."""
    td = conn.td
    if (
        index == _SYNACK
        and conn.last_index == _SYN
        and conn.last_dir != direction
        and pkt.ack == td[LAST_END]
    ):
        # This SYN-ACK answers the SYN we ignored: the endpoints agree, we resynchronise.
        _resync_from_ignored_syn(conn, direction)
        return sSR | _RESYNC
    conn.last_index = index
    conn.last_dir = direction
    td[LAST_SEQ] = pkt.seq
    td[LAST_END] = segment_end(pkt)
    td[LAST_WIN] = pkt.window
    if index == _SYN and direction == ORIGINAL:
        # Keep the SYN's options for the SYN-ACK that may follow. In LAST_ACK the peer may
        # answer with an RFC 5961 challenge ACK, which must not count as the last ACK.
        conn.last_flags = F_SACK_PERM if pkt.sack_perm else 0
        conn.last_wscale = 0
        if pkt.wscale >= 0:
            conn.last_flags |= F_WINDOW_SCALE
            conn.last_wscale = min(pkt.wscale, MAX_WSCALE)
        if old == sLA:
            conn.last_flags |= EXP_CHALLENGE_ACK
    if old == sSS and index == _ACK and direction == REPLY:
        td[LAST_ACK] = pkt.ack  # possibly a challenge ACK answering our SYN
    return IGNORED_BY_CELL[direction][index][old]


def _resync_from_ignored_syn(conn: TcpConn, direction: int) -> None:
    td = conn.td
    syn = conn.last_dir * SIDE
    td[syn + END] = td[syn + MAXEND] = td[LAST_END]
    td[syn + MAXWIN] = td[LAST_WIN] or 1
    td[syn + SCALE] = conn.last_wscale
    conn.last_flags &= ~EXP_CHALLENGE_ACK
    td[syn + FLAGS] = conn.last_flags
    # This direction starts over from the SYN-ACK itself.
    own = direction * SIDE
    td[own + END] = td[own + MAXEND] = td[own + MAXWIN] = td[own + MAXACK] = td[own + SCALE] = 0
    td[own + FLAGS] &= F_BE_LIBERAL


def _invalid(conn: TcpConn, pkt: Packet, direction: int, index: int, old: int, seen_reply: bool) -> Step:
    return INVALID_BY_CELL[direction][index][old]


def _to_time_wait(conn: TcpConn, pkt: Packet, direction: int, index: int, old: int, seen_reply: bool) -> Step:
    if (
        old == sLA
        and index == _ACK
        and conn.last_dir != direction
        and conn.last_index == _SYN
        and conn.last_flags & EXP_CHALLENGE_ACK
    ):
        # RFC 5961 challenge ACK answering a SYN we ignored: it does not ACK the last FIN.
        conn.last_flags &= ~EXP_CHALLENGE_ACK
        return CHALLENGE_ACK_IGNORED
    return sTW


def _to_syn_sent2(conn: TcpConn, pkt: Packet, direction: int, index: int, old: int, seen_reply: bool) -> Step:
    conn.last_flags |= SIMULTANEOUS_OPEN  # the table alone cannot follow a simultaneous open
    return sS2


def _to_syn_recv(conn: TcpConn, pkt: Packet, direction: int, index: int, old: int, seen_reply: bool) -> Step:
    if direction == REPLY and index == _ACK and conn.last_flags & SIMULTANEOUS_OPEN:
        return sES
    return sSR


_CLOSING = frozenset({sFW, sCW, sLA, sTW, sCL})


def _to_close(conn: TcpConn, pkt: Packet, direction: int, index: int, old: int, seen_reply: bool) -> Step:
    if index != _RST:
        return sCL
    if old in _CLOSING:
        # The tuple may be reused already and our window data outdated: no checks.
        return sCL | _SKIP_WINDOW
    td = conn.td
    step = sCL
    peer = (SIDE - direction * SIDE) + FLAGS
    if td[peer] & F_MAXACK_SET and conn.last_index != _SYN:
        seq = pkt.seq
        peer_maxack = td[SIDE - direction * SIDE + MAXACK]
        established = old == sES and conn.assured
        if seq == 0 and not established:
            return sCL  # most likely the answer to a SYN we let through
        if before(seq, peer_maxack):
            return RST_OUTSIDE_WINDOW
        if not established or seq == peer_maxack:
            return sCL
        if conn.last_index == _ACK and conn.last_dir == direction and seq == td[LAST_END]:
            return sCL  # RST right after this side's last data segment
        # In window but not where the peer expects it: keep the state, the peer will answer
        # with a challenge ACK (RFC 5961).
        step = old | _INEXACT_RST
    if (
        (seen_reply and conn.last_index == _SYN) or (not conn.assured and conn.last_index == _ACK)
    ) and pkt.ack == td[LAST_END]:
        # RST answering a SYN (or half-open ACK) we ignored: it may ACK data we never tracked.
        return step | _SKIP_WINDOW
    if old == sSS and conn.last_index == _ACK and conn.last_dir == REPLY and pkt.seq == td[LAST_ACK]:
        return step | _SKIP_WINDOW  # RST answering a challenge ACK we let through
    return step


_HOOKS: tuple[Hook | None, ...] = (
    None,  # NONE: never a target
    _to_syn_sent,  # SYN_SENT
    _to_syn_recv,  # SYN_RECV
    None,  # ESTABLISHED
    None,  # FIN_WAIT
    None,  # CLOSE_WAIT
    None,  # LAST_ACK
    _to_time_wait,  # TIME_WAIT
    _to_close,  # CLOSE
    _to_syn_sent2,  # SYN_SENT2
    _invalid,  # sIV
    _ignored,  # sIG
)


def steady_states(index: int) -> frozenset[int]:
    """The states a packet of flag class `index` keeps, in both directions, with no special
    case: read off the table, for the fast path (core.fastpath) to handle exactly those."""
    return frozenset(
        state
        for state in range(STATE_COUNT)
        if _HOOKS[state] is None and all(TRANSITIONS[d][index][state] == state for d in (ORIGINAL, REPLY))
    )


# ---------------------------------------------------------------------------------------------


def tcp_packet(
    conn: TcpConn, pkt: Packet, direction: int, seen_reply: bool, timeouts: TcpTimeouts = KERNEL_TIMEOUTS
) -> TcpResult:
    """Track one packet of a known flow (the first one too, right after tcp_new).

    direction: Direction.ORIGINAL or REPLY. seen_reply: a REPLY packet was accepted or
    ignored before this one. timeouts: TcpTimeouts built from the configuration.
    """
    if pkt.malformed is not None:
        return TcpResult(INVALID, pkt.malformed, None, False)
    flags = pkt.tcp_flags
    bad = INVALID_FLAGS_RESULT[flags]
    if bad is not None:
        return bad
    index = FLAG_CLASS_BY_FLAGS[flags]
    old = conn.state
    new = TRANSITIONS[direction][index][old]
    check_window = True
    inexact_rst = False
    hook = _HOOKS[new]
    if hook is not None:
        step = hook(conn, pkt, direction, index, old, seen_reply)
        if isinstance(step, TcpResult):
            return step
        if step & _RESYNC:
            old = sSS
        check_window = not step & _SKIP_WINDOW
        inexact_rst = bool(step & _INEXACT_RST)
        new = step & _STATE_BITS

    if check_window:
        failed = tcp_in_window(conn, pkt, direction, index, conn.state)
        if failed is not None:
            if failed.kind == INVALID:
                return _after_invalid(conn, direction, index, failed, timeouts)
            return failed

    # In window: commit.
    conn.last_index = index
    conn.last_dir = direction
    conn.state = new
    td = conn.td
    if new == sFW and old != sFW:
        td[direction * SIDE + FLAGS] |= F_CLOSE_INIT

    choice = _timeout_choice(conn, td, index, new, timeouts)
    assure = False
    if not seen_reply:
        if flags & RST:
            return RST_BEFORE_REPLY  # only a RST came back: nothing was established
        if index == _SYN and old == sSS:
            choice = T_KEEP  # a retransmitted SYN must not keep the entry alive forever
        elif new == sES and (timeouts.accepted[new][choice].timeout or 0.0) > timeouts.unack:
            choice = T_UNACK  # picked up mid-stream, nothing seen from the other side yet
    elif not conn.assured and old in (sSR, sES) and new == sES:
        conn.assured = assure = True

    result = timeouts.accepted[new][choice]
    if assure or inexact_rst:
        reason = f"tcp: inexact RST in window, {STATE_NAMES[new]} kept" if inexact_rst else result.reason
        return TcpResult(ACCEPT, reason, result.timeout, assure)
    return result


def _timeout_choice(conn: TcpConn, td: array[int], index: int, new: int, timeouts: TcpTimeouts) -> int:
    """Kernel order: many retransmissions, RST, unacknowledged data, zero window, the state's.
    (Mirrored by core.fastpath for the steady states.)"""
    own = timeouts.by_state[new]
    if conn.retrans >= MAX_RETRANS and own > timeouts.retrans:
        return T_RETRANS
    if index == _RST:
        return T_CLOSE
    if (td[FLAGS] | td[SIDE + FLAGS]) & F_DATA_UNACKNOWLEDGED and own > timeouts.unack:
        return T_UNACK
    if td[LAST_WIN] == 0 and own > timeouts.retrans:
        return T_RETRANS
    return T_STATE


def _after_invalid(
    conn: TcpConn, direction: int, index: int, result: TcpResult, timeouts: TcpTimeouts
) -> TcpResult:
    """Kernel nf_tcp_handle_invalid: out-of-window FIN/RST seen from both sides of an assured
    flow mean the endpoints and we are out of sync: let the flow expire sooner."""
    if not conn.assured or index not in (_RST, _FIN):
        return result
    if conn.last_dir != direction and conn.last_index in (_FIN, _RST):
        return TcpResult(INVALID, result.reason, timeouts.unack, False)
    conn.last_index = index
    conn.last_dir = direction
    return result
