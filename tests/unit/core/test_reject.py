"""nfqfw.core.reject: the RST / ICMP answers, parsed back with scapy to check every field."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_Redirect,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)

from nfqfw.core.reject import build_reject


def _tcp4(flags: str, seq: int = 1000, ack: int = 0, payload: bytes = b"", **ip: object) -> bytes:
    fields = {"src": "192.0.2.10", "dst": "198.51.100.20", **ip}
    return bytes(IP(**fields) / TCP(sport=40000, dport=81, flags=flags, seq=seq, ack=ack) / payload)


def _tcp6(flags: str, seq: int = 1000, ack: int = 0, payload: bytes = b"") -> bytes:
    packet = IPv6(src="2001:db8::10", dst="2001:db8:1::20") / TCP(
        sport=40000, dport=81, flags=flags, seq=seq, ack=ack
    )
    return bytes(packet / payload)


def _checksums_ok(packet: IP | IPv6) -> bool:
    """Rebuild with checksums recomputed by scapy and compare to what we produced."""
    original = bytes(packet)
    clone = packet.__class__(original)
    for layer in (IP, TCP, ICMP):
        if clone.haslayer(layer) and hasattr(clone[layer], "chksum"):
            del clone[layer].chksum
    if clone.haslayer(ICMPv6DestUnreach):
        del clone[ICMPv6DestUnreach].cksum
    return bytes(clone.__class__(bytes(clone))) == original


# --- TCP reset --------------------------------------------------------------------------------


def test_rst_for_syn_acks_seq_plus_one_from_seq_zero() -> None:
    reply = IP(build_reject(_tcp4("S", seq=1000), "tcp-reset"))
    assert (reply.src, reply.dst, reply.ttl, str(reply.flags), reply.frag, reply.proto) == (
        "198.51.100.20",
        "192.0.2.10",
        64,
        "DF",
        0,
        6,
    )
    tcp = reply[TCP]
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack, str(tcp.flags), tcp.window, tcp.dataofs) == (
        81,
        40000,
        0,
        1001,
        "RA",
        0,
        5,
    )
    assert reply.len == 40 and bytes(tcp.payload) == b""
    assert _checksums_ok(reply)


def test_rst_for_segment_with_ack_takes_its_ack_as_seq_and_no_ack_flag() -> None:
    reply = IP(build_reject(_tcp4("PA", seq=5000, ack=77777, payload=b"x" * 100), "tcp-reset"))
    assert (reply[TCP].seq, reply[TCP].ack, str(reply[TCP].flags)) == (77777, 0, "R")
    assert _checksums_ok(reply)


def test_rst_without_ack_counts_payload_syn_and_fin() -> None:
    reply = IP(build_reject(_tcp4("SF", seq=0xFFFFFFF0, payload=b"y" * 20), "tcp-reset"))
    # 20 bytes + SYN + FIN, wrapping modulo 2**32
    assert (reply[TCP].seq, reply[TCP].ack, str(reply[TCP].flags)) == (0, 6, "RA")


def test_rst_ignores_ethernet_padding_beyond_ip_total_length() -> None:
    data = _tcp4("S", seq=1000) + b"\0" * 6
    assert IP(build_reject(data, "tcp-reset"))[TCP].ack == 1001


# A GSO packet as NFQUEUE hands it over: its first CAP bytes, the IP length counting them all.
CAP = 3840


@pytest.mark.parametrize("make", [_tcp4, _tcp6], ids=["ipv4", "ipv6"])
def test_rst_for_a_gso_segment_cut_by_the_copy_range(make: Callable[..., bytes]) -> None:
    with_ack = make("PA", seq=5000, ack=77777, payload=b"x" * 60000)
    reply = build_reject(with_ack[:CAP], "tcp-reset", CAP)
    assert reply is not None and reply == build_reject(with_ack, "tcp-reset")
    without_ack = make("P", seq=0xFFFF0000, payload=b"y" * 60000)
    reply = build_reject(without_ack[:CAP], "tcp-reset", CAP)
    assert reply is not None and reply == build_reject(without_ack, "tcp-reset")
    layer = (IP if make is _tcp4 else IPv6)(reply)[TCP]
    assert (layer.seq, layer.ack, str(layer.flags)) == (0, (0xFFFF0000 + 60000) & 0xFFFFFFFF, "RA")
    assert build_reject(without_ack[:CAP], "tcp-reset") is None  # without the cap: a lying length


@pytest.mark.parametrize("kind", ["icmp-port-unreachable", "icmp-admin-prohibited"])
def test_icmp_for_a_datagram_cut_by_the_copy_range_quotes_its_start(kind: str) -> None:
    for original in (
        bytes(IP(src="192.0.2.10", dst="198.51.100.20") / UDP(sport=5000, dport=53) / (b"Q" * 9000)),
        bytes(IPv6(src="2001:db8::10", dst="2001:db8:1::20") / UDP(sport=5000, dport=53) / (b"Q" * 9000)),
    ):
        assert build_reject(original[:CAP], kind, CAP) == build_reject(original, kind)


def test_no_rst_for_rst() -> None:
    assert build_reject(_tcp4("R", seq=1), "tcp-reset") is None
    assert build_reject(_tcp4("RA", seq=1, ack=2), "tcp-reset") is None


def test_rst_ipv6() -> None:
    reply = IPv6(build_reject(_tcp6("S", seq=41), "tcp-reset"))
    assert (reply.src, reply.dst, reply.hlim, reply.nh, reply.plen, reply.fl, reply.tc) == (
        "2001:db8:1::20",
        "2001:db8::10",
        64,
        6,
        20,
        0,
        0,
    )
    assert (reply[TCP].sport, reply[TCP].dport, reply[TCP].seq, reply[TCP].ack, str(reply[TCP].flags)) == (
        81,
        40000,
        0,
        42,
        "RA",
    )
    assert _checksums_ok(reply)


def test_rst_ipv6_after_extension_headers() -> None:
    packet = (
        IPv6(src="2001:db8::10", dst="2001:db8:1::20")
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / TCP(sport=1, dport=2, flags="A", seq=3, ack=99)
    )
    reply = IPv6(build_reject(bytes(packet), "tcp-reset"))
    assert (reply[TCP].sport, reply[TCP].dport, reply[TCP].seq, str(reply[TCP].flags)) == (2, 1, 99, "R")
    assert _checksums_ok(reply)


def test_tcp_reset_for_udp_falls_back_to_port_unreachable() -> None:
    udp = bytes(IP(src="192.0.2.10", dst="198.51.100.20") / UDP(sport=5000, dport=53) / b"q")
    reply = IP(build_reject(udp, "tcp-reset"))
    assert (reply[ICMP].type, reply[ICMP].code) == (3, 3)


# --- ICMP -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "code"), [("icmp-port-unreachable", 3), ("icmp-admin-prohibited", 13)])
def test_icmp4_unreachable_quotes_header_and_64_bits(kind: str, code: int) -> None:
    original = bytes(
        IP(src="192.0.2.10", dst="198.51.100.20", id=4242, ttl=63) / UDP(sport=5000, dport=53) / (b"Q" * 50)
    )
    data = build_reject(original, kind)
    assert data is not None
    reply = IP(data)
    assert (reply.src, reply.dst, reply.proto, reply.ttl, reply.tos) == (
        "198.51.100.20",
        "192.0.2.10",
        1,
        64,
        0xC0,
    )
    assert (reply[ICMP].type, reply[ICMP].code) == (3, code)
    assert data[24:28] == b"\0\0\0\0"  # unused
    assert data[28:] == original[:28]  # the original 20-byte header + 8 bytes of its data
    assert reply.len == 20 + 8 + 28
    assert reply[IPerror].id == 4242 and reply[UDPerror].dport == 53
    assert _checksums_ok(reply)


def test_icmp4_quote_keeps_ip_options() -> None:
    original = bytes(IP(src="192.0.2.10", dst="198.51.100.20", options=b"\x01\x01\x01\x00") / UDP(dport=9))
    reply = IP(build_reject(original, "icmp-port-unreachable"))
    assert bytes(reply[ICMP].payload) == original[:32]


def test_icmp4_for_tcp_quotes_ports_and_seq() -> None:
    original = _tcp4("S", seq=123456)
    reply = IP(build_reject(original, "icmp-admin-prohibited"))
    assert (reply[ICMP].type, reply[ICMP].code) == (3, 13)
    assert (reply[TCPerror].sport, reply[TCPerror].dport, reply[TCPerror].seq) == (40000, 81, 123456)


@pytest.mark.parametrize(("kind", "code"), [("icmp-port-unreachable", 4), ("icmp-admin-prohibited", 1)])
def test_icmp6_unreachable_quotes_the_packet(kind: str, code: int) -> None:
    original = bytes(IPv6(src="2001:db8::10", dst="2001:db8:1::20") / UDP(sport=5000, dport=53) / (b"Q" * 10))
    reply = IPv6(build_reject(original, kind))
    assert (reply.src, reply.dst, reply.nh, reply.hlim) == ("2001:db8:1::20", "2001:db8::10", 58, 64)
    unreach = reply[ICMPv6DestUnreach]
    assert (unreach.type, unreach.code) == (1, code)
    assert bytes(unreach.payload) == original
    assert reply[IPerror6].src == "2001:db8::10"
    assert _checksums_ok(reply)


def test_icmp6_quote_is_cut_to_fit_1280_bytes() -> None:
    original = bytes(IPv6(src="2001:db8::10", dst="2001:db8:1::20") / UDP(dport=53) / (b"Z" * 1400))
    data = build_reject(original, "icmp-port-unreachable")
    assert data is not None and len(data) == 1280
    reply = IPv6(data)
    assert reply.plen == 1240
    assert data[48:] == original[:1232]
    assert _checksums_ok(reply)


def test_icmp6_answers_echo_request() -> None:
    original = bytes(IPv6(src="2001:db8::10", dst="2001:db8:1::20") / ICMPv6EchoRequest())
    assert IPv6(build_reject(original, "icmp-admin-prohibited"))[ICMPv6DestUnreach].code == 1


# --- never answered ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "packet",
    [
        IP(src="192.0.2.10", dst="198.51.100.20") / ICMP(type=3, code=1) / IPerror() / UDPerror(),
        IP(src="192.0.2.10", dst="198.51.100.20") / ICMP(type=11),
        IP(src="192.0.2.10", dst="198.51.100.20") / ICMP(type=5),
        IP(src="192.0.2.10", dst="255.255.255.255") / UDP(dport=67),
        IP(src="192.0.2.10", dst="224.0.0.251") / UDP(dport=5353),
        IP(src="0.0.0.0", dst="198.51.100.20") / UDP(dport=67),
        IP(src="224.1.2.3", dst="198.51.100.20") / UDP(dport=67),
        IP(src="192.0.2.10", dst="198.51.100.20", frag=185) / b"later fragment",
        IPv6(src="2001:db8::10", dst="2001:db8:1::20") / ICMPv6DestUnreach() / IPerror6(),
        IPv6(src="2001:db8::10", dst="2001:db8:1::20") / ICMPv6ND_Redirect(),
        IPv6(src="2001:db8::10", dst="ff02::1") / UDP(dport=5353),
        IPv6(src="::", dst="2001:db8:1::20") / UDP(dport=5353),
        IPv6(src="2001:db8::10", dst="2001:db8:1::20") / IPv6ExtHdrFragment(offset=100, nh=17) / (b"x" * 16),
    ],
    ids=lambda p: p.summary(),
)
@pytest.mark.parametrize("kind", ["tcp-reset", "icmp-port-unreachable"])
def test_never_answered(packet: IP | IPv6, kind: str) -> None:
    assert build_reject(bytes(packet), kind) is None


def test_icmp_echo_reply_and_first_fragment_are_answered() -> None:
    echo = bytes(IPv6(src="2001:db8::10", dst="2001:db8:1::20") / ICMPv6EchoReply())
    assert build_reject(echo, "icmp-port-unreachable") is not None
    first = bytes(IP(src="192.0.2.10", dst="198.51.100.20", flags="MF") / UDP(dport=53) / (b"x" * 40))
    assert IP(build_reject(first, "icmp-port-unreachable"))[ICMP].code == 3
    first6 = IPv6(src="2001:db8::10", dst="2001:db8:1::20") / IPv6ExtHdrFragment(offset=0, m=1, nh=6)
    first6 = first6 / TCP(sport=7, dport=8, flags="S", seq=9)
    assert IPv6(build_reject(bytes(first6), "tcp-reset"))[TCP].ack == 10


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x45\x00",
        bytes(IP(src="192.0.2.10", dst="198.51.100.20", proto=6))[:20] + b"\x00\x51\x00",  # TCP cut short
        bytes(IP(src="192.0.2.10", dst="198.51.100.20", proto=1)),  # ICMP without a type byte
        bytes(IPv6(src="2001:db8::10", dst="2001:db8:1::20", nh=0)),  # hop-by-hop header missing
        b"\x20" * 60,  # IP version 2
        bytes(IP(src="192.0.2.10", dst="198.51.100.20") / UDP(dport=53, len=4)),  # malformed UDP
    ],
)
def test_truncated_or_garbage_is_not_answered(data: bytes) -> None:
    assert build_reject(data, "tcp-reset") is None


def test_unknown_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown reject kind 'icmp-host-unreachable'"):
        build_reject(_tcp4("S"), "icmp-host-unreachable")
