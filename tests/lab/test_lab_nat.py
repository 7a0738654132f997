"""The policy's nat section on real packets (conftest's `lab`, whose MASQUERADE is left out since
the policy has its own): egress through nfqfw's masquerade, forwards to the inside server on the
public address and on a mapped port, restricted by `from`, hairpin from the inside, a port
without forward staying closed, IPv4 and IPv6; the counters and `rules show`; and last a reload
that removes a forward, cutting new and (recheck) existing forwarded connections."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nfqfw.core.build import addr
from nfqfw.core.decode import decode
from nfqfw.core.packet import ACK, SYN
from nfqfw.lab import traffic
from nfqfw.lab.daemon_ctl import Lab
from nfqfw.lab.plan import GW_LAN_V4, GW_WAN_V4, GW_WAN_V6, LAN_V4, WAN_V4, WAN_V6
from nfqfw.lab.topology import run_in
from nfqfw.observe.capture import CaptureReader

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
SMTP, SSH, WEB = 25, 22, 80
DROP_WAIT = 1.5  # seconds a connection attempt waits before it counts as dropped
RELOAD_WAIT = 10.0

LAB_POLICY = """\
zones:
  external: [wan0]
  internal: {interfaces: [lan0], networks: [10.0.0.0/24, 'fd00::/64']}
defaults: {ingress: drop, egress: accept, invalid: drop}
options:  # the gateway's own addresses, for replay (forwards without an address are to them)
  gateway-addresses: [203.0.113.1, '2001:db8:1::1']
nat:
  masquerade:
    - {out: wan0, from: [10.0.0.0/24, 'fd00::/64']}
  forward:
    - {name: smtp, proto: tcp, in: wan0, ports: 25, to: 10.0.0.25, address: 203.0.113.1}
    - {name: ssh-alt, proto: tcp, in: wan0, ports: 2222, to: 10.0.0.25, to-port: 22}
    - {name: web-lab, proto: tcp, in: wan0, ports: 8080, to: 10.0.0.25, to-port: 80, from: 203.0.113.10}
    - {name: web-office, proto: tcp, in: wan0, ports: 8081, to: 10.0.0.25, to-port: 80, from: 198.51.100.0/24}
    - {name: smtp6, proto: tcp, in: wan0, ports: 25, to: 'fd00::25', address: '2001:db8:1::1'}
"""
WITHOUT_SMTP = LAB_POLICY.replace(
    "    - {name: smtp, proto: tcp, in: wan0, ports: 25, to: 10.0.0.25, address: 203.0.113.1}\n", ""
)


def nfqfw(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "nfqfw", *args, "--runtime-dir", str(lab.state.runtime_dir)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)


def status(lab: Lab) -> dict[str, Any]:
    done = nfqfw(lab, "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_egress_leaves_through_the_policy_s_masquerade(lab: Lab) -> None:
    probe = traffic.tcp_probe(lab.topology.lan, WAN_V4, WEB)
    assert (probe.outcome, probe.text) == ("connected", f"hello {GW_WAN_V4}")
    six = traffic.tcp_probe(lab.topology.lan, WAN_V6, WEB)  # IPv6 masquerade: this kernel has it
    assert (six.outcome, six.text) == ("connected", f"hello {GW_WAN_V6}")
    udp = traffic.udp_probe(lab.topology.lan, WAN_V4, 53)
    assert (udp.outcome, udp.text) == ("reply", f"{GW_WAN_V4} ping")
    # The lab added no MASQUERADE of its own: the only one is nfqfw's.
    saved = run_in(lab.topology.gw, "iptables-save", "-t", "nat")
    assert [line for line in saved.splitlines() if "MASQUERADE" in line] == [
        "-A NFQFW-POSTROUTING -m mark --mark 0x40000000/0x40000000 -m comment --comment hairpin "
        "-j MASQUERADE",
        "-A NFQFW-POSTROUTING -s 10.0.0.0/24 -o wan0 -m comment --comment masquerade -j MASQUERADE",
    ]


def test_a_forward_on_the_public_address_reaches_the_inside_server(lab: Lab) -> None:
    probe = traffic.tcp_probe(lab.topology.wan, GW_WAN_V4, SMTP)
    assert (probe.outcome, probe.text) == ("connected", f"hello {WAN_V4}")  # the client's own address
    six = traffic.tcp_probe(lab.topology.wan, GW_WAN_V6, SMTP)
    assert (six.outcome, six.text) == ("connected", f"hello {WAN_V6}")


def test_a_forward_on_a_mapped_port(lab: Lab) -> None:
    probe = traffic.tcp_probe(lab.topology.wan, GW_WAN_V4, 2222)
    assert (probe.outcome, probe.text) == ("connected", f"hello {WAN_V4}")  # the server on port 22


def test_a_forward_restricted_by_from(lab: Lab) -> None:
    admitted = traffic.tcp_probe(lab.topology.wan, GW_WAN_V4, 8080)  # from: 203.0.113.10, the lab's
    assert (admitted.outcome, admitted.text) == ("connected", f"hello {WAN_V4}")
    refused = traffic.tcp_probe(lab.topology.wan, GW_WAN_V4, 8081, timeout=DROP_WAIT)  # another source
    assert refused.outcome == "timeout"


def test_ports_without_a_forward_stay_closed(lab: Lab) -> None:
    for port in (WEB, SSH, 587):
        assert traffic.tcp_probe(lab.topology.wan, GW_WAN_V4, port, timeout=DROP_WAIT).outcome == "timeout"
    # The inside server's own address is not published: no rule admits it untranslated.
    assert traffic.tcp_probe(lab.topology.wan, LAN_V4, SMTP, timeout=DROP_WAIT).outcome == "timeout"


def test_hairpin_from_the_inside(lab: Lab) -> None:
    """An inside host to the public address and port reaches the inside server, which sees the
    gateway's inside address (so its replies come back through the gateway)."""
    probe = traffic.tcp_probe(lab.topology.lan, GW_WAN_V4, SMTP)
    assert (probe.outcome, probe.text) == ("connected", f"hello {GW_LAN_V4}")


def test_the_forwards_are_counted_and_shown(lab: Lab) -> None:
    verdicts = status(lab)["verdicts"]
    assert verdicts["accept forward smtp"] >= 2  # from outside, and the hairpin connection
    assert verdicts["accept forward smtp6"] >= 1
    assert verdicts["accept forward ssh-alt"] >= 1
    assert verdicts["accept forward web-lab"] >= 1
    assert "accept forward web-office" not in verdicts
    assert status(lab)["zones"]["external->internal accept"] >= 4  # smtp, smtp6, ssh-alt, web-lab
    shown = subprocess.run(
        ["ip", "netns", "exec", lab.topology.gw, sys.executable, "-m", "nfqfw", "rules", "show"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert (
        "-A NFQFW-PREROUTING -d 203.0.113.1/32 -i wan0 -p tcp -m multiport --dports 25 -m comment "
        '--comment "forward smtp" -j DNAT --to-destination 10.0.0.25'
    ) in shown.stdout
    assert "-A PREROUTING -j NFQFW-PREROUTING" in shown.stdout


def test_replay_of_the_external_capture_agrees_with_the_live_gateway(
    lab: Lab, lab_policy: Path, tmp_path: Path
) -> None:
    """The gateway's wan0 captured while the outside uses the forwards (and tries closed ports),
    then `nfqfw replay` of that capture: every connection the live gateway let through is
    accepted by its forward, every packet of it after the first is ESTABLISHED (the replies,
    captured from the public address, included), every attempt that timed out is dropped."""
    capture = tmp_path / "wan0.pcap"
    tcpdump = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lab.topology.gw,
            "tcpdump",
            "-i",
            "wan0",
            "-n",
            "-U",
            "-w",
            str(capture),
            "tcp",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert tcpdump.stderr is not None
        assert b"listening on" in tcpdump.stderr.readline()
        live = {}
        sock, _ = traffic.open_connection(lab.topology.wan, GW_WAN_V4, SMTP)
        with sock:
            assert traffic.echo_roundtrip(sock, b"hello mail\n") == b"hello mail\n"
        live[SMTP] = "connected"
        for port in (2222, WEB, 8081):
            live[port] = traffic.tcp_probe(lab.topology.wan, GW_WAN_V4, port, timeout=DROP_WAIT).outcome
        assert live == {SMTP: "connected", 2222: "connected", WEB: "timeout", 8081: "timeout"}
        time.sleep(0.5)
    finally:
        tcpdump.terminate()
        tcpdump.wait(timeout=10)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nfqfw",
            "replay",
            "--config",
            str(lab_policy),
            "--iface",
            "wan0",
            str(capture),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    verdicts = [json.loads(line) for line in done.stdout.splitlines()]
    with capture.open("rb") as stream:
        packets = [decode(record.ip) for record in CaptureReader(stream)]
    assert len(packets) == len(verdicts) > 10
    by_port: dict[int, set[tuple[str, str]]] = {}
    for pkt, verdict in zip(packets, verdicts, strict=True):
        port = pkt.dport if pkt.dst == addr(GW_WAN_V4) else pkt.sport
        first = pkt.tcp_flags & (SYN | ACK) == SYN
        by_port.setdefault(port, set()).add(
            (("first " if first else "later ") + verdict["verdict"], verdict["reason"])
        )
    assert by_port[SMTP] == {("first accept", "forward smtp"), ("later accept", "established")}
    assert by_port[2222] == {("first accept", "forward ssh-alt"), ("later accept", "established")}
    assert by_port[WEB] == {("first drop", "default ingress")}  # each retransmitted SYN
    assert by_port[8081] == {("first drop", "default ingress")}


def reload(lab: Lab, lab_policy: Path, text: str) -> str:
    """Write the policy, SIGHUP the daemon, return what its log gained by the reload's outcome."""
    lab_policy.write_text(text)
    os.chmod(lab_policy, 0o600)
    before = lab.state.log_file.read_text(errors="replace")
    assert lab.daemon is not None
    os.kill(lab.daemon.pid, signal.SIGHUP)
    deadline = time.monotonic() + RELOAD_WAIT
    while True:
        added = lab.state.log_file.read_text(errors="replace")[len(before) :]
        if "policy reloaded" in added or "reload failed" in added:
            return added
        assert time.monotonic() < deadline, "the daemon never logged the reload"
        time.sleep(0.05)


def test_a_reload_that_removes_a_forward_cuts_new_and_existing_connections(
    lab: Lab, lab_policy: Path
) -> None:
    sock, greeting = traffic.open_connection(lab.topology.wan, GW_WAN_V4, SMTP)
    with sock:
        assert greeting == f"hello {WAN_V4}"
        assert traffic.echo_roundtrip(sock, b"before\n") == b"before\n"
        added = reload(lab, lab_policy, WITHOUT_SMTP)
        removed = re.search(r"policy reloaded: (\d+) flows no longer allowed were removed", added)
        assert removed is not None and int(removed.group(1)) >= 1, added  # this one (and closed ones)
        sock.settimeout(2.0)
        with pytest.raises(TimeoutError):
            traffic.echo_roundtrip(sock, b"cut?\n")
    assert traffic.tcp_probe(lab.topology.wan, GW_WAN_V4, SMTP, timeout=DROP_WAIT).outcome == "timeout"
    assert "forward smtp" not in run_in(lab.topology.gw, "iptables-save", "-t", "nat")
    # The other forwards are untouched.
    assert traffic.tcp_probe(lab.topology.wan, GW_WAN_V4, 2222).outcome == "connected"


def test_rules_remove_takes_the_nat_rules_away(lab: Lab) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", lab.topology.gw, sys.executable, "-m", "nfqfw", "rules", "remove"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for tool in ("iptables-save", "ip6tables-save"):
        assert "NFQFW" not in run_in(lab.topology.gw, tool, "-t", "nat")
