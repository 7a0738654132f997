"""The `nfqfw run` daemon: one process that binds its queue(s) and filters their packets.

`Daemon` is the service core (nfqfw.service.core) around an Engine and a QueueAdapter. Its
start, in this order, each failure a one-line message on stderr and exit code 1: root and the
firewall's tools -> the policy (its located errors are printed) -> metrics endpoint -> raw
reply sockets -> the flow snapshot restored -> the queue(s) bound -> control socket -> the
kernel rules -> READY=1.

Invariants:
- The flows of the last run are restored before the queue is bound, and the queue is bound
  before the rules send packets to it, so the first queued packet finds a listener that knows
  its flow. A bad snapshot is logged and ignored, never fatal (nfqfw.service.statedir).
- One thread. The poll loop drains a readable queue with NetfilterQueue.run(block=False);
  housekeeping (signals, control socket, links, drop statistics, packet-log summary, snapshots,
  WATCHDOG=1, STATUS=) runs when its deadline passes, from the loop or, under a flood that
  keeps run() busy, from the packet callback itself (nfqfw.kernel.queue). So the watchdog stops
  exactly when the packet path is wedged.
- A reload swaps the policy in with conntrack state kept; with `reload: recheck` (the default)
  the flows the new policy would not let start are removed (nfqfw.core.recheck). A reload on
  trial (confirm) keeps them aside: a rollback puts back those the old policy still allows.
- The sets' runtime entries are the engine's (kept across reloads); a single daemon saves them
  in the state directory at each change (nfqfw.service.setstate) and reads them at start,
  before the queue is bound; a worker reads what its supervisor saved. With `reload: recheck`
  an entry added or deleted re-judges the flows of its addresses at once.
- At a stop the flows are saved (exact only in failure-mode closed: in open mode traffic passes
  unseen until the next start); the kernel rules stay.

`WorkerDaemon` is a daemon on one queue of `nfqfw run --workers` (nfqfw.service.supervisor):
it holds no kernel rules (`firewall` None: panic and failure mode are its supervisor's), its
sd_notify messages and counts go to the supervisor, and it restores the snapshot files its
supervisor names; under --metrics it counts and its supervisor serves.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from nfqfw.control.flowlist import FlowFilter
from nfqfw.control.protocol import Chunks, RequestError
from nfqfw.control.requests import engine_flows, engine_flush, engine_status
from nfqfw.firewall import Firewall, Marks
from nfqfw.firewall.marks import FORWARDED_MARK
from nfqfw.kernel.links import Links
from nfqfw.kernel.queue import QueueAdapter, QueueError
from nfqfw.kernel.queue_info import COPY_RANGE, DropWatch, verdict_counts
from nfqfw.kernel.rawsend import RawSender
from nfqfw.kernel.routes import RouteMeta
from nfqfw.observe.packetlog import PacketLog
from nfqfw.service.core import (
    Applied,
    Loaded,
    PendingReload,
    ServiceCore,
    StartupError,
    load_policy_bundle,
    load_policy_file,
    run_service,
)
from nfqfw.service.offload import Offload
from nfqfw.service.options import Options
from nfqfw.service.ruleset import rule_reasons
from nfqfw.service.sdnotify import Notifier
from nfqfw.service.setstate import load_sets, save_sets
from nfqfw.service.statedir import StateDir
from nfqfw.service.supervision import Counts, counts_assignment, queue_snapshots

log = logging.getLogger("nfqfw")


def default_engine(loaded: Loaded) -> Any:
    from nfqfw.core.engine import Engine

    return Engine(loaded.engine_policy, copy_cap=COPY_RANGE)  # the queue's copy range: GSO packets are cut


class Daemon(ServiceCore):
    """One nfqfw process filtering its queue(s): the service core around an Engine (the policy
    and the flow table) and a QueueAdapter (the kernel's packets in, verdicts out).

    It owns the kernel rules (a WorkerDaemon does not), its flow snapshot (`state`), the packet
    log and, with --metrics, the endpoint. Everything runs in one thread: housekeeping is
    scheduled through the adapter's deadline, so the packet callback can run it under a flood.
    """

    def __init__(
        self,
        options: Options,
        *,
        load: Callable[[str], Loaded] = load_policy_file,
        make_engine: Callable[[Loaded], Any] = default_engine,
        notifier: Notifier | None = None,
        firewall: Firewall | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(options, load=load, notifier=notifier, firewall=firewall, clock=clock)
        self._make_engine = make_engine
        self.engine: Any = None
        self.links: Links | None = None
        self.sender: RawSender | None = None
        self.adapter: QueueAdapter | None = None
        self.drops: DropWatch | None = None
        self.state = self._state_dir()
        # The offloaded flows in the kernel; those an HA peer admitted are placed by the routes.
        self.offload = Offload(
            Marks(options.mark, options.conn_mark), owner=options.owner_index, route_meta=self._route_meta
        )
        self.packet_log = PacketLog(copy_cap=COPY_RANGE)
        self.timer: Any = None  # a nfqfw.observe.metrics.EngineTimer when metrics are counted
        self.collector: Any = None  # a worker's nfqfw.observe.metrics.NfqfwCollector (collect_metrics)
        self._stats_due = 0.0

    def _state_dir(self) -> StateDir:
        """The flow snapshot; a single daemon also takes in (and then removes) the per-queue
        files a run with --workers left: switching --workers off must not cut the sessions."""
        opts = self.options
        try:
            adopt = queue_snapshots(os.listdir(opts.state_dir))
        except OSError:
            adopt = ()
        return StateDir(
            opts.state_dir, opts.snapshot_interval, name=opts.snapshot_name, adopt=adopt, consume_adopted=True
        )

    # -- start --

    def _start(self, loaded: Loaded) -> None:
        opts = self.options
        assert self.spec is not None
        self.engine = self._make_engine(loaded)
        self.packet_log.configure(loaded.log_limit)
        self._start_metrics()
        try:
            self.links = Links()
            self.sender = RawSender(opts.mark)
        except OSError as err:
            raise StartupError(f"cannot open netlink or raw sockets: {err}") from err
        self._follow_addresses(self.links, self.engine)
        self.adapter = QueueAdapter(
            self.engine,
            self.links,
            self.sender,
            mark=self._accept_mark(),
            forwarded_mark=FORWARDED_MARK,
            fail_open=loaded.fail_open,
            reject_rate=opts.reject_rate,
            clock=self.clock,
            log_packet=self.packet_log.log,
            wrap_process=None if self.timer is None else self.timer.wrap,
        )
        self.adapter.housekeeping = self._housekeeping
        self._follow_offload(loaded)
        self.state.restore(self.engine, self.clock(), loaded.recheck)  # before any packet comes
        self._load_runtime_sets()
        self._adopt_offloaded(loaded.recheck)  # after the sets: a recheck sees their entries
        try:
            spec = self.spec
            self.adapter.bind(spec.bound_queues, opts.max_len, opts.sock_len, opts.gso, spec.new_queues)
        except QueueError as err:
            raise StartupError(str(err)) from err
        self._open_control()
        rules = self._install_rules()  # a worker's supervisor installs them once every queue is bound
        self.drops = DropWatch(self.spec.bound_queues)
        mode = "open" if loaded.fail_open else "closed"
        gso = "on" if all(self.adapter.gso.values()) else "off"
        settings = f"failure mode {mode}, mark 0x{opts.mark:x}, GSO packets {gso}"
        new = self.spec.new_queues
        if new:
            settings += f", first packets to queue {new[0] if len(new) == 1 else f'{new[0]}:{new[-1]}'}"
        log.info("queue %s bound, %s (%s)", self.spec.queue_text, rules, settings)
        self._announce_ready(f"filtering on queue {self.spec.queue_text}, failure mode {mode}")

    def _route_meta(self) -> RouteMeta:
        return RouteMeta(self.links.addresses if self.links is not None else ())

    @staticmethod
    def _follow_addresses(links: Links, engine: Any) -> None:
        """The engine tells the SYN proxy's SYNs by a source that is not one of the gateway's
        addresses (nfqfw.core.synproxy): it gets them, and every change of them."""

        def update() -> None:
            if links.addresses:
                engine.local_addresses = links.addresses

        update()
        links.on_change(update)

    def _accept_mark(self) -> int:
        """The mark of an accepted packet: --mark, and a worker's owner field (nfqfw.firewall.marks)."""
        opts = self.options
        marks = Marks(opts.mark, opts.conn_mark)
        return opts.mark | (0 if opts.owner_index is None else marks.owner_mark(opts.owner_index))

    def _follow_offload(self, loaded: Loaded) -> None:
        """The connection-mark fields accept verdicts carry with `offload: established`: the rule
        that admitted a flow, and the offload bit (none without offload)."""
        if self.adapter is None:
            return
        config = loaded.engine_policy.config
        if config.options.offload != "established":
            self.adapter.set_verdict_marks({}, 0)
            return
        marks = Marks(self.options.mark, self.options.conn_mark)
        self.offload.reasons = rule_reasons(config)
        self.adapter.set_verdict_marks(marks.rule_marks(self.offload.reasons), marks.offload)

    def _adopt_offloaded(self, recheck: bool) -> None:
        """The offloaded flows the last run saved: still the kernel's, or back to the engine."""
        now = self.clock()
        flows = self.state.restore_offloaded(now)
        if not flows:
            return
        offloaded, back = self.offload.adopt(self.engine, flows, now)
        revoked = self._recheck_offloaded() if recheck else 0
        log.info(
            "offloaded flows of the last run: %d still carried by the kernel (%d of them no longer "
            "allowed, taken back), %d no longer in its table (back with nfqfw)",
            offloaded,
            revoked,
            back,
        )

    def _recheck_offloaded(self) -> int:
        """reload: recheck for the flows handed over to the kernel: those the policy no longer
        admits are taken back (their kernel entries deleted)."""
        from nfqfw.core.recheck import stale_flows

        return self.offload.revoke(self.engine, stale_flows(self.engine, list(self.engine.offloaded)))

    def _serve_metrics(self, host: str, port: int, allow_remote: bool) -> tuple[Any, str]:
        from nfqfw.observe import metrics

        server, self.timer = metrics.serve(self, host, port, allow_remote)
        return server, ""

    # -- loop --

    def _readers(self) -> dict[int, Callable[[], object]]:
        assert self.adapter is not None and self.links is not None
        return {**self.adapter.fds(), self.links.fileno(): self.links.on_events}

    def _housekeeping_due(self) -> float:
        assert self.adapter is not None
        return self.adapter.deadline

    def _run_housekeeping(self, now: float) -> None:
        assert self.adapter is not None
        self.adapter.run_housekeeping(now)

    def _wake(self) -> None:
        if self.adapter is not None:
            self.adapter.wake()

    def _tend(self, now: float) -> float:
        assert self.links is not None and self.drops is not None
        self.links.on_events()
        self.packet_log.flush(now)
        if now >= self._stats_due:
            self._stats_due = now + self.options.stats_interval
            self.drops.check()
        self._expire_runtime_sets(now)
        return min(self.state.tick(self.engine, now), self.offload.tick(self.engine, now))

    def _dump(self) -> None:
        self._log_counters()

    def _stop_serving(self) -> None:
        # Unbinding makes a busy run(block=False) return: the kernel stops feeding us.
        assert self.adapter is not None
        self.adapter.unbind()

    # -- reload --

    def _apply_policy(self, loaded: Loaded, confirm: float | None = None) -> Applied:
        self.engine.replace_policy(loaded.engine_policy)
        self._follow_offload(loaded)
        self.packet_log.configure(loaded.log_limit)
        if not loaded.recheck:
            log.info("policy reloaded: existing flows kept (reload: keep)")
            return Applied()
        from nfqfw.core.recheck import recheck

        cut = recheck(self.engine)
        removed = len(cut) + self._recheck_offloaded()
        log.info("policy reloaded: %d flows no longer allowed were removed", removed)
        return Applied(removed=removed, cut=tuple(cut) if confirm is not None else ())

    def _apply_rollback(self, pending: PendingReload) -> Applied:
        """The policy before the trial, and the flows the trial cut that it allows (unless the
        same flow started again meanwhile)."""
        from nfqfw.core.recheck import still_allowed

        applied = self._apply_policy(pending.previous)
        conntrack = self.engine.conntrack
        back = [
            flow
            for flow in pending.cut
            if conntrack.get(flow.key) is None and still_allowed(self.engine, flow)
        ]
        restored = sum(1 for flow in back if conntrack.restore(flow))
        log.info("rollback: %d of the %d flows the reload cut are back", restored, len(pending.cut))
        return applied

    def _cut_preview(self, loaded: Loaded) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The flows `loaded` would cut (none with reload: keep), without touching anything."""
        from nfqfw.control.flowlist import flow_record
        from nfqfw.core.recheck import standing_decision

        if not loaded.recheck:
            return [], []
        candidate = loaded.engine_policy
        candidate.bind_runtime(self.engine.runtime_sets)
        now = self.clock()
        cut = []
        for flow in list(self.engine.conntrack):
            decision = standing_decision(self.engine, flow, candidate)
            if decision is not None and decision.action.value != "accept":
                record = flow_record(flow, now)
                cut.append({**record, "now": decision.reason, "now_action": decision.action.value})
        return cut, []

    # -- sets --

    def policy_config(self) -> Any:
        return self.engine.policy.config

    def runtime_sets(self) -> Any:
        return self.engine.runtime_sets

    def _set_change(self, name: str, network: Any, add: bool, timeout: float | None) -> dict[str, Any]:
        from nfqfw.core.recheck import change_set

        now = self.clock()
        expires = None if timeout is None else now + timeout
        recheck = self.engine.policy.config.options.reload == "recheck"
        changed, cut = change_set(self.engine, name, network, add=add, expires=expires, cut=recheck)
        revoked = self._recheck_offloaded() if recheck and changed else 0
        if self.OWNS_POLICY:
            save_sets(self.options.state_dir, self.engine.runtime_sets, now)
            self._kernel_set_entry(name, network, add, timeout)
        return {
            "set": name,
            "addr": str(network),
            "op": "add" if add else "del",
            "changed": changed,
            "removed": len(cut) + revoked,
        }

    def load_sets_again(self) -> int:
        """The runtime entries as the state file has them now (a worker, told by its supervisor)."""
        from nfqfw.core.sets import RuntimeSets

        fresh = RuntimeSets()
        count = load_sets(self.options.state_dir, fresh, self.clock())
        self.engine.runtime_sets = fresh
        self.engine.policy.bind_runtime(fresh)
        if self.engine.policy.config.options.reload == "recheck":
            from nfqfw.core.recheck import recheck

            recheck(self.engine)
            self._recheck_offloaded()
        return count

    def _load_runtime_sets(self) -> None:
        count = load_sets(self.options.state_dir, self.engine.runtime_sets, self.clock())
        self.engine.policy.refresh_runtime()
        if count:
            log.info(
                "sets: %d runtime entries restored (%s)", count, ", ".join(self.engine.runtime_sets.names())
            )

    def _expire_runtime_sets(self, now: float) -> None:
        runtime = self.engine.runtime_sets
        due = runtime.next_expiry()
        if due is None or due > now:
            return
        from nfqfw.core.recheck import expire_sets

        recheck = self.engine.policy.config.options.reload == "recheck"
        gone = expire_sets(self.engine, now, cut=recheck)
        if gone and recheck:
            self._recheck_offloaded()
        for name, network in gone:
            log.info("set %s: %s expired", name, network)
        if gone and self.OWNS_POLICY:
            save_sets(self.options.state_dir, runtime, now)

    def _failure_mode_changed(self, fail_open: bool) -> None:
        if self.adapter is not None:
            self.adapter.fail_open = fail_open

    # -- what it answers --

    def policy_sha256(self) -> str:
        return str(self.engine.policy.config.sha256)

    def counts(self) -> Counts:
        assert self.adapter is not None
        flows = len(getattr(self.engine, "conntrack", ()))
        verdicts = sum(getattr(self.engine, "counters", {}).values()) + self.adapter.early_drops
        return Counts(verdicts, flows, self.adapter.counters["reject sent"])

    def _status_counts(self, now: float, talkers: int | None) -> dict[str, Any]:
        return engine_status(self.engine, self.adapter, now, talkers)

    def flows(self, request: dict[str, Any], selection: FlowFilter) -> Chunks:
        return engine_flows(self.engine, selection, self.clock, self.offload)

    def flush(self, request: dict[str, Any], selection: FlowFilter) -> dict[str, Any]:
        return engine_flush(self.engine, request, selection, self.clock(), self.offload)

    def _ha_role_changed(self, role: str) -> dict[str, int]:
        """master: take over the flows conntrackd committed (nfqfw.service.offload); backup,
        fault: forget the records (the kernel's entries stay conntrackd's)."""
        now = self.clock()
        self.offload.taking_over = role == "master"
        if role == "master":
            taken = self.offload.take_over(self.engine, now) if self.engine.offload else 0
            return {"taken_over": taken}
        forgotten = len(self.engine.conntrack) + len(self.engine.offloaded)
        self.engine.conntrack.clear()
        self.engine.offloaded.clear()
        return {"forgotten": forgotten}

    def metric_records(self) -> list[Any]:
        """A worker's Prometheus families as records, for its supervisor's endpoint (RequestError
        where they are not collected: a single daemon serves its own endpoint)."""
        if self.collector is None:
            raise RequestError("metrics: not collected (a worker of nfqfw run --workers --metrics answers)")
        from nfqfw.observe import metrics

        return metrics.records(self.collector)

    # -- stop --

    def _wind_down(self) -> None:
        if self.engine is not None:  # exact: the kernel drops what comes until the next start
            self.state.save(self.engine, self.clock(), exact=not self.fail_open)
        self.packet_log.flush(self.clock(), force=True)
        self._log_counters()

    def _log_counters(self) -> None:
        engine_counters = getattr(self.engine, "counters", {}) or {}
        if self.adapter is not None:
            engine_counters = verdict_counts(self.engine, self.adapter)
        for name, value in sorted(engine_counters.items()):
            log.info("verdicts %s: %d", name, value)
        if self.adapter is not None:
            for name, value in self.adapter.counters.items():
                if value:
                    log.info("adapter %s: %d", name, value)

    def _release(self) -> None:
        self.offload.close()
        if self.adapter is not None:
            self.adapter.unbind()
        if self.sender is not None:
            self.sender.close()
            self.sender = None
        if self.links is not None:
            self.links.close()
            self.links = None


class WorkerDaemon(Daemon):
    """A daemon on one queue of `nfqfw run --workers`, forked by the supervisor: no kernel rules
    (its supervisor installs them once every worker is bound, and answers panic requests), its
    counts sent with its STATUS= to the supervisor, the snapshot files the supervisor names
    restored and left in place (the supervisor removes them), and under --metrics counting for
    the supervisor's endpoint instead of serving one."""

    OWNS_RULES = False
    OWNS_POLICY = False

    def __init__(self, options: Options, **kwargs: Any) -> None:
        kwargs.setdefault("load", load_policy_bundle)  # the supervisor's bundle of the policy in force
        super().__init__(options, **kwargs)

    def _load_candidate(self) -> Loaded:
        """The policy a dry run asks about, bundled by the supervisor beside the one in force."""
        return load_policy_bundle(candidate_path(self.options.config))

    def _roll_back_without_trial(self) -> dict[str, Any]:
        """Restarted since the reload on trial: the bundle is the policy to go back to again."""
        self.reload("rollback by the supervisor")
        return {"rolled_back": True, "sha256": self.policy_sha256()}

    def _state_dir(self) -> StateDir:
        opts = self.options
        return StateDir(
            opts.state_dir,
            opts.snapshot_interval,
            name=opts.snapshot_name,
            adopt=opts.adopt_snapshots,
            consume_adopted=False,
        )

    def _start_metrics(self) -> None:
        if self.options.collect_metrics:
            from nfqfw.observe import metrics

            self.timer = metrics.EngineTimer()
            self.collector = metrics.NfqfwCollector(self, self.timer)

    def _report_status(self) -> None:
        self.notifier.status(self.status_text(), counts_assignment(self.counts()))


def candidate_path(policy_copy: str) -> str:
    """Where a supervisor puts the policy a dry run asks about, beside its policy copy."""
    return os.path.join(os.path.dirname(policy_copy), "candidate.bundle")


def run_daemon(options: Options, **kwargs: Any) -> int:
    """`nfqfw run` without --workers: start, serve, stop; returns the process exit code."""
    return run_service(Daemon(options, **kwargs))
