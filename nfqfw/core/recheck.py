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
from nfqfw.core.verdict import Action, Meta


def still_allowed(engine: Engine, flow: Flow) -> bool:
    """Would the engine's (new) policy accept this flow's first packet?  Flows whose first
    packet is unknown (no Meta recorded) are kept: there is nothing to judge them on."""
    meta = flow.meta
    if not isinstance(meta, Meta):
        return True
    pkt = first_packet(flow)
    if pkt is None:
        return True
    return engine.standing_decision(pkt, meta).action is Action.ACCEPT


def stale_flows(engine: Engine, flows: Iterable[Flow]) -> list[Flow]:
    """The flows the engine's current policy would no longer allow."""
    return [flow for flow in flows if not still_allowed(engine, flow)]


def recheck(engine: Engine) -> list[Flow]:
    """Remove the flows the engine's current policy no longer allows; returns them."""
    stale = stale_flows(engine, engine.conntrack)
    for flow in stale:
        engine.conntrack.remove(flow)
    return stale
