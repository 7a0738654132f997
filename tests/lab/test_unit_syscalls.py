"""The systemd unit's system-call filter fits the daemon: a real `nfqfw run` is traced with
strace through its whole life in the lab (start-up with iptables-restore, accepted, dropped and
rejected traffic, reloads, a failure-mode change that re-installs the rules, the counter dump,
stop), and every system call it or its children made must be allowed by the unit's
SystemCallFilter= lines, as systemd-analyze expands them.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab_policies import MAIL_IN_NO_SMB_OUT

from nfqfw.control.client import call
from nfqfw.lab import daemon_ctl, traffic
from nfqfw.lab.daemon_ctl import Lab
from nfqfw.lab.plan import GW_WAN_V4, LAN_V4, WAN_V4, WAN_V6

pytestmark = pytest.mark.lab

PREFIX = "nfqu-"
UNIT = Path(__file__).resolve().parents[2] / "systemd/nfqfw.service"
POLICY = MAIL_IN_NO_SMB_OUT
FAIL_OPEN = POLICY + "options:\n  failure-mode: open\n"
CONTROL_REQUESTS = (
    {"cmd": "status"},
    {"cmd": "flows", "addr": "10.0.0.0/24"},
    {"cmd": "flush", "proto": "udp"},
    {"cmd": "panic", "on": True},
    {"cmd": "panic", "on": False},
    {"cmd": "reload"},
)
SYSCALL_LINE = re.compile(r"^\d+\s+([a-z_0-9]+)\(")


@functools.cache
def expand(group: str) -> frozenset[str]:
    """The system calls of a systemd syscall group (nested groups expanded) or a single call."""
    if not group.startswith("@"):
        return frozenset({group})
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", group], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    names: set[str] = set()
    for line in listing.splitlines()[1:]:  # the first line is the group's own name
        word = line.strip()
        if word and not word.startswith("#"):
            names |= expand(word)
    return frozenset(names)


def unit_allows() -> frozenset[str]:
    """What the unit's SystemCallFilter= lines allow: the allow lists minus the ~deny lists."""
    allowed: set[str] = set()
    denied: set[str] = set()
    for line in UNIT.read_text().splitlines():
        if not line.startswith("SystemCallFilter="):
            continue
        value = line.partition("=")[2]
        target = denied if value.startswith("~") else allowed
        for word in value.lstrip("~").split():
            target |= expand(word)
    assert allowed, "the unit has no SystemCallFilter= allow list"
    return frozenset(allowed - denied)


def traced_calls(trace: Path) -> set[str]:
    calls = set()
    for line in trace.read_text().splitlines():
        match = SYSCALL_LINE.match(line)
        if match:
            calls.add(match.group(1))
    return calls


@pytest.fixture(scope="module")
def bare_lab() -> Iterator[Lab]:
    try:
        yield daemon_ctl.up(PREFIX, None)
    finally:
        daemon_ctl.down(PREFIX)


def wait_for_log(log: Path, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not in {daemon_ctl.log_tail(log)}"
        time.sleep(0.05)


def the_traced_daemon(strace_pid: int) -> int:
    children = Path(f"/proc/{strace_pid}/task/{strace_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_daemon_stays_within_the_units_syscall_filter(bare_lab: Lab, tmp_path: Path) -> None:
    assert shutil.which("strace"), "strace is missing (make bootstrap installs it)"
    t = bare_lab.topology
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    policy.chmod(0o600)
    trace = tmp_path / "strace.out"
    wrapper = ("strace", "-f", "-qq", "-o", str(trace))
    # The exporter thread's calls count too, and a periodic flow snapshot's writer thread (each second).
    extra = ("--metrics", "127.0.0.1:9469", "--snapshot-interval", "1")
    started = daemon_ctl.start_daemon(PREFIX, policy, wrapper=wrapper, args=extra)
    try:
        pid = the_traced_daemon(started.pid)
        with traffic.TcpServer(t.wan, [80, 445]):
            assert traffic.tcp_probe(t.lan, WAN_V4, 80).outcome == "connected"
            assert traffic.tcp_probe(t.lan, WAN_V4, 445).outcome == "refused"  # our RST, raw socket
            assert traffic.tcp_probe(t.wan, LAN_V4, 22, timeout=1.0).outcome == "timeout"
            assert traffic.ping(t.lan, WAN_V6).returncode == 0
            assert traffic.ping(t.wan, GW_WAN_V4, wait=1.0).returncode == 1  # no answer
        with (
            traffic.entered(t.gw),
            urllib.request.urlopen("http://127.0.0.1:9469/metrics", timeout=10) as page,
        ):
            assert b'nfqfw_verdicts_total{action="reject",reason="rule",rule="no-smb-out"} 1.0' in page.read()
        snapshot = bare_lab.state.state_dir / "flows.snapshot"
        deadline = time.monotonic() + 30
        while not snapshot.exists():
            assert time.monotonic() < deadline, "no periodic flow snapshot"
            time.sleep(0.1)
        os.kill(pid, signal.SIGHUP)
        wait_for_log(started.log_file, "policy reloaded")
        policy.write_text(FAIL_OPEN)
        os.kill(pid, signal.SIGHUP)
        wait_for_log(started.log_file, "failure mode now open")
        os.kill(pid, signal.SIGUSR1)
        wait_for_log(started.log_file, "adapter reject sent: 1")
        for request in CONTROL_REQUESTS:  # the control socket: nfqfw status, flows, flush, panic, reload
            call(bare_lab.state.runtime_dir, request)
        os.kill(pid, signal.SIGTERM)
        assert started.process is not None
        assert started.process.wait(timeout=30) == 0
        wait_for_log(started.log_file, "stopped; kernel rules left in place")
    finally:
        daemon_ctl.stop_daemon(PREFIX, signal.SIGKILL)
    calls = traced_calls(trace)
    assert {"execve", "bind", "sendto", "recvmsg", "wait4", "accept4"} <= calls  # saw the whole life
    assert sorted(calls - unit_allows()) == []
