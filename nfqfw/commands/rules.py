"""`nfqfw rules show|counters|remove|install-closed [--json]`: nfqfw's iptables/ip6tables rules.

`install-closed` is the boot step (systemd/nfqfw-closed.service, before the network comes up):
rules that send every packet but loopback to a queue nobody serves yet, so the gateway forwards
nothing until the daemon has bound its queue and installed its own rules over them (atomically).
Rules already in place (a running daemon's, or panic mode's) are kept.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from nfqfw.commands import EXIT_FAILURE, EXIT_OK, add_json_option, print_json
from nfqfw.firewall import QueueSpec, RulesError, backend_named

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
    counters_parser = actions.add_parser(
        "counters", help="packets the kernel dropped or rejected for nfqfw before its queue"
    )
    add_json_option(counters_parser, 'packets by what the kernel did ({"drop pre-filter ...": N})')
    counters_parser.set_defaults(func=counters)
    closed = actions.add_parser(
        "install-closed",
        help="fail-closed rules for the boot, before the daemon runs (kept if rules are there)",
    )
    closed.add_argument(
        "--queue", type=int, default=0, metavar="N", help="queue the rules send to (default 0)"
    )
    add_json_option(closed, 'what was done ({"installed": true|false, "queue": N})')
    closed.set_defaults(func=install_closed)


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


def counters(args: argparse.Namespace) -> int:
    try:
        counts = backend_named().counters()
    except RulesError as err:
        print(f"nfqfw: {err}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print_json(counts)
        return EXIT_OK
    for name, packets in sorted(counts.items()):
        print(f"{name:<40} {packets:>12}")
    if not counts:
        print("no packets dropped by nfqfw's kernel rules")
    return EXIT_OK


def install_closed(args: argparse.Namespace) -> int:
    try:
        firewall = backend_named()
        kept = firewall.installed()
        if not kept:
            firewall.install(QueueSpec(args.queue, args.queue))
    except (RulesError, ValueError) as err:
        print(f"nfqfw: {err}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print_json({"installed": not kept, "queue": args.queue})
    elif kept:
        print("nfqfw rules already in place: kept")
    else:
        print(f"fail-closed rules installed (queue {args.queue}, no listener yet)")
    return EXIT_OK


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
