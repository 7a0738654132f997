"""`nfqfw run --queue-balance 0:1 --workers` in the lab: namespaces nfqw-wan / nfqw-gw / nfqw-lan.

A supervisor and two workers, one per queue. The kernel picks a flow's queue by a hash of its
addresses and protocol, so the outside host gets 16 more addresses (WAN_EXTRA_V4): connections
from the inside host to them are spread over both queues (all on one queue has a chance of
2**-15). The module's tests run in order on one daemon, which some of them restart:
traffic through both workers, ingress still dropped, `flows` and `status` merged, reloads (valid
and broken), panic, a full stop and start, `kill -9` of a worker and a wedged (SIGSTOPped) one.
With --metrics, the supervisor serves the workers' counts summed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lab_metrics
import pytest
from lab_metrics import Samples
from lab_policies import MAIL_IN_NO_SMB_OUT
from lab_wait import wait_for

from nfqfw.control.client import call
from nfqfw.lab import daemon_ctl, traffic
from nfqfw.lab.daemon_ctl import Lab, LabState
from nfqfw.lab.plan import LAN_V4, WAN_EXTRA_V4, WAN_V4
from nfqfw.lab.topology import add_outside_addresses, in_ns
from nfqfw.service.supervisor import POLICY_NAME, WORKERS_DIR

pytestmark = pytest.mark.lab

PREFIX = "nfqw-"
WAN_ECHO, LAN_MAIL, LAN_SSH = 80, 25, 22
METRICS_PORT = 9470
METRICS_URL = f"http://127.0.0.1:{METRICS_PORT}/metrics"
ARGS = (
    "--queue-balance",
    "0:1",
    "--workers",
    "--snapshot-interval",
    "1",
    "--metrics",
    f"127.0.0.1:{METRICS_PORT}",
)
BACK_WAIT = 30.0  # seconds for TCP to retransmit into a restarted worker (RTO backoff)
RESTART_WAIT = 20.0  # seconds for the supervisor to restart a worker (wedged: 10 s without heartbeat)

BROKEN = MAIL_IN_NO_SMB_OUT.replace("action: accept", "action: perhaps")
VALID_CHANGE = MAIL_IN_NO_SMB_OUT.replace("ports: [445]", "ports: [445, 139]")


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("workers") / "policy.yaml"
    write_policy(path, MAIL_IN_NO_SMB_OUT)
    return path


@pytest.fixture(scope="module")
def lab(policy: Path) -> Iterator[Lab]:
    with ExitStack() as stack:
        stack.callback(daemon_ctl.down, PREFIX)  # also when up() or a server fails
        the_lab = daemon_ctl.up(PREFIX, policy, args=ARGS)
        t = the_lab.topology
        add_outside_addresses(t, WAN_EXTRA_V4)
        stack.enter_context(traffic.TcpServer(t.wan, [WAN_ECHO]))
        stack.enter_context(traffic.TcpServer(t.lan, [LAN_MAIL, LAN_SSH]))
        yield the_lab


@pytest.fixture
def spread(lab: Lab) -> Iterator[dict[int, socket.socket]]:
    """One live session lan -> each outside address, by the client's port; closed at the end."""
    opened: dict[int, socket.socket] = {}
    try:
        for address in [WAN_V4, *WAN_EXTRA_V4]:
            sock, greeting = traffic.open_connection(lab.topology.lan, address, WAN_ECHO)
            assert greeting.startswith("hello"), greeting
            assert traffic.echo_roundtrip(sock, b"hi\n") == b"hi\n"
            opened[int(sock.getsockname()[1])] = sock
        yield opened
    finally:
        for sock in opened.values():
            sock.close()


def write_policy(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


def ask(request: dict[str, Any]) -> Any:
    return call(LabState(PREFIX).runtime_dir, request)


def status() -> dict[str, Any]:
    return ask({"cmd": "status"})  # type: ignore[no-any-return]


def workers() -> dict[int, dict[str, Any]]:
    return {w["queue"]: w for w in status()["workers"]}


def queue_of_ports(ports: set[int]) -> dict[int, int]:
    """Client port -> the queue whose worker holds the session's flow."""
    flows = ask({"cmd": "flows", "proto": "tcp"})["flows"]
    return {f["sport"]: f["queue"] for f in flows if f.get("sport") in ports}


def nfqfw(*argv: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "nfqfw", *argv, "--runtime-dir", str(LabState(PREFIX).runtime_dir)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def roundtrip_all(opened: dict[int, socket.socket], tag: bytes, timeout: float = BACK_WAIT) -> None:
    for port, sock in opened.items():
        sock.settimeout(timeout)
        assert traffic.echo_roundtrip(sock, tag) == tag, port


def restarted(queue: int, times: int) -> bool:
    worker = workers()[queue]
    return worker["restarts"] >= times and worker["state"] == "running" and "error" not in worker


# --- traffic ----------------------------------------------------------------------------------


def test_connections_are_spread_over_both_workers(lab: Lab, spread: dict[int, socket.socket]) -> None:
    queues = queue_of_ports(set(spread))
    assert set(queues) == set(spread), "every session is listed by `flows`"
    assert set(queues.values()) == {0, 1}, f"the kernel spread the sessions over both queues: {queues}"
    merged = status()
    by_queue = {w["queue"]: w for w in merged["workers"]}
    assert set(by_queue) == {0, 1}
    for worker in by_queue.values():
        assert worker["state"] == "running" and worker["flows"] > 0 and worker["verdicts"] > 0, worker
    assert merged["flows"]["total"] == sum(w["flows"] for w in by_queue.values())
    assert sum(merged["verdicts"].values()) == sum(w["verdicts"] for w in by_queue.values())
    assert merged["queue"] == "0:1" and merged["pid"] == lab.daemon.pid  # type: ignore[union-attr]
    text = nfqfw("status").stdout
    assert "queue 0: pid" in text and "queue 1: pid" in text


def scrape(lab: Lab) -> Samples:
    return lab_metrics.scrape(lab, METRICS_URL)


def test_metrics_are_the_sum_of_both_workers(lab: Lab) -> None:
    egress = ("nfqfw_verdicts_total", (("action", "accept"), ("reason", "default egress"), ("rule", "")))
    before = scrape(lab)
    opened = []
    for address in WAN_EXTRA_V4:  # one new session per address pair: both queues get some
        sock, greeting = traffic.open_connection(lab.topology.lan, address, WAN_ECHO)
        opened.append(sock)
        assert greeting.startswith("hello"), address
    try:
        after = scrape(lab)
        assert after[egress] - before.get(egress, 0.0) == len(WAN_EXTRA_V4)  # each SYN, once
        assert set(queue_of_ports({s.getsockname()[1] for s in opened}).values()) == {0, 1}
        for queue in ("0", "1"):
            assert after[("nfqfw_worker_up", (("queue", queue),))] == 1.0
            assert (("nfqfw_queue_kernel_drops_total", (("cause", "queue_full"), ("queue", queue)))) in after
        flows = sum(value for (name, _), value in after.items() if name == "nfqfw_flows")
        most = after[("nfqfw_flows_max", ())]
        assert most == 2 * 65536  # a table per worker
        assert after[("nfqfw_flow_table_usage_ratio", ())] == pytest.approx(flows / most)
        assert after[("nfqfw_engine_latency_seconds_count", ())] >= 1  # the workers' samples
    finally:
        for sock in opened:
            sock.close()


def test_many_new_connections_get_through(lab: Lab) -> None:
    for round_ in range(3):
        for address in WAN_EXTRA_V4:
            sock, greeting = traffic.open_connection(lab.topology.lan, address, WAN_ECHO)
            with sock:
                assert greeting.startswith("hello"), (round_, address)


def test_unsolicited_ingress_is_dropped(lab: Lab) -> None:
    t = lab.topology
    assert traffic.tcp_probe(t.wan, LAN_V4, LAN_SSH, timeout=2.0).outcome == "timeout"
    assert traffic.tcp_probe(t.wan, LAN_V4, LAN_MAIL).outcome == "connected"  # rule mail


def test_flows_lists_the_flows_of_both_workers(lab: Lab, spread: dict[int, socket.socket]) -> None:
    shown = nfqfw("flows", "--proto", "tcp")
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stdout.splitlines() if f"dport={WAN_ECHO}" in line]
    assert any("queue=0" in line for line in lines) and any("queue=1" in line for line in lines)
    flushed = nfqfw("flush", "--proto", "udp")
    assert flushed.returncode == 0 and "removed" in flushed.stdout, flushed.stderr


# --- reload, panic ----------------------------------------------------------------------------


def test_live_sessions_survive_a_reload(lab: Lab, policy: Path, spread: dict[int, socket.socket]) -> None:
    write_policy(policy, VALID_CHANGE)
    reloaded = nfqfw("reload")
    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
    roundtrip_all(spread, b"after reload\n")
    merged = status()
    assert merged["last_reload"]["ok"] and merged["last_reload"]["removed"] == 0
    assert {w["policy_sha256"] for w in merged["workers"]} == {merged["policy"]["sha256"]}
    os.kill(lab.daemon.pid, signal.SIGHUP)  # type: ignore[union-attr]
    wait_for("the SIGHUP reload", lambda: status()["last_reload"]["trigger"] == "SIGHUP", 10)
    roundtrip_all(spread, b"after SIGHUP\n")


def test_broken_reload_keeps_the_running_policy(lab: Lab, policy: Path) -> None:
    in_force = status()["policy"]["sha256"]
    write_policy(policy, BROKEN)
    try:
        reloaded = nfqfw("reload")
        assert reloaded.returncode == 1
        assert "FAILED, the running policy stays in force" in reloaded.stdout + reloaded.stderr
        merged = status()
        assert not merged["last_reload"]["ok"] and "perhaps" in " ".join(merged["last_reload"]["errors"])
        assert merged["policy"]["sha256"] == in_force
        assert {w["policy_sha256"] for w in merged["workers"]} == {in_force}
        assert "FAILED" in nfqfw("status").stdout
        t = lab.topology
        assert traffic.tcp_probe(t.wan, LAN_V4, LAN_MAIL).outcome == "connected"  # the old rule mail
        assert traffic.tcp_probe(t.wan, LAN_V4, LAN_SSH, timeout=2.0).outcome == "timeout"
    finally:
        write_policy(policy, MAIL_IN_NO_SMB_OUT)
        assert nfqfw("reload").returncode == 0


def test_a_second_supervisor_leaves_the_policy_in_force_alone(lab: Lab, tmp_path: Path) -> None:
    """`nfqfw run --workers` started by mistake while the service runs is refused (the control
    socket is taken) before it writes anything: it used to overwrite the running service's
    policy copy first, which its workers would have started with at their next restart."""
    copy = LabState(PREFIX).runtime_dir / WORKERS_DIR / POLICY_NAME
    in_force = copy.read_bytes()
    other = tmp_path / "other.yaml"
    write_policy(other, VALID_CHANGE.replace("ports: [445, 139]", "ports: [445, 139, 8080]"))
    state = LabState(PREFIX)
    argv = ["run", "--config", str(other), "--runtime-dir", str(state.runtime_dir)]
    argv += ["--state-dir", str(state.state_dir), *ARGS[:-2]]  # without --metrics: port in use
    second = subprocess.run(
        in_ns(lab.topology.gw, sys.executable, "-m", "nfqfw", *argv),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1 and "another nfqfw daemon answers" in second.stderr, second.stderr
    assert copy.read_bytes() == in_force


def test_panic_is_done_by_the_supervisor(lab: Lab) -> None:
    assert nfqfw("panic", "on").returncode == 0
    try:
        assert status()["panic"]
        assert traffic.tcp_probe(lab.topology.lan, WAN_V4, WAN_ECHO, timeout=1.5).outcome == "timeout"
    finally:
        assert nfqfw("panic", "off").returncode == 0
    assert traffic.tcp_probe(lab.topology.lan, WAN_V4, WAN_ECHO).outcome == "connected"


# --- restarts and crashes ---------------------------------------------------------------------


def test_live_sessions_survive_a_stop_and_start(
    lab: Lab, policy: Path, spread: dict[int, socket.socket]
) -> None:
    stopped = daemon_ctl.stop_daemon(PREFIX)
    assert stopped is not None and stopped.exit_code() == 0
    state = LabState(PREFIX).state_dir
    assert (state / "flows.queue-0.snapshot").exists() and (state / "flows.queue-1.snapshot").exists()
    daemon_ctl.start_daemon(PREFIX, policy, args=ARGS)
    roundtrip_all(spread, b"after restart\n")
    log = LabState(PREFIX).log_file.read_text(errors="replace")
    assert "nfqfw[queue 0]: restored" in log and "nfqfw[queue 1]: restored" in log
    assert "adopted" not in log  # the same queue range: each worker its own file


def test_switching_workers_off_and_on_keeps_the_sessions(
    lab: Lab, policy: Path, spread: dict[int, socket.socket]
) -> None:
    """One process for both queues, then workers again: each start takes the other's snapshots."""
    state = LabState(PREFIX).state_dir
    single = ("--queue-balance", "0:1", "--snapshot-interval", "1")
    for args, files in (
        (single, ["flows.snapshot"]),
        (ARGS, ["flows.queue-0.snapshot", "flows.queue-1.snapshot"]),
    ):
        stopped = daemon_ctl.stop_daemon(PREFIX)
        assert stopped is not None and stopped.exit_code() == 0
        daemon_ctl.start_daemon(PREFIX, policy, args=args)
        roundtrip_all(spread, b"after switching\n")
        assert sorted(name for name in os.listdir(state) if name.startswith("flows.")) == files


def test_a_killed_worker_is_restarted_and_its_sessions_go_on(
    lab: Lab, spread: dict[int, socket.socket]
) -> None:
    queues = queue_of_ports(set(spread))
    time.sleep(2.5)  # a periodic snapshot (--snapshot-interval 1) holds every session now
    counted = scrape(lab)
    before = workers()
    victim = before[0]
    os.kill(victim["pid"], signal.SIGKILL)
    others = {port: sock for port, sock in spread.items() if queues[port] == 1}
    roundtrip_all(others, b"while queue 0 restarts\n", timeout=5.0)  # the other worker serves on
    wait_for(
        "queue 0's worker to be restarted", lambda: restarted(0, before[0]["restarts"] + 1), RESTART_WAIT
    )
    after = workers()
    assert after[0]["pid"] != victim["pid"] and after[0]["last_exit"] == "killed by SIGKILL"
    assert after[1]["pid"] == before[1]["pid"] and after[1]["restarts"] == before[1]["restarts"]
    roundtrip_all(spread, b"after the worker's restart\n")  # queue 0's sessions too, restored
    # the new process counts from zero, the summed counters go on from where they were
    now = scrape(lab)
    for key, value in counted.items():
        if key[0].endswith(("_total", "_count", "_bucket")) and key[0] != "nfqfw_queue_kernel_drops_total":
            assert now.get(key, 0.0) >= value, key


def test_a_wedged_worker_is_killed_and_restarted(spread: dict[int, socket.socket]) -> None:
    time.sleep(2.5)  # a periodic snapshot holds every session
    before = workers()
    os.kill(before[1]["pid"], signal.SIGSTOP)  # alive, but its loop sends no heartbeat
    wait_for(
        "queue 1's wedged worker to be replaced",
        lambda: restarted(1, before[1]["restarts"] + 1),
        RESTART_WAIT,
    )
    assert workers()[1]["last_exit"] == "killed by SIGKILL"
    roundtrip_all(spread, b"after the wedged worker\n")
    log = LabState(PREFIX).log_file.read_text(errors="replace")
    assert f"worker for queue 1 (pid {before[1]['pid']}) sent no heartbeat" in log


# --- sd_notify --------------------------------------------------------------------------------


def test_watchdog_pings_stop_while_a_worker_is_wedged(lab: Lab, policy: Path, tmp_path: Path) -> None:
    """The supervisor under a systemd-like manager: READY=1 once both workers are bound, then
    WATCHDOG=1 regularly, none while a worker is stopped, and again once it was replaced."""
    daemon_ctl.stop_daemon(PREFIX)
    state = LabState(PREFIX)
    notify_path = tmp_path / "notify.sock"
    argv = ["run", "--config", str(policy), "--runtime-dir", str(state.runtime_dir)]
    argv += ["--state-dir", str(state.state_dir), *ARGS]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
        env.pop("WATCHDOG_PID", None)
        with open(state.log_file, "ab") as log:
            command = in_ns(lab.topology.gw, sys.executable, "-m", "nfqfw", *argv)
            proc = subprocess.Popen(command, stdout=log, stderr=log, env=env, start_new_session=True)
        try:
            assert "READY=1" in messages_until(notify, "READY=1", 30.0)
            assert messages_until(notify, "WATCHDOG=1", 3.0)  # every 0.5 s while all are well
            wedged_pid = workers()[0]["pid"]
            os.kill(wedged_pid, signal.SIGSTOP)
            time.sleep(3.5)  # its last heartbeat is more than 3 s old now
            drain(notify)
            seen = messages_during(notify, 5.0)  # before the supervisor kills it (10 s)
            assert "WATCHDOG=1" not in seen, seen
            wait_for(
                "the wedged worker's replacement", lambda: workers()[0]["pid"] != wedged_pid, RESTART_WAIT
            )
            assert messages_until(notify, "WATCHDOG=1", 5.0)
        finally:
            proc.terminate()
            assert proc.wait(timeout=20) == 0


def messages_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    """Assignments received until one equals `wanted` (AssertionError after `timeout`)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {wanted} within {timeout} s: {seen}"
        sock.settimeout(left)
        try:
            seen += sock.recv(4096).decode().split("\n")
        except TimeoutError:
            continue
    return seen


def messages_during(sock: socket.socket, seconds: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            seen += sock.recv(4096).decode().split("\n")
        except TimeoutError:
            break
    return seen


def drain(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
