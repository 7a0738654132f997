"""Engine with `options: {offload: established}`: which verdicts hand a flow over to the kernel."""

from __future__ import annotations

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


def engine(text: str = POLICY) -> Engine:
    return Engine(CompiledPolicy(parse_policy(text)))


def test_tcp_is_handed_over_once_its_handshake_is_complete() -> None:
    e = engine()
    syn = e.process(tcp4(LAN, WAN, 50000, 80, SYN, seq=1000), OUT, 10.0)
    synack = e.process(tcp4(WAN, LAN, 80, 50000, SYN | ACK, seq=5000, ack=1001), IN, 10.1)
    assert not syn.offload and not synack.offload and e.handed_over == {}
    ack = e.process(tcp4(LAN, WAN, 50000, 80, ACK, seq=1001, ack=5001), OUT, 10.2)
    expect(ack, Action.ACCEPT, Ct.ESTABLISHED, "established")
    assert ack.offload
    (key,) = e.handed_over
    assert e.handed_over[key] == 10.2 and e.conntrack.get(key) is not None  # the flow stays nfqfw's too
    # A packet queued behind it, taken by the fast path: accepted, not handed over again.
    data = e.process(tcp4(LAN, WAN, 50000, 80, ACK | PSH, seq=1001, ack=5001), OUT, 10.3)
    assert data.action is Action.ACCEPT and not data.offload
    # Closing: FIN_WAIT is not ESTABLISHED, nothing more is handed over.
    fin = e.full_process(tcp4(LAN, WAN, 50000, 80, FIN | ACK, seq=1001, ack=5001), OUT, 10.4)
    assert fin.action is Action.ACCEPT and not fin.offload
    assert e.counts() == {"accept default egress": 1, "accept established": 4}


def test_a_tcp_flow_picked_up_mid_stream_stays_with_nfqfw() -> None:
    e = engine()
    e.process(tcp4(LAN, WAN, 50001, 80, ACK, seq=1, ack=1), OUT, 1.0)  # picked up (loose)
    e.process(tcp4(WAN, LAN, 80, 50001, ACK, seq=1, ack=1), IN, 1.1)
    verdicts = [e.full_process(tcp4(LAN, WAN, 50001, 80, ACK, seq=1, ack=1), OUT, 1.2 + n) for n in range(3)]
    assert all(v.action is Action.ACCEPT and v.ct is Ct.ESTABLISHED for v in verdicts)
    assert not any(v.offload for v in verdicts) and e.handed_over == {}


def test_udp_is_handed_over_at_its_first_reply() -> None:
    e = engine()
    first = e.process(udp4(LAN, WAN, 40000, 53), OUT, 1.0)
    again = e.process(udp4(LAN, WAN, 40000, 53), OUT, 1.1)
    assert (first.ct, again.ct) == (Ct.NEW, Ct.NEW) and not first.offload and not again.offload
    reply = e.process(udp4(WAN, LAN, 53, 40000), IN, 1.2)
    expect(reply, Action.ACCEPT, Ct.ESTABLISHED, "established")
    assert reply.offload and len(e.handed_over) == 1


def test_off_by_default_and_follows_reloads() -> None:
    e = engine(POLICY.replace("offload: established, ", ""))
    e.process(udp4(LAN, WAN, 40000, 53), OUT, 1.0)
    assert not e.process(udp4(WAN, LAN, 53, 40000), IN, 1.1).offload
    e.replace_policy(CompiledPolicy(parse_policy(POLICY)))
    assert e.full_process(udp4(WAN, LAN, 53, 40000), IN, 1.2).offload
    e.replace_policy(CompiledPolicy(parse_policy(POLICY.replace("established", "off"))))
    assert not e.full_process(udp4(WAN, LAN, 53, 40000), IN, 1.3).offload


def test_handed_over_is_bounded_without_a_taker() -> None:
    e = engine(POLICY.replace("options: {", "options: {max-flows: 4, "))
    for port in range(20):
        e.process(udp4(LAN, WAN, 30000 + port, 53), OUT, 1.0)
        e.process(udp4(WAN, LAN, 53, 30000 + port), IN, 1.0)
    assert 0 < len(e.handed_over) <= 8
