"""Later fragments get the verdict on their datagram's first fragment (nfqfw.core.fragments).

The kernel reassembles before conntrack, so a datagram passes or not as a whole; the lab test
test_kernel_agreement.py compares this with the kernel on real fragments.
"""

from __future__ import annotations

from pathlib import Path

from nfqfw.core.build import (
    PROTO_UDP,
    addr,
    ipv4,
    ipv6,
    ipv6_fragment_header,
    ipv6_options_header,
    tcp,
    udp,
)
from nfqfw.core.config import load_policy
from nfqfw.core.decode import decode
from nfqfw.core.engine import Engine
from nfqfw.core.fragments import FRAGMENT_TIMEOUT, Fragments, datagram_key
from nfqfw.core.packet import SYN
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.verdict import Action, Ct, Hook, Meta, Verdict

POLICY_FILE = Path(__file__).resolve().parents[3] / "config" / "policy.yaml"
OUT = Meta(Hook.FORWARD, "lan0", "wan0")
IN = Meta(Hook.FORWARD, "wan0", "lan0")
LAN, WAN = addr("10.0.0.5"), addr("203.0.113.7")
LAN6, WAN6 = addr("fd00::5"), addr("2001:db8::7")
HOP_BY_HOP = 0


def engine() -> Engine:
    return Engine(CompiledPolicy(load_policy(POLICY_FILE)))


def v4_fragments(src: bytes, dst: bytes, segment: bytes, ident: int, proto: int = PROTO_UDP) -> list[bytes]:
    """`segment` (a UDP datagram or TCP segment, > 40 bytes) as IPv4 fragments at 0, 24 and 40."""
    pieces = [(0, segment[:24], True), (24, segment[24:40], True), (40, segment[40:], False)]
    return [
        ipv4(src, dst, proto, data, ident=ident, frag_offset=offset, more_fragments=more)
        for offset, data, more in pieces
    ]


def v6_fragments(src: bytes, dst: bytes, datagram: bytes, ident: int) -> list[bytes]:
    """A UDP datagram as IPv6 fragments at 0, 16 and 32, behind a hop-by-hop header (which every
    fragment repeats: it is not fragmentable)."""
    pieces = [(0, datagram[:16], True), (16, datagram[16:32], True), (32, datagram[32:], False)]
    return [
        ipv6(
            src,
            dst,
            HOP_BY_HOP,
            ipv6_options_header(44) + ipv6_fragment_header(17, offset, more, ident) + data,
        )
        for offset, data, more in pieces
    ]


def verdicts(e: Engine, packets: list[bytes], meta: Meta, now: float) -> list[tuple[Action, Ct, str]]:
    return [(v.action, v.ct, v.reason) for v in (e.process(p, meta, now) for p in packets)]


def test_ipv4_reply_fragments_follow_the_first_one() -> None:
    e = engine()
    assert e.process(ipv4(LAN, WAN, 17, udp(LAN, WAN, 40000, 53, b"q")), OUT, 1.0).action is Action.ACCEPT
    reply = v4_fragments(WAN, LAN, udp(WAN, LAN, 53, 40000, b"a" * 40), ident=77)
    following = (Action.ACCEPT, Ct.ESTABLISHED, "fragment of: established")
    assert verdicts(e, reply, IN, 1.1) == [
        (Action.ACCEPT, Ct.ESTABLISHED, "established"),
        following,
        following,
    ]
    assert e.counts() == {
        "accept default egress": 1,
        "accept established": 1,
        "accept fragment of: established": 2,
    }


def test_ipv6_fragments_behind_a_hop_by_hop_header_follow_the_first_one() -> None:
    e = engine()
    assert e.process(ipv6(LAN6, WAN6, 17, udp(LAN6, WAN6, 40000, 53, b"q")), OUT, 1.0).action is Action.ACCEPT
    reply = v6_fragments(WAN6, LAN6, udp(WAN6, LAN6, 53, 40000, b"a" * 40), ident=0x12345678)
    first, *later = reply
    assert datagram_key(decode(first), first) == datagram_key(decode(later[0]), later[0])
    assert [v[2] for v in verdicts(e, reply, IN, 1.1)] == ["established", *["fragment of: established"] * 2]


def test_fragments_of_a_dropped_datagram_are_dropped() -> None:
    e = engine()
    # Unsolicited from outside: the first fragment meets the ingress default; so do the others.
    unsolicited = v4_fragments(WAN, LAN, udp(WAN, LAN, 53, 40001, b"u" * 40), ident=78)
    assert verdicts(e, unsolicited, IN, 1.0) == [
        (Action.DROP, Ct.NEW, "default ingress"),
        (Action.DROP, Ct.NEW, "fragment of: default ingress"),
        (Action.DROP, Ct.NEW, "fragment of: default ingress"),
    ]


def test_fragments_of_a_rejected_datagram_are_dropped_without_an_answer_each() -> None:
    e = engine()
    segment = tcp(LAN, WAN, 40002, 445, seq=1, flags=SYN) + b"s" * 30
    rejected = v4_fragments(LAN, WAN, segment, ident=79, proto=6)
    results = [e.process(p, OUT, 1.0) for p in rejected]
    assert [(v.action, v.rule, v.reason, v.reject_with) for v in results] == [
        (Action.REJECT, "no-smb-out", "rule no-smb-out", "tcp-reset"),
        (Action.DROP, "no-smb-out", "fragment of: rule no-smb-out", None),
        (Action.DROP, "no-smb-out", "fragment of: rule no-smb-out", None),
    ]


def test_a_later_fragment_of_another_datagram_is_decided_on_its_own() -> None:
    e = engine()
    e.process(ipv4(LAN, WAN, 17, udp(LAN, WAN, 40003, 53, b"q")), OUT, 1.0)
    first, later, _ = v4_fragments(WAN, LAN, udp(WAN, LAN, 53, 40003, b"a" * 40), ident=80)
    other_ident = v4_fragments(WAN, LAN, udp(WAN, LAN, 53, 40003, b"a" * 40), ident=81)[1]
    other_proto = ipv4(WAN, LAN, 6, later[20:], ident=80, frag_offset=24, more_fragments=True)
    e.process(first, IN, 1.1)
    own = (Action.DROP, Ct.UNTRACKED, "default ingress")
    assert verdicts(e, [other_ident, other_proto], IN, 1.2) == [own, own]
    assert verdicts(e, [later], IN, 1.2) == [(Action.ACCEPT, Ct.ESTABLISHED, "fragment of: established")]


def test_a_later_fragment_before_its_first_one_is_decided_on_its_own() -> None:
    # The kernel would hold it until the datagram is complete; nfqfw answers at once.
    e = engine()
    e.process(ipv4(LAN, WAN, 17, udp(LAN, WAN, 40004, 53, b"q")), OUT, 1.0)
    first, middle, last = v4_fragments(WAN, LAN, udp(WAN, LAN, 53, 40004, b"a" * 40), ident=82)
    assert verdicts(e, [last, first, middle], IN, 1.1) == [
        (Action.DROP, Ct.UNTRACKED, "default ingress"),
        (Action.ACCEPT, Ct.ESTABLISHED, "established"),
        (Action.ACCEPT, Ct.ESTABLISHED, "fragment of: established"),
    ]


def test_a_datagram_is_remembered_for_the_reassembly_timeout() -> None:
    e = engine()
    e.process(ipv4(LAN, WAN, 17, udp(LAN, WAN, 40005, 53, b"q")), OUT, 1.0)
    first, middle, last = v4_fragments(WAN, LAN, udp(WAN, LAN, 53, 40005, b"a" * 40), ident=83)
    e.process(first, IN, 2.0)
    assert e.process(middle, IN, 2.0 + FRAGMENT_TIMEOUT - 0.01).reason == "fragment of: established"
    assert e.process(last, IN, 2.0 + FRAGMENT_TIMEOUT).reason == "default ingress"
    assert len(e.fragments) == 0


def test_the_table_is_bounded_oldest_forgotten_first() -> None:
    table = Fragments(max_datagrams=2)
    accepted = Verdict(Action.ACCEPT, Ct.ESTABLISHED, None, "established")
    for n, key in enumerate((b"a", b"b", b"c")):
        table.remember(key, accepted, float(n))
    assert len(table) == 2
    assert [table.first_verdict(key, 3.0) for key in (b"a", b"b", b"c")] == [None, accepted, accepted]
    table.remember(b"d", accepted, 1.0 + FRAGMENT_TIMEOUT)  # b's time is up: it goes, c stays
    assert [table.first_verdict(key, 1.0 + FRAGMENT_TIMEOUT) for key in (b"b", b"c", b"d")] == [
        None,
        accepted,
        accepted,
    ]
