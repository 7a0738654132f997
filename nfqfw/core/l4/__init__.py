"""The protocol trackers by IP protocol number: the kernel's l4proto table.

Each tracker is a Tracker subclass (l4.base) in a module of its own: l4.tcp, l4.udp, l4.icmp
(ICMP and ICMPv6), and l4.generic for every protocol no other tracker claims. Adding a protocol
means adding its module and one entry in REGISTERED; conntrack dispatches through the table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nfqfw.core.l4.base import Tracker
from nfqfw.core.l4.generic import GenericTracker
from nfqfw.core.l4.icmp import IcmpTracker
from nfqfw.core.l4.tcp import TcpTracker
from nfqfw.core.l4.udp import UdpTracker
from nfqfw.core.packet import Packet

if TYPE_CHECKING:
    from nfqfw.core.conntrack import Conntrack

REGISTERED: tuple[type[Tracker], ...] = (TcpTracker, UdpTracker, IcmpTracker)


def by_proto(registered: tuple[type[Tracker], ...]) -> tuple[type[Tracker], ...]:
    """The tracker of each protocol number 0..255: its registered one, else the generic one."""
    table: list[type[Tracker]] = [GenericTracker] * 256
    for tracker in registered:
        for proto in tracker.protos:
            if table[proto] is not GenericTracker:
                raise ValueError(f"protocol {proto} has two trackers: {table[proto].name}, {tracker.name}")
            table[proto] = tracker
    return tuple(table)


TRACKERS = by_proto(REGISTERED)


def bind(ct: Conntrack) -> tuple[Tracker, ...]:
    """The trackers of one table by protocol number: one instance of each tracker, bound to `ct`."""
    instances = {tracker: tracker(ct) for tracker in set(TRACKERS)}
    return tuple(instances[tracker] for tracker in TRACKERS)


def state_name(proto: int, bits: int, state: int) -> str:
    """A flow's state as `nfqfw flows` names it, from its protocol, flag bits and state byte."""
    return TRACKERS[proto].state_name(bits, state)


def flow_key(pkt: Packet) -> tuple[bytes, bool] | None:
    """The packet's flow key and whether its source is the key's first endpoint (its tracker's
    `key`); None for a packet with no flow of its own (an ICMP error)."""
    return TRACKERS[pkt.proto].key(pkt)


def first_packet(key: bytes, orig_a: bool) -> Packet | None:
    """The originator's first packet of a flow, rebuilt from its key as far as the policy looks
    at it; None for a malformed key."""
    return TRACKERS[key[0]].first_packet(key, orig_a)
