"""nfqfw.observe.logsetup and the packet log's eve fields: JSON lines, the native journal
protocol against a socket of our own, the choice of sink, and `options: log-format`."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from nfqfw.core.config import ConfigError, parse_policy
from nfqfw.core.decode import decode
from nfqfw.core.verdict import Action, Ct, Hook, Meta, Verdict
from nfqfw.observe import logsetup
from nfqfw.observe.logsetup import (
    JournalHandler,
    NfqfwFormatter,
    journal_datagram,
    setup_logging,
    stderr_is_journal,
    use_format,
)
from nfqfw.observe.packetlog import PacketLog, flow_id, format_packet, packet_event
from nfqfw.service.daemon import load_policy_file

IN = Meta(Hook.FORWARD, "wan0", "lan0")
MAIL = Verdict(Action.ACCEPT, Ct.NEW, "mail", "rule mail", True)
DEFAULT_DROP = Verdict(Action.DROP, Ct.NEW, None, "default ingress", True)
SYN = bytes(IP(src="203.0.113.10", dst="10.0.0.25", ttl=63) / TCP(sport=40000, dport=25, flags="S"))


@pytest.fixture(autouse=True)
def text_again() -> Iterator[None]:
    yield
    use_format("text")


def record_of(
    event: dict[str, object] | None, message: str = "line", level: int = logging.INFO
) -> logging.LogRecord:
    extra = {"nfqfw_event": event} if event is not None else None
    logger = logging.getLogger("nfqfw.packets" if event is not None else "nfqfw")
    return logger.makeRecord(logger.name, level, __file__, 1, "%s", (message,), None, extra=extra)


# --- eve fields -------------------------------------------------------------------------------


def test_a_tcp_packet_as_eve_fields() -> None:
    event = packet_event(SYN, IN, MAIL)
    assert event == {
        "flow_id": flow_id(decode(SYN)),
        "src_ip": "203.0.113.10",
        "src_port": 40000,
        "dest_ip": "10.0.0.25",
        "dest_port": 25,
        "proto": "TCP",
        "in_iface": "wan0",
        "out_iface": "lan0",
        "hook": "FORWARD",
        "ct_state": "NEW",
        "action": "accept",
        "reason": "rule mail",
        "rule": "mail",
        "ip_len": 40,
        "ttl": 63,
        "tcp_flags": "SYN",
    }


def test_icmp_and_ipv6_fields() -> None:
    ping = bytes(IP(src="198.51.100.7", dst="203.0.113.1") / ICMP(type=8, id=9))
    event = packet_event(ping, Meta(Hook.INPUT, "wan0", None), DEFAULT_DROP)
    assert (event["proto"], event["icmp_type"], event["icmp_code"], event["rule"]) == ("ICMP", 8, 0, None)
    assert "src_port" not in event and event["out_iface"] is None
    udp6 = bytes(IPv6(src="2001:db8::1", dst="fd00::25") / UDP(sport=5353, dport=53))
    event = packet_event(udp6, IN, DEFAULT_DROP)
    assert (event["src_ip"], event["dest_ip"], event["proto"], event["dest_port"]) == (
        "2001:db8::1",
        "fd00::25",
        "UDP",
        53,
    )


def test_flow_id_is_the_same_both_ways_and_differs_between_flows() -> None:
    reply = bytes(IP(src="10.0.0.25", dst="203.0.113.10") / TCP(sport=25, dport=40000, flags="SA"))
    other = bytes(IP(src="203.0.113.10", dst="10.0.0.25") / TCP(sport=40001, dport=25, flags="S"))
    assert flow_id(decode(SYN)) == flow_id(decode(reply))
    assert flow_id(decode(SYN)) != flow_id(decode(other))
    assert 0 < flow_id(decode(SYN)) < 2**53


def test_not_even_an_ip_header_still_gets_an_event() -> None:
    event = packet_event(b"\x45\x00", IN, Verdict(Action.DROP, Ct.INVALID, None, "invalid: truncated", True))
    assert event["ct_state"] == "INVALID" and event["ip_len"] == 2 and "src_ip" not in event


def test_the_packet_log_emits_the_line_and_its_fields_together() -> None:
    seen: list[tuple[int, str, object]] = []
    PacketLog(emit=lambda level, line, event: seen.append((level, line, event))).log(SYN, IN, MAIL, 0.0)
    assert seen == [(logging.INFO, format_packet(SYN, IN, MAIL), packet_event(SYN, IN, MAIL))]


# --- formats ----------------------------------------------------------------------------------


def test_text_format_is_the_line() -> None:
    formatter = NfqfwFormatter("%(name)s: %(message)s")
    assert formatter.format(record_of(packet_event(SYN, IN, MAIL), "[NFQFW ACCEPT] ...")) == (
        "nfqfw.packets: [NFQFW ACCEPT] ..."
    )


def test_json_format_packet_and_daemon_objects() -> None:
    use_format("json")
    formatter = NfqfwFormatter()
    packet = json.loads(formatter.format(record_of(packet_event(SYN, IN, MAIL))))
    assert packet["event_type"] == "flow_verdict"
    assert {k: packet[k] for k in ("src_ip", "dest_port", "action", "rule", "hook")} == {
        "src_ip": "203.0.113.10",
        "dest_port": 25,
        "action": "accept",
        "rule": "mail",
        "hook": "FORWARD",
    }
    assert packet["timestamp"][:2] == "20" and packet["timestamp"][10] == "T"
    daemon = json.loads(formatter.format(record_of(None, "policy reloaded", logging.WARNING)))
    assert {k: v for k, v in daemon.items() if k != "timestamp"} == {
        "event_type": "daemon",
        "level": "warning",
        "logger": "nfqfw",
        "message": "policy reloaded",
    }


def test_priority_prefix_on_a_journal_stream() -> None:
    formatter = NfqfwFormatter("%(name)s: %(message)s", priority_prefix=True)
    assert formatter.format(record_of(None, "stopped", logging.ERROR)) == "<3>nfqfw: stopped"


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of text, json"):
        use_format("xml")


# --- the journal ------------------------------------------------------------------------------


def parse_datagram(data: bytes) -> dict[str, str]:
    """The native protocol read back (as journald does)."""
    fields = {}
    while data:
        line, _, rest = data.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            data = rest
        else:
            (size,) = struct.unpack("<Q", rest[:8])
            fields[line.decode()] = rest[8 : 8 + size].decode()
            assert rest[8 + size : 9 + size] == b"\n"
            data = rest[9 + size :]
    return fields


def test_journal_datagram_plain_and_binary_safe_values() -> None:
    data = journal_datagram({"MESSAGE": "two\nlines", "PRIORITY": "6"})
    assert data == b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\nPRIORITY=6\n"
    assert parse_datagram(data) == {"MESSAGE": "two\nlines", "PRIORITY": "6"}


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def test_journal_handler_sends_fields(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    handler = JournalHandler(path)
    handler.emit(record_of(packet_event(SYN, IN, MAIL), format_packet(SYN, IN, MAIL)))
    fields = parse_datagram(sock.recv(65536))
    assert fields["MESSAGE"] == "nfqfw.packets: " + format_packet(SYN, IN, MAIL)
    expected = {
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "nfqfw",
        "NFQFW_EVENT": "flow_verdict",
        "NFQFW_ACTION": "accept",
        "NFQFW_RULE": "mail",
        "NFQFW_REASON": "rule mail",
        "NFQFW_CT": "NEW",
        "NFQFW_HOOK": "FORWARD",
        "NFQFW_IN": "wan0",
        "NFQFW_OUT": "lan0",
        "NFQFW_SRC": "203.0.113.10",
        "NFQFW_DST": "10.0.0.25",
        "NFQFW_SPORT": "40000",
        "NFQFW_DPORT": "25",
        "NFQFW_PROTO": "TCP",
        "NFQFW_FLOW_ID": str(flow_id(decode(SYN))),
    }
    assert {key: fields[key] for key in expected} == expected
    handler.emit(record_of(None, "policy reloaded", logging.WARNING))
    fields = parse_datagram(sock.recv(65536))
    assert fields["MESSAGE"] == "nfqfw: policy reloaded"
    assert (fields["PRIORITY"], fields["NFQFW_EVENT"], fields["NFQFW_LOGGER"]) == ("4", "daemon", "nfqfw")
    assert "NFQFW_RULE" not in fields
    handler.close()


def test_journal_message_is_the_json_object_with_log_format_json(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    use_format("json")
    handler = JournalHandler(path)
    handler.emit(record_of(packet_event(SYN, IN, MAIL)))
    fields = parse_datagram(sock.recv(65536))
    assert json.loads(fields["MESSAGE"])["rule"] == "mail" and fields["NFQFW_RULE"] == "mail"
    handler.close()


def test_a_refused_datagram_goes_to_stderr_with_its_priority(tmp_path: Path) -> None:
    fallback = io.StringIO()
    handler = JournalHandler(str(tmp_path / "nobody-listens"), fallback=fallback)
    handler.emit(record_of(None, "queue 0 bound", logging.INFO))
    assert fallback.getvalue() == "<6>nfqfw: queue 0 bound\n"
    handler.close()


def test_stderr_is_the_journal_only_when_journal_stream_names_it(tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w") as stream:
        st = os.fstat(stream.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stream)
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, stream)
        assert not stderr_is_journal({}, stream)


def test_setup_picks_the_sink(
    journal: tuple[socket.socket, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = journal
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        monkeypatch.setattr(logsetup, "stderr_is_journal", lambda environ: True)
        assert isinstance(setup_logging("info", journal_socket=path), JournalHandler)
        plain = setup_logging("info", journal_socket=str(tmp_path / "absent"))
        assert not isinstance(plain, JournalHandler)
        assert plain.formatter.priority_prefix  # type: ignore[union-attr]
        monkeypatch.setattr(logsetup, "stderr_is_journal", lambda environ: False)
        text = setup_logging("debug", journal_socket=path)
        assert not text.formatter.priority_prefix and root.level == logging.DEBUG  # type: ignore[union-attr]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


# --- options: log-format ----------------------------------------------------------------------

POLICY = "zones: {external: [wan0]}\n"


def test_log_format_option() -> None:
    assert parse_policy(POLICY).options.log_format == "text"
    assert parse_policy(POLICY + "options: {log-format: json}\n").options.log_format == "json"
    with pytest.raises(ConfigError) as err:
        parse_policy(POLICY + "options: {log-format: jsn}\n", "p.yaml")
    assert [str(issue) for issue in err.value.issues] == [
        "p.yaml:2:23: options: log-format: expected text or json, got 'jsn' (did you mean 'json'?)"
    ]


def test_a_valid_policy_file_sets_the_format(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY + "options: {log-format: json}\n")
    path.chmod(0o600)
    load_policy_file(str(path))
    assert logsetup.current_format() == "json"
    path.write_text(POLICY)
    load_policy_file(str(path))
    assert logsetup.current_format() == "text"
