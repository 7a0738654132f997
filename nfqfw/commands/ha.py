"""`nfqfw ha role master|backup|fault`: tell the running daemon its role in an HA pair.

keepalived's notify script (config/ha/nfqfw-ha-notify) runs it at each change of the VRRP sync
group's state, after conntrackd's own step: a new master takes over the flows conntrackd
committed into the kernel's table, a backup (or a gateway in fault) forgets its flow records.
`nfqfw status` shows the role and conntrackd's statistics (read with the configuration named by
--conntrackd, else /etc/conntrackd/conntrackd.conf).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nfqfw.commands import EXIT_FAILURE, EXIT_NO_DAEMON, EXIT_OK, add_json_option, print_json
from nfqfw.control.client import ClientError, NoDaemon, add_runtime_dir_option, call
from nfqfw.control.format import format_ha_role
from nfqfw.control.requests import HA_ROLES


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "ha",
        help="tell nfqfw its role in an HA pair (keepalived's notify script)",
        description="role master: take over the flows conntrackd committed into the kernel's table (with "
        "offload: established, nfqfw's mark tells the rule that admitted each); role backup or fault: "
        "forget this gateway's flow records, the peer carries the connections on.",
    )
    sub = parser.add_subparsers(dest="ha_command", metavar="ACTION", required=True)
    role = sub.add_parser("role", help="set the role", description="set this gateway's HA role")
    role.add_argument("role", choices=HA_ROLES, help="keepalived's state of the sync group")
    role.add_argument(
        "--conntrackd",
        metavar="CONF",
        help="conntrackd's configuration file (absolute path): status reads its statistics with it",
    )
    add_json_option(role, "the outcome (role, previous, taken_over or forgotten)")
    add_runtime_dir_option(role)
    role.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"cmd": "ha", "role": args.role}
    if args.conntrackd:
        request["conntrackd"] = args.conntrackd
    try:
        result = call(args.runtime_dir, request)
    except ClientError as err:
        print(f"nfqfw ha role: {err}", file=sys.stderr)
        return EXIT_NO_DAEMON if isinstance(err, NoDaemon) else EXIT_FAILURE
    if args.json:
        print_json(result)
    else:
        print(format_ha_role(result))
    return EXIT_OK
