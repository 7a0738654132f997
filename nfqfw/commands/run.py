"""`nfqfw run`: the firewall daemon (lifecycle: nfqfw.service.daemon; rules: nfqfw.firewall)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nfqfw.control.protocol import DEFAULT_RUNTIME_DIR, SOCKET_NAME
from nfqfw.firewall import DEFAULT_MARK
from nfqfw.kernel import queue_info
from nfqfw.observe import endpoint
from nfqfw.service import statedir
from nfqfw.service.options import DEFAULT_QUEUES, NEW_QUEUE_OFF, Options

LOG_LEVELS = ("debug", "info", "warning", "error")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the firewall daemon",
        description="Bind an NFQUEUE queue, install nfqfw's iptables/ip6tables rules and filter packets "
        "with the policy. Stops on SIGTERM/SIGINT, leaving the rules in place (fail-closed unless the "
        "policy says failure-mode: open).",
    )
    parser.add_argument("--config", "-c", required=True, metavar="FILE", help="policy file (YAML)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--queue", type=_queue_number, metavar="N", help="one queue for all flows: number N")
    where.add_argument(
        "--queue-balance",
        type=_queue_range,
        metavar="A:B",
        help="bind queues A..B, rules spread flows over them by addresses and protocol, served in turn "
        f"so that a busy flow delays only its own queue (default {DEFAULT_QUEUES[0]}:{DEFAULT_QUEUES[1]})",
    )
    parser.add_argument(
        "--workers",
        action="store_true",
        help="with --queue-balance A:B: one worker process per queue (each its own engine, flow "
        "table and snapshot) under a supervisor that owns the rules, the control socket and "
        "systemd's notifications, and with --metrics serves the workers' sums; uses several cores",
    )
    parser.add_argument(
        "--new-queue",
        type=_new_queue,
        metavar="N|off",
        help="first packets (those the kernel's conntrack calls NEW) go to queue N (N.. with "
        "--queue-balance, one per queue), bound by the same process and served after the queues of "
        "established flows, so that a flood of them cannot fill those queues (default: the queues "
        "right after the main ones; off: they share the main queues)",
    )
    parser.add_argument(
        "--mark",
        type=_mark,
        default=DEFAULT_MARK,
        metavar="BITS",
        help=f"mark bit(s) set on accepted packets so they pass our rule (default 0x{DEFAULT_MARK:x})",
    )
    parser.add_argument(
        "--max-len",
        type=_positive,
        default=queue_info.DEFAULT_MAX_LEN,
        metavar="PACKETS",
        help=f"packets the kernel queues for us before dropping (default {queue_info.DEFAULT_MAX_LEN})",
    )
    parser.add_argument(
        "--sock-len",
        type=_positive,
        default=queue_info.DEFAULT_SOCK_LEN,
        metavar="BYTES",
        help=f"netlink socket receive buffer (default {queue_info.DEFAULT_SOCK_LEN})",
    )
    parser.add_argument(
        "--reject-rate",
        type=float,
        default=queue_info.DEFAULT_REJECT_RATE,
        metavar="PER_SECOND",
        help=f"most RST/ICMP answers sent per second (default {queue_info.DEFAULT_REJECT_RATE:g})",
    )
    parser.add_argument(
        "--state-dir",
        default=statedir.DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"where the flow table is saved across restarts (default {statedir.DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--snapshot-interval",
        type=_seconds,
        default=statedir.DEFAULT_SNAPSHOT_INTERVAL,
        metavar="SECONDS",
        help="save the flow table this often, so a crash loses at most the flows of the last SECONDS; "
        f"0: only at stop (default {statedir.DEFAULT_SNAPSHOT_INTERVAL:g})",
    )
    parser.add_argument(
        "--metrics",
        type=_metrics_address,
        metavar="[ADDR:]PORT",
        help="serve Prometheus metrics on http://ADDR:PORT/metrics (off by default; ADDR defaults to "
        f"127.0.0.1 and must be a loopback address, e.g. 127.0.0.1:{endpoint.DEFAULT_PORT} or [::1]:PORT)",
    )
    parser.add_argument(
        "--metrics-allow-remote",
        action="store_true",
        help="allow a --metrics address that is not loopback (the page names rules and shows traffic)",
    )
    parser.add_argument(
        "--runtime-dir",
        default=DEFAULT_RUNTIME_DIR,
        metavar="DIR",
        help=f"where the control socket {SOCKET_NAME} goes (default {DEFAULT_RUNTIME_DIR}); "
        "one per daemon when several run",
    )
    parser.add_argument(
        "--no-gso",
        dest="gso",
        action="store_false",
        help="let the kernel cut GSO packets (up to 64 KB, from TSO/GRO) into MTU-sized ones before "
        "queueing them, as without nfqfw; by default they are queued whole and decided on their headers",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default info")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.workers and not args.queue_balance:
        print("nfqfw: --workers needs --queue-balance A:B (one worker per queue)", file=sys.stderr)
        return 2
    try:  # the daemon's modules need the C binding and pyroute2 (pip install 'nfqfw[daemon]')
        from nfqfw.service.daemon import run_daemon
    except ImportError as err:
        print(f"nfqfw run: {err.name or err} is not installed: pip install 'nfqfw[daemon]'", file=sys.stderr)
        return 1
    from nfqfw.observe.logsetup import setup_logging

    setup_logging(args.log_level)
    first, last = args.queue_balance or (
        (args.queue, args.queue) if args.queue is not None else DEFAULT_QUEUES
    )
    new = args.new_queue
    if isinstance(new, int) and new <= last and new + last - first >= first:
        print(f"nfqfw: --new-queue {new} overlaps the queues {first}:{last}", file=sys.stderr)
        return 2
    if new != NEW_QUEUE_OFF and (last + 1 if new is None else int(new)) + last - first > 0xFFFF:
        where = str(first) if first == last else f"{first}:{last}"
        print(
            f"nfqfw: no room for the queues of first packets after {where} "
            "(--new-queue N chooses them, --new-queue off shares the main queues)",
            file=sys.stderr,
        )
        return 2
    options = Options(
        config=args.config,
        queue_first=first,
        queue_last=last,
        mark=args.mark,
        max_len=args.max_len,
        sock_len=args.sock_len,
        reject_rate=args.reject_rate,
        state_dir=args.state_dir,
        snapshot_interval=args.snapshot_interval,
        runtime_dir=args.runtime_dir,
        metrics=args.metrics,
        metrics_allow_remote=args.metrics_allow_remote,
        gso=args.gso,
        new_queue=args.new_queue,
    )
    if args.workers:
        from nfqfw.service.supervisor import run_supervisor

        return run_supervisor(options)
    return run_daemon(options)


def _metrics_address(text: str) -> tuple[str, int]:
    try:
        return endpoint.parse_address(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _queue_number(text: str) -> int:
    if not text.isdigit() or int(text) > 0xFFFF:
        raise argparse.ArgumentTypeError(f"not a queue number (0-65535): {text!r}")
    return int(text)


def _new_queue(text: str) -> int | str:
    return NEW_QUEUE_OFF if text == NEW_QUEUE_OFF else _queue_number(text)


def _queue_range(text: str) -> tuple[int, int]:
    first, sep, last = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected A:B, got {text!r}")
    a, b = _queue_number(first), _queue_number(last)
    if a >= b:
        raise argparse.ArgumentTypeError(f"A must be below B in A:B, got {text!r}")
    return a, b


def _mark(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"mark must be 1..0xffffffff: {text!r}")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds: {text!r}")
    return value
