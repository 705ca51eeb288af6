"""asyncio wiring of CONNECT-IP tunnels: QuicEndpoint + H3Connection + the CONNECT-IP state machines.

``TunnelServer`` serves CONNECT-IP on one UDP socket for many clients; ``open_tunnel`` dials a server and returns
a ``Tunnel`` once the server assigned an address. Both stay free of TUN and netlink (the daemons in server.py and
client.py add those): packets come in through ``on_packet`` callbacks and go out with ``send_packet`` /
``route_packet``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from mqvpn.endpoint import ConnectionHandle, QuicConnectionError, QuicEndpoint
from mqvpn.masque.connectip import (
    AddressesAssigned,
    ClientEvent,
    ConnectIpClient,
    ConnectIpServer,
    ConnectIpService,
    TunnelClosed,
    request_target,
)
from mqvpn.masque.h3 import H3Connection
from mqvpn.quic.config import QuicConfiguration
from mqvpn.quic.events import ConnectionTerminated

_log = logging.getLogger(__name__)

ALPN_H3 = "h3"


class TunnelServer:
    """CONNECT-IP server on one UDP socket. ``service.on_packet(packet, session)`` gets client packets; call
    ``route_packet(packet)`` for packets towards clients (it flushes the right connection at the end of the loop
    turn, so a burst of packets goes out batched)."""

    def __init__(self, service: ConnectIpService, configuration: QuicConfiguration) -> None:
        self.service = service
        self.configuration = configuration
        self.endpoint: QuicEndpoint | None = None
        self.connections: dict[ConnectionHandle, ConnectIpServer] = {}

    async def start(self, listen: tuple, **endpoint_options: Any) -> tuple:
        if listen[0] in ("::", "[::]") and "socket_options" not in endpoint_options:
            # the IPv6 wildcard serves IPv4 clients too (as ::ffff:a.b.c.d), like most daemons bound to [::]
            endpoint_options["socket_options"] = {"dual_stack": True}
        self.endpoint = await QuicEndpoint.serve((listen[0].strip("[]"), listen[1]), self.configuration,
                                                 self._on_connection, **endpoint_options)
        return self.endpoint.local_addr

    def _on_connection(self, handle: ConnectionHandle) -> None:
        h3 = H3Connection(handle.quic)
        server = ConnectIpServer(self.service, h3)
        server.link = handle  # sessions flush through their connection's handle
        self.connections[handle] = server

        def on_event(event: Any) -> None:
            for h3_event in h3.handle_event(event):
                server.handle_h3_event(h3_event)
            if isinstance(event, ConnectionTerminated):
                server.connection_lost()
                self.connections.pop(handle, None)

        handle.event_handler = on_event

    def route_packet(self, packet: bytes) -> bool:
        session = self.service.route_packet(packet)
        if session is None:
            return False
        session.h3_link.transmit()
        return True

    def close(self, error_code: int = 0, reason: str = "server shutting down") -> None:
        """Close every connection (CONNECTION_CLOSE goes out), then the socket."""
        for handle, server in list(self.connections.items()):
            server.connection_lost()
            handle.close(error_code, reason)
        self.connections.clear()
        if self.endpoint is not None:
            endpoint = self.endpoint
            asyncio.get_running_loop().call_later(0.1, endpoint.close)


class TunnelError(ConnectionError):
    """The tunnel could not be opened. ``retry`` False: trying again would fail the same way (wrong key)."""

    def __init__(self, message: str, status: int | None = None, retry: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retry = retry


class Tunnel:
    """An open CONNECT-IP tunnel (client side)."""

    def __init__(self, handle: ConnectionHandle, h3: H3Connection, cip: ConnectIpClient) -> None:
        self.handle = handle
        self.h3 = h3
        self.cip = cip
        self.on_event: Callable[[ClientEvent], None] = lambda event: None
        self.on_quic_event: Callable[[Any], None] = lambda event: None  # e.g. MtuUpdated
        self._closed = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def addresses(self) -> list:
        return self.cip.addresses

    @property
    def routes(self) -> list:
        return list(self.cip.routes.ranges) if self.cip.routes else []

    @property
    def max_ip_packet_size(self) -> int:
        return self.cip.max_ip_packet_size

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def send_packet(self, packet: bytes) -> bool:
        if self.cip.send_packet(packet):
            self.handle.transmit()
            return True
        return False

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def close(self) -> None:
        self.cip.close()
        self.handle.close(0, "tunnel closed")


async def open_tunnel(server: tuple, configuration: QuicConfiguration, *, auth_key: str | None = None,
                      on_packet: Callable[[bytes], None] | None = None, authority: str | None = None,
                      timeout: float = 10.0, **endpoint_options: Any) -> Tunnel:
    """Connect to a CONNECT-IP server and wait until it assigned an address. Raises TunnelError."""
    host, port = server[0], server[1]
    default_authority, path = request_target(host, port)
    loop = asyncio.get_running_loop()
    try:
        handle = await asyncio.wait_for(
            QuicEndpoint.connect((host, port), configuration, wait_connected=False, **endpoint_options), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise TunnelError(f"cannot reach {host}:{port}: {exc}") from exc
    h3 = H3Connection(handle.quic)
    cip = ConnectIpClient(h3, authority=authority or default_authority, path=path, auth_key=auth_key,
                          on_packet=on_packet)
    tunnel = Tunnel(handle, h3, cip)
    ready: asyncio.Future = loop.create_future()

    def deliver(events: list[ClientEvent]) -> None:
        for event in events:
            if isinstance(event, AddressesAssigned) and event.addresses and not ready.done():
                ready.set_result(None)
            elif isinstance(event, TunnelClosed):
                if not ready.done():
                    ready.set_exception(TunnelError(event.reason, event.status, event.retry))
                tunnel._closed.set()
            tunnel.on_event(event)
        arm()

    def arm() -> None:
        deadline = cip.get_timer()
        if tunnel._timer is not None:
            tunnel._timer.cancel()
            tunnel._timer = None
        if deadline is not None:
            tunnel._timer = loop.call_at(deadline, lambda: (deliver(cip.poll(loop.time())), handle.transmit()))

    def on_event(event: Any) -> None:
        tunnel.on_quic_event(event)
        events: list[ClientEvent] = []
        for h3_event in h3.handle_event(event):
            events += cip.handle_h3_event(h3_event)
        if isinstance(event, ConnectionTerminated):
            events += cip.connection_lost(event.reason_phrase or f"error 0x{event.error_code:x}")
        events += cip.poll(loop.time())
        deliver(events)

    handle.event_handler = on_event
    try:
        await asyncio.wait_for(asyncio.shield(ready), timeout)
    except asyncio.TimeoutError:
        handle.close(0, "timeout")
        raise TunnelError(f"no tunnel from {host}:{port} within {timeout:.0f} s") from None
    except QuicConnectionError as exc:
        raise TunnelError(str(exc)) from exc
    except TunnelError:
        handle.close(0, "tunnel refused")
        raise
    return tunnel
