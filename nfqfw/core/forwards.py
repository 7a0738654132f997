"""The policy's port forwards, compiled: which forward translated a packet, and what it decides.

The kernel translates (nat PREROUTING, rendered by the firewall backend) before nfqfw decides at
FORWARD, and marks the first packet of each connection one of nfqfw's forwards translated; the
NFQUEUE adapter turns the mark into `Meta.forwarded`. So the live packet is already the inside
one (destination `to`, port `to-port`): `translated()` finds its forward by the translated
destination, port, protocol, source and arriving interface. The offline tools see the packet as
it arrived (destination the public address): `public()` finds the forward that will translate
it, and nfqfw.core.nat rewrites it as the kernel would.

Both lookups are a `RuleIndex` (nfqfw.core.classify) over one synthesised rule per forward:
first match in policy order, as the kernel's DNAT rules (one per forward, in order). A forward
with `hairpin` also takes packets arriving on the inside interfaces (the inside hosts that
connect to the public address). The sets a forward's `from` names are the policy's: their
networks compiled in, their runtime entries consulted after `refresh_runtime` (as the kernel's
DNAT rules follow the sets' ipsets).

A forward that `passes` admits what it translates: its decision is an accept counted and logged
under its name ("forward NAME"); one with `pass: false` only translates, the side's rules decide
on the translated packet.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence

from nfqfw.core.classify import RuleIndex
from nfqfw.core.config import AddressSet, ForwardConfig, RuleConfig
from nfqfw.core.packet import Packet
from nfqfw.core.sets import RuntimeEntries, SetContent
from nfqfw.core.verdict import Action, RuleDecision

FORWARD_REASON = "forward "  # + the forward's name: the reason of its accepts


class Forward:
    """One compiled forward: its config, the decision of its implied accept, its target."""

    __slots__ = ("config", "decision", "name", "passes", "to", "to_port")

    def __init__(self, config: ForwardConfig, log: bool) -> None:
        self.config = config
        self.name = config.name
        self.passes = config.passes
        self.decision = RuleDecision(Action.ACCEPT, config.name, log, FORWARD_REASON + config.name)
        self.to: bytes = config.to.packed
        self.to_port = config.to_port

    def translated_port(self, port: int) -> int:
        return port if self.to_port is None else self.to_port

    def describe(self) -> str:
        """ "10.0.0.25:25" or "[fd00::25]:25", or the address alone (the public port kept)."""
        host = str(self.config.to) if self.config.family == 4 else f"[{self.config.to}]"
        return host if self.to_port is None else f"{host}:{self.to_port}"


class ForwardTable:
    """The forwards of a policy, indexed both ways (see the module docstring)."""

    __slots__ = ("_public", "_translated", "forwards")

    def __init__(
        self,
        forwards: Sequence[ForwardConfig],
        inside_ifaces: tuple[str, ...],
        log: bool = False,
        sets: Mapping[str, SetContent] | None = None,
    ) -> None:
        self.forwards = tuple(Forward(config, config.log) for config in forwards)
        translated = [_translated_rule(f, inside_ifaces) for f in forwards]
        self._translated = RuleIndex(translated, self.forwards, sets)
        self._public = RuleIndex([_public_rule(f, inside_ifaces) for f in forwards], self.forwards, sets)

    def __bool__(self) -> bool:
        return bool(self.forwards)

    def refresh_runtime(self, entries_of: Callable[[str], RuntimeEntries]) -> None:
        """The sets' runtime entries changed: both lookups consult those of the sets named."""
        self._translated.refresh_runtime(entries_of)
        self._public.refresh_runtime(entries_of)

    def translated(self, pkt: Packet, in_iface: str | None) -> Forward | None:
        """The forward that translated `pkt` (already translated, as nfqfw sees it at FORWARD)."""
        bits = self._translated.candidates(pkt, False, False, in_iface, None)
        return self._translated.by_bit[bits.bit_length() - 1] if bits else None

    def public(self, pkt: Packet, to_gateway: bool, in_iface: str | None) -> Forward | None:
        """The forward that will translate `pkt` as it arrived (to the public address; to_gateway:
        its destination is one of the gateway's addresses)."""
        bits = self._public.candidates(pkt, to_gateway, False, in_iface, None)
        return self._public.by_bit[bits.bit_length() - 1] if bits else None


def _ifaces(forward: ForwardConfig, inside_ifaces: tuple[str, ...]) -> tuple[str, ...]:
    extra = tuple(name for name in inside_ifaces if name not in forward.in_ifaces) if forward.hairpin else ()
    return forward.in_ifaces + extra


def _host(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> AddressSet:
    return AddressSet(False, (ipaddress.ip_network(address),))


def _sources(forward: ForwardConfig) -> AddressSet | None:
    return None if forward.src is None else AddressSet(False, forward.src, forward.sets)


def _translated_rule(forward: ForwardConfig, inside_ifaces: tuple[str, ...]) -> RuleConfig:
    return RuleConfig(
        name=forward.name,
        action=Action.ACCEPT,
        line=forward.line,
        family=forward.family,
        protocols=forward.protocols,
        src=_sources(forward),
        dst=_host(forward.to),
        dports=forward.translated_ports,
        in_ifaces=_ifaces(forward, inside_ifaces),
    )


def _public_rule(forward: ForwardConfig, inside_ifaces: tuple[str, ...]) -> RuleConfig:
    public = AddressSet(True, ()) if forward.address is None else _host(forward.address)
    return RuleConfig(
        name=forward.name,
        action=Action.ACCEPT,
        line=forward.line,
        family=forward.family,
        protocols=forward.protocols,
        src=_sources(forward),
        dst=public,
        dports=forward.ports,
        in_ifaces=_ifaces(forward, inside_ifaces),
    )
