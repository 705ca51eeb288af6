"""Multipath extension, first steps (docs/multipath-plan.md 1-2): initial_max_path_id negotiation, CIDs for every
allowed path ID via PATH_NEW_CONNECTION_ID, PATH_ACK for 1-RTT spaces, and the draft's error cases."""

import pytest

from mqvpn.quic import events as ev
from mqvpn.quic.errors import QuicErrorCode

from tests.quic.pair import CLIENT_ADDR, SERVER_ADDR, Pair
from tests.quic.test_connection import handshake
from tests.quic.test_connection_fuzz import _seal_from_server


def mp_pair(pki, client_max, server_max):
    pair = Pair(pki)
    pair.client_cfg.initial_max_path_id = client_max
    pair.server_cfg.initial_max_path_id = server_max
    from mqvpn.quic.connection import QuicConnection

    pair.client = QuicConnection(pair.client_cfg)
    handshake(pair)
    pair.run(until=lambda: pair.client._handshake_confirmed, max_time=1)
    return pair


def exchange_datagrams(pair, n=50):
    got = []
    pair.server.datagram_handler = got.append
    for i in range(n):
        pair.client.send_datagram_frame(b"x" * 100)
        pair.server.send_datagram_frame(b"y" * 100)
        pair.step()
    pair.run(until=lambda: len(got) == n, max_time=5)
    return got


def test_negotiated_when_both_offer(test_pki):
    pair = mp_pair(test_pki, 3, 3)
    assert pair.client.multipath and pair.server.multipath
    pair.run(max_time=0.5)
    # CIDs for path IDs 1..3 on both sides, none beyond
    assert sorted(pair.client._mp_peer_cids) == [1, 2, 3] and sorted(pair.server._mp_peer_cids) == [1, 2, 3]
    assert all(len(v) >= 1 for v in pair.client._mp_peer_cids.values())
    # every CID routes to its path ID
    for path_id, table in pair.server._mp_host_cids.items():
        for record in table.values():
            assert pair.server._cid_to_path[record.cid] == path_id
    assert len(exchange_datagrams(pair)) == 50
    assert pair.client.path_acks_received > 0 and pair.server.path_acks_received > 0


@pytest.mark.parametrize("client_max,server_max", [(None, 3), (3, None), (None, None)])
def test_plain_quic_unless_both_offer(test_pki, client_max, server_max):
    pair = mp_pair(test_pki, client_max, server_max)
    assert not pair.client.multipath and not pair.server.multipath
    assert len(exchange_datagrams(pair)) == 50
    assert pair.client.path_acks_received == pair.server.path_acks_received == 0
    assert not pair.client._mp_peer_cids and not pair.server._mp_peer_cids


def test_cids_only_up_to_the_smaller_maximum(test_pki):
    pair = mp_pair(test_pki, 2, 5)
    pair.run(max_time=0.5)
    assert sorted(pair.client._mp_peer_cids) == [1, 2]  # the server issues for min(5, 2)
    assert sorted(pair.server._mp_peer_cids) == [1, 2]


def test_max_path_id_raises_the_limit(test_pki):
    pair = mp_pair(test_pki, 4, 1)
    pair.run(max_time=0.5)
    assert sorted(pair.server._mp_peer_cids) == [1]
    # the server allows more paths: the client then issues CIDs for them
    from mqvpn.quic import frames as F
    from mqvpn.quic.buffer import Buffer

    buf = Buffer(capacity=16)
    F.push_max_path_id(buf, 3)
    pair.server._local_max_path_id = 3
    pair.client.receive_datagram(_seal_from_server(pair, buf.data), SERVER_ADDR, pair.now, CLIENT_ADDR)
    pair.run(max_time=0.5)
    assert sorted(pair.server._mp_peer_cids) == [1, 2, 3]


def _frames(*pushes):
    from mqvpn.quic.buffer import Buffer

    buf = Buffer(capacity=256)
    for push, args in pushes:
        push(buf, *args)
    return buf.data


def test_path_id_above_our_maximum_is_a_protocol_violation(test_pki):
    from mqvpn.quic import frames as F

    pair = mp_pair(test_pki, 2, 2)
    payload = _frames((F.push_path_new_connection_id, (7, 0, 0, b"\x01" * 8, b"\x02" * 16)))
    pair.client.receive_datagram(_seal_from_server(pair, payload), SERVER_ADDR, pair.now, CLIENT_ADDR)
    closes = [e for e in iter(pair.client.next_event, None) if isinstance(e, ev.ConnectionTerminated)]
    assert closes and closes[-1].error_code == QuicErrorCode.PROTOCOL_VIOLATION


def test_multipath_frame_without_negotiation_is_an_encoding_error(test_pki):
    from mqvpn.quic import frames as F

    pair = mp_pair(test_pki, None, None)
    payload = _frames((F.push_max_path_id, (3,)))
    pair.client.receive_datagram(_seal_from_server(pair, payload), SERVER_ADDR, pair.now, CLIENT_ADDR)
    closes = [e for e in iter(pair.client.next_event, None) if isinstance(e, ev.ConnectionTerminated)]
    assert closes and closes[-1].error_code == QuicErrorCode.FRAME_ENCODING_ERROR


def test_path_retire_connection_id_gets_a_replacement(test_pki):
    from mqvpn.quic import frames as F

    pair = mp_pair(test_pki, 2, 2)
    pair.run(max_time=0.5)
    before = dict(pair.client._mp_host_cids[1])
    seq = min(before)
    payload = _frames((F.push_path_retire_connection_id, (1, seq)))
    pair.client.receive_datagram(_seal_from_server(pair, payload), SERVER_ADDR, pair.now, CLIENT_ADDR)
    after = pair.client._mp_host_cids[1]
    assert seq not in after and len(after) == len(before)  # replaced, same count
    assert before[seq].cid not in pair.client._cid_to_path


PATH_B = ("10.0.1.1", 5000)


def test_client_opens_a_second_path_and_it_carries_traffic_when_the_first_dies(test_pki):
    pair = mp_pair(test_pki, 2, 2)
    pair.run(max_time=0.5)
    assert pair.client.open_path(PATH_B, SERVER_ADDR, pair.now) == 1
    pair.run(until=lambda: any(isinstance(e, ev.PathValidated) and e.path_id == 1 for e in pair.client_events)
             and any(isinstance(e, ev.PathValidated) and e.path_id == 1 for e in pair.server_events), max_time=2)
    server_path = pair.server._paths[1]
    assert server_path.remote_addr == PATH_B and server_path.validated
    assert pair.client._paths[1].validated
    # the two paths use different CIDs, packet number spaces and nonces (path ID 1)
    assert pair.client._paths[1].peer_cid.cid != pair.client._paths[0].peer_cid.cid
    # uplink A dies (the daemon sees carrier loss): the client abandons path 0; traffic moves to path 1
    pair.blackhole.add(pair.client_addr)
    assert pair.client.abandon_path(0)
    pair.run(until=lambda: pair.server._paths[0].state == pair.server._paths[0].state.ABANDONED, max_time=2)
    assert 0 in pair.server._abandoned_path_ids  # PATH_ABANDON travelled on path 1
    got = []
    pair.server.datagram_handler = got.append
    for i in range(200):
        pair.client.send_datagram_frame(i.to_bytes(4, "big") * 25)
        pair.step()
    pair.run(until=lambda: len(got) >= 150, max_time=3)
    assert len(got) >= 150
    assert server_path.packets_received > 100
    # the path IDs used never come back: opening more finds none left (max 2 -> path 2 has CIDs, then none)
    assert pair.client.open_path(("10.0.2.1", 5000), SERVER_ADDR, pair.now) == 2
    assert pair.client.open_path(("10.0.3.1", 5000), SERVER_ADDR, pair.now) is None


def test_no_paths_without_negotiation(test_pki):
    pair = mp_pair(test_pki, None, None)
    assert pair.client.open_path(PATH_B, SERVER_ADDR, pair.now) is None


def test_close_travels_on_a_live_path_after_path_0_was_abandoned(test_pki):
    pair = mp_pair(test_pki, 2, 2)
    pair.run(max_time=0.5)
    pair.client.open_path(PATH_B, SERVER_ADDR, pair.now)
    pair.run(until=lambda: pair.client._paths[1].validated and 1 in pair.server._paths
             and pair.server._paths[1].validated, max_time=2)
    pair.blackhole.add(pair.client_addr)
    pair.client.abandon_path(0)
    pair.run(max_time=0.3)
    pair.client.close(0, "bye")
    pair.run(until=lambda: any(isinstance(e, ev.ConnectionTerminated) and e.by_peer for e in pair.server_events),
             max_time=2)
    assert any(isinstance(e, ev.ConnectionTerminated) and e.reason_phrase == "bye" for e in pair.server_events)


def test_a_silently_dead_path_is_abandoned_after_its_ptos_pile_up(test_pki):
    pair = mp_pair(test_pki, 2, 2)
    pair.run(max_time=0.5)
    pair.client.open_path(PATH_B, SERVER_ADDR, pair.now)
    pair.run(until=lambda: pair.client._paths[1].validated and 1 in pair.server._paths
             and pair.server._paths[1].validated, max_time=2)
    got = []
    pair.server.datagram_handler = got.append
    pair.blackhole.add(pair.client_addr)  # 100 % loss on path 0, link still "up": nobody tells the client
    start = pair.now
    for i in range(300):
        pair.client.send_datagram_frame(i.to_bytes(4, "big") * 25)
        pair.step(deadline=pair.now + 0.01)
    pair.run(until=lambda: 0 in pair.client._abandoned_path_ids, max_time=10)
    assert 0 in pair.client._abandoned_path_ids
    assert pair.now - start < 5  # a few PTOs, not the idle timeout
    # what went into the dead path before is lost (DATAGRAMs are never retransmitted); from now on all arrives
    got.clear()
    for i in range(100):
        pair.client.send_datagram_frame(i.to_bytes(4, "big") * 25)
        pair.step(deadline=pair.now + 0.01)
    pair.run(until=lambda: len(got) == 100, max_time=3)
    assert len(got) == 100 and pair.client.state == pair.client.state.CONNECTED
