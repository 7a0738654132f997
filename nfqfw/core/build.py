"""Tiny pure packet builders: IPv4/IPv6 headers, TCP/UDP/ICMP/ICMPv6 with correct checksums.

Used by the reject generator, the `explain` tool and tests; not on the per-packet path.
Addresses are raw bytes (4 for IPv4, 16 for IPv6); `addr()` converts from text. L4 builders
take the IP addresses because TCP, UDP and ICMPv6 checksums cover a pseudo-header; the same
function serves IPv4 and IPv6, chosen by the address length. Builders raise ValueError on
arguments that cannot be encoded (they are fed by code, not by the network).
"""

from __future__ import annotations

import ipaddress
import struct

from nfqfw.core.packet import PROTO_ICMPV6, PROTO_TCP, PROTO_UDP

_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_IPV6_HEADER = struct.Struct("!IHBB16s16s")
_TCP_HEADER = struct.Struct("!HHIIBBHHH")
_UDP_HEADER = struct.Struct("!HHHH")
_CHECKSUM = struct.Struct("!H")

_DF = 0x4000
_MF = 0x2000


def addr(text: str) -> bytes:
    """Raw bytes of an IPv4 ("192.0.2.1") or IPv6 ("2001:db8::1") address."""
    # ipaddress rather than socket.inet_pton: the core imports no socket.  OSError kept for callers.
    try:
        return ipaddress.ip_address(text).packed
    except ValueError:
        raise OSError(f"illegal IP address string {text!r}") from None


# --- checksums --------------------------------------------------------------------------------


def checksum(data: bytes, initial: int = 0) -> int:
    """Internet checksum (RFC 1071) of `data`, starting from the partial sum `initial`."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Partial (unfolded) sum of the TCP/UDP/ICMPv6 pseudo-header, for IPv4 or IPv6 addresses."""
    if len(src) != len(dst) or len(src) not in (4, 16):
        raise ValueError("addresses must both be 4 or both be 16 bytes")
    words = src + dst
    return sum(struct.unpack(f"!{len(words) // 2}H", words)) + proto + (length & 0xFFFF) + (length >> 16)


def _set_checksum(message: bytes, at: int, initial: int = 0) -> bytes:
    value = checksum(message, initial)
    return message[:at] + _CHECKSUM.pack(value) + message[at + 2 :]


# --- IP ---------------------------------------------------------------------------------------


def ipv4_header(
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    ttl: int = 64,
    tos: int = 0,
    dont_fragment: bool = False,
    *,
    ident: int = 0,
    more_fragments: bool = False,
    frag_offset: int = 0,
    options: bytes = b"",
) -> bytes:
    """An IPv4 header with its checksum. `frag_offset` is in bytes (a multiple of 8);
    `options` are padded with end-of-list bytes to a multiple of 4."""
    if len(src) != 4 or len(dst) != 4:
        raise ValueError("IPv4 addresses must be 4 bytes")
    if frag_offset % 8 or not 0 <= frag_offset <= 0x1FFF * 8:
        raise ValueError(f"fragment offset {frag_offset} is not a multiple of 8 in range")
    options += b"\0" * (-len(options) % 4)
    header_len = 20 + len(options)
    if header_len > 60:
        raise ValueError(f"IPv4 options too long ({len(options)} bytes)")
    flags = (_DF if dont_fragment else 0) | (_MF if more_fragments else 0) | frag_offset // 8
    header = (
        _IPV4_HEADER.pack(
            0x40 | header_len // 4, tos, header_len + payload_len, ident, flags, ttl, proto, 0, src, dst
        )
        + options
    )
    return _set_checksum(header, 10)


def ipv4(
    src: bytes,
    dst: bytes,
    proto: int,
    payload: bytes,
    ttl: int = 64,
    *,
    ident: int = 0,
    tos: int = 0,
    dont_fragment: bool = False,
    more_fragments: bool = False,
    frag_offset: int = 0,
    options: bytes = b"",
) -> bytes:
    """A complete IPv4 packet around `payload` (see ipv4_header for the options)."""
    header = ipv4_header(
        src,
        dst,
        proto,
        len(payload),
        ttl,
        tos,
        dont_fragment,
        ident=ident,
        more_fragments=more_fragments,
        frag_offset=frag_offset,
        options=options,
    )
    return header + payload


def ipv6_header(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload_len: int,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    if len(src) != 16 or len(dst) != 16:
        raise ValueError("IPv6 addresses must be 16 bytes")
    first_word = 6 << 28 | traffic_class << 20 | flow_label & 0xFFFFF
    return _IPV6_HEADER.pack(first_word, payload_len, next_header, hop_limit, src, dst)


def ipv6(src: bytes, dst: bytes, next_header: int, payload: bytes, hop_limit: int = 64) -> bytes:
    """A complete IPv6 packet; `payload` includes any extension headers."""
    return ipv6_header(src, dst, next_header, len(payload), hop_limit) + payload


def ipv6_options_header(next_header: int, options: bytes = b"") -> bytes:
    """A hop-by-hop or destination-options header, padded to 8 bytes with Pad1/PadN."""
    pad = -(2 + len(options)) % 8
    padding = b"\0" if pad == 1 else (bytes((1, pad - 2)) + bytes(pad - 2) if pad else b"")
    body = options + padding
    return bytes((next_header, (2 + len(body)) // 8 - 1)) + body


def ipv6_fragment_header(next_header: int, offset: int = 0, more: bool = False, ident: int = 0) -> bytes:
    """An IPv6 fragment header; `offset` is in bytes (a multiple of 8)."""
    if offset % 8 or not 0 <= offset <= 0x1FFF * 8:
        raise ValueError(f"fragment offset {offset} is not a multiple of 8 in range")
    return struct.pack("!BBHI", next_header, 0, offset | more, ident)


# --- TCP --------------------------------------------------------------------------------------

NOP = b"\x01"
EOL = b"\x00"


def mss_option(mss: int) -> bytes:
    return struct.pack("!BBH", 2, 4, mss)


def wscale_option(shift: int) -> bytes:
    return struct.pack("!BBB", 3, 3, shift)


def sack_perm_option() -> bytes:
    return b"\x04\x02"


def sack_option(blocks: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> bytes:
    """SACK blocks as (left edge, right edge) pairs."""
    edges = [edge for block in blocks for edge in block]
    return struct.pack(f"!BB{len(edges)}I", 5, 2 + 4 * len(edges), *edges)


def timestamp_option(tsval: int, tsecr: int) -> bytes:
    return struct.pack("!BBII", 8, 10, tsval, tsecr)


def tcp(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int = 0,
    ack: int = 0,
    flags: int = 0,
    window: int = 65535,
    options: bytes = b"",
    payload: bytes = b"",
    urgent: int = 0,
) -> bytes:
    """A TCP segment (header + payload) with its checksum for the given IP addresses.
    `options` are padded with end-of-list bytes to a multiple of 4."""
    options += b"\0" * (-len(options) % 4)
    header_len = 20 + len(options)
    if header_len > 60:
        raise ValueError(f"TCP options too long ({len(options)} bytes)")
    header = _TCP_HEADER.pack(sport, dport, seq, ack, header_len // 4 << 4, flags, window, 0, urgent)
    segment = header + options + payload
    return _set_checksum(segment, 16, pseudo_header_sum(src, dst, PROTO_TCP, len(segment)))


# --- UDP, ICMP, ICMPv6 ------------------------------------------------------------------------


def udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes = b"") -> bytes:
    """A UDP datagram with its checksum (a computed 0 is sent as 0xFFFF, RFC 768)."""
    length = 8 + len(payload)
    datagram = _UDP_HEADER.pack(sport, dport, length, 0) + payload
    value = checksum(datagram, pseudo_header_sum(src, dst, PROTO_UDP, length)) or 0xFFFF
    return datagram[:6] + _CHECKSUM.pack(value) + datagram[8:]


def icmp(type_: int, code: int, rest: bytes | tuple[int, int] = b"\0\0\0\0", payload: bytes = b"") -> bytes:
    """An ICMP (v4) message. `rest` is the 4-byte rest of the header, or (identifier, sequence)
    for echo and the other queries."""
    if isinstance(rest, tuple):
        rest = struct.pack("!HH", *rest)
    if len(rest) != 4:
        raise ValueError("ICMP rest of header must be 4 bytes")
    return _set_checksum(bytes((type_, code, 0, 0)) + rest + payload, 2)


def icmpv6(src: bytes, dst: bytes, type_: int, code: int, body: bytes = b"") -> bytes:
    """An ICMPv6 message; `body` is everything after the checksum (rest of header + data)."""
    message = bytes((type_, code, 0, 0)) + body
    return _set_checksum(message, 2, pseudo_header_sum(src, dst, PROTO_ICMPV6, len(message)))
