"""nfqfw's kernel rules: the iptables/ip6tables rules that send packets to our queue.

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
from dataclasses import dataclass, replace

log = logging.getLogger("nfqfw")

DEFAULT_MARK = 0x10000000
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


class RulesError(Exception):
    """A rule operation failed; str() is a one-line message for the user."""


@dataclass(frozen=True)
class QueueSpec:
    """Where the rules send packets, and how they behave while nobody listens."""

    first: int = 0
    last: int = 0  # == first for a single queue, > first for --queue-balance first:last
    bypass: bool = False  # failure-mode open: pass traffic while no daemon is bound
    mark: int = DEFAULT_MARK  # bit(s) set on packets nfqfw accepted, so they skip the queue
    panic: bool = False  # drop everything but loopback in the kernel, queue nothing

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.last <= 0xFFFF:
            raise ValueError(f"bad queue range {self.first}:{self.last}")
        if not 0 < self.mark <= 0xFFFFFFFF:
            raise ValueError(f"bad mark 0x{self.mark:x}")

    @property
    def queues(self) -> range:
        return range(self.first, self.last + 1)

    def target(self) -> str:
        if self.first == self.last:
            where = f"--queue-num {self.first}"
        else:
            where = f"--queue-balance {self.first}:{self.last}"
        return f"NFQUEUE {where}" + (" --queue-bypass" if self.bypass else "")


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


def render_install(spec: QueueSpec, installed: Installed) -> str:
    """iptables-restore --noflush input installing our rules (same text for both families)."""
    match_unmarked = f"-m mark ! --mark 0x{spec.mark:x}/0x{spec.mark:x}"
    verdict = f"-j {PANIC_TARGET}" if spec.panic else f"{match_unmarked} -j {spec.target()}"
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


def check_tools(families: Iterable[Tools] = FAMILIES) -> None:
    """Raise RulesError naming the first missing iptables tool."""
    for tools in families:
        for tool in (tools.save, tools.restore):
            if shutil.which(tool) is None:
                raise RulesError(f"{tool} not found: install iptables (with the nf_tables or legacy backend)")


def read_installed(tools: Tools, run: Runner = subprocess.run) -> Installed:
    return parse_save(_run(run, [tools.save, "-t", TABLE], None))


def install(spec: QueueSpec, families: Iterable[Tools] = FAMILIES, run: Runner = subprocess.run) -> None:
    """Install (or re-install) our rules for every family, one atomic transaction each."""
    for tools in families:
        text = render_install(spec, read_installed(tools, run))
        _run(run, [tools.restore, "-w", "--noflush"], text)


def reinstall(spec: QueueSpec, failed: str) -> bool:
    """install(spec) for a running daemon (panic, failure mode): on failure the error is logged
    as `failed: why` and False returned, the rules in place stay as they were."""
    try:
        install(spec)
    except RulesError as err:
        log.error("%s: %s", failed, err)
        return False
    return True


def install_keeping_panic(spec: QueueSpec) -> QueueSpec:
    """install(spec), but panic mode left on by an earlier run stays on (a restart must not
    reopen the gateway); returns the spec installed. Raises RulesError."""
    if panic_installed():
        spec = replace(spec, panic=True)
        log.warning("panic mode is on (kept from before): everything but loopback is dropped")
    install(spec)
    return spec


def panic_installed(families: Iterable[Tools] = FAMILIES, run: Runner = subprocess.run) -> bool:
    """Are panic mode's DROP rules in place (left by an earlier run) for any family?"""
    return any(read_installed(tools, run).panic for tools in families)


def remove(families: Iterable[Tools] = FAMILIES, run: Runner = subprocess.run) -> list[int]:
    """Remove our chains and jumps for good; returns the families that had something to remove."""
    removed = []
    for tools in families:
        text = render_remove(read_installed(tools, run))
        if text is not None:
            _run(run, [tools.restore, "-w", "--noflush"], text)
            removed.append(tools.family)
    return removed


def show(families: Iterable[Tools] = FAMILIES, run: Runner = subprocess.run) -> str:
    """Our rules as iptables-save prints them, per family."""
    out = []
    for tools in families:
        installed = read_installed(tools, run)
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
