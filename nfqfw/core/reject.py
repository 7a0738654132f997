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

Never answered (returns None, RFC 1122 3.2.2, RFC 4443 2.4 (e)): an ICMP error (or an ICMPv6
redirect), a RST, a packet to a broadcast or multicast address or from an unspecified,
broadcast or multicast one, a non-first fragment, and anything truncated below the headers
needed to build the answer.
"""

from __future__ import annotations

import struct

from nfqfw.core.build import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, icmp, icmpv6, ipv4, ipv6, tcp

TCP_RESET = "tcp-reset"
ICMP_PORT_UNREACHABLE = "icmp-port-unreachable"
ICMP_ADMIN_PROHIBITED = "icmp-admin-prohibited"
KINDS = (TCP_RESET, ICMP_PORT_UNREACHABLE, ICMP_ADMIN_PROHIBITED)

REPLY_TTL = 64
IPV6_MIN_MTU = 1280

# ICMP types that are errors: never answer them (RFC 1122 3.2.2: dest unreachable,
# source quench, redirect, time exceeded, parameter problem).
_ICMP4_ERRORS = frozenset((3, 4, 5, 11, 12))
_ICMP6_REDIRECT = 137  # types < 128 are errors; the kernel's icmpv6 also never answers a redirect

# (IPv4 code, IPv6 code) of destination unreachable for each ICMP kind.
_UNREACH_CODES = {
    ICMP_PORT_UNREACHABLE: (3, 4),
    ICMP_ADMIN_PROHIBITED: (13, 1),
}

# IPv6 extension headers walked to reach the upper layer (RFC 8200 4), AH has its own length unit.
_IPV6_FRAGMENT = 44
_IPV6_AH = 51
_IPV6_EXT_HEADERS = frozenset((0, 43, 60, _IPV6_FRAGMENT, _IPV6_AH))

_TCP_FIN, _TCP_SYN, _TCP_RST, _TCP_ACK = 0x01, 0x02, 0x04, 0x10


def build_reject(data: bytes, kind: str) -> bytes | None:
    """The reply to send for `data` rejected with `kind`, or None when nothing may be sent."""
    if kind not in KINDS:
        raise ValueError(f"unknown reject kind {kind!r}")
    if not data:
        return None
    version = data[0] >> 4
    if version == 4:
        return _reject_ipv4(data, kind)
    if version == 6:
        return _reject_ipv6(data, kind)
    return None


# --- IPv4 -------------------------------------------------------------------------------------


def _reject_ipv4(data: bytes, kind: str) -> bytes | None:
    if len(data) < 20:
        return None
    ihl = (data[0] & 0x0F) * 4
    total = min(struct.unpack_from("!H", data, 2)[0], len(data))
    if ihl < 20 or total < ihl:
        return None
    if struct.unpack_from("!H", data, 6)[0] & 0x1FFF:
        return None  # a later fragment: no L4 header to answer
    src, dst = data[12:16], data[16:20]
    if not _ipv4_may_answer(src, dst):
        return None
    proto = data[9]
    if proto == PROTO_ICMP and (total < ihl + 1 or data[ihl] in _ICMP4_ERRORS):
        return None  # an ICMP error (or too short to tell): never answer it
    if kind == TCP_RESET and proto == PROTO_TCP:
        return _tcp_reset_ipv4(data, ihl, total, src, dst)
    code = _UNREACH_CODES.get(kind, _UNREACH_CODES[ICMP_PORT_UNREACHABLE])[0]
    return _unreachable_ipv4(data[: min(total, ihl + 8)], code, src, dst)


def _ipv4_may_answer(src: bytes, dst: bytes) -> bool:
    # Multicast 224/4 and above (incl. class E and 255.255.255.255), and 0.0.0.0.
    unspecified = bytes(4)
    return dst[0] < 224 and src[0] < 224 and src != unspecified and dst != unspecified


def _tcp_reset_ipv4(data: bytes, ihl: int, total: int, src: bytes, dst: bytes) -> bytes | None:
    fields = _tcp_reset_fields(data, ihl, total)
    if fields is None:
        return None
    segment = tcp(dst, src, *fields, window=0)
    return ipv4(dst, src, PROTO_TCP, segment, REPLY_TTL, dont_fragment=True)


def _unreachable_ipv4(quote: bytes, code: int, src: bytes, dst: bytes) -> bytes:
    # TOS 0xC0 (internetwork control) as the kernel's icmp_send gives its errors.
    return ipv4(dst, src, PROTO_ICMP, icmp(3, code, payload=quote), REPLY_TTL, tos=0xC0)


# --- IPv6 -------------------------------------------------------------------------------------


def _reject_ipv6(data: bytes, kind: str) -> bytes | None:
    if len(data) < 40:
        return None
    payload_length = struct.unpack_from("!H", data, 4)[0]
    total = len(data) if payload_length == 0 else min(40 + payload_length, len(data))
    src, dst = data[8:24], data[24:40]
    if not _ipv6_may_answer(src, dst):
        return None
    upper = _ipv6_upper_layer(data, total)
    if upper is None:
        return None  # truncated extension headers or a non-first fragment
    proto, offset = upper
    if proto == PROTO_ICMPV6 and (
        total < offset + 1 or data[offset] < 128 or data[offset] == _ICMP6_REDIRECT
    ):
        return None
    if kind == TCP_RESET and proto == PROTO_TCP:
        return _tcp_reset_ipv6(data, offset, total, src, dst)
    code = _UNREACH_CODES.get(kind, _UNREACH_CODES[ICMP_PORT_UNREACHABLE])[1]
    return _unreachable_ipv6(data[: min(total, IPV6_MIN_MTU - 40 - 8)], code, src, dst)


def _ipv6_may_answer(src: bytes, dst: bytes) -> bool:
    unspecified = bytes(16)
    return dst[0] != 0xFF and src[0] != 0xFF and src != unspecified and dst != unspecified


def _ipv6_upper_layer(data: bytes, total: int) -> tuple[int, int] | None:
    """(upper-layer protocol, its offset) after the extension headers; None if unusable."""
    proto, offset = data[6], 40
    while proto in _IPV6_EXT_HEADERS:
        if offset + 8 > total:
            return None
        if proto == _IPV6_FRAGMENT:
            if struct.unpack_from("!H", data, offset + 2)[0] & 0xFFF8:
                return None  # fragment offset > 0: a later fragment
            length = 8
        elif proto == _IPV6_AH:
            length = (data[offset + 1] + 2) * 4
        else:
            length = (data[offset + 1] + 1) * 8
        proto, offset = data[offset], offset + length
    return proto, offset


def _tcp_reset_ipv6(data: bytes, offset: int, total: int, src: bytes, dst: bytes) -> bytes | None:
    fields = _tcp_reset_fields(data, offset, total)
    if fields is None:
        return None
    return ipv6(dst, src, PROTO_TCP, tcp(dst, src, *fields, window=0), REPLY_TTL)


def _unreachable_ipv6(quote: bytes, code: int, src: bytes, dst: bytes) -> bytes:
    message = icmpv6(dst, src, 1, code, b"\0\0\0\0" + quote)
    return ipv6(dst, src, PROTO_ICMPV6, message, REPLY_TTL)


# --- shared -----------------------------------------------------------------------------------


def _tcp_reset_fields(data: bytes, offset: int, total: int) -> tuple[int, int, int, int, int] | None:
    """(sport, dport, seq, ack, flags) of the RST answering the segment at `offset`, as nf_send_reset."""
    if total < offset + 20:
        return None
    sport, dport, seq, ack, off_flags = struct.unpack_from("!HHIIH", data, offset)
    header_len = (off_flags >> 12) * 4
    flags = off_flags & 0xFF
    if flags & _TCP_RST or header_len < 20 or offset + header_len > total:
        return None
    if flags & _TCP_ACK:
        return dport, sport, ack, 0, _TCP_RST
    segment_len = total - offset - header_len + (flags & _TCP_SYN != 0) + (flags & _TCP_FIN != 0)
    return dport, sport, 0, (seq + segment_len) & 0xFFFFFFFF, _TCP_RST | _TCP_ACK
