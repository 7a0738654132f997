"""The daemon's control socket: `nfqfw status`, `flows`, `flush`, `panic` and `reload` ask here.

Where: a Unix stream socket RUNTIME_DIR/control.sock (`nfqfw run --runtime-dir`, default
/run/nfqfw), mode 0600. A path, not an abstract name, so a client in another network namespace
reaches it, and each daemon of several (one per namespace) gets a directory of its own. A
socket left by a killed daemon is replaced; one a live daemon answers on is a start-up error.

Who: root only. The file mode keeps others out, and each accepted peer's uid is checked again
with SO_PEERCRED: a client that is not uid 0 gets an error answer, whatever the file mode.

Protocol: the client sends one JSON object on one line, {"cmd": "status"} (flows and flush add
"proto", "state", "addr"; panic adds "on": true|false); the daemon answers one JSON line,
{"ok": true, "result": {...}} or {"ok": false, "error": "why"}, and closes the connection.
"metrics" is for a supervisor (nfqfw run --workers --metrics): a worker answers with its
Prometheus families as records (nfqfw.observe.metrics.records), and the supervisor serves their sum.

Served between packets, never blocking them: every socket is non-blocking and sits in one epoll
set whose descriptor the daemon's poll loop watches; `service()` also runs from housekeeping,
which under a flood is called from the packet callback (see nfqfw.kernel.queue), so requests are
answered while NetfilterQueue.run() never returns. Misbehaving clients cost little: a request
line is at most MAX_REQUEST bytes and must be complete within IDLE_TIMEOUT seconds of
connecting; a client that stops reading its answer for as long is dropped; at most MAX_CLIENTS
are served at once (more get a "busy" answer); bad JSON or an unknown command gets an error
answer. A long flow list is written a slice at a time (SLICE seconds of work per call), as fast
as the client reads it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nfqfw.control.protocol import (
    BUSY_AGAIN,
    IDLE_TIMEOUT,
    MAX_CLIENTS,
    MAX_REQUEST,
    SLICE,
    SOCKET_MODE,
    UNIX_PATH_MAX,
    Chunks,
    ControlError,
    Handler,
    RequestError,
    error,
    socket_path,
)

log = logging.getLogger(__name__)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process that connected (as the kernel recorded it at connect())."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


# --- the server -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    chunks: Chunks | None = None  # set once the request is read: the answer, still to write
    out: memoryview = field(default_factory=lambda: memoryview(b""))


class ControlServer:
    """Accepts, reads, dispatches and writes without ever blocking; see the module docstring."""

    def __init__(
        self,
        listener: socket.socket,
        handler: Handler,
        *,
        path: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        idle_timeout: float = IDLE_TIMEOUT,
        max_clients: int = MAX_CLIENTS,
        max_request: int = MAX_REQUEST,
        work_slice: float = SLICE,
        uid_of: Callable[[socket.socket], int] = peer_uid,
    ) -> None:
        listener.setblocking(False)
        self.listener = listener
        self.handler = handler
        self.path = path
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_clients = max_clients
        self.max_request = max_request
        self.work_slice = work_slice
        self._uid_of = uid_of
        self._inode = _inode(path) if path else None
        self._epoll = select.epoll()
        self._epoll.register(listener.fileno(), select.EPOLLIN)
        self._clients: dict[int, _Client] = {}

    @classmethod
    def open(cls, runtime_dir: str | os.PathLike[str], handler: Handler, **kwargs: Any) -> ControlServer:
        """Bind RUNTIME_DIR/control.sock (mode 0600); raises ControlError."""
        path = socket_path(runtime_dir)
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise ControlError(
                f"control socket path {path} is too long ({len(os.fsencode(path))} bytes, at most "
                f"{UNIX_PATH_MAX}): choose a shorter --runtime-dir"
            )
        try:
            os.makedirs(runtime_dir, mode=0o755, exist_ok=True)
            _clear_stale(path)
            listener = _bind(path)
        except OSError as err:
            raise ControlError(f"cannot set up the control socket {path}: {err.strerror or err}") from err
        return cls(listener, handler, path=path, **kwargs)

    def fileno(self) -> int:
        """Readable whenever a connection, a request or room for an answer is waiting."""
        return self._epoll.fileno()

    @property
    def clients(self) -> int:
        return len(self._clients)

    def next_due(self, now: float) -> float:
        """When housekeeping should call service() again: soon while a client is connected (its
        request may still be on its way, or its answer being written), else never."""
        return now + BUSY_AGAIN if self._clients else float("inf")

    def service(self) -> None:
        """Do what is ready now, without blocking: accept, read, answer, write, time out."""
        now = self.clock()
        stop = now + self.work_slice
        for fd, _events in self._epoll.poll(0):
            if fd == self.listener.fileno():
                self._accept(now)
                continue
            client = self._clients.get(fd)
            if client is None:
                continue
            if client.chunks is None:
                self._read(client, now)
            else:
                self._write(client, now, stop)
        self._expire(now)

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        with contextlib.suppress(OSError):
            self._epoll.close()
        self.listener.close()
        # Remove the file only if it still is ours (not a newer daemon's socket at the same path).
        if self.path is not None and self._inode is not None and _inode(self.path) == self._inode:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def close_inherited(self) -> None:
        """In a forked child (a worker of nfqfw.service.supervisor): let go of the parent's socket without
        removing its file, which the parent still serves on."""
        for client in list(self._clients.values()):
            client.sock.close()
        self._clients.clear()
        with contextlib.suppress(OSError):
            self._epoll.close()
        self.listener.close()

    # -- connections --

    def _accept(self, now: float) -> None:
        # One connection per round: a client that asks again as soon as it has its answer (a
        # script in a loop) would otherwise keep a loop here going on one `now`, every answer
        # left unclosed past its work slice, until MAX_CLIENTS of them made it "busy". The
        # listener stays readable, so the next round comes at once.
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:  # EMFILE and the like: leave it in the backlog, try later
            log.warning("control socket: accept failed: %s", err)
            return
        sock.setblocking(False)
        client = _Client(sock, now + self.idle_timeout)
        self._clients[sock.fileno()] = client
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        refusal = self._refusal(sock)
        if refusal is not None:
            self._answer(client, iter([error(refusal)]), now, now + self.work_slice)
        else:
            self._read(client, now)  # a client sends at once: one round (under a flood, 1 s) serves it

    def _refusal(self, sock: socket.socket) -> str | None:
        try:
            uid = self._uid_of(sock)
        except OSError as err:
            return f"permission denied: cannot tell who you are ({err})"
        if uid != 0:
            return f"permission denied: the control socket serves root (uid 0) only, not uid {uid}"
        if len(self._clients) > self.max_clients:
            return f"busy: {self.max_clients} clients are being served, try again"
        return None

    def _read(self, client: _Client, now: float) -> None:
        eof = False
        while b"\n" not in client.inbuf and len(client.inbuf) <= self.max_request:
            try:
                data = client.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(client)
                return
            if not data:
                eof = True
                break
            client.inbuf += data  # the deadline stays: the whole request within IDLE_TIMEOUT of connecting
        line, newline, _ = bytes(client.inbuf).partition(b"\n")
        if len(line) > self.max_request:
            answer = iter([error(f"request too long: more than {self.max_request} bytes without a newline")])
        elif newline or (eof and line.strip()):
            answer = self._dispatch(line)
        elif eof:
            self._drop(client)  # connected and went away without asking anything
            return
        else:
            return  # more to come
        self._answer(client, answer, now, now + self.work_slice)

    def _dispatch(self, line: bytes) -> Chunks:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, ValueError) as err:
            return iter([error(f"bad request: not a JSON object on one line ({err})")])
        if not isinstance(request, dict):
            return iter([error('bad request: expected a JSON object, like {"cmd": "status"}')])
        try:
            return self.handler(request)
        except RequestError as err:
            return iter([error(str(err))])
        except Exception as err:
            log.exception("control socket: request %.200r failed", line)
            return iter([error(f"internal error: {err!r}"[:500])])

    def _answer(self, client: _Client, chunks: Chunks, now: float, stop: float) -> None:
        client.chunks = chunks
        client.deadline = now + self.idle_timeout
        with contextlib.suppress(OSError):
            self._epoll.modify(client.sock.fileno(), select.EPOLLOUT)
        self._write(client, now, stop)

    def _write(self, client: _Client, now: float, stop: float) -> None:
        assert client.chunks is not None
        while True:
            if not client.out:
                try:
                    client.out = memoryview(next(client.chunks))
                except StopIteration:
                    self._drop(client)  # answer complete: closing tells the client so
                    return
                except Exception:
                    log.exception("control socket: an answer failed half-way")
                    self._drop(client)
                    return
            try:
                sent = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                return  # the client has not read yet: EPOLLOUT brings us back
            except OSError:
                self._drop(client)  # the client went away
                return
            client.out = client.out[sent:]
            client.deadline = now + self.idle_timeout
            if self.clock() >= stop:
                return

    def _expire(self, now: float) -> None:
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            if client.chunks is None:  # still waiting for the request: say why we hang up
                with contextlib.suppress(OSError):
                    client.sock.send(error(f"timeout: no complete request within {self.idle_timeout:g} s"))
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        self._clients.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        _discard_input(client.sock)
        client.sock.close()


def _discard_input(sock: socket.socket) -> None:
    """Read what the client sent and we did not: closing a Unix socket with unread data makes
    the client's next read fail with ECONNRESET, and it must see our answer first."""
    with contextlib.suppress(OSError):
        for _ in range(16):
            if not sock.recv(65536):
                return


def _inode(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _clear_stale(path: str) -> None:
    """Remove a socket nobody listens on; refuse to take over a live daemon's or a non-socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket: remove it or choose another --runtime-dir")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # left by a daemon that was killed
        return
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.ETIMEDOUT):
            raise
    finally:
        probe.close()
    raise ControlError(
        f"another nfqfw daemon answers on {path}: stop it, or give this one another --runtime-dir"
    )


def _bind(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o177)  # the socket is created 0600: no moment with a wider mode
        try:
            listener.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, SOCKET_MODE)
        listener.listen(MAX_CLIENTS)
    except BaseException:
        listener.close()
        raise
    return listener
