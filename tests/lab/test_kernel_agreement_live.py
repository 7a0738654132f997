"""The kernel-agreement scenarios through a live `nfqfw run`, as a gateway runs it.

test_kernel_agreement.py compares `nfqfw replay` with the kernel; here the same packets go,
one at a time, through a gateway where nfqfw itself decides with its kernel rules in place
(nfqfw.lab.live_oracle): with `--workers` over two and three queues, where the kernel's hash
sends an ICMP error to the queue of its own addresses, not its flow's (the RELATED rules of the
owner field must bring it to the worker that holds the flow), and with `offload: established`,
where the kernel's conntrack carries the connections nfqfw handed over. Each packet must get
the verdict the scenario expects of nfqfw: the kernel's, but where a documented difference of
nfqfw holds live too (checksums). The differences of the replay alone do not hold: live, the
kernel reassembles fragments before nfqfw sees them and answers a packet without hops left
itself, as on the kernel's gateway.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_kernel_agreement import NARROW_MTU, NEIGHBOURS, OUT_OF_ORDER_FRAGMENTS, PHASES, V4, V6, Step

from nfqfw.control.client import call
from nfqfw.lab.kernel_oracle import Judgement
from nfqfw.lab.live_oracle import nfqfw_gateway

pytestmark = pytest.mark.lab

REPLAY_ONLY = (OUT_OF_ORDER_FRAGMENTS,)  # differences of `nfqfw replay`, not of a live nfqfw
MODES = {
    "workers-0:1": ((), ("--queue-balance", "0:1", "--workers")),
    "workers-0:2": ((), ("--queue-balance", "0:2", "--workers")),
    "offload": (("offload: established",), ()),
}


def ask(runtime_dir: str, request: dict[str, Any]) -> Any:
    return call(runtime_dir, request, timeout=30)


# With offload the kernel's conntrack carries a connection once its handshake is done: a segment
# it refuses comes back to nfqfw marked INVALID, and nfqfw, which no longer tracks the
# connection, takes the kernel's word (nfqfw.core.engine). So nfqfw's own difference (it checks
# no checksums) gives way to the kernel's verdict there.
OFFLOADED_CHECKSUM = "data with a wrong TCP checksum"


def live_expectation(step: Step, mode: str) -> str:
    if step.nfqfw is None or step.why in REPLAY_ONLY:
        return step.expect
    if mode == "offload" and step.what == OFFLOADED_CHECKSUM:
        return step.expect
    return step.nfqfw[0]


def policy_text(base: str, options: tuple[str, ...]) -> str:
    """The phase's policy with more `options:` entries (one options mapping, merged)."""
    if not options:
        return base
    extra = ", ".join(options)
    if "options: {" in base:
        return base.replace("options: {", f"options: {{{extra}, ", 1)
    return base + f"options: {{{extra}}}\n"


def judge_all(tmp: Path, mode: str) -> Iterator[tuple[str, Step, Judgement]]:
    """(scenario, step, judgement) for every step of every phase, in one gateway running nfqfw."""
    options, args = MODES[mode]
    policies = []
    for phase in PHASES:
        path = tmp / f"{phase.name}.yaml"
        path.write_text(policy_text(phase.policy, options))
        path.chmod(0o600)
        policies.append(path)
    with nfqfw_gateway(policies[0], NEIGHBOURS, V4.wan, V4.lan, ask, args=args) as oracle:
        for f in (V4, V6):
            oracle.limit_route_mtu(f.narrow, "wan0", NARROW_MTU)
        for phase, policy in zip(PHASES, policies, strict=True):
            oracle.sysctl(phase.sysctl)
            oracle.reload(policy)
            for script in phase.scripts:
                for step in script.steps:
                    yield script.name, step, oracle.judge(step.side, step.packets)


@pytest.mark.parametrize("mode", list(MODES))
def test_live_nfqfw_agrees_with_the_kernel(tmp_path: Path, mode: str) -> None:
    rows = list(judge_all(tmp_path, mode))
    wrong = [
        f"{name}: {step.what} ({step.side}): expected {live_expectation(step, mode)}, "
        f"got {got.outcome} ({got.rule})"
        for name, step, got in rows
        if got.outcome != live_expectation(step, mode)
    ]
    assert not wrong, "\n".join(wrong)
    assert len(rows) == sum(len(script.steps) for phase in PHASES for script in phase.scripts)
    assert mode != "offload" or OFFLOADED_CHECKSUM in {step.what for _, step, _ in rows}
