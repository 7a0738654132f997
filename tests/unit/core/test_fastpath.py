"""nfqfw.core.fastpath: the fast path gives exactly the verdicts and flow state of the full path.

Two engines with the same policy see the same packets; one takes the fast path where it can, the
other never does (Engine(fast_path=False)). After every packet their verdicts, counters and the
state of every flow (deadline, creation time, flags, rule, meta, every TCP word and byte) must be
equal. The packets: a real handshake, then random segments from both sides around the expected
sequence numbers (so most are in window) with random flags, options, payloads, windows, clock
steps, and raw byte mutations of the IP and TCP headers; IPv4 and IPv6. And the same with packets
cut by a copy range as NFQUEUE hands over GSO packets (exactly `copy_cap` bytes, the IP length
claiming up to 64 KB).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from nfqfw.core.build import (
    addr,
    ipv4,
    ipv6,
    mss_option,
    sack_option,
    sack_perm_option,
    tcp,
    timestamp_option,
    udp,
    wscale_option,
)
from nfqfw.core.config import load_policy
from nfqfw.core.engine import Engine
from nfqfw.core.fastpath import FAST_FLAGS
from nfqfw.core.flowtable import SMALL
from nfqfw.core.l4.tcp_window import WORDS
from nfqfw.core.packet import ACK, CWR, ECE, FIN, PSH, RST, SYN, URG
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.verdict import Hook, Meta, Verdict

POLICY = CompiledPolicy(load_policy(Path(__file__).resolve().parents[3] / "config" / "policy.yaml"))
OUT = Meta(Hook.FORWARD, "lan0", "wan0")
IN = Meta(Hook.FORWARD, "wan0", "lan0")
HOSTS = {4: (addr("10.0.0.5"), addr("203.0.113.7")), 6: (addr("fd00::5"), addr("2001:db8::7"))}
MASK = 0xFFFFFFFF


def stamp(value: int) -> bytes:
    return b"\x01\x01" + timestamp_option(value, value)


# TCP options by name, built for a segment's (seq, ack): SACK blocks sit just above the ACK, where
# they change what the window check sees.
OPTIONS = {
    "none": lambda seq, ack: b"",
    "ts": lambda seq, ack: stamp(7),
    "sack": lambda seq, ack: (
        b"\x01\x01" + sack_option([((ack + 100) & MASK, (ack + 600) & MASK)])
    ),  # 12 bytes, like TS
    "ts+sack": lambda seq, ack: (
        stamp(7) + b"\x01\x01" + sack_option([((ack + 100) & MASK, (ack + 600) & MASK)])
    ),
    "mss": lambda seq, ack: mss_option(1460),
    "ts-first": lambda seq, ack: timestamp_option(7, 7) + b"\x01\x01",
    "ts-overrun": lambda seq, ack: b"\x01\x01\x08\x0c" + bytes(8),  # 12 bytes, the option runs past
    "bad-length": lambda seq, ack: b"\x08\x01\x00\x00",
    "truncated": lambda seq, ack: b"\x01\x01\x01\x08",
}


class Pair:
    """A fast-path engine and a full-path engine fed the same packets."""

    def __init__(self, copy_cap: int = 0) -> None:
        self.fast = Engine(POLICY, fast_path=True, copy_cap=copy_cap)
        self.full = Engine(POLICY, fast_path=False, copy_cap=copy_cap)

    def hits(self) -> int:
        """Packets the fast path took."""
        return self.fast._fast_packets()[0]

    def feed(self, data: bytes, meta: Meta, now: float) -> Verdict:
        got = self.fast.process(data, meta, now)
        want = self.full.process(data, meta, now)
        assert got == want, (got, want)
        assert self.fast.counts() == self.full.counts()
        assert self.fast.truncated_packets == self.full.truncated_packets
        assert flow_states(self.fast) == flow_states(self.full)
        return want


def flow_states(engine: Engine) -> dict[bytes, tuple[object, ...]]:
    ct = engine.conntrack
    table = ct.table
    states = {}
    for key, slot in ct._slots.items():
        base, at = slot * WORDS, slot * SMALL
        states[key] = (
            table.deadline[slot],
            table.created[slot],
            table.bits[slot],
            table.rule[slot],
            table.meta[slot],
            tuple(table.td[base : base + WORDS]),
            bytes(table.small[at : at + SMALL]),
        )
    return {"__counts__": (len(ct), ct.expired, ct.early_drops), **states}  # type: ignore[dict-item]


def segment(
    family: int,
    forward: bool,
    flags: int,
    seq: int,
    ack: int,
    window: int,
    options: bytes,
    payload: int,
    copy_cap: int = 0,
) -> bytes:
    """The segment as NFQUEUE hands it over with copy range `copy_cap` (0: whole): a longer
    one is cut to `copy_cap` bytes, its IP length still counting `payload` bytes of data."""
    client, server = HOSTS[family]
    src, dst, sport, dport = (client, server, 40000, 5201) if forward else (server, client, 5201, 40000)
    built = min(payload, copy_cap) if copy_cap else payload  # enough bytes to cut from
    data = tcp(src, dst, sport, dport, seq & MASK, ack & MASK, flags, window, options, b"p" * built)
    packet = ipv4(src, dst, 6, data) if family == 4 else ipv6(src, dst, 6, data)
    return kernel_copy(packet, payload - built, copy_cap)


def kernel_copy(packet: bytes, more: int, copy_cap: int) -> bytes:
    """`packet` with `more` bytes of data counted in its IP length, cut to `copy_cap` bytes if
    that makes it longer (as NFQUEUE's copy range cuts a GSO packet)."""
    if not more:
        return packet if not copy_cap else packet[:copy_cap]
    data = bytearray(packet)
    at, length = (2, len(packet)) if data[0] >> 4 == 4 else (4, len(packet) - 40)
    data[at : at + 2] = (length + more).to_bytes(2, "big")
    return bytes(data[:copy_cap])


def handshake(pair: Pair, family: int, c_isn: int, s_isn: int, wscale: int, now: float) -> None:
    syn_options = mss_option(1460) + sack_perm_option() + stamp(1) + b"\x01" + wscale_option(wscale)
    pair.feed(segment(family, True, SYN, c_isn, 0, 64240, syn_options, 0), OUT, now)
    pair.feed(segment(family, False, SYN | ACK, s_isn, c_isn + 1, 65160, syn_options, 0), IN, now)
    pair.feed(segment(family, True, ACK, c_isn + 1, s_isn + 1, 502, stamp(2), 0), OUT, now)


# -- deterministic: the common case does take the fast path ------------------------------------


def test_bulk_transfer_goes_through_the_fast_path_with_identical_state() -> None:
    for family in (4, 6):
        pair = Pair()
        c, s, now = 1000, 5000, 10.0
        handshake(pair, family, c, s, 7, now)
        c, s = c + 1, s + 1
        for n in range(200):
            now += 0.001
            pair.feed(segment(family, True, ACK | PSH, c, s, 502, stamp(n), 1448), OUT, now)
            c += 1448
            if n % 2:
                pair.feed(segment(family, False, ACK, s, c, 3000, stamp(n), 0), IN, now)
        pair.feed(segment(family, True, ACK, c, s, 502, b"", 0), OUT, now)  # no options at all
        assert pair.hits() == 301


def test_retransmissions_and_zero_window_pick_the_same_timeouts() -> None:
    pair = Pair()
    c, s, now = 1000, 5000, 10.0
    handshake(pair, 4, c, s, 7, now)
    c, s = c + 1, s + 1
    data = segment(4, True, ACK | PSH, c, s, 502, stamp(3), 100)
    for _ in range(6):  # MAX_RETRANS identical segments: the RETRANS timeout
        now += 1.0
        pair.feed(data, OUT, now)
    flow = next(iter(pair.fast.conntrack))
    assert flow.deadline == now + 300.0  # RETRANS: retransmitted MAX_RETRANS times
    pair.feed(segment(4, False, ACK, s, c + 100, 0, stamp(4), 0), IN, now)  # zero window
    assert flow.deadline == now + 300.0  # RETRANS: the receiver's window is closed
    pair.feed(segment(4, True, ACK, c + 100, s, 502, stamp(5), 0), OUT, now)
    assert flow.deadline == now + 432000.0
    assert pair.hits() == 8


def test_fast_flags_are_the_valid_ack_class() -> None:
    expected = {ACK | extra for extra in range(256) if not extra & ~(PSH | URG | ECE | CWR)}
    assert expected == FAST_FLAGS


# -- random and mutated sequences --------------------------------------------------------------

u32 = st.integers(min_value=0, max_value=MASK)
near = st.one_of(
    st.just(0),
    st.integers(min_value=-3000, max_value=3000),
    st.integers(min_value=-400_000, max_value=400_000),  # around the windows (and MAXACKWINDOW)
    st.integers(min_value=-(2**31) - 2, max_value=2**31 + 2),
)
flag_bytes = st.one_of(
    st.sampled_from([ACK, ACK | PSH, ACK | PSH, ACK | URG, ACK | ECE | CWR]),
    st.sampled_from([FIN | ACK, RST, RST | ACK, SYN, SYN | ACK, 0]),
    st.integers(min_value=0, max_value=255),
)
step = st.one_of(
    st.just(0.0),
    st.floats(min_value=0.0, max_value=2.0),
    st.sampled_from([29.0, 31.0, 59.0, 61.0, 121.0, 299.0, 301.0, 432001.0]),
)
mutation = st.tuples(st.integers(min_value=0, max_value=63), st.integers(min_value=0, max_value=255))


@dataclass(frozen=True)
class Action:
    """One segment of the random sequence, relative to what each side has sent so far."""

    forward: bool
    flags: int
    seq: int  # offset from the sender's next sequence number
    ack: int  # offset from the receiver's next sequence number
    payload: int
    window: int
    options: str
    step: float  # seconds the clock moves before the segment
    mutations: tuple[tuple[int, int], ...]  # (offset, new byte value) in the first 64 bytes
    cut: int  # bytes cut off the end

    def packet(self, family: int, seq: int, ack: int, copy_cap: int = 0) -> bytes:
        options = OPTIONS[self.options](seq & MASK, ack & MASK)
        data = bytearray(
            segment(family, self.forward, self.flags, seq, ack, self.window, options, self.payload, copy_cap)
        )
        for at, value in self.mutations:
            data[at % len(data)] = value
        return bytes(data[: len(data) - self.cut])


def peer(behind: int, payload: st.SearchStrategy[int]) -> st.SearchStrategy[Action]:
    """Segments a real peer sends: ACK-class flags, sequence and ack numbers at most `behind`
    bytes behind the expected ones, `payload` bytes of data, undamaged."""
    offset = st.one_of(st.just(0), st.integers(min_value=-behind, max_value=0))
    return st.builds(
        Action,
        forward=st.booleans(),
        flags=st.sampled_from([ACK, ACK | PSH]),
        seq=offset,
        ack=offset,
        payload=payload,
        window=st.sampled_from([0, 502, 3000, 65535]),
        options=st.sampled_from(["none", "ts"]),
        step=st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=2.0)),
        mutations=st.just(()),
        cut=st.just(0),
    )


# Mostly segments a real peer sends (so the fast path has work), some anything at all.
clean = peer(3000, st.one_of(st.just(0), st.integers(min_value=0, max_value=1460)))
wild = st.builds(
    Action,
    forward=st.booleans(),
    flags=flag_bytes,
    seq=near,
    ack=near,
    payload=st.one_of(st.just(0), st.integers(min_value=0, max_value=1460)),
    window=st.one_of(st.sampled_from([0, 502, 3000, 65535]), st.integers(min_value=0, max_value=65535)),
    options=st.sampled_from(sorted(OPTIONS)),
    step=step,
    mutations=st.one_of(st.just(()), st.lists(mutation, min_size=1, max_size=3).map(tuple)),
    cut=st.one_of(st.just(0), st.integers(min_value=1, max_value=30)),
)
# A segment the fast path would take, with header bytes changed or its end cut off: what the
# fast path's own checks (lengths, fragments, options, flags) must turn away.
mutated = st.builds(
    Action,
    forward=st.booleans(),
    flags=st.sampled_from([ACK, ACK | PSH]),
    seq=st.just(0),
    ack=st.just(0),
    payload=st.integers(min_value=0, max_value=100),
    window=st.just(502),
    options=st.sampled_from(["none", "ts"]),
    step=st.just(0.0),
    mutations=st.lists(mutation, min_size=1, max_size=2).map(tuple),
    cut=st.one_of(st.just(0), st.integers(min_value=1, max_value=30)),
)
actions = st.one_of(clean, clean, clean, clean, wild, mutated)


def play(
    pair: Pair, family: int, c_isn: int, s_isn: int, wscale: int, sequence: list[Action], copy_cap: int = 0
) -> None:
    """A handshake, then `sequence` (as NFQUEUE hands it over with copy range `copy_cap`)."""
    now = 100.0
    handshake(pair, family, c_isn, s_isn, wscale, now)
    sent = {True: (c_isn + 1) & MASK, False: (s_isn + 1) & MASK}
    for a in sequence:
        now += a.step
        packet = a.packet(family, sent[a.forward] + a.seq, sent[not a.forward] + a.ack, copy_cap)
        pair.feed(packet, OUT if a.forward else IN, now)
        sent[a.forward] = (sent[a.forward] + a.payload) & MASK


# GSO-sized segments (up to 64 KB of data) of a real peer.
gso_sized = peer(
    70000,
    st.one_of(
        st.just(0),
        st.integers(min_value=0, max_value=1460),
        st.integers(min_value=1461, max_value=65483),
        st.just(65483),  # the largest IPv4 segment: total length 65535 with timestamps
    ),
)


@settings(max_examples=600, deadline=None)
@given(
    family=st.sampled_from([4, 6]),
    c_isn=u32,
    s_isn=u32,
    wscale=st.integers(min_value=0, max_value=14),
    # 0: packets come whole; else longer ones are cut to it, as NFQUEUE hands over GSO packets
    # (below, at and above the longest headers the fast path takes, 72 bytes, and nfqfw's range)
    copy_cap=st.sampled_from([0, 0, 0, 60, 71, 72, 100, 3840]),
    sequence=st.lists(st.one_of(actions, gso_sized), min_size=5, max_size=60),
)
def test_fast_path_matches_full_path(
    family: int, c_isn: int, s_isn: int, wscale: int, copy_cap: int, sequence: list[Action]
) -> None:
    pair = Pair(copy_cap)
    play(pair, family, c_isn, s_isn, wscale, sequence, copy_cap)
    hits, cut = pair.fast._fast_packets()
    event("fast path taken: " + ("0" if not hits else "1-9 times" if hits < 10 else "10+ times"))
    event("cut packets on the fast path: " + ("0" if not cut else "1-9" if cut < 10 else "10+"))


@pytest.mark.parametrize("family", [4, 6])
def test_gso_bulk_transfer_goes_through_the_fast_path_with_the_ip_lengths(family: int) -> None:
    pair = Pair(copy_cap=3840)
    c, s, now = 1000, 5000, 10.0
    handshake(pair, family, c, s, 7, now)
    c, s = c + 1, s + 1
    for n in range(100):
        now += 0.001
        pair.feed(segment(family, True, ACK | PSH, c, s, 1024, stamp(n), 62000, copy_cap=3840), OUT, now)
        c += 62000
        pair.feed(segment(family, False, ACK, s, c, 3000, stamp(n), 0, copy_cap=3840), IN, now)
    assert (pair.hits(), pair.fast.truncated_packets, pair.full.truncated_packets) == (200, 100, 100)
    flow = next(iter(pair.fast.conntrack))
    assert flow.state_name == "ESTABLISHED"
    assert pair.fast.conntrack.table.td[0] == (1001 + 100 * 62000) & MASK  # the client's END


def test_wrapping_sequence_numbers_fall_back_and_agree() -> None:
    pair = Pair()
    c, s, now = MASK - 3000, MASK - 10, 10.0
    handshake(pair, 4, c, s, 2, now)
    c, s = (c + 1) & MASK, (s + 1) & MASK
    for n in range(8):
        now += 0.01
        pair.feed(segment(4, True, ACK | PSH, c, s, 502, stamp(n), 1000), OUT, now)
        c = (c + 1000) & MASK
        pair.feed(segment(4, False, ACK, s, c, 3000, stamp(n), 0), IN, now)
    assert 0 < pair.hits() < 16  # some segments straddle the wrap: those took the full path


# -- UDP -----------------------------------------------------------------------------------------


def datagram(family: int, forward: bool, payload: int) -> bytes:
    client, server = HOSTS[family]
    src, dst, sport, dport = (client, server, 40000, 53) if forward else (server, client, 53, 40000)
    data = udp(src, dst, sport, dport, b"d" * payload)
    return ipv4(src, dst, 17, data) if family == 4 else ipv6(src, dst, 17, data)


def test_udp_stream_goes_through_the_fast_path_once_replied_and_assured() -> None:
    for family in (4, 6):
        pair = Pair()
        pair.feed(datagram(family, True, 20), OUT, 10.0)  # NEW: the policy decides
        pair.feed(datagram(family, True, 20), OUT, 10.5)  # still NEW (no reply yet)
        pair.feed(datagram(family, False, 40), IN, 11.0)  # the reply
        pair.feed(datagram(family, True, 20), OUT, 11.5)  # replied, not a stream yet: 30 s
        pair.feed(datagram(family, True, 20), OUT, 12.5)  # a stream now: ASSURED (full path, once)
        for n in range(10):
            pair.feed(datagram(family, n % 2 == 0, 64), OUT if n % 2 == 0 else IN, 13.0 + n)
        assert pair.hits() == 11


def test_udp_gso_datagrams_cut_by_the_copy_range_take_the_fast_path() -> None:
    for family in (4, 6):
        pair = Pair(copy_cap=3840)
        for n, (forward, now) in enumerate([(True, 10.0), (False, 11.0), (True, 11.5), (True, 12.5)]):
            size = 20 if n < 2 else 9000  # a UDP GSO send: its UDP length covers all 9000 bytes
            pair.feed(kernel_copy(datagram(family, forward, size), 0, 3840), OUT if forward else IN, now)
        for n in range(10):
            big = kernel_copy(datagram(family, n % 2 == 0, 9000), 0, 3840)
            assert len(big) == 3840
            pair.feed(big, OUT if n % 2 == 0 else IN, 13.0 + n)
        assert pair.fast._fast_packets() == (11, 11)  # 11.5 and the ten: all cut
        assert pair.full.truncated_packets == 12  # 12.5 made the stream ASSURED: the full path, once


udp_steps = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 2.0]),  # 2 s: exactly the UDP stream boundary
    st.floats(min_value=0.0, max_value=3.0),
    st.sampled_from([29.9, 30.0, 119.9, 121.0]),
)
udp_clean = st.tuples(
    st.booleans(),  # forward
    st.integers(min_value=0, max_value=200),  # payload
    udp_steps,
    st.just(()),
    st.just(0),
)
udp_damaged = st.tuples(
    st.booleans(),
    st.integers(min_value=0, max_value=200),
    udp_steps,
    st.lists(mutation, min_size=1, max_size=2).map(tuple),  # (offset, byte) in the first 64 bytes
    st.one_of(st.just(0), st.integers(min_value=1, max_value=12)),  # bytes cut off the end
)


@settings(max_examples=300, deadline=None)
@given(
    family=st.sampled_from([4, 6]),
    replied=st.booleans(),
    copy_cap=st.sampled_from([0, 0, 40, 100]),  # 100: longer datagrams are cut (UDP GSO)
    sequence=st.lists(st.one_of(udp_clean, udp_clean, udp_clean, udp_damaged), min_size=3, max_size=40),
)
def test_udp_fast_path_matches_full_path(
    family: int,
    replied: bool,
    copy_cap: int,
    sequence: list[tuple[bool, int, float, tuple[tuple[int, int], ...], int]],
) -> None:
    pair = Pair(copy_cap)
    now = 100.0
    pair.feed(datagram(family, True, 20), OUT, now)
    if replied:
        pair.feed(datagram(family, False, 20), IN, now)
    for forward, payload, step, mutations, cut in sequence:
        data = bytearray(kernel_copy(datagram(family, forward, payload), 0, copy_cap))
        for at, value in mutations:
            data[at % len(data)] = value
        now += step
        pair.feed(bytes(data[: len(data) - cut]), OUT if forward else IN, now)
    hits = pair.hits()
    event("fast path taken: " + ("0" if not hits else "1-9 times" if hits < 10 else "10+ times"))


def udp_variants(family: int) -> list[bytes]:
    """A datagram of the flow as sent, and damaged the ways the fast path must turn away."""
    good = datagram(family, True, 30)
    ip_header = 20 if family == 4 else 40
    at = ip_header + 4  # the UDP length field

    def length(value: int) -> bytes:
        return good[:at] + value.to_bytes(2, "big") + good[at + 2 :]

    variants = [good, length(7), length(8), length(len(good) - ip_header + 1), good[:-1], good + b"pad"]
    if family == 4:
        more_fragments = good[:6] + b"\x20\x00" + good[8:]
        later_fragment = good[:6] + b"\x00\x10" + good[8:]
        too_long = good[:2] + (len(good) + 1).to_bytes(2, "big") + good[4:]
        variants += [more_fragments, later_fragment, too_long]
    else:
        too_long = good[:4] + (len(good) - 39).to_bytes(2, "big") + good[6:]
        variants.append(too_long)
    return variants


def test_udp_edge_cases_agree() -> None:
    for family in (4, 6):
        good, *damaged = udp_variants(family)
        for variant in (good, *damaged):
            pair = Pair()
            pair.feed(datagram(family, True, 20), OUT, 10.0)
            pair.feed(datagram(family, False, 20), IN, 10.0)
            pair.feed(datagram(family, True, 20), OUT, 11.0)  # replied: the fast path's from here
            pair.feed(variant, OUT, 12.0)  # exactly 2 s after creation: not a stream yet
            pair.feed(variant, OUT, 12.5)  # a stream: ASSURED (the full path, once)
            pair.feed(variant, OUT, 13.0)
            if variant is good:
                assert pair.hits() == 3  # 11.0, 12.0 and 13.0


def test_fast_path_after_the_table_was_cleared() -> None:
    pair = Pair()
    handshake(pair, 4, 1000, 5000, 7, 10.0)
    pair.fast.conntrack.clear()
    pair.full.conntrack.clear()
    pair.feed(segment(4, True, ACK, 1001, 5001, 502, stamp(3), 0), OUT, 11.0)  # no flow: invalid
    handshake(pair, 4, 7000, 9000, 7, 12.0)
    pair.feed(segment(4, True, ACK | PSH, 7001, 9001, 502, stamp(4), 100), OUT, 12.5)
    assert pair.hits() == 1
