"""The lab benchmark: throughput through the gateway namespace with four kinds of filtering.

Builds the lab (prefix ``nfqb-``: nfqb-wan / nfqb-gw / nfqb-lan), then for each mode measures,
from the inside host to the outside host through the gateway:

    TCP     iperf3 -t 5, Gbit/s received
    UDP     iperf3 -u -l 64 -b 0 -t 3, datagrams/s received at the server
    conn/s  a python loop connecting for 3 s (RST close, so no TIME_WAIT), completed connects/s

Modes, all with the lab's masquerade (so kernel conntrack runs in every mode):
    none      no filter rules
    kernel    iptables FORWARD with ctstate rules equivalent to config/policy.yaml
    bare-nfq  a python NetfilterQueue loop accepting everything (queue 0, FORWARD -j NFQUEUE)
    nfqfw     `nfqfw run --config config/policy.yaml --queue 0`

Prints a table with ratios against bare-nfq and writes bench/results/latest.json. The lab is
always torn down. Run as root: `make bench` or `.venv/bin/python bench/run.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nfqfw.lab import daemon_ctl  # noqa: E402
from nfqfw.lab.topology import WAN_V4, Topology, in_ns, run_in  # noqa: E402

PREFIX = "nfqb-"
POLICY = ROOT / "config" / "policy.yaml"
RESULTS = ROOT / "bench" / "results" / "latest.json"
TCP_SECONDS, UDP_SECONDS, CONN_SECONDS = 5, 3, 3
IPERF_PORT, CONN_PORT = 5201, 9000

KERNEL_RULES = [
    "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    "-A FORWARD -m conntrack --ctstate INVALID -j DROP",
    "-A FORWARD -i lan0 -m conntrack --ctstate NEW -j ACCEPT",
    "-A FORWARD -p tcp -d 10.0.0.25 --dport 25 -j ACCEPT",
    "-A FORWARD -j DROP",
]

# The bare loop: same queue parameters as nfqfw's adapter (max_len 8192, 16 MiB socket buffer).
BARE_LOOP = """
import sys
from netfilterqueue import NetfilterQueue, COPY_PACKET
q = NetfilterQueue()
q.bind(0, lambda p: p.accept(), 8192, COPY_PACKET, 0xFFFF, 16 * 1024 * 1024)
print("ready", flush=True)
try:
    q.run()
except KeyboardInterrupt:
    pass
"""

ACCEPT_SERVER = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {CONN_PORT}))
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


def measure(lan: str) -> dict[str, float]:
    tcp = measure_tcp(lan)
    udp = measure_udp(lan)
    conns, failed = measure_connects(lan)
    return {
        "tcp_gbps": round(tcp, 3),
        "udp64_pps": round(udp),
        "conn_per_s": round(conns),
        "conn_failed": failed,
    }


def kernel_rules(gw: str, install: bool) -> None:
    if install:
        for rule in KERNEL_RULES:
            run_in(gw, "iptables", "-w", *rule.split())
    else:
        run_in(gw, "iptables", "-w", "-F", "FORWARD")


def run_modes(t: Topology) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}

    def one(name: str) -> None:
        print(f"[{name}] measuring ...", flush=True)
        results[name] = measure(t.lan)
        print(f"[{name}] {results[name]}", flush=True)

    one("none")
    kernel_rules(t.gw, True)
    try:
        one("kernel")
    finally:
        kernel_rules(t.gw, False)
    bare = start_ready(t.gw, BARE_LOOP)
    try:
        run_in(t.gw, "iptables", "-w", "-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", "0")
        one("bare-nfq")
    finally:
        run_in(t.gw, "iptables", "-w", "-F", "FORWARD")
        stop(bare)
    daemon_ctl.start_daemon(PREFIX, POLICY, 0)
    try:
        one("nfqfw")
    finally:
        daemon_ctl.stop_daemon(PREFIX)
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    base = results.get("bare-nfq", {})
    cols = (
        ("tcp_gbps", "TCP Gbit/s", "{:.2f}"),
        ("udp64_pps", "UDP64 pkt/s", "{:,.0f}"),
        ("conn_per_s", "TCP conn/s", "{:,.0f}"),
    )
    head = (
        f"{'mode':<10}" + "".join(f"{title:>14}{'vs bare':>9}" for _, title, _ in cols) + f"{'conn fail':>11}"
    )
    lines = [head, "-" * len(head)]
    for mode, r in results.items():
        row = f"{mode:<10}"
        for key, _, fmt in cols:
            ratio = r[key] / base[key] if base.get(key) else float("nan")
            row += f"{fmt.format(r[key]):>14}{ratio:>8.2f}x"
        lines.append(row + f"{r['conn_failed']:>11}")
    return "\n".join(lines)


def main() -> int:
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
        accept_server = start_ready(t.wan, ACCEPT_SERVER)
        time.sleep(0.3)  # iperf3 -s has no readiness signal; it listens within milliseconds
        try:
            results = run_modes(t)
        finally:
            stop(accept_server)
            iperf_server.terminate()
            iperf_server.wait(timeout=5)
    finally:
        daemon_ctl.down(PREFIX)
    print()
    print(table(results))
    print(f"\n(total {time.monotonic() - started:.0f} s; ratios are against the bare NetfilterQueue loop)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "modes": results,
        "settings": {
            "tcp_seconds": TCP_SECONDS,
            "udp_seconds": UDP_SECONDS,
            "conn_seconds": CONN_SECONDS,
            "udp_len": 64,
            "policy": "config/policy.yaml",
        },
    }
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"saved {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
