"""QUIC transport error codes (RFC 9000 §20) and the exception that carries one."""

from __future__ import annotations

from enum import IntEnum


class QuicErrorCode(IntEnum):
    NO_ERROR = 0x0
    INTERNAL_ERROR = 0x1
    CONNECTION_REFUSED = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_LIMIT_ERROR = 0x4
    STREAM_STATE_ERROR = 0x5
    FINAL_SIZE_ERROR = 0x6
    FRAME_ENCODING_ERROR = 0x7
    TRANSPORT_PARAMETER_ERROR = 0x8
    CONNECTION_ID_LIMIT_ERROR = 0x9
    PROTOCOL_VIOLATION = 0xA
    INVALID_TOKEN = 0xB
    APPLICATION_ERROR = 0xC
    CRYPTO_BUFFER_EXCEEDED = 0xD
    KEY_UPDATE_ERROR = 0xE
    AEAD_LIMIT_REACHED = 0xF
    NO_VIABLE_PATH = 0x10
    CRYPTO_ERROR = 0x100  # + TLS alert code


class QuicProtocolError(Exception):
    """A peer violated the protocol: the connection closes with ``error_code``.

    ``frame_type`` is the type of the frame that triggered the error (None when not caused by a frame).
    """

    def __init__(self, error_code: int, reason: str = "", frame_type: int | None = None) -> None:
        super().__init__(reason)
        self.error_code = int(error_code)
        self.frame_type = frame_type
        self.reason = reason

    def __repr__(self) -> str:
        return f"QuicProtocolError(0x{self.error_code:x}, {self.reason!r}, frame_type={self.frame_type!r})"


class CryptoError(Exception):
    """Packet protection failed (AEAD tag mismatch, truncated packet): the packet is dropped silently."""
