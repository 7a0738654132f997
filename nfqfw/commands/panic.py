"""`nfqfw panic on|off`: drop everything but loopback (in the kernel), or stop doing so.

The running daemon replaces its queue rules by DROP rules in its own chains (nfqfw.firewall), so
panic holds under a flood and while no daemon runs; a restarted daemon keeps it; a reboot,
`nfqfw panic off` or `nfqfw rules remove` ends it.

`nfqfw panic on --no-daemon` is for when no daemon runs (stopped, crashed, or failure-mode open
passing traffic unfiltered): it puts the same DROP rules into the kernel tables of the network
namespace it runs in, directly. Only `on`: the queue rules that `off` would put back are the
daemon's, so a daemon started later (it keeps panic mode) ends it with `nfqfw panic off`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nfqfw.commands import EXIT_FAILURE, EXIT_NO_DAEMON, EXIT_OK, EXIT_USAGE, add_json_option, print_json
from nfqfw.control.client import ClientError, NoDaemon, add_runtime_dir_option, call
from nfqfw.control.format import format_panic
from nfqfw.firewall import QueueSpec, RulesError, backend_named


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "panic",
        help="drop all traffic but loopback, or end that",
        description="on: nfqfw's chains drop every packet except loopback, established sessions included "
        "(kernel DROP rules: no packet reaches nfqfw). It stays on across daemon restarts until "
        "'nfqfw panic off' (or a reboot, or 'nfqfw rules remove'). The control socket still works.",
    )
    parser.add_argument("mode", choices=("on", "off"), help="on or off")
    parser.add_argument(
        "--no-daemon",
        action="store_true",
        help="with no daemon running: put panic mode's DROP rules into this network namespace's "
        "kernel tables directly (on only)",
    )
    add_json_option(parser, "the outcome (panic, changed, and no_daemon with --no-daemon)")
    add_runtime_dir_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    on = args.mode == "on"
    if args.no_daemon:
        return _without_daemon(args, on)
    try:
        result = call(args.runtime_dir, {"cmd": "panic", "on": on})
    except ClientError as err:
        no_daemon = isinstance(err, NoDaemon)
        hint = "; 'nfqfw panic on --no-daemon' drops everything without it" if no_daemon and on else ""
        print(f"nfqfw panic: {err}{hint}", file=sys.stderr)
        return EXIT_NO_DAEMON if no_daemon else EXIT_FAILURE
    if args.json:
        print_json(result)
    else:
        print(format_panic(result))
    return EXIT_OK


def _without_daemon(args: argparse.Namespace, on: bool) -> int:
    if not on:
        print(
            "nfqfw panic: off needs the daemon (the queue rules to put back are its own): start nfqfw, "
            "which keeps panic mode on, then run 'nfqfw panic off'; or 'nfqfw rules remove'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        call(args.runtime_dir, {"cmd": "status"}, timeout=5.0)
    except ClientError:
        pass  # none, or one that does not answer (wedged): as good as none here
    else:
        print("nfqfw panic: a daemon answers; run 'nfqfw panic on' without --no-daemon", file=sys.stderr)
        return EXIT_USAGE
    try:
        backend = backend_named()
        was = backend.panic_installed()
        backend.install(QueueSpec(panic=True))
    except RulesError as err:
        print(f"nfqfw panic: {err}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print_json({"panic": True, "changed": not was, "no_daemon": True})
    else:
        print("panic mode on (no daemon, kernel rules set directly): everything but loopback is dropped")
    return EXIT_OK
