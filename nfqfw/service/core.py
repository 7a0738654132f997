"""The service core: what every nfqfw process that talks to systemd and the control socket has.

`ServiceCore` is the base of nfqfw.service.daemon.Daemon (one process filtering its queues;
`WorkerDaemon`, a worker of `--workers`, is one that leaves the kernel rules to its supervisor)
and of nfqfw.service.supervisor.Supervisor (the parent of the workers). It owns the lifecycle:

  start:  root (and the firewall's tools) -> the policy -> signal handlers -> `_start` (the
          specialisation binds its queues, or forks its workers) -> READY=1 (`_announce_ready`)
  loop:   poll(2) on the wake-up pipe, the control socket and the specialisation's `_readers`;
          housekeeping when it is due: signal flags, control socket, `_tend`, WATCHDOG=1, STATUS=
  reload: RELOADING=1, load and validate the file, `_apply_policy`, the failure mode, READY=1
  panic:  re-install the kernel rules with panic mode on or off
  stop:   "<signal> received: stopping", STOPPING=1, `_stop_serving`, `_wind_down`, `close`

Invariants:
- Signal handlers only set a flag and wake the loop; the work is done in housekeeping, which in
  a daemon runs between two packets (also from the packet callback under a flood).
- RELOADING=1 ... READY=1 surround every reload, valid or refused; STOPPING=1 is sent once.
- The kernel rules change only through `firewall`, which only the owner of the rules holds (the
  single daemon, the supervisor); a worker's is None, and it never touches the rules. A failed
  change is logged and leaves the rules and `spec` as they were.
- The rules stay after a stop (fail-closed); `nfqfw rules remove` takes them away.
- A policy file writable by group or others is refused, at start and at reload.
- Control requests (nfqfw.control.requests) are served from the loop and from housekeeping
  only, so never before start() has returned.
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
from dataclasses import asdict, dataclass, replace
from typing import Any

from nfqfw import __version__
from nfqfw.control.flowlist import FlowFilter
from nfqfw.control.protocol import Chunks, ControlError
from nfqfw.control.requests import Requests, file_sha256, kernel_queues
from nfqfw.control.server import ControlServer
from nfqfw.core.config import DEFAULT_LOG_LIMIT, LogLimit
from nfqfw.firewall import Firewall, QueueSpec, RulesError, backend_named
from nfqfw.observe.endpoint import MetricsError
from nfqfw.observe.logsetup import use_format
from nfqfw.service.options import Options
from nfqfw.service.ruleset import nat, protection, queue_spec
from nfqfw.service.sdnotify import Notifier, watchdog_interval
from nfqfw.service.supervision import Counts, status_line

log = logging.getLogger("nfqfw")

STATUS_PERIOD = 10.0  # seconds between STATUS= updates


class StartupError(Exception):
    """Start-up cannot proceed; the lines of str() are printed as they are."""


@dataclass
class Loaded:
    """What a service takes from the policy file."""

    engine_policy: Any  # a CompiledPolicy
    fail_open: bool  # policy option failure-mode: open
    recheck: bool = True  # policy option reload: recheck (False: keep)
    log_limit: LogLimit = DEFAULT_LOG_LIMIT  # policy options log-limit, log-limit-burst
    source: bytes = b""  # the validated bytes, when they are kept (the supervisor's policy copy)


@dataclass(frozen=True)
class ReloadResult:
    """The outcome of a reload, for `nfqfw status` and `nfqfw reload`."""

    time: float  # wall clock
    trigger: str  # "SIGHUP" or "control request"
    ok: bool
    errors: tuple[str, ...] = ()  # the located errors of a refused policy
    removed: int | None = None  # flows removed by reload: recheck (None: reload: keep)


@dataclass(frozen=True)
class Applied:
    """How a valid policy was put in force (`_apply_policy`): ok unless some part refused it."""

    ok: bool = True
    errors: tuple[str, ...] = ()
    removed: int | None = None  # flows removed by reload: recheck (None: reload: keep)


@dataclass
class _Signals:
    """Set by the signal handlers (and request_stop), acted on in housekeeping."""

    stop: str | None = None  # why: the signal's name, or the caller's words
    reload: bool = False
    dump: bool = False  # SIGUSR1
    stop_announced: bool = False


@dataclass
class _Schedule:
    status: float = 0.0  # STATUS= due
    watchdog: float = math.inf  # WATCHDOG=1 due (inf until READY=1, or without a watchdog)
    watchdog_every: float | None = None


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
    use_format(options.log_format)  # the policy's log-format, for every log line from now on
    fail_open, recheck = options.failure_mode == "open", options.reload == "recheck"
    return Loaded(CompiledPolicy(config), fail_open, recheck, options.log_limit)


class ServiceCore:
    """The lifecycle every nfqfw service process shares (see the module docstring); a
    specialisation fills in the hooks below the `# -- hooks --` line.

    State: `spec` (the queues served, the mark, and the failure and panic modes as the kernel
    rules have them), `fail_open`, `last_reload`, the control socket, the metrics endpoint, the
    notifier, and `firewall`: the owner of the kernel rules, None in a process that leaves them
    to another (OWNS_RULES False). `live` turns True with READY=1 at the end of the start.
    """

    OWNS_RULES = True  # False: the kernel rules are another process's (a worker's supervisor's)
    PERIOD = 1.0  # seconds between housekeeping rounds when nothing else is due
    LOOP = "packet loop"  # for the log line of a loop that failed
    REFUSED = ""  # appended to the log line of a refused reload

    def __init__(
        self,
        options: Options,
        *,
        load: Callable[[str], Loaded] = load_policy_file,
        notifier: Notifier | None = None,
        firewall: Firewall | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self._load = load
        self.notifier = notifier or Notifier()
        self.firewall = (firewall or backend_named()) if self.OWNS_RULES else None
        self.clock = clock
        self.spec: QueueSpec | None = None
        self.fail_open = False
        self.live = False
        self.control: ControlServer | None = None
        self.metrics: Any = None  # a nfqfw.observe.metrics.MetricsServer with --metrics
        self.started = time.time()
        self.started_mono = clock()
        self.last_reload: ReloadResult | None = None
        self.failure: str | None = None  # why a running service gives up (exit code 1)
        self._signals = _Signals()
        self._schedule = _Schedule()
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._due = 0.0  # housekeeping due (a daemon keeps it in its adapter instead)

    # -- start --

    def start(self) -> None:
        """Everything up to READY=1 (for a supervisor: up to its workers' forks); raises
        StartupError after undoing what it did."""
        opts = self.options
        self._check_privileges()
        loaded = self._load_policy()
        self.fail_open = loaded.fail_open
        self.spec = queue_spec(opts, loaded.engine_policy.config, bypass=loaded.fail_open)
        try:
            self._install_signal_handlers()
            self._schedule.watchdog_every = watchdog_interval()
            self._start(loaded)
        except StartupError:
            self.close()
            raise

    def _check_privileges(self) -> None:
        if os.geteuid() != 0:
            raise StartupError("must run as root (to bind a netfilter queue and install iptables rules)")
        if self.firewall is not None:
            try:
                self.firewall.check()
            except RulesError as err:
                raise StartupError(str(err)) from err

    def _load_policy(self) -> Loaded:
        loaded = self._load(self.options.config)
        self._check_ipv6_nat(loaded)
        return loaded

    def _check_ipv6_nat(self, loaded: Loaded) -> None:
        """A policy that translates IPv6 on a kernel without IPv6 NAT is refused, located."""
        from nfqfw.core.config import ipv6_nat_issues

        config = getattr(loaded.engine_policy, "config", None)
        if self.firewall is None or config is None or config.nat is None or not config.nat.ipv6_entries():
            return
        missing = self.firewall.ipv6_nat_missing()
        if missing is not None:
            raise StartupError("\n".join(str(issue) for issue in ipv6_nat_issues(config, missing)))

    def _open_control(self) -> None:
        """The control socket (RUNTIME_DIR/control.sock); StartupError when another daemon has it."""
        try:
            self.control = ControlServer.open(self.options.runtime_dir, Requests(self), clock=self.clock)
        except ControlError as err:
            raise StartupError(str(err)) from err

    def _start_metrics(self) -> None:
        """--metrics: the Prometheus endpoint, started before any queue is bound (a port that
        cannot be bound fails the start)."""
        if self.options.metrics is None:
            return
        host, port = self.options.metrics
        try:
            self.metrics, note = self._serve_metrics(host, port, self.options.metrics_allow_remote)
        except MetricsError as err:
            raise StartupError(str(err)) from err
        log.info("metrics on http://%s/metrics%s", self.metrics.address, note)

    def _install_rules(self) -> str:
        """The kernel rules for `spec`, keeping a panic mode left on by an earlier run; says
        what was done, for the log. Raises StartupError."""
        if self.firewall is None:
            return "rules left to the supervisor"
        assert self.spec is not None
        try:
            self.spec = self.firewall.install_keeping_panic(self.spec)
        except RulesError as err:
            raise StartupError(str(err)) from err
        return "rules installed"

    def _announce_ready(self, status: str) -> None:
        """Start-up is complete: READY=1, and the watchdog pings begin."""
        self.live = True
        if self._schedule.watchdog_every is not None:
            self._schedule.watchdog = self.clock()
        self.notifier.ready(status)

    # -- loop --

    def loop(self) -> int:
        """Serve until a stop is asked: 0; 1 when the service gave up (`failure`, printed)."""
        assert self._wakeup is not None
        handlers: dict[int, Callable[[], object]] = {self._wakeup[0].fileno(): self._drain_wakeup}
        if self.control is not None:
            handlers[self.control.fileno()] = self.control.service
        handlers.update(self._readers())
        poller = select.poll()
        for fd in handlers:
            poller.register(fd, select.POLLIN)
        self._wake()
        while self._signals.stop is None and self.failure is None:
            wait = max(0.0, self._housekeeping_due() - self.clock())
            for fd, _ in poller.poll(math.ceil(wait * 1000)):
                if self._signals.stop is not None:
                    break  # a stop unbinds the queues: their descriptors may be gone
                handlers[fd]()
            now = self.clock()
            if now >= self._housekeeping_due():
                self._run_housekeeping(now)
        if self.failure is not None:
            for line in self.failure.splitlines():
                print(f"nfqfw: {line}", file=sys.stderr)
            return 1
        return 0

    def _housekeeping(self, now: float) -> float:
        """One round of periodic work; returns when the next one is due."""
        signals = self._signals
        if signals.stop is not None:
            self._announce_stop()
            self._stop_serving()
            return math.inf
        if not self._serving(now):
            return now + self.PERIOD
        if signals.reload:
            signals.reload = False
            self.reload()
        if signals.dump:
            signals.dump = False
            self._dump()
        due = now + self.PERIOD
        if self.control is not None:
            self.control.service()  # also times out idle clients when no socket event comes
            due = min(due, self.control.next_due(now))
        return min(due, self._tend(now), self._notify_systemd(now))

    def _notify_systemd(self, now: float) -> float:
        """WATCHDOG=1 while `_healthy`, STATUS= every STATUS_PERIOD; returns the next ping's time."""
        schedule = self._schedule
        if now >= schedule.watchdog and schedule.watchdog_every is not None and self._healthy(now):
            schedule.watchdog = now + schedule.watchdog_every
            self.notifier.watchdog()
        if now >= schedule.status:
            schedule.status = now + STATUS_PERIOD
            self._report_status()
        return schedule.watchdog if schedule.watchdog > now else math.inf

    def _report_status(self) -> None:
        self.notifier.status(self.status_text())

    def status_text(self) -> str:
        """The STATUS= line: panic mode, the queues and the counts."""
        assert self.spec is not None
        return status_line(self.spec.queue_text, self.spec.panic, self.counts(), self._workers_up())

    # -- reload, panic, failure mode --

    def reload(self, trigger: str = "SIGHUP") -> bool:
        """SIGHUP or a control request, run from housekeeping. True when the new policy is in force."""
        why = "SIGHUP received" if trigger == "SIGHUP" else trigger
        log.info("%s: reloading %s", why, self.options.config)
        self.notifier.reloading("reloading the policy")
        try:
            loaded = self._load_policy()
        except StartupError as err:
            errors = str(err).splitlines() or ["reload failed"]
            for line in errors:
                log.error("reload: %s", line)
            log.error("reload failed: the running policy stays in force%s", self.REFUSED)
            self.notifier.ready("reload failed: running policy kept")
            self.last_reload = ReloadResult(time.time(), trigger, False, tuple(errors))
            return False
        applied = self._apply_policy(loaded)
        self._follow_policy_in_the_rules(loaded)
        if loaded.fail_open != self.fail_open:
            self._change_failure_mode(loaded.fail_open)
        self.last_reload = ReloadResult(time.time(), trigger, applied.ok, applied.errors, applied.removed)
        self.notifier.ready("policy reloaded" if applied.ok else "reload incomplete: see the log")
        return applied.ok

    def _follow_policy_in_the_rules(self, loaded: Loaded) -> None:
        """The kernel's pre-filter and caps are derived from the policy: re-install them when a
        reload changed them (a process that owns the rules)."""
        if self.firewall is None or self.spec is None:
            return
        config = loaded.engine_policy.config
        spec = replace(self.spec, protection=protection(self.options, config), nat=nat(config))
        if spec != self.spec and self.firewall.reinstall(
            spec, "reload: the kernel's pre-filter, caps and nat rules not updated"
        ):
            self.spec = spec

    def set_panic(self, on: bool) -> bool:
        """Panic mode on/off in the kernel rules (nfqfw panic); False when they could not be installed."""
        assert self.spec is not None
        if self.firewall is None:
            log.error("panic mode is changed by the supervisor, not by a worker")
            return False
        spec = replace(self.spec, panic=on)
        if not self.firewall.reinstall(spec, "panic mode not changed"):
            return False
        if on != self.spec.panic:
            log.warning("panic mode %s", "on: everything but loopback is dropped" if on else "off")
        self.spec = spec
        return True

    def _change_failure_mode(self, fail_open: bool) -> None:
        """The failure mode lives in the kernel rules (the queue bypass): re-install them."""
        assert self.spec is not None
        spec = replace(self.spec, bypass=fail_open)
        failed = "reload: failure mode not changed, rules not re-installed"
        if self.firewall is not None and not self.firewall.reinstall(spec, failed):
            return
        self.spec, self.fail_open = spec, fail_open
        self._failure_mode_changed(fail_open)
        log.info("failure mode now %s", "open" if fail_open else "closed")

    # -- the status answer --

    def status(self, talkers: int | None = None) -> dict[str, Any]:
        """The answer to `nfqfw status`: what every service says of itself, and its counts
        (with the `talkers` addresses in the most flows, where the service can tell)."""
        assert self.spec is not None
        now = self.clock()
        config = self.options.config
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "uptime": now - self.started_mono,
            "policy": {"file": config, "sha256": self.policy_sha256(), "file_sha256": file_sha256(config)},
            "last_reload": None if self.last_reload is None else asdict(self.last_reload),
            "queue": self.spec.queue_text,
            "failure_mode": "open" if self.fail_open else "closed",
            "panic": bool(self.spec.panic),
            **self._status_counts(now, talkers),
            "kernel_queues": kernel_queues(self.spec.bound_queues),
            "kernel_drops": self.kernel_drops(),
        }

    def kernel_drops(self) -> dict[str, int] | None:
        """What nfqfw's kernel rules dropped or rejected before the queues, "ACTION REASON" ->
        packets (both families; `nfqfw rules counters`), read from the kernel now: at a status
        request or a scrape, never per packet. None in a process without the rules (a worker:
        its supervisor answers) or when they cannot be read (logged)."""
        if self.firewall is None:
            return None
        try:
            return self.firewall.counters()
        except RulesError as err:
            log.warning("cannot read the kernel rules' counters: %s", err)
            return None

    # -- signals --

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reload, SIGUSR1 dump; a signal also writes a byte to the
        wake-up socket pair, whose read end the poll loop watches."""
        read, write = socket.socketpair()
        read.setblocking(False)
        write.setblocking(False)
        self._wakeup = read, write
        signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)
        signal.signal(signal.SIGUSR1, self._on_dump_signal)

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        self.request_stop(signal.Signals(signum).name)

    def _on_reload_signal(self, _signum: int, _frame: object) -> None:
        self._signals.reload = True
        self._wake()

    def _on_dump_signal(self, _signum: int, _frame: object) -> None:
        self._signals.dump = True
        self._wake()

    @property
    def stopping(self) -> bool:
        """A stop was asked."""
        return self._signals.stop is not None

    def request_stop(self, why: str = "stop request") -> None:
        """Stop, as SIGTERM does (signal handlers, tests, benchmarks)."""
        self._signals.stop = why
        self._wake()

    def _drain_wakeup(self) -> None:
        assert self._wakeup is not None
        try:
            while self._wakeup[0].recv(512):
                pass
        except BlockingIOError:
            pass

    # -- stop --

    def stop(self) -> None:
        """Wind down and release everything; the kernel rules stay (fail-closed)."""
        self._announce_stop()
        self._wind_down()
        self.close()

    def _announce_stop(self) -> None:
        """Once: why, in the log, and STOPPING=1."""
        signals = self._signals
        if signals.stop_announced:
            return
        signals.stop_announced = True
        if signals.stop is not None:
            log.info("%s received: stopping", signals.stop)
        self.notifier.stopping("stopping")

    def close(self) -> None:
        """Release every resource; safe to call again, and after a start that failed half-way."""
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self._release()
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for sock in self._wakeup:
                sock.close()
            self._wakeup = None
        self.notifier.close()

    # -- hooks --

    def _start(self, loaded: Loaded) -> None:
        """The specialisation's start, after the policy and the signal handlers; ends with
        `_announce_ready` once it serves. Raises StartupError (the core then closes)."""
        raise NotImplementedError

    def _serve_metrics(self, host: str, port: int, allow_remote: bool) -> tuple[Any, str]:
        """The metrics endpoint and a note for its log line (MetricsError)."""
        raise NotImplementedError

    def _readers(self) -> dict[int, Callable[[], object]]:
        """More descriptors for the poll loop: fd -> what to call when it is readable."""
        return {}

    def _housekeeping_due(self) -> float:
        return self._due

    def _run_housekeeping(self, now: float) -> None:
        self._due = self._housekeeping(now)

    def _wake(self) -> None:
        """Make housekeeping run at once (from a signal handler)."""
        self._due = 0.0

    def request_refusal(self) -> str | None:
        """Why control requests cannot be answered yet (None: they can)."""
        return None

    def _serving(self, now: float) -> bool:
        """False while the service cannot act on requests yet (a supervisor's workers start)."""
        return True

    def _tend(self, now: float) -> float:
        """The specialisation's periodic work; returns when it wants to run next."""
        return math.inf

    def _healthy(self, now: float) -> bool:
        """May WATCHDOG=1 go out now? (A supervisor: only while every worker is.)"""
        return True

    def _dump(self) -> None:
        """SIGUSR1."""

    def _apply_policy(self, loaded: Loaded) -> Applied:
        """Put a validated policy in force (reload); logs the outcome."""
        raise NotImplementedError

    def _failure_mode_changed(self, fail_open: bool) -> None:
        """After a failure mode change (the kernel rules are done)."""

    def policy_sha256(self) -> str:
        """The sha256 of the policy in force."""
        raise NotImplementedError

    def counts(self) -> Counts:
        """Verdicts, flows and rejects sent, for the STATUS= line."""
        raise NotImplementedError

    def _workers_up(self) -> tuple[int, int] | None:
        """(workers up, workers) for the STATUS= line of a supervisor."""
        return None

    def _status_counts(self, now: float, talkers: int | None) -> dict[str, Any]:
        """The status answer's counts: gso, flows, verdicts, adapter (a supervisor: summed, and
        its workers), and the `talkers` addresses in the most flows when asked."""
        raise NotImplementedError

    def flows(self, request: dict[str, Any], selection: FlowFilter) -> Chunks:
        """The answer to `flows` (streamed)."""
        raise NotImplementedError

    def flush(self, request: dict[str, Any], selection: FlowFilter) -> dict[str, Any]:
        """The answer to `flush`."""
        raise NotImplementedError

    def metric_records(self) -> list[Any]:
        """The answer to `metrics`: Prometheus families as records; RequestError when not collected."""
        raise NotImplementedError

    def _stop_serving(self) -> None:
        """A stop was asked: stop taking new work at once (from housekeeping)."""

    def _wind_down(self) -> None:
        """Before close at a stop: save what must survive the restart."""

    def _release(self) -> None:
        """Close the specialisation's resources (from close: idempotent)."""


def run_service(service: ServiceCore) -> int:
    """Start, serve, stop; returns the process exit code."""
    try:
        service.start()
    except StartupError as err:
        for line in str(err).splitlines() or ["start-up failed"]:
            print(f"nfqfw: {line}", file=sys.stderr)
        return 1
    try:
        code = service.loop()
    except Exception:
        log.exception("%s failed", service.LOOP)
        code = 1
    service.stop()
    if code == 0:
        log.info("stopped; kernel rules left in place (nfqfw rules remove to take them away)")
    return code
