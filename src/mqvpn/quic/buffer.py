"""Byte buffer and QUIC varint codec.

Borrowed from aioquic's C extension (fast, stable API) and kept behind this module so the rest of the transport
never imports aioquic directly for it.
"""

from aioquic.buffer import Buffer, BufferReadError, BufferWriteError  # noqa: F401

UINT_VAR_MAX = 0x3FFFFFFFFFFFFFFF


def size_uint_var(value: int) -> int:
    """Number of bytes the QUIC varint encoding of ``value`` takes."""
    if value <= 0x3F:
        return 1
    if value <= 0x3FFF:
        return 2
    if value <= 0x3FFFFFFF:
        return 4
    if value <= UINT_VAR_MAX:
        return 8
    raise ValueError("integer too large for a QUIC varint")


def encode_uint_var(value: int) -> bytes:
    """QUIC varint encoding of ``value`` (RFC 9000 §16)."""
    if value <= 0x3F:
        return bytes((value,))
    if value <= 0x3FFF:
        return (value | 0x4000).to_bytes(2, "big")
    if value <= 0x3FFFFFFF:
        return (value | 0x80000000).to_bytes(4, "big")
    if value <= UINT_VAR_MAX:
        return (value | 0xC000000000000000).to_bytes(8, "big")
    raise ValueError("integer too large for a QUIC varint")
