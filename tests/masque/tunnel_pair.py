"""In-memory CONNECT-IP: our QUIC pair (fake clock) + H3 on both sides + ConnectIpService/Server and ConnectIpClient."""

from __future__ import annotations

from mqvpn.masque.auth import KeyStore
from mqvpn.masque.connectip import ConnectIpClient, ConnectIpServer, ConnectIpService
from mqvpn.masque.h3 import H3Connection
from mqvpn.masque.pool import AddressPool
from mqvpn.quic import events as qev

from tests.quic.pair import Pair

KEY = "k" * 43 + "="


def ipv4_packet(src: str, dst: str, payload: bytes = b"hello", proto: int = 17, ttl: int = 64) -> bytes:
    import ipaddress
    import struct

    total = 20 + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, ttl, proto, 0, ipaddress.IPv4Address(src).packed,
                         ipaddress.IPv4Address(dst).packed)
    csum = sum(struct.unpack("!10H", header))
    while csum >> 16:
        csum = (csum & 0xFFFF) + (csum >> 16)
    header = header[:10] + struct.pack("!H", ~csum & 0xFFFF) + header[12:]
    return header + payload


class TunnelWorld:
    """One server service; any number of client connections, each with its own QUIC pair."""

    def __init__(self, pki, *, subnet="10.0.0.0/24", subnet6=None, max_clients=64, keys=None, reflect=False):
        self.pki = pki
        self.service = ConnectIpService(keys=keys or KeyStore(KEY), pool4=AddressPool(subnet) if subnet else None,
                                        pool6=AddressPool(subnet6) if subnet6 else None, max_clients=max_clients,
                                        on_packet=self._from_client)
        self.to_tun: list[tuple[bytes, object]] = []
        self.reflect = reflect  # send every client packet back to its sender with src/dst swapped
        self.clients: list[TunnelClient] = []

    def _from_client(self, packet, session):
        self.to_tun.append((packet, session))
        if self.reflect and packet[0] >> 4 == 4:
            back = packet[:12] + packet[16:20] + packet[12:16] + packet[20:]
            self.service.route_packet(back)

    def add_client(self, *, key=KEY, **kw) -> "TunnelClient":
        c = TunnelClient(self, key=key, **kw)
        self.clients.append(c)
        return c


class TunnelClient(Pair):
    def __init__(self, world: TunnelWorld, *, key=KEY, address_request_delay=0.5, **kw):
        super().__init__(world.pki, **kw)
        self.world = world
        self.received: list[bytes] = []
        self.client_events_cip: list = []
        self.h3c = H3Connection(self.client)
        self.cip = ConnectIpClient(self.h3c, authority="localhost:443", auth_key=key, on_packet=self.received.append,
                                   address_request_delay=address_request_delay)
        self.h3s: H3Connection | None = None
        self.srv: ConnectIpServer | None = None
        self.quic_terminated = []

    def _flush(self) -> None:
        super()._flush()
        if self.server is not None and self.h3s is None:
            self.h3s = H3Connection(self.server)
            self.srv = ConnectIpServer(self.world.service, self.h3s)
        for events, h3, is_client in ((self.client_events, self.h3c, True), (self.server_events, self.h3s, False)):
            while events:
                e = events.pop(0)
                if isinstance(e, qev.ConnectionTerminated):
                    self.quic_terminated.append((is_client, e))
                    if is_client:
                        self.client_events_cip += self.cip.connection_lost(e.reason_phrase)
                    elif self.srv is not None:
                        self.srv.connection_lost()
                if h3 is None:
                    continue
                for h3e in h3.handle_event(e):
                    if is_client:
                        self.client_events_cip += self.cip.handle_h3_event(h3e)
                    else:
                        self.srv.handle_h3_event(h3e)
        self.client_events_cip += self.cip.poll(self.now)
        # the client's CONNECT-IP timer (ADDRESS_REQUEST) is driven from here
        t = self.cip.get_timer()
        if t is not None and t <= self.now:
            self.client_events_cip += self.cip.poll(self.now)

    def _extra_timers(self) -> list[float]:
        t = self.cip.get_timer()
        return [t] if t is not None else []

    def connect_tunnel(self, max_time=5.0):
        from mqvpn.masque.connectip import AddressesAssigned, TunnelClosed

        self.connect()
        self.run(until=lambda: any(isinstance(e, (AddressesAssigned, TunnelClosed)) for e in self.client_events_cip),
                 max_time=max_time)
        return self.client_events_cip
