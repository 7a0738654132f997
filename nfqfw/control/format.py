"""What `nfqfw status`, `flows`, `flush`, `panic`, `reload`, `confirm` and `set` print: the
daemon's JSON answers (see nfqfw.control.protocol) turned into text. Pure: dicts in, lines out;
times are formatted by a function the caller passes (local time by default), so tests can pin
them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

TimeText = Callable[[float], str]


def local_time(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def duration(seconds: float) -> str:
    """3d 04:05:06, 04:05:06 or 05:06 (whole seconds)."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}" if hours or days else f"{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


# --- flows ------------------------------------------------------------------------------------


def admitted_by(text: str | None) -> str:
    """'rule web' -> 'rule=web', 'default egress' -> 'default=egress' (conntrack's key=value style)."""
    if not text:
        return "rule=?"
    kind, _, name = text.partition(" ")
    return f"{kind}={name}" if kind in ("rule", "default", "forward") and name else f"by={text}"


def format_flow(record: dict[str, Any]) -> str:
    """One line, as `conntrack -L` prints the original direction, then what admitted the flow:
    tcp      6 431999 ESTABLISHED src=10.0.0.25 dst=203.0.113.10 sport=40000 dport=80 [ASSURED] rule=web
    """
    words = [f"{record['proto']:<8} {record['protonum']} {record['timeout']}"]
    if record.get("state"):
        words.append(record["state"])
    if "src" in record:
        words += [f"src={record['src']}", f"dst={record['dst']}"]
    if "sport" in record:
        words += [f"sport={record['sport']}", f"dport={record['dport']}"]
    if "type" in record:
        words += [f"type={record['type']}", f"code={record['code']}", f"id={record['id']}"]
    if not record.get("replied"):
        words.append("[UNREPLIED]")
    if record.get("assured"):
        words.append("[ASSURED]")
    if record.get("offloaded"):  # handed over to the kernel's conntrack (offload: established)
        words.append("[OFFLOADED]")
    words.append(admitted_by(record.get("admitted_by")))
    for key in ("in", "out"):
        if record.get(key):
            words.append(f"{key}={record[key]}")
    if "queue" in record:  # from a supervisor (nfqfw run --workers): the worker that holds it
        words.append(f"queue={record['queue']}")
    return " ".join(words)


def unanswered(result: dict[str, Any]) -> str:
    """'; queue 1 did not answer (why)' for the workers missing from a merged answer."""
    missing = result.get("unanswered") or []
    return "".join(f"; queue {m['queue']} did not answer ({m['error']})" for m in missing)


def format_flows(result: dict[str, Any]) -> tuple[list[str], str]:
    """(one line per flow, the summary line for stderr)."""
    lines = [format_flow(record) for record in result["flows"]]
    tracked, most = result["tracked"], result["max_flows"]
    summary = f"{plural(len(lines), 'flow')} shown ({tracked} tracked, at most {most}){unanswered(result)}"
    return lines, summary


def format_flush(result: dict[str, Any]) -> str:
    removed = f"{plural(result['removed'], 'flow')} removed ({result['tracked']} still tracked)"
    return removed + unanswered(result)


# --- panic, reload ----------------------------------------------------------------------------


def format_panic(result: dict[str, Any]) -> str:
    state = "on: everything but loopback is dropped" if result["panic"] else "off: the policy decides again"
    already = "" if result["changed"] else " (it already was)"
    return f"panic mode {state}{already}"


def format_reload(outcome: dict[str, Any], when: TimeText = local_time) -> list[str]:
    """A reload outcome (the answer of `nfqfw reload`, and `last_reload` of the status)."""
    at = f"{when(outcome['time'])} by {outcome['trigger']}"
    if outcome["ok"]:
        removed = outcome.get("removed")
        kept = "flows kept (reload: keep)" if removed is None else f"{plural(removed, 'flow')} removed"
        done = "policy rolled back" if outcome["trigger"].startswith("rollback") else "policy reloaded"
        lines = [f"{at}: ok, {done}, {kept}"]
        within = outcome.get("confirm_within")
        if within is not None:
            lines.append(
                f"  on trial: 'nfqfw confirm' within {within:g} s keeps it, else the previous policy "
                "comes back"
            )
        return lines
    lines = [f"{at}: FAILED, the running policy stays in force:"]
    lines += [f"  {error}" for error in outcome["errors"]]
    return lines


def format_confirm(result: dict[str, Any]) -> str:
    if result.get("rolled_back"):
        return f"rolled back: the policy before the reload is in force again (sha256 {result['sha256'][:12]})"
    return f"confirmed: the reloaded policy stays (sha256 {result['sha256'][:12]})"


def format_preview(preview: dict[str, Any]) -> list[str]:
    """`nfqfw reload --dry-run`: what the file on disk would change, the flows it would cut."""
    from nfqfw.core.diff import diff_lines

    if not preview["ok"]:
        return ["the policy on disk would be refused (the running policy would stay):"] + [
            f"  {error}" for error in preview["errors"]
        ]
    if preview["sha256"] == preview["in_force"]:
        head = f"the policy on disk is the policy in force (sha256 {preview['in_force'][:12]})"
    else:
        head = (
            f"the policy on disk (sha256 {preview['sha256'][:12]}) would replace {preview['in_force'][:12]}:"
        )
    lines = [head, *[f"  {line}" for line in diff_lines(preview["changes"])]]
    total = preview["cut_total"]
    if not preview["recheck"]:
        lines.append("flows: none cut (reload: keep)")
    elif not total:
        lines.append("flows: none would be cut")
    else:
        lines.append(f"flows it would cut ({total}):")
        for record in preview["cut"]:
            now = f"now: {record['now']} ({record['now_action']})"
            lines.append(f"  {format_flow(record)} -> {now}")
        if total > len(preview["cut"]):
            lines.append(f"  ... and {total - len(preview['cut'])} more")
    for missing in preview.get("unanswered") or []:
        lines.append(
            f"  queue {missing['queue']} did not answer ({missing['error']}): its flows are not listed"
        )
    return lines


# --- sets -------------------------------------------------------------------------------------


def format_set_change(result: dict[str, Any]) -> str:
    op = "added to" if result["op"] == "add" else "deleted from"
    if result["changed"]:
        text = f"{result['addr']} {op} set {result['set']}"
    elif result["op"] == "add":
        text = f"{result['addr']} was in set {result['set']} already (its timeout is renewed)"
    else:
        text = f"{result['addr']} was not a runtime entry of set {result['set']}"
    if result.get("removed"):
        text += f"; {plural(result['removed'], 'flow')} cut"
    return text + unanswered(result)


def format_set_list(result: dict[str, Any]) -> list[str]:
    comment = f" ({result['comment']})" if result.get("comment") else ""
    source = f", file {result['file']}" if result.get("file") else ""
    ranges = result["policy_ranges"]
    lines = [
        f"set {result['name']}{comment}: defined at {result['defined_at']}{source}",
        f"  from the policy: {plural(result['policy_networks'], 'network')} "
        f"({ranges['ipv4']} IPv4 and {ranges['ipv6']} IPv6 ranges once merged)",
        f"  runtime entries: {len(result['runtime'])}",
    ]
    for entry in result["runtime"]:
        left = "" if entry["expires_in"] is None else f"  (expires in {duration(entry['expires_in'])})"
        lines.append(f"    {entry['addr']}{left}")
    return lines


# --- status -----------------------------------------------------------------------------------


def _table(rows: Iterable[tuple[str, int]], indent: str = "  ") -> list[str]:
    rows = list(rows)
    if not rows:
        return [f"{indent}(none)"]
    width = max(len(name) for name, _ in rows)
    numbers = max(len(str(value)) for _, value in rows)
    return [f"{indent}{name:<{width}}  {value:>{numbers}}" for name, value in rows]


def _by_count(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def format_ha_role(result: dict[str, Any]) -> str:
    """`nfqfw ha role`: the role taken and what was done on taking it."""
    was = result.get("previous")
    line = f"HA role {result['role']}" + ("" if was in (None, result["role"]) else f" (was {was})")
    if "taken_over" in result:
        line += f": took over {plural(result['taken_over'], 'flow')} the kernel carries for nfqfw"
    if "forgotten" in result:
        line += f": forgot {plural(result['forgotten'], 'flow record')} (the peer carries them on)"
    return line


# The numbers of conntrackd's statistics `nfqfw status` shows: (section, label, what it says).
SYNC_FIGURES = (
    ("cache internal", "current active connections", "flows of its own"),
    ("cache external", "current active connections", "flows of the peer"),
    ("message tracking", "Lost msgs", "messages lost"),
    ("message tracking", "Malformed msgs", "malformed"),
)


def format_ha(ha: dict[str, Any] | None, when: TimeText = local_time) -> list[str]:
    """The HA lines of `nfqfw status`: the role told and conntrackd's sync state (none at all
    when nfqfw was never told a role)."""
    if ha is None:
        return []
    since = "" if ha.get("since") is None else f" since {when(ha['since'])}"
    lines = [f"HA role:      {ha['role']}{since}"]
    sync = ha.get("conntrackd")
    if sync is None:
        lines.append("  conntrackd: none")
    elif "error" in sync:
        lines.append(f"  conntrackd: {sync['error']}")
    else:
        stats = sync["stats"]
        figures = [
            f"{stats[section][label]} {what}"
            for section, label, what in SYNC_FIGURES
            if label in stats.get(section, {})
        ]
        lines.append(f"  conntrackd: {', '.join(figures) or 'no statistics'}")
    return lines


def format_status(status: dict[str, Any], when: TimeText = local_time) -> list[str]:
    lines = []
    if status["panic"]:
        lines.append("PANIC MODE ON: everything but loopback is dropped (nfqfw panic off ends it)")
    lines.append(
        f"nfqfw {status['version']}, pid {status['pid']}, up {duration(status['uptime'])} "
        f"(since {when(status['started'])})"
    )
    policy = status["policy"]
    lines.append(f"policy:       {policy['file']}")
    lines.append(f"  sha256:     {policy['sha256']} (in force)")
    if policy["file_sha256"] is None:
        lines.append("  the file cannot be read now: a reload would fail")
    elif policy["file_sha256"] != policy["sha256"]:
        lines.append(f"  on disk:    {policy['file_sha256']} (changed since loaded: nfqfw reload)")
    if policy.get("files", 1) > 1:
        lines.append(
            f"  files:      {policy['files']} (included files and set files; the sha256 covers them all)"
        )
    pending = policy.get("pending_confirm")
    if pending is not None:
        left = "" if pending["rollback_in"] is None else f" in {duration(pending['rollback_in'])}"
        lines.append(
            f"  ON TRIAL:   rolled back to {pending['previous_sha256'][:12]}{left} unless 'nfqfw confirm'"
        )
    lines += format_sets(policy.get("sets") or [])
    reload = status["last_reload"]
    if reload is None:
        lines.append("last reload:  none since start")
    else:
        first, *rest = format_reload(reload, when)
        lines.append(f"last reload:  {first}")
        lines += rest
    gso = "" if "gso" not in status else f", GSO packets {'on' if status['gso'] else 'off'}"
    lines.append(
        f"queue:        {status['queue']}, failure mode {status['failure_mode']}, "
        f"panic {'on' if status['panic'] else 'off'}{gso}"
    )
    lines += format_ha(status.get("ha"), when)
    flows = status["flows"]
    share = 100.0 * flows["total"] / flows["max"] if flows["max"] else 0.0
    lines.append(
        f"flows:        {flows['total']} of {flows['max']} ({share:.1f}%), "
        f"{flows['expired']} expired, {plural(flows['early_drops'], 'early drop')}"
    )
    for proto, states in flows["by_proto"].items():
        detail = ", ".join(f"{state} {count}" for state, count in _by_count(states))
        lines.append(f"  {proto:<8}{sum(states.values()):>6}  {detail}")
    if "offloaded" in flows:
        offloaded = flows["offloaded"]
        lines.append(f"offloaded:    {plural(offloaded['total'], 'flow')} carried by the kernel's conntrack")
        for proto, states in offloaded["by_proto"].items():
            detail = ", ".join(f"{state} {count}" for state, count in _by_count(states))
            lines.append(f"  {proto:<8}{sum(states.values()):>6}  {detail}")
    lines.append("verdicts (packets, by reason and rule):")
    lines += _commented(
        _table(_by_count(status["verdicts"])), _by_count(status["verdicts"]), policy.get("comments") or {}
    )
    if status.get("zones"):
        lines.append("new flows by zone pair (first packets the policy decided):")
        lines += _table(_by_count(status["zones"]))
    lines.append("adapter:")
    lines += _table(status["adapter"].items())
    lines += format_workers(status)
    for queue in status["kernel_queues"]:
        lines.append(
            f"kernel queue {queue['queue']}: {queue['waiting']} waiting, dropped {queue['queue_dropped']} "
            f"(queue full) and {queue['user_dropped']} (socket buffer full)"
        )
    kernel_drops = status.get("kernel_drops")
    if kernel_drops:
        lines.append("dropped by the kernel rules, before the queues (packets, by reason):")
        lines += _table(_by_count(kernel_drops))
    return lines


def format_sets(sets: list[dict[str, Any]]) -> list[str]:
    """The policy's sets in the status: sizes, file, comment, and a watched file's error."""
    lines = []
    for entry in sets:
        text = f"  set {entry['name']}: {plural(entry['policy_networks'], 'network')}"
        if entry.get("runtime_entries"):
            text += f" + {entry['runtime_entries']} runtime"
        if entry.get("file"):
            text += f" ({entry['file']})"
        if entry.get("comment"):
            text += f"  # {entry['comment']}"
        lines.append(text)
        if entry.get("error"):
            lines.append(f"    FILE CHANGED BUT BROKEN, old contents kept: {entry['error']}")
    return lines


def _commented(lines: list[str], rows: list[tuple[str, int]], comments: dict[str, str]) -> list[str]:
    """Verdict lines of rules and forwards that have a comment get it at the end (`# why`)."""
    if not comments or len(lines) != len(rows):
        return lines
    out = []
    for line, (key, _) in zip(lines, rows, strict=True):
        kinds = [kind for kind in (" rule ", " forward ") if kind in key]
        name = key.split(kinds[0], 1)[1] if kinds else None
        out.append(f"{line}  # {comments[name]}" if name in comments else line)
    return out


def format_workers(status: dict[str, Any]) -> list[str]:
    """The per-worker breakdown of a supervisor's status (nfqfw run --workers); none otherwise."""
    workers = status.get("workers")
    if not workers:
        return []
    lines = [f"workers:      {len(workers)}, one per queue (counts above are their sums)"]
    in_force = status["policy"]["sha256"]
    for worker in workers:
        pid = "-" if worker.get("pid") is None else worker["pid"]
        text = f"  queue {worker['queue']}: pid {pid}, {worker.get('state', '?')}"
        if "error" in worker:
            text += f", not answering ({worker['error']})"
        else:
            text += f", {plural(worker['flows'], 'flow')}, {plural(worker['verdicts'], 'verdict')}"
        restarts = worker.get("restarts", 0)
        if restarts:
            text += f", restarted {plural(restarts, 'time')} (last exit: {worker.get('last_exit')})"
        if worker.get("policy_sha256") not in (None, in_force):
            text += f", POLICY DIFFERS: {worker['policy_sha256'][:12]}…"
        lines.append(text)
    return lines


# --- top --------------------------------------------------------------------------------------

TOP_SECTION_MIN = 3  # rows each table keeps however small the terminal


def _rate(now: int, before: int | None, seconds: float) -> str:
    if before is None or seconds <= 0:
        return "-"
    return f"{max(0, now - before) / seconds:.1f}"


def _action_total(verdicts: dict[str, int], action: str) -> int:
    return sum(count for key, count in verdicts.items() if key.split(" ", 1)[0] == action)


def format_top(
    before: dict[str, Any] | None, status: dict[str, Any], seconds: float, height: int = 24
) -> list[str]:
    """One screen of `nfqfw top` from two status answers `seconds` apart (`before` None: the
    first, rates unknown): verdict rates by reason and rule, flows by state, the top talkers
    by flows, and the kernel queue's pressure."""
    old = before["verdicts"] if before else {}
    verdicts = status["verdicts"]
    flows = status["flows"]
    share = 100.0 * flows["total"] / flows["max"] if flows["max"] else 0.0
    totals = {
        action: _rate(
            _action_total(verdicts, action), _action_total(old, action) if before else None, seconds
        )
        for action in ("accept", "drop", "reject")
    }
    lines = [
        f"nfqfw top: pid {status['pid']}, up {duration(status['uptime'])}, queue {status['queue']}, "
        f"failure mode {status['failure_mode']}, panic {'ON' if status['panic'] else 'off'}   (q quits)",
        f"flows {flows['total']} of {flows['max']} ({share:.1f}%)   packets/s: accept {totals['accept']}, "
        f"drop {totals['drop']}, reject {totals['reject']}",
    ]
    old_queues = {q["queue"]: q for q in before["kernel_queues"]} if before else {}
    for queue in status["kernel_queues"]:
        was = old_queues.get(queue["queue"])
        full = _rate(queue["queue_dropped"], was and was["queue_dropped"], seconds)
        socket_full = _rate(queue["user_dropped"], was and was["user_dropped"], seconds)
        lines.append(
            f"queue {queue['queue']}: {queue['waiting']} waiting, dropped/s {full} (queue full), "
            f"{socket_full} (socket buffer full)"
        )
    rates = sorted(
        (
            (key, _rate(count, old.get(key, 0) if before else None, seconds))
            for key, count in verdicts.items()
        ),
        key=lambda item: (-float(item[1]) if item[1] != "-" else 0.0, item[0]),
    )
    states = sorted(
        (
            (f"{proto} {state}", count)
            for proto, by in flows["by_proto"].items()
            for state, count in by.items()
        ),
        key=lambda item: (-item[1], item[0]),
    )
    talkers = status.get("talkers")
    room = max(TOP_SECTION_MIN, (height - len(lines) - 7) // 3)
    lines += ["", "VERDICTS/s by reason and rule"]
    lines += _columns(rates[:room]) or ["  (none)"]
    lines += ["", "FLOWS by state"]
    lines += _columns(states[:room]) or ["  (none)"]
    lines += ["", "TOP TALKERS by flows (either end)"]
    if talkers is None:
        lines.append("  (not reported by this daemon)")
    else:
        lines += _columns([(t["addr"], t["flows"]) for t in talkers[:room]]) or ["  (none)"]
    return lines


def _columns(rows: list[tuple[str, Any]]) -> list[str]:
    if not rows:
        return []
    width = max(len(name) for name, _ in rows)
    numbers = max(len(str(value)) for _, value in rows)
    return [f"  {name:<{width}}  {value!s:>{numbers}}" for name, value in rows]
