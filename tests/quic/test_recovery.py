import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from mqvpn.quic.rangeset import RangeSet
from mqvpn.quic.recovery import (
    GRANULARITY,
    Recovery,
    RttEstimator,
    SentPacket,
    SentSpace,
)

MSS = 1200


class Log:
    """Records handler calls: pn -> list of flags."""

    def __init__(self):
        self.calls: dict[int, list[bool]] = {}

    def __call__(self, acked: bool, key) -> None:
        self.calls.setdefault(key, []).append(acked)

    def flags(self, key):
        return self.calls.get(key, [])


def make(cc="newreno", confirmed=True, name="application", **kw):
    r = Recovery(congestion_control=cc, **kw)
    space = SentSpace(name)
    r.spaces.append(space)
    r.handshake_confirmed = confirmed
    return r, space


def send(r, space, pn, t, log=None, size=MSS, ae=True, in_flight=True, mtu_probe=False):
    p = SentPacket(pn, t, size, ae, in_flight, ((log, (pn,)),) if log is not None else ())
    p.is_mtu_probe = mtu_probe
    r.on_packet_sent(space, p)
    return p


# -- RTT estimator (RFC 9002 §5) -----------------------------------------------------------------------
def test_rtt_initial_values():
    e = RttEstimator()
    assert (e.smoothed_rtt, e.rttvar, e.min_rtt, e.has_sample) == (0.333, 0.1665, 0.0, False)
    assert RttEstimator(0.1).rttvar == 0.05


def test_rtt_estimator_math():
    e = RttEstimator()
    e.update(0.1, 0.05, True, 0.025)  # first sample: ACK delay ignored
    assert (e.latest_rtt, e.smoothed_rtt, e.rttvar, e.min_rtt) == (0.1, 0.1, 0.05, 0.1)

    e.update(0.15, 0.03, True, 0.025)  # ack_delay capped at max_ack_delay once confirmed
    adjusted = 0.15 - 0.025
    assert e.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * abs(0.1 - adjusted))
    assert e.smoothed_rtt == pytest.approx(0.875 * 0.1 + 0.125 * adjusted)
    assert e.min_rtt == 0.1

    f = RttEstimator()
    f.update(0.1, 0.0, False, 0.025)
    f.update(0.15, 0.03, False, 0.025)  # not confirmed: the full ack_delay is used
    assert f.smoothed_rtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.12)

    g = RttEstimator()
    g.update(0.1, 0.0, True, 0.025)
    g.update(0.11, 0.02, True, 0.025)  # 0.11 < min_rtt + ack_delay: not adjusted
    assert g.smoothed_rtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.11)
    g.update(0.05, 0.0, True, 0.025)
    assert g.min_rtt == 0.05  # min_rtt follows the raw samples


def test_rtt_sampling_rules_via_recovery():
    r, s = make()
    send(r, s, 0, 0.0)
    send(r, s, 1, 0.01, ae=False, in_flight=False)  # ACK-only packet
    assert r.on_ack_received(s, [(0, 2)], 0.0, 0.1) == 2
    # largest newly acked (pn 1) is not ack-eliciting but the ACK newly acks one that is: sample = 0.1 - 0.01
    assert r.rtt.has_sample and r.rtt.latest_rtt == pytest.approx(0.09)
    assert r.first_rtt_sample_time == 0.1

    send(r, s, 2, 0.2, ae=False, in_flight=False)
    r.on_ack_received(s, [(0, 3)], 0.0, 0.5)  # only a non-ack-eliciting packet newly acked: no sample
    assert r.rtt.latest_rtt == pytest.approx(0.09)

    send(r, s, 3, 0.6)
    send(r, s, 4, 0.61)
    r.on_ack_received(s, [(4, 5)], 0.0, 0.7)
    assert r.rtt.latest_rtt == pytest.approx(0.09)
    r.on_ack_received(s, [(3, 5)], 0.0, 0.9)  # largest (4) not newly acknowledged: no sample
    assert r.rtt.latest_rtt == pytest.approx(0.09)


def test_ack_delay_used_in_app_space_ignored_in_handshake_spaces():
    for name, expect_adjusted in (("application", True), ("handshake", False), ("initial", False)):
        r, s = make(name=name)
        send(r, s, 0, 0.0)
        r.on_ack_received(s, [(0, 1)], 0.0, 0.1)
        send(r, s, 1, 1.0)
        r.on_ack_received(s, [(1, 2)], 0.02, 1.2)
        adjusted = 0.18 if expect_adjusted else 0.2
        assert r.rtt.smoothed_rtt == pytest.approx(0.875 * 0.1 + 0.125 * adjusted), name
    # the explicit flag does the same for a space with another name
    r, s = make(name="app")
    send(r, s, 0, 0.0)
    r.on_ack_received(s, [(0, 1)], 0.0, 0.1)
    send(r, s, 1, 1.0)
    r.on_ack_received(s, [(1, 2)], 0.02, 1.2, is_handshake_space=True)
    assert r.rtt.smoothed_rtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.2)


# -- loss detection -------------------------------------------------------------------------------------
def test_loss_by_packet_threshold_then_time_threshold():
    log = Log()
    r, s = make()
    for pn in range(5):
        send(r, s, pn, pn * 0.001, log)
    assert r.bytes_in_flight == 5 * MSS
    assert r.on_ack_received(s, [(3, 4)], 0.0, 0.1) == 1
    assert log.flags(3) == [True]
    assert log.flags(0) == [False]  # 3 >= 0 + kPacketThreshold
    assert log.flags(1) == [] and log.flags(2) == []  # neither threshold yet
    assert r.packets_lost == 1 and r.bytes_lost == MSS
    assert r.bytes_in_flight == 3 * MSS
    loss_delay = 9 / 8 * max(r.rtt.latest_rtt, r.rtt.smoothed_rtt)
    assert s.loss_time == pytest.approx(0.001 + loss_delay)
    assert r.get_loss_detection_time() == s.loss_time

    assert r.on_loss_detection_timeout(s.loss_time - 0.001) is None  # early call: nothing
    assert log.flags(1) == []
    assert r.on_loss_detection_timeout(s.loss_time) is None
    assert log.flags(1) == [False]
    assert log.flags(2) == []  # sent 1 ms later: its own deadline
    assert r.on_loss_detection_timeout(r.get_loss_detection_time()) is None
    assert log.flags(2) == [False]
    assert log.flags(4) == []  # above the largest acknowledged: never lost by threshold
    assert r.bytes_in_flight == MSS and s.loss_time is None
    assert r.pto_count == 0


def test_loss_by_time_threshold_on_ack():
    log = Log()
    r, s = make()
    send(r, s, 0, 0.0, log)
    send(r, s, 1, 0.5, log)
    r.on_ack_received(s, [(1, 2)], 0.0, 0.6)  # sample 0.1: loss delay 0.1125; pn 0 is 0.6 s old
    assert log.calls == {1: [True], 0: [False]}
    assert s.loss_time is None
    assert r.cc.congestion_events == 1


def test_time_threshold_has_granularity_floor():
    r, s = make()
    send(r, s, 0, 0.0)
    r.on_ack_received(s, [(0, 1)], 0.0, 0.0001)  # 100 us RTT
    send(r, s, 1, 1.0)
    send(r, s, 2, 1.0)
    r.on_ack_received(s, [(2, 3)], 0.0, 1.0001)
    assert s.loss_time == pytest.approx(1.0 + GRANULARITY)


def test_one_reduction_per_recovery_period():
    r, s = make()
    for pn in range(20):
        send(r, s, pn, pn * 0.001)
    before = r.cc.congestion_window
    r.on_ack_received(s, [(0, 5), (6, 10)], 0.0, 0.1)  # pn 5 lost
    after_first = r.cc.congestion_window
    assert after_first < before + 9 * MSS and r.cc.congestion_events == 1
    r.on_ack_received(s, [(0, 5), (6, 10), (11, 15)], 0.0, 0.11)  # pn 10 lost, sent before recovery
    assert r.cc.congestion_events == 1 and r.packets_lost == 2
    # a packet sent after the recovery started is lost: second reduction
    for pn in range(20, 30):
        send(r, s, pn, 0.12 + pn * 0.001)
    r.on_ack_received(s, [(0, 5), (6, 10), (11, 20), (21, 30)], 0.0, 0.3)
    assert r.cc.congestion_events == 2


# -- handlers, spurious and bogus ACKs ------------------------------------------------------------------
def test_handlers_called_once_with_the_right_flag():
    calls = []
    r, s = make()
    p = SentPacket(0, 0.0, MSS, True, True, ((lambda ok, a, b: calls.append((ok, a, b)), (1, 2)),))
    r.on_packet_sent(s, p)
    r.on_packet_sent(
        s, SentPacket(1, 0.0, MSS, True, True, [(lambda ok: calls.append(ok), ()), (lambda ok: calls.append(-1), ())])
    )
    r.on_ack_received(s, [(0, 2)], 0.0, 0.1)
    r.on_ack_received(s, [(0, 2)], 0.0, 0.2)
    assert calls == [(True, 1, 2), True, -1]


def test_spurious_and_bogus_acks_are_ignored():
    log = Log()
    r, s = make()
    assert r.on_ack_received(s, [(0, 3)], 0.0, 0.05) == 0  # nothing sent yet
    assert s.largest_acked == -1
    for pn in range(3):
        send(r, s, pn, 0.0, log)
    assert r.on_ack_received(s, [(0, 1)], 0.0, 0.1) == 1
    assert r.on_ack_received(s, [(0, 1)], 0.0, 0.2) == 0  # duplicate
    assert r.on_ack_received(s, [], 0.0, 0.2) == 0
    # acknowledges never-sent packet numbers: clamped to what was sent, nothing declared lost because of it
    assert r.on_ack_received(s, [(50, 1000)], 0.0, 0.3) == 0
    assert s.largest_acked == 2 == s.largest_sent
    assert log.calls == {0: [True]}
    assert r.bytes_in_flight == 2 * MSS
    assert r.on_ack_received(s, [(1, 1000)], 0.0, 0.3) == 2
    assert log.calls == {0: [True], 1: [True], 2: [True]}
    assert r.bytes_in_flight == 0 and s.ack_eliciting_in_flight == 0


def test_wide_ranges_over_sparse_packets():
    log = Log()
    r, s = make()
    for pn in range(0, 3000, 100):  # packet numbers with big holes (skipped by the sender)
        send(r, s, pn, pn * 1e-5, log)
    assert r.on_ack_received(s, [(0, 1000), (1050, 2850)], 0.0, 0.5) == 28
    assert list(s.sent) == [2900]
    assert all(log.flags(pn) == [True] for pn in range(0, 2900, 100) if pn != 1000)
    assert log.flags(1000) == [False]


# -- PTO ------------------------------------------------------------------------------------------------
def test_pto_timer_value_and_backoff():
    r, s = make()  # application space, handshake confirmed
    send(r, s, 0, 1.0)
    d = 0.333 + 4 * 0.1665 + 0.025
    assert r.pto_duration() == pytest.approx(d)
    assert r.pto_duration(False) == pytest.approx(d - 0.025)
    assert r.get_loss_detection_time() == pytest.approx(1.0 + d)

    assert r.on_loss_detection_timeout(1.5) is None and r.pto_count == 0  # too early
    t1 = r.get_loss_detection_time()
    assert r.on_loss_detection_timeout(t1) is s
    assert r.pto_count == 1
    assert r.get_loss_detection_time() == pytest.approx(1.0 + 2 * d)  # no new packet: same anchor, doubled
    send(r, s, 1, t1)  # the probe
    assert r.get_loss_detection_time() == pytest.approx(t1 + 2 * d)
    t2 = r.get_loss_detection_time()
    assert r.on_loss_detection_timeout(t2) is s and r.pto_count == 2
    send(r, s, 2, t2)
    assert r.get_loss_detection_time() == pytest.approx(t2 + 4 * d)
    # PTO does not declare anything lost and does not touch the window
    assert r.bytes_in_flight == 3 * MSS and r.packets_lost == 0 and r.cc.congestion_events == 0

    r.on_ack_received(s, [(2, 3)], 0.0, t2 + 0.1)
    assert r.pto_count == 0


def test_pto_spaces():
    r = Recovery()
    init, hs, app = SentSpace("initial"), SentSpace("handshake"), SentSpace("application")
    r.spaces += [init, hs, app]
    assert r.get_loss_detection_time() is None  # server, nothing in flight
    r.on_packet_sent(app, SentPacket(0, 0.0, MSS, True, True))
    assert r.get_loss_detection_time() is None  # Application Data: not before the handshake is confirmed
    r.on_packet_sent(hs, SentPacket(0, 0.5, MSS, True, True))
    base = 0.333 + 4 * 0.1665
    assert r.get_loss_detection_time() == pytest.approx(0.5 + base)  # no max_ack_delay for Handshake
    r.on_packet_sent(init, SentPacket(0, 0.2, MSS, True, True))
    assert r.get_loss_detection_time() == pytest.approx(0.2 + base)  # earliest space
    assert r.on_loss_detection_timeout(0.2 + base) is init
    r.handshake_confirmed = True
    # app: 0.0 + 2 * (base + mad) = 2.0 ; initial: 0.2 + 2 * base = 2.196 ; handshake 2.496
    assert r.get_loss_detection_time() == pytest.approx(2 * (base + 0.025))
    assert r.on_loss_detection_timeout(10.0) is app
    r.discard_space(init)
    r.discard_space(hs)
    assert r.pto_count == 0  # discarding keys resets the backoff
    assert r.get_loss_detection_time() == pytest.approx(base + 0.025)


def test_client_anti_deadlock_pto():
    r = Recovery()
    r.is_client = True
    init = SentSpace("initial")
    r.spaces.append(init)
    r.on_packet_sent(init, SentPacket(0, 0.0, MSS, True, True))
    r.on_ack_received(init, [(0, 1)], 0.0, 0.1)  # server's Initial ACK; nothing ack-eliciting in flight
    base = r.pto_duration(False)
    assert base == pytest.approx(0.1 + 4 * 0.05)
    assert r.get_loss_detection_time() == pytest.approx(0.1 + base)  # counted from the ACK
    assert r.on_loss_detection_timeout(0.1 + base) is init
    assert r.pto_count == 1
    assert r.get_loss_detection_time() == pytest.approx(0.1 + base + 2 * base)

    hs = SentSpace("handshake")
    r.spaces.append(hs)
    t = r.get_loss_detection_time()
    assert r.on_loss_detection_timeout(t) is hs  # with Handshake keys, probe there
    assert r.pto_count == 2

    # an Initial ACK does not reset the backoff while the server may not have validated the address
    r.on_packet_sent(init, SentPacket(1, t, MSS, True, True))
    r.on_ack_received(init, [(0, 2)], 0.0, t + 0.1)
    assert r.pto_count == 2 and not r.peer_completed_address_validation
    # a Handshake ACK proves it
    r.on_packet_sent(hs, SentPacket(0, t + 0.2, MSS, True, True))
    r.on_ack_received(hs, [(0, 1)], 0.0, t + 0.3)
    assert r.peer_completed_address_validation and r.pto_count == 0
    assert r.get_loss_detection_time() is None

    # handshake confirmation counts as validation too (RFC 9002 PeerCompletedAddressValidation)
    r2 = Recovery()
    r2.is_client = True
    init2 = SentSpace("initial")
    r2.spaces.append(init2)
    r2.on_packet_sent(init2, SentPacket(0, 0.0, MSS, True, True))
    r2.on_ack_received(init2, [(0, 1)], 0.0, 0.1)
    assert r2.get_loss_detection_time() is not None
    r2.handshake_confirmed = True
    assert r2.get_loss_detection_time() is None


# -- reschedule / discard ------------------------------------------------------------------------------
def test_reschedule_hands_back_without_congestion_and_keeps_ghosts():
    log = Log()
    r, s = make()
    send(r, s, 0, 0.0, log)
    r.on_ack_received(s, [(0, 1)], 0.0, 0.1)
    cwnd = r.cc.congestion_window
    for pn in range(1, 6):
        send(r, s, pn, 0.2 + pn * 0.001, log)
    send(r, s, 6, 0.21, log, ae=False, in_flight=False)  # ACK-only: not in flight, not handed back
    assert r.reschedule(s) == 5
    assert [log.flags(pn) for pn in range(1, 7)] == [[False]] * 5 + [[]]
    assert r.bytes_in_flight == 0 and r.cc.congestion_window == cwnd and r.packets_lost == 0
    assert r.reschedule(s) == 0  # nothing twice
    # a late ACK for a handed-back packet: no handler, but an RTT sample
    assert r.on_ack_received(s, [(5, 7)], 0.0, 0.5) == 2
    assert log.flags(5) == [False] and log.flags(6) == [True]
    assert r.rtt.latest_rtt == pytest.approx(0.5 - 0.21)
    # pn 1..3 are now lost by packet threshold (largest acked 6): congestion event, no handler call, no bytes
    assert r.cc.congestion_events == 1 and r.packets_lost == 3
    assert all(log.flags(pn) == [False] for pn in (1, 2, 3, 4))
    assert list(s.sent) == [4]
    assert r.bytes_in_flight == 0
    r.discard_space(s)
    assert s.sent == {} and s.ack_eliciting_in_flight == 0 and r.bytes_in_flight == 0


def test_discard_space_clears_flight_without_handlers():
    log = Log()
    r = Recovery()
    hs, app = SentSpace("handshake"), SentSpace("application")
    r.spaces += [hs, app]
    r.handshake_confirmed = True
    for pn in range(4):
        send(r, hs, pn, pn * 0.001, log)
    send(r, app, 0, 0.05, None)
    r.on_ack_received(hs, [(3, 4)], 0.0, 0.1)
    assert hs.loss_time is not None
    r.pto_count = 3
    assert r.bytes_in_flight == 3 * MSS
    r.discard_space(hs)
    assert r.bytes_in_flight == MSS  # the app packet
    assert hs.sent == {} and hs.loss_time is None and hs.ack_eliciting_in_flight == 0
    assert hs.largest_sent == 3  # packet numbers keep going if the space is reused (0-RTT -> 1-RTT)
    assert r.pto_count == 0
    assert log.calls == {3: [True], 0: [False]}
    assert r.get_loss_detection_time() == pytest.approx(0.05 + r.pto_duration())
    # a late ACK for the discarded packets does nothing
    assert r.on_ack_received(hs, [(0, 3)], 0.0, 0.2) == 0
    assert log.calls == {3: [True], 0: [False]}


# -- congestion interplay -------------------------------------------------------------------------------
def _sample(r, s, pn, t, rtt=0.1):
    send(r, s, pn, t)
    r.on_ack_received(s, [(pn, pn + 1)], 0.0, t + rtt)


@pytest.mark.parametrize("cc", ["newreno", "cubic"])
def test_persistent_congestion_collapses_window(cc):
    r, s = make(cc)
    _sample(r, s, 0, 0.0)  # srtt 0.1, rttvar 0.05: PC duration = 3 * (0.1 + 0.2 + 0.025) = 0.975 s
    for pn in range(1, 11):
        send(r, s, pn, 0.2 * pn)
    send(r, s, 11, 2.1)
    r.on_ack_received(s, [(0, 1), (11, 12)], 0.0, 2.2)
    assert r.packets_lost == 10
    assert r.persistent_congestion_events == 1
    # collapsed to kMinimumWindow, then (RFC 9002 order: losses before OnPacketsAcked) the packet acknowledged by
    # this same ACK, sent after the recovery period was reset, grows it in slow start
    assert r.cc.congestion_window == 2 * MSS + MSS
    assert r.bytes_in_flight == 0


def test_no_persistent_congestion_when_a_packet_in_between_is_acked():
    r, s = make()
    _sample(r, s, 0, 0.0)
    for pn in range(1, 11):
        send(r, s, pn, 0.2 * pn)
    send(r, s, 11, 2.1)
    r.on_ack_received(s, [(0, 1), (5, 6), (11, 12)], 0.0, 2.2)  # pn 5 (t=1.0) acknowledged
    assert r.packets_lost == 9
    assert r.persistent_congestion_events == 0
    assert r.cc.congestion_window > 2 * MSS


def test_no_persistent_congestion_without_prior_rtt_sample():
    r, s = make()
    for pn in range(0, 11):
        send(r, s, pn, 0.2 * pn)
    send(r, s, 11, 2.1)
    r.on_ack_received(s, [(11, 12)], 0.0, 2.2)  # the first sample arrives with the losses
    assert r.packets_lost == 11
    assert r.persistent_congestion_events == 0
    assert r.cc.congestion_window > 2 * MSS


def test_no_persistent_congestion_within_the_duration():
    r, s = make()
    _sample(r, s, 0, 0.0)
    for pn in range(1, 6):
        send(r, s, pn, 0.3 + 0.15 * pn)  # span 0.6 s < 0.975 s
    send(r, s, 6, 1.5)
    r.on_ack_received(s, [(0, 1), (6, 7)], 0.0, 1.6)
    assert r.packets_lost == 5 and r.persistent_congestion_events == 0


def test_lost_mtu_probe_is_not_congestion():
    log = Log()
    r, s = make()
    _sample(r, s, 0, 0.0)
    cwnd = r.cc.congestion_window
    send(r, s, 1, 0.2, log, size=1500, mtu_probe=True)
    for pn in range(2, 6):
        send(r, s, pn, 0.2, log)
    assert r.bytes_in_flight == 1500 + 4 * MSS
    r.on_ack_received(s, [(0, 1), (2, 6)], 0.0, 0.3)
    assert log.flags(1) == [False]
    assert r.cc.congestion_events == 0
    assert r.cc.congestion_window >= cwnd
    assert r.bytes_in_flight == 0
    assert r.mtu_probes_lost == 1 and r.packets_lost == 0


def test_app_limited_sender_does_not_grow_window():
    r, s = make()
    for i in range(20):  # one packet at a time
        _sample(r, s, i, i * 1.0, rtt=0.05)
    assert r.cc.congestion_window == 12000
    for pn in range(20, 30):  # a full window
        send(r, s, pn, 30.0)
    r.on_ack_received(s, [(0, 30)], 0.0, 30.05)
    assert r.cc.congestion_window == 24000  # slow start: + acked bytes


def test_window_available_pacer_and_max_datagram_size():
    r, s = make("newreno")
    assert r.congestion_window_available() == 12000
    send(r, s, 0, 0.0)
    assert r.congestion_window_available() == 12000 - MSS
    assert r.pacer.next_send_time(0.0) is None  # no RTT sample: unpaced
    for pn in range(1, 10):
        send(r, s, pn, 0.0)
    assert r.pacer.rate == float("inf")
    r.on_ack_received(s, [(0, 10)], 0.0, 0.1)
    assert r.pacer.rate == pytest.approx(1.25 * r.cc.congestion_window / r.rtt.smoothed_rtt)
    # on_packet_sent leaves the pacer alone (the connection charges it for the packets it paces)
    for pn in range(10, 100):
        send(r, s, pn, 0.2)
    assert r.pacer.next_send_time(0.2) is None
    r.cc.on_persistent_congestion(0.1)
    r.update_max_datagram_size(1400)
    assert r.cc.minimum_window == 2800 and r.cc.congestion_window == 2800
    assert r.pacer.max_datagram_size == 1400
    assert r.pacer.rate == pytest.approx(1.25 * 2800 / r.rtt.smoothed_rtt)


def test_congestion_control_choice():
    from mqvpn.quic.congestion import Cubic, NewReno

    assert isinstance(Recovery().cc, Cubic)
    assert isinstance(Recovery(congestion_control="newreno").cc, NewReno)
    cc = NewReno(1400)
    assert Recovery(congestion_control=cc).cc is cc
    with pytest.raises(ValueError):
        Recovery(congestion_control="nope")


# -- property: random send / ack / timeout sequences ---------------------------------------------------
_burst = st.tuples(st.just("burst"), st.integers(0, 1), st.integers(1, 12), st.floats(0.0, 0.3))
_ack = st.tuples(
    st.just("ack"),
    st.integers(0, 1),
    # (position as a fraction of the packets sent so far, length); a little beyond what was sent, too
    st.lists(st.tuples(st.floats(0.0, 1.1), st.integers(1, 6)), min_size=1, max_size=4),
    st.floats(0.0, 0.05),
)
op = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 1), st.sampled_from(["ae", "ack_only", "mtu"]), st.integers(50, 1500)),
    _burst,
    _burst,
    _ack,
    _ack,
    _ack,
    st.tuples(st.just("advance"), st.floats(0.0, 1.5)),
    st.tuples(st.just("timeout"), st.booleans()),
    st.tuples(st.just("reschedule"), st.integers(0, 1)),
    st.tuples(st.just("discard_handshake"),),
    st.tuples(st.just("confirm"),),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, min_size=10, max_size=120), st.sampled_from(["newreno", "cubic"]), st.booleans())
def test_random_sequences_keep_invariants(ops, cc, is_client):
    r = Recovery(congestion_control=cc)
    r.is_client = is_client
    spaces = [SentSpace("handshake"), SentSpace("application")]
    r.spaces += spaces
    discarded = [False, False]
    calls: dict[tuple[int, int], list[bool]] = {}
    next_pn = [0, 0]
    now = 0.0
    pto_fired = False

    def handler(acked, key):
        calls.setdefault(key, []).append(acked)
        assert len(calls[key]) == 1, f"handler called twice for {key}"
        assert not discarded[key[0]], "handler called for a packet of a discarded space"

    def do_send(i, kind, size):
        nonlocal now
        pn = next_pn[i]
        next_pn[i] += 1
        ae = kind != "ack_only"
        p = SentPacket(pn, now, size if ae else 40, ae, ae, ((handler, ((i, pn),)),))
        p.is_mtu_probe = kind == "mtu"
        r.on_packet_sent(spaces[i], p)

    def check():
        assert r.bytes_in_flight >= 0
        total = 0
        for i, s in enumerate(spaces):
            assert s.ack_eliciting_in_flight == sum(1 for p in s.sent.values() if p.ack_eliciting)
            total += sum(p.sent_bytes for p in s.sent.values() if p.in_flight)
            assert list(s.sent) == sorted(s.sent)
            for pn in s.sent:
                assert s.sent[pn].handlers == () or (i, pn) not in calls
        assert r.bytes_in_flight == total
        assert r.cc.congestion_window >= r.cc.minimum_window
        assert r.pto_count >= 0

    for o in ops:
        kind = o[0]
        if kind == "send":
            if not discarded[o[1]]:
                do_send(o[1], o[2], o[3])
        elif kind == "burst":
            if not discarded[o[1]]:
                for _ in range(o[2]):
                    do_send(o[1], "ae", 1200)
                    now += o[3] / o[2]
        elif kind == "ack":
            i = o[1]
            if discarded[i]:
                continue
            rs = RangeSet()
            for frac, n in o[2]:
                start = int(frac * next_pn[i])
                rs.add(start, start + n)
            now += 0.001
            before = set(spaces[i].sent)
            n = r.on_ack_received(spaces[i], list(rs), o[3], now)
            newly = {pn for pn in before if pn in rs and pn <= spaces[i].largest_sent}
            assert n == len(newly)
        elif kind == "advance":
            now += o[1]
        elif kind == "timeout":
            t = r.get_loss_detection_time()
            if t is not None:
                assert t > now - 1e9
                if t > now:
                    now = t
                space = r.on_loss_detection_timeout(now)
                if space is not None:
                    pto_fired = True
                    i = spaces.index(space)
                    assert not discarded[i]
                    if o[1]:
                        r.reschedule(space)
                    do_send(i, "ae", 1200)
        elif kind == "reschedule":
            if not discarded[o[1]]:
                r.reschedule(spaces[o[1]])
        elif kind == "discard_handshake":
            if not discarded[0]:
                r.discard_space(spaces[0])
                r.spaces.remove(spaces[0])
                discarded[0] = True
        elif kind == "confirm":
            r.handshake_confirmed = True
            r.peer_completed_address_validation = True
        check()

    event(f"losses: {'yes' if r.packets_lost else 'no'}")
    event(f"congestion events: {min(r.cc.congestion_events, 2)}")
    event(f"persistent congestion: {'yes' if r.persistent_congestion_events else 'no'}")
    event(f"pto fired: {'yes' if pto_fired else 'no'}")

    # acknowledge everything still tracked: every packet of a live space ends with exactly one call
    now += 0.01
    for i, s in enumerate(spaces):
        if not discarded[i] and next_pn[i]:
            r.on_ack_received(s, [(0, next_pn[i])], 0.0, now)
    check()
    for i in range(2):
        for pn in range(next_pn[i]):
            got = calls.get((i, pn), [])
            if discarded[i]:
                assert len(got) <= 1
            else:
                assert len(got) == 1, (i, pn)
    assert r.bytes_in_flight == sum(
        p.sent_bytes for i, s in enumerate(spaces) if discarded[i] for p in s.sent.values()
    ) == 0
    assert all(s.ack_eliciting_in_flight == 0 for i, s in enumerate(spaces) if not discarded[i])
