"""Stand-ins for the queue adapter's collaborators: fake kernel packets, engine, links, sender."""

from __future__ import annotations

import errno
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from scapy.layers.inet import IP, TCP, UDP

from nfqfw.core.verdict import Action, Ct, Meta, Verdict
from nfqfw.kernel.queueflags import NF_DROP, VERDICT_BATCH_TYPE, messages

MARK = 0x10000000
SYN = bytes(IP(src="192.0.2.10", dst="198.51.100.20") / TCP(sport=40000, dport=81, flags="S", seq=7))
UDP_PACKET = bytes(IP(src="192.0.2.10", dst="198.51.100.20") / UDP(sport=5000, dport=53))

ACCEPT = Verdict(Action.ACCEPT, Ct.NEW, "web", "rule web")
DROP = Verdict(Action.DROP, Ct.NEW, None, "default ingress")
RESET = Verdict(Action.REJECT, Ct.NEW, "no-ident", "rule no-ident", reject_with="tcp-reset")


class FakePacket:
    """What the callback uses of netfilterqueue.Packet, recording the verdict."""

    def __init__(
        self, data: bytes, hook: int = 2, indev: int = 3, outdev: int = 4, mark: int = 0, stamp: float = 0.0
    ) -> None:
        self._data = data
        self.hook, self.indev, self.outdev, self.mark = hook, indev, outdev, mark
        self.stamp = stamp  # the kernel's receive timestamp (wall clock); 0.0: none
        self.id = 0  # the queue's packet id (FakeQueue numbers them)
        self.verdict: str | None = None
        self.new_mark: int | None = None

    def get_payload(self) -> bytes:
        return self._data

    def get_timestamp(self) -> float:
        return self.stamp

    def set_mark(self, mark: int) -> None:
        self.new_mark = mark

    def _give(self, verdict: str) -> None:
        if self.verdict is not None:
            raise RuntimeError("Verdict already given for this packet")
        self.verdict = verdict

    def accept(self) -> None:
        self._give("accept")

    def drop(self) -> None:
        self._give("drop")

    def repeat(self) -> None:
        self._give("repeat")


class StandInEngine:
    """An engine without a fast path that answers every packet with `verdict` (or raises it)."""

    fast_path = None

    def __init__(self, verdict: Verdict | Exception) -> None:
        self.verdict = verdict
        self.seen: list[tuple[bytes, Meta, float]] = []

    def process(self, data: bytes, meta: Meta, now: float) -> Verdict:
        self.seen.append((data, meta, now))
        if isinstance(self.verdict, Exception):
            raise self.verdict
        return self.verdict

    def full_process(self, data: bytes, meta: Meta, now: float) -> Verdict:
        return self.process(data, meta, now)


class FakeLinks:
    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.lookups: list[int] = []
        self.listeners: list[Callable[[], None]] = []

    def name(self, index: int) -> str | None:
        self.lookups.append(index)
        return self.names.get(index)

    def on_change(self, listener: Callable[[], None]) -> None:
        self.listeners.append(listener)

    def change(self, names: dict[int, str]) -> None:
        self.names = names
        for listener in self.listeners:
            listener()


class FakeSender:
    def __init__(self, error: OSError | None = None) -> None:
        self.sent: list[tuple[bytes, int]] = []
        self.error = error

    def send(self, packet: bytes, ifindex: int = 0) -> None:
        if self.error:
            raise self.error
        self.sent.append((packet, ifindex))


class FakeQueue:
    """A bound queue as the adapter's serving loop uses it: a datagram socket pair whose one end
    is the queue's descriptor (readable while packets wait: one datagram for the next packet),
    and run(block=False) and run_socket(s) as NetfilterQueue's: one datagram read per packet, the
    callback for it, until a read says EAGAIN. Batch verdicts the adapter sends on the queue's
    socket reach the other end and are applied as the kernel would (`settle`): every packet
    delivered without a verdict whose id is up to the batch's gets it."""

    def __init__(self, callback: Callable[[Any], None]) -> None:
        self.callback = callback
        self._end, self._feed = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._feed.setblocking(False)
        self.waiting: deque[FakePacket] = deque()
        self.delivered: list[FakePacket] = []
        self.unbound = False
        self.batches = 0
        self._next_id = 1

    def get_fd(self) -> int:
        return self._end.fileno()

    def put(self, *packets: FakePacket) -> None:
        if packets and not self.waiting:
            self._feed.send(b".")
        for packet in packets:
            packet.id, self._next_id = self._next_id, self._next_id + 1
        self.waiting.extend(packets)

    def run(self, block: bool = True) -> None:
        assert not block
        while True:
            try:
                self._end.recv(16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self.settle()
                return
            self._deliver()

    def run_socket(self, sock: Any) -> None:
        while True:
            try:
                sock.recv(4096)
            except OSError as err:
                if err.errno == errno.EAGAIN:
                    self.settle()
                    return
                raise
            self._deliver()

    def _deliver(self) -> None:
        self.settle()
        packet = self.waiting.popleft()
        if self.waiting:
            self._feed.send(b".")  # the next one
        if not self.unbound:  # NetfilterQueue ignores what comes after unbind
            self.delivered.append(packet)
            self.callback(packet)

    def settle(self) -> None:
        """Apply the batch verdicts sent so far."""
        while True:
            try:
                datagram = self._feed.recv(4096)
            except BlockingIOError:
                return
            for kind, _, payload in messages(datagram):
                assert kind == VERDICT_BATCH_TYPE, kind
                verdict, last = struct.unpack_from("!II", payload, 8)  # after nfgenmsg, attr header
                assert verdict == NF_DROP
                self.batches += 1
                for packet in self.delivered:
                    if packet.verdict is None and packet.id <= last:
                        packet.drop()

    def unbind(self) -> None:
        self.unbound = True

    def close(self) -> None:
        self._end.close()
        self._feed.close()
