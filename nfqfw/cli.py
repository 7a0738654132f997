"""The `nfqfw` command line: one sub-command per module in `nfqfw.commands`.

Each command module exposes `register(subparsers)`, which adds its parser and sets
`func(args) -> int` as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nfqfw import __version__
from nfqfw.commands import EXIT_USAGE, Exit

COMMANDS = (
    *("check", "explain", "replay", "run", "rules"),
    *("status", "flows", "flush", "panic", "reload", "confirm", "set", "top", "ha"),  # ask the running daemon
    "lab",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nfqfw", description="Stateful NFQUEUE firewall for Linux gateways")
    parser.add_argument("--version", action="version", version=f"nfqfw {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"nfqfw.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except Exit as done:
        return done.code
