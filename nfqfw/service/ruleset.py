"""The kernel rules a daemon asks for: its queues, failure mode and the policy's flood protections.

One function builds the QueueSpec for the single daemon and for the supervisor of --workers,
from the run options and the loaded policy (nfqfw.core.prefilter decides what the kernel may
drop; nfqfw.firewall renders it). Built again at each reload: the pre-filter follows the rules.

`synproxy: true` covers forwarded connections (nfqfw.core.synproxy: the engine follows the
kernel's sequence adjustment); SYNs to the gateway's own addresses are not proxied.

What is not in force, and why (logged once at start and reload):
- `synproxy: true` for the gateway's own services (a rule without `to`, or to the gateway):
  the proxy's handshake with a local server passes the loopback, where nfqfw does not look;
  such SYNs are capped by new-rate as any first packet;
- UDP in the pre-filter: a reply to a UDP flow restored from a snapshot after a reboot is NEW to
  the kernel (see nfqfw.core.prefilter); UDP first packets are capped (new-rate), not dropped.

The mark bits are nfqfw.firewall.marks': `--mark` and `--conn-mark` place them.
"""

from __future__ import annotations

import logging
from typing import Any

from nfqfw.core.config import INSIDE, OUTSIDE, PROTO_TCP, Network, PolicyConfig, RuleConfig
from nfqfw.core.engine import SPOOFED_SOURCE
from nfqfw.core.prefilter import KernelMatch, KernelSet, derive, kernel_sets, port_chunks
from nfqfw.core.synproxy import rule_ifaces
from nfqfw.firewall import QueueSpec
from nfqfw.firewall.backend import Antispoof, Nat, PortForward, Protection, Rate, SourceNat, Synproxy
from nfqfw.firewall.marks import Marks
from nfqfw.service.options import Options

log = logging.getLogger("nfqfw")


def queue_spec(options: Options, config: PolicyConfig, *, bypass: bool, sets: bool = False) -> QueueSpec:
    """The rules for `options`' queues and `config`'s protections (`sets`: the backend can
    match the policy's sets in the kernel)."""
    return QueueSpec(
        options.queue_first,
        options.queue_last,
        bypass=bypass,
        mark=options.mark,
        protection=protection(options, config, sets=sets),
        conn_mark=options.conn_mark,
        owners=options.workers,
        nat=nat(config),
    )


def rule_reasons(config: PolicyConfig) -> list[str]:
    """The verdict reasons of the policy's rules in order (ingress, egress, between), then its
    forwards' and the between side's default: what the connection mark's rule field numbers
    (nfqfw.firewall.marks.Marks.rule_marks)."""
    rules = [f"rule {rule.name}" for rule in (*config.ingress, *config.egress, *config.between)]
    forwards = [] if config.nat is None else [f"forward {forward.name}" for forward in config.nat.forward]
    return [*rules, *forwards, "default between"]


def nat(config: PolicyConfig) -> Nat | None:
    """The policy's nat section as kernel rules: each forward per protocol, port chunk (multiport),
    interface and source (each network, then each set, of its `from`), then its hairpin matches
    on the inside interfaces; the source NAT entries in file order, each per interface and
    source. The sets named get an ipset per family used. None without a `nat:` section."""
    section = config.nat
    if section is None:
        return None
    source = [
        SourceNat(entry.family, iface, src, None if entry.to is None else str(entry.to), src_set)
        for entry in section.source_entries()
        for iface in entry.out_ifaces
        for src, src_set in _sources(entry.src, entry.sets)
    ]
    inside = config.interfaces_facing(INSIDE)
    forwards = []
    for forward in section.forward:
        address = (
            None if forward.address is None else f"{forward.address}/{32 if forward.family == 4 else 128}"
        )
        sources = _sources(forward.src, forward.sets)
        hairpin = [iface for iface in inside if iface not in forward.in_ifaces] if forward.hairpin else []
        for proto in sorted(forward.protocols):
            for ports in port_chunks(forward.ports):
                for iface, translated_from_inside in [(i, False) for i in forward.in_ifaces] + [
                    (i, True) for i in hairpin
                ]:
                    for src, src_set in sources:
                        match = KernelMatch(proto, src, address, ports, None, iface, src_set=src_set)
                        forwards.append(
                            PortForward(
                                forward.family,
                                forward.name,
                                match,
                                str(forward.to),
                                forward.to_port,
                                translated_from_inside,
                            )
                        )
    used = [(entry.src_set, entry.family) for entry in source]
    used += [(forward.match.src_set, forward.family) for forward in forwards]
    ipsets = tuple(
        KernelSet(name, family, config.sets[name].content.family(family))
        for name, family in dict.fromkeys(used)
        if name is not None
    )
    return Nat(tuple(source), tuple(forwards), ipsets=ipsets)


def _sources(
    networks: tuple[Network, ...] | None, sets: tuple[str, ...]
) -> list[tuple[str | None, str | None]]:
    """(network, set) of each kernel rule of a nat entry's `from`: one per network, then one per
    set; [(None, None)] for any source."""
    if networks is None:
        return [(None, None)]
    return [(str(network), None) for network in networks] + [(None, name) for name in sets]


def protection(options: Options, config: PolicyConfig, sets: bool = False) -> Protection:
    opts = config.options
    prefilter = derive(config, udp=False, kernel_sets=sets)
    rate = opts.new_rate
    per_source = opts.new_rate_per_source
    offload_bit = Marks(options.mark, options.conn_mark).offload
    offload = offload_bit if opts.offload == "established" and offload_bit else None
    synproxy = _synproxy(config)
    _log_not_in_force(config)
    log_limit = opts.log_limit
    antispoof = None
    if opts.antispoof != "off":
        antispoof = Antispoof(loose=opts.antispoof == "loose", reason=SPOOFED_SOURCE, log=opts.log_denied)
    return Protection(
        prefilter=tuple((family, hook.name, rules) for family, hook, rules in prefilter.chains if rules),
        first_protocols=tuple((family, prefilter.protocols(family)) for family in (4, 6)),
        internal_ifaces=prefilter.internal_ifaces,
        invalid_tcp_flags=prefilter.invalid_tcp_flags,
        new_first=options.first_packet_queue,
        new_rate=None if rate is None else Rate(rate.count, rate.period),
        new_rate_per_source=None if per_source is None else Rate(per_source.count, per_source.period),
        offload_mark=offload,
        synproxy=synproxy,
        log_limit=Rate(log_limit.count, log_limit.period),
        log_burst=log_limit.burst,
        reject_rate=max(1, int(options.reject_rate)),
        gateway_errors=True,
        antispoof=antispoof,
        ipsets=kernel_sets(prefilter, config),
    )


def _synproxy(config: PolicyConfig) -> tuple[Synproxy, ...]:
    """SYNPROXY for each `synproxy: true` rule, per family, for forwarded connections (FORWARD;
    the raw table's rule leaves SYNs to the gateway's own addresses alone)."""
    found = []
    external = config.interfaces_facing(OUTSIDE)
    for rule in config.ingress:
        if not rule.synproxy:
            continue
        for family in (4, 6):
            if rule.family not in (None, family):
                continue
            matches = _synproxy_matches(rule, family, external)
            if matches:
                found.append(Synproxy(family, "FORWARD", matches, rule.name))
    return tuple(found)


def _synproxy_matches(rule: RuleConfig, family: int, external: tuple[str, ...]) -> tuple[KernelMatch, ...]:
    sources: list[str | None] = [None]
    if rule.src is not None:
        sources = [str(net) for net in rule.src.networks if net.version == family]
    dsts: list[str | None] = [None]
    if rule.dst is not None:
        dsts = [str(net) for net in rule.dst.networks if net.version == family]
    return tuple(
        KernelMatch(PROTO_TCP, src=src, dst=dst, dports=rule.dports or None, in_iface=iface)
        for src in sources
        for dst in dsts
        for iface in rule_ifaces(rule, external)
    )


_warned: set[tuple[str, str]] = set()


def _log_not_in_force(config: PolicyConfig) -> None:
    def once(key: str, detail: str, message: str, *args: Any) -> None:
        if (key, detail) not in _warned:
            _warned.add((key, detail))
            log.warning(message, *args)

    for rule in config.ingress:
        if rule.synproxy and (rule.dst is None or rule.dst.gateway):
            once(
                "synproxy",
                rule.name,
                "rule %s: synproxy covers forwarded connections only: SYNs to the gateway itself are "
                "not proxied (capped by new-rate as any first packet)",
                rule.name,
            )
