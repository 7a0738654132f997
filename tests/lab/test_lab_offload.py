"""`options: {offload: established}` on real packets: connections handed over to the kernel.

One lab for the module (masquerade on, as a gateway has it); every test starts its own `nfqfw
run` and, when done, stops it and removes its rules and the kernel's connection table, so the
next test starts from a clean gateway. A connection is offloaded once its handshake is done:
its packets no longer reach the queue (nfqfw's verdict counters stand still while it carries
data), and nfqfw stays the authority over it: `flows` shows it, `flush` and a reload that no
longer admits it take it back (its next packet meets nfqfw and is dropped: a flushed TCP
connection is cut), panic mode drops it, and it goes on while nfqfw is stopped or killed.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lab_policies import MAIL_IN_NO_SMB_OUT

from nfqfw.control.client import call
from nfqfw.lab import daemon_ctl, traffic
from nfqfw.lab.daemon_ctl import Daemon, Lab
from nfqfw.lab.plan import LAN_V4, WAN_V4, WAN_V6
from nfqfw.lab.topology import in_ns, run_in

pytestmark = pytest.mark.lab

LAB_POLICY = None  # each test starts nfqfw itself
PREFIX = "nfqt-"
OFFLOAD = MAIL_IN_NO_SMB_OUT + "options: {offload: established}\n"
NO_WEB_OUT = OFFLOAD.replace("    ports: [445]\n", "    ports: [445, 80]\n")
CUT_WAIT = 1.5  # seconds an echo waits before a cut connection counts as cut


def nfqfw_in_gateway(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    argv = in_ns(lab.topology.gw, sys.executable, "-m", "nfqfw", *args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def ask(request: dict[str, Any]) -> Any:
    return call(daemon_ctl.LabState(PREFIX).runtime_dir, request, timeout=30)


BACKGROUND = "accept untracked: icmpv6 neighbour discovery / MLD"  # nfqfw.core.l4.icmp's reason


def verdicts() -> dict[str, int]:
    """nfqfw's verdict counters, without the lab hosts' own IPv6 neighbour discovery and MLD
    (the gateway's, through INPUT and OUTPUT), which may come at any time."""
    counts = ask({"cmd": "status"})["verdicts"]
    return {reason: n for reason, n in counts.items() if reason != BACKGROUND}


def invalid_drops() -> int:
    return sum(v for k, v in ask({"cmd": "status"})["verdicts"].items() if k.startswith("drop invalid: tcp"))


def flows_to(port: int, sport: int | None = None) -> list[dict[str, Any]]:
    return [
        flow
        for flow in ask({"cmd": "flows"})["flows"]
        if flow.get("dport") == port and sport in (None, flow.get("sport"))
    ]


def kernel_entries(lab: Lab, sock: socket.socket) -> list[str]:
    """The gateway kernel's conntrack entries of the TCP connection `sock` made (`conntrack -L`,
    with marks); by its ports, so that an earlier test's connection to the same port, closed and
    lingering in CLOSE or TIME_WAIT, is not one of them."""
    sport, dport = sock.getsockname()[1], sock.getpeername()[1]
    done = subprocess.run(
        in_ns(lab.topology.gw, "conntrack", "-L", "-p", "tcp", "--sport", str(sport), "--dport", str(dport)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    return [line for line in done.stdout.splitlines() if line.startswith("tcp")]


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def echo_works(sock: socket.socket, data: bytes, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return traffic.echo_roundtrip(sock, data) == data
    except OSError:
        return False


@pytest.fixture
def start(lab: Lab, tmp_path: Path) -> Iterator[Callable[[str], Daemon]]:
    """start(policy_text) runs nfqfw in the gateway until the test ends."""
    policy = tmp_path / "policy.yaml"

    def start_with(text: str) -> Daemon:
        policy.write_text(text)
        policy.chmod(0o600)
        return daemon_ctl.start_daemon(PREFIX, policy)

    try:
        yield start_with
    finally:
        daemon_ctl.stop_daemon(PREFIX)
        removed = nfqfw_in_gateway(lab, "rules", "remove")
        assert removed.returncode == 0, removed.stderr
        run_in(lab.topology.gw, "conntrack", "-F")  # the next test's connections start afresh
        shutil.rmtree(daemon_ctl.LabState(PREFIX).state_dir, ignore_errors=True)


def offloaded_connection(lab: Lab, port: int = 80, host: str = WAN_V4) -> socket.socket:
    """A connection from the inside host, once nfqfw handed it over (it lists it so)."""
    sock, greeting = traffic.open_connection(lab.topology.lan, host, port)
    assert greeting.startswith("hello")
    assert echo_works(sock, b"first")
    (flow,) = flows_to(port, sock.getsockname()[1])
    assert flow["offloaded"] and flow["admitted_by"] == "default egress" and flow["state"] == "ESTABLISHED"
    return sock


def test_an_offloaded_connection_skips_the_queue_and_outlives_nfqfw(
    lab: Lab, start: Callable[[str], Daemon]
) -> None:
    daemon = start(OFFLOAD)
    sock = offloaded_connection(lab)
    (entry,) = kernel_entries(lab, sock)
    assert "mark=" in entry and int(entry.split("mark=")[1].split()[0]) & 0x20000000  # the offload bit
    before = verdicts()
    assert all(echo_works(sock, b"x" * 1000) for _ in range(20))
    after = verdicts()
    assert after == before, (before, after)  # 40 segments and their ACKs: none reached the queue
    status = ask({"cmd": "status"})
    assert status["flows"]["offloaded"]["total"] == 1 and status["flows"]["total"] == 0
    # Stopped: the kernel goes on carrying it; a new connection is not admitted (fail-closed).
    daemon_ctl.stop_daemon(PREFIX)
    assert daemon.exit_code() == 0
    assert echo_works(sock, b"while stopped")
    assert traffic.tcp_probe(lab.topology.lan, WAN_V4, 8080, timeout=CUT_WAIT).outcome == "timeout"
    # Started again: nfqfw knows it (the records it saved, still in the kernel's table).
    start(OFFLOAD)
    (flow,) = flows_to(80)
    assert flow["offloaded"] and flow["admitted_by"] == "default egress"
    # Killed: the same.
    daemon_ctl.stop_daemon(PREFIX, signal.SIGKILL)
    assert echo_works(sock, b"while killed")
    sock.close()


def test_flush_takes_an_offloaded_connection_back(lab: Lab, start: Callable[[str], Daemon]) -> None:
    start(OFFLOAD)
    sock = offloaded_connection(lab)
    kept = offloaded_connection(lab, 8080)
    assert ask({"cmd": "flush", "addr": WAN_V4, "proto": "tcp", "state": "ESTABLISHED"})["removed"] == 2
    assert kernel_entries(lab, sock) == []
    dropped = invalid_drops()
    assert not echo_works(sock, b"after the flush", timeout=CUT_WAIT)
    assert invalid_drops() > dropped  # its next packet met nfqfw again, which has no flow for it
    assert not echo_works(kept, b"this one too", timeout=CUT_WAIT)
    sock.close()
    kept.close()


def test_a_reload_that_no_longer_admits_it_takes_it_back(
    lab: Lab, start: Callable[[str], Daemon], tmp_path: Path
) -> None:
    start(OFFLOAD)
    web = offloaded_connection(lab, 80)
    other = offloaded_connection(lab, 8080)
    policy = Path(ask({"cmd": "status"})["policy"]["file"])
    policy.write_text(NO_WEB_OUT)
    result = ask({"cmd": "reload"})
    assert result["ok"] and result["removed"] == 1
    assert kernel_entries(lab, web) == [] and len(kernel_entries(lab, other)) == 1
    assert not echo_works(web, b"no more", timeout=CUT_WAIT)
    assert echo_works(other, b"still allowed")
    (flow,) = flows_to(8080)
    assert flow["offloaded"]
    web.close()
    other.close()


def test_panic_drops_offloaded_connections(lab: Lab, start: Callable[[str], Daemon]) -> None:
    start(OFFLOAD)
    sock = offloaded_connection(lab, 80, WAN_V6)
    assert ask({"cmd": "panic", "on": True})["panic"]
    assert not echo_works(sock, b"in panic", timeout=CUT_WAIT)
    assert ask({"cmd": "panic", "on": False})["changed"]
    # The kernel still carries it: TCP retransmits what panic mode dropped, and it goes on.
    sock.settimeout(15)
    assert read_exactly(sock, len(b"in panic")) == b"in panic"
    assert echo_works(sock, b"and after")
    sock.close()


def test_a_replied_udp_flow_is_offloaded(lab: Lab, start: Callable[[str], Daemon]) -> None:
    start(OFFLOAD)
    t = lab.topology
    with traffic.socket_in(t.lan, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.connect((WAN_V4, 53))
        sock.send(b"first")
        assert sock.recv(100).endswith(b" first")  # the echo server says whom it answers
        before = verdicts()
        for n in range(10):
            sock.send(b"more %d" % n)
            assert sock.recv(100).endswith(b" more %d" % n)
        after = verdicts()
        assert after == before, (before, after)
    (flow,) = [f for f in ask({"cmd": "flows", "proto": "udp"})["flows"] if f.get("dport") == 53]
    assert flow["offloaded"] and flow["replied"] and flow["src"] == LAN_V4
