"""The daemons' TUN data paths with fakes (no root): TTL handling, ICMP Packet Too Big / Time Exceeded, routing to
the right session, batching into one transmit."""

import ipaddress
import types

from mqvpn.client import VpnClient
from mqvpn.linux import icmp
from mqvpn.server import VpnServer

from tests.masque.tunnel_pair import ipv4_packet


class FakeTun:
    def __init__(self, packets):
        self.packets = list(packets)
        self.written = []

    def read_batch(self, n):
        out, self.packets = self.packets[:n], self.packets[n:]
        return out

    def write(self, packet):
        self.written.append(packet)
        return True


class FakeHandle:
    def __init__(self):
        self.transmits = 0

    def transmit(self):
        self.transmits += 1


def make_client(packets, room=1300):
    sent = []
    cip = types.SimpleNamespace(max_ip_packet_size=room, send_packet=lambda p: sent.append(p) or True)
    client = VpnClient.__new__(VpnClient)
    client.tun = FakeTun(packets)
    client.tunnel = types.SimpleNamespace(closed=False, cip=cip, handle=FakeHandle())
    client._icmp_limiter = icmp.RateLimiter(100, 100)
    client._addresses = [ipaddress.ip_network("10.99.0.2/32")]
    return client, sent


def test_client_forwards_with_ttl_decremented_and_one_transmit_per_batch():
    client, sent = make_client([ipv4_packet("10.99.0.2", "192.0.2.1", b"a", ttl=64),
                                ipv4_packet("10.99.0.2", "192.0.2.1", b"b", ttl=9)])
    client._on_tun_readable()
    assert [p[8] for p in sent] == [63, 8]
    assert all(icmp.internet_checksum(p[:20]) == 0 for p in sent)  # header checksum still valid
    assert client.tunnel.handle.transmits == 1


def test_client_answers_ttl_1_with_time_exceeded():
    client, sent = make_client([ipv4_packet("10.99.0.2", "192.0.2.1", b"x", ttl=1)])
    client._on_tun_readable()
    assert not sent
    (reply,) = client.tun.written
    assert reply[9] == 1 and reply[20] == 11  # ICMP, Time Exceeded
    assert reply[16:20] == ipaddress.IPv4Address("10.99.0.2").packed


def test_client_answers_oversized_packets_with_packet_too_big():
    client, sent = make_client([ipv4_packet("10.99.0.2", "192.0.2.1", b"x" * 1400)], room=1300)
    client._on_tun_readable()
    assert not sent
    (reply,) = client.tun.written
    assert reply[20] == 3 and reply[21] == 4  # Destination Unreachable, Fragmentation Needed
    assert int.from_bytes(reply[26:28], "big") == 1300  # the next-hop MTU is the tunnel's room


def test_server_routes_by_destination_and_flushes_each_connection_once():
    from mqvpn.masque.pool import SessionTable

    links = [FakeHandle(), FakeHandle()]
    sessions = []
    for i, link in enumerate(links):
        got = []
        s = types.SimpleNamespace(quic=types.SimpleNamespace(datagram_room=1400), _prefix=b"\x00\x00",
                                  send_packet=lambda p, got=got: got.append(p) or True, h3_link=link, got=got)
        sessions.append(s)
    table = SessionTable()
    table.add("10.99.0.2", sessions[0])
    table.add("10.99.0.3", sessions[1])
    server = VpnServer.__new__(VpnServer)
    server.service = types.SimpleNamespace(table=table, counters=types.SimpleNamespace(no_session_dropped=0))
    server.tun = FakeTun([ipv4_packet("192.0.2.1", "10.99.0.2", b"1"), ipv4_packet("192.0.2.1", "10.99.0.3", b"2"),
                          ipv4_packet("192.0.2.1", "10.99.0.2", b"3"), ipv4_packet("192.0.2.1", "10.99.0.9", b"?")])
    server._icmp_limiter = icmp.RateLimiter(100, 100)
    server._on_tun_readable()
    assert [p[20:] for p in sessions[0].got] == [b"1", b"3"] and [p[20:] for p in sessions[1].got] == [b"2"]
    assert links[0].transmits == links[1].transmits == 1
    assert server.service.counters.no_session_dropped == 1
