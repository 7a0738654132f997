"""The Meta a flow's first packet would have had, from the routing table: for flows nfqfw did
not see start (an HA pair's peer admitted them; conntrackd carried them into this gateway's
connection table).

The policy judges a first packet with its hook and interfaces (zones, `in:`/`out:`), which a
kernel connection entry does not record. They follow from the routes: the packet came in by
the interface the route back to its source leaves by (what the reverse-path filter assumes)
and goes out by the route to its destination; to one of the gateway's own addresses it is
INPUT, from one OUTPUT. `RouteMeta` asks the kernel (`ip route get`, over rtnetlink) once
per address and caches the answer for its own life (one take-over).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nfqfw.core.verdict import Hook, Meta


class RouteMeta:
    """(src, dst) of a flow's original direction -> the Meta of its first packet, or None
    when a route cannot be found. `local` are the gateway's own addresses (raw bytes)."""

    def __init__(self, local: Iterable[bytes]) -> None:
        self.local = frozenset(local)
        self._oif: dict[bytes, str | None] = {}
        self._ipr: IPRoute | None = None

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def __enter__(self) -> RouteMeta:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, src: bytes, dst: bytes) -> Meta | None:
        if dst in self.local:
            inbound = self.out_iface(src)
            return None if inbound is None else Meta(Hook.INPUT, inbound, None)
        if src in self.local:
            outbound = self.out_iface(dst)
            return None if outbound is None else Meta(Hook.OUTPUT, None, outbound)
        inbound, outbound = self.out_iface(src), self.out_iface(dst)
        if inbound is None or outbound is None:
            return None
        return Meta(Hook.FORWARD, inbound, outbound)

    def out_iface(self, address: bytes) -> str | None:
        """The name of the interface the route to `address` leaves by (None: no route)."""
        if address not in self._oif:
            self._oif[address] = self._lookup(address)
        return self._oif[address]

    def _lookup(self, address: bytes) -> str | None:
        family = socket.AF_INET if len(address) == 4 else socket.AF_INET6
        if self._ipr is None:
            self._ipr = IPRoute()
        try:
            routes = self._ipr.route("get", dst=socket.inet_ntop(family, address), family=family)
            index = routes[0].get_attr("RTA_OIF")
            return socket.if_indextoname(index) if index else None
        except (OSError, IndexError, ValueError, NetlinkError):
            return None
