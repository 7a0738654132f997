"""nfqfw.kernel.queue: the per-packet callback with a stand-in engine and fake kernel packets."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from queue_fakes import (
    ACCEPT,
    DROP,
    MARK,
    RESET,
    SYN,
    UDP_PACKET,
    FakeLinks,
    FakePacket,
    FakeSender,
    StandInEngine,
)
from scapy.layers.inet import IP, TCP

from nfqfw.core.verdict import Action, Ct, Hook, Meta, Verdict
from nfqfw.kernel import queue
from nfqfw.kernel.queue import QueueAdapter
from nfqfw.kernel.queue_info import COPY_RANGE, DropWatch, QueueStat, parse_queue_stats
from nfqfw.kernel.queueflags import NFQA_CFG_F_GSO, QueueFlagsError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _adapter(
    verdict: Verdict | Exception,
    *,
    fail_open: bool = False,
    sender: FakeSender | None = None,
    rate: float = 1000,
) -> tuple[QueueAdapter, StandInEngine, FakeLinks, FakeSender, Clock]:
    engine, links, clock = StandInEngine(verdict), FakeLinks({1: "lo", 3: "lan0", 4: "wan0"}), Clock()
    sender = sender or FakeSender()
    adapter = QueueAdapter(
        engine, links, sender, mark=MARK, fail_open=fail_open, reject_rate=rate, clock=clock
    )
    adapter.set_deadline(1e9)
    return adapter, engine, links, sender, clock


def test_accept_sets_the_mark_bit_and_repeats() -> None:
    adapter, engine, _, _, _ = _adapter(ACCEPT)
    pkt = FakePacket(SYN, mark=0x5)
    adapter.on_packet(pkt)
    assert (pkt.verdict, pkt.new_mark) == ("repeat", 0x10000005)
    assert engine.seen == [(SYN, Meta(Hook.FORWARD, "lan0", "wan0"), 100.0)]


def test_drop() -> None:
    adapter, _, _, sender, _ = _adapter(DROP)
    pkt = FakePacket(SYN)
    adapter.on_packet(pkt)
    assert (pkt.verdict, pkt.new_mark, sender.sent) == ("drop", None, [])


def test_reject_drops_and_sends_the_reset_on_the_in_interface() -> None:
    adapter, _, _, sender, _ = _adapter(RESET)
    pkt = FakePacket(SYN, hook=1, indev=3, outdev=0)
    adapter.on_packet(pkt)
    assert pkt.verdict == "drop"
    [(reply, ifindex)] = sender.sent
    assert ifindex == 3
    rst = IP(reply)
    assert (rst.src, rst.dst, rst[TCP].sport, rst[TCP].dport, rst[TCP].ack, str(rst[TCP].flags)) == (
        "198.51.100.20",
        "192.0.2.10",
        81,
        40000,
        8,
        "RA",
    )
    assert adapter.counters["reject sent"] == 1


def test_reject_from_the_gateway_itself_uses_the_out_interface() -> None:
    adapter, _, _, sender, _ = _adapter(RESET)
    adapter.on_packet(FakePacket(SYN, hook=3, indev=0, outdev=4))
    assert [ifindex for _, ifindex in sender.sent] == [4]


def test_reject_without_kind_sends_port_unreachable() -> None:
    adapter, _, _, sender, _ = _adapter(Verdict(Action.REJECT, Ct.NEW, "x", "rule x"))
    adapter.on_packet(FakePacket(UDP_PACKET))
    [(reply, _)] = sender.sent
    assert (reply[20], reply[21]) == (3, 3)


def test_reject_not_answered_send_error_and_rate_limit_are_counted() -> None:
    adapter, _, _, _, clock = _adapter(RESET, rate=2)
    rst = bytes(IP(src="192.0.2.10", dst="198.51.100.20") / TCP(flags="R"))
    adapter.on_packet(FakePacket(rst))
    for _ in range(3):
        adapter.on_packet(FakePacket(SYN))
    clock.now += 0.5  # one more token
    adapter.on_packet(FakePacket(SYN))
    assert {k: v for k, v in adapter.counters.items() if v} == {
        "reject not answered": 1,
        "reject sent": 3,
        "reject rate-limited": 1,
    }
    failing, _, _, _, _ = _adapter(RESET, sender=FakeSender(OSError(101, "Network is unreachable")))
    pkt = FakePacket(SYN)
    failing.on_packet(pkt)
    assert pkt.verdict == "drop" and failing.counters["reject send error"] == 1


def test_meta_is_cached_per_hook_and_interfaces_until_links_change() -> None:
    adapter, engine, links, _, _ = _adapter(ACCEPT)
    for _ in range(3):
        adapter.on_packet(FakePacket(SYN, hook=2, indev=3, outdev=4))
    adapter.on_packet(FakePacket(SYN, hook=1, indev=3, outdev=0))
    assert links.lookups == [3, 4, 3, 0]
    assert engine.seen[3][1] == Meta(Hook.INPUT, "lan0", None)
    links.change({3: "dmz0", 4: "wan0"})  # renamed
    adapter.on_packet(FakePacket(SYN, hook=2, indev=3, outdev=4))
    assert engine.seen[-1][1] == Meta(Hook.FORWARD, "dmz0", "wan0")


def test_unknown_interface_is_none_and_not_cached() -> None:
    adapter, engine, links, _, _ = _adapter(ACCEPT)
    adapter.on_packet(FakePacket(SYN, hook=3, indev=0, outdev=99))
    adapter.on_packet(FakePacket(SYN, hook=3, indev=0, outdev=99))
    assert engine.seen[0][1] == Meta(Hook.OUTPUT, None, None)
    assert links.lookups == [0, 99, 0, 99]


@pytest.mark.parametrize(("fail_open", "verdict", "mark"), [(False, "drop", None), (True, "repeat", MARK)])
def test_engine_error_gets_the_failure_mode_verdict(
    fail_open: bool, verdict: str, mark: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    adapter, _, _, _, _ = _adapter(RuntimeError("boom"), fail_open=fail_open)
    pkt = FakePacket(SYN)
    with caplog.at_level(logging.ERROR):
        adapter.on_packet(pkt)
    assert (pkt.verdict, pkt.new_mark) == (verdict, mark)
    assert adapter.counters["verdict error"] == 1
    assert "error handling a packet" in caplog.text


def test_unexpected_hook_is_an_error_and_dropped() -> None:
    adapter, engine, _, _, _ = _adapter(ACCEPT)
    pkt = FakePacket(SYN, hook=4)  # POSTROUTING: not one of ours
    adapter.on_packet(pkt)
    assert (pkt.verdict, engine.seen, adapter.counters["verdict error"]) == ("drop", [], 1)


def test_prerouting_samples_reach_the_engine_with_their_hook() -> None:
    """The kernel's antispoof sends its log samples from PREROUTING (raw table)."""
    adapter, engine, _, _, _ = _adapter(ACCEPT)
    adapter.on_packet(FakePacket(SYN, hook=0, indev=3, outdev=0))
    assert engine.seen[0][1] == Meta(Hook.PREROUTING, "lan0", None)


class FastEngine(StandInEngine):
    """An engine whose fast path takes the packets of one payload; process() tries it first,
    full_process() is the rest (what the adapter calls after trying the fast path itself)."""

    def __init__(self, verdict: Verdict, fast_for: bytes) -> None:
        super().__init__(verdict)
        self.fast_for = fast_for
        self.fast_seen: list[tuple[bytes, float]] = []
        self.process_calls = 0

    def fast_path(self, data: bytes, now: float) -> bool:
        self.fast_seen.append((data, now))
        return data == self.fast_for

    def process(self, data: bytes, meta: Meta, now: float) -> Verdict:
        self.process_calls += 1
        return ESTABLISHED if self.fast_path(data, now) else self.full_process(data, meta, now)

    def full_process(self, data: bytes, meta: Meta, now: float) -> Verdict:
        return super().process(data, meta, now)


ESTABLISHED = Verdict(Action.ACCEPT, Ct.ESTABLISHED, None, "established")


def test_fast_path_packet_is_accepted_without_meta_or_verdict() -> None:
    engine, links = FastEngine(DROP, fast_for=UDP_PACKET), FakeLinks({3: "lan0", 4: "wan0"})
    adapter = QueueAdapter(engine, links, FakeSender(), mark=MARK, clock=Clock())
    adapter.set_deadline(1e9)
    fast, slow = FakePacket(UDP_PACKET, mark=0x5), FakePacket(SYN)
    adapter.on_packet(fast)
    adapter.on_packet(slow)
    assert (fast.verdict, fast.new_mark) == ("repeat", 0x10000005)
    assert slow.verdict == "drop"  # not taken by the fast path: the engine's verdict
    assert engine.fast_seen == [(UDP_PACKET, 100.0), (SYN, 100.0)]
    assert engine.seen == [(SYN, Meta(Hook.FORWARD, "lan0", "wan0"), 100.0)]  # by full_process
    assert engine.process_calls == 0  # the fast path was tried once, not again inside process()
    assert links.lookups == [3, 4]  # the Meta only for the packet that needed it


def test_with_metrics_every_packet_goes_through_the_wrapped_process() -> None:
    engine = FastEngine(ACCEPT, fast_for=UDP_PACKET)
    wrapped: list[bytes] = []

    def wrap(process: Callable[[bytes, Meta, float], Verdict]) -> Callable[[bytes, Meta, float], Verdict]:
        def timed(data: bytes, meta: Meta, now: float) -> Verdict:
            wrapped.append(data)
            return process(data, meta, now)

        return timed

    adapter = QueueAdapter(
        engine, FakeLinks({3: "lan0", 4: "wan0"}), FakeSender(), mark=MARK, clock=Clock(), wrap_process=wrap
    )
    adapter.set_deadline(1e9)
    pkt = FakePacket(UDP_PACKET)
    adapter.on_packet(pkt)
    assert (pkt.verdict, wrapped, engine.process_calls) == ("repeat", [UDP_PACKET], 1)
    assert engine.fast_seen == [(UDP_PACKET, 100.0)]  # inside the timed engine.process


def test_housekeeping_runs_from_the_callback_once_due() -> None:
    adapter, _, _, _, clock = _adapter(ACCEPT)
    calls: list[float] = []

    def housekeeping(now: float) -> float:
        calls.append(now)
        return now + 1.0

    adapter.housekeeping = housekeeping
    adapter.set_deadline(100.5)
    adapter.on_packet(FakePacket(SYN))
    clock.now = 100.5
    adapter.on_packet(FakePacket(SYN))
    clock.now = 101.0
    adapter.on_packet(FakePacket(SYN))
    adapter.wake()
    adapter.on_packet(FakePacket(SYN))
    assert calls == [100.5, 101.0]
    assert adapter.deadline == 102.0


def test_parse_queue_stats() -> None:
    text = (
        "    0   4920     3 2  4016     7     9       42  1\n"
        "    5  12345     0 2  4016     0     0        0  1\n"
    )
    assert parse_queue_stats(text) == {
        0: QueueStat(0, 4920, 3, 2, 4016, 7, 9, 42),
        5: QueueStat(5, 12345, 0, 2, 4016, 0, 0, 0),
    }


def test_drop_watch_warns_on_growth_only(caplog: pytest.LogCaptureFixture) -> None:
    readings = iter(
        [
            {0: QueueStat(0, 1, 0, 2, 4016, 5, 1, 10)},  # baseline at start: not reported
            {0: QueueStat(0, 1, 0, 2, 4016, 5, 1, 20)},
            {0: QueueStat(0, 1, 0, 2, 4016, 12, 4, 30), 1: QueueStat(1, 1, 0, 2, 4016, 99, 0, 0)},
            None,  # module unloaded
        ]
    )
    watch = DropWatch(range(0, 1), read=lambda: next(readings))
    assert watch.check() == []
    with caplog.at_level(logging.WARNING):
        assert watch.check() == [
            "queue 0: kernel dropped 7 packets (queue full, max-len) and 3 (socket buffer full, sock-len): "
            "nfqfw falls behind the traffic"
        ]
    assert "kernel dropped 7 packets" in caplog.text
    assert watch.check() == []


# --- GSO packets: cut by the copy range ---------------------------------------------------------


def test_reset_for_a_gso_segment_covers_the_whole_segment() -> None:
    adapter, _, _, sender, _ = _adapter(RESET)
    whole = bytes(IP(src="192.0.2.10", dst="198.51.100.20") / TCP(sport=40000, dport=81, flags="P", seq=7))
    whole += bytes(60000)
    whole = whole[:2] + len(whole).to_bytes(2, "big") + whole[4:]
    adapter.on_packet(FakePacket(whole[:COPY_RANGE]))  # what the kernel copies of it
    [(reply, _)] = sender.sent
    assert (IP(reply)[TCP].ack, str(IP(reply)[TCP].flags)) == (7 + 60000, "RA")


def test_counters_show_the_engines_packets_longer_than_the_copy_range() -> None:
    adapter, engine, _, _, _ = _adapter(ACCEPT)
    assert adapter.counters["packets longer than copy range"] == 0  # an engine without the count
    engine.truncated_packets = 12  # type: ignore[attr-defined]
    assert adapter.counters["packets longer than copy range"] == 12
    adapter.counters["reject sent"] = 99  # a copy: the adapter's own counts are not changed
    assert adapter.counters["reject sent"] == 0


def test_gso_refused_by_the_kernel_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    asked: list[tuple[int, int, int]] = []

    def refuse(handle: object, number: int, flags: int, mask: int) -> None:
        asked.append((number, flags, mask))
        raise QueueFlagsError(f"queue {number}: the kernel refused the flags (Operation not supported)", 95)

    monkeypatch.setattr(queue, "set_queue_flags", refuse)
    with caplog.at_level(logging.WARNING):
        assert queue._ask_for_gso(object(), 3) is False  # type: ignore[arg-type]
    assert asked == [(3, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO)]
    assert caplog.messages == [
        "queue 3: the kernel refused the flags (Operation not supported): GSO packets stay off, "
        "the kernel segments them before queueing (slower)"
    ]
    monkeypatch.setattr(queue, "set_queue_flags", lambda *args: None)
    assert queue._ask_for_gso(object(), 3) is True  # type: ignore[arg-type]


def test_run_no_gso_reaches_the_daemon_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from nfqfw.cli import build_parser
    from nfqfw.observe import logsetup
    from nfqfw.service import daemon

    seen: list[bool] = []
    monkeypatch.setattr(logsetup, "setup_logging", lambda level: None)  # run imports them when it runs
    monkeypatch.setattr(daemon, "run_daemon", lambda options: seen.append(options.gso) or 0)
    for argv in (["run", "-c", "p.yaml"], ["run", "-c", "p.yaml", "--no-gso"]):
        args = build_parser().parse_args(argv)
        assert args.func(args) == 0
    assert seen == [True, False]


def test_accept_verdicts_carry_the_connection_fields_they_are_given() -> None:
    """nfqfw.firewall.marks: the rule field for a new flow's accept, the offload bit for a
    verdict that hands the flow over; a drop gets no mark."""
    rule = Verdict(Action.ACCEPT, Ct.NEW, "mail", "rule mail")
    adapter, engine, _, _, _ = _adapter(rule)
    adapter.set_verdict_marks({"rule mail": 0x30000, "default egress": 0x20000}, 0x20000000)
    pkt = FakePacket(SYN, mark=0x5)
    adapter.on_packet(pkt)
    assert (pkt.verdict, pkt.new_mark) == ("repeat", 0x10030005)
    engine.verdict = Verdict(Action.ACCEPT, Ct.ESTABLISHED, None, "established", offload=True)
    adapter.on_packet(pkt := FakePacket(SYN))
    assert pkt.new_mark == 0x30000000
    engine.verdict = Verdict(Action.ACCEPT, Ct.ESTABLISHED, None, "established")
    adapter.on_packet(pkt := FakePacket(SYN))
    assert pkt.new_mark == 0x10000000
    adapter.set_verdict_marks({}, 0)  # offload switched off by a reload
    engine.verdict = rule
    adapter.on_packet(pkt := FakePacket(SYN))
    assert pkt.new_mark == 0x10000000


def test_a_packet_a_forward_translated_gets_a_meta_that_says_so() -> None:
    engine, links = StandInEngine(ACCEPT), FakeLinks({3: "wan0", 4: "lan0"})
    adapter = QueueAdapter(engine, links, FakeSender(), mark=MARK, forwarded_mark=0x08000000, clock=Clock())
    adapter.set_deadline(1e9)
    translated, plain = FakePacket(SYN, mark=0x08000001), FakePacket(SYN, mark=0x1)
    adapter.on_packet(translated)
    adapter.on_packet(plain)
    adapter.on_packet(FakePacket(SYN, mark=0x08000000))
    assert [meta for _, meta, _ in engine.seen] == [
        Meta(Hook.FORWARD, "wan0", "lan0", forwarded=True),
        Meta(Hook.FORWARD, "wan0", "lan0"),
        Meta(Hook.FORWARD, "wan0", "lan0", forwarded=True),
    ]
    assert engine.seen[0][1] is engine.seen[2][1]  # interned per key, as the others
    assert (translated.verdict, translated.new_mark) == ("repeat", 0x18000001)  # other bits kept
