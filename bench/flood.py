"""`make bench-flood`: floods from the outside host against the kernel ruleset and nfqfw, side by side.

Builds the lab (prefix ``nfqf-``) and, for each gateway mode and each attack, starts an egress
bulk TCP transfer (iperf3 from the inside host to the outside host), starts the attack one
second later with hping3 from the outside host (``timeout FLOOD_SECONDS hping3 --flood ...``,
inside the lab's outside namespace only), and meanwhile connects from the outside host to the
inside host's accepted port (10.0.0.25:25, rule `mail` of config/policy.yaml) every 50 ms.

Measured during the attack:
    bulk      the transfer's Gbit/s over the seconds of the attack (iperf3's intervals)
    connects  ingress connects completed within 1 s, in % of those tried
    CPU       nfqfw's CPU time (user + system), in % of one core
    RSS       nfqfw's peak resident memory (MiB; sampled every 0.25 s)
    qdrops    the kernel's queue drops (queue full + socket buffer full), per queue that had any
    flows     the flows nfqfw tracks at the end of the attack (kernel mode: conntrack's count)
and every figure's ratio to the kernel ruleset's in the same run (the machine is shared, so
only ratios within one run compare).

Gateway modes:
    kernel          iptables ctstate rules equivalent to config/policy.yaml (bench/run.py's);
                    the synproxy attack runs with the kernel's SYNPROXY on port 25
    nfqfw-plain     nfqfw with every protection switched off (prefilter: off, new-rate: off,
                    new-rate-per-source: off, antispoof: off) on one queue (--queue 0
                    --new-queue off): what nfqfw did before them
    nfqfw-1q        the protections on, one queue shared by first packets and established flows
                    (--queue 0 --new-queue off), as the default was before queues in turn
    nfqfw           nfqfw as configured by default (kernel pre-filter, NEW caps, queues 0:3 for
                    established flows served in turn, first packets to queues 4:7, served after
                    them, early drops from fat flows of a queue that is behind)
    nfqfw-offload   the default plus `offload: established`: connections are handed over to the
                    kernel's conntrack once their handshake is done (the transfer's after its
                    first ACK); flows counts nfqfw's table and the offloaded ones
In the syn-random-synproxy rows nfqfw runs with `synproxy: true` on rule `mail` (the kernel's
SYNPROXY answers the SYNs, nfqfw follows the connections it opens: nfqfw.core.synproxy).

Attacks: none; syn-closed (one source, SYNs to port 22, which the policy drops); syn-random
(random sources, SYNs to the accepted port 25); syn-random-synproxy (the same against SYNPROXY);
udp-closed (one source, UDP to port 53, dropped); malformed (one source, SYN+FIN segments to
port 25, which conntrack calls INVALID).

Run as root: `make bench-flood` (about 6 minutes). The lab is always torn down; results go to
bench/results/flood-latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from run import KERNEL_RULES, accept_server, chosen, cpu_seconds, start_ready, stop  # noqa: E402
from saved import save_results  # noqa: E402

from nfqfw.kernel.queue_info import parse_queue_stats  # noqa: E402
from nfqfw.lab import daemon_ctl, traffic  # noqa: E402
from nfqfw.lab.plan import WAN_V4, Topology  # noqa: E402
from nfqfw.lab.topology import in_ns, run_in  # noqa: E402

PREFIX = "nfqf-"
POLICY = ROOT / "config" / "policy.yaml"
RESULTS = "flood-latest.json"  # in bench/results
FLOOD_SECONDS = 6
LEAD_SECONDS = 1.5  # the transfer runs alone this long before the attack
IPERF_PORT = 5201
SERVER, SERVER_PORT, CLOSED_PORT = "10.0.0.25", 25, 22
CONNECT_EVERY = 0.05
CONNECT_TIMEOUT = 1.0

ATTACKS: dict[str, list[str] | None] = {
    "none": None,
    "syn-closed": ["-S", "-p", str(CLOSED_PORT)],
    "syn-random": ["-S", "--rand-source", "-p", str(SERVER_PORT)],
    "syn-random-synproxy": ["-S", "--rand-source", "-p", str(SERVER_PORT)],
    "udp-closed": ["--udp", "-p", "53"],
    "malformed": ["-S", "-F", "-p", str(SERVER_PORT)],
}
PLAIN_OPTIONS = "options: {prefilter: off, new-rate: off, new-rate-per-source: off, antispoof: off}\n"
OFFLOAD_OPTIONS = "options: {offload: established}\n"
MODES = ("kernel", "nfqfw-plain", "nfqfw-1q", "nfqfw", "nfqfw-offload")
ONE_QUEUE = ("--queue", "0", "--new-queue", "off")
MODE_ARGS: dict[str, tuple[str, ...]] = {
    "nfqfw-plain": ONE_QUEUE,
    "nfqfw-1q": ONE_QUEUE,
    "nfqfw": (),
    "nfqfw-offload": (),
}
NOT_YET: dict[str, str] = {}
MAIL_RULE = "    ports: [25, 587]\n    action: accept\n"  # config/policy.yaml's rule mail, its end

# The kernel's SYNPROXY for port 25 (the usual ruleset, see shared/reference/flood-protection.md).
KERNEL_SYNPROXY = [
    ("raw", f"-A PREROUTING -i wan0 -p tcp --syn -d {SERVER} --dport {SERVER_PORT} -j CT --notrack"),
    (
        "filter",
        f"-I FORWARD 1 -p tcp -d {SERVER} --dport {SERVER_PORT} -m conntrack --ctstate INVALID,UNTRACKED "
        "-j SYNPROXY --sack-perm --timestamp --wscale 7 --mss 1460",
    ),
    (
        "filter",
        f"-I FORWARD 2 -p tcp -d {SERVER} --dport {SERVER_PORT} -m conntrack --ctstate INVALID -j DROP",
    ),
]


class Sampler(threading.Thread):
    """Peak RSS of a process, sampled every 0.25 s until stopped."""

    def __init__(self, pid: int | None) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kib, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while self.pid and not self.done.wait(0.25):
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
            if match:
                self.peak_kib = max(self.peak_kib, int(match.group(1)))


class Connector(threading.Thread):
    """Connects from the outside host to the accepted port every CONNECT_EVERY seconds."""

    def __init__(self, wan: str, until: float) -> None:
        super().__init__(daemon=True)
        self.wan, self.until, self.tried, self.done = wan, until, 0, 0

    def run(self) -> None:
        while time.monotonic() < self.until:
            started = time.monotonic()
            self.tried += 1
            self.done += connected(self.wan)
            time.sleep(max(0.0, CONNECT_EVERY - (time.monotonic() - started)))


def connected(wan: str) -> bool:
    """One connect from the outside host: the handshake completed within CONNECT_TIMEOUT."""
    with traffic.socket_in(wan, socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect((SERVER, SERVER_PORT))
        except OSError:
            return False
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, no TIME_WAIT
        return True


def queue_drops(gw: str) -> dict[int, int]:
    stats = parse_queue_stats(run_in(gw, "cat", "/proc/net/netfilter/nfnetlink_queue"))
    return {queue: s.queue_dropped + s.user_dropped for queue, s in stats.items()}


def flows(t: Topology, mode: str) -> int | None:
    if mode == "kernel":
        return int(run_in(t.gw, "conntrack", "-C").strip() or 0)
    runtime = daemon_ctl.LabState(PREFIX).runtime_dir
    out = subprocess.run(
        in_ns(t.gw, sys.executable, "-m", "nfqfw", "status", "--json", "--runtime-dir", str(runtime)),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    try:
        counts = json.loads(out.stdout)["flows"]
        return int(counts["total"]) + int(counts.get("offloaded", {}).get("total", 0))
    except (ValueError, KeyError, TypeError):
        return None


def one_run(t: Topology, mode: str, attack: str, consumer: int | None) -> dict[str, object]:
    """The transfer, the attack and the connects; the figures of one cell of the table."""
    total = LEAD_SECONDS + FLOOD_SECONDS + 1
    iperf = subprocess.Popen(
        in_ns(
            t.lan, "iperf3", "-c", WAN_V4, "-p", str(IPERF_PORT), "-t", str(int(total + 1)), "-J", "-i", "0.5"
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(LEAD_SECONDS)
    drops_before = queue_drops(t.gw)
    sampler = Sampler(consumer)
    sampler.start()
    cpu_before, started = (cpu_seconds(consumer) if consumer else 0.0), time.monotonic()
    connector = Connector(t.wan, started + FLOOD_SECONDS)
    connector.start()
    flood = None
    if ATTACKS[attack] is not None:
        argv = ["timeout", str(FLOOD_SECONDS), "hping3", "--flood", "-q", *ATTACKS[attack], SERVER]
        flood = subprocess.Popen(in_ns(t.wan, *argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    connector.join()
    elapsed = time.monotonic() - started
    cpu = (cpu_seconds(consumer) - cpu_before) / elapsed if consumer else None
    tracked = flows(t, mode)
    if flood is not None:
        flood.wait(timeout=FLOOD_SECONDS + 10)
    sampler.done.set()
    drops_after = queue_drops(t.gw)
    out, _ = iperf.communicate(timeout=total + 30)
    report = json.loads(out or "{}")
    rates = [
        i["sum"]["bits_per_second"]
        for i in report.get("intervals", [])
        if i["sum"]["start"] >= LEAD_SECONDS and i["sum"]["end"] <= LEAD_SECONDS + FLOOD_SECONDS
    ]
    return {
        "bulk_gbps": round(sum(rates) / len(rates) / 1e9, 3) if rates else 0.0,
        "connects_pct": round(100 * connector.done / max(1, connector.tried), 1),
        "cpu": None if cpu is None else round(cpu, 3),
        "rss_mib": round(sampler.peak_kib / 1024, 1) if consumer else None,
        "queue_drops": {q: drops_after.get(q, 0) - drops_before.get(q, 0) for q in drops_after},
        "flows": tracked,
    }


def kernel_mode(t: Topology, synproxy: bool, install: bool) -> None:
    if install:
        for rule in KERNEL_RULES:
            run_in(t.gw, "iptables", "-w", *rule.split())
        if synproxy:
            run_in(t.gw, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0")
            for table, rule in KERNEL_SYNPROXY:
                run_in(t.gw, "iptables", "-w", "-t", table, *rule.split())
    else:
        run_in(t.gw, "iptables", "-w", "-F", "FORWARD")
        run_in(t.gw, "iptables", "-w", "-t", "raw", "-F", "PREROUTING")
        run_in(t.gw, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=1")
    run_in(t.gw, "conntrack", "-F")


def forget_flows() -> None:
    """Each run starts with an empty table: no snapshot of the last run's flood is restored."""
    state_dir = daemon_ctl.LabState(PREFIX).state_dir
    for snapshot in state_dir.glob("flows*.snapshot*") if state_dir.is_dir() else ():
        snapshot.unlink()


def with_synproxy(policy: Path) -> Path:
    """The policy file with `synproxy: true` on rule mail, next to it."""
    text = policy.read_text()
    assert MAIL_RULE in text, "rule mail of config/policy.yaml changed: update MAIL_RULE"
    proxied = policy.with_name(policy.stem + "-synproxy.yaml")
    proxied.write_text(text.replace(MAIL_RULE, MAIL_RULE + "    synproxy: true\n", 1))
    proxied.chmod(0o600)
    return proxied


def run_mode(
    t: Topology, mode: str, policy: Path, attacks: tuple[str, ...] = tuple(ATTACKS)
) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    for attack in attacks:
        if mode in NOT_YET:
            results[attack] = {"not_yet": NOT_YET[mode]}
            continue
        print(f"[{mode}] {attack} ...", flush=True)
        if mode == "kernel":
            kernel_mode(t, attack.endswith("synproxy"), install=True)
            try:
                results[attack] = one_run(t, mode, attack, None)
            finally:
                kernel_mode(t, False, install=False)
        else:
            forget_flows()
            chosen = with_synproxy(policy) if attack.endswith("synproxy") else policy
            daemon = daemon_ctl.start_daemon(PREFIX, chosen, None, args=MODE_ARGS[mode])
            try:
                results[attack] = one_run(t, mode, attack, daemon.pid)
            finally:
                daemon_ctl.stop_daemon(PREFIX)
                run_in(t.gw, "conntrack", "-F")
        print(f"[{mode}] {attack}: {results[attack]}", flush=True)
    return results


COLUMNS = (
    ("bulk_gbps", "bulk Gbit/s", "{:.2f}"),
    ("connects_pct", "connects %", "{:.0f}"),
)


def table(results: dict[str, dict[str, dict[str, object]]]) -> str:
    head = f"{'attack':<20}{'mode':<14}{'bulk Gbit/s':>12}{'/kernel':>8}{'connects':>9}{'/kernel':>8}"
    head += f"{'CPU':>6}{'RSS MiB':>8}{'flows':>7}  queue drops"
    lines = [head, "-" * (len(head) + 12)]
    for attack in ATTACKS:
        base = results.get("kernel", {}).get(attack, {})
        for mode in MODES:
            r = results.get(mode, {}).get(attack)
            if r is None:
                continue
            row = f"{attack:<20}{mode:<14}"
            if "not_yet" in r:
                lines.append(row + f"  ({r['not_yet']})")
                continue
            for key, width in (("bulk_gbps", 12), ("connects_pct", 9)):
                value = r[key]
                row += f"{value:>{width}.2f}" if key == "bulk_gbps" else f"{value:>{width - 1}.0f}%"
                reference = base.get(key)
                row += f"{value / reference:>7.2f}x" if reference else f"{'-':>8}"  # type: ignore[operator]
            cpu, rss, tracked = r["cpu"], r["rss_mib"], r["flows"]
            row += f"{cpu:>6.0%}" if cpu is not None else f"{'-':>6}"
            row += f"{rss:>8.0f}" if rss is not None else f"{'-':>8}"
            row += f"{tracked:>7}" if tracked is not None else f"{'-':>7}"
            drops = {q: n for q, n in r["queue_drops"].items() if n}  # type: ignore[union-attr]
            row += "  " + (", ".join(f"q{q}: {n}" for q, n in sorted(drops.items())) or "0")
            lines.append(row)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="Floods against the kernel ruleset and nfqfw, side by side.")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of the modes")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated subset of the attacks")
    args = parser.parse_args()
    modes = chosen(parser, args.modes, MODES, "modes")
    attacks = chosen(parser, args.attacks, tuple(ATTACKS), "attacks")
    if os.geteuid() != 0:
        print("bench/flood.py: run as root (it builds network namespaces)", file=sys.stderr)
        return 1
    t = Topology(PREFIX)
    started = time.monotonic()
    results: dict[str, dict[str, dict[str, object]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        policies = {"nfqfw-plain": PLAIN_OPTIONS, "nfqfw-offload": OFFLOAD_OPTIONS}
        for mode, options in policies.items():
            path = Path(tmp) / f"{mode}.yaml"
            path.write_text(POLICY.read_text() + options)
            path.chmod(0o600)
        daemon_ctl.down(PREFIX)
        try:
            daemon_ctl.up(PREFIX)
            iperf_server = subprocess.Popen(
                in_ns(t.wan, "iperf3", "-s", "-p", str(IPERF_PORT)),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            server = start_ready(t.lan, accept_server(SERVER_PORT))
            time.sleep(0.3)
            try:
                shutil.copy(POLICY, Path(tmp) / "nfqfw.yaml")
                (Path(tmp) / "nfqfw.yaml").chmod(0o600)
                for mode in modes:
                    policy = Path(tmp) / f"{mode if mode in policies else 'nfqfw'}.yaml"
                    results[mode] = run_mode(t, mode, policy, attacks)
            finally:
                stop(server)
                iperf_server.terminate()
                iperf_server.wait(timeout=5)
        finally:
            daemon_ctl.down(PREFIX)
    print()
    print(table(results))
    print(
        f"\n(total {time.monotonic() - started:.0f} s; floods of {FLOOD_SECONDS} s; /kernel: ratio to the "
        "kernel ruleset in this run; CPU: nfqfw's, % of one core; flows: at the end of the attack)"
    )
    if set(modes) == set(MODES) and set(attacks) == set(ATTACKS):  # a subset is printed only
        save_results(RESULTS, {"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
