"""Packets and helpers shared by the conntrack and protocol tracker tests (tests/unit/core)."""

from __future__ import annotations

import struct

from nfqfw.core.build import addr, icmp, icmpv6, ipv4, ipv6, tcp, udp
from nfqfw.core.conntrack import Conntrack, Tracked
from nfqfw.core.decode import decode
from nfqfw.core.packet import Packet

LAN = addr("10.0.0.5")
LAN2 = addr("10.0.0.6")
WAN = addr("203.0.113.7")
ROUTER = addr("198.51.100.1")
LAN6 = addr("fd00::5")
WAN6 = addr("2001:db8::7")
ROUTER6 = addr("2001:db8::1")


def udp4(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes = b"x") -> bytes:
    return ipv4(src, dst, 17, udp(src, dst, sport, dport, payload))


def echo4(src: bytes, dst: bytes, type_: int, ident: int, seq: int = 1) -> bytes:
    return ipv4(src, dst, 1, icmp(type_, 0, (ident, seq), b"ping"))


def echo6(src: bytes, dst: bytes, type_: int, ident: int, seq: int = 1) -> bytes:
    return ipv6(src, dst, 58, icmpv6(src, dst, type_, 0, struct.pack("!HH", ident, seq) + b"ping"))


def pkt(data: bytes) -> Packet:
    decoded = decode(data)
    assert decoded.malformed is None, decoded.malformed
    return decoded


def admit(ct: Conntrack, data: bytes, now: float) -> Tracked:
    """Track a packet and confirm its flow if new (as the engine does for an accepted packet)."""
    tracked = ct.track(pkt(data), now)
    if tracked.new:
        assert tracked.flow is not None
        assert ct.confirm(tracked.flow)
    return tracked


def tcp4(src: bytes, dst: bytes, sport: int, dport: int, flags: int, seq: int, ack: int = 0) -> bytes:
    return ipv4(src, dst, 6, tcp(src, dst, sport, dport, seq=seq, ack=ack, flags=flags))
