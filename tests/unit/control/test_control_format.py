"""nfqfw.control.format: the exact text of status, flows, flush, panic and reload."""

from __future__ import annotations

import time
from typing import Any

import pytest

from nfqfw.control.format import (
    admitted_by,
    duration,
    format_flow,
    format_flows,
    format_flush,
    format_panic,
    format_reload,
    format_status,
    format_top,
)

T0 = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC
WHERE = "/etc/nfqfw/policy.yaml:6:12"


def utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when))


TCP = {
    "proto": "tcp", "protonum": 6, "timeout": 431999, "state": "ESTABLISHED", "family": 4,
    "src": "10.0.0.25", "dst": "203.0.113.10", "sport": 40000, "dport": 80,
    "replied": True, "assured": True, "admitted_by": "rule web", "in": "lan0", "out": "wan0", "age": 3,
}  # fmt: skip
UDP6 = {
    "proto": "udp", "protonum": 17, "timeout": 29, "state": None, "family": 6,
    "src": "fd00::25", "dst": "2001:db8:1::10", "sport": 5353, "dport": 53,
    "replied": False, "assured": False, "admitted_by": "default egress", "in": "lan0", "out": "wan0",
    "age": 0,
}  # fmt: skip
PING = {
    "proto": "icmp", "protonum": 1, "timeout": 12, "state": None, "family": 4,
    "src": "10.0.0.25", "dst": "203.0.113.10", "type": 8, "code": 0, "id": 77,
    "replied": True, "assured": False, "admitted_by": "default egress", "in": None, "out": "wan0", "age": 18,
}  # fmt: skip
GRE = {
    "proto": "47", "protonum": 47, "timeout": 600, "state": None, "family": 4, "src": "10.0.0.25",
    "dst": "203.0.113.10", "replied": False, "assured": False, "admitted_by": None, "age": 0,
}  # fmt: skip


def test_flow_lines_like_conntrack() -> None:
    assert format_flow(TCP) == (
        "tcp      6 431999 ESTABLISHED src=10.0.0.25 dst=203.0.113.10 sport=40000 dport=80 [ASSURED] "
        "rule=web in=lan0 out=wan0"
    )
    assert format_flow(UDP6) == (
        "udp      17 29 src=fd00::25 dst=2001:db8:1::10 sport=5353 dport=53 [UNREPLIED] default=egress "
        "in=lan0 out=wan0"
    )
    assert format_flow(PING) == (
        "icmp     1 12 src=10.0.0.25 dst=203.0.113.10 type=8 code=0 id=77 default=egress out=wan0"
    )
    assert format_flow(GRE) == "47       47 600 src=10.0.0.25 dst=203.0.113.10 [UNREPLIED] rule=?"


def test_flows_summary() -> None:
    lines, summary = format_flows({"tracked": 7, "max_flows": 100, "flows": [TCP, PING]})
    assert lines == [format_flow(TCP), format_flow(PING)]
    assert summary == "2 flows shown (7 tracked, at most 100)"
    one = format_flows({"tracked": 1, "max_flows": 100, "flows": [TCP]})
    assert one[1] == "1 flow shown (1 tracked, at most 100)"
    none = format_flows({"tracked": 0, "max_flows": 9, "flows": []})
    assert none == ([], "0 flows shown (0 tracked, at most 9)")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("rule mail", "rule=mail"),
        ("default ingress", "default=ingress"),
        ("related", "by=related"),
        (None, "rule=?"),
    ],
)
def test_admitted_by(text: str | None, shown: str) -> None:
    assert admitted_by(text) == shown


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "00:00"), (59.9, "00:59"), (61, "01:01"), (3600, "01:00:00"), (90061, "1d 01:01:01")],
)
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_flush_and_panic() -> None:
    assert format_flush({"removed": 1, "tracked": 4}) == "1 flow removed (4 still tracked)"
    assert format_flush({"removed": 0, "tracked": 0}) == "0 flows removed (0 still tracked)"
    on = format_panic({"panic": True, "changed": True})
    assert on == "panic mode on: everything but loopback is dropped"
    assert format_panic({"panic": False, "changed": False}) == (
        "panic mode off: the policy decides again (it already was)"
    )


def test_reload_outcomes() -> None:
    ok = {"time": T0, "trigger": "SIGHUP", "ok": True, "errors": [], "removed": 2}
    assert format_reload(ok, utc) == ["2025-06-15 15:06:40 by SIGHUP: ok, policy reloaded, 2 flows removed"]
    kept = {**ok, "removed": None, "trigger": "control request"}
    assert format_reload(kept, utc) == [
        "2025-06-15 15:06:40 by control request: ok, policy reloaded, flows kept (reload: keep)"
    ]
    failed = {
        "time": T0, "trigger": "control request", "ok": False, "removed": None,
        "errors": [f"{WHERE}: defaults: ingress: expected accept, drop or reject, got 'perhaps'"],
    }  # fmt: skip
    assert format_reload(failed, utc) == [
        "2025-06-15 15:06:40 by control request: FAILED, the running policy stays in force:",
        f"  {WHERE}: defaults: ingress: expected accept, drop or reject, got 'perhaps'",
    ]


def status(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "version": "0.1.0",
        "pid": 4242,
        "started": T0,
        "uptime": 3725.0,
        "policy": {"file": "/etc/nfqfw/policy.yaml", "sha256": "ab" * 32, "file_sha256": "ab" * 32},
        "last_reload": None,
        "queue": "0",
        "failure_mode": "closed",
        "panic": False,
        "gso": True,
        "flows": {
            "total": 3,
            "max": 65536,
            "by_proto": {"tcp": {"ESTABLISHED": 1, "TIME_WAIT": 1}, "udp": {"ASSURED": 1}},
            "expired": 12,
            "early_drops": 1,
        },
        "verdicts": {"accept established": 1234, "drop default ingress": 5, "accept rule mail": 10},
        "adapter": {"reject sent": 2, "verdict error": 0},
        "kernel_queues": [{"queue": 0, "waiting": 0, "queue_dropped": 3, "user_dropped": 0}],
    }
    base.update(changes)
    return base


def test_status_text() -> None:
    assert format_status(status(), utc) == [
        "nfqfw 0.1.0, pid 4242, up 01:02:05 (since 2025-06-15 15:06:40)",
        "policy:       /etc/nfqfw/policy.yaml",
        f"  sha256:     {'ab' * 32} (in force)",
        "last reload:  none since start",
        "queue:        0, failure mode closed, panic off, GSO packets on",
        "flows:        3 of 65536 (0.0%), 12 expired, 1 early drop",
        "  tcp          2  ESTABLISHED 1, TIME_WAIT 1",
        "  udp          1  ASSURED 1",
        "verdicts (packets, by reason and rule):",
        "  accept established    1234",
        "  accept rule mail        10",
        "  drop default ingress     5",
        "adapter:",
        "  reject sent    2",
        "  verdict error  0",
        "kernel queue 0: 0 waiting, dropped 3 (queue full) and 0 (socket buffer full)",
    ]


def test_status_text_with_the_kernel_rules_drops() -> None:
    kernel = {"drop new-rate per source": 70, "drop default ingress": 5000, "reject rule no-ident": 2}
    assert format_status(status(kernel_drops=kernel), utc)[-4:] == [
        "dropped by the kernel rules, before the queues (packets, by reason):",
        "  drop default ingress      5000",
        "  drop new-rate per source    70",
        "  reject rule no-ident         2",
    ]
    assert format_status(status(kernel_drops=None), utc) == format_status(status(), utc)


def test_status_panic_changed_file_and_failed_reload() -> None:
    reload = {"time": T0 + 60, "trigger": "SIGHUP", "ok": False, "removed": None}
    reload["errors"] = ["p.yaml:1:1: bad"]
    lines = format_status(
        status(
            panic=True,
            failure_mode="open",
            queue="3:6",
            gso=False,
            last_reload=reload,
            policy={"file": "p.yaml", "sha256": "ab" * 32, "file_sha256": "cd" * 32},
            verdicts={},
            kernel_queues=[],
        ),
        utc,
    )
    assert lines[0] == "PANIC MODE ON: everything but loopback is dropped (nfqfw panic off ends it)"
    assert lines[3:8] == [
        f"  sha256:     {'ab' * 32} (in force)",
        f"  on disk:    {'cd' * 32} (changed since loaded: nfqfw reload)",
        "last reload:  2025-06-15 15:07:40 by SIGHUP: FAILED, the running policy stays in force:",
        "  p.yaml:1:1: bad",
        "queue:        3:6, failure mode open, panic on, GSO packets off",
    ]
    assert lines[-5:-3] == ["verdicts (packets, by reason and rule):", "  (none)"]
    gone = {"file": "p.yaml", "sha256": "ab" * 32, "file_sha256": None}
    unreadable = format_status(status(policy=gone), utc)
    assert unreadable[3] == "  the file cannot be read now: a reload would fail"


# --- top --------------------------------------------------------------------------------------


def top_status(
    verdicts: dict[str, int], queue_dropped: int, talkers: list[dict[str, Any]] | None
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "pid": 42,
        "uptime": 3725.0,
        "queue": "0",
        "failure_mode": "closed",
        "panic": False,
        "flows": {
            "total": 3,
            "max": 100,
            "by_proto": {"tcp": {"ESTABLISHED": 2}, "udp": {"UNREPLIED": 1}},
            "expired": 0,
            "early_drops": 0,
        },
        "verdicts": verdicts,
        "kernel_queues": [{"queue": 0, "waiting": 7, "queue_dropped": queue_dropped, "user_dropped": 0}],
    }
    if talkers is not None:
        status["talkers"] = talkers
    return status


def test_top_screen_with_rates_from_two_samples() -> None:
    before = top_status({"accept established": 100, "drop default ingress": 4}, 10, None)
    now = top_status(
        {"accept established": 300, "drop default ingress": 8, "accept rule mail": 2},
        30,
        [{"addr": "10.0.0.25", "flows": 3}, {"addr": "203.0.113.10", "flows": 2}],
    )
    assert format_top(before, now, 2.0) == [
        "nfqfw top: pid 42, up 01:02:05, queue 0, failure mode closed, panic off   (q quits)",
        "flows 3 of 100 (3.0%)   packets/s: accept 101.0, drop 2.0, reject 0.0",
        "queue 0: 7 waiting, dropped/s 10.0 (queue full), 0.0 (socket buffer full)",
        "",
        "VERDICTS/s by reason and rule",
        "  accept established    100.0",
        "  drop default ingress    2.0",
        "  accept rule mail        1.0",
        "",
        "FLOWS by state",
        "  tcp ESTABLISHED  2",
        "  udp UNREPLIED    1",
        "",
        "TOP TALKERS by flows (either end)",
        "  10.0.0.25     3",
        "  203.0.113.10  2",
    ]


def test_top_first_screen_has_no_rates_yet_and_tables_shrink_to_the_terminal() -> None:
    verdicts = {f"accept rule r{i}": i for i in range(20)}
    lines = format_top(None, top_status(verdicts, 0, None), 0.0, height=20)
    assert lines[1] == "flows 3 of 100 (3.0%)   packets/s: accept -, drop -, reject -"
    section = lines[lines.index("VERDICTS/s by reason and rule") + 1 : lines.index("FLOWS by state") - 1]
    assert len(section) == 3 and all(line.endswith(" -") for line in section)
    assert lines[-1] == "  (not reported by this daemon)"


def test_offloaded_flows_in_status_and_flows() -> None:
    assert format_flow({**TCP, "offloaded": True, "queue": 1}) == (
        "tcp      6 431999 ESTABLISHED src=10.0.0.25 dst=203.0.113.10 sport=40000 dport=80 [ASSURED] "
        "[OFFLOADED] rule=web in=lan0 out=wan0 queue=1"
    )
    flows = status()["flows"] | {
        "offloaded": {"total": 3, "by_proto": {"tcp": {"ESTABLISHED": 2}, "udp": {"ASSURED": 1}}}
    }
    lines = format_status(status(flows=flows), utc)
    at = lines.index("  udp          1  ASSURED 1")
    assert lines[at + 1 : at + 4] == [
        "offloaded:    3 flows carried by the kernel's conntrack",
        "  tcp          2  ESTABLISHED 2",
        "  udp          1  ASSURED 1",
    ]


def test_status_shows_new_flows_by_zone_pair_and_forward_admissions() -> None:
    zones = {"internal->external accept": 40, "external->internal drop": 7, "internal->dmz accept": 3}
    lines = format_status(status(zones=zones), utc)
    at = lines.index("new flows by zone pair (first packets the policy decided):")
    assert lines[at - 1] == "  drop default ingress     5"
    assert lines[at + 1 : at + 4] == [
        "  internal->external accept  40",
        "  external->internal drop     7",
        "  internal->dmz accept        3",
    ]
    assert "new flows by zone pair (first packets the policy decided):" not in format_status(
        status(zones={}), utc
    )
    assert admitted_by("forward smtp") == "forward=smtp"


def test_verdict_lines_of_rules_and_forwards_carry_their_comments() -> None:
    verdicts = {"accept rule mail": 10, "accept forward smtp": 4, "drop default ingress": 5}
    answer = status(verdicts=verdicts)
    answer["policy"] = {**answer["policy"], "comments": {"mail": "the mail host", "smtp": "published"}}
    lines = format_status(answer, utc)
    assert [line for line in lines if "#" in line] == [
        "  accept rule mail      10  # the mail host",
        "  accept forward smtp    4  # published",
    ]
