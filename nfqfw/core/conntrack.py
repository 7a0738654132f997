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
from collections.abc import Iterator

from nfqfw.core.expiry import ExpiryWheel
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
    KILL,
    REOPEN,
    SHRINK_MIN_REMAINING,
    STATE_NAMES,
)
from nfqfw.core.verdict import Ct, Direction

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


class Flow:
    """One tracked connection.  Kept small: it is multiplied by max_flows."""

    __slots__ = ("assured", "created", "deadline", "key", "meta", "orig_a", "rule", "seen_reply", "tcp")

    def __init__(self, key: bytes, orig_a: bool, now: float) -> None:
        self.key = key
        self.orig_a = orig_a  # True when the originator's endpoint sorts first in the key
        self.created = now
        self.deadline = now
        self.assured = False
        self.seen_reply = False
        self.tcp: TcpConn | None = None
        self.rule: str | None = None  # what admitted the flow: "rule mail" / "default egress"
        self.meta: object = None  # the Meta of the first packet (interned by the adapter)

    @property
    def proto(self) -> int:
        return self.key[0]

    @property
    def state_name(self) -> str:
        if self.tcp is not None:
            return STATE_NAMES[self.tcp.state]
        return "ASSURED" if self.assured else ("REPLIED" if self.seen_reply else "UNREPLIED")

    def __repr__(self) -> str:
        return f"<Flow proto={self.proto} {self.state_name} deadline={self.deadline:.1f}>"


class Tracked:
    """The conntrack answer for one packet (reused: one per Conntrack, not per packet)."""

    __slots__ = ("ct", "direction", "flow", "new", "reason")

    def __init__(self) -> None:
        self.ct: Ct = Ct.INVALID
        self.flow: Flow | None = None
        self.new = False  # the flow is not in the table yet: confirm() it if the packet is accepted
        self.direction: int = ORIGINAL
        self.reason = ""


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
    the policy accepted its first packet (as the kernel confirms only accepted conntracks)."""

    def __init__(self, max_flows: int = DEFAULT_MAX_FLOWS, loose: bool = False) -> None:
        self.max_flows = max_flows
        self.loose = loose
        self._flows: dict[bytes, Flow] = {}
        self._unassured: dict[bytes, None] = {}  # insertion-ordered: the early-drop candidates
        self._wheel = ExpiryWheel()
        self._out = Tracked()
        self.expired = 0
        self.early_drops = 0

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self._flows.values()))  # a copy: callers may remove flows while iterating

    def get(self, key: bytes) -> Flow | None:
        return self._flows.get(key)

    # -- per packet ------------------------------------------------------------------------
    def track(self, pkt: Packet, now: float) -> Tracked:
        due = self._wheel.next_due()
        if due is not None and due <= now:
            self._wheel.sweep(now, self._expire)
        out = self._out
        out.flow = None
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
        flow = self._flows.get(key)
        if flow is not None and flow.deadline <= now:
            self.remove(flow)
            self.expired += 1
            flow = None
        if flow is None:
            return self._new(pkt, key, is_a, now)
        if proto in (PROTO_ICMP, PROTO_ICMPV6):
            direction = ORIGINAL if is_a else REPLY
        else:
            direction = ORIGINAL if is_a == flow.orig_a else REPLY
        out.flow = flow
        out.direction = direction
        if flow.tcp is not None:
            return self._tcp(flow, pkt, direction, now)
        return self._stateless(flow, direction, now)

    def _answer(self, ct: Ct, reason: str) -> Tracked:
        out = self._out
        out.ct = ct
        out.reason = reason
        return out

    def _state_of(self, flow: Flow, direction: int) -> Tracked:
        # As the kernel's ctinfo: before any reply, the originator's packets are still NEW.
        if direction == ORIGINAL and not flow.seen_reply:
            return self._answer(Ct.NEW, "new")
        return self._answer(Ct.ESTABLISHED, "established")

    def _new(self, pkt: Packet, key: bytes, is_a: bool, now: float) -> Tracked:
        out = self._out
        proto = pkt.proto
        flow = Flow(key, is_a, now)
        if proto == PROTO_TCP:
            conn = tcp_new(pkt, self.loose)
            if isinstance(conn, str):
                return self._answer(Ct.INVALID, conn)
            flow.tcp = conn
            result = tcp_packet(conn, pkt, ORIGINAL, False)
            if result.kind == INVALID:
                return self._answer(Ct.INVALID, result.reason)
            flow.deadline = now + (result.timeout if result.timeout is not None else 120.0)
        elif proto == PROTO_UDP:
            flow.deadline = now + UDP_UNREPLIED
        elif proto in (PROTO_ICMP, PROTO_ICMPV6):
            if not is_a:
                return self._answer(Ct.INVALID, "icmp: reply without a request")
            flow.deadline = now + ICMP_TIMEOUT
        else:
            flow.deadline = now + OTHER_TIMEOUT
        out.flow = flow
        out.new = True
        out.direction = ORIGINAL
        return self._answer(Ct.NEW, "new")

    def _tcp(self, flow: Flow, pkt: Packet, direction: int, now: float) -> Tracked:
        conn = flow.tcp
        assert conn is not None
        result = tcp_packet(conn, pkt, direction, flow.seen_reply)
        kind = result.kind
        if kind == INVALID:
            timeout = result.timeout
            if timeout is not None and flow.deadline - now > max(timeout, SHRINK_MIN_REMAINING):
                flow.deadline = now + timeout
            return self._answer(Ct.INVALID, result.reason)
        if kind == REOPEN:
            self.remove(flow)
            keyed = flow_key(pkt)
            assert keyed is not None
            return self._new(pkt, keyed[0], keyed[1], now)
        if kind == KILL:
            self.remove(flow)
            self._out.flow = None
            # From the originator the RST is still NEW (no reply yet), as the kernel's ctinfo.
            if direction == ORIGINAL:
                return self._answer(Ct.NEW, "new: RST before any reply (flow removed)")
            return self._answer(Ct.ESTABLISHED, "established: RST before any reply (flow removed)")
        state = self._state_of(flow, direction)
        if direction == REPLY:
            flow.seen_reply = True
        if kind != IGNORE and result.timeout is not None:
            flow.deadline = now + result.timeout
        if result.assure and not flow.assured:
            self._assure(flow)
        return state

    def _stateless(self, flow: Flow, direction: int, now: float) -> Tracked:
        state = self._state_of(flow, direction)
        proto = flow.key[0]
        if direction == REPLY:
            flow.seen_reply = True
        if proto == PROTO_UDP:
            if flow.seen_reply:
                if now > flow.created + UDP_STREAM_AFTER:
                    flow.deadline = now + UDP_REPLIED
                    if not flow.assured:
                        self._assure(flow)
                else:
                    flow.deadline = now + UDP_UNREPLIED
            else:
                flow.deadline = now + UDP_UNREPLIED
        elif proto in (PROTO_ICMP, PROTO_ICMPV6):
            flow.deadline = now + ICMP_TIMEOUT
        else:
            flow.deadline = now + OTHER_TIMEOUT
            if flow.seen_reply and not flow.assured:
                self._assure(flow)
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
        flow = self._flows.get(keyed[0]) if keyed is not None else None
        if flow is None:
            return self._answer(Ct.INVALID, "icmp error: embedded header matches no flow")
        if pkt.dst != inner.src:
            return self._answer(Ct.INVALID, "icmp error: outer destination is not the flow's endpoint")
        self._out.flow = flow
        return self._answer(Ct.RELATED, "related")

    # -- table management ------------------------------------------------------------------
    def confirm(self, flow: Flow) -> bool:
        """Insert a new flow; evict a not-ASSURED flow when full (early drop).  False when the
        table is full of ASSURED flows: the packet must be dropped."""
        flows = self._flows
        if len(flows) >= self.max_flows and not self._early_drop():
            return False
        flows[flow.key] = flow
        self._unassured[flow.key] = None
        self._wheel.file(flow)
        return True

    def _early_drop(self) -> bool:
        unassured = self._unassured
        if not unassured:
            return False
        victim = self._flows[next(iter(unassured))]
        self.remove(victim)
        self.early_drops += 1
        return True

    def _assure(self, flow: Flow) -> None:
        flow.assured = True
        self._unassured.pop(flow.key, None)

    def remove(self, flow: Flow) -> None:
        if self._flows.get(flow.key) is flow:
            del self._flows[flow.key]
            self._unassured.pop(flow.key, None)

    def _expire(self, item: object) -> bool:
        flow = item
        assert isinstance(flow, Flow)
        if self._flows.get(flow.key) is not flow:
            return False
        self.remove(flow)
        self.expired += 1
        return True

    def expire(self, now: float) -> None:
        """Drop every flow whose deadline has passed (also done lazily by track())."""
        self._wheel.sweep(now, self._expire)

    def clear(self) -> None:
        self._flows.clear()
        self._unassured.clear()
        self._wheel.clear()
