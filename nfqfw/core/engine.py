"""The engine: decode -> conntrack -> policy -> verdict, for one packet at a time.

Pure: the adapter hands in the packet bytes, the kernel's metadata and the clock. One Engine
per NFQUEUE queue; the kernel hashes both directions of a flow to the same queue, so worker
processes with one Engine each never need to share state.

`copy_cap` is the queue's copy range: a packet of exactly that many bytes whose IP length
claims more was cut by it (a GSO packet, up to 64 KB, of which only the first `copy_cap` bytes
are copied to us). Such packets are decided on their headers with the lengths of their IP
header (see core.decode) and counted in `truncated_packets`.

Offload (policy option `offload: established`): the full path answers a packet of an
established, ASSURED TCP connection (handshake seen) or of a replied UDP flow with OFFLOADED,
ESTABLISHED with the `offload` flag: the adapter marks it so the kernel's conntrack carries the
flow from then on. The packet that makes a flow offloadable (the handshake's last ACK, the first
reply) always takes the full path, so the fast path never needs to offload. The flow leaves the
table (its packets no longer come, and the kernel tracks them: nfqfw's TCP windows would go
stale) for `offloaded`, a table of its own (their records, with rule and Meta, for `flows`,
recheck and flush; nfqfw.service.offload follows them in the kernel's table, keeps their
deadlines and drops those the kernel no longer has). A packet of an offloaded flow that still
reaches nfqfw is:
- queued before the kernel took the flow over, or the kernel lost the flow: accepted, handed
  over again;
- a TCP segment the kernel's conntrack called INVALID (Meta.kernel_invalid: outside its window,
  a checksum it refuses): invalid, as the kernel, which tracks the connection, says;
- a SYN (the kernel ended the connection and let a new one start on its tuple): the record is
  dropped and the packet judged as a first one.

SYN proxy (rules with `synproxy: true`, core.synproxy): the SYN the kernel's proxy sends a
server, queued from OUTPUT, is judged as the forwarded SYN it stands for (a FORWARD Meta with
each interface the kernel proxies for: all must give the same verdict by the same rule), and
its flow remembers the proxy's sequence number (l4.tcp proxied_syn).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from nfqfw.core import synproxy
from nfqfw.core.conntrack import Conntrack
from nfqfw.core.decode import decode
from nfqfw.core.fastpath import FastPath, make_fast_path
from nfqfw.core.flowtable import NO_SLOT
from nfqfw.core.fragments import Fragments, datagram_key
from nfqfw.core.l4.base import ASSURED, PROTO_STATE, SEEN_REPLY, SMALL, STATE_BYTE, WORDS, ports_key
from nfqfw.core.l4.icmp import OWN_ERROR
from nfqfw.core.l4.tcp import proxied_syn
from nfqfw.core.l4.tcp_states import TcpState
from nfqfw.core.l4.tcp_window import F_BE_LIBERAL, FLAGS
from nfqfw.core.packet import ACK, FRAG_LATER, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, SYN, Packet
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.sets import RuntimeSets
from nfqfw.core.verdict import Action, Ct, Hook, Meta, RuleDecision, Verdict

ESTABLISHED = Verdict(Action.ACCEPT, Ct.ESTABLISHED, None, "established")
OFFLOADED = Verdict(Action.ACCEPT, Ct.ESTABLISHED, None, "established", offload=True)
OFFLOADED_PER_FLOW = 4  # offloaded flows remembered, per flow of max-flows (the kernel's table is bigger)
HANDED_OVER_FOR = 300.0  # seconds an offloaded flow is remembered unless the service says longer
_OFFLOADABLE = frozenset({PROTO_TCP, PROTO_UDP})
RELATED = Verdict(Action.ACCEPT, Ct.RELATED, None, "related")
OWN_RELATED = Verdict(Action.ACCEPT, Ct.RELATED, None, OWN_ERROR)
# The kernel's antispoof (reverse-path filter, raw PREROUTING) drops these; the packets queued
# from PREROUTING are its log samples (see nfqfw.firewall.iptables). Also its counters' key.
SPOOFED_SOURCE = "invalid: spoofed source"
_PREROUTING, _OUTPUT = Hook.PREROUTING, Hook.OUTPUT  # module globals: an Enum attribute costs ~100 ns
UNTRACKED_ND = Verdict(Action.ACCEPT, Ct.UNTRACKED, None, "untracked: icmpv6 neighbour discovery / MLD")
VERDICT_CACHE_SIZE = 4096


def reject_kind(pkt: Packet) -> str:
    """How to refuse a packet: an RST for TCP, an ICMP unreachable otherwise (iptables' choice)."""
    if pkt.proto == PROTO_TCP:
        return "tcp-reset"
    if pkt.proto == PROTO_UDP:
        return "icmp-port-unreachable"
    return "icmp-admin-prohibited"


def _counter_name(verdict: Verdict) -> str:
    return f"{verdict.action.value} {verdict.reason}"


def _none() -> tuple[int, int]:
    return 0, 0


class Engine:
    """The verdict for each packet of one queue, and the state behind it: the flow table
    (`conntrack`), the first-fragment verdicts (`fragments`) and the compiled `policy`.

    Two ways in, giving the same verdicts and flow state (tests/unit/core/test_fastpath.py):
    - `fast_path(data, now)` (core.fastpath; None when made with fast_path=False): True when it
      tracked the packet as ESTABLISHED (accept it), False when it did not touch it;
    - `full_process(data, meta, now)`: decode, conntrack, policy, for any packet.
    `process()` tries the first, then the second; the NFQUEUE adapter calls the two itself so
    that a fast-path packet needs no Meta. Verdicts are interned (a few distinct objects);
    `counts()` tallies them by "action reason". Nothing here raises for a packet: a bug gives
    a drop counted as "internal error"."""

    def __init__(
        self,
        policy: CompiledPolicy,
        local_addresses: frozenset[bytes] | None = None,
        fast_path: bool = True,
        copy_cap: int = 0,
    ) -> None:
        options = policy.config.options
        self.policy = policy
        self.runtime_sets = RuntimeSets()  # `nfqfw set add` entries: kept across policy reloads
        policy.bind_runtime(self.runtime_sets)
        self.conntrack = Conntrack(max_flows=options.max_flows, loose=options.tcp_pickup_loose)
        self.fragments = Fragments()
        # The gateway's own addresses (the service keeps them current): a SYN leaving from
        # another address is the SYN proxy's (core.synproxy).
        self.local_addresses = local_addresses or policy.gateway_addresses
        self.synproxy_ifaces = synproxy.ifaces(policy.config)  # None: no synproxy rule
        self._proxied_metas: dict[tuple[str | None, str | None], Meta] = {}
        self._counters: Counter[str] = Counter()
        # Per Meta (by id; Metas are interned by the adapter, a handful): the side its first
        # packets are decided by, and how many the policy decided, by action (read as zone
        # pairs by zone_counts). Entries: [meta, side, to_gateway, from_gateway, {action: n}].
        self._metas: dict[int, list[Any]] = {}
        self._decided: Counter[tuple[object, ...]] = Counter()  # (hook, in, out, action): folded
        # Per-packet counting by verdict object (no string per packet): id -> [verdict, count].
        # The list keeps the verdict alive, so its id cannot be reused while counted here.
        self._tally: dict[int, list[Any]] = {}
        self.established = 0  # the full path counts here, folded into `counters` on read
        self.copy_cap = copy_cap
        self._truncated = 0  # packets cut by the copy range, full path (the fast path counts its own)
        self._verdicts: dict[tuple[object, ...], Verdict] = {}
        # None with fast_path=False (the differential tests: every packet takes full_process).
        self.fast_path: FastPath | None = None
        self._fast_packets: Callable[[], tuple[int, int]] = _none  # (taken, of those cut)
        if fast_path:
            self.fast_path, self._fast_packets = make_fast_path(self.conntrack, copy_cap)
        self.offload = options.offload == "established"
        # The flows handed over to the kernel, out of `conntrack` (see the module docstring): a
        # table of their own, whose deadlines the service sets from the kernel's and from which
        # it removes those the kernel ended (nfqfw.service.offload).
        self.offloaded = Conntrack(max_flows=OFFLOADED_PER_FLOW * options.max_flows)

    def replace_policy(self, policy: CompiledPolicy) -> None:
        """Swap the policy between two packets; conntrack state and runtime set entries are kept."""
        policy.bind_runtime(self.runtime_sets)
        self.policy = policy
        self.synproxy_ifaces = synproxy.ifaces(policy.config)
        self.offload = policy.config.options.offload == "established"
        for entry in self._metas.values():  # the zones may have changed
            entry[1:4] = self._sides(policy, entry[0])
        self.conntrack.loose = policy.config.options.tcp_pickup_loose
        self.conntrack.max_flows = policy.config.options.max_flows
        self.offloaded.max_flows = OFFLOADED_PER_FLOW * policy.config.options.max_flows

    @property
    def counters(self) -> dict[str, int]:
        """Verdicts by "action reason", established packets included."""
        return self.counts()

    def counts(self) -> dict[str, int]:
        counts = Counter(self._counters)
        for verdict, count in list(self._tally.values()):  # list(): one C call (metrics read from a thread)
            counts[_counter_name(verdict)] += count
        established = self.established + self._fast_packets()[0]
        if established:
            counts["accept established"] += established
        return dict(counts)

    @property
    def truncated_packets(self) -> int:
        """Packets longer than the copy range seen so far (GSO packets, mostly)."""
        return self._truncated + self._fast_packets()[1]

    # -- per packet ------------------------------------------------------------------------
    def process(self, data: bytes | bytearray | memoryview, meta: Meta, now: float) -> Verdict:
        """The verdict for one packet: the fast path's when it takes the packet, else the full
        path's. (The NFQUEUE adapter tries `fast_path` itself, before it looks up the Meta.)"""
        fast = self.fast_path
        if fast is not None and fast(data, now):  # type: ignore[arg-type]
            return ESTABLISHED
        return self.full_process(data, meta, now)

    def full_process(self, data: bytes | bytearray | memoryview, meta: Meta, now: float) -> Verdict:
        """Decode, conntrack, policy: the verdict for any packet."""
        if meta.hook is _PREROUTING:  # a sample of a spoofed packet the kernel drops anyway
            return self._count(self._make(Action.DROP, Ct.INVALID, None, SPOOFED_SOURCE))
        try:
            pkt = decode(data, self.copy_cap)
            if pkt.truncated:
                self._truncated += 1
            if pkt.malformed is not None:
                return self._count(self._invalid(pkt.malformed))
            if pkt.frag:
                return self._fragment(pkt, data, meta, now)
        except Exception as error:  # a bug must never take the firewall down: drop and say why
            return self._internal_error(error)
        return self._judge(pkt, meta, now)

    def _judge(self, pkt: Packet, meta: Meta, now: float) -> Verdict:
        try:
            tracked = self.conntrack.track(pkt, now)
            ct = tracked.ct
            if ct is Ct.ESTABLISHED:
                self.established += 1
                if self.offload and self._offloadable(tracked.slot):
                    return self._hand_over(tracked.slot, now)
                return ESTABLISHED
            if ct is Ct.RELATED:
                return self._count(RELATED)
            # A packet of no flow in the table (INVALID without a connection, or a first one) may
            # be one of a flow handed over to the kernel: checked only on these two ways.
            if ct is Ct.INVALID:
                if pkt.inner is not None and meta.hook is _OUTPUT:
                    return self._count(self._own_error(pkt))
                handed = self._offloaded_packet(pkt, meta) if len(self.offloaded) else None
                return handed or self._count(self._invalid(tracked.reason))
            if ct is Ct.UNTRACKED and pkt.proto == PROTO_ICMPV6 and pkt.frag == 0:
                return self._count(self._neighbour_discovery(meta))
            if tracked.new and len(self.offloaded):
                handed = self._offloaded_packet(pkt, meta)
                if handed is not None:
                    return handed
            if (
                meta.hook is _OUTPUT
                and self.synproxy_ifaces is not None
                and synproxy.from_proxy(pkt, self.local_addresses)
            ):
                return self._count(self._proxied_syn(pkt, meta, tracked.new, tracked.slot, ct, now))
            verdict = self._decide(pkt, meta, ct, now)
            if tracked.new and verdict.action is Action.ACCEPT:
                verdict = self._confirm(meta, verdict)
            return self._count(verdict)
        except Exception as error:
            return self._internal_error(error)

    def _offloadable(self, slot: int) -> bool:
        """A TCP connection ESTABLISHED and ASSURED, its handshake seen (not picked up
        mid-stream nor restored: those are tracked liberally), or a UDP flow that saw a reply."""
        table = self.conntrack.table
        key, bits = table.keys[slot], table.bits[slot]
        if key is None:
            return False
        if key[0] == PROTO_TCP:
            return (
                bits & (ASSURED | PROTO_STATE) == ASSURED | PROTO_STATE
                and table.small[slot * SMALL + STATE_BYTE] == TcpState.ESTABLISHED
                and not table.td[slot * WORDS + FLAGS] & F_BE_LIBERAL
            )
        return key[0] == PROTO_UDP and bool(bits & SEEN_REPLY)

    def _hand_over(self, slot: int, now: float) -> Verdict:
        """The flow leaves the table for `offloaded`: the kernel carries it from now on. Its
        deadline there is the service's to keep up (until then, HANDED_OVER_FOR seconds)."""
        flow = self.conntrack.table.handle(slot)
        self.conntrack.remove(flow)
        flow.deadline = now + HANDED_OVER_FOR
        self.offloaded.expire(now)
        self.offloaded.confirm(flow)  # full (of ASSURED flows): not remembered, still handed over
        return OFFLOADED

    def _offloaded_packet(self, pkt: Packet, meta: Meta) -> Verdict | None:
        """The verdict for a packet of an offloaded flow (see the module docstring); None when
        it is not one, or starts a new flow on an offloaded flow's tuple."""
        if pkt.frag == FRAG_LATER or pkt.proto not in _OFFLOADABLE:
            return None
        flow = self.offloaded.get(ports_key(pkt)[0])
        if flow is None:
            return None
        if pkt.proto == PROTO_TCP:
            if pkt.tcp_flags & (SYN | ACK) == SYN:
                self.offloaded.remove(flow)
                return None
            if meta.kernel_invalid:
                return self._count(
                    self._invalid("tcp: invalid to the kernel's conntrack, which carries the connection")
                )
        self.established += 1
        return OFFLOADED

    def _proxied_syn(self, pkt: Packet, meta: Meta, new: bool, slot: int, ct: Ct, now: float) -> Verdict:
        """The SYN the kernel's SYN proxy sends a server (core.synproxy): judged as forwarded,
        in from each interface the proxy answers on; its flow keeps the proxy's sequence number."""
        verdict = first = None
        for iface in self.synproxy_ifaces or ():
            forwarded = self._forwarded_meta(iface, meta.out_iface)
            decided = self._decide(pkt, forwarded, ct, now)
            if verdict is None:
                verdict, first = decided, forwarded
            elif (decided.action, decided.rule) != (verdict.action, verdict.rule):
                reason = "synproxy: the verdict depends on the interface the SYN came in on"
                return self._make(Action.DROP, ct, None, reason)
        assert verdict is not None and first is not None
        if verdict.action is not Action.ACCEPT:
            return verdict
        proxied_syn(self.conntrack.table, slot, pkt)
        return self._confirm(first, verdict) if new else verdict

    def _forwarded_meta(self, in_iface: str | None, out_iface: str | None) -> Meta:
        """The Meta of a forwarded packet (interned: flows keep it)."""
        meta = self._proxied_metas.get((in_iface, out_iface))
        if meta is None:
            meta = self._proxied_metas[(in_iface, out_iface)] = Meta(Hook.FORWARD, in_iface, out_iface)
        return meta

    def _own_error(self, pkt: Packet) -> Verdict:
        """An ICMP error from the gateway itself (only those are queued from OUTPUT): its stack
        answers some packets before FORWARD, about flows the table never saw."""
        tracked = self.conntrack.own_error(pkt)
        if tracked.ct is Ct.RELATED:
            return RELATED if tracked.slot != NO_SLOT else OWN_RELATED
        return self._invalid(tracked.reason)

    def _internal_error(self, error: Exception) -> Verdict:
        return self._count(self._make(Action.DROP, Ct.INVALID, None, f"internal error: {error!r}"[:200]))

    def _fragment(self, pkt: Packet, data: bytes | bytearray | memoryview, meta: Meta, now: float) -> Verdict:
        """A fragment after the first gets the verdict on its datagram's first fragment, as the
        kernel, which reassembles before conntrack, decides a datagram as a whole."""
        key = datagram_key(pkt, data)
        if pkt.frag == FRAG_LATER:
            first = self.fragments.first_verdict(key, now)
            if first is None:  # its first fragment not seen (yet): on its own
                return self._judge(pkt, meta, now)
            action = Action.DROP if first.action is Action.REJECT else first.action  # one answer is enough
            return self._count(self._make(action, first.ct, first.rule, f"fragment of: {first.reason}"))
        verdict = self._judge(pkt, meta, now)
        self.fragments.remember(key, verdict, now)
        return verdict

    def _confirm(self, meta: Meta, verdict: Verdict) -> Verdict:
        if self.conntrack.confirm_pending(verdict.reason, meta):
            return verdict
        return self._make(Action.DROP, Ct.NEW, None, "conntrack table full")

    def _decide(self, pkt: Packet, meta: Meta, ct: Ct, now: float) -> Verdict:
        policy = self.policy
        entry = self._metas.get(id(meta))
        if entry is None or entry[0] is not meta:
            entry = self._new_meta(meta)
        decision = None
        if meta.forwarded:  # translated by a forward: it admits what it translates (pass)
            forward = policy.forwards.translated(pkt, meta.in_iface)
            if forward is not None and forward.passes:
                decision = forward.decision
        if decision is None:
            decision = policy.match(entry[1], pkt, entry[2], entry[3], meta.in_iface, meta.out_iface, now)
        action = decision.action
        counts = entry[4]
        counts[action] = counts.get(action, 0) + 1
        # ICMP errors never get here (conntrack makes them RELATED or INVALID): no reply to an error.
        reject_with = reject_kind(pkt) if action is Action.REJECT else None
        return self._make(action, ct, decision.rule, decision.reason, decision.log, reject_with)

    def _new_meta(self, meta: Meta) -> list[Any]:
        if len(self._metas) >= VERDICT_CACHE_SIZE:  # not interned (tools, tests): fold the counts
            for known, *_, counts in self._metas.values():
                for action, count in counts.items():
                    self._decided[(known.hook, known.in_iface, known.out_iface, action)] += count
            self._metas.clear()
        entry = [meta, *self._sides(self.policy, meta), {}]
        self._metas[id(meta)] = entry
        return entry

    @staticmethod
    def _sides(policy: CompiledPolicy, meta: Meta) -> tuple[str, bool, bool]:
        """(side, to_gateway, from_gateway): see classify."""
        hook = meta.hook
        if hook == Hook.OUTPUT:
            return "egress", False, True
        return policy.zones.side(hook, meta.in_iface, meta.out_iface), hook == Hook.INPUT, False

    def standing_decision(self, pkt: Packet, meta: Meta) -> RuleDecision:
        """What the policy says of a flow's first packet, rate limits aside (reload recheck)."""
        policy = self.policy
        if meta.forwarded:
            forward = policy.forwards.translated(pkt, meta.in_iface)
            if forward is not None and forward.passes:
                return forward.decision
        side, to_gateway, from_gateway = self.classify(pkt, meta)
        return policy.match_standing(side, pkt, to_gateway, from_gateway, meta.in_iface, meta.out_iface)

    def classify(self, pkt: Packet, meta: Meta) -> tuple[str, bool, bool]:
        """(side, to_gateway, from_gateway). The side is the zones' (core.zones.ZoneMap.side):
        from the gateway itself or an inside zone egress, between two inside zones between, from
        a zone facing the outside -- or one in no zone -- ingress."""
        return self._sides(self.policy, meta)

    def zone_counts(self) -> dict[str, int]:
        """First packets decided by the policy, by "FROM->TO ACTION" (zone names; `gateway` for
        the gateway itself, `-` for an interface in no zone)."""
        decided = Counter(self._decided)
        for meta, *_, by_action in list(self._metas.values()):  # list(): read from other threads
            for action, count in list(by_action.items()):
                decided[(meta.hook, meta.in_iface, meta.out_iface, action)] += count
        counts: Counter[str] = Counter()
        pair = self.policy.zones.pair
        for (hook, in_iface, out_iface, action), count in decided.items():
            source, target = pair(hook, in_iface, out_iface)  # type: ignore[arg-type]
            counts[f"{source}->{target} {action.value}"] += count  # type: ignore[attr-defined]
        return dict(counts)

    def _neighbour_discovery(self, meta: Meta) -> Verdict:
        # ND and MLD are link-local: allowed to and from the gateway, never forwarded.
        if meta.hook == Hook.FORWARD:
            reason = "untracked: neighbour discovery is not forwarded"
            return self._make(Action.DROP, Ct.UNTRACKED, None, reason)
        return UNTRACKED_ND

    def _invalid(self, why: str) -> Verdict:
        return self._make(self.policy.invalid_action, Ct.INVALID, None, f"invalid: {why}")

    def _make(
        self,
        action: Action,
        ct: Ct,
        rule: str | None,
        reason: str,
        log: bool = False,
        reject_with: str | None = None,
    ) -> Verdict:
        log = log or (action is not Action.ACCEPT and self.policy.log_denied)  # INVALID, table full...
        key = (action, ct, rule, reason, log, reject_with)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = Verdict(action, ct, rule, reason, log, reject_with)
            if len(self._verdicts) < VERDICT_CACHE_SIZE:
                self._verdicts[key] = verdict
        return verdict

    def _count(self, verdict: Verdict) -> Verdict:
        entry = self._tally.get(id(verdict))
        if entry is not None:
            entry[1] += 1
        elif len(self._tally) < VERDICT_CACHE_SIZE:  # verdicts are interned: a few distinct ones
            self._tally[id(verdict)] = [verdict, 1]
        else:
            self._counters[_counter_name(verdict)] += 1
        return verdict
