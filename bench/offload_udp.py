"""64-byte UDP through the lab's gateway: the kernel ruleset against nfqfw with `offload:
established`, in alternating rounds.

UDP64 packets/s move by tens of percent from one run to the next on a shared machine, more
than the gap this compares, so each round measures every mode once, one after the other, and
the table gives every round, the means and their ratio to the kernel's. Between two modes
nfqfw's rules are removed and the kernel's conntrack table flushed, and each measurement has a
fresh `iperf3 -s -1` (a server left over from a UDP test can hang the next one).

Modes: kernel (bench/run.py's ctstate ruleset), offload (config/policy.yaml with `offload:
established`), offload-no-antispoof (the same with `antispoof: off`: what the raw table's
rpfilter lookup costs per packet).

Prints the table (nothing saved). Run as root: `.venv/bin/python bench/offload_udp.py [--rounds N]`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import IPERF_PORT, POLICY, kernel_rules, measure_udp  # noqa: E402

from nfqfw.lab import daemon_ctl  # noqa: E402
from nfqfw.lab.plan import Topology  # noqa: E402
from nfqfw.lab.topology import in_ns, run_in  # noqa: E402

PREFIX = "nfqou-"
OPTIONS = {
    "offload": "options: {offload: established}\n",
    "offload-no-antispoof": "options: {offload: established, antispoof: off}\n",
}
MODES = ("kernel", *OPTIONS)


def one_udp_run(t: Topology) -> int:
    """Datagrams/s of one iperf3 UDP64 run against a fresh one-off server."""
    server = subprocess.Popen(
        in_ns(t.wan, "iperf3", "-s", "-1", "-p", str(IPERF_PORT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)  # iperf3 -s has no readiness signal; it listens within milliseconds
    try:
        return round(measure_udp(t.lan))
    finally:
        server.wait(timeout=10)


def measure_kernel(t: Topology) -> int:
    kernel_rules(t.gw, True)
    run_in(t.gw, "conntrack", "-F")
    try:
        return one_udp_run(t)
    finally:
        kernel_rules(t.gw, False)


def measure_nfqfw(t: Topology, policy: Path) -> int:
    run_in(t.gw, "conntrack", "-F")
    daemon_ctl.start_daemon(PREFIX, policy, None)
    try:
        return one_udp_run(t)
    finally:
        daemon_ctl.stop_daemon(PREFIX)
        run_in(t.gw, sys.executable, "-m", "nfqfw", "rules", "remove")  # it leaves them when it stops


def table(results: dict[str, list[int]]) -> str:
    kernel = sum(results["kernel"]) / len(results["kernel"])
    lines = [f"{'mode':<22}{'mean pkt/s':>12}{'/kernel':>9}  rounds", "-" * 80]
    for mode, runs in results.items():
        mean = sum(runs) / len(runs)
        lines.append(f"{mode:<22}{mean:>12,.0f}{mean / kernel:>8.2f}x  {' '.join(f'{r:,}' for r in runs)}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="UDP64: kernel ruleset against offload, alternating rounds.")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every mode (default 5)")
    rounds = parser.parse_args().rounds
    t = Topology(PREFIX)
    results: dict[str, list[int]] = {mode: [] for mode in MODES}
    daemon_ctl.down(PREFIX)
    try:
        daemon_ctl.up(PREFIX)
        with tempfile.TemporaryDirectory() as tmp:
            policies = {}
            for mode, options in OPTIONS.items():
                policies[mode] = Path(tmp) / f"{mode}.yaml"
                policies[mode].write_text(POLICY.read_text() + options)
                policies[mode].chmod(0o600)
            for number in range(1, rounds + 1):
                results["kernel"].append(measure_kernel(t))
                for mode, policy in policies.items():
                    results[mode].append(measure_nfqfw(t, policy))
                latest = ", ".join(f"{mode} {runs[-1]:,}" for mode, runs in results.items())
                print(f"round {number}: {latest}", flush=True)
    finally:
        daemon_ctl.down(PREFIX)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
