"""The control socket in the lab (conftest's `lab`): `nfqfw status`, `flows`, `flush`, `panic`
and `reload` run as commands in the root namespace and reach the daemon in the gateway namespace
through /run/nfqfw-lab/PREFIX/control.sock (a Unix socket path crosses network namespaces). The
module's tests run in order on one daemon. Servers used: outside TCP 80 (echo), inside TCP
25.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nfqfw.control.client import ClientError, call
from nfqfw.lab import traffic
from nfqfw.lab.daemon_ctl import Lab, running_daemon, start_daemon, stop_daemon
from nfqfw.lab.plan import GW_LAN_V4, LAN_V4, WAN_V4
from nfqfw.lab.topology import in_ns

pytestmark = pytest.mark.lab

WAN_ECHO, LAN_MAIL, IPERF = 80, 25, 5201
REPO = Path(__file__).resolve().parents[2]
BLOCKED = 2.0  # seconds a probe waits before calling the path blocked

LAB_POLICY = POLICY = """\
zones: {external: [wan0], internal: [lan0]}
defaults: {ingress: drop, egress: drop, invalid: drop}
ingress:
  - name: mail
    proto: tcp
    to: [10.0.0.25]
    ports: [25]
    action: accept
egress:
  - name: web
    proto: tcp
    ports: [80]
    action: accept
  - name: iperf
    proto: [tcp, udp]
    ports: [5201]
    action: accept
  - name: ping
    proto: icmp
    action: accept
"""
BROKEN = POLICY.replace("ingress: drop", "ingress: perhaps")


def write_policy(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


def nfqfw(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """An nfqfw command in the root namespace, pointed at the lab daemon's runtime directory."""
    argv = [sys.executable, "-m", "nfqfw", *args, "--runtime-dir", str(lab.state.runtime_dir)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)


def as_json(lab: Lab, *args: str) -> Any:
    done = nfqfw(lab, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        more = sock.recv(4096)
        assert more, "the connection closed"
        data += more
    return data


def session(lab: Lab) -> socket.socket:
    """A live TCP session inside -> outside:80 (echo), its first roundtrip done."""
    sock, greeting = traffic.open_connection(lab.topology.lan, WAN_V4, WAN_ECHO)
    assert greeting.startswith("hello")
    assert traffic.echo_roundtrip(sock, b"first\n") == b"first\n"
    return sock


def blocked(sock: socket.socket, data: bytes) -> bool:
    """Does `data` on the echo session go unanswered for BLOCKED seconds?"""
    sock.settimeout(BLOCKED)
    try:
        sock.sendall(data)
        read_line(sock)
    except TimeoutError:
        return True
    return False


def test_no_daemon_is_one_clear_line(lab: Lab) -> None:
    argv = [sys.executable, "-m", "nfqfw", "status", "--runtime-dir", "/run/nfqfw-lab/nfqc-none"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (
        3,  # EXIT_NO_DAEMON: not running
        "",
        "nfqfw status: no nfqfw daemon at /run/nfqfw-lab/nfqc-none/control.sock (is it running?)\n",
    )


def test_status_and_flows_show_a_live_session(lab: Lab, lab_policy: Path) -> None:
    the_lab, policy = lab, lab_policy
    with session(the_lab) as sock:
        sport = sock.getsockname()[1]
        flows = as_json(the_lab, "flows", "--proto", "tcp")["flows"]
        assert len(flows) == 1
        flow = flows[0]
        assert 431000 < flow.pop("timeout") <= 432000  # ESTABLISHED: 5 days
        assert flow.pop("age") < 60
        assert flow == {
            "proto": "tcp", "protonum": 6, "state": "ESTABLISHED", "family": 4,
            "src": LAN_V4, "dst": WAN_V4, "sport": sport, "dport": WAN_ECHO,
            "replied": True, "assured": True, "admitted_by": "rule web", "in": "lan0", "out": "wan0",
        }  # fmt: skip
        text = nfqfw(the_lab, "flows", "--addr", "10.0.0.0/24", "--state", "established")
        assert text.returncode == 0, text.stderr
        assert re.fullmatch(
            rf"tcp      6 43\d{{4}} ESTABLISHED src={LAN_V4} dst={WAN_V4} sport={sport} dport=80 "
            r"\[ASSURED\] rule=web in=lan0 out=wan0\n",
            text.stdout,
        ), text.stdout
        assert text.stderr.startswith("1 flow shown (")

        status = as_json(the_lab, "status")
        assert status["policy"]["file"] == str(policy)
        assert status["policy"]["sha256"] == hashlib.sha256(POLICY.encode()).hexdigest()
        assert status["policy"]["file_sha256"] == status["policy"]["sha256"]
        assert status["flows"]["by_proto"]["tcp"] == {"ESTABLISHED": 1}
        assert status["flows"]["max"] == 65536
        assert status["verdicts"]["accept rule web"] == 1
        assert status["verdicts"]["accept established"] >= 3
        assert (status["queue"], status["failure_mode"], status["panic"]) == ("0", "closed", False)
        assert status["kernel_queues"][0]["queue"] == 0
        assert the_lab.daemon is not None and status["pid"] == the_lab.daemon.pid
        assert status["last_reload"] is None
        text = nfqfw(the_lab, "status")
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert lines[1:4] == [
            f"policy:       {policy}",
            f"  sha256:     {status['policy']['sha256']} (in force)",
            "last reload:  none since start",
        ]
        assert "  tcp          1  ESTABLISHED 1" in lines
        assert traffic.echo_roundtrip(sock, b"still up\n") == b"still up\n"


def test_flush_cuts_the_session(lab: Lab) -> None:
    the_lab = lab
    with session(the_lab) as sock:
        before = as_json(the_lab, "status")["verdicts"]
        # (the closed session of the test before is still tracked, in TIME_WAIT)
        other = nfqfw(the_lab, "flush", "--proto", "udp")
        assert (other.returncode, other.stdout[:18]) == (0, "0 flows removed (2")
        assert traffic.echo_roundtrip(sock, b"untouched\n") == b"untouched\n"
        done = nfqfw(the_lab, "flush", "--proto", "tcp", "--addr", LAN_V4, "--state", "ESTABLISHED")
        assert (done.returncode, done.stdout) == (0, "1 flow removed (1 still tracked)\n")
        # strict pick-up: the next segment matches no flow and may not start one: INVALID, dropped
        assert blocked(sock, b"cut?\n")
        after = as_json(the_lab, "status")["verdicts"]
        invalid = {k: v - before.get(k, 0) for k, v in after.items() if k.startswith("drop invalid")}
        assert sum(invalid.values()) >= 1, after
        assert nfqfw(the_lab, "flows", "--state", "established").stdout == ""


def test_panic_blocks_everything_and_survives_a_restart(lab: Lab, lab_policy: Path) -> None:
    the_lab, policy = lab, lab_policy
    t = the_lab.topology
    assert traffic.ping(t.lan, GW_LAN_V4).returncode == 0
    with session(the_lab) as sock:
        on = nfqfw(the_lab, "panic", "on")
        assert (on.returncode, on.stdout) == (0, "panic mode on: everything but loopback is dropped\n")
        assert traffic.tcp_probe(t.lan, WAN_V4, WAN_ECHO, timeout=BLOCKED).outcome == "timeout"
        assert traffic.ping(t.lan, GW_LAN_V4, wait=BLOCKED).returncode != 0  # to the gateway too
        assert blocked(sock, b"during panic\n")  # an established session too (last: less TCP backoff)
        status = nfqfw(the_lab, "status")
        assert status.stdout.splitlines()[0] == (
            "PANIC MODE ON: everything but loopback is dropped (nfqfw panic off ends it)"
        )
        off = nfqfw(the_lab, "panic", "off")
        assert (off.returncode, off.stdout) == (0, "panic mode off: the policy decides again\n")
        sock.settimeout(30.0)  # TCP retransmits what panic dropped, after its backoff
        assert read_line(sock) == b"during panic\n"
        assert traffic.echo_roundtrip(sock, b"after panic\n") == b"after panic\n"

    assert nfqfw(the_lab, "panic", "on").returncode == 0
    assert stop_daemon(lab.state.prefix) is not None
    start_daemon(lab.state.prefix, policy)
    assert "panic mode is on (kept from before)" in the_lab.state.log_file.read_text()
    assert as_json(the_lab, "status")["panic"] is True
    assert traffic.tcp_probe(t.lan, WAN_V4, WAN_ECHO, timeout=BLOCKED).outcome == "timeout"
    again = nfqfw(the_lab, "panic", "off")
    assert (again.returncode, again.stdout) == (0, "panic mode off: the policy decides again\n")
    assert traffic.tcp_probe(t.lan, WAN_V4, WAN_ECHO).outcome == "connected"
    repeat = nfqfw(the_lab, "panic", "off")
    assert repeat.stdout == "panic mode off: the policy decides again (it already was)\n"


def test_panic_without_a_daemon_closes_a_failed_open_gateway(lab: Lab, lab_policy: Path) -> None:
    the_lab, policy = lab, lab_policy
    t = the_lab.topology

    def panic_in_gateway(*args: str) -> subprocess.CompletedProcess[str]:
        argv = in_ns(
            t.gw, sys.executable, "-m", "nfqfw", "panic", *args, "--runtime-dir", str(lab.state.runtime_dir)
        )
        return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)

    refused = panic_in_gateway("on", "--no-daemon")
    assert (refused.returncode, refused.stderr) == (
        2,
        "nfqfw panic: a daemon answers; run 'nfqfw panic on' without --no-daemon\n",
    )
    try:
        write_policy(policy, "options: {failure-mode: open}\n" + POLICY)
        stop_daemon(lab.state.prefix)
        start_daemon(lab.state.prefix, policy)
        stop_daemon(lab.state.prefix, sig=signal.SIGKILL)
        assert traffic.tcp_probe(t.lan, WAN_V4, WAN_ECHO).outcome == "connected"  # open: unfiltered
        asked = nfqfw(the_lab, "panic", "on")
        assert asked.returncode == 3  # EXIT_NO_DAEMON
        assert asked.stderr.endswith("; 'nfqfw panic on --no-daemon' drops everything without it\n")
        on = panic_in_gateway("on", "--no-daemon")
        assert (on.returncode, on.stdout) == (
            0,
            "panic mode on (no daemon, kernel rules set directly): everything but loopback is dropped\n",
        )
        assert traffic.tcp_probe(t.lan, WAN_V4, WAN_ECHO, timeout=BLOCKED).outcome == "timeout"
        assert traffic.ping(t.lan, GW_LAN_V4, wait=BLOCKED).returncode != 0
        start_daemon(lab.state.prefix, policy)
        assert as_json(the_lab, "status")["panic"] is True  # the daemon found and kept it
        assert traffic.tcp_probe(t.lan, WAN_V4, WAN_ECHO, timeout=BLOCKED).outcome == "timeout"
        assert nfqfw(the_lab, "panic", "off").returncode == 0
        assert traffic.tcp_probe(t.lan, WAN_V4, WAN_ECHO).outcome == "connected"
    finally:
        write_policy(policy, POLICY)
        stop_daemon(lab.state.prefix)
        start_daemon(lab.state.prefix, policy)


def as_nobody(runtime_dir: Path) -> str:
    """Ask for the status from a child process that dropped to uid/gid 65534 first."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, only os._exit
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                call(runtime_dir, {"cmd": "status"}, timeout=20.0)
                message = "answered"
            except ClientError as err:
                message = str(err)
            os.write(write, message.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


def test_non_root_clients_are_refused(lab: Lab) -> None:
    the_lab = lab
    path = the_lab.state.control_socket
    assert as_nobody(the_lab.state.runtime_dir) == (
        f"permission denied on {path}: the control socket is for root"
    )
    # Even when the file mode would let it in, the daemon checks the peer's uid (SO_PEERCRED).
    path.chmod(0o666)
    try:
        assert as_nobody(the_lab.state.runtime_dir) == (
            "permission denied: the control socket serves root (uid 0) only, not uid 65534"
        )
    finally:
        path.chmod(0o600)
    assert as_json(the_lab, "status")["pid"] > 0  # root still gets in


def test_reload_reports_a_broken_policy_and_the_daemon_keeps_running(lab: Lab, lab_policy: Path) -> None:
    the_lab, policy = lab, lab_policy
    write_policy(policy, BROKEN)
    done = nfqfw(the_lab, "reload")
    assert done.returncode == 1
    first, *errors = done.stderr.splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d by control request: FAILED, the running policy "
                        r"stays in force:", first), first  # fmt: skip
    assert errors == [f"  {policy}:2:21: defaults: ingress: expected accept, drop or reject, got 'perhaps'"]
    daemon = running_daemon(lab.state.prefix)
    assert daemon is not None and daemon.alive()
    status = as_json(the_lab, "status")
    assert status["last_reload"]["ok"] is False
    assert status["last_reload"]["errors"] == [errors[0].strip()]
    assert status["policy"]["file_sha256"] == hashlib.sha256(BROKEN.encode()).hexdigest()
    assert status["policy"]["sha256"] == hashlib.sha256(POLICY.encode()).hexdigest()  # still in force
    assert traffic.tcp_probe(the_lab.topology.wan, LAN_V4, LAN_MAIL).outcome == "connected"

    write_policy(policy, POLICY)
    done = nfqfw(the_lab, "reload")
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(" by control request: ok, policy reloaded, 0 flows removed\n")
    assert "control request: reloading" in the_lab.state.log_file.read_text()


def wait_listening(ns: str, port: int, timeout: float = 30.0) -> None:
    """Until a TCP socket listens on `port` in `ns` (asked of ss: a probe connection would be
    taken by the one-shot iperf3 server as its test)."""
    deadline = time.monotonic() + timeout
    while not traffic.run(ns, "ss", "-Htln", f"sport = :{port}").stdout.strip():
        assert time.monotonic() < deadline, f"nothing listens on port {port} in {ns}"
        time.sleep(0.05)


def test_requests_are_answered_under_a_flood(lab: Lab) -> None:
    """A UDP flood of small packets keeps the packet loop busy; the control socket still answers
    (from housekeeping in the packet callback when NetfilterQueue.run() does not return)."""
    the_lab = lab
    t = the_lab.topology
    server = subprocess.Popen(in_ns(t.wan, "iperf3", "-s", "-1"), stdout=subprocess.DEVNULL)
    try:
        wait_listening(t.wan, IPERF)
        flood = subprocess.Popen(
            in_ns(t.lan, "iperf3", "-c", WAN_V4, "-u", "-b", "0", "-l", "64", "-t", "120"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(2.0)
            before = as_json(the_lab, "status")["verdicts"].get("accept established", 0)
            assert flood.poll() is None, "the flood ended too early to mean anything"
            started = time.monotonic()
            after = as_json(the_lab, "status")
            took = time.monotonic() - started
            assert flood.poll() is None, "the flood ended before the answer"
            assert after["verdicts"]["accept established"] > before  # packets were flowing meanwhile
            assert took < 15.0  # housekeeping runs every second, also under the flood
            flows = as_json(the_lab, "flows", "--proto", "udp")["flows"]
            assert [(f["dport"], f["admitted_by"]) for f in flows] == [(IPERF, "rule iperf")]
        finally:
            flood.kill()
            flood.wait(timeout=60)
    finally:
        server.kill()
        server.wait(timeout=10)
