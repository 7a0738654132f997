"""nfqfw.core.snapshot: flows -> bytes -> flows, times rebased, bad input refused with exact reasons.

Flows are made by real packets through the Engine (config/policy.yaml), so their rule, Meta and
TCP window data are what the tracker writes. `fields()` is the one place here that reads Flow
and TcpConn internals: a change of their layout changes it (and core/snapshot.py), nothing else.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfqfw.core import snapshot
from nfqfw.core.build import addr, icmp, icmpv6, ipv4, ipv6, sack_perm_option, tcp, udp, wscale_option
from nfqfw.core.config import load_policy, parse_policy
from nfqfw.core.conntrack import Conntrack, Flow, first_packet
from nfqfw.core.engine import Engine
from nfqfw.core.l4.tcp_states import STATE_NAMES
from nfqfw.core.packet import ACK, FIN, PSH, RST, SYN
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.recheck import recheck
from nfqfw.core.snapshot import SnapshotError, decode, encode, install
from nfqfw.core.verdict import Action, Hook, Meta, Verdict

POLICY_FILE = Path(__file__).resolve().parents[3] / "config" / "policy.yaml"
OUT = Meta(Hook.FORWARD, "lan0", "wan0")
IN = Meta(Hook.FORWARD, "wan0", "lan0")
LOCAL = Meta(Hook.OUTPUT, None, "wan0")
LAN, MAIL, WAN = addr("10.0.0.5"), addr("10.0.0.25"), addr("203.0.113.7")
LAN6, MAIL6, WAN6 = addr("fd00::5"), addr("fd00::25"), addr("2001:db8::7")

T0 = 1000.0  # monotonic time of the save
WALL = 1_700_000_000.0  # wall-clock time of the save
T1 = 50.0  # monotonic time of the restore (a new process: its clock starts anew)


def new_engine() -> Engine:
    return Engine(CompiledPolicy(load_policy(POLICY_FILE)))


def fields(flow: Flow, now: float) -> dict[str, Any]:
    """Everything a snapshot must keep, times relative to `now`."""
    out: dict[str, Any] = {
        "key": flow.key,
        "orig_a": flow.orig_a,
        "assured": flow.assured,
        "seen_reply": flow.seen_reply,
        "rule": flow.rule,
        "meta": flow.meta,
        "remaining": round(flow.deadline - now, 6),
        "age": round(now - flow.created, 6),
        "state": flow.state_name,
    }
    conn = flow.tcp
    if conn is not None:
        out["tcp"] = (
            conn.state,
            conn.last_index,
            conn.last_dir,
            conn.last_flags,
            conn.last_wscale,
            conn.retrans,
            conn.assured,
            list(conn.td),
        )
    return out


class Conversation:
    """One TCP connection through the engine: `a` is the client (sends ORIGINAL)."""

    def __init__(self, e: Engine, client: bytes, server: bytes, sport: int, dport: int, meta: Meta) -> None:
        self.e, self.client, self.server, self.sport, self.dport = e, client, server, sport, dport
        self.meta = meta
        self.back = Meta(meta.hook, meta.out_iface, meta.in_iface) if meta.hook == Hook.FORWARD else meta
        self.cseq, self.sseq = 1000, 50000

    def client_sends(self, flags: int, data: bytes = b"", now: float = T0, **kw: Any) -> Verdict:
        ends = (self.client, self.server, self.sport, self.dport)
        verdict = self._send(ends, self.cseq, self.sseq, flags, data, self.meta, now, kw)
        self.cseq += len(data) + bool(flags & (SYN | FIN))
        return verdict

    def server_sends(self, flags: int, data: bytes = b"", now: float = T0, **kw: Any) -> Verdict:
        ends = (self.server, self.client, self.dport, self.sport)
        verdict = self._send(ends, self.sseq, self.cseq, flags, data, self.back, now, kw)
        self.sseq += len(data) + bool(flags & (SYN | FIN))
        return verdict

    def _send(
        self,
        ends: tuple[bytes, bytes, int, int],
        seq: int,
        ack: int,
        flags: int,
        data: bytes,
        meta: Meta,
        now: float,
        kw: dict[str, Any],
    ) -> Verdict:
        src, dst, sport, dport = ends
        seq, ack = seq & 0xFFFFFFFF, ack & 0xFFFFFFFF
        segment = tcp(src, dst, sport, dport, seq=seq, ack=ack, flags=flags, payload=data, **kw)
        packet = (ipv4 if len(src) == 4 else ipv6)(src, dst, 6, segment)
        return self.e.process(packet, meta, now)

    def handshake(self, now: float = T0, opts: bytes = wscale_option(7) + sack_perm_option()) -> None:
        assert self.client_sends(SYN, now=now, options=opts).action is Action.ACCEPT
        assert self.server_sends(SYN | ACK, now=now, options=opts).action is Action.ACCEPT
        assert self.client_sends(ACK, now=now).action is Action.ACCEPT


def tcp_in_every_state(e: Engine) -> dict[str, Conversation]:
    """One conversation per TCP state (NONE excepted: no flow is ever in it), IPv4 and IPv6."""
    convs: dict[str, Conversation] = {}

    def conv(name: str, port: int, v6: bool = False, inbound: bool = False) -> Conversation:
        if inbound:
            c = Conversation(e, WAN6 if v6 else WAN, MAIL6 if v6 else MAIL, 40000 + port, 25, IN)
        else:
            c = Conversation(e, LAN6 if v6 else LAN, WAN6 if v6 else WAN, 40000 + port, 80, OUT)
        convs[name] = c
        return c

    conv("SYN_SENT", 1).client_sends(SYN, options=wscale_option(7))
    c = conv("SYN_RECV", 2, v6=True)
    c.client_sends(SYN)
    c.server_sends(SYN | ACK)
    c = conv("ESTABLISHED", 3, inbound=True)
    c.handshake()
    for _ in range(3):  # data not acknowledged yet (F_DATA_UNACKNOWLEDGED), sent three times (retrans)
        c.client_sends(ACK | PSH, b"data in flight")
        c.cseq -= len(b"data in flight")
    c.cseq += len(b"data in flight")
    c = conv("FIN_WAIT", 4, v6=True)
    c.handshake()
    c.client_sends(FIN | ACK)
    c = conv("CLOSE_WAIT", 5)
    c.handshake()
    c.client_sends(FIN | ACK)
    c.server_sends(ACK)
    c = conv("LAST_ACK", 6)
    c.handshake()
    c.client_sends(FIN | ACK)
    c.server_sends(FIN | ACK)
    c.client_sends(SYN)  # ignored in LAST_ACK: remembered, with EXP_CHALLENGE_ACK
    c.cseq -= 1
    c = conv("TIME_WAIT", 7, v6=True)
    c.handshake()
    c.client_sends(FIN | ACK)
    c.server_sends(FIN | ACK)
    c.client_sends(ACK)
    c = conv("CLOSE", 8)
    c.handshake()
    c.client_sends(RST | ACK)
    c = conv("SYN_SENT2", 9)
    c.client_sends(SYN)
    c.server_sends(SYN)  # simultaneous open: SIMULTANEOUS_OPEN in last_flags
    return convs


def other_flows(e: Engine) -> None:
    """UDP (unreplied, replied, an assured stream), ICMP and ICMPv6 echo, another protocol."""
    ok = Action.ACCEPT
    assert e.process(ipv4(LAN, WAN, 17, udp(LAN, WAN, 41000, 53, b"q")), OUT, T0 - 1).action is ok
    assert e.process(ipv6(LAN6, WAN6, 17, udp(LAN6, WAN6, 41001, 53, b"q")), OUT, T0 - 1).action is ok
    assert e.process(ipv6(WAN6, LAN6, 17, udp(WAN6, LAN6, 53, 41001, b"a")), IN, T0 - 0.5).action is ok
    assert e.process(ipv4(LAN, WAN, 17, udp(LAN, WAN, 41002, 123, b"q")), OUT, T0 - 10).action is ok
    assert e.process(ipv4(WAN, LAN, 17, udp(WAN, LAN, 123, 41002, b"a")), IN, T0 - 5).action is ok
    assert e.process(ipv4(LAN, WAN, 17, udp(LAN, WAN, 41002, 123, b"q")), OUT, T0).action is ok
    assert e.process(ipv4(LAN, WAN, 1, icmp(8, 0, (77, 1))), OUT, T0).action is ok
    echo6 = icmpv6(LAN6, WAN6, 128, 0, struct.pack("!HH", 78, 1))
    assert e.process(ipv6(LAN6, WAN6, 58, echo6), OUT, T0).action is ok
    assert e.process(ipv4(LAN, WAN, 47, b"\0\0\x08\0"), LOCAL, T0).action is ok  # GRE from the gateway


def populated() -> tuple[Engine, dict[str, Conversation]]:
    e = new_engine()
    convs = tcp_in_every_state(e)
    other_flows(e)
    return e, convs


def roundtrip(e: Engine, wall_later: float = WALL, now: float = T1, exact: bool = True) -> snapshot.Restored:
    """Save at T0 (exact: at a stop, unless told otherwise), restore at `now`, `wall_later`."""
    return decode(encode(e.conntrack, T0, WALL, exact), now, wall_later)


# -- round trips ---------------------------------------------------------------------------------


def test_the_fixture_has_every_tcp_state_and_every_kind_of_flow() -> None:
    e, convs = populated()
    states = {name: e.conntrack.get(_key_of(e, c)).state_name for name, c in convs.items()}  # type: ignore[union-attr]
    assert states == {name: name for name in STATE_NAMES[1:10]}
    names = sorted(flow.state_name for flow in e.conntrack if flow.tcp is None)
    assert names == ["ASSURED", "REPLIED", "UNREPLIED", "UNREPLIED", "UNREPLIED", "UNREPLIED"]
    families = {len(flow.key) for flow in e.conntrack}
    assert families == {13, 37, 14, 38, 9}  # TCP/UDP v4 and v6, ICMP, ICMPv6, GRE v4
    established = e.conntrack.get(_key_of(e, convs["ESTABLISHED"]))
    assert established is not None and established.tcp is not None and established.assured
    assert established.tcp.retrans == 2 and established.tcp.td[5] & 0x10  # repeated ACKs, data unacked
    assert established.tcp.side(0)["td_scale"] == 7


def _key_of(e: Engine, c: Conversation) -> bytes:
    for flow in e.conntrack:
        if c.client in flow.key and c.sport.to_bytes(2, "big") in flow.key:
            return flow.key
    raise AssertionError("no flow for the conversation")


def test_every_field_survives_with_times_rebased() -> None:
    e, _ = populated()
    before = {flow.key: fields(flow, T0) for flow in e.conntrack}
    restored = roundtrip(e)
    assert (restored.saved_at, restored.elapsed, restored.expired) == (WALL, 0.0, 0)
    assert not restored.clock_went_back
    after = {flow.key: fields(flow, T1) for flow in restored.flows}
    assert after == before
    assert len(after) == 15


def test_order_is_kept() -> None:
    e, _ = populated()
    assert [f.key for f in roundtrip(e).flows] == [f.key for f in e.conntrack]


def test_time_that_passed_is_taken_off() -> None:
    e, _ = populated()
    before = {flow.key: fields(flow, T0) for flow in e.conntrack}
    restored = roundtrip(e, WALL + 25.0)
    assert restored.elapsed == 25.0
    for flow in restored.flows:
        got = fields(flow, T1)
        assert got["remaining"] == round(before[flow.key]["remaining"] - 25.0, 6)
        assert got["age"] == round(before[flow.key]["age"] + 25.0, 6)


def test_flows_whose_time_ran_out_are_not_restored() -> None:
    e, _ = populated()
    restored = roundtrip(e, WALL + 31.0)
    # Left: ESTABLISHED (unacked data: 300 s), FIN_WAIT, CLOSE_WAIT(60), TIME_WAIT, SYN_SENT,
    # SYN_SENT2 (120), SYN_RECV (60), the assured UDP stream (120) and GRE (600). Gone: LAST_ACK
    # (30), CLOSE (10), the unreplied UDP (30) and both echoes (30), the replied UDP (30).
    left = sorted(f.state_name for f in restored.flows)
    assert left == sorted(
        [
            "SYN_SENT",
            "SYN_RECV",
            "ESTABLISHED",
            "FIN_WAIT",
            "CLOSE_WAIT",
            "TIME_WAIT",
            "SYN_SENT2",
            "ASSURED",
            "UNREPLIED",
        ]
    )
    assert restored.expired == 6
    assert all(f.deadline > T1 for f in restored.flows)


def test_a_flow_exactly_at_its_deadline_is_gone() -> None:
    e = new_engine()
    e.process(ipv4(LAN, WAN, 17, udp(LAN, WAN, 41000, 53, b"q")), OUT, T0)  # 30 s
    assert roundtrip(e, WALL + 30.0).flows == []
    assert len(roundtrip(e, WALL + 29.5).flows) == 1


def test_a_wall_clock_set_back_counts_no_time_as_passed() -> None:
    e, _ = populated()
    restored = roundtrip(e, WALL - 3600.0)
    assert (restored.elapsed, restored.clock_went_back, restored.expired) == (0.0, True, 0)
    assert len(restored.flows) == 15


def test_flows_past_their_deadline_at_save_are_left_out() -> None:
    e, _ = populated()
    data = encode(e.conntrack, T0 + 31.0, WALL)  # the table sweeps lazily: they are still in it
    assert len(decode(data, T1, WALL).flows) == 9


@pytest.mark.parametrize("per_step", [1, 3, 1000])
def test_a_table_encoded_in_slices_is_the_table_encoded_at_once(per_step: int) -> None:
    e, _ = populated()
    encoder = snapshot.TableEncoder(e.conntrack, T0 + 31.0, WALL)  # some of them past their deadline
    steps = 1
    while not encoder.step(per_step):
        steps += 1
    assert steps == -(-len(e.conntrack) // per_step)
    assert encoder.result() == snapshot.encode_table(e.conntrack, T0 + 31.0, WALL, exact=False)
    assert encoder.result()[1] == 9


def test_slices_read_each_flow_as_it_is_when_its_slice_comes() -> None:
    e = new_engine()
    for port in (41000, 41001, 41002, 41003):
        e.process(ipv4(LAN, WAN, 17, udp(LAN, WAN, port, 53, b"q")), OUT, T0)
    second = list(e.conntrack)[1]
    encoder = snapshot.TableEncoder(e.conntrack, T0, WALL)
    assert not encoder.step(1)  # 41000, unreplied
    for port in (41000, 41002):  # replied: 41000 after its slice, 41002 before
        e.process(ipv4(WAN, LAN, 17, udp(WAN, LAN, 53, port, b"a")), IN, T0 + 1)
    e.process(ipv4(LAN, WAN, 17, udp(LAN, WAN, 41009, 53, b"q")), OUT, T0 + 1)  # after the start: not in it
    e.conntrack.remove(second)  # 41001, removed before its slice: left out
    while not encoder.step(1):
        pass
    data, count = encoder.result()
    restored = decode(data, T1, WALL)
    assert count == 3 and not restored.exact
    assert [(sport_of(flow), flow.seen_reply) for flow in restored.flows] == [
        (41000, False),
        (41002, True),
        (41003, False),
    ]


def sport_of(flow: Flow) -> int:
    packet = first_packet(flow)
    assert packet is not None
    return packet.sport


def test_an_empty_table() -> None:
    restored = decode(encode([], T0, WALL), T1, WALL + 1)
    assert (restored.flows, restored.expired, restored.elapsed) == ([], 0, 1.0)


def test_metas_are_shared_and_strings_stored_once() -> None:
    e = new_engine()
    for port in range(41000, 41100):
        e.process(ipv4(LAN, WAN, 17, udp(LAN, WAN, port, 53, b"q")), OUT, T0)
    data = encode(e.conntrack, T0, WALL)
    assert data.count(b"lan0") == 1 and data.count(b"default egress") == 1
    flows = decode(data, T1, WALL).flows
    assert len({id(flow.meta) for flow in flows}) == 1 and flows[0].meta == OUT


def test_a_forwarded_flow_stays_one_after_a_restore() -> None:
    """Meta.forwarded is kept (the hook byte's high bit): after a restart, a reload still leaves
    the flow to the forward that admitted it."""
    # Port 25 admitted by the forward only (rule mail keeps 587): a flow restored without its
    # `forwarded` would be left to the rules, and cut.
    shipped = POLICY_FILE.read_text().replace("      pass: false", "      pass: true")
    policy = shipped.replace("ports: [25, 587]", "ports: [587]", 1)
    e = Engine(CompiledPolicy(parse_policy(policy)))
    forwarded = Meta(Hook.FORWARD, "wan0", "lan0", forwarded=True)
    verdict = e.process(ipv4(WAN, MAIL, 6, tcp(WAN, MAIL, 40000, 25, seq=1, flags=SYN)), forwarded, T0)
    assert verdict.reason == "forward smtp"
    data = encode(e.conntrack, T0, WALL)
    assert data.count(bytes((0x80 | Hook.FORWARD,))) >= 1
    (flow,) = decode(data, T1, WALL).flows
    assert (flow.meta, flow.rule) == (forwarded, "forward smtp")
    again = Engine(CompiledPolicy(parse_policy(policy)))
    install(again.conntrack, [flow])
    assert recheck(again) == []  # still the forward's
    again.replace_policy(CompiledPolicy(parse_policy(policy.replace("ports: [25, 587]", "ports: [587]"))))
    assert len(recheck(again)) == 1  # its forward no longer publishes port 25


def test_a_flow_without_meta_or_rule() -> None:
    flow = Flow(b"\x2f" + LAN + WAN, True, T0)
    flow.deadline = T0 + 5
    (back,) = decode(encode([flow], T0, WALL), T1, WALL).flows
    assert (back.meta, back.rule, back.key, back.deadline, back.created) == (None, None, flow.key, T1 + 5, T1)


# -- restored flows carry on as before -----------------------------------------------------------


def continue_both(original: Engine, restored: Engine, step: Callable[[Engine], Verdict]) -> Verdict:
    expected = step(original)
    assert step(restored) == expected
    return expected


def test_restored_connections_behave_as_the_originals() -> None:
    e, convs = populated()
    again = new_engine()
    assert install(again.conntrack, roundtrip(e, WALL, T0).flows).restored == 15
    for name, c in convs.items():
        for flags, data in ((ACK | PSH, b"more"), (ACK, b""), (FIN | ACK, b"")):
            for sender in ("client_sends", "server_sends"):
                seqs = (c.cseq, c.sseq)
                v = getattr(c, sender)(flags, data, now=T0 + 1)
                c.cseq, c.sseq = seqs
                c.e = again
                w = getattr(c, sender)(flags, data, now=T0 + 1)
                c.e = e
                assert w == v, (name, sender, flags)
        now_there = again.conntrack.get(_key_of(again, c))
        assert now_there is not None
        assert fields(now_there, T0) == fields(e.conntrack.get(_key_of(e, c)), T0)  # type: ignore[arg-type]


def test_without_the_snapshot_the_next_segment_is_invalid() -> None:
    _, convs = populated()
    c = convs["ESTABLISHED"]
    c.e = new_engine()  # a restarted daemon that restored nothing
    verdict = c.server_sends(ACK | PSH, b"x", now=T0 + 1)
    assert (verdict.action, verdict.reason) == (
        Action.DROP,
        "invalid: tcp: ACK without a connection (mid-stream pick-up disabled)",
    )


def test_window_checks_still_bite_after_restore() -> None:
    e, convs = populated()
    again = new_engine()
    install(again.conntrack, roundtrip(e, WALL, T0).flows)
    c = convs["ESTABLISHED"]
    c.e = again
    c.cseq += 0x40000000  # far beyond what the server's window allows
    verdict = c.client_sends(ACK | PSH, b"x", now=T0 + 1)
    assert verdict.reason.startswith("invalid: tcp: SEQ is over the upper bound")


# -- a snapshot taken while running: the connections moved on since ------------------------------


def test_a_periodic_snapshot_forgets_tcp_sequence_numbers_and_keeps_the_rest() -> None:
    e, _ = populated()
    before = {flow.key: fields(flow, T0) for flow in e.conntrack}
    restored = roundtrip(e, exact=False)
    assert not restored.exact
    for flow in restored.flows:
        got, was = fields(flow, T1), before[flow.key]
        if flow.tcp is None:
            assert got == was
            continue
        assert {k: v for k, v in got.items() if k != "tcp"} == {k: v for k, v in was.items() if k != "tcp"}
        assert (
            got["tcp"][:5] == was["tcp"][:5] and got["tcp"][6] == was["tcp"][6]
        )  # state, last packet, assured
        for direction in (0, 1):
            side, old = flow.tcp.side(direction), e.conntrack.get(flow.key).tcp.side(direction)  # type: ignore[union-attr]
            assert (side["td_end"], side["td_maxend"], side["td_maxwin"], side["td_maxack"]) == (0, 0, 0, 0)
            assert side["td_scale"] == old["td_scale"]
            assert side["flags"] == (old["flags"] & 0x07) | 0x08  # scale, SACK, CLOSE_INIT kept; BE_LIBERAL


def moved_on(exact: bool) -> tuple[Conversation, Engine]:
    """An established connection (no window scaling: a 64 KB window) saved at T0, then carrying
    140 KB each way, far beyond the windows of the snapshot; the restored engine."""
    e = new_engine()
    c = Conversation(e, LAN, WAN, 40100, 80, OUT)
    c.handshake(opts=sack_perm_option())
    data = encode(e.conntrack, T0, WALL, exact)
    for _ in range(100):
        assert c.client_sends(ACK | PSH, b"u" * 1400, now=T0 + 1).reason == "established"
        assert c.server_sends(ACK | PSH, b"d" * 1400, now=T0 + 1).reason == "established"
    again = new_engine()
    install(again.conntrack, decode(data, T0 + 2, WALL + 2).flows)
    c.e = again
    return c, again


def test_an_exact_snapshot_that_is_stale_would_cut_the_connection() -> None:
    c, _ = moved_on(exact=True)  # what a periodic snapshot restored with its old windows would do
    verdict = c.client_sends(ACK | PSH, b"next", now=T0 + 3)
    assert verdict.reason == "invalid: tcp: SEQ is over the upper bound (over the window of the receiver)"


def test_a_periodic_snapshot_lets_a_connection_that_moved_on_carry_on() -> None:
    c, again = moved_on(exact=False)
    for _ in range(3):
        assert c.client_sends(ACK | PSH, b"next", now=T0 + 3).reason == "established"
        assert c.server_sends(ACK | PSH, b"back", now=T0 + 3).reason == "established"
    flow = again.conntrack.get(_key_of(again, c))
    assert flow is not None and flow.tcp is not None
    assert flow.tcp.side(0)["td_end"] == c.cseq and flow.tcp.side(1)["td_end"] == c.sseq  # learnt anew
    # Liberal, as for a connection picked up mid-stream: only an RST must still be in window.
    c.cseq -= 0x10000000
    assert c.client_sends(RST, now=T0 + 4).reason == "invalid: tcp: RST outside window"
    assert c.client_sends(ACK | PSH, b"x", now=T0 + 4).reason == "established"


# -- into the table ------------------------------------------------------------------------------


def test_install_keeps_assured_flows_out_of_early_drop() -> None:
    e, _ = populated()
    flows = roundtrip(e, WALL, T0).flows
    assured = sum(f.assured for f in flows)
    small = Conntrack(max_flows=len(flows))
    assert install(small, flows).restored == 15
    # A new flow evicts the oldest not-ASSURED one, never an ASSURED one.
    newcomer = Flow(b"\x2f" + LAN + MAIL, True, T0)
    newcomer.deadline = T0 + 600
    assert small.confirm(newcomer) and small.early_drops == 1
    assert sum(f.assured for f in small) == assured == 7
    oldest_unassured = next(f for f in flows if not f.assured)
    assert small.get(oldest_unassured.key) is None


def test_install_into_a_full_table_counts_what_did_not_fit() -> None:
    e, _ = populated()
    flows = [f for f in roundtrip(e, WALL, T0).flows if f.assured]
    small = Conntrack(max_flows=2)
    done = install(small, flows)
    assert (done.restored, done.table_full, len(small)) == (2, 5, 2)


def test_install_leaves_a_key_already_in_the_table_alone() -> None:
    e, _ = populated()
    flows = roundtrip(e, WALL, T0).flows
    table = Conntrack()
    install(table, flows[:3])
    done = install(table, flows)
    assert (done.restored, done.table_full, len(table)) == (12, 0, 15)


def test_restored_flows_expire_on_the_new_clock() -> None:
    e = new_engine()
    e.process(ipv4(LAN, WAN, 17, udp(LAN, WAN, 41000, 53, b"q")), OUT, T0)
    table = Conntrack()
    install(table, decode(encode(e.conntrack, T0, WALL), T1, WALL + 10).flows)
    table.expire(T1 + 19.0)
    assert len(table) == 1
    table.expire(T1 + 21.0)
    assert (len(table), table.expired) == (0, 1)


# -- what is refused, and why --------------------------------------------------------------------

HEADER = struct.Struct("<8sHHQ32s")


def valid() -> bytes:
    e, _ = populated()
    return encode(e.conntrack, T0, WALL)


def resign(body: bytes, version: int = 1) -> bytes:
    """A snapshot with a correct checksum around `body` (what a buggy or foreign writer makes)."""
    return HEADER.pack(b"NFQFWFT\0", version, 0, len(body), hashlib.sha256(body).digest()) + body


def reason(data: bytes) -> str:
    with pytest.raises(SnapshotError) as caught:
        decode(data, T1, WALL)
    return str(caught.value)


def one_flow_body(
    record: bytes, strings: tuple[bytes, ...] = (b"rule x",), count: int = 1, flags: int = 1
) -> bytes:
    table = b"".join(struct.pack("<H", len(s)) + s for s in strings)
    return struct.pack("<dII", WALL, flags, len(strings)) + table + struct.pack("<I", count) + record


def udp_record(
    key: bytes | None = None, flags: int = 1, rule: int = 0, hook: int = 2, tail: bytes = b""
) -> bytes:
    key = key if key is not None else b"\x11" + LAN + b"\xa0\x28" + WAN + b"\x00\x35"
    return bytes((len(key),)) + key + struct.pack("<BddIBII", flags, 10.0, 1.0, rule, hook, 0, 0) + tail


def test_the_hand_made_records_are_valid() -> None:
    """The records below differ from these in the one field named in their message."""
    (flow,) = decode(resign(one_flow_body(udp_record(), (b"lan0",))), T1, WALL).flows
    assert (flow.rule, flow.meta, flow.deadline) == ("lan0", Meta(Hook.FORWARD, "lan0", "lan0"), T1 + 10)
    (flow,) = decode(
        resign(one_flow_body(udp_record(key=TCP_KEY, flags=0x09, tail=tcp_tail()))), T1, WALL
    ).flows
    assert flow.state_name == "ESTABLISHED" and flow.tcp is not None and flow.tcp.assured


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an nfqfw flow snapshot"),
        (b'{"flows": []}\n', "not an nfqfw flow snapshot"),
        (b"NFQFWFT", "not an nfqfw flow snapshot"),
        (b"NFQFWFT\0\x01\x00", "truncated: 10 bytes, the header alone has 52"),
    ],
)
def test_foreign_and_short_files(data: bytes, message: str) -> None:
    assert reason(data) == message


def test_truncated_body() -> None:
    data = valid()
    length = len(data) - HEADER.size
    assert reason(data[:-7]) == f"truncated: {length - 7} of {length} bytes after the header"


def test_bytes_after_the_end() -> None:
    assert reason(valid() + b"\n\n") == "2 bytes after the end of the snapshot"


@pytest.mark.parametrize("where", [HEADER.size, HEADER.size + 20, -1])
def test_a_flipped_byte_fails_the_checksum(where: int) -> None:
    data = bytearray(valid())
    data[where] ^= 0x40
    assert reason(bytes(data)) == "checksum mismatch"


def test_a_wrong_checksum() -> None:
    data = bytearray(valid())
    data[20] ^= 1  # inside the digest
    assert reason(bytes(data)) == "checksum mismatch"


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (2, "format version 2 is newer than this nfqfw reads (it reads version 1)"),
        (0, "format version 0 is unknown to this nfqfw (it reads version 1)"),
    ],
)
def test_other_versions(version: int, message: str) -> None:
    data = valid()
    body = data[HEADER.size :]
    assert reason(resign(body, version)) == message


TCP_KEY = b"\x06" + LAN + b"\xa0\x28" + WAN + b"\x00\x50"
TCP_TAIL_FIELDS = (3, 3, 0, 0, 0, 0, 1, *([0] * 16))  # ESTABLISHED, last packet an ACK, no window data


def tcp_tail(**changed: int) -> bytes:
    """A TCP record part; `changed` by position: f0 (state) .. f6, w0 .. w15 (window words)."""
    names = [f"f{i}" for i in range(7)] + [f"w{i}" for i in range(16)]
    values = dict(zip(names, TCP_TAIL_FIELDS, strict=True)) | changed
    return struct.pack("<7B16I", *values.values())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (one_flow_body(udp_record(rule=7)), "corrupt: flow 1: string 7 of 1"),
        (one_flow_body(udp_record(key=b"\x11" + LAN)), "corrupt: flow 1: malformed flow key"),
        (one_flow_body(udp_record(key=b"")), "corrupt: flow 1: malformed flow key"),
        (one_flow_body(udp_record(flags=0x10)), "corrupt: flow 1: unknown flags 0x10"),
        (one_flow_body(udp_record(flags=0x09)), "corrupt: flow 1: TCP state on a non-TCP flow"),
        (one_flow_body(udp_record(key=TCP_KEY)), "corrupt: flow 1: TCP flow without TCP state"),
        (one_flow_body(udp_record(hook=9)), "corrupt: flow 1: unknown hook 9"),
        (
            one_flow_body(udp_record(key=b"\x01\x03" + LAN + WAN + b"\0\x01\0\0")),
            "corrupt: flow 1: ICMP flow of type 3, not a query",
        ),
        (
            one_flow_body(udp_record(key=TCP_KEY, flags=0x09, tail=tcp_tail(f0=12))),
            "corrupt: flow 1: TCP state 12 out of range",
        ),
        (
            one_flow_body(udp_record(key=TCP_KEY, flags=0x09, tail=tcp_tail(f0=0))),
            "corrupt: flow 1: TCP state 0 out of range",
        ),
        (
            one_flow_body(udp_record(key=TCP_KEY, flags=0x09, tail=tcp_tail(f1=6))),
            "corrupt: flow 1: TCP last packet record out of range",
        ),
        (
            one_flow_body(udp_record(key=TCP_KEY, flags=0x09, tail=tcp_tail(w4=15))),
            "corrupt: flow 1: TCP window scale 15 out of range",
        ),
        (one_flow_body(udp_record(), count=2), "corrupt: flow 2: runs past the end of the snapshot"),
        (one_flow_body(udp_record() * 2, count=2), "corrupt: flow 2: the same key twice"),
        (one_flow_body(udp_record() + b"xyz"), "corrupt: 3 bytes after the last flow"),
        (one_flow_body(udp_record(), strings=(b"\xff\xfe",)), "corrupt: a string is not UTF-8"),
        (struct.pack("<dII", float("nan"), 0, 0), "corrupt: the save time is not a number"),
        (struct.pack("<dII", WALL, 0, 3), "corrupt: runs past the end of the snapshot"),
        (struct.pack("<dI", WALL, 0), "corrupt: runs past the end of the snapshot"),
        (one_flow_body(udp_record(), flags=3), "corrupt: unknown snapshot flags 0x3"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_malformed_content_behind_a_good_checksum(body: bytes, message: str) -> None:
    assert reason(resign(body)) == message


def test_a_time_that_is_not_a_number() -> None:
    record = udp_record()
    at = 1 + record[0] + 1
    bad = record[:at] + struct.pack("<d", float("inf")) + record[at + 8 :]
    assert reason(resign(one_flow_body(bad))) == "corrupt: flow 1: a time is not a number"


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_damage_is_a_snapshot_error_or_an_intact_table(data: st.DataObject) -> None:
    good = SMALL
    spot = data.draw(st.integers(0, len(good) - 1))
    kind = data.draw(st.sampled_from(["flip", "cut", "resign-flip", "resign-cut"]))
    if kind == "cut":
        damaged = good[:spot]
    elif kind == "flip":
        damaged = good[:spot] + bytes((good[spot] ^ data.draw(st.integers(1, 255)),)) + good[spot + 1 :]
    else:
        body = bytearray(good[HEADER.size :])
        at = spot % max(1, len(body))
        if kind == "resign-flip":
            body[at] ^= data.draw(st.integers(1, 255))
        else:
            del body[at:]
        damaged = resign(bytes(body))
    try:
        restored = decode(damaged, T1, WALL)
    except SnapshotError:
        return
    for flow in restored.flows:  # what passes every check is a table the tracker can work with
        Conntrack().restore(flow)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_else(blob: bytes) -> None:
    with pytest.raises(SnapshotError):
        decode(blob, T1, WALL)
    with pytest.raises(SnapshotError):
        decode(b"NFQFWFT\0" + blob, T1, WALL)


def _small() -> bytes:
    e = new_engine()
    Conversation(e, LAN, WAN, 40000, 80, OUT).handshake()
    e.process(ipv6(LAN6, WAN6, 17, udp(LAN6, WAN6, 41001, 53, b"q")), OUT, T0)
    return encode(e.conntrack, T0, WALL)


SMALL = _small()
