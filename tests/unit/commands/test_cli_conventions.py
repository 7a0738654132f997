"""The CLI's conventions: --json on every command that prints a result, the exit codes (0 ok,
1 failure, 2 usage, 3 no daemon answers), `status --quiet` for monitoring scripts. The control
commands talk to a stand-in daemon: a real ControlServer on a real socket, in a thread."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nfqfw import cli
from nfqfw.commands import EXIT_FAILURE, EXIT_NO_DAEMON, EXIT_OK, EXIT_USAGE
from nfqfw.commands.rules import rules_by_family
from nfqfw.control.protocol import RequestError, encode
from nfqfw.control.server import ControlServer

# Commands that print no single result: the daemon itself, the lab, top (a live view), and
# replay (one JSON line per packet already).
NO_RESULT = {"run", "lab", "top", "replay"}

ANSWERS: dict[str, Any] = {
    "status": {"version": "0.1.0", "pid": 1},
    "flush": {"removed": 2, "tracked": 5},
    "panic": {"panic": True, "changed": True},
    "reload": {"time": 0.0, "trigger": "control request", "ok": False, "errors": ["p.yaml:1:1: bad"]},
}


@pytest.fixture
def daemon() -> Iterator[Path]:
    """A runtime directory where a stand-in daemon answers ANSWERS (other commands: an error)."""
    directory = Path(tempfile.mkdtemp(prefix="nfqcli"))

    def handle(request: dict[str, Any]) -> Iterator[bytes]:
        if request["cmd"] not in ANSWERS:
            raise RequestError(f"not here: {request['cmd']}")
        return iter([encode({"ok": True, "result": ANSWERS[request["cmd"]]})])

    server = ControlServer.open(directory, handle, clock=time.monotonic)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            server.service()
            time.sleep(0.002)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield directory
    stop.set()
    thread.join()
    server.close()
    shutil.rmtree(directory, ignore_errors=True)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(words, parser) of every leaf command: `rules show`, `status`, ..."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommands(sub, (*path, name))
            return
    yield path, parser


def test_every_command_that_prints_a_result_has_json() -> None:
    leaves = dict(subcommands(cli.build_parser()))
    missing = [
        " ".join(words)
        for words, parser in leaves.items()
        if words[0] not in NO_RESULT and "--json" not in parser._option_string_actions
    ]
    assert ("rules", "show") in leaves and ("status",) in leaves
    assert missing == []


@pytest.mark.parametrize(
    "command", [["status"], ["flows"], ["flush"], ["panic", "on"], ["panic", "off"], ["reload"]]
)
def test_no_daemon_is_exit_code_3(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    empty = tempfile.mkdtemp(prefix="nfqcli")
    try:
        code, out, err = run([*command, "--json", "--runtime-dir", empty], capsys)
    finally:
        shutil.rmtree(empty)
    assert (code, out) == (EXIT_NO_DAEMON, "")
    assert err.startswith(f"nfqfw {command[0]}: no nfqfw daemon at {empty}/control.sock")


def test_an_error_answer_is_exit_code_1(daemon: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["flows", "--runtime-dir", str(daemon)], capsys) == (
        EXIT_FAILURE,
        "",
        "nfqfw flows: not here: flows\n",
    )


def test_status_quiet_and_json(daemon: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["status", "-q", "--runtime-dir", str(daemon)], capsys) == (EXIT_OK, "", "")
    code, out, _ = run(["status", "--json", "--runtime-dir", str(daemon)], capsys)
    assert (code, json.loads(out)) == (EXIT_OK, ANSWERS["status"])
    with pytest.raises(SystemExit) as done:
        cli.main(["status", "-q", "--json"])
    assert done.value.code == EXIT_USAGE


@pytest.mark.parametrize(
    ("argv", "code", "answer"),
    [
        (["flush", "--proto", "tcp"], EXIT_OK, "flush"),
        (["panic", "on"], EXIT_OK, "panic"),
        (["reload"], EXIT_FAILURE, "reload"),  # the refused reload is still printed, as JSON
    ],
)
def test_control_commands_print_the_answer_as_json(
    daemon: Path, argv: list[str], code: int, answer: str, capsys: pytest.CaptureFixture[str]
) -> None:
    got, out, err = run([*argv, "--json", "--runtime-dir", str(daemon)], capsys)
    assert (got, json.loads(out), err) == (code, ANSWERS[answer], "")


def test_check_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("zones: {external: [wan0], internal: [lan0]}\ningress: [{name: a, action: accept}]\n")
    bad.write_text("zones: {external: [wan0]}\ndefaults: {ingress: perhaps}\n")
    code, out, err = run(["check", "--json", str(good), str(bad)], capsys)
    assert (code, err) == (EXIT_FAILURE, "")
    results = json.loads(out)
    seconds = results[0].pop("compile_seconds")
    assert isinstance(seconds, float) and 0 <= seconds < 10
    assert results == [
        {
            "file": str(good),
            "ok": True,
            "zones": 2,
            "ingress_rules": 1,
            "egress_rules": 0,
            "between_rules": 0,
            "rules": 1,
            "masquerade": 0,
            "snat": 0,
            "forwards": 0,
            "sets": 0,
            "set_networks": 0,
            "files": 1,
            "warnings": [],
        },
        {
            "file": str(bad),
            "ok": False,
            "errors": [
                {
                    "file": str(bad),
                    "line": 2,
                    "col": 21,
                    "message": "defaults: ingress: expected accept, drop or reject, got 'perhaps'",
                }
            ],
        },
    ]
    assert run(["check", "--json", str(good)], capsys)[0] == EXIT_OK


def test_explain_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "zones: {external: [wan0], internal: [lan0]}\n"
        "ingress: [{name: mail, proto: tcp, ports: [25], action: reject}]\n"
    )
    argv = ["explain", "--json", "--config", str(policy), "--in", "wan0", "tcp", "192.0.2.1", "10.0.0.25:25"]
    code, out, _ = run(argv, capsys)
    assert (code, json.loads(out)) == (
        EXIT_OK,
        {
            "verdict": "reject",
            "conntrack": "new",
            "decided_by": "rule mail",
            "why": "rule mail",
            "reject_with": "tcp-reset",
            "hook": "FORWARD",
            "forwarded": None,
            "zones": {"from": "external", "to": "-", "side": "ingress"},  # no networks: no route
            "source_nat": None,
            "rule": {
                "name": "mail",
                "at": f"{policy}:2",
                "match": "reject tcp ports 25 (smtp)",
                "comment": None,
                "sets": [],
            },
        },
    )


def test_rules_show_json_reads_the_show_text() -> None:
    text = (
        "# IPv4 (iptables-save -t filter)\n-N NFQFW-INPUT\n-A INPUT -j NFQFW-INPUT\n"
        "# IPv6 (ip6tables-save -t filter)\n# (no nfqfw rules)\n"
    )
    assert rules_by_family(text) == {"ipv4": ["-N NFQFW-INPUT", "-A INPUT -j NFQFW-INPUT"], "ipv6": []}


def test_usage_errors_are_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["flows", "--state", "NOPE"])
    assert done.value.code == EXIT_USAGE
    assert cli.main([]) == EXIT_USAGE
    capsys.readouterr()
