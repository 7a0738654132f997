"""nfqfw.service.ruleset: the QueueSpec a daemon installs, from its options and the policy."""

from __future__ import annotations

import logging

import pytest

from nfqfw.core.config import parse_policy
from nfqfw.core.prefilter import INVALID_TCP_FLAGS, KernelMatch
from nfqfw.firewall.backend import Rate, Synproxy
from nfqfw.service import ruleset
from nfqfw.service.options import Options

POLICY = """\
zones: {external: [wan0], internal: [lan0]}
ingress:
  - {name: web, proto: tcp, to: [10.0.0.80, "fd00::80"], ports: 443, action: accept, synproxy: true}
"""


def test_defaults_prefilter_and_caps_no_separate_queue() -> None:
    spec = ruleset.queue_spec(Options(config="p"), parse_policy(POLICY), bypass=False)
    protection = spec.protection
    assert protection is not None and spec.bound_queues == (0,)
    assert protection.new_rate == Rate(20000, 1) and protection.new_rate_per_source == Rate(10000, 1)
    assert protection.invalid_tcp_flags == INVALID_TCP_FLAGS
    assert protection.internal_ifaces == ("lan0",)
    assert protection.protocols(4) == (6, 1) and protection.protocols(6) == (
        6,
        58,
    )  # UDP: capped, not dropped
    assert [rule.reason for rule in protection.prefilter_rules(4, "FORWARD")] == [
        "rule web",
        "default ingress",
        "default ingress",
    ]
    assert protection.offload_mark is None and protection.synproxy == ()
    assert protection.reject_rate == int(Options(config="p").reject_rate)


def test_new_queue_offload_and_switched_off_caps() -> None:
    config = parse_policy(POLICY + "options: {offload: established, new-rate: off, prefilter: off}\n")
    spec = ruleset.queue_spec(
        Options(config="p", queue_first=0, queue_last=1, new_queue=4), config, bypass=True
    )
    assert spec.bound_queues == (0, 1, 4, 5)
    assert spec.protection is not None
    assert (
        spec.protection.offload_mark == 0x20000000
    )  # nfqfw.firewall.marks: the default --conn-mark's top bit
    assert spec.protection.new_rate is None and spec.protection.prefilter == ()


def test_synproxy_waits_for_the_engine(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING)
    ruleset._warned.clear()
    assert ruleset.protection(Options(config="p"), parse_policy(POLICY)).synproxy == ()
    assert "rule web: synproxy is not in force yet" in caplog.text
    monkeypatch.setattr(ruleset, "ENGINE_FOLLOWS_SYNPROXY", True)
    synproxy = ruleset.protection(Options(config="p"), parse_policy(POLICY)).synproxy
    match4 = KernelMatch(6, dst="10.0.0.80/32", dports=((443, 443),), in_iface="wan0")
    match6 = KernelMatch(6, dst="fd00::80/128", dports=((443, 443),), in_iface="wan0")
    assert synproxy == (Synproxy(4, "FORWARD", (match4,), "web"), Synproxy(6, "FORWARD", (match6,), "web"))
