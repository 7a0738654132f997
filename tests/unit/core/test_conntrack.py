"""nfqfw.core.conntrack: expiry, pending flows, fragments, the table bound (clock injected).

The protocols' lifecycles are tested with their trackers, in tests/unit/core/l4/."""

from __future__ import annotations

from conntrack_packets import LAN, WAN, admit, echo4, pkt, udp4

from nfqfw.core.build import ipv4
from nfqfw.core.conntrack import Conntrack
from nfqfw.core.verdict import Ct


def test_udp_expires_exactly_at_deadline() -> None:
    ct = Conntrack()
    flow = admit(ct, udp4(LAN, WAN, 40000, 53), 100.0).flow
    assert flow is not None
    ct.track(pkt(udp4(WAN, LAN, 53, 40000)), 101.0)
    assert flow.deadline == 131.0
    tracked = ct.track(pkt(udp4(LAN, WAN, 40000, 53)), 131.0)
    assert tracked.ct is Ct.NEW
    assert tracked.new is True
    assert tracked.flow is not flow
    assert tracked.flow is not None and tracked.flow.deadline == 161.0
    assert ct.expired == 1
    assert len(ct) == 0


def test_udp_alive_just_before_deadline() -> None:
    ct = Conntrack()
    flow = admit(ct, udp4(LAN, WAN, 40000, 53), 100.0).flow
    assert flow is not None
    tracked = ct.track(pkt(udp4(WAN, LAN, 53, 40000)), 129.5)
    assert tracked.ct is Ct.ESTABLISHED
    assert tracked.flow is flow
    assert flow.deadline == 249.5
    assert ct.expired == 0


def test_expire_sweeps_due_flows() -> None:
    ct = Conntrack()
    admit(ct, udp4(LAN, WAN, 40000, 53), 100.0)
    admit(ct, echo4(LAN, WAN, 8, 7), 100.0)
    ct.expire(129.0)
    assert len(ct) == 2
    ct.expire(131.0)
    assert len(ct) == 0
    assert ct.expired == 2


def test_unconfirmed_flow_is_not_in_table() -> None:
    ct = Conntrack()
    tracked = ct.track(pkt(udp4(LAN, WAN, 40000, 53)), 100.0)
    assert tracked.new and len(ct) == 0
    again = ct.track(pkt(udp4(LAN, WAN, 40000, 53)), 101.0)
    assert again.new and again.ct is Ct.NEW


# -- fragments -----------------------------------------------------------------------------


def test_non_first_fragment_is_untracked() -> None:
    data = ipv4(LAN, WAN, 17, b"\0" * 16, more_fragments=False, frag_offset=8)
    tracked = Conntrack().track(pkt(data), 1.0)
    assert tracked.ct is Ct.UNTRACKED
    assert tracked.reason == "untracked: non-first fragment"
    assert tracked.flow is None


# -- table bound ---------------------------------------------------------------------------


def test_full_table_evicts_oldest_unassured() -> None:
    ct = Conntrack(max_flows=3)
    flows = [admit(ct, udp4(LAN, WAN, 40000 + i, 53), 1.0 + i).flow for i in range(3)]
    assert len(ct) == 3
    fourth = admit(ct, udp4(LAN, WAN, 40003, 53), 5.0).flow
    assert len(ct) == 3
    assert ct.early_drops == 1
    assert flows[0] is not None and ct.get(flows[0].key) is None
    assert all(f is not None and ct.get(f.key) is f for f in (flows[1], flows[2], fourth))


def test_full_table_skips_assured_flows() -> None:
    ct = Conntrack(max_flows=2)
    first = admit(ct, udp4(LAN, WAN, 40000, 53), 1.0).flow
    second = admit(ct, udp4(LAN, WAN, 40001, 53), 1.0).flow
    assert first is not None and second is not None
    ct.track(pkt(udp4(WAN, LAN, 53, 40000)), 2.0)
    ct.track(pkt(udp4(LAN, WAN, 40000, 53)), 4.0)
    assert first.assured
    admit(ct, udp4(LAN, WAN, 40002, 53), 5.0)
    assert ct.get(first.key) is first
    assert ct.get(second.key) is None


def test_full_table_of_assured_flows_refuses() -> None:
    ct = Conntrack(max_flows=1)
    first = admit(ct, udp4(LAN, WAN, 40000, 53), 1.0).flow
    assert first is not None
    ct.track(pkt(udp4(WAN, LAN, 53, 40000)), 2.0)
    ct.track(pkt(udp4(LAN, WAN, 40000, 53)), 4.0)
    assert first.assured
    tracked = ct.track(pkt(udp4(LAN, WAN, 40001, 53)), 5.0)
    assert tracked.new and tracked.flow is not None
    assert ct.confirm(tracked.flow) is False
    assert len(ct) == 1
    assert ct.early_drops == 0


def test_a_removed_flow_confirmed_again_goes_to_the_back_of_the_early_drop_order() -> None:
    ct = Conntrack(max_flows=3)
    first, second, third = (admit(ct, udp4(LAN, WAN, 40000 + i, 53), 1.0 + i).flow for i in range(3))
    assert first is not None and second is not None and third is not None
    ct.remove(first)
    assert ct.get(first.key) is None and first.deadline == 31.0  # the handle keeps its values
    assert ct.confirm(first)  # back in, as the newest
    assert ct.get(first.key) is first
    admit(ct, udp4(LAN, WAN, 40003, 53), 5.0)  # full: the oldest not-ASSURED flow goes
    assert ct.early_drops == 1
    assert ct.get(second.key) is None
    assert ct.get(first.key) is first and ct.get(third.key) is third


# -- the fast path's view ------------------------------------------------------------------


def test_the_view_follows_the_table_through_clear() -> None:
    ct = Conntrack()
    view = ct.view()
    flow = admit(ct, udp4(LAN, WAN, 40000, 53), 100.0).flow
    assert flow is not None
    assert view.table is ct.table and view.slot_of(flow.key) == ct.slots()[0]
    assert list(view.expiry_due) == [131]  # its deadline 130.0, swept once that second has passed
    pending = ct.track(pkt(udp4(LAN, WAN, 40001, 53)), 101.0)
    assert pending.flow is not None and view.slot_of(pending.flow.key) is None  # confirmed flows only
    ct.clear()
    assert view.slot_of(flow.key) is None and list(view.expiry_due) == []
    again = admit(ct, udp4(LAN, WAN, 40000, 53), 200.0).flow
    assert again is not None and view.slot_of(again.key) == ct.slots()[0]


def test_memory_follows_max_flows_under_churn() -> None:
    """A random-source SYN flood into a full table of unassured flows: every new flow evicts
    one (early drop) long before any timeout comes due, yet the expiry wheel and the early-drop
    queue keep a bounded number of entries (before the compaction: one dead entry per SYN)."""
    from conntrack_packets import tcp4

    from nfqfw.core.conntrack import WHEEL_SLACK

    max_flows, syns = 500, 100_000
    ct = Conntrack(max_flows=max_flows)
    most_filed = most_queued = 0
    for n in range(syns):
        source = (0x0A000000 + n).to_bytes(4, "big")  # 10.0.0.0 + n: a new source each time
        admit(ct, tcp4(source, WAN, 40000, 25, 0x02, seq=n), now=1.0 + n / 100_000)
        most_filed = max(most_filed, ct.expiry_entries)
        most_queued = max(most_queued, len(ct._unassured))
    assert len(ct) == max_flows
    assert ct.early_drops == syns - max_flows
    assert most_filed <= 2 * max_flows + WHEEL_SLACK + 1
    assert most_queued <= 2 * max_flows + 64 + 1
