"""Shared test setup: lab tests (marker `lab`) need root and network namespaces.

Where they cannot run, they are skipped on a developer's machine but FAIL in CI (CI=true): a CI
run that silently skipped the kernel data path would prove nothing.
"""

from __future__ import annotations

import functools
import os

import pytest


@functools.cache
def lab_unavailable() -> str | None:
    """Why lab tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, iptables, NFQUEUE)"
    try:
        from pyroute2 import netns

        probe = f"nfqprobe-{os.getpid()}"
        netns.create(probe)
        netns.remove(probe)
    except Exception as err:
        return f"lab tests need network namespaces, and creating one failed: {err}"
    return None


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("lab") is None:
        return
    reason = lab_unavailable()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI=true: lab tests must run, not be skipped)", pytrace=False)
    pytest.skip(reason)
