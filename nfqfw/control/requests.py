"""What a service answers on its control socket: status, flows, flush, metrics, panic, reload,
confirm (a reload on trial), set (runtime entries of the policy's sets) and ha (the gateway's
role in an HA pair, told by keepalived's notify script).

`Requests` is the one request handler of every service's ControlServer (the single daemon, a
worker, the supervisor of workers: nfqfw.service.core.ServiceCore). It checks the command and
its arguments once and asks the service; each answer is built in one place. The answers a
daemon computes from its own engine (its status counts, flow list, flush) are the functions
below `Requests`; a supervisor answers the same questions by asking its workers and merging
their answers (nfqfw.service.supervision).

To add a command: name it in nfqfw.control.protocol.COMMANDS, add a `_<command>` method to
`Requests`, and give the service what that asks for: on ServiceCore when every process answers
alike, else on Daemon (from its engine) and Supervisor (fanned out to the workers, merged).
The client side is nfqfw.commands and nfqfw.control.format.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from nfqfw.control.flowlist import FilterError, FlowFilter, census, flow_record, select_flows, talkers
from nfqfw.control.protocol import COMMANDS, FLOWS_PER_CHUNK, Chunks, RequestError, ok
from nfqfw.kernel.queue_info import read_queue_stats, verdict_counts

log = logging.getLogger(__name__)

MAX_TALKERS = 100  # `status` with "talkers": N lists at most this many addresses
MAX_CONFIRM = 86400  # seconds a reload on trial may wait for `nfqfw confirm`
SET_OPS = ("add", "del", "list")
HA_ROLES = ("master", "backup", "fault")  # keepalived's states of a VRRP sync group


class Service(Protocol):
    """What the requests need of a service (nfqfw.service.core.ServiceCore)."""

    spec: Any  # .panic: the panic mode the kernel rules have
    last_reload: Any  # a dataclass, or None

    def request_refusal(self) -> str | None: ...
    def status(self, talkers: int | None = None) -> dict[str, Any]: ...
    def flows(self, request: dict[str, Any], selection: FlowFilter) -> Chunks: ...
    def flush(self, request: dict[str, Any], selection: FlowFilter) -> dict[str, Any]: ...
    def metric_records(self) -> list[Any]: ...
    def set_panic(self, on: bool) -> bool: ...
    def reload(self, trigger: str = ..., confirm: float | None = ...) -> bool: ...
    def reload_preview(self, candidate: bool = ...) -> dict[str, Any]: ...
    def confirm(self, rollback: bool = ...) -> dict[str, Any]: ...
    def set_request(self, op: str, name: str, addr: str | None, timeout: float | None) -> dict[str, Any]: ...
    def load_sets_again(self) -> int: ...
    def set_ha_role(self, role: str, conntrackd: str | None = ...) -> dict[str, Any]: ...


class Requests:
    """The request handler of a service's ControlServer: {"cmd": ...} -> answer chunks."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def __call__(self, request: dict[str, Any]) -> Chunks:
        command = command_of(request)
        refusal = self.service.request_refusal()
        if refusal is not None:
            raise RequestError(refusal)
        return getattr(self, f"_{command}")(request)  # type: ignore[no-any-return]

    def _status(self, request: dict[str, Any]) -> Chunks:
        wanted = request.get("talkers")  # nfqfw top: the addresses in the most flows
        if wanted is not None and (
            not isinstance(wanted, int) or isinstance(wanted, bool) or not 0 < wanted <= MAX_TALKERS
        ):
            raise RequestError(f'status: "talkers" must be a number 1-{MAX_TALKERS}')
        return iter([ok(self.service.status(talkers=wanted))])

    def _flows(self, request: dict[str, Any]) -> Chunks:
        return self.service.flows(request, filter_of(request))

    def _flush(self, request: dict[str, Any]) -> Chunks:
        return iter([ok(self.service.flush(request, filter_of(request)))])

    def _metrics(self, request: dict[str, Any]) -> Chunks:
        return iter([ok({"families": self.service.metric_records()})])

    def _panic(self, request: dict[str, Any]) -> Chunks:
        on = request.get("on")
        if not isinstance(on, bool):
            raise RequestError('panic: "on" must be true or false')
        was = bool(self.service.spec.panic)
        if not self.service.set_panic(on):
            raise RequestError("panic mode not changed: installing the kernel rules failed (see the log)")
        return iter([ok({"panic": on, "changed": was != on})])

    def _reload(self, request: dict[str, Any]) -> Chunks:
        dry_run, candidate = request.get("dry_run", False), request.get("candidate", False)
        if not isinstance(dry_run, bool) or not isinstance(candidate, bool):
            raise RequestError('reload: "dry_run" and "candidate" must be true or false')
        confirm = request.get("confirm")
        if confirm is not None and (
            isinstance(confirm, bool)
            or not isinstance(confirm, (int, float))
            or not 0 < confirm <= MAX_CONFIRM
        ):
            raise RequestError(f'reload: "confirm" must be a number of seconds, 1-{MAX_CONFIRM:g}')
        if dry_run:
            return iter([ok(self.service.reload_preview(candidate=candidate))])
        self.service.reload("control request", confirm=None if confirm is None else float(confirm))
        return iter([ok(asdict(self.service.last_reload))])

    def _confirm(self, request: dict[str, Any]) -> Chunks:
        rollback = request.get("rollback", False)
        if not isinstance(rollback, bool):
            raise RequestError('confirm: "rollback" must be true or false')
        return iter([ok(self.service.confirm(rollback=rollback))])

    def _set(self, request: dict[str, Any]) -> Chunks:
        op, name, addr, timeout = (request.get(key) for key in ("op", "name", "addr", "timeout"))
        if op == "load":  # a worker told by its supervisor: the saved entries again
            return iter([ok({"entries": self.service.load_sets_again()})])
        if op not in SET_OPS:
            raise RequestError(f'set: "op" must be one of {", ".join(SET_OPS)}')
        if not isinstance(name, str) or not name:
            raise RequestError('set: "name" must be the name of one of the policy\'s sets')
        if op != "list" and not isinstance(addr, str):
            raise RequestError(f'set {op}: "addr" must be an address or network')
        if timeout is not None and (
            op != "add" or isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
        ):
            raise RequestError('set: "timeout" is a positive number of seconds, for add only')
        return iter(
            [ok(self.service.set_request(op, name, addr, None if timeout is None else float(timeout)))]
        )

    def _ha(self, request: dict[str, Any]) -> Chunks:
        role, conntrackd = request.get("role"), request.get("conntrackd")
        if role not in HA_ROLES:
            raise RequestError(f'ha: "role" must be one of {", ".join(HA_ROLES)}')
        if conntrackd is not None and (not isinstance(conntrackd, str) or not conntrackd.startswith("/")):
            raise RequestError('ha: "conntrackd" must be the absolute path of conntrackd\'s configuration')
        return iter([ok(self.service.set_ha_role(role, conntrackd))])


def command_of(request: dict[str, Any]) -> str:
    """The request's command; RequestError unless it is one of COMMANDS."""
    command = request.get("cmd")
    if command not in COMMANDS:
        raise RequestError(f"unknown command {command!r}: expected one of {', '.join(COMMANDS)}")
    return str(command)


def filter_of(request: dict[str, Any]) -> FlowFilter:
    """The request's flow filter (proto, state, addr); RequestError when it is not valid."""
    try:
        return FlowFilter.parse(request.get("proto"), request.get("state"), request.get("addr"))
    except FilterError as err:
        raise RequestError(str(err)) from None


# --- a daemon's answers, from its engine ------------------------------------------------------


class OffloadLike(Protocol):
    """What the answers need of the kernel's side of offloaded flows (nfqfw.service.offload)."""

    def overlay(self, flows: Iterable[Any], now: float) -> dict[bytes, Any]: ...
    def revoke(self, engine: Any, flows: list[Any]) -> int: ...


def engine_status(engine: Any, adapter: Any, now: float, top: int | None = None) -> dict[str, Any]:
    """The counts part of a daemon's status answer (timed-out flows swept first), with the `top`
    addresses in the most flows when asked. Flows handed over to the kernel (offload) are
    counted apart, under "offloaded" (as nfqfw last saw them in the kernel's table)."""
    conntrack = _swept(engine, now)
    extra = {} if top is None else {"talkers": talkers(conntrack, now, top)}
    flows = {
        "total": len(conntrack),
        "max": conntrack.max_flows,
        "by_proto": census(conntrack, now),
        "expired": conntrack.expired,
        "early_drops": conntrack.early_drops,
    }
    offloaded = _offloaded(engine, now)
    if offloaded is not None:
        flows["offloaded"] = {"total": len(offloaded), "by_proto": census(offloaded, now)}
    return extra | {
        "gso": bool(adapter.gso) and all(adapter.gso.values()),  # queued whole
        "flows": flows,
        "verdicts": verdict_counts(engine, adapter),
        "zones": engine.zone_counts() if hasattr(engine, "zone_counts") else {},
        "adapter": dict(adapter.counters),
    }


def engine_flows(
    engine: Any, selection: FlowFilter, clock: Callable[[], float], offload: OffloadLike | None = None
) -> Chunks:
    """The answer to `flows`: the selected flows, streamed; those handed over to the kernel as
    the kernel's table has them now (`offload`), marked "offloaded"."""
    now = clock()
    conntrack = _swept(engine, now)
    listed: list[Listed] = [
        (flow, conntrack, False, None) for flow in select_flows(conntrack, selection, now)
    ]
    offloaded = _offloaded(engine, now)
    tracked = len(conntrack)
    if offloaded is not None:
        kernel = offload.overlay(list(offloaded), now) if offload is not None and len(offloaded) else {}
        listed += [
            (flow, offloaded, True, kernel.get(flow.key)) for flow in select_flows(offloaded, selection, now)
        ]
        tracked += len(offloaded)
    return _stream_flows(listed, tracked, conntrack.max_flows, clock)


def engine_flush(
    engine: Any,
    request: dict[str, Any],
    selection: FlowFilter,
    now: float,
    offload: OffloadLike | None = None,
) -> dict[str, Any]:
    """The answer to `flush`: the selected flows removed (logged with the request's words); those
    handed over to the kernel are taken back from it (`offload`: their kernel entries deleted)."""
    conntrack = _swept(engine, now)
    flows = select_flows(conntrack, selection, now)
    for flow in flows:
        conntrack.remove(flow)
    removed, tracked = len(flows), len(conntrack)
    offloaded = _offloaded(engine, now)
    if offloaded is not None:
        taken = select_flows(offloaded, selection, now)
        if offload is not None:
            removed += offload.revoke(engine, taken)
        tracked += len(offloaded)
    if removed:
        log.info("control: flushed %d flows (%s)", removed, _describe(request))
    return {"removed": removed, "tracked": tracked}


def _offloaded(engine: Any, now: float) -> Any:
    """The engine's table of flows handed over to the kernel (None: it has none), swept."""
    offloaded = getattr(engine, "offloaded", None)
    if offloaded is None or (not len(offloaded) and not getattr(engine, "offload", False)):
        return None
    offloaded.expire(now)
    return offloaded


def _swept(engine: Any, now: float) -> Any:
    conntrack = engine.conntrack
    conntrack.expire(now)  # what has timed out is gone, as the kernel's GC would have it
    return conntrack


def _describe(request: dict[str, Any]) -> str:
    chosen = [f"{key} {request[key]}" for key in ("proto", "state", "addr") if request.get(key)]
    return ", ".join(chosen) or "all"


Listed = tuple[Any, Any, bool, Any]  # a flow, its table, offloaded, its kernel entry (or None)


def _stream_flows(flows: list[Listed], tracked: int, max_flows: int, clock: Callable[[], float]) -> Chunks:
    """{"ok":true,"result":{"tracked":N,"max_flows":M,"flows":[...]}} a chunk of flows at a time;
    an offloaded flow is marked so, with the kernel's time left when its entry was found; a flow
    removed while the answer is written is left out."""
    head = json.dumps({"tracked": tracked, "max_flows": max_flows}, separators=(",", ":"))
    yield b'{"ok":true,"result":' + head[:-1].encode() + b',"flows":['
    first = True
    for start in range(0, len(flows), FLOWS_PER_CHUNK):
        now = clock()
        records = []
        for flow, table, offloaded, kernel in flows[start : start + FLOWS_PER_CHUNK]:
            if table.get(flow.key) is flow:
                record = flow_record(flow, now)
                if offloaded:
                    record["offloaded"] = True
                if kernel is not None:
                    record["timeout"] = kernel.timeout  # the kernel's own
                records.append(json.dumps(record, separators=(",", ":")))
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
