"""Bytes per tracked flow, and memory under churn, measured with tracemalloc and RSS.

Per flow: two separate tables are filled through Engine.process (so confirmation, expiry
bookkeeping and everything else a real flow costs are included): N UDP flows (request + reply,
so the flow is replied/assured as in real traffic) and N TCP flows after a complete three-way
handshake. The policy's max-flows is raised to N, so every flow is tracked and the figure is
bytes per tracked flow. Packets are built before tracing starts; only what the engine keeps is
counted.

Churn (--churn): a random-source flood of first packets to a port the policy accepts
(TCP SYNs to 10.0.0.25:25, UDP datagrams to 10.0.0.25:53), 100,000 per second of packet clock,
into a table of --churn-max-flows: it is full after the first second, and from then on every
new flow evicts an unassured one (early drop). Traced bytes and the process's RSS are reported
at each checkpoint, against the same table full without churn: memory must follow max-flows,
not the number of first packets.

    .venv/bin/python bench/flow_memory.py [--flows N] [--breakdown]
    .venv/bin/python bench/flow_memory.py --churn 1000000,2000000,4000000 [--churn-max-flows 20000]
"""

from __future__ import annotations

import argparse
import gc
import json
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nfqfw.core import build  # noqa: E402
from nfqfw.core.config import parse_policy  # noqa: E402
from nfqfw.core.engine import Engine  # noqa: E402
from nfqfw.core.policy import CompiledPolicy  # noqa: E402
from nfqfw.core.verdict import Action, Hook, Meta  # noqa: E402

POLICY = ROOT / "config" / "policy.yaml"
OUT = Meta(Hook.FORWARD, "lan0", "wan0")
BACK = Meta(Hook.FORWARD, "wan0", "lan0")
TARGET = 300
SYN, ACK = 0x02, 0x10


def endpoints(i: int) -> tuple[bytes, bytes, int]:
    """A distinct (client, server, client port) per flow number."""
    client = struct.pack("!I", struct.unpack("!I", build.addr("10.0.0.0"))[0] + 2 + i % 250)
    server = build.addr("203.0.113.10")
    return client, server, 1024 + i // 250


def udp_packets(i: int) -> list[tuple[bytes, Meta]]:
    c, s, port = endpoints(i)
    return [
        (build.ipv4(c, s, 17, build.udp(c, s, port, 53, b"q" * 20)), OUT),
        (build.ipv4(s, c, 17, build.udp(s, c, 53, port, b"r" * 40)), BACK),
    ]


def tcp_packets(i: int) -> list[tuple[bytes, Meta]]:
    c, s, port = endpoints(i)
    return [
        (build.ipv4(c, s, 6, build.tcp(c, s, port, 80, 1000, 0, SYN, options=build.mss_option(1460))), OUT),
        (
            build.ipv4(
                s, c, 6, build.tcp(s, c, 80, port, 5000, 1001, SYN | ACK, options=build.mss_option(1460))
            ),
            BACK,
        ),
        (build.ipv4(c, s, 6, build.tcp(c, s, port, 80, 1001, 5001, ACK)), OUT),
    ]


def policy_with(max_flows: int, extra_ingress: str = "") -> CompiledPolicy:
    """config/policy.yaml with max-flows set (and more ingress rules first)."""
    text = POLICY.read_text().replace(
        "ingress:                    # first match wins\n", "ingress:\n" + extra_ingress
    )
    text += f"\noptions:\n  max-flows: {max_flows}\n"
    return CompiledPolicy(parse_policy(text, str(POLICY)))


def measure(kind: str, flows: int, breakdown: bool = False) -> dict[str, object]:
    maker = udp_packets if kind == "udp" else tcp_packets
    packets = [p for i in range(flows) for p in maker(i)]
    engine = Engine(policy_with(flows + 16))
    # one flow first, so one-time allocations (caches, first dict resize steps) are not counted
    for data, meta in maker(flows + 1):
        engine.process(data, meta, 1.0)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    start = tracemalloc.take_snapshot() if breakdown else None
    accepted = 0
    for n, (data, meta) in enumerate(packets):
        accepted += engine.process(data, meta, 1.0 + n * 1e-6).action is Action.ACCEPT
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    sites: list[tuple[str, float]] = []
    if start is not None:
        tracked_now = len(engine.conntrack) - 1
        for stat in tracemalloc.take_snapshot().compare_to(start, "lineno")[:8]:
            frame = stat.traceback[0]
            where = f"{Path(frame.filename).name}:{frame.lineno}"
            sites.append((where, round(stat.size_diff / tracked_now, 1)))
    tracemalloc.stop()
    tracked = len(engine.conntrack) - 1
    per_flow = (after - before) / tracked if tracked else float("nan")
    states: dict[str, int] = {}
    for flow in engine.conntrack:
        states[flow.state_name] = states.get(flow.state_name, 0) + 1
    return {
        "kind": kind,
        "flows": tracked,
        "packets_accepted": accepted,
        "packets": len(packets),
        "bytes": after - before,
        "bytes_per_flow": round(per_flow, 1),
        "target": TARGET,
        "meets_target": per_flow <= TARGET,
        "states": states,
        "sites": sites,  # --breakdown: the allocation sites holding the most, bytes per flow
    }


IN = Meta(Hook.FORWARD, "wan0", "lan0")
UDP_DNS_RULE = "  - {name: dns-in, proto: udp, to: 10.0.0.25, ports: [53], action: accept}\n"
RATE = 100_000  # first packets per second of packet clock


def first_packet_template(kind: str) -> tuple[bytearray, int]:
    """One first packet from outside to an accepted port, and the offset of its source address
    (rewritten per packet: the engine verifies no checksum, so the rest can stay)."""
    src, dst = build.addr("198.18.0.1"), build.addr("10.0.0.25")
    if kind == "tcp":
        data = build.ipv4(src, dst, 6, build.tcp(src, dst, 40000, 25, 1, 0, SYN))
    else:
        data = build.ipv4(src, dst, 17, build.udp(src, dst, 40000, 53, b"q" * 20))
    return bytearray(data), 12


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def churn(kind: str, max_flows: int, checkpoints: list[int], traced: bool) -> list[dict[str, object]]:
    """A full table, then each checkpoint's number of first packets: traced bytes (`traced`) or
    the process's RSS (not traced: tracemalloc's own bookkeeping would count in the RSS)."""
    engine = Engine(policy_with(max_flows, UDP_DNS_RULE))
    template, at = first_packet_template(kind)
    gc.collect()
    if traced:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0] if traced else 0
    rows: list[dict[str, object]] = []
    sent = 0

    def flood(until: int) -> None:
        nonlocal sent
        process, pack = engine.process, struct.Struct("!I").pack_into
        while sent < until:
            pack(template, at, 0xC6120000 + sent % 0x00FFFFFF)  # 198.18.0.0/15 and on: new sources
            process(bytes(template), IN, 1.0 + sent / RATE)
            sent += 1

    def row(label: str) -> None:
        gc.collect()
        conntrack = engine.conntrack
        rows.append(
            {
                "kind": kind,
                "first_packets": label,
                "flows": len(conntrack),
                "early_drops": conntrack.early_drops,
                "traced_mb": round((tracemalloc.get_traced_memory()[0] - base) / 1e6, 1) if traced else None,
                "rss_mb": None if traced else round(rss_bytes() / 1e6, 1),
                "wheel_entries": conntrack.expiry_entries,
            }
        )

    flood(max_flows)
    row(f"{max_flows:,} (table full, no churn)")
    for checkpoint in checkpoints:
        flood(checkpoint)
        row(f"{checkpoint:,}")
    if traced:
        tracemalloc.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flows", type=int, default=50_000)
    parser.add_argument("--breakdown", action="store_true", help="bytes per flow by allocation site")
    parser.add_argument("--churn", metavar="N,N,...", help="churn mode: first packets at each checkpoint")
    parser.add_argument("--churn-max-flows", type=int, default=20_000, metavar="N")
    parser.add_argument("--churn-pass", choices=("tcp", "udp"), help=argparse.SUPPRESS)  # one subprocess
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.churn_pass:
        checkpoints = [int(n) for n in args.churn.split(",")]
        print(json.dumps(churn(args.churn_pass, args.churn_max_flows, checkpoints, args.traced)))
        return 0
    if args.churn:
        return main_churn([int(n) for n in args.churn.split(",")], args.churn_max_flows)
    results = [measure("udp", args.flows, args.breakdown), measure("tcp", args.flows, args.breakdown)]
    print(f"{'flows':<28}{'tracked':>9}{'bytes':>13}{'bytes/flow':>12}{'target':>8}  verdict")
    for r in results:
        label = "UDP (replied)" if r["kind"] == "udp" else "TCP (handshake complete)"
        verdict = "OK" if r["meets_target"] else f"over by {r['bytes_per_flow'] - TARGET:.0f}"  # type: ignore[operator]
        print(f"{label:<28}{r['flows']:>9}{r['bytes']:>13,}{r['bytes_per_flow']:>12}{TARGET:>8}  {verdict}")
        print(f"  states: {r['states']}, accepted {r['packets_accepted']}/{r['packets']} packets")
        for where, size in r["sites"]:  # type: ignore[attr-defined]
            print(f"  {size:8.1f}  {where}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "flow_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


def churn_in_subprocess(
    kind: str, max_flows: int, checkpoints: list[int], traced: bool
) -> list[dict[str, object]]:
    argv = [sys.executable, __file__, "--churn-pass", kind, "--churn", ",".join(map(str, checkpoints))]
    argv += ["--churn-max-flows", str(max_flows)] + (["--traced"] if traced else [])
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def main_churn(checkpoints: list[int], max_flows: int) -> int:
    results = []
    print(f"max-flows {max_flows:,}; first packets to an accepted port, {RATE:,}/s of packet clock")
    columns = (("first packets", -30), ("flows", 8), ("early drops", 13), ("wheel", 11))
    columns += (("traced MB", 11), ("RSS MB", 9))
    print(
        " " * 5 + "".join(name.ljust(-width) if width < 0 else name.rjust(width) for name, width in columns)
    )
    for kind in ("tcp", "udp"):
        # each figure from a fresh process of its own: the RSS one untraced, the traced one apart
        rss_rows, traced_rows = (churn_in_subprocess(kind, max_flows, checkpoints, t) for t in (False, True))
        for rss_row, traced_row in zip(rss_rows, traced_rows, strict=True):
            r = {**traced_row, "rss_mb": rss_row["rss_mb"]}
            results.append(r)
            print(
                f"{kind.upper():<5}{r['first_packets']:<30}{r['flows']:>8,}{r['early_drops']:>13,}"
                f"{r['wheel_entries']:>11,}{r['traced_mb']:>11}{r['rss_mb']:>9}"
            )
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "flow_memory_churn.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
