"""Build the answer to a rejected packet: a TCP RST or an ICMP/ICMPv6 destination-unreachable.

Pure: bytes of the offending IP packet in, bytes of a complete reply IP packet out (or None
when no reply may be sent). The adapter sends the reply with a raw socket and drops the
original.

What is built mirrors the kernel's REJECT target (net/ipv4/netfilter/nf_reject_ipv4.c,
net/ipv6/netfilter/nf_reject_ipv6.c and icmp_send/icmp6_send):

- "tcp-reset": a RST from the original destination to the original source, ports swapped.
  If the offending segment has ACK, the RST takes seq = its ack number (no ACK flag);
  otherwise seq = 0 and ACK is set with ack = seq + segment length (+1 for SYN, +1 for FIN).
  IPv4 header with DF, TTL/hop limit 64. Asked for a non-TCP packet it falls back to
  port-unreachable (what nftables' plain ``reject`` does).
- "icmp-port-unreachable" / "icmp-admin-prohibited": IPv4 type 3 code 3 / 13 quoting the
  original IP header plus the first 64 bits of its data (RFC 792); IPv6 type 1 code 4 / 1
  quoting as much of the original as fits in the IPv6 minimum MTU of 1280 bytes (RFC 4443 2.4).

A packet cut by the queue's copy range (`copy_cap`, see core.decode: a GSO packet) is answered
from its headers, with the segment length of its IP header: the RST's ack covers the whole
segment, as the kernel's REJECT would compute it on the packet it holds.

Never answered (returns None, RFC 1122 3.2.2, RFC 4443 2.4 (e)): an ICMP error (or an ICMPv6
redirect), a RST, a packet to a broadcast or multicast address or from an unspecified,
broadcast or multicast one, a non-first fragment, and anything nfqfw.core.decode calls
malformed (its headers cannot be trusted to address an answer).
"""

from __future__ import annotations

from nfqfw.core.build import icmp, icmpv6, ipv4, ipv6, tcp
from nfqfw.core.decode import decode
from nfqfw.core.packet import ACK, FIN, FRAG_LATER, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, RST, SYN, Packet

TCP_RESET = "tcp-reset"
ICMP_PORT_UNREACHABLE = "icmp-port-unreachable"
ICMP_ADMIN_PROHIBITED = "icmp-admin-prohibited"
KINDS = (TCP_RESET, ICMP_PORT_UNREACHABLE, ICMP_ADMIN_PROHIBITED)

REPLY_TTL = 64
IPV6_MIN_MTU = 1280
IPV4_QUOTED_DATA = 8  # RFC 792: the original header and its first 64 bits of data

# ICMP types that are errors: never answer them (RFC 1122 3.2.2: dest unreachable,
# source quench, redirect, time exceeded, parameter problem).
_ICMP4_ERRORS = frozenset((3, 4, 5, 11, 12))
_ICMP6_REDIRECT = 137  # types < 128 are errors; the kernel's icmpv6 also never answers a redirect

# (IPv4 code, IPv6 code) of destination unreachable for each ICMP kind.
_UNREACH_CODES = {
    ICMP_PORT_UNREACHABLE: (3, 4),
    ICMP_ADMIN_PROHIBITED: (13, 1),
}
_UNSPECIFIED = {4: bytes(4), 6: bytes(16)}


def build_reject(data: bytes, kind: str, copy_cap: int = 0) -> bytes | None:
    """The reply to send for `data` rejected with `kind`, or None when nothing may be sent.
    `copy_cap`: the copy range of the queue `data` comes from (see core.decode)."""
    if kind not in KINDS:
        raise ValueError(f"unknown reject kind {kind!r}")
    pkt = decode(data, copy_cap)
    if pkt.malformed is not None or pkt.frag == FRAG_LATER or not _may_answer(pkt):
        return None
    if kind == TCP_RESET and pkt.proto == PROTO_TCP:
        return _tcp_reset(pkt)
    code4, code6 = _UNREACH_CODES.get(kind, _UNREACH_CODES[ICMP_PORT_UNREACHABLE])
    src, dst = pkt.src, pkt.dst
    if pkt.family == 4:
        quote = data[: min(pkt.length, pkt.l4_offset + IPV4_QUOTED_DATA)]
        # TOS 0xC0 (internetwork control) as the kernel's icmp_send gives its errors.
        return ipv4(dst, src, PROTO_ICMP, icmp(3, code4, payload=quote), REPLY_TTL, tos=0xC0)
    quote = data[: min(pkt.length, IPV6_MIN_MTU - 40 - 8)]
    return ipv6(dst, src, PROTO_ICMPV6, icmpv6(dst, src, 1, code6, bytes(4) + quote), REPLY_TTL)


def _may_answer(pkt: Packet) -> bool:
    src, dst = pkt.src, pkt.dst
    unspecified = _UNSPECIFIED[pkt.family]
    if src == unspecified or dst == unspecified:
        return False
    if pkt.family == 4:
        # 224/4 multicast and everything above it (class E, 255.255.255.255).
        if src[0] >= 224 or dst[0] >= 224:
            return False
        return pkt.proto != PROTO_ICMP or pkt.icmp_type not in _ICMP4_ERRORS
    if src[0] == 0xFF or dst[0] == 0xFF:
        return False
    return pkt.proto != PROTO_ICMPV6 or (pkt.icmp_type >= 128 and pkt.icmp_type != _ICMP6_REDIRECT)


def _tcp_reset(pkt: Packet) -> bytes | None:
    """The RST answering a TCP segment, with seq/ack as the kernel's nf_send_reset."""
    flags = pkt.tcp_flags
    if flags & RST:
        return None
    if flags & ACK:
        seq, ack, reply_flags = pkt.ack, 0, RST
    else:
        seq = 0
        ack = (pkt.seq + pkt.payload_len + (flags & SYN != 0) + (flags & FIN != 0)) & 0xFFFFFFFF
        reply_flags = RST | ACK
    src, dst = pkt.src, pkt.dst
    segment = tcp(dst, src, pkt.dport, pkt.sport, seq, ack, reply_flags, window=0)
    if pkt.family == 4:
        return ipv4(dst, src, PROTO_TCP, segment, REPLY_TTL, dont_fragment=True)
    return ipv6(dst, src, PROTO_TCP, segment, REPLY_TTL)
