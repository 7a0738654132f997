"""What a daemon answers on its control socket: status, flows, flush, metrics, panic, reload.

`Requests` turns a request of nfqfw.control.protocol into answer chunks, reading the daemon's
engine and adapter; `answer_panic`, `answer_reload`, `command_of` and `filter_of` are shared
with the supervisor, which answers the same commands for its workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from nfqfw import __version__
from nfqfw.control.flowlist import FilterError, FlowFilter, census, flow_record, select_flows
from nfqfw.control.protocol import COMMANDS, FLOWS_PER_CHUNK, Chunks, RequestError, ok
from nfqfw.kernel.queue_info import read_queue_stats

log = logging.getLogger(__name__)


class RulesOwner(Protocol):
    """Who answers panic and reload requests: the daemon, or the supervisor of its workers."""

    spec: Any
    last_reload: Any  # a dataclass, or None

    def reload(self, trigger: str = ...) -> bool: ...
    def set_panic(self, on: bool) -> bool: ...


class DaemonLike(RulesOwner, Protocol):
    """What the requests need of nfqfw.service.daemon.Daemon."""

    options: Any  # .config: the policy file
    engine: Any
    adapter: Any
    fail_open: bool
    started: float  # wall clock
    started_mono: float  # daemon clock
    clock: Callable[[], float]

    def metric_records(self) -> list[Any] | None: ...


class Requests:
    """The request handler of the daemon's ControlServer: {"cmd": ...} -> answer chunks."""

    def __init__(self, daemon: DaemonLike) -> None:
        self.daemon = daemon

    def __call__(self, request: dict[str, Any]) -> Chunks:
        return getattr(self, f"_{command_of(request)}")(request)

    def _status(self, request: dict[str, Any]) -> Chunks:
        return iter([ok(self.status())])

    def _flows(self, request: dict[str, Any]) -> Chunks:
        conntrack, now = self._conntrack_now()
        flows = select_flows(conntrack, filter_of(request), now)
        return _stream_flows(flows, conntrack, len(conntrack), conntrack.max_flows, self.daemon.clock)

    def _flush(self, request: dict[str, Any]) -> Chunks:
        conntrack, now = self._conntrack_now()
        flows = select_flows(conntrack, filter_of(request), now)
        for flow in flows:
            conntrack.remove(flow)
        if flows:
            log.info("control: flushed %d flows (%s)", len(flows), _describe(request))
        return iter([ok({"removed": len(flows), "tracked": len(conntrack)})])

    def _metrics(self, request: dict[str, Any]) -> Chunks:
        records = self.daemon.metric_records()
        if records is None:
            raise RequestError("metrics: not collected (a worker of nfqfw run --workers --metrics answers)")
        return iter([ok({"families": records})])

    def _panic(self, request: dict[str, Any]) -> Chunks:
        return iter([ok(answer_panic(request, self.daemon))])

    def _reload(self, request: dict[str, Any]) -> Chunks:
        return iter([ok(answer_reload(self.daemon))])

    def _conntrack_now(self) -> tuple[Any, float]:
        now = self.daemon.clock()
        conntrack = self.daemon.engine.conntrack
        conntrack.expire(now)  # what has timed out is gone, as the kernel's GC would have it
        return conntrack, now

    def status(self) -> dict[str, Any]:
        daemon = self.daemon
        conntrack, now = self._conntrack_now()
        spec, config = daemon.spec, daemon.engine.policy.config
        reload = daemon.last_reload
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started": daemon.started,
            "uptime": now - daemon.started_mono,
            "policy": {
                "file": daemon.options.config,
                "sha256": config.sha256,
                "file_sha256": file_sha256(daemon.options.config),
            },
            "last_reload": None if reload is None else asdict(reload),
            "queue": str(spec.first) if spec.first == spec.last else f"{spec.first}:{spec.last}",
            "failure_mode": "open" if daemon.fail_open else "closed",
            "panic": bool(spec.panic),
            "gso": bool(daemon.adapter.gso) and all(daemon.adapter.gso.values()),  # queued whole
            "flows": {
                "total": len(conntrack),
                "max": conntrack.max_flows,
                "by_proto": census(conntrack, now),
                "expired": conntrack.expired,
                "early_drops": conntrack.early_drops,
            },
            "verdicts": dict(daemon.engine.counters),
            "adapter": dict(daemon.adapter.counters),
            "kernel_queues": kernel_queues(spec.bound_queues),
        }


def command_of(request: dict[str, Any]) -> str:
    """The request's command; RequestError unless it is one of COMMANDS."""
    command = request.get("cmd")
    if command not in COMMANDS:
        raise RequestError(f"unknown command {command!r}: expected one of {', '.join(COMMANDS)}")
    return str(command)


def answer_panic(request: dict[str, Any], owner: RulesOwner) -> dict[str, Any]:
    on = request.get("on")
    if not isinstance(on, bool):
        raise RequestError('panic: "on" must be true or false')
    was = bool(owner.spec.panic)
    if not owner.set_panic(on):
        raise RequestError("panic mode not changed: installing the kernel rules failed (see the log)")
    return {"panic": on, "changed": was != on}


def answer_reload(owner: RulesOwner) -> dict[str, Any]:
    owner.reload("control request")
    return asdict(owner.last_reload)


def filter_of(request: dict[str, Any]) -> FlowFilter:
    """The request's flow filter (proto, state, addr); RequestError when it is not valid."""
    try:
        return FlowFilter.parse(request.get("proto"), request.get("state"), request.get("addr"))
    except FilterError as err:
        raise RequestError(str(err)) from None


def _describe(request: dict[str, Any]) -> str:
    chosen = [f"{key} {request[key]}" for key in ("proto", "state", "addr") if request.get(key)]
    return ", ".join(chosen) or "all"


def _stream_flows(
    flows: list[Any], conntrack: Any, tracked: int, max_flows: int, clock: Callable[[], float]
) -> Chunks:
    """{"ok":true,"result":{"tracked":N,"max_flows":M,"flows":[...]}} a chunk of flows at a time;
    a flow removed while the answer is written is left out."""
    head = json.dumps({"tracked": tracked, "max_flows": max_flows}, separators=(",", ":"))
    yield b'{"ok":true,"result":' + head[:-1].encode() + b',"flows":['
    first = True
    for start in range(0, len(flows), FLOWS_PER_CHUNK):
        now = clock()
        records = []
        for flow in flows[start : start + FLOWS_PER_CHUNK]:
            if conntrack.get(flow.key) is flow:
                records.append(json.dumps(flow_record(flow, now), separators=(",", ":")))
        if records:
            yield (b"" if first else b",") + ",".join(records).encode()
            first = False
    yield b"]}}\n"


def file_sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def kernel_queues(queues: Iterable[int]) -> list[dict[str, int]]:
    """The kernel's counters for our queues (/proc/net/netfilter/nfnetlink_queue)."""
    stats = read_queue_stats() or {}
    return [
        {
            "queue": number,
            "waiting": stats[number].total,
            "queue_dropped": stats[number].queue_dropped,
            "user_dropped": stats[number].user_dropped,
        }
        for number in queues
        if number in stats
    ]
