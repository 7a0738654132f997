"""nfqfw in the lab's gateway, deciding about real kernel traffic with the policy below.

Servers (tests/lab/conftest.py): outside TCP 80/445/8080 greet+echo, 9000 sha256 sink, 9001
byte source, UDP 53/137 echo; inside TCP 22/25/80 greet+echo, 587 sha256 sink. Every server a
test expects to be unreachable really listens, so a drop or a reject can only be nfqfw's doing
(test_lab_topology shows the same traffic passing without nfqfw).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from nfqfw.lab import traffic
from nfqfw.lab.daemon_ctl import Lab
from nfqfw.lab.plan import GW_LAN_V4, GW_LAN_V6, GW_WAN_V4, GW_WAN_V6, LAN_V4, LAN_V6, WAN_V4, WAN_V6
from nfqfw.lab.topology import set_mtu

pytestmark = pytest.mark.lab

LAB_POLICY = """\
zones:
  external: [wan0]
  internal: [lan0]
defaults:
  ingress: drop
  egress: accept
  invalid: drop
ingress:
  - name: mail
    proto: tcp
    to: [10.0.0.25, fd00::25]
    ports: [25, 587]
    action: accept
egress:
  - name: no-smb-out
    proto: tcp
    ports: [445]
    action: reject
  - name: no-netbios-out
    proto: udp
    ports: [137]
    action: reject
"""

DROP_WAIT = 1.5  # seconds a client waits before a connection attempt counts as dropped
REJECT_FAST = 1.0  # a reject must be answered within this many seconds
BIG = 64 << 20  # bytes per large transfer

# (server address, the client address the server sees): IPv4 is masqueraded, IPv6 routed.
EGRESS = [pytest.param(WAN_V4, GW_WAN_V4, id="ipv4"), pytest.param(WAN_V6, LAN_V6, id="ipv6")]
INSIDE = [pytest.param(LAN_V4, WAN_V4, id="ipv4"), pytest.param(LAN_V6, WAN_V6, id="ipv6")]


# --- egress -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("server", "seen_as"), EGRESS)
def test_egress_tcp(lab: Lab, server: str, seen_as: str) -> None:
    probe = traffic.tcp_probe(lab.topology.lan, server, 80)
    assert (probe.outcome, probe.text) == ("connected", f"hello {seen_as}")


@pytest.mark.parametrize(("server", "seen_as"), EGRESS)
def test_egress_udp(lab: Lab, server: str, seen_as: str) -> None:
    probe = traffic.udp_probe(lab.topology.lan, server, 53, payload=b"query")
    assert (probe.outcome, probe.text) == ("reply", f"{seen_as} query")


@pytest.mark.parametrize("server", [WAN_V4, WAN_V6])
def test_egress_ping(lab: Lab, server: str) -> None:
    done = traffic.ping(lab.topology.lan, server, count=3)
    assert done.returncode == 0, done.stdout
    assert "3 packets transmitted, 3 received" in done.stdout


@pytest.mark.parametrize(("server", "seen_as"), EGRESS)
def test_egress_live_connection_carries_data_both_ways(lab: Lab, server: str, seen_as: str) -> None:
    sock, greeting = traffic.open_connection(lab.topology.lan, server, 8080)
    with sock:
        assert greeting == f"hello {seen_as}"
        for size in (1, 1000, 100_000):
            data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            assert traffic.echo_roundtrip(sock, data) == data


# --- ingress ------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", [LAN_V4, LAN_V6])
@pytest.mark.parametrize("port", [22, 80])
def test_unsolicited_ingress_is_dropped(lab: Lab, host: str, port: int) -> None:
    probe = traffic.tcp_probe(lab.topology.wan, host, port, timeout=DROP_WAIT)
    assert probe.outcome == "timeout"


@pytest.mark.parametrize("gateway", [GW_WAN_V4, GW_WAN_V6])
def test_unsolicited_ingress_to_the_gateway_is_dropped(lab: Lab, gateway: str) -> None:
    # Nothing listens there: without nfqfw the gateway's kernel would answer with a reset.
    assert traffic.tcp_probe(lab.topology.wan, gateway, 22, timeout=DROP_WAIT).outcome == "timeout"


@pytest.mark.parametrize(("host", "client"), INSIDE)
def test_allowed_ingress_connects(lab: Lab, host: str, client: str) -> None:
    probe = traffic.tcp_probe(lab.topology.wan, host, 25)
    assert (probe.outcome, probe.text) == ("connected", f"hello {client}")
    assert traffic.nc_probe(lab.topology.wan, host, 587)


# --- reject -------------------------------------------------------------------------------------


@pytest.mark.parametrize("server", [WAN_V4, WAN_V6])
def test_rejected_tcp_is_refused_at_once(lab: Lab, server: str) -> None:
    probe = traffic.tcp_probe(lab.topology.lan, server, 445, timeout=5.0)
    assert probe.outcome == "refused"  # a TCP reset, though a server listens on 445
    assert probe.seconds < REJECT_FAST


@pytest.mark.parametrize("server", [WAN_V4, WAN_V6])
def test_rejected_udp_gets_port_unreachable(lab: Lab, server: str) -> None:
    probe = traffic.udp_probe(lab.topology.lan, server, 137, timeout=5.0)
    assert probe.outcome == "refused"  # ICMP(v6) port unreachable, though a server listens on 137
    assert probe.seconds < REJECT_FAST


# --- ICMP errors about accepted flows (RELATED) -------------------------------------------------


@pytest.fixture
def small_wan_mtu(lab: Lab) -> Iterator[None]:
    """MTU 1280 on the gateway's wan0 (as the kernel selftest conntrack_icmp_related.sh shrinks a
    router's link): the gateway answers bigger packets from the inside with frag-needed /
    packet-too-big, which must reach the inside host through nfqfw as RELATED."""
    t = lab.topology
    flush_path_mtu_cache(t.lan)
    set_mtu(t.gw, "wan0", 1280)
    try:
        yield
    finally:
        set_mtu(t.gw, "wan0", 1500)
        flush_path_mtu_cache(t.lan)


def flush_path_mtu_cache(ns: str) -> None:
    for family in ("-4", "-6"):
        subprocess.run(["ip", "-n", ns, family, "route", "flush", "cache"], check=True)


@pytest.mark.parametrize("server", [WAN_V4, WAN_V6])
@pytest.mark.parametrize("big_first", [False, True], ids=["after-a-small-exchange", "first-packet"])
def test_path_mtu_errors_reach_the_inside_host(
    lab: Lab, small_wan_mtu: None, server: str, big_first: bool
) -> None:
    lan = lab.topology.lan
    # UDP with "don't fragment": the gateway's frag-needed / packet-too-big about the 1400-byte
    # datagram teaches the inside host the path MTU. About an established flow the error is
    # queued and RELATED to it; about a flow's very first packet (which never reaches FORWARD)
    # it carries that packet's unconfirmed conntrack, which the kernel will not queue: nfqfw's
    # OUTPUT rules let the gateway's own RELATED errors pass in the kernel.
    assert traffic.udp_path_mtu(lan, server, 53, size=1400, big_first=big_first) == 1280
    # TCP on a fresh path MTU cache: 1500-byte segments go out with DF, and the gateway's error
    # must come back or the transfer stalls.
    flush_path_mtu_cache(lan)
    sent, answer = traffic.upload(lan, server, 9000, 4 << 20, timeout=20)
    assert answer == sent


# --- the gateway as a hop: its own ICMP errors ---------------------------------------------------

TIME_EXCEEDED = {4: 11, 6: 3}
UNREACHABLE = {4: 3, 6: 1}
HOP = [
    pytest.param("lan", WAN_V4, GW_LAN_V4, "Time to live exceeded", id="ipv4-from-inside"),
    pytest.param("lan", WAN_V6, GW_LAN_V6, "Time exceeded: Hop limit", id="ipv6-from-inside"),
    pytest.param("wan", LAN_V4, GW_WAN_V4, "Time to live exceeded", id="ipv4-from-outside"),
    pytest.param("wan", LAN_V6, GW_WAN_V6, "Time exceeded: Hop limit", id="ipv6-from-outside"),
]


@pytest.mark.parametrize(("side", "target", "gateway", "message"), HOP)
def test_ping_t1_is_answered_by_the_gateway(
    lab: Lab, side: str, target: str, gateway: str, message: str
) -> None:
    ns = lab.topology.lan if side == "lan" else lab.topology.wan
    done = traffic.ping(ns, target, ttl=1, wait=1.0)
    assert f"From {gateway} icmp_seq=1 {message}" in done.stdout, done.stdout


@pytest.mark.parametrize(("side", "target", "gateway", "message"), HOP)
def test_traceroute_shows_the_gateway_as_the_first_hop(
    lab: Lab, side: str, target: str, gateway: str, message: str
) -> None:
    family = 6 if ":" in target else 4
    ns = lab.topology.lan if side == "lan" else lab.topology.wan
    hops = traffic.traceroute(ns, target, max_hops=3, wait=0.7)
    if side == "lan":
        # hop 2 is the outside host itself: its port unreachable comes back RELATED (and
        # through NAT for IPv4)
        assert hops == [traffic.Hop(gateway, TIME_EXCEEDED[family]), traffic.Hop(target, UNREACHABLE[family])]
    else:
        # beyond the gateway the probes meet the ingress default: nothing answers
        assert hops == [traffic.Hop(gateway, TIME_EXCEEDED[family]), None, None]


# --- volume -------------------------------------------------------------------------------------


def test_large_upload_through_nat_is_intact(lab: Lab) -> None:
    sent, answer = traffic.upload(lab.topology.lan, WAN_V4, 9000, BIG, seed=11, timeout=120)
    assert answer == sent


def test_large_download_over_ipv6_is_intact(lab: Lab) -> None:
    expected, received = traffic.download(lab.topology.lan, WAN_V6, 9001, BIG, seed=12, timeout=120)
    assert received == expected


def test_large_ingress_transfer_to_an_allowed_port_is_intact(lab: Lab) -> None:
    sent, answer = traffic.upload(lab.topology.wan, LAN_V4, 587, BIG, seed=13, timeout=120)
    assert answer == sent


# --- what a scanner sees ------------------------------------------------------------------------


def test_nmap_sees_exactly_the_allowed_ports_of_the_inside_host(lab: Lab) -> None:
    # Servers listen on 22, 25, 80 and 587; the policy lets 25 and 587 in, drops the rest.
    scan = traffic.nmap_syn_scan(lab.topology.wan, LAN_V4, "1-1024")
    assert scan.ports == {25: "open", 587: "open"}
    assert scan.ignored == ("filtered", 1022)


def test_nmap_sees_nothing_of_the_gateway(lab: Lab) -> None:
    scan = traffic.nmap_syn_scan(lab.topology.wan, GW_WAN_V4, "1-1024")
    assert scan.ports == {}
    assert scan.ignored == ("filtered", 1024)  # without nfqfw: ("closed", 1024)
