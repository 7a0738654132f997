"""`nfqfw status [--json]`: what the running daemon is doing (asked over its control socket)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from nfqfw.control.client import add_runtime_dir_option, ask
from nfqfw.control.format import format_status


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show the running daemon's state",
        description="Uptime, policy file and its sha256, the last reload, flows by protocol and state, "
        "table usage, verdicts by reason and rule, adapter and kernel queue counters, failure mode, panic.",
    )
    parser.add_argument("--json", action="store_true", help="the daemon's answer as JSON")
    add_runtime_dir_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    status = ask("status", args, {"cmd": "status"})
    if status is None:
        return 1
    print(json.dumps(status, indent=2) if args.json else "\n".join(format_status(status)))
    return 0
