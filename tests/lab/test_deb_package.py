"""The Debian package: `make deb` twice (a second, higher version), then install, upgrade with
the policy edited in between, remove and purge, under a real systemd in a box (nfqfw.lab.sdbox)
with real traffic through the lab's gateway.

A drop-in written before the package is installed puts the service into the lab's gateway
namespace (and gives it DefaultDependencies=no, as the box has no sysinit.target). journald
runs in the box: the service logs natively to a real journal, and `journalctl -u nfqfw
NFQFW_RULE=...` is checked. apt and dpkg run in the gateway namespace too, so the maintainer
scripts' `nfqfw rules remove` acts on the lab's tables, never on the host's. The box's overlays
keep dpkg's database and every installed file away from the host.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nfqfw.lab import sdbox, traffic
from nfqfw.lab.plan import WAN_V4, Topology
from nfqfw.lab.topology import build, teardown

pytestmark = pytest.mark.lab

TOPOLOGY = Topology("nfqpk-")
REPO = Path(__file__).resolve().parents[2]
UNIT = "nfqfw.service"
OPERATOR_EDIT = "\n# the operator's edit: it must survive upgrades\n"


@dataclass
class Packages:
    first: Path
    second: Path
    versions: tuple[str, str]


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    dist = tmp_path_factory.mktemp("dist")
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert version
    versions = (version.group(1), version.group(1) + "+upgrade1")
    built = []
    for each in versions:
        done = subprocess.run(
            ["make", "--no-print-directory", "deb", f"DIST={dist}", f"DEB_VERSION={each}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        debs = list(dist.glob(f"nfqfw_{each}_*.deb"))
        assert len(debs) == 1 and f"deb: {debs[0]}" in done.stdout
        built.append(debs[0])
    return Packages(built[0], built[1], versions)


@dataclass
class Gateway:
    box: sdbox.Box

    def in_gw(self, *argv: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """A command in the box, in the lab's gateway namespace."""
        env = ("env", "DEBIAN_FRONTEND=noninteractive", "MANPAGER=cat", "MANWIDTH=80", "LC_ALL=C.UTF-8")
        return self.box.run("ip", "netns", "exec", TOPOLOGY.gw, *env, *argv, check=check, timeout=timeout)

    def apt(self, *argv: str) -> str:
        done = self.in_gw("apt-get", "-y", "-q", "--no-install-recommends", *argv, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    def state(self) -> dict[str, str]:
        return self.box.show(UNIT, "LoadState", "ActiveState", "MainPID", "UnitFileState", "FragmentPath")

    def journal(self, *matches: str) -> list[dict[str, str]]:
        """The unit's journal entries matching `matches` (FIELD=value), as journalctl -o json."""
        done = self.box.run("journalctl", "-u", UNIT, "-o", "json", "--no-pager", *matches, check=False)
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    def exists(self, path: str) -> bool:
        return self.box.run("test", "-e", path, check=False).returncode == 0

    def read(self, path: str) -> str:
        return self.box.run("cat", path).stdout


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    teardown(TOPOLOGY)
    build(TOPOLOGY)
    try:
        with (
            traffic.TcpServer(TOPOLOGY.wan, (80,)),
            sdbox.booted(unit_path=(sdbox.BOX_UNITS, sdbox.PACKAGE_UNITS)) as box,
        ):
            # A container image's policy-rc.d forbids maintainer scripts to start or stop
            # services; a Debian gateway has none (removed inside the box only: an overlay).
            box.run("rm", "-f", "/usr/sbin/policy-rc.d")
            box.start_journal()
            box.write(
                f"/etc/systemd/system/{UNIT}.d/lab.conf",
                f"[Unit]\nDefaultDependencies=no\nAfter={sdbox.JOURNAL_UNIT}\n"
                f"[Service]\nNetworkNamespacePath=/run/netns/{TOPOLOGY.gw}\n",
            )
            # nfqfw.service pulls in nfqfw-closed.service: into the lab namespace too, or its
            # fail-closed rules would land in the box's network namespace, the host's own.
            box.write(
                "/etc/systemd/system/nfqfw-closed.service.d/lab.conf",
                f"[Service]\nNetworkNamespacePath=/run/netns/{TOPOLOGY.gw}\n",
            )
            yield Gateway(box)
    finally:
        teardown(TOPOLOGY)


def nfqfw_rules_in_gateway() -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", TOPOLOGY.gw, "iptables-save", "-t", "filter"], capture_output=True, text=True
    )
    return "\n".join(line for line in done.stdout.splitlines() if "NFQFW" in line)


def alive(sock: socket.socket, tag: bytes) -> bool:
    try:
        return traffic.echo_roundtrip(sock, tag) == tag
    except OSError:
        return False


def test_install_upgrade_remove_purge(packages: Packages, gateway: Gateway) -> None:
    first, second = packages.versions
    gw = gateway

    # -- install: everything in place, the service known but neither enabled nor started
    gw.apt("install", str(packages.first))
    status = gw.in_gw("dpkg-query", "-W", "-f", "${Status} ${Version}", "nfqfw").stdout
    assert status == f"install ok installed {first}"
    assert gw.box.run("sh", "-c", "command -v nfqfw").stdout.strip() == "/usr/bin/nfqfw"
    assert gw.box.run("nfqfw", "--version").stdout.strip().startswith("nfqfw ")
    state = gw.state()
    assert (state["LoadState"], state["ActiveState"], state["UnitFileState"]) == (
        "loaded",
        "inactive",
        "disabled",
    )
    assert state["FragmentPath"] == "/lib/systemd/system/nfqfw.service"
    exec_start = gw.box.show(UNIT, "ExecStart", "ExecStartPre")
    assert "path=/usr/bin/nfqfw" in exec_start["ExecStart"] and "/usr/local" not in str(exec_start)
    closed = gw.box.show("nfqfw-closed.service", "FragmentPath", "ExecStart")  # the boot step
    assert closed["FragmentPath"] == "/lib/systemd/system/nfqfw-closed.service"
    assert "path=/usr/bin/nfqfw" in closed["ExecStart"] and "install-closed" in closed["ExecStart"]
    conffiles = gw.in_gw("dpkg-query", "-W", "-f", "${Conffiles}", "nfqfw").stdout
    assert "/etc/nfqfw/policy.yaml" in conffiles
    assert gw.box.run("stat", "-c", "%a %U", "/etc/nfqfw/policy.yaml").stdout.strip() == "600 root"
    for path in (
        "/var/lib/nfqfw",
        "/usr/share/man/man8/nfqfw.8.gz",
        "/usr/share/man/man5/nfqfw-policy.5.gz",
        "/usr/share/bash-completion/completions/nfqfw",
        "/usr/share/doc/nfqfw/README.md",
        "/usr/share/doc/nfqfw/examples/home-gateway.yaml",
        "/usr/share/doc/nfqfw/grafana/nfqfw.json",
    ):
        assert gw.exists(path), path
    man8 = gw.in_gw("man", "nfqfw").stdout
    assert "nfqfw status" in man8 and "EXIT STATUS" in man8
    assert "log-format" in gw.in_gw("man", "5", "nfqfw-policy").stdout
    completion = "source /usr/share/bash-completion/completions/nfqfw; complete -p nfqfw"
    assert gw.box.run("bash", "-c", completion).stdout.strip() == "complete -F _nfqfw nfqfw"

    # -- the operator starts it: it filters in the lab's gateway
    gw.box.run("systemctl", "enable", "--now", UNIT, timeout=60)
    state = gw.state()
    assert (state["ActiveState"], state["UnitFileState"]) == ("active", "enabled"), gw.journal()
    assert "NFQFW-FORWARD" in nfqfw_rules_in_gateway()
    assert f"pid {state['MainPID']}," in gw.box.run("nfqfw", "status").stdout
    check_the_journal(gw)
    sock, greeting = traffic.open_connection(TOPOLOGY.lan, WAN_V4, 80)
    with sock:
        assert greeting == "hello 203.0.113.1" and alive(sock, b"before")

        # -- the operator edits the policy; the upgrade keeps the edit and restarts the daemon
        policy = gw.read("/etc/nfqfw/policy.yaml")
        gw.box.write("/etc/nfqfw/policy.yaml", policy + OPERATOR_EDIT, mode=0o600)
        gw.apt("install", str(packages.second))
        status = gw.in_gw("dpkg-query", "-W", "-f", "${Status} ${Version}", "nfqfw").stdout
        assert status == f"install ok installed {second}"
        assert gw.read("/etc/nfqfw/policy.yaml") == policy + OPERATOR_EDIT
        assert not gw.exists("/etc/nfqfw/policy.yaml.dpkg-dist")
        upgraded = gw.state()
        assert upgraded["ActiveState"] == "active" and upgraded["MainPID"] != state["MainPID"]
        assert alive(sock, b"after the upgrade")  # flows restored from the snapshot

    # -- remove: the service stops, the kernel rules go, traffic passes; configuration and state stay
    gw.apt("remove", "nfqfw")
    assert gw.state()["LoadState"] == "not-found"
    assert nfqfw_rules_in_gateway() == ""
    assert traffic.tcp_probe(TOPOLOGY.lan, WAN_V4, 80, 3.0).outcome == "connected"
    assert not gw.exists("/usr/bin/nfqfw") and not gw.exists("/opt/nfqfw")
    assert gw.read("/etc/nfqfw/policy.yaml") == policy + OPERATOR_EDIT
    assert gw.exists("/var/lib/nfqfw/flows.snapshot")

    # -- purge: configuration and state are gone too
    gw.apt("purge", "nfqfw")
    assert not gw.exists("/etc/nfqfw") and not gw.exists("/var/lib/nfqfw")
    assert gw.in_gw("dpkg-query", "-W", "nfqfw", check=False).returncode != 0


def check_the_journal(gw: Gateway) -> None:
    """Native journal entries with nfqfw's fields: a daemon message, and the packet line of the
    shipped policy's rule no-smb-out (a reject, logged as log-denied is on by default)."""
    started = gw.journal("NFQFW_EVENT=daemon")
    assert any("bound" in entry["MESSAGE"] for entry in started), started
    assert {entry["SYSLOG_IDENTIFIER"] for entry in started} == {"nfqfw"}
    assert traffic.tcp_probe(TOPOLOGY.lan, WAN_V4, 445, 3.0).outcome == "refused"
    deadline = time.monotonic() + 10
    while not (found := gw.journal("NFQFW_RULE=no-smb-out")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert found, gw.journal()
    entry = found[0]
    expected = {
        "NFQFW_EVENT": "flow_verdict",
        "NFQFW_ACTION": "reject",
        "NFQFW_REASON": "rule no-smb-out",
        "NFQFW_SRC": "10.0.0.25",
        "NFQFW_DST": WAN_V4,
        "NFQFW_DPORT": "445",
        "NFQFW_PROTO": "TCP",
        "NFQFW_IN": "lan0",
        "NFQFW_OUT": "wan0",
        "PRIORITY": "6",
        "_SYSTEMD_UNIT": UNIT,
    }
    assert {key: entry.get(key) for key in expected} == expected
    assert entry["MESSAGE"].startswith('nfqfw.packets: [NFQFW REJECT] REASON="rule no-smb-out"')


def test_the_package_declares_what_it_needs(packages: Packages) -> None:
    fields = subprocess.run(
        ["dpkg-deb", "-f", str(packages.first), "Depends", "Package", "Version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    depends = re.search(r"^Depends: (.+)$", fields, re.M)
    assert depends
    names = {part.split()[0] for part in depends.group(1).split(", ")}
    assert {"iptables", "libnetfilter-queue1", "libc6"} <= names
    assert any(re.fullmatch(r"python3\.\d+", name) for name in names)  # the venv's interpreter
