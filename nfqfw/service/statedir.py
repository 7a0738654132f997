"""The state directory of `nfqfw run` (--state-dir, default /var/lib/nfqfw): the flow snapshot.

`flows.snapshot` there holds the flow table in nfqfw.core.snapshot's format (versioned,
SHA-256-checked). It is written when nfqfw stops and every --snapshot-interval seconds while it
runs, atomically: `flows.snapshot.tmp` (mode 0600) is written and fsync'ed, renamed over the
old file, and the directory is fsync'ed, so a crash at any moment leaves either the old or the
new snapshot, never half of one. A periodic snapshot is encoded between packets, SLICE_FLOWS
flows per housekeeping round (a full table in short pauses, not one of ~0.1 s), and written in
a thread: the disk's slowness (fsync) stays off the packet path.

At start, before the queue is bound, the snapshot is read back: flows whose time ran out while
nfqfw was down are dropped, the others are put into the table. Only the snapshot of a stop in
failure-mode closed is exact (nothing passed unseen since); from any other, TCP flows learn their
windows anew (nfqfw.core.snapshot). An exact snapshot is rewritten as not exact right after it
was restored: once packets flow again, it no longer is. A file that is missing starts an
empty table; one that is corrupt, truncated, foreign, of an unknown version, or that anyone but
its owner (root) may write, is logged, moved aside as `flows.snapshot.bad` and ignored:
never fatal. A state directory writable by group or others is not used at all (whoever can
write it could hand nfqfw flows the policy never admitted).

A worker of `nfqfw run --workers` (nfqfw.service.supervisor) keeps its own file, `flows.queue-N.snapshot`
(`name`), and may be told to restore other snapshot files too (`adopt`: when the queue layout
changed since they were written, see nfqfw.service.supervision). An adopted file is only read: a bad one is
logged and skipped, never moved aside (the other workers read it too, and the supervisor removes
what no queue owns any more). A restore that adopts takes no file as exact, its own included:
each may hold stale copies adopted at the last layout change (see `_restore`). The adopted
flows are written to the worker's own file right away, before its queue is bound. The
single-process daemon adopts the per-queue files a run with workers left (`consume_adopted`):
it keeps their flows in `flows.snapshot` and removes them.

With `offload: established`, the records of the flows nfqfw handed over to the kernel
(Engine.offloaded) are saved beside it, in the same format, as `flows.snapshot.offloaded`
(OFFLOADED_SUFFIX), with the kernel's time left as their lifetime (nfqfw.service.offload). At
start `restore_offloaded` reads them back for the daemon, which asks the kernel which it still
carries (nfqfw.service.offload.Offload.adopt). Another queue's file of them is not adopted after
a change of the queue range: those flows go on in the kernel, unlisted until they end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

from nfqfw.core import snapshot

log = logging.getLogger("nfqfw")

DEFAULT_STATE_DIR = "/var/lib/nfqfw"
DEFAULT_SNAPSHOT_INTERVAL = 10.0  # seconds; at most this much of new flows is lost in a crash
SNAPSHOT_NAME = "flows.snapshot"
OFFLOADED_SUFFIX = ".offloaded"  # the records of the offloaded flows, beside the snapshot
FILE_MODE = 0o600
DIR_MODE = 0o700
EMPTY = "starting with an empty flow table"
SLICE_FLOWS = 4096  # flows a periodic snapshot encodes per housekeeping round (~7 ms here)
SLICE_GAP = 0.01  # seconds of packets between two slices


class StateFileError(Exception):
    """The snapshot file cannot be trusted or read; str() says why."""


def write_atomically(path: str, data: bytes) -> None:
    """Replace `path` with `data`: a crash leaves the old content or the new, never a mix."""
    directory = os.path.dirname(path) or "."
    tmp = path + ".tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # a leftover temp file may have had another mode
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power cut
    finally:
        os.close(dir_fd)


def read_trusted(path: str) -> bytes:
    """The file's bytes, if it is a regular file only its owner, us, may write.
    FileNotFoundError when there is none; StateFileError when it must not be used."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise StateFileError(f"cannot open it: {err.strerror or err}") from err
    try:
        _check_trusted(os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as file:
        return file.read()


def _check_trusted(info: os.stat_result) -> None:
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISREG(info.st_mode):
        raise StateFileError("not a regular file")
    if info.st_uid != os.geteuid():
        raise StateFileError(f"owned by uid {info.st_uid}, not by uid {os.geteuid()}")
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateFileError(f"writable by group or others (mode {mode:04o})")


class StateDir:
    """The flow snapshot of one daemon: restore() at start, tick() from housekeeping, save() at stop."""

    def __init__(
        self,
        directory: str = DEFAULT_STATE_DIR,
        interval: float = DEFAULT_SNAPSHOT_INTERVAL,
        wall_clock: Callable[[], float] = time.time,
        name: str = SNAPSHOT_NAME,
        adopt: tuple[str, ...] = (),
        consume_adopted: bool = False,
    ) -> None:
        self.directory = directory
        self.path = os.path.join(directory, name)
        self.offloaded_path = self.path + OFFLOADED_SUFFIX
        self.adopt = tuple(os.path.join(directory, other) for other in adopt if other != name)
        self.consume_adopted = consume_adopted  # the only reader: remove them once kept in our file
        self.interval = interval  # 0: only at stop
        self.wall_clock = wall_clock
        self.usable = False  # set by prepare(): the directory exists and is ours alone
        self.last_saved: int | None = None  # flows in the last snapshot written
        self._next = 0.0
        self._writer: threading.Thread | None = None
        self._encoder: snapshot.TableEncoder | None = None  # a periodic snapshot under way
        self._encoded: list[tuple[bytes, int, str]] = []  # its finished files: data, flows, path
        self._failing = False

    # -- start --

    def prepare(self) -> bool:
        """Create the directory if needed and check that nobody else may write it."""
        try:
            os.makedirs(self.directory, mode=DIR_MODE, exist_ok=True)
            info = os.stat(self.directory)
        except OSError as err:
            log.error(
                "state directory %s unusable (%s): flows are not kept across restarts", self.directory, err
            )
            return False
        mode = stat.S_IMODE(info.st_mode)
        if mode & (stat.S_IWGRP | stat.S_IWOTH) or info.st_uid != os.geteuid():
            log.error(
                "state directory %s is writable by others than uid %d (mode %04o, owner uid %d): "
                "not used, flows are not kept across restarts",
                self.directory,
                os.geteuid(),
                mode,
                info.st_uid,
            )
            return False
        self.usable = True
        return True

    def restore(self, engine: Any, now: float, recheck: bool) -> int:
        """Fill the engine's empty table from the snapshot (call before the queue is bound).
        `recheck`: remove the flows the current policy would not let start (policy option
        reload: recheck), as a reload does. Returns the number of flows in the table; never raises."""
        if not self.prepare():
            return 0
        self._next = now + self.interval
        kept = self._restore_own(engine, now, recheck)
        if self.adopt:
            kept = self._adopt(engine, now, recheck)
            self._keep_adopted(engine, now)
        return kept

    def _keep_adopted(self, engine: Any, now: float) -> None:
        """Write the adopted flows into our own file at once: a crash before the first periodic
        snapshot must not leave a file that lacks them (or holds another layout's share)."""
        if not self.save(engine, now) or not self.consume_adopted:
            return
        for path in self.adopt:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                log.info("removed %s: its flows are kept in %s", path, self.path)

    def _restore_own(self, engine: Any, now: float, recheck: bool) -> int:
        try:
            data = read_trusted(self.path)
        except FileNotFoundError:
            log.info("no flow snapshot at %s: %s", self.path, EMPTY)
            return 0
        except (StateFileError, OSError) as err:
            self._set_aside(str(err))
            return 0
        try:
            return self._restore(engine, data, now, recheck)
        except snapshot.SnapshotError as err:
            self._set_aside(str(err))
        except Exception as err:  # a bug here must not keep the firewall from starting
            log.exception("restoring the flow snapshot failed")
            self._set_aside(f"internal error: {err!r}")
        engine.conntrack.clear()
        return 0

    def _adopt(self, engine: Any, now: float, recheck: bool) -> int:
        """Add the flows of the other snapshot files (flows already in the table are kept)."""
        for path in self.adopt:
            try:
                restored = snapshot.decode(read_trusted(path), now, self.wall_clock(), trust_exact=False)
            except FileNotFoundError:
                continue
            except (StateFileError, OSError, snapshot.SnapshotError) as err:
                log.warning("flow snapshot %s not adopted: %s", path, err)
                continue
            installed = snapshot.install(engine.conntrack, restored.flows)
            log.info("adopted %d flows from %s", installed.restored, path)
        if recheck:
            from nfqfw.core.recheck import recheck as recheck_flows

            recheck_flows(engine)
        return len(engine.conntrack)

    def _restore(self, engine: Any, data: bytes, now: float, recheck: bool) -> int:
        # With files to adopt (the queue layout changed), no file is exact: each also holds the
        # copies its worker adopted at the last change, which saw no packet since, and such a
        # stale copy may be the one kept where the flow's packets now go. Trusted as exact, its
        # frozen TCP windows would drop the connection's packets.
        restored = snapshot.decode(data, now, self.wall_clock(), trust_exact=not self.adopt)
        if restored.clock_went_back:
            log.warning(
                "the wall clock is behind the flow snapshot's save time: counting no time as passed since"
            )
        installed = snapshot.install(engine.conntrack, restored.flows)
        if restored.exact:
            self._write(*self._encode(engine, now, exact=False))
        stale = 0
        if recheck:
            from nfqfw.core.recheck import recheck as recheck_flows

            stale = len(recheck_flows(engine))
        kept = len(engine.conntrack)
        log.info(
            "restored %d flows from %s (saved %.1f s ago %s): %d had run out, %d are not allowed by the "
            "policy any more%s, %d did not fit the table",
            kept,
            self.path,
            restored.elapsed,
            "at a stop" if restored.exact else "while running; TCP windows are learnt anew",
            restored.expired,
            stale,
            "" if recheck else " (not checked: reload: keep)",
            installed.table_full,
        )
        return kept

    def _set_aside(self, why: str, path: str | None = None, what: str = EMPTY) -> None:
        path = path or self.path
        bad = path + ".bad"
        try:
            os.replace(path, bad)
            kept = f" (moved to {bad})"
        except OSError:
            kept = ""
        log.warning("flow snapshot %s ignored: %s%s; %s", path, why, kept, what)

    def restore_offloaded(self, now: float) -> list[Any]:
        """The records of the offloaded flows the last run saved, not yet placed (see the module
        docstring); never raises."""
        if not self.usable:
            return []
        try:
            data = read_trusted(self.offloaded_path)
        except FileNotFoundError:
            return []
        except (StateFileError, OSError) as err:
            self._set_aside(str(err), self.offloaded_path, "no offloaded flow records")
            return []
        try:
            return list(snapshot.decode(data, now, self.wall_clock(), trust_exact=False).flows)
        except snapshot.SnapshotError as err:
            self._set_aside(str(err), self.offloaded_path, "no offloaded flow records")
        return []

    # -- while running --

    def tick(self, engine: Any, now: float) -> float:
        """Housekeeping: when a periodic snapshot is due, encode the table a slice at a time and
        write it in the background; returns when it wants to be called again. A write still
        running from the last round makes this round skip."""
        if not self.usable or self.interval <= 0:
            return math.inf
        if self._encoder is None:
            if now < self._next:
                return self._next
            self._next = now + self.interval
            if self._writer is not None and self._writer.is_alive():
                log.warning(
                    "flow snapshot: the last write to %s is still running, skipping this one", self.path
                )
                return self._next
            self._encoder = snapshot.TableEncoder(engine.conntrack, now, self.wall_clock())
            self._encoded = []
        if not self._encoder.step(SLICE_FLOWS):
            return now + SLICE_GAP
        data, count = self._encoder.result()
        self._encoded.append((data, count, self.path if not self._encoded else self.offloaded_path))
        offloaded = getattr(engine, "offloaded", None)
        if len(self._encoded) == 1 and offloaded is not None and self._keeps_offloaded(offloaded):
            self._encoder = snapshot.TableEncoder(offloaded, now, self.wall_clock())
            return now + SLICE_GAP
        self._encoder = None
        self._writer = threading.Thread(
            target=self._write_all, args=(self._encoded,), name="nfqfw-snapshot", daemon=True
        )
        self._writer.start()
        return self._next

    def _keeps_offloaded(self, offloaded: Any) -> bool:
        """Write the offloaded records: there are some, or a file of earlier ones to empty."""
        return bool(len(offloaded)) or os.path.exists(self.offloaded_path)

    def _write_all(self, files: list[tuple[bytes, int, str]]) -> None:
        for data, count, path in files:
            self._write(data, count, path)

    def save(self, engine: Any, now: float, exact: bool = False) -> bool:
        """Write the snapshot now and wait for it (at stop). `exact`: no packet will pass unseen
        until the next start (a stop in failure-mode closed). True when it is on disk."""
        if not self.usable:
            return False
        self._encoder = None  # a periodic one under way: this one replaces it
        if self._writer is not None:
            self._writer.join()
        data, count = self._encode(engine, now, exact)
        if not self._write(data, count):
            return False
        log.info("saved %d flows to %s", count, self.path)
        offloaded = getattr(engine, "offloaded", None)
        if offloaded is not None and self._keeps_offloaded(offloaded):
            data, count = snapshot.encode_table(offloaded, now, self.wall_clock())
            if self._write(data, count, self.offloaded_path):
                log.info("saved the records of %d offloaded flows to %s", count, self.offloaded_path)
        return True

    def _encode(self, engine: Any, now: float, exact: bool) -> tuple[bytes, int]:
        return snapshot.encode_table(engine.conntrack, now, self.wall_clock(), exact)

    def _write(self, data: bytes, count: int, path: str | None = None) -> bool:
        path = path or self.path
        try:
            write_atomically(path, data)
        except OSError as err:
            if not self._failing:  # once per run of failures, not every interval
                log.error("cannot save the flow snapshot to %s: %s", path, err)
            self._failing = True
            return False
        if self._failing:
            log.info("flow snapshot saved to %s again", path)
        self._failing = False
        if path == self.path:
            self.last_saved = count
        return True
