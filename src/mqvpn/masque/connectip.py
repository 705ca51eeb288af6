"""CONNECT-IP (RFC 9484) sessions over an ``H3Connection``: the server side and the client side, sans-I/O.

Server: one ``ConnectIpService`` holds what all connections share (keys, address pools, the table from inner
address to session, limits); each HTTP/3 connection gets a ``ConnectIpServer`` that turns extended CONNECT
requests into ``ServerSession`` objects. Client: ``ConnectIpClient`` sends the request, applies the capsules the
server sends and exposes the tunnel's state (addresses, routes, the largest IP packet it can carry now).

The datagram path is the hot path. A received HTTP Datagram reaches ``_on_datagram`` of its session through the
H3 layer's handler table (one dict lookup); context 0 is checked with one byte compare and the IP packet handed on
as a slice. Sending is ``quic.send_datagram_frame(prefix + packet)`` with the quarter-stream-ID and context-ID
bytes prebuilt. No event objects, no logging per packet.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mqvpn.masque.auth import KeyStore
from mqvpn.masque.capsules import (
    AddressAssign,
    AddressRequest,
    AssignedAddress,
    CapsuleError,
    CapsuleParser,
    DatagramCapsule,
    IpRange,
    RequestedAddress,
    RouteAdvertisement,
    encode_capsule,
    merge_per_family,
)
from mqvpn.masque.flow import flow_hash
from mqvpn.masque.h3 import (
    DataReceived,
    H3Connection,
    H3StateError,
    HeadersReceived,
    MessageRejected,
    StreamReset,
    StreamStopped,
)
from mqvpn.masque.h3frames import ErrorCode
from mqvpn.masque.pool import AddressPool, SessionTable
from mqvpn.masque.uri import (
    DEFAULT_PATH_TEMPLATE,
    TemplateError,
    expand,
    parse_request_path,
)

_log = logging.getLogger(__name__)

CONNECT_IP = b"connect-ip"
CONTEXT_IP = b"\x00"  # context ID 0: a whole IP packet (RFC 9484 §6)
FULL_ROUTES = (
    IpRange(ipaddress.IPv4Address("0.0.0.0"), ipaddress.IPv4Address("255.255.255.255"), 0),
    IpRange(ipaddress.IPv6Address("::"), ipaddress.IPv6Address("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), 0),
)
IPV6_MIN_MTU = 1280


# ----------------------------------------------------------------------------------------------------------------
# server
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ServiceCounters:
    sessions_opened: int = 0
    sessions_closed: int = 0
    auth_failures: int = 0
    rejected_full: int = 0
    rejected_malformed: int = 0
    capsule_errors: int = 0
    spoofed_dropped: int = 0  # inner source address not the one assigned (anti-spoofing)
    unknown_context_dropped: int = 0
    no_session_dropped: int = 0  # packet from the TUN for an address no session holds


class ConnectIpService:
    """What every connection of a CONNECT-IP server shares.

    ``on_packet(packet, session)`` receives each IP packet a client sent (already validated: its source is the
    client's assigned address); the daemon writes it to the TUN. ``route_packet(packet)`` is the other direction:
    a packet from the TUN goes to the session that holds its destination address.
    """

    def __init__(self, *, keys: KeyStore, pool4: AddressPool | None, pool6: AddressPool | None = None,
                 max_clients: int = 64, on_packet: Callable[[bytes, ServerSession], None] | None = None,
                 path_template: str = DEFAULT_PATH_TEMPLATE) -> None:
        if pool4 is None and pool6 is None:
            raise ValueError("a CONNECT-IP server needs at least one address pool")
        self.keys = keys
        self.pool4 = pool4
        self.pool6 = pool6
        self.max_clients = max_clients
        self.on_packet = on_packet or (lambda packet, session: None)
        self.path_template = path_template
        self.table: SessionTable = SessionTable()
        self.sessions: set[ServerSession] = set()
        self.counters = ServiceCounters()

    def route_packet(self, packet: bytes) -> ServerSession | None:
        """Queue a packet from the TUN to the client that holds its destination address. Returns that session (the
        caller flushes its connection), or None: no such client (counted) or the packet was dropped."""
        version = packet[0] >> 4 if packet else 0
        if version == 4:
            dst = packet[16:20]
        elif version == 6:
            dst = packet[24:40]
        else:
            self.counters.no_session_dropped += 1
            return None
        session = self.table.lookup_raw(dst)
        if session is None:
            self.counters.no_session_dropped += 1
            return None
        return session if session.send_packet(packet) else None

    def _allocate(self) -> tuple[Any, Any] | None:
        if len(self.sessions) >= self.max_clients:
            return None
        addr4 = addr6 = None
        if self.pool4 is not None:
            addr4 = self.pool4.allocate()
            if addr4 is None:
                return None
        if self.pool6 is not None:
            addr6 = self.pool6.allocate()
            if addr6 is None:
                if addr4 is not None:
                    self.pool4.release(addr4)
                return None
        return addr4, addr6


class ServerSession:
    """One client tunnel: a CONNECT-IP request stream, its addresses and its datagram path."""

    __slots__ = ("service", "h3", "quic", "stream_id", "user", "addr4", "addr6", "_src4", "_src6", "_prefix",
                 "_parser", "closed", "packets_in", "packets_out", "_fallback", "_assigned_ids", "h3_link")

    def __init__(self, service: ConnectIpService, h3: H3Connection, stream_id: int, user: str, addr4, addr6) -> None:
        self.service = service
        self.h3 = h3
        self.quic = h3.quic
        self.stream_id = stream_id
        self.user = user
        self.addr4 = addr4
        self.addr6 = addr6
        self._src4 = addr4.packed if addr4 is not None else None
        self._src6 = addr6.packed if addr6 is not None else None
        self._prefix = h3.datagram_prefix(stream_id) + CONTEXT_IP
        self._parser = CapsuleParser()
        self._fallback = not h3.datagrams_negotiated  # no QUIC DATAGRAM: DATAGRAM capsules (RFC 9297 §3.5)
        self._assigned_ids: dict[int, AssignedAddress] = {}  # answers to ADDRESS_REQUEST, by request id
        self.closed = False
        self.packets_in = 0
        self.packets_out = 0
        self.h3_link: Any = None  # set by the asyncio layer: what flushes this session's connection

    # --- hot path ---

    def _on_datagram(self, payload: bytes) -> None:
        """An HTTP Datagram of this stream: context ID, then (context 0) one IP packet from the client."""
        if not payload or payload[0] != 0:
            self.service.counters.unknown_context_dropped += 1
            return
        packet = payload[1:]
        if not packet:
            return
        version = packet[0] >> 4
        # anti-spoofing (RFC 9484 §8, BCP 38): the source must be the address assigned to this client
        if version == 4:
            if packet[12:16] != self._src4:
                self.service.counters.spoofed_dropped += 1
                return
        elif version == 6:
            if packet[8:24] != self._src6:
                self.service.counters.spoofed_dropped += 1
                return
        else:
            self.service.counters.spoofed_dropped += 1
            return
        self.packets_in += 1
        self.service.on_packet(packet, self)

    def send_packet(self, packet: bytes) -> bool:
        """Queue one IP packet to the client (context 0). False when dropped (too large for the path, queue full)."""
        if self._fallback:
            return self._send_capsule_datagram(packet)
        self.packets_out += 1
        return self.quic.send_datagram_frame(self._prefix + packet, flow_hash(packet))

    def _send_capsule_datagram(self, packet: bytes) -> bool:
        if self.closed:
            return False
        try:
            self.h3.send_data(self.stream_id, encode_capsule(DatagramCapsule(CONTEXT_IP + packet)))
        except H3StateError:
            return False
        self.packets_out += 1
        return True

    # --- control ---

    def assignment(self) -> AddressAssign:
        """The full current set of addresses of this client, both families in one capsule."""
        entries = []
        if self.addr4 is not None:
            entries.append(AssignedAddress(0, ipaddress.ip_network(f"{self.addr4}/32")))
        if self.addr6 is not None:
            entries.append(AssignedAddress(0, ipaddress.ip_network(f"{self.addr6}/128")))
        return AddressAssign(entries)

    def _on_capsule_data(self, data: bytes, ended: bool) -> None:
        try:
            capsules = self._parser.feed(data) if data else []
            if ended:
                self._parser.finish()
        except CapsuleError as exc:
            self.service.counters.capsule_errors += 1
            _log.info("session %s (stream %d): malformed capsule (%s): aborting the stream", self.user,
                      self.stream_id, exc.reason)
            self.abort(ErrorCode.H3_MESSAGE_ERROR)
            return
        for capsule in capsules:
            if isinstance(capsule, DatagramCapsule):
                self._on_datagram(capsule.payload)
            elif isinstance(capsule, AddressRequest):
                self._on_address_request(capsule)
                if self.closed:
                    return
            # ADDRESS_ASSIGN / ROUTE_ADVERTISEMENT from a client: accepted and ignored (we route by assignment)
        if ended:
            self.close()

    def _on_address_request(self, capsule: AddressRequest) -> None:
        for requested in capsule.addresses:
            if requested.request_id in self._assigned_ids:
                # RFC 9484 §4.7.2: request IDs are never reused
                self.service.counters.capsule_errors += 1
                self.abort(ErrorCode.H3_MESSAGE_ERROR)
                return
            mine = self.addr4 if requested.prefix.version == 4 else self.addr6
            if mine is None:  # we have nothing of that family: the rejection form (all-zero, full length)
                bits = 32 if requested.prefix.version == 4 else 128
                unspecified = "0.0.0.0" if bits == 32 else "::"
                answer = AssignedAddress(requested.request_id, ipaddress.ip_network(f"{unspecified}/{bits}"))
            else:
                answer = AssignedAddress(requested.request_id, ipaddress.ip_network(f"{mine}/{mine.max_prefixlen}"))
            self._assigned_ids[requested.request_id] = answer
        entries = list(self.assignment().addresses)
        for answer in self._assigned_ids.values():
            if answer not in entries:
                entries.append(answer)
        self._send_capsule(AddressAssign(sorted(entries, key=lambda e: (e.prefix.version, e.request_id))))

    def _send_capsule(self, capsule) -> None:
        try:
            self.h3.send_data(self.stream_id, encode_capsule(capsule))
        except H3StateError:
            pass

    def abort(self, error_code: int) -> None:
        if self.closed:
            return
        try:
            self.h3.reset_stream(self.stream_id, error_code)
        except H3StateError:
            pass
        self.close()

    def close(self) -> None:
        """Tear the tunnel down: unregister, release the addresses."""
        if self.closed:
            return
        self.closed = True
        service = self.service
        self.h3.unregister_datagram_handler(self.stream_id)
        if self.addr4 is not None:
            service.table.remove(self.addr4)
            service.pool4.release(self.addr4)
        if self.addr6 is not None:
            service.table.remove(self.addr6)
            service.pool6.release(self.addr6)
        service.sessions.discard(self)
        service.counters.sessions_closed += 1


class ConnectIpServer:
    """CONNECT-IP on one HTTP/3 connection. Feed it every H3 event (``handle_h3_event``)."""

    def __init__(self, service: ConnectIpService, h3: H3Connection) -> None:
        self.service = service
        self.h3 = h3
        self.sessions: dict[int, ServerSession] = {}
        self.link: Any = None  # opaque, set by the asyncio layer; handed to every session (``h3_link``)

    def handle_h3_event(self, event) -> None:
        if isinstance(event, DataReceived):
            session = self.sessions.get(event.stream_id)
            if session is not None:
                session._on_capsule_data(event.data, event.stream_ended)
                if session.closed:
                    self.sessions.pop(event.stream_id, None)
        elif isinstance(event, HeadersReceived):
            if not event.trailers and event.stream_id not in self.sessions:
                self._on_request(event.stream_id, event.headers, event.stream_ended)
        elif isinstance(event, (StreamReset, StreamStopped, MessageRejected)):
            session = self.sessions.pop(event.stream_id, None)
            if session is not None:
                session.close()

    def connection_lost(self) -> None:
        """The QUIC connection is gone: every tunnel on it ends."""
        for session in list(self.sessions.values()):
            session.close()
        self.sessions.clear()

    def _respond(self, stream_id: int, status: int, end: bool = True) -> None:
        try:
            self.h3.send_headers(stream_id, [(b":status", str(status).encode())], end_stream=end)
        except (H3StateError, ValueError):
            pass

    def _on_request(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        service = self.service
        fields: dict[bytes, bytes] = {}
        for name, value in headers:
            if name in fields and name == b"capsule-protocol":
                fields[name] = b""  # a duplicate sf-boolean parses as a list: not ?1
            else:
                fields.setdefault(name, value)
        if fields.get(b":method") != b"CONNECT":
            service.counters.rejected_malformed += 1
            return self._respond(stream_id, 405)
        if fields.get(b":protocol") != CONNECT_IP:
            service.counters.rejected_malformed += 1
            return self._respond(stream_id, 501)
        try:
            parse_request_path(fields.get(b":path", b""), service.path_template)
        except TemplateError:
            service.counters.rejected_malformed += 1
            return self._respond(stream_id, 400)
        if fields.get(b"capsule-protocol", b"").split(b";")[0].strip() != b"?1" or ended:
            service.counters.rejected_malformed += 1
            return self._respond(stream_id, 400)
        user = service.keys.authenticate(fields.get(b"authorization"))
        if user is None:
            service.counters.auth_failures += 1
            return self._respond(stream_id, 403)
        allocated = service._allocate()
        if allocated is None:
            service.counters.rejected_full += 1
            return self._respond(stream_id, 503)
        addr4, addr6 = allocated
        session = ServerSession(service, self.h3, stream_id, user, addr4, addr6)
        session.h3_link = self.link
        if addr4 is not None:
            service.table.add(addr4, session)
        if addr6 is not None:
            service.table.add(addr6, session)
        service.sessions.add(session)
        service.counters.sessions_opened += 1
        self.sessions[stream_id] = session
        if not session._fallback:
            self.h3.register_datagram_handler(stream_id, session._on_datagram)
        try:
            self.h3.send_headers(stream_id, [(b":status", b"200"), (b"capsule-protocol", b"?1")])
            # each set in ONE capsule: an ADDRESS_ASSIGN or ROUTE_ADVERTISEMENT replaces the previous one
            self.h3.send_data(stream_id, encode_capsule(session.assignment())
                              + encode_capsule(RouteAdvertisement(list(FULL_ROUTES))))
        except H3StateError:
            session.close()
            self.sessions.pop(stream_id, None)


# ----------------------------------------------------------------------------------------------------------------
# client
# ----------------------------------------------------------------------------------------------------------------


class ClientEvent:
    __slots__ = ()


@dataclass(slots=True)
class TunnelEstablished(ClientEvent):
    status: int


@dataclass(slots=True)
class AddressesAssigned(ClientEvent):
    addresses: list  # ip_network objects, the full current set


@dataclass(slots=True)
class RoutesAdvertised(ClientEvent):
    ranges: list  # IpRange, the full current set


@dataclass(slots=True)
class TunnelClosed(ClientEvent):
    """The tunnel ended. ``status`` is the HTTP status when the server refused; ``retry`` False means a reconnect
    would fail the same way (401/403: wrong key)."""

    reason: str
    status: int | None = None
    retry: bool = True


@dataclass
class ClientCounters:
    unknown_context_dropped: int = 0
    packets_in: int = 0
    packets_out: int = 0
    packets_too_big: int = 0


class ConnectIpClient:
    """The client side of one CONNECT-IP tunnel on an ``H3Connection``.

    Call ``poll(now)`` after feeding events and from a timer (``get_timer()``); ``handle_h3_event`` returns
    ``ClientEvent``s. ``on_packet(packet)`` receives every IP packet from the server (context 0).
    """

    def __init__(self, h3: H3Connection, *, authority: str, path: str = "/.well-known/masque/ip/*/*/",
                 auth_key: str | None = None, on_packet: Callable[[bytes], None] | None = None,
                 address_request_delay: float | None = 0.5, merge_families: bool = True) -> None:
        self.h3 = h3
        self.quic = h3.quic
        self.authority = authority
        self.path = path
        self.auth_key = auth_key
        self.on_packet = on_packet or (lambda packet: None)
        self.address_request_delay = address_request_delay
        self.merge_families = merge_families  # liberal receive: the reference server splits v4/v6 state
        self.stream_id: int | None = None
        self.state = "idle"  # idle -> requested -> established -> closed
        self.status: int | None = None
        self.assign: AddressAssign | None = None
        self.routes: RouteAdvertisement | None = None
        self.counters = ClientCounters()
        self._parser = CapsuleParser(lenient_host_bits=merge_families)
        self._prefix = b""
        self._fallback = False
        self._established_at: float | None = None
        self._request_id = 0
        self._events: list[ClientEvent] = []

    # --- state ---

    @property
    def addresses(self) -> list:
        return [a.prefix for a in self.assign.addresses] if self.assign else []

    @property
    def max_ip_packet_size(self) -> int:
        """The largest IP packet one HTTP Datagram carries now (QUIC datagram room minus quarter stream ID and
        context ID); the TUN MTU follows it."""
        if self._fallback:
            return 0
        return max(0, self.quic.datagram_room - len(self._prefix))

    def _has_address(self) -> bool:
        return self.assign is not None and any(not a.prefix.network_address.is_unspecified
                                               for a in self.assign.addresses)

    # --- driving ---

    def poll(self, now: float) -> list[ClientEvent]:
        """Send the request once the server's SETTINGS allow it; send ADDRESS_REQUEST when no ASSIGN came."""
        if self.state == "idle" and self.h3.settings_received:
            self._send_request(now)
        elif (self.state == "established" and not self._has_address() and self.address_request_delay is not None
              and self._request_id == 0 and self._established_at is not None
              and now >= self._established_at + self.address_request_delay):
            self._send_address_request()
        return self._take_events()

    def get_timer(self) -> float | None:
        if (self.state == "established" and not self._has_address() and self.address_request_delay is not None
                and self._request_id == 0 and self._established_at is not None):
            return self._established_at + self.address_request_delay
        return None

    def _send_request(self, now: float) -> None:
        if not self.h3.peer_supports_extended_connect:
            self._close("the server did not enable extended CONNECT (SETTINGS_ENABLE_CONNECT_PROTOCOL)", retry=False)
            return
        self.stream_id = self.h3.get_next_available_stream_id()
        headers = [(b":method", b"CONNECT"), (b":protocol", CONNECT_IP), (b":scheme", b"https"),
                   (b":authority", self.authority.encode()), (b":path", self.path.encode()),
                   (b"capsule-protocol", b"?1")]
        if self.auth_key:
            headers.append((b"authorization", b"Bearer " + self.auth_key.encode()))
        self.h3.send_headers(self.stream_id, headers)
        self._prefix = self.h3.datagram_prefix(self.stream_id) + CONTEXT_IP
        self._fallback = not self.h3.datagrams_negotiated
        if not self._fallback:
            self.h3.register_datagram_handler(self.stream_id, self._on_datagram)
        self._now = now
        self.state = "requested"

    def _send_address_request(self) -> None:
        wanted = [RequestedAddress(1, ipaddress.ip_network("0.0.0.0/32")),
                  RequestedAddress(2, ipaddress.ip_network("::/128"))]
        self._request_id = 2
        try:
            self.h3.send_data(self.stream_id, encode_capsule(AddressRequest(wanted)))
        except H3StateError:
            pass

    def handle_h3_event(self, event) -> list[ClientEvent]:
        if self.stream_id is None or getattr(event, "stream_id", None) != self.stream_id:
            return []
        if isinstance(event, HeadersReceived):
            if self.state == "requested" and not event.trailers:
                self._on_response(event.headers, event.stream_ended)
        elif isinstance(event, DataReceived):
            if self.state == "established":
                self._on_capsule_data(event.data, event.stream_ended)
        elif isinstance(event, (StreamReset, StreamStopped, MessageRejected)):
            self._close(f"stream reset by the server (error 0x{event.error_code:x})")
        return self._take_events()

    def connection_lost(self, reason: str = "connection closed") -> list[ClientEvent]:
        if self.state != "closed":
            if self.state == "requested":
                # a server that refuses a key may close the whole connection before its 403 gets here
                self._close(f"{reason} before the server answered (authentication or setup failure?)")
            else:
                self._close(reason)
        return self._take_events()

    def _on_response(self, headers, ended: bool) -> None:
        fields = dict(headers)
        try:
            status = int(fields.get(b":status", b"0"))
        except ValueError:
            status = 0
        if 100 <= status < 200:
            return  # interim
        self.status = status
        if not 200 <= status < 300:
            retry = status not in (401, 403)
            self._close(f"the server refused the tunnel: HTTP {status}", status=status, retry=retry)
            return
        if fields.get(b"capsule-protocol", b"").split(b";")[0].strip() != b"?1":
            self._abort(ErrorCode.H3_MESSAGE_ERROR, "2xx without capsule-protocol: ?1")
            return
        if ended:
            self._close("the server ended the tunnel stream")
            return
        self.state = "established"
        self._established_at = getattr(self, "_now", None)
        self._events.append(TunnelEstablished(status))

    def _on_capsule_data(self, data: bytes, ended: bool) -> None:
        try:
            capsules = self._parser.feed(data) if data else []
            if ended:
                self._parser.finish()
        except CapsuleError as exc:
            self._abort(ErrorCode.H3_MESSAGE_ERROR, f"malformed capsule from the server: {exc.reason}")
            return
        for capsule in capsules:
            if isinstance(capsule, DatagramCapsule):
                self._on_datagram(capsule.payload)
            elif isinstance(capsule, AddressAssign):
                if self.merge_families and self.assign is not None:
                    capsule = merge_per_family(self.assign, capsule)
                self.assign = capsule
                self._events.append(AddressesAssigned([a.prefix for a in capsule.addresses
                                                       if not a.prefix.network_address.is_unspecified]))
            elif isinstance(capsule, RouteAdvertisement):
                if self.merge_families and self.routes is not None:
                    capsule = merge_per_family(self.routes, capsule)
                self.routes = capsule
                self._events.append(RoutesAdvertised(list(capsule.ranges)))
            elif isinstance(capsule, AddressRequest):
                pass  # we assign nothing to the server
        if ended:
            self._close("the server ended the tunnel stream")

    # --- hot path ---

    def _on_datagram(self, payload: bytes) -> None:
        if not payload or payload[0] != 0:
            self.counters.unknown_context_dropped += 1
            return
        self.counters.packets_in += 1
        self.on_packet(payload[1:])

    def send_packet(self, packet: bytes) -> bool:
        """Queue one IP packet into the tunnel. False: not established, or dropped (too large / queue full)."""
        if self.state != "established":
            return False
        if self._fallback:
            try:
                self.h3.send_data(self.stream_id, encode_capsule(DatagramCapsule(CONTEXT_IP + packet)))
            except H3StateError:
                return False
            return True
        self.counters.packets_out += 1
        return self.quic.send_datagram_frame(self._prefix + packet, flow_hash(packet))

    # --- closing ---

    def close(self) -> None:
        """End the tunnel cleanly (FIN on the request stream)."""
        if self.state in ("requested", "established") and self.stream_id is not None:
            try:
                self.h3.send_data(self.stream_id, b"", end_stream=True)
            except H3StateError:
                pass
        self._close("closed by us")

    def _abort(self, code: int, reason: str) -> None:
        try:
            self.h3.reset_stream(self.stream_id, code)
        except H3StateError:
            pass
        self._close(reason)

    def _close(self, reason: str, status: int | None = None, retry: bool = True) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        if self.stream_id is not None:
            self.h3.unregister_datagram_handler(self.stream_id)
        self._events.append(TunnelClosed(reason, status, retry))

    def _take_events(self) -> list[ClientEvent]:
        events, self._events = self._events, []
        return events


def request_target(host: str, port: int, template: str | None = None) -> tuple[str, str]:
    """(:authority, :path) for a full tunnel to ``host:port`` (IPv6 literals bracketed)."""
    from mqvpn.masque.uri import DEFAULT_TEMPLATE

    return expand(template or DEFAULT_TEMPLATE, host=host, port=port)


__all__ = [
    "AddressesAssigned", "ClientEvent", "ConnectIpClient", "ConnectIpServer", "ConnectIpService", "RoutesAdvertised",
    "ServerSession", "TunnelClosed", "TunnelEstablished", "request_target",
]
