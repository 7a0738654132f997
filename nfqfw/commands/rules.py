"""`nfqfw rules show|remove`: look at or take away nfqfw's iptables/ip6tables rules."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nfqfw.firewall import RulesError, backend_named


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "rules",
        help="show or remove nfqfw's kernel rules",
        description="nfqfw run installs chains NFQFW-INPUT/-FORWARD/-OUTPUT and jumps to them (IPv4 and "
        "IPv6) and leaves them in place when it stops. 'show' prints them, 'remove' deletes them for good "
        "(traffic then bypasses nfqfw). Nothing else in the tables is touched.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("show", help="print nfqfw's chains and jumps").set_defaults(func=show)
    actions.add_parser("remove", help="remove nfqfw's chains and jumps").set_defaults(func=remove)


def show(args: argparse.Namespace) -> int:
    try:
        sys.stdout.write(backend_named().show())
    except RulesError as err:
        print(f"nfqfw: {err}", file=sys.stderr)
        return 1
    return 0


def remove(args: argparse.Namespace) -> int:
    try:
        removed = backend_named().remove()
    except RulesError as err:
        print(f"nfqfw: {err}", file=sys.stderr)
        return 1
    if removed:
        print("removed nfqfw rules for " + " and ".join(f"IPv{family}" for family in removed))
    else:
        print("no nfqfw rules to remove")
    return 0
