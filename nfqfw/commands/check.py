"""`nfqfw check FILE...`: validate policy files without touching the system."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from nfqfw.core.config import ConfigError, PolicyConfig, load_policy
from nfqfw.core.policy import CompiledPolicy


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check",
        help="validate policy files",
        description="Load and compile each policy file. Prints a one-line summary per valid file (zones, "
        "rules, and how long compiling the rules took); otherwise prints every problem as "
        "FILE:LINE:COL: message on stderr and exits with 1.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="policy file (YAML)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            config = load_policy(path)
            started = time.perf_counter()
            CompiledPolicy(config)  # compiling must work too, as the daemon will do it
            seconds = time.perf_counter() - started
        except ConfigError as err:
            for issue in err.issues:
                print(issue, file=sys.stderr)
            count = len(err.issues)
            print(f"{path}: {count} error{'s' if count != 1 else ''}", file=sys.stderr)
            status = 1
        else:
            print(summary(path, config, seconds))
    return status


def summary(path: str, config: PolicyConfig, compile_seconds: float) -> str:
    zones = sum(1 for names in config.zones.values() if names)
    counts = f"zones: {zones}, ingress rules: {len(config.ingress)}, egress rules: {len(config.egress)}"
    rules = len(config.ingress) + len(config.egress)
    compiled = f"{rules} rule{'s' if rules != 1 else ''} compiled in {duration(compile_seconds)}"
    return f"{path}: OK ({counts}), {compiled}"


def duration(seconds: float) -> str:
    """`12.3 ms` below a second, `1.25 s` from there."""
    milliseconds = round(seconds * 1000, 1)
    return f"{milliseconds:.1f} ms" if milliseconds < 1000 else f"{seconds:.2f} s"
