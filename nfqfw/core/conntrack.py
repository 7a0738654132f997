"""The flow table: flow identity and direction, UDP/ICMP/other lifecycles, RELATED ICMP
errors, the bound with early drop, and ordered expiry.  TCP state lives in `core.tcp`.

Flow keys are `bytes` built from the raw header fields, so Python's per-process randomised
bytes hash protects the table against hash flooding.  TCP/UDP/other keys put the two
endpoints in a canonical order (one dict entry per flow); a flow remembers which endpoint
started it (`orig_a`).  ICMP query keys are written requester-first, so a query's direction
follows from its type.
"""

from __future__ import annotations

import struct
from collections import Counter, deque
from collections.abc import Iterator

from nfqfw.core.expiry import ExpiryWheel
from nfqfw.core.flowtable import (
    ASSURED,
    DETACHED,
    IS_TCP,
    NO_SLOT,
    ORIG_A,
    SEEN_REPLY,
    SMALL,
    STATE,
    Flow,
    FlowTable,
    Row,
    state_name,
)
from nfqfw.core.packet import (
    FRAG_LATER,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    SYN,
    Packet,
)
from nfqfw.core.tcp import TcpConn, tcp_new, tcp_packet
from nfqfw.core.tcp_states import (
    IGNORE,
    INVALID,
    KERNEL_TIMEOUTS,
    KILL,
    REOPEN,
    SHRINK_MIN_REMAINING,
)
from nfqfw.core.verdict import Ct, Direction

_CENSUS_BITS = IS_TCP | ASSURED | SEEN_REPLY  # what state_name reads of a flow's flags

UDP_UNREPLIED = 30.0
UDP_REPLIED = 120.0
UDP_STREAM_AFTER = 2.0  # kernel: a replied flow still active 2 s after creation is a stream
ICMP_TIMEOUT = 30.0
OTHER_TIMEOUT = 600.0
DEFAULT_MAX_FLOWS = 65536

ORIGINAL = Direction.ORIGINAL
REPLY = Direction.REPLY

# ICMP query request type -> its reply type (kernel valid_new / invmap).
ICMP_QUERIES = {8: 0, 13: 14, 15: 16, 17: 18}
ICMPV6_QUERIES = {128: 129, 139: 140}
ICMP_REPLIES = {reply: request for request, reply in ICMP_QUERIES.items()}
ICMPV6_REPLIES = {reply: request for request, reply in ICMPV6_QUERIES.items()}
ICMP_ERRORS = frozenset({3, 4, 5, 11, 12})
ICMPV6_UNTRACKED = frozenset({130, 131, 132, 133, 134, 135, 136, 137, 143})  # MLD, RS, RA, NS, NA, redirect
ICMP_MAX_TYPE = 18

_PORT = struct.Struct("!H").pack
_PORTS = struct.Struct("!HH").pack


class Tracked:
    """The conntrack answer for one packet (reused: one per Conntrack, not per packet)."""

    __slots__ = ("_table", "ct", "direction", "new", "reason", "slot")

    def __init__(self, table: FlowTable) -> None:
        self._table = table
        self.ct: Ct = Ct.INVALID
        self.slot = NO_SLOT  # the packet's flow, NO_SLOT when it has none
        self.new = False  # the flow is not in the table yet: confirm() it if the packet is accepted
        self.direction: int = ORIGINAL
        self.reason = ""

    @property
    def flow(self) -> Flow | None:
        return None if self.slot == NO_SLOT else self._table.handle(self.slot)


def flow_key(pkt: Packet) -> tuple[bytes, bool] | None:
    """The table key of a packet and whether its source endpoint sorts first (ICMP: whether it
    is the requester).  None for ICMP types that have no flow (errors, untracked, unknown)."""
    proto = pkt.proto
    if proto in (PROTO_TCP, PROTO_UDP):
        a = pkt.src + _PORT(pkt.sport)
        b = pkt.dst + _PORT(pkt.dport)
        if a <= b:
            return bytes((proto,)) + a + b, True
        return bytes((proto,)) + b + a, False
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        v4 = proto == PROTO_ICMP
        queries = ICMP_QUERIES if v4 else ICMPV6_QUERIES
        replies = ICMP_REPLIES if v4 else ICMPV6_REPLIES
        kind = pkt.icmp_type
        ident = _PORTS(pkt.icmp_id, 0)
        if kind in queries:
            return bytes((proto, kind)) + pkt.src + pkt.dst + ident, True
        request = replies.get(kind)
        if request is not None:
            return bytes((proto, request)) + pkt.dst + pkt.src + ident, False
        return None
    a, b = pkt.src, pkt.dst
    if a <= b:
        return bytes((proto,)) + a + b, True
    return bytes((proto,)) + b + a, False


# The reader of the layout flow_key() writes; keep the two together.
_ADDR_LEN_FAMILY = {4: 4, 16: 6}


def first_packet(flow: Flow) -> Packet | None:
    """The originator's first packet, as far as the policy looks at it; None for a malformed key."""
    key, proto = flow.key, flow.key[0]
    pkt = Packet()
    pkt.proto = proto
    if proto in (PROTO_TCP, PROTO_UDP):
        size = (len(key) - 1) // 2 - 2
        a, b = key[1 : 1 + size + 2], key[3 + size :]
        (src, dst) = (a, b) if flow.orig_a else (b, a)
        pkt.src, pkt.sport = src[:size], int.from_bytes(src[size:], "big")
        pkt.dst, pkt.dport = dst[:size], int.from_bytes(dst[size:], "big")
        if proto == PROTO_TCP:
            pkt.tcp_flags = SYN
    elif proto in (PROTO_ICMP, PROTO_ICMPV6):
        # requester first: type, requester, responder, identifier, 2 bytes of zero
        size = (len(key) - 6) // 2
        pkt.icmp_type, pkt.icmp_code = key[1], 0
        pkt.src, pkt.dst = key[2 : 2 + size], key[2 + size : 2 + 2 * size]
        pkt.icmp_id = int.from_bytes(key[2 + 2 * size : 4 + 2 * size], "big")
    else:
        size = (len(key) - 1) // 2
        a, b = key[1 : 1 + size], key[1 + size :]
        pkt.src, pkt.dst = (a, b) if flow.orig_a else (b, a)
    family = _ADDR_LEN_FAMILY.get(size)
    if family is None or len(pkt.src) != size or len(pkt.dst) != size:
        return None
    pkt.family = family
    return pkt


class Conntrack:
    """Bounded flow table.  `track()` classifies a packet; `confirm()` inserts a new flow once
    the policy accepted its first packet (as the kernel confirms only accepted conntracks).

    Flows live in `table` (core.flowtable), one slot each; `_slots` maps a flow key to its slot.
    A new flow gets a slot at once (its *pending* slot) and is entered in `_slots` on
    confirmation; a pending flow that is not confirmed before the next track() is freed."""

    def __init__(self, max_flows: int = DEFAULT_MAX_FLOWS, loose: bool = False) -> None:
        self.max_flows = max_flows
        self.loose = loose
        self.tcp_timeouts = KERNEL_TIMEOUTS
        self.table = FlowTable()
        self._slots: dict[bytes, int] = {}
        self._pending = NO_SLOT
        # The early-drop order: confirmed flows, oldest first, by key object. ASSURED and removed
        # flows are skipped when met (so assuring or removing a flow costs nothing here) and
        # swept out when they outnumber the live entries (an amortised O(1) per flow).
        self._unassured: deque[bytes] = deque()
        # Filed by key object: a flow removed and tracked again gets a new key object, so an
        # old entry is recognised (the slot's key is not the filed object) and skipped.
        self._wheel = ExpiryWheel(self._deadline_of)
        self._out = Tracked(self.table)
        self._conn = TcpConn()  # the TCP fields of the flow at hand, copied out of the table and back
        self.expired = 0
        self.early_drops = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[Flow]:
        handle = self.table.handle
        return iter([handle(slot) for slot in self._slots.values()])  # a list: callers may remove flows

    def slots(self) -> list[int]:
        """The slots of the confirmed flows in the table (FlowTable), oldest first."""
        return list(self._slots.values())

    def rows(self) -> Iterator[Row]:
        """Every confirmed flow's fields (FlowTable.row), read straight off the table, one at a
        time: the table must not change until the iteration is done."""
        return self.table.rows(self._slots.values())

    def census(self, now: float) -> Counter[tuple[int, str]]:
        """Flows whose deadline is after `now`, by (protocol number, state name as
        `Flow.state_name`), read off the columns: no Flow handle per flow, so `nfqfw status`
        and a metrics scrape of a full table cost a few milliseconds, not a pause."""
        table = self.table
        keys, deadline, bits, small = table.keys, table.deadline, table.bits, table.small
        raw: Counter[tuple[int, int, int]] = Counter()
        for slot in self.slots():  # one C-level copy: safe to read from another thread
            key = keys[slot]
            if key is not None and deadline[slot] > now:
                flags = bits[slot] & _CENSUS_BITS
                raw[(key[0], flags, small[slot * SMALL + STATE] if flags & IS_TCP else 0)] += 1
        named: Counter[tuple[int, str]] = Counter()
        for (proto, flags, tcp_state), count in raw.items():
            named[(proto, state_name(flags, tcp_state))] += count
        return named

    def get(self, key: bytes) -> Flow | None:
        slot = self._slots.get(key)
        return None if slot is None else self.table.handle(slot)

    # -- per packet ------------------------------------------------------------------------
    def track(self, pkt: Packet, now: float) -> Tracked:
        if self._pending != NO_SLOT:
            self._free(self._pending)
        due = self._wheel.next_due()
        if due is not None and due <= now:
            self._wheel.sweep(now, self._expire)
        out = self._out
        out.slot = NO_SLOT
        out.new = False
        out.direction = ORIGINAL
        if pkt.frag == FRAG_LATER:
            return self._answer(Ct.UNTRACKED, "untracked: non-first fragment")
        proto = pkt.proto
        if proto in (PROTO_ICMP, PROTO_ICMPV6):
            special = self._icmp_special(pkt)
            if special is not None:
                return special
        keyed = flow_key(pkt)
        if keyed is None:  # pragma: no cover - every non-query ICMP type was handled above
            return self._answer(Ct.INVALID, "icmp: no flow for this type")
        key, is_a = keyed
        table = self.table
        slot = self._slots.get(key)
        if slot is not None and table.deadline[slot] <= now:
            self._remove(slot)
            self.expired += 1
            slot = None
        if slot is None:
            return self._new(pkt, key, is_a, now)
        bits = table.bits[slot]
        if proto in (PROTO_ICMP, PROTO_ICMPV6):
            direction = ORIGINAL if is_a else REPLY
        else:
            direction = ORIGINAL if is_a == bool(bits & ORIG_A) else REPLY
        out.slot = slot
        out.direction = direction
        if bits & IS_TCP:
            return self._tcp(slot, bits, pkt, direction, now)
        return self._stateless(slot, bits, direction, now)

    def _answer(self, ct: Ct, reason: str) -> Tracked:
        out = self._out
        out.ct = ct
        out.reason = reason
        return out

    def _state_of(self, bits: int, direction: int) -> Tracked:
        # As the kernel's ctinfo: before any reply, the originator's packets are still NEW.
        if direction == ORIGINAL and not bits & SEEN_REPLY:
            return self._answer(Ct.NEW, "new")
        return self._answer(Ct.ESTABLISHED, "established")

    def _new(self, pkt: Packet, key: bytes, is_a: bool, now: float) -> Tracked:
        out = self._out
        proto = pkt.proto
        if proto == PROTO_TCP:
            conn = tcp_new(pkt, self.loose)
            if isinstance(conn, str):
                return self._answer(Ct.INVALID, conn)
            result = tcp_packet(conn, pkt, ORIGINAL, False, self.tcp_timeouts)
            if result.kind == INVALID:
                return self._answer(Ct.INVALID, result.reason)
            timeout = result.timeout if result.timeout is not None else 120.0
        elif proto == PROTO_UDP:
            timeout = UDP_UNREPLIED
        elif proto in (PROTO_ICMP, PROTO_ICMPV6):
            if not is_a:
                return self._answer(Ct.INVALID, "icmp: reply without a request")
            timeout = ICMP_TIMEOUT
        else:
            timeout = OTHER_TIMEOUT
        table = self.table
        slot = self._pending = table.alloc(key, is_a, now)
        table.deadline[slot] = now + timeout
        if proto == PROTO_TCP:
            table.store_tcp(slot, conn)
            table.bits[slot] |= IS_TCP
        out.slot = slot
        out.new = True
        out.direction = ORIGINAL
        return self._answer(Ct.NEW, "new")

    def _tcp(self, slot: int, bits: int, pkt: Packet, direction: int, now: float) -> Tracked:
        table = self.table
        conn = table.load_tcp(slot, self._conn)
        result = tcp_packet(conn, pkt, direction, bits & SEEN_REPLY != 0, self.tcp_timeouts)
        kind = result.kind
        if kind == REOPEN:
            self._remove(slot)
            keyed = flow_key(pkt)
            assert keyed is not None
            return self._new(pkt, keyed[0], keyed[1], now)
        if kind == KILL:
            self._remove(slot)
            self._out.slot = NO_SLOT
            # From the originator the RST is still NEW (no reply yet), as the kernel's ctinfo.
            if direction == ORIGINAL:
                return self._answer(Ct.NEW, "new: RST before any reply (flow removed)")
            return self._answer(Ct.ESTABLISHED, "established: RST before any reply (flow removed)")
        table.store_tcp(slot, conn)
        if kind == INVALID:
            timeout = result.timeout
            if timeout is not None and table.deadline[slot] - now > max(timeout, SHRINK_MIN_REMAINING):
                table.deadline[slot] = now + timeout
            return self._answer(Ct.INVALID, result.reason)
        state = self._state_of(bits, direction)
        if direction == REPLY and not bits & SEEN_REPLY:
            table.bits[slot] = bits | SEEN_REPLY
        if kind != IGNORE and result.timeout is not None:
            table.deadline[slot] = now + result.timeout
        if result.assure and not bits & ASSURED:
            self._assure(slot)
        return state

    def _stateless(self, slot: int, bits: int, direction: int, now: float) -> Tracked:
        table = self.table
        state = self._state_of(bits, direction)
        proto = table.keys[slot][0]  # type: ignore[index]
        if direction == REPLY:
            bits |= SEEN_REPLY
            table.bits[slot] = bits
        if proto == PROTO_UDP:
            if bits & SEEN_REPLY:
                if now > table.created[slot] + UDP_STREAM_AFTER:
                    table.deadline[slot] = now + UDP_REPLIED
                    if not bits & ASSURED:
                        self._assure(slot)
                else:
                    table.deadline[slot] = now + UDP_UNREPLIED
            else:
                table.deadline[slot] = now + UDP_UNREPLIED
        elif proto in (PROTO_ICMP, PROTO_ICMPV6):
            table.deadline[slot] = now + ICMP_TIMEOUT
        else:
            table.deadline[slot] = now + OTHER_TIMEOUT
            if bits & SEEN_REPLY and not bits & ASSURED:
                self._assure(slot)
        return state

    def _icmp_special(self, pkt: Packet) -> Tracked | None:
        """Errors (RELATED or INVALID), untracked ICMPv6 ND/MLD, unknown types; None for queries."""
        kind = pkt.icmp_type
        if pkt.proto == PROTO_ICMP:
            if kind in ICMP_QUERIES or kind in ICMP_REPLIES:
                return None
            if kind in ICMP_ERRORS:
                return self._related(pkt)
            if kind > ICMP_MAX_TYPE:
                return self._answer(Ct.INVALID, f"icmp: unknown type {kind}")
            return self._answer(Ct.INVALID, f"icmp: type {kind} cannot start a flow")
        if kind in ICMPV6_QUERIES or kind in ICMPV6_REPLIES:
            return None
        if kind < 128:
            return self._related(pkt)
        if kind in ICMPV6_UNTRACKED:
            return self._answer(Ct.UNTRACKED, "untracked: icmpv6 neighbour discovery / MLD")
        return self._answer(Ct.INVALID, f"icmpv6: type {kind} cannot start a flow")

    def _related(self, pkt: Packet) -> Tracked:
        inner = pkt.inner
        if inner is None:
            return self._answer(Ct.INVALID, "icmp error: no embedded header")
        keyed = flow_key(inner)
        slot = self._slots.get(keyed[0]) if keyed is not None else None
        if slot is None:
            return self._answer(Ct.INVALID, "icmp error: embedded header matches no flow")
        if pkt.dst != inner.src:
            return self._answer(Ct.INVALID, "icmp error: outer destination is not the flow's endpoint")
        self._out.slot = slot
        return self._answer(Ct.RELATED, "related")

    # -- table management ------------------------------------------------------------------
    def confirm(self, flow: Flow) -> bool:
        """Insert a new flow: the pending one of the last track(), or a detached Flow (made by
        Flow(), or removed from a table: its row is copied in and the handle attached).  Evicts
        a not-ASSURED flow when full (early drop).  False when the table is full of ASSURED
        flows: the packet must be dropped."""
        table = self.table
        if flow._table is table:
            if flow._slot != self._pending:
                raise ValueError("confirm: the flow is not the pending one of the last track()")
            return self.confirm_pending(flow.rule, flow.meta)
        if not self._make_room():
            return False
        slot = table.alloc(b"", False, 0.0)
        table.copy_row(flow._table, flow._slot, slot)
        # A key object of its own: the wheel and the early-drop queue may still hold the old one
        # (a flow removed and confirmed again), and must not take it for this insertion.
        table.keys[slot] = bytes(bytearray(flow.key))
        if flow._table is DETACHED:
            DETACHED.free(flow._slot)
        table.attach(flow, slot)
        self._insert(slot)
        return True

    def restore(self, flow: Flow) -> bool:
        """Insert a flow saved by an earlier run (core.snapshot) as it was, ASSURED or not;
        False when the table is full of ASSURED flows."""
        return self.confirm(flow)  # an ASSURED flow does not join the early-drop list

    def confirm_pending(self, rule: str | None, meta: object) -> bool:
        """Insert the flow the last track() answered NEW for (the engine's accept path)."""
        slot = self._pending
        if slot == NO_SLOT:
            raise ValueError("confirm: no pending flow")
        if not self._make_room():
            return False
        self._pending = NO_SLOT
        table = self.table
        table.rule[slot] = rule
        table.meta[slot] = meta
        self._insert(slot)
        return True

    def _insert(self, slot: int) -> None:
        table = self.table
        key = table.keys[slot]
        assert key is not None
        self._slots[key] = slot
        if not table.bits[slot] & ASSURED:
            unassured = self._unassured
            unassured.append(key)
            if len(unassured) > 2 * len(self._slots) + 64:
                self._sweep_unassured()
        self._wheel.file_at(key, table.deadline[slot])

    def _make_room(self) -> bool:
        return len(self._slots) < self.max_flows or self._early_drop()

    def _unassured_slot(self, key: bytes) -> int | None:
        """The slot of the flow filed under this key object if it is still in the table and not
        ASSURED, else None."""
        slot = self._slots.get(key)
        table = self.table
        if slot is None or table.keys[slot] is not key or table.bits[slot] & ASSURED:
            return None
        return slot

    def _early_drop(self) -> bool:
        unassured = self._unassured
        while unassured:
            slot = self._unassured_slot(unassured.popleft())
            if slot is not None:
                self._remove(slot)
                self.early_drops += 1
                return True
        return False

    def _sweep_unassured(self) -> None:
        self._unassured = deque(key for key in self._unassured if self._unassured_slot(key) is not None)

    def _assure(self, slot: int) -> None:
        self.table.bits[slot] |= ASSURED  # its entry in _unassured is skipped from now on

    def remove(self, flow: Flow) -> None:
        """Take a flow out of the table (its handle keeps the flow's last values)."""
        if flow._table is self.table and self._slots.get(flow.key) == flow._slot:
            self._remove(flow._slot)

    def _remove(self, slot: int) -> None:
        key = self.table.keys[slot]
        assert key is not None
        del self._slots[key]
        self._free(slot)

    def _free(self, slot: int) -> None:
        if slot == self._pending:
            self._pending = NO_SLOT
        self.table.free(slot)

    def _deadline_of(self, key: object) -> float | None:
        slot = self._slots.get(key)  # type: ignore[call-overload]
        if slot is None or self.table.keys[slot] is not key:
            return None  # removed since it was filed
        return self.table.deadline[slot]

    def _expire(self, key: object) -> bool:
        slot = self._slots.get(key)  # type: ignore[call-overload]
        if slot is None or self.table.keys[slot] is not key:
            return False
        self._remove(slot)
        self.expired += 1
        return True

    def expire(self, now: float) -> None:
        """Drop every flow whose deadline has passed (also done lazily by track())."""
        self._wheel.sweep(now, self._expire)

    def clear(self) -> None:
        for slot in list(self._slots.values()):
            self._remove(slot)
        self._unassured.clear()
        if self._pending != NO_SLOT:
            self._free(self._pending)
        self._wheel.clear()
