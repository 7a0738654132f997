"""nfqfw.firewall.marks: the mark bits, defined once, and their fields."""

from __future__ import annotations

import pytest

from nfqfw.firewall.marks import DEFAULT_CONN_MARK, DEFAULT_MARK, Marks, get, put


def test_the_default_layout() -> None:
    marks = Marks()
    assert (marks.accept, marks.conn) == (DEFAULT_MARK, DEFAULT_CONN_MARK) == (0x10000000, 0x2FFF0000)
    assert (marks.offload, marks.owner, marks.rule) == (0x20000000, 0x0F000000, 0x00FF0000)
    assert marks.max_owners == 15
    assert [marks.owner_mark(i) for i in (0, 1, 14)] == [0x01000000, 0x02000000, 0x0F000000]
    assert [marks.owner_index(m) for m in (0, 0x01000000, 0x2F123456)] == [None, 0, 14]


def test_fields_spread_over_any_mask() -> None:
    assert put(0b101, 0b1010_1000) == 0b1000_1000
    assert get(0b1000_1000 | 0b0101_0111, 0b1010_1000) == 0b101
    assert all(get(put(v, 0xF0F0), 0xF0F0) == v for v in range(256))
    with pytest.raises(ValueError, match="does not fit"):
        put(16, 0xF0)
    scattered = Marks(accept=0x4, conn=0b1011_0011)
    assert (scattered.offload, scattered.owner, scattered.rule) == (0x80, 0b0011_0011, 0)
    assert scattered.owner_mark(2) == 0b11  # value 3 over the owner bits, lowest first


def test_rule_field_names_the_rule_that_admitted() -> None:
    marks = Marks()
    reasons = ["rule mail", "rule dns"]
    table = marks.rule_marks(reasons)
    assert table == {
        "default ingress": 0x010000,
        "default egress": 0x020000,
        "rule mail": 0x030000,
        "rule dns": 0x040000,
    }
    for reason, bits in table.items():
        assert marks.reason_of(0x20000000 | 0x01000000 | bits, reasons) == reason
    assert marks.reason_of(0, reasons) is None
    assert marks.reason_of(0x500000, reasons) is None  # a rule of a longer policy: unknown
    small = Marks(conn=0x2F030000)  # 2 rule bits: the defaults and one rule
    assert small.rule_marks(reasons) == {
        "default ingress": 0x10000,
        "default egress": 0x20000,
        "rule mail": 0x30000,
    }


def test_bits_never_shared() -> None:
    with pytest.raises(ValueError, match="must not share a bit with 0x10000000"):
        Marks(conn=0x30000000)
    with pytest.raises(ValueError, match="bad mark"):
        Marks(accept=0)
    none = Marks(conn=0)
    assert (none.offload, none.owner, none.rule, none.max_owners) == (0, 0, 0, 0)
