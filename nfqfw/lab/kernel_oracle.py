"""The kernel as the reference: what Linux conntrack plus an iptables ruleset do with a packet.

A lab of its own (the usual three namespaces, built WITHOUT masquerade so addresses stay as
sent) whose gateway runs no nfqfw: its FORWARD path is the kernel's conntrack and the
iptables/ip6tables rules the caller gives. `KernelOracle.judge()` sends one crafted IP packet
into the gateway from one side and says what the kernel did with it::

      {P}wan  eth0 ------ wan0  {P}gw  lan0 ------ eth0  {P}lan
     injects and sniffs    conntrack + iptables     injects and sniffs

- The end hosts only inject and sniff. Their own stacks must never answer (a host's RST would
  change the gateway's conntrack state), so their iptables drop every packet in and out, and
  the gateway reaches them through permanent neighbour entries (no ARP or ND to answer).
  Packets are injected as Ethernet frames to the gateway's MAC through an AF_PACKET socket on
  the host's eth0, a path without netfilter; sniffing is an AF_PACKET socket too.
- After each packet the same side sends a sentinel: an IPv4 UDP datagram to port 9 that the
  gateway does not track (raw-table notrack) and lets through first in FORWARD. Once the
  sentinel comes out on the far side the packet's fate is decided: this thread is pinned to one
  CPU, and the kernel handles what one CPU queued in order.
- The outcome: "accept" if the packet came out on the far side; "reject" if a TCP RST or an
  ICMP error about it came back to the sender; else "drop". The fragments of one datagram are
  judged together (the kernel reassembles them before conntrack and forwards all or none).
  With it, the FORWARD rule that decided (whose packet counter moved), which tells the
  conntrack state the kernel gave the packet when the rules match on --ctstate.
- A packet socket in the gateway (all interfaces, kernel timestamps) records the packets as
  they arrived there: `arrivals` is the capture to replay through nfqfw.
- The gateway's own packets: a packet it answers itself before FORWARD (TTL expired, too big
  for the next link) draws an ICMP error that leaves through OUTPUT. Its OUTPUT chain only
  counts, by conntrack state, so that every such error leaves (and its state is known from the
  counter that moved); `judge(..., own=True)` adds the error, as it left, to the Judgement and
  to `arrivals` (the OUTPUT hook's packets for nfqfw).

UDP port 9 over IPv4 is the sentinel's: packets judged must not use it.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pyroute2 import NetNS

from nfqfw.core import build
from nfqfw.core.decode import decode
from nfqfw.core.packet import PROTO_TCP, PROTO_UDP, RST
from nfqfw.lab import traffic
from nfqfw.lab.plan import GW_LAN_V4, GW_LAN_V6, GW_WAN_V4, GW_WAN_V6, LabError, Topology
from nfqfw.lab.topology import build as build_topology
from nfqfw.lab.topology import run_in, sysctl, teardown

DEFAULT_PREFIX = "nfqk-"
ETH_P_ALL = 0x0003
IPPROTO_FRAGMENT = 44
ETHERTYPE = {4: 0x0800, 6: 0x86DD}
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35  # asm-generic/socket.h (x86, arm, ...); not exported by Python's socket module
SENTINEL_PORT = 9
SENTINEL_RULE = f"-p udp --dport {SENTINEL_PORT} -m conntrack --ctstate UNTRACKED -j ACCEPT"
SENTINEL_WAIT = 10.0  # seconds; generous, the machine may be loaded
SOCKET_BUFFER = 4 << 20

# The kernel's conntrack as nfqfw models it: strict TCP pick-up (only a SYN starts a flow) and
# full window tracking; and every ICMP error the gateway owes sent (no rate limit per host).
GATEWAY_SYSCTLS = (
    "net.netfilter.nf_conntrack_tcp_loose=0",
    "net.netfilter.nf_conntrack_tcp_be_liberal=0",
    "net.ipv4.icmp_ratelimit=0",
    "net.ipv6.icmp.ratelimit=0",
)
HOST_LOCKDOWN = "*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT DROP [0:0]\nCOMMIT\n"
# The gateway's OUTPUT chain: counters by conntrack state, no verdict (see the module docstring).
OUTPUT_STATES = ("established", "related", "invalid", "new", "untracked")
OUTPUT_RULES = tuple(f"-m conntrack --ctstate {state.upper()}" for state in OUTPUT_STATES)
GATEWAY_ADDRESSES = frozenset(build.addr(a) for a in (GW_WAN_V4, GW_WAN_V6, GW_LAN_V4, GW_LAN_V6))


@dataclass(frozen=True)
class Host:
    """An end host: its namespace, the gateway interface facing it, its IPv4 address."""

    ns: str
    gw_iface: str  # the gateway's interface towards this host
    v4: str  # the address sentinels use


@dataclass(frozen=True)
class OwnPacket:
    """A packet the gateway sent itself (an ICMP error), as it left, and the conntrack state the
    kernel gave it on OUTPUT (one of OUTPUT_STATES)."""

    ip: bytes
    ct: str


@dataclass(frozen=True)
class Judgement:
    """What the kernel did with a packet, and which FORWARD rule decided: one of the rules given
    to build_kernel_gateway (as given), "policy" (the chain's policy) or "none" (the packet
    never reached the FORWARD chain); with judge(own=True), the gateway's own answer to it."""

    outcome: str  # accept, drop, reject or partial (fragments: some came out, not all)
    rule: str
    own: OwnPacket | None = None


@dataclass(frozen=True)
class Arrival:
    """A judged packet as the gateway received it: kernel timestamp, interface, Ethernet frame."""

    timestamp: float
    iface: str
    frame: bytes


def forward_chain(forward: Sequence[str], family: int) -> list[str]:
    """The FORWARD rules installed: the sentinel's first (IPv4), then `forward`."""
    return ([SENTINEL_RULE] if family == 4 else []) + list(forward)


def ruleset(forward: Sequence[str], family: int) -> str:
    """iptables-restore input: the sentinel untracked (IPv4), FORWARD policy DROP, its rules;
    OUTPUT's counters by conntrack state."""
    lines = []
    if family == 4:
        lines += ["*raw", f"-A PREROUTING -p udp --dport {SENTINEL_PORT} -j CT --notrack", "COMMIT"]
    lines += ["*filter", ":FORWARD DROP [0:0]"]
    lines += [f"-A FORWARD {rule}" for rule in forward_chain(forward, family)]
    lines += [f"-A OUTPUT {rule}" for rule in OUTPUT_RULES]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def chain_counters(ns: str, family: int) -> dict[str, list[int]]:
    """Per chain of the filter table: packets counted by its policy, then by each rule in order."""
    tool = "iptables" if family == 4 else "ip6tables"
    chains: dict[str, list[int]] = {}
    counts: list[int] = []
    for line in run_in(ns, tool, "-w", "-L", "-v", "-x", "-n").splitlines():
        head = re.match(r"Chain (\S+) \(policy \w+ (\d+) packets", line)
        if head is not None:
            counts = chains[head.group(1)] = [int(head.group(2))]
        elif line.startswith("Chain "):
            counts = []  # a chain of our own (none here): not counted
        elif line.strip() and line.split()[0].isdigit():
            counts.append(int(line.split()[0]))
    if "FORWARD" not in chains or "OUTPUT" not in chains:
        raise LabError(f"unexpected {tool} -L output: chains {sorted(chains)}")
    return chains


def mac_of(ns: str, ifname: str) -> str:
    with NetNS(ns) as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
        return str(link.get_attr("IFLA_ADDRESS"))


def restore(ns: str, tool: str, text: str) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, tool, "-w"], input=text, capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0:
        raise LabError(f"in {ns}: {tool} failed: {done.stderr.strip()}")


def build_kernel_gateway(
    prefix: str,
    forward_v4: Sequence[str],
    forward_v6: Sequence[str],
    neighbours: dict[str, Sequence[str]],
) -> Topology:
    """The lab without NAT, the gateway filtering with the kernel's conntrack and these FORWARD
    rules, both hosts locked down. `neighbours` maps "wan"/"lan" to the addresses the gateway
    reaches through that host (permanent entries). Tears down what it built if a step fails."""
    topology = Topology(prefix)
    teardown(topology)  # a lab left over from an interrupted run
    build_topology(topology, nat=False)
    try:
        sysctl(topology.gw, *GATEWAY_SYSCTLS)
        restore(topology.gw, "iptables-restore", ruleset(forward_v4, 4))
        restore(topology.gw, "ip6tables-restore", ruleset(forward_v6, 6))
        for side, addresses in neighbours.items():
            ns, gw_iface = (topology.wan, "wan0") if side == "wan" else (topology.lan, "lan0")
            mac = mac_of(ns, "eth0")
            for address in addresses:
                run_in(topology.gw, "ip", "neigh", "replace", address, "lladdr", mac,
                       "dev", gw_iface, "nud", "permanent")  # fmt: skip
            restore(ns, "iptables-restore", HOST_LOCKDOWN)
            restore(ns, "ip6tables-restore", HOST_LOCKDOWN)
    except BaseException:
        teardown(topology)
        raise
    return topology


# --- packets ------------------------------------------------------------------------------------


def ip_of(frame: bytes) -> bytes | None:
    """The IP packet in an Ethernet frame (without link padding), or None."""
    if len(frame) < 34:
        return None
    ethertype = int.from_bytes(frame[12:14], "big")
    ip = frame[14:]
    if ethertype == 0x0800 and ip[0] >> 4 == 4:
        return ip[: int.from_bytes(ip[2:4], "big")]
    if ethertype == 0x86DD and ip[0] >> 4 == 6 and len(ip) >= 40:
        return ip[: 40 + int.from_bytes(ip[4:6], "big")]
    return None


def identity(ip: bytes) -> bytes:
    """The packet without what forwarding changes: TTL / hop limit, the IPv4 header checksum, and
    the identification of an IPv6 fragment header right after the fixed header (the kernel sends
    a reassembled datagram on in fragments of the same sizes, but under an identification of its
    own)."""
    if ip[0] >> 4 == 4:
        return ip[:8] + b"\0\0\0\0" + ip[12:]
    if ip[6] == IPPROTO_FRAGMENT and len(ip) >= 48:
        return ip[:7] + b"\0" + ip[8:44] + b"\0\0\0\0" + ip[48:]
    return ip[:7] + b"\0" + ip[8:]


def marker(ip: bytes) -> int:
    """IPv4 identification or IPv6 flow label: what tells crafted packets apart."""
    if ip[0] >> 4 == 4:
        return int.from_bytes(ip[4:6], "big")
    return int.from_bytes(ip[1:4], "big") & 0xFFFFF


def answers(reply: bytes, sent: bytes) -> bool:
    """True if `reply` refuses `sent`: a TCP RST on the reversed tuple, or an ICMP/ICMPv6 error
    quoting its header (same addresses and marker)."""
    pkt, orig = decode(reply), decode(sent)
    if pkt.malformed is not None or orig.malformed is not None:
        return False
    if pkt.proto == PROTO_TCP == orig.proto:
        return bool(
            pkt.tcp_flags & RST
            and (pkt.src, pkt.dst, pkt.sport, pkt.dport) == (orig.dst, orig.src, orig.dport, orig.sport)
        )
    inner = pkt.inner
    if inner is None or (inner.src, inner.dst) != (orig.src, orig.dst):
        return False
    quoted = reply[pkt.l4_offset + 8 :]
    return len(quoted) >= 4 and marker(quoted) == marker(sent)


# --- the oracle ---------------------------------------------------------------------------------


class _Port:
    """An AF_PACKET socket on a host's eth0: sends frames to the gateway, reads incoming ones."""

    def __init__(self, host: Host, gw_ns: str) -> None:
        self.host = host
        self.sock = traffic.socket_in(host.ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        self.sock.bind(("eth0", ETH_P_ALL))
        self.sock.setblocking(False)
        self.own_mac = bytes.fromhex(mac_of(host.ns, "eth0").replace(":", ""))
        self.gw_mac = bytes.fromhex(mac_of(gw_ns, host.gw_iface).replace(":", ""))
        self.sent: set[bytes] = set()  # what we injected: the only packets that may leave the host

    def send(self, ip: bytes) -> None:
        self.sent.add(ip)
        self.sock.send(self.gw_mac + self.own_mac + ETHERTYPE[ip[0] >> 4].to_bytes(2, "big") + ip)

    def incoming(self) -> list[bytes]:
        """The IP packets received since the last call. Raises LabError if the host's own stack
        sent anything: it must stay silent, or it would change the gateway's conntrack state."""
        packets = []
        while True:
            try:
                frame, address = self.sock.recvfrom(65535)
            except BlockingIOError:
                return packets
            ip = ip_of(frame)
            if address[2] != PACKET_OUTGOING:
                if ip is not None:
                    packets.append(ip)
            elif ip not in self.sent:
                raise LabError(f"the stack of {self.host.ns} sent a packet of its own: {frame.hex()}")

    def close(self) -> None:
        self.sock.close()


class KernelOracle:
    """Judges packets one at a time on a gateway built by `build_kernel_gateway` (use as a context
    manager: it pins this thread to one CPU and restores its affinity on exit)."""

    def __init__(
        self,
        topology: Topology,
        forward_v4: Sequence[str],
        forward_v6: Sequence[str],
        wan_v4: str,
        lan_v4: str,
    ) -> None:
        self.topology = topology
        self.rules = {4: forward_chain(forward_v4, 4), 6: forward_chain(forward_v6, 6)}
        self._counters: dict[int, dict[str, list[int]]] = {}
        self.hosts = {
            "wan": Host(topology.wan, "wan0", wan_v4),
            "lan": Host(topology.lan, "lan0", lan_v4),
        }
        self.arrivals: list[Arrival] = []
        self._ports: dict[str, _Port] = {}
        self._tap: socket.socket | None = None
        self._affinity: set[int] | None = None
        self._sentinels = 0

    def __enter__(self) -> KernelOracle:
        try:
            self._affinity = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {min(self._affinity)})
            for side, host in self.hosts.items():
                self._ports[side] = _Port(host, self.topology.gw)
            tap = traffic.socket_in(
                self.topology.gw, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)
            )
            self._tap = tap
            tap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            tap.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            tap.setblocking(False)
            for family in (4, 6):
                self._counters[family] = chain_counters(self.topology.gw, family)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for port in self._ports.values():
            port.close()
        self._ports.clear()
        if self._tap is not None:
            self._tap.close()
            self._tap = None
        if self._affinity is not None:
            os.sched_setaffinity(0, self._affinity)
            self._affinity = None

    def sysctl(self, *assignments: str) -> None:
        """Change the gateway's settings between packets, e.g. net.netfilter.nf_conntrack_tcp_loose=1."""
        sysctl(self.topology.gw, *assignments)

    def limit_route_mtu(self, address: str, iface: str, mtu: int) -> None:
        """Route `address` out of `iface` with a path MTU of `mtu` (locked: forwarding honours
        it for IPv6 too), so bigger packets to it get frag-needed / packet-too-big."""
        run_in(self.topology.gw, "ip", "route", "replace", address, "dev", iface, "mtu", "lock", str(mtu))

    def take_arrivals(self) -> list[Arrival]:
        """The packets judged since the last call, as the gateway received them."""
        taken, self.arrivals = self.arrivals, []
        return taken

    def judge(self, side: str, packets: Sequence[bytes], own: bool = False) -> Judgement:
        """Send `packets` (one, or the fragments of one datagram) into the gateway from `side`
        ("wan" or "lan"), then ask what the kernel did: "accept" if all came out on the far side,
        "partial" if only some did, "reject" if the sender got an RST / ICMP error about one
        of them, else "drop"; and which FORWARD rule decided. `own`: the gateway answers the
        packet itself, with exactly one ICMP error (which the Judgement and `arrivals` get)."""
        far_side = "lan" if side == "wan" else "wan"
        sender, far = self._ports[side], self._ports[far_side]
        sender.incoming()  # forget whatever came before
        far.incoming()
        sentinel = self._sentinel(side, far_side)
        for ip in packets:
            sender.send(ip)
        sender.send(sentinel)
        wanted = {identity(ip) for ip in packets}
        came_out = self._came_out(far, wanted, identity(sentinel))
        sent_by_gateway = self._record_arrivals(packets, own)
        rule, output = self._rule_hit(packets[0][0] >> 4)
        answer = None
        if own:
            if len(sent_by_gateway) != 1 or len(output) != 1:
                raise LabError(
                    f"the gateway sent {len(sent_by_gateway)} packets of its own, OUTPUT counted {output}"
                )
            answer = OwnPacket(sent_by_gateway[0], output[0])
        if came_out == wanted:
            return Judgement("accept", rule, answer)
        if came_out:
            return Judgement("partial", rule, answer)
        if any(answers(reply, ip) for reply in sender.incoming() for ip in packets):
            return Judgement("reject", rule, answer)
        return Judgement("drop", rule, answer)

    def _rule_hit(self, family: int) -> tuple[str, list[str]]:
        """The FORWARD rule (or "policy") whose packet counter moved since the last look, "none"
        if none did (the sentinel's own rule, always hit, is left out); and the conntrack states
        whose OUTPUT counters moved."""
        before = self._counters.get(family)
        after = self._counters[family] = chain_counters(self.topology.gw, family)
        if before is None:
            raise LabError("rule counters were not read before the first packet")
        names = ["policy", *self.rules[family]]
        moved = [
            name
            for name, old, new in zip(names, before["FORWARD"], after["FORWARD"], strict=True)
            if new != old
        ]
        moved = [name for name in moved if name != SENTINEL_RULE]
        if len(moved) > 1:
            raise LabError(f"one packet moved the counters of several FORWARD rules: {moved}")
        states = ["policy", *OUTPUT_STATES]
        output = [
            state
            for state, old, new in zip(states, before["OUTPUT"], after["OUTPUT"], strict=True)
            if new != old
        ]
        return (moved[0] if moved else "none"), [state for state in output if state != "policy"]

    def _sentinel(self, side: str, far_side: str) -> bytes:
        self._sentinels += 1
        src, dst = build.addr(self.hosts[side].v4), build.addr(self.hosts[far_side].v4)
        payload = b"nfqfw sentinel %d" % self._sentinels
        return build.ipv4(src, dst, PROTO_UDP, build.udp(src, dst, SENTINEL_PORT, SENTINEL_PORT, payload))

    def _came_out(self, far: _Port, wanted: set[bytes], sentinel: bytes) -> set[bytes]:
        """Read the far side until the sentinel comes out; which of `wanted` came out before it."""
        seen: set[bytes] = set()
        deadline = time.monotonic() + SENTINEL_WAIT
        while True:
            for ip in far.incoming():
                got = identity(ip)
                if got == sentinel:
                    return seen
                if got in wanted:
                    seen.add(got)
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"the sentinel did not come out on {far.host.ns} within {SENTINEL_WAIT:g} s")
            select.select([far.sock], [], [], left)

    def _record_arrivals(self, packets: Sequence[bytes], own: bool = False) -> list[bytes]:
        """Move the gateway's copies of `packets` from the tap to `arrivals`: each exactly once,
        in the order sent, or LabError. With `own`, the packets the gateway sent from its own
        addresses follow them there (as they left, on their way out); returned in order.

        Matched by identity, and the packet recorded as sent: a packet socket's copy shares its
        buffer with the packet, and the kernel rewrites held fragments in place when it forwards
        the reassembled datagram (what we read later has the outgoing TTL, checksum and IPv6
        fragment identification).
        """
        assert self._tap is not None
        wanted = [identity(ip) for ip in packets]
        found, sent_by_gateway = [], []
        while True:
            try:
                frame, ancillary, _flags, address = self._tap.recvmsg(65535, socket.CMSG_SPACE(16))
            except BlockingIOError:
                break
            ip = ip_of(frame)
            if ip is None:
                continue
            if address[2] != PACKET_OUTGOING and identity(ip) in wanted:
                sent = packets[wanted.index(identity(ip))]
                found.append(Arrival(_timestamp(ancillary), address[0], frame[:14] + sent))
            elif address[2] == PACKET_OUTGOING and own and decode(ip).src in GATEWAY_ADDRESSES:
                sent_by_gateway.append(Arrival(_timestamp(ancillary), address[0], frame[:14] + ip))
        if [arrival.frame[14:] for arrival in found] != list(packets):
            raise LabError(
                f"the gateway received {len(found)} of the {len(packets)} packets sent, or not in order"
            )
        self.arrivals += found + sent_by_gateway
        return [arrival.frame[14:] for arrival in sent_by_gateway]


def _timestamp(ancillary: list[tuple[int, int, bytes]]) -> float:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return seconds + nanoseconds / 1e9
    raise LabError("a packet captured on the gateway carries no timestamp")


@contextlib.contextmanager
def kernel_gateway(
    forward_v4: Sequence[str],
    forward_v6: Sequence[str],
    neighbours: dict[str, Sequence[str]],
    wan_v4: str,
    lan_v4: str,
    prefix: str = DEFAULT_PREFIX,
) -> Iterator[KernelOracle]:
    """Build the kernel gateway, yield its KernelOracle, always tear everything down."""
    topology = build_kernel_gateway(prefix, forward_v4, forward_v6, neighbours)
    try:
        with KernelOracle(topology, forward_v4, forward_v6, wan_v4, lan_v4) as oracle:
            yield oracle
    finally:
        teardown(topology)
