"""nfqfw.firewall.iptables with flood protections: the exact text, counters, removal of every table."""
# ruff: noqa: E501  (iptables rules are compared as whole lines)

from __future__ import annotations

from dataclasses import replace

import pytest
from test_iptables import NOTHING, SAVE_INSTALLED, FakeTools

from nfqfw.core.prefilter import KernelMatch, KernelRule
from nfqfw.firewall import QueueSpec
from nfqfw.firewall.backend import Antispoof, Protection, Rate, Synproxy
from nfqfw.firewall.iptables import Iptables, parse_counters, parse_save, render_install, render_remove

PREFILTER = (
    KernelRule(KernelMatch(6, dst="10.0.0.25/32", dports=((25, 25), (1000, 1010))), "return", "rule mail"),
    KernelRule(KernelMatch(6, in_iface="wan+"), "reject", "rule wan", "tcp-reset", True),
    KernelRule(KernelMatch(6), "drop", "default ingress", None, False),
)
PROTECTION = Protection(
    prefilter=((4, "FORWARD", PREFILTER),),
    first_protocols=((4, (6, 1)), (6, (6, 58))),
    internal_ifaces=("lan0",),
    invalid_tcp_flags=((0x03, 0x03),),
    new_first=1,
    new_rate=Rate(20000, 1),
    new_rate_per_source=Rate(600, 60),
    log_limit=Rate(3, 60),
    log_burst=10,
    reject_rate=50,
)
INVALID = '-p tcp -m tcp --tcp-flags FIN,SYN FIN,SYN -m comment --comment "invalid: tcp flags" -j DROP'


def test_protected_rules_exact_text() -> None:
    assert render_install(QueueSpec(0, 0, protection=PROTECTION), NOTHING, 4).splitlines() == [
        "*filter",
        ":NFQFW-INPUT - [0:0]",
        ":NFQFW-FORWARD - [0:0]",
        ":NFQFW-OUTPUT - [0:0]",
        ":NFQFW-PRE-FORWARD - [0:0]",
        ":NFQFW-NEW - [0:0]",
        "-A NFQFW-INPUT -i lo -j RETURN",
        "-A NFQFW-INPUT -m mark --mark 0x10000000/0x10000000 -j RETURN",
        f"-A NFQFW-INPUT {INVALID}",
        "-A NFQFW-INPUT -m conntrack --ctstate NEW -j NFQFW-NEW",
        # a handshake's answer before the kernel calls the connection ASSURED: with the first packets
        "-A NFQFW-INPUT -p tcp -m conntrack --ctstate ESTABLISHED ! --ctstatus ASSURED -j NFQUEUE --queue-num 1",
        "-A NFQFW-INPUT -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 0",
        "-A NFQFW-FORWARD -m mark --mark 0x10000000/0x10000000 -j RETURN",
        f"-A NFQFW-FORWARD {INVALID}",
        "-A NFQFW-FORWARD -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW -j NFQFW-PRE-FORWARD",
        "-A NFQFW-FORWARD -p icmp -m icmp --icmp-type 8 -m conntrack --ctstate NEW -j NFQFW-PRE-FORWARD",
        "-A NFQFW-FORWARD -m conntrack --ctstate NEW -j NFQFW-NEW",
        # a handshake's answer before the kernel calls the connection ASSURED: with the first packets
        "-A NFQFW-FORWARD -p tcp -m conntrack --ctstate ESTABLISHED ! --ctstatus ASSURED -j NFQUEUE --queue-num 1",
        "-A NFQFW-FORWARD -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 0",
        "-A NFQFW-OUTPUT -o lo -j RETURN",
        "-A NFQFW-OUTPUT -m mark --mark 0x10000000/0x10000000 -j RETURN",
        f"-A NFQFW-OUTPUT {INVALID}",
        "-A NFQFW-OUTPUT -p tcp -m tcp --tcp-flags RST RST -m conntrack --ctstate RELATED -j RETURN",
        "-A NFQFW-OUTPUT -p icmp -m icmp --icmp-type 3/3 -m conntrack --ctstate RELATED -j RETURN",
        "-A NFQFW-OUTPUT -p icmp -m icmp --icmp-type 3/13 -m conntrack --ctstate RELATED -j RETURN",
        "-A NFQFW-OUTPUT -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 0",
        "-A NFQFW-PRE-FORWARD -i lan0 -j RETURN",
        "-A NFQFW-PRE-FORWARD -d 10.0.0.25/32 -p tcp -m multiport --dports 25,1000:1010 -j RETURN",
        "-A NFQFW-PRE-FORWARD -i wan+ -p tcp -m limit --limit 3/min --limit-burst 10 -j NFQUEUE --queue-num 1",
        '-A NFQFW-PRE-FORWARD -i wan+ -p tcp -m limit --limit 50/sec --limit-burst 50 -m comment --comment "rule wan" '
        "-j REJECT --reject-with tcp-reset",
        '-A NFQFW-PRE-FORWARD -i wan+ -p tcp -m comment --comment "rule wan" -j DROP',
        '-A NFQFW-PRE-FORWARD -p tcp -m comment --comment "default ingress" -j DROP',
        *(
            f"-A NFQFW-NEW -p {proto} -m hashlimit --hashlimit-above 600/min --hashlimit-burst 600 --hashlimit-mode srcip "
            f"--hashlimit-name nfqfw-{proto} --hashlimit-htable-size 16384 --hashlimit-htable-max 65536 "
            # an entry goes when idle for 10 s or the rate's period if longer (a minute here)
            '--hashlimit-htable-expire 60000 -m comment --comment "new-rate per source" -j DROP'
            for proto in ("tcp", "udp", "icmp")
        ),
        "-A NFQFW-NEW -m hashlimit --hashlimit-above 20000/sec --hashlimit-burst 20000 --hashlimit-name nfqfw-all "
        '-m comment --comment "new-rate" -j DROP',
        "-A NFQFW-NEW -j NFQUEUE --queue-num 1",
        "-I INPUT 1 -j NFQFW-INPUT",
        "-I FORWARD 1 -j NFQFW-FORWARD",
        "-I OUTPUT 1 -j NFQFW-OUTPUT",
        "COMMIT",
    ]


def test_ipv6_gets_icmpv6_guards_and_a_64_bit_source_mask() -> None:
    protection = replace(PROTECTION, new_first=4)
    lines = render_install(QueueSpec(2, 3, bypass=True, protection=protection), NOTHING, 6).splitlines()
    assert ":NFQFW-PRE-FORWARD - [0:0]" not in lines  # no IPv6 pre-filter rules in PROTECTION
    per_source = [line for line in lines if "--hashlimit-mode srcip" in line]
    assert [line.split()[3] for line in per_source] == ["tcp", "udp", "ipv6-icmp"]
    assert all("--hashlimit-srcmask 64" in line for line in per_source)
    assert "-A NFQFW-NEW -j NFQUEUE --queue-balance 4:5 --queue-bypass" in lines
    assert (
        "-A NFQFW-FORWARD -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-balance 2:3 --queue-bypass"
        in lines
    )


def test_offload_bypass_and_synproxy() -> None:
    synproxy = Synproxy(
        4, "FORWARD", (KernelMatch(6, dst="10.0.0.80/32", dports=((443, 443),), in_iface="wan0"),), "web"
    )
    protection = Protection(offload_mark=0x20000000, synproxy=(synproxy,))
    text = render_install(QueueSpec(0, 0, protection=protection), NOTHING, 4)
    match = "-d 10.0.0.80/32 -i wan0 -p tcp -m multiport --dports 443"
    assert text.startswith(
        "*raw\n:NFQFW-RAW - [0:0]\n"
        f"-A NFQFW-RAW {match} -m addrtype ! --dst-type LOCAL -m tcp --tcp-flags FIN,SYN,RST,ACK SYN "
        "-j CT --notrack\n"
        "-I PREROUTING 1 -j NFQFW-RAW\nCOMMIT\n*filter\n"
    )
    lines = text.splitlines()
    forward = [line for line in lines if line.startswith("-A NFQFW-FORWARD")]
    assert forward == [
        "-A NFQFW-FORWARD -m connmark --mark 0x20000000/0x20000000 -j RETURN",  # first: the offloaded
        "-A NFQFW-FORWARD -m mark --mark 0x20000000/0x20000000 -j CONNMARK --save-mark --nfmask 0x20000000 "
        "--ctmask 0x20000000",
        "-A NFQFW-FORWARD -m mark --mark 0x10000000/0x10000000 -m conntrack --ctstate NEW -j CONNMARK "
        "--save-mark --nfmask 0xff0000 --ctmask 0xff0000",
        "-A NFQFW-FORWARD -m mark --mark 0x10000000/0x10000000 -j RETURN",
        f"-A NFQFW-FORWARD {match} -m conntrack --ctstate INVALID,UNTRACKED -j SYNPROXY --sack-perm --timestamp "
        "--wscale 7 --mss 1460",
        f'-A NFQFW-FORWARD {match} -m conntrack --ctstate INVALID -m comment --comment "synproxy: invalid" -j DROP',
        "-A NFQFW-FORWARD -m conntrack --ctstate INVALID -j MARK --or-mark 0x20000000",
        "-A NFQFW-FORWARD -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 0",
    ]
    # What the proxy sends itself through OUTPUT: its cookies, its ACKs to server and client.
    proxy_ack = "-m addrtype ! --src-type LOCAL -m tcp --tcp-flags FIN,SYN,RST,ACK ACK -m conntrack --ctstate ESTABLISHED"
    reverse = "-s 10.0.0.80/32 -p tcp -m multiport --sports 443"
    output = [line for line in lines if line.startswith("-A NFQFW-OUTPUT")]
    assert output[5:8] == [
        f"-A NFQFW-OUTPUT {reverse} -m addrtype ! --src-type LOCAL -m tcp --tcp-flags FIN,SYN,RST,ACK SYN,ACK "
        "-m conntrack --ctstate INVALID,UNTRACKED -j RETURN",
        f"-A NFQFW-OUTPUT -d 10.0.0.80/32 -p tcp -m multiport --dports 443 {proxy_ack} -j RETURN",
        f"-A NFQFW-OUTPUT {reverse} {proxy_ack} -j RETURN",
    ], output
    assert render_install(QueueSpec(0, 0, protection=protection), NOTHING, 6).startswith("*filter\n")


def test_installing_synproxy_makes_the_kernels_pick_up_strict() -> None:
    synproxy = Synproxy(4, "FORWARD", (KernelMatch(6, dst="10.0.0.80/32"),), "web")
    tools = FakeTools({"iptables-save": "", "ip6tables-save": ""})
    Iptables(run=tools).install(QueueSpec(0, 0, protection=Protection(synproxy=(synproxy,))))
    assert [argv for argv, _ in tools.calls][-1] == [
        "sysctl",
        "-q",
        "-w",
        "net.netfilter.nf_conntrack_tcp_loose=0",
    ]
    tools = FakeTools({"iptables-save": "", "ip6tables-save": ""})
    Iptables(run=tools).install(QueueSpec(0, 0, protection=Protection()))
    assert not [argv for argv, _ in tools.calls if argv[0] == "sysctl"]


def test_the_gateways_own_icmp_errors_pass_output_unqueued() -> None:
    protection = Protection(gateway_errors=True)
    for family, proto in ((4, "icmp"), (6, "ipv6-icmp")):
        lines = render_install(QueueSpec(0, 0, protection=protection), NOTHING, family).splitlines()
        assert [line for line in lines if line.startswith("-A NFQFW-OUTPUT")] == [
            "-A NFQFW-OUTPUT -o lo -j RETURN",
            "-A NFQFW-OUTPUT -m mark --mark 0x10000000/0x10000000 -j RETURN",
            f"-A NFQFW-OUTPUT -p {proto} -m conntrack --ctstate RELATED -j RETURN",
            "-A NFQFW-OUTPUT -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 0",
        ]
        assert not any("RELATED" in line for line in lines if not line.startswith("-A NFQFW-OUTPUT"))


SPOOFED = Antispoof(loose=False, reason="invalid: spoofed source", log=True)


def test_antispoof_in_the_raw_table_with_a_sample_for_the_log() -> None:
    protection = Protection(antispoof=SPOOFED, log_limit=Rate(3, 60), log_burst=10)
    for family in (4, 6):
        text = render_install(QueueSpec(2, 3, bypass=True, protection=protection), NOTHING, family)
        assert text.startswith(
            "*raw\n:NFQFW-RAW - [0:0]\n:NFQFW-SPOOFED - [0:0]\n"
            "-A NFQFW-RAW -m rpfilter --invert -j NFQFW-SPOOFED\n"  # one reverse-path lookup
            "-A NFQFW-SPOOFED -m mark ! --mark 0x10000000/0x10000000 "
            "-m limit --limit 3/min --limit-burst 10 -j NFQUEUE --queue-balance 2:3\n"  # no bypass
            '-A NFQFW-SPOOFED -m comment --comment "invalid: spoofed source" -j DROP\n'
            "-I PREROUTING 1 -j NFQFW-RAW\nCOMMIT\n*filter\n"
        ), text


def test_antispoof_loose_without_log_next_to_synproxy() -> None:
    synproxy = Synproxy(4, "FORWARD", (KernelMatch(6, dst="10.0.0.80/32"),), "web")
    loose = Antispoof(loose=True, reason="invalid: spoofed source", log=False)
    protection = Protection(antispoof=loose, synproxy=(synproxy,), new_first=4)
    raw = render_install(QueueSpec(0, 0, protection=protection), NOTHING, 4).split("*filter")[0]
    assert raw.splitlines() == [
        "*raw",
        ":NFQFW-RAW - [0:0]",
        ":NFQFW-SPOOFED - [0:0]",
        "-A NFQFW-RAW -m rpfilter --loose --invert -j NFQFW-SPOOFED",
        '-A NFQFW-SPOOFED -m comment --comment "invalid: spoofed source" -j DROP',
        "-A NFQFW-RAW -d 10.0.0.80/32 -p tcp -m addrtype ! --dst-type LOCAL -m tcp --tcp-flags FIN,SYN,RST,ACK SYN "
        "-j CT --notrack",
        "-I PREROUTING 1 -j NFQFW-RAW",
        "COMMIT",
    ]
    # the sample of a strict antispoof with a queue for first packets goes there, as the pre-filter's
    strict = render_install(QueueSpec(0, 0, protection=replace(protection, antispoof=SPOOFED)), NOTHING, 4)
    assert "-m limit --limit 3/min --limit-burst 10 -j NFQUEUE --queue-num 4\n" in strict


SAVE_PROTECTED = """\
*raw
:PREROUTING ACCEPT [0:0]
:NFQFW-RAW - [0:0]
[5:300] -A PREROUTING -j NFQFW-RAW
[0:0] -A NFQFW-RAW -p tcp -j CT --notrack
COMMIT
*filter
:INPUT ACCEPT [0:0]
:NFQFW-FORWARD - [0:0]
:NFQFW-PRE-FORWARD - [0:0]
:NFQFW-NEW - [0:0]
[9:900] -A FORWARD -j NFQFW-FORWARD
[4:240] -A NFQFW-FORWARD -p tcp -m tcp --tcp-flags FIN,SYN FIN,SYN -m comment --comment "invalid: tcp flags" -j DROP
[3:180] -A NFQFW-FORWARD -p tcp -m tcp --tcp-flags FIN,ACK FIN -m comment --comment "invalid: tcp flags" -j DROP
[1:60] -A NFQFW-PRE-FORWARD -p tcp -m limit --limit 3/min --limit-burst 10 -j NFQUEUE --queue-num 1
[70:4200] -A NFQFW-PRE-FORWARD -p tcp -m comment --comment "default ingress" -j DROP
[2:120] -A NFQFW-PRE-FORWARD -p tcp -m limit --limit 5/sec -m comment --comment "rule x" -j REJECT --reject-with tcp-reset
[11:660] -A NFQFW-NEW -m hashlimit --hashlimit-above 5/sec --hashlimit-name nfqfw-all -m comment --comment new-rate -j DROP
[8:480] -A INPUT -m comment --comment "default ingress" -j DROP
COMMIT
"""


SAVE_SPOOFED = SAVE_PROTECTED.replace(
    ":NFQFW-RAW - [0:0]\n",
    ":NFQFW-RAW - [0:0]\n:NFQFW-SPOOFED - [0:0]\n",
).replace(
    "[0:0] -A NFQFW-RAW -p tcp -j CT --notrack\n",
    "[42:2520] -A NFQFW-RAW -m rpfilter --invert -j NFQFW-SPOOFED\n"
    "[2:120] -A NFQFW-SPOOFED -m mark ! --mark 0x10000000/0x10000000 -m limit "
    "--limit 3/min --limit-burst 10 -j NFQUEUE --queue-num 0\n"
    '[40:2400] -A NFQFW-SPOOFED -m comment --comment "invalid: spoofed source" -j DROP\n'
    "[0:0] -A NFQFW-RAW -p tcp -j CT --notrack\n"
    '[5:300] -A PREROUTING -m comment --comment "invalid: spoofed source" -j DROP\n',  # not ours
)


def test_antispoof_drops_are_counted_from_the_raw_table() -> None:
    assert parse_counters(SAVE_SPOOFED)["drop invalid: spoofed source"] == 40


def test_antispoof_turned_off_takes_its_chain_away_and_remove_takes_both() -> None:
    installed = parse_save(SAVE_SPOOFED)
    assert installed.raw_chains == {"NFQFW-RAW", "NFQFW-SPOOFED"}
    synproxy = Synproxy(4, "FORWARD", (KernelMatch(6, dst="10.0.0.80/32"),), "web")
    raw = render_install(QueueSpec(0, 0, protection=Protection(synproxy=(synproxy,))), installed, 4)
    assert raw.split("*filter")[0].splitlines()[-5:] == [
        "-F NFQFW-SPOOFED",
        "-X NFQFW-SPOOFED",
        "-D PREROUTING -j NFQFW-RAW",
        "-I PREROUTING 1 -j NFQFW-RAW",
        "COMMIT",
    ]
    assert (render_remove(installed) or "").startswith(
        "*raw\n-D PREROUTING -j NFQFW-RAW\n-F NFQFW-RAW\n-F NFQFW-SPOOFED\n-X NFQFW-RAW\n-X NFQFW-SPOOFED\n"
        "COMMIT\n"
    )


def test_counters_are_read_from_our_commented_rules() -> None:
    assert parse_counters(SAVE_PROTECTED) == {
        "drop invalid: tcp flags": 7,
        "drop default ingress": 70,
        "reject rule x": 2,
        "drop new-rate": 11,
    }
    tools = FakeTools({"iptables-save": SAVE_PROTECTED, "ip6tables-save": SAVE_PROTECTED})
    assert Iptables(run=tools).counters()["drop default ingress"] == 140
    assert [argv for argv, _ in tools.calls] == [["iptables-save", "-c"], ["ip6tables-save", "-c"]]


SAVE_TABLE_FULL = """\
*filter
:NFQFW-FORWARD - [0:0]
:NFQFW-INPUT - [0:0]
:NFQFW-NEW - [0:0]
[1500:60000] -A FORWARD -j NFQFW-FORWARD
[1400:56000] -A NFQFW-FORWARD -m conntrack --ctstate NEW -j NFQFW-NEW
[100:4000] -A NFQFW-INPUT -m conntrack --ctstate NEW -j NFQFW-NEW
[30:1200] -A NFQFW-NEW -p tcp -m hashlimit --hashlimit-above 10000/sec --hashlimit-mode srcip \
--hashlimit-name nfqfw-tcp -m comment --comment "new-rate per source" -j DROP
[70:2800] -A NFQFW-NEW -m hashlimit --hashlimit-above 20000/sec --hashlimit-name nfqfw-all \
-m comment --comment new-rate -j DROP
[400:16000] -A NFQFW-NEW -j NFQUEUE --queue-balance 4:7
COMMIT
""".replace("\\\n", "")


def test_first_packets_a_full_per_source_table_dropped_are_counted_from_the_chains_counters() -> None:
    # 1,500 went into NFQFW-NEW (from FORWARD and INPUT), 500 met one of its rules: the kernel
    # dropped the other 1,000 as the first packets of sources its per-source table had no room for
    assert parse_counters(SAVE_TABLE_FULL) == {
        "drop new-rate per source": 30,
        "drop new-rate": 70,
        "drop new-rate per source: table full": 1000,
    }
    every_one_met_a_rule = SAVE_TABLE_FULL.replace("[400:16000]", "[1400:56000]")
    assert "drop new-rate per source: table full" not in parse_counters(every_one_met_a_rule)


def test_without_first_packet_queues_the_new_chain_ends_in_a_return() -> None:
    lines = render_install(QueueSpec(0, 0, protection=replace(PROTECTION, new_first=None)), NOTHING, 4)
    new_chain = [line for line in lines.splitlines() if line.startswith("-A NFQFW-NEW")]
    assert new_chain[-1] == "-A NFQFW-NEW -j RETURN"


@pytest.mark.parametrize(
    ("rate", "expire"), [(Rate(100, 1), 10000), (Rate(600, 60), 60000), (Rate(5, 3600), 3600000)]
)
def test_a_per_source_entry_lasts_ten_seconds_idle_or_the_rates_period_if_longer(
    rate: Rate, expire: int
) -> None:
    protection = replace(PROTECTION, new_rate_per_source=rate)
    lines = render_install(QueueSpec(0, 0, protection=protection), NOTHING, 4).splitlines()
    per_source = [line for line in lines if "--hashlimit-mode srcip" in line]
    assert len(per_source) == 3 and all(f"--hashlimit-htable-expire {expire} " in line for line in per_source)


def test_remove_covers_the_raw_table_and_every_chain() -> None:
    installed = parse_save(SAVE_PROTECTED)
    assert installed.raw_chains == {"NFQFW-RAW"} and installed.raw_jumps == ("PREROUTING -j NFQFW-RAW",)
    assert render_remove(installed) == (
        "*raw\n-D PREROUTING -j NFQFW-RAW\n-F NFQFW-RAW\n-X NFQFW-RAW\nCOMMIT\n"
        "*filter\n-D FORWARD -j NFQFW-FORWARD\n"
        "-F NFQFW-FORWARD\n-F NFQFW-PRE-FORWARD\n-F NFQFW-NEW\n"
        "-X NFQFW-FORWARD\n-X NFQFW-PRE-FORWARD\n-X NFQFW-NEW\nCOMMIT\n"
    )


def test_plain_install_takes_away_what_protections_left() -> None:
    text = render_install(QueueSpec(0, 0), parse_save(SAVE_PROTECTED))
    assert text.startswith("*raw\n-D PREROUTING -j NFQFW-RAW\n-F NFQFW-RAW\n-X NFQFW-RAW\nCOMMIT\n*filter\n")
    assert text.endswith("-F NFQFW-NEW\n-F NFQFW-PRE-FORWARD\n-X NFQFW-NEW\n-X NFQFW-PRE-FORWARD\nCOMMIT\n")


def test_panic_with_protections_is_plain_panic() -> None:
    spec = QueueSpec(0, 0, panic=True, protection=PROTECTION)
    assert render_install(spec, parse_save(SAVE_INSTALLED), 4) == render_install(
        QueueSpec(0, 0, panic=True), parse_save(SAVE_INSTALLED), 4
    )


def test_queues_bound_for_first_packets() -> None:
    with pytest.raises(ValueError, match="bad queue range for first packets 1:2"):
        QueueSpec(2, 3, protection=Protection(new_first=1))
    assert QueueSpec(0, 0, protection=Protection(new_first=1)).bound_queues == (0, 1)
    assert QueueSpec(2, 3, protection=Protection(new_first=8)).bound_queues == (2, 3, 8, 9)
    assert QueueSpec(0, 0, protection=Protection()).bound_queues == (0,)


def test_installed_reads_both_families() -> None:
    from test_iptables import SAVE_FRESH

    assert not Iptables(
        run=FakeTools({"iptables-save": SAVE_FRESH, "ip6tables-save": SAVE_FRESH})
    ).installed()
    assert Iptables(
        run=FakeTools({"iptables-save": SAVE_FRESH, "ip6tables-save": SAVE_PROTECTED})
    ).installed()


def test_workers_mark_their_connections_and_related_packets_go_to_the_owner() -> None:
    spec = QueueSpec(2, 4, bypass=True, protection=Protection(), owners=True)
    lines = render_install(spec, NOTHING, 6).splitlines()
    forward = [line for line in lines if line.startswith("-A NFQFW-FORWARD")]
    related = "-A NFQFW-FORWARD -m conntrack --ctstate RELATED -m connmark --mark"
    assert forward == [
        "-A NFQFW-FORWARD -m mark --mark 0x10000000/0x10000000 -m conntrack --ctstate NEW -j CONNMARK "
        "--save-mark --nfmask 0xf000000 --ctmask 0xf000000",
        "-A NFQFW-FORWARD -m mark --mark 0x10000000/0x10000000 -m conntrack --ctstate ESTABLISHED -j CONNMARK "
        "--save-mark --nfmask 0xf000000 --ctmask 0xf000000",
        "-A NFQFW-FORWARD -m mark --mark 0x10000000/0x10000000 -j RETURN",
        f"{related} 0x1000000/0xf000000 -j NFQUEUE --queue-num 2 --queue-bypass",
        f"{related} 0x2000000/0xf000000 -j NFQUEUE --queue-num 3 --queue-bypass",
        f"{related} 0x3000000/0xf000000 -j NFQUEUE --queue-num 4 --queue-bypass",
        "-A NFQFW-FORWARD -m mark ! --mark 0x10000000/0x10000000 -j NFQUEUE --queue-balance 2:4 --queue-bypass",
    ]
    # The gateway's own ICMP errors (OUTPUT) are attached to the connection they quote too.
    assert (
        f"-A NFQFW-OUTPUT {related[len('-A NFQFW-FORWARD ') :]} 0x3000000/0xf000000 -j NFQUEUE --queue-num 4 --queue-bypass"
        in lines
    )
    # Panic drops them all, owners or not.
    panic = render_install(replace(spec, panic=True), NOTHING, 6)
    assert "RELATED" not in panic and "-A NFQFW-FORWARD -j DROP" in panic


def test_moved_mark_bits_move_every_rule() -> None:
    spec = QueueSpec(0, 1, mark=0x1, conn_mark=0xF0, protection=Protection(offload_mark=0x80), owners=True)
    forward = [
        line for line in render_install(spec, NOTHING, 4).splitlines() if line.startswith("-A NFQFW-FORWARD")
    ]
    assert forward[:5] == [
        "-A NFQFW-FORWARD -m connmark --mark 0x80/0x80 -j RETURN",
        "-A NFQFW-FORWARD -m mark --mark 0x80/0x80 -j CONNMARK --save-mark --nfmask 0x80 --ctmask 0x80",
        "-A NFQFW-FORWARD -m mark --mark 0x1/0x1 -m conntrack --ctstate NEW -j CONNMARK --save-mark "
        "--nfmask 0x70 --ctmask 0x70",
        "-A NFQFW-FORWARD -m mark --mark 0x1/0x1 -m conntrack --ctstate ESTABLISHED -j CONNMARK --save-mark "
        "--nfmask 0x70 --ctmask 0x70",
        "-A NFQFW-FORWARD -m mark --mark 0x1/0x1 -j RETURN",
    ]
    assert (
        "-A NFQFW-FORWARD -m conntrack --ctstate RELATED -m connmark --mark 0x20/0x70 -j NFQUEUE --queue-num 1"
        in forward
    )


def test_more_workers_than_owner_values_are_refused() -> None:
    with pytest.raises(
        ValueError, match="16 queues, but the connection mark 0x2fff0000 tells at most 15 owners"
    ):
        QueueSpec(0, 15, owners=True)
    assert QueueSpec(0, 15).queues == range(16)  # a single daemon needs no owners
    with pytest.raises(ValueError, match="must not share a bit"):
        QueueSpec(0, 0, mark=0x20000000)
