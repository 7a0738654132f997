"""What changed between two policies, for review: `nfqfw check --diff OLD NEW` offline and
`nfqfw reload --dry-run` against the policy in force; and a rule described in one line (explain).

Pure: two PolicyConfigs in, a JSON-able dict out (`policy_diff`), and its text (`diff_lines`).
Rules are compared by name on each side: added, removed, changed (field by field, described as
the policy writes them, ports with their service names), and the names whose order changed
(first match wins: an order change is a change of meaning). Sets are compared by name and
content (networks added and removed, counted, a few shown). Defaults, options and zones by
value; NAT, where the policy has a `nat:` section, entry by entry.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import fields, is_dataclass
from typing import Any

from nfqfw.core.config import (
    ICMP_PROTOCOLS,
    PROTOCOL_NAMES,
    SERVICE_NAMES,
    AddressSet,
    PolicyConfig,
    RuleConfig,
    SetConfig,
)

EXAMPLES = 5  # networks shown of a set's added or removed ones
_NOT_COMPARED = {"name", "line", "file"}  # where a rule stands is not what it does


def describe_ports(ranges: Iterable[tuple[int, int]]) -> str:
    """'22 (ssh), 8000-8100'."""
    words = []
    for first, last in ranges:
        if first != last:
            words.append(f"{first}-{last}")
        elif first in SERVICE_NAMES:
            words.append(f"{first} ({SERVICE_NAMES[first]})")
        else:
            words.append(str(first))
    return ", ".join(words)


def describe_addresses(addresses: AddressSet) -> str:
    words = ["gateway"] if addresses.gateway else []
    words += [f"@{name}" for name in addresses.sets]
    words += [str(network) for network in addresses.networks]
    return ", ".join(words)


def describe_field(name: str, value: Any) -> str:
    """One field of a RuleConfig as the policy would write it."""
    if value is None:
        return "any"
    if name in ("dports", "sports"):
        return describe_ports(value)
    if name in ("src", "dst"):
        return describe_addresses(value)
    if name == "protocols":
        if value == ICMP_PROTOCOLS:
            return "icmp"  # as written: ICMP on IPv4, ICMPv6 on IPv6
        return ", ".join(PROTOCOL_NAMES.get(number, str(number)) for number in sorted(value))
    if name in ("icmp_types_v4", "icmp_types_v6"):
        return ", ".join(str(number) for number in sorted(value))
    if name in ("in_ifaces", "out_ifaces", "from_zones", "to_zones"):
        return ", ".join(value)
    if name == "family":
        return f"ipv{value}"
    if name == "action":
        return str(value.value)
    if name == "limit":
        per = " per source" if value.per_source else ""
        return f"{value.count}/{value.period}s burst {value.burst}{per}"
    return str(value)


FIELD_WORDS = {
    "protocols": "proto",
    "src": "from",
    "dst": "to",
    "dports": "ports",
    "sports": "sports",
    "icmp_types_v4": "icmp-types (v4)",
    "icmp_types_v6": "icmp-types (v6)",
    "in_ifaces": "in",
    "out_ifaces": "out",
    "from_zones": "from-zone",
    "to_zones": "to-zone",
}


def describe_rule(rule: RuleConfig) -> str:
    """'drop tcp from @blocklist to gateway ports 22 (ssh)': what the rule matches and does."""
    words = [rule.action.value]
    for name in (
        "family",
        "protocols",
        "src",
        "dst",
        "dports",
        "sports",
        "in_ifaces",
        "out_ifaces",
        "from_zones",
        "to_zones",
    ):
        value = getattr(rule, name)
        if value is None:
            continue
        if name == "protocols":
            words.append(describe_field(name, value))
        else:
            words.append(f"{FIELD_WORDS.get(name, name)} {describe_field(name, value)}")
    if rule.icmp_types_v4 is not None:
        types = sorted({*rule.icmp_types_v4, *(rule.icmp_types_v6 or ())})
        words.append("icmp-types " + ", ".join(str(t) for t in types))
    if rule.limit is not None:
        words.append(f"limit {describe_field('limit', rule.limit)}")
    if rule.log:
        words.append("log")
    return " ".join(words)


def where(rule: RuleConfig, main: str) -> str:
    """FILE:LINE of a rule (the main file's name for rules not from an include)."""
    return f"{rule.file or main}:{rule.line}"


def rule_changes(old: RuleConfig, new: RuleConfig) -> list[str]:
    """'ports: 22 (ssh) -> 22 (ssh), 2222' for each field that differs."""
    changes = []
    for field in fields(RuleConfig):
        if field.name in _NOT_COMPARED:
            continue
        before, after = getattr(old, field.name), getattr(new, field.name)
        if before != after:
            key = FIELD_WORDS.get(field.name, field.name.replace("_", "-"))
            changes.append(
                f"{key}: {describe_field(field.name, before)} -> {describe_field(field.name, after)}"
            )
    return changes


def _side_diff(
    old: tuple[RuleConfig, ...], new: tuple[RuleConfig, ...], old_main: str, new_main: str
) -> dict[str, Any]:
    before = {rule.name: rule for rule in old}
    after = {rule.name: rule for rule in new}
    added = [
        {"name": rule.name, "at": where(rule, new_main), "rule": describe_rule(rule), "comment": rule.comment}
        for rule in new
        if rule.name not in before
    ]
    removed = [
        {"name": rule.name, "at": where(rule, old_main), "rule": describe_rule(rule)}
        for rule in old
        if rule.name not in after
    ]
    changed = {
        name: changes
        for name, rule in after.items()
        if name in before and (changes := rule_changes(before[name], rule))
    }
    kept_before = [rule.name for rule in old if rule.name in after]
    kept_after = [rule.name for rule in new if rule.name in before]
    moved = _moved(kept_before, kept_after)
    return {"added": added, "removed": removed, "changed": changed, "moved": moved}


def _moved(before: list[str], after: list[str]) -> list[str]:
    """The names whose relative order changed: those outside a longest common subsequence."""
    if before == after:
        return []
    rank = {name: index for index, name in enumerate(before)}
    sequence = [rank[name] for name in after]
    # longest increasing subsequence (patience sorting), kept names stay where they were
    tails: list[int] = []
    tail_index: list[int] = []
    parents = [-1] * len(sequence)
    for index, value in enumerate(sequence):
        position = bisect_left(tails, value)
        if position == len(tails):
            tails.append(value)
            tail_index.append(index)
        else:
            tails[position] = value
            tail_index[position] = index
        parents[index] = tail_index[position - 1] if position else -1
    keep = set()
    index = tail_index[-1] if tail_index else -1
    while index >= 0:
        keep.add(index)
        index = parents[index]
    return [name for index, name in enumerate(after) if index not in keep]


def set_diff(old: SetConfig, new: SetConfig) -> dict[str, Any] | None:
    """What changed in a set (None: nothing): networks added/removed (as merged CIDRs), file, comment."""
    out: dict[str, Any] = {}
    if old.content != new.content:
        before, after = set(old.content.cidrs()), set(new.content.cidrs())
        added, removed = sorted(after - before), sorted(before - after)
        out["networks"] = {
            "added": len(added),
            "removed": len(removed),
            "examples_added": added[:EXAMPLES],
            "examples_removed": removed[:EXAMPLES],
        }
    for key in ("path", "comment", "runtime_only"):
        if getattr(old, key) != getattr(new, key):
            out[key] = [getattr(old, key), getattr(new, key)]
    return out or None


def _values(obj: Any) -> dict[str, Any]:
    if is_dataclass(obj):
        return {field.name: getattr(obj, field.name) for field in fields(obj)}
    return dict(obj)


def _value_diff(old: Any, new: Any) -> dict[str, list[Any]]:
    before, after = _values(old), _values(new)
    return {
        key.replace("_", "-"): [_plain(before.get(key)), _plain(after.get(key))]
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    }


def _plain(value: Any) -> Any:
    """JSON-able: enums by value, tuples as lists, other objects as text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "value") and isinstance(value.value, str):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return str(value)


def _zone_values(policy: PolicyConfig) -> dict[str, Any]:
    """zone -> its interfaces; for a zone written as a mapping, also what it faces and its networks."""
    details = getattr(policy, "zone_details", {})
    values: dict[str, Any] = {}
    for zone, names in policy.zones.items():
        detail = details.get(zone)
        if detail is None:
            values[zone] = names
        else:
            networks = ", ".join(str(network) for network in detail.networks) or "none"
            values[zone] = (
                f"faces {detail.faces}, interfaces {', '.join(names) or 'none'}, networks {networks}"
            )
    return values


def _nat_diff(old: PolicyConfig, new: PolicyConfig) -> dict[str, Any]:
    """NAT entries (where the policy has a `nat:` section): forwards by name, the rest by value."""
    before, after = getattr(old, "nat", None), getattr(new, "nat", None)
    if before == after:
        return {}
    out: dict[str, Any] = {}
    for part in ("masquerade", "snat", "forward"):
        old_entries = list(getattr(before, part, ()) or ())
        new_entries = list(getattr(after, part, ()) or ())
        if part == "forward":
            old_named = {entry.name: entry for entry in old_entries}
            new_named = {entry.name: entry for entry in new_entries}
            entry = {
                "added": sorted(set(new_named) - set(old_named)),
                "removed": sorted(set(old_named) - set(new_named)),
                "changed": sorted(
                    n for n in set(old_named) & set(new_named) if _strip(old_named[n]) != _strip(new_named[n])
                ),
            }
        else:
            old_set, new_set = {_entry_text(e) for e in old_entries}, {_entry_text(e) for e in new_entries}
            entry = {"added": sorted(new_set - old_set), "removed": sorted(old_set - new_set), "changed": []}
        if any(entry.values()):
            out[part] = entry
    return out


def _strip(entry: Any) -> Any:
    values = _values(entry)
    return {key: value for key, value in values.items() if key not in ("line", "col")}


def _entry_text(entry: Any) -> str:
    values = _strip(entry)
    return ", ".join(f"{key}={_plain(value)}" for key, value in values.items() if value not in (None, ()))


def policy_diff(old: PolicyConfig, new: PolicyConfig) -> dict[str, Any]:
    """Everything that differs between two policies (see the module docstring); empty parts left out."""
    diff: dict[str, Any] = {}
    sides = [side for side in ("ingress", "egress", "between") if hasattr(old, side) or hasattr(new, side)]
    rules = {}
    for side in sides:
        part = _side_diff(getattr(old, side, ()), getattr(new, side, ()), old.filename, new.filename)
        if any(part.values()):
            rules[side] = part
    if rules:
        diff["rules"] = rules
    sets: dict[str, Any] = {}
    added = [name for name in new.sets if name not in old.sets]
    removed = [name for name in old.sets if name not in new.sets]
    changed = {
        name: d for name in new.sets if name in old.sets and (d := set_diff(old.sets[name], new.sets[name]))
    }
    if added or removed or changed:
        sets = {"added": added, "removed": removed, "changed": changed}
        diff["sets"] = sets
    for part in ("defaults", "options"):
        values = _value_diff(getattr(old, part), getattr(new, part))
        if values:
            diff[part] = values
    zones = _value_diff(_zone_values(old), _zone_values(new))
    if zones:
        diff["zones"] = zones
    nat = _nat_diff(old, new)
    if nat:
        diff["nat"] = nat
    return diff


def diff_lines(diff: dict[str, Any]) -> list[str]:
    """The diff as text: `+` added, `-` removed, `~` changed, one line each."""
    if not diff:
        return ["no changes"]
    lines: list[str] = []
    for side, part in diff.get("rules", {}).items():
        lines.append(f"{side} rules:")
        for rule in part["added"]:
            comment = f"  # {rule['comment']}" if rule.get("comment") else ""
            lines.append(f"  + {rule['name']} ({rule['at']}): {rule['rule']}{comment}")
        for rule in part["removed"]:
            lines.append(f"  - {rule['name']} (was {rule['at']}): {rule['rule']}")
        for name, changes in part["changed"].items():
            lines.append(f"  ~ {name}: " + "; ".join(changes))
        if part["moved"]:
            lines.append("  ~ order changed: " + ", ".join(part["moved"]) + " (first match wins)")
    sets = diff.get("sets")
    if sets:
        lines.append("sets:")
        lines += [f"  + {name}" for name in sets["added"]]
        lines += [f"  - {name}" for name in sets["removed"]]
        for name, change in sets["changed"].items():
            words = []
            networks = change.get("networks")
            if networks:
                shown = ", ".join(
                    [f"+{n}" for n in networks["examples_added"]]
                    + [f"-{n}" for n in networks["examples_removed"]]
                )
                words.append(f"+{networks['added']} -{networks['removed']} networks ({shown})")
            for key in ("path", "comment", "runtime_only"):
                if key in change:
                    words.append(f"{key.replace('_', '-')}: {change[key][0]} -> {change[key][1]}")
            lines.append(f"  ~ {name}: " + "; ".join(words))
    for part in ("defaults", "options", "zones"):
        values = diff.get(part)
        if values:
            lines.append(f"{part}:")
            lines += [f"  ~ {key}: {_text(old)} -> {_text(new)}" for key, (old, new) in values.items()]
    nat = diff.get("nat")
    if nat:
        lines.append("nat:")
        for part, entry in nat.items():
            lines += [f"  + {part} {item}" for item in entry["added"]]
            lines += [f"  - {part} {item}" for item in entry["removed"]]
            lines += [f"  ~ {part} {item}" for item in entry["changed"]]
    return lines


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_text(item) for item in value) or "(none)"
    return str(value)
