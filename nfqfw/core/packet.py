"""The decoded form of one IP packet (filled by `nfqfw.core.decode`).

A plain record with __slots__: decoding allocates exactly one of these per packet (two
for an ICMP error, whose embedded header is decoded into `inner`).
"""

from __future__ import annotations

# TCP flag bits, as on the wire.
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

# Fragment position of a packet.
FRAG_NONE = 0  # not a fragment
FRAG_FIRST = 1  # offset 0 with more fragments: carries the L4 header
FRAG_LATER = 2  # offset > 0: no L4 header, ports unknown


class Packet:
    """Decoded IPv4/IPv6 packet. Fields that do not apply keep their defaults."""

    __slots__ = (
        "ack",
        "dport",
        "dst",
        "family",
        "frag",
        "icmp_code",
        "icmp_id",
        "icmp_type",
        "inner",
        "l4_offset",
        "length",
        "malformed",
        "mss",
        "payload_len",
        "proto",
        "sack",
        "sack_perm",
        "seq",
        "sport",
        "src",
        "tcp_flags",
        "truncated",
        "ts",
        "ttl",
        "window",
        "wscale",
    )

    def __init__(self) -> None:
        self.family: int = 0  # 4 or 6
        self.src: bytes = b""  # 4 or 16 raw address bytes
        self.dst: bytes = b""
        self.proto: int = 0  # upper-layer protocol (IPv6: after the extension-header chain)
        self.ttl: int = 0  # TTL / hop limit
        self.length: int = 0  # bytes of the IP packet (header + payload) by its length field
        # Cut short by the queue's copy range (a GSO packet, or one longer than the range): the
        # headers are in the bytes, the lengths (`length`, `payload_len`) are the IP header's.
        self.truncated: bool = False
        self.frag: int = FRAG_NONE
        self.l4_offset: int = 0  # offset of the L4 header in the packet bytes
        self.sport: int = 0  # TCP/UDP ports, 0 when absent
        self.dport: int = 0
        self.tcp_flags: int = 0
        self.seq: int = 0
        self.ack: int = 0
        self.window: int = 0  # raw, unscaled window field
        self.wscale: int = -1  # window-scale option shift, -1 when absent
        self.mss: int = 0  # 0 when absent
        self.sack_perm: bool = False
        self.sack: tuple[tuple[int, int], ...] = ()  # SACK blocks (left, right)
        self.ts: tuple[int, int] | None = None  # (tsval, tsecr)
        self.payload_len: int = 0  # L4 payload bytes (TCP segment data, UDP payload, ICMP body)
        self.icmp_type: int = -1
        self.icmp_code: int = -1
        self.icmp_id: int = 0  # echo / query identifier
        self.inner: Packet | None = None  # header embedded in an ICMP/ICMPv6 error
        self.malformed: str | None = None  # why the packet cannot be trusted, None when sane

    def __repr__(self) -> str:
        ports = f"{self.sport}->{self.dport}"
        return f"<Packet v{self.family} proto={self.proto} {ports} malformed={self.malformed}>"
