"""Restarts and crashes keep connections: namespaces nfqs-wan / nfqs-gw / nfqs-lan.

Live TCP sessions through the gateway (inside -> outside over IPv4 with NAT and over IPv6, and
an ingress one the policy allows) and one to the gateway itself (like an admin's SSH) are
opened before nfqfw stops or is killed and must carry data both ways once it is back. Strict
TCP pick-up is the default: a restarted nfqfw that restored nothing drops the next segment of
such a session as INVALID, which the corrupt-file test shows. Every test starts its own daemon
(its state directory is the lab's, kept between the stop and the start) and stops it and
removes its rules when done.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from lab_policies import MAIL_IN_NO_SMB_OUT

from nfqfw.core import snapshot
from nfqfw.core.conntrack import first_packet
from nfqfw.lab import daemon_ctl, traffic
from nfqfw.lab.daemon_ctl import Lab, LabState
from nfqfw.lab.plan import GW_LAN_V4, LAN_V4, WAN_V4, WAN_V6
from nfqfw.lab.topology import in_ns

pytestmark = pytest.mark.lab

PREFIX = "nfqs-"
WAN_ECHO, LAN_MAIL, GW_SSH = 80, 25, 22
BLOCKED_WAIT = 2.0  # seconds without an answer that count as "blocked"
BACK_WAIT = 30.0  # seconds for TCP to retransmit into the restarted daemon (RTO backoff)

POLICY = MAIL_IN_NO_SMB_OUT


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with ExitStack() as stack:
        stack.callback(daemon_ctl.down, PREFIX)  # also when up() or a server fails
        the_lab = daemon_ctl.up(PREFIX)
        t = the_lab.topology
        stack.enter_context(traffic.TcpServer(t.wan, [WAN_ECHO]))
        stack.enter_context(traffic.TcpServer(t.lan, [LAN_MAIL]))
        stack.enter_context(traffic.TcpServer(t.gw, [GW_SSH]))  # an admin's session to the gateway
        yield the_lab


@pytest.fixture
def policy(lab: Lab, tmp_path: Path) -> Iterator[Path]:
    """The policy file; when the test ends the daemon is stopped, its rules and snapshot removed."""
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    path.chmod(0o600)
    try:
        yield path
    finally:
        daemon_ctl.stop_daemon(PREFIX)
        argv = in_ns(lab.topology.gw, sys.executable, "-m", "nfqfw", "rules", "remove")
        removed = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert removed.returncode == 0, removed.stderr
        for name in ("flows.snapshot", "flows.snapshot.bad"):
            (LabState(PREFIX).state_dir / name).unlink(missing_ok=True)


@pytest.fixture
def sessions(lab: Lab, policy: Path) -> Iterator[dict[str, socket.socket]]:
    """Closed when the test ends: opened by the test through `open_sessions`."""
    opened: dict[str, socket.socket] = {}
    yield opened
    for sock in opened.values():
        sock.close()


def open_sessions(lab: Lab, opened: dict[str, socket.socket]) -> None:
    t = lab.topology
    for name, (ns, host, port) in {
        "egress v4 (NAT)": (t.lan, WAN_V4, WAN_ECHO),
        "egress v6": (t.lan, WAN_V6, WAN_ECHO),
        "ingress v4 (rule mail)": (t.wan, LAN_V4, LAN_MAIL),
        "to the gateway (INPUT/OUTPUT)": (t.lan, GW_LAN_V4, GW_SSH),
    }.items():
        sock, greeting = traffic.open_connection(ns, host, port)
        assert greeting.startswith("hello"), (name, greeting)
        opened[name] = sock
        assert traffic.echo_roundtrip(sock, b"before\n") == b"before\n", name


def carries_data_both_ways(opened: dict[str, socket.socket], tag: bytes, rounds: int = 1) -> None:
    """A small exchange, then `rounds` of 64 KB each way (enough to move the windows along)."""
    for name, sock in opened.items():
        sock.settimeout(BACK_WAIT)
        for size in (16, *[65536] * rounds):
            data = (tag * size)[:size]
            assert traffic.echo_roundtrip(sock, data) == data, name


def log_since(offset: int) -> str:
    return LabState(PREFIX).log_file.read_text(errors="replace")[offset:]


def log_size() -> int:
    path = LabState(PREFIX).log_file
    return len(path.read_text(errors="replace")) if path.exists() else 0


def snapshot_ports() -> set[int]:
    """Client ports of the ESTABLISHED TCP flows in the lab daemon's snapshot (empty if none yet)."""
    try:
        data = (LabState(PREFIX).state_dir / "flows.snapshot").read_bytes()
        flows = snapshot.decode(data, 0.0, time.time()).flows
    except (FileNotFoundError, snapshot.SnapshotError):
        return set()
    firsts = [first_packet(flow) for flow in flows if flow.state_name == "ESTABLISHED"]
    return {pkt.sport for pkt in firsts if pkt is not None}


def local_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def assert_no_answer(opened: dict[str, socket.socket], data: bytes, why: str) -> None:
    """Each session sends `data`; no echo comes back within BLOCKED_WAIT."""
    for name, sock in opened.items():
        sock.sendall(data)
        sock.settimeout(BLOCKED_WAIT)
        with pytest.raises(TimeoutError):
            sock.recv(100)
            pytest.fail(f"{name}: an answer came through {why}")


def assert_blocked(lab: Lab, opened: dict[str, socket.socket]) -> None:
    """No nfqfw: the kernel drops what its rules queue (fail-closed), the sessions hear nothing."""
    assert_no_answer(opened, b"while down\n", "while nfqfw was down")
    t = lab.topology
    assert traffic.tcp_probe(t.lan, WAN_V4, WAN_ECHO, timeout=BLOCKED_WAIT).outcome == "timeout"
    assert traffic.tcp_probe(t.wan, LAN_V4, LAN_MAIL, timeout=BLOCKED_WAIT).outcome == "timeout"


def assert_caught_up(opened: dict[str, socket.socket]) -> None:
    """What was sent while nfqfw was down arrives once it is back (TCP retransmits it)."""
    for name, sock in opened.items():
        sock.settimeout(BACK_WAIT)
        assert _read(sock, len(b"while down\n")) == b"while down\n", name


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            break
        data += more
    return data


def test_sessions_survive_stop_and_start(lab: Lab, policy: Path, sessions: dict[str, socket.socket]) -> None:
    state = LabState(PREFIX)
    # No periodic snapshots: what the new daemon restores is what SIGTERM saved.
    extra = ("--snapshot-interval", "0")
    daemon_ctl.start_daemon(PREFIX, policy, args=extra)
    open_sessions(lab, sessions)
    offset = log_size()
    stopped = daemon_ctl.stop_daemon(PREFIX)
    assert stopped is not None and stopped.exit_code() == 0
    path = state.state_dir / "flows.snapshot"
    assert f"saved 4 flows to {path}" in log_since(offset)
    assert path.stat().st_mode & 0o777 == 0o600
    assert_blocked(lab, sessions)
    offset = log_size()
    daemon_ctl.start_daemon(PREFIX, policy, args=extra)
    added = log_since(offset)
    restored = re.search(
        r"restored 4 flows from (\S+) \(saved [\d.]+ s ago at a stop\): 0 had run out, 0 are not allowed",
        added,
    )
    assert restored is not None and restored.group(1) == str(path), added
    assert added.index("restored 4 flows") < added.index("queue 0 bound")  # before any packet came
    assert_caught_up(sessions)
    carries_data_both_ways(sessions, b"after restart ")


def test_after_kill_9_traffic_is_blocked_then_sessions_of_the_last_snapshot_continue(
    lab: Lab, policy: Path, sessions: dict[str, socket.socket]
) -> None:
    daemon = daemon_ctl.start_daemon(PREFIX, policy)  # periodic snapshots every 10 s, the default
    open_sessions(lab, sessions)
    wanted = {local_port(sock) for sock in sessions.values()}
    path = LabState(PREFIX).state_dir / "flows.snapshot"
    deadline = time.monotonic() + 60
    while not wanted <= snapshot_ports():
        assert time.monotonic() < deadline, "no periodic snapshot with the sessions in it"
        time.sleep(0.2)
    taken = path.read_bytes()
    # 1 MB each way after the snapshot, far beyond the windows it holds; the next one is 10 s away.
    carries_data_both_ways(sessions, b"after the snapshot ", rounds=16)
    daemon_ctl.stop_daemon(PREFIX, signal.SIGKILL)
    assert daemon.exit_code() == -signal.SIGKILL
    assert path.read_bytes() == taken, "a later snapshot came before the kill: the test proves less"
    assert_blocked(lab, sessions)
    offset = log_size()
    daemon_ctl.start_daemon(PREFIX, policy)
    assert re.search(
        r"restored 4 flows from \S+ \(saved [\d.]+ s ago while running; TCP windows are learnt anew\)",
        log_since(offset),
    ), log_since(offset)
    assert_caught_up(sessions)
    carries_data_both_ways(sessions, b"after kill -9 ")


def test_a_corrupt_snapshot_is_reported_and_the_daemon_starts_empty(
    lab: Lab, policy: Path, sessions: dict[str, socket.socket]
) -> None:
    daemon_ctl.start_daemon(PREFIX, policy)
    open_sessions(lab, sessions)
    daemon_ctl.stop_daemon(PREFIX)
    path = LabState(PREFIX).state_dir / "flows.snapshot"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    offset = log_size()
    daemon = daemon_ctl.start_daemon(PREFIX, policy)
    added = log_since(offset)
    assert (
        f"flow snapshot {path} ignored: checksum mismatch (moved to {path}.bad); "
        "starting with an empty flow table" in added
    ), added
    assert daemon.alive()
    t = lab.topology
    assert traffic.tcp_probe(t.lan, WAN_V4, WAN_ECHO).outcome == "connected"  # filtering as usual
    # Nothing restored: with strict pick-up the old sessions' next segments are INVALID.
    assert_no_answer(sessions, b"lost?\n", "without the session's flow")
    offset = log_size()
    os.kill(daemon.pid, signal.SIGUSR1)  # the counters to the log
    deadline = time.monotonic() + 10
    pickup = "verdicts drop invalid: tcp: ACK without a connection (mid-stream pick-up disabled)"
    while pickup not in log_since(offset):
        assert time.monotonic() < deadline, log_since(offset)
        time.sleep(0.1)
