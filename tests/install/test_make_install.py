"""`make install` / `make uninstall`, staged with DESTDIR: what lands where, that an operator's
policy is never overwritten, and that systemd accepts the installed unit.

One install is shared by the module (it builds a venv and pip-installs the checkout, ~30 s).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


Staged = tuple[Path, subprocess.CompletedProcess[str]]


def make(target: str, destdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", target, f"DESTDIR={destdir}", f"PYTHON={sys.executable}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Staged]:
    root = tmp_path_factory.mktemp("destdir")
    result = make("install", root)
    assert result.returncode == 0, result.stdout + result.stderr
    yield root, result


def test_install_puts_the_package_command_policy_unit_and_docs_in_place(
    staged: Staged,
) -> None:
    root, result = staged
    venv_nfqfw = root / "opt/nfqfw/bin/nfqfw"
    assert os.access(venv_nfqfw, os.X_OK)
    # The command is a link to the venv's script by its real (not staged) path.
    assert os.readlink(root / "usr/local/bin/nfqfw") == "/opt/nfqfw/bin/nfqfw"
    policy = root / "etc/nfqfw/policy.yaml"
    assert policy.read_text() == (REPO / "config/policy.yaml").read_text()
    assert stat.S_IMODE(policy.stat().st_mode) == 0o600
    unit = root / "etc/systemd/system/nfqfw.service"
    assert unit.read_text() == (REPO / "systemd/nfqfw.service").read_text()
    closed = root / "etc/systemd/system/nfqfw-closed.service"
    assert closed.read_text() == (REPO / "systemd/nfqfw-closed.service").read_text()
    assert (root / "usr/share/doc/nfqfw/README.md").is_file()
    written = "install: /etc/nfqfw/policy.yaml written from config/policy.yaml: edit its zones first"
    assert written in result.stdout
    check = subprocess.run([venv_nfqfw, "check", policy], capture_output=True, text=True, timeout=60)
    summary = f"{policy}: OK (zones: 2, ingress rules: 3, egress rules: 1)\n"
    assert (check.returncode, check.stdout) == (0, summary)


def test_the_service_python_is_not_under_root_or_home(staged: Staged) -> None:
    # The unit's ProtectHome=yes hides /root and /home: a venv built on a pyenv Python there
    # (as the checkout's .venv may be) would leave the service without its interpreter.
    root, _ = staged
    lines = (root / "opt/nfqfw/pyvenv.cfg").read_text().splitlines()
    config = dict(line.split(" = ", 1) for line in lines if " = " in line)
    assert not config["home"].startswith(("/root", "/home")), config
    assert config["home"] == "/usr/bin" or not Path("/usr/bin/python3").exists(), config


def test_install_again_keeps_the_operators_policy(staged: Staged) -> None:
    root, _ = staged
    policy = root / "etc/nfqfw/policy.yaml"
    edited = policy.read_text() + "# edited by the operator\n"
    policy.write_text(edited)
    again = make("install", root)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "install: keeping the existing /etc/nfqfw/policy.yaml" in again.stdout
    assert policy.read_text() == edited


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_installed_unit(staged: Staged, tmp_path: Path) -> None:
    root, _ = staged
    # verify checks that ExecStart= exists: point it at the staged venv instead of /usr/local/bin.
    units = []
    for name in ("nfqfw.service", "nfqfw-closed.service"):
        text = (root / "etc/systemd/system" / name).read_text()
        units.append(tmp_path / name)
        units[-1].write_text(text.replace("/usr/local/bin/nfqfw", str(root / "opt/nfqfw/bin/nfqfw")))
    verify = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")


def test_uninstall_removes_what_install_put_in_place_but_the_policy(
    staged: Staged,
) -> None:
    root, _ = staged
    result = make("uninstall", root)
    assert result.returncode == 0, result.stdout + result.stderr
    installed = (
        "opt/nfqfw",
        "usr/local/bin/nfqfw",
        "etc/systemd/system/nfqfw.service",
        "etc/systemd/system/nfqfw-closed.service",
        "usr/share/doc/nfqfw",
    )
    for gone in installed:
        assert not os.path.lexists(root / gone), gone
    assert (root / "etc/nfqfw/policy.yaml").is_file()
