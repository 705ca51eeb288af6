"""The QUIC connection: a sans-I/O state machine (RFC 9000, 9001, 9002, 9221, 8899).

Datagrams and the current time go in (``receive_datagram``, ``handle_timer``); datagrams to send come out
(``datagrams_to_send``), with the next deadline (``get_timer``) and events (``next_event``).

Layout of this file, top to bottom:
  1. construction, public API
  2. receive: datagram -> packets -> frames (one handler per frame type)
  3. send: packets built per path, with a lean path for DATAGRAM-only packets
  4. timers, TLS glue, connection IDs, close/drain

Per-path state (PN space, recovery, CC, PMTU, validation) lives in ``Path`` (path.py), so multipath adds paths,
not branches. Initial and Handshake spaces belong to the connection and are sent on path 0.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from enum import IntEnum

from aioquic import tls

from mqvpn.quic import events as ev
from mqvpn.quic import frames as F
from mqvpn.quic.buffer import Buffer, BufferReadError, size_uint_var
from mqvpn.quic.config import MIN_UDP_PAYLOAD, QuicConfiguration
from mqvpn.quic.crypto import (
    CryptoError,
    HeaderProtection,
    PacketKey,
    derive_initial_secrets,
    open_payload,
    protect_packet,
    stateless_reset_token,
    unprotect_header,
)
from mqvpn.quic.errors import QuicErrorCode, QuicProtocolError
from mqvpn.quic.packet import (
    QUIC_VERSION_1,
    PacketType,
    decode_packet_number,
    encode_long_header,
    encode_packet_number,
    parse_header,
    verify_retry_integrity,
)
from mqvpn.quic.path import ACK_ELICITING_THRESHOLD, MAX_ACK_RANGES, CidRecord, PacketSpace, Path, PathState
from mqvpn.quic.recovery import Recovery, SentPacket
from mqvpn.quic.stream import QuicStream, StreamReceiver, StreamSender
from mqvpn.quic.tparams import TransportParameters, decode_transport_parameters, encode_transport_parameters

INITIAL, ZERO_RTT, HANDSHAKE, ONE_RTT = 0, 1, 2, 3
EPOCH_BITS = (F.INITIAL, F.ZERO_RTT, F.HANDSHAKE, F.ONE_RTT)
PACKET_TYPE_EPOCH = {PacketType.INITIAL: INITIAL, PacketType.ZERO_RTT: ZERO_RTT, PacketType.HANDSHAKE: HANDSHAKE}
EPOCH_PACKET_TYPE = {INITIAL: PacketType.INITIAL, HANDSHAKE: PacketType.HANDSHAKE}
TLS_EPOCH = {tls.Epoch.INITIAL: INITIAL, tls.Epoch.ZERO_RTT: ZERO_RTT, tls.Epoch.HANDSHAKE: HANDSHAKE,
             tls.Epoch.ONE_RTT: ONE_RTT}

AEAD_TAG_SIZE = 16
MAX_UDP_DATAGRAM_FRAME = 1 << 14  # with a larger advertised limit, the hot path skips the per-frame size check
MAX_PN_LEN = 4
CRYPTO_BUFFER_LIMIT = 1 << 17  # out-of-order CRYPTO data we hold per epoch
CLOSE_FRAME_RATE = 0.05  # at most one CONNECTION_CLOSE per 50 ms while closing
PATH_CHALLENGE_TRIES = 3
PMTUD_RAISE_INTERVAL = 600.0  # RFC 8899 PMTU_RAISE_TIMER
PMTUD_MAX_PROBES = 2  # losses of one probe size before it is ruled out (RFC 8899 MAX_PROBES is 3)
PMTUD_STEP_MIN = 8


class ConnectionState(IntEnum):
    FIRSTFLIGHT = 0
    CONNECTED = 1
    CLOSING = 2
    DRAINING = 3
    TERMINATED = 4


class _Packet:
    """A packet under construction (one per built packet; the DATAGRAM fast path does not use it)."""

    __slots__ = ("epoch", "space", "buf", "handlers", "ack_eliciting", "in_flight", "is_mtu_probe", "pad_to")

    def __init__(self, epoch: int, space: PacketSpace, capacity: int) -> None:
        self.epoch = epoch
        self.space = space
        self.buf = Buffer(capacity=max(capacity, 0))
        self.handlers: list = []
        self.ack_eliciting = False
        self.in_flight = False
        self.is_mtu_probe = False
        self.pad_to = 0


class _CryptoStream:
    """CRYPTO frames of one encryption level: an ordered byte stream without flow control (bounded buffer)."""

    __slots__ = ("sender", "receiver")

    def __init__(self) -> None:
        self.sender = StreamSender(0, 1 << 62)
        self.receiver = StreamReceiver(0, CRYPTO_BUFFER_LIMIT)


class QuicConnection:
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
        self._datagrams: deque[bytes] = deque()
        self._datagram_limit = cfg.datagram_queue_limit
        self._remote_max_datagram = 0
        self._datagram_room = 0
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
        self._idle_at: float | None = None
        self._last_ack_eliciting_sent_since_rx = False
        self.packets_received = 0
        self.packets_dropped = 0
        self.decrypt_failures = 0
        self._now = 0.0
        self._rx_path: Path = self._path0
        self._rx_epoch = INITIAL
        self._rx_ack_eliciting = False
        self._rx_probing_only = True
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
        mtu = min((p.mtu for p in self._paths.values() if p.state != PathState.ABANDONED), default=MIN_UDP_PAYLOAD)
        # the room must not change with the packet number length or the CID: count the largest of both
        room = mtu - (1 + 20 + MAX_PN_LEN) - AEAD_TAG_SIZE - 1
        self._datagram_room = max(0, min(room, self._remote_max_datagram - 1))

    def send_datagram_frame(self, data: bytes) -> bool:
        """Queue a DATAGRAM frame. Returns False (and counts it) when it is dropped: too large or queue full."""
        if len(data) > self._datagram_room or len(self._datagrams) >= self._datagram_limit:
            self.datagrams_dropped += 1
            return False
        self._datagrams.append(data)
        return True

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
        if remote_addr != path.remote_addr and path.remote_addr is not None:
            self._on_peer_address_change(path, remote_addr, local_addr)
        path.bytes_received += len(data) - offset
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
            self._rx_probing_only = True
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
        except BufferReadError:
            raise QuicProtocolError(QuicErrorCode.FRAME_ENCODING_ERROR, "truncated frame", None) from None

    def _frame_handlers(self) -> dict[int, Callable]:
        h: dict[int, Callable] = {
            F.FrameType.PING: self._on_ping,
            F.FrameType.ACK: self._on_ack,
            F.FrameType.ACK_ECN: self._on_ack,
            F.FrameType.RESET_STREAM: self._on_reset_stream,
            F.FrameType.STOP_SENDING: self._on_stop_sending,
            F.FrameType.CRYPTO: self._on_crypto,
            F.FrameType.NEW_TOKEN: self._on_new_token,
            F.FrameType.MAX_DATA: self._on_max_data,
            F.FrameType.MAX_STREAM_DATA: self._on_max_stream_data,
            F.FrameType.MAX_STREAMS_BIDI: self._on_max_streams,
            F.FrameType.MAX_STREAMS_UNI: self._on_max_streams,
            F.FrameType.DATA_BLOCKED: self._on_blocked,
            F.FrameType.STREAM_DATA_BLOCKED: self._on_stream_data_blocked,
            F.FrameType.STREAMS_BLOCKED_BIDI: self._on_streams_blocked,
            F.FrameType.STREAMS_BLOCKED_UNI: self._on_streams_blocked,
            F.FrameType.NEW_CONNECTION_ID: self._on_new_connection_id,
            F.FrameType.RETIRE_CONNECTION_ID: self._on_retire_connection_id,
            F.FrameType.PATH_CHALLENGE: self._on_path_challenge,
            F.FrameType.PATH_RESPONSE: self._on_path_response,
            F.FrameType.CONNECTION_CLOSE: self._on_connection_close,
            F.FrameType.APPLICATION_CLOSE: self._on_connection_close,
            F.FrameType.HANDSHAKE_DONE: self._on_handshake_done,
            F.FrameType.DATAGRAM: self._on_datagram,
            F.FrameType.DATAGRAM_WITH_LENGTH: self._on_datagram,
        }
        for t in range(0x08, 0x10):
            h[t] = self._on_stream
        return h

    # --- frame handlers: (buf positioned after the type, frame type, packet number space) ---

    def _on_ping(self, buf, frame_type, space) -> None:
        self._rx_ack_eliciting = True

    def _on_ack(self, buf, frame_type, space) -> None:
        ack = F.pull_ack(buf, frame_type == F.FrameType.ACK_ECN)
        self._handle_ack(self._path0 if space.epoch != ONE_RTT else self._rx_path, space, ack.ranges,
                         ack.ack_delay, frame_type)

    def _handle_ack(self, path: Path, space: PacketSpace, ranges, ack_delay_raw: int, frame_type: int) -> None:
        if not ranges:
            return
        largest = ranges[-1][1] - 1
        if largest >= space.next_pn:
            raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "ACK of a packet never sent", frame_type)
        if space.epoch == ONE_RTT:
            exponent = self._peer_params.ack_delay_exponent if self._peer_params else 3
            ack_delay = (ack_delay_raw << exponent) / 1e6
        else:
            ack_delay = 0.0
        rec = path.recovery
        rec.on_ack_received(space.sent, ranges, ack_delay, self._now, is_handshake_space=space.epoch != ONE_RTT)
        if self._qlog is not None:
            self._qlog.event(self._now, "recovery:metrics_updated", {
                "path_id": path.path_id, "congestion_window": rec.cc.congestion_window,
                "bytes_in_flight": rec.bytes_in_flight, "smoothed_rtt": round(rec.rtt.smoothed_rtt * 1000, 3),
                "min_rtt": round(rec.rtt.min_rtt * 1000, 3), "latest_rtt": round(rec.rtt.latest_rtt * 1000, 3)})
        if space.epoch == HANDSHAKE and self.is_client:
            rec.peer_completed_address_validation = True
        if rec.pto_count == 0 and rec.rtt.has_sample:
            self._update_idle_period()
        if self._key_update_pending_ack is not None and space.epoch == ONE_RTT \
                and largest >= self._key_update_pending_ack:
            self._key_update_pending_ack = None

    def _on_crypto(self, buf, frame_type, space) -> None:
        offset = buf.pull_uint_var()
        length = buf.pull_uint_var()
        if offset + length > (1 << 62) - 1:
            raise QuicProtocolError(QuicErrorCode.FRAME_ENCODING_ERROR, "crypto offset too large", frame_type)
        data = buf.pull_bytes(length)
        self._rx_ack_eliciting = True
        self._rx_probing_only = False
        epoch = self._rx_epoch
        receiver = self._crypto[epoch].receiver
        try:
            receiver.handle_frame(offset, data, False)
        except QuicProtocolError as exc:
            if exc.error_code == QuicErrorCode.FLOW_CONTROL_ERROR:
                raise QuicProtocolError(QuicErrorCode.CRYPTO_BUFFER_EXCEEDED, "crypto buffer exceeded",
                                        frame_type) from None
            raise
        while True:
            chunk = receiver.pull_data()
            if chunk is None:
                break
            data, _ = chunk
            if data:
                receiver.max_stream_data_frame()  # keep the crypto window open (never sent on the wire)
                self._tls_step(data, epoch)

    def _on_new_token(self, buf, frame_type, space) -> None:
        F.pull_new_token(buf)
        self._rx_ack_eliciting = True
        if not self.is_client:
            raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "NEW_TOKEN from a client", frame_type)

    def _on_stream(self, buf, frame_type, space) -> None:
        stream_id, offset, data, fin = F.pull_stream(buf, frame_type)
        self._rx_ack_eliciting = True
        self._rx_probing_only = False
        stream = self._get_or_open_peer_stream(stream_id, frame_type)
        if stream is None:
            return
        if stream.receiver is None:
            raise QuicProtocolError(QuicErrorCode.STREAM_STATE_ERROR, "STREAM on a send-only stream", frame_type)
        grew = stream.receiver.handle_frame(offset, data, fin)
        self._account_received(grew, frame_type)
        self._deliver_stream(stream)

    def _account_received(self, grew: int, frame_type: int) -> None:
        self._data_received += grew
        if self._data_received > self._local_max_data:
            raise QuicProtocolError(QuicErrorCode.FLOW_CONTROL_ERROR, "connection flow control exceeded", frame_type)

    def _deliver_stream(self, stream: QuicStream) -> None:
        receiver = stream.receiver
        while True:
            chunk = receiver.pull_data()
            if chunk is None:
                break
            data, fin = chunk
            self._data_consumed += len(data)
            self._events.append(ev.StreamDataReceived(stream.stream_id, data, fin))
        if receiver.control_pending:
            self._stream_queue[stream.stream_id] = stream
        if self._local_max_data - self._data_consumed < self.configuration.initial_max_data // 2:
            self._local_max_data = self._data_consumed + self.configuration.initial_max_data
            self._max_data_pending = True
        self._maybe_forget_stream(stream)

    def _on_reset_stream(self, buf, frame_type, space) -> None:
        stream_id = buf.pull_uint_var()
        error_code = buf.pull_uint_var()
        final_size = buf.pull_uint_var()
        self._rx_ack_eliciting = True
        self._rx_probing_only = False
        stream = self._get_or_open_peer_stream(stream_id, frame_type)
        if stream is None:
            return
        if stream.receiver is None:
            raise QuicProtocolError(QuicErrorCode.STREAM_STATE_ERROR, "RESET_STREAM on a send-only stream",
                                    frame_type)
        was_finished = stream.receiver.is_finished
        grew = stream.receiver.handle_reset(final_size, error_code)
        self._account_received(grew, frame_type)
        if not was_finished:
            self._events.append(ev.StreamReset(stream_id, error_code))
        self._maybe_forget_stream(stream)

    def _on_stop_sending(self, buf, frame_type, space) -> None:
        stream_id = buf.pull_uint_var()
        error_code = buf.pull_uint_var()
        self._rx_ack_eliciting = True
        self._rx_probing_only = False
        stream = self._get_or_open_peer_stream(stream_id, frame_type)
        if stream is None:
            return
        if stream.sender is None:
            raise QuicProtocolError(QuicErrorCode.STREAM_STATE_ERROR, "STOP_SENDING on a receive-only stream",
                                    frame_type)
        self._events.append(ev.StopSendingReceived(stream_id, error_code))
        # RFC 9000 §3.5: answer with RESET_STREAM
        stream.sender.reset(error_code)
        self._stream_queue[stream_id] = stream

    def _on_max_data(self, buf, frame_type, space) -> None:
        value = buf.pull_uint_var()
        self._rx_ack_eliciting = True
        self._rx_probing_only = False
        if value > self._remote_max_data:
            self._remote_max_data = value

    def _on_max_stream_data(self, buf, frame_type, space) -> None:
        stream_id = buf.pull_uint_var()
        value = buf.pull_uint_var()
        self._rx_ack_eliciting = True
        self._rx_probing_only = False
        stream = self._get_or_open_peer_stream(stream_id, frame_type)
        if stream is None:
            return
        if stream.sender is None:
            raise QuicProtocolError(QuicErrorCode.STREAM_STATE_ERROR, "MAX_STREAM_DATA on a receive-only stream",
                                    frame_type)
        stream.sender.update_max_stream_data(value)
        if stream.sender.has_data_to_send:
            self._stream_queue[stream_id] = stream

    def _on_max_streams(self, buf, frame_type, space) -> None:
        value = buf.pull_uint_var()
        self._rx_ack_eliciting = True
        self._rx_probing_only = False
        if value > 1 << 60:
            raise QuicProtocolError(QuicErrorCode.FRAME_ENCODING_ERROR, "MAX_STREAMS too large", frame_type)
        kind = 0 if frame_type == F.FrameType.MAX_STREAMS_BIDI else 1
        if value > self._remote_max_streams[kind]:
            self._remote_max_streams[kind] = value

    def _on_blocked(self, buf, frame_type, space) -> None:
        buf.pull_uint_var()
        self._rx_ack_eliciting = True
        self._rx_probing_only = False

    def _on_stream_data_blocked(self, buf, frame_type, space) -> None:
        stream_id = buf.pull_uint_var()
        buf.pull_uint_var()
        self._rx_ack_eliciting = True
        self._rx_probing_only = False
        stream = self._get_or_open_peer_stream(stream_id, frame_type)
        if stream is not None and stream.receiver is None:
            raise QuicProtocolError(QuicErrorCode.STREAM_STATE_ERROR, "STREAM_DATA_BLOCKED on a send-only stream",
                                    frame_type)

    def _on_streams_blocked(self, buf, frame_type, space) -> None:
        value = buf.pull_uint_var()
        self._rx_ack_eliciting = True
        self._rx_probing_only = False
        if value > 1 << 60:
            raise QuicProtocolError(QuicErrorCode.FRAME_ENCODING_ERROR, "STREAMS_BLOCKED too large", frame_type)

    def _on_new_connection_id(self, buf, frame_type, space) -> None:
        seq, retire_prior_to, cid, token = F.pull_new_connection_id(buf)
        self._rx_ack_eliciting = True
        if not self._path0.peer_cid.cid:
            raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "NEW_CONNECTION_ID with zero-length CIDs",
                                    frame_type)
        self._add_peer_cid(seq, retire_prior_to, cid, token, frame_type)

    def _on_retire_connection_id(self, buf, frame_type, space) -> None:
        seq = buf.pull_uint_var()
        self._rx_ack_eliciting = True
        if seq >= self._host_cid_seq:
            raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "retiring a CID never issued", frame_type)
        record = self._host_cids.get(seq)
        if record is None:
            return
        if record.cid == self._rx_dcid():
            raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "retiring the CID in use", frame_type)
        self._retire_host_cid(record)
        self._replenish_host_cids()

    def _on_path_challenge(self, buf, frame_type, space) -> None:
        data = buf.pull_bytes(8)
        self._rx_ack_eliciting = True
        self._rx_path.responses.append(data)

    def _on_path_response(self, buf, frame_type, space) -> None:
        data = buf.pull_bytes(8)
        self._rx_ack_eliciting = True
        for path in self._paths.values():
            if path.challenge == data:
                path.challenge = None
                path.challenge_sent_at = None
                path.validated = True
                path.state = PathState.ACTIVE
                self._events.append(ev.PathValidated(path.path_id, path.remote_addr))
                return
        # RFC 9000 §8.2.2: an unsolicited PATH_RESPONSE is ignored

    def _on_connection_close(self, buf, frame_type, space) -> None:
        error_code, ftype, reason = F.pull_connection_close(buf, frame_type == F.FrameType.APPLICATION_CLOSE)
        self._events.append(ev.ConnectionTerminated(error_code, ftype, reason, True))
        self._qlog_closed(error_code, reason, True)
        self._enter_draining(self._now)

    def _on_handshake_done(self, buf, frame_type, space) -> None:
        self._rx_ack_eliciting = True
        if not self.is_client:
            raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "HANDSHAKE_DONE from a client", frame_type)
        if not self._handshake_confirmed:
            self._confirm_handshake()

    def _on_datagram(self, buf, frame_type, space) -> None:
        if frame_type == F.FrameType.DATAGRAM_WITH_LENGTH:
            data = buf.pull_bytes(buf.pull_uint_var())
        else:
            end = buf.capacity
            data = buf.pull_bytes(end - buf.tell())
        self._rx_ack_eliciting = True
        self._rx_probing_only = False
        if self.configuration.max_datagram_frame_size is None:
            raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "DATAGRAM not negotiated", frame_type)
        if len(data) + 3 > self.configuration.max_datagram_frame_size:
            raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "DATAGRAM frame too large", frame_type)
        self.datagrams_received += 1
        handler = self.datagram_handler
        if handler is not None:
            handler(data)
        else:
            self._events.append(ev.DatagramFrameReceived(data))

    def _rx_dcid(self) -> bytes | None:
        return None  # the DCID of the packet being processed is not needed beyond routing yet

    # --- streams ---

    def _get_or_open_local_stream(self, stream_id: int) -> QuicStream:
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream
        if self.state >= ConnectionState.CLOSING:
            raise ValueError("connection is closing")
        local = bool(stream_id & 1) != self.is_client
        if not local:
            raise ValueError(f"stream {stream_id} was not opened by the peer")
        kind = (stream_id >> 1) & 1
        index = stream_id >> 2
        if index != self._next_stream_index[kind]:
            raise ValueError(f"stream {stream_id} is not the next available stream")
        if index >= self._remote_max_streams[kind]:
            self._streams_blocked_pending[kind] = True
            raise ValueError("stream limit reached: wait for MAX_STREAMS from the peer")
        self._next_stream_index[kind] += 1
        return self._create_stream(stream_id, local=True)

    def _create_stream(self, stream_id: int, local: bool) -> QuicStream:
        cfg = self.configuration
        p = self._peer_params
        uni = bool(stream_id & 2)
        if uni:
            remote_limit = p.initial_max_stream_data_uni if p else 0
        elif local:
            remote_limit = p.initial_max_stream_data_bidi_remote if p else 0
        else:
            remote_limit = p.initial_max_stream_data_bidi_local if p else 0
        stream = QuicStream(stream_id, is_local=local, max_stream_data_local=cfg.initial_max_stream_data,
                            max_stream_data_remote=remote_limit)
        self._streams[stream_id] = stream
        return stream

    def _get_or_open_peer_stream(self, stream_id: int, frame_type: int) -> QuicStream | None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream
        local = bool(stream_id & 1) != self.is_client
        kind = (stream_id >> 1) & 1
        index = stream_id >> 2
        if local:
            if index >= self._next_stream_index[kind]:
                raise QuicProtocolError(QuicErrorCode.STREAM_STATE_ERROR, "frame for a stream we never opened",
                                        frame_type)
            return None  # a stream of ours already finished and forgotten
        if index >= self._local_max_streams[kind]:
            raise QuicProtocolError(QuicErrorCode.STREAM_LIMIT_ERROR, "peer exceeded the stream limit", frame_type)
        if index < self._peer_stream_opened(kind):
            return None  # finished and forgotten
        self._peer_streams_opened[kind] = index + 1
        return self._create_stream(stream_id, local=False)

    def _peer_stream_opened(self, kind: int) -> int:
        return self._peer_streams_opened[kind]

    def _maybe_forget_stream(self, stream: QuicStream) -> None:
        if not stream.is_finished:
            return
        sid = stream.stream_id
        if self._streams.pop(sid, None) is None:
            return
        self._stream_queue.pop(sid, None)
        local = bool(sid & 1) != self.is_client
        if not local:
            kind = (sid >> 1) & 1
            self._peer_streams_closed[kind] += 1
            cfg_limit = self.configuration.initial_max_streams_uni if kind else self.configuration.initial_max_streams_bidi
            if self._local_max_streams[kind] - self._peer_streams_closed[kind] < cfg_limit // 2:
                self._local_max_streams[kind] = self._peer_streams_closed[kind] + cfg_limit
                self._local_max_streams_pending[kind] = True

    # ------------------------------------------------------------------------------------------------------------
    # send
    # ------------------------------------------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, object, object]]:
        self._now = now
        out: list[tuple[bytes, object, object]] = []
        state = self.state
        if state >= ConnectionState.DRAINING:
            return out
        if state == ConnectionState.CLOSING:
            if self._close_needs_send and now - self._close_last_sent >= CLOSE_FRAME_RATE:
                data = self._build_close_datagram()
                if data:
                    out.append((data, self._path0.remote_addr, self._path0.local_addr))
                self._close_last_sent = now
            self._close_needs_send = False
            return out
        if self._path0.remote_addr is None:
            return out
        self._pre_send(now)
        for path in list(self._paths.values()):
            if path.state == PathState.ABANDONED:
                continue
            self._send_on_path(path, now, out)
        return out

    def _pre_send(self, now: float) -> None:
        if self._key_update_requested and self._key_update_pending_ack is None and self._handshake_confirmed:
            self._key_update_requested = False
            self._rotate_send_key()
            self.key_updates += 1
            self._events.append(ev.KeyUpdated(self._key_phase, True))
        if self._recv_key_prev is not None and now >= self._recv_key_prev_until:
            self._recv_key_prev = None

    def _send_on_path(self, path: Path, now: float, out: list) -> None:
        rec = path.recovery
        space = path.space
        if (self._datagrams and self._handshake_confirmed and not space.ack_now and not space.probes
                and (space.ack_at is None or space.ack_at > now) and not self._has_control_frames(path)
                and path.state == PathState.ACTIVE and (path.validated or self.is_client)):
            self._send_datagrams_fast(path, now, out)
        # anti-amplification: a server sends at most 3x what it received on an unvalidated path
        limit = None if path.validated or self.is_client else 3 * path.bytes_received - path.bytes_sent
        handshake_path = path is self._path0
        while True:
            if limit is not None and limit < MIN_UDP_PAYLOAD and limit < 200:
                return
            datagram_size = path.mtu if self._handshake_confirmed else MIN_UDP_PAYLOAD
            if limit is not None:
                datagram_size = min(datagram_size, limit)
            remaining = datagram_size
            pad_datagram = False
            long_pkts: list[_Packet] = []
            if handshake_path:
                for epoch in (INITIAL, HANDSHAKE):
                    if self._send_key[epoch] is None:
                        continue
                    space = self._initial_space if epoch == INITIAL else self._handshake_space
                    if space.discarded:
                        continue
                    pkt = self._fill_long_packet(epoch, space, rec, remaining, now, path)
                    if pkt is not None:
                        long_pkts.append(pkt)
                        remaining -= pkt.pad_to  # pad_to holds the packet's size until it is finished
                        # RFC 9000 §14.1: a client pads every datagram that carries an Initial packet, a server
                        # those with an ack-eliciting Initial, to 1200 bytes
                        if epoch == INITIAL and (pkt.ack_eliciting or self.is_client):
                            pad_datagram = True
            coalesced = datagram_size - remaining
            short = None
            if self._send_key[ONE_RTT] is not None and remaining > 40:
                short = self._build_short_packet(path, rec, remaining, now, pad_datagram, coalesced)
            packets: list[bytes] = []
            sent_handshake = False
            for i, pkt in enumerate(long_pkts):
                pad_to = 0
                if pad_datagram and short is None and i == len(long_pkts) - 1:
                    pad_to = min(MIN_UDP_PAYLOAD, datagram_size) - sum(map(len, packets))
                packets.append(self._finish_long_packet(pkt, path, rec, now, pad_to))
                sent_handshake = sent_handshake or pkt.epoch == HANDSHAKE
            if short is not None:
                packets.append(short)
            if sent_handshake and self.is_client:
                # RFC 9001 §4.9.1: a client discards Initial keys when it first sends a Handshake packet
                self._discard_epoch(INITIAL)
            if not packets:
                return
            datagram = packets[0] if len(packets) == 1 else b"".join(packets)
            path.bytes_sent += len(datagram)
            if limit is not None:
                limit -= len(datagram)
            out.append((datagram, path.remote_addr, path.local_addr))
            if len(out) >= 512:
                return

    # --- packet building ---

    def _long_header_size(self, epoch: int, path: Path) -> int:
        dcid = path.peer_cid.cid
        n = 1 + 4 + 1 + len(dcid) + 1 + len(self.host_cid) + 2 + MAX_PN_LEN
        if epoch == INITIAL:
            n += size_uint_var(len(self._retry_token)) + len(self._retry_token)
        return n

    def _fill_long_packet(self, epoch: int, space: PacketSpace, rec: Recovery, remaining: int, now: float,
                          path: Path) -> _Packet | None:
        header_len = self._long_header_size(epoch, path)
        capacity = remaining - header_len - AEAD_TAG_SIZE
        if capacity < 20:
            return None
        pkt = _Packet(epoch, space, capacity)
        self._write_ack(pkt, space, now)
        if rec.congestion_window_available() > 0 or space.probes > 0:
            self._write_crypto(pkt, epoch)
        if space.probes > 0 and not pkt.ack_eliciting:
            pkt.buf.push_uint_var(F.FrameType.PING)
            pkt.ack_eliciting = pkt.in_flight = True
        if space.probes > 0 and pkt.ack_eliciting:
            space.probes -= 1
        if pkt.buf.tell() == 0:
            return None
        # the exact size it will have once finished unpadded (the PN length is known now), so a 1-RTT packet
        # coalesced after it can pad the datagram to exactly 1200 bytes
        la = space.sent.largest_acked
        _, pn_len = encode_packet_number(space.next_pn, la if la >= 0 else None)
        pkt.pad_to = header_len - MAX_PN_LEN + pn_len + max(pkt.buf.tell(), 4 - pn_len) + AEAD_TAG_SIZE
        return pkt

    def _finish_long_packet(self, pkt: _Packet, path: Path, rec: Recovery, now: float, pad_to: int) -> bytes:
        space = pkt.space
        pn = space.next_pn
        truncated, pn_len = encode_packet_number(pn, space.sent.largest_acked if space.sent.largest_acked >= 0
                                                 else None)
        payload_len = pkt.buf.tell()
        token = self._retry_token if pkt.epoch == INITIAL and self.is_client else b""
        header_len = 1 + 4 + 1 + len(path.peer_cid.cid) + 1 + len(self.host_cid) + pn_len + 2
        if pkt.epoch == INITIAL:
            header_len += size_uint_var(len(token)) + len(token)
        min_payload = max(4 - pn_len, 0)
        if pad_to:
            min_payload = max(min_payload, pad_to - header_len - AEAD_TAG_SIZE)
        payload = pkt.buf.data
        if payload_len < min_payload:
            payload += bytes(min_payload - payload_len)  # PADDING frames
            pkt.in_flight = True
            payload_len = len(payload)
        header = encode_long_header(EPOCH_PACKET_TYPE[pkt.epoch], QUIC_VERSION_1, path.peer_cid.cid, self.host_cid,
                                    token, pn_len, pn_len + payload_len + AEAD_TAG_SIZE, truncated)
        data = protect_packet(self._send_key[pkt.epoch], self._send_hp[pkt.epoch], header, payload, pn)
        space.next_pn = pn + 1
        packet = SentPacket(pn, now, len(data), pkt.ack_eliciting, pkt.in_flight, pkt.handlers)
        rec.on_packet_sent(space.sent, packet)
        if pkt.ack_eliciting:
            self._on_ack_eliciting_sent(now)
        if self._qlog is not None:
            self._qlog_packet("quic:packet_sent", pkt.epoch, path, pn, len(data))
        return data

    def _build_short_packet(self, path: Path, rec: Recovery, remaining: int, now: float, pad: bool,
                            coalesced: int) -> bytes | None:
        space = path.space
        dcid = path.peer_cid.cid
        overhead = 1 + len(dcid) + MAX_PN_LEN + AEAD_TAG_SIZE
        capacity = remaining - overhead
        if capacity < 8:
            return None
        probe = space.probes > 0
        cwnd_room = rec.congestion_window_available()
        can_send_data = cwnd_room > 0 or probe
        if can_send_data and not probe and rec.pacer.next_send_time(now) is not None:
            can_send_data = False
        pkt = _Packet(ONE_RTT, space, capacity)
        self._write_ack(pkt, space, now)
        if can_send_data:
            self._write_control_frames(pkt, path, now)
            if self._crypto[ONE_RTT].sender.has_data_to_send:
                self._write_crypto(pkt, ONE_RTT)
            if path.responses:
                while path.responses and pkt.buf.capacity - pkt.buf.tell() >= 9:
                    pkt.buf.push_uint_var(F.FrameType.PATH_RESPONSE)
                    pkt.buf.push_bytes(path.responses.pop(0))
                pkt.ack_eliciting = pkt.in_flight = True
                pad = True
            self._write_datagrams(pkt)
            self._write_streams(pkt)
            if probe and not pkt.ack_eliciting:
                pkt.buf.push_uint_var(F.FrameType.PING)
                pkt.ack_eliciting = pkt.in_flight = True
            if pkt.buf.tell() == 0 and self._needs_pmtu_probe(path, now, cwnd_room):
                return self._build_pmtu_probe(path, rec, now)
        elif path.responses:
            # PATH_RESPONSE is not congestion controlled
            while path.responses and pkt.buf.capacity - pkt.buf.tell() >= 9:
                pkt.buf.push_uint_var(F.FrameType.PATH_RESPONSE)
                pkt.buf.push_bytes(path.responses.pop(0))
            pkt.ack_eliciting = pkt.in_flight = True
        if pkt.buf.tell() == 0:
            return None
        if probe and pkt.ack_eliciting:
            space.probes -= 1
        pad_to = 0
        if pad:
            pad_to = MIN_UDP_PAYLOAD - coalesced
        return self._finish_short_packet(pkt, path, rec, now, pad_to)

    def _finish_short_packet(self, pkt: _Packet, path: Path, rec: Recovery, now: float, pad_to: int) -> bytes:
        space = pkt.space
        pn = space.next_pn
        la = space.sent.largest_acked
        truncated, pn_len = encode_packet_number(pn, la if la >= 0 else None)
        dcid = path.peer_cid.cid
        payload_len = pkt.buf.tell()
        min_payload = 4 - pn_len
        if pad_to:
            min_payload = max(min_payload, pad_to - (1 + len(dcid) + pn_len) - AEAD_TAG_SIZE)
        payload = pkt.buf.data
        if payload_len < min_payload:
            payload += bytes(min_payload - payload_len)  # PADDING frames
        first = 0x40 | (self._key_phase << 2) | (pn_len - 1)
        header = bytes((first,)) + dcid + truncated.to_bytes(pn_len, "big")
        data = protect_packet(self._send_key[ONE_RTT], self._send_hp[ONE_RTT], header, payload, pn, path.path_id)
        space.next_pn = pn + 1
        packet = SentPacket(pn, now, len(data), pkt.ack_eliciting, pkt.in_flight, pkt.handlers)
        if pkt.is_mtu_probe:
            packet.is_mtu_probe = True
        rec.on_packet_sent(space.sent, packet)
        if pkt.in_flight:
            rec.pacer.on_packet_sent(len(data), now)
        path.packets_sent += 1
        self._after_1rtt_sent(pn)
        if pkt.ack_eliciting:
            self._on_ack_eliciting_sent(now)
        if self._qlog is not None:
            self._qlog_packet("quic:packet_sent", ONE_RTT, path, pn, len(data))
        return data

    def _send_datagrams_fast(self, path: Path, now: float, out: list) -> None:
        """The hot path: short-header packets that carry DATAGRAM frames only, built back to back.

        Runs only when nothing else is waiting (no ACK due, no control frame, no probe), so each packet is a fixed
        header + one or more DATAGRAM frames; no Buffer, no frame loop, no per-packet objects beyond the
        SentPacket record that loss recovery and congestion control need.
        """
        datagrams = self._datagrams
        rec = path.recovery
        cc = rec.cc
        pacer = rec.pacer
        space = path.space
        sent = space.sent
        dcid = path.peer_cid.cid
        capacity = path.mtu - (1 + len(dcid) + MAX_PN_LEN) - AEAD_TAG_SIZE
        key = self._send_key[ONE_RTT]
        hp = self._send_hp[ONE_RTT]
        path_id = path.path_id
        remote, local = path.remote_addr, path.local_addr
        first_byte = 0x40 | (self._key_phase << 2)
        on_packet_sent = rec.on_packet_sent
        pace = pacer.on_packet_sent
        count = 0
        first_pn = space.next_pn
        while datagrams:
            if rec.bytes_in_flight >= cc.congestion_window or pacer._empty_at > now:
                break
            data = datagrams.popleft()
            n = len(data)
            if n + 1 > capacity:
                self.datagrams_dropped += 1  # the path MTU shrank under it: drop, never stall the queue
                continue
            parts = [b"\x30", data]
            used = n + 1
            count += 1
            # pack more small datagrams into the same packet (all but the last carry a length)
            while datagrams:
                nxt = datagrams[0]
                extra = len(nxt) + 1 + (1 if len(parts[-1]) < 64 else 2)
                if used + extra > capacity:
                    break
                last = parts.pop()
                parts[-1] = b"\x31"
                parts.append(_varint(len(last)))
                parts.append(last)
                parts.append(b"\x30")
                parts.append(datagrams.popleft())
                used += extra
                count += 1
            pn = space.next_pn
            space.next_pn = pn + 1
            # 2-byte packet numbers while fewer than 2^14 are unacknowledged (RFC 9000 §17.1), else 4
            if pn - sent.largest_acked < 0x4000:
                header = bytes((first_byte | 1,)) + dcid + (pn & 0xFFFF).to_bytes(2, "big")
            else:
                header = bytes((first_byte | 3,)) + dcid + (pn & 0xFFFFFFFF).to_bytes(4, "big")
            if used < 2:
                parts.insert(0, bytes(2))  # the header protection sample needs 4 bytes after the PN start
            packet = protect_packet(key, hp, header, b"".join(parts), pn, path_id)
            size = len(packet)
            on_packet_sent(sent, SentPacket(pn, now, size, True, True))
            pace(size, now)
            out.append((packet, remote, local))
        if count:
            path.packets_sent += count
            path.datagrams_sent += count
            self.datagrams_sent += count
            if self._packets_in_phase == 0 and self._key_update_pending_ack is None:
                self._key_update_pending_ack = first_pn
            self._packets_in_phase += count
            if self._packets_in_phase >= self.configuration.key_update_after_packets:
                self._key_update_requested = True
            if not self._last_ack_eliciting_sent_since_rx:
                self._on_ack_eliciting_sent(now)

    def _after_1rtt_sent(self, pn: int) -> None:
        if self._key_update_pending_ack is None and self._packets_in_phase == 0:
            self._key_update_pending_ack = pn
        self._packets_in_phase += 1
        if self._packets_in_phase >= self.configuration.key_update_after_packets and self._handshake_confirmed:
            self._key_update_requested = True

    def _on_ack_eliciting_sent(self, now: float) -> None:
        # RFC 9000 §10.1: restart the idle timer when sending the first ack-eliciting packet after a receive
        if not self._last_ack_eliciting_sent_since_rx:
            self._last_ack_eliciting_sent_since_rx = True
            self._idle_at = now + self._idle_period

    def _write_ack(self, pkt: _Packet, space: PacketSpace, now: float) -> None:
        if not space.ack_queue or not (space.ack_now or (space.ack_at is not None and now >= space.ack_at)
                                       or space.probes or pkt.epoch != ONE_RTT and space.ack_eliciting_pending):
            return
        if pkt.epoch == ONE_RTT:
            delay = int((now - space.largest_received_time) * 1e6) >> self.configuration.ack_delay_exponent
        else:
            delay = 0
        buf = pkt.buf
        if not F.push_ack(buf, space.ack_queue, max(delay, 0), max_size=buf.capacity - buf.tell()):
            return
        space.ack_now = False
        space.ack_at = None
        space.ack_eliciting_pending = 0
        pkt.handlers.append((space.on_ack_of_ack, (space.ack_queue.largest,)))

    def _write_crypto(self, pkt: _Packet, epoch: int) -> None:
        sender = self._crypto[epoch].sender
        buf = pkt.buf
        while sender.has_data_to_send:
            room = buf.capacity - buf.tell() - 1 - 8 - 4
            if room < 16:
                return
            frame = sender.next_frame(room, 1 << 62)
            if frame is None:
                return
            offset, data, _fin = frame
            buf.push_uint_var(F.FrameType.CRYPTO)
            buf.push_uint_var(offset)
            buf.push_uint_var(len(data))
            buf.push_bytes(data)
            pkt.handlers.append((sender.on_data_delivered, (offset, len(data), False)))
            pkt.ack_eliciting = pkt.in_flight = True

    def _has_control_frames(self, path: Path) -> bool:
        return bool(self._max_data_pending or self._stream_queue or self._new_cid_pending or self._retire_pending
                    or self._handshake_done_pending or self._ping_pending or path.responses
                    or path.challenge is not None and path.challenge_sent_at is None
                    or self._local_max_streams_pending[0] or self._local_max_streams_pending[1]
                    or self._streams_blocked_pending[0] or self._streams_blocked_pending[1]
                    or self._data_blocked_pending or path.space.probes
                    or self._crypto[ONE_RTT].sender.has_data_to_send)

    def _write_control_frames(self, pkt: _Packet, path: Path, now: float) -> None:
        buf = pkt.buf

        def room() -> int:
            return buf.capacity - buf.tell()

        handlers = pkt.handlers
        wrote = False
        if self._handshake_done_pending and room() >= 1:
            buf.push_uint_var(F.FrameType.HANDSHAKE_DONE)
            self._handshake_done_pending = False
            handlers.append((self._on_handshake_done_delivered, ()))
            wrote = True
        if self._max_data_pending and room() >= 9:
            buf.push_uint_var(F.FrameType.MAX_DATA)
            buf.push_uint_var(self._local_max_data)
            self._max_data_pending = False
            handlers.append((self._on_max_data_delivered, (self._local_max_data,)))
            wrote = True
        for kind in (0, 1):
            if self._local_max_streams_pending[kind] and room() >= 9:
                buf.push_uint_var(F.FrameType.MAX_STREAMS_UNI if kind else F.FrameType.MAX_STREAMS_BIDI)
                buf.push_uint_var(self._local_max_streams[kind])
                self._local_max_streams_pending[kind] = False
                handlers.append((self._on_max_streams_delivered, (kind, self._local_max_streams[kind])))
                wrote = True
            if self._streams_blocked_pending[kind] and room() >= 9:
                buf.push_uint_var(F.FrameType.STREAMS_BLOCKED_UNI if kind else F.FrameType.STREAMS_BLOCKED_BIDI)
                buf.push_uint_var(self._remote_max_streams[kind])
                self._streams_blocked_pending[kind] = False
                wrote = True
        if self._data_blocked_pending and room() >= 9:
            buf.push_uint_var(F.FrameType.DATA_BLOCKED)
            buf.push_uint_var(self._remote_max_data)
            self._data_blocked_pending = False
            wrote = True
        while self._new_cid_pending and room() >= 1 + 8 + 8 + 1 + 20 + 16:
            record = self._new_cid_pending.pop(0)
            if record.retired:
                continue
            F.push_new_connection_id(buf, record.seq, 0, record.cid, record.reset_token)
            handlers.append((self._on_new_cid_delivered, (record,)))
            wrote = True
        while self._retire_pending and room() >= 9:
            seq = self._retire_pending.pop(0)
            buf.push_uint_var(F.FrameType.RETIRE_CONNECTION_ID)
            buf.push_uint_var(seq)
            handlers.append((self._on_retire_delivered, (seq,)))
            wrote = True
        if path.challenge is not None and path.challenge_sent_at is None and room() >= 9:
            buf.push_uint_var(F.FrameType.PATH_CHALLENGE)
            buf.push_bytes(path.challenge)
            path.challenge_sent_at = now
            path.challenge_tries += 1
            pkt.pad_to = MIN_UDP_PAYLOAD
            wrote = True
        while self._ping_pending and room() >= 1:
            uid = self._ping_pending.pop(0)
            buf.push_uint_var(F.FrameType.PING)
            handlers.append((self._on_ping_delivered, (uid,)))
            wrote = True
        if wrote:
            pkt.ack_eliciting = pkt.in_flight = True

    def _write_datagrams(self, pkt: _Packet) -> None:
        buf = pkt.buf
        datagrams = self._datagrams
        while datagrams:
            data = datagrams[0]
            room = buf.capacity - buf.tell()
            n = len(data)
            need = 1 + size_uint_var(n) + n
            if need > room:
                if pkt.buf.tell() == 0 and n + 1 > room:
                    datagrams.popleft()  # can never fit (MTU shrank): drop, never stall the queue
                    self.datagrams_dropped += 1
                    continue
                return
            datagrams.popleft()
            buf.push_uint_var(F.FrameType.DATAGRAM_WITH_LENGTH)
            buf.push_uint_var(n)
            buf.push_bytes(data)
            pkt.ack_eliciting = pkt.in_flight = True
            self.datagrams_sent += 1

    def _write_streams(self, pkt: _Packet) -> None:
        queue = self._stream_queue
        if not queue:
            return
        buf = pkt.buf
        for sid in list(queue):
            stream = queue.get(sid)
            if stream is None:
                continue
            sender = stream.sender
            receiver = stream.receiver
            # stream-level control frames
            # stream-level control frames (each producer consumes what it returns: call it only with room)
            if receiver is not None and receiver.control_pending and buf.capacity - buf.tell() >= 34:
                code = receiver.stop_sending_frame()
                if code is not None:
                    buf.push_uint_var(F.FrameType.STOP_SENDING)
                    buf.push_uint_var(sid)
                    buf.push_uint_var(code)
                    pkt.handlers.append((receiver.on_stop_sending_delivered, ()))
                    pkt.ack_eliciting = pkt.in_flight = True
                value = receiver.max_stream_data_frame()
                if value is not None:
                    buf.push_uint_var(F.FrameType.MAX_STREAM_DATA)
                    buf.push_uint_var(sid)
                    buf.push_uint_var(value)
                    pkt.handlers.append((receiver.on_max_stream_data_delivered, (value,)))
                    pkt.ack_eliciting = pkt.in_flight = True
            if sender is not None and sender.control_pending and buf.capacity - buf.tell() >= 42:
                reset = sender.reset_frame()
                if reset is not None:
                    code, final_size = reset
                    buf.push_uint_var(F.FrameType.RESET_STREAM)
                    buf.push_uint_var(sid)
                    buf.push_uint_var(code)
                    buf.push_uint_var(final_size)
                    pkt.handlers.append((sender.on_reset_delivered, ()))
                    pkt.ack_eliciting = pkt.in_flight = True
                blocked = sender.blocked_frame()
                if blocked is not None:
                    buf.push_uint_var(F.FrameType.STREAM_DATA_BLOCKED)
                    buf.push_uint_var(sid)
                    buf.push_uint_var(blocked)
                    pkt.handlers.append((sender.on_blocked_delivered, (blocked,)))
                    pkt.ack_eliciting = pkt.in_flight = True
            if sender is not None:
                while sender.has_data_to_send:
                    room = buf.capacity - buf.tell() - 1 - 8 - 8 - 4
                    if room <= 0:
                        break
                    credit = self._remote_max_data - self._data_sent
                    frame = sender.next_frame(room, max(credit, 0))
                    if frame is None:
                        if credit <= 0 and self._data_blocked_sent_at != self._remote_max_data:
                            self._data_blocked_sent_at = self._remote_max_data
                            self._data_blocked_pending = True
                        break
                    offset, data, fin = frame
                    self._data_sent += sender.new_bytes_sent_by_last_frame
                    F.push_stream(buf, sid, offset, data, fin, with_length=True)
                    pkt.handlers.append((self._on_stream_delivered, (stream, offset, len(data), fin)))
                    pkt.ack_eliciting = pkt.in_flight = True
            if buf.capacity - buf.tell() < 32:
                # packet full: rotate this stream to the end for fairness
                queue.pop(sid, None)
                if not self._stream_idle(stream):
                    queue[sid] = stream
                return
            if self._stream_idle(stream):
                queue.pop(sid, None)

    @staticmethod
    def _stream_idle(stream: QuicStream) -> bool:
        s, r = stream.sender, stream.receiver
        if s is not None and (s.has_data_to_send or s.control_pending):
            return False
        if r is not None and r.control_pending:
            return False
        return True

    # --- delivery callbacks (SentPacket handlers): called with delivered=True on ACK, False on loss ---

    def _on_stream_delivered(self, delivered: bool, stream: QuicStream, offset: int, length: int, fin: bool) -> None:
        stream.sender.on_data_delivered(delivered, offset, length, fin)
        if delivered:
            self._maybe_forget_stream(stream)
        elif stream.sender.has_data_to_send and stream.stream_id in self._streams:
            self._stream_queue[stream.stream_id] = stream

    def _on_handshake_done_delivered(self, delivered: bool) -> None:
        if not delivered:
            self._handshake_done_pending = True

    def _on_max_data_delivered(self, delivered: bool, value: int) -> None:
        if not delivered and value == self._local_max_data:
            self._max_data_pending = True

    def _on_max_streams_delivered(self, delivered: bool, kind: int, value: int) -> None:
        if not delivered and value == self._local_max_streams[kind]:
            self._local_max_streams_pending[kind] = True

    def _on_new_cid_delivered(self, delivered: bool, record: CidRecord) -> None:
        if not delivered and not record.retired:
            self._new_cid_pending.append(record)

    def _on_retire_delivered(self, delivered: bool, seq: int) -> None:
        if not delivered:
            self._retire_pending.append(seq)

    def _on_ping_delivered(self, delivered: bool, uid: int) -> None:
        if delivered:
            self._events.append(ev.PingAcknowledged(uid))
        else:
            self._ping_pending.append(uid)

    # --- DPLPMTUD (RFC 8899): probe upward from 1200 with PING+PADDING packets ---

    # DPLPMTUD search: path.mtu is the largest size confirmed, path.pmtud_high the largest not yet ruled out.
    # The first probe tries the ceiling (most paths carry it); after that, binary search. A size is ruled out
    # after PMTUD_MAX_PROBES losses; the search restarts every PMTUD_RAISE_INTERVAL (RFC 8899 §5.3).

    def _needs_pmtu_probe(self, path: Path, now: float, cwnd_room: int) -> bool:
        if not self.configuration.pmtud or not self._handshake_confirmed or path.pmtud_probe:
            return False
        if path.pmtud_next_at is not None:  # search done; handle_timer restarts it when the raise timer expires
            return False
        if path.pmtud_high <= 0 or path.pmtud_high < path.mtu:
            ceiling = self.configuration.pmtud_max_payload
            if self._peer_params is not None:
                ceiling = min(ceiling, self._peer_params.max_udp_payload_size)
            path.pmtud_high = ceiling
            path.pmtud_low = 0  # marks "first probe of a search: try the ceiling"
            path.pmtud_fails = 0
        if path.pmtud_high - path.mtu < PMTUD_STEP_MIN:
            path.pmtud_next_at = now + PMTUD_RAISE_INTERVAL
            return False
        return cwnd_room >= path.pmtud_high

    def _pmtu_probe_size(self, path: Path) -> int:
        if path.pmtud_low == 0:
            return path.pmtud_high
        return (path.mtu + path.pmtud_high + 1) // 2

    def _build_pmtu_probe(self, path: Path, rec: Recovery, now: float) -> bytes | None:
        size = self._pmtu_probe_size(path)
        dcid = path.peer_cid.cid
        la = path.space.sent.largest_acked
        _, pn_len = encode_packet_number(path.space.next_pn, la if la >= 0 else None)
        capacity = size - (1 + len(dcid) + pn_len) - AEAD_TAG_SIZE  # the probe is exactly `size` bytes
        pkt = _Packet(ONE_RTT, path.space, capacity)
        pkt.buf.push_uint_var(F.FrameType.PING)
        pkt.buf.push_bytes(bytes(capacity - 1))
        pkt.ack_eliciting = pkt.in_flight = pkt.is_mtu_probe = True
        pkt.handlers.append((self._on_pmtu_probe_delivered, (path, size)))
        path.pmtud_probe = size
        return self._finish_short_packet(pkt, path, rec, now, 0)

    def _on_pmtu_probe_delivered(self, delivered: bool, path: Path, size: int) -> None:
        path.pmtud_probe = 0
        if delivered:
            path.pmtud_low = 1
            path.pmtud_fails = 0
            if size > path.mtu:
                old_room = self._datagram_room
                path.mtu = size
                path.recovery.update_max_datagram_size(size)
                self._update_datagram_room()
                if self._datagram_room != old_room:
                    self._events.append(ev.MtuUpdated(size, self._datagram_room))
            return
        path.pmtud_fails += 1
        if path.pmtud_fails >= PMTUD_MAX_PROBES:
            path.pmtud_high = size - 1  # ruled out
            path.pmtud_low = 1
            path.pmtud_fails = 0

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
                continue
            rec = path.recovery
            t = rec.get_loss_detection_time()
            if t is not None and (deadline is None or t < deadline):
                deadline = t
            t = path.space.ack_at
            if t is not None and (deadline is None or t < deadline):
                deadline = t
            if self._datagrams or self._stream_queue:
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
                        if self.is_client and space.epoch != ONE_RTT and not self._handshake_complete:
                            # anti-deadlock probes: an Initial without CRYPTO data still counts
                            pass
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
        return max((p.recovery.pto_duration() for p in self._paths.values()), default=1.0)

    # ------------------------------------------------------------------------------------------------------------
    # TLS glue and keys
    # ------------------------------------------------------------------------------------------------------------

    def _make_tls(self) -> tls.Context:
        cfg = self.configuration
        cafile, capath, cadata = cfg.ca_locations() if self.is_client and cfg.verify_peer else (None, None, None)
        ctx = tls.Context(
            is_client=self.is_client,
            alpn_protocols=cfg.alpn_protocols,
            cafile=cafile,
            capath=capath,
            cadata=cadata,
            cipher_suites=[tls.CipherSuite(c) for c in cfg.cipher_suites] if cfg.cipher_suites else None,
            server_name=cfg.server_name,
            verify_mode=cfg.tls_verify_mode,
        )
        if not self.is_client:
            ctx.certificate = cfg.certificate
            ctx.certificate_chain = cfg.certificate_chain
            ctx.certificate_private_key = cfg.private_key
        ctx.handshake_extensions = [(tls.ExtensionType.QUIC_TRANSPORT_PARAMETERS, self._local_transport_parameters())]
        ctx.update_traffic_key_cb = self._update_traffic_key
        return ctx

    def _local_transport_parameters(self) -> bytes:
        cfg = self.configuration
        host0 = self._host_cids[0]
        params = TransportParameters(
            max_idle_timeout=int(cfg.idle_timeout * 1000),
            max_udp_payload_size=cfg.max_udp_payload_size,
            initial_max_data=cfg.initial_max_data,
            initial_max_stream_data_bidi_local=cfg.initial_max_stream_data,
            initial_max_stream_data_bidi_remote=cfg.initial_max_stream_data,
            initial_max_stream_data_uni=cfg.initial_max_stream_data,
            initial_max_streams_bidi=cfg.initial_max_streams_bidi,
            initial_max_streams_uni=cfg.initial_max_streams_uni,
            ack_delay_exponent=cfg.ack_delay_exponent,
            max_ack_delay=int(cfg.max_ack_delay * 1000),
            disable_active_migration=cfg.disable_active_migration,
            active_connection_id_limit=cfg.active_connection_id_limit,
            initial_source_connection_id=host0.cid,
            max_datagram_frame_size=cfg.max_datagram_frame_size,
        )
        if not self.is_client:
            params.original_destination_connection_id = self._original_dcid
            params.retry_source_connection_id = self._retry_scid
            params.stateless_reset_token = host0.reset_token
        return encode_transport_parameters(params)

    def _tls_step(self, data: bytes, epoch: int = INITIAL) -> None:
        bufs = self._tls_out
        try:
            self.tls.handle_message(data, bufs)
        except tls.Alert as alert:
            raise QuicProtocolError(QuicErrorCode.CRYPTO_ERROR + int(alert.description), str(alert)) from None
        for tls_epoch, buf in bufs.items():
            if buf.tell():
                out = buf.data
                buf.seek(0)
                e = TLS_EPOCH[tls_epoch]
                self._crypto[e].sender.write(out)
        if not self._handshake_complete and self.tls.state in (tls.State.CLIENT_POST_HANDSHAKE,
                                                                tls.State.SERVER_POST_HANDSHAKE):
            self._on_handshake_complete()

    def _parse_peer_transport_parameters(self) -> None:
        blob = None
        for ext_type, ext_data in self.tls.received_extensions or ():
            if ext_type == tls.ExtensionType.QUIC_TRANSPORT_PARAMETERS:
                blob = ext_data
        if blob is None:
            raise QuicProtocolError(QuicErrorCode.CRYPTO_ERROR + 109, "missing QUIC transport parameters")
        params = decode_transport_parameters(blob, sent_by_server=self.is_client)
        if self.is_client:
            if params.original_destination_connection_id != self._original_dcid:
                raise QuicProtocolError(QuicErrorCode.TRANSPORT_PARAMETER_ERROR, "original_destination_connection_id mismatch")
            if params.retry_source_connection_id != self._retry_scid:
                raise QuicProtocolError(QuicErrorCode.TRANSPORT_PARAMETER_ERROR, "retry_source_connection_id mismatch")
            if params.initial_source_connection_id != self._peer_initial_scid:
                raise QuicProtocolError(QuicErrorCode.TRANSPORT_PARAMETER_ERROR, "initial_source_connection_id mismatch")
            if params.stateless_reset_token:
                self._path0.peer_cid.reset_token = params.stateless_reset_token
                self._reset_tokens.add(params.stateless_reset_token)
        else:
            if params.initial_source_connection_id != self._path0.peer_cid.cid:
                raise QuicProtocolError(QuicErrorCode.TRANSPORT_PARAMETER_ERROR, "initial_source_connection_id mismatch")
        self._peer_params = params
        if self._qlog is not None:
            self._qlog.event(self._now, "quic:parameters_set", {
                "owner": "remote", "max_idle_timeout": params.max_idle_timeout,
                "initial_max_data": params.initial_max_data,
                "max_datagram_frame_size": params.max_datagram_frame_size,
                "active_connection_id_limit": params.active_connection_id_limit,
                "max_udp_payload_size": params.max_udp_payload_size})
        self._remote_max_data = params.initial_max_data
        self._remote_max_streams = [params.initial_max_streams_bidi, params.initial_max_streams_uni]
        self._remote_max_datagram = params.max_datagram_frame_size or 0
        self._update_datagram_room()
        self._update_idle_period()
        for path in self._paths.values():
            path.recovery.peer_max_ack_delay = params.max_ack_delay / 1000.0

    def _update_traffic_key(self, direction, tls_epoch, cipher_suite, secret: bytes) -> None:
        epoch = TLS_EPOCH[tls_epoch]
        if epoch == ZERO_RTT:
            return
        log = self.configuration.secrets_log_file
        if log is not None:
            label = {(0, HANDSHAKE): "SERVER", (1, HANDSHAKE): "CLIENT", (0, ONE_RTT): "SERVER",
                     (1, ONE_RTT): "CLIENT"}
            who = ("CLIENT" if direction == tls.Direction.ENCRYPT else "SERVER") if self.is_client else \
                ("SERVER" if direction == tls.Direction.ENCRYPT else "CLIENT")
            kind = "HANDSHAKE_TRAFFIC_SECRET" if epoch == HANDSHAKE else "TRAFFIC_SECRET_0"
            del label
            log.write(f"{who}_{kind} {self.tls.client_random.hex()} {secret.hex()}\n")
            log.flush()
        suite = int(cipher_suite)
        if direction == tls.Direction.ENCRYPT:
            self._send_key[epoch] = PacketKey(suite, secret)
            self._send_hp[epoch] = HeaderProtection(suite, secret)
        else:
            self._recv_key[epoch] = PacketKey(suite, secret)
            self._recv_hp[epoch] = HeaderProtection(suite, secret)
            if epoch == ONE_RTT:
                self._recv_key_next = self._recv_key[ONE_RTT].next_generation()
        if epoch == HANDSHAKE and direction == tls.Direction.DECRYPT and self.tls.received_extensions is not None \
                and self._peer_params is None:
            self._parse_peer_transport_parameters()
        if epoch == ONE_RTT and self._peer_params is None and self.tls.received_extensions is not None:
            self._parse_peer_transport_parameters()

    def _setup_initial_keys(self, dcid: bytes) -> None:
        client_secret, server_secret = derive_initial_secrets(dcid)
        suite = 0x1301
        send, recv = (client_secret, server_secret) if self.is_client else (server_secret, client_secret)
        self._send_key[INITIAL] = PacketKey(suite, send)
        self._send_hp[INITIAL] = HeaderProtection(suite, send)
        self._recv_key[INITIAL] = PacketKey(suite, recv)
        self._recv_hp[INITIAL] = HeaderProtection(suite, recv)

    def _rotate_send_key(self) -> None:
        self._send_key[ONE_RTT] = self._send_key[ONE_RTT].next_generation()
        self._key_phase ^= 1
        if self._qlog is not None:
            self._qlog.event(self._now, "quic:key_updated", {"key_type": "1RTT", "key_phase": self._key_phase})
        self._packets_in_phase = 0
        self._key_update_pending_ack = None

    def _on_handshake_complete(self) -> None:
        if self._peer_params is None:
            self._parse_peer_transport_parameters()
        self._handshake_complete = True
        self.alpn_protocol = self.tls.alpn_negotiated
        if self.state == ConnectionState.FIRSTFLIGHT:
            self.state = ConnectionState.CONNECTED
        self._events.append(ev.HandshakeCompleted(self.alpn_protocol, self.tls.session_resumed))
        if not self.is_client:
            self._handshake_done_pending = True
            self._confirm_handshake()
        self._replenish_host_cids()

    def _confirm_handshake(self) -> None:
        self._handshake_confirmed = True
        for path in self._paths.values():
            path.recovery.handshake_confirmed = True
            path.recovery.peer_completed_address_validation = True
        self._discard_epoch(INITIAL)
        self._discard_epoch(HANDSHAKE)

    def _discard_epoch(self, epoch: int) -> None:
        space = self._initial_space if epoch == INITIAL else self._handshake_space
        if space.discarded:
            return
        space.discarded = True
        rec = self._path0.recovery
        rec.discard_space(space.sent)
        if space.sent in rec.spaces:
            rec.spaces.remove(space.sent)
        self._send_key[epoch] = self._recv_key[epoch] = None
        self._send_hp[epoch] = self._recv_hp[epoch] = None
        space.ack_queue = type(space.ack_queue)()
        space.ack_at = None
        space.ack_now = False
        space.probes = 0

    def _receive_retry(self, header, data: bytes) -> None:
        if not self.is_client or self._retry_scid is not None or self._peer_initial_scid is not None:
            return  # at most one Retry, and never after the server answered
        if header.dcid != self.host_cid or not verify_retry_integrity(header, data, self._original_dcid):
            self.packets_dropped += 1
            return
        self._retry_scid = header.scid
        self._retry_token = header.token
        self._path0.peer_cid.cid = header.scid
        self._setup_initial_keys(header.scid)
        rec = self._path0.recovery
        rec.reschedule(self._initial_space.sent)  # resend the ClientHello with the token
        rec.discard_space(self._initial_space.sent)  # RFC 9002 §6.3: a Retry resets loss recovery state

    # ------------------------------------------------------------------------------------------------------------
    # connection IDs and paths
    # ------------------------------------------------------------------------------------------------------------

    def _new_path(self, path_id: int, local_addr, remote_addr) -> Path:
        cfg = self.configuration
        rec = Recovery(congestion_control=cfg.congestion_control, max_datagram_size=MIN_UDP_PAYLOAD,
                       peer_max_ack_delay=0.025, initial_rtt=cfg.initial_rtt)
        rec.is_client = self.is_client
        path = Path(path_id, local_addr, remote_addr, rec, MIN_UDP_PAYLOAD)
        rec.spaces.append(path.space.sent)
        self._paths[path_id] = path
        return path

    def _new_host_cid(self, announce: bool = True, path_id: int = 0) -> CidRecord:
        cid = os.urandom(self._cid_len)
        while cid in self._cid_to_path:
            cid = os.urandom(self._cid_len)
        record = CidRecord(cid, self._host_cid_seq, stateless_reset_token(self._reset_key, cid), path_id)
        self._host_cid_seq += 1
        self._host_cids[record.seq] = record
        self._cid_to_path[cid] = path_id
        if announce:
            self._new_cid_pending.append(record)
            self._events.append(ev.ConnectionIdIssued(cid))
        return record

    def _replenish_host_cids(self) -> None:
        limit = 2
        if self._peer_params is not None:
            limit = min(self._peer_params.active_connection_id_limit, 8)
        while sum(1 for r in self._host_cids.values() if not r.retired) < limit:
            self._new_host_cid()

    def _retire_host_cid(self, record: CidRecord) -> None:
        record.retired = True
        del self._host_cids[record.seq]
        self._cid_to_path.pop(record.cid, None)
        self._events.append(ev.ConnectionIdRetired(record.cid))

    def _add_peer_cid(self, seq: int, retire_prior_to: int, cid: bytes, token: bytes, frame_type: int) -> None:
        if seq in self._peer_cid_seqs:
            return  # duplicate
        if seq < self._peer_retire_prior_to:
            self._retire_pending.append(seq)  # already retired by an earlier frame
            self._peer_cid_seqs.add(seq)
            return
        self._peer_cid_seqs.add(seq)
        self._peer_cids.append(CidRecord(cid, seq, token))
        self._reset_tokens.add(token)
        if retire_prior_to > self._peer_retire_prior_to:
            self._peer_retire_prior_to = retire_prior_to
            keep = []
            for rec in self._peer_cids:
                if rec.seq < retire_prior_to:
                    self._retire_pending.append(rec.seq)
                    self._reset_tokens.discard(rec.reset_token)
                else:
                    keep.append(rec)
            self._peer_cids = keep
            current = self._path0.peer_cid
            if current.seq < retire_prior_to:
                if not self._peer_cids:
                    raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "all peer CIDs retired", frame_type)
                new = self._peer_cids.pop(0)
                new.in_use = True
                self._path0.peer_cid = new
                self._retire_pending.append(current.seq)
        active = len(self._peer_cids) + 1
        if active > self.configuration.active_connection_id_limit:
            raise QuicProtocolError(QuicErrorCode.CONNECTION_ID_LIMIT_ERROR, "too many connection IDs", frame_type)

    def _is_stateless_reset(self, data: bytes) -> bool:
        return len(data) >= 21 and bytes(data[-16:]) in self._reset_tokens

    def _on_peer_address_change(self, path: Path, remote_addr, local_addr) -> None:
        """The peer's address changed (NAT rebinding or migration, RFC 9000 §9): validate the new one."""
        if self.is_client:
            return  # the server does not migrate (we never use preferred_address)
        path.remote_addr = remote_addr
        path.local_addr = local_addr
        path.validated = False
        path.bytes_received = 0
        path.bytes_sent = 0
        path.challenge = os.urandom(8)
        path.challenge_sent_at = None
        path.challenge_tries = 0
        # move to a fresh peer CID when we have one (RFC 9000 §9.5, linkability)
        if self._peer_cids:
            old = path.peer_cid
            new = self._peer_cids.pop(0)
            new.in_use = True
            path.peer_cid = new
            self._retire_pending.append(old.seq)

    def _on_path_validation_failed(self, path: Path) -> None:
        if path is self._path0:
            self._terminate_now("path validation failed", QuicErrorCode.NO_VIABLE_PATH)

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

    def _build_close_datagram(self) -> bytes | None:
        error_code, frame_type, reason, application = self._close_frame
        path = self._path0
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


def _varint(value: int) -> bytes:
    if value < 0x40:
        return bytes((value,))
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    return (value | 0x80000000).to_bytes(4, "big")

