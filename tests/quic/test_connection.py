import hashlib
import os

import pytest

from mqvpn.quic import events as ev
from mqvpn.quic.connection import ConnectionState

from tests.interop.pki import make_test_pki
from tests.quic.pair import Pair


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def handshake(pair):
    pair.connect()
    pair.run(until=lambda: any(isinstance(e, ev.HandshakeCompleted) for e in pair.client_events)
             and pair.server is not None
             and any(isinstance(e, ev.HandshakeCompleted) for e in pair.server_events))
    assert any(isinstance(e, ev.HandshakeCompleted) for e in pair.client_events), pair.client_events
    assert any(isinstance(e, ev.HandshakeCompleted) for e in pair.server_events), pair.server_events


def test_handshake(pki):
    pair = Pair(pki)
    handshake(pair)
    assert pair.client.alpn_protocol == "test" == pair.server.alpn_protocol
    pair.run(until=lambda: pair.client._handshake_confirmed, max_time=1)
    assert pair.client._handshake_confirmed and pair.server._handshake_confirmed


def _stream_roundtrip(pair, size, timeout=120.0):
    handshake(pair)
    payload = os.urandom(size)
    sid = pair.client.get_next_available_stream_id()
    pair.client.send_stream_data(sid, payload, end_stream=True)
    received = bytearray()
    done = []

    def check():
        while pair.server_events:
            e = pair.server_events.pop(0)
            if isinstance(e, ev.StreamDataReceived):
                received.extend(e.data)
                if e.end_stream:
                    done.append(True)
        return bool(done)

    pair.run(until=check, max_time=timeout)
    assert done, (len(received), size)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_stream_1mb(pki):
    _stream_roundtrip(Pair(pki), 1 << 20)


@pytest.mark.parametrize("loss", [0.01, 0.05, 0.2])
def test_stream_with_loss(pki, loss):
    _stream_roundtrip(Pair(pki, loss=loss, seed=7), 300_000)


def test_datagrams(pki):
    pair = Pair(pki)
    handshake(pair)
    got = []
    pair.server.datagram_handler = got.append
    room = pair.client.datagram_room
    assert 1000 < room < 1200
    for i in range(500):
        assert pair.client.send_datagram_frame(i.to_bytes(4, "big") * 10)
        if i % 10 == 0:
            pair.step()
    pair.run(until=lambda: len(got) == 500, max_time=5)
    assert sorted(int.from_bytes(d[:4], "big") for d in got) == list(range(500))
    assert not pair.client.send_datagram_frame(b"x" * (pair.client.datagram_room + 1))
    assert pair.client.datagrams_dropped == 1


def test_key_update_both_ways(pki):
    pair = Pair(pki)
    handshake(pair)
    pair.run(until=lambda: pair.client._handshake_confirmed, max_time=1)
    got = []
    pair.server.datagram_handler = got.append
    pair.client.request_key_update()
    for i in range(20):
        pair.client.send_datagram_frame(b"a" * 100)
        pair.step()
    pair.run(until=lambda: len(got) == 20, max_time=5)
    assert pair.client.key_updates == 1 and pair.server.key_updates == 1
    pair.server.request_key_update()
    for i in range(20):
        pair.client.send_datagram_frame(b"b" * 100)
        pair.server.send_datagram_frame(b"c" * 100)
        pair.step()
    pair.run(until=lambda: len(got) == 40, max_time=5)
    assert len(got) == 40
    assert pair.client.key_updates == 2 and pair.server.key_updates == 2


def test_close_and_idle(pki):
    pair = Pair(pki)
    handshake(pair)
    pair.client.close(7, "bye")
    pair.run(until=lambda: any(isinstance(e, ev.ConnectionTerminated) for e in pair.server_events), max_time=2)
    term = [e for e in pair.server_events if isinstance(e, ev.ConnectionTerminated)]
    assert term and term[0].error_code == 7 and term[0].reason_phrase == "bye" and term[0].by_peer
    pair.run(max_time=10)
    assert pair.client.state == ConnectionState.TERMINATED
    assert pair.server.state == ConnectionState.TERMINATED


def test_idle_timeout(pki):
    pair = Pair(pki, idle_timeout=2.0)
    handshake(pair)
    start = pair.now
    pair.run(max_time=30)
    assert pair.client.state == ConnectionState.TERMINATED
    assert 1.9 < pair.now - start < 4
    assert any(isinstance(e, ev.ConnectionTerminated) and e.reason_phrase == "idle timeout"
               for e in pair.client_events)


def test_pmtud_raises_datagram_room(pki):
    pair = Pair(pki)
    handshake(pair)
    before = pair.client.datagram_room
    pair.run(until=lambda: pair.client._paths[0].mtu == 1452 and pair.server._paths[0].mtu == 1452, max_time=5)
    assert pair.client._paths[0].mtu == 1452
    assert pair.client.datagram_room == before + 252


def test_qlog_json_seq(pki, tmp_path):
    import io

    from mqvpn.quic.qlog import QlogTrace, read_qlog

    stream = io.StringIO()
    pair = Pair(pki)
    pair.client_cfg.qlog = QlogTrace(stream, vantage_point="client")
    from mqvpn.quic.connection import QuicConnection
    pair.client = QuicConnection(pair.client_cfg)
    handshake(pair)
    pair.client.send_datagram_frame(b"x" * 100)
    pair.run(max_time=0.5)
    pair.client.close(0, "done")
    pair.run(max_time=2)
    text = stream.getvalue()
    assert text.startswith("\x1e{")
    records = read_qlog(text)
    assert records[0]["qlog_format"] == "JSON-SEQ"
    names = {r.get("name") for r in records[1:]}
    assert {"quic:connection_started", "quic:packet_sent", "quic:packet_received", "quic:parameters_set",
            "recovery:metrics_updated", "quic:connection_closed"} <= names
    assert all("time" in r for r in records[1:])


def test_initial_datagrams_padded(pki):
    """RFC 9000 §14.1: every client datagram with an Initial, and every server datagram with an ack-eliciting
    Initial, is at least 1200 bytes; coalesced packets count exactly."""
    from mqvpn.quic.packet import PacketType, parse_header

    pair = Pair(pki)
    seen = []

    def flush():
        for conn, who in ((pair.client, "client"), (pair.server, "server")):
            if conn is None:
                continue
            out = conn.datagrams_to_send(pair.now)
            for data, _, _ in out:
                types = []
                offset = 0
                while offset < len(data):
                    h = parse_header(data, offset, 8)
                    types.append(h.packet_type)
                    offset = h.packet_end
                seen.append((who, len(data), types))
                pair.in_flight.append((pair.now + pair.rtt / 2, "server" if who == "client" else "client", data,
                                       pair.client_addr))
        for conn, events in ((pair.client, pair.client_events), (pair.server, pair.server_events)):
            while conn is not None and (e := conn.next_event()) is not None:
                events.append(e)

    pair._flush = flush
    handshake(pair)
    pair.run(until=lambda: pair.client._handshake_confirmed, max_time=1)
    client_initials = [n for who, n, types in seen if who == "client" and PacketType.INITIAL in types]
    assert len(client_initials) >= 2  # ClientHello, then the ACK coalesced with Finished
    assert all(n >= 1200 for n in client_initials), seen
    assert all(n >= 1200 for who, n, types in seen if who == "server" and PacketType.INITIAL in types)
