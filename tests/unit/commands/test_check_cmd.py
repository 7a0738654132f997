"""`nfqfw check`: summary and exit 0 for a valid policy, located errors on stderr and exit 1 otherwise."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from nfqfw.commands import check
from nfqfw.core.config import parse_policy
from nfqfw.firewall.iptables import Iptables

REPO = Path(__file__).resolve().parents[3]
SHIPPED = sorted(path.relative_to(REPO) for path in (REPO / "config").rglob("*.yaml"))
COMPILE_TIME = re.compile(r"compiled in (\d+\.\d ms|\d+\.\d\d s)$", re.MULTILINE)


def timeless(out: str) -> str:
    """The output with each line's compile time, after checking its shape, replaced by T."""
    assert len(COMPILE_TIME.findall(out)) == out.count("\n")
    return COMPILE_TIME.sub("compiled in T", out)


def run_check(*files: str | Path) -> int:
    """Parse the arguments with the command's own parser, then run it (as nfqfw.cli does)."""
    parser = argparse.ArgumentParser(prog="nfqfw")
    check.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["check", *map(str, files)])
    return int(args.func(args))


def test_shipped_policy(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(REPO)
    assert run_check("config/policy.yaml") == 0
    captured = capsys.readouterr()
    assert timeless(captured.out) == (
        "config/policy.yaml: OK (zones: 2, ingress rules: 3, egress rules: 1, nat: 1 masquerade, 1 forward), "
        "4 rules compiled in T\n"
    )
    assert captured.err == ""


def test_every_shipped_config_is_valid(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert {str(path) for path in SHIPPED} >= {
        "config/policy.yaml",
        "config/examples/home-gateway.yaml",
        "config/examples/cloud-edge.yaml",
        "config/examples/strict-egress.yaml",
        "config/examples/dmz-nat.yaml",
    }
    monkeypatch.chdir(REPO)
    assert run_check(*SHIPPED) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert [line.split(": OK (")[0] for line in captured.out.splitlines()] == [str(path) for path in SHIPPED]


def test_examples_summaries(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(REPO / "config" / "examples")
    assert run_check("home-gateway.yaml", "cloud-edge.yaml", "strict-egress.yaml", "dmz-nat.yaml") == 0
    assert timeless(capsys.readouterr().out) == (
        "home-gateway.yaml: OK (zones: 2, ingress rules: 3, egress rules: 1), 4 rules compiled in T\n"
        "cloud-edge.yaml: OK (zones: 2, ingress rules: 6, egress rules: 0), 6 rules compiled in T\n"
        "strict-egress.yaml: OK (zones: 2, ingress rules: 0, egress rules: 7), 7 rules compiled in T\n"
        "dmz-nat.yaml: OK (zones: 4, ingress rules: 2, egress rules: 1, between rules: 2, "
        "nat: 1 masquerade, 1 forward), 5 rules compiled in T\n"
    )


def test_summary_counts_the_rules_and_gives_the_compile_time() -> None:
    config = parse_policy(
        "zones: {external: [wan0], internal: []}\n"
        "ingress:\n  - {name: web, proto: tcp, ports: 80, action: accept}\n"
        "egress:\n  - {name: dns, proto: udp, ports: 53, action: accept}\n  - {name: rest, action: drop}\n"
    )
    counted = {**check.counts(config), "compile_seconds": 0.01234}
    assert check.summary("p.yaml", counted) == (
        "p.yaml: OK (zones: 1, ingress rules: 1, egress rules: 2), 3 rules compiled in 12.3 ms"
    )
    one = parse_policy("zones: {external: [wan0]}\ningress:\n  - {name: web, action: accept}\n")
    counted = {**check.counts(one), "compile_seconds": 1.5}
    assert check.summary("q.yaml", counted) == (
        "q.yaml: OK (zones: 1, ingress rules: 1, egress rules: 0), 1 rule compiled in 1.50 s"
    )


def test_duration() -> None:
    assert [
        check.duration(seconds) for seconds in (0.0, 0.00004, 0.0123, 0.5, 0.99994, 0.99996, 1.234, 12.0)
    ] == [
        "0.0 ms",
        "0.0 ms",
        "12.3 ms",
        "500.0 ms",
        "999.9 ms",
        "1.00 s",
        "1.23 s",
        "12.00 s",
    ]


def test_invalid_policy_lists_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "zones:\n"
        "  external: [wan0]\n"
        "  dmz: [eth2]\n"
        "ingress:\n"
        "  - name: web\n"
        "    proto: tcp\n"
        "    ports: 80-70\n"
        "    action: allow\n"
    )
    assert run_check(bad) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"{bad}:3:3: zones: dmz: a zone other than external and internal is a mapping that says which "
        "side it faces, e.g. {faces: inside, interfaces: [...]}\n"
        f"{bad}:7:12: ingress rule 'web': ports: range '80-70' starts after it ends\n"
        f"{bad}:8:13: ingress rule 'web': action: expected accept, drop or reject, got 'allow'\n"
        f"{bad}: 3 errors\n"
    )


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "absent.yaml"
    assert run_check(missing) == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == (
        "",
        f"{missing}:1:1: cannot read: No such file or directory\n{missing}: 1 error\n",
    )


def test_one_bad_file_fails_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("zones: {external: [wan0]}\n")
    bad.write_text("zones: {external: [wan0]\n")
    assert run_check(bad, good) == 1
    captured = capsys.readouterr()
    assert (
        timeless(captured.out)
        == f"{good}: OK (zones: 1, ingress rules: 0, egress rules: 0), 0 rules compiled in T\n"
    )
    assert captured.err == (
        f"{bad}:2:1: invalid YAML: expected ',' or '}}', but got '<stream end>' "
        f"(while parsing a flow mapping at line 1)\n{bad}: 1 error\n"
    )


def test_a_file_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        run_check()
    assert caught.value.code == 2
    assert "the following arguments are required: FILE" in capsys.readouterr().err


def test_ipv6_nat_is_checked_against_the_kernel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "six.yaml"
    policy.write_text(
        "zones:\n  external: [wan0]\n  internal: {interfaces: [lan0], networks: ['fd00::/64']}\n"
        "nat:\n  masquerade:\n    - {out: wan0, family: ipv6}\n"
        "  forward:\n    - {name: web6, proto: tcp, ports: 443, to: 'fd00::80'}\n"
    )
    monkeypatch.setattr(Iptables, "ipv6_nat_missing", lambda self: "no IPv6 nat table in this kernel")
    assert run_check(policy) == 1
    assert capsys.readouterr().err == (
        f"{policy}:6:7: nat: masquerade: IPv6 NAT is not available: no IPv6 nat table in this kernel\n"
        f"{policy}:8:7: nat: forward 'web6': IPv6 NAT is not available: no IPv6 nat table in this kernel\n"
        f"{policy}: 2 errors\n"
    )
    monkeypatch.setattr(Iptables, "ipv6_nat_missing", lambda self: None)
    assert run_check(policy) == 0
    assert timeless(capsys.readouterr().out) == (
        f"{policy}: OK (zones: 2, ingress rules: 0, egress rules: 0, nat: 1 masquerade, 1 forward), "
        "0 rules compiled in T\n"
    )


def test_antispoof_off_on_an_external_zone_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("zones: {external: [wan0], internal: [lan0]}\noptions:\n  antispoof: off\n")
    assert run_check(policy) == 0  # valid: a warning, not an error
    captured = capsys.readouterr()
    head = f"{policy}: OK (zones: 2, ingress rules: 0, egress rules: 0), 0 rules compiled in "
    assert captured.out.startswith(head) and re.fullmatch(r"\d+\.\d ms\n", captured.out[len(head) :])
    assert captured.err == (
        f"{policy}:3:14: warning: options: antispoof is off: packets with a forged source address "
        "(an inside host's, the gateway's own) from the external zone are not dropped\n"
    )
    for quiet in (
        "zones: {external: [], internal: [lan0]}\noptions: {antispoof: off}\n",
        "zones: {external: [wan0]}\noptions: {antispoof: loose}\n",
    ):
        policy.write_text(quiet)
        assert run_check(policy) == 0
        assert capsys.readouterr().err == ""
