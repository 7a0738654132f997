"""nfqfw.core.expiry: items expire exactly when due and are re-filed when their deadline moved."""

from __future__ import annotations

from nfqfw.core.expiry import ExpiryWheel


class Item:
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline


def collect(wheel: ExpiryWheel, now: float) -> list[Item]:
    expired: list[Item] = []

    def expire(item: object) -> bool:
        assert isinstance(item, Item)
        expired.append(item)
        return True

    wheel.sweep(now, expire)
    return expired


def test_empty_wheel_has_nothing_due() -> None:
    wheel = ExpiryWheel()
    assert wheel.next_due() is None
    assert collect(wheel, 1e9) == []


def test_item_filed_in_the_second_after_its_deadline() -> None:
    wheel = ExpiryWheel()
    wheel.file(Item(10.5))
    assert wheel.next_due() == 11
    wheel.file(Item(10.0))
    assert wheel.next_due() == 11
    wheel.file(Item(3.0))
    assert wheel.next_due() == 4


def test_expired_exactly_when_due() -> None:
    wheel = ExpiryWheel()
    item = Item(10.0)
    wheel.file(item)
    assert collect(wheel, 10.999) == []
    assert wheel.next_due() == 11
    assert collect(wheel, 11.0) == [item]
    assert wheel.next_due() is None


def test_items_expire_in_deadline_order_only_when_passed() -> None:
    wheel = ExpiryWheel()
    late, early, middle = Item(30.0), Item(5.0), Item(12.0)
    for item in (late, early, middle):
        wheel.file(item)
    assert collect(wheel, 6.0) == [early]
    assert collect(wheel, 13.0) == [middle]
    assert collect(wheel, 31.0) == [late]


def test_item_whose_deadline_moved_is_refiled_not_expired() -> None:
    wheel = ExpiryWheel()
    item = Item(10.0)
    wheel.file(item)
    item.deadline = 25.0  # refreshed by traffic: only the field moves
    assert collect(wheel, 11.0) == []
    assert wheel.next_due() == 26
    assert collect(wheel, 25.9) == []
    assert collect(wheel, 26.0) == [item]


def test_sweep_checks_deadline_against_now_within_bucket() -> None:
    # An item whose deadline is later than `now` but in a passed bucket's second is re-filed.
    wheel = ExpiryWheel()
    item = Item(10.0)
    wheel.file(item)
    item.deadline = 11.5
    assert collect(wheel, 11.2) == []
    assert wheel.next_due() == 12
    assert collect(wheel, 12.0) == [item]


def test_expire_callback_false_for_gone_items_is_tolerated() -> None:
    wheel = ExpiryWheel()
    wheel.file(Item(1.0))
    wheel.file(Item(1.2))
    seen: list[object] = []

    def expire(item: object) -> bool:
        seen.append(item)
        return False

    wheel.sweep(5.0, expire)
    assert len(seen) == 2
    assert wheel.next_due() is None


def test_clear_forgets_everything() -> None:
    wheel = ExpiryWheel()
    wheel.file(Item(1.0))
    wheel.clear()
    assert wheel.next_due() is None
    assert collect(wheel, 100.0) == []


def test_each_item_is_visited_once_per_bucket() -> None:
    wheel = ExpiryWheel()
    items = [Item(float(i % 7)) for i in range(100)]
    for item in items:
        wheel.file(item)
    visits = 0

    def expire(item: object) -> bool:
        nonlocal visits
        visits += 1
        return True

    wheel.sweep(3.0, expire)
    assert visits == sum(1 for i in range(100) if i % 7 + 1 <= 3)
    wheel.sweep(8.0, expire)
    assert visits == 100


class Gone(Item):
    """An item its owner may remove: then its deadline reads None."""

    deadline: float | None  # type: ignore[assignment]


def test_filed_counts_entries_live_and_dead() -> None:
    wheel = ExpiryWheel()
    items = [Gone(float(i)) for i in range(10)]
    for item in items:
        wheel.file(item)
    assert wheel.filed == 10
    items[3].deadline = None  # removed early: its entry stays until compacted or due
    assert wheel.filed == 10
    collect(wheel, 2.5)  # buckets 1 and 2: items 0 and 1
    assert wheel.filed == 8


def test_compact_drops_the_dead_entries_and_their_empty_buckets() -> None:
    wheel = ExpiryWheel()
    items = [Gone(float(i)) for i in range(10)]
    for item in items:
        wheel.file(item)
    for item in items[:5]:
        item.deadline = None
    due = wheel.due
    wheel.compact({id(item) for item in items[5:]})
    assert wheel.filed == 5
    assert wheel.due is due  # a fast path binds the list once
    assert list(due) == [6, 7, 8, 9, 10]
    assert wheel.next_due() == 6
    assert collect(wheel, 100.0) == items[5:]  # the live ones still expire, in order
    assert wheel.filed == 0


def test_compact_keeps_the_heap_order_for_refiled_items() -> None:
    wheel = ExpiryWheel()
    late, early, dead = Gone(50.0), Gone(2.0), Gone(30.0)
    for item in (late, early, dead):
        wheel.file(item)
    dead.deadline = None
    wheel.compact({id(late), id(early)})
    assert collect(wheel, 10.0) == [early]
    assert collect(wheel, 60.0) == [late]


def test_clear_resets_the_count() -> None:
    wheel = ExpiryWheel()
    wheel.file(Item(1.0))
    wheel.clear()
    assert wheel.filed == 0
