"""Engine with `options: {offload: established}`: which verdicts hand a flow over to the kernel,
and what becomes of the packets of a flow handed over that still reach nfqfw."""

from __future__ import annotations

from dataclasses import replace

from test_engine import IN, LAN, OUT, WAN, expect, tcp4, udp4

from nfqfw.core.config import parse_policy
from nfqfw.core.engine import Engine
from nfqfw.core.packet import ACK, FIN, PSH, SYN
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.verdict import Action, Ct

POLICY = """\
zones: {external: [wan0], internal: [lan0]}
defaults: {ingress: drop, egress: accept}
options: {offload: established, tcp-pickup: loose}
"""
KERNEL_INVALID_IN = replace(IN, kernel_invalid=True)


def engine(text: str = POLICY) -> Engine:
    return Engine(CompiledPolicy(parse_policy(text)))


def handshake(e: Engine, port: int = 50000) -> None:
    e.process(tcp4(LAN, WAN, port, 80, SYN, seq=1000), OUT, 10.0)
    e.process(tcp4(WAN, LAN, 80, port, SYN | ACK, seq=5000, ack=1001), IN, 10.1)


def test_tcp_is_handed_over_once_its_handshake_is_complete() -> None:
    e = engine()
    syn = e.process(tcp4(LAN, WAN, 50000, 80, SYN, seq=1000), OUT, 10.0)
    synack = e.process(tcp4(WAN, LAN, 80, 50000, SYN | ACK, seq=5000, ack=1001), IN, 10.1)
    assert not syn.offload and not synack.offload and len(e.offloaded) == 0
    ack = e.process(tcp4(LAN, WAN, 50000, 80, ACK, seq=1001, ack=5001), OUT, 10.2)
    expect(ack, Action.ACCEPT, Ct.ESTABLISHED, "established")
    assert ack.offload
    # The flow left the table: the kernel tracks it. nfqfw keeps its record.
    assert len(e.conntrack) == 0
    (flow,) = e.offloaded
    assert (flow.rule, flow.meta, flow.state_name) == ("default egress", OUT, "ESTABLISHED")
    # A segment queued behind the handshake: accepted, handed over (again: the same bit).
    data = e.process(tcp4(LAN, WAN, 50000, 80, ACK | PSH, seq=1001, ack=5001), OUT, 10.3)
    assert data.action is Action.ACCEPT and data.offload and len(e.conntrack) == 0
    assert e.counts() == {"accept default egress": 1, "accept established": 3}


def test_a_segment_the_kernel_calls_invalid_is_invalid() -> None:
    e = engine()
    handshake(e)
    e.process(tcp4(LAN, WAN, 50000, 80, ACK, seq=1001, ack=5001), OUT, 10.2)
    late = e.process(tcp4(WAN, LAN, 80, 50000, ACK | PSH, seq=9_000_000, ack=1001), KERNEL_INVALID_IN, 11.0)
    expect(
        late,
        Action.DROP,
        Ct.INVALID,
        "invalid: tcp: invalid to the kernel's conntrack, which carries the connection",
    )
    # A FIN the kernel took is not seen; one it refused is invalid, whatever nfqfw's own record says.
    fin = e.process(tcp4(WAN, LAN, 80, 50000, FIN | ACK, seq=5001, ack=1001), KERNEL_INVALID_IN, 11.1)
    assert fin.action is Action.DROP and len(e.offloaded) == 1


def test_a_syn_on_the_tuple_of_an_offloaded_connection_starts_a_new_one() -> None:
    e = engine()
    handshake(e)
    e.process(tcp4(LAN, WAN, 50000, 80, ACK, seq=1001, ack=5001), OUT, 10.2)
    again = e.process(tcp4(LAN, WAN, 50000, 80, SYN, seq=777_000), OUT, 200.0)
    expect(again, Action.ACCEPT, Ct.NEW, "default egress")
    assert len(e.offloaded) == 0 and len(e.conntrack) == 1


def test_a_tcp_flow_picked_up_mid_stream_stays_with_nfqfw() -> None:
    e = engine()
    e.process(tcp4(LAN, WAN, 50001, 80, ACK, seq=1, ack=1), OUT, 1.0)  # picked up (loose)
    e.process(tcp4(WAN, LAN, 80, 50001, ACK, seq=1, ack=1), IN, 1.1)
    verdicts = [e.full_process(tcp4(LAN, WAN, 50001, 80, ACK, seq=1, ack=1), OUT, 1.2 + n) for n in range(3)]
    assert all(v.action is Action.ACCEPT and v.ct is Ct.ESTABLISHED for v in verdicts)
    assert not any(v.offload for v in verdicts) and len(e.offloaded) == 0


def test_udp_is_handed_over_at_its_first_reply() -> None:
    e = engine()
    first = e.process(udp4(LAN, WAN, 40000, 53), OUT, 1.0)
    again = e.process(udp4(LAN, WAN, 40000, 53), OUT, 1.1)
    assert (first.ct, again.ct) == (Ct.NEW, Ct.NEW) and not first.offload and not again.offload
    reply = e.process(udp4(WAN, LAN, 53, 40000), IN, 1.2)
    expect(reply, Action.ACCEPT, Ct.ESTABLISHED, "established")
    assert reply.offload and len(e.offloaded) == 1 and len(e.conntrack) == 0
    # A datagram the kernel refused (its checksum: nfqfw checks none) is accepted.
    late = e.process(udp4(WAN, LAN, 53, 40000), KERNEL_INVALID_IN, 2.0)
    assert late.action is Action.ACCEPT and late.offload
    (flow,) = e.offloaded
    assert flow.deadline == 1.2 + 300  # HANDED_OVER_FOR, until the service says how long the kernel keeps it


def test_off_by_default_and_follows_reloads() -> None:
    e = engine(POLICY.replace("offload: established, ", ""))
    e.process(udp4(LAN, WAN, 40000, 53), OUT, 1.0)
    assert not e.process(udp4(WAN, LAN, 53, 40000), IN, 1.1).offload
    e.replace_policy(CompiledPolicy(parse_policy(POLICY)))
    assert e.full_process(udp4(WAN, LAN, 53, 40000), IN, 1.2).offload
    e.process(udp4(LAN, WAN, 40001, 53), OUT, 1.3)
    e.replace_policy(CompiledPolicy(parse_policy(POLICY.replace("established", "off"))))
    assert not e.full_process(udp4(WAN, LAN, 53, 40001), IN, 1.4).offload


def test_offloaded_flows_are_bounded_and_expire_without_a_taker() -> None:
    e = engine(POLICY.replace("options: {", "options: {max-flows: 4, "))
    for port in range(40):
        e.process(udp4(LAN, WAN, 30000 + port, 53), OUT, 1.0)
        e.process(udp4(WAN, LAN, 53, 30000 + port), IN, 1.0)
    assert len(e.offloaded) == 16 and e.offloaded.early_drops == 24  # not ASSURED: the oldest go
    e.process(udp4(LAN, WAN, 29999, 53), OUT, 400.0)
    e.process(udp4(WAN, LAN, 53, 29999), IN, 400.0)
    assert len(e.offloaded) == 1  # the others' HANDED_OVER_FOR ran out
