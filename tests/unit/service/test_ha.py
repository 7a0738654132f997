"""nfqfw.service.ha: the HA role's state and conntrackd's statistics."""

from __future__ import annotations

from pathlib import Path

from nfqfw.control.format import format_ha, format_ha_role
from nfqfw.service.ha import HaState, conntrackd_stats, parse_stats

# `conntrackd -s` of a FTFW gateway (conntrack-tools 1.4), as printed
STATS = """\
cache internal:
current active connections:                3
connections created:                       5    failed:            1
connections updated:                       9    failed:            0
connections destroyed:                     2    failed:            0

cache external:
current active connections:              1000
connections created:                    1000    failed:            0
connections updated:                      12    failed:            0
connections destroyed:                     0    failed:            0

traffic processed:
                   0 Bytes                         0 Pckts

UDP traffic (active device=sync0):
              123456 Bytes sent                 7890 Bytes recv
                 412 Pckts sent                   40 Pckts recv
                   0 Error send                    0 Error recv

message tracking:
                   0 Malformed msgs                    2 Lost msgs

"""


def test_parse_stats() -> None:
    stats = parse_stats(STATS)
    assert stats["cache internal"] == {
        "current active connections": 3,
        "connections created": 5,
        "connections created failed": 1,
        "connections updated": 9,
        "connections updated failed": 0,
        "connections destroyed": 2,
        "connections destroyed failed": 0,
    }
    assert stats["cache external"]["current active connections"] == 1000
    assert stats["UDP traffic (active device=sync0)"] == {
        "Bytes sent": 123456,
        "Bytes recv": 7890,
        "Pckts sent": 412,
        "Pckts recv": 40,
        "Error send": 0,
        "Error recv": 0,
    }
    assert stats["message tracking"] == {"Malformed msgs": 0, "Lost msgs": 2}


def test_status_of_a_gateway_told_a_role() -> None:
    state = HaState(read_stats=lambda conf: {"stats": parse_stats(STATS)})
    assert state.status() is None  # never told a role
    state.role, state.since, state.conntrackd_conf = "master", 100.0, "/etc/ha/conntrackd.conf"
    status = state.status()
    assert status is not None
    assert format_ha(status, when=str) == [
        "HA role:      master since 100.0",
        "  conntrackd: 3 flows of its own, 1000 flows of the peer, 2 messages lost, 0 malformed",
    ]
    state.read_stats = lambda conf: None
    assert format_ha(state.status(), when=str)[1] == "  conntrackd: none"


def test_conntrackd_that_does_not_answer_is_an_error(tmp_path: Path) -> None:
    result = conntrackd_stats(str(tmp_path / "missing.conf"), timeout=5.0)
    # installed here (the lab needs it): it refuses the missing file; elsewhere: no conntrackd
    assert result is None or set(result) == {"error"}
    if result is not None:
        assert result["error"].startswith("conntrackd -s: ")


def test_format_ha_role() -> None:
    assert format_ha_role({"role": "master", "previous": "backup", "taken_over": 2}) == (
        "HA role master (was backup): took over 2 flows the kernel carries for nfqfw"
    )
    assert format_ha_role({"role": "backup", "previous": None, "forgotten": 1}) == (
        "HA role backup: forgot 1 flow record (the peer carries them on)"
    )
