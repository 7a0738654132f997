"""Cost of a flow-table snapshot: encode (runs between two packets), write (a thread), decode.

A full default table (65,536 flows: half TCP after a three-way handshake, half replied UDP) is
filled through Engine.process; then snapshot.encode_table (the stop's snapshot), the periodic
snapshot's slices (snapshot.TableEncoder.step of statefile.SLICE_FLOWS flows: the longest one is
the pause between two packets), statefile.write_atomically (to a temp dir) and snapshot.decode +
install are timed, best of a few rounds.

    .venv/bin/python bench/snapshot_speed.py [--flows N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from flow_memory import POLICY, tcp_packets, udp_packets  # noqa: E402

from nfqfw.core import snapshot  # noqa: E402
from nfqfw.core.config import load_policy  # noqa: E402
from nfqfw.core.engine import Engine  # noqa: E402
from nfqfw.core.policy import CompiledPolicy  # noqa: E402
from nfqfw.service.statedir import SLICE_FLOWS, write_atomically  # noqa: E402


def filled(flows: int) -> Engine:
    engine = Engine(CompiledPolicy(load_policy(POLICY)))
    engine.conntrack.max_flows = flows
    for i in range(flows):
        for data, meta in (tcp_packets if i % 2 else udp_packets)(i // 2):
            engine.process(data, meta, 1.0)
    assert len(engine.conntrack) == flows, len(engine.conntrack)
    return engine


def best(rounds: int, work: object) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def longest_slice(engine: Engine) -> float:
    """The longest step of a periodic snapshot encoded a slice at a time."""
    encoder = snapshot.TableEncoder(engine.conntrack, 2.0, time.time())
    longest, done = 0.0, False
    while not done:
        start = time.perf_counter()
        done = encoder.step(SLICE_FLOWS)
        longest = max(longest, time.perf_counter() - start)
    encoder.result()
    return longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=65536)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    engine = filled(args.flows)
    data, _ = snapshot.encode_table(engine.conntrack, 2.0, time.time())
    with tempfile.TemporaryDirectory() as directory:
        path = str(Path(directory) / "flows.snapshot")
        results = {
            "flows": args.flows,
            "bytes": len(data),
            # at a stop: the whole table at once
            "encode_s": best(args.rounds, lambda: snapshot.encode_table(engine.conntrack, 2.0, time.time())),
            # periodic: the longest pause between two packets
            "encode_slice_max_s": min(longest_slice(engine) for _ in range(args.rounds)),
            "write_fsync_s": best(args.rounds, lambda: write_atomically(path, data)),
            "decode_install_s": best(
                args.rounds,
                lambda: snapshot.install(
                    Engine(engine.policy).conntrack, snapshot.decode(data, 3.0, time.time()).flows
                ),
            ),
        }
    results["bytes_per_flow"] = round(results["bytes"] / args.flows, 1)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
