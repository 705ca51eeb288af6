"""BBR (mqvpn.quic.congestion.bbr) in a small deterministic bottleneck simulator, compared with CUBIC.

The simulator: a sender driven by a real ``Recovery`` (one SentSpace, its pacer, its loss detection timer) sends
full-size packets whenever the window and the pacer allow; a bottleneck link of rate R bytes/s with a drop-tail FIFO
of Q bytes (optionally a random loss before it) and a one-way propagation delay D; every packet that gets through
is acknowledged alone, immediately, D later. Time is a float advanced from event to event: no clock, no sockets.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from types import SimpleNamespace

import pytest

from mqvpn.quic.congestion import Bbr, available, create
from mqvpn.quic.congestion.base import congestion_control_name
from mqvpn.quic.congestion.bbr import DRAIN, PROBE_BW, PROBE_RTT, STARTUP
from mqvpn.quic.recovery import Recovery, SentPacket, SentSpace

MSS = 1200
INF = float("inf")
MBIT = 1e6 / 8  # bytes/s


class Sim:
    """One sender, one bottleneck, per-packet immediate ACKs. ``app_rate``: None = always something to send."""

    def __init__(self, cc="bbr", *, rate, delay, queue, loss=0.0, seed=1, app_rate=None, start=0.0):
        self.rec = Recovery(congestion_control=cc, max_datagram_size=MSS)
        self.rec.handshake_confirmed = True
        self.cc = self.rec.cc
        if isinstance(self.cc, Bbr):
            self.cc.rng.seed(seed)
        self.space = SentSpace("application")
        self.rec.spaces.append(self.space)
        self.rate = rate
        self.delay = delay
        self.queue = queue
        self.loss = loss
        self.rng = random.Random(seed)
        self.app_rate = app_rate
        self._credit = 0.0
        self._credit_time = start
        self.now = start  # the clock need not start at 0 (a connection's does not)
        self.pn = 0
        self.link_free_at = start
        self.acks: deque = deque()  # (ack arrival time, pn, departure time), in time order
        # per-packet records for the statistics
        self.sends: list = []  # (send time, queueing delay or None if dropped)
        self.arrivals: list = []  # receiver arrival times (all MSS)
        self.trace: list = []  # (time, state, bandwidth estimate, cwnd) after every ACK
        self.probes = 0

    # -- link --------------------------------------------------------------------------------------
    def set_rate(self, rate):
        """The bottleneck changes speed now: packets still queued are served at the new rate."""
        now = self.now
        old = self.rate
        self.rate = rate
        # the remaining service time of the backlog scales by old / rate
        kept = deque()
        for ack_t, pn, depart in self.acks:
            if depart > now:
                depart = now + (depart - now) * old / rate
                ack_t = depart + 2 * self.delay
            kept.append((ack_t, pn, depart))
        self.acks = kept
        arrivals = self.arrivals  # the queued packets are the last ones to arrive
        i = len(arrivals) - 1
        while i >= 0 and arrivals[i] - self.delay > now:
            arrivals[i] = now + (arrivals[i] - self.delay - now) * old / rate + self.delay
            i -= 1
        if self.link_free_at > now:
            self.link_free_at = now + (self.link_free_at - now) * old / rate

    def _transmit(self, pn, now):
        if self.loss and self.rng.random() < self.loss:
            self.sends.append((now, None))
            return
        free = self.link_free_at
        backlog = (free - now) * self.rate if free > now else 0.0
        if backlog + MSS > self.queue + 1e-6:
            self.sends.append((now, None))  # drop-tail
            return
        start = free if free > now else now
        depart = start + MSS / self.rate
        self.link_free_at = depart
        self.sends.append((now, start - now))
        self.arrivals.append(depart + self.delay)
        self.acks.append((depart + 2 * self.delay, pn, depart))

    # -- sender ------------------------------------------------------------------------------------
    def _app_has_data(self, now):
        if self.app_rate is None:
            return True
        self._credit = min(self._credit + (now - self._credit_time) * self.app_rate, 4 * MSS)
        self._credit_time = now
        return self._credit >= MSS - 1e-9

    def _send_one(self, now, paced=True):
        rec = self.rec
        p = SentPacket(self.pn, now, MSS, True, True)
        rec.on_packet_sent(self.space, p)
        if paced:
            rec.pacer.on_packet_sent(MSS, now)
        if self.app_rate is not None:
            self._credit -= MSS
        self._transmit(self.pn, now)
        self.pn += 1

    def _send(self, now):
        """Send what the window and the pacer allow; returns when the next send may happen (INF: on an ACK)."""
        rec = self.rec
        cc = self.cc
        pacer = rec.pacer
        while True:
            if rec.bytes_in_flight >= cc.congestion_window:
                rec.on_cwnd_limited()  # as the connection's sender does
                return INF
            t = pacer.next_send_time(now)
            if t is not None:
                return t
            if not self._app_has_data(now):
                rec.on_app_limited()  # window room, nothing to send (as the connection's sender does)
                return now + (MSS - self._credit) / self.app_rate
            self._send_one(now)

    def run(self, until, on_ack=None):
        rec = self.rec
        space = self.space
        acks = self.acks
        trace = self.trace
        cc = self.cc
        now = self.now
        t_send = self._send(now)
        while True:
            t_ack = acks[0][0] if acks else INF
            t_timer = rec.get_loss_detection_time()
            if t_timer is None:
                t_timer = INF
            t = min(t_ack, t_timer, t_send)
            if t > until:
                break
            now = self.now = t
            while acks and acks[0][0] <= now:
                _, pn, _ = acks.popleft()
                rec.on_ack_received(space, [(pn, pn + 1)], 0.0, now)
                trace.append((now, getattr(cc, "state", None), getattr(cc, "bw", 0.0), cc.congestion_window))
                if on_ack is not None:
                    on_ack(self, now)
            if t_timer <= now:
                if rec.on_loss_detection_timeout(now) is not None:
                    self.probes += 1
                    self._send_one(now, paced=False)  # PTO probe: bypasses window and pacer
            t_send = self._send(now)
        self.now = until
        return self

    # -- statistics --------------------------------------------------------------------------------
    def goodput(self, t0, t1):
        """Bytes/s that reached the receiver in [t0, t1)."""
        n = sum(1 for t in self.arrivals if t0 <= t < t1)
        return n * MSS / (t1 - t0)

    def queue_delay(self, t0, t1):
        """Mean queueing delay of the packets sent in [t0, t1) that were not dropped."""
        d = [q for t, q in self.sends if t0 <= t < t1 and q is not None]
        return sum(d) / len(d)

    def loss_rate(self, t0, t1):
        s = [q for t, q in self.sends if t0 <= t < t1]
        return sum(1 for q in s if q is None) / len(s)

    def summary(self, t0, t1, rate=None):
        rate = rate or self.rate
        return (f"goodput {self.goodput(t0, t1) / rate:.1%} queue {self.queue_delay(t0, t1) * 1e3:.1f} ms "
                f"loss {self.loss_rate(t0, t1):.2%}")


# -- scenarios (each simulated once per test session) ----------------------------------------------------
D = 0.02  # one-way propagation delay: min RTT ~ 41 ms
R10 = 10 * MBIT
R20 = 20 * MBIT
_runs: dict = {}


def bdp(rate):
    return rate * 2 * D


def scenario(name, cc="bbr"):
    key = (name, cc)
    if key not in _runs:
        if name == "deep":  # 2 BDP of buffer; 25 s to see two PROBE_RTTs (CUBIC: 10 s)
            _runs[key] = Sim(cc, rate=R10, delay=D, queue=2 * bdp(R10)).run(25.0 if cc == "bbr" else 10.0)
        elif name == "shallow":
            _runs[key] = Sim(cc, rate=R20, delay=D, queue=0.25 * bdp(R20)).run(10.0)
        elif name == "random-loss":
            _runs[key] = Sim(cc, rate=R20, delay=D, queue=bdp(R20), loss=0.01).run(10.0)
        else:  # pragma: no cover
            raise KeyError(name)
    return _runs[key]


def rtts(n):
    return n * (2 * D + MSS / R10)


# -- (1) STARTUP ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate,start", [(R10, 0.0), (50 * MBIT, 1000.0)])
def test_startup_finds_the_bandwidth_within_15_round_trips(rate, start):
    sim = Sim("bbr", rate=rate, delay=D, queue=2 * bdp(rate), start=start).run(start + rtts(15))
    cc = sim.cc
    assert cc.state in (DRAIN, PROBE_BW) and cc.filled_pipe  # left STARTUP
    assert cc.bw == pytest.approx(rate, rel=0.1)
    assert cc.min_rtt == pytest.approx(2 * D + MSS / rate)
    assert sim.trace[0][1] == STARTUP and sim.trace[0][0] == pytest.approx(start + 2 * D + MSS / rate)
    assert all(s in (STARTUP, DRAIN, PROBE_BW) for _, s, _, _ in sim.trace)  # no PROBE_RTT at first
    sim.run(start + rtts(18))
    assert cc.state == PROBE_BW


def test_initial_pacing_rate_and_pacer_wiring():
    rec = Recovery(congestion_control="bbr")
    rec.handshake_confirmed = True
    space = SentSpace("application")
    rec.spaces.append(space)
    for pn in range(10):
        rec.on_packet_sent(space, SentPacket(pn, 0.0, MSS, True, True))
    assert rec.pacer.rate == INF  # no RTT sample: not paced
    rec.on_ack_received(space, [(0, 1)], 0.0, 0.05)
    cc = rec.cc
    init = 2.77 * cc.initial_cwnd / rec.rtt.smoothed_rtt  # first sample (1 packet / RTT) * 2.77 is lower
    assert cc.bw == MSS / 0.05 and cc.pacing_rate == pytest.approx(init)
    assert rec.pacer.rate == cc.pacing_rate  # Recovery hands BBR's rate to Pacer.set_rate
    assert rec.pacer.burst == max(2 * MSS, min(16 * MSS, cc.send_quantum))
    # window-based controllers keep the pacer's own rule: 1.25 * cwnd / srtt
    rec2 = Recovery(congestion_control="cubic")
    s2 = SentSpace("application")
    rec2.spaces.append(s2)
    rec2.on_packet_sent(s2, SentPacket(0, 0.0, MSS, True, True))
    rec2.on_ack_received(s2, [(0, 1)], 0.0, 0.05)
    assert rec2.cc.pacing_rate is None
    assert rec2.pacer.rate == 1.25 * rec2.cc.congestion_window / rec2.rtt.smoothed_rtt


def test_pacer_set_rate():
    from mqvpn.quic.congestion import Pacer

    p = Pacer(MSS)
    p.set_rate(1_000_000.0, 5 * MSS)
    assert p.rate == 1_000_000.0 and p.burst == 5 * MSS
    n = 0
    while p.next_send_time(1.0) is None:
        p.on_packet_sent(MSS, 1.0)
        n += 1
    assert n == 5 and p.next_send_time(1.0) == pytest.approx(1.0 + MSS / 1_000_000.0)
    p.set_rate(1_000_000.0, 0)
    assert p.burst == 2 * MSS  # clamped to [2, 16] datagrams
    p.set_rate(1e9, 10**9)
    assert p.burst == 16 * MSS
    for bad in (0.0, -1.0, INF, float("nan")):
        p.set_rate(bad, MSS)
        assert p.rate == INF and p.next_send_time(5.0) is None  # not paced


# -- (2) steady state: full rate, short queue -------------------------------------------------------------
def test_steady_state_full_rate_with_a_short_queue_unlike_cubic():
    bbr = scenario("deep")
    cubic = scenario("deep", "cubic")
    min_rtt = 2 * D + MSS / R10
    assert bbr.goodput(0, 10) >= 0.9 * R10
    assert bbr.queue_delay(0, 10) < min_rtt
    assert bbr.loss_rate(0, 10) == 0.0
    assert cubic.goodput(0, 10) >= 0.9 * R10
    # CUBIC fills the buffer (2 BDP = 80 ms), BBR keeps it a few ms deep
    assert bbr.queue_delay(0, 10) < cubic.queue_delay(0, 10) / 4
    assert cubic.queue_delay(0, 10) > min_rtt


# -- (3) shallow buffer -----------------------------------------------------------------------------------
def test_shallow_buffer_bounded_loss():
    sim = scenario("shallow")
    assert sim.goodput(0, 10) >= 0.8 * R20
    assert sim.loss_rate(0, 10) < 0.05
    # after STARTUP's overshoot, inflight_hi keeps the probes from flooding the 0.25 BDP buffer
    assert sim.loss_rate(5, 10) < 0.01
    assert sim.cc.inflight_hi < 1.5 * bdp(R20)


# -- (4) random loss --------------------------------------------------------------------------------------
def test_random_loss_does_not_collapse_the_rate_unlike_cubic():
    bbr = scenario("random-loss")
    cubic = scenario("random-loss", "cubic")
    assert 0.005 < bbr.loss_rate(0, 10) < 0.02
    assert bbr.goodput(0, 10) >= 0.8 * R20
    assert bbr.goodput(0, 10) > 2 * cubic.goodput(0, 10)


# -- (5) PROBE_RTT ----------------------------------------------------------------------------------------
def probe_rtt_intervals(sim):
    spans = []
    start = None
    for t, state, _, _ in sim.trace:
        if state == PROBE_RTT and start is None:
            start = t
        elif state != PROBE_RTT and start is not None:
            spans.append((start, t))
            start = None
    return spans


def test_probe_rtt_every_10_s_for_at_least_200_ms():
    sim = scenario("deep")
    spans = probe_rtt_intervals(sim)
    assert len(spans) == 2 == sim.cc.probe_rtt_count
    assert 10.0 <= spans[0][0] <= 10.5  # 10 s after the first min_rtt sample (~0.04 s) and the queue drained
    assert 9.8 <= spans[1][0] - spans[0][0] <= 10.8  # 10 s after the previous one ended
    for start, end in spans:
        assert 0.2 <= end - start <= 0.2 + 6 * rtts(1)
        # the window really was 4 packets
        assert all(cw == 4 * MSS for t, s, _, cw in sim.trace if start < t < end and s == PROBE_RTT)
    assert sim.cc.min_rtt == pytest.approx(2 * D + MSS / R10)
    assert sim.goodput(0, 25) >= 0.9 * R10


# -- (6) the bottleneck slows down ------------------------------------------------------------------------
@pytest.mark.parametrize("buffer", [2.0, 0.5])
def test_rate_halving_is_tracked(buffer):
    sim = Sim("bbr", rate=R20, delay=D, queue=buffer * bdp(R20)).run(3.0)
    assert sim.cc.bw == pytest.approx(R20, rel=0.1)
    sim.set_rate(R10)
    sim.run(8.0)
    settled = None  # from when on the estimate stays within 10 % of the new rate
    for t, _, bw, _ in sim.trace:
        if t < 3.0:
            continue
        if abs(bw - R10) <= 0.1 * R10:
            settled = settled or t
        else:
            settled = None
    assert settled is not None and settled - 3.0 < 2.5
    assert sim.goodput(5.0, 8.0) >= 0.9 * R10
    assert sim.queue_delay(6.0, 8.0) < 0.5 * (2 * D)  # the queue built by the old rate is gone


# -- (7) application-limited ------------------------------------------------------------------------------
def test_app_limited_sending_neither_inflates_nor_deflates_the_estimate():
    app = 0.3 * R20
    sim = Sim("bbr", rate=R20, delay=D, queue=2 * bdp(R20), app_rate=app).run(2.0)
    # only ever sent at the application's rate: the estimate is that rate, not more
    assert sim.goodput(0.5, 2.0) == pytest.approx(app, rel=0.05)
    assert all(bw <= 1.15 * app for _, _, bw, _ in sim.trace)
    assert sim.cc.bw >= 0.85 * app
    assert sim.rec.rs_app_limited
    sim.app_rate = None  # bulk: the real bottleneck rate
    sim.run(4.0)
    assert sim.cc.bw == pytest.approx(R20, rel=0.05)
    n = len(sim.trace)
    sim.app_rate = app  # application-limited again: the estimate keeps the bottleneck rate
    sim.run(7.0)
    assert sim.goodput(4.5, 7.0) == pytest.approx(app, rel=0.05)
    assert all(abs(bw - R20) <= 0.05 * R20 for _, _, bw, _ in sim.trace[n:])
    assert sim.cc.state == PROBE_BW


# -- (8) persistent congestion ----------------------------------------------------------------------------
def test_persistent_congestion_collapses_to_the_minimum_window():
    cc = create("bbr", MSS)
    assert cc.minimum_window == 4 * MSS
    cc.congestion_window = 100 * MSS
    cc.on_persistent_congestion(1.0)
    assert cc.congestion_window == cc.minimum_window == 4 * MSS

    sim = Sim("bbr", rate=R10, delay=D, queue=2 * bdp(R10)).run(2.0)
    cc = sim.cc
    seen = []
    original = cc.on_persistent_congestion

    def spy(now):
        original(now)
        seen.append(cc.congestion_window)

    cc.on_persistent_congestion = spy
    sim.loss = 1.0  # black hole for 2 s: only PTO probes leave, nothing comes back
    sim.run(4.0)
    sim.loss = 0.0
    sim.run(8.0)
    assert sim.rec.persistent_congestion_events >= 1 and sim.probes >= 3
    assert seen[0] == 4 * MSS
    # then the window grows back and the path is used fully again
    assert sim.goodput(7.0, 8.0) >= 0.9 * R10


def test_loss_hook_gets_in_flight_bytes_without_mtu_probes():
    calls = []

    class Spy(Bbr):
        def on_packets_lost(self, lost_bytes, now):
            calls.append(lost_bytes)
            super().on_packets_lost(lost_bytes, now)

    rec = Recovery(congestion_control=Spy(MSS))
    rec.handshake_confirmed = True
    space = SentSpace("application")
    rec.spaces.append(space)
    for pn in range(8):
        p = SentPacket(pn, 0.001 * pn, 1500 if pn == 1 else MSS, True, True)
        p.is_mtu_probe = pn == 1
        rec.on_packet_sent(space, p)
    rec.on_packet_sent(space, SentPacket(8, 0.008, 50, False, False))  # ACK-only: not in flight
    rec.on_ack_received(space, [(7, 9)], 0.0, 0.1)  # 0..5 are lost by the packet threshold, 1 is an MTU probe
    assert calls == [5 * MSS]
    assert rec.mtu_probes_lost == 1


# -- (9) registry and the daemon's cc setting --------------------------------------------------------------
def test_registry_aliases_and_setting_mapping(caplog):
    assert {"bbr", "bbr2", "bbrv2", "cubic", "newreno"} <= set(available())
    for name in ("bbr", "BBR", "bbr2", "bbrv2", "BBRv2"):
        cc = create(name, 1350)
        assert isinstance(cc, Bbr) and cc.name == "bbr"
        assert cc.minimum_window == 4 * 1350
    with caplog.at_level(logging.WARNING, logger="mqvpn"):
        for wanted in ("bbr", "bbr2", "bbrv2", "BBR2"):
            assert congestion_control_name(SimpleNamespace(cc=wanted)) == "bbr"
        assert congestion_control_name(SimpleNamespace(cc="cubic")) == "cubic"
        assert congestion_control_name(SimpleNamespace(cc="newreno")) == "newreno"
        assert congestion_control_name(SimpleNamespace(cc=None)) == "cubic"
        assert congestion_control_name(SimpleNamespace()) == "cubic"
        assert not caplog.records
        assert congestion_control_name(SimpleNamespace(cc="vegas")) == "cubic"
    assert len(caplog.records) == 1 and "vegas" in caplog.records[0].getMessage()


def test_bare_controller_without_recovery_keeps_window_based_pacing():
    cc = create("bbr", MSS)
    cc.on_packets_acked(MSS, 0.0, 0.05, SimpleNamespace(latest_rtt=0.05, smoothed_rtt=0.05, has_sample=True), False)
    assert cc.pacing_rate is None and cc.congestion_window == cc.initial_cwnd
    cc.on_max_datagram_size(1400)
    assert cc.minimum_window == 4 * 1400 and cc.congestion_window >= cc.minimum_window
