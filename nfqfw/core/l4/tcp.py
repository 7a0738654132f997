"""The TCP tracker: the kernel's TCP conntrack (l4.tcp_conn, l4.tcp_states, l4.tcp_window)
plugged into the flow table.

The state machine works on a TcpConn; this module copies a flow's TCP fields between its
protocol area and a TcpConn and turns tcp_packet()'s result into the conntrack answer.

Protocol area layout: the words are l4.tcp_window's (END .. FLAGS for ORIGINAL at 0 and for
REPLY at SIDE, then LAST_SEQ .. LAST_WIN); the bytes are STATE .. TCP_ASSURED below. The fast
path (core.fastpath) reads and writes both by these names and asserts them.

A connection the kernel's SYN proxy opened (flow flag SEQ_ADJUST, set by `proxied_syn` for the
SYN the proxy sends the server; core.synproxy) keeps in byte PROXY what the 32-bit word at
SEQ_OFFSET holds, as the kernel's synproxy and seqadj extensions do: COOKIE, the proxy's
initial sequence number (synproxy->isn, from that SYN's ACK field) until the server's SYN-ACK;
then OFFSET, the REPLY direction's offset (cookie - the server's ISN, nf_ct_seqadj_init), which
tcp_in_window takes off the ORIGINAL direction's acknowledgements. The ACK the proxy sends the
server on its SYN-ACK never reaches nfqfw (it must not wait in the queue while the kernel sets
the offset): it is tracked here as the kernel tracks it, right after the SYN-ACK. Such flows
never take the fast path, and only they pay for the offset.
"""

from __future__ import annotations

import struct
from operator import attrgetter
from typing import TYPE_CHECKING

from nfqfw.core.l4.base import (
    ASSURED,
    ORIGINAL,
    PROTO_STATE,
    REPLY,
    SEEN_REPLY,
    SEQ_ADJUST,
    SMALL,
    STATE_BYTE,
    WORDS,
    Tracker,
    ports_first_packet,
    ports_key,
)
from nfqfw.core.l4.tcp_conn import TcpConn, TcpResult, tcp_new, tcp_packet
from nfqfw.core.l4.tcp_states import (
    ACCEPT,
    DEFAULT_TIMEOUTS,
    IGNORE,
    INVALID,
    KILL,
    REOPEN,
    SHRINK_MIN_REMAINING,
    STATE_NAMES,
    TcpState,
)
from nfqfw.core.l4.tcp_window import MAXWIN
from nfqfw.core.packet import ACK, PROTO_TCP, SYN, Packet
from nfqfw.core.verdict import Ct

if TYPE_CHECKING:
    from nfqfw.core.conntrack import Conntrack, Tracked
    from nfqfw.core.flowtable import FlowTable

# The small TCP fields, one byte each in the flow's protocol bytes.
STATE, LAST_INDEX, LAST_DIR, LAST_FLAGS, LAST_WSCALE, RETRANS, TCP_ASSURED = range(7)
assert STATE == STATE_BYTE and TCP_ASSURED < SMALL

# The SYN proxy's fields (flows with SEQ_ADJUST only): what the word holds, and the word.
PROXY, SEQ_OFFSET = 7, 8
COOKIE, OFFSET = 1, 2  # values of byte PROXY
assert SEQ_OFFSET + 4 <= SMALL
_PROXY_WORD = struct.Struct("=I")
_SYN_SENT, _SYN_RECV = int(TcpState.SYN_SENT), int(TcpState.SYN_RECV)

_SMALL_FIELDS = struct.Struct("7B")  # STATE ... TCP_ASSURED
_small_fields_of = attrgetter(
    "state", "last_index", "last_dir", "last_flags", "last_wscale", "retrans", "assured"
)  # a TcpConn's, in the bytes' order
_FIRST_TIMEOUT = 120.0  # a first packet whose result keeps no timeout of its own


def load_conn(table: FlowTable, slot: int, into: TcpConn | None = None) -> TcpConn:
    """The slot's TCP fields copied into `into` (a new TcpConn when None)."""
    if into is None:
        conn = TcpConn.__new__(TcpConn)
        conn.ack_offset = 0
    else:
        conn = into
    base = slot * WORDS
    conn.td = table.td[base : base + WORDS]
    fields = _SMALL_FIELDS.unpack_from(table.small, slot * SMALL)
    (conn.state, conn.last_index, conn.last_dir, conn.last_flags,
     conn.last_wscale, conn.retrans, assured) = fields  # fmt: skip
    conn.assured = assured != 0
    return conn


def store_conn(table: FlowTable, slot: int, conn: TcpConn) -> None:
    """Write a TcpConn's fields into the slot (the flow's PROTO_STATE flag is the caller's)."""
    base = slot * WORDS
    table.td[base : base + WORDS] = conn.td
    _SMALL_FIELDS.pack_into(table.small, slot * SMALL, *_small_fields_of(conn))


def proxied_syn(table: FlowTable, slot: int, pkt: Packet) -> None:
    """`pkt` is the SYN the kernel's SYN proxy sent the server for the flow in `slot` (tracked
    already): remember the proxy's ISN it carries in its ACK field. As the kernel's synproxy
    hook, only while the flow waits for the server's SYN-ACK (a retransmitted SYN renews it)."""
    at = slot * SMALL
    if table.small[at + STATE] != _SYN_SENT:
        return
    table.bits[slot] |= SEQ_ADJUST
    table.small[at + PROXY] = COOKIE
    _PROXY_WORD.pack_into(table.small, at + SEQ_OFFSET, pkt.ack)


def ack_offset(table: FlowTable, slot: int) -> int:
    """The offset taken off the ORIGINAL direction's acknowledgements of a SEQ_ADJUST flow (0
    until the server's SYN-ACK set it, as the kernel's seqadj)."""
    at = slot * SMALL
    if table.small[at + PROXY] != OFFSET:
        return 0
    return int(_PROXY_WORD.unpack_from(table.small, at + SEQ_OFFSET)[0])


def proxy_fields(table: FlowTable, slot: int) -> tuple[str, int] | None:
    """A SEQ_ADJUST flow's SYN proxy fields by name: ("cookie", the proxy's ISN) until the
    server's SYN-ACK, then ("offset", the offset); None for any other flow."""
    at = slot * SMALL
    if not table.bits[slot] & SEQ_ADJUST:
        return None
    name = "cookie" if table.small[at + PROXY] == COOKIE else "offset"
    return name, int(_PROXY_WORD.unpack_from(table.small, at + SEQ_OFFSET)[0])


def _server_answered(table: FlowTable, slot: int, pkt: Packet) -> bool:
    """The server's SYN-ACK of a proxied flow, accepted: the offset between the proxy's
    sequence space (what the client acknowledges) and the server's is now known (kernel
    nf_ct_seqadj_init(ct, ctinfo, synproxy->isn - ntohl(th->seq))). False when it was already."""
    at = slot * SMALL
    if table.small[at + PROXY] != COOKIE:
        return False
    cookie = _PROXY_WORD.unpack_from(table.small, at + SEQ_OFFSET)[0]
    _PROXY_WORD.pack_into(table.small, at + SEQ_OFFSET, (cookie - pkt.seq) & 0xFFFFFFFF)
    table.small[at + PROXY] = OFFSET
    return True


def _proxy_ack(synack: Packet, window: int) -> Packet:
    """The ACK the kernel's proxy sends the server on its SYN-ACK (synproxy_send_server_ack):
    from the client's side, acknowledging the server's SYN, with the client's largest window
    so far as its window field (htons(td_maxwin): the low 16 bits)."""
    ack = Packet()
    ack.family, ack.proto, ack.tcp_flags = synack.family, PROTO_TCP, ACK
    ack.src, ack.dst, ack.sport, ack.dport = synack.dst, synack.src, synack.dport, synack.sport
    ack.seq = synack.ack
    ack.ack = (synack.seq + 1) & 0xFFFFFFFF
    ack.window = window & 0xFFFF
    return ack


class TcpTracker(Tracker):
    """TCP: a flow starts with a SYN (or mid-stream, with loose pick-up); every packet walks
    the state table and the window checks (tcp_packet); the flow's timeout follows its state."""

    __slots__ = ("_conn",)

    name = "tcp"
    protos = (PROTO_TCP,)
    timeouts = DEFAULT_TIMEOUTS  # configurable: Conntrack.tcp_timeouts
    key = staticmethod(ports_key)

    def __init__(self, ct: Conntrack) -> None:
        super().__init__(ct)
        self._conn = TcpConn()  # the TCP fields of the flow at hand, copied out of the table and back

    @staticmethod
    def first_packet(key: bytes, orig_a: bool) -> Packet | None:
        pkt = ports_first_packet(key, orig_a)
        if pkt is not None:
            pkt.tcp_flags = SYN
        return pkt

    @staticmethod
    def state_name(bits: int, state: int) -> str:
        if bits & PROTO_STATE:
            return STATE_NAMES[state]
        return Tracker.state_name(bits, state)

    def new(self, pkt: Packet, key: bytes, is_a: bool, now: float) -> Tracked:
        ct = self.ct
        conn = tcp_new(pkt, ct.loose)
        if isinstance(conn, str):
            return ct.answer(Ct.INVALID, conn)
        result = tcp_packet(conn, pkt, ORIGINAL, False, ct.tcp_timeouts)
        if result.kind == INVALID:
            return ct.answer(Ct.INVALID, result.reason)
        tracked = ct.open(key, is_a, now, result.timeout if result.timeout is not None else _FIRST_TIMEOUT)
        store_conn(self.table, tracked.slot, conn)
        self.table.bits[tracked.slot] |= PROTO_STATE
        return tracked

    def starts_flow(self, pkt: Packet) -> bool:
        """What new() would say, without a slot: not INVALID as the first packet of a flow."""
        ct = self.ct
        conn = tcp_new(pkt, ct.loose)
        if isinstance(conn, str):
            return False
        return tcp_packet(conn, pkt, ORIGINAL, False, ct.tcp_timeouts).kind != INVALID

    # core.fastpath mirrors this for an ACK-class segment of an ASSURED flow in a steady state.
    def packet(self, slot: int, bits: int, pkt: Packet, direction: int, now: float) -> Tracked:
        ct, table = self.ct, self.table
        conn = load_conn(table, slot, self._conn)
        if bits & SEQ_ADJUST:
            result = self._proxied_packet(slot, bits, conn, pkt, direction)
        else:
            result = tcp_packet(conn, pkt, direction, bits & SEEN_REPLY != 0, ct.tcp_timeouts)
        kind = result.kind
        if kind == REOPEN:
            return ct.reopen(slot, pkt, now)
        if kind == KILL:
            ct.kill(slot)
            # From the originator the RST is still NEW (no reply yet), as the kernel's ctinfo.
            if direction == ORIGINAL:
                return ct.answer(Ct.NEW, "new: RST before any reply (flow removed)")
            return ct.answer(Ct.ESTABLISHED, "established: RST before any reply (flow removed)")
        store_conn(table, slot, conn)
        if kind == INVALID:
            timeout = result.timeout
            if timeout is not None and table.deadline[slot] - now > max(timeout, SHRINK_MIN_REMAINING):
                table.deadline[slot] = now + timeout
            return ct.answer(Ct.INVALID, result.reason)
        state = ct.ctinfo(bits, direction)
        if direction == REPLY and not bits & SEEN_REPLY:
            table.bits[slot] = bits | SEEN_REPLY
        if kind != IGNORE and result.timeout is not None:
            table.deadline[slot] = now + result.timeout
        if result.assure and not bits & ASSURED:
            ct.assure(slot)
        return state

    def _proxied_packet(self, slot: int, bits: int, conn: TcpConn, pkt: Packet, direction: int) -> TcpResult:
        """tcp_packet for a connection the kernel's SYN proxy opened: with its offset, which the
        server's SYN-ACK sets."""
        table = self.table
        conn.ack_offset = ack_offset(table, slot)
        try:
            result = tcp_packet(conn, pkt, direction, bits & SEEN_REPLY != 0, self.ct.tcp_timeouts)
        finally:
            conn.ack_offset = 0  # the TcpConn is reused for the next flow
        if (
            direction == REPLY
            and pkt.tcp_flags & (SYN | ACK) == SYN | ACK
            and result.kind == ACCEPT
            and conn.state == _SYN_RECV
            and _server_answered(table, slot, pkt)
        ):
            # The proxy's ACK to the server (before the offset is set, so none applies): the
            # connection is ESTABLISHED for the kernel from then on, and for nfqfw too.
            acked = tcp_packet(conn, _proxy_ack(pkt, conn.td[MAXWIN]), ORIGINAL, True, self.ct.tcp_timeouts)
            if acked.kind == ACCEPT:
                return acked
        return result
