"""Offload, the daemon's side: the flows nfqfw handed over, followed in the kernel's table.

With `options: {offload: established}` the engine hands established flows over to the kernel's
conntrack (nfqfw.core.engine) and keeps their records in `Engine.offloaded`. nfqfw stays the
authority over them; this module links those records to the kernel's table
(nfqfw.kernel.ctnetlink), where the flows live on, found by the offload bit of their connection
mark (nfqfw.firewall.marks):

- `tick`: every SYNC_PERIOD, a dump of the entries with the offload bit: a record whose flow the
  kernel no longer has (closed, timed out) is dropped; the others take the kernel's state, and
  the kernel's time left (plus a period) as their deadline, which is what a snapshot saves;
- `take_over` (also part of every `sync`): the entries with the offload bit (of this process's
  owner field) nfqfw has no record of become records: in an HA pair conntrackd carried them,
  mark and all, from the peer that admitted them. The rule that admitted one is read from its
  mark's rule field, the Meta of its first packet from the routes (`meta_of`,
  nfqfw.kernel.routes; `forwarded` when the rule is one of the policy's forwards), so that
  `flows`, `flush` and `reload: recheck` treat it as one of nfqfw's own. One it cannot place
  (no route) is adopted without a Meta: kept by a recheck.
  Not in the syncs of an HA backup (`taking_over` False): it forgot those flows;
- `overlay`: for `flows`, the kernel's state and time left of each offloaded flow (a fresh dump);
- `revoke`: flows nfqfw takes back (flush, a reload with `reload: recheck` that no longer admits
  them): their kernel entries are deleted, so their next packet meets nfqfw, which has no flow
  for it any more (a TCP connection is cut; a UDP flow meets the policy again);
- `adopt`: at start, the offloaded flows the last run saved: the ones the kernel still carries
  are offloaded records again (a restart or a crash never stopped them); the ones it lost (a
  reboot) go back to the engine's own table.

A kernel entry is matched to nfqfw's record by the flow as the filter hooks see it (the
original direction, after a DNAT: CtEntry.seen_as). Errors of the kernel's table are logged
once per kind and never fatal: the records then stay as they were.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from nfqfw.core.conntrack import Flow
from nfqfw.core.l4.base import ports_key
from nfqfw.core.l4.tcp_conn import TcpConn
from nfqfw.core.l4.tcp_states import TcpState
from nfqfw.core.packet import PROTO_TCP, PROTO_UDP, Packet
from nfqfw.firewall.marks import Marks
from nfqfw.kernel.ctnetlink import CtEntry, Ctnetlink, CtnetlinkError
from nfqfw.kernel.routes import RouteMeta

log = logging.getLogger("nfqfw")

SYNC_PERIOD = 30.0  # seconds between two looks at the kernel's table


def key_of(entry: CtEntry) -> bytes | None:
    """nfqfw's flow key of a kernel entry (TCP and UDP: what nfqfw offloads), None for others."""
    found = _keyed(entry)
    return None if found is None else found[0]


def _keyed(entry: CtEntry) -> tuple[bytes, bool] | None:
    """(key, originator sorts first) of a kernel entry, as ports_key; None for other protocols."""
    if entry.proto not in (PROTO_TCP, PROTO_UDP):
        return None
    pkt = Packet()
    pkt.proto = entry.proto
    pkt.src, pkt.sport, pkt.dst, pkt.dport = entry.seen_as
    return ports_key(pkt)


MetaOf = Callable[[bytes, bytes], Any]  # (src, dst) -> the Meta of a first packet, or None


class Offload:
    """The kernel's side of one engine's offloaded flows (see the module docstring). `open`
    makes the ctnetlink socket (injectable for tests); it is opened when first needed."""

    def __init__(
        self,
        marks: Marks,
        open_ctnetlink: Callable[[], Any] = Ctnetlink,
        owner: int | None = None,
        route_meta: Callable[[], Any] = lambda: RouteMeta(()),
    ) -> None:
        self.marks = marks
        self._open = open_ctnetlink
        self.owner = owner  # a worker's queue index: it takes over the entries of its owner field
        self.reasons: list[str] = []  # the policy's rule reasons, as the mark's rule field numbers them
        self._route_meta = route_meta  # a fresh MetaOf (closable) for one take-over
        self.taking_over = True  # False on an HA backup: what its kernel has is the peer's now
        self._socket: Any = None
        self._due = 0.0
        self._complained: set[str] = set()
        self.kernel_flows = 0  # entries with the offload bit at the last look (any worker's)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _ctnetlink(self) -> Any:
        if self._socket is None:
            self._socket = self._open()
        return self._socket

    def _complain(self, what: str, err: Exception) -> None:
        if what not in self._complained:
            self._complained.add(what)
            log.error("offload: %s: %s (the offloaded flows' records are kept as they are)", what, err)

    def records(self) -> dict[bytes, CtEntry] | None:
        """The kernel's entries with the offload bit, by nfqfw's flow key; None when the table
        cannot be read (logged)."""
        bit = self.marks.offload
        try:
            found = {}
            for entry in self._ctnetlink().dump(bit, bit):
                key = key_of(entry)
                if key is not None:
                    found[key] = entry
        except CtnetlinkError as err:
            self._complain("cannot read the kernel's connection table", err)
            return None
        self.kernel_flows = len(found)
        return found

    # -- housekeeping --

    def tick(self, engine: Any, now: float) -> float:
        """Housekeeping: follow the records in the kernel's table every SYNC_PERIOD; returns
        when it wants to run again."""
        if not engine.offload and not len(engine.offloaded):
            return math.inf
        if now < self._due:
            return self._due
        self._due = now + SYNC_PERIOD
        self.sync(engine, now)
        return self._due

    def sync(self, engine: Any, now: float) -> int:
        """Drop the records the kernel no longer carries, update the others from their entries,
        take over those nfqfw has no record of; returns how many were dropped."""
        kernel = self.records()
        if kernel is None:
            return 0
        offloaded = engine.offloaded
        ended = []
        for flow in offloaded:
            entry = kernel.get(flow.key)
            if entry is None:
                ended.append(flow)
            else:
                follow(flow, entry, now)
        for flow in ended:
            offloaded.remove(flow)
        if self.taking_over:
            self._take_over(engine, kernel, now)
        return len(ended)

    def take_over(self, engine: Any, now: float) -> int:
        """The kernel's entries with the offload bit nfqfw has no record of (an HA peer admitted
        them) become records; returns how many (0 when the table cannot be read)."""
        kernel = self.records()
        return 0 if kernel is None else self._take_over(engine, kernel, now)

    def _take_over(self, engine: Any, kernel: dict[bytes, CtEntry], now: float) -> int:
        offloaded, conntrack = engine.offloaded, engine.conntrack
        new = [
            entry
            for key, entry in kernel.items()
            if offloaded.get(key) is None and self.marks.owner_index(entry.mark) == self.owner
        ]
        if not new:
            return 0
        taken = 0
        meta_of = self._route_meta()
        try:
            for entry in new:
                flow = self.record_of(entry, meta_of, now)
                if flow is None:
                    continue
                mine = conntrack.get(flow.key)
                if mine is not None:  # the kernel carries it: nfqfw's own record is stale
                    conntrack.remove(mine)
                taken += offloaded.restore(flow)
        finally:
            meta_of.close()
        if taken:
            log.info("offload: took over %d flows the kernel carries for nfqfw (an HA peer's)", taken)
        return taken

    def record_of(self, entry: CtEntry, meta_of: MetaOf, now: float) -> Flow | None:
        """An offloaded record of a kernel entry nfqfw did not admit itself: its rule from the
        mark's rule field, its first packet's Meta from `meta_of`."""
        keyed = _keyed(entry)
        if keyed is None:
            return None
        src, _, dst, _ = entry.seen_as
        flow = Flow(keyed[0], keyed[1], now)
        flow.rule = self.marks.reason_of(entry.mark, self.reasons)
        meta = meta_of(src, dst)
        if meta is not None and flow.rule is not None and flow.rule.startswith("forward "):
            meta = replace(meta, forwarded=True)  # a forward translated it (Meta.forwarded)
        flow.meta = meta
        if entry.proto == PROTO_TCP:
            flow.tcp = TcpConn()
        follow(flow, entry, now)
        return flow

    # -- requests --

    def overlay(self, flows: Iterable[Flow], now: float) -> dict[bytes, CtEntry]:
        """Bring these offloaded records up to the kernel's entries (for `flows`); returns the
        entries found, by key (empty when the table cannot be read)."""
        kernel = self.records() or {}
        found = {}
        for flow in flows:
            entry = kernel.get(flow.key)
            if entry is not None:
                follow(flow, entry, now)
                found[flow.key] = entry
        return found

    def revoke(self, engine: Any, flows: list[Flow]) -> int:
        """Take these offloaded flows back: their kernel entries are deleted and their records
        dropped. Returns how many records were dropped."""
        if not flows:
            return 0
        kernel = self.records()
        if kernel is not None:
            entries = [kernel[flow.key] for flow in flows if flow.key in kernel]
            try:
                self._ctnetlink().delete(entries)
            except CtnetlinkError as err:
                self._complain("cannot delete revoked flows from the kernel's table", err)
        for flow in flows:
            engine.offloaded.remove(flow)
        return len(flows)

    def adopt(self, engine: Any, flows: list[Flow], now: float) -> tuple[int, int]:
        """At start, the offloaded flows the last run saved: those the kernel still carries
        become records again, the others go to the engine's table. Returns (offloaded, taken back)."""
        if not flows:
            return 0, 0
        kernel = self.records() or {}
        offloaded = back = 0
        for flow in flows:
            entry = kernel.get(flow.key)
            if entry is not None:
                follow(flow, entry, now)
                offloaded += engine.offloaded.restore(flow)
            else:
                back += engine.conntrack.restore(flow)
        return offloaded, back


def follow(flow: Flow, entry: CtEntry, now: float) -> None:
    """A record takes its kernel entry's state and flags, and its time left plus SYNC_PERIOD
    as its deadline (it must outlive the kernel's until the next look; `flows` shows the
    kernel's own)."""
    flow.deadline = now + entry.timeout + SYNC_PERIOD
    flow.seen_reply = entry.replied
    flow.assured = entry.assured
    tcp = flow.tcp
    if tcp is not None and entry.tcp_state in _TCP_STATES:
        tcp.state = TcpState(entry.tcp_state)
        flow.tcp = tcp


_TCP_STATES = frozenset(int(state) for state in TcpState)
