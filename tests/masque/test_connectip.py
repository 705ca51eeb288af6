import ipaddress

import pytest

from mqvpn.masque.auth import KeyStore
from mqvpn.masque.capsules import encode_raw_capsule
from mqvpn.masque.connectip import (
    AddressesAssigned,
    RoutesAdvertised,
    TunnelClosed,
    TunnelEstablished,
)

from tests.masque.tunnel_pair import KEY, TunnelWorld, ipv4_packet


def test_tunnel_comes_up_with_address_and_routes(test_pki):
    world = TunnelWorld(test_pki, subnet6="fd00::/112")
    c = world.add_client()
    events = c.connect_tunnel()
    c.run(until=lambda: any(isinstance(e, RoutesAdvertised) for e in c.client_events_cip), max_time=2)
    kinds = [type(e) for e in c.client_events_cip]
    assert TunnelEstablished in kinds and AddressesAssigned in kinds and RoutesAdvertised in kinds, events
    assert c.cip.addresses == [ipaddress.ip_network("10.0.0.2/32"), ipaddress.ip_network("fd00::2/128")]
    routes = c.cip.routes.ranges
    assert [(str(r.start), str(r.end), r.protocol) for r in routes] == [
        ("0.0.0.0", "255.255.255.255", 0), ("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 0)]
    # DPLPMTUD raises the room right after the handshake: IPv6 needs >= 1280 (RFC 9484 §10.1)
    c.run(until=lambda: c.cip.max_ip_packet_size >= 1280, max_time=2)
    assert 1280 <= c.cip.max_ip_packet_size < 1500
    assert c.cip.max_ip_packet_size == c.client.datagram_room - 2


def test_packets_flow_both_ways_and_spoofing_is_dropped(test_pki):
    world = TunnelWorld(test_pki, reflect=True)
    c = world.add_client()
    c.connect_tunnel()
    pkt = ipv4_packet("10.0.0.2", "192.0.2.1", b"ping")
    assert c.cip.send_packet(pkt)
    c.run(until=lambda: c.received, max_time=2)
    assert world.to_tun[0][0] == pkt
    assert c.received == [ipv4_packet("192.0.2.1", "10.0.0.2", b"ping")[:10] + pkt[10:12]
                          + ipaddress.IPv4Address("192.0.2.1").packed + ipaddress.IPv4Address("10.0.0.2").packed
                          + b"ping"]
    spoofed = ipv4_packet("10.0.0.99", "192.0.2.1", b"evil")
    c.cip.send_packet(spoofed)
    c.run(max_time=0.3)
    assert world.service.counters.spoofed_dropped == 1
    assert len(world.to_tun) == 1


def test_wrong_key_gets_403_and_no_address(test_pki):
    world = TunnelWorld(test_pki)
    c = world.add_client(key="wrong")
    events = c.connect_tunnel()
    closed = [e for e in events if isinstance(e, TunnelClosed)]
    assert closed and closed[0].status == 403 and closed[0].retry is False
    assert not c.cip.addresses
    assert world.service.pool4.in_use == 0 and world.service.counters.auth_failures == 1


def test_server_full_gets_503(test_pki):
    world = TunnelWorld(test_pki, max_clients=1)
    a = world.add_client()
    a.connect_tunnel()
    assert a.cip.addresses
    b = world.add_client()
    events = b.connect_tunnel()
    closed = [e for e in events if isinstance(e, TunnelClosed)]
    assert closed and closed[0].status == 503 and closed[0].retry is True


def test_garbage_capsule_aborts_only_that_session(test_pki):
    world = TunnelWorld(test_pki, reflect=True)
    good = world.add_client()
    good.connect_tunnel()
    bad = world.add_client()
    bad.connect_tunnel()
    assert len(world.service.sessions) == 2
    # a ROUTE_ADVERTISEMENT with a bad IP version: malformed -> the server aborts that stream
    bad.h3c.send_data(bad.cip.stream_id, encode_raw_capsule(0x03, b"\x05" + bytes(9)))
    bad.run(until=lambda: any(isinstance(e, TunnelClosed) for e in bad.client_events_cip), max_time=2)
    assert any(isinstance(e, TunnelClosed) for e in bad.client_events_cip)
    assert len(world.service.sessions) == 1 and world.service.counters.capsule_errors == 1
    assert bad.client.state == bad.server.state  # the QUIC connection survives
    from mqvpn.quic.connection import ConnectionState
    assert bad.server.state == ConnectionState.CONNECTED
    good.cip.send_packet(ipv4_packet("10.0.0.2", "192.0.2.7"))
    good.run(until=lambda: good.received, max_time=2)
    assert good.received


def test_address_request_when_no_assign_arrives(test_pki):
    """A server that sends no ADDRESS_ASSIGN (connect-ip-go style): the client asks after the delay."""
    from mqvpn.masque import connectip

    world = TunnelWorld(test_pki)
    orig = connectip.ServerSession.assignment
    connectip.ServerSession.assignment = lambda self: connectip.AddressAssign([])  # say nothing unsolicited
    try:
        c = world.add_client(address_request_delay=0.2)
        c.connect()
        c.run(until=lambda: any(isinstance(e, AddressesAssigned) and e.addresses for e in c.client_events_cip),
              max_time=3)
    finally:
        connectip.ServerSession.assignment = orig
    assigned = [e for e in c.client_events_cip if isinstance(e, AddressesAssigned) and e.addresses]
    assert assigned and ipaddress.ip_network("10.0.0.2/32") in assigned[-1].addresses


def test_many_sessions_distinct_addresses_and_routing(test_pki):
    """300 tunnels on one server: distinct addresses, and a packet to each address reaches that client only."""
    world = TunnelWorld(test_pki, subnet="10.64.0.0/22", max_clients=1000)
    clients = []
    for i in range(300):
        c = world.add_client()
        c.connect_tunnel()
        assert c.cip.addresses, i
        clients.append(c)
    addrs = {c.cip.addresses[0] for c in clients}
    assert len(addrs) == 300
    for c in clients:
        addr = str(c.cip.addresses[0].network_address)
        assert world.service.route_packet(ipv4_packet("198.51.100.1", addr, addr.encode()))
    for c in clients:
        c.run(until=lambda c=c: c.received, max_time=1)
        addr = str(c.cip.addresses[0].network_address)
        assert [p[20:] for p in c.received] == [addr.encode()]


def test_wrong_key_among_users(test_pki):
    keys = KeyStore(None, {"alice": "a" * 44, "bob": "b" * 44})
    world = TunnelWorld(test_pki, keys=keys)
    c = world.add_client(key="b" * 44)
    c.connect_tunnel()
    assert c.cip.addresses
    (session,) = world.service.sessions
    assert session.user == "bob"


def test_datagram_capsule_fallback_without_quic_datagrams(test_pki):
    """A peer without QUIC DATAGRAM: IP packets travel as DATAGRAM capsules on the stream (RFC 9297 §3.5)."""
    world = TunnelWorld(test_pki, reflect=True)
    c = world.add_client(max_datagram_frame_size=None)
    c.connect_tunnel()
    assert c.cip.addresses and c.cip._fallback
    for i in range(5):
        assert c.cip.send_packet(ipv4_packet("10.0.0.2", "192.0.2.1", b"cap%d" % i))
    c.run(until=lambda: len(c.received) == 5, max_time=2)
    assert sorted(p[20:] for p in c.received) == [b"cap%d" % i for i in range(5)]


def test_connection_closed_before_response_is_a_setup_failure(test_pki):
    """Like the reference server on a bad key: it closes the whole connection instead of answering 403."""
    from mqvpn.masque import connectip

    world = TunnelWorld(test_pki)
    orig = connectip.ConnectIpServer._on_request
    connectip.ConnectIpServer._on_request = lambda self, sid, headers, ended: self.h3.quic.close(0x106, "auth")
    try:
        c = world.add_client()
        events = c.connect_tunnel()
    finally:
        connectip.ConnectIpServer._on_request = orig
    closed = [e for e in events if isinstance(e, TunnelClosed)]
    assert closed and "before the server answered" in closed[0].reason and closed[0].status is None


def test_we_never_advertise_a_datagram_frame_size_above_65535(test_pki):
    """xquic keeps the peer's max_datagram_frame_size in 16 bits: 65536 would become 0 (masque-wire.md §5.1)."""
    world = TunnelWorld(test_pki)
    c = world.add_client()
    c.connect_tunnel()
    assert 0 < c.server.peer_transport_parameters.max_datagram_frame_size <= 65535
    assert 0 < c.client.peer_transport_parameters.max_datagram_frame_size <= 65535
