"""`nfqfw replay` verdicts agree with the Linux kernel's conntrack and an equivalent iptables ruleset.

The same crafted packets (scapy, deterministic) go through two firewalls, one packet at a time,
in the same order:

- the kernel: a gateway namespace running no nfqfw, no NAT, whose FORWARD chains are
  `forward_rules()` below (POLICY in iptables terms) in front of the kernel's conntrack with
  nf_conntrack_tcp_be_liberal=0 and nf_conntrack_tcp_loose=0 (1 in the "loose" phase); see
  nfqfw.lab.kernel_oracle. A packet that comes out on the far side was accepted, one answered
  with an RST / ICMP error was rejected, anything else was dropped. The fragments of a datagram
  are judged together, since the kernel reassembles them before conntrack;
- nfqfw: the packets as the gateway received them (its capture: interface names, kernel
  timestamps) are written to a pcapng and run through `nfqfw replay --config POLICY`.

Some packets the gateway answers itself before FORWARD (`Step.answered`): its TTL runs out, or
it is too big for the route out with "don't fragment". The kernel's error leaves through OUTPUT,
where the oracle's chain only counts it by conntrack state; its verdict is the one nfqfw's
OUTPUT rules give that state (ESTABLISHED / RELATED pass, INVALID is dropped): "reject" when the
sender gets it, else "drop". nfqfw gets what its daemon would: the TTL-expired packet (replay
says "not-queued" itself) or nothing (replay cannot know a route's MTU: left out of its
capture), then the gateway's error on the OUTPUT hook (POLICY's gateway-addresses).

Every packet carries the verdict we expect, so the comparison cannot pass by both sides dropping
everything. Where nfqfw deliberately differs from the kernel the step says so (`Step.nfqfw` and
`Step.why`), and test_the_documented_differences lists them.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    ICMPv6Unknown,
    IPv6,
    IPv6ExtHdrFragment,
    fragment6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw
from scapy.utils import wrpcapng

from nfqfw.lab.kernel_oracle import Arrival, Judgement, kernel_gateway

pytestmark = pytest.mark.lab

ACCEPT, DROP, REJECT = "accept", "drop", "reject"
PARTIAL = "partial"  # some fragments of a datagram passed, not all

# Where nfqfw deliberately differs from the kernel (asserted, so that a change shows).
OUT_OF_ORDER_FRAGMENTS = (
    "the kernel holds fragments until their datagram is complete and decides it as a whole; nfqfw "
    "answers each packet at once, so a fragment arriving before its datagram's first one (which "
    "alone carries the ports) is decided on its own: untracked, by the policy defaults -- here "
    "the ingress default drops the two that come first, and the datagram is lost"
)

NO_CHECKSUMS = (
    "nfqfw does not verify TCP/UDP/ICMP checksums (a sum over every byte, per packet, in Python; "
    "the receiving host discards such packets anyway); the kernel's conntrack calls a packet with "
    "a wrong checksum INVALID (nf_conntrack_checksum=1, the default), so it is dropped and changes "
    "no state -- in nfqfw it passes and is tracked like an intact one"
)

GATEWAY = "gateway-addresses: [203.0.113.1, 10.0.0.1, 2001:db8:1::1, fd00::1]"
POLICY = """\
zones:
  external: [wan0]
  internal: [lan0]
defaults: {ingress: drop, egress: accept, invalid: drop}
ingress:
  - {name: mail, proto: tcp, to: [10.0.0.25, fd00::25], ports: [25, 587], action: accept}
  - {name: no-ident, proto: tcp, ports: [113], action: reject}
  - {name: syslog, proto: udp, to: [10.0.0.25, fd00::25], ports: [514], action: accept}
egress:
  - {name: no-smb-out, proto: tcp, ports: [445], action: reject}
  - {name: no-telnet, proto: tcp, ports: [23], action: drop}
  - {name: no-netbios, proto: udp, ports: [137], action: reject}
"""


def forward_rules(family: int) -> list[tuple[str, str]]:
    """POLICY as iptables (family 4) or ip6tables (6) FORWARD rules, each with the conntrack
    state of the packets it sees. ESTABLISHED and RELATED pass, INVALID is dropped
    (defaults.invalid); a NEW packet meets the rules of its side in order, then its side's
    default. The chain's policy (DROP) sees only what conntrack leaves untracked."""
    mail_host = "10.0.0.25" if family == 4 else "fd00::25"
    port_unreachable = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
    new = "-m conntrack --ctstate NEW"
    return [
        ("established", "-m conntrack --ctstate ESTABLISHED -j ACCEPT"),
        ("related", "-m conntrack --ctstate RELATED -j ACCEPT"),
        ("invalid", "-m conntrack --ctstate INVALID -j DROP"),
        ("new", f"-i wan0 {new} -p tcp -d {mail_host} -m multiport --dports 25,587 -j ACCEPT"),
        ("new", f"-i wan0 {new} -p tcp --dport 113 -j REJECT --reject-with tcp-reset"),
        ("new", f"-i wan0 {new} -p udp -d {mail_host} --dport 514 -j ACCEPT"),
        ("new", f"-i wan0 {new} -j DROP"),
        ("new", f"-i lan0 {new} -p tcp --dport 445 -j REJECT --reject-with tcp-reset"),
        ("new", f"-i lan0 {new} -p tcp --dport 23 -j DROP"),
        ("new", f"-i lan0 {new} -p udp --dport 137 -j REJECT --reject-with {port_unreachable}"),
        ("new", f"-i lan0 {new} -j ACCEPT"),
    ]


# The gateway's own errors: nfqfw's OUTPUT passes these conntrack states, drops INVALID.
OUTPUT_PASSES = ("established", "related")

# The conntrack state the kernel gave a packet, told by the rule that decided it.
CT_OF_RULE = {rule: ct for family in (4, 6) for ct, rule in forward_rules(family)} | {
    "policy": "untracked",
    "none": "never reached FORWARD",
}


@dataclass(frozen=True)
class Family:
    """One address family's lab addresses."""

    name: str
    lan: str  # the inside host
    lan2: str  # another inside address, reached through the inside host (not its own)
    wan: str  # the outside host
    wan2: str  # another outside address, reached through the outside host
    router: str  # an outside router: only the source of ICMP errors
    narrow: str  # an outside address the gateway routes with a path MTU of NARROW_MTU

    def ip(self, src: str, dst: str, ttl: int = 64, df: bool = False) -> Packet:
        if self.name == "ipv6":
            return IPv6(src=src, dst=dst, hlim=ttl)
        return IP(src=src, dst=dst, ttl=ttl, flags="DF" if df else 0)

    def echo(self, src: str, dst: str, ident: int, seq: int, reply: bool = False, ttl: int = 64) -> Packet:
        if self.name == "ipv6":
            kind = ICMPv6EchoReply if reply else ICMPv6EchoRequest
            return self.ip(src, dst, ttl) / kind(id=ident, seq=seq)
        return self.ip(src, dst, ttl) / ICMP(type=0 if reply else 8, id=ident, seq=seq)

    def error(self, src: str, dst: str, kind: str, quoted: bytes) -> Packet:
        """An ICMP/ICMPv6 error from `src` to `dst` quoting the packet `quoted` (its start)."""
        body = Raw(quoted[:128])
        if self.name == "ipv6":
            layer = {
                "port-unreachable": ICMPv6DestUnreach(code=4),
                "host-unreachable": ICMPv6DestUnreach(code=3),
                "too-big": ICMPv6PacketTooBig(mtu=1280),
                "time-exceeded": ICMPv6TimeExceeded(code=0),
            }[kind]
        else:
            layer = {
                "port-unreachable": ICMP(type=3, code=3),
                "host-unreachable": ICMP(type=3, code=1),
                "too-big": ICMP(type=3, code=4, nexthopmtu=1280),
                "time-exceeded": ICMP(type=11, code=0),
            }[kind]
        return self.ip(src, dst) / layer / body


V4 = Family("ipv4", "10.0.0.25", "10.0.0.26", "203.0.113.10", "203.0.113.11", "203.0.113.254", "203.0.113.12")
V6 = Family(
    "ipv6", "fd00::25", "fd00::26", "2001:db8:1::10", "2001:db8:1::11", "2001:db8:1::fe", "2001:db8:1::12"
)
NEIGHBOURS = {
    "wan": [V4.wan, V4.wan2, V4.narrow, V6.wan, V6.wan2, V6.narrow],
    "lan": [V4.lan, V4.lan2, V6.lan, V6.lan2],
}
NARROW_MTU = 1280
INSIDE = (V4.lan, V4.lan2, V6.lan, V6.lan2)


# --- scenarios ----------------------------------------------------------------------------------


@dataclass
class Step:
    what: str
    side: str  # where the packets enter the gateway: "wan" or "lan"
    packets: tuple[bytes, ...]  # one packet, or the fragments of one datagram
    expect: str  # the kernel's verdict, and nfqfw's unless `nfqfw` says otherwise
    nfqfw: tuple[str, str] | None = None  # a documented, deliberate difference: nfqfw's verdict
    why: str = ""  # and conntrack state, and the reason
    # The gateway answers the packet itself, before FORWARD: "ttl" (time exceeded) or "mtu"
    # (fragmentation needed / packet too big). `expect` is then the fate of its error.
    answered: str = ""


@dataclass
class Script:
    """One scenario: packets in order, each datagram marked uniquely (IPv4 id / IPv6 flow label)."""

    name: str
    markers: Iterator[int]
    steps: list[Step] = field(default_factory=list)

    def send(self, pkt: Packet, expect: str, what: str, **differs: Any) -> bytes:
        """Send one packet; `differs`: nfqfw=(VERDICT, CT), why=REASON for a documented
        difference from the kernel, or answered="ttl"/"mtu" (see Step). Returns its bytes."""
        self._mark(pkt)
        data = bytes(pkt)
        self.steps.append(Step(what, side_of(pkt), (data,), expect, **differs))
        return data

    def send_fragments(
        self, pkt: Packet, expect: str, what: str, order: tuple[int, ...] = (0, 1, 2), **differs: Any
    ) -> bytes:
        """Send `pkt` (IP/UDP, > 2800 bytes) as three fragments, in `order`; returns the datagram.
        `differs`: nfqfw=(VERDICT, CT), why=REASON for a documented difference from the kernel."""
        marker = self._mark(pkt)
        if IPv6 in pkt:
            layer = pkt[IPv6]
            pkt = (
                IPv6(src=layer.src, dst=layer.dst, fl=marker) / IPv6ExtHdrFragment(id=marker) / layer.payload
            )
            pieces = fragment6(pkt, 1400)
        else:
            pieces = fragment(pkt, fragsize=1400)
        assert len(pieces) == 3, len(pieces)
        packets = tuple(bytes(pieces[i]) for i in order)
        self.steps.append(Step(what, side_of(pkt), packets, expect, **differs))
        return bytes(pkt)

    def _mark(self, pkt: Packet) -> int:
        marker = next(self.markers)
        if IPv6 in pkt:
            pkt[IPv6].fl = marker
        else:
            pkt[IP].id = marker
        return marker


def side_of(pkt: Packet) -> str:
    return "lan" if (pkt[IPv6].src if IPv6 in pkt else pkt[IP].src) in INSIDE else "wan"


CLIENT, SERVER = 0, 1
MASK = 0xFFFFFFFF


class Tcp:
    """One TCP conversation: builds segments with the right sequence numbers, like a packetdrill
    script, each side's next sequence number kept as the segments go."""

    def __init__(
        self,
        script: Script,
        family: Family,
        client: str,
        cport: int,
        server: str,
        sport: int,
        cseq: int = 1_000,
        sseq: int = 3_000_000,
        windows: tuple[int, int] = (64240, 65160),
    ) -> None:
        self.script, self.family = script, family
        self.ends = ((client, cport), (server, sport))
        self.nxt = [cseq, sseq]
        self.windows = windows

    def c(self, flags: str, expect: str, what: str = "", data: bytes = b"", **fields: Any) -> bytes:
        """A segment from the client; `fields`: TCP header fields, or nfqfw= and why= (see Script.send)."""
        return self._segment(CLIENT, flags, expect, what, data, fields)

    def s(self, flags: str, expect: str, what: str = "", data: bytes = b"", **fields: Any) -> bytes:
        return self._segment(SERVER, flags, expect, what, data, fields)

    def handshake(self, what: str = "", options: bool = False) -> None:
        syn_options = {"options": [("MSS", 1460), ("SAckOK", b""), ("WScale", 7)]} if options else {}
        self.c("S", ACCEPT, f"{what}SYN", **syn_options)
        self.s("SA", ACCEPT, f"{what}SYN-ACK", **syn_options)
        self.c("A", ACCEPT, f"{what}ACK")

    def _segment(
        self, who: int, flags: str, expect: str, what: str, data: bytes, fields: dict[str, object]
    ) -> bytes:
        (src, sport), (dst, dport) = self.ends[who], self.ends[1 - who]
        differs = {key: fields.pop(key) for key in ("nfqfw", "why") if key in fields}
        # Only an accepted segment sent at the next sequence number moves it on: one with a
        # chosen `seq` is a retransmission, a forgery or ignored by conntrack.
        advance = expect == ACCEPT and "seq" not in fields
        seq = fields.pop("seq", self.nxt[who])
        ack = fields.pop("ack", self.nxt[1 - who] if "A" in flags else 0)
        window = fields.pop("window", self.windows[who])
        segment = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=window, **fields)
        pkt = self.family.ip(src, dst) / segment / Raw(data) if data else self.family.ip(src, dst) / segment
        label = what or f"{'client' if who == CLIENT else 'server'} {flags}{f' +{len(data)}' if data else ''}"
        if advance:
            self.nxt[who] = (int(seq) + len(data) + ("S" in flags) + ("F" in flags)) & MASK
        return self.script.send(pkt, expect, label, **differs)


class Scenarios:
    """Every scenario, built once, deterministically (fresh ports and ICMP ids for each flow)."""

    def __init__(self) -> None:
        self.markers = itertools.count(1)
        self.ports = itertools.count(40000)
        self.idents = itertools.count(700)
        self.scripts: list[Script] = []

    def script(self, name: str) -> Script:
        script = Script(name, self.markers)
        self.scripts.append(script)
        return script

    def egress(self, script: Script, f: Family, port: int, **kw: Any) -> Tcp:
        return Tcp(script, f, f.lan, next(self.ports), f.wan, port, **kw)

    # -- TCP -----------------------------------------------------------------------------------
    def tcp_lifecycle(self, f: Family) -> None:
        t = self.egress(self.script(f"tcp-lifecycle-{f.name}"), f, 80, windows=(502, 509))
        t.handshake(options=True)  # window scale 7 both ways: 502 << 7 = 64256 bytes
        t.c("PA", ACCEPT, data=b"q" * 100)
        t.s("A", ACCEPT)
        t.s("PA", ACCEPT, data=b"r" * 300)
        t.c("A", ACCEPT)
        t.c("PA", ACCEPT, "client retransmits its acknowledged data", data=b"q" * 100, seq=1001)
        t.c("FA", ACCEPT, "client FIN")
        t.s("FA", ACCEPT, "server FIN-ACK")
        t.c("A", ACCEPT, "client ACK: TIME_WAIT")
        again = Tcp(t.script, f, *t.ends[0], *t.ends[1], cseq=900_000, sseq=7_000_000)
        again.handshake("reopen after TIME_WAIT: ")
        again.c("PA", ACCEPT, "data on the reopened connection", data=b"n" * 10)
        again.s("A", ACCEPT)

    def tcp_time_wait_server_syn(self, f: Family) -> None:
        t = self.egress(self.script(f"tcp-time-wait-server-syn-{f.name}"), f, 80)
        t.handshake()
        t.c("FA", ACCEPT, "client FIN")
        t.s("FA", ACCEPT, "server FIN-ACK")
        t.c("A", ACCEPT, "client ACK: TIME_WAIT")
        # A SYN from the server in TIME_WAIT ends the old entry and starts a flow the other way
        # round: new, from outside, to a port no rule allows.
        t.s("S", DROP, "server SYN in TIME_WAIT: a new ingress flow, default drop", seq=9_000_000)
        t.c("A", DROP, "client ACK of the old connection: its entry is gone")

    def tcp_strict_pickup(self, f: Family) -> None:
        t = self.egress(self.script(f"tcp-strict-pickup-{f.name}"), f, 80)
        t.c("A", DROP, "ACK without a connection")
        t.c("PA", DROP, "data without a connection", data=b"d" * 20)
        t.c("SA", DROP, "SYN-ACK without a connection")
        t.c("FA", DROP, "FIN-ACK without a connection")
        t.c("R", DROP, "RST without a connection")
        t.c("RA", DROP, "RST-ACK without a connection")
        t.s("A", DROP, "ACK from outside without a connection")
        t.handshake("then a proper ")
        t.c("PA", ACCEPT, data=b"d" * 20)

    def tcp_invalid_flags(self, f: Family) -> None:
        t = self.egress(self.script(f"tcp-invalid-flags-{f.name}"), f, 80)
        combinations = [
            ("", "NULL"),
            ("F", "FIN alone"),
            ("SF", "SYN+FIN"),
            ("SR", "SYN+RST"),
            ("FPU", "XMAS"),
        ]
        for flags, name in combinations:
            t.c(flags, DROP, f"{name} without a connection")
        t.handshake()
        t.c("PA", ACCEPT, data=b"a" * 10)
        t.s("A", ACCEPT)
        for flags, name in combinations:
            t.s(flags, DROP, f"{name} into the live connection")
        t.c("PA", ACCEPT, "data still passes", data=b"b" * 10)
        t.s("PA", ACCEPT, "and the other way", data=b"c" * 10)

    def tcp_window(self, f: Family) -> None:
        t = self.egress(self.script(f"tcp-window-{f.name}"), f, 80)
        t.handshake()
        t.c("PA", ACCEPT, data=b"w" * 100)
        t.s("A", ACCEPT)
        far = (t.nxt[CLIENT] + (1 << 30)) & MASK
        t.c("PA", DROP, "data far beyond the window", data=b"x" * 100, seq=far)
        t.c("A", DROP, "ACK of data never sent", ack=(t.nxt[SERVER] + 100_000) & MASK)
        t.s("A", DROP, "ACK from outside of data never sent", ack=(t.nxt[CLIENT] + 100_000) & MASK)
        t.c("PA", ACCEPT, "in-window data still passes", data=b"y" * 100)
        t.s("PA", ACCEPT, "and the other way", data=b"z" * 100)
        t.c("A", ACCEPT)

    def tcp_rst(self, f: Family) -> None:
        t = self.egress(self.script(f"tcp-rst-{f.name}"), f, 80)
        t.handshake()
        t.c("PA", ACCEPT, data=b"h" * 100)
        t.s("PA", ACCEPT, data=b"i" * 100)
        t.c("A", ACCEPT)  # ASSURED now
        t.s("R", DROP, "RST far beyond the window", seq=(t.nxt[SERVER] + (1 << 30)) & MASK)
        t.s("R", DROP, "RST below what the client acknowledged", seq=(t.nxt[SERVER] - 50_000) & MASK)
        t.c("PA", ACCEPT, "the connection lives on", data=b"j" * 10)
        t.s("A", ACCEPT)
        t.s("R", ACCEPT, "in-window RST, not the exact sequence (challenge ACK)", seq=t.nxt[SERVER] + 1000)
        t.c("A", ACCEPT, "client's challenge ACK", ack=t.nxt[SERVER])
        t.s("PA", ACCEPT, "the connection lives on", data=b"k" * 10)
        t.c("A", ACCEPT)
        t.s("R", ACCEPT, "exact RST")
        t.c("PA", ACCEPT, "data after the RST (CLOSE state, in window)", data=b"l" * 10)

    def tcp_syn_retransmit(self, f: Family) -> None:
        t = self.egress(self.script(f"tcp-syn-retransmit-{f.name}"), f, 80)
        t.c("S", ACCEPT, "SYN")
        t.c("S", ACCEPT, "SYN retransmitted", seq=t.nxt[CLIENT] - 1)
        t.s("SA", ACCEPT, "SYN-ACK")
        t.s("SA", ACCEPT, "SYN-ACK retransmitted", seq=t.nxt[SERVER] - 1)
        t.c("A", ACCEPT, "ACK")
        t.c("PA", ACCEPT, data=b"s" * 10)

    def tcp_simultaneous_open(self, f: Family) -> None:
        t = self.egress(self.script(f"tcp-simultaneous-open-{f.name}"), f, 6000)
        t.c("S", ACCEPT, "SYN from inside")
        t.s("S", ACCEPT, "SYN from outside, crossing it")
        t.c("SA", ACCEPT, "SYN-ACK from inside", seq=t.nxt[CLIENT] - 1)
        t.s("SA", ACCEPT, "SYN-ACK from outside", seq=t.nxt[SERVER] - 1)
        t.c("A", ACCEPT)
        t.s("A", ACCEPT)
        t.c("PA", ACCEPT, data=b"u" * 10)
        t.s("PA", ACCEPT, data=b"v" * 10)

    def tcp_syn_in_established(self, f: Family) -> None:
        # The client lost its connection and starts over on the same ports (kernel selftest
        # conntrack_syn_challenge_ack): the SYN is ignored, the server's challenge ACK passes, the
        # client's RST for it closes the entry, and the next SYN opens a new one.
        t = self.egress(self.script(f"tcp-syn-in-established-{f.name}"), f, 80)
        t.handshake()
        t.c("PA", ACCEPT, data=b"e" * 50)
        t.s("A", ACCEPT)
        challenged = t.nxt[CLIENT]
        t.c("S", ACCEPT, "new SYN in ESTABLISHED: ignored, passes", seq=2_000_000_000)
        t.s("A", ACCEPT, "server's challenge ACK", ack=challenged)
        t.c("R", ACCEPT, "client's RST for the challenge ACK", seq=challenged)
        again = Tcp(t.script, f, *t.ends[0], *t.ends[1], cseq=2_000_000_000, sseq=5_000_000)
        again.handshake("after the RST, a new ")
        again.c("PA", ACCEPT, data=b"f" * 10)

    def tcp_synack_resync(self, f: Family) -> None:
        # A SYN ignored in ESTABLISHED and the server's SYN-ACK for it: conntrack resynchronises
        # on the new connection, and the old sequence numbers are out of the window from then on.
        t = self.egress(self.script(f"tcp-synack-resync-{f.name}"), f, 80)
        t.handshake()
        old = t.nxt[CLIENT]
        t.c("PA", ACCEPT, data=b"o" * 50)
        new = Tcp(t.script, f, *t.ends[0], *t.ends[1], cseq=3_500_000_000, sseq=900_000_000)
        new.c("S", ACCEPT, "new SYN in ESTABLISHED: ignored, passes")
        new.s("SA", ACCEPT, "SYN-ACK answering it: resynchronised")
        new.c("A", ACCEPT)
        new.c("PA", ACCEPT, "data of the new connection", data=b"p" * 10)
        new.s("A", ACCEPT)
        t.c("PA", DROP, "data with the old connection's numbers", data=b"o" * 10, seq=old + 50)

    def tcp_rst_before_reply(self, f: Family) -> None:
        script = self.script(f"tcp-rst-before-reply-{f.name}")
        t = self.egress(script, f, 80)
        t.c("S", ACCEPT)
        t.s("RA", ACCEPT, "RST-ACK answering the SYN: passes, the entry is removed")
        t.s("SA", DROP, "a SYN-ACK after it: no entry")
        aborted = self.egress(script, f, 80)
        aborted.c("S", ACCEPT)
        aborted.c("R", ACCEPT, "the client aborts in SYN_SENT: passes, the entry is removed", seq=1001)
        aborted.s("SA", DROP, "the SYN-ACK arriving late: no entry")
        wrong = self.egress(script, f, 80)
        wrong.c("S", ACCEPT)
        wrong.s("SA", DROP, "SYN-ACK acknowledging more than the SYN", ack=wrong.nxt[CLIENT] + 100)
        wrong.s("SA", ACCEPT, "the right SYN-ACK")
        wrong.c("A", ACCEPT)

    def tcp_window_edges(self, f: Family) -> None:
        # The server offers a 1000-byte window (no scaling): sequence checks at its edges.
        t = self.egress(self.script(f"tcp-window-edges-{f.name}"), f, 80, windows=(64240, 1000))
        t.handshake()
        first = t.nxt[CLIENT]
        t.c("PA", ACCEPT, data=b"1" * 600)
        t.s("A", ACCEPT, window=1000)
        edge = (first + 600 + 1000 + 10) & MASK  # 10 bytes past the right edge of the window
        t.c("PA", ACCEPT, "data starting just past the window: ignored, passes", data=b"2" * 100, seq=edge)
        t.c("PA", DROP, "data starting far past the window", data=b"3" * 100, seq=(edge + 5000) & MASK)
        t.c("PA", ACCEPT, "the data the window allows", data=b"4" * 1000)
        t.s("A", ACCEPT, window=1000)
        t.c("PA", ACCEPT, "a retransmission of the oldest data: ignored, passes", data=b"1" * 600, seq=first)

    def tcp_ack_loss_stall(self, f: Family) -> None:
        # Kernel selftest conntrack_ack_loss_stall: after ~70 KB acknowledged, a retransmission
        # of the first bytes and a stale ACK are below the lower bounds: ignored, not invalid.
        t = Tcp(self.script(f"tcp-ack-loss-stall-{f.name}"), f, f.lan, next(self.ports), f.wan, 80)
        t.handshake()
        start = t.nxt[SERVER]
        t.c("PA", ACCEPT, "request", data=b"GET /big\r\n")
        for burst in (40, 10):
            for n in range(burst):
                t.s("A", ACCEPT, f"server data {n + 1}/{burst}", data=b"D" * 1400)
            t.c("A", ACCEPT, "client ACKs them all")
        t.s("PA", ACCEPT, "server retransmits the first segment", data=b"D" * 1400, seq=start)
        t.c("A", ACCEPT, "a stale client ACK of the first segment", ack=start + 1400)
        t.c("PA", ACCEPT, "the connection goes on", data=b"bye")

    def tcp_close_from_outside(self, f: Family) -> None:
        t = self.egress(self.script(f"tcp-close-from-outside-{f.name}"), f, 80)
        t.handshake()
        t.s("FA", ACCEPT, "server FIN")
        t.c("A", ACCEPT, "client ACK: CLOSE_WAIT")
        t.c("PA", ACCEPT, "client data in CLOSE_WAIT", data=b"late" * 5)
        t.s("A", ACCEPT)
        t.s("FA", ACCEPT, "server FIN retransmitted", seq=t.nxt[SERVER] - 1)
        t.c("FA", ACCEPT, "client FIN: LAST_ACK")
        t.s("A", ACCEPT, "server ACK: TIME_WAIT")
        t.c("PA", ACCEPT, "in-window data in TIME_WAIT: no check that it follows a FIN", data=b"x" * 10)

    def tcp_ingress(self, f: Family) -> None:
        script = self.script(f"tcp-ingress-{f.name}")
        mail = Tcp(script, f, f.wan, next(self.ports), f.lan, 25)
        mail.c("S", ACCEPT, "SYN to port 25: rule mail")
        mail.s("SA", ACCEPT)
        mail.c("A", ACCEPT)
        mail.c("PA", ACCEPT, data=b"EHLO x\r\n")
        mail.s("A", ACCEPT)
        ssh = Tcp(script, f, f.wan, next(self.ports), f.lan, 22)
        ssh.c("S", DROP, "SYN to port 22: ingress default drop")
        ssh.s("SA", DROP, "a SYN-ACK from inside for it: no connection")
        ident = Tcp(script, f, f.wan, next(self.ports), f.lan, 113)
        ident.c("S", REJECT, "SYN to port 113: rule no-ident rejects")
        other = Tcp(script, f, f.wan, next(self.ports), f.lan2, 25)
        other.c("S", DROP, "SYN to port 25 of another inside host: default drop")

    def tcp_egress_rules(self, f: Family) -> None:
        script = self.script(f"tcp-egress-rules-{f.name}")
        self.egress(script, f, 445).c("S", REJECT, "SYN to port 445: rule no-smb-out rejects")
        self.egress(script, f, 23).c("S", DROP, "SYN to port 23: rule no-telnet drops")
        web = self.egress(script, f, 443)
        web.c("S", ACCEPT, "SYN to port 443: egress default accept")
        web.s("SA", ACCEPT)

    # -- UDP and ICMP --------------------------------------------------------------------------
    def udp_request(self, script: Script, f: Family) -> int:
        """A UDP request from the inside host to the outside one's port 53; its source port."""
        port = next(self.ports)
        script.send(f.ip(f.lan, f.wan) / UDP(sport=port, dport=53) / b"query", ACCEPT, "request")
        return port

    def udp(self, f: Family) -> None:
        script = self.script(f"udp-{f.name}")
        port = self.udp_request(script, f)
        script.send(f.ip(f.wan, f.lan) / UDP(sport=53, dport=port) / b"answer 1", ACCEPT, "reply")
        script.send(f.ip(f.lan, f.wan) / UDP(sport=port, dport=53) / b"query 2", ACCEPT, "second request")
        script.send(f.ip(f.wan, f.lan) / UDP(sport=53, dport=port) / b"answer 2", ACCEPT, "second reply")
        script.send(
            f.ip(f.wan, f.lan) / UDP(sport=54, dport=port) / b"x", DROP, "from another port: new, ingress"
        )
        script.send(f.ip(f.wan, f.lan) / UDP(sport=53, dport=5353) / b"x", DROP, "unsolicited: ingress")
        reply = script.send(
            f.ip(f.wan, f.lan) / UDP(sport=53, dport=port) / b"answer 3", ACCEPT, "third reply"
        )
        script.send(
            f.error(f.lan, f.wan, "port-unreachable", reply),
            ACCEPT,
            "port unreachable from inside quoting the reply: RELATED",
        )
        netbios = f.ip(f.lan, f.wan) / UDP(sport=next(self.ports), dport=137) / b"nb"
        script.send(netbios, REJECT, "to port 137: rule no-netbios rejects")

    def icmp_echo(self, f: Family) -> None:
        script = self.script(f"icmp-echo-{f.name}")
        ident, other, stray = next(self.idents), next(self.idents), next(self.idents)
        script.send(f.echo(f.lan, f.wan, ident, 1), ACCEPT, "echo request from inside")
        script.send(f.echo(f.wan, f.lan, ident, 1, reply=True), ACCEPT, "its reply")
        script.send(f.echo(f.wan, f.lan, other, 1, reply=True), DROP, "reply with the wrong id")
        script.send(f.echo(f.wan, f.lan, stray, 5, reply=True), DROP, "unsolicited reply")
        script.send(f.echo(f.wan, f.lan, other, 1), DROP, "echo request from outside: ingress")
        script.send(f.echo(f.lan, f.wan, ident, 2), ACCEPT, "second request")
        script.send(f.echo(f.wan, f.lan, ident, 2, reply=True), ACCEPT, "second reply")
        script.send(f.echo(f.wan2, f.lan, ident, 2, reply=True), DROP, "the right id from another host")
        script.send(f.echo(f.lan, f.wan2, ident, 3), ACCEPT, "the same id to that host: a flow of its own")
        script.send(f.echo(f.wan2, f.lan, ident, 3, reply=True), ACCEPT, "its reply")

    def icmp_types(self, f: Family) -> None:
        script = self.script(f"icmp-types-{f.name}")
        ident = next(self.idents)
        if f is V4:
            script.send(
                IP(src=f.lan, dst=f.wan) / ICMP(type=13, id=ident, seq=1), ACCEPT, "timestamp request"
            )
            script.send(IP(src=f.wan, dst=f.lan) / ICMP(type=14, id=ident, seq=1), ACCEPT, "timestamp reply")
            script.send(IP(src=f.wan, dst=f.lan) / ICMP(type=9), DROP, "router advertisement: no flow")
            script.send(IP(src=f.lan, dst=f.wan) / ICMP(type=42), DROP, "unknown type 42: INVALID")
            return
        query = b"\x00\x02\x00\x00" + bytes(range(8))  # node information query: qtype 2, nonce
        script.send(
            IPv6(src=f.lan, dst=f.wan) / ICMPv6Unknown(type=139, msgbody=query),
            ACCEPT,
            "node information query",
        )
        script.send(
            IPv6(src=f.wan, dst=f.lan) / ICMPv6Unknown(type=140, msgbody=query),
            ACCEPT,
            "node information reply",
        )
        script.send(
            IPv6(src=f.lan, dst=f.wan) / ICMPv6Unknown(type=200, msgbody=b"\0" * 8),
            DROP,
            "unknown type 200: INVALID",
        )
        script.send(
            IPv6(src=f.wan, dst=f.lan, hlim=255) / ICMPv6ND_NS(tgt=f.lan),
            DROP,
            "neighbour solicitation to be forwarded: untracked, not forwarded",
        )

    def fragments(self, f: Family) -> None:
        script = self.script(f"fragments-{f.name}")
        port = self.udp_request(script, f)
        script.send_fragments(
            f.ip(f.wan, f.lan) / UDP(sport=53, dport=port) / (b"R" * 3000), ACCEPT, "a reply in 3 fragments"
        )
        script.send_fragments(
            f.ip(f.lan, f.wan) / UDP(sport=port, dport=53) / (b"Q" * 3000), ACCEPT, "a request in 3 fragments"
        )
        script.send_fragments(
            f.ip(f.wan, f.lan) / UDP(sport=53, dport=next(self.ports)) / (b"U" * 3000),
            DROP,
            "unsolicited, in 3 fragments",
        )
        script.send_fragments(
            f.ip(f.wan, f.lan) / UDP(sport=next(self.ports), dport=514) / (b"L" * 3000),
            ACCEPT,
            "to port 514 from outside, in 3 fragments: rule syslog",
        )
        script.send_fragments(
            f.ip(f.lan, f.wan) / UDP(sport=next(self.ports), dport=137) / (b"N" * 3000),
            REJECT,
            "to port 137 from inside, in 3 fragments: rule no-netbios",
        )
        script.send_fragments(
            f.ip(f.wan, f.lan) / UDP(sport=53, dport=port) / (b"S" * 3000),
            ACCEPT,
            "a reply in 3 fragments, the first one last",
            order=(1, 2, 0),
            nfqfw=(PARTIAL, "untracked"),
            why=OUT_OF_ORDER_FRAGMENTS,
        )

    def icmp_errors(self, f: Family) -> None:
        script = self.script(f"icmp-errors-{f.name}")
        udp = script.send(
            f.ip(f.lan, f.wan) / UDP(sport=next(self.ports), dport=5001) / b"hi", ACCEPT, "UDP out"
        )
        script.send(
            f.error(f.wan, f.lan, "port-unreachable", udp), ACCEPT, "port unreachable quoting it: RELATED"
        )
        syn = self.egress(script, f, 81).c("S", ACCEPT, "TCP SYN out")
        script.send(
            f.error(f.router, f.lan, "host-unreachable", syn),
            ACCEPT,
            "host unreachable from a router quoting the SYN: RELATED",
        )
        script.send(f.error(f.router, f.lan, "too-big", syn), ACCEPT, "too big quoting the SYN: RELATED")
        echo = script.send(f.echo(f.lan, f.wan, next(self.idents), 1), ACCEPT, "echo request out")
        script.send(
            f.error(f.router, f.lan, "time-exceeded", echo),
            ACCEPT,
            "time exceeded quoting the echo request: RELATED",
        )
        never = bytes(f.ip(f.lan, f.wan) / UDP(sport=next(self.ports), dport=5002) / b"never sent")
        script.send(f.error(f.wan, f.lan, "port-unreachable", never), DROP, "error quoting nothing: INVALID")
        script.send(
            f.error(f.wan, f.lan2, "port-unreachable", udp),
            DROP,
            "error about the UDP flow, sent to another inside host: INVALID",
        )
        inbound = Tcp(script, f, f.wan, next(self.ports), f.lan, 587).c(
            "S", ACCEPT, "SYN to 587 from outside"
        )
        script.send(
            f.error(f.lan, f.wan, "port-unreachable", inbound),
            ACCEPT,
            "port unreachable from inside quoting it: RELATED",
        )
        minimal = syn[: (20 if f is V4 else 40) + 8]  # RFC 792: the IP header and 8 bytes of data
        script.send(
            f.error(f.router, f.lan, "host-unreachable", minimal),
            ACCEPT,
            "host unreachable quoting the SYN's header and 8 bytes of it: RELATED",
        )
        error = bytes(f.error(f.wan, f.lan, "port-unreachable", udp))
        script.send(
            f.error(f.lan2, f.wan, "time-exceeded", error),
            DROP,
            "an inside router's error quoting an error: INVALID",
        )

    def gateway_answers(self, f: Family) -> None:
        """Packets the gateway answers before FORWARD (ping -t1, traceroute, path MTU discovery):
        the kernel attaches the packet's conntrack to its error, so the error is RELATED though
        the flow was never confirmed; no conntrack to attach (an invalid packet): INVALID."""
        script = self.script(f"gateway-answers-{f.name}")
        ident = next(self.idents)
        ttl = {"answered": "ttl"}
        script.send(
            f.echo(f.lan, f.wan, ident, 1, ttl=1), REJECT, "ping -t1 from inside: time exceeded", **ttl
        )
        script.send(f.echo(f.lan, f.wan, ident, 2), ACCEPT, "the next ping, full TTL: a new flow")
        script.send(f.echo(f.wan, f.lan, ident, 2, reply=True), ACCEPT, "its reply")
        script.send(f.echo(f.wan, f.lan, next(self.idents), 1, ttl=1), REJECT, "ping -t1 from outside", **ttl)
        probe = next(self.ports)
        script.send(
            f.ip(f.wan, f.lan, ttl=1) / UDP(sport=probe, dport=33434) / b"probe",
            REJECT,
            "traceroute from outside, hop 1: time exceeded (FORWARD would drop the probe)",
            **ttl,
        )
        script.send(
            f.ip(f.wan, f.lan, ttl=2) / UDP(sport=probe, dport=33435) / b"probe",
            DROP,
            "hop 2: reaches FORWARD, ingress default drop",
        )
        sport = next(self.ports)
        script.send(
            f.ip(f.lan, f.wan, ttl=1) / TCP(sport=sport, dport=80, flags="S", seq=500),
            REJECT,
            "a SYN with TTL 1 from inside (tcptraceroute): time exceeded",
            **ttl,
        )
        t = Tcp(script, f, f.lan, sport, f.wan, 80)
        t.handshake("the SYN again, full TTL: ")
        t.c("PA", ACCEPT, data=b"a" * 20)
        t.s("A", ACCEPT)
        data = f.ip(f.lan, f.wan, ttl=1) / TCP(
            sport=sport, dport=80, flags="PA", seq=t.nxt[CLIENT], ack=t.nxt[SERVER], window=64240
        )
        script.send(
            data / Raw(b"b" * 20), REJECT, "data with TTL 1 on the connection: error RELATED to it", **ttl
        )
        t.c("PA", ACCEPT, "the data again, full TTL", data=b"b" * 20)
        t.s("A", ACCEPT)
        script.send(
            f.ip(f.lan, f.wan, ttl=1) / TCP(sport=next(self.ports), dport=80, flags="A", seq=9, ack=9),
            DROP,
            "an ACK without a connection, TTL 1: the error has no conntrack, INVALID",
            **ttl,
        )
        script.send(
            f.echo(f.wan, f.lan, next(self.idents), 1, reply=True, ttl=1),
            DROP,
            "an unsolicited echo reply, TTL 1: INVALID error",
            **ttl,
        )
        port = next(self.ports)
        big = f.ip(f.lan, f.narrow, df=True) / UDP(sport=port, dport=443) / (b"Q" * 1300)
        script.send(
            big, REJECT, "a first UDP datagram too big for the route, DF: frag needed", answered="mtu"
        )
        small = f.ip(f.lan, f.narrow, df=True) / UDP(sport=port, dport=443) / (b"q" * 1000)
        script.send(small, ACCEPT, "the same flow's datagram made to fit: new")
        script.send(f.ip(f.narrow, f.lan) / UDP(sport=443, dport=port) / b"answer", ACCEPT, "its reply")

    def bad_checksums(self, f: Family) -> None:
        script = self.script(f"bad-checksums-{f.name}")
        port = self.udp_request(script, f)
        script.send(
            f.ip(f.wan, f.lan) / UDP(sport=53, dport=port, chksum=0x1234) / b"answer",
            DROP,
            "a reply with a wrong UDP checksum",
            nfqfw=(ACCEPT, "established"),
            why=NO_CHECKSUMS,
        )
        script.send(f.ip(f.wan, f.lan) / UDP(sport=53, dport=port) / b"answer", ACCEPT, "the reply, intact")
        t = self.egress(script, f, 80)
        t.c(
            "S",
            DROP,
            "a SYN with a wrong TCP checksum",
            chksum=0x1234,
            nfqfw=(ACCEPT, "new"),
            why=NO_CHECKSUMS,
        )
        t.handshake("then a SYN intact: ")
        t.s(
            "PA",
            DROP,
            "data with a wrong TCP checksum",
            data=b"c" * 20,
            chksum=0x1234,
            nfqfw=(ACCEPT, "established"),
            why=NO_CHECKSUMS,
        )
        t.s("PA", ACCEPT, "the data, intact", data=b"c" * 20)
        ident = next(self.idents)
        script.send(f.echo(f.lan, f.wan, ident, 1), ACCEPT, "echo request")
        reply = f.echo(f.wan, f.lan, ident, 1, reply=True)
        if f is V6:
            reply[ICMPv6EchoReply].cksum = 0x1234
        else:
            reply[ICMP].chksum = 0x1234
        script.send(
            reply,
            DROP,
            "its reply with a wrong ICMP checksum",
            nfqfw=(ACCEPT, "established"),
            why=NO_CHECKSUMS,
        )

    # -- loose pick-up (options: {tcp-pickup: loose}; nf_conntrack_tcp_loose=1) -----------------
    def loose_pickup(self, f: Family) -> None:
        script = self.script(f"loose-pickup-{f.name}")
        t = self.egress(script, f, 80)
        t.c("PA", ACCEPT, "data from inside without a connection: picked up, egress", data=b"m" * 20)
        t.s("PA", ACCEPT, "the answer", data=b"n" * 20)
        t.c("A", ACCEPT)
        far = (t.nxt[SERVER] + (1 << 30)) & MASK
        t.s(
            "PA",
            ACCEPT,
            "data far beyond the window: a picked-up flow is tracked liberally",
            data=b"x",
            seq=far,
        )
        t.c("FA", ACCEPT)
        t.s("FA", ACCEPT)
        t.c("A", ACCEPT)
        ssh = Tcp(script, f, f.wan, next(self.ports), f.lan, 22)
        ssh.c("A", DROP, "an ACK from outside to port 22: new, ingress default drop")
        mail = Tcp(script, f, f.wan, next(self.ports), f.lan, 25)
        mail.c("PA", ACCEPT, "data from outside to port 25: new, rule mail", data=b"MAIL FROM:<>\r\n")
        mail.s("A", ACCEPT)
        other = self.egress(script, f, 80)
        other.c("SA", DROP, "SYN-ACK without a connection: not picked up")
        other.c("FA", DROP, "FIN-ACK without a connection: not picked up")
        other.c("R", DROP, "RST without a connection: not picked up")
        other.c("", DROP, "NULL: invalid flags whatever the pick-up")

    def loose(self) -> list[Script]:
        first = len(self.scripts)
        for f in (V4, V6):
            self.loose_pickup(f)
        return self.scripts[first:]

    def strict(self) -> list[Script]:
        first = len(self.scripts)
        for f in (V4, V6):
            self.tcp_lifecycle(f)
            self.tcp_time_wait_server_syn(f)
            self.tcp_strict_pickup(f)
            self.tcp_invalid_flags(f)
            self.tcp_window(f)
            self.tcp_rst(f)
            self.tcp_syn_retransmit(f)
            self.tcp_simultaneous_open(f)
            self.tcp_syn_in_established(f)
            self.tcp_synack_resync(f)
            self.tcp_rst_before_reply(f)
            self.tcp_window_edges(f)
            self.tcp_ack_loss_stall(f)
            self.tcp_close_from_outside(f)
            self.tcp_ingress(f)
            self.tcp_egress_rules(f)
            self.udp(f)
            self.icmp_echo(f)
            self.icmp_errors(f)
            self.icmp_types(f)
            self.fragments(f)
            self.bad_checksums(f)
            self.gateway_answers(f)
        return self.scripts[first:]


@dataclass(frozen=True)
class Phase:
    """The scripts run with one kernel setting and the nfqfw policy that matches it."""

    name: str
    policy: str
    sysctl: str
    scripts: list[Script]


_scenarios = Scenarios()
PHASES = (
    Phase(
        "strict",
        POLICY + f"options: {{{GATEWAY}}}\n",
        "net.netfilter.nf_conntrack_tcp_loose=0",
        _scenarios.strict(),
    ),
    Phase(
        "loose",
        POLICY + f"options: {{{GATEWAY}, tcp-pickup: loose}}\n",
        "net.netfilter.nf_conntrack_tcp_loose=1",
        _scenarios.loose(),
    ),
)
SCRIPTS = [script for phase in PHASES for script in phase.scripts]


# --- the two firewalls --------------------------------------------------------------------------


@dataclass(frozen=True)
class Judged:
    step: Step
    kernel: str  # verdict
    kernel_ct: str  # conntrack state, from the rule that decided
    nfqfw: str
    nfqfw_ct: str  # of the first packet of the step
    reason: str  # nfqfw's


def write_capture(path: Path, arrivals: list[Arrival]) -> None:
    frames = []
    for arrival in arrivals:
        frame = Ether(arrival.frame)
        frame.sniffed_on = arrival.iface
        frame.time = arrival.timestamp
        frames.append(frame)
    wrpcapng(str(path), frames)


def replay(policy: Path, capture: Path) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "nfqfw", "replay", "--config", str(policy), str(capture)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def combined(verdicts: list[str]) -> str:
    """nfqfw's verdict on a datagram from those on its fragments, in the oracle's terms."""
    if all(v == ACCEPT for v in verdicts):
        return ACCEPT
    return PARTIAL if ACCEPT in verdicts else verdicts[0]


def gateway_answer(judgement: Judgement) -> str:
    """The fate of the gateway's own error under nfqfw's OUTPUT rules: it reaches the sender
    ("reject") or is dropped."""
    assert judgement.own is not None
    return REJECT if judgement.own.ct in OUTPUT_PASSES else DROP


def capture_of(steps: list[Step], judgements: list[Judgement]) -> list[tuple[str, bytes]]:
    """(interface, packet) as the gateway had them: each step's packets, then its own answer."""
    had = []
    for step, judgement in zip(steps, judgements, strict=True):
        had += [(f"{step.side}0", packet) for packet in step.packets]
        if judgement.own is not None:
            had.append((f"{step.side}0", judgement.own.ip))
    return had


def judge_step(step: Step, kernel: Judgement, lines: Iterator[dict[str, object]]) -> Judged:
    """The kernel's and nfqfw's verdicts on one step, from the judgement and nfqfw's lines."""
    if not step.answered:
        mine = [next(lines) for _ in step.packets]
        reason = "; ".join(str(line["reason"]) for line in mine)
        verdict = combined([str(line["verdict"]) for line in mine])
        return Judged(step, kernel.outcome, CT_OF_RULE[kernel.rule], verdict, str(mine[0]["ct"]), reason)
    assert kernel.own is not None and (kernel.rule, kernel.outcome) == ("none", REJECT), kernel
    mine = [next(lines) for _ in step.packets] if step.answered == "ttl" else []  # "mtu": not in the capture
    error = next(lines)
    reason = "; ".join(str(line["reason"]) for line in [*mine, error])
    verdict = REJECT if error["verdict"] == ACCEPT else str(error["verdict"])
    if any(line["verdict"] != "not-queued" for line in mine):
        verdict = str(mine[0]["verdict"])  # nfqfw judged a packet it would never see
    return Judged(step, gateway_answer(kernel), kernel.own.ct, verdict, str(error["ct"]), reason)


@pytest.fixture(scope="module")
def judged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Judged]]:
    kernel: dict[str, list[Judgement]] = {}
    arrivals: dict[str, list[Arrival]] = {}
    rules = {family: [rule for _, rule in forward_rules(family)] for family in (4, 6)}
    with kernel_gateway(rules[4], rules[6], NEIGHBOURS, V4.wan, V4.lan) as oracle:
        for f in (V4, V6):
            oracle.limit_route_mtu(f.narrow, "wan0", NARROW_MTU)
        for phase in PHASES:
            oracle.sysctl(phase.sysctl)
            steps = [step for script in phase.scripts for step in script.steps]
            kernel[phase.name] = [
                oracle.judge(step.side, step.packets, own=bool(step.answered)) for step in steps
            ]
            arrivals[phase.name] = oracle.take_arrivals()
    directory = tmp_path_factory.mktemp("kernel-agreement")
    results: dict[str, list[Judged]] = {}
    for phase in PHASES:
        steps = [step for script in phase.scripts for step in script.steps]
        # The capture holds exactly the judged packets and the gateway's answers, in order, each
        # on its interface; but not what nfqfw's daemon never sees and replay cannot tell.
        assert [(a.iface, a.frame[14:]) for a in arrivals[phase.name]] == capture_of(
            steps, kernel[phase.name]
        )
        unseen = {step.packets[0] for step in steps if step.answered == "mtu"}
        capture_arrivals = [a for a in arrivals[phase.name] if a.frame[14:] not in unseen]
        policy, capture = directory / f"{phase.name}.yaml", directory / f"{phase.name}.pcapng"
        policy.write_text(phase.policy)
        write_capture(capture, capture_arrivals)
        lines = iter(replay(policy, capture))
        judgements = iter(kernel[phase.name])
        for script in phase.scripts:
            for step in script.steps:
                results.setdefault(script.name, []).append(judge_step(step, next(judgements), lines))
        assert next(lines, None) is None
    return results


@pytest.mark.parametrize("scenario", [script.name for script in SCRIPTS])
def test_replay_agrees_with_the_kernel(judged: dict[str, list[Judged]], scenario: str) -> None:
    """Per packet: the kernel's verdict is the one expected, and nfqfw's verdict and conntrack
    state are the kernel's (but where a documented difference says otherwise)."""
    rows = judged[scenario]
    table = "\n".join(
        f"{n:3} {r.step.side}  {r.step.what:66} kernel {r.kernel:6} {r.kernel_ct:11}  "
        f"nfqfw {r.nfqfw:6} {r.nfqfw_ct:11} ({r.reason})"
        for n, r in enumerate(rows, 1)
    )
    seen = [(r.step.what, r.kernel, r.nfqfw, r.nfqfw_ct) for r in rows]
    wanted = [(r.step.what, r.step.expect, *(r.step.nfqfw or (r.step.expect, r.kernel_ct))) for r in rows]
    assert seen == wanted, f"\n{table}"


def test_the_documented_differences() -> None:
    """Where nfqfw and the kernel differ on purpose; each step says why."""
    documented = [(script.name, step.what) for script in SCRIPTS for step in script.steps if step.nfqfw]
    checksums = [
        "a reply with a wrong UDP checksum",
        "a SYN with a wrong TCP checksum",
        "data with a wrong TCP checksum",
        "its reply with a wrong ICMP checksum",
    ]
    expected = []
    for family in ("ipv4", "ipv6"):
        expected.append((f"fragments-{family}", "a reply in 3 fragments, the first one last"))
        expected += [(f"bad-checksums-{family}", what) for what in checksums]
    assert documented == expected
    assert all(step.why for script in SCRIPTS for step in script.steps if step.nfqfw)


def test_every_verdict_kind_is_compared(judged: dict[str, list[Judged]]) -> None:
    """The comparison covers real accepts, drops and rejects on both sides of the gateway."""
    rows = [r for results in judged.values() for r in results]
    kinds = {(r.step.side, r.kernel) for r in rows}
    assert kinds == {(side, verdict) for side in ("wan", "lan") for verdict in (ACCEPT, DROP, REJECT)}
    assert len(rows) == sum(len(script.steps) for script in SCRIPTS) > 400
