import pytest
from hypothesis import given, settings, strategies as st

from mqvpn.quic import frames as F
from mqvpn.quic.buffer import UINT_VAR_MAX, Buffer
from mqvpn.quic.errors import QuicErrorCode, QuicProtocolError
from mqvpn.quic.frames import FrameType as T
from mqvpn.quic.rangeset import RangeSet

varint = st.integers(0, UINT_VAR_MAX)
small = st.integers(0, 1 << 20)
cid = st.binary(min_size=1, max_size=20)
token16 = st.binary(min_size=16, max_size=16)
data8 = st.binary(min_size=8, max_size=8)

# frame type -> parser called with the buffer just after the type (the dispatch a connection would do)
PULLERS = {
    T.PADDING: F.pull_padding,
    T.PING: lambda buf: None,
    T.ACK: lambda buf: F.pull_ack(buf, ecn=False),
    T.ACK_ECN: lambda buf: F.pull_ack(buf, ecn=True),
    T.RESET_STREAM: F.pull_reset_stream,
    T.STOP_SENDING: F.pull_stop_sending,
    T.CRYPTO: F.pull_crypto,
    T.NEW_TOKEN: F.pull_new_token,
    **{0x08 | bits: (lambda buf, t=0x08 | bits: F.pull_stream(buf, t)) for bits in range(8)},
    T.MAX_DATA: F.pull_max_data,
    T.MAX_STREAM_DATA: F.pull_max_stream_data,
    T.MAX_STREAMS_BIDI: lambda buf: F.pull_max_streams(buf, unidirectional=False),
    T.MAX_STREAMS_UNI: lambda buf: F.pull_max_streams(buf, unidirectional=True),
    T.DATA_BLOCKED: F.pull_data_blocked,
    T.STREAM_DATA_BLOCKED: F.pull_stream_data_blocked,
    T.STREAMS_BLOCKED_BIDI: lambda buf: F.pull_streams_blocked(buf, unidirectional=False),
    T.STREAMS_BLOCKED_UNI: lambda buf: F.pull_streams_blocked(buf, unidirectional=True),
    T.NEW_CONNECTION_ID: F.pull_new_connection_id,
    T.RETIRE_CONNECTION_ID: F.pull_retire_connection_id,
    T.PATH_CHALLENGE: F.pull_path_challenge,
    T.PATH_RESPONSE: F.pull_path_response,
    T.CONNECTION_CLOSE: lambda buf: F.pull_connection_close(buf, application=False),
    T.APPLICATION_CLOSE: lambda buf: F.pull_connection_close(buf, application=True),
    T.HANDSHAKE_DONE: lambda buf: None,
    T.DATAGRAM: lambda buf: F.pull_datagram(buf, with_length=False),
    T.DATAGRAM_WITH_LENGTH: lambda buf: F.pull_datagram(buf, with_length=True),
    T.PATH_ACK: lambda buf: F.pull_path_ack(buf, ecn=False),
    T.PATH_ACK_ECN: lambda buf: F.pull_path_ack(buf, ecn=True),
    T.PATH_ABANDON: F.pull_path_abandon,
    T.PATH_STATUS_BACKUP: lambda buf: F.pull_path_status(buf, available=False),
    T.PATH_STATUS_AVAILABLE: lambda buf: F.pull_path_status(buf, available=True),
    T.PATH_NEW_CONNECTION_ID: F.pull_path_new_connection_id,
    T.PATH_RETIRE_CONNECTION_ID: F.pull_path_retire_connection_id,
    T.MAX_PATH_ID: F.pull_max_path_id,
    T.PATHS_BLOCKED: F.pull_paths_blocked,
    T.PATH_CIDS_BLOCKED: F.pull_path_cids_blocked,
}


def encode(push, *args, **kwargs) -> bytes:
    buf = Buffer(capacity=4096)
    push(buf, *args, **kwargs)
    return buf.data


def decode(wire: bytes, expect_type: int):
    """Pull the frame type and dispatch; the frame must consume the whole buffer."""
    buf = Buffer(data=wire)
    frame_type = buf.pull_uint_var()
    assert frame_type == expect_type
    value = PULLERS[frame_type](buf)
    assert buf.eof()
    return value


def roundtrip(push, expect_type, *args, **kwargs):
    return decode(encode(push, *args, **kwargs), expect_type)


def bad(wire: bytes, frame_type: int, code=QuicErrorCode.FRAME_ENCODING_ERROR) -> QuicProtocolError:
    buf = Buffer(data=wire)
    with pytest.raises(QuicProtocolError) as info:
        PULLERS[frame_type](buf)
    assert info.value.error_code == code
    assert info.value.frame_type == frame_type
    return info.value


def uv(*values: int) -> bytes:
    buf = Buffer(capacity=8 * len(values) + 8)
    for v in values:
        buf.push_uint_var(v)
    return buf.data


# ------------------------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------------------------

# RFC 9000 Table 3 "Pkts" column (+ RFC 9221 §4, multipath-21 §4), written out independently of the module
RFC_TABLE_3 = {
    0x00: "IH01", 0x01: "IH01", 0x02: "IH_1", 0x03: "IH_1", 0x04: "__01", 0x05: "__01", 0x06: "IH_1",
    0x07: "___1", **{t: "__01" for t in range(0x08, 0x10)}, 0x10: "__01", 0x11: "__01", 0x12: "__01",
    0x13: "__01", 0x14: "__01", 0x15: "__01", 0x16: "__01", 0x17: "__01", 0x18: "__01", 0x19: "__01",
    0x1A: "__01", 0x1B: "___1", 0x1C: "IH01", 0x1D: "__01", 0x1E: "___1", 0x30: "__01", 0x31: "__01",
    **{t: "___1" for t in (0x3E, 0x3F, 0x3E75, 0x3E76, 0x3E77, 0x3E78, 0x3E79, 0x3E7A, 0x3E7B, 0x3E7C)},
}
EPOCHS = {"I": F.INITIAL, "0": F.ZERO_RTT, "H": F.HANDSHAKE, "1": F.ONE_RTT}


def test_permission_table_matches_rfc_table_3():
    assert set(F.FRAME_PERMISSIONS) == set(RFC_TABLE_3)
    for frame_type, pkts in RFC_TABLE_3.items():
        for letter, bit in EPOCHS.items():
            assert F.frame_allowed(frame_type, bit) == (letter in pkts), (hex(frame_type), letter)


@pytest.mark.parametrize(
    "frame_type, allowed",
    [
        (T.ACK, "IH1"),
        (T.HANDSHAKE_DONE, "1"),
        (T.APPLICATION_CLOSE, "01"),
        (T.CONNECTION_CLOSE, "IH01"),
        (T.STREAM_BASE, "01"),
        (0x0F, "01"),
        (T.DATAGRAM, "01"),
        (T.DATAGRAM_WITH_LENGTH, "01"),
        (T.PATH_CHALLENGE, "01"),
        (T.PATH_RESPONSE, "1"),
        (T.NEW_CONNECTION_ID, "01"),
        (T.RETIRE_CONNECTION_ID, "01"),
        (T.CRYPTO, "IH1"),
        (T.NEW_TOKEN, "1"),
        (T.PADDING, "IH01"),
        (T.PATH_ACK, "1"),
        (T.PATH_NEW_CONNECTION_ID, "1"),
        (T.MAX_PATH_ID, "1"),
    ],
)
def test_permission_cases(frame_type, allowed):
    for letter, bit in EPOCHS.items():
        assert F.frame_allowed(frame_type, bit) == (letter in allowed), (frame_type, letter)


def test_unknown_frame_types_not_allowed():
    for frame_type in (0x1F, 0x20, 0x2F, 0x32, 0x3D, 0x40, 0x3E74, 0x3E7D, 0x15228C00, UINT_VAR_MAX):
        assert frame_type not in F.FRAME_PERMISSIONS
        for bit in EPOCHS.values():
            assert not F.frame_allowed(frame_type, bit)


def test_multipath_codepoints_draft_21():
    assert {t.name: t.value for t in T if t.value in F.MULTIPATH_FRAME_TYPES} == {
        "PATH_ACK": 0x3E, "PATH_ACK_ECN": 0x3F, "PATH_ABANDON": 0x3E75, "PATH_STATUS_BACKUP": 0x3E76,
        "PATH_STATUS_AVAILABLE": 0x3E77, "PATH_NEW_CONNECTION_ID": 0x3E78, "PATH_RETIRE_CONNECTION_ID": 0x3E79,
        "MAX_PATH_ID": 0x3E7A, "PATHS_BLOCKED": 0x3E7B, "PATH_CIDS_BLOCKED": 0x3E7C,
    }
    assert F.PathAbandonErrorCode.APPLICATION_ABANDON_PATH == 0x3E
    assert F.PathAbandonErrorCode.NO_CID_AVAILABLE_FOR_PATH == 0x3E77


def test_ack_eliciting_in_flight_probing():
    not_eliciting = {0x00, 0x02, 0x03, 0x1C, 0x1D, 0x3E, 0x3F}
    assert F.ACK_ELICITING == set(RFC_TABLE_3) - not_eliciting
    assert F.IN_FLIGHT == F.ACK_ELICITING | {0x00}
    assert F.PROBING == {0x00, 0x1A, 0x1B, 0x18}
    for t in (0x01, 0x08, 0x0F, 0x1E, 0x30, 0x31, 0x3E75, 0x3E7C):
        assert t in F.ACK_ELICITING and t in F.IN_FLIGHT
    assert 0x3E not in F.IN_FLIGHT and 0x1C not in F.IN_FLIGHT


def test_every_frame_type_has_a_puller_here():
    assert set(PULLERS) == set(F.FRAME_PERMISSIONS)


# ------------------------------------------------------------------------------------------------------------------
# ACK / PATH_ACK
# ------------------------------------------------------------------------------------------------------------------


@st.composite
def ack_ranges(draw, max_ranges=40):
    """Ascending, disjoint, non-adjacent (start, stop) pairs."""
    pieces = draw(st.lists(st.tuples(st.integers(1, 1 << 40), st.integers(1, 1 << 20)), min_size=1, max_size=max_ranges))
    start = draw(st.integers(0, 1 << 30))
    ranges = []
    for gap, length in pieces:
        ranges.append((start, start + length))
        start += length + gap
    return ranges


ecn_counts = st.none() | st.tuples(varint, varint, varint)


@given(ack_ranges(), varint, ecn_counts, st.none() | st.integers(0, (1 << 32) - 1))
def test_ack_roundtrip(ranges, delay, ecn, path_id):
    wire = encode(F.push_ack, ranges, delay, ecn=ecn, path_id=path_id)
    assert len(wire) == F.ack_frame_size(ranges, delay, ecn=ecn, path_id=path_id)
    if path_id is None:
        expect = T.ACK if ecn is None else T.ACK_ECN
        ack = decode(wire, expect)
    else:
        expect = T.PATH_ACK if ecn is None else T.PATH_ACK_ECN
        got_path, ack = decode(wire, expect)
        assert got_path == path_id
    assert ack.ranges == ranges
    assert ack.ack_delay == delay
    assert ack.ecn == ecn
    # a RangeSet gives the same bytes
    assert encode(F.push_ack, RangeSet(ranges), delay, ecn=ecn, path_id=path_id) == wire
    # and so does a generator
    assert encode(F.push_ack, iter(ranges), delay, ecn=ecn, path_id=path_id) == wire


@given(ack_ranges(), st.integers(1, 10))
def test_ack_max_ranges_keeps_newest(ranges, max_ranges):
    buf = Buffer(capacity=4096)
    n = F.push_ack(buf, RangeSet(ranges), 7, max_ranges=max_ranges)
    assert n == min(len(ranges), max_ranges)
    assert decode(buf.data, T.ACK).ranges == ranges[-n:]


@given(ack_ranges(max_ranges=100), st.integers(0, 400), ecn_counts, st.none() | small)
def test_ack_max_size_truncates_oldest_and_is_maximal(ranges, max_size, ecn, path_id):
    buf = Buffer(capacity=4096)
    n = F.push_ack(buf, ranges, 25, ecn=ecn, path_id=path_id, max_size=max_size)
    assert len(buf.data) <= max_size
    if n == 0:
        assert buf.data == b""
        assert F.ack_frame_size(ranges[-1:], 25, ecn=ecn, path_id=path_id) > max_size
        return
    expect = (T.ACK if ecn is None else T.ACK_ECN) if path_id is None else (T.PATH_ACK if ecn is None else T.PATH_ACK_ECN)
    ack = decode(buf.data, expect)
    if path_id is not None:
        ack = ack[1]
    assert ack.ranges == ranges[-n:]
    assert len(buf.data) == F.ack_frame_size(ranges[-n:], 25, ecn=ecn, path_id=path_id)
    if n < len(ranges):
        assert F.ack_frame_size(ranges[-n - 1:], 25, ecn=ecn, path_id=path_id) > max_size


def test_ack_single_range_fast_path_and_wire():
    r = RangeSet()
    r.add(0, 10)
    assert encode(F.push_ack, r, 3) == bytes([0x02, 9, 3, 0, 9])
    assert encode(F.push_ack, r, 3, path_id=5) == bytes([0x3E, 5, 9, 3, 0, 9])
    assert encode(F.push_ack, r, 3, ecn=(1, 2, 3)) == bytes([0x03, 9, 3, 0, 9, 1, 2, 3])
    assert encode(F.push_ack, [(0, 10)], 3) == bytes([0x02, 9, 3, 0, 9])
    # two ranges: [0,2) [5,6): largest 5, first range 0, gap 5-2-1 = 2, length 1
    assert encode(F.push_ack, [(0, 2), (5, 6)], 0) == bytes([0x02, 5, 0, 1, 0, 2, 1])
    assert decode(bytes([0x02, 5, 0, 1, 0, 2, 1]), T.ACK).ranges == [(0, 2), (5, 6)]


def test_ack_packet_number_zero_edges():
    # largest 0, first range 0 -> [0, 1)
    assert decode(bytes([0x02, 0, 0, 0, 0]), T.ACK).ranges == [(0, 1)]
    # first range bigger than largest
    bad(uv(3, 0, 0, 4), T.ACK)
    # gap arithmetic: smallest 5; gap 3 -> largest 5-3-2 = 0 ok, range 0 -> [0,1)
    assert decode(uv(0x02, 5, 0, 1, 0, 3, 0), T.ACK).ranges == [(0, 1), (5, 6)]
    # gap 4 -> largest -1
    bad(uv(5, 0, 1, 0, 4, 0), T.ACK)
    # range longer than what is left
    bad(uv(5, 0, 1, 0, 3, 1), T.ACK)
    # range count says more than there is
    bad(uv(100, 0, 3, 0, 1, 1), T.ACK)
    # ECN counts missing
    bad(uv(5, 0, 0, 0, 1, 2), T.ACK_ECN)
    # PATH_ACK truncated after the path id, and with nothing at all
    bad(uv(1, 5, 0), T.PATH_ACK)
    bad(b"", T.PATH_ACK_ECN)


def test_ack_empty_ranges_rejected():
    with pytest.raises(ValueError):
        F.push_ack(Buffer(capacity=64), RangeSet(), 0)


# ------------------------------------------------------------------------------------------------------------------
# STREAM / CRYPTO / DATAGRAM / PADDING
# ------------------------------------------------------------------------------------------------------------------


@given(varint, st.integers(0, UINT_VAR_MAX - 2000), st.binary(max_size=1500), st.booleans(), st.booleans())
def test_stream_roundtrip(stream_id, offset, data, fin, with_length):
    wire = encode(F.push_stream, stream_id, offset, data, fin, with_length=with_length)
    frame_type = 0x08 | (0x04 if offset else 0) | (0x02 if with_length else 0) | (0x01 if fin else 0)
    assert wire[0] == frame_type
    assert len(wire) == F.stream_frame_overhead(stream_id, offset, len(data), with_length) + len(data)
    assert decode(wire, frame_type) == (stream_id, offset, data, fin)


def test_stream_limits():
    top = UINT_VAR_MAX
    # offset + length == 2^62-1 is fine
    assert decode(uv(0x0E, 4, top - 3, 3) + b"abc", 0x0E) == (4, top - 3, b"abc", False)
    assert decode(uv(0x0F, 4, top, 0), 0x0F) == (4, top, b"", True)
    # one past it is not (even before reading the data)
    bad(uv(4, top - 2, 3) + b"abc", 0x0E)
    bad(uv(4, top, 1) + b"a", 0x0F)
    # no LEN bit: runs to the end; no OFF bit: offset 0
    assert decode(uv(0x08, 1) + b"hello", 0x08) == (1, 0, b"hello", False)
    assert decode(uv(0x0D, 1, 9) + b"hello", 0x0D) == (1, 9, b"hello", True)
    # no LEN bit, offset already at the top: any data is too much
    bad(uv(1, top) + b"x", 0x0C)
    # truncations
    bad(uv(1, 10) + b"abc", 0x0A)
    bad(b"", 0x08)
    bad(uv(1), 0x0C)


def test_stream_frame_overhead_zero_offset_omitted():
    assert F.stream_frame_overhead(0, 0, 100) == 1 + 1 + 2
    assert F.stream_frame_overhead(0, 0, 100, with_length=False) == 2
    assert F.stream_frame_overhead(64, 1 << 30, 5) == 1 + 2 + 8 + 1


@given(varint, varint, st.integers(-5, 70000), st.booleans())
def test_stream_data_room_is_maximal(stream_id, offset, room, with_length):
    n = F.stream_data_room(stream_id, offset, room, with_length)
    assert n >= 0
    if n > 0:
        assert F.stream_frame_overhead(stream_id, offset, n, with_length) + n <= room
    assert F.stream_frame_overhead(stream_id, offset, n + 1, with_length) + n + 1 > room


@given(st.integers(0, UINT_VAR_MAX - 2000), st.binary(max_size=1500))
def test_crypto_roundtrip(offset, data):
    wire = encode(F.push_crypto, offset, data)
    assert len(wire) == F.crypto_frame_overhead(offset, len(data)) + len(data)
    assert decode(wire, T.CRYPTO) == (offset, data)


@given(varint, st.integers(-5, 70000))
def test_crypto_data_room_is_maximal(offset, room):
    n = F.crypto_data_room(offset, room)
    if n > 0:
        assert F.crypto_frame_overhead(offset, n) + n <= room
    assert F.crypto_frame_overhead(offset, n + 1) + n + 1 > room


def test_crypto_limits():
    assert decode(uv(0x06, UINT_VAR_MAX - 1, 1) + b"x", T.CRYPTO) == (UINT_VAR_MAX - 1, b"x")
    bad(uv(UINT_VAR_MAX, 1) + b"x", T.CRYPTO)
    bad(uv(0, 5) + b"abc", T.CRYPTO)


@given(st.binary(max_size=1500), st.booleans())
def test_datagram_roundtrip(data, with_length):
    wire = encode(F.push_datagram, data, with_length)
    assert len(wire) == F.datagram_frame_overhead(len(data), with_length) + len(data)
    assert decode(wire, T.DATAGRAM_WITH_LENGTH if with_length else T.DATAGRAM) == data


@given(st.integers(-5, 70000), st.booleans())
def test_datagram_data_room_is_maximal(room, with_length):
    n = F.datagram_data_room(room, with_length)
    if n > 0:
        assert F.datagram_frame_overhead(n, with_length) + n <= room
    assert F.datagram_frame_overhead(n + 1, with_length) + n + 1 > room


@pytest.mark.parametrize("edge", [0, 1, 2, 3, 63, 64, 65, 66, 67, 16383, 16384, 16385, 16386, 16387, 16388,
                                  (1 << 30) - 1, 1 << 30, (1 << 30) + 3, (1 << 30) + 4, (1 << 30) + 5, (1 << 30) + 9])
@pytest.mark.parametrize("with_length", [True, False])
def test_data_room_at_varint_boundaries(edge, with_length):
    for room in (edge, edge + 1, edge + 2):
        n = F.datagram_data_room(room, with_length)
        assert n == 0 or F.datagram_frame_overhead(n, with_length) + n <= room
        assert F.datagram_frame_overhead(n + 1, with_length) + n + 1 > room
        for stream_id, offset in ((0, 0), (4, 1 << 20)):
            n = F.stream_data_room(stream_id, offset, room, with_length)
            assert n == 0 or F.stream_frame_overhead(stream_id, offset, n, with_length) + n <= room
            assert F.stream_frame_overhead(stream_id, offset, n + 1, with_length) + n + 1 > room
        n = F.crypto_data_room(5, room)
        assert n == 0 or F.crypto_frame_overhead(5, n) + n <= room
        assert F.crypto_frame_overhead(5, n + 1) + n + 1 > room


def test_datagram_edges():
    assert decode(bytes([0x30]), T.DATAGRAM) == b""
    assert decode(bytes([0x31, 0]), T.DATAGRAM_WITH_LENGTH) == b""
    bad(uv(4) + b"abc", T.DATAGRAM_WITH_LENGTH)
    bad(b"", T.DATAGRAM_WITH_LENGTH)
    assert F.datagram_frame_overhead(1300) == 3
    assert F.datagram_frame_overhead(1300, with_length=False) == 1


def test_padding():
    assert encode(F.push_padding, 5) == bytes(5)
    assert encode(F.push_padding, 0) == b""
    buf = Buffer(data=bytes(10) + b"\x01" + bytes(3))
    assert buf.pull_uint_var() == 0
    assert F.pull_padding(buf) == 9
    assert buf.tell() == 10 and buf.pull_uint_var() == 1
    assert buf.pull_uint_var() == 0
    assert F.pull_padding(buf) == 2 and buf.eof()
    assert F.pull_padding(buf) == 0


@given(st.integers(0, 1500), st.integers(0, 1500), st.binary(max_size=40))
def test_pull_padding_skips_exactly_the_zero_run(before, zeros, tail):
    data = b"\x07" * before + bytes(zeros) + (b"\x01" + tail if tail or zeros % 2 else b"")
    buf = Buffer(data=data)
    buf.seek(before)
    assert F.pull_padding(buf) == zeros
    assert buf.tell() == before + zeros


# ------------------------------------------------------------------------------------------------------------------
# the other RFC 9000 frames
# ------------------------------------------------------------------------------------------------------------------


def test_ping_handshake_done():
    assert encode(F.push_ping) == b"\x01"
    assert encode(F.push_handshake_done) == b"\x1e"


@given(varint, varint, varint)
def test_reset_stream_stop_sending(stream_id, code, final_size):
    assert roundtrip(F.push_reset_stream, T.RESET_STREAM, stream_id, code, final_size) == (stream_id, code, final_size)
    assert roundtrip(F.push_stop_sending, T.STOP_SENDING, stream_id, code) == (stream_id, code)


@given(st.binary(min_size=1, max_size=500))
def test_new_token_roundtrip(token):
    assert roundtrip(F.push_new_token, T.NEW_TOKEN, token) == token


def test_new_token_empty_and_truncated():
    bad(uv(0), T.NEW_TOKEN)
    bad(uv(5) + b"ab", T.NEW_TOKEN)
    bad(b"", T.NEW_TOKEN)


@given(varint, varint)
def test_flow_control_frames(stream_id, value):
    assert roundtrip(F.push_max_data, T.MAX_DATA, value) == value
    assert roundtrip(F.push_data_blocked, T.DATA_BLOCKED, value) == value
    assert roundtrip(F.push_max_stream_data, T.MAX_STREAM_DATA, stream_id, value) == (stream_id, value)
    assert roundtrip(F.push_stream_data_blocked, T.STREAM_DATA_BLOCKED, stream_id, value) == (stream_id, value)


@given(st.integers(0, 1 << 60), st.booleans())
def test_max_streams_streams_blocked_roundtrip(value, uni):
    ms = T.MAX_STREAMS_UNI if uni else T.MAX_STREAMS_BIDI
    sb = T.STREAMS_BLOCKED_UNI if uni else T.STREAMS_BLOCKED_BIDI
    assert roundtrip(F.push_max_streams, ms, value, unidirectional=uni) == value
    assert roundtrip(F.push_streams_blocked, sb, value, unidirectional=uni) == value


@pytest.mark.parametrize(
    "frame_type", [T.MAX_STREAMS_BIDI, T.MAX_STREAMS_UNI, T.STREAMS_BLOCKED_BIDI, T.STREAMS_BLOCKED_UNI]
)
def test_stream_count_limit(frame_type):
    assert decode(uv(frame_type, 1 << 60), frame_type) == 1 << 60
    bad(uv((1 << 60) + 1), frame_type)
    bad(uv(UINT_VAR_MAX), frame_type)
    bad(b"", frame_type)


@given(varint, varint, cid, token16)
def test_new_connection_id_roundtrip(seq, rpt, connection_id, token):
    rpt = min(rpt, seq)
    got = roundtrip(F.push_new_connection_id, T.NEW_CONNECTION_ID, seq, rpt, connection_id, token)
    assert got == (seq, rpt, connection_id, token)
    assert got.connection_id == connection_id and got.stateless_reset_token == token


def test_new_connection_id_invalid():
    tok = bytes(range(16))
    ok = uv(3, 3) + bytes([4]) + b"abcd" + tok
    assert decode(uv(0x18) + ok, T.NEW_CONNECTION_ID) == (3, 3, b"abcd", tok)
    bad(uv(3, 4) + bytes([4]) + b"abcd" + tok, T.NEW_CONNECTION_ID)  # retire_prior_to > sequence
    bad(uv(3, 0) + bytes([0]) + tok, T.NEW_CONNECTION_ID)  # zero-length CID
    bad(uv(3, 0) + bytes([21]) + bytes(21) + tok, T.NEW_CONNECTION_ID)  # 21 bytes
    assert decode(uv(0x18, 3, 0) + bytes([20]) + bytes(20) + tok, T.NEW_CONNECTION_ID).connection_id == bytes(20)
    bad(uv(3, 0) + bytes([4]) + b"abcd" + tok[:15], T.NEW_CONNECTION_ID)  # short token
    for push in (F.push_new_connection_id,):
        with pytest.raises(ValueError):
            encode(push, 1, 0, b"", tok)
        with pytest.raises(ValueError):
            encode(push, 1, 0, b"a", tok[:8])


@given(varint)
def test_retire_connection_id(seq):
    assert roundtrip(F.push_retire_connection_id, T.RETIRE_CONNECTION_ID, seq) == seq


@given(data8)
def test_path_challenge_response(data):
    assert roundtrip(F.push_path_challenge, T.PATH_CHALLENGE, data) == data
    assert roundtrip(F.push_path_response, T.PATH_RESPONSE, data) == data


def test_path_challenge_truncated():
    bad(b"1234567", T.PATH_CHALLENGE)
    bad(b"", T.PATH_RESPONSE)


@given(varint, varint, st.text(max_size=100))
def test_connection_close_roundtrip(code, frame_type, reason):
    got = roundtrip(F.push_connection_close, T.CONNECTION_CLOSE, code, frame_type, reason)
    assert got == (code, frame_type, reason)
    got = roundtrip(F.push_connection_close, T.APPLICATION_CLOSE, code, reason=reason, application=True)
    assert got == (code, None, reason)
    assert got.frame_type is None and got.reason == reason


def test_connection_close_edges():
    # frame_type None goes out as 0
    assert decode(encode(F.push_connection_close, 7), T.CONNECTION_CLOSE) == (7, 0, "")
    # bytes reason accepted, invalid UTF-8 replaced
    assert decode(encode(F.push_connection_close, 1, 2, b"ok\xff"), T.CONNECTION_CLOSE).reason == "ok\ufffd"
    bad(uv(1, 2, 10) + b"short", T.CONNECTION_CLOSE)
    bad(uv(1, 10) + b"short", T.APPLICATION_CLOSE)
    bad(uv(1), T.APPLICATION_CLOSE)


# ------------------------------------------------------------------------------------------------------------------
# multipath
# ------------------------------------------------------------------------------------------------------------------


@given(varint, varint, st.booleans())
def test_path_abandon_status_retire_cids_blocked(path_id, value, available):
    assert roundtrip(F.push_path_abandon, T.PATH_ABANDON, path_id, value) == (path_id, value)
    status_type = T.PATH_STATUS_AVAILABLE if available else T.PATH_STATUS_BACKUP
    assert roundtrip(F.push_path_status, status_type, path_id, value, available) == (path_id, value)
    assert roundtrip(F.push_path_retire_connection_id, T.PATH_RETIRE_CONNECTION_ID, path_id, value) == (path_id, value)
    assert roundtrip(F.push_path_cids_blocked, T.PATH_CIDS_BLOCKED, path_id, value) == (path_id, value)
    assert roundtrip(F.push_paths_blocked, T.PATHS_BLOCKED, value) == value


@given(st.integers(0, (1 << 32) - 1))
def test_max_path_id_roundtrip(value):
    assert roundtrip(F.push_max_path_id, T.MAX_PATH_ID, value) == value


def test_max_path_id_limit():
    bad(uv(1 << 32), T.MAX_PATH_ID, QuicErrorCode.PROTOCOL_VIOLATION)
    bad(b"", T.MAX_PATH_ID)


@given(varint, varint, varint, cid, token16)
def test_path_new_connection_id_roundtrip(path_id, seq, rpt, connection_id, token):
    rpt = min(rpt, seq)
    got = roundtrip(F.push_path_new_connection_id, T.PATH_NEW_CONNECTION_ID, path_id, seq, rpt, connection_id, token)
    assert got == (path_id, (seq, rpt, connection_id, token))


def test_multipath_wire_bytes():
    assert encode(F.push_path_abandon, 1, 0x3E) == bytes.fromhex("7e75" "01" "3e")
    assert encode(F.push_path_status, 2, 9, True) == bytes.fromhex("7e77" "02" "09")
    assert encode(F.push_path_status, 2, 9, False) == bytes.fromhex("7e76" "02" "09")
    assert encode(F.push_max_path_id, 3) == bytes.fromhex("7e7a03")
    assert encode(F.push_path_cids_blocked, 1, 2) == bytes.fromhex("7e7c0102")
    bad(uv(1, 2, 0) + bytes([0]) + bytes(16), T.PATH_NEW_CONNECTION_ID)  # zero-length CID
    bad(uv(1, 2, 3) + bytes([4]) + b"abcd" + bytes(16), T.PATH_NEW_CONNECTION_ID)  # rpt > seq
    bad(uv(1), T.PATH_ABANDON)
    bad(uv(1), T.PATH_STATUS_AVAILABLE)


# ------------------------------------------------------------------------------------------------------------------
# fuzz: arbitrary bytes never raise anything but QuicProtocolError, attributed to the right frame type
# ------------------------------------------------------------------------------------------------------------------


@settings(max_examples=3000)
@given(st.sampled_from(sorted(PULLERS)), st.binary(max_size=80))
def test_fuzz_only_protocol_errors(frame_type, data):
    buf = Buffer(data=data)
    try:
        PULLERS[frame_type](buf)
    except QuicProtocolError as exc:
        assert exc.frame_type == frame_type
        assert exc.error_code in (QuicErrorCode.FRAME_ENCODING_ERROR, QuicErrorCode.PROTOCOL_VIOLATION)
    else:
        assert buf.tell() <= len(data)


@settings(max_examples=1000)
@given(st.sampled_from(sorted(PULLERS)), st.lists(st.integers(0, UINT_VAR_MAX) | st.integers(0, 70), max_size=12), st.binary(max_size=30))
def test_fuzz_varint_shaped_input(frame_type, values, tail):
    """Valid varints (large and small) followed by junk reach deeper into each parser than random bytes."""
    buf = Buffer(data=uv(*values) + tail)
    try:
        PULLERS[frame_type](buf)
    except QuicProtocolError as exc:
        assert exc.frame_type == frame_type
