"""Vocabulary shared by the core and its adapters: hooks, actions, conntrack states, verdicts."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import NamedTuple


class Hook(IntEnum):
    """Netfilter hook a packet was queued from (numbers as the kernel's NF_INET_*)."""

    PREROUTING = 0  # only samples of the kernel's antispoof drops are queued from there (raw table)
    INPUT = 1  # to the gateway itself
    FORWARD = 2  # through the gateway
    OUTPUT = 3  # from the gateway itself


class Action(StrEnum):
    ACCEPT = "accept"
    DROP = "drop"
    REJECT = "reject"


class Ct(StrEnum):
    """Conntrack state of a packet, as iptables' `-m conntrack --ctstate` names it."""

    NEW = "new"
    ESTABLISHED = "established"
    RELATED = "related"
    INVALID = "invalid"
    UNTRACKED = "untracked"


class Direction(IntEnum):
    ORIGINAL = 0
    REPLY = 1


@dataclass(frozen=True, slots=True)
class Meta:
    """What the kernel tells about a packet besides its bytes. `forwarded`: one of the policy's
    forwards translated it (the kernel's mark on the first packet of a connection it DNATed)."""

    hook: Hook
    in_iface: str | None = None
    out_iface: str | None = None
    # options {offload: established}: the kernel's conntrack called the packet INVALID (the
    # kernel rules mark such packets before the queue); consulted for offloaded flows only.
    kernel_invalid: bool = False
    forwarded: bool = False  # translated by one of the policy's forwards (a nat mark)


class RuleDecision(NamedTuple):
    """What the policy decided about a first packet."""

    action: Action
    rule: str | None  # None for the side's default
    log: bool
    reason: str  # "rule NAME", "forward NAME" or "default SIDE"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The engine's answer: what to do, and why (every drop must be explainable)."""

    action: Action
    ct: Ct
    rule: str | None  # the policy rule that decided, None for a default or a state decision
    reason: str  # e.g. "established", "rule mail", "default ingress", "invalid: tcp flags SYN+FIN"
    log: bool = False
    reject_with: str | None = None  # "tcp-reset" | "icmp-port-unreachable" | "icmp-admin-prohibited"
    # options {offload: established}: hand the flow over to the kernel's conntrack (the adapter
    # sets the offload mark bit); set on an accepted packet of an offloadable flow (Engine).
    offload: bool = False
