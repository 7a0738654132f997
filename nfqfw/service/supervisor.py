"""`nfqfw run --queue-balance A:B --workers`: one worker process per queue, and their supervisor.

Why: the kernel spreads flows over the queues of `--queue-balance` by a hash of addresses and
protocol, the same for both directions of a flow, and the engine has no state shared between
flows of different address pairs. So each queue can be served by a process of its own, with
an Engine of its own, and a gateway with several cores uses them.

The supervisor (`Supervisor`, the service's main process) is the service core
(nfqfw.service.core) around forked workers (nfqfw.service.daemon.WorkerDaemon, one per queue,
each with its own Engine, flow snapshot STATE_DIR/flows.queue-N.snapshot and control socket
RUNTIME_DIR/workers/qN/control.sock). It owns what the single daemon owns besides packets: the
kernel rules (one rule set, `--queue-balance A:B`), panic mode, the sd_notify conversation with
systemd and the control socket RUNTIME_DIR/control.sock.

Invariants:
- The policy in force is RUNTIME_DIR/workers/policy.bundle, every file that was validated (the
  policy, its includes and set files: nfqfw.core.config.PolicyFiles.bundle): a worker started
  or restarted later reads that, never a file edited since.
  A reload that is refused touches no worker; a valid one is sent to every ready worker over
  its control socket, and a worker that was starting meanwhile takes it once ready.
- The rules go in, and READY=1 goes to systemd, once every worker has bound its queue; a worker
  that dies before that is a start-up failure (exit code 1).
- A worker's sd_notify messages go to the supervisor (RUNTIME_DIR/workers/qN.notify): READY=1,
  WATCHDOG=1 every PING_EVERY seconds from its housekeeping (also under a flood), and its counts
  (nfqfw.service.supervision.COUNTS_FIELD) with its STATUS=. WATCHDOG=1 goes to systemd only
  while every worker is alive, ready and pinging within HEARTBEAT_STALE seconds.
- A worker silent for PING_TIMEOUT seconds (or not ready START_TIMEOUT seconds after its start)
  is killed; a dead worker is restarted (nfqfw.service.supervision.restart_delay backs off).
  Meanwhile its queue is unbound and the kernel drops its traffic (fail-closed; failure-mode
  open lets it pass); the restarted worker restores its periodic snapshot first.
- A worker gets SIGKILL when the supervisor dies (PR_SET_PDEATHSIG): no orphan keeps a queue.
- Control requests are fanned out to the workers at once and their answers merged
  (nfqfw.service.supervision); panic and reload are the supervisor's own. A reload on trial
  (confirm) is the supervisor's too: its timer rolls back, the workers are told (they keep the
  flows they cut, to put back). Set changes are saved by the supervisor (its own copy of the
  runtime entries) and then sent to every ready worker; a worker that was starting meanwhile
  reads the saved entries again once ready. A worker that does
  not answer within ANSWER_TIMEOUT is reported as such. The supervisor's loop handles no
  packets: a slow worker delays an answer, never packets.
- At a stop every worker gets SIGTERM (it saves its flows), SIGKILL after STOP_TIMEOUT.
- Snapshots after a change of the queue range or a reboot: see nfqfw.service.supervision.
- With --metrics the supervisor serves the sum of the workers' families, asked at each scrape
  (nfqfw.observe.metrics.MergedCollector), nfqfw_worker_up{queue} telling whose are fresh.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal, NoReturn

from nfqfw.control.client import ClientError, call
from nfqfw.control.flowlist import FlowFilter
from nfqfw.control.protocol import SOCKET_NAME, UNIX_PATH_MAX, Chunks, RequestError, ok
from nfqfw.core.sets import RuntimeSets
from nfqfw.firewall import Firewall
from nfqfw.service import supervision as sv
from nfqfw.service.core import Applied, Loaded, PendingReload, ServiceCore, StartupError, run_service
from nfqfw.service.daemon import WorkerDaemon, candidate_path
from nfqfw.service.options import NEW_QUEUE_OFF, Options
from nfqfw.service.sdnotify import Notifier
from nfqfw.service.setstate import load_sets, save_sets
from nfqfw.service.statedir import StateDir, read_trusted, write_atomically

log = logging.getLogger("nfqfw")

WORKERS_DIR = "workers"  # in --runtime-dir, mode 0700: the workers' sockets, the policy in force
POLICY_NAME = "policy.bundle"
LAYOUT_NAME = "workers.layout"  # in --state-dir (nfqfw.service.supervision.Layout)
BOOT_ID = "/proc/sys/kernel/random/boot_id"
PING_EVERY = 1.0  # seconds between a worker's WATCHDOG=1 to the supervisor
HEARTBEAT_STALE = 3.0  # a worker silent this long stops the WATCHDOG=1 to systemd
PING_TIMEOUT = 10.0  # a ready worker silent this long is wedged: killed and restarted
START_TIMEOUT = 120.0  # a worker not ready this long after its start is wedged too
ANSWER_TIMEOUT = 5.0  # seconds a worker gets to answer a fanned-out control request
STOP_TIMEOUT = 10.0  # seconds the workers get to save their flows and exit (TimeoutStopSec=15s)
TICK = 0.5  # seconds between housekeeping rounds
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
    sets_generation: int = 0  # the runtime set entries it started with (Supervisor._sets_generation)
    counts: sv.Counts = field(default_factory=sv.Counts)  # as it last reported them

    def health(self) -> sv.Health:
        return sv.Health(self.pid is not None, self.ready, self.last_ping)

    def state(self) -> str:
        if self.pid is None:
            return "restarting" if self.restart_at is not None else "down"
        return "running" if self.ready else "starting"


class Supervisor(ServiceCore):
    """The main process of `nfqfw run --workers`: the service core around one forked
    WorkerDaemon per queue. It owns the kernel rules, panic mode, systemd's notifications and
    the control socket; it forks, watches (heartbeats, exits), restarts and stops the workers,
    hands them the policy in force, and answers control requests by asking them and merging."""

    PERIOD = TICK
    LOOP = "supervisor loop"
    REFUSED = " (no worker was changed)"

    def __init__(
        self,
        options: Options,
        *,
        notifier: Notifier | None = None,
        firewall: Firewall | None = None,
        clock: Callable[[], float] = time.monotonic,
        ping_timeout: float = PING_TIMEOUT,
    ) -> None:
        super().__init__(options, notifier=notifier, firewall=firewall, clock=clock)
        self.ping_timeout = ping_timeout
        self.sha256 = ""  # of the policy in force
        self.workers: dict[int, Worker] = {}
        self.directory = os.path.join(options.runtime_dir, WORKERS_DIR)
        self.policy_copy = os.path.join(self.directory, POLICY_NAME)
        self._pid = os.getpid()
        self._policy_generation = 0
        self._sets_generation = 0  # grows with every runtime set change
        self._runtime = RuntimeSets()  # the sets' runtime entries, as saved
        self._layout: sv.Layout | None = None
        self._adopt: tuple[str, ...] = ()
        self._answered: dict[int, bool] = {}  # queue -> answered the last scrape's request
        self._worker_counts: Any = None  # nfqfw.observe.metrics.WorkerCounts with --metrics

    # -- start --

    def _start(self, loaded: Loaded) -> None:
        """The policy copy, the control socket and the workers' forks; READY=1 comes from
        housekeeping once every worker is ready (`_go_live`)."""
        assert self.spec is not None
        # The control socket first: it refuses a start while another daemon serves this
        # runtime directory, before the policy copy its workers restart with is overwritten.
        self._open_control()
        self._prepare_directory()
        self._put_in_force(loaded)
        count = load_sets(self.options.state_dir, self._runtime, self.clock())
        if count:
            log.info("sets: %d runtime entries restored (%s)", count, ", ".join(self._runtime.names()))
        self._plan_snapshots()
        signal.signal(signal.SIGCHLD, self._on_child_signal)
        for queue in self.spec.queues:
            self.workers[queue] = self._new_worker(queue)
        self._start_metrics()  # before the forks: a port that cannot be bound fails the start
        for worker in self.workers.values():
            self._spawn(worker)

    def _load_policy(self) -> Loaded:
        return self._with_source(super()._load_policy())

    def _with_source(self, loaded: Loaded) -> Loaded:
        """The bundle of exactly the bytes that were validated (every file of the policy)."""
        return replace(loaded, source=loaded.files.bundle(self.options.config))

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

    def _put_in_force(self, loaded: Loaded) -> None:
        write_atomically(self.policy_copy, loaded.source)
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

    def _serve_metrics(self, host: str, port: int, allow_remote: bool) -> tuple[Any, str]:
        """The endpoint serves the sum of the workers' counts, asked at each scrape."""
        from nfqfw.observe import metrics

        self._worker_counts = metrics.WorkerCounts()
        collector = metrics.MergedCollector(
            self._worker_metrics, self._worker_answering, self.kernel_drops, ha=self.ha
        )
        return metrics.serve_merged(collector, host, port, allow_remote), " (the workers' counts summed)"

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
        worker.sets_generation = self._sets_generation
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
            code = run_service(WorkerDaemon(self._worker_options(worker, adopt)))
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
            snapshot_name=sv.worker_snapshot(worker.queue),
            owner_index=worker.queue - self.options.queue_first,  # its accept verdicts' owner field
            adopt_snapshots=adopt,
            new_queue=self._worker_new_queue(worker),
            metrics=None,
            collect_metrics=self.options.metrics is not None,
        )

    def _worker_new_queue(self, worker: Worker) -> int | Literal["off"]:
        """Each worker its own queue for first packets, in the same order as the main queues
        (the kernel's hash picks the same index in both ranges)."""
        first = self.options.first_packet_queue
        return NEW_QUEUE_OFF if first is None else first + worker.queue - self.options.queue_first

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
            if self.live and worker.sets_generation != self._sets_generation:
                self._catch_up_sets(worker)
        if fields.get("WATCHDOG") == "1":
            worker.last_ping = now
        counts = sv.counts_of(fields)
        if counts is not None:
            worker.counts = counts

    def _catch_up_sets(self, worker: Worker) -> None:
        """A worker that read the saved set entries before the last change reads them again."""
        answer = self._ask(worker, {"cmd": "set", "op": "load", "name": ""})
        if answer.error is None:
            worker.sets_generation = self._sets_generation
        else:
            log.error(
                "worker for queue %d did not take the sets' runtime entries: %s", worker.queue, answer.error
            )

    def _catch_up(self, worker: Worker) -> None:
        """A worker that started before the last reload loads the policy now in force."""
        answer = self._ask(worker, {"cmd": "reload"})
        merged = sv.merge_reloads([answer])
        if merged.ok:
            worker.generation = self._policy_generation
        else:
            log.error("worker for queue %d did not take the reloaded policy: %s", worker.queue, merged.errors)

    # -- housekeeping --

    def _readers(self) -> dict[int, Callable[[], object]]:
        return {worker.notify.fileno(): partial(self._notified, worker) for worker in self.workers.values()}

    def _on_child_signal(self, _signum: int, _frame: object) -> None:
        """A worker exited: housekeeping at once, to reap it (the signal's byte on the wake-up
        fd ends the poll)."""
        self._wake()

    def _notified(self, worker: Worker) -> None:
        """Its notify socket is readable: take the messages, and housekeeping at once (a READY=1
        may complete the start)."""
        self._on_notify(worker)
        self._wake()

    def _serving(self, now: float) -> bool:
        """Reap the workers that died; go live once every worker is ready."""
        self.failure = self._reap(now)
        if self.failure is None and not self.live and all(w.ready for w in self.workers.values()):
            self.failure = self._go_live()
        return self.live and self.failure is None

    def _tend(self, now: float) -> float:
        self._restart_due(now)
        due = self._runtime.next_expiry()
        if due is not None and due <= now:
            for name, network in self._runtime.expire(now):
                log.info("set %s: %s expired", name, network)
            save_sets(self.options.state_dir, self._runtime, now)  # the workers expire their own
        # A fanned-out control request may have blocked the loop for longer than PING_TIMEOUT
        # (ANSWER_TIMEOUT per slow worker): the heartbeats sent meanwhile wait unread in the
        # notify sockets, and must count before a healthy worker is taken for a wedged one.
        for worker in self.workers.values():
            self._on_notify(worker)
        self._kill_wedged(now)
        return math.inf

    def _healthy(self, now: float) -> bool:
        return sv.all_healthy((w.health() for w in self.workers.values()), now, HEARTBEAT_STALE)

    def _dump(self) -> None:
        self._signal_workers(signal.SIGUSR1)  # the workers log their counters

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
        if self.stopping:
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

    def _go_live(self) -> str | None:
        """Every worker bound its queue: the rules go in, READY=1 to systemd; why not, if not."""
        assert self.spec is not None
        try:
            self._install_rules()
        except StartupError as err:
            return str(err)
        self._settle_snapshots()
        mode = "open" if self.fail_open else "closed"
        log.info(
            "queues %s bound by %d workers, rules installed (failure mode %s, mark 0x%x)",
            self.spec.queue_text,
            len(self.workers),
            mode,
            self.spec.mark,
        )
        self._announce_ready(f"filtering on queues {self.spec.queue_text} with {len(self.workers)} workers")
        return None

    def _signal_workers(self, number: int) -> None:
        for worker in self.workers.values():
            if worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, number)

    # -- reload --

    def _apply_policy(self, loaded: Loaded, confirm: float | None = None) -> Applied:
        """The validated bytes become the policy in force; every ready worker loads it (on
        trial, with `confirm`: the supervisor's timer decides, the workers keep what they cut)."""
        self._put_in_force(loaded)
        request: dict[str, Any] = (
            {"cmd": "reload"} if confirm is None else {"cmd": "reload", "confirm": confirm}
        )
        return self._fan_out_policy(request, "policy reloaded")

    def _apply_rollback(self, pending: PendingReload) -> Applied:
        """The policy before the trial in force again; each worker rolls back (and puts back the
        flows it cut), a worker restarted meanwhile loads it."""
        self._put_in_force(pending.previous)
        return self._fan_out_policy({"cmd": "confirm", "rollback": True}, "policy rolled back")

    def _confirmed(self) -> None:
        ready = [w for w in self.workers.values() if w.ready]
        answers = [sv.as_reload_outcome(a, "confirmed") for a in self._ask_all({"cmd": "confirm"}, ready)]
        for line in sv.merge_reloads(answers).errors:
            log.error("confirm: %s", line)

    def _fan_out_policy(self, request: dict[str, Any], done: str) -> Applied:
        ready = [w for w in self.workers.values() if w.ready]
        answers = self._ask_all(request, ready)
        if request["cmd"] == "confirm":
            answers = [sv.as_reload_outcome(answer, "rolled_back") for answer in answers]
        merged = sv.merge_reloads(answers)
        for worker, answer in zip(ready, answers, strict=True):
            if answer.result is not None and answer.result["ok"]:
                worker.generation = self._policy_generation
        if merged.ok:
            log.info("%s by %d workers (%s flows removed)", done, len(answers), merged.removed)
        else:
            for line in merged.errors:
                log.error("reload: %s", line)
        return Applied(merged.ok, merged.errors, merged.removed)

    def _cut_preview(self, loaded: Loaded) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Each ready worker checks the candidate (bundled beside the policy in force) against
        its flows."""
        path = candidate_path(self.policy_copy)
        write_atomically(path, loaded.source)
        try:
            answers = self._ask_all({"cmd": "reload", "dry_run": True, "candidate": True})
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return sv.merge_cut_previews(answers)

    # -- sets --

    def runtime_sets(self) -> RuntimeSets:
        return self._runtime

    def _set_change(self, name: str, network: Any, add: bool, timeout: float | None) -> dict[str, Any]:
        """Saved first (a worker that starts now reads it), then every ready worker told."""
        now = self.clock()
        entries = self._runtime.entries(name)
        changed = (
            entries.add(network, None if timeout is None else now + timeout)
            if add
            else entries.remove(network)
        )
        save_sets(self.options.state_dir, self._runtime, now)
        self._sets_generation += 1
        self._kernel_set_entry(name, network, add, timeout)
        op = "add" if add else "del"
        request = {"cmd": "set", "op": op, "name": name, "addr": str(network), "timeout": timeout}
        ready = [w for w in self.workers.values() if w.ready]
        answers = self._ask_all(request, ready)
        for worker, answer in zip(ready, answers, strict=True):
            if answer.error is None:
                worker.sets_generation = self._sets_generation
        return sv.merge_set_changes(answers, name, str(network), op, changed)

    # -- what it answers: the workers' answers merged --

    def request_refusal(self) -> str | None:
        return None if self.live else "starting: not every worker has bound its queue yet, try again"

    def policy_sha256(self) -> str:
        return self.sha256

    def counts(self) -> sv.Counts:
        return sv.Counts.total(w.counts for w in self.workers.values())

    def _workers_up(self) -> tuple[int, int] | None:
        return sum(1 for w in self.workers.values() if w.ready), len(self.workers)

    def _status_counts(self, now: float, talkers: int | None) -> dict[str, Any]:
        states = {
            w.queue: {"state": w.state(), "restarts": w.restarts, "last_exit": w.last_exit}
            for w in self.workers.values()
        }
        request: dict[str, Any] = (
            {"cmd": "status"} if talkers is None else {"cmd": "status", "talkers": talkers}
        )
        return sv.merge_status(self._ask_all(request), states)

    def flows(self, request: dict[str, Any], selection: FlowFilter) -> Chunks:
        return iter([ok(sv.merge_flows(self._ask_all(request)))])

    def flush(self, request: dict[str, Any], selection: FlowFilter) -> dict[str, Any]:
        return sv.merge_flush(self._ask_all(request))

    def metric_records(self) -> list[Any]:
        if self.metrics is None:
            raise RequestError("metrics: not collected (nfqfw run --metrics)")
        from nfqfw.observe import metrics

        return metrics.merge_records(self._worker_metrics())

    def _ha_role_changed(self, role: str) -> dict[str, int]:
        """Every worker acts on the role (its own flows); their counts summed."""
        return sv.merge_ha(self._ask_all({"cmd": "ha", "role": role}))

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

    # -- stop --

    def _wind_down(self) -> None:
        """SIGTERM to the workers (each saves its flows), wait, SIGKILL what is left."""
        log.info("stopping the workers")
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

    def _release(self) -> None:
        self._signal_workers(signal.SIGKILL)  # only left alive when start-up failed half-way
        for worker in self.workers.values():
            worker.notify.close()
            with contextlib.suppress(OSError):
                os.unlink(worker.notify_path)


def run_supervisor(options: Options) -> int:
    """`nfqfw run --workers`: start, supervise, stop; returns the process exit code."""
    return run_service(Supervisor(options))


# --- helpers ----------------------------------------------------------------------------------


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
        while sock.recv(4096):
            pass


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
