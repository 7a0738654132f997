"""What happens to traffic when nfqfw stops or dies, and `nfqfw rules remove`.

One lab for the module without a daemon; every test starts its own `nfqfw run` in the gateway
and, when done, stops it and removes its rules, so the next test starts from a clean gateway.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lab_policies import MAIL_IN_NO_SMB_OUT

from nfqfw.lab import daemon_ctl, traffic
from nfqfw.lab.daemon_ctl import Daemon, Lab
from nfqfw.lab.plan import LAN_V4, LAN_V6, WAN_V4, WAN_V6
from nfqfw.lab.topology import in_ns, process_alive, run_in

pytestmark = pytest.mark.lab

LAB_POLICY = None  # each test starts nfqfw itself

POLICY = MAIL_IN_NO_SMB_OUT
FAIL_OPEN = POLICY + "options:\n  failure-mode: open\n"

DROP_WAIT = 1.5
PREFIX = "nfqt-"


def nfqfw_in_gateway(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    argv = in_ns(lab.topology.gw, sys.executable, "-m", "nfqfw", *args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.fixture
def start(lab: Lab, tmp_path: Path) -> Iterator[Callable[[str], Daemon]]:
    """start(policy_text) runs nfqfw in the gateway until the test ends."""

    def start_with(text: str) -> Daemon:
        # A test before may have left neighbour entries FAILED while nothing served the queue
        # (ND to and from the gateway is queued too): the next connect would fail at once.
        for ns in lab.topology.namespaces:
            run_in(ns, "ip", "neigh", "flush", "all")
            run_in(ns, "ip", "-6", "neigh", "flush", "all")
        policy = tmp_path / "policy.yaml"
        policy.write_text(text)
        return daemon_ctl.start_daemon(PREFIX, policy)

    try:
        yield start_with
    finally:
        daemon_ctl.stop_daemon(PREFIX)
        removed = nfqfw_in_gateway(lab, "rules", "remove")
        assert removed.returncode == 0, removed.stderr


def ruleset(lab: Lab) -> dict[str, list[str]]:
    """Every table of the gateway, IPv4 and IPv6, without comments and packet counters."""
    found = {}
    for tool in ("iptables-save", "ip6tables-save"):
        text = run_in(lab.topology.gw, tool)
        found[tool] = [
            re.sub(r" \[\d+:\d+\]$", "", line) for line in text.splitlines() if not line.startswith("#")
        ]
    return found


def test_sigterm_stops_with_exit_code_0_and_traffic_stays_blocked(
    lab: Lab, start: Callable[[str], Daemon]
) -> None:
    t = lab.topology
    daemon = start(POLICY)
    assert traffic.tcp_probe(t.lan, WAN_V4, 80).outcome == "connected"
    stopped = daemon_ctl.stop_daemon(PREFIX)
    assert stopped is daemon and daemon.exit_code() == 0
    # Fail-closed: nfqfw's rules stay, nobody reads the queue, the kernel drops.
    for server in (WAN_V4, WAN_V6):
        assert traffic.tcp_probe(t.lan, server, 80, timeout=DROP_WAIT).outcome == "timeout"


def test_killed_daemon_fails_closed(lab: Lab, start: Callable[[str], Daemon]) -> None:
    t = lab.topology
    daemon = start(POLICY)
    assert traffic.tcp_probe(t.lan, WAN_V6, 80).outcome == "connected"
    assert traffic.tcp_probe(t.wan, LAN_V4, 25).outcome == "connected"
    daemon_ctl.stop_daemon(PREFIX, signal.SIGKILL)
    assert daemon.exit_code() == -signal.SIGKILL
    for server in (WAN_V4, WAN_V6):
        assert traffic.tcp_probe(t.lan, server, 80, timeout=DROP_WAIT).outcome == "timeout"
        assert traffic.udp_probe(t.lan, server, 53, timeout=DROP_WAIT).outcome == "timeout"
        assert traffic.ping(t.lan, server, wait=1).returncode == 1
    assert (
        traffic.tcp_probe(t.wan, LAN_V4, 25, timeout=DROP_WAIT).outcome == "timeout"
    )  # even what the policy allows


def test_killed_daemon_with_failure_mode_open_lets_traffic_pass(
    lab: Lab, start: Callable[[str], Daemon]
) -> None:
    t = lab.topology
    daemon = start(FAIL_OPEN)
    # While it runs, the policy applies.
    assert traffic.tcp_probe(t.lan, WAN_V4, 445, timeout=3).outcome == "refused"
    assert traffic.tcp_probe(t.wan, LAN_V4, 22, timeout=DROP_WAIT).outcome == "timeout"
    daemon_ctl.stop_daemon(PREFIX, signal.SIGKILL)
    assert daemon.exit_code() == -signal.SIGKILL
    # Down: everything passes, unfiltered (that is what "open" means).
    for server, inside in ((WAN_V4, LAN_V4), (WAN_V6, LAN_V6)):
        assert traffic.tcp_probe(t.lan, server, 80).outcome == "connected"
        assert traffic.tcp_probe(t.lan, server, 445).outcome == "connected"
        assert traffic.udp_probe(t.lan, server, 53).outcome == "reply"
        assert traffic.tcp_probe(t.wan, inside, 22).outcome == "connected"


def test_rules_remove_leaves_the_gateways_other_rules_untouched(
    lab: Lab, start: Callable[[str], Daemon]
) -> None:
    t = lab.topology
    admin_rules = [
        ("iptables", "-A", "INPUT", "-p", "tcp", "--dport", "2222", "-j", "ACCEPT"),
        (
            "iptables",
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-p",
            "udp",
            "--dport",
            "5353",
            "-j",
            "MARK",
            "--set-mark",
            "7",
        ),
        ("ip6tables", "-A", "FORWARD", "-p", "udp", "--dport", "5353", "-j", "DROP"),
    ]
    for rule in admin_rules:
        run_in(t.gw, rule[0], "-w", *rule[1:])
    try:
        before = ruleset(lab)
        assert "-A POSTROUTING -s 10.0.0.0/24 -o wan0 -j MASQUERADE" in before["iptables-save"]
        start(POLICY)
        daemon_ctl.stop_daemon(PREFIX)
        assert ruleset(lab) != before  # nfqfw's chains stay after a stop (fail-closed)
        removed = nfqfw_in_gateway(lab, "rules", "remove")
        assert (removed.returncode, removed.stdout) == (0, "removed nfqfw rules for IPv4 and IPv6\n")
        assert ruleset(lab) == before
        assert traffic.tcp_probe(t.wan, LAN_V4, 22).outcome == "connected"  # no nfqfw in the path
        again = nfqfw_in_gateway(lab, "rules", "remove")
        assert (again.returncode, again.stdout) == (0, "no nfqfw rules to remove\n")
    finally:
        for rule in admin_rules:
            run_in(t.gw, rule[0], "-w", *[("-D" if word == "-A" else word) for word in rule[1:]])


def test_stop_daemon_is_idempotent(lab: Lab, start: Callable[[str], Daemon]) -> None:
    daemon = start(POLICY)
    assert daemon_ctl.running_daemon(PREFIX) is daemon
    assert Path(f"/run/nfqfw-lab/{PREFIX}/daemon.pid").read_text() == f"{daemon.pid}\n"
    stopped = daemon_ctl.stop_daemon(PREFIX)
    assert stopped is daemon and daemon.exit_code() == 0
    assert daemon_ctl.running_daemon(PREFIX) is None
    assert daemon_ctl.stop_daemon(PREFIX) is None  # idempotent
    assert not Path(f"/run/nfqfw-lab/{PREFIX}/daemon.pid").exists()


def test_lab_commands_up_and_down(tmp_path: Path) -> None:
    """`nfqfw lab up` leaves nfqfw running after it exits; `nfqfw lab down` finds it by its pid file."""
    prefix = "nfqt-cli-"
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)

    def lab_command(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "nfqfw", "lab", *args, "--prefix", prefix]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    try:
        up = lab_command("up", "--policy", str(policy))
        assert up.returncode == 0, up.stderr
        pid = int(Path(f"/run/nfqfw-lab/{prefix}/daemon.pid").read_text())
        assert f"nfqfw run is filtering in nfqt-cli-gw (pid {pid})" in up.stdout
        assert traffic.tcp_probe("nfqt-cli-wan", LAN_V4, 22, timeout=DROP_WAIT).outcome == "timeout"
        assert (
            traffic.tcp_probe("nfqt-cli-wan", LAN_V4, 25, timeout=DROP_WAIT).outcome == "refused"
        )  # no server
        down = lab_command("down")
        assert (down.returncode, down.stdout.splitlines()[0]) == (
            0,
            "removed: nfqfw daemon, nfqt-cli-wan, nfqt-cli-gw, nfqt-cli-lan",
        )
        assert not process_alive(pid)
        again = lab_command("down")
        assert (again.returncode, again.stdout.splitlines()[0]) == (
            0,
            "no lab with prefix 'nfqt-cli-' (nothing to do)",
        )
    finally:
        daemon_ctl.down(prefix)


def test_lab_up_passes_run_options_after_a_double_dash(tmp_path: Path) -> None:
    """`nfqfw lab up -p F -- --queue-balance 0:1 --workers`: try the workers in the lab."""
    prefix = "nfqt-clio-"
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    runtime = f"/run/nfqfw-lab/{prefix}"
    nfqfw = [sys.executable, "-m", "nfqfw"]
    argv = [*nfqfw, "lab", "up", "--policy", str(policy), "--prefix", prefix, "--"]
    try:
        up = subprocess.run(
            [*argv, "--queue-balance", "0:1", "--workers"], capture_output=True, text=True, timeout=120
        )
        assert up.returncode == 0, up.stderr
        status = subprocess.run(
            [*nfqfw, "status", "--runtime-dir", runtime], capture_output=True, text=True, timeout=30
        )
        assert "queue:        0:1, failure mode closed" in status.stdout, status.stdout
        assert "workers:      2, one per queue" in status.stdout, status.stdout
    finally:
        daemon_ctl.down(prefix)
