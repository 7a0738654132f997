"""`nfqfw status [--json | --quiet]`: what the running daemon is doing (asked over its control
socket). For monitoring: exit code 0 when a daemon answers, 3 when none runs, 1 when one does not
answer properly (nfqfw.commands)."""

from __future__ import annotations

import argparse
from typing import Any

from nfqfw.commands import EXIT_OK, add_json_option, ask, print_json
from nfqfw.control.client import add_runtime_dir_option
from nfqfw.control.format import format_status


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show the running daemon's state",
        description="Uptime, policy file and its sha256, the last reload, flows by protocol and state, "
        "table usage, verdicts by reason and rule, adapter and kernel queue counters, failure mode, panic.",
    )
    output = parser.add_mutually_exclusive_group()
    add_json_option(output, "the daemon's answer")
    output.add_argument(
        "--quiet", "-q", action="store_true", help="print nothing: the exit code says it (0 running, 3 not)"
    )
    add_runtime_dir_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    status = ask("status", args, {"cmd": "status"})
    if args.json:
        print_json(status)
    elif not args.quiet:
        print("\n".join(format_status(status)))
    return EXIT_OK
