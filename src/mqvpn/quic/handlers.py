"""Frame handlers of the QUIC connection (receive side): one method per frame type, plus stream bookkeeping.

A mixin of ``QuicConnection`` (connection.py), split out by concern; it shares the connection's state."""

from __future__ import annotations

from collections.abc import Callable

from mqvpn.quic import events as ev
from mqvpn.quic import frames as F
from mqvpn.quic.constants import (
    HANDSHAKE,
    ONE_RTT,
    ConnectionState,
)
from mqvpn.quic.errors import QuicErrorCode, QuicProtocolError
from mqvpn.quic.path import PacketSpace, Path, PathState
from mqvpn.quic.stream import QuicStream


class FrameHandlersMixin:
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
            F.FrameType.PATH_ACK: self._on_path_ack,
            F.FrameType.PATH_ACK_ECN: self._on_path_ack,
            F.FrameType.PATH_NEW_CONNECTION_ID: self._on_path_new_connection_id,
            F.FrameType.PATH_RETIRE_CONNECTION_ID: self._on_path_retire_connection_id,
            F.FrameType.MAX_PATH_ID: self._on_max_path_id,
            F.FrameType.PATHS_BLOCKED: self._on_paths_blocked,
            F.FrameType.PATH_CIDS_BLOCKED: self._on_path_cids_blocked,
            F.FrameType.PATH_STATUS_BACKUP: self._on_path_status,
            F.FrameType.PATH_STATUS_AVAILABLE: self._on_path_status,
            F.FrameType.PATH_ABANDON: self._on_path_abandon,
        }
        for t in range(0x08, 0x10):
            h[t] = self._on_stream
        return h

    # --- frame handlers: (buf positioned after the type, frame type, packet number space) ---

    def _on_ping(self, buf, frame_type, space) -> None:
        """Nothing to do: a PING only elicits an ACK (the frame loop notes that for every ack-eliciting type)."""

    def _on_ack(self, buf, frame_type, space) -> None:
        ack = F.pull_ack(buf, frame_type == F.FrameType.ACK_ECN)
        # in 1-RTT, ACK acknowledges path 0 whichever path carried it (draft-ietf-quic-multipath §2.3)
        path = self._path0
        self._handle_ack(path, space if space.epoch != ONE_RTT else path.space, ack.ranges, ack.ack_delay,
                         frame_type, rtt_sample=space.epoch != ONE_RTT or not space.path_id)

    # --- multipath frames (draft-ietf-quic-multipath-21 §4): only once both sides negotiated the extension ---

    def _check_path_id(self, path_id: int, frame_type: int) -> None:
        if not self._multipath:
            raise QuicProtocolError(QuicErrorCode.FRAME_ENCODING_ERROR, "multipath frame without negotiation",
                                    frame_type)
        if path_id > self._local_max_path_id:
            raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "path ID above our maximum", frame_type)

    def _on_path_ack(self, buf, frame_type, space) -> None:
        path_id, ack = F.pull_path_ack(buf, frame_type == F.FrameType.PATH_ACK_ECN)
        self._check_path_id(path_id, frame_type)
        self.path_acks_received += 1
        path = self._paths.get(path_id)
        if path is None or path.state == PathState.ABANDONED:
            return  # a path we no longer (or never) keep state for: ignored (§4)
        # §5: the RTT of a path is sampled only from acknowledgements that came back on that path
        self._handle_ack(path, path.space, ack.ranges, ack.ack_delay, frame_type,
                         rtt_sample=space.path_id is None or space.path_id == path_id)

    def _on_path_new_connection_id(self, buf, frame_type, space) -> None:
        path_id, (seq, retire_prior_to, cid, token) = F.pull_path_new_connection_id(buf)
        self._check_path_id(path_id, frame_type)
        if path_id in self._abandoned_path_ids:
            return  # a path ID we no longer process: ignored (§4)
        if path_id == 0:
            self._add_peer_cid(seq, retire_prior_to, cid, token, frame_type)
        else:
            self._add_path_peer_cid(path_id, seq, retire_prior_to, cid, token, frame_type)

    def _on_path_retire_connection_id(self, buf, frame_type, space) -> None:
        path_id, seq = F.pull_path_retire_connection_id(buf)
        self._check_path_id(path_id, frame_type)
        if path_id in self._abandoned_path_ids:
            return  # its CIDs are retired with the path
        table = self._host_cids if path_id == 0 else self._mp_host_cids.get(path_id, {})
        issued = self._host_cid_seq if path_id == 0 else self._mp_host_seq.get(path_id, 0)
        if seq >= issued:
            raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "retiring a CID never issued", frame_type)
        record = table.get(seq)
        if record is not None:
            self._retire_host_cid(record)
            self._replenish_host_cids()  # answered with a replacement for that path (§3.2)

    def _on_max_path_id(self, buf, frame_type, space) -> None:
        value = F.pull_max_path_id(buf)
        self._check_path_id(0, frame_type)
        if value > self._peer_max_path_id:  # a non-increasing value is ignored
            self._peer_max_path_id = value
            self._replenish_host_cids()

    def _on_paths_blocked(self, buf, frame_type, space) -> None:
        F.pull_paths_blocked(buf)
        self._check_path_id(0, frame_type)

    def _on_path_cids_blocked(self, buf, frame_type, space) -> None:
        path_id, _next_seq = F.pull_path_cids_blocked(buf)
        self._check_path_id(path_id, frame_type)
        self._replenish_host_cids()

    def _on_path_status(self, buf, frame_type, space) -> None:
        path_id, seq = F.pull_path_status(buf, frame_type == F.FrameType.PATH_STATUS_AVAILABLE)
        self._check_path_id(path_id, frame_type)
        # advisory (§3.3): kept per path ID (also for paths not open yet), newest sequence number wins
        last = self._path_status.get(path_id)
        if last is None or seq > last[0]:
            available = frame_type == F.FrameType.PATH_STATUS_AVAILABLE
            self._path_status[path_id] = (seq, available)
            path = self._paths.get(path_id)
            if path is not None:
                path.peer_backup = not available

    def _on_path_abandon(self, buf, frame_type, space) -> None:
        path_id, _error_code = F.pull_path_abandon(buf)
        self._check_path_id(path_id, frame_type)
        path = self._paths.get(path_id)
        if path is not None and path.state != PathState.ABANDONED:
            self._abandon(path, _error_code, announce=True, by_peer=True)  # answered with our own (§3.4)

    def _handle_ack(self, path: Path, space: PacketSpace, ranges, ack_delay_raw: int, frame_type: int,
                    rtt_sample: bool = True) -> None:
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
        if space.epoch == ONE_RTT and not path.app_rtt_sampled and rtt_sample:
            # the handshake's RTT samples include the peer's TLS work (hundreds of ms for a busy server): the first
            # 1-RTT sample starts the estimate afresh, so paths are compared (scheduling) on what they carry now
            path.app_rtt_sampled = True
            rec.rtt.has_sample = False
        rec.on_ack_received(space.sent, ranges, ack_delay, self._now, is_handshake_space=space.epoch != ONE_RTT,
                            rtt_sample=rtt_sample)
        if path.dead_since is not None and rec.pto_count == 0:
            path.dead_since = None  # a probe got through: the path is used again
            self._events.append(ev.PathLiveness(path.path_id, True))
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
                and largest >= self._key_update_pending_ack and path is self._key_update_path:
            self._key_update_pending_ack = None
            if self._multipath:
                # draft-ietf-quic-multipath §2.5: the next update waits 3 x the largest PTO of all paths
                self._key_update_not_before = self._now + 3 * self._max_pto()

    def _on_crypto(self, buf, frame_type, space) -> None:
        offset = buf.pull_uint_var()
        length = buf.pull_uint_var()
        if offset + length > (1 << 62) - 1:
            raise QuicProtocolError(QuicErrorCode.FRAME_ENCODING_ERROR, "crypto offset too large", frame_type)
        data = buf.pull_bytes(length)
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
        if not self.is_client:
            raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "NEW_TOKEN from a client", frame_type)

    def _on_stream(self, buf, frame_type, space) -> None:
        stream_id, offset, data, fin = F.pull_stream(buf, frame_type)
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
        if value > self._remote_max_data:
            self._remote_max_data = value

    def _on_max_stream_data(self, buf, frame_type, space) -> None:
        stream_id = buf.pull_uint_var()
        value = buf.pull_uint_var()
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
        if value > 1 << 60:
            raise QuicProtocolError(QuicErrorCode.FRAME_ENCODING_ERROR, "MAX_STREAMS too large", frame_type)
        kind = 0 if frame_type == F.FrameType.MAX_STREAMS_BIDI else 1
        if value > self._remote_max_streams[kind]:
            self._remote_max_streams[kind] = value

    def _on_blocked(self, buf, frame_type, space) -> None:
        buf.pull_uint_var()

    def _on_stream_data_blocked(self, buf, frame_type, space) -> None:
        stream_id = buf.pull_uint_var()
        buf.pull_uint_var()
        stream = self._get_or_open_peer_stream(stream_id, frame_type)
        if stream is not None and stream.receiver is None:
            raise QuicProtocolError(QuicErrorCode.STREAM_STATE_ERROR, "STREAM_DATA_BLOCKED on a send-only stream",
                                    frame_type)

    def _on_streams_blocked(self, buf, frame_type, space) -> None:
        value = buf.pull_uint_var()
        if value > 1 << 60:
            raise QuicProtocolError(QuicErrorCode.FRAME_ENCODING_ERROR, "STREAMS_BLOCKED too large", frame_type)

    def _on_new_connection_id(self, buf, frame_type, space) -> None:
        seq, retire_prior_to, cid, token = F.pull_new_connection_id(buf)
        if not self._path0.peer_cid.cid:
            raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "NEW_CONNECTION_ID with zero-length CIDs",
                                    frame_type)
        self._add_peer_cid(seq, retire_prior_to, cid, token, frame_type)

    def _on_retire_connection_id(self, buf, frame_type, space) -> None:
        seq = buf.pull_uint_var()
        if seq >= self._host_cid_seq:
            raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "retiring a CID never issued", frame_type)
        record = self._host_cids.get(seq)
        if record is None:
            return
        if record.cid == self._rx_cid:
            raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION, "retiring the CID in use", frame_type)
        self._retire_host_cid(record)
        self._replenish_host_cids()

    def _on_path_challenge(self, buf, frame_type, space) -> None:
        data = buf.pull_bytes(8)
        self._rx_path.responses.append(data)

    def _on_path_response(self, buf, frame_type, space) -> None:
        data = buf.pull_bytes(8)
        for path in self._paths.values():
            if path.challenge == data:
                path.challenge = None
                path.challenge_sent_at = None
                path.validated = True
                path.state = PathState.ACTIVE
                self._events.append(ev.PathValidated(path.path_id, path.remote_addr))
                self._update_datagram_room()
                return
        # RFC 9000 §8.2.2: an unsolicited PATH_RESPONSE is ignored

    def _on_connection_close(self, buf, frame_type, space) -> None:
        error_code, ftype, reason = F.pull_connection_close(buf, frame_type == F.FrameType.APPLICATION_CLOSE)
        self._events.append(ev.ConnectionTerminated(error_code, ftype, reason, True))
        self._qlog_closed(error_code, reason, True)
        self._enter_draining(self._now)

    def _on_handshake_done(self, buf, frame_type, space) -> None:
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

