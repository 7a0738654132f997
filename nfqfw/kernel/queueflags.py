"""Queue messages NetfilterQueue does not send (the GSO flag, batch verdicts), sent on the
queue's own netlink socket.

NetfilterQueue 1.1 binds a queue (NFQNL_CFG_CMD_BIND, copy mode and range, max length) but has
no call for the queue's flags. Without NFQA_CFG_F_GSO the kernel cuts every GSO packet (a TCP
super-packet of up to 64 KB, from TSO or GRO) into MTU-sized packets before queueing them, and
the consumer handles each one: about 40 times more packets for a bulk transfer. With the flag,
the kernel queues the GSO packet as it is; NFQUEUE then copies only its first `copy_range`
bytes, which is all a firewall needs (the headers; the lengths are in the IP header, see
nfqfw.core.decode). It also stops filling in the L4 checksum of such packets (CHECKSUM_PARTIAL):
nfqfw does not verify checksums, so that changes nothing for it.

The kernel accepts a queue's configuration only from the netlink port that bound it, so the
message goes out on NetfilterQueue's own socket (a dup of `get_fd()`), asking for an ACK:

    nlmsghdr   type NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_CONFIG, flags REQUEST | ACK
    nfgenmsg   family AF_UNSPEC, version NFNETLINK_V0, res_id = queue number (big-endian)
    NFQA_CFG_MASK   u32 big-endian: the flags this message changes
    NFQA_CFG_FLAGS  u32 big-endian: their new values

(include/uapi/linux/netfilter/nfnetlink_queue.h and nfnetlink.h; net/netfilter/nfnetlink_queue.c
nfqnl_recv_config answers EOPNOTSUPP for a flag it does not know, EPERM for another port.)

Packets may already be queued when the message goes out (a restart with the rules in place):
the answer is read right after, and every packet message before it is handed to the queue's
callback as NetfilterQueue.run would (run_socket over that one datagram), so none is lost.

A batch verdict (NFQNL_MSG_VERDICT_BATCH, `verdict_batch_message`) gives one verdict to every
packet of the queue still waiting for one whose id is up to a given id: the early drops of
nfqfw.kernel.queue leave the packets of fat flows without a verdict and drop them 64 at a time
with one message (packets read after them have their verdict already, the kernel's ids only grow):

    nlmsghdr   type NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT_BATCH, flags REQUEST (no answer)
    nfgenmsg   family AF_UNSPEC, version NFNETLINK_V0, res_id = queue number (big-endian)
    NFQA_VERDICT_HDR   big-endian u32 verdict (NF_DROP), big-endian u32 id
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
CONFIG_MESSAGE_TYPE = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_CONFIG  # 0x0302
VERDICT_BATCH_TYPE = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT_BATCH  # 0x0303
NFQA_VERDICT_HDR = 2
NF_DROP = 0
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_GSO = 1 << 2
NFNETLINK_V0 = 0

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2

ANSWER_TIMEOUT = 2.0  # seconds; the kernel answers at once, from the sendmsg call itself
RECEIVE_SIZE = 0x10000 + 4096  # the largest packet message (a 64 KB copy) and its attributes

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence number, port id
_NFGENMSG = struct.Struct("!BBH")  # family, version, resource id (the queue number)
_U32_ATTR = struct.Struct("=HH")  # attribute length and type; a big-endian u32 follows
_NLMSGERR = struct.Struct("=i")  # the error code (0: the ACK of a success), then the request


class QueueFlagsError(Exception):
    """The kernel refused the flags or did not answer; str() is a one-line message."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code  # the errno the kernel answered, None without an answer


def config_message(queue: int, flags: int, mask: int, seq: int) -> bytes:
    """The NFQNL_MSG_CONFIG request setting `flags` (those in `mask`) of `queue`, asking for an ACK."""
    body = _NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue)
    for kind, value in ((NFQA_CFG_MASK, mask), (NFQA_CFG_FLAGS, flags)):
        body += _U32_ATTR.pack(8, kind) + struct.pack("!I", value)
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(body), CONFIG_MESSAGE_TYPE, NLM_F_REQUEST | NLM_F_ACK, seq, 0
    )
    return header + body


def verdict_batch_message(queue: int, verdict: int, last_id: int) -> bytes:
    """The NFQNL_MSG_VERDICT_BATCH giving `verdict` to every packet of `queue` still waiting
    for one whose id is `last_id` or lower (no answer asked: it is a verdict, as the binding's)."""
    body = _NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue)
    body += _U32_ATTR.pack(12, NFQA_VERDICT_HDR) + struct.pack("!II", verdict, last_id)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), VERDICT_BATCH_TYPE, NLM_F_REQUEST, 0, 0) + body


def messages(datagram: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence number, payload) of each netlink message in a datagram."""
    at = 0
    while at + _NLMSGHDR.size <= len(datagram):
        length, kind, _flags, seq, _port = _NLMSGHDR.unpack_from(datagram, at)
        if length < _NLMSGHDR.size or at + length > len(datagram):
            return
        yield kind, seq, datagram[at + _NLMSGHDR.size : at + length]
        at += (length + 3) & ~3


def answer_to(datagram: bytes, seq: int) -> int | None:
    """The errno the kernel answered request `seq` with in this datagram (0: done), or None
    when the datagram does not answer it (a packet message)."""
    for kind, got, payload in messages(datagram):
        if kind == NLMSG_ERROR and got == seq and len(payload) >= _NLMSGERR.size:
            return -_NLMSGERR.unpack_from(payload)[0]
    return None


def set_queue_flags(queue: Any, number: int, flags: int, mask: int, timeout: float = ANSWER_TIMEOUT) -> None:
    """Set the flags in `mask` of the bound NetfilterQueue `queue` (queue `number`) to `flags`;
    raises QueueFlagsError when the kernel refuses them or does not answer within `timeout`."""
    seq = 0x6E667100 | (number & 0xFF)  # any nonzero number: the kernel's answer repeats it
    with socket.socket(fileno=os.dup(queue.get_fd())) as sock:  # the same socket, so the same port
        sock.send(config_message(number, flags, mask, seq))
        code = _wait_for_answer(queue, sock, seq, timeout)
    if code is None:
        raise QueueFlagsError(
            f"queue {number}: no answer from the kernel to the flags request within {timeout:g} s"
        )
    if code:
        raise QueueFlagsError(f"queue {number}: the kernel refused the flags ({os.strerror(code)})", code)


def _wait_for_answer(queue: Any, sock: socket.socket, seq: int, timeout: float) -> int | None:
    """Read until the answer to `seq` comes; packet messages before it go to the queue's callback.
    (poll and MSG_DONTWAIT, not a socket timeout: that would make the shared socket non-blocking.)"""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not poller.poll(max(1, int(left * 1000))):
            return None
        try:
            datagram = sock.recv(RECEIVE_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except OSError as err:  # ENOBUFS: the socket overflowed (a flood); the answer may be lost
            if err.errno != errno.ENOBUFS:
                raise
            continue
        code = answer_to(datagram, seq)
        if code is not None:
            return code
        queue.run_socket(_OneDatagram(datagram))
    return None


class _OneDatagram:
    """A socket stand-in for NetfilterQueue.run_socket: one datagram, then 'would block'."""

    def __init__(self, datagram: bytes) -> None:
        self._datagram: bytes | None = datagram

    def recv(self, _size: int) -> bytes:
        datagram, self._datagram = self._datagram, None
        if datagram is None:
            raise BlockingIOError(errno.EAGAIN, "no more datagrams")
        return datagram
