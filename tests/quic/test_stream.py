import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mqvpn.quic.errors import QuicErrorCode, QuicProtocolError
from mqvpn.quic.stream import (
    QuicStream,
    StreamClosedError,
    StreamReceiver,
    StreamSender,
    stream_is_client_initiated,
    stream_is_unidirectional,
)

BIG = 1 << 62


def pull_all(receiver: StreamReceiver) -> tuple[bytes, bool]:
    out = bytearray()
    fin = False
    while (r := receiver.pull_data()) is not None:
        data, f = r
        assert not fin, "data after FIN"
        out += data
        fin = fin or f
    return bytes(out), fin


def error_code(excinfo) -> int:
    return excinfo.value.error_code


# ------------------------------------------------------------------------------------------------------------------
# stream ids / QuicStream
# ------------------------------------------------------------------------------------------------------------------


def test_stream_id_bits():
    assert stream_is_client_initiated(0) and not stream_is_unidirectional(0)
    assert not stream_is_client_initiated(1) and not stream_is_unidirectional(1)
    assert stream_is_client_initiated(2) and stream_is_unidirectional(2)
    assert not stream_is_client_initiated(3) and stream_is_unidirectional(3)
    assert stream_is_client_initiated(4) and not stream_is_unidirectional(4)


def test_quic_stream_halves():
    bidi = QuicStream(0, is_local=True, max_stream_data_local=100, max_stream_data_remote=200)
    assert bidi.sender is not None and bidi.receiver is not None
    assert bidi.sender.max_stream_data == 200 and bidi.receiver.max_stream_data == 100
    local_uni = QuicStream(2, is_local=True, max_stream_data_local=100, max_stream_data_remote=200)
    assert local_uni.sender is not None and local_uni.receiver is None
    remote_uni = QuicStream(3, is_local=False, max_stream_data_local=100, max_stream_data_remote=200)
    assert remote_uni.sender is None and remote_uni.receiver is not None
    assert remote_uni.stream_id == 3


def test_quic_stream_finished_when_both_halves_done():
    s = QuicStream(0, is_local=True, max_stream_data_local=100, max_stream_data_remote=100)
    s.sender.write(b"hi", end_stream=True)
    off, data, fin = s.sender.next_frame(100, BIG)
    assert (off, data, fin) == (0, b"hi", True)
    s.sender.on_data_delivered(True, off, len(data), fin)
    assert s.sender.is_finished and not s.is_finished
    s.receiver.handle_frame(0, b"yo", True)
    assert not s.is_finished
    assert s.receiver.pull_data() == (b"yo", True)
    assert s.is_finished


def test_uni_stream_finished():
    s = QuicStream(3, is_local=False, max_stream_data_local=100, max_stream_data_remote=0)
    s.receiver.handle_reset(0, 7)
    assert s.is_finished
    s = QuicStream(2, is_local=True, max_stream_data_local=0, max_stream_data_remote=100)
    s.sender.write(b"", end_stream=True)
    assert s.sender.next_frame(100, 0) == (0, b"", True)
    assert not s.is_finished
    s.sender.on_data_delivered(True, 0, 0, True)
    assert s.is_finished


# ------------------------------------------------------------------------------------------------------------------
# receiver: reassembly
# ------------------------------------------------------------------------------------------------------------------


def test_in_order():
    r = StreamReceiver(0, 1000)
    assert r.pull_data() is None
    assert r.handle_frame(0, b"hello ", False) == 6
    assert r.handle_frame(6, b"world", False) == 5
    assert r.pull_data() == (b"hello world", False)
    assert r.pull_data() is None
    assert r.handle_frame(11, b"!", True) == 1
    assert r.pull_data() == (b"!", True)
    assert r.pull_data() is None
    assert r.is_finished and r.final_size == 12 and r.highest_offset == 12


def test_out_of_order_with_gap_and_overlaps():
    r = StreamReceiver(0, 1000)
    assert r.handle_frame(6, b"world", False) == 11
    assert r.pull_data() is None
    assert r.buffered == 11
    assert r.handle_frame(3, b"lo wo", False) == 0  # overlaps the gap and the received range
    assert r.pull_data() is None
    assert r.handle_frame(0, b"hel", False) == 0
    assert r.pull_data() == (b"hello world", False)
    assert r.buffered == 0
    # duplicates below the read offset are ignored, partly-new data is trimmed
    assert r.handle_frame(0, b"hello", False) == 0
    assert r.pull_data() is None
    assert r.handle_frame(8, b"rld!!", False) == 2
    assert r.pull_data() == (b"!!", False)


def test_fin_then_bare_fin_and_fin_delivered_once():
    r = StreamReceiver(0, 100)
    r.handle_frame(0, b"abc", False)
    assert r.pull_data() == (b"abc", False)
    assert r.handle_frame(3, b"", True) == 0
    assert r.final_size == 3
    assert r.pull_data() == (b"", True)
    assert r.pull_data() is None
    assert r.is_finished
    # a retransmitted FIN / data is harmless
    assert r.handle_frame(0, b"abc", True) == 0
    assert r.pull_data() is None


def test_fin_arrives_before_data():
    r = StreamReceiver(0, 100)
    assert r.handle_frame(5, b"", True) == 5
    assert r.pull_data() is None
    r.handle_frame(0, b"12345", False)
    assert r.pull_data() == (b"12345", True)
    assert r.pull_data() is None


def test_empty_stream_fin():
    r = StreamReceiver(0, 0)
    assert r.handle_frame(0, b"", True) == 0
    assert r.pull_data() == (b"", True)
    assert r.is_finished


@settings(max_examples=300, deadline=None)
@given(data=st.data(), payload=st.binary(min_size=0, max_size=3000))
def test_random_fragmentation_shuffle_duplicates(data, payload):
    n = len(payload)
    # random cut points → fragments
    cuts = sorted(set(data.draw(st.lists(st.integers(0, n), max_size=30))) | {0, n})
    frags = [(cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)] or [(0, 0)]
    # random extra overlapping fragments
    for _ in range(data.draw(st.integers(0, 10))):
        a = data.draw(st.integers(0, n))
        b = data.draw(st.integers(a, n))
        frags.append((a, b))
    frags = frags + data.draw(st.lists(st.sampled_from(frags), max_size=10))  # duplicates
    order = data.draw(st.permutations(frags))
    pull_between = data.draw(st.booleans())

    r = StreamReceiver(0, n)
    out = bytearray()
    fin_seen = False
    growth = 0
    for a, b in order:
        growth += r.handle_frame(a, payload[a:b], b == n)
        if pull_between:
            while (res := r.pull_data()) is not None:
                assert not fin_seen
                out += res[0]
                fin_seen = res[1]
    more, fin = pull_all(r)
    out += more
    assert bytes(out) == payload
    assert fin_seen or fin
    assert growth == n == r.highest_offset
    assert r.is_finished and r.pull_data() is None


# ------------------------------------------------------------------------------------------------------------------
# receiver: flow control and final size
# ------------------------------------------------------------------------------------------------------------------


def test_flow_control_violation():
    r = StreamReceiver(0, 10)
    r.handle_frame(0, b"x" * 10, False)  # exactly the limit is fine
    with pytest.raises(QuicProtocolError) as e:
        r.handle_frame(10, b"x", False)
    assert error_code(e) == QuicErrorCode.FLOW_CONTROL_ERROR
    r2 = StreamReceiver(0, 10)
    with pytest.raises(QuicProtocolError) as e:
        r2.handle_frame(5, b"x" * 6, False)
    assert error_code(e) == QuicErrorCode.FLOW_CONTROL_ERROR
    with pytest.raises(QuicProtocolError) as e:
        r2.handle_reset(11, 0)
    assert error_code(e) == QuicErrorCode.FLOW_CONTROL_ERROR


def test_final_size_errors():
    # data beyond the final size
    r = StreamReceiver(0, 100)
    r.handle_frame(0, b"abc", True)
    with pytest.raises(QuicProtocolError) as e:
        r.handle_frame(3, b"d", False)
    assert error_code(e) == QuicErrorCode.FINAL_SIZE_ERROR
    # FIN changing the final size (smaller and larger)
    for off, data in ((0, b"ab"), (0, b"abcd"), (3, b"x")):
        r = StreamReceiver(0, 100)
        r.handle_frame(0, b"abc", True)
        with pytest.raises(QuicProtocolError) as e:
            r.handle_frame(off, data, True)
        assert error_code(e) == QuicErrorCode.FINAL_SIZE_ERROR
    # FIN below data already received
    r = StreamReceiver(0, 100)
    r.handle_frame(10, b"abc", False)
    with pytest.raises(QuicProtocolError) as e:
        r.handle_frame(0, b"abc", True)
    assert error_code(e) == QuicErrorCode.FINAL_SIZE_ERROR
    # same final size repeated: fine
    r = StreamReceiver(0, 100)
    r.handle_frame(0, b"abc", True)
    r.handle_frame(1, b"bc", True)


def test_reset_final_size_rules():
    r = StreamReceiver(0, 100)
    r.handle_frame(0, b"abcdef", False)
    with pytest.raises(QuicProtocolError) as e:
        r.handle_reset(5, 1)  # below data received
    assert error_code(e) == QuicErrorCode.FINAL_SIZE_ERROR

    r = StreamReceiver(0, 100)
    r.handle_frame(0, b"abc", True)
    with pytest.raises(QuicProtocolError) as e:
        r.handle_reset(4, 1)  # differs from the known final size
    assert error_code(e) == QuicErrorCode.FINAL_SIZE_ERROR

    r = StreamReceiver(0, 100)
    r.handle_frame(0, b"abcdef", False)
    assert r.handle_reset(20, 9) == 14
    assert r.is_finished and r.is_reset and r.reset_error_code == 9 and r.final_size == 20
    assert r.pull_data() is None and r.buffered == 0
    assert r.handle_reset(20, 9) == 0  # repeated: fine
    assert r.handle_frame(6, b"gh", False) == 0  # late data: validated, ignored
    assert r.pull_data() is None
    with pytest.raises(QuicProtocolError) as e:
        r.handle_frame(19, b"xy", False)
    assert error_code(e) == QuicErrorCode.FINAL_SIZE_ERROR
    assert r.max_stream_data_frame() is None


def test_reset_discards_pending_data_and_stops_stop_sending():
    r = StreamReceiver(0, 100)
    r.handle_frame(0, b"abc", False)
    r.stop(5)
    r.handle_reset(3, 5)
    assert r.stop_sending_frame() is None
    assert r.pull_data() is None and r.is_finished


def test_max_stream_data_announcement():
    r = StreamReceiver(0, 100)
    assert r.max_stream_data_frame() is None
    r.handle_frame(0, b"x" * 100, False)
    assert r.max_stream_data_frame() is None  # received, not consumed
    r.handle_frame(0, b"x" * 50, False)
    # consume 50: exactly half → not yet
    data, fin = r.pull_data()
    assert len(data) == 100
    # read offset 100 → new limit 200, consumed > half
    assert r.max_stream_data_frame() == 200
    assert r.max_stream_data == 200
    assert r.max_stream_data_frame() is None  # once
    # now data up to 200 is allowed
    r.handle_frame(100, b"y" * 100, False)
    with pytest.raises(QuicProtocolError):
        r.handle_frame(200, b"z", False)


def test_max_stream_data_half_window_threshold():
    r = StreamReceiver(0, 100)
    r.handle_frame(0, b"x" * 50, False)
    r.pull_data()
    assert r.max_stream_data_frame() is None  # consumed exactly half
    r.handle_frame(50, b"x", False)
    r.pull_data()
    assert r.max_stream_data_frame() == 151


def test_max_stream_data_loss_and_fin():
    r = StreamReceiver(0, 10)
    r.handle_frame(0, b"x" * 10, False)
    r.pull_data()
    assert r.max_stream_data_frame() == 20
    r.on_max_stream_data_delivered(False, 20)
    assert r.max_stream_data_frame() == 20  # repeated after loss
    assert r.max_stream_data_frame() is None
    r.on_max_stream_data_delivered(True, 20)
    r.handle_frame(10, b"y" * 10, False)
    r.pull_data()
    assert r.max_stream_data_frame() == 30
    r.on_max_stream_data_delivered(False, 20)  # an old value lost: superseded
    assert r.max_stream_data_frame() is None
    r.handle_frame(20, b"z" * 10, True)
    r.pull_data()
    assert r.max_stream_data_frame() is None  # final size known: no more credit needed
    r.on_max_stream_data_delivered(False, 30)
    assert r.max_stream_data_frame() is None


def test_stop_sending():
    r = StreamReceiver(0, 100)
    r.handle_frame(0, b"abc", False)
    r.stop(0x10C)
    r.stop(0x999)  # once
    assert r.stop_sending_frame() == 0x10C
    assert r.stop_sending_frame() is None
    r.on_stop_sending_delivered(False)
    assert r.stop_sending_frame() == 0x10C  # re-queued after loss
    r.on_stop_sending_delivered(True)
    assert r.stop_sending_frame() is None
    assert r.pull_data() is None  # data discarded
    assert r.max_stream_data_frame() is None
    assert not r.is_finished
    # the peer may still complete the stream with FIN instead of resetting
    r.handle_frame(3, b"defg", True)
    assert r.is_finished and r.pull_data() is None
    r.on_stop_sending_delivered(False)
    assert r.stop_sending_frame() is None


def test_stop_then_reset():
    r = StreamReceiver(0, 100)
    r.stop(1)
    assert r.stop_sending_frame() == 1
    assert r.handle_reset(42, 1) == 42
    r.on_stop_sending_delivered(False)
    assert r.stop_sending_frame() is None
    assert r.is_finished


# ------------------------------------------------------------------------------------------------------------------
# sender
# ------------------------------------------------------------------------------------------------------------------


def test_sender_limits():
    s = StreamSender(0, 10)
    assert s.next_frame(100, BIG) is None and not s.has_data_to_send
    s.write(b"0123456789abcdef")
    assert s.has_data_to_send and s.buffered == 16
    assert s.next_frame(4, BIG) == (0, b"0123", False)  # max_data_len
    assert s.new_bytes_sent_by_last_frame == 4
    assert s.next_frame(100, 3) == (4, b"456", False)  # connection credit
    assert s.new_bytes_sent_by_last_frame == 3
    assert s.next_frame(100, 0) is None  # no connection credit
    assert s.next_frame(100, BIG) == (7, b"789", False)  # stream limit
    assert s.next_frame(100, BIG) is None
    assert not s.has_data_to_send
    assert s.highest_offset == 10
    s.update_max_stream_data(5)  # decrease ignored
    assert s.max_stream_data == 10
    s.update_max_stream_data(14)
    assert s.has_data_to_send
    s.write(b"", end_stream=True)
    assert s.next_frame(100, BIG) == (10, b"abcd", False)  # FIN not yet: data 14..16 remains
    s.update_max_stream_data(100)
    assert s.next_frame(100, BIG) == (14, b"ef", True)
    assert s.next_frame(100, BIG) is None and not s.has_data_to_send


def test_sender_blocked_frame_once_per_limit():
    s = StreamSender(0, 4)
    assert s.blocked_frame() is None
    s.write(b"abcdefgh")
    assert s.blocked_frame() is None  # not yet blocked
    s.next_frame(100, BIG)
    assert s.blocked_frame() == 4
    assert s.blocked_frame() is None
    s.on_blocked_delivered(False, 4)
    assert s.blocked_frame() == 4  # lost while still blocked at 4: repeated
    assert s.blocked_frame() is None
    s.update_max_stream_data(6)
    assert s.blocked_frame() is None  # can send again
    s.next_frame(100, BIG)
    assert s.blocked_frame() == 6
    assert s.blocked_frame() is None
    s.update_max_stream_data(8)
    s.next_frame(100, BIG)
    assert s.blocked_frame() is None  # nothing left to send: not blocked


def test_bare_fin_and_fin_after_data():
    s = StreamSender(0, 100)
    s.write(b"abc")
    assert s.next_frame(100, BIG) == (0, b"abc", False)
    s.write(b"", end_stream=True)
    assert s.has_data_to_send
    assert s.next_frame(100, 0) == (3, b"", True)  # bare FIN needs no credit
    assert s.new_bytes_sent_by_last_frame == 0
    assert s.next_frame(100, BIG) is None
    with pytest.raises(StreamClosedError):
        s.write(b"more")
    with pytest.raises(ValueError):
        s.write(b"", end_stream=True)
    s.on_data_delivered(True, 0, 3, False)
    assert not s.is_finished
    s.on_data_delivered(False, 3, 0, True)
    assert s.next_frame(100, BIG) == (3, b"", True)  # lost bare FIN resent
    s.on_data_delivered(True, 3, 0, True)
    assert s.is_finished and s.buffered == 0


def test_loss_retransmits_exact_range_first_without_credit():
    s = StreamSender(0, 1000)
    s.write(bytes(range(100)))
    frames = [s.next_frame(10, BIG) for _ in range(5)]  # 0..50
    assert [f[0] for f in frames] == [0, 10, 20, 30, 40]
    s.on_data_delivered(False, 10, 10, False)
    s.on_data_delivered(True, 0, 10, False)
    assert s.buffered == 90
    assert s.next_frame(4, 0) == (10, bytes(range(10, 14)), False)  # retransmission: no credit consumed
    assert s.new_bytes_sent_by_last_frame == 0
    assert s.next_frame(100, 0) == (14, bytes(range(14, 20)), False)
    assert s.next_frame(100, 0) is None
    assert s.next_frame(5, BIG) == (50, bytes(range(50, 55)), False)
    assert s.new_bytes_sent_by_last_frame == 5


def test_acked_ranges_never_resent():
    s = StreamSender(0, 1000)
    s.write(bytes(range(60)))
    for _ in range(6):
        s.next_frame(10, BIG)
    s.on_data_delivered(True, 20, 10, False)  # out of order ACK
    s.on_data_delivered(True, 40, 10, False)
    # a retransmission covering [0, 60) is declared lost (e.g. a coalesced resend)
    s.on_data_delivered(False, 0, 60, False)
    got = []
    while (f := s.next_frame(100, 0)) is not None:
        got.append((f[0], len(f[1])))
    assert got == [(0, 20), (30, 10), (50, 10)]
    # spurious loss: a range that is acked after being declared lost is not resent
    s.on_data_delivered(False, 0, 20, False)
    s.on_data_delivered(True, 0, 20, False)
    assert s.next_frame(100, 0) is None
    for off in (30, 50):
        s.on_data_delivered(True, off, 10, False)
    assert s.buffered == 0


def test_fin_lost_with_data_resent_with_last_range():
    s = StreamSender(0, 1000)
    s.write(b"abcdefghij", end_stream=True)
    assert s.next_frame(6, BIG) == (0, b"abcdef", False)
    assert s.next_frame(6, BIG) == (6, b"ghij", True)
    s.on_data_delivered(False, 6, 4, True)
    s.on_data_delivered(False, 0, 6, False)
    assert s.next_frame(7, 0) == (0, b"abcdefg", False)  # lost ranges merged, resent in order
    assert s.next_frame(7, 0) == (7, b"hij", True)  # the FIN rides with the range reaching the final size
    assert s.next_frame(100, 0) is None
    s.on_data_delivered(True, 7, 3, True)
    s.on_data_delivered(True, 6, 4, True)
    assert not s.is_finished
    s.on_data_delivered(True, 0, 6, False)
    assert s.is_finished


def test_fin_lost_but_data_acked_elsewhere_bare_fin():
    s = StreamSender(0, 1000)
    s.write(b"abc", end_stream=True)
    assert s.next_frame(100, BIG) == (0, b"abc", True)
    s.on_data_delivered(False, 0, 3, True)
    assert s.next_frame(2, 0) == (0, b"ab", False)
    s.on_data_delivered(True, 0, 3, False)  # a copy of the data got through but the FIN frame didn't
    assert s.next_frame(2, 0) == (3, b"", True)


def test_sender_reset():
    s = StreamSender(0, 1000)
    s.write(b"x" * 100)
    s.next_frame(30, BIG)
    s.reset(0x10B)
    assert s.is_reset and not s.is_finished
    assert not s.has_data_to_send and s.next_frame(100, BIG) is None and s.buffered == 0
    assert s.reset_frame() == (0x10B, 30)
    assert s.reset_frame() is None
    s.on_data_delivered(False, 0, 30, False)  # loss after reset: nothing resent
    assert s.next_frame(100, BIG) is None
    s.on_reset_delivered(False)
    assert s.reset_frame() == (0x10B, 30)
    s.reset(1)  # once
    s.on_reset_delivered(True)
    assert s.reset_frame() is None and s.is_finished
    s.on_reset_delivered(False)
    assert s.reset_frame() is None
    with pytest.raises(StreamClosedError):
        s.write(b"x")


def test_stop_sending_from_peer_resets_with_same_code():
    s = StreamSender(0, 1000)
    s.write(b"x" * 10)
    s.handle_stop_sending(77)
    assert s.reset_frame() == (77, 0)


def test_reset_after_everything_acked_is_ignored():
    s = StreamSender(0, 1000)
    s.write(b"abc", end_stream=True)
    f = s.next_frame(100, BIG)
    s.on_data_delivered(True, f[0], len(f[1]), f[2])
    assert s.is_finished
    s.reset(1)
    assert s.reset_frame() is None and s.is_finished


# ------------------------------------------------------------------------------------------------------------------
# sender → lossy reordering channel → receiver
# ------------------------------------------------------------------------------------------------------------------


def transfer(payload, seed, loss, dup, window, frame_len, credit_step, conn_window=None, write_chunks=1):
    """Drive a sender and receiver over a lossy reordering duplicating channel; return the delivered bytes."""
    rng = random.Random(seed)
    sender = StreamSender(0, window)
    receiver = StreamReceiver(0, window)
    step = max(1, len(payload) // write_chunks)
    pieces = [payload[i : i + step] for i in range(0, len(payload), step)]
    for i, p in enumerate(pieces):
        sender.write(p, end_stream=(i == len(pieces) - 1))
    if not pieces:
        sender.write(b"", end_stream=True)
    conn_sent = 0
    conn_limit = conn_window if conn_window is not None else 1 << 62
    conn_received = 0
    in_flight: list[tuple] = []  # STREAM frames "on the wire"
    ctl: list[int] = []  # MAX_STREAM_DATA frames on the wire
    out = bytearray()
    fin_seen = False
    for _ in range(200000):
        # send some frames
        for _ in range(rng.randint(0, credit_step)):
            f = sender.next_frame(rng.randint(1, frame_len), conn_limit - conn_sent)
            if f is None:
                break
            conn_sent += sender.new_bytes_sent_by_last_frame
            in_flight.append(f)
            if rng.random() < dup:
                in_flight.append(f)
        # deliver / lose a random frame
        rng.shuffle(in_flight)
        for _ in range(rng.randint(0, 4)):
            if not in_flight:
                break
            off, data, fin = in_flight.pop()
            if rng.random() < loss:
                sender.on_data_delivered(False, off, len(data), fin)
                continue
            conn_received += receiver.handle_frame(off, data, fin)
            assert conn_received <= conn_sent
            sender.on_data_delivered(True, off, len(data), fin)
        while (res := receiver.pull_data()) is not None:
            assert not fin_seen
            out += res[0]
            fin_seen = res[1]
        if conn_window is not None:
            conn_limit = conn_window + len(out)
        value = receiver.max_stream_data_frame()
        if value is not None:
            ctl.append(value)
        if ctl and rng.random() < 0.5:
            v = ctl.pop(rng.randrange(len(ctl)))
            if rng.random() < loss:
                receiver.on_max_stream_data_delivered(False, v)
            else:
                sender.update_max_stream_data(v)
                receiver.on_max_stream_data_delivered(True, v)
        if fin_seen and sender.is_finished:
            break
        if not in_flight and not ctl and not sender.has_data_to_send and not fin_seen:
            # stuck: only possible if the flow control limits were never raised
            value = receiver.max_stream_data_frame()
            assert value is not None or sender.blocked_frame() is None or conn_window is not None, "deadlock"
            if value is not None:
                ctl.append(value)
    assert fin_seen and sender.is_finished and receiver.is_finished
    assert receiver.highest_offset == len(payload) == sender.highest_offset
    assert sender.buffered == 0 and receiver.buffered == 0
    return bytes(out)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.binary(max_size=5000),
    seed=st.integers(0, 2**32),
    loss=st.sampled_from([0.0, 0.1, 0.3, 0.5]),
    dup=st.sampled_from([0.0, 0.2]),
    window=st.integers(1, 3000),
    frame_len=st.integers(1, 1500),
    credit_step=st.integers(1, 8),
    write_chunks=st.integers(1, 5),
)
def test_lossy_reordering_channel(payload, seed, loss, dup, window, frame_len, credit_step, write_chunks):
    out = transfer(payload, seed, loss, dup, window, frame_len, credit_step, write_chunks=write_chunks)
    assert out == payload


def test_lossy_channel_with_connection_credit():
    payload = random.Random(1).randbytes(200_000)
    assert transfer(payload, 7, 0.2, 0.1, 16_384, 1200, 6, conn_window=5000, write_chunks=7) == payload


def test_bulk_in_order_large_pieces():
    """10 MB in 1200-byte frames: the receiver hands out the contiguous data in large pieces."""
    size = 10 * 1024 * 1024
    window = 1 << 20
    payload = random.Random(3).randbytes(size)
    sender = StreamSender(0, window)
    receiver = StreamReceiver(0, window)
    sender.write(payload, end_stream=True)
    chunks = []
    fin = False
    frames_since_pull = 0
    while not fin:
        f = sender.next_frame(1200, BIG)
        if f is not None:
            off, data, ffin = f
            receiver.handle_frame(off, data, ffin)
            sender.on_data_delivered(True, off, len(data), ffin)
            frames_since_pull += 1
        if f is None or frames_since_pull == 64:
            frames_since_pull = 0
            while (res := receiver.pull_data()) is not None:
                chunks.append(res[0])
                fin = res[1]
            v = receiver.max_stream_data_frame()
            if v is not None:
                sender.update_max_stream_data(v)
    assert b"".join(chunks) == payload
    assert len(chunks) < size // 1200 // 32
    assert sender.is_finished and receiver.is_finished
