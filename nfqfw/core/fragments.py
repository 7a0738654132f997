"""Later fragments share the verdict on their datagram's first fragment.

The kernel reassembles fragments before conntrack sees them (nf_defrag_ipv4 / nf_defrag_ipv6), so
all fragments of a datagram share one verdict. nfqfw answers fragment by fragment, and only the
first carries the ports: so the verdict on a first fragment is remembered under the datagram's
identity (addresses, protocol for IPv4, identification) and given to its later fragments. A
later fragment that comes before its first one is decided on its own (conntrack UNTRACKED, the
policy defaults); the kernel would hold it until the datagram is complete, which nfqfw, answering
every packet at once, cannot do.

Bounded: a datagram is remembered for FRAGMENT_TIMEOUT seconds (the kernel gives up reassembling
after ipfrag_time, 30 s) and at most `max_datagrams` of them, the oldest forgotten first.
"""

from __future__ import annotations

from nfqfw.core.packet import FRAG_LATER, Packet
from nfqfw.core.verdict import Verdict

FRAGMENT_TIMEOUT = 30.0
MAX_DATAGRAMS = 4096

_IPV6_FRAGMENT = 44
_IPV6_AH = 51


def datagram_key(pkt: Packet, data: bytes | bytearray | memoryview) -> bytes:
    """What the kernel reassembles a fragment by: addresses and identification (IPv4: and the
    protocol). `pkt` is a fragment decoded from `data` without error."""
    if pkt.family == 4:
        return bytes((4, pkt.proto)) + pkt.src + pkt.dst + bytes(data[4:6])
    header = pkt.l4_offset - 8 if pkt.frag == FRAG_LATER else _ipv6_fragment_header(data)
    return b"\x06" + pkt.src + pkt.dst + bytes(data[header + 4 : header + 8])


def _ipv6_fragment_header(data: bytes | bytearray | memoryview) -> int:
    """Offset of the fragment header of a first fragment (decode has checked the chain)."""
    proto, offset = data[6], 40
    while proto != _IPV6_FRAGMENT:
        length = (data[offset + 1] + 2) * 4 if proto == _IPV6_AH else (data[offset + 1] + 1) * 8
        proto, offset = data[offset], offset + length
    return offset


class Fragments:
    """The verdicts on recent first fragments, by datagram."""

    def __init__(self, max_datagrams: int = MAX_DATAGRAMS) -> None:
        self.max_datagrams = max_datagrams
        # Insertion-ordered, and every entry lives as long: the oldest is always first.
        self._verdicts: dict[bytes, tuple[float, Verdict]] = {}

    def __len__(self) -> int:
        return len(self._verdicts)

    def remember(self, key: bytes, verdict: Verdict, now: float) -> None:
        """The verdict on a datagram's first fragment, for its later ones."""
        verdicts = self._verdicts
        self._forget_expired(now)
        verdicts.pop(key, None)  # a datagram sent again: counts from now
        if len(verdicts) >= self.max_datagrams:
            del verdicts[next(iter(verdicts))]
        verdicts[key] = (now + FRAGMENT_TIMEOUT, verdict)

    def first_verdict(self, key: bytes, now: float) -> Verdict | None:
        """The verdict on this datagram's first fragment, or None if it was not seen (lately)."""
        entry = self._verdicts.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            self._forget_expired(now)
            return None
        return entry[1]

    def _forget_expired(self, now: float) -> None:
        verdicts = self._verdicts
        while verdicts:
            key = next(iter(verdicts))
            if verdicts[key][0] > now:
                return
            del verdicts[key]
