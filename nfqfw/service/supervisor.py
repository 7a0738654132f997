"""`nfqfw run --queue-balance A:B --workers`: one worker process per queue, and their supervisor.

Why: the kernel spreads flows over the queues of `--queue-balance` by a hash of addresses and
protocol, the same for both directions of a flow, and the engine has no state shared between
flows of different address pairs. So each queue can be served by a process of its own, with
an Engine of its own, and a gateway with several cores uses them.

Processes. The supervisor (this module, the service's main process) validates the policy,
copies the validated bytes to RUNTIME_DIR/workers/policy.yaml (the policy in force: a worker
started or restarted later reads that copy, never a file edited since) and forks one worker per
queue. A worker is nfqfw.service.daemon.Daemon in worker mode on its queue: its own Engine, its own
flow snapshot (STATE_DIR/flows.queue-N.snapshot), its own control socket
RUNTIME_DIR/workers/qN/control.sock; it installs no kernel rules. Its sd_notify messages go to
the supervisor (RUNTIME_DIR/workers/qN.notify, $NOTIFY_SOCKET in the worker): READY=1 once its
queue is bound, WATCHDOG=1 every PING_EVERY seconds from its housekeeping (also under a flood),
STATUS= with its counts. A worker gets SIGKILL when the supervisor dies (PR_SET_PDEATHSIG), so
no orphan keeps a queue bound.

The supervisor installs the kernel rules (one rule set, `--queue-balance A:B`; failure mode and
panic as for the single daemon, nfqfw.firewall.iptables) once every worker is ready, and then sends READY=1
to systemd. It keeps the sd_notify conversation: RELOADING=1/READY=1 around a reload,
STOPPING=1, a STATUS= line summing the workers' counts, and WATCHDOG=1 only while every worker
is alive, ready and pinging (a heartbeat within HEARTBEAT_STALE seconds; a manager with a
short WatchdogSec= then restarts the whole service). A worker that has not pinged for
PING_TIMEOUT seconds (or is not
ready START_TIMEOUT seconds after its start) is wedged: the supervisor kills it (SIGKILL) and
restarts it, like any worker that dies (after 0 s, then more slowly if it keeps dying soon
after its start: nfqfw.service.supervision.restart_delay). While a worker is down its queue is unbound,
and the kernel drops what the rules send there (fail-closed; with failure-mode open the rules'
--queue-bypass lets it pass). A restarted worker restores its periodic snapshot first, so the
connections on its queue older than the last snapshot go on. A worker that dies before every
worker was ready once is a start-up failure (exit code 1), as a failed bind is for one daemon.

Signals: SIGTERM/SIGINT stop (SIGTERM to every worker, which saves its flows and exits; SIGKILL
after STOP_TIMEOUT); SIGHUP reloads (below); SIGUSR1 is passed on (the workers log counters).

Reload (SIGHUP or `nfqfw reload`): the supervisor reads and validates the file; invalid, the
errors are logged and kept for `status`, and no worker is touched. Valid, the bytes become the
policy in force and every ready worker is asked to reload it over its control socket (a worker
starting meanwhile reloads once it is ready; one down starts with it). A changed failure mode
re-installs the rules.

Control socket (RUNTIME_DIR/control.sock, as for one daemon): `status`, `flows` and `flush` are
fanned out to the workers and merged (nfqfw.service.supervision); `panic` is the supervisor's own (it
lives in the rules); `reload` as above. A worker that does not answer within ANSWER_TIMEOUT is
reported as such. Served in the supervisor's loop, which handles no packets: a slow worker
delays the answer, never packets.

Snapshots when the queue range or the boot changed: see nfqfw.service.supervision (every worker then
restores every snapshot file; files of vanished queues are removed once all are up).

With --metrics the supervisor serves the endpoint: at each scrape (in the exporter's thread)
it asks every worker for its families (control "metrics"; a worker counts, its latency sample
included, but serves nothing) and serves their sum (nfqfw.observe.metrics.merge_records), with
nfqfw_worker_up{queue} telling which workers' counts are in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from nfqfw import __version__
from nfqfw.control.client import ClientError, call
from nfqfw.control.protocol import SOCKET_NAME, UNIX_PATH_MAX, ControlError, RequestError, ok
from nfqfw.control.requests import (
    answer_panic,
    answer_reload,
    command_of,
    file_sha256,
    filter_of,
    kernel_queues,
)
from nfqfw.control.server import ControlServer
from nfqfw.firewall import Firewall, QueueSpec, RulesError, backend_named
from nfqfw.service import supervision as sv
from nfqfw.service.daemon import (
    Loaded,
    ReloadResult,
    StartupError,
    check_root_and_tools,
    install_signal_handlers,
    load_policy_file,
    refused_reload,
    run_daemon,
)
from nfqfw.service.options import Options
from nfqfw.service.ruleset import protection, queue_spec
from nfqfw.service.sdnotify import Notifier, watchdog_interval
from nfqfw.service.statedir import StateDir, read_trusted, write_atomically

log = logging.getLogger("nfqfw")

WORKERS_DIR = "workers"  # in --runtime-dir, mode 0700: the workers' sockets, the policy in force
POLICY_NAME = "policy.yaml"
LAYOUT_NAME = "workers.layout"  # in --state-dir (nfqfw.service.supervision.Layout)
BOOT_ID = "/proc/sys/kernel/random/boot_id"
PING_EVERY = 1.0  # seconds between a worker's WATCHDOG=1 to the supervisor
HEARTBEAT_STALE = 3.0  # a worker silent this long stops the WATCHDOG=1 to systemd
PING_TIMEOUT = 10.0  # a ready worker silent this long is wedged: killed and restarted
START_TIMEOUT = 120.0  # a worker not ready this long after its start is wedged too
ANSWER_TIMEOUT = 5.0  # seconds a worker gets to answer a fanned-out control request
STOP_TIMEOUT = 10.0  # seconds the workers get to save their flows and exit (TimeoutStopSec=15s)
TICK = 0.5  # seconds between housekeeping rounds
STATUS_PERIOD = 10.0
PR_SET_PDEATHSIG = 1


@dataclass
class Worker:
    """The supervisor's record of one queue's worker (its process comes and goes)."""

    queue: int
    directory: str  # the worker's --runtime-dir: its control.sock
    notify_path: str
    notify: socket.socket  # the supervisor's end: the worker's sd_notify messages arrive here
    pid: int | None = None
    ready: bool = False
    started: float = 0.0  # monotonic time of the last fork
    last_ping: float = 0.0
    restarts: int = 0
    quick_deaths: int = 0  # deaths in a row soon after a start (restart back-off)
    restart_at: float | None = None
    last_exit: str | None = None
    generation: int = 0  # the policy copy it started with (see Supervisor._policy_generation)
    counts: sv.Counts = field(default_factory=sv.Counts)

    def health(self) -> sv.Health:
        return sv.Health(self.pid is not None, self.ready, self.last_ping)

    def state(self) -> str:
        if self.pid is None:
            return "restarting" if self.restart_at is not None else "down"
        return "running" if self.ready else "starting"


class Supervisor:
    def __init__(
        self,
        options: Options,
        *,
        notifier: Notifier | None = None,
        firewall: Firewall | None = None,
        clock: Callable[[], float] = time.monotonic,
        ping_timeout: float = PING_TIMEOUT,
    ) -> None:
        self.options = options
        self.notifier = notifier or Notifier()
        self.firewall = firewall or backend_named()
        self.clock = clock
        self.ping_timeout = ping_timeout
        self.spec: QueueSpec | None = None
        self.fail_open = False
        self.sha256 = ""  # of the policy in force
        self.workers: dict[int, Worker] = {}
        self.control: ControlServer | None = None
        self.started = time.time()
        self.started_mono = clock()
        self.last_reload: ReloadResult | None = None
        self.live = False  # every worker was ready once: rules in, READY=1 sent
        self.directory = os.path.join(options.runtime_dir, WORKERS_DIR)
        self.policy_copy = os.path.join(self.directory, POLICY_NAME)
        self._pid = os.getpid()
        self._policy_generation = 0
        self._stop: str | None = None
        self._reload = False
        self._dump = False
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._watchdog_every: float | None = None
        self._watchdog_due = math.inf
        self._status_due = 0.0
        self._layout: sv.Layout | None = None
        self._adopt: tuple[str, ...] = ()
        self.metrics: Any = None  # nfqfw.observe.metrics.MetricsServer with --metrics
        self._answered: dict[int, bool] = {}  # queue -> answered the last scrape's request
        self._worker_counts: Any = None  # nfqfw.observe.metrics.WorkerCounts with --metrics

    # -- start --

    def start(self) -> None:
        """Checks, the policy copy, the control socket and the workers' forks; READY=1 comes
        from the loop once every worker is ready. Raises StartupError."""
        opts = self.options
        check_root_and_tools(self.firewall)
        loaded = load_policy_file(opts.config)
        data = self._read_policy(loaded)
        self.fail_open = loaded.fail_open
        self.spec = queue_spec(opts, loaded.engine_policy.config, bypass=loaded.fail_open)
        # The control socket first: it refuses a start while another daemon serves this
        # runtime directory, before the policy copy its workers restart with is overwritten.
        try:
            self.control = ControlServer.open(opts.runtime_dir, self._handle, clock=self.clock)
        except ControlError as err:
            raise StartupError(str(err)) from err
        self._prepare_directory()
        self._put_in_force(data, loaded)
        self._plan_snapshots()
        self._install_signal_handlers()
        self._watchdog_every = watchdog_interval()
        for queue in self.spec.queues:
            self.workers[queue] = self._new_worker(queue)
        self._start_metrics()  # before the forks: a port that cannot be bound fails the start
        for worker in self.workers.values():
            self._spawn(worker)

    def _read_policy(self, loaded: Loaded) -> bytes:
        """The bytes that were validated: a file changed between the check and this read is
        refused rather than copied unchecked."""
        path = self.options.config
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise StartupError(f"{path}: cannot read: {err.strerror or err}") from err
        if hashlib.sha256(data).hexdigest() != loaded.engine_policy.config.sha256:
            raise StartupError(f"{path}: changed while it was being read: try again")
        return data

    def _prepare_directory(self) -> None:
        # the longest socket path under it: the last worker's control socket (its notify
        # socket, qN.notify, is shorter)
        longest = os.path.join(self.directory, f"q{self.options.queue_last}", SOCKET_NAME)
        if len(os.fsencode(longest)) > UNIX_PATH_MAX:
            raise StartupError(
                f"worker socket path {longest} is too long ({len(os.fsencode(longest))} bytes, at most "
                f"{UNIX_PATH_MAX}): choose a shorter --runtime-dir"
            )
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            os.chmod(self.directory, 0o700)  # the workers' sockets: root only
        except OSError as err:
            raise StartupError(f"cannot create {self.directory}: {err.strerror or err}") from err

    def _put_in_force(self, data: bytes, loaded: Loaded) -> None:
        write_atomically(self.policy_copy, data)
        self.sha256 = loaded.engine_policy.config.sha256
        self._policy_generation += 1

    def _new_worker(self, queue: int) -> Worker:
        notify_path = os.path.join(self.directory, f"q{queue}.notify")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)  # left by a supervisor that was killed
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify.bind(notify_path)
        notify.setblocking(False)
        return Worker(queue, os.path.join(self.directory, f"q{queue}"), notify_path, notify)

    def _start_metrics(self) -> None:
        """--metrics: the endpoint serves the sum of the workers' counts, asked at each scrape."""
        if self.options.metrics is None:
            return
        from nfqfw.observe import metrics

        host, port = self.options.metrics
        self._worker_counts = metrics.WorkerCounts()
        collector = metrics.MergedCollector(self._worker_metrics, self._worker_answering)
        try:
            self.metrics = metrics.serve_merged(collector, host, port, self.options.metrics_allow_remote)
        except metrics.MetricsError as err:
            raise StartupError(str(err)) from err
        log.info("metrics on http://%s/metrics (the workers' counts summed)", self.metrics.address)

    def _worker_metrics(self) -> list[list[Any]]:
        """Runs in the exporter's thread: each worker's records (control "metrics"), with the
        last ones of a worker that did not answer and the counts of its earlier processes."""
        answers = self._ask_all({"cmd": "metrics"})
        self._answered = {a.queue: a.error is None for a in answers}
        records = ((a.queue, a.pid, None if a.error else a.result["families"]) for a in answers)
        return self._worker_counts.update(records)

    def _worker_answering(self) -> list[tuple[int, bool]]:
        return [(queue, self._answered.get(queue, False)) for queue in self.workers]

    # -- snapshots (see nfqfw.service.supervision) --

    def _plan_snapshots(self) -> None:
        assert self.spec is not None
        state = StateDir(self.options.state_dir)
        if not state.prepare():
            return  # logged; the workers find it unusable too and start empty
        self._layout = sv.Layout(tuple(self.spec.queues), _boot_id())
        saved = self._saved_layout()
        self._adopt = sv.to_adopt(saved, self._layout, os.listdir(self.options.state_dir))
        if self._adopt:
            log.info(
                "flows saved under another queue layout (%s), now %s: every worker restores %s",
                "unknown" if saved is None else f"queues {list(saved.queues)}",
                f"queues {list(self._layout.queues)}",
                ", ".join(self._adopt),
            )

    def _saved_layout(self) -> sv.Layout | None:
        try:
            return sv.Layout.loads(read_trusted(os.path.join(self.options.state_dir, LAYOUT_NAME)).decode())
        except Exception:  # missing, foreign or damaged: unknown, so every file is restored
            return None

    def _settle_snapshots(self) -> None:
        """Every worker restored: drop the files no queue owns now, record the layout."""
        if self._layout is None:
            return
        directory = self.options.state_dir
        for name in sv.leftovers(self._layout, os.listdir(directory)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
                log.info("removed %s: its flows were restored by the workers", name)
        try:
            write_atomically(os.path.join(directory, LAYOUT_NAME), self._layout.dumps().encode())
        except OSError as err:
            log.error("cannot record the queue layout in %s: %s", directory, err)

    # -- workers --

    def _spawn(self, worker: Worker) -> None:
        _drain(worker.notify)  # what a dead predecessor left must not count for the new one
        worker.ready, worker.restart_at = False, None
        worker.generation = self._policy_generation
        adopt = () if self.live else self._adopt  # after the first start, each its own file
        pid = os.fork()
        if pid == 0:
            self._child(worker, adopt)
        worker.pid = pid
        worker.started = worker.last_ping = self.clock()
        log.info("worker for queue %d started (pid %d)", worker.queue, pid)

    def _child(self, worker: Worker, adopt: tuple[str, ...]) -> NoReturn:
        """The forked worker: let go of the supervisor's resources, run the daemon, exit."""
        code = 1
        try:
            self._leave_supervisor(worker)
            code = run_daemon(self._worker_options(worker, adopt))
        except BaseException:
            with contextlib.suppress(Exception):
                traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _leave_supervisor(self, worker: Worker) -> None:
        _set_parent_death_signal(signal.SIGKILL)  # no orphan keeps a queue bound
        if os.getppid() != self._pid:
            os._exit(1)  # the supervisor died before the line above took effect
        signal.set_wakeup_fd(-1)
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(number, signal.SIG_DFL)
        if self.control is not None:
            self.control.close_inherited()
        if self.metrics is not None:
            self.metrics.close_inherited()
        for other in self.workers.values():
            other.notify.close()
        for sock in self._wakeup or ():
            sock.close()
        self.notifier.close()
        # The daemon reads these: its notifications and heartbeats go to the supervisor.
        os.environ["NOTIFY_SOCKET"] = worker.notify_path
        os.environ["WATCHDOG_USEC"] = str(int(PING_EVERY * 2_000_000))
        os.environ["WATCHDOG_PID"] = str(os.getpid())
        _tag_log_lines(f"[queue {worker.queue}]")

    def _worker_options(self, worker: Worker, adopt: tuple[str, ...]) -> Options:
        return replace(
            self.options,
            config=self.policy_copy,
            queue_first=worker.queue,
            queue_last=worker.queue,
            runtime_dir=worker.directory,
            worker=True,
            snapshot_name=sv.worker_snapshot(worker.queue),
            adopt_snapshots=adopt,
            new_queue=None
            if self.options.new_queue is None
            else self.options.new_queue + worker.queue - self.options.queue_first,
            metrics=None,
            collect_metrics=self.options.metrics is not None,
        )

    def _on_notify(self, worker: Worker) -> None:
        while True:
            try:
                data = worker.notify.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            self._take_notification(worker, sv.parse_notify(data))

    def _take_notification(self, worker: Worker, fields: dict[str, str]) -> None:
        if worker.pid is None:
            return
        now = self.clock()
        if fields.get("READY") == "1" and not worker.ready:
            worker.ready, worker.last_ping = True, now
            log.info("worker for queue %d (pid %d) is ready", worker.queue, worker.pid)
            if self.live and worker.generation != self._policy_generation:
                self._catch_up(worker)
        if fields.get("WATCHDOG") == "1":
            worker.last_ping = now
        counts = sv.parse_status_counts(fields.get("STATUS", ""))
        if counts is not None:
            worker.counts = counts

    def _catch_up(self, worker: Worker) -> None:
        """A worker that started before the last reload loads the policy now in force."""
        answer = self._ask(worker, {"cmd": "reload"})
        merged = sv.merge_reloads([answer])
        if merged.ok:
            worker.generation = self._policy_generation
        else:
            log.error("worker for queue %d did not take the reloaded policy: %s", worker.queue, merged.errors)

    # -- the loop --

    def loop(self) -> int:
        """Until a stop is asked: 0; 1 when start-up failed (a worker died before all were ready)."""
        assert self._wakeup is not None and self.control is not None
        handlers: dict[int, Callable[[], object]] = {
            self._wakeup[0].fileno(): lambda: _drain(self._wakeup[0]) if self._wakeup else None,
            self.control.fileno(): self.control.service,
        }
        for worker in self.workers.values():
            handlers[worker.notify.fileno()] = lambda worker=worker: self._on_notify(worker)  # type: ignore[misc]
        poller = select.poll()
        for fd in handlers:
            poller.register(fd, select.POLLIN)
        while self._stop is None:
            for fd, _ in poller.poll(int(TICK * 1000)):
                handlers[fd]()
            failure = self._housekeeping(self.clock())
            if failure is not None:
                for line in failure.splitlines():
                    print(f"nfqfw: {line}", file=sys.stderr)
                return 1
        return 0

    def _housekeeping(self, now: float) -> str | None:
        """One round; returns why start-up failed, if it did."""
        failure = self._reap(now)
        if failure is not None:
            return failure
        if not self.live:
            return self._go_live(now) if all(w.ready for w in self.workers.values()) else None
        if self._reload:
            self._reload = False
            self.reload("SIGHUP")
        if self._dump:
            self._dump = False
            self._signal_workers(signal.SIGUSR1)
        if self.control is not None:
            self.control.service()  # times out idle clients even when no socket event comes
        self._restart_due(now)
        # A fanned-out control request may have blocked the loop for longer than PING_TIMEOUT
        # (ANSWER_TIMEOUT per slow worker): the heartbeats sent meanwhile wait unread in the
        # notify sockets, and must count before a healthy worker is taken for a wedged one.
        for worker in self.workers.values():
            self._on_notify(worker)
        self._kill_wedged(now)
        self._notify_systemd(now)
        return None

    def _reap(self, now: float) -> str | None:
        for worker in self.workers.values():
            if worker.pid is None:
                continue
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = worker.pid, 0
            if pid == 0:
                continue
            failure = self._on_death(worker, status, now)
            if failure is not None:
                return failure
        return None

    def _on_death(self, worker: Worker, status: int, now: float) -> str | None:
        how, pid = sv.describe_exit(status), worker.pid
        worker.pid, worker.ready, worker.last_exit = None, False, how
        _drain(worker.notify)
        if self._stop is not None:
            return None
        if not self.live:
            return f"the worker for queue {worker.queue} (pid {pid}) {how} while starting (see above)"
        worker.quick_deaths = worker.quick_deaths + 1 if now - worker.started < sv.QUICK_DEATH else 0
        delay = sv.restart_delay(worker.quick_deaths)
        worker.restart_at = now + delay
        meanwhile = "passes unfiltered (failure-mode open)" if self.fail_open else "is dropped by the kernel"
        log.error(
            "worker for queue %d (pid %d) %s: its queue's traffic %s until it is back; restarting in %.1f s",
            worker.queue,
            pid,
            how,
            meanwhile,
            delay,
        )
        return None

    def _restart_due(self, now: float) -> None:
        for worker in self.workers.values():
            if worker.pid is None and worker.restart_at is not None and now >= worker.restart_at:
                worker.restarts += 1
                self._spawn(worker)

    def _kill_wedged(self, now: float) -> None:
        for worker in self.workers.values():
            if worker.pid is None or not sv.wedged(worker.health(), now, self.ping_timeout, START_TIMEOUT):
                continue
            log.error(
                "worker for queue %d (pid %d) sent no heartbeat for %.0f s: killing it, to restart it",
                worker.queue,
                worker.pid,
                now - worker.last_ping,
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
            worker.last_ping = now  # one kill; its death is reaped in a later round

    def _go_live(self, now: float) -> str | None:
        """Every worker bound its queue: the rules go in, READY=1 to systemd."""
        assert self.spec is not None
        try:
            self.spec = self.firewall.install_keeping_panic(self.spec)
        except RulesError as err:
            return str(err)
        self.live = True
        self._settle_snapshots()
        if self._watchdog_every is not None:
            self._watchdog_due = now
        mode = "open" if self.fail_open else "closed"
        log.info(
            "queues %s bound by %d workers, rules installed (failure mode %s, mark 0x%x)",
            self._queue_text(),
            len(self.workers),
            mode,
            self.spec.mark,
        )
        self.notifier.ready(f"filtering on queues {self._queue_text()} with {len(self.workers)} workers")
        return None

    def _notify_systemd(self, now: float) -> None:
        workers = self.workers.values()
        due = self._watchdog_every is not None and now >= self._watchdog_due
        if due and sv.all_healthy((w.health() for w in workers), now, HEARTBEAT_STALE):
            self.notifier.watchdog()
            self._watchdog_due = now + (self._watchdog_every or 0.0)
        if now >= self._status_due:
            self._status_due = now + STATUS_PERIOD
            self.notifier.status(self.status_text())

    def status_text(self) -> str:
        workers = self.workers.values()
        up = sum(1 for w in workers if w.ready)
        panic = self.spec is not None and self.spec.panic
        return sv.status_line(self._queue_text(), panic, up, len(self.workers), (w.counts for w in workers))

    def _queue_text(self) -> str:
        assert self.spec is not None
        return f"{self.spec.first}:{self.spec.last}"

    def _signal_workers(self, number: int) -> None:
        for worker in self.workers.values():
            if worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, number)

    # -- reload, panic --

    def reload(self, trigger: str = "SIGHUP") -> bool:
        """Validate the file; if valid, make it the policy in force and have every worker load it."""
        why = "SIGHUP received" if trigger == "SIGHUP" else trigger
        log.info("%s: reloading %s", why, self.options.config)
        self.notifier.reloading("reloading the policy")
        try:
            loaded = load_policy_file(self.options.config)
            data = self._read_policy(loaded)
        except StartupError as err:
            return self._reload_refused(trigger, str(err).splitlines() or ["reload failed"])
        self._put_in_force(data, loaded)
        ready = [w for w in self.workers.values() if w.ready]
        answers = self._ask_all({"cmd": "reload"}, ready)
        merged = sv.merge_reloads(answers)
        for worker, answer in zip(ready, answers, strict=True):
            if answer.result is not None and answer.result["ok"]:
                worker.generation = self._policy_generation
        spec = replace(self.spec, protection=protection(self.options, loaded.engine_policy.config))
        if spec != self.spec and self.firewall.reinstall(spec, "reload: the kernel's pre-filter not updated"):
            self.spec = spec
        if loaded.fail_open != self.fail_open:
            self._change_failure_mode(loaded.fail_open)
        self.last_reload = ReloadResult(time.time(), trigger, merged.ok, merged.errors, merged.removed)
        if merged.ok:
            log.info("policy reloaded by %d workers (%s flows removed)", len(answers), merged.removed)
        else:
            for line in merged.errors:
                log.error("reload: %s", line)
        self.notifier.ready("policy reloaded" if merged.ok else "reload incomplete: see the log")
        return merged.ok

    def _reload_refused(self, trigger: str, errors: list[str]) -> bool:
        self.last_reload = refused_reload(trigger, errors, self.notifier, " (no worker was changed)")
        return False

    def _change_failure_mode(self, fail_open: bool) -> None:
        assert self.spec is not None
        spec = replace(self.spec, bypass=fail_open)
        if not self.firewall.reinstall(spec, "reload: failure mode not changed, rules not re-installed"):
            return
        self.spec, self.fail_open = spec, fail_open
        log.info("failure mode now %s", "open" if fail_open else "closed")

    def set_panic(self, on: bool) -> bool:
        assert self.spec is not None
        spec = replace(self.spec, panic=on)
        if not self.firewall.reinstall(spec, "panic mode not changed"):
            return False
        if on != self.spec.panic:
            log.warning("panic mode %s", "on: everything but loopback is dropped" if on else "off")
        self.spec = spec
        return True

    # -- the control socket --

    def _handle(self, request: dict[str, Any]) -> Any:
        command = command_of(request)
        if not self.live:
            raise RequestError("starting: not every worker has bound its queue yet, try again")
        answer = getattr(self, f"_answer_{command}")(request)
        return iter([ok(answer)])

    def _ask(self, worker: Worker, request: dict[str, Any]) -> sv.Answer:
        if worker.pid is None or not worker.ready:
            return sv.Answer(worker.queue, worker.pid, error=f"worker {worker.state()}")
        try:
            result = call(worker.directory, request, timeout=ANSWER_TIMEOUT)
        except ClientError as err:
            return sv.Answer(worker.queue, worker.pid, error=str(err))
        return sv.Answer(worker.queue, worker.pid, result)

    def _ask_all(self, request: dict[str, Any], workers: list[Worker] | None = None) -> list[sv.Answer]:
        """Every worker (or `workers`) at once: workers that do not answer cost ANSWER_TIMEOUT
        once, not once each (one after the other, two wedged workers outlast a 10 s scrape
        timeout, and the loop was blocked 5 s per silent worker). The threads end before this
        returns."""
        workers = list(self.workers.values()) if workers is None else workers
        with ThreadPoolExecutor(max_workers=max(1, len(workers)), thread_name_prefix="nfqfw-ask") as pool:
            return list(pool.map(lambda worker: self._ask(worker, request), workers))

    def _answer_status(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.spec is not None
        config = self.options.config
        base = {
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "uptime": self.clock() - self.started_mono,
            "policy": {"file": config, "sha256": self.sha256, "file_sha256": file_sha256(config)},
            "last_reload": None if self.last_reload is None else asdict(self.last_reload),
            "queue": self._queue_text(),
            "failure_mode": "open" if self.fail_open else "closed",
            "panic": bool(self.spec.panic),
            "kernel_queues": kernel_queues(self.spec.queues),
        }
        states = {
            w.queue: {"state": w.state(), "restarts": w.restarts, "last_exit": w.last_exit}
            for w in self.workers.values()
        }
        return sv.merge_status(base, self._ask_all({"cmd": "status"}), states)

    def _answer_flows(self, request: dict[str, Any]) -> dict[str, Any]:
        return sv.merge_flows(self._ask_all(_checked_filter(request)))

    def _answer_flush(self, request: dict[str, Any]) -> dict[str, Any]:
        return sv.merge_flush(self._ask_all(_checked_filter(request)))

    def _answer_panic(self, request: dict[str, Any]) -> dict[str, Any]:
        return answer_panic(request, self)  # done in the rules, by the supervisor itself

    def _answer_metrics(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.metrics is None:
            raise RequestError("metrics: not collected (nfqfw run --metrics)")
        from nfqfw.observe import metrics

        return {"families": metrics.merge_records(self._worker_metrics())}

    def _answer_reload(self, request: dict[str, Any]) -> dict[str, Any]:
        return answer_reload(self)

    # -- signals --

    def _install_signal_handlers(self) -> None:
        handlers = (self._on_stop_signal, self._on_reload_signal, self._on_dump_signal)
        self._wakeup = install_signal_handlers(*handlers)
        signal.signal(signal.SIGCHLD, _wake_only)  # its byte on the wake-up fd ends the poll: reap

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        self._stop = signal.Signals(signum).name

    def _on_reload_signal(self, _signum: int, _frame: object) -> None:
        self._reload = True

    def _on_dump_signal(self, _signum: int, _frame: object) -> None:
        self._dump = True

    def request_stop(self, why: str = "stop request") -> None:
        self._stop = why

    # -- stop --

    def stop(self) -> None:
        """SIGTERM to the workers (each saves its flows), wait, SIGKILL what is left; the rules stay."""
        log.info("%s: stopping the workers", self._stop or "stop")
        self.notifier.stopping("stopping")
        self._signal_workers(signal.SIGTERM)
        deadline = self.clock() + STOP_TIMEOUT
        while any(w.pid is not None for w in self.workers.values()) and self.clock() < deadline:
            self._reap(self.clock())
            time.sleep(0.05)
        for worker in self.workers.values():
            if worker.pid is not None:
                log.error("worker for queue %d (pid %d) did not stop: killing it", worker.queue, worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(worker.pid, 0)
                worker.pid = None
        self.close()

    def close(self) -> None:
        self._signal_workers(signal.SIGKILL)  # only left alive when start-up failed half-way
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.control is not None:
            self.control.close()
            self.control = None
        for worker in self.workers.values():
            worker.notify.close()
            with contextlib.suppress(OSError):
                os.unlink(worker.notify_path)
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for sock in self._wakeup:
                sock.close()
            self._wakeup = None
        self.notifier.close()


def run_supervisor(options: Options) -> int:
    """`nfqfw run --workers`: start, supervise, stop; returns the process exit code."""
    supervisor = Supervisor(options)
    try:
        supervisor.start()
    except StartupError as err:
        for line in str(err).splitlines() or ["start-up failed"]:
            print(f"nfqfw: {line}", file=sys.stderr)
        supervisor.close()
        return 1
    try:
        code = supervisor.loop()
    except Exception:
        log.exception("supervisor loop failed")
        code = 1
    supervisor.stop()
    if code == 0:
        log.info("stopped; kernel rules left in place (nfqfw rules remove to take them away)")
    return code


# --- helpers ----------------------------------------------------------------------------------


def _checked_filter(request: dict[str, Any]) -> dict[str, Any]:
    """Refuse a bad filter once, here, rather than once per worker."""
    filter_of(request)
    return request


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
        while sock.recv(4096):
            pass


def _wake_only(_signum: int, _frame: object) -> None:
    """A Python handler, so that the signal reaches the wake-up fd; the loop does the work."""


def _boot_id() -> str:
    try:
        return Path(BOOT_ID).read_text().strip()
    except OSError:
        return ""  # unknown: treated as a new boot (every worker restores every file)


def _set_parent_death_signal(number: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(number), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


class _QueueTag(logging.Filter):
    """Adds the worker's queue to its log lines' logger name (the journal mixes the processes)."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.endswith(self.tag):
            record.name = f"{record.name}{self.tag}"
        return True


def _tag_log_lines(tag: str) -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QueueTag(tag))
