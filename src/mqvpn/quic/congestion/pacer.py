"""Token-bucket pacer (RFC 9002 §7.7): rate = 1.25 * congestion_window / smoothed_rtt, or a rate set by the controller.

The bucket is kept as a single float, the virtual time ``_empty_at`` at which it holds no tokens
(tokens at ``now`` = ``min(capacity, (now - _empty_at) * rate)``), so a send costs one max, one multiply and
one add, and the "may I send?" question is one comparison.

Sending is allowed while the bucket is not in debt (``now >= _empty_at``); a packet may take it into debt by
its own size. The capacity lets ``burst`` bytes leave back to back, where ``burst`` is half the congestion
window clamped to [2, 16] full-size datagrams (16 keeps a full GSO batch together on a large window).

A model-based controller (BBR) that publishes its own ``pacing_rate`` has it applied with ``set_rate`` instead of
``update`` (``Recovery`` picks one or the other); the burst is then the controller's send quantum, clamped to the
same [2, 16] datagrams.

Until ``update`` or ``set_rate`` is first called (no RTT sample yet) the pacer does not pace.
"""

from __future__ import annotations

MIN_BURST_PACKETS = 2
MAX_BURST_PACKETS = 16
PACING_GAIN = 1.25
_SLACK = 1e-9  # seconds; absorbs float rounding when a burst is spent packet by packet


class Pacer:
    __slots__ = ("max_datagram_size", "rate", "burst", "_inv_rate", "_burst_time", "_empty_at")

    def __init__(self, max_datagram_size: int = 1200) -> None:
        self.max_datagram_size = max_datagram_size
        self.rate = float("inf")  # bytes per second; inf: not pacing
        self.burst = 0  # bytes that may leave back to back from a full bucket
        self._inv_rate = 0.0  # seconds per byte
        self._burst_time = 0.0  # bucket capacity beyond one datagram, in seconds of rate
        self._empty_at = float("-inf")

    def update(self, congestion_window: int, smoothed_rtt: float) -> None:
        """Recompute the rate; called by ``Recovery`` after each ACK / congestion event once RTT is sampled."""
        if smoothed_rtt <= 0.0 or congestion_window <= 0:
            self.set_rate(float("inf"))
        else:
            self.set_rate(PACING_GAIN * congestion_window / smoothed_rtt, congestion_window // 2)

    def set_rate(self, rate: float, burst_bytes: int = 0) -> None:
        """Pace at ``rate`` bytes/s chosen by the congestion controller, letting ``burst_bytes`` leave back to back
        (clamped to [2, 16] datagrams). A rate that is not positive and finite stops pacing."""
        if not 0.0 < rate < float("inf"):
            self.rate = float("inf")
            self._inv_rate = 0.0
            self._burst_time = 0.0
            return
        mss = self.max_datagram_size
        burst = int(burst_bytes)
        if burst < MIN_BURST_PACKETS * mss:
            burst = MIN_BURST_PACKETS * mss
        elif burst > MAX_BURST_PACKETS * mss:
            burst = MAX_BURST_PACKETS * mss
        inv = 1.0 / rate
        self.rate = rate
        self.burst = burst
        self._inv_rate = inv
        self._burst_time = (burst - mss) * inv + _SLACK

    def next_send_time(self, now: float) -> float | None:
        """None: a packet may be sent now; else the earliest time the next one may leave."""
        t = self._empty_at
        return None if t <= now else t

    def on_packet_sent(self, sent_bytes: int, now: float) -> None:
        t = now - self._burst_time
        if self._empty_at > t:
            t = self._empty_at
        self._empty_at = t + sent_bytes * self._inv_rate
