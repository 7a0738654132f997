"""Property tests for nfqfw.core.decode: it never raises, and what it accepts is consistent.

Moderate example counts by default (the suite stays fast). For a long run:
    HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/unit/test_decode_fuzz.py --hypothesis-show-statistics
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfqfw.core import build
from nfqfw.core.decode import decode
from nfqfw.core.packet import FRAG_LATER, Packet

settings.register_profile("decode-default", max_examples=1000, deadline=None)
settings.register_profile(
    "long", max_examples=200_000, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
# Applied per test (not loaded globally) so other test files keep their own settings.
PROFILE = settings.get_profile("long" if os.environ.get("HYPOTHESIS_PROFILE") == "long" else "decode-default")

S4, D4 = build.addr("192.0.2.10"), build.addr("198.51.100.20")
S6, D6 = build.addr("2001:db8::10"), build.addr("2001:db8:1::20")
ALL_TCP_OPTIONS = (
    build.mss_option(1460)
    + build.sack_perm_option()
    + build.timestamp_option(1, 2)
    + build.NOP
    + build.wscale_option(7)
    + build.NOP
    + build.NOP
    + build.sack_option([(1, 2), (3, 4)])
)


def _seeds() -> list[bytes]:
    """Valid packets covering every decoder branch, to be mutated."""
    tcp4 = build.tcp(S4, D4, 40000, 443, seq=1, ack=2, flags=0x12, options=ALL_TCP_OPTIONS, payload=b"x" * 20)
    tcp6 = build.tcp(S6, D6, 40000, 443, seq=1, ack=2, flags=0x10, options=build.timestamp_option(5, 6))
    udp4 = build.udp(S4, D4, 53, 5353, b"answer")
    udp6 = build.udp(S6, D6, 53, 5353, b"answer")
    quoted4 = build.ipv4(D4, S4, 6, tcp4)[:28]
    quoted6 = build.ipv6(D6, S6, 6, tcp6)
    ah = bytes((17, 4, 0, 0)) + bytes(20)
    chain = (
        build.ipv6_options_header(43)
        + bytes((60, 0, 0, 0))
        + bytes(4)  # empty routing header
        + build.ipv6_options_header(44)
        + build.ipv6_fragment_header(51, offset=0, more=True, ident=9)
        + ah
    )
    return [
        build.ipv4(S4, D4, 6, tcp4, options=b"\x94\x04\x00\x00"),
        build.ipv4(S4, D4, 17, udp4) + b"\0" * 6,
        build.ipv4(S4, D4, 6, tcp4[:64], more_fragments=True),
        build.ipv4(S4, D4, 17, build.udp(S4, D4, 1, 2, bytes(100))[:48], more_fragments=True),
        build.ipv4(S4, D4, 6, b"later", frag_offset=1480),
        build.ipv4(S4, D4, 1, build.icmp(8, 0, (7, 1), b"ping")),
        build.ipv4(S4, D4, 1, build.icmp(3, 3, b"\0" * 4, quoted4)),
        build.ipv4(
            S4, D4, 1, build.icmp(11, 0, b"\0" * 4, build.ipv4(D4, S4, 1, build.icmp(3, 1, payload=quoted4)))
        ),
        build.ipv6(S6, D6, 6, tcp6),
        build.ipv6(S6, D6, 0, chain + udp6),
        build.ipv6(S6, D6, 44, build.ipv6_fragment_header(6, offset=8) + b"frag data"),
        build.ipv6(S6, D6, 58, build.icmpv6(S6, D6, 128, 0, b"\0\1\0\1ping")),
        build.ipv6(S6, D6, 58, build.icmpv6(S6, D6, 2, 0, b"\0\0\5\0" + quoted6)),
        build.ipv6(S6, D6, 50, bytes(16)),
    ]


SEEDS = _seeds()


def _check(pkt: Packet, data: bytes) -> None:
    """What every decode result must satisfy, malformed or not."""
    assert isinstance(pkt, Packet)
    reason = pkt.malformed
    assert reason is None or (isinstance(reason, str) and reason), reason
    assert reason is None or not reason.startswith("decode: internal error"), reason
    if reason is not None:
        return
    assert pkt.family in (4, 6)
    assert type(pkt.src) is bytes and type(pkt.dst) is bytes
    assert len(pkt.src) == len(pkt.dst) == (4 if pkt.family == 4 else 16)
    if pkt.truncated:  # cut by the copy range: the IP length claims more than the bytes
        assert 0 < pkt.l4_offset <= len(data) < pkt.length
    else:
        assert 0 < pkt.l4_offset <= pkt.length <= len(data)
    assert pkt.payload_len >= 0 and pkt.l4_offset + pkt.payload_len <= pkt.length
    assert -1 <= pkt.wscale <= 14
    if pkt.frag == FRAG_LATER:
        assert pkt.sport == pkt.dport == 0 and pkt.inner is None
    if pkt.inner is not None:
        inner = pkt.inner
        assert inner.malformed is None and inner.inner is None
        assert inner.family == pkt.family and type(inner.src) is bytes
        assert inner.length <= pkt.length - pkt.l4_offset - 8


@PROFILE
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    _check(decode(data), data)


@PROFILE
@given(st.sampled_from((0x45, 0x46, 0x4F, 0x60, 0x6F)), st.binary(max_size=120))
def test_arbitrary_bytes_behind_an_ip_version_never_raise(first: int, rest: bytes) -> None:
    data = bytes((first,)) + rest
    _check(decode(data), data)


_MUTATION = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 2000), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 2000), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 2000), st.just(0)),
    st.tuples(st.just("truncate"), st.integers(0, 2000), st.just(0)),
)


def _mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, position, value in mutations:
        at = position % (len(buf) + 1)
        if op == "set" and at < len(buf):
            buf[at] = value
        elif op == "insert":
            buf.insert(at, value)
        elif op == "delete" and at < len(buf):
            del buf[at]
        elif op == "truncate":
            del buf[at:]
    return bytes(buf)


@PROFILE
@given(st.sampled_from(SEEDS), st.lists(_MUTATION, min_size=1, max_size=6))
def test_mutated_valid_packets_never_raise(seed: bytes, mutations: list[tuple[str, int, int]]) -> None:
    data = _mutate(seed, mutations)
    _check(decode(data), data)
    _check(decode(memoryview(data)), data)


def test_seeds_are_valid() -> None:
    for seed in SEEDS:
        pkt = decode(seed)
        assert pkt.malformed is None, (seed.hex(), pkt.malformed)
        _check(pkt, seed)


@PROFILE
@given(
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
    seq=st.integers(0, 2**32 - 1),
    ack=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 255),
    window=st.integers(0, 65535),
    mss=st.none() | st.integers(0, 65535),
    wscale=st.none() | st.integers(0, 255),
    ts=st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    payload=st.binary(max_size=64),
    v6=st.booleans(),
)
def test_built_tcp_round_trips(
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    mss: int | None,
    wscale: int | None,
    ts: tuple[int, int] | None,
    payload: bytes,
    v6: bool,
) -> None:
    options = (
        (build.mss_option(mss) if mss is not None else b"")
        + (build.wscale_option(wscale) if wscale is not None else b"")
        + (build.timestamp_option(*ts) if ts is not None else b"")
    )
    src, dst = (S6, D6) if v6 else (S4, D4)
    segment = build.tcp(src, dst, sport, dport, seq, ack, flags, window, options, payload)
    data = build.ipv6(src, dst, 6, segment) if v6 else build.ipv4(src, dst, 6, segment)
    pkt = decode(data)
    assert pkt.malformed is None
    assert (pkt.sport, pkt.dport, pkt.seq, pkt.ack, pkt.tcp_flags, pkt.window) == (
        sport,
        dport,
        seq,
        ack,
        flags,
        window,
    )
    assert pkt.mss == (mss or 0)
    assert pkt.wscale == (-1 if wscale is None else min(wscale, 14))
    assert pkt.ts == ts
    assert pkt.payload_len == len(payload)
    assert (pkt.src, pkt.dst, pkt.length) == (src, dst, len(data))


@PROFILE
@given(st.sampled_from(SEEDS), st.lists(_MUTATION, max_size=3), st.integers(0, 2000))
def test_a_packet_cut_by_the_copy_range_decodes_as_the_whole_one(
    seed: bytes, mutations: list[tuple[str, int, int]], cap: int
) -> None:
    whole = _mutate(seed, mutations)
    part = whole[:cap]
    pkt = decode(part, cap)
    _check(pkt, part)
    if len(part) != cap:  # not cut: the copy range changes nothing
        assert _fields(pkt) == _fields(decode(part))
        return
    complete = decode(whole)
    if complete.malformed is not None or pkt.malformed is not None:
        return  # a length that lies cannot be told from a cut; headers cut short are malformed
    assert pkt.truncated == (complete.length > cap)
    assert {**_fields(pkt), "truncated": False, "inner": None} == {**_fields(complete), "inner": None}


def _fields(pkt: Packet) -> dict[str, object]:
    """Every field; an ICMP error's embedded header as its fields too."""
    fields: dict[str, object] = {name: getattr(pkt, name) for name in Packet.__slots__}
    if pkt.inner is not None:
        fields["inner"] = _fields(pkt.inner)
    return fields
