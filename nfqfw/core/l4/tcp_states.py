"""Everything that defines the TCP conntrack state machine lives in this file, as data.

It mirrors Linux `net/netfilter/nf_conntrack_proto_tcp.c`: the states in kernel order, the
flag classes in the order `get_conntrack_index()` checks them, the transition table
`tcp_conntracks[direction][flag class][state]` written out as the kernel writes it, the
valid flag combinations of `tcp_error()`, and the default timeouts. `l4.tcp_conn` walks
this table; `l4.tcp_window` does the sequence-number checks.

The results a TCP packet can have (`TcpResult` and its kinds) are defined here too, so that
the window tracker and the connection tracker can share the prebuilt, immutable results.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import NamedTuple

from nfqfw.core.packet import ACK, CWR, ECE, FIN, PSH, RST, SYN, URG


class TcpState(IntEnum):
    """Conntrack TCP states, numbered as the kernel's `enum tcp_conntrack`."""

    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    SYN_SENT2 = 9


class FlagClass(IntEnum):
    """Which of RST/SYN/FIN/ACK decide a packet's row in the table (kernel `enum tcp_bit_set`)."""

    SYN = 0
    SYNACK = 1
    FIN = 2
    ACK = 3
    RST = 4
    NONE = 5


# Short names so that the table below reads like the kernel's. Plain ints: the hot path
# indexes tuples with them.
sNO, sSS, sSR, sES, sFW, sCW, sLA, sTW, sCL, sS2 = (int(s) for s in TcpState)
sIV = 10  # pseudo-state: the packet is invalid (kernel TCP_CONNTRACK_MAX)
sIG = 11  # pseudo-state: the packet passes, the state is left alone (kernel TCP_CONNTRACK_IGNORE)
STATE_COUNT = 10

STATE_NAMES: tuple[str, ...] = (*(s.name for s in TcpState), "INVALID", "IGNORE")
CLASS_NAMES: tuple[str, ...] = ("SYN", "SYN-ACK", "FIN", "ACK", "RST", "no flags")

# fmt: off
TRANSITIONS: tuple[tuple[tuple[int, ...], ...], ...] = (
    # ORIGINAL
    (
        #sNO  sSS  sSR  sES  sFW  sCW  sLA  sTW  sCL  sS2
        (sSS, sSS, sIG, sIG, sIG, sIG, sIG, sSS, sSS, sS2),  # syn
        (sIV, sIV, sSR, sIV, sIV, sIV, sIV, sIV, sIV, sSR),  # synack
        (sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV),  # fin
        (sES, sIV, sES, sES, sCW, sCW, sTW, sTW, sCL, sIV),  # ack
        (sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL),  # rst
        (sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV),  # none
    ),
    # REPLY
    (
        #sNO  sSS  sSR  sES  sFW  sCW  sLA  sTW  sCL  sS2
        (sIV, sS2, sIV, sIV, sIV, sIV, sIV, sSS, sIV, sS2),  # syn
        (sIV, sSR, sIG, sIG, sIG, sIG, sIG, sIG, sIG, sSR),  # synack
        (sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV),  # fin
        (sIV, sIG, sSR, sES, sCW, sCW, sTW, sTW, sCL, sIG),  # ack
        (sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL),  # rst
        (sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV),  # none
    ),
)
# fmt: on
# Why some cells are what they are (kernel comments, abridged):
#   ORIGINAL syn:    sTW/sCL -> sSS reopen (RFC 1122); sSR..sLA -> sIG, we may be out of sync.
#   ORIGINAL synack: sSR/sS2 -> sSR only in a simultaneous open.
#   ORIGINAL fin/ack in sSS: the client must wait for the SYN-ACK first.
#   REPLY syn:       sSS -> sS2 simultaneous open; sTW -> sSS the server may switch roles.
#   REPLY synack:    retransmitted or late SYN-ACKs are ignored (may answer an ignored SYN).
#   REPLY ack:       sSS/sS2 -> sIG, might be a half-open connection (or a challenge ACK).

FLAG_CLASS_MASK = RST | SYN | FIN | ACK


def flag_class(flags: int) -> int:
    """The table row of a packet, checked in the kernel's order: RST, SYN (with ACK: SYN-ACK), FIN, ACK."""
    if flags & RST:
        return FlagClass.RST
    if flags & SYN:
        return FlagClass.SYNACK if flags & ACK else FlagClass.SYN
    if flags & FIN:
        return FlagClass.FIN
    if flags & ACK:
        return FlagClass.ACK
    return FlagClass.NONE


# flag_class() for every value of the flags byte, as plain ints (hot path).
FLAG_CLASS_BY_FLAGS: tuple[int, ...] = tuple(int(flag_class(f)) for f in range(256))

# tcp_error(): the combinations allowed once PSH, ECE and CWR are masked off.
VALID_FLAGS: frozenset[int] = frozenset(
    {SYN, SYN | URG, SYN | ACK, RST, RST | ACK, FIN | ACK, FIN | ACK | URG, ACK, ACK | URG}
)
ALWAYS_ALLOWED = PSH | ECE | CWR
_FLAG_NAMES = (
    (FIN, "FIN"),
    (SYN, "SYN"),
    (RST, "RST"),
    (PSH, "PSH"),
    (ACK, "ACK"),
    (URG, "URG"),
    (ECE, "ECE"),
    (CWR, "CWR"),
)


def flags_text(flags: int) -> str:
    """Flag names in wire bit order joined by '+', e.g. 'FIN+SYN'; 'none' for no flags."""
    return "+".join(name for bit, name in _FLAG_NAMES if flags & bit) or "none"


def invalid_flags_reason(flags: int) -> str | None:
    """Why a flag combination is invalid (kernel tcp_valid_flags), None when it is valid."""
    if (flags & ~ALWAYS_ALLOWED & 0xFF) in VALID_FLAGS:
        return None
    return f"tcp: invalid flags {flags_text(flags)}"


# ---------------------------------------------------------------------------------------------
# Results


ACCEPT = 0  # packet valid, state (and window data) updated
IGNORE = 1  # packet passes, state unchanged (kernel NF_ACCEPT without update)
INVALID = 2  # packet invalid, state unchanged
KILL = 3  # accept the packet, then delete the flow (RST before any reply was seen)
REOPEN = 4  # delete the old flow and create a new one from this packet (SYN in TIME_WAIT/CLOSE)
KIND_NAMES: tuple[str, ...] = ("ACCEPT", "IGNORE", "INVALID", "KILL", "REOPEN")


class TcpResult(NamedTuple):
    """What one packet did to a TCP flow.

    timeout: seconds until the flow expires, counted from now; None keeps the current deadline.
    For an INVALID result a timeout is a *ceiling* (kernel nf_tcp_handle_invalid: an assured
    flow that sees out-of-window FIN/RST in both directions): lower the deadline to now+timeout
    only if more than max(timeout, SHRINK_MIN_REMAINING) seconds are left.
    assure: this packet makes the flow ASSURED.
    """

    kind: int
    reason: str
    timeout: float | None
    assure: bool


SHRINK_MIN_REMAINING = 120.0  # kernel: an invalid FIN/RST does not touch a flow with < 120 s left


def _results(kind: int, fmt: str, names: tuple[str, ...]) -> tuple[tuple[TcpResult, ...], ...]:
    """[direction][flag class][state] -> prebuilt result naming the class and the state."""
    return tuple(
        tuple(
            tuple(
                TcpResult(
                    kind, fmt.format(dir=("", "reply ")[d], cls=CLASS_NAMES[c], state=names[s]), None, False
                )
                for s in range(STATE_COUNT)
            )
            for c in range(len(CLASS_NAMES))
        )
        for d in (0, 1)
    )


# The table said sIV / sIG: one prebuilt result per cell.
INVALID_BY_CELL = _results(INVALID, "tcp: {dir}{cls} in state {state}", STATE_NAMES)
IGNORED_BY_CELL = _results(IGNORE, "tcp: {dir}{cls} ignored in state {state}", STATE_NAMES)

# A result for every value of the flags byte whose combination is invalid, else None.
INVALID_FLAGS_RESULT: tuple[TcpResult | None, ...] = tuple(
    None if (reason := invalid_flags_reason(f)) is None else TcpResult(INVALID, reason, None, False)
    for f in range(256)
)


# ---------------------------------------------------------------------------------------------
# Timeouts


# Kernel defaults (seconds), nf_conntrack_tcp_timeout_*.
DEFAULT_TIMEOUTS: Mapping[str, float] = {
    "SYN_SENT": 120.0,
    "SYN_RECV": 60.0,
    "ESTABLISHED": 432000.0,  # 5 days
    "FIN_WAIT": 120.0,
    "CLOSE_WAIT": 60.0,
    "LAST_ACK": 30.0,
    "TIME_WAIT": 120.0,
    "CLOSE": 10.0,
    "SYN_SENT2": 120.0,
    "RETRANS": 300.0,  # >= MAX_RETRANS identical retransmissions, or a zero window
    "UNACK": 300.0,  # data not acknowledged yet in some direction
}
MAX_RETRANS = 3  # kernel nf_conntrack_tcp_max_retrans

# Which timeout an accepted packet gets (indexes into TcpTimeouts.accepted[state]).
T_STATE = 0  # the new state's own
T_RETRANS = 1
T_CLOSE = 2  # any RST
T_UNACK = 3
T_KEEP = 4  # do not refresh (SYN retransmitted before any reply)


class TcpTimeouts:
    """A set of TCP timeouts plus the prebuilt ACCEPT results for each (state, timeout choice)."""

    __slots__ = ("accepted", "by_state", "close", "retrans", "unack")

    def __init__(self, overrides: Mapping[str, float] | None = None) -> None:
        values = dict(DEFAULT_TIMEOUTS)
        for name, seconds in (overrides or {}).items():
            if name not in values:
                raise ValueError(f"unknown TCP timeout {name!r}")
            if seconds <= 0:
                raise ValueError(f"TCP timeout {name} must be > 0, got {seconds}")
            values[name] = float(seconds)
        self.by_state: tuple[float, ...] = (0.0, *(values[s.name] for s in TcpState if s))
        self.retrans = values["RETRANS"]
        self.unack = values["UNACK"]
        self.close = values["CLOSE"]
        choice = (None, self.retrans, self.close, self.unack, None)
        self.accepted: tuple[tuple[TcpResult, ...], ...] = tuple(
            tuple(
                TcpResult(
                    ACCEPT, f"tcp: {STATE_NAMES[s]}", self.by_state[s] if k == T_STATE else choice[k], False
                )
                for k in (T_STATE, T_RETRANS, T_CLOSE, T_UNACK, T_KEEP)
            )
            for s in range(STATE_COUNT)
        )

    def as_dict(self) -> dict[str, float]:
        named = {s.name: self.by_state[s] for s in TcpState if s}
        return {**named, "RETRANS": self.retrans, "UNACK": self.unack}


KERNEL_TIMEOUTS = TcpTimeouts()
