"""TCP window tracking: the kernel's `tcp_in_window()`, after Guido van Rooij.

Per direction (the kernel's `struct ip_ct_tcp_state`) the tracker keeps

    td_end    = max(seq + len) sent                  (SYN and FIN count 1)
    td_maxend = max(ack + max(win, 1)) seen from the peer
    td_maxwin = max(max(win, 1) + (sack - ack)) sent, grown when data passes td_maxend
    td_maxack = max(ack) sent
    td_scale  = window shift, only when both SYNs carried the option (capped at 14)

and a packet from `sender` to `receiver` must satisfy

    I.   seq  <= sender.td_maxend                                  else INVALID
    II.  end  >= sender.td_end - receiver.td_maxwin                else IGNORE (old retransmission)
    III. sack <= receiver.td_end                                   else INVALID (ACKs unseen data)
    IV.  sack >= receiver.td_end - MAXACKWINDOW(sender)            else IGNORE (overly delayed ACK)

with sack the highest SACK right edge (or the ACK) and MAXACKWINDOW = max(td_maxwin, 66000).
All sequence arithmetic is modulo 2**32 (`before` / `after`). A connection the kernel's SYN
proxy opened acknowledges the server's data in the proxy's sequence space: its ORIGINAL
direction's ack and sack are first shifted back by `TcpWindow.ack_offset` (the kernel's
`nf_ct_seq_offset` in tcp_in_window; 0 for every other connection, see l4.tcp).

Storage: both directions plus the last-packet record are WORDS unsigned 32-bit words (an
`array('I')`; in the flow table, the flow's protocol words), indexed by the offsets below
(ORIGINAL at 0, REPLY at SIDE). The fast path (core.fastpath) uses the same offsets and
asserts them.
"""

from __future__ import annotations

from array import array

from nfqfw.core.l4.base import WORDS
from nfqfw.core.l4.tcp_states import IGNORE, INVALID, FlagClass, TcpResult, TcpState
from nfqfw.core.packet import ACK, FIN, RST, SYN, Packet

MASK = 0xFFFFFFFF
HALF = 0x80000000
MAX_WSCALE = 14  # RFC 7323
MAXACKWINCONST = 66000

# Word offsets within one direction's block.
END, MAXEND, MAXWIN, MAXACK, SCALE, FLAGS = range(6)
SIDE = 6  # words per direction; REPLY's block starts here
# Last packet seen (retransmission detection and the conntrack special cases).
LAST_SEQ, LAST_ACK, LAST_END, LAST_WIN = 12, 13, 14, 15
assert LAST_WIN == WORDS - 1  # the layout fills the flow's protocol words (l4.base.WORDS)

# Per-direction flags (kernel IP_CT_TCP_FLAG_*), kept in the FLAGS word.
F_WINDOW_SCALE = 0x01
F_SACK_PERM = 0x02
F_CLOSE_INIT = 0x04  # this direction sent the first FIN
F_BE_LIBERAL = 0x08  # window failures are accepted (flows picked up mid-stream)
F_DATA_UNACKNOWLEDGED = 0x10
F_MAXACK_SET = 0x20

_ZERO_WORDS = array("I", bytes(4 * WORDS))
_ACK_CLASS = int(FlagClass.ACK)
_SYN_SENT = int(TcpState.SYN_SENT)
_SYN_RECV = int(TcpState.SYN_RECV)

SEQ_OVER_UPPER_BOUND = TcpResult(
    INVALID, "tcp: SEQ is over the upper bound (over the window of the receiver)", None, False
)
MORE_THAN_WINDOW = TcpResult(
    IGNORE, "tcp: more bytes than the receiver window allows (ignored, tracked)", None, False
)
ACK_OVER_UPPER_BOUND = TcpResult(
    INVALID, "tcp: ACK is over the upper bound (ACKed data not seen yet)", None, False
)
SEQ_UNDER_LOWER_BOUND = TcpResult(
    IGNORE, "tcp: SEQ is under the lower bound (already ACKed data retransmitted)", None, False
)
ACK_UNDER_LOWER_BOUND = TcpResult(
    IGNORE, "tcp: ACK is under the lower bound (possible overly delayed)", None, False
)


def before(a: int, b: int) -> bool:
    """a < b in sequence space: (s32)(a - b) < 0."""
    return (a - b) & MASK >= HALF


def after(a: int, b: int) -> bool:
    """a > b in sequence space."""
    return (b - a) & MASK >= HALF


def segment_end(pkt: Packet) -> int:
    """seq + payload length, SYN and FIN counting one each (kernel segment_seq_plus_len)."""
    flags = pkt.tcp_flags
    return (pkt.seq + pkt.payload_len + ((flags >> 1) & 1) + (flags & FIN)) & MASK


class TcpWindow:
    """Window data of both directions and the last-packet record of one TCP flow."""

    __slots__ = ("ack_offset", "last_dir", "retrans", "td")

    def __init__(self) -> None:
        self.td: array[int] = _ZERO_WORDS[:]
        self.last_dir = 0
        self.retrans = 0  # identical ACK-class packets in a row (saturates at 255)
        # The REPLY direction's sequence offset (kernel seqadj, set by the SYN proxy): taken off
        # the acknowledgements of ORIGINAL packets. Not stored with the flow: l4.tcp sets it.
        self.ack_offset = 0

    def side(self, direction: int) -> dict[str, int]:
        """One direction's data by name (debugging and tests; not for the hot path)."""
        base = direction * SIDE
        td = self.td
        names = ("td_end", "td_maxend", "td_maxwin", "td_maxack", "td_scale", "flags")
        return {name: td[base + i] for i, name in enumerate(names)}


def _has_options(pkt: Packet) -> bool:
    # The kernel leaves td_scale and the flags alone when the header carries no options at
    # all; the decoded record tells us only about the options it understood.
    return bool(pkt.mss or pkt.wscale >= 0 or pkt.sack_perm or pkt.ts is not None or pkt.sack)


def apply_options(td: array[int], base: int, pkt: Packet) -> None:
    """Record a SYN's window scale and SACK-permitted options (kernel tcp_options)."""
    if not _has_options(pkt):
        return
    flags = td[base + FLAGS] & F_BE_LIBERAL
    scale = 0
    if pkt.sack_perm:
        flags |= F_SACK_PERM
    if pkt.wscale >= 0:
        scale = min(pkt.wscale, MAX_WSCALE)
        flags |= F_WINDOW_SCALE
    td[base + SCALE] = scale
    td[base + FLAGS] = flags


def init_sender(td: array[int], s: int, r: int, pkt: Packet, end: int, direction: int) -> None:
    """Start tracking a direction from its SYN or SYN-ACK (kernel tcp_init_sender)."""
    td[s + END] = td[s + MAXEND] = end
    td[s + MAXWIN] = pkt.window or 1
    apply_options(td, s, pkt)
    # RFC 7323: window scaling only if both sides sent the option.
    if direction and not (td[s + FLAGS] & td[r + FLAGS] & F_WINDOW_SCALE):
        td[s + SCALE] = td[r + SCALE] = 0


def init_from_syn(td: array[int], pkt: Packet) -> None:
    """A new flow from its first SYN: the ORIGINAL direction's data (kernel tcp_new)."""
    td[END] = td[MAXEND] = segment_end(pkt)
    td[MAXWIN] = pkt.window or 1
    apply_options(td, 0, pkt)


def init_picked_up(td: array[int], pkt: Packet) -> None:
    """A new flow from a mid-stream packet: use what it shows, track liberally (kernel tcp_new)."""
    end = segment_end(pkt)
    maxwin = pkt.window or 1
    td[END] = end
    td[MAXWIN] = maxwin
    td[MAXEND] = (end + maxwin) & MASK
    # Window scale is unknown: assume SACK, and accept window failures in both directions.
    td[FLAGS] = td[SIDE + FLAGS] = F_SACK_PERM | F_BE_LIBERAL


def _failed(td: array[int], s: int, result: TcpResult) -> TcpResult | None:
    """A failed check: its result, unless the sender is tracked liberally (then accept)."""
    return None if td[s + FLAGS] & F_BE_LIBERAL else result


def tcp_in_window(w: TcpWindow, pkt: Packet, direction: int, index: int, state: int) -> TcpResult | None:
    """Check a packet against the windows and update them. None: in window (accept);
    otherwise the IGNORE or INVALID result. `index` is the packet's flag class, `state` the
    flow's state before this packet. (core.fastpath mirrors this for ACK-class segments
    without SACK: keep the two in step.)"""
    td = w.td
    s = direction * SIDE  # sender's block
    r = SIDE - s  # receiver's block
    flags = pkt.tcp_flags
    seq = pkt.seq
    ack = sack = pkt.ack
    win_raw = win = pkt.window
    end = (seq + pkt.payload_len + ((flags >> 1) & 1) + (flags & FIN)) & MASK

    if pkt.sack and td[r + FLAGS] & F_SACK_PERM:
        for _left, right in pkt.sack:
            if after(right, sack):
                sack = right
    offset = w.ack_offset
    if offset and not direction:
        # The client acknowledges the server's data in the SYN proxy's space (nf_ct_seq_offset).
        ack = (ack - offset) & MASK
        sack = (sack - offset) & MASK

    if td[s + MAXWIN] == 0:
        if flags & SYN:
            # SYN-ACK answering the SYN, or a SYN from the reply side (simultaneous open).
            init_sender(td, s, r, pkt, end, direction)
            if not flags & ACK:
                return None  # simultaneous open
        else:
            # First packet of this direction mid-stream: its history is lost to us.
            td[s + END] = end
            maxwin = (win << td[s + SCALE]) or 1
            td[s + MAXWIN] = maxwin
            td[s + MAXEND] = (end + maxwin) & MASK
            if td[r + MAXWIN] == 0:
                # Nothing seen from the other side either: make III and IV pass until then.
                td[r + END] = td[r + MAXEND] = sack
            elif sack == (td[r + END] + 1) & MASK:
                td[r + END] = sack  # likely the answer to a keepalive (needed for III)
    elif flags & SYN and after(end, td[s + END]) and state in (_SYN_SENT, _SYN_RECV):
        # RFC 793: a reinitialised TCP may reuse the tuple with higher sequence numbers.
        # Start this direction over, as for the first SYN(-ACK).
        init_sender(td, s, r, pkt, end, direction)
        if direction and not flags & ACK:
            return None

    if not flags & ACK:
        ack = sack = td[r + END]  # no ACK: pretend it acknowledges everything seen
    elif flags & RST and ack == 0:
        ack = sack = td[r + END]  # broken stacks set ACK with a zero ack in RSTs
    if flags & RST and seq == 0 and state == _SYN_SENT:
        seq = end = td[s + END]  # RST answering our SYN

    s_end = td[s + END]
    s_maxend = td[s + MAXEND]
    maxwin = td[s + MAXWIN]
    maxackwindow = maxwin if maxwin > MAXACKWINCONST else MAXACKWINCONST
    r_end = td[r + END]
    r_maxwin = td[r + MAXWIN]
    if not before(seq, s_maxend + 1):  # I
        overshot = (end - s_maxend + 1) & MASK
        ack_ok = after(sack, r_end - maxackwindow - 1)
        in_recv_win = r_maxwin and after(end, s_end - r_maxwin - 1)
        if in_recv_win and ack_ok and overshot <= r_maxwin and before(sack, r_end + 1):
            # A TCP sending a little more than the window allows: let the data be tracked
            # so that the peer's ACK for it passes III later.
            td[s + END] = end
            td[s + FLAGS] |= F_DATA_UNACKNOWLEDGED
            return _failed(td, s, MORE_THAN_WINDOW)
        return _failed(td, s, SEQ_OVER_UPPER_BOUND)
    if not before(sack, r_end + 1):  # III
        return _failed(td, s, ACK_OVER_UPPER_BOUND)
    if r_maxwin and not after(end, s_end - r_maxwin - 1):  # II
        return _failed(td, s, SEQ_UNDER_LOWER_BOUND)
    if not after(sack, r_end - maxackwindow - 1):  # IV
        return _failed(td, s, ACK_UNDER_LOWER_BOUND)

    if not flags & SYN:
        win <<= td[s + SCALE]  # the window in SYN and SYN-ACK is never scaled

    # Update the sender.
    swin = (win + ((sack - ack) & MASK)) & MASK
    if maxwin < swin:
        td[s + MAXWIN] = swin
    if after(end, s_end):
        td[s + END] = end
        td[s + FLAGS] |= F_DATA_UNACKNOWLEDGED
    if flags & ACK:
        if not td[s + FLAGS] & F_MAXACK_SET:
            td[s + MAXACK] = ack
            td[s + FLAGS] |= F_MAXACK_SET
        elif after(ack, td[s + MAXACK]):
            td[s + MAXACK] = ack

    # Update the receiver.
    if r_maxwin and after(end, s_maxend):
        td[r + MAXWIN] = (r_maxwin + end - s_maxend) & MASK
    right = (sack + win) & MASK
    if after(right, td[r + MAXEND] - 1):
        td[r + MAXEND] = right if win else (right + 1) & MASK
    if ack == r_end and td[r + FLAGS] & F_DATA_UNACKNOWLEDGED:
        td[r + FLAGS] &= ~F_DATA_UNACKNOWLEDGED

    if index == _ACK_CLASS:
        _count_retransmission(w, td, direction, seq, ack, end, win_raw)
    return None


def _count_retransmission(
    w: TcpWindow, td: array[int], direction: int, seq: int, ack: int, end: int, win_raw: int
) -> None:
    """Identical ACK-class packets in a row (same direction, seq, ack, end, raw window).
    (Mirrored by core.fastpath.)"""
    if (
        w.last_dir == direction
        and td[LAST_SEQ] == seq
        and td[LAST_ACK] == ack
        and td[LAST_END] == end
        and td[LAST_WIN] == win_raw
    ):
        if w.retrans < 255:
            w.retrans += 1
    else:
        w.last_dir = direction
        td[LAST_SEQ] = seq
        td[LAST_ACK] = ack
        td[LAST_END] = end
        td[LAST_WIN] = win_raw
        w.retrans = 0
