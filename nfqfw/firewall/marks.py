"""The packet and connection mark bits nfqfw uses: defined here, once.

Two options place them, so a host that uses marks of its own (policy routing, another daemon)
can move nfqfw's out of the way:

- `--mark` (ACCEPT, default 0x10000000): set on every packet nfqfw accepts (with NF_REPEAT) so
  that nfqfw's rules let it by when the hook runs again (nfqfw.firewall.iptables);
- `--conn-mark` (default 0x2fff0000, no bit shared with --mark): bits nfqfw keeps in the
  kernel's connection mark, copied from the packet mark by CONNMARK --save-mark rules. From the
  highest bit down:
  * offload (0x20000000): nfqfw handed the connection over to the kernel (`offload:
    established`); its packets skip the queue. On a packet queued to nfqfw the bit says that
    the kernel's conntrack called it INVALID (a rule before the queue sets it, with offload);
  * owner (the next OWNER_BITS bits, 0x0f000000): 1 + the index, in the queue range, of the
    worker that accepted the connection (`--workers`); RELATED packets (ICMP errors about it)
    are sent to that worker's queue, whatever queue the kernel's hash would pick;
  * rule (the remaining bits, 0x00ff0000): what admitted the connection (RULE_UNKNOWN,
    1 "default ingress", 2 "default egress", 3.. the policy's rules in order, ingress first),
    so that a connection in the kernel's hands still tells its rule.

Two more packet-mark bits, outside both (FORWARDED_MARK, HAIRPIN_MARK): nfqfw's nat rules set
them on the first packet of a connection one of its forwards translated (the adapter reads it:
Meta.forwarded), and of one translated from the inside (hairpin), whose source is then
translated too. They live on that packet only, from nat PREROUTING to nat POSTROUTING, and must
share no bit with the connection mark: CONNMARK --save-mark would copy them into it.

A field's value is spread over its mask's set bits, lowest first (`put`/`get`), so a mask need
not be contiguous. Values that do not fit (a 16th worker with 4 owner bits, a 254th rule with 8
rule bits) are not encoded: the owner is refused at start, the rule reads as unknown.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_MARK = 0x10000000
DEFAULT_CONN_MARK = 0x2FFF0000
FORWARDED_MARK = 0x80000000
HAIRPIN_MARK = 0x40000000
OWNER_BITS = 4
RULE_UNKNOWN = 0
DEFAULT_REASONS = ("default ingress", "default egress")  # rule field values 1 and 2


def bits_of(mask: int) -> list[int]:
    """The set bits of `mask`, lowest first, as single-bit values."""
    return [1 << n for n in range(32) if mask >> n & 1]


def put(value: int, mask: int) -> int:
    """`value` spread over the set bits of `mask`, lowest first; ValueError when it does not fit."""
    out = 0
    for bit in bits_of(mask):
        if value & 1:
            out |= bit
        value >>= 1
    if value:
        raise ValueError(f"value does not fit mask 0x{mask:x}")
    return out


def get(mark: int, mask: int) -> int:
    """The value spread over the set bits of `mask` in `mark` (the inverse of put)."""
    value = 0
    for n, bit in enumerate(bits_of(mask)):
        if mark & bit:
            value |= 1 << n
    return value


def capacity(mask: int) -> int:
    """The largest value a field of this mask holds."""
    return (1 << len(bits_of(mask))) - 1


@dataclass(frozen=True)
class Marks:
    """nfqfw's mark bits (see the module docstring): `accept` and the connection bits `conn`."""

    accept: int = DEFAULT_MARK
    conn: int = DEFAULT_CONN_MARK

    def __post_init__(self) -> None:
        if not 0 < self.accept <= 0xFFFFFFFF:
            raise ValueError(f"bad mark 0x{self.accept:x}")
        if not 0 <= self.conn <= 0xFFFFFFFF or self.conn & self.accept:
            raise ValueError(
                f"bad connection mark 0x{self.conn:x} (must not share a bit with 0x{self.accept:x})"
            )

    @property
    def offload(self) -> int:
        """The offload bit (0: no connection bits at all)."""
        bits = bits_of(self.conn)
        return bits[-1] if bits else 0

    @property
    def owner(self) -> int:
        """The owner field's mask: the OWNER_BITS bits below the offload bit."""
        return sum(bits_of(self.conn)[-1 - OWNER_BITS : -1]) if len(bits_of(self.conn)) > 1 else 0

    @property
    def rule(self) -> int:
        """The rule field's mask: the connection bits below the owner field."""
        return self.conn & ~(self.offload | self.owner)

    @property
    def max_owners(self) -> int:
        """How many workers' queues the owner field tells apart."""
        return capacity(self.owner)

    def owner_mark(self, index: int) -> int:
        """The owner field for the worker of the queue at `index` in the range (0-based)."""
        return put(index + 1, self.owner)

    def owner_index(self, mark: int) -> int | None:
        """The queue index in a connection mark's owner field, None when it names no owner."""
        value = get(mark, self.owner)
        return None if value == 0 else value - 1

    def rule_marks(self, reasons: Iterable[str]) -> dict[str, int]:
        """Verdict reason ("rule NAME", "default ingress", ...) -> its rule field, for the reasons
        of a policy's rules in order (the defaults come first, then these); those past the
        field's capacity are left out (unknown)."""
        limit = capacity(self.rule)
        table = {}
        for code, reason in enumerate((*DEFAULT_REASONS, *reasons), start=1):
            if code > limit:
                break
            table[reason] = put(code, self.rule)
        return table

    def reason_of(self, mark: int, reasons: Iterable[str]) -> str | None:
        """The verdict reason a connection mark's rule field names (None: unknown), read
        against the same reasons as rule_marks."""
        code = get(mark, self.rule)
        if code == RULE_UNKNOWN:
            return None
        known = (*DEFAULT_REASONS, *reasons)
        return known[code - 1] if code <= len(known) else None
