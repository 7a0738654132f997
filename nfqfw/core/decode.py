"""Decode the bytes of one IPv4/IPv6 packet into a `Packet` record; never raises.

The per-packet path: precompiled structs, `unpack_from` on the caller's buffer, one Packet
allocated (two for an ICMP error). Anything that cannot be trusted sets `Packet.malformed`
to a short, stable reason ("ipv4: total length 60 > 40 bytes captured") and stops decoding;
fields decoded before that keep their values.

Rules worth knowing:

- Lengths: the IPv4 total length / IPv6 payload length is honoured, bytes past it (e.g.
  Ethernet padding) are ignored; a length larger than what was captured is malformed, unless
  the packet was cut by the queue's copy range (below).
- Cut by the copy range (`decode(data, copy_cap)`): NFQUEUE copies at most `copy_cap` bytes of
  a packet, so a GSO packet (up to 64 KB, handed over whole when the queue asks for GSO) or any
  packet longer than the range arrives as exactly `copy_cap` bytes whose IP length claims more.
  Such a packet is `truncated`: its headers are decoded from the bytes present (they must be
  all there: "tcp: header cut by the 3840-byte copy range" otherwise), its lengths
  (`length`, `payload_len`, the UDP length check) come from the IP length field, as the kernel
  sees the packet. A packet shorter than `copy_cap` was not cut: a length claiming more than
  its bytes stays malformed. Checksums are never verified (with GSO the kernel may even hand
  over packets whose L4 checksum is not filled in yet).
- Fragments: a first fragment (offset 0, more fragments) is FRAG_FIRST and its L4 header is
  decoded (a UDP length covering the whole datagram is expected there); a later one is
  FRAG_LATER: proto set, no L4, ports 0, `payload_len` = fragment data bytes, not malformed.
  An IPv6 "atomic" fragment (offset 0, no more fragments) is FRAG_NONE.
- IPv6 extension headers (hop-by-hop first only, routing, fragment, destination options,
  AH) are walked, at most 8 of them; ESP (50) and no-next-header (59) end the walk as the
  upper-layer protocol, with no L4 decoded. Jumbograms are not supported (malformed).
- TCP options: EOL, NOP, MSS, window scale (shift capped at 14), SACK-permitted, SACK,
  timestamps. A known option with the wrong length is ignored like the kernel does; an
  option length below 2 or running past the header is malformed.
- ICMP/ICMPv6 errors: the quoted packet is decoded into `inner` leniently (it is normally
  truncated): no length validation against its own length fields, TCP/UDP need the 4 port
  bytes and ICMP its 8-byte header (what the kernel needs to find the related connection),
  TCP seq/ack/flags/window are filled when present, options are not parsed. Offsets in
  `inner` are relative to the start of the quoted header. An error quoted inside an error
  is decoded without its own `inner` (one level only). A quote too short for that is
  "icmp: embedded header truncated"; any other flaw in it makes the outer packet
  "icmp: embedded <inner reason>".
"""

from __future__ import annotations

import struct

from nfqfw.core.packet import (
    FRAG_FIRST,
    FRAG_LATER,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    Packet,
)

__all__ = ["decode"]

Buffer = bytes | bytearray | memoryview

_IPV4 = struct.Struct("!BxHxxHBB2x4s4s")  # version/IHL, total length, flags/offset, ttl, proto, src, dst
_IPV6 = struct.Struct("!4xHBB16s16s")  # payload length, next header, hop limit, src, dst
_TCP = struct.Struct("!HHIIBBH")  # ports, seq, ack, data offset, flags, window
_PORTS = struct.Struct("!HH")
_UDP = struct.Struct("!HHH")  # ports, length
_ICMP = struct.Struct("!BBxxH")  # type, code, identifier
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_TS = struct.Struct("!II")

_IPV4_MF = 0x2000
_IPV4_OFFSET = 0x1FFF

_IPV6_HOP_BY_HOP = 0
_IPV6_ROUTING = 43
_IPV6_FRAGMENT = 44
_IPV6_AH = 51
_IPV6_DEST_OPTS = 60
_IPV6_EXTENSIONS = frozenset((_IPV6_HOP_BY_HOP, _IPV6_ROUTING, _IPV6_FRAGMENT, _IPV6_AH, _IPV6_DEST_OPTS))
_IPV6_MAX_EXTENSIONS = 8

_MAX_WSCALE = 14  # RFC 7323 2.3: larger shifts are treated as 14

# Query types whose identifier field names the exchange (echo, timestamp, info, address mask;
# ICMPv6 echo and node information), as the kernel's conntrack keys them.
_ICMP_QUERIES = frozenset((0, 8, 13, 14, 15, 16, 17, 18))
_ICMPV6_QUERIES = frozenset((128, 129, 139, 140))
# RFC 1122 3.2.2 error types (the kernel's icmp_is_err); every ICMPv6 type below 128 is an error.
_ICMP_ERRORS = frozenset((3, 4, 5, 11, 12))

# Reason a lenient (quoted) decode gives for running out of bytes; the outer packet turns
# it into "<icmp|icmpv6>: embedded header truncated".
_QUOTE_TRUNCATED = "embedded header truncated"


def decode(data: Buffer, copy_cap: int = 0) -> Packet:
    """Decode one IP packet. Never raises: problems are reported in `Packet.malformed`.

    `copy_cap`: the copy range of the queue the bytes come from (0: packets are complete); a
    packet of exactly that many bytes whose IP length claims more was cut by it (`truncated`)."""
    pkt = Packet()
    try:
        _ip(pkt, data, False, copy_cap)
    except Exception as exc:  # a decoder bug must not take the daemon down; fuzz tests keep it unused
        pkt.malformed = f"decode: internal error ({type(exc).__name__})"
    return pkt


def _ip(pkt: Packet, data: Buffer, quoted: bool, copy_cap: int = 0) -> None:
    if not data:
        pkt.malformed = _QUOTE_TRUNCATED if quoted else "ip: empty packet"
        return
    version = data[0] >> 4
    if version == 4:
        _ipv4(pkt, data, quoted, copy_cap)
    elif version == 6:
        _ipv6(pkt, data, quoted, copy_cap)
    else:
        pkt.malformed = f"ip: unknown version {version}"


# --- IPv4 -------------------------------------------------------------------------------------


def _ipv4(pkt: Packet, data: Buffer, quoted: bool, copy_cap: int) -> None:
    captured = len(data)
    pkt.family = 4
    if captured < 20:
        pkt.malformed = _QUOTE_TRUNCATED if quoted else f"ipv4: truncated header ({captured} bytes)"
        return
    version_ihl, total, frag, pkt.ttl, pkt.proto, pkt.src, pkt.dst = _IPV4.unpack_from(data)
    ihl = (version_ihl & 0x0F) * 4
    end = _ipv4_end(pkt, ihl, total, captured, quoted, copy_cap)
    if end < 0:
        return
    pkt.length = end
    if frag & _IPV4_OFFSET:
        pkt.frag = FRAG_LATER
        pkt.l4_offset = ihl
        pkt.payload_len = end - ihl
        return
    if frag & _IPV4_MF:
        pkt.frag = FRAG_FIRST
    _l4(pkt, data, ihl, end, quoted)


def _ipv4_end(pkt: Packet, ihl: int, total: int, captured: int, quoted: bool, copy_cap: int) -> int:
    """Where the packet ends (past the buffer's end when cut by the copy range), or -1
    (malformed set) when its lengths cannot be."""
    if ihl < 20:
        pkt.malformed = f"ipv4: header length {ihl} < 20"
        return -1
    if ihl > captured:
        reason = f"ipv4: header length {ihl} > {captured} bytes captured"
        pkt.malformed = _QUOTE_TRUNCATED if quoted else reason
        return -1
    if quoted:  # a quote is normally cut short: its total length only trims trailing bytes
        return total if ihl <= total < captured else captured
    if total > captured:
        if captured != copy_cap:
            pkt.malformed = f"ipv4: total length {total} > {captured} bytes captured"
            return -1
        pkt.truncated = True
    if total < ihl:
        pkt.malformed = f"ipv4: total length {total} < header length {ihl}"
        return -1
    return total


# --- IPv6 -------------------------------------------------------------------------------------


def _ipv6(pkt: Packet, data: Buffer, quoted: bool, copy_cap: int) -> None:
    captured = len(data)
    pkt.family = 6
    if captured < 40:
        pkt.malformed = _QUOTE_TRUNCATED if quoted else f"ipv6: truncated header ({captured} bytes)"
        return
    payload_length, next_header, pkt.ttl, pkt.src, pkt.dst = _IPV6.unpack_from(data)
    pkt.proto = next_header
    end = _ipv6_end(pkt, payload_length, next_header, captured, quoted, copy_cap)
    if end < 0:
        return
    pkt.length = end
    offset = _ipv6_extensions(pkt, data, end, quoted) if next_header in _IPV6_EXTENSIONS else 40
    if offset >= 0:  # else malformed, or a later fragment (fields already set)
        _l4(pkt, data, offset, end, quoted)


def _ipv6_end(
    pkt: Packet, payload_length: int, next_header: int, captured: int, quoted: bool, copy_cap: int
) -> int:
    """Where the packet ends (past the buffer's end when cut by the copy range), or -1
    (malformed set) when its length cannot be."""
    end = 40 + payload_length
    if quoted:
        return captured if payload_length == 0 or end > captured else end
    if payload_length == 0 and next_header == _IPV6_HOP_BY_HOP:
        pkt.malformed = "ipv6: jumbogram not supported"
        return -1
    if end > captured:
        if captured != copy_cap:
            pkt.malformed = f"ipv6: payload length {payload_length} > {captured - 40} bytes captured"
            return -1
        pkt.truncated = True
    return end


def _ipv6_extensions(pkt: Packet, data: Buffer, end: int, quoted: bool) -> int:
    """Walk the extension headers; set proto (and frag) and return the upper-layer offset, or
    -1 when done: malformed, or a later fragment whose remaining bytes are not headers."""
    proto, offset, count = pkt.proto, 40, 0
    present = min(end, len(data))  # `end` itself when the packet was not cut by the copy range
    while proto in _IPV6_EXTENSIONS:
        count += 1
        if count > _IPV6_MAX_EXTENSIONS:
            pkt.malformed = f"ipv6: more than {_IPV6_MAX_EXTENSIONS} extension headers"
            return -1
        if proto == _IPV6_HOP_BY_HOP and count > 1:
            pkt.malformed = "ipv6: hop-by-hop header not first"  # RFC 8200 4.1
            return -1
        if offset + 8 > present:
            pkt.malformed = _QUOTE_TRUNCATED if quoted else f"ipv6: extension header {proto} truncated"
            return -1
        if proto == _IPV6_FRAGMENT:
            offset_more = _U16.unpack_from(data, offset + 2)[0]
            if offset_more & 0xFFF8:
                pkt.proto = data[offset]
                pkt.frag = FRAG_LATER
                pkt.l4_offset = offset + 8
                pkt.payload_len = end - offset - 8
                return -1
            if offset_more & 1:
                pkt.frag = FRAG_FIRST
            length = 8
        elif proto == _IPV6_AH:
            length = (data[offset + 1] + 2) * 4
        else:
            length = (data[offset + 1] + 1) * 8
        if offset + length > present:
            pkt.malformed = _QUOTE_TRUNCATED if quoted else f"ipv6: extension header {proto} truncated"
            return -1
        proto = data[offset]
        offset += length
    pkt.proto = proto
    return offset


# --- L4 dispatch ------------------------------------------------------------------------------


def _l4(pkt: Packet, data: Buffer, offset: int, end: int, quoted: bool) -> None:
    pkt.l4_offset = offset
    proto = pkt.proto
    if quoted:
        _quoted_l4(pkt, data, offset, end)
    elif proto == PROTO_TCP:
        _tcp(pkt, data, offset, end)
    elif proto == PROTO_UDP:
        _udp(pkt, data, offset, end)
    elif proto == PROTO_ICMP and pkt.family == 4:
        _icmp(pkt, data, offset, end)
    elif proto == PROTO_ICMPV6 and pkt.family == 6:
        _icmpv6(pkt, data, offset, end)
    else:
        pkt.payload_len = end - offset


def _header_cut(pkt: Packet, data: Buffer, header_end: int, name: str) -> bool:
    """A header running past the bytes copied (only possible in a packet cut by the copy range:
    otherwise the length checks before this one have failed): malformed, True."""
    if header_end <= len(data):
        return False
    pkt.malformed = f"{name}: header cut by the {len(data)}-byte copy range"
    return True


# --- TCP --------------------------------------------------------------------------------------


def _tcp(pkt: Packet, data: Buffer, offset: int, end: int) -> None:
    segment = end - offset
    if segment < 20:
        pkt.malformed = f"tcp: truncated header ({segment} bytes)"
        return
    if _header_cut(pkt, data, offset + 20, "tcp"):
        return
    pkt.sport, pkt.dport, pkt.seq, pkt.ack, data_offset, pkt.tcp_flags, pkt.window = _TCP.unpack_from(
        data, offset
    )
    header = (data_offset >> 4) * 4
    if header < 20:
        pkt.malformed = f"tcp: data offset {header // 4} < 5"
        return
    if header > segment:
        pkt.malformed = f"tcp: data offset {header // 4} beyond {segment}-byte segment"
        return
    if _header_cut(pkt, data, offset + header, "tcp"):
        return
    pkt.payload_len = segment - header
    if header > 20:
        _tcp_options(pkt, data, offset + 20, offset + header)


def _tcp_options(pkt: Packet, data: Buffer, at: int, stop: int) -> None:
    while at < stop:
        kind = data[at]
        if kind == 0:  # end of option list
            return
        if kind == 1:  # no-operation
            at += 1
            continue
        if at + 1 >= stop:
            pkt.malformed = f"tcp: option {kind} truncated"
            return
        size = data[at + 1]
        if size < 2:
            pkt.malformed = f"tcp: option {kind} length {size} < 2"
            return
        if at + size > stop:
            pkt.malformed = f"tcp: option {kind} length {size} runs past header"
            return
        _tcp_option(pkt, data, kind, size, at)
        at += size


def _tcp_option(pkt: Packet, data: Buffer, kind: int, size: int, at: int) -> None:
    """Record one well-formed option; known kinds with a wrong size are ignored (as the kernel)."""
    if kind == 2 and size == 4:
        pkt.mss = _U16.unpack_from(data, at + 2)[0]
    elif kind == 3 and size == 3:
        pkt.wscale = min(data[at + 2], _MAX_WSCALE)
    elif kind == 4 and size == 2:
        pkt.sack_perm = True
    elif kind == 5 and size >= 10 and (size - 2) % 8 == 0:
        edges = struct.unpack_from(f"!{(size - 2) // 4}I", data, at + 2)
        pkt.sack = tuple(zip(edges[::2], edges[1::2], strict=True))
    elif kind == 8 and size == 10:
        pkt.ts = _TS.unpack_from(data, at + 2)


# --- UDP --------------------------------------------------------------------------------------


def _udp(pkt: Packet, data: Buffer, offset: int, end: int) -> None:
    segment = end - offset
    if segment < 8:
        pkt.malformed = f"udp: truncated header ({segment} bytes)"
        return
    if _header_cut(pkt, data, offset + 8, "udp"):
        return
    pkt.sport, pkt.dport, length = _UDP.unpack_from(data, offset)
    if length < 8:
        pkt.malformed = f"udp: length field {length} < 8"
        return
    if pkt.frag == FRAG_FIRST:
        pkt.payload_len = segment - 8  # the length field covers the whole reassembled datagram
    elif length > segment:
        pkt.malformed = f"udp: length field {length} but {segment} bytes"
    else:
        pkt.payload_len = length - 8  # bytes past the UDP length are ignored, as the kernel trims them


# --- ICMP / ICMPv6 ----------------------------------------------------------------------------


def _icmp(pkt: Packet, data: Buffer, offset: int, end: int) -> None:
    if _icmp_header(pkt, data, offset, end, "icmp", _ICMP_QUERIES) and pkt.icmp_type in _ICMP_ERRORS:
        _embedded(pkt, data, offset + 8, end, "icmp")


def _icmpv6(pkt: Packet, data: Buffer, offset: int, end: int) -> None:
    if _icmp_header(pkt, data, offset, end, "icmpv6", _ICMPV6_QUERIES) and pkt.icmp_type < 128:
        _embedded(pkt, data, offset + 8, end, "icmpv6")


def _icmp_header(
    pkt: Packet, data: Buffer, offset: int, end: int, name: str, queries: frozenset[int]
) -> bool:
    """Type, code, identifier (queries) and payload length; False when truncated."""
    segment = end - offset
    if segment < 8:
        pkt.malformed = f"{name}: truncated header ({segment} bytes)"
        return False
    if _header_cut(pkt, data, offset + 8, name):
        return False
    icmp_type, pkt.icmp_code, ident = _ICMP.unpack_from(data, offset)
    pkt.icmp_type = icmp_type
    if icmp_type in queries:
        pkt.icmp_id = ident
    pkt.payload_len = segment - 8
    return True


def _embedded(pkt: Packet, data: Buffer, start: int, end: int, name: str) -> None:
    """Decode the packet quoted by an ICMP error into `pkt.inner`."""
    inner = Packet()
    pkt.inner = inner
    quote = memoryview(data)[start:end]
    if quote and quote[0] >> 4 != pkt.family:
        pkt.malformed = f"{name}: embedded header is not ipv{pkt.family}"
        return
    _ip(inner, quote, True)
    reason = inner.malformed
    if reason == _QUOTE_TRUNCATED:
        pkt.malformed = f"{name}: {_QUOTE_TRUNCATED}"
    elif reason is not None:
        pkt.malformed = f"{name}: embedded {reason}"


def _quoted_l4(pkt: Packet, data: Buffer, offset: int, end: int) -> None:
    """L4 of a packet quoted in an ICMP error: only what is present, nothing validated."""
    available = end - offset
    proto = pkt.proto
    if proto in (PROTO_TCP, PROTO_UDP):
        if available < 4:
            pkt.malformed = _QUOTE_TRUNCATED
            return
        pkt.sport, pkt.dport = _PORTS.unpack_from(data, offset)
        if proto == PROTO_TCP:
            _quoted_tcp(pkt, data, offset, available)
    elif proto == (PROTO_ICMP if pkt.family == 4 else PROTO_ICMPV6):
        if available < 8:
            pkt.malformed = _QUOTE_TRUNCATED
            return
        icmp_type, pkt.icmp_code, ident = _ICMP.unpack_from(data, offset)
        pkt.icmp_type = icmp_type
        if icmp_type in (_ICMP_QUERIES if pkt.family == 4 else _ICMPV6_QUERIES):
            pkt.icmp_id = ident


def _quoted_tcp(pkt: Packet, data: Buffer, offset: int, available: int) -> None:
    if available >= 8:
        pkt.seq = _U32.unpack_from(data, offset + 4)[0]
    if available >= 12:
        pkt.ack = _U32.unpack_from(data, offset + 8)[0]
    if available >= 14:
        pkt.tcp_flags = data[offset + 13]
    if available >= 16:
        pkt.window = _U16.unpack_from(data, offset + 14)[0]
