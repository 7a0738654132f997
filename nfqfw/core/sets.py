"""Named address sets: what the policy's `sets:` hold, read fast and kept small, and the entries
added at run time (`nfqfw set add`).

A set holds IPv4 and IPv6 networks. Each family's networks are kept as `Ranges`: sorted,
disjoint, merged inclusive integer ranges (an address as int.from_bytes of its raw bytes), so
membership is one bisection, O(log n), whatever the set's size; IPv4 bounds live in
array('I') (4 bytes a value, against ~36 for a Python int in a list: a 100,000-network set
costs under 1 MB), IPv6 bounds in lists. The rule index (nfqfw.core.classify) folds a set's
static ranges into its address intervals at compile time; `contains` here is what the
reference scan, the kernel pre-filter's evaluation and the tests use.

Set files (`{file: PATH}`): one address or network per line; everything after '#' or ';' is a
comment (the Spamhaus DROP and FireHOL formats). `parse_set_text` reads IPv4 without the
ipaddress module (10x faster: a 100,000-line list in ~0.1 s) and reports each bad line as
(line, message).

Runtime entries (`RuntimeSets`, one per engine, kept across reloads and, by the service, across
restarts) are a set's second part: hosts in a dict keyed by their raw bytes, networks as small
`Ranges` rebuilt when they change, each entry with an optional expiry time on the engine's
clock. `CompiledPolicy.refresh_runtime` makes the rule index consult the sets that have some.
"""

from __future__ import annotations

import ipaddress
import re
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
BITS = {4: 32, 6: 128}
WIDTH = {4: 4, 6: 16}  # raw address bytes per family
COMMENT_CHARS = ("#", ";")
ARRAY_AT = 64  # IPv4 ranges of at least this many values are kept in arrays (smaller: lists)


def network_range(network: Network) -> tuple[int, int]:
    """The inclusive integer range of a network (not num_addresses: slow)."""
    first = int(network.network_address)
    return first, first + (1 << (network.max_prefixlen - network.prefixlen)) - 1


def merged(pairs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-adjacent inclusive ranges covering the same values."""
    out: list[tuple[int, int]] = []
    for first, last in sorted(pairs):
        if out and first <= out[-1][1] + 1:
            if last > out[-1][1]:
                out[-1] = (out[-1][0], last)
        else:
            out.append((first, last))
    return out


class Ranges:
    """One family's addresses of a set: sorted, disjoint inclusive ranges; `value in ranges`
    by bisection."""

    __slots__ = ("family", "firsts", "lasts")

    def __init__(self, family: int, pairs: Iterable[tuple[int, int]] = (), *, sorted_disjoint: bool = False):
        pairs = list(pairs) if sorted_disjoint else merged(pairs)
        self.family = family
        if family == 4 and len(pairs) >= ARRAY_AT:
            self.firsts: array[int] | list[int] = array("I", [first for first, _ in pairs])
            self.lasts: array[int] | list[int] = array("I", [last for _, last in pairs])
        else:
            self.firsts = [first for first, _ in pairs]
            self.lasts = [last for _, last in pairs]

    def __contains__(self, value: int) -> bool:
        index = bisect_right(self.firsts, value) - 1
        return index >= 0 and value <= self.lasts[index]

    def __len__(self) -> int:
        return len(self.firsts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self.firsts, self.lasts, strict=True)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Ranges)
            and self.family == other.family
            and list(self.firsts) == list(other.firsts)
            and list(self.lasts) == list(other.lasts)
        )

    def __hash__(self) -> int:
        return hash((self.family, len(self)))

    def addresses(self) -> int:
        return sum(last - first + 1 for first, last in self)

    def cidrs(self) -> Iterator[str]:
        """The ranges as the fewest CIDR networks, in order (what ipset and `set list` take)."""
        bits = BITS[self.family]
        for first, last in self:
            yield from range_cidrs(first, last, bits, self.family)

    def nbytes(self) -> int:
        """Memory of the bounds (arrays: their buffers; lists: pointers and int objects)."""
        if isinstance(self.firsts, array):
            return 2 * len(self.firsts) * self.firsts.itemsize
        return 2 * len(self.firsts) * (8 + (28 if self.family == 4 else 44))


def range_cidrs(first: int, last: int, bits: int, family: int) -> Iterator[str]:
    """The fewest CIDR blocks covering first..last."""
    while first <= last:
        size = (first & -first).bit_length() - 1 if first else bits  # alignment of first
        span = (last - first + 1).bit_length() - 1
        step = min(size, span)
        yield f"{_text(first, family)}/{bits - step}"
        first += 1 << step


def _text(value: int, family: int) -> str:
    if family == 4:
        return f"{value >> 24}.{value >> 16 & 255}.{value >> 8 & 255}.{value & 255}"
    return str(ipaddress.IPv6Address(value))


@dataclass(frozen=True, eq=False)
class SetContent:
    """A set's networks from the policy (inline and file), per family, and how many lines or
    items they were written as."""

    v4: Ranges
    v6: Ranges
    written: int = 0  # networks as written (before merging)

    @classmethod
    def of(
        cls, pairs4: Iterable[tuple[int, int]], pairs6: Iterable[tuple[int, int]], written: int
    ) -> SetContent:
        return cls(Ranges(4, pairs4), Ranges(6, pairs6), written)

    def contains(self, raw: bytes) -> bool:
        return int.from_bytes(raw, "big") in (self.v4 if len(raw) == 4 else self.v6)

    def family(self, family: int) -> Ranges:
        return self.v4 if family == 4 else self.v6

    def __len__(self) -> int:
        """Disjoint ranges, both families."""
        return len(self.v4) + len(self.v6)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SetContent) and self.v4 == other.v4 and self.v6 == other.v6

    def __hash__(self) -> int:
        return hash((self.v4, self.v6))

    def nbytes(self) -> int:
        return self.v4.nbytes() + self.v6.nbytes()

    def cidrs(self) -> list[str]:
        return [*self.v4.cidrs(), *self.v6.cidrs()]


EMPTY = SetContent(Ranges(4), Ranges(6), 0)


# --- set files -------------------------------------------------------------------------------


class SetText(NamedTuple):
    """A set file read: its ranges per family, how many entries, and the bad lines."""

    pairs4: list[tuple[int, int]]
    pairs6: list[tuple[int, int]]
    entries: int
    errors: list[tuple[int, str]]  # (1-based line, message)


# A line holding one IPv4 address or network and maybe a comment: the common case, read for a
# whole file by one findall (octets are checked by _OCTET: no int() per octet).
_V4_LINE = re.compile(
    r"^[ \t]*(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?:/(\d{1,2}))?[ \t]*(?:[#;].*)?$", re.M
)
_CONTENT_LINE = re.compile(r"^[ \t]*[^\s#;]", re.M)
_OCTET = {str(number): number for number in range(256)}  # no leading zeros, nothing above 255
_SIZE = {str(length): 1 << (32 - length) for length in range(33)} | {"": 1}


def parse_set_text(text: str) -> SetText:
    """One address or network per line, '#' and ';' start comments, blank lines ignored."""
    fast = _parse_v4_file(text)
    if fast is not None:
        return fast
    pairs4: list[tuple[int, int]] = []
    pairs6: list[tuple[int, int]] = []
    errors: list[tuple[int, str]] = []
    entries = 0
    for number, line in enumerate(text.splitlines(), 1):
        match = _V4_LINE.match(line)
        if match is not None:
            found = _v4_of(match.groups())
            if found is not None:
                pairs4.append(found)
                entries += 1
                continue
        for mark in COMMENT_CHARS:
            if mark in line:
                line = line[: line.index(mark)]
        words = line.split()
        if not words:
            continue
        if len(words) > 1:
            errors.append((number, f"one address or network per line, got '{line.strip()}'"))
            continue
        word = words[0]
        parsed = parse_v4(word)
        if parsed is None:
            parsed = parse_network(word)
        if isinstance(parsed, str):
            errors.append((number, parsed))
            continue
        entries += 1
        (pairs4 if parsed[0] == 4 else pairs6).append((parsed[1], parsed[2]))
    return SetText(pairs4, pairs6, entries, errors)


def _v4_of(groups: tuple[str, ...]) -> tuple[int, int] | None:
    a, b, c, d, length = groups
    octet, size = _OCTET, _SIZE
    if a not in octet or b not in octet or c not in octet or d not in octet or length not in size:
        return None
    value = octet[a] << 24 | octet[b] << 16 | octet[c] << 8 | octet[d]
    span = size[length]
    return None if value & (span - 1) else (value, value + span - 1)


def _parse_v4_file(text: str) -> SetText | None:
    """A file of IPv4 lines only, all valid, in a few C-speed passes; None otherwise (the lines
    are then read one by one, for IPv6 and for the messages)."""
    found = _V4_LINE.findall(text)
    if len(found) != len(_CONTENT_LINE.findall(text)):
        return None
    octet, size = _OCTET, _SIZE
    try:
        values = [
            (octet[a] << 24 | octet[b] << 16 | octet[c] << 8 | octet[d], size[n]) for a, b, c, d, n in found
        ]
    except KeyError:
        return None
    if any(value & (span - 1) for value, span in values):
        return None
    return SetText([(value, value + span - 1) for value, span in values], [], len(values), [])


def parse_v4(word: str) -> tuple[int, int, int] | str | None:
    """A dotted IPv4 address or network -> (4, first, last); a message when it is an IPv4
    network with host bits set or out of range; None when it is not plain IPv4 (left to
    `parse_network`)."""
    host, slash, length_text = word.partition("/")
    parts = host.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for part in parts:
        if not (part.isascii() and part.isdigit()) or len(part) > 3 or (len(part) > 1 and part[0] == "0"):
            return f"not an address or network: '{word}'"
        octet = int(part)
        if octet > 255:
            return f"not an address or network: '{word}'"
        value = value << 8 | octet
    length = 32
    if slash:
        if (
            not (length_text.isascii() and length_text.isdigit())
            or int(length_text) > 32
            or len(length_text) > 2
        ):
            return f"not an address or network: '{word}'"
        length = int(length_text)
    size = 1 << (32 - length)
    if value & (size - 1):
        return f"'{word}' has host bits set (did you mean {_text(value & -size, 4)}/{length}?)"
    return 4, value, value + size - 1


def parse_network(word: str) -> tuple[int, int, int] | str:
    """Any address or network ipaddress takes -> (family, first, last), else the message."""
    try:
        network = ipaddress.ip_network(word)
    except ValueError:
        try:
            loose = ipaddress.ip_network(word, strict=False)
        except ValueError:
            return f"not an address or network: '{word}'"
        return f"'{word}' has host bits set (did you mean {loose}?)"
    first, last = network_range(network)
    return network.version, first, last


# --- runtime entries -------------------------------------------------------------------------


def parse_entry(text: str) -> Network:
    """`nfqfw set add NAME ADDR`: an address or network (ValueError with the reason)."""
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"not an address or network: '{text}'") from None
    raise ValueError(f"'{text}' has host bits set (did you mean {loose}?)")


class RuntimeEntry(NamedTuple):
    network: Network
    expires: float | None  # on the engine's clock; None: until deleted


class RuntimeEntries:
    """One set's runtime entries: hosts by raw bytes (one dict lookup per packet), networks as
    small Ranges rebuilt on change. `version` grows with every change."""

    __slots__ = ("_nets", "hosts", "nets4", "nets6", "version")

    def __init__(self) -> None:
        self.hosts: dict[bytes, float | None] = {}
        self._nets: dict[Network, float | None] = {}
        self.nets4 = Ranges(4)
        self.nets6 = Ranges(6)
        self.version = 0

    def __len__(self) -> int:
        return len(self.hosts) + len(self._nets)

    def __bool__(self) -> bool:
        return bool(self.hosts) or bool(self._nets)

    def contains(self, raw: bytes) -> bool:
        if raw in self.hosts:
            return True
        nets = self.nets4 if len(raw) == 4 else self.nets6
        return bool(nets.firsts) and int.from_bytes(raw, "big") in nets

    def add(self, network: Network, expires: float | None) -> bool:
        """Add or refresh (a new expiry replaces the old); True when it was not there."""
        if network.prefixlen == network.max_prefixlen:
            raw = network.network_address.packed
            new = raw not in self.hosts
            self.hosts[raw] = expires
        else:
            new = network not in self._nets
            self._nets[network] = expires
            self._rebuild()
        self.version += 1
        return new

    def remove(self, network: Network) -> bool:
        if network.prefixlen == network.max_prefixlen:
            found = self.hosts.pop(network.network_address.packed, False) is not False
        else:
            found = self._nets.pop(network, False) is not False
            if found:
                self._rebuild()
        if found:
            self.version += 1
        return found

    def expire(self, now: float) -> list[Network]:
        """Remove the entries whose time ran out; returns them."""
        gone = [
            entry.network for entry in self.entries() if entry.expires is not None and entry.expires <= now
        ]
        for network in gone:
            self.remove(network)
        return gone

    def next_expiry(self) -> float | None:
        times = [expires for expires in (*self.hosts.values(), *self._nets.values()) if expires is not None]
        return min(times, default=None)

    def entries(self) -> list[RuntimeEntry]:
        hosts = [
            RuntimeEntry(ipaddress.ip_network(ipaddress.ip_address(raw)), exp)
            for raw, exp in self.hosts.items()
        ]
        nets = [RuntimeEntry(network, exp) for network, exp in self._nets.items()]
        return sorted(hosts + nets, key=lambda entry: (entry.network.version, entry.network))

    def _rebuild(self) -> None:
        pairs: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for network in self._nets:
            pairs[network.version].append(network_range(network))
        self.nets4, self.nets6 = Ranges(4, pairs[4]), Ranges(6, pairs[6])


class RuntimeSets:
    """Every set's runtime entries, by set name; kept by the engine across policy reloads (a set
    the policy no longer names keeps its entries, unused, until it comes back or they expire)."""

    def __init__(self) -> None:
        self._sets: dict[str, RuntimeEntries] = {}

    def entries(self, name: str) -> RuntimeEntries:
        found = self._sets.get(name)
        if found is None:
            found = self._sets[name] = RuntimeEntries()
        return found

    def names(self) -> list[str]:
        return sorted(name for name, entries in self._sets.items() if entries)

    def __contains__(self, name: str) -> bool:
        return bool(self._sets.get(name))

    def expire(self, now: float) -> list[tuple[str, Network]]:
        return [(name, network) for name, entries in self._sets.items() for network in entries.expire(now)]

    def next_expiry(self) -> float | None:
        times = [t for entries in self._sets.values() if (t := entries.next_expiry()) is not None]
        return min(times, default=None)

    def dump(self, now: float) -> dict[str, list[tuple[str, float | None]]]:
        """{set: [(network text, seconds left or None)]}: what a state file keeps."""
        return {
            name: [
                (str(e.network), None if e.expires is None else max(0.0, e.expires - now))
                for e in entries.entries()
            ]
            for name, entries in sorted(self._sets.items())
            if entries
        }

    def load(self, data: dict[str, list[tuple[str, float | None]]], now: float) -> int:
        """Entries from `dump` (seconds left -> expiry on this clock); returns how many."""
        count = 0
        for name, items in data.items():
            for text, left in items:
                self.entries(name).add(ipaddress.ip_network(text), None if left is None else now + left)
                count += 1
        return count


class NamedSet:
    """A set as the compiled policy uses it: the policy's networks and the runtime entries."""

    __slots__ = ("content", "name", "runtime")

    def __init__(self, name: str, content: SetContent, runtime: RuntimeEntries | None = None) -> None:
        self.name = name
        self.content = content
        self.runtime = RuntimeEntries() if runtime is None else runtime

    def contains(self, raw: bytes) -> bool:
        return self.content.contains(raw) or self.runtime.contains(raw)
