"""Multipath DATAGRAM schedulers (quic/scheduler.py) on fake paths with a fake clock: which path is usable,
minrtt's shared queue, wlb's flow pinning by capacity, spilling, earliest-arrival for unpinned packets,
rebalancing when a path comes back, and the backup rule."""

from collections import deque

import pytest

from mqvpn.quic.path import Path, PathState
from mqvpn.quic.recovery import Recovery, SentPacket
from mqvpn.quic.scheduler import BULK_PACKETS, QUEUE_MAX_DELAY, REBALANCE_INTERVAL, create


class FakeConn:
    def __init__(self, name, rates_rtts, queue_limit=1000):
        self.is_client = True
        self._now = 0.0
        self._datagrams = deque()
        self.datagrams_dropped = 0
        self._room_mtu = 1200
        self._paths = {}
        self.status = []
        for pid, (mbit, rtt) in enumerate(rates_rtts):
            self.add_path(pid, mbit, rtt)
        self.sched = create(name, self, queue_limit)

    def add_path(self, pid, mbit, rtt):
        rec = Recovery()
        rec.rtt.update(rtt, 0.0, True, 0.025)
        rec.bandwidth = mbit * 1e6 / 8
        rec.bandwidth_measured = True  # as if the path had been loaded
        rec.cc.congestion_window = 2 * 1200  # the capacity must come from the measured rate here
        p = Path(pid, ("10.0.0.%d" % pid, 1), ("192.0.2.1", 443), rec, 1400)
        p.state = PathState.ACTIVE
        p.validated = True
        self._paths[pid] = p
        return p

    def set_path_status(self, path_id, available):
        self.status.append((path_id, available))
        self._paths[path_id].local_backup = not available

    def refresh(self, dt=0.0):
        self._now += dt
        return self.sched.refresh(self._now)

    def where(self, flow):
        return self.sched.pins[flow][0]


def tcp(i):
    return 0x1000 + i


def busy(c, flows, n=BULK_PACKETS):
    """Each flow sends ``n`` packets (from BULK_PACKETS on a flow counts as load); queues are emptied after, as
    the paths would send them."""
    for _ in range(n):
        for f in flows:
            c.sched.enqueue(b"x", tcp(f))
    for p in c._paths.values():
        p.dgrams.clear()


def test_usable_paths_lowest_rtt_first_and_the_rules():
    c = FakeConn("minrtt", [(100, 0.06), (300, 0.02), (50, 0.04)])
    assert [p.path_id for p in c.refresh()] == [1, 2, 0]
    c._paths[1].recovery.pto_count = 1  # one PTO outstanding: no new data
    assert [p.path_id for p in c.refresh()] == [2, 0]
    c._paths[1].recovery.pto_count = 0
    c._paths[2].dead_since = 0.0
    c._paths[0].state = PathState.VALIDATING
    assert [p.path_id for p in c.refresh()] == [1]
    # a path whose oldest packet waits longer than a PTO is not given more, even before its PTO fires
    c._paths[2].dead_since = None
    rec = c._paths[1].recovery
    rec.on_packet_sent(_space(rec), SentPacket(0, c._now, 1200, True, True))
    assert [p.path_id for p in c.refresh(0.001)] == [1, 2]
    assert [p.path_id for p in c.refresh(rec.pto_duration())] == [2]
    # nothing healthy: the active paths with the fewest PTOs (a connection keeps sending somewhere)
    c._paths[2].recovery.pto_count = 2
    assert [p.path_id for p in c.refresh()] == [1]


def _space(rec):
    from mqvpn.quic.recovery import SentSpace

    s = SentSpace("app")
    rec.spaces.append(s)
    return s


def test_single_path_is_always_used():
    c = FakeConn("wlb", [(10, 0.05)])
    c._paths[0].recovery.pto_count = 5
    assert [p.path_id for p in c.refresh()] == [0]
    assert c.sched.enqueue(b"x", tcp(1))
    assert len(c._paths[0].dgrams) == 1


def test_minrtt_uses_the_shared_queue():
    c = FakeConn("minrtt", [(300, 0.02), (80, 0.06)])
    c.refresh()
    for i in range(10):
        assert c.sched.enqueue(b"x", tcp(i % 3))
    assert len(c._datagrams) == 10 and not any(p.dgrams for p in c._paths.values())


def test_queue_limit_drops_and_counts_nothing_itself():
    c = FakeConn("minrtt", [(300, 0.02)], queue_limit=5)
    c.refresh()
    assert all(c.sched.enqueue(b"x", 0) for _ in range(5))
    assert not c.sched.enqueue(b"x", 0)


def test_wlb_spreads_flows_in_proportion_to_capacity():
    c = FakeConn("wlb", [(300, 0.02), (80, 0.06)])
    c.refresh()
    for f in range(16):
        c.sched.enqueue(b"x", tcp(f))
    on = [c.where(tcp(f)) for f in range(16)]
    assert on.count(1) == round(16 * 80 / 380)  # 3 of 16 on B, 13 on A
    # a flow stays where it was pinned
    for _ in range(5):
        for f in range(16):
            c.sched.enqueue(b"x", tcp(f))
    assert [c.where(tcp(f)) for f in range(16)] == on


def test_wlb_single_flow_goes_to_the_faster_path():
    for rates in ([(80, 0.06), (300, 0.02)], [(300, 0.02), (80, 0.06)]):
        c = FakeConn("wlb", rates)
        c.refresh()
        c.sched.enqueue(b"x", tcp(0))
        fast = 0 if rates[0][0] == 300 else 1
        assert c.where(tcp(0)) == fast


def test_wlb_unpinned_packets_take_the_earliest_arrival():
    c = FakeConn("wlb", [(300, 0.02), (80, 0.06)])
    c.refresh()
    c.sched.enqueue(b"ping", 0)
    assert len(c._paths[0].dgrams) == 1  # a lone ping takes the fast path
    # a burst spreads: once A's queue wait exceeds the 20 ms one-way difference, B delivers earlier
    for _ in range(2000):
        c.sched.enqueue(b"x" * 1300, 0)
    a, b = len(c._paths[0].dgrams), len(c._paths[1].dgrams)
    assert a > b > 0
    # ... so that the last packet on either arrives at about the same time (queue wait + one-way delay)
    arrive_a = a * 1400 / 37.5e6 + 0.01
    arrive_b = b * 1400 / 10e6 + 0.03
    assert arrive_a == pytest.approx(arrive_b, abs=2 * 1400 / 10e6)


def test_wlb_pinned_flow_spills_only_when_its_path_queue_is_full():
    c = FakeConn("wlb", [(300, 0.02), (80, 0.06)], queue_limit=100000)
    c.refresh()
    c.sched.enqueue(b"x", tcp(0))
    a, b = c._paths[0], c._paths[1]
    cap = int(300e6 / 8 * QUEUE_MAX_DELAY / 1400)  # 100 ms of A's rate
    for _ in range(cap - 1):
        c.sched.enqueue(b"x" * 1300, tcp(0))
    assert len(a.dgrams) == cap and len(b.dgrams) == 0 and c.sched.spills == 0  # no reordering before that
    for _ in range(50):
        assert c.sched.enqueue(b"x" * 1300, tcp(0))
    assert len(b.dgrams) == 50 and c.sched.spills == 50 and c.where(tcp(0)) == 0  # spilled, still pinned to A
    # when every queue is full, packets are dropped (the inner TCP backs off)
    for _ in range(int(80e6 / 8 * QUEUE_MAX_DELAY / 1400)):
        c.sched.enqueue(b"x" * 1300, tcp(0))
    assert not c.sched.enqueue(b"x" * 1300, tcp(0))


def test_wlb_pins_move_off_a_path_that_stops_being_usable_and_its_queue_too():
    c = FakeConn("wlb", [(300, 0.02), (80, 0.06)])
    c.refresh()
    for f in range(8):
        for _ in range(3):
            c.sched.enqueue(b"x", tcp(f))
    a, b = c._paths[0], c._paths[1]
    queued = len(a.dgrams) + len(b.dgrams)
    a.dead_since = c._now
    c.refresh(0.01)
    assert not a.dgrams and len(b.dgrams) == queued  # nothing lost
    for f in range(8):
        c.sched.enqueue(b"x", tcp(f))
    assert all(c.where(tcp(f)) == 1 for f in range(8))


def test_wlb_returning_path_is_used_again_within_seconds_without_a_reshuffle():
    c = FakeConn("wlb", [(300, 0.02), (80, 0.06)])
    a = c._paths[0]
    a.dead_since = 0.0
    c.refresh()
    busy(c, range(16))
    assert all(c.where(tcp(f)) == 1 for f in range(16))
    a.dead_since = None  # A answers again
    moved = []
    for second in range(1, 11):
        for _ in range(10):
            c.refresh(REBALANCE_INTERVAL / 10)
            busy(c, range(16), 8)
        moved.append(sum(1 for f in range(16) if c.where(tcp(f)) == 0))
    assert moved[1] >= 1  # A carries a flow within a maintenance round or two
    assert all(m2 - m1 <= 2 for m1, m2 in zip([0] + moved, moved))  # a few flows per second, not all at once
    assert moved[-1] in (12, 13)  # and ends in proportion to capacity (within the move hysteresis)


def test_wlb_single_flow_returns_to_the_faster_path():
    c = FakeConn("wlb", [(300, 0.02), (80, 0.06)])
    a = c._paths[0]
    a.dead_since = 0.0
    c.refresh()
    busy(c, [0])
    assert c.where(tcp(0)) == 1
    a.dead_since = None
    for _ in range(int(1.5 * 10)):
        c.refresh(REBALANCE_INTERVAL / 10)
        busy(c, [0], 8)
    assert c.where(tcp(0)) == 0


def test_wlb_forgets_idle_pins():
    c = FakeConn("wlb", [(300, 0.02), (80, 0.06)])
    c.refresh()
    c.sched.enqueue(b"x", tcp(0))
    assert tcp(0) in c.sched.pins
    c.refresh(31.0)
    c.refresh(1.1)
    assert tcp(0) not in c.sched.pins


def test_backup_paths_only_when_no_available_path_is_usable():
    c = FakeConn("backup", [(300, 0.02)])
    c.refresh()
    b = c.add_path(1, 80, 0.01)  # faster RTT, but a backup
    c.sched.on_path_opened(b)
    assert c.status == [(1, False)] and b.backup
    assert [p.path_id for p in c.refresh()] == [0]
    c._paths[0].dead_since = c._now
    assert [p.path_id for p in c.refresh()] == [1]
    # the peer's wish counts as much as ours, under any scheduler
    w = FakeConn("wlb", [(300, 0.02), (80, 0.06)])
    w._paths[1].peer_backup = True
    assert [p.path_id for p in w.refresh()] == [0]


def test_unknown_scheduler_name():
    with pytest.raises(ValueError, match="wlb"):
        create("fec", FakeConn("minrtt", []), 10)


def test_wlb_explores_an_unmeasured_path_with_one_flow():
    """A path that never carried a flow looks slow (its rate is what it was given): with at least as many
    flows as paths, maintenance gives it one, so its capacity gets measured."""
    c = FakeConn("wlb", [(300, 0.02), (0.5, 0.06)])  # B measured at almost nothing
    c.refresh()
    busy(c, range(4))
    assert all(c.where(tcp(f)) == 0 for f in range(4))
    for _ in range(12):
        c.refresh(REBALANCE_INTERVAL / 10)
        busy(c, range(4), 8)
    assert sum(c.where(tcp(f)) == 1 for f in range(4)) == 1
    # one flow alone stays on the fast path
    single = FakeConn("wlb", [(300, 0.02), (0.5, 0.06)])
    single.refresh()
    busy(single, [0])
    for _ in range(30):
        single.refresh(REBALANCE_INTERVAL / 10)
        busy(single, [0], 8)
    assert single.where(tcp(0)) == 0


def test_a_path_still_searching_its_mtu_waits():
    c = FakeConn("wlb", [(300, 0.02), (80, 0.06)])
    c._room_mtu = 1400
    c._paths[1].mtu = 1200  # just validated, PMTU search not done: larger DATAGRAMs would not fit
    assert [p.path_id for p in c.refresh()] == [0]
    c._paths[1].mtu = 1452
    assert [p.path_id for p in c.refresh()] == [0, 1]


def test_a_reopened_link_inherits_its_capacity():
    c = FakeConn("wlb", [(300, 0.02), (80, 0.06)])
    c.refresh()
    busy(c, [0])
    assert c.where(tcp(0)) == 0
    del c._paths[0]  # link A lost: path 0 abandoned and forgotten; the flow moves to B
    c.refresh(0.5)
    busy(c, [0], 8)
    assert c.where(tcp(0)) == 1
    a2 = c.add_path(2, 0.01, 0.02)  # A back as path 2: nothing measured yet
    a2.recovery.bandwidth = 0.0
    a2.recovery.bandwidth_measured = False
    c.sched.inherit(0, 2)
    for _ in range(15):
        c.refresh(REBALANCE_INTERVAL / 10)
        busy(c, [0], 8)
    assert c.where(tcp(0)) == 2  # the flow returns to the faster link


def test_wlb_unloaded_paths_rank_as_the_best_and_ties_go_to_the_lower_rtt():
    """A path never loaded has only shown what it was given: it must not lose flows for that. With nothing
    measured a lone flow takes the lower-RTT path even if the other's window looks larger."""
    c = FakeConn("wlb", [(1, 0.02), (1, 0.06)])
    for p in c._paths.values():
        p.recovery.bandwidth = 0.0
        p.recovery.bandwidth_measured = False
    c._paths[1].recovery.cc.congestion_window = 100 * 1200  # B's idle window looks large
    c.refresh()
    c.sched.enqueue(b"x", tcp(0))
    assert c.where(tcp(0)) == 0
    # A measured at 100 Mbit/s, B never loaded: B counts as 100 too, so new flows also go there and measure it
    a = c._paths[0].recovery
    a.bandwidth, a.bandwidth_measured = 100e6 / 8, True
    busy(c, [0])
    c.refresh(0.1)
    for f in range(1, 8):
        c.sched.enqueue(b"x", tcp(f))
    assert sum(c.where(tcp(f)) == 1 for f in range(8)) >= 3


def test_wlb_a_quiet_older_flow_does_not_push_a_new_bulk_flow_off_the_fast_path():
    """iperf3, ssh and the like open a control connection first: it must not count as load, else the bulk
    transfer that follows lands on the slow path. Flows starting together (within 20 ms) do spread."""
    c = FakeConn("wlb", [(100, 0.02), (40, 0.06)])
    c.refresh()
    busy(c, [0], 5)  # control connection: a few packets
    c.refresh(0.03)
    busy(c, [1])  # the bulk flow, 30 ms (a couple of round trips) later
    assert c.where(tcp(0)) == 0 and c.where(tcp(1)) == 0
    c.refresh(0.2)
    for f in range(10, 17):  # seven flows at once: 5 on A, 2 on B (100:40)
        c.sched.enqueue(b"x", tcp(f))
    assert sum(c.where(tcp(f)) == 1 for f in range(10, 17)) == 2


def test_wlb_a_finished_flow_stops_counting_at_its_fin():
    """A transfer that ended must not push the next one off the fast path while its pin is still fresh."""
    c = FakeConn("wlb", [(100, 0.02), (80, 0.06)])
    c.refresh()
    busy(c, [0])
    c.refresh(1.1)  # a maintenance round: flow 0 counts as load on A
    assert c.sched.flows[0] == 1
    c.sched.enqueue(b"fin", -tcp(0))  # its FIN: still sent on A, no longer load
    assert c.where(tcp(0)) == 0 and c.sched.flows[0] == 0
    busy(c, [0], 3)  # the last ACKs do not make it busy again
    assert c.sched.flows[0] == 0
    busy(c, [1])  # the next transfer, 100 ms later
    assert c.where(tcp(1)) == 0
