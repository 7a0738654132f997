"""`nfqfw reload`: make the running daemon re-read its policy (as SIGHUP does) and print the
outcome: ok, or the located errors of a refused policy (exit code 1; the old policy stays)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nfqfw.control.client import add_runtime_dir_option, ask
from nfqfw.control.format import format_reload


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "reload",
        help="reload the running daemon's policy",
        description="Ask the running daemon to re-read and validate its policy file, as SIGHUP does. "
        "Prints the outcome; a refused policy's errors are printed as FILE:LINE:COL and the exit code "
        "is 1 (the running policy stays in force).",
    )
    add_runtime_dir_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    outcome = ask("reload", args, {"cmd": "reload"})
    if outcome is None:
        return 1
    lines = format_reload(outcome)
    print("\n".join(lines), file=sys.stdout if outcome["ok"] else sys.stderr)
    return 0 if outcome["ok"] else 1
