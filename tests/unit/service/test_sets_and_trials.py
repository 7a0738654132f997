"""A Daemon (engine, adapter; the kernel side faked) driven through its control requests: runtime
set entries (add, del, list, timeouts, saved and restored, the flows of their addresses cut),
a set file watched, reload --dry-run, reload --confirm with its rollback by the daemon's timer."""

from __future__ import annotations

import ipaddress
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_fakes import T0, Clock, kernel_free_daemon, tcp4
from firewall_fakes import RecordingFirewall

from nfqfw.control.protocol import RequestError
from nfqfw.control.requests import Requests
from nfqfw.core.build import addr, ipv4, udp
from nfqfw.core.engine import Engine
from nfqfw.core.packet import ACK, SYN
from nfqfw.core.verdict import Action, Hook, Meta
from nfqfw.service.core import load_policy_file
from nfqfw.service.daemon import Daemon
from nfqfw.service.options import Options
from nfqfw.service.setstate import SETS_NAME

OUT = Meta(Hook.FORWARD, "lan0", "wan0")
IN = Meta(Hook.FORWARD, "wan0", "lan0")
LAN, WAN, OTHER = addr("10.0.0.5"), addr("203.0.113.7"), addr("198.51.100.9")
POLICY = """\
zones:
  external: [wan0]
  internal: [lan0]
sets:
  banned: {}
  web: {file: web.txt, comment: the web servers}
ingress:
  - {name: drop-banned, from: "@banned", action: drop}
  - {name: web, proto: tcp, to: "@web", ports: [http, https], action: accept, comment: public web}
egress:
  - {name: no-banned-out, to: "@banned", action: drop}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
def rundir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nfqs"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_daemon(rundir: Path, clock: Clock | None = None) -> Daemon:
    """A Daemon as start() leaves it, minus the kernel (its sets' entries read from the state dir)."""
    clock = clock or Clock()
    options = Options(
        config=str(rundir / "policy.yaml"), runtime_dir=str(rundir), state_dir=str(rundir / "state")
    )
    loaded = load_policy_file(options.config)
    d = kernel_free_daemon(options, clock, RecordingFirewall(), Engine(loaded.engine_policy))
    d.in_force = loaded
    d._load_runtime_sets()
    d._stamp_set_files()
    return d


@pytest.fixture
def daemon(rundir: Path) -> Iterator[Daemon]:
    """One TCP session LAN:40000 -> WAN:80 and one UDP flow LAN:40002 -> OTHER:53."""
    write(rundir / "policy.yaml", POLICY)
    write(rundir / "web.txt", "# the web servers\n10.0.0.80\n10.0.0.81\n")
    d = make_daemon(rundir)
    for data, meta in (
        (tcp4(LAN, WAN, 40000, 80, 100, 0, SYN), OUT),
        (tcp4(WAN, LAN, 80, 40000, 500, 101, SYN | ACK), IN),
        (tcp4(LAN, WAN, 40000, 80, 101, 501, ACK), OUT),
        (ipv4(LAN, OTHER, 17, udp(LAN, OTHER, 40002, 53)), OUT),
    ):
        assert d.engine.process(data, meta, T0).action is Action.ACCEPT
    d.clock.now = T0 + 1  # type: ignore[attr-defined]
    yield d
    d.close()


def ask(d: Daemon, request: dict[str, Any]) -> Any:
    raw = b"".join(Requests(d)(request))
    reply = json.loads(raw)
    assert reply["ok"] is True
    return reply["result"]


def refused(d: Daemon, request: dict[str, Any]) -> str:
    with pytest.raises(RequestError) as caught:
        b"".join(Requests(d)(request))
    return str(caught.value)


def flows(d: Daemon) -> int:
    return len(d.engine.conntrack)


def syn_in(src: bytes, dport: int, sport: int = 41000) -> bytes:
    return tcp4(src, addr("10.0.0.80"), sport, dport, 1, 0, SYN)


# --- runtime set entries -----------------------------------------------------------------------


def test_set_add_cuts_the_open_flows_of_the_address_and_takes_effect_on_the_next_packet(
    daemon: Daemon,
) -> None:
    assert flows(daemon) == 2
    result = ask(daemon, {"cmd": "set", "op": "add", "name": "banned", "addr": "203.0.113.7"})
    assert result == {"set": "banned", "addr": "203.0.113.7/32", "op": "add", "changed": True, "removed": 1}
    assert flows(daemon) == 1  # the TCP session to WAN is gone, the UDP flow to OTHER stays
    verdict = daemon.engine.process(syn_in(WAN, 80), IN, T0 + 2)
    assert (verdict.action, verdict.rule) == (Action.DROP, "drop-banned")
    assert daemon.engine.process(syn_in(OTHER, 80), IN, T0 + 2).rule == "web"
    saved = json.loads((Path(daemon.options.state_dir) / SETS_NAME).read_text())
    assert saved["sets"] == {"banned": [["203.0.113.7/32", None]]}
    again = ask(daemon, {"cmd": "set", "op": "add", "name": "banned", "addr": "203.0.113.7"})
    assert (again["changed"], again["removed"]) == (False, 0)


def test_set_del_readmits_and_list_shows_entries(daemon: Daemon) -> None:
    ask(daemon, {"cmd": "set", "op": "add", "name": "banned", "addr": "2001:db8:bad::/48", "timeout": 90})
    ask(daemon, {"cmd": "set", "op": "add", "name": "banned", "addr": "198.51.100.0/24"})
    assert flows(daemon) == 1  # the UDP flow to OTHER (in 198.51.100.0/24) is cut
    listing = ask(daemon, {"cmd": "set", "op": "list", "name": "banned"})
    assert listing == {
        "name": "banned",
        "comment": None,
        "file": None,
        "defined_at": f"{daemon.options.config}:5",
        "policy_networks": 0,
        "policy_ranges": {"ipv4": 0, "ipv6": 0},
        "runtime": [
            {"addr": "198.51.100.0/24", "expires_in": None},
            {"addr": "2001:db8:bad::/48", "expires_in": 90.0},
        ],
    }
    result = ask(daemon, {"cmd": "set", "op": "del", "name": "banned", "addr": "198.51.100.0/24"})
    assert (result["changed"], result["removed"]) == (True, 0)
    assert (
        daemon.engine.process(ipv4(LAN, OTHER, 17, udp(LAN, OTHER, 40003, 53)), OUT, T0 + 2).action
        is Action.ACCEPT
    )
    web = ask(daemon, {"cmd": "set", "op": "list", "name": "web"})
    assert (web["comment"], web["policy_networks"], web["policy_ranges"]) == (
        "the web servers",
        2,
        {"ipv4": 1, "ipv6": 0},  # .80 and .81 merged
    )


def test_a_timeout_expires_the_entry_in_housekeeping(daemon: Daemon) -> None:
    ask(daemon, {"cmd": "set", "op": "add", "name": "banned", "addr": "198.51.100.9", "timeout": 30})
    assert daemon.engine.process(syn_in(OTHER, 80), IN, T0 + 2).rule == "drop-banned"
    daemon.clock.now = T0 + 32  # type: ignore[attr-defined]
    daemon._tend(daemon.clock())
    assert daemon.engine.process(syn_in(OTHER, 80, 41001), IN, T0 + 32).rule == "web"
    saved = json.loads((Path(daemon.options.state_dir) / SETS_NAME).read_text())
    assert saved["sets"] == {}


def test_entries_survive_a_reload_and_a_restart(daemon: Daemon, rundir: Path) -> None:
    ask(daemon, {"cmd": "set", "op": "add", "name": "banned", "addr": "192.0.2.66", "timeout": 600})
    assert daemon.reload() is True
    assert daemon.engine.process(syn_in(addr("192.0.2.66"), 80), IN, T0 + 2).rule == "drop-banned"
    restarted = make_daemon(rundir)
    try:
        verdict = restarted.engine.process(syn_in(addr("192.0.2.66"), 80), IN, T0 + 3)
        assert verdict.rule == "drop-banned"
        (entry,) = restarted.engine.runtime_sets.entries("banned").entries()
        assert entry.network == ipaddress.ip_network("192.0.2.66/32")
        assert entry.expires is not None and 0 < entry.expires - T0 <= 600
    finally:
        restarted.close()


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            {"cmd": "set", "op": "add", "name": "nope", "addr": "192.0.2.1"},
            "set: the policy has no set 'nope' (its sets: banned, web)",
        ),
        (
            {"cmd": "set", "op": "add", "name": "banned", "addr": "192.0.2.300"},
            "set add: not an address or network: '192.0.2.300'",
        ),
        (
            {"cmd": "set", "op": "add", "name": "banned", "addr": "192.0.2.1/24"},
            "set add: '192.0.2.1/24' has host bits set (did you mean 192.0.2.0/24?)",
        ),
        ({"cmd": "set", "op": "flush", "name": "banned"}, 'set: "op" must be one of add, del, list'),
        ({"cmd": "set", "op": "add", "name": "banned"}, 'set add: "addr" must be an address or network'),
        (
            {"cmd": "set", "op": "del", "name": "banned", "addr": "192.0.2.1", "timeout": 5},
            'set: "timeout" is a positive number of seconds, for add only',
        ),
        (
            {"cmd": "set", "op": "add", "name": "banned", "addr": "192.0.2.1", "timeout": -1},
            'set: "timeout" is a positive number of seconds, for add only',
        ),
        ({"cmd": "set", "op": "list"}, 'set: "name" must be the name of one of the policy\'s sets'),
    ],
)
def test_bad_set_requests(daemon: Daemon, request_: dict[str, Any], message: str) -> None:
    assert refused(daemon, request_) == message


# --- watch-sets --------------------------------------------------------------------------------


def test_a_watched_set_file_is_read_again_and_a_broken_one_kept_out(daemon: Daemon, rundir: Path) -> None:
    write(rundir / "policy.yaml", POLICY + "options: {watch-sets: true}\n")
    assert daemon.reload() is True
    old_sha = daemon.policy_sha256()
    write(rundir / "web.txt", "10.0.0.90\n")
    daemon._watch_sets()
    assert daemon.engine.process(syn_in(OTHER, 80), IN, T0 + 2).action is Action.DROP  # 10.0.0.80 no longer
    assert (
        daemon.engine.process(tcp4(OTHER, addr("10.0.0.90"), 41001, 80, 1, 0, SYN), IN, T0 + 2).rule == "web"
    )
    assert daemon.policy_sha256() != old_sha
    status = ask(daemon, {"cmd": "status"})
    assert status["policy"]["file_sha256"] == status["policy"]["sha256"]
    write(rundir / "web.txt", "10.0.0.90\n10.0.0.300\n")
    daemon._watch_sets()
    assert daemon.set_errors == {"web": f"{rundir / 'web.txt'}:2: not an address or network: '10.0.0.300'"}
    web = next(s for s in ask(daemon, {"cmd": "status"})["policy"]["sets"] if s["name"] == "web")
    assert web == {
        "name": "web",
        "policy_networks": 1,
        "runtime_entries": 0,
        "file": str(rundir / "web.txt"),
        "comment": "the web servers",
        "error": f"{rundir / 'web.txt'}:2: not an address or network: '10.0.0.300'",
    }
    assert (
        daemon.engine.process(tcp4(OTHER, addr("10.0.0.90"), 41002, 80, 1, 0, SYN), IN, T0 + 2).rule == "web"
    )
    write(rundir / "web.txt", "10.0.0.91\n")
    daemon._watch_sets()
    assert daemon.set_errors == {}


def test_without_watch_sets_a_changed_file_waits_for_the_reload(daemon: Daemon, rundir: Path) -> None:
    write(rundir / "web.txt", "10.0.0.90\n")
    daemon._watch_sets()
    assert daemon.engine.process(syn_in(OTHER, 80), IN, T0 + 2).rule == "web"  # still 10.0.0.80
    status = ask(daemon, {"cmd": "status"})["policy"]
    assert status["file_sha256"] != status["sha256"]  # status says the files changed
    assert daemon.reload() is True
    assert daemon.engine.process(syn_in(OTHER, 80, 41005), IN, T0 + 2).action is Action.DROP


# --- reload --dry-run --------------------------------------------------------------------------


def test_dry_run_lists_what_changes_and_the_flows_it_would_cut(daemon: Daemon, rundir: Path) -> None:
    write(
        rundir / "policy.yaml", POLICY + "  - {name: no-dns, proto: udp, ports: [domain], action: reject}\n"
    )
    preview = ask(daemon, {"cmd": "reload", "dry_run": True})
    assert preview["ok"] is True and preview["recheck"] is True
    assert preview["changes"]["rules"]["egress"]["added"] == [
        {
            "name": "no-dns",
            "at": f"{rundir / 'policy.yaml'}:12",
            "rule": "reject udp ports 53 (domain)",
            "comment": None,
        }
    ]
    assert preview["cut_total"] == 1
    (cut,) = preview["cut"]
    assert (cut["proto"], cut["dport"], cut["admitted_by"], cut["now"], cut["now_action"]) == (
        "udp",
        53,
        "default egress",
        "rule no-dns",
        "reject",
    )
    assert (
        flows(daemon) == 2 and daemon.engine.policy.config.egress[-1].name == "no-banned-out"
    )  # nothing changed
    write(rundir / "policy.yaml", POLICY.replace("action: drop}", "action: perhaps}", 1))
    broken = ask(daemon, {"cmd": "reload", "dry_run": True})
    assert broken["ok"] is False and "expected accept, drop or reject, got 'perhaps'" in broken["errors"][0]


# --- reload --confirm --------------------------------------------------------------------------


def test_an_unconfirmed_reload_is_rolled_back_by_the_timer_and_its_cut_flows_come_back(
    daemon: Daemon, rundir: Path
) -> None:
    before = daemon.policy_sha256()
    write(
        rundir / "policy.yaml", POLICY + "  - {name: no-web-out, proto: tcp, ports: [http], action: drop}\n"
    )
    outcome = ask(daemon, {"cmd": "reload", "confirm": 30})
    assert (outcome["ok"], outcome["removed"], outcome["confirm_within"]) == (True, 1, 30.0)
    assert flows(daemon) == 1
    pending = ask(daemon, {"cmd": "status"})["policy"]["pending_confirm"]
    assert pending == {"rollback_in": 30.0, "previous_sha256": before}
    daemon.clock.now = T0 + 20  # type: ignore[attr-defined]
    daemon._housekeeping(daemon.clock())
    assert daemon.pending is not None  # not yet
    daemon.clock.now = T0 + 31.5  # type: ignore[attr-defined]
    daemon._housekeeping(daemon.clock())
    assert daemon.pending is None and daemon.policy_sha256() == before
    assert flows(daemon) == 2  # the TCP session is back: its next segment is ESTABLISHED
    verdict = daemon.engine.process(tcp4(LAN, WAN, 40000, 80, 101, 501, ACK), OUT, T0 + 31.5)
    assert verdict.reason == "established"
    assert daemon.last_reload is not None
    assert daemon.last_reload.trigger == "rollback: reload not confirmed within 30 s"


def test_a_confirmed_reload_stays(daemon: Daemon, rundir: Path) -> None:
    write(
        rundir / "policy.yaml", POLICY + "  - {name: no-web-out, proto: tcp, ports: [http], action: drop}\n"
    )
    ask(daemon, {"cmd": "reload", "confirm": 30})
    new = daemon.policy_sha256()
    assert ask(daemon, {"cmd": "confirm"}) == {"confirmed": True, "sha256": new}
    daemon.clock.now = T0 + 60  # type: ignore[attr-defined]
    daemon._housekeeping(daemon.clock())
    assert daemon.policy_sha256() == new and flows(daemon) == 1
    assert refused(daemon, {"cmd": "confirm"}) == "nothing to confirm: no reload with --confirm is waiting"


def test_rollback_asked_and_reloads_on_trial_in_a_row(daemon: Daemon, rundir: Path) -> None:
    first = daemon.policy_sha256()
    write(
        rundir / "policy.yaml", POLICY + "  - {name: no-web-out, proto: tcp, ports: [http], action: drop}\n"
    )
    ask(daemon, {"cmd": "reload", "confirm": 30})
    write(rundir / "policy.yaml", POLICY + "  - {name: no-dns, proto: udp, ports: [domain], action: drop}\n")
    ask(daemon, {"cmd": "reload", "confirm": 30})  # on trial again: the rollback target stays the first
    assert flows(daemon) == 0  # the first trial cut the TCP session, the second the UDP flow
    result = ask(daemon, {"cmd": "confirm", "rollback": True})
    assert result == {"rolled_back": True, "sha256": first}
    assert flows(daemon) == 2  # both cut flows back
    assert refused(daemon, {"cmd": "confirm", "rollback": True}) == (
        "nothing to roll back: no reload with --confirm is waiting"
    )


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"cmd": "reload", "confirm": 0}, 'reload: "confirm" must be a number of seconds, 1-86400'),
        ({"cmd": "reload", "confirm": True}, 'reload: "confirm" must be a number of seconds, 1-86400'),
        ({"cmd": "reload", "dry_run": "yes"}, 'reload: "dry_run" and "candidate" must be true or false'),
        ({"cmd": "confirm", "rollback": 1}, 'confirm: "rollback" must be true or false'),
    ],
)
def test_bad_reload_and_confirm_requests(daemon: Daemon, request_: dict[str, Any], message: str) -> None:
    assert refused(daemon, request_) == message


def test_status_shows_sets_and_comments(daemon: Daemon) -> None:
    ask(daemon, {"cmd": "set", "op": "add", "name": "banned", "addr": "192.0.2.1"})
    policy = ask(daemon, {"cmd": "status"})["policy"]
    assert policy["files"] == 2
    assert policy["comments"] == {"web": "public web"}
    assert [(s["name"], s["policy_networks"], s["runtime_entries"]) for s in policy["sets"]] == [
        ("banned", 0, 1),
        ("web", 2, 0),
    ]
