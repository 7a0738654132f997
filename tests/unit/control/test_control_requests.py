"""nfqfw.control.requests.Requests on a real Daemon object (engine, adapter; the kernel side faked):
status, flows, flush, panic and reload, and a request served from the packet callback."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import shutil
import socket
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from daemon_fakes import T0, Clock, kernel_free_daemon, tcp4
from firewall_fakes import RecordingFirewall
from queue_fakes import UDP_PACKET, FakePacket
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

from nfqfw.control.flowlist import flow_record, talkers
from nfqfw.control.protocol import RequestError, socket_path
from nfqfw.control.requests import Requests
from nfqfw.control.server import ControlServer
from nfqfw.core.build import addr, ipv4, udp
from nfqfw.core.config import load_policy
from nfqfw.core.conntrack import first_packet
from nfqfw.core.engine import Engine
from nfqfw.core.packet import ACK, PSH, SYN
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.verdict import Action, Ct, Hook, Meta
from nfqfw.firewall import QueueSpec, RulesError
from nfqfw.service.core import ReloadResult
from nfqfw.service.daemon import Daemon
from nfqfw.service.options import Options
from nfqfw.service.ruleset import nat, protection

POLICY_FILE = Path(__file__).resolve().parents[3] / "config" / "policy.yaml"
POLICY = POLICY_FILE.read_text()
OUT = Meta(Hook.FORWARD, "lan0", "wan0")
LAN, WAN = addr("10.0.0.5"), addr("203.0.113.7")
COMMAND_WORDS = "expected one of status, flows, flush, panic, reload, metrics, confirm, set, ha"
PROTO_WORDS = "expected tcp, udp, icmp, icmpv6 or a number 0-255"


def udp4(sport: int) -> bytes:
    return ipv4(LAN, WAN, 17, udp(LAN, WAN, sport, 53))


@pytest.fixture
def rundir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nfqr"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(rundir: Path) -> Iterator[Daemon]:
    """A Daemon as start() leaves it, minus the kernel: one TCP session LAN:40000 -> WAN:80
    (ESTABLISHED), one UDP flow LAN:40002 -> WAN:53."""
    policy = rundir / "policy.yaml"
    policy.write_text(POLICY)
    policy.chmod(0o600)
    clock = Clock()
    options = Options(config=str(policy), runtime_dir=str(rundir))
    d = kernel_free_daemon(
        options, clock, RecordingFirewall(KERNEL_DROPS), Engine(CompiledPolicy(load_policy(policy)))
    )
    for data in (
        tcp4(LAN, WAN, 40000, 80, 100, 0, SYN),
        tcp4(WAN, LAN, 80, 40000, 500, 101, SYN | ACK),
        tcp4(LAN, WAN, 40000, 80, 101, 501, ACK),
        udp4(40002),
    ):
        assert d.engine.process(data, OUT, T0).action is Action.ACCEPT
    clock.now = T0 + 2.5
    yield d
    d.close()


def answer(chunks: Iterator[bytes]) -> Any:
    raw = b"".join(chunks)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    reply = json.loads(raw)
    assert reply["ok"] is True
    return reply["result"]


KERNEL_DROPS = {"drop default ingress": 1200, "drop new-rate per source": 30}


def test_status(daemon: Daemon) -> None:
    status = answer(Requests(daemon)({"cmd": "status"}))
    digest = hashlib.sha256(POLICY.encode()).hexdigest()
    assert status["policy"] == {
        "file": daemon.options.config,
        "sha256": digest,
        "file_sha256": digest,
        "files": 1,
        "sets": [],
        "comments": {},
        "pending_confirm": None,
    }
    assert status["uptime"] == 2.5
    assert status["started"] == daemon.started
    assert status["last_reload"] is None
    assert (status["queue"], status["failure_mode"], status["panic"]) == ("0", "closed", False)
    assert status["gso"] is False  # no queue bound here
    assert status["flows"] == {
        "total": 2,
        "max": 65536,
        "by_proto": {"tcp": {"ESTABLISHED": 1}, "udp": {"UNREPLIED": 1}},
        "expired": 0,
        "early_drops": 0,
    }
    assert status["verdicts"] == {"accept default egress": 2, "accept established": 2}
    assert status["adapter"] == dict.fromkeys(daemon.adapter.counters, 0)  # type: ignore[union-attr]
    assert status["kernel_drops"] == KERNEL_DROPS  # read from the rules at the request


def test_status_counts_early_drops_as_verdicts_and_survives_unreadable_rules(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    def unreadable() -> dict[str, int]:
        raise RulesError("iptables-save failed (exit 1): no")

    daemon.adapter.early_drops = 7  # type: ignore[union-attr]
    daemon.firewall.counters = unreadable  # type: ignore[method-assign,union-attr]
    status = answer(Requests(daemon)({"cmd": "status"}))
    assert status["verdicts"] == {"accept default egress": 2, "accept established": 2, "drop queue delay": 7}
    assert status["kernel_drops"] is None
    assert "cannot read the kernel rules' counters: iptables-save failed (exit 1): no" in caplog.text


def test_status_sees_a_changed_policy_file(daemon: Daemon) -> None:
    Path(daemon.options.config).write_text(POLICY + "\n# edited\n")
    policy = answer(Requests(daemon)({"cmd": "status"}))["policy"]
    assert policy["file_sha256"] == hashlib.sha256((POLICY + "\n# edited\n").encode()).hexdigest()
    assert policy["sha256"] != policy["file_sha256"]


def test_flows_lists_records_and_filters(daemon: Daemon) -> None:
    requests = Requests(daemon)
    now = daemon.clock()
    result = answer(requests({"cmd": "flows"}))
    assert result == {
        "tracked": 2,
        "max_flows": 65536,
        "flows": [flow_record(flow, now) for flow in daemon.engine.conntrack],
    }
    assert [f["dport"] for f in answer(requests({"cmd": "flows", "proto": "udp"}))["flows"]] == [53]
    only = answer(requests({"cmd": "flows", "state": "ESTABLISHED", "addr": "203.0.113.0/24"}))["flows"]
    assert [(f["sport"], f["state"], f["assured"], f["admitted_by"]) for f in only] == [
        (40000, "ESTABLISHED", True, "default egress")
    ]


def test_flows_streams_a_big_table_and_leaves_out_flows_gone_meanwhile(daemon: Daemon) -> None:
    for sport in range(20000, 20600):
        daemon.engine.process(udp4(sport), OUT, T0 + 2.5)
    chunks = Requests(daemon)({"cmd": "flows", "proto": "udp"})
    head = next(chunks)
    assert head == b'{"ok":true,"result":{"tracked":602,"max_flows":65536,"flows":['
    gone = [flow for flow in daemon.engine.conntrack if flow.proto == 17][-1]
    daemon.engine.conntrack.remove(gone)  # removed while the answer is being written
    parts = [head, *chunks]
    assert len(parts) > 3  # written a chunk of flows at a time
    flows = json.loads(b"".join(parts))["result"]["flows"]
    assert len(flows) == 600
    assert sorted(f["sport"] for f in flows) == [*range(20000, 20599), 40002]


def test_flows_hides_and_sweeps_timed_out_flows(daemon: Daemon) -> None:
    daemon.clock.now = T0 + 31.0  # type: ignore[attr-defined]
    assert [f["proto"] for f in answer(Requests(daemon)({"cmd": "flows"}))["flows"]] == ["tcp"]
    assert len(daemon.engine.conntrack) == 1
    assert daemon.engine.conntrack.expired == 1


def test_flush_cuts_the_session(daemon: Daemon) -> None:
    requests = Requests(daemon)
    flushed = answer(requests({"cmd": "flush", "proto": "tcp", "addr": "10.0.0.5"}))
    assert flushed == {"removed": 1, "tracked": 1}
    # strict pick-up: the session's next segment starts no flow, it is INVALID and dropped
    verdict = daemon.engine.process(tcp4(LAN, WAN, 40000, 80, 101, 501, PSH | ACK), OUT, T0 + 3)
    assert (verdict.action, verdict.ct) == (Action.DROP, Ct.INVALID)
    assert answer(requests({"cmd": "flush"})) == {"removed": 1, "tracked": 0}
    assert answer(requests({"cmd": "flush"})) == {"removed": 0, "tracked": 0}


def test_a_worker_answers_metrics_with_its_families(daemon: Daemon) -> None:
    """A worker under nfqfw run --workers --metrics counts for its supervisor's endpoint."""
    from nfqfw.observe import metrics

    daemon.collector = metrics.NfqfwCollector(daemon, metrics.EngineTimer(), read_stats=lambda: {})
    families = {
        name: samples for name, _, _, samples in answer(Requests(daemon)({"cmd": "metrics"}))["families"]
    }
    assert families["nfqfw_flows"] == [
        ["nfqfw_flows", {"proto": "tcp", "state": "established"}, 1],  # as JSON: lists
        ["nfqfw_flows", {"proto": "udp", "state": "unreplied"}, 1],
    ]
    assert families["nfqfw_flows_max"] == [["nfqfw_flows_max", {}, daemon.engine.conntrack.max_flows]]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"cmd": "shutdown"}, f"unknown command 'shutdown': {COMMAND_WORDS}"),
        ({}, f"unknown command None: {COMMAND_WORDS}"),
        ({"cmd": "flows", "proto": "tcpx"}, f"unknown protocol 'tcpx': {PROTO_WORDS}"),
        ({"cmd": "flush", "addr": "10.0.0.0/33"}, "not an address or network: '10.0.0.0/33'"),
        ({"cmd": "flush", "state": 3}, "state: expected a string, got int"),
        ({"cmd": "panic"}, 'panic: "on" must be true or false'),
        ({"cmd": "panic", "on": "yes"}, 'panic: "on" must be true or false'),
        ({"cmd": "metrics"}, "metrics: not collected (a worker of nfqfw run --workers --metrics answers)"),
        ({"cmd": "ha", "role": "primary"}, 'ha: "role" must be one of master, backup, fault'),
        ({"cmd": "ha"}, 'ha: "role" must be one of master, backup, fault'),
        (
            {"cmd": "ha", "role": "master", "conntrackd": "conntrackd.conf"},
            'ha: "conntrackd" must be the absolute path of conntrackd\'s configuration',
        ),
    ],
)  # fmt: skip
def test_bad_requests(daemon: Daemon, request_: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError) as err:
        Requests(daemon)(request_)
    assert str(err.value) == message
    assert len(daemon.engine.conntrack) == 2  # a refused flush removed nothing


def test_ha_role_backup_forgets_the_records_and_status_shows_role_and_sync(daemon: Daemon) -> None:
    requests = Requests(daemon)
    assert answer(requests({"cmd": "status"}))["ha"] is None  # never told: not part of a pair
    asked: list[str] = []
    stats = {"stats": {"cache internal": {"current active connections": 2}}}
    daemon.ha.read_stats = lambda conf: asked.append(conf) or stats  # type: ignore[func-returns-value]
    told = {"cmd": "ha", "role": "backup", "conntrackd": "/etc/ha/conntrackd.conf"}
    assert answer(requests(told)) == {"role": "backup", "previous": None, "forgotten": 2}
    assert len(daemon.engine.conntrack) == 0 and len(daemon.engine.offloaded) == 0
    ha = answer(requests({"cmd": "status"}))["ha"]
    assert (ha["role"], ha["conntrackd"], asked) == ("backup", stats, ["/etc/ha/conntrackd.conf"])
    since = ha["since"]
    # master without offload: nothing in the kernel's table is nfqfw's to take over
    assert answer(requests({"cmd": "ha", "role": "master"})) == {
        "role": "master",
        "previous": "backup",
        "taken_over": 0,
    }
    ha = answer(requests({"cmd": "status"}))["ha"]
    assert ha["role"] == "master" and ha["since"] >= since and asked[-1] == "/etc/ha/conntrackd.conf"


def test_panic_on_and_off_reinstall_the_rules(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    installed: list[QueueSpec] = []
    monkeypatch.setattr(daemon.firewall, "install", installed.append)
    requests = Requests(daemon)
    assert answer(requests({"cmd": "panic", "on": True})) == {"panic": True, "changed": True}
    assert answer(requests({"cmd": "panic", "on": True})) == {"panic": True, "changed": False}
    assert answer(requests({"cmd": "status"}))["panic"] is True
    assert answer(requests({"cmd": "panic", "on": False})) == {"panic": False, "changed": True}
    assert [spec.panic for spec in installed] == [True, True, False]
    assert daemon.spec == QueueSpec(0, 0)


def test_panic_that_cannot_be_installed_changes_nothing(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(spec: QueueSpec) -> None:
        raise RulesError("iptables-restore failed (exit 4): busy")

    monkeypatch.setattr(daemon.firewall, "install", failing)
    with pytest.raises(RequestError) as err:
        Requests(daemon)({"cmd": "panic", "on": True})
    assert str(err.value) == "panic mode not changed: installing the kernel rules failed (see the log)"
    assert daemon.spec is not None and daemon.spec.panic is False


def test_a_failure_mode_change_at_reload_keeps_panic(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    installed: list[QueueSpec] = []
    monkeypatch.setattr(daemon.firewall, "install", installed.append)
    assert daemon.set_panic(True)
    Path(daemon.options.config).write_text("options:\n  failure-mode: open\n" + POLICY)
    assert answer(Requests(daemon)({"cmd": "reload"}))["ok"] is True
    spec = installed[-1]
    assert replace(spec, protection=None, nat=None) == QueueSpec(0, 0, bypass=True, panic=True)
    assert spec.protection == protection(daemon.options, load_policy(daemon.options.config))
    assert spec.nat == nat(load_policy(daemon.options.config))  # the nat rules stay in panic mode


def test_reload_reports_located_errors_then_success(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("time.time", lambda: 1_750_000_000.0)
    requests = Requests(daemon)
    path = daemon.options.config
    Path(path).write_text(POLICY.replace("ingress: drop", "ingress: perhaps"))
    line = POLICY[: POLICY.index("  ingress: drop")].count("\n") + 1  # in config/policy.yaml
    failed = answer(requests({"cmd": "reload"}))
    assert failed == {
        "time": 1_750_000_000.0,
        "trigger": "control request",
        "ok": False,
        "errors": [f"{path}:{line}:12: defaults: ingress: expected accept, drop or reject, got 'perhaps'"],
        "removed": None,
        "confirm_within": None,
    }
    assert answer(requests({"cmd": "status"}))["last_reload"] == failed
    assert len(daemon.engine.conntrack) == 2  # the running policy stays, flows too
    firewall = daemon.firewall
    assert isinstance(firewall, RecordingFirewall) and firewall.installs == []  # the rules too
    Path(path).write_text(POLICY.replace("ports: [445]", "ports: [445, 80]"))
    done = answer(requests({"cmd": "reload"}))
    assert firewall.installs == [daemon.spec]  # the pre-filter follows the new policy
    assert done == {**failed, "ok": True, "errors": [], "removed": 1}
    assert daemon.last_reload == ReloadResult(1_750_000_000.0, "control request", True, (), 1)
    assert [f.proto for f in daemon.engine.conntrack] == [17]  # the session to port 80 is rejected now


def test_a_request_is_served_from_the_packet_callback(daemon: Daemon, rundir: Path) -> None:
    """Under a flood NetfilterQueue.run() does not return: housekeeping runs from the callback,
    and the control socket is served there."""
    daemon.control = ControlServer.open(rundir, Requests(daemon), clock=daemon.clock)
    adapter = daemon.adapter
    assert adapter is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(socket_path(rundir))
        client.sendall(b'{"cmd": "flows", "proto": "tcp"}\n')
        client.settimeout(5.0)
        adapter.set_deadline(0.0)  # housekeeping is due
        packet = FakePacket(UDP_PACKET, hook=2, indev=3, outdev=4)
        adapter.on_packet(packet)
        assert packet.verdict == "repeat"
        raw = client.recv(1 << 20)
    flows = json.loads(raw)["result"]["flows"]
    assert [(f["proto"], f["dport"], f["state"]) for f in flows] == [("tcp", 80, "ESTABLISHED")]
    assert adapter.deadline == pytest.approx(daemon.clock() + 1.0)  # nothing pending: back to 1 s


def test_status_with_talkers_counts_each_end_of_each_flow(daemon: Daemon) -> None:
    status = answer(Requests(daemon)({"cmd": "status", "talkers": 5}))
    assert "talkers" not in answer(Requests(daemon)({"cmd": "status"}))
    lan, wan = (str(ipaddress.ip_address(addr)) for addr in (LAN, WAN))
    assert status["talkers"] == [{"addr": lan, "flows": 2}, {"addr": wan, "flows": 2}]


def test_talkers_read_the_same_addresses_as_first_packet() -> None:
    """The key layout talkers() reads is the one first_packet() reads, for every protocol kind."""
    engine = Engine(CompiledPolicy(load_policy(POLICY_FILE)))
    packets = [
        IP(src="10.0.0.5", dst="198.51.100.1") / UDP(sport=5353, dport=53),
        IP(src="10.0.0.5", dst="198.51.100.2") / TCP(sport=40000, dport=443, flags="S"),
        IP(src="10.0.0.6", dst="198.51.100.1") / ICMP(type=8, id=7),
        IP(src="10.0.0.6", dst="198.51.100.3", proto=47) / (b"\x00" * 8),
        IPv6(src="fd00::5", dst="2001:db8::1") / TCP(sport=40001, dport=80, flags="S"),
        IPv6(src="fd00::5", dst="2001:db8::1") / ICMPv6EchoRequest(id=3),
    ]
    for packet in packets:
        assert engine.process(bytes(packet), OUT, T0).action is Action.ACCEPT
    expected: Counter[str] = Counter()
    for flow in engine.conntrack:
        pkt = first_packet(flow)
        assert pkt is not None
        expected.update({str(ipaddress.ip_address(pkt.src)), str(ipaddress.ip_address(pkt.dst))})
    found = talkers(engine.conntrack, T0, 100)
    assert {t["addr"]: t["flows"] for t in found} == dict(expected)
    assert found[0] == {"addr": "10.0.0.5", "flows": 2} and len(talkers(engine.conntrack, T0, 2)) == 2


@pytest.mark.parametrize("wanted", [0, 101, "5", True])
def test_talkers_must_be_a_small_number(daemon: Daemon, wanted: object) -> None:
    with pytest.raises(RequestError, match='"talkers" must be a number 1-100'):
        Requests(daemon)({"cmd": "status", "talkers": wanted})
