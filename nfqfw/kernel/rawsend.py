"""Sends the packets nfqfw builds itself (RSTs, ICMP errors) with raw sockets.

One IPv4 socket (IPPROTO_RAW: the header we built goes out as is, any source address allowed)
and one IPv6 socket (IPPROTO_RAW implies IPV6_HDRINCL), opened once at start-up. Both carry
SO_MARK with nfqfw's mark bit, so our own OUTPUT rule lets these packets by instead of queueing
them back to us (see nfqfw.firewall.iptables). Sends are non-blocking: a full socket buffer loses a reply,
never stalls the packet loop.
"""

from __future__ import annotations

import socket

_SO_MARK = getattr(socket, "SO_MARK", 36)


class RawSender:
    def __init__(self, mark: int) -> None:
        self._v4 = self._open(socket.AF_INET, mark)
        self._v6 = self._open(socket.AF_INET6, mark)

    @staticmethod
    def _open(family: int, mark: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.IPPROTO_RAW)
        sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, mark)
        sock.setblocking(False)
        return sock

    def send(self, packet: bytes, ifindex: int = 0) -> None:
        """Send a complete IP packet to its destination; `ifindex` scopes IPv6 link-local ones.

        Raises OSError (e.g. no route, buffer full) for the caller to count.
        """
        if packet[0] >> 4 == 4:
            self._v4.sendto(packet, (socket.inet_ntop(socket.AF_INET, packet[16:20]), 0))
        else:
            dst = packet[24:40]
            link_local = dst[0] == 0xFE and dst[1] & 0xC0 == 0x80
            scope = ifindex if link_local else 0
            self._v6.sendto(packet, (socket.inet_ntop(socket.AF_INET6, dst), 0, 0, scope))

    def close(self) -> None:
        self._v4.close()
        self._v6.close()
