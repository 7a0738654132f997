"""The kernel's connection tracking table over ctnetlink: list, delete, re-mark and create entries.

What nfqfw needs of the kernel's conntrack (nfqfw.service.offload): the connections it handed
over (`options: {offload: established}`) are found by their connection mark (a dump the kernel
filters by mark and mask), taken back by deleting them or clearing their offload bit, and the
flows restored from a snapshot after a reboot are entered so that the kernel knows them too.

The messages are built and parsed here with struct (linux/netfilter/nfnetlink_conntrack.h):
a table of tens of thousands of entries is read in well under a second, which a generic
netlink library does not do. Pure functions (`dump_request`, `parse_entries`, `tuple_attrs`,
...) are unit-tested on bytes; `Ctnetlink` sends them on a NETLINK_NETFILTER socket of the
network namespace the process runs in. Errors are CtnetlinkError, one line for the log.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
# enum ctattr_type, ctattr_tuple, ctattr_ip, ctattr_l4, ctattr_protoinfo(_tcp)
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO, CTA_TIMEOUT, CTA_MARK = 1, 2, 3, 4, 7, 8
CTA_ID, CTA_MARK_MASK = 12, 21
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE = 4, 5, 6
CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE = 7, 8, 9
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
IPS_SEEN_REPLY, IPS_ASSURED, IPS_CONFIRMED = 0x2, 0x4, 0x8
PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6 = 6, 17, 1, 58
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
RECV_SIZE = 1 << 20
BATCH = 256  # requests sent before their acknowledgements are read


class CtnetlinkError(Exception):
    """A ctnetlink request failed; str() is one line for the log."""


@dataclass(frozen=True, slots=True)
class CtEntry:
    """One kernel conntrack entry, its original direction (as `conntrack -L` shows it)."""

    family: int  # 4 or 6
    proto: int
    src: bytes
    dst: bytes
    sport: int = 0  # TCP/UDP ports; ICMP: 0
    dport: int = 0
    icmp: tuple[int, int, int] | None = None  # (type, code, id) of an ICMP/ICMPv6 flow
    status: int = 0  # IPS_* bits
    timeout: int = 0  # seconds left
    mark: int = 0
    tcp_state: int | None = None  # the kernel's enum tcp_conntrack (nfqfw's TcpState numbers)
    ident: int | None = None  # CTA_ID
    # The reply tuple's source: where the original direction really goes after a DNAT (without
    # NAT: dst, dport). The filter hooks see (src, sport) -> (reply_src, reply_sport).
    reply_src: bytes = b""
    reply_sport: int = 0

    @property
    def seen_as(self) -> tuple[bytes, int, bytes, int]:
        """(src, sport, dst, dport) of the original direction as the filter hooks see it."""
        if not self.reply_src:
            return self.src, self.sport, self.dst, self.dport
        return self.src, self.sport, self.reply_src, self.reply_sport if self.icmp is None else 0

    @property
    def replied(self) -> bool:
        return bool(self.status & IPS_SEEN_REPLY)

    @property
    def assured(self) -> bool:
        return bool(self.status & IPS_ASSURED)


# --- pure: messages ---------------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    size = _NLA.size + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def message(kind: int, flags: int, family: int, body: bytes, seq: int = 0) -> bytes:
    """An nfnetlink message of ctnetlink: header, nfgenmsg (`family` as AF_*), attributes."""
    payload = _NFGENMSG.pack(family, 0, 0) + body
    return (
        _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), NFNL_SUBSYS_CTNETLINK << 8 | kind, flags, seq, 0)
        + payload
    )


def tuple_attrs(entry: CtEntry, reply: bool = False) -> bytes:
    """CTA_TUPLE_ORIG (or, `reply`, CTA_TUPLE_REPLY: the same turned round) of `entry`."""
    src, dst, sport, dport = (
        (entry.dst, entry.src, entry.dport, entry.sport)
        if reply
        else (
            entry.src,
            entry.dst,
            entry.sport,
            entry.dport,
        )
    )
    v4 = entry.family == 4
    ip = nested(
        CTA_TUPLE_IP,
        attr(CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC, src),
        attr(CTA_IP_V4_DST if v4 else CTA_IP_V6_DST, dst),
    )
    l4 = [attr(CTA_PROTO_NUM, bytes([entry.proto]))]
    if entry.icmp is not None:
        kind, code, ident = entry.icmp
        if reply:
            kind = _ICMP_REPLY_TYPE.get((entry.proto, kind), kind)
        first = CTA_PROTO_ICMP_ID if entry.proto == PROTO_ICMP else CTA_PROTO_ICMPV6_ID
        l4 += [attr(first, _U16.pack(ident)), attr(first + 1, bytes([kind])), attr(first + 2, bytes([code]))]
    else:
        l4 += [attr(CTA_PROTO_SRC_PORT, _U16.pack(sport)), attr(CTA_PROTO_DST_PORT, _U16.pack(dport))]
    return nested(CTA_TUPLE_REPLY if reply else CTA_TUPLE_ORIG, ip, nested(CTA_TUPLE_PROTO, *l4))


_ICMP_REPLY_TYPE = {(PROTO_ICMP, 8): 0, (PROTO_ICMP, 13): 14, (PROTO_ICMP, 15): 16, (PROTO_ICMP, 17): 18}
_ICMP_REPLY_TYPE |= {(PROTO_ICMPV6, 128): 129, (PROTO_ICMPV6, 139): 140}


def dump_request(mark: int, mask: int, seq: int = 1) -> bytes:
    """Dump every entry (both families) whose mark has `mark` under `mask` (filtered by the kernel)."""
    body = attr(CTA_MARK, _U32.pack(mark)) + attr(CTA_MARK_MASK, _U32.pack(mask))
    return message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, socket.AF_UNSPEC, body, seq)


def delete_request(entry: CtEntry, seq: int = 0) -> bytes:
    return message(
        IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, FAMILIES[entry.family], tuple_attrs(entry), seq
    )


def remark_request(entry: CtEntry, mark: int, mask: int, seq: int = 0) -> bytes:
    """Set the bits `mask` of the entry's mark to `mark`'s (the others are kept)."""
    body = tuple_attrs(entry) + attr(CTA_MARK, _U32.pack(mark & mask)) + attr(CTA_MARK_MASK, _U32.pack(mask))
    return message(IPCTNL_MSG_CT_NEW, NLM_F_REQUEST | NLM_F_ACK, FAMILIES[entry.family], body, seq)


def create_request(entry: CtEntry, seq: int = 0) -> bytes:
    """A new entry (refused if one exists): both tuples, status, timeout, mark, TCP state."""
    body = tuple_attrs(entry) + tuple_attrs(entry, reply=True)
    # CONFIRMED as the kernel has it for a created entry: a status without it is refused (EBUSY)
    body += attr(CTA_STATUS, _U32.pack(entry.status & (IPS_SEEN_REPLY | IPS_ASSURED) | IPS_CONFIRMED))
    body += attr(CTA_TIMEOUT, _U32.pack(max(1, entry.timeout)))
    body += attr(CTA_MARK, _U32.pack(entry.mark))
    if entry.tcp_state is not None:
        body += nested(
            CTA_PROTOINFO, nested(CTA_PROTOINFO_TCP, attr(CTA_PROTOINFO_TCP_STATE, bytes([entry.tcp_state])))
        )
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return message(IPCTNL_MSG_CT_NEW, flags, FAMILIES[entry.family], body, seq)


def attributes(data: bytes | memoryview, start: int = 0, end: int | None = None) -> dict[int, memoryview]:
    """The attributes in data[start:end], by type (flags masked off)."""
    view = memoryview(data)
    end = len(view) if end is None else end
    found: dict[int, memoryview] = {}
    while start + 4 <= end:
        size, kind = _NLA.unpack_from(view, start)
        if size < 4:
            break
        found[kind & NLA_TYPE_MASK] = view[start + 4 : start + size]
        start += (size + 3) & ~3
    return found


def parse_entry(body: memoryview) -> CtEntry | None:
    """A CTA_* attribute set (after the nfgenmsg) as a CtEntry; None if it lacks its tuple."""
    attrs = attributes(body)
    orig = attrs.get(CTA_TUPLE_ORIG)
    if orig is None:
        return None
    tup = attributes(orig)
    ip, l4 = attributes(tup.get(CTA_TUPLE_IP, b"")), attributes(tup.get(CTA_TUPLE_PROTO, b""))
    reply_src, reply_sport = b"", 0
    if CTA_TUPLE_REPLY in attrs:
        back = attributes(attrs[CTA_TUPLE_REPLY])
        back_ip, back_l4 = attributes(back.get(CTA_TUPLE_IP, b"")), attributes(back.get(CTA_TUPLE_PROTO, b""))
        reply_src = bytes(back_ip.get(CTA_IP_V4_SRC, back_ip.get(CTA_IP_V6_SRC, b"")))
        if CTA_PROTO_SRC_PORT in back_l4:
            reply_sport = _U16.unpack(back_l4[CTA_PROTO_SRC_PORT])[0]
    if CTA_IP_V4_SRC in ip:
        family, src, dst = 4, bytes(ip[CTA_IP_V4_SRC]), bytes(ip.get(CTA_IP_V4_DST, b""))
    elif CTA_IP_V6_SRC in ip:
        family, src, dst = 6, bytes(ip[CTA_IP_V6_SRC]), bytes(ip.get(CTA_IP_V6_DST, b""))
    else:
        return None
    proto = l4[CTA_PROTO_NUM][0] if CTA_PROTO_NUM in l4 else 0
    sport = dport = 0
    icmp = None
    if CTA_PROTO_SRC_PORT in l4:
        sport, dport = _U16.unpack(l4[CTA_PROTO_SRC_PORT])[0], _U16.unpack(l4[CTA_PROTO_DST_PORT])[0]
    for first in (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMPV6_ID):
        if first in l4:
            icmp = (l4[first + 1][0], l4[first + 2][0], _U16.unpack(l4[first])[0])
    tcp_state = None
    if CTA_PROTOINFO in attrs:
        tcp = attributes(attributes(attrs[CTA_PROTOINFO]).get(CTA_PROTOINFO_TCP, b""))
        if CTA_PROTOINFO_TCP_STATE in tcp:
            tcp_state = tcp[CTA_PROTOINFO_TCP_STATE][0]

    def u32(kind: int) -> int:
        value = attrs.get(kind)
        return _U32.unpack(value)[0] if value is not None else 0

    ident = u32(CTA_ID) if CTA_ID in attrs else None
    return CtEntry(
        family,
        proto,
        src,
        dst,
        sport,
        dport,
        icmp,
        u32(CTA_STATUS),
        u32(CTA_TIMEOUT),
        u32(CTA_MARK),
        tcp_state,
        ident,
        reply_src,
        reply_sport,
    )


def parse_messages(data: bytes) -> Iterator[tuple[int, int, memoryview]]:
    """(type, seq, payload after the netlink header) of each message in a datagram."""
    view = memoryview(data)
    offset = 0
    while offset + _NLMSGHDR.size <= len(view):
        size, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(view, offset)
        if size < _NLMSGHDR.size:
            break
        yield kind, seq, view[offset + _NLMSGHDR.size : offset + size]
        offset += (size + 3) & ~3


def error_code(payload: memoryview) -> int:
    """The (positive) errno of an NLMSG_ERROR payload, 0 for an acknowledgement."""
    return -struct.unpack_from("=i", payload)[0]


# --- the socket -------------------------------------------------------------------------------


class Ctnetlink:
    """A ctnetlink socket in this process's network namespace (needs CAP_NET_ADMIN)."""

    def __init__(self) -> None:
        try:
            self.sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
            )
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_SIZE)
            self.sock.bind((0, 0))
        except OSError as err:
            raise CtnetlinkError(f"cannot open a ctnetlink socket: {err.strerror or err}") from err
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Ctnetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = self._seq % 0x7FFFFFFF + 1
        return self._seq

    def dump(self, mark: int = 0, mask: int = 0) -> Iterator[CtEntry]:
        """Every entry whose mark has `mark` under `mask` (0, 0: all), read as the kernel sends them."""
        seq = self._next_seq()
        try:
            self.sock.send(dump_request(mark, mask, seq))
            while True:
                data = self.sock.recv(RECV_SIZE)
                for kind, got, payload in parse_messages(data):
                    if got != seq:
                        continue
                    if kind == NLMSG_DONE:
                        return
                    if kind == NLMSG_ERROR:
                        code = error_code(payload)
                        if code:
                            raise CtnetlinkError(f"conntrack dump failed: {os.strerror(code)}")
                        continue
                    entry = parse_entry(payload[_NFGENMSG.size :])
                    if entry is not None:
                        yield entry
        except OSError as err:
            raise CtnetlinkError(f"conntrack dump failed: {err.strerror or err}") from err

    def delete(self, entries: Iterable[CtEntry]) -> int:
        """Delete these entries; returns how many were there (gone already is no error)."""
        return self._batch((delete_request(e, self._next_seq()) for e in entries), ok_errors=(errno.ENOENT,))

    def remark(self, entries: Iterable[CtEntry], mark: int, mask: int) -> int:
        """Set the `mask` bits of these entries' marks to `mark`'s; returns how many were changed."""
        return self._batch(
            (remark_request(e, mark, mask, self._next_seq()) for e in entries), ok_errors=(errno.ENOENT,)
        )

    def create(self, entries: Iterable[CtEntry]) -> int:
        """Enter these entries, unless the kernel has them already; returns how many were new."""
        return self._batch((create_request(e, self._next_seq()) for e in entries), ok_errors=(errno.EEXIST,))

    def _batch(self, requests: Iterable[bytes], ok_errors: tuple[int, ...]) -> int:
        """Send the requests BATCH at a time, read their acknowledgements; the count of those
        that succeeded (an error in `ok_errors` is not counted, others raise)."""
        done = 0
        pending: list[bytes] = []
        try:
            for request in requests:
                pending.append(request)
                if len(pending) == BATCH:
                    done += self._send_batch(pending, ok_errors)
                    pending = []
            if pending:
                done += self._send_batch(pending, ok_errors)
        except OSError as err:
            raise CtnetlinkError(f"conntrack request failed: {err.strerror or err}") from err
        return done

    def _send_batch(self, requests: list[bytes], ok_errors: tuple[int, ...]) -> int:
        for request in requests:
            self.sock.send(request)
        wanted = {_NLMSGHDR.unpack_from(request)[3] for request in requests}
        done = 0
        failure = None
        while wanted:
            for kind, seq, payload in parse_messages(self.sock.recv(RECV_SIZE)):
                if kind != NLMSG_ERROR or seq not in wanted:
                    continue
                wanted.discard(seq)
                code = error_code(payload)
                if code == 0:
                    done += 1
                elif code not in ok_errors and failure is None:
                    failure = code
        if failure is not None:
            raise CtnetlinkError(f"conntrack request failed: {os.strerror(failure)}")
        return done
