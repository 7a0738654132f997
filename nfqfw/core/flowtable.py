"""Where tracked flows are stored: one *slot* per flow in parallel columns, and `Flow` handles.

A flow's fields live unboxed in typed arrays indexed by its slot (deadline and creation time as
C doubles, flags as bytes) instead of a Python object per flow, which keeps a flow under 300
bytes (bench/flow_memory.py) and lets the per-packet code read a field with one array index.
Besides the common fields each slot has a *protocol area*, WORDS 32-bit words (`td`) and SMALL
bytes (`small`), laid out by the flow's tracker (core.l4; TCP: l4.tcp); flows whose PROTO_STATE
flag is set use it, the others leave it zero.

Invariants:
- Freed slots are reused; the columns keep their high-water mark, as a dict does. The column
  objects are changed in place and never replaced (the fast path binds them once).
- Code outside conntrack sees `Flow` handles: at most one per flow at a time (made on request,
  remembered weakly), so `is` compares flows. A flow leaving the table has its handle
  *detached*: its values move to a slot of `DETACHED`, a table of flows in no conntrack, so a
  removed flow reads as it was. `Flow(key, orig_a, now)` makes a detached flow (snapshot
  restore); confirming it into a table copies its row in and attaches the handle.
"""

from __future__ import annotations

import weakref
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

from nfqfw.core import l4
from nfqfw.core.l4.base import ASSURED, ORIG_A, PROTO_STATE, SEEN_REPLY, SMALL, STATE_BYTE, WORDS
from nfqfw.core.l4.tcp import load_conn, proxy_fields, store_conn
from nfqfw.core.l4.tcp_conn import TcpConn
from nfqfw.core.packet import PROTO_TCP

NO_SLOT = -1  # no flow

# FlowTable.row(): key, bits, deadline, created, rule, meta, then the protocol area's bytes and
# words (native 32-bit words) when PROTO_STATE is set, else two empty bytes.
Row = tuple[bytes, int, float, float, "str | None", object, bytes, bytes]

_ZERO_WORDS = array("I", bytes(4 * WORDS))
_ZERO_SMALL = bytes(SMALL)


class FlowTable:
    """The columns of the flows, one slot each: keys[s], deadline[s], created[s], bits[s] (flow
    flags, l4.base), rule[s], meta[s], and the protocol area td[s*WORDS : (s+1)*WORDS],
    small[s*SMALL : (s+1)*SMALL]. Conntrack allocates and frees slots; `Flow` handles read and
    write them for everyone else."""

    __slots__ = (
        "_free",
        "_ref_slots",
        "bits",
        "created",
        "deadline",
        "handles",
        "keys",
        "meta",
        "rule",
        "small",
        "td",
    )

    def __init__(self) -> None:
        self.keys: list[bytes | None] = []
        self.deadline = array("d")
        self.created = array("d")
        self.bits = bytearray()
        self.rule: list[str | None] = []  # what admitted the flow: "rule mail" / "default egress"
        self.meta: list[object] = []  # the Meta of the first packet (interned by the adapter)
        self.td = array("I")  # protocol words, WORDS per slot (TCP: the l4.tcp_window layout)
        self.small = bytearray()  # protocol bytes, SMALL per slot (TCP: l4.tcp's)
        # The live Flow handle of a slot, if one is in use (weakly: handles made for a listing
        # or a snapshot must not stay with every flow).
        self.handles: dict[int, weakref.ref[Flow]] = {}
        self._ref_slots: dict[weakref.ref[Flow], int] = {}
        self._free: list[int] = []

    def alloc(self, key: bytes, orig_a: bool, now: float) -> int:
        """A slot for a new flow: no protocol state, not replied, deadline = created = now."""
        bits = ORIG_A if orig_a else 0
        free = self._free
        if free:
            slot = free.pop()
            self.keys[slot] = key
            self.deadline[slot] = now
            self.created[slot] = now
            self.bits[slot] = bits
            return slot
        slot = len(self.keys)
        self.keys.append(key)
        self.deadline.append(now)
        self.created.append(now)
        self.bits.append(bits)
        self.rule.append(None)
        self.meta.append(None)
        self.td.extend(_ZERO_WORDS)
        self.small.extend(_ZERO_SMALL)
        return slot

    def free(self, slot: int) -> None:
        """Give the slot back; a handle on it is detached first (keeps the flow's values)."""
        if self.handles:
            ref = self.handles.pop(slot, None)
            handle = ref() if ref is not None else None
            if handle is not None:
                handle._detach()
        self.keys[slot] = None
        self.rule[slot] = None
        self.meta[slot] = None
        if self.bits[slot] & PROTO_STATE:
            base = slot * WORDS
            self.td[base : base + WORDS] = _ZERO_WORDS
            start = slot * SMALL
            self.small[start : start + SMALL] = _ZERO_SMALL
        self._free.append(slot)

    def handle(self, slot: int) -> Flow:
        """The Flow handle of a slot (one per flow while in use, so `is` compares flows)."""
        ref = self.handles.get(slot)
        handle = ref() if ref is not None else None
        if handle is None:
            handle = Flow.__new__(Flow)
            self.attach(handle, slot)
        return handle

    def attach(self, handle: Flow, slot: int) -> None:
        """Make `handle` the handle of this table's `slot`."""
        handle._table, handle._slot = self, slot
        ref = weakref.ref(handle, self._forget)
        self.handles[slot] = ref
        self._ref_slots[ref] = slot

    def _forget(self, ref: weakref.ref[Flow]) -> None:
        """A handle died: forget it, unless its slot has another handle by now."""
        slot = self._ref_slots.pop(ref, NO_SLOT)
        if self.handles.get(slot) is ref:
            del self.handles[slot]

    def copy_row(self, source: FlowTable, slot: int, into: int) -> None:
        """Copy every field of `source`'s slot into this table's slot `into`."""
        self.keys[into] = source.keys[slot]
        self.deadline[into] = source.deadline[slot]
        self.created[into] = source.created[slot]
        self.bits[into] = source.bits[slot]
        self.rule[into] = source.rule[slot]
        self.meta[into] = source.meta[slot]
        base, to = slot * WORDS, into * WORDS
        self.td[to : to + WORDS] = source.td[base : base + WORDS]
        start, at = slot * SMALL, into * SMALL
        self.small[at : at + SMALL] = source.small[start : start + SMALL]

    def row(self, slot: int) -> Row:
        """Every field of a slot at once (snapshots), as `Row` says."""
        return next(self.rows((slot,)))

    def rows(self, slots: Iterable[int]) -> Iterator[Row]:
        """row() of many slots, one at a time (a snapshot of the whole table makes no list of
        65k tuples for the garbage collector to walk)."""
        keys, bits, deadline, created, rule, meta = (
            self.keys,
            self.bits,
            self.deadline,
            self.created,
            self.rule,
            self.meta,
        )
        small, td = self.small, self.td
        return (
            (
                keys[slot],  # type: ignore[misc]
                bits[slot],
                deadline[slot],
                created[slot],
                rule[slot],
                meta[slot],
                bytes(small[slot * SMALL : slot * SMALL + SMALL]) if bits[slot] & PROTO_STATE else b"",
                td[slot * WORDS : slot * WORDS + WORDS].tobytes() if bits[slot] & PROTO_STATE else b"",
            )
            for slot in slots
        )

    def set_row(self, slot: int, row: Row) -> None:
        """Write every field of a slot (the inverse of row(); empty protocol parts leave them
        zero, shorter ones fill the area's start)."""
        key, bits, deadline, created, rule, meta, area_small, words = row
        self.keys[slot] = key
        self.bits[slot] = bits
        self.deadline[slot] = deadline
        self.created[slot] = created
        self.rule[slot] = rule
        self.meta[slot] = meta
        if area_small:
            if len(area_small) > SMALL:
                raise ValueError(f"{len(area_small)} protocol bytes, a flow has {SMALL}")
            at = slot * SMALL
            self.small[at : at + len(area_small)] = area_small
        if words:
            base = slot * WORDS
            self.td[base : base + WORDS] = array("I", words)


# Where detached flows keep their values: flows made by Flow() before they are confirmed into a
# table, and flows removed from a table while someone still holds their handle.
DETACHED = FlowTable()


def _flag(bit: int, doc: str) -> property:
    def get(self: Flow) -> bool:
        return bool(self._table.bits[self._slot] & bit)

    def set_(self: Flow, value: bool) -> None:
        bits = self._table.bits
        bits[self._slot] = bits[self._slot] | bit if value else bits[self._slot] & ~bit

    return property(get, set_, doc=doc)


def _column(name: str, doc: str) -> property:
    """A Flow field kept in the FlowTable column of that name."""

    def get(self: Flow) -> Any:
        return getattr(self._table, name)[self._slot]

    def set_(self: Flow, value: Any) -> None:
        getattr(self._table, name)[self._slot] = value

    return property(get, set_, doc=doc)


class Flow:
    """One tracked connection: a handle on its slot.  Fields read and write the table."""

    __slots__ = ("__weakref__", "_slot", "_table")

    _table: FlowTable
    _slot: int

    def __init__(self, key: bytes, orig_a: bool, now: float) -> None:
        """A detached flow (not in any conntrack table yet), created at `now`."""
        self._table = DETACHED
        self._slot = DETACHED.alloc(key, orig_a, now)

    @classmethod
    def from_row(cls, row: Row) -> Flow:
        """A detached flow holding `row` (FlowTable.row's layout)."""
        flow = cls.__new__(cls)
        flow._table = DETACHED
        flow._slot = DETACHED.alloc(b"", False, 0.0)
        DETACHED.set_row(flow._slot, row)
        return flow

    def _detach(self) -> None:
        """Move the flow's values to a slot of its own (its slot in the table is being freed)."""
        slot = DETACHED.alloc(b"", False, 0.0)
        DETACHED.copy_row(self._table, self._slot, slot)
        self._table, self._slot = DETACHED, slot

    def __del__(self) -> None:
        if self._table is DETACHED:
            DETACHED.free(self._slot)

    orig_a = _flag(ORIG_A, "True when the originator's endpoint sorts first in the key")
    assured = _flag(ASSURED, "ASSURED: kept when the table is full (no early drop)")
    seen_reply = _flag(SEEN_REPLY, "a REPLY-direction packet was accepted")

    def row(self) -> Row:
        """Every field at once (see FlowTable.row)."""
        return self._table.row(self._slot)

    @property
    def key(self) -> bytes:
        key = self._table.keys[self._slot]
        assert key is not None
        return key

    deadline = _column("deadline", "When the flow expires (the conntrack clock, seconds)")
    created = _column("created", "When the flow's first packet was seen")
    rule = _column("rule", 'What admitted the flow: "rule mail" / "default egress"')
    meta = _column("meta", "The Meta of the flow's first packet")

    @property
    def tcp(self) -> TcpConn | None:
        """A copy of the TCP state (None for other protocols); assign a TcpConn to change it."""
        if not self._table.bits[self._slot] & PROTO_STATE or self.key[0] != PROTO_TCP:
            return None
        return load_conn(self._table, self._slot)

    @tcp.setter
    def tcp(self, conn: TcpConn) -> None:
        store_conn(self._table, self._slot, conn)
        self._table.bits[self._slot] |= PROTO_STATE

    @property
    def synproxy(self) -> tuple[str, int] | None:
        """A TCP connection the kernel's SYN proxy opened: ("cookie", the proxy's ISN) until the
        server answered, then ("offset", what the client's acknowledgements are shifted back
        by); None for any other flow (l4.tcp)."""
        return proxy_fields(self._table, self._slot)

    @property
    def proto(self) -> int:
        return self.key[0]

    @property
    def state_name(self) -> str:
        """The flow's state as `nfqfw flows` shows it (its tracker's l4 state_name)."""
        table, slot = self._table, self._slot
        return l4.state_name(self.key[0], table.bits[slot], table.small[slot * SMALL + STATE_BYTE])

    def __repr__(self) -> str:
        return f"<Flow proto={self.proto} {self.state_name} deadline={self.deadline:.1f}>"
