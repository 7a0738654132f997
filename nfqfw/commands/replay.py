"""`nfqfw replay --config FILE CAPTURE`: run a policy offline over a pcap/pcapng capture.

Each packet is taken as arriving at the gateway on the interface it was captured on, and given
what the kernel would tell the live daemon (nfqfw.core.offline): the policy's forwards translate
it (a capture on the external interface shows the public address), the hook follows from the
policy's `gateway-addresses` (to the gateway is INPUT, from it OUTPUT, anything else FORWARD),
the output interface from the zones' networks. One JSON line per packet goes to stdout, a
summary table to stderr.

A packet to be forwarded whose TTL / hop limit is 1 or 0 never reaches FORWARD: the gateway's
stack answers it with time exceeded first, and nfqfw never sees it. Its line says so, with
the verdict "not-queued" (ct and rule null), and it changes no state. (A packet too big for
the outgoing link, also answered before FORWARD, cannot be told from the capture: it is judged
as if forwarded.)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any, TextIO

from nfqfw.core.config import ConfigError, load_policy
from nfqfw.core.engine import Engine
from nfqfw.core.offline import OfflineGateway
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.verdict import Hook, Verdict
from nfqfw.observe.capture import CaptureError, CaptureReader


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="run a policy over a pcap/pcapng capture",
        description="Feed every IPv4/IPv6 packet of CAPTURE to a fresh engine, in order, with the "
        "capture timestamps as the clock. Prints one JSON line per packet (n, verdict, ct, rule, "
        "reason) on stdout and a summary on stderr.",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="policy file (YAML)")
    parser.add_argument("capture", metavar="CAPTURE", help="pcap or pcapng file")
    parser.add_argument(
        "--iface", metavar="NAME", help="interface the packets arrive on (overrides pcapng interface names)"
    )
    parser.set_defaults(func=run)


def load_compiled(path: str) -> CompiledPolicy | None:
    """The compiled policy, or None after printing every problem as FILE:LINE:COL: message."""
    try:
        return CompiledPolicy(load_policy(path))
    except ConfigError as err:
        for issue in err.issues:
            print(issue, file=sys.stderr)
        return None
    except OSError as err:
        print(f"nfqfw: cannot read {path}: {err.strerror}", file=sys.stderr)
        return None


NOT_QUEUED = "not-queued"
TTL_EXPIRED = "ttl expired: the gateway answers it before FORWARD"


def expires_at_gateway(ip: bytes) -> bool:
    """A unicast packet with TTL / hop limit 0 or 1: if it is to be forwarded, the gateway's
    stack answers it (time exceeded) before the FORWARD hook. Read off the bytes: no decode."""
    if len(ip) < 20:
        return False
    if ip[0] >> 4 == 4:
        return ip[8] <= 1 and ip[16] < 224  # not multicast, reserved or broadcast
    if ip[0] >> 4 == 6 and len(ip) >= 40:
        link_local = ip[24] == 0xFE and ip[25] & 0xC0 == 0x80
        return ip[7] <= 1 and ip[24] != 0xFF and not link_local
    return False


def verdict_record(n: int, verdict: Verdict) -> str:
    return json.dumps(
        {
            "n": n,
            "verdict": verdict.action.value,
            "ct": verdict.ct.value,
            "rule": verdict.rule,
            "reason": verdict.reason,
        }
    )


class RecordWriter:
    """Writes verdict_record() lines, fast: the engine hands out few distinct Verdict objects, so
    the JSON after `"n"` is made once per verdict, and lines are written in batches."""

    BATCH = 4096

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tails: dict[int, tuple[Verdict, str]] = {}  # id(verdict) -> (verdict, its JSON tail)
        self._lines: list[str] = []

    def write(self, n: int, verdict: Verdict) -> None:
        known = self._tails.get(id(verdict))
        if known is None or known[0] is not verdict:
            if len(self._tails) >= self.BATCH:  # a flood of one-off verdicts: don't hoard them
                self._tails.clear()
            known = (verdict, verdict_record(0, verdict).partition(", ")[2])
            self._tails[id(verdict)] = known
        self._lines.append(f'{{"n": {n}, {known[1]}\n')
        if len(self._lines) >= self.BATCH:
            self.flush()

    def write_not_queued(self, n: int) -> None:
        record = {"n": n, "verdict": NOT_QUEUED, "ct": None, "rule": None, "reason": TTL_EXPIRED}
        self._lines.append(json.dumps(record) + "\n")
        if len(self._lines) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        self._out.write("".join(self._lines))
        self._lines.clear()


def summary_table(counts: Counter[tuple[str, str, str]], packets: int, skipped: int) -> str:
    lines = [f"packets: {packets}, non-IP frames skipped: {skipped}"]
    if counts:
        rows = [
            (str(count), *key) for key, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        ]
        header = ("count", "verdict", "ct", "reason")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
        for row in [header, *rows]:
            cells = [row[0].rjust(widths[0])] + [
                cell.ljust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
            ]
            lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    policy = load_compiled(args.config)
    if policy is None:
        return 1
    engine = Engine(policy)
    gateway = OfflineGateway(policy)
    by_verdict: Counter[Verdict] = Counter()
    not_queued = 0
    writer = RecordWriter(sys.stdout)
    packets = 0
    try:
        with open(args.capture, "rb") as stream:
            reader = CaptureReader(stream)
            for record in reader:
                packets += 1
                arrival = gateway.arrive(record.ip, args.iface or record.iface)
                if arrival.meta.hook is Hook.FORWARD and expires_at_gateway(arrival.data):
                    not_queued += 1
                    writer.write_not_queued(packets)
                    continue
                verdict = engine.process(arrival.data, arrival.meta, record.timestamp)
                by_verdict[verdict] += 1
                writer.write(packets, verdict)
    except (OSError, CaptureError) as err:
        writer.flush()
        message = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        print(f"nfqfw replay: {args.capture}: {message}", file=sys.stderr)
        return 1
    writer.flush()
    counts: Counter[tuple[str, str, str]] = Counter()
    for verdict, count in by_verdict.items():
        counts[(verdict.action.value, verdict.ct.value, verdict.reason)] += count
    if not_queued:
        counts[(NOT_QUEUED, "-", TTL_EXPIRED)] = not_queued
    print(summary_table(counts, packets, reader.skipped), file=sys.stderr)
    return 0
