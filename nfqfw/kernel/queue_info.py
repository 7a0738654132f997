"""The NFQUEUE queue's numbers and the kernel's counters for it, without the C binding.

Everything here is what `nfqfw run --help`, `nfqfw status` and the metrics need to know about
the queue without binding one: the copy range and default sizes, the adapter's counter names,
and /proc/net/netfilter/nfnetlink_queue (read with plain file I/O, so light commands never
import NetfilterQueue).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nfqfw.core.verdict import Meta, Verdict

log = logging.getLogger("nfqfw.kernel.queue")

PROC_QUEUE = "/proc/net/netfilter/nfnetlink_queue"
# Bytes of each packet the kernel copies to us. NetfilterQueue receives into a 4096-byte buffer,
# and the packet follows up to ~150 bytes of netlink attributes (headers, interfaces, mark,
# priority, hardware address, timestamp, classid, cap_len, skb info): a longer message is cut by
# recv and never parsed, so its packet never gets a verdict. (NetfilterQueue's own cap, 4016,
# leaves 80 bytes: a GSO or jumbo packet's message is 84 here.) 256 bytes of room; every packet
# up to 3840 bytes comes whole, a longer one (GSO) as its first 3840 bytes.
COPY_RANGE = 3840
DEFAULT_MAX_LEN = 8192  # packets the kernel may hold for us before it drops (queue_dropped)
DEFAULT_SOCK_LEN = 16 * 1024 * 1024  # netlink receive buffer (the kernel doubles it)
DEFAULT_REJECT_RATE = 1000.0  # answers per second, burst as much
DEFAULT_REJECT_WITH = "icmp-port-unreachable"  # what iptables' REJECT sends when not told


# The verdict counters' key of packets dropped early, before the engine (a fat flow of a queue
# that is behind: nfqfw.kernel.fairness); counted by the adapter, shown with the verdicts.
EARLY_DROP = "drop queue delay"

ADAPTER_COUNTERS = (
    "reject sent",
    "reject not answered",  # build_reject said no answer may be sent (ICMP error, broadcast...)
    "reject rate-limited",
    "reject send error",
    "verdict error",
)
LONGER_THAN_COPY_RANGE = "packets longer than copy range"  # GSO packets mostly (the engine counts)

ProcessFn = Callable[[bytes, Meta, float], Verdict]


def verdict_counts(engine: Any, adapter: Any) -> dict[str, int]:
    """The engine's verdict counters with the adapter's early drops (EARLY_DROP): verdicts
    given before the engine was asked. A copy (status, metrics, the log at stop)."""
    counts = dict(engine.counters)
    early = getattr(adapter, "early_drops", 0)
    if early:
        counts[EARLY_DROP] = counts.get(EARLY_DROP, 0) + early
    return counts


# --- /proc/net/netfilter/nfnetlink_queue ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueStat:
    queue: int
    portid: int  # netlink port id of the process bound to it
    total: int  # packets waiting for a verdict now
    copy_mode: int
    copy_range: int
    queue_dropped: int  # dropped because `total` reached max_len: we fell behind
    user_dropped: int  # dropped because the netlink socket buffer was full: we fell behind
    id_sequence: int


def parse_queue_stats(text: str) -> dict[int, QueueStat]:
    stats = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 8 and all(field.isdigit() for field in fields[:8]):
            stat = QueueStat(*(int(field) for field in fields[:8]))
            stats[stat.queue] = stat
    return stats


def read_queue_stats(path: str = PROC_QUEUE) -> dict[int, QueueStat] | None:
    """Current stats per bound queue; None when the nfnetlink_queue module is not loaded."""
    try:
        with open(path) as proc:
            return parse_queue_stats(proc.read())
    except FileNotFoundError:
        return None


class DropWatch:
    """Warns when the kernel drops packets for our queues because we fell behind."""

    def __init__(self, queues: range, read: Callable[[], dict[int, QueueStat] | None] = read_queue_stats):
        self._queues = queues
        self._read = read
        self._last: dict[int, tuple[int, int]] = {}
        self.check()  # baseline: drops before we started are not ours to report

    def check(self) -> list[str]:
        stats = self._read() or {}
        warnings_ = []
        for queue in self._queues:
            stat = stats.get(queue)
            if stat is None:
                continue
            before = self._last.get(queue)
            now = (stat.queue_dropped, stat.user_dropped)
            self._last[queue] = now
            if before is None or now == before:
                continue
            message = (
                f"queue {queue}: kernel dropped {now[0] - before[0]} packets (queue full, max-len) and "
                f"{now[1] - before[1]} (socket buffer full, sock-len): nfqfw falls behind the traffic"
            )
            log.warning("%s", message)
            warnings_.append(message)
        return warnings_
