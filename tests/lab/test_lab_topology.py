"""The lab's namespaces alone, without nfqfw: addresses, routes, forwarding, NAT, connectivity.

These also show that what the policy tests see (drops, rejects) is nfqfw's doing: without it,
the same traffic passes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from nfqfw.lab import daemon_ctl, traffic
from nfqfw.lab.daemon_ctl import Lab
from nfqfw.lab.plan import GW_WAN_V4, LAN_V4, LAN_V6, WAN_V4, WAN_V6, LabError, Topology
from nfqfw.lab.topology import existing_namespaces, in_ns, run_in

pytestmark = pytest.mark.lab

LAB_POLICY = None  # namespaces only
IFA_F_TENTATIVE = 0x40


def ip_json(ns: str | None, *args: str) -> list[dict]:
    argv = ["ip", "-j", *args] if ns is None else ["ip", "-n", ns, "-j", *args]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout or "[]")


def addresses(ns: str) -> dict[str, set[str]]:
    """Interface -> its global/host addresses as "address/prefix" (no link-local ones)."""
    found: dict[str, set[str]] = {}
    for link in ip_json(ns, "addr", "show"):
        found[link["ifname"]] = {
            f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if not a["local"].startswith("fe80:")
        }
    return found


def routes(ns: str, family: str) -> set[tuple[str, str | None, str]]:
    """(destination, gateway, device) of the main table's routes, without link-local/multicast."""
    return {
        (r["dst"], r.get("gateway"), r["dev"])
        for r in ip_json(ns, family, "route", "show")
        if not r["dst"].startswith(("fe80:", "ff00:", "multicast"))
    }


def sysctl(ns: str, name: str) -> str:
    return run_in(ns, "sysctl", "-n", name).strip()


def test_namespaces_and_their_addresses(lab: Lab) -> None:
    t = lab.topology
    assert existing_namespaces(t) == ["nfqt-wan", "nfqt-gw", "nfqt-lan"]
    loopback = {"127.0.0.1/8", "::1/128"}
    assert addresses(t.wan) == {"lo": loopback, "eth0": {"203.0.113.10/24", "2001:db8:1::10/64"}}
    assert addresses(t.gw) == {
        "lo": loopback,
        "wan0": {"203.0.113.1/24", "2001:db8:1::1/64"},
        "lan0": {"10.0.0.1/24", "fd00::1/64"},
    }
    assert addresses(t.lan) == {"lo": loopback, "eth0": {"10.0.0.25/24", "fd00::25/64"}}


def test_links_are_up_and_no_address_waits_for_dad(lab: Lab) -> None:
    for ns in lab.topology.namespaces:
        for link in ip_json(ns, "addr", "show"):
            assert "UP" in link["flags"], (ns, link["ifname"])
            for a in link["addr_info"]:
                assert not a.get("tentative") and not a.get("dadfailed"), (ns, link["ifname"], a["local"])
        assert sysctl(ns, "net.ipv6.conf.default.accept_dad") == "0"


def test_routes(lab: Lab) -> None:
    t = lab.topology
    assert routes(t.wan, "-4") == {
        ("10.0.0.0/24", "203.0.113.1", "eth0"),
        ("203.0.113.0/24", None, "eth0"),
    }
    assert routes(t.wan, "-6") == {
        ("fd00::/64", "2001:db8:1::1", "eth0"),
        ("2001:db8:1::/64", None, "eth0"),
    }
    assert routes(t.gw, "-4") == {
        ("default", "203.0.113.10", "wan0"),
        ("10.0.0.0/24", None, "lan0"),
        ("203.0.113.0/24", None, "wan0"),
    }
    assert routes(t.gw, "-6") == {
        ("default", "2001:db8:1::10", "wan0"),
        ("fd00::/64", None, "lan0"),
        ("2001:db8:1::/64", None, "wan0"),
    }
    assert routes(t.lan, "-4") == {("default", "10.0.0.1", "eth0"), ("10.0.0.0/24", None, "eth0")}
    assert routes(t.lan, "-6") == {("default", "fd00::1", "eth0"), ("fd00::/64", None, "eth0")}


def test_only_the_gateway_forwards(lab: Lab) -> None:
    t = lab.topology
    assert sysctl(t.gw, "net.ipv4.ip_forward") == "1"
    assert sysctl(t.gw, "net.ipv6.conf.all.forwarding") == "1"
    for host in (t.wan, t.lan):
        assert sysctl(host, "net.ipv4.ip_forward") == "0"
        assert sysctl(host, "net.ipv6.conf.all.forwarding") == "0"


def test_masquerade_rule_and_no_filter_rules(lab: Lab) -> None:
    nat = run_in(lab.topology.gw, "iptables-save", "-t", "nat")
    assert [line for line in nat.splitlines() if line.startswith("-A")] == [
        "-A POSTROUTING -s 10.0.0.0/24 -o wan0 -j MASQUERADE"
    ]
    for tool in ("iptables-save", "ip6tables-save"):
        rules = run_in(lab.topology.gw, tool, "-t", "filter").splitlines()
        assert [line for line in rules if line.startswith("-A")] == []


@pytest.mark.parametrize(("server", "seen_as"), [(WAN_V4, GW_WAN_V4), (WAN_V6, LAN_V6)])
def test_egress_tcp_udp_icmp_without_firewall(lab: Lab, server: str, seen_as: str) -> None:
    tcp = traffic.tcp_probe(lab.topology.lan, server, 80)
    assert (tcp.outcome, tcp.text) == ("connected", f"hello {seen_as}")  # masqueraded for IPv4 only
    udp = traffic.udp_probe(lab.topology.lan, server, 53)
    assert (udp.outcome, udp.text) == ("reply", f"{seen_as} ping")
    assert traffic.ping(lab.topology.lan, server).returncode == 0


@pytest.mark.parametrize("host", [LAN_V4, LAN_V6])
def test_ingress_passes_without_firewall(lab: Lab, host: str) -> None:
    # With nfqfw this is dropped (see test_lab_policy); here nothing stands in the way.
    probe = traffic.tcp_probe(lab.topology.wan, host, 22)
    assert (probe.outcome, probe.text) == ("connected", f"hello {WAN_V4 if ':' not in host else WAN_V6}")


def test_closed_port_answers_with_reset_without_firewall(lab: Lab) -> None:
    assert traffic.tcp_probe(lab.topology.lan, WAN_V4, 81).outcome == "refused"  # the outside host's own RST
    assert traffic.udp_probe(lab.topology.lan, WAN_V4, 54).outcome == "refused"  # its port unreachable


def _root_namespace_state() -> dict[str, object]:
    def strip(rules: str) -> list[str]:
        return [line for line in rules.splitlines() if not line.startswith("#")]

    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    return {
        "links": sorted((link["ifindex"], link["ifname"]) for link in ip_json(None, "link", "show")),
        "routes4": ip_json(None, "-4", "route", "show", "table", "all"),
        "routes6": ip_json(None, "-6", "route", "show", "table", "all"),
        "iptables": strip(run("iptables-save")),
        "ip6tables": strip(run("ip6tables-save")),
    }


def test_up_and_down_are_idempotent_and_leave_the_root_namespace_alone() -> None:
    prefix = "nfqt-idem-"
    before = _root_namespace_state()
    try:
        for _ in range(2):  # up on a lab that is already up rebuilds it
            lab = daemon_ctl.up(prefix)
            assert existing_namespaces(lab.topology) == ["nfqt-idem-wan", "nfqt-idem-gw", "nfqt-idem-lan"]
            assert lab.daemon is None
            assert traffic.ping(lab.topology.lan, WAN_V4).returncode == 0
        assert daemon_ctl.down(prefix) == ["nfqt-idem-wan", "nfqt-idem-gw", "nfqt-idem-lan"]
        assert daemon_ctl.down(prefix) == []
    finally:
        daemon_ctl.down(prefix)
    assert _root_namespace_state() == before


def test_down_ends_processes_left_in_the_namespaces() -> None:
    prefix = "nfqt-proc-"
    try:
        lab = daemon_ctl.up(prefix)
        sleeper = subprocess.Popen(in_ns(lab.topology.lan, "sleep", "600"))
        assert daemon_ctl.down(prefix) == ["nfqt-proc-wan", "nfqt-proc-gw", "nfqt-proc-lan"]
        assert sleeper.wait(timeout=10) == -15  # SIGTERM
    finally:
        daemon_ctl.down(prefix)


def test_up_with_a_failing_daemon_reports_its_log_and_cleans_up(tmp_path: Path) -> None:
    prefix = "nfqt-fail-"
    missing = tmp_path / "absent.yaml"
    try:
        with pytest.raises(LabError) as caught:
            daemon_ctl.up(prefix, missing)
        message = str(caught.value)
        assert message.startswith("nfqfw run exited with code 1 before it was ready\n")
        assert f"last lines of /run/nfqfw-lab/{prefix}/daemon.log:\n" in message
        assert f"nfqfw: {missing}:1:1: cannot read: No such file or directory" in message
        assert existing_namespaces(Topology(prefix)) == []
        assert daemon_ctl.running_daemon(prefix) is None
    finally:
        daemon_ctl.down(prefix)


def test_a_second_build_refuses_existing_namespaces(lab: Lab) -> None:
    from nfqfw.lab.topology import build

    with pytest.raises(LabError) as caught:
        build(lab.topology)
    assert str(caught.value) == (
        "namespaces already exist: nfqt-wan, nfqt-gw, nfqt-lan (run `nfqfw lab down` first)"
    )
    assert existing_namespaces(lab.topology) == ["nfqt-wan", "nfqt-gw", "nfqt-lan"]


def test_each_lab_starts_a_fresh_daemon_log_and_keeps_the_last_one(tmp_path: Path) -> None:
    """Tests find the daemon's lines by content, and crafted packets repeat from lab to lab."""
    prefix = "nfqt-log-"
    state = daemon_ctl.LabState(prefix)
    try:
        state.directory.mkdir(parents=True, exist_ok=True)
        state.log_file.write_text("a line of the last lab\n")
        daemon_ctl.up(prefix)
        assert not state.log_file.exists()
        assert state.log_file.with_name("daemon.log.1").read_text() == "a line of the last lab\n"
    finally:
        daemon_ctl.down(prefix)
        shutil.rmtree(state.directory, ignore_errors=True)
