"""`nfqfw flush [--proto P] [--state S] [--addr A]`: forget tracked flows in the running daemon.

A flushed TCP connection is cut: with the default strict pick-up its next segment starts no new
flow and is INVALID. UDP and ICMP flows simply start again as NEW (and meet the policy again).
"""

from __future__ import annotations

import argparse
from typing import Any

from nfqfw.commands import EXIT_OK, add_json_option, ask, print_json
from nfqfw.commands.flows import add_filter_options, filter_fields
from nfqfw.control.client import add_runtime_dir_option
from nfqfw.control.format import format_flush


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "flush",
        help="drop tracked flows (all, or those matching)",
        description="Remove the tracked flows that match every filter given (all flows without one) and "
        "print how many. A flushed TCP connection is cut (strict pick-up: its next segment is INVALID).",
    )
    add_filter_options(parser)
    add_json_option(parser, "the daemon's answer (removed, tracked)")
    add_runtime_dir_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = ask("flush", args, {"cmd": "flush", **filter_fields(args)})
    if args.json:
        print_json(result)
    else:
        print(format_flush(result))
    return EXIT_OK
