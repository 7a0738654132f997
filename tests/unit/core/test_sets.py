"""nfqfw.core.sets: set files read (fast and slow path alike), set lookups against a naive scan,
CIDR output, runtime entries."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from nfqfw.core.sets import (
    EMPTY,
    NamedSet,
    Ranges,
    RuntimeEntries,
    RuntimeSets,
    SetContent,
    network_range,
    parse_entry,
    parse_set_text,
    range_cidrs,
)

SPAMHAUS = """\
; Spamhaus DROP List 2024/05/01 - (c) 2024 The Spamhaus Project SLU
; https://www.spamhaus.org/drop/drop.txt
; Last-Modified: Wed, 01 May 2024 00:00:00 GMT
1.10.16.0/20 ; SBL256894
1.19.0.0/16 ; SBL434604
"""
FIREHOL = """\
#
# firehol_level1
#
# Maintainer      : FireHOL
0.0.0.0/8
1.10.16.0/20

  2001:db8:dead::/48   # an IPv6 network, indented
192.0.2.7
"""


def v4(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def test_spamhaus_drop_format() -> None:
    read = parse_set_text(SPAMHAUS)
    assert read.pairs4 == [(v4("1.10.16.0"), v4("1.10.31.255")), (v4("1.19.0.0"), v4("1.19.255.255"))]
    assert (read.pairs6, read.entries, read.errors) == ([], 2, [])


def test_firehol_format_with_ipv6_and_hosts() -> None:
    read = parse_set_text(FIREHOL)
    assert read.pairs4 == [
        (0, v4("0.255.255.255")),
        (v4("1.10.16.0"), v4("1.10.31.255")),
        (v4("192.0.2.7"), v4("192.0.2.7")),
    ]
    assert read.pairs6 == [network_range(ipaddress.ip_network("2001:db8:dead::/48"))]
    assert (read.entries, read.errors) == (4, [])


def test_bad_lines_are_reported_by_line_number() -> None:
    text = "10.0.0.0/8\n10.0.0.300/24\n\n10.1.2.3/24 # host bits\n01.2.3.4\n1.2.3.4 5.6.7.8\n2001:db8::g\n"
    read = parse_set_text(text)
    assert read.errors == [
        (2, "not an address or network: '10.0.0.300/24'"),
        (4, "'10.1.2.3/24' has host bits set (did you mean 10.1.2.0/24?)"),
        (5, "not an address or network: '01.2.3.4'"),
        (6, "one address or network per line, got '1.2.3.4 5.6.7.8'"),
        (7, "not an address or network: '2001:db8::g'"),
    ]
    assert read.pairs4 == [(v4("10.0.0.0"), v4("10.255.255.255"))]
    assert read.entries == 1


def test_an_empty_file_and_one_of_comments_hold_nothing() -> None:
    assert parse_set_text("") == ([], [], 0, [])
    assert parse_set_text("# nothing\n; here\n\n   \n") == ([], [], 0, [])


ipv4_networks = st.tuples(st.integers(0, (1 << 32) - 1), st.integers(0, 32)).map(
    lambda v: ipaddress.IPv4Network((v[0] >> (32 - v[1]) << (32 - v[1]) if v[1] else 0, v[1]))
)
ipv6_networks = st.tuples(st.integers(0, (1 << 128) - 1), st.integers(0, 128)).map(
    lambda v: ipaddress.IPv6Network((v[0] >> (128 - v[1]) << (128 - v[1]) if v[1] else 0, v[1]))
)
decorations = st.sampled_from(["", " ; SBL1", "  # note", "\t"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(ipv4_networks, decorations), max_size=30), st.booleans())
def test_the_fast_path_reads_what_the_line_by_line_path_reads(
    lines: list[tuple[ipaddress.IPv4Network, str]], break_it: bool
) -> None:
    """An all-IPv4 file is read by one findall; adding a line it does not take (an IPv6 one)
    sends the whole file the slow way: the IPv4 lines must come out the same."""
    text = "".join(
        f"{net.with_prefixlen if net.prefixlen < 32 else net.network_address}{deco}\n" for net, deco in lines
    )
    fast = parse_set_text(text)
    slow = parse_set_text(text + ("2001:db8::/32\n" if break_it else "fd00::1\n"))
    assert fast.pairs4 == slow.pairs4 == [network_range(net) for net, _ in lines]
    assert fast.entries + 1 == slow.entries == len(lines) + 1
    assert fast.errors == slow.errors == []


@settings(max_examples=300, deadline=None)
@given(
    st.lists(ipv4_networks, max_size=20),
    st.lists(ipv6_networks, max_size=8),
    st.lists(st.integers(0, (1 << 32) - 1), min_size=1, max_size=20),
    st.lists(st.integers(0, (1 << 128) - 1), min_size=1, max_size=10),
)
def test_a_set_lookup_equals_a_naive_scan(
    nets4: list[ipaddress.IPv4Network],
    nets6: list[ipaddress.IPv6Network],
    probes4: list[int],
    probes6: list[int],
) -> None:
    content = SetContent.of([network_range(n) for n in nets4], [network_range(n) for n in nets6], 0)
    named = NamedSet("s", content)
    for net in nets4 + nets6:  # the networks' own edges, and just outside them
        first, last = network_range(net)
        (probes4 if net.version == 4 else probes6).extend(
            v for v in (first - 1, first, last, last + 1) if v >= 0
        )
    for probes, nets, width in ((probes4, nets4, 4), (probes6, nets6, 16)):
        for value in probes:
            if value >= 1 << (8 * width):
                continue
            address = ipaddress.ip_address(value.to_bytes(width, "big"))
            naive = any(address in net for net in nets)
            assert content.contains(address.packed) == naive
            assert named.contains(address.packed) == naive


@settings(max_examples=200, deadline=None)
@given(st.lists(ipv4_networks, max_size=12), st.lists(ipv6_networks, max_size=6))
def test_cidrs_cover_exactly_the_ranges(
    nets4: list[ipaddress.IPv4Network], nets6: list[ipaddress.IPv6Network]
) -> None:
    for family, nets in ((4, nets4), (6, nets6)):
        ranges = Ranges(family, [network_range(net) for net in nets])
        again = Ranges(family, [network_range(ipaddress.ip_network(text)) for text in ranges.cidrs()])
        assert again == ranges


def test_cidrs_are_the_fewest_blocks() -> None:
    assert list(range_cidrs(v4("10.0.0.0"), v4("10.0.2.255"), 32, 4)) == ["10.0.0.0/23", "10.0.2.0/24"]
    assert list(range_cidrs(0, (1 << 32) - 1, 32, 4)) == ["0.0.0.0/0"]
    assert list(range_cidrs(v4("10.0.0.1"), v4("10.0.0.6"), 32, 4)) == [
        "10.0.0.1/32",
        "10.0.0.2/31",
        "10.0.0.4/31",
        "10.0.0.6/32",
    ]


def test_big_ipv4_ranges_live_in_arrays() -> None:
    pairs = [(n << 8, (n << 8) + 255) for n in range(0, 20000, 2)]
    ranges = Ranges(4, pairs)
    assert ranges.firsts.typecode == "I" and len(ranges) == 10000  # type: ignore[union-attr]
    assert ranges.nbytes() == 80000
    assert (301 << 8) + 7 not in ranges and (302 << 8) + 7 in ranges
    assert len(EMPTY) == 0 and not EMPTY.contains(bytes(4))


def test_adjacent_and_overlapping_networks_merge() -> None:
    ranges = Ranges(
        4, [network_range(ipaddress.ip_network(t)) for t in ("10.0.0.0/25", "10.0.0.128/25", "10.0.0.64/26")]
    )
    assert list(ranges) == [(v4("10.0.0.0"), v4("10.0.0.255"))]
    assert list(ranges.cidrs()) == ["10.0.0.0/24"]


# --- runtime entries ---------------------------------------------------------------------------


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def test_runtime_entries_hosts_and_networks() -> None:
    entries = RuntimeEntries()
    assert not entries and len(entries) == 0
    assert entries.add(net("192.0.2.7/32"), None) is True
    assert entries.add(net("198.51.100.0/24"), 50.0) is True
    assert entries.add(net("2001:db8::/32"), 20.0) is True
    assert entries.add(net("192.0.2.7/32"), 30.0) is False  # refreshed: a new expiry
    assert len(entries) == 3 and entries.version == 4
    assert entries.contains(ipaddress.ip_address("192.0.2.7").packed)
    assert entries.contains(ipaddress.ip_address("198.51.100.200").packed)
    assert entries.contains(ipaddress.ip_address("2001:db8::1").packed)
    assert not entries.contains(ipaddress.ip_address("192.0.2.8").packed)
    assert entries.next_expiry() == 20.0
    assert entries.expire(30.0) == [net("192.0.2.7/32"), net("2001:db8::/32")]
    assert [(e.network, e.expires) for e in entries.entries()] == [(net("198.51.100.0/24"), 50.0)]
    assert entries.remove(net("198.51.100.0/24")) is True
    assert entries.remove(net("198.51.100.0/24")) is False
    assert not entries.contains(ipaddress.ip_address("198.51.100.200").packed)


def test_runtime_sets_dump_and_load_keep_the_time_left() -> None:
    sets = RuntimeSets()
    sets.entries("banned").add(net("203.0.113.9/32"), 160.0)
    sets.entries("banned").add(net("2001:db8:bad::/48"), None)
    sets.entries("empty")
    dumped = sets.dump(now=100.0)
    assert dumped == {"banned": [("203.0.113.9/32", 60.0), ("2001:db8:bad::/48", None)]}
    again = RuntimeSets()
    assert again.load(dumped, now=5.0) == 2
    assert [(e.network, e.expires) for e in again.entries("banned").entries()] == [
        (net("203.0.113.9/32"), 65.0),
        (net("2001:db8:bad::/48"), None),
    ]
    assert again.names() == ["banned"] and "banned" in again and "empty" not in again
    assert again.next_expiry() == 65.0
    assert again.expire(65.0) == [("banned", net("203.0.113.9/32"))]


def test_parse_entry_messages() -> None:
    assert parse_entry("192.0.2.7") == net("192.0.2.7/32")
    assert parse_entry("2001:db8::/48") == net("2001:db8::/48")
    for text, message in (
        ("192.0.2.300", "not an address or network: '192.0.2.300'"),
        ("192.0.2.7/24", "'192.0.2.7/24' has host bits set (did you mean 192.0.2.0/24?)"),
    ):
        try:
            parse_entry(text)
        except ValueError as err:
            assert str(err) == message
        else:
            raise AssertionError(f"{text} was taken")
