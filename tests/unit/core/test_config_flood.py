"""The flood-protection options and the rule key `synproxy` (policy file side)."""

from __future__ import annotations

import pytest
from test_config import ZONES, errors, one_rule, rule_errors

from nfqfw.core.config import (
    DEFAULT_NEW_RATE,
    DEFAULT_NEW_RATE_PER_SOURCE,
    OptionsConfig,
    Rate,
    parse_policy,
)


def test_protections_default_on_offload_off() -> None:
    options = parse_policy(ZONES).options
    assert (options.prefilter, options.offload, options.antispoof) == (True, "off", "strict")
    assert options.new_rate == DEFAULT_NEW_RATE == Rate(5000, 1)
    assert options.new_rate_per_source == DEFAULT_NEW_RATE_PER_SOURCE == Rate(2500, 1)


def test_every_protection_option_set() -> None:
    text = (
        ZONES
        + "options: {prefilter: off, new-rate: 600/minute, new-rate-per-source: 5/s, offload: established}\n"
    )
    options = parse_policy(text).options
    assert options == OptionsConfig(
        prefilter=False, new_rate=Rate(600, 60), new_rate_per_source=Rate(5, 1), offload="established"
    )


@pytest.mark.parametrize("mode", ["strict", "loose", "off"])
def test_antispoof_modes(mode: str) -> None:
    config = parse_policy(ZONES + f"options: {{antispoof: {mode}}}\n", "p.yaml")
    assert config.options.antispoof == mode
    assert [str(issue) for issue in config.warnings] == (
        [
            "p.yaml:4:22: warning: options: antispoof is off: packets with a forged source address "
            "(an inside host's, the gateway's own) from the external zone are not dropped"
        ]
        if mode == "off"
        else []
    )


def test_caps_can_be_switched_off() -> None:
    options = parse_policy(ZONES + "options: {new-rate: off, new-rate-per-source: off}\n").options
    assert (options.new_rate, options.new_rate_per_source) == (None, None)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            "prefilter: yes",
            "p.yaml:5:14: options: prefilter: expected on or off, got 'yes'",
        ),
        (
            "new-rate: fast",
            "p.yaml:5:13: options: new-rate: expected N/second, N/minute, N/hour or N/day or off, got 'fast'",
        ),
        (
            "new-rate-per-source: 0/s",
            "p.yaml:5:24: options: new-rate-per-source: the rate must be at least 1, got '0/s'",
        ),
        (
            "new-rate: [1/s]",
            "p.yaml:5:13: options: new-rate: expected a single value, got a list",
        ),
        (
            "offload: establish",
            "p.yaml:5:12: options: offload: expected off or established, got 'establish' (did you mean "
            "'established'?)",
        ),
        (
            "antispoof: on",
            "p.yaml:5:14: options: antispoof: expected strict, loose or off, got 'on'",
        ),
        (
            "offlaod: established",
            "p.yaml:5:3: options: unknown key 'offlaod' (did you mean 'offload'?)",
        ),
    ],
)
def test_protection_option_errors(options: str, expected: str) -> None:
    assert errors(f"{ZONES}options:\n  {options}\n") == [expected]


def test_synproxy_on_an_ingress_tcp_accept_rule() -> None:
    rule = one_rule("name: web\naction: accept\nproto: tcp\nports: 443\nsynproxy: true")
    assert rule.synproxy is True
    assert one_rule("name: web\naction: accept\nproto: tcp\nsynproxy: false").synproxy is False
    assert one_rule("name: web\naction: accept\nproto: tcp").synproxy is False


@pytest.mark.parametrize(
    ("rule", "side", "expected"),
    [
        (
            "name: a\naction: accept\nproto: udp\nsynproxy: true",
            "ingress",
            "p.yaml:8:5: ingress rule 'a': synproxy: needs proto tcp (the rule's proto is udp)",
        ),
        (
            "name: a\naction: accept\nproto: [tcp, udp]\nsynproxy: true",
            "ingress",
            "p.yaml:8:5: ingress rule 'a': synproxy: needs proto tcp (the rule's proto is tcp, udp)",
        ),
        (
            "name: a\naction: accept\nsynproxy: true",
            "ingress",
            "p.yaml:7:5: ingress rule 'a': synproxy: needs proto tcp (the rule has no proto)",
        ),
        (
            "name: a\naction: reject\nproto: tcp\nsynproxy: true",
            "ingress",
            "p.yaml:8:5: ingress rule 'a': synproxy: only for rules with action accept (this one is reject)",
        ),
        (
            "name: a\naction: accept\nproto: tcp\nsynproxy: true",
            "egress",
            "p.yaml:8:5: egress rule 'a': synproxy: only for ingress rules (it answers SYNs from the "
            "outside)",
        ),
        (
            "name: a\naction: accept\nproto: tcp\nsynproxy: 1",
            "ingress",
            "p.yaml:8:15: ingress rule 'a': synproxy: expected true or false, got '1'",
        ),
    ],
)
def test_synproxy_errors(rule: str, side: str, expected: str) -> None:
    assert rule_errors(rule, side) == [expected]
