"""A private systemd as PID 1, to run the shipped unit for real in tests (a "systemd box").

The machine the tests run on may have no systemd as PID 1 (containers, CI). The box gives the
unit its real manager: `/lib/systemd/systemd` booted as PID 1 of a new PID, mount and cgroup
namespace, with the host kept out of reach:

- /etc, /opt, /usr, /var, /tmp and /root are overlays whose changes land in the box's
  directory (under /dev/shm): `make install` run in the box (and pip's cache), a service's
  state and its PrivateTmp directories go there, never to the host's files;
- /run is a fresh tmpfs (the manager's sockets, the unit's RuntimeDirectory) with the host's
  /run/netns carried over, so a drop-in's NetworkNamespacePath= can put the service into a
  lab namespace: its kernel rules and packets stay in the lab;
- the manager's cgroup tree is a sub-group of each hierarchy (`nfqfw-box-<pid>`), removed at
  the end; it boots `nfqfw-box.target`, which pulls in nothing, and it knows only the units
  written into the box (SYSTEMD_UNIT_PATH): the host's units, among them sysinit.target's
  (tmpfiles would empty /tmp, journald would claim /dev/log, udev and sysctl act on the
  shared /sys and network settings), do not exist there. A unit run in the box needs
  DefaultDependencies=no (a drop-in), as sysinit.target is not there.

`Box.run(...)` runs a command inside (nsenter into its mount and PID namespaces), e.g.
`systemctl start nfqfw`. Leaving the `with` block kills the box's PID 1, which ends every
process in it; the namespaces and overlays go with them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

SYSTEMD = "/lib/systemd/systemd"
CGROUP_ROOT = Path("/sys/fs/cgroup")
OVERLAID = ("etc", "opt", "usr", "var", "tmp", "root")
WORK_DIR = "/dev/shm"  # the box's directory: under none of the overlaid ones
TARGET = "nfqfw-box.target"
JOURNAL_UNIT = "nfqfw-box-journald.service"  # Box.start_journal()
BOX_UNITS = "/etc/systemd/system"  # a tmpfs in the box: only the units written there
PACKAGE_UNITS = "/lib/systemd/system"  # where a package's units go (the host's are there too)
BOOT_TIMEOUT = 30.0
CHECKOUT = Path(__file__).resolve().parents[2]  # the source tree, seen at the same path in the box


class BoxError(Exception):
    """The box could not be booted; str() says why and where its log is."""


# Runs as PID 1 of the new namespaces until it execs the manager; $1 is the box's directory,
# $2 the name of its cgroups, $3 the manager's unit path, $4 the checkout the tests install
# from (carried over like /run/netns when it lies under /run, which the box replaces).
# `set -e`: any failure ends the boot (the caller sees it). The manager logs nowhere (it would
# write to the host's console or kernel log); a unit's output goes where its drop-in says.
BOOT_SCRIPT = r"""
set -euo pipefail
box=$1 group=$2 unit_path=$3 checkout=$4
mount -t proc proc /proc
for dir in {overlaid}; do
    mkdir -p "$box/upper/$dir" "$box/work/$dir"
    mount -t overlay overlay -o "lowerdir=/$dir,upperdir=$box/upper/$dir,workdir=$box/work/$dir" "/$dir"
done
mkdir -p "$box/netns"
mount --rbind /run/netns "$box/netns"
case $checkout in /run/*) mkdir -p "$box/checkout"; mount --rbind "$checkout" "$box/checkout" ;; esac
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/netns
mount --move "$box/netns" /run/netns
case $checkout in /run/*) mkdir -p "$checkout"; mount --move "$box/checkout" "$checkout" ;; esac
mount -t tmpfs -o mode=0755 tmpfs /etc/systemd/system
printf '[Unit]\nDescription=nfqfw test box\nDefaultDependencies=no\n' > /etc/systemd/system/{target}
for hierarchy in /sys/fs/cgroup/*/; do
    case $hierarchy in
        */systemd/|*/unified/) mkdir -p "$hierarchy$group" ;;  # the manager's own: required
        *) mkdir -p "$hierarchy$group" 2>/dev/null || continue ;;  # controllers: where writable
    esac
    if [ -e "$hierarchy$group/cpuset.cpus" ]; then
        cat "${{hierarchy}}cpuset.cpus" > "$hierarchy$group/cpuset.cpus"
        cat "${{hierarchy}}cpuset.mems" > "$hierarchy$group/cpuset.mems"
    fi
    echo $$ > "$hierarchy$group/cgroup.procs"
done
export container=nfqfw-box
# By default only the units put into the box exist: no sysinit.target, so nothing that would act
# on the host's shared /dev, /sys or network settings (udev, sysctl, journald, tmpfiles) can start.
export SYSTEMD_UNIT_PATH=$unit_path
exec unshare --cgroup {systemd} --unit={target} --show-status=no --log-target=null
""".format(overlaid=" ".join(OVERLAID), target=TARGET, systemd=SYSTEMD)


class Box:
    def __init__(self, directory: Path, process: subprocess.Popen[bytes], group: str) -> None:
        self.directory = directory
        self.process = process  # `unshare`, whose child is the box's PID 1
        self.group = group
        self.log = directory / "boot.log"

    @property
    def init_pid(self) -> int:
        """The box's PID 1, as the host sees it."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        if not children:
            raise BoxError(f"the box's PID 1 is gone; see {self.log}")
        return int(children[0])

    def argv(self, *argv: str) -> list[str]:
        return ["nsenter", "-t", str(self.init_pid), "--mount", "--pid", "--", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a command inside the box (its files, its /run, its systemd)."""
        done = subprocess.run(self.argv(*argv), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise BoxError(f"{' '.join(argv)} in the box: exit {done.returncode}: {done.stderr.strip()}")
        return done

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside the box (through its overlays)."""
        done = subprocess.run(
            self.argv(
                "sh",
                "-c",
                'umask 077; mkdir -p "$(dirname "$1")"; cat > "$1"; chmod "$2" "$1"',
                "-",
                path,
                f"{mode:o}",
            ),
            input=text,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise BoxError(f"writing {path} in the box: {done.stderr.strip()}")

    def start_journal(self) -> None:
        """journald in the box, for units that log to the journal: its sockets and files are in
        the box's /run; no /dev/log link (that is the socket unit's, not started here) and no
        kernel messages. A unit that logs there needs After=JOURNAL_UNIT."""
        self.write("/etc/systemd/journald.conf.d/box.conf", "[Journal]\nStorage=volatile\nReadKMsg=no\n")
        self.write(
            f"/etc/systemd/system/{JOURNAL_UNIT}",
            "[Unit]\nDefaultDependencies=no\n[Service]\nType=notify\nExecStart=/lib/systemd/systemd-journald\n",
        )
        self.run("systemctl", "daemon-reload")
        self.run("systemctl", "start", JOURNAL_UNIT, timeout=60)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """`systemctl show` of a unit, as a dict."""
        out = self.run("systemctl", "show", unit, "-p", ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@contextmanager
def booted(work: str = WORK_DIR, unit_path: Sequence[str] = (BOX_UNITS,)) -> Iterator[Box]:
    """Boot a box (see the module's docstring) and take it down again, whatever happens.
    `unit_path`: where the manager finds units; a test of the Debian package adds
    PACKAGE_UNITS, where the host's units are too (none of them is started: nothing pulls
    them in, and the host's enablement links are hidden under the box's own /etc/systemd/system)."""
    if not Path(SYSTEMD).exists():
        raise BoxError(f"{SYSTEMD} not found: install the systemd package")
    directory = Path(tempfile.mkdtemp(prefix="nfqfw-box-", dir=work))
    group = f"nfqfw-box-{os.getpid()}-{directory.name[-8:]}"
    log = open(directory / "boot.log", "wb")  # noqa: SIM115 (kept open while the box runs)
    process = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
            BOOT_SCRIPT,
            "nfqfw-box",
            str(directory),
            group,
            ":".join(unit_path),
            str(CHECKOUT),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    box = Box(directory, process, group)
    try:
        _wait_running(box)
        yield box
    finally:
        process.kill()
        process.wait(timeout=30)
        log.close()
        _remove_cgroups(group)
        shutil.rmtree(directory, ignore_errors=True)


def _wait_running(box: Box) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    state = ""
    while time.monotonic() < deadline:
        if box.process.poll() is not None:
            raise BoxError(f"the box did not boot: {box.log.read_text(errors='replace')[-2000:]}")
        try:
            state = box.run("systemctl", "is-system-running", check=False, timeout=10).stdout.strip()
        except (BoxError, FileNotFoundError, subprocess.TimeoutExpired):
            state = "starting"
        if state in ("running", "degraded"):
            return
        time.sleep(0.2)
    raise BoxError(f"the box's systemd is {state!r} after {BOOT_TIMEOUT:g} s; see {box.log}")


def _remove_cgroups(group: str) -> None:
    """The box's cgroups, deepest first (empty once its processes are gone)."""
    for hierarchy in CGROUP_ROOT.iterdir():
        top = hierarchy / group
        if not top.is_dir():
            continue
        for _ in range(50):  # the killed processes leave their cgroups a moment later
            dirs: Sequence[Path] = sorted(
                (p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
            )
            try:
                for path in (*dirs, top):
                    path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
