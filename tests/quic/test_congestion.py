import math

import pytest

from mqvpn.quic.congestion import (
    CongestionController,
    Cubic,
    NewReno,
    Pacer,
    available,
    create,
    initial_window,
    minimum_window,
    register,
)
from mqvpn.quic.congestion.cubic import BETA, C
from mqvpn.quic.recovery import RttEstimator

MSS = 1200


def rtt_of(srtt: float) -> RttEstimator:
    r = RttEstimator()
    r.update(srtt, 0.0, True, 0.025)
    return r


# -- common ---------------------------------------------------------------------------------------------
def test_initial_and_minimum_window():
    assert initial_window(1200) == 12000
    assert initial_window(1472) == 14720
    assert initial_window(1500) == 14720
    assert initial_window(9000) == 18000
    assert initial_window(1000) == 10000
    assert minimum_window(1200) == 2400
    for name in ("newreno", "cubic"):
        cc = create(name, 1350)
        assert cc.congestion_window == initial_window(1350)
        assert cc.minimum_window == 2700
        assert cc.ssthresh == math.inf


def test_registry():
    assert {"newreno", "cubic"} <= set(available())
    assert isinstance(create("cubic"), Cubic)
    assert isinstance(create("NewReno"), NewReno)
    with pytest.raises(ValueError, match="available"):
        create("bbr9")
    with pytest.raises(TypeError):
        register("nope", int)

    class Fixed(CongestionController):
        def on_packets_acked(self, *a):
            pass

        def on_congestion_event(self, sent_time, now):
            pass

    register("fixed-test", Fixed)
    try:
        cc = create("fixed-test", 1000)
        assert isinstance(cc, Fixed) and cc.congestion_window == 10000
        assert "fixed-test" in available()
    finally:
        from mqvpn.quic.congestion import base

        base._registry.pop("fixed-test")


@pytest.mark.parametrize("name", ["newreno", "cubic"])
def test_max_datagram_size_change(name):
    cc = create(name, 1200)
    cc.on_persistent_congestion(0.0)
    assert cc.congestion_window == 2400
    cc.on_max_datagram_size(1400)
    assert cc.minimum_window == 2800 and cc.congestion_window == 2800
    cc.on_packets_acked(1400, 1.0, 1.1, rtt_of(0.1), False)  # slow start, in bytes
    assert cc.congestion_window == 4200


@pytest.mark.parametrize("name", ["newreno", "cubic"])
def test_persistent_congestion_collapses_to_minimum(name):
    cc = create(name, MSS)
    rtt = rtt_of(0.1)
    for i in range(20):
        cc.on_packets_acked(12000, i * 0.1, i * 0.1 + 0.1, rtt, False)
    cc.on_congestion_event(2.0, 2.1)
    cc.on_persistent_congestion(2.1)
    assert cc.congestion_window == cc.minimum_window == 2 * MSS
    assert cc.recovery_start_time == -math.inf
    # back in slow start towards ssthresh: packets sent before the collapse count again
    cc.on_packets_acked(2400, 2.05, 2.2, rtt, False)
    assert cc.congestion_window == 4800


@pytest.mark.parametrize("name", ["newreno", "cubic"])
def test_app_limited_does_not_grow(name):
    cc = create(name, MSS)
    rtt = rtt_of(0.05)
    cc.on_packets_acked(6000, 0.0, 0.05, rtt, True)
    assert cc.congestion_window == 12000
    cc.on_congestion_event(0.06, 0.1)
    w = cc.congestion_window
    for i in range(100):
        cc.on_packets_acked(MSS, 0.2 + i * 0.01, 0.25 + i * 0.01, rtt, True)
    assert cc.congestion_window == w


# -- NewReno --------------------------------------------------------------------------------------------
def test_newreno_slow_start_recovery_and_avoidance():
    cc = NewReno(MSS)
    rtt = rtt_of(0.1)
    cc.on_packets_acked(1200, 0.0, 0.1, rtt, False)
    assert cc.congestion_window == 13200  # slow start: + acked bytes
    cc.on_packets_acked(13200, 0.05, 0.2, rtt, False)
    assert cc.congestion_window == 26400

    cc.on_congestion_event(0.15, 0.3)  # enter recovery at t=0.3
    assert cc.recovery_start_time == 0.3
    assert cc.ssthresh == 13200 and cc.congestion_window == 13200
    # further losses of packets sent before the recovery started: no further reduction
    cc.on_congestion_event(0.29, 0.31)
    cc.on_congestion_event(0.3, 0.32)
    assert cc.congestion_window == 13200 and cc.congestion_events == 1
    # ACKs of packets sent during/before recovery do not grow the window
    cc.on_packets_acked(6000, 0.3, 0.4, rtt, False)
    assert cc.congestion_window == 13200

    # a packet sent after the recovery start is acknowledged: congestion avoidance, one MSS per window acked
    cc.on_packets_acked(6000, 0.35, 0.45, rtt, False)
    assert cc.congestion_window == 13200
    cc.on_packets_acked(7200, 0.36, 0.46, rtt, False)
    assert cc.congestion_window == 14400
    acked = 0
    while acked < 14400:
        cc.on_packets_acked(1200, 0.4, 0.5, rtt, False)
        acked += 1200
    assert cc.congestion_window == 15600

    # loss of a packet sent after the recovery start: a new reduction
    cc.on_congestion_event(0.35, 0.6)
    assert cc.congestion_window == 7800 and cc.congestion_events == 2
    cc.on_congestion_event(0.7, 0.8)
    cc.on_congestion_event(0.9, 1.0)
    cc.on_congestion_event(1.1, 1.2)
    assert cc.congestion_window == cc.minimum_window  # floor at 2 * MSS


# -- CUBIC ----------------------------------------------------------------------------------------------
def grow_to(cc, window, rtt):
    t = 0.0
    while cc.congestion_window < window:
        cc.on_packets_acked(min(MSS * 10, window - cc.congestion_window), t, t + 0.01, rtt, False)
        t += 0.01
    assert cc.congestion_window == window
    return t


def test_cubic_multiplicative_decrease_and_fast_convergence():
    cc = Cubic(MSS)
    rtt = rtt_of(0.1)
    grow_to(cc, 120000, rtt)
    cc.on_congestion_event(1.0, 1.1)
    assert cc.congestion_window == int(120000 * BETA) == 84000
    assert cc.ssthresh == 84000
    assert cc.w_max == 120000
    # ignored inside the recovery period
    cc.on_congestion_event(1.05, 1.15)
    assert cc.congestion_window == 84000
    # a second loss before the window regrows to W_max: fast convergence lowers W_max
    cc.on_congestion_event(1.2, 1.3)
    assert cc.congestion_window == int(84000 * BETA)
    assert cc.w_max == pytest.approx(84000 * (1 + BETA) / 2)
    # never below the minimum window
    for i in range(20):
        cc.on_congestion_event(2.0 + i, 2.1 + i)
    assert cc.congestion_window == cc.minimum_window


def test_cubic_follows_the_cubic_curve_after_a_loss():
    # W_max of 1000 datagrams with a 100 ms RTT: the cubic function dominates the Reno-friendly estimate
    cc = Cubic(MSS)
    srtt = 0.1
    rtt = rtt_of(srtt)
    w_max = 1000.0 * MSS
    grow_to(cc, int(w_max), rtt)
    loss_time = 10.0
    cc.on_congestion_event(loss_time - 0.05, loss_time)
    assert cc.congestion_window == int(w_max * BETA)
    k_expected = ((w_max - w_max * BETA) / (C * MSS)) ** (1 / 3)  # = cbrt(750) s, about 9.1 s

    # a saturating sender: each RTT, one window's worth of ACKs spread over 10 ACKs
    now = loss_time
    step = srtt / 10
    samples = {}
    epoch = None
    while now < loss_time + 14.0:
        now += step
        cc.on_packets_acked(max(cc.congestion_window // 10, 1), now - srtt, now, rtt, False)
        if now - srtt <= loss_time:  # ACKs for packets sent before the reduction: recovery period
            assert cc.epoch_start is None and cc.congestion_window == int(w_max * BETA)
            continue
        if epoch is None:  # first ACK of a packet sent after the reduction: congestion avoidance starts
            epoch = cc.epoch_start
            assert epoch == now
            assert cc.k == pytest.approx(k_expected)
        samples[round(now - epoch, 3)] = (cc.congestion_window, cc.w_est)

    def w_cubic(t):
        return C * MSS * (t - k_expected) ** 3 + w_max

    for t, (w, w_est) in samples.items():
        if t < 0.5:
            continue
        assert w_est < w_cubic(t)  # never in the Reno-friendly region here
        # the window tracks W_cubic between t and t + RTT
        assert w_cubic(t) * 0.99 <= w <= w_cubic(t + srtt) * 1.01, (t, w, w_cubic(t))
    cwnd = {t: w for t, (w, _) in samples.items()}
    # concave up to K (plateau at W_max), convex after
    assert abs(cwnd[round(k_expected, 1)] - w_max) < 0.01 * w_max
    assert cwnd[3.0] - cwnd[2.0] > cwnd[5.0] - cwnd[4.0] > cwnd[8.0] - cwnd[7.0] > 0
    assert cwnd[13.0] - cwnd[12.0] > cwnd[12.0] - cwnd[11.0] > cwnd[11.0] - cwnd[10.0] > 0
    assert cwnd[13.0] > w_max * 1.015


def test_cubic_reno_friendly_region():
    # short RTT: the AIMD estimate outgrows the cubic function and the window follows W_est
    cc = Cubic(MSS)
    srtt = 0.002
    rtt = rtt_of(srtt)
    grow_to(cc, 60000, rtt)
    cc.on_congestion_event(0.9, 1.0)
    now = 1.0
    while now < 1.6:
        now += srtt / 4
        cc.on_packets_acked(max(cc.congestion_window // 4, 1), now - srtt, now, rtt, False)
    t = now - cc.epoch_start
    assert cc.w_est > cc.cubic_window(t)
    assert cc.congestion_window == int(cc.w_est)
    # alpha: 3(1-beta)/(1+beta) until W_est reaches the pre-loss window, then 1 (Reno speed)
    assert cc.w_est > 60000


def test_cubic_app_limited_shifts_epoch():
    srtt = 0.1
    rtt = rtt_of(srtt)

    def run(app_limited_gap: bool):
        cc = Cubic(MSS)
        grow_to(cc, 120000, rtt)
        cc.on_congestion_event(0.9, 1.0)
        now = 1.1  # from here on, ACKs are for packets sent after the reduction
        for _ in range(10):
            now += 0.01
            cc.on_packets_acked(MSS, now - srtt, now, rtt, False)
        before = cc.congestion_window
        if app_limited_gap:
            for _ in range(100):
                now += 0.05
                cc.on_packets_acked(MSS, now - srtt, now, rtt, True)
            assert cc.congestion_window == before
        else:
            now += 5.0
        cc.on_packets_acked(cc.congestion_window, now - srtt, now, rtt, False)  # one window acked
        return before, cc.congestion_window

    before, after = run(True)
    assert after - before < 10000  # time spent application-limited does not advance the curve
    before2, after2 = run(False)
    assert after2 - before2 > 30000  # while 5 s of (non-limited) time does (beyond K: back above W_max)


def test_cubic_after_persistent_congestion_starts_with_k_zero():
    cc = Cubic(MSS)
    rtt = rtt_of(0.1)
    grow_to(cc, 60000, rtt)
    cc.on_congestion_event(1.0, 1.0)
    cc.on_persistent_congestion(1.0)
    assert cc.congestion_window == 2400 and cc.w_max is None
    ssthresh = cc.ssthresh
    t = 1.0
    while cc.congestion_window < ssthresh:  # slow start back up
        t += 0.1
        cc.on_packets_acked(cc.congestion_window, t - 0.1, t, rtt, False)
    t += 0.1
    cc.on_packets_acked(MSS, t - 0.1, t, rtt, False)
    assert cc.k == 0.0 and cc.epoch_start == t
    assert cc.w_max >= ssthresh


# -- Pacer ----------------------------------------------------------------------------------------------
def count_burst(p: Pacer, now: float, size: int = MSS) -> int:
    n = 0
    while p.next_send_time(now) is None:
        p.on_packet_sent(size, now)
        n += 1
        assert n < 1000
    return n


def test_pacer_unpaced_until_updated():
    p = Pacer(MSS)
    for i in range(100):
        assert p.next_send_time(1.0) is None
        p.on_packet_sent(MSS, 1.0)
    p.update(12000, 0.0)  # no usable RTT: still unpaced
    assert p.next_send_time(1.0) is None


def test_pacer_rate_burst_and_spacing():
    p = Pacer(MSS)
    p.update(120000, 0.1)
    assert p.rate == pytest.approx(1.25 * 120000 / 0.1)
    assert p.burst == 16 * MSS
    now = 5.0
    assert count_burst(p, now) == 16
    nxt = p.next_send_time(now)
    interval = MSS / p.rate
    assert nxt == pytest.approx(now + interval)
    # afterwards one packet per interval
    times = []
    t = nxt
    for _ in range(50):
        assert p.next_send_time(t) is None
        p.on_packet_sent(MSS, t)
        times.append(t)
        t = p.next_send_time(t)
        assert t is not None
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g == pytest.approx(interval) for g in gaps)
    # 50 packets in ~ 50 intervals: the sustained rate is the pacing rate
    assert (times[-1] - times[0]) == pytest.approx(49 * interval)


def test_pacer_bucket_does_not_accumulate_beyond_capacity():
    p = Pacer(MSS)
    p.update(120000, 0.1)
    assert count_burst(p, 0.0) == 16
    assert count_burst(p, 100.0) == 16  # long idle: still 16


def test_pacer_small_window_bursts_two():
    p = Pacer(MSS)
    p.update(2400, 0.05)
    assert p.burst == 2 * MSS
    assert count_burst(p, 1.0) == 2
    p.update(12000, 0.05)  # initial window: half of it
    assert p.burst == 6000
    assert count_burst(p, 10.0) == 5
