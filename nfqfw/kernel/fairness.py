"""Fair service of several kernel queues by one thread, and early drops when it falls behind.

The kernel holds the packets of each NFQUEUE queue in one FIFO in front of one consumer. One
busy flow fills it, and every other packet behind it waits (tens of milliseconds) or is dropped
when it is full. Two remedies, decided here and applied by the adapter (nfqfw.kernel.queue):

- **Several queues, served in turn.** The kernel spreads flows over the queues of a range by a
  hash of their addresses and protocol, so a busy flow fills only its own queue. The adapter
  serves a queue for at most its quantum (`quantum`) while others have packets waiting, then
  serves each of them for theirs: queues of established flows first (QUANTUM each), then one
  queue of first packets, in rotation, for less (FIRST_PACKET_SHARE of a quantum): the
  first-packet queues share one turn a round, so a flood of first packets, spread over all of
  them by its random sources or not, takes at most that share of a round's time while
  established flows have packets (twice that while the queue being read is a first-packet one).
- **Early drops from the fattest flows.** A queue whose head packet has waited longer than
  TARGET for INTERVAL (measured with the kernel's receive timestamp of the packet at the head)
  is behind (`DelayControl`, CoDel's rule). While it is, packets of its fat flows (`FatFlows`:
  at least half a fair share of the packets seen meanwhile) are dropped as soon as they are
  read, without asking the engine, and counted ("drop queue delay"); every other packet is
  decided as usual. How many: at CoDel's pace (one, then one every INTERVAL / sqrt(drops so
  far)), which is what a TCP sender needs to slow down; and all of them while the head waits
  longer than OVERLOAD (a flood that does not slow down) and other flows share the queue,
  until the wait is within TARGET again: a drop costs nfqfw a fraction of a decided packet,
  so the queue drains, and the other flows' packets wait about TARGET instead of a full queue.
  Alone in its queue a flood is not shed: reading a packet to drop it costs nfqfw time, the
  kernel's drop at the tail of a full queue costs it nothing, and nobody waits behind it. When
  shedding does not bring the wait under OVERLOAD once in MEMORY, nfqfw cannot read the flood
  as fast as it comes and the drops help nobody: none but CoDel's for MEMORY (the kernel drops
  at the tail, as without early drops). It all stops as soon as the head waits less than
  TARGET again (or the queue is empty), and starts again at once, the pace kept, if the queue
  falls behind within MEMORY.

Pure: clock values and packet bytes in, decisions out; every rule is unit-tested with an
injected clock (tests/unit/kernel/test_fairness.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

QUANTUM = 0.0005  # seconds a queue is served at a time while others have packets waiting
FIRST_PACKET_SHARE = 0.25  # a first-packet queue's quantum, as a share of QUANTUM
TARGET = 0.002  # seconds a packet may wait in the kernel before its queue counts as behind
INTERVAL = 0.1  # seconds above TARGET before the first early drops (bursts pass); CoDel's pace
OVERLOAD = 0.01  # seconds of wait above which every packet of a fat flow is dropped (shared queue)
MEMORY = 1.0  # seconds after behind during which falling behind again drops at once
FAT_WINDOW = 1024  # packets seen while behind between two halvings of the flow counts
FAT_MINIMUM = 8  # packets a flow must have in the counts to be fat (sparse flows never are)
MEASURE_EVERY = 16  # while a queue is behind, the wait of 1 packet in this many is measured
DROP_BATCH = 64  # early drops are given their verdict together, this many at a time


def quantum(first_packets: bool) -> float:
    """How long a queue is served at a time while others have packets waiting."""
    return QUANTUM * FIRST_PACKET_SHARE if first_packets else QUANTUM


@dataclass(slots=True)
class DelayControl:
    """Whether one queue is behind, and which of its fat flows' packets to drop: CoDel's rules
    on the waiting time of the packet at its head, and shedding under overload.

    `observe(now, waited)` takes one measurement; `emptied(now)` says the queue was read to the
    end (nothing waits: not behind). `behind` turns True when every measurement for INTERVAL
    was above TARGET (or at the first one above it within MEMORY of the last time behind), and
    False at the first measurement within TARGET; `overloaded` at a measurement above OVERLOAD
    while behind, and False with `behind` (or when it lasted MEMORY without a measurement within
    OVERLOAD: futile, not again for MEMORY). While behind, `drop(now, shared)` says whether the
    packet of a fat flow at hand goes: every one while overloaded and `shared`, else one when
    CoDel's next drop is due (`drop_next`: at once, then every INTERVAL / sqrt(count)).
    """

    target: float = TARGET
    interval: float = INTERVAL
    overload: float = OVERLOAD
    memory: float = MEMORY
    behind: bool = False
    overloaded: bool = False
    above_since: float | None = None  # first measurement above target of the current run
    again_until: float = -math.inf  # behind again before this: at once, the pace kept
    episodes: int = 0  # times it fell behind (a fresh episode resets the flow counts)
    count: int = 0  # CoDel's drops of this episode (the pace)
    drop_next: float = math.inf  # when CoDel's next drop is due
    overloaded_since: float = math.inf  # without a measurement within OVERLOAD since
    futile_until: float = -math.inf  # not overloaded before this: shedding did not drain it

    def observe(self, now: float, waited: float) -> bool:
        """A packet read at `now` waited `waited` seconds in the kernel; returns `behind`."""
        if waited <= self.target:
            self.emptied(now)
            return False
        if not self.behind:
            if self.above_since is None:
                self.above_since = now
            again = now < self.again_until
            if not again and now - self.above_since < self.interval:
                return False
            self.behind = True
            self.episodes += 1
            self.count = max(1, self.count - 2) if again else 1  # CoDel: resume near the pace
            self.drop_next = now
        if waited <= self.overload:
            self.overloaded_since = math.inf  # shedding gets somewhere (or is not needed)
        elif now >= self.futile_until:
            self.overloaded = True
            if self.overloaded_since == math.inf:
                self.overloaded_since = now
            elif now - self.overloaded_since >= self.memory:  # it comes as fast as nfqfw reads it
                self.overloaded, self.overloaded_since = False, math.inf
                self.futile_until = now + self.memory
        return True

    def drop(self, now: float, shared: bool = True) -> bool:
        """While behind, a packet of a fat flow is at hand: does it go? (`shared`: other flows
        wait in the queue too; without them nothing is shed, CoDel's pace goes on.)"""
        if self.overloaded and shared:
            return True
        if now < self.drop_next:
            return False
        self.count += 1
        self.drop_next = now + self.interval / math.sqrt(self.count)
        return True

    def emptied(self, now: float) -> None:
        self.above_since = None
        if self.behind:
            self.behind = self.overloaded = False
            self.again_until = now + self.memory
            self.drop_next = self.overloaded_since = math.inf


class FatFlows:
    """Which flows of one queue are fat: packets counted per flow while it is behind, halved
    every FAT_WINDOW packets (so the counts follow the traffic and stay few); a flow is fat
    when it has at least FAT_MINIMUM packets and half its fair share (total / flows) of them.
    One flood among sparse flows is fat, the sparse ones never; flows of equal weight are all
    fat (then the drops fall on all of them, as an AQM's)."""

    __slots__ = ("counts", "seen", "top", "top_count", "total")

    def __init__(self) -> None:
        self.counts: dict[bytes, int] = {}
        self.total = 0
        self.seen = 0
        self.top = b""  # the flow with the most packets counted (its packets are not "others")
        self.top_count = 0

    def reset(self) -> None:
        self.counts.clear()
        self.total = self.seen = self.top_count = 0
        self.top = b""

    def fat(self, key: bytes) -> bool:
        """Count one packet of flow `key`; is that flow fat?"""
        counts = self.counts
        count = counts.get(key, 0) + 1
        counts[key] = count
        self.total += 1
        self.seen += 1
        if count > self.top_count:
            self.top, self.top_count = key, count
        if self.seen >= FAT_WINDOW:
            self._halve()
            count = counts.get(key, 0)
        return count >= FAT_MINIMUM and 2 * count * len(counts) >= self.total

    def _halve(self) -> None:
        counts = self.counts  # in place: the adapter holds this dict
        for key, count in list(counts.items()):
            if count > 1:
                counts[key] = count >> 1
            else:
                del counts[key]
        self.total = sum(counts.values())
        self.seen = 0
        self.top_count >>= 1


class Backlog:
    """The fairness state of one queue: whether it is behind (`delay`, mirrored in `behind`,
    read per packet) and, while it is, which of its flows are fat (`flows`, counted afresh
    each time it falls behind after MEMORY) and whether other flows share it (a packet of a
    flow neither fat nor the fattest within INTERVAL: `others_seen`)."""

    __slots__ = ("behind", "delay", "flows", "others_seen")

    def __init__(self) -> None:
        self.delay = DelayControl()
        self.flows = FatFlows()
        self.behind = False
        self.others_seen = -math.inf  # when a packet of a flow not fat was last counted

    def measured(self, now: float, waited: float) -> bool:
        """The packet at the head waited `waited` seconds at `now`; returns `behind`."""
        delay = self.delay
        fresh = not delay.behind and now >= delay.again_until
        if delay.observe(now, waited) and fresh:
            self.flows.reset()
        self.behind = delay.behind
        return self.behind

    def emptied(self, now: float) -> None:
        self.delay.emptied(now)
        self.behind = False

    def drop_early(self, key: bytes, now: float) -> bool:
        """While behind: count the packet's flow (`key`, see flow_key); True when the packet is
        to be dropped now: its flow is fat and a drop is due."""
        flows = self.flows
        if not flows.fat(key):
            if key != flows.top:
                self.others_seen = now
            return False
        return self.delay.drop(now, now - self.others_seen < self.delay.interval)


_ICMP = (1, 58)


def flow_key(data: bytes) -> bytes:
    """A flow's identity from its packet's first bytes: addresses and the first four bytes of
    the transport header (the ports; for ICMP type, code and identifier), as bytes. Cheap (an
    IPv4 packet without options: one slice) and total: a short or odd packet gets a key too
    (its own, mostly). The protocol is left out: a TCP and a UDP flow with the same addresses
    and ports count as one, which costs nothing but a rare shared count."""
    if data[:1] == b"\x45" and data[9:10] != b"\x01":
        return data[12:24]  # IPv4 without options, not ICMP (nearly every packet)
    if not data:
        return b""
    if data[0] >> 4 == 4:
        start, proto, addresses = (data[0] & 0x0F) * 4, data[9:10], data[12:20]
    else:  # IPv6 (extension headers are not followed: such a flow keys on their first bytes)
        start, proto, addresses = 40, data[6:7], data[8:40]
    if proto and proto[0] in _ICMP:
        return addresses + data[start : start + 2] + data[start + 4 : start + 6]
    return addresses + data[start : start + 4]
