"""A stand-in for the kernel rules: a Firewall that records what a daemon asks of it (unit
tests never run iptables or touch the kernel's sets: they run in the machine's own namespace)."""

from __future__ import annotations

from typing import Any

from nfqfw.firewall import Firewall, QueueSpec, RulesError


class RecordingFirewall(Firewall):
    """Installs nothing: `installs` lists every spec given to install(), `current` the last;
    `drops` is what counters() answers (the kernel rules' drops); `entries` the set entries
    asked for; `fail` makes install raise RulesError; `sets=False` is a backend without sets;
    `missing` what ipv6_nat_missing() answers (what the kernel lacks for IPv6 NAT)."""

    name = "recording"

    def __init__(
        self, drops: dict[str, int] | None = None, sets: bool = True, missing: str | None = None
    ) -> None:
        self.installs: list[QueueSpec] = []
        self.missing = missing
        self.current: QueueSpec | None = None
        self.drops = dict(drops or {})
        self.entries: list[tuple[Any, ...]] = []
        self.sets = sets
        self.fail: str | None = None

    def check(self) -> None:
        pass

    def install(self, spec: QueueSpec) -> None:
        if self.fail is not None:
            raise RulesError(self.fail)
        self.installs.append(spec)
        self.current = spec

    def panic_installed(self) -> bool:
        return bool(self.current and self.current.panic)

    def installed(self) -> bool:
        return self.current is not None

    def remove(self) -> list[int]:
        had = self.current is not None
        self.current = None
        return [4, 6] if had else []

    def show(self) -> str:
        return f"# recorded: {self.current}\n"

    def counters(self) -> dict[str, int]:
        return dict(self.drops)

    def ipv6_nat_missing(self) -> str | None:
        return self.missing

    def supports_sets(self) -> bool:
        return self.sets

    def set_entry(self, name: str, family: int, cidr: str, add: bool, timeout: float | None = None) -> None:
        self.entries.append((name, family, cidr, add, timeout))
