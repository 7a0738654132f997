"""The lab's plan: namespace names from a prefix, the addressing, and its picture.

No pyroute2 here: `nfqfw --help` and the lab command's parser read it without loading the
netlink library (nfqfw.lab.topology builds the plan).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_PREFIX = "nfq-"
NETNS_DIR = Path("/var/run/netns")

# The addressing plan (documentation prefixes outside, private ones inside).
WAN_V4, WAN_V6 = "203.0.113.10", "2001:db8:1::10"
GW_WAN_V4, GW_WAN_V6 = "203.0.113.1", "2001:db8:1::1"
GW_LAN_V4, GW_LAN_V6 = "10.0.0.1", "fd00::1"
LAN_V4, LAN_V6 = "10.0.0.25", "fd00::25"
LAN_NET_V4, LAN_NET_V6 = "10.0.0.0/24", "fd00::/64"
# The DMZ of a lab built with one (Topology(with_dmz=True)): a third zone on a third interface.
GW_DMZ_V4, GW_DMZ_V6 = "10.0.2.1", "fd00:2::1"
DMZ_V4, DMZ_V6 = "10.0.2.80", "fd00:2::80"
DMZ_NET_V4, DMZ_NET_V6 = "10.0.2.0/24", "fd00:2::/64"


class LabError(Exception):
    """The lab could not be built or controlled; str() is a message for the user."""


@dataclass(frozen=True)
class Topology:
    """Names of a lab's namespaces, derived from its prefix; `with_dmz`: a fourth namespace, a
    DMZ host on the gateway's dmz0."""

    prefix: str = DEFAULT_PREFIX
    with_dmz: bool = False

    @property
    def wan(self) -> str:
        return f"{self.prefix}wan"

    @property
    def gw(self) -> str:
        return f"{self.prefix}gw"

    @property
    def lan(self) -> str:
        return f"{self.prefix}lan"

    @property
    def dmz(self) -> str:
        return f"{self.prefix}dmz"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.wan, self.gw, self.lan, *((self.dmz,) if self.with_dmz else ()))

    @property
    def every_namespace(self) -> tuple[str, ...]:
        """What a lab with this prefix may have left, with or without a DMZ (for tearing down)."""
        return (self.wan, self.gw, self.lan, self.dmz)


def picture(prefix: str = DEFAULT_PREFIX, dmz: bool = False) -> str:
    """The lab drawn as text, with its namespace names."""
    t = Topology(prefix, dmz)
    rows: tuple[tuple[tuple[int, str], ...], ...] = (
        ((2, "outside host"), (28, "the gateway, runs nfqfw"), (72, "inside host")),
        ((2, f"netns {t.wan}"), (28, f"netns {t.gw}"), (72, f"netns {t.lan}")),
        ((2, "eth0 203.0.113.10/24 ---- wan0 203.0.113.1/24   lan0 10.0.0.1/24 ---- eth0 10.0.0.25/24"),),
        ((7, "2001:db8:1::10/64"), (33, "2001:db8:1::1/64"), (55, "fd00::1/64"), (77, "fd00::25/64")),
        ((28, "zone external"), (50, "zone internal")),
        ((28, "IPv4 masquerade of 10.0.0.0/24 out of wan0 (by the policy's nat, else the lab)"),),
    )
    if dmz:
        rows += (
            ((50, "dmz0 10.0.2.1/24 ---- eth0 10.0.2.80/24   netns " + t.dmz),),
            ((55, "fd00:2::1/64"), (77, "fd00:2::80/64   (a DMZ host)")),
        )
    lines = []
    for row in rows:
        text = ""
        for column, cell in row:
            text = (text.ljust(column) if len(text) < column else text + " ") + cell
        lines.append(text)
    return "\n".join(lines)
