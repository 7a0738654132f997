"""Token buckets for the policy's `limit:` (driven by the injected clock, never by time.*).

A bucket holds up to `burst` tokens, starts full and gains `count` tokens per `period`
seconds; a packet that finds a token takes it and matches, one that finds none does not
match (evaluation falls through to the next rule, as with iptables -m limit).

Arithmetic is in integers so that refills are exact: time is counted in nanoseconds, and a
token is worth `period` seconds of credit while every nanosecond adds `count` credit units.
"""

from __future__ import annotations

from collections import OrderedDict

NS_PER_SECOND = 1_000_000_000
DEFAULT_MAX_SOURCES = 4096  # buckets kept per rule with limit-per: source


def _ns(now: float) -> int:
    return round(now * NS_PER_SECOND)


class TokenBucket:
    __slots__ = ("_cap", "_cost", "_count", "credit", "stamp")

    def __init__(self, count: int, period: int, burst: int, now: float) -> None:
        self._count = count  # credit gained per nanosecond
        self._cost = period * NS_PER_SECOND  # credit of one token
        self._cap = burst * self._cost
        self.credit = self._cap  # starts full
        self.stamp = _ns(now)

    @property
    def tokens(self) -> float:
        """Tokens held at the last update (for display and tests)."""
        return self.credit / self._cost

    def take(self, now: float) -> bool:
        """Refill for the time since the last call, then take one token if there is one."""
        stamp = _ns(now)
        elapsed = stamp - self.stamp
        if elapsed > 0:  # a clock that steps back refills nothing and keeps the later stamp
            self.credit = min(self._cap, self.credit + elapsed * self._count)
            self.stamp = stamp
        if self.credit >= self._cost:
            self.credit -= self._cost
            return True
        return False


class RuleLimiter:
    """One bucket shared by every packet of the rule."""

    __slots__ = ("_bucket", "_burst", "_count", "_period")

    def __init__(self, count: int, period: int, burst: int) -> None:
        self._count, self._period, self._burst = count, period, burst
        self._bucket: TokenBucket | None = None  # created on first use, with that packet's clock

    def allow(self, source: bytes, now: float) -> bool:
        bucket = self._bucket
        if bucket is None:
            bucket = self._bucket = TokenBucket(self._count, self._period, self._burst, now)
        return bucket.take(now)


class SourceLimiter:
    """One bucket per source address, at most `max_sources` of them.

    The least recently used bucket is evicted when a new source arrives at a full table.
    Forgetting a source only gives it a full bucket again -- what any new source gets -- so
    the bound costs accuracy under a flood of sources, never memory.
    """

    __slots__ = ("_buckets", "_burst", "_count", "_period", "max_sources")

    def __init__(self, count: int, period: int, burst: int, max_sources: int = DEFAULT_MAX_SOURCES) -> None:
        self._count, self._period, self._burst = count, period, burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[bytes, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, source: bytes) -> bool:
        return source in self._buckets

    def allow(self, source: bytes, now: float) -> bool:
        buckets = self._buckets
        bucket = buckets.get(source)
        if bucket is None:
            if len(buckets) >= self.max_sources:
                buckets.popitem(last=False)
            bucket = buckets[source] = TokenBucket(self._count, self._period, self._burst, now)
        else:
            buckets.move_to_end(source)
        return bucket.take(now)


Limiter = RuleLimiter | SourceLimiter
