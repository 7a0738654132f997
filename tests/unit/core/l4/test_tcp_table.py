"""nfqfw.core.l4.tcp_states: the transition table, flag classes, flag validity and timeouts.

The expected table is an independent literal copy of the kernel's `tcp_conntracks`
(net/netfilter/nf_conntrack_proto_tcp.c), written as text so a typo in either copy shows.
"""

from __future__ import annotations

import pytest

from nfqfw.core.l4.tcp_conn import TcpConn, tcp_packet
from nfqfw.core.l4.tcp_states import (
    ACCEPT,
    DEFAULT_TIMEOUTS,
    FLAG_CLASS_BY_FLAGS,
    IGNORE,
    IGNORED_BY_CELL,
    INVALID,
    INVALID_BY_CELL,
    INVALID_FLAGS_RESULT,
    KERNEL_TIMEOUTS,
    TRANSITIONS,
    FlagClass,
    TcpResult,
    TcpState,
    TcpTimeouts,
    flag_class,
    invalid_flags_reason,
    sIG,
    sIV,
)
from nfqfw.core.l4.tcp_window import F_BE_LIBERAL
from nfqfw.core.packet import ACK, CWR, ECE, FIN, PSH, RST, SYN, URG, Packet

KERNEL_TABLE = """
ORIGINAL syn     sSS sSS sIG sIG sIG sIG sIG sSS sSS sS2
ORIGINAL synack  sIV sIV sSR sIV sIV sIV sIV sIV sIV sSR
ORIGINAL fin     sIV sIV sFW sFW sLA sLA sLA sTW sCL sIV
ORIGINAL ack     sES sIV sES sES sCW sCW sTW sTW sCL sIV
ORIGINAL rst     sIV sCL sCL sCL sCL sCL sCL sCL sCL sCL
ORIGINAL none    sIV sIV sIV sIV sIV sIV sIV sIV sIV sIV
REPLY    syn     sIV sS2 sIV sIV sIV sIV sIV sSS sIV sS2
REPLY    synack  sIV sSR sIG sIG sIG sIG sIG sIG sIG sSR
REPLY    fin     sIV sIV sFW sFW sLA sLA sLA sTW sCL sIV
REPLY    ack     sIV sIG sSR sES sCW sCW sTW sTW sCL sIG
REPLY    rst     sIV sCL sCL sCL sCL sCL sCL sCL sCL sCL
REPLY    none    sIV sIV sIV sIV sIV sIV sIV sIV sIV sIV
"""
COLUMNS = ("sNO", "sSS", "sSR", "sES", "sFW", "sCW", "sLA", "sTW", "sCL", "sS2")
NAMES = {
    "sNO": TcpState.NONE,
    "sSS": TcpState.SYN_SENT,
    "sSR": TcpState.SYN_RECV,
    "sES": TcpState.ESTABLISHED,
    "sFW": TcpState.FIN_WAIT,
    "sCW": TcpState.CLOSE_WAIT,
    "sLA": TcpState.LAST_ACK,
    "sTW": TcpState.TIME_WAIT,
    "sCL": TcpState.CLOSE,
    "sS2": TcpState.SYN_SENT2,
    "sIV": sIV,
    "sIG": sIG,
}
ROWS = {"syn": 0, "synack": 1, "fin": 2, "ack": 3, "rst": 4, "none": 5}
DIRECTIONS = {"ORIGINAL": 0, "REPLY": 1}


def kernel_cells() -> list[tuple[int, int, int, int]]:
    cells = []
    for line in KERNEL_TABLE.strip().splitlines():
        direction, row, *targets = line.split()
        assert len(targets) == len(COLUMNS)
        for column, target in zip(COLUMNS, targets, strict=True):
            cells.append((DIRECTIONS[direction], ROWS[row], int(NAMES[column]), int(NAMES[target])))
    return cells


CELLS = kernel_cells()


def cell_id(cell: tuple[int, int, int, int]) -> str:
    direction, row, state, _ = cell
    return f"{('ORIG', 'REPLY')[direction]}-{list(ROWS)[row]}-{TcpState(state).name}"


def test_kernel_copy_has_every_cell() -> None:
    assert len(CELLS) == 2 * 6 * 10
    assert len({cell[:3] for cell in CELLS}) == 120


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_transition_cell_matches_kernel(cell: tuple[int, int, int, int]) -> None:
    direction, row, state, expected = cell
    assert TRANSITIONS[direction][row][state] == expected


def test_table_shape() -> None:
    assert len(TRANSITIONS) == 2
    assert all(len(rows) == 6 for rows in TRANSITIONS)
    assert all(len(row) == 10 for rows in TRANSITIONS for row in rows)


def test_states_in_kernel_order() -> None:
    assert [s.name for s in TcpState] == [
        "NONE",
        "SYN_SENT",
        "SYN_RECV",
        "ESTABLISHED",
        "FIN_WAIT",
        "CLOSE_WAIT",
        "LAST_ACK",
        "TIME_WAIT",
        "CLOSE",
        "SYN_SENT2",
    ]
    assert [int(s) for s in TcpState] == list(range(10))
    assert (sIV, sIG) == (10, 11)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (SYN, FlagClass.SYN),
        (SYN | URG, FlagClass.SYN),
        (SYN | ACK, FlagClass.SYNACK),
        (SYN | ACK | ECE | CWR, FlagClass.SYNACK),
        (FIN | ACK, FlagClass.FIN),
        (FIN | ACK | PSH | URG, FlagClass.FIN),
        (ACK, FlagClass.ACK),
        (ACK | PSH, FlagClass.ACK),
        (RST, FlagClass.RST),
        (RST | ACK, FlagClass.RST),
        (RST | SYN, FlagClass.RST),  # RST is checked first
        (SYN | FIN, FlagClass.SYN),  # then SYN
        (FIN, FlagClass.FIN),
        (0, FlagClass.NONE),
        (PSH | URG, FlagClass.NONE),
    ],
)
def test_flag_class_in_kernel_order(flags: int, expected: FlagClass) -> None:
    assert flag_class(flags) == expected
    assert FLAG_CLASS_BY_FLAGS[flags] == expected


def test_flag_class_lookup_table_agrees_everywhere() -> None:
    assert [flag_class(f) for f in range(256)] == list(FLAG_CLASS_BY_FLAGS)


@pytest.mark.parametrize(
    "flags",
    [
        SYN,
        SYN | URG,
        SYN | ACK,
        RST,
        RST | ACK,
        FIN | ACK,
        FIN | ACK | URG,
        ACK,
        ACK | URG,
        ACK | PSH,
        SYN | ECE | CWR,
        FIN | ACK | PSH | ECE | CWR,
    ],
)
def test_valid_flag_combinations(flags: int) -> None:
    assert invalid_flags_reason(flags) is None
    assert INVALID_FLAGS_RESULT[flags] is None


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (0, "tcp: invalid flags none"),
        (FIN, "tcp: invalid flags FIN"),
        (SYN | FIN, "tcp: invalid flags FIN+SYN"),
        (SYN | RST, "tcp: invalid flags SYN+RST"),
        (FIN | PSH | URG, "tcp: invalid flags FIN+PSH+URG"),  # XMAS
        (0xFF, "tcp: invalid flags FIN+SYN+RST+PSH+ACK+URG+ECE+CWR"),
        (SYN | ACK | URG, "tcp: invalid flags SYN+ACK+URG"),
        (RST | ACK | URG, "tcp: invalid flags RST+ACK+URG"),
        (PSH, "tcp: invalid flags PSH"),
        (URG, "tcp: invalid flags URG"),
        (FIN | RST | ACK, "tcp: invalid flags FIN+RST+ACK"),
    ],
)
def test_invalid_flag_combinations(flags: int, reason: str) -> None:
    assert invalid_flags_reason(flags) == reason
    assert INVALID_FLAGS_RESULT[flags] == TcpResult(INVALID, reason, None, False)


def test_exactly_nine_combinations_valid_before_masking() -> None:
    valid = [f for f in range(64) if not f & PSH and invalid_flags_reason(f) is None]
    assert len(valid) == 9


def test_kernel_default_timeouts() -> None:
    assert dict(DEFAULT_TIMEOUTS) == {
        "SYN_SENT": 120.0,
        "SYN_RECV": 60.0,
        "ESTABLISHED": 432000.0,
        "FIN_WAIT": 120.0,
        "CLOSE_WAIT": 60.0,
        "LAST_ACK": 30.0,
        "TIME_WAIT": 120.0,
        "CLOSE": 10.0,
        "SYN_SENT2": 120.0,
        "RETRANS": 300.0,
        "UNACK": 300.0,
    }
    assert KERNEL_TIMEOUTS.as_dict() == dict(DEFAULT_TIMEOUTS)
    assert KERNEL_TIMEOUTS.by_state[TcpState.ESTABLISHED] == 432000.0


def test_timeout_overrides() -> None:
    timeouts = TcpTimeouts({"ESTABLISHED": 3600, "UNACK": 90})
    assert timeouts.by_state[TcpState.ESTABLISHED] == 3600.0
    assert timeouts.unack == 90.0
    assert timeouts.by_state[TcpState.SYN_SENT] == 120.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ESTABLISHD": 5}, "unknown TCP timeout 'ESTABLISHD'"),
        ({"CLOSE": 0}, "TCP timeout CLOSE must be > 0, got 0"),
    ],
)
def test_timeout_overrides_rejected(overrides: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TcpTimeouts(overrides)


# --- every cell, through tcp_packet ---------------------------------------------------------------

CLASS_FLAGS = {0: SYN, 1: SYN | ACK, 2: FIN | ACK, 3: ACK, 4: RST | ACK, 5: URG}

# With no history (no FIN seen, last packet not an RST from the same side) a SYN that the table
# sends from TIME_WAIT / CLOSE back to SYN_SENT does not reopen: the kernel falls through to the
# "ignore" path. The reopen cases are tested with a real history in test_tcp_conn.
IGNORED_WITHOUT_HISTORY = {(0, 0, TcpState.TIME_WAIT), (0, 0, TcpState.CLOSE), (1, 0, TcpState.TIME_WAIT)}


def neutral_conn(state: int) -> TcpConn:
    """A flow in `state` whose windows accept anything (both sides tracked liberally)."""
    conn = TcpConn()
    conn.state = state
    for base, end in ((0, 1000), (6, 5000)):
        conn.td[base + 0] = end  # td_end
        conn.td[base + 1] = end + 65535  # td_maxend
        conn.td[base + 2] = 65535  # td_maxwin
        conn.td[base + 5] = F_BE_LIBERAL
    conn.td[15] = 65535  # last window
    return conn


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_transition_cell_through_tcp_packet(cell: tuple[int, int, int, int]) -> None:
    direction, row, state, target = cell
    conn = neutral_conn(state)
    seq, ack = (1000, 5000) if direction == 0 else (5000, 1000)
    pkt = Packet()
    pkt.tcp_flags = CLASS_FLAGS[row]
    pkt.seq, pkt.ack, pkt.window = seq, ack, 1000
    result = tcp_packet(conn, pkt, direction, seen_reply=True)
    if row == FlagClass.NONE:
        assert result == INVALID_FLAGS_RESULT[URG]
        assert conn.state == state
    elif target == sIV:
        assert result == INVALID_BY_CELL[direction][row][state]
        assert result.kind == INVALID
        assert conn.state == state
    elif target == sIG or (direction, row, state) in IGNORED_WITHOUT_HISTORY:
        assert result == IGNORED_BY_CELL[direction][row][state]
        assert result.kind == IGNORE
        assert conn.state == state
    else:
        assert result.kind == ACCEPT
        assert result.reason == f"tcp: {TcpState(target).name}"
        assert conn.state == target
