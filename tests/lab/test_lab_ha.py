"""The HA pair (nfqfw.lab.ha): keepalived moves the virtual addresses, conntrackd the kernel's
connection table with nfqfw's connection mark (`offload: established`), and nfqfw on the new
master takes the offloaded connections over (`nfqfw ha role master`, from the notify script).

One lab for the module (prefix nfqt-ha-), with config/ha/policy.yaml and the configurations
under config/ha/ as shipped. Sessions are socket pairs made here: a listening socket in the
server's namespace, the client's connect, the accepted socket; so either side can speak first.

What survives a failover (asserted below): an egress IPv4 session (SNAT to the virtual address,
mapping replicated by conntrackd), an egress IPv6 session and an ingress session, whichever side
speaks first: the kernel's replicated entry carries the offload bit, so their packets pass the
new master's kernel as they passed the old one's, and its nfqfw lists them (their rule read from
the mark) and revokes them at a reload that no longer admits them. What is lost: a connection
younger than conntrackd's sync (made deterministic by stopping the master's conntrackd before it
opens): the new master knows nothing of it, so the outside's packets are the first of an
ingress flow to it, which the default drops, until the inside speaks (loose pick-up).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import pytest
from lab_wait import wait_for

from nfqfw.control.client import call
from nfqfw.lab import daemon_ctl, ha, traffic
from nfqfw.lab.plan import GW_WAN_V4, HA_GATEWAYS, LAN_V4, LAN_V6, WAN_V4, WAN_V6, HaTopology
from nfqfw.lab.topology import existing_namespaces, pids_in, run_in

pytestmark = pytest.mark.lab

PREFIX = "nfqt-ha-"
POLICY = Path(__file__).resolve().parents[2] / "config" / "ha" / "policy.yaml"
EGRESS_PORT, MAIL_PORT, CLOSED_PORT = 8080, 25, 22
TAKEOVER_SLACK = 1.5  # seconds over VRRP's master down interval: polling, a loaded CI machine
SYNC_TIMEOUT = 15.0  # a recovered backup's conntrackd has the master's flows (resync) by then
DATA_TIMEOUT = 15.0  # TCP retransmits after the takeover back off: 0.2, 0.4, 0.8 ... s


OFFLOAD_BIT = 0x20000000  # nfqfw.firewall.marks' default offload bit
NO_EGRESS_PORT = POLICY.read_text().replace("ports: [445]", f"ports: [445, {EGRESS_PORT}]")


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    policy = tmp_path_factory.mktemp("ha") / "policy.yaml"
    policy.write_text(POLICY.read_text())
    policy.chmod(0o600)  # the daemon refuses a group/world-writable policy
    return policy


@pytest.fixture(scope="module")
def ha_lab(policy_file: Path) -> Iterator[HaTopology]:
    with ExitStack() as stack:
        stack.callback(ha.down, PREFIX)  # also when up() fails
        yield ha.up(PREFIX, policy_file).topology


def ask(gateway: str, request: dict[str, object]) -> Any:
    return call(daemon_ctl.LabState(PREFIX, gateway).runtime_dir, request, timeout=30)


def _offloaded_flow(gateway: str, port: int) -> dict[str, Any] | None:
    """The gateway's nfqfw's record of the offloaded TCP flow from source port `port`."""
    flows = ask(gateway, {"cmd": "flows", "proto": "tcp"})["flows"]
    return next((f for f in flows if f.get("sport") == port and f.get("offloaded")), None)


class Session:
    """A TCP connection made in the lab: `client` in one namespace, `server` in another."""

    def __init__(self, client_ns: str, server_ns: str, host: str, port: int) -> None:
        family = traffic.family_of(host)
        with closing(traffic.socket_in(server_ns, family, socket.SOCK_STREAM)) as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(1)
            listener.settimeout(5)
            self.client = traffic.socket_in(client_ns, family, socket.SOCK_STREAM)
            self.client.settimeout(5)
            self.client.connect((host, port))
            self.server, self.peer = listener.accept()
        self.server.settimeout(5)
        self.port = self.client.getsockname()[1]

    def exchange(self, data: bytes, timeout: float = DATA_TIMEOUT) -> bytes:
        """Client sends, server answers the same bytes; what the client got back."""
        for sock in (self.client, self.server):
            sock.settimeout(timeout)
        self.client.sendall(data)
        got = traffic.read_exactly(self.server, len(data))
        self.server.sendall(got)
        return traffic.read_exactly(self.client, len(data))

    def close(self) -> None:
        self.client.close()
        self.server.close()


def _sessions(t: HaTopology) -> dict[str, Session]:
    return {
        "egress v4": Session(t.lan, t.wan, WAN_V4, EGRESS_PORT),
        "egress v6": Session(t.lan, t.wan, WAN_V6, EGRESS_PORT),
        "ingress v4": Session(t.wan, t.lan, LAN_V4, MAIL_PORT),
        "ingress v6": Session(t.wan, t.lan, LAN_V6, MAIL_PORT),
    }


def _healthy(t: HaTopology) -> str:
    """Both gateways up, one master, the backup's conntrackd resynchronised; the master."""
    ha.recover(PREFIX)
    master = ha.wait_master(PREFIX, ha.ELECTION_TIMEOUT)
    backup = t.peer(master)
    wait_for(f"{backup} backup", lambda: ha.notify_log(PREFIX, backup)[-1:] == ["backup"], SYNC_TIMEOUT)
    return master


def _in_external_cache(t: HaTopology, gateway: str, port: int) -> bool:
    """Does the gateway's conntrackd hold a flow from source port `port` replicated by its peer?"""
    files = ha.GatewayFiles(PREFIX, gateway)
    dump = run_in(t.gw(gateway), "conntrackd", "-C", str(files.conntrackd_conf), "-e", "ct")
    return f"sport={port} " in dump


def _kernel_flow(t: HaTopology, gateway: str, port: int) -> str:
    """The gateway kernel's conntrack entry of the TCP flow from source port `port` ("" if none)."""
    found = run_in(t.gw(gateway), "conntrack", "-L", "-p", "tcp", "--sport", str(port))
    return found.strip()


def _fail_master(t: HaTopology) -> tuple[str, str, float]:
    """Fail the master; (failed, new master, seconds until the new one held the addresses),
    once the new master's notify script has committed conntrackd's external cache."""
    start = time.monotonic()
    failed = ha.failover(PREFIX)
    new = ha.wait_master(PREFIX, ha.ELECTION_TIMEOUT, other_than=failed)
    took = time.monotonic() - start
    wait_for(f"{new}'s notify master", lambda: ha.notify_log(PREFIX, new)[-1:] == ["master"], 5.0)
    return failed, new, took


def test_one_master_holds_every_virtual_address(ha_lab: HaTopology) -> None:
    gateways = {s.gateway: s for s in ha.status(PREFIX)}
    assert [g.role for g in gateways.values()].count("master") == 1
    assert gateways["gw1"].role == "master"  # priority 150 against 100
    assert gateways["gw1"].virtual == ("203.0.113.1", "2001:db8:1::1", "10.0.0.1", "fd00::1")
    assert gateways["gw2"].role == "backup"
    assert gateways["gw2"].virtual == ()
    wait_for("gw1's notify master", lambda: ha.notify_log(PREFIX, "gw1")[-1:] == ["master"], 10.0)
    assert ha.notify_log(PREFIX, "gw2") == ["backup"]
    for gateway in HA_GATEWAYS:  # each log is this lab's: one start of its daemon ("--- TIME argv")
        files = ha.GatewayFiles(PREFIX, gateway)
        for log in (files.daemon_log, files.keepalived_log, files.conntrackd_log):
            lines = log.read_text(errors="replace").splitlines()
            starts = [line for line in lines if line.startswith("--- ")]
            assert len(starts) == 1, (log, starts)


def test_sessions_survive_failover_and_failback(ha_lab: HaTopology) -> None:
    t = ha_lab
    assert _healthy(t) == "gw1"
    sessions = _sessions(t)
    try:
        assert sessions["egress v4"].peer[0] == GW_WAN_V4  # masqueraded to the virtual address
        for name, s in sessions.items():
            assert s.exchange(b"before " + name.encode()) == b"before " + name.encode()
        egress = sessions["egress v4"].port
        wait_for("the flow replicated to gw2", lambda: _in_external_cache(t, "gw2", egress), SYNC_TIMEOUT)

        for round_, expected in enumerate((("gw1", "gw2"), ("gw2", "gw1"))):
            failed, new, took = _fail_master(t)
            assert (failed, new) == expected
            assert took < ha.MASTER_DOWN[new] + TAKEOVER_SLACK, f"{new} took over in {took:.2f} s"
            # conntrackd committed the replicated flow, SNAT mapping and all, into the kernel.
            flow = _kernel_flow(t, new, egress)
            assert f"src=10.0.0.25 dst={WAN_V4} sport={egress} dport={EGRESS_PORT}" in flow
            assert f"src={WAN_V4} dst={GW_WAN_V4} sport={EGRESS_PORT} dport={egress}" in flow
            for name, s in sessions.items():
                data = f"after failover {round_} {name}".encode()
                assert s.exchange(data) == data, name
            # New connections meet the policy on the new master.
            assert traffic.tcp_probe(t.wan, LAN_V4, CLOSED_PORT, timeout=1.0).outcome == "timeout"
            probe = Session(t.wan, t.lan, LAN_V4, MAIL_PORT)
            assert probe.exchange(b"new") == b"new"
            probe.close()
            if round_ == 0:  # fail back: gw1 returns as backup, is resynchronised, gw2 fails
                assert _healthy(t) == "gw2"
                wait_for("resync to gw1", lambda: _in_external_cache(t, "gw1", egress), SYNC_TIMEOUT)
    finally:
        for s in sessions.values():
            s.close()


def test_egress_session_silent_inside_survives_and_is_known_on_the_new_master(ha_lab: HaTopology) -> None:
    """The outside speaks first after the failover on an egress session: the replicated kernel
    entry carries nfqfw's offload bit, so the new master's kernel passes it; its nfqfw took the
    flow over (`nfqfw ha role master`) with the rule that admitted it."""
    t = ha_lab
    backup = t.peer(_healthy(t))
    s = Session(t.lan, t.wan, WAN_V4, EGRESS_PORT)
    try:
        assert s.exchange(b"hello") == b"hello"
        wait_for("the flow replicated", lambda: _in_external_cache(t, backup, s.port), SYNC_TIMEOUT)
        _, new, _ = _fail_master(t)
        entry = _kernel_flow(t, new, s.port)
        assert int(entry.split("mark=")[1].split()[0]) & OFFLOAD_BIT, entry
        record = _offloaded_flow(new, s.port)
        assert record is not None, "the new master's nfqfw took the flow over"
        assert (record["admitted_by"], record["in"], record["out"]) == ("default egress", "lan0", "wan0")
        status = ask(new, {"cmd": "status"})
        assert status["ha"]["role"] == "master"
        assert status["ha"]["conntrackd"]["stats"]["cache internal"]["current active connections"] >= 1
        s.server.sendall(b"from outside")
        s.client.settimeout(DATA_TIMEOUT)
        assert traffic.read_exactly(s.client, len(b"from outside")) == b"from outside"
        assert s.exchange(b"and back") == b"and back"
    finally:
        s.close()


def test_a_flow_revoked_by_a_reload_on_the_new_master_is_cut(ha_lab: HaTopology, policy_file: Path) -> None:
    t = ha_lab
    backup = t.peer(_healthy(t))
    s = Session(t.lan, t.wan, WAN_V4, EGRESS_PORT)
    original = policy_file.read_text()
    try:
        assert s.exchange(b"hello") == b"hello"
        wait_for("the flow replicated", lambda: _in_external_cache(t, backup, s.port), SYNC_TIMEOUT)
        _, new, _ = _fail_master(t)
        assert s.exchange(b"carried on") == b"carried on"
        policy_file.write_text(NO_EGRESS_PORT)
        assert ask(new, {"cmd": "reload"})["removed"] >= 1
        assert _kernel_flow(t, new, s.port) == ""  # revoked: its kernel entry deleted
        s.client.sendall(b"cut")
        s.server.settimeout(3.0)
        with pytest.raises((TimeoutError, ConnectionResetError)):
            assert traffic.read_exactly(s.server, 3) != b"cut"
    finally:
        policy_file.write_text(original)
        for gateway in HA_GATEWAYS:
            ask(gateway, {"cmd": "reload"})
        s.close()


def test_a_flow_younger_than_the_sync_loses_the_outside_until_the_inside_speaks(ha_lab: HaTopology) -> None:
    """The documented loss: a connection the peer never heard of (the master's conntrackd is
    stopped while it opens). The outside's packets reach the new master as the first of an
    ingress flow to the virtual address, which the default drops; once the inside sends, loose
    pick-up admits the flow as egress and the outside's retransmission gets through."""
    t = ha_lab
    master = _healthy(t)
    pid = ha.conntrackd_pid(PREFIX, master)
    os.kill(pid, signal.SIGSTOP)
    try:
        s = Session(t.lan, t.wan, WAN_V4, EGRESS_PORT)
        assert s.exchange(b"hello") == b"hello"
        _fail_master(t)
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        s.server.sendall(b"from outside")
        s.client.settimeout(3.0)
        with pytest.raises(TimeoutError):
            s.client.recv(100)
        s.client.sendall(b"from inside")
        s.server.settimeout(DATA_TIMEOUT)
        assert traffic.read_exactly(s.server, len(b"from inside")) == b"from inside"
        s.client.settimeout(DATA_TIMEOUT)
        assert traffic.read_exactly(s.client, len(b"from outside")) == b"from outside"  # the retransmission
    finally:
        s.close()


def test_down_leaves_no_daemon(ha_lab: HaTopology) -> None:
    """Runs last: after down, no keepalived, conntrackd or nfqfw of the lab is left."""
    pids = [pid for name in ha_lab.namespaces for pid in pids_in(name)]
    assert pids, "the lab's daemons run"
    ha.down(PREFIX)
    assert all(not Path(f"/proc/{pid}").exists() or _zombie(pid) for pid in pids)
    assert existing_namespaces(ha_lab) == []
    for gateway in HA_GATEWAYS:
        assert not ha.GatewayFiles(PREFIX, gateway).conntrackd_ctl.exists()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True
