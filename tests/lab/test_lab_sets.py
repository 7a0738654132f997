"""Named sets and safe edits on real packets: namespaces nfqe-wan / nfqe-gw / nfqe-lan.

The policy drops sources in a file set (`blocklist`, the outside host's IPv4 network) and in a
runtime set (`banned`) before it lets SMTP in (`ports: [smtp]`). `log-denied: false` leaves the
kernel no log sample to queue, so a drop of a listed source in the kernel's ipset shows as
exactly one count of the kernel rule and none of nfqfw's. Sessions from outside to the inside
host's port 25 (greet and echo) are the flows that sets and reloads cut: IPv6, whose outside
address no set lists at the start. Every test starts from the same files, policy and sets
(the `lab` fixture puts them back and reloads after each test, whatever happened).

Commands run in the root namespace and reach the daemon through its runtime directory, as
test_lab_control does; `rules show` and `rules counters` read the gateway's iptables.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from nfqfw.lab import traffic
from nfqfw.lab.daemon_ctl import Lab, down, up
from nfqfw.lab.plan import LAN_V4, LAN_V6, WAN_V6
from nfqfw.lab.topology import in_ns

pytestmark = pytest.mark.lab

PREFIX = "nfqe-"  # its own: bench/run.py has nfqb-
SMTP = 25
REPO = Path(__file__).resolve().parents[2]
BLOCKED = 2.0  # seconds a probe or a segment waits before calling the path blocked
LOGGED = 15.0  # seconds for the daemon to log what its own timer did

POLICY = """\
zones: {external: [wan0], internal: [lan0]}
defaults: {ingress: drop, egress: accept, invalid: drop}
options: {log-denied: false}
sets:
  blocklist: {file: blocklist.txt, comment: the lab's DROP list}
  banned: {}
ingress:
  - {name: drop-listed, from: "@blocklist", action: drop}
  - {name: drop-banned, from: "@banned", action: drop}
  - {name: mail, proto: tcp, to: [10.0.0.25, "fd00::25"], ports: [smtp], action: accept}
"""
# The Spamhaus DROP format (';' comments) and FireHOL's ('#'): the outside host's network is listed.
BLOCKLIST = """\
; the lab's blocklist
203.0.113.0/28 ; SBL000001
198.51.100.0/24
# FireHOL-style comment
2001:db8:dead::/48
"""
# The outside host's IPv4 network leaves the list, its IPv6 network joins it.
BLOCKLIST_EDITED = "198.51.100.0/24\n2001:db8:1::/64 ; SBL000002\n"


@pytest.fixture(scope="module")
def sets_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Path]]:
    directory = tmp_path_factory.mktemp("sets")
    policy = directory / "policy.yaml"
    write(directory / "blocklist.txt", BLOCKLIST)
    write(policy, POLICY)
    with ExitStack() as stack:
        stack.callback(down, PREFIX)  # also when up() or a server fails
        lab = up(PREFIX, policy)
        stack.enter_context(traffic.TcpServer(lab.topology.lan, [SMTP]))
        yield lab, policy


@pytest.fixture
def lab(sets_lab: tuple[Lab, Path]) -> Iterator[Lab]:
    """The module's lab, without the flows earlier tests left (the TIME_WAIT of their probes, which
    a cut would count); afterwards its files, policy and sets are the base ones again."""
    the_lab, policy = sets_lab
    ok(the_lab, "flush")
    yield the_lab
    write(policy.parent / "blocklist.txt", BLOCKLIST)
    write(policy, POLICY)
    nfqfw(the_lab, "set", "del", "banned", WAN_V6)  # (if a test left it)
    back = nfqfw(the_lab, "reload")  # (a plain reload also confirms a reload still on trial)
    assert back.returncode == 0, back.stderr


@pytest.fixture
def blocklist(sets_lab: tuple[Lab, Path]) -> Path:
    return sets_lab[1].parent / "blocklist.txt"


@pytest.fixture
def policy_file(sets_lab: tuple[Lab, Path]) -> Path:
    return sets_lab[1]


def write(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)  # the daemon refuses a group/world-writable policy


def nfqfw(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """An nfqfw command in the root namespace, pointed at the lab daemon's runtime directory."""
    argv = [sys.executable, "-m", "nfqfw", *args, "--runtime-dir", str(lab.state.runtime_dir)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)


def ok(lab: Lab, *args: str) -> str:
    done = nfqfw(lab, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def status(lab: Lab) -> Any:
    return json.loads(ok(lab, "status", "--json"))


def rules(lab: Lab, *args: str) -> str:
    """`nfqfw rules ...` in the gateway (the kernel rules live in its namespace)."""
    argv = in_ns(lab.topology.gw, sys.executable, "-m", "nfqfw", "rules", *args)
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def kernel_drops(lab: Lab, reason: str) -> int:
    """What the kernel rules dropped for `reason` ("rule NAME"): `nfqfw rules counters`."""
    found = re.search(rf"^drop {re.escape(reason)}\s+(\d+)$", rules(lab, "counters"), re.M)
    assert found, f"no kernel counter for {reason}"
    return int(found.group(1))


def nfqfw_drops(lab: Lab, reason: str) -> int:
    return int(status(lab)["verdicts"].get(f"drop {reason}", 0))


def syns(lab: Lab, count: int, source_port: int) -> None:
    """`count` SYNs from the outside host to the inside host's SMTP port (hping3: IPv4 only)."""
    argv = ["timeout", "20", "hping3", "-q", "-S", "-c", str(count), "-i", "u10000"]
    argv += ["-s", str(source_port), "-p", str(SMTP), LAN_V4]
    subprocess.run(in_ns(lab.topology.wan, *argv), capture_output=True, timeout=30)


def connects(lab: Lab, host: str) -> str:
    return traffic.tcp_probe(lab.topology.wan, host, SMTP, BLOCKED).outcome


def session(lab: Lab) -> socket.socket:
    """A live SMTP-port session from the outside host's IPv6 address, its first roundtrip done."""
    sock, greeting = traffic.open_connection(lab.topology.wan, LAN_V6, SMTP)
    assert greeting.startswith("hello")
    assert traffic.echo_roundtrip(sock, b"first\n") == b"first\n"
    return sock


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        more = sock.recv(4096)
        assert more, "the connection closed"
        data += more
    return data


def blocked(sock: socket.socket, data: bytes) -> bool:
    """Does `data` on the echo session go unanswered for BLOCKED seconds?"""
    sock.settimeout(BLOCKED)
    try:
        sock.sendall(data)
        read_line(sock)
    except TimeoutError:
        return True
    return False


def wait_for_log(lab: Lab, text: str) -> None:
    deadline = time.monotonic() + LOGGED
    while text not in lab.state.log_file.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"the daemon never logged {text!r}"
        time.sleep(0.05)


def test_a_listed_source_is_dropped_in_the_kernel(lab: Lab) -> None:
    shown = rules(lab, "show")
    assert re.search(r"-m set --match-set nfqfw4-blocklist src .*-j DROP", shown), shown
    assert re.search(r"-m set --match-set nfqfw6-blocklist src .*-j DROP", shown), shown
    kernel, queued = kernel_drops(lab, "rule drop-listed"), nfqfw_drops(lab, "rule drop-listed")
    syns(lab, 5, 40001)
    # the ipset dropped every SYN before the queue: the kernel rule counted them, nfqfw saw none
    assert kernel_drops(lab, "rule drop-listed") - kernel == 5
    assert nfqfw_drops(lab, "rule drop-listed") == queued
    assert connects(lab, LAN_V4) == "timeout"
    assert connects(lab, LAN_V6) == "connected"  # the outside host's IPv6 address is not listed
    listed = json.loads(ok(lab, "set", "list", "blocklist", "--json"))
    assert (listed["policy_networks"], listed["runtime"]) == (3, [])


def test_set_add_cuts_a_session_and_set_del_lets_the_source_in_again(lab: Lab) -> None:
    with session(lab) as sock:
        added = ok(lab, "set", "add", "banned", WAN_V6)
        assert added == f"{WAN_V6}/128 added to set banned; 1 flow cut\n"
        assert blocked(sock, b"after set add\n")  # the session's next segment is dropped
    kernel = kernel_drops(lab, "rule drop-banned")
    assert connects(lab, LAN_V6) == "timeout"
    assert kernel_drops(lab, "rule drop-banned") > kernel  # the runtime entry is in the kernel's ipset
    listing = ok(lab, "set", "list", "banned")
    assert f"  runtime entries: 1\n    {WAN_V6}/128\n" in listing, listing

    deleted = ok(lab, "set", "del", "banned", WAN_V6)
    assert deleted == f"{WAN_V6}/128 deleted from set banned\n"
    assert connects(lab, LAN_V6) == "connected"


def test_a_runtime_entry_with_a_timeout_expires(lab: Lab) -> None:
    added = time.monotonic()
    ok(lab, "set", "add", "banned", WAN_V6, "--timeout", "3")
    listing = ok(lab, "set", "list", "banned")
    assert re.search(rf"^    {re.escape(WAN_V6)}/128  \(expires in ", listing, re.M), listing
    assert connects(lab, LAN_V6) == "timeout"
    time.sleep(max(0.0, added + 3.5 - time.monotonic()))  # gone in nfqfw and in the kernel's ipset
    assert connects(lab, LAN_V6) == "connected"
    assert "  runtime entries: 0\n" in ok(lab, "set", "list", "banned")


def test_an_edited_set_file_takes_effect_at_reload(lab: Lab, blocklist: Path) -> None:
    with session(lab) as sock:
        write(blocklist, BLOCKLIST_EDITED)
        reloaded = ok(lab, "reload")
        assert reloaded.endswith(": ok, policy reloaded, 1 flow removed\n"), reloaded
        assert blocked(sock, b"after the edit\n")
    assert connects(lab, LAN_V6) == "timeout"
    assert connects(lab, LAN_V4) == "connected"  # no longer listed
    listed = json.loads(ok(lab, "set", "list", "blocklist", "--json"))
    assert listed["policy_networks"] == 2


def test_reload_dry_run_lists_the_flow_it_would_cut_and_changes_nothing(lab: Lab, blocklist: Path) -> None:
    in_force = status(lab)["policy"]["sha256"]
    with session(lab) as sock:
        sport = sock.getsockname()[1]
        write(blocklist, BLOCKLIST_EDITED)
        preview = nfqfw(lab, "reload", "--dry-run")
        assert preview.returncode == 0, preview.stderr
        lines = preview.stdout.splitlines()
        assert lines[0].endswith(f"would replace {in_force[:12]}:"), lines
        assert "flows it would cut (1):" in lines, lines
        cut = lines[lines.index("flows it would cut (1):") + 1]
        assert f"src={WAN_V6} dst={LAN_V6} sport={sport} dport={SMTP}" in cut, cut
        assert cut.endswith("-> now: rule drop-listed (drop)"), cut
        # nothing changed: the policy in force, the session, the address still let in
        assert status(lab)["policy"]["sha256"] == in_force
        assert traffic.echo_roundtrip(sock, b"still here\n") == b"still here\n"
        assert connects(lab, LAN_V4) == "timeout"


def test_reload_confirm_rolls_back_when_not_confirmed(lab: Lab, blocklist: Path) -> None:
    in_force = status(lab)["policy"]["sha256"]
    with session(lab) as sock:
        write(blocklist, BLOCKLIST_EDITED)
        trial = ok(lab, "reload", "--confirm", "5")
        assert ": ok, policy reloaded, 1 flow removed\n" in trial, trial
        assert "  on trial: 'nfqfw confirm' within 5 s keeps it" in trial, trial
        assert status(lab)["policy"]["sha256"] != in_force
        assert blocked(sock, b"during the trial\n")  # the edit cut the session
        wait_for_log(lab, "reload not confirmed within 5 s: back to the policy in force before it")
        assert status(lab)["policy"]["sha256"] == in_force
        sock.settimeout(30.0)  # TCP retransmits what the trial dropped, after its backoff
        assert read_line(sock) == b"during the trial\n"  # the cut session came back
        assert traffic.echo_roundtrip(sock, b"after the rollback\n") == b"after the rollback\n"
    assert connects(lab, LAN_V4) == "timeout"  # the old set contents are in force again
    last = status(lab)["last_reload"]
    assert (last["trigger"], last["ok"]) == ("rollback: reload not confirmed within 5 s", True)


def test_reload_confirm_stays_when_confirmed(lab: Lab, blocklist: Path) -> None:
    rollbacks = lab.state.log_file.read_text(errors="replace").count("reload not confirmed")
    write(blocklist, BLOCKLIST_EDITED)
    ok(lab, "reload", "--confirm", "2")
    trial = status(lab)["policy"]["sha256"]
    confirmed = ok(lab, "confirm")
    assert confirmed == f"confirmed: the reloaded policy stays (sha256 {trial[:12]})\n"
    time.sleep(2.5)  # past the end of the trial
    assert status(lab)["policy"]["sha256"] == trial
    assert lab.state.log_file.read_text(errors="replace").count("reload not confirmed") == rollbacks
    assert connects(lab, LAN_V6) == "timeout"
    assert connects(lab, LAN_V4) == "connected"
    again = nfqfw(lab, "confirm")
    assert (again.returncode, again.stderr) == (
        1,
        "nfqfw confirm: nothing to confirm: no reload with --confirm is waiting\n",
    )
