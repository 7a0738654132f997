"""nfqfw.service.statedir: the snapshot file (atomic, 0600, trusted only when ours) and the daemon's hooks.

Run as root or not: the file checks compare with the effective uid, whichever it is.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
import time
from pathlib import Path

import pytest

from nfqfw.commands.run import _seconds
from nfqfw.core import snapshot
from nfqfw.core.build import addr, ipv4, tcp, udp
from nfqfw.core.config import load_policy, parse_policy
from nfqfw.core.engine import Engine
from nfqfw.core.packet import ACK, SYN
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.verdict import Action, Hook, Meta
from nfqfw.service import statedir as statefile
from nfqfw.service.daemon import Daemon, WorkerDaemon
from nfqfw.service.options import Options
from nfqfw.service.statedir import StateDir, StateFileError, read_trusted, write_atomically

POLICY_FILE = Path(__file__).resolve().parents[3] / "config" / "policy.yaml"
OUT = Meta(Hook.FORWARD, "lan0", "wan0")
IN = Meta(Hook.FORWARD, "wan0", "lan0")
LAN, WAN = addr("10.0.0.5"), addr("203.0.113.7")
WALL = 1_700_000_000.0
EMPTY = "starting with an empty flow table"


def engine(text: str | None = None) -> Engine:
    config = load_policy(POLICY_FILE) if text is None else parse_policy(text)
    return Engine(CompiledPolicy(config))


def with_flows(now: float = 100.0) -> Engine:
    """An established TCP flow LAN->WAN:80 (five days to live) and an unreplied UDP one to :53 (30 s)."""
    e = engine()
    syn = tcp(LAN, WAN, 40000, 80, seq=1, flags=SYN)
    synack = tcp(WAN, LAN, 80, 40000, seq=9, ack=2, flags=SYN | ACK)
    ack = tcp(LAN, WAN, 40000, 80, seq=2, ack=10, flags=ACK)
    for src, dst, segment, meta in ((LAN, WAN, syn, OUT), (WAN, LAN, synack, IN), (LAN, WAN, ack, OUT)):
        assert e.process(ipv4(src, dst, 6, segment), meta, now).action is Action.ACCEPT
    assert e.process(ipv4(LAN, WAN, 17, udp(LAN, WAN, 40001, 53, b"q")), OUT, now).action is Action.ACCEPT
    return e


def store(directory: Path, wall: float = WALL, interval: float = 10.0) -> StateDir:
    return StateDir(str(directory), interval, wall_clock=lambda: wall)


def saved(state: Path, exact: bool = False) -> Path:
    """The snapshot file of `with_flows()`, saved at monotonic 100, wall-clock WALL."""
    saver = store(state)
    assert saver.prepare()
    assert saver.save(with_flows(100.0), 100.0, exact)
    return state / "flows.snapshot"


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "nfqfw" and r.levelno >= level]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


# -- the file ------------------------------------------------------------------------------------


def test_write_atomically_writes_0600_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    old = os.umask(0)
    try:
        write_atomically(str(path), b"one")
        write_atomically(str(path), b"two")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"two"
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_a_leftover_temp_file_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "f"
    leftover = tmp_path / "f.tmp"
    leftover.write_bytes(b"half of an old snapshot, much longer than the new one")
    leftover.chmod(0o644)
    write_atomically(str(path), b"new")
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o600
    assert not leftover.exists()


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    write_atomically(str(path), b"old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statefile.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(str(path), b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_read_trusted(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    path.chmod(0o600)
    assert read_trusted(str(path)) == b"data"
    path.chmod(0o620)
    with pytest.raises(StateFileError, match=r"^writable by group or others \(mode 0620\)$"):
        read_trusted(str(path))
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(StateFileError, match=r"^cannot open it: Too many levels of symbolic links$"):
        read_trusted(str(link))
    with pytest.raises(StateFileError, match=r"^not a regular file$"):
        read_trusted(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        read_trusted(str(tmp_path / "missing"))


# -- restore and save ----------------------------------------------------------------------------


def test_save_then_restore_with_the_time_that_passed(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    snapshot_file = saved(state, exact=True)
    assert snapshot_file.stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    fresh = engine()
    with caplog.at_level(logging.INFO, logger="nfqfw"):
        assert store(state, WALL + 40.0).restore(fresh, 7.0, recheck=True) == 1
    assert messages(caplog)[-1] == (
        f"restored 1 flows from {snapshot_file} (saved 40.0 s ago at a stop): 1 had run out, "
        "0 are not allowed by the policy any more, 0 did not fit the table"
    )
    (flow,) = fresh.conntrack
    assert flow.state_name == "ESTABLISHED" and flow.deadline == 7.0 + 432000.0 - 40.0
    # ... and the connection carries on in the new engine.
    data = ipv4(WAN, LAN, 6, tcp(WAN, LAN, 80, 40000, seq=10, ack=2, flags=ACK, payload=b"hello"))
    assert fresh.process(data, IN, 8.0).reason == "established"
    # Packets flow again: the file on disk is no longer exact, and says so.
    again = snapshot.decode(snapshot_file.read_bytes(), 7.0, WALL + 40.0)
    assert not again.exact and [f.key for f in again.flows] == [flow.key]


def test_a_snapshot_taken_while_running_is_restored_with_windows_learnt_anew(
    state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saved(state)
    fresh = engine()
    with caplog.at_level(logging.INFO, logger="nfqfw"):
        assert store(state, WALL + 2.0).restore(fresh, 7.0, recheck=True) == 2
    assert messages(caplog)[-1] == (
        f"restored 2 flows from {state / 'flows.snapshot'} (saved 2.0 s ago while running; TCP windows are "
        "learnt anew): 0 had run out, 0 are not allowed by the policy any more, 0 did not fit the table"
    )
    tcp_flow = next(flow for flow in fresh.conntrack if flow.tcp is not None)
    assert tcp_flow.tcp is not None and tcp_flow.tcp.side(0)["flags"] & 0x08  # liberal


def test_saving_logs_the_count(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    saver = store(state)
    saver.prepare()
    with caplog.at_level(logging.INFO, logger="nfqfw"):
        assert saver.save(with_flows(), 100.0)
    assert messages(caplog) == [f"saved 2 flows to {state / 'flows.snapshot'}"]
    assert saver.last_saved == 2


def test_no_snapshot_yet(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="nfqfw"):
        assert store(state).restore(engine(), 0.0, recheck=True) == 0
    assert messages(caplog) == [f"no flow snapshot at {state / 'flows.snapshot'}: {EMPTY}"]
    assert state.is_dir()


def _resign(body: bytes, version: int) -> bytes:
    header = struct.pack("<8sHHQ32s", b"NFQFWFT\0", version, 0, len(body), hashlib.sha256(body).digest())
    return header + body


def _flip(data: bytes) -> bytes:
    return data[:-1] + bytes((data[-1] ^ 1,))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_flip, "checksum mismatch"),
        (lambda data: data[:100], "truncated: 48 of {length} bytes after the header"),
        (lambda data: b"# nfqfw policy\nzones: {}\n", "not an nfqfw flow snapshot"),
        (lambda data: b"", "not an nfqfw flow snapshot"),
        (
            lambda data: _resign(data[52:], 2),
            "format version 2 is newer than this nfqfw reads (it reads version 1)",
        ),
    ],
    ids=["corrupt", "truncated", "foreign", "empty", "future-version"],
)
def test_a_bad_snapshot_is_logged_set_aside_and_ignored(
    state: Path, caplog: pytest.LogCaptureFixture, damage: object, why: str
) -> None:
    path = saved(state)
    good = path.read_bytes()
    path.write_bytes(damage(good))  # type: ignore[operator]
    fresh = engine()
    with caplog.at_level(logging.INFO, logger="nfqfw"):
        assert store(state).restore(fresh, 0.0, recheck=True) == 0
    reason = why.format(length=len(good) - 52)
    assert messages(caplog, logging.WARNING) == [
        f"flow snapshot {path} ignored: {reason} (moved to {path}.bad); {EMPTY}"
    ]
    assert len(fresh.conntrack) == 0
    assert not path.exists() and (state / "flows.snapshot.bad").read_bytes() == damage(good)  # type: ignore[operator]


def test_a_snapshot_others_may_write_is_not_trusted(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = saved(state)
    path.chmod(0o666)
    fresh = engine()
    with caplog.at_level(logging.INFO, logger="nfqfw"):
        assert store(state).restore(fresh, 0.0, recheck=True) == 0
    assert messages(caplog, logging.WARNING) == [
        f"flow snapshot {path} ignored: writable by group or others (mode 0666) (moved to {path}.bad); "
        f"{EMPTY}"
    ]
    assert len(fresh.conntrack) == 0


def test_a_state_directory_others_may_write_is_not_used(
    state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state.mkdir()
    state.chmod(0o777)
    saver = store(state)
    with caplog.at_level(logging.INFO, logger="nfqfw"):
        assert saver.restore(engine(), 0.0, recheck=True) == 0
        assert saver.save(with_flows(), 100.0) is False
    assert messages(caplog, logging.ERROR) == [
        f"state directory {state} is writable by others than uid {os.geteuid()} (mode 0777, owner uid "
        f"{os.geteuid()}): not used, flows are not kept across restarts"
    ]
    assert list(state.iterdir()) == []


def test_an_unusable_state_directory_is_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    saver = store(blocker / "state")
    with caplog.at_level(logging.INFO, logger="nfqfw"):
        assert saver.restore(engine(), 0.0, recheck=True) == 0
        assert saver.save(with_flows(), 100.0) is False
    assert messages(caplog, logging.ERROR) == [
        f"state directory {blocker / 'state'} unusable ([Errno 20] Not a directory: '{blocker / 'state'}'): "
        "flows are not kept across restarts"
    ]


def test_restored_flows_are_rechecked_against_the_current_policy(
    state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saved(state)
    no_http = POLICY_FILE.read_text().replace(
        "egress:\n", "egress:\n  - name: no-http-out\n    proto: tcp\n    ports: [80]\n    action: drop\n", 1
    )
    fresh = engine(no_http)
    with caplog.at_level(logging.INFO, logger="nfqfw"):
        assert store(state, WALL + 1).restore(fresh, 0.0, recheck=True) == 1
    assert messages(caplog)[-1].endswith(
        ": 0 had run out, 1 are not allowed by the policy any more, 0 did not fit the table"
    )
    assert [flow.key[0] for flow in fresh.conntrack] == [17]
    kept = engine(no_http)
    with caplog.at_level(logging.INFO, logger="nfqfw"):
        assert store(state, WALL + 1).restore(kept, 0.0, recheck=False) == 2
    assert messages(caplog)[-1].endswith(
        ": 0 had run out, 0 are not allowed by the policy any more (not checked: reload: keep), "
        "0 did not fit the table"
    )


def test_a_restore_that_fails_inside_leaves_an_empty_table(
    state: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved(state)

    def broken(*args: object) -> object:
        raise KeyError("bug")

    monkeypatch.setattr(statefile.snapshot, "install", broken)
    fresh = engine()
    with caplog.at_level(logging.INFO, logger="nfqfw"):
        assert store(state).restore(fresh, 0.0, recheck=True) == 0
    path = state / "flows.snapshot"
    assert messages(caplog, logging.WARNING)[-1] == (
        f"flow snapshot {path} ignored: internal error: KeyError('bug') (moved to {path}.bad); {EMPTY}"
    )
    assert len(fresh.conntrack) == 0


def test_a_clock_set_back_is_reported(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    saved(state)
    fresh = engine()
    with caplog.at_level(logging.INFO, logger="nfqfw"):
        assert store(state, WALL - 3600).restore(fresh, 0.0, recheck=True) == 2
    assert messages(caplog, logging.WARNING) == [
        "the wall clock is behind the flow snapshot's save time: counting no time as passed since"
    ]


# -- periodic saves ------------------------------------------------------------------------------


def wait_for_writer(saver: StateDir) -> None:
    writer = saver._writer
    if writer is not None:
        writer.join(timeout=30)


def test_tick_saves_every_interval_in_the_background(state: Path) -> None:
    saver = store(state, interval=10.0)
    e = with_flows()
    saver.restore(e, 100.0, recheck=True)  # nothing to restore; the first save is due at 110
    path = state / "flows.snapshot"
    saver.tick(e, 109.9)
    wait_for_writer(saver)
    assert not path.exists()
    saver.tick(e, 110.0)
    wait_for_writer(saver)
    first = path.stat().st_mtime_ns
    assert saver.last_saved == 2
    assert not snapshot.decode(path.read_bytes(), 110.0, WALL).exact
    path.unlink()
    saver.tick(e, 119.0)
    wait_for_writer(saver)
    assert not path.exists()
    saver.tick(e, 120.5)
    wait_for_writer(saver)
    assert path.exists() and path.stat().st_mtime_ns >= first


def test_a_periodic_snapshot_is_encoded_a_slice_a_round(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statefile, "SLICE_FLOWS", 1)
    saver = store(state, interval=10.0)
    e = with_flows()  # two flows: two slices
    saver.restore(e, 100.0, recheck=True)
    path = state / "flows.snapshot"
    assert saver.tick(e, 109.0) == 110.0  # not due: come back then
    assert saver.tick(e, 110.0) == 110.0 + statefile.SLICE_GAP  # the first slice
    wait_for_writer(saver)
    assert not path.exists()
    assert saver.tick(e, 110.01) == 120.0  # the second: done and written
    wait_for_writer(saver)
    assert saver.last_saved == 2
    assert len(snapshot.decode(path.read_bytes(), 110.0, WALL).flows) == 2


def test_a_stop_in_the_middle_of_a_sliced_snapshot_saves_the_whole_table(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(statefile, "SLICE_FLOWS", 1)
    saver = store(state, interval=10.0)
    e = with_flows()
    saver.restore(e, 100.0, recheck=True)
    saver.tick(e, 110.0)  # one of two slices
    assert saver.save(e, 110.005, exact=True)
    path = state / "flows.snapshot"
    saved_once = path.read_bytes()
    assert snapshot.decode(saved_once, 110.0, WALL).exact and saver.last_saved == 2
    assert saver.tick(e, 110.01) == 120.0  # the periodic one was dropped, nothing written over it
    wait_for_writer(saver)
    assert path.read_bytes() == saved_once


def test_no_periodic_snapshots_no_housekeeping_wanted(state: Path) -> None:
    saver = store(state, interval=0.0)
    saver.prepare()
    assert saver.tick(with_flows(), 110.0) == math.inf


def test_interval_zero_saves_only_at_stop(state: Path) -> None:
    saver = store(state, interval=0.0)
    e = with_flows()
    saver.restore(e, 100.0, recheck=True)
    for now in (100.0, 1000.0, 100000.0):
        saver.tick(e, now)
    wait_for_writer(saver)
    assert not (state / "flows.snapshot").exists()
    assert saver.save(e, 100.0)


def test_failing_saves_are_logged_once_and_the_recovery_too(
    state: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    saver = store(state)
    saver.prepare()
    e = with_flows()
    real = statefile.write_atomically

    def full(path: str, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statefile, "write_atomically", full)
    with caplog.at_level(logging.INFO, logger="nfqfw"):
        for now in (110.0, 120.0, 130.0):
            saver.tick(e, now)
            wait_for_writer(saver)
        monkeypatch.setattr(statefile, "write_atomically", real)
        saver.tick(e, 140.0)
        wait_for_writer(saver)
    path = state / "flows.snapshot"
    assert messages(caplog) == [
        f"cannot save the flow snapshot to {path}: [Errno 28] No space left on device",
        f"flow snapshot saved to {path} again",
    ]


# -- the daemon and its command line -------------------------------------------------------------


class Notifier:
    def stopping(self, status: str | None = None) -> bool:
        return True

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("fail_open", "exact"), [(False, True), (True, False)])
def test_the_daemon_saves_at_stop(state: Path, tmp_path: Path, fail_open: bool, exact: bool) -> None:
    """Exact only in failure-mode closed: in open mode traffic passes unseen until the next start."""
    options = Options(config=str(tmp_path / "p.yaml"), state_dir=str(state))
    d = Daemon(options, notifier=Notifier(), clock=lambda: 100.0)  # type: ignore[arg-type]
    d.engine = with_flows(100.0)
    d.fail_open = fail_open
    d.state.prepare()
    d.stop()
    saved = snapshot.decode((state / "flows.snapshot").read_bytes(), 100.0, time.time())
    assert (saved.exact, len(saved.flows)) == (exact, 2)
    restored = engine()
    assert StateDir(str(state)).restore(restored, 0.0, recheck=True) == 2  # real wall clock: just saved


def test_run_command_flags() -> None:
    from nfqfw.cli import build_parser

    args = build_parser().parse_args(["run", "--config", "p.yaml"])
    assert (args.state_dir, args.snapshot_interval) == ("/var/lib/nfqfw", 10.0)
    args = build_parser().parse_args(
        ["run", "-c", "p", "--state-dir", "/tmp/s", "--snapshot-interval", "2.5"]
    )
    assert (args.state_dir, args.snapshot_interval) == ("/tmp/s", 2.5)
    assert _seconds("0") == 0.0
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(Exception, match="seconds"):
            _seconds(bad)


def test_a_worker_restores_its_own_file_and_adopts_the_others(
    state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """nfqfw run --workers after a queue layout change: the flows of every snapshot file."""
    caplog.set_level(logging.INFO, logger="nfqfw")
    saved(state).rename(state / "flows.queue-7.snapshot")  # a queue that no longer exists
    (state / "flows.queue-1.snapshot").write_bytes(b"damaged")
    (state / "flows.queue-1.snapshot").chmod(0o600)
    worker = StateDir(
        str(state),
        10.0,
        wall_clock=lambda: WALL,
        name="flows.queue-0.snapshot",
        adopt=("flows.queue-0.snapshot", "flows.queue-1.snapshot", "flows.queue-7.snapshot"),
    )
    e = engine()
    assert worker.restore(e, 100.0, recheck=True) == 2
    assert (state / "flows.queue-7.snapshot").exists()  # only read: the supervisor removes it
    assert (state / "flows.queue-1.snapshot").exists()  # a bad adopted file is not moved aside
    text = " ".join(messages(caplog))
    assert "adopted 2 flows from" in text and "not adopted" in text
    # written to the worker's own file before its queue is bound: a crash before the first
    # periodic snapshot restores them from there alone (the layout is recorded as the new one)
    again = StateDir(str(state), 10.0, wall_clock=lambda: WALL, name="flows.queue-0.snapshot")
    assert again.restore(engine(), 100.0, recheck=True) == 2


def test_a_single_daemon_keeps_the_flows_of_the_workers_before_it(
    state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--workers switched off: the per-queue files' flows go into flows.snapshot, the files go."""
    caplog.set_level(logging.INFO, logger="nfqfw")
    saved(state).rename(state / "flows.queue-1.snapshot")
    e = engine()
    single = StateDir(
        str(state), 10.0, wall_clock=lambda: WALL, adopt=("flows.queue-1.snapshot",), consume_adopted=True
    )
    assert single.restore(e, 100.0, recheck=True) == 2
    assert sorted(os.listdir(state)) == ["flows.snapshot"]
    assert (
        f"removed {state}/flows.queue-1.snapshot: its flows are kept in {state}/flows.snapshot"
        in messages(caplog)
    )
    assert store(state).restore(engine(), 100.0, recheck=True) == 2


def test_the_daemon_adopts_per_queue_snapshots_only_when_it_is_not_a_worker(state: Path) -> None:
    saved(state).rename(state / "flows.queue-3.snapshot")
    (state / "workers.layout").write_text("{}")
    single = Daemon(Options(config=str(POLICY_FILE), state_dir=str(state)))
    assert single.state.adopt == (f"{state}/flows.queue-3.snapshot",) and single.state.consume_adopted
    worker = WorkerDaemon(Options(config=str(POLICY_FILE), state_dir=str(state)))
    assert worker.state.adopt == () and not worker.state.consume_adopted


@pytest.mark.parametrize("holder", ["flows.queue-0.snapshot", "flows.queue-1.snapshot"])
def test_after_a_layout_change_no_snapshot_is_taken_as_exact(state: Path, holder: str) -> None:
    """A worker's file saved at a stop is exact for the flows it served, but it also holds the
    copies it adopted at the last layout change, which saw no packet since (the kernel sent
    those flows to other workers). After the next change such a stale copy may be the one
    restored where the flow's packets now go: trusted as exact, its frozen TCP windows drop the
    connection's packets once it has moved on by more than a window. So when files are
    adopted, every TCP flow, own file or adopted, learns its windows anew."""
    saved(state, exact=True).rename(state / holder)
    for name in ("flows.queue-0.snapshot", "flows.queue-1.snapshot"):
        if not (state / name).exists():  # the other file: a valid one, without flows
            other = StateDir(str(state), 10.0, wall_clock=lambda: WALL, name=name)
            assert other.prepare() and other.save(engine(), 100.0, exact=True)
    worker = StateDir(
        str(state),
        10.0,
        wall_clock=lambda: WALL,
        name="flows.queue-0.snapshot",
        adopt=("flows.queue-0.snapshot", "flows.queue-1.snapshot"),
    )
    e = engine()
    assert worker.restore(e, 100.0, recheck=True) == 2
    tcp_flow = next(flow for flow in e.conntrack if flow.tcp is not None)
    assert tcp_flow.tcp is not None and tcp_flow.tcp.side(0)["flags"] & 0x08  # liberal: learnt anew
    # the connection moved on (10 MB) while another worker had it: its packets still pass
    ahead = tcp(LAN, WAN, 40000, 80, seq=2 + 10_000_000, ack=10, flags=ACK, payload=b"x")
    assert e.process(ipv4(LAN, WAN, 6, ahead), OUT, 101.0).action is Action.ACCEPT
