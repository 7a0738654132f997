"""`nfqfw explain`: one packet built from the command line, judged by a fresh engine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from nfqfw.commands import explain
from nfqfw.commands.explain import ExplainError, parse_endpoint, tcp_flags
from nfqfw.core.build import addr

POLICY = Path(__file__).resolve().parents[3] / "config" / "policy.yaml"
MAIL = "verdict: accept\nconntrack: new\ndecided by: rule mail\nwhy: rule mail\n"
DEFAULT_INGRESS = "verdict: drop\nconntrack: new\ndecided by: default ingress\nwhy: default ingress\n"
MASQUERADE_LINE = POLICY.read_text().split("- {out: wan0, from: 10.0.0.0/24}")[0].count("\n") + 1
MAIL_RULE = (
    f"rule: mail ({POLICY}:59): accept tcp to 10.0.0.25/32, fd00::25/128 ports 25 (smtp), 587 (submission)\n"
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
    assert out == "zones: external -> internal (ingress)\n" + MAIL + MAIL_RULE


def test_ingress_ssh_to_a_host_falls_to_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_explain(["--in", "wan0", "tcp", "198.51.100.7:50000", "10.0.0.25:22"], capsys)
    assert status == 0
    assert out == "zones: external -> internal (ingress)\n" + DEFAULT_INGRESS


def test_ipv6_mail_and_smb_reject_with_tcp_reset(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_explain(["--in", "wan0", "tcp", "[2001:db8::7]:50000", "[fd00::25]:587"], capsys)
    assert out == "zones: external -> internal (ingress)\n" + MAIL + MAIL_RULE
    _, out, _ = run_explain(["--in", "lan0", "tcp", "10.0.0.25", "203.0.113.10:445"], capsys)
    assert out == (
        "zones: internal -> external (egress)\n"
        "verdict: reject\nconntrack: new\ndecided by: rule no-smb-out\nwhy: rule no-smb-out\n"
        "reject with: tcp-reset\n"
        f"rule: no-smb-out ({POLICY}:91): reject tcp ports 445 (microsoft-ds)\n"
    )


def test_ack_without_syn_is_invalid(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_explain(
        ["--in", "wan0", "--flags", "A", "tcp", "198.51.100.7:50000", "10.0.0.25:80"], capsys
    )
    assert out == (
        "zones: external -> internal (ingress)\n"
        "verdict: drop\nconntrack: invalid\ndecided by: conntrack (invalid)\n"
        "why: invalid: tcp: ACK without a connection (mid-stream pick-up disabled)\n"
    )


def test_hook_from_gateway_addresses_or_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.read_text() + "\noptions:\n  gateway-addresses: [203.0.113.1, 2001:db8::1]\n")
    gateway = "zones: external -> gateway (ingress)\n"
    ping = (
        "verdict: accept\nconntrack: new\ndecided by: rule ping-gateway\nwhy: rule ping-gateway\n"
        f"rule: ping-gateway ({policy}:64): accept icmp to gateway icmp-types 8, 128 "
        "limit 5/1s burst 5\n"
    )
    _, out, _ = run_explain(["--in", "wan0", "icmp", "198.51.100.7", "203.0.113.1"], capsys, policy)
    assert out == gateway + ping
    _, out, _ = run_explain(["--in", "wan0", "icmpv6", "2001:db8:5::7", "2001:db8::1"], capsys, policy)
    assert out == gateway + ping
    # the same ping said to pass through the gateway matches no `to: gateway` rule
    _, out, _ = run_explain(
        ["--in", "wan0", "--hook", "forward", "icmp", "198.51.100.7", "203.0.113.1"], capsys, policy
    )
    assert out == (
        "zones: external -> external (ingress)\n"  # routed out by the default route (wan0)
        "verdict: drop\nconntrack: new\ndecided by: default ingress\nwhy: default ingress\n"
    )
    _, out, _ = run_explain(
        ["--in", "wan0", "--icmp-type", "echo-reply", "icmp", "198.51.100.7", "203.0.113.1"], capsys, policy
    )
    assert out == (
        f"{gateway}verdict: drop\nconntrack: invalid\ndecided by: conntrack (invalid)\n"
        "why: invalid: icmp: reply without a request\n"
    )


def test_udp_egress_is_accepted_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_explain(["--in", "lan0", "udp", "10.0.0.25:53000", "192.0.2.53:53"], capsys)
    assert out == (
        "zones: internal -> external (egress)\n"
        "verdict: accept\nconntrack: new\ndecided by: default egress\nwhy: default egress\n"
        f"then source NAT: masquerade to the address of wan0 (line {MASQUERADE_LINE})\n"
    )


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


# -- forwards and zones ------------------------------------------------------------------------

NAT_POLICY = """\
zones:
  external: [wan0]
  internal: {interfaces: [lan0], networks: [10.0.0.0/24, 'fd00::/64']}
  dmz: {faces: inside, interfaces: [dmz0], networks: [10.0.2.0/24]}
options: {gateway-addresses: [203.0.113.1]}
ingress:
  - {name: dmz-web, proto: tcp, to: 10.0.2.80, ports: 80, action: accept}
between:
  - {name: lan-to-dmz, from-zone: internal, to-zone: dmz, action: accept}
nat:
  masquerade:
    - {out: wan0, from: [10.0.0.0/24, 10.0.2.0/24]}
  forward:
    - {name: smtp, proto: tcp, in: wan0, ports: [25, 587], to: 10.0.0.25, address: 203.0.113.1}
    - {name: web-alt, proto: tcp, in: wan0, ports: 8080, to: 10.0.2.80, to-port: 80, pass: false}
    - {name: web6, proto: tcp, in: wan0, ports: 443, to: 'fd00::80', address: '2001:db8:1::1'}
"""


@pytest.fixture
def nat_policy(tmp_path: Path) -> Path:
    path = tmp_path / "nat.yaml"
    path.write_text(NAT_POLICY)
    return path


def test_a_packet_to_the_public_address_is_forwarded_then_decided(
    nat_policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run_explain(
        ["--in", "wan0", "tcp", "198.51.100.7:50000", "203.0.113.1:587"], capsys, nat_policy
    )
    assert out == (
        "forwarded to 10.0.0.25:587 by forward smtp\n"
        "zones: external -> internal (ingress)\n"
        "verdict: accept\nconntrack: new\ndecided by: forward smtp\nwhy: forward smtp\n"
    )
    # Addressed to the inside host directly it was not translated: the ingress rules decide.
    _, out, _ = run_explain(
        ["--in", "wan0", "tcp", "198.51.100.7:50000", "10.0.0.25:587"], capsys, nat_policy
    )
    assert out == (
        "zones: external -> internal (ingress)\n"
        "verdict: drop\nconntrack: new\ndecided by: default ingress\nwhy: default ingress\n"
    )


def test_a_mapped_port_without_pass_is_decided_by_the_ingress_rules(
    nat_policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run_explain(["--in", "wan0", "tcp", "198.51.100.7", "203.0.113.1:8080"], capsys, nat_policy)
    assert out == (
        "forwarded to 10.0.2.80:80 by forward web-alt\n"
        "zones: external -> dmz (ingress)\n"
        "verdict: accept\nconntrack: new\ndecided by: rule dmz-web\nwhy: rule dmz-web\n"
        f"rule: dmz-web ({nat_policy}:7): accept tcp to 10.0.2.80/32 ports 80 (http)\n"
    )
    # A port no forward publishes stays the gateway's own: INPUT, closed by the ingress default.
    _, out, _ = run_explain(["--in", "wan0", "tcp", "198.51.100.7", "203.0.113.1:8081"], capsys, nat_policy)
    assert out == (
        "zones: external -> gateway (ingress)\n"
        "verdict: drop\nconntrack: new\ndecided by: default ingress\nwhy: default ingress\n"
    )


def test_hairpin_ipv6_and_json(nat_policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_explain(["--in", "lan0", "tcp", "10.0.0.5", "203.0.113.1:25"], capsys, nat_policy)
    assert out == (
        "forwarded to 10.0.0.25:25 by forward smtp\n"
        "zones: internal -> internal (egress)\n"
        "verdict: accept\nconntrack: new\ndecided by: forward smtp\nwhy: forward smtp\n"
        "then source NAT: masquerade to the address of lan0 (hairpin of forward smtp)\n"
    )
    argv = ["--json", "--in", "wan0", "tcp", "[2001:db8::7]:40000", "[2001:db8:1::1]:443"]
    _, out, _ = run_explain(argv, capsys, nat_policy)
    assert json.loads(out) == {
        "verdict": "accept",
        "conntrack": "new",
        "decided_by": "forward web6",
        "why": "forward web6",
        "reject_with": None,
        "hook": "FORWARD",
        "forwarded": {"by": "web6", "from": "[2001:db8:1::1]:443", "to": "[fd00::80]:443"},
        "zones": {"from": "external", "to": "internal", "side": "ingress"},
        "source_nat": None,
        "rule": None,  # a forward decided
    }


def test_zones_beyond_two_and_out(nat_policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_explain(["--in", "lan0", "tcp", "10.0.0.5", "10.0.2.80:22"], capsys, nat_policy)
    assert out == (
        "zones: internal -> dmz (between)\n"
        "verdict: accept\nconntrack: new\ndecided by: rule lan-to-dmz\nwhy: rule lan-to-dmz\n"
        f"rule: lan-to-dmz ({nat_policy}:9): accept from-zone internal to-zone dmz\n"
    )
    _, out, _ = run_explain(["--in", "dmz0", "tcp", "10.0.2.80", "10.0.0.5:22"], capsys, nat_policy)
    assert out == (
        "zones: dmz -> internal (between)\n"
        "verdict: drop\nconntrack: new\ndecided by: default between\nwhy: default between\n"
    )
    # --out names the interface instead of the route: out by wan0, an egress flow, masqueraded
    _, out, _ = run_explain(
        ["--in", "dmz0", "--out", "wan0", "tcp", "10.0.2.80", "10.0.0.5:22"], capsys, nat_policy
    )
    assert out == (
        "zones: dmz -> external (egress)\n"
        "verdict: accept\nconntrack: new\ndecided by: default egress\nwhy: default egress\n"
        "then source NAT: masquerade to the address of wan0 (line 12)\n"
    )


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
        "zones: gateway -> internal (egress)\n"
        "verdict: accept\nconntrack: related\ndecided by: conntrack (related)\n"
        "why: related: the gateway's own icmp error\n"
    )
    # forwarded, the same error quotes a flow nobody tracked
    _, out, _ = run_explain(
        ["--in", "wan0", "--icmp-type", "time-exceeded", *probe, "icmp", "198.51.100.7", "10.0.0.25"], capsys
    )
    assert out.splitlines()[:3] == [
        "zones: external -> internal (ingress)",
        "verdict: drop",
        "conntrack: invalid",
    ]
    too_big = ["--icmp-type", "packet-too-big", "--quoting", "udp", "[fd00::25]:40000", "[2001:db8::7]:443"]
    _, out, _ = run_explain(
        ["--in", "lan0", "--hook", "output", *too_big, "icmpv6", "fd00::1", "fd00::25"], capsys
    )
    assert out.splitlines()[:3] == [
        "zones: gateway -> internal (egress)",
        "verdict: accept",
        "conntrack: related",
    ]


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


def test_a_forward_s_comment_is_shown_where_it_translated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "nat.yaml"
    policy.write_text(
        NAT_POLICY.replace("address: 203.0.113.1}", "address: 203.0.113.1, comment: the mail host}", 1)
    )
    _, out, _ = run_explain(["--in", "wan0", "tcp", "198.51.100.7:50000", "203.0.113.1:587"], capsys, policy)
    assert out.splitlines()[0] == "forwarded to 10.0.0.25:587 by forward smtp (the mail host)"


def test_source_nat_from_a_set_in_an_included_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    included = tmp_path / "nat.yaml"
    included.write_text(
        "sets:\n  office: [10.0.0.0/28]\nnat:\n  masquerade: [{out: wan0, from: '@office'}]\n"
    )
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "zones:\n  external: [wan0]\n  internal: {interfaces: [lan0], networks: [10.0.0.0/24]}\n"
        "include: nat.yaml\n"
    )
    _, out, _ = run_explain(["--in", "lan0", "tcp", "10.0.0.5", "203.0.113.10:80"], capsys, policy)
    assert out == (
        "zones: internal -> external (egress)\n"
        "verdict: accept\nconntrack: new\ndecided by: default egress\nwhy: default egress\n"
        f"then source NAT: masquerade to the address of wan0 ({included}:4)\n"
    )
    _, out, _ = run_explain(["--in", "lan0", "tcp", "10.0.0.55", "203.0.113.10:80"], capsys, policy)
    assert "source NAT" not in out  # not in @office
