"""The lab benchmark: throughput through the gateway namespace with four kinds of filtering.

Builds the lab (prefix ``nfqb-``: nfqb-wan / nfqb-gw / nfqb-lan), then for each mode measures,
from the inside host to the outside host through the gateway:

    TCP     iperf3 -t 5, Gbit/s received
    UDP     iperf3 -u -l 64 -b 0 -t 3, datagrams/s received at the server
    conn/s  a python loop connecting for 3 s (RST close, so no TIME_WAIT), completed connects/s
    CPU     the queue consumer's CPU time during the TCP test (user + system, /proc/PID/stat),
            in % of one core: what filtering that throughput costs the consumer

Modes, all with the lab's masquerade (so kernel conntrack runs in every mode):
    none          no filter rules
    kernel        iptables FORWARD with ctstate rules equivalent to config/policy.yaml
    bare-nfq      a python NetfilterQueue loop accepting everything (queue 0, FORWARD -j NFQUEUE);
                  the kernel cuts GSO packets into MTU-sized ones before queueing them
    bare-nfq-gso  the same loop with the queue's GSO flag (nfqfw.kernel.queueflags): GSO packets are
                  queued whole (their first COPY_RANGE bytes copied): the ceiling for any Python
                  NFQUEUE consumer that takes GSO packets
    nfqfw         `nfqfw run --config config/policy.yaml` (the defaults: GSO packets on, queues 0:3
                  served in turn, first packets to queues 4:7), with the first-packet caps raised
                  (CAPS_ABOVE_ONE_CLIENT): conn/s is one client, whose connections the default
                  per-source cap (2,500/s) would limit; the test measures nfqfw, not the cap
    nfqfw-no-gso  the same with --no-gso
    nfqfw-offload nfqfw with `options: {offload: established}`: each connection and replied UDP
                  flow is handed over to the kernel's conntrack (compare with kernel: /kern)

Prints a table with ratios against bare-nfq and bare-nfq-gso and writes bench/results/latest.json.
The honest comparisons: nfqfw against bare-nfq-gso (same kernel work per packet), nfqfw-no-gso
against bare-nfq. The lab is always torn down. Run as root: `make bench` or
`.venv/bin/python bench/run.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from saved import save_results  # noqa: E402

from nfqfw.kernel.queue_info import COPY_RANGE  # noqa: E402
from nfqfw.lab import daemon_ctl  # noqa: E402
from nfqfw.lab.plan import WAN_V4, Topology  # noqa: E402
from nfqfw.lab.topology import in_ns, run_in  # noqa: E402

PREFIX = "nfqb-"
POLICY = ROOT / "config" / "policy.yaml"
RESULTS = "latest.json"  # in bench/results
TCP_SECONDS, UDP_SECONDS, CONN_SECONDS = 5, 3, 3
IPERF_PORT, CONN_PORT = 5201, 9000

KERNEL_RULES = [
    "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    "-A FORWARD -m conntrack --ctstate INVALID -j DROP",
    "-A FORWARD -i lan0 -m conntrack --ctstate NEW -j ACCEPT",
    "-A FORWARD -p tcp -d 10.0.0.25 --dport 25 -j ACCEPT",
    "-A FORWARD -j DROP",
]

# The bare loop: same queue parameters as nfqfw's adapter (max_len 8192, copy range, 16 MiB
# socket buffer), and with GSO=True the same GSO flag.
BARE_LOOP = f"""
from netfilterqueue import NetfilterQueue, COPY_PACKET
from nfqfw.kernel.queueflags import NFQA_CFG_F_GSO, set_queue_flags
q = NetfilterQueue()
q.bind(0, lambda p: p.accept(), 8192, COPY_PACKET, {COPY_RANGE}, 16 * 1024 * 1024)
if GSO:
    set_queue_flags(q, 0, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO)
print("ready", flush=True)
try:
    q.run()
except KeyboardInterrupt:
    pass
"""


def accept_server(port: int) -> str:
    """Python code for a TCP server on `port` that accepts and closes at once (prints "ready")."""
    return f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {port}))
s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""


CONNECT_LOOP = f"""
import socket, struct, time
done = failed = 0
linger = struct.pack("ii", 1, 0)
end = time.monotonic() + {CONN_SECONDS}
start = time.monotonic()
while time.monotonic() < end:
    s = socket.socket()
    s.settimeout(1.0)
    try:
        s.connect(("{WAN_V4}", {CONN_PORT}))
        done += 1
    except OSError:
        failed += 1
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    s.close()
print(done, failed, time.monotonic() - start)
"""


def start_ready(ns: str, code: str) -> subprocess.Popen[str]:
    """A python process in `ns` that prints "ready" once set up; returns after that line."""
    proc = subprocess.Popen(in_ns(ns, sys.executable, "-c", code), stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"helper in {ns} did not start: {line!r}")
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def iperf(lan: str, *extra: str, seconds: int) -> dict:  # type: ignore[type-arg]
    argv = ["iperf3", "-c", WAN_V4, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", *extra]
    done = subprocess.run(in_ns(lan, *argv), capture_output=True, text=True, timeout=seconds + 20)
    report = json.loads(done.stdout or "{}")
    if "error" in report:
        raise RuntimeError(f"iperf3: {report['error']}")
    return report


def measure_tcp(lan: str) -> float:
    report = iperf(lan, seconds=TCP_SECONDS)
    return report["end"]["sum_received"]["bits_per_second"] / 1e9


def measure_udp(lan: str) -> float:
    """Datagrams/s the server received (sum_received is the server's own count, sent back)."""
    report = iperf(lan, "-u", "-l", "64", "-b", "0", seconds=UDP_SECONDS)
    server = report["end"]["sum_received"]
    return (server["packets"] - server["lost_packets"]) / server["seconds"]


def measure_connects(lan: str) -> tuple[float, int]:
    done = subprocess.run(
        in_ns(lan, sys.executable, "-c", CONNECT_LOOP),
        capture_output=True,
        text=True,
        timeout=CONN_SECONDS + 15,
    )
    ok, failed, elapsed = done.stdout.split()
    return int(ok) / float(elapsed), int(failed)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def measure(lan: str, consumer: int | None) -> dict[str, float | None]:
    """The three tests; `consumer`: the pid of the queue's consumer (None: no queue)."""
    cpu, started = cpu_seconds(consumer) if consumer else 0.0, time.monotonic()
    tcp = measure_tcp(lan)
    cpu_share = (cpu_seconds(consumer) - cpu) / (time.monotonic() - started) if consumer else None
    udp = measure_udp(lan)
    conns, failed = measure_connects(lan)
    return {
        "tcp_gbps": round(tcp, 3),
        "udp64_pps": round(udp),
        "conn_per_s": round(conns),
        "conn_failed": failed,
        "tcp_consumer_cpu": None if cpu_share is None else round(cpu_share, 3),
    }


def kernel_rules(gw: str, install: bool) -> None:
    if install:
        for rule in KERNEL_RULES:
            run_in(gw, "iptables", "-w", *rule.split())
    else:
        run_in(gw, "iptables", "-w", "-F", "FORWARD")


# The caps stay in place (their kernel rules cost what they cost by default) but above the rate
# one client reaches here, so conn/s measures nfqfw's handshakes, not the default per-source cap.
CAPS_ABOVE_ONE_CLIENT = "new-rate: 20000/second, new-rate-per-source: 20000/second"
MODES = ("none", "kernel", "bare-nfq", "bare-nfq-gso", "nfqfw", "nfqfw-no-gso", "nfqfw-offload")


def run_modes(t: Topology, modes: tuple[str, ...] = MODES) -> dict[str, dict[str, float | None]]:
    results: dict[str, dict[str, float | None]] = {}

    def one(name: str, consumer: int | None = None) -> None:
        print(f"[{name}] measuring ...", flush=True)
        results[name] = measure(t.lan, consumer)
        print(f"[{name}] {results[name]}", flush=True)

    if "none" in modes:
        one("none")
    if "kernel" in modes:
        kernel_rules(t.gw, True)
        try:
            one("kernel")
        finally:
            kernel_rules(t.gw, False)
    for name, gso in (("bare-nfq", False), ("bare-nfq-gso", True)):
        if name not in modes:
            continue
        bare = start_ready(t.gw, f"GSO = {gso}\n{BARE_LOOP}")
        try:
            run_in(t.gw, "iptables", "-w", "-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", "0")
            one(name, bare.pid)  # `ip netns exec` execs python: the same pid
        finally:
            run_in(t.gw, "iptables", "-w", "-F", "FORWARD")
            stop(bare)
    with tempfile.TemporaryDirectory() as tmp:
        policy_text = POLICY.read_text()
        plain = Path(tmp) / "nfqfw.yaml"
        plain.write_text(policy_text + f"options: {{{CAPS_ABOVE_ONE_CLIENT}}}\n")
        offload = Path(tmp) / "offload.yaml"
        offload.write_text(policy_text + f"options: {{offload: established, {CAPS_ABOVE_ONE_CLIENT}}}\n")
        for path in (plain, offload):
            path.chmod(0o600)
        for name, policy, args in (
            ("nfqfw", plain, ()),
            ("nfqfw-no-gso", plain, ("--no-gso",)),
            ("nfqfw-offload", offload, ()),
        ):
            if name not in modes:
                continue
            daemon = daemon_ctl.start_daemon(PREFIX, policy, None, args=args)
            try:
                one(name, daemon.pid)
            finally:
                daemon_ctl.stop_daemon(PREFIX)
    return results


COLUMNS = (
    ("tcp_gbps", "TCP Gbit/s", "{:.2f}"),
    ("udp64_pps", "UDP64 pkt/s", "{:,.0f}"),
    ("conn_per_s", "TCP conn/s", "{:,.0f}"),
)
BASES = (("bare-nfq", "/bare"), ("bare-nfq-gso", "/gso"), ("kernel", "/kern"))  # ratio columns


def table(results: dict[str, dict[str, float | None]]) -> str:
    head = f"{'mode':<13}"
    for _, title, _ in COLUMNS:
        head += f"{title:>13}" + "".join(f"{suffix:>7}" for _, suffix in BASES)
    head += f"{'conn fail':>11}{'TCP CPU':>9}"
    lines = [head, "-" * len(head)]
    for mode, r in results.items():
        row = f"{mode:<13}"
        for key, _, fmt in COLUMNS:
            row += f"{fmt.format(r[key]):>13}"
            for base, _ in BASES:
                reference = results.get(base, {}).get(key)
                row += f"{r[key] / reference:>6.2f}x" if reference else f"{'-':>7}"
        cpu = r.get("tcp_consumer_cpu")
        lines.append(row + f"{r['conn_failed']:>11}" + (f"{cpu:>9.0%}" if cpu is not None else f"{'-':>9}"))
    return "\n".join(lines)


def chosen(parser: argparse.ArgumentParser, text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    """The comma-separated subset `text` of `known` (an argparse error for an unknown name)."""
    picked = tuple(word for word in text.split(",") if word)
    unknown = sorted(set(picked) - set(known))
    if unknown:
        parser.error(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return picked


def main() -> int:
    parser = argparse.ArgumentParser(description="Throughput through the lab's gateway, by mode.")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated subset of {','.join(MODES)} (a subset is printed, not saved)",
    )
    modes = chosen(parser, parser.parse_args().modes, MODES, "modes")
    t = Topology(PREFIX)
    started = time.monotonic()
    daemon_ctl.down(PREFIX)
    try:
        daemon_ctl.up(PREFIX)
        iperf_server = subprocess.Popen(
            in_ns(t.wan, "iperf3", "-s", "-p", str(IPERF_PORT)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        acceptor = start_ready(t.wan, accept_server(CONN_PORT))
        time.sleep(0.3)  # iperf3 -s has no readiness signal; it listens within milliseconds
        try:
            results = run_modes(t, modes)
        finally:
            stop(acceptor)
            iperf_server.terminate()
            iperf_server.wait(timeout=5)
    finally:
        daemon_ctl.down(PREFIX)
    print()
    print(table(results))
    print(
        f"\n(total {time.monotonic() - started:.0f} s; /bare: against the bare NetfilterQueue loop, "
        "/gso: against the same loop taking GSO packets whole)"
    )
    if set(modes) != set(MODES):
        return 0
    settings = {
        "tcp_seconds": TCP_SECONDS,
        "udp_seconds": UDP_SECONDS,
        "conn_seconds": CONN_SECONDS,
        "udp_len": 64,
        "copy_range": COPY_RANGE,
        "policy": "config/policy.yaml",
    }
    save_results(RESULTS, {"modes": results, "settings": settings})
    return 0


if __name__ == "__main__":
    sys.exit(main())
