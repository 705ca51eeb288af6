"""The asyncio driver of sans-I/O QUIC connections: sockets, routing by connection ID, timers, batching.

One ``QuicEndpoint`` owns UDP sockets (``linux.udp.UdpBatchSocket``) watched with ``loop.add_reader``. The hot
path, top to bottom:

1. ``_on_readable``: drain the socket (``recv_batch`` until EAGAIN or the budget), hand every datagram to its
   connection (``receive_datagram``) and remember which connections were touched;
2. then, once per touched connection, ``_service``: dispatch its events, send what it has
   (``datagrams_to_send``, consecutive datagrams to one address in one ``send_batch`` = GSO), re-arm its timer.

Receiving a burst therefore costs one transmit per connection, not one per datagram; that batching is the point.
Application sends (``ConnectionHandle.send_datagram_frame`` ...) schedule one flush with ``loop.call_soon``, so
many sends within one callback go out together.

Server: ``await QuicEndpoint.serve(...)`` routes by destination connection ID; a new connection is made for an
unknown DCID only from a client Initial in a datagram of at least 1200 bytes. Client: ``await
QuicEndpoint.connect(...)`` returns a ``ConnectionHandle`` once the handshake completed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from mqvpn.linux.udp import UdpBatchSocket, open_udp_socket
from mqvpn.quic.events import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionTerminated,
    HandshakeCompleted,
)

__all__ = ["QuicEndpoint", "ConnectionHandle", "QuicConnectionError"]

_log = logging.getLogger(__name__)

MIN_INITIAL_DATAGRAM = 1200  # RFC 9000 §14.1: a server drops client Initials in smaller datagrams
RECV_BATCH = 64  # datagrams per recv_batch call
RECV_BUDGET = 1024  # datagrams per readable callback before the loop gets a turn (and we transmit)
RETRY_TOKEN_LIFETIME = 10.0  # seconds
MIN_RESET_TRIGGER = 43  # a stateless reset must be shorter than its trigger and at least 21 bytes (+ margin)
STATELESS_RESETS_PER_SECOND = 100


class QuicConnectionError(ConnectionError):
    """The connection ended before its handshake completed."""

    def __init__(self, error_code: int, reason_phrase: str = "", frame_type: int | None = None) -> None:
        message = f"QUIC connection failed: error 0x{error_code:x}"
        if reason_phrase:
            message += f" ({reason_phrase})"
        super().__init__(message)
        self.error_code = error_code
        self.reason_phrase = reason_phrase
        self.frame_type = frame_type


class ConnectionHandle:
    """The application's side of one connection driven by a ``QuicEndpoint``.

    ``event_handler(event)`` gets every event (default: queued for ``await next_event()``). Set
    ``datagram_handler`` for received DATAGRAM payloads: it is installed on the connection itself (hot path,
    no event objects). Sending calls schedule one flush for the current loop turn.
    """

    def __init__(self, endpoint: QuicEndpoint, quic: Any) -> None:
        self.last_rx: float | None = None  # loop time of the last datagram received for this connection
        self.quic = quic
        self.endpoint = endpoint
        self._loop = endpoint._loop
        self._events: asyncio.Queue = asyncio.Queue()
        self.event_handler: Callable[[Any], None] = self._events.put_nowait
        self._flush_handle: asyncio.Handle | None = None
        self._timer_handle: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._cids: set[bytes] = set()  # routes of this connection in the endpoint's table
        self._initial_dcid: bytes | None = None  # server: DCID of the Initial that made the connection
        self._odcid: bytes | None = None  # server: the client's original DCID (differs after a Retry)
        self._connected = False
        self._terminated: ConnectionTerminated | None = None
        self._removed = False
        self._connect_waiters: list[asyncio.Future] = []
        self._closed = asyncio.Event()

    # --- state --------------------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """The handshake completed."""
        return self._connected

    @property
    def terminated(self) -> ConnectionTerminated | None:
        """The ConnectionTerminated event, once there was one."""
        return self._terminated

    @property
    def closed(self) -> bool:
        """The connection is gone from its endpoint (drained, or the endpoint was closed)."""
        return self._removed

    @property
    def datagram_handler(self) -> Callable[[bytes], None] | None:
        return self.quic.datagram_handler

    @datagram_handler.setter
    def datagram_handler(self, handler: Callable[[bytes], None] | None) -> None:
        self.quic.datagram_handler = handler

    # --- waiting ------------------------------------------------------------------------------------------------
    async def next_event(self) -> Any:
        """The next event (only with the default ``event_handler``)."""
        return await self._events.get()

    async def wait_connected(self) -> None:
        """Return once the handshake completed; raise QuicConnectionError if the connection ended first."""
        if self._connected:
            return
        if self._terminated is not None or self._removed:
            raise self._failure()
        waiter = self._loop.create_future()
        self._connect_waiters.append(waiter)
        await waiter

    async def wait_closed(self) -> None:
        """Return once the connection is gone (closed and drained, or aborted with the endpoint)."""
        await self._closed.wait()

    # --- sending ------------------------------------------------------------------------------------------------
    def transmit(self) -> None:
        """Send what the connection has, at the end of this loop turn (one flush however often it is called)."""
        if self._flush_handle is None and not self._removed:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if not self._removed:
            self.endpoint._service(self, self._loop.time())

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        self.quic.send_stream_data(stream_id, data, end_stream)
        self.transmit()

    def send_datagram_frame(self, data: bytes, flow: int = 0) -> bool:
        """Queue a DATAGRAM frame (``flow``: see QuicConnection.send_datagram_frame); False when the connection
        dropped it (too large, queue full)."""
        if self.quic.send_datagram_frame(data, flow):
            if self._flush_handle is None and not self._removed:
                self._flush_handle = self._loop.call_soon(self._flush)
            return True
        return False

    def get_next_available_stream_id(self, is_unidirectional: bool = False) -> int:
        return self.quic.get_next_available_stream_id(is_unidirectional)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        self.quic.reset_stream(stream_id, error_code)
        self.transmit()

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        self.quic.stop_stream(stream_id, error_code)
        self.transmit()

    def close(self, error_code: int = 0, reason: str = "") -> None:
        """Start closing (CONNECTION_CLOSE goes out now; the connection is removed once it has drained)."""
        if self._removed:
            return
        self.quic.close(error_code=error_code, reason_phrase=reason)
        self.transmit()

    # --- endpoint side ------------------------------------------------------------------------------------------
    def _failure(self) -> QuicConnectionError:
        t = self._terminated
        if t is None:
            return QuicConnectionError(0, "endpoint closed")
        return QuicConnectionError(t.error_code, t.reason_phrase, t.frame_type)

    def _set_connected(self) -> None:
        self._connected = True
        for waiter in self._connect_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._connect_waiters.clear()

    def _fail_waiters(self) -> None:
        for waiter in self._connect_waiters:
            if not waiter.done():
                waiter.set_exception(self._failure())
        self._connect_waiters.clear()

    def _set_removed(self) -> None:
        self._removed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._timer_handle is not None:
            self._timer_handle.cancel()
            self._timer_handle = None
        self._timer_at = None
        self._fail_waiters()
        self._closed.set()

    def __repr__(self) -> str:
        state = "closed" if self._removed else "terminated" if self._terminated else "connected" if \
            self._connected else "handshake"
        return f"<ConnectionHandle {state} {self.quic!r}>"


class QuicEndpoint:
    """UDP sockets + timers for QUIC connections. Make one with ``serve`` or ``connect``.

    Counters: ``datagrams_received``, ``dropped_unknown_cid`` (short header, no such connection),
    ``dropped_invalid`` (unparseable, too-small Initial, bad Retry token ...), ``version_negotiations``,
    ``retries``, ``connections_accepted``; per socket see ``UdpBatchSocket`` (``stats()`` gathers all).
    """

    def __init__(
        self,
        configuration: Any,
        *,
        is_client: bool,
        connection_factory: Callable[..., Any] | None = None,
        on_connection: Callable[[ConnectionHandle], Any] | None = None,
        retry: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self.configuration = configuration
        self.is_client = is_client
        self._factory = connection_factory
        self._on_connection = on_connection
        self._cid_len: int = getattr(configuration, "connection_id_length", 8)
        self._sockets: dict[Any, UdpBatchSocket] = {}  # local address (the socket's key) -> socket
        self._default: UdpBatchSocket | None = None
        self._default_key: Any = None
        self._routes: dict[bytes, ConnectionHandle] = {}  # our CIDs -> connection
        self._initial_routes: dict[bytes, ConnectionHandle] = {}  # client-chosen Initial DCIDs, long headers only
        self._handles: dict[ConnectionHandle, None] = {}
        self._client: ConnectionHandle | None = None
        self._retry = _RetryTokens() if retry else None
        self._tasks: set[asyncio.Task] = set()  # on_connection coroutines
        self._closed = asyncio.Event()
        self.recv_budget = RECV_BUDGET
        self.datagrams_received = 0
        self.dropped_unknown_cid = 0
        self.dropped_invalid = 0
        self.version_negotiations = 0
        self.retries = 0
        self.connections_accepted = 0
        self.stateless_resets_sent = 0
        self._reset_window = (0.0, 0)  # (window start, resets sent in it)

    # ------------------------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    async def serve(
        cls,
        local_addr: tuple,
        configuration: Any,
        on_connection: Callable[[ConnectionHandle], Any],
        *,
        connection_factory: Callable[..., Any] | None = None,
        retry: bool = False,
        reuse_port: bool = False,
        bind_device: str | None = None,
        gso: bool = True,
        gro: bool = True,
        socket_options: dict[str, Any] | None = None,
    ) -> QuicEndpoint:
        """A server endpoint on ``local_addr``. ``on_connection(handle)`` runs for every new connection, before
        its first datagram is processed (set handlers there). Retry (address validation) when ``retry`` or
        ``configuration.retry``. ``socket_options`` go to ``open_udp_socket`` (rcvbuf, sndbuf, dual_stack ...)."""
        if getattr(configuration, "is_client", False):
            raise ValueError("serve() needs a server configuration (is_client=False)")
        endpoint = cls(configuration, is_client=False, connection_factory=connection_factory,
                       on_connection=on_connection, retry=retry or bool(getattr(configuration, "retry", False)))
        endpoint.open_socket(local_addr, reuse_port=reuse_port, bind_device=bind_device, gso=gso, gro=gro,
                             **(socket_options or {}))
        return endpoint

    @classmethod
    async def connect(
        cls,
        remote_addr: tuple,
        configuration: Any,
        *,
        local_addr: tuple | None = None,
        connection_factory: Callable[..., Any] | None = None,
        wait_connected: bool = True,
        bind_device: str | None = None,
        gso: bool = True,
        gro: bool = True,
        socket_options: dict[str, Any] | None = None,
    ) -> ConnectionHandle:
        """Open a socket, start a client connection to ``remote_addr`` (host may be a name) and, unless
        ``wait_connected`` is False, wait for the handshake (QuicConnectionError if it fails). The endpoint closes
        itself when the connection is gone."""
        loop = asyncio.get_running_loop()
        if getattr(configuration, "server_name", "") is None:
            # verify the certificate against the host we dial; a hostname also goes out as SNI (some servers refuse
            # a ClientHello without it), an IP literal does not (RFC 6066) and is checked against the IP SANs
            configuration = dataclasses.replace(configuration, server_name=remote_addr[0].strip("[]"))
        remote = await _resolve(loop, remote_addr, local_addr)
        family = socket.AF_INET6 if len(remote) == 4 else socket.AF_INET
        if local_addr is None:
            local_addr = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
        endpoint = cls(configuration, is_client=True, connection_factory=connection_factory, loop=loop)
        key = endpoint.open_socket(local_addr, family=family, bind_device=bind_device, gso=gso, gro=gro,
                                   **(socket_options or {}))
        try:
            quic = endpoint._make_connection(configuration)
            handle = ConnectionHandle(endpoint, quic)
            endpoint._client = handle
            endpoint._handles[handle] = None
            quic.connect(remote, loop.time(), key)
            endpoint._service(handle, loop.time())
            if wait_connected:
                await handle.wait_connected()
        except BaseException:
            endpoint.close()
            raise
        return handle

    def _make_connection(self, configuration: Any, **kwargs: Any) -> Any:
        factory = self._factory
        if factory is None:
            from mqvpn.quic.connection import (
                QuicConnection,  # lazily: the endpoint works with any connection
            )

            factory = self._factory = QuicConnection
        return factory(configuration, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # sockets
    # ------------------------------------------------------------------------------------------------------------

    def open_socket(self, local_addr: tuple, *, gso: bool = True, gro: bool = True, **udp_options: Any) -> tuple:
        """Open and watch another UDP socket (e.g. one per local path of a multipath client).

        Returns its key: the bound address as ``getsockname()`` reports it. Connections see that key as
        ``local_addr`` on receive and name it as ``local_addr`` in ``datagrams_to_send`` to pick the socket
        (None or an unknown key: the first socket). ``udp_options``: see ``open_udp_socket``."""
        if self._closed.is_set():
            raise RuntimeError("endpoint closed")
        usock = UdpBatchSocket(open_udp_socket(local_addr, **udp_options), gso=gso, gro=gro)
        key = usock.getsockname()
        self._sockets[key] = usock
        if self._default is None:
            self._default = usock
            self._default_key = key
        self._loop.add_reader(usock.fileno(), self._on_readable, usock, key)
        return key

    def close_socket(self, key: tuple) -> None:
        """Stop using one socket (not the first one)."""
        usock = self._sockets.pop(key, None)
        if usock is None:
            return
        if usock is self._default:
            self._sockets[key] = usock
            raise ValueError("the first socket lives as long as the endpoint")
        self._loop.remove_reader(usock.fileno())
        usock.close()

    @property
    def local_addr(self) -> tuple | None:
        """The first socket's bound address."""
        return self._default_key

    @property
    def sockets(self) -> dict[Any, UdpBatchSocket]:
        return dict(self._sockets)

    @property
    def connections(self) -> list[ConnectionHandle]:
        return list(self._handles)

    def stats(self) -> dict[str, int]:
        out = {
            name: getattr(self, name)
            for name in ("datagrams_received", "dropped_unknown_cid", "dropped_invalid", "version_negotiations",
                         "retries", "connections_accepted")
        }
        for name in ("sent", "send_drops", "received", "gso_batches", "gro_batches"):
            out[name] = sum(getattr(s, name) for s in self._sockets.values())
        out["connections"] = len(self._handles)
        return out

    def close(self) -> None:
        """Abort: stop every connection at once (no CONNECTION_CLOSE) and close the sockets."""
        if self._closed.is_set():
            return
        self._closed.set()
        for handle in list(self._handles):
            self._remove(handle)
        for usock in self._sockets.values():
            try:
                self._loop.remove_reader(usock.fileno())
            except (ValueError, RuntimeError):  # loop already closed
                pass
            usock.close()
        self._sockets.clear()
        self._default = None

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # ------------------------------------------------------------------------------------------------------------
    # receive (hot path)
    # ------------------------------------------------------------------------------------------------------------

    def _on_readable(self, usock: UdpBatchSocket, key: tuple) -> None:
        touched: dict[ConnectionHandle, None] = {}
        recv_batch = usock.recv_batch
        loop_time = self._loop.time
        client = self._client
        routes_get = self._routes.get
        cid_end = 1 + self._cid_len
        budget = self.recv_budget
        now = loop_time()
        while budget > 0:
            batch = recv_batch(RECV_BATCH)
            if not batch:
                break
            count = len(batch)
            budget -= count
            self.datagrams_received += count
            if client is not None:
                receive = client.quic.receive_datagram
                for data, addr in batch:
                    try:
                        receive(data, addr, now, key)
                    except Exception:
                        self._receive_failed(client)
                touched[client] = None
            else:
                last = None
                receive = None
                for data, addr in batch:
                    if data and data[0] < 0x80:  # short header: the common case, routed inline
                        handle = routes_get(data[1:cid_end])
                        if handle is None:
                            self.dropped_unknown_cid += 1
                            self._maybe_stateless_reset(data, addr, key, now)
                            continue
                    else:
                        handle = self._route_long(data, addr, key, now)
                        if handle is None:
                            continue
                    if handle is not last:  # runs of one connection (a GRO buffer) skip the lookups
                        last = handle
                        receive = handle.quic.receive_datagram
                        touched[handle] = None
                    try:
                        receive(data, addr, now, key)
                    except Exception:
                        self._receive_failed(handle)
            if count < RECV_BATCH or self._default is None:  # drained, or closed by a handler meanwhile
                break
            now = loop_time()
        if touched:
            for handle in touched:
                handle.last_rx = now
            now = loop_time()
            for handle in touched:
                if not handle._removed:
                    self._service(handle, now)

    def _maybe_stateless_reset(self, data: bytes, addr: tuple, key: Any, now: float) -> None:
        """A short-header packet for a connection we do not know (e.g. lost in a restart): answer with a stateless
        reset (RFC 9000 §10.3) so the peer gives up at once instead of waiting for its idle timeout. The reset is
        smaller than the packet that triggered it (no reset loops) and rate-limited."""
        reset_key = getattr(self.configuration, "stateless_reset_key", None)
        if self.is_client or reset_key is None or len(data) < MIN_RESET_TRIGGER:
            return
        start, count = self._reset_window
        if now - start >= 1.0:
            start, count = now, 0
        if count >= STATELESS_RESETS_PER_SECOND:
            return
        self._reset_window = (start, count + 1)
        from mqvpn.quic.crypto import stateless_reset_token
        from mqvpn.quic.packet import build_stateless_reset

        token = stateless_reset_token(reset_key, data[1:1 + self._cid_len])
        self.stateless_resets_sent += 1
        self._send_raw(build_stateless_reset(token, min(len(data) - 1, 64)), addr, key)

    def _receive_failed(self, handle: ConnectionHandle) -> None:
        self._loop.call_exception_handler({"message": "receive_datagram failed", "exception": _current_exception(),
                                           "connection": handle})

    def _route_long(self, data: bytes, addr: tuple, key: tuple, now: float) -> ConnectionHandle | None:
        """The connection a long-header datagram belongs to (its DCID carries its length); unknown DCIDs go to
        ``_accept``. None: dropped (counted)."""
        if len(data) < 7:
            self.dropped_invalid += 1
            return None
        dcid = data[6 : 6 + data[5]]
        handle = self._routes.get(dcid)
        if handle is None:
            handle = self._initial_routes.get(dcid)
            if handle is None:
                return self._accept(data, addr, key, now)
        return handle

    def _accept(self, data: bytes, addr: tuple, key: tuple, now: float) -> ConnectionHandle | None:
        """A long-header datagram for no known connection: maybe Version Negotiation, Retry or a new connection."""
        from mqvpn.quic.errors import QuicProtocolError
        from mqvpn.quic.packet import (
            QUIC_VERSION_1,
            PacketType,
            build_retry,
            build_version_negotiation,
            parse_header,
        )

        try:
            header = parse_header(data, 0, self._cid_len)
        except QuicProtocolError:
            self.dropped_invalid += 1
            return None
        if len(data) < MIN_INITIAL_DATAGRAM:
            self.dropped_invalid += 1
            return None
        if header.packet_type is None and header.version:  # a version we do not speak: tell the client ours
            self.version_negotiations += 1
            self._send_raw(build_version_negotiation(header.scid, header.dcid, [QUIC_VERSION_1]), addr, key)
            return None
        if header.packet_type != PacketType.INITIAL:
            self.dropped_invalid += 1
            return None
        if len(header.dcid) < 8 and not (self._retry is not None and header.token):
            self.dropped_invalid += 1  # RFC 9000 §7.2: a client's own first DCID has at least 8 bytes
            return None

        kwargs: dict[str, Any] = {"original_destination_connection_id": header.dcid, "peer_initial_cid": header.scid}
        if self._retry is not None:
            if not header.token:
                scid = os.urandom(self._cid_len)
                token = self._retry.issue(addr, header.dcid, scid, now)
                self.retries += 1
                self._send_raw(build_retry(header.version, header.scid, scid, header.dcid, token), addr, key)
                return None
            odcid = self._retry.validate(header.token, addr, header.dcid, now)
            if odcid is None:
                self.dropped_invalid += 1
                return None
            kwargs["original_destination_connection_id"] = odcid
            kwargs["retry_source_connection_id"] = header.dcid

        quic = self._make_connection(self.configuration, **kwargs)
        handle = ConnectionHandle(self, quic)
        self._handles[handle] = None
        self.connections_accepted += 1
        handle._initial_dcid = header.dcid
        handle._odcid = kwargs["original_destination_connection_id"]
        self._initial_routes[header.dcid] = handle
        self._sync_host_cids(handle)
        if self._on_connection is not None:
            try:
                result = self._on_connection(handle)
                if asyncio.iscoroutine(result):
                    task = self._loop.create_task(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            except Exception:
                self._loop.call_exception_handler({"message": "on_connection failed",
                                                   "exception": _current_exception(), "connection": handle})
        return handle

    # ------------------------------------------------------------------------------------------------------------
    # after input: events, transmit, timer
    # ------------------------------------------------------------------------------------------------------------

    def _service(self, handle: ConnectionHandle, now: float) -> None:
        quic = handle.quic
        event = quic.next_event()
        while event is not None:
            self._dispatch(handle, event)
            event = quic.next_event()
        if handle._removed:
            return
        if handle._flush_handle is not None:  # we flush now: a scheduled flush would find nothing
            handle._flush_handle.cancel()
            handle._flush_handle = None
        try:
            items = quic.datagrams_to_send(now)
        except Exception:
            items = None
            self._loop.call_exception_handler({"message": "datagrams_to_send failed",
                                               "exception": _current_exception(), "connection": handle})
        if items:
            self._send(items)
        event = quic.next_event()
        while event is not None:
            self._dispatch(handle, event)
            event = quic.next_event()
        if handle._removed:
            return
        deadline = quic.get_timer()
        if deadline != handle._timer_at:
            if handle._timer_handle is not None:
                handle._timer_handle.cancel()
                handle._timer_handle = None
            handle._timer_at = deadline
            if deadline is not None:
                handle._timer_handle = self._loop.call_at(deadline, self._on_timer, handle)
        if deadline is None and handle._terminated is not None:
            self._remove(handle)

    def _on_timer(self, handle: ConnectionHandle) -> None:
        deadline = handle._timer_at
        handle._timer_handle = None
        handle._timer_at = None
        if handle._removed:
            return
        # asyncio may run a timer up to its clock resolution early: never hand the connection a time before it
        now = self._loop.time()
        if deadline is not None and now < deadline:
            now = deadline
        try:
            handle.quic.handle_timer(now)
        except Exception:
            self._loop.call_exception_handler({"message": "handle_timer failed", "exception": _current_exception(),
                                               "connection": handle})
        self._service(handle, now)

    def _dispatch(self, handle: ConnectionHandle, event: Any) -> None:
        if isinstance(event, ConnectionIdIssued):
            if not self.is_client:
                self._add_route(event.connection_id, handle)
        elif isinstance(event, ConnectionIdRetired):
            self._drop_route(event.connection_id, handle)
        elif isinstance(event, HandshakeCompleted):
            if not self.is_client:
                self._sync_host_cids(handle)
            handle._set_connected()
        elif isinstance(event, ConnectionTerminated):
            if handle._terminated is None:
                handle._terminated = event
                handle._fail_waiters()
        try:
            handle.event_handler(event)
        except Exception:
            self._loop.call_exception_handler({"message": "event handler failed", "exception": _current_exception(),
                                               "connection": handle})

    def _sync_host_cids(self, handle: ConnectionHandle) -> None:
        """Route every CID the connection lists, except the client-chosen Initial DCIDs: those only route long
        headers (``_initial_routes``), for the connection's lifetime, so a late Initial never makes a twin."""
        skip = (handle._initial_dcid, handle._odcid)
        for cid in handle.quic.host_cids:
            if cid not in skip:
                self._add_route(cid, handle)

    def _add_route(self, cid: bytes, handle: ConnectionHandle) -> None:
        other = self._routes.get(cid)
        if other is not None and other is not handle:
            _log.warning("connection ID %s already routes to another connection", cid.hex())
            return
        self._routes[cid] = handle
        handle._cids.add(cid)

    def _drop_route(self, cid: bytes, handle: ConnectionHandle) -> None:
        if self._routes.get(cid) is handle:
            del self._routes[cid]
        handle._cids.discard(cid)

    def _remove(self, handle: ConnectionHandle) -> None:
        if handle._removed:
            return
        for cid in handle._cids:
            if self._routes.get(cid) is handle:
                del self._routes[cid]
        handle._cids.clear()
        dcid = handle._initial_dcid
        if dcid is not None and self._initial_routes.get(dcid) is handle:
            del self._initial_routes[dcid]
        self._handles.pop(handle, None)
        handle._set_removed()
        if handle is self._client:
            self.close()  # a client endpoint lives for its one connection

    # ------------------------------------------------------------------------------------------------------------
    # send
    # ------------------------------------------------------------------------------------------------------------

    def _send(self, items: list) -> None:
        """Send ``(data, remote_addr, local_addr)`` items; consecutive ones to the same pair in one send_batch."""
        sockets = self._sockets
        default = self._default
        if default is None:  # closed
            return
        n = len(items)
        i = 0
        while i < n:
            data, remote, local = items[i]
            batch = [data]
            j = i + 1
            while j < n:
                data2, remote2, local2 = items[j]
                if (remote2 is not remote and remote2 != remote) or (local2 is not local and local2 != local):
                    break
                batch.append(data2)
                j += 1
            usock = default if local is None else sockets.get(local, default)
            usock.send_batch(batch, remote)
            i = j

    def _send_raw(self, data: bytes, addr: tuple, key: tuple) -> None:
        usock = self._sockets.get(key, self._default)
        if usock is not None:
            usock.send_batch([data], addr)


class _RetryTokens:
    """Stateless Retry tokens (RFC 9000 §8.1.2): bound to the client address, the Retry SCID and a deadline.

    token = expiry (8, ms of loop time) | len(odcid) | odcid | HMAC-SHA256(...)[:16]. Only this endpoint
    process can check them (the key is random and the clock is the loop's)."""

    def __init__(self) -> None:
        self._key = os.urandom(32)

    def _mac(self, body: bytes, addr: tuple, retry_scid: bytes) -> bytes:
        peer = f"{addr[0]}|{addr[1]}".encode()
        return hmac.new(self._key, body + retry_scid + peer, hashlib.sha256).digest()[:16]

    def issue(self, addr: tuple, odcid: bytes, retry_scid: bytes, now: float) -> bytes:
        body = int((now + RETRY_TOKEN_LIFETIME) * 1000).to_bytes(8, "big") + bytes((len(odcid),)) + odcid
        return body + self._mac(body, addr, retry_scid)

    def validate(self, token: bytes, addr: tuple, dcid: bytes, now: float) -> bytes | None:
        """The original DCID the token was issued for, or None when it is invalid or expired."""
        if len(token) < 9 + 16:
            return None
        odcid_len = token[8]
        body_len = 9 + odcid_len
        if len(token) != body_len + 16:
            return None
        body = token[:body_len]
        if not hmac.compare_digest(token[body_len:], self._mac(body, addr, dcid)):
            return None
        if int.from_bytes(token[:8], "big") < now * 1000:
            return None
        return token[9:body_len]


async def _resolve(loop: asyncio.AbstractEventLoop, remote_addr: tuple, local_addr: tuple | None) -> tuple:
    """``remote_addr`` as the kernel reports peers (IPv6: 4-tuple), resolving names; family follows local_addr."""
    host, port = remote_addr[0], remote_addr[1]
    family = 0
    if local_addr is not None and local_addr[0]:
        family = socket.AF_INET6 if ":" in local_addr[0] else socket.AF_INET
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    addr = infos[0][4]
    if len(addr) == 4 and len(remote_addr) == 4:
        addr = (addr[0], addr[1], remote_addr[2], remote_addr[3])
    return tuple(addr)


def _current_exception() -> BaseException | None:
    return sys.exc_info()[1]

