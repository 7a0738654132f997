"""The flow table as the operator sees it: one record (a JSON-able dict) per tracked flow, and
the filters of `nfqfw flows` / `nfqfw flush` (--proto, --state, --addr).

Pure code over `nfqfw.core.conntrack` flows: the addresses and ports of a flow's original
direction are read back from its key (`conntrack.first_packet`). Every use of the Flow's fields
outside the core is in this module, so a change of the flow layout is mended here alone.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nfqfw.core.conntrack import Conntrack, Flow, first_packet
from nfqfw.core.l4.tcp_states import TcpState
from nfqfw.core.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP

PROTO_NAMES = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp", PROTO_ICMPV6: "icmpv6"}
PROTO_NUMBERS = {name: number for number, name in PROTO_NAMES.items()}
TCP_STATES = tuple(state.name for state in TcpState if state is not TcpState.NONE)
FLAG_STATES = ("ASSURED", "UNREPLIED", "REPLIED")  # what --state can also ask of any protocol
STATES = TCP_STATES + FLAG_STATES

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class FilterError(ValueError):
    """A filter value that means nothing; str() says what is accepted."""


def proto_name(number: int) -> str:
    return PROTO_NAMES.get(number, str(number))


def parse_proto(text: str) -> int:
    """tcp, udp, icmp, icmpv6 (any case) or an IP protocol number 0-255."""
    word = text.strip().lower()
    if word in PROTO_NUMBERS:
        return PROTO_NUMBERS[word]
    if word.isdigit() and int(word) <= 255:
        return int(word)
    raise FilterError(f"unknown protocol {text!r}: expected tcp, udp, icmp, icmpv6 or a number 0-255")


def parse_state(text: str) -> str:
    word = text.strip().upper().replace("-", "_")
    if word in STATES:
        return word
    raise FilterError(f"unknown state {text!r}: expected one of {', '.join(STATES)}")


def parse_addr(text: str) -> Network:
    """An address or a network (CIDR); host bits of a network are ignored."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise FilterError(f"not an address or network: {text!r}") from None


@dataclass(frozen=True)
class FlowFilter:
    """What `nfqfw flows` / `nfqfw flush` select; an empty filter selects every flow."""

    proto: int | None = None
    state: str | None = None  # a TCP state name, or ASSURED / UNREPLIED / REPLIED
    network: Network | None = None  # either endpoint within it

    @classmethod
    def parse(cls, proto: object = None, state: object = None, addr: object = None) -> FlowFilter:
        """From text (command line, or a request's fields); raises FilterError."""
        for name, value in (("proto", proto), ("state", state), ("addr", addr)):
            if value is not None and not isinstance(value, str):
                raise FilterError(f"{name}: expected a string, got {type(value).__name__}")
        return cls(
            parse_proto(proto) if isinstance(proto, str) else None,
            parse_state(state) if isinstance(state, str) else None,
            parse_addr(addr) if isinstance(addr, str) else None,
        )

    def request_fields(self) -> dict[str, str]:
        """The filter as the fields of a control request (FlowFilter.parse reads them back)."""
        fields = {}
        if self.proto is not None:
            fields["proto"] = proto_name(self.proto)
        if self.state is not None:
            fields["state"] = self.state
        if self.network is not None:
            fields["addr"] = str(self.network)
        return fields

    def matches(self, flow: Flow) -> bool:
        if self.proto is not None and flow.proto != self.proto:
            return False
        if self.state is not None and not _in_state(flow, self.state):
            return False
        if self.network is not None:
            pkt = first_packet(flow)
            if pkt is None:
                return False
            net = self.network
            return ipaddress.ip_address(pkt.src) in net or ipaddress.ip_address(pkt.dst) in net
        return True


def _in_state(flow: Flow, state: str) -> bool:
    if state == "ASSURED":
        return flow.assured
    if state == "UNREPLIED":
        return not flow.seen_reply
    if state == "REPLIED":
        return flow.seen_reply
    return flow.tcp is not None and flow.state_name == state


def select_flows(flows: Iterable[Flow], wanted: FlowFilter, now: float) -> list[Flow]:
    """The live flows (deadline not passed) the filter selects."""
    return [flow for flow in flows if flow.deadline > now and wanted.matches(flow)]


def flow_record(flow: Flow, now: float) -> dict[str, Any]:
    """One flow as `nfqfw flows --json` prints it (original direction, like conntrack -L)."""
    proto = flow.proto
    record: dict[str, Any] = {
        "proto": proto_name(proto),
        "protonum": proto,
        "timeout": max(0, int(flow.deadline - now)),
        "state": flow.state_name if flow.tcp is not None else None,
    }
    pkt = first_packet(flow)
    if pkt is not None:
        record["family"] = pkt.family
        record["src"] = str(ipaddress.ip_address(pkt.src))
        record["dst"] = str(ipaddress.ip_address(pkt.dst))
        if proto in (PROTO_TCP, PROTO_UDP):
            record["sport"], record["dport"] = pkt.sport, pkt.dport
        elif proto in (PROTO_ICMP, PROTO_ICMPV6):
            record["type"], record["code"], record["id"] = pkt.icmp_type, pkt.icmp_code, pkt.icmp_id
    record["replied"] = flow.seen_reply
    record["assured"] = flow.assured
    record["admitted_by"] = flow.rule
    meta = flow.meta
    record["in"] = getattr(meta, "in_iface", None)
    record["out"] = getattr(meta, "out_iface", None)
    record["age"] = max(0, int(now - flow.created))
    return record


def talkers(conntrack: Conntrack, now: float, limit: int) -> list[dict[str, Any]]:
    """The `limit` addresses in the most live flows (either end), as [{"addr", "flows"}], for
    `nfqfw top`. Read off the keys (the layout the trackers' `key` writes, checked against
    first_packet by the unit tests), not through a Flow per flow: one pass over a full table
    costs milliseconds."""
    table = conntrack.table
    keys, deadline = table.keys, table.deadline
    counts: Counter[bytes] = Counter()
    for slot in conntrack.slots():
        key = keys[slot]
        if key is None or deadline[slot] <= now:
            continue
        a, b = _endpoints(key)
        counts[a] += 1
        if b != a:
            counts[b] += 1
    return [
        {"addr": str(ipaddress.ip_address(addr)), "flows": count}
        for addr, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]
        if len(addr) in (4, 16)
    ]


def _endpoints(key: bytes) -> tuple[bytes, bytes]:
    proto = key[0]
    if proto in (PROTO_TCP, PROTO_UDP):  # proto, addr+port, addr+port
        half = (len(key) - 1) // 2
        return key[1 : 1 + half - 2], key[1 + half : -2]
    if proto in (PROTO_ICMP, PROTO_ICMPV6):  # proto, type, src, dst, identifier (4 bytes)
        size = (len(key) - 6) // 2
        return key[2 : 2 + size], key[2 + size : 2 + 2 * size]
    half = (len(key) - 1) // 2  # proto, addr, addr
    return key[1 : 1 + half], key[1 + half :]


def census(conntrack: Conntrack, now: float) -> dict[str, dict[str, int]]:
    """Live flows by protocol and state: {"tcp": {"ESTABLISHED": 3, ...}, "udp": {"ASSURED": 1}}.
    Protocols without TCP states count as ASSURED, REPLIED or UNREPLIED."""
    counts = conntrack.census(now)
    named = sorted((proto_name(proto), state, count) for (proto, state), count in counts.items())
    table: dict[str, dict[str, int]] = {}
    for proto, state, count in named:
        table.setdefault(proto, {})[state] = count
    return table
