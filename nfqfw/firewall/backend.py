"""The firewall backend interface: what nfqfw asks of the kernel's rule tables.

nfqfw's kernel rules send packets to its queue(s), carry the failure mode (the queue bypass)
and panic mode (DROP instead of the queue). `QueueSpec` says what is wanted; a `Firewall`
backend makes the kernel's tables say it, atomically per family, touching nothing but its
own chains and the jumps to them. The service, the commands and the lab never run a rule tool
themselves: they hold a Firewall (nfqfw.firewall.backend_named) and call it.

Invariants every backend keeps:
- `install` is idempotent and atomic per family: re-installing with another spec never leaves
  duplicate jumps nor a moment without the jump to our chains.
- Rules stay after the daemon stops (fail-closed); only `remove` takes them away.
- `panic_installed` reads panic mode back from the kernel, so a restart keeps it.
- Errors are RulesError with a one-line message for the user.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

log = logging.getLogger("nfqfw")

DEFAULT_MARK = 0x10000000


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

    @property
    def queue_text(self) -> str:
        """The queue (N) or queue range (A:B) as the user wrote it."""
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"


class Firewall(ABC):
    """One way of putting nfqfw's rules into the kernel (iptables today; nftables could follow).

    Rendering is pure and lives beside each backend, unit-tested on exact text; the methods
    here run the tools. The shared policies (keep panic across restarts, log-and-keep on a
    failed change) are written once, here, over the primitives.
    """

    name: str

    @abstractmethod
    def check(self) -> None:
        """Raise RulesError naming what this backend needs and the machine lacks."""

    @abstractmethod
    def install(self, spec: QueueSpec) -> None:
        """Install (or re-install) our rules for `spec`, one atomic transaction per family."""

    @abstractmethod
    def panic_installed(self) -> bool:
        """Are panic mode's DROP rules in place (left by an earlier run) for any family?"""

    @abstractmethod
    def remove(self) -> list[int]:
        """Remove our rules for good; returns the families (4, 6) that had something to remove."""

    @abstractmethod
    def show(self) -> str:
        """Our rules as the kernel holds them, per family, for `nfqfw rules show`."""

    def install_keeping_panic(self, spec: QueueSpec) -> QueueSpec:
        """install(spec), but panic mode left on by an earlier run stays on (a restart must not
        reopen the gateway); returns the spec installed. Raises RulesError."""
        if self.panic_installed():
            spec = replace(spec, panic=True)
            log.warning("panic mode is on (kept from before): everything but loopback is dropped")
        self.install(spec)
        return spec

    def reinstall(self, spec: QueueSpec, failed: str) -> bool:
        """install(spec) for a running daemon (panic, failure mode): on failure the error is
        logged as `failed: why` and False returned; the rules in place stay as they were."""
        try:
            self.install(spec)
        except RulesError as err:
            log.error("%s: %s", failed, err)
            return False
        return True
