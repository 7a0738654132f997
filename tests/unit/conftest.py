"""Unit tests never run the real rule tools: a test that reached iptables-save/-restore would
read or change the firewall of the machine it runs on (once, real nfqfw rules were left in the
host's own namespace so). An Iptables built with the real `subprocess.run` (its default runner)
fails the test when it runs a tool -- through iptables._run or directly, as the IPv6 NAT probe
does -- and one built without `ipsets` when it reaches the kernel's ipsets; tests drive the
backend with fake tools and sets (`Iptables(run=..., ipsets=...)`) and daemons with
`firewall_fakes.RecordingFirewall`.
Nor do they open a real ctnetlink socket (offload: it reads and deletes entries of the kernel's
connection table): tests give Offload a stand-in.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from nfqfw.firewall.iptables import FAMILIES, Iptables, Runner, Tools
from nfqfw.kernel import ctnetlink


def _refuse_real_tools(argv: list[str], *args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    pytest.fail(f"a unit test ran the real {argv[0]}: give the daemon a RecordingFirewall")


def _refuse_real_ipsets() -> Any:
    pytest.fail("a unit test reached the kernel's ipsets: give the backend ipsets=...")


@pytest.fixture(autouse=True)
def no_real_rule_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    real_init = Iptables.__init__

    def init(
        self: Iptables,
        families: Iterable[Tools] = FAMILIES,
        run: Runner = subprocess.run,
        ipsets: Callable[[], Any] | None = None,
    ) -> None:
        run = _refuse_real_tools if run is subprocess.run else run
        real_init(self, families, run, ipsets or _refuse_real_ipsets)

    monkeypatch.setattr(Iptables, "__init__", init)


@pytest.fixture(autouse=True)
def no_real_ctnetlink(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(self: ctnetlink.Ctnetlink) -> None:
        pytest.fail("a unit test opened a real ctnetlink socket: give Offload a stand-in")

    monkeypatch.setattr(ctnetlink.Ctnetlink, "__init__", refused)
