"""Sets in the nat section, as a Daemon keeps them (the kernel side faked): `nfqfw set add|del`
reaches the nat table's ipsets (of the families it holds) and the forwards' own lookup at once,
the runtime entries follow an install, and a kernel without ipsets refuses the policy, located."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_fakes import T0, Clock, kernel_free_daemon, tcp4
from firewall_fakes import RecordingFirewall

from nfqfw.control.requests import Requests
from nfqfw.core.build import addr
from nfqfw.core.engine import Engine
from nfqfw.core.packet import SYN
from nfqfw.core.verdict import Action, Hook, Meta
from nfqfw.service.core import StartupError, load_policy_file
from nfqfw.service.daemon import Daemon
from nfqfw.service.options import Options
from nfqfw.service.ruleset import queue_spec

POLICY = """\
zones:
  external: [wan0]
  internal: {interfaces: [lan0], networks: [10.0.0.0/24, 'fd00::/64']}
sets:
  office: [10.0.0.0/28]
  partners: {}
nat:
  masquerade:
    - {out: wan0, from: '@office'}
  forward:
    - {name: web, proto: tcp, in: wan0, ports: 8080, to: 10.0.0.25, to-port: 80, from: '@partners'}
"""
FORWARDED = Meta(Hook.FORWARD, "wan0", "lan0", forwarded=True)
PARTNER, OTHER, SERVER = addr("203.0.113.7"), addr("198.51.100.9"), addr("10.0.0.25")


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    """A daemon running POLICY with the kernel rules it would install (sets in the kernel)."""
    rundir = Path(tempfile.mkdtemp(prefix="nfqn"))
    (rundir / "policy.yaml").write_text(POLICY)
    (rundir / "policy.yaml").chmod(0o600)
    options = Options(
        config=str(rundir / "policy.yaml"), runtime_dir=str(rundir), state_dir=str(rundir / "state")
    )
    loaded = load_policy_file(options.config)
    d = kernel_free_daemon(options, Clock(), RecordingFirewall(), Engine(loaded.engine_policy))
    d.in_force = loaded
    d.spec = queue_spec(options, loaded.config, bypass=False, sets=True)
    yield d
    d.close()
    shutil.rmtree(rundir, ignore_errors=True)


def ask(d: Daemon, request: dict[str, Any]) -> Any:
    reply = json.loads(b"".join(Requests(d)(request)))
    assert reply["ok"] is True
    return reply["result"]


def forwarded_syn(d: Daemon, src: bytes, sport: int, now: float) -> tuple[Action, str | None]:
    """A first packet the kernel translated (to the server's port 80), as nfqfw sees it."""
    verdict = d.engine.process(tcp4(src, SERVER, sport, 80, 1, 0, SYN), FORWARDED, now)
    return verdict.action, verdict.reason


def test_set_add_and_del_reach_the_nat_ipsets_and_the_forwards(daemon: Daemon) -> None:
    firewall = daemon.firewall
    assert isinstance(firewall, RecordingFirewall)
    assert forwarded_syn(daemon, PARTNER, 41000, T0) == (Action.DROP, "default ingress")
    ask(daemon, {"cmd": "set", "op": "add", "name": "partners", "addr": "203.0.113.7"})
    assert forwarded_syn(daemon, PARTNER, 41001, T0 + 1) == (Action.ACCEPT, "forward web")
    assert forwarded_syn(daemon, OTHER, 41002, T0 + 1) == (Action.DROP, "default ingress")
    # Only the families the kernel holds the set for: the forward is IPv4, the IPv6 entry stays nfqfw's.
    ask(daemon, {"cmd": "set", "op": "add", "name": "partners", "addr": "2001:db8::7"})
    ask(daemon, {"cmd": "set", "op": "add", "name": "office", "addr": "10.0.0.99", "timeout": 60})
    result = ask(daemon, {"cmd": "set", "op": "del", "name": "partners", "addr": "203.0.113.7"})
    assert result["removed"] == 1  # the forwarded connection it had admitted (reload: recheck)
    assert forwarded_syn(daemon, PARTNER, 41003, T0 + 2) == (Action.DROP, "default ingress")
    assert firewall.entries == [
        ("partners", 4, "203.0.113.7/32", True, None),
        ("office", 4, "10.0.0.99/32", True, 60.0),
        ("partners", 4, "203.0.113.7/32", False, None),
    ]


def test_an_install_puts_the_runtime_entries_of_the_nat_sets_in_the_kernel(daemon: Daemon) -> None:
    ask(daemon, {"cmd": "set", "op": "add", "name": "partners", "addr": "192.0.2.0/24"})
    firewall = daemon.firewall
    assert isinstance(firewall, RecordingFirewall)
    firewall.entries.clear()
    assert daemon._install_rules() == "rules installed"
    assert firewall.current is not None and firewall.current.nat is not None
    assert [(ipset.name, ipset.family) for ipset in firewall.current.ipsets] == [
        ("office", 4),
        ("partners", 4),
    ]
    assert firewall.entries == [("partners", 4, "192.0.2.0/24", True, None)]


def test_a_kernel_without_ipsets_refuses_a_policy_with_sets_in_nat(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    daemon.firewall = RecordingFirewall(sets=False)
    path = daemon.options.config
    expected = [
        f"{path}:9:7: nat: masquerade: from: '@office' needs the kernel's ipsets, which cannot be used "
        "here: the recording backend keeps no sets in the kernel",
        f"{path}:11:7: nat: forward 'web': from: '@partners' needs the kernel's ipsets, which cannot be "
        "used here: the recording backend keeps no sets in the kernel",
    ]
    with pytest.raises(StartupError) as caught:
        daemon._load_policy()  # at start
    assert str(caught.value).splitlines() == expected
    with caplog.at_level(logging.ERROR, logger="nfqfw"):
        assert daemon.reload() is False  # at reload: the running policy stays
    assert [f"reload: {line}" for line in expected] == [
        m for m in caplog.messages if m.startswith("reload: /")
    ]
    # Without sets in nat the same kernel is fine.
    Path(path).write_text(
        POLICY.replace("from: '@office'", "from: 10.0.0.0/28").replace(", from: '@partners'", "")
    )
    assert daemon.reload() is True
