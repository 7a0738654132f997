"""Engine packets/s over a synthetic traffic mix, and `nfqfw replay` wall time over a pcap of it.

The mix, per "round" of flows: TCP flows from the LAN to the outside (handshake, a few data
segments each way with their ACKs, FIN/ACK close), UDP request/reply pairs and ICMP echo
request/reply pairs. Packets are built once up front; only Engine.process is timed.

    .venv/bin/python bench/replay_speed.py [--flows N] [--no-replay] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nfqfw.core import build  # noqa: E402
from nfqfw.core.config import load_policy  # noqa: E402
from nfqfw.core.engine import Engine  # noqa: E402
from nfqfw.core.policy import CompiledPolicy  # noqa: E402
from nfqfw.core.verdict import Action, Hook, Meta  # noqa: E402

POLICY = ROOT / "config" / "policy.yaml"
OUT = Meta(Hook.FORWARD, "lan0", "wan0")  # original direction: inside -> outside
BACK = Meta(Hook.FORWARD, "wan0", "lan0")  # replies
SYN, FIN, ACK, PSH = 0x02, 0x01, 0x10, 0x08
DATA_SEGMENTS = 4
PAYLOAD = b"x" * 100

Packet = tuple[bytes, bool]  # (IP packet, is it in the original direction)


def tcp_flow(client: bytes, server: bytes, sport: int) -> list[Packet]:
    """Handshake, DATA_SEGMENTS data segments each way with ACKs, FIN/ACK close from both sides."""
    seg = build.tcp
    c_seq, s_seq = 1000, 5000
    pkts: list[Packet] = []

    def out(flags: int, payload: bytes = b"") -> None:
        nonlocal c_seq
        data = seg(client, server, sport, 80, c_seq, s_seq if flags & ACK else 0, flags, payload=payload)
        pkts.append((build.ipv4(client, server, 6, data), True))
        c_seq += len(payload) + (1 if flags & (SYN | FIN) else 0)

    def back(flags: int, payload: bytes = b"") -> None:
        nonlocal s_seq
        data = seg(server, client, 80, sport, s_seq, c_seq, flags, payload=payload)
        pkts.append((build.ipv4(server, client, 6, data), False))
        s_seq += len(payload) + (1 if flags & (SYN | FIN) else 0)

    out(SYN)
    back(SYN | ACK)
    out(ACK)
    for _ in range(DATA_SEGMENTS):
        out(PSH | ACK, PAYLOAD)
        back(ACK)
        back(PSH | ACK, PAYLOAD)
        out(ACK)
    out(FIN | ACK)
    back(FIN | ACK)
    out(ACK)
    return pkts


def udp_pair(client: bytes, server: bytes, sport: int) -> list[Packet]:
    return [
        (build.ipv4(client, server, 17, build.udp(client, server, sport, 53, PAYLOAD[:40])), True),
        (build.ipv4(server, client, 17, build.udp(server, client, 53, sport, PAYLOAD[:80])), False),
    ]


def icmp_pair(client: bytes, server: bytes, ident: int) -> list[Packet]:
    return [
        (build.ipv4(client, server, 1, build.icmp(8, 0, (ident, 1), PAYLOAD[:56])), True),
        (build.ipv4(server, client, 1, build.icmp(0, 0, (ident, 1), PAYLOAD[:56])), False),
    ]


def synthetic_mix(flows: int) -> list[Packet]:
    """`flows` TCP flows plus as many UDP pairs and ICMP pairs, interleaved in rounds of 64."""
    client_base, server_base = build.addr("10.0.0.0"), build.addr("203.0.113.0")
    c0, s0 = struct.unpack("!I", client_base)[0], struct.unpack("!I", server_base)[0]
    packets: list[Packet] = []
    for start in range(0, flows, 64):
        batch: list[list[Packet]] = []
        for i in range(start, min(start + 64, flows)):
            client = struct.pack("!I", c0 + 2 + i % 250)
            server = struct.pack("!I", s0 + 10 + i % 200)
            port = 1024 + i % 60000
            batch += [
                tcp_flow(client, server, port),
                udp_pair(client, server, port),
                icmp_pair(client, server, i),
            ]
        # interleave: walk the flows' packet lists in lock step, like concurrent traffic
        depth = max(len(b) for b in batch)
        for k in range(depth):
            packets += [b[k] for b in batch if k < len(b)]
    return packets


def new_engine() -> Engine:
    return Engine(CompiledPolicy(load_policy(str(POLICY))))


def time_engine(packets: list[Packet]) -> dict[str, object]:
    engine = new_engine()
    process = engine.process
    metas = [OUT if forward else BACK for _, forward in packets]
    datas = [data for data, _ in packets]
    verdicts: dict[Action, int] = {}  # keyed by the enum member: .value costs an enum lookup
    start = time.perf_counter()
    now = 1000.0
    for data, meta in zip(datas, metas, strict=True):
        now += 0.00001
        verdict = process(data, meta, now)
        verdicts[verdict.action] = verdicts.get(verdict.action, 0) + 1
    elapsed = time.perf_counter() - start
    return {
        "packets": len(packets),
        "seconds": round(elapsed, 3),
        "pps": round(len(packets) / elapsed),
        "verdicts": {action.value: count for action, count in verdicts.items()},
    }


def write_pcap(path: str, packets: list[Packet]) -> None:
    """Classic pcap, LINKTYPE_RAW (101): each record is the bare IP packet."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
        t = 1_700_000_000.0
        for i, (data, _) in enumerate(packets):
            ts = t + i * 0.00001
            sec = int(ts)
            f.write(struct.pack("<IIII", sec, int((ts - sec) * 1e6), len(data), len(data)))
            f.write(data)


def time_replay(packets: list[Packet]) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        pcap = os.path.join(tmp, "mix.pcap")
        write_pcap(pcap, packets)
        argv = [sys.executable, "-m", "nfqfw", "replay", "--config", str(POLICY), "--iface", "lan0", pcap]
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-500:]}
    return {
        "packets": len(packets),
        "seconds": round(elapsed, 3),
        "pps": round(len(packets) / elapsed),
        "summary": done.stderr.strip().splitlines()[:6],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flows", type=int, default=4000, help="TCP flows (plus as many UDP and ICMP pairs)")
    parser.add_argument("--no-replay", action="store_true", help="skip the `nfqfw replay` measurement")
    parser.add_argument("--profile", action="store_true", help="cProfile Engine.process, print the top 25")
    args = parser.parse_args()
    packets = synthetic_mix(args.flows)
    result: dict[str, object] = {
        "mix": f"{args.flows} TCP flows ({len(tcp_flow(b'1234', b'5678', 1))} pkts each)"
        f" + {args.flows} UDP pairs + {args.flows} ICMP echo pairs"
    }
    time_engine(packets[:2000])  # warm-up
    result["engine"] = time_engine(packets)
    print(
        f"engine.process: {result['engine']['pps']:,} packets/s "  # type: ignore[index]
        f"({result['engine']['packets']} packets in {result['engine']['seconds']} s)"
    )  # type: ignore[index]
    print(f"  verdicts: {result['engine']['verdicts']}")  # type: ignore[index]
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        time_engine(packets)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    replay_ok = (ROOT / "nfqfw" / "commands" / "replay.py").exists() and (
        ROOT / "nfqfw" / "capture.py"
    ).exists()
    if replay_ok and not args.no_replay:
        # at least 100k packets; a larger fresh mix rather than repeats (repeats would hit stale flows)
        replay_packets = packets
        if len(packets) < 100_000:
            replay_packets = synthetic_mix(args.flows * (100_000 // len(packets) + 1))
        result["replay"] = time_replay(replay_packets)
        r = result["replay"]
        if "error" in r:  # type: ignore[operator]
            print(f"nfqfw replay failed: {r['error']}")  # type: ignore[index]
        else:
            print(
                f"nfqfw replay: {r['pps']:,} packets/s wall time "  # type: ignore[index]
                f"({r['packets']} packets in {r['seconds']} s, incl. start-up and JSON output)"
            )  # type: ignore[index]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
