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
    # the path IDs used never come back: path 2 is next, then 3 (granted in place of the forgotten path 0 with
    # MAX_PATH_ID, 3 PTO after it was abandoned), then none while three are open
    assert pair.client.open_path(("10.0.2.1", 5000), SERVER_ADDR, pair.now) == 2
    assert pair.client.paths_forgotten == 1 and pair.client._peer_max_path_id == 3
    assert pair.client.open_path(("10.0.3.1", 5000), SERVER_ADDR, pair.now) == 3
    assert pair.client.open_path(("10.0.4.1", 5000), SERVER_ADDR, pair.now) is None


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


def two_paths(pki, client_max=4, server_max=4):
    pair = mp_pair(pki, client_max, server_max)
    pair.run(max_time=0.5)
    pair.client.open_path(PATH_B, SERVER_ADDR, pair.now)
    pair.run(until=lambda: pair.client._paths[1].validated and 1 in pair.server._paths
             and pair.server._paths[1].validated, max_time=2)
    return pair


def send_numbered(pair, n, gap=0.01):
    """One DATAGRAM every ``gap`` seconds of simulated time."""
    for i in range(n):
        pair.client.send_datagram_frame(i.to_bytes(4, "big") * 25)
        target = pair.now + gap
        pair.run(max_time=gap)
        pair.now = max(pair.now, target)


def test_a_silently_dead_path_is_marked_dead_probed_and_used_again(test_pki):
    from mqvpn.quic.constants import DEAD_PROBE_INTERVAL

    pair = two_paths(test_pki)
    got = []
    pair.server.datagram_handler = got.append
    pair.blackhole.add(pair.client_addr)  # 100 % loss on path 0, link still "up": nobody tells the client
    start = pair.now
    send_numbered(pair, 300)
    pair.run(until=lambda: pair.client._paths[0].dead_since is not None, max_time=10)
    dead = pair.client._paths[0]
    assert dead.dead_since is not None and pair.now - start < 3  # a few PTOs, not the idle timeout
    assert ev.PathLiveness(0, False) in pair.client_events
    assert 0 not in pair.client._abandoned_path_ids  # dead, not abandoned: probed, not used
    # new DATAGRAMs avoid the dead path within a PTO (about 75 ms here): few are lost
    assert len(got) >= 300 - 12
    got.clear()
    sent_before = dead.packets_sent
    t0 = pair.now
    send_numbered(pair, 100)
    pair.run(until=lambda: len(got) == 100, max_time=3)
    assert len(got) == 100 and pair.client.state == pair.client.state.CONNECTED
    # while dead it carries probes only, about one per DEAD_PROBE_INTERVAL, never the DATAGRAMs
    assert dead.packets_sent - sent_before <= (pair.now - t0) / DEAD_PROBE_INTERVAL + 3
    # the path heals: the next probe is acknowledged and the path carries traffic again, same path ID
    pair.blackhole.clear()
    pair.run(until=lambda: dead.dead_since is None, max_time=2 * DEAD_PROBE_INTERVAL + 1)
    assert dead.dead_since is None and ev.PathLiveness(0, True) in pair.client_events
    before = dead.datagrams_sent
    pair.run(max_time=0.2)  # an RTT or so for the window to open
    send_numbered(pair, 100, gap=0.001)
    pair.run(until=lambda: len(got) == 200, max_time=3)
    assert len(got) == 200 and dead.datagrams_sent > before


def test_a_path_dead_for_long_is_abandoned_then_forgotten(test_pki):
    from mqvpn.quic.constants import DEAD_PATH_ABANDON

    pair = two_paths(test_pki)
    pair.client._keepalive = 2.0  # keeps the connection (on path 1) from idling out meanwhile
    pair.blackhole.add(pair.client_addr)
    send_numbered(pair, 50)
    pair.run(until=lambda: 0 in pair.client._abandoned_path_ids, max_time=DEAD_PATH_ABANDON + 20)
    assert 0 in pair.client._abandoned_path_ids
    assert any(isinstance(e, ev.PathAbandoned) and e.path_id == 0 for e in pair.client_events)
    pair.run(until=lambda: pair.client.paths_forgotten and pair.server.paths_forgotten, max_time=5)
    assert pair.client.paths_forgotten == 1 and pair.server.paths_forgotten == 1
    # a path ID was granted in its place, both ways: the client can still open as many paths as before
    assert pair.client._local_max_path_id == 5 and pair.server._local_max_path_id == 5
    pair.run(until=lambda: pair.client._peer_max_path_id == 5 and pair.server._peer_max_path_id == 5, max_time=2)
    assert pair.client._peer_max_path_id == 5 and pair.server._peer_max_path_id == 5
    assert pair.client.state == pair.client.state.CONNECTED


def test_paths_can_come_and_go_many_times(test_pki):
    """20 open/abandon cycles on one connection: path IDs are replaced (MAX_PATH_ID), state does not grow."""
    pair = two_paths(test_pki, 2, 2)
    got = []
    pair.server.datagram_handler = got.append
    for cycle in range(20):
        live = [pid for pid, p in pair.client._paths.items() if p.state == p.state.ACTIVE]
        victim = max(live)
        assert pair.client.abandon_path(victim)
        pair.run(max_time=0.3)
        pid = None
        for _ in range(100):  # the abandoned path ID is replaced 3 PTO later
            pid = pair.client.open_path((f"10.9.{cycle}.2", 4433), SERVER_ADDR, pair.now)
            if pid is not None:
                break
            pair.run(max_time=0.05)
        assert pid is not None, f"no path ID at cycle {cycle}"
        pair.run(until=lambda: pair.client._paths[pid].validated, max_time=2)
        got.clear()
        send_numbered(pair, 20, gap=0.002)
        pair.run(until=lambda: len(got) == 20, max_time=2)
        assert len(got) == 20
    pair.run(max_time=1)
    for conn in (pair.client, pair.server):
        assert len(conn._paths) <= 3  # path 0 (kept for its handshake spaces) + the live one + one in its grace
        assert sum(len(v) for v in conn._mp_host_cids.values()) <= 2 * 3
        assert conn.state == conn.state.CONNECTED


def test_path_status_backup_keeps_a_path_idle_until_the_other_fails(test_pki):
    pair = two_paths(test_pki)
    pair.client.set_path_status(1, available=False)
    pair.run(until=lambda: pair.server._paths[1].peer_backup, max_time=1)
    assert pair.server._paths[1].peer_backup and pair.client._paths[1].local_backup
    got = []
    pair.server.datagram_handler = got.append
    b = pair.client._paths[1]
    before = b.datagrams_sent
    send_numbered(pair, 100, gap=0.001)
    pair.run(until=lambda: len(got) == 100, max_time=2)
    assert len(got) == 100 and b.datagrams_sent == before  # all on path 0
    # the server's downlink follows the client's wish too
    down = []
    pair.client.datagram_handler = down.append
    sb = pair.server._paths[1]
    before_s = sb.datagrams_sent
    for _ in range(100):
        pair.server.send_datagram_frame(b"d" * 100)
        pair.step(deadline=pair.now + 0.001)
    pair.run(until=lambda: len(down) == 100, max_time=2)
    assert len(down) == 100 and sb.datagrams_sent == before_s
    # path 0 dies: the backup path takes over
    pair.blackhole.add(pair.client_addr)
    got.clear()
    send_numbered(pair, 200)
    pair.run(max_time=1)
    assert b.datagrams_sent > before and len(got) >= 150
    # a newer status wins; an older sequence number is ignored
    pair.client.set_path_status(1, available=True)
    pair.run(until=lambda: not pair.server._paths[1].peer_backup, max_time=1)
    assert not pair.server._paths[1].peer_backup
    assert pair.server._path_status[1][0] == 1


def test_rtt_is_sampled_only_from_acks_on_the_data_path(test_pki):
    """An ACK for path 1 that comes back on path 0 (e.g. path 1 is dead one way) gives no RTT sample."""
    from mqvpn.quic.recovery import SentPacket, SentSpace, Recovery

    rec = Recovery()
    s = SentSpace("app1")
    rec.spaces.append(s)
    rec.on_packet_sent(s, SentPacket(0, 1.0, 1200, True, True))
    rec.on_ack_received(s, [(0, 1)], 0.0, 3.0, rtt_sample=False)
    assert not rec.rtt.has_sample and rec.delivered == 1200 and rec.bytes_in_flight == 0
    rec.on_packet_sent(s, SentPacket(1, 3.0, 1200, True, True))
    rec.on_ack_received(s, [(1, 2)], 0.0, 3.05)
    assert rec.rtt.has_sample and rec.rtt.latest_rtt == pytest.approx(0.05)
