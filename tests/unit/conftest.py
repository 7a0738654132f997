"""Unit tests never run the real rule tools: a test that reached iptables-save/-restore would
read or change the firewall of the machine it runs on (once, real nfqfw rules were left in the
host's own namespace so). The real `subprocess.run` behind nfqfw.firewall.iptables fails the
test here; tests drive the backend with fake tools (`Iptables(run=...)`) and daemons with
`firewall_fakes.RecordingFirewall`. Nor do they open a real ctnetlink socket (offload: it reads
and deletes entries of the kernel's connection table): tests give Offload a stand-in.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from nfqfw.firewall import iptables
from nfqfw.kernel import ctnetlink


@pytest.fixture(autouse=True)
def no_real_rule_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    real = iptables._run

    def guarded(run: Callable[..., Any], argv: list[str], text: str | None) -> str:
        if run is subprocess.run:
            pytest.fail(f"a unit test ran the real {argv[0]}: give the daemon a RecordingFirewall")
        return real(run, argv, text)

    monkeypatch.setattr(iptables, "_run", guarded)


@pytest.fixture(autouse=True)
def no_real_ctnetlink(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(self: ctnetlink.Ctnetlink) -> None:
        pytest.fail("a unit test opened a real ctnetlink socket: give Offload a stand-in")

    monkeypatch.setattr(ctnetlink.Ctnetlink, "__init__", refused)
