"""The kernel-side flood protections on real packets: what the kernel drops before nfqfw's queue
(the pre-filter, invalid TCP flags, the caps on first packets) and what keeps flowing.

Floods are hping3 from the lab's outside host, bounded by a packet count (and `timeout`). The
queue's own counter (/proc/net/netfilter/nfnetlink_queue, the id of the last packet queued)
tells how many packets reached nfqfw; `nfqfw rules counters` how many the kernel dropped.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nfqfw.firewall.iptables import PER_SOURCE_MEMORY
from nfqfw.kernel.queue_info import parse_queue_stats
from nfqfw.lab import traffic
from nfqfw.lab.daemon_ctl import Lab, start_daemon, stop_daemon
from nfqfw.lab.plan import LAN_V4, WAN_EXTRA_V4, WAN_V4
from nfqfw.lab.topology import add_outside_addresses, in_ns, run_in

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
PREFIX = "nfqt-"  # tests/lab/conftest.py's lab

LAB_POLICY = """\
zones:
  external: [wan0]
  internal: [lan0]
defaults: {ingress: drop, egress: accept, invalid: drop}
options: {new-rate-per-source: 200/second}
ingress:
  - {name: mail, proto: tcp, to: [10.0.0.25, "fd00::25"], ports: [25, 587], action: accept}
  - {name: no-ident, proto: tcp, ports: 113, action: reject}
"""
FLOOD = 3000  # packets per flood: 3000 at 20,000/s
TABLE_FULL = "drop new-rate per source: table full"


def queued(lab: Lab) -> dict[int, int]:
    """Packets queued so far, per queue (the id of the last one)."""
    stats = parse_queue_stats(run_in(lab.topology.gw, "cat", "/proc/net/netfilter/nfnetlink_queue"))
    return {queue: stat.id_sequence for queue, stat in stats.items()}


def hping(lab: Lab, *args: str, count: int = FLOOD, target: str = LAN_V4) -> float:
    """Send `count` packets from the outside host; returns the seconds it took."""
    argv = ["timeout", "20", "hping3", "-q", "-c", str(count), "-i", "u50", *args, target]
    started = time.monotonic()
    subprocess.run(in_ns(lab.topology.wan, *argv), capture_output=True, timeout=30)
    return time.monotonic() - started


def nfqfw(lab: Lab, *args: str) -> str:
    argv = in_ns(lab.topology.gw, sys.executable, "-m", "nfqfw", *args)
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def counters(lab: Lab) -> dict[str, int]:
    out = nfqfw(lab, "rules", "counters")
    return {m.group(1).strip(): int(m.group(2)) for m in re.finditer(r"^(.+?)\s+(\d+)$", out, re.M)}


def verdicts(lab: Lab) -> dict[str, int]:
    """nfqfw's own verdict counters."""
    status = json.loads(nfqfw(lab, "status", "--json", "--runtime-dir", str(lab.state.runtime_dir)))
    return dict(status["verdicts"])


def accepted_by_mail(lab: Lab) -> int:
    return verdicts(lab).get("accept rule mail", 0)


def connects(lab: Lab, port: int = 25) -> str:
    return traffic.tcp_probe(lab.topology.wan, LAN_V4, port, 1.5).outcome


def test_a_syn_flood_to_a_closed_port_is_dropped_before_the_queue(lab: Lab) -> None:
    before, dropped = (
        verdicts(lab).get("drop default ingress", 0),
        counters(lab).get("drop default ingress", 0),
    )
    hping(lab, "-S", "-p", "22")
    # only the log samples (bursts of 10, then 3/minute) reached nfqfw, which dropped them too
    sampled = verdicts(lab)["drop default ingress"] - before
    assert 1 <= sampled <= 11, sampled
    assert counters(lab)["drop default ingress"] - dropped == FLOOD - sampled
    assert connects(lab) == "connected"  # the open port still answers, through nfqfw
    log = lab.state.log_file.read_text()
    assert re.search(r"\[NFQFW DROP\] REASON=\"default ingress\" CT=NEW .* DPT=22 FLAGS=SYN", log)


def test_a_reject_rule_is_answered_by_the_kernel_with_nfqfws_answer(lab: Lab) -> None:
    before = queued(lab)[0]
    hping(lab, "-S", "-p", "113", count=200)
    assert connects(lab, 113) == "refused"  # the RST nfqfw would send, sent by the kernel
    assert counters(lab).get("reject rule no-ident", 0) >= 100
    assert queued(lab)[0] - before <= 12


def test_invalid_tcp_flags_never_reach_the_queue(lab: Lab) -> None:
    before, dropped = queued(lab)[0], counters(lab).get("drop invalid: tcp flags", 0)
    hping(lab, "-S", "-F", "-p", "25")  # SYN+FIN to the open port
    hping(lab, "-X", "-Y", "-F", "-U", "-P", "-p", "25", count=500)  # Christmas tree, FIN without ACK
    # (a packet or two of the lab's earlier connections may still come: TIME_WAIT's last ACKs)
    assert queued(lab)[0] - before <= 3
    assert counters(lab)["drop invalid: tcp flags"] - dropped == FLOOD + 500
    assert connects(lab) == "connected"


def test_first_packets_from_one_source_are_capped(lab: Lab) -> None:
    before, capped = accepted_by_mail(lab), counters(lab).get("drop new-rate per source", 0)
    seconds = hping(lab, "-S", "-p", "25")  # to the open port: the pre-filter lets them by, the cap does not
    passed = accepted_by_mail(lab) - before
    # 200/s in bursts of 200 (the policy's new-rate-per-source): the rest is dropped in the kernel
    assert 200 <= passed <= 200 + 200 * seconds + 20, (passed, seconds)
    assert counters(lab)["drop new-rate per source"] - capped == FLOOD - passed
    assert traffic.tcp_probe(lab.topology.lan, WAN_V4, 80).outcome == "connected"  # another source


def test_first_packets_get_a_queue_of_their_own(lab: Lab, lab_policy: Path) -> None:
    stop_daemon(PREFIX)
    start_daemon(PREFIX, lab_policy, 0, args=("--new-queue", "1"))
    try:
        before = queued(lab)
        assert sorted(before) == [0, 1]
        with traffic.TcpServer(lab.topology.wan, (8081,)):
            sock, _ = traffic.open_connection(lab.topology.lan, WAN_V4, 8081)
            with sock:
                assert traffic.echo_roundtrip(sock, b"x" * 1000) == b"x" * 1000
        after = queued(lab)
        # the SYN, and the SYN-ACK: the kernel calls the connection ASSURED at the handshake's last ACK
        assert after[1] - before[1] == 2
        assert after[0] - before[0] >= 4  # the rest of the connection (ACKs, data, FINs)
        assert "-A NFQFW-NEW -j NFQUEUE --queue-num 1" in nfqfw(lab, "rules", "show")
        status = nfqfw(lab, "status", "--runtime-dir", str(lab.state.runtime_dir))
        assert "kernel queue 1:" in status, status
    finally:
        stop_daemon(PREFIX)
        start_daemon(PREFIX, lab_policy, 0)


def test_a_reload_moves_the_pre_filter_with_the_rules(lab: Lab, lab_policy: Path) -> None:
    assert connects(lab, 22) == "timeout"
    original = lab_policy.read_text()
    try:
        lab_policy.write_text(
            original + "  - {name: ssh, proto: tcp, to: 10.0.0.25, ports: 22, action: accept}\n"
        )
        nfqfw(lab, "reload", "--runtime-dir", str(lab.state.runtime_dir))
        assert "-A NFQFW-PRE-FORWARD -d 10.0.0.25/32 -p tcp -m multiport --dports 22" in nfqfw(
            lab, "rules", "show"
        )
        assert connects(lab, 22) == "connected"
    finally:
        lab_policy.write_text(original)
        nfqfw(lab, "reload", "--runtime-dir", str(lab.state.runtime_dir))
    assert connects(lab, 22) == "timeout"


def test_a_flood_from_more_sources_than_the_per_source_table_holds(lab: Lab) -> None:
    """hping3 --rand-source fills the per-source cap's table (PER_SOURCE_TABLE sources a
    protocol) within a fraction of a second: the kernel then drops the first packet of each
    source not in it, counting it nowhere; nfqfw tells those drops from its chain's counters.
    A source seen before the flood keeps its entry (and connects); a new one is dropped until
    the flood's sources have been idle for PER_SOURCE_MEMORY and their entries go."""
    newcomer = WAN_EXTRA_V4[0]
    add_outside_addresses(lab.topology, [newcomer])
    assert connects(lab) == "connected"  # the outside host's own address: in the table now
    before = counters(lab).get(TABLE_FULL, 0)
    argv = ["timeout", "-s", "INT", "2", "hping3", "--flood", "-q", "-S", "--rand-source", "-p", "25", LAN_V4]
    subprocess.run(in_ns(lab.topology.wan, *argv), capture_output=True, timeout=30)
    flood_ended = time.monotonic()
    assert connects(lab) == "connected"
    probe = traffic.tcp_probe(lab.topology.wan, LAN_V4, 25, 1.5, source=newcomer)
    assert probe.outcome == "timeout", probe
    assert counters(lab).get(TABLE_FULL, 0) - before > 10_000
    status = nfqfw(lab, "status", "--runtime-dir", str(lab.state.runtime_dir))
    assert "new-rate per source: table full" in status, status
    # the flood's entries go after PER_SOURCE_MEMORY idle, at the next garbage collection (1 s)
    time.sleep(max(0.0, flood_ended + PER_SOURCE_MEMORY + 2 - time.monotonic()))
    probe = traffic.tcp_probe(lab.topology.wan, LAN_V4, 25, 1.5, source=newcomer)
    assert probe.outcome == "connected", probe
