"""`nfqfw lab demo`: the lab with config/policy.yaml, real traffic through nfqfw, a table of results.

Every line tries something with real sockets or tools in the namespaces and compares what was
seen with what the policy promises. The lab is always taken down at the end; the exit code is 0
only if every line came out as expected.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from nfqfw.core.packet import RST, SYN
from nfqfw.lab import traffic
from nfqfw.lab.daemon_ctl import down, up
from nfqfw.lab.plan import GW_LAN_V4, GW_WAN_V4, LAN_V4, LAN_V6, WAN_V4, WAN_V6, LabError, Topology

DEMO_PREFIX = "nfqdemo-"
REPO_POLICY = Path(__file__).resolve().parents[2] / "config" / "policy.yaml"

WEB, SMB, DNS = 80, 445, 53  # on the outside host
SSH, SMTP = 22, 25  # on the inside host
DROP_TIMEOUT = 2.0  # seconds a client waits before calling a connection attempt dropped
REJECT_FAST = 1.0  # a reject must be answered within this many seconds
RST_SEQ_DISTANCE = 1 << 30  # far outside any window: the window is at most 1 GiB (scale 14)
SPOOFED_SOURCE = "10.0.0.99"  # an inside address no inside host has
SETTLE = 0.5  # seconds for a crafted packet to arrive, if it is let through


@dataclass(frozen=True)
class Line:
    tried: str
    expected: str
    seen: str
    ok: bool


Check = Callable[[Topology], Line]

COLUMNS = (("tried", 55), ("expected", 34), ("seen", 35))


def run_demo(policy: str | Path = REPO_POLICY, prefix: str = DEMO_PREFIX, out: TextIO = sys.stdout) -> int:
    out.write(f"nfqfw lab demo: policy {policy}, namespaces {prefix}wan / {prefix}gw / {prefix}lan\n")
    out.write("bringing the lab up (namespaces, NAT, nfqfw run in the gateway)...\n")
    out.flush()
    lines: list[Line] = []
    try:
        lab = up(prefix, policy)
        assert lab.daemon is not None
        out.write(
            f"nfqfw is running in {lab.topology.gw} (pid {lab.daemon.pid}, log {lab.daemon.log_file})\n\n"
        )
        _header(out)
        for line in _run_checks(lab.topology):
            lines.append(line)
            _row(out, line)
    except LabError as err:
        out.write(f"nfqfw lab demo: {err}\n")
        return 1
    finally:
        down(prefix)
    failed = [line for line in lines if not line.ok]
    out.write(f"\n{len(lines) - len(failed)} of {len(lines)} as expected; lab taken down.\n")
    return 1 if failed or not lines else 0


def _run_checks(topology: Topology) -> Iterator[Line]:
    with (
        traffic.TcpServer(topology.wan, [WEB, SMB]),
        traffic.UdpEchoServer(topology.wan, [DNS]),
        traffic.TcpServer(topology.lan, [SSH, SMTP]),
    ):
        for check in CHECKS:
            try:
                yield check(topology)
            except Exception as err:  # a broken check is a failed line, not a crashed demo
                yield Line(check.__name__.replace("_", " "), "", f"error: {err}", False)


# --- the checks -------------------------------------------------------------------------------


def egress_tcp_v4(t: Topology) -> Line:
    probe = traffic.tcp_probe(t.lan, WAN_V4, WEB)
    seen = _connected_as(probe)
    return Line(
        f"egress TCP  inside -> {WAN_V4}:{WEB} (masquerade)", f"connects, NAT to {GW_WAN_V4}", seen,
        probe.text == f"hello {GW_WAN_V4}",
    )  # fmt: skip


def egress_tcp_v6(t: Topology) -> Line:
    probe = traffic.tcp_probe(t.lan, WAN_V6, WEB)
    return Line(
        f"egress TCP  inside -> [{WAN_V6}]:{WEB}", f"connects, from {LAN_V6}", _connected_as(probe),
        probe.text == f"hello {LAN_V6}",
    )  # fmt: skip


def egress_udp_v4(t: Topology) -> Line:
    probe = traffic.udp_probe(t.lan, WAN_V4, DNS)
    seen = f"reply, seen from {probe.text.split()[0]}" if probe.outcome == "reply" else probe.outcome
    return Line(
        f"egress UDP  inside -> {WAN_V4}:{DNS}", f"reply, NAT to {GW_WAN_V4}", seen,
        probe.text == f"{GW_WAN_V4} ping",
    )  # fmt: skip


def egress_udp_v6(t: Topology) -> Line:
    probe = traffic.udp_probe(t.lan, WAN_V6, DNS)
    seen = f"reply, seen from {probe.text.split()[0]}" if probe.outcome == "reply" else probe.outcome
    return Line(
        f"egress UDP  inside -> [{WAN_V6}]:{DNS}", f"reply, from {LAN_V6}", seen,
        probe.text == f"{LAN_V6} ping",
    )  # fmt: skip


def egress_ping_v4(t: Topology) -> Line:
    return _ping_line(t, WAN_V4)


def egress_ping_v6(t: Topology) -> Line:
    return _ping_line(t, WAN_V6)


def _ping_line(t: Topology, host: str) -> Line:
    done = traffic.ping(t.lan, host, count=2)
    seen = "2 replies" if done.returncode == 0 else f"no reply (ping exit {done.returncode})"
    return Line(f"egress ICMP inside -> {host} (ping)", "echo replies", seen, done.returncode == 0)


def ingress_unsolicited_v4(t: Topology) -> Line:
    return _dropped_line(t, LAN_V4, SSH)


def ingress_unsolicited_v6(t: Topology) -> Line:
    return _dropped_line(t, LAN_V6, SSH)


def _dropped_line(t: Topology, host: str, port: int) -> Line:
    probe = traffic.tcp_probe(t.wan, host, port, timeout=DROP_TIMEOUT)
    where = f"[{host}]" if ":" in host else host
    return Line(
        f"ingress TCP outside -> {where}:{port} (no rule)", "dropped: client times out",
        _outcome_text(probe), probe.outcome == "timeout",
    )  # fmt: skip


def ingress_mail_v4(t: Topology) -> Line:
    probe = traffic.tcp_probe(t.wan, LAN_V4, SMTP)
    return Line(
        f"ingress TCP outside -> {LAN_V4}:{SMTP} (rule mail)", "connects", _connected_as(probe),
        probe.outcome == "connected",
    )  # fmt: skip


def ingress_forward_v4(t: Topology) -> Line:
    """The mail server published on the gateway's outside address (forward smtp): it sees the
    client's own address, the translation is the destination's only."""
    probe = traffic.tcp_probe(t.wan, GW_WAN_V4, SMTP)
    return Line(
        f"ingress TCP outside -> {GW_WAN_V4}:{SMTP} (forward smtp)", f"mail server, from {WAN_V4}",
        _connected_as(probe), probe.text == f"hello {WAN_V4}",
    )  # fmt: skip


def ingress_no_forward_v4(t: Topology) -> Line:
    probe = traffic.tcp_probe(t.wan, GW_WAN_V4, WEB, timeout=DROP_TIMEOUT)
    return Line(
        f"ingress TCP outside -> {GW_WAN_V4}:{WEB} (no forward)", "dropped: client times out",
        _outcome_text(probe), probe.outcome == "timeout",
    )  # fmt: skip


def egress_rejected(t: Topology) -> Line:
    probe = traffic.tcp_probe(t.lan, WAN_V4, SMB, timeout=3.0)
    return Line(
        f"egress TCP  inside -> {WAN_V4}:{SMB} (no-smb-out)",
        f"refused within {REJECT_FAST:g} s (reset)",
        _outcome_text(probe),
        probe.outcome == "refused" and probe.seconds < REJECT_FAST,
    )


def forged_rst(t: Topology) -> Line:
    """A live connection survives an out-of-window RST forged by the outside host."""
    tried = "forged RST, seq out of window, into live conn"
    expected = "ignored: connection carries data"
    sock, _ = traffic.open_connection(t.lan, WAN_V4, WEB)
    with sock:
        with traffic.Capture(t.wan, "eth0") as capture:
            traffic.echo_roundtrip(sock, b"before")
            from_server = [s for s in capture.tcp(0.1, port=WEB) if s.outgoing and s.packet.sport == WEB]
        if not from_server:
            return Line(tried, expected, "no segment from the server captured", False)
        last = from_server[-1]
        seq = (last.packet.seq + RST_SEQ_DISTANCE) % (1 << 32)
        # As the server: its address and port, to the client as the outside sees it (after NAT).
        rst = traffic.tcp_packet(WAN_V4, last.dst, WEB, last.packet.dport, RST, seq)
        traffic.send_raw(t.wan, rst)
        time.sleep(0.2)
        try:
            alive = traffic.echo_roundtrip(sock, b"after") == b"after"
        except OSError as err:
            return Line(tried, expected, f"connection broken: {err}", False)
    return Line(tried, expected, "echo after RST works" if alive else "no echo after RST", alive)


def traceroute_hop(t: Topology) -> Line:
    hops = traffic.traceroute(t.lan, WAN_V4, max_hops=2, wait=1.0)
    seen = ", ".join("no answer" if hop is None else hop.address for hop in hops)
    expected = f"{GW_LAN_V4}, then {WAN_V4}"
    ok = [hop.address if hop else None for hop in hops] == [GW_LAN_V4, WAN_V4]
    return Line(f"traceroute  inside -> {WAN_V4}", expected, seen, ok)


def spoofed_source(t: Topology) -> Line:
    """A SYN to the port rule mail accepts, but from outside with an inside source address."""
    sport = 40000
    syn = traffic.tcp_packet(SPOOFED_SOURCE, LAN_V4, sport, SMTP, SYN, 1000)
    with traffic.Capture(t.lan, "eth0") as inside:
        traffic.send_raw(t.wan, syn)
        arrived = [s for s in inside.tcp(SETTLE, port=sport) if not s.outgoing]
    return Line(
        f"SYN from outside -> {LAN_V4}:{SMTP}, src {SPOOFED_SOURCE}", "dropped: spoofed source",
        "arrived inside" if arrived else "never arrived", not arrived,
    )  # fmt: skip


CHECKS: tuple[Check, ...] = (
    egress_tcp_v4,
    egress_tcp_v6,
    egress_udp_v4,
    egress_udp_v6,
    egress_ping_v4,
    egress_ping_v6,
    ingress_unsolicited_v4,
    ingress_unsolicited_v6,
    ingress_mail_v4,
    ingress_forward_v4,
    ingress_no_forward_v4,
    egress_rejected,
    forged_rst,
    traceroute_hop,
    spoofed_source,
)


# --- output -----------------------------------------------------------------------------------


def _connected_as(probe: traffic.Probe) -> str:
    if probe.outcome != "connected":
        return _outcome_text(probe)
    return f"connected, seen from {probe.text.removeprefix('hello ')}"


def _outcome_text(probe: traffic.Probe) -> str:
    return f"{probe.outcome} after {probe.seconds:.2f} s"


def _header(out: TextIO) -> None:
    out.write("".join(title.ljust(width) for title, width in COLUMNS) + "OK\n")
    out.write("".join(("-" * (width - 1)).ljust(width) for _, width in COLUMNS) + "--\n")


def _row(out: TextIO, line: Line) -> None:
    cells = (line.tried, line.expected, line.seen)
    text = "".join(cell.ljust(width) for cell, (_, width) in zip(cells, COLUMNS, strict=True))
    out.write(text + ("ok" if line.ok else "FAILED") + "\n")
    out.flush()
