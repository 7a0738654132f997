"""`nfqfw flows [--json] [--proto P] [--state S] [--addr A]`: the daemon's flow table, one line
per flow like `conntrack -L` (original direction), with the rule that admitted it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from nfqfw.commands import EXIT_OK, add_json_option, ask, print_json
from nfqfw.control.client import add_runtime_dir_option
from nfqfw.control.flowlist import STATES, FilterError, FlowFilter, parse_addr, parse_proto, parse_state
from nfqfw.control.format import format_flows


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "flows",
        help="list the tracked flows",
        description="One line per tracked flow: protocol, seconds left, TCP state, addresses and ports "
        "of the original direction, [UNREPLIED]/[ASSURED], the rule that admitted it. A summary goes "
        "to stderr.",
    )
    add_json_option(parser, "the daemon's answer")
    add_filter_options(parser)
    add_runtime_dir_option(parser)
    parser.set_defaults(func=run)


def add_filter_options(parser: argparse.ArgumentParser) -> None:
    """--proto, --state, --addr (shared with `nfqfw flush`); checked here and by the daemon."""
    parser.add_argument("--proto", type=_checked(parse_proto), metavar="P", help="tcp, udp, icmp, icmpv6, N")
    parser.add_argument(
        "--state", type=_checked(parse_state), metavar="S", help=f"one of {', '.join(STATES)}"
    )
    parser.add_argument(
        "--addr", type=_checked(parse_addr), metavar="A", help="an address or network either endpoint is in"
    )


def filter_fields(args: argparse.Namespace) -> dict[str, str]:
    """The request fields of the filter options given (already checked by argparse)."""
    return FlowFilter.parse(args.proto, args.state, args.addr).request_fields()


def _checked(parse: Callable[[str], object]) -> Callable[[str], object]:
    def check(text: str) -> object:
        try:
            parse(text)
        except FilterError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text

    return check


def run(args: argparse.Namespace) -> int:
    result = ask("flows", args, {"cmd": "flows", **filter_fields(args)})
    if args.json:
        print_json(result)
        return EXIT_OK
    lines, summary = format_flows(result)
    for line in lines:
        print(line)
    print(summary, file=sys.stderr)
    return EXIT_OK
