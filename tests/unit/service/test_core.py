"""nfqfw.service.core.ServiceCore on its own: the housekeeping schedule (WATCHDOG=1, STATUS=), the
stop announced once, with a fake clock and a real notify socket."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfqfw.firewall import QueueSpec
from nfqfw.service.core import STATUS_PERIOD, ServiceCore
from nfqfw.service.options import Options
from nfqfw.service.sdnotify import Notifier
from nfqfw.service.supervision import Counts


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Probe(ServiceCore):
    """The smallest specialisation: fixed counts, nothing of its own to tend."""

    OWNS_RULES = False

    def counts(self) -> Counts:
        return Counts(7, 3, 1)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield sock, path
    sock.close()


def received(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(4096))
        except BlockingIOError:
            return got


def probe(path: str, clock: Clock) -> Probe:
    service = Probe(Options(config="/unused"), notifier=Notifier(path), clock=clock)
    service.spec = QueueSpec(2, 2)
    return service


def test_watchdog_from_ready_on_and_status_every_period(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    clock = Clock()
    service = probe(path, clock)
    service._schedule.watchdog_every = 0.5
    assert service._housekeeping(clock()) == clock() + service.PERIOD  # no ping before READY=1
    assert received(sock) == [b"STATUS=queue 2: 7 verdicts, 3 flows, 1 rejects sent"]
    service._announce_ready("filtering")
    assert service._housekeeping(clock()) == clock() + 0.5  # the next ping is due before the period
    assert received(sock) == [b"READY=1\nSTATUS=filtering", b"WATCHDOG=1"]
    clock.now += 0.5
    service._housekeeping(clock())
    clock.now += STATUS_PERIOD
    service._housekeeping(clock())
    assert received(sock) == [
        b"WATCHDOG=1",
        b"WATCHDOG=1",
        b"STATUS=queue 2: 7 verdicts, 3 flows, 1 rejects sent",
    ]
    service.close()


def test_a_stop_is_announced_once(
    listener: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, path = listener
    clock = Clock()
    service = probe(path, clock)
    service.request_stop("SIGTERM")
    with caplog.at_level(logging.INFO, logger="nfqfw"):
        assert service._housekeeping(clock()) == float("inf")
        service.stop()
    assert received(sock) == [b"STOPPING=1\nSTATUS=stopping"]
    assert caplog.messages == ["SIGTERM received: stopping"]
