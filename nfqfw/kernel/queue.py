"""The NFQUEUE adapter: kernel packets in, engine verdicts out.

One NetfilterQueue handle per bound queue (one for --queue N, B-A+1 for --queue-balance A:B),
all served by one thread. For each packet the callback:

0. tries the engine's fast path, engine.fast_path(payload, now): a segment of an established TCP
   flow or a datagram of a replied UDP flow is tracked and accepted (as in 3.) right there, with
   no Meta and no Verdict (most packets of a busy gateway end here);
1. looks up the Meta(hook, in_iface, out_iface, forwarded) for (hook, indev, outdev, the packet
   carries the `forwarded_mark` bit: one of the policy's forwards translated it) in a dict (built
   once per combination from the ifindex->name map, dropped when links change),
2. asks the engine: engine.full_process(payload, meta, now) (engine.process without a fast path),
3. answers the kernel:
   - accept: set our mark bit and NF_REPEAT; the kernel re-runs the filter hook, our rule lets
     the marked packet by and the host's later rules see it (see nfqfw.firewall.iptables),
   - drop: NF_DROP,
   - reject: NF_DROP, and a RST/ICMP answer built by nfqfw.core.reject goes out through the raw
     sender, at most `reject_rate` per second (like the kernel's icmp_msgs_per_sec),
4. if the verdict says `log` (a rule with `log: true`, or a denied packet with log-denied), hands
   the packet to `log_packet` (nfqfw.observe.packetlog: rate-limited, formats only what it emits); one
   attribute check per packet, nothing more for packets that are not logged,
5. if the housekeeping deadline has passed, runs the housekeeping callable (see below).

With metrics on, `wrap_process` (nfqfw.observe.metrics) wraps engine.process once, when the callback is
built, to time a sample of the calls, and step 0 is left out (engine.process runs the same fast
path inside, so the timed calls cover every packet); with metrics off the callback calls
engine.process as is.

The callback is the throughput ceiling: everything it needs is bound to closure locals once,
there is no logging on it but step 4, no per-packet object besides what the engine allocates, and the
except clause costs nothing unless something raises (then the packet gets the failure-mode
verdict: drop when closed, accept when open, and "verdict error" is counted).

GSO: `bind(..., gso=True)` (the default; `nfqfw run --no-gso` turns it off) asks the kernel,
right after binding each queue, to queue GSO packets whole (nfqfw.kernel.queueflags): a bulk TCP
transfer then reaches us as 64 KB super-packets instead of ~45 MTU-sized ones. The copy range
is COPY_RANGE bytes, so such a packet arrives as its first COPY_RANGE bytes; the engine is made
with `copy_cap=COPY_RANGE` and decides it on its headers and IP lengths (nfqfw.core.decode), the
reject builder and the packet log decode it the same way. `counters["packets longer than copy
range"]` counts them (the engine's `truncated_packets`). A kernel that refuses the flag is
logged and packets come segmented, as without it.

Housekeeping (link events, queue drop statistics, sd_notify, a stop request) is meant to run
off the packet path, from the daemon's poll loop when it is idle. Under a sustained flood,
NetfilterQueue.run(block=False) keeps reading until the socket is empty and may not return for
a long time; so the callback also calls `housekeeping(now)` itself once `now` passes the
deadline it returned (one float comparison per packet). A signal handler that needs prompt
service calls `wake()`, which moves the deadline to 0.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from typing import Any, Protocol

from netfilterqueue import COPY_PACKET, NetfilterQueue

from nfqfw.core.reject import build_reject
from nfqfw.core.verdict import Action, Hook, Meta, Verdict
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
from nfqfw.kernel.queueflags import NFQA_CFG_F_GSO, QueueFlagsError, set_queue_flags

log = logging.getLogger(__name__)

_HOOKS = {int(hook): hook for hook in Hook}


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
    every queued packet its verdict from a callback built once (`_make_callback`, steps 0-5 of
    the module docstring), sends the reject answers within `reject_rate`, and counts what went
    wrong (`counters`).

    It also holds the daemon's housekeeping deadline, in a cell the callback reads per packet:
    `housekeeping(now)` (set by the daemon) returns when it wants to run next, and runs from
    the poll loop or from the callback, whichever passes the deadline first (`deadline`,
    `wake`, `run_housekeeping`).
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
        self.log_packet = log_packet or _not_logged
        self.wrap_process = wrap_process
        self._counters: dict[str, int] = dict.fromkeys(ADAPTER_COUNTERS, 0)
        self.housekeeping: Callable[[float], float] = lambda now: now + 1.0
        self.queues: dict[int, NetfilterQueue] = {}
        self.gso: dict[int, bool] = {}  # queue -> the kernel queues GSO packets whole to it
        self._metas: dict[int, Meta] = {}
        self._deadline = [0.0]  # a list: shared, mutable cell read by the callback
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
        queues: range,
        max_len: int = DEFAULT_MAX_LEN,
        sock_len: int = DEFAULT_SOCK_LEN,
        gso: bool = True,
    ) -> None:
        """Bind every queue in `queues` (asking for GSO packets whole unless `gso` is False);
        raises QueueError with a one-line message."""
        # Packets queued while binding (a restart under traffic) are served by the callback at
        # once; the daemon is not started yet, so no housekeeping from there.
        deadline, self._deadline[0] = self._deadline[0], math.inf
        try:
            for number in queues:
                self.queues[number] = queue = self._bind_one(number, max_len, sock_len)
                self.gso[number] = gso and _ask_for_gso(queue, number)
        except BaseException:
            self.unbind()
            raise
        finally:
            self._deadline[0] = deadline

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
        for queue in self.queues.values():
            queue.unbind()
        self.queues.clear()
        self.gso.clear()

    def fds(self) -> dict[int, Callable[[], None]]:
        """fd -> function to call when it is readable (drains it without blocking)."""
        return {queue.get_fd(): _drainer(queue) for queue in self.queues.values()}

    def wake(self) -> None:
        """Make the next packet run housekeeping (for signal handlers)."""
        self._deadline[0] = 0.0

    def set_deadline(self, when: float) -> None:
        self._deadline[0] = when

    @property
    def deadline(self) -> float:
        """When housekeeping is due next (monotonic seconds)."""
        return self._deadline[0]

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
        run_housekeeping = self.run_housekeeping
        accept = Action.ACCEPT
        drop = Action.DROP

        def on_packet(pkt: Any) -> None:
            now = clock()
            try:
                data = pkt.get_payload()
                if fast(data, now):
                    pkt.set_mark(pkt.mark | mark)
                    pkt.repeat()
                else:
                    # hook 1-3 in bits 0-1, bit 2: translated by a forward (a nat mark)
                    key = pkt.hook | (pkt.mark & forwarded != 0) << 2 | pkt.indev << 3 | pkt.outdev << 35
                    meta = metas_get(key)
                    if meta is None:
                        meta = new_meta(key)
                    verdict = process(data, meta, now)
                    action = verdict.action
                    if action is accept:
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
            if now >= deadline[0]:
                run_housekeeping(now)

        return on_packet

    def _new_meta(self, key: int) -> Meta:
        hook = _HOOKS[key & 3]
        in_index, out_index = (key >> 3) & 0xFFFFFFFF, key >> 35
        in_iface, out_iface = self.links.name(in_index), self.links.name(out_index)
        meta = Meta(hook, in_iface, out_iface, bool(key & 4))
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
            self._deadline[0] = self.housekeeping(now)
        except Exception:
            log.exception("housekeeping failed")
            self._deadline[0] = now + 1.0


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


def _drainer(queue: NetfilterQueue) -> Callable[[], None]:
    def drain() -> None:
        queue.run(block=False)

    return drain
