"""nfqfw.kernel.ctnetlink: the messages, built and parsed on bytes (the lab uses the kernel's)."""

from __future__ import annotations

import socket
import struct

from nfqfw.kernel import ctnetlink as ct
from nfqfw.kernel.ctnetlink import CtEntry

V4 = CtEntry(
    4, 6, socket.inet_aton("10.0.0.25"), socket.inet_aton("203.0.113.10"), 40000, 80,
    status=ct.IPS_SEEN_REPLY | ct.IPS_ASSURED, timeout=431999, mark=0x21030000, tcp_state=3,
)  # fmt: skip
V6_ECHO = CtEntry(
    6, 58, socket.inet_pton(socket.AF_INET6, "fd00::25"), socket.inet_pton(socket.AF_INET6, "2001:db8::1"),
    icmp=(128, 0, 77), timeout=29, mark=0x20000000,
)  # fmt: skip


def body_of(message: bytes) -> memoryview:
    """The attributes of a ctnetlink message (after nlmsghdr and nfgenmsg)."""
    return memoryview(message)[16 + 4 :]


def test_a_created_entry_parses_back() -> None:
    """create_request carries what the kernel's dump answers carry (the same attributes)."""
    for entry in (V4, V6_ECHO):
        parsed = ct.parse_entry(body_of(ct.create_request(entry)))
        expected = entry.status & (ct.IPS_SEEN_REPLY | ct.IPS_ASSURED) | ct.IPS_CONFIRMED
        assert parsed is not None
        assert (parsed.family, parsed.proto, parsed.src, parsed.dst, parsed.sport, parsed.dport) == (
            entry.family, entry.proto, entry.src, entry.dst, entry.sport, entry.dport,
        )  # fmt: skip
        assert (parsed.icmp, parsed.timeout, parsed.mark, parsed.tcp_state) == (
            entry.icmp, entry.timeout, entry.mark, entry.tcp_state,
        )  # fmt: skip
        assert parsed.status == expected


def test_reply_tuple_is_turned_round() -> None:
    attrs = ct.attributes(body_of(ct.create_request(V6_ECHO)))
    reply = ct.attributes(attrs[ct.CTA_TUPLE_REPLY])
    ip, l4 = ct.attributes(reply[ct.CTA_TUPLE_IP]), ct.attributes(reply[ct.CTA_TUPLE_PROTO])
    assert (bytes(ip[ct.CTA_IP_V6_SRC]), bytes(ip[ct.CTA_IP_V6_DST])) == (V6_ECHO.dst, V6_ECHO.src)
    assert l4[ct.CTA_PROTO_ICMPV6_TYPE][0] == 129  # an echo reply answers an echo request
    attrs4 = ct.attributes(body_of(ct.create_request(V4)))
    ports = ct.attributes(ct.attributes(attrs4[ct.CTA_TUPLE_REPLY])[ct.CTA_TUPLE_PROTO])
    assert struct.unpack("!H", ports[ct.CTA_PROTO_SRC_PORT])[0] == 80


def test_headers_and_flags() -> None:
    size, kind, flags, seq, _ = struct.unpack_from("=IHHII", ct.delete_request(V4, seq=7))
    assert (kind, flags, seq) == (1 << 8 | ct.IPCTNL_MSG_CT_DELETE, ct.NLM_F_REQUEST | ct.NLM_F_ACK, 7)
    dump = ct.dump_request(0x20000000, 0x2F000000, seq=3)
    _, kind, flags, _, _ = struct.unpack_from("=IHHII", dump)
    assert (kind, flags & ct.NLM_F_DUMP, dump[16]) == (1 << 8 | ct.IPCTNL_MSG_CT_GET, ct.NLM_F_DUMP, 0)
    attrs = ct.attributes(body_of(dump))
    assert (bytes(attrs[ct.CTA_MARK]), bytes(attrs[ct.CTA_MARK_MASK])) == (b"\x20\0\0\0", b"\x2f\0\0\0")
    remark = ct.attributes(body_of(ct.remark_request(V4, 0, 0x20000000)))
    assert (bytes(remark[ct.CTA_MARK]), bytes(remark[ct.CTA_MARK_MASK])) == (b"\0\0\0\0", b"\x20\0\0\0")
    created = ct.create_request(V4)
    assert created[16] == socket.AF_INET and struct.unpack_from("=I", created)[0] == len(created)
    assert size == len(ct.delete_request(V4, seq=7))


def test_messages_in_a_datagram_and_errors() -> None:
    ack = struct.pack("=IHHII", 36, ct.NLMSG_ERROR, 0, 5, 0) + struct.pack("=i", 0) + bytes(16)
    error = struct.pack("=IHHII", 36, ct.NLMSG_ERROR, 0, 6, 0) + struct.pack("=i", -2) + bytes(16)
    found = list(ct.parse_messages(ack + error))
    assert [(kind, seq, ct.error_code(payload)) for kind, seq, payload in found] == [(2, 5, 0), (2, 6, 2)]


def test_the_reply_tuple_tells_where_the_flow_goes_after_nat() -> None:
    """Without NAT the hooks see the original tuple; after a DNAT, its reply's source."""
    plain = ct.parse_entry(body_of(ct.create_request(V4)))
    assert plain is not None and plain.seen_as == (V4.src, 40000, V4.dst, 80)
    forwarded = CtEntry(4, 6, V4.src, socket.inet_aton("192.0.2.1"), 40000, 8080)
    reply = CtEntry(4, 6, socket.inet_aton("10.0.0.80"), V4.src, 80, 40000)  # DNAT to 10.0.0.80:80
    # The reply tuple as the kernel reports it: the orig tuple's attributes under CTA_TUPLE_REPLY.
    body = ct.tuple_attrs(forwarded) + ct.nested(ct.CTA_TUPLE_REPLY, ct.tuple_attrs(reply)[4:])
    parsed = ct.parse_entry(memoryview(body))
    assert parsed is not None and parsed.seen_as == (V4.src, 40000, socket.inet_aton("10.0.0.80"), 80)
