"""HTTP/3 wire format (RFC 9114 §7, §8; RFC 9297 §2.1): codes, frame and SETTINGS codecs, an incremental frame
reader, and the field-section rules a message must follow (RFC 9114 §4.2-4.3, RFC 9220/8441 §4).

Nothing here knows about streams or connection state. Parsers raise ``H3Error`` (a connection error: the caller
closes the QUIC connection with ``error_code``) or ``MessageError`` (a malformed message: the caller resets that
one stream with H3_MESSAGE_ERROR); no other exception escapes them for any input bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import IntEnum

from ..quic.buffer import encode_uint_var


class ErrorCode(IntEnum):
    """HTTP/3 (RFC 9114 §8.1), QPACK (RFC 9204 §6) and HTTP Datagram (RFC 9297 §5.2) application error codes."""

    H3_DATAGRAM_ERROR = 0x33
    H3_NO_ERROR = 0x100
    H3_GENERAL_PROTOCOL_ERROR = 0x101
    H3_INTERNAL_ERROR = 0x102
    H3_STREAM_CREATION_ERROR = 0x103
    H3_CLOSED_CRITICAL_STREAM = 0x104
    H3_FRAME_UNEXPECTED = 0x105
    H3_FRAME_ERROR = 0x106
    H3_EXCESSIVE_LOAD = 0x107
    H3_ID_ERROR = 0x108
    H3_SETTINGS_ERROR = 0x109
    H3_MISSING_SETTINGS = 0x10A
    H3_REQUEST_REJECTED = 0x10B
    H3_REQUEST_CANCELLED = 0x10C
    H3_REQUEST_INCOMPLETE = 0x10D
    H3_MESSAGE_ERROR = 0x10E
    H3_CONNECT_ERROR = 0x10F
    H3_VERSION_FALLBACK = 0x110
    QPACK_DECOMPRESSION_FAILED = 0x200
    QPACK_ENCODER_STREAM_ERROR = 0x201
    QPACK_DECODER_STREAM_ERROR = 0x202


class FrameType(IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    CANCEL_PUSH = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    GOAWAY = 0x7
    MAX_PUSH_ID = 0xD


# HTTP/2 frame types without an HTTP/3 counterpart (PRIORITY, PING, WINDOW_UPDATE, CONTINUATION): RFC 9114 §7.2.8
# says receiving one is H3_FRAME_UNEXPECTED, wherever it appears.
HTTP2_FRAME_TYPES = frozenset({0x2, 0x6, 0x8, 0x9})


class StreamType(IntEnum):
    CONTROL = 0x0
    PUSH = 0x1
    QPACK_ENCODER = 0x2
    QPACK_DECODER = 0x3


class Setting(IntEnum):
    QPACK_MAX_TABLE_CAPACITY = 0x1
    MAX_FIELD_SECTION_SIZE = 0x6
    QPACK_BLOCKED_STREAMS = 0x7
    ENABLE_CONNECT_PROTOCOL = 0x8  # RFC 8441 §3 / RFC 9220 §3
    H3_DATAGRAM = 0x33  # RFC 9297 §2.1.1


# HTTP/2 settings without an HTTP/3 counterpart (ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE,
# MAX_FRAME_SIZE): receiving one is H3_SETTINGS_ERROR (RFC 9114 §7.2.4.1).
HTTP2_SETTINGS = frozenset({0x2, 0x3, 0x4, 0x5})
BOOLEAN_SETTINGS = (Setting.ENABLE_CONNECT_PROTOCOL, Setting.H3_DATAGRAM)

MAX_QUARTER_STREAM_ID = (1 << 60) - 1  # RFC 9297 §2.1: larger is H3_DATAGRAM_ERROR


def grease_id(n: int) -> int:
    """The n-th reserved identifier (frame type, stream type, setting, error code): 0x1f * n + 0x21 (RFC 9114 §9)."""
    return 0x1F * n + 0x21


class H3Error(Exception):
    """A connection error: close the connection with ``error_code``."""

    def __init__(self, error_code: int, reason: str) -> None:
        super().__init__(reason)
        self.error_code = int(error_code)
        self.reason = reason

    def __repr__(self) -> str:
        return f"H3Error(0x{self.error_code:x}, {self.reason!r})"


class MessageError(Exception):
    """A malformed request or response (RFC 9114 §4.1.2): reset the stream with H3_MESSAGE_ERROR."""

    error_code = ErrorCode.H3_MESSAGE_ERROR


# ----------------------------------------------------------------------------------------------------------------
# varints and frames
# ----------------------------------------------------------------------------------------------------------------


def read_varint(data: bytes, pos: int) -> tuple[int, int] | None:
    """(value, position after it) of the QUIC varint at ``data[pos:]``; None if it is not complete yet."""
    if pos >= len(data):
        return None
    first = data[pos]
    if first < 0x40:
        return first, pos + 1
    end = pos + (1 << (first >> 6))
    if end > len(data):
        return None
    value = int.from_bytes(data[pos:end], "big")
    return value & ((1 << (8 * (end - pos) - 2)) - 1), end


def encode_frame(frame_type: int, payload: bytes) -> bytes:
    return encode_uint_var(frame_type) + encode_uint_var(len(payload)) + payload


def encode_settings(settings: Mapping[int, int]) -> bytes:
    """A whole SETTINGS frame."""
    payload = b"".join(encode_uint_var(k) + encode_uint_var(v) for k, v in settings.items())
    return encode_frame(FrameType.SETTINGS, payload)


def decode_settings(payload: bytes) -> dict[int, int]:
    """SETTINGS payload -> {identifier: value}. Truncated: H3_FRAME_ERROR; a duplicate identifier or an HTTP/2-only
    one: H3_SETTINGS_ERROR. Values of known settings are checked by the connection, unknown ones are kept."""
    settings: dict[int, int] = {}
    pos = 0
    while pos < len(payload):
        ident = read_varint(payload, pos)
        value = ident and read_varint(payload, ident[1])
        if not value:
            raise H3Error(ErrorCode.H3_FRAME_ERROR, "truncated SETTINGS frame")
        key = ident[0]
        if key in HTTP2_SETTINGS:
            raise H3Error(ErrorCode.H3_SETTINGS_ERROR, f"HTTP/2 setting 0x{key:x} in SETTINGS")
        if key in settings:
            raise H3Error(ErrorCode.H3_SETTINGS_ERROR, f"duplicate setting 0x{key:x}")
        settings[key] = value[0]
        pos = value[1]
    return settings


def decode_single_varint(payload: bytes, frame_type: int) -> int:
    """The one varint a GOAWAY, MAX_PUSH_ID or CANCEL_PUSH frame carries; anything else is H3_FRAME_ERROR."""
    parsed = read_varint(payload, 0)
    if parsed is None or parsed[1] != len(payload):
        raise H3Error(ErrorCode.H3_FRAME_ERROR, f"malformed {FrameType(frame_type).name} frame")
    return parsed[0]


# frames whose payload is parsed as a whole (and so buffered, up to FrameReader.max_payload); DATA and unknown
# types are handed on as their bytes arrive
BUFFERED_FRAMES = frozenset({FrameType.HEADERS, FrameType.CANCEL_PUSH, FrameType.SETTINGS, FrameType.PUSH_PROMISE,
                             FrameType.GOAWAY, FrameType.MAX_PUSH_ID})


class FrameReader:
    """One stream's bytes -> HTTP/3 frames, incrementally: input may be split at any byte.

    ``feed(data)`` appends; ``pull()`` returns the next piece, or None when it needs more bytes:

    - ``(frame_type, payload, True)`` for the types in ``BUFFERED_FRAMES``: the whole payload at once;
    - ``(frame_type, chunk, first)`` for DATA and unknown types: the payload as it arrives. The piece returned as
      soon as the frame header is complete has ``first=True`` (it may be empty: a zero-length frame is still seen).

    Checked at the frame header, before any payload is buffered: ``forbidden`` maps frame types to the error code
    their mere presence raises; ``first_frame`` = (type, error code) requires the stream's first frame to be of that
    type; a buffered frame longer than ``max_payload`` is H3_EXCESSIVE_LOAD. All raise ``H3Error``.
    """

    __slots__ = ("_buf", "_pos", "_type", "_left", "_forbidden", "_first_frame", "max_payload")

    def __init__(self, max_payload: int, forbidden: Mapping[int, int],
                 first_frame: tuple[int, int] | None = None) -> None:
        self._buf = b""
        self._pos = 0
        self._type = -1  # type of the streamed frame whose payload is being passed on
        self._left = 0  # payload bytes of that frame still to come
        self._forbidden = forbidden
        self._first_frame = first_frame
        self.max_payload = max_payload

    def feed(self, data: bytes) -> None:
        if self._pos >= len(self._buf):
            self._buf = data
        else:
            self._buf = self._buf[self._pos:] + data
        self._pos = 0

    @property
    def at_frame_boundary(self) -> bool:
        """Nothing of an unfinished frame is pending (a FIN here is a clean end)."""
        return self._left == 0 and self._pos >= len(self._buf)

    def pull(self) -> tuple[int, bytes, bool] | None:
        buf = self._buf
        pos = self._pos
        if self._left:  # inside the payload of a streamed frame
            n = min(len(buf) - pos, self._left)
            if n <= 0:
                return None
            self._left -= n
            self._pos = pos + n
            return self._type, buf[pos:pos + n], False
        header = read_varint(buf, pos)
        length = header and read_varint(buf, header[1])
        if not length:
            return None
        frame_type, (size, start) = header[0], length
        if self._first_frame is not None:
            required, code = self._first_frame
            if frame_type != required:
                raise H3Error(code, f"first frame is 0x{frame_type:x}, not 0x{required:x}")
            self._first_frame = None
        code = self._forbidden.get(frame_type)
        if code is not None:
            raise H3Error(code, f"frame type 0x{frame_type:x} not allowed on this stream")
        if frame_type in BUFFERED_FRAMES:
            if size > self.max_payload:
                raise H3Error(ErrorCode.H3_EXCESSIVE_LOAD, f"{size}-byte frame of type 0x{frame_type:x}")
            end = start + size
            if end > len(buf):
                return None  # the frame header is parsed again once the rest is here (cheap, and stateless)
            self._pos = end
            return frame_type, buf[start:end], True
        n = min(len(buf) - start, size)
        self._type = frame_type
        self._left = size - n
        self._pos = start + n
        return frame_type, buf[start:start + n], True


# ----------------------------------------------------------------------------------------------------------------
# field sections (RFC 9114 §4.2-4.3, RFC 9110 §5)
# ----------------------------------------------------------------------------------------------------------------

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_LOWER_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE_CHAR = re.compile(rb"[\x00\r\n]")
_WHITESPACE = (0x20, 0x09)
# connection-specific fields: forbidden in HTTP/3 (RFC 9114 §4.2); "te" is allowed with the value "trailers" only
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
RESPONSE_PSEUDO = frozenset({b":status"})
FIELD_OVERHEAD = 32  # RFC 9114 §4.2.2: each field line counts name + value + 32


def field_section_size(headers: Iterable[tuple[bytes, bytes]]) -> int:
    return sum(len(name) + len(value) + FIELD_OVERHEAD for name, value in headers)


def _check_fields(headers: Iterable[tuple[bytes, bytes]], allowed_pseudo: frozenset) -> dict[bytes, bytes]:
    """Checks common to every field section; returns the pseudo-header fields."""
    pseudo: dict[bytes, bytes] = {}
    regular = False
    for field in headers:
        if type(field) is not tuple or len(field) != 2:
            raise MessageError("a field line must be a (name, value) tuple")
        name, value = field
        if type(name) is not bytes or type(value) is not bytes:
            raise MessageError("field names and values must be bytes")
        if name[:1] == b":":
            if regular:
                raise MessageError(f"pseudo-header {name!r} after a regular field")
            if name not in allowed_pseudo:
                raise MessageError(f"pseudo-header {name!r} not allowed here")
            if name in pseudo:
                raise MessageError(f"duplicate pseudo-header {name!r}")
            pseudo[name] = value
        else:
            regular = True
            if not _LOWER_TOKEN.fullmatch(name):
                raise MessageError(f"invalid field name {name!r} (names are lowercase tokens)")
            if name in CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
                raise MessageError(f"connection-specific field {name!r}")
        if value and (value[0] in _WHITESPACE or value[-1] in _WHITESPACE or _BAD_VALUE_CHAR.search(value)):
            raise MessageError(f"invalid value of {name!r}")
    return pseudo


def validate_request(headers: Iterable[tuple[bytes, bytes]], *, connect_protocol: bool) -> tuple[bytes, bytes | None]:
    """Check a request header section; returns (method, protocol). ``connect_protocol``: we (the receiver) sent
    SETTINGS_ENABLE_CONNECT_PROTOCOL=1, so ``:protocol`` is allowed. Raises MessageError."""
    fields = list(headers)
    pseudo = _check_fields(fields, REQUEST_PSEUDO)
    method = pseudo.get(b":method")
    if not method or not _TOKEN.fullmatch(method):
        raise MessageError(":method missing or invalid")
    protocol = pseudo.get(b":protocol")
    if protocol is not None:  # extended CONNECT (RFC 8441 §4, RFC 9220 §3)
        if not connect_protocol:
            raise MessageError(":protocol without SETTINGS_ENABLE_CONNECT_PROTOCOL")
        if method != b"CONNECT":
            raise MessageError(":protocol in a request whose method is not CONNECT")
        for name in (b":protocol", b":scheme", b":authority", b":path"):
            if not pseudo.get(name):
                raise MessageError(f"extended CONNECT without {name.decode()}")
    elif method == b"CONNECT":  # RFC 9114 §4.4
        if b":scheme" in pseudo or b":path" in pseudo:
            raise MessageError("CONNECT with :scheme or :path")
        if not pseudo.get(b":authority"):
            raise MessageError("CONNECT without :authority")
    else:  # RFC 9114 §4.3.1
        scheme = pseudo.get(b":scheme")
        if not scheme or not pseudo.get(b":path"):
            raise MessageError("request without :scheme or :path")
        authority = pseudo.get(b":authority")
        if authority is not None and not authority:
            raise MessageError("empty :authority")
        hosts = [value for name, value in fields if name == b"host"]
        if scheme in (b"http", b"https") and not authority and not any(hosts):
            raise MessageError(f"{scheme.decode(errors='replace')} request without :authority or host")
        if authority and any(host != authority for host in hosts):
            raise MessageError(":authority and host differ")
    return method, protocol


def validate_response(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """Check a response header section; returns its status code. Raises MessageError."""
    status = _check_fields(headers, RESPONSE_PSEUDO).get(b":status")
    if status is None or len(status) != 3 or not status.isdigit() or not 100 <= int(status) <= 599:
        raise MessageError(":status missing or not a 3-digit code")
    return int(status)


def validate_trailers(headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Check a trailer section (no pseudo-header fields). Raises MessageError."""
    _check_fields(headers, frozenset())
