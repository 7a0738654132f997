"""The protocol tracker interface, and what conntrack and the trackers share: the flow flags,
the per-flow protocol area, the key of protocols with ports.

Invariants:
- A tracker keeps no flow state of its own. A flow's state lives in the flow table
  (core.flowtable): its flag bits, its deadline and, for a stateful protocol, its protocol
  area (WORDS 32-bit words and SMALL bytes per flow) laid out by the tracker (TCP: l4.tcp).
- A flow key is `bytes` whose first byte is the protocol number; the rest is the tracker's
  layout, read back by the same tracker's `first_packet`.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from nfqfw.core.packet import Packet
from nfqfw.core.verdict import Ct, Direction

if TYPE_CHECKING:
    from nfqfw.core.conntrack import Conntrack, Tracked
    from nfqfw.core.flowtable import FlowTable

# Flow flags (the flow table's `bits` column; ASSURED and SEEN_REPLY are the kernel's IPS_*).
ORIG_A = 0x01  # the originator's endpoint sorts first in the key
ASSURED = 0x02  # kept when the table is full (no early drop)
SEEN_REPLY = 0x04  # a REPLY-direction packet was accepted
PROTO_STATE = 0x08  # the protocol area holds tracker state: copied with the flow, zeroed when freed
# TCP: the kernel's SYN proxy opened the connection; the ORIGINAL direction's ACKs are in its
# cookie's sequence space (l4.tcp: the offset in the protocol bytes). Never on the fast path.
SEQ_ADJUST = 0x10

# The protocol area: per flow, WORDS 32-bit words (FlowTable.td) and SMALL bytes
# (FlowTable.small), sized for TCP, the largest state. A stateful tracker keeps its state
# number in byte STATE_BYTE (read by the census and the state names).
WORDS = 16
SMALL = 12
STATE_BYTE = 0

ORIGINAL = Direction.ORIGINAL
REPLY = Direction.REPLY

_PORT = struct.Struct("!H").pack
# Address length in a key -> IP version.
_ADDR_LEN_FAMILY = {4: 4, 16: 6}


class Tracker(ABC):
    """One protocol's connection tracking (the kernel's l4proto), plugged into Conntrack through
    the registry in core.l4. A subclass is the protocol; Conntrack makes one instance of it per
    table (as the kernel keeps per-namespace protocol data), bound to the table.

    Per packet, in the order Conntrack.track() calls them:
      key(pkt)         the flow key and whether the packet's source is the key's first endpoint;
                       None: the packet has no flow of its own (then error() answers it)
      error(pkt)       the answer for a packet without a key (ICMP errors, untracked types)
      new(pkt, key, is_a, now)
                       the first packet of a flow: NEW with a pending slot (Conntrack.open), or
                       INVALID; it sets the flow's deadline and protocol state
      packet(slot, bits, pkt, direction, now)
                       a packet of a flow in the table: update its state, deadline and flags
    Off the packet path, per protocol (static):
      first_packet(key, orig_a)   the originator's first packet rebuilt from a key (reload
                                  recheck, flow lists, snapshot checks); None when malformed
      state_name(bits, state)     the flow's state as `nfqfw flows` shows it
      timeouts                    the default timeouts by name, in seconds
    For an ICMP error the gateway itself sent (l4.icmp, IcmpTracker.own_error):
      starts_flow(pkt)            would this packet, with no flow of its own, start one (not
                                  be INVALID as a first packet)? No state is touched.
    The services a tracker uses on its Conntrack (`self.ct`) are documented there.
    """

    __slots__ = ("ct", "table")

    name: ClassVar[str]
    protos: ClassVar[tuple[int, ...]]  # the IP protocol numbers it tracks
    timeouts: ClassVar[Mapping[str, float]]
    # The key puts the originator first (ICMP queries): a packet's direction is whether its
    # source is the key's first endpoint, whatever the flow's ORIG_A flag says.
    direction_by_key: ClassVar[bool] = False

    def __init__(self, ct: Conntrack) -> None:
        self.ct = ct
        self.table: FlowTable = ct.table  # never replaced: bound once

    @staticmethod
    @abstractmethod
    def key(pkt: Packet) -> tuple[bytes, bool] | None: ...

    @staticmethod
    @abstractmethod
    def first_packet(key: bytes, orig_a: bool) -> Packet | None: ...

    @staticmethod
    def state_name(bits: int, state: int) -> str:
        """ASSURED, REPLIED or UNREPLIED (a tracker without states of its own)."""
        return "ASSURED" if bits & ASSURED else ("REPLIED" if bits & SEEN_REPLY else "UNREPLIED")

    def error(self, pkt: Packet) -> Tracked:
        return self.ct.answer(Ct.INVALID, f"{self.name}: no flow for this packet")

    def starts_flow(self, pkt: Packet) -> bool:
        """Every packet may start a flow (UDP, the generic protocols)."""
        return True

    def own_error(self, pkt: Packet) -> Tracked:
        """Only ICMP errors are the gateway's own errors (IcmpTracker overrides this)."""
        return self.ct.answer(Ct.INVALID, f"{self.name}: not an icmp error")

    @abstractmethod
    def new(self, pkt: Packet, key: bytes, is_a: bool, now: float) -> Tracked: ...

    @abstractmethod
    def packet(self, slot: int, bits: int, pkt: Packet, direction: int, now: float) -> Tracked: ...


def ports_key(pkt: Packet) -> tuple[bytes, bool]:
    """The key of a protocol with ports (TCP, UDP): protocol, then the two endpoints (address
    and port) in canonical order, lower first; True when the source is the lower one.
    core.fastpath packs the same layout from integers."""
    a = pkt.src + _PORT(pkt.sport)
    b = pkt.dst + _PORT(pkt.dport)
    if a <= b:
        return bytes((pkt.proto,)) + a + b, True
    return bytes((pkt.proto,)) + b + a, False


def ports_first_packet(key: bytes, orig_a: bool) -> Packet | None:
    """The originator's packet of a ports_key() key (ports and addresses only)."""
    size = (len(key) - 1) // 2 - 2
    a, b = key[1 : 1 + size + 2], key[3 + size :]
    (src, dst) = (a, b) if orig_a else (b, a)
    pkt = Packet()
    pkt.proto = key[0]
    pkt.src, pkt.sport = src[:size], int.from_bytes(src[size:], "big")
    pkt.dst, pkt.dport = dst[:size], int.from_bytes(dst[size:], "big")
    return with_family(pkt, size)


def with_family(pkt: Packet, size: int) -> Packet | None:
    """`pkt` with its IP version set from its addresses of `size` bytes; None when the key they
    came from was malformed (a length that is no address, or addresses cut short)."""
    family = _ADDR_LEN_FAMILY.get(size)
    if family is None or len(pkt.src) != size or len(pkt.dst) != size:
        return None
    pkt.family = family
    return pkt
