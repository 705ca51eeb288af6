"""QUIC transport parameters codec and validation (RFC 9000 §18, RFC 9221, RFC 9287, draft-ietf-quic-multipath).

``decode_transport_parameters`` validates each parameter on its own; cross-checks that need connection state
(initial_source_connection_id present and matching, original_destination_connection_id matching, ...) belong to
the connection.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .buffer import Buffer, BufferReadError, encode_uint_var
from .errors import QuicErrorCode, QuicProtocolError

MAX_CID_LENGTH = 20


@dataclass
class PreferredAddress:
    ipv4: tuple[str, int] | None
    ipv6: tuple[str, int] | None
    connection_id: bytes
    stateless_reset_token: bytes


@dataclass
class TransportParameters:
    """Field defaults are the protocol defaults (an absent parameter decodes to its default)."""

    original_destination_connection_id: bytes | None = None
    max_idle_timeout: int = 0  # ms, 0 = no idle timeout
    stateless_reset_token: bytes | None = None
    max_udp_payload_size: int = 65527
    initial_max_data: int = 0
    initial_max_stream_data_bidi_local: int = 0
    initial_max_stream_data_bidi_remote: int = 0
    initial_max_stream_data_uni: int = 0
    initial_max_streams_bidi: int = 0
    initial_max_streams_uni: int = 0
    ack_delay_exponent: int = 3
    max_ack_delay: int = 25  # ms
    disable_active_migration: bool = False
    preferred_address: PreferredAddress | None = None
    active_connection_id_limit: int = 2
    initial_source_connection_id: bytes | None = None
    retry_source_connection_id: bytes | None = None
    max_datagram_frame_size: int | None = None  # RFC 9221
    initial_max_path_id: int | None = None  # draft-ietf-quic-multipath
    grease_quic_bit: bool = False  # RFC 9287
    unknown: list[tuple[int, bytes]] = field(default_factory=list)  # (id, value): kept for qlog, otherwise ignored


# id -> (field name, kind)
_INT, _CID, _TOKEN, _FLAG, _ADDR = range(5)
_PARAMS: dict[int, tuple[str, int]] = {
    0x00: ("original_destination_connection_id", _CID),
    0x01: ("max_idle_timeout", _INT),
    0x02: ("stateless_reset_token", _TOKEN),
    0x03: ("max_udp_payload_size", _INT),
    0x04: ("initial_max_data", _INT),
    0x05: ("initial_max_stream_data_bidi_local", _INT),
    0x06: ("initial_max_stream_data_bidi_remote", _INT),
    0x07: ("initial_max_stream_data_uni", _INT),
    0x08: ("initial_max_streams_bidi", _INT),
    0x09: ("initial_max_streams_uni", _INT),
    0x0A: ("ack_delay_exponent", _INT),
    0x0B: ("max_ack_delay", _INT),
    0x0C: ("disable_active_migration", _FLAG),
    0x0D: ("preferred_address", _ADDR),
    0x0E: ("active_connection_id_limit", _INT),
    0x0F: ("initial_source_connection_id", _CID),
    0x10: ("retry_source_connection_id", _CID),
    0x20: ("max_datagram_frame_size", _INT),
    0x3E: ("initial_max_path_id", _INT),
    0x2AB2: ("grease_quic_bit", _FLAG),
}
_SERVER_ONLY = {0x00, 0x02, 0x0D, 0x10}
_DEFAULTS = TransportParameters()

# name -> (smallest allowed, largest allowed) for integer parameters with limits
_INT_LIMITS = {
    "max_udp_payload_size": (1200, None),
    "ack_delay_exponent": (0, 20),
    "max_ack_delay": (0, 2**14 - 1),
    "active_connection_id_limit": (2, None),
    "initial_max_streams_bidi": (0, 2**60),
    "initial_max_streams_uni": (0, 2**60),
    "initial_max_path_id": (0, 2**32 - 1),
}


def _error(reason: str) -> QuicProtocolError:
    return QuicProtocolError(QuicErrorCode.TRANSPORT_PARAMETER_ERROR, reason)


def _encode_preferred_address(addr: PreferredAddress) -> bytes:
    ipv4 = ipaddress.IPv4Address(addr.ipv4[0]).packed + addr.ipv4[1].to_bytes(2, "big") if addr.ipv4 else bytes(6)
    ipv6 = ipaddress.IPv6Address(addr.ipv6[0]).packed + addr.ipv6[1].to_bytes(2, "big") if addr.ipv6 else bytes(18)
    return ipv4 + ipv6 + bytes((len(addr.connection_id),)) + addr.connection_id + addr.stateless_reset_token


def _decode_preferred_address(value: bytes) -> PreferredAddress:
    # IPv4 (4) + port (2) + IPv6 (16) + port (2) + CID length (1) + CID + reset token (16)
    if len(value) < 25:
        raise _error("preferred_address truncated")
    cid_length = value[24]
    if cid_length == 0 or cid_length > MAX_CID_LENGTH:
        raise _error("preferred_address has an invalid connection ID length")
    if len(value) != 25 + cid_length + 16:
        raise _error("preferred_address has the wrong length")
    ipv4 = None if value[0:6] == bytes(6) else (str(ipaddress.IPv4Address(value[0:4])), int.from_bytes(value[4:6]))
    ipv6 = None if value[6:24] == bytes(18) else (str(ipaddress.IPv6Address(value[6:22])), int.from_bytes(value[22:24]))
    return PreferredAddress(ipv4, ipv6, value[25:25 + cid_length], value[25 + cid_length:])


def encode_transport_parameters(params: TransportParameters) -> bytes:
    """Encode the parameters that differ from their defaults (and the unknown ones), in id order."""
    entries: list[tuple[int, bytes]] = list(params.unknown)
    for param_id, (name, kind) in _PARAMS.items():
        value = getattr(params, name)
        if value is None or value == getattr(_DEFAULTS, name):
            continue
        if kind == _INT:
            entries.append((param_id, encode_uint_var(value)))
        elif kind == _FLAG:
            entries.append((param_id, b""))
        elif kind == _ADDR:
            entries.append((param_id, _encode_preferred_address(value)))
        else:
            entries.append((param_id, value))
    entries.sort(key=lambda entry: entry[0])
    return b"".join(encode_uint_var(i) + encode_uint_var(len(v)) + v for i, v in entries)


def decode_transport_parameters(data: bytes, *, sent_by_server: bool) -> TransportParameters:
    """Decode and validate a transport parameters extension; raises QuicProtocolError(TRANSPORT_PARAMETER_ERROR)."""
    params = TransportParameters()
    seen: set[int] = set()
    buf = Buffer(data=data)
    try:
        while not buf.eof():
            param_id = buf.pull_uint_var()
            value = buf.pull_bytes(buf.pull_uint_var())
            if param_id in seen:
                raise _error(f"transport parameter 0x{param_id:x} appears twice")
            seen.add(param_id)
            known = _PARAMS.get(param_id)
            if known is None:
                params.unknown.append((param_id, value))
                continue
            if not sent_by_server and param_id in _SERVER_ONLY:
                raise _error(f"client sent server-only transport parameter {known[0]}")
            name, kind = known
            setattr(params, name, _decode_value(name, kind, value))
    except BufferReadError:
        raise _error("transport parameters truncated") from None
    return params


def _decode_value(name: str, kind: int, value: bytes):
    if kind == _INT:
        buf = Buffer(data=value)
        try:
            number = buf.pull_uint_var()
        except BufferReadError:
            raise _error(f"{name} truncated") from None
        if not buf.eof():
            raise _error(f"{name} has trailing bytes")
        limits = _INT_LIMITS.get(name)
        if limits and (number < limits[0] or (limits[1] is not None and number > limits[1])):
            raise _error(f"{name} out of range: {number}")
        return number
    if kind == _CID:
        if len(value) > MAX_CID_LENGTH:
            raise _error(f"{name} longer than {MAX_CID_LENGTH} bytes")
        return value
    if kind == _TOKEN:
        if len(value) != 16:
            raise _error(f"{name} must be 16 bytes")
        return value
    if kind == _FLAG:
        if value:
            raise _error(f"{name} must be empty")
        return True
    return _decode_preferred_address(value)
