"""Workers benchmark: one nfqfw process for two queues against one worker process per queue.

Builds the lab (prefix ``nfqbw-``) and gives the outside host PAIRS more addresses, each with an
iperf3 server of its own: the kernel spreads flows over the queues of --queue-balance by a hash
of the addresses (and protocol), so spreading needs many address pairs, not many ports. From the
inside host, PAIRS iperf3 clients run at once, one per address:

    UDP64   iperf3 -u -l 64 -b 0 -t 3 each, datagrams/s received at the servers, summed
    TCP     iperf3 -t 5 each, Gbit/s received, summed
    CPU     nfqfw's CPU time (the supervisor and its workers) during each test, in % of one core

Modes (all `nfqfw run --config config/policy.yaml`, GSO packets on):
    1 queue        --queue 0: one process, one queue (today's default)
    1 proc, 0:1    --queue-balance 0:1: one process serving both queues
    2 workers      --queue-balance 0:1 --workers: a worker process per queue

Also printed: how the address pairs fell on the two queues (from `nfqfw flows` of the workers).
Prints a table and writes bench/results/workers.json. Run as root:
`.venv/bin/python bench/workers.py [--runs N]` (or `make bench-workers`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from saved import save_results  # noqa: E402

from nfqfw.control.client import call  # noqa: E402
from nfqfw.lab import daemon_ctl  # noqa: E402
from nfqfw.lab.daemon_ctl import LabState  # noqa: E402
from nfqfw.lab.plan import Topology  # noqa: E402
from nfqfw.lab.topology import add_outside_addresses, in_ns, run_in  # noqa: E402

PREFIX = "nfqbw-"
POLICY = ROOT / "config" / "policy.yaml"
RESULTS = "workers.json"  # in bench/results
PAIRS = 8
ADDRESSES = [f"203.0.113.{100 + n}" for n in range(PAIRS)]
PORT = 5201
UDP_SECONDS, TCP_SECONDS = 3, 5
MODES = {
    "1 queue": ("--queue", "0"),
    "1 proc, 0:1": ("--queue-balance", "0:1"),
    "2 workers": ("--queue-balance", "0:1", "--workers"),
}


def clients(lan: str, *extra: str, seconds: int) -> list[dict]:  # type: ignore[type-arg]
    """PAIRS iperf3 clients at once, one per outside address; their JSON reports."""
    procs = []
    for address in ADDRESSES:
        argv = ["iperf3", "-c", address, "-p", str(PORT), "-t", str(seconds), "-J", *extra]
        procs.append(subprocess.Popen(in_ns(lan, *argv), stdout=subprocess.PIPE, text=True))
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 30)
        report = json.loads(out or "{}")
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        reports.append(report)
    return reports


def udp_pps(lan: str) -> float:
    total = 0.0
    for report in clients(lan, "-u", "-l", "64", "-b", "0", seconds=UDP_SECONDS):
        server = report["end"]["sum_received"]
        total += (server["packets"] - server["lost_packets"]) / server["seconds"]
    return total


def tcp_gbps(lan: str) -> float:
    reports = clients(lan, seconds=TCP_SECONDS)
    return sum(r["end"]["sum_received"]["bits_per_second"] for r in reports) / 1e9


def family(pid: int) -> list[int]:
    """`pid` and its children (the workers of a supervisor)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        pids += [int(child) for child in children]
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def timed(pids: list[int], measure: object) -> tuple[float, float]:
    """(the measurement, nfqfw's CPU share of one core while it ran)."""
    cpu, started = cpu_seconds(pids), time.monotonic()
    value = measure()  # type: ignore[operator]
    return value, (cpu_seconds(pids) - cpu) / (time.monotonic() - started)


def spread() -> dict[str, int]:
    """Address pairs per queue, from the workers' flows (UDP flows of the test just run)."""
    flows = call(LabState(PREFIX).runtime_dir, {"cmd": "flows", "proto": "udp"})["flows"]
    queues = {f["dst"]: f["queue"] for f in flows if f.get("dst") in ADDRESSES}
    return {f"queue {q}": n for q, n in sorted(Counter(queues.values()).items())}


def run_mode(t: Topology, name: str, args: tuple[str, ...]) -> dict[str, object]:
    daemon = daemon_ctl.start_daemon(PREFIX, POLICY, args=args)
    try:
        pids = family(daemon.pid)
        udp, udp_cpu = timed(pids, lambda: udp_pps(t.lan))
        tcp, tcp_cpu = timed(pids, lambda: tcp_gbps(t.lan))
        result: dict[str, object] = {
            "udp64_pps": round(udp),
            "udp_cpu": round(udp_cpu, 3),
            "tcp_gbps": round(tcp, 3),
            "tcp_cpu": round(tcp_cpu, 3),
        }
        if "--workers" in args:
            result["pairs_per_queue"] = spread()
    finally:
        daemon_ctl.stop_daemon(PREFIX)
        run_in(t.gw, sys.executable, "-m", "nfqfw", "rules", "remove")
        shutil.rmtree(LabState(PREFIX).state_dir, ignore_errors=True)  # each mode starts empty
    print(f"[{name}] {result}", flush=True)
    return result


def table(runs: list[dict[str, dict[str, object]]]) -> str:
    head = f"{'run':<4}{'mode':<13}{'UDP64 pkt/s':>13}{'CPU':>7}{'TCP Gbit/s':>12}{'CPU':>7}  pairs per queue"
    lines = [head, "-" * len(head)]
    for number, results in enumerate(runs, 1):
        for mode, r in results.items():
            pairs = r.get("pairs_per_queue", "")
            lines.append(
                f"{number:<4}{mode:<13}{r['udp64_pps']:>13,}{r['udp_cpu']:>7.0%}{r['tcp_gbps']:>12.2f}"
                f"{r['tcp_cpu']:>7.0%}  {pairs}"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="measure every mode this many times")
    runs_wanted = parser.parse_args().runs
    t = Topology(PREFIX)
    daemon_ctl.down(PREFIX)
    servers: list[subprocess.Popen[bytes]] = []
    runs: list[dict[str, dict[str, object]]] = []
    try:
        daemon_ctl.up(PREFIX)
        add_outside_addresses(t, ADDRESSES)
        for address in ADDRESSES:
            argv = in_ns(t.wan, "iperf3", "-s", "-B", address, "-p", str(PORT))
            servers.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)  # iperf3 -s has no readiness signal; it listens within milliseconds
        for _ in range(runs_wanted):
            runs.append({name: run_mode(t, name, args) for name, args in MODES.items()})
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=5)
        daemon_ctl.down(PREFIX)
    print()
    print(table(runs))
    save_results(RESULTS, {"pairs": PAIRS, "cpus": os.cpu_count(), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
