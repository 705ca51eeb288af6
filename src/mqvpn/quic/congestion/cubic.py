"""CUBIC (RFC 9438) for QUIC, with the window in bytes and time taken from the caller's ``now``.

Summary of the algorithm as implemented here (segment counts of the RFC become bytes by multiplying by the
maximum datagram size ``mss``):

* slow start as in RFC 9002 (``cwnd += acked`` while ``cwnd < ssthresh``);
* on a congestion event (once per recovery period): ``W_max = cwnd`` (fast convergence: ``cwnd * (1 + beta) / 2``
  when the window had not regrown to the previous ``W_max``), ``ssthresh = cwnd = max(beta * cwnd, 2 * mss)``;
* congestion avoidance starts with the first ACK outside the recovery period (``t_epoch = now``,
  ``cwnd_epoch = cwnd``, ``K = cbrt((W_max - cwnd_epoch) / (C * mss))``, ``W_est = cwnd_epoch``);
  for each ACK, with ``t = now - t_epoch`` and ``W_cubic(t) = C * mss * (t - K)^3 + W_max``:
  ``W_est += alpha * mss * acked / cwnd`` (alpha = 3(1-beta)/(1+beta), 1 once ``W_est`` reaches the window
  before the last reduction); if ``W_cubic(t) < W_est`` the window follows ``W_est`` (Reno-friendly region),
  otherwise ``target = clamp(W_cubic(t + srtt), cwnd, 1.5 * cwnd)`` and ``cwnd += (target - cwnd) * acked / cwnd``;
* application-limited ACKs neither grow the window nor advance ``t``: the epoch start is shifted by the time spent
  application-limited;
* persistent congestion: ``cwnd = 2 * mss``; the next congestion avoidance stage starts with ``K = 0`` and
  ``W_max`` = the window at its start (RFC 9438 §4.8).
"""

from __future__ import annotations

from .base import NEVER, CongestionController, register

C = 0.4  # segments / s^3
BETA = 0.7
ALPHA_AIMD = 3.0 * (1.0 - BETA) / (1.0 + BETA)
FAST_CONVERGENCE_FACTOR = (1.0 + BETA) / 2.0


class Cubic(CongestionController):
    name = "cubic"

    def __init__(self, max_datagram_size: int = 1200) -> None:
        super().__init__(max_datagram_size)
        self._cwnd = float(self.congestion_window)  # exact window; congestion_window is int(self._cwnd)
        self.w_max: float | None = None  # bytes; None: no reduction yet (or reset by persistent congestion)
        self.k = 0.0  # seconds
        self.epoch_start: float | None = None  # start of the current congestion avoidance stage
        self.w_est = 0.0  # Reno-friendly estimate, bytes
        self._cwnd_prior: float | None = None  # window just before the last reduction
        self._alpha = ALPHA_AIMD
        self._app_limited_since: float | None = None

    def cubic_window(self, t: float) -> float:
        """W_cubic(t) in bytes for the current epoch (``t`` seconds after its start)."""
        d = t - self.k
        return C * self.max_datagram_size * d * d * d + (self.w_max or 0.0)

    # -- events ----------------------------------------------------------------------------------
    def on_packets_acked(self, acked_bytes, largest_acked_sent_time, now, rtt, app_limited) -> None:
        if largest_acked_sent_time <= self.recovery_start_time:
            return  # still in the recovery period
        if app_limited:
            if self.epoch_start is not None and self._app_limited_since is None:
                self._app_limited_since = now
            return
        cwnd = self._cwnd
        if cwnd < self.ssthresh:  # slow start
            cwnd += acked_bytes
            self._cwnd = cwnd
            self.congestion_window = int(cwnd)
            return

        mss = self.max_datagram_size
        if self.epoch_start is None:
            self._start_epoch(now)
        elif self._app_limited_since is not None:
            self.epoch_start += now - self._app_limited_since
            self._app_limited_since = None
        t = now - self.epoch_start

        # Reno-friendly (AIMD) estimate, RFC 9438 §4.3
        w_est = self.w_est + self._alpha * mss * acked_bytes / cwnd
        self.w_est = w_est
        if self._alpha != 1.0 and self._cwnd_prior is not None and w_est >= self._cwnd_prior:
            self._alpha = 1.0

        cm = C * mss
        w_max = self.w_max
        d = t - self.k
        if cm * d * d * d + w_max < w_est:
            if w_est > cwnd:
                cwnd = w_est  # Reno-friendly region
        else:
            d += rtt.smoothed_rtt  # concave / convex region: aim for W_cubic(t + RTT)
            target = cm * d * d * d + w_max
            if target > cwnd:
                if target > 1.5 * cwnd:
                    target = 1.5 * cwnd
                cwnd += (target - cwnd) * acked_bytes / cwnd
        self._cwnd = cwnd
        self.congestion_window = int(cwnd)

    def _start_epoch(self, now: float) -> None:
        cwnd = self._cwnd
        self.epoch_start = now
        self._app_limited_since = None
        if self.w_max is None or self.w_max <= cwnd:
            self.w_max = cwnd
            self.k = 0.0
        else:
            self.k = ((self.w_max - cwnd) / (C * self.max_datagram_size)) ** (1.0 / 3.0)
        self.w_est = cwnd
        self._alpha = ALPHA_AIMD if self._cwnd_prior is not None and cwnd < self._cwnd_prior else 1.0

    def on_congestion_event(self, sent_time: float, now: float) -> None:
        if sent_time <= self.recovery_start_time:
            return  # one reduction per recovery period
        self.recovery_start_time = now
        self.congestion_events += 1
        cwnd = self._cwnd
        if self.w_max is not None and cwnd < self.w_max:
            self.w_max = cwnd * FAST_CONVERGENCE_FACTOR  # fast convergence, RFC 9438 §4.7
        else:
            self.w_max = cwnd
        self._cwnd_prior = cwnd
        reduced = cwnd * BETA
        if reduced < self.minimum_window:
            reduced = float(self.minimum_window)
        self.ssthresh = int(reduced)
        self._cwnd = reduced
        self.congestion_window = int(reduced)
        self.epoch_start = None
        self._app_limited_since = None

    def on_persistent_congestion(self, now: float) -> None:
        self.congestion_window = self.minimum_window
        self._cwnd = float(self.minimum_window)
        self.recovery_start_time = NEVER
        self.w_max = None
        self.k = 0.0
        self.epoch_start = None
        self._app_limited_since = None

    def on_max_datagram_size(self, size: int) -> None:
        super().on_max_datagram_size(size)
        if self._cwnd < self.congestion_window:
            self._cwnd = float(self.congestion_window)


register("cubic", Cubic)
