"""`nfqfw reload`: make the running daemon re-read its policy (as SIGHUP does) and print the
outcome: ok, or the located errors of a refused policy (exit code 1; the old policy stays).
With --json the outcome is printed as the daemon gave it, on stdout either way."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nfqfw.commands import EXIT_FAILURE, EXIT_OK, add_json_option, ask, print_json
from nfqfw.control.client import add_runtime_dir_option
from nfqfw.control.format import format_reload


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "reload",
        help="reload the running daemon's policy",
        description="Ask the running daemon to re-read and validate its policy file, as SIGHUP does. "
        "Prints the outcome; a refused policy's errors are printed as FILE:LINE:COL and the exit code "
        "is 1 (the running policy stays in force).",
    )
    add_json_option(parser, "the outcome (time, trigger, ok, errors, removed)")
    add_runtime_dir_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    outcome = ask("reload", args, {"cmd": "reload"})
    if args.json:
        print_json(outcome)
    else:
        print("\n".join(format_reload(outcome)), file=sys.stdout if outcome["ok"] else sys.stderr)
    return EXIT_OK if outcome["ok"] else EXIT_FAILURE
