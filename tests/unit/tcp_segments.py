"""A TCP segment as the decoder would hand it to the tracker, built field by field (no decoder)."""

from __future__ import annotations

from nfqfw.core.packet import Packet


def seg(
    flags: int,
    seq: int,
    ack: int = 0,
    win: int = 65535,
    length: int = 0,
    wscale: int = -1,
    sack_perm: bool = False,
    mss: int = 0,
    sack: tuple[tuple[int, int], ...] = (),
) -> Packet:
    pkt = Packet()
    pkt.family = 4
    pkt.proto = 6
    pkt.tcp_flags = flags
    pkt.seq = seq & 0xFFFFFFFF
    pkt.ack = ack & 0xFFFFFFFF
    pkt.window = win
    pkt.payload_len = length
    pkt.wscale = wscale
    pkt.sack_perm = sack_perm
    pkt.mss = mss
    pkt.sack = sack
    return pkt
