"""The pure part of `nfqfw run --workers` (nfqfw.service.supervisor): what the supervisor decides and merges.

No sockets, no processes, no clocks: the workers' notifications and the counts they carry as
data (COUNTS_FIELD), the STATUS= line (of every service), the restart back-off, the health rule
behind the systemd watchdog, the snapshot layout decision, and the merging of the workers'
control answers into one. nfqfw.service.supervisor does the I/O around it; the unit tests drive
it directly.

Snapshot layout. Each worker saves its queue's flows to `flows.queue-N.snapshot`. The kernel
picks a flow's queue with a hash of its addresses and protocol (both directions alike), seeded
at random once per boot (xt_NFQUEUE's jhash_initval, unreadable from user space), scaled to the
number of queues. So a flow stays on its queue only while both the queue range and the boot stay
the same. `Layout` records them (in `workers.layout` next to the snapshots):

- same layout as the snapshots were written under: each worker restores its own file only,
  which is exact (the kernel sends it exactly those flows);
- anything else (another queue range, a reboot, a single-process `flows.snapshot`, no layout
  record): nobody can tell which queue a saved flow will hit now, so every worker restores the
  flows of every snapshot file. Each flow is then known wherever the kernel sends it; the
  copies in the other workers see no packet and leave at their timeout. Until then they take
  table room and are counted (and listed) once per worker holding them: `flows` shows a flow
  once (`merge_flows` keeps one record per flow), `status` counts copies. Once every worker is
  up, the files no queue of the new range owns are removed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from nfqfw.service.statedir import SNAPSHOT_NAME

SINGLE_SNAPSHOT = SNAPSHOT_NAME  # the single-process daemon's file
_QUEUE_SNAPSHOT = re.compile(r"^flows\.queue-(\d+)\.snapshot$")
COUNTS_FIELD = "X_NFQFW_COUNTS"  # a worker's counts (JSON) in its notifications

QUICK_DEATH = 30.0  # seconds: a worker that dies sooner after its start is restarted more slowly
FIRST_DELAYS = (0.0, 0.5, 1.0, 2.0, 4.0)  # restart delay after 0, 1, 2... quick deaths in a row
MAX_DELAY = 5.0


# --- sd_notify messages from the workers ------------------------------------------------------


def parse_notify(message: bytes) -> dict[str, str]:
    """`KEY=value` lines of one datagram (sd_notify(3)); malformed lines are ignored."""
    fields = {}
    for line in message.decode(errors="replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields


@dataclass(frozen=True)
class Counts:
    """What a STATUS= line counts; a worker also sends its own to the supervisor as COUNTS_FIELD."""

    verdicts: int = 0
    flows: int = 0
    rejects: int = 0

    @classmethod
    def total(cls, counts: Iterable[Counts]) -> Counts:
        counts = list(counts)
        return cls(*(sum(getattr(c, name) for c in counts) for name in ("verdicts", "flows", "rejects")))


def counts_assignment(counts: Counts) -> str:
    """The notify assignment that carries a worker's counts to its supervisor (systemd ignores
    names it does not know; a worker's notify socket is its supervisor's anyway)."""
    return f"{COUNTS_FIELD}={json.dumps(asdict(counts), separators=(',', ':'))}"


def counts_of(fields: dict[str, str]) -> Counts | None:
    """The counts in a worker's notification, None when it carries none (or damaged ones)."""
    text = fields.get(COUNTS_FIELD)
    if text is None:
        return None
    try:
        data = json.loads(text)
        return Counts(int(data["verdicts"]), int(data["flows"]), int(data["rejects"]))
    except (ValueError, KeyError, TypeError):
        return None


def status_line(queue_text: str, panic: bool, counts: Counts, workers: tuple[int, int] | None = None) -> str:
    """The STATUS= line of a daemon, or with `workers` (up, of) of a supervisor."""
    head = "PANIC MODE, " if panic else ""
    scope = "" if workers is None else f", {workers[0]} of {workers[1]} workers up"
    total = f"{counts.verdicts} verdicts, {counts.flows} flows, {counts.rejects} rejects sent"
    return f"{head}queue {queue_text}{scope}: {total}"


# --- supervision ------------------------------------------------------------------------------


def restart_delay(quick_deaths: int) -> float:
    """Seconds to wait before restarting a worker that died after `quick_deaths` quick deaths
    in a row (0: at once): a worker that cannot start must not spin the machine."""
    if quick_deaths < len(FIRST_DELAYS):
        return FIRST_DELAYS[quick_deaths]
    return MAX_DELAY


def describe_exit(status: int) -> str:
    """A waitpid() status in words."""
    import os
    import signal

    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        return f"killed by {name}"
    if os.WIFEXITED(status):
        return f"exited with code {os.WEXITSTATUS(status)}"
    return f"status {status}"


@dataclass(frozen=True)
class Health:
    """One worker as the watchdog rule sees it."""

    alive: bool
    ready: bool
    last_ping: float  # monotonic time of its last WATCHDOG=1 (or of its start)


def wedged(health: Health, now: float, ping_timeout: float, start_timeout: float) -> bool:
    """A live worker that stopped sending heartbeats (or never got ready) must be killed."""
    if not health.alive:
        return False
    limit = ping_timeout if health.ready else start_timeout
    return now - health.last_ping > limit


def all_healthy(workers: Iterable[Health], now: float, ping_timeout: float) -> bool:
    """WATCHDOG=1 goes to systemd only while this holds: every worker alive, ready, pinging."""
    return all(h.alive and h.ready and now - h.last_ping <= ping_timeout for h in workers)


# --- snapshot layout --------------------------------------------------------------------------


def worker_snapshot(queue: int) -> str:
    return f"flows.queue-{queue}.snapshot"


@dataclass(frozen=True)
class Layout:
    """Under which queues and boot the per-queue snapshots were written (see the docstring)."""

    queues: tuple[int, ...]
    boot_id: str

    def dumps(self) -> str:
        return json.dumps({"queues": list(self.queues), "boot_id": self.boot_id}) + "\n"

    @classmethod
    def loads(cls, text: str) -> Layout | None:
        """None for anything but a layout record (a missing or damaged file means "unknown")."""
        try:
            data = json.loads(text)
            queues = tuple(int(q) for q in data["queues"])
            boot_id = str(data["boot_id"])
        except (ValueError, KeyError, TypeError):
            return None
        return cls(queues, boot_id)


def is_snapshot_file(name: str) -> bool:
    return name == SINGLE_SNAPSHOT or _QUEUE_SNAPSHOT.match(name) is not None


def queue_snapshots(present: Iterable[str]) -> tuple[str, ...]:
    """The per-queue snapshot files among `present` (left by a run with workers)."""
    return tuple(sorted(name for name in present if _QUEUE_SNAPSHOT.match(name)))


def to_adopt(saved: Layout | None, current: Layout, present: Iterable[str]) -> tuple[str, ...]:
    """The snapshot files every worker restores besides its own: none when the layout is the
    same, else all of them (the kernel's flow-to-queue mapping is unknown). A single-process
    `flows.snapshot` means a run without workers came in between (the supervisor removes it once
    its flows are restored), and an unknown boot id may be another boot: all of them then too."""
    names = sorted(set(present))
    if saved == current and current.boot_id and SINGLE_SNAPSHOT not in names:
        return ()
    return tuple(name for name in names if is_snapshot_file(name))


def leftovers(current: Layout, present: Iterable[str]) -> list[str]:
    """Snapshot files no queue of `current` owns: removed once every worker has restored."""
    own = {worker_snapshot(queue) for queue in current.queues}
    return sorted(name for name in present if is_snapshot_file(name) and name not in own)


# --- merging the workers' control answers -----------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One worker's answer to a fanned-out request: `result`, or `error` when it gave none."""

    queue: int
    pid: int | None
    result: Any = None
    error: str | None = None


def _sum_counts(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in dicts:
        for key, value in counts.items():
            total[key] = total.get(key, 0) + value
    return total


def _merge_census(tables: Iterable[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    merged: dict[str, dict[str, int]] = {}
    for table in tables:
        for proto, states in table.items():
            into = merged.setdefault(proto, {})
            for state, count in states.items():
                into[state] = into.get(state, 0) + count
    return dict(sorted(merged.items()))


def merge_flow_stats(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The workers' `flows` parts of status summed (max: the sum of the per-worker bounds)."""
    merged = {
        "total": sum(s["total"] for s in stats),
        "max": sum(s["max"] for s in stats),
        "by_proto": _merge_census(s["by_proto"] for s in stats),
        "expired": sum(s["expired"] for s in stats),
        "early_drops": sum(s["early_drops"] for s in stats),
    }
    offloaded = [s["offloaded"] for s in stats if "offloaded" in s]
    if offloaded:
        merged["offloaded"] = {
            "total": sum(o["total"] for o in offloaded),
            "by_proto": _merge_census(o["by_proto"] for o in offloaded),
        }
    return merged


def worker_entry(answer: Answer, state: dict[str, Any]) -> dict[str, Any]:
    """One line of the per-worker breakdown: the supervisor's view plus the worker's counts."""
    entry = {"queue": answer.queue, "pid": answer.pid, **state}
    status = answer.result
    if status is None:
        entry["error"] = answer.error or "no answer"
        return entry
    entry["flows"] = status["flows"]["total"]
    entry["verdicts"] = sum(status["verdicts"].values())
    entry["policy_sha256"] = status["policy"]["sha256"]
    return entry


def merge_status(answers: Sequence[Answer], states: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The counts of the supervisor's status (its own fields come from the service core): the
    answering workers' counters summed and a per-worker breakdown under "workers"."""
    statuses = [a.result for a in answers if a.result is not None]
    merged: dict[str, Any] = {}
    merged["gso"] = bool(statuses) and all(s.get("gso", False) for s in statuses)
    merged["flows"] = merge_flow_stats([s["flows"] for s in statuses])
    merged["verdicts"] = _sum_counts(s["verdicts"] for s in statuses)
    merged["zones"] = _sum_counts(s.get("zones", {}) for s in statuses)
    merged["adapter"] = _sum_counts(s["adapter"] for s in statuses)
    merged["workers"] = [worker_entry(a, states.get(a.queue, {})) for a in answers]
    if any("talkers" in s for s in statuses):
        merged["talkers"] = merge_talkers([s.get("talkers", []) for s in statuses])
    return merged


def merge_talkers(lists: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The workers' top addresses (each worker's own top N) as one top N: flows summed per
    address, the longest list's length kept. An address below every worker's top N but high
    in the sum is missed: `nfqfw top` shows a close picture, not an exact one."""
    flows: Counter[str] = Counter()
    for talkers in lists:
        for entry in talkers:
            flows[entry["addr"]] += entry["flows"]
    limit = max((len(talkers) for talkers in lists), default=0)
    return [{"addr": addr, "flows": count} for addr, count in flows.most_common(limit)]


def _flow_identity(record: dict[str, Any]) -> tuple[Any, ...]:
    keys = ("protonum", "src", "dst", "sport", "dport", "type", "code", "id")
    return tuple(record.get(key) for key in keys)


def merge_flows(answers: Sequence[Answer]) -> dict[str, Any]:
    """The union of the workers' flow lists, each record tagged with its worker's queue. A flow
    held by several workers (adopted after a layout change) is listed once: the copy with the
    most time left, the one its packets keep alive."""
    chosen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for answer in answers:
        if answer.result is None:
            continue
        for record in answer.result["flows"]:
            tagged = {**record, "queue": answer.queue}
            identity = _flow_identity(tagged)
            known = chosen.get(identity)
            if known is None or tagged["timeout"] > known["timeout"]:
                chosen[identity] = tagged
    results = [a.result for a in answers if a.result is not None]
    return {
        "tracked": sum(r["tracked"] for r in results),
        "max_flows": sum(r["max_flows"] for r in results),
        "flows": list(chosen.values()),
        "unanswered": [{"queue": a.queue, "error": a.error} for a in answers if a.result is None],
    }


def merge_flush(answers: Sequence[Answer]) -> dict[str, Any]:
    results = [a.result for a in answers if a.result is not None]
    return {
        "removed": sum(r["removed"] for r in results),
        "tracked": sum(r["tracked"] for r in results),
        "unanswered": [{"queue": a.queue, "error": a.error} for a in answers if a.result is None],
    }


def merge_ha(answers: Sequence[Answer]) -> dict[str, int]:
    """The workers' answers to an `ha` request: their counts ("taken_over", "forgotten") summed."""
    totals: dict[str, int] = {}
    for result in (a.result for a in answers if a.result is not None):
        for what, count in result.items():
            if what not in ("role", "previous") and isinstance(count, int):
                totals[what] = totals.get(what, 0) + count
    return totals


@dataclass(frozen=True)
class ReloadMerge:
    ok: bool
    errors: tuple[str, ...]
    removed: int | None  # None: reload: keep (no worker removed flows)


def merge_reloads(answers: Sequence[Answer]) -> ReloadMerge:
    """All workers' reload outcomes as one: ok only if every worker swapped the policy in."""
    errors: list[str] = []
    removed: int | None = None
    for answer in answers:
        outcome = answer.result
        if outcome is None:
            errors.append(f"queue {answer.queue}: {answer.error or 'no answer'}")
            continue
        if not outcome["ok"]:
            errors += [f"queue {answer.queue}: {line}" for line in outcome["errors"] or ["reload failed"]]
        elif outcome.get("removed") is not None:
            removed = (removed or 0) + outcome["removed"]
    return ReloadMerge(not errors, tuple(errors), removed)


def as_reload_outcome(answer: Answer, key: str) -> Answer:
    """A worker's answer to confirm or rollback ({key: true, ...}) as a reload outcome, for
    merge_reloads."""
    if answer.result is None:
        return answer
    ok = bool(answer.result.get(key))
    errors = [] if ok else [f"not {key.replace('_', ' ')}"]
    return Answer(answer.queue, answer.pid, {"ok": ok, "errors": errors})


def merge_cut_previews(answers: Sequence[Answer]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The flows each worker would cut (a dry run), tagged with its queue; and who did not answer."""
    cut: list[dict[str, Any]] = []
    unanswered = []
    for answer in answers:
        if answer.result is None or not answer.result.get("ok"):
            why = answer.error or "; ".join((answer.result or {}).get("errors", [])) or "no answer"
            unanswered.append({"queue": answer.queue, "error": why})
            continue
        cut += [{**record, "queue": answer.queue} for record in answer.result["cut"]]
    return cut, unanswered


def merge_set_changes(
    answers: Sequence[Answer], name: str, addr: str, op: str, changed: bool
) -> dict[str, Any]:
    """The workers' answers to a set add/del as one: the flows they cut summed."""
    results = [a.result for a in answers if a.result is not None]
    return {
        "set": name,
        "addr": addr,
        "op": op,
        "changed": changed,
        "removed": sum(r["removed"] for r in results),
        "unanswered": [{"queue": a.queue, "error": a.error} for a in answers if a.result is None],
    }
