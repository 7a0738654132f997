"""The real `nfqfw run` on real kernel packets, in the lab's three namespaces (prefix nfqk-).

    nfqk-wan (outside host) eth0 ---- wan0  nfqk-gw (gateway: nfqfw)  lan0 ---- eth0  nfqk-lan (inside host)

(addresses: nfqfw.lab.topology). A server in the outside host listens on TCP ports 80, 81, 82
and 8080 (IPv4 and IPv6); clients connect from the inside host, so their flows are egress.
The policy lets them reach ports 80 and 8080, rejects port 81 and drops anything else (port 82)
by default. Readiness is READY=1 on a NOTIFY_SOCKET the test binds, as under systemd.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nfqfw.lab import traffic
from nfqfw.lab.daemon_ctl import LabState
from nfqfw.lab.plan import WAN_V4, WAN_V6, Topology
from nfqfw.lab.topology import build, in_ns, teardown

pytestmark = pytest.mark.lab

TOPOLOGY = Topology("nfqk-")
GW, INSIDE, OUTSIDE = TOPOLOGY.gw, TOPOLOGY.lan, TOPOLOGY.wan
REPO = Path(__file__).resolve().parents[2]
RUNTIME_DIR = str(LabState(TOPOLOGY.prefix).runtime_dir)  # not the host's /run/nfqfw

POLICY = """\
# nfqfw policy for tests/lab/test_daemon_basics.py: clients inside (lan0), server outside (wan0)
zones:
  external: [wan0]
  internal: [lan0]
defaults:
  ingress: drop
  egress: drop
  invalid: drop
egress:
  - name: web
    proto: tcp
    ports: [80, 8080]
    action: accept
  - name: no-ident
    proto: tcp
    ports: [81]
    action: reject
"""


def sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)


def connect(host: str, port: int, timeout: float = 1.0) -> tuple[str, float]:
    """Connect from the inside host: ("connected" | "refused" | "timeout" | "unreachable", seconds)."""
    probe = traffic.tcp_probe(INSIDE, host, port, timeout)
    return probe.outcome, probe.seconds


def iptables_save(ns: str, tool: str = "iptables-save") -> list[str]:
    """The filter table without comments and counters, to compare before/after."""
    out = sh(*in_ns(ns, tool, "-t", "filter")).stdout
    return [line for line in out.splitlines() if not line.startswith("#")]


def nfqfw(*args: str) -> subprocess.CompletedProcess[str]:
    argv = in_ns(GW, sys.executable, "-m", "nfqfw", *args)
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)


# --- the lab and the daemon -------------------------------------------------------------------


@dataclass
class Lab:
    tmp: Path
    processes: list[subprocess.Popen[str]]
    sockets: list[socket.socket]

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env
        )
        self.processes.append(proc)
        return proc


@pytest.fixture
def fresh_lab(tmp_path: Path) -> Iterator[Lab]:
    teardown(TOPOLOGY)  # leftovers of an interrupted run
    the_lab = Lab(tmp_path, [], [])
    try:
        build(TOPOLOGY)
        with traffic.TcpServer(OUTSIDE, (80, 81, 82, 8080)):
            yield the_lab
    finally:
        for proc in the_lab.processes:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        for sock in the_lab.sockets:
            sock.close()
        teardown(TOPOLOGY)


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    notify: socket.socket

    def messages(self, timeout: float = 20.0) -> list[str]:
        self.notify.settimeout(timeout)
        return self.notify.recv(4096).decode().split("\n")

    def all_messages(self) -> list[list[str]]:
        """Every datagram still waiting on the notify socket."""
        sent = []
        while True:
            try:
                sent.append(self.messages(timeout=0.2))
            except TimeoutError:
                return sent

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        _, stderr = self.proc.communicate(timeout=20)
        return self.proc.returncode, stderr


def start_daemon(lab: Lab, policy: str = POLICY, *args: str, environ: dict[str, str] | None = None) -> Daemon:
    """`nfqfw run` in the gateway, returned once it sent READY=1; `environ`: more variables for it."""
    config = lab.tmp / "policy.yaml"
    config.write_text(policy)
    notify_path = lab.tmp / "notify.sock"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    lab.sockets.append(notify)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), **(environ or {})}
    env.pop("JOURNAL_STREAM", None)
    state = ("--state-dir", str(lab.tmp / "state"))  # not the host's /var/lib/nfqfw
    run = ("run", "--config", str(config), "--runtime-dir", RUNTIME_DIR, *state, *args)
    argv = in_ns(GW, sys.executable, "-m", "nfqfw", *run)
    daemon = Daemon(lab.spawn(argv, env=env), notify)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and daemon.proc.poll() is None:
        try:
            first = daemon.messages(timeout=0.2)
        except TimeoutError:
            continue
        assert first[0] == "READY=1", first
        return daemon
    daemon.proc.kill()
    pytest.fail(f"no READY=1 from nfqfw run; stderr: {daemon.proc.communicate()[1]}")


# --- tests ------------------------------------------------------------------------------------


def test_accept_drop_and_reject_on_forwarded_traffic(fresh_lab: Lab) -> None:
    daemon = start_daemon(fresh_lab)
    for server in (WAN_V4, WAN_V6):
        assert connect(server, 80)[0] == "connected"
        assert connect(server, 8080)[0] == "connected"
        result, seconds = connect(server, 81, timeout=3.0)
        assert result == "refused" and seconds < 0.5  # our RST, at once
        assert connect(server, 82, timeout=0.7)[0] == "timeout"  # dropped by the default
    daemon.proc.send_signal(signal.SIGUSR1)  # counters to the log, and on
    time.sleep(0.5)
    assert connect(WAN_V4, 80)[0] == "connected"
    code, stderr = daemon.stop()
    assert code == 0, stderr
    assert stderr.count("adapter reject sent: 2\n") == 2  # at SIGUSR1 and at the stop


def test_rules_are_installed_for_both_families_without_duplicates_after_restart(fresh_lab: Lab) -> None:
    for _ in range(2):
        daemon = start_daemon(fresh_lab)
        assert daemon.stop()[0] == 0
    for tool in ("iptables-save", "ip6tables-save"):
        jumps = [line for line in iptables_save(GW, tool) if "-j NFQFW-" in line and "-A NFQFW-" not in line]
        assert jumps == [
            "-A INPUT -j NFQFW-INPUT",
            "-A FORWARD -j NFQFW-FORWARD",
            "-A OUTPUT -j NFQFW-OUTPUT",
        ]
    shown = nfqfw("rules", "show")
    assert shown.returncode == 0
    assert shown.stdout.splitlines()[0] == "# IPv4 (iptables-save: tables filter, raw and nat)"
    # by default four queues, and four more for first packets (nfqfw.service.options.DEFAULT_QUEUES)
    assert (
        "-A NFQFW-FORWARD -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-balance 0:3"
        in shown.stdout
    )
    assert "-A NFQFW-NEW -j NFQUEUE --queue-balance 4:7" in shown.stdout
    assert "# IPv6 (ip6tables-save: tables filter, raw and nat)" in shown.stdout


def test_queue_balance_binds_every_queue(fresh_lab: Lab) -> None:
    daemon = start_daemon(fresh_lab, POLICY, "--queue-balance", "3:6")
    proc_queues = sh(*in_ns(GW, "cat", "/proc/net/netfilter/nfnetlink_queue")).stdout
    assert sorted(int(line.split()[0]) for line in proc_queues.splitlines()) == [3, 4, 5, 6, 7, 8, 9, 10]
    shown = nfqfw("rules", "show").stdout
    assert "-j NFQUEUE --queue-balance 3:6\n" in shown
    assert "-A NFQFW-NEW -j NFQUEUE --queue-balance 7:10\n" in shown  # first packets: right after
    for sport_variation in range(6):  # different source ports hash to different queues
        assert connect(WAN_V4, 80)[0] == "connected", sport_variation
        assert connect(WAN_V6, 81)[0] == "refused"
    assert daemon.stop()[0] == 0


def test_stop_notifies_exits_zero_and_stays_closed(fresh_lab: Lab) -> None:
    daemon = start_daemon(fresh_lab)
    assert connect(WAN_V4, 80)[0] == "connected"
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0
    assert ["STOPPING=1", "STATUS=stopping"] in daemon.all_messages()
    # Fail-closed: the rules stay, nobody is bound to the queue, the kernel drops.
    assert connect(WAN_V4, 80, timeout=0.7)[0] == "timeout"
    assert connect(WAN_V6, 80, timeout=0.7)[0] == "timeout"


UDP_FLOOD = """\
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    for _ in range(256):
        try:
            sock.sendto(bytes(18), (sys.argv[2], 9))
        except OSError:  # ENOBUFS/EPERM when the queue is full: keep pushing
            pass
"""


def watchdog_arrivals(daemon: Daemon, seconds: float) -> list[float]:
    """When each WATCHDOG=1 reached the notify socket during the next `seconds`."""
    arrivals, end = [], time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        try:
            message = daemon.messages(timeout=left)
        except TimeoutError:
            break
        if "WATCHDOG=1" in message:
            arrivals.append(time.monotonic())
    return arrivals


def test_watchdog_pings_come_from_the_packet_loop_idle_and_under_a_flood(fresh_lab: Lab) -> None:
    # WatchdogSec=0.4 s: a ping every 0.2 s. The daemon has one thread, so the pings come from
    # the loop that serves the packets: a wedged loop stops them and systemd restarts it.
    # The caps on first packets off: the datagrams of this flood are first packets, and the test
    # wants the loop itself flooded (tests/lab/test_lab_flood.py has the caps).
    uncapped = "options: {new-rate: off, new-rate-per-source: off}\n" + POLICY
    daemon = start_daemon(fresh_lab, uncapped, environ={"WATCHDOG_USEC": "400000"})
    assert os.listdir(f"/proc/{daemon.proc.pid}/task") == [str(daemon.proc.pid)]
    idle = watchdog_arrivals(daemon, 1.0)
    assert len(idle) >= 4, idle
    flood = fresh_lab.spawn(in_ns(INSIDE, sys.executable, "-c", UDP_FLOOD, "3", WAN_V4))  # egress: dropped
    time.sleep(0.5)  # the queue is busy by now
    busy = watchdog_arrivals(daemon, 2.0)
    assert flood.poll() is None  # the flood lasted the whole measurement
    assert len(busy) >= 7, busy
    assert max(b - a for a, b in itertools.pairwise(busy)) < 0.4, busy
    flood.wait(timeout=10)
    # It was a flood: the loop handled tens of thousands of datagrams (decided by the engine, or
    # dropped early once their queue was behind: nfqfw.kernel.fairness) and the kernel's queue
    # overflowed.
    status = json.loads(nfqfw("status", "--json", "--runtime-dir", RUNTIME_DIR).stdout)
    verdicts = status["verdicts"]
    assert verdicts["drop default egress"] + verdicts.get("drop queue delay", 0) > 20_000, verdicts
    assert sum(q["queue_dropped"] for q in status["kernel_queues"]) > 0, status["kernel_queues"]
    assert daemon.stop()[0] == 0


def test_fail_closed_when_killed(fresh_lab: Lab) -> None:
    daemon = start_daemon(fresh_lab)
    assert connect(WAN_V4, 80)[0] == "connected"
    daemon.proc.kill()
    daemon.proc.wait(timeout=10)
    assert connect(WAN_V4, 80, timeout=0.7)[0] == "timeout"


def test_failure_mode_open_passes_traffic_when_killed(fresh_lab: Lab) -> None:
    daemon = start_daemon(fresh_lab, "options:\n  failure-mode: open\n" + POLICY)
    assert connect(WAN_V4, 82, timeout=0.7)[0] == "timeout"  # the policy still applies while it runs
    daemon.proc.kill()
    daemon.proc.wait(timeout=10)
    assert connect(WAN_V4, 80)[0] == "connected"
    assert connect(WAN_V4, 82)[0] == "connected"  # unfiltered while down: that is "open"
    assert connect(WAN_V6, 82)[0] == "connected"


def test_admin_rule_after_ours_still_applies_to_accepted_traffic(fresh_lab: Lab) -> None:
    # The admin's own rule: nothing to port 8080, even what nfqfw's policy accepts.
    sh(*in_ns(GW, "iptables", "-A", "FORWARD", "-p", "tcp", "--dport", "8080", "-j", "DROP"))
    daemon = start_daemon(fresh_lab)
    assert [line for line in iptables_save(GW) if line.startswith("-A FORWARD")] == [
        "-A FORWARD -j NFQFW-FORWARD",  # ours first, the admin's rule after it
        "-A FORWARD -p tcp -m tcp --dport 8080 -j DROP",
    ]
    assert connect(WAN_V4, 80)[0] == "connected"
    assert connect(WAN_V4, 8080, timeout=0.7)[0] == "timeout"  # accepted by nfqfw, dropped by the admin
    assert connect(WAN_V6, 8080)[0] == "connected"  # the admin's rule is IPv4 only
    assert daemon.stop()[0] == 0


def test_rules_remove_leaves_the_admins_rules_untouched(fresh_lab: Lab) -> None:
    sh(*in_ns(GW, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"))
    sh(*in_ns(GW, "ip6tables", "-A", "FORWARD", "-p", "udp", "--dport", "53", "-j", "DROP"))
    before4, before6 = iptables_save(GW), iptables_save(GW, "ip6tables-save")
    daemon = start_daemon(fresh_lab)
    assert daemon.stop()[0] == 0
    assert iptables_save(GW) != before4
    removed = nfqfw("rules", "remove")
    assert (removed.returncode, removed.stdout) == (0, "removed nfqfw rules for IPv4 and IPv6\n")
    assert iptables_save(GW) == before4
    assert iptables_save(GW, "ip6tables-save") == before6
    assert connect(WAN_V4, 82)[0] == "connected"  # no nfqfw in the path any more
    again = nfqfw("rules", "remove")
    assert (again.returncode, again.stdout) == (0, "no nfqfw rules to remove\n")


# --- start-up errors (run in the gateway namespace too: nothing may reach the root one) --------

BIND_QUEUE_0 = """
from netfilterqueue import NetfilterQueue
q = NetfilterQueue()
q.bind(0, lambda pkt: pkt.accept())
print("bound", flush=True)
q.run()
"""


def test_queue_already_bound(fresh_lab: Lab) -> None:
    other = fresh_lab.spawn(in_ns(GW, sys.executable, "-c", BIND_QUEUE_0))
    assert other.stdout is not None and other.stdout.readline().strip() == "bound"
    config = fresh_lab.tmp / "policy.yaml"
    config.write_text(POLICY)
    state = fresh_lab.tmp / "state"
    result = nfqfw("run", "--config", str(config), "--state-dir", str(state))
    # The flow snapshot is restored before the queue is bound: its log line comes first.
    *logged, error = result.stderr.splitlines()
    assert (result.returncode, error) == (1, "nfqfw: queue 0 is already bound by another process")
    assert len(logged) == 1 and logged[0].endswith(
        f"INFO nfqfw: no flow snapshot at {state}/flows.snapshot: starting with an empty flow table"
    )
    assert not [line for line in iptables_save(GW) if "NFQFW" in line]  # nothing installed


def test_invalid_config_prints_located_errors(fresh_lab: Lab) -> None:
    config = fresh_lab.tmp / "policy.yaml"
    config.write_text(POLICY.replace("action: accept", "action: allow"))
    result = nfqfw("run", "--config", str(config), "--state-dir", str(fresh_lab.tmp / "state"))
    assert (result.returncode, result.stderr) == (
        1,
        f"nfqfw: {config}:13:13: egress rule 'web': action: expected accept, drop or reject, got 'allow'\n",
    )


def test_missing_config_file(fresh_lab: Lab) -> None:
    absent = fresh_lab.tmp / "absent.yaml"
    result = nfqfw("run", "--config", str(absent), "--state-dir", str(fresh_lab.tmp / "state"))
    assert (result.returncode, result.stderr) == (
        1,
        f"nfqfw: {absent}:1:1: cannot read: No such file or directory\n",
    )


def test_iptables_missing(fresh_lab: Lab) -> None:
    config = fresh_lab.tmp / "policy.yaml"
    config.write_text(POLICY)
    # A PATH without iptables-save / iptables-restore.
    argv = ["env", f"PATH={fresh_lab.tmp}", sys.executable, "-m", "nfqfw", "run", "--config", str(config)]
    result = subprocess.run(in_ns(GW, *argv), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (result.returncode, result.stderr) == (
        1,
        "nfqfw: iptables-save not found: install iptables (with the nf_tables or legacy backend)\n",
    )


def test_not_root(fresh_lab: Lab) -> None:
    config = fresh_lab.tmp / "policy.yaml"
    config.write_text(POLICY)
    # A new user namespace without a uid map: we are uid 65534 (nobody) there.
    argv = ["unshare", "--user", sys.executable, "-m", "nfqfw", "run", "--config", str(config)]
    result = subprocess.run(in_ns(GW, *argv), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (result.returncode, result.stderr) == (
        1,
        "nfqfw: must run as root (to bind a netfilter queue and install iptables rules)\n",
    )
