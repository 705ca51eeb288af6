"""Path behaviour of a single-path connection: NAT rebinding, DPLPMTUD under a smaller MTU, anti-amplification,
version negotiation, stateless reset, automatic key update."""

import pytest

from mqvpn.quic import events as ev
from mqvpn.quic.connection import ConnectionState
from mqvpn.quic.crypto import stateless_reset_token
from mqvpn.quic.packet import build_stateless_reset, build_version_negotiation

from tests.interop.pki import make_test_pki
from tests.quic.pair import CLIENT_ADDR, SERVER_ADDR, Pair
from tests.quic.test_connection import handshake


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def confirmed_pair(pki, max_size=None, **kw):
    pair = Pair(pki, **kw)
    pair.max_size = max_size
    handshake(pair)
    pair.run(until=lambda: pair.client._handshake_confirmed, max_time=1)
    return pair


def test_nat_rebinding_is_validated_and_traffic_follows(pki):
    pair = confirmed_pair(pki)
    got = []
    pair.server.datagram_handler = got.append
    back = []
    pair.client.datagram_handler = back.append
    pair.client_addr = ("10.9.9.9", 5555)  # the NAT picked a new port
    pair.client.send_datagram_frame(b"after rebinding")
    pair.run(until=lambda: any(isinstance(e, ev.PathValidated) for e in pair.server_events), max_time=2)
    validated = [e for e in pair.server_events if isinstance(e, ev.PathValidated)]
    assert validated and validated[0].remote_addr == ("10.9.9.9", 5555)
    assert pair.server.paths[0].remote_addr == ("10.9.9.9", 5555)
    pair.server.send_datagram_frame(b"to the new address")
    pair.run(until=lambda: back, max_time=1)
    assert got == [b"after rebinding"] and back == [b"to the new address"]
    assert pair.client.state == pair.server.state == ConnectionState.CONNECTED


def test_pmtud_finds_a_smaller_path_mtu_without_losing_data(pki):
    pair = confirmed_pair(pki, max_size=1300)  # a tunnel on the way: anything above 1300 bytes vanishes
    got = []
    pair.server.datagram_handler = got.append
    for i in range(200):
        pair.client.send_datagram_frame(i.to_bytes(2, "big") * 400)  # 800 bytes each: fits every MTU
        pair.step()
    pair.run(until=lambda: len(got) == 200, max_time=30)
    assert len(got) == 200  # probes never carry data: nothing was lost to them
    mtu = pair.client.paths[0].mtu
    assert 1300 - 16 <= mtu <= 1300
    assert pair.client.datagram_room == mtu - (1 + 20 + 4) - 16 - 1


def test_server_respects_anti_amplification(pki):
    pair = Pair(pki)
    pair.connect()
    first = pair.client.datagrams_to_send(pair.now)
    assert len(first) == 1 and len(first[0][0]) == 1200
    from mqvpn.quic.connection import QuicConnection
    from mqvpn.quic.packet import parse_header
    h = parse_header(first[0][0], 0, 8)
    server = QuicConnection(pair.server_cfg, original_destination_connection_id=h.dcid, peer_initial_cid=h.scid)
    server.receive_datagram(first[0][0], CLIENT_ADDR, pair.now, SERVER_ADDR)
    total = 0
    now = pair.now
    for _ in range(20):  # the client never answers: timers fire, PTOs resend
        total += sum(len(d) for d, _, _ in server.datagrams_to_send(now))
        t = server.get_timer()
        if t is None:
            break
        now = t
        server.handle_timer(now)
    assert 0 < total <= 3 * 1200


def test_version_negotiation_without_v1_ends_the_attempt(pki):
    pair = Pair(pki)
    pair.connect()
    (data, _, _), = pair.client.datagrams_to_send(pair.now)
    from mqvpn.quic.packet import parse_header
    h = parse_header(data, 0, 8)
    vn = build_version_negotiation(h.scid, h.dcid, [0x6B3343CF, 0xFF00001D])
    pair.client.receive_datagram(vn, SERVER_ADDR, pair.now, CLIENT_ADDR)
    events = list(iter(pair.client.next_event, None))
    assert any(isinstance(e, ev.ConnectionTerminated) for e in events)
    assert pair.client.state == ConnectionState.TERMINATED


def test_version_negotiation_listing_v1_is_ignored(pki):
    pair = Pair(pki)
    pair.connect()
    (data, _, _), = pair.client.datagrams_to_send(pair.now)
    from mqvpn.quic.packet import parse_header
    h = parse_header(data, 0, 8)
    pair.client.receive_datagram(build_version_negotiation(h.scid, h.dcid, [1, 0x6B3343CF]), SERVER_ADDR,
                                 pair.now, CLIENT_ADDR)
    assert pair.client.state == ConnectionState.FIRSTFLIGHT


def test_stateless_reset_drains_the_client(pki):
    pair = confirmed_pair(pki)
    # the server lost its state (restart) but keeps its reset key: it answers a packet for the old CID with a reset
    cid = pair.client.paths[0].peer_cid.cid
    token = stateless_reset_token(pair.server_cfg.stateless_reset_key, cid)
    pair.client.receive_datagram(build_stateless_reset(token, 60), SERVER_ADDR, pair.now, CLIENT_ADDR)
    events = list(iter(pair.client.next_event, None))
    assert any(isinstance(e, ev.ConnectionTerminated) and "reset" in e.reason_phrase for e in events)
    assert pair.client.state == ConnectionState.DRAINING
    assert pair.client.datagrams_to_send(pair.now) == []  # nothing more is sent


def test_automatic_key_update_before_the_aead_limit(pki):
    pair = confirmed_pair(pki, client_kw={"key_update_after_packets": 50})
    got = []
    pair.server.datagram_handler = got.append
    for i in range(300):
        pair.client.send_datagram_frame(b"x" * 200)
        if i % 5 == 0:
            pair.step()
    pair.run(until=lambda: len(got) == 300, max_time=10)
    assert len(got) == 300
    assert pair.client.key_updates >= 3
    assert pair.server.key_updates == pair.client.key_updates


def test_pmtud_probe_sizes_are_exact(pki):
    pair = confirmed_pair(pki)
    pair.run(until=lambda: pair.client.paths[0].mtu == 1452, max_time=5)
    assert 1452 in pair.sent_sizes["client"] and max(pair.sent_sizes["client"]) == 1452


def test_keepalive_keeps_an_idle_connection_up(pki):
    pair = confirmed_pair(pki, idle_timeout=3.0, client_kw={"keepalive_interval": 1.0})
    start = pair.now
    pair.run(until=lambda: pair.now - start > 20, max_time=21)
    assert pair.client.state == pair.server.state == ConnectionState.CONNECTED
    assert not any(isinstance(e, ev.PingAcknowledged) for e in pair.client_events)
