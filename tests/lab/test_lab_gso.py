"""GSO packets through nfqfw in the lab (conftest's `lab`).

Forwarded TCP reaches the gateway's FORWARD hook as GSO super-packets (the sender's TSO over
veth, up to 64 KB). nfqfw asks the kernel to queue them whole (NFQA_CFG_F_GSO): each arrives as
its first 3840 bytes (the copy range) and is decided on its headers, with the lengths of its IP
header. Shown here on real kernel traffic: a bulk download reaches nfqfw as far fewer packets
than MTU-sized segments, many of them longer than the copy range, and arrives intact with no
packet found INVALID (window tracking on the wrong lengths would soon find ACKs for data it
never saw); an out-of-window RST forged in the middle of a bulk transfer is still dropped, by
nfqfw's window check. The control: the same download with `nfqfw run --no-gso` reaches nfqfw
as MTU-sized packets, none longer than the copy range. And the flags request itself, on a queue
that already has packets waiting in its socket (a restart under traffic): they reach the callback
and get their verdicts before the kernel's answer is taken.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lab_policies import MAIL_IN_NO_SMB_OUT

from nfqfw.core.packet import RST
from nfqfw.kernel.queue_info import LONGER_THAN_COPY_RANGE, parse_queue_stats
from nfqfw.lab import traffic
from nfqfw.lab.daemon_ctl import Lab, start_daemon, stop_daemon
from nfqfw.lab.plan import GW_WAN_V4, WAN_V4, WAN_V6
from nfqfw.lab.topology import in_ns, run_in

pytestmark = pytest.mark.lab

LAB_POLICY = MAIL_IN_NO_SMB_OUT
SOURCE = 9001  # the outside host's byte source (conftest): sends "<bytes> <seed>" bytes of a pattern
BIG = 64 << 20
SEGMENT = 1448  # data bytes of an MTU-sized segment (1500 - IPv4 - TCP with timestamps)
MTU_SEGMENTS = BIG // SEGMENT  # 46,341 data packets for BIG bytes without GSO (IPv6: more)
OUT_OF_WINDOW = 1 << 30  # far outside any TCP window here (Linux's default buffers: a few MB)
SETTLE = 0.5  # seconds for crafted packets to arrive before the capture is read
REPO = Path(__file__).resolve().parents[2]


def status(lab: Lab) -> dict[str, Any]:
    """`nfqfw status --json` of the lab's daemon."""
    argv = [sys.executable, "-m", "nfqfw", "status", "--json", "--runtime-dir", str(lab.state.runtime_dir)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def status_text(lab: Lab) -> list[str]:
    argv = [sys.executable, "-m", "nfqfw", "status", "--runtime-dir", str(lab.state.runtime_dir)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60).stdout.splitlines()


def invalid_drops(verdicts: dict[str, int]) -> dict[str, int]:
    return {reason: count for reason, count in verdicts.items() if reason.startswith("drop invalid")}


def queued_so_far(lab: Lab) -> int:
    """Packets the kernel has queued to queue 0 since it was bound (its packet id sequence)."""
    stats = parse_queue_stats(run_in(lab.topology.gw, "cat", "/proc/net/netfilter/nfnetlink_queue"))
    return stats[0].id_sequence


def download_counted(lab: Lab, server: str, seed: int) -> tuple[int, int, dict[str, int]]:
    """Download BIG bytes through the gateway and check them; (packets the kernel queued to
    nfqfw meanwhile, of those longer than the copy range, INVALID drops by reason)."""
    before, queued = status(lab), queued_so_far(lab)
    expected, received = traffic.download(lab.topology.lan, server, SOURCE, BIG, seed=seed, timeout=120)
    assert received == expected
    after = status(lab)
    longer = after["adapter"][LONGER_THAN_COPY_RANGE] - before["adapter"][LONGER_THAN_COPY_RANGE]
    invalid = invalid_drops(after["verdicts"])
    for reason, count in invalid_drops(before["verdicts"]).items():
        invalid[reason] -= count
    return queued_so_far(lab) - queued, longer, {reason: n for reason, n in invalid.items() if n}


@pytest.mark.parametrize("server", [WAN_V4, WAN_V6])
def test_a_bulk_download_reaches_nfqfw_as_gso_packets_and_arrives_intact(lab: Lab, server: str) -> None:
    assert "GSO packets on" in status_text(lab)[4]
    queued, longer, invalid = download_counted(lab, server, seed=31)
    # Data and ACKs together, far fewer than the data segments alone would be without GSO.
    assert 0 < longer < queued < MTU_SEGMENTS // 4, (longer, queued)
    assert invalid == {}  # every super-packet was in window: tracked with its IP length


def test_an_out_of_window_rst_in_the_middle_of_a_bulk_transfer_is_dropped(lab: Lab) -> None:
    # IPv6, routed: the gateway's kernel conntrack (which runs for the IPv4 masquerade) cannot
    # be what stops the forgery; it reaches nfqfw's FORWARD hook as it would reach the host.
    t, total, seed = lab.topology, 256 << 20, 32
    expected = hashlib.sha256()
    for chunk in traffic.pattern(total, seed):
        expected.update(chunk)
    before = status(lab)
    with traffic.socket_in(t.lan, socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect((WAN_V6, SOURCE))
        sock.sendall(f"{total} {seed}\n".encode())
        received, got = hashlib.sha256(), 0
        with traffic.Capture(t.wan, "eth0") as wan_side:
            while got < 32 << 20:  # bulk, at full speed: GSO packets; then stop reading
                got += len(data := sock.recv(1 << 20))
                received.update(data)
            sent = [s for s in wan_side.tcp(port=SOURCE) if s.outgoing and s.packet.payload_len]
        assert max(s.packet.length for s in sent) > 3840  # the server's segments are GSO packets
        last = sent[-1].packet
        forged = [
            traffic.tcp_packet(WAN_V6, sent[-1].dst, SOURCE, last.dport, RST, seq)
            for seq in (
                (last.seq + last.payload_len + OUT_OF_WINDOW + n * 1000) % (1 << 32) for n in range(3)
            )
        ]
        with traffic.Capture(t.lan, "eth0") as lan_side:
            for packet in forged:
                traffic.send_raw(t.wan, packet)
            arrived = [s for s in lan_side.tcp(SETTLE, port=SOURCE) if s.packet.tcp_flags & RST]
        assert arrived == []
        while data := sock.recv(1 << 20):  # the rest of the transfer, after the forgeries
            got += len(data)
            received.update(data)
    assert (got, received.hexdigest()) == (total, expected.hexdigest())
    invalid = invalid_drops(status(lab)["verdicts"])
    for reason, count in invalid_drops(before["verdicts"]).items():
        invalid[reason] -= count
    assert {reason: n for reason, n in invalid.items() if n} == {
        "drop invalid: tcp: SEQ is over the upper bound (over the window of the receiver)": 3
    }


@pytest.fixture
def without_gso(lab: Lab, lab_policy: Path) -> Iterator[None]:
    """The lab's daemon restarted with --no-gso, and again as it was afterwards."""
    prefix = lab.topology.prefix
    stop_daemon(prefix)
    try:
        start_daemon(prefix, lab_policy, args=("--no-gso",))
        yield
    finally:
        stop_daemon(prefix)
        start_daemon(prefix, lab_policy)


def test_with_no_gso_the_kernel_hands_over_mtu_sized_packets(lab: Lab, without_gso: None) -> None:
    assert "GSO packets off" in status_text(lab)[4]
    queued, longer, invalid = download_counted(lab, WAN_V4, seed=33)
    assert (longer, invalid) == (0, {})
    assert queued > MTU_SEGMENTS  # every data segment, and the ACKs


# In the outside host's namespace (no nfqfw there): queue 7 bound, 40 datagrams sent through its
# OUTPUT rule while nobody reads the queue's socket, then the GSO flag asked for.
FLAGS_UNDER_TRAFFIC = f"""
import json, socket, subprocess
from netfilterqueue import NetfilterQueue, COPY_PACKET
from nfqfw.kernel.queue_info import COPY_RANGE, read_queue_stats
from nfqfw.kernel.queueflags import NFQA_CFG_F_GSO, set_queue_flags
seen = []
queue = NetfilterQueue()
queue.bind(7, lambda p: (seen.append(p.get_payload()[-4:]), p.accept()), 1024, COPY_PACKET, COPY_RANGE)
rule = ["-p", "udp", "--dport", "9", "-j", "NFQUEUE", "--queue-num", "7"]
subprocess.run(["iptables", "-w", "-I", "OUTPUT", *rule], check=True)
try:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for n in range(40):
            sock.sendto(n.to_bytes(4, "big"), ("{GW_WAN_V4}", 9))
    waiting = read_queue_stats()[7].total
    set_queue_flags(queue, 7, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO)
    print(json.dumps({{"waiting": waiting, "seen": [int.from_bytes(s, "big") for s in seen],
                      "after": read_queue_stats()[7].total}}))
finally:
    subprocess.run(["iptables", "-w", "-D", "OUTPUT", *rule], check=True)
    queue.unbind()
"""


def test_packets_waiting_when_the_flags_are_asked_for_get_their_verdicts(lab: Lab) -> None:
    argv = in_ns(lab.topology.wan, sys.executable, "-c", FLAGS_UNDER_TRAFFIC)
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"waiting": 40, "seen": list(range(40)), "after": 0}
