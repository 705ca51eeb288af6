"""Delivery-rate estimation in Recovery (per path) and the windowed maximum that smooths it."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqvpn.quic.recovery import Recovery, SentPacket, SentSpace, WindowedMax

MSS = 1200


def make():
    r = Recovery(congestion_control="cubic")
    s = SentSpace("app0")
    r.spaces.append(s)
    r.handshake_confirmed = True
    return r, s


def run_steady(r, s, rate, rtt, seconds, start=0.0, pn0=0, app_limited=False):
    """Send one MSS packet every MSS/rate seconds; each is acknowledged alone one RTT later."""
    gap = MSS / rate
    n = int(seconds / gap)
    events = []
    for i in range(n):
        events.append((start + i * gap, 0, pn0 + i))
        events.append((start + i * gap + rtt, 1, pn0 + i))
    events.sort()
    for t, kind, pn in events:
        if kind == 0:
            if app_limited is None:
                pass  # neither: a fresh path nobody loaded yet
            elif app_limited:
                r.on_app_limited()  # what the sender reports each time it has room but nothing to send
            else:
                r.on_cwnd_limited()  # a sender with more to send than the window allows
            r.on_packet_sent(s, SentPacket(pn, t, MSS, True, True))
        else:
            r.on_ack_received(s, [(pn, pn + 1)], 0.0, t)
    return pn0 + n, start + n * gap + rtt


def test_steady_rate_is_measured():
    r, s = make()
    run_steady(r, s, rate=1_000_000.0, rtt=0.05, seconds=1.0)
    assert r.rs_rate == pytest.approx(1_000_000.0, rel=0.02)
    assert r.bandwidth == pytest.approx(1_000_000.0, rel=0.02)
    assert r.delivered == s.largest_sent * MSS + MSS
    assert not r.rs_app_limited


def test_bandwidth_filter_forgets_an_old_peak_after_its_window():
    r, s = make()
    pn, t = run_steady(r, s, rate=2_000_000.0, rtt=0.05, seconds=0.5)
    assert r.bandwidth == pytest.approx(2_000_000.0, rel=0.02)
    # the path slows down: the peak stays for max(10 RTT, 1 s), then the slower rate takes over
    pn, t = run_steady(r, s, rate=500_000.0, rtt=0.05, seconds=0.5, start=t, pn0=pn)
    assert r.bandwidth == pytest.approx(2_000_000.0, rel=0.05)
    pn, t = run_steady(r, s, rate=500_000.0, rtt=0.05, seconds=2.0, start=t, pn0=pn)
    assert r.bandwidth == pytest.approx(500_000.0, rel=0.05)


def test_app_limited_samples_are_flagged_and_do_not_lower_the_estimate():
    r, s = make()
    pn, t = run_steady(r, s, rate=2_000_000.0, rtt=0.05, seconds=0.5)
    # trickle: one packet per 10 ms (120 kB/s) while app-limited
    pn, t = run_steady(r, s, rate=120_000.0, rtt=0.05, seconds=0.5, start=t, pn0=pn, app_limited=True)
    assert r.rs_app_limited
    assert r.rs_rate < 200_000.0
    assert r.bandwidth == pytest.approx(2_000_000.0, rel=0.05)  # an app-limited sample cannot lower it
    r2, s2 = make()
    run_steady(r2, s2, rate=120_000.0, rtt=0.05, seconds=0.2, app_limited=True)
    assert r2.bandwidth > 0.0  # but it may raise it (it is a lower bound of the path's rate)


def test_ack_compression_gives_no_sample():
    r, s = make()
    r.rtt.update(0.05, 0.0, True, 0.025)  # min_rtt 50 ms
    for pn in range(10):
        r.on_packet_sent(s, SentPacket(pn, 1.0, MSS, True, True))
    # acknowledged 20 ms after they left, below min_rtt (compressed or mismeasured): no sample
    r.on_ack_received(s, [(0, 10)], 0.0, 1.02)
    assert r.rs_rate == 0.0 and r.bandwidth == 0.0
    assert r.delivered == 10 * MSS


def test_sample_counts_the_longer_of_send_and_ack_intervals():
    r, s = make()
    # 10 packets sent over 100 ms, all acknowledged by one ACK 50 ms after the last: send interval 90 ms
    for pn in range(10):
        r.on_packet_sent(s, SentPacket(pn, pn * 0.01, MSS, True, True))
    r.on_ack_received(s, [(0, 10)], 0.0, 0.14)
    assert r.rs_delivered == 10 * MSS
    assert r.rs_interval == pytest.approx(0.14)  # ack interval (from the flight start) is the longer one
    assert r.rs_rate == pytest.approx(10 * MSS / 0.14)


@given(st.lists(st.tuples(st.floats(0.0, 1e9, allow_nan=False), st.floats(0.0, 0.5)), min_size=1, max_size=60),
       st.floats(0.01, 2.0))
def test_windowed_max_matches_a_brute_force_bound(steps, window):
    """The filter returns a value that was seen, never more than the true maximum of the window, and never less
    than the newest sample."""
    f = WindowedMax()
    now = 0.0
    seen = []
    for value, dt in steps:
        now += dt
        seen.append((now, value))
        out = f.update(value, now, window)
        in_window = [v for t, v in seen if now - t <= window]
        assert out >= value
        assert out <= max(in_window)
        assert any(out == v for _, v in seen)


def test_windowed_max_expires():
    f = WindowedMax()
    assert f.update(10.0, 0.0, 1.0) == 10.0
    assert f.update(3.0, 0.5, 1.0) == 10.0
    assert f.update(2.0, 1.2, 1.0) < 10.0
    assert f.update(1.0, 5.0, 1.0) == 1.0


def test_a_path_counts_as_application_limited_until_its_window_is_first_full():
    """The handshake's trickle says nothing of a path's rate: samples are application-limited (and the path not
    measured) until the sender finds the window full once."""
    r, s = make()
    pn, t = run_steady(r, s, rate=50_000.0, rtt=0.05, seconds=0.3, app_limited=None)
    assert r.rs_app_limited and not r.bandwidth_measured
    # the sender's "nothing to send" reports (keep-alives on an idle path) do not end that early
    pn, t = run_steady(r, s, rate=50_000.0, rtt=0.05, seconds=0.3, start=t, pn0=pn, app_limited=True)
    assert r.rs_app_limited and not r.bandwidth_measured
    run_steady(r, s, rate=1_000_000.0, rtt=0.05, seconds=0.5, start=t, pn0=pn)
    assert not r.rs_app_limited and r.bandwidth_measured
