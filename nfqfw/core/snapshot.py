"""Flow-table snapshots: the tracked flows as bytes and back, so a restart keeps connections.

Pure: no files and no clock. Both sides are handed `now` (the daemon's monotonic clock, the one
flow deadlines are kept in) and `wall` (seconds since the epoch). A snapshot stores each flow's
remaining time and age as of the save and the wall-clock time of the save; a restore takes off
the wall-clock time that passed since and rebases both onto the new process's monotonic clock.
Flows whose time ran out meanwhile are not restored.

A snapshot is EXACT when nothing can have passed the gateway unseen since it was taken: the
daemon takes one at a stop, after its last packet, with the kernel dropping traffic until the
next start (failure-mode closed). The others -- periodic ones, or one taken before a stop in
failure-mode open -- may be behind the connections by up to a snapshot interval of traffic,
far more than a TCP window. Their TCP flows are restored with their sequence numbers
forgotten: each direction learns its window anew from its next packet, and the checks are
liberal, as the kernel does for a connection it picked up mid-stream (only an RST must still
be in window). State, options (window scale, SACK), ASSURED and timeouts are kept. A
connection the kernel's SYN proxy opened is always saved so: its sequence offset (l4.tcp) is
not in the format, and without it the client's acknowledgements would look out of window.

Only `_encode_flow` and `_words_of` (writing), `_Decoder.flow`, `_decode_tcp` and
`_relearn_windows` (reading) know the layout of a flow (core.flowtable's rows: the format's
flags are the table's own, its TCP head and words the TCP protocol area's, l4.tcp): a change of
that layout changes them, not the format (tests/unit/core/test_snapshot.py checks every field
both ways).

Format, version 1, little-endian:

  header  magic b"NFQFWFT\\0" (8), version u16, reserved u16 (0), body length u64,
          SHA-256 of the body (32 bytes)
  body    saved_at f64 (wall clock), flags u32 (EXACT), string count u32, strings (u16
          length + UTF-8 each), flow count u32, the flows
  flow    key length u8, key (its tracker's layout, core.l4), flags u8 (ORIG_A, ASSURED,
          SEEN_REPLY, TCP), remaining f64 (deadline - now), age f64 (now - created),
          rule u32, hook u8 (0: no Meta; + FORWARDED_BIT 0x80: Meta.forwarded, the flow one of
          the policy's forwards translated), in_iface u32, out_iface u32 (string indexes,
          NO_STRING for None)
  + TCP   state, last_index, last_dir, last_flags, last_wscale, retrans, assured: u8 each;
          per direction (ORIGINAL, then REPLY) td_end, td_maxend, td_maxwin, td_maxack,
          td_scale, flags: u32 each; then last_seq, last_ack, last_end, last_win: u32 each
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nfqfw.core.conntrack import Conntrack, Flow, first_packet
from nfqfw.core.flowtable import Row
from nfqfw.core.l4 import base as l4_base
from nfqfw.core.l4 import tcp
from nfqfw.core.l4 import tcp_window as window
from nfqfw.core.l4.icmp import ICMP_QUERIES, ICMPV6_QUERIES
from nfqfw.core.l4.tcp_states import STATE_COUNT, FlagClass, sNO
from nfqfw.core.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP
from nfqfw.core.verdict import Hook, Meta

MAGIC = b"NFQFWFT\0"
FORWARDED_BIT = 0x80  # in a flow's hook byte: Meta.forwarded
VERSION = 1
NO_STRING = 0xFFFFFFFF

EXACT = 0x01  # snapshot flag: taken at a stop while traffic was blocked
ORIG_A, ASSURED, SEEN_REPLY, TCP = 0x01, 0x02, 0x04, 0x08  # flow flags
# The format's flow flags are the flow table's own (l4.base; TCP: the TCP flow's PROTO_STATE), its
# TCP head the first bytes of a TCP flow's protocol area (l4.tcp): copied as they are.
assert (ORIG_A, ASSURED, SEEN_REPLY, TCP) == (
    l4_base.ORIG_A,
    l4_base.ASSURED,
    l4_base.SEEN_REPLY,
    l4_base.PROTO_STATE,
)
assert (tcp.STATE, tcp.LAST_INDEX, tcp.LAST_DIR, tcp.LAST_FLAGS) == (0, 1, 2, 3)
assert (tcp.LAST_WSCALE, tcp.RETRANS, tcp.TCP_ASSURED) == (4, 5, 6)
_KNOWN_FLAGS = ORIG_A | ASSURED | SEEN_REPLY | TCP

_HEADER = struct.Struct("<8sHHQ32s")
_BODY_HEAD = struct.Struct("<dII")
_U8, _U16, _U32 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I")
_FLOW = struct.Struct("<BddIBII")
_TCP_HEAD = struct.Struct("<7B")
_WORDS = struct.Struct("<16I")
# The window words in the format's order: td offsets of ORIGINAL's block, REPLY's, last packet.
_TD_ORDER = (
    *(
        base + word
        for base in (0, window.SIDE)
        for word in (window.END, window.MAXEND, window.MAXWIN, window.MAXACK, window.SCALE, window.FLAGS)
    ),
    window.LAST_SEQ,
    window.LAST_ACK,
    window.LAST_END,
    window.LAST_WIN,
)
_SCALE_WORDS = (window.SCALE, window.SIDE + window.SCALE)
# The window words are kept in the format's order, as little-endian 32-bit words: copied whole.
_TD_AS_STORED = (
    tuple(range(window.WORDS)) == _TD_ORDER and sys.byteorder == "little" and array("I").itemsize == 4
)
_HOOKS = {int(hook): hook for hook in Hook}


_FLAG_CLASSES = len(FlagClass)


class SnapshotError(ValueError):
    """The bytes are no snapshot this nfqfw can restore; str() says why, in a few words."""


@dataclass
class Restored:
    """What decode() found: the flows still alive, rebased onto the caller's clock."""

    flows: list[Flow]
    exact: bool  # False: the TCP flows' windows are learnt anew (see the module's docstring)
    saved_at: float  # wall-clock time of the save
    elapsed: float  # wall-clock seconds from the save to `wall` (0 when the clock went back)
    expired: int  # flows whose time ran out since the save (not in `flows`)
    clock_went_back: bool = False


@dataclass
class Installed:
    """What install() did with the restored flows."""

    restored: int = 0
    table_full: int = 0  # did not fit: the table was full of ASSURED flows


# -- flows -> bytes ------------------------------------------------------------------------------


def encode(flows: Iterable[Flow], now: float, wall: float, exact: bool = False) -> bytes:
    """A snapshot of `flows` taken at monotonic `now`, wall-clock `wall`; `exact` only when no
    packet can pass unseen before it is restored. Flows already past their deadline (the table
    sweeps lazily) are left out."""
    return _encode_rows([flow.row() for flow in flows], now, wall, exact)[0]


def encode_table(conntrack: Conntrack, now: float, wall: float, exact: bool = False) -> tuple[bytes, int]:
    """As encode() over every flow of `conntrack`, read straight from its table (no Flow
    handles: this runs between two packets); also returns how many flows it holds."""
    return _encode_rows(conntrack.rows(), now, wall, exact)


def _encode_rows(rows: Iterable[Row], now: float, wall: float, exact: bool) -> tuple[bytes, int]:
    strings = _Strings()
    parts = _encoded(rows, now, strings)
    return _assemble(parts, strings, wall, exact), len(parts)


def _encoded(rows: Iterable[Row], now: float, strings: _Strings) -> list[bytes]:
    """The rows of the flows still alive at `now` (row[2]: deadline), each in the format."""
    encode_flow = _encode_flow
    return [encode_flow(row, now, strings) for row in rows if row[2] > now]


class TableEncoder:
    """encode_table() a slice at a time, for a periodic snapshot of a big table taken between
    packets without one long pause (65k flows take ~0.1 s at once).

    The flows are those in the table at `now`, each read as it is when its slice comes (so the
    snapshot is never exact: packets pass between slices). A flow removed before its slice is
    left out; a slot reused meanwhile gives the flow now in it. A flow removed and tracked
    again under the same key may be read twice; install() keeps the first."""

    def __init__(self, conntrack: Conntrack, now: float, wall: float) -> None:
        self._table = conntrack.table
        self._slots = conntrack.slots()
        self._next = 0
        self._now, self._wall = now, wall
        self._strings = _Strings()
        self._parts: list[bytes] = []

    def step(self, flows: int) -> bool:
        """Encode up to `flows` more flows; True when every flow is done."""
        keys, slots = self._table.keys, self._slots[self._next : self._next + flows]
        self._next += len(slots)
        live = [slot for slot in slots if keys[slot] is not None]
        self._parts += _encoded(self._table.rows(live), self._now, self._strings)
        return self._next >= len(self._slots)

    def result(self) -> tuple[bytes, int]:
        """The snapshot and how many flows it holds (after the last step())."""
        return _assemble(self._parts, self._strings, self._wall, False), len(self._parts)


def _assemble(parts: list[bytes], strings: _Strings, wall: float, exact: bool) -> bytes:
    """Header, string table and the encoded flows."""
    table = b"".join(_U16.pack(len(raw)) + raw for raw in (text.encode() for text in strings.index))
    head = _BODY_HEAD.pack(wall, EXACT if exact else 0, len(strings.index))
    body = b"".join((head, table, _U32.pack(len(parts)), *parts))
    return _HEADER.pack(MAGIC, VERSION, 0, len(body), hashlib.sha256(body).digest()) + body


class _Strings:
    """The string table being built: text -> index, and each Meta's three numbers (by identity:
    the adapter interns Metas, so a table has a handful of them)."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        # id -> (the Meta, its numbers): holding the Meta keeps its id from being reused by
        # another one while a TableEncoder's slices are apart
        self._metas: dict[int, tuple[object, tuple[int, int, int]]] = {}

    def of(self, text: str | None) -> int:
        if text is None:
            return NO_STRING
        found = self.index.get(text)
        if found is None:
            found = self.index[text] = len(self.index)
        return found

    def meta(self, meta: object) -> tuple[int, int, int]:
        known = self._metas.get(id(meta))
        if known is not None:
            return known[1]
        if isinstance(meta, Meta):
            hook = int(meta.hook) | (FORWARDED_BIT if meta.forwarded else 0)
            numbers = (hook, self.of(meta.in_iface), self.of(meta.out_iface))
        else:
            numbers = (0, NO_STRING, NO_STRING)
        self._metas[id(meta)] = (meta, numbers)
        return numbers


def _encode_flow(row: Row, now: float, strings: _Strings) -> bytes:
    key, bits, deadline, created, rule, meta, area_small, words = row
    hook, in_iface, out_iface = strings.meta(meta)
    head = _FLOW.pack(
        bits & _KNOWN_FLAGS, deadline - now, now - created, strings.of(rule), hook, in_iface, out_iface
    )
    if not bits & TCP:
        return b"".join((bytes((len(key),)), key, head))
    if bits & l4_base.SEQ_ADJUST:  # the offset is not saved: windows relearnt (module docstring)
        td = array("I", words)
        _relearn_windows(td)
        words = td.tobytes()
    if not _TD_AS_STORED:
        words = _words_of(array("I", words))
    # + state, last_index, last_dir, last_flags, last_wscale, retrans, assured; the window words
    return b"".join((bytes((len(key),)), key, head, area_small[: _TCP_HEAD.size], words))


def _words_of(td: array[int]) -> bytes:
    return _WORDS.pack(*(td[i] for i in _TD_ORDER))


# -- bytes -> flows ------------------------------------------------------------------------------


def decode(data: bytes, now: float, wall: float, trust_exact: bool = True) -> Restored:
    """The live flows of a snapshot, their deadlines and creation times on the monotonic clock
    of `now`, less the wall-clock time from the save to `wall`. Raises SnapshotError for
    anything but an intact snapshot of this version: all of it is restored, or none.
    `trust_exact=False` restores an exact snapshot as if it were not (its TCP windows learnt
    anew): for a caller that knows some of its flows may be stale copies."""
    body = _checked_body(data)
    try:
        return _decode_body(_Reader(body), now, wall, trust_exact)
    except SnapshotError as err:
        raise SnapshotError(f"corrupt: {err}") from None


def _decode_body(reader: _Reader, now: float, wall: float, trust_exact: bool) -> Restored:
    saved_at, flags, string_count = reader.take(_BODY_HEAD)
    if not math.isfinite(saved_at):
        raise SnapshotError("the save time is not a number")
    if flags & ~EXACT:
        raise SnapshotError(f"unknown snapshot flags 0x{flags:x}")
    exact = bool(flags & EXACT) and trust_exact
    strings = [reader.string() for _ in range(string_count)]
    elapsed = wall - saved_at
    went_back = elapsed < 0  # the wall clock was set back: count no time as passed
    elapsed = max(0.0, elapsed)
    decoder = _Decoder(strings, now, elapsed, exact)
    flows: list[Flow] = []
    seen: set[bytes] = set()
    expired = 0
    (count,) = reader.take(_U32)
    for number in range(1, count + 1):
        try:
            flow, remaining = decoder.flow(reader)
        except SnapshotError as err:
            raise SnapshotError(f"flow {number}: {err}") from None
        if flow.key in seen:
            raise SnapshotError(f"flow {number}: the same key twice")
        seen.add(flow.key)
        if remaining <= 0:
            expired += 1
            continue
        flows.append(flow)
    if reader.left:
        raise SnapshotError(f"{reader.left} bytes after the last flow")
    return Restored(flows, exact, saved_at, elapsed, expired, went_back)


def _checked_body(data: bytes) -> bytes:
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise SnapshotError("not an nfqfw flow snapshot")
    if len(data) < _HEADER.size:
        raise SnapshotError(f"truncated: {len(data)} bytes, the header alone has {_HEADER.size}")
    _, version, _, length, digest = _HEADER.unpack_from(data)
    if version != VERSION:
        newer = "newer than this nfqfw reads" if version > VERSION else "unknown to this nfqfw"
        raise SnapshotError(f"format version {version} is {newer} (it reads version {VERSION})")
    body = data[_HEADER.size :]
    if len(body) < length:
        raise SnapshotError(f"truncated: {len(body)} of {length} bytes after the header")
    if len(body) > length:
        raise SnapshotError(f"{len(body) - length} bytes after the end of the snapshot")
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotError("checksum mismatch")
    return body


class _Reader:
    """Reads the body front to back; running off its end is a SnapshotError, never an IndexError."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.at = 0

    @property
    def left(self) -> int:
        return len(self.body) - self.at

    def take(self, layout: struct.Struct) -> tuple[Any, ...]:
        try:
            values = layout.unpack_from(self.body, self.at)
        except struct.error:
            raise SnapshotError("runs past the end of the snapshot") from None
        self.at += layout.size
        return values

    def raw(self, size: int) -> bytes:
        end = self.at + size
        if end > len(self.body):
            raise SnapshotError("runs past the end of the snapshot")
        chunk = self.body[self.at : end]
        self.at = end
        return chunk

    def string(self) -> str:
        (size,) = self.take(_U16)
        try:
            return self.raw(size).decode()
        except UnicodeDecodeError:
            raise SnapshotError("a string is not UTF-8") from None


class _Decoder:
    """What the flow records refer to: the string table, and Metas and key checks already done."""

    def __init__(self, strings: list[str], now: float, elapsed: float, exact: bool) -> None:
        self.strings = strings
        self.now = now
        self.elapsed = elapsed
        self.exact = exact
        self._metas: dict[tuple[int, int, int], Meta | None] = {}
        self._key_forms: set[tuple[int, int, int]] = set()

    def flow(self, reader: _Reader) -> tuple[Flow, float]:
        """One flow record, and its remaining time at `now` (<= 0: it ran out)."""
        (key_len,) = reader.take(_U8)
        key = reader.raw(key_len)
        flags, remaining, age, rule, hook, in_iface, out_iface = reader.take(_FLOW)
        if flags & ~_KNOWN_FLAGS:
            raise SnapshotError(f"unknown flags 0x{flags:02x}")
        if not (math.isfinite(remaining) and math.isfinite(age)):
            raise SnapshotError("a time is not a number")
        now, elapsed = self.now, self.elapsed
        remaining -= elapsed
        is_tcp = key[0] == PROTO_TCP if key else False
        if bool(flags & TCP) != is_tcp:
            raise SnapshotError("TCP state on a non-TCP flow" if not is_tcp else "TCP flow without TCP state")
        tcp_small, words = b"", b""
        if is_tcp:
            tcp_small, words = _decode_tcp(reader.take(_TCP_HEAD), reader.raw(_WORDS.size), self.exact)
        flow = Flow.from_row(
            (
                key,
                flags,
                now + remaining,  # deadline
                now - max(0.0, age) - elapsed,  # created
                self.string(rule),
                self.meta(hook, in_iface, out_iface),
                tcp_small,
                words,
            )
        )
        self.check_key(flow)
        return flow, remaining

    def string(self, index: int) -> str | None:
        if index == NO_STRING:
            return None
        if index >= len(self.strings):
            raise SnapshotError(f"string {index} of {len(self.strings)}")
        return self.strings[index]

    def meta(self, hook: int, in_iface: int, out_iface: int) -> Meta | None:
        """The first packet's Meta, one object per distinct value (as the adapter interns them)."""
        numbers = (hook, in_iface, out_iface)
        if numbers in self._metas:
            return self._metas[numbers]
        meta = None
        if hook != 0:
            forwarded = bool(hook & FORWARDED_BIT)
            if hook & ~FORWARDED_BIT not in _HOOKS:
                raise SnapshotError(f"unknown hook {hook}")
            meta = Meta(
                _HOOKS[hook & ~FORWARDED_BIT],
                self.string(in_iface),
                self.string(out_iface),
                forwarded=forwarded,
            )
        self._metas[numbers] = meta
        return meta

    def check_key(self, flow: Flow) -> None:
        """A key conntrack can read back; the answer depends on the protocol, the length and
        (ICMP) the type only, so each form is checked once."""
        key = flow.key
        if not key:
            raise SnapshotError("malformed flow key")
        form = (key[0], len(key), key[1] if key[0] in (PROTO_ICMP, PROTO_ICMPV6) else 0)
        if form in self._key_forms:
            return
        if first_packet(flow) is None:
            raise SnapshotError("malformed flow key")
        queries = {PROTO_ICMP: ICMP_QUERIES, PROTO_ICMPV6: ICMPV6_QUERIES}.get(key[0])
        if queries is not None and key[1] not in queries:
            raise SnapshotError(f"ICMP flow of type {key[1]}, not a query")
        self._key_forms.add(form)


def _decode_tcp(head: tuple[int, ...], raw: bytes, exact: bool) -> tuple[bytes, bytes]:
    """The flow table's small TCP fields and TCP words (native order) of a TCP record."""
    state, last_index, last_dir, last_flags, last_wscale, retrans, assured = head
    if not sNO < state < STATE_COUNT:
        raise SnapshotError(f"TCP state {state} out of range")
    if last_index >= _FLAG_CLASSES or last_dir > 1:
        raise SnapshotError("TCP last packet record out of range")
    td = array("I", raw) if _TD_AS_STORED else _ordered_words(raw)
    for offset in _SCALE_WORDS:
        if td[offset] > window.MAX_WSCALE:
            raise SnapshotError(f"TCP window scale {td[offset]} out of range")
    if not exact:
        _relearn_windows(td)
        retrans = 0
    last_wscale = min(last_wscale, window.MAX_WSCALE)
    small = bytes((state, last_index, last_dir, last_flags, last_wscale, retrans, 1 if assured else 0))
    return small, td.tobytes()


def _ordered_words(raw: bytes) -> array[int]:
    td = array("I", bytes(4 * window.WORDS))
    for offset, value in zip(_TD_ORDER, _WORDS.unpack(raw), strict=True):
        td[offset] = value
    return td


_KEPT_ON_RELEARN = window.F_WINDOW_SCALE | window.F_SACK_PERM | window.F_CLOSE_INIT


def _relearn_windows(td: array[int]) -> None:
    """Forget both directions' sequence numbers (a zero td_maxwin makes the window tracker
    learn them from the direction's next packet) and track liberally from now on (the
    retransmission count starts over too)."""
    for base in (0, window.SIDE):
        for word in (window.END, window.MAXEND, window.MAXWIN, window.MAXACK):
            td[base + word] = 0
        td[base + window.FLAGS] = (td[base + window.FLAGS] & _KEPT_ON_RELEARN) | window.F_BE_LIBERAL


# -- into the table ------------------------------------------------------------------------------


def install(conntrack: Conntrack, flows: Iterable[Flow]) -> Installed:
    """Put restored flows into a table, in their saved order (which keeps the early-drop order
    of the not-ASSURED ones). A flow whose key is in the table already is left out."""
    done = Installed()
    for flow in flows:
        if conntrack.get(flow.key) is not None:
            continue
        if conntrack.restore(flow):
            done.restored += 1
        else:
            done.table_full += 1
    return done
