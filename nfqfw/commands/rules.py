"""`nfqfw rules show|remove [--json]`: look at or take away nfqfw's iptables/ip6tables rules."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from nfqfw.commands import EXIT_FAILURE, EXIT_OK, add_json_option, print_json
from nfqfw.firewall import RulesError, backend_named

SECTION = re.compile(r"^# IPv(\d+) \(")  # the head of a family in Firewall.show()


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "rules",
        help="show or remove nfqfw's kernel rules",
        description="nfqfw run installs chains NFQFW-INPUT/-FORWARD/-OUTPUT and jumps to them (IPv4 and "
        "IPv6) and leaves them in place when it stops. 'show' prints them, 'remove' deletes them for good "
        "(traffic then bypasses nfqfw). Nothing else in the tables is touched.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show_parser = actions.add_parser("show", help="print nfqfw's chains and jumps")
    add_json_option(show_parser, 'the rules by family ({"ipv4": [lines], "ipv6": [lines]})')
    show_parser.set_defaults(func=show)
    remove_parser = actions.add_parser("remove", help="remove nfqfw's chains and jumps")
    add_json_option(remove_parser, 'the families whose rules were removed ({"removed": [4, 6]})')
    remove_parser.set_defaults(func=remove)


def show(args: argparse.Namespace) -> int:
    try:
        text = backend_named().show()
    except RulesError as err:
        print(f"nfqfw: {err}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print_json(rules_by_family(text))
    else:
        sys.stdout.write(text)
    return EXIT_OK


def rules_by_family(text: str) -> dict[str, list[str]]:
    """Firewall.show()'s text as {"ipv4": [rule lines], "ipv6": [...]} (comments left out)."""
    families: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in text.splitlines():
        head = SECTION.match(line)
        if head:
            lines = families.setdefault(f"ipv{head.group(1)}", [])
        elif line and not line.startswith("#"):
            lines.append(line)
    return families


def remove(args: argparse.Namespace) -> int:
    try:
        removed = backend_named().remove()
    except RulesError as err:
        print(f"nfqfw: {err}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print_json({"removed": removed})
    elif removed:
        print("removed nfqfw rules for " + " and ".join(f"IPv{family}" for family in removed))
    else:
        print("no nfqfw rules to remove")
    return EXIT_OK
