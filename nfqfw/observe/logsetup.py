"""Where nfqfw's log lines go and how they look: stderr or the journal, text or JSON.

Sink, chosen once by `setup_logging` (at `nfqfw run`):
- under systemd, when $JOURNAL_STREAM names the file our stderr is (systemd.exec(5)), each
  record goes to journald natively (systemd's "Native Journal Protocol": one datagram of
  KEY=value fields to /run/systemd/journal/socket) with MESSAGE, PRIORITY,
  SYSLOG_IDENTIFIER=nfqfw, NFQFW_EVENT and, for a packet, NFQFW_ACTION, NFQFW_RULE,
  NFQFW_SRC, ... (JOURNAL_FIELDS), so `journalctl -u nfqfw NFQFW_RULE=mail` selects. A
  datagram the journal refuses is written to stderr instead (with its '<N>' priority prefix,
  which journald reads on the stream), so nothing is lost;
- elsewhere, stderr: `TIME LEVEL LOGGER: message` lines (on a journal stream without the
  native socket, `<N>LOGGER: message`, the priority as prefix).

Format, the policy's `options: {log-format: text|json}` (`use_format`, applied whenever a valid
policy file is read, so it follows reloads; before the first one, text):
- text: the lines above; a packet is the ufw-like line of nfqfw.observe.packetlog;
- json: one object per line with Suricata eve.json's names: a packet is
  {"timestamp", "event_type": "flow_verdict", "src_ip", "src_port", "dest_ip", "dest_port",
  "proto", "in_iface", "out_iface", "hook", "ct_state", "action", "reason", "rule", "flow_id",
  ...}, any other record {"timestamp", "event_type": "daemon", "level", "logger", "message"}.
  In the journal, MESSAGE is that object and the fields are there as well.

Packet records carry their fields in `record.nfqfw_event` (see nfqfw.observe.packetlog);
everything else is an ordinary logging record.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TextIO

from nfqfw.core.config import LOG_FORMATS
from nfqfw.observe.packetlog import EVENT_ATTRIBUTE

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "nfqfw"

# syslog priorities (sd-daemon(3), journald's PRIORITY=)
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

# eve name -> journal field (NFQFW_ + this); fields absent from an event are left out
JOURNAL_FIELDS = {
    "event_type": "EVENT",
    "action": "ACTION",
    "rule": "RULE",
    "reason": "REASON",
    "ct_state": "CT",
    "hook": "HOOK",
    "in_iface": "IN",
    "out_iface": "OUT",
    "src_ip": "SRC",
    "dest_ip": "DST",
    "src_port": "SPORT",
    "dest_port": "DPORT",
    "proto": "PROTO",
    "icmp_type": "ICMP_TYPE",
    "icmp_code": "ICMP_CODE",
    "flow_id": "FLOW_ID",
    "logger": "LOGGER",
}

TEXT_LAYOUT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_TEXT_LAYOUT = "%(name)s: %(message)s"  # the journal has its own timestamps

_current = {"format": "text"}


def use_format(name: str) -> None:
    """Make `name` (one of LOG_FORMATS) the format of every log line from now on."""
    if name not in LOG_FORMATS:
        raise ValueError(f"log format {name!r}: expected one of {', '.join(LOG_FORMATS)}")
    _current["format"] = name


def current_format() -> str:
    return _current["format"]


# --- records as eve objects -------------------------------------------------------------------


def timestamp(created: float) -> str:
    """eve's timestamp: local time with microseconds and the UTC offset."""
    return datetime.fromtimestamp(created).astimezone().strftime("%Y-%m-%dT%H:%M:%S.%f%z")


def event_of(record: logging.LogRecord) -> dict[str, Any]:
    """The record as one eve-like object: a packet's fields, or a daemon message."""
    fields: Mapping[str, Any] | None = getattr(record, EVENT_ATTRIBUTE, None)
    head = {"timestamp": timestamp(record.created)}
    if fields is not None:
        return {**head, "event_type": "flow_verdict", **fields}
    message = record.getMessage()
    if record.exc_info:
        message += "\n" + logging.Formatter().formatException(record.exc_info)
    return {
        **head,
        "event_type": "daemon",
        "level": record.levelname.lower(),
        "logger": record.name,
        "message": message,
    }


class NfqfwFormatter(logging.Formatter):
    """Text (`layout`) or a JSON object per line, as `use_format` chose; `priority_prefix`: the
    '<N>' that journald reads at the start of a line on a stream (sd-daemon(3))."""

    def __init__(self, layout: str = TEXT_LAYOUT, priority_prefix: bool = False) -> None:
        super().__init__(layout)
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        if _current["format"] == "json":
            text = json.dumps(event_of(record), separators=(",", ":"))
        else:
            text = super().format(record)
        return f"<{PRIORITIES.get(record.levelno, 6)}>{text}" if self.priority_prefix else text


# --- the journal ------------------------------------------------------------------------------


def journal_datagram(fields: Mapping[str, str]) -> bytes:
    """The native protocol's serialisation: KEY=value lines; a value holding a newline is
    KEY, newline, its length as 64-bit little endian, the value, newline."""
    parts = []
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            parts.append(key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key.encode() + b"=" + data + b"\n")
    return b"".join(parts)


def journal_fields(record: logging.LogRecord, message: str) -> dict[str, str]:
    """What one record becomes in the journal: MESSAGE (as formatted), PRIORITY, the identifier
    and the NFQFW_* fields of its event."""
    fields = {
        "MESSAGE": message,
        "PRIORITY": str(PRIORITIES.get(record.levelno, 6)),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
    }
    event = event_of(record)
    for name, suffix in JOURNAL_FIELDS.items():
        value = event.get(name)
        if value is not None and value != "":
            fields[f"NFQFW_{suffix}"] = str(value)
    return fields


class JournalHandler(logging.Handler):
    """Sends each record to journald's native socket; stderr if the journal refuses it."""

    def __init__(self, path: str = JOURNAL_SOCKET, fallback: TextIO | None = None) -> None:
        super().__init__()
        self.path = path
        self.fallback = fallback or sys.stderr
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.setFormatter(NfqfwFormatter(JOURNAL_TEXT_LAYOUT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            datagram = journal_datagram(journal_fields(record, message))
        except Exception:
            self.handleError(record)
            return
        try:
            self.sock.sendto(datagram, self.path)
        except OSError:  # journald restarting, or a datagram too large for the socket
            priority = PRIORITIES.get(record.levelno, 6)
            self.fallback.write(f"<{priority}>{message}\n")
            self.fallback.flush()

    def close(self) -> None:
        self.sock.close()
        super().close()


def stderr_is_journal(environ: Mapping[str, str] = os.environ, stream: TextIO | None = None) -> bool:
    """$JOURNAL_STREAM is "DEVICE:INODE" of the journal stream systemd gave us; it counts only
    while our stderr is still that file (not redirected by a wrapper)."""
    named = environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(named) and named == f"{st.st_dev}:{st.st_ino}"


def setup_logging(
    level: str = "info", *, environ: Mapping[str, str] = os.environ, journal_socket: str = JOURNAL_SOCKET
) -> logging.Handler:
    """The root logger's one handler: the journal natively under systemd, else stderr."""
    handler: logging.Handler
    journal = stderr_is_journal(environ)
    if journal and os.path.exists(journal_socket):
        handler = JournalHandler(journal_socket)
    else:  # a journal stream without the native socket still reads the priority prefix
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            NfqfwFormatter(JOURNAL_TEXT_LAYOUT, priority_prefix=True) if journal else NfqfwFormatter()
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for chatty in ("pyroute2", "asyncio"):  # their debug output is per netlink message
        logging.getLogger(chatty).setLevel(max(root.level, logging.WARNING))
    return handler
