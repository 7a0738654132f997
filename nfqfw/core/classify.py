"""First-match rule lookup by per-field candidate bitsets (the "bit vector" packet classifier).

A list of N rules is compiled into *dimensions*, one per field that some rule constrains:
protocol (with the family and the later-fragment test), destination and source address,
destination and source port, ICMP type, in and out interface. A dimension maps the packet's
value of its field to a bitset -- a Python int -- of the rules whose condition on that field the
value meets; a rule that leaves the field open is in every bitset of that dimension. The rules
that match the packet are the AND of its dimensions' bitsets, and the first of them decides.

Invariants:

- Rule i (0-based, in policy order) is bit N-1-i, so the first candidate is the highest set
  bit, found by `int.bit_length()` in constant time; `RuleIndex.by_bit[b]` is the rule of bit b.
- `RuleIndex.candidates()` is exactly the set of rules whose `RuleMatcher.matches` holds (the
  naive scan in `nfqfw.core.policy` is the reference; tests/unit/core/test_classify.py checks
  that the two agree over random policies and packets). Rate limits are not a dimension: the
  caller asks the first candidate's limiter and, when it refuses, goes on with the next bit.
- Ordered values (ports, addresses) are looked up by bisection over sorted interval starts,
  O(log n); protocol, ICMP type and interface name by one dict lookup. Equal bitsets are one
  shared int, so memory grows with the distinct combinations of rules, not with the addresses.
- The AND of two non-negative ints costs the size of the smaller one: a packet that matches
  few rules meets small or empty bitsets early, and the search stops at the first empty one.
- Named sets (`@NAME`): a set's networks become intervals of the address dimension once, with
  the bitset of every rule naming it there (not once per rule): the set's sorted ranges are
  OR-ed into the intervals of the rules' own networks in one merge. A lookup stays one
  bisection (~18 steps for 100,000 networks). A map of many IPv4 intervals keeps its starts in
  an array('I') (4 bytes each). A set's runtime entries (nfqfw.core.sets.RuntimeEntries) are
  not compiled in: an address dimension consults those of the sets it names that have any
  (`refresh_runtime`, after every change), so `nfqfw set add` costs no recompile, and a
  policy without runtime entries pays nothing for them.

A new field is one more dimension: a class whose `lookup(pkt, to_gateway, from_gateway,
in_iface, out_iface)` returns the bitset, built from the rules in `RuleIndex.__init__`.
`from-zone` / `to-zone` are the interface dimensions keyed by the zone the policy's `zone_of`
gives the interface (so wildcards and an exact name's precedence are the zones' own).
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Generic, TypeVar

from nfqfw.core.config import AddressSet, RuleConfig
from nfqfw.core.packet import FRAG_LATER, Packet
from nfqfw.core.sets import EMPTY, RuntimeEntries, SetContent
from nfqfw.core.sets import Ranges as SetRanges
from nfqfw.core.sets import merged as merge_ranges

IFACE_CACHE_SIZE = 1024  # interface names remembered per dimension (wildcards make a miss costly)
ARRAY_INTERVALS = 1024  # an IPv4 map with more intervals keeps its starts in an array('I')
_V4_END = 1 << 32
_BEYOND = 1 << 129  # past every address

Ranges = dict[int, list[tuple[int, int]]]  # bit -> inclusive (first, last) value ranges
Lookup = Callable[[Packet, bool, bool, "str | None", "str | None"], int]
Rule = TypeVar("Rule")
Key = TypeVar("Key")


class Bitsets(Generic[Key]):
    """Bitsets of `size` bits built bit by bit: a bytearray per key, turned into an int once
    (setting a high bit of an int would copy the whole int every time)."""

    def __init__(self, size: int) -> None:
        self._bytes = (size + 7) // 8
        self._keys: dict[Key, bytearray] = {}

    def add(self, key: Key, bit: int) -> None:
        data = self._keys.get(key)
        if data is None:
            data = self._keys[key] = bytearray(self._bytes)
        data[bit >> 3] |= 1 << (bit & 7)

    def get(self, key: Key) -> int:
        data = self._keys.get(key)
        return 0 if data is None else int.from_bytes(data, "little")

    def items(self) -> Iterable[tuple[Key, int]]:
        return ((key, int.from_bytes(data, "little")) for key, data in self._keys.items())


class Interner:
    """One int object per distinct bitset value (bitsets repeat: most intervals of a dimension
    hold the same few combinations of rules)."""

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}

    def __call__(self, bits: int) -> int:
        return self._seen.setdefault(bits, bits)

    def __len__(self) -> int:
        return len(self._seen)


class IntervalMap:
    """Non-negative values (ports, addresses as ints) -> bitset: sorted interval starts and the
    bitset of each interval; values no range covers get `open_bits`.

    Built by a sweep over the ranges' boundaries, toggling each rule's bit in a bytearray at
    the start of its range and after its end (a rule's ranges are merged first, so its bit is
    never toggled twice at one point). Neighbouring intervals with equal bitsets (the same
    object, being interned) are joined."""

    __slots__ = ("masks", "starts")

    def __init__(
        self,
        ranges: Ranges,
        open_bits: int,
        size: int,
        intern: Interner,
        overlays: Sequence[tuple[int, SetRanges]] = (),
    ) -> None:
        toggles: dict[int, list[int]] = {}
        for bit, rule_ranges in ranges.items():
            for first, last in merge_ranges(rule_ranges):
                toggles.setdefault(first, []).append(bit)
                toggles.setdefault(last + 1, []).append(bit)
        current = bytearray((size + 7) // 8)
        self.starts: list[int] = [0]
        self.masks: list[int] = [intern(open_bits)]
        for point in sorted(toggles):
            for bit in toggles[point]:
                current[bit >> 3] ^= 1 << (bit & 7)
            mask = intern(open_bits | int.from_bytes(current, "little"))
            if point == 0:
                self.masks[0] = mask
            elif mask is not self.masks[-1]:
                self.starts.append(point)
                self.masks.append(mask)
        for bits, ranges_of_set in overlays:
            if len(ranges_of_set):
                self._overlay(bits, ranges_of_set, intern)
        if overlays and overlays[0][1].family == 4 and len(self.starts) > ARRAY_INTERVALS:
            while self.starts[-1] >= _V4_END:  # past the last address: never looked up
                self.starts.pop()
                self.masks.pop()
            self.starts = array("I", self.starts)  # type: ignore[assignment]

    def _overlay(self, bits: int, ranges: SetRanges, intern: Interner) -> None:
        """OR `bits` into every value of `ranges` (sorted, disjoint, non-adjacent): one merge of
        the interval starts with the ranges' bounds."""
        starts, masks = self.starts, self.masks
        firsts, lasts = ranges.firsts, ranges.lasts
        count, total = len(starts), len(firsts)
        out_starts: list[int] = []
        out_masks: list[int] = []
        index = set_index = 0
        inside = False
        base = masks[0]
        point = 0
        while True:
            if index < count and starts[index] == point:
                base = masks[index]
                index += 1
            if set_index < total:
                if inside and lasts[set_index] + 1 == point:
                    inside = False
                    set_index += 1
                if not inside and set_index < total and firsts[set_index] == point:
                    inside = True
            mask = intern(base | bits) if inside else base
            if not out_masks or mask is not out_masks[-1]:
                out_starts.append(point)
                out_masks.append(mask)
            next_start = starts[index] if index < count else _BEYOND
            if set_index < total:
                next_bound = lasts[set_index] + 1 if inside else firsts[set_index]
            else:
                next_bound = _BEYOND
            point = min(next_start, next_bound)
            if point == _BEYOND:
                break
        self.starts, self.masks = out_starts, out_masks

    def __getitem__(self, value: int) -> int:
        return self.masks[bisect_right(self.starts, value) - 1]


ZoneOf = Callable[["str | None"], "str | None"]


def _no_zones(iface: str | None) -> str | None:
    return None


class _Builder:
    """What every dimension needs while it is built: the bit of a rule, the interner, the
    networks of the sets the rules name and the zone of an interface (for from-zone / to-zone)."""

    def __init__(
        self,
        rules: Sequence[RuleConfig],
        intern: Interner,
        sets: Mapping[str, SetContent] | None = None,
        zone_of: ZoneOf = _no_zones,
    ) -> None:
        self.rules = rules
        self.size = len(rules)
        self.intern = intern
        self.sets = sets or {}
        self.zone_of = zone_of

    def bits(self) -> Iterable[tuple[int, RuleConfig]]:
        """(bit, rule) in policy order."""
        top = self.size - 1
        return ((top - index, rule) for index, rule in enumerate(self.rules))

    def open_bits(self, constrains: Callable[[RuleConfig], bool]) -> int:
        """The bitset of the rules that leave the field open."""
        builder: Bitsets[None] = Bitsets(self.size)
        for bit, rule in self.bits():
            if not constrains(rule):
                builder.add(None, bit)
        return builder.get(None)


class ProtocolDimension:
    """Family, protocol and "is a later fragment" in one dict lookup (`RuleIndex.candidates`
    reads the table itself); always present.

    A fragment after the first has no L4 header: it never matches a rule that names ports,
    sports or ICMP types (the entries for later fragments leave those rules out)."""

    __slots__ = ("table",)

    def __init__(self, build: _Builder) -> None:
        bitsets: Bitsets[tuple[int, bool, int | None]] = Bitsets(build.size)
        for bit, rule in build.bits():
            needs_l4 = rule.dports is not None or rule.sports is not None or rule.icmp_types_v4 is not None
            protocols = (None,) if rule.protocols is None else rule.protocols
            for family in (4, 6):
                for later in (False, True):
                    if rule.family in (None, family) and not (later and needs_l4):
                        for proto in protocols:
                            bitsets.add((family, later, proto), bit)
        self.table: dict[int, int] = {}
        for family in (4, 6):
            for later in (False, True):
                any_protocol = build.intern(bitsets.get((family, later, None)))
                for proto in range(256):
                    self.table[family << 9 | later << 8 | proto] = any_protocol
        for (family, later, proto), bits in bitsets.items():
            if proto is not None:  # a protocol some rule names: its own rules too
                key = family << 9 | later << 8 | proto
                self.table[key] = build.intern(self.table[key] | bits)


class _AddressDimension:
    """`from` or `to`: the networks of both families (the rules' own and their sets'), the rules
    that name the gateway, and the runtime entries of the sets named here that have some."""

    __slots__ = ("gateway", "runtime", "set_bits", "v4", "v6")

    def __init__(self, build: _Builder, field: Callable[[RuleConfig], AddressSet | None]) -> None:
        ranges: dict[int, Ranges] = {4: {}, 6: {}}
        gateway: Bitsets[None] = Bitsets(build.size)
        named: Bitsets[str] = Bitsets(build.size)  # set name -> the rules naming it here
        for bit, rule in build.bits():
            addresses = field(rule)
            if addresses is None:
                continue
            if addresses.gateway:
                gateway.add(None, bit)
            for network in addresses.networks:
                first = int(network.network_address)
                last = (
                    first + (1 << (network.max_prefixlen - network.prefixlen)) - 1
                )  # not num_addresses: slow
                ranges[network.version].setdefault(bit, []).append((first, last))
            for name in addresses.sets:
                named.add(name, bit)
        open_bits = build.open_bits(lambda rule: field(rule) is not None)
        # set name -> (its rules' bitset): the sets' networks go in once, whatever uses them
        self.set_bits: tuple[tuple[str, int], ...] = tuple(
            (name, build.intern(bits)) for name, bits in named.items()
        )
        overlays = {
            family: [(bits, build.sets.get(name, EMPTY).family(family)) for name, bits in self.set_bits]
            for family in (4, 6)
        }
        self.v4 = IntervalMap(ranges[4], open_bits, build.size, build.intern, overlays[4])
        self.v6 = IntervalMap(ranges[6], open_bits, build.size, build.intern, overlays[6])
        self.gateway = build.intern(gateway.get(None))
        self.runtime: tuple[tuple[RuntimeEntries, int], ...] = ()  # (entries, bits) of sets with some

    def runtime_bits(self, raw: bytes) -> int:
        bits = 0
        for entries, set_bits in self.runtime:
            if entries.contains(raw):
                bits |= set_bits
        return bits


class DestinationAddress(_AddressDimension):
    def __init__(self, build: _Builder) -> None:
        super().__init__(build, lambda rule: rule.dst)

    def lookup(
        self, pkt: Packet, to_gateway: bool, from_gateway: bool, in_iface: str | None, out_iface: str | None
    ) -> int:
        raw = pkt.dst
        bits = (self.v4 if len(raw) == 4 else self.v6)[int.from_bytes(raw, "big")]
        return bits | self.gateway if to_gateway else bits

    def lookup_runtime(
        self, pkt: Packet, to_gateway: bool, from_gateway: bool, in_iface: str | None, out_iface: str | None
    ) -> int:
        """`lookup` and the runtime entries of the sets named here (only while some have any)."""
        raw = pkt.dst
        bits = (self.v4 if len(raw) == 4 else self.v6)[int.from_bytes(raw, "big")] | self.runtime_bits(raw)
        return bits | self.gateway if to_gateway else bits


class SourceAddress(_AddressDimension):
    def __init__(self, build: _Builder) -> None:
        super().__init__(build, lambda rule: rule.src)

    def lookup(
        self, pkt: Packet, to_gateway: bool, from_gateway: bool, in_iface: str | None, out_iface: str | None
    ) -> int:
        raw = pkt.src
        bits = (self.v4 if len(raw) == 4 else self.v6)[int.from_bytes(raw, "big")]
        return bits | self.gateway if from_gateway else bits

    def lookup_runtime(
        self, pkt: Packet, to_gateway: bool, from_gateway: bool, in_iface: str | None, out_iface: str | None
    ) -> int:
        """`lookup` and the runtime entries of the sets named here (only while some have any)."""
        raw = pkt.src
        bits = (self.v4 if len(raw) == 4 else self.v6)[int.from_bytes(raw, "big")] | self.runtime_bits(raw)
        return bits | self.gateway if from_gateway else bits


class _PortDimension:
    __slots__ = ("map",)

    def __init__(
        self, build: _Builder, field: Callable[[RuleConfig], tuple[tuple[int, int], ...] | None]
    ) -> None:
        ranges: Ranges = {}
        for bit, rule in build.bits():
            port_ranges = field(rule)
            if port_ranges is not None:
                ranges[bit] = list(port_ranges)
        open_bits = build.open_bits(lambda rule: field(rule) is not None)
        self.map = IntervalMap(ranges, open_bits, build.size, build.intern)


class DestinationPort(_PortDimension):
    def __init__(self, build: _Builder) -> None:
        super().__init__(build, lambda rule: rule.dports)

    def lookup(
        self, pkt: Packet, to_gateway: bool, from_gateway: bool, in_iface: str | None, out_iface: str | None
    ) -> int:
        return self.map[pkt.dport]


class SourcePort(_PortDimension):
    def __init__(self, build: _Builder) -> None:
        super().__init__(build, lambda rule: rule.sports)

    def lookup(
        self, pkt: Packet, to_gateway: bool, from_gateway: bool, in_iface: str | None, out_iface: str | None
    ) -> int:
        return self.map[pkt.sport]


class IcmpType:
    """ICMP types per family: one dict lookup keyed by (family, type); type -1 (not ICMP) too."""

    __slots__ = ("table",)

    def __init__(self, build: _Builder) -> None:
        bitsets: Bitsets[tuple[int, int]] = Bitsets(build.size)
        for bit, rule in build.bits():
            if rule.icmp_types_v4 is not None:
                for family, types in ((4, rule.icmp_types_v4), (6, rule.icmp_types_v6 or ())):
                    for icmp_type in types:
                        bitsets.add((family, icmp_type), bit)
        open_bits = build.intern(build.open_bits(lambda rule: rule.icmp_types_v4 is not None))
        self.table = {
            self.key(family, icmp_type): open_bits for family in (4, 6) for icmp_type in range(-1, 256)
        }
        for (family, icmp_type), bits in bitsets.items():
            self.table[self.key(family, icmp_type)] = build.intern(open_bits | bits)

    @staticmethod
    def key(family: int, icmp_type: int) -> int:
        return (family << 9) + icmp_type + 1

    def lookup(
        self, pkt: Packet, to_gateway: bool, from_gateway: bool, in_iface: str | None, out_iface: str | None
    ) -> int:
        return self.table[(pkt.family << 9) + pkt.icmp_type + 1]


class _InterfaceDimension:
    """`in` or `out`: exact names and prefixes ("ppp+"); a name's bitset is computed on its first
    packet and cached (the names a gateway sees are few)."""

    __slots__ = ("_cache", "_exact", "_open", "_prefixes")

    def __init__(self, build: _Builder, field: Callable[[RuleConfig], tuple[str, ...] | None]) -> None:
        exact: Bitsets[str] = Bitsets(build.size)
        prefixes: Bitsets[str] = Bitsets(build.size)
        for bit, rule in build.bits():
            for name in field(rule) or ():
                if name.endswith("+"):
                    prefixes.add(name[:-1], bit)
                else:
                    exact.add(name, bit)
        self._open = build.intern(build.open_bits(lambda rule: field(rule) is not None))
        self._exact = dict(exact.items())
        self._prefixes = tuple(prefixes.items())
        self._cache: dict[str | None, int] = {}

    def bits_of(self, name: str | None) -> int:
        bits = self._cache.get(name)
        if bits is not None:
            return bits
        bits = self._open
        if name is not None:
            bits |= self._exact.get(name, 0)
            for prefix, prefix_bits in self._prefixes:
                if name.startswith(prefix):
                    bits |= prefix_bits
        if len(self._cache) >= IFACE_CACHE_SIZE:
            self._cache.clear()
        self._cache[name] = bits
        return bits


class InInterface(_InterfaceDimension):
    def __init__(self, build: _Builder) -> None:
        super().__init__(build, lambda rule: rule.in_ifaces)

    def lookup(
        self, pkt: Packet, to_gateway: bool, from_gateway: bool, in_iface: str | None, out_iface: str | None
    ) -> int:
        bits = self._cache.get(in_iface)
        return self.bits_of(in_iface) if bits is None else bits


class OutInterface(_InterfaceDimension):
    def __init__(self, build: _Builder) -> None:
        super().__init__(build, lambda rule: rule.out_ifaces)

    def lookup(
        self, pkt: Packet, to_gateway: bool, from_gateway: bool, in_iface: str | None, out_iface: str | None
    ) -> int:
        bits = self._cache.get(out_iface)
        return self.bits_of(out_iface) if bits is None else bits


class _ZoneDimension:
    """`from-zone` or `to-zone`: the zone of the in / out interface (zone_of), its bitset cached
    per interface name as the interface dimensions do."""

    __slots__ = ("_by_zone", "_cache", "_open", "_zone_of")

    def __init__(self, build: _Builder, field: Callable[[RuleConfig], tuple[str, ...] | None]) -> None:
        zones: Bitsets[str] = Bitsets(build.size)
        for bit, rule in build.bits():
            for zone in field(rule) or ():
                zones.add(zone, bit)
        self._open = build.intern(build.open_bits(lambda rule: field(rule) is not None))
        self._by_zone = {zone: build.intern(self._open | bits) for zone, bits in zones.items()}
        self._zone_of = build.zone_of
        self._cache: dict[str | None, int] = {}

    def bits_of(self, name: str | None) -> int:
        bits = self._cache.get(name)
        if bits is not None:
            return bits
        zone = self._zone_of(name)
        bits = self._open if zone is None else self._by_zone.get(zone, self._open)
        if len(self._cache) >= IFACE_CACHE_SIZE:
            self._cache.clear()
        self._cache[name] = bits
        return bits


class FromZone(_ZoneDimension):
    def __init__(self, build: _Builder) -> None:
        super().__init__(build, lambda rule: rule.from_zones)

    def lookup(
        self, pkt: Packet, to_gateway: bool, from_gateway: bool, in_iface: str | None, out_iface: str | None
    ) -> int:
        bits = self._cache.get(in_iface)
        return self.bits_of(in_iface) if bits is None else bits


class ToZone(_ZoneDimension):
    def __init__(self, build: _Builder) -> None:
        super().__init__(build, lambda rule: rule.to_zones)

    def lookup(
        self, pkt: Packet, to_gateway: bool, from_gateway: bool, in_iface: str | None, out_iface: str | None
    ) -> int:
        bits = self._cache.get(out_iface)
        return self.bits_of(out_iface) if bits is None else bits


# Each optional dimension, and what makes a rule constrain its field. The order is the order of
# the ANDs: the fields most policies make selective first, so misses stop early.
DIMENSIONS: tuple[tuple[type, Callable[[RuleConfig], bool]], ...] = (
    (DestinationAddress, lambda rule: rule.dst is not None),
    (DestinationPort, lambda rule: rule.dports is not None),
    (SourceAddress, lambda rule: rule.src is not None),
    (SourcePort, lambda rule: rule.sports is not None),
    (IcmpType, lambda rule: rule.icmp_types_v4 is not None),
    (InInterface, lambda rule: rule.in_ifaces is not None),
    (OutInterface, lambda rule: rule.out_ifaces is not None),
    (FromZone, lambda rule: rule.from_zones is not None),
    (ToZone, lambda rule: rule.to_zones is not None),
)


class RuleIndex(Generic[Rule]):
    """The first-match index of one rule list (see the module docstring).

    `by_bit[b]` is the object given for the rule of bit b (the policy's compiled rule, with its
    decision and rate limiter)."""

    __slots__ = ("by_bit", "dimensions", "distinct_bitsets", "lookups", "protocol")

    def __init__(
        self,
        rules: Sequence[RuleConfig],
        compiled: Sequence[Rule],
        sets: Mapping[str, SetContent] | None = None,
        zone_of: ZoneOf = _no_zones,
    ) -> None:
        intern = Interner()
        build = _Builder(rules, intern, sets, zone_of)
        self.by_bit: tuple[Rule, ...] = tuple(reversed(compiled))
        self.protocol = ProtocolDimension(build)
        self.dimensions = tuple(
            kind(build) for kind, constrains in DIMENSIONS if any(constrains(rule) for rule in rules)
        )
        self.lookups: tuple[Lookup, ...] = tuple(dimension.lookup for dimension in self.dimensions)
        self.distinct_bitsets = len(intern)

    def refresh_runtime(self, entries_of: Callable[[str], RuntimeEntries]) -> None:
        """The sets' runtime entries changed: each address dimension consults those of its sets
        that have any (and its plain lookup again when none has)."""
        for dimension in self.dimensions:
            if isinstance(dimension, _AddressDimension):
                dimension.runtime = tuple(
                    (entries, bits) for name, bits in dimension.set_bits if (entries := entries_of(name))
                )
        self.lookups = tuple(
            dimension.lookup_runtime
            if isinstance(dimension, _AddressDimension) and dimension.runtime
            else dimension.lookup
            for dimension in self.dimensions
        )

    def candidates(
        self, pkt: Packet, to_gateway: bool, from_gateway: bool, in_iface: str | None, out_iface: str | None
    ) -> int:
        """The bitset of the rules matching the packet (limits aside); highest bit first."""
        bits = self.protocol.table[pkt.family << 9 | (pkt.frag == FRAG_LATER) << 8 | pkt.proto]
        for lookup in self.lookups:
            if not bits:
                return 0
            bits &= lookup(pkt, to_gateway, from_gateway, in_iface, out_iface)
        return bits
