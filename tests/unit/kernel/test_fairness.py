"""nfqfw.kernel.fairness: when a queue is behind, which flows are fat, the flow key, the quanta."""

from __future__ import annotations

import itertools
import math

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6

from nfqfw.kernel import fairness
from nfqfw.kernel.fairness import (
    FAT_MINIMUM,
    FAT_WINDOW,
    FIRST_PACKET_SHARE,
    INTERVAL,
    MEMORY,
    OVERLOAD,
    QUANTUM,
    TARGET,
    Backlog,
    DelayControl,
    FatFlows,
    flow_key,
)

LATE, EARLY = TARGET * 2, TARGET / 2
JUST = 1e-9  # past a boundary (float sums)


def test_behind_only_after_an_interval_above_target() -> None:
    delay = DelayControl()
    assert not delay.observe(10.0, LATE)
    assert not delay.observe(10.0 + INTERVAL / 2, LATE)
    assert delay.observe(10.0 + INTERVAL + JUST, LATE)
    assert delay.episodes == 1


def test_a_measurement_within_target_starts_the_interval_again() -> None:
    delay = DelayControl()
    delay.observe(10.0, LATE)
    delay.observe(10.0 + INTERVAL * 0.9, EARLY)  # a burst that drained: not behind
    assert not delay.observe(10.0 + INTERVAL * 1.1, LATE)
    assert delay.observe(10.0 + INTERVAL * 2.1, LATE)


def test_no_longer_behind_at_the_first_packet_within_target_or_when_emptied() -> None:
    delay = DelayControl()
    delay.observe(0.0, LATE)
    assert delay.observe(INTERVAL, LATE)
    assert not delay.observe(INTERVAL + 0.01, TARGET)
    delay.observe(INTERVAL + 0.02, LATE)
    assert delay.behind  # again at once: within MEMORY
    delay.emptied(INTERVAL + 0.03)
    assert not delay.behind and delay.above_since is None


def test_behind_again_at_once_within_memory_after_an_interval_later() -> None:
    delay = DelayControl()
    delay.observe(0.0, LATE)
    delay.observe(INTERVAL, LATE)
    delay.emptied(1.0)
    assert delay.observe(1.0 + MEMORY * 0.9, LATE)
    delay.emptied(5.0)
    assert not delay.observe(5.0 + MEMORY + 0.01, LATE)  # memory over: bursts pass again
    assert delay.observe(5.0 + MEMORY + 0.01 + INTERVAL + JUST, LATE)
    assert delay.episodes == 3


def test_drops_come_at_codels_pace_while_behind() -> None:
    delay = DelayControl()
    delay.observe(0.0, LATE)
    assert not delay.drop(0.0)  # not behind yet: drop_next is infinitely far
    assert delay.observe(INTERVAL + JUST, LATE)
    assert delay.drop_next == INTERVAL + JUST  # the first at once
    times = []
    while delay.drop_next < INTERVAL + 1.0:  # a fat packet at hand whenever one is due
        now = delay.drop_next
        assert not delay.drop(now - JUST)  # a moment before: it stays
        assert delay.drop(now)
        times.append(now)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == pytest.approx([INTERVAL / math.sqrt(n) for n in range(2, len(times) + 1)])
    assert len(times) == 38 and delay.count == 39  # ever faster: 38 in the first second
    assert not delay.overloaded  # LATE < OVERLOAD


def test_overloaded_every_fat_packet_goes_until_the_wait_is_within_target() -> None:
    delay = DelayControl()
    delay.observe(0.0, OVERLOAD * 2)
    assert not delay.overloaded  # a burst: not behind yet, nothing dropped
    delay.observe(INTERVAL + JUST, OVERLOAD * 2)
    assert delay.behind and delay.overloaded
    delay.drop_next = math.inf  # (CoDel's drops aside)
    assert all(delay.drop(1.0) for _ in range(100))  # every one, in a shared queue ...
    assert not delay.drop(1.0, shared=False)  # ... none alone in it (but CoDel's)
    delay.observe(0.3, (TARGET + OVERLOAD) / 2)  # still behind: it goes on until within target
    assert delay.overloaded
    delay.observe(0.31, TARGET)
    assert not delay.behind and not delay.overloaded and delay.drop_next == math.inf


def test_shedding_that_never_brings_the_wait_under_overload_stops_for_a_while() -> None:
    delay = DelayControl()
    delay.observe(0.0, OVERLOAD * 8)
    delay.observe(INTERVAL, OVERLOAD * 8)
    assert delay.overloaded and delay.overloaded_since == INTERVAL
    delay.observe(INTERVAL + MEMORY / 2, OVERLOAD / 2)  # under it once: it gets somewhere
    delay.observe(INTERVAL + MEMORY / 2 + 0.01, OVERLOAD * 8)
    delay.observe(INTERVAL + MEMORY, OVERLOAD * 8)
    assert delay.overloaded  # a memory since it started, but not without a measurement under it
    start = INTERVAL + MEMORY / 2 + 0.01
    delay.observe(start + MEMORY + JUST, OVERLOAD * 8)
    assert not delay.overloaded and delay.behind  # futile: the tail drops, not nfqfw; CoDel goes on
    delay.observe(start + MEMORY + MEMORY / 2, OVERLOAD * 8)
    assert not delay.overloaded
    delay.observe(start + 2 * MEMORY + 2 * JUST, OVERLOAD * 8)
    assert delay.overloaded  # tried again


def test_behind_again_within_memory_resumes_near_the_pace() -> None:
    delay = DelayControl()
    delay.observe(0.0, LATE)
    delay.observe(INTERVAL + JUST, LATE)
    for n in range(7):
        assert delay.drop(1.0 + n)
    assert delay.count == 8
    delay.emptied(10.0)
    delay.observe(10.0 + MEMORY / 2, LATE)
    assert delay.behind and delay.count == 6  # CoDel: count - 2
    delay.emptied(20.0)
    delay.observe(20.0 + MEMORY * 2, LATE)
    delay.observe(20.0 + MEMORY * 2 + INTERVAL + JUST, LATE)
    assert delay.count == 1  # a fresh episode


def test_one_flood_is_fat_the_sparse_flows_never() -> None:
    flows = FatFlows()
    verdicts: dict[bytes, list[bool]] = {b"flood": [], b"ping": [], b"dns": []}
    for n in range(5000):
        verdicts[b"flood"].append(flows.fat(b"flood"))
        if n % 100 == 0:
            verdicts[b"ping"].append(flows.fat(b"ping"))
        if n % 37 == 0:
            verdicts[b"dns"].append(flows.fat(b"dns"))
    assert verdicts[b"flood"][: FAT_MINIMUM - 1] == [False] * (FAT_MINIMUM - 1)
    assert all(verdicts[b"flood"][FAT_MINIMUM - 1 :])
    assert not any(verdicts[b"ping"]) and not any(verdicts[b"dns"])


def test_flows_of_equal_weight_are_all_fat_and_a_light_one_is_not() -> None:
    flows = FatFlows()
    last = {}
    for _ in range(200):
        for key in (b"a", b"b", b"c", b"d"):
            last[key] = flows.fat(key)
    assert last == {b"a": True, b"b": True, b"c": True, b"d": True}
    for n in range(400):  # another flow at a tenth of their rate: below half a fair share
        for key in (b"a", b"b", b"c", b"d"):
            flows.fat(key)
        if n % 10 == 0:
            last[b"e"] = flows.fat(b"e")
    assert last[b"e"] is False


def test_counts_are_halved_every_window_so_flows_that_stopped_are_forgotten() -> None:
    flows = FatFlows()
    for n in range(FAT_WINDOW - 1):
        flows.fat(b"random %d" % n)  # a new flow every packet: never fat, many keys
    assert len(flows.counts) == FAT_WINDOW - 1
    flows.fat(b"one more")
    assert flows.counts == {} and flows.total == 0  # each had 1: halved to nothing
    for _ in range(3 * FAT_WINDOW):
        flows.fat(b"flood")
    assert flows.counts[b"flood"] < 2 * FAT_WINDOW and flows.total == flows.counts[b"flood"]


def test_a_fresh_episode_counts_flows_afresh_a_quick_return_keeps_them() -> None:
    backlog = Backlog()
    backlog.measured(0.0, LATE)
    assert backlog.measured(INTERVAL, LATE)
    for _ in range(FAT_MINIMUM):
        backlog.drop_early(b"x" * 12, INTERVAL)
    assert backlog.flows.total == FAT_MINIMUM
    backlog.emptied(1.0)
    assert backlog.measured(1.0 + MEMORY / 2, LATE)  # behind again within memory: same counts
    assert backlog.flows.total == FAT_MINIMUM
    backlog.emptied(2.0)
    backlog.measured(2.0 + MEMORY * 2, LATE)
    assert backlog.measured(2.0 + MEMORY * 2 + INTERVAL + JUST, LATE)
    assert backlog.flows.total == 0  # a new episode: whatever was fat then may not be now


def test_flow_key_addresses_and_ports() -> None:
    a = bytes(IP(src="10.0.0.25", dst="203.0.113.20") / UDP(sport=5000, dport=5201) / (b"x" * 64))
    b = bytes(IP(src="10.0.0.25", dst="203.0.113.20", id=7) / UDP(sport=5000, dport=5201) / b"y")
    c = bytes(IP(src="10.0.0.25", dst="203.0.113.20") / UDP(sport=5001, dport=5201))
    d = bytes(IP(src="10.0.0.25", dst="203.0.113.21") / UDP(sport=5000, dport=5201))
    back = bytes(IP(src="203.0.113.20", dst="10.0.0.25") / UDP(sport=5201, dport=5000))
    assert flow_key(a) == flow_key(b) == a[12:24]
    assert len({flow_key(a), flow_key(c), flow_key(d), flow_key(back)}) == 4  # each direction its own
    options = bytes(
        IP(src="10.0.0.25", dst="203.0.113.20", options=b"\x01\x01\x01\x00") / UDP(sport=5000, dport=5201)
    )
    assert flow_key(options) == flow_key(a)  # the ports after the options: the same flow


def test_flow_key_of_pings_is_their_identifier_not_their_sequence() -> None:
    one = bytes(IP(src="10.0.0.25", dst="203.0.113.20") / ICMP(id=42, seq=1))
    two = bytes(IP(src="10.0.0.25", dst="203.0.113.20") / ICMP(id=42, seq=2) / b"payload")
    other = bytes(IP(src="10.0.0.25", dst="203.0.113.20") / ICMP(id=43, seq=1))
    udp = bytes(IP(src="10.0.0.25", dst="203.0.113.20") / UDP(sport=42, dport=1))
    assert flow_key(one) == flow_key(two) != flow_key(other)
    assert flow_key(one) != flow_key(udp)


def test_flow_key_ipv6_and_odd_packets() -> None:
    a = bytes(IPv6(src="fd00::25", dst="2001:db8:1::10") / UDP(sport=1, dport=2))
    b = bytes(IPv6(src="fd00::25", dst="2001:db8:1::10") / UDP(sport=1, dport=3))
    assert flow_key(a) != flow_key(b) and flow_key(a)[:32] == a[8:40]
    assert flow_key(b"") == b""
    assert flow_key(b"\x45\x00") == b""  # cut short: a key of what there is
    assert flow_key(bytes(20)) == bytes(12)  # not IPv4: read as IPv6, what there is of it


def test_first_packet_queues_get_a_shorter_quantum() -> None:
    assert fairness.quantum(False) == QUANTUM
    assert fairness.quantum(True) == QUANTUM * FIRST_PACKET_SHARE < QUANTUM
