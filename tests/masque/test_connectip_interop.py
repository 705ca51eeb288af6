"""CONNECT-IP against an independent HTTP/3 stack (aioquic 1.7.2), over real UDP on 127.0.0.1, both directions:

* an aioquic H3 client (written here) performs CONNECT-IP against our TunnelServer;
* our client (open_tunnel) against an aioquic-based CONNECT-IP server written here, which splits its IPv4 and IPv6
  state into separate capsules the way the reference C server does.
"""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.h3 import events as h3e
from aioquic.h3.connection import H3Connection as AioH3
from aioquic.quic.configuration import QuicConfiguration as AioConfig
from aioquic.quic.events import ProtocolNegotiated, QuicEvent

from mqvpn.masque.auth import KeyStore
from mqvpn.masque.capsules import (
    AddressAssign,
    AssignedAddress,
    CapsuleParser,
    IpRange,
    RouteAdvertisement,
    encode_capsule,
    encode_raw_capsule,
)
from mqvpn.masque.connectip import ConnectIpService, TunnelClosed
from mqvpn.masque.pool import AddressPool
from mqvpn.quic.config import QuicConfiguration
from mqvpn.tunnel import TunnelError, TunnelServer, open_tunnel

from tests.interop.peers import run
from tests.masque.tunnel_pair import ipv4_packet

pytestmark = pytest.mark.interop

KEY = "s3cret-key-for-tests-0000000000000000000000="
H3_DATAGRAM = 0x33


class DatagramH3(AioH3):
    """aioquic sends SETTINGS_H3_DATAGRAM only with WebTransport: add it (masque-wire.md §2, trap 1)."""

    def _get_local_settings(self):
        settings = super()._get_local_settings()
        settings[H3_DATAGRAM] = 1
        return settings


class H3Protocol(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.http: DatagramH3 | None = None
        self.events: asyncio.Queue = asyncio.Queue()
        self.on_h3 = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated) or self.http is None:
            if self.http is None:
                self.http = DatagramH3(self._quic)
        for e in self.http.handle_event(event):
            if self.on_h3 is not None:
                self.on_h3(self, e)
            else:
                self.events.put_nowait(e)


def aio_config(is_client: bool, pki) -> AioConfig:
    cfg = AioConfig(is_client=is_client, alpn_protocols=["h3"], max_datagram_frame_size=65535,
                    max_datagram_size=1452)
    if is_client:
        cfg.server_name = "localhost"
        cfg.load_verify_locations(pki.ca)
    else:
        cfg.load_cert_chain(pki.cert, pki.key)
    return cfg


def reflect(packet: bytes) -> bytes:
    """The packet back to its sender: source and destination swapped."""
    return packet[:12] + packet[16:20] + packet[12:16] + packet[20:]


async def our_server(pki, *, max_clients=64, subnet6="fd00:1::/112"):
    service = ConnectIpService(keys=KeyStore(KEY), pool4=AddressPool("10.7.0.0/24"),
                               pool6=AddressPool(subnet6) if subnet6 else None, max_clients=max_clients)
    cfg = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
    cfg.load_cert_chain(pki.cert, pki.key)
    server = TunnelServer(service, cfg)
    service.on_packet = lambda packet, session: server.route_packet(reflect(packet))
    addr = await server.start(("127.0.0.1", 0))
    return server, addr


async def aioquic_connect_ip(port: int, pki, *, key=KEY, path=b"/.well-known/masque/ip/*/*/"):
    """An aioquic client doing CONNECT-IP; returns (protocol, stream_id, status, capsules so far)."""
    cm = connect("127.0.0.1", port, configuration=aio_config(True, pki), create_protocol=H3Protocol)
    proto = await cm.__aenter__()
    proto._cm = cm
    while proto.http is None or proto.http.received_settings is None:  # extended CONNECT needs its SETTINGS
        await asyncio.sleep(0.01)
    stream_id = proto._quic.get_next_available_stream_id()
    headers = [(b":method", b"CONNECT"), (b":protocol", b"connect-ip"), (b":scheme", b"https"),
               (b":authority", f"localhost:{port}".encode()), (b":path", path), (b"capsule-protocol", b"?1")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    proto.http.send_headers(stream_id, headers)
    proto.transmit()
    status = None
    while status is None:
        e = await asyncio.wait_for(proto.events.get(), 5)
        if isinstance(e, h3e.HeadersReceived) and e.stream_id == stream_id:
            status = int(dict(e.headers)[b":status"])
    return proto, stream_id, status


async def read_capsules(proto, stream_id, parser, want_types, timeout=5.0):
    got = []
    deadline = asyncio.get_running_loop().time() + timeout
    while not all(any(isinstance(c, t) for c in got) for t in want_types):
        e = await asyncio.wait_for(proto.events.get(), max(0.01, deadline - asyncio.get_running_loop().time()))
        if isinstance(e, h3e.DataReceived) and e.stream_id == stream_id:
            got += parser.feed(e.data)
    return got


def test_aioquic_client_against_our_server(test_pki):
    async def main():
        server, (host, port) = await our_server(test_pki)
        proto, sid, status = await aioquic_connect_ip(port, test_pki)
        assert status == 200
        capsules = await read_capsules(proto, sid, CapsuleParser(), [AddressAssign, RouteAdvertisement])
        (assign,) = [c for c in capsules if isinstance(c, AddressAssign)]
        (routes,) = [c for c in capsules if isinstance(c, RouteAdvertisement)]
        assert [a.prefix for a in assign.addresses] == [ipaddress.ip_network("10.7.0.2/32"),
                                                         ipaddress.ip_network("fd00:1::2/128")]
        assert len(routes.ranges) == 2  # both families in ONE capsule
        # IP packets both ways as context-0 HTTP Datagrams
        for i in range(20):
            proto.http.send_datagram(sid, b"\x00" + ipv4_packet("10.7.0.2", "192.0.2.9", b"n%d" % i))
        proto.transmit()
        echoed = []
        while len(echoed) < 20:
            e = await asyncio.wait_for(proto.events.get(), 5)
            if isinstance(e, h3e.DatagramReceived):
                assert e.stream_id == sid and e.data[0] == 0
                echoed.append(e.data[1:])
        assert sorted(p[20:] for p in echoed) == sorted(b"n%d" % i for i in range(20))
        assert all(p[12:16] == ipaddress.IPv4Address("192.0.2.9").packed for p in echoed)
        proto.close()
        await proto._cm.__aexit__(None, None, None)
        server.close()
        await asyncio.sleep(0.15)
        return server.service.counters

    counters = run(main(), 30)
    assert counters.sessions_opened == 1


def test_wrong_key_full_and_garbage_with_aioquic_client(test_pki):
    async def main():
        server, (host, port) = await our_server(test_pki, max_clients=2)
        service = server.service
        # wrong key: 403, nothing assigned
        p1, _, status = await aioquic_connect_ip(port, test_pki, key="nope")
        assert status == 403 and service.pool4.in_use == 0
        # two good sessions fill the server; the third gets 503
        a, sid_a, status_a = await aioquic_connect_ip(port, test_pki)
        b, sid_b, status_b = await aioquic_connect_ip(port, test_pki)
        c, _, status_c = await aioquic_connect_ip(port, test_pki)
        assert (status_a, status_b, status_c) == (200, 200, 503)
        # garbage capsule on b's stream: b's stream is aborted, a keeps working on its own connection
        b.http._quic.send_stream_data(sid_b, b"\x00\x09" + encode_raw_capsule(0x01, b"\x00\x09\x00\x00"))
        b.transmit()
        for _ in range(200):
            if len(service.sessions) == 1:
                break
            await asyncio.sleep(0.01)
        assert len(service.sessions) == 1 and service.counters.capsule_errors == 1
        assert len(server.connections) == 4  # the QUIC connection of b survives (and the refused ones too)
        a.http.send_datagram(sid_a, b"\x00" + ipv4_packet("10.7.0.2", "192.0.2.9", b"still here"))
        a.transmit()
        while True:
            e = await asyncio.wait_for(a.events.get(), 5)
            if isinstance(e, h3e.DatagramReceived):
                break
        assert e.data[1:][20:] == b"still here"
        for proto in (p1, a, b, c):
            proto.close()
            await proto._cm.__aexit__(None, None, None)
        server.close()
        await asyncio.sleep(0.15)
        return service.counters

    counters = run(main(), 30)
    assert counters.auth_failures == 1 and counters.rejected_full == 1


# ----------------------------------------------------------------------------------------------------------------
# our client against an aioquic CONNECT-IP server (reference-server style capsules)
# ----------------------------------------------------------------------------------------------------------------


async def aioquic_connect_ip_server(pki, *, refuse: int | None = None):
    state = {"requests": []}

    def on_h3(proto, e):
        http = proto.http
        if isinstance(e, h3e.HeadersReceived):
            fields = dict(e.headers)
            state["requests"].append(fields)
            if refuse is not None:
                http.send_headers(e.stream_id, [(b":status", str(refuse).encode())], end_stream=True)
            else:
                http.send_headers(e.stream_id, [(b":status", b"200"), (b"capsule-protocol", b"?1")])
                # like the reference C server: one capsule per family (and the v6 prefix length of the pool)
                v4 = AddressAssign([AssignedAddress(0, ipaddress.ip_network("10.9.0.2/32"))])
                v6 = encode_raw_capsule(0x01, b"\x00\x06" + ipaddress.IPv6Address("fd00:9::2").packed + b"\x70")
                r4 = RouteAdvertisement([IpRange(ipaddress.IPv4Address("0.0.0.0"),
                                                 ipaddress.IPv4Address("255.255.255.255"), 0)])
                r6 = RouteAdvertisement([IpRange(ipaddress.IPv6Address("::"),
                                                 ipaddress.IPv6Address("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), 0)])
                http.send_data(e.stream_id, encode_capsule(v4) + v6 + encode_capsule(r4) + encode_capsule(r6),
                               end_stream=False)
            proto.transmit()
        elif isinstance(e, h3e.DatagramReceived):
            if e.data[:1] == b"\x00":
                http.send_datagram(e.stream_id, b"\x00" + reflect(e.data[1:]))
                proto.transmit()

    def create(*args, **kwargs):
        proto = H3Protocol(*args, **kwargs)
        proto.on_h3 = on_h3
        return proto

    server = await serve("127.0.0.1", 0, configuration=aio_config(False, pki), create_protocol=create)
    return server, server._transport.get_extra_info("sockname")[1], state


def client_config(pki) -> QuicConfiguration:
    return QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name="localhost", cafile=pki.ca)


def test_our_client_against_aioquic_server(test_pki):
    async def main():
        server, port, state = await aioquic_connect_ip_server(test_pki)
        got = []
        tunnel = await open_tunnel(("127.0.0.1", port), client_config(test_pki), auth_key=KEY, on_packet=got.append)
        # both families kept although the server split them over two capsules (merge per family)
        assert tunnel.addresses == [ipaddress.ip_network("10.9.0.2/32"), ipaddress.ip_network("fd00:9::2/128")]
        assert len(tunnel.routes) == 2
        (req,) = state["requests"]
        assert req[b":protocol"] == b"connect-ip" and req[b":path"] == b"/.well-known/masque/ip/*/*/"
        assert req[b"capsule-protocol"] == b"?1" and req[b"authorization"] == f"Bearer {KEY}".encode()
        assert req[b":authority"] == f"127.0.0.1:{port}".encode()
        for i in range(50):
            assert tunnel.send_packet(ipv4_packet("10.9.0.2", "192.0.2.1", b"%d" % i))
        for _ in range(300):
            if len(got) == 50:
                break
            await asyncio.sleep(0.01)
        tunnel.close()
        server.close()
        return got

    got = run(main(), 30)
    assert sorted(p[20:] for p in got) == sorted(b"%d" % i for i in range(50))


@pytest.mark.parametrize("status,retry", [(403, False), (401, False), (503, True)])
def test_our_client_refused(test_pki, status, retry):
    async def main():
        server, port, state = await aioquic_connect_ip_server(test_pki, refuse=status)
        try:
            with pytest.raises(TunnelError) as info:
                await open_tunnel(("127.0.0.1", port), client_config(test_pki), auth_key="x")
            return info.value
        finally:
            server.close()

    err = run(main(), 30)
    assert err.status == status and err.retry is retry


def test_our_client_against_our_server(test_pki):
    async def main():
        server, (host, port) = await our_server(test_pki)
        got = []
        tunnel = await open_tunnel(("127.0.0.1", port), client_config(test_pki), auth_key=KEY, on_packet=got.append)
        for i in range(200):
            tunnel.send_packet(ipv4_packet("10.7.0.2", "198.51.100.3", b"%d" % i))
        for _ in range(300):
            if len(got) == 200:
                break
            await asyncio.sleep(0.01)
        events = []
        tunnel.on_event = events.append
        server.close()
        await asyncio.wait_for(tunnel.wait_closed(), 5)
        return got, events

    got, events = run(main(), 30)
    assert len(got) == 200
    assert any(isinstance(e, TunnelClosed) for e in events)
