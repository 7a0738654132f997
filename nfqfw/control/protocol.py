"""The control protocol: where the socket lives, the commands, and the answer lines.

One JSON object per line each way: the client sends {"cmd": ...} (see COMMANDS), the daemon
answers {"ok": true, "result": ...} or {"ok": false, "error": "why"} and closes. The encoding
never puts a newline inside a line (json escapes control characters). Imported by the client
too, so it carries no server, no daemon and no kernel code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

DEFAULT_RUNTIME_DIR = "/run/nfqfw"
SOCKET_NAME = "control.sock"
SOCKET_MODE = 0o600
MAX_REQUEST = 64 * 1024  # bytes of one request line
IDLE_TIMEOUT = 5.0  # seconds to send the whole request, and to go on reading the answer
MAX_CLIENTS = 16
SLICE = 0.002  # seconds of work on a streamed answer per service() call, then packets again
BUSY_AGAIN = 0.01  # while a client is connected, housekeeping comes back this soon
FLOWS_PER_CHUNK = 256
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL
COMMANDS = ("status", "flows", "flush", "panic", "reload", "metrics", "confirm", "set", "ha")

Chunks = Iterator[bytes]
Handler = Callable[[dict[str, Any]], Chunks]


class ControlError(Exception):
    """The control socket cannot be set up; str() is a one-line message for the user."""


class RequestError(Exception):
    """A request the daemon will not serve; str() goes back to the client as the error."""


def socket_path(runtime_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(runtime_dir), SOCKET_NAME)


def encode(answer: dict[str, Any]) -> bytes:
    """One answer line. json escapes control characters, so the only newline is the last byte."""
    return json.dumps(answer, separators=(",", ":")).encode() + b"\n"


def ok(result: Any) -> bytes:
    return encode({"ok": True, "result": result})


def error(message: str) -> bytes:
    return encode({"ok": False, "error": message})
