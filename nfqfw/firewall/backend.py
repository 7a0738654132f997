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
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from nfqfw.firewall.marks import DEFAULT_CONN_MARK, DEFAULT_MARK, FORWARDED_MARK, HAIRPIN_MARK, Marks

log = logging.getLogger("nfqfw")


class RulesError(Exception):
    """A rule operation failed; str() is a one-line message for the user."""


# --- flood protections: what the kernel does before the queue --------------------------------
# The match and rule types are structural (Protocols): nfqfw.core.prefilter's KernelMatch and
# KernelRule are passed in as they are, and the firewall package imports nothing of nfqfw.


class MatchLike(Protocol):
    """One rule's matches; None matches anything. Networks as text, port ranges inclusive."""

    @property
    def proto(self) -> int: ...
    @property
    def src(self) -> str | None: ...
    @property
    def dst(self) -> str | None: ...
    @property
    def dports(self) -> tuple[tuple[int, int], ...] | None: ...
    @property
    def sports(self) -> tuple[tuple[int, int], ...] | None: ...
    @property
    def in_iface(self) -> str | None: ...
    @property
    def out_iface(self) -> str | None: ...
    @property
    def src_set(self) -> str | None: ...  # a set of the policy (its ipset, nfqfw.firewall.ipset)
    @property
    def dst_set(self) -> str | None: ...


class SetLike(Protocol):
    """A set of the policy the kernel rules match (the pre-filter's or the nat table's), for one
    family: its networks from the policy."""

    @property
    def name(self) -> str: ...
    @property
    def family(self) -> int: ...
    def cidrs(self) -> Iterable[str]: ...


class PrefilterRuleLike(Protocol):
    @property
    def match(self) -> MatchLike: ...
    @property
    def action(self) -> str: ...  # "return" | "drop" | "reject"
    @property
    def reason(self) -> str: ...  # "rule NAME" | "default ingress": the counters' key
    @property
    def reject_with(self) -> str | None: ...  # tcp-reset | icmp-port-unreachable | icmp-admin-prohibited
    @property
    def log(self) -> bool: ...  # a sample goes to nfqfw's queue, for its packet log


@dataclass(frozen=True)
class Synproxy:
    """One `synproxy: true` rule: the kernel answers SYNs to these with cookies."""

    family: int
    hook: str  # "INPUT" (to the gateway) or "FORWARD"
    matches: tuple[MatchLike, ...]  # TCP, with dst/dports/src/in_iface of the rule
    name: str


@dataclass(frozen=True)
class Antispoof:
    """Reverse-path filtering before conntrack (raw PREROUTING): a packet whose source the
    kernel would not route back out of the interface it came in by (strict; `loose`: would not
    route at all, or is one of the gateway's own addresses) is dropped."""

    loose: bool
    reason: str  # the drop rule's comment, the counters' key: "invalid: spoofed source"
    log: bool  # a sample goes to nfqfw's queue (hook PREROUTING), for its packet log


@dataclass(frozen=True)
class Rate:
    count: int
    period: int  # seconds: 1, 60, 3600 or 86400


@dataclass(frozen=True)
class Protection:
    """The flood protections the rules carry besides the queue (see nfqfw.firewall.iptables).

    prefilter: per (family, hook) the ordered pre-filter rules for first packets of
    `first_protocols` from interfaces not in `internal_ifaces`; `invalid_tcp_flags`: (mask,
    comp) pairs dropped statelessly. new_first: the first queue of the range that packets the
    kernel calls NEW go to (None: the main queue), capped by `new_rate` (all sources) and
    `new_rate_per_source` first. offload_mark: the bit nfqfw's accept verdicts set on packets
    of flows handed to the kernel (None: no offload). synproxy: SYNPROXY for these rules.
    """

    prefilter: tuple[tuple[int, str, tuple[PrefilterRuleLike, ...]], ...] = ()
    first_protocols: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (family, protocol numbers)
    internal_ifaces: tuple[str, ...] = ()
    invalid_tcp_flags: tuple[tuple[int, int], ...] = ()
    new_first: int | None = None
    new_rate: Rate | None = None
    new_rate_per_source: Rate | None = None
    offload_mark: int | None = None
    synproxy: tuple[Synproxy, ...] = ()
    log_limit: Rate = Rate(3, 60)  # samples of kernel drops sent to nfqfw for its packet log
    log_burst: int = 10
    reject_rate: int = 100  # kernel rejects per second (bursts of as many), as nfqfw's --reject-rate
    gateway_errors: bool = False
    antispoof: Antispoof | None = None
    # The sets the pre-filter's rules match (one per set and family), made before the rules
    # (their runtime entries follow through Firewall.set_entry).
    ipsets: tuple[SetLike, ...] = ()

    def prefilter_rules(self, family: int, hook: str) -> tuple[PrefilterRuleLike, ...]:
        for rules_family, rules_hook, rules in self.prefilter:
            if (rules_family, rules_hook) == (family, hook):
                return rules
        return ()

    def protocols(self, family: int) -> tuple[int, ...]:
        return dict(self.first_protocols).get(family, ())

    def synproxy_for(self, family: int) -> tuple[Synproxy, ...]:
        return tuple(rule for rule in self.synproxy if rule.family == family)


# --- NAT: the policy's masquerade, snat and forwards, in the kernel's nat table -----------------


@dataclass(frozen=True)
class SourceNat:
    """One kernel rule of a masquerade (`to` None) or snat entry: one family, one outgoing
    interface, one source (a network, or a set of the policy: its ipset)."""

    family: int
    out_iface: str  # a name, or a prefix ending in '+'
    src: str | None = None  # a network, None: any (unless src_set)
    to: str | None = None  # the address to translate to; None: MASQUERADE
    src_set: str | None = None  # a set of the policy (its ipset, nfqfw.firewall.ipset): the source is in it


@dataclass(frozen=True)
class PortForward:
    """One kernel DNAT rule of a forward: `match` (proto, src, dst: the public address or None for
    the gateway's own addresses on in_iface, dports, in_iface) to `to`:`to_port`. `hairpin`: the
    match is on an inside interface (inside hosts to the public address), whose connections get
    their source translated too."""

    family: int
    name: str
    match: MatchLike
    to: str
    to_port: int | None = None
    hairpin: bool = False


@dataclass(frozen=True)
class Nat:
    """What nfqfw puts in the nat table (see nfqfw.firewall.iptables): its forwards first,
    then hairpin and source NAT. `ipsets`: the sets their `src_set` matches (one per set and
    family), made, filled and kept up to date as the pre-filter's are (QueueSpec.ipsets)."""

    source: tuple[SourceNat, ...] = ()
    forwards: tuple[PortForward, ...] = ()
    forwarded_mark: int = FORWARDED_MARK
    hairpin_mark: int = HAIRPIN_MARK
    ipsets: tuple[SetLike, ...] = ()

    def for_family(self, family: int) -> tuple[tuple[SourceNat, ...], tuple[PortForward, ...]]:
        return (
            tuple(entry for entry in self.source if entry.family == family),
            tuple(forward for forward in self.forwards if forward.family == family),
        )

    @property
    def marks(self) -> int:
        return self.forwarded_mark | self.hairpin_mark


@dataclass(frozen=True)
class QueueSpec:
    """Where the rules send packets, and how they behave while nobody listens."""

    first: int = 0
    last: int = 0  # == first for a single queue, > first for --queue-balance first:last
    bypass: bool = False  # failure-mode open: pass traffic while no daemon is bound
    mark: int = DEFAULT_MARK  # bit(s) set on packets nfqfw accepted, so they skip the queue
    panic: bool = False  # drop everything but loopback in the kernel, queue nothing
    protection: Protection | None = None  # flood protections before the queue (None: none)
    conn_mark: int = DEFAULT_CONN_MARK  # nfqfw's connection-mark bits (nfqfw.firewall.marks)
    # --workers: each queue's worker marks the connections it accepts as its own (the owner
    # field), and RELATED packets (ICMP errors) go to their connection's owner's queue.
    owners: bool = False
    nat: Nat | None = None  # the policy's nat section (None: nfqfw has nothing in the nat table)

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.last <= 0xFFFF:
            raise ValueError(f"bad queue range {self.first}:{self.last}")
        marks = Marks(self.mark, self.conn_mark)  # ValueError for bad or overlapping bits
        new = self.new_queues
        if new and (new[-1] > 0xFFFF or set(new) & set(self.queues)):
            raise ValueError(f"bad queue range for first packets {new[0]}:{new[-1]}")
        offload = None if self.protection is None else self.protection.offload_mark
        if offload is not None and (not 0 < offload <= 0xFFFFFFFF or offload & self.mark):
            raise ValueError(f"bad offload mark 0x{offload:x} (must not share a bit with 0x{self.mark:x})")
        if self.owners and len(self.queues) > marks.max_owners:
            raise ValueError(
                f"{len(self.queues)} queues, but the connection mark 0x{self.conn_mark:x} tells at most "
                f"{marks.max_owners} owners apart"
            )
        if self.nat is not None and self.nat.marks & (self.mark | self.conn_mark | (offload or 0)):
            raise ValueError(
                f"the nat marks 0x{self.nat.marks:x} share a bit with the accept mark 0x{self.mark:x}"
                f" or the connection mark 0x{self.conn_mark:x}"
            )

    @property
    def marks(self) -> Marks:
        return Marks(self.mark, self.conn_mark)

    @property
    def queues(self) -> range:
        return range(self.first, self.last + 1)

    @property
    def new_queues(self) -> range:
        """The queues first packets go to (empty when they share the main queues)."""
        first = None if self.protection is None else self.protection.new_first
        return range(0) if first is None else range(first, first + self.last - self.first + 1)

    @property
    def bound_queues(self) -> tuple[int, ...]:
        """Every queue a daemon serving this spec must bind."""
        return (*self.queues, *self.new_queues)

    @property
    def queue_text(self) -> str:
        """The queue (N) or queue range (A:B) as the user wrote it."""
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"

    @property
    def ipsets(self) -> tuple[SetLike, ...]:
        """Every set the rules match in the kernel, the pre-filter's and the nat table's, once
        per set and family: what the backend makes and fills before the rules, and what the
        runtime entries (Firewall.set_entry) go to."""
        found: dict[tuple[str, int], SetLike] = {}
        for used in (self.protection, self.nat):
            for ipset in () if used is None else used.ipsets:
                found.setdefault((ipset.name, ipset.family), ipset)
        return tuple(found.values())

    def matches_set(self, name: str, family: int) -> bool:
        """Do the kernel rules hold set `name`'s `family` members (an ipset)?"""
        return any((ipset.name, ipset.family) == (name, family) for ipset in self.ipsets)


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
    def installed(self) -> bool:
        """Is any rule or chain of ours in place, for any family?"""

    @abstractmethod
    def remove(self) -> list[int]:
        """Remove our rules for good; returns the families (4, 6) that had something to remove."""

    @abstractmethod
    def show(self) -> str:
        """Our rules as the kernel holds them, per family, for `nfqfw rules show`."""

    def ipv6_nat_missing(self) -> str | None:
        """What the kernel lacks for IPv6 NAT, or None when it has it (or this cannot be told:
        the installation then reports it)."""
        return None

    @abstractmethod
    def counters(self) -> dict[str, int]:
        """Packets our kernel rules dropped or rejected before the queue, both families summed,
        by "ACTION REASON" as nfqfw's verdict counters name them (e.g. "drop default ingress",
        "drop invalid: tcp flags", "drop new-rate per source")."""

    def supports_sets(self) -> bool:
        """Can this backend match the policy's sets in the kernel (QueueSpec.ipsets)?"""
        return False

    def sets_missing(self) -> str | None:
        """Why this backend cannot match the policy's sets in the kernel; None when it can."""
        return None if self.supports_sets() else f"the {self.name} backend keeps no sets in the kernel"

    def set_entry(self, name: str, family: int, cidr: str, add: bool, timeout: float | None = None) -> None:
        """A runtime entry of set `name` added to (or deleted from) its kernel set; RulesError."""
        raise RulesError(f"the {self.name} backend keeps no sets in the kernel")

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
