"""Packet log and metrics of the real daemon in the lab: namespaces nfqo-wan / nfqo-gw / nfqo-lan.

nfqfw runs with `--metrics 127.0.0.1:9469` and a packet log limited to 5 lines per bucket
(log-limit 1/hour, so no token comes back during the test). The module's tests run in order on
one daemon; the last one floods it and stops it, for the final suppression summary.

The policy lets the outside host reach TCP 9469 on the gateway (rule metrics-port), so that only
the endpoint's loopback binding keeps it from being reachable from outside.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import lab_metrics
import pytest
from lab_metrics import Samples
from lab_wait import wait_for

from nfqfw.core import build
from nfqfw.core.packet import PROTO_UDP, SYN
from nfqfw.lab import traffic
from nfqfw.lab.daemon_ctl import Lab, down, stop_daemon, up
from nfqfw.lab.plan import GW_WAN_V4, GW_WAN_V6, LAN_V4, WAN_V4
from nfqfw.lab.topology import in_ns

pytestmark = pytest.mark.lab

PREFIX = "nfqo-"
METRICS_PORT = 9469
METRICS_URL = f"http://127.0.0.1:{METRICS_PORT}/metrics"
LAN_MAIL = 25
BURST = 5
FLOOD = 200
WAIT = 10.0  # seconds for the daemon to log or count what was sent

POLICY = f"""\
zones: {{external: [wan0], internal: [lan0]}}
ingress:                    # defaults: ingress drop, egress accept, invalid drop
  - {{name: mail, proto: tcp, to: {LAN_V4}, ports: [{LAN_MAIL}], action: accept, log: true}}
  - {{name: no-telnet, proto: tcp, ports: [23], action: reject}}
  - {{name: flood-sink, proto: udp, ports: [9999], action: drop}}
  - {{name: metrics-port, proto: tcp, to: gateway, ports: [{METRICS_PORT}], action: accept}}
options:
  log-limit: 1/hour
  log-limit-burst: {BURST}
"""

_sports = itertools.count(41000)  # a fresh source port per crafted packet keeps flows apart


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    policy = tmp_path_factory.mktemp("observe") / "policy.yaml"
    policy.write_text(POLICY)
    policy.chmod(0o600)
    with ExitStack() as stack:
        stack.callback(down, PREFIX)  # also when up() or a server fails
        the_lab = up(PREFIX, policy, args=("--metrics", f"127.0.0.1:{METRICS_PORT}"))
        stack.enter_context(traffic.TcpServer(the_lab.topology.lan, [LAN_MAIL]))
        yield the_lab


# --- helpers ----------------------------------------------------------------------------------


def daemon_lines(lab: Lab, logger: str) -> list[str]:
    """Messages of `logger` in the daemon's log, without the timestamp/level (or <N>) prefix."""
    marker = f" {logger}: "
    text = lab.state.log_file.read_text(errors="replace")
    return [line.split(marker, 1)[1] for line in text.splitlines() if marker in line]


def packet_lines(lab: Lab) -> list[str]:
    return [line for line in daemon_lines(lab, "nfqfw.packets") if line.startswith("[NFQFW ")]


def send_syn(lab: Lab, dport: int) -> int:
    """A crafted SYN from the outside host to the inside host; returns its source port."""
    sport = next(_sports)
    traffic.send_raw(lab.topology.wan, traffic.tcp_packet(WAN_V4, LAN_V4, sport, dport, SYN, seq=1))
    return sport


def scrape(lab: Lab) -> Samples:
    return lab_metrics.scrape(lab, METRICS_URL)


def verdicts(samples: Samples, action: str, reason: str, rule: str = "") -> float:
    labels = (("action", action), ("reason", reason), ("rule", rule))
    return samples.get(("nfqfw_verdicts_total", labels), 0.0)


# --- the packet log ---------------------------------------------------------------------------


def test_dropped_unsolicited_ingress_packet_is_logged(lab: Lab) -> None:
    sport = send_syn(lab, 22)
    wait_for("the drop's log line", lambda: any(f"SPT={sport} " in line for line in packet_lines(lab)), WAIT)
    [line] = [line for line in packet_lines(lab) if f"SPT={sport} " in line]
    # TTL 63: the crafted packet left the outside host with 64 and was routed once
    assert line == (
        f'[NFQFW DROP] REASON="default ingress" CT=NEW HOOK=FORWARD IN=wan0 OUT=lan0 SRC={WAN_V4} '
        f"DST={LAN_V4} LEN=40 TTL=63 PROTO=TCP SPT={sport} DPT=22 FLAGS=SYN"
    )


def test_rule_with_log_true_logs_the_new_connection_only(lab: Lab) -> None:
    sock, greeting = traffic.open_connection(lab.topology.wan, LAN_V4, LAN_MAIL)
    with sock:
        sport = sock.getsockname()[1]
        assert traffic.echo_roundtrip(sock, b"several segments of an established flow\n")
    wait_for("the rule's log line", lambda: any(f"SPT={sport} " in line for line in packet_lines(lab)), WAIT)
    time.sleep(0.5)  # the ESTABLISHED packets (none of them logged) have been processed by now
    assert greeting.startswith("hello")
    lines = [line for line in packet_lines(lab) if f"SPT={sport} " in line]
    assert lines == [
        f'[NFQFW ACCEPT] REASON="rule mail" CT=NEW HOOK=FORWARD IN=wan0 OUT=lan0 SRC={WAN_V4} '
        f"DST={LAN_V4} LEN=60 TTL=63 PROTO=TCP SPT={sport} DPT={LAN_MAIL} FLAGS=SYN"
    ]


# --- the metrics endpoint ---------------------------------------------------------------------


def test_metrics_count_verdicts_rejects_and_flows(lab: Lab) -> None:
    before = scrape(lab)
    for _ in range(3):
        send_syn(lab, 23)  # rule no-telnet: rejected with a reset
    for _ in range(2):
        send_syn(lab, 22)  # default ingress: dropped
    session, _ = traffic.open_connection(lab.topology.wan, LAN_V4, LAN_MAIL)
    with session:
        for n in range(40):  # enough packets for the latency sample (1 in 64)
            assert traffic.echo_roundtrip(session, b"%d\n" % n) == b"%d\n" % n
        after: Samples = {}

        def changed(action: str, reason: str, rule: str = "") -> float:
            return verdicts(after, action, reason, rule) - verdicts(before, action, reason, rule)

        def counted() -> bool:
            nonlocal after
            after = scrape(lab)
            return changed("reject", "rule", "no-telnet") >= 3 and changed("drop", "default ingress") >= 2

        wait_for("the rejects and drops in the metrics", counted, WAIT)
        assert changed("reject", "rule", "no-telnet") == 3
        assert changed("drop", "default ingress") == 2
        assert changed("accept", "rule", "mail") == 1
        assert changed("accept", "established") >= 80  # 40 round trips, each way
        sent = after[("nfqfw_rejects_sent_total", ())] - before.get(("nfqfw_rejects_sent_total", ()), 0.0)
        assert sent == 3
        assert after[("nfqfw_flows", (("proto", "tcp"), ("state", "established")))] >= 1  # the session
        flows = sum(value for (name, _), value in after.items() if name == "nfqfw_flows")
        assert after[("nfqfw_flows_max", ())] == 65536
        assert after[("nfqfw_flow_table_usage_ratio", ())] == pytest.approx(flows / 65536)
        assert after[("nfqfw_queue_kernel_drops_total", (("cause", "queue_full"), ("queue", "0")))] == 0
    total = sum(value for (name, _), value in after.items() if name == "nfqfw_verdicts_total")
    sampled = after[("nfqfw_engine_latency_seconds_count", ())]
    # verdicts are read before the timer in one scrape: a packet in between may add a sample
    assert total >= 64 and total // 64 <= sampled <= total // 64 + 1
    assert after[("nfqfw_engine_latency_seconds_sum", ())] > 0
    # the rejects are in the packet log too (their own bucket, 3 of its 5 lines)
    assert sum('REASON="rule no-telnet"' in line for line in packet_lines(lab)) == 3


def test_metrics_are_not_reachable_from_the_outside_host(lab: Lab) -> None:
    # The policy accepts TCP 9469 to the gateway, so the packets reach its TCP stack: nothing
    # listens on these addresses and the kernel resets the connection at once.
    for address in (GW_WAN_V4, GW_WAN_V6):
        assert traffic.tcp_probe(lab.topology.wan, address, METRICS_PORT).outcome == "refused", address
    assert ("nfqfw_flows_max", ()) in scrape(lab)  # while it answers on the gateway's loopback


def test_non_loopback_metrics_address_is_refused_at_start(lab: Lab, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    policy.chmod(0o600)
    argv = [sys.executable, "-m", "nfqfw", "run", "--config", str(policy), "--queue", "7"]
    argv += ["--metrics", f"0.0.0.0:{METRICS_PORT + 1}"]
    result = subprocess.run(in_ns(lab.topology.gw, *argv), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"nfqfw: --metrics 0.0.0.0:{METRICS_PORT + 1}: not a loopback address; the metrics name the "
        "policy's rules and show its traffic: add --metrics-allow-remote to serve them beyond this host"
    ]


# --- spoofed sources --------------------------------------------------------------------------


def test_spoofed_packets_are_logged_and_counted_as_invalid(lab: Lab) -> None:
    """The kernel drops them (antispoof, strict by default); samples (log-limit, burst 5) reach
    nfqfw, which logs and counts each as INVALID, "spoofed source"."""
    before = scrape(lab)
    ports = []
    for source in ("10.0.0.99", GW_WAN_V4):  # an inside address, the gateway's own, from outside
        ports.append(next(_sports))
        traffic.send_raw(
            lab.topology.wan, traffic.tcp_packet(source, LAN_V4, ports[-1], LAN_MAIL, SYN, seq=1)
        )
    spoofed = "invalid: spoofed source"
    wait_for(
        "the samples in the metrics",
        lambda: verdicts(scrape(lab), "drop", spoofed) >= verdicts(before, "drop", spoofed) + 2,
        WAIT,
    )
    assert verdicts(scrape(lab), "drop", spoofed) - verdicts(before, "drop", spoofed) == 2
    lines = [line for line in packet_lines(lab) if any(f"SPT={port} " in line for port in ports)]
    assert lines == [
        f'[NFQFW DROP] REASON="{spoofed}" CT=INVALID HOOK=PREROUTING IN=wan0 OUT= SRC={source} '
        f"DST={LAN_V4} LEN=40 TTL=64 PROTO=TCP SPT={port} DPT={LAN_MAIL} FLAGS=SYN"
        for source, port in zip(("10.0.0.99", GW_WAN_V4), ports, strict=True)
    ]


# --- a flood (last: it stops the daemon) -------------------------------------------------------


def test_a_flood_is_logged_burst_lines_and_a_suppression_count(lab: Lab) -> None:
    src, dst = build.addr(WAN_V4), build.addr(LAN_V4)
    packets = [
        build.ipv4(src, dst, PROTO_UDP, build.udp(src, dst, 30000 + n, 9999, b"flood")) for n in range(FLOOD)
    ]
    for packet in packets:
        traffic.send_raw(lab.topology.wan, packet)
    wait_for(
        "the flood's verdicts",
        lambda: verdicts(scrape(lab), "drop", "rule", "flood-sink") == FLOOD,
        WAIT,
    )
    stopped = stop_daemon(PREFIX)  # at stop the last suppressed lines are summarised
    assert stopped is not None and stopped.exit_code() == 0
    flood_lines = [line for line in packet_lines(lab) if 'REASON="rule flood-sink"' in line]
    assert len(flood_lines) == BURST
    assert all(line.endswith("DPT=9999") and "PROTO=UDP" in line for line in flood_lines)
    summaries = [line for line in daemon_lines(lab, "nfqfw.packets") if "packet log line" in line]
    held = [int(m.group(1)) for line in summaries for m in re.finditer(r"rule flood-sink: (\d+)", line)]
    assert sum(held) == FLOOD - BURST, summaries
    assert all(line.endswith("log-limit 1/hour, log-limit-burst 5)") for line in summaries)
    assert f"verdicts drop rule flood-sink: {FLOOD}" in daemon_lines(lab, "nfqfw")
