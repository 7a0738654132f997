"""nfqfw.observe.metrics: the --metrics address, the sampled latency histogram, the collector's exact
output from a fake daemon and from a real engine, and the HTTP endpoint on loopback."""

from __future__ import annotations

import json
import math
import socket
import urllib.request
from collections import Counter
from collections.abc import Iterator
from textwrap import dedent
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector
from queue_fakes import FakeLinks, FakePacket, FakeSender, StandInEngine
from scapy.layers.inet import IP, TCP, UDP

from nfqfw.core.config import parse_policy
from nfqfw.core.engine import Engine
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.verdict import Action, Ct, Hook, Meta, Verdict
from nfqfw.firewall.iptables import QueueSpec
from nfqfw.kernel.queue import QueueAdapter
from nfqfw.kernel.queue_info import QueueStat
from nfqfw.observe.endpoint import MetricsError, is_loopback, parse_address
from nfqfw.observe.metrics import (
    EngineTimer,
    MergedCollector,
    NfqfwCollector,
    WorkerCounts,
    merge_records,
    records,
    serve,
    verdict_labels,
)
from nfqfw.observe.packetlog import PacketLog

# --- the address ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9469", ("127.0.0.1", 9469)),
        ("127.0.0.1:9469", ("127.0.0.1", 9469)),
        ("127.0.0.53:1", ("127.0.0.53", 1)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:9469", ("::1", 9469)),
        ("[0:0::1]:9469", ("::1", 9469)),
        ("0.0.0.0:9469", ("0.0.0.0", 9469)),
        ("[2001:DB8::1]:80", ("2001:db8::1", 80)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "'' is not a port number (1-65535)"),
        ("0", "'0' is not a port number (1-65535)"),
        ("127.0.0.1:65536", "'65536' is not a port number (1-65535)"),
        ("127.0.0.1:http", "'http' is not a port number (1-65535)"),
        ("gateway.example:9469", "'gateway.example' is not an IPv4 address or localhost"),
        ("::1:9469", "write an IPv6 address in brackets, as [::1]:9469"),
        ("[::1]", "expected [IPV6]:PORT, got '[::1]'"),
        ("[127.0.0.1]:80", "'127.0.0.1' is not an IPv6 address"),
        ("[::1]:x", "'x' is not a port number (1-65535)"),
    ],
)
def test_parse_address_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_address(text)
    assert str(err.value) == message


def test_loopback_addresses() -> None:
    assert [is_loopback(host) for host in ("127.0.0.1", "127.9.9.9", "::1", "localhost")] == [True] * 4
    assert [is_loopback(host) for host in ("0.0.0.0", "::", "10.0.0.1", "::ffff:127.0.0.1")] == [False] * 4


def test_serve_refuses_a_non_loopback_address_unless_allowed() -> None:
    with pytest.raises(MetricsError) as err:
        serve(fake_daemon(), "0.0.0.0", 9469)
    assert str(err.value) == (
        "--metrics 0.0.0.0:9469: not a loopback address; the metrics name the policy's rules and show its "
        "traffic: add --metrics-allow-remote to serve them beyond this host"
    )
    with pytest.raises(MetricsError) as err:
        serve(fake_daemon(), "2001:db8::1", 9469)
    assert str(err.value).startswith("--metrics [2001:db8::1]:9469: not a loopback address;")


def test_serve_reports_an_address_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError) as err:
            serve(fake_daemon(), "127.0.0.1", port)
    assert str(err.value) == f"cannot serve metrics on 127.0.0.1:{port}: Address already in use"


# --- the latency sample -----------------------------------------------------------------------


class StepClock:
    """perf_counter_ns stand-in: each call returns the next of `times`."""

    def __init__(self, times: list[int]) -> None:
        self.times = iter(times)

    def __call__(self) -> int:
        return next(self.times)


def test_timer_times_one_call_in_every_and_fills_buckets_exactly() -> None:
    # start/end pairs of the 3 timed calls: 1000 ns (bucket le=1e-06), 1001 ns (le=2e-06), 20 ms (+Inf)
    clock = StepClock([0, 1_000, 5_000, 6_001, 10_000, 20_010_000])
    timer = EngineTimer(every=4, clock_ns=clock)
    calls: list[float] = []

    def process(data: bytes, meta: object, now: float) -> str:
        calls.append(now)
        return f"verdict {now:g}"

    timed = timer.wrap(process)
    results = [timed(b"", None, float(n)) for n in range(14)]
    assert results == [f"verdict {n}" for n in range(14)] and calls == [float(n) for n in range(14)]
    buckets, total = timer.histogram()
    assert buckets == [
        ("1e-06", 1),
        ("2e-06", 2),
        *(
            (le, 2)
            for le in ("5e-06", "1e-05", "2e-05", "5e-05", "0.0001", "0.0002", "0.0005", "0.001", "0.01")
        ),
        ("+Inf", 3),
    ]
    assert total == pytest.approx(0.020002001)


def test_adapter_uses_the_wrapped_process() -> None:
    timer = EngineTimer(every=3, clock_ns=StepClock([0, 7_000] * 3))
    verdict = Verdict(Action.ACCEPT, Ct.NEW, None, "default egress")
    adapter = QueueAdapter(
        StandInEngine(verdict),
        FakeLinks({}),
        FakeSender(),
        mark=1,
        clock=lambda: 1.0,
        wrap_process=timer.wrap,
    )
    adapter.set_deadline(1e9)
    for _ in range(10):
        adapter.on_packet(FakePacket(b"", indev=0, outdev=0))
    assert timer.counts == [0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0]  # 7 us, 10 packets // 3


# --- the collector ----------------------------------------------------------------------------


class FakeConntrack(list[SimpleNamespace]):
    max_flows = 100
    early_drops = 2

    def census(self, now: float) -> Counter[tuple[int, str]]:
        assert now == -math.inf  # the metric counts every flow in the table
        return Counter((flow.proto, flow.state_name) for flow in self)


def fake_daemon() -> SimpleNamespace:
    flows = [
        SimpleNamespace(proto=6, state_name="ESTABLISHED"),
        SimpleNamespace(proto=6, state_name="ESTABLISHED"),
        SimpleNamespace(proto=6, state_name="SYN_SENT"),
        SimpleNamespace(proto=17, state_name="UNREPLIED"),
        SimpleNamespace(proto=58, state_name="REPLIED"),
        SimpleNamespace(proto=47, state_name="ASSURED"),
        SimpleNamespace(proto=250, state_name="UNREPLIED"),
    ]
    counters = {
        "accept established": 70,
        "accept related": 1,
        "drop default ingress": 3,
        "accept rule mail": 2,
        "reject rule no-smb-out": 4,
        "drop invalid: ipv4: truncated header (1 bytes)": 1,
        "drop invalid: ipv4: truncated header (3 bytes)": 1,
        "drop internal error: KeyError(1)": 1,
    }
    adapter = {
        "reject sent": 3,
        "reject not answered": 0,
        "reject rate-limited": 1,
        "reject send error": 0,
        "verdict error": 0,
        "packets longer than copy range": 42,
    }
    packet_log = PacketLog()
    packet_log.lines, packet_log.suppressed = 10, 123
    kernel = {"drop default ingress": 500, "drop new-rate per source": 70, "reject rule no-ident": 2}
    return SimpleNamespace(
        engine=SimpleNamespace(counters=counters, conntrack=FakeConntrack(flows)),
        adapter=SimpleNamespace(counters=adapter, early_drops=9),
        packet_log=packet_log,
        spec=QueueSpec(0, 1),
        kernel_drops=lambda: kernel,
    )


QUEUE_STATS = {
    0: QueueStat(0, 4242, 5, 2, 65535, 17, 3, 1000),
    1: QueueStat(1, 4243, 0, 2, 65535, 0, 0, 500),
    7: QueueStat(7, 999, 1, 2, 65535, 8, 8, 8),  # someone else's queue
}


def exposition(collector: Collector) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


def samples(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#")]


def test_collector_output_from_a_fake_daemon() -> None:
    timer = EngineTimer(every=64)
    timer.counts[2], timer.counts[11], timer.sum_ns = 5, 1, 40_000_000
    text = exposition(NfqfwCollector(fake_daemon(), timer, read_stats=lambda: QUEUE_STATS))
    assert (
        samples(text)
        == dedent("""\
        nfqfw_verdicts_total{action="accept",reason="established",rule=""} 70.0
        nfqfw_verdicts_total{action="accept",reason="related",rule=""} 1.0
        nfqfw_verdicts_total{action="accept",reason="rule",rule="mail"} 2.0
        nfqfw_verdicts_total{action="drop",reason="default ingress",rule=""} 3.0
        nfqfw_verdicts_total{action="drop",reason="internal error",rule=""} 1.0
        nfqfw_verdicts_total{action="drop",reason="invalid: ipv4: truncated header (N bytes)",rule=""} 2.0
        nfqfw_verdicts_total{action="drop",reason="queue delay",rule=""} 9.0
        nfqfw_verdicts_total{action="reject",reason="rule",rule="no-smb-out"} 4.0
        nfqfw_flows{proto="tcp",state="established"} 2.0
        nfqfw_flows{proto="tcp",state="syn_sent"} 1.0
        nfqfw_flows{proto="udp",state="unreplied"} 1.0
        nfqfw_flows{proto="gre",state="assured"} 1.0
        nfqfw_flows{proto="icmpv6",state="replied"} 1.0
        nfqfw_flows{proto="250",state="unreplied"} 1.0
        nfqfw_flows_max 100.0
        nfqfw_flow_table_usage_ratio 0.07
        nfqfw_conntrack_early_drops_total 2.0
        nfqfw_queue_kernel_drops_total{cause="queue_full",queue="0"} 17.0
        nfqfw_queue_kernel_drops_total{cause="socket_full",queue="0"} 3.0
        nfqfw_queue_kernel_drops_total{cause="queue_full",queue="1"} 0.0
        nfqfw_queue_kernel_drops_total{cause="socket_full",queue="1"} 0.0
        nfqfw_queue_waiting{queue="0"} 5.0
        nfqfw_queue_waiting{queue="1"} 0.0
        nfqfw_kernel_drops_total{action="drop",reason="default ingress",rule=""} 500.0
        nfqfw_kernel_drops_total{action="drop",reason="new-rate per source",rule=""} 70.0
        nfqfw_kernel_drops_total{action="reject",reason="rule",rule="no-ident"} 2.0
        nfqfw_rejects_sent_total 3.0
        nfqfw_rejects_unsent_total{cause="not_answered"} 0.0
        nfqfw_rejects_unsent_total{cause="rate_limited"} 1.0
        nfqfw_rejects_unsent_total{cause="send_error"} 0.0
        nfqfw_verdict_errors_total 0.0
        nfqfw_packets_longer_than_copy_range_total 42.0
        nfqfw_packet_log_lines_total 10.0
        nfqfw_packet_log_suppressed_total 123.0
        nfqfw_engine_latency_seconds_bucket{le="1e-06"} 0.0
        nfqfw_engine_latency_seconds_bucket{le="2e-06"} 0.0
        nfqfw_engine_latency_seconds_bucket{le="5e-06"} 5.0
        nfqfw_engine_latency_seconds_bucket{le="1e-05"} 5.0
        nfqfw_engine_latency_seconds_bucket{le="2e-05"} 5.0
        nfqfw_engine_latency_seconds_bucket{le="5e-05"} 5.0
        nfqfw_engine_latency_seconds_bucket{le="0.0001"} 5.0
        nfqfw_engine_latency_seconds_bucket{le="0.0002"} 5.0
        nfqfw_engine_latency_seconds_bucket{le="0.0005"} 5.0
        nfqfw_engine_latency_seconds_bucket{le="0.001"} 5.0
        nfqfw_engine_latency_seconds_bucket{le="0.01"} 5.0
        nfqfw_engine_latency_seconds_bucket{le="+Inf"} 6.0
        nfqfw_engine_latency_seconds_count 6.0
        nfqfw_engine_latency_seconds_sum 0.04""").splitlines()
    )
    assert (
        "# HELP nfqfw_engine_latency_seconds Time Engine.process took per packet, measured on 1 packet in 64"
        in (text.splitlines())
    )
    assert "# TYPE nfqfw_verdicts_total counter" in text.splitlines()
    assert "# TYPE nfqfw_flows gauge" in text.splitlines()


def worker_records(queue: int, timer: EngineTimer) -> list:  # type: ignore[type-arg]
    """A worker's records as its supervisor gets them: through JSON (tuples become lists)."""
    daemon = fake_daemon()
    daemon.spec = QueueSpec(queue, queue)
    daemon.kernel_drops = lambda: None  # a worker: the rules are its supervisor's
    return json.loads(json.dumps(records(NfqfwCollector(daemon, timer, read_stats=lambda: QUEUE_STATS))))


def test_the_supervisor_serves_the_sum_of_its_workers() -> None:
    """nfqfw run --workers --metrics: counters, flows and histogram buckets summed; each queue's
    samples from its own worker; the usage ratio of all tables; which workers answered."""
    first, second = EngineTimer(every=64), EngineTimer(every=64)
    first.counts[2], first.sum_ns = 5, 40_000_000
    second.counts[2], second.counts[11], second.sum_ns = 1, 1, 20_000_000
    answers = [worker_records(0, first), worker_records(1, second)]
    kernel = {"drop default ingress": 500}
    text = exposition(
        MergedCollector(lambda: answers, lambda: [(0, True), (1, True), (2, False)], lambda: kernel)
    )
    lines = samples(text)
    for line in (
        'nfqfw_verdicts_total{action="accept",reason="established",rule=""} 140.0',
        'nfqfw_verdicts_total{action="reject",reason="rule",rule="no-smb-out"} 8.0',
        'nfqfw_flows{proto="tcp",state="established"} 4.0',
        "nfqfw_flows_max 200.0",
        "nfqfw_flow_table_usage_ratio 0.07",  # 14 flows in two tables of 100
        "nfqfw_conntrack_early_drops_total 4.0",
        'nfqfw_queue_kernel_drops_total{cause="queue_full",queue="0"} 17.0',  # worker 0's only
        'nfqfw_queue_kernel_drops_total{cause="queue_full",queue="1"} 0.0',
        'nfqfw_queue_waiting{queue="0"} 5.0',
        "nfqfw_rejects_sent_total 6.0",
        'nfqfw_engine_latency_seconds_bucket{le="5e-06"} 6.0',
        'nfqfw_engine_latency_seconds_bucket{le="+Inf"} 7.0',
        "nfqfw_engine_latency_seconds_count 7.0",
        "nfqfw_engine_latency_seconds_sum 0.06",
        'nfqfw_worker_up{queue="0"} 1.0',
        'nfqfw_kernel_drops_total{action="drop",reason="default ingress",rule=""} 500.0',  # its own
        'nfqfw_verdicts_total{action="drop",reason="queue delay",rule=""} 18.0',
        'nfqfw_worker_up{queue="2"} 0.0',
    ):
        assert line in lines, line
    assert len([line for line in lines if line.startswith("nfqfw_queue_waiting")]) == 2
    assert "# TYPE nfqfw_verdicts_total counter" in text.splitlines()
    assert "# TYPE nfqfw_engine_latency_seconds histogram" in text.splitlines()


def counter(value: float) -> list:  # type: ignore[type-arg]
    """One worker's records: a counter, a histogram's count and a gauge."""
    return [
        ["nfqfw_verdicts", "counter", "v", [["nfqfw_verdicts_total", {"action": "accept"}, value]]],
        [
            "nfqfw_engine_latency_seconds",
            "histogram",
            "l",
            [["nfqfw_engine_latency_seconds_count", {}, value]],
        ],
        ["nfqfw_flows", "gauge", "f", [["nfqfw_flows", {}, value]]],
    ]


def served(counts: WorkerCounts, *answers: tuple[int, int | None, list | None]) -> dict[str, float]:  # type: ignore[type-arg]
    return {
        sample: value
        for _, _, _, samples in merge_records(counts.update(answers))
        for sample, _, value in samples
    }


def test_summed_counters_never_go_down_when_a_worker_is_missing_or_restarts() -> None:
    counts = WorkerCounts()
    assert served(counts, (0, 100, counter(10)), (1, 200, counter(5))) == {
        "nfqfw_verdicts_total": 15,
        "nfqfw_engine_latency_seconds_count": 15,
        "nfqfw_flows": 15,
    }
    # queue 1 does not answer: its last records stand in (the sum stays, worker_up shows 0)
    assert served(counts, (0, 100, counter(12)), (1, 200, None))["nfqfw_verdicts_total"] == 17
    # queue 1 restarted (new pid, counting from 0): its old process's 5 is kept as a base ...
    after = served(counts, (0, 100, counter(12)), (1, 201, counter(1)))
    assert after == {"nfqfw_verdicts_total": 18, "nfqfw_engine_latency_seconds_count": 18, "nfqfw_flows": 13}
    # ... and stays across a second restart, with the second process's last count added
    again = served(counts, (0, 100, counter(12)), (1, 202, counter(2)))
    assert again["nfqfw_verdicts_total"] == 12 + 5 + 1 + 2
    assert again["nfqfw_flows"] == 14  # gauges are the current processes' only


def test_merge_of_no_answers_and_of_one() -> None:
    assert merge_records([]) == []
    alone = worker_records(0, EngineTimer())
    merged = {name: samples for name, _, _, samples in merge_records([alone])}
    assert merged == {name: [tuple(s) for s in samples] for name, _, _, samples in alone}


def test_collector_before_start_and_without_metrics_timer() -> None:
    """No engine, adapter or queue yet (the endpoint starts before the queue is bound)."""
    source = SimpleNamespace(
        engine=None, adapter=None, packet_log=PacketLog(), spec=None, kernel_drops=lambda: None
    )
    assert samples(exposition(NfqfwCollector(source, None, read_stats=lambda: None))) == [
        "nfqfw_rejects_sent_total 0.0",
        'nfqfw_rejects_unsent_total{cause="not_answered"} 0.0',
        'nfqfw_rejects_unsent_total{cause="rate_limited"} 0.0',
        'nfqfw_rejects_unsent_total{cause="send_error"} 0.0',
        "nfqfw_verdict_errors_total 0.0",
        "nfqfw_packets_longer_than_copy_range_total 0.0",
        "nfqfw_packet_log_lines_total 0.0",
        "nfqfw_packet_log_suppressed_total 0.0",
    ]


@pytest.mark.parametrize(
    ("reason", "labels"),
    [
        ("rule web-2", ("rule", "web-2")),
        ("default ingress", ("default ingress", "")),
        (
            "invalid: ipv4: total length 60 > 40 bytes captured",
            ("invalid: ipv4: total length N > N bytes captured", ""),
        ),
        ("invalid: tcp: option 3 length 1 < 2", ("invalid: tcp: option N length N < N", "")),
        ("internal error: ValueError('x 1')", ("internal error", "")),
        ("untracked: icmpv6 neighbour discovery / MLD", ("untracked: icmpv6 neighbour discovery / MLD", "")),
    ],
)
def test_verdict_labels(reason: str, labels: tuple[str, str]) -> None:
    assert verdict_labels(reason) == labels


POLICY = """\
zones: {external: [wan0], internal: [lan0]}
ingress:
  - {name: mail, proto: tcp, to: 10.0.0.25, ports: [25], action: accept}
options: {max-flows: 8}
"""
IN = Meta(Hook.FORWARD, "wan0", "lan0")
OUT = Meta(Hook.FORWARD, "lan0", "wan0")


def test_collector_reads_a_real_engine() -> None:
    engine = Engine(CompiledPolicy(parse_policy(POLICY)))
    syn = IP(src="203.0.113.10", dst="10.0.0.25") / TCP(sport=40000, dport=25, flags="S", seq=1)
    synack = IP(src="10.0.0.25", dst="203.0.113.10") / TCP(sport=25, dport=40000, flags="SA", seq=9, ack=2)
    packets = [
        (syn, IN),
        (synack, OUT),
        (IP(src="10.0.0.5", dst="198.51.100.1") / UDP(sport=5353, dport=53), OUT),
        (IP(src="203.0.113.10", dst="10.0.0.25") / TCP(sport=40001, dport=22, flags="S"), IN),
    ]
    for now, (packet, meta) in enumerate(packets):
        engine.process(bytes(packet), meta, float(now))
    daemon = SimpleNamespace(
        engine=engine, adapter=None, packet_log=PacketLog(), spec=None, kernel_drops=lambda: None
    )
    lines = samples(exposition(NfqfwCollector(daemon, None, read_stats=lambda: None)))
    assert lines[:12] == [
        'nfqfw_verdicts_total{action="accept",reason="default egress",rule=""} 1.0',
        'nfqfw_verdicts_total{action="accept",reason="established",rule=""} 1.0',
        'nfqfw_verdicts_total{action="accept",reason="rule",rule="mail"} 1.0',
        'nfqfw_verdicts_total{action="drop",reason="default ingress",rule=""} 1.0',
        'nfqfw_zone_flows_total{action="accept",from_zone="external",to_zone="internal"} 1.0',
        'nfqfw_zone_flows_total{action="drop",from_zone="external",to_zone="internal"} 1.0',
        'nfqfw_zone_flows_total{action="accept",from_zone="internal",to_zone="external"} 1.0',
        'nfqfw_flows{proto="tcp",state="syn_recv"} 1.0',
        'nfqfw_flows{proto="udp",state="unreplied"} 1.0',
        "nfqfw_flows_max 8.0",
        "nfqfw_flow_table_usage_ratio 0.25",
        "nfqfw_conntrack_early_drops_total 0.0",
    ]


# --- the endpoint -----------------------------------------------------------------------------


@pytest.fixture
def endpoint() -> Iterator[str]:
    server, _ = serve(fake_daemon(), "127.0.0.1", 0)
    try:
        yield server.address
    finally:
        server.close()


def test_endpoint_serves_the_collector_and_the_process_metrics(endpoint: str) -> None:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'nfqfw_verdicts_total{action="reject",reason="rule",rule="no-smb-out"} 4.0' in text
    assert "nfqfw_packet_log_suppressed_total 123.0" in text
    assert "nfqfw_engine_latency_seconds_count 0.0" in text
    assert "process_resident_memory_bytes" in text


def test_run_flags() -> None:
    from nfqfw.cli import build_parser

    args = build_parser().parse_args(["run", "-c", "p.yaml", "--metrics", "9469"])
    assert (args.metrics, args.metrics_allow_remote) == (("127.0.0.1", 9469), False)
    args = build_parser().parse_args(
        ["run", "-c", "p.yaml", "--metrics", "[::]:80", "--metrics-allow-remote"]
    )
    assert (args.metrics, args.metrics_allow_remote) == (("::", 80), True)
    assert build_parser().parse_args(["run", "-c", "p.yaml"]).metrics is None  # off by default


def test_run_flag_error(capsys: pytest.CaptureFixture[str]) -> None:
    from nfqfw.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "-c", "p.yaml", "--metrics", "host:1"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "nfqfw run: error: argument --metrics: 'host' is not an IPv4 address or localhost"
    )


def test_collector_counts_the_offloaded_flows() -> None:
    engine = Engine(
        CompiledPolicy(parse_policy(POLICY.replace("{max-flows: 8}", "{max-flows: 8, offload: established}")))
    )
    syn = IP(src="10.0.0.5", dst="198.51.100.1") / TCP(sport=40000, dport=80, flags="S", seq=1)
    synack = IP(src="198.51.100.1", dst="10.0.0.5") / TCP(sport=80, dport=40000, flags="SA", seq=9, ack=2)
    ack = IP(src="10.0.0.5", dst="198.51.100.1") / TCP(sport=40000, dport=80, flags="A", seq=2, ack=10)
    for now, (packet, meta) in enumerate([(syn, OUT), (synack, IN), (ack, OUT)]):
        engine.process(bytes(packet), meta, float(now))
    daemon = SimpleNamespace(
        engine=engine, adapter=None, packet_log=PacketLog(), spec=None, kernel_drops=lambda: None
    )
    lines = samples(exposition(NfqfwCollector(daemon, None, read_stats=lambda: None)))
    assert 'nfqfw_flows_offloaded{proto="tcp",state="established"} 1.0' in lines
    assert not any(line.startswith("nfqfw_flows{") for line in lines)  # no longer in nfqfw's table


def test_ha_role_gauge_once_told() -> None:
    from nfqfw.service.ha import HaState

    ha = HaState()
    source = SimpleNamespace(
        engine=None, adapter=None, packet_log=PacketLog(), spec=None, kernel_drops=lambda: None, ha=ha
    )
    collector = NfqfwCollector(source, None, read_stats=lambda: None)
    assert not [s for s in samples(exposition(collector)) if s.startswith("nfqfw_ha")]
    ha.role = "backup"
    assert [s for s in samples(exposition(collector)) if s.startswith("nfqfw_ha")] == [
        'nfqfw_ha_role{role="backup"} 1.0'
    ]
    merged = MergedCollector(lambda: [], lambda: [], ha=SimpleNamespace(role="master"))
    assert 'nfqfw_ha_role{role="master"} 1.0' in samples(exposition(merged))
