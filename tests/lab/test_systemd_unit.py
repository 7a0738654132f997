"""The shipped unit under a real systemd: `make install`, then systemctl start, reload, restart,
a kill -9, a wedged loop and a stop, with real traffic through the lab's gateway.

The machine may have no systemd as PID 1, so the test boots one in a box (nfqfw.lab.sdbox):
its own PID, mount and cgroup namespaces, overlays over /etc, /opt, /usr, /var, /tmp and
/root so `make install` and the service write nothing to the host. A drop-in adapts the installed
unit to the lab, and only that:

- NetworkNamespacePath= puts the service into the lab's gateway namespace (rules and packets
  stay in the lab);
- DefaultDependencies=no, as the box has no sysinit.target;
- WatchdogSec=3s and TimeoutAbortSec=2s, so the watchdog's restart takes seconds, not a minute;
- its output to a file (the box has no journal).

Everything else is the unit as shipped: Type=notify, ExecStartPre check, ExecReload, Restart=,
the sandboxing (ProtectSystem=strict, SystemCallFilter, CapabilityBoundingSet, ...).
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nfqfw.lab import sdbox, traffic
from nfqfw.lab.plan import WAN_V4, WAN_V6, Topology
from nfqfw.lab.topology import build, teardown

pytestmark = pytest.mark.lab

TOPOLOGY = Topology("nfqsd-")
REPO = Path(__file__).resolve().parents[2]
UNIT = "nfqfw.service"
CLOSED_DROP_IN = "/etc/systemd/system/nfqfw-closed.service.d/lab.conf"  # into the lab namespace


@dataclass
class Service:
    box: sdbox.Box
    log: Path  # the service's stdout and stderr

    def state(self) -> dict[str, str]:
        return self.box.show(UNIT, "ActiveState", "SubState", "MainPID", "NRestarts", "Result", "StatusText")

    def systemctl(self, *args: str) -> None:
        self.box.run("systemctl", *args, timeout=60)

    def nfqfw(self, *args: str) -> str:
        return self.box.run("nfqfw", *args).stdout

    def wait_active(self, restarts: int, timeout: float = 30.0) -> dict[str, str]:
        """Wait until the unit runs again after `restarts` restarts in all."""
        deadline = time.monotonic() + timeout
        state = self.state()
        while time.monotonic() < deadline:
            state = self.state()
            if state["ActiveState"] == "active" and int(state["NRestarts"]) == restarts:
                return state
            time.sleep(0.2)
        pytest.fail(f"{UNIT} not active after {restarts} restarts: {state}\n{self.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    # The box reaches no index (its /etc and /opt are overlays, without the host's mounts below
    # them, such as a resolv.conf or a local mirror): it installs from wheels built out here.
    subprocess.run(["make", "-C", str(REPO), "--no-print-directory", "wheelhouse"], check=True, timeout=900)
    teardown(TOPOLOGY)
    build(TOPOLOGY)
    try:
        with traffic.TcpServer(TOPOLOGY.wan, (80,)), sdbox.booted() as box:
            installed = box.run(
                "make",
                "-C",
                str(REPO),
                "--no-print-directory",
                "install",
                f"INSTALL_PIP_FLAGS=--no-index --find-links={REPO / 'build' / 'wheelhouse'}",
                timeout=900,
            )
            assert "install: done." in installed.stdout
            log = box.directory / "daemon.log"
            box.write(
                f"/etc/systemd/system/{UNIT}.d/lab.conf",
                "[Unit]\nDefaultDependencies=no\n"
                f"[Service]\nNetworkNamespacePath=/run/netns/{TOPOLOGY.gw}\n"
                "WatchdogSec=3s\nTimeoutAbortSec=2s\n"
                f"StandardOutput=append:{log}\nStandardError=inherit\n",
            )
            # nfqfw.service wants nfqfw-closed.service: without this drop-in, starting the daemon
            # ran `rules install-closed` in the box's network namespace, the host's own.
            box.write(CLOSED_DROP_IN, f"[Service]\nNetworkNamespacePath=/run/netns/{TOPOLOGY.gw}\n")
            box.run("systemctl", "daemon-reload")
            box.run("systemctl", "start", UNIT, timeout=60)  # returns once READY=1 came (Type=notify)
            yield Service(box, log)
    finally:
        teardown(TOPOLOGY)


@pytest.fixture(scope="module")
def session(service: Service) -> Iterator[socket.socket]:
    """A TCP connection from the inside host through the gateway, open across the tests."""
    sock, greeting = traffic.open_connection(TOPOLOGY.lan, WAN_V4, 80)
    assert greeting == "hello 203.0.113.1"  # masqueraded
    with sock:
        yield sock


def alive(sock: socket.socket, tag: bytes) -> bool:
    try:
        return traffic.echo_roundtrip(sock, tag) == tag
    except OSError:
        return False


def connects(host: str = WAN_V4, timeout: float = 2.0) -> str:
    return traffic.tcp_probe(TOPOLOGY.lan, host, 80, timeout).outcome


def test_start_runs_the_check_binds_and_reports_ready(service: Service, session: socket.socket) -> None:
    state = service.state()
    assert (state["ActiveState"], state["SubState"], state["NRestarts"]) == ("active", "running", "0")
    assert re.fullmatch(r"queue 0:3: \d+ verdicts, \d+ flows, 0 rejects sent", state["StatusText"]), state
    log = service.log.read_text()
    assert "/etc/nfqfw/policy.yaml: OK (zones: 2" in log  # ExecStartPre=nfqfw check
    assert "queue 0:3 bound, rules installed (failure mode closed" in log
    assert ", first packets to queue 4:7)" in log
    status = service.nfqfw("status")
    assert "policy:       /etc/nfqfw/policy.yaml\n" in status
    assert f"pid {state['MainPID']}," in status
    assert connects() == "connected" and connects(WAN_V6) == "connected"
    assert alive(session, b"started")


def test_sandboxing_is_in_force(service: Service) -> None:
    pid = service.state()["MainPID"]
    assert service.box.run("grep", "-E", "^(NoNewPrivs|Seccomp):", f"/proc/{pid}/status").stdout.split() == [
        "NoNewPrivs:",
        "1",
        "Seccomp:",
        "2",
    ]
    bounding = int(service.box.run("awk", "/^CapBnd/ {print $2}", f"/proc/{pid}/status").stdout, 16)
    assert bounding == (1 << 12) | (1 << 13)  # CAP_NET_ADMIN, CAP_NET_RAW
    exposure = service.box.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    level = float(re.search(r"Overall exposure level for nfqfw.service: ([\d.]+)", exposure).group(1))  # type: ignore[union-attr]
    assert level <= 2.5, exposure


def test_reload_keeps_the_session(service: Service, session: socket.socket) -> None:
    pid = service.state()["MainPID"]
    service.systemctl("reload", UNIT)
    assert service.state()["MainPID"] == pid
    assert re.search(r"last reload: .* by SIGHUP: ok, policy reloaded", service.nfqfw("status"))
    assert alive(session, b"after reload")


def test_restart_keeps_the_session(service: Service, session: socket.socket) -> None:
    pid = service.state()["MainPID"]
    service.systemctl("restart", UNIT)
    state = service.state()
    assert state["ActiveState"] == "active" and state["MainPID"] != pid
    assert re.search(
        r"restored [1-9]\d* flows from /var/lib/nfqfw/flows.snapshot \(saved [\d.]+ s ago at a stop\)",
        service.log.read_text(),
    )
    assert alive(session, b"after restart")


def test_kill_9_blocks_traffic_until_systemd_restarts_the_daemon(
    service: Service, session: socket.socket
) -> None:
    service.systemctl("kill", "--signal=SIGKILL", UNIT)
    assert connects(timeout=0.7) == "timeout"  # RestartSec=2s: no daemon, the kernel drops
    state = service.wait_active(restarts=1)
    assert state["Result"] == "success"  # of the new run
    assert alive(session, b"after kill -9")
    assert connects() == "connected"


def test_a_wedged_packet_loop_is_restarted_by_the_watchdog(service: Service, session: socket.socket) -> None:
    pid = service.state()["MainPID"]
    service.systemctl("kill", "--signal=SIGSTOP", UNIT)  # no packets served, no WATCHDOG=1
    assert connects(timeout=0.7) == "timeout"
    state = service.wait_active(restarts=2)
    assert state["MainPID"] != pid
    # killed, not stopped: no snapshot at a stop, the periodic one brought the session back
    assert "s ago while running; TCP windows are learnt anew)" in service.log.read_text().rsplit("\n", 3)[-3]
    assert alive(session, b"after the watchdog")
    assert connects() == "connected"


def test_stop_saves_the_flows_and_leaves_traffic_blocked(service: Service) -> None:
    service.systemctl("stop", UNIT)
    state = service.state()
    assert (state["ActiveState"], state["Result"]) == ("inactive", "success")
    assert connects(timeout=0.7) == "timeout"
    last_run = service.log.read_text().rsplit("SIGTERM received: stopping\n", 1)[1]
    assert re.search(r"INFO nfqfw: saved [1-9]\d* flows to /var/lib/nfqfw/flows.snapshot\n", last_run)
    assert last_run.endswith("stopped; kernel rules left in place (nfqfw rules remove to take them away)\n")


def test_the_unit_runs_workers_and_takes_the_single_daemons_flows(
    service: Service, session: socket.socket
) -> None:
    """ExecStart with --queue-balance 0:1 --workers, under the same sandbox: started after the stop
    above, the workers take in its snapshot, so the session goes on."""
    service.box.write(
        f"/etc/systemd/system/{UNIT}.d/workers.conf",
        "[Service]\nExecStart=\nExecStart=/usr/local/bin/nfqfw run --config /etc/nfqfw/policy.yaml "
        "--state-dir /var/lib/nfqfw --queue-balance 0:1 --workers\n",
    )
    service.box.run("systemctl", "daemon-reload")
    service.systemctl("start", UNIT)  # returns on the supervisor's READY=1: every worker bound
    state = service.state()
    assert (state["ActiveState"], state["SubState"]) == ("active", "running")
    assert state["StatusText"] == "filtering on queues 0:1 with 2 workers" or re.match(
        r"queue 0:1, 2 of 2 workers up: \d+ verdicts", state["StatusText"]
    ), state
    assert alive(session, b"under workers")
    assert connects() == "connected"
    status = service.nfqfw("status")
    assert re.search(r"^  queue 0: pid \d+, running", status, re.M), status
    assert re.search(r"^  queue 1: pid \d+, running", status, re.M), status
    service.systemctl("reload", UNIT)
    assert alive(session, b"after a reload")
    before_stop = len(service.log.read_text())
    service.systemctl("stop", UNIT)
    assert connects(timeout=0.7) == "timeout"
    # systemd signals the whole cgroup: the workers' lines and the supervisor's come in any order
    log = service.log.read_text()[before_stop:]
    assert "saved" in log and "flows.queue-" in log


# --- boot: the firewall before the network -----------------------------------------------------

NETWORK_UNIT = "lab-network.service"  # stands for what brings the interfaces up at boot
BOOT_TARGET = "lab-boot.target"  # the one transaction a boot is: pulls in and waits for both


def boot_with(service: Service, failing_daemon: bool) -> str:
    """Start, as at boot and in one transaction, the units that bring the network up and
    nfqfw (which pulls in nfqfw-closed.service); returns the gateway's iptables rules as they
    were when the network unit ran (after network-pre.target)."""
    box = service.box
    seen = box.directory / "rules-at-network.txt"
    seen.unlink(missing_ok=True)
    box.run(
        "systemctl",
        "stop",
        BOOT_TARGET,
        NETWORK_UNIT,
        UNIT,
        "nfqfw-closed.service",
        "network-pre.target",
        check=False,
    )
    # A boot starts from nothing: a network-pre.target still active would order nothing below.
    deadline = time.monotonic() + 10
    while box.run("systemctl", "is-active", "network-pre.target", check=False).stdout.strip() != "inactive":
        assert time.monotonic() < deadline, "network-pre.target did not stop"
        time.sleep(0.1)
    box.run("ip", "netns", "exec", TOPOLOGY.gw, "nfqfw", "rules", "remove")  # a fresh boot: no rules
    box.write(
        f"/etc/systemd/system/{NETWORK_UNIT}",
        "[Unit]\nDefaultDependencies=no\nWants=network-pre.target\nAfter=network-pre.target\n"
        f"[Service]\nType=oneshot\nRemainAfterExit=yes\nNetworkNamespacePath=/run/netns/{TOPOLOGY.gw}\n"
        f"ExecStart=/bin/sh -c 'iptables-save > {seen}'\n",
    )
    # The box knows only the units written into it: the system's network-pre.target, as shipped.
    box.write(
        "/etc/systemd/system/network-pre.target", Path("/lib/systemd/system/network-pre.target").read_text()
    )
    failing = f"/etc/systemd/system/{UNIT}.d/failing.conf"
    if failing_daemon:  # a daemon that never comes up (say, a policy that no longer loads)
        box.write(failing, "[Service]\nExecStartPre=/bin/false\nRestart=no\n")
    else:
        box.run("rm", "-f", failing)
    # One transaction, as at boot: `systemctl start A B` would queue one per unit, and
    # network-pre.target, pulled in by the first alone, would be reached without waiting.
    box.write(
        f"/etc/systemd/system/{BOOT_TARGET}",
        f"[Unit]\nDefaultDependencies=no\nWants={NETWORK_UNIT} {UNIT}\nAfter={NETWORK_UNIT} {UNIT}\n",
    )
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", BOOT_TARGET, check=False, timeout=90)
    return seen.read_text()


def test_the_units_are_ordered_before_the_network(service: Service) -> None:
    daemon = service.box.show(UNIT, "Before", "After", "Wants")
    assert (
        "network-pre.target" in daemon["Before"].split() and "network-pre.target" in daemon["Wants"].split()
    )
    assert (
        "nfqfw-closed.service" in daemon["Wants"].split()
        and "nfqfw-closed.service" in daemon["After"].split()
    )
    assert "network-pre.target" not in daemon["After"].split()
    closed = service.box.show("nfqfw-closed.service", "Before", "DefaultDependencies")
    assert {"network-pre.target", UNIT} <= set(closed["Before"].split()) and closed[
        "DefaultDependencies"
    ] == "no"


def test_at_boot_the_network_comes_up_after_the_daemons_rules(service: Service) -> None:
    rules = boot_with(service, failing_daemon=False)
    # the daemon's own rules (with its pre-filter and caps), not only the fail-closed ones
    assert "-A NFQFW-FORWARD -m conntrack --ctstate NEW -j NFQFW-NEW" in rules, rules
    assert service.state()["ActiveState"] == "active"
    assert connects() == "connected"


def test_at_boot_a_daemon_that_fails_leaves_the_gateway_closed(service: Service) -> None:
    rules = boot_with(service, failing_daemon=True)
    assert service.state()["ActiveState"] == "failed"
    # nfqfw-closed.service's rules: every packet to a queue nobody serves
    assert "-A NFQFW-FORWARD -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 0" in rules, rules
    assert "NFQFW-NEW" not in rules
    assert connects(timeout=0.7) == "timeout"
    service.box.run("rm", "-f", f"/etc/systemd/system/{UNIT}.d/failing.conf")
    service.box.run("systemctl", "daemon-reload")
