"""An in-memory client/server pair of our QuicConnection, pumped with a fake clock (no sockets)."""

from __future__ import annotations

import random

from mqvpn.quic.config import QuicConfiguration
from mqvpn.quic.connection import QuicConnection
from mqvpn.quic.packet import parse_header

CLIENT_ADDR = ("10.0.0.1", 4433)
SERVER_ADDR = ("10.0.0.2", 443)


def make_configs(pki, **kw):
    client = QuicConfiguration(is_client=True, alpn_protocols=["test"], server_name="localhost", cafile=pki.ca, **kw)
    server = QuicConfiguration(is_client=False, alpn_protocols=["test"], **kw)
    server.load_cert_chain(pki.cert, pki.key)
    return client, server


class Pair:
    def __init__(self, pki, *, loss: float = 0.0, seed: int = 1, rtt: float = 0.02, client_kw=None, **kw):
        self.client_cfg, self.server_cfg = make_configs(pki, **kw)
        for k, v in (client_kw or {}).items():
            setattr(self.client_cfg, k, v)
        self.client = QuicConnection(self.client_cfg)
        self.server: QuicConnection | None = None
        self.now = 1000.0
        self.rtt = rtt
        self.loss = loss
        self.rng = random.Random(seed)
        self.in_flight: list[tuple[float, str, bytes]] = []  # (arrival, to, data)
        self.client_events: list = []
        self.server_events: list = []
        self.delivered = 0
        self.dropped = 0
        self.client_addr = CLIENT_ADDR  # change it to simulate a NAT rebinding
        self.blackhole: set = set()  # client-side addresses whose packets vanish (a dead uplink)
        self.max_size: int | None = None  # path MTU: larger datagrams are dropped on the wire
        self.sent_sizes = {"client": [], "server": []}

    def connect(self) -> None:
        self.client.connect(SERVER_ADDR, self.now)

    def _flush(self) -> None:
        for conn, to in ((self.client, "server"), (self.server, "client")):
            if conn is None:
                continue
            for data, addr, local in conn.datagrams_to_send(self.now):
                self.sent_sizes["server" if to == "client" else "client"].append(len(data))
                if self.max_size is not None and len(data) > self.max_size:
                    self.dropped += 1
                    continue
                if self.loss and self.rng.random() < self.loss:
                    self.dropped += 1
                    continue
                # the client's side of the path: the local address a client path was opened with (multipath),
                # else client_addr (which a test may change to play a NAT rebinding); to the client: where it went
                client_side = (local if local is not None else self.client_addr) if to == "server" else addr
                if client_side in self.blackhole:
                    self.dropped += 1
                    continue
                self.in_flight.append((self.now + self.rtt / 2, to, data, client_side))
        for conn, events in ((self.client, self.client_events), (self.server, self.server_events)):
            if conn is None:
                continue
            while (e := conn.next_event()) is not None:
                events.append(e)

    def _extra_timers(self) -> list[float]:
        """Deadlines of layers above QUIC (subclasses); step() wakes up for them too."""
        return []

    def step(self, deadline: float | None = None) -> bool:
        """Advance to the next arrival or timer (never past ``deadline``); False when nothing is left to do."""
        self._flush()
        candidates = [p[0] for p in self.in_flight] + self._extra_timers()
        for conn in (self.client, self.server):
            if conn is not None and (t := conn.get_timer()) is not None:
                candidates.append(t)
        if not candidates or (deadline is not None and min(candidates) > deadline):
            return False
        self.now = max(self.now, min(candidates))
        arrived = [p for p in self.in_flight if p[0] <= self.now]
        self.in_flight = [p for p in self.in_flight if p[0] > self.now]
        for _, to, data, client_side in arrived:
            self.delivered += 1
            if to == "server":
                if self.server is None:
                    header = parse_header(data, 0, 8)
                    self.server = QuicConnection(self.server_cfg, original_destination_connection_id=header.dcid,
                                                 peer_initial_cid=header.scid)
                self.server.receive_datagram(data, client_side, self.now, SERVER_ADDR)
            else:
                self.client.receive_datagram(data, SERVER_ADDR, self.now, client_side)
        for conn in (self.client, self.server):
            if conn is not None and (t := conn.get_timer()) is not None and t <= self.now:
                conn.handle_timer(self.now)
        self._flush()
        return True

    def run(self, until=None, max_steps: int = 100000, max_time: float = 60.0) -> None:
        start = self.now
        for _ in range(max_steps):
            if until is not None and until():
                return
            if self.now - start > max_time:
                return
            if not self.step(start + max_time):
                return
