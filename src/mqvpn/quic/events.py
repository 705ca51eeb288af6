"""Events the connection hands to the application (slow path only: DATAGRAMs use a handler, not events)."""

from __future__ import annotations

from dataclasses import dataclass


class QuicEvent:
    __slots__ = ()


@dataclass(slots=True)
class HandshakeCompleted(QuicEvent):
    alpn_protocol: str | None
    session_resumed: bool = False


@dataclass(slots=True)
class ConnectionTerminated(QuicEvent):
    error_code: int
    frame_type: int | None
    reason_phrase: str
    by_peer: bool = False


@dataclass(slots=True)
class ConnectionIdIssued(QuicEvent):
    connection_id: bytes


@dataclass(slots=True)
class ConnectionIdRetired(QuicEvent):
    connection_id: bytes


@dataclass(slots=True)
class StreamDataReceived(QuicEvent):
    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(slots=True)
class DatagramFrameReceived(QuicEvent):
    data: bytes


@dataclass(slots=True)
class StreamReset(QuicEvent):
    stream_id: int
    error_code: int


@dataclass(slots=True)
class StopSendingReceived(QuicEvent):
    stream_id: int
    error_code: int


@dataclass(slots=True)
class PingAcknowledged(QuicEvent):
    uid: int


@dataclass(slots=True)
class KeyUpdated(QuicEvent):
    key_phase: int
    initiated_locally: bool


@dataclass(slots=True)
class PathValidated(QuicEvent):
    path_id: int
    remote_addr: tuple


@dataclass(slots=True)
class PathAbandoned(QuicEvent):
    """A path is no longer used (by us, e.g. its PTOs piled up, or by the peer's PATH_ABANDON)."""

    path_id: int
    error_code: int
    by_peer: bool


@dataclass(slots=True)
class PathLiveness(QuicEvent):
    """A path stopped answering (``alive`` False: its PTOs piled up while another path works; it is only probed)
    or answers again (True: a probe was acknowledged)."""

    path_id: int
    alive: bool


@dataclass(slots=True)
class MtuUpdated(QuicEvent):
    """The largest UDP payload the connection has shown to work (DPLPMTUD); datagram_room follows it."""

    max_udp_payload: int
    datagram_room: int
