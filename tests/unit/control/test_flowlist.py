"""nfqfw.control.flowlist: flow records, filters and the census, over an engine fed real packets."""

from __future__ import annotations

import ipaddress
import math
from collections import Counter
from pathlib import Path

import pytest

from nfqfw.control.flowlist import (
    STATES,
    FilterError,
    FlowFilter,
    census,
    flow_record,
    parse_addr,
    parse_proto,
    parse_state,
    select_flows,
)
from nfqfw.core.build import addr, icmp, ipv4, ipv6, tcp, udp
from nfqfw.core.config import load_policy
from nfqfw.core.engine import Engine
from nfqfw.core.packet import ACK, SYN
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.verdict import Action, Hook, Meta

POLICY_FILE = Path(__file__).resolve().parents[3] / "config" / "policy.yaml"
OUT = Meta(Hook.FORWARD, "lan0", "wan0")
IN = Meta(Hook.FORWARD, "wan0", "lan0")
LAN, MAIL, WAN = addr("10.0.0.5"), addr("10.0.0.25"), addr("203.0.113.7")
LAN6, WAN6 = addr("fd00::5"), addr("2001:db8::7")
ALL = FlowFilter()
PROTO_WORDS = "expected tcp, udp, icmp, icmpv6 or a number 0-255"


def tcp4(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int) -> bytes:
    return ipv4(src, dst, 6, tcp(src, dst, sport, dport, seq=seq, ack=ack, flags=flags))


def handshake(
    e: Engine, client: bytes, server: bytes, sport: int, dport: int, meta: Meta, now: float
) -> None:
    for data in (
        tcp4(client, server, sport, dport, 100, 0, SYN),
        tcp4(server, client, dport, sport, 500, 101, SYN | ACK),
        tcp4(client, server, sport, dport, 101, 501, ACK),
    ):
        assert e.process(data, meta, now).action is Action.ACCEPT


def engine() -> Engine:
    """At t=10: LAN:40000->WAN:80 ESTABLISHED+ASSURED (default egress); WAN:50000->MAIL:25 SYN_SENT
    (rule mail); LAN->WAN udp 53 unreplied; ping LAN->WAN replied; [fd00::5]:5353->[2001:db8::7]:53
    udp unreplied."""
    e = Engine(CompiledPolicy(load_policy(POLICY_FILE)))
    handshake(e, LAN, WAN, 40000, 80, OUT, 10.0)
    assert e.process(tcp4(WAN, MAIL, 50000, 25, 7, 0, SYN), IN, 10.0).action is Action.ACCEPT
    assert e.process(ipv4(LAN, WAN, 17, udp(LAN, WAN, 40002, 53)), OUT, 10.0).action is Action.ACCEPT
    assert e.process(ipv4(LAN, WAN, 1, icmp(8, 0, (77, 1))), OUT, 10.0).action is Action.ACCEPT
    assert e.process(ipv4(WAN, LAN, 1, icmp(0, 0, (77, 1))), IN, 10.0).action is Action.ACCEPT
    assert e.process(ipv6(LAN6, WAN6, 17, udp(LAN6, WAN6, 5353, 53)), OUT, 10.0).action is Action.ACCEPT
    assert len(e.conntrack) == 5
    return e


def records(e: Engine, wanted: FlowFilter = ALL, now: float = 12.5) -> list[dict[str, object]]:
    return [flow_record(flow, now) for flow in select_flows(e.conntrack, wanted, now)]


def test_records_of_every_kind_of_flow() -> None:
    assert records(engine()) == [
        {
            "proto": "tcp", "protonum": 6, "timeout": 431997, "state": "ESTABLISHED", "family": 4,
            "src": "10.0.0.5", "dst": "203.0.113.7", "sport": 40000, "dport": 80,
            "replied": True, "assured": True, "admitted_by": "default egress",
            "in": "lan0", "out": "wan0", "age": 2,
        },
        {
            "proto": "tcp", "protonum": 6, "timeout": 117, "state": "SYN_SENT", "family": 4,
            "src": "203.0.113.7", "dst": "10.0.0.25", "sport": 50000, "dport": 25,
            "replied": False, "assured": False, "admitted_by": "rule mail",
            "in": "wan0", "out": "lan0", "age": 2,
        },
        {
            "proto": "udp", "protonum": 17, "timeout": 27, "state": None, "family": 4,
            "src": "10.0.0.5", "dst": "203.0.113.7", "sport": 40002, "dport": 53,
            "replied": False, "assured": False, "admitted_by": "default egress",
            "in": "lan0", "out": "wan0", "age": 2,
        },
        {
            "proto": "icmp", "protonum": 1, "timeout": 27, "state": None, "family": 4,
            "src": "10.0.0.5", "dst": "203.0.113.7", "type": 8, "code": 0, "id": 77,
            "replied": True, "assured": False, "admitted_by": "default egress",
            "in": "lan0", "out": "wan0", "age": 2,
        },
        {
            "proto": "udp", "protonum": 17, "timeout": 27, "state": None, "family": 6,
            "src": "fd00::5", "dst": "2001:db8::7", "sport": 5353, "dport": 53,
            "replied": False, "assured": False, "admitted_by": "default egress",
            "in": "lan0", "out": "wan0", "age": 2,
        },
    ]  # fmt: skip


def keys(e: Engine, **filters: str) -> list[tuple[object, ...]]:
    return [(r["proto"], r.get("dport")) for r in records(e, FlowFilter.parse(**filters))]


def test_filters_select_by_proto_state_and_address() -> None:
    e = engine()
    assert keys(e, proto="tcp") == [("tcp", 80), ("tcp", 25)]
    assert keys(e, proto="17") == [("udp", 53), ("udp", 53)]
    assert keys(e, proto="ICMP") == [("icmp", None)]
    assert keys(e, state="established") == [("tcp", 80)]
    assert keys(e, state="syn-sent") == [("tcp", 25)]
    assert keys(e, state="assured") == [("tcp", 80)]
    assert keys(e, state="unreplied") == [("tcp", 25), ("udp", 53), ("udp", 53)]
    assert keys(e, state="replied") == [("tcp", 80), ("icmp", None)]
    assert keys(e, addr="10.0.0.25") == [("tcp", 25)]
    assert keys(e, addr="203.0.113.0/24", proto="udp") == [("udp", 53)]
    assert keys(e, addr="fd00::/64") == [("udp", 53)]
    assert keys(e, addr="10.0.0.0/24", state="UNREPLIED", proto="tcp") == [("tcp", 25)]
    assert keys(e, proto="47") == []


def test_expired_flows_are_not_listed_nor_counted() -> None:
    e = engine()
    later = 10.0 + 30.0  # the UDP and ICMP flows have timed out, not yet swept
    assert [r["proto"] for r in records(e, now=later)] == ["tcp", "tcp"]
    assert census(e.conntrack, later) == {"tcp": {"ESTABLISHED": 1, "SYN_SENT": 1}}


def test_census_by_protocol_and_state() -> None:
    assert census(engine().conntrack, 12.0) == {
        "icmp": {"REPLIED": 1},
        "tcp": {"ESTABLISHED": 1, "SYN_SENT": 1},
        "udp": {"UNREPLIED": 2},
    }


@pytest.mark.parametrize("now", [-math.inf, 12.0, 40.0, math.inf])
def test_census_from_the_columns_counts_what_the_flow_handles_say(now: float) -> None:
    conntrack = engine().conntrack
    conntrack.remove(next(flow for flow in conntrack if flow.proto == 1))  # a freed slot among the live ones
    by_handles = Counter((flow.proto, flow.state_name) for flow in conntrack if flow.deadline > now)
    assert conntrack.census(now) == by_handles
    assert sum(by_handles.values()) == {-math.inf: 4, 12.0: 4, 40.0: 2, math.inf: 0}[now]


def test_filter_round_trips_through_request_fields() -> None:
    wanted = FlowFilter.parse("udp", "assured", "10.0.0.7/24")
    assert wanted.request_fields() == {"proto": "udp", "state": "ASSURED", "addr": "10.0.0.0/24"}
    assert FlowFilter.parse(**wanted.request_fields()) == wanted
    assert FlowFilter().request_fields() == {}
    assert FlowFilter.parse(proto="47").request_fields() == {"proto": "47"}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: parse_proto("tcpp"), f"unknown protocol 'tcpp': {PROTO_WORDS}"),
        (lambda: parse_proto("256"), f"unknown protocol '256': {PROTO_WORDS}"),
        (lambda: parse_state("open"), f"unknown state 'open': expected one of {', '.join(STATES)}"),
        (lambda: parse_addr("10.0.0.300"), "not an address or network: '10.0.0.300'"),
        (lambda: FlowFilter.parse(proto=6), "proto: expected a string, got int"),
        (lambda: FlowFilter.parse(addr=["10.0.0.1"]), "addr: expected a string, got list"),
    ],
)
def test_bad_filter_values_say_what_is_accepted(call: object, message: str) -> None:
    with pytest.raises(FilterError) as err:
        call()  # type: ignore[operator]
    assert str(err.value) == message


def test_parse_addr_accepts_hosts_and_networks() -> None:
    assert parse_addr("10.0.0.7/24") == ipaddress.ip_network("10.0.0.0/24")
    assert parse_addr(" fd00::1 ") == ipaddress.ip_network("fd00::1/128")
