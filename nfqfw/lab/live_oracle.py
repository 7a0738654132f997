"""nfqfw judged live: the kernel oracle's gateway with `nfqfw run` filtering it instead of rules.

The same lab, packets and outcomes as nfqfw.lab.kernel_oracle (see there), but the gateway's
FORWARD chain is only the sentinel's rule (inserted before nfqfw's jump once nfqfw runs) and a
final ACCEPT, and `nfqfw run` (single daemon, `--workers`, offload: whatever `args` and the
policy say) decides, its kernel rules in place as on a real gateway: the pre-filter, the caps,
the owners' RELATED rules, the offload bypass. So what is compared is what a gateway running
nfqfw does with each packet, kernel shortcuts included.

A packet may wait in a queue after the sentinel came out (the kernel queued it in order, but
the verdict is nfqfw's to give, on another CPU). So `judge` then waits until nfqfw's queues
are empty (/proc/PID/net/netfilter/nfnetlink_queue of the daemon, which is in the gateway's
namespace) and reads nfqfw's verdict counters: if it accepted something, the packets are
awaited on the far side; if it rejected, the answer on the sender's side (each bounded by
SETTLE_WAIT). A packet nfqfw never saw was decided by the kernel before the sentinel. The Judgement's
`rule` says what nfqfw counted for the packet ("nfqfw: accept established x1", "nfqfw:
nothing" when the kernel decided alone).
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from nfqfw.lab import daemon_ctl
from nfqfw.lab.kernel_oracle import (
    SENTINEL_RULE,
    SENTINEL_WAIT,
    Judgement,
    KernelOracle,
    _Port,
    answers,
    build_kernel_gateway,
    identity,
)
from nfqfw.lab.plan import LabError, Topology
from nfqfw.lab.topology import run_in

DEFAULT_PREFIX = "nfql-"
SETTLE_WAIT = 3.0  # seconds for an accepted packet to come out, a rejected one's answer to come back
QUEUE_WAIT = 10.0  # seconds for nfqfw to answer what it was queued
IGNORED = ("untracked",)
Ask = Callable[[dict[str, Any]], Any]  # verdict reasons of the gateway's own neighbour discovery: not judged


class LiveOracle(KernelOracle):
    """Judges packets on a gateway where `nfqfw run` decides (see the module docstring)."""

    def __init__(
        self, topology: Topology, wan_v4: str, lan_v4: str, pid: int, ask: Ask, policy: Path
    ) -> None:
        super().__init__(topology, ["-j ACCEPT"], ["-j ACCEPT"], wan_v4, lan_v4)
        self.pid = pid
        self.ask = ask  # a control request to the daemon -> its result
        self.policy = policy

    def reload(self, source: Path) -> None:
        """Make `source`'s text nfqfw's policy (its --config file) and reload it."""
        if source != self.policy:
            self.policy.write_text(source.read_text())
        answer = self.ask({"cmd": "reload"})
        if not answer["ok"]:
            raise LabError(f"nfqfw refused the policy {source}: {answer['errors']}")

    def _rule_hit(self, family: int) -> str:
        return "nfqfw"  # (judge says what nfqfw decided instead)

    def verdicts(self) -> Counter[str]:
        """nfqfw's verdict counters ("action reason" -> packets), summed over workers."""
        counts = self.ask({"cmd": "status"})["verdicts"]
        return Counter(
            {key: value for key, value in counts.items() if not key.split(" ", 1)[1].startswith(IGNORED)}
        )

    def queued(self) -> int:
        """Packets waiting in the gateway's queues (the third field of each queue's line)."""
        with open(f"/proc/{self.pid}/net/netfilter/nfnetlink_queue") as proc:
            return sum(int(line.split()[2]) for line in proc if line.strip())

    def judge(self, side: str, packets: Sequence[bytes]) -> Judgement:
        far_side = "lan" if side == "wan" else "wan"
        sender, far = self._ports[side], self._ports[far_side]
        sender.incoming()
        far.incoming()
        before = self.verdicts()
        sentinel = self._sentinel(side, far_side)
        for ip in packets:
            sender.send(ip)
        sender.send(sentinel)
        wanted = {identity(ip) for ip in packets}
        came_out = self._came_out(far, wanted, identity(sentinel))
        self._record_arrivals(packets)
        self._wait_for_queues()
        decided = self.verdicts() - before
        replies = sender.incoming()
        if any(key.startswith("accept ") for key in decided) and came_out != wanted:
            came_out |= self._await(far, lambda ip: identity(ip) in wanted, len(wanted - came_out))
        refused = any(answers(reply, ip) for reply in replies for ip in packets)
        if not refused and any(key.startswith("reject ") for key in decided):
            refused = bool(self._await(sender, lambda reply: any(answers(reply, ip) for ip in packets), 1))
        said = "nfqfw: " + (
            ", ".join(f"{key} x{count}" for key, count in sorted(decided.items())) or "nothing"
        )
        if came_out == wanted:
            return Judgement("accept", said)
        if came_out:
            return Judgement("partial", said)
        return Judgement("reject" if refused else "drop", said)

    def _came_out(self, far: _Port, wanted: set[bytes], sentinel: bytes) -> set[bytes]:
        """As the kernel oracle's, but a packet read after the sentinel in the same batch counts
        too: here a packet nfqfw accepted comes out after the sentinel."""
        seen: set[bytes] = set()
        deadline = time.monotonic() + SENTINEL_WAIT
        while True:
            got = {identity(ip) for ip in far.incoming()}
            seen |= got & wanted
            if sentinel in got:
                return seen
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"the sentinel did not come out on {far.host.ns} within {SENTINEL_WAIT:g} s")
            select.select([far.sock], [], [], left)

    def _wait_for_queues(self) -> None:
        deadline = time.monotonic() + QUEUE_WAIT
        while self.queued():
            if time.monotonic() > deadline:
                raise LabError(f"nfqfw left packets in its queues for {QUEUE_WAIT:g} s")
            time.sleep(0.001)

    def _await(self, port: _Port, wanted: Callable[[bytes], bool], count: int) -> set[bytes]:
        """Up to `count` packets on `port` for which wanted(ip) is true, within SETTLE_WAIT."""
        found: set[bytes] = set()
        deadline = time.monotonic() + SETTLE_WAIT
        while len(found) < count:
            for ip in port.incoming():
                if wanted(ip):
                    found.add(identity(ip))
            left = deadline - time.monotonic()
            if left <= 0 or len(found) >= count:
                break
            select.select([port.sock], [], [], left)
        return found


@contextlib.contextmanager
def nfqfw_gateway(
    policy: str | os.PathLike[str],
    neighbours: dict[str, Sequence[str]],
    wan_v4: str,
    lan_v4: str,
    ask: Callable[[str, dict[str, Any]], Any],
    args: Sequence[str] = (),
    prefix: str = DEFAULT_PREFIX,
    sysctls: Sequence[str] = (),
) -> Iterator[LiveOracle]:
    """The oracle's gateway with `nfqfw run --config POLICY ARGS` in it; yields its LiveOracle,
    always stops nfqfw and tears everything down. `ask(runtime_dir, request)` sends a control
    request (nfqfw.control.client.call: the lab does not talk to the daemon itself)."""
    daemon_ctl.down(prefix)  # a lab left over from an interrupted run
    topology = build_kernel_gateway(prefix, ["-j ACCEPT"], ["-j ACCEPT"], neighbours)
    try:
        if sysctls:
            run_in(topology.gw, "sysctl", "-q", "-w", *sysctls)
        daemon = daemon_ctl.start_daemon(prefix, policy, args=args)
        # The sentinel passes before nfqfw's jump: it is the kernel's, not a packet to judge.
        run_in(topology.gw, "iptables", "-w", "-I", "FORWARD", "1", *SENTINEL_RULE.split())
        state = daemon_ctl.LabState(prefix)
        to_daemon = partial(ask, str(state.runtime_dir))
        with LiveOracle(topology, wan_v4, lan_v4, daemon.pid, to_daemon, Path(policy)) as oracle:
            yield oracle
    finally:
        daemon_ctl.down(prefix)
