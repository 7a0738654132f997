"""`nfqfw confirm [--rollback]`: keep the policy of a `nfqfw reload --confirm SECONDS` (or undo it now).

Without it, the daemon puts the policy before that reload back once SECONDS have passed: its own
timer, so an edit that cut the operator's session undoes itself.
"""

from __future__ import annotations

import argparse
from typing import Any

from nfqfw.commands import EXIT_OK, add_json_option, ask, print_json
from nfqfw.control.client import add_runtime_dir_option
from nfqfw.control.format import format_confirm


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "confirm",
        help="keep the policy of a reload --confirm",
        description="Confirm the reload waiting for confirmation (nfqfw reload --confirm SECONDS): its "
        "policy stays. Exit code 1 when no reload waits. --rollback undoes it now instead.",
    )
    parser.add_argument("--rollback", action="store_true", help="put the policy before the reload back now")
    add_json_option(parser, "the daemon's answer")
    add_runtime_dir_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = ask("confirm", args, {"cmd": "confirm", "rollback": args.rollback})
    if args.json:
        print_json(result)
    else:
        print(format_confirm(result))
    return EXIT_OK
