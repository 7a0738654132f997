"""`nfqfw rules show|counters|remove|install-closed`: nfqfw's iptables/ip6tables rules.

`install-closed` is the boot step (systemd/nfqfw-closed.service, before the network comes up):
rules that send every packet but loopback to a queue nobody serves yet, so the gateway forwards
nothing until the daemon has bound its queue and installed its own rules over them (atomically).
Rules already in place (a running daemon's, or panic mode's) are kept.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nfqfw.firewall import QueueSpec, RulesError, backend_named


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
    actions.add_parser(
        "counters", help="packets the kernel dropped or rejected for nfqfw before its queue"
    ).set_defaults(func=counters)
    closed = actions.add_parser(
        "install-closed",
        help="fail-closed rules for the boot, before the daemon runs (kept if rules are there)",
    )
    closed.add_argument(
        "--queue", type=int, default=0, metavar="N", help="queue the rules send to (default 0)"
    )
    closed.set_defaults(func=install_closed)


def show(args: argparse.Namespace) -> int:
    try:
        sys.stdout.write(backend_named().show())
    except RulesError as err:
        print(f"nfqfw: {err}", file=sys.stderr)
        return 1
    return 0


def counters(args: argparse.Namespace) -> int:
    try:
        counts = backend_named().counters()
    except RulesError as err:
        print(f"nfqfw: {err}", file=sys.stderr)
        return 1
    for name, packets in sorted(counts.items()):
        print(f"{name:<40} {packets:>12}")
    if not counts:
        print("no packets dropped by nfqfw's kernel rules")
    return 0


def install_closed(args: argparse.Namespace) -> int:
    try:
        firewall = backend_named()
        if firewall.installed():
            print("nfqfw rules already in place: kept")
            return 0
        firewall.install(QueueSpec(args.queue, args.queue))
    except (RulesError, ValueError) as err:
        print(f"nfqfw: {err}", file=sys.stderr)
        return 1
    print(f"fail-closed rules installed (queue {args.queue}, no listener yet)")
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
