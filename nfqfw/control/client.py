"""The client side of the control socket (see nfqfw.control.protocol): one request,
one answer, every failure a one-line ClientError for the user, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import socket
from typing import Any

from nfqfw.control.protocol import DEFAULT_RUNTIME_DIR, SOCKET_NAME, UNIX_PATH_MAX, socket_path

DEFAULT_TIMEOUT = 30.0  # seconds without progress; a reload or a long flow list may take a while


class ClientError(Exception):
    """No answer, or an error answer; str() is the message for the user."""


class NoDaemon(ClientError):
    """Nobody listens on the control socket (no file, or a stale one)."""


def call(
    runtime_dir: str | os.PathLike[str], request: dict[str, Any], timeout: float = DEFAULT_TIMEOUT
) -> Any:
    """Send `request` to the daemon at RUNTIME_DIR/control.sock; its "result", or ClientError."""
    path = socket_path(runtime_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        _connect(sock, path)
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon refused us before reading: its answer says why
        except TimeoutError:
            raise ClientError(f"the nfqfw daemon at {path} does not read requests (timed out)") from None
        answer = _read_answer(sock, path)
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise ClientError(f"unexpected answer from {path}: {str(answer)[:200]}")
    if not answer["ok"]:
        raise ClientError(str(answer.get("error", "the daemon refused the request")))
    return answer.get("result")


def _connect(sock: socket.socket, path: str) -> None:
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NoDaemon(f"no nfqfw daemon at {path} (is it running?)") from None
    except PermissionError:
        raise ClientError(f"permission denied on {path}: the control socket is for root") from None
    except TimeoutError:
        raise ClientError(f"the nfqfw daemon at {path} does not accept connections (timed out)") from None
    except OSError as err:
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            too_long = f"{path}: too long for a Unix socket path (at most {UNIX_PATH_MAX} bytes)"
            raise ClientError(too_long) from None
        raise ClientError(f"cannot reach the nfqfw daemon at {path}: {err.strerror or err}") from None


def _read_answer(sock: socket.socket, path: str) -> Any:
    """Read up to the newline that ends the answer (or EOF); the daemon closes after it."""
    chunks = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            raise ClientError(f"the nfqfw daemon at {path} did not answer (timed out)") from None
        except ConnectionResetError:
            data = b""  # closed with our request unread: what it sent before still counts
        if not data:
            break
        chunks.append(data)
        if data.endswith(b"\n"):
            break
    raw = b"".join(chunks)
    if not raw:
        raise ClientError(f"the nfqfw daemon at {path} closed the connection without an answer")
    try:
        return json.loads(raw)
    except ValueError:
        raise ClientError(f"incomplete or garbled answer from {path} ({len(raw)} bytes)") from None


# --- for the commands -------------------------------------------------------------------------


def add_runtime_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runtime-dir",
        default=DEFAULT_RUNTIME_DIR,
        metavar="DIR",
        help=f"the daemon's --runtime-dir, where its {SOCKET_NAME} is (default {DEFAULT_RUNTIME_DIR})",
    )
