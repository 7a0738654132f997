"""The service core: what every nfqfw process that talks to systemd and the control socket has.

`ServiceCore` is the base of nfqfw.service.daemon.Daemon (one process filtering its queues;
`WorkerDaemon`, a worker of `--workers`, is one that leaves the kernel rules to its supervisor)
and of nfqfw.service.supervisor.Supervisor (the parent of the workers). It owns the lifecycle:

  start:  root (and the firewall's tools) -> the policy -> signal handlers -> `_start` (the
          specialisation binds its queues, or forks its workers) -> READY=1 (`_announce_ready`)
  loop:   poll(2) on the wake-up pipe, the control socket and the specialisation's `_readers`;
          housekeeping when it is due: signal flags, control socket, `_tend`, WATCHDOG=1, STATUS=
  reload: RELOADING=1, load and validate the file, `_apply_policy`, the failure mode, READY=1
          (with `confirm`: the policy it replaced is kept, and put back by the service's own timer
          unless `confirm()` comes first; `reload_preview` compares without changing anything)
  sets:   `set_request` (nfqfw set add/del/list) changes a set's runtime entries without a reload;
          with options watch-sets a changed set file is read again (`_watch_sets`)
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
- A reload with confirm is rolled back by housekeeping once its time is up, whatever became of
  the client that asked (the edit may have cut its session): the timer is the service's.
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
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from nfqfw import __version__
from nfqfw.control.flowlist import FlowFilter
from nfqfw.control.protocol import Chunks, ControlError, RequestError
from nfqfw.control.requests import Requests, kernel_queues
from nfqfw.control.server import ControlServer
from nfqfw.core.config import DEFAULT_LOG_LIMIT, SIDES, LogLimit, PolicyConfig
from nfqfw.firewall import Firewall, QueueSpec, RulesError, backend_named
from nfqfw.observe.endpoint import MetricsError
from nfqfw.observe.logsetup import use_format
from nfqfw.service.ha import HaState
from nfqfw.service.options import Options
from nfqfw.service.ruleset import nat, protection, queue_spec
from nfqfw.service.sdnotify import Notifier, watchdog_interval
from nfqfw.service.supervision import Counts, status_line

log = logging.getLogger("nfqfw")

STATUS_PERIOD = 10.0  # seconds between STATUS= updates
MAX_CUT_SHOWN = 1000  # flows a dry run lists (all are counted)


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
    files: Any = None  # the nfqfw.core.config.PolicyFiles it was read through (what it read)

    @property
    def config(self) -> Any:
        """The PolicyConfig."""
        return self.engine_policy.config


@dataclass(frozen=True)
class ReloadResult:
    """The outcome of a reload, for `nfqfw status` and `nfqfw reload`."""

    time: float  # wall clock
    trigger: str  # "SIGHUP" or "control request"
    ok: bool
    errors: tuple[str, ...] = ()  # the located errors of a refused policy
    removed: int | None = None  # flows removed by reload: recheck (None: reload: keep)
    confirm_within: float | None = None  # seconds to `nfqfw confirm` before it is rolled back


@dataclass(frozen=True)
class Applied:
    """How a valid policy was put in force (`_apply_policy`): ok unless some part refused it."""

    ok: bool = True
    errors: tuple[str, ...] = ()
    removed: int | None = None  # flows removed by reload: recheck (None: reload: keep)
    cut: tuple[Any, ...] = ()  # the flows removed (a daemon's), put back if the reload is rolled back


@dataclass
class PendingReload:
    """A reload with confirm, in force but not confirmed yet: the policy it replaced (as it was
    in force, its sets' contents included) comes back at `deadline` (monotonic; inf in a
    worker, whose supervisor decides), with the flows the new policy cut."""

    previous: Loaded
    deadline: float
    seconds: float  # as asked
    cut: list[Any] = field(default_factory=list)


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
    """Check the file mode, read and compile the policy (its includes and set files too);
    raises StartupError with the located errors."""
    from nfqfw.core.config import ConfigError, PolicyFiles, load_policy

    check_file_mode(path)
    files = PolicyFiles()
    try:
        config = load_policy(path, files)  # an unreadable file is a located ConfigError too
    except ConfigError as err:
        raise StartupError(str(err)) from err
    return loaded_from(config, files)


def load_policy_bundle(path: str) -> Loaded:
    """The policy in force as the supervisor of --workers bundled it (a worker's load)."""
    from nfqfw.core.config import ConfigError, load_bundle

    check_file_mode(path)
    try:
        with open(path, "rb") as file:
            data = file.read()
        config = load_bundle(data)
    except OSError as err:
        raise StartupError(f"{path}: cannot read: {err.strerror or err}") from err
    except ConfigError as err:
        raise StartupError(str(err)) from err
    return replace(loaded_from(config, None), source=data)


def loaded_from(config: Any, files: Any) -> Loaded:
    """A validated PolicyConfig compiled, with the options a service takes from it."""
    from nfqfw.core.policy import CompiledPolicy

    options = config.options
    use_format(options.log_format)  # the policy's log-format, for every log line from now on
    fail_open, recheck = options.failure_mode == "open", options.reload == "recheck"
    return Loaded(CompiledPolicy(config), fail_open, recheck, options.log_limit, files=files)


class ServiceCore:
    """The lifecycle every nfqfw service process shares (see the module docstring); a
    specialisation fills in the hooks below the `# -- hooks --` line.

    State: `spec` (the queues served, the mark, and the failure and panic modes as the kernel
    rules have them), `fail_open`, `last_reload`, the control socket, the metrics endpoint, the
    notifier, and `firewall`: the owner of the kernel rules, None in a process that leaves them
    to another (OWNS_RULES False). `live` turns True with READY=1 at the end of the start.
    """

    OWNS_RULES = True  # False: the kernel rules are another process's (a worker's supervisor's)
    OWNS_POLICY = True  # False: the policy (its confirm timer, its set files) is the supervisor's
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
        self.in_force: Loaded | None = None  # the policy in force, as loaded
        self.pending: PendingReload | None = None  # a reload with confirm, not confirmed yet
        self.set_errors: dict[str, str] = {}  # set -> why its changed file was not taken (watch-sets)
        self._set_stamps: dict[str, tuple[int, int, int] | None] = {}  # watched set file -> its stat
        self.ha = HaState()  # the HA role keepalived's notify script told (nfqfw.service.ha)

    # -- start --

    def start(self) -> None:
        """Everything up to READY=1 (for a supervisor: up to its workers' forks); raises
        StartupError after undoing what it did."""
        opts = self.options
        self._check_privileges()
        loaded = self._load_policy()
        self.fail_open = loaded.fail_open
        self.in_force = loaded
        self._stamp_set_files()
        self.spec = queue_spec(
            opts, loaded.engine_policy.config, bypass=loaded.fail_open, sets=self._kernel_sets()
        )
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
        self._check_nat_kernel_support(loaded)
        return loaded

    def _check_nat_kernel_support(self, loaded: Loaded) -> None:
        """A policy whose nat needs what this kernel's rules cannot do is refused, located: IPv6
        NAT (checked first), then sets in a nat `from` (the nat table has no other way to follow
        a set; the pre-filter leaves such rules to nfqfw, the nat table cannot)."""
        from nfqfw.core.config import ipv6_nat_issues, nat_set_issues

        config = getattr(loaded.engine_policy, "config", None)
        if self.firewall is None or config is None or config.nat is None:
            return
        checks = (
            (config.nat.ipv6_entries, self.firewall.ipv6_nat_missing, ipv6_nat_issues),
            (config.nat.set_entries, self.firewall.sets_missing, nat_set_issues),
        )
        for needed, missing_of, issues_of in checks:
            missing = missing_of() if needed() else None
            if missing is not None:
                raise StartupError("\n".join(str(issue) for issue in issues_of(config, missing)))

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
        self._runtime_entries_to_kernel()
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
        pending = self.pending
        if pending is not None and now >= pending.deadline:
            self._roll_back(f"reload not confirmed within {pending.seconds:g} s")
        self._watch_sets()
        due = now + self.PERIOD
        if self.pending is not None:
            due = min(due, self.pending.deadline)
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

    def reload(self, trigger: str = "SIGHUP", confirm: float | None = None) -> bool:
        """SIGHUP or a control request, run from housekeeping. True when the new policy is in force.

        With `confirm` (seconds) the policy it replaces is kept: unless `confirm()` comes within
        that time, housekeeping puts it back (`_roll_back`)."""
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
        previous = self.in_force
        applied = self._put_policy(loaded, confirm)
        within = self._await_confirmation(previous, applied, confirm)
        self.last_reload = ReloadResult(
            time.time(), trigger, applied.ok, applied.errors, applied.removed, confirm_within=within
        )
        self.notifier.ready("policy reloaded" if applied.ok else "reload incomplete: see the log")
        return applied.ok

    def _put_policy(self, loaded: Loaded, confirm: float | None = None) -> Applied:
        """A valid policy in force: the specialisation's part, the kernel rules, the failure mode."""
        applied = self._apply_policy(loaded, confirm)
        self.in_force = loaded
        self._follow_policy_in_the_rules(loaded)
        if loaded.fail_open != self.fail_open:
            self._change_failure_mode(loaded.fail_open)
        self._stamp_set_files()
        return applied

    def _await_confirmation(
        self, previous: Loaded | None, applied: Applied, confirm: float | None
    ) -> float | None:
        """After a reload: with `confirm`, keep what to roll back to (the oldest unconfirmed
        one's predecessor, if reloads follow each other); without, a waiting reload is confirmed
        by this one. Returns the seconds given to confirm."""
        pending = self.pending
        if confirm is None or not applied.ok:
            if pending is not None and applied.ok:
                log.info("the reload waiting for confirmation is confirmed by a reload without --confirm")
                self.pending = None
            return None
        deadline = self.clock() + confirm if self.OWNS_POLICY else math.inf
        if pending is None:
            if previous is None:
                return None
            pending = self.pending = PendingReload(previous, deadline, confirm)
        pending.deadline, pending.seconds = deadline, confirm
        pending.cut += applied.cut
        log.warning(
            "the new policy is on trial: 'nfqfw confirm' within %g s keeps it, else the policy before "
            "(sha256 %s) comes back",
            confirm,
            pending.previous.config.sha256[:12],
        )
        return confirm

    def confirm(self, rollback: bool = False) -> dict[str, Any]:
        """`nfqfw confirm`: the reload on trial stays (or, with rollback, is undone now)."""
        pending = self.pending
        if rollback:
            if pending is None:
                return self._roll_back_without_trial()
            self._roll_back("rollback asked")
            return {"rolled_back": True, "sha256": self.policy_sha256()}
        if pending is None:
            raise RequestError("nothing to confirm: no reload with --confirm is waiting")
        self.pending = None
        left = pending.deadline - self.clock()
        self._confirmed()
        log.info(
            "reload confirmed%s: the new policy stays",
            f" ({left:.0f} s before its rollback)" if left < math.inf else "",
        )
        return {"confirmed": True, "sha256": self.policy_sha256()}

    def _roll_back(self, why: str) -> None:
        """The policy before the reload on trial comes back (and the flows that reload cut)."""
        pending = self.pending
        assert pending is not None
        self.pending = None
        log.warning(
            "%s: back to the policy in force before it (sha256 %s)", why, pending.previous.config.sha256[:12]
        )
        self.notifier.reloading("rolling the policy back")
        applied = self._apply_rollback(pending)
        self.in_force = pending.previous
        self._follow_policy_in_the_rules(pending.previous)
        if pending.previous.fail_open != self.fail_open:
            self._change_failure_mode(pending.previous.fail_open)
        self._stamp_set_files()
        self.last_reload = ReloadResult(
            time.time(), f"rollback: {why}", applied.ok, applied.errors, applied.removed
        )
        self.notifier.ready("policy rolled back" if applied.ok else "rollback incomplete: see the log")

    def reload_preview(self, candidate: bool = False) -> dict[str, Any]:
        """`nfqfw reload --dry-run`: the file on disk checked and compared with the policy in force,
        and the flows it would cut; nothing changes."""
        from nfqfw.core.diff import policy_diff

        try:
            loaded = self._load_candidate() if candidate else self._load_policy()
        except StartupError as err:
            return {"ok": False, "errors": str(err).splitlines() or ["invalid"]}
        current = self.policy_config()
        cut, unanswered = self._cut_preview(loaded)
        return {
            "ok": True,
            "sha256": loaded.config.sha256,
            "in_force": current.sha256,
            "changes": policy_diff(current, loaded.config),
            "recheck": loaded.recheck,
            "cut_total": len(cut),
            "cut": cut[:MAX_CUT_SHOWN],
            "unanswered": unanswered,
            "errors": [],
        }

    # -- sets --

    def set_request(self, op: str, name: str, addr: str | None, timeout: float | None) -> dict[str, Any]:
        """`nfqfw set add|del|list NAME [ADDR]`: a runtime entry of one of the policy's sets."""
        from nfqfw.core.sets import parse_entry

        config = self.policy_config()
        if name not in config.sets:
            known = ", ".join(config.sets) or "none"
            raise RequestError(f"set: the policy has no set '{name}' (its sets: {known})")
        if op == "list":
            return self._set_list(name)
        try:
            network = parse_entry(str(addr))
        except ValueError as err:
            raise RequestError(f"set {op}: {err}") from None
        result = self._set_change(name, network, op == "add", timeout)
        what = "added to" if op == "add" else "deleted from"
        if result["changed"]:
            until = f" for {timeout:g} s" if timeout is not None else ""
            cut = f", {result['removed']} flows cut" if result.get("removed") else ""
            log.info("set %s: %s %s%s%s", name, network, what, until, cut)
        return result

    def _watch_sets(self) -> None:
        """options watch-sets: a set file that changed on disk is read again, checked as at
        reload; a broken one keeps the set as it was (and `status` says why)."""
        loaded = self.in_force
        if not self.OWNS_POLICY or loaded is None or not loaded.config.options.watch_sets:
            return
        for path, name in loaded.config.set_files().items():
            stamp = _stamp(path)
            if stamp == self._set_stamps.get(path):
                continue
            self._set_stamps[path] = stamp
            self._refresh_set(name, path)

    def _refresh_set(self, name: str, path: str) -> None:
        import copy

        from nfqfw.core.config import ConfigError, PolicyFiles, refresh_set

        loaded = self.in_force
        assert loaded is not None
        files = copy.copy(loaded.files) if loaded.files is not None else PolicyFiles()
        if loaded.files is not None:
            files.read_files, files.globs = dict(loaded.files.read_files), dict(loaded.files.globs)
        try:
            config = refresh_set(loaded.config, name, files)
        except ConfigError as err:
            self.set_errors[name] = "; ".join(str(issue) for issue in err.issues[:3])
            for issue in err.issues:
                log.error("set %s: %s", name, issue)
            log.error("set %s: %s changed but is not valid: the set keeps its contents", name, path)
            return
        self.set_errors.pop(name, None)
        if config.sha256 == loaded.config.sha256:
            return
        fresh = replace(loaded_from(config, files), source=b"")
        fresh = self._with_source(fresh)
        applied = self._put_policy(fresh)
        removed = f", {applied.removed} flows cut" if applied.removed else ""
        log.info(
            "set %s: %s changed: read again (%d networks)%s",
            name,
            path,
            config.sets[name].content.written,
            removed,
        )

    def _stamp_set_files(self) -> None:
        loaded = self.in_force
        if loaded is None:
            return
        self._set_stamps = {path: _stamp(path) for path in loaded.config.set_files()}

    def _follow_policy_in_the_rules(self, loaded: Loaded) -> None:
        """The kernel's pre-filter and caps are derived from the policy: re-install them when a
        reload changed them (a process that owns the rules)."""
        if self.firewall is None or self.spec is None:
            return
        config = loaded.engine_policy.config
        spec = replace(
            self.spec, protection=protection(self.options, config, sets=self._kernel_sets()), nat=nat(config)
        )
        if spec != self.spec and self.firewall.reinstall(
            spec, "reload: the kernel's pre-filter, caps and nat rules not updated"
        ):
            self.spec = spec
            self._runtime_entries_to_kernel()

    def _kernel_sets(self) -> bool:
        """Can the kernel rules match the policy's sets (a process that owns the rules)?"""
        return self.firewall is not None and self.firewall.supports_sets()

    def _runtime_entries_to_kernel(self) -> None:
        """After the kernel's sets (the pre-filter's and the nat table's) were (re)filled with the
        policy's networks: the runtime entries of those sets too, with the time they have left."""
        if self.spec is None or not self.spec.ipsets:
            return
        runtime, now = self.runtime_sets(), self.clock()
        for name in sorted({ipset.name for ipset in self.spec.ipsets}):
            if name not in runtime:
                continue
            for entry in runtime.entries(name).entries():
                left = None if entry.expires is None else max(1.0, entry.expires - now)
                self._kernel_set_entry(name, entry.network, True, left)

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

    # -- HA role --

    def set_ha_role(self, role: str, conntrackd: str | None = None) -> dict[str, Any]:
        """`nfqfw ha role`: keep the role (and conntrackd's configuration, for its statistics)
        and act on it (nfqfw.service.ha); what was done, for the answer."""
        previous = self.ha.role
        if role != previous:
            self.ha.since = time.time()
        self.ha.role = role
        if conntrackd is not None:
            self.ha.conntrackd_conf = conntrackd
        done = self._ha_role_changed(role)
        log.info(
            "HA role %s (was %s)%s",
            role,
            previous or "not told",
            "".join(f", {what} {count}" for what, count in done.items()),
        )
        return {"role": role, "previous": previous, **done}

    def _ha_role_changed(self, role: str) -> dict[str, int]:
        """What the service does on taking `role` (counts by what); the Daemon and the Supervisor."""
        return {}

    # -- the status answer --

    def status(self, talkers: int | None = None) -> dict[str, Any]:
        """The answer to `nfqfw status`: what every service says of itself, and its counts
        (with the `talkers` addresses in the most flows, where the service can tell)."""
        from nfqfw.core.config import digest_on_disk
        from nfqfw.service.setstate import sets_status

        assert self.spec is not None
        now = self.clock()
        policy = self.policy_config()
        pending = self.pending
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "uptime": now - self.started_mono,
            "policy": {
                "file": self.options.config,
                "sha256": self.policy_sha256(),
                "file_sha256": digest_on_disk(policy),
                "files": len(policy.sources),
                "sets": sets_status(policy, self.runtime_sets(), self.set_errors),
                "comments": comments(policy),
                "pending_confirm": None
                if pending is None
                else {
                    "rollback_in": pending.deadline - now if pending.deadline < math.inf else None,
                    "previous_sha256": pending.previous.config.sha256,
                },
            },
            "last_reload": None if self.last_reload is None else asdict(self.last_reload),
            "queue": self.spec.queue_text,
            "failure_mode": "open" if self.fail_open else "closed",
            "panic": bool(self.spec.panic),
            **self._status_counts(now, talkers),
            "kernel_queues": kernel_queues(self.spec.bound_queues),
            "kernel_drops": self.kernel_drops(),
            "ha": self.ha.status(),
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

    def _apply_policy(self, loaded: Loaded, confirm: float | None = None) -> Applied:
        """Put a validated policy in force (reload; `confirm`: on trial); logs the outcome."""
        raise NotImplementedError

    def _apply_rollback(self, pending: PendingReload) -> Applied:
        """Put `pending.previous` back in force (and what the reload on trial cut)."""
        raise NotImplementedError

    def _roll_back_without_trial(self) -> dict[str, Any]:
        """A rollback asked where no reload is on trial (a worker that restarted meanwhile)."""
        raise RequestError("nothing to roll back: no reload with --confirm is waiting")

    def _confirmed(self) -> None:
        """The reload on trial was confirmed (a supervisor tells its workers)."""

    def _load_candidate(self) -> Loaded:
        """The candidate a supervisor wrote for a dry run (a worker's)."""
        raise StartupError("no candidate policy here")

    def _with_source(self, loaded: Loaded) -> Loaded:
        """A policy read again (a set file) with what the specialisation keeps of it (a
        supervisor: the bundle its workers load)."""
        return loaded

    def _cut_preview(self, loaded: Loaded) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The flows `loaded` would cut, as flow records with what would now decide (and the
        workers that did not answer)."""
        raise NotImplementedError

    def policy_config(self) -> Any:
        """The PolicyConfig in force."""
        assert self.in_force is not None
        return self.in_force.config

    def runtime_sets(self) -> Any:
        """The sets' runtime entries (a nfqfw.core.sets.RuntimeSets)."""
        raise NotImplementedError

    def _set_change(self, name: str, network: Any, add: bool, timeout: float | None) -> dict[str, Any]:
        """A runtime entry added or deleted: in force, saved, in the kernel's sets."""
        raise NotImplementedError

    def _kernel_set_entry(self, name: str, network: Any, add: bool, timeout: float | None) -> None:
        """A set the kernel rules hold for the entry's family (an ipset of the pre-filter or the
        nat table) takes the runtime entry too; a failure is logged (the pre-filter then only
        lets through what nfqfw decides about, the nat table does not translate the entry)."""
        if self.firewall is None or self.spec is None or not self.spec.matches_set(name, network.version):
            return
        try:
            self.firewall.set_entry(name, network.version, str(network), add, timeout)
        except RulesError as err:
            log.error("set %s: %s not changed in the kernel's sets: %s", name, network, err)

    def _set_list(self, name: str) -> dict[str, Any]:
        from nfqfw.service.setstate import set_listing

        return set_listing(self.policy_config(), name, self.runtime_sets(), self.clock())

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


def comments(policy: PolicyConfig) -> dict[str, str]:
    """The comments of the policy's rules and forwards, by name (names are unique across both)."""
    found = {rule.name: rule.comment for side in SIDES for rule in policy.rules(side) if rule.comment}
    if policy.nat is not None:
        found.update({forward.name: forward.comment for forward in policy.nat.forward if forward.comment})
    return found


def _stamp(path: str) -> tuple[int, int, int] | None:
    """What tells a changed file: (inode, size, mtime in ns); None when it cannot be read."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


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
