"""The real `nfqfw run` on real kernel packets, in three network namespaces.

    nfqk-a (client)  a0 ---- lan0  nfqk-r (gateway: nfqfw)  wan0 ---- b0  nfqk-b (server)
    10.78.1.2/24          10.78.1.1/24          10.78.2.1/24          10.78.2.2/24
    fd78:1::2/64          fd78:1::1/64          fd78:2::1/64          fd78:2::2/64

The server listens on TCP ports 80, 81, 82 and 8080 (IPv4 and IPv6). The policy lets the LAN
reach port 80 and 8080 on the WAN side, rejects port 81 with a TCP reset and drops anything
else (port 82) by default. The daemon's readiness comes from READY=1 on a NOTIFY_SOCKET the
test creates, exactly as under systemd.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.lab

A, R, B = "nfqk-a", "nfqk-r", "nfqk-b"
SERVER4, SERVER6 = "10.78.2.2", "fd78:2::2"
REPO = Path(__file__).resolve().parents[2]

POLICY = """\
# nfqfw policy for tests/lab/test_daemon_basics.py
zones:
  lan: [lan0]
  wan: [wan0]
rules:
  - name: web
    from: lan
    to: wan
    proto: tcp
    dport: [80, 8080]
    action: accept
  - name: no-ident
    from: lan
    to: wan
    proto: tcp
    dport: 81
    action: reject
    reject-with: tcp-reset
"""

SERVER = """
import select, socket
listeners = []
for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    for port in (80, 81, 82, 8080):
        s = socket.socket(family)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(64)
        listeners.append(s)
print("listening", flush=True)
while True:
    for s in select.select(listeners, [], [])[0]:
        conn, _ = s.accept()
        conn.sendall(b"hello")
        conn.close()
"""

CLIENT = """
import socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.settimeout(timeout)
start = time.monotonic()
try:
    s.connect((host, port))
    result = "connected " + s.recv(5).decode()
except ConnectionRefusedError:
    result = "refused"
except (TimeoutError, socket.timeout):
    result = "timeout"
print(result, round(time.monotonic() - start, 3))
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def connect(host: str, port: int, timeout: float = 1.0) -> tuple[str, float]:
    """Connect from the client namespace: ("connected hello" | "refused" | "timeout", seconds)."""
    out = sh(*in_ns(A, sys.executable, "-c", CLIENT, host, str(port), str(timeout))).stdout.split()
    return " ".join(out[:-1]), float(out[-1])


def iptables_save(ns: str, tool: str = "iptables-save") -> list[str]:
    """The filter table without comments and counters, to compare before/after."""
    out = sh(*in_ns(ns, tool, "-t", "filter")).stdout
    return [line for line in out.splitlines() if not line.startswith("#")]


def nfqfw(*args: str, ns: str = R) -> subprocess.CompletedProcess[str]:
    argv = in_ns(ns, sys.executable, "-m", "nfqfw", *args)
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)


# --- topology ---------------------------------------------------------------------------------


def _delete_namespaces() -> None:
    for ns in (A, R, B):
        sh("ip", "netns", "del", ns, check=False)


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
def lab(tmp_path: Path) -> Iterator[Lab]:
    _delete_namespaces()  # leftovers of an interrupted run
    the_lab = Lab(tmp_path, [], [])
    try:
        _build_topology()
        server = the_lab.spawn(in_ns(B, sys.executable, "-c", SERVER))
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        yield the_lab
    finally:
        for proc in the_lab.processes:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        for sock in the_lab.sockets:
            sock.close()
        _delete_namespaces()


def _build_topology() -> None:
    for ns in (A, R, B):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # No duplicate address detection: tentative link-local addresses would stall ND at first.
        no_dad = ("net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0")
        sh(*in_ns(ns, "sysctl", "-qw", *no_dad))
    sh("ip", "link", "add", "a0", "netns", A, "type", "veth", "peer", "name", "lan0", "netns", R)
    sh("ip", "link", "add", "b0", "netns", B, "type", "veth", "peer", "name", "wan0", "netns", R)
    for ns, dev, v4, v6 in (
        (A, "a0", "10.78.1.2/24", "fd78:1::2/64"),
        (R, "lan0", "10.78.1.1/24", "fd78:1::1/64"),
        (R, "wan0", "10.78.2.1/24", "fd78:2::1/64"),
        (B, "b0", "10.78.2.2/24", "fd78:2::2/64"),
    ):
        sh("ip", "-n", ns, "addr", "add", v4, "dev", dev)
        sh("ip", "-n", ns, "-6", "addr", "add", v6, "dev", dev, "nodad")
        sh("ip", "-n", ns, "link", "set", dev, "up")
    for ns, gw4, gw6 in ((A, "10.78.1.1", "fd78:1::1"), (B, "10.78.2.1", "fd78:2::1")):
        sh("ip", "-n", ns, "route", "add", "default", "via", gw4)
        sh("ip", "-n", ns, "-6", "route", "add", "default", "via", gw6)
    sh(*in_ns(R, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"))
    for server in (SERVER4, SERVER6):  # the lab works before nfqfw comes in
        sh(*in_ns(A, "ping", "-c1", "-W2", server))


# --- the daemon -------------------------------------------------------------------------------


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


def start_daemon(lab: Lab, policy: str = POLICY, *args: str) -> Daemon:
    config = lab.tmp / "policy.yaml"
    config.write_text(policy)
    notify_path = str(lab.tmp / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if os.path.exists(notify_path):
        os.unlink(notify_path)
    notify.bind(notify_path)
    lab.sockets.append(notify)
    env = {**os.environ, "NOTIFY_SOCKET": notify_path}
    env.pop("JOURNAL_STREAM", None)
    argv = in_ns(R, sys.executable, "-m", "nfqfw", "run", "--config", str(config), *args)
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


def test_accept_drop_and_reject_on_forwarded_traffic(lab: Lab) -> None:
    daemon = start_daemon(lab)
    for server in (SERVER4, SERVER6):
        assert connect(server, 80)[0] == "connected hello"
        assert connect(server, 8080)[0] == "connected hello"
        result, seconds = connect(server, 81, timeout=3.0)
        assert result == "refused" and seconds < 0.5  # our RST, at once
        assert connect(server, 82, timeout=0.7)[0] == "timeout"  # dropped by the default
    code, stderr = daemon.stop()
    assert code == 0, stderr
    assert "adapter reject sent: 2" in stderr


def test_rules_are_installed_for_both_families_without_duplicates_after_restart(lab: Lab) -> None:
    for _ in range(2):
        daemon = start_daemon(lab)
        assert daemon.stop()[0] == 0
    for tool in ("iptables-save", "ip6tables-save"):
        jumps = [line for line in iptables_save(R, tool) if "-j NFQFW-" in line and "-A NFQFW-" not in line]
        assert jumps == [
            "-A INPUT -j NFQFW-INPUT",
            "-A FORWARD -j NFQFW-FORWARD",
            "-A OUTPUT -j NFQFW-OUTPUT",
        ]
    shown = nfqfw("rules", "show")
    assert shown.returncode == 0
    assert shown.stdout.splitlines()[0] == "# IPv4 (iptables-save -t filter)"
    assert "-A NFQFW-FORWARD -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 0" in shown.stdout
    assert "# IPv6 (ip6tables-save -t filter)" in shown.stdout


def test_queue_balance_binds_every_queue(lab: Lab) -> None:
    daemon = start_daemon(lab, POLICY, "--queue-balance", "3:6")
    proc_queues = sh(*in_ns(R, "cat", "/proc/net/netfilter/nfnetlink_queue")).stdout
    assert sorted(int(line.split()[0]) for line in proc_queues.splitlines()) == [3, 4, 5, 6]
    assert "-j NFQUEUE --queue-balance 3:6\n" in nfqfw("rules", "show").stdout
    for sport_variation in range(6):  # different source ports hash to different queues
        assert connect(SERVER4, 80)[0] == "connected hello", sport_variation
        assert connect(SERVER6, 81)[0] == "refused"
    assert daemon.stop()[0] == 0


def test_stop_notifies_exits_zero_and_stays_closed(lab: Lab) -> None:
    daemon = start_daemon(lab)
    assert connect(SERVER4, 80)[0] == "connected hello"
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0
    assert ["STOPPING=1", "STATUS=stopping"] in daemon.all_messages()
    # Fail-closed: the rules stay, nobody is bound to the queue, the kernel drops.
    assert connect(SERVER4, 80, timeout=0.7)[0] == "timeout"
    assert connect(SERVER6, 80, timeout=0.7)[0] == "timeout"


def test_fail_closed_when_killed(lab: Lab) -> None:
    daemon = start_daemon(lab)
    assert connect(SERVER4, 80)[0] == "connected hello"
    daemon.proc.kill()
    daemon.proc.wait(timeout=10)
    assert connect(SERVER4, 80, timeout=0.7)[0] == "timeout"


def test_failure_mode_open_passes_traffic_when_killed(lab: Lab) -> None:
    daemon = start_daemon(lab, "options:\n  failure-mode: open\n" + POLICY)
    assert connect(SERVER4, 82, timeout=0.7)[0] == "timeout"  # the policy still applies while it runs
    daemon.proc.kill()
    daemon.proc.wait(timeout=10)
    assert connect(SERVER4, 80)[0] == "connected hello"
    assert connect(SERVER4, 82)[0] == "connected hello"  # unfiltered while down: that is "open"
    assert connect(SERVER6, 82)[0] == "connected hello"


def test_admin_rule_after_ours_still_applies_to_accepted_traffic(lab: Lab) -> None:
    # The admin's own rule: nothing to port 8080, even what nfqfw's policy accepts.
    sh(*in_ns(R, "iptables", "-A", "FORWARD", "-p", "tcp", "--dport", "8080", "-j", "DROP"))
    daemon = start_daemon(lab)
    assert [line for line in iptables_save(R) if line.startswith("-A FORWARD")] == [
        "-A FORWARD -j NFQFW-FORWARD",  # ours first, the admin's rule after it
        "-A FORWARD -p tcp -m tcp --dport 8080 -j DROP",
    ]
    assert connect(SERVER4, 80)[0] == "connected hello"
    assert connect(SERVER4, 8080, timeout=0.7)[0] == "timeout"  # accepted by nfqfw, dropped by the admin
    assert connect(SERVER6, 8080)[0] == "connected hello"  # the admin's rule is IPv4 only
    assert daemon.stop()[0] == 0


def test_rules_remove_leaves_the_admins_rules_untouched(lab: Lab) -> None:
    sh(*in_ns(R, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"))
    sh(*in_ns(R, "ip6tables", "-A", "FORWARD", "-p", "udp", "--dport", "53", "-j", "DROP"))
    before4, before6 = iptables_save(R), iptables_save(R, "ip6tables-save")
    daemon = start_daemon(lab)
    assert daemon.stop()[0] == 0
    assert iptables_save(R) != before4
    removed = nfqfw("rules", "remove")
    assert (removed.returncode, removed.stdout) == (0, "removed nfqfw rules for IPv4 and IPv6\n")
    assert iptables_save(R) == before4
    assert iptables_save(R, "ip6tables-save") == before6
    assert connect(SERVER4, 82)[0] == "connected hello"  # no nfqfw in the path any more
    again = nfqfw("rules", "remove")
    assert (again.returncode, again.stdout) == (0, "no nfqfw rules to remove\n")


# --- start-up errors --------------------------------------------------------------------------

BIND_QUEUE_0 = """
from netfilterqueue import NetfilterQueue
q = NetfilterQueue()
q.bind(0, lambda pkt: pkt.accept())
print("bound", flush=True)
q.run()
"""


def test_queue_already_bound(lab: Lab) -> None:
    other = lab.spawn(in_ns(R, sys.executable, "-c", BIND_QUEUE_0))
    assert other.stdout is not None and other.stdout.readline().strip() == "bound"
    config = lab.tmp / "policy.yaml"
    config.write_text(POLICY)
    result = nfqfw("run", "--config", str(config))
    assert (result.returncode, result.stderr) == (1, "nfqfw: queue 0 is already bound by another process\n")
    assert not [line for line in iptables_save(R) if "NFQFW" in line]  # nothing installed


def test_invalid_config_prints_located_errors(lab: Lab) -> None:
    config = lab.tmp / "policy.yaml"
    config.write_text(POLICY.replace("action: accept", "action: allow"))
    result = nfqfw("run", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.startswith(f"nfqfw: {config}:")
    assert "Traceback" not in result.stderr


def test_missing_config_file(lab: Lab) -> None:
    result = nfqfw("run", "--config", str(lab.tmp / "absent.yaml"))
    assert result.returncode == 1
    assert result.stderr.startswith("nfqfw: ") and len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_iptables_missing(tmp_path: Path) -> None:
    config = tmp_path / "policy.yaml"
    config.write_text(POLICY)
    # A PATH without iptables-save / iptables-restore.
    argv = ["env", f"PATH={tmp_path}", sys.executable, "-m", "nfqfw", "run", "--config", str(config)]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (result.returncode, result.stderr) == (
        1,
        "nfqfw: iptables-save not found: install iptables (with the nf_tables or legacy backend)\n",
    )


def test_not_root(tmp_path: Path) -> None:
    config = tmp_path / "policy.yaml"
    config.write_text(POLICY)
    # A new user namespace without a uid map: we are uid 65534 (nobody) there.
    argv = ["unshare", "--user", sys.executable, "-m", "nfqfw", "run", "--config", str(config)]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (result.returncode, result.stderr) == (
        1,
        "nfqfw: must run as root (to bind a netfilter queue and install iptables rules)\n",
    )
