"""A Daemon without the kernel, for the tests of what it answers (control requests, sets, trial
reloads): an injected clock, a notifier that records, links that never change, a fake sender."""

from __future__ import annotations

from queue_fakes import MARK, FakeLinks, FakeSender

from nfqfw.core.build import ipv4, tcp
from nfqfw.core.engine import Engine
from nfqfw.firewall import Firewall, QueueSpec
from nfqfw.kernel.queue import QueueAdapter
from nfqfw.kernel.queue_info import DropWatch
from nfqfw.service.daemon import Daemon
from nfqfw.service.options import Options

T0 = 1000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Notes:
    """sd_notify's stand-in: what the daemon told systemd, in order."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def reloading(self, status: str | None = None) -> bool:
        self.sent.append("RELOADING=1")
        return True

    def ready(self, status: str | None = None) -> bool:
        self.sent.append(f"READY=1 {status}")
        return True

    def status(self, status: str) -> bool:
        return True

    def watchdog(self) -> bool:
        return True

    def close(self) -> None:
        pass


class QuietLinks(FakeLinks):
    def on_events(self) -> None:
        pass

    def close(self) -> None:
        pass


def kernel_free_daemon(options: Options, clock: Clock, firewall: Firewall, engine: Engine) -> Daemon:
    """A Daemon as start() leaves it, minus the kernel: `engine` behind a fake queue (lan0, wan0)."""
    d = Daemon(options, notifier=Notes(), clock=clock, firewall=firewall)  # type: ignore[arg-type]
    d.engine = engine
    d.spec = QueueSpec(0, 0)
    d.links = QuietLinks({3: "lan0", 4: "wan0"})  # type: ignore[assignment]
    d.drops = DropWatch(range(0, 1), read=lambda: {})
    d.adapter = QueueAdapter(d.engine, d.links, FakeSender(), mark=MARK, clock=clock)
    d.adapter.housekeeping = d._housekeeping
    return d


def tcp4(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int) -> bytes:
    return ipv4(src, dst, 6, tcp(src, dst, sport, dport, seq=seq, ack=ack, flags=flags))
