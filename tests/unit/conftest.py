"""Unit tests never touch the machine's kernel rules: an Iptables built with the real tools
(the default runner) fails the test instead of running iptables-restore in whatever network
namespace the tests run in. Unit tests pass fake tools, or hold a firewall_fakes.RecordingFirewall."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from typing import Any

import pytest

from nfqfw.firewall.iptables import FAMILIES, Iptables, Runner, Tools


def _refuse_real_tools(argv: list[str], *args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    pytest.fail(
        f"a unit test ran the real {argv[0]}: give the daemon a firewall_fakes.RecordingFirewall"
        " (or Iptables fake tools)",
        pytrace=True,
    )


@pytest.fixture(autouse=True)
def no_real_rule_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    real_init = Iptables.__init__

    def init(self: Iptables, families: Iterable[Tools] = FAMILIES, run: Runner = subprocess.run) -> None:
        real_init(self, families, _refuse_real_tools if run is subprocess.run else run)

    monkeypatch.setattr(Iptables, "__init__", init)
