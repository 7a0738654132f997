"""Engine with `synproxy: true` rules: the SYN the kernel's SYN proxy sends the server, the offset
the server's SYN-ACK fixes, and the client's acknowledgements shifted back by it (core.synproxy,
l4.tcp), with exact states and window data."""

from __future__ import annotations

import struct

from test_engine import IN, MAIL, WAN, expect

from nfqfw.core.build import addr, ipv4, tcp
from nfqfw.core.config import parse_policy
from nfqfw.core.engine import Engine
from nfqfw.core.l4.tcp_window import F_BE_LIBERAL
from nfqfw.core.packet import ACK, FIN, PSH, SYN
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.snapshot import decode, encode
from nfqfw.core.verdict import Action, Ct, Hook, Meta

POLICY = """\
zones: {external: [wan0], internal: [lan0]}
defaults: {ingress: drop, egress: accept}
ingress:
  - {name: mail, proto: tcp, to: 10.0.0.25, ports: 25, action: accept, synproxy: true}
"""
GATEWAY = frozenset({addr("203.0.113.1"), addr("10.0.0.1")})
PROXY_OUT = Meta(Hook.OUTPUT, None, "lan0")  # the proxy's SYN to the server leaves the gateway
BACK = Meta(Hook.FORWARD, "lan0", "wan0")  # the server's answers
CLIENT_ISN, COOKIE, SERVER_ISN = 1000, 0xF000_0000, 5000
OFFSET = (COOKIE - SERVER_ISN) & 0xFFFFFFFF
SACK_PERM, WSCALE7 = b"\x04\x02", b"\x01\x03\x03\x07"


def engine(text: str = POLICY) -> Engine:
    return Engine(CompiledPolicy(parse_policy(text)), local_addresses=GATEWAY)


def segment(
    src: bytes, dst: bytes, sport: int, dport: int, flags: int, seq: int, ack: int = 0, **kwargs: object
) -> bytes:
    return ipv4(
        src,
        dst,
        6,
        tcp(src, dst, sport, dport, seq=seq & 0xFFFFFFFF, ack=ack & 0xFFFFFFFF, flags=flags, **kwargs),
    )  # type: ignore[arg-type]


def from_client(flags: int, seq: int, ack: int, payload: bytes = b"", options: bytes = b"") -> bytes:
    return segment(WAN, MAIL, 40000, 25, flags, seq, ack, payload=payload, options=options)


def from_server(flags: int, seq: int, ack: int, payload: bytes = b"", options: bytes = b"") -> bytes:
    return segment(MAIL, WAN, 25, 40000, flags, seq, ack, payload=payload, options=options)


def proxied_handshake(e: Engine) -> None:
    """The proxy's SYN (the client's ISN, the cookie in the ACK field), the server's SYN-ACK."""
    syn = e.process(from_client(SYN, CLIENT_ISN, COOKIE, options=SACK_PERM + WSCALE7), PROXY_OUT, 10.0)
    expect(syn, Action.ACCEPT, Ct.NEW, "rule mail", "mail")
    synack = e.process(
        from_server(SYN | ACK, SERVER_ISN, CLIENT_ISN + 1, options=SACK_PERM + WSCALE7), BACK, 10.1
    )
    expect(synack, Action.ACCEPT, Ct.ESTABLISHED, "established")


def test_the_proxys_syn_is_judged_as_the_forwarded_syn_and_keeps_the_cookie() -> None:
    e = engine()
    syn = e.process(from_client(SYN, CLIENT_ISN, COOKIE), PROXY_OUT, 10.0)
    expect(syn, Action.ACCEPT, Ct.NEW, "rule mail", "mail")
    (flow,) = e.conntrack
    assert flow.meta == Meta(Hook.FORWARD, "wan0", "lan0")  # as the client's SYN came in
    assert (flow.state_name, flow.synproxy) == ("SYN_SENT", ("cookie", COOKIE))
    # The client's ACK got lost, the proxy sends the SYN again: the cookie it carries counts.
    again = e.process(from_client(SYN, CLIENT_ISN, COOKIE + 7), PROXY_OUT, 10.5)
    expect(again, Action.ACCEPT, Ct.NEW, "rule mail", "mail")
    assert flow.synproxy == ("cookie", COOKIE + 7)
    # The server's SYN-ACK fixes the offset between the proxy's and the server's sequence spaces;
    # the proxy's ACK to the server (which nfqfw does not see) establishes the connection.
    synack = e.process(from_server(SYN | ACK, SERVER_ISN, CLIENT_ISN + 1), BACK, 10.6)
    expect(synack, Action.ACCEPT, Ct.ESTABLISHED, "established")
    offset = (COOKIE + 7 - SERVER_ISN) & 0xFFFFFFFF
    assert (flow.state_name, flow.synproxy) == ("ESTABLISHED", ("offset", offset))
    assert flow.assured and flow.deadline == 10.6 + 432000  # the kernel's ESTABLISHED timeout
    conn = flow.tcp
    assert conn is not None
    # The proxy's ACK: seq CLIENT_ISN + 1, ack SERVER_ISN + 1, the SYN's window (unscaled: 0).
    assert conn.side(0)["td_maxack"] == SERVER_ISN + 1
    assert conn.side(1)["td_maxend"] == SERVER_ISN + 1 + 65535


def test_the_clients_acks_are_shifted_back_by_the_offset() -> None:
    e = engine()
    proxied_handshake(e)
    (flow,) = e.conntrack
    assert flow.synproxy == ("offset", OFFSET)
    # The client acknowledges the proxy's SYN-ACK (COOKIE + 1) with its first data.
    data = e.process(from_client(ACK | PSH, CLIENT_ISN + 1, COOKIE + 1, b"x" * 100), IN, 10.2)
    expect(data, Action.ACCEPT, Ct.ESTABLISHED, "established")
    assert (flow.state_name, flow.assured) == ("ESTABLISHED", True)
    reply = e.process(from_server(ACK | PSH, SERVER_ISN + 1, CLIENT_ISN + 101, b"y" * 200), BACK, 10.3)
    expect(reply, Action.ACCEPT, Ct.ESTABLISHED, "established")
    ack = e.process(from_client(ACK, CLIENT_ISN + 101, COOKIE + 201), IN, 10.4)
    expect(ack, Action.ACCEPT, Ct.ESTABLISHED, "established")
    conn = flow.tcp
    assert conn is not None
    original, answer = conn.side(0), conn.side(1)
    # Exact window data, in the server's sequence space: as the kernel's tcp_in_window has them.
    assert original == {
        "td_end": CLIENT_ISN + 101,
        "td_maxend": CLIENT_ISN + 101 + (65535 << 7),  # the server's ack and window
        "td_maxwin": 65535 << 7,
        "td_maxack": SERVER_ISN + 201,
        "td_scale": 7,
        "flags": 0x01 | 0x02 | 0x20,  # window scale, SACK permitted, max ack set
    }
    assert answer["td_end"] == SERVER_ISN + 201 and answer["td_maxack"] == CLIENT_ISN + 101
    assert answer["td_maxend"] == SERVER_ISN + 201 + (65535 << 7)  # the client's ack, shifted, and window
    # An ACK for data the server never sent is still refused, in either space.
    beyond = e.process(from_client(ACK, CLIENT_ISN + 101, COOKIE + 202), IN, 10.5)
    expect(
        beyond, Action.DROP, Ct.INVALID, "invalid: tcp: ACK is over the upper bound (ACKed data not seen yet)"
    )
    unshifted = e.process(from_client(ACK, CLIENT_ISN + 101, SERVER_ISN + 201), IN, 10.6)
    assert unshifted.ct is Ct.INVALID
    assert flow.state_name == "ESTABLISHED"


def test_sack_blocks_are_shifted_too() -> None:
    e = engine()
    proxied_handshake(e)
    e.process(from_client(ACK, CLIENT_ISN + 1, COOKIE + 1), IN, 10.2)
    e.process(from_server(ACK | PSH, SERVER_ISN + 1, CLIENT_ISN + 1, b"y" * 300), BACK, 10.3)
    # Bytes 101..300 arrived, 1..100 did not: a SACK block in the proxy's space.
    sack = b"\x01\x01\x05\x0a" + struct.pack("!II", COOKIE + 101, COOKIE + 301)
    verdict = e.process(from_client(ACK, CLIENT_ISN + 1, COOKIE + 1, options=sack), IN, 10.4)
    expect(verdict, Action.ACCEPT, Ct.ESTABLISHED, "established")
    (flow,) = e.conntrack
    conn = flow.tcp
    assert conn is not None
    assert conn.side(0)["td_maxwin"] == (65535 << 7) + 300  # win + (sack - ack), in the server's space
    too_far = b"\x01\x01\x05\x0a" + struct.pack("!II", COOKIE + 101, COOKIE + 302)
    verdict = e.process(from_client(ACK, CLIENT_ISN + 1, COOKIE + 1, options=too_far), IN, 10.5)
    expect(
        verdict,
        Action.DROP,
        Ct.INVALID,
        "invalid: tcp: ACK is over the upper bound (ACKed data not seen yet)",
    )


def test_the_server_may_send_what_the_proxys_ack_allowed_before_the_client_speaks() -> None:
    """The proxy's ACK to the server carries the client's window (65,535, scale 10): the server
    may send that much at once, as the kernel's tracking allows."""
    e = engine()
    options = SACK_PERM + b"\x01\x03\x03\x0a"  # window scale 10
    e.process(from_client(SYN, CLIENT_ISN, COOKIE, options=options), PROXY_OUT, 10.0)
    e.process(from_server(SYN | ACK, SERVER_ISN, CLIENT_ISN + 1, options=options), BACK, 10.1)
    for n in range(100):
        burst = from_server(ACK, SERVER_ISN + 1 + n * 1448, CLIENT_ISN + 1, b"z" * 1448)
        expect(e.process(burst, BACK, 10.2), Action.ACCEPT, Ct.ESTABLISHED, "established")
    (flow,) = e.conntrack
    conn = flow.tcp
    assert conn is not None and conn.side(1)["td_maxend"] == SERVER_ISN + 1 + (65535 << 10)


def test_proxied_flows_take_the_full_path_and_close_in_step() -> None:
    e = engine()
    proxied_handshake(e)
    fast = e.fast_path
    assert fast is not None
    first = from_client(ACK | PSH, CLIENT_ISN + 1, COOKIE + 1, b"x" * 10)
    assert not fast(first, 10.2)  # ASSURED and ESTABLISHED, but its acks need the offset
    expect(e.process(first, IN, 10.2), Action.ACCEPT, Ct.ESTABLISHED, "established")
    second = from_client(ACK | PSH, CLIENT_ISN + 11, COOKIE + 1, b"x" * 10)
    assert not fast(second, 10.3)
    expect(e.process(second, IN, 10.3), Action.ACCEPT, Ct.ESTABLISHED, "established")
    e.process(from_client(FIN | ACK, CLIENT_ISN + 21, COOKIE + 1), IN, 10.4)
    e.process(from_server(FIN | ACK, SERVER_ISN + 1, CLIENT_ISN + 22), BACK, 10.5)
    last = e.process(from_client(ACK, CLIENT_ISN + 22, COOKIE + 2), IN, 10.6)
    expect(last, Action.ACCEPT, Ct.ESTABLISHED, "established")
    (flow,) = e.conntrack
    assert flow.state_name == "TIME_WAIT"
    assert e.counts() == {"accept rule mail": 1, "accept established": 6}


def test_other_flows_are_untouched() -> None:
    e = engine()
    # The gateway's own SYN leaves from its own address: egress, as ever, with no offset.
    own = segment(addr("10.0.0.1"), MAIL, 41000, 25, SYN, 100, 0xDEAD)
    expect(e.process(own, PROXY_OUT, 10.0), Action.ACCEPT, Ct.NEW, "default egress")
    # A forwarded connection (not through the proxy): its ACK field is not a cookie.
    out = Meta(Hook.FORWARD, "lan0", "wan0")
    e.process(segment(MAIL, WAN, 42000, 80, SYN, 100, 0xBEEF), out, 10.0)
    e.process(segment(WAN, MAIL, 80, 42000, SYN | ACK, 900, 101), IN, 10.1)
    ack = e.process(segment(MAIL, WAN, 42000, 80, ACK, 101, 901), out, 10.2)
    expect(ack, Action.ACCEPT, Ct.ESTABLISHED, "established")
    assert [flow.synproxy for flow in e.conntrack] == [None, None]


def test_a_proxys_syn_the_policy_refuses_opens_nothing() -> None:
    policy = POLICY + "  - {name: closed, proto: tcp, to: 10.0.0.25, ports: 26, action: drop}\n"
    e = engine(policy)
    refused = e.process(segment(WAN, MAIL, 40000, 26, SYN, CLIENT_ISN, COOKIE), PROXY_OUT, 10.0)
    expect(refused, Action.DROP, Ct.NEW, "rule closed", "closed")
    assert len(e.conntrack) == 0


def test_a_verdict_that_depends_on_the_interface_drops() -> None:
    two_ways_in = """\
zones: {external: [wan0, wan1], internal: [lan0]}
defaults: {ingress: drop, egress: accept}
ingress:
  - {name: not-via-wan1, in: wan1, proto: tcp, action: drop}
  - {name: mail, proto: tcp, to: 10.0.0.25, ports: 25, action: accept, synproxy: true}
"""
    e = engine(two_ways_in)
    verdict = e.process(from_client(SYN, CLIENT_ISN, COOKIE), PROXY_OUT, 10.0)
    reason = "synproxy: the verdict depends on the interface the SYN came in on"
    expect(verdict, Action.DROP, Ct.NEW, reason)
    assert len(e.conntrack) == 0
    # Proxied on wan0 only: the verdict is wan0's.
    e = engine(
        two_ways_in.replace(
            "ports: 25, action: accept, synproxy: true", "ports: 25, in: wan0, action: accept, synproxy: true"
        )
    )
    expect(
        e.process(from_client(SYN, CLIENT_ISN, COOKIE), PROXY_OUT, 10.0),
        Action.ACCEPT,
        Ct.NEW,
        "rule mail",
        "mail",
    )


def test_a_snapshot_forgets_the_offset_and_relearns_the_windows() -> None:
    e = engine()
    proxied_handshake(e)
    e.process(from_client(ACK, CLIENT_ISN + 1, COOKIE + 1), IN, 10.2)
    data = encode(list(e.conntrack), now=11.0, wall=1000.0, exact=True)
    (restored,) = decode(data, now=50.0, wall=1001.0).flows
    assert restored.synproxy is None and restored.state_name == "ESTABLISHED"
    conn = restored.tcp
    assert conn is not None
    assert conn.side(0)["flags"] & F_BE_LIBERAL and conn.side(1)["flags"] & F_BE_LIBERAL
    assert conn.side(0)["td_maxwin"] == conn.side(1)["td_maxwin"] == 0
