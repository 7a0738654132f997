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
# More addresses the outside host can be given (nfqfw.lab.topology.add_outside_addresses), all in
# WAN_EXTRA_NET_V4: flows of 16 address pairs, which --queue-balance spreads over its queues by a
# hash of the addresses (all on one of two queues has a chance of 2**-15).
WAN_EXTRA_V4 = tuple(f"203.0.113.{100 + n}" for n in range(16))
WAN_EXTRA_NET_V4 = "203.0.113.64/26"


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


# --- the HA pair (`nfqfw lab up --ha`) ---------------------------------------------------------
# Each gateway has its own address on both sides; the virtual addresses (GW_WAN_*, GW_LAN_*,
# the single lab's gateway addresses) are held by the VRRP master. The sync link is a veth
# between the two gateways, carrying conntrackd's replication only.
HA_GATEWAYS = ("gw1", "gw2")
HA_WAN = {"gw1": ("203.0.113.2", "2001:db8:1::2"), "gw2": ("203.0.113.3", "2001:db8:1::3")}
HA_LAN = {"gw1": ("10.0.0.2", "fd00::2"), "gw2": ("10.0.0.3", "fd00::3")}
HA_SYNC = {"gw1": "172.31.255.1", "gw2": "172.31.255.2"}
HA_SYNC_PREFIXLEN = 30
HA_SYNC_IFACE = "sync0"
HA_PRIORITY = {"gw1": 150, "gw2": 100}  # gw1 wins the first election
HA_BRIDGE = "br0"  # the outside and inside networks: a bridge in the host's namespace


@dataclass(frozen=True)
class HaTopology:
    """Names of an HA lab's namespaces: outside host, two gateways, inside host."""

    prefix: str = DEFAULT_PREFIX

    @property
    def wan(self) -> str:
        return f"{self.prefix}wan"

    @property
    def lan(self) -> str:
        return f"{self.prefix}lan"

    def gw(self, gateway: str) -> str:
        """The namespace of gateway `gateway` ("gw1" or "gw2")."""
        return f"{self.prefix}{gateway}"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.wan, *(self.gw(g) for g in HA_GATEWAYS), self.lan)

    @property
    def every_namespace(self) -> tuple[str, ...]:
        """What an HA lab with this prefix may have left (as Topology's): its namespaces."""
        return self.namespaces

    def peer(self, gateway: str) -> str:
        return HA_GATEWAYS[1 - HA_GATEWAYS.index(gateway)]


def ha_picture(prefix: str = DEFAULT_PREFIX) -> str:
    """The HA lab drawn as text, with its namespace names."""
    t = HaTopology(prefix)
    return "\n".join(
        (
            f"outside host {t.wan}: br0 {WAN_V4}/24 {WAN_V6}/64",
            "        |                                  |",
            f"  {t.gw('gw1')}: wan0 .2 ::2             {t.gw('gw2')}: wan0 .3 ::3",
            f"  keepalived conntrackd nfqfw   {HA_SYNC_IFACE} -- {HA_SYNC_IFACE}   "
            "keepalived conntrackd nfqfw",
            "  lan0 10.0.0.2 fd00::2            lan0 10.0.0.3 fd00::3",
            "        |                                  |",
            f"inside host {t.lan}: br0 {LAN_V4}/24 {LAN_V6}/64",
            f"virtual addresses (VRRP master): {GW_WAN_V4} {GW_WAN_V6} outside, "
            f"{GW_LAN_V4} {GW_LAN_V6} inside",
            f"sync link {HA_SYNC['gw1']} -- {HA_SYNC['gw2']}/{HA_SYNC_PREFIXLEN}; "
            f"IPv4 SNAT of {LAN_NET_V4} to {GW_WAN_V4}",
        )
    )
