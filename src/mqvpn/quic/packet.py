"""QUIC v1 packet headers (RFC 9000 §17, RFC 8999), packet numbers, Version Negotiation, Retry, stateless reset.

Headers are parsed straight from the datagram ``bytes`` (no Buffer): this runs for every received packet.
Header protection is not this module's concern: ``first_byte`` and the packet number are still protected when
``parse_header`` returns (the crypto layer unmasks them using ``pn_offset``).
"""

from __future__ import annotations

import hmac
import os
from enum import IntEnum

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .buffer import encode_uint_var
from .errors import QuicErrorCode, QuicProtocolError

QUIC_VERSION_1 = 0x00000001
MAX_CID_LENGTH = 20
RETRY_INTEGRITY_TAG_SIZE = 16
STATELESS_RESET_TOKEN_SIZE = 16
MIN_STATELESS_RESET_SIZE = 21  # RFC 9000 §10.3: 5 unpredictable bytes + 16-byte token

_LONG_FORM = 0x80
_FIXED_BIT = 0x40

# RFC 9001 §5.8, QUIC v1
_RETRY_AEAD = AESGCM(bytes.fromhex("be0c690b9f66575a1d766b54e368c84e"))
_RETRY_NONCE = bytes.fromhex("461599d35d632bf2239825bb")

_VARINT_MASK = (0x3F, 0x3FFF, 0x3FFFFFFF, 0x3FFFFFFFFFFFFFFF)


class PacketType(IntEnum):
    INITIAL = 0
    ZERO_RTT = 1
    HANDSHAKE = 2
    RETRY = 3
    VERSION_NEGOTIATION = 4
    ONE_RTT = 5


_LONG_PACKET_TYPES = (PacketType.INITIAL, PacketType.ZERO_RTT, PacketType.HANDSHAKE, PacketType.RETRY)


class Header:
    """A parsed packet header.

    ``packet_type`` is None for a long header of an unknown version (only the RFC 8999 invariants were parsed).
    ``pn_offset`` is the offset of the packet number field in the datagram; for Retry, Version Negotiation and
    unknown versions (no packet number) it equals ``packet_end``. ``packet_end`` is where this packet ends in the
    datagram (the next coalesced packet, if any, starts there). ``supported_versions`` is only filled for
    Version Negotiation (an empty tuple otherwise).
    """

    __slots__ = (
        "is_long", "version", "packet_type", "dcid", "scid", "token", "integrity_tag", "supported_versions",
        "pn_offset", "packet_end", "first_byte",
    )

    def __init__(
        self, is_long: bool, version: int | None, packet_type: PacketType | None, dcid: bytes, scid: bytes,
        first_byte: int, pn_offset: int, packet_end: int, token: bytes = b"", integrity_tag: bytes = b"",
        supported_versions: list[int] | tuple[()] = (),
    ) -> None:
        self.is_long = is_long
        self.version = version
        self.packet_type = packet_type
        self.dcid = dcid
        self.scid = scid
        self.first_byte = first_byte
        self.pn_offset = pn_offset
        self.packet_end = packet_end
        self.token = token
        self.integrity_tag = integrity_tag
        self.supported_versions = supported_versions

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Header({fields})"


def _malformed(reason: str) -> QuicProtocolError:
    return QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, reason)


def _pull_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """Read a varint at ``pos`` (not beyond ``end``); returns (value, new position)."""
    if pos >= end:
        raise _malformed("truncated varint")
    kind = data[pos] >> 6
    stop = pos + (1 << kind)
    if stop > end:
        raise _malformed("truncated varint")
    return int.from_bytes(data[pos:stop], "big") & _VARINT_MASK[kind], stop


def parse_header(data: bytes, offset: int, host_cid_length: int, *, fixed_bit_required: bool = True) -> Header:
    """Parse the header of the packet starting at ``offset`` of UDP datagram ``data``.

    ``host_cid_length`` is the length of our connection IDs (short headers do not carry it). Set
    ``fixed_bit_required=False`` once the peer may grease the QUIC bit (RFC 9287). Raises QuicProtocolError on
    malformed input; a long header with an unknown version is returned with only the invariant fields.
    """
    end = len(data)
    if offset >= end:
        raise _malformed("empty packet")
    first = data[offset]

    if not first & _LONG_FORM:
        pn_offset = offset + 1 + host_cid_length
        if pn_offset >= end:
            raise _malformed("short header truncated")
        if fixed_bit_required and not first & _FIXED_BIT:
            raise _malformed("fixed bit is clear")
        return Header(False, None, PacketType.ONE_RTT, data[offset + 1:pn_offset], b"", first, pn_offset, end)

    # Long header invariants (RFC 8999 §5.1)
    if offset + 7 > end:
        raise _malformed("long header truncated")
    version = int.from_bytes(data[offset + 1:offset + 5], "big")
    pos = offset + 6
    dcid_end = pos + data[offset + 5]
    if dcid_end >= end:
        raise _malformed("long header truncated")
    dcid = data[pos:dcid_end]
    pos = dcid_end + 1
    scid_end = pos + data[dcid_end]
    if scid_end > end:
        raise _malformed("long header truncated")
    scid = data[pos:scid_end]
    pos = scid_end

    if version == 0:
        if (end - pos) % 4:
            raise _malformed("version negotiation list is not a multiple of 4 bytes")
        versions = [int.from_bytes(data[i:i + 4], "big") for i in range(pos, end, 4)]
        return Header(True, 0, PacketType.VERSION_NEGOTIATION, dcid, scid, first, end, end,
                      supported_versions=versions)
    if version != QUIC_VERSION_1:
        return Header(True, version, None, dcid, scid, first, end, end)

    if len(dcid) > MAX_CID_LENGTH or len(scid) > MAX_CID_LENGTH:
        raise _malformed("connection ID too long")
    if fixed_bit_required and not first & _FIXED_BIT:
        raise _malformed("fixed bit is clear")
    packet_type = _LONG_PACKET_TYPES[(first & 0x30) >> 4]

    if packet_type is PacketType.RETRY:
        tag_start = end - RETRY_INTEGRITY_TAG_SIZE
        if tag_start < pos:
            raise _malformed("retry packet truncated")
        return Header(True, version, packet_type, dcid, scid, first, end, end,
                      token=data[pos:tag_start], integrity_tag=data[tag_start:end])

    token = b""
    if packet_type is PacketType.INITIAL:
        token_length, pos = _pull_varint(data, pos, end)
        if pos + token_length > end:
            raise _malformed("token truncated")
        token = data[pos:pos + token_length]
        pos += token_length
    length, pos = _pull_varint(data, pos, end)
    packet_end = pos + length
    if packet_end > end:
        raise _malformed("packet length beyond the datagram")
    return Header(True, version, packet_type, dcid, scid, first, pos, packet_end, token=token)


def encode_long_header(
    packet_type: PacketType, version: int, dcid: bytes, scid: bytes, token: bytes, pn_len: int,
    payload_length_with_pn_and_tag: int, truncated_pn: int,
) -> bytes:
    """Unprotected long header up to and including the packet number (Initial, 0-RTT, Handshake).

    ``payload_length_with_pn_and_tag`` is the value of the Length field: packet number + payload + AEAD tag.
    """
    if packet_type not in (PacketType.INITIAL, PacketType.ZERO_RTT, PacketType.HANDSHAKE):
        raise ValueError(f"cannot encode a {packet_type!r} packet with encode_long_header")
    if token and packet_type != PacketType.INITIAL:
        raise ValueError("only Initial packets carry a token")
    length = payload_length_with_pn_and_tag
    parts = [
        bytes((_LONG_FORM | _FIXED_BIT | (packet_type << 4) | (pn_len - 1),)),
        version.to_bytes(4, "big"),
        bytes((len(dcid),)), dcid,
        bytes((len(scid),)), scid,
    ]
    if packet_type == PacketType.INITIAL:
        parts += (encode_uint_var(len(token)), token)
    if length <= 0x3FFF:
        parts.append((length | 0x4000).to_bytes(2, "big"))
    elif length <= 0x3FFFFFFF:
        parts.append((length | 0x80000000).to_bytes(4, "big"))
    else:
        raise ValueError("packet length too large")
    parts.append(truncated_pn.to_bytes(pn_len, "big"))
    return b"".join(parts)


def encode_short_header(dcid: bytes, key_phase: int, spin: int, pn_len: int, truncated_pn: int) -> bytes:
    """Unprotected 1-RTT header up to and including the packet number."""
    first = _FIXED_BIT | (spin << 5) | (key_phase << 2) | (pn_len - 1)
    return bytes((first,)) + dcid + truncated_pn.to_bytes(pn_len, "big")


def encode_packet_number(full_pn: int, largest_acked: int | None) -> tuple[int, int]:
    """(truncated packet number, its length in bytes) per RFC 9000 §17.1 / A.2.

    Uses the fewest bytes whose range is at least twice the number of packets since ``largest_acked``.
    """
    unacked = full_pn + 1 if largest_acked is None else full_pn - largest_acked
    needed = 2 * max(unacked, 1)
    for pn_len in (1, 2, 3, 4):
        if needed <= 1 << (8 * pn_len):
            return full_pn & ((1 << (8 * pn_len)) - 1), pn_len
    raise ValueError("too many unacknowledged packets to encode the packet number")


def decode_packet_number(truncated: int, pn_nbits: int, expected: int) -> int:
    """Full packet number from its ``pn_nbits`` low bits (RFC 9000 A.3); ``expected`` = largest received + 1."""
    window = 1 << pn_nbits
    half = window >> 1
    candidate = (expected & ~(window - 1)) | truncated
    if candidate <= expected - half and candidate < (1 << 62) - window:
        return candidate + window
    if candidate > expected + half and candidate >= window:
        return candidate - window
    return candidate


def build_version_negotiation(dcid: bytes, scid: bytes, versions: list[int]) -> bytes:
    """Version Negotiation packet. ``dcid`` is the client packet's SCID, ``scid`` its DCID (RFC 9000 §17.2.1)."""
    first = _LONG_FORM | (os.urandom(1)[0] & 0x7F)
    return b"".join((
        bytes((first,)), b"\x00\x00\x00\x00", bytes((len(dcid),)), dcid, bytes((len(scid),)), scid,
        *(v.to_bytes(4, "big") for v in versions),
    ))


def _retry_integrity_tag(odcid: bytes, retry_without_tag: bytes) -> bytes:
    pseudo_packet = bytes((len(odcid),)) + odcid + retry_without_tag
    return _RETRY_AEAD.encrypt(_RETRY_NONCE, b"", pseudo_packet)


def build_retry(version: int, dcid: bytes, scid: bytes, odcid: bytes, token: bytes) -> bytes:
    """Retry packet with its integrity tag (RFC 9001 §5.8). ``dcid`` is the client's SCID; ``scid`` our new CID."""
    if version != QUIC_VERSION_1:
        raise ValueError("Retry integrity keys are only known for QUIC v1")
    packet = b"".join((
        bytes((_LONG_FORM | _FIXED_BIT | (PacketType.RETRY << 4) | 0x0F,)), version.to_bytes(4, "big"),
        bytes((len(dcid),)), dcid, bytes((len(scid),)), scid, token,
    ))
    return packet + _retry_integrity_tag(odcid, packet)


def verify_retry_integrity(header: Header, datagram: bytes, odcid: bytes) -> bool:
    """Check a parsed Retry packet's integrity tag; ``odcid`` is the DCID of the client's first Initial."""
    if header.packet_type != PacketType.RETRY or header.version != QUIC_VERSION_1:
        return False
    tag_start = header.packet_end - RETRY_INTEGRITY_TAG_SIZE
    start = tag_start - (7 + len(header.dcid) + len(header.scid) + len(header.token))
    if start < 0:
        return False
    expected = _retry_integrity_tag(odcid, datagram[start:tag_start])
    return hmac.compare_digest(expected, header.integrity_tag)


def is_stateless_reset(datagram: bytes, known_tokens) -> bool:
    """Whether the datagram ends with one of ``known_tokens`` (RFC 9000 §10.3.1); compared in constant time."""
    if len(datagram) < MIN_STATELESS_RESET_SIZE:
        return False
    tail = datagram[-STATELESS_RESET_TOKEN_SIZE:]
    found = False
    for token in known_tokens:
        found |= hmac.compare_digest(tail, token)
    return found


def build_stateless_reset(token: bytes, min_size: int) -> bytes:
    """Random bytes looking like a short-header packet, ``max(min_size, 21)`` long, ending with ``token``."""
    size = max(min_size, MIN_STATELESS_RESET_SIZE)
    head = os.urandom(size - STATELESS_RESET_TOKEN_SIZE)
    return bytes(((head[0] & 0x3F) | _FIXED_BIT,)) + head[1:] + token
