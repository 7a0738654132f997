"""`nfqfw replay` verdicts agree with the Linux kernel's conntrack and an equivalent iptables ruleset.

The same crafted packets go through two firewalls, one packet at a time, in the same order:

- the kernel: a gateway namespace running no nfqfw, whose FORWARD chain is `FORWARD_V4` /
  `FORWARD_V6` below (conntrack with strict TCP pick-up, as nfqfw's defaults), see
  nfqfw.lab.kernel_oracle. A packet that comes out on the far side was accepted, one answered
  with an RST / ICMP error was rejected, anything else was dropped;
- nfqfw: the packets as the gateway received them (its capture: interface names, kernel
  timestamps) are written to a pcapng and run through `nfqfw replay --config POLICY`.

Every packet carries the verdict we expect, so the comparison cannot pass by both sides dropping
everything, and a step where nfqfw deliberately differs from the kernel must say so
(`Step.nfqfw`, with the reason): none does at present.
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
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw
from scapy.utils import wrpcapng

from nfqfw.lab.kernel_oracle import Arrival, kernel_gateway

pytestmark = pytest.mark.lab

ACCEPT, DROP, REJECT = "accept", "drop", "reject"

POLICY = """\
zones:
  external: [wan0]
  internal: [lan0]
defaults: {ingress: drop, egress: accept, invalid: drop}
ingress:
  - {name: mail, proto: tcp, to: [10.0.0.25, fd00::25], ports: [25, 587], action: accept}
  - {name: no-ident, proto: tcp, ports: [113], action: reject}
egress:
  - {name: no-smb-out, proto: tcp, ports: [445], action: reject}
  - {name: no-telnet, proto: tcp, ports: [23], action: drop}
  - {name: no-netbios, proto: udp, ports: [137], action: reject}
"""


def forward_rules(family: int) -> list[str]:
    """POLICY as iptables (family 4) or ip6tables (6) FORWARD rules; the chain's policy is DROP
    (the ingress default), INVALID packets are dropped, egress is accepted by default."""
    mail_host = "10.0.0.25" if family == 4 else "fd00::25"
    port_unreachable = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
    new = "-m conntrack --ctstate NEW"
    return [
        "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-m conntrack --ctstate INVALID -j DROP",
        f"-i wan0 {new} -p tcp -d {mail_host} -m multiport --dports 25,587 -j ACCEPT",
        f"-i wan0 {new} -p tcp --dport 113 -j REJECT --reject-with tcp-reset",
        f"-i lan0 {new} -p tcp --dport 445 -j REJECT --reject-with tcp-reset",
        f"-i lan0 {new} -p tcp --dport 23 -j DROP",
        f"-i lan0 {new} -p udp --dport 137 -j REJECT --reject-with {port_unreachable}",
        f"-i lan0 {new} -j ACCEPT",
    ]


@dataclass(frozen=True)
class Family:
    """One address family's lab addresses."""

    name: str
    lan: str  # the inside host
    lan2: str  # another inside address, reached through the inside host (not its own)
    wan: str  # the outside host
    router: str  # an outside router: only the source of ICMP errors

    def ip(self, src: str, dst: str) -> Packet:
        return IPv6(src=src, dst=dst) if self.name == "ipv6" else IP(src=src, dst=dst)

    def echo(self, src: str, dst: str, ident: int, seq: int, reply: bool = False) -> Packet:
        if self.name == "ipv6":
            kind = ICMPv6EchoReply if reply else ICMPv6EchoRequest
            return self.ip(src, dst) / kind(id=ident, seq=seq)
        return self.ip(src, dst) / ICMP(type=0 if reply else 8, id=ident, seq=seq)

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


V4 = Family("ipv4", "10.0.0.25", "10.0.0.26", "203.0.113.10", "203.0.113.254")
V6 = Family("ipv6", "fd00::25", "fd00::26", "2001:db8:1::10", "2001:db8:1::fe")
NEIGHBOURS = {"wan": [V4.wan, V6.wan], "lan": [V4.lan, V4.lan2, V6.lan, V6.lan2]}
INSIDE = (V4.lan, V4.lan2, V6.lan, V6.lan2)


# --- scenarios ----------------------------------------------------------------------------------


@dataclass
class Step:
    what: str
    side: str  # where the packet enters the gateway: "wan" or "lan"
    packet: bytes
    expect: str  # the kernel's verdict, and nfqfw's unless `nfqfw` says otherwise
    nfqfw: str | None = None  # a documented, deliberate difference: nfqfw's verdict ...
    why: str = ""  # ... and the reason


@dataclass
class Script:
    """One scenario: packets in order, each marked uniquely (IPv4 id / IPv6 flow label)."""

    name: str
    markers: Iterator[int]
    steps: list[Step] = field(default_factory=list)

    def send(self, pkt: Packet, expect: str, what: str) -> bytes:
        if IPv6 in pkt:
            pkt[IPv6].fl = next(self.markers)
        else:
            pkt[IP].id = next(self.markers)
        data = bytes(pkt)
        side = "lan" if (pkt[IPv6].src if IPv6 in pkt else pkt[IP].src) in INSIDE else "wan"
        self.steps.append(Step(what, side, data, expect))
        return data


CLIENT, SERVER = 0, 1
MASK = 0xFFFFFFFF


class Tcp:
    """One TCP conversation: builds segments with the right sequence numbers, like a packetdrill
    script. Accepted segments advance their sender's next sequence number."""

    def __init__(
        self, script: Script, family: Family, client: str, cport: int, server: str, sport: int,
        cseq: int = 1_000, sseq: int = 3_000_000, windows: tuple[int, int] = (64240, 65160),
    ) -> None:  # fmt: skip
        self.script, self.family = script, family
        self.ends = ((client, cport), (server, sport))
        self.nxt = [cseq, sseq]
        self.windows = windows

    def c(self, flags: str, expect: str, what: str = "", data: bytes = b"", **fields: int) -> bytes:
        return self._segment(CLIENT, flags, expect, what, data, fields)

    def s(self, flags: str, expect: str, what: str = "", data: bytes = b"", **fields: int) -> bytes:
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
        seq = fields.pop("seq", self.nxt[who])
        ack = fields.pop("ack", self.nxt[1 - who] if "A" in flags else 0)
        window = fields.pop("window", self.windows[who])
        segment = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=window, **fields)
        pkt = self.family.ip(src, dst) / segment / Raw(data) if data else self.family.ip(src, dst) / segment
        label = what or f"{'client' if who == CLIENT else 'server'} {flags}{f' +{len(data)}' if data else ''}"
        if expect == ACCEPT:
            end = (int(seq) + len(data) + ("S" in flags) + ("F" in flags)) & MASK
            if (end - self.nxt[who]) & MASK < 1 << 31:
                self.nxt[who] = end
        return self.script.send(pkt, expect, label)


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
    def udp(self, f: Family) -> None:
        script = self.script(f"udp-{f.name}")
        port = next(self.ports)
        script.send(f.ip(f.lan, f.wan) / UDP(sport=port, dport=53) / b"query 1", ACCEPT, "request")
        script.send(f.ip(f.wan, f.lan) / UDP(sport=53, dport=port) / b"answer 1", ACCEPT, "reply")
        script.send(f.ip(f.lan, f.wan) / UDP(sport=port, dport=53) / b"query 2", ACCEPT, "second request")
        script.send(f.ip(f.wan, f.lan) / UDP(sport=53, dport=port) / b"answer 2", ACCEPT, "second reply")
        script.send(
            f.ip(f.wan, f.lan) / UDP(sport=54, dport=port) / b"x", DROP, "from another port: new, ingress"
        )
        script.send(f.ip(f.wan, f.lan) / UDP(sport=53, dport=5353) / b"x", DROP, "unsolicited: ingress")
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

    def icmp_errors(self, f: Family) -> None:
        script = self.script(f"icmp-errors-{f.name}")
        udp = script.send(
            f.ip(f.lan, f.wan) / UDP(sport=next(self.ports), dport=5001) / b"hi", ACCEPT, "UDP out"
        )
        script.send(
            f.error(f.wan, f.lan, "port-unreachable", udp), ACCEPT, "port unreachable quoting it: RELATED"
        )
        syn = self.egress(script, f, 81).c("S", ACCEPT, "TCP SYN out")
        script.send(f.error(f.router, f.lan, "host-unreachable", syn), ACCEPT,
                    "host unreachable from a router quoting the SYN: RELATED")  # fmt: skip
        script.send(f.error(f.router, f.lan, "too-big", syn), ACCEPT, "too big quoting the SYN: RELATED")
        echo = script.send(f.echo(f.lan, f.wan, next(self.idents), 1), ACCEPT, "echo request out")
        script.send(f.error(f.router, f.lan, "time-exceeded", echo), ACCEPT,
                    "time exceeded quoting the echo request: RELATED")  # fmt: skip
        never = bytes(f.ip(f.lan, f.wan) / UDP(sport=next(self.ports), dport=5002) / b"never sent")
        script.send(f.error(f.wan, f.lan, "port-unreachable", never), DROP, "error quoting nothing: INVALID")
        script.send(f.error(f.wan, f.lan2, "port-unreachable", udp), DROP,
                    "error about the UDP flow, sent to another inside host: INVALID")  # fmt: skip
        inbound = Tcp(script, f, f.wan, next(self.ports), f.lan, 587).c(
            "S", ACCEPT, "SYN to 587 from outside"
        )
        script.send(f.error(f.lan, f.wan, "port-unreachable", inbound), ACCEPT,
                    "port unreachable from inside quoting it: RELATED")  # fmt: skip

    def build(self) -> list[Script]:
        for f in (V4, V6):
            self.tcp_lifecycle(f)
            self.tcp_time_wait_server_syn(f)
            self.tcp_strict_pickup(f)
            self.tcp_invalid_flags(f)
            self.tcp_window(f)
            self.tcp_rst(f)
            self.tcp_syn_retransmit(f)
            self.tcp_simultaneous_open(f)
            self.tcp_ingress(f)
            self.tcp_egress_rules(f)
            self.udp(f)
            self.icmp_echo(f)
            self.icmp_errors(f)
        return self.scripts


SCRIPTS = Scenarios().build()


# --- the two firewalls --------------------------------------------------------------------------


@dataclass(frozen=True)
class Judged:
    step: Step
    kernel: str
    nfqfw: str
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


@pytest.fixture(scope="module")
def judged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Judged]]:
    steps = [step for script in SCRIPTS for step in script.steps]
    with kernel_gateway(forward_rules(4), forward_rules(6), NEIGHBOURS, V4.wan, V4.lan) as oracle:
        kernel = [oracle.judge(step.side, step.packet) for step in steps]
        arrivals = list(oracle.arrivals)
    # The capture holds exactly the judged packets, in order, each on the interface it came in by.
    assert [(a.iface, a.frame[14:]) for a in arrivals] == [(f"{s.side}0", s.packet) for s in steps]
    directory = tmp_path_factory.mktemp("kernel-agreement")
    policy, capture = directory / "policy.yaml", directory / "gateway.pcapng"
    policy.write_text(POLICY)
    write_capture(capture, arrivals)
    lines = replay(policy, capture)
    assert [line["n"] for line in lines] == list(range(1, len(steps) + 1))
    verdicts = iter(zip(kernel, lines, strict=True))
    results: dict[str, list[Judged]] = {}
    for script in SCRIPTS:
        for step in script.steps:
            k, line = next(verdicts)
            results.setdefault(script.name, []).append(
                Judged(step, k, str(line["verdict"]), str(line["reason"]))
            )
    return results


@pytest.mark.parametrize("scenario", [script.name for script in SCRIPTS])
def test_replay_agrees_with_the_kernel(judged: dict[str, list[Judged]], scenario: str) -> None:
    rows = judged[scenario]
    table = "\n".join(
        f"{n:3} {r.step.side}  {r.step.what:70} kernel {r.kernel:6} nfqfw {r.nfqfw:6} ({r.reason})"
        for n, r in enumerate(rows, 1)
    )
    seen = [(r.step.what, r.kernel, r.nfqfw) for r in rows]
    wanted = [(r.step.what, r.step.expect, r.step.nfqfw or r.step.expect) for r in rows]
    assert seen == wanted, f"\n{table}"


def test_every_verdict_kind_is_compared(judged: dict[str, list[Judged]]) -> None:
    """The comparison covers real accepts, drops and rejects on both sides of the gateway."""
    rows = [r for results in judged.values() for r in results]
    kinds = {(r.step.side, r.kernel) for r in rows}
    assert kinds == {(side, verdict) for side in ("wan", "lan") for verdict in (ACCEPT, DROP, REJECT)}
    assert len(rows) == sum(len(script.steps) for script in SCRIPTS) > 200
