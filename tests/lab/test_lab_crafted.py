"""Packets crafted with scapy and sent from the outside host through nfqfw's gateway.

Captures on the inside host's eth0 show what got through; captures on the outside host's eth0
show what came back. Each negative case has a positive control (a crafted SYN, an in-window
RST) proving the crafted packets themselves would arrive and act if nfqfw let them.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from nfqfw.core.packet import ACK, RST, SYN
from nfqfw.lab import traffic
from nfqfw.lab.daemon_ctl import Lab
from nfqfw.lab.plan import GW_LAN_V4, GW_WAN_V4, GW_WAN_V6, LAN_V4, LAN_V6, WAN_V4, WAN_V6
from nfqfw.lab.topology import in_ns

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
"""

SETTLE = 0.5  # seconds to let crafted packets and any answers arrive before reading captures
OUT_OF_WINDOW = 1 << 30  # far outside any TCP window (at most 2**30 with window scale 14)
_sports = itertools.count(40000)  # a fresh source port per crafted probe keeps flows apart


def ip_layer(src: str, dst: str) -> IP | IPv6:
    return IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)


INSIDE = [pytest.param(WAN_V4, LAN_V4, id="ipv4"), pytest.param(WAN_V6, LAN_V6, id="ipv6")]


@pytest.mark.parametrize(("outside", "inside"), INSIDE)
def test_crafted_syn_to_an_allowed_port_gets_through(lab: Lab, outside: str, inside: str) -> None:
    t, sport = lab.topology, next(_sports)
    with traffic.Capture(t.lan, "eth0") as lan_side, traffic.Capture(t.wan, "eth0") as wan_side:
        traffic.send_raw(
            t.wan, bytes(ip_layer(outside, inside) / TCP(sport=sport, dport=25, flags="S", seq=1000))
        )
        arrived = [s.packet.tcp_flags for s in lan_side.tcp(SETTLE, port=sport) if not s.outgoing]
        answers = [s.packet for s in wan_side.tcp(port=sport) if not s.outgoing]
    # The SYN arrives and the server answers; the outside host's kernel, which knows nothing of
    # this connection, then resets it (that RST arrives too).
    assert arrived[:1] == [SYN]
    assert [(p.tcp_flags, p.ack) for p in answers][:1] == [(SYN | ACK, 1001)]


@pytest.mark.parametrize(("outside", "inside"), INSIDE)
@pytest.mark.parametrize(("name", "flags"), [("ACK without SYN", "A"), ("XMAS", "FPU"), ("NULL", "")])
def test_crafted_invalid_segments_are_dropped(
    lab: Lab, outside: str, inside: str, name: str, flags: str
) -> None:
    t, sport = lab.topology, next(_sports)
    segment = TCP(sport=sport, dport=25, flags=flags, seq=5000, ack=7000 if "A" in flags else 0)
    with traffic.Capture(t.lan, "eth0") as lan_side, traffic.Capture(t.wan, "eth0") as wan_side:
        traffic.send_raw(t.wan, bytes(ip_layer(outside, inside) / segment))
        arrived = lan_side.tcp(SETTLE, port=sport)
        answers = [s for s in wan_side.tcp(port=sport) if not s.outgoing]
    assert arrived == [], name  # never reached the inside host (an ACK would have drawn its RST)
    assert answers == [], name  # and nobody answered


def _live_connection_segment(lab: Lab, server: str, port: int) -> tuple[socket.socket, traffic.Seen]:
    """A live connection from the inside host to `server`, and the last data segment the server
    sent on it, as captured on the outside host (so after NAT for IPv4)."""
    t = lab.topology
    sock, _ = traffic.open_connection(t.lan, server, port)
    with traffic.Capture(t.wan, "eth0") as wan_side:
        assert traffic.echo_roundtrip(sock, b"before") == b"before"
        sent = [s for s in wan_side.tcp(0.1, port=port) if s.outgoing and s.packet.payload_len]
    assert sent, "no data segment from the server captured"
    return sock, sent[-1]


@pytest.mark.parametrize("server", [WAN_V4, WAN_V6])
def test_out_of_window_rst_does_not_kill_a_live_connection(lab: Lab, server: str) -> None:
    t = lab.topology
    sock, last = _live_connection_segment(lab, server, 8080)
    with sock:
        seq = (last.packet.seq + last.packet.payload_len + OUT_OF_WINDOW) % (1 << 32)
        # The server's address and port, to the client's address and port as seen outside.
        rst = ip_layer(server, last.dst) / TCP(sport=8080, dport=last.packet.dport, flags="R", seq=seq)
        with traffic.Capture(t.lan, "eth0") as lan_side:
            traffic.send_raw(t.wan, bytes(rst))
            arrived = [s for s in lan_side.tcp(SETTLE) if s.packet.tcp_flags & RST]
        assert arrived == []  # nfqfw dropped it as INVALID
        assert traffic.echo_roundtrip(sock, b"after") == b"after"


@pytest.mark.parametrize("server", [WAN_V4, WAN_V6])
def test_in_window_rst_is_let_through_and_resets_the_connection(lab: Lab, server: str) -> None:
    # The control for the test above: the same forgery with the exact next sequence number is a
    # valid RST, which conntrack (kernel or nfqfw) must let pass.
    t = lab.topology
    sock, last = _live_connection_segment(lab, server, 8080)
    with sock:
        seq = (last.packet.seq + last.packet.payload_len) % (1 << 32)
        rst = ip_layer(server, last.dst) / TCP(sport=8080, dport=last.packet.dport, flags="R", seq=seq)
        with traffic.Capture(t.lan, "eth0") as lan_side:
            traffic.send_raw(t.wan, bytes(rst))
            arrived = [s for s in lan_side.tcp(SETTLE) if s.packet.tcp_flags & RST]
        assert len(arrived) == 1
        time.sleep(0.1)
        with pytest.raises(ConnectionResetError):
            traffic.echo_roundtrip(sock, b"after")


# --- spoofed source addresses (options: antispoof, strict by default) ----------------------------

REPO = Path(__file__).resolve().parents[2]
SPOOFED = "invalid: spoofed source"
SPOOFED_FROM_OUTSIDE = [
    pytest.param("10.0.0.99", LAN_V4, id="ipv4-inside-source"),
    pytest.param(GW_WAN_V4, LAN_V4, id="ipv4-gateway-wan-address"),
    pytest.param(GW_LAN_V4, LAN_V4, id="ipv4-gateway-lan-address"),
    pytest.param("fd00::99", LAN_V6, id="ipv6-inside-source"),
    pytest.param(GW_WAN_V6, LAN_V6, id="ipv6-gateway-wan-address"),
]


def nfqfw(lab: Lab, *args: str) -> str:
    argv = in_ns(lab.topology.gw, sys.executable, "-m", "nfqfw", *args)
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def spoofed_drops(lab: Lab) -> tuple[int, int]:
    """(packets nfqfw dropped as spoofed: the kernel's log samples, packets the kernel dropped)."""
    status = json.loads(nfqfw(lab, "status", "--json", "--runtime-dir", str(lab.state.runtime_dir)))
    kernel = json.loads(nfqfw(lab, "rules", "counters", "--json"))
    return status["verdicts"].get(f"drop {SPOOFED}", 0), kernel.get(f"drop {SPOOFED}", 0)


def syn_from_outside(lab: Lab, source: str, inside: str) -> tuple[list[traffic.Seen], list[traffic.Seen]]:
    """A SYN from the outside host to `inside`:25 (rule mail accepts it) with source `source`:
    the segments that arrived inside, and whatever came back outside."""
    t, sport = lab.topology, next(_sports)
    with traffic.Capture(t.lan, "eth0") as lan_side, traffic.Capture(t.wan, "eth0") as wan_side:
        traffic.send_raw(
            t.wan, bytes(ip_layer(source, inside) / TCP(sport=sport, dport=25, flags="S", seq=1))
        )
        arrived = [s for s in lan_side.tcp(SETTLE, port=sport) if not s.outgoing]
        answers = [s for s in wan_side.tcp(port=sport) if not s.outgoing]
    return arrived, answers


@pytest.mark.parametrize(("source", "inside"), SPOOFED_FROM_OUTSIDE)
def test_spoofed_sources_from_outside_are_dropped(lab: Lab, source: str, inside: str) -> None:
    # The same SYN from the outside host's own address gets through
    # (test_crafted_syn_to_an_allowed_port_gets_through).
    before = spoofed_drops(lab)
    arrived, answers = syn_from_outside(lab, source, inside)
    assert (arrived, answers) == ([], [])
    sampled, dropped = (now - then for now, then in zip(spoofed_drops(lab), before, strict=True))
    assert sampled + dropped == 1  # a sample for the packet log (nfqfw drops it), or the kernel's drop
    if sampled:
        log = lab.state.log_file.read_text()
        assert re.search(
            rf'\[NFQFW DROP\] REASON="{SPOOFED}" CT=INVALID HOOK=PREROUTING IN=wan0 OUT= SRC={source} ', log
        )


def test_a_flood_of_spoofed_packets_is_dropped_by_the_kernel_with_samples(lab: Lab) -> None:
    before = spoofed_drops(lab)
    for _ in range(40):
        traffic.send_raw(
            lab.topology.wan, bytes(ip_layer("10.0.0.98", LAN_V4) / TCP(sport=next(_sports), dport=25))
        )
    time.sleep(SETTLE)
    sampled, dropped = (now - then for now, then in zip(spoofed_drops(lab), before, strict=True))
    assert sampled + dropped == 40
    assert sampled <= 10 and dropped >= 30  # the sample: log-limit's burst (10), then 3/minute


def test_loose_antispoof_drops_only_what_the_gateway_cannot_route(lab: Lab, lab_policy: Path) -> None:
    """loose: an inside source from outside is routable (through lan0): it passes, and the
    policy accepts the SYN; the gateway's own address is still dropped."""

    def reload(text: str) -> None:
        lab_policy.write_text(text)
        nfqfw(lab, "reload", "--runtime-dir", str(lab.state.runtime_dir))

    reload(LAB_POLICY + "options: {antispoof: loose}\n")
    try:
        assert len(syn_from_outside(lab, "10.0.0.97", LAN_V4)[0]) == 1
        assert syn_from_outside(lab, GW_WAN_V4, LAN_V4)[0] == []
    finally:
        reload(LAB_POLICY)
    assert syn_from_outside(lab, "10.0.0.97", LAN_V4)[0] == []  # strict again
