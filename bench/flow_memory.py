"""Bytes per tracked flow, measured with tracemalloc, against the 300 bytes/flow target.

Two separate tables are filled through Engine.process (so confirmation, expiry bookkeeping and
everything else a real flow costs are included): 50k UDP flows (request + reply, so the flow is
replied/assured as in real traffic) and 50k TCP flows after a complete three-way handshake.
Packets are built before tracing starts; only what the engine keeps is counted.

    .venv/bin/python bench/flow_memory.py [--flows N] [--breakdown]
"""

from __future__ import annotations

import argparse
import gc
import json
import struct
import sys
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nfqfw.core import build  # noqa: E402
from nfqfw.core.config import load_policy  # noqa: E402
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


def measure(kind: str, flows: int, breakdown: bool = False) -> dict[str, object]:
    maker = udp_packets if kind == "udp" else tcp_packets
    packets = [p for i in range(flows) for p in maker(i)]
    engine = Engine(CompiledPolicy(load_policy(str(POLICY))))
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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flows", type=int, default=50_000)
    parser.add_argument("--breakdown", action="store_true", help="bytes per flow by allocation site")
    args = parser.parse_args()
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


if __name__ == "__main__":
    sys.exit(main())
