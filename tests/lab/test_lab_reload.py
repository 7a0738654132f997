"""Live reload (SIGHUP) in the lab: namespaces nfqr-wan / nfqr-gw / nfqr-lan.

The module's tests run in order on one daemon: a valid reload keeps a live session, a broken
policy file is refused (daemon up, old policy in force), and a reload that forbids the session's
port cuts it (reload: recheck removes the flow; the client's next segment is dropped as INVALID).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from nfqfw.lab import traffic
from nfqfw.lab.daemon_ctl import Lab, down, up
from nfqfw.lab.plan import LAN_V4, WAN_V4

pytestmark = pytest.mark.lab

PREFIX = "nfqr-"
WAN_ECHO, LAN_MAIL = 80, 25
LabAndPolicy = tuple[Lab, Path]
RELOAD_WAIT = 10.0  # seconds for the daemon to log the outcome of a reload

POLICY = """\
zones:
  external: [wan0]
  internal: [lan0]
defaults:
  ingress: drop
  egress: accept
  invalid: drop
ingress:
  - name: mail
    proto: tcp
    to: [10.0.0.25, fd00::25]
    ports: [25]
    action: accept
egress:
  - name: no-smb-out
    proto: tcp
    ports: [445]
    action: reject
"""
VALID_CHANGE = POLICY.replace("ports: [445]", "ports: [445, 139]")  # unrelated to the session
BROKEN = POLICY.replace("ingress: drop", "ingress: perhaps")
NO_HTTP_OUT = POLICY + "  - name: no-http-out\n    proto: tcp\n    ports: [80]\n    action: drop\n"


@pytest.fixture(scope="module")
def reload_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Path]]:
    policy = tmp_path_factory.mktemp("reload") / "policy.yaml"
    write_policy(policy, POLICY)
    with ExitStack() as stack:
        stack.callback(down, PREFIX)  # also when up() or a server fails
        lab = up(PREFIX, policy)
        t = lab.topology
        stack.enter_context(traffic.TcpServer(t.wan, [WAN_ECHO]))
        stack.enter_context(traffic.TcpServer(t.lan, [LAN_MAIL]))
        yield lab, policy


@pytest.fixture(scope="module")
def session(reload_lab: tuple[Lab, Path]) -> Iterator[socket.socket]:
    """One TCP session lan -> wan:80 (echo) kept open across the module's reloads."""
    lab, _ = reload_lab
    sock, greeting = traffic.open_connection(lab.topology.lan, WAN_V4, WAN_ECHO)
    assert greeting.startswith("hello")
    yield sock
    sock.close()


def write_policy(path: Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, 0o600)


def outcomes(lab: Lab) -> int:
    text = lab.state.log_file.read_text(errors="replace")
    return text.count("policy reloaded") + text.count("reload failed")


def sighup_and_wait(lab: Lab) -> str:
    """SIGHUP the daemon (pid from the lab's pid file) and return the log text the reload added."""
    before_text = lab.state.log_file.read_text(errors="replace")
    before = outcomes(lab)
    pid = int(lab.state.pid_file.read_text().split()[0])
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + RELOAD_WAIT
    while outcomes(lab) == before:
        assert time.monotonic() < deadline, "the daemon never logged the reload"
        time.sleep(0.05)
    return lab.state.log_file.read_text(errors="replace")[len(before_text) :]


def test_live_session_survives_a_valid_reload(reload_lab: LabAndPolicy, session: socket.socket) -> None:
    lab, policy = reload_lab
    assert traffic.echo_roundtrip(session, b"before\n") == b"before\n"
    write_policy(policy, VALID_CHANGE)
    added = sighup_and_wait(lab)
    assert "policy reloaded: 0 flows no longer allowed were removed" in added
    assert traffic.echo_roundtrip(session, b"after valid reload\n") == b"after valid reload\n"


def test_broken_reload_keeps_the_old_policy(reload_lab: LabAndPolicy, session: socket.socket) -> None:
    lab, policy = reload_lab
    write_policy(policy, BROKEN)
    added = sighup_and_wait(lab)
    assert "reload failed: the running policy stays in force" in added
    assert "ERROR" in added and "perhaps" in added
    assert lab.daemon is not None and lab.daemon.alive()
    assert traffic.echo_roundtrip(session, b"after broken reload\n") == b"after broken reload\n"
    probe = traffic.tcp_probe(lab.topology.wan, LAN_V4, LAN_MAIL)  # the old policy's ingress rule
    assert probe.outcome == "connected"


def test_group_writable_policy_is_refused_on_reload(reload_lab: LabAndPolicy, session: socket.socket) -> None:
    lab, policy = reload_lab
    write_policy(policy, NO_HTTP_OUT)
    os.chmod(policy, 0o664)
    added = sighup_and_wait(lab)
    assert f"{policy}: refusing a policy file writable by group or others (mode 0664)" in added
    assert traffic.echo_roundtrip(session, b"still here\n") == b"still here\n"


def test_reload_that_forbids_the_session_cuts_it(reload_lab: LabAndPolicy, session: socket.socket) -> None:
    lab, policy = reload_lab
    write_policy(policy, NO_HTTP_OUT)
    added = sighup_and_wait(lab)
    assert "policy reloaded: 1 flows no longer allowed were removed" in added
    session.settimeout(2.0)
    with pytest.raises(TimeoutError):
        traffic.echo_roundtrip(session, b"cut?\n")
    assert traffic.tcp_probe(lab.topology.lan, WAN_V4, WAN_ECHO, timeout=1.5).outcome == "timeout"
    assert lab.daemon is not None and lab.daemon.alive()


def test_reload_keep_leaves_a_now_forbidden_session_up(reload_lab: LabAndPolicy) -> None:
    lab, policy = reload_lab
    write_policy(policy, POLICY)
    assert "policy reloaded" in sighup_and_wait(lab)
    sock, _ = traffic.open_connection(lab.topology.lan, WAN_V4, WAN_ECHO)
    with sock:
        write_policy(policy, NO_HTTP_OUT + "options:\n  reload: keep\n")
        assert "policy reloaded: existing flows kept (reload: keep)" in sighup_and_wait(lab)
        assert traffic.echo_roundtrip(sock, b"kept\n") == b"kept\n"
        assert traffic.tcp_probe(lab.topology.lan, WAN_V4, WAN_ECHO, timeout=1.5).outcome == "timeout"
