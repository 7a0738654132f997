"""Interface index -> name map and the gateway's own addresses, kept current.

The kernel gives each queued packet its in/out interface as an index; zones are defined by
interface name. `Links` holds the map in a plain dict (one lookup per packet, on a cache miss
only: the queue adapter caches whole Meta records) and the set of the host's addresses.

Kept current two ways:
- an rtnetlink socket subscribed to link and address events (RTMGRP_LINK, RTMGRP_*_IFADDR):
  when it becomes readable the daemon calls `on_events()`, which drains it and re-reads links
  and addresses with pyroute2 (events are rare; a full re-read is simpler and cannot miss a
  rename or an overflowed event queue);
- an index never seen (a link created between an event and its packet) is resolved on the spot
  with if_indextoname(3), one ioctl, without waiting for the event.
Listeners registered with `on_change` are called after every re-read (the adapter drops its
Meta cache there).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK

log = logging.getLogger(__name__)

_NETLINK_ROUTE = 0
_EVENT_GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR


class Links:
    """ifindex -> name and our own addresses, for the network namespace we run in."""

    def __init__(self, watch: bool = True) -> None:
        self.names: dict[int, str] = {}
        self.addresses: frozenset[bytes] = frozenset()  # raw 4- or 16-byte addresses of this host
        self._listeners: list[Callable[[], None]] = []
        self._events: socket.socket | None = None
        if watch:
            # Subscribe before the first read so that no change falls in between.
            kind = socket.SOCK_RAW | socket.SOCK_CLOEXEC
            self._events = socket.socket(socket.AF_NETLINK, kind, _NETLINK_ROUTE)
            self._events.bind((0, _EVENT_GROUPS))
            self._events.setblocking(False)
        self.refresh()

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def fileno(self) -> int:
        """The event socket, to poll for readability; -1 when not watching."""
        return -1 if self._events is None else self._events.fileno()

    def name(self, index: int) -> str | None:
        """Name of interface `index`; None for 0 (no interface) or an index that does not exist."""
        name = self.names.get(index)
        if name is None and index:
            try:
                name = socket.if_indextoname(index)
            except OSError:
                return None
            self.names[index] = name
        return name

    def on_events(self) -> bool:
        """Drain pending link/address events and re-read everything if there were any.

        Cheap when nothing happened (one non-blocking recv), so it may also be called on a timer.
        """
        if self._events is None:
            return False
        pending = False
        while True:
            try:
                self._events.recv(65536)
            except BlockingIOError:
                break
            except OSError as err:  # ENOBUFS: events were lost, which the re-read covers
                log.debug("rtnetlink events: %s", err)
            pending = True
        if pending:
            self.refresh()
        return pending

    def refresh(self) -> None:
        with IPRoute() as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            addresses = frozenset(_address_bytes(msg) for msg in ipr.get_addr())
        changed = names != self.names
        self.names = names
        self.addresses = addresses - {b""}
        if changed:
            log.debug("interfaces: %s", ", ".join(f"{i}={n}" for i, n in sorted(names.items())))
        for listener in self._listeners:
            listener()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def _address_bytes(msg: object) -> bytes:
    # IFA_LOCAL is our address on point-to-point links (IFA_ADDRESS is the peer there).
    text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")  # type: ignore[attr-defined]
    family = msg["family"]  # type: ignore[index]
    if not text:
        return b""
    return socket.inet_pton(family, text)
