"""The sub-commands of `nfqfw` (one module each, see nfqfw.cli) and what they share: exit
codes, asking the daemon, printing a result as text or as JSON.

Exit codes, the same for every command (documented in nfqfw(8)): 0 done; 1 failed (an invalid
policy, a refused reload, a daemon that answers with an error or not in time, kernel rules
that cannot be read or changed); 2 a usage error (argparse's own code); 3 no daemon answers at
the runtime directory (no control socket, or nobody listening: not running), so a monitoring
script tells "stopped" from "broken" as it does with `systemctl status` (3: not running).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NO_DAEMON = 3

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILURE: "failure: an invalid policy, a refused reload, an error answer or no answer in time "
    "from the daemon, kernel rules that cannot be read or changed",
    EXIT_USAGE: "usage error: an unknown command or option, a bad option value",
    EXIT_NO_DAEMON: "no daemon answers (commands that talk to the running daemon): no control socket "
    "at the runtime directory, or nobody listening on it",
}


class Exit(Exception):
    """End the command with this exit code (the message, if any, was printed already)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def add_json_option(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def ask(command: str, args: argparse.Namespace, request: dict[str, Any]) -> Any:
    """The daemon's result; else prints `nfqfw COMMAND: why` on stderr and raises Exit (3 when
    no daemon runs there, 1 otherwise)."""
    from nfqfw.control.client import ClientError, NoDaemon, call

    try:
        return call(args.runtime_dir, request)
    except NoDaemon as err:
        print(f"nfqfw {command}: {err}", file=sys.stderr)
        raise Exit(EXIT_NO_DAEMON) from None
    except ClientError as err:
        print(f"nfqfw {command}: {err}", file=sys.stderr)
        raise Exit(EXIT_FAILURE) from None
