"""The pre-filter's and the nat table's sets in the kernel: netlink messages byte for byte, the
iptables text of a set match, and the order an install and a removal keep (sets before the rules
that use them, destroyed after the rules that used them); why the sets cannot be used."""

from __future__ import annotations

import struct
from typing import Any

from test_iptables import NOTHING, SAVE_FRESH, FakeTools

from nfqfw.core.config import parse_policy
from nfqfw.core.prefilter import KernelMatch, KernelRule, KernelSet, derive, kernel_sets
from nfqfw.core.sets import Ranges, network_range
from nfqfw.core.verdict import Hook
from nfqfw.firewall import QueueSpec
from nfqfw.firewall.backend import Protection
from nfqfw.firewall.ipset import (
    ATTR_ADT,
    CMD_ADD,
    CMD_CREATE,
    NLA_F_NESTED,
    Entry,
    IpsetError,
    attributes,
    encode_adds,
    encode_create,
    encode_entry,
    is_ours,
    set_name,
)
from nfqfw.firewall.iptables import Iptables, render_install
from nfqfw.service.ruleset import nat

POLICY = """\
zones: {external: [wan0], internal: [lan0]}
sets:
  blocklist: [192.0.2.0/24, 2001:db8:bad::/48]
  office: [198.51.100.0/24]
ingress:
  - {name: drop-listed, from: "@blocklist", action: drop}
  - {name: ssh-office, proto: tcp, from: "@office", ports: [ssh], action: accept}
"""


def test_entries_and_their_bytes() -> None:
    (entry,) = Entry.of("192.0.2.0/24", 30.4)
    assert entry == Entry(bytes([192, 0, 2, 0]), 24, 30)
    assert Entry.of("0.0.0.0/0") == [
        Entry(bytes(4), 1),
        Entry(bytes([128, 0, 0, 0]), 1),
    ]  # hash:net takes no /0
    assert encode_entry(entry) == (
        struct.pack("=HH", 32, 7 | NLA_F_NESTED)  # DATA
        + struct.pack("=HH", 12, 1 | NLA_F_NESTED)  # IP
        + struct.pack("=HH", 8, 1 | 0x4000)
        + bytes([192, 0, 2, 0])  # IPADDR_IPV4, network order
        + struct.pack("=HHB3x", 5, 3, 24)  # CIDR
        + struct.pack("=HH", 8, 6 | 0x4000)
        + struct.pack("!I", 30)  # TIMEOUT
    )


def test_a_create_message() -> None:
    data = encode_create("nfqfw4-blocklist", 4, 7, 65536, seq=5)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", data)
    assert (length, kind, flags, seq) == (len(data), 6 << 8 | CMD_CREATE, 0x5, 5)
    found = dict(attributes(data[20:]))
    assert found[2] == b"nfqfw4-blocklist\0" and found[3] == b"hash:net\0"
    assert (found[1], found[4], found[5]) == (b"\x06", b"\x07", b"\x02")
    assert dict(attributes(found[7])) == {6: struct.pack("!I", 0), 19: struct.pack("!I", 65536)}


def test_adds_go_in_batches() -> None:
    entries = [Entry(struct.pack("!I", n << 8), 24) for n in range(3000)]
    messages = list(encode_adds("nfqfw4-big", entries, seq=10))
    assert len(messages) == 3  # 24 bytes an entry, 32 KB a message
    counted = 0
    for number, data in enumerate(messages):
        length, kind, _flags, seq, _ = struct.unpack_from("=IHHII", data)
        assert (length, kind, seq) == (len(data), 6 << 8 | CMD_ADD, 10 + number)
        found = dict(attributes(data[20:]))
        assert 9 in found  # LINENO: the kernel wants one with a batch
        counted += sum(1 for _ in attributes(found[ATTR_ADT]))
    assert counted == 3000


def test_names() -> None:
    assert set_name("blocklist", 6) == "nfqfw6-blocklist"
    assert set_name("b" * 24, 4, temporary=True) == "nfqft4-" + "b" * 24 and len("nfqft4-" + "b" * 24) == 31
    assert is_ours("nfqfw4-x") and is_ours("nfqft6-x") and not is_ours("nfqfw-x") and not is_ours("docker")


def test_a_drop_rule_on_a_set_matches_its_ipset() -> None:
    config = parse_policy(POLICY)
    prefilter = derive(config, kernel_sets=True)
    assert prefilter.rules(4, Hook.FORWARD)[:2] == (
        KernelRule(KernelMatch(6, src_set="blocklist"), "drop", "rule drop-listed", None, True),
        KernelRule(KernelMatch(1, src_set="blocklist"), "drop", "rule drop-listed", None, True),
    )
    # an accept rule on a set is a RETURN over any address: a set in the kernel only ever drops
    assert prefilter.rules(4, Hook.FORWARD)[2] == KernelRule(
        KernelMatch(6, dports=((22, 22),)), "return", "rule ssh-office"
    )
    assert prefilter.sets(4) == ["blocklist"] and prefilter.sets(6) == ["blocklist"]
    assert kernel_sets(prefilter, config) == (
        KernelSet(
            "blocklist", 4, Ranges(4, [network_range(__import__("ipaddress").ip_network("192.0.2.0/24"))])
        ),
        KernelSet(
            "blocklist",
            6,
            Ranges(6, [network_range(__import__("ipaddress").ip_network("2001:db8:bad::/48"))]),
        ),
    )


def test_without_kernel_sets_a_set_rule_is_left_to_nfqfw() -> None:
    prefilter = derive(parse_policy(POLICY))
    assert prefilter.rules(4, Hook.FORWARD)[:2] == (
        KernelRule(KernelMatch(6), "return", "rule drop-listed"),
        KernelRule(KernelMatch(1), "return", "rule drop-listed"),
    )
    assert prefilter.sets(4) == []


def test_the_iptables_text_of_a_set_match() -> None:
    config = parse_policy(POLICY)
    prefilter = derive(config, kernel_sets=True)
    protection = Protection(
        prefilter=tuple((family, hook.name, rules) for family, hook, rules in prefilter.chains if rules),
        first_protocols=tuple((family, prefilter.protocols(family)) for family in (4, 6)),
        internal_ifaces=prefilter.internal_ifaces,
        ipsets=kernel_sets(prefilter, config),
    )
    text = render_install(QueueSpec(0, 0, protection=protection), NOTHING, 6)
    assert (
        "-A NFQFW-PRE-FORWARD -p tcp -m set --match-set nfqfw6-blocklist src "
        '-m comment --comment "rule drop-listed" -j DROP' in text.splitlines()
    )
    spec = QueueSpec(0, 0, protection=protection)
    assert [(ipset.name, ipset.family) for ipset in spec.ipsets] == [("blocklist", 4), ("blocklist", 6)]


class FakeIpsets:
    """The netlink side, recorded: what was loaded, changed and destroyed, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.present = {"nfqfw4-old", "nfqfw4-blocklist", "docker-set"}

    def revision(self, family: int) -> int:
        return 7

    def names(self) -> list[str]:
        return sorted(self.present)

    def load(self, name: str, family: int, entries: list[Entry]) -> None:
        self.calls.append(("load", name, len(entries)))
        self.present.add(name)

    def change(self, name: str, entries: list[Entry], add: bool = True) -> None:
        self.calls.append(("add" if add else "del", name, entries))

    def destroy(self, name: str) -> None:
        self.calls.append(("destroy", name))
        self.present.discard(name)


def test_install_loads_sets_first_and_destroys_unused_ones_after() -> None:
    config = parse_policy(POLICY)
    prefilter = derive(config, kernel_sets=True)
    protection = Protection(
        prefilter=tuple((family, hook.name, rules) for family, hook, rules in prefilter.chains if rules),
        first_protocols=tuple((family, prefilter.protocols(family)) for family in (4, 6)),
        ipsets=kernel_sets(prefilter, config),
    )
    tools = FakeTools({"iptables-save": SAVE_FRESH, "ip6tables-save": SAVE_FRESH})
    fake = FakeIpsets()
    order: list[str] = []
    real_call = tools.__call__

    def run(argv: list[str], **kwargs: Any) -> Any:
        order.append(argv[0])
        return real_call(argv, **kwargs)

    firewall = Iptables(run=run, ipsets=lambda: fake)
    assert firewall.supports_sets()
    fake.calls.clear()
    firewall.install(QueueSpec(0, 0, protection=protection))
    assert fake.calls == [
        ("load", "nfqfw4-blocklist", 1),
        ("load", "nfqfw6-blocklist", 1),
        ("destroy", "nfqfw4-old"),
    ]
    assert order == ["iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore"]
    firewall.set_entry("blocklist", 4, "203.0.113.9/32", True, 60.0)
    assert fake.calls[-1] == ("add", "nfqfw4-blocklist", [Entry(bytes([203, 0, 113, 9]), 32, 60)])
    fake.calls.clear()
    firewall.remove()
    assert fake.calls == [("destroy", "nfqfw4-blocklist"), ("destroy", "nfqfw6-blocklist")]  # not docker's


NAT_POLICY = (
    POLICY
    + """\
nat:
  masquerade: [{out: wan0, from: ["@office", "@blocklist"]}]
"""
)


def test_the_nat_table_s_sets_are_made_filled_and_destroyed_with_the_pre_filter_s() -> None:
    """The ipsets are the union of the pre-filter's and the nat table's: blocklist is both's
    (made once per family), office the nat table's alone."""
    config = parse_policy(NAT_POLICY)
    prefilter = derive(config, kernel_sets=True)
    protection = Protection(
        prefilter=tuple((family, hook.name, rules) for family, hook, rules in prefilter.chains if rules),
        first_protocols=tuple((family, prefilter.protocols(family)) for family in (4, 6)),
        ipsets=kernel_sets(prefilter, config),
    )
    spec = QueueSpec(0, 0, protection=protection, nat=nat(config))
    assert [(ipset.name, ipset.family) for ipset in spec.ipsets] == [
        ("blocklist", 4),
        ("blocklist", 6),
        ("office", 4),
    ]
    assert spec.matches_set("office", 4) and not spec.matches_set("office", 6)
    assert spec.matches_set("blocklist", 6) and not spec.matches_set("partners", 4)
    tools = FakeTools({"iptables-save": SAVE_FRESH, "ip6tables-save": SAVE_FRESH})
    fake = FakeIpsets()
    firewall = Iptables(run=tools, ipsets=lambda: fake)
    firewall.install(spec)
    assert fake.calls == [
        ("load", "nfqfw4-blocklist", 1),
        ("load", "nfqfw6-blocklist", 1),
        ("load", "nfqfw4-office", 1),
        ("destroy", "nfqfw4-old"),
    ]
    restored = tools.calls[1][1]
    assert (
        '-A NFQFW-POSTROUTING -o wan0 -m set --match-set nfqfw4-office src -m comment --comment "masquerade" '
        "-j MASQUERADE" in restored.splitlines()
    )
    # The nat table alone (no pre-filter): its sets are made all the same, the others go.
    fake.calls.clear()
    firewall.install(QueueSpec(0, 0, nat=nat(config)))
    assert fake.calls == [
        ("load", "nfqfw4-office", 1),
        ("load", "nfqfw4-blocklist", 1),
        ("destroy", "nfqfw6-blocklist"),
    ]


def test_why_the_kernel_s_sets_cannot_be_used() -> None:
    def no_netlink() -> Any:
        raise OSError(93, "Protocol not supported")

    firewall = Iptables(run=FakeTools({}), ipsets=no_netlink)
    assert firewall.sets_missing() == "the kernel's ipsets cannot be used: [Errno 93] Protocol not supported"
    assert not firewall.supports_sets()

    class NoHashNet(FakeIpsets):
        def revision(self, family: int) -> int:
            raise IpsetError(2, "ipset: the kernel has no hash:net")

    assert (
        Iptables(run=FakeTools({}), ipsets=NoHashNet).sets_missing()
        == "[Errno 2] ipset: the kernel has no hash:net"
    )
    assert Iptables(run=FakeTools({}), ipsets=FakeIpsets).sets_missing() is None
