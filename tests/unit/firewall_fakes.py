"""A stand-in for the kernel rules: a Firewall that records what a daemon asks of it."""

from __future__ import annotations

from nfqfw.firewall import Firewall, QueueSpec


class RecordingFirewall(Firewall):
    """Installs nothing: `installs` lists every spec given to install(), `current` the last;
    `drops` is what counters() answers (the kernel rules' drops), `missing` what
    ipv6_nat_missing() does (what the kernel lacks for IPv6 NAT)."""

    name = "recording"

    def __init__(self, drops: dict[str, int] | None = None, missing: str | None = None) -> None:
        self.installs: list[QueueSpec] = []
        self.missing = missing
        self.current: QueueSpec | None = None
        self.drops = dict(drops or {})

    def check(self) -> None:
        pass

    def install(self, spec: QueueSpec) -> None:
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
