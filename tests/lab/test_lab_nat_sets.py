"""Sets in the policy's nat section on real packets (conftest's `lab` with the DMZ host, its
MASQUERADE left out since the policy has its own): a masquerade whose `from` is a set translates
the inside host it lists and not the DMZ host it does not, in each family; `nfqfw set add` makes
the DMZ host's next connections masqueraded and `set del` stops it; a forward from an included
file admits the outside host once a runtime entry puts it in the forward's set (the kernel's
pre-filter leaving the translated packets to nfqfw). The outside host greets each connection
with the source address it sees, so the greeting tells whether the gateway translated it (the
outside host routes the inside networks back through the gateway).

Every test runs twice, on a lab of its own each: the single daemon, and a supervisor with a
worker per queue (`--queue-balance 0:1 --workers`). There the supervisor answers `set add/del`
and fills the kernel's ipsets, and the forward's decision is the worker's that gets the flow:
connections from 16 more outside addresses, spread over both queues, show that every worker
learns (and forgets) a runtime entry. A runtime entry outlives a restart of every process
that decides: the single daemon stopped and started, each worker killed and restarted by the
supervisor (they read the entries back from the state directory's sets.json)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lab_wait import wait_for

from nfqfw.lab import daemon_ctl, traffic
from nfqfw.lab.daemon_ctl import Lab
from nfqfw.lab.plan import (
    DMZ_V4,
    DMZ_V6,
    GW_WAN_V4,
    GW_WAN_V6,
    LAN_V4,
    WAN_EXTRA_NET_V4,
    WAN_EXTRA_V4,
    WAN_V4,
    WAN_V6,
)
from nfqfw.lab.topology import add_outside_addresses, run_in

SINGLE: tuple[str, ...] = ()
WORKERS = ("--queue-balance", "0:1", "--workers")
pytestmark = [
    pytest.mark.lab,
    pytest.mark.parametrize("lab", [SINGLE, WORKERS], ids=["single", "workers"], indirect=True),
]

REPO = Path(__file__).resolve().parents[2]
WEB, PARTNER_PORT = 80, 8080
DROP_WAIT = 1.5  # seconds a connection attempt waits before it counts as dropped
RESTART_WAIT = 20.0  # seconds for the supervisor to restart a killed worker

LAB_DMZ = True
LAB_POLICY = f"""\
zones:
  external: [wan0]
  internal: {{interfaces: [lan0], networks: [10.0.0.0/24, 'fd00::/64']}}
  dmz: {{faces: inside, interfaces: [dmz0], networks: [10.0.2.0/24, 'fd00:2::/64']}}
defaults: {{ingress: drop, egress: accept, between: drop, invalid: drop}}
options: {{log-denied: false}}  # the pre-filter's drops send nfqfw no sample: none is let through
include: partners.yaml
sets:
  natted: [{LAN_V4}, 'fd00::25']   # the inside host; the DMZ host is not listed
nat:
  masquerade:
    - {{out: wan0, from: '@natted'}}
    - {{out: wan0, from: '@natted', family: ipv6}}
"""
# An included file with a forward restricted to a set filled at run time only.
PARTNERS = """\
sets:
  partners: {}
nat:
  forward:
    - {name: web-partners, proto: tcp, in: wan0, ports: 8080, to: 10.0.0.25, to-port: 80, from: '@partners'}
"""


@pytest.fixture(scope="module")
def lab_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LAB_POLICY and the file it includes (the daemon refuses group/world-writable files)."""
    directory = tmp_path_factory.mktemp("lab")
    for name, text in (("partners.yaml", PARTNERS), ("policy.yaml", LAB_POLICY)):
        (directory / name).write_text(text)
        (directory / name).chmod(0o600)
    return directory / "policy.yaml"


def nfqfw(lab: Lab, *args: str) -> str:
    argv = [sys.executable, "-m", "nfqfw", *args, "--runtime-dir", str(lab.state.runtime_dir)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def status(lab: Lab) -> dict[str, Any]:
    return json.loads(nfqfw(lab, "status", "--json"))


def forwarded_flows(lab: Lab, sources: tuple[str, ...]) -> list[dict[str, Any]]:
    """The flows from `sources` the forward web-partners admitted, as `nfqfw flows` lists them."""
    flows = json.loads(nfqfw(lab, "flows", "--json", "--proto", "tcp"))["flows"]
    return [f for f in flows if f["admitted_by"] == "forward web-partners" and f["src"] in sources]


def flow_holders(lab: Lab) -> set[int | None]:
    """What a flow's record names as the process holding it: under --workers each worker's
    queue; the single daemon's records name none."""
    workers = status(lab).get("workers")
    return {None} if workers is None else {worker["queue"] for worker in workers}


def seen_as(ns: str, host: str) -> str:
    """The source address the outside host's web server saw for a new connection from `ns`."""
    probe = traffic.tcp_probe(ns, host, WEB)
    assert probe.outcome == "connected", (ns, host, probe)
    assert probe.text.startswith("hello ")
    return probe.text.removeprefix("hello ")


def test_a_host_in_the_set_is_masqueraded_and_one_not_in_it_is_not(lab: Lab) -> None:
    t = lab.topology
    assert seen_as(t.lan, WAN_V4) == GW_WAN_V4
    assert seen_as(t.lan, WAN_V6) == GW_WAN_V6
    assert seen_as(t.dmz, WAN_V4) == DMZ_V4
    assert seen_as(t.dmz, WAN_V6) == DMZ_V6
    # One rule per entry, on the set's ipset of the entry's family (the lab added no MASQUERADE).
    masquerades = {
        tool: [line for line in run_in(t.gw, tool, "-t", "nat").splitlines() if "MASQUERADE" in line]
        for tool in ("iptables-save", "ip6tables-save")
    }
    assert masquerades == {
        "iptables-save": [
            "-A NFQFW-POSTROUTING -m mark --mark 0x40000000/0x40000000 -m comment --comment hairpin "
            "-j MASQUERADE",
            "-A NFQFW-POSTROUTING -o wan0 -m set --match-set nfqfw4-natted src -m comment --comment "
            "masquerade -j MASQUERADE",
        ],
        "ip6tables-save": [
            "-A NFQFW-POSTROUTING -o wan0 -m set --match-set nfqfw6-natted src -m comment --comment "
            "masquerade -j MASQUERADE",
        ],
    }


def test_set_add_makes_a_host_s_traffic_masqueraded_and_set_del_stops_it(lab: Lab) -> None:
    t = lab.topology
    nfqfw(lab, "set", "add", "natted", DMZ_V4)
    try:
        assert seen_as(t.dmz, WAN_V4) == GW_WAN_V4  # the next connection is translated
        assert seen_as(t.dmz, WAN_V6) == DMZ_V6  # an IPv4 entry: IPv6 as before
    finally:
        nfqfw(lab, "set", "del", "natted", DMZ_V4)
    assert seen_as(t.dmz, WAN_V4) == DMZ_V4
    assert seen_as(t.lan, WAN_V4) == GW_WAN_V4  # the set's own member all along


def test_a_forward_from_an_included_file_follows_its_runtime_set(lab: Lab) -> None:
    t = lab.topology
    assert traffic.tcp_probe(t.wan, GW_WAN_V4, PARTNER_PORT, timeout=DROP_WAIT).outcome == "timeout"
    nfqfw(lab, "set", "add", "partners", WAN_V4)
    try:
        probe = traffic.tcp_probe(t.wan, GW_WAN_V4, PARTNER_PORT)
        assert (probe.outcome, probe.text) == ("connected", f"hello {WAN_V4}")  # the inside server, port 80
    finally:
        nfqfw(lab, "set", "del", "partners", WAN_V4)
    assert traffic.tcp_probe(t.wan, GW_WAN_V4, PARTNER_PORT, timeout=DROP_WAIT).outcome == "timeout"
    verdicts = status(lab)["verdicts"]
    assert verdicts["accept forward web-partners"] == 1
    dnat = [line for line in run_in(t.gw, "iptables-save", "-t", "nat").splitlines() if "DNAT" in line]
    assert (
        "-A NFQFW-PREROUTING -i wan0 -p tcp -m set --match-set nfqfw4-partners src -m multiport --dports "
        "8080 -m addrtype --dst-type LOCAL --limit-iface-in -m comment --comment "
        '"forward web-partners" -j DNAT --to-destination 10.0.0.25:80'
    ) in dnat


def test_every_process_admits_the_forward_once_its_runtime_set_has_the_source(lab: Lab) -> None:
    t = lab.topology
    add_outside_addresses(t, WAN_EXTRA_V4)
    nfqfw(lab, "set", "add", "partners", WAN_EXTRA_NET_V4)  # one network entry: all 16 sources
    try:
        greetings = [traffic.tcp_probe(t.wan, GW_WAN_V4, PARTNER_PORT, source=a).text for a in WAN_EXTRA_V4]
        assert greetings == [f"hello {address}" for address in WAN_EXTRA_V4]
        admitted = forwarded_flows(lab, WAN_EXTRA_V4)
        assert sorted(f["src"] for f in admitted) == sorted(WAN_EXTRA_V4)
        assert {f.get("queue") for f in admitted} == flow_holders(lab)  # both workers decided some
    finally:
        nfqfw(lab, "set", "del", "partners", WAN_EXTRA_NET_V4)
    assert forwarded_flows(lab, WAN_EXTRA_V4) == []  # reload: recheck, in every process


def ensure_outside_addresses(lab: Lab) -> None:
    """WAN_EXTRA_V4 on the outside host (an earlier test of the module may have added them)."""
    t = lab.topology
    present = run_in(t.wan, "ip", "-o", "-4", "addr", "show", "dev", "eth0")
    add_outside_addresses(t, [a for a in WAN_EXTRA_V4 if f" {a}/" not in present])


def workers_by_queue(lab: Lab) -> dict[int, dict[str, Any]]:
    return {worker["queue"]: worker for worker in status(lab).get("workers") or ()}


def restart_every_deciding_process(lab: Lab, lab_policy: Path) -> None:
    """The single daemon: stopped and started. Under --workers: each worker killed (SIGKILL)
    and waited for until the supervisor has restarted it."""
    before = workers_by_queue(lab)
    if not before:
        stopped = daemon_ctl.stop_daemon(lab.state.prefix)
        assert stopped is not None and stopped.exit_code() == 0
        daemon_ctl.start_daemon(lab.state.prefix, lab_policy)
        return
    for worker in before.values():
        os.kill(worker["pid"], signal.SIGKILL)

    def all_restarted() -> dict[int, dict[str, Any]] | None:
        after = workers_by_queue(lab)
        done = all(
            after[queue]["restarts"] > worker["restarts"] and after[queue]["state"] == "running"
            for queue, worker in before.items()
        )
        return after if done else None

    after = wait_for("every worker restarted", all_restarted, RESTART_WAIT)
    assert all(after[queue]["pid"] != worker["pid"] for queue, worker in before.items())


def test_a_runtime_entry_outlives_a_restart_of_every_process_that_decides(lab: Lab, lab_policy: Path) -> None:
    t = lab.topology
    ensure_outside_addresses(lab)
    nfqfw(lab, "set", "add", "partners", WAN_EXTRA_NET_V4)
    try:
        restart_every_deciding_process(lab, lab_policy)
        assert WAN_EXTRA_NET_V4 in nfqfw(lab, "set", "list", "partners")  # read back at start
        greetings = [traffic.tcp_probe(t.wan, GW_WAN_V4, PARTNER_PORT, source=a).text for a in WAN_EXTRA_V4]
        assert greetings == [f"hello {address}" for address in WAN_EXTRA_V4]
        admitted = forwarded_flows(lab, WAN_EXTRA_V4)
        assert sorted(f["src"] for f in admitted) == sorted(WAN_EXTRA_V4)
        assert {f.get("queue") for f in admitted} == flow_holders(lab)  # every restarted worker admitted some
    finally:
        nfqfw(lab, "set", "del", "partners", WAN_EXTRA_NET_V4)
    probe = traffic.tcp_probe(t.wan, GW_WAN_V4, PARTNER_PORT, source=WAN_EXTRA_V4[0], timeout=DROP_WAIT)
    assert probe.outcome == "timeout"
