"""`nfqfw top`: the running daemon on one screen, refreshed every second: verdict rates by
reason and rule, flows by state, the addresses in the most flows, the kernel queue's pressure.

Each refresh is one `status` request (with "talkers"); the rates are the differences of its
counters. `q` or Ctrl-C quits. `--once` prints one screen (after one interval, so it has rates)
without clearing: for scripts and tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import Any

from nfqfw.commands import EXIT_OK, ask
from nfqfw.control.client import add_runtime_dir_option
from nfqfw.control.format import format_top
from nfqfw.control.requests import MAX_TALKERS

CLEAR = "\x1b[H\x1b[2J"
ALTERNATE_SCREEN, MAIN_SCREEN = "\x1b[?1049h", "\x1b[?1049l"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "top",
        help="a live view of the running daemon",
        description="Verdicts per second by reason and rule, flows by state, the addresses in the most "
        "flows and the kernel queue's pressure, refreshed every --interval seconds. q quits.",
    )
    parser.add_argument(
        "--interval", type=_interval, default=1.0, metavar="SECONDS", help="between refreshes (default 1)"
    )
    parser.add_argument(
        "--talkers",
        type=_talkers,
        default=10,
        metavar="N",
        help=f"addresses listed, 1-{MAX_TALKERS} (default 10)",
    )
    parser.add_argument(
        "--once", action="store_true", help="print one screen after one interval and exit (no clearing)"
    )
    add_runtime_dir_option(parser)
    parser.set_defaults(func=run)


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be 0.1 to 3600 seconds: {text!r}")
    return value


def _talkers(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_TALKERS:
        raise argparse.ArgumentTypeError(f"not a number 1-{MAX_TALKERS}: {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    request = {"cmd": "status", "talkers": args.talkers}
    before, taken = ask("top", args, request), time.monotonic()
    if args.once:
        time.sleep(args.interval)
        status = ask("top", args, request)
        print("\n".join(format_top(before, status, time.monotonic() - taken, height=10_000)))
        return EXIT_OK
    with _screen() as keys:
        first = True
        while True:
            status, now = (before, taken) if first else (ask("top", args, request), time.monotonic())
            size = shutil.get_terminal_size()
            lines = format_top(None if first else before, status, now - taken, size.lines)
            sys.stdout.write(CLEAR + "\n".join(line[: size.columns] for line in lines[: size.lines]))
            sys.stdout.flush()
            if not first:
                before, taken = status, now
            first = False
            if _quit_within(keys, args.interval):
                break
    return EXIT_OK  # q, or Ctrl-C (taken by _screen)


@contextlib.contextmanager
def _screen() -> Iterator[int | None]:
    """The alternate screen, and the keyboard unbuffered (the fd of a terminal, else None)."""
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None
    sys.stdout.write(ALTERNATE_SCREEN)
    try:
        if fd is not None:
            tty.setcbreak(fd)
        yield fd
    except KeyboardInterrupt:
        pass
    finally:
        if fd is not None and saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        sys.stdout.write(MAIN_SCREEN)
        sys.stdout.flush()


def _quit_within(fd: int | None, seconds: float) -> bool:
    """Wait `seconds`; True if q was pressed meanwhile."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if fd is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready and os.read(fd, 1) in (b"q", b"Q"):
            return True
    return False
