"""Engine packets/s over synthetic traffic, and `nfqfw replay` wall time over a pcap of it.

Two mixes; packets are built once up front and only Engine.process is timed.

- mixed, per "round" of flows: TCP flows from the LAN to the outside (handshake, a few data
  segments each way with their ACKs, FIN/ACK close), UDP request/reply pairs and ICMP echo
  request/reply pairs;
- bulk: 64 TCP connections as a Linux sender makes them (SYN options, timestamps on every
  segment), each then carrying `--segments` 1448-byte data segments with an ACK every second
  segment (delayed ACK), all interleaved: what an iperf3 transfer puts through a gateway.

    .venv/bin/python bench/replay_speed.py [--flows N] [--segments N] [--full-path] [--no-replay] [--profile]

--full-path turns the engine's fast path (core.fastpath) off, to compare.
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


def bulk_flow(client: bytes, server: bytes, sport: int, segments: int) -> list[Packet]:
    """A Linux-like bulk transfer client -> server: SYN/SYN-ACK with MSS, SACK-permitted,
    timestamps and window scale; NOP, NOP, timestamps on every later segment; 1448-byte data
    segments, the server ACKing every second one (window 3000 << 7)."""
    c_seq, s_seq, ts = 1_000_000, 7_000_000, 100

    def stamp() -> bytes:
        return b"\x01\x01" + build.timestamp_option(ts, ts)

    syn_options = (
        build.mss_option(1460) + build.sack_perm_option() + stamp() + b"\x01" + build.wscale_option(7)
    )

    def seg(
        forward: bool, seq: int, ack: int, flags: int, window: int, options: bytes, size: int = 0
    ) -> Packet:
        src, dst, sp, dp = (client, server, sport, 5201) if forward else (server, client, 5201, sport)
        data = build.tcp(src, dst, sp, dp, seq, ack, flags, window, options, BULK_PAYLOAD[:size])
        return (build.ipv4(src, dst, 6, data), forward)

    pkts = [
        seg(True, c_seq, 0, SYN, 64240, syn_options),
        seg(False, s_seq, c_seq + 1, SYN | ACK, 65160, syn_options),
    ]
    c_seq, s_seq = c_seq + 1, s_seq + 1
    pkts.append(seg(True, c_seq, s_seq, ACK, 502, stamp()))
    for n in range(segments):
        ts += 1
        pkts.append(seg(True, c_seq, s_seq, ACK | PSH, 502, stamp(), 1448))
        c_seq += 1448
        if n % 2:
            pkts.append(seg(False, s_seq, c_seq, ACK, 3000, stamp()))
    return pkts


BULK_PAYLOAD = b"b" * 1448


def bulk_mix(segments: int, connections: int = 64) -> list[Packet]:
    """`connections` bulk transfers of `segments` data segments each, interleaved packet by packet."""
    client, server = build.addr("10.0.0.25"), build.addr("203.0.113.10")
    flows = [bulk_flow(client, server, 40000 + i, segments) for i in range(connections)]
    depth = max(len(f) for f in flows)
    return [f[k] for k in range(depth) for f in flows if k < len(f)]


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


def new_engine(fast_path: bool = True) -> Engine:
    return Engine(CompiledPolicy(load_policy(str(POLICY))), fast_path=fast_path)


def time_engine(packets: list[Packet], fast_path: bool = True) -> dict[str, object]:
    engine = new_engine(fast_path)
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
    parser.add_argument("--segments", type=int, default=1500, help="data segments per bulk connection")
    parser.add_argument("--full-path", action="store_true", help="turn the engine's fast path off")
    parser.add_argument("--no-replay", action="store_true", help="skip the `nfqfw replay` measurement")
    parser.add_argument("--profile", action="store_true", help="cProfile Engine.process, print the top 25")
    args = parser.parse_args()
    fast = not args.full_path
    packets = synthetic_mix(args.flows)
    bulk = bulk_mix(args.segments)
    result: dict[str, object] = {
        "mix": f"{args.flows} TCP flows ({len(tcp_flow(b'1234', b'5678', 1))} pkts each)"
        f" + {args.flows} UDP pairs + {args.flows} ICMP echo pairs",
        "bulk": f"64 TCP connections x {args.segments} data segments, ACK every second one",
        "fast_path": fast,
    }
    time_engine(packets[:2000], fast)  # warm-up
    for name, mix in (("engine", packets), ("engine_bulk", bulk)):
        timed = result[name] = time_engine(mix, fast)
        label = "engine.process" if name == "engine" else "engine.process, bulk TCP"
        print(f"{label}: {timed['pps']:,} packets/s ({timed['packets']} packets in {timed['seconds']} s)")
        print(f"  verdicts: {timed['verdicts']}")
    if args.profile:
        for mix in (packets, bulk):
            profiler = cProfile.Profile()
            profiler.enable()
            time_engine(mix, fast)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    if not args.no_replay:
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
