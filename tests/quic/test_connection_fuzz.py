"""Hostile input to a live connection: nothing may escape receive_datagram but a clean QUIC close."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mqvpn.quic import events as ev
from mqvpn.quic.connection import ConnectionState
from mqvpn.quic.crypto import protect_packet
from mqvpn.quic.errors import QuicErrorCode

from tests.interop.pki import make_test_pki
from tests.quic.pair import CLIENT_ADDR, SERVER_ADDR, Pair
from tests.quic.test_connection import handshake

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def live(pki):
    pair = Pair(pki)
    handshake(pair)
    pair.run(until=lambda: pair.client._handshake_confirmed, max_time=1)
    return pair


def _seal_from_server(pair, payload: bytes) -> bytes:
    """A 1-RTT packet the client will decrypt: it carries ``payload`` as its frames."""
    server = pair.server
    path = server._paths[0]
    pn = path.space.next_pn
    path.space.next_pn += 1
    header = bytes((0x40 | (server._key_phase << 2) | 3,)) + path.peer_cid.cid + pn.to_bytes(4, "big")
    if len(payload) < 4:
        payload += bytes(4 - len(payload))
    return protect_packet(server._send_key[3], server._send_hp[3], header, payload, pn)


@FUZZ
@given(data=st.binary(min_size=0, max_size=1500))
def test_random_datagrams_are_dropped(live, data):
    live.client.receive_datagram(data, SERVER_ADDR, live.now, CLIENT_ADDR)
    live.server.receive_datagram(data, CLIENT_ADDR, live.now, SERVER_ADDR)
    assert live.client.state == ConnectionState.CONNECTED
    assert live.server.state == ConnectionState.CONNECTED


@FUZZ
@given(flip=st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 255)), min_size=1, max_size=4))
def test_corrupted_packets_are_dropped(live, flip):
    live.server.send_datagram_frame(b"hello" * 20)
    datagrams = live.server.datagrams_to_send(live.now)
    for data, _, _ in datagrams:
        mutated = bytearray(data)
        for pos, x in flip:
            mutated[pos % len(mutated)] ^= x
        live.client.receive_datagram(bytes(mutated), SERVER_ADDR, live.now, CLIENT_ADDR)
    assert live.client.state == ConnectionState.CONNECTED


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(min_size=1, max_size=300))
def test_decryptable_garbage_frames_close_cleanly(pki, payload):
    pair = _fresh_pair(pki)
    pair.client.receive_datagram(_seal_from_server(pair, payload), SERVER_ADDR, pair.now, CLIENT_ADDR)
    state = pair.client.state
    assert state in (ConnectionState.CONNECTED, ConnectionState.CLOSING, ConnectionState.DRAINING)
    if state == ConnectionState.CLOSING:
        closes = [e for e in iter(pair.client.next_event, None) if isinstance(e, ev.ConnectionTerminated)]
        assert closes and closes[-1].error_code in {int(c) for c in QuicErrorCode} | {0}
        # the close goes out on the wire
        assert pair.client.datagrams_to_send(pair.now)


_PAIRS = []


def _fresh_pair(pki):
    # a new connected pair per example is slow; reuse one until it closes
    if _PAIRS and _PAIRS[0].client.state == ConnectionState.CONNECTED:
        return _PAIRS[0]
    pair = Pair(pki)
    handshake(pair)
    pair.run(until=lambda: pair.client._handshake_confirmed, max_time=1)
    _PAIRS[:] = [pair]
    return pair


@pytest.mark.parametrize("payload,code", [
    (b"\x1e", QuicErrorCode.PROTOCOL_VIOLATION),            # HANDSHAKE_DONE is fine from a server: no close
    (b"\x40\x30", None),                                     # non-minimal PING-less varint type 0x30 = DATAGRAM
    (b"\x21", QuicErrorCode.FRAME_ENCODING_ERROR),           # unknown frame type
    (b"\x02\x05\x00\x00\x00", QuicErrorCode.PROTOCOL_VIOLATION),  # ACK of a packet never sent
    (b"\x08\x04", QuicErrorCode.STREAM_STATE_ERROR),          # STREAM on a stream the client never opened
    (b"\x0b\x03\x01x", None),                                 # STREAM on a server uni stream: fine
    (b"\x10\xc0", QuicErrorCode.FRAME_ENCODING_ERROR),       # truncated MAX_DATA
    (b"\x07\x00", QuicErrorCode.FRAME_ENCODING_ERROR),       # empty NEW_TOKEN
    (b"\x19\x00", QuicErrorCode.PROTOCOL_VIOLATION),         # RETIRE_CONNECTION_ID of the CID this packet used
    (b"\x19\x09", QuicErrorCode.PROTOCOL_VIOLATION),         # RETIRE_CONNECTION_ID of a CID never issued
])
def test_specific_frames(pki, payload, code):
    pair = Pair(pki)
    handshake(pair)
    pair.run(until=lambda: pair.client._handshake_confirmed, max_time=1)
    list(iter(pair.client.next_event, None))
    pair.client.receive_datagram(_seal_from_server(pair, payload), SERVER_ADDR, pair.now, CLIENT_ADDR)
    closes = [e for e in iter(pair.client.next_event, None) if isinstance(e, ev.ConnectionTerminated)]
    if code is None or payload == b"\x1e":
        assert not closes, closes
    else:
        assert closes and closes[0].error_code == code, closes
