"""Connection tracking: the bounded table of flows and the per-packet lookup; the protocol
work is the trackers' (core.l4), found by protocol number.

Invariants:
- Flow keys are `bytes` built from raw header fields (protocol number first, the rest laid out
  by the protocol's tracker), so Python's per-process randomised bytes hash protects the table
  against hash flooding.
- A flow enters the table (`_slots`) only when confirmed, once the policy accepted its first
  packet, as the kernel confirms only accepted conntracks; the pending flow of one track() is
  freed by the next unless confirmed.
- The table holds at most `max_flows`; a new flow evicts the oldest not-ASSURED one when full
  (early drop), and is refused when every flow is ASSURED.
- A flow past its deadline is never answered for: expiry is ordered and lazy (core.expiry),
  and track() drops an expired flow it meets.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from nfqfw.core import l4
from nfqfw.core.expiry import ExpiryWheel
from nfqfw.core.flowtable import DETACHED, NO_SLOT, Flow, FlowTable, Row
from nfqfw.core.l4.base import ASSURED, ORIG_A, ORIGINAL, PROTO_STATE, REPLY, SEEN_REPLY, SMALL, STATE_BYTE
from nfqfw.core.l4.tcp_states import KERNEL_TIMEOUTS
from nfqfw.core.packet import FRAG_LATER, Packet
from nfqfw.core.verdict import Ct

DEFAULT_MAX_FLOWS = 65536  # the bound when the policy sets no max-flows
WHEEL_SLACK = 1024  # dead expiry entries tolerated beyond the live ones before a compaction

_CENSUS_BITS = PROTO_STATE | ASSURED | SEEN_REPLY  # what the trackers' state names read of a flow's flags


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


def first_packet(flow: Flow) -> Packet | None:
    """The originator's first packet, as far as the policy looks at it; None for a malformed key."""
    return l4.first_packet(flow.key, flow.orig_a)


class TableView(NamedTuple):
    """What a fast path (core.fastpath) binds once to track packets without track(): the
    objects are changed in place and never replaced, clear() included, so they stay valid for
    the Conntrack's life. A fast path may only update flows that track() would update the same
    way, and must step aside (leave it to track()) when `expiry_due[0] <= now`."""

    slot_of: Callable[[bytes], int | None]  # key -> slot of a confirmed flow, else None
    expiry_due: Sequence[int]  # heap of seconds with flows filed to expire; [0] is the next sweep
    table: FlowTable  # the columns of the flows


class Conntrack:
    """The flow table of one engine. `track(pkt, now)` classifies a packet (NEW, ESTABLISHED,
    RELATED, INVALID, UNTRACKED) and updates its flow; `confirm_pending()` inserts the new flow
    of the last track() once the policy accepted its first packet.

    Flows live in `table` (core.flowtable), one slot each; `_slots` maps a flow key to its slot.
    A new flow gets a slot at once (its *pending* slot) and is entered in `_slots` on
    confirmation; a pending flow not confirmed before the next track() is freed.

    The protocol work is done by this table's trackers (core.l4, one instance of each, bound
    to it); they use the services in the "for the trackers" section below. `loose` (TCP
    mid-stream pick-up) and `tcp_timeouts` are their configuration."""

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
        # old entry is recognised (the slot's key is not the filed object) and skipped. Entries
        # of flows removed early are compacted away once they outnumber the live flows
        # (WHEEL_SLACK), so memory follows max_flows, not the rate of new flows x their timeout.
        self._wheel = ExpiryWheel(self._deadline_of)
        self._out = Tracked(self.table)
        self._trackers = l4.bind(self)  # by protocol number
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

    @property
    def expiry_entries(self) -> int:
        """Entries in the expiry wheel, those of flows removed early included: at most
        2 x len(self) + WHEEL_SLACK (the memory bound under churn)."""
        return self._wheel.filed

    def view(self) -> TableView:
        """The table as a fast path binds it (see TableView)."""
        return TableView(self._slots.get, self._wheel.due, self.table)

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
                raw[(key[0], flags, small[slot * SMALL + STATE_BYTE] if flags & PROTO_STATE else 0)] += 1
        named: Counter[tuple[int, str]] = Counter()
        for (proto, flags, state), count in raw.items():
            named[(proto, l4.state_name(proto, flags, state))] += count
        return named

    def get(self, key: bytes) -> Flow | None:
        slot = self._slots.get(key)
        return None if slot is None else self.table.handle(slot)

    # -- per packet ------------------------------------------------------------------------
    def track(self, pkt: Packet, now: float) -> Tracked:
        """The conntrack answer for one packet (the Tracked object is reused by the next call)."""
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
            return self.answer(Ct.UNTRACKED, "untracked: non-first fragment")
        tracker = self._trackers[pkt.proto]
        keyed = tracker.key(pkt)
        if keyed is None:  # no flow of its own: an ICMP error, an untracked or invalid type
            return tracker.error(pkt)
        key, is_a = keyed
        table = self.table
        slot = self._slots.get(key)
        if slot is not None and table.deadline[slot] <= now:
            self._remove(slot)
            self.expired += 1
            slot = None
        if slot is None:
            return tracker.new(pkt, key, is_a, now)
        bits = table.bits[slot]
        if tracker.direction_by_key:
            direction = ORIGINAL if is_a else REPLY
        else:
            direction = ORIGINAL if is_a == bool(bits & ORIG_A) else REPLY
        out.slot = slot
        out.direction = direction
        return tracker.packet(slot, bits, pkt, direction, now)

    # -- for the trackers (core.l4) --------------------------------------------------------
    def answer(self, ct: Ct, reason: str) -> Tracked:
        """The answer for the packet at hand, its flow (slot, direction) as track() found it."""
        out = self._out
        out.ct = ct
        out.reason = reason
        return out

    def ctinfo(self, bits: int, direction: int) -> Tracked:
        """The answer for a packet of a known flow with flags `bits`, as the kernel's ctinfo:
        before any reply, the originator's packets are still NEW; else ESTABLISHED."""
        if direction == ORIGINAL and not bits & SEEN_REPLY:
            return self.answer(Ct.NEW, "new")
        return self.answer(Ct.ESTABLISHED, "established")

    def open(self, key: bytes, is_a: bool, now: float, timeout: float) -> Tracked:
        """A new flow for the packet at hand, expiring `timeout` seconds from `now`: its slot is
        pending until confirm_pending(). The answer is NEW with the slot."""
        table = self.table
        slot = self._pending = table.alloc(key, is_a, now)
        table.deadline[slot] = now + timeout
        out = self._out
        out.slot = slot
        out.new = True
        out.direction = ORIGINAL
        return self.answer(Ct.NEW, "new")

    def assure(self, slot: int) -> None:
        """Mark the flow ASSURED: it is no longer evicted when the table is full."""
        self.table.bits[slot] |= ASSURED  # its entry in _unassured is skipped from now on

    def kill(self, slot: int) -> None:
        """Remove the flow of the packet at hand; the answer then has no flow."""
        self._remove(slot)
        self._out.slot = NO_SLOT

    def reopen(self, slot: int, pkt: Packet, now: float) -> Tracked:
        """Remove the flow and track the packet as the first of a new one (TCP: a SYN reusing
        the tuple of a closed connection)."""
        self._remove(slot)
        tracker = self._trackers[pkt.proto]
        keyed = tracker.key(pkt)
        assert keyed is not None
        return tracker.new(pkt, keyed[0], keyed[1], now)

    def lookup(self, pkt: Packet) -> int | None:
        """The slot of the confirmed flow `pkt` belongs to (ICMP errors: the header they quote)."""
        keyed = self._trackers[pkt.proto].key(pkt)
        return self._slots.get(keyed[0]) if keyed is not None else None

    def starts_flow(self, pkt: Packet) -> bool:
        """Could `pkt`, with no flow in the table, start one? (Its tracker's say; no state is
        touched. A later fragment never does: the kernel tracks whole datagrams.)"""
        return pkt.frag != FRAG_LATER and self._trackers[pkt.proto].starts_flow(pkt)

    def own_error(self, pkt: Packet) -> Tracked:
        """The answer for an ICMP error the gateway itself sent (l4.icmp IcmpTracker.own_error);
        the engine asks for it instead of track()'s INVALID on the OUTPUT hook."""
        out = self._out
        out.slot = NO_SLOT
        out.new = False
        out.direction = ORIGINAL
        return self._trackers[pkt.proto].own_error(pkt)

    def related(self, slot: int) -> Tracked:
        """RELATED to the flow in `slot` (an ICMP error about it)."""
        self._out.slot = slot
        return self.answer(Ct.RELATED, "related")

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
        wheel = self._wheel
        wheel.file_at(key, table.deadline[slot])
        if wheel.filed > 2 * len(self._slots) + WHEEL_SLACK:
            wheel.compact({id(key) for key in self._slots})

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
