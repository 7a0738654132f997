"""The policy's zones, compiled: interface name -> zone, zone -> the side it faces, and the
zones' networks for the offline tools.

Invariants:
- An exact interface name beats any wildcard; among wildcards ("ppp+") the longest prefix wins.
  An interface in no zone (or no interface: the gateway's own packets) has zone None.
- `side()` is the one place that says which rule list decides a first packet: from the
  gateway itself egress; from a zone facing the outside, or from no zone, ingress; from an
  inside zone to another inside zone (forwarded) between; from an inside zone otherwise egress.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right

from nfqfw.core.config import INSIDE, OUTSIDE, PolicyConfig
from nfqfw.core.verdict import Hook

ZONE_CACHE_SIZE = 1024  # interface names remembered by zone_of (wildcards make lookups costly)
GATEWAY = "gateway"  # the zone-pair name of the gateway itself (from it: OUTPUT; to it: INPUT)
NO_ZONE = "-"  # the zone-pair name of an interface in no zone


class ZoneMap:
    """The zones of one policy (see the module docstring)."""

    __slots__ = ("_cache", "_default", "_exact", "_routes", "_wildcards", "faces", "inside", "interfaces")

    def __init__(self, config: PolicyConfig) -> None:
        self.faces: dict[str, str] = {zone: config.faces(zone) for zone in config.zones}
        self.inside = frozenset(zone for zone, faces in self.faces.items() if faces == INSIDE)
        self.interfaces: dict[str, tuple[str, ...]] = dict(config.zones)
        self._exact: dict[str, str] = {}
        wildcards: list[tuple[str, str]] = []
        for zone, names in config.zones.items():
            for name in names:
                if name.endswith("+"):
                    wildcards.append((name[:-1], zone))
                else:
                    self._exact[name] = zone
        self._wildcards = tuple(sorted(wildcards, key=lambda item: -len(item[0])))
        self._cache: dict[str, str | None] = {}
        # Per family: the zones' networks as (first, last, prefix length, zone), for route().
        routes: dict[int, list[tuple[int, int, int, str]]] = {4: [], 6: []}
        for zone in config.zones:
            for network in config.networks(zone):
                first = int(network.network_address)
                last = first + (1 << (network.max_prefixlen - network.prefixlen)) - 1
                routes[network.version].append((first, last, network.prefixlen, zone))
        self._routes = {family: sorted(entries) for family, entries in routes.items()}
        # The default route: the one zone facing the outside that has interfaces, if only one does.
        outside = [zone for zone, names in config.zones.items() if names and self.faces[zone] == OUTSIDE]
        self._default = outside[0] if len(outside) == 1 else None

    def zone_of(self, iface: str | None) -> str | None:
        """The zone of an interface, None for one in no zone (or no interface)."""
        if iface is None:
            return None
        zone = self._exact.get(iface)
        if zone is not None or not self._wildcards:
            return zone
        cache = self._cache
        if iface in cache:
            return cache[iface]
        zone = next((zone for prefix, zone in self._wildcards if iface.startswith(prefix)), None)
        if len(cache) >= ZONE_CACHE_SIZE:
            cache.clear()
        cache[iface] = zone
        return zone

    def is_outside(self, zone: str | None) -> bool:
        """Outside for the policy: a zone facing the outside, or no zone."""
        return zone is None or self.faces[zone] == OUTSIDE

    def side(self, hook: Hook, in_iface: str | None, out_iface: str | None) -> str:
        """The rule list ("ingress", "egress" or "between") deciding a first packet."""
        if hook == Hook.OUTPUT:
            return "egress"
        zone = self.zone_of(in_iface)
        if zone is None or zone not in self.inside:
            return "ingress"
        if hook == Hook.FORWARD:
            out = self.zone_of(out_iface)
            if out is not None and out != zone and out in self.inside:
                return "between"
        return "egress"

    def pair(self, hook: Hook, in_iface: str | None, out_iface: str | None) -> tuple[str, str]:
        """(from zone, to zone) as status and metrics name them: GATEWAY for the gateway itself,
        NO_ZONE for an interface in no zone."""
        source = GATEWAY if hook == Hook.OUTPUT else self.zone_of(in_iface) or NO_ZONE
        target = GATEWAY if hook == Hook.INPUT else self.zone_of(out_iface) or NO_ZONE
        return source, target

    # -- for the offline tools (explain, replay), which see no output interface -----------------

    def route(self, address: bytes) -> str | None:
        """The zone whose networks hold `address` (raw 4 or 16 bytes), the longest prefix first;
        else the default route: the zone facing the outside, when only one has interfaces (None
        when there are several)."""
        value = int.from_bytes(address, "big")
        best: tuple[int, str] | None = None
        entries = self._routes[4 if len(address) == 4 else 6]
        for first, last, prefix, zone in entries[: bisect_right(entries, (value, 1 << 129))]:
            if first <= value <= last and (best is None or prefix > best[0]):
                best = (prefix, zone)
        return self._default if best is None else best[1]

    def interface_of(self, zone: str) -> str | None:
        """A name for an interface of `zone` (its first; a wildcard's prefix with 0 appended)."""
        names = self.interfaces.get(zone, ())
        if not names:
            return None
        return names[0][:-1] + "0" if names[0].endswith("+") else names[0]


def address_text(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))
