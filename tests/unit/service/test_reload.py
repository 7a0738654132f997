"""Live reload: recheck of tracked flows (core.recheck), the daemon's reload() and the file-mode check."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from firewall_fakes import RecordingFirewall

from nfqfw.core.build import addr, icmp, ipv4, ipv6, tcp, udp
from nfqfw.core.config import load_policy, parse_policy
from nfqfw.core.conntrack import first_packet
from nfqfw.core.engine import Engine
from nfqfw.core.packet import PROTO_ICMP, PROTO_TCP, PROTO_UDP, SYN
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.recheck import recheck, stale_flows
from nfqfw.core.verdict import Action, Hook, Meta
from nfqfw.service.core import StartupError, check_file_mode, load_policy_file
from nfqfw.service.daemon import Daemon
from nfqfw.service.options import Options
from nfqfw.service.ruleset import queue_spec

POLICY_FILE = Path(__file__).resolve().parents[3] / "config" / "policy.yaml"
OUT = Meta(Hook.FORWARD, "lan0", "wan0")
IN = Meta(Hook.FORWARD, "wan0", "lan0")
LAN, MAIL, WAN = addr("10.0.0.5"), addr("10.0.0.25"), addr("203.0.113.7")
LAN6, WAN6 = addr("fd00::5"), addr("2001:db8::7")

BASE = POLICY_FILE.read_text()
NO_HTTP_OUT = BASE.replace(
    "egress:\n", "egress:\n  - name: no-http-out\n    proto: tcp\n    ports: [80]\n    action: drop\n", 1
)
NO_MAIL_IN = BASE.replace("ports: [25, 587]", "ports: [587]", 1)
NO_UDP_OUT = BASE + "\n".join(["", "  - name: no-udp", "    proto: udp", "    action: reject", ""])


def policy(text: str) -> CompiledPolicy:
    return CompiledPolicy(parse_policy(text))


def syn4(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    return ipv4(src, dst, 6, tcp(src, dst, sport, dport, seq=100, flags=SYN))


def loaded_engine() -> Engine:
    """Four flows: LAN->WAN:80, LAN->WAN:443, WAN->MAIL:25 (ingress rule), LAN->WAN udp 53."""
    e = Engine(CompiledPolicy(load_policy(POLICY_FILE)))
    assert e.process(syn4(LAN, WAN, 40000, 80), OUT, 1.0).action is Action.ACCEPT
    assert e.process(syn4(LAN, WAN, 40001, 443), OUT, 1.0).action is Action.ACCEPT
    assert e.process(syn4(WAN, MAIL, 50000, 25), IN, 1.0).action is Action.ACCEPT
    assert e.process(ipv4(LAN, WAN, 17, udp(LAN, WAN, 40002, 53)), OUT, 1.0).action is Action.ACCEPT
    assert len(e.conntrack) == 4
    return e


def ports_of(e: Engine) -> set[tuple[int, int, int]]:
    out = set()
    for flow in e.conntrack:
        pkt = first_packet(flow)
        assert pkt is not None
        out.add((pkt.proto, pkt.sport, pkt.dport))
    return out


def test_first_packet_rebuilds_the_originator_side_tcp_udp_v4() -> None:
    e = loaded_engine()
    got = {}
    for flow in e.conntrack:
        pkt = first_packet(flow)
        assert pkt is not None
        got[(pkt.proto, pkt.dport)] = (pkt.family, pkt.src, pkt.sport, pkt.dst)
    assert got == {
        (PROTO_TCP, 80): (4, LAN, 40000, WAN),
        (PROTO_TCP, 443): (4, LAN, 40001, WAN),
        (PROTO_TCP, 25): (4, WAN, 50000, MAIL),
        (PROTO_UDP, 53): (4, LAN, 40002, WAN),
    }


def test_first_packet_icmp_and_v6() -> None:
    e = Engine(CompiledPolicy(load_policy(POLICY_FILE)))
    e.process(ipv4(LAN, WAN, 1, icmp(8, 0, (77, 1))), OUT, 1.0)
    e.process(ipv6(WAN6, LAN6, 17, udp(WAN6, LAN6, 5353, 40000)), OUT, 1.0)  # sorts the other way round
    got = sorted(
        (p.proto, p.family, p.src, p.dst, p.icmp_type, p.icmp_id, p.sport, p.dport)
        for p in (first_packet(f) for f in e.conntrack)
        if p is not None
    )
    assert got == [
        (PROTO_ICMP, 4, LAN, WAN, 8, 77, 0, 0),
        (PROTO_UDP, 6, WAN6, LAN6, -1, 0, 5353, 40000),
    ]


def test_recheck_same_policy_keeps_every_flow() -> None:
    e = loaded_engine()
    e.replace_policy(policy(BASE))
    assert recheck(e) == []
    assert len(e.conntrack) == 4


def test_recheck_egress_drop_removes_exactly_the_matching_flow() -> None:
    e = loaded_engine()
    e.replace_policy(policy(NO_HTTP_OUT))
    removed = recheck(e)
    assert [(f.key[0], first_packet(f).dport) for f in removed] == [(PROTO_TCP, 80)]  # type: ignore[union-attr]
    assert ports_of(e) == {(PROTO_TCP, 40001, 443), (PROTO_TCP, 50000, 25), (PROTO_UDP, 40002, 53)}


def test_recheck_removed_ingress_rule_removes_the_inbound_flow() -> None:
    e = loaded_engine()
    e.replace_policy(policy(NO_MAIL_IN))
    assert len(recheck(e)) == 1
    assert ports_of(e) == {(PROTO_TCP, 40000, 80), (PROTO_TCP, 40001, 443), (PROTO_UDP, 40002, 53)}


def test_recheck_reject_rule_counts_as_not_allowed() -> None:
    e = loaded_engine()
    e.replace_policy(policy(NO_UDP_OUT))
    assert len(recheck(e)) == 1
    assert ports_of(e) == {(PROTO_TCP, 40000, 80), (PROTO_TCP, 40001, 443), (PROTO_TCP, 50000, 25)}


def test_stale_flows_does_not_remove_and_flow_without_meta_is_kept() -> None:
    e = loaded_engine()
    e.replace_policy(policy(NO_HTTP_OUT))
    for flow in e.conntrack:
        flow.meta = None
    assert stale_flows(e, e.conntrack) == []
    assert len(e.conntrack) == 4


def test_recheck_ignores_rate_limits() -> None:
    limited = "ports: [25, 587]\n    limit: 1/minute\n    limit-burst: 1\n"
    text = BASE.replace("ports: [25, 587]\n", limited, 1)
    e = Engine(policy(text))
    for port in (50000, 50001, 50002):  # one per minute: only the first passes
        e.process(syn4(WAN, MAIL, port, 25), IN, 1.0)
    assert len(e.conntrack) == 1
    e.replace_policy(policy(text))
    e.process(syn4(WAN, MAIL, 50009, 25), IN, 2.0)  # spends the new bucket's token
    assert len(e.conntrack) == 2
    assert recheck(e) == []


# --- the daemon's reload() ------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def reloading(self, status: str | None = None) -> bool:
        self.sent.append("RELOADING=1")
        return True

    def ready(self, status: str | None = None) -> bool:
        self.sent.append("READY=1")
        return True

    def close(self) -> None:
        pass


def daemon_for(path: Path, text: str) -> tuple[Daemon, Recorder]:
    path.write_text(text)
    path.chmod(0o600)
    notifier = Recorder()
    d = Daemon(Options(config=str(path)), notifier=notifier, firewall=RecordingFirewall())  # type: ignore[arg-type]
    d.engine = loaded_engine()
    return d, notifier


def test_reload_valid_policy_recheck(tmp_path: Path) -> None:
    d, notifier = daemon_for(tmp_path / "p.yaml", NO_HTTP_OUT)
    old = d.engine.policy
    assert d.reload() is True
    assert d.engine.policy is not old
    assert notifier.sent == ["RELOADING=1", "READY=1"]
    assert (PROTO_TCP, 40000, 80) not in ports_of(d.engine)
    assert len(d.engine.conntrack) == 3


def test_reload_keep_leaves_flows(tmp_path: Path) -> None:
    d, _ = daemon_for(tmp_path / "p.yaml", NO_HTTP_OUT + "\noptions:\n  reload: keep\n")
    assert d.reload() is True
    assert len(d.engine.conntrack) == 4
    assert d.engine.policy.config.options.reload == "keep"


def test_reload_invalid_policy_keeps_the_running_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "p.yaml"
    d, notifier = daemon_for(path, "defaults:\n  ingress: maybe\n")
    old = d.engine.policy
    with caplog.at_level(logging.ERROR, logger="nfqfw"):
        assert d.reload() is False
    assert d.engine.policy is old
    assert len(d.engine.conntrack) == 4
    assert notifier.sent == ["RELOADING=1", "READY=1"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors[-1] == "reload failed: the running policy stays in force"
    assert any(str(path) in message and "ingress" in message for message in errors[:-1])


def test_reload_refuses_group_writable_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "p.yaml"
    d, _ = daemon_for(path, NO_HTTP_OUT)
    path.chmod(0o664)
    old = d.engine.policy
    with caplog.at_level(logging.ERROR, logger="nfqfw"):
        assert d.reload() is False
    assert d.engine.policy is old
    message = f"reload: {path}: refusing a policy file writable by group or others (mode 0664)"
    assert message in caplog.messages


@pytest.mark.parametrize(("mode", "refused"), [(0o600, False), (0o644, False), (0o664, True), (0o602, True)])
def test_check_file_mode(tmp_path: Path, mode: int, refused: bool) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE)
    os.chmod(path, mode)
    if refused:
        with pytest.raises(StartupError) as err:
            check_file_mode(str(path))
        assert str(err.value) == (
            f"{path}: refusing a policy file writable by group or others (mode {mode:04o})"
        )
    else:
        check_file_mode(str(path))
        assert load_policy_file(str(path)).recheck is True


def test_load_policy_file_refuses_other_writable_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE)
    os.chmod(path, 0o646)
    with pytest.raises(StartupError) as err:
        load_policy_file(str(path))
    assert str(err.value) == f"{path}: refusing a policy file writable by group or others (mode 0646)"


WITH_NAT6 = BASE.replace(
    "    - name: smtp\n",
    "    - {name: web6, proto: tcp, in: wan0, ports: 80, to: 'fd00::25'}\n    - name: smtp\n",
    1,
)


def test_a_reload_follows_the_nat_section_in_the_kernel_rules(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE)
    path.chmod(0o600)
    firewall = RecordingFirewall()
    d = Daemon(Options(config=str(path)), notifier=Recorder(), firewall=firewall)  # type: ignore[arg-type]
    d.engine = loaded_engine()
    d.spec = queue_spec(d.options, load_policy(path), bypass=False)
    assert d.spec.nat is not None and d.spec.nat.forwards  # the shipped policy publishes the mail server
    path.write_text(WITH_NAT6)
    assert d.reload() is True
    names = [forward.name for forward in firewall.installs[-1].nat.forwards]  # type: ignore[union-attr]
    assert names == ["web6", "web6", "smtp", "smtp"]  # each on wan0, and on lan0 (hairpin)
    installed = len(firewall.installs)
    assert d.reload() is True
    assert len(firewall.installs) == installed  # unchanged: not installed again


def test_ipv6_nat_on_a_kernel_without_it_is_refused_located(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(WITH_NAT6)
    path.chmod(0o600)
    d = Daemon(
        Options(config=str(path)),  # type: ignore[arg-type]
        notifier=Recorder(),  # type: ignore[arg-type]
        firewall=RecordingFirewall(missing="no ip6tables nat table"),
    )
    d.engine = loaded_engine()
    line = WITH_NAT6[: WITH_NAT6.index("{name: web6")].count("\n") + 1
    with caplog.at_level(logging.ERROR, logger="nfqfw"):
        assert d.reload() is False
    assert (
        f"reload: {path}:{line}:7: nat: forward 'web6': IPv6 NAT is not available: no ip6tables nat table"
        in (caplog.messages)
    )
