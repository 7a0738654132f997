"""Ordered expiry of flows: one-second buckets keyed by deadline, visited in order.

An item is filed once, in the bucket of the deadline it had when filed.  Refreshing it only
moves its deadline; when its old bucket comes due the item is re-filed (still alive) or
expired.  So each packet costs O(1) and each flow is looked at about once per timeout
period -- no periodic full scans of the table.

`deadline_of(item)` reads an item's current deadline (by default its `deadline` attribute);
it returns None for an item that is gone already, which is then dropped without a visit.

Items removed early (evicted, flushed, revoked) stay filed until their bucket comes due, so the
owner bounds the dead entries: `filed` counts every entry, live or dead, and `compact(live)`
drops the dead ones. Conntrack compacts when the dead outnumber the live, so memory stays
proportional to the live items at any churn, at an amortised O(1) per insertion.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Container, Sequence
from operator import attrgetter
from typing import Any

DeadlineOf = Callable[[Any], "float | None"]


class ExpiryWheel:
    """Items filed by deadline in one-second buckets; sweep(now) expires those due."""

    __slots__ = ("_buckets", "_deadline_of", "_due", "filed")

    def __init__(self, deadline_of: DeadlineOf = attrgetter("deadline")) -> None:
        self._buckets: dict[int, list[Any]] = {}
        self._due: list[int] = []  # heap of the seconds that have a bucket
        self._deadline_of = deadline_of
        self.filed = 0  # entries in the buckets, those of items gone since included

    def file(self, item: Any) -> None:
        """Remember `item` until its current deadline comes due."""
        deadline = self._deadline_of(item)
        if deadline is not None:
            self.file_at(item, deadline)

    def file_at(self, item: Any, deadline: float) -> None:
        """Remember `item`, whose deadline is `deadline`, until then."""
        second = int(deadline) + 1  # ceil-ish: the bucket is swept only once its second has fully passed
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = []
            heapq.heappush(self._due, second)
        bucket.append(item)
        self.filed += 1

    def next_due(self) -> int | None:
        """The second of the next bucket to sweep, None when nothing is filed."""
        return self._due[0] if self._due else None

    @property
    def due(self) -> Sequence[int]:
        """The seconds that have a bucket, as a heap: due[0] is next_due(). The same list for
        the wheel's life (read-only for callers: bound once by a fast path)."""
        return self._due

    def sweep(self, now: float, expire: Callable[[Any], bool]) -> None:
        """Visit every bucket whose second has passed; `expire(item)` returns False for an item
        that is gone already (skipped).  Items whose deadline moved on are re-filed."""
        due = self._due
        deadline_of = self._deadline_of
        while due and due[0] <= now:
            bucket = self._buckets.pop(heapq.heappop(due))
            self.filed -= len(bucket)
            for item in bucket:
                deadline = deadline_of(item)
                if deadline is None:
                    continue
                if deadline > now:
                    self.file_at(item, deadline)
                else:
                    expire(item)

    def compact(self, live: Container[int]) -> None:
        """Keep only the entries of the items whose id() is in `live` (the owner's live items:
        an item gone since it was filed is kept alive by its entry, so no live item can share
        its id), and drop the buckets left empty. Live items stay in their buckets; `due`
        stays the same list object."""
        kept: dict[int, list[Any]] = {}
        for second, bucket in self._buckets.items():
            alive = [item for item in bucket if id(item) in live]
            if alive:
                kept[second] = alive
        self._buckets = kept
        self._due[:] = kept  # ascending seconds are a valid heap once sorted
        self._due.sort()
        self.filed = sum(map(len, kept.values()))

    def clear(self) -> None:
        self._buckets.clear()
        self._due.clear()
        self.filed = 0
