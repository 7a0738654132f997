"""New-flow decisions/s, policy load time and reload recheck time against the number of rules.

Policies of N ingress rules as an inventory generates them: customer c (ten services each) gets,
per service, a rule `proto tcp, from <the customer's office /24>, to <one of its 4 hosts>,
ports <the service's port>, accept`. Every rule has a different (source, destination, port).

Measured with the core's own API, no kernel:

- load: `load_policy` (parse and check the YAML) and `CompiledPolicy` (compile), best of 3;
- miss: `Engine.process` on TCP SYNs from outside (203.0.113.0/24) to the rules' hosts and ports:
  they match no rule (the source is wrong), every one is a new flow and gets `default ingress`;
- hit: SYNs from a customer's office to one of its services, spread evenly over the rule list
  (on average the first match is half way down), each accepted as a new flow;
- recheck: 60,000 tracked flows (90% still allowed, 10% from outside) re-judged by
  `core.recheck.recheck` after `Engine.replace_policy` with the N-rule policy (at the largest N).

    .venv/bin/python bench/rule_scaling.py [--rules 10,100,1000,10000] [--packets N]
    .venv/bin/python bench/rule_scaling.py --decisions-only R --rules 10 --packets 2000   # callgrind

Times are the process's CPU time (time.process_time), best of 3: on a shared machine wall time
counts the other processes' turns too. Python runs on one core, so on an idle machine the two agree.

--decisions-only R builds the policy and the packets, then runs the miss packets (--hits: the
hit packets) R times (a fresh engine each time, so every SYN is a new flow), untimed: run it
under callgrind with R=1 and R=2, the difference / packets is the cost of one decision.
Writes bench/results/rule_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nfqfw.core import build  # noqa: E402
from nfqfw.core.config import load_policy  # noqa: E402
from nfqfw.core.engine import Engine  # noqa: E402
from nfqfw.core.policy import CompiledPolicy  # noqa: E402
from nfqfw.core.recheck import recheck  # noqa: E402
from nfqfw.core.verdict import Action, Hook, Meta  # noqa: E402

SERVICE_PORTS = (22, 25, 80, 443, 587, 993, 3306, 5432, 8080, 8443)
HOSTS_PER_CUSTOMER = 4
INBOUND = Meta(Hook.FORWARD, "wan0", "lan0")
SYN = 0x02
RECHECK_FLOWS = 60_000
REPEATS = 3

HEADER = """\
zones:
  external: [wan0]
  internal: [lan0]
defaults:
  ingress: drop
  egress: accept
options:
  max-flows: 100000
ingress:
"""
ACCEPT_ALL = HEADER + "  - name: everything\n    action: accept\n"


def customer_of(rule: int) -> int:
    return rule // len(SERVICE_PORTS)


def office(customer: int) -> str:
    """The customer's office network (100.64.0.0/10, CGNAT space: never 203.0.113.0/24)."""
    return f"100.{64 + (customer >> 8) % 64}.{customer & 255}.0/24"


def host(rule: int) -> str:
    customer = customer_of(rule)
    return f"10.{(customer >> 8) & 255}.{customer & 255}.{1 + rule % HOSTS_PER_CUSTOMER}"


def port(rule: int) -> int:
    return SERVICE_PORTS[rule % len(SERVICE_PORTS)]


def policy_text(rules: int) -> str:
    lines = [HEADER]
    for rule in range(rules):
        lines.append(
            f"  - name: svc-{rule}\n    proto: tcp\n    from: {office(customer_of(rule))}\n"
            f"    to: {host(rule)}\n    ports: {port(rule)}\n    action: accept\n"
        )
    return "".join(lines)


def syn(src: str, dst: str, sport: int, dport: int) -> bytes:
    source, destination = build.addr(src), build.addr(dst)
    return build.ipv4(source, destination, 6, build.tcp(source, destination, sport, dport, 1000, 0, SYN))


def spread(rules: int, count: int) -> Iterator[int]:
    """`count` rule numbers evenly over 0..rules-1: each rule in turn, or every (rules/count)th."""
    for index in range(count):
        yield index % rules if count >= rules else index * rules // count


def miss_packets(rules: int, count: int) -> list[bytes]:
    """SYNs from outside to the rules' hosts and ports: no rule matches their source."""
    return [
        syn(f"203.0.113.{1 + index % 250}", host(rule), 1024 + index % 60000, port(rule))
        for index, rule in enumerate(spread(rules, count))
    ]


def hit_packets(rules: int, count: int) -> list[bytes]:
    """SYNs from the customers' offices to their services: each matches the rule it was made for."""
    packets = []
    for index, rule in enumerate(spread(rules, count)):
        source = office(customer_of(rule)).replace(".0/24", f".{1 + index % 250}")
        packets.append(syn(source, host(rule), 1024 + index % 60000, port(rule)))
    return packets


def best_seconds(run: Callable[[], object], repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best


def decide(policy: CompiledPolicy, packets: list[bytes], hits: bool) -> None:
    """Every packet through a fresh engine (so each SYN is a new flow); checks the verdicts:
    every hit accepted by a rule, every miss dropped by the default."""
    engine = Engine(policy)
    process, meta = engine.process, INBOUND
    for data in packets:
        process(data, meta, 1.0)
    counts = engine.counts()
    if hits:
        decided = sum(count for name, count in counts.items() if name.startswith("accept rule svc-"))
    else:
        decided = counts.get(f"{Action.DROP.value} default ingress", 0)
    assert decided == len(packets), counts


def measure_decisions(policy: CompiledPolicy, packets: list[bytes], hits: bool) -> dict[str, float]:
    seconds = best_seconds(lambda: decide(policy, packets, hits))
    return {"per_s": round(len(packets) / seconds), "us": round(seconds / len(packets) * 1e6, 2)}


def measure_load(path: str) -> dict[str, float]:
    parse = best_seconds(lambda: load_policy(path))
    config = load_policy(path)
    compile_ = best_seconds(lambda: CompiledPolicy(config))
    return {"parse_s": round(parse, 3), "compile_s": round(compile_, 3), "load_s": round(parse + compile_, 3)}


def measure_recheck(rules: int, path: str, flows: int) -> dict[str, float]:
    """`flows` flows accepted under an accept-all policy, 90% of which the N-rule policy allows."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
        handle.write(ACCEPT_ALL)
        handle.flush()
        engine = Engine(CompiledPolicy(load_policy(handle.name)))
    stale = flows // 10
    packets = hit_packets(rules, flows - stale) + miss_packets(rules, stale)
    for index, data in enumerate(packets):
        engine.process(data, INBOUND, 1.0)
        assert len(engine.conntrack) == index + 1, "flows must be distinct"
    engine.replace_policy(CompiledPolicy(load_policy(path)))
    start = time.process_time()
    removed = recheck(engine)
    seconds = time.process_time() - start
    assert len(removed) == stale and len(engine.conntrack) == flows - stale, (len(removed), stale)
    return {"flows": flows, "removed": len(removed), "recheck_s": round(seconds, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rules", default="10,100,1000,10000", help="comma-separated rule counts")
    parser.add_argument("--packets", type=int, default=20_000, help="SYNs per measurement")
    parser.add_argument("--recheck-flows", type=int, default=RECHECK_FLOWS)
    parser.add_argument("--no-recheck", action="store_true", help="skip the reload recheck")
    parser.add_argument(
        "--decisions-only", type=int, metavar="R", help="run the miss packets R times, untimed (callgrind)"
    )
    parser.add_argument("--hits", action="store_true", help="with --decisions-only: the hit packets")
    args = parser.parse_args()
    counts = [int(word) for word in args.rules.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rules in counts:
            path = str(Path(tmp) / f"rules-{rules}.yaml")
            Path(path).write_text(policy_text(rules))
            policy = CompiledPolicy(load_policy(path))
            miss, hit = miss_packets(rules, args.packets), hit_packets(rules, args.packets)
            if args.decisions_only is not None:
                for _ in range(args.decisions_only):
                    decide(policy, hit if args.hits else miss, args.hits)
                continue
            row: dict[str, object] = {"rules": rules, **measure_load(path)}
            row["miss"] = measure_decisions(policy, miss, hits=False)
            row["hit"] = measure_decisions(policy, hit, hits=True)
            if rules == counts[-1] and not args.no_recheck:
                row["recheck"] = measure_recheck(rules, path, args.recheck_flows)
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.decisions_only is not None:
        return 0
    print_table(results)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "rule_scaling.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


def print_table(results: list[dict[str, object]]) -> None:
    first = results[0]["miss"]["per_s"]  # type: ignore[index]
    print()
    print(
        "| rules | parse | compile | load | miss decisions/s | per miss "
        f"| vs {results[0]['rules']:,} | hit decisions/s | per hit |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        miss, hit = row["miss"], row["hit"]
        print(
            f"| {row['rules']:,} | {row['parse_s']:.2f} s | {row['compile_s']:.3f} s | {row['load_s']:.2f} s "
            f"| {miss['per_s']:,} | {miss['us']} us | {miss['per_s'] / first:.2f}x "  # type: ignore[index]
            f"| {hit['per_s']:,} | {hit['us']} us |"  # type: ignore[index]
        )
        if "recheck" in row:
            r = row["recheck"]
            print(
                f"recheck at {row['rules']:,} rules: {r['flows']:,} flows, "  # type: ignore[index]
                f"{r['removed']:,} removed, {r['recheck_s']} s"  # type: ignore[index]
            )


if __name__ == "__main__":
    sys.exit(main())
