"""Bring the whole lab up and down: the namespaces, and `nfqfw run` inside the gateway's.

The daemon is started as ``ip netns exec {P}gw <python> -m nfqfw run --config FILE --queue N``
in a session of its own (it outlives `nfqfw lab up`), with stdout/stderr going to
``/run/nfqfw-lab/{P}/daemon.log`` (new for each `up`; the last lab's is ``daemon.log.1``) and its pid
in ``daemon.pid`` there; the same directory is its
``--runtime-dir``, so ``nfqfw status --runtime-dir /run/nfqfw-lab/{P}`` asks it (a Unix socket
path reaches across network namespaces). Its ``--state-dir`` is ``/run/nfqfw-lab/{P}/state``:
the flow snapshot stays there between a stop and the next start (a restart keeps connections,
as on a gateway); `down` removes it with the lab. Readiness is the systemd
way: the lab binds an AF_UNIX datagram socket (a path, not an abstract name: abstract sockets
belong to a network namespace and the daemon runs in another one), passes it in $NOTIFY_SOCKET
and waits for READY=1, which nfqfw sends once its queue is bound and its rules are in.

Stopping sends SIGTERM and, if the daemon is still there after a grace period, SIGKILL.
`up` first takes down whatever is left of a lab with the same prefix and, if it fails, takes
down what it built; `down` is idempotent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nfqfw.control.protocol import SOCKET_NAME
from nfqfw.core.config import ConfigError, load_policy
from nfqfw.lab.plan import DEFAULT_PREFIX, NETNS_DIR, HaTopology, LabError, Topology
from nfqfw.lab.topology import build, in_ns, process_alive, teardown

STATE_ROOT = Path("/run/nfqfw-lab")
READY_TIMEOUT = 30.0  # seconds; start-up is quick, but CI machines can be slow
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class LabState:
    """Where a lab keeps its daemon's files. An HA lab has a daemon per gateway (`gateway` is
    "gw1" or "gw2"), each with its own directory ``/run/nfqfw-lab/{P}/{gateway}``."""

    prefix: str = DEFAULT_PREFIX
    gateway: str = ""

    @property
    def directory(self) -> Path:
        return STATE_ROOT / self.prefix / self.gateway if self.gateway else STATE_ROOT / self.prefix

    @property
    def namespace(self) -> str:
        """The namespace the daemon runs in."""
        return HaTopology(self.prefix).gw(self.gateway) if self.gateway else Topology(self.prefix).gw

    @property
    def pid_file(self) -> Path:
        return self.directory / "daemon.pid"

    @property
    def log_file(self) -> Path:
        return self.directory / "daemon.log"

    @property
    def notify_socket(self) -> Path:
        return self.directory / "notify.sock"

    @property
    def runtime_dir(self) -> Path:
        """The daemon's --runtime-dir: its control socket is control.sock in there."""
        return self.directory

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / SOCKET_NAME

    @property
    def state_dir(self) -> Path:
        """The daemon's --state-dir (its flow snapshot)."""
        return self.directory / "state"


@dataclass
class Daemon:
    """A started `nfqfw run`. `process` is set when this process started it (and can reap it)."""

    pid: int
    log_file: Path
    process: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return process_alive(self.pid)

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()


@dataclass(frozen=True)
class Lab:
    topology: Topology
    state: LabState
    daemon: Daemon | None  # None for a lab brought up without the firewall


# Daemons started by this process, by their state directory, so that stopping them can reap them.
_started: dict[Path, Daemon] = {}


def up(
    prefix: str = DEFAULT_PREFIX,
    policy: str | os.PathLike[str] | None = None,
    queue: int = 0,
    timeout: float = READY_TIMEOUT,
    args: Sequence[str] = (),
    dmz: bool = False,
) -> Lab:
    """Build the namespaces (`dmz`: with a DMZ host on the gateway's dmz0) and (with a policy)
    start nfqfw in the gateway; returns once it is ready. The lab masquerades the inside network
    itself only when the policy has no `nat:` section (otherwise nfqfw's rules do)."""
    topology, state = Topology(prefix, dmz), LabState(prefix)
    down(prefix)  # a lab left over from before, or half of one
    start_fresh_log(state.log_file)
    try:
        build(topology, nat=not policy_has_nat(policy))
        daemon = None if policy is None else start_daemon(prefix, policy, queue, timeout, args=args)
    except BaseException:
        down(prefix)
        raise
    return Lab(topology, state, daemon)


def policy_has_nat(policy: str | os.PathLike[str] | None) -> bool:
    """Does the policy have a `nat:` section (a policy that does not load has none: the daemon
    will say why it refuses it)?"""
    if policy is None:
        return False
    try:
        return load_policy(policy).nat is not None
    except ConfigError:
        return False


def start_fresh_log(log_file: Path) -> None:
    """A new lab's log starts empty (readers match lines by content, and the lab's crafted
    packets repeat from one lab to the next); the last lab's log is kept as NAME.1."""
    with contextlib.suppress(FileNotFoundError):
        log_file.replace(log_file.with_name(log_file.name + ".1"))


def down(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Stop the daemon and remove the namespaces; returns what was removed (empty if nothing)."""
    removed = []
    if stop_daemon(prefix) is not None:
        removed.append("nfqfw daemon")
    removed += teardown(Topology(prefix))
    state = LabState(prefix)
    for path in (state.pid_file, state.notify_socket, state.control_socket):
        path.unlink(missing_ok=True)
    shutil.rmtree(state.state_dir, ignore_errors=True)  # a new lab starts with an empty flow table
    return removed


def start_daemon(
    prefix: str,
    policy: str | os.PathLike[str],
    queue: int | None = 0,
    timeout: float = READY_TIMEOUT,
    wrapper: Sequence[str] = (),
    args: Sequence[str] = (),
    gateway: str = "",
) -> Daemon:
    """Start `nfqfw run` in the gateway namespace and wait for READY=1 (LabError if it never comes).

    `wrapper` goes before the python command (e.g. strace and its options); the pid recorded is
    then the wrapper's. `args` are more `nfqfw run` options (e.g. --metrics, --snapshot-interval;
    with --queue or --queue-balance there, `queue` is not passed; None: nfqfw's default queues).
    `gateway` names an HA lab's gateway ("gw1", "gw2"); the single lab's has none.
    """
    state = LabState(prefix, gateway)
    state.directory.mkdir(parents=True, exist_ok=True)
    state.notify_socket.unlink(missing_ok=True)
    config = os.path.abspath(policy)
    # --queue-balance in `args` (several queues, e.g. with --workers) replaces --queue.
    chosen = queue is None or "--queue-balance" in args or "--queue" in args
    where = () if chosen else ("--queue", str(queue))
    run = ("run", "--config", config, *where, "--runtime-dir", str(state.runtime_dir))
    run += ("--state-dir", str(state.state_dir), *args)
    argv = in_ns(state.namespace, *wrapper, sys.executable, "-m", "nfqfw", *run)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
        notify.bind(str(state.notify_socket))
        env = {**os.environ, "NOTIFY_SOCKET": str(state.notify_socket)}
        for name in ("WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
            env.pop(name, None)  # ours, if we run under systemd: not meant for the daemon
        with open(state.log_file, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
            )
        daemon = Daemon(process.pid, state.log_file, process)
        state.pid_file.write_text(f"{process.pid}\n")
        _started[state.directory] = daemon
        try:
            _wait_ready(notify, daemon, timeout)
        except LabError:
            stop_daemon(prefix, timeout=2.0, gateway=gateway)
            raise
        finally:
            state.notify_socket.unlink(missing_ok=True)
    return daemon


def _wait_ready(notify: socket.socket, daemon: Daemon, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise LabError(f"nfqfw run sent no READY=1 within {timeout:g} s\n{log_tail(daemon.log_file)}")
        notify.settimeout(min(left, 0.2))
        try:
            message = notify.recv(4096).decode(errors="replace")
        except TimeoutError:
            if not daemon.alive():
                code = daemon.exit_code()
                status = "" if code is None else f" with code {code}"
                raise LabError(
                    f"nfqfw run exited{status} before it was ready\n{log_tail(daemon.log_file)}"
                ) from None
            continue
        if "READY=1" in message.split("\n"):
            return


def stop_daemon(
    prefix: str = DEFAULT_PREFIX, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT, gateway: str = ""
) -> Daemon | None:
    """Signal the lab's daemon (SIGTERM by default) and wait; SIGKILL after `timeout` seconds.

    Returns the stopped daemon (its exit code readable when this process started it), or None
    when none was running.
    """
    state = LabState(prefix, gateway)
    daemon = running_daemon(prefix, gateway)
    state.pid_file.unlink(missing_ok=True)
    if daemon is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(daemon.pid, sig)
    if not _wait_gone(daemon, timeout) and sig != signal.SIGKILL:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon.pid, signal.SIGKILL)
        _wait_gone(daemon, timeout)
    if daemon.process is not None:
        daemon.process.wait(timeout=timeout)
    _started.pop(state.directory, None)
    return daemon


def running_daemon(prefix: str = DEFAULT_PREFIX, gateway: str = "") -> Daemon | None:
    """The lab's daemon if it runs: started by us, or found through the pid file."""
    state = LabState(prefix, gateway)
    known = _started.get(state.directory)
    if known is not None:
        return known if known.alive() else _forget(state, known)
    try:
        pid = int(state.pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    if not process_alive(pid) or not _is_our_daemon(pid, state.namespace):
        return None  # exited, and the pid may belong to someone else by now
    return Daemon(pid, state.log_file)


def _forget(state: LabState, daemon: Daemon) -> None:
    if daemon.process is not None:
        daemon.process.poll()  # reap it
    _started.pop(state.directory, None)


def _is_our_daemon(pid: int, gw_ns: str) -> bool:
    """Is `pid` an `nfqfw run` in the gateway namespace (and not a process that reused the pid)?"""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        its_ns = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return False
    # `ip netns exec NS cmd` execs cmd, so the command line is nfqfw's own.
    if not (b"nfqfw" in argv and b"run" in argv):
        return False
    try:
        gw = os.stat(NETNS_DIR / gw_ns)
    except FileNotFoundError:
        return True  # the namespace's name is gone but the daemon still holds it
    return (its_ns.st_dev, its_ns.st_ino) == (gw.st_dev, gw.st_ino)


def _wait_gone(daemon: Daemon, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while daemon.alive():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    tail = text.splitlines()[-lines:]
    return f"last lines of {path}:\n" + "\n".join("  " + line for line in tail)
