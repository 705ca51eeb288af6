"""HTTP/3 connection (src/mqvpn/masque/h3.py).

Two ways to drive it:

* ``H3Pair``: H3Connections (or, on either side, a "raw" peer writing bytes on QUIC streams itself) over an
  in-memory pair of our QuicConnections with a fake clock (tests/quic/pair.py). Connection errors are checked where
  they matter: the code in the peer's ConnectionTerminated.
* ``FakeQuic``: the part of the QUIC connection H3 uses, recording what it is asked to do; events are handed over
  byte by byte. Used where the exact delivery matters (splits, QPACK blocking, datagrams) and for fuzzing.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pylsqpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqvpn.masque.h3 import (
    DataReceived,
    GoawayReceived,
    H3Connection,
    H3StateError,
    HeadersReceived,
    MessageRejected,
    SettingsReceived,
    StreamReset,
    StreamStopped,
)
from mqvpn.masque.h3frames import ErrorCode as E
from mqvpn.masque.h3frames import FrameType as F
from mqvpn.masque.h3frames import Setting, StreamType, encode_frame, grease_id
from mqvpn.quic import events as qev
from mqvpn.quic.buffer import encode_uint_var as v
from tests.interop.pki import make_test_pki
from tests.quic.pair import Pair

CONNECT_IP = [
    (b":method", b"CONNECT"),
    (b":protocol", b"connect-ip"),
    (b":scheme", b"https"),
    (b":authority", b"proxy.example:443"),
    (b":path", b"/.well-known/masque/ip/*/*/"),
    (b"capsule-protocol", b"?1"),
]
GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.org"), (b":path", b"/")]
OK = [(b":status", b"200"), (b"capsule-protocol", b"?1")]
H3_CODES = {int(code) for code in E}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


# ----------------------------------------------------------------------------------------------------------------
# wire helpers (the peer's side, written by hand)
# ----------------------------------------------------------------------------------------------------------------


def frame(frame_type: int, payload: bytes = b"") -> bytes:
    return encode_frame(frame_type, payload)


def settings_frame(pairs=()) -> bytes:
    return frame(F.SETTINGS, b"".join(v(k) + v(value) for k, value in pairs))


S = settings_frame([(Setting.ENABLE_CONNECT_PROTOCOL, 1)])


def headers_frame(headers, stream_id: int = 0) -> bytes:
    """A HEADERS frame encoded without the dynamic table (no validation: any field lines)."""
    return frame(F.HEADERS, pylsqpack.Encoder().encode(stream_id, list(headers))[1])


def drop(headers, name):
    return [(n, value) for n, value in headers if n != name]


def replace(headers, name, value):
    return [(n, value if n == name else old) for n, old in headers]


# ----------------------------------------------------------------------------------------------------------------
# H3Pair: real QUIC connections in memory
# ----------------------------------------------------------------------------------------------------------------


class Raw:
    """A peer writing HTTP/3 bytes itself on its QuicConnection."""

    def __init__(self, quic) -> None:
        self.quic = quic

    def uni(self, stream_type: int, data: bytes = b"", fin: bool = False) -> int:
        sid = self.quic.get_next_available_stream_id(True)
        self.quic.send_stream_data(sid, v(stream_type) + data, fin)
        return sid

    def request(self, data: bytes, fin: bool = False) -> int:
        sid = self.quic.get_next_available_stream_id(False)
        self.quic.send_stream_data(sid, data, fin)
        return sid


class H3Pair:
    def __init__(self, pki, *, client_h3=True, server_h3=True, client_kw=None, server_kw=None, client_quic=None,
                 server_quic=None):
        self.pair = Pair(pki, client_kw=client_quic)
        for name, value in (server_quic or {}).items():
            setattr(self.pair.server_cfg, name, value)
        self._server_h3 = server_h3
        self._server_kw = server_kw or {}
        self.client = H3Connection(self.pair.client, **(client_kw or {})) if client_h3 else None
        self.server: H3Connection | None = None
        self.client_events: list = []  # H3 events
        self.server_events: list = []
        self.client_quic: list = []  # every QUIC event, as handed to the H3 side
        self.server_quic: list = []
        self.hold = None  # predicate: server-side QUIC events to hold back (to reorder)
        self.held: list = []

    @property
    def raw_client(self) -> Raw:
        return Raw(self.pair.client)

    @property
    def raw_server(self) -> Raw:
        return Raw(self.pair.server)

    def pump(self) -> None:
        p = self.pair
        if p.server is not None and self.server is None and self._server_h3:
            self.server = H3Connection(p.server, **self._server_kw)
        while p.client_events:
            event = p.client_events.pop(0)
            self.client_quic.append(event)
            if self.client is not None:
                self.client_events += self.client.handle_event(event)
        while p.server_events:
            event = p.server_events.pop(0)
            if self.hold is not None and self.hold(event):
                self.held.append(event)
                continue
            self.deliver_server(event)

    def deliver_server(self, event) -> None:
        self.server_quic.append(event)
        if self.server is not None:
            self.server_events += self.server.handle_event(event)

    def release(self) -> None:
        self.hold = None
        for event in self.held:
            self.deliver_server(event)
        self.held.clear()

    def run(self, until=None, max_time: float = 1.0) -> None:
        """Deliver packets and fire timers up to ``max_time`` (simulated seconds) from now, or until ``until()``.
        Unlike Pair.run, never jumps past the deadline (to an idle timeout, say)."""
        p = self.pair
        deadline = p.now + max_time
        for _ in range(100000):
            self.pump()
            if until is not None and until():
                return
            p._flush()
            times = [entry[0] for entry in p.in_flight]
            times += [t for conn in (p.client, p.server) if conn is not None and (t := conn.get_timer()) is not None]
            if not times or min(times) > deadline:
                return
            p.step()

    def establish(self) -> None:
        self.pair.connect()

        def ready():
            done = [any(isinstance(e, qev.HandshakeCompleted) for e in events)
                    for events in (self.client_quic, self.server_quic)]
            for h3 in (self.client, self.server):
                if h3 is not None:
                    done.append(h3.settings_received or (h3 is self.client and self.server is None and
                                                         self._server_h3))
            return all(done)

        self.run(until=ready, max_time=5)
        self.run(max_time=0.1)  # let the rest (SETTINGS to raw peers, acks) arrive
        assert self.pair.server is not None

    def events_of(self, side: str, kind, stream_id=None) -> list:
        events = self.client_events if side == "client" else self.server_events
        return [e for e in events if isinstance(e, kind) and (stream_id is None or e.stream_id == stream_id)]

    def quic_events_of(self, side: str, kind, stream_id=None) -> list:
        events = self.client_quic if side == "client" else self.server_quic
        return [e for e in events if isinstance(e, kind) and (stream_id is None or e.stream_id == stream_id)]

    def terminated(self, side: str):
        found = self.quic_events_of(side, qev.ConnectionTerminated)
        return found[0] if found else None


def connect_ip(h: H3Pair) -> int:
    """An extended CONNECT from the client H3 answered 200 by the server H3; returns the stream id."""
    sid = h.client.get_next_available_stream_id()
    h.client.send_headers(sid, CONNECT_IP)
    h.run(until=lambda: h.events_of("server", HeadersReceived, sid))
    h.server.send_headers(sid, OK)
    h.run(until=lambda: h.events_of("client", HeadersReceived, sid))
    return sid


# ----------------------------------------------------------------------------------------------------------------
# FakeQuic: exact delivery
# ----------------------------------------------------------------------------------------------------------------


class FakeQuic:
    """What H3Connection uses of a QuicConnection; records writes, resets, stops, datagrams and the close."""

    def __init__(self, is_client: bool, *, datagrams: bool = True, peer_datagrams: bool = True) -> None:
        self.is_client = is_client
        self.configuration = SimpleNamespace(max_datagram_frame_size=65535 if datagrams else None)
        self.peer_transport_parameters = SimpleNamespace(initial_max_streams_uni=100)
        self.peer_max_datagram_frame_size = 65535 if peer_datagrams else None
        self.datagram_handler = None
        self.sent: dict[int, bytearray] = defaultdict(bytearray)
        self.fin: set[int] = set()
        self.resets: dict[int, int] = {}
        self.stops: dict[int, int] = {}
        self.datagrams: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self._next = [0, 0]

    def get_next_available_stream_id(self, is_unidirectional: bool = False) -> int:
        kind = int(is_unidirectional)
        return self._next[kind] * 4 + 2 * kind + (0 if self.is_client else 1)

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        kind = (stream_id >> 1) & 1
        if (stream_id & 1) == (0 if self.is_client else 1) and stream_id >> 2 >= self._next[kind]:
            self._next[kind] = (stream_id >> 2) + 1
        self.sent[stream_id] += data
        if end_stream:
            self.fin.add(stream_id)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        self.resets.setdefault(stream_id, error_code)

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        self.stops.setdefault(stream_id, error_code)

    def send_datagram_frame(self, data: bytes) -> bool:
        self.datagrams.append(bytes(data))
        return True

    def close(self, error_code: int = 0, reason_phrase: str = "", **_) -> None:
        if self.closed is None:
            self.closed = (error_code, reason_phrase)


# the peer's streams as a FakeQuic-driven H3 sees them
PEER_OF_SERVER = SimpleNamespace(control=2, encoder=6, decoder=10, push=14, other=18)
PEER_OF_CLIENT = SimpleNamespace(control=3, encoder=7, decoder=11, push=15, other=19)
# our own control / encoder / decoder stream ids (opened in that order)
OURS = {False: (3, 7, 11), True: (2, 6, 10)}

PEER_SETTINGS = [(Setting.ENABLE_CONNECT_PROTOCOL, 1), (Setting.H3_DATAGRAM, 1)]


def feed(h3: H3Connection, stream_id: int, data: bytes, fin: bool = False) -> list:
    return h3.handle_event(qev.StreamDataReceived(stream_id, data, fin))


def fake(is_client: bool = False, peer_settings=PEER_SETTINGS, *, datagrams: bool = True, **kw):
    quic = FakeQuic(is_client, datagrams=datagrams)
    h3 = H3Connection(quic, **kw)
    events = []
    if peer_settings is not None:
        peer = PEER_OF_CLIENT if is_client else PEER_OF_SERVER
        events = feed(h3, peer.control, v(StreamType.CONTROL) + settings_frame(peer_settings))
    return h3, quic, events


def fake_request(headers=CONNECT_IP, stream_id: int = 0, **kw):
    """A FakeQuic server H3 that has received a request on ``stream_id``."""
    h3, quic, _ = fake(**kw)
    events = feed(h3, stream_id, headers_frame(headers, stream_id))
    assert [type(e) for e in events] == [HeadersReceived], events
    return h3, quic


def collapse(events) -> tuple[list, bytes, bool]:
    """(header sections, concatenated data, ended) of one stream's events."""
    headers = [(e.headers, e.trailers) for e in events if isinstance(e, HeadersReceived)]
    data = b"".join(e.data for e in events if isinstance(e, DataReceived))
    ended = [e for e in events if getattr(e, "stream_ended", False)]
    assert len(ended) <= 1 and (not ended or ended[0] is events[-1]), events
    return headers, data, bool(ended)


# ================================================================================================================
# SETTINGS
# ================================================================================================================


def test_settings_exchange(pki):
    h = H3Pair(pki)
    h.establish()
    for h3, other in ((h.client, h.server), (h.server, h.client)):
        assert h3.settings_received and h3.peer_settings == other.local_settings
        sent = h3.local_settings
        assert sent[Setting.QPACK_MAX_TABLE_CAPACITY] == 4096 and sent[Setting.QPACK_BLOCKED_STREAMS] == 16
        assert sent[Setting.MAX_FIELD_SECTION_SIZE] == 16384
        assert sent[Setting.ENABLE_CONNECT_PROTOCOL] == 1 and sent[Setting.H3_DATAGRAM] == 1
        grease = [k for k in sent if k >= 0x21 and (k - 0x21) % 0x1F == 0]
        assert len(grease) == 1
        assert h3.peer_supports_extended_connect and h3.datagrams_negotiated
    assert [type(e) for e in h.client_events] == [SettingsReceived]
    assert h.client_events[0].settings == h.server.local_settings


def test_settings_without_quic_datagrams(pki):
    h = H3Pair(pki, client_quic={"max_datagram_frame_size": None})
    h.establish()
    assert Setting.H3_DATAGRAM not in h.client.local_settings
    assert h.server.local_settings[Setting.H3_DATAGRAM] == 1
    assert not h.client.datagrams_negotiated and not h.server.datagrams_negotiated
    assert h.terminated("client") is None and h.terminated("server") is None


def test_h3_datagram_setting_needs_quic_datagram_parameter(pki):
    """A client whose QUIC transport parameters offer no DATAGRAM must not announce H3_DATAGRAM=1."""
    h = H3Pair(pki, client_h3=False, client_quic={"max_datagram_frame_size": None})
    h.establish()
    h.raw_client.uni(StreamType.CONTROL, settings_frame([(Setting.H3_DATAGRAM, 1)]))
    h.run(until=lambda: h.terminated("client"))
    assert h.terminated("client").error_code == E.H3_SETTINGS_ERROR


def test_settings_split_at_every_byte():
    """Our client receives the server's control stream one byte at a time (the stream type as a 2-byte varint)."""
    data = b"\x40\x00" + settings_frame(PEER_SETTINGS + [(0x1234, 7)]) + frame(0x21, b"grease") + frame(F.GOAWAY, v(8))
    h3, quic, _ = fake(is_client=True, peer_settings=None)
    events = []
    for i in range(len(data)):
        events += feed(h3, PEER_OF_CLIENT.control, data[i:i + 1])
    assert quic.closed is None
    assert [type(e) for e in events] == [SettingsReceived, GoawayReceived]
    assert events[0].settings == {Setting.ENABLE_CONNECT_PROTOCOL: 1, Setting.H3_DATAGRAM: 1, 0x1234: 7}
    assert events[1].last_id == 8 and h3.goaway_received == 8


def test_local_streams_wait_for_transport_parameters():
    quic = FakeQuic(is_client=True)
    quic.peer_transport_parameters = None
    h3 = H3Connection(quic)
    assert not quic.sent
    quic.peer_transport_parameters = SimpleNamespace(initial_max_streams_uni=3)
    h3.handle_event(qev.HandshakeCompleted("h3"))
    control, encoder, decoder = OURS[True]
    assert quic.sent[control].startswith(b"\x00\x04") and quic.sent[encoder] == b"\x02"
    assert quic.sent[decoder] == b"\x03"


# ================================================================================================================
# extended CONNECT, DATA, datagrams end to end
# ================================================================================================================


def test_extended_connect_roundtrip(pki):
    h = H3Pair(pki)
    h.establish()
    sid = h.client.get_next_available_stream_id()
    h.client.send_headers(sid, CONNECT_IP)
    h.run(until=lambda: h.events_of("server", HeadersReceived))
    [req] = h.events_of("server", HeadersReceived)
    assert req == HeadersReceived(sid, CONNECT_IP, False, False)

    to_server, to_client = [], []
    h.server.register_datagram_handler(sid, to_server.append)
    h.server.send_headers(sid, OK)
    h.server.send_data(sid, b"\x01\x07\x00\x04\xc0\x00\x02\x0a\x20")  # an ADDRESS_ASSIGN capsule
    h.run(until=lambda: h.events_of("client", DataReceived))
    assert h.events_of("client", HeadersReceived) == [HeadersReceived(sid, OK, False, False)]
    assert h.events_of("client", DataReceived) == [DataReceived(sid, b"\x01\x07\x00\x04\xc0\x00\x02\x0a\x20", False)]

    h.client.register_datagram_handler(sid, to_client.append)
    packets = [b"\x00" + bytes([0x45]) + bytes(range(i, i + 40)) for i in range(10)]
    for p in packets:
        assert h.client.send_datagram(sid, p)
    h.client.send_data(sid, b"capsules from the client")
    h.run(until=lambda: len(to_server) == len(packets) and h.events_of("server", DataReceived))
    assert to_server == packets
    for p in to_server:
        assert h.server.send_datagram(sid, p[::-1])
    prefix = h.server.datagram_prefix(sid)
    assert h.pair.server.send_datagram_frame(prefix + b"\x00direct")  # the hot-path way
    h.run(until=lambda: len(to_client) == len(packets) + 1)
    assert to_client == [p[::-1] for p in packets] + [b"\x00direct"]
    assert b"".join(e.data for e in h.events_of("server", DataReceived)) == b"capsules from the client"

    # the client ends the tunnel: the server's handler goes with the receive side
    h.client.send_data(sid, b"", end_stream=True)
    h.run(until=lambda: h.events_of("server", DataReceived)[-1].stream_ended)
    h.pair.client.send_datagram_frame(prefix + b"\x00late")
    h.run(max_time=0.1)
    assert h.server.datagrams_dropped_unknown_stream == 1
    with pytest.raises(H3StateError):
        h.server.register_datagram_handler(sid, to_server.append)
    assert h.terminated("client") is None and h.terminated("server") is None


def test_extended_connect_needs_server_setting(pki):
    # before the server's SETTINGS arrived
    h3, quic, _ = fake(is_client=True, peer_settings=None)
    with pytest.raises(H3StateError, match="not arrived yet"):
        h3.send_headers(0, CONNECT_IP)
    assert not quic.sent[0]
    # a server that does not enable it
    h = H3Pair(pki, server_kw={"enable_connect_protocol": False})
    h.establish()
    assert h.client.settings_received and not h.client.peer_supports_extended_connect
    with pytest.raises(H3StateError, match="SETTINGS_ENABLE_CONNECT_PROTOCOL"):
        h.client.send_headers(0, CONNECT_IP)
    h.client.send_headers(0, GET, end_stream=True)  # plain requests still work
    h.run(until=lambda: h.events_of("server", HeadersReceived))
    assert h.events_of("server", HeadersReceived) == [HeadersReceived(0, GET, True, False)]


def test_server_rejects_protocol_it_did_not_enable(pki):
    h = H3Pair(pki, client_h3=False, server_kw={"enable_connect_protocol": False})
    h.establish()
    sid = h.raw_client.request(headers_frame(CONNECT_IP))
    h.run(until=lambda: h.quic_events_of("client", qev.StreamReset, sid))
    [rejected] = h.events_of("server", MessageRejected)
    assert rejected.error_code == E.H3_MESSAGE_ERROR and ":protocol" in rejected.reason
    assert h.quic_events_of("client", qev.StreamReset, sid)[0].error_code == E.H3_MESSAGE_ERROR


def test_interim_response_and_trailers(pki):
    h = H3Pair(pki)
    h.establish()
    sid = h.client.get_next_available_stream_id()
    h.client.send_headers(sid, replace(GET, b":method", b"POST"))
    h.client.send_data(sid, b"body")
    h.client.send_headers(sid, [(b"x-checksum", b"abc")], end_stream=True)
    h.run(until=lambda: h.events_of("server", HeadersReceived, sid)[-1:] and
          h.events_of("server", HeadersReceived, sid)[-1].stream_ended)
    assert collapse(h.server_events[1:]) == (
        [(replace(GET, b":method", b"POST"), False), ([(b"x-checksum", b"abc")], True)], b"body", True)
    h.server.send_headers(sid, [(b":status", b"103"), (b"link", b"</a>")])
    h.server.send_headers(sid, [(b":status", b"200"), (b"te", b"trailers")])
    h.server.send_data(sid, b"resp")
    h.server.send_headers(sid, [(b"x-trailer", b"1")], end_stream=True)
    h.run(until=lambda: h.client_events[-1:] and getattr(h.client_events[-1], "stream_ended", False))
    headers, data, ended = collapse(h.client_events[1:])
    assert [t for _, t in headers] == [False, False, True] and data == b"resp" and ended
    assert headers[0][0][0] == (b":status", b"103") and headers[1][0][0] == (b":status", b"200")
    with pytest.raises(H3StateError):
        h.server.send_data(sid, b"more")


def test_reset_and_stop_sending(pki):
    h = H3Pair(pki)
    h.establish()
    sid = connect_ip(h)
    got = []
    h.server.register_datagram_handler(sid, got.append)
    h.client.reset_stream(sid)  # both directions, H3_REQUEST_CANCELLED
    assert not h.client.send_datagram(sid, b"\x00x")
    h.run(until=lambda: h.events_of("server", StreamReset) and h.events_of("server", StreamStopped))
    assert h.events_of("server", StreamReset) == [StreamReset(sid, E.H3_REQUEST_CANCELLED)]
    assert h.events_of("server", StreamStopped) == [StreamStopped(sid, E.H3_REQUEST_CANCELLED)]
    assert not h.server.send_datagram(sid, b"\x00x")
    with pytest.raises(H3StateError):
        h.server.send_data(sid, b"x")
    h.pair.client.send_datagram_frame(h.client.datagram_prefix(sid) + b"\x00x")
    h.run(max_time=0.1)
    assert got == [] and h.server.datagrams_dropped_unknown_stream == 1
    assert h.terminated("server") is None


def test_close_with_h3_code(pki):
    h = H3Pair(pki)
    h.establish()
    h.client.close(E.H3_NO_ERROR, "bye")
    assert h.client.closed
    with pytest.raises(H3StateError):
        h.client.send_headers(0, GET)
    h.run(until=lambda: h.terminated("server"))
    t = h.terminated("server")
    assert (t.error_code, t.reason_phrase, t.by_peer) == (E.H3_NO_ERROR, "bye", True)
    assert h.server.closed and h.server.handle_event(qev.StreamDataReceived(0, b"\x01", False)) == []


# ================================================================================================================
# request validation: each malformed request is a stream error, the connection lives on
# ================================================================================================================

MALFORMED_REQUESTS = [
    ("uppercase field name", CONNECT_IP[:5] + [(b"Capsule-Protocol", b"?1")]),
    ("space in a field name", CONNECT_IP + [(b"x y", b"1")]),
    ("missing :method", drop(CONNECT_IP, b":method")),
    (":protocol with GET", replace(CONNECT_IP, b":method", b"GET")),
    ("extended CONNECT without :scheme", drop(CONNECT_IP, b":scheme")),
    ("extended CONNECT without :path", drop(CONNECT_IP, b":path")),
    ("extended CONNECT without :authority", drop(CONNECT_IP, b":authority")),
    ("extended CONNECT with empty :path", replace(CONNECT_IP, b":path", b"")),
    ("extended CONNECT with empty :protocol", replace(CONNECT_IP, b":protocol", b"")),
    ("extended CONNECT with empty :authority", replace(CONNECT_IP, b":authority", b"")),
    ("extended CONNECT with empty :scheme", replace(CONNECT_IP, b":scheme", b"")),
    ("CONNECT with :path", [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":path", b"/")]),
    ("CONNECT with :scheme", [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":scheme", b"https")]),
    ("CONNECT without :authority", [(b":method", b"CONNECT")]),
    ("pseudo-header after a regular field", CONNECT_IP[:2] + [(b"x-a", b"1")] + CONNECT_IP[2:]),
    ("duplicate pseudo-header", CONNECT_IP[:5] + [(b":path", b"/x")] + CONNECT_IP[5:]),
    ("unknown pseudo-header", [(b":foo", b"bar")] + CONNECT_IP),
    (":status in a request", [(b":status", b"200")] + CONNECT_IP),
    ("connection", CONNECT_IP + [(b"connection", b"close")]),
    ("keep-alive", CONNECT_IP + [(b"keep-alive", b"5")]),
    ("proxy-connection", CONNECT_IP + [(b"proxy-connection", b"x")]),
    ("transfer-encoding", CONNECT_IP + [(b"transfer-encoding", b"chunked")]),
    ("upgrade", CONNECT_IP + [(b"upgrade", b"websocket")]),
    ("te other than trailers", CONNECT_IP + [(b"te", b"gzip")]),
    ("LF in a value", CONNECT_IP + [(b"x-a", b"a\nb")]),
    ("CR in a value", CONNECT_IP + [(b"x-a", b"a\rb")]),
    ("NUL in a value", CONNECT_IP + [(b"x-a", b"a\x00b")]),
    ("leading space in a value", CONNECT_IP + [(b"x-a", b" a")]),
    ("trailing tab in a value", CONNECT_IP + [(b"x-a", b"a\t")]),
    ("newline in a pseudo-header", replace(CONNECT_IP, b":path", b"/a\nb")),
    ("GET without :path", drop(GET, b":path")),
    ("GET without :scheme", drop(GET, b":scheme")),
    ("https GET without :authority or host", drop(GET, b":authority")),
    (":authority and host differ", GET + [(b"host", b"other.example")]),
    ("method is not a token", replace(GET, b":method", b"G T")),
    ("header section above MAX_FIELD_SECTION_SIZE", CONNECT_IP + [(b"x-big", b"a" * 17000)]),
]


@pytest.mark.parametrize("headers", [h for _, h in MALFORMED_REQUESTS], ids=[n for n, _ in MALFORMED_REQUESTS])
def test_malformed_request_is_a_stream_error(pki, headers):
    h = H3Pair(pki, client_h3=False)
    h.establish()
    raw = h.raw_client
    raw.uni(StreamType.CONTROL, S)
    sid = raw.request(headers_frame(headers) + frame(F.DATA, b"ignored"))
    h.run(until=lambda: h.quic_events_of("client", qev.StreamReset, sid) and
          h.quic_events_of("client", qev.StopSendingReceived, sid))
    assert h.quic_events_of("client", qev.StreamReset, sid)[0].error_code == E.H3_MESSAGE_ERROR
    assert h.quic_events_of("client", qev.StopSendingReceived, sid)[0].error_code == E.H3_MESSAGE_ERROR
    [rejected] = h.events_of("server", MessageRejected)
    assert rejected.stream_id == sid and rejected.error_code == E.H3_MESSAGE_ERROR
    assert not h.events_of("server", HeadersReceived) and not h.events_of("server", DataReceived)
    # the connection lives on
    good = raw.request(headers_frame(CONNECT_IP))
    h.run(until=lambda: h.events_of("server", HeadersReceived, good))
    assert h.events_of("server", HeadersReceived) == [HeadersReceived(good, CONNECT_IP, False, False)]
    assert not h.server.closed and h.terminated("server") is None


def test_valid_requests_accepted():
    for headers in (CONNECT_IP, GET, [(b":method", b"CONNECT"), (b":authority", b"a:443")],
                    GET + [(b"te", b"trailers"), (b"host", b"example.org"), (b"x-empty", b"")],
                    drop(GET, b":authority") + [(b"host", b"example.org")],
                    replace(GET, b":scheme", b"urn")[:1] + [(b":scheme", b"foo"), (b":path", b"/")]):
        _, quic = fake_request(headers)
        assert quic.closed is None and not quic.resets


@pytest.mark.parametrize("status", [b"", b"20", b"2000", b"abc", b"099", b"600", b" 200"])
def test_malformed_response_is_a_stream_error(status):
    h3, quic, _ = fake(is_client=True)
    h3.send_headers(0, CONNECT_IP)
    events = feed(h3, 0, headers_frame([(b":status", status), (b"capsule-protocol", b"?1")]))
    assert [type(e) for e in events] == [MessageRejected] and events[0].error_code == E.H3_MESSAGE_ERROR
    assert quic.resets[0] == quic.stops[0] == E.H3_MESSAGE_ERROR and quic.closed is None
    events = feed(h3, 0, headers_frame([(b":path", b"/")], 0) + frame(F.DATA, b"late"))  # queued before the stop
    assert events == [] and quic.closed is None


def test_response_without_status_and_pseudo_in_trailers():
    h3, quic, _ = fake(is_client=True)
    h3.send_headers(0, GET, end_stream=True)
    assert [type(e) for e in feed(h3, 0, headers_frame([(b"x-a", b"1")]))] == [MessageRejected]
    h3.send_headers(4, GET, end_stream=True)
    events = feed(h3, 4, headers_frame([(b":status", b"200")]) + headers_frame([(b":status", b"200")]))
    assert [type(e) for e in events] == [HeadersReceived, MessageRejected]
    assert "pseudo-header" in events[1].reason and quic.closed is None


def test_request_without_headers_is_incomplete():
    h3, quic, _ = fake()
    events = feed(h3, 0, frame(0x21, b"grease"), fin=True)
    assert [(type(e), e.error_code) for e in events] == [(MessageRejected, E.H3_REQUEST_INCOMPLETE)]
    assert quic.resets[0] == E.H3_REQUEST_INCOMPLETE and 0 not in quic.stops  # the FIN came: nothing to stop


def test_client_interim_response_then_fin_is_malformed():
    h3, _, _ = fake(is_client=True)
    h3.send_headers(0, GET, end_stream=True)
    events = feed(h3, 0, headers_frame([(b":status", b"100")]), fin=True)
    assert [type(e) for e in events] == [HeadersReceived, MessageRejected]
    assert events[1].error_code == E.H3_MESSAGE_ERROR


# ================================================================================================================
# connection errors
# ================================================================================================================


def ctl(*frames):
    return lambda h: h.raw_client.uni(StreamType.CONTROL, b"".join(frames))


def uni(*streams):
    """Open unidirectional streams: (type, data[, fin]) each."""
    return lambda h: [h.raw_client.uni(*args) for args in streams]


def req(data, fin=False):
    def action(h):
        h.raw_client.uni(StreamType.CONTROL, S)
        h.raw_client.request(data, fin)
    return action


def both(*actions):
    def action(h):
        for a in actions:
            a(h)
    return action


def open_then_reset(stream_type):
    """Reset a stream once its type has arrived (a reset drops unsent data, and a stream reset before its type is
    tolerated)."""
    def action(h):
        if stream_type != StreamType.CONTROL:
            h.raw_client.uni(StreamType.CONTROL, S)
        sid = h.raw_client.uni(stream_type, S if stream_type == StreamType.CONTROL else b"")
        h.run(max_time=0.1)
        h.pair.client.reset_stream(sid, 0x100)
    return action


SERVER_SIDE_ERRORS = [
    ("first frame GOAWAY", ctl(frame(F.GOAWAY, v(0))), E.H3_MISSING_SETTINGS),
    ("first frame of unknown type", ctl(frame(0x21, b"x"), S), E.H3_MISSING_SETTINGS),
    ("first frame DATA", ctl(frame(F.DATA, b"x")), E.H3_MISSING_SETTINGS),
    ("second SETTINGS", ctl(S, S), E.H3_FRAME_UNEXPECTED),
    ("DATA on the control stream", ctl(S, frame(F.DATA, b"x")), E.H3_FRAME_UNEXPECTED),
    ("HEADERS on the control stream", ctl(S, frame(F.HEADERS, b"\x00\x00")), E.H3_FRAME_UNEXPECTED),
    ("PUSH_PROMISE on the control stream", ctl(S, frame(F.PUSH_PROMISE, b"\x00\x00\x00")), E.H3_FRAME_UNEXPECTED),
    ("HTTP/2 PING type on the control stream", ctl(S, frame(0x6, b"")), E.H3_FRAME_UNEXPECTED),
    ("HTTP/2 WINDOW_UPDATE type on the control stream", ctl(S, frame(0x8, b"\x00")), E.H3_FRAME_UNEXPECTED),
    ("second control stream", both(ctl(S), ctl(S)), E.H3_STREAM_CREATION_ERROR),
    ("second encoder stream", uni((0, S), (2,), (2,)), E.H3_STREAM_CREATION_ERROR),
    ("second decoder stream", uni((0, S), (3,), (3,)), E.H3_STREAM_CREATION_ERROR),
    ("push stream from a client", uni((StreamType.PUSH, v(0))), E.H3_STREAM_CREATION_ERROR),
    ("control stream FIN", uni((0, S, True)), E.H3_CLOSED_CRITICAL_STREAM),
    ("control stream reset", open_then_reset(StreamType.CONTROL), E.H3_CLOSED_CRITICAL_STREAM),
    ("encoder stream FIN", uni((0, S), (2, b"", True)), E.H3_CLOSED_CRITICAL_STREAM),
    ("encoder stream reset", open_then_reset(StreamType.QPACK_ENCODER), E.H3_CLOSED_CRITICAL_STREAM),
    ("decoder stream reset", open_then_reset(StreamType.QPACK_DECODER), E.H3_CLOSED_CRITICAL_STREAM),
    ("STOP_SENDING on our control stream", lambda h: h.pair.client.stop_stream(3, 0x100),
     E.H3_CLOSED_CRITICAL_STREAM),
    ("STOP_SENDING on our encoder stream", lambda h: h.pair.client.stop_stream(7, 0x100),
     E.H3_CLOSED_CRITICAL_STREAM),
    *[(f"HTTP/2 setting 0x{i:x}", ctl(settings_frame([(i, 0)])), E.H3_SETTINGS_ERROR) for i in (2, 3, 4, 5)],
    ("duplicate setting", ctl(settings_frame([(1, 0), (1, 0)])), E.H3_SETTINGS_ERROR),
    ("duplicate unknown setting", ctl(settings_frame([(0x21, 0), (0x21, 1)])), E.H3_SETTINGS_ERROR),
    ("ENABLE_CONNECT_PROTOCOL=2", ctl(settings_frame([(Setting.ENABLE_CONNECT_PROTOCOL, 2)])), E.H3_SETTINGS_ERROR),
    ("H3_DATAGRAM=2", ctl(settings_frame([(Setting.H3_DATAGRAM, 2)])), E.H3_SETTINGS_ERROR),
    ("truncated SETTINGS", ctl(frame(F.SETTINGS, v(1))), E.H3_FRAME_ERROR),
    ("oversized SETTINGS", ctl(v(F.SETTINGS) + v(1 << 20)), E.H3_EXCESSIVE_LOAD),
    ("GOAWAY with extra bytes", ctl(S, frame(F.GOAWAY, v(0) + v(0))), E.H3_FRAME_ERROR),
    ("empty GOAWAY", ctl(S, frame(F.GOAWAY)), E.H3_FRAME_ERROR),
    ("GOAWAY push id increased", ctl(S, frame(F.GOAWAY, v(4)), frame(F.GOAWAY, v(5))), E.H3_ID_ERROR),
    ("MAX_PUSH_ID decreased", ctl(S, frame(F.MAX_PUSH_ID, v(5)), frame(F.MAX_PUSH_ID, v(4))), E.H3_ID_ERROR),
    ("CANCEL_PUSH for a push never promised", ctl(S, frame(F.CANCEL_PUSH, v(0))), E.H3_ID_ERROR),
    ("DATA before HEADERS", req(frame(F.DATA, b"x")), E.H3_FRAME_UNEXPECTED),
    ("empty DATA before HEADERS", req(frame(F.DATA)), E.H3_FRAME_UNEXPECTED),
    ("SETTINGS on a request stream", req(headers_frame(GET) + S), E.H3_FRAME_UNEXPECTED),
    ("GOAWAY on a request stream", req(frame(F.GOAWAY, v(0))), E.H3_FRAME_UNEXPECTED),
    ("MAX_PUSH_ID on a request stream", req(frame(F.MAX_PUSH_ID, v(0))), E.H3_FRAME_UNEXPECTED),
    ("CANCEL_PUSH on a request stream", req(frame(F.CANCEL_PUSH, v(0))), E.H3_FRAME_UNEXPECTED),
    ("PUSH_PROMISE from a client", req(frame(F.PUSH_PROMISE, v(0) + b"\x00\x00")), E.H3_FRAME_UNEXPECTED),
    ("HTTP/2 PRIORITY type on a request stream", req(frame(0x2, b"\x00")), E.H3_FRAME_UNEXPECTED),
    ("HEADERS after an extended CONNECT's header section",
     req(headers_frame(CONNECT_IP) + frame(F.DATA, b"x") + headers_frame([(b"x-a", b"1")])), E.H3_FRAME_UNEXPECTED),
    ("DATA after trailers", req(headers_frame(GET) + headers_frame([(b"x-a", b"1")]) + frame(F.DATA, b"x")),
     E.H3_FRAME_UNEXPECTED),
    ("QPACK garbage", req(frame(F.HEADERS, b"\xff\xff\xff")), E.QPACK_DECOMPRESSION_FAILED),
    ("empty HEADERS", req(frame(F.HEADERS)), E.QPACK_DECOMPRESSION_FAILED),
    ("stream ends inside a frame header", req(headers_frame(GET) + b"\x00", fin=True), E.H3_FRAME_ERROR),
    ("stream ends inside a HEADERS frame", req(headers_frame(GET)[:-1], fin=True), E.H3_FRAME_ERROR),
    ("stream ends inside a DATA frame", req(headers_frame(GET) + frame(F.DATA, b"abc")[:-1], fin=True),
     E.H3_FRAME_ERROR),
    ("oversized HEADERS frame", req(v(F.HEADERS) + v(1 << 20)), E.H3_EXCESSIVE_LOAD),
    ("encoder stream garbage", uni((0, S), (2, b"\x3f" + b"\xff" * 10)), E.QPACK_ENCODER_STREAM_ERROR),
    ("decoder stream garbage", uni((0, S), (3, b"\x84")), E.QPACK_DECODER_STREAM_ERROR),
]


@pytest.mark.parametrize("action,code", [(a, c) for _, a, c in SERVER_SIDE_ERRORS],
                         ids=[n for n, _, _ in SERVER_SIDE_ERRORS])
def test_connection_error_at_server(pki, action, code):
    h = H3Pair(pki, client_h3=False)
    h.establish()
    action(h)
    h.run(until=lambda: h.terminated("client"))
    ours, theirs = h.terminated("server"), h.terminated("client")
    assert ours is not None and (ours.error_code, ours.by_peer) == (code, False), ours
    assert theirs is not None and (theirs.error_code, theirs.by_peer) == (code, True), theirs
    assert h.server.closed


def raw_server_request(h: H3Pair, headers=CONNECT_IP) -> int:
    h.raw_server.uni(StreamType.CONTROL, S)
    h.run(until=lambda: h.client.settings_received)
    sid = h.client.get_next_available_stream_id()
    h.client.send_headers(sid, headers)
    h.run(until=lambda: h.quic_events_of("server", qev.StreamDataReceived, sid))
    return sid


def respond(data: bytes):
    def action(h: H3Pair):
        sid = raw_server_request(h)
        h.pair.server.send_stream_data(sid, data)
    return action


def sctl(*frames):
    return lambda h: h.raw_server.uni(StreamType.CONTROL, b"".join(frames))


CLIENT_SIDE_ERRORS = [
    ("MAX_PUSH_ID from a server", sctl(S, frame(F.MAX_PUSH_ID, v(0))), E.H3_FRAME_UNEXPECTED),
    ("GOAWAY naming a server stream", sctl(S, frame(F.GOAWAY, v(1))), E.H3_ID_ERROR),
    ("GOAWAY naming a uni stream", sctl(S, frame(F.GOAWAY, v(2))), E.H3_ID_ERROR),
    ("GOAWAY id increased", sctl(S, frame(F.GOAWAY, v(4)), frame(F.GOAWAY, v(8))), E.H3_ID_ERROR),
    ("CANCEL_PUSH from a server", sctl(S, frame(F.CANCEL_PUSH, v(0))), E.H3_ID_ERROR),
    ("push stream without MAX_PUSH_ID", lambda h: h.raw_server.uni(StreamType.PUSH, v(0)), E.H3_ID_ERROR),
    ("server-initiated bidirectional stream", lambda h: h.pair.server.send_stream_data(1, headers_frame(GET)),
     E.H3_STREAM_CREATION_ERROR),
    ("PUSH_PROMISE on a request stream", respond(frame(F.PUSH_PROMISE, v(0) + b"\x00\x00")), E.H3_ID_ERROR),
    ("HEADERS after a CONNECT's 2xx response", respond(headers_frame(OK) + headers_frame([(b"x-a", b"1")])),
     E.H3_FRAME_UNEXPECTED),
    ("DATA before the response", respond(frame(F.DATA, b"x")), E.H3_FRAME_UNEXPECTED),
]


@pytest.mark.parametrize("action,code", [(a, c) for _, a, c in CLIENT_SIDE_ERRORS],
                         ids=[n for n, _, _ in CLIENT_SIDE_ERRORS])
def test_connection_error_at_client(pki, action, code):
    h = H3Pair(pki, server_h3=False)
    h.establish()
    action(h)
    h.run(until=lambda: h.terminated("server"))
    ours, theirs = h.terminated("client"), h.terminated("server")
    assert ours is not None and (ours.error_code, ours.by_peer) == (code, False), ours
    assert theirs is not None and (theirs.error_code, theirs.by_peer) == (code, True), theirs
    assert h.client.closed and h.client.handle_event(qev.StreamDataReceived(0, b"", True)) == []


def test_non_2xx_response_to_connect_may_have_trailers():
    h3, quic, _ = fake(is_client=True)
    h3.send_headers(0, CONNECT_IP)
    events = feed(h3, 0, headers_frame([(b":status", b"403")]) + frame(F.DATA, b"no") +
                  headers_frame([(b"x-why", b"auth")]), fin=True)
    assert [type(e) for e in events] == [HeadersReceived, DataReceived, HeadersReceived]
    assert events[-1].trailers and events[-1].stream_ended and quic.closed is None


# ================================================================================================================
# what is ignored
# ================================================================================================================


def test_unknown_frames_settings_and_stream_types_ignored(pki):
    h = H3Pair(pki, client_h3=False)
    h.establish()
    raw = h.raw_client
    unknown = [(0x21, 1), (0x1234, 99), (grease_id(1000), 1 << 40), (0x0, 5)]
    raw.uni(StreamType.CONTROL, settings_frame(unknown + [(Setting.ENABLE_CONNECT_PROTOCOL, 1)]) +
            frame(0x21, b"x" * 100) + frame(grease_id(7), b"") + frame(0x10000, b"y" * 50000))
    odd = [raw.uni(0x21, b"whatever"), raw.uni(grease_id(12345), b"more" * 100), raw.uni(0x54, b"", fin=True)]
    sid = raw.request(frame(0x21, b"a") + headers_frame(CONNECT_IP) + frame(grease_id(3), b"b" * 3000) +
                      frame(F.DATA, b"hello ") + frame(0x10000, b"") + frame(F.DATA, b"world"))
    h.run(until=lambda: b"".join(e.data for e in h.events_of("server", DataReceived)) == b"hello world" and
          len(h.quic_events_of("client", qev.StopSendingReceived)) == 2)
    assert h.terminated("server") is None and not h.server.closed
    assert {k: h.server.peer_settings[k] for k, _ in unknown} == dict(unknown)
    stops = h.quic_events_of("client", qev.StopSendingReceived)
    assert sorted((e.stream_id, e.error_code) for e in stops) == [(odd[0], E.H3_STREAM_CREATION_ERROR),
                                                                   (odd[1], E.H3_STREAM_CREATION_ERROR)]
    assert h.events_of("server", HeadersReceived) == [HeadersReceived(sid, CONNECT_IP, False, False)]


def test_unknown_stream_type_ignored_whatever_follows():
    h3, quic, _ = fake()
    sid = PEER_OF_SERVER.other
    assert feed(h3, sid, v(0x21)) == [] and quic.stops[sid] == E.H3_STREAM_CREATION_ERROR
    assert feed(h3, sid, S + b"\xff" * 100) == []  # queued before the stop took effect
    assert feed(h3, sid, b"", fin=True) == []
    assert h3.handle_event(qev.StreamReset(sid, 0)) == [] and quic.closed is None


def test_uni_stream_closed_before_its_type_is_tolerated():
    h3, quic, _ = fake()
    assert feed(h3, PEER_OF_SERVER.other, b"\x40", fin=True) == []
    assert h3.handle_event(qev.StreamReset(PEER_OF_SERVER.other + 4, 0)) == []
    assert quic.closed is None


def test_request_split_at_every_byte():
    data = (frame(0x21, b"grease") + headers_frame(CONNECT_IP) + frame(F.DATA, b"hello") + frame(F.DATA) +
            frame(grease_id(9), b"zz") + frame(F.DATA, b" world"))
    splits = [[data[i:i + 1] for i in range(len(data))]] + [[data[:i], data[i:]] for i in range(1, len(data))]
    splits.append([data, b""])  # FIN alone
    for pieces in splits:
        h3, quic, _ = fake()
        events = []
        for i, piece in enumerate(pieces):
            events += feed(h3, 0, piece, fin=i == len(pieces) - 1)
        assert quic.closed is None and not quic.resets
        assert collapse(events) == ([(CONNECT_IP, False)], b"hello world", True), pieces
        assert all(e.stream_id == 0 for e in events)


def test_fin_is_merged_into_the_last_event():
    h3, _, _ = fake()
    assert feed(h3, 0, headers_frame(GET), fin=True) == [HeadersReceived(0, GET, True, False)]
    assert feed(h3, 4, headers_frame(GET) + frame(F.DATA, b"x"), fin=True)[-1] == DataReceived(4, b"x", True)
    assert feed(h3, 8, headers_frame(GET)) == [HeadersReceived(8, GET, False, False)]
    assert feed(h3, 8, b"", fin=True) == [DataReceived(8, b"", True)]


# ================================================================================================================
# QPACK with the dynamic table
# ================================================================================================================


def peer_encoder_requests(count: int, headers=CONNECT_IP + [(b"x-token", b"t" * 40)]):
    """A peer encoder using our announced table: per request stream (0, 4, ...) its (encoder-stream bytes, block)."""
    enc = pylsqpack.Encoder()
    setup = enc.apply_settings(4096, 16)
    out = [enc.encode(4 * i, headers) for i in range(count)]
    return setup, out, headers, enc


def test_qpack_blocked_stream_resumes_with_encoder_data():
    h3, quic, _ = fake()
    setup, requests, headers, peer_encoder = peer_encoder_requests(3)
    assert requests[1][0], "the peer's encoder should insert into the dynamic table by the second request"
    # request 0 is static; request 1 needs the encoder stream data that has not arrived yet
    assert collapse(feed(h3, 0, frame(F.HEADERS, requests[0][1])))[0] == [(headers, False)]
    assert feed(h3, 4, frame(F.HEADERS, requests[1][1]) + frame(F.DATA, b"body"), fin=True) == []  # blocked
    events = feed(h3, PEER_OF_SERVER.encoder, v(StreamType.QPACK_ENCODER) + setup + requests[0][0] + requests[1][0])
    assert events == [HeadersReceived(4, headers, False, False), DataReceived(4, b"body", True)]
    # the decoder stream acknowledged the section; the peer's encoder accepts what we wrote
    decoder_stream = bytes(quic.sent[OURS[False][2]])
    assert decoder_stream[0] == StreamType.QPACK_DECODER and len(decoder_stream) > 1
    peer_encoder.feed_decoder(decoder_stream[1:])  # Section Acknowledgment(s): no DecoderStreamError
    assert quic.closed is None


def test_qpack_reset_of_a_blocked_stream_cancels_it():
    h3, quic, _ = fake()
    setup, requests, _, _ = peer_encoder_requests(2)
    feed(h3, 0, frame(F.HEADERS, requests[0][1]))
    assert feed(h3, 4, frame(F.HEADERS, requests[1][1])) == []
    before = len(quic.sent[OURS[False][2]])
    assert h3.handle_event(qev.StreamReset(4, E.H3_REQUEST_CANCELLED)) == [StreamReset(4, E.H3_REQUEST_CANCELLED)]
    assert len(quic.sent[OURS[False][2]]) > before  # Stream Cancellation
    events = feed(h3, PEER_OF_SERVER.encoder, v(StreamType.QPACK_ENCODER) + setup + requests[0][0] + requests[1][0])
    assert events == [] and quic.closed is None


def test_qpack_too_many_blocked_streams():
    h3, quic, _ = fake(qpack_blocked_streams=1)
    _, requests, _, _ = peer_encoder_requests(4)
    for i, (_, block) in enumerate(requests):
        feed(h3, 4 * i, frame(F.HEADERS, block))
    assert quic.closed[0] == E.QPACK_DECOMPRESSION_FAILED


def test_qpack_dynamic_table_end_to_end_with_reordering(pki):
    """Our encoder uses the dynamic table once the peer's SETTINGS allow it; a request whose encoder-stream data is
    held back waits (blocked) and is delivered once the data arrives."""
    h = H3Pair(pki)
    h.establish()
    headers = CONNECT_IP + [(b"authorization", b"Bearer " + b"k" * 60)]
    encoder_stream = OURS[True][1]
    first = h.client.get_next_available_stream_id()
    h.client.send_headers(first, headers)
    h.run(until=lambda: h.events_of("server", HeadersReceived, first))
    h.hold = lambda e: isinstance(e, qev.StreamDataReceived) and e.stream_id == encoder_stream
    later = []
    for _ in range(3):
        sid = h.client.get_next_available_stream_id()
        h.client.send_headers(sid, headers)
        later.append(sid)
    h.run(max_time=0.2)
    assert h.held, "the client's encoder wrote nothing on its encoder stream"
    waiting = [sid for sid in later if not h.events_of("server", HeadersReceived, sid)]
    assert waiting, "no request referenced the dynamic table"
    h.release()
    h.run(until=lambda: all(h.events_of("server", HeadersReceived, sid) for sid in later))
    for sid in later:
        assert h.events_of("server", HeadersReceived, sid) == [HeadersReceived(sid, headers, False, False)]
    assert h.terminated("server") is None and h.terminated("client") is None


# ================================================================================================================
# GOAWAY
# ================================================================================================================


def test_goaway_end_to_end(pki):
    h = H3Pair(pki)
    h.establish()
    sid = connect_ip(h)
    assert h.server.send_goaway() == sid + 4
    h.run(until=lambda: h.events_of("client", GoawayReceived))
    assert h.events_of("client", GoawayReceived) == [GoawayReceived(sid + 4)] and h.client.goaway_received == 4
    with pytest.raises(H3StateError, match="GOAWAY"):
        h.client.send_headers(h.client.get_next_available_stream_id(), GET)
    h.server.send_data(sid, b"still open")  # the request in progress goes on
    h.run(until=lambda: h.events_of("client", DataReceived))
    with pytest.raises(ValueError):
        h.server.send_goaway(8)  # may not increase
    assert h.server.send_goaway(0) == 0
    h.run(until=lambda: len(h.events_of("client", GoawayReceived)) == 2)
    assert h.terminated("client") is None


def test_server_refuses_requests_after_goaway():
    h3, quic = fake_request()
    assert h3.send_goaway() == 4
    control = OURS[False][0]
    assert quic.sent[control].endswith(frame(F.GOAWAY, v(4)))
    assert feed(h3, 4, headers_frame(GET)) == []
    assert quic.resets[4] == quic.stops[4] == E.H3_REQUEST_REJECTED
    assert feed(h3, 4, frame(F.DATA, b"queued before the stop")) == []
    assert quic.closed is None


# ================================================================================================================
# HTTP Datagrams
# ================================================================================================================


def test_datagram_routing():
    h3, quic = fake_request()
    feed(h3, 256, headers_frame(CONNECT_IP))
    assert h3.datagrams_negotiated and quic.datagram_handler == h3._receive_datagram
    got0, got256 = [], []
    h3.register_datagram_handler(0, got0.append)
    h3.register_datagram_handler(256, got256.append)
    handler = quic.datagram_handler
    handler(b"\x00\x00\x45packet")
    handler(b"\x40\x40\x00\x45other")  # qsid 64 in two bytes
    handler(b"\x40\x00\x00\x45padded")  # qsid 0 in a two-byte varint
    handler(b"\x01\x00x")  # stream 4: nothing registered
    handler(b"\xbf\xff\xff\xff\x00x")  # a 4-byte qsid, unknown
    handler(bytes.fromhex("cfffffffffffffff") + b"\x00x")  # 2^60-1: the largest allowed, unknown
    assert got0 == [b"\x00\x45packet", b"\x00\x45padded"] and got256 == [b"\x00\x45other"]
    assert h3.datagrams_dropped_unknown_stream == 3 and quic.closed is None
    handler(b"\x00")  # an empty HTTP Datagram payload is still a datagram
    assert got0[-1] == b""


@pytest.mark.parametrize("data", [b"", b"\x40", b"\x80\x00\x00", (1 << 60 | 0xC0 << 56).to_bytes(8, "big"),
                                  bytes.fromhex("ffffffffffffffff") + b"x"],
                         ids=["empty", "truncated 2-byte", "truncated 4-byte", "2^60", "2^62-1"])
def test_datagram_errors(data):
    h3, quic = fake_request()
    quic.datagram_handler(data)
    assert quic.closed[0] == E.H3_DATAGRAM_ERROR and h3.closed
    quic.datagram_handler(b"\x00x")  # after the close: silently dropped


def test_datagrams_before_negotiation_are_dropped():
    h3, quic, _ = fake(peer_settings=None)
    feed(h3, 0, headers_frame(CONNECT_IP))
    got = []
    h3.register_datagram_handler(0, got.append)
    quic.datagram_handler(b"\x00\x00x")
    quic.datagram_handler(b"")  # not even parsed
    assert not h3.datagrams_negotiated and h3.datagrams_dropped_not_negotiated == 2 and got == []
    assert not h3.send_datagram(0, b"\x00x") and quic.datagrams == []
    # SETTINGS without H3_DATAGRAM: still not negotiated
    feed(h3, PEER_OF_SERVER.control, v(0) + settings_frame([(Setting.ENABLE_CONNECT_PROTOCOL, 1)]))
    quic.datagram_handler(b"\x00\x00x")
    assert h3.datagrams_dropped_not_negotiated == 3 and got == [] and quic.closed is None


def test_datagrams_not_offered_by_our_quic():
    h3, quic, _ = fake(datagrams=False)
    assert Setting.H3_DATAGRAM not in h3.local_settings
    assert not h3.datagrams_negotiated and quic.closed is None


def test_datagram_send_and_prefix():
    assert [H3Connection.datagram_prefix(s) for s in (0, 4, 44, 252, 256)] == [
        b"\x00", b"\x01", b"\x0b", b"\x3f", b"\x40\x40"]
    with pytest.raises(ValueError):
        H3Connection.datagram_prefix(2)
    h3, quic = fake_request(stream_id=256)
    assert h3.send_datagram(256, b"\x00x")  # before the response: allowed, the stream is open
    assert quic.datagrams == [b"\x40\x40\x00x"]
    quic.datagrams.clear()
    h3.send_headers(256, OK)
    assert h3.send_datagram(256, b"\x00pkt") and quic.datagrams == [b"\x40\x40\x00pkt"]
    assert not h3.send_datagram(4, b"\x00pkt")  # no such stream
    h3.send_data(256, b"", end_stream=True)
    assert not h3.send_datagram(256, b"\x00pkt") and len(quic.datagrams) == 1


def test_datagram_handler_unregistered_with_the_stream():
    h3, quic = fake_request()
    got = []
    h3.register_datagram_handler(0, got.append)
    feed(h3, 0, frame(F.DATA, b"x"), fin=True)  # the peer closed its side
    quic.datagram_handler(b"\x00late")
    assert got == [] and h3.datagrams_dropped_unknown_stream == 1
    feed(h3, 4, headers_frame(CONNECT_IP))
    h3.register_datagram_handler(4, got.append)
    h3.reset_stream(4)
    assert quic.resets[4] == quic.stops[4] == E.H3_REQUEST_CANCELLED
    quic.datagram_handler(b"\x01late")
    assert got == [] and h3.datagrams_dropped_unknown_stream == 2
    with pytest.raises(H3StateError):
        h3.register_datagram_handler(8, got.append)


def test_datagram_before_negotiation_end_to_end(pki):
    """A raw client sends an HTTP Datagram without ever sending SETTINGS: dropped and counted."""
    h = H3Pair(pki, client_h3=False)
    h.establish()
    h.pair.client.send_datagram_frame(b"\x00\x00\x45")
    h.run(until=lambda: h.server.datagrams_dropped_not_negotiated)
    assert h.server.datagrams_dropped_not_negotiated == 1 and h.terminated("server") is None


def test_datagram_error_end_to_end(pki):
    h = H3Pair(pki)
    h.establish()
    h.pair.client.send_datagram_frame(bytes.fromhex("d000000000000000") + b"x")  # qsid 2^60
    h.run(until=lambda: h.terminated("client"))
    assert h.terminated("client").error_code == E.H3_DATAGRAM_ERROR == h.terminated("server").error_code


# ================================================================================================================
# sending: what the API refuses
# ================================================================================================================


def test_send_side_errors():
    h3, _ = fake_request(CONNECT_IP)
    with pytest.raises(H3StateError):
        h3.send_data(0, b"x")  # before the response
    with pytest.raises(ValueError):
        h3.send_headers(0, [(b":status", b"2000")])
    with pytest.raises(ValueError):
        h3.send_headers(0, [(b":status", b"200"), (b"Upper", b"x")])
    h3.send_headers(0, OK)
    with pytest.raises(H3StateError, match="CONNECT"):
        h3.send_headers(0, [(b"x-trailer", b"1")], end_stream=True)
    with pytest.raises(H3StateError):
        h3.send_headers(4, GET)  # a server does not open request streams
    with pytest.raises(H3StateError):
        h3.reset_stream(8)

    client, cquic, _ = fake(is_client=True)
    with pytest.raises(H3StateError):
        client.send_headers(2, GET)
    with pytest.raises(ValueError):
        client.send_headers(0, drop(GET, b":path"))
    client.send_headers(0, GET)
    with pytest.raises(ValueError, match="end_stream"):
        client.send_headers(0, [(b"x-trailer", b"1")])
    client.send_headers(0, [(b"x-trailer", b"1")], end_stream=True)
    with pytest.raises(H3StateError):
        client.send_data(0, b"x")
    assert 0 in cquic.fin


def test_peer_field_section_size_limit():
    h3, _, _ = fake(is_client=True, peer_settings=PEER_SETTINGS + [(Setting.MAX_FIELD_SECTION_SIZE, 400)])
    with pytest.raises(ValueError, match="MAX_FIELD_SECTION_SIZE"):
        h3.send_headers(0, CONNECT_IP + [(b"x-big", b"a" * 300)])
    h3.send_headers(0, CONNECT_IP)


def test_stop_sending_and_reset_on_request_streams():
    h3, quic = fake_request()
    h3.send_headers(0, OK)
    assert h3.handle_event(qev.StopSendingReceived(0, 0x10C)) == [StreamStopped(0, 0x10C)]
    with pytest.raises(H3StateError):
        h3.send_data(0, b"x")
    assert h3.handle_event(qev.StreamReset(0, 0x10C)) == [StreamReset(0, 0x10C)]
    assert feed(h3, 0, b"anything") == []  # forgotten, and never mistaken for a new request
    assert h3.handle_event(qev.StreamReset(0, 0x10C)) == [] and quic.closed is None


# ================================================================================================================
# fuzzing: whatever the peer sends, handle_event never raises; the only outcome besides events is a clean close
# ================================================================================================================

fuzz = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def feed_pieces(h3, stream_id, data, cuts, fin):
    cuts = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *cuts, len(data)]
    for i in range(len(bounds) - 1):
        feed(h3, stream_id, data[bounds[i]:bounds[i + 1]], fin=fin and i == len(bounds) - 2)


def check_outcome(quic):
    assert quic.closed is None or quic.closed[0] in H3_CODES, quic.closed


@fuzz
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=6), client=st.booleans(),
       prefix=st.sampled_from([b"", S, S + frame(F.GOAWAY, v(8))]), fin=st.booleans())
def test_fuzz_control_stream(data, cuts, client, prefix, fin):
    h3, quic, _ = fake(is_client=client, peer_settings=None)
    peer = PEER_OF_CLIENT if client else PEER_OF_SERVER
    feed_pieces(h3, peer.control, v(0) + prefix + data, cuts, fin)
    check_outcome(quic)
    if fin:
        assert quic.closed is not None


@fuzz
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=6), fin=st.booleans(),
       prefix=st.sampled_from([b"", headers_frame(CONNECT_IP), headers_frame(GET) + frame(F.DATA, b"x")]))
def test_fuzz_request_stream_at_server(data, cuts, fin, prefix):
    h3, quic, _ = fake()
    feed_pieces(h3, 0, prefix + data, cuts, fin)
    check_outcome(quic)
    feed(h3, 4, headers_frame(GET), fin=True)  # still serving, unless closed
    check_outcome(quic)


@fuzz
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=6), fin=st.booleans(),
       prefix=st.sampled_from([b"", headers_frame(OK), headers_frame([(b":status", b"103")])]))
def test_fuzz_response_stream_at_client(data, cuts, fin, prefix):
    h3, quic, _ = fake(is_client=True)
    h3.send_headers(0, CONNECT_IP)
    feed_pieces(h3, 0, prefix + data, cuts, fin)
    check_outcome(quic)


@fuzz
@given(streams=st.lists(st.tuples(st.sampled_from([0, 4, 2, 6, 10, 14, 18, 1, 3]), st.binary(max_size=60),
                                  st.booleans()), max_size=12),
       datagrams=st.lists(st.binary(max_size=12), max_size=4))
def test_fuzz_any_stream(streams, datagrams):
    h3, quic, _ = fake()
    for stream_id, data, fin in streams:
        feed(h3, stream_id, data, fin)
        check_outcome(quic)
    for d in datagrams:
        quic.datagram_handler(d)
        check_outcome(quic)


FRAME_VOCABULARY = [
    headers_frame(CONNECT_IP), headers_frame(GET), headers_frame(OK), headers_frame([(b":status", b"103")]),
    headers_frame([(b"x-trailer", b"1")]), headers_frame([(b"Bad", b"x")]), frame(F.HEADERS, b"\x00"),
    frame(F.DATA, b"data"), frame(F.DATA), frame(0x21, b"grease"), S, frame(F.GOAWAY, v(0)),
    frame(F.MAX_PUSH_ID, v(3)), frame(F.CANCEL_PUSH, v(0)), frame(F.PUSH_PROMISE, v(0) + b"\x00\x00"),
    v(StreamType.CONTROL), v(StreamType.QPACK_ENCODER), v(StreamType.QPACK_DECODER), v(0x21), b"\x3f\xe1\x1f",
]


@fuzz
@given(client=st.booleans(), steps=st.lists(st.tuples(
    st.sampled_from(["data", "fin", "reset", "stop", "datagram"]),
    st.sampled_from([0, 4, 8, 1, 5, 2, 3, 6, 7, 10, 11, 14, 15]),
    st.lists(st.sampled_from(FRAME_VOCABULARY), max_size=4)), max_size=15))
def test_fuzz_frame_sequences(client, steps):
    """Well-formed frames in arbitrary orders on arbitrary streams, with resets, STOP_SENDING and datagrams."""
    h3, quic, _ = fake(is_client=client)
    if client:
        h3.send_headers(0, CONNECT_IP)
        h3.send_headers(4, GET, end_stream=True)
    for action, stream_id, frames in steps:
        data = b"".join(frames)
        if action in ("data", "fin"):
            feed(h3, stream_id, data, fin=action == "fin")
        elif action == "reset":
            h3.handle_event(qev.StreamReset(stream_id, 0x10C))
        elif action == "stop":
            h3.handle_event(qev.StopSendingReceived(stream_id, 0x10C))
        else:
            quic.datagram_handler(v(stream_id >> 2) + data[:20])
        check_outcome(quic)
        for sid in (0, 4, 8):  # whatever state a stream is in, API calls either work or raise our errors
            try:
                h3.send_data(sid, b"x")
            except (H3StateError, ValueError):
                pass
            h3.send_datagram(sid, b"\x00x")
