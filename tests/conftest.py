"""Shared test setup: lab tests (marker `lab`) need root and network namespaces.

Where they cannot run, they are skipped on a developer's machine but FAIL in CI (CI=true): a CI
run that silently skipped the kernel data path would prove nothing.

Every test module must leave the namespace the tests run in as it found it: nfqfw's rules and
ipsets belong in lab namespaces, never in the machine's own firewall (a systemd box test once
left fail-closed rules there, queueing the host's own packets to nobody). A module that leaves
some fails, its teardown naming what it left.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterator

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


def nfqfw_kernel_state() -> frozenset[str]:
    """nfqfw's rules and ipsets in this network namespace (iptables-save lines, set names)."""
    if os.geteuid() != 0:
        return frozenset()
    found: set[str] = set()
    for command in (["iptables-save"], ["ip6tables-save"], ["ipset", "list", "-n"]):
        if shutil.which(command[0]) is None:
            continue
        listed = subprocess.run(command, capture_output=True, text=True, check=False).stdout
        found.update(line for line in listed.splitlines() if "nfqfw" in line.lower())
    return frozenset(found)


@pytest.fixture(scope="module", autouse=True)
def leaves_no_kernel_rules_here() -> Iterator[None]:
    before = nfqfw_kernel_state()
    yield
    left = nfqfw_kernel_state() - before
    if left:
        pytest.fail(
            "this module left nfqfw rules or ipsets in the tests' own namespace:\n" + "\n".join(sorted(left)),
            pytrace=False,
        )
