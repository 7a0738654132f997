"""`nfqfw lab up|down|demo|status|failover|recover`: a three-namespace gateway lab with nfqfw
filtering real traffic, or (up --ha) an HA pair of gateways (nfqfw.lab.ha)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from nfqfw.lab import plan
from nfqfw.lab.plan import DEFAULT_PREFIX, LabError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "lab",
        help="build a network-namespace lab and run nfqfw in it",
        description="Three network namespaces (outside host, gateway, inside host) with nfqfw "
        "filtering the gateway's traffic. Needs root. Never touches the root namespace.\n\n"
        + plan.picture(DEFAULT_PREFIX),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    lab_up = actions.add_parser("up", help="build the lab and start nfqfw in the gateway")
    lab_up.add_argument(
        "--policy", "-p", metavar="FILE", help="policy for nfqfw (required unless --no-daemon)"
    )
    lab_up.add_argument("--queue", type=int, default=0, metavar="N", help="NFQUEUE number (default 0)")
    lab_up.add_argument("--no-daemon", action="store_true", help="only the namespaces, no nfqfw")
    lab_up.add_argument(
        "--ha",
        action="store_true",
        help="an HA pair: gateways {P}gw1 and {P}gw2 with keepalived, conntrackd and nfqfw "
        "(config/ha/), between {P}wan and {P}lan",
    )
    lab_up.add_argument(
        "--dmz", action="store_true", help="a fourth namespace: a DMZ host (10.0.2.80) on the gateway's dmz0"
    )
    _prefix_option(lab_up)
    lab_up.add_argument(
        "run_options",
        nargs=argparse.REMAINDER,
        metavar="-- RUN_OPTIONS",
        help="more `nfqfw run` options after a --, e.g. -- --queue-balance 0:1 --workers --metrics 9469",
    )
    lab_up.set_defaults(func=run_up)

    lab_down = actions.add_parser("down", help="stop nfqfw and remove the lab's namespaces")
    _prefix_option(lab_down)
    lab_down.set_defaults(func=run_down)

    for name, text, func in (
        ("status", "HA lab: which gateway holds the virtual addresses", run_status),
        ("failover", "HA lab: take the VRRP master's links down, as a machine that dies", run_failover),
        ("recover", "HA lab: bring a failed gateway's links back up (it rejoins as backup)", run_recover),
    ):
        action = actions.add_parser(name, help=text)
        _prefix_option(action)
        action.set_defaults(func=func)

    demo = actions.add_parser("demo", help="lab up with config/policy.yaml, real traffic, a table, lab down")
    demo.add_argument(
        "--policy", "-p", metavar="FILE", help="policy (default: the checkout's config/policy.yaml)"
    )
    demo.set_defaults(func=run_demo)


def _prefix_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        metavar="P",
        help=f"namespace name prefix (default {DEFAULT_PREFIX})",
    )


def _not_root(action: str) -> bool:
    if os.geteuid() == 0:
        return False
    print(f"nfqfw lab {action}: must run as root (it creates network namespaces)", file=sys.stderr)
    return True


def run_up(args: argparse.Namespace) -> int:
    from nfqfw.lab.daemon_ctl import up  # pyroute2: loaded only when the lab runs

    if _not_root("up"):
        return 1
    if not args.no_daemon and not args.policy:
        print("nfqfw lab up: --policy FILE is required (or --no-daemon)", file=sys.stderr)
        return 2
    run_options = args.run_options[1:] if args.run_options[:1] == ["--"] else args.run_options
    if args.ha:
        return _run_up_ha(args, run_options)
    try:
        policy = None if args.no_daemon else args.policy
        lab = up(args.prefix, policy, queue=args.queue, args=run_options, dmz=args.dmz)
    except LabError as err:
        print(f"nfqfw lab up: {err}", file=sys.stderr)
        return 1
    print(plan.picture(args.prefix, args.dmz))
    print()
    if lab.daemon is not None:
        print(
            f"nfqfw run is filtering in {lab.topology.gw} (pid {lab.daemon.pid}); log: {lab.daemon.log_file}"
        )
    else:
        print("no nfqfw running (--no-daemon)")
    print(f"try: ip netns exec {lab.topology.lan} ping -c1 {plan.WAN_V4}")
    if lab.daemon is not None:
        print(f"look: nfqfw status --runtime-dir {lab.state.runtime_dir}  (flows, flush, panic, reload too)")
    print(f"stop: nfqfw lab down --prefix {args.prefix}")
    return 0


def _run_up_ha(args: argparse.Namespace, run_options: list[str]) -> int:
    from nfqfw.lab import ha  # pyroute2: loaded only when the lab runs

    try:
        lab = ha.up(args.prefix, None if args.no_daemon else args.policy, args=run_options)
        master = ha.master(args.prefix)
    except LabError as err:
        print(f"nfqfw lab up: {err}", file=sys.stderr)
        return 1
    print(plan.ha_picture(args.prefix))
    print()
    for gateway, daemon in lab.daemons.items():
        print(
            f"nfqfw run is filtering in {lab.topology.gw(gateway)} (pid {daemon.pid}); log: {daemon.log_file}"
        )
    print(f"VRRP master: {master}; files: {ha.GatewayFiles(args.prefix, 'gw1').directory.parent}/gw1, gw2")
    print(f"try: ip netns exec {lab.topology.lan} ping -c1 {plan.WAN_V4}")
    print(f"then: nfqfw lab failover --prefix {args.prefix}; nfqfw lab status --prefix {args.prefix}")
    print(f"stop: nfqfw lab down --prefix {args.prefix}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from nfqfw.lab import ha

    if _not_root("status"):
        return 1
    try:
        gateways = ha.status(args.prefix)
    except LabError as err:
        print(f"nfqfw lab status: {err}", file=sys.stderr)
        return 1
    for gw in gateways:
        held = f": holds {' '.join(gw.virtual)}" if gw.virtual else ""
        print(f"{gw.gateway} ({ha.HaTopology(args.prefix).gw(gw.gateway)}): {gw.role}{held}")
    return 0


def run_failover(args: argparse.Namespace) -> int:
    from nfqfw.lab import ha

    if _not_root("failover"):
        return 1
    try:
        failed = ha.failover(args.prefix)
    except LabError as err:
        print(f"nfqfw lab failover: {err}", file=sys.stderr)
        return 1
    print(f"{failed}: links down ({', '.join(ha.GATEWAY_LINKS)}); `nfqfw lab status` shows the new master")
    return 0


def run_recover(args: argparse.Namespace) -> int:
    from nfqfw.lab import ha

    if _not_root("recover"):
        return 1
    try:
        recovered = ha.recover(args.prefix)
    except LabError as err:
        print(f"nfqfw lab recover: {err}", file=sys.stderr)
        return 1
    print(f"links up again: {', '.join(recovered)}" if recovered else "no failed gateway (nothing to do)")
    return 0


def run_down(args: argparse.Namespace) -> int:
    from nfqfw.lab import ha  # pyroute2: loaded only when the lab runs
    from nfqfw.lab.daemon_ctl import LabState, down

    if _not_root("down"):
        return 1
    try:
        removed = down(args.prefix) + ha.down(args.prefix)  # the single lab or the HA pair
    except LabError as err:
        print(f"nfqfw lab down: {err}", file=sys.stderr)
        return 1
    if not removed:
        print(f"no lab with prefix {args.prefix!r} (nothing to do)")
        return 0
    print("removed: " + ", ".join(removed))
    state = LabState(args.prefix)
    if state.log_file.exists():
        print(f"the daemon's log stays at {state.log_file}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from nfqfw.lab import demo

    if _not_root("demo"):
        return 1
    policy = args.policy or demo.REPO_POLICY
    if not args.policy and not demo.REPO_POLICY.exists():
        print(
            "nfqfw lab demo: no config/policy.yaml next to the package: pass --policy FILE", file=sys.stderr
        )
        return 2
    return demo.run_demo(policy)
