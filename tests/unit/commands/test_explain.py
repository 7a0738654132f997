"""`nfqfw explain`: one packet built from the command line, judged by a fresh engine."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from nfqfw.commands import explain
from nfqfw.commands.explain import ExplainError, parse_endpoint, tcp_flags
from nfqfw.core.build import addr

POLICY = Path(__file__).resolve().parents[3] / "config" / "policy.yaml"
MAIL_RULE = (
    f"rule: mail ({POLICY}:48): accept tcp to 10.0.0.25/32, fd00::25/128 ports 25 (smtp), 587 (submission)\n"
)


def run_explain(
    argv: list[str], capsys: pytest.CaptureFixture[str], policy: Path = POLICY
) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    explain.register(parser.add_subparsers())
    args = parser.parse_args(["explain", "--config", str(policy), *argv])
    status = args.func(args)
    out, err = capsys.readouterr()
    return status, out, err


def test_ingress_smtp_is_accepted_by_rule_mail(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_explain(["--in", "wan0", "tcp", "198.51.100.7:50000", "10.0.0.25:25"], capsys)
    assert status == 0
    assert out == "verdict: accept\nconntrack: new\ndecided by: rule mail\nwhy: rule mail\n" + MAIL_RULE


def test_ingress_ssh_to_a_host_falls_to_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_explain(["--in", "wan0", "tcp", "198.51.100.7:50000", "10.0.0.25:22"], capsys)
    assert status == 0
    assert out == "verdict: drop\nconntrack: new\ndecided by: default ingress\nwhy: default ingress\n"


def test_ipv6_mail_and_smb_reject_with_tcp_reset(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_explain(["--in", "wan0", "tcp", "[2001:db8::7]:50000", "[fd00::25]:587"], capsys)
    assert out == "verdict: accept\nconntrack: new\ndecided by: rule mail\nwhy: rule mail\n" + MAIL_RULE
    _, out, _ = run_explain(["--in", "lan0", "tcp", "10.0.0.25", "203.0.113.10:445"], capsys)
    assert out == (
        "verdict: reject\nconntrack: new\ndecided by: rule no-smb-out\nwhy: rule no-smb-out\n"
        "reject with: tcp-reset\n"
        f"rule: no-smb-out ({POLICY}:67): reject tcp ports 445 (microsoft-ds)\n"
    )


def test_ack_without_syn_is_invalid(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_explain(
        ["--in", "wan0", "--flags", "A", "tcp", "198.51.100.7:50000", "10.0.0.25:80"], capsys
    )
    assert out == (
        "verdict: drop\nconntrack: invalid\ndecided by: conntrack (invalid)\n"
        "why: invalid: tcp: ACK without a connection (mid-stream pick-up disabled)\n"
    )


def test_hook_from_gateway_addresses_or_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.read_text() + "\noptions:\n  gateway-addresses: [203.0.113.1, 2001:db8::1]\n")
    ping = (
        "verdict: accept\nconntrack: new\ndecided by: rule ping-gateway\nwhy: rule ping-gateway\n"
        f"rule: ping-gateway ({policy}:53): accept icmp to gateway icmp-types 8, 128 "
        "limit 5/1s burst 5\n"
    )
    _, out, _ = run_explain(["--in", "wan0", "icmp", "198.51.100.7", "203.0.113.1"], capsys, policy)
    assert out == ping
    _, out, _ = run_explain(["--in", "wan0", "icmpv6", "2001:db8:5::7", "2001:db8::1"], capsys, policy)
    assert out == ping
    # the same ping said to pass through the gateway matches no `to: gateway` rule
    _, out, _ = run_explain(
        ["--in", "wan0", "--hook", "forward", "icmp", "198.51.100.7", "203.0.113.1"], capsys, policy
    )
    assert out == "verdict: drop\nconntrack: new\ndecided by: default ingress\nwhy: default ingress\n"
    _, out, _ = run_explain(
        ["--in", "wan0", "--icmp-type", "echo-reply", "icmp", "198.51.100.7", "203.0.113.1"], capsys, policy
    )
    assert out == (
        "verdict: drop\nconntrack: invalid\ndecided by: conntrack (invalid)\n"
        "why: invalid: icmp: reply without a request\n"
    )


def test_udp_egress_is_accepted_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_explain(["--in", "lan0", "udp", "10.0.0.25:53000", "192.0.2.53:53"], capsys)
    assert out == "verdict: accept\nconntrack: new\ndecided by: default egress\nwhy: default egress\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tcp", "10.0.0.25:1", "fd00::1"], "source and destination are of different IP families"),
        (["tcp", "10.0.0.25", "10.0.0.1"], "tcp needs a destination port (DST:PORT)"),
        (["udp", "10.0.0.25", "10.0.0.1:99999"], "bad port '99999'"),
        (["tcp", "10.0.0.300", "10.0.0.1:80"], "bad address '10.0.0.300'"),
        (["--flags", "SX", "tcp", "10.0.0.25", "10.0.0.1:80"], "unknown TCP flag 'X' (use S A F R P U E C)"),
        (
            ["--icmp-type", "packet-too-big", "icmp", "10.0.0.25", "10.0.0.1"],
            "ICMP type 'packet-too-big' does not exist for IPv4",
        ),
        (["icmpv6", "10.0.0.25", "10.0.0.1"], "icmpv6 needs IPv6 addresses"),
    ],
)
def test_bad_packet_descriptions(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_explain(["--in", "lan0", *argv], capsys)
    assert (status, out, err) == (1, "", f"nfqfw explain: {message}\n")


def test_endpoint_and_flag_parsing() -> None:
    assert parse_endpoint("[fd00::25]:25") == (addr("fd00::25"), 25)
    assert parse_endpoint("fd00::25") == (addr("fd00::25"), None)
    assert parse_endpoint("10.0.0.25:0") == (addr("10.0.0.25"), 0)
    assert tcp_flags("SAFRPUEC") == 0xFF
    with pytest.raises(ExplainError):
        parse_endpoint("[fd00::25")


def test_the_gateways_own_icmp_errors(capsys: pytest.CaptureFixture[str]) -> None:
    probe = ["--quoting", "udp", "10.0.0.25:40000", "203.0.113.10:33434"]
    _, out, _ = run_explain(
        [
            "--in",
            "lan0",
            "--hook",
            "output",
            "--icmp-type",
            "time-exceeded",
            *probe,
            "icmp",
            "10.0.0.1",
            "10.0.0.25",
        ],
        capsys,
    )
    assert out == (
        "verdict: accept\nconntrack: related\ndecided by: conntrack (related)\n"
        "why: related: the gateway's own icmp error\n"
    )
    # forwarded, the same error quotes a flow nobody tracked
    _, out, _ = run_explain(
        ["--in", "wan0", "--icmp-type", "time-exceeded", *probe, "icmp", "198.51.100.7", "10.0.0.25"], capsys
    )
    assert out.splitlines()[:2] == ["verdict: drop", "conntrack: invalid"]
    too_big = ["--icmp-type", "packet-too-big", "--quoting", "udp", "[fd00::25]:40000", "[2001:db8::7]:443"]
    _, out, _ = run_explain(
        ["--in", "lan0", "--hook", "output", *too_big, "icmpv6", "fd00::1", "fd00::25"], capsys
    )
    assert out.splitlines()[:2] == ["verdict: accept", "conntrack: related"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--icmp-type", "time-exceeded", "icmp", "10.0.0.1", "10.0.0.25"],
            "an ICMP error quotes a packet: give it with --quoting PROTO SRC DST",
        ),
        (
            ["--quoting", "udp", "10.0.0.25:1", "203.0.113.10:2", "icmp", "10.0.0.1", "10.0.0.25"],
            "--quoting is for ICMP errors (e.g. --icmp-type time-exceeded)",
        ),
        (
            [
                "--icmp-type",
                "11",
                "--quoting",
                "udp",
                "[fd00::25]:1",
                "[fd00::9]:2",
                "icmp",
                "10.0.0.1",
                "10.0.0.25",
            ],
            "the quoted packet is of another IP family",
        ),
        (
            [
                "--icmp-type",
                "11",
                "--quoting",
                "sctp",
                "10.0.0.25",
                "10.0.0.9",
                "icmp",
                "10.0.0.1",
                "10.0.0.25",
            ],
            "unknown protocol 'sctp' (use tcp, udp, icmp, icmpv6)",
        ),
    ],
)
def test_bad_quoting_is_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_explain(["--in", "lan0", *argv], capsys)
    assert (status, out, err) == (1, "", f"nfqfw explain: {message}\n")
