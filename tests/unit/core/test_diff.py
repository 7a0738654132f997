"""nfqfw.core.diff and `nfqfw check --diff`: what changed between two policies, and a rule in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nfqfw import cli
from nfqfw.commands import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from nfqfw.core.config import parse_policy
from nfqfw.core.diff import describe_rule, diff_lines, policy_diff

OLD = """\
zones: {external: [wan0], internal: [lan0]}
sets:
  office: [198.51.100.0/24]
  gone: []
ingress:
  - {name: ssh-office, proto: tcp, from: "@office", to: gateway, ports: [ssh], action: accept}
  - {name: web, proto: tcp, to: 10.0.0.80, ports: [http, https], action: accept}
  - {name: mail, proto: tcp, to: 10.0.0.25, ports: [smtp], action: accept}
  - {name: old, proto: udp, ports: [5000-5010], action: drop}
egress:
  - {name: no-smb, proto: tcp, ports: [microsoft-ds], action: reject}
"""
NEW = """\
zones: {external: [wan0], internal: [lan0, lan1]}
defaults: {ingress: reject}
sets:
  office: [198.51.100.0/24, 203.0.113.0/25, 2001:db8:100::/48]
  banned: {}
ingress:
  - {name: drop-banned, from: "@banned", action: drop, comment: fail2ban}
  - {name: mail, proto: tcp, to: 10.0.0.25, ports: [smtp, submission], action: accept}
  - {name: ssh-office, proto: tcp, from: ["@office", 192.0.2.7], to: gateway, ports: [ssh], action: accept}
  - {name: web, proto: tcp, to: 10.0.0.80, ports: [http, https], action: accept}
egress:
  - {name: no-smb, proto: tcp, ports: [microsoft-ds], action: reject}
options: {reload: keep}
"""


def test_policy_diff() -> None:
    old, new = parse_policy(OLD, "old.yaml"), parse_policy(NEW, "new.yaml")
    diff = policy_diff(old, new)
    assert diff["rules"] == {
        "ingress": {
            "added": [
                {
                    "name": "drop-banned",
                    "at": "new.yaml:7",
                    "rule": "drop from @banned",
                    "comment": "fail2ban",
                }
            ],
            "removed": [{"name": "old", "at": "old.yaml:9", "rule": "drop udp ports 5000-5010"}],
            "changed": {
                "ssh-office": ["from: @office -> @office, 192.0.2.7/32"],
                "mail": ["ports: 25 (smtp) -> 25 (smtp), 587 (submission)"],
            },
            "moved": ["mail"],
        }
    }
    assert diff["sets"] == {
        "added": ["banned"],
        "removed": ["gone"],
        "changed": {
            "office": {
                "networks": {
                    "added": 2,
                    "removed": 0,
                    "examples_added": ["2001:db8:100::/48", "203.0.113.0/25"],
                    "examples_removed": [],
                }
            }
        },
    }
    assert diff["defaults"] == {"ingress": ["drop", "reject"]}
    assert diff["options"] == {"reload": ["recheck", "keep"]}
    assert diff["zones"] == {"internal": [["lan0"], ["lan0", "lan1"]]}
    assert "nat" not in diff
    assert diff_lines(diff) == [
        "ingress rules:",
        "  + drop-banned (new.yaml:7): drop from @banned  # fail2ban",
        "  - old (was old.yaml:9): drop udp ports 5000-5010",
        "  ~ mail: ports: 25 (smtp) -> 25 (smtp), 587 (submission)",
        "  ~ ssh-office: from: @office -> @office, 192.0.2.7/32",
        "  ~ order changed: mail (first match wins)",
        "sets:",
        "  + banned",
        "  - gone",
        "  ~ office: +2 -0 networks (+2001:db8:100::/48, +203.0.113.0/25)",
        "defaults:",
        "  ~ ingress: drop -> reject",
        "options:",
        "  ~ reload: recheck -> keep",
        "zones:",
        "  ~ internal: lan0 -> lan0, lan1",
    ]


ZONED_OLD = """\
zones:
  external: [wan0]
  internal: {interfaces: [lan0], networks: [10.0.0.0/24]}
  dmz: {faces: inside, interfaces: [dmz0], networks: [10.0.2.0/24]}
between:
  - {name: lan-to-dmz, from-zone: internal, to-zone: dmz, proto: tcp, ports: [http], action: accept}
nat:
  masquerade: [{out: wan0, from: 10.0.0.0/24}]
  forward: [{name: web, proto: tcp, ports: [http], to: 10.0.2.80}]
"""
ZONED_NEW = """\
zones:
  external: [wan0]
  internal: {interfaces: [lan0], networks: [10.0.0.0/24]}
  dmz: {faces: inside, interfaces: [dmz0], networks: [10.0.2.0/24, 10.0.3.0/24]}
between:
  - {name: lan-to-dmz, from-zone: internal, to-zone: dmz, proto: tcp, ports: [http, https], action: accept}
nat:
  masquerade: [{out: wan0, from: [10.0.0.0/24, 10.0.2.0/24]}]
  forward: [{name: web, proto: tcp, ports: [http, https], to: 10.0.2.80}]
"""


def test_policy_diff_with_zones_between_rules_and_nat() -> None:
    diff = policy_diff(parse_policy(ZONED_OLD, "old.yaml"), parse_policy(ZONED_NEW, "new.yaml"))
    assert diff_lines(diff) == [
        "between rules:",
        "  ~ lan-to-dmz: ports: 80 (http) -> 80 (http), 443 (https)",
        "zones:",
        "  ~ dmz: faces inside, interfaces dmz0, networks 10.0.2.0/24 -> "
        "faces inside, interfaces dmz0, networks 10.0.2.0/24, 10.0.3.0/24",
        "nat:",
        "  + masquerade family=4, out_ifaces=['wan0'], src=['10.0.0.0/24', '10.0.2.0/24']",
        "  - masquerade family=4, out_ifaces=['wan0'], src=['10.0.0.0/24']",
        "  ~ forward web",
    ]


def test_nat_entries_with_sets_in_the_diff() -> None:
    old = ZONED_OLD + "sets:\n  office: [10.0.0.0/28]\n"
    new = old.replace("from: 10.0.0.0/24}", "from: '@office'}").replace(
        "to: 10.0.2.80}", "to: 10.0.2.80, from: [192.0.2.0/24, '@office']}"
    )
    diff = policy_diff(parse_policy(old, "old.yaml"), parse_policy(new, "new.yaml"))
    assert diff_lines(diff) == [
        "nat:",
        "  + masquerade family=4, out_ifaces=['wan0'], sets=['office']",
        "  - masquerade family=4, out_ifaces=['wan0'], src=['10.0.0.0/24']",
        "  ~ forward web",
    ]


def test_the_same_policy_has_no_changes() -> None:
    assert policy_diff(parse_policy(OLD, "a.yaml"), parse_policy(OLD, "b.yaml")) == {}
    assert diff_lines({}) == ["no changes"]


def test_describe_rule() -> None:
    config = parse_policy(
        "zones: {external: [wan0]}\n"
        "ingress:\n"
        "  - {name: r, family: ipv4, proto: [tcp, udp], from: [10.0.0.0/8], to: gateway,"
        " ports: [ssh, 8000-8100], in: wan0, limit: 5/minute, log: true, action: reject}\n"
    )
    assert describe_rule(config.ingress[0]) == (
        "reject family ipv4 tcp, udp from 10.0.0.0/8 to gateway ports 22 (ssh), 8000-8100 in wan0 "
        "limit 5/60s burst 5 log"
    )


def test_check_diff_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(OLD)
    new.write_text(NEW)
    assert cli.main(["check", "--diff", str(old), str(new)]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith(f"--- {old}\n+++ {new}\ningress rules:\n  + drop-banned ({new}:7)")
    assert cli.main(["check", "--diff", "--json", str(old), str(new)]) == EXIT_OK
    document = json.loads(capsys.readouterr().out)
    assert document["changes"]["defaults"] == {"ingress": ["drop", "reject"]}
    new.write_text(NEW.replace("reject}", "perhaps}"))
    assert cli.main(["check", "--diff", str(old), str(new)]) == EXIT_FAILURE
    assert "expected accept, drop or reject, got 'perhaps'" in capsys.readouterr().err
    assert cli.main(["check", "--diff", str(old)]) == EXIT_USAGE
