"""The Vagrant box cannot be booted here (no VirtualBox/libvirt): check that its Vagrantfile is
valid Ruby and that it provisions with the project's own bootstrap rather than a copy of it."""

from __future__ import annotations

import subprocess
from pathlib import Path

VAGRANTFILE = Path(__file__).resolve().parents[2] / "vagrant/Vagrantfile"


def test_vagrantfile_is_valid_ruby() -> None:
    check = subprocess.run(["ruby", "-c", VAGRANTFILE], capture_output=True, text=True, timeout=60)
    assert (check.returncode, check.stdout.strip()) == (0, "Syntax OK")


def test_vagrant_box_provisions_with_make_bootstrap_in_the_synced_checkout() -> None:
    text = VAGRANTFILE.read_text()
    assert 'config.vm.box = "debian/bookworm64"' in text
    assert 'config.vm.synced_folder "..", "/vagrant"' in text
    assert "cd /vagrant\n    make bootstrap\n" in text
