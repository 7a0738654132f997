"""nfqfw.core.prefilter with sets: the property of test_prefilter (a packet the kernel rules drop
or reject is one the engine drops or rejects the same way) over policies whose rules and
forwards name sets (test_prefilter's policies: zones beyond two and forwards among them, and so
probes a forward translated), the kernel's ipsets holding what the engine's sets hold (the
policy's networks and runtime entries added after the start)."""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_prefilter import NAT_ZONES, V4, V6, flow_key, load, meta, packet, policies, probes

from nfqfw.core.build import addr
from nfqfw.core.engine import Engine
from nfqfw.core.packet import SYN
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.prefilter import DROP, RETURN, KernelMatch, KernelRule, Probe, derive, evaluate
from nfqfw.core.recheck import change_set
from nfqfw.core.verdict import Action, Hook

SETS = ("s0", "s1")
MEMBERS = [*V4, *V6, "10.0.0.0/30", "198.51.100.0/24", "fd00::/126"]


@st.composite
def policies_with_sets(draw: st.DrawFn, nat: bool = False) -> str:
    """A random policy whose address lists (the rules' and the forwards' `from`) also name sets,
    and the sets' contents."""
    text = draw(policies(nat=nat))
    for key in (", from: [", ", to: ["):
        count = text.count(key)
        for _ in range(count):
            if draw(st.booleans()):
                text = text.replace(key, f'{key.replace("[", "(")}"@{draw(st.sampled_from(SETS))}", ', 1)
        text = text.replace(key.replace("[", "("), key)
    for source in ("198.51.100.0/24", "2001:db8::9"):  # a forward's `from` (test_prefilter's)
        key, seen = f", from: {source}}}", f", from:  {source}}}"  # `seen`: one left as it was
        for _ in range(text.count(key)):
            named = f", from: ['@{draw(st.sampled_from(SETS))}', {source}]}}"
            text = text.replace(key, named if draw(st.booleans()) else seen, 1)
        text = text.replace(seen, key)
    lines = ["sets:"]
    for name in SETS:
        members = draw(st.lists(st.sampled_from(MEMBERS), max_size=4, unique=True))
        lines.append(f"  {name}: [{', '.join(members)}]")
    return text + "\n".join(lines) + "\n"


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=policies_with_sets(),
    runtime=st.lists(st.tuples(st.sampled_from(SETS), st.sampled_from(MEMBERS)), max_size=3),
    history=st.lists(probes(), max_size=20),
    probe=probes(),
    seq=st.integers(0, 2**32 - 1),
)
def test_prefiltered_packets_on_sets_are_dropped_by_the_engine(
    text: str,
    runtime: list[tuple[str, str]],
    history: list[tuple[Probe, Hook, bool]],
    probe: tuple[Probe, Hook, bool],
    seq: int,
) -> None:
    check_with_sets(text, runtime, history, probe, seq)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=policies_with_sets(nat=True),
    runtime=st.lists(st.tuples(st.sampled_from(SETS), st.sampled_from(MEMBERS)), max_size=3),
    history=st.lists(probes(translated=True), max_size=10),
    probe=probes(translated=True),
    seq=st.integers(0, 2**32 - 1),
)
def test_translated_packets_a_forward_on_a_set_admits_are_left_to_nfqfw(
    text: str,
    runtime: list[tuple[str, str]],
    history: list[tuple[Probe, Hook, bool]],
    probe: tuple[Probe, Hook, bool],
    seq: int,
) -> None:
    """The same where it concerns forwards whose `from` names sets: the kernel translated a
    member's packet (its nat rule matched the set), the pre-filter must leave it to nfqfw."""
    check_with_sets(text, runtime, history, probe, seq)


def check_with_sets(
    text: str,
    runtime: list[tuple[str, str]],
    history: list[tuple[Probe, Hook, bool]],
    probe: tuple[Probe, Hook, bool],
    seq: int,
) -> None:
    config = load(text)
    engine = Engine(CompiledPolicy(config))
    accepted = set()
    now = 100.0
    for step, (earlier, hook, translated) in enumerate(history):
        if step == len(history) // 2:
            for name, member in runtime:  # `nfqfw set add`, the kernel's ipset told the same
                change_set(engine, name, ipaddress.ip_network(member), add=True, cut=False)
        verdict = engine.process(packet(earlier, seq + step * 1000), meta(earlier, hook, translated), now)
        if verdict.action is Action.ACCEPT:
            accepted.add(flow_key(earlier))
        now += 0.5
    if len(history) < 2:
        for name, member in runtime:
            change_set(engine, name, ipaddress.ip_network(member), add=True, cut=False)
    sets = engine.policy.sets

    def member(name: str, raw: bytes) -> bool:
        return sets[name].contains(raw)

    probe_packet, hook, forwarded = probe
    kernel_new = flow_key(probe_packet) not in accepted
    taken = evaluate(derive(config, kernel_sets=True), probe_packet, hook, kernel_new, member)
    if taken is None:
        return
    verdict = engine.process(packet(probe_packet, seq + 7), meta(probe_packet, hook, forwarded), now)
    if taken.action == DROP:
        assert verdict.action is Action.DROP, (taken, verdict)
    else:
        assert (verdict.action, verdict.reject_with) == (Action.REJECT, taken.reject_with), (taken, verdict)


def test_a_forward_on_a_set_returns_over_any_source() -> None:
    """The kernel translated a member of the forward's set (its nat rule matches the set's ipset):
    the pre-filter leaves every source of the translated packets to nfqfw, not only `from`'s
    networks, so a member is never dropped by the default before the forward admits it."""
    config = load(
        NAT_ZONES + "defaults: {ingress: drop}\nsets:\n  s0: [203.0.113.9]\nnat:\n  forward:\n"
        "    - {name: f0, proto: tcp, in: wan0, to: '10.0.0.25', ports: 80, from: ['@s0', 198.51.100.0/24]}\n"
    )
    prefilter = derive(config, kernel_sets=True)
    assert prefilter.rules(4, Hook.FORWARD)[0] == KernelRule(
        KernelMatch(6, None, "10.0.0.25/32", ((80, 80),), None, "wan0"), RETURN, "forward f0"
    )
    assert prefilter.sets(4) == []  # the forward's set is the nat table's, not the pre-filter's
    engine = Engine(CompiledPolicy(config))
    member = Probe(4, 6, addr("203.0.113.9"), addr("10.0.0.25"), 40000, 80, SYN, -1, "wan0", "lan0")
    assert evaluate(prefilter, member, Hook.FORWARD, True, lambda name, raw: False) is None
    verdict = engine.process(packet(member, 1), meta(member, Hook.FORWARD, True), 100.0)
    assert (verdict.action, verdict.reason) == (Action.ACCEPT, "forward f0")
