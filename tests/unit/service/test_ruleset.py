"""nfqfw.service.ruleset: the QueueSpec a daemon installs, from its options and the policy."""

from __future__ import annotations

import logging

import pytest

from nfqfw.core.config import parse_policy
from nfqfw.core.prefilter import INVALID_TCP_FLAGS, KernelMatch
from nfqfw.firewall.backend import Antispoof, Rate, Synproxy
from nfqfw.service import ruleset
from nfqfw.service.options import Options

POLICY = """\
zones: {external: [wan0], internal: [lan0]}
ingress:
  - {name: web, proto: tcp, to: [10.0.0.80, "fd00::80"], ports: 443, action: accept, synproxy: true}
"""


def test_defaults_prefilter_caps_and_four_queues_each_with_its_queue_for_first_packets() -> None:
    spec = ruleset.queue_spec(Options(config="p"), parse_policy(POLICY), bypass=False)
    protection = spec.protection
    assert protection is not None and spec.queues == range(0, 4) and spec.new_queues == range(4, 8)
    assert spec.bound_queues == (0, 1, 2, 3, 4, 5, 6, 7) and spec.queue_text == "0:3"
    assert protection.new_rate == Rate(5000, 1) and protection.new_rate_per_source == Rate(2500, 1)
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
    assert protection.offload_mark is None
    assert protection.reject_rate == int(Options(config="p").reject_rate)
    assert protection.gateway_errors  # the gateway's own ICMP errors pass OUTPUT in the kernel
    assert protection.antispoof == Antispoof(loose=False, reason="invalid: spoofed source", log=True)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("{antispoof: loose}", Antispoof(loose=True, reason="invalid: spoofed source", log=True)),
        (
            "{antispoof: strict, log-denied: false}",
            Antispoof(loose=False, reason="invalid: spoofed source", log=False),
        ),
        ("{antispoof: off}", None),
    ],
)
def test_antispoof_modes(options: str, expected: Antispoof | None) -> None:
    config = parse_policy(POLICY + f"options: {options}\n")
    assert ruleset.protection(Options(config="p"), config).antispoof == expected


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


def test_first_packets_follow_the_main_queues_unless_told() -> None:
    config = parse_policy(POLICY)

    def bound(**options: object) -> tuple[int, ...]:
        return ruleset.queue_spec(Options(config="p", **options), config, bypass=False).bound_queues  # type: ignore[arg-type]

    assert bound(queue_first=5, queue_last=5) == (5, 6)
    assert bound(queue_first=5, queue_last=5, new_queue=9) == (5, 9)
    assert bound(queue_first=5, queue_last=6, new_queue="off") == (5, 6)
    assert bound(queue_first=0, queue_last=1) == (0, 1, 2, 3)


def test_synproxy_for_forwarded_connections(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    ruleset._warned.clear()
    synproxy = ruleset.protection(Options(config="p"), parse_policy(POLICY)).synproxy
    match4 = KernelMatch(6, dst="10.0.0.80/32", dports=((443, 443),), in_iface="wan0")
    match6 = KernelMatch(6, dst="fd00::80/128", dports=((443, 443),), in_iface="wan0")
    assert synproxy == (Synproxy(4, "FORWARD", (match4,), "web"), Synproxy(6, "FORWARD", (match6,), "web"))
    assert caplog.text == ""  # the rule's servers are behind the gateway: all in force


def test_synproxy_never_for_the_gateway_itself(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    ruleset._warned.clear()
    policy = """\
zones: {external: [wan0, wan1], internal: [lan0]}
ingress:
  - {name: smtp, proto: tcp, ports: 25, action: accept, synproxy: true}
  - {name: web, proto: tcp, in: wan1, from: 198.51.100.0/24, to: [gateway, 10.0.0.80], ports: 443,
     action: accept, synproxy: true}
"""
    synproxy = ruleset.protection(Options(config="p"), parse_policy(policy)).synproxy
    any_port25 = tuple(KernelMatch(6, dports=((25, 25),), in_iface=iface) for iface in ("wan0", "wan1"))
    web = KernelMatch(6, src="198.51.100.0/24", dst="10.0.0.80/32", dports=((443, 443),), in_iface="wan1")
    assert synproxy == (
        Synproxy(4, "FORWARD", any_port25, "smtp"),
        Synproxy(6, "FORWARD", any_port25, "smtp"),
        Synproxy(4, "FORWARD", (web,), "web"),
    )
    for name in ("smtp", "web"):
        assert (
            f"rule {name}: synproxy covers forwarded connections only: SYNs to the gateway itself are not "
            "proxied (capped by new-rate as any first packet)"
        ) in caplog.text


@pytest.mark.parametrize(
    ("argv", "queues"),
    [
        ([], (0, 3, None)),
        (["--queue", "5"], (5, 5, None)),
        (["--queue-balance", "2:3", "--new-queue", "10"], (2, 3, 10)),
        (["--queue", "0", "--new-queue", "off"], (0, 0, "off")),
    ],
)
def test_run_queue_options_reach_the_daemon(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], queues: tuple[int, int, object]
) -> None:
    from nfqfw.cli import build_parser
    from nfqfw.observe import logsetup
    from nfqfw.service import daemon

    seen: list[Options] = []
    monkeypatch.setattr(logsetup, "setup_logging", lambda level: None)
    monkeypatch.setattr(daemon, "run_daemon", lambda options: seen.append(options) or 0)
    args = build_parser().parse_args(["run", "-c", "p.yaml", *argv])
    assert args.func(args) == 0
    assert (seen[0].queue_first, seen[0].queue_last, seen[0].new_queue) == queues


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--queue-balance", "0:3", "--new-queue", "2"], "nfqfw: --new-queue 2 overlaps the queues 0:3\n"),
        (
            ["--queue", "65535"],
            "nfqfw: no room for the queues of first packets after 65535 "
            "(--new-queue N chooses them, --new-queue off shares the main queues)\n",
        ),
    ],
)
def test_run_refuses_queues_for_first_packets_that_do_not_fit(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    from nfqfw.cli import build_parser

    args = build_parser().parse_args(["run", "-c", "p.yaml", *argv])
    assert args.func(args) == 2
    assert capsys.readouterr().err == message
