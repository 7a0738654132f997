"""The TCP tracker: the kernel's TCP conntrack (l4.tcp_conn, l4.tcp_states, l4.tcp_window)
plugged into the flow table.

The state machine works on a TcpConn; this module copies a flow's TCP fields between its
protocol area and a TcpConn and turns tcp_packet()'s result into the conntrack answer.

Protocol area layout: the words are l4.tcp_window's (END .. FLAGS for ORIGINAL at 0 and for
REPLY at SIDE, then LAST_SEQ .. LAST_WIN); the bytes are STATE .. TCP_ASSURED below. The fast
path (core.fastpath) reads and writes both by these names and asserts them.
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
    SMALL,
    STATE_BYTE,
    WORDS,
    Tracker,
    ports_first_packet,
    ports_key,
)
from nfqfw.core.l4.tcp_conn import TcpConn, tcp_new, tcp_packet
from nfqfw.core.l4.tcp_states import (
    DEFAULT_TIMEOUTS,
    IGNORE,
    INVALID,
    KILL,
    REOPEN,
    SHRINK_MIN_REMAINING,
    STATE_NAMES,
)
from nfqfw.core.packet import PROTO_TCP, SYN, Packet
from nfqfw.core.verdict import Ct

if TYPE_CHECKING:
    from nfqfw.core.conntrack import Conntrack, Tracked
    from nfqfw.core.flowtable import FlowTable

# The small TCP fields, one byte each in the flow's protocol bytes.
STATE, LAST_INDEX, LAST_DIR, LAST_FLAGS, LAST_WSCALE, RETRANS, TCP_ASSURED = range(7)
assert STATE == STATE_BYTE and TCP_ASSURED < SMALL

_SMALL_FIELDS = struct.Struct("7B")  # STATE ... TCP_ASSURED
_small_fields_of = attrgetter(
    "state", "last_index", "last_dir", "last_flags", "last_wscale", "retrans", "assured"
)  # a TcpConn's, in the bytes' order
_FIRST_TIMEOUT = 120.0  # a first packet whose result keeps no timeout of its own


def load_conn(table: FlowTable, slot: int, into: TcpConn | None = None) -> TcpConn:
    """The slot's TCP fields copied into `into` (a new TcpConn when None)."""
    conn = TcpConn.__new__(TcpConn) if into is None else into
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
