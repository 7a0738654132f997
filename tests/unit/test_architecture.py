"""The package map holds: each package of nfqfw imports only the packages below it.

core      pure: stdlib (and yaml for config) only; tests/unit/test_layering.py checks that
kernel    core                         (the NFQUEUE adapter, links, raw sender)
firewall  nothing of nfqfw             (kernel rules; one backend interface)
observe   core, kernel.queue_info      (metrics, packet log, capture reader)
control   core, kernel.queue_info      (control socket protocol, server, requests, client)
service   all of the above             (daemon, supervisor, state directory)
lab       core, control.protocol       (namespace lab, kernel oracle, systemd box)
commands  anything                     (the CLI)
docs      anything                     (man pages and completion, generated from the CLI)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nfqfw"
ALLOWED = {
    "kernel": ("core", "kernel"),
    "firewall": ("firewall",),
    "observe": ("core", "kernel.queue_info", "observe"),
    "control": ("core", "kernel.queue_info", "control", "__version__"),
    "service": ("core", "kernel", "firewall", "observe", "control", "service", "__version__"),
    "lab": ("core", "control.protocol", "lab"),
}


def nfqfw_imports(path: Path) -> list[str]:
    """What `path` imports from nfqfw, relative to the package ("core.engine", "__version__")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "nfqfw":
                found += [alias.name for alias in node.names]
            elif node.module.startswith("nfqfw."):
                found.append(node.module.removeprefix("nfqfw."))
        elif isinstance(node, ast.Import):
            found += [a.name.removeprefix("nfqfw.") for a in node.names if a.name.startswith("nfqfw.")]
    return found


def allowed(name: str, rules: tuple[str, ...]) -> bool:
    return any(name == rule or name.startswith(rule + ".") for rule in rules)


MODULES = [path for package in ALLOWED for path in sorted((PACKAGE / package).rglob("*.py"))]


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_package_imports_only_what_lies_below_it(path: Path) -> None:
    package = path.relative_to(PACKAGE).parts[0]
    for name in nfqfw_imports(path):
        assert allowed(name, ALLOWED[package]), f"nfqfw/{path.relative_to(PACKAGE)} imports nfqfw.{name}"


def test_every_package_has_a_rule() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == {*ALLOWED, "core", "commands", "docs"}


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from nfqfw.service.daemon import Daemon\nfrom nfqfw import __version__\nimport nfqfw.lab.plan\n"
    )
    assert nfqfw_imports(bad) == ["service.daemon", "__version__", "lab.plan"]
    assert not allowed("service.daemon", ALLOWED["kernel"])
    assert allowed("kernel.queue_info", ALLOWED["observe"]) and not allowed(
        "kernel.queue", ALLOWED["observe"]
    )
