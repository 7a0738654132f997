"""nfqfw.core.build: every builder's bytes compared with what scapy builds (checksums included)."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.packet import Raw

from nfqfw.core import build

SRC4, DST4 = "192.0.2.10", "198.51.100.20"
SRC6, DST6 = "2001:db8::10", "2001:db8:1::20"
S4, D4, S6, D6 = build.addr(SRC4), build.addr(DST4), build.addr(SRC6), build.addr(DST6)


def _wrap(ip: type, src: str, dst: str, proto: int, l4: bytes) -> bytes:
    """Our L4 bytes inside a scapy IP header naming the right protocol."""
    if ip is IP:
        return bytes(IP(src=src, dst=dst, proto=proto) / Raw(l4))
    return bytes(IPv6(src=src, dst=dst, nh=proto) / Raw(l4))


def test_addr_parses_both_families() -> None:
    assert build.addr("192.0.2.1") == bytes((192, 0, 2, 1))
    assert build.addr("2001:db8::1") == bytes.fromhex("20010db8000000000000000000000001")
    with pytest.raises(OSError):
        build.addr("not-an-address")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0xFFFF),
        (b"\x00\x01\xf2\x03\xf4\xf5\xf6\xf7", 0x220D),  # RFC 1071 section 3 example, complemented
        (b"\xff", 0x00FF),  # odd length: padded with a zero byte
        (b"\xff\xff", 0x0000),
    ],
)
def test_checksum_known_values(data: bytes, expected: int) -> None:
    assert build.checksum(data) == expected


def test_checksum_of_data_with_its_checksum_is_zero() -> None:
    header = build.ipv4_header(S4, D4, 6, 100, ttl=33, tos=0x10, ident=0xBEEF)
    assert build.checksum(header) == 0


def test_ipv4_matches_scapy() -> None:
    ours = build.ipv4(S4, D4, 17, b"payload", ttl=33, ident=0x1234, tos=0x10, dont_fragment=True)
    theirs = IP(src=SRC4, dst=DST4, proto=17, ttl=33, id=0x1234, tos=0x10, flags="DF") / Raw(b"payload")
    assert ours == bytes(theirs)


def test_ipv4_fragment_and_options_match_scapy() -> None:
    options = b"\x94\x04\x00\x00\x01"  # router alert + one NOP, padded to 8 by the builder
    ours = build.ipv4(S4, D4, 6, b"x" * 16, ident=7, more_fragments=True, frag_offset=1480, options=options)
    theirs = IP(src=SRC4, dst=DST4, proto=6, id=7, flags="MF", frag=185, options=[options + b"\0\0\0"]) / Raw(
        b"x" * 16
    )
    assert ours == bytes(theirs)
    assert ours[0] == 0x47  # IHL 7


def test_ipv4_rejects_unencodable_arguments() -> None:
    with pytest.raises(ValueError, match="fragment offset 3"):
        build.ipv4(S4, D4, 6, b"", frag_offset=3)
    with pytest.raises(ValueError, match="options too long"):
        build.ipv4(S4, D4, 6, b"", options=bytes(44))
    with pytest.raises(ValueError, match="4 bytes"):
        build.ipv4(S6, D6, 6, b"")


def test_ipv6_matches_scapy() -> None:
    ours = build.ipv6(S6, D6, 59, b"", hop_limit=7)
    assert ours == bytes(IPv6(src=SRC6, dst=DST6, nh=59, hlim=7))
    with pytest.raises(ValueError, match="16 bytes"):
        build.ipv6(S4, D4, 59, b"")


def test_ipv6_extension_headers_match_scapy() -> None:
    hop = build.ipv6_options_header(60)
    dest = build.ipv6_options_header(44, b"\x1e\x01\x00")  # an unknown option of 1 byte
    frag = build.ipv6_fragment_header(17, offset=0, more=True, ident=99)
    ours = build.ipv6(S6, D6, 0, hop + dest + frag + b"z" * 8)
    theirs = (
        IPv6(src=SRC6, dst=DST6)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt(options=[])
        / IPv6ExtHdrFragment(nh=17, m=1, id=99)
        / Raw(b"z" * 8)
    )
    parsed = IPv6(ours)
    assert len(hop) == 8 and len(dest) == 8 and len(frag) == 8
    assert parsed[IPv6ExtHdrFragment].m == 1 and parsed[IPv6ExtHdrFragment].id == 99
    assert bytes(parsed[IPv6ExtHdrDestOpt])[:5] == b"\x2c\x00\x1e\x01\x00"
    # Same layout as scapy's except for the option bytes (scapy pads differently).
    assert ours[:40] == bytes(theirs)[:40]
    assert bytes(parsed[IPv6ExtHdrFragment]) == bytes(theirs[IPv6ExtHdrFragment])
    with pytest.raises(ValueError, match="fragment offset 12"):
        build.ipv6_fragment_header(6, offset=12)


@pytest.mark.parametrize(("src", "dst", "ip"), [(SRC4, DST4, IP), (SRC6, DST6, IPv6)])
def test_tcp_with_every_option_matches_scapy(src: str, dst: str, ip: type) -> None:
    options = (
        build.mss_option(1460)
        + build.sack_perm_option()
        + build.timestamp_option(100, 200)
        + build.NOP
        + build.wscale_option(7)
        + build.NOP
        + build.NOP
        + build.sack_option([(1000, 2000), (3000, 4000)])
    )
    segment = build.tcp(
        build.addr(src),
        build.addr(dst),
        40000,
        443,
        seq=1,
        ack=2,
        flags=0x18,
        window=501,
        options=options,
        payload=b"hello",
    )
    theirs = TCP(
        sport=40000,
        dport=443,
        seq=1,
        ack=2,
        flags="PA",
        window=501,
        options=[
            ("MSS", 1460),
            ("SAckOK", b""),
            ("Timestamp", (100, 200)),
            ("NOP", None),
            ("WScale", 7),
            ("NOP", None),
            ("NOP", None),
            ("SAck", (1000, 2000, 3000, 4000)),
        ],
    ) / Raw(b"hello")
    assert _wrap(ip, src, dst, 6, segment) == bytes(ip(src=src, dst=dst) / theirs)
    assert segment[12] >> 4 == 15  # 20 + 40 option bytes: the largest TCP header


def test_tcp_options_are_padded_with_end_of_list() -> None:
    segment = build.tcp(S4, D4, 1, 2, options=build.wscale_option(14))
    assert segment[12] >> 4 == 6
    assert segment[20:24] == b"\x03\x03\x0e\x00"


@pytest.mark.parametrize(("src", "dst", "ip"), [(SRC4, DST4, IP), (SRC6, DST6, IPv6)])
def test_udp_matches_scapy(src: str, dst: str, ip: type) -> None:
    datagram = build.udp(build.addr(src), build.addr(dst), 5353, 53, b"query!")
    theirs = ip(src=src, dst=dst) / UDP(sport=5353, dport=53) / Raw(b"query!")
    assert _wrap(ip, src, dst, 17, datagram) == bytes(theirs)


def test_udp_zero_checksum_is_sent_as_all_ones() -> None:
    # Find a payload whose checksum computes to 0, then check it is encoded as 0xFFFF.
    base = build.udp(S4, D4, 1, 2, b"\0\0")
    value = int.from_bytes(base[6:8], "big")  # the complement of the sum with payload 0
    datagram = build.udp(S4, D4, 1, 2, value.to_bytes(2, "big"))
    assert datagram[6:8] == b"\xff\xff"


def test_icmp_echo_and_error_match_scapy() -> None:
    echo = build.icmp(8, 0, (0x4242, 7), b"ping")
    assert echo == bytes(ICMP(type=8, code=0, id=0x4242, seq=7) / Raw(b"ping"))
    error = build.icmp(3, 4, b"\x00\x00\x05\xdc", b"quoted")
    assert error == bytes(ICMP(type=3, code=4, nexthopmtu=1500) / Raw(b"quoted"))
    with pytest.raises(ValueError, match="4 bytes"):
        build.icmp(3, 3, b"\0")


def test_icmpv6_matches_scapy() -> None:
    echo = build.icmpv6(S6, D6, 128, 0, b"\x00\x05\x00\x01hi")
    theirs = IPv6(src=SRC6, dst=DST6) / ICMPv6EchoRequest(id=5, seq=1, data=b"hi")
    assert _wrap(IPv6, SRC6, DST6, 58, echo) == bytes(theirs)
    too_big = build.icmpv6(S6, D6, 2, 0, b"\x00\x00\x05\x00" + b"q" * 40)
    theirs = IPv6(src=SRC6, dst=DST6) / ICMPv6PacketTooBig(mtu=1280) / Raw(b"q" * 40)
    assert _wrap(IPv6, SRC6, DST6, 58, too_big) == bytes(theirs)


def test_full_packet_equals_scapy_built_one() -> None:
    packet = build.ipv4(S4, D4, 6, build.tcp(S4, D4, 1234, 80, seq=5, flags=0x02), ident=1)
    theirs = IP(src=SRC4, dst=DST4, id=1) / TCP(sport=1234, dport=80, seq=5, flags="S", window=65535)
    assert packet == bytes(theirs)
