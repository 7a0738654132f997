"""`nfqfw check FILE...`: validate policy files without touching the system."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nfqfw.core.config import ConfigError, PolicyConfig, load_policy
from nfqfw.core.policy import CompiledPolicy


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check",
        help="validate policy files",
        description="Load and compile each policy file. Prints a one-line summary per valid file; "
        "otherwise prints every problem as FILE:LINE:COL: message on stderr and exits with 1.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="policy file (YAML)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            config = load_policy(path)
            CompiledPolicy(config)  # compiling must work too, as the daemon will do it
        except ConfigError as err:
            for issue in err.issues:
                print(issue, file=sys.stderr)
            count = len(err.issues)
            print(f"{path}: {count} error{'s' if count != 1 else ''}", file=sys.stderr)
            status = 1
        else:
            print(summary(path, config))
    return status


def summary(path: str, config: PolicyConfig) -> str:
    zones = sum(1 for names in config.zones.values() if names)
    counts = f"zones: {zones}, ingress rules: {len(config.ingress)}, egress rules: {len(config.egress)}"
    return f"{path}: OK ({counts})"
