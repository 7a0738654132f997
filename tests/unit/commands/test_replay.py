"""`nfqfw replay`: scapy-built pcapng captures of gateway traffic, run through the policy."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
from scapy.all import ARP, ICMP, IP, TCP, UDP, Ether, Packet, wrpcap, wrpcapng

from nfqfw.commands import replay
from nfqfw.core.verdict import Action, Ct, Verdict

POLICY = Path(__file__).resolve().parents[3] / "config" / "policy.yaml"
HOST = "10.0.0.25"
WEB = "203.0.113.10"
OUTSIDER = "198.51.100.7"


def run_replay(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[dict[str, object]], str]:
    parser = argparse.ArgumentParser()
    replay.register(parser.add_subparsers())
    args = parser.parse_args(["replay", *argv])
    status = args.func(args)
    out, err = capsys.readouterr()
    return status, [json.loads(line) for line in out.splitlines()], err


def on(iface: str, when: float, pkt: Packet) -> Packet:
    frame = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / pkt
    frame.sniffed_on = iface
    frame.time = when
    return frame


def line(n: int, verdict: str, ct: str, rule: str | None, reason: str) -> dict[str, object]:
    return {"n": n, "verdict": verdict, "ct": ct, "rule": rule, "reason": reason}


def scenario() -> list[Packet]:
    syn = TCP(sport=40000, dport=80, flags="S", seq=1000, window=64240)
    synack = TCP(sport=80, dport=40000, flags="SA", seq=5000, ack=1001, window=65160)
    ack = TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5001, window=502)
    return [
        on("lan0", 10.0, IP(src=HOST, dst=WEB) / syn),
        on("wan0", 10.01, IP(src=WEB, dst=HOST) / synack),
        on("lan0", 10.02, IP(src=HOST, dst=WEB) / ack),
        on("wan0", 11.0, IP(src=OUTSIDER, dst=HOST) / TCP(sport=50000, dport=22, flags="S", seq=1)),
        on("wan0", 12.0, IP(src=OUTSIDER, dst=HOST) / TCP(sport=50001, dport=25, flags="S", seq=1)),
        on("wan0", 13.0, IP(src=OUTSIDER, dst=HOST) / TCP(sport=50002, dport=80, flags="A", seq=1, ack=1)),
        on("lan0", 14.0, IP(src=HOST, dst=WEB) / TCP(sport=40001, dport=445, flags="S", seq=1)),
        on("lan0", 15.0, IP(src=HOST, dst="192.0.2.53") / UDP(sport=53000, dport=53) / b"query"),
        on("wan0", 15.01, IP(src="192.0.2.53", dst=HOST) / UDP(sport=53, dport=53000) / b"answer"),
        on("lan0", 16.0, IP(src=HOST, dst=WEB) / ICMP(type=8, id=7, seq=1)),
        on("wan0", 16.01, IP(src=WEB, dst=HOST) / ICMP(type=0, id=7, seq=1)),
        on("wan0", 17.0, IP(src=WEB, dst=HOST) / ICMP(type=0, id=99, seq=1)),
        on("wan0", 17.5, ARP()),  # no IP: skipped and counted, not numbered
    ]


def test_gateway_scenarios_one_json_line_per_packet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capture = tmp_path / "gateway.pcapng"
    wrpcapng(str(capture), scenario())
    status, lines, summary = run_replay(["--config", str(POLICY), str(capture)], capsys)
    assert status == 0
    assert summary.splitlines() == [
        "packets: 12, non-IP frames skipped: 1",
        "count  verdict  ct           reason",
        "    4  accept   established  established",
        "    3  accept   new          default egress",
        "    1  accept   new          rule mail",
        "    1  drop     invalid      invalid: icmp: reply without a request",
        "    1  drop     invalid      invalid: tcp: ACK without a connection (mid-stream pick-up disabled)",
        "    1  drop     new          default ingress",
        "    1  reject   new          rule no-smb-out",
    ]
    assert lines == [
        line(1, "accept", "new", None, "default egress"),
        line(2, "accept", "established", None, "established"),
        line(3, "accept", "established", None, "established"),
        line(4, "drop", "new", None, "default ingress"),
        line(5, "accept", "new", "mail", "rule mail"),
        line(
            6, "drop", "invalid", None, "invalid: tcp: ACK without a connection (mid-stream pick-up disabled)"
        ),
        line(7, "reject", "new", "no-smb-out", "rule no-smb-out"),
        line(8, "accept", "new", None, "default egress"),
        line(9, "accept", "established", None, "established"),
        line(10, "accept", "new", None, "default egress"),
        line(11, "accept", "established", None, "established"),
        line(12, "drop", "invalid", None, "invalid: icmp: reply without a request"),
    ]


def policy_with_gateway(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.read_text() + "\noptions:\n  gateway-addresses: [10.0.0.1, 203.0.113.1]\n")
    return path


def test_gateway_addresses_pick_input_and_output_hooks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capture = tmp_path / "gateway.pcapng"
    wrpcapng(
        str(capture),
        [
            # to the gateway: INPUT, so the `to: gateway` rules apply
            on("wan0", 1.0, IP(src=OUTSIDER, dst="203.0.113.1") / ICMP(type=8, id=1, seq=1)),
            on("wan0", 2.0, IP(src=OUTSIDER, dst="203.0.113.1") / TCP(sport=50000, dport=22, flags="S")),
            # the same SSH SYN to a host behind the gateway is FORWARD: no ssh-office
            on("wan0", 3.0, IP(src=OUTSIDER, dst=HOST) / TCP(sport=50001, dport=22, flags="S")),
            # from the gateway itself: OUTPUT, egress whatever the capture interface
            on("wan0", 4.0, IP(src="203.0.113.1", dst=WEB) / TCP(sport=40000, dport=445, flags="S")),
        ],
    )
    status, lines, _ = run_replay(["--config", str(policy_with_gateway(tmp_path)), str(capture)], capsys)
    assert status == 0
    assert lines == [
        line(1, "accept", "new", "ping-gateway", "rule ping-gateway"),
        line(2, "accept", "new", "ssh-office", "rule ssh-office"),
        line(3, "drop", "new", None, "default ingress"),
        line(4, "reject", "new", "no-smb-out", "rule no-smb-out"),
    ]


def test_traceroute_through_the_gateway(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A probe whose TTL runs out at the gateway never reaches FORWARD (nothing is tracked for
    it); the gateway's time exceeded (OUTPUT) is RELATED all the same, the kernel's way."""
    probe = IP(src=HOST, dst=WEB, ttl=1) / UDP(sport=40000, dport=33434) / b"probe"
    capture = tmp_path / "traceroute.pcapng"
    wrpcapng(
        str(capture),
        [
            on("lan0", 1.0, probe),
            on("lan0", 1.001, IP(src="10.0.0.1", dst=HOST) / ICMP(type=11, code=0) / bytes(probe)),
            # the same error forwarded from elsewhere quotes a flow nobody tracked: INVALID
            on("wan0", 1.002, IP(src=OUTSIDER, dst=HOST) / ICMP(type=11, code=0) / bytes(probe)),
            on("lan0", 2.0, IP(src=HOST, dst="224.0.0.251", ttl=1) / UDP(sport=5353, dport=5353)),
            on("lan0", 3.0, IP(src=HOST, dst=WEB, ttl=2) / UDP(sport=40000, dport=33435) / b"probe"),
        ],
    )
    status, lines, summary = run_replay(
        ["--config", str(policy_with_gateway(tmp_path)), str(capture)], capsys
    )
    assert status == 0
    expired = "ttl expired: the gateway answers it before FORWARD"
    assert lines == [
        {"n": 1, "verdict": "not-queued", "ct": None, "rule": None, "reason": expired},
        line(2, "accept", "related", None, "related: the gateway's own icmp error"),
        line(3, "drop", "invalid", None, "invalid: icmp error: embedded header matches no flow"),
        line(4, "accept", "new", None, "default egress"),  # multicast: not forwarded that way
        line(5, "accept", "new", None, "default egress"),  # the second hop's probe is forwarded
    ]
    assert summary.splitlines() == [
        "packets: 5, non-IP frames skipped: 0",
        "count  verdict     ct       reason",
        "    2  accept      new      default egress",
        "    1  accept      related  related: the gateway's own icmp error",
        "    1  drop        invalid  invalid: icmp error: embedded header matches no flow",
        f"    1  not-queued  -        {expired}",
    ]


def test_iface_option_names_the_interface_of_a_classic_pcap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capture = tmp_path / "classic.pcap"
    wrpcap(str(capture), [on("x", 1.0, IP(src=OUTSIDER, dst=HOST) / TCP(sport=50000, dport=445, flags="S"))])
    _, as_ingress, _ = run_replay(["--config", str(POLICY), "--iface", "wan0", str(capture)], capsys)
    _, as_egress, _ = run_replay(["--config", str(POLICY), "--iface", "lan0", str(capture)], capsys)
    assert as_ingress == [line(1, "drop", "new", None, "default ingress")]
    assert as_egress == [line(1, "reject", "new", "no-smb-out", "rule no-smb-out")]


def test_unreadable_capture_exits_1_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.pcap"
    status, lines, err = run_replay(["--config", str(POLICY), str(missing)], capsys)
    assert (status, lines) == (1, [])
    assert err == f"nfqfw replay: {missing}: No such file or directory\n"
    garbage = tmp_path / "garbage.pcap"
    garbage.write_bytes(b"not a capture at all")
    status, lines, err = run_replay(["--config", str(POLICY), str(garbage)], capsys)
    assert (status, lines) == (1, [])
    assert err == f"nfqfw replay: {garbage}: not a pcap or pcapng file (magic 0x6e6f7420)\n"


def test_config_errors_are_printed_located(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("defaults:\n  ingress: maybe\n")
    capture = tmp_path / "empty.pcapng"
    wrpcapng(str(capture), [])
    status, lines, err = run_replay(["--config", str(config), str(capture)], capsys)
    assert (status, lines) == (1, [])
    assert err.splitlines() == [
        f"{config}:1:1: missing required key 'zones'",
        f"{config}:2:12: defaults: ingress: expected accept, drop or reject, got 'maybe'",
    ]


def test_record_writer_writes_exactly_verdict_record_lines_in_batches() -> None:
    accept = Verdict(Action.ACCEPT, Ct.ESTABLISHED, None, "established")
    mail = Verdict(Action.ACCEPT, Ct.NEW, "mail", 'rule "mail"')
    equal_but_new = Verdict(Action.ACCEPT, Ct.NEW, "mail", 'rule "mail"')
    sequence = [accept, mail, accept, equal_but_new] * (replay.RecordWriter.BATCH // 2 + 3)
    out = io.StringIO()
    writer = replay.RecordWriter(out)
    for n, verdict in enumerate(sequence, 1):
        writer.write(n, verdict)
    assert out.getvalue().count("\n") == 2 * replay.RecordWriter.BATCH  # two full batches so far
    writer.flush()
    expected = "".join(replay.verdict_record(n, v) + "\n" for n, v in enumerate(sequence, 1))
    assert out.getvalue() == expected


def test_a_capture_on_the_external_interface_goes_through_the_forwards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the outside sees the gateway: to 203.0.113.1:25 and back from it. The forward (pass)
    admits the connection, the replies from the public address are the same flow; a port no
    forward publishes is the gateway's own (INPUT), closed."""
    policy = tmp_path / "nat.yaml"
    policy.write_text(
        POLICY.read_text().replace("      pass: false", "      pass: true")
        + "options:\n  gateway-addresses: [203.0.113.1]\n"
    )
    public = "203.0.113.1"
    frames = [
        on("wan0", 1.0, IP(src=OUTSIDER, dst=public) / TCP(sport=50000, dport=25, flags="S", seq=1000)),
        on(
            "wan0",
            1.01,
            IP(src=public, dst=OUTSIDER) / TCP(sport=25, dport=50000, flags="SA", seq=9, ack=1001),
        ),
        on(
            "wan0",
            1.02,
            IP(src=OUTSIDER, dst=public) / TCP(sport=50000, dport=25, flags="A", seq=1001, ack=10),
        ),
        on("wan0", 2.0, IP(src=OUTSIDER, dst=public) / TCP(sport=50001, dport=80, flags="S", seq=1)),
        # A reply seen on the inside (from the inside host, untranslated) is the same flow too.
        on("lan0", 3.0, IP(src=OUTSIDER, dst=public) / TCP(sport=50002, dport=587, flags="S", seq=5)),
        on("lan0", 3.01, IP(src=HOST, dst=OUTSIDER) / TCP(sport=587, dport=50002, flags="SA", seq=70, ack=6)),
    ]
    capture = tmp_path / "wan.pcapng"
    wrpcapng(str(capture), frames)
    status, lines, _ = run_replay(["--config", str(policy), str(capture)], capsys)
    assert status == 0
    assert lines == [
        line(1, "accept", "new", "smtp", "forward smtp"),
        line(2, "accept", "established", None, "established"),
        line(3, "accept", "established", None, "established"),
        line(4, "drop", "new", None, "default ingress"),
        # arriving on lan0 it is a hairpin connection (inside to the public address)
        line(5, "accept", "new", "smtp", "forward smtp"),
        line(6, "accept", "established", None, "established"),
    ]
