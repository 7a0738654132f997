"""nfqfw/core is the sans-IO core: it imports only the stdlib, other core modules and (config only) yaml."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "nfqfw" / "core"
MODULES = sorted(CORE.glob("*.py"))
FORBIDDEN = {"socket", "subprocess", "time", "scapy", "netfilterqueue", "pyroute2", "asyncio", "selectors"}


def imported_names(path: Path) -> list[str]:
    """Absolute names of every module imported by `path` (relative imports resolved)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = ["nfqfw", "core"][: max(0, 2 - (node.level - 1))]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.append(base)
            if base in ("nfqfw", "nfqfw.core"):
                names.extend(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_core_modules_found() -> None:
    stems = {path.stem for path in MODULES}
    assert {"conntrack", "engine", "expiry", "decode", "config", "policy"} <= stems


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_core_module_imports(path: Path) -> None:
    for name in imported_names(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN, f"{path.name} imports {name}"
        if top == "nfqfw":
            assert name.startswith("nfqfw.core.") or name == "nfqfw.core", f"{path.name} imports {name}"
        if top == "yaml":
            assert path.name == "config.py", f"{path.name} imports yaml"


def test_checker_sees_forbidden_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import time\nfrom socket import socket\nfrom nfqfw.adapters import queue\nfrom .. import cli\n"
    )
    assert imported_names(bad) == ["time", "socket", "nfqfw.adapters", "nfqfw", "nfqfw.cli"]
