"""The packet log: one line per logged packet, rate-limited, with a count of what was held back.

Which packets: those whose verdict has `log` set. The policy decides it (nfqfw.core.policy and
the engine): packets decided by a rule with `log: true`, and with `options: {log-denied: true}`
(the default, as ufw) every packet dropped or rejected, whether by a rule, by a default, as
INVALID or because the flow table is full. Accepted packets of ESTABLISHED/RELATED flows are
never logged.

What a line says (logger "nfqfw.packets", level INFO; ufw-like key=value fields)::

    [NFQFW DROP] REASON="default ingress" CT=NEW HOOK=FORWARD IN=wan0 OUT=lan0 SRC=203.0.113.10
        DST=10.0.0.25 LEN=40 TTL=64 PROTO=TCP SPT=40000 DPT=22 FLAGS=SYN

REASON is the verdict's reason ("rule NAME", "default SIDE", "invalid: WHY", ...), CT the
conntrack state, HOOK the netfilter hook (INPUT: to the gateway, FORWARD: through it, OUTPUT:
from it). Then SRC/DST/LEN (IP total length)/TTL/PROTO and, by protocol, SPT/DPT and FLAGS
(TCP), SPT/DPT (UDP) or TYPE/CODE (ICMP, ICMPv6); FRAG=FIRST|LATER for fragments (a later
fragment has no ports).

The same packet as fields (`packet_event`, Suricata eve.json's names) travels with the line in
the record, for `options: {log-format: json}` and the journal (nfqfw.observe.logsetup):
src_ip, src_port, dest_ip, dest_port, proto, in_iface, out_iface, hook, ct_state, action,
reason, rule, flow_id, ip_len, ttl and tcp_flags / icmp_type, icmp_code / frag where they apply.
`flow_id` is the same for both directions of a flow and across restarts (a hash of its
addresses, ports or ICMP identifier and protocol), so a SIEM can group a flow's lines.

Rate limit: token buckets as iptables' `-m limit` (`options: log-limit` lines per period,
`log-limit-burst` in a burst; default 3/minute, burst 10, as ufw), one bucket per deciding rule,
per default and one for all INVALID packets, so a flood of one kind cannot hide the others. A
packet that finds no token is counted, not formatted; the daemon's housekeeping calls `flush()`,
which logs (WARNING) "N packet log lines suppressed (...)" at most once per SUMMARY_INTERVAL,
and once more at stop.

Cost: the adapter calls `log()` only for packets whose verdict has `log` set (one attribute
check per packet, nothing else on the ESTABLISHED path); a suppressed packet costs a dict
lookup and a token-bucket update; only an emitted line decodes and formats.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from nfqfw.core import packet as wire
from nfqfw.core.config import DEFAULT_LOG_LIMIT, PROTOCOL_NAMES, LogLimit
from nfqfw.core.decode import decode
from nfqfw.core.l4 import flow_key
from nfqfw.core.packet import FRAG_FIRST, FRAG_LATER, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Packet
from nfqfw.core.ratelimit import TokenBucket
from nfqfw.core.verdict import Ct, Meta, Verdict

log = logging.getLogger("nfqfw.packets")

Emit = Callable[[int, str, "dict[str, Any] | None"], None]  # (level, text line, eve fields or None)
EVENT_ATTRIBUTE = "nfqfw_event"  # nfqfw.observe.logsetup reads the fields from the record there
FLOW_ID_BITS = 53  # a JSON number every consumer reads exactly (IEEE double)

SUMMARY_INTERVAL = 60.0  # seconds between two "lines suppressed" summaries
MAX_BUCKETS = 1024  # bucket keys are rule names and a few fixed reasons; this only bounds a leak

# iptables LOG's order of the flag names
_FLAGS = tuple(
    (getattr(wire, name), name) for name in ("CWR", "ECE", "URG", "ACK", "PSH", "RST", "SYN", "FIN")
)
_PROTO_LABELS = {number: name.upper() for number, name in PROTOCOL_NAMES.items()} | {PROTO_ICMPV6: "ICMPv6"}
_PERIODS = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}


# --- one line ---------------------------------------------------------------------------------


def format_packet(
    data: bytes | bytearray | memoryview, meta: Meta, verdict: Verdict, copy_cap: int = 0
) -> str:
    """The log line of one packet (decoded again here: only logged packets pay for it). A packet
    cut by the queue's copy range `copy_cap` (a GSO packet) shows its IP length in LEN."""
    return _line(decode(data, copy_cap), data, meta, verdict)


def _line(pkt: Packet, data: bytes | bytearray | memoryview, meta: Meta, verdict: Verdict) -> str:
    reason = verdict.reason.replace('"', "'")
    fields = [
        f"[NFQFW {verdict.action.value.upper()}]",
        f'REASON="{reason}"',
        f"CT={verdict.ct.value.upper()}",
        f"HOOK={meta.hook.name}",
        f"IN={meta.in_iface or ''}",
        f"OUT={meta.out_iface or ''}",
    ]
    if len(pkt.src) not in (4, 16):  # not even an IP header: what the reason says is all there is
        fields.append(f"LEN={len(data)}")
        return " ".join(fields)
    fields += [
        f"SRC={ipaddress.ip_address(pkt.src)}",
        f"DST={ipaddress.ip_address(pkt.dst)}",
        f"LEN={pkt.length or len(data)}",
        f"TTL={pkt.ttl}",
        f"PROTO={_PROTO_LABELS.get(pkt.proto, str(pkt.proto))}",
    ]
    fields += _transport_fields(pkt)
    return " ".join(fields)


def _transport_fields(pkt: Packet) -> list[str]:
    if pkt.frag == FRAG_LATER:
        return ["FRAG=LATER"]  # no L4 header in this fragment
    fields = ["FRAG=FIRST"] if pkt.frag == FRAG_FIRST else []
    proto = pkt.proto
    if proto in (PROTO_TCP, PROTO_UDP) and (pkt.sport or pkt.dport):
        fields += [f"SPT={pkt.sport}", f"DPT={pkt.dport}"]
        if proto == PROTO_TCP:
            names = [name for bit, name in _FLAGS if pkt.tcp_flags & bit]
            fields.append(f"FLAGS={','.join(names) or 'NONE'}")
    elif proto in (PROTO_ICMP, PROTO_ICMPV6) and pkt.icmp_type >= 0:
        fields += [f"TYPE={pkt.icmp_type}", f"CODE={pkt.icmp_code}"]
    return fields


def packet_event(
    data: bytes | bytearray | memoryview, meta: Meta, verdict: Verdict, copy_cap: int = 0
) -> dict[str, Any]:
    """The packet's fields with eve.json's names (what the line says, as values)."""
    return _event(decode(data, copy_cap), data, meta, verdict)


def _event(pkt: Packet, data: bytes | bytearray | memoryview, meta: Meta, verdict: Verdict) -> dict[str, Any]:
    event: dict[str, Any] = {}
    ip = len(pkt.src) in (4, 16)
    if ip:
        event["flow_id"] = flow_id(pkt)
        event["src_ip"] = str(ipaddress.ip_address(pkt.src))
    ports = ip and pkt.frag != FRAG_LATER and pkt.proto in (PROTO_TCP, PROTO_UDP) and (pkt.sport or pkt.dport)
    if ports:
        event["src_port"] = pkt.sport
    if ip:
        event["dest_ip"] = str(ipaddress.ip_address(pkt.dst))
    if ports:
        event["dest_port"] = pkt.dport
    if ip:
        event["proto"] = _PROTO_LABELS.get(pkt.proto, str(pkt.proto))
    event |= {
        "in_iface": meta.in_iface,
        "out_iface": meta.out_iface,
        "hook": meta.hook.name,
        "ct_state": verdict.ct.value.upper(),
        "action": verdict.action.value,
        "reason": verdict.reason,
        "rule": verdict.rule,
    }
    if not ip:
        event["ip_len"] = len(data)
        return event
    event |= {"ip_len": pkt.length or len(data), "ttl": pkt.ttl}
    if pkt.frag != FRAG_LATER:
        if ports and pkt.proto == PROTO_TCP:
            event["tcp_flags"] = ",".join(name for bit, name in _FLAGS if pkt.tcp_flags & bit) or "NONE"
        elif pkt.proto in (PROTO_ICMP, PROTO_ICMPV6) and pkt.icmp_type >= 0:
            event |= {"icmp_type": pkt.icmp_type, "icmp_code": pkt.icmp_code}
    if pkt.frag:
        event["frag"] = "first" if pkt.frag == FRAG_FIRST else "later"
    return event


def flow_id(pkt: Packet) -> int:
    """One number per flow, both directions alike: a hash of conntrack's flow key (addresses,
    ports or ICMP query identifier, protocol); packets without a flow key (ICMP errors, later
    fragments) hash their protocol and address pair."""
    found = flow_key(pkt) if pkt.frag != FRAG_LATER else None
    key = found[0] if found else bytes((pkt.proto,)) + min(pkt.src, pkt.dst) + max(pkt.src, pkt.dst)
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - FLOW_ID_BITS)


def limit_text(limit: LogLimit) -> str:
    period = _PERIODS.get(limit.period, f"{limit.period}s")
    return f"log-limit {limit.count}/{period}, log-limit-burst {limit.burst}"


def bucket_key(verdict: Verdict) -> str:
    """Which bucket a logged packet draws from: its rule, its default, or all INVALID ones."""
    return "invalid" if verdict.ct is Ct.INVALID else verdict.reason


# --- the rate-limited log ---------------------------------------------------------------------


class PacketLog:
    """Rate-limited packet lines. `now` is the adapter's monotonic clock (injected in tests)."""

    def __init__(
        self,
        limit: LogLimit = DEFAULT_LOG_LIMIT,
        *,
        emit: Emit | None = None,
        summary_interval: float = SUMMARY_INTERVAL,
        copy_cap: int = 0,
    ) -> None:
        self.limit = limit
        self.copy_cap = copy_cap  # the queue's copy range (nfqfw.kernel.queue_info.COPY_RANGE in the daemon)
        self.summary_interval = summary_interval
        self._emit = emit or _to_logger
        self._buckets: dict[str, TokenBucket] = {}
        self._held: Counter[str] = Counter()  # suppressed since the last summary, by bucket
        self._next_summary = float("-inf")
        self.lines = 0  # lines emitted since start (for the metrics)
        self.suppressed = 0  # lines suppressed since start

    def configure(self, limit: LogLimit) -> None:
        """A reloaded policy's limit: fresh (full) buckets when it changed."""
        if limit != self.limit:
            self.limit = limit
            self._buckets.clear()

    def log(self, data: bytes | bytearray | memoryview, meta: Meta, verdict: Verdict, now: float) -> None:
        """Called by the adapter for a packet whose verdict has `log` set, after the verdict."""
        key = bucket_key(verdict)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._buckets.clear()
            count, period, burst = self.limit
            bucket = self._buckets[key] = TokenBucket(count, period, burst, now)
        if not bucket.take(now):
            self._held[key] += 1
            self.suppressed += 1
            return
        self.lines += 1
        pkt = decode(data, self.copy_cap)
        self._emit(logging.INFO, _line(pkt, data, meta, verdict), _event(pkt, data, meta, verdict))

    def flush(self, now: float, force: bool = False) -> None:
        """Housekeeping: say how many lines were suppressed, at most once per summary_interval
        (force: now, e.g. at stop)."""
        if not self._held or (now < self._next_summary and not force):
            return
        held = self._held
        total = sum(held.values())
        parts = ", ".join(f"{key}: {count}" for key, count in sorted(held.items(), key=lambda kv: -kv[1]))
        noun = "line" if total == 1 else "lines"
        self._emit(
            logging.WARNING,
            f"{total} packet log {noun} suppressed ({parts}; {limit_text(self.limit)})",
            None,
        )
        held.clear()
        self._next_summary = now + self.summary_interval


def _to_logger(level: int, line: str, event: dict[str, Any] | None) -> None:
    log.log(level, "%s", line, extra=None if event is None else {EVENT_ATTRIBUTE: event})
