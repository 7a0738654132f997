"""nfqfw.service.offload: the offloaded flows' records against a stand-in kernel table."""

from __future__ import annotations

import socket

from nfqfw.core.build import addr, ipv4, tcp
from nfqfw.core.config import parse_policy
from nfqfw.core.engine import Engine
from nfqfw.core.packet import ACK, SYN
from nfqfw.core.policy import CompiledPolicy
from nfqfw.core.verdict import Hook, Meta
from nfqfw.firewall.marks import Marks
from nfqfw.kernel.ctnetlink import IPS_ASSURED, IPS_SEEN_REPLY, CtEntry, CtnetlinkError
from nfqfw.service.offload import SYNC_PERIOD, Offload, key_of

POLICY = "zones: {external: [wan0], internal: [lan0]}\noptions: {offload: established}\n"
OUT, IN = Meta(Hook.FORWARD, "lan0", "wan0"), Meta(Hook.FORWARD, "wan0", "lan0")
LAN, WAN, SERVER = addr("10.0.0.5"), addr("203.0.113.7"), addr("10.0.0.80")


class Kernel:
    """A stand-in ctnetlink: entries to dump, what was deleted, or an error."""

    def __init__(self, entries: list[CtEntry]) -> None:
        self.entries = entries
        self.deleted: list[CtEntry] = []
        self.error: Exception | None = None
        self.dumps: list[tuple[int, int]] = []

    def dump(self, mark: int, mask: int) -> list[CtEntry]:
        self.dumps.append((mark, mask))
        if self.error is not None:
            raise self.error
        return [e for e in self.entries if e.mark & mask == mark]

    def delete(self, entries: list[CtEntry]) -> int:
        self.deleted += entries
        self.entries = [e for e in self.entries if e not in entries]
        return len(entries)

    def close(self) -> None:
        pass


def offloaded_engine(*ports: int) -> Engine:
    """An engine whose TCP connections from LAN to WAN:80 (one per port) were handed over."""
    e = Engine(CompiledPolicy(parse_policy(POLICY)))
    for port in ports:
        e.process(ipv4(LAN, WAN, 6, tcp(LAN, WAN, port, 80, seq=1, flags=SYN)), OUT, 1.0)
        e.process(ipv4(WAN, LAN, 6, tcp(WAN, LAN, 80, port, seq=9, ack=2, flags=SYN | ACK)), IN, 1.0)
        assert e.process(
            ipv4(LAN, WAN, 6, tcp(LAN, WAN, port, 80, seq=2, ack=10, flags=ACK)), OUT, 1.0
        ).offload
    assert len(e.offloaded) == len(ports) and len(e.conntrack) == 0
    return e


def entry(port: int, timeout: int = 431000, state: int = 3, mark: int = 0x21000000) -> CtEntry:
    return CtEntry(
        4, 6, LAN, WAN, port, 80, status=IPS_SEEN_REPLY | IPS_ASSURED, timeout=timeout, mark=mark,
        tcp_state=state, reply_src=WAN, reply_sport=80,
    )  # fmt: skip


def offload(kernel: Kernel) -> Offload:
    return Offload(Marks(), lambda: kernel)


def test_sync_follows_the_kernel_and_drops_what_it_ended() -> None:
    e = offloaded_engine(40000, 40001)
    kernel = Kernel([entry(40000, timeout=100, state=7)])  # 40001 ended in the kernel
    ended = offload(kernel).sync(e, 50.0)
    assert ended == 1 and kernel.dumps == [(0x20000000, 0x20000000)]
    (flow,) = e.offloaded
    assert flow.key == key_of(entry(40000))
    assert (flow.state_name, flow.deadline) == ("TIME_WAIT", 50.0 + 100 + SYNC_PERIOD)


def test_tick_every_period_and_only_with_offload() -> None:
    e = offloaded_engine(40000)
    kernel = Kernel([entry(40000)])
    keeper = offload(kernel)
    assert keeper.tick(e, 10.0) == 10.0 + SYNC_PERIOD and keeper.tick(e, 11.0) == 10.0 + SYNC_PERIOD
    assert len(kernel.dumps) == 1
    plain = Engine(CompiledPolicy(parse_policy(POLICY.replace("established", "off"))))
    assert offload(kernel).tick(plain, 10.0) == float("inf")


def test_revoke_deletes_the_kernel_entries_and_the_records() -> None:
    e = offloaded_engine(40000, 40001)
    kernel = Kernel([entry(40000), entry(40001)])
    flows = [flow for flow in e.offloaded if flow.key == key_of(entry(40001))]
    assert offload(kernel).revoke(e, flows) == 1
    assert kernel.deleted == [entry(40001)] and len(e.offloaded) == 1


def test_a_kernel_that_cannot_be_read_leaves_the_records() -> None:
    e = offloaded_engine(40000)
    kernel = Kernel([])
    kernel.error = CtnetlinkError("conntrack dump failed: Operation not permitted")
    assert offload(kernel).sync(e, 50.0) == 0 and len(e.offloaded) == 1


def test_a_dnat_entry_is_matched_by_where_the_flow_goes() -> None:
    e = Engine(
        CompiledPolicy(
            parse_policy(POLICY + "ingress: [{name: web, proto: tcp, ports: 80, action: accept}]\n")
        )
    )
    e.process(ipv4(WAN, SERVER, 6, tcp(WAN, SERVER, 5555, 80, seq=1, flags=SYN)), IN, 1.0)
    e.process(ipv4(SERVER, WAN, 6, tcp(SERVER, WAN, 80, 5555, seq=9, ack=2, flags=SYN | ACK)), OUT, 1.0)
    assert e.process(
        ipv4(WAN, SERVER, 6, tcp(WAN, SERVER, 5555, 80, seq=2, ack=10, flags=ACK)), IN, 1.0
    ).offload
    public = socket.inet_aton("203.0.113.1")
    forwarded = CtEntry(
        4, 6, WAN, public, 5555, 8080, timeout=60, mark=0x20000000, reply_src=SERVER, reply_sport=80
    )
    kernel = Kernel([forwarded])
    assert offload(kernel).sync(e, 2.0) == 0
    (flow,) = e.offloaded
    assert flow.rule == "rule web"
    assert offload(kernel).revoke(e, [flow]) == 1 and kernel.deleted == [forwarded]


def test_adopt_keeps_what_the_kernel_carries_and_takes_back_the_rest() -> None:
    saved = list(offloaded_engine(40000, 40001).offloaded)
    e = Engine(CompiledPolicy(parse_policy(POLICY)))
    kernel = Kernel([entry(40000)])
    assert offload(kernel).adopt(e, saved, 5.0) == (1, 1)
    assert [f.key for f in e.offloaded] == [key_of(entry(40000))]
    assert [f.key for f in e.conntrack] == [key_of(entry(40001))]


def test_udp_and_other_protocols() -> None:
    datagram = CtEntry(
        6, 17, addr("fd00::5"), addr("2001:db8::7"), 5353, 53, reply_src=addr("2001:db8::7"), reply_sport=53
    )
    assert key_of(datagram) is not None
    assert key_of(CtEntry(4, 1, LAN, WAN, icmp=(8, 0, 7))) is None


class FakeRoutes:
    """A stand-in nfqfw.kernel.routes.RouteMeta: the LAN inside, everything else outside."""

    closed = 0

    def __call__(self, src: bytes, dst: bytes) -> Meta | None:
        return OUT if src == LAN else IN if dst == LAN else None

    def close(self) -> None:
        FakeRoutes.closed += 1


def peer_offload(kernel: Kernel, owner: int | None = None) -> Offload:
    keeper = Offload(Marks(), lambda: kernel, owner=owner, route_meta=FakeRoutes)
    keeper.reasons = ["rule web"]
    return keeper


def test_take_over_makes_records_of_the_entries_an_ha_peer_admitted() -> None:
    marks = Marks()
    egress = marks.offload | marks.rule_marks([])["default egress"]
    e = Engine(CompiledPolicy(parse_policy(POLICY)))
    kernel = Kernel([entry(40000, timeout=100, mark=egress), entry(40001, mark=0x21000000)])
    assert peer_offload(kernel).take_over(e, 10.0) == 1  # 40001: a worker's (owner field 0)
    (flow,) = e.offloaded
    assert flow.key == key_of(entry(40000))
    assert (flow.rule, flow.meta, flow.state_name) == ("default egress", OUT, "ESTABLISHED")
    assert flow.deadline == 10.0 + 100 + SYNC_PERIOD and flow.assured and flow.seen_reply
    assert peer_offload(kernel).take_over(e, 11.0) == 0  # known now
    assert peer_offload(kernel, owner=0).take_over(e, 11.0) == 1  # the worker of queue index 0
    assert FakeRoutes.closed >= 2


def test_a_flow_taken_over_is_rechecked_by_a_reload() -> None:
    from nfqfw.core.recheck import stale_flows

    e = Engine(CompiledPolicy(parse_policy(POLICY)))
    kernel = Kernel([entry(40000, mark=Marks().offload)])  # rule field unknown: judged all the same
    keeper = peer_offload(kernel)
    assert keeper.sync(e, 1.0) == 0 and len(e.offloaded) == 1
    (flow,) = e.offloaded
    assert flow.rule is None and flow.meta == OUT
    no_web = POLICY + "egress: [{name: no-web, proto: tcp, ports: 80, action: reject}]\n"
    e.replace_policy(CompiledPolicy(parse_policy(no_web)))
    assert keeper.revoke(e, stale_flows(e, list(e.offloaded))) == 1
    assert kernel.deleted == [entry(40000, mark=Marks().offload)] and len(e.offloaded) == 0


def test_take_over_replaces_a_stale_record_of_nfqfw_s_own() -> None:
    e = Engine(CompiledPolicy(parse_policy(POLICY)))
    e.process(ipv4(LAN, WAN, 6, tcp(LAN, WAN, 40000, 80, seq=1, flags=SYN)), OUT, 1.0)
    assert len(e.conntrack) == 1
    assert peer_offload(Kernel([entry(40000, mark=Marks().offload)])).take_over(e, 2.0) == 1
    assert len(e.conntrack) == 0 and len(e.offloaded) == 1


def test_a_flow_a_forward_admitted_is_taken_over_as_forwarded() -> None:
    marks = Marks()
    keeper = peer_offload(Kernel([]))
    keeper.reasons = ["rule web", "forward www", "default between"]
    mark = marks.offload | marks.rule_marks(keeper.reasons)["forward www"]
    flow = keeper.record_of(entry(40000, mark=mark), FakeRoutes(), 1.0)
    assert flow is not None and flow.rule == "forward www"
    assert flow.meta == Meta(Hook.FORWARD, "lan0", "wan0", forwarded=True)
