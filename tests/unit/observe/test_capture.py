"""The raw pcap/pcapng reader: file formats, byte orders, timestamp resolutions, link types."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from scapy.all import ARP, IP, TCP, UDP, CookedLinux, CookedLinuxV2, Dot1Q, Ether, IPv6, wrpcap, wrpcapng

from nfqfw.observe.capture import CaptureError, CaptureReader, Record, ip_payload, read_capture

V4 = bytes(IP(src="10.0.0.25", dst="203.0.113.10") / TCP(sport=40000, dport=80, flags="S"))
V6 = bytes(IPv6(src="fd00::25", dst="2001:db8::10") / UDP(sport=53000, dport=53))


def pcap(records: list[tuple[int, int, bytes]], linktype: int, order: str = "<", nano: bool = False) -> bytes:
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for seconds, fraction, frame in records:
        out += struct.pack(order + "IIII", seconds, fraction, len(frame), len(frame)) + frame
    return out


def block(order: str, block_type: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    length = len(body) + 12
    return struct.pack(order + "II", block_type, length) + body + struct.pack(order + "I", length)


def option(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def shb(order: str) -> bytes:
    return block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def idb(order: str, linktype: int, name: str | None = None, tsresol: int | None = None) -> bytes:
    options = b""
    if name is not None:
        options += option(order, 2, name.encode())
    if tsresol is not None:
        options += option(order, 9, bytes([tsresol]))
    if options:
        options += option(order, 0, b"")
    return block(order, 1, struct.pack(order + "HHI", linktype, 0, 0) + options)


def epb(order: str, iface: int, ticks: int, frame: bytes) -> bytes:
    head = struct.pack(order + "IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), len(frame))
    return block(order, 6, head + frame)


def records(data: bytes) -> list[Record]:
    return list(CaptureReader(io.BytesIO(data)))


@pytest.mark.parametrize("order", ["<", ">"])
def test_classic_pcap_microseconds_both_byte_orders(order: str) -> None:
    data = pcap([(100, 250000, bytes(Ether() / IP(V4)))], 1, order)
    assert records(data) == [Record(100.25, None, V4)]


@pytest.mark.parametrize("order", ["<", ">"])
def test_classic_pcap_nanoseconds(order: str) -> None:
    data = pcap([(7, 500_000_000, V6)], 101, order, nano=True)
    assert records(data) == [Record(7.5, None, V6)]


def test_scapy_written_pcap_and_nano_pcap(tmp_path: Path) -> None:
    frame = Ether() / IP(V4)
    frame.time = 12.5
    wrpcap(str(tmp_path / "micro.pcap"), [frame])
    wrpcap(str(tmp_path / "nano.pcap"), [frame], nano=True)
    assert list(read_capture(str(tmp_path / "micro.pcap"))) == [Record(12.5, None, V4)]
    assert list(read_capture(str(tmp_path / "nano.pcap"))) == [Record(12.5, None, V4)]


def test_ethernet_skips_vlan_tags_and_counts_non_ip_frames() -> None:
    frames = [
        bytes(Ether() / Dot1Q(vlan=10) / IP(V4)),
        bytes(Ether(type=0x88A8) / Dot1Q(vlan=20) / Dot1Q(vlan=30) / IPv6(V6)),
        bytes(Ether() / ARP()),
        bytes(Ether(type=0x88CC) / b"lldp"),
        bytes(Ether() / IPv6(V6)),
    ]
    reader = CaptureReader(io.BytesIO(pcap([(1, 0, frame) for frame in frames], 1)))
    assert [record.ip for record in reader] == [V4, V6, V6]
    assert reader.skipped == 2


def test_linux_cooked_v1_and_v2() -> None:
    v1 = [bytes(CookedLinux(proto=0x0800) / IP(V4)), bytes(CookedLinux(proto=0x0806) / ARP())]
    v2 = [bytes(CookedLinuxV2(proto=0x86DD) / IPv6(V6)), bytes(CookedLinuxV2(proto=0x0806) / ARP())]
    assert [r.ip for r in records(pcap([(1, 0, f) for f in v1], 113))] == [V4]
    assert [r.ip for r in records(pcap([(1, 0, f) for f in v2], 276))] == [V6]


@pytest.mark.parametrize("linktype", [101, 228, 229])
def test_raw_ip_link_types(linktype: int) -> None:
    packet = V4 if linktype != 229 else V6
    assert records(pcap([(3, 0, packet)], linktype)) == [Record(3.0, None, packet)]


def test_unsupported_link_type_is_an_error() -> None:
    with pytest.raises(CaptureError, match=r"^unsupported link type 105$"):
        records(pcap([(1, 0, b"\x08\x00")], 105))
    assert ip_payload(1, b"\x00" * 12) is None  # a runt frame carries no IP


@pytest.mark.parametrize("order", ["<", ">"])
def test_pcapng_interface_names_and_timestamp_resolutions(order: str) -> None:
    data = (
        shb(order)
        + idb(order, 1, "lan0")  # default resolution: microseconds
        + idb(order, 101, "wan0", tsresol=9)  # 10^-9
        + idb(order, 276, None, tsresol=0x80 | 10)  # 2^-10
        + epb(order, 0, 1_500_000, bytes(Ether() / IP(V4)))
        + epb(order, 1, 2_250_000_000, V6)
        + block(order, 5, b"statistics block, ignored")
        + epb(order, 2, 3 * 1024 + 512, bytes(CookedLinuxV2(proto=0x0800) / IP(V4)))
    )
    assert records(data) == [Record(1.5, "lan0", V4), Record(2.25, "wan0", V6), Record(3.5, None, V4)]


def test_pcapng_simple_packet_block_uses_the_first_interface() -> None:
    spb = block("<", 3, struct.pack("<I", len(V4)) + V4)
    assert records(shb("<") + idb("<", 228, "tun0") + spb) == [Record(0.0, "tun0", V4)]


def test_pcapng_new_section_resets_interfaces_and_may_switch_byte_order() -> None:
    data = shb("<") + idb("<", 101, "a0") + epb("<", 0, 1_000_000, V4)
    data += shb(">") + idb(">", 101, "b0") + epb(">", 0, 2_000_000, V6)
    assert records(data) == [Record(1.0, "a0", V4), Record(2.0, "b0", V6)]


def test_scapy_written_pcapng_keeps_interface_names(tmp_path: Path) -> None:
    first, second = Ether() / IP(V4), Ether() / IPv6(V6)
    first.sniffed_on, first.time = "lan0", 5.0
    second.sniffed_on, second.time = "wan0", 6.0
    wrpcapng(str(tmp_path / "two.pcapng"), [first, second])
    assert list(read_capture(str(tmp_path / "two.pcapng"))) == [
        Record(5.0, "lan0", V4),
        Record(6.0, "wan0", V6),
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xd4\xc3", "file too short to be a capture"),
        (b"GIF89a..", "not a pcap or pcapng file (magic 0x47494638)"),
        (pcap([(1, 0, V4)], 101)[:-3], "truncated pcap record"),
        (pcap([(1, 0, V4)], 101)[:30], "truncated pcap record header"),
        (shb("<") + epb("<", 0, 1, V4), "packet on undeclared interface 0"),
        (shb("<") + idb("<", 101)[:10], "truncated pcapng block"),
        (
            shb("<")[:4] + struct.pack("<I", 28) + b"\0\0\0\0",
            "pcapng section header with a bad byte-order magic",
        ),
    ],
)
def test_damaged_files_raise_capture_errors(data: bytes, message: str) -> None:
    with pytest.raises(CaptureError) as raised:
        records(data)
    assert str(raised.value) == message
