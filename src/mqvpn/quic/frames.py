"""QUIC frame codecs: RFC 9000 §19, DATAGRAM (RFC 9221) and draft-ietf-quic-multipath-21 §4.

Parsers (``pull_*``) read from a ``Buffer`` positioned just after the frame-type varint and return plain values
(ints, bytes, tuples, small NamedTuples). Malformed input raises ``QuicProtocolError`` (FRAME_ENCODING_ERROR, or
PROTOCOL_VIOLATION where the spec says so) carrying the frame type; nothing else escapes.

Writers (``push_*``) write a whole frame, type included. They trust their arguments (callers own them) and need
the room to be there: size the frame first with the ``*_overhead`` / ``*_size`` / ``*_room`` helpers.
``push_bytes`` of the C buffer only takes ``bytes`` (not bytearray or memoryview).

Frame-type facts live in tables keyed by the type: ``FRAME_PERMISSIONS`` (RFC 9000 Table 3 "Pkts"),
``ACK_ELICITING``, ``IN_FLIGHT``, ``PROBING``, ``MULTIPATH_FRAME_TYPES``.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum
from typing import NamedTuple

from .buffer import UINT_VAR_MAX, Buffer, BufferReadError, size_uint_var
from .errors import QuicErrorCode, QuicProtocolError
from .rangeset import RangeSet


class FrameType(IntEnum):
    PADDING = 0x00
    PING = 0x01
    ACK = 0x02
    ACK_ECN = 0x03
    RESET_STREAM = 0x04
    STOP_SENDING = 0x05
    CRYPTO = 0x06
    NEW_TOKEN = 0x07
    STREAM_BASE = 0x08  # 0x08..0x0f: | STREAM_OFF | STREAM_LEN | STREAM_FIN
    MAX_DATA = 0x10
    MAX_STREAM_DATA = 0x11
    MAX_STREAMS_BIDI = 0x12
    MAX_STREAMS_UNI = 0x13
    DATA_BLOCKED = 0x14
    STREAM_DATA_BLOCKED = 0x15
    STREAMS_BLOCKED_BIDI = 0x16
    STREAMS_BLOCKED_UNI = 0x17
    NEW_CONNECTION_ID = 0x18
    RETIRE_CONNECTION_ID = 0x19
    PATH_CHALLENGE = 0x1A
    PATH_RESPONSE = 0x1B
    CONNECTION_CLOSE = 0x1C
    APPLICATION_CLOSE = 0x1D
    HANDSHAKE_DONE = 0x1E
    DATAGRAM = 0x30  # RFC 9221, no length: data runs to the end of the packet
    DATAGRAM_WITH_LENGTH = 0x31
    # draft-ietf-quic-multipath-21 §4. The only place these codepoints are written down: everything else in the
    # transport (tables below, writers, the connection) refers to them by name.
    PATH_ACK = 0x3E
    PATH_ACK_ECN = 0x3F
    PATH_ABANDON = 0x3E75
    PATH_STATUS_BACKUP = 0x3E76
    PATH_STATUS_AVAILABLE = 0x3E77
    PATH_NEW_CONNECTION_ID = 0x3E78
    PATH_RETIRE_CONNECTION_ID = 0x3E79
    MAX_PATH_ID = 0x3E7A
    PATHS_BLOCKED = 0x3E7B
    PATH_CIDS_BLOCKED = 0x3E7C


class PathAbandonErrorCode(IntEnum):
    """Error codes carried by PATH_ABANDON (draft-ietf-quic-multipath-21 §4.2.1 / §6)."""

    NO_ERROR = 0x0
    APPLICATION_ABANDON_PATH = 0x3E
    PATH_RESOURCE_LIMIT_REACHED = 0x3E75
    PATH_UNSTABLE_OR_POOR = 0x3E76
    NO_CID_AVAILABLE_FOR_PATH = 0x3E77


STREAM_OFF = 0x04
STREAM_LEN = 0x02
STREAM_FIN = 0x01

MAX_CID_LENGTH = 20
STATELESS_RESET_TOKEN_LENGTH = 16
PATH_CHALLENGE_LENGTH = 8
MAX_STREAMS_LIMIT = 1 << 60  # RFC 9000 §19.11 / §19.14
MAX_PATH_ID_LIMIT = (1 << 32) - 1  # draft-ietf-quic-multipath-21 §2.1 / §4.6

# Plain-int copies of the types the per-packet writers and parsers use (no enum attribute lookups there).
_ACK = int(FrameType.ACK)
_ACK_ECN = int(FrameType.ACK_ECN)
_PATH_ACK = int(FrameType.PATH_ACK)
_PATH_ACK_ECN = int(FrameType.PATH_ACK_ECN)
_STREAM = int(FrameType.STREAM_BASE)
_CRYPTO = int(FrameType.CRYPTO)
_DATAGRAM = int(FrameType.DATAGRAM)
_DATAGRAM_WITH_LENGTH = int(FrameType.DATAGRAM_WITH_LENGTH)

# ---------------------------------------------------------------------------------------------------------------
# Frame x packet-type permissions (RFC 9000 Table 3 "Pkts"; RFC 9221 §4; multipath-21 §4: 1-RTT only)
# ---------------------------------------------------------------------------------------------------------------

INITIAL = 1
ZERO_RTT = 2
HANDSHAKE = 4
ONE_RTT = 8

# named after Table 3's notation
_P_IH01 = INITIAL | ZERO_RTT | HANDSHAKE | ONE_RTT
_P_IH_1 = INITIAL | HANDSHAKE | ONE_RTT
_P_01 = ZERO_RTT | ONE_RTT
_P_1 = ONE_RTT

MULTIPATH_FRAME_TYPES: frozenset[int] = frozenset(
    int(t)
    for t in (
        FrameType.PATH_ACK,
        FrameType.PATH_ACK_ECN,
        FrameType.PATH_ABANDON,
        FrameType.PATH_STATUS_BACKUP,
        FrameType.PATH_STATUS_AVAILABLE,
        FrameType.PATH_NEW_CONNECTION_ID,
        FrameType.PATH_RETIRE_CONNECTION_ID,
        FrameType.MAX_PATH_ID,
        FrameType.PATHS_BLOCKED,
        FrameType.PATH_CIDS_BLOCKED,
    )
)

_permissions = {
    FrameType.PADDING: _P_IH01,
    FrameType.PING: _P_IH01,
    FrameType.ACK: _P_IH_1,
    FrameType.ACK_ECN: _P_IH_1,
    FrameType.RESET_STREAM: _P_01,
    FrameType.STOP_SENDING: _P_01,
    FrameType.CRYPTO: _P_IH_1,
    FrameType.NEW_TOKEN: _P_1,
    **{_STREAM | bits: _P_01 for bits in range(8)},
    FrameType.MAX_DATA: _P_01,
    FrameType.MAX_STREAM_DATA: _P_01,
    FrameType.MAX_STREAMS_BIDI: _P_01,
    FrameType.MAX_STREAMS_UNI: _P_01,
    FrameType.DATA_BLOCKED: _P_01,
    FrameType.STREAM_DATA_BLOCKED: _P_01,
    FrameType.STREAMS_BLOCKED_BIDI: _P_01,
    FrameType.STREAMS_BLOCKED_UNI: _P_01,
    FrameType.NEW_CONNECTION_ID: _P_01,
    FrameType.RETIRE_CONNECTION_ID: _P_01,
    FrameType.PATH_CHALLENGE: _P_01,
    FrameType.PATH_RESPONSE: _P_1,
    FrameType.CONNECTION_CLOSE: _P_IH01,
    FrameType.APPLICATION_CLOSE: _P_01,
    FrameType.HANDSHAKE_DONE: _P_1,
    FrameType.DATAGRAM: _P_01,
    FrameType.DATAGRAM_WITH_LENGTH: _P_01,
    **{t: _P_1 for t in MULTIPATH_FRAME_TYPES},
}
FRAME_PERMISSIONS: dict[int, int] = {int(k): v for k, v in _permissions.items()}
del _permissions
_PERMISSIONS_GET = FRAME_PERMISSIONS.get


def frame_allowed(frame_type: int, epoch_bit: int) -> bool:
    """May a frame of ``frame_type`` appear in a packet of type ``epoch_bit`` (INITIAL/ZERO_RTT/HANDSHAKE/ONE_RTT)?

    Unknown frame types are never allowed; tell them apart with ``frame_type in FRAME_PERMISSIONS``
    (unknown: FRAME_ENCODING_ERROR; known but misplaced: PROTOCOL_VIOLATION, RFC 9000 §12.4).
    """
    return (_PERMISSIONS_GET(frame_type, 0) & epoch_bit) != 0


_ALL = frozenset(FRAME_PERMISSIONS)
_NOT_ACK_ELICITING = frozenset(
    int(t)
    for t in (
        FrameType.PADDING,
        FrameType.ACK,
        FrameType.ACK_ECN,
        FrameType.CONNECTION_CLOSE,
        FrameType.APPLICATION_CLOSE,
        FrameType.PATH_ACK,
        FrameType.PATH_ACK_ECN,
    )
)
ACK_ELICITING: frozenset[int] = _ALL - _NOT_ACK_ELICITING
# RFC 9002 §2: in flight = ack-eliciting or PADDING
IN_FLIGHT: frozenset[int] = ACK_ELICITING | {int(FrameType.PADDING)}
# RFC 9000 §9.1
PROBING: frozenset[int] = frozenset(
    int(t) for t in (FrameType.PADDING, FrameType.PATH_CHALLENGE, FrameType.PATH_RESPONSE, FrameType.NEW_CONNECTION_ID)
)


# ---------------------------------------------------------------------------------------------------------------
# Result types
# ---------------------------------------------------------------------------------------------------------------


class AckFrame(NamedTuple):
    ranges: list[tuple[int, int]]  # ascending, half-open [start, stop), disjoint and non-adjacent
    ack_delay: int  # raw: scale by 2**ack_delay_exponent microseconds
    ecn: tuple[int, int, int] | None  # (ECT(0), ECT(1), ECN-CE) counts for ACK_ECN / PATH_ACK_ECN


class NewConnectionIdFrame(NamedTuple):
    sequence: int
    retire_prior_to: int
    connection_id: bytes
    stateless_reset_token: bytes


class ConnectionCloseFrame(NamedTuple):
    error_code: int
    frame_type: int | None  # None for the application variant (0x1d)
    reason: str


def _bad(frame_type: int, reason: str = "malformed frame") -> QuicProtocolError:
    return QuicProtocolError(QuicErrorCode.FRAME_ENCODING_ERROR, reason, frame_type)


# ---------------------------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------------------------


def pull_padding(buf: Buffer) -> int:
    """Skip the run of zero bytes following a PADDING frame type; returns how many were skipped."""
    pos = buf.tell()
    end = buf.capacity
    if pos >= end:
        return 0
    rest = buf.data_slice(pos, end)
    if rest[0]:
        return 0
    n = len(rest)
    if rest != bytes(n):  # the usual case, padding up to the end of the packet, is one memcmp
        # leading zero bytes = length minus the bytes the value needs (bytes.lstrip(b"\0") is several times slower)
        n -= (int.from_bytes(rest, "big").bit_length() + 7) >> 3
    buf.seek(pos + n)
    return n


def _pull_ack_body(buf: Buffer, ecn: bool, frame_type: int) -> AckFrame:
    try:
        pull = buf.pull_uint_var
        largest = pull()
        ack_delay = pull()
        count = pull()
        smallest = largest - pull()
        if smallest < 0:
            raise _bad(frame_type, "first ACK range below 0")
        ranges = [(smallest, largest + 1)]
        if count:
            append = ranges.append
            for _ in range(count):
                largest = smallest - pull() - 2
                if largest < 0:
                    raise _bad(frame_type, "ACK gap below 0")
                smallest = largest - pull()
                if smallest < 0:
                    raise _bad(frame_type, "ACK range below 0")
                append((smallest, largest + 1))
            ranges.reverse()
        ecn_counts = (pull(), pull(), pull()) if ecn else None
    except BufferReadError:
        raise _bad(frame_type, "truncated ACK") from None
    return AckFrame(ranges, ack_delay, ecn_counts)


def pull_ack(buf: Buffer, ecn: bool = False) -> AckFrame:
    """ACK (0x02) / ACK_ECN (0x03) body."""
    return _pull_ack_body(buf, ecn, _ACK_ECN if ecn else _ACK)


def pull_path_ack(buf: Buffer, ecn: bool = False) -> tuple[int, AckFrame]:
    """PATH_ACK / PATH_ACK_ECN: ``(path_id, AckFrame)``."""
    frame_type = _PATH_ACK_ECN if ecn else _PATH_ACK
    try:
        path_id = buf.pull_uint_var()
    except BufferReadError:
        raise _bad(frame_type, "truncated PATH_ACK") from None
    return path_id, _pull_ack_body(buf, ecn, frame_type)


def _pull_varints(buf: Buffer, n: int, frame_type: int) -> tuple[int, ...]:
    try:
        pull = buf.pull_uint_var
        return tuple(pull() for _ in range(n))
    except BufferReadError:
        raise _bad(frame_type) from None


def _pull_varint(buf: Buffer, frame_type: int) -> int:
    try:
        return buf.pull_uint_var()
    except BufferReadError:
        raise _bad(frame_type) from None


def pull_reset_stream(buf: Buffer) -> tuple[int, int, int]:
    """RESET_STREAM: ``(stream_id, application_error_code, final_size)``."""
    return _pull_varints(buf, 3, FrameType.RESET_STREAM)  # type: ignore[return-value]


def pull_stop_sending(buf: Buffer) -> tuple[int, int]:
    """STOP_SENDING: ``(stream_id, application_error_code)``."""
    return _pull_varints(buf, 2, FrameType.STOP_SENDING)  # type: ignore[return-value]


def pull_crypto(buf: Buffer) -> tuple[int, bytes]:
    """CRYPTO: ``(offset, data)``."""
    try:
        offset = buf.pull_uint_var()
        length = buf.pull_uint_var()
        if offset + length > UINT_VAR_MAX:
            raise _bad(_CRYPTO, "CRYPTO offset + length beyond 2^62-1")
        data = buf.pull_bytes(length)
    except BufferReadError:
        raise _bad(_CRYPTO, "truncated CRYPTO") from None
    return offset, data


def pull_new_token(buf: Buffer) -> bytes:
    """NEW_TOKEN: the token (never empty)."""
    try:
        length = buf.pull_uint_var()
        if not length:
            raise _bad(FrameType.NEW_TOKEN, "empty NEW_TOKEN")
        return buf.pull_bytes(length)
    except BufferReadError:
        raise _bad(FrameType.NEW_TOKEN) from None


def pull_stream(buf: Buffer, frame_type: int) -> tuple[int, int, bytes, bool]:
    """STREAM (0x08..0x0f): ``(stream_id, offset, data, fin)``. Without the LEN bit, data runs to the buffer's end."""
    try:
        stream_id = buf.pull_uint_var()
        offset = buf.pull_uint_var() if frame_type & STREAM_OFF else 0
        length = buf.pull_uint_var() if frame_type & STREAM_LEN else buf.capacity - buf.tell()
        if offset + length > UINT_VAR_MAX:
            raise _bad(frame_type, "STREAM offset + length beyond 2^62-1")
        data = buf.pull_bytes(length)
    except BufferReadError:
        raise _bad(frame_type, "truncated STREAM") from None
    return stream_id, offset, data, bool(frame_type & STREAM_FIN)


def pull_max_data(buf: Buffer) -> int:
    """MAX_DATA: maximum data."""
    return _pull_varint(buf, FrameType.MAX_DATA)


def pull_max_stream_data(buf: Buffer) -> tuple[int, int]:
    """MAX_STREAM_DATA: ``(stream_id, maximum_stream_data)``."""
    return _pull_varints(buf, 2, FrameType.MAX_STREAM_DATA)  # type: ignore[return-value]


def pull_max_streams(buf: Buffer, unidirectional: bool = False) -> int:
    """MAX_STREAMS (0x12 bidi / 0x13 uni): maximum streams (<= 2^60)."""
    frame_type = FrameType.MAX_STREAMS_UNI if unidirectional else FrameType.MAX_STREAMS_BIDI
    value = _pull_varint(buf, frame_type)
    if value > MAX_STREAMS_LIMIT:
        raise _bad(frame_type, "MAX_STREAMS above 2^60")
    return value


def pull_data_blocked(buf: Buffer) -> int:
    """DATA_BLOCKED: the connection data limit."""
    return _pull_varint(buf, FrameType.DATA_BLOCKED)


def pull_stream_data_blocked(buf: Buffer) -> tuple[int, int]:
    """STREAM_DATA_BLOCKED: ``(stream_id, limit)``."""
    return _pull_varints(buf, 2, FrameType.STREAM_DATA_BLOCKED)  # type: ignore[return-value]


def pull_streams_blocked(buf: Buffer, unidirectional: bool = False) -> int:
    """STREAMS_BLOCKED (0x16 bidi / 0x17 uni): the stream limit (<= 2^60)."""
    frame_type = FrameType.STREAMS_BLOCKED_UNI if unidirectional else FrameType.STREAMS_BLOCKED_BIDI
    value = _pull_varint(buf, frame_type)
    if value > MAX_STREAMS_LIMIT:
        raise _bad(frame_type, "STREAMS_BLOCKED above 2^60")
    return value


def _pull_new_connection_id_body(buf: Buffer, frame_type: int) -> NewConnectionIdFrame:
    try:
        sequence = buf.pull_uint_var()
        retire_prior_to = buf.pull_uint_var()
        length = buf.pull_uint8()
        if not 1 <= length <= MAX_CID_LENGTH:
            raise _bad(frame_type, "connection ID length not in 1..20")
        if retire_prior_to > sequence:
            raise _bad(frame_type, "retire_prior_to above sequence number")
        cid = buf.pull_bytes(length)
        token = buf.pull_bytes(STATELESS_RESET_TOKEN_LENGTH)
    except BufferReadError:
        raise _bad(frame_type) from None
    return NewConnectionIdFrame(sequence, retire_prior_to, cid, token)


def pull_new_connection_id(buf: Buffer) -> NewConnectionIdFrame:
    """NEW_CONNECTION_ID: ``(sequence, retire_prior_to, connection_id, stateless_reset_token)``."""
    return _pull_new_connection_id_body(buf, FrameType.NEW_CONNECTION_ID)


def pull_retire_connection_id(buf: Buffer) -> int:
    """RETIRE_CONNECTION_ID: the sequence number."""
    return _pull_varint(buf, FrameType.RETIRE_CONNECTION_ID)


def _pull_8_bytes(buf: Buffer, frame_type: int) -> bytes:
    try:
        return buf.pull_bytes(PATH_CHALLENGE_LENGTH)
    except BufferReadError:
        raise _bad(frame_type) from None


def pull_path_challenge(buf: Buffer) -> bytes:
    """PATH_CHALLENGE: 8 bytes of data."""
    return _pull_8_bytes(buf, FrameType.PATH_CHALLENGE)


def pull_path_response(buf: Buffer) -> bytes:
    """PATH_RESPONSE: 8 bytes of data."""
    return _pull_8_bytes(buf, FrameType.PATH_RESPONSE)


def pull_connection_close(buf: Buffer, application: bool = False) -> ConnectionCloseFrame:
    """CONNECTION_CLOSE (0x1c, with the offending frame type) / APPLICATION_CLOSE (0x1d, frame_type None)."""
    frame_type = FrameType.APPLICATION_CLOSE if application else FrameType.CONNECTION_CLOSE
    try:
        error_code = buf.pull_uint_var()
        offending = None if application else buf.pull_uint_var()
        reason = buf.pull_bytes(buf.pull_uint_var())
    except BufferReadError:
        raise _bad(frame_type) from None
    return ConnectionCloseFrame(error_code, offending, reason.decode("utf-8", errors="replace"))


def pull_datagram(buf: Buffer, with_length: bool) -> bytes:
    """DATAGRAM (0x30: to the buffer's end / 0x31: length-prefixed): the payload."""
    try:
        if with_length:
            return buf.pull_bytes(buf.pull_uint_var())
        return buf.pull_bytes(buf.capacity - buf.tell())
    except BufferReadError:
        raise _bad(_DATAGRAM_WITH_LENGTH if with_length else _DATAGRAM, "truncated DATAGRAM") from None


# --- multipath (draft-ietf-quic-multipath-21 §4): "path ID + body" frames return (path_id, body) ---------------


def pull_path_abandon(buf: Buffer) -> tuple[int, int]:
    """PATH_ABANDON: ``(path_id, error_code)``."""
    return _pull_varints(buf, 2, FrameType.PATH_ABANDON)  # type: ignore[return-value]


def pull_path_status(buf: Buffer, available: bool) -> tuple[int, int]:
    """PATH_STATUS_AVAILABLE / PATH_STATUS_BACKUP: ``(path_id, status_sequence_number)``."""
    frame_type = FrameType.PATH_STATUS_AVAILABLE if available else FrameType.PATH_STATUS_BACKUP
    return _pull_varints(buf, 2, frame_type)  # type: ignore[return-value]


def pull_path_new_connection_id(buf: Buffer) -> tuple[int, NewConnectionIdFrame]:
    """PATH_NEW_CONNECTION_ID: ``(path_id, NewConnectionIdFrame)``."""
    path_id = _pull_varint(buf, FrameType.PATH_NEW_CONNECTION_ID)
    return path_id, _pull_new_connection_id_body(buf, FrameType.PATH_NEW_CONNECTION_ID)


def pull_path_retire_connection_id(buf: Buffer) -> tuple[int, int]:
    """PATH_RETIRE_CONNECTION_ID: ``(path_id, sequence)``."""
    return _pull_varints(buf, 2, FrameType.PATH_RETIRE_CONNECTION_ID)  # type: ignore[return-value]


def pull_max_path_id(buf: Buffer) -> int:
    """MAX_PATH_ID: the maximum path ID (> 2^32-1 is PROTOCOL_VIOLATION, draft-21 §4.6)."""
    value = _pull_varint(buf, FrameType.MAX_PATH_ID)
    if value > MAX_PATH_ID_LIMIT:
        raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "MAX_PATH_ID above 2^32-1", FrameType.MAX_PATH_ID)
    return value


def pull_paths_blocked(buf: Buffer) -> int:
    """PATHS_BLOCKED: the maximum path ID the sender was limited by."""
    return _pull_varint(buf, FrameType.PATHS_BLOCKED)


def pull_path_cids_blocked(buf: Buffer) -> tuple[int, int]:
    """PATH_CIDS_BLOCKED: ``(path_id, next_sequence_number)``."""
    return _pull_varints(buf, 2, FrameType.PATH_CIDS_BLOCKED)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# Writers and sizes
# ---------------------------------------------------------------------------------------------------------------

AckRanges = Iterable[tuple[int, int]]  # a RangeSet, or ascending (start, stop) pairs


def _data_room(room: int) -> int:
    """Largest ``n`` with ``size_uint_var(n) + n <= room`` (0 when nothing fits)."""
    if room <= 64:
        return room - 1 if room > 1 else 0
    if room <= 16385:
        return room - 2
    # just past a boundary the longer length field costs more than it gains: the previous maximum still wins
    if room <= (1 << 30) + 3:
        return room - 4 if room > 16387 else 16383
    return room - 8 if room > (1 << 30) + 7 else (1 << 30) - 1


def push_padding(buf: Buffer, n: int) -> None:
    """``n`` bytes of PADDING (each zero byte is one frame)."""
    if n > 0:
        buf.push_bytes(bytes(n))


def push_ping(buf: Buffer) -> None:
    buf.push_uint_var(FrameType.PING)


def _ack_ranges(ranges: AckRanges, max_ranges: int | None) -> tuple[RangeSet | list | tuple, int]:
    """(an indexable, reversible view of ``ranges``, how many of the newest to send)."""
    if type(ranges) is not RangeSet and not isinstance(ranges, (list, tuple)):
        ranges = list(ranges)
    n = len(ranges)
    if not n:
        raise ValueError("an ACK frame needs at least one range")
    if max_ranges is not None and n > max_ranges:
        if max_ranges < 1:
            raise ValueError("max_ranges must be at least 1")
        n = max_ranges
    return ranges, n


def _ack_fit(
    ranges: RangeSet | list | tuple, n: int, ack_delay: int, ecn: tuple[int, int, int] | None, path_id: int | None,
    max_size: int | None,
) -> tuple[int, int]:
    """(ranges sent, frame size) when sending the newest of ``n`` ranges that fit in ``max_size`` (None: all)."""
    it = reversed(ranges)
    start, stop = next(it)
    size = size_uint_var(stop - 1) + size_uint_var(ack_delay) + size_uint_var(stop - 1 - start)
    if path_id is None:
        size += 1  # ACK, ACK_ECN
    else:
        size += size_uint_var(_PATH_ACK if ecn is None else _PATH_ACK_ECN) + size_uint_var(path_id)
    if ecn is not None:
        size += size_uint_var(ecn[0]) + size_uint_var(ecn[1]) + size_uint_var(ecn[2])
    count = 1
    while count < n:
        lower_start, lower_stop = next(it)
        cost = size_uint_var(start - lower_stop - 1) + size_uint_var(lower_stop - 1 - lower_start)
        if max_size is not None and size + cost + size_uint_var(count) > max_size:
            break
        size += cost
        count += 1
        start = lower_start
    return count, size + size_uint_var(count - 1)


def ack_frame_size(
    ranges: AckRanges, ack_delay_raw: int, ecn: tuple[int, int, int] | None = None, path_id: int | None = None,
    max_ranges: int | None = None,
) -> int:
    """Bytes ``push_ack`` writes for these arguments without a byte budget."""
    ranges, n = _ack_ranges(ranges, max_ranges)
    return _ack_fit(ranges, n, ack_delay_raw, ecn, path_id, None)[1]


def push_ack(
    buf: Buffer, ranges: AckRanges, ack_delay_raw: int, ecn: tuple[int, int, int] | None = None,
    path_id: int | None = None, max_ranges: int | None = None, max_size: int | None = None,
) -> int:
    """ACK / ACK_ECN, or PATH_ACK / PATH_ACK_ECN when ``path_id`` is given.

    ``ranges``: ascending, disjoint, non-adjacent ``(start, stop)`` (a RangeSet or a sequence). The newest ranges
    are kept: at most ``max_ranges`` of them and, with ``max_size``, only as many as fit in that many bytes.
    Returns the number of ranges written; 0 means not even the newest range fits ``max_size`` and nothing was
    written.
    """
    ranges, n = _ack_ranges(ranges, max_ranges)
    if max_size is not None:
        # every field takes at most 8 bytes: only a tight budget needs exact sizing
        fields = 2 * n + 3 + (path_id is not None) + (3 if ecn is not None else 0)
        if fields << 3 > max_size:
            n, size = _ack_fit(ranges, n, ack_delay_raw, ecn, path_id, max_size)
            if size > max_size:
                return 0
    push = buf.push_uint_var
    if path_id is None:
        push(_ACK if ecn is None else _ACK_ECN)
    else:
        push(_PATH_ACK if ecn is None else _PATH_ACK_ECN)
        push(path_id)
    start, stop = ranges[-1]
    push(stop - 1)
    push(ack_delay_raw)
    push(n - 1)
    push(stop - 1 - start)
    if n > 1:
        it = reversed(ranges)
        next(it)
        for _ in range(n - 1):
            lower_start, lower_stop = next(it)
            push(start - lower_stop - 1)  # gap
            push(lower_stop - 1 - lower_start)  # ACK range length
            start = lower_start
    if ecn is not None:
        push(ecn[0])
        push(ecn[1])
        push(ecn[2])
    return n


def push_reset_stream(buf: Buffer, stream_id: int, error_code: int, final_size: int) -> None:
    buf.push_uint_var(FrameType.RESET_STREAM)
    buf.push_uint_var(stream_id)
    buf.push_uint_var(error_code)
    buf.push_uint_var(final_size)


def push_stop_sending(buf: Buffer, stream_id: int, error_code: int) -> None:
    buf.push_uint_var(FrameType.STOP_SENDING)
    buf.push_uint_var(stream_id)
    buf.push_uint_var(error_code)


def crypto_frame_overhead(offset: int, length: int) -> int:
    """Bytes of a CRYPTO frame besides its data."""
    return 1 + size_uint_var(offset) + size_uint_var(length)


def crypto_data_room(offset: int, room: int) -> int:
    """Most CRYPTO data bytes at ``offset`` that fit in ``room`` bytes (0 when none)."""
    return _data_room(room - 1 - size_uint_var(offset))


def push_crypto(buf: Buffer, offset: int, data: bytes) -> None:
    push = buf.push_uint_var
    push(_CRYPTO)
    push(offset)
    push(len(data))
    buf.push_bytes(data)


def push_new_token(buf: Buffer, token: bytes) -> None:
    buf.push_uint_var(FrameType.NEW_TOKEN)
    buf.push_uint_var(len(token))
    buf.push_bytes(token)


def stream_frame_overhead(stream_id: int, offset: int, length: int, with_length: bool = True) -> int:
    """Bytes of a STREAM frame besides its data: type + stream ID + offset (omitted at 0) + length."""
    size = 1 + size_uint_var(stream_id)
    if offset:
        size += size_uint_var(offset)
    if with_length:
        size += size_uint_var(length)
    return size


def stream_data_room(stream_id: int, offset: int, room: int, with_length: bool = True) -> int:
    """Most STREAM data bytes that fit in ``room`` bytes (0 when none)."""
    room -= 1 + size_uint_var(stream_id)
    if offset:
        room -= size_uint_var(offset)
    if not with_length:
        return room if room > 0 else 0
    return _data_room(room)


def push_stream(
    buf: Buffer, stream_id: int, offset: int, data: bytes, fin: bool = False, with_length: bool = True
) -> None:
    """STREAM frame; the OFF bit is set only for a non-zero offset. ``with_length=False``: last frame in packet."""
    push = buf.push_uint_var
    frame_type = _STREAM
    if offset:
        frame_type |= STREAM_OFF
    if with_length:
        frame_type |= STREAM_LEN
    if fin:
        frame_type |= STREAM_FIN
    push(frame_type)
    push(stream_id)
    if offset:
        push(offset)
    if with_length:
        push(len(data))
    buf.push_bytes(data)


def push_max_data(buf: Buffer, maximum: int) -> None:
    buf.push_uint_var(FrameType.MAX_DATA)
    buf.push_uint_var(maximum)


def push_max_stream_data(buf: Buffer, stream_id: int, maximum: int) -> None:
    buf.push_uint_var(FrameType.MAX_STREAM_DATA)
    buf.push_uint_var(stream_id)
    buf.push_uint_var(maximum)


def push_max_streams(buf: Buffer, maximum: int, unidirectional: bool = False) -> None:
    buf.push_uint_var(FrameType.MAX_STREAMS_UNI if unidirectional else FrameType.MAX_STREAMS_BIDI)
    buf.push_uint_var(maximum)


def push_data_blocked(buf: Buffer, limit: int) -> None:
    buf.push_uint_var(FrameType.DATA_BLOCKED)
    buf.push_uint_var(limit)


def push_stream_data_blocked(buf: Buffer, stream_id: int, limit: int) -> None:
    buf.push_uint_var(FrameType.STREAM_DATA_BLOCKED)
    buf.push_uint_var(stream_id)
    buf.push_uint_var(limit)


def push_streams_blocked(buf: Buffer, limit: int, unidirectional: bool = False) -> None:
    buf.push_uint_var(FrameType.STREAMS_BLOCKED_UNI if unidirectional else FrameType.STREAMS_BLOCKED_BIDI)
    buf.push_uint_var(limit)


def _push_new_connection_id_body(
    buf: Buffer, sequence: int, retire_prior_to: int, connection_id: bytes, stateless_reset_token: bytes
) -> None:
    if not 1 <= len(connection_id) <= MAX_CID_LENGTH or len(stateless_reset_token) != STATELESS_RESET_TOKEN_LENGTH:
        raise ValueError("bad connection ID or stateless reset token length")
    buf.push_uint_var(sequence)
    buf.push_uint_var(retire_prior_to)
    buf.push_uint8(len(connection_id))
    buf.push_bytes(connection_id)
    buf.push_bytes(stateless_reset_token)


def push_new_connection_id(
    buf: Buffer, sequence: int, retire_prior_to: int, connection_id: bytes, stateless_reset_token: bytes
) -> None:
    buf.push_uint_var(FrameType.NEW_CONNECTION_ID)
    _push_new_connection_id_body(buf, sequence, retire_prior_to, connection_id, stateless_reset_token)


def push_retire_connection_id(buf: Buffer, sequence: int) -> None:
    buf.push_uint_var(FrameType.RETIRE_CONNECTION_ID)
    buf.push_uint_var(sequence)


def push_path_challenge(buf: Buffer, data: bytes) -> None:
    if len(data) != PATH_CHALLENGE_LENGTH:
        raise ValueError("PATH_CHALLENGE data is 8 bytes")
    buf.push_uint_var(FrameType.PATH_CHALLENGE)
    buf.push_bytes(data)


def push_path_response(buf: Buffer, data: bytes) -> None:
    if len(data) != PATH_CHALLENGE_LENGTH:
        raise ValueError("PATH_RESPONSE data is 8 bytes")
    buf.push_uint_var(FrameType.PATH_RESPONSE)
    buf.push_bytes(data)


def push_connection_close(
    buf: Buffer, error_code: int, frame_type: int | None = None, reason: str | bytes = "", application: bool = False
) -> None:
    """CONNECTION_CLOSE (0x1c; ``frame_type`` None is sent as 0) or, with ``application``, 0x1d."""
    raw = reason.encode("utf-8") if isinstance(reason, str) else reason
    if application:
        buf.push_uint_var(FrameType.APPLICATION_CLOSE)
        buf.push_uint_var(error_code)
    else:
        buf.push_uint_var(FrameType.CONNECTION_CLOSE)
        buf.push_uint_var(error_code)
        buf.push_uint_var(frame_type or 0)
    buf.push_uint_var(len(raw))
    buf.push_bytes(raw)


def push_handshake_done(buf: Buffer) -> None:
    buf.push_uint_var(FrameType.HANDSHAKE_DONE)


def datagram_frame_overhead(length: int, with_length: bool = True) -> int:
    """Bytes of a DATAGRAM frame besides its payload."""
    return 1 + size_uint_var(length) if with_length else 1


def datagram_data_room(room: int, with_length: bool = True) -> int:
    """Largest DATAGRAM payload that fits in ``room`` bytes (0 when none)."""
    if not with_length:
        return room - 1 if room > 1 else 0
    return _data_room(room - 1)


def push_datagram(buf: Buffer, data: bytes, with_length: bool = True) -> None:
    if with_length:
        buf.push_uint_var(_DATAGRAM_WITH_LENGTH)
        buf.push_uint_var(len(data))
    else:
        buf.push_uint_var(_DATAGRAM)
    buf.push_bytes(data)


# --- multipath ---------------------------------------------------------------------------------------------------


def push_path_abandon(buf: Buffer, path_id: int, error_code: int) -> None:
    buf.push_uint_var(FrameType.PATH_ABANDON)
    buf.push_uint_var(path_id)
    buf.push_uint_var(error_code)


def push_path_status(buf: Buffer, path_id: int, sequence: int, available: bool) -> None:
    """PATH_STATUS_AVAILABLE (``available``) or PATH_STATUS_BACKUP."""
    buf.push_uint_var(FrameType.PATH_STATUS_AVAILABLE if available else FrameType.PATH_STATUS_BACKUP)
    buf.push_uint_var(path_id)
    buf.push_uint_var(sequence)


def push_path_new_connection_id(
    buf: Buffer, path_id: int, sequence: int, retire_prior_to: int, connection_id: bytes, stateless_reset_token: bytes
) -> None:
    buf.push_uint_var(FrameType.PATH_NEW_CONNECTION_ID)
    buf.push_uint_var(path_id)
    _push_new_connection_id_body(buf, sequence, retire_prior_to, connection_id, stateless_reset_token)


def push_path_retire_connection_id(buf: Buffer, path_id: int, sequence: int) -> None:
    buf.push_uint_var(FrameType.PATH_RETIRE_CONNECTION_ID)
    buf.push_uint_var(path_id)
    buf.push_uint_var(sequence)


def push_max_path_id(buf: Buffer, max_path_id: int) -> None:
    buf.push_uint_var(FrameType.MAX_PATH_ID)
    buf.push_uint_var(max_path_id)


def push_paths_blocked(buf: Buffer, max_path_id: int) -> None:
    buf.push_uint_var(FrameType.PATHS_BLOCKED)
    buf.push_uint_var(max_path_id)


def push_path_cids_blocked(buf: Buffer, path_id: int, next_sequence: int) -> None:
    buf.push_uint_var(FrameType.PATH_CIDS_BLOCKED)
    buf.push_uint_var(path_id)
    buf.push_uint_var(next_sequence)
