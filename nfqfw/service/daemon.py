"""The `nfqfw run` daemon: start-up checks, bind, rules in, packet loop, signals, clean stop.

Start-up, in this order, each failure a one-line message on stderr and exit code 1:
  root? -> iptables tools present? -> policy valid (its located errors are printed) ->
  raw reply sockets -> restore the flow snapshot -> bind the queue(s) -> install the rules ->
  READY=1 to $NOTIFY_SOCKET.
The queue is bound before the rules go in, so the first queued packet finds a listener, and
after the flows of the last run are back (nfqfw.service.statedir: saved at stop and every
--snapshot-interval seconds; a bad snapshot is logged and ignored, never fatal).

Loop: poll(2) on the queue sockets, the rtnetlink event socket and a signal wake-up pipe;
a readable queue is drained with NetfilterQueue.run(block=False). Housekeeping (links, drop
statistics, watchdog, status, signals) runs when the poll times out or, under a flood that
keeps run() busy, from the packet callback itself (see nfqfw.kernel.queue).

Signals: SIGTERM and SIGINT stop: STOPPING=1, the queues are unbound, counters are logged,
exit code 0. The kernel rules stay as they are (see nfqfw.firewall.iptables): in the default closed
failure mode, traffic stays blocked until nfqfw runs again; `nfqfw rules remove` takes them
away. SIGUSR1 logs the verdict and adapter counters.

SIGHUP reloads the policy live: the handler only sets a flag; housekeeping (between two
packets) re-reads and validates the file. Invalid: the located errors are logged and the
running policy stays. Valid: `engine.replace_policy()` swaps it in (conntrack state kept) and,
with `reload: recheck` (the default), the flows the new policy would not let start any more
are removed (nfqfw.core.recheck); `reload: keep` keeps them. A changed failure mode
re-installs the kernel rules. RELOADING=1 ... READY=1 surround the reload either way.

A policy file writable by group or others is refused, at start and at reload.

Control socket (nfqfw.control.server): RUNTIME_DIR/control.sock (--runtime-dir, default /run/nfqfw),
root only; `nfqfw status|flows|flush|panic|reload` ask there. It is served from the poll loop
and from housekeeping, so also under a flood. A reload asked there takes the SIGHUP path;
the outcome of the last one (`last_reload`) and the start time are kept for `nfqfw status`.
Panic mode (`set_panic`) lives in the kernel rules (see nfqfw.firewall.iptables) and survives a restart.

Observability (own modules): the packet log (nfqfw.observe.packetlog) gets the packets whose verdict
says `log` from the adapter and its suppression summary from housekeeping; `--metrics` starts
the Prometheus endpoint (nfqfw.observe.metrics) before the queue is bound.

Worker mode (`Options.worker`, set by nfqfw.service.supervisor for each process of `nfqfw run --workers`):
the same daemon on one queue, except that the kernel rules and panic mode are left to the
supervisor; its READY/WATCHDOG/STATUS go to the supervisor's $NOTIFY_SOCKET, its control socket
is the supervisor's private one for that queue.
"""

from __future__ import annotations

import logging
import math
import os
import select
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from nfqfw.control.protocol import ControlError
from nfqfw.control.requests import Requests
from nfqfw.control.server import ControlServer
from nfqfw.core.config import DEFAULT_LOG_LIMIT, LogLimit
from nfqfw.firewall import Firewall, QueueSpec, RulesError, backend_named
from nfqfw.kernel.links import Links
from nfqfw.kernel.queue import QueueAdapter, QueueError
from nfqfw.kernel.queue_info import (
    COPY_RANGE,
    DropWatch,
)
from nfqfw.kernel.rawsend import RawSender
from nfqfw.observe.packetlog import PacketLog
from nfqfw.service.options import Options
from nfqfw.service.ruleset import protection, queue_spec
from nfqfw.service.sdnotify import Notifier, watchdog_interval
from nfqfw.service.statedir import StateDir
from nfqfw.service.supervision import queue_snapshots

log = logging.getLogger("nfqfw")

HOUSEKEEPING_PERIOD = 1.0  # seconds between housekeeping rounds (links, signals)
STATUS_PERIOD = 10.0  # seconds between STATUS= updates


class StartupError(Exception):
    """Start-up cannot proceed; the lines of str() are printed as they are."""


@dataclass
class Loaded:
    """What the daemon takes from the policy file."""

    engine_policy: Any  # a CompiledPolicy
    fail_open: bool  # policy option failure-mode: open
    recheck: bool = True  # policy option reload: recheck (False: keep)
    log_limit: LogLimit = DEFAULT_LOG_LIMIT  # policy options log-limit, log-limit-burst


@dataclass(frozen=True)
class ReloadResult:
    """The outcome of a reload, for `nfqfw status` and `nfqfw reload`."""

    time: float  # wall clock
    trigger: str  # "SIGHUP" or "control request"
    ok: bool
    errors: tuple[str, ...] = ()  # the located errors of a refused policy
    removed: int | None = None  # flows removed by reload: recheck (None: reload: keep)


@dataclass
class _Schedule:
    stats: float = 0.0
    status: float = 0.0
    watchdog: float = math.inf
    watchdog_every: float | None = None


@dataclass
class _Requests:
    """Set by signal handlers, acted on in housekeeping."""

    stop: str | None = None  # name of the signal that asked for it
    reload: bool = False
    dump: bool = False  # log the counters
    served: set[str] = field(default_factory=set)


def check_file_mode(path: str) -> None:
    """Refuse a policy anyone but its owner may rewrite: it decides what passes the gateway.
    A missing or unreadable file is left to the loader, which reports it located."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StartupError(f"{path}: refusing a policy file writable by group or others (mode {mode:04o})")


def load_policy_file(path: str) -> Loaded:
    """Check the file mode, read and compile the policy; raises StartupError with the located errors."""
    from nfqfw.core.config import ConfigError, load_policy
    from nfqfw.core.policy import CompiledPolicy

    check_file_mode(path)
    try:
        config = load_policy(path)  # an unreadable file is a located ConfigError too
    except ConfigError as err:
        raise StartupError(str(err)) from err
    options = config.options
    fail_open, recheck = options.failure_mode == "open", options.reload == "recheck"
    return Loaded(CompiledPolicy(config), fail_open, recheck, options.log_limit)


def default_engine(loaded: Loaded) -> Any:
    from nfqfw.core.engine import Engine

    return Engine(loaded.engine_policy, copy_cap=COPY_RANGE)  # the queue's copy range: GSO packets are cut


class Daemon:
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
        self.options = options
        self._load = load
        self._make_engine = make_engine
        self.notifier = notifier or Notifier()
        self.firewall = firewall or backend_named()
        self.clock = clock
        self.engine: Any = None
        self.links: Links | None = None
        self.sender: RawSender | None = None
        self.adapter: QueueAdapter | None = None
        self.drops: DropWatch | None = None
        self.spec: QueueSpec | None = None
        self._requests = _Requests()
        self._schedule = _Schedule()
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self.fail_open = False
        self.state = StateDir(
            options.state_dir,
            options.snapshot_interval,
            name=options.snapshot_name,
            adopt=options.adopt_snapshots if options.worker else _snapshots_of_workers(options.state_dir),
            consume_adopted=not options.worker,
        )
        self.control: ControlServer | None = None
        self.started = time.time()
        self.started_mono = clock()
        self.last_reload: ReloadResult | None = None
        self.packet_log = PacketLog(copy_cap=COPY_RANGE)
        self.metrics: Any = None  # a nfqfw.observe.metrics.MetricsServer with --metrics
        self.collector: Any = None  # a worker's nfqfw.observe.metrics.NfqfwCollector (collect_metrics)

    # -- start --

    def start(self) -> None:
        """Everything up to READY=1; raises StartupError (after undoing what it did)."""
        opts = self.options
        check_root_and_tools(self.firewall)
        loaded = self._load(opts.config)
        self.spec = queue_spec(opts, loaded.engine_policy.config, bypass=loaded.fail_open)
        self.engine = self._make_engine(loaded)
        self.fail_open = loaded.fail_open
        self.packet_log.configure(loaded.log_limit)
        timer = self._start_metrics()
        try:
            self.links = Links()
            self.sender = RawSender(opts.mark)
        except OSError as err:
            self.close()
            raise StartupError(f"cannot open netlink or raw sockets: {err}") from err
        self.adapter = QueueAdapter(
            self.engine,
            self.links,
            self.sender,
            mark=opts.mark,
            fail_open=loaded.fail_open,
            reject_rate=opts.reject_rate,
            clock=self.clock,
            log_packet=self.packet_log.log,
            wrap_process=None if timer is None else timer.wrap,
        )
        self.adapter.housekeeping = self._housekeeping
        self.state.restore(self.engine, self.clock(), loaded.recheck)  # before any packet comes
        try:
            self.adapter.bind(self.spec.bound_queues, opts.max_len, opts.sock_len, opts.gso)
        except QueueError as err:
            self.close()
            raise StartupError(str(err)) from err
        try:
            self.control = ControlServer.open(opts.runtime_dir, Requests(self), clock=self.clock)
        except ControlError as err:
            self.close()
            raise StartupError(str(err)) from err
        if not opts.worker:  # a worker's supervisor installs the rules once every queue is bound
            self._install_rules()
        self.drops = DropWatch(self.spec.bound_queues)
        self._schedule.watchdog_every = watchdog_interval()
        if self._schedule.watchdog_every is not None:
            self._schedule.watchdog = self.clock()
        self._install_signal_handlers()
        mode = "open" if loaded.fail_open else "closed"
        queue = self._queue_text()
        gso = "on" if all(self.adapter.gso.values()) else "off"
        settings = f"failure mode {mode}, mark 0x{opts.mark:x}, GSO packets {gso}"
        rules_text = "rules left to the supervisor" if opts.worker else "rules installed"
        log.info("queue %s bound, %s (%s)", queue, rules_text, settings)
        self.notifier.ready(f"filtering on queue {self._queue_text()}, failure mode {mode}")

    def _install_rules(self) -> None:
        assert self.spec is not None
        try:
            self.spec = self.firewall.install_keeping_panic(self.spec)
        except RulesError as err:
            self.close()
            raise StartupError(str(err)) from err

    def _start_metrics(self) -> Any:
        """The Prometheus endpoint with --metrics; returns its engine timer (None without). A
        worker under --metrics only counts: its supervisor serves (control "metrics")."""
        if self.options.collect_metrics:
            from nfqfw.observe import metrics

            timer = metrics.EngineTimer()
            self.collector = metrics.NfqfwCollector(self, timer)
            return timer
        if self.options.metrics is None:
            return None
        from nfqfw.observe import metrics

        host, port = self.options.metrics
        try:
            self.metrics, timer = metrics.serve(self, host, port, self.options.metrics_allow_remote)
        except metrics.MetricsError as err:
            raise StartupError(str(err)) from err
        log.info("metrics on http://%s/metrics", self.metrics.address)
        return timer

    def _queue_text(self) -> str:
        assert self.spec is not None
        first, last = self.spec.first, self.spec.last
        return str(first) if first == last else f"{first}:{last}"

    # -- loop --

    def loop(self) -> None:
        """Serve packets until a stop is requested."""
        assert self.adapter is not None and self.links is not None and self._wakeup is not None
        handlers: dict[int, Callable[[], object]] = dict(self.adapter.fds())
        handlers[self.links.fileno()] = self.links.on_events
        handlers[self._wakeup[0].fileno()] = self._drain_wakeup
        if self.control is not None:
            handlers[self.control.fileno()] = self.control.service
        poller = select.poll()
        for fd in handlers:
            poller.register(fd, select.POLLIN)
        self.adapter.set_deadline(0.0)
        while self._requests.stop is None:
            wait = max(0.0, self.adapter.deadline - self.clock())
            for fd, _ in poller.poll(math.ceil(wait * 1000)):
                if self._requests.stop is not None:
                    break
                handlers[fd]()
            now = self.clock()
            if now >= self.adapter.deadline:
                self.adapter.run_housekeeping(now)

    def _housekeeping(self, now: float) -> float:
        """Periodic work; returns when it wants to run next."""
        requests, schedule = self._requests, self._schedule
        if requests.stop is not None:
            if "stop" not in requests.served:
                requests.served.add("stop")
                log.info("%s received: stopping", requests.stop)
                self.notifier.stopping("stopping")
                # Unbinding makes a busy run(block=False) return: the kernel stops feeding us.
                assert self.adapter is not None
                self.adapter.unbind()
            return math.inf
        if requests.reload:
            requests.reload = False
            self.reload()
        if requests.dump:
            requests.dump = False
            self._log_counters()
        control_due = math.inf
        if self.control is not None:
            self.control.service()
            control_due = self.control.next_due(now)
        assert self.links is not None and self.drops is not None
        self.links.on_events()
        self.packet_log.flush(now)
        if now >= schedule.stats:
            schedule.stats = now + self.options.stats_interval
            self.drops.check()
        snapshot_due = self.state.tick(self.engine, now)
        if now >= schedule.watchdog and schedule.watchdog_every is not None:
            schedule.watchdog = now + schedule.watchdog_every
            self.notifier.watchdog()
        if now >= schedule.status:
            schedule.status = now + STATUS_PERIOD
            self.notifier.status(self.status_text())
        return min(now + HOUSEKEEPING_PERIOD, schedule.watchdog, control_due, snapshot_due)

    def reload(self, trigger: str = "SIGHUP") -> bool:
        """SIGHUP or a control request, run between two packets. True when the new policy is in force."""
        why = "SIGHUP received" if trigger == "SIGHUP" else trigger
        log.info("%s: reloading %s", why, self.options.config)
        self.notifier.reloading("reloading the policy")
        try:
            loaded = self._load(self.options.config)
        except StartupError as err:
            self.last_reload = refused_reload(trigger, str(err).splitlines(), self.notifier)
            return False
        self.engine.replace_policy(loaded.engine_policy)
        self.packet_log.configure(loaded.log_limit)
        removed: int | None = None
        if loaded.recheck:
            from nfqfw.core.recheck import recheck

            removed = len(recheck(self.engine))
            log.info("policy reloaded: %d flows no longer allowed were removed", removed)
        else:
            log.info("policy reloaded: existing flows kept (reload: keep)")
        if not self.options.worker and self.spec is not None:  # the pre-filter follows the rules
            spec = replace(self.spec, protection=protection(self.options, loaded.engine_policy.config))
            if spec != self.spec:
                self._reinstall(spec, "reload: the kernel's pre-filter and caps not updated")
        if loaded.fail_open != self.fail_open:
            self._change_failure_mode(loaded.fail_open)
        self.last_reload = ReloadResult(time.time(), trigger, True, removed=removed)
        self.notifier.ready("policy reloaded")
        return True

    def set_panic(self, on: bool) -> bool:
        """Panic mode on/off in the kernel rules (nfqfw panic); False when they could not be installed."""
        assert self.spec is not None
        if self.options.worker:  # the rules are the supervisor's: it answers panic requests itself
            log.error("panic mode is changed by the supervisor, not by a worker")
            return False
        was = self.spec.panic
        if not self._reinstall(replace(self.spec, panic=on), "panic mode not changed"):
            return False
        if on != was:
            log.warning("panic mode %s", "on: everything but loopback is dropped" if on else "off")
        return True

    def _change_failure_mode(self, fail_open: bool) -> None:
        """The failure mode lives in the kernel rules (queue bypass): re-install them."""
        assert self.spec is not None
        failed = "reload: failure mode not changed, rules not re-installed"
        if not self.options.worker and not self._reinstall(replace(self.spec, bypass=fail_open), failed):
            return
        self.fail_open = fail_open
        if self.adapter is not None:
            self.adapter.fail_open = fail_open
        log.info("failure mode now %s", "open" if fail_open else "closed")

    def _reinstall(self, spec: QueueSpec, failed: str) -> bool:
        """Install the kernel rules for `spec` and make it ours; on failure log `failed: why`."""
        if not self.firewall.reinstall(spec, failed):
            return False
        self.spec = spec
        return True

    def metric_records(self) -> list[Any] | None:
        """This worker's Prometheus families as records (None when it does not collect them)."""
        if self.collector is None:
            return None
        from nfqfw.observe import metrics

        return metrics.records(self.collector)

    def status_text(self) -> str:
        flows = len(getattr(self.engine, "conntrack", ()))
        verdicts = sum(getattr(self.engine, "counters", {}).values())
        rejects = self.counters()["reject sent"]
        panic = "PANIC MODE, " if self.spec is not None and self.spec.panic else ""
        counts = f"{verdicts} verdicts, {flows} flows, {rejects} rejects sent"
        return f"{panic}queue {self._queue_text()}: {counts}"

    def counters(self) -> dict[str, int]:
        assert self.adapter is not None
        return dict(self.adapter.counters)

    # -- signals --

    def _install_signal_handlers(self) -> None:
        handlers = (self._on_stop_signal, self._on_reload_signal, self._on_dump_signal)
        self._wakeup = install_signal_handlers(*handlers)

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        self._requests.stop = signal.Signals(signum).name
        if self.adapter is not None:
            self.adapter.wake()

    def _on_reload_signal(self, _signum: int, _frame: object) -> None:
        self._requests.reload = True
        if self.adapter is not None:
            self.adapter.wake()

    def _on_dump_signal(self, _signum: int, _frame: object) -> None:
        self._requests.dump = True
        if self.adapter is not None:
            self.adapter.wake()

    def _drain_wakeup(self) -> None:
        assert self._wakeup is not None
        try:
            while self._wakeup[0].recv(512):
                pass
        except BlockingIOError:
            pass

    def request_stop(self, why: str = "stop request") -> None:
        """Stop from code (tests, benchmarks), like SIGTERM does."""
        self._requests.stop = why
        if self.adapter is not None:
            self.adapter.wake()

    # -- stop --

    def stop(self) -> None:
        """Unbind and release everything; the kernel rules stay (fail-closed, see nfqfw.firewall.iptables)."""
        if "stop" not in self._requests.served:
            self._requests.served.add("stop")
            self.notifier.stopping("stopping")
        if self.engine is not None:  # exact: the kernel drops what comes until the next start
            self.state.save(self.engine, self.clock(), exact=not self.fail_open)
        self.packet_log.flush(self.clock(), force=True)
        self._log_counters()
        self.close()

    def _log_counters(self) -> None:
        engine_counters = getattr(self.engine, "counters", {}) or {}
        for name, value in sorted(engine_counters.items()):
            log.info("verdicts %s: %d", name, value)
        if self.adapter is not None:
            for name, value in self.adapter.counters.items():
                if value:
                    log.info("adapter %s: %d", name, value)

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.adapter is not None:
            self.adapter.unbind()
        if self.sender is not None:
            self.sender.close()
            self.sender = None
        if self.links is not None:
            self.links.close()
            self.links = None
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for sock in self._wakeup:
                sock.close()
            self._wakeup = None
        self.notifier.close()


def refused_reload(trigger: str, errors: list[str], notifier: Notifier, detail: str = "") -> ReloadResult:
    """Log a reload refused for `errors` (the running policy stays), tell systemd; its result."""
    errors = errors or ["reload failed"]
    for line in errors:
        log.error("reload: %s", line)
    log.error("reload failed: the running policy stays in force%s", detail)
    notifier.ready("reload failed: running policy kept")
    return ReloadResult(time.time(), trigger, False, tuple(errors))


def check_root_and_tools(firewall: Firewall) -> None:
    """Raises StartupError unless this runs as root and the firewall backend's tools are there."""
    if os.geteuid() != 0:
        raise StartupError("must run as root (to bind a netfilter queue and install iptables rules)")
    try:
        firewall.check()
    except RulesError as err:
        raise StartupError(str(err)) from err


SignalHandler = Callable[[int, Any], None]


def install_signal_handlers(
    on_stop: SignalHandler, on_reload: SignalHandler, on_dump: SignalHandler
) -> tuple[socket.socket, socket.socket]:
    """SIGTERM/SIGINT stop, SIGHUP reload, SIGUSR1 dump; returns the wake-up socket pair whose
    read end the poll loop watches (a signal writes a byte to it, so the poll returns)."""
    read, write = socket.socketpair()
    read.setblocking(False)
    write.setblocking(False)
    signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_reload)
    signal.signal(signal.SIGUSR1, on_dump)
    return read, write


def _snapshots_of_workers(state_dir: str) -> tuple[str, ...]:
    """Per-queue snapshots a run with --workers left: a single daemon started after it keeps their
    flows (switching --workers off must not cut the sessions)."""
    try:
        return queue_snapshots(os.listdir(state_dir))
    except OSError:
        return ()


def run_daemon(options: Options, **kwargs: Any) -> int:
    """Start, serve, stop; returns the process exit code."""
    daemon = Daemon(options, **kwargs)
    try:
        daemon.start()
    except StartupError as err:
        for line in str(err).splitlines() or ["start-up failed"]:
            print(f"nfqfw: {line}", file=sys.stderr)
        return 1
    try:
        daemon.loop()
    except Exception:
        log.exception("packet loop failed")
        daemon.stop()
        return 1
    daemon.stop()
    log.info("stopped; kernel rules left in place (nfqfw rules remove to take them away)")
    return 0


# --- logging ----------------------------------------------------------------------------------

# syslog priorities for journald's "<N>" line prefixes (sd-daemon(3))
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    """Under systemd (stderr connected to the journal): no timestamp, priority as '<N>' prefix."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITIES.get(record.levelno, 6)}>{super().format(record)}"


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for chatty in ("pyroute2", "asyncio"):  # their debug output is per netlink message
        logging.getLogger(chatty).setLevel(max(root.level, logging.WARNING))
