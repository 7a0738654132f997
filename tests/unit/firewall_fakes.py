"""A Firewall that records what it is asked (unit tests must never run iptables or touch the
kernel's sets: they run in the machine's own network namespace)."""

from __future__ import annotations

from typing import Any

from nfqfw.firewall import QueueSpec, RulesError
from nfqfw.firewall.backend import Firewall


class RecordingFirewall(Firewall):
    """Installs, removals and set entries recorded; `fail` makes install raise RulesError."""

    name = "recording"

    def __init__(self, sets: bool = True) -> None:
        self.installs: list[QueueSpec] = []
        self.entries: list[tuple[Any, ...]] = []
        self.sets = sets
        self.fail: str | None = None
        self.panic = False

    def check(self) -> None:
        pass

    def install(self, spec: QueueSpec) -> None:
        if self.fail is not None:
            raise RulesError(self.fail)
        self.installs.append(spec)
        self.panic = spec.panic

    def panic_installed(self) -> bool:
        return self.panic

    def installed(self) -> bool:
        return bool(self.installs)

    def remove(self) -> list[int]:
        self.installs.clear()
        return [4, 6]

    def show(self) -> str:
        return ""

    def counters(self) -> dict[str, int]:
        return {}

    def supports_sets(self) -> bool:
        return self.sets

    def set_entry(self, name: str, family: int, cidr: str, add: bool, timeout: float | None = None) -> None:
        self.entries.append((name, family, cidr, add, timeout))
