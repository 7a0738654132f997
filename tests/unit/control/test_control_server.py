"""nfqfw.control.server.ControlServer and nfqfw.control.client over real Unix sockets (no root needed):
the protocol, the socket file's life, and clients that are slow, huge, garbage or not root."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nfqfw import cli
from nfqfw.commands import EXIT_NO_DAEMON
from nfqfw.control.client import ClientError, call
from nfqfw.control.protocol import ControlError, RequestError, encode, socket_path
from nfqfw.control.server import ControlServer

NOT_JSON = "bad request: not a JSON object on one line"
NOT_ROOT = "permission denied: the control socket serves root (uid 0) only, not uid"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rundir() -> Iterator[Path]:
    """A short directory: a Unix socket path has at most 107 bytes, pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="nfqc"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def echo(request: dict[str, Any]) -> Iterator[bytes]:
    """A handler: answers what it was asked; {"cmd": "fail"} is refused, {"cmd": "crash"} is a bug."""
    if request.get("cmd") == "fail":
        raise RequestError("refused on purpose")
    if request.get("cmd") == "crash":
        raise ZeroDivisionError("division by zero")
    return iter([encode({"ok": True, "result": request})])


def server_at(directory: Path, clock: Clock | None = None, **kwargs: Any) -> ControlServer:
    return ControlServer.open(directory, kwargs.pop("handler", echo), clock=clock or Clock(), **kwargs)


def connect(directory: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path(directory))
    return sock


def pump(server: ControlServer, client: socket.socket, rounds: int = 2000) -> bytes:
    """Run the server (non-blocking) until the client has read everything up to EOF."""
    client.setblocking(False)
    data = bytearray()
    for _ in range(rounds):
        server.service()
        try:
            chunk = client.recv(1 << 20)
        except BlockingIOError:
            continue
        if not chunk:
            return bytes(data)
        data += chunk
    raise AssertionError(f"no EOF from the server; got {bytes(data[:200])!r}")


def ask(server: ControlServer, directory: Path, payload: bytes) -> dict[str, Any]:
    with connect(directory) as client:
        client.sendall(payload)
        raw = pump(server, client)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    answer: dict[str, Any] = json.loads(raw)
    return answer


# --- the socket file ------------------------------------------------------------------------


def test_socket_is_0600_in_a_created_directory_and_removed_on_close(rundir: Path) -> None:
    directory = rundir / "sub" / "dir"
    server = server_at(directory)
    path = Path(socket_path(directory))
    info = path.stat()
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert ask(server, directory, b'{"cmd": "status"}\n') == {"ok": True, "result": {"cmd": "status"}}
    server.close()
    assert not path.exists()


def test_a_stale_socket_is_replaced(rundir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(socket_path(rundir))
    stale.close()  # the file stays, nobody listens: a killed daemon's
    server = server_at(rundir)
    assert ask(server, rundir, b'{"cmd": "x"}\n')["ok"] is True
    server.close()


def test_a_live_daemons_socket_is_not_taken_over(rundir: Path) -> None:
    first = server_at(rundir)
    with pytest.raises(ControlError) as err:
        server_at(rundir)
    assert str(err.value) == (
        f"another nfqfw daemon answers on {rundir}/control.sock: "
        "stop it, or give this one another --runtime-dir"
    )
    assert ask(first, rundir, b'{"cmd": "still mine"}\n')["result"] == {"cmd": "still mine"}
    first.close()


def test_a_file_that_is_not_a_socket_is_left_alone(rundir: Path) -> None:
    (rundir / "control.sock").write_text("precious")
    with pytest.raises(ControlError) as err:
        server_at(rundir)
    assert str(err.value) == (
        f"{rundir}/control.sock exists and is not a socket: remove it or choose another --runtime-dir"
    )
    assert (rundir / "control.sock").read_text() == "precious"


def test_a_path_too_long_for_a_unix_socket_is_refused(rundir: Path) -> None:
    directory = rundir / ("d" * 100)
    with pytest.raises(ControlError) as err:
        server_at(directory)
    length = len(str(directory)) + len("/control.sock")
    assert str(err.value) == (
        f"control socket path {directory}/control.sock is too long ({length} bytes, at most 107): "
        "choose a shorter --runtime-dir"
    )


def test_close_leaves_a_newer_socket_at_the_path(rundir: Path) -> None:
    server = server_at(rundir)
    os.unlink(socket_path(rundir))
    newer = server_at(rundir)
    server.close()
    assert ask(newer, rundir, b'{"cmd": "newer"}\n')["result"] == {"cmd": "newer"}
    newer.close()


# --- requests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"garbage\n", f"{NOT_JSON} (Expecting value: line 1 column 1 (char 0))"),
        (b"\xff\xfe\n", f"{NOT_JSON} ("),
        (b'["status"]\n', 'bad request: expected a JSON object, like {"cmd": "status"}'),
        (b'{"cmd": "fail"}\n', "refused on purpose"),
        (b'{"cmd": "crash"}\n', "internal error: ZeroDivisionError('division by zero')"),
    ],
)
def test_bad_requests_get_an_error_answer(rundir: Path, payload: bytes, error: str) -> None:
    server = server_at(rundir)
    answer = ask(server, rundir, payload)
    assert answer["ok"] is False
    assert answer["error"].startswith(error)
    assert ask(server, rundir, b'{"cmd": "after"}\n')["ok"] is True  # and the server carries on
    server.close()


def test_a_request_ended_by_eof_instead_of_newline_is_served(rundir: Path) -> None:
    server = server_at(rundir)
    with connect(rundir) as client:
        client.sendall(b'{"cmd": "no newline"}')
        client.shutdown(socket.SHUT_WR)
        assert json.loads(pump(server, client)) == {"ok": True, "result": {"cmd": "no newline"}}
    server.close()


def test_a_client_that_asks_nothing_is_dropped_quietly(rundir: Path) -> None:
    server = server_at(rundir)
    with connect(rundir) as client:
        client.shutdown(socket.SHUT_WR)
        assert pump(server, client) == b""
    assert server.clients == 0
    server.close()


def test_a_huge_request_is_refused_without_reading_it_all(rundir: Path) -> None:
    server = server_at(rundir, max_request=1000)
    with connect(rundir) as client:
        client.sendall(b"x" * 5000)  # no newline, and more than the limit
        answer = json.loads(pump(server, client))
    assert answer == {"ok": False, "error": "request too long: more than 1000 bytes without a newline"}
    server.close()


def test_a_slow_client_times_out_with_an_error(rundir: Path) -> None:
    clock = Clock()
    server = server_at(rundir, clock, idle_timeout=5.0)
    with connect(rundir) as client:
        server.service()
        assert server.clients == 1
        assert server.next_due(clock.now) == pytest.approx(100.01)  # housekeeping comes back soon
        clock.now += 4.9
        client.sendall(b'{"cmd": "sta')  # progress, but no complete request: no more time
        server.service()
        assert server.clients == 1
        clock.now += 0.2
        answer = json.loads(pump(server, client))
    assert answer == {"ok": False, "error": "timeout: no complete request within 5 s"}
    assert server.clients == 0
    server.close()


def test_a_non_root_peer_is_refused_whatever_the_file_mode(rundir: Path) -> None:
    server = server_at(rundir, uid_of=lambda sock: 65534)
    answer = ask(server, rundir, b'{"cmd": "status"}\n')
    assert answer == {
        "ok": False,
        "error": f"{NOT_ROOT} 65534",
    }
    server.close()


def test_the_real_peer_uid_is_read(rundir: Path) -> None:
    seen = []

    def record(sock: socket.socket) -> int:
        from nfqfw.control.server import peer_uid

        seen.append(peer_uid(sock))
        return 0

    server = server_at(rundir, uid_of=record)
    ask(server, rundir, b'{"cmd": "who"}\n')
    assert seen == [os.getuid()]
    server.close()


def test_more_clients_than_allowed_get_busy(rundir: Path) -> None:
    server = server_at(rundir, max_clients=1)
    with connect(rundir) as first, connect(rundir) as second:
        server.service()
        answer = json.loads(pump(server, second))
        assert answer == {"ok": False, "error": "busy: 1 clients are being served, try again"}
        first.sendall(b'{"cmd": "first"}\n')
        assert json.loads(pump(server, first))["result"] == {"cmd": "first"}
    server.close()


class Ticking(Clock):
    """Each look at it is 10 ms later: every answer outlasts its work slice."""

    def __call__(self) -> float:
        self.now += 0.01
        return self.now


def test_a_client_asking_again_at_once_is_never_busy(rundir: Path) -> None:
    """A script that asks again as soon as it has its answer: the server takes one connection per
    round, so the answered ones are closed before the next is taken (they were left open, one
    after the other on one round, until MAX_CLIENTS of them made the server "busy")."""
    # The loop below spins while the asking thread may wait for a core: the fake clock would pass
    # any idle timeout in the meantime (not what this test is about).
    server = server_at(rundir, clock=Ticking(), idle_timeout=1e9)
    answers: list[Any] = []

    def asker() -> None:
        for n in range(40):
            answers.append(call(rundir, {"cmd": "ask", "n": n}, timeout=10))

    thread = threading.Thread(target=asker)
    thread.start()
    while thread.is_alive():
        server.service()
    thread.join()
    assert answers == [{"cmd": "ask", "n": n} for n in range(40)]
    assert server.clients <= 1
    server.close()


# --- long answers ---------------------------------------------------------------------------

CHUNK = b"y" * 65536
CHUNKS = 200  # 12.5 MiB: far more than a socket buffer holds


def long_answer(request: dict[str, Any]) -> Iterator[bytes]:
    def chunks() -> Iterator[bytes]:
        yield b'{"ok":true,"result":"'
        for _ in range(CHUNKS):
            yield CHUNK
        yield b'"}\n'

    return chunks()


def test_a_long_answer_is_written_as_the_client_reads(rundir: Path) -> None:
    server = server_at(rundir, handler=long_answer)
    with connect(rundir) as client:
        client.sendall(b'{"cmd": "long"}\n')
        for _ in range(50):  # the client reads nothing: the server never blocks, it waits
            server.service()
        assert server.clients == 1
        assert server.next_due(0.0) == pytest.approx(0.01)  # housekeeping comes back soon
        raw = pump(server, client, rounds=100000)
    assert len(raw) == len(CHUNK) * CHUNKS + len(b'{"ok":true,"result":""}\n')
    assert json.loads(raw)["result"] == "y" * len(CHUNK) * CHUNKS
    server.close()


def test_a_client_that_stops_reading_is_dropped_after_the_idle_timeout(rundir: Path) -> None:
    clock = Clock()
    server = server_at(rundir, clock, handler=long_answer, idle_timeout=5.0)
    with connect(rundir) as client:
        client.sendall(b'{"cmd": "long"}\n')
        for _ in range(50):
            server.service()
        clock.now += 5.1
        server.service()
        assert server.clients == 0
    server.close()


def test_a_client_that_goes_away_mid_answer_costs_nothing(rundir: Path) -> None:
    server = server_at(rundir, handler=long_answer)
    client = connect(rundir)
    client.sendall(b'{"cmd": "long"}\n')
    server.service()
    client.close()
    for _ in range(10):
        server.service()
    assert server.clients == 0
    assert len(ask(server, rundir, b'{"cmd": "next"}\n')["result"]) == len(CHUNK) * CHUNKS
    server.close()


# --- the client -----------------------------------------------------------------------------


class Serving:
    """A ControlServer served from a thread, for the blocking client."""

    def __init__(self, directory: Path, **kwargs: Any) -> None:
        self.server = ControlServer.open(directory, kwargs.pop("handler", echo), **kwargs)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import select

        while not self.stop.is_set():
            select.select([self.server.fileno()], [], [], 0.05)
            self.server.service()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.server.close()


def test_call_returns_the_result_or_raises_the_error(rundir: Path) -> None:
    serving = Serving(rundir)
    try:
        assert call(rundir, {"cmd": "status", "x": 1}) == {"cmd": "status", "x": 1}
        with pytest.raises(ClientError) as err:
            call(rundir, {"cmd": "fail"})
        assert str(err.value) == "refused on purpose"
    finally:
        serving.close()


def test_call_shows_a_refusal_sent_before_the_request_was_read(rundir: Path) -> None:
    serving = Serving(rundir, uid_of=lambda sock: 1000)
    try:
        with pytest.raises(ClientError) as err:
            call(rundir, {"cmd": "status", "padding": "p" * 300000})
        assert str(err.value) == f"{NOT_ROOT} 1000"
    finally:
        serving.close()


def test_call_without_a_daemon(rundir: Path) -> None:
    with pytest.raises(ClientError) as err:
        call(rundir, {"cmd": "status"})
    assert str(err.value) == f"no nfqfw daemon at {rundir}/control.sock (is it running?)"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(socket_path(rundir))
    stale.close()
    with pytest.raises(ClientError) as err:
        call(rundir, {"cmd": "status"})
    assert str(err.value) == f"no nfqfw daemon at {rundir}/control.sock (is it running?)"


def raw_server(directory: Path, answer: bytes) -> threading.Thread:
    """A one-shot server that reads the request and sends `answer` as it is."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path(directory))
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"", "the nfqfw daemon at {path} closed the connection without an answer"),
        (b'{"ok": true, "res', "incomplete or garbled answer from {path} (17 bytes)"),
        (b"[1, 2]\n", "unexpected answer from {path}: [1, 2]"),
        (b'{"ok": false}\n', "the daemon refused the request"),
    ],
)
def test_call_with_a_broken_answer(rundir: Path, answer: bytes, message: str) -> None:
    thread = raw_server(rundir, answer)
    with pytest.raises(ClientError) as err:
        call(rundir, {"cmd": "status"})
    thread.join()
    assert str(err.value) == message.format(path=socket_path(rundir))


def test_call_times_out_on_a_daemon_that_never_answers(rundir: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path(rundir))
    listener.listen(1)
    with listener, pytest.raises(ClientError) as err:
        call(rundir, {"cmd": "status"}, timeout=0.3)
    assert str(err.value) == f"the nfqfw daemon at {rundir}/control.sock did not answer (timed out)"


@pytest.mark.parametrize("command", [["status"], ["flows"], ["flush"], ["panic", "off"], ["reload"]])
def test_commands_without_a_daemon_print_one_line(
    rundir: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([*command, "--runtime-dir", str(rundir)]) == EXIT_NO_DAEMON
    out, err = capsys.readouterr()
    no_daemon = f"no nfqfw daemon at {rundir}/control.sock (is it running?)"
    assert (out, err) == ("", f"nfqfw {command[0]}: {no_daemon}\n")


def test_panic_on_without_a_daemon_names_the_way_without_it(
    rundir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["panic", "on", "--runtime-dir", str(rundir)]) == EXIT_NO_DAEMON
    no_daemon = f"no nfqfw daemon at {rundir}/control.sock (is it running?)"
    hint = "'nfqfw panic on --no-daemon' drops everything without it"
    assert capsys.readouterr() == ("", f"nfqfw panic: {no_daemon}; {hint}\n")


def test_panic_off_is_refused_without_the_daemon(rundir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["panic", "off", "--no-daemon", "--runtime-dir", str(rundir)]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == (
        "",
        "nfqfw panic: off needs the daemon (the queue rules to put back are its own): start nfqfw, "
        "which keeps panic mode on, then run 'nfqfw panic off'; or 'nfqfw rules remove'\n",
    )


FLOW = {
    "proto": "tcp", "protonum": 6, "timeout": 99, "state": "SYN_SENT", "family": 4, "src": "10.1.2.3",
    "dst": "192.0.2.1", "sport": 40000, "dport": 22, "replied": False, "assured": False,
    "admitted_by": "rule ssh", "in": "lan0", "out": "wan0", "age": 1,
}  # fmt: skip
CANNED = {
    "flows": {"tracked": 4, "max_flows": 10, "flows": [FLOW]},
    "flush": {"removed": 2, "tracked": 3},
    "panic": {"panic": True, "changed": True},
    "reload": {"time": 0.0, "trigger": "control request", "ok": False, "errors": ["p.yaml:1:1: bad"],
               "removed": None},
    "status": {"anything": ["the daemon says"]},
}  # fmt: skip


def test_commands_send_their_requests_and_print_the_answers(
    rundir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[dict[str, Any]] = []

    def canned(request: dict[str, Any]) -> Iterator[bytes]:
        seen.append(request)
        return iter([encode({"ok": True, "result": CANNED[request["cmd"]]})])

    serving = Serving(rundir, handler=canned)
    where = ["--runtime-dir", str(rundir)]
    try:
        assert cli.main(["flows", "--proto", "6", "--state", "syn-sent", "--addr", "10.1.2.3/8", *where]) == 0
        assert capsys.readouterr() == (
            "tcp      6 99 SYN_SENT src=10.1.2.3 dst=192.0.2.1 sport=40000 dport=22 [UNREPLIED] rule=ssh "
            "in=lan0 out=wan0\n",
            "1 flow shown (4 tracked, at most 10)\n",
        )
        assert cli.main(["flush", "--proto", "udp", *where]) == 0
        assert capsys.readouterr() == ("2 flows removed (3 still tracked)\n", "")
        assert cli.main(["panic", "on", *where]) == 0
        assert capsys.readouterr() == ("panic mode on: everything but loopback is dropped\n", "")
        assert cli.main(["reload", *where]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.endswith(" by control request: FAILED, the running policy stays in force:\n"
                                          "  p.yaml:1:1: bad\n")  # fmt: skip
        assert cli.main(["status", "--json", *where]) == 0
        assert json.loads(capsys.readouterr().out) == {"anything": ["the daemon says"]}
    finally:
        serving.close()
    assert seen == [
        {"cmd": "flows", "proto": "tcp", "state": "SYN_SENT", "addr": "10.0.0.0/8"},
        {"cmd": "flush", "proto": "udp"},
        {"cmd": "panic", "on": True},
        {"cmd": "reload"},
        {"cmd": "status"},
    ]


def test_bad_filter_options_are_refused_before_asking(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["flush", "--state", "open", "--runtime-dir", "/nonexistent"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(
        "argument --state: unknown state 'open': expected one of SYN_SENT, SYN_RECV, ESTABLISHED, "
        "FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE, SYN_SENT2, ASSURED, UNREPLIED, REPLIED\n"
    )
