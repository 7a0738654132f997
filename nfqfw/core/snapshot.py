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
be in window). State, options (window scale, SACK), ASSURED and timeouts are kept.

`_encode_flow` and `_decode_flow` are the only code here that knows the layout of Flow and
TcpConn: a change of that layout changes these two functions, not the format.

Format, version 1, little-endian:

  header  magic b"NFQFWFT\\0" (8), version u16, reserved u16 (0), body length u64,
          SHA-256 of the body (32 bytes)
  body    saved_at f64 (wall clock), flags u32 (EXACT), string count u32, strings (u16
          length + UTF-8 each), flow count u32, the flows
  flow    key length u8, key (conntrack.flow_key's layout), flags u8 (ORIG_A, ASSURED,
          SEEN_REPLY, TCP), remaining f64 (deadline - now), age f64 (now - created),
          rule u32, hook u8 (0: no Meta), in_iface u32, out_iface u32 (string indexes,
          NO_STRING for None)
  + TCP   state, last_index, last_dir, last_flags, last_wscale, retrans, assured: u8 each;
          per direction (ORIGINAL, then REPLY) td_end, td_maxend, td_maxwin, td_maxack,
          td_scale, flags: u32 each; then last_seq, last_ack, last_end, last_win: u32 each
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from nfqfw.core.conntrack import ICMP_QUERIES, ICMPV6_QUERIES, Conntrack, Flow, first_packet
from nfqfw.core.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP
from nfqfw.core.tcp import TcpConn
from nfqfw.core.tcp_states import STATE_COUNT, FlagClass, sNO
from nfqfw.core.tcp_window import (
    END,
    F_BE_LIBERAL,
    F_CLOSE_INIT,
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
)
from nfqfw.core.verdict import Hook, Meta

MAGIC = b"NFQFWFT\0"
VERSION = 1
NO_STRING = 0xFFFFFFFF

EXACT = 0x01  # snapshot flag: taken at a stop while traffic was blocked
ORIG_A, ASSURED, SEEN_REPLY, TCP = 0x01, 0x02, 0x04, 0x08  # flow flags
_KNOWN_FLAGS = ORIG_A | ASSURED | SEEN_REPLY | TCP

_HEADER = struct.Struct("<8sHHQ32s")
_BODY_HEAD = struct.Struct("<dII")
_U8, _U16, _U32 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I")
_FLOW = struct.Struct("<BddIBII")
_TCP = struct.Struct("<7B16I")
# The window words in the format's order: td offsets of ORIGINAL's block, REPLY's, last packet.
_TD_ORDER = (
    *(base + word for base in (0, SIDE) for word in (END, MAXEND, MAXWIN, MAXACK, SCALE, FLAGS)),
    LAST_SEQ,
    LAST_ACK,
    LAST_END,
    LAST_WIN,
)
_SCALE_WORDS = (SCALE, SIDE + SCALE)
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
    strings: dict[str, int] = {}
    records = []
    for flow in flows:
        if flow.deadline > now:
            records.append(_encode_flow(flow, now, strings))
    table = b"".join(_U16.pack(len(raw)) + raw for raw in (text.encode() for text in strings))
    body = b"".join(
        (_BODY_HEAD.pack(wall, EXACT if exact else 0, len(strings)), table, _U32.pack(len(records)), *records)
    )
    return _HEADER.pack(MAGIC, VERSION, 0, len(body), hashlib.sha256(body).digest()) + body


def _index(strings: dict[str, int], text: str | None) -> int:
    if text is None:
        return NO_STRING
    return strings.setdefault(text, len(strings))


def _encode_flow(flow: Flow, now: float, strings: dict[str, int]) -> bytes:
    key = flow.key
    conn = flow.tcp
    flags = (
        (ORIG_A if flow.orig_a else 0)
        | (ASSURED if flow.assured else 0)
        | (SEEN_REPLY if flow.seen_reply else 0)
        | (TCP if conn is not None else 0)
    )
    meta = flow.meta
    if isinstance(meta, Meta):
        hook, in_iface, out_iface = (
            int(meta.hook),
            _index(strings, meta.in_iface),
            _index(strings, meta.out_iface),
        )
    else:
        hook, in_iface, out_iface = 0, NO_STRING, NO_STRING
    rule = _index(strings, flow.rule)
    head = _FLOW.pack(flags, flow.deadline - now, now - flow.created, rule, hook, in_iface, out_iface)
    record = b"".join((_U8.pack(len(key)), key, head))
    if conn is None:
        return record
    td = conn.td
    return record + _TCP.pack(
        conn.state,
        conn.last_index,
        conn.last_dir,
        conn.last_flags,
        conn.last_wscale,
        conn.retrans,
        1 if conn.assured else 0,
        *(td[i] for i in _TD_ORDER),
    )


# -- bytes -> flows ------------------------------------------------------------------------------


def decode(data: bytes, now: float, wall: float) -> Restored:
    """The live flows of a snapshot, their deadlines and creation times on the monotonic clock
    of `now`, less the wall-clock time from the save to `wall`. Raises SnapshotError for
    anything but an intact snapshot of this version: all of it is restored, or none."""
    body = _checked_body(data)
    try:
        return _decode_body(_Reader(body), now, wall)
    except SnapshotError as err:
        raise SnapshotError(f"corrupt: {err}") from None


def _decode_body(reader: _Reader, now: float, wall: float) -> Restored:
    saved_at, flags, string_count = reader.take(_BODY_HEAD)
    if not math.isfinite(saved_at):
        raise SnapshotError("the save time is not a number")
    if int(flags) & ~EXACT:
        raise SnapshotError(f"unknown snapshot flags 0x{int(flags):x}")
    exact = bool(int(flags) & EXACT)
    strings = [reader.string() for _ in range(int(string_count))]
    elapsed = wall - saved_at
    went_back = elapsed < 0  # the wall clock was set back: count no time as passed
    elapsed = max(0.0, elapsed)
    metas: dict[tuple[int, int, int], Meta] = {}
    flows: list[Flow] = []
    seen: set[bytes] = set()
    expired = 0
    (count,) = reader.take(_U32)
    for number in range(1, int(count) + 1):
        try:
            flow, remaining = _decode_flow(reader, strings, metas, now, elapsed)
        except SnapshotError as err:
            raise SnapshotError(f"flow {number}: {err}") from None
        if flow.key in seen:
            raise SnapshotError(f"flow {number}: the same key twice")
        seen.add(flow.key)
        if remaining <= 0:
            expired += 1
            continue
        if not exact and flow.tcp is not None:
            _relearn_windows(flow.tcp)
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

    def take(self, layout: struct.Struct) -> tuple[int | float, ...]:
        if self.left < layout.size:
            raise SnapshotError("runs past the end of the snapshot")
        values = layout.unpack_from(self.body, self.at)
        self.at += layout.size
        return values

    def raw(self, size: int) -> bytes:
        if self.left < size:
            raise SnapshotError("runs past the end of the snapshot")
        chunk = self.body[self.at : self.at + size]
        self.at += size
        return chunk

    def string(self) -> str:
        (size,) = self.take(_U16)
        try:
            return self.raw(int(size)).decode()
        except UnicodeDecodeError:
            raise SnapshotError("a string is not UTF-8") from None


def _decode_flow(
    reader: _Reader, strings: list[str], metas: dict[tuple[int, int, int], Meta], now: float, elapsed: float
) -> tuple[Flow, float]:
    """One flow record, and its remaining time at `now` (<= 0: it ran out)."""
    (key_len,) = reader.take(_U8)
    key = reader.raw(int(key_len))
    flags, remaining, age, rule, hook, in_iface, out_iface = reader.take(_FLOW)
    flags = int(flags)
    if flags & ~_KNOWN_FLAGS:
        raise SnapshotError(f"unknown flags 0x{flags:02x}")
    if not (math.isfinite(remaining) and math.isfinite(age)):
        raise SnapshotError("a time is not a number")
    remaining -= elapsed
    flow = Flow(key, bool(flags & ORIG_A), now)
    flow.created = now - max(0.0, age) - elapsed
    flow.deadline = now + remaining
    flow.assured = bool(flags & ASSURED)
    flow.seen_reply = bool(flags & SEEN_REPLY)
    flow.rule = _string_at(strings, int(rule))
    flow.meta = _meta(metas, strings, int(hook), int(in_iface), int(out_iface))
    _check_key(flow)
    is_tcp = key[0] == PROTO_TCP
    if bool(flags & TCP) != is_tcp:
        raise SnapshotError("TCP state on a non-TCP flow" if not is_tcp else "TCP flow without TCP state")
    if is_tcp:
        flow.tcp = _decode_tcp(reader.take(_TCP))
    return flow, remaining


def _decode_tcp(fields: tuple[int | float, ...]) -> TcpConn:
    state, last_index, last_dir, last_flags, last_wscale, retrans, assured, *words = (int(v) for v in fields)
    if not sNO < state < STATE_COUNT:
        raise SnapshotError(f"TCP state {state} out of range")
    if last_index >= _FLAG_CLASSES or last_dir > 1:
        raise SnapshotError("TCP last packet record out of range")
    conn = TcpConn()
    conn.state = state
    conn.last_index = last_index
    conn.last_dir = last_dir
    conn.last_flags = last_flags
    conn.last_wscale = min(last_wscale, MAX_WSCALE)
    conn.retrans = retrans
    conn.assured = bool(assured)
    td = conn.td
    for offset, value in zip(_TD_ORDER, words, strict=True):
        td[offset] = value
    for offset in _SCALE_WORDS:
        if td[offset] > MAX_WSCALE:
            raise SnapshotError(f"TCP window scale {td[offset]} out of range")
    return conn


_KEPT_ON_RELEARN = F_WINDOW_SCALE | F_SACK_PERM | F_CLOSE_INIT


def _relearn_windows(conn: TcpConn) -> None:
    """Forget both directions' sequence numbers (a zero td_maxwin makes the window tracker
    learn them from the direction's next packet) and track liberally from now on."""
    td = conn.td
    for base in (0, SIDE):
        td[base + END] = td[base + MAXEND] = td[base + MAXWIN] = td[base + MAXACK] = 0
        td[base + FLAGS] = (td[base + FLAGS] & _KEPT_ON_RELEARN) | F_BE_LIBERAL
    conn.retrans = 0


def _check_key(flow: Flow) -> None:
    key = flow.key
    if not key or first_packet(flow) is None:
        raise SnapshotError("malformed flow key")
    queries = {PROTO_ICMP: ICMP_QUERIES, PROTO_ICMPV6: ICMPV6_QUERIES}.get(key[0])
    if queries is not None and key[1] not in queries:
        raise SnapshotError(f"ICMP flow of type {key[1]}, not a query")


def _string_at(strings: list[str], index: int) -> str | None:
    if index == NO_STRING:
        return None
    if index >= len(strings):
        raise SnapshotError(f"string {index} of {len(strings)}")
    return strings[index]


def _meta(
    metas: dict[tuple[int, int, int], Meta], strings: list[str], hook: int, in_iface: int, out_iface: int
) -> Meta | None:
    """The first packet's Meta, one object per distinct value (as the adapter interns them)."""
    if hook == 0:
        return None
    if hook not in _HOOKS:
        raise SnapshotError(f"unknown hook {hook}")
    meta = metas.get((hook, in_iface, out_iface))
    if meta is None:
        meta = Meta(_HOOKS[hook], _string_at(strings, in_iface), _string_at(strings, out_iface))
        metas[(hook, in_iface, out_iface)] = meta
    return meta


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
