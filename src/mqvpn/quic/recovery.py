"""RFC 9002 loss detection: RTT estimation, sent-packet records, loss detection, PTO.

One ``Recovery`` per path. It owns that path's congestion controller (``cc``) and pacer, and the sender-side state
of the packet number spaces whose packets travel on the path (``spaces``; path 0 also carries Initial and
Handshake). Sans-I/O: every time is a float in seconds handed in by the caller.

Conventions the connection must follow
--------------------------------------
* Register every packet it sends, ACK-only ones included, with ``on_packet_sent``; packet numbers strictly
  increase within a space and ``SentSpace.sent`` stays ordered by packet number.
* ``on_ack_received`` clamps an ACK to ``space.largest_sent``; the connection itself checks
  ``largest acknowledged > space.largest_sent`` first and closes with PROTOCOL_VIOLATION (RFC 9000 §13.1).
* Handlers: ``callable(True, *args)`` once when the packet is acknowledged, ``callable(False, *args)`` once when
  it is declared lost or rescheduled; never both, never twice. ``discard_space`` calls none.
* ``reschedule(space)`` (PTO probe with retransmission, 0-RTT rejected, keys discarded) fires the handlers with
  False and removes the bytes from ``bytes_in_flight`` without a congestion event, but keeps a bare record of
  each packet ("ghost": no handlers, zero bytes) so that a late ACK still gives an RTT sample and a later loss
  still counts for congestion and persistent congestion, as RFC 9002 §6.2.4 requires (a PTO is not a loss).
  When the space's keys go away (or 0-RTT is rejected) call ``discard_space`` after it.
* A client sets ``is_client = True``. PeerCompletedAddressValidation() (RFC 9002 A.6) is
  ``not is_client or peer_completed_address_validation or handshake_confirmed``;
  ``peer_completed_address_validation`` becomes True by itself when an ACK arrives in the space named "handshake".
* The server's anti-amplification limit is the connection's business: it does not arm the timer returned by
  ``get_loss_detection_time`` while it cannot send.
* Pacing: ``Recovery`` keeps the pacer's rate up to date (after every ACK and congestion event, once an RTT sample
  exists); the connection charges it (``recovery.pacer.on_packet_sent``) for the packets it paces and asks
  ``recovery.pacer.next_send_time(now)``. ``on_packet_sent`` does not touch the pacer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .congestion import Pacer
from .congestion import create as create_congestion_controller
from .congestion.base import CongestionController

PACKET_THRESHOLD = 3  # kPacketThreshold
TIME_THRESHOLD = 9.0 / 8.0  # kTimeThreshold
GRANULARITY = 0.001  # kGranularity, seconds
INITIAL_RTT = 0.333  # kInitialRtt, seconds
PERSISTENT_CONGESTION_THRESHOLD = 3  # kPersistentCongestionThreshold
MAX_PTO_BACKOFF_EXPONENT = 30  # keeps 2**pto_count finite on a path that stays dead

HANDSHAKE_SPACE_NAMES = frozenset(("initial", "handshake"))

Handler = tuple[Callable[..., object], tuple]


class SentPacket:
    """Record of one sent packet (created once per packet: keep it cheap)."""

    __slots__ = ("pn", "sent_time", "sent_bytes", "ack_eliciting", "in_flight", "handlers", "is_mtu_probe",
                 "delivered", "delivered_time", "first_sent_time", "app_limited")

    def __init__(
        self,
        pn: int,
        sent_time: float,
        sent_bytes: int,
        ack_eliciting: bool,
        in_flight: bool,
        handlers: Sequence[Handler] = (),
    ) -> None:
        self.pn = pn
        self.sent_time = sent_time
        self.sent_bytes = sent_bytes
        self.ack_eliciting = ack_eliciting
        self.in_flight = in_flight
        self.handlers = handlers
        self.is_mtu_probe = False
        # delivered, delivered_time, first_sent_time, app_limited: delivery-rate sampling state at send time,
        # set by Recovery.on_packet_sent for in-flight packets only (never read for the others)

    def __repr__(self) -> str:
        return (
            f"SentPacket(pn={self.pn}, t={self.sent_time}, bytes={self.sent_bytes}, "
            f"ae={self.ack_eliciting}, in_flight={self.in_flight}, mtu_probe={self.is_mtu_probe})"
        )


class SentSpace:
    """Sender-side state of one packet number space.

    ``name`` labels it for qlog/stats; "initial" and "handshake" mark the handshake spaces (no ``max_ack_delay``
    in their PTO, ACK delay ignored, PTO armed before the handshake is confirmed). Any other name
    ("application", "0rtt", "1rtt", "path1" ...) is Application Data.
    """

    __slots__ = (
        "name",
        "is_handshake",
        "sent",
        "largest_acked",
        "largest_sent",
        "loss_time",
        "ack_eliciting_in_flight",
        "time_of_last_ack_eliciting",
        "first_pn_hint",
    )

    def __init__(self, name: str = "application", *, is_handshake: bool | None = None) -> None:
        self.name = name
        self.is_handshake = (name in HANDSHAKE_SPACE_NAMES) if is_handshake is None else is_handshake
        self.sent: dict[int, SentPacket] = {}
        self.largest_acked = -1
        self.largest_sent = -1
        self.loss_time: float | None = None
        self.ack_eliciting_in_flight = 0
        self.time_of_last_ack_eliciting: float | None = None
        # lower bound of the smallest packet number still in ``sent`` (only ever moves up)
        self.first_pn_hint = 0

    def smallest_tracked(self) -> int:
        """Smallest packet number in ``sent`` (``largest_sent + 1`` when empty); amortised O(1)."""
        sent = self.sent
        h = self.first_pn_hint
        last = self.largest_sent
        while h <= last and h not in sent:
            h += 1
        self.first_pn_hint = h
        return h

    def __repr__(self) -> str:
        return (
            f"<SentSpace {self.name} tracked={len(self.sent)} largest_sent={self.largest_sent} "
            f"largest_acked={self.largest_acked} ae_in_flight={self.ack_eliciting_in_flight}>"
        )


class RttEstimator:
    """RFC 9002 §5."""

    __slots__ = ("initial_rtt", "latest_rtt", "smoothed_rtt", "rttvar", "min_rtt", "has_sample")

    def __init__(self, initial_rtt: float = INITIAL_RTT) -> None:
        self.initial_rtt = initial_rtt
        self.latest_rtt = 0.0
        self.smoothed_rtt = initial_rtt
        self.rttvar = initial_rtt / 2.0
        self.min_rtt = 0.0
        self.has_sample = False

    def update(self, latest_rtt: float, ack_delay: float, handshake_confirmed: bool, max_ack_delay: float) -> None:
        self.latest_rtt = latest_rtt
        if not self.has_sample:
            self.has_sample = True
            self.min_rtt = latest_rtt
            self.smoothed_rtt = latest_rtt
            self.rttvar = latest_rtt / 2.0
            return
        if latest_rtt < self.min_rtt:
            self.min_rtt = latest_rtt  # min_rtt ignores the ACK delay
        if handshake_confirmed and ack_delay > max_ack_delay:
            ack_delay = max_ack_delay
        adjusted = latest_rtt
        if latest_rtt >= self.min_rtt + ack_delay:
            adjusted = latest_rtt - ack_delay
        srtt = self.smoothed_rtt
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(srtt - adjusted)
        self.smoothed_rtt = 0.875 * srtt + 0.125 * adjusted

    def __repr__(self) -> str:
        return (
            f"RttEstimator(latest={self.latest_rtt:.6f}, smoothed={self.smoothed_rtt:.6f}, "
            f"var={self.rttvar:.6f}, min={self.min_rtt:.6f})"
        )


BANDWIDTH_WINDOW_MIN = 1.0  # seconds: the bandwidth filter spans max(10 RTT, this)


class WindowedMax:
    """Running maximum of a signal over a sliding time window, in O(1) per update (the three-sample scheme of
    Kathleen Nichols' windowed min/max, as Linux's ``win_minmax``): the best, second-best and third-best samples
    of the window, each newer than the one before."""

    __slots__ = ("v0", "t0", "v1", "t1", "v2", "t2")

    def __init__(self) -> None:
        self.reset(0.0, float("-inf"))

    def reset(self, value: float, now: float) -> float:
        self.v0 = self.v1 = self.v2 = value
        self.t0 = self.t1 = self.t2 = now
        return value

    def update(self, value: float, now: float, window: float) -> float:
        if value >= self.v0 or now - self.t2 > window:
            return self.reset(value, now)  # a new maximum, or nothing in the window any more
        if value >= self.v1:
            self.v1 = self.v2 = value
            self.t1 = self.t2 = now
        elif value >= self.v2:
            self.v2 = value
            self.t2 = now
        dt = now - self.t0
        if dt > window:  # the best one left the window: shift
            self.v0, self.t0 = self.v1, self.t1
            self.v1, self.t1 = self.v2, self.t2
            self.v2, self.t2 = value, now
            if now - self.t0 > window:
                self.v0, self.t0 = self.v1, self.t1
                self.v1, self.t1 = self.v2, self.t2
        elif self.t1 == self.t0 and dt > window / 4.0:
            self.v1, self.t1 = value, now  # a quarter of the window passed: take a second-best
            self.v2, self.t2 = value, now
        elif self.t2 == self.t1 and dt > window / 2.0:
            self.v2, self.t2 = value, now  # half of it passed: a third-best
        return self.v0


class Recovery:
    """Loss detection, PTO and congestion control for one path."""

    def __init__(
        self,
        *,
        congestion_control: str | CongestionController = "cubic",
        max_datagram_size: int = 1200,
        peer_max_ack_delay: float = 0.025,
        initial_rtt: float = INITIAL_RTT,
    ) -> None:
        self.max_datagram_size = max_datagram_size
        self.peer_max_ack_delay = peer_max_ack_delay  # seconds; settable once transport parameters are known
        self.rtt = RttEstimator(initial_rtt)
        if isinstance(congestion_control, CongestionController):
            self.cc = congestion_control
        else:
            self.cc = create_congestion_controller(congestion_control, max_datagram_size)
        self.pacer = Pacer(max_datagram_size)
        self.bytes_in_flight = 0
        self.pto_count = 0
        self.max_pto_period: float | None = None  # cap of the backed-off Application Data PTO (None: none)
        self.handshake_confirmed = False
        self.peer_completed_address_validation = False  # only consulted when is_client (see module docstring)
        self.is_client = False
        self.spaces: list[SentSpace] = []
        self.first_rtt_sample_time: float | None = None
        # stats
        self.packets_sent = 0
        self.packets_lost = 0  # MTU probes excluded
        self.bytes_lost = 0
        self.mtu_probes_lost = 0
        self.persistent_congestion_events = 0
        # time the loss detection timer was last (re)armed by an event other than a send; the client's
        # anti-deadlock PTO counts from it
        self._timer_anchor: float | None = None
        # delivery-rate estimation (draft-cheng-iccrg-delivery-rate-estimation), per path: for the multipath
        # scheduler's weights and model-based congestion controllers
        self.delivered = 0  # bytes acknowledged so far
        self.delivered_time = 0.0
        self.first_sent_time = 0.0
        # packets sent while delivered < this are application-limited; a path is taken as application-limited
        # until its window is first found full (``on_cwnd_limited``): a handshake's samples say nothing of its rate
        self.app_limited_until = 1 << 62
        self.rs_rate = 0.0  # last sample, bytes/s (0.0: none or invalid)
        self.rs_app_limited = False
        self.rs_delivered = 0
        self.rs_interval = 0.0
        self.bandwidth = 0.0  # windowed maximum of the samples, bytes/s (0.0 until the first one)
        self.bandwidth_measured = False  # a sample of a loaded (not application-limited) path was seen
        self._bw_filter = WindowedMax()
        self.cc.recovery = self
        # skip the per-packet call when the controller does not care about sends
        cc_sent = type(self.cc).on_packet_sent
        self._cc_on_sent = None if cc_sent is CongestionController.on_packet_sent else self.cc.on_packet_sent

    # ------------------------------------------------------------------------------------------------
    # sending
    def on_packet_sent(self, space: SentSpace, packet: SentPacket) -> None:
        pn = packet.pn
        space.sent[pn] = packet
        space.largest_sent = pn
        self.packets_sent += 1
        if packet.ack_eliciting:
            space.ack_eliciting_in_flight += 1
            space.time_of_last_ack_eliciting = packet.sent_time
        if packet.in_flight:
            if not self.bytes_in_flight:
                # start of a flight: the send/ack intervals of the next rate samples count from here
                self.first_sent_time = self.delivered_time = packet.sent_time
            packet.delivered = self.delivered
            packet.delivered_time = self.delivered_time
            packet.first_sent_time = self.first_sent_time
            packet.app_limited = self.app_limited_until > self.delivered
            self.bytes_in_flight += packet.sent_bytes
            if self._cc_on_sent is not None:
                self._cc_on_sent(packet.sent_bytes, packet.sent_time)

    def on_app_limited(self) -> None:
        """The sender had window room but nothing to send: rate samples of the packets in flight (and of those
        sent until they are acknowledged) underestimate the path and are marked application-limited."""
        mark = self.delivered + self.bytes_in_flight
        if mark <= 0:
            mark = 1
        if mark > self.app_limited_until:  # never shortens a mark (a fresh path's lasts until its window fills)
            self.app_limited_until = mark

    def on_cwnd_limited(self) -> None:
        """The sender had data but the congestion window was full: what it sends now measures the path."""
        if self.app_limited_until > self.delivered:
            self.app_limited_until = 0

    def _rate_sample(self, p: SentPacket, acked_bytes: int, now: float) -> None:
        """Delivery-rate sample for one ACK (draft-cheng-iccrg-delivery-rate-estimation): bytes delivered
        between the send of ``p`` (the newest packet acknowledged) and now, over the longer of its send and ack
        intervals. Sets ``rs_rate`` (0.0: no valid sample), ``rs_app_limited``, ``rs_delivered``, ``rs_interval``
        and feeds ``bandwidth`` (windowed maximum)."""
        delivered = self.delivered + acked_bytes
        self.delivered = delivered
        self.delivered_time = now
        self.first_sent_time = p.sent_time
        interval = p.sent_time - p.first_sent_time  # send interval
        ack_interval = now - p.delivered_time
        if ack_interval > interval:
            interval = ack_interval
        delta = delivered - p.delivered
        self.rs_delivered = delta
        self.rs_interval = interval
        self.rs_app_limited = p.app_limited
        # an interval below min_rtt would overestimate (ACK compression): no sample
        if interval <= 0.0 or interval < self.rtt.min_rtt or delta <= 0:
            self.rs_rate = 0.0
            return
        rate = delta / interval
        self.rs_rate = rate
        if not p.app_limited:
            self.bandwidth_measured = True  # the path was loaded: its rate is known, not just a lower bound
        if not p.app_limited or rate >= self.bandwidth:
            window = 10.0 * self.rtt.smoothed_rtt
            if window < BANDWIDTH_WINDOW_MIN:
                window = BANDWIDTH_WINDOW_MIN
            self.bandwidth = self._bw_filter.update(rate, now, window)

    def unanswered_for(self, now: float) -> float:
        """How long the oldest ack-eliciting packet still in flight has waited for an acknowledgement (0.0:
        none). Unlike the PTO timer, later sends do not restart it: a path that swallows everything it is given
        shows here within one PTO even while it is kept busy."""
        oldest = None
        for space in self.spaces:
            if space.ack_eliciting_in_flight:
                # ascending packet numbers; ACK-only packets are skipped (a bounded look: this runs per send round)
                for _i, p in zip(range(64), space.sent.values(), strict=False):
                    if p.ack_eliciting:
                        if oldest is None or p.sent_time < oldest:
                            oldest = p.sent_time
                        break
        return 0.0 if oldest is None else now - oldest

    def congestion_window_available(self) -> int:
        return self.cc.congestion_window - self.bytes_in_flight

    # ------------------------------------------------------------------------------------------------
    # acknowledgements
    def on_ack_received(
        self,
        space: SentSpace,
        ranges: Sequence[tuple[int, int]],
        ack_delay: float,
        now: float,
        *,
        is_handshake_space: bool = False,
        rtt_sample: bool = True,
    ) -> int:
        """Process one ACK frame; ``ranges`` ascending half-open. Returns the number of newly acked packets.

        ``rtt_sample=False``: the ACK came back on another path (multipath): no RTT sample from it."""
        if not ranges:
            return 0
        largest = ranges[-1][1] - 1
        largest_sent = space.largest_sent
        if largest > largest_sent:
            largest = largest_sent  # never acknowledge (nor declare losses against) packets not sent
        if largest > space.largest_acked:
            space.largest_acked = largest
        sent = space.sent
        if not sent:
            return 0

        # newly acknowledged packets, ascending packet number
        first = space.smallest_tracked()
        limit = largest_sent + 1
        pop = sent.pop
        acked: list[SentPacket] = []
        append = acked.append
        for start, stop in ranges:
            if stop > limit:
                stop = limit
            if start < first:
                start = first
            if start >= stop:
                continue
            if stop - start <= len(sent):
                for pn in range(start, stop):
                    p = pop(pn, None)
                    if p is not None:
                        append(p)
            else:  # a wide range over few tracked packets: walk the packets instead
                pns = []
                for pn in sent:
                    if pn >= stop:
                        break
                    if pn >= start:
                        pns.append(pn)
                for pn in pns:
                    append(pop(pn))
        if not acked:
            return 0

        acked_bytes = 0
        ack_eliciting = 0
        last_sent_time = 0.0
        newest = None  # the in-flight packet sent last: it defines the delivery-rate sample
        for p in acked:
            if p.in_flight:
                acked_bytes += p.sent_bytes
                last_sent_time = p.sent_time
                if newest is None or p.delivered >= newest.delivered:
                    newest = p
            if p.ack_eliciting:
                ack_eliciting += 1
        if newest is not None:
            self._rate_sample(newest, acked_bytes, now)
        bytes_in_flight_before = self.bytes_in_flight
        self.bytes_in_flight = bytes_in_flight_before - acked_bytes
        space.ack_eliciting_in_flight -= ack_eliciting

        rtt = self.rtt
        p = acked[-1]
        if ack_eliciting and p.pn == largest and rtt_sample:
            latest_rtt = now - p.sent_time
            if latest_rtt < 0.0:
                latest_rtt = 0.0
            if is_handshake_space or space.is_handshake:
                ack_delay = 0.0
            if self.first_rtt_sample_time is None:
                self.first_rtt_sample_time = now
            rtt.update(latest_rtt, ack_delay, self.handshake_confirmed, self.peer_max_ack_delay)

        if sent and space.smallest_tracked() <= space.largest_acked:
            lost = self._detect_lost(space, now)
            if lost:
                self._on_packets_lost(space, lost, now)
        else:
            space.loss_time = None

        cc = self.cc
        if acked_bytes:
            cc.on_packets_acked(
                acked_bytes, last_sent_time, now, rtt, 2 * bytes_in_flight_before < cc.congestion_window
            )
        if rtt.has_sample:
            rate = cc.pacing_rate
            if rate is None:
                self.pacer.update(cc.congestion_window, rtt.smoothed_rtt)
            else:
                self.pacer.set_rate(rate, cc.send_quantum)

        if self.is_client and not (self.peer_completed_address_validation or self.handshake_confirmed):
            if space.name == "handshake":
                self.peer_completed_address_validation = True  # the server processed a Handshake packet
                self.pto_count = 0
        else:
            self.pto_count = 0
        self._timer_anchor = now

        # handlers last, so that they observe the updated state
        for p in acked:
            if p.handlers:
                for fn, args in p.handlers:
                    fn(True, *args)
        return len(acked)

    # ------------------------------------------------------------------------------------------------
    # loss detection
    def _detect_lost(self, space: SentSpace, now: float) -> list[SentPacket]:
        """RFC 9002 DetectAndRemoveLostPackets; sets ``space.loss_time``."""
        rtt = self.rtt
        loss_delay = rtt.latest_rtt if rtt.latest_rtt > rtt.smoothed_rtt else rtt.smoothed_rtt
        loss_delay *= TIME_THRESHOLD
        if loss_delay < GRANULARITY:
            loss_delay = GRANULARITY
        largest_acked = space.largest_acked
        pn_lost_below = largest_acked - PACKET_THRESHOLD  # lost if pn <= this
        lost: list[SentPacket] = []
        loss_time = None
        for pn, p in space.sent.items():
            if pn > largest_acked:
                break
            # (same expression as loss_time below, so a timer firing at loss_time always finds its loss)
            t = p.sent_time + loss_delay
            if pn <= pn_lost_below or t <= now:
                lost.append(p)
            elif loss_time is None or t < loss_time:
                loss_time = t
        space.loss_time = loss_time
        if lost:
            sent = space.sent
            for p in lost:
                del sent[p.pn]
        return lost

    def _on_packets_lost(self, space: SentSpace, lost: list[SentPacket], now: float) -> None:
        lost_in_flight = 0
        ack_eliciting = 0
        congestion_sent_time = None
        counted = 0
        counted_bytes = 0
        for p in lost:
            if p.ack_eliciting:
                ack_eliciting += 1
            if p.is_mtu_probe:
                self.mtu_probes_lost += 1
                if p.in_flight:
                    lost_in_flight += p.sent_bytes
                continue
            counted += 1
            counted_bytes += p.sent_bytes
            if p.in_flight:
                lost_in_flight += p.sent_bytes
                if congestion_sent_time is None or p.sent_time > congestion_sent_time:
                    congestion_sent_time = p.sent_time
        self.bytes_in_flight -= lost_in_flight
        space.ack_eliciting_in_flight -= ack_eliciting
        self.packets_lost += counted
        self.bytes_lost += counted_bytes

        if congestion_sent_time is not None:
            cc = self.cc
            cc.on_packets_lost(sum([p.sent_bytes for p in lost if p.in_flight and not p.is_mtu_probe]), now)
            cc.on_congestion_event(congestion_sent_time, now)
            if self.first_rtt_sample_time is not None and self._in_persistent_congestion(lost):
                self.persistent_congestion_events += 1
                cc.on_persistent_congestion(now)
                self.rtt.min_rtt = self.rtt.latest_rtt  # RFC 9002 §5.2
            if self.rtt.has_sample:
                rate = cc.pacing_rate
                if rate is None:
                    self.pacer.update(cc.congestion_window, self.rtt.smoothed_rtt)
                else:
                    self.pacer.set_rate(rate, cc.send_quantum)

        for p in lost:
            if p.handlers:
                handlers = p.handlers
                p.handlers = ()
                for fn, args in handlers:
                    fn(False, *args)

    def _in_persistent_congestion(self, lost: list[SentPacket]) -> bool:
        """RFC 9002 §7.6.2 over one space's batch of losses (``lost`` ascending by packet number).

        Two lost ack-eliciting packets sent after the first RTT sample, further apart than the persistent
        congestion duration, with no packet in between acknowledged. A gap in the packet numbers between two lost
        packets may hide an acknowledged packet, so it ends the run (conservative).
        """
        duration = self.pto_duration(True) * PERSISTENT_CONGESTION_THRESHOLD
        first_sample = self.first_rtt_sample_time
        start = None
        prev_pn = None
        for p in lost:
            pn = p.pn
            if prev_pn is not None and pn != prev_pn + 1:
                start = None
            prev_pn = pn
            if not p.ack_eliciting or p.is_mtu_probe or p.sent_time <= first_sample:
                continue
            if start is None:
                start = p.sent_time
            elif p.sent_time - start > duration:
                return True
        return False

    # ------------------------------------------------------------------------------------------------
    # timers
    def pto_duration(self, include_max_ack_delay: bool = True) -> float:
        """smoothed_rtt + max(4 * rttvar, kGranularity) (+ max_ack_delay); not scaled by pto_count."""
        rtt = self.rtt
        var = 4.0 * rtt.rttvar
        if var < GRANULARITY:
            var = GRANULARITY
        d = rtt.smoothed_rtt + var
        if include_max_ack_delay:
            d += self.peer_max_ack_delay
        return d

    def _pto_time_and_space(self) -> tuple[float | None, SentSpace | None]:
        backoff = 2 ** min(self.pto_count, MAX_PTO_BACKOFF_EXPONENT)
        base = self.pto_duration(False)
        cap = self.max_pto_period
        best_time = None
        best_space = None
        for space in self.spaces:
            if not space.ack_eliciting_in_flight:
                continue
            if space.is_handshake:
                t = space.time_of_last_ack_eliciting + base * backoff
            elif self.handshake_confirmed:
                period = (base + self.peer_max_ack_delay) * backoff
                if cap is not None and period > cap:
                    # multipath: a dead path is probed at a bounded pace while others carry the traffic
                    period = max(cap, base + self.peer_max_ack_delay)
                t = space.time_of_last_ack_eliciting + period
            else:
                continue  # no PTO for Application Data before the handshake is confirmed
            if best_time is None or t < best_time:
                best_time, best_space = t, space
        if (
            best_time is None
            and self.is_client
            and not (self.peer_completed_address_validation or self.handshake_confirmed)
        ):
            # anti-deadlock: the server may be blocked by its amplification limit; probe from the last event
            if self._timer_anchor is None:
                return None, None
            probe = None
            for space in self.spaces:
                if space.name == "handshake":
                    probe = space
                    break
                if probe is None and space.is_handshake:
                    probe = space
            if probe is None:
                return None, None
            return self._timer_anchor + base * backoff, probe
        return best_time, best_space

    def get_loss_detection_time(self) -> float | None:
        """When ``on_loss_detection_timeout`` must run next (RFC 9002 SetLossDetectionTimer), None: no timer."""
        t = None
        for space in self.spaces:
            lt = space.loss_time
            if lt is not None and (t is None or lt < t):
                t = lt
        if t is not None:
            return t
        return self._pto_time_and_space()[0]

    def on_loss_detection_timeout(self, now: float) -> SentSpace | None:
        """Timer expiry. Declares time-threshold losses and returns None, or (PTO) increments ``pto_count`` and
        returns the space in which the connection must now send one or two ack-eliciting probes (bypassing the
        congestion window). A call before ``get_loss_detection_time()`` does nothing and returns None."""
        loss_space = None
        t = None
        for space in self.spaces:
            lt = space.loss_time
            if lt is not None and (t is None or lt < t):
                t, loss_space = lt, space
        if loss_space is not None:
            if t > now:
                return None
            lost = self._detect_lost(loss_space, now)
            if lost:
                self._on_packets_lost(loss_space, lost, now)
            self._timer_anchor = now
            return None
        t, pto_space = self._pto_time_and_space()
        if t is None or t > now:
            return None
        self.pto_count += 1
        self._timer_anchor = now
        return pto_space

    # ------------------------------------------------------------------------------------------------
    # retransmission without loss, key discard, PMTU
    def reschedule(self, space: SentSpace) -> int:
        """Hand every in-flight packet of ``space`` back for retransmission (handlers called with False) and take
        it out of ``bytes_in_flight``, without a congestion event. The packets stay tracked as bare records (no
        handlers, zero bytes) for RTT, loss and persistent-congestion purposes. Returns how many were handed back."""
        handed_back = []
        freed = 0
        for p in space.sent.values():
            if p.in_flight:
                freed += p.sent_bytes
                p.sent_bytes = 0
                if p.handlers:
                    handed_back.append(p.handlers)
                    p.handlers = ()
        self.bytes_in_flight -= freed
        for handlers in handed_back:
            for fn, args in handlers:
                fn(False, *args)
        return len(handed_back)

    def discard_space(self, space: SentSpace) -> None:
        """RFC 9002 §6.4: forget the space's packets (no handlers), remove them from flight, reset its timers."""
        freed = 0
        for p in space.sent.values():
            if p.in_flight:
                freed += p.sent_bytes
        self.bytes_in_flight -= freed
        space.sent.clear()
        space.first_pn_hint = space.largest_sent + 1
        space.loss_time = None
        space.ack_eliciting_in_flight = 0
        space.time_of_last_ack_eliciting = None
        self.pto_count = 0

    def update_max_datagram_size(self, size: int) -> None:
        self.max_datagram_size = size
        self.cc.on_max_datagram_size(size)
        self.pacer.max_datagram_size = size
        if self.rtt.has_sample:
            rate = self.cc.pacing_rate
            if rate is None:
                self.pacer.update(self.cc.congestion_window, self.rtt.smoothed_rtt)
            else:
                self.pacer.set_rate(rate, self.cc.send_quantum)

    def __repr__(self) -> str:
        return (
            f"<Recovery cc={self.cc!r} in_flight={self.bytes_in_flight} pto_count={self.pto_count} "
            f"rtt={self.rtt!r}>"
        )
