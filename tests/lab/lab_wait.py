"""Waiting, in the lab tests, for what a daemon, the kernel or a peer does in its own time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
POLL = 0.05  # seconds between two checks


def wait_for(what: str, check: Callable[[], T], timeout: float) -> T:
    """Call `check` until it returns something true, and return that; the test fails, naming
    `what`, when `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(POLL)
    return value
