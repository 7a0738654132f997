"""nfqfw.core.config: sets and @NAME, service names, comments, includes; every form and error."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from pathlib import Path

import pytest

from nfqfw.core.config import (
    AddressSet,
    BundleFiles,
    ConfigError,
    ConfigIssue,
    NatConfig,
    PolicyFiles,
    SourceFile,
    SourceNatConfig,
    combined_digest,
    digest_on_disk,
    ipv6_nat_issues,
    load_bundle,
    load_policy,
    nat_set_issues,
    parse_policy,
)
from nfqfw.core.sets import network_range

ZONES = "zones:\n  external: [wan0]\n  internal: [lan0]\n"  # lines 1-3


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    return [str(issue) for issue in caught.value.issues]


def text_errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_policy(text, "p.yaml")
    return [str(issue) for issue in caught.value.issues]


# --- sets --------------------------------------------------------------------------------------


def test_the_issue_example_works(tmp_path: Path) -> None:
    write(tmp_path / "sets" / "drop.txt", "; Spamhaus\n1.10.16.0/20 ; SBL256894\n2001:db8:bad::/48\n")
    policy = write(
        tmp_path / "policy.yaml",
        ZONES
        + "sets:\n"
        + "  office: [198.51.100.0/24, 2001:db8:100::/48]   # inline\n"
        + "  blocklist: {file: sets/drop.txt}\n"
        + "  banned: {}\n"
        + "ingress:\n"
        + '  - {name: drop-listed, from: "@blocklist", action: drop}\n'
        + '  - {name: ssh-office, proto: tcp, from: ["@office", 192.0.2.7], to: gateway, ports: [ssh], '
        + 'action: accept, comment: "office and the on-call laptop"}\n',
    )
    config = load_policy(policy)
    office, blocklist, banned = config.sets["office"], config.sets["blocklist"], config.sets["banned"]
    assert list(office.content.v4) == [network_range(net("198.51.100.0/24"))]
    assert list(office.content.v6) == [network_range(net("2001:db8:100::/48"))]
    assert (office.line, office.defined_in, office.path, office.runtime_only) == (5, str(policy), None, False)
    assert list(blocklist.content.v4) == [network_range(net("1.10.16.0/20"))]
    assert list(blocklist.content.v6) == [network_range(net("2001:db8:bad::/48"))]
    assert blocklist.path == str(tmp_path / "sets" / "drop.txt") and blocklist.content.written == 2
    assert banned.runtime_only and len(banned.content) == 0
    drop, ssh = config.ingress
    assert drop.src == AddressSet(False, (), ("blocklist",))
    assert ssh.src == AddressSet(False, (net("192.0.2.7/32"),), ("office",))
    assert ssh.dports == ((22, 22),)
    assert ssh.comment == "office and the on-call laptop"
    assert [(s.path, s.kind) for s in config.sources] == [
        (str(policy), "policy"),
        (str(tmp_path / "sets" / "drop.txt"), "set"),
    ]


def test_set_mapping_with_networks_file_and_comment(tmp_path: Path) -> None:
    write(tmp_path / "more.txt", "203.0.113.0/25\n")
    policy = write(
        tmp_path / "p.yaml",
        ZONES + "sets:\n  mixed: {networks: [203.0.113.128/25], file: more.txt, comment: both halves}\n",
    )
    mixed = load_policy(policy).sets["mixed"]
    assert list(mixed.content.v4) == [network_range(net("203.0.113.0/24"))]  # the halves merged
    assert (mixed.comment, mixed.content.written, mixed.runtime_only) == ("both halves", 2, False)


def test_an_empty_set_written_as_nothing_is_a_runtime_set() -> None:
    config = parse_policy(ZONES + "sets:\n  banned:\n  listed: []\n", "p.yaml")
    assert config.sets["banned"].runtime_only and not config.sets["listed"].runtime_only
    assert len(config.sets["listed"].content) == 0


def test_sets_in_to_and_any_family() -> None:
    config = parse_policy(
        ZONES
        + "sets:\n  web: [203.0.113.10, 2001:db8::10]\n"
        + "ingress:\n"
        + '  - {name: web4, family: ipv4, proto: tcp, to: "@web", ports: [http], action: accept}\n'
        + '  - {name: web6, family: ipv6, proto: tcp, to: ["@web", "@web"], ports: [https],'
        + " action: accept}\n",
        "p.yaml",
    )
    assert [rule.dst for rule in config.ingress] == [AddressSet(False, (), ("web",))] * 2  # named once
    assert [rule.dports for rule in config.ingress] == [((80, 80),), ((443, 443),)]


@pytest.mark.parametrize(
    ("sets", "rules", "expected"),
    [
        (
            "  1bad: []\n",
            "",
            [
                "p.yaml:5:3: sets: '1bad' is not a valid set name (a letter, then letters, digits, "
                "'-' or '_', at most 24 characters)"
            ],
        ),
        (
            "  a: []\n  a: [10.0.0.0/8]\n",
            "",
            ["p.yaml:6:3: sets: duplicate set 'a' (first defined at p.yaml:5)"],
        ),
        (
            "  a: [10.0.0.1/8]\n",
            "",
            ["p.yaml:5:7: sets: a: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)"],
        ),
        ("  a: [nonsense]\n", "", ["p.yaml:5:7: sets: a: 'nonsense' is not an IP address or network"]),
        (
            '  a: ["@b"]\n',
            "",
            ["p.yaml:5:7: sets: a: a set holds addresses and networks, not other sets ('@b')"],
        ),
        ("  a: {files: x.txt}\n", "", ["p.yaml:5:7: sets: a: unknown key 'files' (did you mean 'file'?)"]),
        ("  a: {comment: [x]}\n", "", ["p.yaml:5:16: sets: a: comment: expected a single value, got a list"]),
        (
            "  a: {file: /nonexistent/x.txt}\n",
            "",
            ["p.yaml:5:13: sets: a: file: cannot read /nonexistent/x.txt: No such file or directory"],
        ),
        (
            "  office: []\n",
            '  - {name: r, from: "@ofice", action: drop}\n',
            ["p.yaml:7:21: ingress rule 'r': from: unknown set '@ofice' (did you mean 'office'?)"],
        ),
        (
            "  a: [10.0.0.1/8]\n",
            '  - {name: r, from: "@a", action: drop}\n',
            ["p.yaml:5:7: sets: a: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)"],
        ),  # @a not again
        (
            "  a: [10.0.0.0/8]\n",
            '  - {name: r, from: ["@a", any], action: drop}\n',
            ["p.yaml:7:28: ingress rule 'r': from: 'any' cannot be combined with addresses"],
        ),
    ],
)
def test_set_errors(sets: str, rules: str, expected: list[str]) -> None:
    text = ZONES + "sets:\n" + sets + ("ingress:\n" + rules if rules else "")
    assert text_errors(text) == expected


def test_bad_lines_of_a_set_file_are_located_in_it(tmp_path: Path) -> None:
    lines = [f"10.{n // 256}.{n % 256}.0/24" for n in range(1233)] + ["10.0.0.300/24"]
    drop = write(tmp_path / "drop.txt", "\n".join(lines) + "\n")
    policy = write(
        tmp_path / "p.yaml",
        ZONES
        + "sets:\n  blocklist: {file: drop.txt}\ningress:\n  - {name: x, action: drop, from: 10.0.0.1/8}\n",
    )
    assert errors_of(policy) == [
        f"{policy}:7:35: ingress rule 'x': from: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)",
        f"{drop}:1234: not an address or network: '10.0.0.300/24'",
    ]


def test_a_very_broken_set_file_reports_the_first_errors_and_how_many_more(tmp_path: Path) -> None:
    write(tmp_path / "bad.txt", "".join(f"bad{n}\n" for n in range(30)))
    policy = write(tmp_path / "p.yaml", ZONES + "sets:\n  b: {file: bad.txt}\n")
    found = errors_of(policy)
    assert len(found) == 21
    assert found[0] == f"{tmp_path / 'bad.txt'}:1: not an address or network: 'bad0'"
    assert found[-1] == f"{tmp_path / 'bad.txt'}:21: and 10 more bad lines from here on"


def test_a_set_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "bin.txt").write_bytes(b"10.0.0.0/8\n\xff\n")
    policy = write(tmp_path / "p.yaml", ZONES + "sets:\n  b: {file: bin.txt}\n")
    assert errors_of(policy) == [f"{tmp_path / 'bin.txt'}:2:1: cannot read: not UTF-8 text"]


def test_an_issue_without_column() -> None:
    assert str(ConfigIssue("drop.txt", 1234, 0, "x")) == "drop.txt:1234: x"
    assert str(ConfigIssue("p.yaml", 3, 5, "x")) == "p.yaml:3:5: x"


def test_a_set_makes_the_family_check_open() -> None:
    """A literal-only list fixes the rule's IP versions; a set may hold both (and gain entries)."""
    base = ZONES + "sets:\n  s: [10.0.0.0/8]\ningress:\n"
    assert text_errors(base + "  - {name: r, proto: icmpv6, from: 10.0.0.0/8, action: drop}\n") == [
        "p.yaml:7:5: ingress rule 'r': can never match: its proto, from and to have no IP version in common"
    ]
    parse_policy(base + '  - {name: r, proto: icmpv6, from: ["@s", 10.0.0.0/8], action: drop}\n', "p.yaml")


# --- services ----------------------------------------------------------------------------------


def test_service_names_in_ports_and_sports() -> None:
    config = parse_policy(
        ZONES
        + "ingress:\n"
        + "  - {name: r, proto: [tcp, udp], ports: [domain, HTTPS, submission, 8000-8100], sports: ntp, "
        + "action: accept}\n",
        "p.yaml",
    )
    rule = config.ingress[0]
    assert rule.dports == ((53, 53), (443, 443), (587, 587), (8000, 8100))
    assert rule.sports == ((123, 123),)


def test_service_name_errors() -> None:
    assert text_errors(
        ZONES + "ingress:\n  - {name: r, proto: tcp, ports: [sshh, htps, nosuchthing], action: accept}\n"
    ) == [
        "p.yaml:5:35: ingress rule 'r': ports: unknown service 'sshh' (did you mean 'ssh'?)",
        "p.yaml:5:41: ingress rule 'r': ports: unknown service 'htps' (did you mean 'https'?)",
        "p.yaml:5:47: ingress rule 'r': ports: unknown service 'nosuchthing'",
    ]
    assert text_errors(
        ZONES + "ingress:\n  - {name: r, proto: tcp, ports: [ssh-http], action: accept}\n"
    ) == [
        "p.yaml:5:35: ingress rule 'r': ports: unknown service 'ssh-http' (did you mean 'http'?)",
    ]


# --- comments ----------------------------------------------------------------------------------


def test_rule_comment_must_be_one_value() -> None:
    assert text_errors(ZONES + "ingress:\n  - {name: r, action: drop, comment: {a: b}}\n") == [
        "p.yaml:5:38: ingress rule 'r': comment: expected a single value, got a mapping"
    ]
    assert (
        parse_policy(ZONES + "ingress:\n  - {name: r, action: drop, comment: 42}\n").ingress[0].comment
        == "42"
    )


# --- includes ----------------------------------------------------------------------------------


def make_included(tmp_path: Path) -> Path:
    write(
        tmp_path / "conf.d" / "20-web.yaml",
        'ingress:\n  - {name: web, proto: tcp, to: "@web", ports: [http], action: accept}\n',
    )
    write(
        tmp_path / "conf.d" / "10-sets.yaml",
        "sets:\n  web: [203.0.113.10]\negress:\n"
        "  - {name: no-smb, proto: tcp, ports: [microsoft-ds], action: reject}\n"
        "include: ../extra/more.yaml\n",
    )
    write(
        tmp_path / "extra" / "more.yaml",
        "ingress:\n  - {name: more, proto: udp, ports: [domain], action: accept}\n",
    )
    write(tmp_path / "conf.d" / "README", "not yaml: not included\n")
    return write(
        tmp_path / "policy.yaml",
        ZONES + "include: [conf.d/*.yaml]\ningress:\n  - {name: first, proto: icmp, action: accept}\n",
    )


def test_includes_append_rules_in_file_name_order_and_merge_sets(tmp_path: Path) -> None:
    policy = make_included(tmp_path)
    config = load_policy(policy)
    assert [rule.name for rule in config.ingress] == [
        "first",
        "more",
        "web",
    ]  # 10-sets (and its include), 20-web
    assert [rule.file for rule in config.ingress] == [
        None,
        str(tmp_path / "conf.d" / "../extra/more.yaml"),
        str(tmp_path / "conf.d" / "20-web.yaml"),
    ]
    assert [rule.name for rule in config.egress] == ["no-smb"]
    assert config.egress[0].dports == ((445, 445),)
    assert list(config.sets) == ["web"]
    assert [(os.path.basename(s.path), s.kind) for s in config.sources] == [
        ("policy.yaml", "policy"),
        ("10-sets.yaml", "include"),
        ("more.yaml", "include"),
        ("20-web.yaml", "include"),
    ]
    assert config.sha256 == combined_digest(config.sources)
    listing = "".join(
        f"{hashlib.sha256(Path(s.path).read_bytes()).hexdigest()}  {s.path}\n" for s in config.sources
    )
    assert config.sha256 == hashlib.sha256(listing.encode()).hexdigest()


def test_the_digest_covers_every_file(tmp_path: Path) -> None:
    policy = make_included(tmp_path)
    config = load_policy(policy)
    assert digest_on_disk(config) == config.sha256
    write(tmp_path / "extra" / "more.yaml", "ingress: []\n")
    changed = digest_on_disk(config)
    assert changed not in (None, config.sha256)
    assert load_policy(policy).sha256 == changed
    write(tmp_path / "conf.d" / "30-new.yaml", "ingress: []\n")  # a new file matching the glob
    assert digest_on_disk(config) != changed  # the glob finds another file: the digest says so
    os.unlink(tmp_path / "extra" / "more.yaml")
    assert digest_on_disk(config) is None


def test_a_single_file_policy_keeps_its_file_digest(tmp_path: Path) -> None:
    policy = write(tmp_path / "p.yaml", ZONES)
    assert load_policy(policy).sha256 == hashlib.sha256(policy.read_bytes()).hexdigest()


def test_duplicate_names_across_files_name_both_places(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "sets:\n  s: []\ningress:\n  - {name: web, action: accept}\n")
    policy = write(
        tmp_path / "p.yaml",
        ZONES + "include: a.yaml\nsets:\n  s: []\ningress:\n  - {name: web, action: drop}\n",
    )
    assert errors_of(policy) == [
        f"{tmp_path / 'a.yaml'}:2:3: sets: duplicate set 's' (first defined at {policy}:6)",
        f"{tmp_path / 'a.yaml'}:4:12: duplicate rule name 'web' (first used at {policy}:8)",
    ]


def test_include_errors(tmp_path: Path) -> None:
    write(tmp_path / "zones.yaml", ZONES + "options: {max-flows: 5}\nrules: []\n")
    write(tmp_path / "broken.yaml", "ingress: [\n")
    write(tmp_path / "loop.yaml", "include: p.yaml\n")
    write(tmp_path / "list.yaml", "- a\n")
    policy = write(
        tmp_path / "p.yaml",
        ZONES + "include: [zones.yaml, broken.yaml, missing.yaml, loop.yaml, none/*.yaml, list.yaml]\n",
    )
    zones, main = tmp_path / "zones.yaml", f"the main policy file ({policy})"
    assert errors_of(policy) == [
        f"{policy}:4:36: include: cannot read {tmp_path / 'missing.yaml'}: No such file or directory",
        f"{zones}:1:1: 'zones' belongs in {main}, not in an included file",
        f"{zones}:4:1: 'options' belongs in {main}, not in an included file",
        f"{zones}:5:1: unknown key 'rules' (expected one of: sets, ingress, egress, between, nat, include)",
        f"{tmp_path / 'broken.yaml'}:2:1: invalid YAML: expected the node content, but found '<stream end>' "
        "(while parsing a flow node at line 2)",
        f"{tmp_path / 'loop.yaml'}:1:10: include: {policy} is included already (a file is read once)",
        f"{tmp_path / 'list.yaml'}:1:1: expected a mapping with sets, rule lists or nat, got a list",
    ]


def test_an_empty_included_file_is_fine(tmp_path: Path) -> None:
    write(tmp_path / "empty.yaml", "# nothing yet\n")
    policy = write(tmp_path / "p.yaml", ZONES + "include: [empty.yaml]\n")
    assert [s.kind for s in load_policy(policy).sources] == ["policy", "include"]


# --- bundles -----------------------------------------------------------------------------------


def test_a_bundle_holds_exactly_what_was_validated(tmp_path: Path) -> None:
    policy = make_included(tmp_path)
    write(tmp_path / "drop.txt", "192.0.2.0/24\n")
    with policy.open("a") as file:
        file.write("sets:\n  drop: {file: drop.txt}\n")
    files = PolicyFiles()
    config = load_policy(policy, files)
    bundle = files.bundle(str(policy))
    for path in (tmp_path / "drop.txt", tmp_path / "extra" / "more.yaml", policy):
        path.write_text("garbage: [\n")  # edited since: the bundle does not care
    again = load_bundle(bundle)
    assert again == config and again.sha256 == config.sha256
    assert [s.path for s in again.sources] == [s.path for s in config.sources]


def test_a_bundle_refuses_what_it_does_not_hold() -> None:
    files = BundleFiles(b'{"version": 1, "main": "/x/p.yaml", "files": {}, "globs": {}}')
    with pytest.raises(FileNotFoundError):
        files.read("/x/p.yaml")
    with pytest.raises(ConfigError) as caught:
        load_bundle(b"[1, 2]")
    assert str(caught.value).startswith("<bundle>:1:1: not a policy bundle")


def test_watch_sets_option() -> None:
    assert parse_policy(ZONES + "options: {watch-sets: true}\n").options.watch_sets is True
    assert parse_policy(ZONES).options.watch_sets is False
    assert text_errors(ZONES + "options: {watch-sets: sometimes}\n") == [
        "p.yaml:4:23: options: watch-sets: expected true or false, got 'sometimes'"
    ]


def test_sources_are_not_part_of_equality(tmp_path: Path) -> None:
    one = write(tmp_path / "one.yaml", ZONES)
    two = write(tmp_path / "sub" / "two.yaml", ZONES)
    first, second = load_policy(one), load_policy(two)
    assert first.sources == (SourceFile(str(one), first.sha256, "policy"),)
    assert (first.filename != second.filename) and first.sources != second.sources


# -- with zones and nat ------------------------------------------------------------------------

NAT_ZONES = (
    "zones:\n  external: [wan0]\n  internal: {interfaces: [lan0], networks: [10.0.0.0/24]}\n"
    "  dmz: {faces: inside, interfaces: [dmz0], networks: [10.0.2.0/24]}\n"
)  # lines 1-4


def test_an_included_file_holds_between_rules(tmp_path: Path) -> None:
    write(
        tmp_path / "conf.d" / "dmz.yaml",
        "sets:\n  admins: [10.0.0.7]\nbetween:\n"
        '  - {name: admin-ssh, from: "@admins", to-zone: dmz, proto: tcp, ports: [ssh], action: accept}\n',
    )
    policy = write(tmp_path / "p.yaml", NAT_ZONES + "include: conf.d/*.yaml\n")
    (rule,) = load_policy(policy).between
    assert (rule.name, rule.src, rule.to_zones, rule.dports) == (
        "admin-ssh",
        AddressSet(False, (), ("admins",)),
        ("dmz",),
        ((22, 22),),
    )
    assert rule.file == str(tmp_path / "conf.d" / "dmz.yaml")


# The nat section of a main file (lines 5-11 of p.yaml) and those of two included files.
NAT_MAIN = (
    "include: conf.d/*.yaml\n"
    "sets:\n  partners: [198.51.100.0/24]\n"
    "nat:\n"
    "  masquerade: [{out: wan0, from: 10.0.0.0/24}]\n"
    "  snat: [{out: wan0, from: 10.0.2.0/24, to: 203.0.113.5}]\n"
    "  forward: [{name: smtp, proto: tcp, ports: 25, to: 10.0.0.25}]\n"
)
NAT_FIRST = (
    "nat:\n"
    "  snat: [{out: wan0, from: '@partners', to: 203.0.113.6}]\n"
    "  forward: [{name: web, proto: tcp, ports: 80, to: 10.0.2.80, from: ['@partners', 192.0.2.0/24]}]\n"
)
NAT_SECOND = "nat:\n  masquerade:\n    - {out: wan0, from: '@office'}\nsets:\n  office: []\n"


def test_nat_in_included_files_is_appended_in_file_order(tmp_path: Path) -> None:
    first = write(tmp_path / "conf.d" / "10-first.yaml", NAT_FIRST)
    second = write(tmp_path / "conf.d" / "20-second.yaml", NAT_SECOND)
    policy = write(tmp_path / "p.yaml", NAT_ZONES + NAT_MAIN)
    nat = load_policy(policy).nat
    assert nat is not None
    assert nat.files == (str(first), str(second))
    assert [(e.file, e.line, e.sets) for e in nat.masquerade] == [
        (None, 9, ()),
        (str(second), 3, ("office",)),
    ]
    assert [(e.file, e.line, e.to) for e in nat.snat] == [
        (None, 10, ipaddress.ip_address("203.0.113.5")),
        (str(first), 2, ipaddress.ip_address("203.0.113.6")),
    ]
    assert [(f.name, f.file, f.src, f.sets) for f in nat.forward] == [
        ("smtp", None, None, ()),
        ("web", str(first), (net("192.0.2.0/24"),), ("partners",)),
    ]
    # The kernel tries source NAT in the order written, file by file: not by line alone.
    assert [(e.file, e.line) for e in nat.source_entries()] == [
        (None, 9),
        (None, 10),
        (str(first), 2),
        (str(second), 3),
    ]
    assert nat.set_entries() == [
        (str(first), 2, 10, "snat", ("partners",)),
        (str(first), 3, 13, "forward 'web'", ("partners",)),
        (str(second), 3, 7, "masquerade", ("office",)),
    ]


def test_a_nat_section_in_an_included_file_alone_makes_the_policy_s_nat(tmp_path: Path) -> None:
    second = write(tmp_path / "conf.d" / "20-second.yaml", NAT_SECOND)
    policy = write(tmp_path / "p.yaml", NAT_ZONES + "include: conf.d/*.yaml\n")
    nat = load_policy(policy).nat
    assert nat == NatConfig(
        masquerade=(SourceNatConfig(3, 7, 4, ("wan0",), (), None, ("office",), str(second)),),
        files=(str(second),),
    )


def test_forward_names_are_unique_across_files(tmp_path: Path) -> None:
    first = write(
        tmp_path / "conf.d" / "10-first.yaml",
        "nat:\n  forward:\n    - {name: smtp, proto: tcp, ports: 587, to: 10.0.0.25}\n"
        "ingress:\n  - {name: web, action: accept}\n",
    )
    second = write(
        tmp_path / "conf.d" / "20-second.yaml",
        "nat:\n  forward:\n    - {name: web, proto: tcp, ports: 80, to: 10.0.2.80}\n",
    )
    policy = write(tmp_path / "p.yaml", NAT_ZONES + NAT_MAIN)
    assert errors_of(policy) == [
        f"{first}:3:14: duplicate name 'smtp': a rule or forward at {policy}:11 has it already",
        f"{second}:3:14: duplicate name 'web': a rule or forward at {first}:5 has it already",
    ]


def test_nat_errors_in_an_included_file_are_located_in_it(tmp_path: Path) -> None:
    included = write(
        tmp_path / "nat.yaml",
        "nat:\n  masquerade:\n    - {out: wan0, from: ['@ofice', 10.0.0.5/24]}\n"
        "  forward:\n    - {name: x, proto: tcp, ports: 25, to: 10.9.9.9}\n",
    )
    policy = write(tmp_path / "p.yaml", NAT_ZONES + "include: nat.yaml\nsets:\n  office: []\n")
    assert errors_of(policy) == [
        f"{included}:3:26: nat: masquerade 1: from: unknown set '@ofice' (did you mean 'office'?)",
        f"{included}:3:36: nat: masquerade 1: from: '10.0.0.5/24' has host bits set (did you mean "
        "10.0.0.0/24?)",
        f"{included}:5:44: forward 'x': to: 10.9.9.9 is in no zone's networks; name the networks behind the "
        "zone that reaches it, e.g. zones: internal: {interfaces: [lan0], networks: [...]}",
    ]


def test_ipv6_and_set_issues_of_an_included_file_s_nat_are_located_in_it(tmp_path: Path) -> None:
    second = write(
        tmp_path / "conf.d" / "20-second.yaml", NAT_SECOND.replace("'@office'}", "'@office', family: ipv6}")
    )
    policy = write(tmp_path / "p.yaml", NAT_ZONES + "include: conf.d/*.yaml\n")
    config = load_policy(policy)
    assert ipv6_nat_issues(config, "no ip6tables nat table") == [
        ConfigIssue(str(second), 3, 7, "nat: masquerade: IPv6 NAT is not available: no ip6tables nat table")
    ]
    assert nat_set_issues(config, "no ipset module") == [
        ConfigIssue(
            str(second),
            3,
            7,
            "nat: masquerade: from: '@office' needs the kernel's ipsets, which cannot be used here: "
            "no ipset module",
        )
    ]


def test_a_forward_named_as_an_included_rule_names_the_rules_file(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "ingress:\n  - {name: smtp, action: accept}\n")
    policy = write(
        tmp_path / "p.yaml",
        NAT_ZONES
        + "include: a.yaml\nnat:\n  forward: [{name: smtp, proto: tcp, ports: 25, to: 10.0.0.25}]\n",
    )
    assert errors_of(policy) == [
        f"{policy}:7:20: duplicate name 'smtp': a rule or forward at {tmp_path / 'a.yaml'}:2 has it already"
    ]
