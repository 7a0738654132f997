"""The iptables backend: nfqfw's rules as iptables/ip6tables chains, installed with iptables-restore.

Layout (filter table, the same for IPv4 and IPv6)::

    INPUT    rule 1: -j NFQFW-INPUT        NFQFW-INPUT:   -i lo -j RETURN
    FORWARD  rule 1: -j NFQFW-FORWARD                     -m mark ! --mark M/M -j NFQUEUE ...
    OUTPUT   rule 1: -j NFQFW-OUTPUT       NFQFW-FORWARD: -m mark ! --mark M/M -j NFQUEUE ...
                                           NFQFW-OUTPUT:  -o lo -j RETURN
                                                          -m mark ! --mark M/M -j NFQUEUE ...

Coexistence with the host's other rules (Docker, an admin's own): nfqfw touches nothing but its
three chains and the jumps to them. The jumps sit at position 1 so every packet meets the
policy first. A packet the policy accepts is not accepted outright (NF_ACCEPT would end the
hook and skip every rule after ours): the adapter sets the mark bit M on it and answers
NF_REPEAT, so the kernel runs the filter hook again from the top; this time our queue rule
does not match (the bit is set), our chain returns, and the host's later rules decide as if
nfqfw were not there. Dropped and rejected packets never reach them. The bit stays on the
packet (pick another with --mark if the host uses 0x10000000 for policy routing or the like),
and packets nfqfw sends itself (RSTs, ICMP errors) carry it too, so they skip the queue.
Anything that could set the bit before us (a process with CAP_NET_ADMIN using SO_MARK, a mangle
rule) bypasses the policy: that is the host administrator's call.

Installing is one atomic ``iptables-restore --noflush`` transaction per family: it declares the
three chains (which empties them if they exist), fills them, deletes every existing jump to them
and inserts one jump at position 1 in each base chain, so re-installing after a restart or with
another queue/mode never leaves duplicates and never has a moment without the jump.

Fail-closed: without ``--queue-bypass`` the kernel drops queued packets while no process is
bound to the queue (during a restart, after a crash). A normal stop leaves the rules in place
and removes nothing, so traffic stays blocked until nfqfw is back; with the policy option
``failure-mode: open`` the rules carry ``--queue-bypass`` and traffic passes (unfiltered) while
nfqfw is down. Only ``nfqfw rules remove`` takes the rules away, for good.

Flood protections (``QueueSpec.protection``, nfqfw.firewall.backend.Protection; without it the
rules are exactly the three above). The chains then read, per family::

    NFQFW-INPUT / NFQFW-FORWARD / NFQFW-OUTPUT:
      -i lo -j RETURN                                   (INPUT; OUTPUT: -o lo)
      [offload] -m connmark --mark O/O -j RETURN        (a handed-over flow: the kernel tracks it)
      [offload] -m mark --mark O/O -j CONNMARK --save-mark ...  (nfqfw handed the flow over)
      [offload, workers] -m mark --mark M/M --ctstate NEW -j CONNMARK --save-mark (rule, owner)
      [workers] -m mark --mark M/M --ctstate ESTABLISHED -j CONNMARK --save-mark (owner)
      -m mark --mark M/M -j RETURN                      (accepted by nfqfw: the host's rules go on)
      -p tcp --tcp-flags ... -j DROP                    (flags nfqfw always calls INVALID)
      [synproxy] ... --ctstate INVALID,UNTRACKED -j SYNPROXY; ... --ctstate INVALID -j DROP
      [gateway errors] -p icmp --ctstate RELATED -j RETURN (OUTPUT: the gateway's own errors)
      first packets (SYN, echo request[, UDP]) --ctstate NEW -j NFQFW-PRE-INPUT|-FORWARD
      --ctstate NEW -j NFQFW-NEW                        (INPUT, FORWARD)
      [first-packet queues] -p tcp --ctstate ESTABLISHED ! --ctstatus ASSURED -j NFQUEUE (them)
      [offload] --ctstate INVALID -j MARK --or-mark O   (tells nfqfw the kernel refused it)
      [workers] --ctstate RELATED -m connmark --mark OWNER(q) -j NFQUEUE --queue-num q  (per queue)
      -m mark ! --mark M/M -j NFQUEUE ...               (the main queue, as without protections)
    NFQFW-PRE-*: -i INTERNAL -j RETURN, then the ingress rules in order (RETURN: nfqfw decides;
      DROP / REJECT, each after a sample sent to the queue for the packet log), the default last
    NFQFW-NEW: per-source (and protocol) hashlimit -j DROP, all-sources hashlimit -j DROP, -j NFQUEUE (the
      queue for first packets; -j RETURN without it). A per-source table that is full drops
      the packet of a new source uncounted: counters() tells those from the chain's counters
      ("new-rate per source: table full")
    raw NFQFW-RAW (jump from PREROUTING):
      [antispoof] -m rpfilter [--loose] --invert -j NFQFW-SPOOFED (one lookup per packet)
      SYNs to synproxy rules, not to the gateway's own addresses, -j CT --notrack
    raw NFQFW-SPOOFED: a limited sample -j NFQUEUE (never with the queue bypass, never a
      packet nfqfw already accepted), then -j DROP
    With synproxy rules, installing also sets net.netfilter.nf_conntrack_tcp_loose=0 (SYNPROXY
    needs it) in the namespace, and OUTPUT lets the proxy's own ACKs by (see _synproxy_answers).

NAT (``QueueSpec.nat``, nfqfw.firewall.backend.Nat: the policy's ``nat:`` section), in the nat
table, per family::

    PREROUTING  rule 1: -j NFQFW-PREROUTING    POSTROUTING rule 1: -j NFQFW-POSTROUTING
    NFQFW-PREROUTING, per forward and kernel match (in order: the first forward that matches wins):
      MATCH -j MARK --set-xmark F/F                   (F: "one of nfqfw's forwards translated it")
      MATCH -j DNAT --to-destination TO[:PORT]
      MATCH is -i IN [-s FROM] -d ADDRESS -p PROTO [-m set --match-set nfqfwF-SET src] -m multiport
      --dports PORTS (one per network and one per set of the forward's `from`); without an address,
      -m addrtype --dst-type LOCAL --limit-iface-in (the gateway's addresses on IN). Hairpin (inside
      hosts to the public address): the same on each inside interface, marking F and H; without an
      address, the arriving interface's own addresses are left alone first (-j RETURN).
    NFQFW-POSTROUTING:
      -m mark --mark H/H -j MASQUERADE                (hairpin: replies come back through us)
      [-s FROM] -o OUT [-m set --match-set nfqfwF-SET src] -j MASQUERADE | -j SNAT --to-source TO,
      per masquerade / snat entry, outgoing interface, and network or set of its `from`

The nat table sees the first packet of a connection only; the kernel's conntrack applies the
translation to the rest. nfqfw decides at FORWARD, between the two: on the translated destination
and the original source. The mark F reaches the queue on that first packet (Meta.forwarded).

Sets (``QueueSpec.ipsets``: ``Protection.ipsets`` and ``Nat.ipsets``): a pre-filter or nat rule
on a set of the policy matches its ipset (``-m set --match-set nfqfw4-NAME src``,
nfqfw.firewall.ipset). The ipsets both use are one: filled (each in one swap) before the
iptables-restore that uses them, and those no rule uses any more are destroyed after it;
`remove` destroys them all after the rules.

The mark bits (M, O, the owner and rule fields) are nfqfw.firewall.marks'. With --workers a
worker's accept verdicts carry its owner field, so ICMP errors about a connection reach the
worker that holds it (the kernel attaches an error to the connection it quotes: RELATED, and
`-m connmark` reads that connection's mark).

The kernel's own drops carry comments ("default ingress", "rule NAME", "invalid: tcp flags",
"new-rate", "new-rate per source", "invalid: spoofed source") whose counters `counters()` reads
back (iptables-save -c), and "new-rate per source: table full", the difference of NFQFW-NEW's
counters.

Antispoof (``Protection.antispoof``) is the kernel's reverse-path lookup (``-m rpfilter``, only
allowed in PREROUTING of the raw and mangle tables): in raw, spoofed packets are dropped before
conntrack sees them (no state is made or changed) and before routing (a forged packet whose TTL
runs out draws no ICMP error to the forged source). Its log sample reaches nfqfw from the
PREROUTING hook, which queues nothing else: the engine calls it INVALID, "spoofed source". A
sample that matches an established flow may be taken by the engine's fast path, which the
adapter tries before it looks at the hook: it is counted as established and its flow's state
moves, but it is dropped all the same (accepted, it comes back marked and meets the DROP rule).

Panic mode (``nfqfw panic on``) replaces the queue rule of each chain by ``-j DROP``, after the
loopback exclusion: everything but loopback is dropped in the kernel, without a packet reaching
the queue, so it holds under a flood that keeps the daemon busy and while no daemon runs. The
panic is kept in the kernel rules only: a restarted daemon finds the DROP rules (``panic_installed``)
and keeps them, so a crash or ``systemctl restart`` never reopens a gateway in panic; a reboot,
``nfqfw panic off`` and ``nfqfw rules remove`` end it.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from nfqfw.firewall.backend import (
    Antispoof,
    Firewall,
    MatchLike,
    Nat,
    PortForward,
    Protection,
    QueueSpec,
    Rate,
    RulesError,
    SourceNat,
    Synproxy,
)
from nfqfw.firewall.ipset import Entry, is_ours, set_name

log = logging.getLogger("nfqfw")

TABLE = "filter"
RAW = "raw"
NAT = "nat"

# Base chain -> our chain. Loopback is excluded where it can occur (INPUT -i lo, OUTPUT -o lo).
CHAINS = {"INPUT": "NFQFW-INPUT", "FORWARD": "NFQFW-FORWARD", "OUTPUT": "NFQFW-OUTPUT"}
_LOOPBACK_EXCLUSION = {"INPUT": "-i lo -j RETURN", "OUTPUT": "-o lo -j RETURN"}
PRE_CHAINS = {"INPUT": "NFQFW-PRE-INPUT", "FORWARD": "NFQFW-PRE-FORWARD"}
NEW_CHAIN = "NFQFW-NEW"
PER_SOURCE_TABLE = 65536  # sources a per-source cap's table holds (per protocol and family)
PER_SOURCE_MEMORY = 10  # seconds a source idle that long stays in that table (at least)
TABLE_FULL = "new-rate per source: table full"  # the reason of the drops it cannot count
RAW_CHAIN = "NFQFW-RAW"  # in the raw table, jumped to from PREROUTING
SPOOFED_CHAIN = "NFQFW-SPOOFED"  # raw: what antispoof does with a packet rpfilter refuses
OUR_CHAINS = frozenset({*CHAINS.values(), *PRE_CHAINS.values(), NEW_CHAIN})
OUR_RAW_CHAINS = frozenset({RAW_CHAIN, SPOOFED_CHAIN})
NAT_CHAINS = {"PREROUTING": "NFQFW-PREROUTING", "POSTROUTING": "NFQFW-POSTROUTING"}
OUR_NAT_CHAINS = frozenset(NAT_CHAINS.values())
PANIC_TARGET = "DROP"
SYNPROXY_SYSCTL = "net.netfilter.nf_conntrack_tcp_loose=0"  # what SYNPROXY needs (see install)
_PANIC_LINES = frozenset(f"-A {chain} -j {PANIC_TARGET}" for chain in CHAINS.values())


@dataclass(frozen=True)
class Tools:
    family: int
    save: str
    restore: str


FAMILIES = (Tools(4, "iptables-save", "iptables-restore"), Tools(6, "ip6tables-save", "ip6tables-restore"))


@dataclass(frozen=True)
class Installed:
    """What of ours is in a family's filter and raw tables (read from iptables-save)."""

    chains: frozenset[str]  # our filter chains that exist
    jumps: tuple[str, ...]  # filter rules elsewhere that jump to our chains, as "CHAIN rule-spec"
    lines: tuple[str, ...]  # every line of ours, as iptables-save prints it (raw table's too)
    raw_chains: frozenset[str] = frozenset()  # the same for the raw table
    raw_jumps: tuple[str, ...] = ()
    nat_chains: frozenset[str] = frozenset()  # the same for the nat table
    nat_jumps: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (
            self.chains
            or self.jumps
            or self.raw_chains
            or self.raw_jumps
            or self.nat_chains
            or self.nat_jumps
        )

    @property
    def panic(self) -> bool:
        """Our chains hold panic mode's DROP rules (nothing else of ours drops)."""
        return any(line in self.lines for line in _PANIC_LINES)


# --- pure: parsing and rendering --------------------------------------------------------------


def parse_save(text: str) -> Installed:
    """Find our chains, their rules and the jumps to them in iptables-save output (filter, raw and
    nat tables; lines with counters, from iptables-save -c, are read too)."""
    found: dict[str, tuple[set[str], list[str]]] = {TABLE: (set(), []), RAW: (set(), []), NAT: (set(), [])}
    ours = {TABLE: OUR_CHAINS, RAW: OUR_RAW_CHAINS, NAT: OUR_NAT_CHAINS}
    lines: list[str] = []
    table = None
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:] if line[1:] in found else None
        if table is None:
            continue
        chains, jumps = found[table]
        if line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name in ours[table]:
                chains.add(name)
                lines.append(line)
            continue
        rule = _COUNTERS.sub("", line, count=1)
        if rule.startswith("-A "):
            words = shlex.split(rule)
            if len(words) < 2:
                continue
            if words[1] in ours[table]:
                lines.append(line)
            elif _target(words) in ours[table]:
                jumps.append(rule[3:])
                lines.append(line)
    (chains, jumps), (raw_chains, raw_jumps), (nat_chains, nat_jumps) = found[TABLE], found[RAW], found[NAT]
    return Installed(
        frozenset(chains),
        tuple(jumps),
        tuple(lines),
        frozenset(raw_chains),
        tuple(raw_jumps),
        frozenset(nat_chains),
        tuple(nat_jumps),
    )


_COUNTERS = re.compile(r"^\[\d+:\d+\] ")


def parse_counters(text: str) -> dict[str, int]:
    """Packets dropped or rejected by our commented rules, in `iptables-save -c` output:
    "ACTION REASON" -> packets (a comment is the reason, see the module docstring).

    One more reason has no rule: the per-source hashlimit drops the first packet of a source
    its full table has no room for without counting it anywhere ("hotdrop"). Every other packet
    that goes into NFQFW-NEW meets one of its rules (the last is a queue or a RETURN), so the
    jumps' counters less the chain's rules' counters are those drops (TABLE_FULL; a few packets
    either way while the counters are read)."""
    counts: dict[str, int] = {}
    ours = {TABLE: OUR_CHAINS, RAW: OUR_RAW_CHAINS}
    table = ""
    into_new_chain = 0  # jumps into NFQFW-NEW, less the packets its rules counted
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        match = _COUNTED.match(line)
        if table not in ours or match is None:
            continue
        words = shlex.split(match.group(2))
        if len(words) < 2 or words[1] not in ours[table]:
            continue
        packets, target = int(match.group(1)), _target(words)
        if words[1] == NEW_CHAIN:
            into_new_chain -= packets
        elif target == NEW_CHAIN:
            into_new_chain += packets
        action = {"DROP": "drop", "REJECT": "reject"}.get(target or "")
        if action is None or "--comment" not in words:
            continue
        key = f"{action} {words[words.index('--comment') + 1]}"
        counts[key] = counts.get(key, 0) + packets
    if into_new_chain > 0:
        counts[f"drop {TABLE_FULL}"] = into_new_chain
    return counts


_COUNTED = re.compile(r"^\[(\d+):\d+\] (-A .*)$")


def _target(words: list[str]) -> str | None:
    for option in ("-j", "--jump", "-g", "--goto"):
        if option in words:
            index = words.index(option)
            if index + 1 < len(words):
                return words[index + 1]
    return None


def queue_target(spec: QueueSpec, new: bool = False) -> str:
    """The NFQUEUE target for `spec`: one queue or a balanced range, with the failure mode;
    `new`: the range first packets go to (spec.new_queues)."""
    first, last = (spec.new_queues[0], spec.new_queues[-1]) if new else (spec.first, spec.last)
    where = f"--queue-num {first}" if first == last else f"--queue-balance {first}:{last}"
    return f"NFQUEUE {where}" + (" --queue-bypass" if spec.bypass else "")


def render_install(spec: QueueSpec, installed: Installed, family: int = 4) -> str:
    """iptables-restore --noflush input installing our rules for `family` (without protections
    the same text for both families)."""
    protection = spec.protection
    raw = (
        _render_raw(spec, protection, installed, family)
        if protection is not None
        else _render_raw_removal(installed)
    )
    raw += _render_nat(spec.nat, installed, family)
    if protection is None:
        return raw + _render_plain(spec, installed)
    return raw + _render_protected(spec, protection, installed, family)


def _render_plain(spec: QueueSpec, installed: Installed) -> str:
    match_unmarked = f"-m mark ! --mark 0x{spec.mark:x}/0x{spec.mark:x}"
    verdict = f"-j {PANIC_TARGET}" if spec.panic else f"{match_unmarked} -j {queue_target(spec)}"
    lines = ["*" + TABLE]
    lines += [f":{chain} - [0:0]" for chain in CHAINS.values()]
    for base, chain in CHAINS.items():
        if base in _LOOPBACK_EXCLUSION:
            lines.append(f"-A {chain} {_LOOPBACK_EXCLUSION[base]}")
        lines.append(f"-A {chain} {verdict}")
    lines += [f"-D {jump}" for jump in installed.jumps]
    lines += [f"-I {base} 1 -j {chain}" for base, chain in CHAINS.items()]
    lines += _drop_unused(installed.chains, frozenset(CHAINS.values()))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _drop_unused(present: frozenset[str], declared: frozenset[str]) -> list[str]:
    """Flush and delete chains of ours a new rule set no longer uses (their jumps are gone with
    the declared chains, which iptables-restore empties)."""
    unused = sorted(present - declared)
    return [f"-F {chain}" for chain in unused] + [f"-X {chain}" for chain in unused]


def _render_protected(spec: QueueSpec, protection: Protection, installed: Installed, family: int) -> str:
    if spec.panic:
        return _render_plain(spec, installed)
    mark = f"0x{spec.mark:x}/0x{spec.mark:x}"
    sample_queue = queue_target(spec, new=bool(spec.new_queues))
    chains: dict[str, list[str]] = {chain: [] for chain in CHAINS.values()}
    for base, chain in CHAINS.items():
        rules = chains[chain]
        if base in _LOOPBACK_EXCLUSION:
            rules.append(_LOOPBACK_EXCLUSION[base])
        offload = protection.offload_mark
        if offload is not None:
            # First: a handed-over connection's packets (most of the traffic, with offload) meet
            # one rule. None of them carries nfqfw's mark: they never reach the queue.
            rules.append(f"-m connmark --mark 0x{offload:x}/0x{offload:x} -j RETURN")
            rules.append(
                f"-m mark --mark 0x{offload:x}/0x{offload:x} -j CONNMARK --save-mark "
                f"--nfmask 0x{offload:x} --ctmask 0x{offload:x}"
            )
        rules += _save_connection_fields(spec, offload is not None, mark)
        rules.append(f"-m mark --mark {mark} -j RETURN")
        for mask, comp in protection.invalid_tcp_flags:
            rules.append(
                f"-p tcp -m tcp --tcp-flags {_flags(mask)} {_flags(comp)} "
                f'-m comment --comment "invalid: tcp flags" -j DROP'
            )
        if base == "OUTPUT":
            rules += _synproxy_answers(protection.synproxy_for(family), family)
            if any(rule.action == "reject" for _, _, rules_ in protection.prefilter for rule in rules_):
                rules += _REJECT_ANSWERS[family]
            if protection.gateway_errors:
                rules += _GATEWAY_ERRORS[family]
        else:
            rules += _synproxy_rules(protection.synproxy_for(family), base, family)
            if protection.prefilter_rules(family, base):
                rules += [
                    f"{guard} -m conntrack --ctstate NEW -j {PRE_CHAINS[base]}"
                    for guard in _first_packet_guards(protection.protocols(family), family)
                ]
            if spec.new_queues or protection.new_rate or protection.new_rate_per_source:
                rules.append(f"-m conntrack --ctstate NEW -j {NEW_CHAIN}")
            if spec.new_queues:
                # A TCP handshake's answer (and its retransmissions) before the connection is
                # ASSURED (the kernel sets it on the handshake's last ACK) goes with the first
                # packets: a SYN flood to an open port draws as many SYN-ACKs, and they must not
                # take the established flows' turns either. The same hash: the same worker.
                rules.append(
                    f"-p tcp -m conntrack --ctstate ESTABLISHED ! --ctstatus ASSURED -j {sample_queue}"
                )
        if offload is not None:
            # The kernel's INVALID (no connection: not carried by the kernel) is nfqfw's to
            # decide; the offload bit on a queued packet tells nfqfw the kernel's conntrack refused it.
            rules.append(f"-m conntrack --ctstate INVALID -j MARK --or-mark 0x{offload:x}")
        rules += _to_owners(spec)
        rules.append(f"-m mark ! --mark {mark} -j {queue_target(spec)}")
    for base, pre in PRE_CHAINS.items():
        prefilter = protection.prefilter_rules(family, base)
        if prefilter:
            chains[pre] = [f"-i {iface} -j RETURN" for iface in protection.internal_ifaces]
            for rule in prefilter:
                chains[pre] += _prefilter_rule(rule, protection, family, sample_queue)
    if spec.new_queues or protection.new_rate or protection.new_rate_per_source:
        chains[NEW_CHAIN] = _new_chain(spec, protection, family)
    lines = ["*" + TABLE]
    lines += [f":{chain} - [0:0]" for chain in chains]
    for chain, rules in chains.items():
        lines += [f"-A {chain} {rule}" for rule in rules]
    lines += [f"-D {jump}" for jump in installed.jumps]
    lines += [f"-I {base} 1 -j {chain}" for base, chain in CHAINS.items()]
    lines += _drop_unused(installed.chains, frozenset(chains))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _save_connection_fields(spec: QueueSpec, offload: bool, accepted: str) -> list[str]:
    """CONNMARK rules keeping, from the mark of a packet nfqfw accepted, what its connection
    must remember (nfqfw.firewall.marks): at its first packet the rule that admitted it (with
    offload) and its owner (--workers); the owner again on every later packet, so a connection
    the kernel knew before (another queue layout, a single daemon before) gets its present one."""
    marks = spec.marks
    first = (marks.rule if offload else 0) | (marks.owner if spec.owners else 0)
    lines = []
    if first:
        lines.append(
            f"-m mark --mark {accepted} -m conntrack --ctstate NEW -j CONNMARK --save-mark "
            f"--nfmask 0x{first:x} --ctmask 0x{first:x}"
        )
    if spec.owners:
        lines.append(
            f"-m mark --mark {accepted} -m conntrack --ctstate ESTABLISHED -j CONNMARK --save-mark "
            f"--nfmask 0x{marks.owner:x} --ctmask 0x{marks.owner:x}"
        )
    return lines


def _to_owners(spec: QueueSpec) -> list[str]:
    """--workers: a RELATED packet (an ICMP error, also one the gateway sends itself: the kernel
    attaches it to the connection it quotes) goes to the queue of the worker that owns the
    connection, since the kernel's balancing hash looks at the error's own addresses. A
    connection without an owner falls through to the balanced rule."""
    if not spec.owners:
        return []
    marks = spec.marks
    bypass = " --queue-bypass" if spec.bypass else ""
    return [
        f"-m conntrack --ctstate RELATED -m connmark --mark 0x{marks.owner_mark(index):x}/0x{marks.owner:x} "
        f"-j NFQUEUE --queue-num {queue}{bypass}"
        for index, queue in enumerate(spec.queues)
    ]


_FLAG_NAMES = ((0x01, "FIN"), (0x02, "SYN"), (0x04, "RST"), (0x08, "PSH"), (0x10, "ACK"), (0x20, "URG"))
_PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "ipv6-icmp"}
_REJECT_WITH = {
    4: {
        "tcp-reset": "tcp-reset",
        "icmp-port-unreachable": "icmp-port-unreachable",
        "icmp-admin-prohibited": "icmp-admin-prohibited",
    },
    6: {
        "tcp-reset": "tcp-reset",
        "icmp-port-unreachable": "icmp6-port-unreachable",
        "icmp-admin-prohibited": "icmp6-adm-prohibited",
    },
}
_UNITS = {1: "sec", 60: "min", 3600: "hour", 86400: "day"}
# The kernel's REJECT answers leave through OUTPUT as RELATED to the packet they refuse (which
# the pre-filter took, nfqfw never saw): not nfqfw's to judge, as its own answers are not.
_REJECT_ANSWERS = {
    4: [
        "-p tcp -m tcp --tcp-flags RST RST -m conntrack --ctstate RELATED -j RETURN",
        "-p icmp -m icmp --icmp-type 3/3 -m conntrack --ctstate RELATED -j RETURN",
        "-p icmp -m icmp --icmp-type 3/13 -m conntrack --ctstate RELATED -j RETURN",
    ],
    6: [
        "-p tcp -m tcp --tcp-flags RST RST -m conntrack --ctstate RELATED -j RETURN",
        "-p ipv6-icmp -m icmp6 --icmpv6-type 1/4 -m conntrack --ctstate RELATED -j RETURN",
        "-p ipv6-icmp -m icmp6 --icmpv6-type 1/1 -m conntrack --ctstate RELATED -j RETURN",
    ],
}


# The gateway's own ICMP errors (TTL exceeded, fragmentation needed / packet too big, ...) carry
# the conntrack of the packet they answer (nf_ct_attach): RELATED. When that packet was the first
# of its flow (answered before FORWARD), its conntrack is unconfirmed and shared with the error,
# and nfnetlink_queue drops such a packet instead of queueing it (nf_ct_drop_unconfirmed, Linux
# 6.11+): they must pass here. The engine models the same decision for explain and replay
# (core.l4.icmp own_error) and judges the errors the kernel does not call RELATED.
_GATEWAY_ERRORS = {
    4: ["-p icmp -m conntrack --ctstate RELATED -j RETURN"],
    6: ["-p ipv6-icmp -m conntrack --ctstate RELATED -j RETURN"],
}


def _flags(bits: int) -> str:
    """iptables --tcp-flags names, in iptables-save's order; NONE for 0."""
    return ",".join(name for bit, name in _FLAG_NAMES if bits & bit) or "NONE"


def _rate(rate: Rate) -> str:
    return f"{rate.count}/{_UNITS[rate.period]}"


def _first_packet_guards(protocols: tuple[int, ...], family: int) -> list[str]:
    guards = []
    for proto in protocols:
        if proto == 6:
            guards.append("-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN")
        elif proto == 17:
            guards.append("-p udp")
        elif proto == 1 and family == 4:
            guards.append("-p icmp -m icmp --icmp-type 8")
        elif proto == 58 and family == 6:
            guards.append("-p ipv6-icmp -m icmp6 --icmpv6-type 128")
    return guards


def _match(match: MatchLike, family: int = 4) -> str:
    """A MatchLike as iptables options, in the order iptables-save prints them."""
    words = []
    for option, value in (
        ("-s", match.src),
        ("-d", match.dst),
        ("-i", match.in_iface),
        ("-o", match.out_iface),
    ):
        if value is not None:
            words.append(f"{option} {value}")
    words.append(f"-p {_PROTO_NAMES.get(match.proto, str(match.proto))}")
    for direction, name in (
        ("src", getattr(match, "src_set", None)),
        ("dst", getattr(match, "dst_set", None)),
    ):
        if name is not None:
            words.append(f"-m set --match-set {set_name(name, family)} {direction}")
    ports = [
        (option, ranges)
        for option, ranges in (("--sports", match.sports), ("--dports", match.dports))
        if ranges
    ]
    if ports:
        words.append("-m multiport")
        for option, ranges in ports:
            text = ",".join(str(a) if a == b else f"{a}:{b}" for a, b in ranges)
            words.append(f"{option} {text}")
    return " ".join(words)


def _prefilter_rule(rule: object, protection: Protection, family: int, sample_queue: str) -> list[str]:
    match = _match(rule.match, family)  # type: ignore[attr-defined]
    action, reason = rule.action, rule.reason  # type: ignore[attr-defined]
    if action == "return":
        return [f"{match} -j RETURN"]
    lines = []
    comment = f'-m comment --comment "{reason}"'
    if rule.log:  # type: ignore[attr-defined]
        limit = f"-m limit --limit {_rate(protection.log_limit)} --limit-burst {protection.log_burst}"
        lines.append(f"{match} {limit} -j {sample_queue}")
    if action == "reject":
        answer = _REJECT_WITH[family][rule.reject_with]  # type: ignore[attr-defined]
        limit = f"-m limit --limit {protection.reject_rate}/sec --limit-burst {protection.reject_rate}"
        lines.append(f"{match} {limit} {comment} -j REJECT --reject-with {answer}")
    lines.append(f"{match} {comment} -j DROP")
    return lines


def _new_chain(spec: QueueSpec, protection: Protection, family: int) -> list[str]:
    lines = []
    if protection.new_rate_per_source is not None:
        rate = protection.new_rate_per_source
        # A source's entry goes when it has been idle for PER_SOURCE_MEMORY, or the rate's
        # period if longer (sooner, its bucket would not be whole again: more than its rate).
        # A flood from more sources than the table holds fills it: the kernel then drops the
        # first packets of sources not in it (counted as TABLE_FULL) while the sources seen
        # within PER_SOURCE_MEMORY keep their allowance, and so the clients of a random-source
        # flood's target keep connecting (with a 1 s memory the flood's sources took the
        # table's room every second: 14% of connects in `make bench-flood`, against 100%).
        expire = f"--hashlimit-htable-expire {max(PER_SOURCE_MEMORY, rate.period) * 1000}"
        table = f"--hashlimit-htable-size 16384 --hashlimit-htable-max {PER_SOURCE_TABLE} {expire}"
        mask = " --hashlimit-srcmask 64" if family == 6 else ""
        # A bucket per source and protocol: a UDP flood from an address does not use up the
        # allowance of its TCP connections. Other protocols: the global cap only.
        for proto in ("tcp", "udp", "icmp" if family == 4 else "ipv6-icmp"):
            name = f"nfqfw-{proto.removeprefix('ipv6-')}"
            lines.append(
                f"-p {proto} -m hashlimit --hashlimit-above {_rate(rate)} --hashlimit-burst {rate.count} "
                f"--hashlimit-mode srcip{mask} --hashlimit-name {name} {table} "
                f'-m comment --comment "new-rate per source" -j DROP'
            )
    if protection.new_rate is not None:
        rate = protection.new_rate
        lines.append(
            f"-m hashlimit --hashlimit-above {_rate(rate)} --hashlimit-burst {rate.count} "
            f'--hashlimit-name nfqfw-all -m comment --comment "new-rate" -j DROP'
        )
    # The last rule takes every packet the caps let by (counted: see parse_counters).
    lines.append(f"-j {queue_target(spec, new=True)}" if spec.new_queues else "-j RETURN")
    return lines


def _synproxy_rules(rules: tuple[Synproxy, ...], base: str, family: int) -> list[str]:
    lines = []
    for rule in rules:
        if rule.hook != base:
            continue
        for match in rule.matches:
            lines.append(
                f"{_match(match)} -m conntrack --ctstate INVALID,UNTRACKED -j SYNPROXY "
                "--sack-perm --timestamp --wscale 7 --mss 1460"
            )
            lines.append(
                f"{_match(match)} -m conntrack --ctstate INVALID "
                '-m comment --comment "synproxy: invalid" -j DROP'
            )
    return lines


def _synproxy_answers(rules: tuple[Synproxy, ...], family: int) -> list[str]:
    """What SYNPROXY sends itself through OUTPUT, not nfqfw's to judge: its SYN-ACKs (cookies,
    without a connection: INVALID to conntrack) and, once the server answered, its ACK to the
    server and its window update to the client (sent from the client's and the server's
    addresses, not the gateway's). Those ACKs must not wait in the queue: the kernel sets the
    connection's sequence offset right after sending them, and an ACK to the server let go
    after that would be shifted by it. Its SYN to the server is queued: nfqfw judges it
    (nfqfw.core.synproxy)."""
    lines = []
    proxy_ack = (
        "-m addrtype ! --src-type LOCAL -m tcp --tcp-flags FIN,SYN,RST,ACK ACK "
        "-m conntrack --ctstate ESTABLISHED"
    )
    for rule in rules:
        for match in rule.matches:
            answer = _match(_Reverse(match))
            lines.append(
                f"{answer} -m addrtype ! --src-type LOCAL -m tcp --tcp-flags FIN,SYN,RST,ACK SYN,ACK "
                "-m conntrack --ctstate INVALID,UNTRACKED -j RETURN"
            )
            lines.append(f"{_match(_Outbound(match))} {proxy_ack} -j RETURN")
            lines.append(f"{answer} {proxy_ack} -j RETURN")
    return lines


@dataclass(frozen=True)
class _Outbound:
    """A match without its input interface: what the gateway sends itself in its name (OUTPUT)."""

    of: MatchLike

    def __getattr__(self, name: str) -> Any:
        return None if name == "in_iface" else getattr(self.of, name)


@dataclass(frozen=True)
class _Reverse:
    """A match seen from the other side: what the kernel answers in the name of its destination."""

    of: MatchLike

    @property
    def proto(self) -> int:
        return self.of.proto

    @property
    def src(self) -> str | None:
        return self.of.dst

    @property
    def dst(self) -> str | None:
        return self.of.src

    @property
    def sports(self) -> tuple[tuple[int, int], ...] | None:
        return self.of.dports

    @property
    def dports(self) -> tuple[tuple[int, int], ...] | None:
        return self.of.sports

    in_iface = None
    out_iface = None
    src_set = None
    dst_set = None


def _render_raw(spec: QueueSpec, protection: Protection, installed: Installed, family: int) -> str:
    synproxy = protection.synproxy_for(family)
    antispoof = protection.antispoof
    if not synproxy and antispoof is None:
        return _render_raw_removal(installed)
    chains = frozenset({RAW_CHAIN} if antispoof is None else {RAW_CHAIN, SPOOFED_CHAIN})
    lines = ["*" + RAW] + [f":{chain} - [0:0]" for chain in sorted(chains)]
    if antispoof is not None:
        # One reverse-path lookup per packet (a FIB lookup: every packet pays it), its outcome
        # handled in a chain of its own.
        spoofed = "-m rpfilter --loose --invert" if antispoof.loose else "-m rpfilter --invert"
        lines.append(f"-A {RAW_CHAIN} {spoofed} -j {SPOOFED_CHAIN}")
        lines += [f"-A {SPOOFED_CHAIN} {rule}" for rule in _antispoof_rules(spec, protection, antispoof)]
    for rule in synproxy:
        for match in rule.matches:
            # Not to the gateway's own addresses: only forwarded connections are proxied.
            lines.append(
                f"-A {RAW_CHAIN} {_match(match)} -m addrtype ! --dst-type LOCAL "
                "-m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j CT --notrack"
            )
    lines += _drop_unused(installed.raw_chains, chains)
    lines += [f"-D {jump}" for jump in installed.raw_jumps]
    lines.append(f"-I PREROUTING 1 -j {RAW_CHAIN}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _antispoof_rules(spec: QueueSpec, protection: Protection, antispoof: Antispoof) -> list[str]:
    """The rules of SPOOFED_CHAIN (the packets rpfilter refused): a sample to the log, then DROP."""
    lines = []
    if antispoof.log:
        # Without the bypass: when nobody listens the sample is dropped like the rest. Not a
        # packet nfqfw accepted (its mark): that one comes back here and meets the DROP.
        sample = queue_target(replace(spec, bypass=False), new=bool(spec.new_queues))
        limit = f"-m limit --limit {_rate(protection.log_limit)} --limit-burst {protection.log_burst}"
        lines.append(f"-m mark ! --mark 0x{spec.mark:x}/0x{spec.mark:x} {limit} -j {sample}")
    lines.append(f'-m comment --comment "{antispoof.reason}" -j DROP')
    return lines


def _render_table_removal(table: str, chains: Sequence[str], jumps: Sequence[str]) -> str:
    """iptables-restore input taking nfqfw's `chains`, in this order, and the jumps to them out of
    `table` (rules first: a chain must be empty to go)."""
    if not chains and not jumps:
        return ""
    lines = ["*" + table]
    lines += [f"-D {jump}" for jump in jumps]
    lines += [f"-F {chain}" for chain in chains]
    lines += [f"-X {chain}" for chain in chains]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _render_raw_removal(installed: Installed) -> str:
    return _render_table_removal(RAW, sorted(installed.raw_chains), list(installed.raw_jumps))


# --- the nat table ------------------------------------------------------------------------------


def _render_nat(nat: Nat | None, installed: Installed, family: int) -> str:
    source, forwards = nat.for_family(family) if nat is not None else ((), ())
    if nat is None or not (source or forwards):
        return _render_nat_removal(installed)
    pre = [line for forward in forwards for line in _forward_rules(forward, nat)]
    post = []
    if any(forward.hairpin for forward in forwards):
        hairpin = f"0x{nat.hairpin_mark:x}"
        post.append(f'-m mark --mark {hairpin}/{hairpin} -m comment --comment "hairpin" -j MASQUERADE')
    post += [_source_nat_rule(entry) for entry in source]
    lines = ["*" + NAT] + [f":{chain} - [0:0]" for chain in NAT_CHAINS.values()]
    lines += [f"-A {NAT_CHAINS['PREROUTING']} {rule}" for rule in pre]
    lines += [f"-A {NAT_CHAINS['POSTROUTING']} {rule}" for rule in post]
    lines += [f"-D {jump}" for jump in installed.nat_jumps]
    lines += [f"-I {base} 1 -j {chain}" for base, chain in NAT_CHAINS.items()]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _forward_rules(forward: PortForward, nat: Nat) -> list[str]:
    """The MARK and the DNAT of one kernel match of a forward (see the module docstring)."""
    match = _match(forward.match, forward.family)
    comment = f'-m comment --comment "forward {forward.name}"'
    lines = []
    if forward.match.dst is None:  # the gateway's own addresses
        local = "-m addrtype --dst-type LOCAL"
        if forward.hairpin:  # from the inside: not the arriving interface's own addresses
            lines.append(f"{match} {local} --limit-iface-in {comment} -j RETURN")
            match = f"{match} {local}"
        else:
            match = f"{match} {local} --limit-iface-in"
    mark = f"0x{nat.marks if forward.hairpin else nat.forwarded_mark:x}"
    lines.append(f"{match} {comment} -j MARK --set-xmark {mark}/{mark}")
    lines.append(f"{match} {comment} -j DNAT --to-destination {_destination(forward)}")
    return lines


def _destination(forward: PortForward) -> str:
    if forward.to_port is None:
        return forward.to
    host = forward.to if forward.family == 4 else f"[{forward.to}]"
    return f"{host}:{forward.to_port}"


def _source_nat_rule(entry: SourceNat) -> str:
    words = []
    if entry.src is not None:
        words.append(f"-s {entry.src}")
    words.append(f"-o {entry.out_iface}")
    if entry.src_set is not None:
        words.append(f"-m set --match-set {set_name(entry.src_set, entry.family)} src")
    if entry.to is None:
        words.append('-m comment --comment "masquerade" -j MASQUERADE')
    else:
        words.append(f'-m comment --comment "snat" -j SNAT --to-source {entry.to}')
    return " ".join(words)


def _render_nat_removal(installed: Installed) -> str:
    return _render_table_removal(NAT, sorted(installed.nat_chains), list(installed.nat_jumps))


def render_remove(installed: Installed) -> str | None:
    """iptables-restore --noflush input removing every trace of us; None if nothing is there."""
    if installed.empty:
        return None
    order = [*CHAINS.values(), *PRE_CHAINS.values(), NEW_CHAIN]
    present = [chain for chain in order if chain in installed.chains]
    return (
        _render_raw_removal(installed)
        + _render_nat_removal(installed)
        + _render_table_removal(TABLE, present, list(installed.jumps))
    )


# --- running the tools ------------------------------------------------------------------------

IPV6_NAT_NEEDS = (
    "IPv6 NAT needs Linux 3.7 or later with the IPv6 nat table (CONFIG_IP6_NF_NAT, module ip6table_nat; "
    "or CONFIG_NFT_NAT with iptables-nft) and IPv6 MASQUERADE (CONFIG_IP6_NF_TARGET_MASQUERADE)"
)
_IPV6_NAT_PROBE = (
    "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
    "-A PREROUTING -i lo -p tcp -j DNAT --to-destination [::1]:1\n"
    "-A POSTROUTING -o lo -j MASQUERADE\nCOMMIT\n"
)

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


class Iptables(Firewall):
    """The Firewall backend over iptables-save/iptables-restore (and the ip6tables pair).

    `families` and `run` are injectable so that tests drive it with fake tools.
    """

    name = "iptables"

    def __init__(
        self,
        families: Iterable[Tools] = FAMILIES,
        run: Runner = subprocess.run,
        ipsets: Callable[[], Any] | None = None,
    ) -> None:
        self.families = tuple(families)
        self._run = run
        self._ipv6_nat: tuple[str | None] | None = None  # the probe's answer, once it could tell
        self._make_ipsets = ipsets or _netlink_ipsets
        self._ipsets: Any = None
        self._sets_supported: bool | None = None
        self._sets_why = ""  # why not, when not

    def _sets(self) -> Any:
        if self._ipsets is None:
            try:
                self._ipsets = self._make_ipsets()
            except OSError as err:
                raise RulesError(f"the kernel's ipsets cannot be used: {err}") from err
        return self._ipsets

    def supports_sets(self) -> bool:
        return self.sets_missing() is None

    def sets_missing(self) -> str | None:
        if self._sets_supported is None:
            try:
                self._sets().revision(4)
                self._sets_supported = True
            except (RulesError, OSError) as err:
                log.warning(
                    "no kernel ipsets (%s): rules on sets are decided by nfqfw, not pre-filtered", err
                )
                self._sets_supported, self._sets_why = False, str(err)
        return None if self._sets_supported else self._sets_why

    def set_entry(self, name: str, family: int, cidr: str, add: bool, timeout: float | None = None) -> None:
        try:
            self._sets().change(set_name(name, family), Entry.of(cidr, timeout), add)
        except OSError as err:
            raise RulesError(str(err)) from err

    def _load_sets(self, spec: QueueSpec) -> None:
        """Every ipset the rules will match holds the policy's networks (each in one swap)."""
        for found in spec.ipsets:
            entries = [entry for cidr in found.cidrs() for entry in Entry.of(cidr)]
            try:
                self._sets().load(set_name(found.name, found.family), found.family, entries)
            except OSError as err:
                raise RulesError(str(err)) from err

    def _destroy_sets(self, keep: frozenset[str] = frozenset(), everything: bool = False) -> None:
        """Our ipsets no rule uses any more (after an install: only if this backend made sets;
        `everything`: whatever an earlier run left, at removal)."""
        if self._ipsets is None and not everything:
            return
        try:
            for name in self._sets().names():
                if is_ours(name) and name not in keep:
                    self._sets().destroy(name)
        except (OSError, RulesError) as err:
            log.error("ipsets of nfqfw left in the kernel: %s", err)

    def check(self) -> None:
        for tools in self.families:
            for tool in (tools.save, tools.restore):
                if shutil.which(tool) is None:
                    raise RulesError(
                        f"{tool} not found: install iptables (with the nf_tables or legacy backend)"
                    )

    def read_installed(self, tools: Tools) -> Installed:
        # Every table the kernel has (no -t): listing a table that does not exist would create it.
        return parse_save(_run(self._run, [tools.save], None))

    def install(self, spec: QueueSpec) -> None:
        self._load_sets(spec)
        for tools in self.families:
            text = render_install(spec, self.read_installed(tools), tools.family)
            _run(self._run, [tools.restore, "-w", "--noflush"], text)
        self._destroy_sets(frozenset(set_name(found.name, found.family) for found in spec.ipsets))
        protection = spec.protection
        if protection is not None and protection.synproxy:
            # SYNPROXY only sees a client's ACK that the kernel's conntrack calls INVALID: one it
            # picked up as a connection (loose pick-up) would bypass it. Left so at removal.
            _run(self._run, ["sysctl", "-q", "-w", SYNPROXY_SYSCTL], None)

    def ipv6_nat_missing(self) -> str | None:
        """Try IPv6 MASQUERADE and DNAT in a throwaway network namespace (unshare --net: nothing of
        the host's is touched). None when that works, or when it cannot be tried (not root, no
        unshare): the installation reports a missing table then."""
        if self._ipv6_nat is not None:
            return self._ipv6_nat[0]  # the kernel does not change: probed once
        tools = next((tools for tools in self.families if tools.family == 6), None)
        if tools is None or os.geteuid() != 0 or shutil.which("unshare") is None:
            return None
        try:
            done = self._run(
                ["unshare", "--net", "--", tools.restore, "-w"],
                input=_IPV6_NAT_PROBE,
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError:
            return None
        detail = " / ".join(line.strip() for line in done.stderr.splitlines() if line.strip())
        if done.returncode != 0 and detail.startswith("unshare"):
            return None  # no namespace for the probe: cannot tell
        missing = None
        if done.returncode != 0:
            missing = f"{tools.restore} cannot load an IPv6 nat table here ({detail or 'no message'}); "
            missing += IPV6_NAT_NEEDS
        self._ipv6_nat = (missing,)
        return missing

    def counters(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for tools in self.families:
            for key, value in parse_counters(_run(self._run, [tools.save, "-c"], None)).items():
                counts[key] = counts.get(key, 0) + value
        return counts

    def panic_installed(self) -> bool:
        return any(self.read_installed(tools).panic for tools in self.families)

    def installed(self) -> bool:
        return any(not self.read_installed(tools).empty for tools in self.families)

    def remove(self) -> list[int]:
        removed = []
        for tools in self.families:
            text = render_remove(self.read_installed(tools))
            if text is not None:
                _run(self._run, [tools.restore, "-w", "--noflush"], text)
                removed.append(tools.family)
        self._destroy_sets(everything=True)
        return removed

    def show(self) -> str:
        out = []
        for tools in self.families:
            installed = self.read_installed(tools)
            out.append(f"# IPv{tools.family} ({tools.save}: tables {TABLE}, {RAW} and {NAT})")
            out += list(installed.lines) if installed.lines else ["# (no nfqfw rules)"]
        return "\n".join(out) + "\n"


def _netlink_ipsets() -> Any:
    from nfqfw.firewall.ipset import NetlinkIpsets

    return NetlinkIpsets()


def _run(run: Runner, argv: list[str], text: str | None) -> str:
    try:
        done = run(argv, input=text, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise RulesError(f"{argv[0]} not found: install iptables") from err
    if done.returncode != 0:
        detail = " / ".join(line.strip() for line in done.stderr.splitlines() if line.strip())
        if "NFQUEUE" in detail and ("load target" in detail or "No such file" in detail):
            detail = "the kernel lacks the NFQUEUE target (module xt_NFQUEUE): " + detail
        raise RulesError(f"{argv[0]} failed (exit {done.returncode}): {detail or 'no message'}")
    return done.stdout
