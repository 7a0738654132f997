"""nfqfw/core is the sans-IO core: its modules, those of its subpackages (core/l4) included, import only the
stdlib, other core modules and (config only) yaml."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "nfqfw" / "core"
MODULES = sorted(CORE.rglob("*.py"))
FORBIDDEN = {"socket", "subprocess", "time", "scapy", "netfilterqueue", "pyroute2", "asyncio", "selectors"}


def package_of(path: Path) -> list[str]:
    """The package a module of the core is in, e.g. ["nfqfw", "core", "l4"] for core/l4/tcp.py."""
    return ["nfqfw", "core", *path.resolve().parent.relative_to(CORE).parts]


def imported_names(path: Path, package: list[str] | None = None) -> list[str]:
    """Absolute names of every module imported by `path` (relative imports resolved against
    `package`, by default the core package it is in)."""
    package = package_of(path) if package is None else package
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package[: max(0, len(package) - (node.level - 1))]
                base = ".".join(parent + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.append(base)
            if node.module is None or base in ("nfqfw", "nfqfw.core"):  # names may be modules
                names.extend(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_core_modules_found() -> None:
    stems = {path.stem for path in MODULES}
    assert {"conntrack", "engine", "expiry", "decode", "config", "policy"} <= stems
    assert {"tcp", "udp", "icmp", "generic"} <= {path.stem for path in MODULES if path.parent.name == "l4"}


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(CORE)))
def test_core_module_imports(path: Path) -> None:
    module = path.relative_to(CORE)
    for name in imported_names(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN, f"{module} imports {name}"
        if top == "nfqfw":
            assert name.startswith("nfqfw.core.") or name == "nfqfw.core", f"{module} imports {name}"
        if top == "yaml":
            assert path == CORE / "config.py", f"{module} imports yaml"


def test_checker_sees_forbidden_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import time\nfrom socket import socket\nfrom nfqfw.adapters import queue\nfrom .. import cli\n"
    )
    assert imported_names(bad, ["nfqfw", "core"]) == [
        "time",
        "socket",
        "nfqfw.adapters",
        "nfqfw",
        "nfqfw.cli",
    ]
    # from a subpackage of the core, `..` is the core and `...` is nfqfw
    bad.write_text("from ..packet import Packet\nfrom ... import cli\nfrom . import tcp\n")
    assert imported_names(bad, ["nfqfw", "core", "l4"]) == [
        "nfqfw.core.packet",
        "nfqfw",
        "nfqfw.cli",
        "nfqfw.core.l4",
        "nfqfw.core.l4.tcp",
    ]
