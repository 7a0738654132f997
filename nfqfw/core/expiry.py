"""Ordered expiry of flows: one-second buckets keyed by deadline, visited in order.

A flow is filed once, in the bucket of the deadline it had when filed.  Refreshing a
flow only moves its `deadline` field; when its old bucket comes due the flow is
re-filed (still alive) or expired.  So each packet costs O(1) and each flow is looked
at about once per timeout period -- no periodic full scans of the table.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Protocol


class Expiring(Protocol):
    deadline: float


class ExpiryWheel:
    __slots__ = ("_buckets", "_due")

    def __init__(self) -> None:
        self._buckets: dict[int, list[Expiring]] = {}
        self._due: list[int] = []  # heap of the seconds that have a bucket

    def file(self, item: Expiring) -> None:
        """Remember `item` until its current deadline comes due."""
        second = int(item.deadline) + 1  # ceil-ish: the bucket is swept only once its second has fully passed
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = []
            heapq.heappush(self._due, second)
        bucket.append(item)

    def next_due(self) -> int | None:
        return self._due[0] if self._due else None

    def sweep(self, now: float, expire: Callable[[Expiring], bool]) -> None:
        """Visit every bucket whose second has passed; `expire(item)` returns False for an item
        that is gone already (skipped).  Items whose deadline moved on are re-filed."""
        due = self._due
        while due and due[0] <= now:
            bucket = self._buckets.pop(heapq.heappop(due))
            for item in bucket:
                if item.deadline > now:
                    self.file(item)
                else:
                    expire(item)

    def clear(self) -> None:
        self._buckets.clear()
        self._due.clear()
