"""nfqfw.service.supervision: the pure rules and merges of `nfqfw run --workers`."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from nfqfw.control.format import format_flow, format_flows, format_flush, format_status
from nfqfw.service import supervision as sv

SHA = "a" * 64


# --- notifications, STATUS, back-off, health ---------------------------------------------------


def test_parse_notify() -> None:
    fields = sv.parse_notify(b"READY=1\nSTATUS=queue 0: 5 verdicts, 2 flows, 1 rejects sent\nbogus\n=x")
    assert fields == {"READY": "1", "STATUS": "queue 0: 5 verdicts, 2 flows, 1 rejects sent"}


def test_worker_status_counts_and_the_summed_line() -> None:
    """A worker's counts travel as data beside its STATUS= line, not parsed out of the prose."""
    status = "STATUS=PANIC MODE, queue 1: 5 verdicts, 2 flows, 1 rejects sent"
    datagram = f"{status}\n{sv.counts_assignment(sv.Counts(5, 2, 1))}".encode()
    assert datagram.endswith(b'\nX_NFQFW_COUNTS={"verdicts":5,"flows":2,"rejects":1}')
    counts = sv.counts_of(sv.parse_notify(datagram))
    assert counts == sv.Counts(5, 2, 1)
    assert sv.counts_of(sv.parse_notify(b"STATUS=reloading the policy")) is None
    assert sv.counts_of({sv.COUNTS_FIELD: '{"verdicts": 5}'}) is None  # damaged: ignored
    line = sv.status_line("0:1", False, sv.Counts.total([sv.Counts(5, 2, 1), sv.Counts(10, 3, 0)]), (1, 2))
    assert line == "queue 0:1, 1 of 2 workers up: 15 verdicts, 5 flows, 1 rejects sent"
    assert sv.status_line("0:1", True, sv.Counts.total([]), (2, 2)).startswith("PANIC MODE, ")
    assert sv.status_line("0", False, sv.Counts(5, 2, 1)) == "queue 0: 5 verdicts, 2 flows, 1 rejects sent"


def test_restart_delay_grows_with_quick_deaths_and_is_capped() -> None:
    delays = [sv.restart_delay(n) for n in range(8)]
    assert delays[0] == 0.0  # a worker that ran a while is restarted at once
    assert delays == sorted(delays) and max(delays) == sv.MAX_DELAY


def test_describe_exit() -> None:
    assert sv.describe_exit(signal.SIGKILL) == "killed by SIGKILL"  # waitpid status of a kill -9
    assert sv.describe_exit(1 << 8) == "exited with code 1"


def test_wedged_and_healthy() -> None:
    ready = sv.Health(alive=True, ready=True, last_ping=100.0)
    assert not sv.wedged(ready, 105.0, ping_timeout=10.0, start_timeout=60.0)
    assert sv.wedged(ready, 110.5, ping_timeout=10.0, start_timeout=60.0)
    starting = sv.Health(alive=True, ready=False, last_ping=100.0)
    assert not sv.wedged(starting, 150.0, 10.0, 60.0) and sv.wedged(starting, 161.0, 10.0, 60.0)
    assert not sv.wedged(sv.Health(False, False, 0.0), 1e9, 10.0, 60.0)  # dead: restarted, not killed
    assert sv.all_healthy([ready, ready], 105.0, 10.0)
    assert not sv.all_healthy([ready, starting], 105.0, 10.0)  # a restarting worker: no WATCHDOG=1
    assert not sv.all_healthy([ready, sv.Health(False, False, 0.0)], 105.0, 10.0)
    assert not sv.all_healthy([ready], 111.0, 10.0)  # a wedged one: no WATCHDOG=1


# --- snapshot layout ----------------------------------------------------------------------------


def test_layout_round_trip_and_damage() -> None:
    layout = sv.Layout((0, 1), "boot-1")
    assert sv.Layout.loads(layout.dumps()) == layout
    for text in ("", "{", "[]", '{"queues": [0]}', '{"queues": ["x"], "boot_id": "b"}'):
        assert sv.Layout.loads(text) is None


FILES = ["flows.queue-0.snapshot", "flows.queue-1.snapshot", "flows.snapshot.bad", "workers.layout"]


def test_same_layout_each_worker_restores_its_own_file() -> None:
    layout = sv.Layout((0, 1), "boot-1")
    assert sv.to_adopt(layout, layout, FILES) == ()
    assert sv.leftovers(layout, FILES) == []


@pytest.mark.parametrize(
    "saved",
    [None, sv.Layout((0, 1, 2), "boot-1"), sv.Layout((0, 1), "boot-0")],
    ids=["unknown", "other range", "other boot"],
)
def test_another_layout_every_worker_restores_every_file(saved: sv.Layout | None) -> None:
    current = sv.Layout((0, 1), "boot-1")
    present = [*FILES, "flows.queue-2.snapshot", "flows.snapshot"]
    every = ("flows.queue-0.snapshot", "flows.queue-1.snapshot", "flows.queue-2.snapshot", "flows.snapshot")
    assert sv.to_adopt(saved, current, present) == every
    assert sv.leftovers(current, present) == ["flows.queue-2.snapshot", "flows.snapshot"]


def test_a_single_process_snapshot_or_an_unknown_boot_means_adopting() -> None:
    layout = sv.Layout((0, 1), "boot-1")
    assert "flows.snapshot" in sv.to_adopt(layout, layout, [*FILES, "flows.snapshot"])
    unknown = sv.Layout((0, 1), "")
    assert sv.to_adopt(unknown, unknown, FILES) == ("flows.queue-0.snapshot", "flows.queue-1.snapshot")


# --- merging answers ----------------------------------------------------------------------------


def worker_status(
    flows: int, verdicts: dict[str, int], by_proto: dict[str, dict[str, int]]
) -> dict[str, Any]:
    return {
        "policy": {"sha256": SHA},
        "gso": True,
        "flows": {"total": flows, "max": 100, "by_proto": by_proto, "expired": 1, "early_drops": 0},
        "verdicts": verdicts,
        "adapter": {"reject sent": 1, "verdict error": 0},
    }


def base() -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "pid": 1,
        "started": 0.0,
        "uptime": 5.0,
        "policy": {"file": "/etc/nfqfw/policy.yaml", "sha256": SHA, "file_sha256": SHA},
        "last_reload": None,
        "queue": "0:1",
        "failure_mode": "closed",
        "panic": False,
        "kernel_queues": [],
    }


def test_merge_status_sums_and_breaks_down() -> None:
    answers = [
        sv.Answer(0, 10, worker_status(2, {"accept established": 5}, {"tcp": {"ESTABLISHED": 2}})),
        sv.Answer(
            1,
            11,
            {
                **worker_status(3, {"accept established": 1, "drop": 2}, {"tcp": {"ESTABLISHED": 1}}),
                "zones": {"internal->dmz accept": 2},
            },
        ),
        sv.Answer(2, None, error="worker restarting"),
    ]
    states = {0: {"state": "running", "restarts": 0}, 1: {"state": "running", "restarts": 2}}
    merged = {**base(), **sv.merge_status(answers, states)}
    assert merged["flows"]["total"] == 5 and merged["flows"]["max"] == 200
    assert merged["flows"]["by_proto"] == {"tcp": {"ESTABLISHED": 3}}
    assert merged["verdicts"] == {"accept established": 6, "drop": 2}
    assert merged["zones"] == {"internal->dmz accept": 2}  # summed; a worker without zones counts none
    assert merged["adapter"] == {"reject sent": 2, "verdict error": 0}
    assert merged["gso"] is True
    breakdown = {w["queue"]: w for w in merged["workers"]}
    assert breakdown[0] == {
        "queue": 0,
        "pid": 10,
        "state": "running",
        "restarts": 0,
        "flows": 2,
        "verdicts": 5,
        "policy_sha256": SHA,
    }
    assert breakdown[1]["restarts"] == 2 and breakdown[2]["error"] == "worker restarting"
    text = "\n".join(format_status(merged, when=lambda t: "T"))
    assert "queue 0: pid 10, running, 2 flows, 5 verdicts" in text
    assert "queue 1: pid 11, running, 3 flows, 3 verdicts, restarted 2 times" in text
    assert "queue 2: pid -, ?, not answering (worker restarting)" in text


def test_a_worker_on_another_policy_is_flagged() -> None:
    other = worker_status(0, {}, {})
    other["policy"]["sha256"] = "b" * 64
    merged = {**base(), **sv.merge_status([sv.Answer(0, 10, other)], {0: {"state": "running"}})}
    assert "POLICY DIFFERS" in "\n".join(format_status(merged, when=lambda t: "T"))


def flow(sport: int, timeout: int) -> dict[str, Any]:
    return {
        "proto": "tcp",
        "protonum": 6,
        "timeout": timeout,
        "src": "10.0.0.5",
        "dst": "1.2.3.4",
        "sport": sport,
        "dport": 80,
    }


def test_merge_flows_is_the_union_tagged_by_queue_a_flow_once() -> None:
    answers = [
        sv.Answer(0, 10, {"tracked": 2, "max_flows": 100, "flows": [flow(1, 50), flow(2, 400)]}),
        sv.Answer(1, 11, {"tracked": 2, "max_flows": 100, "flows": [flow(3, 60), flow(2, 100)]}),
        sv.Answer(2, None, error="timed out"),
    ]
    merged = sv.merge_flows(answers)
    assert merged["tracked"] == 4 and merged["max_flows"] == 200
    by_port = {f["sport"]: f["queue"] for f in merged["flows"]}
    assert by_port == {1: 0, 2: 0, 3: 1}  # port 2 held twice (adopted): the live copy, most time left
    assert merged["unanswered"] == [{"queue": 2, "error": "timed out"}]
    assert format_flow(merged["flows"][0]).endswith("queue=0")
    _, summary = format_flows(merged)
    assert summary.endswith("; queue 2 did not answer (timed out)")


def test_merge_flush_sums() -> None:
    merged = sv.merge_flush(
        [sv.Answer(0, 1, {"removed": 2, "tracked": 5}), sv.Answer(1, 2, {"removed": 1, "tracked": 0})]
    )
    assert merged == {"removed": 3, "tracked": 5, "unanswered": []}
    assert format_flush(merged) == "3 flows removed (5 still tracked)"


def test_merge_set_changes_sums_the_cut_flows_and_names_the_silent_workers() -> None:
    answers = [
        sv.Answer(0, 11, {"removed": 2}),
        sv.Answer(1, 12, {"removed": 3}),
        sv.Answer(2, 13, error="timed out"),
    ]
    merged = sv.merge_set_changes(answers, "banned", "198.51.100.7", "add", changed=True)
    assert merged == {
        "set": "banned",
        "addr": "198.51.100.7",
        "op": "add",
        "changed": True,
        "removed": 5,
        "unanswered": [{"queue": 2, "error": "timed out"}],
    }
    unchanged = sv.merge_set_changes(
        [sv.Answer(0, 11, {"removed": 0})], "banned", "198.51.100.7", "del", False
    )
    assert unchanged["changed"] is False and unchanged["removed"] == 0 and unchanged["unanswered"] == []


def test_merge_reloads() -> None:
    good = {"ok": True, "errors": [], "removed": 1}
    keep = {"ok": True, "errors": [], "removed": None}
    assert sv.merge_reloads([sv.Answer(0, 1, good), sv.Answer(1, 2, good)]) == sv.ReloadMerge(True, (), 2)
    assert sv.merge_reloads([sv.Answer(0, 1, keep)]) == sv.ReloadMerge(True, (), None)
    bad = sv.merge_reloads([sv.Answer(0, 1, good), sv.Answer(1, 2, error="timed out")])
    assert not bad.ok and bad.errors == ("queue 1: timed out",)
    refused = sv.merge_reloads([sv.Answer(0, 1, {"ok": False, "errors": ["f:1:1: nope"], "removed": None})])
    assert refused.errors == ("queue 0: f:1:1: nope",)


# --- start-up refusals --------------------------------------------------------------------------


def test_workers_need_queue_balance(capsys: pytest.CaptureFixture[str]) -> None:
    from nfqfw.cli import main

    assert main(["run", "--config", "/nonexistent", "--workers"]) == 2
    assert "--workers needs --queue-balance" in capsys.readouterr().err


def test_merge_talkers_sums_each_address_over_the_workers_top_lists() -> None:
    first = [{"addr": "10.0.0.25", "flows": 5}, {"addr": "203.0.113.10", "flows": 3}]
    second = [{"addr": "203.0.113.10", "flows": 4}, {"addr": "10.0.0.7", "flows": 1}]
    assert sv.merge_talkers([first, second]) == [
        {"addr": "203.0.113.10", "flows": 7},
        {"addr": "10.0.0.25", "flows": 5},
    ]
    assert sv.merge_talkers([]) == []


def test_merge_flow_stats_sums_the_offloaded_flows() -> None:
    base = {"total": 1, "max": 10, "by_proto": {}, "expired": 0, "early_drops": 0}
    offloaded = {"total": 2, "by_proto": {"tcp": {"ESTABLISHED": 2}}}
    merged = sv.merge_flow_stats([base | {"offloaded": offloaded}, base, base | {"offloaded": offloaded}])
    assert merged["offloaded"] == {"total": 4, "by_proto": {"tcp": {"ESTABLISHED": 4}}}
    assert "offloaded" not in sv.merge_flow_stats([base, base])


def test_merge_ha_sums_the_workers_counts() -> None:
    answers = [
        sv.Answer(0, 10, {"role": "master", "previous": "backup", "taken_over": 3}),
        sv.Answer(1, 11, {"role": "master", "previous": "backup", "taken_over": 4}),
        sv.Answer(2, None, error="worker restarting"),
    ]
    assert sv.merge_ha(answers) == {"taken_over": 7}
