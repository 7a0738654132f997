"""nfqfw.core.decode: every field of the Packet record, for packets built with scapy."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6NIQueryNOOP,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Packet as ScapyPacket
from scapy.packet import Raw

from nfqfw.core import build
from nfqfw.core.decode import decode
from nfqfw.core.packet import ACK, FIN, FRAG_FIRST, FRAG_LATER, FRAG_NONE, PSH, SYN, Packet

SRC4, DST4 = "192.0.2.10", "198.51.100.20"
SRC6, DST6 = "2001:db8::10", "2001:db8:1::20"
S4, D4, S6, D6 = build.addr(SRC4), build.addr(DST4), build.addr(SRC6), build.addr(DST6)

ALL_OPTIONS = [
    ("MSS", 1460),
    ("SAckOK", b""),
    ("Timestamp", (100, 200)),
    ("NOP", None),
    ("WScale", 7),
    ("NOP", None),
    ("NOP", None),
    ("SAck", (1000, 2000, 3000, 4000)),
]


def _fields(pkt: Packet) -> dict[str, object]:
    return {name: getattr(pkt, name) for name in Packet.__slots__}


def _expect(**overrides: object) -> dict[str, object]:
    """The full record expected: Packet defaults with `overrides`."""
    fields = _fields(Packet())
    unknown = set(overrides) - set(fields)
    assert not unknown, unknown
    fields.update(overrides)
    return fields


def _v4(layers: ScapyPacket, **ip: object) -> bytes:
    return bytes(IP(src=SRC4, dst=DST4, **ip) / layers)


def _v6(layers: ScapyPacket, **ip: object) -> bytes:
    return bytes(IPv6(src=SRC6, dst=DST6, **ip) / layers)


def _reason(data: bytes) -> str | None:
    return decode(data).malformed


# --- IPv4 and TCP -----------------------------------------------------------------------------


def test_ipv4_tcp_syn_with_every_option() -> None:
    data = _v4(
        TCP(sport=40000, dport=443, seq=123456789, ack=0, flags="S", window=64240, options=ALL_OPTIONS),
        ttl=61,
    )
    assert _fields(decode(data)) == _expect(
        family=4,
        src=S4,
        dst=D4,
        proto=6,
        ttl=61,
        length=80,
        l4_offset=20,
        sport=40000,
        dport=443,
        tcp_flags=SYN,
        seq=123456789,
        window=64240,
        wscale=7,
        mss=1460,
        sack_perm=True,
        sack=((1000, 2000), (3000, 4000)),
        ts=(100, 200),
    )


def test_ipv4_tcp_data_segment_payload_length_and_ack() -> None:
    data = _v4(TCP(sport=80, dport=5555, seq=7, ack=0xFFFFFFFF, flags="PA", window=501) / Raw(b"x" * 100))
    assert _fields(decode(data)) == _expect(
        family=4,
        src=S4,
        dst=D4,
        proto=6,
        ttl=64,
        length=140,
        l4_offset=20,
        sport=80,
        dport=5555,
        tcp_flags=PSH | ACK,
        seq=7,
        ack=0xFFFFFFFF,
        window=501,
        payload_len=100,
    )


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_any_buffer_type_gives_hashable_byte_addresses(wrap: type) -> None:
    pkt = decode(wrap(_v4(TCP(sport=1, dport=2, flags="A"))))
    assert type(pkt.src) is bytes and type(pkt.dst) is bytes
    assert (pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.malformed) == (S4, D4, 1, 2, None)


def test_ipv4_options_are_skipped() -> None:
    options = b"\x94\x04\x00\x00\x01\x01\x01\x00"  # router alert, NOPs, EOL: IHL 7
    data = _v4(UDP(sport=53, dport=1053) / Raw(b"abcd"), options=[options])
    pkt = decode(data)
    assert data[0] == 0x47
    assert (pkt.l4_offset, pkt.length, pkt.sport, pkt.dport, pkt.payload_len) == (28, 40, 53, 1053, 4)
    assert pkt.malformed is None


def test_bytes_past_total_length_are_ignored() -> None:
    # A 40-byte ACK padded to Ethernet's 46-byte minimum payload.
    data = _v4(TCP(sport=1, dport=2, flags="A")) + b"\0" * 6
    pkt = decode(data)
    assert (pkt.length, pkt.payload_len, pkt.malformed) == (40, 0, None)


def test_tcp_fin_ack_flags() -> None:
    pkt = decode(_v4(TCP(flags="FA")))
    assert pkt.tcp_flags == FIN | ACK


# --- TCP options ------------------------------------------------------------------------------


def _tcp_with_options(options: bytes) -> bytes:
    return build.ipv4(S4, D4, 6, build.tcp(S4, D4, 1000, 2000, flags=SYN, options=options))


def test_window_scale_shift_is_capped_at_14() -> None:
    assert decode(_tcp_with_options(build.wscale_option(15))).wscale == 14
    assert decode(_tcp_with_options(build.wscale_option(0))).wscale == 0


def test_options_after_end_of_list_are_not_parsed() -> None:
    pkt = decode(_tcp_with_options(build.EOL + b"\x02\x00\xff\xff"))
    assert (pkt.mss, pkt.malformed) == (0, None)


def test_known_option_with_wrong_length_is_ignored() -> None:
    pkt = decode(_tcp_with_options(b"\x02\x03\x05" + build.NOP + b"\x03\x04\x07\x00" + b"\x08\x06\0\0\0\1"))
    assert (pkt.mss, pkt.wscale, pkt.ts, pkt.malformed) == (0, -1, None, None)


def test_sack_with_one_block_and_bad_sack_length() -> None:
    pkt = decode(_tcp_with_options(build.NOP + build.NOP + build.sack_option([(5, 9)])))
    assert pkt.sack == ((5, 9),)
    pkt = decode(_tcp_with_options(b"\x05\x06\0\0\0\1"))  # 4 bytes: not a whole block
    assert (pkt.sack, pkt.malformed) == ((), None)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (b"\x02\x00\x00\x00", "tcp: option 2 length 0 < 2"),
        (b"\x01\x01\x08\x01", "tcp: option 8 length 1 < 2"),
        (b"\x01\x01\x01\x08", "tcp: option 8 truncated"),
        (b"\x08\x0a\x00\x00", "tcp: option 8 length 10 runs past header"),
        (build.mss_option(1400) + b"\x05\x0a" + bytes(4), "tcp: option 5 length 10 runs past header"),
    ],
)
def test_broken_tcp_options_are_malformed(options: bytes, reason: str) -> None:
    assert _reason(_tcp_with_options(options)) == reason


def test_fields_before_a_broken_option_are_kept() -> None:
    pkt = decode(_tcp_with_options(build.mss_option(1400) + b"\x05\x0a" + bytes(2)))
    assert (pkt.sport, pkt.mss, pkt.malformed) == (1000, 1400, "tcp: option 5 length 10 runs past header")


# --- IPv4 fragments ---------------------------------------------------------------------------


def test_ipv4_first_fragment_decodes_tcp() -> None:
    data = _v4(TCP(sport=1234, dport=80, seq=9, flags="PA") / Raw(b"y" * 32), flags="MF", id=77)
    assert _fields(decode(data)) == _expect(
        family=4,
        src=S4,
        dst=D4,
        proto=6,
        ttl=64,
        length=72,
        frag=FRAG_FIRST,
        l4_offset=20,
        sport=1234,
        dport=80,
        tcp_flags=PSH | ACK,
        seq=9,
        window=8192,
        payload_len=32,
    )


def test_ipv4_first_fragment_udp_length_may_exceed_fragment() -> None:
    # 1480 bytes of the UDP datagram in this fragment, its length field says 3008.
    udp = build.udp(S4, D4, 5000, 53, b"u" * 3000)
    data = build.ipv4(S4, D4, 17, udp[:1480], more_fragments=True)
    pkt = decode(data)
    assert (pkt.frag, pkt.sport, pkt.dport, pkt.payload_len, pkt.malformed) == (
        FRAG_FIRST,
        5000,
        53,
        1472,
        None,
    )


def test_ipv4_later_fragment_has_no_l4() -> None:
    data = build.ipv4(S4, D4, 6, b"\xff" * 40, frag_offset=1480, more_fragments=True)
    assert _fields(decode(data)) == _expect(
        family=4, src=S4, dst=D4, proto=6, ttl=64, length=60, frag=FRAG_LATER, l4_offset=20, payload_len=40
    )


def test_ipv4_last_fragment_is_later() -> None:
    data = build.ipv4(S4, D4, 17, b"tail", frag_offset=8)
    pkt = decode(data)
    assert (pkt.frag, pkt.sport, pkt.payload_len, pkt.malformed) == (FRAG_LATER, 0, 4, None)


def test_ipv4_first_fragment_with_split_tcp_header_is_malformed() -> None:
    data = build.ipv4(S4, D4, 6, build.tcp(S4, D4, 1, 2)[:8], more_fragments=True)
    assert _reason(data) == "tcp: truncated header (8 bytes)"


# --- IPv6 -------------------------------------------------------------------------------------


def test_ipv6_tcp() -> None:
    data = _v6(TCP(sport=2222, dport=22, seq=1, ack=2, flags="A", window=100) / Raw(b"zz"), hlim=9)
    assert _fields(decode(data)) == _expect(
        family=6,
        src=S6,
        dst=D6,
        proto=6,
        ttl=9,
        length=62,
        l4_offset=40,
        sport=2222,
        dport=22,
        tcp_flags=ACK,
        seq=1,
        ack=2,
        window=100,
        payload_len=2,
    )


def test_ipv6_extension_chain_to_first_fragment() -> None:
    data = _v6(
        IPv6ExtHdrHopByHop()
        / IPv6ExtHdrRouting(addresses=["2001:db8::99"])
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrFragment(m=1, id=5)
        / TCP(sport=3333, dport=443, seq=44, flags="S", options=[("MSS", 1220)])
    )
    assert _fields(decode(data)) == _expect(
        family=6,
        src=S6,
        dst=D6,
        proto=6,
        ttl=64,
        length=40 + 8 + 24 + 8 + 8 + 24,
        frag=FRAG_FIRST,
        l4_offset=88,
        sport=3333,
        dport=443,
        tcp_flags=SYN,
        seq=44,
        window=8192,
        mss=1220,
    )


def test_ipv6_later_fragment_has_no_l4() -> None:
    data = _v6(IPv6ExtHdrDestOpt() / IPv6ExtHdrFragment(nh=17, offset=185, m=1) / Raw(b"r" * 24))
    assert _fields(decode(data)) == _expect(
        family=6, src=S6, dst=D6, proto=17, ttl=64, length=80, frag=FRAG_LATER, l4_offset=56, payload_len=24
    )


def test_ipv6_atomic_fragment_is_not_a_fragment() -> None:
    data = _v6(IPv6ExtHdrFragment(m=0, offset=0) / UDP(sport=7, dport=8))
    pkt = decode(data)
    assert (pkt.frag, pkt.proto, pkt.sport, pkt.dport, pkt.l4_offset) == (FRAG_NONE, 17, 7, 8, 48)


def test_ipv6_ah_length_counts_in_four_byte_units() -> None:
    # AH: next header UDP, payload length 4 -> (4 + 2) * 4 = 24 bytes (12-byte ICV).
    ah = bytes((17, 4, 0, 0)) + struct.pack("!II", 0x100, 1) + bytes(12)
    data = build.ipv6(S6, D6, 51, ah + build.udp(S6, D6, 500, 500, b"ike"))
    pkt = decode(data)
    assert (pkt.proto, pkt.l4_offset, pkt.sport, pkt.dport, pkt.payload_len, pkt.malformed) == (
        17,
        64,
        500,
        500,
        3,
        None,
    )


def test_ipv6_esp_stops_the_walk() -> None:
    data = build.ipv6(S6, D6, 0, build.ipv6_options_header(50) + bytes(32))
    assert _fields(decode(data)) == _expect(
        family=6, src=S6, dst=D6, proto=50, ttl=64, length=80, l4_offset=48, payload_len=32
    )


def test_ipv6_no_next_header() -> None:
    data = build.ipv6(S6, D6, 60, build.ipv6_options_header(59))
    pkt = decode(data)
    assert (pkt.proto, pkt.l4_offset, pkt.payload_len, pkt.sport, pkt.malformed) == (59, 48, 0, 0, None)


def test_ipv6_eight_extension_headers_pass_nine_do_not() -> None:
    def chain(count: int) -> bytes:
        headers = b"".join(build.ipv6_options_header(60) for _ in range(count - 1))
        return build.ipv6(S6, D6, 60, headers + build.ipv6_options_header(59))

    assert decode(chain(8)).malformed is None
    assert _reason(chain(9)) == "ipv6: more than 8 extension headers"


def test_ipv6_hop_by_hop_must_come_first() -> None:
    data = build.ipv6(S6, D6, 60, build.ipv6_options_header(0) + build.ipv6_options_header(59))
    assert _reason(data) == "ipv6: hop-by-hop header not first"


def test_ipv6_extension_header_past_payload() -> None:
    data = build.ipv6(S6, D6, 60, bytes((59, 2)) + bytes(14))  # claims 24 bytes, has 16
    assert _reason(data) == "ipv6: extension header 60 truncated"
    data = build.ipv6(S6, D6, 43, bytes((6, 0, 0)))  # fewer than 8 bytes left
    assert _reason(data) == "ipv6: extension header 43 truncated"


def test_ipv6_jumbogram_is_malformed() -> None:
    jumbo = bytes((0xC2, 4)) + struct.pack("!I", 70000)
    data = build.ipv6_header(S6, D6, 0, 0) + build.ipv6_options_header(59, jumbo)
    assert _reason(data) == "ipv6: jumbogram not supported"


def test_ipv6_bytes_past_payload_length_are_ignored() -> None:
    pkt = decode(_v6(UDP(sport=1, dport=2) / Raw(b"abc")) + b"\0" * 10)
    assert (pkt.length, pkt.payload_len, pkt.malformed) == (51, 3, None)


# --- UDP --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "family", "addrs"), [(_v4, 4, (S4, D4)), (_v6, 6, (S6, D6))])
def test_udp(make: object, family: int, addrs: tuple[bytes, bytes]) -> None:
    data = make(UDP(sport=5353, dport=53) / Raw(b"q" * 12))  # type: ignore[operator]
    header = 20 if family == 4 else 40
    assert _fields(decode(data)) == _expect(
        family=family,
        src=addrs[0],
        dst=addrs[1],
        proto=17,
        ttl=64,
        length=header + 20,
        l4_offset=header,
        sport=5353,
        dport=53,
        payload_len=12,
    )


def test_udp_length_shorter_than_ip_payload_wins() -> None:
    datagram = bytearray(build.udp(S4, D4, 1, 2, b"abcdef"))
    datagram[4:6] = struct.pack("!H", 10)  # says 2 payload bytes of the 6 carried
    pkt = decode(build.ipv4(S4, D4, 17, bytes(datagram)))
    assert (pkt.payload_len, pkt.malformed) == (2, None)


# --- ICMP -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("icmp_type", "ident"), [(8, 0x4242), (0, 0x4242), (13, 9), (14, 9), (17, 3)])
def test_icmp_queries_carry_identifier(icmp_type: int, ident: int) -> None:
    # Built by hand: scapy adds the timestamp / address-mask fields of types 13, 14 and 17.
    data = build.ipv4(S4, D4, 1, build.icmp(icmp_type, 0, (ident, 1), b"ping"))
    assert _fields(decode(data)) == _expect(
        family=4,
        src=S4,
        dst=D4,
        proto=1,
        ttl=64,
        length=32,
        l4_offset=20,
        icmp_type=icmp_type,
        icmp_code=0,
        icmp_id=ident,
        payload_len=4,
    )


def test_icmp_non_query_non_error_has_no_identifier() -> None:
    pkt = decode(_v4(ICMP(type=9, code=0) / Raw(b"\x01\x02\x03\x04")))  # router advertisement
    assert (pkt.icmp_type, pkt.icmp_id, pkt.inner, pkt.malformed) == (9, 0, None, None)


def _quoted_tcp4() -> bytes:
    """The original packet as the kernel quotes it: IP header + 8 bytes of TCP (RFC 792)."""
    original = IP(src=DST4, dst="203.0.113.5", id=1) / TCP(sport=40000, dport=25, seq=0xDEADBEEF, flags="S")
    return bytes(original)[:28]


def test_icmp_port_unreachable_with_embedded_tcp() -> None:
    data = _v4(ICMP(type=3, code=3) / Raw(_quoted_tcp4()))
    pkt = decode(data)
    assert _fields(pkt) | {"inner": None} == _expect(
        family=4,
        src=S4,
        dst=D4,
        proto=1,
        ttl=64,
        length=56,
        l4_offset=20,
        icmp_type=3,
        icmp_code=3,
        payload_len=28,
    )
    assert pkt.inner is not None
    assert _fields(pkt.inner) == _expect(
        family=4,
        src=D4,
        dst=build.addr("203.0.113.5"),
        proto=6,
        ttl=64,
        length=28,
        l4_offset=20,
        sport=40000,
        dport=25,
        seq=0xDEADBEEF,
    )


def test_icmp_time_exceeded_with_embedded_udp() -> None:
    original = bytes(IP(src=SRC4, dst=DST4, ttl=1) / UDP(sport=33434, dport=33435) / Raw(b"t" * 32))
    pkt = decode(bytes(IP(src="203.0.113.1", dst=SRC4) / ICMP(type=11, code=0) / Raw(original[:28])))
    assert (pkt.icmp_type, pkt.icmp_code, pkt.malformed) == (11, 0, None)
    assert pkt.inner is not None
    assert _fields(pkt.inner) == _expect(
        family=4, src=S4, dst=D4, proto=17, ttl=1, length=28, l4_offset=20, sport=33434, dport=33435
    )


def test_embedded_tcp_quoted_in_full_fills_flags_and_window() -> None:
    original = bytes(IP(src=DST4, dst=SRC4) / TCP(sport=1, dport=2, seq=3, ack=4, flags="SA", window=1000))
    inner = decode(_v4(ICMP(type=3, code=4, nexthopmtu=1400) / Raw(original))).inner
    assert inner is not None
    assert (inner.seq, inner.ack, inner.tcp_flags, inner.window, inner.length) == (3, 4, SYN | ACK, 1000, 40)


def test_embedded_total_length_may_exceed_the_quote() -> None:
    original = bytes(IP(src=DST4, dst=SRC4) / UDP(sport=9, dport=10) / Raw(b"d" * 1000))
    pkt = decode(_v4(ICMP(type=3, code=1) / Raw(original[:40])))
    assert pkt.malformed is None and pkt.inner is not None
    assert (pkt.inner.length, pkt.inner.sport, pkt.inner.dport) == (40, 9, 10)


def test_embedded_later_fragment_is_not_malformed() -> None:
    original = build.ipv4(D4, S4, 6, b"\xee" * 8, frag_offset=8)
    pkt = decode(_v4(ICMP(type=11, code=1) / Raw(original)))
    assert pkt.malformed is None and pkt.inner is not None
    assert (pkt.inner.frag, pkt.inner.proto, pkt.inner.sport) == (FRAG_LATER, 6, 0)


def test_icmp_error_inside_icmp_error_is_decoded_one_level() -> None:
    inner_error = bytes(IP(src=DST4, dst=SRC4) / ICMP(type=3, code=3) / Raw(_quoted_tcp4()))
    pkt = decode(_v4(ICMP(type=3, code=3) / Raw(inner_error)))
    assert pkt.malformed is None and pkt.inner is not None
    assert (pkt.inner.proto, pkt.inner.icmp_type, pkt.inner.icmp_code, pkt.inner.inner) == (1, 3, 3, None)


def test_embedded_echo_request_identifier() -> None:
    original = bytes(IP(src=DST4, dst=SRC4) / ICMP(type=8, id=77, seq=1) / Raw(b"p" * 20))
    inner = decode(_v4(ICMP(type=3, code=13) / Raw(original[:28]))).inner
    assert inner is not None
    assert (inner.icmp_type, inner.icmp_code, inner.icmp_id) == (8, 0, 77)


@pytest.mark.parametrize(
    ("quote", "reason"),
    [
        (b"", "icmp: embedded header truncated"),
        (_quoted_tcp4()[:19], "icmp: embedded header truncated"),
        (_quoted_tcp4()[:23], "icmp: embedded header truncated"),  # 3 of the 4 port bytes
        (bytes((0x46,)) + _quoted_tcp4()[1:22], "icmp: embedded header truncated"),  # IHL 24 > 22
        (bytes(IP(src=DST4, dst=SRC4) / ICMP(type=8))[:27], "icmp: embedded header truncated"),
        (bytes((0x44,)) + _quoted_tcp4()[1:], "icmp: embedded ipv4: header length 16 < 20"),
        (bytes(IPv6(src=SRC6, dst=DST6) / UDP()), "icmp: embedded header is not ipv4"),
    ],
)
def test_unreadable_embedded_header_makes_the_error_malformed(quote: bytes, reason: str) -> None:
    pkt = decode(_v4(ICMP(type=3, code=3) / Raw(quote)))
    assert pkt.malformed == reason
    assert pkt.icmp_type == 3


def test_embedded_header_with_only_ports_is_enough() -> None:
    inner = decode(_v4(ICMP(type=3, code=3) / Raw(_quoted_tcp4()[:24]))).inner
    assert inner is not None
    assert (inner.sport, inner.dport, inner.seq, inner.malformed) == (40000, 25, 0, None)


# --- ICMPv6 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [ICMPv6EchoRequest, ICMPv6EchoReply])
def test_icmpv6_echo_identifier(layer: type) -> None:
    data = _v6(layer(id=0x1234, seq=2, data=b"ping"))
    assert _fields(decode(data)) == _expect(
        family=6,
        src=S6,
        dst=D6,
        proto=58,
        ttl=64,
        length=52,
        l4_offset=40,
        icmp_type=layer().type,
        icmp_code=0,
        icmp_id=0x1234,
        payload_len=4,
    )


def test_icmpv6_node_information_identifier_field() -> None:
    pkt = decode(_v6(ICMPv6NIQueryNOOP()))  # qtype 0 sits in the identifier field
    assert (pkt.icmp_type, pkt.icmp_id, pkt.malformed) == (139, 0, None)
    body = struct.pack("!HH", 3, 0) + bytes(8)  # node name query
    pkt = decode(build.ipv6(S6, D6, 58, build.icmpv6(S6, D6, 139, 0, body)))
    assert (pkt.icmp_type, pkt.icmp_id) == (139, 3)


def test_icmpv6_packet_too_big_with_embedded_tcp() -> None:
    original = bytes(
        IPv6(src=DST6, dst=SRC6, hlim=63)
        / TCP(sport=443, dport=50000, seq=5, ack=6, flags="A")
        / Raw(b"b" * 1400)
    )
    data = _v6(ICMPv6PacketTooBig(mtu=1280) / Raw(original[: 1280 - 48]))
    pkt = decode(data)
    assert _fields(pkt) | {"inner": None} == _expect(
        family=6,
        src=S6,
        dst=D6,
        proto=58,
        ttl=64,
        length=1280,
        l4_offset=40,
        icmp_type=2,
        icmp_code=0,
        payload_len=1232,
    )
    assert pkt.inner is not None
    assert _fields(pkt.inner) == _expect(
        family=6,
        src=D6,
        dst=S6,
        proto=6,
        ttl=63,
        length=1232,
        l4_offset=40,
        sport=443,
        dport=50000,
        tcp_flags=ACK,
        seq=5,
        ack=6,
        window=8192,
    )


def test_icmpv6_time_exceeded_with_embedded_udp_behind_extension_header() -> None:
    original = bytes(IPv6(src=SRC6, dst=DST6, hlim=1) / IPv6ExtHdrDestOpt() / UDP(sport=1, dport=33434))
    pkt = decode(_v6(ICMPv6TimeExceeded(code=0) / Raw(original)))
    assert pkt.malformed is None and pkt.inner is not None
    assert (pkt.inner.proto, pkt.inner.l4_offset, pkt.inner.sport, pkt.inner.dport) == (17, 48, 1, 33434)


@pytest.mark.parametrize(
    ("quote", "reason"),
    [
        (bytes(IPv6(src=DST6, dst=SRC6) / TCP())[:39], "icmpv6: embedded header truncated"),
        (bytes(IPv6(src=DST6, dst=SRC6) / TCP())[:42], "icmpv6: embedded header truncated"),
        (
            bytes(IPv6(src=DST6, dst=SRC6) / IPv6ExtHdrRouting() / TCP())[:44],
            "icmpv6: embedded header truncated",
        ),
        (_quoted_tcp4(), "icmpv6: embedded header is not ipv6"),
    ],
)
def test_unreadable_icmpv6_embedded_header(quote: bytes, reason: str) -> None:
    assert _reason(_v6(ICMPv6PacketTooBig(mtu=1280) / Raw(quote))) == reason


# --- malformed packets: exact reasons ---------------------------------------------------------


def _tcp4_bytes(**tcp: object) -> bytearray:
    return bytearray(_v4(TCP(sport=1, dport=2, **tcp) / Raw(b"data")))


def _set(data: bytearray, offset: int, fmt: str, value: int) -> bytes:
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "ip: empty packet"),
        (b"\x50" + bytes(39), "ip: unknown version 5"),
        (b"\x00", "ip: unknown version 0"),
        (_v4(TCP())[:12], "ipv4: truncated header (12 bytes)"),
        (_set(_tcp4_bytes(), 0, "!B", 0x44), "ipv4: header length 16 < 20"),
        (_set(_tcp4_bytes(), 0, "!B", 0x4F), "ipv4: header length 60 > 44 bytes captured"),
        (_set(_tcp4_bytes(), 2, "!H", 60), "ipv4: total length 60 > 44 bytes captured"),
        (_set(_tcp4_bytes(), 2, "!H", 16), "ipv4: total length 16 < header length 20"),
        (_v4(TCP())[:32], "ipv4: total length 40 > 32 bytes captured"),
        (build.ipv4(S4, D4, 6, bytes(12)), "tcp: truncated header (12 bytes)"),
        (_set(_tcp4_bytes(), 32, "!B", 3 << 4), "tcp: data offset 3 < 5"),
        (_set(_tcp4_bytes(), 32, "!B", 15 << 4), "tcp: data offset 15 beyond 24-byte segment"),
        (build.ipv4(S4, D4, 17, bytes(6)), "udp: truncated header (6 bytes)"),
        (_set(bytearray(_v4(UDP() / Raw(bytes(12)))), 24, "!H", 9999), "udp: length field 9999 but 20 bytes"),
        (_set(bytearray(_v4(UDP())), 24, "!H", 3), "udp: length field 3 < 8"),
        (build.ipv4(S4, D4, 1, bytes(4)), "icmp: truncated header (4 bytes)"),
        (_v6(TCP())[:30], "ipv6: truncated header (30 bytes)"),
        (_v6(TCP())[:50], "ipv6: payload length 20 > 10 bytes captured"),
        (build.ipv6(S6, D6, 6, bytes(19)), "tcp: truncated header (19 bytes)"),
        (build.ipv6(S6, D6, 17, bytes(7)), "udp: truncated header (7 bytes)"),
        (build.ipv6(S6, D6, 58, bytes(7)), "icmpv6: truncated header (7 bytes)"),
        (build.ipv6(S6, D6, 6, b""), "tcp: truncated header (0 bytes)"),
    ],
)
def test_malformed_reason(data: bytes, reason: str) -> None:
    assert _reason(data) == reason


@pytest.mark.parametrize(
    "garbage",
    [b"\x45", b"\x45" + b"\xff" * 19, b"\x6f" * 39, b"\xff" * 100, bytes(range(256)), b"\x4f" * 60],
)
def test_garbage_is_malformed_not_an_exception(garbage: bytes) -> None:
    pkt = decode(garbage)
    assert isinstance(pkt.malformed, str)
    assert not pkt.malformed.startswith("decode: internal error")


def test_non_buffer_input_is_contained() -> None:
    pkt = decode("E" * 40)  # type: ignore[arg-type]
    assert pkt.malformed == "decode: internal error (TypeError)"


# --- packets cut by the queue's copy range (GSO) ----------------------------------------------

CAP = 3840  # nfqfw.kernel.queue_info.COPY_RANGE


def _gso_tcp(family: int, payload: int, options: bytes = build.timestamp_option(1, 2)) -> bytes:
    src, dst = (S4, D4) if family == 4 else (S6, D6)
    segment = build.tcp(
        src, dst, 40000, 5201, 1000, 2000, ACK | PSH, 502, build.NOP * 2 + options, bytes(payload)
    )
    return build.ipv4(src, dst, 6, segment) if family == 4 else build.ipv6(src, dst, 6, segment)


def _same_but_cut(whole: bytes, cap: int) -> None:
    """`whole` cut to `cap` bytes decodes as `whole` does, with `truncated` set."""
    assert len(whole) > cap
    cut = decode(whole[:cap], cap)
    assert _fields(cut) == {**_fields(decode(whole)), "truncated": True}


@pytest.mark.parametrize("family", [4, 6])
def test_a_gso_segment_cut_by_the_copy_range_keeps_its_ip_lengths(family: int) -> None:
    whole = _gso_tcp(family, 62000)
    pkt = decode(whole[:CAP], CAP)
    assert (pkt.malformed, pkt.truncated, pkt.payload_len) == (None, True, 62000)
    assert (pkt.length, pkt.seq, pkt.ack, pkt.ts) == (len(whole), 1000, 2000, (1, 2))
    _same_but_cut(whole, CAP)


def test_cut_packets_of_every_kind_decode_as_the_whole_packet() -> None:
    udp_datagram = build.udp(S4, D4, 5000, 53, bytes(9000))
    chain = build.ipv6_options_header(60) + build.ipv6_options_header(6)  # hop-by-hop, destination
    for whole, cap in [
        (build.ipv4(S4, D4, 17, udp_datagram), 200),  # a UDP GSO datagram: its UDP length covers it all
        (build.ipv4(S4, D4, 6, _gso_tcp(4, 9000)[20:], options=b"\x94\x04\x00\x00"), 100),  # IP options
        (build.ipv6(S6, D6, 0, chain + _gso_tcp(6, 9000)[40:]), 120),  # extension headers
        (build.ipv4(S4, D4, 6, bytes(9000), frag_offset=1480), 60),  # a later fragment
        (build.ipv4(S4, D4, 1, build.icmp(8, 0, (7, 1), bytes(9000))), 28),  # a big echo request
        (build.ipv6(S6, D6, 58, build.icmpv6(S6, D6, 128, 0, b"\0\1\0\1" + bytes(9000))), 48),
    ]:
        _same_but_cut(whole, cap)


def test_only_a_packet_of_exactly_the_copy_range_is_cut() -> None:
    whole = _gso_tcp(4, 62000)
    assert (
        decode(whole[: CAP - 1], CAP).malformed
        == f"ipv4: total length {len(whole)} > {CAP - 1} bytes captured"
    )
    assert (
        decode(whole[:CAP]).malformed == f"ipv4: total length {len(whole)} > {CAP} bytes captured"
    )  # no cap
    whole6 = _gso_tcp(6, 62000)
    assert (
        decode(whole6[: CAP - 1], CAP).malformed
        == f"ipv6: payload length {len(whole6) - 40} > 3799 bytes captured"
    )
    short = _gso_tcp(4, 100)  # a complete packet of exactly the copy range: not cut, lengths checked
    assert decode(short, len(short)).truncated is False
    lying = _set(bytearray(short), 2, "!H", len(short) - 1)
    assert decode(lying, len(short)).truncated is False  # shorter length than bytes: trims, as always


@pytest.mark.parametrize(
    ("whole", "cap", "reason"),
    [
        (_gso_tcp(4, 5000), 40, "tcp: header cut by the 40-byte copy range"),  # the options are missing
        (_gso_tcp(4, 5000), 30, "tcp: header cut by the 30-byte copy range"),  # half the fixed header
        (_gso_tcp(6, 5000), 64, "tcp: header cut by the 64-byte copy range"),
        (
            build.ipv4(S4, D4, 17, build.udp(S4, D4, 1, 2, bytes(500))),
            24,
            "udp: header cut by the 24-byte copy range",
        ),
        (
            build.ipv4(S4, D4, 1, build.icmp(8, 0, (7, 1), bytes(500))),
            24,
            "icmp: header cut by the 24-byte copy range",
        ),
        (
            build.ipv6(S6, D6, 60, build.ipv6_options_header(6, bytes(14)) + bytes(500)),
            50,
            "ipv6: extension header 60 truncated",
        ),
        (_gso_tcp(4, 5000), 16, "ipv4: truncated header (16 bytes)"),
        (  # the UDP length is checked against the IP length
            build.ipv4(S4, D4, 17, _set(bytearray(build.udp(S4, D4, 1, 2, bytes(500))), 4, "!H", 509)),
            100,
            "udp: length field 509 but 508 bytes",
        ),
    ],
)
def test_a_cut_packet_needs_its_headers_and_consistent_lengths(whole: bytes, cap: int, reason: str) -> None:
    pkt = decode(whole[:cap], cap)
    assert pkt.malformed == reason


@pytest.mark.parametrize("family", [4, 6])
def test_a_cut_packet_whose_headers_just_fit(family: int) -> None:
    whole = _gso_tcp(family, 5000)  # TCP with NOP, NOP, timestamps: 32 bytes
    headers = (20 if family == 4 else 40) + 32
    assert decode(whole[:headers], headers).payload_len == 5000
    assert (
        decode(whole[: headers - 1], headers - 1).malformed
        == f"tcp: header cut by the {headers - 1}-byte copy range"
    )
