"""The fast path: the commonest packets of established flows, tracked straight off the bytes.

Most packets of a busy gateway are data and ACK segments of established TCP connections and
datagrams of replied UDP flows. For those the full path (decode into a Packet, conntrack, the
protocol tracker) does far more than the packet needs. `make_fast_path(conntrack)` returns a
function that takes exactly these and nothing else:

- an IPv4 packet without IP options or an IPv6 packet without extension headers, not a
  fragment, lengths consistent with the bytes captured, or a packet cut by the queue's copy
  range (exactly `copy_cap` bytes, its IP length claiming more: a GSO packet), whose lengths
  are then the IP header's, as `decode(data, copy_cap)` takes them;
- TCP: a header without options or with exactly NOP, NOP, timestamps (Linux's usual layout,
  so no SACK blocks and no malformed options); flags of the ACK class that are valid (the
  l4.tcp_states tables: ACK, PSH, URG, ECE, CWR); a flow in the table, not past its deadline,
  ASSURED, replied, not opened by the kernel's SYN proxy (l4.tcp: its acknowledgements need
  an offset), in a state the table keeps for an ACK in both directions without a special
  case (`tcp_conn.steady_states`: ESTABLISHED and CLOSE_WAIT); the sender's direction seen
  already (its max window known) and all four window checks of `tcp_in_window` passing;
- UDP: a datagram of a replied flow in the table, not past its deadline, that is ASSURED or
  within UDP_STREAM_AFTER of its creation;
- in both cases no expiry sweep due.

It then makes the very updates the full path would make and returns True: the packet is
ESTABLISHED. For anything else it returns False *before changing any state*, and the full path
decides.

Invariants: the full path stays the authority. Each piece here mirrors one full-path function,
named in a comment where it starts (the key: l4.base.ports_key; the window check:
l4.tcp_window.tcp_in_window; the retransmission count: tcp_window._count_retransmission; the
timeout: l4.tcp_conn._timeout_choice; UDP: l4.udp.UdpTracker.packet), and the layouts it reads
and writes (the key, the TCP words and bytes of the flow's protocol area) are asserted against
their definitions at import. It reaches the table only through `Conntrack.view()`.
tests/unit/core/test_fastpath.py runs both paths over random and mutated sequences and
requires identical verdicts and identical flow state.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from nfqfw.core.conntrack import Conntrack
from nfqfw.core.l4.base import ASSURED, ORIG_A, PROTO_STATE, SEEN_REPLY, SEQ_ADJUST, SMALL, ports_key
from nfqfw.core.l4.tcp import LAST_DIR, LAST_INDEX, RETRANS, STATE, TCP_ASSURED
from nfqfw.core.l4.tcp_conn import steady_states
from nfqfw.core.l4.tcp_states import (
    FLAG_CLASS_BY_FLAGS,
    INVALID_FLAGS_RESULT,
    MAX_RETRANS,
    STATE_COUNT,
    T_RETRANS,
    T_STATE,
    T_UNACK,
    FlagClass,
    TcpTimeouts,
)
from nfqfw.core.l4.tcp_window import (
    END,
    F_DATA_UNACKNOWLEDGED,
    F_MAXACK_SET,
    FLAGS,
    HALF,
    LAST_ACK,
    LAST_END,
    LAST_SEQ,
    LAST_WIN,
    MASK,
    MAXACK,
    MAXACKWINCONST,
    MAXEND,
    MAXWIN,
    SCALE,
    SIDE,
    WORDS,
)
from nfqfw.core.l4.udp import UDP_REPLIED, UDP_STREAM_AFTER, UDP_UNREPLIED
from nfqfw.core.packet import PROTO_TCP, PROTO_UDP, URG, Packet

_ACK_CLASS = int(FlagClass.ACK)

# Flag bytes the fast path takes: valid, and classed ACK (so no SYN, FIN or RST).
FAST_FLAGS = frozenset(
    flags
    for flags in range(256)
    if INVALID_FLAGS_RESULT[flags] is None and FLAG_CLASS_BY_FLAGS[flags] == _ACK_CLASS
)
assert all(flags & 0x10 and not flags & 0x07 for flags in FAST_FLAGS)
assert URG in {flags & URG for flags in FAST_FLAGS}  # URG needs no tracking of its own

# IPv4 without options + TCP: total length, flags/fragment offset, addresses, then the TCP
# ports, seq, ack, data offset, window; the _TS variants add the first 4 option bytes. (The
# protocol and TCP flags bytes are looked at first, on their own.)
_V4 = struct.Struct("!2xH2xH4xIIHHIIBxH").unpack_from
_V4_TS = struct.Struct("!2xH2xH4xIIHHIIBxH4xI").unpack_from
# IPv6 + TCP: payload length, addresses as (high, low) halves, then TCP as above.
_V6 = struct.Struct("!4xH2xQQQQHHIIBxH").unpack_from
_V6_TS = struct.Struct("!4xH2xQQQQHHIIBxH4xI").unpack_from
# UDP: the same IP fields, then the ports and the UDP length.
_UDP4 = struct.Struct("!2xH2xH4xIIHHH").unpack_from
_UDP6 = struct.Struct("!4xH2xQQQQHHH").unpack_from
_KEY4 = struct.Struct("!BIHIH").pack  # l4.base.ports_key's layout, from integers (checked below)
_KEY6 = struct.Struct("!BQQHQQH").pack
_TIMESTAMPS_ONLY = 0x0101080A  # NOP, NOP, timestamps (kind 8, length 10)
_IPV4_NO_OPTIONS = 0x45
_FRAGMENT_BITS = 0x3FFF  # more-fragments flag and fragment offset
_NEEDED = PROTO_STATE | ASSURED | SEEN_REPLY
_LOOKED_AT = _NEEDED | SEQ_ADJUST  # TCP flow flags: exactly _NEEDED of these (one test for both)
assert ORIG_A == 1  # the direction is computed as (bits & ORIG_A) ^ is_a

FastPath = Callable[[bytes, float], bool]
# The longest headers the fast path takes: IPv6 and TCP with timestamps. A cut packet is only
# taken when the copy range holds them (else the full path finds the header cut short).
_LONGEST_HEADERS = 40 + 32

# A TCP flow's protocol area as read and written here. The words (l4.tcp_window's layout) are
# unpacked whole in the order ORIGINAL's block, REPLY's block, the last packet, and written
# back by name; the bytes (l4.tcp's layout) are read and written in the orders below.
_ROW = struct.Struct(f"={WORDS}I").unpack_from
_LAST = struct.Struct("=4I").pack_into  # LAST_SEQ .. LAST_WIN: seq, ack, end, window
assert tuple(range(7)) == (END, MAXEND, MAXWIN, MAXACK, SCALE, FLAGS, SIDE)
assert tuple(range(2 * SIDE, 2 * SIDE + 5)) == (LAST_SEQ, LAST_ACK, LAST_END, LAST_WIN, WORDS)
_SMALL_READ = struct.Struct("BxBxxBB").unpack_from  # STATE, LAST_DIR, RETRANS, TCP_ASSURED
_SMALL_WRITE = struct.Struct("2B").pack_into  # LAST_INDEX, LAST_DIR
assert (STATE, LAST_INDEX, LAST_DIR, RETRANS, TCP_ASSURED) == (0, 1, 2, 5, 6) and SMALL >= 7


def _check_key_layout() -> None:
    """_KEY4 and _KEY6 pack what ports_key builds: a layout change breaks at import, loudly."""
    for size, pack in ((4, _KEY4), (16, _KEY6)):
        pkt = Packet()
        pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport = PROTO_TCP, bytes(size), 2, b"\xff" * size, 1
        low, high = (0, 2**32 - 1) if size == 4 else ((0, 0), (2**64 - 1, 2**64 - 1))
        words = (low, 2, high, 1) if size == 4 else (*low, 2, *high, 1)
        assert ports_key(pkt) == (pack(PROTO_TCP, *words), True), "fast path key layout"


_check_key_layout()


def make_fast_path(conntrack: Conntrack, copy_cap: int = 0) -> tuple[FastPath, Callable[[], tuple[int, int]]]:
    """The fast path over `conntrack`'s table: fast(data, now) is True when it tracked the packet
    (ESTABLISHED), False when the full path must decide (nothing was changed). Returned with a
    function telling how many packets it took, and how many of those were cut by the copy
    range `copy_cap` (see decode; 0: packets are complete).

    It binds the table's view (Conntrack.view) once, and the TCP timeouts in force."""
    view = conntrack.view()
    slots_get, due, table = view.slot_of, view.expiry_due, view.table
    deadline_col, bits_col, td, small, created_col = (
        table.deadline,
        table.bits,
        table.td,
        table.small,
        table.created,
    )
    timeouts: TcpTimeouts = conntrack.tcp_timeouts
    steady = steady_states(_ACK_CLASS)
    fast_state = bytes(1 if state in steady else 0 for state in range(STATE_COUNT))
    own_timeout = timeouts.by_state
    retrans_timeout, unack_timeout = timeouts.retrans, timeouts.unack
    assert all(timeouts.accepted[state][T_STATE].timeout == own_timeout[state] for state in steady)
    assert all(timeouts.accepted[state][T_RETRANS].timeout == retrans_timeout for state in steady)
    assert all(timeouts.accepted[state][T_UNACK].timeout == unack_timeout for state in steady)
    fast_flags = FAST_FLAGS
    v4, v4_ts, v6, v6_ts, key4, key6, row, set_last = _V4, _V4_TS, _V6, _V6_TS, _KEY4, _KEY6, _ROW, _LAST
    small_read, small_write = _SMALL_READ, _SMALL_WRITE
    udp4_header, udp6_header = _UDP4, _UDP6
    ack_class = _ACK_CLASS
    cut_size = copy_cap if copy_cap >= _LONGEST_HEADERS else -1  # a packet of this size may be cut
    taken = cut = 0

    def fast(data: bytes, now: float) -> bool:
        nonlocal taken, cut
        try:
            if due and due[0] <= now:
                return False  # an expiry sweep is due: the full path runs it
            size = len(data)
            first = data[0] if size >= 40 else 0
            if first == _IPV4_NO_OPTIONS and data[9] == PROTO_TCP:
                if data[33] not in fast_flags:  # the TCP flags byte
                    return False
                if size >= 44:
                    (total, fragment, src, dst, sport, dport,
                     seq, ack, offset, window, options) = v4_ts(data)  # fmt: skip
                else:
                    (total, fragment, src, dst, sport, dport,
                     seq, ack, offset, window) = v4(data)  # fmt: skip
                    options = 0
                if fragment & _FRAGMENT_BITS:
                    return False
                whole = total <= size
                if not whole and size != cut_size:
                    return False
                segment = total - 20
                is_a = src < dst or (src == dst and sport <= dport)
                key = (
                    key4(PROTO_TCP, src, sport, dst, dport)
                    if is_a
                    else key4(PROTO_TCP, dst, dport, src, sport)
                )
            elif first >> 4 == 6 and size >= 60 and data[6] == PROTO_TCP:
                if data[53] not in fast_flags:
                    return False
                if size >= 64:
                    (segment, s_hi, s_lo, d_hi, d_lo, sport, dport,
                     seq, ack, offset, window, options) = v6_ts(data)  # fmt: skip
                else:
                    (segment, s_hi, s_lo, d_hi, d_lo, sport, dport,
                     seq, ack, offset, window) = v6(data)  # fmt: skip
                    options = 0
                whole = segment + 40 <= size
                if not whole and size != cut_size:
                    return False
                is_a = (s_hi, s_lo, sport) <= (d_hi, d_lo, dport)
                if is_a:
                    key = key6(PROTO_TCP, s_hi, s_lo, sport, d_hi, d_lo, dport)
                else:
                    key = key6(PROTO_TCP, d_hi, d_lo, dport, s_hi, s_lo, sport)
            else:
                return udp(data, size, now)

            # -- an ACK-class TCP segment of `segment` bytes (header and data) of the flow `key` ----
            # (the key mirrors l4.base.ports_key; what follows, l4.tcp.TcpTracker.packet)
            header = (offset >> 4) * 4
            payload = segment - header
            # No options, or exactly NOP, NOP, timestamps: no SACK blocks, nothing malformed.
            if (header != 20 and (header != 32 or options != _TIMESTAMPS_ONLY)) or payload < 0:
                return False
            slot = slots_get(key)
            if slot is None or deadline_col[slot] <= now:
                return False
            bits = bits_col[slot]
            at = slot * SMALL
            state, last_dir, retrans, tcp_assured = small_read(small, at)
            if bits & _LOOKED_AT != _NEEDED or not tcp_assured or not fast_state[state]:
                return False
            direction = (bits & ORIG_A) ^ is_a  # 0: ORIGINAL, 1: REPLY (ORIG_A is bit 0)

            # -- mirrors l4.tcp_window.tcp_in_window, for an ACK-class segment without SACK ---------
            base = slot * WORDS
            if direction:
                (r_end, r_maxend, r_maxwin, _, _, r_flags,
                 s_end, s_maxend, s_maxwin, s_maxack, s_scale, s_flags,
                 last_seq, last_ack, last_end, last_win) = row(td, base * 4)  # fmt: skip
                s, r = base + SIDE, base
            else:
                (s_end, s_maxend, s_maxwin, s_maxack, s_scale, s_flags,
                 r_end, r_maxend, r_maxwin, _, _, r_flags,
                 last_seq, last_ack, last_end, last_win) = row(td, base * 4)  # fmt: skip
                s, r = base, base + SIDE
            end = seq + payload
            if not 0 < s_maxwin < HALF or r_maxwin >= HALF or end > MASK:
                # The first packet seen from this side (the full path sets it up), windows too large
                # for the plain comparisons below, or the sequence numbers wrap in this segment.
                return False
            # The four checks, as sufficient conditions in plain integers: each implies its modulo
            # 2**32 original (`before`/`after` in tcp_window); near a wrap they fail and the full
            # path, with the exact arithmetic, decides. MAXACKWINDOW = max(td_maxwin, 66000).
            if not (
                0 <= s_maxend - seq < HALF  # I: seq within the receiver's window
                and 0 <= r_end - ack <= (s_maxwin if s_maxwin > MAXACKWINCONST else MAXACKWINCONST)  # III, IV
                and 0 <= end - s_end + r_maxwin < HALF  # II: not old data
            ):
                return False

            # In window: update the sender ...  (after II, |end - s_end| < HALF and after I,
            # |end - s_maxend| < HALF: `after` is a plain comparison there)
            win = window << s_scale
            if s_maxwin < win:
                td[s + MAXWIN] = win
            if end > s_end:
                td[s + END] = end
                if not s_flags & F_DATA_UNACKNOWLEDGED:
                    s_flags |= F_DATA_UNACKNOWLEDGED
                    td[s + FLAGS] = s_flags
            if not s_flags & F_MAXACK_SET:
                td[s + MAXACK] = ack
                s_flags |= F_MAXACK_SET
                td[s + FLAGS] = s_flags
            elif (s_maxack - ack) & MASK >= HALF:  # after(ack, s_maxack)
                td[s + MAXACK] = ack
            # ... and the receiver.
            if r_maxwin and end > s_maxend:
                td[r + MAXWIN] = r_maxwin + end - s_maxend
            right = (ack + win) & MASK
            if (r_maxend - 1 - right) & MASK >= HALF:  # after(right, r_maxend - 1)
                td[r + MAXEND] = right if win else (right + 1) & MASK
            if ack == r_end and r_flags & F_DATA_UNACKNOWLEDGED:
                r_flags &= ~F_DATA_UNACKNOWLEDGED
                td[r + FLAGS] = r_flags

            # -- mirrors tcp_window._count_retransmission: identical ACK-class packets in a row --
            if (
                last_seq == seq
                and last_ack == ack
                and last_end == end
                and last_win == window
                and last_dir == direction
            ):
                if retrans < 255:
                    retrans += 1
                    small[at + RETRANS] = retrans
            else:
                set_last(td, (base + LAST_SEQ) * 4, seq, ack, end, window)  # LAST_SEQ .. LAST_WIN
                if retrans:
                    retrans = 0
                    small[at + RETRANS] = 0
            small_write(small, at + LAST_INDEX, ack_class, direction)  # LAST_INDEX, LAST_DIR (tcp_packet)

            # -- mirrors l4.tcp_conn._timeout_choice (the last window is this packet's) -----------
            timeout = own_timeout[state]
            if retrans >= MAX_RETRANS and timeout > retrans_timeout:
                timeout = retrans_timeout
            elif (s_flags | r_flags) & F_DATA_UNACKNOWLEDGED and timeout > unack_timeout:
                timeout = unack_timeout
            elif window == 0 and timeout > retrans_timeout:
                timeout = retrans_timeout
            deadline_col[slot] = now + timeout
            taken += 1
            if not whole:
                cut += 1
            return True
        except Exception:  # a packet the checks above let through by mistake: never a crash
            return False

    def udp(data: bytes, size: int, now: float) -> bool:
        """A datagram of a replied UDP flow: ESTABLISHED either way. Mirrors the key of
        l4.base.ports_key and l4.udp.UdpTracker.packet."""
        nonlocal taken, cut
        first = data[0] if size >= 28 else 0
        if first == _IPV4_NO_OPTIONS and data[9] == PROTO_UDP:
            total, fragment, src, dst, sport, dport, length = udp4_header(data)
            whole = total <= size
            if fragment & _FRAGMENT_BITS or not 8 <= length <= total - 20 or (not whole and size != cut_size):
                return False
            if src < dst or (src == dst and sport <= dport):
                key = key4(PROTO_UDP, src, sport, dst, dport)
            else:
                key = key4(PROTO_UDP, dst, dport, src, sport)
        elif first >> 4 == 6 and size >= 48 and data[6] == PROTO_UDP:
            payload_length, s_hi, s_lo, d_hi, d_lo, sport, dport, length = udp6_header(data)
            whole = payload_length + 40 <= size
            if not 8 <= length <= payload_length or (not whole and size != cut_size):
                return False
            if (s_hi, s_lo, sport) <= (d_hi, d_lo, dport):
                key = key6(PROTO_UDP, s_hi, s_lo, sport, d_hi, d_lo, dport)
            else:
                key = key6(PROTO_UDP, d_hi, d_lo, dport, s_hi, s_lo, sport)
        else:
            return False
        slot = slots_get(key)
        if slot is None or deadline_col[slot] <= now:
            return False
        bits = bits_col[slot]
        if not bits & SEEN_REPLY:
            return False  # the originator's packets are NEW until a reply: the policy decides
        if now > created_col[slot] + UDP_STREAM_AFTER:
            if not bits & ASSURED:
                return False  # it becomes an ASSURED stream now: the full path does that, once
            deadline_col[slot] = now + UDP_REPLIED
        else:
            deadline_col[slot] = now + UDP_UNREPLIED
        taken += 1
        if not whole:
            cut += 1
        return True

    def fast_packets() -> tuple[int, int]:
        return taken, cut

    return fast, fast_packets
