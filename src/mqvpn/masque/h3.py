"""Sans-I/O HTTP/3 connection (RFC 9114) with what CONNECT-IP needs: extended CONNECT (RFC 9220) and HTTP
Datagrams (RFC 9297 §2.1), over our ``QuicConnection``.

Feed every QUIC event to ``handle_event``; it returns the HTTP/3 events it caused (it never raises for anything the
peer sends). QUIC events stay the caller's to act on as well (``HandshakeCompleted``, ``ConnectionTerminated``).
Writes go to the QUIC connection; the caller transmits as usual.

Errors the peer causes:

- a connection error (RFC 9114 §8) closes the QUIC connection with the H3 code as an application close; the caller
  sees the QUIC ``ConnectionTerminated``, and ``handle_event`` returns no events from then on;
- a malformed request or response is a stream error: the stream is reset and STOP_SENDING'd with
  H3_MESSAGE_ERROR, the connection lives on, and ``MessageRejected`` tells what was wrong.

HTTP Datagrams bypass events: the connection installs itself as ``quic.datagram_handler`` and hands each payload
(after the quarter stream ID) to the handler registered for its stream. Received trailer sections are validated
and surfaced as ``HeadersReceived(trailers=True)``.

Per stream, the receive side of a request stream runs HEADERS -> BODY -> TRAILERS (a client stays in HEADERS
across 1xx responses; a CONNECT stream never leaves BODY) and ends in DONE: FIN, reset, or abandoned by us.
Its send side runs IDLE -> OPEN (final header section sent) -> CLOSED (FIN, reset, or STOP_SENDING received).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from pylsqpack import (
    Decoder,
    DecoderStreamError,
    Encoder,
    EncoderStreamError,
    StreamBlocked,
)

from ..quic.buffer import encode_uint_var
from ..quic.events import ConnectionTerminated, StopSendingReceived, StreamDataReceived
from ..quic.events import StreamReset as QuicStreamReset
from ..quic.rangeset import RangeSet
from .h3frames import (
    BOOLEAN_SETTINGS,
    HTTP2_FRAME_TYPES,
    MAX_QUARTER_STREAM_ID,
    ErrorCode,
    FrameReader,
    FrameType,
    H3Error,
    MessageError,
    Setting,
    StreamType,
    decode_settings,
    decode_single_varint,
    encode_frame,
    encode_settings,
    field_section_size,
    grease_id,
    read_varint,
    validate_request,
    validate_response,
    validate_trailers,
)

__all__ = [
    "H3Connection",
    "H3Event",
    "HeadersReceived",
    "DataReceived",
    "StreamReset",
    "StreamStopped",
    "MessageRejected",
    "SettingsReceived",
    "GoawayReceived",
    "H3StateError",
    "ErrorCode",
    "Setting",
]

_log = logging.getLogger(__name__)

DEFAULT_MAX_FIELD_SECTION_SIZE = 16384  # bytes (RFC 9114 §4.2.2 accounting); CONNECT-IP needs a few hundred
MAX_CONTROL_FRAME = 16384  # the largest SETTINGS / GOAWAY / ... payload we buffer
QPACK_ENCODER_MAX_CAPACITY = 65536  # a peer allowing a larger dynamic table gets static-only encoding from us
QPACK_ENCODER_MAX_BLOCKED = 1000


# ----------------------------------------------------------------------------------------------------------------
# events and errors
# ----------------------------------------------------------------------------------------------------------------


class H3Event:
    __slots__ = ()


@dataclass(slots=True)
class HeadersReceived(H3Event):
    """A header section: a request (server), an interim or final response (client), or a trailer section."""

    stream_id: int
    headers: list[tuple[bytes, bytes]]
    stream_ended: bool
    trailers: bool = False


@dataclass(slots=True)
class DataReceived(H3Event):
    """Content bytes (DATA frame payload, as it arrives); ``data`` may be empty when only the FIN is reported."""

    stream_id: int
    data: bytes
    stream_ended: bool


@dataclass(slots=True)
class StreamReset(H3Event):
    """The peer reset its sending side of a request stream (RESET_STREAM)."""

    stream_id: int
    error_code: int


@dataclass(slots=True)
class StreamStopped(H3Event):
    """The peer sent STOP_SENDING: our sending side of the stream was reset (by the transport), sends now fail."""

    stream_id: int
    error_code: int


@dataclass(slots=True)
class MessageRejected(H3Event):
    """We reset a request stream because of what the peer sent on it (malformed message: H3_MESSAGE_ERROR; a
    stream ended without a request: H3_REQUEST_INCOMPLETE). Both directions of the stream are closed."""

    stream_id: int
    error_code: int
    reason: str


@dataclass(slots=True)
class SettingsReceived(H3Event):
    settings: dict[int, int]


@dataclass(slots=True)
class GoawayReceived(H3Event):
    """Client: requests on stream ids >= ``last_id`` will not be processed. Server: a push id (we never push)."""

    last_id: int


class H3StateError(RuntimeError):
    """A send that the connection's state does not allow (closed stream or connection, extended CONNECT before the
    peer enabled it, after GOAWAY, ...)."""


# ----------------------------------------------------------------------------------------------------------------
# per-stream state
# ----------------------------------------------------------------------------------------------------------------


class _Kind(Enum):
    REQUEST = "request"
    UNTYPED = "unidirectional, type not read yet"
    CONTROL = "control"
    ENCODER = "QPACK encoder"
    DECODER = "QPACK decoder"
    IGNORED = "unknown type, ignored"


class _Recv(Enum):
    HEADERS = "waiting for a header section"
    BODY = "content"
    TRAILERS = "after the trailer section"
    DONE = "ended, reset or abandoned"


class _Send(Enum):
    IDLE = "no final header section sent"
    OPEN = "final header section sent"
    CLOSED = "FIN sent, reset, or stopped by the peer"


_CRITICAL_TYPES = {StreamType.CONTROL: _Kind.CONTROL, StreamType.QPACK_ENCODER: _Kind.ENCODER,
                   StreamType.QPACK_DECODER: _Kind.DECODER}

_FU = ErrorCode.H3_FRAME_UNEXPECTED
_HTTP2_FORBIDDEN = {t: _FU for t in HTTP2_FRAME_TYPES}
# frame types whose mere presence on a stream is a connection error, by stream and by our role
_CONTROL_FORBIDDEN_AT_SERVER = {FrameType.DATA: _FU, FrameType.HEADERS: _FU, FrameType.PUSH_PROMISE: _FU,
                                **_HTTP2_FORBIDDEN}
_CONTROL_FORBIDDEN_AT_CLIENT = {**_CONTROL_FORBIDDEN_AT_SERVER, FrameType.MAX_PUSH_ID: _FU}
_REQUEST_FORBIDDEN_AT_SERVER = {FrameType.CANCEL_PUSH: _FU, FrameType.SETTINGS: _FU, FrameType.GOAWAY: _FU,
                                FrameType.MAX_PUSH_ID: _FU, FrameType.PUSH_PROMISE: _FU, **_HTTP2_FORBIDDEN}
# we never send MAX_PUSH_ID, so every push ID a server names is above the maximum (RFC 9114 §7.2.5)
_REQUEST_FORBIDDEN_AT_CLIENT = {**_REQUEST_FORBIDDEN_AT_SERVER, FrameType.PUSH_PROMISE: ErrorCode.H3_ID_ERROR}


class _Stream:
    __slots__ = ("stream_id", "kind", "reader", "head", "recv", "send", "blocked", "fin_received", "is_connect",
                 "prefix")

    def __init__(self, stream_id: int, kind: _Kind, reader: FrameReader | None = None) -> None:
        self.stream_id = stream_id
        self.kind = kind
        self.reader = reader
        self.head = b""  # unidirectional: the stream type's bytes so far
        self.recv = _Recv.HEADERS
        self.send = _Send.IDLE
        self.blocked = False  # a header section waits for QPACK encoder-stream data
        self.fin_received = False
        self.is_connect = False  # CONNECT request: no trailers, only DATA after the header sections
        self.prefix = encode_uint_var(stream_id >> 2) if kind is _Kind.REQUEST else b""  # HTTP Datagram qsid


# ----------------------------------------------------------------------------------------------------------------
# the connection
# ----------------------------------------------------------------------------------------------------------------


class H3Connection:
    """HTTP/3 over one QUIC connection. ``is_client`` defaults to the QUIC connection's role.

    ``max_field_section_size``, ``qpack_max_table_capacity`` and ``qpack_blocked_streams`` are what we accept (and
    announce in SETTINGS); ``enable_connect_protocol`` announces SETTINGS_ENABLE_CONNECT_PROTOCOL=1, without which a
    server rejects ``:protocol``. H3_DATAGRAM=1 is announced when the QUIC configuration offers DATAGRAM frames.
    """

    def __init__(
        self,
        quic,
        *,
        is_client: bool | None = None,
        max_field_section_size: int = DEFAULT_MAX_FIELD_SECTION_SIZE,
        qpack_max_table_capacity: int = 4096,
        qpack_blocked_streams: int = 16,
        enable_connect_protocol: bool = True,
    ) -> None:
        self._quic = quic
        self.is_client = quic.is_client if is_client is None else is_client
        self._max_field_section_size = max_field_section_size
        self._connect_protocol = enable_connect_protocol
        self._qpack_capacity = qpack_max_table_capacity
        self._qpack_blocked_limit = qpack_blocked_streams
        self._blocked_count = 0  # request streams waiting for QPACK encoder-stream data
        self._decoder = Decoder(qpack_max_table_capacity, qpack_blocked_streams)
        self._encoder = Encoder()
        self._datagrams_offered = bool(getattr(quic.configuration, "max_datagram_frame_size", None))
        settings = {
            Setting.QPACK_MAX_TABLE_CAPACITY: qpack_max_table_capacity,
            Setting.QPACK_BLOCKED_STREAMS: qpack_blocked_streams,
            Setting.MAX_FIELD_SECTION_SIZE: max_field_section_size,
            Setting.ENABLE_CONNECT_PROTOCOL: int(enable_connect_protocol),
        }
        if self._datagrams_offered:
            settings[Setting.H3_DATAGRAM] = 1
        settings[grease_id(random.randrange(1 << 16))] = random.getrandbits(30)  # RFC 9114 §7.2.4.1
        self.local_settings: dict[int, int] = settings
        self._peer_settings: dict[int, int] | None = None
        self._datagrams_negotiated = False

        self._streams: dict[int, _Stream] = {}
        self._seen_peer_streams = (RangeSet(), RangeSet())  # indexes (id >> 2) of peer bidi / uni streams seen
        self._local_uni: dict[StreamType, int] = {}  # our control and QPACK streams, once open
        self._uni_backlog: dict[StreamType, bytes] = {}  # QPACK instructions written before their stream opened
        self._peer_critical: dict[_Kind, int] = {}  # the peer's control and QPACK streams
        client = self.is_client
        self._control_forbidden = _CONTROL_FORBIDDEN_AT_CLIENT if client else _CONTROL_FORBIDDEN_AT_SERVER
        self._request_forbidden = _REQUEST_FORBIDDEN_AT_CLIENT if client else _REQUEST_FORBIDDEN_AT_SERVER
        self._closed = False
        self._goaway_sent: int | None = None
        self._goaway_received: int | None = None
        self._max_push_id: int | None = None  # server: the client's MAX_PUSH_ID (we never push)
        self._last_peer_request = -4  # server: the highest request stream id accepted

        # HTTP Datagrams: quarter stream ID -> handler (hot path, see _receive_datagram)
        self._datagram_handlers: dict[int, Callable[[bytes], None]] = {}
        self.datagrams_dropped_unknown_stream = 0
        self.datagrams_dropped_not_negotiated = 0
        quic.datagram_handler = self._receive_datagram_early

        self._open_local_streams()

    # ------------------------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------------------------

    @property
    def quic(self):
        """The QUIC connection this HTTP/3 connection runs on."""
        return self._quic

    @property
    def settings_received(self) -> bool:
        return self._peer_settings is not None

    @property
    def peer_settings(self) -> dict[int, int] | None:
        """The peer's SETTINGS (identifier -> value, unknown ones included); None before they arrived."""
        return self._peer_settings

    @property
    def peer_supports_extended_connect(self) -> bool:
        """The peer sent SETTINGS_ENABLE_CONNECT_PROTOCOL=1 (a client may send ``:protocol`` only then)."""
        return self._peer_settings is not None and self._peer_settings.get(Setting.ENABLE_CONNECT_PROTOCOL) == 1

    @property
    def datagrams_negotiated(self) -> bool:
        """H3_DATAGRAM=1 sent and received (the peer's value is only accepted with its QUIC DATAGRAM parameter)."""
        return self._datagrams_negotiated

    @property
    def goaway_received(self) -> int | None:
        return self._goaway_received

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------------------------------------------------
    # input
    # ------------------------------------------------------------------------------------------------------------

    def handle_event(self, event) -> list[H3Event]:
        """Consume one QUIC event; return the HTTP/3 events it caused."""
        if self._closed:
            return []
        if len(self._local_uni) < 3:
            self._open_local_streams()
        events: list[H3Event] = []
        try:
            if isinstance(event, StreamDataReceived):
                self._receive_stream_data(event.stream_id, event.data, event.end_stream, events)
            elif isinstance(event, QuicStreamReset):
                self._receive_reset(event.stream_id, event.error_code, events)
            elif isinstance(event, StopSendingReceived):
                self._receive_stop_sending(event.stream_id, event.error_code, events)
            elif isinstance(event, ConnectionTerminated):
                self._shutdown()
        except H3Error as exc:
            self._connection_error(exc.error_code, exc.reason)
            return []
        return events

    def _receive_stream_data(self, stream_id: int, data: bytes, fin: bool, events: list) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._new_peer_stream(stream_id)
            if stream is None:
                return
        if stream.kind is _Kind.REQUEST:
            if stream.recv is _Recv.DONE:
                return  # abandoned: the transport may still hand over what it had queued
            if data:
                stream.reader.feed(data)
            if fin:
                stream.fin_received = True
            self._process_request(stream, events)
        else:
            self._receive_uni(stream, data, fin, events)

    def _new_peer_stream(self, stream_id: int) -> _Stream | None:
        """The state for a stream the peer just opened; None for one to ignore (ours, or seen and forgotten)."""
        if (stream_id & 1) == (0 if self.is_client else 1):
            return None  # one of ours, finished and forgotten
        uni = (stream_id >> 1) & 1
        seen = self._seen_peer_streams[uni]
        if (stream_id >> 2) in seen:
            return None
        seen.add(stream_id >> 2)
        if uni:
            stream = _Stream(stream_id, _Kind.UNTYPED)
        elif self.is_client:
            raise H3Error(ErrorCode.H3_STREAM_CREATION_ERROR, "server-initiated bidirectional stream")
        elif self._goaway_sent is not None and stream_id >= self._goaway_sent:
            self._quic_stop(stream_id, ErrorCode.H3_REQUEST_REJECTED)
            self._quic_reset(stream_id, ErrorCode.H3_REQUEST_REJECTED)
            return None
        else:
            stream = _Stream(stream_id, _Kind.REQUEST, FrameReader(self._max_field_section_size,
                                                                   self._request_forbidden))
            self._last_peer_request = max(self._last_peer_request, stream_id)
        self._streams[stream_id] = stream
        return stream

    # --- unidirectional streams ---

    def _receive_uni(self, stream: _Stream, data: bytes, fin: bool, events: list) -> None:
        if stream.kind is _Kind.UNTYPED:
            data = stream.head + data
            parsed = read_varint(data, 0)
            if parsed is None:
                stream.head = data
                if fin:  # closed before its type arrived: tolerated (RFC 9114 §6.2)
                    self._streams.pop(stream.stream_id, None)
                return
            stream.head = b""
            self._set_stream_type(stream, parsed[0], fin)
            data = data[parsed[1]:]
        kind = stream.kind
        if kind is _Kind.CONTROL:
            stream.reader.feed(data)
            self._process_control(stream.reader, events)
        elif kind is _Kind.ENCODER:
            if data:
                self._receive_encoder_instructions(data, events)
        elif kind is _Kind.DECODER:
            if data:
                try:
                    self._encoder.feed_decoder(data)
                except DecoderStreamError as exc:
                    raise H3Error(ErrorCode.QPACK_DECODER_STREAM_ERROR, str(exc)) from None
        else:
            return  # ignored stream type
        if fin:
            raise H3Error(ErrorCode.H3_CLOSED_CRITICAL_STREAM, f"peer closed its {kind.value} stream")

    def _set_stream_type(self, stream: _Stream, stream_type: int, fin: bool) -> None:
        if stream_type == StreamType.PUSH:
            if self.is_client:
                raise H3Error(ErrorCode.H3_ID_ERROR, "push stream, but we never sent MAX_PUSH_ID")
            raise H3Error(ErrorCode.H3_STREAM_CREATION_ERROR, "push stream from a client")
        kind = _CRITICAL_TYPES.get(stream_type)
        if kind is None:  # unknown or reserved type: RFC 9114 §6.2
            stream.kind = _Kind.IGNORED
            self._streams.pop(stream.stream_id, None)
            if not fin:
                self._quic_stop(stream.stream_id, ErrorCode.H3_STREAM_CREATION_ERROR)
            return
        if kind in self._peer_critical:
            raise H3Error(ErrorCode.H3_STREAM_CREATION_ERROR, f"second {kind.value} stream")
        self._peer_critical[kind] = stream.stream_id
        stream.kind = kind
        if kind is _Kind.CONTROL:
            stream.reader = FrameReader(MAX_CONTROL_FRAME, self._control_forbidden,
                                        first_frame=(FrameType.SETTINGS, ErrorCode.H3_MISSING_SETTINGS))

    def _process_control(self, reader: FrameReader, events: list) -> None:
        while (piece := reader.pull()) is not None:
            frame_type, payload, _ = piece
            if frame_type == FrameType.SETTINGS:
                if self._peer_settings is not None:
                    raise H3Error(ErrorCode.H3_FRAME_UNEXPECTED, "second SETTINGS frame")
                self._receive_settings(payload, events)
            elif frame_type == FrameType.GOAWAY:
                self._receive_goaway(decode_single_varint(payload, frame_type), events)
            elif frame_type == FrameType.MAX_PUSH_ID:  # reaches a server only (see _CONTROL_FORBIDDEN_AT_CLIENT)
                value = decode_single_varint(payload, frame_type)
                if self._max_push_id is not None and value < self._max_push_id:
                    raise H3Error(ErrorCode.H3_ID_ERROR, "MAX_PUSH_ID decreased")
                self._max_push_id = value
            elif frame_type == FrameType.CANCEL_PUSH:
                decode_single_varint(payload, frame_type)
                # RFC 9114 §7.2.3: a push ID above the maximum (a client that never sent MAX_PUSH_ID), or one never
                # promised (a server that never pushes), is H3_ID_ERROR
                raise H3Error(ErrorCode.H3_ID_ERROR, "CANCEL_PUSH for a push that cannot exist")
            # other types: unknown or reserved, ignored (RFC 9114 §9)

    def _receive_settings(self, payload: bytes, events: list) -> None:
        settings = decode_settings(payload)
        for key in BOOLEAN_SETTINGS:
            if settings.get(key, 0) > 1:
                raise H3Error(ErrorCode.H3_SETTINGS_ERROR, f"{key.name}={settings[key]}")
        peer_datagrams = settings.get(Setting.H3_DATAGRAM) == 1
        if peer_datagrams and not self._quic.peer_max_datagram_frame_size:
            raise H3Error(ErrorCode.H3_SETTINGS_ERROR, "H3_DATAGRAM=1 without the QUIC DATAGRAM transport parameter")
        self._peer_settings = settings
        capacity = settings.get(Setting.QPACK_MAX_TABLE_CAPACITY, 0)
        if 0 < capacity <= QPACK_ENCODER_MAX_CAPACITY:
            blocked = min(settings.get(Setting.QPACK_BLOCKED_STREAMS, 0), QPACK_ENCODER_MAX_BLOCKED)
            self._write_uni(StreamType.QPACK_ENCODER, self._encoder.apply_settings(capacity, blocked))
        if self._datagrams_offered and peer_datagrams:
            self._datagrams_negotiated = True
            self._quic.datagram_handler = self._receive_datagram
        events.append(SettingsReceived(dict(settings)))

    def _receive_goaway(self, last_id: int, events: list) -> None:
        if self.is_client and last_id % 4:
            raise H3Error(ErrorCode.H3_ID_ERROR, f"GOAWAY names stream {last_id}, not a client request stream")
        if self._goaway_received is not None and last_id > self._goaway_received:
            raise H3Error(ErrorCode.H3_ID_ERROR, f"GOAWAY id increased from {self._goaway_received} to {last_id}")
        self._goaway_received = last_id
        events.append(GoawayReceived(last_id))

    def _receive_encoder_instructions(self, data: bytes, events: list) -> None:
        try:
            unblocked = self._decoder.feed_encoder(data)
        except EncoderStreamError as exc:
            raise H3Error(ErrorCode.QPACK_ENCODER_STREAM_ERROR, str(exc)) from None
        for stream_id in unblocked:
            headers = self._decode(stream_id, None)
            stream = self._streams.get(stream_id)
            if headers is None or stream is None or stream.recv is _Recv.DONE:
                continue
            self._set_blocked(stream, False)
            last = self._header_section(stream, headers, events)
            if stream.recv is not _Recv.DONE:
                self._process_request(stream, events, last)

    def _decode(self, stream_id: int, block: bytes | None) -> list[tuple[bytes, bytes]] | None:
        """Decode a header block (``block`` None: resume a blocked one); None while it is blocked."""
        try:
            if block is None:
                control, headers = self._decoder.resume_header(stream_id)
            else:
                control, headers = self._decoder.feed_header(stream_id, block)
        except StreamBlocked:
            # pylsqpack reports a truncated block as blocked too. A block that just got unblocked, or whose Required
            # Insert Count is 0 (first byte 0), cannot be waiting for the dynamic table: it is truncated.
            if not block or block[0] == 0:
                raise H3Error(ErrorCode.QPACK_DECOMPRESSION_FAILED, "truncated header block") from None
            return None
        except ValueError as exc:  # DecompressionFailed, or a state pylsqpack refuses
            raise H3Error(ErrorCode.QPACK_DECOMPRESSION_FAILED, str(exc)) from None
        if control:
            self._write_uni(StreamType.QPACK_DECODER, control)
        return headers

    def _set_blocked(self, stream: _Stream, blocked: bool) -> None:
        """Count the streams waiting for QPACK: more than we announced is QPACK_DECOMPRESSION_FAILED (RFC 9204
        §2.1.2). pylsqpack bounds the truly blocked ones itself; this also bounds truncated blocks it cannot tell
        apart from blocked ones."""
        if blocked == stream.blocked:
            return
        stream.blocked = blocked
        self._blocked_count += 1 if blocked else -1
        if self._blocked_count > self._qpack_blocked_limit:
            raise H3Error(ErrorCode.QPACK_DECOMPRESSION_FAILED, "more blocked streams than QPACK_BLOCKED_STREAMS")

    # --- request streams ---

    def _process_request(self, stream: _Stream, events: list, last: H3Event | None = None) -> None:
        reader = stream.reader
        stream_id = stream.stream_id
        while not stream.blocked:
            piece = reader.pull()
            if piece is None:
                break
            frame_type, payload, first = piece
            if frame_type == FrameType.DATA:
                if first and stream.recv is not _Recv.BODY:
                    raise H3Error(ErrorCode.H3_FRAME_UNEXPECTED, f"DATA frame while {stream.recv.value}")
                if payload:
                    last = DataReceived(stream_id, payload, False)
                    events.append(last)
            elif frame_type == FrameType.HEADERS:
                if stream.recv is _Recv.TRAILERS or (stream.recv is _Recv.BODY and stream.is_connect):
                    raise H3Error(ErrorCode.H3_FRAME_UNEXPECTED, f"HEADERS frame while {stream.recv.value}" +
                                  (" of a CONNECT stream" if stream.is_connect else ""))
                headers = self._decode(stream_id, payload)
                if headers is None:
                    self._set_blocked(stream, True)
                    return
                last = self._header_section(stream, headers, events)
                if stream.recv is _Recv.DONE:
                    return  # rejected
            # other types: unknown or reserved, ignored
        if stream.fin_received and not stream.blocked:
            self._end_request(stream, last, events)

    def _header_section(self, stream: _Stream, headers: list, events: list) -> HeadersReceived | None:
        if field_section_size(headers) > self._max_field_section_size:
            self._reject(stream, ErrorCode.H3_MESSAGE_ERROR, "header section larger than MAX_FIELD_SECTION_SIZE",
                         events)
            return None
        trailers = stream.recv is _Recv.BODY
        try:
            if trailers:
                validate_trailers(headers)
                stream.recv = _Recv.TRAILERS
            elif self.is_client:
                status = validate_response(headers)
                if status >= 200:  # 1xx: interim, the final response is still to come
                    stream.recv = _Recv.BODY
                    stream.is_connect = stream.is_connect and status < 300
            else:
                method, _ = validate_request(headers, connect_protocol=self._connect_protocol)
                stream.is_connect = method == b"CONNECT"
                stream.recv = _Recv.BODY
        except MessageError as exc:
            self._reject(stream, exc.error_code, str(exc), events)
            return None
        event = HeadersReceived(stream.stream_id, headers, False, trailers)
        events.append(event)
        return event

    def _end_request(self, stream: _Stream, last: H3Event | None, events: list) -> None:
        if not stream.reader.at_frame_boundary:
            raise H3Error(ErrorCode.H3_FRAME_ERROR, "stream ended inside a frame")
        if stream.recv is _Recv.HEADERS:
            code = ErrorCode.H3_MESSAGE_ERROR if self.is_client else ErrorCode.H3_REQUEST_INCOMPLETE
            self._reject(stream, code, "stream ended without a (final) header section", events)
            return
        if last is not None:
            last.stream_ended = True
        else:
            events.append(DataReceived(stream.stream_id, b"", True))
        stream.recv = _Recv.DONE
        self._receive_side_done(stream)

    def _reject(self, stream: _Stream, code: int, reason: str, events: list) -> None:
        _log.debug("H3 stream %d rejected (0x%x): %s", stream.stream_id, code, reason)
        self._abandon(stream, code)
        events.append(MessageRejected(stream.stream_id, code, reason))

    def _abandon(self, stream: _Stream, code: int) -> None:
        """Close both directions of a request stream with ``code`` (RESET_STREAM and STOP_SENDING)."""
        stream_id = stream.stream_id
        if stream.recv is not _Recv.DONE:
            if not stream.fin_received:
                self._quic_stop(stream_id, code)
            self._cancel_qpack(stream_id)
            stream.recv = _Recv.DONE
            self._set_blocked(stream, False)
        if stream.send is not _Send.CLOSED:
            self._quic_reset(stream_id, code)
            stream.send = _Send.CLOSED
        self._receive_side_done(stream)

    def _receive_reset(self, stream_id: int, error_code: int, events: list) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            if (stream_id & 1) != (0 if self.is_client else 1):  # a peer stream reset before we saw data: note it
                self._seen_peer_streams[(stream_id >> 1) & 1].add(stream_id >> 2)
            return
        kind = stream.kind
        if kind is _Kind.REQUEST:
            if stream.recv is _Recv.DONE:
                return
            self._cancel_qpack(stream_id)
            stream.recv = _Recv.DONE
            self._set_blocked(stream, False)
            events.append(StreamReset(stream_id, error_code))
            self._receive_side_done(stream)
        elif kind in (_Kind.CONTROL, _Kind.ENCODER, _Kind.DECODER):
            raise H3Error(ErrorCode.H3_CLOSED_CRITICAL_STREAM, f"peer reset its {kind.value} stream")
        else:
            self._streams.pop(stream_id, None)

    def _receive_stop_sending(self, stream_id: int, error_code: int, events: list) -> None:
        for stream_type, local_id in self._local_uni.items():
            if local_id == stream_id:
                raise H3Error(ErrorCode.H3_CLOSED_CRITICAL_STREAM, f"peer stopped our {stream_type.name} stream")
        stream = self._streams.get(stream_id)
        if stream is None or stream.kind is not _Kind.REQUEST or stream.send is _Send.CLOSED:
            return
        stream.send = _Send.CLOSED
        events.append(StreamStopped(stream_id, error_code))
        self._forget_if_done(stream)

    def _receive_side_done(self, stream: _Stream) -> None:
        """No more data will be read from the stream: its HTTP Datagrams are dropped from now on (RFC 9297 §2.1)."""
        self._datagram_handlers.pop(stream.stream_id >> 2, None)
        self._forget_if_done(stream)

    def _forget_if_done(self, stream: _Stream) -> None:
        if stream.recv is _Recv.DONE and stream.send is _Send.CLOSED:
            self._streams.pop(stream.stream_id, None)

    def _cancel_qpack(self, stream_id: int) -> None:
        """Stream Cancellation (RFC 9204 §4.4.2): the peer's encoder may release what that stream referenced."""
        if self._qpack_capacity:
            try:
                self._write_uni(StreamType.QPACK_DECODER, self._decoder.cancel_stream(stream_id))
            except RuntimeError:
                pass

    # ------------------------------------------------------------------------------------------------------------
    # HTTP Datagrams (hot path)
    # ------------------------------------------------------------------------------------------------------------

    def _receive_datagram(self, data: bytes) -> None:
        """``quic.datagram_handler`` once H3_DATAGRAM is negotiated: one QUIC DATAGRAM payload = quarter stream ID
        + HTTP Datagram payload, handed to that stream's handler (a bytes slice: cheaper than a memoryview at MTU
        sizes). No event, no logging."""
        if data:
            qsid = data[0]
            if qsid < 0x40:  # request streams 0..252: one byte
                handler = self._datagram_handlers.get(qsid)
                if handler is not None:
                    handler(data[1:])
                else:
                    self.datagrams_dropped_unknown_stream += 1
                return
        parsed = read_varint(data, 0)
        if parsed is None:
            self._connection_error(ErrorCode.H3_DATAGRAM_ERROR, "HTTP Datagram without a quarter stream ID")
            return
        qsid, start = parsed
        if qsid > MAX_QUARTER_STREAM_ID:
            self._connection_error(ErrorCode.H3_DATAGRAM_ERROR, "quarter stream ID above 2^60-1")
            return
        handler = self._datagram_handlers.get(qsid)
        if handler is not None:
            handler(data[start:])
        else:
            self.datagrams_dropped_unknown_stream += 1

    def _receive_datagram_early(self, data: bytes) -> None:
        """``quic.datagram_handler`` until H3_DATAGRAM is negotiated (reordering can bring datagrams first)."""
        self.datagrams_dropped_not_negotiated += 1

    def _receive_datagram_closed(self, data: bytes) -> None:
        pass

    def register_datagram_handler(self, stream_id: int, handler: Callable[[bytes], None]) -> None:
        """Route the HTTP Datagrams of request stream ``stream_id`` to ``handler(payload)`` (for CONNECT-IP the
        payload is context ID + IP packet). Unregistered when the stream's receive side ends or is reset. The
        handler runs inside the QUIC receive path: it must not raise."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.kind is not _Kind.REQUEST or stream.recv is _Recv.DONE:
            raise H3StateError(f"stream {stream_id} is not a request stream open for receiving")
        self._datagram_handlers[stream_id >> 2] = handler

    def unregister_datagram_handler(self, stream_id: int) -> None:
        self._datagram_handlers.pop(stream_id >> 2, None)

    @staticmethod
    def datagram_prefix(stream_id: int) -> bytes:
        """The quarter stream ID of a request stream, encoded: ``quic.send_datagram_frame(prefix + payload)`` sends
        an HTTP Datagram directly (check ``datagrams_negotiated`` first)."""
        if stream_id % 4:
            raise ValueError(f"stream {stream_id} is not a client-initiated bidirectional stream")
        return encode_uint_var(stream_id >> 2)

    def send_datagram(self, stream_id: int, payload: bytes) -> bool:
        """Send an HTTP Datagram on a request stream whose sending side is open. False when not sent: datagrams not
        negotiated, stream not open, or dropped by the transport (too large for the path, queue full)."""
        stream = self._streams.get(stream_id)
        if stream is None or not self._datagrams_negotiated or stream.send is _Send.CLOSED \
                or stream.kind is not _Kind.REQUEST:
            return False
        return self._quic.send_datagram_frame(stream.prefix + payload)

    # ------------------------------------------------------------------------------------------------------------
    # output
    # ------------------------------------------------------------------------------------------------------------

    def get_next_available_stream_id(self) -> int:
        return self._quic.get_next_available_stream_id(False)

    def send_headers(self, stream_id: int, headers: Iterable[tuple[bytes, bytes]], end_stream: bool = False) -> None:
        """Send a header section: a request (client, on a new stream), an interim or final response (server), or a
        trailer section (after the final one; needs ``end_stream``). Invalid headers: ValueError; not allowed now:
        H3StateError (e.g. ``:protocol`` before the server's SETTINGS_ENABLE_CONNECT_PROTOCOL=1 arrived)."""
        self._check_open()
        headers = list(headers)
        stream = self._streams.get(stream_id)
        is_connect = False
        try:
            if stream is None:
                if not self.is_client or stream_id % 4:
                    raise H3StateError(f"stream {stream_id} is not an open request stream")
                if self._goaway_received is not None and stream_id >= self._goaway_received:
                    raise H3StateError(f"the server sent GOAWAY({self._goaway_received}): no new requests")
                method, protocol = validate_request(headers, connect_protocol=True)
                if protocol is not None and not self.peer_supports_extended_connect:
                    why = "its SETTINGS have not arrived yet" if self._peer_settings is None else "it did not send it"
                    raise H3StateError("extended CONNECT (:protocol) needs SETTINGS_ENABLE_CONNECT_PROTOCOL=1 from "
                                       f"the server; {why}")
                is_connect = method == b"CONNECT"
                final = True
            elif stream.kind is not _Kind.REQUEST or stream.send is _Send.CLOSED:
                raise H3StateError(f"stream {stream_id} is not open for sending")
            elif stream.send is _Send.IDLE:  # server: a response
                final = validate_response(headers) >= 200
            else:
                if stream.is_connect:
                    raise H3StateError("no trailer section on a CONNECT stream")
                if not end_stream:
                    raise ValueError("a trailer section ends the stream: pass end_stream=True")
                validate_trailers(headers)
                final = True
        except MessageError as exc:
            raise ValueError(f"invalid header section: {exc}") from None
        limit = (self._peer_settings or {}).get(Setting.MAX_FIELD_SECTION_SIZE)
        if limit is not None and field_section_size(headers) > limit:
            raise ValueError(f"header section larger than the peer's MAX_FIELD_SECTION_SIZE ({limit})")

        # an empty write opens the stream (or finds it reset) before the encoder commits table references to it
        self._quic.send_stream_data(stream_id, b"")
        instructions, block = self._encoder.encode(stream_id, headers)
        if instructions:
            self._write_uni(StreamType.QPACK_ENCODER, instructions)
        self._quic.send_stream_data(stream_id, encode_frame(FrameType.HEADERS, block), end_stream)
        if stream is None:
            stream = _Stream(stream_id, _Kind.REQUEST, FrameReader(self._max_field_section_size,
                                                                   self._request_forbidden))
            stream.is_connect = is_connect
            self._streams[stream_id] = stream
        if end_stream:
            stream.send = _Send.CLOSED
            self._forget_if_done(stream)
        elif final:
            stream.send = _Send.OPEN

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Send content in one DATA frame (an empty ``data`` with ``end_stream`` sends just the FIN)."""
        self._check_open()
        stream = self._streams.get(stream_id)
        if stream is None or stream.kind is not _Kind.REQUEST or stream.send is _Send.CLOSED:
            raise H3StateError(f"stream {stream_id} is not open for sending")
        if stream.send is not _Send.OPEN:
            raise H3StateError(f"stream {stream_id}: DATA before the final header section")
        if data:
            header = encode_uint_var(FrameType.DATA) + encode_uint_var(len(data))
            self._quic.send_stream_data(stream_id, header + data, end_stream)
        elif end_stream:
            self._quic.send_stream_data(stream_id, b"", True)
        if end_stream:
            stream.send = _Send.CLOSED
            self._forget_if_done(stream)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.H3_REQUEST_CANCELLED) -> None:
        """Abort a request stream in both directions (RESET_STREAM + STOP_SENDING); its datagram handler goes."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.kind is not _Kind.REQUEST:
            raise H3StateError(f"stream {stream_id} is not an open request stream")
        self._abandon(stream, error_code)

    def send_goaway(self, last_id: int | None = None) -> int:
        """Send GOAWAY; returns the id sent. Server: requests on streams >= ``last_id`` (default: after the last one
        accepted) are refused from now on (H3_REQUEST_REJECTED). Client: a push ID (default 0; we never push).
        Successive GOAWAYs may not increase the id."""
        self._check_open()
        control = self._local_uni.get(StreamType.CONTROL)
        if control is None:
            raise H3StateError("the control stream is not open yet (handshake not complete)")
        if last_id is None:
            last_id = 0 if self.is_client else self._last_peer_request + 4
        if not self.is_client and last_id % 4:
            raise ValueError(f"GOAWAY from a server names a client request stream, not {last_id}")
        if self._goaway_sent is not None and last_id > self._goaway_sent:
            raise ValueError(f"GOAWAY ids may only decrease (sent {self._goaway_sent} before)")
        self._goaway_sent = last_id
        self._quic.send_stream_data(control, encode_frame(FrameType.GOAWAY, encode_uint_var(last_id)))
        return last_id

    def close(self, error_code: int = ErrorCode.H3_NO_ERROR, reason: str = "") -> None:
        """Close the QUIC connection with an HTTP/3 error code (application close)."""
        if not self._closed:
            self._connection_error(error_code, reason)

    # ------------------------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------------------------

    def _open_local_streams(self) -> None:
        """Open our control stream (with SETTINGS) and QPACK streams once the peer's transport parameters say how
        many unidirectional streams we may open; retried on later events if the limit was too low."""
        if self._closed or self._quic.peer_transport_parameters is None:
            return
        for stream_type in (StreamType.CONTROL, StreamType.QPACK_ENCODER, StreamType.QPACK_DECODER):
            if stream_type in self._local_uni:
                continue
            stream_id = self._quic.get_next_available_stream_id(True)
            data = encode_uint_var(stream_type)
            if stream_type == StreamType.CONTROL:
                data += encode_settings(self.local_settings)
            try:
                self._quic.send_stream_data(stream_id, data + self._uni_backlog.pop(stream_type, b""))
            except ValueError:
                return  # the peer's stream limit: MAX_STREAMS will come
            self._local_uni[stream_type] = stream_id

    def _write_uni(self, stream_type: StreamType, data: bytes) -> None:
        if not data:
            return
        stream_id = self._local_uni.get(stream_type)
        if stream_id is None:
            self._uni_backlog[stream_type] = self._uni_backlog.get(stream_type, b"") + data
        else:
            self._quic.send_stream_data(stream_id, data)

    def _quic_stop(self, stream_id: int, code: int) -> None:
        try:
            self._quic.stop_stream(stream_id, code)
        except ValueError:  # the transport already finished (and forgot) that side
            pass

    def _quic_reset(self, stream_id: int, code: int) -> None:
        try:
            self._quic.reset_stream(stream_id, code)
        except ValueError:
            pass

    def _check_open(self) -> None:
        if self._closed:
            raise H3StateError("the HTTP/3 connection is closed")

    def _connection_error(self, code: int, reason: str) -> None:
        _log.debug("H3 connection error 0x%x: %s", code, reason)
        self._shutdown()
        self._quic.close(error_code=code, reason_phrase=reason)

    def _shutdown(self) -> None:
        self._closed = True
        self._datagram_handlers.clear()
        self._quic.datagram_handler = self._receive_datagram_closed
