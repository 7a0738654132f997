"""config/grafana/nfqfw.json: a well-formed Grafana dashboard whose queries name only metrics
the daemon really exports (the collector's output for a fake daemon, and the supervisor's
nfqfw_worker_up), and that covers verdicts, flows, table usage, queue drops, the kernel rules'
drops, early drops and latency."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from test_metrics import QUEUE_STATS, exposition, fake_daemon

from nfqfw.observe.metrics import EngineTimer, MergedCollector, NfqfwCollector

DASHBOARD = Path(__file__).resolve().parents[3] / "config/grafana/nfqfw.json"
METRIC = re.compile(r"\bnfqfw_[a-z0-9_]+\b")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def exported() -> set[str]:
    """Every sample name a daemon serves (a histogram's _bucket, _sum, _count included)."""
    text = exposition(NfqfwCollector(fake_daemon(), EngineTimer(every=64), read_stats=lambda: QUEUE_STATS))
    merged = MergedCollector(lambda: [], lambda: [(0, True)])  # type: ignore[arg-type]
    text += exposition(merged)
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("nfqfw_")}


def expressions() -> list[str]:
    exprs = [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]
    exprs += [var["definition"] for var in dashboard()["templating"]["list"] if "definition" in var]
    return exprs


def test_every_metric_a_query_names_is_exported() -> None:
    names = exported()
    assert {"nfqfw_verdicts_total", "nfqfw_engine_latency_seconds_bucket", "nfqfw_worker_up"} <= names
    unknown = sorted({name for expr in expressions() for name in METRIC.findall(expr)} - names)
    assert unknown == []


def test_the_dashboard_shows_what_operators_look_for() -> None:
    used = {name for expr in expressions() for name in METRIC.findall(expr)}
    wanted = {
        "nfqfw_verdicts_total",  # by action and by rule
        "nfqfw_flows",  # by state
        "nfqfw_flow_table_usage_ratio",
        "nfqfw_queue_kernel_drops_total",
        "nfqfw_queue_waiting",
        "nfqfw_kernel_drops_total",  # what the kernel rules dropped before the queues
        "nfqfw_engine_latency_seconds_bucket",
    }
    assert wanted <= used
    by = " ".join(expressions())
    assert "sum by (action)" in by and "sum by (rule, action)" in by and "sum by (proto, state)" in by
    assert 'reason="queue delay"' in by  # the early drops of queues that are behind


def test_panels_are_well_formed() -> None:
    board = dashboard()
    panels = board["panels"]
    assert board["uid"] == "nfqfw" and board["title"] == "nfqfw"
    assert len({panel["id"] for panel in panels}) == len(panels)
    variables = {var["name"] for var in board["templating"]["list"]}
    assert variables == {"datasource", "instance"}
    cells = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])
        grid = panel["gridPos"]
        cell = (grid["x"], grid["y"])
        assert cell not in cells and grid["x"] + grid["w"] <= 24
        cells.add(cell)
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], target["expr"]
            assert target["expr"].count("(") == target["expr"].count(")")
