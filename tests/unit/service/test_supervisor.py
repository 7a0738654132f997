"""nfqfw.service.supervisor.Supervisor's housekeeping, driven with a fake clock and a stand-in worker process
(a `sleep`): no kernel, no queue."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from firewall_fakes import RecordingFirewall

from nfqfw.control.protocol import SOCKET_NAME, RequestError
from nfqfw.control.requests import Requests
from nfqfw.core.build import addr, ipv4, udp
from nfqfw.core.config import load_policy
from nfqfw.core.engine import Engine
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.verdict import Hook, Meta
from nfqfw.firewall import QueueSpec
from nfqfw.service.core import StartupError
from nfqfw.service.daemon import WorkerDaemon
from nfqfw.service.options import Options
from nfqfw.service.sdnotify import Notifier
from nfqfw.service.supervision import Counts
from nfqfw.service.supervisor import PING_TIMEOUT, Supervisor, Worker

POLICY_FILE = Path(__file__).resolve().parents[3] / "config" / "policy.yaml"


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
    supervisor = Supervisor(options, notifier=Notifier(""), firewall=RecordingFirewall(), clock=clock)
    supervisor._prepare_directory()
    supervisor.spec = QueueSpec(0, 0)
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
        supervisor._housekeeping(clock())
        assert supervisor.failure is None
        with pytest.raises(subprocess.TimeoutExpired):  # not killed: it kept sending heartbeats
            stand_in.wait(timeout=0.5)
    finally:
        supervisor.close()


def test_workers_that_do_not_answer_delay_a_fanned_out_request_once_not_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stand_in: subprocess.Popen[bytes]
) -> None:
    """Three workers that accept the request but never answer: `status`, `flows` and the metrics
    scrape must wait ANSWER_TIMEOUT once, not once per worker (5 s each made a scrape with two
    wedged workers outlast Prometheus' 10 s scrape timeout, and blocked the loop for 5 s each)."""
    monkeypatch.setattr("nfqfw.service.supervisor.ANSWER_TIMEOUT", 0.5)
    clock = Clock()
    supervisor, _ = live_supervisor(tmp_path, clock, stand_in.pid)
    silent: list[socket.socket] = []
    try:
        for queue in (0, 1, 2):
            worker = supervisor.workers.get(queue) or supervisor._new_worker(queue)
            worker.pid, worker.ready = stand_in.pid, True
            supervisor.workers[queue] = worker
            os.makedirs(worker.directory)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(os.path.join(worker.directory, SOCKET_NAME))
            listener.listen()  # connects and takes the request, never answers
            silent.append(listener)
        started = time.monotonic()
        answers = supervisor._ask_all({"cmd": "status"})
        elapsed = time.monotonic() - started
        assert [a.queue for a in answers] == [0, 1, 2]
        assert all(a.error is not None and "timed out" in a.error for a in answers)
        assert elapsed < 1.0, f"{elapsed:.2f} s: the workers were asked one after the other"
    finally:
        for listener in silent:
            listener.close()
        supervisor.close()


def test_a_runtime_dir_too_long_for_the_workers_sockets_is_a_start_up_error(tmp_path: Path) -> None:
    """Its control.sock fits a Unix socket path, the workers' sockets below it would not."""
    runtime = tmp_path / ("d" * (90 - len(str(tmp_path)) - 1))
    assert len(str(runtime)) == 90
    options = Options(config="/unused", runtime_dir=str(runtime), queue_first=0, queue_last=1)
    with pytest.raises(StartupError) as caught:
        Supervisor(options, notifier=Notifier(""))._prepare_directory()
    assert str(caught.value) == (
        f"worker socket path {runtime}/workers/q1/{SOCKET_NAME} is too long (114 bytes, at most 107): "
        "choose a shorter --runtime-dir"
    )
    assert not (runtime / "workers").exists()


def test_a_workers_counts_reach_the_supervisor_as_data(
    tmp_path: Path, stand_in: subprocess.Popen[bytes]
) -> None:
    """A worker's periodic STATUS= carries its counts as data (X_NFQFW_COUNTS) to its notify
    socket, the supervisor's: the supervisor's STATUS= line sums them, reading no prose."""
    clock = Clock()
    supervisor, worker = live_supervisor(tmp_path, clock, stand_in.pid)
    options = Options(config=str(tmp_path / "policy.yaml"), state_dir=str(tmp_path / "state"))
    daemon = WorkerDaemon(options, notifier=Notifier(worker.notify_path), clock=clock)
    try:
        daemon.spec = QueueSpec(0, 0)
        daemon.engine = Engine(CompiledPolicy(load_policy(POLICY_FILE)))
        lan, wan = addr("10.0.0.5"), addr("203.0.113.7")
        for sport in (40000, 40001):
            outbound = ipv4(lan, wan, 17, udp(lan, wan, sport, 53))
            daemon.engine.process(outbound, Meta(Hook.FORWARD, "lan0", "wan0"), clock())
        daemon.adapter = SimpleNamespace(counters={"reject sent": 1}, early_drops=0)  # type: ignore[assignment]
        daemon._notify_systemd(clock())  # a STATUS= is due at once
        supervisor._on_notify(worker)
        assert worker.counts == Counts(2, 2, 1)
        assert supervisor.status_text() == "queue 0, 1 of 1 workers up: 2 verdicts, 2 flows, 1 rejects sent"
    finally:
        daemon.notifier.close()
        supervisor.close()


def test_control_requests_wait_until_every_worker_has_bound_its_queue(tmp_path: Path) -> None:
    supervisor = Supervisor(Options(config="/unused", runtime_dir=str(tmp_path)), notifier=Notifier(""))
    requests = Requests(supervisor)
    with pytest.raises(RequestError) as err:
        requests({"cmd": "status"})
    assert str(err.value) == "starting: not every worker has bound its queue yet, try again"
    with pytest.raises(RequestError) as err:  # the command is checked first
        requests({"cmd": "bogus"})
    assert str(err.value).startswith("unknown command 'bogus': expected one of status, flows")
