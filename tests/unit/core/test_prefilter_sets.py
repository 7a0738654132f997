"""nfqfw.core.prefilter with sets: the property of test_prefilter (a packet the kernel rules drop
or reject is one the engine drops or rejects the same way) over policies whose rules name sets
(test_prefilter's policies: zones beyond two and forwards among them, and so probes a forward
translated), the kernel's ipsets holding what the engine's sets hold (the policy's networks and
runtime entries added after the start)."""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_prefilter import V4, V6, flow_key, load, meta, packet, policies, probes

from nfqfw.core.engine import Engine
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.prefilter import DROP, Probe, derive, evaluate
from nfqfw.core.recheck import change_set
from nfqfw.core.verdict import Action, Hook

SETS = ("s0", "s1")
MEMBERS = [*V4, *V6, "10.0.0.0/30", "198.51.100.0/24", "fd00::/126"]


@st.composite
def policies_with_sets(draw: st.DrawFn) -> str:
    """A random policy whose address lists also name sets, and the sets' contents."""
    text = draw(policies())
    for key in (", from: [", ", to: ["):
        count = text.count(key)
        for _ in range(count):
            if draw(st.booleans()):
                text = text.replace(key, f'{key.replace("[", "(")}"@{draw(st.sampled_from(SETS))}", ', 1)
        text = text.replace(key.replace("[", "("), key)
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
