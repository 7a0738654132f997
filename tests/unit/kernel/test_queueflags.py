"""nfqfw.kernel.queueflags: the NFQNL_MSG_CONFIG request byte for byte, and the wait for its answer over
a socket pair standing in for the queue's netlink socket (packet messages before the answer go
to the queue's callback). The lab tests send it to the kernel."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator

import pytest

from nfqfw.kernel.queueflags import (
    NFQA_CFG_F_GSO,
    QueueFlagsError,
    answer_to,
    config_message,
    messages,
    set_queue_flags,
)

SEQ = 0x6E667105  # what set_queue_flags uses for queue 5


def test_config_message_bytes() -> None:
    message = config_message(5, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO, 77)
    assert message == (
        struct.pack("=IHHII", 36, 0x0302, 0x1 | 0x4, 77, 0)  # nlmsghdr: CONFIG of the queue subsystem
        + bytes((0, 0)) + (5).to_bytes(2, "big")  # nfgenmsg: AF_UNSPEC, NFNETLINK_V0, queue 5
        + struct.pack("=HH", 8, 4) + (4).to_bytes(4, "big")  # NFQA_CFG_MASK: F_GSO
        + struct.pack("=HH", 8, 5) + (4).to_bytes(4, "big")  # NFQA_CFG_FLAGS: F_GSO
    )  # fmt: skip


def ack(seq: int, error: int = 0) -> bytes:
    request = struct.pack("=IHHII", 36, 0x0302, 5, seq, 0)
    return struct.pack("=IHHII", 16 + 4 + len(request), 2, 0, seq, 4242) + struct.pack("=i", error) + request


def packet_message(packet_id: int) -> bytes:
    body = bytes((2, 0, 0, 5)) + struct.pack("=HH", 11, 1) + packet_id.to_bytes(4, "big") + b"\x08\x00\x02\0"
    return struct.pack("=IHHII", 16 + len(body), 0x0300, 0, 0, 0) + body


def test_answers_are_found_by_sequence_number() -> None:
    assert answer_to(ack(SEQ), SEQ) == 0
    assert answer_to(ack(SEQ, -errno.EOPNOTSUPP), SEQ) == errno.EOPNOTSUPP
    assert answer_to(ack(SEQ + 1), SEQ) is None  # someone else's request
    assert answer_to(packet_message(1), SEQ) is None
    assert [kind for kind, _, _ in messages(packet_message(1) + ack(SEQ))] == [0x0300, 2]
    assert list(messages(ack(SEQ)[:-1])) == []  # cut short: no message


class FakeQueue:
    """A bound NetfilterQueue as set_queue_flags uses it: its socket, and run_socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.handed: list[bytes] = []

    def get_fd(self) -> int:
        return self.sock.fileno()

    def run_socket(self, s: object) -> None:  # as NetfilterQueue.run_socket: read until EAGAIN
        while True:
            try:
                self.handed.append(s.recv(4096))  # type: ignore[attr-defined]
            except BlockingIOError as err:
                assert err.args[0] == errno.EAGAIN
                break


@pytest.fixture
def pair() -> Iterator[tuple[FakeQueue, socket.socket]]:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, kernel:
        yield FakeQueue(ours), kernel


def test_packets_before_the_answer_go_to_the_callback(pair: tuple[FakeQueue, socket.socket]) -> None:
    queue, kernel = pair
    for datagram in (packet_message(1), packet_message(2), ack(SEQ), packet_message(3)):
        kernel.send(datagram)
    set_queue_flags(queue, 5, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO)
    assert kernel.recv(4096) == config_message(5, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO, SEQ)
    assert queue.handed == [packet_message(1), packet_message(2)]
    assert queue.sock.recv(4096) == packet_message(3)  # after the answer: left for the packet loop
    assert queue.sock.getblocking()  # the shared socket's mode is untouched


def test_refused_flags(pair: tuple[FakeQueue, socket.socket]) -> None:
    queue, kernel = pair
    kernel.send(ack(SEQ, -errno.EOPNOTSUPP))
    with pytest.raises(QueueFlagsError) as raised:
        set_queue_flags(queue, 5, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO)
    assert str(raised.value) == "queue 5: the kernel refused the flags (Operation not supported)"
    assert raised.value.code == errno.EOPNOTSUPP


def test_no_answer(pair: tuple[FakeQueue, socket.socket]) -> None:
    queue, _ = pair
    with pytest.raises(
        QueueFlagsError, match=r"^queue 5: no answer from the kernel to the flags request within 0.05 s$"
    ):
        set_queue_flags(queue, 5, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO, timeout=0.05)
