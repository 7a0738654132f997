"""The lab for the integration tests: namespaces nfqt-wan / nfqt-gw / nfqt-lan, one per module.

A test module sets `LAB_POLICY` to the policy text nfqfw runs with, or None for the namespaces
alone; `lab_policy` is the file written from it; `LAB_DMZ = True` adds the DMZ host (nfqt-dmz on
the gateway's dmz0). The module-scoped `lab` fixture builds the lab, starts the servers below and
always takes everything down again. Parametrised indirectly, its parameter is more `nfqfw run`
arguments (e.g. `--queue-balance 0:1 --workers`): pytest groups the module's tests by parameter,
so each parameter brings one lab up for all of them.

Servers: outside host TCP 80, 445, 8080 (greet and echo), 9000 (sha256 sink), 9001 (byte
source), UDP 53, 137 (echo); inside host TCP 22, 25, 80 (greet and echo), 587 (sha256 sink);
DMZ host TCP 22, 80 (greet and echo).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from nfqfw.lab import traffic
from nfqfw.lab.daemon_ctl import Lab, down, up

PREFIX = "nfqt-"

WAN_TCP, WAN_SINK, WAN_SOURCE, WAN_UDP = (80, 445, 8080), 9000, 9001, (53, 137)
LAN_TCP, LAN_SINK = (22, 25, 80), 587
DMZ_TCP = (22, 80)


@pytest.fixture(scope="module")
def lab_policy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The policy file the module's daemon runs with, written from LAB_POLICY (None: no daemon)."""
    text = getattr(request.module, "LAB_POLICY", None)
    if text is None:
        return None
    policy = tmp_path_factory.mktemp("lab") / "policy.yaml"
    policy.write_text(text)
    policy.chmod(0o600)  # the daemon refuses a group/world-writable policy
    return policy


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest, lab_policy: Path | None) -> Iterator[Lab]:
    dmz = getattr(request.module, "LAB_DMZ", False)
    args: tuple[str, ...] = getattr(request, "param", ())
    with ExitStack() as stack:
        stack.callback(down, PREFIX)  # also when up() or a server fails
        the_lab = up(PREFIX, lab_policy, dmz=dmz, args=args)
        t = the_lab.topology
        if dmz:
            stack.enter_context(traffic.TcpServer(t.dmz, DMZ_TCP))
        stack.enter_context(traffic.TcpServer(t.wan, WAN_TCP))
        stack.enter_context(traffic.TcpServer(t.wan, [WAN_SINK], traffic.hash_sink))
        stack.enter_context(traffic.TcpServer(t.wan, [WAN_SOURCE], traffic.pattern_source))
        stack.enter_context(traffic.UdpEchoServer(t.wan, WAN_UDP))
        stack.enter_context(traffic.TcpServer(t.lan, LAN_TCP))
        stack.enter_context(traffic.TcpServer(t.lan, [LAN_SINK], traffic.hash_sink))
        yield the_lab
