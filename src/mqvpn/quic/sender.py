"""Sending side of the QUIC connection: packets built per path, with a lean loop for DATAGRAM-only packets.

A mixin of ``QuicConnection`` (connection.py), split out by concern; it shares the connection's state."""

from __future__ import annotations

from mqvpn.quic import events as ev
from mqvpn.quic import frames as F
from mqvpn.quic.buffer import Buffer, size_uint_var
from mqvpn.quic.config import MIN_UDP_PAYLOAD
from mqvpn.quic.constants import (
    AEAD_TAG_SIZE,
    CLOSE_FRAME_RATE,
    EPOCH_PACKET_TYPE,
    HANDSHAKE,
    INITIAL,
    KEEPALIVE_PING,
    MAX_PN_LEN,
    MIN_AMPLIFICATION_SEND,
    ONE_RTT,
    PMTUD_MAX_PROBES,
    PMTUD_RAISE_INTERVAL,
    PMTUD_STEP_MIN,
    ConnectionState,
)
from mqvpn.quic.crypto import (
    protect_packet,
)
from mqvpn.quic.packet import (
    QUIC_VERSION_1,
    encode_long_header,
    encode_packet_number,
)
from mqvpn.quic.path import CidRecord, PacketSpace, Path, PathState
from mqvpn.quic.recovery import Recovery, SentPacket
from mqvpn.quic.stream import QuicStream


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


class SenderMixin:
    """Packet building for QuicConnection: which frames go into which packet on which path."""


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
                    path = self._close_path()
                    out.append((data, path.remote_addr, path.local_addr))
                self._close_last_sent = now
            self._close_needs_send = False
            return out
        if self._path0.remote_addr is None:
            return out
        self._pre_send(now)
        paths = self._paths
        # usable paths first, lowest RTT first: control frames, stream data and the shared DATAGRAM queue go to
        # the first with room; the others send only what belongs to them (ACKs, probes, path validation)
        usable = self._scheduler.refresh(now)
        if len(paths) == 1:
            order = paths.values()
        else:
            order = usable + [p for p in paths.values() if not p.usable and p.state != PathState.ABANDONED]
        for path in order:
            self._send_on_path(path, now, out)
        return out

    def _pre_send(self, now: float) -> None:
        if (self._key_update_requested and self._key_update_pending_ack is None and self._handshake_confirmed
                and now >= self._key_update_not_before):
            self._key_update_requested = False
            self._rotate_send_key()
            self.key_updates += 1
            self._events.append(ev.KeyUpdated(self._key_phase, True))
        if self._recv_key_prev is not None and now >= self._recv_key_prev_until:
            self._recv_key_prev = None

    def _send_on_path(self, path: Path, now: float, out: list) -> None:
        if path.state == PathState.ABANDONED:
            return
        rec = path.recovery
        space = path.space
        if ((path.dgrams or self._datagrams and path.usable) and self._handshake_confirmed and not space.ack_now
                and not space.probes and (space.ack_at is None or space.ack_at > now)
                and not self._has_control_frames(path) and path.state == PathState.ACTIVE
                and (path.validated or self.is_client)):
            if path.dgrams:
                self._send_datagrams_fast(path, now, out, path.dgrams)
            if self._datagrams and path.usable:
                self._send_datagrams_fast(path, now, out, self._datagrams)
        # anti-amplification: a server sends at most 3x what it received on an unvalidated path
        limit = None if path.validated or self.is_client else 3 * path.bytes_received - path.bytes_sent
        handshake_path = path is self._path0
        while True:
            if limit is not None and limit < MIN_AMPLIFICATION_SEND:
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
                if (rec.bytes_in_flight + path.mtu <= rec.cc.congestion_window and rec.pacer._empty_at <= now
                        and self._handshake_confirmed):
                    rec.on_app_limited()  # window room, nothing to send
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
        usable = path.usable
        if usable and self._multipath:
            # acknowledgements of paths that cannot carry them themselves (dead, or abandoned and waiting
            # out their 3 PTO) travel on a usable one
            for other in self._paths.values():
                if other is not path and other.space.ack_queue and (
                        other.state == PathState.ABANDONED and other.space.ack_eliciting_pending
                        or other.dead_since is not None and (other.space.ack_now or other.space.ack_at is not None)):
                    self._write_ack(pkt, other.space, now, force=True)
        if can_send_data:
            self._write_control_frames(pkt, path, now, usable)
            if usable and self._crypto[ONE_RTT].sender.has_data_to_send:
                self._write_crypto(pkt, ONE_RTT)
            if path.responses:
                while path.responses and pkt.buf.capacity - pkt.buf.tell() >= 9:
                    pkt.buf.push_uint_var(F.FrameType.PATH_RESPONSE)
                    pkt.buf.push_bytes(path.responses.pop(0))
                pkt.ack_eliciting = pkt.in_flight = True
                pad = True
            if path.dgrams:
                self._write_datagrams(pkt, path.dgrams)
            if usable:
                self._write_datagrams(pkt, self._datagrams)
                self._write_streams(pkt)
            if probe and not pkt.ack_eliciting:
                pkt.buf.push_uint_var(F.FrameType.PING)
                pkt.ack_eliciting = pkt.in_flight = True
            if pkt.buf.tell() == 0 and path.dead_since is None and self._needs_pmtu_probe(path, now, cwnd_room):
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
        if pad or pkt.pad_to:
            # RFC 9000 §8.2.1 / §14.1: 1200-byte datagrams for PATH_CHALLENGE/RESPONSE and Initials, unless the
            # anti-amplification limit does not allow that much (then as large as it allows)
            pad_to = min(MIN_UDP_PAYLOAD, coalesced + remaining) - coalesced
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
        self._after_1rtt_sent(pn, path)
        if pkt.ack_eliciting:
            self._on_ack_eliciting_sent(now)
        if self._qlog is not None:
            self._qlog_packet("quic:packet_sent", ONE_RTT, path, pn, len(data))
        return data

    def _send_datagrams_fast(self, path: Path, now: float, out: list, datagrams) -> None:
        """The hot path: short-header packets that carry DATAGRAM frames only, built back to back.

        Runs only when nothing else is waiting (no ACK due, no control frame, no probe), so each packet is a fixed
        header + one or more DATAGRAM frames; no Buffer, no frame loop, no per-packet objects beyond the
        SentPacket record that loss recovery and congestion control need.
        """
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
            if rec.bytes_in_flight >= cc.congestion_window:
                rec.on_cwnd_limited()
                break
            if pacer._empty_at > now:
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
                self._key_update_path = path
            self._packets_in_phase += count
            if self._packets_in_phase >= self.configuration.key_update_after_packets:
                self._key_update_requested = True
            if not self._last_ack_eliciting_sent_since_rx:
                self._on_ack_eliciting_sent(now)

    def _after_1rtt_sent(self, pn: int, path: Path) -> None:
        if self._key_update_pending_ack is None and self._packets_in_phase == 0:
            self._key_update_pending_ack = pn
            self._key_update_path = path
        self._packets_in_phase += 1
        if self._packets_in_phase >= self.configuration.key_update_after_packets and self._handshake_confirmed:
            self._key_update_requested = True

    def _on_ack_eliciting_sent(self, now: float) -> None:
        # RFC 9000 §10.1: restart the idle timer when sending the first ack-eliciting packet after a receive
        if not self._last_ack_eliciting_sent_since_rx:
            self._last_ack_eliciting_sent_since_rx = True
            self._idle_at = now + self._idle_period

    def _write_ack(self, pkt: _Packet, space: PacketSpace, now: float, force: bool = False) -> None:
        if not space.ack_queue or not (force or space.ack_now or (space.ack_at is not None and now >= space.ack_at)
                                       or space.probes or pkt.epoch != ONE_RTT and space.ack_eliciting_pending):
            return
        if pkt.epoch == ONE_RTT:
            delay = int((now - space.largest_received_time) * 1e6) >> self.configuration.ack_delay_exponent
        else:
            delay = 0
        buf = pkt.buf
        # with multipath, 1-RTT packet number spaces are acknowledged with PATH_ACK (path 0 too, §2.3)
        path_id = space.path_id if self._multipath else None
        if not F.push_ack(buf, space.ack_queue, max(delay, 0), max_size=buf.capacity - buf.tell(), path_id=path_id):
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
                    or self._max_path_id_pending or self._path_status_pending or path.ping_due
                    or self._mp_retire_pending or self._path_abandon_pending
                    or self._handshake_done_pending or self._ping_pending or path.responses
                    or path.challenge is not None and path.challenge_sent_at is None
                    or self._local_max_streams_pending[0] or self._local_max_streams_pending[1]
                    or self._streams_blocked_pending[0] or self._streams_blocked_pending[1]
                    or self._data_blocked_pending or path.space.probes
                    or self._crypto[ONE_RTT].sender.has_data_to_send)

    def _write_control_frames(self, pkt: _Packet, path: Path, now: float, usable: bool = True) -> None:
        """Connection-wide control frames go on usable paths only; a path's own (PATH_CHALLENGE) on it."""
        buf = pkt.buf

        def room() -> int:
            return buf.capacity - buf.tell()

        handlers = pkt.handlers
        wrote = False
        if path.ping_due and room() >= 1:
            buf.push_uint_var(F.FrameType.PING)  # the path's keep-alive (lost: the next interval sends another)
            path.ping_due = False
            pkt.ack_eliciting = pkt.in_flight = True
        if not usable:
            if self._write_path_challenge(pkt, path, now):
                pkt.ack_eliciting = pkt.in_flight = True
            return
        if self._max_path_id_pending and room() >= 9:
            F.push_max_path_id(buf, self._local_max_path_id)
            self._max_path_id_pending = False
            handlers.append((self._on_max_path_id_delivered, (self._local_max_path_id,)))
            wrote = True
        while self._path_status_pending and room() >= 17:
            status_path, available = self._path_status_pending.popitem()
            seq = self._path_status_seq[status_path]
            F.push_path_status(buf, status_path, seq, available)
            handlers.append((self._on_path_status_delivered, (status_path, seq, available)))
            wrote = True
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
        while self._new_cid_pending and room() >= 4 + 8 + 8 + 8 + 1 + 20 + 16:
            record = self._new_cid_pending.pop(0)
            if record.retired:
                continue
            if record.path_id:
                F.push_path_new_connection_id(buf, record.path_id, record.seq, 0, record.cid, record.reset_token)
            else:
                F.push_new_connection_id(buf, record.seq, 0, record.cid, record.reset_token)
            handlers.append((self._on_new_cid_delivered, (record,)))
            wrote = True
        while self._path_abandon_pending and room() >= 17:
            abandoned, code = self._path_abandon_pending.pop(0)
            F.push_path_abandon(buf, abandoned, code)
            handlers.append((self._on_path_abandon_delivered, (abandoned, code)))
            wrote = True
        while self._mp_retire_pending and room() >= 17:
            path_id, seq = self._mp_retire_pending.pop(0)
            F.push_path_retire_connection_id(buf, path_id, seq)
            handlers.append((self._on_path_retire_delivered, (path_id, seq)))
            wrote = True
        while self._retire_pending and room() >= 9:
            seq = self._retire_pending.pop(0)
            buf.push_uint_var(F.FrameType.RETIRE_CONNECTION_ID)
            buf.push_uint_var(seq)
            handlers.append((self._on_retire_delivered, (seq,)))
            wrote = True
        if self._write_path_challenge(pkt, path, now):
            wrote = True
        while self._ping_pending and room() >= 1:
            uid = self._ping_pending.pop(0)
            buf.push_uint_var(F.FrameType.PING)
            handlers.append((self._on_ping_delivered, (uid,)))
            wrote = True
        if wrote:
            pkt.ack_eliciting = pkt.in_flight = True

    def _write_path_challenge(self, pkt: _Packet, path: Path, now: float) -> bool:
        """The path's PATH_CHALLENGE, if one is due and fits (the datagram is then padded to 1200 bytes)."""
        buf = pkt.buf
        if path.challenge is None or path.challenge_sent_at is not None or buf.capacity - buf.tell() < 9:
            return False
        buf.push_uint_var(F.FrameType.PATH_CHALLENGE)
        buf.push_bytes(path.challenge)
        path.challenge_sent_at = now
        path.challenge_tries += 1
        pkt.pad_to = MIN_UDP_PAYLOAD
        return True

    def _write_datagrams(self, pkt: _Packet, datagrams) -> None:
        buf = pkt.buf
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

    def _on_max_path_id_delivered(self, delivered: bool, value: int) -> None:
        if not delivered and value == self._local_max_path_id:
            self._max_path_id_pending = True

    def _on_path_status_delivered(self, delivered: bool, path_id: int, seq: int, available: bool) -> None:
        # only the newest status of a path is sent again (§3.3)
        if not delivered and self._path_status_seq.get(path_id) == seq and path_id not in self._path_status_pending:
            self._path_status_pending[path_id] = available

    def _on_path_abandon_delivered(self, delivered: bool, path_id: int, code: int) -> None:
        if not delivered:
            self._path_abandon_pending.append((path_id, code))

    def _on_path_retire_delivered(self, delivered: bool, path_id: int, seq: int) -> None:
        if not delivered:
            self._mp_retire_pending.append((path_id, seq))

    def _on_retire_delivered(self, delivered: bool, seq: int) -> None:
        if not delivered:
            self._retire_pending.append(seq)

    def _on_ping_delivered(self, delivered: bool, uid: int) -> None:
        if uid == KEEPALIVE_PING:
            return  # lost keep-alives are not repeated: the next interval sends another
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
            old_room = self._datagram_room  # the search is done: the path's MTU now counts for the room
            self._update_datagram_room()
            if self._datagram_room != old_room:
                self._events.append(ev.MtuUpdated(path.mtu, self._datagram_room))
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


def _varint(value: int) -> bytes:
    if value < 0x40:
        return bytes((value,))
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    return (value | 0x80000000).to_bytes(4, "big")
