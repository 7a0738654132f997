"""`nfqfw set add|del|list NAME [ADDR]`: runtime entries of the policy's named sets.

An entry takes effect with the next first packet (no reload, no recompile); with the policy's
`reload: recheck` (the default) the open flows of its addresses are judged again at once, so an
address added to a set a drop rule uses loses its sessions. Entries survive reloads and
restarts (the daemon keeps them in its state directory). For fail2ban and CrowdSec see README,
"Sets": an action that runs `nfqfw set add banned <ip> --timeout <bantime>`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nfqfw.commands import EXIT_OK, add_json_option, ask, print_json
from nfqfw.control.client import add_runtime_dir_option
from nfqfw.control.format import format_set_change, format_set_list


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "set",
        help="add, delete or list runtime entries of a named set",
        description="Change a named set of the running daemon's policy without a reload: the entry "
        "holds from the next first packet, survives reloads and restarts, and (reload: recheck) cuts "
        "or re-admits the open flows of its addresses at once.",
    )
    sub = parser.add_subparsers(dest="op", metavar="OP", required=True)
    add = sub.add_parser("add", help="add an address or network", description="Add ADDR to set NAME.")
    add.add_argument("name", metavar="NAME", help="a set of the policy")
    add.add_argument("addr", metavar="ADDR", help="an address or network (192.0.2.7, 2001:db8::/48)")
    add.add_argument(
        "--timeout", type=_seconds, metavar="SECONDS", help="remove it again after this many seconds"
    )
    delete = sub.add_parser(
        "del", help="delete an address or network", description="Delete ADDR from set NAME."
    )
    delete.add_argument("name", metavar="NAME", help="a set of the policy")
    delete.add_argument("addr", metavar="ADDR", help="the address or network as it was added")
    listing = sub.add_parser(
        "list",
        help="list a set's runtime entries",
        description="Show a set's runtime entries (with the time left of those with a timeout) and how "
        "many networks the policy gives it.",
    )
    listing.add_argument("name", metavar="NAME", help="a set of the policy")
    for each in (add, delete, listing):
        add_json_option(each, "the daemon's answer")
        add_runtime_dir_option(each)
        each.set_defaults(func=run)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: '{text}'") from None
    if not 0 < value <= 10 * 365 * 86400:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: '{text}'")
    return value


def run(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"cmd": "set", "op": args.op, "name": args.name}
    if args.op != "list":
        request["addr"] = args.addr
    if getattr(args, "timeout", None) is not None:
        request["timeout"] = args.timeout
    result = ask("set", args, request)
    if args.json:
        print_json(result)
    elif args.op == "list":
        print("\n".join(format_set_list(result)))
    else:
        print(format_set_change(result), file=sys.stdout)
    return EXIT_OK
