"""What an operator sees of the daemon in the lab (conftest's `lab`): the JSON packet log
(`options: {log-format: json}`), `nfqfw top` in a real terminal (tmux), and `nfqfw status` as a
monitoring script uses it. Servers used: inside TCP 22 and 25."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nfqfw.lab import traffic
from nfqfw.lab.daemon_ctl import Lab
from nfqfw.lab.plan import LAN_V4, WAN_V4

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
WAIT = 10.0

LAB_POLICY = """\
zones: {external: [wan0], internal: [lan0]}
ingress:                    # defaults: ingress drop, egress accept, invalid drop
  - {name: mail, proto: tcp, to: 10.0.0.25, ports: [25], action: accept, log: true}
options:
  log-format: json
"""


def nfqfw(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "nfqfw", *args, "--runtime-dir", str(lab.state.runtime_dir)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)


def json_lines(lab: Lab) -> list[dict[str, Any]]:
    """The log's JSON objects (the lines before the policy was read are text)."""
    found = []
    for line in lab.state.log_file.read_text().splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def wait_for(lab: Lab, wanted: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for event in json_lines(lab):
            if all(event.get(key) == value for key, value in wanted.items()):
                return event
        time.sleep(0.2)
    pytest.fail(f"no log object with {wanted}; log:\n{lab.state.log_file.read_text()[-3000:]}")


def test_json_packet_log_of_a_rule_and_a_default(lab: Lab) -> None:
    t = lab.topology
    assert traffic.tcp_probe(t.wan, LAN_V4, 25).outcome == "connected"
    assert traffic.tcp_probe(t.wan, LAN_V4, 22, 1.0).outcome == "timeout"
    accepted = wait_for(lab, {"event_type": "flow_verdict", "rule": "mail"})
    assert {k: accepted[k] for k in ("src_ip", "dest_ip", "dest_port", "proto", "action", "reason")} == {
        "src_ip": WAN_V4,
        "dest_ip": LAN_V4,
        "dest_port": 25,
        "proto": "TCP",
        "action": "accept",
        "reason": "rule mail",
    }
    assert (accepted["hook"], accepted["in_iface"], accepted["out_iface"], accepted["ct_state"]) == (
        "FORWARD",
        "wan0",
        "lan0",
        "NEW",
    )
    assert isinstance(accepted["flow_id"], int) and isinstance(accepted["src_port"], int)
    assert accepted["timestamp"][:4].isdigit() and "T" in accepted["timestamp"]
    dropped = wait_for(lab, {"event_type": "flow_verdict", "dest_port": 22})
    assert (dropped["action"], dropped["reason"], dropped["rule"]) == ("drop", "default ingress", None)
    daemon = [e for e in json_lines(lab) if e["event_type"] == "daemon"]
    assert any("bound" in e["message"] for e in daemon), daemon  # its own messages are objects too
    assert all(e["logger"].startswith("nfqfw") and e["level"] in ("info", "warning") for e in daemon)


def test_status_for_monitoring_scripts(lab: Lab) -> None:
    done = nfqfw(lab, "status", "-q")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_top_once_has_rates_and_talkers(lab: Lab) -> None:
    assert traffic.tcp_probe(lab.topology.wan, LAN_V4, 25).outcome == "connected"
    done = nfqfw(lab, "top", "--once", "--interval", "0.5")
    assert done.returncode == 0, done.stderr
    screen = done.stdout.splitlines()
    assert screen[0].startswith("nfqfw top: pid ")
    assert "TOP TALKERS by flows (either end)" in screen
    talkers = screen[screen.index("TOP TALKERS by flows (either end)") + 1 :]
    assert any(line.split()[0] == LAN_V4 for line in talkers), screen


@pytest.fixture
def tmux() -> Iterator[list[str]]:
    """A private tmux server (its own socket: no other session is touched)."""
    base = ["tmux", "-L", f"nfqfw-test-{os.getpid()}", "-f", "/dev/null"]
    yield base
    subprocess.run([*base, "kill-server"], capture_output=True)


def test_top_in_a_terminal_refreshes_and_quits_on_q(lab: Lab, tmux: list[str]) -> None:
    t = lab.topology
    command = shlex.join([sys.executable, "-m", "nfqfw", "top", "--runtime-dir", str(lab.state.runtime_dir)])
    env = ["-e", f"PYTHONPATH={REPO}"]
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "top", "-x", "100", "-y", "40", *env, command], check=True
    )

    def screen() -> str:
        return subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True, text=True
        ).stdout

    def rate_of_mail(text: str) -> float | None:
        for line in text.splitlines():
            if line.split()[:3] == ["accept", "rule", "mail"] and line.split()[3] != "-":
                return float(line.split()[3])
        return None

    deadline = time.monotonic() + WAIT
    seen = ""
    while time.monotonic() < deadline:
        assert traffic.tcp_probe(t.wan, LAN_V4, 25).outcome == "connected"  # a new flow for rule mail
        seen = screen()
        rate = rate_of_mail(seen)
        if rate and "FLOWS by state" in seen and f"  {LAN_V4} " in seen:
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"no live rate for rule mail on the screen:\n{seen}")
    assert seen.splitlines()[0].startswith("nfqfw top: pid ")
    assert "queue 0: " in seen and "waiting" in seen
    subprocess.run([*tmux, "send-keys", "-t", "top", "q"], check=True)
    deadline = time.monotonic() + WAIT
    while subprocess.run([*tmux, "has-session", "-t", "top"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, f"nfqfw top did not quit on q:\n{screen()}"
        time.sleep(0.1)
