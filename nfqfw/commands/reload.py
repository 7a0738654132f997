"""`nfqfw reload`: make the running daemon re-read its policy (as SIGHUP does) and print the
outcome: ok, or the located errors of a refused policy (exit code 1; the old policy stays).
With --json the outcome is printed as the daemon gave it, on stdout either way.

`--dry-run`: the daemon reads the files and says what would change (rules, sets, NAT, defaults,
options) and which tracked flows the new policy would cut; nothing changes (exit code 0 when it
would apply cleanly). `--confirm SECONDS`: the new policy is in force on trial; unless `nfqfw
confirm` comes within SECONDS the daemon puts the old one back by itself."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nfqfw.commands import EXIT_FAILURE, EXIT_OK, add_json_option, ask, print_json
from nfqfw.control.client import add_runtime_dir_option
from nfqfw.control.format import format_preview, format_reload


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "reload",
        help="reload the running daemon's policy",
        description="Ask the running daemon to re-read and validate its policy file, as SIGHUP does. "
        "Prints the outcome; a refused policy's errors are printed as FILE:LINE:COL and the exit code "
        "is 1 (the running policy stays in force).",
    )
    trial = parser.add_mutually_exclusive_group()
    trial.add_argument(
        "--dry-run",
        action="store_true",
        help="only compare the files on disk with the policy in force: what changes, which flows it "
        "would cut; change nothing",
    )
    trial.add_argument(
        "--confirm",
        type=_seconds,
        metavar="SECONDS",
        help="apply on trial: unless 'nfqfw confirm' comes within SECONDS, the daemon goes back to the "
        "policy in force before (its own timer: it works when the edit cut your session)",
    )
    add_json_option(parser, "the outcome (time, trigger, ok, errors, removed; with --dry-run the comparison)")
    add_runtime_dir_option(parser)
    parser.set_defaults(func=run)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: '{text}'") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"not a number of seconds from 1 to 86400: '{text}'")
    return value


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        preview = ask("reload", args, {"cmd": "reload", "dry_run": True})
        if args.json:
            print_json(preview)
        else:
            print("\n".join(format_preview(preview)), file=sys.stdout if preview["ok"] else sys.stderr)
        return EXIT_OK if preview["ok"] else EXIT_FAILURE
    request: dict[str, Any] = {"cmd": "reload"}
    if args.confirm is not None:
        request["confirm"] = args.confirm
    outcome = ask("reload", args, request)
    if args.json:
        print_json(outcome)
    else:
        print("\n".join(format_reload(outcome)), file=sys.stdout if outcome["ok"] else sys.stderr)
    return EXIT_OK if outcome["ok"] else EXIT_FAILURE
