"""Zones beyond two on real packets: the lab with a DMZ host on the gateway's third interface
(conftest's `lab` with LAB_DMZ). Flows between the two inside zones are decided by the between
rules and their default (drop), both ways and both families; the outside reaches the DMZ by an
ingress rule; the status counts new flows per zone pair."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nfqfw.lab import traffic
from nfqfw.lab.daemon_ctl import Lab
from nfqfw.lab.plan import DMZ_V4, DMZ_V6, GW_WAN_V4, LAN_V4, LAN_V6, WAN_V4

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
SSH, SMTP, WEB = 22, 25, 80
DROP_WAIT = 1.5

LAB_DMZ = True
LAB_POLICY = """\
zones:
  external: [wan0]
  internal: {interfaces: [lan0], networks: [10.0.0.0/24, 'fd00::/64']}
  dmz: {faces: inside, interfaces: [dmz0], networks: [10.0.2.0/24, 'fd00:2::/64']}
defaults: {ingress: drop, egress: accept, between: drop, invalid: drop}
ingress:
  - {name: dmz-web, proto: tcp, to: [10.0.2.80, 'fd00:2::80'], ports: 80, action: accept}
between:
  - {name: lan-to-dmz-web, from-zone: internal, to-zone: dmz, proto: tcp, ports: 80, action: accept}
  - {name: dmz-to-lan-mail, from-zone: dmz, to-zone: internal, proto: tcp, ports: 25, action: reject}
"""


def test_lan_to_dmz_by_the_between_rules(lab: Lab) -> None:
    t = lab.topology
    for host in (DMZ_V4, DMZ_V6):
        probe = traffic.tcp_probe(t.lan, host, WEB)
        assert probe.outcome == "connected", host
    assert traffic.tcp_probe(t.lan, DMZ_V4, WEB).text == f"hello {LAN_V4}"  # no NAT between inside zones
    assert traffic.tcp_probe(t.lan, DMZ_V6, WEB).text == f"hello {LAN_V6}"
    for host in (DMZ_V4, DMZ_V6):  # no rule: the between default drops
        assert traffic.tcp_probe(t.lan, host, SSH, timeout=DROP_WAIT).outcome == "timeout", host


def test_dmz_to_lan_is_refused_or_dropped(lab: Lab) -> None:
    t = lab.topology
    refused = traffic.tcp_probe(t.dmz, LAN_V4, SMTP)
    assert refused.outcome == "refused" and refused.seconds < 1.0  # rule dmz-to-lan-mail: reset
    for host in (LAN_V4, LAN_V6):
        assert traffic.tcp_probe(t.dmz, host, SSH, timeout=DROP_WAIT).outcome == "timeout", host


def test_the_outside_and_the_dmz(lab: Lab) -> None:
    t = lab.topology
    assert traffic.tcp_probe(t.wan, DMZ_V4, WEB).outcome == "connected"  # ingress rule dmz-web
    assert traffic.tcp_probe(t.wan, DMZ_V4, SSH, timeout=DROP_WAIT).outcome == "timeout"
    out = traffic.tcp_probe(t.dmz, WAN_V4, WEB)  # egress (the lab's masquerade covers the lan only)
    assert (out.outcome, out.text) == ("connected", f"hello {DMZ_V4}")
    assert traffic.tcp_probe(t.lan, WAN_V4, WEB).text == f"hello {GW_WAN_V4}"  # lan: masqueraded


def test_status_counts_per_zone_pair(lab: Lab) -> None:
    argv = [sys.executable, "-m", "nfqfw", "status", "--json", "--runtime-dir", str(lab.state.runtime_dir)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    zones = json.loads(done.stdout)["zones"]
    assert zones["internal->dmz accept"] >= 4
    assert zones["internal->dmz drop"] >= 2  # a dropped SYN is retransmitted: at least one per try
    assert zones["dmz->internal reject"] >= 1
    assert zones["dmz->internal drop"] >= 2
    assert zones["external->dmz accept"] >= 1
    assert zones["dmz->external accept"] >= 1
    verdicts = json.loads(done.stdout)["verdicts"]
    assert verdicts["accept rule lan-to-dmz-web"] >= 4
    assert verdicts["drop default between"] >= 2
    assert verdicts["reject rule dmz-to-lan-mail"] >= 1
