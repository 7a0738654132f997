"""nfqfw.firewall.iptables: the nat table (masquerade, snat, forwards, hairpin), exact text, its
removal, and the policy's nat section as kernel rules (nfqfw.service.ruleset.nat)."""
# ruff: noqa: E501  (iptables rules are compared as whole lines)

from __future__ import annotations

import subprocess

import pytest
from test_iptables import NOTHING, FakeTools

from nfqfw.core.config import parse_policy
from nfqfw.core.prefilter import KernelMatch, KernelSet
from nfqfw.firewall import QueueSpec
from nfqfw.firewall.backend import Nat, PortForward, SourceNat
from nfqfw.firewall.iptables import FAMILIES, Iptables, parse_save, render_install, render_remove
from nfqfw.service.ruleset import nat

FILTER_PLAIN = [
    "*filter",
    ":NFQFW-INPUT - [0:0]",
    ":NFQFW-FORWARD - [0:0]",
    ":NFQFW-OUTPUT - [0:0]",
    "-A NFQFW-INPUT -i lo -j RETURN",
    "-A NFQFW-INPUT -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 0",
    "-A NFQFW-FORWARD -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 0",
    "-A NFQFW-OUTPUT -o lo -j RETURN",
    "-A NFQFW-OUTPUT -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 0",
    "-I INPUT 1 -j NFQFW-INPUT",
    "-I FORWARD 1 -j NFQFW-FORWARD",
    "-I OUTPUT 1 -j NFQFW-OUTPUT",
    "COMMIT",
]
NAT_HEAD = ["*nat", ":NFQFW-PREROUTING - [0:0]", ":NFQFW-POSTROUTING - [0:0]"]
NAT_JUMPS = ["-I PREROUTING 1 -j NFQFW-PREROUTING", "-I POSTROUTING 1 -j NFQFW-POSTROUTING", "COMMIT"]


def rendered(nat_spec: Nat, family: int = 4) -> list[str]:
    text = render_install(QueueSpec(nat=nat_spec), NOTHING, family).splitlines()
    assert text[-len(FILTER_PLAIN) :] == FILTER_PLAIN  # the filter table as without NAT
    return text[: -len(FILTER_PLAIN)]


def test_masquerade_and_snat() -> None:
    spec = Nat(
        source=(
            SourceNat(4, "wan0", "10.0.0.0/24"),
            SourceNat(4, "ppp+"),
            SourceNat(4, "wan0", "10.0.1.0/24", "203.0.113.5"),
            SourceNat(6, "wan0", "fd00::/64"),
        )
    )
    assert rendered(spec) == [
        *NAT_HEAD,
        '-A NFQFW-POSTROUTING -s 10.0.0.0/24 -o wan0 -m comment --comment "masquerade" -j MASQUERADE',
        '-A NFQFW-POSTROUTING -o ppp+ -m comment --comment "masquerade" -j MASQUERADE',
        '-A NFQFW-POSTROUTING -s 10.0.1.0/24 -o wan0 -m comment --comment "snat" -j SNAT --to-source 203.0.113.5',
        *NAT_JUMPS,
    ]
    assert rendered(spec, 6) == [
        *NAT_HEAD,
        '-A NFQFW-POSTROUTING -s fd00::/64 -o wan0 -m comment --comment "masquerade" -j MASQUERADE',
        *NAT_JUMPS,
    ]


def test_source_nat_from_a_set_matches_its_ipset_of_the_entry_s_family() -> None:
    spec = Nat(
        source=(
            SourceNat(4, "wan0", "10.0.0.0/24"),
            SourceNat(4, "wan0", src_set="office"),
            SourceNat(4, "wan1", None, "203.0.113.5", "office"),
            SourceNat(6, "wan0", src_set="office"),
        )
    )
    assert rendered(spec) == [
        *NAT_HEAD,
        '-A NFQFW-POSTROUTING -s 10.0.0.0/24 -o wan0 -m comment --comment "masquerade" -j MASQUERADE',
        '-A NFQFW-POSTROUTING -o wan0 -m set --match-set nfqfw4-office src -m comment --comment "masquerade" -j MASQUERADE',
        '-A NFQFW-POSTROUTING -o wan1 -m set --match-set nfqfw4-office src -m comment --comment "snat" -j SNAT --to-source 203.0.113.5',
        *NAT_JUMPS,
    ]
    assert rendered(spec, 6) == [
        *NAT_HEAD,
        '-A NFQFW-POSTROUTING -o wan0 -m set --match-set nfqfw6-office src -m comment --comment "masquerade" -j MASQUERADE',
        *NAT_JUMPS,
    ]


def test_a_forward_from_a_set_matches_its_ipset_of_the_forward_s_family() -> None:
    v4 = KernelMatch(6, None, None, ((8080, 8080),), None, "wan0", src_set="partners")
    v6 = KernelMatch(6, None, "2001:db8::1/128", ((25, 25),), None, "wan0", src_set="partners")
    spec = Nat(
        forwards=(
            PortForward(4, "web", v4, "10.0.0.25", 80),
            PortForward(6, "smtp6", v6, "fd00::25"),
        )
    )
    web = '-i wan0 -p tcp -m set --match-set nfqfw4-partners src -m multiport --dports 8080 -m addrtype --dst-type LOCAL --limit-iface-in -m comment --comment "forward web"'
    assert rendered(spec) == [
        *NAT_HEAD,
        f"-A NFQFW-PREROUTING {web} -j MARK --set-xmark 0x80000000/0x80000000",
        f"-A NFQFW-PREROUTING {web} -j DNAT --to-destination 10.0.0.25:80",
        *NAT_JUMPS,
    ]
    smtp6 = '-d 2001:db8::1/128 -i wan0 -p tcp -m set --match-set nfqfw6-partners src -m multiport --dports 25 -m comment --comment "forward smtp6"'
    assert rendered(spec, 6) == [
        *NAT_HEAD,
        f"-A NFQFW-PREROUTING {smtp6} -j MARK --set-xmark 0x80000000/0x80000000",
        f"-A NFQFW-PREROUTING {smtp6} -j DNAT --to-destination fd00::25",
        *NAT_JUMPS,
    ]


def test_a_forward_on_a_public_address_marks_then_translates() -> None:
    match = KernelMatch(6, "198.51.100.0/24", "203.0.113.1/32", ((25, 25), (587, 587)), None, "wan0")
    spec = Nat(forwards=(PortForward(4, "smtp", match, "10.0.0.25"),))
    common = '-s 198.51.100.0/24 -d 203.0.113.1/32 -i wan0 -p tcp -m multiport --dports 25,587 -m comment --comment "forward smtp"'
    assert rendered(spec) == [
        *NAT_HEAD,
        f"-A NFQFW-PREROUTING {common} -j MARK --set-xmark 0x80000000/0x80000000",
        f"-A NFQFW-PREROUTING {common} -j DNAT --to-destination 10.0.0.25",
        *NAT_JUMPS,
    ]


def test_a_forward_to_another_port_on_the_gateway_s_own_addresses_and_ipv6() -> None:
    v4 = PortForward(4, "alt", KernelMatch(6, dports=((2525, 2525),), in_iface="wan0"), "10.0.0.25", 25)
    v6 = PortForward(6, "alt6", KernelMatch(17, dports=((53, 53),), in_iface="wan0"), "fd00::53", 5353)
    spec = Nat(forwards=(v4, v6))
    local = "-m addrtype --dst-type LOCAL --limit-iface-in"
    assert rendered(spec) == [
        *NAT_HEAD,
        f'-A NFQFW-PREROUTING -i wan0 -p tcp -m multiport --dports 2525 {local} -m comment --comment "forward alt" -j MARK --set-xmark 0x80000000/0x80000000',
        f'-A NFQFW-PREROUTING -i wan0 -p tcp -m multiport --dports 2525 {local} -m comment --comment "forward alt" -j DNAT --to-destination 10.0.0.25:25',
        *NAT_JUMPS,
    ]
    assert rendered(spec, 6)[3:5] == [
        f'-A NFQFW-PREROUTING -i wan0 -p udp -m multiport --dports 53 {local} -m comment --comment "forward alt6" -j MARK --set-xmark 0x80000000/0x80000000',
        f'-A NFQFW-PREROUTING -i wan0 -p udp -m multiport --dports 53 {local} -m comment --comment "forward alt6" -j DNAT --to-destination [fd00::53]:5353',
    ]


def test_hairpin_marks_both_bits_and_masquerades_them() -> None:
    public = KernelMatch(6, dst="203.0.113.1/32", dports=((25, 25),), in_iface="lan0")
    local = KernelMatch(6, dports=((80, 80),), in_iface="lan0")
    spec = Nat(
        forwards=(
            PortForward(4, "smtp", public, "10.0.0.25", hairpin=True),
            PortForward(4, "web", local, "10.0.0.80", hairpin=True),
        ),
        source=(SourceNat(4, "wan0", "10.0.0.0/24"),),
    )
    smtp = '-d 203.0.113.1/32 -i lan0 -p tcp -m multiport --dports 25 -m comment --comment "forward smtp"'
    web = "-i lan0 -p tcp -m multiport --dports 80 -m addrtype --dst-type LOCAL"
    assert rendered(spec) == [
        *NAT_HEAD,
        f"-A NFQFW-PREROUTING {smtp} -j MARK --set-xmark 0xc0000000/0xc0000000",
        f"-A NFQFW-PREROUTING {smtp} -j DNAT --to-destination 10.0.0.25",
        # Without an address: any of the gateway's, but those of the interface it arrives on
        f'-A NFQFW-PREROUTING {web} --limit-iface-in -m comment --comment "forward web" -j RETURN',
        f'-A NFQFW-PREROUTING {web} -m comment --comment "forward web" -j MARK --set-xmark 0xc0000000/0xc0000000',
        f'-A NFQFW-PREROUTING {web} -m comment --comment "forward web" -j DNAT --to-destination 10.0.0.80',
        '-A NFQFW-POSTROUTING -m mark --mark 0x40000000/0x40000000 -m comment --comment "hairpin" -j MASQUERADE',
        '-A NFQFW-POSTROUTING -s 10.0.0.0/24 -o wan0 -m comment --comment "masquerade" -j MASQUERADE',
        *NAT_JUMPS,
    ]


SAVE_WITH_NAT = """\
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:NFQFW-POSTROUTING - [0:0]
:NFQFW-PREROUTING - [0:0]
-A PREROUTING -j NFQFW-PREROUTING
-A PREROUTING -j DOCKER
-A POSTROUTING -j NFQFW-POSTROUTING
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A NFQFW-POSTROUTING -s 10.0.0.0/24 -o wan0 -m comment --comment masquerade -j MASQUERADE
COMMIT
*filter
:FORWARD ACCEPT [0:0]
:NFQFW-FORWARD - [0:0]
-A FORWARD -j NFQFW-FORWARD
COMMIT
"""


def test_the_nat_table_is_read_replaced_and_removed() -> None:
    installed = parse_save(SAVE_WITH_NAT)
    assert installed.nat_chains == frozenset({"NFQFW-PREROUTING", "NFQFW-POSTROUTING"})
    assert installed.nat_jumps == ("PREROUTING -j NFQFW-PREROUTING", "POSTROUTING -j NFQFW-POSTROUTING")
    assert "-A NFQFW-POSTROUTING -s 10.0.0.0/24 -o wan0 -m comment --comment masquerade -j MASQUERADE" in (
        installed.lines
    )
    # Re-installed: the old jumps go, the chains are declared (emptied) again, one jump each.
    spec = QueueSpec(nat=Nat(source=(SourceNat(4, "wan1"),)))
    text = render_install(spec, installed, 4).splitlines()
    assert text[: text.index("COMMIT") + 1] == [
        *NAT_HEAD,
        '-A NFQFW-POSTROUTING -o wan1 -m comment --comment "masquerade" -j MASQUERADE',
        "-D PREROUTING -j NFQFW-PREROUTING",
        "-D POSTROUTING -j NFQFW-POSTROUTING",
        *NAT_JUMPS,
    ]
    # A policy without nat (or with nothing for this family) takes ours away, Docker's stays.
    removal = [
        "*nat",
        "-D PREROUTING -j NFQFW-PREROUTING",
        "-D POSTROUTING -j NFQFW-POSTROUTING",
        "-F NFQFW-POSTROUTING",
        "-F NFQFW-PREROUTING",
        "-X NFQFW-POSTROUTING",
        "-X NFQFW-PREROUTING",
        "COMMIT",
    ]
    assert render_install(QueueSpec(), installed, 4).splitlines()[:8] == removal
    assert render_install(QueueSpec(nat=Nat(source=(SourceNat(6, "wan0"),))), installed, 4).splitlines()[
        :8
    ] == (removal)
    assert (render_remove(installed) or "").splitlines()[:8] == removal
    assert render_install(QueueSpec(), NOTHING, 4).splitlines() == FILTER_PLAIN  # nothing to remove


def test_the_nat_marks_must_not_share_a_bit_with_the_accept_mark() -> None:
    with pytest.raises(
        ValueError, match="the nat marks 0xc0000000 share a bit with the accept mark 0x80000000"
    ):
        QueueSpec(mark=0x80000000, conn_mark=0, nat=Nat())
    QueueSpec(mark=0x1, nat=Nat())


def test_the_policy_s_nat_section_as_kernel_rules() -> None:
    config = parse_policy(
        "zones:\n  external: [wan0, wan1]\n  internal: {interfaces: [lan0], networks: [10.0.0.0/24, fd00::/64]}\n"
        "nat:\n"
        "  snat:\n    - {out: wan1, from: [10.0.1.0/24, 10.0.2.0/24], to: 203.0.113.5}\n"
        "  masquerade:\n    - {out: [wan0, wan1], from: 10.0.0.0/24}\n"
        "  forward:\n"
        "    - {name: smtp, proto: tcp, in: wan0, ports: [25, 587], to: 10.0.0.25, address: 203.0.113.1}\n"
        "    - {name: dns, proto: [tcp, udp], ports: 53, to: 'fd00::53', from: '2001:db8::/32', hairpin: false}\n"
    )
    spec = nat(config)
    assert spec is not None
    assert spec.source == (
        SourceNat(4, "wan1", "10.0.1.0/24", "203.0.113.5"),
        SourceNat(4, "wan1", "10.0.2.0/24", "203.0.113.5"),
        SourceNat(4, "wan0", "10.0.0.0/24"),
        SourceNat(4, "wan1", "10.0.0.0/24"),
    )
    smtp = KernelMatch(6, None, "203.0.113.1/32", ((25, 25), (587, 587)), None, "wan0")
    assert spec.forwards == (
        PortForward(4, "smtp", smtp, "10.0.0.25"),
        PortForward(4, "smtp", smtp._replace(in_iface="lan0"), "10.0.0.25", hairpin=True),
        *(
            PortForward(
                6, "dns", KernelMatch(proto, "2001:db8::/32", None, ((53, 53),), None, iface), "fd00::53"
            )
            for proto in (6, 17)
            for iface in ("wan0", "wan1")
        ),
    )
    assert nat(parse_policy("zones: {external: [wan0]}\n")) is None
    assert nat(parse_policy("zones: {external: [wan0]}\nnat:\n")) == Nat()


def test_the_policy_s_nat_sets_as_kernel_rules_and_ipsets() -> None:
    config = parse_policy(
        "zones:\n  external: [wan0, wan1]\n  internal: {interfaces: [lan0], networks: [10.0.0.0/24, fd00::/64]}\n"
        "sets:\n  office: [10.0.0.0/28, 'fd00::/120']\n  partners: {}\n"
        "nat:\n"
        "  masquerade:\n"
        "    - {out: [wan0, wan1], from: ['@office', 10.0.0.128/25]}\n"
        "    - {out: wan0, from: '@office', family: ipv6}\n"
        "  snat:\n    - {out: wan1, from: '@partners', to: 203.0.113.5}\n"
        "  forward:\n"
        "    - {name: web, proto: tcp, in: wan0, ports: 8080, to: 10.0.0.25, to-port: 80, from: [192.0.2.0/24, '@partners'], hairpin: false}\n"
    )
    spec = nat(config)
    assert spec is not None
    # One rule per network, then one per set (of the entry's family), per interface.
    assert spec.source == (
        SourceNat(4, "wan0", "10.0.0.128/25"),
        SourceNat(4, "wan0", None, None, "office"),
        SourceNat(4, "wan1", "10.0.0.128/25"),
        SourceNat(4, "wan1", None, None, "office"),
        SourceNat(6, "wan0", None, None, "office"),
        SourceNat(4, "wan1", None, "203.0.113.5", "partners"),
    )
    web = KernelMatch(6, "192.0.2.0/24", None, ((8080, 8080),), None, "wan0")
    assert spec.forwards == (
        PortForward(4, "web", web, "10.0.0.25", 80),
        PortForward(4, "web", web._replace(src=None, src_set="partners"), "10.0.0.25", 80),
    )
    # The sets the rules match, one ipset per set and family used, holding the policy's networks.
    office, partners = config.sets["office"].content, config.sets["partners"].content
    assert spec.ipsets == (
        KernelSet("office", 4, office.v4),
        KernelSet("office", 6, office.v6),
        KernelSet("partners", 4, partners.v4),
    )
    assert [list(ipset.cidrs()) for ipset in spec.ipsets] == [["10.0.0.0/28"], ["fd00::/120"], []]
    assert nat(parse_policy("zones: {external: [wan0]}\nnat:\n  masquerade: [{out: wan0}]\n")) == Nat(
        (SourceNat(4, "wan0"),)
    )


def test_ipv6_nat_is_probed_in_a_throwaway_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda tool: f"/usr/bin/{tool}")
    tools = FakeTools({})
    firewall = Iptables(FAMILIES, tools)
    assert firewall.ipv6_nat_missing() is None
    assert tools.calls[-1][0] == ["unshare", "--net", "--", "ip6tables-restore", "-w"]
    assert "-A POSTROUTING -o lo -j MASQUERADE" in tools.calls[-1][1]
    assert firewall.ipv6_nat_missing() is None and len(tools.calls) == 1  # asked once

    def failing(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        message = "ip6tables-restore v1.8.9 (legacy): can't initialize ip6tables table `nat': Table does not exist\n"
        return subprocess.CompletedProcess(argv, 1, "", message)

    missing = Iptables(FAMILIES, failing).ipv6_nat_missing()
    assert missing is not None and missing.startswith(
        "ip6tables-restore cannot load an IPv6 nat table here (ip6tables-restore v1.8.9 (legacy): can't "
        "initialize ip6tables table `nat': Table does not exist); IPv6 NAT needs Linux 3.7 or later"
    )

    def no_namespace(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 1, "", "unshare: unshare failed: Operation not permitted\n")

    assert Iptables(FAMILIES, no_namespace).ipv6_nat_missing() is None  # cannot tell
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert Iptables(FAMILIES, failing).ipv6_nat_missing() is None  # not root: cannot tell
