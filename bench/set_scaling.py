"""Named sets against their size: load time, memory, new-flow decisions and the packet path.

A set file of N networks (random /24s and single addresses, the shape of a FireHOL or Spamhaus
list) is the `blocklist` of a policy: config/policy.yaml plus

    sets: {blocklist: {file: blocklist.txt}}
    ingress: drop-listed, from @blocklist (first)     egress: no-listed, to @blocklist (first)

Measured with the core's own API, no kernel, best of 3 (CPU time, time.process_time):

- load: `load_policy` (the YAML and the set file) and `CompiledPolicy` (the index), and the
  memory they keep (tracemalloc: what is allocated and still held), per network;
- decisions: `Engine.process` on TCP SYNs from outside to a published service, half of them
  from listed sources (dropped by drop-listed) and half not (accepted by mail), against the
  same policy without the set;
- packet path: bench/replay_speed.py's mix (TCP, UDP and ICMP flows from the LAN; every new
  flow meets no-listed) through Engine.process, with and without the set;
- set add: `nfqfw set add` as the daemon does it (core.recheck.change_set: the entry, the
  index told, the flows of the address re-judged) with 60,000 tracked flows.

    .venv/bin/python bench/set_scaling.py [--sizes 1000,10000,100000] [--packets N]
    .venv/bin/python bench/set_scaling.py --decisions-only R --sizes 100000 [--no-set]   # callgrind

--decisions-only R builds the policy and packets, then runs the decision packets R times (a
fresh engine each time), untimed: under callgrind, (R=2) - (R=1) is the cost of those decisions.
Writes bench/results/set_scaling.json.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import random
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from replay_speed import BACK, OUT, synthetic_mix  # noqa: E402

from nfqfw.core import build  # noqa: E402
from nfqfw.core.config import load_policy  # noqa: E402
from nfqfw.core.engine import Engine  # noqa: E402
from nfqfw.core.policy import CompiledPolicy  # noqa: E402
from nfqfw.core.recheck import change_set  # noqa: E402
from nfqfw.core.verdict import Hook, Meta  # noqa: E402

POLICY = ROOT / "config" / "policy.yaml"
INBOUND = Meta(Hook.FORWARD, "wan0", "lan0")
MAIL = build.addr("10.0.0.25")
REPEATS = 3
FLOWS = 60_000


def set_file(path: Path, size: int, seed: int = 1) -> list[tuple[int, int]]:
    """`size` networks: 90% random /24s, 10% single addresses (outside 10/8, 100/8, 127/8);
    returns (first address, number of addresses) of each."""
    rng = random.Random(seed)
    firsts: dict[int, int] = {}
    lines = ["; a generated blocklist", "# one network per line"]
    while len(firsts) < size:
        value = rng.randrange(16 << 24, 223 << 24)
        if value >> 24 in (10, 100, 127):
            continue
        width = 256 if rng.random() < 0.9 else 1
        if width == 256:
            value &= ~0xFF
            text = f"{ipaddress.IPv4Address(value)}/24"
        else:
            text = str(ipaddress.IPv4Address(value))
        if value not in firsts:
            firsts[value] = width
            lines.append(f"{text} ; SBL{len(firsts)}")
    path.write_text("\n".join(lines) + "\n")
    return sorted(firsts.items())


def policy_text(with_set: bool) -> str:
    base = POLICY.read_text()
    if not with_set:
        return base
    ingress = "ingress:                    # first match wins\n"
    drop_listed = '  - {name: drop-listed, from: "@blocklist", action: drop}\n'
    text = base.replace(ingress, ingress + drop_listed, 1)
    text = text.replace("egress:\n", 'egress:\n  - {name: no-listed, to: "@blocklist", action: drop}\n', 1)
    assert text.count("@blocklist") == 2, "config/policy.yaml changed shape: adjust bench/set_scaling.py"
    return text + "\nsets:\n  blocklist: {file: blocklist.txt}\n"


def best(run: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEATS):
        gc.collect()
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return min(times)


def decision_packets(listed: list[tuple[int, int]], count: int) -> list[bytes]:
    """SYNs to the mail server from outside: even ones from listed networks, odd ones not."""
    rng = random.Random(2)
    packets = []
    listed_set = {first for first, _ in listed}
    for n in range(count):
        if n % 2 == 0:
            first, width = rng.choice(listed)
            source = first + rng.randrange(width)
        else:
            source = rng.randrange(1 << 24, 223 << 24)
            while source & ~0xFF in listed_set or source in listed_set:
                source = rng.randrange(1 << 24, 223 << 24)
        src = ipaddress.IPv4Address(source).packed
        packets.append(build.ipv4(src, MAIL, 6, build.tcp(src, MAIL, 1024 + n % 60000, 25, 1000, 0, 0x02)))
    return packets


def decide(policy: CompiledPolicy, packets: list[bytes]) -> dict[str, int]:
    engine = Engine(policy)
    counts: dict[str, int] = {}
    for data in packets:
        reason = engine.process(data, INBOUND, 1.0).reason
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def kept_memory(path: Path) -> tuple[int, CompiledPolicy]:
    gc.collect()
    tracemalloc.start()
    policy = CompiledPolicy(load_policy(path))
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return held, policy


def packet_path(policy: CompiledPolicy, mix: list[tuple[bytes, bool]]) -> float:
    datas = [data for data, _ in mix]
    metas = [OUT if forward else BACK for _, forward in mix]

    def run() -> None:
        engine = Engine(policy)
        now = 1000.0
        for data, meta in zip(datas, metas, strict=True):
            now += 0.00001
            engine.process(data, meta, now)

    return best(run)


def set_add_cost(policy: CompiledPolicy) -> float:
    """One `set add` (a single address) with FLOWS tracked flows, averaged over 20."""
    engine = Engine(policy)
    lan = [build.addr(f"10.0.{n >> 8 & 255}.{n & 255}") for n in range(FLOWS)]
    server = build.addr("198.18.0.1")
    for n, client in enumerate(lan):
        syn = build.ipv4(client, server, 17, build.udp(client, server, 1024 + n % 60000, 53))
        engine.process(syn, OUT, 1.0)
    start = time.process_time()
    for n in range(20):
        change_set(engine, "blocklist", ipaddress.ip_network(f"198.18.1.{n}/32"), add=True)
    return (time.process_time() - start) / 20


def measure(
    size: int,
    listed: list[tuple[int, int]],
    with_set: Path,
    plain: Path,
    plain_policy: CompiledPolicy,
    mix: list[tuple[bytes, bool]],
    packet_count: int,
) -> dict[str, object]:
    """One set size: load, compile, memory, decisions with and without the set, packet path, set add."""
    load_time = best(lambda: load_policy(with_set))
    config = load_policy(with_set)
    compile_time = best(lambda: CompiledPolicy(config))
    held, policy = kept_memory(with_set)
    base_held, _ = kept_memory(plain)
    packets = decision_packets(listed, packet_count)
    with_time = best(lambda: decide(policy, packets))
    without_time = best(lambda: decide(plain_policy, packets))
    return {
        "networks": size,
        "load_seconds": round(load_time, 4),
        "compile_seconds": round(compile_time, 4),
        "memory_bytes": held - base_held,
        "bytes_per_network": round((held - base_held) / size, 1),
        "decisions_per_second": round(len(packets) / with_time),
        "decisions_per_second_without_set": round(len(packets) / without_time),
        "verdicts": decide(policy, packets),
        "packet_path_pps": round(len(mix) / packet_path(policy, mix)),
        "set_add_ms": round(set_add_cost(policy) * 1000, 2),
    }


def print_row(row: dict[str, object]) -> None:
    load_ms = float(row["load_seconds"]) * 1000  # type: ignore[arg-type]
    compile_ms = float(row["compile_seconds"]) * 1000  # type: ignore[arg-type]
    megabytes = int(row["memory_bytes"]) / 1e6  # type: ignore[call-overload]
    print(
        f"{row['networks']:>7} networks: load {load_ms:7.1f} ms + compile {compile_ms:6.1f} ms, "
        f"{megabytes:5.2f} MB ({row['bytes_per_network']} B/network); "
        f"decisions {row['decisions_per_second']:,}/s "
        f"(without the set {row['decisions_per_second_without_set']:,}/s); "
        f"packet path {row['packet_path_pps']:,}/s; set add {row['set_add_ms']} ms ({FLOWS} flows); "
        f"verdicts {row['verdicts']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000,100000", help="set sizes (networks), comma-separated")
    parser.add_argument("--packets", type=int, default=20000, help="decision packets per measurement")
    parser.add_argument("--flows", type=int, default=2000, help="flows of the packet-path mix")
    parser.add_argument(
        "--decisions-only", type=int, metavar="R", help="untimed decisions, R rounds (callgrind)"
    )
    parser.add_argument(
        "--no-set", action="store_true", help="with --decisions-only: the policy without the set"
    )
    args = parser.parse_args()
    sizes = [int(word) for word in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        plain = directory / "plain.yaml"
        plain.write_text(policy_text(False))
        with_set = directory / "policy.yaml"
        with_set.write_text(policy_text(True))
        if args.decisions_only is not None:
            listed = set_file(directory / "blocklist.txt", sizes[-1])
            policy = CompiledPolicy(load_policy(plain if args.no_set else with_set))
            packets = decision_packets(listed, args.packets)
            for _ in range(args.decisions_only):
                decide(policy, packets)
            return 0
        plain_policy = CompiledPolicy(load_policy(plain))
        mix = synthetic_mix(args.flows)
        results: dict[str, object] = {"packets": args.packets, "mix_packets": len(mix), "sizes": []}
        baseline_mix = packet_path(plain_policy, mix)
        results["packet_path_without_set_pps"] = round(len(mix) / baseline_mix)
        pps = len(mix) / baseline_mix
        print(f"packet path (replay_speed mix, {len(mix)} packets), no set: {pps:,.0f} packets/s")
        for size in sizes:
            listed = set_file(directory / "blocklist.txt", size)
            row = measure(size, listed, with_set, plain, plain_policy, mix, args.packets)
            results["sizes"].append(row)  # type: ignore[attr-defined]
            print_row(row)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "set_scaling.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
