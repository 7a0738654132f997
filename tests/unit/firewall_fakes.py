"""A stand-in for the kernel rules: unit tests hold a RecordingFirewall, never the real backend
(tests/unit/conftest.py fails a unit test that would run the real iptables tools)."""

from __future__ import annotations

from nfqfw.firewall import Firewall, QueueSpec


class RecordingFirewall(Firewall):
    """Records each spec installed; says what the kernel lacks for IPv6 NAT (`missing`)."""

    name = "fake"

    def __init__(self, missing: str | None = None) -> None:
        self.missing = missing
        self.specs: list[QueueSpec] = []

    def check(self) -> None:
        pass

    def install(self, spec: QueueSpec) -> None:
        self.specs.append(spec)

    def panic_installed(self) -> bool:
        return False

    def installed(self) -> bool:
        return bool(self.specs)

    def remove(self) -> list[int]:
        return []

    def show(self) -> str:
        return ""

    def counters(self) -> dict[str, int]:
        return {}

    def ipv6_nat_missing(self) -> str | None:
        return self.missing
