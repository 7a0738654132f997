"""`check`, `explain`, `replay` and `--help` work where the daemon's libraries cannot be imported
(no NetfilterQueue C binding, no pyroute2, no prometheus_client): a policy can be checked in a
CI job or on a laptop with `pip install nfqfw` alone, and `nfqfw run` says what is missing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from scapy.all import IP, TCP, Ether, wrpcap

REPO = Path(__file__).resolve().parents[3]
POLICY = REPO / "config" / "policy.yaml"
DAEMON_ONLY = ("netfilterqueue", "pyroute2", "prometheus_client")

# Runs the CLI with an import hook that refuses the daemon's libraries, as on a machine where
# they are not installed; prints the exit code last.
RUNNER = textwrap.dedent(
    """
    import sys
    BLOCKED = {blocked!r}

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
    from nfqfw.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as exit_:
        code = exit_.code
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    print(f"exit={{code}} loaded={{loaded}}")
    """
).format(blocked=DAEMON_ONLY)


def nfqfw(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RUNNER, *argv], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_the_blocker_really_blocks() -> None:
    done = subprocess.run(
        [sys.executable, "-c", RUNNER.replace("from nfqfw.cli import main", "import netfilterqueue")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ModuleNotFoundError: No module named 'netfilterqueue'" in done.stderr


def test_check_without_the_daemon_libraries() -> None:
    done = nfqfw("check", str(POLICY))
    assert done.stdout.splitlines()[-1] == "exit=0 loaded=[]"
    assert done.stdout.splitlines()[0].startswith(f"{POLICY}: OK (zones: 2, ingress rules: 3")


def test_explain_without_the_daemon_libraries() -> None:
    done = nfqfw(
        "explain", "--config", str(POLICY), "--in", "wan0", "tcp", "198.51.100.7:50000", "10.0.0.25:25"
    )
    assert done.stdout.splitlines() == [
        "zones: external -> internal (ingress)",
        "verdict: accept",
        "conntrack: new",
        "decided by: rule mail",
        "why: rule mail",
        f"rule: mail ({POLICY}:59): accept tcp to 10.0.0.25/32, fd00::25/128 ports 25 (smtp), "
        "587 (submission)",
        "exit=0 loaded=[]",
    ]


def test_replay_without_the_daemon_libraries(tmp_path: Path) -> None:
    capture = tmp_path / "smtp.pcap"
    frame = Ether() / IP(src="198.51.100.7", dst="10.0.0.25") / TCP(sport=50000, dport=25, flags="S")
    frame.time = 10.0
    wrpcap(str(capture), [frame])
    done = nfqfw("replay", "--config", str(POLICY), "--iface", "wan0", str(capture))
    assert done.stdout.splitlines()[-1] == "exit=0 loaded=[]"
    assert '"rule": "mail"' in done.stdout.splitlines()[0]


@pytest.mark.parametrize("argv", [("--help",), ("run", "--help"), ("lab", "--help"), ("status", "--help")])
def test_help_without_the_daemon_libraries(argv: tuple[str, ...]) -> None:
    done = nfqfw(*argv)
    assert done.stdout.splitlines()[-1] == "exit=0 loaded=[]"
    assert done.stdout.startswith("usage: nfqfw")


def test_run_says_which_extra_is_missing(tmp_path: Path) -> None:
    done = nfqfw("run", "--config", str(POLICY))
    assert done.stdout.splitlines()[-1] == "exit=1 loaded=[]"
    missing = done.stderr.splitlines()[-1].removeprefix("nfqfw run: ").split(" ")[0]
    assert missing in DAEMON_ONLY
    assert (
        done.stderr.splitlines()[-1] == f"nfqfw run: {missing} is not installed: pip install 'nfqfw[daemon]'"
    )
