"""BBR: a model-based congestion controller with pacing (registered as ``bbr``; ``bbr2``/``bbrv2`` are aliases).

BBRv1's model and state machine (draft-cheng-iccrg-bbr-congestion-control-00/-02) with the loss response of
BBRv2/v3 (draft-ietf-ccwg-bbr): v1 ignores loss and floods shallow-buffer bottlenecks. Sizes are bytes, times
seconds, ``now`` is handed in (sans-I/O). The per-ACK signals come from the path's ``Recovery`` (``self.recovery``).

Model
    ``max_bw``: windowed maximum of the delivery-rate samples ``Recovery`` computes for each ACK
    (draft-cheng-iccrg-delivery-rate-estimation: ``rs_rate``, ``rs_app_limited``, ``rs_delivered``) over the last
    10 round trips; an application-limited sample only counts when it is larger. ``min_rtt``: the smallest RTT
    seen in the last 10 s, taken as ``now - send time`` of the newest packet an ACK acknowledges, and only when the
    path's RTT estimator took the same sample (so an ACK that came back on another path does not count). A round
    trip ends when a packet sent after the previous one ended is acknowledged (its ``delivered`` at send time is
    ``Recovery.delivered - rs_delivered``). ``BDP = bw * min_rtt`` with ``bw = min(max_bw, bw_lo)``.

STARTUP
    Pacing gain 2.77 (v3's 4 ln 2; v1 has 2/ln 2), cwnd gain 2. Ends when ``max_bw`` has not grown by 25 % in 3
    round trips (v1), or (v2/v3) when the loss of the current round trip exceeds 2 % of the data in flight and 6
    packets; ``inflight_hi`` is then set to max(BDP, data delivered in one round trip).
DRAIN
    Pacing gain 1/2.77 until the data in flight is down to one BDP.
PROBE_BW
    v1's gain cycle: 1.25, 0.75, then 1 x 6, each phase one ``min_rtt``, starting at a random phase other than
    0.75. The 1.25 phase lasts until the data in flight reaches 1.25 BDP (v1) or loss is too high; the 0.75 phase
    lasts until the data in flight is down to one BDP (v3's DOWN: v1 also stopped it after one ``min_rtt``, which
    leaves a standing queue behind after the bottleneck slowed down). The v1 cycle is kept rather than v3's
    DOWN/CRUISE/REFILL/UP because it probes for bandwidth every 8 round trips, so the estimate follows a path that
    speeds up within about a second and one that slows down within 10 round trips; the multipath scheduler's
    weights come from these estimates. What the cycle probes depends on ``inflight_hi``, the loss-derived ceiling:
    while none is known, every 1.25 phase may fill the window (2 BDP); once a loss set it, a 1.25 phase pushes past
    it (raising it by 1, 2, 4 ... packets per round trip while the window is what limits it, as v3's UP) only at
    v3's pace, every min(BDP in packets, 63) round trips or 2-3 s, and the probes in between stay below its 15 %
    headroom (v3's CRUISE): probing past a shallow buffer every 8 round trips would cost about 1 % loss.
PROBE_RTT
    When ``min_rtt`` has not been refreshed for 10 s: window of 4 packets for 200 ms and one round trip (v1), then
    back to PROBE_BW (or STARTUP if the pipe was never filled). Its rate samples are marked application-limited.

Window and pacing
    ``cwnd = min(cwnd + acked, cwnd_gain * BDP + extra_acked + 3 send quanta)`` once the pipe is full (before,
    it grows by ``acked`` up to that target), then bounded as v3's BoundCwndForModel: by ``inflight_hi`` during a
    probe allowed past it (its 1.25 and 0.75 phases), by ``inflight_hi`` less 15 % headroom otherwise in PROBE_BW
    and in PROBE_RTT, by ``inflight_lo`` in every state; never below 4 packets. ``extra_acked`` is v3's
    ACK-aggregation allowance (10-round windowed maximum of the data acknowledged beyond ``bw * interval``), once
    the pipe is full. ``pacing_rate = pacing_gain * bw * 0.99`` (v3's 1 % margin), never lowered in STARTUP, and
    ``2.77 * cwnd / srtt`` before the first bandwidth sample; ``send_quantum`` = 1 ms at that rate (2 packets to
    64 KB). Both are published for ``Recovery`` to hand to ``Pacer.set_rate``.

Loss (v2/v3, counted per round trip: ``Recovery`` keeps no per-packet ``tx_in_flight``)
    ``on_packets_lost`` adds to the bytes lost in the current round trip. Loss is too high when that exceeds 2 % of
    the data in flight when it was detected (flight + the batch: the stand-in for v3's ``tx_in_flight``) and is at
    least 3 packets (so that 1 % of random loss on a few dozen packets per round trip is not read as congestion).
    During a probe allowed past ``inflight_hi`` (its 1.25 phase and the two round trips after, whose losses are its
    own) too-high loss sets, once per probe, ``inflight_hi = max(most data delivered in one round trip during the
    probe, 0.7 * min(BDP, cwnd))`` and ends the 1.25 phase; v3 takes the lost packet's ``tx_in_flight``, and what
    the probe got through per round trip is that minus the losses: BDP + buffer at a drop-tail bottleneck, the
    probe's own flight under random loss (so random loss does not ratchet the ceiling down). Outside those probes
    and STARTUP, a round trip that lost more than 2 % (and 3 packets) of what it delivered cuts the short-term
    bounds: ``bw_lo = max(bw_latest, 0.7 * bw_lo)``, ``inflight_lo = max(inflight_latest, 0.7 * inflight_lo)``
    (``*_latest``: the largest rate / round-trip delivery sampled in that round trip); they are lifted at every
    1.25 phase and when PROBE_RTT ends. There is no window halving or packet conservation on a congestion event
    (``on_congestion_event`` only opens the recovery period, for statistics). Persistent congestion (RFC 9002
    §7.6.2) collapses the window to 4 packets; it grows back by the data acknowledged, toward the model's target.
"""

from __future__ import annotations

import random

from .base import CongestionController, initial_window, register

STARTUP = "startup"
DRAIN = "drain"
PROBE_BW = "probe_bw"
PROBE_RTT = "probe_rtt"

STARTUP_PACING_GAIN = 2.77
STARTUP_CWND_GAIN = 2.0
DRAIN_PACING_GAIN = 1.0 / STARTUP_PACING_GAIN
PROBE_BW_CWND_GAIN = 2.0
PACING_GAIN_CYCLE = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
FULL_BW_GROWTH = 1.25  # STARTUP goes on while the bandwidth grows by this factor ...
FULL_BW_ROUNDS = 3  # ... within this many rounds
STARTUP_FULL_LOSS_PACKETS = 6  # STARTUP also ends on too-high loss of at least this many packets in a round
BW_FILTER_ROUNDS = 10
EXTRA_ACKED_FILTER_ROUNDS = 10
MIN_RTT_WINDOW = 10.0  # seconds
PROBE_RTT_DURATION = 0.2  # seconds
MIN_PIPE_PACKETS = 4  # BBRMinPipeCwnd, and the PROBE_RTT window
LOSS_THRESH = 0.02
LOSS_MIN_PACKETS = 3  # ... and at least this many packets lost in the round trip
BETA = 0.7  # multiplicative cut of the loss bounds
HEADROOM = 0.15  # fraction of inflight_hi left free outside the probe phases
PACING_MARGIN = 0.01
SEND_QUANTUM_MAX = 64 * 1024
PROBE_LOSS_ROUNDS = 2  # round trips after the 1.25 phase whose losses still count as the probe's

_INF = float("inf")


class _MaxFilter:
    """Windowed maximum over the last ``window`` rounds (Kathleen Nichols' three-sample scheme, as Linux's
    ``win_minmax``): the best, second-best and third-best samples of the window, each newer than the one before."""

    __slots__ = ("v0", "t0", "v1", "t1", "v2", "t2")

    def __init__(self) -> None:
        self.reset(0.0, 0)

    def reset(self, value: float, t: int) -> float:
        self.v0 = self.v1 = self.v2 = value
        self.t0 = self.t1 = self.t2 = t
        return value

    def update(self, value: float, t: int, window: int) -> float:
        if value >= self.v0 or t - self.t2 > window:
            return self.reset(value, t)
        if value >= self.v1:
            self.v1 = self.v2 = value
            self.t1 = self.t2 = t
        elif value >= self.v2:
            self.v2 = value
            self.t2 = t
        dt = t - self.t0
        if dt > window:  # the best one left the window: shift
            self.v0, self.t0 = self.v1, self.t1
            self.v1, self.t1 = self.v2, self.t2
            self.v2, self.t2 = value, t
            if t - self.t0 > window:
                self.v0, self.t0 = self.v1, self.t1
                self.v1, self.t1 = self.v2, self.t2
        elif self.t1 == self.t0 and dt > window / 4.0:
            self.v1, self.t1 = value, t
            self.v2, self.t2 = value, t
        elif self.t2 == self.t1 and dt > window / 2.0:
            self.v2, self.t2 = value, t
        return self.v0


class Bbr(CongestionController):
    """See the module docstring. Needs its path's ``Recovery`` (``self.recovery``) for delivery-rate samples;
    without one (a bare controller) it only keeps its initial window and the 4-packet minimum."""

    name = "bbr"

    def __init__(self, max_datagram_size: int = 1200) -> None:
        super().__init__(max_datagram_size)
        self.minimum_window = MIN_PIPE_PACKETS * max_datagram_size
        self.initial_cwnd = self.congestion_window
        self.rng = random.Random()  # PROBE_BW's starting phase; reseed for reproducible runs
        self.state = STARTUP
        self.pacing_gain = STARTUP_PACING_GAIN
        self.cwnd_gain = STARTUP_CWND_GAIN
        # model
        self.max_bw = 0.0  # bytes/s, windowed maximum of the delivery rate ("BtlBw")
        self.bw_lo = _INF  # short-term bound after loss
        self.bw = 0.0  # min(max_bw, bw_lo): the rate the model uses
        self.min_rtt = _INF
        self.min_rtt_stamp = 0.0
        self.inflight_hi = _INF  # long-term bound on data in flight (loss while probing)
        self.inflight_lo = _INF  # short-term bound (lossy round trips)
        self.extra_acked = 0.0
        self._bw_filter = _MaxFilter()
        self._extra_acked_filter = _MaxFilter()
        self._extra_acked_start = 0.0
        self._extra_acked_delivered = 0
        # round trips
        self.round_count = 0
        self.round_start = False
        self.next_round_delivered = 0
        # STARTUP
        self.filled_pipe = False
        self.full_bw = 0.0
        self.full_bw_count = 0
        # PROBE_BW
        self.cycle_index = 0
        self.cycle_stamp = 0.0
        self._probing = False  # losses now are the bandwidth probe's (set inflight_hi, once per probe)
        self._probe_stop_round = 0
        self._probe_delivered = 0  # largest rs_delivered (data delivered in one round trip) during the probe
        self._probe_up_rounds = 0  # inflight_hi grows by 2**this datagrams per probing round trip
        self._probe_hi = False  # this probe may go up to (and raise) inflight_hi, not only to the headroom below
        self._hi_probe_round = 0  # round and time of the last such probe, and the wait (s) before the next one
        self._hi_probe_time = 0.0
        self._hi_probe_wait = 0.0
        # PROBE_RTT
        self.probe_rtt_done_stamp: float | None = None
        self.probe_rtt_round_done = False
        self.prior_cwnd = 0
        self.probe_rtt_count = 0  # stats
        # loss accounting for the current round trip
        self._lost_in_round = 0
        self._round_delivered_start = 0
        self.bw_latest = 0.0
        self.inflight_latest = 0
        # control parameters
        self.pacing_rate: float | None = None
        self.send_quantum = 2 * max_datagram_size

    # -- model helpers ---------------------------------------------------------------------------
    def _bdp(self, gain: float) -> float:
        if self.min_rtt == _INF:
            return float(self.initial_cwnd)
        return gain * self.bw * self.min_rtt

    def _inflight(self, gain: float) -> float:
        """gain * BDP plus the quantization budget (v1 BBRInflight)."""
        return self._bdp(gain) + 3 * self.send_quantum

    def _headroom(self) -> float:
        hi = self.inflight_hi
        if hi == _INF:
            return _INF
        room = HEADROOM * hi
        if room < self.max_datagram_size:
            room = self.max_datagram_size
        return max(hi - room, self.minimum_window)

    def _bound(self, cwnd: float) -> int:
        """v1 BoundCwndForProbeRTT + v3 BoundCwndForModel."""
        state = self.state
        if state == PROBE_BW:
            cap = self.inflight_hi if self.cycle_index < 2 and self._probe_hi else self._headroom()
        elif state == PROBE_RTT:
            cap = self._headroom()
            if cwnd > self.minimum_window:
                cwnd = self.minimum_window
        else:
            cap = _INF
        if self.inflight_lo < cap:
            cap = self.inflight_lo
        if cap < self.minimum_window:
            cap = self.minimum_window
        if cwnd > cap:
            cwnd = cap
        if cwnd < self.minimum_window:
            cwnd = self.minimum_window
        return int(cwnd)

    # -- events ----------------------------------------------------------------------------------
    def on_packets_acked(self, acked_bytes, largest_acked_sent_time, now, rtt, app_limited) -> None:
        rec = self.recovery
        if rec is None:
            return
        mss = self.max_datagram_size
        delivered = rec.delivered
        rs_delivered = rec.rs_delivered
        rate = rec.rs_rate
        rs_app_limited = rec.rs_app_limited
        prior_inflight = rec.bytes_in_flight + acked_bytes

        # round trips
        round_start = delivered - rs_delivered >= self.next_round_delivered
        if round_start:
            self.next_round_delivered = delivered
            self.round_count += 1
        self.round_start = round_start

        # bandwidth and the latest delivery signals
        if rate > 0.0:
            if not rs_app_limited or rate >= self.max_bw:
                self.max_bw = self._bw_filter.update(rate, self.round_count, BW_FILTER_ROUNDS)
            if rate > self.bw_latest:
                self.bw_latest = rate
        if rs_delivered > self.inflight_latest:
            self.inflight_latest = rs_delivered
        if self._probing and rs_delivered > self._probe_delivered:
            self._probe_delivered = rs_delivered
        if round_start:
            self._end_loss_round(delivered)
        self.bw = self.max_bw if self.max_bw < self.bw_lo else self.bw_lo

        # ACK aggregation (v3 BBRUpdateACKAggregation)
        expected = self.bw * (now - self._extra_acked_start)
        if self._extra_acked_delivered <= expected:
            self._extra_acked_delivered = 0
            self._extra_acked_start = now
            expected = 0.0
        self._extra_acked_delivered += acked_bytes
        extra = self._extra_acked_delivered - expected
        if extra > self.congestion_window:
            extra = self.congestion_window
        self.extra_acked = self._extra_acked_filter.update(extra, self.round_count, EXTRA_ACKED_FILTER_ROUNDS)

        # STARTUP -> DRAIN -> PROBE_BW
        if self.state == STARTUP:
            if not self.filled_pipe and round_start and not rs_app_limited:
                if self.max_bw >= self.full_bw * FULL_BW_GROWTH:
                    self.full_bw = self.max_bw
                    self.full_bw_count = 0
                else:
                    self.full_bw_count += 1
                    if self.full_bw_count >= FULL_BW_ROUNDS:
                        self.filled_pipe = True
            if self.filled_pipe:
                self.state = DRAIN
                self.pacing_gain = DRAIN_PACING_GAIN
                self.cwnd_gain = STARTUP_CWND_GAIN
        if self.state == DRAIN and rec.bytes_in_flight <= self._inflight(1.0):
            self._enter_probe_bw(now)
        elif self.state == PROBE_BW:
            if self.cycle_index == 0 and self._probe_hi:
                self._probe_inflight_hi_upward(acked_bytes, prior_inflight, round_start)
            if self._is_next_cycle_phase(now, prior_inflight):
                self._advance_cycle_phase(now)

        # min_rtt and PROBE_RTT
        sample = now - largest_acked_sent_time
        expired = self.min_rtt != _INF and now > self.min_rtt_stamp + MIN_RTT_WINDOW
        if rtt.latest_rtt == sample and (sample < self.min_rtt or expired):
            self.min_rtt = sample
            self.min_rtt_stamp = now
        if expired and self.state != PROBE_RTT:
            self._enter_probe_rtt()
        if self.state == PROBE_RTT:
            self._handle_probe_rtt(now, round_start)

        if round_start:
            self.bw_latest = rate
            self.inflight_latest = rs_delivered
        self.bw = self.max_bw if self.max_bw < self.bw_lo else self.bw_lo

        # pacing rate and send quantum
        if self.pacing_rate is None:  # v3 BBRInitPacingRate, on the first ACK
            srtt = rtt.smoothed_rtt if rtt.has_sample and rtt.smoothed_rtt > 0.0 else 0.001
            self.pacing_rate = STARTUP_PACING_GAIN * self.congestion_window / srtt
        bw = self.bw
        if bw > 0.0:
            pacing = self.pacing_gain * bw * (1.0 - PACING_MARGIN)
            if self.filled_pipe or pacing > self.pacing_rate:
                self.pacing_rate = pacing
        quantum = int(self.pacing_rate * 0.001)
        if quantum < 2 * mss:
            quantum = 2 * mss
        elif quantum > SEND_QUANTUM_MAX:
            quantum = SEND_QUANTUM_MAX
        self.send_quantum = quantum

        # congestion window
        target = self._bdp(self.cwnd_gain) + 3 * quantum
        if self.filled_pipe:
            target += self.extra_acked
        if self.state == PROBE_BW and self.cycle_index == 0:
            target += 2 * mss
        cwnd = self.congestion_window
        if self.filled_pipe:
            cwnd += acked_bytes
            if cwnd > target:
                cwnd = target
        elif cwnd < target or delivered < self.initial_cwnd:
            cwnd += acked_bytes
        self.congestion_window = self._bound(cwnd)

    def _end_loss_round(self, delivered: int) -> None:
        """A round trip ended: if it lost too much outside a bandwidth probe, cut the short-term bounds (v3
        BBRAdaptLowerBoundsFromCongestion); then start counting the next one."""
        lost = self._lost_in_round
        if (
            lost >= LOSS_MIN_PACKETS * self.max_datagram_size
            and lost > LOSS_THRESH * (lost + delivered - self._round_delivered_start)
            and self.state != STARTUP
            and not self._probing
        ):
            if self.bw_lo == _INF:
                self.bw_lo = self.max_bw
            if self.inflight_lo == _INF:
                self.inflight_lo = float(self.congestion_window)
            self.bw_lo = max(self.bw_latest, BETA * self.bw_lo)
            self.inflight_lo = max(float(self.inflight_latest), BETA * self.inflight_lo)
        self._lost_in_round = 0
        self._round_delivered_start = delivered
        if self._probing and self.cycle_index != 0 and self.round_count >= self._probe_stop_round:
            self._probing = False

    def _reset_lower_bounds(self) -> None:
        self.bw_lo = _INF
        self.inflight_lo = _INF

    def _enter_probe_bw(self, now: float) -> None:
        self.state = PROBE_BW
        self.cwnd_gain = PROBE_BW_CWND_GAIN
        # a random phase, never the 0.75 one (v1): advance from one of 1..7
        self.cycle_index = len(PACING_GAIN_CYCLE) - 1 - self.rng.randint(0, len(PACING_GAIN_CYCLE) - 2)
        self._advance_cycle_phase(now)

    def _is_next_cycle_phase(self, now: float, prior_inflight: int) -> bool:
        full_length = now - self.cycle_stamp > self.min_rtt
        gain = self.pacing_gain
        if gain == 1.0:
            return full_length
        if gain > 1.0:
            # until the data in flight reaches gain * BDP (v1); too-high loss ends it early (on_packets_lost); a
            # probe held below inflight_hi's headroom cannot get there: one min_rtt
            return full_length and (not self._probe_hi or prior_inflight >= self._inflight(gain))
        # v3 DOWN: until the queue is gone (v1 also stops after one min_rtt, which leaves a standing queue behind
        # when the bottleneck slowed down: only the cwnd cap of 2 BDP would bound it)
        return prior_inflight <= self._inflight(1.0) and prior_inflight <= self._headroom()

    def _advance_cycle_phase(self, now: float) -> None:
        if self.cycle_index == 0:  # leaving the probe: its losses show up within the next round trips
            self._probe_stop_round = self.round_count + PROBE_LOSS_ROUNDS
        self.cycle_index = (self.cycle_index + 1) % len(PACING_GAIN_CYCLE)
        self.cycle_stamp = now
        self.pacing_gain = PACING_GAIN_CYCLE[self.cycle_index]
        if self.cycle_index == 0:  # v3 REFILL/UP: lift the short-term bounds, probe
            self._reset_lower_bounds()
            self._probe_delivered = 0
            self._probe_up_rounds = 0
            # probe inflight_hi itself only at v3's pace (every min(BDP in packets, 63) rounds or 2-3 s): once a
            # loss set it, pushing past it every 8 round trips would cost ~1 % loss on a shallow buffer
            rounds = self._bdp(1.0) / self.max_datagram_size
            if rounds > 63:
                rounds = 63
            self._probe_hi = (
                self.inflight_hi == _INF
                or self.round_count - self._hi_probe_round >= rounds
                or now - self._hi_probe_time >= self._hi_probe_wait
            )
            self._probing = self._probe_hi  # only those set inflight_hi (a held-back probe is v3's CRUISE)
            if self._probe_hi:
                self._hi_probe_round = self.round_count
                self._hi_probe_time = now
                self._hi_probe_wait = 2.0 + self.rng.random()

    def _probe_inflight_hi_upward(self, acked_bytes: int, prior_inflight: int, round_start: bool) -> None:
        """v3 BBRProbeInflightHiUpward: while the window (not the pacing rate) limits the probe, raise
        ``inflight_hi`` by 1, 2, 4 ... datagrams per round trip of the probe."""
        cwnd = self.congestion_window
        if round_start and self._probe_up_rounds < 20:
            self._probe_up_rounds += 1
        hi = self.inflight_hi
        if hi != _INF and cwnd >= int(hi) and prior_inflight + self.max_datagram_size > cwnd:
            growth = self.max_datagram_size << self._probe_up_rounds
            self.inflight_hi += acked_bytes * growth / cwnd

    def _enter_probe_rtt(self) -> None:
        self.prior_cwnd = self.congestion_window  # restored when PROBE_RTT ends
        self.state = PROBE_RTT
        self._probing = False
        self.pacing_gain = 1.0
        self.cwnd_gain = 1.0
        self.probe_rtt_done_stamp = None
        self.probe_rtt_round_done = False
        self.probe_rtt_count += 1

    def _handle_probe_rtt(self, now: float, round_start: bool) -> None:
        rec = self.recovery
        rec.on_app_limited()  # the low rate samples of PROBE_RTT must not count
        if self.probe_rtt_done_stamp is None:
            if rec.bytes_in_flight <= self.minimum_window:
                self.probe_rtt_done_stamp = now + PROBE_RTT_DURATION
                self.probe_rtt_round_done = False
                self.next_round_delivered = rec.delivered
            return
        if round_start:
            self.probe_rtt_round_done = True
        if self.probe_rtt_round_done and now > self.probe_rtt_done_stamp:
            self.min_rtt_stamp = now
            if self.congestion_window < self.prior_cwnd:
                self.congestion_window = self.prior_cwnd
            self._reset_lower_bounds()
            if self.filled_pipe:
                self._enter_probe_bw(now)
            else:
                self.state = STARTUP
                self.pacing_gain = STARTUP_PACING_GAIN
                self.cwnd_gain = STARTUP_CWND_GAIN

    def on_packets_lost(self, lost_bytes: int, now: float) -> None:
        self._lost_in_round += lost_bytes
        rec = self.recovery
        flight = (rec.bytes_in_flight if rec is not None else 0) + lost_bytes
        lost = self._lost_in_round
        if lost <= LOSS_THRESH * flight or lost < LOSS_MIN_PACKETS * self.max_datagram_size:
            return  # not too high (v3 IsInflightTooHigh)
        if self.state == STARTUP:
            if not self.filled_pipe and lost >= STARTUP_FULL_LOSS_PACKETS * self.max_datagram_size:
                self.filled_pipe = True  # DRAIN starts with the next ACK
                self.inflight_hi = max(self._bdp(1.0), float(self.inflight_latest))
        elif self._probing and self.state == PROBE_BW:
            self._probing = False  # once per probe
            target = self._bdp(1.0)
            if self.congestion_window < target:
                target = self.congestion_window
            # v3 takes the data in flight when the lost packet was sent (which we do not keep); the most data
            # the probe got delivered within one round trip is that flight less what was lost: at a drop-tail
            # bottleneck exactly BDP + buffer, with random loss what the probe had in flight
            safe = self._probe_delivered or flight
            self.inflight_hi = max(float(safe), BETA * target)
            if self.cycle_index == 0:
                self._advance_cycle_phase(now)
                self._probing = False
            self.congestion_window = self._bound(self.congestion_window)

    def on_congestion_event(self, sent_time: float, now: float) -> None:
        # the window reacts through on_packets_lost's bounds; here only the recovery period (statistics)
        if sent_time <= self.recovery_start_time:
            return
        self.recovery_start_time = now
        self.congestion_events += 1

    def on_persistent_congestion(self, now: float) -> None:
        super().on_persistent_congestion(now)  # cwnd = 4 packets, recovery period over
        self.prior_cwnd = 0
        self._extra_acked_delivered = 0
        self._extra_acked_start = now

    def on_max_datagram_size(self, size: int) -> None:
        super().on_max_datagram_size(size)
        self.minimum_window = MIN_PIPE_PACKETS * size
        self.initial_cwnd = initial_window(size)
        if self.congestion_window < self.minimum_window:
            self.congestion_window = self.minimum_window

    def __repr__(self) -> str:
        return (
            f"<Bbr {self.state} cwnd={self.congestion_window} bw={self.bw:.0f} min_rtt={self.min_rtt:.6f} "
            f"pacing={self.pacing_rate} gain={self.pacing_gain}>"
        )


register("bbr", Bbr)
register("bbr2", Bbr)
register("bbrv2", Bbr)
