"""mqvpn's own QUIC (src/mqvpn/quic + endpoint) plugged into the interop harness as kind "mqvpn".

Importing this module registers the kind for echo_server("mqvpn", ...) and run_client("mqvpn", ...).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Sequence

from mqvpn.endpoint import QuicConnectionError, QuicEndpoint
from mqvpn.quic.config import QuicConfiguration

from .peers import (
    DEFAULT_ALPN,
    DEFAULT_MAX_DATA,
    DEFAULT_MAX_STREAM_DATA,
    ClientOptions,
    EchoApp,
    InteropError,
    ServerAddress,
    ServerHandle,
    wait_until,
    dispatch_event,
    register_client_kind,
    register_server_kind,
)


@contextlib.asynccontextmanager
async def mqvpn_server(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    cert: str,
    key: str,
    alpn: Sequence[str] = DEFAULT_ALPN,
    max_datagram_frame_size: int | None = 65535,
    idle_timeout: float = 30.0,
    key_update_after: int | None = None,
    max_data: int = DEFAULT_MAX_DATA,
    max_stream_data: int = DEFAULT_MAX_STREAM_DATA,
    retry: bool = False,
    extra: dict | None = None,
) -> AsyncIterator[ServerAddress]:
    cfg = QuicConfiguration(
        is_client=False, alpn_protocols=list(alpn), idle_timeout=idle_timeout,
        max_datagram_frame_size=min(max_datagram_frame_size, 65535) if max_datagram_frame_size else None,
        initial_max_data=max_data, initial_max_stream_data=max_stream_data, retry=retry,
        datagram_queue_limit=1024,
    )  # fmt: skip
    cfg.load_cert_chain(cert, key)
    for name, value in (extra or {}).items():
        setattr(cfg, name, value)
    handle = ServerHandle("mqvpn")

    def on_connection(conn) -> None:
        app = EchoApp(conn.quic, transmit=conn.transmit, key_update_after=key_update_after)
        handle.apps.append(app)
        handle.protocols.append(conn)
        def on_event(event) -> None:
            dispatch_event(event, app)
            app.after_receive()  # samples the key phases

        def on_datagram(data: bytes) -> None:
            app.on_datagram(data)
            app.after_receive()

        conn.event_handler = on_event
        conn.datagram_handler = on_datagram

    endpoint = await QuicEndpoint.serve((host, port), cfg, on_connection, retry=retry)
    try:
        yield ServerAddress(endpoint.local_addr[0], endpoint.local_addr[1], handle)
    finally:
        for app, conn in zip(handle.apps, handle.protocols):
            if not app.terminated:
                with contextlib.suppress(Exception):
                    conn.close()
        with contextlib.suppress(InteropError):
            await wait_until(lambda: not handle.live, 1.0, "server connections to close")
        endpoint.close()


class MqvpnClientSession:
    """ClientSession over mqvpn's QuicEndpoint.connect."""

    def __init__(self, host: str, port: int, options: ClientOptions, sink: Any) -> None:
        self.host, self.port = host, port
        self.options = options
        self.sink = sink
        self.handle: Any = None

    def _configuration(self) -> QuicConfiguration:
        o = self.options
        cfg = QuicConfiguration(
            is_client=True, alpn_protocols=list(o.alpn), idle_timeout=o.idle_timeout,
            max_datagram_frame_size=min(o.max_datagram_frame_size, 65535) if o.max_datagram_frame_size else None,
            initial_max_data=o.max_data, initial_max_stream_data=o.max_stream_data, server_name=o.server_name,
            verify_peer=o.verify, cafile=o.cafile, datagram_queue_limit=1024,
        )  # fmt: skip
        for name, value in o.extra.items():
            setattr(cfg, name, value)
        return cfg

    @property
    def last_rx(self) -> float | None:
        return None if self.handle is None else self.handle.last_rx

    def _on_event(self, event: Any) -> None:
        dispatch_event(event, self.sink)

    def _on_datagram(self, data: bytes) -> None:
        self.sink.on_datagram(data)

    async def connect(self) -> None:
        try:
            self.handle = await asyncio.wait_for(
                QuicEndpoint.connect((self.host, self.port), self._configuration(), wait_connected=False),
                self.options.connect_timeout)
            self.handle.event_handler = self._on_event
            self.handle.datagram_handler = self._on_datagram
            await asyncio.wait_for(self.handle.wait_connected(), self.options.connect_timeout)
        except QuicConnectionError as exc:
            raise InteropError(f"mqvpn client: handshake failed: {exc}") from exc
        except asyncio.TimeoutError as exc:
            raise InteropError(f"mqvpn client: no handshake within {self.options.connect_timeout}s") from exc

    @property
    def quic(self) -> Any:
        return self.handle.quic

    @property
    def alpn_protocol(self) -> str | None:
        return self.quic.alpn_protocol

    @property
    def peer_max_datagram_frame_size(self) -> int | None:
        return self.quic.peer_max_datagram_frame_size

    def open_bidi_stream(self) -> int:
        return self.quic.get_next_available_stream_id(False)

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        self.quic.send_stream_data(stream_id, data, end_stream)

    def send_datagram(self, data: bytes) -> bool:
        return self.quic.send_datagram_frame(data)

    def transmit(self) -> None:
        self.handle.transmit()

    def request_key_update(self) -> None:
        self.quic.request_key_update()

    def key_phases(self) -> tuple[int | None, int | None]:
        return self.quic.key_phases()

    def close(self) -> None:
        self.handle.close()

    async def wait_closed(self) -> None:
        await self.handle.wait_closed()

    async def aclose(self) -> None:
        if self.handle is not None:
            self.handle.endpoint.close()


register_server_kind("mqvpn", mqvpn_server)
register_client_kind("mqvpn", lambda host, port, options, sink: MqvpnClientSession(host, port, options, sink))
