"""Our HTTP/3 (mqvpn.masque.h3 over our QUIC and asyncio endpoint) against aioquic's HTTP/3 and QUIC, both
directions, over real UDP on 127.0.0.1 with certificate verification: SETTINGS, an extended CONNECT (connect-ip)
answered 200, DATA both ways, HTTP Datagrams both ways on the request stream.

aioquic sends H3_DATAGRAM only with WebTransport; ``DatagramH3`` adds it (masque-wire.md §2, trap 1).
"""

from __future__ import annotations

import asyncio

import pytest
from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.h3 import events as aio_h3
from aioquic.h3.connection import H3Connection as AioH3Connection
from aioquic.h3.connection import Setting as AioSetting
from aioquic.quic import events as aio_quic
from aioquic.quic.configuration import QuicConfiguration as AioConfiguration

from mqvpn.endpoint import QuicEndpoint
from mqvpn.masque.h3 import DataReceived, H3Connection, HeadersReceived, MessageRejected
from mqvpn.masque.h3frames import ErrorCode
from mqvpn.quic.config import QuicConfiguration
from tests.interop.pki import make_test_pki

pytestmark = pytest.mark.interop

CONNECT_IP = [
    (b":method", b"CONNECT"),
    (b":protocol", b"connect-ip"),
    (b":scheme", b"https"),
    (b":authority", b"localhost:443"),
    (b":path", b"/.well-known/masque/ip/*/*/"),
    (b"capsule-protocol", b"?1"),
]
OK = [(b":status", b"200"), (b"capsule-protocol", b"?1")]
# context ID 0 + a (fake) IPv4 packet, numbered
PACKETS = [b"\x00\x45\x00" + i.to_bytes(2, "big") + bytes(range(40)) * 3 for i in range(50)]
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def wait_until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def is_connect_ip(headers) -> bool:
    fields = dict(headers)
    return fields.get(b":method") == b"CONNECT" and fields.get(b":protocol") == b"connect-ip"


# ----------------------------------------------------------------------------------------------------------------
# aioquic side
# ----------------------------------------------------------------------------------------------------------------


class DatagramH3(AioH3Connection):
    """aioquic's HTTP/3, announcing H3_DATAGRAM=1 (it otherwise does so only with WebTransport)."""

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        settings[AioSetting.H3_DATAGRAM] = 1
        return settings


def aio_configuration(is_client: bool, pki) -> AioConfiguration:
    config = AioConfiguration(is_client=is_client, alpn_protocols=["h3"], max_datagram_frame_size=65535)
    if is_client:
        config.server_name = "localhost"
        config.load_verify_locations(cafile=pki.ca)
    else:
        config.load_cert_chain(pki.cert, pki.key)
    return config


class AioClient(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = DatagramH3(self._quic)
        self.events: list = []

    def quic_event_received(self, event) -> None:
        self.events += self.h3.handle_event(event)

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]


class AioConnectIpServer(QuicConnectionProtocol):
    """Answers a connect-ip request with 200 + a DATA frame, echoes DATA and HTTP Datagrams."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = DatagramH3(self._quic)
        self.requests: list = []
        self.data = b""
        self.terminated: aio_quic.ConnectionTerminated | None = None

    def quic_event_received(self, event) -> None:
        if isinstance(event, aio_quic.ConnectionTerminated):
            self.terminated = event
        for e in self.h3.handle_event(event):
            if isinstance(e, aio_h3.HeadersReceived):
                self.requests.append(e.headers)
                status = b"200" if is_connect_ip(e.headers) else b"400"
                self.h3.send_headers(e.stream_id, [(b":status", status), (b"capsule-protocol", b"?1")])
                self.h3.send_data(e.stream_id, b"hello from aioquic", False)
            elif isinstance(e, aio_h3.DataReceived):
                self.data += e.data
                if e.data:
                    self.h3.send_data(e.stream_id, e.data, False)
            elif isinstance(e, aio_h3.DatagramReceived):
                self.h3.send_datagram(e.stream_id, e.data)
        self.transmit()


# ----------------------------------------------------------------------------------------------------------------
# our side
# ----------------------------------------------------------------------------------------------------------------


class OurConnectIpServer:
    """One connection of our H3 server: answers connect-ip with 200 + DATA, echoes DATA and HTTP Datagrams."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.h3 = H3Connection(handle.quic)
        self.events: list = []
        self.data = b""
        self.datagrams: list[bytes] = []
        handle.event_handler = self.on_event

    def on_event(self, event) -> None:
        for e in self.h3.handle_event(event):
            self.events.append(e)
            if isinstance(e, HeadersReceived) and not e.trailers:
                if not is_connect_ip(e.headers):
                    self.h3.send_headers(e.stream_id, [(b":status", b"400")], end_stream=True)
                    continue
                sid = e.stream_id
                self.h3.register_datagram_handler(sid, lambda payload, sid=sid: self.on_datagram(sid, payload))
                self.h3.send_headers(sid, OK)
                self.h3.send_data(sid, b"hello from mqvpn")
            elif isinstance(e, DataReceived):
                self.data += e.data
                if e.data:
                    self.h3.send_data(e.stream_id, e.data)
        self.handle.transmit()

    def on_datagram(self, stream_id: int, payload: bytes) -> None:
        self.datagrams.append(payload)
        self.h3.send_datagram(stream_id, payload)
        self.handle.transmit()


def our_configuration(is_client: bool, pki) -> QuicConfiguration:
    if is_client:
        return QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name="localhost", cafile=pki.ca)
    config = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
    config.load_cert_chain(pki.cert, pki.key)
    return config


# ----------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------


def test_aioquic_client_to_our_server(pki):
    async def scenario():
        apps: list[OurConnectIpServer] = []
        endpoint = await QuicEndpoint.serve(("127.0.0.1", 0), our_configuration(False, pki),
                                            lambda handle: apps.append(OurConnectIpServer(handle)))
        try:
            port = endpoint.local_addr[1]
            async with connect("127.0.0.1", port, configuration=aio_configuration(True, pki),
                               create_protocol=AioClient) as client:
                h3 = client.h3
                sid = client._quic.get_next_available_stream_id()
                h3.send_headers(sid, CONNECT_IP)
                client.transmit()
                await wait_until(lambda: client.of(aio_h3.DataReceived), what="response")
                [response] = client.of(aio_h3.HeadersReceived)
                assert response.stream_id == sid and dict(response.headers)[b":status"] == b"200"
                assert dict(response.headers)[b"capsule-protocol"] == b"?1"
                assert b"".join(e.data for e in client.of(aio_h3.DataReceived)) == b"hello from mqvpn"

                [app] = apps
                assert app.h3.datagrams_negotiated and app.h3.peer_supports_extended_connect
                assert [e.headers for e in app.events if isinstance(e, HeadersReceived)] == [CONNECT_IP]

                for packet in PACKETS:
                    h3.send_datagram(sid, packet)
                h3.send_data(sid, b"capsules from aioquic", False)
                client.transmit()
                await wait_until(lambda: len(client.of(aio_h3.DatagramReceived)) == len(PACKETS) and
                                 b"capsules from aioquic" in b"".join(e.data for e in client.of(aio_h3.DataReceived)),
                                 what="echoes")
                assert sorted(app.datagrams) == sorted(PACKETS)
                echoed = client.of(aio_h3.DatagramReceived)
                assert {e.stream_id for e in echoed} == {sid} and sorted(e.data for e in echoed) == sorted(PACKETS)
                assert app.data == b"capsules from aioquic"
                assert not app.h3.closed and app.h3.datagrams_dropped_unknown_stream == 0
                assert not [e for e in app.events if isinstance(e, MessageRejected)]

                # an extended CONNECT without :path is malformed: a stream error, the connection lives on
                bad = client._quic.get_next_available_stream_id()
                h3.send_headers(bad, [h for h in CONNECT_IP if h[0] != b":path"])
                client.transmit()
                await wait_until(lambda: any(isinstance(e, MessageRejected) for e in app.events), what="rejection")
                assert not app.h3.closed
        finally:
            endpoint.close()

    run(scenario())


def test_our_client_to_aioquic_server(pki):
    async def scenario():
        servers: list[AioConnectIpServer] = []

        def create_protocol(*args, **kwargs):
            protocol = AioConnectIpServer(*args, **kwargs)
            servers.append(protocol)
            return protocol

        server = await serve("127.0.0.1", 0, configuration=aio_configuration(False, pki),
                             create_protocol=create_protocol)
        port = server._transport.get_extra_info("sockname")[1]
        handle = None
        try:
            handle = await QuicEndpoint.connect(("127.0.0.1", port), our_configuration(True, pki),
                                                wait_connected=False)
            h3 = H3Connection(handle.quic)  # before the handshake: the control stream opens once it can
            events: list = []

            def on_event(event) -> None:
                events.extend(h3.handle_event(event))
                handle.transmit()

            handle.event_handler = on_event
            await handle.wait_connected()
            await wait_until(lambda: h3.settings_received, what="SETTINGS")
            assert h3.peer_supports_extended_connect and h3.datagrams_negotiated

            sid = h3.get_next_available_stream_id()
            h3.send_headers(sid, CONNECT_IP)
            handle.transmit()
            await wait_until(lambda: any(isinstance(e, DataReceived) for e in events), what="response")
            [response] = [e for e in events if isinstance(e, HeadersReceived)]
            assert response.stream_id == sid and dict(response.headers)[b":status"] == b"200"
            assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == b"hello from aioquic"
            assert servers[0].requests == [CONNECT_IP]

            got: list[bytes] = []
            h3.register_datagram_handler(sid, got.append)
            for packet in PACKETS[:25]:
                assert h3.send_datagram(sid, packet)
            prefix = h3.datagram_prefix(sid)
            for packet in PACKETS[25:]:  # the hot-path way
                assert handle.send_datagram_frame(prefix + packet)
            h3.send_data(sid, b"capsules from mqvpn")
            handle.transmit()
            await wait_until(lambda: len(got) == len(PACKETS) and b"capsules from mqvpn" in
                             b"".join(e.data for e in events if isinstance(e, DataReceived)), what="echoes")
            assert sorted(got) == sorted(PACKETS)
            assert servers[0].data == b"capsules from mqvpn"
            assert not h3.closed and h3.datagrams_dropped_unknown_stream == 0

            h3.close(ErrorCode.H3_NO_ERROR)
            handle.transmit()
            await wait_until(lambda: servers[0].terminated is not None, what="close at the server")
            assert servers[0].terminated.error_code == ErrorCode.H3_NO_ERROR
        finally:
            if handle is not None:
                handle.endpoint.close()
            server.close()

    run(scenario())
