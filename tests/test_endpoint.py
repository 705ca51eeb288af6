"""QuicEndpoint / ConnectionHandle driven with a fake connection that follows the Connection API contract.

Wire format of the fake: a real QUIC v1 long header for the client's first Initial (so the endpoint's own
parsing is exercised), then short-header-shaped datagrams ``0x40 | DCID (8 bytes) | payload``. The server side
echoes every payload back; a few payloads are commands (``close``, ``newcid``, ``retire:<cid>`` ...).
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
from collections import deque
from dataclasses import dataclass

import pytest

from mqvpn.endpoint import ConnectionHandle, QuicConnectionError, QuicEndpoint
from mqvpn.quic.events import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionTerminated,
    HandshakeCompleted,
)
from mqvpn.quic.packet import PacketType, encode_long_header, parse_header, verify_retry_integrity

CID_LEN = 8
TIMEOUT = 3.0


def run_async(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 10))

    return wrapper


@dataclass
class FakeConfig:
    is_client: bool
    connection_id_length: int = CID_LEN
    retry: bool = False
    refuse: bool = False  # server: answer the first datagram with "refuse"
    ack_delay: float | None = 0.05  # timer armed after the first datagram; None: no timer
    close_period: float = 0.05


def initial_packet(dcid: bytes, scid: bytes, payload: bytes = b"", token: bytes = b"", version: int = 1,
                   size: int = 1200) -> bytes:
    body = payload.ljust(max(size - 60, len(payload)), b"\0")
    header = encode_long_header(PacketType.INITIAL, 1, dcid, scid, token, 1, 1 + len(body), 0)
    if version != 1:
        header = header[:1] + version.to_bytes(4, "big") + header[5:]
    return (header + body).ljust(size, b"\0")


def short_packet(dcid: bytes, payload: bytes) -> bytes:
    return b"\x40" + dcid + payload


def payload_of(data: bytes) -> bytes:
    if data[0] & 0x80:
        header = parse_header(data, 0, CID_LEN)
        return data[header.pn_offset + 1 : header.packet_end].rstrip(b"\0")
    return data[1 + CID_LEN :]


class FakeConnection:
    """Implements the Connection API of docs/quic-design.md with trivial behaviour (see the module docstring)."""

    def __init__(self, configuration: FakeConfig, *, original_destination_connection_id: bytes | None = None,
                 peer_initial_cid: bytes | None = None, retry_source_connection_id: bytes | None = None) -> None:
        self.configuration = configuration
        self.is_client = configuration.is_client
        self.host_cid = os.urandom(CID_LEN)
        self._host = [self.host_cid]
        self.odcid = original_destination_connection_id or os.urandom(CID_LEN)
        self.retry_scid = retry_source_connection_id
        self.peer_cid = peer_initial_cid
        self.remote = None
        self.local = None
        self.received: list[tuple[bytes, tuple, float, tuple]] = []
        self.events: deque = deque()
        self.out: list[tuple[bytes, tuple, tuple]] = []
        self.send_calls: list[int] = []  # size of each non-empty datagrams_to_send result
        self.timer: float | None = None
        self.timer_fired: list[float] = []
        self.connected = False
        self.state = "open"
        self.datagram_handler = None
        self.now = 0.0

    # --- contract ---
    @property
    def host_cids(self) -> list[bytes]:
        cids = list(self._host)
        if not self.is_client and not self.connected:
            cids.append(self.odcid)
        return cids

    def connect(self, remote_addr, now, local_addr=None):
        assert self.is_client
        self.remote, self.local, self.now = remote_addr, local_addr, now
        self.out.append((initial_packet(self.odcid, self.host_cid, b"hello"), remote_addr, local_addr))

    def receive_datagram(self, data, remote_addr, now, local_addr=None):
        self.now = now
        self.received.append((data, remote_addr, now, local_addr))
        if self.state == "terminated":
            return
        if self.remote is None:
            self.remote, self.local = remote_addr, local_addr
        payload = payload_of(data)
        if self.is_client:
            if payload == b"refuse":
                self.state = "terminated"
                self.events.append(ConnectionTerminated(0x2, None, "refused"))
                return
            if self.peer_cid is None and data[0] & 0x80:
                self.peer_cid = parse_header(data, 0, CID_LEN).scid  # the server's CID
        elif self.configuration.refuse:
            self._queue(b"refuse")
            self.state = "terminated"
            self.events.append(ConnectionTerminated(0x2, None, "refused"))
            return
        if not self.connected:
            self.connected = True
            self.events.append(HandshakeCompleted("fake", False))
            if self.configuration.ack_delay is not None:
                self.timer = now + self.configuration.ack_delay
        if self.state != "open":
            return
        if self.datagram_handler is not None and payload.startswith(b"dgram:"):
            self.datagram_handler(payload[6:])
            return
        if payload == b"close":
            self.close(0, "bye")
            return
        if payload == b"newcid":
            cid = os.urandom(CID_LEN)
            self._host.append(cid)
            self.events.append(ConnectionIdIssued(cid))
            self._queue(b"cid:" + cid)
            return
        if payload.startswith(b"retire:"):
            cid = payload[7:]
            self._host.remove(cid)
            self.events.append(ConnectionIdRetired(cid))
            return
        if not self.is_client:
            if data[0] & 0x80:  # answer an Initial in kind, so the client learns our CID
                self.out.append((initial_packet(self.peer_cid, self.host_cid, payload), self.remote, self.local))
            else:
                self._queue(payload, remote_addr, local_addr)  # echo, to where it came from

    def datagrams_to_send(self, now):
        self.now = now
        out, self.out = self.out, []
        if out:
            self.send_calls.append(len(out))
        return out

    def get_timer(self):
        return self.timer

    def handle_timer(self, now):
        self.now = now
        if self.timer is None or now < self.timer:
            return
        self.timer = None
        self.timer_fired.append(now)
        if self.state == "closing":
            self.state = "terminated"
        else:
            self._queue(b"timer")

    def next_event(self):
        return self.events.popleft() if self.events else None

    def send_datagram_frame(self, data, flow=0) -> bool:
        self._queue(b"dgram:" + data)
        return True

    def send_stream_data(self, stream_id, data, end_stream=False):
        self._queue(b"stream:" + data)

    def close(self, error_code=0, reason_phrase="", application=True):
        if self.state != "open":
            return
        self.state = "closing"
        self._queue(b"closed")
        self.events.append(ConnectionTerminated(error_code, None, reason_phrase))
        self.timer = self.now + self.configuration.close_period

    # --- helpers ---
    def _queue(self, payload: bytes, remote=None, local=None) -> None:
        self.out.append((short_packet(self.peer_cid or b"\0" * CID_LEN, payload), remote or self.remote,
                         local or self.local))


class Factory:
    """connection_factory that remembers what it made and with which arguments."""

    def __init__(self) -> None:
        self.made: list[FakeConnection] = []
        self.kwargs: list[dict] = []

    def __call__(self, configuration, **kwargs) -> FakeConnection:
        conn = FakeConnection(configuration, **kwargs)
        self.made.append(conn)
        self.kwargs.append(kwargs)
        return conn


class RawPeer:
    """A plain UDP socket playing a client by hand."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.scid = os.urandom(CID_LEN)
        self.odcid = os.urandom(CID_LEN)

    def send(self, data: bytes, addr) -> None:
        self.sock.sendto(data, addr)

    async def recv(self, timeout: float = TIMEOUT) -> bytes:
        data, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_recvfrom(self.sock, 65535), timeout)
        return data

    async def recv_nothing(self, timeout: float = 0.1) -> bool:
        try:
            await self.recv(timeout)
        except asyncio.TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


async def start_server(config: FakeConfig | None = None, host: str = "127.0.0.1", **kw):
    factory = Factory()
    handles: list[ConnectionHandle] = []
    server = await QuicEndpoint.serve((host, 0), config or FakeConfig(is_client=False), handles.append,
                                      connection_factory=factory, **kw)
    return server, factory, handles


async def handshake(peer: RawPeer, server: QuicEndpoint, handles: list, factory: Factory):
    """Open one connection by hand; returns (handle, the server's CID for that connection)."""
    peer.send(initial_packet(peer.odcid, peer.scid, b"hi"), server.local_addr)
    reply = await peer.recv()
    header = parse_header(reply, 0, CID_LEN)
    handle = handles[-1]
    assert header.dcid == peer.scid and header.scid == handle.quic.host_cid and payload_of(reply) == b"hi"
    return handle, handle.quic.host_cid


async def until(predicate, timeout: float = TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


# ------------------------------------------------------------------------------------------------------------------


@run_async
async def test_routes_by_cid_across_several_connections():
    server, factory, handles = await start_server(FakeConfig(is_client=False, ack_delay=None))
    peers = [RawPeer() for _ in range(3)]
    try:
        cids = []
        for peer in peers:
            handle, cid = await handshake(peer, server, handles, factory)
            cids.append(cid)
            assert handle.quic.peer_cid == peer.scid
            assert factory.kwargs[-1] == {"original_destination_connection_id": peer.odcid,
                                          "peer_initial_cid": peer.scid}
        assert len(handles) == 3 and server.connections_accepted == 3
        # interleaved short-header traffic reaches the right connection and is echoed to the right peer
        for round_ in range(3):
            for i, peer in enumerate(peers):
                peer.send(short_packet(cids[i], b"p%d-r%d" % (i, round_)), server.local_addr)
        for i, peer in enumerate(peers):
            got = [payload_of(await peer.recv()) for _ in range(3)]
            assert got == [b"p%d-r%d" % (i, r) for r in range(3)]
            assert [payload_of(d) for d, *_ in handles[i].quic.received[1:]] == got
        # each received datagram was handed over with the right addresses
        data, remote, now, local = handles[0].quic.received[0]
        assert remote == peers[0].sock.getsockname() and local == server.local_addr
        # unknown CID, short header: dropped and counted
        peers[0].send(short_packet(b"\x99" * CID_LEN, b"lost"), server.local_addr)
        await until(lambda: server.dropped_unknown_cid == 1)
        assert await peers[0].recv_nothing()
    finally:
        server.close()
        for peer in peers:
            peer.close()


@run_async
async def test_initial_rules_small_late_and_unknown_version():
    server, factory, handles = await start_server(FakeConfig(is_client=False, ack_delay=None))
    peer = RawPeer()
    try:
        # an Initial in a datagram under 1200 bytes makes no connection
        peer.send(initial_packet(peer.odcid, peer.scid, b"hi", size=1199), server.local_addr)
        await until(lambda: server.dropped_invalid == 1)
        assert not handles
        # a second (e.g. late, retransmitted) Initial to the original DCID reaches the same connection
        handle, _cid = await handshake(peer, server, handles, factory)
        peer.send(initial_packet(peer.odcid, peer.scid, b"again"), server.local_addr)
        assert payload_of(await peer.recv()) == b"again"
        assert len(handles) == 1 and len(handle.quic.received) == 2
        # ... but the client's original DCID never routes a short header
        peer.send(short_packet(peer.odcid, b"x"), server.local_addr)
        await until(lambda: server.dropped_unknown_cid == 1)
        # unknown version: Version Negotiation listing QUIC v1, no connection
        other = RawPeer()
        try:
            other.send(initial_packet(other.odcid, other.scid, version=0x1A2A3A4A), server.local_addr)
            vn = await other.recv()
            header = parse_header(vn, 0, CID_LEN)
            assert header.packet_type == PacketType.VERSION_NEGOTIATION
            assert header.dcid == other.scid and header.scid == other.odcid and header.supported_versions == [1]
            assert server.version_negotiations == 1 and len(handles) == 1
        finally:
            other.close()
    finally:
        server.close()
        peer.close()


@run_async
async def test_datagrams_of_one_drain_are_answered_by_one_transmit():
    server, factory, handles = await start_server(FakeConfig(is_client=False, ack_delay=None))
    peer = RawPeer()
    try:
        handle, cid = await handshake(peer, server, handles, factory)
        conn = handle.quic
        assert conn.send_calls == [1]
        gso_before = server.stats()["gso_batches"]
        for i in range(20):  # no await in between: all 20 sit in the socket when the loop looks
            peer.send(short_packet(cid, b"burst-%02d" % i), server.local_addr)
        got = [payload_of(await peer.recv()) for _ in range(20)]
        assert got == [b"burst-%02d" % i for i in range(20)]
        assert conn.send_calls == [1, 20]  # one transmit for the whole drain ...
        usock = server.sockets[server.local_addr]
        if usock.gso_enabled:
            assert server.stats()["gso_batches"] == gso_before + 1  # ... and one GSO sendmsg for the 20 echoes
    finally:
        server.close()
        peer.close()


@run_async
async def test_application_sends_within_one_callback_flush_once():
    server, factory, handles = await start_server(FakeConfig(is_client=False, ack_delay=None))
    peer = RawPeer()
    try:
        handle, cid = await handshake(peer, server, handles, factory)
        for i in range(5):
            assert handle.send_datagram_frame(b"d%d" % i)
        handle.send_stream_data(0, b"s")
        handle.transmit()
        assert handle.quic.send_calls == [1]  # nothing yet: the flush runs at the end of this loop turn
        got = [payload_of(await peer.recv()) for _ in range(6)]
        assert got == [b"dgram:d0", b"dgram:d1", b"dgram:d2", b"dgram:d3", b"dgram:d4", b"stream:s"]
        assert handle.quic.send_calls == [1, 6]
    finally:
        server.close()
        peer.close()


@run_async
async def test_timer_fires_and_is_rearmed_only_on_change():
    server, factory, handles = await start_server(FakeConfig(is_client=False, ack_delay=0.05))
    peer = RawPeer()
    loop = asyncio.get_running_loop()
    try:
        t0 = loop.time()
        handle, cid = await handshake(peer, server, handles, factory)
        conn = handle.quic
        armed = handle._timer_handle
        assert armed is not None and handle._timer_at == conn.timer
        peer.send(short_packet(cid, b"more"), server.local_addr)  # same deadline: the same TimerHandle stays
        assert payload_of(await peer.recv()) == b"more"
        assert handle._timer_handle is armed
        assert payload_of(await peer.recv()) == b"timer"  # fired, and what it queued was sent
        assert len(conn.timer_fired) == 1 and conn.timer_fired[0] >= t0 + 0.05
        assert handle._timer_handle is None and handle._timer_at is None
    finally:
        server.close()
        peer.close()


@run_async
async def test_connection_removed_after_termination_and_drain():
    server, factory, handles = await start_server(FakeConfig(is_client=False, ack_delay=None, close_period=0.1))
    peer = RawPeer()
    try:
        handle, cid = await handshake(peer, server, handles, factory)
        assert await handle.next_event() == HandshakeCompleted("fake", False)
        peer.send(short_packet(cid, b"newcid"), server.local_addr)
        new_cid = payload_of(await peer.recv())[4:]
        assert isinstance(await handle.next_event(), ConnectionIdIssued)
        peer.send(short_packet(new_cid, b"via-new"), server.local_addr)
        assert payload_of(await peer.recv()) == b"via-new"
        # retire the first CID: it stops routing
        peer.send(short_packet(new_cid, b"retire:" + cid), server.local_addr)
        assert isinstance(await handle.next_event(), ConnectionIdRetired)
        peer.send(short_packet(cid, b"old"), server.local_addr)
        await until(lambda: server.dropped_unknown_cid == 1)

        peer.send(short_packet(new_cid, b"close"), server.local_addr)
        assert payload_of(await peer.recv()) == b"closed"
        event = await handle.next_event()
        assert isinstance(event, ConnectionTerminated) and event.reason_phrase == "bye"
        # closing: still routed (the connection may answer with CONNECTION_CLOSE)
        assert handle.terminated is event and not handle.closed and server.connections == [handle]
        n = len(handle.quic.received)
        peer.send(short_packet(new_cid, b"late"), server.local_addr)
        await until(lambda: len(handle.quic.received) == n + 1)
        # drained: gone
        await asyncio.wait_for(handle.wait_closed(), TIMEOUT)
        assert handle.closed and server.connections == [] and not server._routes and not server._initial_routes
        peer.send(short_packet(new_cid, b"after"), server.local_addr)
        await until(lambda: server.dropped_unknown_cid == 2)
        handle.transmit()  # harmless on a removed connection
    finally:
        server.close()
        peer.close()


@run_async
async def test_client_connect_waits_for_handshake_and_closes_itself():
    server, sfactory, handles = await start_server(FakeConfig(is_client=False, ack_delay=None))
    cfactory = Factory()
    try:
        client = await QuicEndpoint.connect(server.local_addr, FakeConfig(is_client=True, ack_delay=None),
                                            connection_factory=cfactory)
        assert client.connected and isinstance(client, ConnectionHandle)
        conn = cfactory.made[0]
        assert conn.remote == server.local_addr and conn.local == client.endpoint.local_addr
        assert len(handles) == 1 and handles[0].quic.peer_cid == conn.host_cid
        received: list[bytes] = []
        client.datagram_handler = received.append
        assert conn.datagram_handler == received.append
        client.send_datagram_frame(b"ping")
        await until(lambda: received == [b"ping"])  # echoed by the server as "dgram:ping"
        client.close(0, "done")
        await asyncio.wait_for(client.wait_closed(), TIMEOUT)
        assert client.endpoint._closed.is_set() and not client.endpoint.sockets
    finally:
        server.close()


@run_async
async def test_client_connect_raises_when_refused():
    server, _f, handles = await start_server(FakeConfig(is_client=False, refuse=True))
    try:
        with pytest.raises(QuicConnectionError) as info:
            await QuicEndpoint.connect(server.local_addr, FakeConfig(is_client=True), connection_factory=Factory())
        assert isinstance(info.value, ConnectionError)
        assert info.value.error_code == 0x2 and info.value.reason_phrase == "refused"
    finally:
        server.close()


@run_async
async def test_client_connect_without_waiting_then_wait_connected_ipv6():
    try:
        server, _f, handles = await start_server(FakeConfig(is_client=False, ack_delay=None), host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        client = await QuicEndpoint.connect(("::1", server.local_addr[1]), FakeConfig(is_client=True),
                                            connection_factory=Factory(), wait_connected=False)
        assert not client.connected
        await asyncio.wait_for(client.wait_connected(), TIMEOUT)
        assert len(client.quic.remote) == 4  # the kernel's form of an IPv6 peer address
        client.endpoint.close()
        await asyncio.wait_for(client.wait_closed(), TIMEOUT)
    finally:
        server.close()


@run_async
async def test_retry_round_trip():
    server, factory, handles = await start_server(FakeConfig(is_client=False, ack_delay=None), retry=True)
    peer = RawPeer()
    try:
        peer.send(initial_packet(peer.odcid, peer.scid, b"hi"), server.local_addr)
        retry = await peer.recv()
        header = parse_header(retry, 0, CID_LEN)
        assert header.packet_type == PacketType.RETRY and header.dcid == peer.scid
        assert verify_retry_integrity(header, retry, peer.odcid)
        assert not handles and server.retries == 1
        # a forged token, or the right token to another DCID: dropped
        peer.send(initial_packet(header.scid, peer.scid, b"hi", token=b"x" * 40), server.local_addr)
        peer.send(initial_packet(os.urandom(8), peer.scid, b"hi", token=header.token), server.local_addr)
        await until(lambda: server.dropped_invalid == 2)
        # the real thing: a connection that knows both CIDs
        peer.send(initial_packet(header.scid, peer.scid, b"hi", token=header.token), server.local_addr)
        assert payload_of(await peer.recv()) == b"hi"
        assert len(handles) == 1
        assert factory.kwargs[0] == {"original_destination_connection_id": peer.odcid, "peer_initial_cid": peer.scid,
                                     "retry_source_connection_id": header.scid}
    finally:
        server.close()
        peer.close()


@run_async
async def test_failures_in_connection_or_handlers_do_not_stop_the_endpoint():
    server, factory, handles = await start_server(FakeConfig(is_client=False, ack_delay=None))
    peer = RawPeer()
    errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
    try:
        handle, cid = await handshake(peer, server, handles, factory)

        def broken(event):
            raise RuntimeError("user bug")

        handle.event_handler = broken
        peer.send(short_packet(cid, b"newcid"), server.local_addr)  # event -> handler raises
        assert payload_of(await peer.recv()).startswith(b"cid:")
        assert errors and errors[-1]["message"] == "event handler failed"
        original = handle.quic.receive_datagram
        handle.quic.receive_datagram = lambda *a: (_ for _ in ()).throw(ValueError("conn bug"))
        peer.send(short_packet(cid, b"boom"), server.local_addr)
        await until(lambda: errors[-1]["message"] == "receive_datagram failed")
        handle.quic.receive_datagram = original
        peer.send(short_packet(cid, b"fine"), server.local_addr)
        assert payload_of(await peer.recv()) == b"fine"
    finally:
        server.close()
        peer.close()


@run_async
async def test_datagrams_go_out_of_the_socket_they_name():
    """A client with a second socket (a second path): items naming its key leave from it; None: the first."""
    server, _f, handles = await start_server(FakeConfig(is_client=False, ack_delay=None))
    try:
        client = await QuicEndpoint.connect(server.local_addr, FakeConfig(is_client=True, ack_delay=None),
                                            connection_factory=Factory(), local_addr=("127.0.0.1", 0))
        endpoint = client.endpoint
        second = endpoint.open_socket(("127.0.0.1", 0))
        conn = client.quic
        sconn = handles[0].quic
        peer = conn.peer_cid
        conn.out = [(short_packet(peer, b"a"), server.local_addr, second),
                    (short_packet(peer, b"b"), server.local_addr, second),
                    (short_packet(peer, b"c"), server.local_addr, None)]
        client.transmit()
        await until(lambda: len(sconn.received) == 4)
        sources = [(payload_of(d), addr) for d, addr, *_ in sconn.received[1:]]
        assert sources == [(b"a", second), (b"b", second), (b"c", endpoint.local_addr)]
        # replies to the second socket reach the connection, tagged with that socket's key
        await until(lambda: len(conn.received) == 4)
        assert [local for *_, local in conn.received[1:]] == [second, second, endpoint.local_addr]
        endpoint.close_socket(second)
        assert second not in endpoint.sockets
        endpoint.close()
    finally:
        server.close()


@run_async
async def test_endpoint_closed_from_a_handler_in_the_middle_of_a_drain():
    server, factory, handles = await start_server(FakeConfig(is_client=False, ack_delay=None))
    peer = RawPeer()
    try:
        handle, cid = await handshake(peer, server, handles, factory)
        seen: list[bytes] = []

        def on_datagram(data: bytes) -> None:
            seen.append(data)
            server.close()

        handle.datagram_handler = on_datagram
        for i in range(100):
            peer.send(short_packet(cid, b"dgram:%d" % i), server.local_addr)
        await asyncio.wait_for(handle.wait_closed(), TIMEOUT)
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)
        assert seen[0] == b"0" and len(seen) <= 64  # the rest of that batch may still be handed over, no more
        assert server.connections == [] and not server.sockets
        with pytest.raises(RuntimeError):
            server.open_socket(("127.0.0.1", 0))
    finally:
        server.close()
        peer.close()
