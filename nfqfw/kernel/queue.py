"""The NFQUEUE adapter: kernel packets in, engine verdicts out, its queues served in turn.

One NetfilterQueue handle per bound queue (the queues of established flows and, when the rules
send first packets elsewhere, theirs), all served by one thread. For each packet the callback:

0. if `now` passed the deadline, takes the slow branch (`_due`, below) first: housekeeping,
   the end of the queue's turn, early drops;
1. tries the engine's fast path, engine.fast_path(payload, now): a segment of an established TCP
   flow or a datagram of a replied UDP flow is tracked and accepted (as in 3.) right there, with
   no Meta and no Verdict (most packets of a busy gateway end here);
2. looks up the Meta(hook, in_iface, out_iface, forwarded) for (hook, indev, outdev, the packet
   carries the `forwarded_mark` bit: one of the policy's forwards translated it) in a dict (built
   once per combination from the ifindex->name map, dropped when links change),
3. asks the engine: engine.full_process(payload, meta, now) (engine.process without a fast path),
   and answers the kernel:
   - accept: set our mark bit and NF_REPEAT; the kernel re-runs the filter hook, our rule lets
     the marked packet by and the host's later rules see it (see nfqfw.firewall.iptables);
     `mark` also holds a worker's owner field, and a full-path accept adds the connection-mark
     fields `set_verdict_marks` gives: the rule that admitted a new flow and, on a verdict with
     `offload`, the offload bit (nfqfw.firewall.marks),
   - drop: NF_DROP,
   - reject: NF_DROP, and a RST/ICMP answer built by nfqfw.core.reject goes out through the raw
     sender, at most `reject_rate` per second (like the kernel's icmp_msgs_per_sec),
4. if the verdict says `log` (a rule with `log: true`, or a denied packet with log-denied), hands
   the packet to `log_packet` (nfqfw.observe.packetlog: rate-limited, formats only what it emits); one
   attribute check per packet, nothing more for packets that are not logged.

With metrics on, `wrap_process` (nfqfw.observe.metrics) wraps engine.process once, when the callback is
built, to time a sample of the calls, and step 1 is left out (engine.process runs the same fast
path inside, so the timed calls cover every packet); with metrics off the callback calls
engine.process as is.

The callback is the throughput ceiling: everything it needs is bound to closure locals once,
there is no logging on it but step 4, no per-packet object besides what the engine allocates, one
float comparison for step 0, and the except clause costs nothing unless something raises (then
the packet gets the failure-mode verdict: drop when closed, accept when open, and "verdict error"
is counted).

Serving the queues in turn (nfqfw.kernel.fairness has the rules and why). When a queue's
descriptor is readable, `_serve` reads it with NetfilterQueue.run(block=False) until it is
empty, the cheapest read there is. Every quantum meanwhile (the deadline), the slow branch
gives each other established queue with packets waiting one turn (`_round`), then one of the
first-packet queues with packets waiting, in rotation, a shorter one; a turn reads the queue with
NetfilterQueue.run_socket over a stand-in socket (`_Turn`) whose recv is the queue socket's own
until `_due` ends the turn by making it say "would block". Then the first queue goes on. So no
established queue waits more than one round of the others' quanta, a flood in one queue
included, and no first-packet queue more than one round per first-packet queue.

At the end of each quantum, and on 1 packet in 16 while its queue is behind, the slow branch
measures how long the packet waited in the kernel (its receive timestamp, which the kernel sets
while a socket asks for timestamps: the adapter holds one, `_TimestampRequest`); a queue whose
head waits too long is behind, and while it is, packets of its fat flows are dropped right away
("drop queue delay"), without the engine: at CoDel's pace, and a growing share of them while
the queue is overloaded (nfqfw.kernel.fairness). Their verdict is given 64 at a time (one batch
verdict).

GSO: `bind(..., gso=True)` (the default; `nfqfw run --no-gso` turns it off) asks the kernel,
right after binding each queue, to queue GSO packets whole (nfqfw.kernel.queueflags): a bulk TCP
transfer then reaches us as 64 KB super-packets instead of ~45 MTU-sized ones. The copy range
is COPY_RANGE bytes, so such a packet arrives as its first COPY_RANGE bytes; the engine is made
with `copy_cap=COPY_RANGE` and decides it on its headers and IP lengths (nfqfw.core.decode), the
reject builder and the packet log decode it the same way. `counters["packets longer than copy
range"]` counts them (the engine's `truncated_packets`). A kernel that refuses the flag is
logged and packets come segmented, as without it.

Housekeeping (link events, queue drop statistics, sd_notify, a stop request) is meant to run
off the packet path, from the daemon's poll loop when it is idle. Under a sustained flood the
queues are never empty and the loop never idle; so the slow branch also calls
`housekeeping(now)` once `now` passes the time it returned. A signal handler that needs prompt
service calls `wake()`, which makes the next packet take the slow branch.

Invariants: a packet gets exactly one verdict (the slow branch's early drop returns before the
engine is asked); the queue sockets are non-blocking while bound (libnetfilter_queue's unbind
waits for an answer, so `unbind` makes them blocking first); nothing but the callback's slow
branch starts a turn, and a turn never starts another.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import socket
import time
import warnings
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Protocol

from netfilterqueue import COPY_PACKET, NetfilterQueue

from nfqfw.core.reject import build_reject
from nfqfw.core.verdict import Action, Hook, Meta, Verdict
from nfqfw.kernel.fairness import DROP_BATCH, MEASURE_EVERY, Backlog, flow_key, quantum
from nfqfw.kernel.queue_info import (
    ADAPTER_COUNTERS,
    COPY_RANGE,
    DEFAULT_MAX_LEN,
    DEFAULT_REJECT_RATE,
    DEFAULT_REJECT_WITH,
    DEFAULT_SOCK_LEN,
    LONGER_THAN_COPY_RANGE,
    ProcessFn,
    read_queue_stats,
)
from nfqfw.kernel.queueflags import (
    NF_DROP,
    NFQA_CFG_F_GSO,
    QueueFlagsError,
    set_queue_flags,
    verdict_batch_message,
)

log = logging.getLogger(__name__)

_HOOKS = {int(hook): hook for hook in Hook}
KERNEL_INVALID = 1 << 68  # in the Meta cache's key (hook: 3 bits, forwarded: 1, two 32-bit ifindexes)


class EngineLike(Protocol):
    """What the adapter needs of an engine (core.engine.Engine)."""

    # True: the packet was tracked as ESTABLISHED, accept it; False: ask full_process(). None:
    # no fast path (every packet goes to process()).
    fast_path: Callable[[bytes, float], bool] | None

    def process(self, data: bytes, meta: Meta, now: float) -> Verdict:
        """The verdict for any packet (the fast path tried first)."""
        ...

    def full_process(self, data: bytes, meta: Meta, now: float) -> Verdict:
        """The verdict for a packet the fast path did not take."""
        ...


LogPacketFn = Callable[[bytes, Meta, Verdict, float], None]


class LinksLike(Protocol):
    def name(self, index: int) -> str | None: ...
    def on_change(self, listener: Callable[[], None]) -> None: ...


class SenderLike(Protocol):
    def send(self, packet: bytes, ifindex: int = 0) -> None: ...


class QueueError(Exception):
    """The queue cannot be bound; str() is a one-line message for the user."""


# --- the adapter ------------------------------------------------------------------------------


class QueueAdapter:
    """The bridge between the kernel's NFQUEUE queues and the engine: binds the queues, gives
    every queued packet its verdict from a callback built once (`_make_callback`, steps 0-4 of
    the module docstring), sends the reject answers within `reject_rate`, serves the queues in
    turn (`_serve`, `_round`) with early drops from the fat flows of a queue that is behind
    (`early_drops`), and counts what went wrong (`counters`).

    It also holds the daemon's housekeeping deadline: `housekeeping(now)` (set by the daemon)
    returns when it wants to run next, and runs from the poll loop or from the callback's slow
    branch, whichever passes that time first (`deadline`, `wake`, `run_housekeeping`). The
    callback reads one cell per packet, `_deadline`: the earliest of that time and the end of
    the serving queue's quantum (0 while that queue is behind: every packet is looked at).
    """

    def __init__(
        self,
        engine: EngineLike,
        links: LinksLike,
        sender: SenderLike,
        *,
        mark: int,
        forwarded_mark: int = 0,
        fail_open: bool = False,
        reject_rate: float = DEFAULT_REJECT_RATE,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        log_packet: LogPacketFn | None = None,
        wrap_process: Callable[[ProcessFn], ProcessFn] | None = None,
    ) -> None:
        self.engine = engine
        self.links = links
        self.sender = sender
        self.mark = mark
        self.forwarded_mark = forwarded_mark  # 0: no forwards (no packet is marked)
        self.fail_open = fail_open
        self.reject_rate = reject_rate
        self.clock = clock
        self.wall_clock = wall_clock  # the kernel's packet timestamps are wall-clock time
        self.log_packet = log_packet or _not_logged
        self.wrap_process = wrap_process
        self._counters: dict[str, int] = dict.fromkeys(ADAPTER_COUNTERS, 0)
        self.early_drops = 0  # packets dropped before the engine: EARLY_DROP, with the verdicts
        self.housekeeping: Callable[[float], float] = lambda now: now + 1.0
        self.queues: dict[int, NetfilterQueue] = {}
        self.gso: dict[int, bool] = {}  # queue -> the kernel queues GSO packets whole to it
        self._metas: dict[int, Meta] = {}
        self._deadline = [0.0]  # a list: shared, mutable cell read by the callback
        self._housekeeping_at = 0.0
        self._served: list[_Served] = []  # in the order of a round: established queues first
        self._poller = select.poll()
        self._serving: _Served | None = None  # the queue whose packets the callback gets now
        self._event = 0.0  # the next of: housekeeping, the end of the serving queue's quantum
        self._first: _Served | None = None  # the queue `_serve` reads until empty
        self._last_first_packets = -1  # the first-packet queue that had the last round's turn
        self._stamps: _TimestampRequest | None = None
        self._tokens = reject_rate
        self._tokens_at = clock()
        self._errors_logged = 0
        links.on_change(self._metas.clear)
        self.on_packet = self._make_callback()

    @property
    def counters(self) -> dict[str, int]:
        """The adapter's counters and the packets longer than the copy range (a copy)."""
        counters = dict(self._counters)
        counters[LONGER_THAN_COPY_RANGE] = getattr(self.engine, "truncated_packets", 0)
        return counters

    # -- binding --

    def bind(
        self,
        queues: Iterable[int],
        max_len: int = DEFAULT_MAX_LEN,
        sock_len: int = DEFAULT_SOCK_LEN,
        gso: bool = True,
        first_packets: Iterable[int] = (),
    ) -> None:
        """Bind every queue in `queues` (asking for GSO packets whole unless `gso` is False);
        those also in `first_packets` get the kernel's first packets of flows (served after the
        others, for a shorter quantum). Raises QueueError with a one-line message."""
        # Packets queued while binding (a restart under traffic) are served by the callback at
        # once; the daemon is not started yet, so no housekeeping from there.
        housekeeping_at, self._housekeeping_at = self._housekeeping_at, math.inf
        self._deadline[0] = math.inf
        first = set(first_packets)
        try:
            for number in queues:
                self.queues[number] = queue = self._bind_one(number, max_len, sock_len)
                self.gso[number] = gso and _ask_for_gso(queue, number)
                self._served.append(_Served(number, queue, number in first))
            self._served.sort(key=lambda served: (served.first_packets, served.number))
            for served in self._served:
                served.sock.setblocking(False)
                self._poller.register(served.fd, select.POLLIN)
            self._stamps = _TimestampRequest.open()
        except BaseException:
            self.unbind()
            raise
        finally:
            self._housekeeping_at = housekeeping_at
            self._deadline[0] = housekeeping_at

    def _bind_one(self, number: int, max_len: int, sock_len: int) -> NetfilterQueue:
        try:
            queue = NetfilterQueue()  # also makes the kernel load nfnetlink_queue if it can
        except OSError as err:
            raise QueueError(f"cannot open a netfilter queue handle: {err.strerror or err}") from err
        stats = read_queue_stats()
        if stats is None:
            raise QueueError("kernel module nfnetlink_queue is missing (modprobe nfnetlink_queue)")
        if number in stats:
            raise QueueError(f"queue {number} is already bound by another process")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                queue.bind(number, self.on_packet, max_len, COPY_PACKET, COPY_RANGE, sock_len)
            except OSError as err:
                if number in (read_queue_stats() or {}):
                    raise QueueError(f"queue {number} is already bound by another process") from err
                raise QueueError(f"cannot bind queue {number}: {err}") from err
        for warning in caught:
            log.warning("queue %d: %s", number, warning.message)
        return queue

    def unbind(self) -> None:
        for served in self._served:
            served.close()  # blocking again (unbind waits for the kernel's answer); a turn ends
            self._poller.unregister(served.fd)
        for queue in self.queues.values():
            queue.unbind()
        self.queues.clear()
        self.gso.clear()
        self._served.clear()
        if self._stamps is not None:
            self._stamps.close()
            self._stamps = None

    def fds(self) -> dict[int, Callable[[], None]]:
        """fd -> function to call when it is readable (serves that queue until it is empty, and
        the others in turn meanwhile)."""
        return {served.fd: partial(self._serve, served) for served in self._served}

    def wake(self) -> None:
        """Make the next packet run housekeeping (for signal handlers)."""
        self._housekeeping_at = 0.0
        self._deadline[0] = 0.0

    def set_deadline(self, when: float) -> None:
        """When housekeeping is due next."""
        self._housekeeping_at = when
        self._arm()

    @property
    def deadline(self) -> float:
        """When housekeeping is due next (monotonic seconds)."""
        return self._housekeeping_at

    # -- serving the queues in turn --

    def _serve(self, first: _Served) -> None:
        """Read queue `first` until it is empty; every quantum meanwhile the callback's slow
        branch gives the other queues their turn (`_round`)."""
        if self._serving is not None or first not in self._served:
            return  # (not from inside a turn; a queue unbound meanwhile)
        self._first = self._serving = first
        first.turn_ends = self.clock() + first.quantum
        self._arm()
        try:
            first.queue.run(block=False)
        finally:
            self._first = self._serving = None
            first.flush_drops()
            first.backlog.emptied(self.clock())
            self._arm()

    def _round(self, first: _Served) -> None:
        """One turn for every other established queue with packets waiting, in order, then one
        for a first-packet queue: each is read for at most its quantum."""
        ready = {fd for fd, _ in self._poller.poll(0)}
        waiting = [served for served in self._served if served.fd in ready and served is not first]
        established = [served for served in waiting if not served.first_packets]
        first_packets = self._next_first_packets([served for served in waiting if served.first_packets])
        for served in established + first_packets:
            if not self.queues:
                break  # unbound (a stop) during the last turn
            self._serving = served
            served.turn_ends = self.clock() + served.quantum
            served.cut = False
            self._arm()
            try:
                served.queue.run_socket(served.turn)
            finally:
                served.turn.recv = served.sock.recv
                served.flush_drops()
            if not served.cut:
                served.backlog.emptied(self.clock())
        self._serving = first

    def _next_first_packets(self, waiting: list[_Served]) -> list[_Served]:
        """The first-packet queue whose turn it is: the next one with packets waiting after the
        one served last (by number). The first-packet queues share one turn a round, so a flood
        spread over all of them (random sources) takes no more time than one in a single queue."""
        if not waiting:
            return []
        later = [served for served in waiting if served.number > self._last_first_packets]
        chosen = (later or waiting)[0]
        self._last_first_packets = chosen.number
        return [chosen]

    def _arm(self) -> None:
        """Set the callback's deadline: the next event (housekeeping, the end of the serving
        queue's quantum), or every packet while that queue is behind."""
        serving = self._serving
        if serving is None:
            self._deadline[0] = self._event = self._housekeeping_at
            return
        self._event = min(self._housekeeping_at, serving.turn_ends)
        self._deadline[0] = 0.0 if serving.backlog.behind else self._event

    def _make_due(self) -> Callable[[Any, float], bool]:
        """The callback's slow branch, taken once `now` passed the deadline. Between two events
        a queue that is behind sends every packet here, so that part is one function: the
        packet's wait measured (1 in MEASURE_EVERY; one within target ends it), and when its
        flow is fat and a drop is due (nfqfw.kernel.fairness.DelayControl) no verdict now: it is
        dropped with the next batch (`_Served.flush_drops`).
        Events (housekeeping, the end of a quantum) go to `_at_event`. True: the packet needs no
        verdict from the engine (dropped early, or the queues are unbound)."""
        at_event = self._at_event
        wall_clock = self.wall_clock
        failed = self._failed_slow_branch

        def due(pkt: Any, now: float) -> bool:
            serving = self._serving
            if serving is None or not serving.backlog.behind or now >= self._event:
                return at_event(serving, pkt, now)
            try:
                backlog = serving.backlog
                serving.seen += 1
                if not serving.seen % MEASURE_EVERY:
                    stamp = pkt.get_timestamp()  # 0.0: none (the gateway's own packets)
                    if stamp and not backlog.measured(now, wall_clock() - stamp):
                        serving.flush_drops()
                        self._arm()
                        return False
                data = pkt.get_payload()
                # flow_key's common case inline: IPv4 without options, not ICMP
                fast = data[:1] == b"\x45" and data[9:10] != b"\x01"
                if not backlog.drop_early(data[12:24] if fast else flow_key(data), now):
                    return False
                serving.drop_to = pkt.id
                serving.dropping += 1
                if serving.dropping >= DROP_BATCH:
                    serving.flush_drops()
                self.early_drops += 1
                return True
            except Exception:
                failed()
                return False

        return due

    def _drop_early(self, serving: _Served, pkt: Any, now: float) -> bool:
        """The packet of a queue that is behind, at an event: dropped with the next batch when
        its flow is fat and a drop is due (as in `_make_due`'s lean part)."""
        if not serving.backlog.drop_early(flow_key(pkt.get_payload()), now):
            return False
        serving.drop_later(pkt.id)
        self.early_drops += 1
        return True

    def _at_event(self, serving: _Served | None, pkt: Any, now: float) -> bool:
        """Housekeeping when due; at the end of the serving queue's quantum, how long this packet
        waited (is the queue behind?), and the other queues' turn (or, in a turn, its end)."""
        try:
            if now >= self._housekeeping_at:
                bound = bool(self.queues)
                self.run_housekeeping(now)
                if bound and not self.queues:
                    return True  # unbound by a stop: no verdict can be given
            if serving is None:  # a packet read while binding
                return False
            ended = now >= serving.turn_ends
            if ended:
                stamp = pkt.get_timestamp()
                if stamp:
                    serving.backlog.measured(now, self.wall_clock() - stamp)
            dropped = serving.backlog.behind and self._drop_early(serving, pkt, now)
            if ended:
                serving.flush_drops()
                if serving is self._first:
                    self._round(serving)
                    serving.turn_ends = self.clock() + serving.quantum
                else:
                    serving.cut = True
                    serving.turn.recv = _would_block  # run_socket returns: the turn is over
            return dropped
        except Exception:
            self._failed_slow_branch()
            return False
        finally:
            self._arm()

    def _failed_slow_branch(self) -> None:
        if self._errors_logged < 10:
            self._errors_logged += 1
            log.exception("error in the queue service (the packet goes on to the engine)")

    # -- per packet --

    def _make_callback(self) -> Callable[[Any], None]:
        process = self.engine.process
        # The engine's fast path (an established TCP segment or UDP datagram: accepted, no Meta
        # needed) is tried before the Meta is looked up, then the engine's full path. With
        # metrics on, every packet goes through the wrapped engine.process instead, which runs
        # the same fast path inside.
        fast: Callable[[bytes, float], bool] = self.engine.fast_path or _never_fast
        if fast is not _never_fast:
            process = self.engine.full_process
        if self.wrap_process is not None:  # metrics on: time a sample of the engine calls
            process = self.wrap_process(self.engine.process)
            fast = _never_fast
        log_packet = self.log_packet
        clock = self.clock
        metas_get = self._metas.get
        new_meta = self._new_meta
        mark = self.mark
        forwarded = self.forwarded_mark
        reject = self._reject
        failed = self._failed
        deadline = self._deadline
        due = self._make_due()
        accept = Action.ACCEPT
        drop = Action.DROP
        # Mark bits a full-path accept adds (nfqfw.firewall.marks), set by `set_verdict_marks`:
        # the rule field of what admitted the flow (by verdict reason) and the offload bit.
        # With offload the kernel rules mark the packets its conntrack calls INVALID with the
        # offload bit too: the Meta says so (the engine asks for offloaded flows only).
        rule_mark: Callable[[str, int], int] = {}.get
        offload_mark = 0

        def set_verdict_marks(by_reason: dict[str, int], offload: int) -> None:
            nonlocal rule_mark, offload_mark
            rule_mark, offload_mark = by_reason.get, offload

        self.set_verdict_marks = set_verdict_marks

        def on_packet(pkt: Any) -> None:
            now = clock()
            if now >= deadline[0]:
                if due(pkt, now):
                    return  # dropped early, or the queues are gone
                now = clock()
            try:
                data = pkt.get_payload()
                if fast(data, now):
                    pkt.set_mark(pkt.mark | mark)
                    pkt.repeat()
                else:
                    # hook 0-3 in bits 0-2 (4, POSTROUTING, is no key: an error), bit 3: translated
                    # by a forward (a nat mark), then the two ifindexes; KERNEL_INVALID above them
                    key = pkt.hook | (pkt.mark & forwarded != 0) << 3 | pkt.indev << 4 | pkt.outdev << 36
                    if offload_mark and pkt.mark & offload_mark:  # offload: the kernel's INVALID
                        key |= KERNEL_INVALID
                    meta = metas_get(key)
                    if meta is None:
                        meta = new_meta(key)
                    verdict = process(data, meta, now)
                    action = verdict.action
                    if action is accept:
                        if offload_mark:  # offload: the rule field, the offload bit (firewall.marks)
                            extra = rule_mark(verdict.reason, 0) | (offload_mark if verdict.offload else 0)
                            pkt.set_mark(pkt.mark | mark | extra)
                        else:
                            pkt.set_mark(pkt.mark | mark)
                        pkt.repeat()
                    elif action is drop:
                        pkt.drop()
                    else:
                        pkt.drop()
                        reject(data, verdict.reject_with, pkt.indev or pkt.outdev, now)
                    if verdict.log:
                        log_packet(data, meta, verdict, now)
            except Exception:
                failed(pkt)

        return on_packet

    def _new_meta(self, key: int) -> Meta:
        hook = _HOOKS[key & 7]
        in_index, out_index = (key >> 4) & 0xFFFFFFFF, (key >> 36) & 0xFFFFFFFF
        in_iface, out_iface = self.links.name(in_index), self.links.name(out_index)
        meta = Meta(
            hook, in_iface, out_iface, kernel_invalid=bool(key & KERNEL_INVALID), forwarded=bool(key & 8)
        )
        if (in_iface or not in_index) and (out_iface or not out_index):
            self._metas[key] = meta  # only cache what resolved: a vanished link is retried
        return meta

    def _reject(self, data: bytes, kind: str | None, ifindex: int, now: float) -> None:
        """Answer a rejected packet (already dropped): build, rate-limit, send, count."""
        reply = build_reject(data, kind or DEFAULT_REJECT_WITH, COPY_RANGE)
        counters = self._counters
        if reply is None:
            counters["reject not answered"] += 1
            return
        # Token bucket: `reject_rate` answers per second, bursts of as many.
        self._tokens = min(self.reject_rate, self._tokens + (now - self._tokens_at) * self.reject_rate)
        self._tokens_at = now
        if self._tokens < 1.0:
            counters["reject rate-limited"] += 1
            return
        self._tokens -= 1.0
        try:
            self.sender.send(reply, ifindex)
        except OSError:
            counters["reject send error"] += 1
            return
        counters["reject sent"] += 1

    def _failed(self, pkt: Any) -> None:
        self._counters["verdict error"] += 1
        if self._errors_logged < 10:  # enough to diagnose, not enough to flood the journal
            self._errors_logged += 1
            log.exception("error handling a packet (failure mode %s)", "open" if self.fail_open else "closed")
        try:
            if self.fail_open:
                pkt.set_mark(pkt.mark | self.mark)
                pkt.repeat()
            else:
                pkt.drop()
        except Exception:  # a verdict was already given before the error
            pass

    def run_housekeeping(self, now: float) -> None:
        try:
            self._housekeeping_at = self.housekeeping(now)
        except Exception:
            log.exception("housekeeping failed")
            self._housekeeping_at = now + 1.0
        self._arm()


class _Turn:
    """The socket NetfilterQueue.run_socket reads in a turn: `recv` is the queue socket's own
    until the turn ends, then `_would_block` (run_socket stops at EAGAIN)."""

    __slots__ = ("recv",)

    def __init__(self, recv: Callable[[int], bytes]) -> None:
        self.recv = recv


def _would_block(_size: int) -> bytes:
    raise BlockingIOError(errno.EAGAIN, "the queue's turn is over")


class _Served:
    """One bound queue as the serving loop sees it."""

    __slots__ = (
        "backlog",
        "cut",
        "drop_failures",
        "drop_to",
        "dropping",
        "fd",
        "first_packets",
        "number",
        "quantum",
        "queue",
        "seen",
        "sock",
        "turn",
        "turn_ends",
    )

    def __init__(self, number: int, queue: NetfilterQueue, first_packets: bool) -> None:
        self.number = number
        self.queue = queue
        self.fd: int = queue.get_fd()
        self.first_packets = first_packets
        self.quantum = quantum(first_packets)
        self.backlog = Backlog()
        # The queue's own socket (a second descriptor of it), for the turns' reads.
        self.sock = socket.socket(fileno=os.dup(self.fd))
        self.turn = _Turn(self.sock.recv)
        self.turn_ends = math.inf
        self.cut = False  # the last turn ended at its quantum (the queue was not emptied)
        self.seen = 0  # packets looked at while behind (1 in MEASURE_EVERY is measured)
        self.dropping = 0  # packets of fat flows left without a verdict, to be dropped together
        self.drop_to = 0  # the id of the last of them
        self.drop_failures = 0

    def drop_later(self, packet_id: int) -> None:
        """Leave this packet (of a fat flow) for the next batch drop: every DROP_BATCH packets
        (and at the end of a turn or of the reading) one message drops all the waiting ones
        up to it: the packets read after them have their verdict already."""
        self.drop_to = packet_id
        self.dropping += 1
        if self.dropping >= DROP_BATCH:
            self.flush_drops()

    def flush_drops(self) -> None:
        if not self.dropping:
            return
        try:
            self.sock.send(verdict_batch_message(self.number, NF_DROP, self.drop_to))
        except OSError as err:  # the next batch covers these too (ids up to a later one)
            self.drop_failures += 1
            if self.drop_failures <= 3:
                log.warning("queue %d: batch drop not sent (%s), retried with the next", self.number, err)
            return
        self.dropping = 0

    def close(self) -> None:
        self.turn.recv = _would_block
        try:
            self.sock.setblocking(True)
        finally:
            self.sock.close()


SO_TIMESTAMP = 29  # SOL_SOCKET option (Linux; not in Python's socket module)


class _TimestampRequest:
    """A socket that asks for receive timestamps, held while the queues are bound. While any
    socket asks, the kernel stamps every packet it receives (a clock read per packet, as for
    `ping` or `tcpdump`), and NFQUEUE hands the stamp over with the packet: how long it waited
    for us. Without it forwarded packets carry none, and no queue is ever found behind."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def open(cls) -> _TimestampRequest | None:
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as err:
            log.warning("no receive timestamps (%s): queue delays are not measured, no early drops", err)
            return None
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        except OSError as err:
            sock.close()
            log.warning("no receive timestamps (%s): queue delays are not measured, no early drops", err)
            return None
        return cls(sock)

    def close(self) -> None:
        self.sock.close()


def _ask_for_gso(queue: NetfilterQueue, number: int) -> bool:
    """Ask the kernel to queue GSO packets whole; False (and a warning) when it does not."""
    try:
        set_queue_flags(queue, number, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO)
    except QueueFlagsError as err:
        log.warning("%s: GSO packets stay off, the kernel segments them before queueing (slower)", err)
        return False
    return True


def _never_fast(data: bytes, now: float) -> bool:
    """No fast path (an engine without one, or metrics timing every engine call)."""
    return False


def _not_logged(data: bytes, meta: Meta, verdict: Verdict, now: float) -> None:
    """No packet log attached (tests, tools): logged verdicts are ignored."""
