import pytest
from hypothesis import given, strategies as st

from mqvpn.quic.errors import QuicErrorCode, QuicProtocolError
from mqvpn.quic.packet import (
    QUIC_VERSION_1,
    PacketType,
    build_retry,
    build_stateless_reset,
    build_version_negotiation,
    decode_packet_number,
    encode_long_header,
    encode_packet_number,
    encode_short_header,
    is_stateless_reset,
    parse_header,
    verify_retry_integrity,
)

H = bytes.fromhex
CLIENT_DCID = H("8394c8f03e515708")
SERVER_SCID = H("f067a5502a4262b5")
# RFC 9001 Appendix A: unprotected headers and the Retry packet
A2_CLIENT_INITIAL_HEADER = H("c300000001088394c8f03e5157080000449e00000002")
A3_SERVER_INITIAL_HEADER = H("c1000000010008f067a5502a4262b50040750001")
A4_RETRY = H("ff000000010008f067a5502a4262b5746f6b656e04a265ba2eff4d829058fb3f0f2496ba")
A5_SHORT_HEADER = H("4200bff4")


def expect_error(data: bytes, offset: int = 0, host_cid_length: int = 8) -> QuicProtocolError:
    with pytest.raises(QuicProtocolError) as info:
        parse_header(data, offset, host_cid_length)
    assert info.value.error_code == QuicErrorCode.PROTOCOL_VIOLATION
    return info.value


# --- RFC 9001 Appendix A headers ---------------------------------------------------------------------------------

def test_client_initial_a2():
    assert encode_long_header(PacketType.INITIAL, QUIC_VERSION_1, CLIENT_DCID, b"", b"", 4, 1182, 2) == (
        A2_CLIENT_INITIAL_HEADER
    )
    datagram = A2_CLIENT_INITIAL_HEADER + bytes(1200 - len(A2_CLIENT_INITIAL_HEADER))
    h = parse_header(datagram, 0, 8)
    assert (h.is_long, h.version, h.packet_type) == (True, QUIC_VERSION_1, PacketType.INITIAL)
    assert (h.dcid, h.scid, h.token, h.first_byte) == (CLIENT_DCID, b"", b"", 0xC3)
    assert (h.pn_offset, h.packet_end) == (18, 1200)
    # the protected packet parses the same (header protection only masks bits the parser does not use)
    protected = H("c000000001088394c8f03e5157080000449e7b9aec34") + bytes(1178)
    h = parse_header(protected, 0, 8)
    assert (h.packet_type, h.pn_offset, h.packet_end, h.first_byte) == (PacketType.INITIAL, 18, 1200, 0xC0)


def test_server_initial_a3():
    assert encode_long_header(PacketType.INITIAL, QUIC_VERSION_1, b"", SERVER_SCID, b"", 2, 0x75, 1) == (
        A3_SERVER_INITIAL_HEADER
    )
    datagram = A3_SERVER_INITIAL_HEADER + bytes(0x75 - 2)
    h = parse_header(datagram, 0, 0)
    assert (h.packet_type, h.dcid, h.scid, h.pn_offset, h.packet_end) == (
        PacketType.INITIAL, b"", SERVER_SCID, 18, 18 + 0x75)


def test_short_header_a5():
    assert encode_short_header(b"", 0, 0, 3, 0xBFF4) == A5_SHORT_HEADER
    datagram = A5_SHORT_HEADER + bytes(20)
    h = parse_header(datagram, 0, 0)
    assert (h.is_long, h.version, h.packet_type, h.dcid, h.scid) == (False, None, PacketType.ONE_RTT, b"", b"")
    assert (h.pn_offset, h.packet_end, h.first_byte) == (1, len(datagram), 0x42)


def test_short_header_bits():
    header = encode_short_header(b"\xaa" * 8, 1, 1, 2, 0x1234)
    assert header == bytes((0x40 | 0x20 | 0x04 | 0x01,)) + b"\xaa" * 8 + b"\x12\x34"
    h = parse_header(header + bytes(20), 0, 8)
    assert (h.dcid, h.pn_offset) == (b"\xaa" * 8, 9)


def test_long_header_length_field_size():
    short = encode_long_header(PacketType.HANDSHAKE, QUIC_VERSION_1, b"d", b"s", b"", 1, 0x3FFF, 0)
    long = encode_long_header(PacketType.HANDSHAKE, QUIC_VERSION_1, b"d", b"s", b"", 1, 0x4000, 0)
    assert short[-3:-1] == b"\x7f\xff"
    assert long[-5:-1] == b"\x80\x00\x40\x00"
    assert short[0] == 0xE0
    with pytest.raises(ValueError):
        encode_long_header(PacketType.HANDSHAKE, QUIC_VERSION_1, b"", b"", b"tok", 1, 20, 0)
    with pytest.raises(ValueError):
        encode_long_header(PacketType.RETRY, QUIC_VERSION_1, b"", b"", b"", 1, 20, 0)


# --- Retry ---------------------------------------------------------------------------------------------------------

def test_retry_a4():
    assert build_retry(QUIC_VERSION_1, b"", SERVER_SCID, CLIENT_DCID, b"token") == A4_RETRY
    h = parse_header(A4_RETRY, 0, 0)
    assert (h.packet_type, h.dcid, h.scid, h.token) == (PacketType.RETRY, b"", SERVER_SCID, b"token")
    assert h.integrity_tag == A4_RETRY[-16:]
    assert h.packet_end == len(A4_RETRY)
    assert verify_retry_integrity(h, A4_RETRY, CLIENT_DCID)
    assert not verify_retry_integrity(h, A4_RETRY, CLIENT_DCID[:-1] + b"\x00")


def test_retry_tampering_detected():
    for i in range(len(A4_RETRY)):
        tampered = bytearray(A4_RETRY)
        tampered[i] ^= 0x01
        tampered = bytes(tampered)
        try:
            h = parse_header(tampered, 0, 0)
        except QuicProtocolError:
            continue
        assert h.packet_type != PacketType.RETRY or not verify_retry_integrity(h, tampered, CLIENT_DCID)


def test_retry_after_another_packet():
    first = encode_long_header(PacketType.HANDSHAKE, QUIC_VERSION_1, b"c" * 4, b"s" * 4, b"", 1, 21, 0) + bytes(20)
    retry = build_retry(QUIC_VERSION_1, b"c" * 4, b"n" * 8, b"o" * 8, b"a-token")
    datagram = first + retry
    h = parse_header(datagram, len(first), 4)
    assert (h.packet_type, h.token, h.scid) == (PacketType.RETRY, b"a-token", b"n" * 8)
    assert verify_retry_integrity(h, datagram, b"o" * 8)


def test_retry_too_short():
    # the header is 15 bytes; what follows is token + 16-byte tag
    expect_error(A4_RETRY[:15 + 15])
    h = parse_header(A4_RETRY[:15 + 16], 0, 0)
    assert (h.token, h.integrity_tag) == (b"", A4_RETRY[15:31])


# --- Version Negotiation and unknown versions --------------------------------------------------------------------

def test_version_negotiation():
    packet = build_version_negotiation(b"client-scid", b"client-dcid", [QUIC_VERSION_1, 0x0A1A2A3A])
    assert packet[0] & 0x80 and packet[1:5] == bytes(4)
    h = parse_header(packet, 0, 0)
    assert (h.is_long, h.version, h.packet_type) == (True, 0, PacketType.VERSION_NEGOTIATION)
    assert (h.dcid, h.scid) == (b"client-scid", b"client-dcid")
    assert h.supported_versions == [QUIC_VERSION_1, 0x0A1A2A3A]
    assert h.packet_end == len(packet)
    expect_error(packet + b"\x00")


def test_unknown_version_returns_invariants():
    # RFC 8999: connection IDs up to 255 bytes, anything after them is version-specific
    packet = b"\xc0" + (0x1A2A3A4A).to_bytes(4, "big") + bytes((30,)) + b"d" * 30 + b"\x05" + b"s" * 5 + b"?" * 1200
    h = parse_header(packet, 0, 8)
    assert (h.is_long, h.version, h.packet_type, h.dcid, h.scid) == (True, 0x1A2A3A4A, None, b"d" * 30, b"s" * 5)
    assert h.packet_end == len(packet)
    # fixed bit clear is fine for an unknown version
    h = parse_header(b"\x80" + packet[1:], 0, 8)
    assert h.version == 0x1A2A3A4A


# --- Coalesced packets ---------------------------------------------------------------------------------------------

def test_coalesced_packets():
    dcid, scid = b"D" * 8, b"S" * 8
    initial = encode_long_header(PacketType.INITIAL, QUIC_VERSION_1, dcid, scid, b"tk", 2, 40, 7) + b"i" * 38
    handshake = encode_long_header(PacketType.HANDSHAKE, QUIC_VERSION_1, dcid, scid, b"", 1, 30, 3) + b"h" * 29
    one_rtt = encode_short_header(dcid, 0, 0, 1, 9) + b"o" * 30
    datagram = initial + handshake + one_rtt

    headers, offset = [], 0
    while offset < len(datagram):
        h = parse_header(datagram, offset, 8)
        headers.append(h)
        offset = h.packet_end
    assert [h.packet_type for h in headers] == [PacketType.INITIAL, PacketType.HANDSHAKE, PacketType.ONE_RTT]
    assert headers[0].token == b"tk"
    assert headers[0].packet_end == len(initial)
    assert headers[1].packet_end == len(initial) + len(handshake)
    assert headers[1].pn_offset == len(initial) + len(handshake) - 30
    assert headers[2].pn_offset == len(initial) + len(handshake) + 9
    assert all(h.dcid == dcid for h in headers)


# --- Malformed input -----------------------------------------------------------------------------------------------

def test_malformed_headers():
    valid = A2_CLIENT_INITIAL_HEADER + bytes(1200 - len(A2_CLIENT_INITIAL_HEADER))
    expect_error(b"")
    expect_error(valid, offset=len(valid))
    for cut in range(1, 18):
        expect_error(valid[:cut])  # truncated before the Length field ends
    expect_error(valid[:1199])  # Length beyond the datagram
    expect_error(bytes((valid[0] & ~0x40,)) + valid[1:])  # fixed bit clear
    expect_error(b"\xc0\x00\x00\x00\x01\x15" + b"d" * 21 + b"\x00\x00\x01\x00")  # DCID longer than 20
    expect_error(b"\xc0\x00\x00\x00\x01\x00\x15" + b"s" * 21 + b"\x00\x01\x00")  # SCID longer than 20
    expect_error(b"\xc0\x00\x00\x00\x01\x00\x00\x05abc")  # token beyond the datagram
    expect_error(b"\x40" + b"d" * 8)  # short header with nothing after the DCID
    expect_error(b"\x00" + b"d" * 8 + b"\x00" * 20)  # short header, fixed bit clear
    h = parse_header(b"\x00" + b"d" * 8 + b"\x00" * 20, 0, 8, fixed_bit_required=False)
    assert h.packet_type == PacketType.ONE_RTT


@given(st.binary(max_size=80), st.integers(0, 80), st.integers(0, 20))
def test_fuzz_parse_header(data, offset, host_cid_length):
    try:
        h = parse_header(data, offset, host_cid_length)
    except QuicProtocolError as exc:
        assert exc.error_code in (QuicErrorCode.PROTOCOL_VIOLATION, QuicErrorCode.FRAME_ENCODING_ERROR)
        return
    assert offset < h.pn_offset <= h.packet_end <= len(data)


long_packet_types = st.sampled_from([PacketType.INITIAL, PacketType.ZERO_RTT, PacketType.HANDSHAKE])
cids = st.binary(max_size=20)


@st.composite
def long_packets(draw):
    packet_type = draw(long_packet_types)
    dcid, scid = draw(cids), draw(cids)
    token = draw(st.binary(max_size=100)) if packet_type == PacketType.INITIAL else b""
    pn_len = draw(st.integers(1, 4))
    length = draw(st.integers(pn_len, 20000))
    pn = draw(st.integers(0, (1 << (8 * pn_len)) - 1))
    header = encode_long_header(packet_type, QUIC_VERSION_1, dcid, scid, token, pn_len, length, pn)
    return (packet_type, dcid, scid, token, pn_len, length, pn), header + bytes(length - pn_len)


@given(long_packets(), st.binary(max_size=30))
def test_long_header_round_trip(packet, trailing):
    (packet_type, dcid, scid, token, pn_len, length, pn), data = packet
    datagram = b"x" * 3 + data + trailing
    h = parse_header(datagram, 3, 8)
    assert (h.packet_type, h.version, h.dcid, h.scid, h.token) == (packet_type, QUIC_VERSION_1, dcid, scid, token)
    assert h.packet_end == 3 + len(data)
    assert h.packet_end - h.pn_offset == length
    assert (h.first_byte & 0x03) + 1 == pn_len
    assert int.from_bytes(datagram[h.pn_offset:h.pn_offset + pn_len], "big") == pn


@given(st.binary(max_size=20), st.integers(0, 1), st.integers(0, 1), st.integers(1, 4), st.data())
def test_short_header_round_trip(dcid, key_phase, spin, pn_len, data):
    pn = data.draw(st.integers(0, (1 << (8 * pn_len)) - 1))
    datagram = encode_short_header(dcid, key_phase, spin, pn_len, pn) + data.draw(st.binary(max_size=40))
    h = parse_header(datagram, 0, len(dcid))
    assert (h.dcid, h.pn_offset, h.packet_end) == (dcid, 1 + len(dcid), len(datagram))
    assert (h.first_byte >> 2) & 1 == key_phase and (h.first_byte >> 5) & 1 == spin
    assert int.from_bytes(datagram[h.pn_offset:h.pn_offset + pn_len], "big") == pn


@given(long_packets(), st.integers(0, 10_000), st.integers(0, 255))
def test_fuzz_mutated_packets(packet, position, value):
    _, data = packet
    mutated = bytearray(data)
    mutated[position % len(mutated)] = value
    for candidate in (bytes(mutated), data[: position % len(data)]):
        try:
            h = parse_header(candidate, 0, 8)
        except QuicProtocolError:
            continue
        assert h.pn_offset <= h.packet_end <= len(candidate)


# --- Packet numbers ------------------------------------------------------------------------------------------------

def test_packet_number_rfc_examples():
    assert encode_packet_number(0xAC5C02, 0xABE8B3) == (0x5C02, 2)
    assert encode_packet_number(0xACE8FE, 0xABE8B3) == (0xACE8FE, 3)
    assert decode_packet_number(0x9B32, 16, 0xA82F30EB) == 0xA82F9B32
    assert encode_packet_number(0, None) == (0, 1)
    assert encode_packet_number(127, None) == (127, 1)
    assert encode_packet_number(128, None) == (128, 2)
    assert encode_packet_number(200, 100) == (200, 1)
    with pytest.raises(ValueError):
        encode_packet_number(1 << 40, None)


def test_decode_packet_number_edges():
    assert decode_packet_number(0xFF, 8, 0x100) == 0xFF  # just below expected
    assert decode_packet_number(0x01, 8, 0xFF) == 0x101  # wraps forward
    assert decode_packet_number(0xFE, 8, 0x01) == 0xFE  # cannot go negative
    top = (1 << 62) - 1
    assert decode_packet_number(top & 0xFFFF, 16, top) == top  # never beyond 2^62 - 1


@given(st.integers(0, (1 << 62) - 1 - (1 << 30)), st.integers(1, (1 << 30) - 1), st.data())
def test_packet_number_round_trip(largest_acked, distance, data):
    full_pn = largest_acked + distance
    truncated, pn_len = encode_packet_number(full_pn, largest_acked)
    assert truncated < 1 << (8 * pn_len)
    # the receiver has received at least largest_acked, possibly more
    largest_received = data.draw(st.integers(largest_acked, full_pn - 1))
    assert decode_packet_number(truncated, 8 * pn_len, largest_received + 1) == full_pn


@given(st.integers(0, (1 << 30) - 1))
def test_packet_number_round_trip_nothing_acked(full_pn):
    truncated, pn_len = encode_packet_number(full_pn, None)
    assert decode_packet_number(truncated, 8 * pn_len, 0) == full_pn


# --- Stateless reset -----------------------------------------------------------------------------------------------

def test_stateless_reset():
    token = bytes(range(16))
    for min_size in (0, 21, 43, 1200):
        packet = build_stateless_reset(token, min_size)
        assert len(packet) == max(min_size, 21)
        assert packet.endswith(token)
        assert packet[0] & 0xC0 == 0x40  # looks like a short header
        assert is_stateless_reset(packet, {b"\xff" * 16, token})
        assert is_stateless_reset(packet, [token])
        assert not is_stateless_reset(packet, {b"\xff" * 16})
        assert not is_stateless_reset(packet, [])
    assert not is_stateless_reset(b"\x40" * 4 + token, {token})  # 20 bytes: too short
    assert is_stateless_reset(b"\x40" * 5 + token, {token})
