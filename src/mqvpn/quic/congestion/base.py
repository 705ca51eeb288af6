"""Congestion controller interface (RFC 9002 §7) and the registry of algorithms by name.

All sizes are bytes, all times are floats in seconds supplied by the caller (sans-I/O).
One controller instance exists per path; it is owned and driven by that path's ``Recovery``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..recovery import RttEstimator

NEVER = float("-inf")  # "no recovery period yet": every send time is later than this


def initial_window(max_datagram_size: int) -> int:
    """RFC 9002 §7.2: min(10 * max_datagram_size, max(2 * max_datagram_size, 14720))."""
    return min(10 * max_datagram_size, max(2 * max_datagram_size, 14720))


def minimum_window(max_datagram_size: int) -> int:
    """RFC 9002 §7.2: kMinimumWindow = 2 * max_datagram_size."""
    return 2 * max_datagram_size


class CongestionController:
    """Base class: window bookkeeping shared by every algorithm.

    Subclasses override ``on_packets_acked``, ``on_congestion_event`` and ``on_persistent_congestion``.

    ``congestion_window`` is always an ``int`` number of bytes, never below ``minimum_window``.
    ``ssthresh`` is ``math.inf`` until the first congestion event.
    ``recovery_start_time`` is the time the current recovery period started (``-inf`` when none):
    a packet sent at or before it belongs to the recovery period (RFC 9002 §7.3.2).

    Pacing: ``pacing_rate`` (bytes/s) is None for window-based controllers, and the pacer then derives its rate
    from the window (``Pacer.update``: 1.25 * cwnd / srtt). A model-based controller sets it to the rate it wants
    (and ``send_quantum`` to the bytes it lets leave back to back); ``Recovery`` hands both to ``Pacer.set_rate``
    wherever it would otherwise call ``Pacer.update``.
    """

    name = "base"
    pacing_rate: float | None = None  # bytes/s chosen by the controller; None: derived from the window
    send_quantum: int = 0  # bytes per pacing burst when ``pacing_rate`` is set (the pacer clamps it)

    def __init__(self, max_datagram_size: int = 1200) -> None:
        self.max_datagram_size = max_datagram_size
        self.minimum_window = minimum_window(max_datagram_size)
        self.congestion_window: int = initial_window(max_datagram_size)
        self.ssthresh: float = float("inf")
        self.recovery_start_time: float = NEVER
        self.congestion_events = 0  # stats: reductions actually applied
        # the path's Recovery (set by it): model-based controllers read its delivery-rate sample
        # (``rs_rate``, ``rs_app_limited``, ``rs_delivered``, ``rs_interval``, ``bandwidth``, ``delivered``)
        self.recovery = None

    # -- queries ---------------------------------------------------------------------------------
    def in_recovery(self, sent_time: float) -> bool:
        return sent_time <= self.recovery_start_time

    @property
    def in_slow_start(self) -> bool:
        return self.congestion_window < self.ssthresh

    # -- events ----------------------------------------------------------------------------------
    def on_packet_sent(self, sent_bytes: int, now: float) -> None:
        """An in-flight packet left. No-op by default (``Recovery`` skips the call when not overridden)."""

    def on_packets_acked(
        self,
        acked_bytes: int,
        largest_acked_sent_time: float,
        now: float,
        rtt: RttEstimator,
        app_limited: bool,
    ) -> None:
        """``acked_bytes`` of in-flight packets were newly acknowledged by one ACK frame.

        ``largest_acked_sent_time``: send time of the latest-sent of them (recovery period test).
        ``app_limited``: the sender was not using its window (RFC 9002 §7.8): do not grow.
        """
        raise NotImplementedError

    def on_packets_lost(self, lost_bytes: int, now: float) -> None:
        """``lost_bytes`` of in-flight packets (MTU probes excluded) were just declared lost, in one batch.

        Called by ``Recovery`` before ``on_congestion_event`` for the same batch, after ``bytes_in_flight`` has
        dropped them. No-op by default: window-based controllers only need the congestion event; model-based
        ones (BBR) measure the loss rate with it.
        """

    def on_congestion_event(self, sent_time: float, now: float) -> None:
        """Loss of an in-flight packet sent at ``sent_time``: reduce once per recovery period."""
        raise NotImplementedError

    def on_persistent_congestion(self, now: float) -> None:
        """RFC 9002 §7.6.2: collapse to the minimum window and leave any recovery period."""
        self.congestion_window = self.minimum_window
        self.recovery_start_time = NEVER

    def on_max_datagram_size(self, size: int) -> None:
        """The path MTU changed (RFC 9002 §7.2): windows expressed in datagrams follow it."""
        self.max_datagram_size = size
        self.minimum_window = minimum_window(size)
        if self.congestion_window < self.minimum_window:
            self.congestion_window = self.minimum_window

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} cwnd={self.congestion_window} ssthresh={self.ssthresh} "
            f"recovery_start={self.recovery_start_time}>"
        )


_registry: dict[str, type[CongestionController]] = {}


def register(name: str, cls: type[CongestionController]) -> None:
    """Make ``cls`` available as ``create(name, ...)`` (names are case-insensitive)."""
    if not (isinstance(cls, type) and issubclass(cls, CongestionController)):
        raise TypeError(f"{cls!r} is not a CongestionController subclass")
    _registry[name.lower()] = cls


def create(name: str, max_datagram_size: int = 1200) -> CongestionController:
    """Instantiate the algorithm registered as ``name``; ValueError names the available ones."""
    try:
        cls = _registry[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown congestion control algorithm {name!r} (available: {', '.join(available())})"
        ) from None
    return cls(max_datagram_size)


def available() -> list[str]:
    return sorted(_registry)


def congestion_control_name(settings) -> str:
    """The controller to use for a daemon's ``cc`` setting: a registered name, else CUBIC (with a warning).

    The reference's default is BBRv2: ``bbr``, ``bbr2`` and ``bbrv2`` all select the BBR-style model-based
    controller (``bbr.py``) and return ``"bbr"``; an alias returns the name its class is registered under.
    """
    import logging

    from mqvpn.quic import congestion  # noqa: F401  (registers the built-in controllers)

    wanted = (getattr(settings, "cc", None) or "cubic").lower()
    cls = _registry.get(wanted)
    if cls is not None:
        # an alias ("bbr2") reports the algorithm's own name ("bbr") when that is registered to the same class
        return cls.name if _registry.get(cls.name) is cls else wanted
    logging.getLogger("mqvpn").warning("congestion control %r is not available: using cubic", wanted)
    return "cubic"
