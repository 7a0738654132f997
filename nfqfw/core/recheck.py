"""Re-judge the tracked flows against a new policy (live reload, policy option `reload: recheck`).

Each flow is judged by its first packet, rebuilt from the flow key (`conntrack.first_packet`) and
the Meta the adapter gave that packet: the first packet is what the policy
decided on when the flow was created, so "would the new policy still let this flow start?" is
the question asked. Rate limits are ignored: a limit caps how fast flows start, not which ones
may exist. A flow a forward translated (Meta.forwarded) is still admitted by that forward while
the new policy has it (with pass); once the forward is gone the rules decide.
"""

from __future__ import annotations

from collections.abc import Iterable

from nfqfw.core.conntrack import Flow, first_packet
from nfqfw.core.engine import Engine
from nfqfw.core.policy import CompiledPolicy, RuleDecision
from nfqfw.core.sets import Network, network_range
from nfqfw.core.verdict import Action, Meta


def still_allowed(engine: Engine, flow: Flow, policy: CompiledPolicy | None = None) -> bool:
    """Would the engine's (new) policy -- or `policy` -- accept this flow's first packet?  Flows
    whose first packet is unknown (no Meta recorded) are kept: there is nothing to judge them on."""
    decision = standing_decision(engine, flow, policy)
    return decision is None or decision.action is Action.ACCEPT


def standing_decision(
    engine: Engine, flow: Flow, policy: CompiledPolicy | None = None
) -> RuleDecision | None:
    """What `policy` (the engine's by default) decides on the flow's first packet; None when it
    cannot be judged (no Meta, a malformed key)."""
    meta = flow.meta
    if not isinstance(meta, Meta):
        return None
    pkt = first_packet(flow)
    if pkt is None:
        return None
    current = engine.policy
    if policy is not None:
        engine.policy = policy  # the engine's judgement (zones, sides, forwards) with the policy asked about
    try:
        return engine.standing_decision(pkt, meta)
    finally:
        engine.policy = current


def stale_flows(engine: Engine, flows: Iterable[Flow], policy: CompiledPolicy | None = None) -> list[Flow]:
    """The flows the engine's current policy (or `policy`) would no longer allow."""
    return [flow for flow in flows if not still_allowed(engine, flow, policy)]


def flows_of(engine: Engine, network: Network) -> list[Flow]:
    """The tracked flows with an address (source or destination of the first packet) in `network`."""
    first, last = network_range(network)
    width = 4 if network.version == 4 else 16
    found = []
    for flow in engine.conntrack:
        pkt = first_packet(flow)
        if pkt is None:
            continue
        for raw in (pkt.src, pkt.dst):
            if len(raw) == width and first <= int.from_bytes(raw, "big") <= last:
                found.append(flow)
                break
    return found


def change_set(
    engine: Engine, name: str, network: Network, *, add: bool, expires: float | None = None, cut: bool = True
) -> tuple[bool, list[Flow]]:
    """`nfqfw set add|del`: the runtime entry added (or its expiry replaced) or removed, and with
    `cut` (policy option reload: recheck) the flows of its addresses the policy no longer
    allows removed. Returns (whether the set changed, the flows removed)."""
    entries = engine.runtime_sets.entries(name)
    changed = entries.add(network, expires) if add else entries.remove(network)
    engine.policy.refresh_runtime()
    if not cut:
        return changed, []
    stale = stale_flows(engine, flows_of(engine, network))
    for flow in stale:
        engine.conntrack.remove(flow)
    return changed, stale


def expire_sets(engine: Engine, now: float, cut: bool = True) -> list[tuple[str, Network]]:
    """Runtime entries whose time ran out removed (with `cut`, as `change_set` does for a delete)."""
    gone = engine.runtime_sets.expire(now)
    if gone:
        engine.policy.refresh_runtime()
        if cut:
            for _, network in gone:
                for flow in stale_flows(engine, flows_of(engine, network)):
                    engine.conntrack.remove(flow)
    return gone


def recheck(engine: Engine) -> list[Flow]:
    """Remove the flows the engine's current policy no longer allows; returns them."""
    stale = stale_flows(engine, engine.conntrack)
    for flow in stale:
        engine.conntrack.remove(flow)
    return stale
