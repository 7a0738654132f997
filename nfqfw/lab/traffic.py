"""Real traffic inside the lab's namespaces: servers, clients, ping/nc/nmap, raw packets, captures.

Sockets are opened *inside* a namespace by switching only the calling thread into it for the
moment of the socket() call (setns(2) is per thread); a socket stays in the namespace it was
created in, so servers run as threads of this process and clients need no subprocess. Command
line tools (ping, nc, nmap) run under `ip netns exec`.

Crafted packets (bytes built with scapy or nfqfw.core.build by the caller) are sent through a raw
socket in the sending namespace, so the kernel routes them like any packet of that host.
Captures use an AF_PACKET socket on one interface and decode what they see with
nfqfw.core.decode.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import random
import re
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from nfqfw.core import build
from nfqfw.core.decode import decode
from nfqfw.core.packet import PROTO_TCP, Packet
from nfqfw.lab.plan import NETNS_DIR
from nfqfw.lab.topology import in_ns

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
CHUNK = 1 << 16

_libc = ctypes.CDLL(None, use_errno=True)


# --- namespaces ---------------------------------------------------------------------------------


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with the calling thread in network namespace `name` (other threads stay)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_DIR / name, os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def socket_in(name: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    with entered(name):
        return socket.socket(family, kind, proto)


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


# --- servers ------------------------------------------------------------------------------------

Handler = Callable[[socket.socket, str], None]


def greet_and_echo(conn: socket.socket, peer: str) -> None:
    """Say which address the connection came from, then echo until the client closes."""
    conn.sendall(f"hello {peer}\n".encode())
    while data := conn.recv(CHUNK):
        conn.sendall(data)


def hash_sink(conn: socket.socket, peer: str) -> None:
    """Read until the client shuts down its side; answer "<bytes> <sha256 hex>"."""
    digest, total = hashlib.sha256(), 0
    while data := conn.recv(1 << 20):
        digest.update(data)
        total += len(data)
    conn.sendall(f"{total} {digest.hexdigest()}\n".encode())


def pattern_source(conn: socket.socket, peer: str) -> None:
    """Read a line "<bytes> <seed>", send that many bytes of `pattern(bytes, seed)`, close."""
    request = _read_line(conn).split()
    for chunk in pattern(int(request[0]), int(request[1])):
        conn.sendall(chunk)


class TcpServer:
    """Listeners on `ports` (IPv4 and IPv6) in namespace `ns`, one thread per connection."""

    def __init__(self, ns: str, ports: Sequence[int], handler: Handler = greet_and_echo) -> None:
        self.handler = handler
        self.listeners: list[socket.socket] = []
        self._stop_r, self._stop_w = socket.socketpair()
        for port in ports:
            for family, any_address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                sock = socket_in(ns, family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((any_address, port))
                sock.listen(128)
                self.listeners.append(sock)
        self._thread = threading.Thread(target=self._serve, name=f"tcp-server-{ns}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            readable = select.select([*self.listeners, self._stop_r], [], [])[0]
            if self._stop_r in readable:
                return
            for listener in readable:
                conn, address = listener.accept()
                threading.Thread(target=self._handle, args=(conn, address[0]), daemon=True).start()

    def _handle(self, conn: socket.socket, peer: str) -> None:
        with conn, contextlib.suppress(OSError):
            self.handler(conn, peer)

    def close(self) -> None:
        self._stop_w.send(b"x")
        self._thread.join(timeout=5)
        for sock in (*self.listeners, self._stop_r, self._stop_w):
            sock.close()

    def __enter__(self) -> TcpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UdpEchoServer:
    """Answers every datagram on `ports` (IPv4 and IPv6) with "<peer address> <datagram>"."""

    def __init__(self, ns: str, ports: Sequence[int]) -> None:
        self.sockets: list[socket.socket] = []
        self._stop_r, self._stop_w = socket.socketpair()
        for port in ports:
            for family, any_address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                sock = socket_in(ns, family, socket.SOCK_DGRAM)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((any_address, port))
                self.sockets.append(sock)
        self._thread = threading.Thread(target=self._serve, name=f"udp-server-{ns}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            readable = select.select([*self.sockets, self._stop_r], [], [])[0]
            if self._stop_r in readable:
                return
            for sock in readable:
                with contextlib.suppress(OSError):
                    data, address = sock.recvfrom(65535)
                    sock.sendto(address[0].encode() + b" " + data, address)

    def close(self) -> None:
        self._stop_w.send(b"x")
        self._thread.join(timeout=5)
        for sock in (*self.sockets, self._stop_r, self._stop_w):
            sock.close()

    def __enter__(self) -> UdpEchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- clients ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """What a client saw: outcome is connected/reply, refused, unreachable or timeout."""

    outcome: str
    seconds: float
    text: str = ""  # the server's greeting or reply


def _outcome_of(err: OSError) -> str:
    if isinstance(err, ConnectionRefusedError):
        return "refused"
    if isinstance(err, TimeoutError):
        return "timeout"
    if err.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM):
        return "unreachable"
    raise err


def tcp_probe(ns: str, host: str, port: int, timeout: float = 2.0, source: str | None = None) -> Probe:
    """Connect from `ns` (from its address `source`, if given) and read the greeting line."""
    start = time.monotonic()
    with socket_in(ns, family_of(host), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        try:
            sock.connect((host, port))
            text = _read_line(sock)
        except OSError as err:
            return Probe(_outcome_of(err), time.monotonic() - start)
    return Probe("connected", time.monotonic() - start, text)


def udp_probe(ns: str, host: str, port: int, timeout: float = 2.0, payload: bytes = b"ping") -> Probe:
    """Send one datagram from `ns` on a connected socket (so ICMP errors are reported) and wait."""
    start = time.monotonic()
    with socket_in(ns, family_of(host), socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            sock.send(payload)
            text = sock.recv(65535).decode(errors="replace")
        except OSError as err:
            return Probe(_outcome_of(err), time.monotonic() - start)
    return Probe("reply", time.monotonic() - start, text)


# Path MTU socket options (linux/in.h, linux/in6.h); not all are exported by the socket module.
IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU = 10, 2, 14
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO, IPV6_MTU = 23, 2, 24


def udp_path_mtu(
    ns: str, host: str, port: int, size: int = 1400, timeout: float = 2.0, big_first: bool = False
) -> int:
    """The path MTU a UDP echo flow from `ns` learns after one datagram of `size` bytes sent with
    "don't fragment": after a small exchange, so the error comes back about an established flow,
    or (`big_first`) as the flow's very first packet, which never gets past the gateway.
    """
    family = family_of(host)
    level, discover, do, mtu = (
        (socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO, IPV6_MTU)
        if family == socket.AF_INET6
        else (socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU)
    )
    with socket_in(ns, family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.setsockopt(level, discover, do)
        sock.connect((host, port))
        if not big_first:
            sock.send(b"small")
            sock.recv(65535)
        with contextlib.suppress(OSError):  # EMSGSIZE if the MTU is known already
            sock.send(b"x" * size)
        deadline = time.monotonic() + timeout
        while sock.getsockopt(level, mtu) > size and time.monotonic() < deadline:
            time.sleep(0.02)
        return sock.getsockopt(level, mtu)


# Error queue (linux/errqueue.h, linux/in.h, linux/in6.h): not all exported by the socket module.
IP_RECVERR, IPV6_RECVERR, IPV6_UNICAST_HOPS = 11, 25, 16
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # errno, origin, ICMP type, code, pad, info, data
TRACEROUTE_PORT = 33434


@dataclass(frozen=True)
class Hop:
    """Who answered a traceroute probe: the address and the ICMP/ICMPv6 type of its error."""

    address: str
    icmp_type: int


def traceroute(
    ns: str, host: str, max_hops: int = 3, wait: float = 1.0, port: int = TRACEROUTE_PORT
) -> list[Hop | None]:
    """traceroute's default method from `ns`: a UDP probe with TTL (hop limit) 1, 2, ... each on
    a socket with IP_RECVERR, and the error it draws (time exceeded from a router on the way,
    port unreachable from `host`, which ends the trace); None for a hop that stayed silent."""
    family = family_of(host)
    v6 = family == socket.AF_INET6
    level = socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP
    hops: list[Hop | None] = []
    for ttl in range(1, max_hops + 1):
        with socket_in(ns, family, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(level, IPV6_RECVERR if v6 else IP_RECVERR, 1)
            sock.setsockopt(level, IPV6_UNICAST_HOPS if v6 else socket.IP_TTL, ttl)
            sock.sendto(b"traceroute probe", (host, port + ttl))
            hop = _probe_answer(sock, v6, wait)
        hops.append(hop)
        if hop is not None and hop.address == host:
            break
    return hops


def _probe_answer(sock: socket.socket, v6: bool, wait: float) -> Hop | None:
    if not select.select([sock], [], [], wait)[0]:
        return None
    _, ancillary, _, _ = sock.recvmsg(512, 512, socket.MSG_ERRQUEUE)
    for _level, _kind, data in ancillary:
        _errno, _origin, icmp_type, _code, _pad, _info, _data = _EXTENDED_ERR.unpack_from(data)
        offender = data[_EXTENDED_ERR.size :]  # a sockaddr_in / sockaddr_in6
        raw = offender[8:24] if v6 else offender[4:8]
        return Hop(socket.inet_ntop(socket.AF_INET6 if v6 else socket.AF_INET, raw), icmp_type)
    return None


def open_connection(ns: str, host: str, port: int, timeout: float = 5.0) -> tuple[socket.socket, str]:
    """A live TCP connection from `ns` to a greet_and_echo server, and its greeting line."""
    sock = socket_in(ns, family_of(host), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
        return sock, _read_line(sock)
    except BaseException:
        sock.close()
        raise


def echo_roundtrip(sock: socket.socket, data: bytes) -> bytes:
    """Send `data` on an echo connection and read the same number of bytes back."""
    sock.sendall(data)
    return read_exactly(sock, len(data))


def upload(
    ns: str, host: str, port: int, nbytes: int, seed: int = 1, timeout: float = 60.0
) -> tuple[str, str]:
    """Send `pattern(nbytes, seed)` to a hash_sink server; (sha256 sent, the server's answer line)."""
    digest = hashlib.sha256()
    with socket_in(ns, family_of(host), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        for chunk in pattern(nbytes, seed):
            digest.update(chunk)
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        answer = _read_line(sock)
    return f"{nbytes} {digest.hexdigest()}", answer


def download(
    ns: str, host: str, port: int, nbytes: int, seed: int = 2, timeout: float = 60.0
) -> tuple[str, str]:
    """Fetch `nbytes` from a pattern_source server; (expected "<bytes> <sha256>", received one)."""
    expected = hashlib.sha256()
    for chunk in pattern(nbytes, seed):
        expected.update(chunk)
    received, total = hashlib.sha256(), 0
    with socket_in(ns, family_of(host), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(f"{nbytes} {seed}\n".encode())
        while data := sock.recv(1 << 20):
            received.update(data)
            total += len(data)
    return f"{nbytes} {expected.hexdigest()}", f"{total} {received.hexdigest()}"


def pattern(nbytes: int, seed: int) -> Iterator[bytes]:
    """Deterministic pseudo-random bytes in 1 MiB chunks; each chunk starts with its number, so
    a chunk delivered twice or out of order changes the digest."""
    block = bytearray(random.Random(seed).randbytes(1 << 20))
    sent, number = 0, 0
    while sent < nbytes:
        block[:8] = number.to_bytes(8, "big")
        size = min(len(block), nbytes - sent)
        yield bytes(block[:size])
        sent += size
        number += 1


def _read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        more = sock.recv(4096)
        if not more:
            break
        data += more
    return data.decode(errors="replace").strip()


def read_exactly(sock: socket.socket, size: int) -> bytes:
    """`size` bytes from `sock`, fewer only when the peer closes first."""
    data = bytearray()
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            break
        data += more
    return bytes(data)


# --- command line tools -------------------------------------------------------------------------


def run(ns: str, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a tool inside `ns`; the completed process, whatever its exit code."""
    return subprocess.run(in_ns(ns, *argv), capture_output=True, text=True, timeout=timeout)


def ping(
    ns: str,
    host: str,
    count: int = 1,
    wait: float = 2.0,
    size: int | None = None,
    dont_fragment: bool = False,
    ttl: int | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = ["ping", "-n", "-c", str(count), "-W", f"{wait:g}", "-i", "0.2"]
    if size is not None:
        argv += ["-s", str(size)]
    if dont_fragment:
        argv += ["-M", "do"]
    if ttl is not None:
        argv += ["-t", str(ttl)]
    return run(ns, *argv, host, timeout=count * wait + 10)


def nc_probe(ns: str, host: str, port: int, wait: float = 2.0, udp: bool = False) -> bool:
    """`nc -z`: True when a TCP connection opens (for UDP: when no ICMP error comes back)."""
    argv = ["nc", "-n", "-z", "-w", f"{max(1, round(wait))}", *(["-u"] if udp else []), host, str(port)]
    return run(ns, *argv, timeout=wait + 10).returncode == 0


NMAP_PORT = re.compile(r"(\d+)/(\w+)/")
NMAP_IGNORED = re.compile(r"Ignored State: (\w+) \((\d+)\)")


@dataclass(frozen=True)
class Scan:
    """nmap's result for one host: the ports it lists and the state of all the others."""

    ports: dict[int, str]  # port -> open / closed / filtered ...
    ignored: tuple[str, int] | None  # (state, count) of the ports not listed, e.g. ("filtered", 1022)


def nmap_syn_scan(ns: str, host: str, ports: str = "1-1024") -> Scan:
    """`nmap -Pn -sS` from `ns`. Timing is tuned for a lab: an unanswered probe is retried twice
    after at most 0.5 s, instead of nmap slowing down for minutes on a host that drops."""
    argv = ["nmap", "-n", "-Pn", "-sS", "-T4", "--max-retries", "2", "--min-rate", "1000"]
    argv += ["--max-rtt-timeout", "500ms", "-p", ports, "-oG", "-", host]
    done = run(ns, *argv, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"nmap failed (exit {done.returncode}): {done.stderr.strip()}")
    found: dict[int, str] = {}
    ignored = None
    for line in done.stdout.splitlines():
        if line.startswith("Host:") and "Ports:" in line:
            ports_part = line.split("Ports:", 1)[1]
            for port, state in NMAP_PORT.findall(ports_part.split("Ignored State:", 1)[0]):
                found[int(port)] = state
            match = NMAP_IGNORED.search(ports_part)
            if match:
                ignored = (match.group(1), int(match.group(2)))
    return Scan(found, ignored)


# --- raw packets and captures -------------------------------------------------------------------


def tcp_packet(
    src: str, dst: str, sport: int, dport: int, flags: int, seq: int, ack: int = 0, window: int = 65535
) -> bytes:
    """A complete IPv4/IPv6 TCP packet (no options, no payload), e.g. a forged RST."""
    src_raw, dst_raw = build.addr(src), build.addr(dst)
    segment = build.tcp(src_raw, dst_raw, sport, dport, seq=seq, ack=ack, flags=flags, window=window)
    if len(src_raw) == 16:
        return build.ipv6(src_raw, dst_raw, PROTO_TCP, segment)
    return build.ipv4(src_raw, dst_raw, PROTO_TCP, segment)


def send_raw(ns: str, packet: bytes) -> None:
    """Send a complete IPv4 or IPv6 packet (header included) from `ns`; the kernel routes it."""
    version = packet[0] >> 4
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    # IPPROTO_RAW: we supply the IP header (for IPv6 too, on Linux).
    with socket_in(ns, family, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        if family == socket.AF_INET6:
            sock.sendto(packet, (socket.inet_ntop(family, packet[24:40]), 0))
        else:
            sock.sendto(packet, (socket.inet_ntop(family, packet[16:20]), 0))


@dataclass(frozen=True)
class Seen:
    """One IP packet seen on an interface."""

    outgoing: bool  # sent by this host (else received)
    packet: Packet  # decoded

    @property
    def src(self) -> str:
        return _ntop(self.packet.src)

    @property
    def dst(self) -> str:
        return _ntop(self.packet.dst)


def _ntop(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)


class Capture:
    """Every IP packet crossing `ifname` in `ns` from creation on (read them with `packets()`)."""

    def __init__(self, ns: str, ifname: str) -> None:
        self.sock = socket_in(ns, socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((ifname, ETH_P_ALL))
        self.sock.setblocking(False)
        self.seen: list[Seen] = []

    def packets(self, settle: float = 0.0) -> list[Seen]:
        """Everything captured so far, after waiting `settle` seconds for packets in flight."""
        if settle:
            time.sleep(settle)
        while True:
            try:
                data, address = self.sock.recvfrom(65535)
            except BlockingIOError:
                return list(self.seen)
            if address[1] in (0x0800, 0x86DD):  # the frame's EtherType: IPv4, IPv6
                self.seen.append(Seen(address[2] == PACKET_OUTGOING, decode(data)))

    def tcp(self, settle: float = 0.0, port: int | None = None) -> list[Seen]:
        """Captured TCP segments, optionally only those with `port` as source or destination."""
        return [
            seen
            for seen in self.packets(settle)
            if seen.packet.proto == socket.IPPROTO_TCP
            and port in (None, seen.packet.sport, seen.packet.dport)
        ]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
