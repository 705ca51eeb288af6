"""TLS 1.3 glue of the QUIC connection: aioquic.tls.Context driving, transport parameters, packet protection keys,
key update and the handshake milestones (complete, confirmed, keys discarded, Retry).

A mixin of ``QuicConnection`` (connection.py), split out by concern; it shares the connection's state."""

from __future__ import annotations

from aioquic import tls

from mqvpn.quic import events as ev
from mqvpn.quic.constants import (
    DEAD_PROBE_INTERVAL,
    CRYPTO_BUFFER_LIMIT,
    HANDSHAKE,
    INITIAL,
    ONE_RTT,
    TLS_EPOCH,
    ZERO_RTT,
    ConnectionState,
)
from mqvpn.quic.crypto import (
    HeaderProtection,
    PacketKey,
    derive_initial_secrets,
)
from mqvpn.quic.errors import QuicErrorCode, QuicProtocolError
from mqvpn.quic.packet import (
    verify_retry_integrity,
)
from mqvpn.quic.stream import StreamReceiver, StreamSender
from mqvpn.quic.tparams import (
    TransportParameters,
    decode_transport_parameters,
    encode_transport_parameters,
)


class _CryptoStream:
    """CRYPTO frames of one encryption level: an ordered byte stream without flow control (bounded buffer)."""

    __slots__ = ("sender", "receiver")

    def __init__(self) -> None:
        self.sender = StreamSender(0, 1 << 62)
        self.receiver = StreamReceiver(0, CRYPTO_BUFFER_LIMIT)


class TlsMixin:

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
            initial_max_path_id=cfg.initial_max_path_id,
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
        if self.configuration.initial_max_path_id is not None and params.initial_max_path_id is not None:
            if not self._cid_len or not self._path0.peer_cid.cid:
                raise QuicProtocolError(QuicErrorCode.PROTOCOL_VIOLATION,
                                        "multipath needs non-zero-length connection IDs")
            self._multipath = True
            self._peer_max_path_id = params.initial_max_path_id
            self._path0.recovery.max_pto_period = DEAD_PROBE_INTERVAL
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

