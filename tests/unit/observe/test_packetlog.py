"""nfqfw.observe.packetlog: exact packet lines, the rate limit with an injected clock, the summary line,
and how `Verdict.log` is set by the policy and engine and reaches the adapter's packet log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from queue_fakes import FakeLinks, FakePacket, FakeSender, StandInEngine
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

from nfqfw.core.config import LogLimit, parse_policy
from nfqfw.core.engine import Engine
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.verdict import Action, Ct, Hook, Meta, Verdict
from nfqfw.kernel.queue import QueueAdapter
from nfqfw.observe.packetlog import PacketLog, format_packet
from nfqfw.service.core import load_policy_file

IN = Meta(Hook.FORWARD, "wan0", "lan0")
TO_GW = Meta(Hook.INPUT, "wan0", None)
FROM_GW = Meta(Hook.OUTPUT, None, "wan0")
DEFAULT_DROP = Verdict(Action.DROP, Ct.NEW, None, "default ingress", True)
RULE_ACCEPT = Verdict(Action.ACCEPT, Ct.NEW, "ssh-office", "rule ssh-office", True)
RULE_REJECT = Verdict(Action.REJECT, Ct.NEW, "no-smb-out", "rule no-smb-out", True, "tcp-reset")
SYN = bytes(IP(src="203.0.113.10", dst="10.0.0.25", ttl=63, id=1) / TCP(sport=40000, dport=22, flags="S"))
UDP_DNS = bytes(IP(src="203.0.113.10", dst="10.0.0.25") / UDP(sport=5000, dport=53) / b"abcd")


# --- lines ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "meta", "verdict", "line"),
    [
        pytest.param(
            SYN,
            IN,
            DEFAULT_DROP,
            '[NFQFW DROP] REASON="default ingress" CT=NEW HOOK=FORWARD IN=wan0 OUT=lan0 SRC=203.0.113.10 '
            "DST=10.0.0.25 LEN=40 TTL=63 PROTO=TCP SPT=40000 DPT=22 FLAGS=SYN",
            id="tcp-syn",
        ),
        pytest.param(
            UDP_DNS,
            TO_GW,
            DEFAULT_DROP,
            '[NFQFW DROP] REASON="default ingress" CT=NEW HOOK=INPUT IN=wan0 OUT= SRC=203.0.113.10 '
            "DST=10.0.0.25 LEN=32 TTL=64 PROTO=UDP SPT=5000 DPT=53",
            id="udp",
        ),
        pytest.param(
            bytes(IP(src="198.51.100.7", dst="203.0.113.1", ttl=50) / ICMP(type=8, id=9)),
            TO_GW,
            Verdict(Action.ACCEPT, Ct.NEW, "ping-gateway", "rule ping-gateway", True),
            '[NFQFW ACCEPT] REASON="rule ping-gateway" CT=NEW HOOK=INPUT IN=wan0 OUT= SRC=198.51.100.7 '
            "DST=203.0.113.1 LEN=28 TTL=50 PROTO=ICMP TYPE=8 CODE=0",
            id="icmp-echo",
        ),
        pytest.param(
            bytes(IPv6(src="2001:db8:1::10", dst="fd00::25", hlim=60) / ICMPv6EchoRequest()),
            IN,
            DEFAULT_DROP,
            '[NFQFW DROP] REASON="default ingress" CT=NEW HOOK=FORWARD IN=wan0 OUT=lan0 SRC=2001:db8:1::10 '
            "DST=fd00::25 LEN=48 TTL=60 PROTO=ICMPv6 TYPE=128 CODE=0",
            id="icmpv6-echo",
        ),
        pytest.param(
            bytes(IPv6(src="fd00::25", dst="2001:db8:1::10") / TCP(sport=50000, dport=445, flags="S")),
            Meta(Hook.FORWARD, "lan0", "wan0"),
            RULE_REJECT,
            '[NFQFW REJECT] REASON="rule no-smb-out" CT=NEW HOOK=FORWARD IN=lan0 OUT=wan0 SRC=fd00::25 '
            "DST=2001:db8:1::10 LEN=60 TTL=64 PROTO=TCP SPT=50000 DPT=445 FLAGS=SYN",
            id="tcp-v6-reject",
        ),
        pytest.param(
            bytes(IP(src="203.0.113.10", dst="10.0.0.25") / TCP(sport=1, dport=2, flags="FPUEC", ack=5)),
            IN,
            Verdict(Action.DROP, Ct.INVALID, None, "invalid: tcp flags FIN+PSH+URG", True),
            '[NFQFW DROP] REASON="invalid: tcp flags FIN+PSH+URG" CT=INVALID HOOK=FORWARD IN=wan0 OUT=lan0 '
            "SRC=203.0.113.10 DST=10.0.0.25 LEN=40 TTL=64 PROTO=TCP SPT=1 DPT=2 FLAGS=CWR,ECE,URG,PSH,FIN",
            id="tcp-flags-invalid",
        ),
        pytest.param(
            bytes(IP(src="203.0.113.10", dst="10.0.0.25") / TCP(sport=3, dport=4, flags="")),
            IN,
            Verdict(Action.DROP, Ct.INVALID, None, "invalid: tcp flags none", True),
            '[NFQFW DROP] REASON="invalid: tcp flags none" CT=INVALID HOOK=FORWARD IN=wan0 OUT=lan0 '
            "SRC=203.0.113.10 DST=10.0.0.25 LEN=40 TTL=64 PROTO=TCP SPT=3 DPT=4 FLAGS=NONE",
            id="tcp-no-flags",
        ),
        pytest.param(
            bytes(
                IP(src="203.0.113.10", dst="10.0.0.25", flags="MF") / UDP(sport=5000, dport=53) / bytes(40)
            ),
            IN,
            DEFAULT_DROP,
            '[NFQFW DROP] REASON="default ingress" CT=NEW HOOK=FORWARD IN=wan0 OUT=lan0 SRC=203.0.113.10 '
            "DST=10.0.0.25 LEN=68 TTL=64 PROTO=UDP FRAG=FIRST SPT=5000 DPT=53",
            id="first-fragment",
        ),
        pytest.param(
            bytes(IP(src="203.0.113.10", dst="10.0.0.25", frag=5, proto=17) / bytes(40)),
            IN,
            Verdict(Action.DROP, Ct.UNTRACKED, None, "default ingress", True),
            '[NFQFW DROP] REASON="default ingress" CT=UNTRACKED HOOK=FORWARD IN=wan0 OUT=lan0 '
            "SRC=203.0.113.10 DST=10.0.0.25 LEN=60 TTL=64 PROTO=UDP FRAG=LATER",
            id="later-fragment",
        ),
        pytest.param(
            bytes(IP(src="192.0.2.1", dst="198.51.100.2", proto=47) / b"gre!"),
            FROM_GW,
            Verdict(Action.DROP, Ct.NEW, None, "default egress", True),
            '[NFQFW DROP] REASON="default egress" CT=NEW HOOK=OUTPUT IN= OUT=wan0 SRC=192.0.2.1 '
            "DST=198.51.100.2 LEN=24 TTL=64 PROTO=GRE",
            id="gre-from-gateway",
        ),
        pytest.param(
            bytes(IP(src="192.0.2.1", dst="198.51.100.2", proto=253) / b"x"),
            FROM_GW,
            Verdict(Action.DROP, Ct.NEW, None, "default egress", True),
            '[NFQFW DROP] REASON="default egress" CT=NEW HOOK=OUTPUT IN= OUT=wan0 SRC=192.0.2.1 '
            "DST=198.51.100.2 LEN=21 TTL=64 PROTO=253",
            id="unnamed-protocol",
        ),
        pytest.param(
            b"\x45\x00\x00\x28",
            TO_GW,
            Verdict(Action.DROP, Ct.INVALID, None, "invalid: ipv4: truncated header (4 bytes)", True),
            '[NFQFW DROP] REASON="invalid: ipv4: truncated header (4 bytes)" CT=INVALID HOOK=INPUT IN=wan0 '
            "OUT= LEN=4",
            id="truncated",
        ),
        pytest.param(
            SYN,
            IN,
            Verdict(Action.DROP, Ct.INVALID, None, "internal error: KeyError('x\"y')", True),
            "[NFQFW DROP] REASON=\"internal error: KeyError('x'y')\" CT=INVALID HOOK=FORWARD IN=wan0 "
            "OUT=lan0 SRC=203.0.113.10 DST=10.0.0.25 LEN=40 TTL=63 PROTO=TCP SPT=40000 DPT=22 FLAGS=SYN",
            id="quote-in-reason",
        ),
    ],
)
def test_line(data: bytes, meta: Meta, verdict: Verdict, line: str) -> None:
    assert format_packet(data, meta, verdict) == line


def test_a_gso_packet_cut_by_the_copy_range_shows_its_ip_length() -> None:
    gso = bytes(IP(src="203.0.113.10", dst="10.0.0.25", ttl=63) / TCP(sport=5201, dport=40000, flags="PA"))
    gso += bytes(60000)
    gso = gso[:2] + len(gso).to_bytes(2, "big") + gso[4:]
    invalid = Verdict(Action.DROP, Ct.INVALID, None, "invalid: tcp: SEQ is over the upper bound", True)
    tail = "DST=10.0.0.25 LEN=60040 TTL=63 PROTO=TCP SPT=5201 DPT=40000 FLAGS=ACK,PSH"
    lines = Lines()
    PacketLog(UFW_LIMIT, emit=lines, copy_cap=3840).log(gso[:3840], IN, invalid, 1.0)
    assert lines.packets()[0].endswith(tail)
    # Shorter than the copy range: malformed (its length lies), logged with the bytes there are.
    assert format_packet(gso[:3839], IN, invalid, 3840).endswith("DST=10.0.0.25 LEN=3839 TTL=63 PROTO=TCP")


# --- the rate limit ---------------------------------------------------------------------------


class Lines:
    """Collects what a PacketLog emits, as (level, text)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []
        self.events: list[dict[str, object] | None] = []

    def __call__(self, level: int, text: str, event: dict[str, object] | None) -> None:
        self.seen.append((level, text))
        self.events.append(event)

    def packets(self) -> list[str]:
        return [text for level, text in self.seen if level == logging.INFO]

    def summaries(self) -> list[str]:
        return [text for level, text in self.seen if level == logging.WARNING]


UFW_LIMIT = LogLimit(3, 60, 10)


def packet_log(limit: LogLimit = UFW_LIMIT) -> tuple[PacketLog, Lines]:
    lines = Lines()
    return PacketLog(limit, emit=lines), lines


def test_burst_then_three_per_minute_exactly() -> None:
    plog, lines = packet_log()
    for _ in range(25):
        plog.log(SYN, IN, DEFAULT_DROP, 100.0)
    assert (len(lines.packets()), plog.lines, plog.suppressed) == (10, 10, 15)
    plog.log(SYN, IN, DEFAULT_DROP, 119.999)  # a token every 20 s: not yet
    plog.log(SYN, IN, DEFAULT_DROP, 120.0)
    plog.log(SYN, IN, DEFAULT_DROP, 120.0)
    assert (plog.lines, plog.suppressed) == (11, 17)
    for second in range(121, 181):  # one more minute of one packet per second: 3 lines
        plog.log(SYN, IN, DEFAULT_DROP, float(second))
    assert (plog.lines, plog.suppressed) == (14, 74)
    assert set(lines.packets()) == {format_packet(SYN, IN, DEFAULT_DROP)}


def test_summary_counts_what_was_held_back_at_most_once_a_minute() -> None:
    plog, lines = packet_log()
    plog.flush(0.0)
    assert lines.summaries() == []  # nothing suppressed: nothing said
    for _ in range(12):
        plog.log(SYN, IN, DEFAULT_DROP, 0.0)
    plog.log(
        UDP_DNS, IN, Verdict(Action.DROP, Ct.INVALID, None, "invalid: udp: length field 3 < 8", True), 0.0
    )
    for _ in range(11):
        plog.log(UDP_DNS, IN, Verdict(Action.DROP, Ct.INVALID, None, "invalid: other reason", True), 0.0)
    plog.flush(1.0)
    assert lines.summaries() == [
        "4 packet log lines suppressed (default ingress: 2, invalid: 2; log-limit 3/minute, "
        "log-limit-burst 10)"
    ]
    plog.log(SYN, IN, DEFAULT_DROP, 2.0)
    plog.flush(60.9)  # within a minute of the last summary: wait
    assert len(lines.summaries()) == 1
    plog.flush(61.0)
    assert lines.summaries()[1] == (
        "1 packet log line suppressed (default ingress: 1; log-limit 3/minute, log-limit-burst 10)"
    )
    for _ in range(4):  # 3.1 tokens gathered since t=2: three lines, one held back
        plog.log(SYN, IN, DEFAULT_DROP, 62.0)
    plog.flush(63.0, force=True)  # at stop
    assert lines.summaries()[2:] == [lines.summaries()[1]]
    assert (plog.lines, len(lines.packets())) == (10 + 10 + 3, 23)
    assert plog.suppressed == 6


def test_one_bucket_per_rule_default_and_invalid() -> None:
    """A flood of one kind does not hide the lines of another."""
    plog, lines = packet_log(LogLimit(1, 3600, 2))
    for _ in range(5):
        plog.log(SYN, IN, DEFAULT_DROP, 0.0)
        plog.log(SYN, IN, RULE_ACCEPT, 0.0)
        plog.log(SYN, IN, Verdict(Action.DROP, Ct.INVALID, None, f"invalid: reason {_}", True), 0.0)
    assert (plog.lines, plog.suppressed) == (6, 9)
    assert [line.split()[2] for line in lines.packets()] == [
        'REASON="default',
        'REASON="rule',
        'REASON="invalid:',
    ] * 2


def test_configure_refills_only_when_the_limit_changes() -> None:
    plog, _ = packet_log(LogLimit(1, 3600, 1))
    plog.log(SYN, IN, DEFAULT_DROP, 0.0)
    plog.configure(LogLimit(1, 3600, 1))  # a reload with the same limit: bucket kept
    plog.log(SYN, IN, DEFAULT_DROP, 1.0)
    assert (plog.lines, plog.suppressed) == (1, 1)
    plog.configure(LogLimit(5, 1, 2))
    for _ in range(3):
        plog.log(SYN, IN, DEFAULT_DROP, 2.0)
    assert (plog.lines, plog.suppressed) == (3, 2)


def test_default_emitter_is_the_nfqfw_packets_logger(caplog: pytest.LogCaptureFixture) -> None:
    plog = PacketLog(LogLimit(1, 60, 1))
    with caplog.at_level(logging.INFO, logger="nfqfw.packets"):
        plog.log(SYN, IN, DEFAULT_DROP, 0.0)
        plog.log(SYN, IN, DEFAULT_DROP, 0.0)
        plog.flush(0.0)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("nfqfw.packets", logging.INFO, format_packet(SYN, IN, DEFAULT_DROP)),
        (
            "nfqfw.packets",
            logging.WARNING,
            "1 packet log line suppressed (default ingress: 1; log-limit 1/minute, log-limit-burst 1)",
        ),
    ]


# --- which verdicts say log -------------------------------------------------------------------

POLICY = """\
zones: {external: [wan0], internal: [lan0]}
ingress:
  - {name: ssh, proto: tcp, ports: [22], to: 10.0.0.25, action: accept, log: true}
  - {name: quiet, proto: udp, ports: [53], action: accept}
  - {name: no-telnet, proto: tcp, ports: [23], action: reject}
"""


def engine(options: str = "") -> Engine:
    return Engine(CompiledPolicy(parse_policy(POLICY + options)))


def tcp_in(dport: int, flags: str = "S") -> bytes:
    return bytes(IP(src="203.0.113.10", dst="10.0.0.25") / TCP(sport=40000, dport=dport, flags=flags))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("", {"ssh": True, "dns": False, "telnet": True, "default": True, "invalid": True, "reply": False}),
        (
            "options: {log-denied: false}\n",
            {"ssh": True, "dns": False, "telnet": False, "default": False, "invalid": False, "reply": False},
        ),
    ],
    ids=["log-denied default (true)", "log-denied false"],
)
def test_verdict_log_from_rules_defaults_and_invalid(options: str, expected: dict[str, bool]) -> None:
    e = engine(options)
    seen = {
        "ssh": e.process(tcp_in(22), IN, 0.0),
        "dns": e.process(UDP_DNS, IN, 0.0),
        "telnet": e.process(tcp_in(23), IN, 0.0),
        "default": e.process(tcp_in(80), IN, 0.0),
        "invalid": e.process(tcp_in(8080, "A"), IN, 0.0),  # an ACK without a flow
    }
    reply = bytes(IP(src="10.0.0.25", dst="203.0.113.10") / TCP(sport=22, dport=40000, flags="SA"))
    seen["reply"] = e.process(reply, Meta(Hook.FORWARD, "lan0", "wan0"), 0.1)
    assert [seen[name].ct for name in ("ssh", "invalid", "reply")] == [Ct.NEW, Ct.INVALID, Ct.ESTABLISHED]
    assert {name: verdict.log for name, verdict in seen.items()} == expected


def test_adapter_hands_logged_verdicts_to_the_packet_log_after_the_verdict() -> None:
    calls: list[tuple[bytes, Meta, Verdict, float, str | None]] = []
    packet = FakePacket(SYN, hook=2, indev=4, outdev=3)

    def log_packet(data: bytes, meta: Meta, verdict: Verdict, now: float) -> None:
        calls.append((data, meta, verdict, now, packet.verdict))

    for verdict in (DEFAULT_DROP, Verdict(Action.DROP, Ct.NEW, None, "default ingress")):
        engine_ = StandInEngine(verdict)
        adapter = QueueAdapter(
            engine_,
            FakeLinks({3: "lan0", 4: "wan0"}),
            FakeSender(),
            mark=1,
            clock=lambda: 5.0,
            log_packet=log_packet,
        )
        adapter.set_deadline(1e9)
        packet.verdict = None
        adapter.on_packet(packet)
    assert calls == [(SYN, IN, DEFAULT_DROP, 5.0, "drop")]  # only the verdict with log set


def test_reload_applies_a_new_log_limit(tmp_path: Path) -> None:
    from test_reload import BASE, daemon_for

    d, _ = daemon_for(tmp_path / "p.yaml", BASE + "\noptions:\n  log-limit: 2/second\n  log-limit-burst: 4\n")
    assert d.packet_log.limit == UFW_LIMIT  # before start: the defaults
    assert d.reload() is True
    assert d.packet_log.limit == LogLimit(2, 1, 4)
    assert load_policy_file(str(tmp_path / "p.yaml")).log_limit == LogLimit(2, 1, 4)
