"""The kernel's ipsets nfqfw's pre-filter and nat table match (`-m set --match-set`), over netlink.

A set of the policy used by a drop or reject rule of the pre-filter, or in a nat entry's `from`,
becomes one `hash:net` ipset per family (both uses share it), `nfqfw4-NAME` / `nfqfw6-NAME`,
created with timeout support (entries without a timeout stay, runtime entries with one expire in
the kernel as in nfqfw). Filling one is atomic for the rules that use it: a temporary set
`nfqft4-NAME` is created and filled, then swapped with the real one (the rules hold the real
one's index, which now has the new contents) and destroyed. Sets are made before the iptables
rules that use them and destroyed after the rules that used them are gone (a referenced set
cannot be destroyed).

Why netlink and not the `ipset` tool: the messages are a few attributes (ip_set.h), the entries
go in batches (IPSET_ATTR_ADT: ~1,300 per message, a 100,000-network set in ~80 messages, where
one message per entry takes ~0.3 ms), and nothing beyond the kernel is needed. Encoding is pure
(`encode_*`) and unit-tested byte for byte; `NetlinkIpsets` sends and reads the acknowledgements.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_IPSET = 6
PROTOCOL = 6  # IPSET_PROTOCOL_MIN: every kernel with ipset speaks it
# commands (linux/netfilter/ipset/ip_set.h)
CMD_CREATE, CMD_DESTROY, CMD_FLUSH, CMD_SWAP, CMD_LIST, CMD_ADD, CMD_DEL, CMD_TYPE = 2, 3, 4, 6, 7, 9, 10, 13
# command-level attributes
ATTR_PROTOCOL, ATTR_SETNAME, ATTR_TYPENAME, ATTR_REVISION, ATTR_FAMILY = 1, 2, 3, 4, 5
ATTR_FLAGS, ATTR_DATA, ATTR_ADT, ATTR_LINENO = 6, 7, 8, 9
ATTR_SETNAME2 = ATTR_TYPENAME
# data attributes
ATTR_IP, ATTR_CIDR, ATTR_TIMEOUT, ATTR_HASHSIZE, ATTR_MAXELEM = 1, 3, 6, 18, 19
ATTR_IPADDR = {4: 1, 6: 2}  # IPSET_ATTR_IPADDR_IPV4 / _IPV6
NFPROTO = {4: 2, 6: 10}
FLAG_LIST_SETNAME = 1 << 1
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TYPE = "hash:net"
PREFIX, TEMP_PREFIX = "nfqfw", "nfqft"  # nfqfw4-NAME, nfqft4-NAME (at most 31 characters)
MAX_PAYLOAD = 32 * 1024  # bytes of entries per ADD message
MIN_MAXELEM = 65536  # the kernel's default; a bigger set gets twice its size
# ipset's own error numbers (ip_set.h), for the messages
IPSET_ERRORS = {
    4097: "protocol error",
    4098: "the kernel lacks the set type",
    4099: "too many sets",
    4100: "set in use",
    4101: "set name already in use",
    4102: "set types differ",
    4103: "element already added",
    4104: "invalid timeout",
}


def set_name(name: str, family: int, temporary: bool = False) -> str:
    """The ipset of policy set `name` for `family` (IPv4 and IPv6 live in separate ipsets)."""
    return f"{TEMP_PREFIX if temporary else PREFIX}{family}-{name}"


def is_ours(ipset: str) -> bool:
    return ipset.startswith((f"{PREFIX}4-", f"{PREFIX}6-", f"{TEMP_PREFIX}4-", f"{TEMP_PREFIX}6-"))


@dataclass(frozen=True)
class Entry:
    """One element: a network (address bytes, prefix length) with a timeout in seconds (None:
    the set's default, which is none)."""

    address: bytes
    cidr: int
    timeout: int | None = None

    @classmethod
    def of(cls, cidr_text: str, timeout: float | None = None) -> list[Entry]:
        """A CIDR as entries: hash:net takes prefixes 1-32 / 1-128, so /0 is its two halves."""
        network = ipaddress.ip_network(cidr_text)
        seconds = None if timeout is None else max(1, int(timeout))
        if network.prefixlen == 0:
            return [cls(half.network_address.packed, 1, seconds) for half in network.subnets(1)]
        return [cls(network.network_address.packed, network.prefixlen, seconds)]


# --- encoding (pure) ----------------------------------------------------------------------------


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _u8(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("B", value))


def _u32_net(kind: int, value: int) -> bytes:
    return _attr(kind | NLA_F_NET_BYTEORDER, struct.pack("!I", value))


def _text(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _nested(kind: int, *parts: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(parts))


def message(command: int, flags: int, seq: int, *attrs: bytes) -> bytes:
    """nlmsghdr + nfgenmsg (AF_INET, version 0, res_id 0) + the attributes."""
    body = struct.pack("=BBH", socket.AF_INET, 0, 0) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), NFNL_SUBSYS_IPSET << 8 | command, flags, seq, 0) + body


def encode_entry(entry: Entry) -> bytes:
    family = 4 if len(entry.address) == 4 else 6
    parts = [
        _nested(ATTR_IP, _attr(ATTR_IPADDR[family] | NLA_F_NET_BYTEORDER, entry.address)),
        _u8(ATTR_CIDR, entry.cidr),
    ]
    if entry.timeout is not None:
        parts.append(_u32_net(ATTR_TIMEOUT, entry.timeout))
    return _nested(ATTR_DATA, *parts)


def encode_create(name: str, family: int, revision: int, maxelem: int, seq: int) -> bytes:
    data = _nested(ATTR_DATA, _u32_net(ATTR_TIMEOUT, 0), _u32_net(ATTR_MAXELEM, maxelem))
    return message(
        CMD_CREATE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        _u8(ATTR_PROTOCOL, PROTOCOL),
        _text(ATTR_SETNAME, name),
        _text(ATTR_TYPENAME, TYPE),
        _u8(ATTR_REVISION, revision),
        _u8(ATTR_FAMILY, NFPROTO[family]),
        data,
    )


def encode_adds(name: str, entries: Iterable[Entry], seq: int, command: int = CMD_ADD) -> Iterator[bytes]:
    """ADD (or DEL) messages of as many entries as fit MAX_PAYLOAD each."""
    batch: list[bytes] = []
    size = 0
    for entry in entries:
        encoded = encode_entry(entry)
        if batch and size + len(encoded) > MAX_PAYLOAD:
            yield _adt(name, batch, seq, command)
            seq += 1
            batch, size = [], 0
        batch.append(encoded)
        size += len(encoded)
    if batch:
        yield _adt(name, batch, seq, command)


def _adt(name: str, batch: list[bytes], seq: int, command: int) -> bytes:
    return message(
        command,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        _u8(ATTR_PROTOCOL, PROTOCOL),
        _text(ATTR_SETNAME, name),
        _nested(ATTR_ADT, *batch),
        _attr(ATTR_LINENO, struct.pack("=I", 0)),  # the kernel wants one with a batch (errors name it)
    )


def encode_named(command: int, seq: int, *names: str) -> bytes:
    """DESTROY / FLUSH (one name) or SWAP (two)."""
    attrs = [_u8(ATTR_PROTOCOL, PROTOCOL), _text(ATTR_SETNAME, names[0])]
    if len(names) > 1:
        attrs.append(_text(ATTR_SETNAME2, names[1]))
    return message(command, NLM_F_REQUEST | NLM_F_ACK, seq, *attrs)


def encode_type(family: int, seq: int) -> bytes:
    return message(
        CMD_TYPE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        _u8(ATTR_PROTOCOL, PROTOCOL),
        _text(ATTR_TYPENAME, TYPE),
        _u8(ATTR_FAMILY, NFPROTO[family]),
    )


def encode_list_names(seq: int) -> bytes:
    return message(
        CMD_LIST,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        _u8(ATTR_PROTOCOL, PROTOCOL),
        _u32_net(ATTR_FLAGS, FLAG_LIST_SETNAME),
    )


def attributes(payload: bytes) -> Iterator[tuple[int, bytes]]:
    """(type without flags, payload) of each attribute."""
    offset = 0
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            return
        yield kind & ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER), payload[offset + 4 : offset + length]
        offset += (length + 3) & ~3


# --- the socket ----------------------------------------------------------------------------------


class IpsetError(OSError):
    """A netlink request failed: errno (the kernel's) and the set concerned."""


class NetlinkIpsets:
    """hash:net ipsets of the network namespace it is made in, over one netlink socket."""

    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        self._sock.bind((0, 0))
        self._sock.settimeout(10.0)
        self._seq = 0
        self._revision: dict[int, int] = {}

    def close(self) -> None:
        self._sock.close()

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _exchange(self, data: bytes, what: str) -> list[bytes]:
        """Send one request and read until its ack (or the end of a dump); the payloads of the
        answers (without their headers)."""
        self._sock.send(data)
        seq = struct.unpack_from("=I", data, 8)[0]
        answers = []
        while True:
            reply = self._sock.recv(1 << 20)
            offset = 0
            while offset + 16 <= len(reply):
                length, kind, _flags, got_seq, _pid = struct.unpack_from("=IHHII", reply, offset)
                body = reply[offset + 16 : offset + length]
                offset += (length + 3) & ~3
                if got_seq != seq:
                    continue
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code:
                        why = IPSET_ERRORS.get(code) or os.strerror(code)
                        raise IpsetError(code, f"ipset {what}: {why}")
                    return answers
                if kind == NLMSG_DONE:
                    return answers
                answers.append(body[4:])  # after the nfgenmsg

    def revision(self, family: int) -> int:
        """The newest hash:net revision the kernel has (timeouts need one, every kernel has them)."""
        if family not in self._revision:
            (payload,) = self._exchange(encode_type(family, self._next()), f"type {TYPE}")[:1] or [b""]
            found = dict(attributes(payload))
            if ATTR_REVISION not in found:
                raise IpsetError(errno.ENOENT, f"ipset: the kernel has no {TYPE}")
            self._revision[family] = found[ATTR_REVISION][0]
        return self._revision[family]

    def names(self) -> list[str]:
        names = []
        for payload in self._exchange(encode_list_names(self._next()), "list"):
            found = dict(attributes(payload))
            if ATTR_SETNAME in found:
                names.append(found[ATTR_SETNAME].rstrip(b"\0").decode())
        return names

    def create(self, name: str, family: int, maxelem: int) -> None:
        self._exchange(
            encode_create(name, family, self.revision(family), maxelem, self._next()), f"create {name}"
        )

    def destroy(self, name: str) -> None:
        self._exchange(encode_named(CMD_DESTROY, self._next(), name), f"destroy {name}")

    def swap(self, first: str, second: str) -> None:
        self._exchange(encode_named(CMD_SWAP, self._next(), first, second), f"swap {first} {second}")

    def change(self, name: str, entries: Iterable[Entry], add: bool = True) -> None:
        """Add (or delete) entries, in batches; an entry there already (or not there) is no error."""
        command = CMD_ADD if add else CMD_DEL
        for data in encode_adds(name, entries, self._next(), command):
            self._exchange(data, f"{'add to' if add else 'delete from'} {name}")
            self._seq = struct.unpack_from("=I", data, 8)[0]

    def load(self, name: str, family: int, entries: list[Entry]) -> None:
        """`name` holds exactly `entries` from now on, in one swap (created when missing)."""
        maxelem = max(MIN_MAXELEM, 2 * len(entries))
        temp = set_name(name.split("-", 1)[1], family, temporary=True)
        present = set(self.names())
        if temp in present:
            self.destroy(temp)  # left by an install that failed half-way
        self.create(temp, family, maxelem)
        try:
            self.change(temp, entries)
            if name not in present:
                self.create(name, family, maxelem)
            self.swap(temp, name)
        finally:
            self.destroy(temp)
