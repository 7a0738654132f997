"""nfqfw.core.ratelimit: token buckets on an injected clock, exact refills, LRU per-source tables."""

from __future__ import annotations

from nfqfw.core.ratelimit import RuleLimiter, SourceLimiter, TokenBucket


def takes(bucket: TokenBucket, now: float, times: int) -> list[bool]:
    return [bucket.take(now) for _ in range(times)]


def test_bucket_starts_full_and_empties() -> None:
    bucket = TokenBucket(count=5, period=1, burst=3, now=100.0)
    assert bucket.tokens == 3.0
    assert takes(bucket, 100.0, 4) == [True, True, True, False]
    assert bucket.tokens == 0.0


def test_refill_is_exact_to_the_token() -> None:
    bucket = TokenBucket(count=5, period=1, burst=1, now=0.0)  # one token every 0.2 s
    assert bucket.take(0.0)
    assert not bucket.take(0.199999999)  # one nanosecond short of a token
    assert bucket.take(0.2)
    assert not bucket.take(0.2)
    # Clock values that floating point cannot hold exactly still give exactly one token per 0.2 s.
    now = 0.2
    for _ in range(1000):
        now += 0.2
        assert takes(bucket, now, 2) == [True, False]


def test_partial_refill_accumulates() -> None:
    bucket = TokenBucket(count=1, period=1, burst=2, now=0.0)
    assert takes(bucket, 0.0, 3) == [True, True, False]
    assert not bucket.take(0.5)  # half a token
    assert bucket.tokens == 0.5
    assert takes(bucket, 1.0, 2) == [True, False]  # the other half arrived


def test_refill_is_capped_at_the_burst() -> None:
    bucket = TokenBucket(count=10, period=1, burst=4, now=0.0)
    assert takes(bucket, 0.0, 4) == [True] * 4
    assert takes(bucket, 3600.0, 5) == [True, True, True, True, False]


def test_per_minute_and_per_hour_rates() -> None:
    minute = TokenBucket(count=1, period=60, burst=1, now=0.0)
    assert takes(minute, 0.0, 2) == [True, False]
    assert not minute.take(59.999)
    assert minute.take(60.0)
    hour = TokenBucket(count=3, period=3600, burst=1, now=0.0)  # one every 1200 s
    assert hour.take(0.0)
    assert not hour.take(1199.0)
    assert hour.take(1200.0)


def test_clock_stepping_back_refills_nothing() -> None:
    bucket = TokenBucket(count=1, period=1, burst=1, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)  # earlier than the last update: no credit, no error
    assert not bucket.take(10.5)  # measured from 10.0, not from 5.0
    assert bucket.take(11.0)


def test_rule_limiter_shares_one_bucket_between_sources() -> None:
    limiter = RuleLimiter(count=1, period=1, burst=2)
    assert [limiter.allow(source, 0.0) for source in (b"\x01" * 4, b"\x02" * 4, b"\x03" * 4)] == [
        True,
        True,
        False,
    ]
    assert limiter.allow(b"\x04" * 4, 1.0)


def test_rule_limiter_starts_its_bucket_at_first_use() -> None:
    limiter = RuleLimiter(count=1, period=1, burst=1)
    assert limiter.allow(b"a", 500.0)
    assert not limiter.allow(b"a", 500.5)
    assert limiter.allow(b"a", 501.0)


def test_source_limiter_gives_each_source_its_bucket() -> None:
    limiter = SourceLimiter(count=1, period=1, burst=2)
    a, b = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
    assert [limiter.allow(a, 0.0) for _ in range(3)] == [True, True, False]
    assert [limiter.allow(b, 0.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow(a, 1.0) and not limiter.allow(a, 1.0)
    assert len(limiter) == 2


def test_source_limiter_evicts_the_least_recently_used() -> None:
    limiter = SourceLimiter(count=1, period=60, burst=1, max_sources=2)
    a, b, c = b"a" * 16, b"b" * 16, b"c" * 16
    assert limiter.allow(a, 0.0) and limiter.allow(b, 0.0)
    assert not limiter.allow(a, 1.0)  # a used again: b is now the least recent
    assert limiter.allow(c, 2.0)  # table full: b goes
    assert len(limiter) == 2
    assert (a in limiter, b in limiter, c in limiter) == (True, False, True)
    assert not limiter.allow(a, 3.0)  # a kept its empty bucket
    assert limiter.allow(b, 3.0)  # b comes back with a full bucket, evicting c (a was used at 3.0)
    assert (a in limiter, b in limiter, c in limiter) == (True, True, False)
