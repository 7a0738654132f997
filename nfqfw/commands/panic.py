"""`nfqfw panic on|off`: drop everything but loopback (in the kernel), or stop doing so.

The running daemon replaces its queue rules by DROP rules in its own chains (nfqfw.rules), so
panic holds under a flood and while no daemon runs; a restarted daemon keeps it; a reboot,
`nfqfw panic off` or `nfqfw rules remove` ends it.
"""

from __future__ import annotations

import argparse
from typing import Any

from nfqfw.control_client import add_runtime_dir_option, ask
from nfqfw.control_format import format_panic


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "panic",
        help="drop all traffic but loopback, or end that",
        description="on: nfqfw's chains drop every packet except loopback, established sessions included "
        "(kernel DROP rules: no packet reaches nfqfw). It stays on across daemon restarts until "
        "'nfqfw panic off' (or a reboot, or 'nfqfw rules remove'). The control socket still works.",
    )
    parser.add_argument("mode", choices=("on", "off"), help="on or off")
    add_runtime_dir_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = ask("panic", args, {"cmd": "panic", "on": args.mode == "on"})
    if result is None:
        return 1
    print(format_panic(result))
    return 0
