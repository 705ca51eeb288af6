"""NewReno as specified for QUIC by RFC 9002 §7 (slow start, recovery period, congestion avoidance)."""

from __future__ import annotations

from .base import CongestionController, register

LOSS_REDUCTION_FACTOR = 0.5  # kLossReductionFactor


class NewReno(CongestionController):
    name = "newreno"

    def __init__(self, max_datagram_size: int = 1200) -> None:
        super().__init__(max_datagram_size)
        # congestion avoidance byte counter: one datagram of growth per congestion_window bytes acked
        self._ca_acked = 0

    def on_packets_acked(self, acked_bytes, largest_acked_sent_time, now, rtt, app_limited) -> None:
        if app_limited or largest_acked_sent_time <= self.recovery_start_time:
            return
        cwnd = self.congestion_window
        if cwnd < self.ssthresh:
            self.congestion_window = cwnd + acked_bytes  # slow start
            return
        # congestion avoidance: cwnd += mss * acked / cwnd, as an exact byte counter
        acc = self._ca_acked + acked_bytes
        if acc >= cwnd:
            grow, acc = divmod(acc, cwnd)
            self.congestion_window = cwnd + grow * self.max_datagram_size
        self._ca_acked = acc

    def on_congestion_event(self, sent_time: float, now: float) -> None:
        if sent_time <= self.recovery_start_time:
            return  # one reduction per recovery period
        self.recovery_start_time = now
        self.congestion_events += 1
        self.ssthresh = int(self.congestion_window * LOSS_REDUCTION_FACTOR)
        self.congestion_window = max(self.ssthresh, self.minimum_window)
        self._ca_acked = 0

    def on_persistent_congestion(self, now: float) -> None:
        super().on_persistent_congestion(now)
        self._ca_acked = 0


register("newreno", NewReno)
