"""The optional Prometheus endpoint (`nfqfw run --metrics [ADDR:]PORT`), off by default.

The exporter is prometheus_client's HTTP server in a thread of its own, with a registry holding
one custom collector (and the process/platform collectors). Nothing is updated per packet for
it: at scrape time the collector copies what the daemon counts anyway (engine verdict counters,
adapter counters, the flow table, /proc queue statistics, packet-log counters). The copies are
taken in the exporter thread while the packet thread runs: `dict(...)` and `list(...)` of a dict
are single C calls under the GIL; a copy that still meets a concurrent resize is retried.

The one per-packet addition is the engine latency histogram, and only when metrics are on:
`EngineTimer.wrap` wraps `engine.process` once (see nfqfw.kernel.queue) and times one call in
`every` (64) with perf_counter_ns, adding it to plain bucket counts; the other calls cost a
countdown. So `nfqfw_engine_latency_seconds_count` counts the sampled packets, not all.

Address: loopback only (127.0.0.0/8, ::1, localhost) unless `--metrics-allow-remote`: the
page names the policy's rules and shows traffic volumes. A remote scraper also needs an
ingress rule letting it reach the gateway's port: the endpoint is filtered like any service.

Metrics (all prefixed nfqfw_):
  verdicts_total{action,reason,rule}     packets by verdict; reason "rule" with the rule's name
                                         in `rule`, else the verdict reason ("established",
                                         "default ingress", "invalid: ...", numbers as N) and
                                         rule=""; reason "queue delay": dropped early, before
                                         the engine, from a fat flow of a queue that was behind
                                         (nfqfw.kernel.fairness)
  flows{proto,state}                     flows in the table by protocol and state
  flows_max, flow_table_usage_ratio      the table bound (max-flows) and flows / max-flows
  flows_offloaded{proto,state}           flows handed over to the kernel (offload: established;
                                         the kernel's state at nfqfw's last look)
  conntrack_early_drops_total            flows evicted because the table was full
  queue_kernel_drops_total{queue,cause}  packets the kernel dropped because nfqfw fell behind
                                         (cause queue_full: max-len; socket_full: sock-len)
  queue_waiting{queue}                   packets waiting in the kernel for a verdict
  kernel_drops_total{action,reason,rule} packets nfqfw's kernel rules dropped or rejected before
                                         the queues (pre-filter, caps on first packets, TCP
                                         flags; `nfqfw rules counters`), read at scrape time
                                         from the kernel, labelled as the verdicts
  rejects_sent_total                     TCP resets / ICMP unreachables sent
  rejects_unsent_total{cause}            rejects not answered (not_answered, rate_limited,
                                         send_error)
  verdict_errors_total                   packets that hit an error in the adapter
  packets_longer_than_copy_range_total   packets of which only the first 3840 bytes were copied
                                         (GSO packets, see nfqfw.kernel.queue)
  packet_log_lines_total, packet_log_suppressed_total   packet log lines written / held back
  engine_latency_seconds                 histogram of Engine.process time, 1 packet in 64
  ha_role{role}                          1, labelled with the HA role keepalived's notify script
                                         told (`nfqfw ha role`); absent until told
  worker_up{queue}                       with --workers only: 1 when the queue's worker
                                         answered the scrape (the others are the workers'
                                         sums, see MergedCollector and WorkerCounts)
"""

from __future__ import annotations

import math
import re
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from nfqfw.core.config import PROTOCOL_NAMES
from nfqfw.kernel.queue_info import (
    LONGER_THAN_COPY_RANGE,
    ProcessFn,
    QueueStat,
    read_queue_stats,
    verdict_counts,
)
from nfqfw.observe.endpoint import MetricsError, check_address, show_address
from nfqfw.observe.packetlog import PacketLog

SAMPLE_EVERY = 64  # the latency histogram times one engine call in this many
# Bucket upper bounds in nanoseconds: 1 us .. 10 ms (the engine takes ~5 us per packet).
LATENCY_BOUNDS_NS = (
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    10_000_000,
)
COPY_TRIES = 5
ADAPTER_UNSENT = {
    "reject not answered": "not_answered",
    "reject rate-limited": "rate_limited",
    "reject send error": "send_error",
}

_NUMBER = re.compile(r"\b[0-9]+\b")  # "ipv4" keeps its 4

T = TypeVar("T")


# --- the latency sample -----------------------------------------------------------------------


class EngineTimer:
    """Times one engine call in `every` into plain bucket counts (read by the collector)."""

    def __init__(
        self,
        every: int = SAMPLE_EVERY,
        bounds_ns: tuple[int, ...] = LATENCY_BOUNDS_NS,
        clock_ns: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        self.every = every
        self.bounds_ns = bounds_ns
        self.clock_ns = clock_ns
        self.counts = [0] * (len(bounds_ns) + 1)  # the last one: above every bound
        self.sum_ns = 0

    def wrap(self, process: ProcessFn) -> ProcessFn:
        every, bounds, counts, clock_ns = self.every, self.bounds_ns, self.counts, self.clock_ns
        left = every

        def timed(data: bytes, meta: Any, now: float) -> Any:
            nonlocal left
            left -= 1
            if left:
                return process(data, meta, now)
            left = every
            start = clock_ns()
            verdict = process(data, meta, now)
            elapsed = clock_ns() - start
            counts[bisect_left(bounds, elapsed)] += 1
            self.sum_ns += elapsed
            return verdict

        return timed

    def histogram(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative (le, count) buckets with +Inf, and the sum in seconds."""
        counts, total_ns = list(self.counts), self.sum_ns
        buckets, running = [], 0
        for bound, count in zip((*self.bounds_ns, None), counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound is None else repr(bound / 1e9), running))
        return buckets, total_ns / 1e9


# --- the collector ----------------------------------------------------------------------------


class Source(Protocol):
    """What the collector reads (the Daemon has these attributes)."""

    engine: Any  # .counters, .conntrack (census(), max_flows, early_drops)
    adapter: Any  # .counters (dict), .early_drops, or None before start
    packet_log: PacketLog
    spec: Any  # .queues (range), or None before start

    def kernel_drops(self) -> dict[str, int] | None:
        """The kernel rules' drops before the queue ("ACTION REASON" -> packets); None: not ours."""
        ...


class NfqfwCollector(Collector):
    def __init__(
        self,
        source: Source,
        timer: EngineTimer | None = None,
        read_stats: Callable[[], dict[int, QueueStat] | None] = read_queue_stats,
    ) -> None:
        self.source = source
        self.timer = timer
        self.read_stats = read_stats

    def describe(self) -> Iterable[Metric]:
        return []  # names are registered at scrape time only (collect() needs a running daemon)

    def collect(self) -> Iterator[Metric]:
        source = self.source
        engine = source.engine
        if engine is not None:
            yield from self._verdicts(engine, source.adapter)
            yield from self._zones(engine)
            yield from self._flows(engine.conntrack)
            offloaded = getattr(engine, "offloaded", None)
            if offloaded is not None:
                yield from self._offloaded(offloaded)
        yield from self._queues()
        yield from kernel_drop_family(source.kernel_drops())
        yield from ha_role_family(getattr(source, "ha", None))
        yield from self._adapter(source.adapter)
        packet_log = source.packet_log
        yield CounterMetricFamily(
            "nfqfw_packet_log_lines", "Packet log lines written", value=packet_log.lines
        )
        yield CounterMetricFamily(
            "nfqfw_packet_log_suppressed",
            "Packet log lines held back by log-limit",
            value=packet_log.suppressed,
        )
        if self.timer is not None:
            buckets, total = self.timer.histogram()
            yield HistogramMetricFamily(
                "nfqfw_engine_latency_seconds",
                f"Time Engine.process took per packet, measured on 1 packet in {self.timer.every}",
                buckets=buckets,
                sum_value=total,
            )

    def _verdicts(self, engine: Any, adapter: Any) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "nfqfw_verdicts", "Packets by verdict", labels=("action", "reason", "rule")
        )
        totals: Counter[tuple[str, str, str]] = Counter()
        for key, value in copied(lambda: verdict_counts(engine, adapter)).items():
            action, _, reason = key.partition(" ")
            totals[(action, *verdict_labels(reason))] += value
        for labels, value in sorted(totals.items()):
            family.add_metric(labels, value)
        yield family

    def _zones(self, engine: Any) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "nfqfw_zone_flows",
            "New flows the policy decided, by zone pair (gateway: the gateway itself, -: no zone) and action",
            labels=("from_zone", "to_zone", "action"),
        )
        counts = copied(lambda: engine.zone_counts()) if hasattr(engine, "zone_counts") else {}
        for key, value in sorted(counts.items()):
            pair, _, action = key.rpartition(" ")
            source, _, target = pair.partition("->")
            family.add_metric((source, target, action), value)
        yield family

    def _flows(self, conntrack: Any) -> Iterator[Metric]:
        by_kind = copied(lambda: conntrack.census(-math.inf))  # every flow in the table, due or not
        in_table = sum(by_kind.values())
        family = GaugeMetricFamily(
            "nfqfw_flows", "Flows in the table by protocol and state", labels=("proto", "state")
        )
        for (proto, state), count in sorted(by_kind.items()):
            family.add_metric((PROTOCOL_NAMES.get(proto, str(proto)), state.lower()), count)
        yield family
        max_flows = conntrack.max_flows
        yield GaugeMetricFamily("nfqfw_flows_max", "Most flows tracked (option max-flows)", value=max_flows)
        yield GaugeMetricFamily(
            "nfqfw_flow_table_usage_ratio",
            "Flows in the table / max-flows",
            value=in_table / max_flows if max_flows else 0.0,
        )
        yield CounterMetricFamily(
            "nfqfw_conntrack_early_drops",
            "Flows evicted because the table was full",
            value=getattr(conntrack, "early_drops", 0),
        )

    def _offloaded(self, offloaded: Any) -> Iterator[Metric]:
        by_kind = copied(lambda: offloaded.census(-math.inf))
        family = GaugeMetricFamily(
            "nfqfw_flows_offloaded",
            "Flows handed over to the kernel's conntrack (offload: established), by protocol and state",
            labels=("proto", "state"),
        )
        for (proto, state), count in sorted(by_kind.items()):
            family.add_metric((PROTOCOL_NAMES.get(proto, str(proto)), state.lower()), count)
        yield family

    def _queues(self) -> Iterator[Metric]:
        spec = self.source.spec
        stats = self.read_stats() or {}
        drops = CounterMetricFamily(
            "nfqfw_queue_kernel_drops",
            "Packets the kernel dropped because nfqfw fell behind (queue_full: max-len, "
            "socket_full: sock-len)",
            labels=("queue", "cause"),
        )
        waiting = GaugeMetricFamily(
            "nfqfw_queue_waiting", "Packets waiting in the kernel for a verdict", labels=("queue",)
        )
        for number in spec.queues if spec is not None else ():
            stat = stats.get(number)
            if stat is None:
                continue
            drops.add_metric((str(number), "queue_full"), stat.queue_dropped)
            drops.add_metric((str(number), "socket_full"), stat.user_dropped)
            waiting.add_metric((str(number),), stat.total)
        yield drops
        yield waiting

    def _adapter(self, adapter: Any) -> Iterator[Metric]:
        counters = {} if adapter is None else copied(lambda: dict(adapter.counters))
        yield CounterMetricFamily(
            "nfqfw_rejects_sent",
            "TCP resets and ICMP unreachables sent",
            value=counters.get("reject sent", 0),
        )
        unsent = CounterMetricFamily(
            "nfqfw_rejects_unsent", "Rejected packets not answered", labels=("cause",)
        )
        for key, cause in ADAPTER_UNSENT.items():
            unsent.add_metric((cause,), counters.get(key, 0))
        yield unsent
        yield CounterMetricFamily(
            "nfqfw_verdict_errors",
            "Packets that hit an error in the adapter (given the failure-mode verdict)",
            value=counters.get("verdict error", 0),
        )
        yield CounterMetricFamily(
            "nfqfw_packets_longer_than_copy_range",
            "Packets longer than the queue's copy range, decided on their headers (GSO packets)",
            value=counters.get(LONGER_THAN_COPY_RANGE, 0),
        )


def kernel_drop_family(counts: dict[str, int] | None) -> Iterator[Metric]:
    """nfqfw_kernel_drops_total{action,reason,rule} from the kernel rules' counters (none when
    the process does not own the rules)."""
    if counts is None:
        return
    family = CounterMetricFamily(
        "nfqfw_kernel_drops",
        "Packets nfqfw's kernel rules dropped or rejected before the queue",
        labels=("action", "reason", "rule"),
    )
    totals: Counter[tuple[str, str, str]] = Counter()
    for key, value in counts.items():
        action, _, reason = key.partition(" ")
        totals[(action, *verdict_labels(reason))] += value
    for labels, value in sorted(totals.items()):
        family.add_metric(labels, value)
    yield family


def verdict_labels(reason: str) -> tuple[str, str]:
    """(reason, rule) labels of a verdict reason. Numbers become N ("invalid: ipv4: total length
    N > N bytes captured") and an internal error's text is dropped, so that crafted packets
    cannot grow the label set without bound; the packet log has the exact reason."""
    if reason.startswith("rule "):
        return "rule", reason[5:]
    if reason.startswith("forward "):
        return "forward", reason[8:]
    if reason.startswith("internal error"):
        return "internal error", ""
    return _NUMBER.sub("N", reason), ""


def copied(copy: Callable[[], T]) -> T:
    """Run a copy of data the packet thread may be changing; retry if it met a resize."""
    for _ in range(COPY_TRIES - 1):
        try:
            return copy()
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return copy()


# --- several workers (nfqfw run --workers) ----------------------------------------------------

# A worker's families as JSON-able records: (name, type, help, [(sample, labels, value), ...]).
Record = tuple[str, str, str, list[tuple[str, dict[str, str], float]]]
USAGE_RATIO = "nfqfw_flow_table_usage_ratio"


def records(collector: Collector) -> list[Record]:
    """What `collector` would serve, as records a worker sends its supervisor (control "metrics")."""
    return [
        (
            family.name,
            family.type,
            family.documentation,
            [(s.name, dict(s.labels), s.value) for s in family.samples],
        )
        for family in collector.collect()
    ]


def merge_records(answers: Iterable[Iterable[Record]]) -> list[Record]:
    """The workers' records as one: every sample summed over the workers by name and labels
    (counters, flow gauges, histogram buckets, which are cumulative, and their sums and counts;
    queue samples carry their queue's label, each from its own worker), and the table usage
    ratio recomputed as all flows / all max-flows (each worker has a table of its own)."""
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for answer in answers:
        for name, kind, text, samples in answer:
            _, _, summed = families.setdefault(name, (kind, text, {}))
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                summed[key] = summed.get(key, 0.0) + value
    if USAGE_RATIO in families:
        flows = sum(families.get("nfqfw_flows", ("", "", {}))[2].values())
        most = sum(families.get("nfqfw_flows_max", ("", "", {}))[2].values())
        families[USAGE_RATIO][2].clear()
        families[USAGE_RATIO][2][(USAGE_RATIO, ())] = flows / most if most else 0.0
    return [
        (name, kind, text, [(sample, dict(labels), value) for (sample, labels), value in summed.items()])
        for name, (kind, text, summed) in families.items()
    ]


MONOTONIC_TYPES = ("counter", "histogram")  # what a Prometheus reader expects never to go down


class WorkerCounts:
    """Keeps the summed counters from going down when a worker is missing or restarts.

    A worker that does not answer a scrape is served with its last records (flat, and
    nfqfw_worker_up says it is stale). A worker that answers under a new pid (restarted: its
    counts begin again from zero) has the counters and histograms of its previous process's
    last records kept as a base, added to the new process's. Counts a process made after its
    last scrape are lost with it: a small undercount, never a false reset of the whole sum."""

    def __init__(self) -> None:
        self.last: dict[int, tuple[int | None, list[Record]]] = {}  # queue -> (pid, records)
        self.base: dict[int, list[Record]] = {}  # queue -> counters of its earlier processes
        # the exporter's thread and a control "metrics" request may update at once: a restart
        # seen by both would be carried into the base twice
        self._lock = threading.Lock()

    def update(self, answers: Iterable[tuple[int, int | None, list[Record] | None]]) -> list[list[Record]]:
        """`answers`: (queue, pid, records or None when it did not answer); the records to sum."""
        with self._lock:
            return self._update(list(answers))

    def _update(self, answers: list[tuple[int, int | None, list[Record] | None]]) -> list[list[Record]]:
        for queue, pid, answered in answers:
            if answered is None:
                continue
            before = self.last.get(queue)
            if before is not None and before[0] != pid:
                carried = [r for r in before[1] if r[1] in MONOTONIC_TYPES]
                self.base[queue] = merge_records([self.base.get(queue, []), carried])
            self.last[queue] = (pid, answered)
        return [*self.base.values(), *(records for _, records in self.last.values())]


def ha_role_family(ha: Any) -> Iterator[Metric]:
    """nfqfw_ha_role{role} 1 for the role told (nfqfw.service.ha.HaState); none until told."""
    role = getattr(ha, "role", None)
    if role is not None:
        family = GaugeMetricFamily(
            "nfqfw_ha_role", "The gateway's HA role as keepalived told it (nfqfw ha role)", labels=("role",)
        )
        family.add_metric((role,), 1.0)
        yield family


class MergedCollector(Collector):
    """The supervisor's collector: `fetch()` asks every worker for its records (a list per
    worker that answered) and the merged families are served; `workers()` gives (queue, up)
    for the nfqfw_worker_up gauge, so a worker whose counts are stale shows; `kernel_drops()`
    the rules' counters (the supervisor's own)."""

    def __init__(
        self,
        fetch: Callable[[], list[list[Record]]],
        workers: Callable[[], list[tuple[int, bool]]],
        kernel_drops: Callable[[], dict[str, int] | None] = lambda: None,
        ha: Any = None,
    ) -> None:
        self.fetch = fetch
        self.workers = workers
        self.kernel_drops = kernel_drops  # the supervisor's: it owns the rules
        self.ha = ha  # the supervisor's HA role (nfqfw.service.ha.HaState)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for name, kind, text, samples in merge_records(self.fetch()):
            family = Metric(name, text, kind)
            for sample, labels, value in samples:
                family.add_sample(sample, labels, value)
            yield family
        yield from kernel_drop_family(self.kernel_drops())
        yield from ha_role_family(self.ha)
        up = GaugeMetricFamily(
            "nfqfw_worker_up",
            "1 when the queue's worker answered this scrape (0: its last counts are served)",
            labels=("queue",),
        )
        for queue, answered in self.workers():
            up.add_metric((str(queue),), 1.0 if answered else 0.0)
        yield up


# --- the server -------------------------------------------------------------------------------


class MetricsServer:
    """The HTTP endpoint serving one registry from its own thread."""

    def __init__(self, collector: Collector, host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as err:
            where = show_address(host, port)
            raise MetricsError(f"cannot serve metrics on {where}: {err.strerror or err}") from err
        self.address = show_address(host, self._server.server_port)

    def close_inherited(self) -> None:
        """In a forked child (a worker): let go of the listening socket, leave the thread alone
        (it did not come along with the fork)."""
        self._server.socket.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


def serve(
    source: Source, host: str, port: int, allow_remote: bool = False
) -> tuple[MetricsServer, EngineTimer]:
    """Start the endpoint; raises MetricsError (non-loopback address without allow_remote, or
    the address cannot be bound)."""
    check_address(host, port, allow_remote)
    timer = EngineTimer()
    return MetricsServer(NfqfwCollector(source, timer), host, port), timer


def serve_merged(
    collector: MergedCollector, host: str, port: int, allow_remote: bool = False
) -> MetricsServer:
    """The supervisor's endpoint (nfqfw run --workers --metrics); MetricsError as serve()."""
    check_address(host, port, allow_remote)
    return MetricsServer(collector, host, port)
