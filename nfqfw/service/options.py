"""`nfqfw run`'s settings as the service takes them (from the command line or a test).

Light on purpose: the argument parser builds Options without importing the kernel adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nfqfw.control.protocol import DEFAULT_RUNTIME_DIR
from nfqfw.firewall import DEFAULT_MARK
from nfqfw.kernel.queue_info import DEFAULT_MAX_LEN, DEFAULT_REJECT_RATE, DEFAULT_SOCK_LEN
from nfqfw.service.statedir import DEFAULT_SNAPSHOT_INTERVAL, DEFAULT_STATE_DIR, SNAPSHOT_NAME

# Without --queue or --queue-balance: flows spread over four queues, served in turn (one flow
# fills only its own; see nfqfw.kernel.fairness), each with its queue for first packets after them.
DEFAULT_QUEUES = (0, 3)
NEW_QUEUE_OFF = "off"


@dataclass
class Options:
    config: str
    queue_first: int = DEFAULT_QUEUES[0]
    queue_last: int = DEFAULT_QUEUES[1]
    mark: int = DEFAULT_MARK
    max_len: int = DEFAULT_MAX_LEN
    sock_len: int = DEFAULT_SOCK_LEN
    reject_rate: float = DEFAULT_REJECT_RATE
    stats_interval: float = 5.0  # seconds between reads of the kernel's queue drop counters
    state_dir: str = DEFAULT_STATE_DIR  # flow snapshots (nfqfw.service.statedir)
    snapshot_interval: float = DEFAULT_SNAPSHOT_INTERVAL  # seconds; 0: only at stop
    runtime_dir: str = DEFAULT_RUNTIME_DIR  # the control socket's directory
    metrics: tuple[str, int] | None = None  # --metrics: (host, port) of the Prometheus endpoint
    metrics_allow_remote: bool = False
    collect_metrics: bool = False  # a worker under --metrics: count for the supervisor's endpoint
    gso: bool = True  # ask the kernel for GSO packets whole (--no-gso: segmented, as before)
    # Set by the supervisor of `nfqfw run --workers` for each worker (nfqfw.service.daemon.WorkerDaemon):
    snapshot_name: str = SNAPSHOT_NAME  # the flow snapshot's file in state_dir
    adopt_snapshots: tuple[str, ...] = ()  # more snapshot files to restore flows from (workers)
    # --new-queue: first packets (conntrack NEW) go to queues of their own, N..N+last-first (one
    # per main queue: a worker binds its pair); None: right after the main queues, last+1..;
    # NEW_QUEUE_OFF: they share the main queues. See nfqfw.service.ruleset.
    new_queue: int | Literal["off"] | None = None

    @property
    def first_packet_queue(self) -> int | None:
        """The first of the queues for first packets; None when they share the main queues."""
        if self.new_queue == NEW_QUEUE_OFF:
            return None
        if self.new_queue is None:
            return self.queue_last + 1
        return int(self.new_queue)
