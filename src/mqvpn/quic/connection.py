"""The QUIC connection: a sans-I/O state machine (RFC 9000, 9001, 9002, 9221, 8899).

Datagrams and the current time go in (``receive_datagram``, ``handle_timer``); datagrams to send come out
(``datagrams_to_send``), with the next deadline (``get_timer``) and events (``next_event``).

The class is split by concern into mixins that share its state:
  connection.py  construction, public API, receive (datagram -> packets), timers, close/drain
  handlers.py    one handler per frame type, stream bookkeeping
  sender.py      packets built per path, with a lean loop for DATAGRAM-only packets; DPLPMTUD probes
  tlsglue.py     TLS glue, transport parameters, keys, key update
  cids.py        connection IDs, paths, address changes

Per-path state (PN space, recovery, CC, PMTU, validation) lives in ``Path`` (path.py), so multipath adds paths,
not branches. Initial and Handshake spaces belong to the connection and are sent on path 0.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable

from aioquic import tls

from mqvpn.quic import events as ev
from mqvpn.quic import frames as F
from mqvpn.quic.buffer import Buffer, BufferReadError
from mqvpn.quic.cids import CidMixin
from mqvpn.quic.config import MIN_UDP_PAYLOAD, QuicConfiguration
from mqvpn.quic.constants import (
    AEAD_TAG_SIZE,
    DEAD_PATH_ABANDON,
    DEAD_PATH_PTOS,
    EPOCH_BITS,
    HANDSHAKE,
    INITIAL,
    KEEPALIVE_PING,
    MAX_PN_LEN,
    MAX_UDP_DATAGRAM_FRAME,
    ONE_RTT,
    PACKET_TYPE_EPOCH,
    PATH_CHALLENGE_TRIES,
    PATH_UNSTABLE_OR_POOR,
    ConnectionState,
)
from mqvpn.quic.crypto import (
    CryptoError,
    HeaderProtection,
    PacketKey,
    open_payload,
    unprotect_header,
)
from mqvpn.quic.errors import QuicErrorCode, QuicProtocolError
from mqvpn.quic.handlers import FrameHandlersMixin
from mqvpn.quic.packet import (
    QUIC_VERSION_1,
    PacketType,
    decode_packet_number,
    parse_header,
)
from mqvpn.quic.path import (
    ACK_ELICITING_THRESHOLD,
    MAX_ACK_RANGES,
    CidRecord,
    PacketSpace,
    Path,
    PathState,
)
from mqvpn.quic.scheduler import create as create_scheduler
from mqvpn.quic.sender import SenderMixin, _Packet
from mqvpn.quic.stream import QuicStream
from mqvpn.quic.tlsglue import TlsMixin, _CryptoStream
from mqvpn.quic.tparams import TransportParameters


class QuicConnection(FrameHandlersMixin, SenderMixin, TlsMixin, CidMixin):
    def __init__(
        self,
        configuration: QuicConfiguration,
        *,
        original_destination_connection_id: bytes | None = None,
        retry_source_connection_id: bytes | None = None,
        peer_initial_cid: bytes | None = None,
    ) -> None:
        cfg = configuration
        self.configuration = cfg
        self.is_client = cfg.is_client
        if self.is_client and cfg.verify_peer and not cfg.server_name:
            raise ValueError("certificate verification needs server_name (the name or address the certificate "
                             "must carry); set verify_peer=False only to skip verification on purpose")
        if not self.is_client and original_destination_connection_id is None:
            raise ValueError("a server connection needs the client's original destination connection ID")
        self.state = ConnectionState.FIRSTFLIGHT
        self._events: deque = deque()
        self.datagram_handler: Callable[[bytes], None] | None = None
        self._cid_len = cfg.connection_id_length
        self._reset_key = cfg.stateless_reset_key

        # connection IDs
        self._host_cids: dict[int, CidRecord] = {}
        self._host_cid_seq = 0
        self._cid_to_path: dict[bytes, int] = {}
        self._peer_cids: list[CidRecord] = []
        self._peer_cid_seqs: set[int] = set()
        self._peer_retire_prior_to = 0
        self._retire_pending: list[int] = []
        self._new_cid_pending: list[CidRecord] = []
        self._reset_tokens: set[bytes] = set()
        # multipath (draft-ietf-quic-multipath): on when both sides sent initial_max_path_id
        self._multipath = False
        self._local_max_path_id = cfg.initial_max_path_id or 0
        self._peer_max_path_id = 0
        self._mp_host_cids: dict[int, dict[int, CidRecord]] = {}  # path id (>= 1) -> seq -> our CID
        self._mp_host_seq: dict[int, int] = {}
        self._mp_peer_cids: dict[int, list[CidRecord]] = {}  # path id (>= 1) -> the peer's CIDs for it
        self._mp_retire_pending: list[tuple[int, int]] = []  # (path id, seq) for PATH_RETIRE_CONNECTION_ID
        self.path_acks_received = 0
        self._path_status: dict[int, tuple[int, bool]] = {}  # path id -> (peer's status seq, available)
        self._local_backup: dict[int, bool] = {}  # path id -> we marked it backup (also before it opens)
        self._abandoned_path_ids: set[int] = set()  # never reused (the nonce must stay unique)
        self._path_abandon_pending: list[tuple[int, int]] = []  # (path id, error code) for PATH_ABANDON
        self._path_status_seq: dict[int, int] = {}  # path id -> sequence number of our newest PATH_STATUS
        self._path_status_pending: dict[int, bool] = {}  # path id -> available? (newest status still to send)
        self._max_path_id_pending = False
        self.paths_forgotten = 0
        host = self._new_host_cid(announce=False)
        self.host_cid = host.cid  # our SCID of the handshake

        if self.is_client:
            self._original_dcid = os.urandom(8)
            peer = CidRecord(self._original_dcid, 0, None)
        else:
            self._original_dcid = original_destination_connection_id
            peer = CidRecord(peer_initial_cid or b"", 0, None)
            # Initial packets may still arrive addressed to the client's chosen DCID (after a Retry: the Retry's SCID)
            self._cid_to_path[retry_source_connection_id or original_destination_connection_id] = 0
        self._retry_scid = retry_source_connection_id
        self._retry_token = b""
        self._peer_initial_scid: bytes | None = None

        # the handshake path (path 0)
        self._paths: dict[int, Path] = {}
        self._path0 = self._new_path(0, None, None)
        peer.in_use = True
        self._path0.peer_cid = peer
        if not self.is_client:
            self._path0.state = PathState.ACTIVE

        # packet number spaces of the handshake (sent on path 0)
        self._initial_space = PacketSpace("initial", INITIAL)
        self._handshake_space = PacketSpace("handshake", HANDSHAKE)
        rec = self._path0.recovery
        rec.spaces.insert(0, self._initial_space.sent)
        rec.spaces.insert(1, self._handshake_space.sent)

        # packet protection: [epoch] -> key / header protection
        self._send_key: list[PacketKey | None] = [None] * 4
        self._send_hp: list[HeaderProtection | None] = [None] * 4
        self._recv_key: list[PacketKey | None] = [None] * 4
        self._recv_hp: list[HeaderProtection | None] = [None] * 4
        # RFC 9001 §5.2: Initial keys come from the client's DCID, which after a Retry is the Retry's SCID
        self._setup_initial_keys(self._original_dcid if self.is_client else
                                 (retry_source_connection_id or self._original_dcid))
        # 1-RTT key update state
        self._key_phase = 0  # our send phase
        self._recv_key_phase = 0
        self._recv_key_next: PacketKey | None = None
        self._recv_key_prev: PacketKey | None = None
        self._recv_key_prev_until = 0.0
        self._key_update_pending_ack: int | None = None  # first PN sent in the current phase, until acked
        self._key_update_path = None  # the path (packet number space) of that PN
        self._key_update_not_before = 0.0  # multipath: 3 x the largest PTO after the last update was acked
        self._key_update_requested = False
        self._packets_in_phase = 0
        self.key_updates = 0

        # crypto streams per epoch (Initial, Handshake, 1-RTT)
        self._crypto = {e: _CryptoStream() for e in (INITIAL, HANDSHAKE, ONE_RTT)}

        # TLS
        self.tls = self._make_tls()
        self._tls_out = {e: Buffer(capacity=1 << 16) for e in tls.Epoch}
        self._handshake_complete = False
        self._handshake_confirmed = False
        self._handshake_done_pending = False
        self._peer_params: TransportParameters | None = None
        self.alpn_protocol: str | None = None

        # streams and flow control
        self._streams: dict[int, QuicStream] = {}
        self._stream_queue: dict[int, QuicStream] = {}  # streams with something to send, in round-robin order
        self._local_max_data = cfg.initial_max_data
        self._local_max_data_sent = cfg.initial_max_data
        self._data_received = 0
        self._data_consumed = 0
        self._max_data_pending = False
        self._remote_max_data = 0
        self._data_sent = 0
        self._data_blocked_sent_at: int | None = None
        self._data_blocked_pending = False
        self._local_max_streams = [cfg.initial_max_streams_bidi, cfg.initial_max_streams_uni]
        self._local_max_streams_pending = [False, False]
        self._peer_streams_closed = [0, 0]
        self._remote_max_streams = [0, 0]
        self._next_stream_index = [0, 0]  # bidi, uni
        self._peer_streams_opened = [0, 0]
        self._streams_blocked_pending = [False, False]

        # DATAGRAM frames
        self._datagrams: deque[bytes] = deque()  # shared queue; paths have their own too (path.dgrams)
        self._datagram_limit = cfg.datagram_queue_limit
        self._scheduler = create_scheduler(cfg.scheduler, self, cfg.datagram_queue_limit)
        self._remote_max_datagram = 0
        self._datagram_room = 0
        self._room_mtu = MIN_UDP_PAYLOAD  # the path MTU the room was computed from
        # DATAGRAM frames of any size a UDP datagram can carry fit under our advertised limit (<= 65535)
        self._accept_datagrams = (cfg.max_datagram_frame_size or 0) >= MAX_UDP_DATAGRAM_FRAME
        self.datagrams_dropped = 0  # queue full or too large
        self.datagrams_received = 0
        self.datagrams_sent = 0

        # misc
        self._ping_pending: list[int] = []
        self._close_frame: tuple[int, int | None, str, bool] | None = None
        self._close_at: float | None = None
        self._close_last_sent = -1.0
        self._close_needs_send = False
        self._idle_timeout = cfg.idle_timeout
        self._idle_period = cfg.idle_timeout or 3600.0  # effective idle timeout, kept current (RFC 9000 §10.1)
        self._keepalive = cfg.keepalive_interval
        self._last_rx_at = 0.0
        self._idle_at: float | None = None
        self._last_ack_eliciting_sent_since_rx = False
        self.packets_received = 0
        self.packets_dropped = 0
        self.decrypt_failures = 0
        self._now = 0.0
        self._rx_path: Path = self._path0
        self._rx_epoch = INITIAL
        self._rx_ack_eliciting = False
        self._rx_cid: bytes | None = None  # DCID of the 1-RTT packet being processed
        self._handlers = self._frame_handlers()
        self._qlog = cfg.qlog

    # ------------------------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------------------------

    @property
    def host_cids(self) -> list[bytes]:
        cids = [r.cid for r in self._host_cids.values() if not r.retired]
        if not self.is_client and not self._handshake_confirmed:
            cids.append(self._retry_scid or self._original_dcid)
        return cids

    @property
    def original_destination_connection_id(self) -> bytes:
        return self._original_dcid

    @property
    def handshake_complete(self) -> bool:
        return self._handshake_complete

    @property
    def paths(self) -> list[Path]:
        return list(self._paths.values())

    @property
    def peer_transport_parameters(self) -> TransportParameters | None:
        return self._peer_params

    @property
    def multipath(self) -> bool:
        """Both sides offered the multipath extension (initial_max_path_id)."""
        return self._multipath

    @property
    def peer_max_datagram_frame_size(self) -> int | None:
        return self._peer_params.max_datagram_frame_size if self._peer_params else None

    def key_phases(self) -> tuple[int, int]:
        """(send, receive) 1-RTT key phase bits."""
        return self._key_phase, self._recv_key_phase

    def connect(self, remote_addr, now: float, local_addr=None) -> None:
        """Client: start the handshake towards ``remote_addr``."""
        assert self.is_client and self.state == ConnectionState.FIRSTFLIGHT
        path = self._path0
        path.remote_addr = remote_addr
        path.local_addr = local_addr
        path.validated = True  # we trust the address we chose
        self._now = now
        self._idle_at = now + self._idle_timeout
        if self._qlog is not None:
            self._qlog.set_start_time(now)
            self._qlog.event(now, "quic:connection_started", {
                "src_ip": str(local_addr[0]) if local_addr else None, "dst_ip": str(remote_addr[0]),
                "dst_port": remote_addr[1]})
        self._tls_step(b"")

    def next_event(self):
        try:
            return self._events.popleft()
        except IndexError:
            return None

    def get_next_available_stream_id(self, is_unidirectional: bool = False) -> int:
        kind = 1 if is_unidirectional else 0
        return self._next_stream_index[kind] * 4 + (2 if is_unidirectional else 0) + (0 if self.is_client else 1)

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        stream = self._get_or_open_local_stream(stream_id)
        if stream.sender is None:
            raise ValueError(f"stream {stream_id} is receive-only")
        stream.sender.write(data, end_stream)
        self._stream_queue[stream_id] = stream

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        stream = self._get_or_open_local_stream(stream_id)
        if stream.sender is None:
            raise ValueError(f"stream {stream_id} is receive-only")
        stream.sender.reset(error_code)
        self._stream_queue[stream_id] = stream

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.receiver is None:
            raise ValueError(f"stream {stream_id} has no receiving part")
        stream.receiver.stop(error_code)
        self._stream_queue[stream_id] = stream

    @property
    def datagram_room(self) -> int:
        """The largest DATAGRAM payload that fits in one packet on every active path now (0: not negotiated)."""
        return self._datagram_room

    def _update_datagram_room(self) -> None:
        if not self._remote_max_datagram:
            self._datagram_room = 0
            return
        # paths still searching their PMTU (a path just opened) do not shrink the room: they carry no DATAGRAMs
        # until their MTU reaches it (scheduler); when no path has finished a search, the smallest MTU counts
        active = [p for p in self._paths.values() if p.state == PathState.ACTIVE]
        sized = [p for p in active if p.pmtud_next_at is not None] if self.configuration.pmtud else active
        mtu = min((p.mtu for p in (sized or active)), default=MIN_UDP_PAYLOAD)
        self._room_mtu = mtu
        # the room must not change with the packet number length or the CID: count the largest of both
        room = mtu - (1 + 20 + MAX_PN_LEN) - AEAD_TAG_SIZE - 1
        self._datagram_room = max(0, min(room, self._remote_max_datagram - 1))

    def send_datagram_frame(self, data: bytes, flow: int = 0) -> bool:
        """Queue a DATAGRAM frame. Returns False (and counts it) when it is dropped: too large or queue full.

        ``flow``: with several paths, DATAGRAMs of the same non-zero flow (e.g. a hash of an inner TCP 5-tuple)
        stay on one path when the scheduler can (``wlb``); 0: no flow, any path; negative: the flow ``-flow`` is
        ending (its FIN or RST) and no longer counts as load."""
        if len(data) > self._datagram_room or not self._scheduler.enqueue(data, flow):
            self.datagrams_dropped += 1
            return False
        return True

    @property
    def scheduler(self):
        """The multipath DATAGRAM scheduler (quic/scheduler.py)."""
        return self._scheduler

    def set_path_status(self, path_id: int, available: bool) -> None:
        """Tell the peer whether to use a path normally (PATH_STATUS_AVAILABLE) or only when no available path
        works (PATH_STATUS_BACKUP); we follow the same rule for our own sending. Path IDs not opened yet are fine
        (draft-ietf-quic-multipath §3.3)."""
        if not self._multipath:
            raise RuntimeError("path status needs multipath")
        self._path_status_seq[path_id] = self._path_status_seq.get(path_id, -1) + 1
        self._path_status_pending[path_id] = available
        self._local_backup[path_id] = not available
        path = self._paths.get(path_id)
        if path is not None:
            path.local_backup = not available

    def send_ping(self, uid: int) -> None:
        self._ping_pending.append(uid)

    def request_key_update(self) -> None:
        if not self._handshake_confirmed:
            raise RuntimeError("a key update needs a confirmed handshake")
        self._key_update_requested = True

    def close(self, error_code: int = 0, reason_phrase: str = "", frame_type: int | None = None,
              application: bool = True) -> None:
        if self.state >= ConnectionState.CLOSING:
            return
        self._close_frame = (error_code, frame_type, reason_phrase, application)
        self._qlog_closed(error_code, reason_phrase, False)
        self._enter_closing(self._now)
        self._events.append(ev.ConnectionTerminated(error_code, frame_type, reason_phrase, False))

    # ------------------------------------------------------------------------------------------------------------
    # receive
    # ------------------------------------------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, remote_addr, now: float, local_addr=None) -> None:
        self._now = now
        if self.state >= ConnectionState.DRAINING:
            return
        if self.state == ConnectionState.CLOSING:
            self._close_needs_send = True
            return
        size = len(data)
        offset = 0
        cid_len = self._cid_len
        while offset < size:
            first = data[offset]
            if not first & 0x80:
                # short header: the 1-RTT packet runs to the end of the datagram
                dcid = data[offset + 1: offset + 1 + cid_len]
                self._receive_short(data, offset, dcid, remote_addr, local_addr, now)
                return
            try:
                header = parse_header(data, offset, cid_len)
            except QuicProtocolError:
                self.packets_dropped += 1
                return
            offset = self._receive_long(header, data, offset, remote_addr, local_addr, now, size)
            if offset is None:
                return

    def _receive_long(self, header, data, offset, remote_addr, local_addr, now, size):
        ptype = header.packet_type
        if header.version != QUIC_VERSION_1:
            if ptype == PacketType.VERSION_NEGOTIATION and self.is_client and self.state == ConnectionState.FIRSTFLIGHT:
                if QUIC_VERSION_1 not in (header.supported_versions or ()):
                    self._terminate_now("no common QUIC version", QuicErrorCode.CONNECTION_REFUSED)
            self.packets_dropped += 1
            return None
        if ptype == PacketType.RETRY:
            self._receive_retry(header, data)
            return None
        if ptype == PacketType.ZERO_RTT:  # we never offer 0-RTT
            self.packets_dropped += 1
            return header.packet_end
        epoch = PACKET_TYPE_EPOCH[ptype]
        hp = self._recv_hp[epoch]
        key = self._recv_key[epoch]
        space = self._initial_space if epoch == INITIAL else self._handshake_space
        if hp is None or key is None or space.discarded:
            self.packets_dropped += 1
            return header.packet_end
        if self.is_client and self._peer_initial_scid is not None and epoch == INITIAL \
                and header.scid != self._peer_initial_scid:
            self.packets_dropped += 1
            return header.packet_end
        packet = data[offset:header.packet_end] if offset or header.packet_end != size else data
        try:
            plain_header, truncated, pn_len = unprotect_header(hp, packet, header.pn_offset - offset)
            pn = decode_packet_number(truncated, pn_len * 8, space.largest_received + 1)
            payload = open_payload(key, plain_header, packet, len(packet), pn)
            if plain_header[0] & 0x0C:  # checked only once the packet is authentic (RFC 9000 §17.2)
                raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "reserved bits set")
        except CryptoError:
            self.decrypt_failures += 1
            return header.packet_end
        except QuicProtocolError as exc:
            self._protocol_error(exc)
            return None
        path = self._path0
        if self.is_client and epoch == INITIAL and self._peer_initial_scid is None:
            # the server chose its CID: from now on we address it with that one
            self._peer_initial_scid = header.scid
            path.peer_cid.cid = header.scid
        if epoch == HANDSHAKE and not self.is_client:
            # a Handshake packet proves the client owns its address; Initial keys go
            path.validated = True
            path.recovery.peer_completed_address_validation = True
            self._discard_epoch(INITIAL)
        if not self.is_client and path.remote_addr is None:
            path.remote_addr = remote_addr
            path.local_addr = local_addr
        path.bytes_received += header.packet_end - offset
        self._rx_cid = None
        self._process_packet(path, epoch, space, pn, payload, now)
        return header.packet_end

    def _receive_short(self, data, offset, dcid, remote_addr, local_addr, now) -> None:
        path_id = self._cid_to_path.get(dcid)
        hp = self._recv_hp[ONE_RTT]
        if path_id is None or hp is None:
            if self._is_stateless_reset(data):
                self._terminate_now("stateless reset", QuicErrorCode.NO_ERROR, draining=True)
            else:
                self.packets_dropped += 1
            return
        path = self._paths.get(path_id)
        if path is None and self._multipath and self._handshake_confirmed and not self.is_client:
            path = self._accept_path(path_id, local_addr, remote_addr)
        if path is None or path.state == PathState.ABANDONED:
            self.packets_dropped += 1
            return
        space = path.space
        if offset:
            data = data[offset:]
            offset = 0
        try:
            plain_header, truncated, pn_len = unprotect_header(hp, data, 1 + self._cid_len)
            first = plain_header[0]
            pn = decode_packet_number(truncated, pn_len * 8, space.largest_received + 1)
            phase = (first >> 2) & 1
            key = self._recv_key[ONE_RTT]
            if phase == self._recv_key_phase:
                payload = open_payload(key, plain_header, data, len(data), pn, path_id)
            elif self._recv_key_prev is not None and pn < path.key_phase_start_pn:
                payload = open_payload(self._recv_key_prev, plain_header, data, len(data), pn, path_id)
            else:
                payload = self._receive_key_update(plain_header, data, pn, path, now)
            if first & 0x18:  # checked only once the packet is authentic (RFC 9000 §17.3.1)
                raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "reserved bits set")
        except CryptoError:
            self.decrypt_failures += 1
            if self._is_stateless_reset(data):
                self._terminate_now("stateless reset", QuicErrorCode.NO_ERROR, draining=True)
            return
        except QuicProtocolError as exc:
            self._protocol_error(exc)
            return
        # RFC 9000 §9.3: only the largest-numbered packet so far moves a path to a new address (a reordered
        # packet from before a NAT rebinding must not move it back)
        if remote_addr != path.remote_addr and path.remote_addr is not None and pn > space.largest_received:
            self._on_peer_address_change(path, remote_addr, local_addr)
        path.bytes_received += len(data) - offset
        self._rx_cid = dcid  # RETIRE_CONNECTION_ID must not retire the CID its own packet was sent to
        self._process_packet(path, ONE_RTT, space, pn, payload, now)

    def _receive_key_update(self, plain_header, data, pn, path, now) -> bytes:
        """The peer flipped the key phase: decrypt with the next keys, then switch (RFC 9001 §6)."""
        if not self._handshake_confirmed:
            raise QuicProtocolError(QuicErrorCode.KEY_UPDATE_ERROR, "key update before handshake confirmed")
        nxt = self._recv_key_next or self._recv_key[ONE_RTT].next_generation()
        payload = open_payload(nxt, plain_header, data, len(data), pn, path.path_id)
        initiated_locally = self._key_phase != self._recv_key_phase
        self._recv_key_prev = self._recv_key[ONE_RTT]
        self._recv_key_prev_until = now + 3 * self._max_pto()
        self._recv_key[ONE_RTT] = nxt
        self._recv_key_next = nxt.next_generation()
        self._recv_key_phase ^= 1
        for p in self._paths.values():
            p.key_phase_start_pn = p.space.largest_received + 1 if p is not path else pn
        if not initiated_locally:
            self._rotate_send_key()
            self.key_updates += 1
            self._events.append(ev.KeyUpdated(self._recv_key_phase, False))
        return payload

    def _process_packet(self, path: Path, epoch: int, space: PacketSpace, pn: int, payload: bytes,
                        now: float) -> None:
        if pn <= space.largest_received and space.is_duplicate(pn):
            self.packets_dropped += 1
            return
        if payload[0] == 0x30 and epoch == ONE_RTT and self._accept_datagrams:
            # hot path: a packet that is one DATAGRAM frame (no length: it runs to the end of the packet)
            self._rx_ack_eliciting = True
            self.datagrams_received += 1
            handler = self.datagram_handler
            if handler is not None:
                handler(payload[1:])
            else:
                self._events.append(ev.DatagramFrameReceived(payload[1:]))
        else:
            self._rx_path = path
            self._rx_epoch = epoch
            self._rx_ack_eliciting = False
            try:
                self._process_frames(payload, EPOCH_BITS[epoch], space, now)
            except QuicProtocolError as exc:
                self._protocol_error(exc)
                return
        self.packets_received += 1
        path.packets_received += 1
        if self._qlog is not None:
            self._qlog_packet("quic:packet_received", epoch, path, pn, len(payload))
        self._idle_at = now + self._idle_period
        self._last_rx_at = now
        path.last_rx_at = now
        self._last_ack_eliciting_sent_since_rx = False
        # record for ACK
        out_of_order = pn != space.largest_received + 1
        space.ack_queue.add(pn)
        if pn > space.largest_received:
            space.largest_received = pn
            space.largest_received_time = now
        if len(space.ack_queue) > MAX_ACK_RANGES:
            space.forget_oldest_range()
        if self._rx_ack_eliciting:
            space.ack_eliciting_pending += 1
            if epoch != ONE_RTT or out_of_order or space.ack_eliciting_pending >= ACK_ELICITING_THRESHOLD:
                space.ack_now = True
            elif space.ack_at is None:
                space.ack_at = now + self.configuration.max_ack_delay

    def _process_frames(self, payload: bytes, epoch_bit: int, space: PacketSpace, now: float) -> None:
        buf = Buffer(data=payload)
        handlers = self._handlers
        allowed = F.frame_allowed
        ack_eliciting = F.ACK_ELICITING
        end = len(payload)
        if end == 0:
            raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "packet without frames")
        try:
            while buf.tell() < end:
                frame_type = buf.pull_uint_var()
                if frame_type == 0:  # PADDING: skip the whole run
                    pos = buf.tell()
                    rest = payload[pos:]
                    buf.seek(end - len(rest.lstrip(b"\x00")))
                    continue
                handler = handlers.get(frame_type)
                if handler is None:
                    raise QuicProtocolError(QuicErrorCode.FRAME_ENCODING_ERROR, "unknown frame type", frame_type)
                if not allowed(frame_type, epoch_bit):
                    raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION,
                                            "frame not allowed in this packet type", frame_type)
                handler(buf, frame_type, space)
                if frame_type in ack_eliciting:
                    self._rx_ack_eliciting = True
        except BufferReadError:
            raise QuicProtocolError(QuicErrorCode.FRAME_ENCODING_ERROR, "truncated frame", None) from None

    # ------------------------------------------------------------------------------------------------------------
    # timers
    # ------------------------------------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        state = self.state
        if state == ConnectionState.TERMINATED:
            return None
        if state >= ConnectionState.CLOSING:
            return self._close_at
        deadline = self._idle_at
        for path in self._paths.values():
            if path.state == PathState.ABANDONED:
                if path.forget_at is not None and (deadline is None or path.forget_at < deadline):
                    deadline = path.forget_at
                continue
            if path.dead_since is not None:
                t = path.dead_since + DEAD_PATH_ABANDON
                if deadline is None or t < deadline:
                    deadline = t
            rec = path.recovery
            t = rec.get_loss_detection_time()
            if t is not None and (deadline is None or t < deadline):
                deadline = t
            t = path.space.ack_at
            if t is not None and (deadline is None or t < deadline):
                deadline = t
            if self._datagrams or path.dgrams or self._stream_queue:
                t = rec.pacer.next_send_time(self._now)
                if t is not None and (deadline is None or t < deadline):
                    deadline = t
            if path.challenge_sent_at is not None:
                t = path.challenge_sent_at + 3 * rec.pto_duration()
                if deadline is None or t < deadline:
                    deadline = t
            if path.pmtud_next_at is not None and (deadline is None or path.pmtud_next_at < deadline):
                deadline = path.pmtud_next_at
        if self._recv_key_prev is not None and (deadline is None or self._recv_key_prev_until < deadline):
            deadline = self._recv_key_prev_until
        if self._keepalive and self._handshake_confirmed:
            t = self._last_rx_at + self._keepalive
            if deadline is None or t < deadline:
                deadline = t
            if self._multipath:
                for path in self._paths.values():
                    if path.state == PathState.ACTIVE:
                        t = path.last_rx_at + self._keepalive
                        if t < deadline:
                            deadline = t
        return deadline

    def handle_timer(self, now: float) -> None:
        self._now = now
        state = self.state
        if state == ConnectionState.TERMINATED:
            return
        if state >= ConnectionState.CLOSING:
            if self._close_at is not None and now >= self._close_at:
                self.state = ConnectionState.TERMINATED
            return
        if self._idle_at is not None and now >= self._idle_at:
            self._events.append(ev.ConnectionTerminated(QuicErrorCode.NO_ERROR, None, "idle timeout", False))
            self._qlog_closed(0, "idle timeout", False)
            self.state = ConnectionState.TERMINATED
            return
        for path in list(self._paths.values()):
            if path.state == PathState.ABANDONED:
                if path.forget_at is not None and now >= path.forget_at:
                    self._forget_path(path)
                continue
            rec = path.recovery
            t = rec.get_loss_detection_time()
            if t is not None and now >= t:
                space_sent = rec.on_loss_detection_timeout(now)
                if space_sent is not None:
                    space = self._space_for_sent(path, space_sent)
                    if space is not None:
                        space.probes = 2 if space.epoch != ONE_RTT or rec.pto_count > 1 else 1
                        rec.reschedule(space_sent)
                    if (self._multipath and rec.pto_count >= DEAD_PATH_PTOS and path.dead_since is None
                            and self._handshake_confirmed
                            and any(p is not path and p.state == PathState.ACTIVE and p.dead_since is None
                                    for p in self._paths.values())):
                        # its PTOs pile up while another path works: this path is dead, the connection is not.
                        # It carries nothing but probes (about once a second) until one is acknowledged.
                        path.dead_since = now
                        self._events.append(ev.PathLiveness(path.path_id, False))
            if path.dead_since is not None and now - path.dead_since >= DEAD_PATH_ABANDON:
                self._abandon(path, PATH_UNSTABLE_OR_POOR, announce=True)
                continue
            if path.challenge_sent_at is not None and now >= path.challenge_sent_at + 3 * rec.pto_duration():
                if path.challenge_tries >= PATH_CHALLENGE_TRIES:
                    path.challenge = None
                    path.challenge_sent_at = None
                    self._on_path_validation_failed(path)
                else:
                    path.challenge_sent_at = None  # send again
            if path.pmtud_next_at is not None and now >= path.pmtud_next_at:
                path.pmtud_next_at = None
                path.pmtud_high = 0  # PMTU raise timer: search again up to the ceiling
            if path.space.ack_at is not None and now >= path.space.ack_at:
                path.space.ack_now = True
        if self._recv_key_prev is not None and now >= self._recv_key_prev_until:
            self._recv_key_prev = None
        if self._keepalive and self._multipath and self._handshake_confirmed:
            # every path gets its own keep-alive: its NAT binding stays, and a dead idle path shows
            for path in self._paths.values():
                if path.state == PathState.ACTIVE and now >= path.last_rx_at + self._keepalive:
                    path.last_rx_at = now
                    path.ping_due = True
        if self._keepalive and self._handshake_confirmed and now >= self._last_rx_at + self._keepalive:
            self._last_rx_at = now  # one PING per interval while the peer stays silent
            self._ping_pending.append(KEEPALIVE_PING)

    def _space_for_sent(self, path: Path, sent) -> PacketSpace | None:
        if sent is path.space.sent:
            return path.space
        if sent is self._initial_space.sent:
            return self._initial_space
        if sent is self._handshake_space.sent:
            return self._handshake_space
        return None

    def _update_idle_period(self) -> None:
        self._idle_period = self._effective_idle_timeout()

    def _effective_idle_timeout(self) -> float:
        local = self._idle_timeout
        peer = self._peer_params.max_idle_timeout / 1000.0 if self._peer_params else 0.0
        if local and peer:
            timeout = min(local, peer)
        else:
            timeout = local or peer or 3600.0
        return max(timeout, 3 * self._max_pto())

    def _max_pto(self) -> float:
        """The largest PTO among the paths in use (those with an RTT sample, if any has one)."""
        paths = [p for p in self._paths.values() if p.state != PathState.ABANDONED] or list(self._paths.values())
        sampled = [p for p in paths if p.recovery.rtt.has_sample] or paths
        return max((p.recovery.pto_duration() for p in sampled), default=1.0)

    # ------------------------------------------------------------------------------------------------------------
    # close and drain
    # ------------------------------------------------------------------------------------------------------------

    def _protocol_error(self, exc: QuicProtocolError) -> None:
        if self.state >= ConnectionState.CLOSING:
            return
        self._close_frame = (exc.error_code, exc.frame_type, exc.reason, False)
        self._qlog_closed(exc.error_code, exc.reason, False)
        self._enter_closing(self._now)
        self._events.append(ev.ConnectionTerminated(exc.error_code, exc.frame_type, exc.reason, False))

    def _qlog_closed(self, code: int, reason: str, by_peer: bool) -> None:
        if self._qlog is not None:
            self._qlog.event(self._now, "quic:connection_closed", {
                "owner": "remote" if by_peer else "local", "connection_code": code, "reason": reason})

    def _qlog_packet(self, name: str, epoch: int, path: Path, pn: int, size: int) -> None:
        self._qlog.event(self._now, name, {
            "header": {"packet_type": ("initial", "0RTT", "handshake", "1RTT")[epoch], "packet_number": pn,
                       "path_id": path.path_id},
            "raw": {"length": size}})

    def _enter_closing(self, now: float) -> None:
        self.state = ConnectionState.CLOSING
        self._close_at = now + 3 * self._max_pto()
        self._close_needs_send = True
        self._close_last_sent = -1.0

    def _enter_draining(self, now: float) -> None:
        if self.state >= ConnectionState.DRAINING:
            return
        self.state = ConnectionState.DRAINING
        self._close_at = now + 3 * self._max_pto()

    def _terminate_now(self, reason: str, code: int, draining: bool = False) -> None:
        if self.state >= ConnectionState.DRAINING:
            return
        self._events.append(ev.ConnectionTerminated(code, None, reason, draining))
        if draining:
            self._enter_draining(self._now)
        else:
            self.state = ConnectionState.TERMINATED

    def _close_path(self) -> Path:
        """The path CONNECTION_CLOSE goes out on: the handshake path unless it was abandoned."""
        if self._path0.state != PathState.ABANDONED:
            return self._path0
        return next((p for p in self._paths.values() if p.state != PathState.ABANDONED), self._path0)

    def _build_close_datagram(self) -> bytes | None:
        error_code, frame_type, reason, application = self._close_frame
        path = self._close_path()
        packets = []
        for epoch in (INITIAL, HANDSHAKE, ONE_RTT):
            if self._send_key[epoch] is None:
                continue
            app = application
            code = error_code
            if app and epoch != ONE_RTT:
                # RFC 9000 §10.2.3: no application close before 1-RTT; send APPLICATION_ERROR instead
                app, code, reason_e = False, QuicErrorCode.APPLICATION_ERROR, ""
            else:
                reason_e = reason
            if epoch == ONE_RTT:
                space = path.space
                pkt = _Packet(ONE_RTT, space, path.mtu - 64)
            else:
                space = self._initial_space if epoch == INITIAL else self._handshake_space
                pkt = _Packet(epoch, space, MIN_UDP_PAYLOAD - 100)
            F.push_connection_close(pkt.buf, code, frame_type or 0, reason_e[:512], application=app)
            if epoch == ONE_RTT:
                packets.append(self._finish_short_packet(pkt, path, path.recovery, self._now, 0))
            else:
                packets.append(self._finish_long_packet(pkt, path, path.recovery, self._now,
                                                        MIN_UDP_PAYLOAD if epoch == INITIAL and self.is_client else 0))
            if epoch == ONE_RTT or self._handshake_confirmed:
                break
        if not packets:
            return None
        return b"".join(packets)
