"""nfqfw.kernel.queue: several queues served in turn by one thread, and early drops from the fat
flows of a queue that is behind (injected clocks; fake queues that behave as NetfilterQueue's
run and run_socket do, over real sockets)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from queue_fakes import ACCEPT, MARK, FakeLinks, FakePacket, FakeQueue, FakeSender
from scapy.layers.inet import ICMP, IP, UDP

from nfqfw.core.verdict import Meta, Verdict
from nfqfw.kernel import queue
from nfqfw.kernel.fairness import DROP_BATCH, FIRST_PACKET_SHARE, INTERVAL, OVERLOAD, QUANTUM, TARGET
from nfqfw.kernel.queue import QueueAdapter

COST = 0.00002  # seconds the engine takes per packet (the injected clock moves on by it)
READ_COST = 0.000002  # seconds reading a packet takes (Clock.ticking)
WALL = 1_800_000_000.0  # the wall clock at monotonic 0 (the kernel's timestamps are wall-clock)


def udp(sport: int, dst: str = "203.0.113.10") -> bytes:
    return bytes(IP(src="10.0.0.25", dst=dst) / UDP(sport=sport, dport=5201) / (b"x" * 64))


FLOOD, OTHER, FIRST = udp(1000), udp(2000, "203.0.113.20"), udp(3000, "203.0.113.30")
PING = bytes(IP(src="10.0.0.25", dst="203.0.113.20") / ICMP(id=7, seq=1))


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL + self.now

    def ticking(self) -> float:
        """The time, read at a cost: every packet read takes READ_COST, dropped or not."""
        self.now += READ_COST
        return self.now

    def slow_ticking(self) -> float:
        """As ticking, ten times the cost."""
        self.now += 10 * READ_COST
        return self.now


class CostlyEngine:
    """Accepts everything; each packet moves the clock on by COST; remembers the order."""

    fast_path = None

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.seen: list[bytes] = []

    def process(self, data: bytes, meta: Meta, now: float) -> Verdict:
        self.seen.append(data)
        self.clock.now += COST
        return ACCEPT

    full_process = process


Served = tuple[QueueAdapter, CostlyEngine, Clock, dict[int, FakeQueue]]


def serving(
    monkeypatch: pytest.MonkeyPatch, numbers: list[int], first_packets: list[int]
) -> Iterator[Served]:
    """An adapter serving fake queues `numbers`, `first_packets` among them for first packets."""
    clock = Clock()
    engine = CostlyEngine(clock)
    adapter = QueueAdapter(
        engine, FakeLinks({3: "lan0", 4: "wan0"}), FakeSender(), mark=MARK, clock=clock, wall_clock=clock.wall
    )
    queues = {number: FakeQueue(adapter.on_packet) for number in numbers}
    monkeypatch.setattr(adapter, "_bind_one", lambda number, max_len, sock_len: queues[number])
    monkeypatch.setattr(queue, "_ask_for_gso", lambda nfq, number: True)
    adapter.bind(numbers, first_packets=first_packets)
    adapter.set_deadline(math.inf)  # no housekeeping unless a test asks
    yield adapter, engine, clock, queues
    adapter.unbind()
    for fake in queues.values():
        fake.close()


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    """An adapter serving fake queues 0 and 1 (established flows) and 4 (first packets)."""
    yield from serving(monkeypatch, [0, 1, 4], [4])


def serve(adapter: QueueAdapter, number: int, queues: dict[int, FakeQueue]) -> None:
    """What the poll loop does when queue `number`'s descriptor is readable (and the kernel's
    taking the batch verdicts sent meanwhile)."""
    adapter.fds()[queues[number].get_fd()]()
    for fake in queues.values():
        fake.settle()


def test_a_flood_in_one_queue_waits_its_turn(served: tuple) -> None:  # type: ignore[type-arg]
    adapter, engine, _, queues = served
    flood = [FakePacket(FLOOD) for _ in range(400)]
    queues[0].put(*flood)
    other = FakePacket(OTHER)
    queues[1].put(other)
    serve(adapter, 0, queues)
    assert other.verdict == "repeat" and all(p.verdict == "repeat" for p in flood)
    # queue 1 had its turn once queue 0 had been read for one quantum, not after all of it
    assert engine.seen.index(OTHER) <= QUANTUM / COST + 1


def test_a_round_serves_established_queues_first_and_first_packets_for_less(served: tuple) -> None:  # type: ignore[type-arg]
    adapter, engine, _, queues = served
    queues[0].put(*[FakePacket(FLOOD) for _ in range(2000)])
    queues[4].put(*[FakePacket(FIRST) for _ in range(300)])
    queues[1].put(*[FakePacket(OTHER) for _ in range(300)])
    serve(adapter, 0, queues)
    assert len(engine.seen) == 2600
    turns = [data for n, data in enumerate(engine.seen) if n == 0 or engine.seen[n - 1] != data]
    assert turns[:4] == [FLOOD, OTHER, FIRST, FLOOD]  # queue 1 before queue 4 in each round
    runs = _runs(engine.seen)
    other, first = (
        [n for data, n in runs if data == OTHER][:-1],  # the last turn takes what is left
        [n for data, n in runs if data == FIRST][:-1],
    )
    # a turn ends with the first packet read after its quantum (that one is still decided)
    assert other and all(QUANTUM / COST <= n <= QUANTUM / COST + 2 for n in other)
    short = QUANTUM * FIRST_PACKET_SHARE / COST
    assert first and all(short <= n <= short + 2 for n in first)


def test_first_packet_queues_share_one_turn_a_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood from random sources lands in every first-packet queue: together they get one
    short turn a round, in rotation, not one each."""
    second = udp(4000, "203.0.113.40")
    for adapter, engine, _, queues in serving(monkeypatch, [0, 4, 5], [4, 5]):
        queues[0].put(*[FakePacket(FLOOD) for _ in range(2000)])
        queues[4].put(*[FakePacket(FIRST) for _ in range(200)])
        queues[5].put(*[FakePacket(second) for _ in range(200)])
        serve(adapter, 0, queues)
        assert len(engine.seen) == 2400
        turns = [data for data, _ in _runs(engine.seen)]
        assert turns[:7] == [FLOOD, FIRST, FLOOD, second, FLOOD, FIRST, FLOOD]
        short = QUANTUM * FIRST_PACKET_SHARE / COST
        for data, n in _runs(engine.seen)[:6]:  # three rounds: FLOOD's quantum, then one short turn
            assert QUANTUM / COST <= n <= QUANTUM / COST + 2 if data == FLOOD else short <= n <= short + 2


def _runs(seen: list[bytes]) -> list[tuple[bytes, int]]:
    runs: list[tuple[bytes, int]] = []
    for data in seen:
        if runs and runs[-1][0] == data:
            runs[-1] = (data, runs[-1][1] + 1)
        else:
            runs.append((data, 1))
    return runs


class Stamped(FakePacket):
    """A packet whose kernel timestamp says it waited `waited[0]` seconds when it is read (a
    standing queue of that length, whatever the engine's pace)."""

    def __init__(self, data: bytes, clock: Clock, waited: list[float]) -> None:
        super().__init__(data)
        self.clock, self.waited = clock, waited

    def get_timestamp(self) -> float:
        return self.clock.wall() - self.waited[0]


def test_an_overloaded_queue_drops_its_fat_flow_early_and_serves_the_sparse_ones(served: tuple) -> None:  # type: ignore[type-arg]
    adapter, _, clock, queues = served
    waited = [OVERLOAD * 2]
    packets = [Stamped(PING if n % 100 == 0 else FLOOD, clock, waited) for n in range(20_000)]
    queues[0].put(*packets)
    serve(adapter, 0, queues)
    pings = [p for p in packets if p.get_payload() == PING]
    assert queues[0].batches >= adapter.early_drops / DROP_BATCH  # dropped together, by id
    assert all(p.verdict == "repeat" for p in pings)  # the sparse flow: every packet to the engine
    dropped = [p for p in packets if p.verdict == "drop"]
    assert dropped and all(p.get_payload() == FLOOD for p in dropped)
    assert all(p.verdict in ("repeat", "drop") for p in packets)  # one verdict each
    assert adapter.early_drops == len(dropped)
    # nothing dropped in the first INTERVAL (bursts pass): the engine saw that much of the flood
    first_drop = packets.index(dropped[0])
    assert first_drop * COST >= INTERVAL * 0.99


def test_a_queue_behind_but_not_overloaded_drops_at_codels_pace(served: tuple) -> None:  # type: ignore[type-arg]
    adapter, _, clock, queues = served
    waited = [(TARGET + OVERLOAD) / 2]
    packets = [Stamped(PING if n % 100 == 0 else FLOOD, clock, waited) for n in range(20_000)]
    queues[0].put(*packets)  # 0.4 s of the engine's time: behind after 0.1 s
    serve(adapter, 0, queues)
    dropped = [p for p in packets if p.verdict == "drop"]
    # at 0.1 s, then every 0.1 / sqrt(n) s: about 7 in the remaining 0.3 s, all of the flood
    assert 5 <= len(dropped) <= 9, len(dropped)
    assert all(p.get_payload() == FLOOD for p in dropped)
    assert all(p.verdict == "repeat" for p in packets if p.verdict != "drop")


def test_a_flood_faster_than_even_its_drops_is_left_to_the_kernel(served: tuple) -> None:  # type: ignore[type-arg]
    """Every packet read costs time, dropped or not: when shedding all of the flood does not
    bring the wait down (it comes faster than nfqfw reads), nfqfw stops shedding and decides
    what it can, as without early drops: the flood is not starved for nothing."""
    adapter, _, clock, queues = served
    adapter.clock = clock.slow_ticking  # each read moves the clock on, as a real read takes time
    adapter.on_packet = adapter._make_callback()
    queues[0].callback = adapter.on_packet
    waited = [OVERLOAD * 2]  # and it never falls
    # shedding all of it for MEMORY takes ~50,000 reads; then 10,000 decided take 0.4 s (< MEMORY)
    packets = [Stamped(PING if n % 100 == 0 else FLOOD, clock, waited) for n in range(60_000)]
    queues[0].put(*packets)
    serve(adapter, 0, queues)
    delay = adapter._served[0].backlog.delay  # (the queue was read to its end since: emptied)
    assert delay.futile_until > clock.now  # it found out, and stopped for MEMORY
    assert sum(p.verdict == "drop" for p in packets[:40_000]) > 35_000  # it had shed the flood
    tail = packets[-5_000:]
    decided = sum(p.verdict == "repeat" for p in tail)
    assert decided > 0.95 * len(tail), decided  # then nearly all decided again (CoDel's few aside)
    assert all(p.verdict in ("repeat", "drop") for p in packets)


def test_a_flood_alone_in_its_queue_is_not_shed(served: tuple) -> None:  # type: ignore[type-arg]
    """Nobody else waits behind it: reading its packets only to drop them would cost nfqfw time
    the kernel's drops at the tail do not. CoDel's few drops go on (a TCP flow needs them)."""
    adapter, _, clock, queues = served
    packets = [Stamped(FLOOD, clock, [OVERLOAD * 2]) for _ in range(20_000)]
    queues[0].put(*packets)
    serve(adapter, 0, queues)
    dropped = sum(p.verdict == "drop" for p in packets)
    assert 0 < dropped < 20, dropped  # 0.3 s behind: CoDel's pace only


def test_a_queue_that_catches_up_is_no_longer_behind(served: tuple) -> None:  # type: ignore[type-arg]
    adapter, _, clock, queues = served
    waited = [OVERLOAD * 2]
    queues[0].put(*[Stamped(FLOOD, clock, waited) for _ in range(8_000)])
    serve(adapter, 0, queues)
    dropped = adapter.early_drops
    assert dropped > 0
    waited[0] = TARGET / 2
    later = [Stamped(FLOOD, clock, waited) for _ in range(200)]
    queues[0].put(*later)
    serve(adapter, 0, queues)
    assert all(p.verdict == "repeat" for p in later)
    assert adapter.early_drops == dropped


def test_packets_without_a_timestamp_are_never_dropped_early(served: tuple) -> None:  # type: ignore[type-arg]
    adapter, _, _, queues = served
    packets = [FakePacket(FLOOD) for _ in range(8_000)]  # the gateway's own: no timestamp
    queues[0].put(*packets)
    serve(adapter, 0, queues)
    assert all(p.verdict == "repeat" for p in packets) and adapter.early_drops == 0


def test_housekeeping_runs_during_a_flood_and_a_stop_ends_the_turns(served: tuple) -> None:  # type: ignore[type-arg]
    adapter, engine, clock, queues = served
    calls: list[float] = []

    def housekeeping(now: float) -> float:
        calls.append(now)
        if len(calls) == 3:
            adapter.unbind()  # a stop
            return math.inf
        return now + 0.001

    adapter.housekeeping = housekeeping
    adapter.set_deadline(clock.now + 0.001)
    queues[0].put(*[FakePacket(FLOOD) for _ in range(1000)])
    queues[1].put(*[FakePacket(OTHER) for _ in range(1000)])
    serve(adapter, 0, queues)
    assert len(calls) == 3 and calls == sorted(calls)
    assert adapter.counters["verdict error"] == 0
    assert 0 < len(engine.seen) < 2000  # the rest is the kernel's to drop (unbound)
