"""What the kernel tells the live daemon about a packet, worked out for the offline tools
(`explain`, `replay`) from the packet and the policy.

The live daemon gets each packet at its hook, with its interfaces, already translated by the
forwards (nat PREROUTING) and marked so (Meta.forwarded). Offline, a packet is taken as it arrived
at the gateway on an interface (a capture on the external interface shows the public address):

- the forwards translate it as the kernel's DNAT would: a first packet (a TCP SYN, any UDP
  datagram) that matches a forward's public side is rewritten to the inside address and port
  (checksums adjusted), and so is every later packet of that connection; the replies are
  rewritten back, whichever side the capture shows them on (from the inside host: as they are;
  from the public address: to the inside host's), so that the engine tracks one flow, as it does
  live;
- the hook follows from the policy's gateway-addresses (to the gateway INPUT, from it OUTPUT,
  else FORWARD), after translation;
- the output interface, unless given, is routed by the zones' networks (the first interface of
  the zone whose networks hold the destination; none for INPUT).

Not modelled: source NAT (masquerade, snat and hairpin's), which the kernel applies after nfqfw
decides; fragments of translated datagrams; IPv6 extension headers before TCP/UDP (such packets
are not translated).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

from nfqfw.core.config import SourceNatConfig
from nfqfw.core.forwards import Forward
from nfqfw.core.packet import PROTO_TCP, PROTO_UDP, Packet
from nfqfw.core.policy import CompiledPolicy, InterfaceMatcher
from nfqfw.core.verdict import Hook, Meta

FLOW_MEMORY = 1 << 20  # translated connections remembered (a replay of a huge capture forgets the oldest)
_SYN, _ACK = 0x02, 0x10
_PORTS = struct.Struct("!HH")


class Arrival(NamedTuple):
    """A packet as the live daemon would get it: its bytes (translated), its Meta, the forward
    that translated its connection and the destination before (None when not translated)."""

    data: bytes
    meta: Meta
    forward: Forward | None = None
    public: tuple[bytes, int] | None = None


class _Header(NamedTuple):
    family: int
    proto: int
    src: bytes
    dst: bytes
    l4: int  # offset of the TCP/UDP header, 0 when there is none to translate
    sport: int
    dport: int
    flags: int


Key = tuple[int, bytes, int, bytes, int]  # proto, src, sport, dst, dport


class OfflineGateway:
    """The kernel's part for the offline tools (see the module docstring); one per run."""

    def __init__(self, policy: CompiledPolicy) -> None:
        self.policy = policy
        self.gateway = policy.gateway_addresses
        self.forwards = policy.forwards
        self.routes = any(policy.config.networks(zone) for zone in policy.config.zones)
        # original-direction key -> (inside address, inside port, the forward)
        self._translated: dict[Key, tuple[bytes, int, Forward]] = {}
        self._metas: dict[tuple[object, ...], Meta] = {}
        self._route_cache: dict[bytes, str | None] = {}

    def arrive(
        self, data: bytes, in_iface: str | None, hook: Hook | None = None, out_iface: str | None = None
    ) -> Arrival:
        """The packet `data` arriving on `in_iface` (hook and out interface derived unless given)."""
        if not (self.gateway or self.forwards or self.routes):
            return Arrival(data, self._meta(hook or Hook.FORWARD, in_iface, out_iface, False))
        header = _peek(data)
        forward = public = None
        if header is not None and self.forwards and header.l4:
            data, header, forward, public = self._translate(data, header, in_iface, hook)
        if hook is None:
            hook = self._hook(header)
        if out_iface is None and hook is not Hook.INPUT and header is not None and self.routes:
            out_iface = self._route(header.dst)
        meta = self._meta(hook, in_iface if hook is not Hook.OUTPUT else None, out_iface, forward is not None)
        return Arrival(data, meta, forward, public)

    # -- the forwards ----------------------------------------------------------------------

    def _translate(
        self, data: bytes, header: _Header, in_iface: str | None, hook: Hook | None
    ) -> tuple[bytes, _Header, Forward | None, tuple[bytes, int] | None]:
        key = (header.proto, header.src, header.sport, header.dst, header.dport)
        known = self._translated.get(key)
        if known is not None:  # a later packet of a translated connection
            to, to_port, forward = known
            return (
                _rewrite(data, header, dst=(to, to_port)),
                header._replace(dst=to, dport=to_port),
                forward,
                (
                    header.dst,
                    header.dport,
                ),
            )
        reply = (header.proto, header.dst, header.dport, header.src, header.sport)
        known = self._translated.get(reply)
        if known is not None:  # a reply as the outside sees it: from the public address
            to, to_port, _ = known
            return (
                _rewrite(data, header, src=(to, to_port)),
                header._replace(src=to, sport=to_port),
                None,
                None,
            )
        if header.proto == PROTO_TCP and header.flags & (_SYN | _ACK) != _SYN:
            return data, header, None, None  # the kernel translates the first packet of a connection
        to_gateway = header.dst in self.gateway or hook is Hook.INPUT
        forward = self.forwards.public(_packet(header), to_gateway, in_iface)
        if forward is None:
            return data, header, None, None
        to_port = forward.translated_port(header.dport)
        if len(self._translated) >= FLOW_MEMORY:
            del self._translated[next(iter(self._translated))]
        self._translated[key] = (forward.to, to_port, forward)
        translated = header._replace(dst=forward.to, dport=to_port)
        return (
            _rewrite(data, header, dst=(forward.to, to_port)),
            translated,
            forward,
            (header.dst, header.dport),
        )

    # -- hook, route, Meta -----------------------------------------------------------------

    def _hook(self, header: _Header | None) -> Hook:
        if header is None or not self.gateway:
            return Hook.FORWARD
        if header.dst in self.gateway:
            return Hook.INPUT
        if header.src in self.gateway:
            return Hook.OUTPUT
        return Hook.FORWARD

    def _route(self, address: bytes) -> str | None:
        cache = self._route_cache
        if address in cache:
            return cache[address]
        zone = self.policy.zones.route(address)
        iface = None if zone is None else self.policy.zones.interface_of(zone)
        if len(cache) < 65536:
            cache[address] = iface
        return iface

    def _meta(self, hook: Hook, in_iface: str | None, out_iface: str | None, forwarded: bool) -> Meta:
        key = (hook, in_iface, out_iface, forwarded)
        meta = self._metas.get(key)
        if meta is None:
            meta = self._metas[key] = Meta(hook, in_iface, out_iface, forwarded=forwarded)
        return meta


def _peek(data: bytes) -> _Header | None:
    """The addresses, protocol and ports of an IP packet, by slicing (replay reads every packet)."""
    if len(data) < 20:
        return None
    version = data[0] >> 4
    if version == 4:
        ihl = (data[0] & 0x0F) * 4
        proto, src, dst = data[9], data[12:16], data[16:20]
        fragment = int.from_bytes(data[6:8], "big") & 0x3FFF  # MF or an offset
        l4 = ihl if proto in (PROTO_TCP, PROTO_UDP) and not fragment and ihl >= 20 else 0
        family = 4
    elif version == 6 and len(data) >= 40:
        proto, src, dst = data[6], data[8:24], data[24:40]
        l4 = 40 if proto in (PROTO_TCP, PROTO_UDP) else 0
        family = 6
    else:
        return None
    if l4 and len(data) >= l4 + (14 if proto == PROTO_TCP else 8):
        sport, dport = _PORTS.unpack_from(data, l4)
        flags = data[l4 + 13] if proto == PROTO_TCP else 0
        return _Header(family, proto, bytes(src), bytes(dst), l4, sport, dport, flags)
    return _Header(family, proto, bytes(src), bytes(dst), 0, 0, 0, 0)


def _packet(header: _Header) -> Packet:
    """The fields a forward lookup reads."""
    pkt = Packet()
    pkt.family, pkt.proto, pkt.src, pkt.dst = header.family, header.proto, header.src, header.dst
    pkt.sport, pkt.dport = header.sport, header.dport
    return pkt


def _rewrite(
    data: bytes,
    header: _Header,
    src: tuple[bytes, int] | None = None,
    dst: tuple[bytes, int] | None = None,
) -> bytes:
    """`data` with its source or destination address and port replaced, the IPv4 header checksum
    and the TCP/UDP checksum adjusted (RFC 1624); a UDP/IPv4 datagram without a checksum keeps none."""
    out = bytearray(data)
    size = 4 if header.family == 4 else 16
    base = 12 if header.family == 4 else 8
    l4 = header.l4
    check_at = l4 + (16 if header.proto == PROTO_TCP else 6)
    old_l4_check = int.from_bytes(out[check_at : check_at + 2], "big") if len(out) >= check_at + 2 else None
    changes: list[tuple[bytes, bytes]] = []  # (old, new) 16-bit-aligned pieces the L4 checksum covers
    for which, replacement in ((0, src), (1, dst)):
        if replacement is None:
            continue
        address, port = replacement
        at = base + which * size
        changes.append((bytes(out[at : at + size]), address))
        out[at : at + size] = address
        port_at = l4 + 2 * which
        changes.append((bytes(out[port_at : port_at + 2]), port.to_bytes(2, "big")))
        out[port_at : port_at + 2] = port.to_bytes(2, "big")
        if header.family == 4:
            old = int.from_bytes(out[10:12], "big")
            out[10:12] = _adjusted(old, changes[-2][0], address).to_bytes(2, "big")
    if old_l4_check is not None and not (
        header.proto == PROTO_UDP and header.family == 4 and old_l4_check == 0
    ):
        check = old_l4_check
        for old, new in changes:
            check = _adjusted(check, old, new)
        if header.proto == PROTO_UDP and check == 0:
            check = 0xFFFF
        out[check_at : check_at + 2] = check.to_bytes(2, "big")
    return bytes(out)


def _adjusted(check: int, old: bytes, new: bytes) -> int:
    """The Internet checksum `check` after the 16-bit words `old` became `new` (RFC 1624, eqn. 3)."""
    total = ~check & 0xFFFF
    for at in range(0, len(old), 2):
        total += (~int.from_bytes(old[at : at + 2], "big") & 0xFFFF) + int.from_bytes(new[at : at + 2], "big")
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def source_nat(policy: CompiledPolicy, src: bytes, out_iface: str | None) -> SourceNatConfig | None:
    """The masquerade or snat entry the kernel applies to a connection from `src` leaving by
    `out_iface` (the first in file order, as the kernel's rules are), None for none. A set in
    `from` holds what the policy's set holds (and its runtime entries, as its ipset does)."""
    if policy.config.nat is None or out_iface is None:
        return None
    address = ipaddress.ip_address(src)
    for entry in policy.config.nat.source_entries():
        if entry.family != address.version or out_iface not in InterfaceMatcher(entry.out_ifaces):
            continue
        if entry.src is None or any(address in network for network in entry.src):
            return entry
        if any(policy.sets[name].contains(src) for name in entry.sets):
            return entry
    return None
