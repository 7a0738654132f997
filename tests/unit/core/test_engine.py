"""nfqfw.core.engine: decode -> conntrack -> policy -> verdict (config/policy.yaml, injected clock)."""

from __future__ import annotations

import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from nfqfw.core.build import addr, icmp, icmpv6, ipv4, ipv6, tcp, udp
from nfqfw.core.config import load_policy, parse_policy
from nfqfw.core.engine import Engine
from nfqfw.core.packet import ACK, FIN, PSH, SYN, URG
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.verdict import Action, Ct, Hook, Meta, Verdict

POLICY_FILE = Path(__file__).resolve().parents[3] / "config" / "policy.yaml"

OUT = Meta(Hook.FORWARD, "lan0", "wan0")  # from the inside out
IN = Meta(Hook.FORWARD, "wan0", "lan0")  # from the outside in

LAN = addr("10.0.0.5")
MAIL = addr("10.0.0.25")
WAN = addr("203.0.113.7")
ROUTER = addr("198.51.100.1")
LAN6 = addr("fd00::5")
WAN6 = addr("2001:db8::7")


def engine(policy_text: str | None = None) -> Engine:
    config = load_policy(POLICY_FILE) if policy_text is None else parse_policy(policy_text)
    return Engine(CompiledPolicy(config))


def tcp4(src: bytes, dst: bytes, sport: int, dport: int, flags: int, seq: int = 0, ack: int = 0) -> bytes:
    return ipv4(src, dst, 6, tcp(src, dst, sport, dport, seq=seq, ack=ack, flags=flags))


def udp4(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    return ipv4(src, dst, 17, udp(src, dst, sport, dport, b"q"))


def expect(verdict: Verdict, action: Action, ct: Ct, reason: str, rule: str | None = None) -> None:
    assert (verdict.action, verdict.ct, verdict.reason, verdict.rule) == (action, ct, reason, rule)


# -- TCP -----------------------------------------------------------------------------------


def test_tcp_handshake_outbound() -> None:
    e = engine()
    syn = e.process(tcp4(LAN, WAN, 50000, 80, SYN, seq=1000), OUT, 10.0)
    expect(syn, Action.ACCEPT, Ct.NEW, "default egress")
    assert len(e.conntrack) == 1
    synack = e.process(tcp4(WAN, LAN, 80, 50000, SYN | ACK, seq=5000, ack=1001), IN, 10.1)
    expect(synack, Action.ACCEPT, Ct.ESTABLISHED, "established")
    ack = e.process(tcp4(LAN, WAN, 50000, 80, ACK, seq=1001, ack=5001), OUT, 10.2)
    expect(ack, Action.ACCEPT, Ct.ESTABLISHED, "established")
    assert e.counts() == {"accept default egress": 1, "accept established": 2}


def test_tcp_syn_retransmit_before_reply_is_still_new() -> None:
    e = engine()
    e.process(tcp4(LAN, WAN, 50000, 80, SYN, seq=1000), OUT, 10.0)
    again = e.process(tcp4(LAN, WAN, 50000, 80, SYN, seq=1000), OUT, 11.0)
    assert again.ct is Ct.NEW
    assert again.action is Action.ACCEPT
    assert len(e.conntrack) == 1


def test_tcp_ack_without_flow_is_invalid_drop() -> None:
    e = engine()
    verdict = e.process(tcp4(WAN, LAN, 80, 50000, ACK, seq=1, ack=1), IN, 1.0)
    reason = "invalid: tcp: ACK without a connection (mid-stream pick-up disabled)"
    expect(verdict, Action.DROP, Ct.INVALID, reason)
    assert len(e.conntrack) == 0


def test_tcp_xmas_and_null_are_invalid() -> None:
    e = engine()
    xmas = e.process(tcp4(LAN, WAN, 50000, 80, FIN | PSH | URG), OUT, 1.0)
    assert (xmas.action, xmas.ct) == (Action.DROP, Ct.INVALID)
    assert xmas.reason == "invalid: tcp: invalid flags FIN+PSH+URG"
    null = e.process(tcp4(LAN, WAN, 50000, 80, 0), OUT, 1.0)
    assert (null.action, null.ct) == (Action.DROP, Ct.INVALID)
    assert null.reason == "invalid: tcp: invalid flags none"
    assert len(e.conntrack) == 0


def test_ingress_rule_accepts_and_default_drops_without_inserting() -> None:
    e = engine()
    mail = e.process(tcp4(WAN, MAIL, 40000, 25, SYN, seq=1), IN, 1.0)
    expect(mail, Action.ACCEPT, Ct.NEW, "rule mail", "mail")
    assert len(e.conntrack) == 1
    flow = next(iter(e.conntrack))
    assert flow.rule == "rule mail"
    assert flow.meta == IN
    dropped = e.process(tcp4(WAN, LAN, 40000, 23, SYN, seq=1), IN, 1.0)
    expect(dropped, Action.DROP, Ct.NEW, "default ingress")
    assert len(e.conntrack) == 1
    dropped_udp = e.process(udp4(WAN, LAN, 5000, 53), IN, 1.0)
    expect(dropped_udp, Action.DROP, Ct.NEW, "default ingress")
    assert len(e.conntrack) == 1


def test_egress_reject_rule_is_not_inserted() -> None:
    e = engine()
    verdict = e.process(tcp4(LAN, WAN, 50000, 445, SYN, seq=1), OUT, 1.0)
    expect(verdict, Action.REJECT, Ct.NEW, "rule no-smb-out", "no-smb-out")
    assert verdict.reject_with == "tcp-reset"
    assert len(e.conntrack) == 0


# -- UDP / ICMP through the engine ---------------------------------------------------------


def test_udp_reply_passes_and_expiry_makes_it_new_again() -> None:
    e = engine()
    expect(e.process(udp4(LAN, WAN, 40000, 53), OUT, 0.0), Action.ACCEPT, Ct.NEW, "default egress")
    expect(e.process(udp4(WAN, LAN, 53, 40000), IN, 1.0), Action.ACCEPT, Ct.ESTABLISHED, "established")
    # deadline 31.0: at exactly that time the flow is gone, the unsolicited "reply" is ingress
    expect(e.process(udp4(WAN, LAN, 53, 40000), IN, 31.0), Action.DROP, Ct.NEW, "default ingress")
    assert len(e.conntrack) == 0
    assert e.conntrack.expired == 1


def test_icmp_echo_and_related_error() -> None:
    e = engine()
    request = ipv4(LAN, WAN, 1, icmp(8, 0, (9, 1)))
    expect(e.process(request, OUT, 0.0), Action.ACCEPT, Ct.NEW, "default egress")
    reply = ipv4(WAN, LAN, 1, icmp(0, 0, (9, 1)))
    expect(e.process(reply, IN, 0.5), Action.ACCEPT, Ct.ESTABLISHED, "established")
    original = udp4(LAN, WAN, 40000, 53)
    e.process(original, OUT, 1.0)
    error = ipv4(ROUTER, LAN, 1, icmp(3, 4, struct.pack("!HH", 0, 1400), original[:28]))
    expect(e.process(error, IN, 1.5), Action.ACCEPT, Ct.RELATED, "related")
    stray = ipv4(ROUTER, LAN, 1, icmp(3, 3, b"\0\0\0\0", udp4(LAN, WAN, 1, 2)[:28]))
    reason = "invalid: icmp error: embedded header matches no flow"
    expect(e.process(stray, IN, 1.5), Action.DROP, Ct.INVALID, reason)
    unsolicited = ipv4(WAN, LAN, 1, icmp(0, 0, (10, 1)))
    expect(e.process(unsolicited, IN, 2.0), Action.DROP, Ct.INVALID, "invalid: icmp: reply without a request")


# -- the gateway's own ICMP errors (queued from OUTPUT) ----------------------------------------

GW_LAN, GW_LAN6 = addr("10.0.0.1"), addr("fd00::1")
FROM_GATEWAY = Meta(Hook.OUTPUT, None, "lan0")
OWN = "related: the gateway's own icmp error"


def icmp4_error(
    src: bytes, dst: bytes, type_: int, code: int, quoted: bytes, rest: bytes = bytes(4)
) -> bytes:
    return ipv4(src, dst, 1, icmp(type_, code, rest, quoted))


def icmp6_error(
    src: bytes, dst: bytes, type_: int, code: int, quoted: bytes, rest: bytes = bytes(4)
) -> bytes:
    return ipv6(src, dst, 58, icmpv6(src, dst, type_, code, rest + quoted))


def test_the_gateways_time_exceeded_about_a_packet_it_never_forwarded_is_related() -> None:
    e = engine()
    echo = ipv4(LAN, WAN, 1, icmp(8, 0, (9, 1)), ttl=1)  # ping -t1: answered before FORWARD
    error = icmp4_error(GW_LAN, LAN, 11, 0, echo)
    expect(e.process(error, FROM_GATEWAY, 1.0), Action.ACCEPT, Ct.RELATED, OWN)
    # forwarded errors keep the strict rule: the same error through the gateway is INVALID
    reason = "invalid: icmp error: embedded header matches no flow"
    expect(e.process(error, IN, 1.0), Action.DROP, Ct.INVALID, reason)
    assert len(e.conntrack) == 0  # the quoted packet's flow was never confirmed, nor is it now
    assert e.counts() == {f"accept {OWN}": 1, f"drop {reason}": 1}


def test_the_gateways_errors_about_a_first_udp_packet_ipv6() -> None:
    e = engine()
    first = ipv6(LAN6, WAN6, 17, udp(LAN6, WAN6, 40000, 443, b"q" * 1300))
    for kind, rest in ((2, struct.pack("!I", 1280)), (3, bytes(4))):  # packet too big, time exceeded
        error = icmp6_error(GW_LAN6, LAN6, kind, 0, first[:1232], rest)
        expect(e.process(error, FROM_GATEWAY, 1.0), Action.ACCEPT, Ct.RELATED, OWN)
    assert len(e.conntrack) == 0


def test_the_gateways_error_about_a_tracked_flow_is_related_to_it() -> None:
    e = engine()
    e.process(udp4(LAN, WAN, 40000, 53), OUT, 0.0)
    error = icmp4_error(GW_LAN, LAN, 3, 4, udp4(LAN, WAN, 40000, 53), struct.pack("!HH", 0, 1280))
    expect(e.process(error, FROM_GATEWAY, 1.0), Action.ACCEPT, Ct.RELATED, "related")


def test_the_gateways_error_is_invalid_where_the_kernel_attaches_no_conntrack() -> None:
    """The kernel attaches the quoted packet's conntrack; a packet that could not start a flow
    had none, so the error about it is INVALID, as are errors not sent back to its source."""
    e = engine()
    ack = tcp4(LAN, WAN, 50000, 80, ACK, seq=1, ack=1)  # strict pick-up: no flow for it
    reply = ipv4(LAN, WAN, 1, icmp(0, 0, (9, 1)))  # an echo reply without a request
    why = "invalid: icmp error from the gateway: the packet it quotes starts no flow"
    for quoted in (ack, reply):
        expect(
            e.process(icmp4_error(GW_LAN, LAN, 11, 0, quoted), FROM_GATEWAY, 1.0),
            Action.DROP,
            Ct.INVALID,
            why,
        )
    elsewhere = icmp4_error(GW_LAN, MAIL, 11, 0, udp4(LAN, WAN, 40000, 53))
    reason = "invalid: icmp error: outer destination is not the flow's endpoint"
    expect(e.process(elsewhere, FROM_GATEWAY, 1.0), Action.DROP, Ct.INVALID, reason)
    loose = engine(POLICY_FILE.read_text() + "\noptions: {tcp-pickup: loose}\n")
    error = icmp4_error(GW_LAN, LAN, 11, 0, ack)
    expect(loose.process(error, FROM_GATEWAY, 1.0), Action.ACCEPT, Ct.RELATED, OWN)


def test_a_sample_of_the_kernels_antispoof_drops_is_invalid_spoofed_source() -> None:
    """Only the kernel's antispoof queues from PREROUTING: whatever the packet, it is dropped as
    INVALID, logged (log-denied), and tracked nowhere."""
    e = engine()
    spoofed = Meta(Hook.PREROUTING, "wan0", None)
    syn = tcp4(LAN, MAIL, 40000, 25, SYN, seq=1)  # an inside source arriving from outside
    verdict = e.process(syn, spoofed, 1.0)
    expect(verdict, Action.DROP, Ct.INVALID, "invalid: spoofed source")
    assert verdict.log
    e.process(udp4(LAN, WAN, 40000, 53), OUT, 2.0)  # a real flow with that tuple
    expect(
        e.process(udp4(WAN, LAN, 53, 40000), spoofed, 3.0), Action.DROP, Ct.INVALID, "invalid: spoofed source"
    )
    # the flow saw no reply: the inside host's next datagram is still NEW
    assert e.process(udp4(LAN, WAN, 40000, 53), OUT, 4.0).ct is Ct.NEW
    assert e.counts() == {"drop invalid: spoofed source": 2, "accept default egress": 2}


def test_icmpv6_neighbour_solicitation_input_accept_forward_drop() -> None:
    e = engine()
    src, dst = addr("fe80::2"), addr("ff02::1:ff00:1")
    ns = ipv6(src, dst, 58, icmpv6(src, dst, 135, 0, bytes(4) + addr("fe80::1")), hop_limit=255)
    to_gateway = e.process(ns, Meta(Hook.INPUT, "lan0", None), 1.0)
    expect(to_gateway, Action.ACCEPT, Ct.UNTRACKED, "untracked: icmpv6 neighbour discovery / MLD")
    forwarded = e.process(ns, OUT, 1.0)
    expect(forwarded, Action.DROP, Ct.UNTRACKED, "untracked: neighbour discovery is not forwarded")
    assert len(e.conntrack) == 0


def test_non_first_fragment_decided_by_defaults() -> None:
    e = engine()
    later = ipv4(WAN, LAN, 17, bytes(16), ident=7, frag_offset=8)
    expect(e.process(later, IN, 1.0), Action.DROP, Ct.UNTRACKED, "default ingress")
    outbound = ipv4(LAN, WAN, 17, bytes(16), ident=7, frag_offset=8)
    expect(e.process(outbound, OUT, 1.0), Action.ACCEPT, Ct.UNTRACKED, "default egress")
    assert len(e.conntrack) == 0


# -- table bound ---------------------------------------------------------------------------

SMALL_TABLE = POLICY_FILE.read_text() + "\noptions:\n  max-flows: 3\n"


def test_max_flows_early_drops_oldest_unassured() -> None:
    e = engine(SMALL_TABLE)
    assert e.conntrack.max_flows == 3
    for port in range(40000, 40003):
        e.process(udp4(LAN, WAN, port, 53), OUT, 1.0)
    assert len(e.conntrack) == 3
    fourth = e.process(udp4(LAN, WAN, 40003, 53), OUT, 2.0)
    expect(fourth, Action.ACCEPT, Ct.NEW, "default egress")
    assert len(e.conntrack) == 3
    assert e.conntrack.early_drops == 1
    ports = sorted(struct.unpack("!H", flow.key[5:7])[0] for flow in e.conntrack)
    assert ports == [40001, 40002, 40003]


def make_assured(e: Engine, port: int) -> None:
    e.process(udp4(LAN, WAN, port, 53), OUT, 0.0)
    e.process(udp4(WAN, LAN, 53, port), IN, 1.0)
    e.process(udp4(LAN, WAN, port, 53), OUT, 3.0)


def test_max_flows_all_assured_drops_new_packet() -> None:
    e = engine(SMALL_TABLE)
    for port in range(40000, 40003):
        make_assured(e, port)
    assert all(flow.assured for flow in e.conntrack)
    verdict = e.process(udp4(LAN, WAN, 41000, 53), OUT, 4.0)
    expect(verdict, Action.DROP, Ct.NEW, "conntrack table full")
    assert len(e.conntrack) == 3
    assert e.conntrack.early_drops == 0
    assert e.counts()["drop conntrack table full"] == 1


# -- counters, malformed input -------------------------------------------------------------


def test_counters_keys() -> None:
    e = engine()
    e.process(udp4(LAN, WAN, 40000, 53), OUT, 0.0)
    e.process(udp4(WAN, LAN, 53, 40000), IN, 0.1)
    e.process(udp4(WAN, LAN, 53, 40000), IN, 0.2)
    e.process(udp4(WAN, LAN, 1, 2), IN, 0.3)
    e.process(b"\x45", OUT, 0.4)
    assert e.counts() == {
        "accept default egress": 1,
        "accept established": 2,
        "drop default ingress": 1,
        "drop invalid: ipv4: truncated header (1 bytes)": 1,
    }


def test_malformed_bytes_are_invalid_drop() -> None:
    e = engine()
    verdict = e.process(b"", OUT, 0.0)
    expect(verdict, Action.DROP, Ct.INVALID, "invalid: ip: empty packet")
    verdict = e.process(b"\x75" + bytes(30), OUT, 0.0)
    expect(verdict, Action.DROP, Ct.INVALID, "invalid: ip: unknown version 7")


def test_ipv6_echo_through_engine() -> None:
    e = engine()
    body = struct.pack("!HH", 3, 1)
    request = ipv6(LAN6, WAN6, 58, icmpv6(LAN6, WAN6, 128, 0, body))
    reply = ipv6(WAN6, LAN6, 58, icmpv6(WAN6, LAN6, 129, 0, body))
    expect(e.process(request, OUT, 0.0), Action.ACCEPT, Ct.NEW, "default egress")
    expect(e.process(reply, IN, 0.1), Action.ACCEPT, Ct.ESTABLISHED, "established")


ENGINE = engine()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120), now=st.floats(0, 1e6), inbound=st.booleans())
def test_arbitrary_bytes_never_raise(data: bytes, now: float, inbound: bool) -> None:
    verdict = ENGINE.process(data, IN if inbound else OUT, now)
    assert isinstance(verdict, Verdict)
    assert not verdict.reason.startswith("internal error"), verdict.reason
