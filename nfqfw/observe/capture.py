"""Read IP packets out of pcap and pcapng capture files (no scapy: plain struct parsing).

`read_capture(path)` yields `Record(timestamp, iface, ip)` for each IPv4/IPv6 packet: the
timestamp in float seconds, the interface name (pcapng `if_name`, else None) and the bytes
starting at the IP header. Frames that carry no IP (ARP, LLDP, ...) are skipped and counted
in `CaptureReader.skipped`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VLAN = 0x8100
ETHERTYPE_QINQ = 0x88A8

PCAP_MAGIC_MICRO = 0xA1B2C3D4
PCAP_MAGIC_NANO = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAPNG_IDB = 1
PCAPNG_SPB = 3
PCAPNG_EPB = 6

OPT_END = 0
OPT_IF_NAME = 2
OPT_IF_TSRESOL = 9


class CaptureError(Exception):
    """The file is not a capture this reader understands, or is cut short."""


class Record(NamedTuple):
    timestamp: float
    iface: str | None
    ip: bytes


class _Interface(NamedTuple):
    linktype: int
    name: str | None
    units_per_second: int
    snaplen: int


def ip_payload(linktype: int, frame: bytes) -> bytes | None:
    """The IP packet inside a link-layer frame, or None if the frame carries no IPv4/IPv6."""
    if linktype == LINKTYPE_ETHERNET:
        return _ethernet(frame)
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return frame if frame and frame[0] >> 4 in (4, 6) else None
    if linktype == LINKTYPE_LINUX_SLL:  # 16-byte header, protocol at offset 14
        return _by_ethertype(frame, 14, 16)
    if linktype == LINKTYPE_LINUX_SLL2:  # 20-byte header, protocol at offset 0
        return _by_ethertype(frame, 0, 20)
    raise CaptureError(f"unsupported link type {linktype}")


def _ethernet(frame: bytes) -> bytes | None:
    at = 12
    while len(frame) >= at + 2:
        ethertype = int.from_bytes(frame[at : at + 2], "big")
        if ethertype in (ETHERTYPE_VLAN, ETHERTYPE_QINQ):
            at += 4  # skip the tag (TCI) and read the inner ethertype
            continue
        return frame[at + 2 :] if ethertype in (ETHERTYPE_IPV4, ETHERTYPE_IPV6) else None
    return None


def _by_ethertype(frame: bytes, at: int, header_len: int) -> bytes | None:
    if len(frame) < header_len:
        return None
    ethertype = int.from_bytes(frame[at : at + 2], "big")
    return frame[header_len:] if ethertype in (ETHERTYPE_IPV4, ETHERTYPE_IPV6) else None


class CaptureReader:
    """Iterate the IP packets of one capture file; `skipped` counts frames without IP."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.skipped = 0

    def __iter__(self) -> Iterator[Record]:
        head = self.stream.read(4)
        if len(head) < 4:
            raise CaptureError("file too short to be a capture")
        frames = self._pcapng(head) if int.from_bytes(head, "little") == PCAPNG_SHB else self._pcap(head)
        for timestamp, iface, linktype, frame in frames:
            ip = ip_payload(linktype, frame)
            if ip is None:
                self.skipped += 1
                continue
            yield Record(timestamp, iface, ip)

    # -- classic pcap ----------------------------------------------------------------------
    def _pcap(self, head: bytes) -> Iterator[tuple[float, str | None, int, bytes]]:
        for order in ("<", ">"):
            magic = struct.unpack(order + "I", head)[0]
            if magic in (PCAP_MAGIC_MICRO, PCAP_MAGIC_NANO):
                break
        else:
            raise CaptureError(f"not a pcap or pcapng file (magic 0x{head.hex()})")
        divisor = 1_000_000 if magic == PCAP_MAGIC_MICRO else 1_000_000_000
        rest = self._exact(20, "pcap file header")
        linktype = struct.unpack(order + "HHiIII", rest)[5] & 0x0FFFFFFF  # top bits: FCS info
        record = struct.Struct(order + "IIII")
        while header := self.stream.read(record.size):
            if len(header) < record.size:
                raise CaptureError("truncated pcap record header")
            seconds, fraction, captured, _original = record.unpack(header)
            frame = self._exact(captured, "pcap record")
            yield seconds + fraction / divisor, None, linktype, frame

    # -- pcapng ----------------------------------------------------------------------------
    def _pcapng(self, head: bytes) -> Iterator[tuple[float, str | None, int, bytes]]:
        order, interfaces = self._section_header(head)
        while True:
            head = self.stream.read(4)
            if not head:
                return
            if len(head) < 4:
                raise CaptureError("truncated pcapng block")
            if int.from_bytes(head, "little") == PCAPNG_SHB:
                order, interfaces = self._section_header(head)
                continue
            block_type = struct.unpack(order + "I", head)[0]
            body = self._block_body(order)
            if block_type == PCAPNG_IDB:
                interfaces.append(self._interface(order, body))
            elif block_type == PCAPNG_EPB:
                yield self._enhanced_packet(order, body, interfaces)
            elif block_type == PCAPNG_SPB:
                if not interfaces:
                    raise CaptureError("simple packet block before any interface description")
                first = interfaces[0]
                length = struct.unpack(order + "I", body[:4])[0]
                frame = body[4 : 4 + min(length, first.snaplen or length)]
                yield 0.0, first.name, first.linktype, frame  # SPBs carry no timestamp

    def _section_header(self, head: bytes) -> tuple[str, list[_Interface]]:
        raw_length = self._exact(4, "pcapng section header")
        magic = self._exact(4, "pcapng section header")
        if int.from_bytes(magic, "little") == PCAPNG_BYTE_ORDER_MAGIC:
            order = "<"
        elif int.from_bytes(magic, "big") == PCAPNG_BYTE_ORDER_MAGIC:
            order = ">"
        else:
            raise CaptureError("pcapng section header with a bad byte-order magic")
        length = struct.unpack(order + "I", raw_length)[0]
        if length < 28 or length % 4:
            raise CaptureError(f"pcapng section header of bad length {length}")
        self._exact(length - 12, "pcapng section header")
        return order, []

    def _block_body(self, order: str) -> bytes:
        length = struct.unpack(order + "I", self._exact(4, "pcapng block"))[0]
        if length < 12 or length % 4:
            raise CaptureError(f"pcapng block of bad length {length}")
        rest = self._exact(length - 8, "pcapng block")
        return rest[:-4]  # drop the trailing copy of the length

    def _interface(self, order: str, body: bytes) -> _Interface:
        if len(body) < 8:
            raise CaptureError("truncated pcapng interface description")
        linktype, _reserved, snaplen = struct.unpack(order + "HHI", body[:8])
        name: str | None = None
        units = 1_000_000  # default if_tsresol: microseconds
        for code, value in _options(order, body[8:]):
            if code == OPT_IF_NAME:
                name = value.rstrip(b"\0").decode("utf-8", "replace")
            elif code == OPT_IF_TSRESOL and value:
                exponent = value[0] & 0x7F
                units = 2**exponent if value[0] & 0x80 else 10**exponent
        return _Interface(linktype, name, units, snaplen)

    def _enhanced_packet(
        self, order: str, body: bytes, interfaces: list[_Interface]
    ) -> tuple[float, str | None, int, bytes]:
        if len(body) < 20:
            raise CaptureError("truncated pcapng enhanced packet")
        index, high, low, captured, _original = struct.unpack(order + "IIIII", body[:20])
        if index >= len(interfaces):
            raise CaptureError(f"packet on undeclared interface {index}")
        iface = interfaces[index]
        ticks = high << 32 | low
        return ticks / iface.units_per_second, iface.name, iface.linktype, body[20 : 20 + captured]

    def _exact(self, size: int, what: str) -> bytes:
        data = self.stream.read(size)
        if len(data) != size:
            raise CaptureError(f"truncated {what}")
        return data


def _options(order: str, data: bytes) -> Iterator[tuple[int, bytes]]:
    at = 0
    while at + 4 <= len(data):
        code, length = struct.unpack(order + "HH", data[at : at + 4])
        if code == OPT_END:
            return
        yield code, data[at + 4 : at + 4 + length]
        at += 4 + length + (-length % 4)


def read_capture(path: str) -> Iterator[Record]:
    """Yield the IP packets of a pcap or pcapng file (see CaptureReader for skip counts)."""
    with open(path, "rb") as stream:
        yield from CaptureReader(stream)
