"""The iptables backend: nfqfw's rules as iptables/ip6tables chains, installed with iptables-restore.

Layout (filter table, the same for IPv4 and IPv6)::

    INPUT    rule 1: -j NFQFW-INPUT        NFQFW-INPUT:   -i lo -j RETURN
    FORWARD  rule 1: -j NFQFW-FORWARD                     -m mark ! --mark M/M -j NFQUEUE ...
    OUTPUT   rule 1: -j NFQFW-OUTPUT       NFQFW-FORWARD: -m mark ! --mark M/M -j NFQUEUE ...
                                           NFQFW-OUTPUT:  -o lo -j RETURN
                                                          -m mark ! --mark M/M -j NFQUEUE ...

Coexistence with the host's other rules (Docker, an admin's own): nfqfw touches nothing but its
three chains and the jumps to them. The jumps sit at position 1 so every packet meets the
policy first. A packet the policy accepts is not accepted outright (NF_ACCEPT would end the
hook and skip every rule after ours): the adapter sets the mark bit M on it and answers
NF_REPEAT, so the kernel runs the filter hook again from the top; this time our queue rule
does not match (the bit is set), our chain returns, and the host's later rules decide as if
nfqfw were not there. Dropped and rejected packets never reach them. The bit stays on the
packet (pick another with --mark if the host uses 0x10000000 for policy routing or the like),
and packets nfqfw sends itself (RSTs, ICMP errors) carry it too, so they skip the queue.
Anything that could set the bit before us (a process with CAP_NET_ADMIN using SO_MARK, a mangle
rule) bypasses the policy: that is the host administrator's call.

Installing is one atomic ``iptables-restore --noflush`` transaction per family: it declares the
three chains (which empties them if they exist), fills them, deletes every existing jump to them
and inserts one jump at position 1 in each base chain, so re-installing after a restart or with
another queue/mode never leaves duplicates and never has a moment without the jump.

Fail-closed: without ``--queue-bypass`` the kernel drops queued packets while no process is
bound to the queue (during a restart, after a crash). A normal stop leaves the rules in place
and removes nothing, so traffic stays blocked until nfqfw is back; with the policy option
``failure-mode: open`` the rules carry ``--queue-bypass`` and traffic passes (unfiltered) while
nfqfw is down. Only ``nfqfw rules remove`` takes the rules away, for good.

Panic mode (``nfqfw panic on``) replaces the queue rule of each chain by ``-j DROP``, after the
loopback exclusion: everything but loopback is dropped in the kernel, without a packet reaching
the queue, so it holds under a flood that keeps the daemon busy and while no daemon runs. The
panic is kept in the kernel rules only: a restarted daemon finds the DROP rules (``panic_installed``)
and keeps them, so a crash or ``systemctl restart`` never reopens a gateway in panic; a reboot,
``nfqfw panic off`` and ``nfqfw rules remove`` end it.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nfqfw.firewall.backend import Firewall, QueueSpec, RulesError

log = logging.getLogger("nfqfw")

TABLE = "filter"

# Base chain -> our chain. Loopback is excluded where it can occur (INPUT -i lo, OUTPUT -o lo).
CHAINS = {"INPUT": "NFQFW-INPUT", "FORWARD": "NFQFW-FORWARD", "OUTPUT": "NFQFW-OUTPUT"}
_LOOPBACK_EXCLUSION = {"INPUT": "-i lo -j RETURN", "OUTPUT": "-o lo -j RETURN"}
OUR_CHAINS = frozenset(CHAINS.values())
PANIC_TARGET = "DROP"
_PANIC_LINES = frozenset(f"-A {chain} -j {PANIC_TARGET}" for chain in CHAINS.values())


@dataclass(frozen=True)
class Tools:
    family: int
    save: str
    restore: str


FAMILIES = (Tools(4, "iptables-save", "iptables-restore"), Tools(6, "ip6tables-save", "ip6tables-restore"))


@dataclass(frozen=True)
class Installed:
    """What of ours is in a family's filter table (read from iptables-save)."""

    chains: frozenset[str]  # our chains that exist
    jumps: tuple[str, ...]  # rules elsewhere that jump to our chains, as "CHAIN rule-spec"
    lines: tuple[str, ...]  # every line of ours, as iptables-save prints it

    @property
    def empty(self) -> bool:
        return not self.chains and not self.jumps

    @property
    def panic(self) -> bool:
        """Our chains hold panic mode's DROP rules (nothing else of ours drops)."""
        return any(line in self.lines for line in _PANIC_LINES)


# --- pure: parsing and rendering --------------------------------------------------------------


def parse_save(text: str) -> Installed:
    """Find our chains, their rules and the jumps to them in `iptables-save -t filter` output."""
    chains: set[str] = set()
    jumps: list[str] = []
    lines: list[str] = []
    in_filter = False
    for line in text.splitlines():
        if line.startswith("*"):
            in_filter = line == "*" + TABLE
        if not in_filter:
            continue
        if line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name in OUR_CHAINS:
                chains.add(name)
                lines.append(line)
        elif line.startswith("-A "):
            words = shlex.split(line)
            if len(words) < 2:
                continue
            if words[1] in OUR_CHAINS:
                lines.append(line)
            elif _target(words) in OUR_CHAINS:
                jumps.append(line[3:])
                lines.append(line)
    return Installed(frozenset(chains), tuple(jumps), tuple(lines))


def _target(words: list[str]) -> str | None:
    for option in ("-j", "--jump", "-g", "--goto"):
        if option in words:
            index = words.index(option)
            if index + 1 < len(words):
                return words[index + 1]
    return None


def queue_target(spec: QueueSpec) -> str:
    """The NFQUEUE target for `spec`: one queue or a balanced range, with the failure mode."""
    if spec.first == spec.last:
        where = f"--queue-num {spec.first}"
    else:
        where = f"--queue-balance {spec.first}:{spec.last}"
    return f"NFQUEUE {where}" + (" --queue-bypass" if spec.bypass else "")


def render_install(spec: QueueSpec, installed: Installed) -> str:
    """iptables-restore --noflush input installing our rules (same text for both families)."""
    match_unmarked = f"-m mark ! --mark 0x{spec.mark:x}/0x{spec.mark:x}"
    verdict = f"-j {PANIC_TARGET}" if spec.panic else f"{match_unmarked} -j {queue_target(spec)}"
    lines = ["*" + TABLE]
    lines += [f":{chain} - [0:0]" for chain in CHAINS.values()]
    for base, chain in CHAINS.items():
        if base in _LOOPBACK_EXCLUSION:
            lines.append(f"-A {chain} {_LOOPBACK_EXCLUSION[base]}")
        lines.append(f"-A {chain} {verdict}")
    lines += [f"-D {jump}" for jump in installed.jumps]
    lines += [f"-I {base} 1 -j {chain}" for base, chain in CHAINS.items()]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_remove(installed: Installed) -> str | None:
    """iptables-restore --noflush input removing every trace of us; None if nothing is there."""
    if installed.empty:
        return None
    lines = ["*" + TABLE]
    lines += [f"-D {jump}" for jump in installed.jumps]
    present = [chain for chain in CHAINS.values() if chain in installed.chains]
    lines += [f"-F {chain}" for chain in present]  # rules first: a chain must be empty to go
    lines += [f"-X {chain}" for chain in present]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# --- running the tools ------------------------------------------------------------------------

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


class Iptables(Firewall):
    """The Firewall backend over iptables-save/iptables-restore (and the ip6tables pair).

    `families` and `run` are injectable so that tests drive it with fake tools.
    """

    name = "iptables"

    def __init__(self, families: Iterable[Tools] = FAMILIES, run: Runner = subprocess.run) -> None:
        self.families = tuple(families)
        self._run = run

    def check(self) -> None:
        for tools in self.families:
            for tool in (tools.save, tools.restore):
                if shutil.which(tool) is None:
                    raise RulesError(
                        f"{tool} not found: install iptables (with the nf_tables or legacy backend)"
                    )

    def read_installed(self, tools: Tools) -> Installed:
        return parse_save(_run(self._run, [tools.save, "-t", TABLE], None))

    def install(self, spec: QueueSpec) -> None:
        for tools in self.families:
            text = render_install(spec, self.read_installed(tools))
            _run(self._run, [tools.restore, "-w", "--noflush"], text)

    def panic_installed(self) -> bool:
        return any(self.read_installed(tools).panic for tools in self.families)

    def remove(self) -> list[int]:
        removed = []
        for tools in self.families:
            text = render_remove(self.read_installed(tools))
            if text is not None:
                _run(self._run, [tools.restore, "-w", "--noflush"], text)
                removed.append(tools.family)
        return removed

    def show(self) -> str:
        out = []
        for tools in self.families:
            installed = self.read_installed(tools)
            out.append(f"# IPv{tools.family} ({tools.save} -t {TABLE})")
            out += list(installed.lines) if installed.lines else ["# (no nfqfw rules)"]
        return "\n".join(out) + "\n"


def _run(run: Runner, argv: list[str], text: str | None) -> str:
    try:
        done = run(argv, input=text, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise RulesError(f"{argv[0]} not found: install iptables") from err
    if done.returncode != 0:
        detail = " / ".join(line.strip() for line in done.stderr.splitlines() if line.strip())
        if "NFQUEUE" in detail and ("load target" in detail or "No such file" in detail):
            detail = "the kernel lacks the NFQUEUE target (module xt_NFQUEUE): " + detail
        raise RulesError(f"{argv[0]} failed (exit {done.returncode}): {detail or 'no message'}")
    return done.stdout
