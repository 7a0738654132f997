"""`nfqfw explain --config FILE --in IFACE PROTO SRC[:PORT] DST[:PORT]`: what would the policy
do with this one packet, and why?

Builds the packet with `nfqfw.core.build`, gives it what the kernel would tell the live daemon
(nfqfw.core.offline: a forward's translation, the hook, the output interface from the zones'
networks unless --out names it), runs it through a fresh engine (so conntrack has seen nothing
before it) and prints the translation, the zones, the verdict, the conntrack state and what
decided, and the source NAT the kernel would then apply. A rule is shown as the policy means it
(ports as numbers, with their service names), with where it is written, its comment, and which
of its sets the packet's addresses are in. Runtime set entries (nfqfw set add) are the running
daemon's: explain sees the policy's files only. An ICMP error quotes the packet `--quoting`
describes, e.g. the gateway's own time exceeded about a traceroute probe: `--hook output icmp
10.0.0.1 10.0.0.25 --icmp-type time-exceeded --quoting udp 10.0.0.25:40000 203.0.113.10:33434`.
"""

from __future__ import annotations

import argparse
import ipaddress
import struct
import sys
from typing import Any

from nfqfw.commands import EXIT_FAILURE, EXIT_OK, add_json_option, print_json
from nfqfw.commands.replay import load_compiled
from nfqfw.core import build
from nfqfw.core.config import ICMP_TYPES, SIDES
from nfqfw.core.engine import Engine
from nfqfw.core.forwards import FORWARD_REASON
from nfqfw.core.l4.icmp import ICMP_ERRORS
from nfqfw.core.offline import Arrival, OfflineGateway, source_nat
from nfqfw.core.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.verdict import Action, Hook, Verdict

TCP_FLAG_LETTERS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20, "E": 0x40, "C": 0x80}
PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6")
HOOKS = {"input": Hook.INPUT, "forward": Hook.FORWARD, "output": Hook.OUTPUT}
DEFAULT_SPORT = 40000
ECHO_ID_SEQ = (1, 1)


class ExplainError(Exception):
    """The packet described on the command line cannot be built."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="show the verdict for one packet",
        description="Build one packet and show what a fresh engine decides about it and why. "
        "Addresses: 192.0.2.1:80, [2001:db8::1]:80 or a bare address.",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="policy file (YAML)")
    parser.add_argument(
        "--in", dest="in_iface", required=True, metavar="IFACE", help="interface it arrives on"
    )
    parser.add_argument(
        "--out",
        dest="out_iface",
        metavar="IFACE",
        help="interface it leaves by (default: routed by the zones' networks)",
    )
    parser.add_argument("proto", choices=PROTOCOLS, metavar="PROTO", help="tcp, udp, icmp or icmpv6")
    parser.add_argument("src", metavar="SRC[:PORT]")
    parser.add_argument("dst", metavar="DST[:PORT]")
    parser.add_argument("--flags", default="S", help="TCP flags from S A F R P U E C (default S)")
    parser.add_argument("--icmp-type", default="echo-request", metavar="NAME|N", help="default echo-request")
    parser.add_argument("--icmp-code", type=int, default=0, metavar="N", help="default 0")
    parser.add_argument(
        "--quoting",
        nargs=3,
        metavar=("PROTO", "SRC[:PORT]", "DST[:PORT]"),
        help="an ICMP error's quoted packet (needed for error types), built like the packet itself",
    )
    parser.add_argument("--hook", choices=tuple(HOOKS), help="default: from the policy's gateway-addresses")
    add_json_option(
        parser,
        "the verdict (verdict, conntrack, decided_by, why, reject_with, hook, forwarded, zones, source_nat)",
    )
    parser.set_defaults(func=run)


def parse_endpoint(text: str) -> tuple[bytes, int | None]:
    """'10.0.0.1:80', '[fd00::1]:80', 'fd00::1' or '10.0.0.1' -> (raw address, port or None)."""
    host, port = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ExplainError(f"bad address '{text}'")
        port = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        raw = build.addr(host)
    except OSError:
        raise ExplainError(f"bad address '{host}'") from None
    if port is None:
        return raw, None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ExplainError(f"bad port '{port}'")
    return raw, int(port)


def tcp_flags(letters: str) -> int:
    flags = 0
    for letter in letters.upper():
        if letter not in TCP_FLAG_LETTERS:
            raise ExplainError(f"unknown TCP flag '{letter}' (use S A F R P U E C)")
        flags |= TCP_FLAG_LETTERS[letter]
    return flags


def icmp_type(text: str, family: int) -> int:
    if text.isdigit() and int(text) <= 255:
        return int(text)
    if text not in ICMP_TYPES:
        raise ExplainError(f"unknown ICMP type '{text}'")
    number = ICMP_TYPES[text][0 if family == 4 else 1]
    if number is None:
        raise ExplainError(f"ICMP type '{text}' does not exist for IPv{family}")
    return number


def build_packet(args: argparse.Namespace) -> bytes:
    packet = _packet(args.proto, args.src, args.dst, args.flags, args.icmp_type, args.icmp_code, args.quoting)
    if args.quoting is not None and not _is_error(packet):
        raise ExplainError("--quoting is for ICMP errors (e.g. --icmp-type time-exceeded)")
    return packet


def _packet(
    proto: str, src_text: str, dst_text: str, flags: str, type_text: str, code: int, quoting: list[str] | None
) -> bytes:
    src, sport = parse_endpoint(src_text)
    dst, dport = parse_endpoint(dst_text)
    if len(src) != len(dst):
        raise ExplainError("source and destination are of different IP families")
    family = 4 if len(src) == 4 else 6
    if proto in ("tcp", "udp"):
        if dport is None:
            raise ExplainError(f"{proto} needs a destination port (DST:PORT)")
        sport = DEFAULT_SPORT if sport is None else sport
        if proto == "tcp":
            bits = tcp_flags(flags)
            segment = build.tcp(src, dst, sport, dport, seq=1000, ack=1 if bits & 0x10 else 0, flags=bits)
            return _ip(src, dst, PROTO_TCP, segment)
        return _ip(src, dst, PROTO_UDP, build.udp(src, dst, sport, dport))
    if proto == "icmpv6" and family == 4:
        raise ExplainError("icmpv6 needs IPv6 addresses")
    if proto not in PROTOCOLS:
        raise ExplainError(f"unknown protocol '{proto}' (use {', '.join(PROTOCOLS)})")
    type_ = icmp_type(type_text, family)
    if not 0 <= code <= 255:
        raise ExplainError(f"bad ICMP code {code}")
    rest = struct.pack("!HH", *ECHO_ID_SEQ)
    if (type_ in ICMP_ERRORS) if family == 4 else (type_ < 128):
        if quoting is None:
            raise ExplainError("an ICMP error quotes a packet: give it with --quoting PROTO SRC DST")
        quoted = _packet(*quoting, "S", "echo-request", 0, None)  # a SYN, an echo request
        if quoted[0] >> 4 != family:
            raise ExplainError("the quoted packet is of another IP family")
        rest = bytes(4) + quoted
    if family == 4:
        return _ip(src, dst, PROTO_ICMP, build.icmp(type_, code, rest[:4], rest[4:]))
    return _ip(src, dst, PROTO_ICMPV6, build.icmpv6(src, dst, type_, code, rest))


def _is_error(packet: bytes) -> bool:
    if packet[0] >> 4 == 4:
        return packet[9] == PROTO_ICMP and packet[20] in ICMP_ERRORS
    return packet[6] == PROTO_ICMPV6 and packet[40] < 128


def _ip(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    return build.ipv4(src, dst, proto, payload) if len(src) == 4 else build.ipv6(src, dst, proto, payload)


def decided_by(verdict: Verdict) -> str:
    if verdict.reason.startswith(FORWARD_REASON):
        return verdict.reason
    if verdict.rule is not None:
        return f"rule {verdict.rule}"
    if verdict.reason.startswith("default "):
        return verdict.reason
    return f"conntrack ({verdict.ct.value})"


def explained(verdict: Verdict) -> dict[str, str | None]:
    return {
        "verdict": verdict.action.value,
        "conntrack": verdict.ct.value,
        "decided_by": decided_by(verdict),
        "why": verdict.reason,
        "reject_with": verdict.reject_with,
    }


def endpoint(raw: bytes, port: int) -> str:
    host = str(ipaddress.ip_address(raw))
    return f"{host}:{port}" if len(raw) == 4 else f"[{host}]:{port}"


def translation(arrival: Arrival) -> dict[str, str] | None:
    """The forward that translated the packet and where to ("10.0.0.25:25"), None when none did."""
    if arrival.forward is None or arrival.public is None:
        return None
    port = arrival.forward.translated_port(arrival.public[1])
    found = {
        "by": arrival.forward.name,
        "from": endpoint(*arrival.public),
        "to": endpoint(arrival.forward.to, port),
    }
    if arrival.forward.config.comment:
        found["comment"] = arrival.forward.config.comment
    return found


def zones(policy: CompiledPolicy, arrival: Arrival) -> dict[str, str]:
    meta = arrival.meta
    source, target = policy.zones.pair(meta.hook, meta.in_iface, meta.out_iface)
    return {"from": source, "to": target, "side": policy.zones.side(meta.hook, meta.in_iface, meta.out_iface)}


def then_source_nat(policy: CompiledPolicy, arrival: Arrival, verdict: Verdict) -> str | None:
    """What the kernel's source NAT would do with an accepted connection, in words."""
    if verdict.action is not Action.ACCEPT or arrival.meta.hook is Hook.INPUT:
        return None
    forward = arrival.forward
    if (
        forward is not None
        and forward.config.hairpin
        and arrival.meta.in_iface not in forward.config.in_ifaces
    ):
        return f"masquerade to the address of {arrival.meta.out_iface} (hairpin of forward {forward.name})"
    src = arrival.data[12:16] if arrival.data[0] >> 4 == 4 else arrival.data[8:24]
    entry = source_nat(policy, src, arrival.meta.out_iface)
    if entry is None:
        return None
    at = f"line {entry.line}" if entry.file is None else f"{entry.file}:{entry.line}"
    if entry.to is None:
        return f"masquerade to the address of {arrival.meta.out_iface} ({at})"
    return f"snat to {entry.to} ({at})"


def rule_details(policy: CompiledPolicy, name: str, packet: bytes) -> dict[str, Any] | None:
    """The rule that decided: where it is, what it matches (as numbers), its comment, and the sets
    of its from/to that hold the packet's addresses."""
    from nfqfw.core.decode import decode
    from nfqfw.core.diff import describe_rule

    config = policy.config
    rule = next((r for side in SIDES for r in config.rules(side) if r.name == name), None)
    if rule is None:
        return None
    pkt = decode(packet)
    matched = [
        f"{word} {ipaddress.ip_address(raw)} in @{set_name}"
        for word, addresses, raw in (("from", rule.src, pkt.src), ("to", rule.dst, pkt.dst))
        if addresses is not None
        for set_name in addresses.sets
        if policy.sets[set_name].contains(raw)
    ]
    return {
        "name": rule.name,
        "at": f"{rule.file or config.filename}:{rule.line}",
        "match": describe_rule(rule),
        "comment": rule.comment,
        "sets": matched,
    }


def report(
    verdict: Verdict, extra: dict[str, object] | None = None, rule: dict[str, Any] | None = None
) -> str:
    extra = extra or {}
    lines = []
    forwarded = extra.get("forwarded")
    if isinstance(forwarded, dict):
        comment = f" ({forwarded['comment']})" if forwarded.get("comment") else ""
        lines.append(f"forwarded to {forwarded['to']} by forward {forwarded['by']}{comment}")
    where = extra.get("zones")
    if isinstance(where, dict):
        lines.append(f"zones: {where['from']} -> {where['to']} ({where['side']})")
    lines += [f"{key.replace('_', ' ')}: {value}" for key, value in explained(verdict).items() if value]
    if rule is not None:
        lines.append(f"rule: {rule['name']} ({rule['at']}): {rule['match']}")
        lines += [f"  {found}" for found in rule["sets"]]
        if rule["comment"]:
            lines.append(f"comment: {rule['comment']}")
    if extra.get("source_nat"):
        lines.append(f"then source NAT: {extra['source_nat']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    policy = load_compiled(args.config)
    if policy is None:
        return EXIT_FAILURE
    try:
        packet = build_packet(args)
    except (ExplainError, ValueError) as err:
        print(f"nfqfw explain: {err}", file=sys.stderr)
        return EXIT_FAILURE
    hook = HOOKS[args.hook] if args.hook else None
    arrival = OfflineGateway(policy).arrive(packet, args.in_iface, hook, args.out_iface)
    verdict = Engine(policy).process(arrival.data, arrival.meta, now=0.0)
    extra = {
        "forwarded": translation(arrival),
        "zones": zones(policy, arrival),
        "source_nat": then_source_nat(policy, arrival, verdict),
    }
    rule = None if verdict.rule is None else rule_details(policy, verdict.rule, arrival.data)
    if args.json:
        print_json({**explained(verdict), "hook": arrival.meta.hook.name, **extra, "rule": rule})
    else:
        print(report(verdict, extra, rule))
    return EXIT_OK
