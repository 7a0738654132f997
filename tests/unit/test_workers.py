"""nfqfw.workers.Supervisor's housekeeping, driven with a fake clock and a stand-in worker process
(a `sleep`): no kernel, no queue."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfqfw import rules
from nfqfw.daemon import Options
from nfqfw.sdnotify import Notifier
from nfqfw.workers import PING_TIMEOUT, Supervisor, Worker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def stand_in() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def live_supervisor(tmp_path: Path, clock: Clock, pid: int) -> tuple[Supervisor, Worker]:
    """A supervisor past its start, with one ready worker (process `pid`) on queue 0."""
    options = Options(config=str(tmp_path / "policy.yaml"), runtime_dir=str(tmp_path / "run"))
    supervisor = Supervisor(options, notifier=Notifier(""), clock=clock)
    supervisor._prepare_directory()
    supervisor.spec = rules.QueueSpec(0, 0)
    worker = supervisor._new_worker(0)
    worker.pid, worker.ready, worker.last_ping = pid, True, clock()
    supervisor.workers[0] = worker
    supervisor.live = True
    return supervisor, worker


def test_heartbeats_sent_while_the_supervisor_was_busy_keep_a_worker_alive(
    tmp_path: Path, stand_in: subprocess.Popen[bytes]
) -> None:
    """A control request fanned out to slow workers blocks the loop (up to 5 s per worker): the
    heartbeats that came meanwhile wait in the notify socket. They must count before the
    wedged check, or every healthy worker is killed after a long enough request."""
    clock = Clock()
    supervisor, worker = live_supervisor(tmp_path, clock, stand_in.pid)
    try:
        clock.now = PING_TIMEOUT + 5.0  # the loop was blocked this long
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"WATCHDOG=1", worker.notify_path)  # sent while it was blocked
        assert supervisor._housekeeping(clock()) is None
        with pytest.raises(subprocess.TimeoutExpired):  # not killed: it kept sending heartbeats
            stand_in.wait(timeout=0.5)
    finally:
        supervisor.close()
