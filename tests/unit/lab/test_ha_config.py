"""The HA lab's plan and the config/ha templates it renders (nothing is started here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nfqfw.core.config import load_policy
from nfqfw.lab import daemon_ctl, ha
from nfqfw.lab.plan import HA_SYNC, HaTopology, LabError, ha_picture


def test_ha_topology_names_its_four_namespaces() -> None:
    t = HaTopology("p-")
    assert t.namespaces == ("p-wan", "p-gw1", "p-gw2", "p-lan")
    assert (t.peer("gw1"), t.peer("gw2")) == ("gw2", "gw1")
    assert "p-gw1" in ha_picture("p-") and "p-gw2" in ha_picture("p-")


def test_master_down_interval_is_rfc5798s() -> None:
    # 3 adverts missed plus the skew (256 - priority) / 256 of an advert interval of 1 s
    assert ha.MASTER_DOWN == {"gw1": 3 + 106 / 256, "gw2": 3 + 156 / 256}


def test_render_fills_every_field_and_refuses_one_left() -> None:
    assert ha.render("a {{x}} b {{x}} {{...}}", {"x": "1"}) == "a 1 b 1 {{...}}"
    with pytest.raises(LabError, match=r"config/ha template field \{\{y\}\} has no value"):
        ha.render("{{x}} {{y}}", {"x": "1"})


@pytest.mark.parametrize("name", ["keepalived.conf", "conntrackd.conf"])
def test_the_shipped_templates_render_with_the_labs_fields(name: str) -> None:
    fields = {
        "router_id": "gw1",
        "priority": "150",
        "notify": "/x/nfqfw-ha-notify /x/conntrackd.conf",
        "sync_iface": "sync0",
        "local_sync": HA_SYNC["gw1"],
        "peer_sync": HA_SYNC["gw2"],
        "dir": "/run/x",
    }
    text = ha.render((ha.CONFIG_DIR / name).read_text(), fields)
    assert not re.search(r"\{\{\w+\}\}", text)
    if name == "keepalived.conf":
        assert 'notify_master "/x/nfqfw-ha-notify /x/conntrackd.conf master"' in text
        assert text.count("\n    nopreempt\n") == 2 and "priority 150" in text
    else:
        assert "IPv4_Destination_Address 172.31.255.2" in text and "Path /run/x/conntrackd.ctl" in text


def test_the_ha_policy_is_valid_and_picks_up_mid_stream() -> None:
    policy = load_policy(ha.CONFIG_DIR / "policy.yaml")
    assert policy.options.tcp_pickup_loose is True
    assert [rule.name for rule in policy.ingress][:2] == ["vrrp", "conntrackd-sync"]


def test_gateway_role_from_its_links_and_addresses() -> None:
    every = ("203.0.113.1", "2001:db8:1::1", "10.0.0.1", "fd00::1")
    assert ha.GatewayStatus("gw1", True, every).role == "master"
    assert ha.GatewayStatus("gw1", True, ()).role == "backup"
    assert ha.GatewayStatus("gw1", False, ()).role == "failed (links down)"
    assert ha.GatewayStatus("gw1", True, every[:2]).role.startswith("split")


def test_down_removes_the_notify_log_and_keeps_the_daemons_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lab's notify log is its record of roles: one left by an earlier lab with the prefix
    would read as the next lab's flapping election."""
    monkeypatch.setattr(daemon_ctl, "STATE_ROOT", tmp_path)
    files = ha.GatewayFiles("p-", "gw2")
    files.directory.mkdir(parents=True)
    files.notify_log.write_text("backup\nmaster\nfault\n")
    files.keepalived_log.write_text("--- an earlier lab\n")
    ha.down("p-")  # no namespaces, no daemons: only the files
    assert ha.notify_log("p-", "gw2") == []
    assert files.keepalived_log.read_text() == "--- an earlier lab\n"
