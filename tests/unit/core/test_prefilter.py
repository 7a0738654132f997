"""nfqfw.core.prefilter: what the kernel may drop before the queue, held against the engine.

The property test is black-box: random policies (through the policy loader), a random history
of packets fed to Engine.process (sometimes across a reload that keeps flows), then a probe.
If the pre-filter's rules drop (reject) the probe, the engine must drop (reject it the same
way). The kernel's conntrack is modelled as knowing every flow the engine accepted a packet
of: it calls the probe NEW only when no packet of the probe's addresses, ports and protocol
(either direction) was accepted before -- the proviso of the module's invariant.
"""

from __future__ import annotations

import struct
from textwrap import dedent

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nfqfw.core.build import addr, icmp, icmpv6, ipv4, ipv6, tcp, udp
from nfqfw.core.config import ConfigError, PolicyConfig, parse_policy
from nfqfw.core.engine import Engine
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.prefilter import (
    ACK,
    DROP,
    FIN,
    INVALID_TCP_FLAGS,
    PSH,
    REJECT,
    RETURN,
    RST,
    SYN,
    URG,
    KernelMatch,
    KernelRule,
    Prefilter,
    Probe,
    derive,
    evaluate,
    tcp_flags_invalid,
)
from nfqfw.core.verdict import Action, Hook, Meta

ZONES = "zones:\n  external: [wan0, wan+]\n  internal: [lan0, lan1]\n"


def policy(text: str) -> PolicyConfig:
    return parse_policy(ZONES + dedent(text))


# --- exact derivations --------------------------------------------------------------------------


def test_invalid_flag_pairs_match_exactly_the_invalid_combinations() -> None:
    for flags in range(64):  # FIN SYN RST PSH ACK URG
        by_pairs = any(flags & mask == comp for mask, comp in INVALID_TCP_FLAGS)
        assert by_pairs == tcp_flags_invalid(flags), f"flags 0x{flags:02x}"
    assert not tcp_flags_invalid(SYN | PSH) and tcp_flags_invalid(SYN | FIN | ACK)


def test_a_port_rule_and_the_default() -> None:
    prefilter = derive(
        policy("ingress:\n  - {name: mail, proto: tcp, to: 10.0.0.25, ports: [25, 587], action: accept}\n")
    )
    assert prefilter.internal_ifaces == ("lan0", "lan1")
    assert prefilter.rules(4, Hook.FORWARD) == (
        KernelRule(KernelMatch(6, dst="10.0.0.25/32", dports=((25, 25), (587, 587))), RETURN, "rule mail"),
        KernelRule(KernelMatch(6), DROP, "default ingress", None, True),
        KernelRule(KernelMatch(1), DROP, "default ingress", None, True),
    )
    # IPv6: the rule has no IPv6 address, so it can never match there
    assert prefilter.rules(6, Hook.FORWARD) == (
        KernelRule(KernelMatch(6), DROP, "default ingress", None, True),
        KernelRule(KernelMatch(58), DROP, "default ingress", None, True),
    )


def test_reject_rules_and_default_answer_as_nfqfw_does() -> None:
    prefilter = derive(
        policy("""\
            defaults: {ingress: reject}
            options: {log-denied: false}
            ingress:
              - {name: no-ident, proto: tcp, ports: 113, action: reject, log: true}
            """),
        udp=True,
    )
    assert prefilter.rules(4, Hook.INPUT) == (
        KernelRule(KernelMatch(6, dports=((113, 113),)), REJECT, "rule no-ident", "tcp-reset", True),
        KernelRule(KernelMatch(6), REJECT, "default ingress", "tcp-reset"),
        KernelRule(KernelMatch(17), REJECT, "default ingress", "icmp-port-unreachable"),
        KernelRule(KernelMatch(1), REJECT, "default ingress", "icmp-admin-prohibited"),
    )


def test_limited_rules_are_left_to_nfqfw() -> None:
    prefilter = derive(policy("ingress:\n  - {name: ssh, proto: tcp, ports: 22, action: drop, limit: 1/s}\n"))
    assert prefilter.rules(4, Hook.FORWARD)[0] == KernelRule(
        KernelMatch(6, dports=((22, 22),)), RETURN, "rule ssh"
    )


def test_gateway_and_output_interfaces_follow_the_hook() -> None:
    prefilter = derive(
        policy("""\
            ingress:
              - {name: ssh-gw, proto: tcp, to: gateway, ports: 22, action: accept}
              - {name: to-lan1, out: lan1, action: accept}
            """)
    )
    # `to: gateway` is every packet on INPUT, none on FORWARD; `out:` never matches on INPUT
    assert prefilter.rules(4, Hook.INPUT)[0] == KernelRule(
        KernelMatch(6, dports=((22, 22),)), RETURN, "rule ssh-gw"
    )
    assert [rule.reason for rule in prefilter.rules(4, Hook.INPUT)] == [
        "rule ssh-gw",
        "default ingress",
        "default ingress",
    ]
    assert prefilter.rules(4, Hook.FORWARD)[:2] == (
        KernelRule(KernelMatch(6, out_iface="lan1"), RETURN, "rule to-lan1"),
        KernelRule(KernelMatch(1, out_iface="lan1"), RETURN, "rule to-lan1"),
    )


def test_many_ports_take_several_multiport_rules() -> None:
    ports = ", ".join(str(port) for port in range(1000, 1040, 2))  # 20 single ports
    prefilter = derive(
        policy(f"ingress:\n  - {{name: many, proto: tcp, ports: [{ports}], action: accept}}\n")
    )
    chunks = [rule.match.dports for rule in prefilter.rules(4, Hook.FORWARD) if rule.reason == "rule many"]
    assert [len(chunk) for chunk in chunks] == [15, 5]


def test_a_rule_too_large_is_widened_to_a_return() -> None:
    sources = ", ".join(f"198.51.100.{n}" for n in range(1, 80))
    prefilter = derive(
        policy(f"ingress:\n  - {{name: big, proto: tcp, from: [{sources}], ports: 25, action: drop}}\n")
    )
    assert prefilter.rules(4, Hook.FORWARD)[0] == KernelRule(
        KernelMatch(6, dports=((25, 25),)), RETURN, "rule big"
    )


def test_nothing_when_off_invalid_accepted_or_ingress_accepted() -> None:
    assert derive(policy("options: {prefilter: off}\n")) == Prefilter()
    assert derive(policy("defaults: {invalid: accept}\n")) == Prefilter()
    accept_all = derive(policy("defaults: {ingress: accept}\n"))
    assert accept_all.chains and all(rules == () for _, _, rules in accept_all.chains)
    assert accept_all.invalid_tcp_flags == INVALID_TCP_FLAGS and accept_all.active


def test_evaluate_follows_the_rules() -> None:
    prefilter = derive(
        policy("ingress:\n  - {name: web, proto: tcp, to: 10.0.0.80, ports: 443, action: accept}\n")
    )
    syn = Probe(
        4, 6, addr("198.51.100.7"), addr("10.0.0.80"), 40000, 443, SYN, in_iface="wan0", out_iface="lan0"
    )
    assert evaluate(prefilter, syn, Hook.FORWARD, kernel_new=True) is None
    closed = syn._replace(dport=22)
    assert evaluate(prefilter, closed, Hook.FORWARD, kernel_new=True).reason == "default ingress"
    assert evaluate(prefilter, closed, Hook.FORWARD, kernel_new=False) is None  # the kernel knows the flow
    assert evaluate(prefilter, closed._replace(in_iface="lan1"), Hook.FORWARD, True) is None  # egress
    assert evaluate(prefilter, closed._replace(tcp_flags=SYN | ACK), Hook.FORWARD, True) is None
    xmas = closed._replace(tcp_flags=FIN | PSH | URG)
    assert evaluate(prefilter, xmas, Hook.OUTPUT, kernel_new=False).reason == "invalid: tcp flags"


# --- the property: a pre-filtered packet is one nfqfw drops (rejects), whatever its table --------

V4 = ["10.0.0.1", "10.0.0.2", "10.0.0.25", "198.51.100.7", "203.0.113.9"]
V6 = ["fd00::1", "fd00::25", "2001:db8::9"]
NETS = ["10.0.0.0/30", "10.0.0.25", "198.51.100.0/24", "fd00::/126", "2001:db8::9", "gateway", "gateway"]
PORTS = [22, 25, 80, 443, 1005, 40000]
PORT_WORDS = ["22", "25", "80", "443", "20-30", "1000-1010"]
IN_IFACES = ["wan0", "wan1", "wan7", "lan0", "lan1", "dmz0"]
OUT_IFACES = ["lan0", "lan1", "wan0", "dmz0"]
TARGETS = {4: ["10.0.0.25", "10.0.0.2"], 6: ["fd00::1", "fd00::25"]}  # the forwards' `to`


@st.composite
def rule_text(draw: st.DrawFn, index: int) -> str:
    proto = draw(st.sampled_from(["tcp", "udp", "icmp", "icmpv6", "any", "[tcp, udp]", "gre"]))
    fields = [f"name: r{index}", f"action: {draw(st.sampled_from(['accept', 'drop', 'reject']))}"]
    if proto != "any" or draw(st.booleans()):
        fields.append(f"proto: {proto}")
    if proto in ("tcp", "udp", "[tcp, udp]") and draw(st.booleans()):
        fields.append(
            f"ports: [{', '.join(draw(st.lists(st.sampled_from(PORT_WORDS), min_size=1, max_size=3)))}]"
        )
    if proto in ("tcp", "udp") and draw(st.integers(0, 4)) == 0:
        fields.append(f"sports: {draw(st.sampled_from(PORT_WORDS))}")
    if proto == "icmp" and draw(st.booleans()):
        types = draw(st.sampled_from(["echo-request", "echo-reply", "[echo-request, time-exceeded]"]))
        fields.append(f"icmp-types: {types}")
    for key in ("from", "to"):
        if draw(st.booleans()):
            choices = [net for net in NETS if key == "to" or net != "gateway"]
            chosen = draw(st.lists(st.sampled_from(choices), min_size=1, max_size=2, unique=True))
            fields.append(f"{key}: [{', '.join(chosen)}]")
    if draw(st.integers(0, 3)) == 0:
        fields.append(f"in: {draw(st.sampled_from(['wan0', 'wan+', 'dmz0', 'lan0']))}")
    if draw(st.integers(0, 3)) == 0:
        fields.append(f"out: {draw(st.sampled_from(['lan0', 'lan1', 'wan0']))}")
    if draw(st.integers(0, 4)) == 0:
        fields.append(f"family: {draw(st.sampled_from(['ipv4', 'ipv6']))}")
    if draw(st.integers(0, 4)) == 0:
        fields.append(draw(st.sampled_from(["limit: 2/minute", "limit: 1/day, limit-burst: 1"])))
    if draw(st.integers(0, 5)) == 0:
        fields.append("log: true")
    if draw(st.integers(0, 3)) == 0:
        fields.append(f"from-zone: {draw(st.sampled_from(['external', '[external, wan2]', 'wan2']))}")
    if draw(st.integers(0, 3)) == 0:
        fields.append(f"to-zone: {draw(st.sampled_from(['internal', 'dmz', '[dmz, internal]', 'external']))}")
    return "  - {" + ", ".join(fields) + "}\n"


@st.composite
def forward_text(draw: st.DrawFn, index: int) -> str:
    proto = draw(st.sampled_from(["tcp", "udp", "[tcp, udp]"]))
    to = draw(st.sampled_from(TARGETS[4] + TARGETS[6]))
    fields = [f"name: f{index}", f"proto: {proto}", f"to: '{to}'"]
    if draw(st.booleans()):
        fields += [f"ports: {draw(st.sampled_from(PORTS))}", f"to-port: {draw(st.sampled_from(PORTS))}"]
    else:
        fields.append(
            f"ports: [{', '.join(draw(st.lists(st.sampled_from(PORT_WORDS), min_size=1, max_size=2)))}]"
        )
    if draw(st.booleans()):
        fields.append(f"pass: {draw(st.sampled_from(['true', 'false']))}")
    if draw(st.integers(0, 2)) == 0:
        fields.append(f"in: {draw(st.sampled_from(['wan0', 'wan+', 'dmz0']))}")
    if draw(st.integers(0, 2)) == 0:
        fields.append(f"from: {'198.51.100.0/24' if ':' not in to else '2001:db8::9'}")
    return "    - {" + ", ".join(fields) + "}\n"


@st.composite
def policies(draw: st.DrawFn, nat: bool = False) -> str:
    """Random policies; `nat`: always zones with networks and forwards."""
    zones = (
        NAT_ZONES
        if nat
        else draw(
            st.sampled_from(
                [
                    "zones:\n  external: [wan0, wan1]\n  internal: [lan0, lan1]\n",
                    "zones:\n  external: [wan+]\n  internal: [lan+]\n",
                    "zones:\n  external: [wan0]\n  internal: [lan0]\n",  # wan1, wan7, lan1, dmz0 in no zone
                    NAT_ZONES,
                    # wan7 is inside, though wan+ is outside: the kernel cannot tell the zones by -i
                    "zones:\n  external: [wan+]\n  internal: {interfaces: [lan+], networks: "
                    "[10.0.0.0/24, fd00::/64]}\n"
                    "  dmz: {faces: inside, interfaces: [dmz0, wan7]}\n  wan2: {faces: outside, "
                    "interfaces: []}\n",
                ]
            )
        )
    )
    ingress = draw(st.sampled_from(["drop", "drop", "reject", "accept"]))
    invalid = draw(st.sampled_from(["drop", "drop", "drop", "accept"]))
    text = zones + f"defaults: {{ingress: {ingress}, egress: accept, invalid: {invalid}}}\n"
    rules = draw(st.lists(st.integers(0, 1000), max_size=5))
    if rules:
        text += "ingress:\n" + "".join(draw(rule_text(index)) for index in range(len(rules)))
    if draw(st.booleans()):
        text += "egress:\n  - {name: e-drop, proto: tcp, ports: 25, action: drop}\n"
    if nat or ("networks" in zones and draw(st.booleans())):
        count = draw(st.integers(1, 3))
        text += "nat:\n  forward:\n" + "".join(draw(forward_text(index)) for index in range(count))
    return text


NAT_ZONES = (
    "zones:\n  external: [wan0]\n"
    "  internal: {interfaces: [lan0, lan1], networks: [10.0.0.0/24, fd00::/64]}\n"
    "  dmz: {faces: inside, interfaces: [dmz0]}\n  wan2: {faces: outside, interfaces: [wan1, wan7]}\n"
)


@st.composite
def probes(draw: st.DrawFn, translated: bool = False) -> tuple[Probe, Hook, bool]:
    """Random probes; `translated`: always TCP/UDP at FORWARD translated by a forward."""
    family = draw(st.sampled_from([4, 6]))
    pool = V4 if family == 4 else V6
    proto = draw(st.sampled_from([6, 17] if translated else [6, 6, 17, 1 if family == 4 else 58]))
    hooks = [Hook.FORWARD] if translated else [Hook.FORWARD, Hook.FORWARD, Hook.INPUT, Hook.OUTPUT]
    hook = draw(st.sampled_from(hooks))
    # Translated by a forward (the kernel's mark): the probe is the packet after translation, to
    # one of the forwards' targets, from outside.
    forwarded = hook is Hook.FORWARD and proto in (6, 17) and (translated or draw(st.booleans()))
    src, dst = draw(st.sampled_from(pool)), draw(st.sampled_from(pool))
    if forwarded:
        dst = draw(st.sampled_from(TARGETS[family]))
    flags = 0
    icmp_type = -1
    if proto == 6 and translated:
        flags = SYN  # a first packet: the only kind the kernel translates
    elif proto == 6:
        flags = draw(
            st.sampled_from([SYN, SYN, SYN | ACK, ACK, RST, FIN | ACK, SYN | FIN, 0, FIN | PSH | URG])
        )
        flags = draw(st.one_of(st.just(flags), st.integers(0, 63)))
    elif proto in (1, 58):
        icmp_type = draw(st.sampled_from([8, 0, 3] if family == 4 else [128, 129, 1]))
    in_iface = (
        None if hook is Hook.OUTPUT else draw(st.sampled_from(IN_IFACES[:3] if translated else IN_IFACES))
    )
    out_iface = None if hook is Hook.INPUT else draw(st.sampled_from(OUT_IFACES))
    probe = Probe(
        family,
        proto,
        addr(src),
        addr(dst),
        draw(st.sampled_from(PORTS)) if proto in (6, 17) else 0,
        draw(st.sampled_from(PORTS)) if proto in (6, 17) else 0,
        flags,
        icmp_type,
        in_iface,
        out_iface,
    )
    return probe, hook, forwarded


def packet(probe: Probe, seq: int) -> bytes:
    src, dst = probe.src, probe.dst
    if probe.proto == 6:
        seq &= 0xFFFFFFFF
        segment = tcp(src, dst, probe.sport, probe.dport, seq=seq, ack=seq ^ 0x5555, flags=probe.tcp_flags)
        return ipv4(src, dst, 6, segment) if probe.family == 4 else ipv6(src, dst, 6, segment)
    if probe.proto == 17:
        datagram = udp(src, dst, probe.sport, probe.dport, b"x")
        return ipv4(src, dst, 17, datagram) if probe.family == 4 else ipv6(src, dst, 17, datagram)
    if probe.family == 4:
        return ipv4(src, dst, 1, icmp(probe.icmp_type, 0, (7, 1)))
    return ipv6(src, dst, 58, icmpv6(src, dst, probe.icmp_type, 0, struct.pack("!HH", 7, 1)))


def meta(probe: Probe, hook: Hook, forwarded: bool = False) -> Meta:
    return Meta(hook, probe.in_iface, probe.out_iface, forwarded=forwarded)


def flow_key(probe: Probe) -> frozenset[tuple[int, bytes, int]]:
    return frozenset({(probe.proto, probe.src, probe.sport), (probe.proto, probe.dst, probe.dport)})


def load(text: str) -> PolicyConfig:
    try:
        return parse_policy(text)
    except ConfigError:
        assume(False)
        raise


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=policies(),
    earlier=st.one_of(st.none(), policies()),
    history=st.lists(probes(), max_size=25),
    probe=probes(),
    udp=st.booleans(),
    seq=st.integers(0, 2**32 - 1),
)
def test_prefiltered_packets_are_dropped_by_the_engine(
    text: str,
    earlier: str | None,
    history: list[tuple[Probe, Hook, bool]],
    probe: tuple[Probe, Hook, bool],
    udp: bool,
    seq: int,
) -> None:
    check_prefilter(text, earlier, history, probe, udp, seq)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=policies(nat=True),
    history=st.lists(probes(translated=True), max_size=10),
    probe=probes(translated=True),
    udp=st.booleans(),
    seq=st.integers(0, 2**32 - 1),
)
def test_translated_packets_a_forward_admits_are_left_to_nfqfw(
    text: str,
    history: list[tuple[Probe, Hook, bool]],
    probe: tuple[Probe, Hook, bool],
    udp: bool,
    seq: int,
) -> None:
    """The same property where it concerns forwards: policies with forwards, probes translated."""
    check_prefilter(text, None, history, probe, udp, seq)


def check_prefilter(
    text: str,
    earlier: str | None,
    history: list[tuple[Probe, Hook, bool]],
    probe: tuple[Probe, Hook, bool],
    udp: bool,
    seq: int,
) -> None:
    config = load(text)
    engine = Engine(CompiledPolicy(load(earlier) if earlier is not None else config))
    accepted: set[frozenset[tuple[int, bytes, int]]] = set()
    now = 100.0
    for step, (earlier_probe, hook, translated) in enumerate(history):
        if earlier is not None and step == len(history) // 2:
            engine.replace_policy(CompiledPolicy(config))  # a reload with `reload: keep`
        verdict = engine.process(
            packet(earlier_probe, seq + step * 1000), meta(earlier_probe, hook, translated), now
        )
        if verdict.action is Action.ACCEPT:
            accepted.add(flow_key(earlier_probe))
        now += 0.5
    if earlier is not None and len(history) < 2:
        engine.replace_policy(CompiledPolicy(config))
    probe_packet, hook, forwarded = probe
    kernel_new = flow_key(probe_packet) not in accepted
    taken = evaluate(derive(config, udp=udp), probe_packet, hook, kernel_new)
    if taken is None:
        return
    verdict = engine.process(packet(probe_packet, seq + 7), meta(probe_packet, hook, forwarded), now)
    if taken.action == DROP:
        assert verdict.action is Action.DROP, (taken, verdict)
    else:
        assert (verdict.action, verdict.reject_with) == (Action.REJECT, taken.reject_with), (taken, verdict)


@pytest.mark.parametrize("flags", [flags for flags in range(64) if tcp_flags_invalid(flags)])
def test_invalid_flags_are_dropped_even_inside_an_established_flow(flags: int) -> None:
    config = parse_policy(ZONES + "defaults: {ingress: accept}\n")
    engine = Engine(CompiledPolicy(config))
    out, back = Meta(Hook.FORWARD, "lan0", "wan0"), Meta(Hook.FORWARD, "wan0", "lan0")
    lan, wan = addr("10.0.0.5"), addr("198.51.100.7")

    def segment(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int) -> bytes:
        return ipv4(src, dst, 6, tcp(src, dst, sport, dport, seq=seq, ack=ack, flags=flags))

    assert engine.process(segment(lan, wan, 5000, 80, 100, 0, SYN), out, 1.0).action is Action.ACCEPT
    assert engine.process(segment(wan, lan, 80, 5000, 900, 101, SYN | ACK), back, 1.1).action is Action.ACCEPT
    assert engine.process(segment(lan, wan, 5000, 80, 101, 901, ACK), out, 1.2).action is Action.ACCEPT
    probe = Probe(4, 6, wan, lan, 80, 5000, flags, in_iface="wan0", out_iface="lan0")
    assert evaluate(derive(config), probe, Hook.FORWARD, kernel_new=False) is not None
    assert engine.process(segment(wan, lan, 80, 5000, 901, 101, flags), back, 1.3).action is Action.DROP
