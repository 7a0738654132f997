"""`make bench-latency`: what other flows' packets wait while one flow is busy, kernel ruleset
against nfqfw, side by side.

Builds the lab (prefix ``nfqlat-``) with a second outside address (203.0.113.20) and a second
inside address (10.0.0.26, "the other host"). For each gateway mode and each load, the load
runs, after LEAD seconds `ping -i 0.01` sends PINGS echo requests from the inside host
(10.0.0.25) to the second outside address, and the figures are taken:

    ping      RTT median and 99th percentile (ms), requests lost (%)
    other     the other host's TCP transfer (iperf3 from 10.0.0.26 to 203.0.113.10) in Gbit/s
              during the ping, and its ratio to the same transfer alone (measured first, per mode)
    load      the load's own rate: the UDP stream's datagrams/s received, the 4 streams' Gbit/s
    queues    nfqfw: the packets each kernel queue carried during the ping (which queue the ping
              and the load fell in: the kernel hashes addresses and protocol, seeded per boot),
              the kernel's queue drops, and nfqfw's early drops (verdict `drop queue delay`)

Loads (all from the inside host 10.0.0.25):
    idle        nothing but the ping
    tcp-4       a 4-stream TCP download from 203.0.113.10 (iperf3 -P 4 -R)
    udp-other   a 64-byte UDP stream at full speed (iperf3 -u -b 0 -l 64) to 203.0.113.10, an
                allowed egress flow, and the other host's TCP transfer
    udp-same    the same UDP stream to 203.0.113.20 (the ping's destination), and the other
                host's TCP transfer

Gateway modes:
    kernel          iptables ctstate rules equivalent to config/policy.yaml (bench/run.py's)
    nfqfw           `nfqfw run` as configured by default
    nfqfw-1q        `nfqfw run --queue 0`: one queue for established flows (and its queue for
                    first packets): every flow shares one kernel FIFO, so only the early drops
                    keep the ping's wait bounded
    nfqfw-offload   the defaults plus `offload: established`: each flow is handed over to the
                    kernel's conntrack once established (the ping's, the load's)

Only ratios within one run compare (the machine is shared). Run as root: `make bench-latency`
(about 2 minutes; `--modes`, `--loads` choose a part; `--pin` puts the traffic tools on CPU 0
and nfqfw on CPU 1). The lab is always torn down; results go
to bench/results/latency-latest.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from run import KERNEL_RULES, cpu_seconds  # noqa: E402
from saved import save_results  # noqa: E402

from nfqfw.kernel.queue_info import EARLY_DROP, parse_queue_stats  # noqa: E402
from nfqfw.lab import daemon_ctl  # noqa: E402
from nfqfw.lab.plan import LAN_V4, WAN_V4, Topology  # noqa: E402
from nfqfw.lab.topology import in_ns, run_in  # noqa: E402

PREFIX = "nfqlat-"  # its own: nfqfw.lab.live_oracle has nfql-
POLICY = ROOT / "config" / "policy.yaml"
RESULTS = "latency-latest.json"  # in bench/results
PING_TARGET = "203.0.113.20"  # the second outside address: the ping's destination
OTHER_HOST = "10.0.0.26"  # the second inside address: the other host's transfer
PINGS, PING_INTERVAL = 300, 0.01
LEAD = 1.0  # seconds the load runs before the ping starts
LOAD_SECONDS = int(LEAD + PINGS * PING_INTERVAL + 3)
LOAD_PORT, OTHER_PORT, SAME_PORT = 5201, 5202, 5203  # iperf3 servers (SAME_PORT's on PING_TARGET)

LOADS = ("idle", "tcp-4", "udp-other", "udp-same")
MODES = ("kernel", "nfqfw", "nfqfw-1q", "nfqfw-offload")
MODE_ARGS: dict[str, tuple[str, ...]] = {"nfqfw": (), "nfqfw-1q": ("--queue", "0"), "nfqfw-offload": ()}


# --pin: the traffic tools on CPU 0, nfqfw on CPU 1 (as on a gateway where nfqfw has a core
# of its own; without it the load generators and nfqfw share both cores as the scheduler likes).
PINNING: dict[str, tuple[str, ...]] = {"tools": (), "nfqfw": ()}


def iperf(ns: str, *argv: str) -> subprocess.Popen[str]:
    command = (*PINNING["tools"], "iperf3", *argv, "-J", "-i", "0.5")
    return subprocess.Popen(in_ns(ns, *command), stdout=subprocess.PIPE, text=True)


def report_of(proc: subprocess.Popen[str]) -> dict:  # type: ignore[type-arg]
    out, _ = proc.communicate(timeout=LOAD_SECONDS + 30)
    report = json.loads(out or "{}")
    if "error" in report:
        raise RuntimeError(f"iperf3: {report['error']}")
    return report  # type: ignore[no-any-return]


def gbps_between(report: dict, start: float, end: float) -> float:  # type: ignore[type-arg]
    """The transfer's mean rate over iperf3's intervals inside [start, end] (its own seconds)."""
    rates = [
        i["sum"]["bits_per_second"]
        for i in report.get("intervals", [])
        if i["sum"]["start"] >= start - 0.01 and i["sum"]["end"] <= end + 0.01
    ]
    return sum(rates) / len(rates) / 1e9 if rates else 0.0


def ping(lan: str) -> dict[str, float]:
    argv = ["ping", "-n", "-i", str(PING_INTERVAL), "-c", str(PINGS), "-W", "1", PING_TARGET]
    done = subprocess.run(
        in_ns(lan, *PINNING["tools"], *argv), capture_output=True, text=True, timeout=PINGS * 0.05 + 30
    )
    rtts = sorted(float(ms) for ms in re.findall(r"time=([\d.]+) ms", done.stdout))
    if not rtts:
        return {"median_ms": math.nan, "p99_ms": math.nan, "lost_pct": 100.0}
    return {
        "median_ms": round(rtts[len(rtts) // 2], 3),
        "p99_ms": round(rtts[math.ceil(0.99 * len(rtts)) - 1], 3),
        "lost_pct": round(100 * (PINGS - len(rtts)) / PINGS, 1),
    }


def queue_stats(gw: str) -> dict[int, tuple[int, int]]:
    """Per bound queue: (packets queued so far, packets the kernel dropped for it)."""
    stats = parse_queue_stats(run_in(gw, "cat", "/proc/net/netfilter/nfnetlink_queue"))
    return {q: (s.id_sequence, s.queue_dropped + s.user_dropped) for q, s in stats.items()}


def nfqfw_verdicts(gw: str) -> dict[str, int]:
    runtime = daemon_ctl.LabState(PREFIX).runtime_dir
    argv = in_ns(gw, sys.executable, "-m", "nfqfw", "status", "--json", "--runtime-dir", str(runtime))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)
    try:
        return dict(json.loads(done.stdout)["verdicts"])
    except (ValueError, KeyError, TypeError):
        return {}


def other_alone(t: Topology) -> float:
    """The other host's TCP transfer alone: the reference for its ratio under load."""
    proc = iperf(t.lan, "-c", WAN_V4, "-B", OTHER_HOST, "-p", str(OTHER_PORT), "-t", "3")
    return gbps_between(report_of(proc), 0.5, 3.0)


def one_load(t: Topology, load: str, consumer: int | None) -> dict[str, object]:
    procs: dict[str, subprocess.Popen[str]] = {}
    if load == "tcp-4":
        download = ("-P", "4", "-R", "-t", str(LOAD_SECONDS))
        procs["load"] = iperf(t.lan, "-c", WAN_V4, "-p", str(LOAD_PORT), *download)
    elif load.startswith("udp"):
        target, port = (WAN_V4, LOAD_PORT) if load == "udp-other" else (PING_TARGET, SAME_PORT)
        udp = ("-u", "-b", "0", "-l", "64", "-t", str(LOAD_SECONDS))
        procs["load"] = iperf(t.lan, "-c", target, "-B", LAN_V4, "-p", str(port), *udp)
        other = ("-c", WAN_V4, "-B", OTHER_HOST, "-p", str(OTHER_PORT), "-t", str(LOAD_SECONDS))
        procs["other"] = iperf(t.lan, *other)
    started = time.monotonic()
    time.sleep(LEAD if procs else 0.0)
    before, verdicts_before = queue_stats(t.gw), nfqfw_verdicts(t.gw) if consumer else {}
    cpu_before, ping_start = (cpu_seconds(consumer) if consumer else 0.0), time.monotonic()
    result: dict[str, object] = dict(ping(t.lan))
    ping_end = time.monotonic()
    cpu = (cpu_seconds(consumer) - cpu_before) / (ping_end - ping_start) if consumer else None
    after, verdicts_after = queue_stats(t.gw), nfqfw_verdicts(t.gw) if consumer else {}
    window = (ping_start - started, ping_end - started)
    if "other" in procs:
        result["other_gbps"] = round(gbps_between(report_of(procs["other"]), *window), 3)
    if "load" in procs:
        report = report_of(procs["load"])
        if load == "tcp-4":
            result["load"] = f"{gbps_between(report, *window):.2f} Gbit/s"
        else:
            server = report["end"]["sum_received"]
            result["load"] = f"{(server['packets'] - server['lost_packets']) / server['seconds']:,.0f} pkt/s"
    result["cpu"] = None if cpu is None else round(cpu, 2)
    result["queued"] = {q: after[q][0] - before.get(q, (0, 0))[0] for q in after}
    result["queue_drops"] = {q: after[q][1] - before.get(q, (0, 0))[1] for q in after}
    result["early_drops"] = (
        verdicts_after.get(EARLY_DROP, 0) - verdicts_before.get(EARLY_DROP, 0) if consumer else None
    )
    for proc in procs.values():
        proc.wait(timeout=LOAD_SECONDS + 30)
    time.sleep(0.5)  # the iperf3 servers take the next test
    return result


def retried(measure: Callable[[], dict[str, object]]) -> dict[str, object]:
    """One measurement, tried again once after an iperf3 failure (its server sometimes refuses a
    test right after the last one)."""
    try:
        return measure()
    except RuntimeError as err:
        print(f"  {err}: once more", flush=True)
        time.sleep(2)
        return measure()


def kernel_rules(gw: str, install: bool) -> None:
    if install:
        for rule in KERNEL_RULES:
            run_in(gw, "iptables", "-w", *rule.split())
    else:
        run_in(gw, "iptables", "-w", "-F", "FORWARD")
    run_in(gw, "conntrack", "-F")


def run_mode(t: Topology, mode: str, loads: Sequence[str] = LOADS) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    consumer = None
    if mode == "kernel":
        kernel_rules(t.gw, True)
    else:
        policy = POLICY
        if mode == "nfqfw-offload":
            policy = daemon_ctl.LabState(PREFIX).runtime_dir / "offload.yaml"
            policy.write_text(POLICY.read_text() + "options: {offload: established}\n")
            policy.chmod(0o600)
        daemon = daemon_ctl.start_daemon(PREFIX, policy, None, wrapper=PINNING["nfqfw"], args=MODE_ARGS[mode])
        consumer = daemon.pid
    try:
        reference = other_alone(t)
        for load in loads:
            print(f"[{mode}] {load} ...", flush=True)
            results[load] = retried(partial(one_load, t, load, consumer))
            if "other_gbps" in results[load]:
                results[load]["other_ratio"] = round(results[load]["other_gbps"] / reference, 2)  # type: ignore[operator]
            results[load]["other_alone_gbps"] = round(reference, 3)
            print(f"[{mode}] {load}: {results[load]}", flush=True)
    finally:
        if mode == "kernel":
            kernel_rules(t.gw, False)
        else:
            daemon_ctl.stop_daemon(PREFIX)
            run_in(t.gw, sys.executable, "-m", "nfqfw", "rules", "remove")
            run_in(t.gw, "conntrack", "-F")
            for snapshot in daemon_ctl.LabState(PREFIX).state_dir.glob("flows*"):
                snapshot.unlink()  # each mode starts with an empty flow table
    return results


def table(results: dict[str, dict[str, dict[str, object]]]) -> str:
    head = f"{'load':<11}{'mode':<15}{'ping ms median':>15}{'p99':>8}{'lost':>6}"
    head += f"{'other Gbit/s':>14}{'/alone':>8}{'CPU':>6}  load; queues (packets during the ping)"
    lines = [head, "-" * (len(head) + 20)]
    for load in LOADS:
        for mode in MODES:
            r = results.get(mode, {}).get(load)
            if r is None:
                continue
            row = f"{load:<11}{mode:<15}"
            row += f"{r['median_ms']:>15.3f}{r['p99_ms']:>8.3f}{r['lost_pct']:>5.1f}%"
            other = r.get("other_gbps")
            row += f"{other:>14.2f}{r['other_ratio']:>7.2f}x" if other is not None else f"{'-':>14}{'-':>8}"
            cpu = r["cpu"]
            row += f"{cpu:>6.0%}" if cpu is not None else f"{'-':>6}"
            notes = [str(r["load"])] if "load" in r else []
            if r["early_drops"] is not None:
                busy = {q: n for q, n in r["queued"].items() if n}  # type: ignore[union-attr]
                notes.append(" ".join(f"q{q}:{n}" for q, n in sorted(busy.items())) or "-")
                drops = sum(r["queue_drops"].values())  # type: ignore[union-attr]
                notes.append(f"kernel drops {drops}, early drops {r['early_drops']}")
            lines.append(row + "  " + "; ".join(notes))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES, help="default: all")
    parser.add_argument("--loads", nargs="+", choices=LOADS, default=LOADS, help="default: all")
    parser.add_argument("--pin", action="store_true", help="traffic tools on CPU 0, nfqfw on CPU 1")
    chosen = parser.parse_args()
    if chosen.pin:
        PINNING.update(tools=("taskset", "-c", "0"), nfqfw=("taskset", "-c", "1"))
    if os.geteuid() != 0:
        print("bench/latency.py: run as root (it builds network namespaces)", file=sys.stderr)
        return 1
    t = Topology(PREFIX)
    started = time.monotonic()
    results: dict[str, dict[str, dict[str, object]]] = {}
    servers: list[subprocess.Popen[bytes]] = []
    daemon_ctl.down(PREFIX)
    try:
        daemon_ctl.up(PREFIX)
        run_in(t.wan, "ip", "addr", "add", f"{PING_TARGET}/24", "dev", "eth0")
        run_in(t.lan, "ip", "addr", "add", f"{OTHER_HOST}/24", "dev", "eth0")
        # A server on the second address answers from it (a UDP test's first datagram must).
        for port, bound in ((LOAD_PORT, ()), (OTHER_PORT, ()), (SAME_PORT, ("-B", PING_TARGET))):
            argv = in_ns(t.wan, *PINNING["tools"], "iperf3", "-s", "-p", str(port), *bound)
            servers.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)  # iperf3 -s has no readiness signal; it listens within milliseconds
        for mode in chosen.modes:
            results[mode] = run_mode(t, mode, chosen.loads)
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=5)
        daemon_ctl.down(PREFIX)
    print()
    print(table(results))
    print(
        f"\n(total {time.monotonic() - started:.0f} s; {PINGS} pings every {PING_INTERVAL * 1000:g} ms from "
        f"{LAN_V4} to {PING_TARGET}, after the load ran {LEAD:g} s; other: {OTHER_HOST}'s TCP transfer "
        "during the ping, /alone: against it alone; CPU: nfqfw's, % of one core)"
    )
    save_results(RESULTS, {"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
