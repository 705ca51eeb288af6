"""Connection IDs and paths of the QUIC connection: issuing and retiring CIDs, peer CIDs, address changes.

A mixin of ``QuicConnection`` (connection.py), split out by concern; it shares the connection's state."""

from __future__ import annotations

import os

from mqvpn.quic import events as ev
from mqvpn.quic.config import MIN_UDP_PAYLOAD
from mqvpn.quic.constants import DEAD_PROBE_INTERVAL, PATH_UNSTABLE_OR_POOR
from mqvpn.quic.crypto import (
    stateless_reset_token,
)
from mqvpn.quic.errors import QuicErrorCode, QuicProtocolError
from mqvpn.quic.path import CidRecord, Path, PathState
from mqvpn.quic.recovery import Recovery


class CidMixin:

    def _new_path(self, path_id: int, local_addr, remote_addr) -> Path:
        cfg = self.configuration
        peer_ack_delay = self._peer_params.max_ack_delay / 1000.0 if getattr(self, "_peer_params", None) else 0.025
        rec = Recovery(congestion_control=cfg.congestion_control, max_datagram_size=MIN_UDP_PAYLOAD,
                       peer_max_ack_delay=peer_ack_delay, initial_rtt=cfg.initial_rtt)
        rec.is_client = self.is_client
        if path_id:  # paths after the handshake path start with the handshake confirmed
            rec.handshake_confirmed = True
            rec.peer_completed_address_validation = True
        path = Path(path_id, local_addr, remote_addr, rec, MIN_UDP_PAYLOAD)
        rec.spaces.append(path.space.sent)
        if path_id:
            status = self._path_status.get(path_id)
            path.peer_backup = status is not None and not status[1]
            path.local_backup = self._local_backup.get(path_id, False)
            if self._multipath:
                # a dead path is probed about once a second, not with an ever longer PTO backoff
                rec.max_pto_period = DEAD_PROBE_INTERVAL
        self._paths[path_id] = path
        return path

    def _new_host_cid(self, announce: bool = True, path_id: int = 0) -> CidRecord:
        """Issue one of our CIDs. Path 0 uses NEW_CONNECTION_ID's sequence space; every other path ID has its own
        (draft-ietf-quic-multipath §3.2) and goes out in PATH_NEW_CONNECTION_ID."""
        cid = os.urandom(self._cid_len)
        while cid in self._cid_to_path:
            cid = os.urandom(self._cid_len)
        if path_id == 0:
            seq = self._host_cid_seq
            self._host_cid_seq += 1
            table = self._host_cids
        else:
            seq = self._mp_host_seq.get(path_id, 0)
            self._mp_host_seq[path_id] = seq + 1
            table = self._mp_host_cids.setdefault(path_id, {})
        record = CidRecord(cid, seq, stateless_reset_token(self._reset_key, cid), path_id)
        table[seq] = record
        self._cid_to_path[cid] = path_id
        if announce:
            self._new_cid_pending.append(record)
            self._events.append(ev.ConnectionIdIssued(cid))
        return record

    def _replenish_host_cids(self) -> None:
        limit = 2
        if self._peer_params is not None:
            limit = min(self._peer_params.active_connection_id_limit, 8)
        abandoned = self._abandoned_path_ids
        while 0 not in abandoned and sum(1 for r in self._host_cids.values() if not r.retired) < limit:
            self._new_host_cid()
        if self._multipath:
            # CIDs for every path ID both sides allow, without gaps, so the client can open paths (§3.2); the
            # active_connection_id_limit counts per path
            per_path = min(limit, 2)
            for path_id in range(1, min(self._local_max_path_id, self._peer_max_path_id) + 1):
                if path_id in abandoned:
                    continue
                issued = self._mp_host_cids.get(path_id, {})
                while sum(1 for r in issued.values() if not r.retired) < per_path:
                    self._new_host_cid(path_id=path_id)
                    issued = self._mp_host_cids[path_id]

    def _retire_host_cid(self, record: CidRecord) -> None:
        record.retired = True
        table = self._host_cids if record.path_id == 0 else self._mp_host_cids.get(record.path_id, {})
        table.pop(record.seq, None)
        self._cid_to_path.pop(record.cid, None)
        self._events.append(ev.ConnectionIdRetired(record.cid))

    def _add_path_peer_cid(self, path_id: int, seq: int, retire_prior_to: int, cid: bytes, token: bytes,
                           frame_type: int) -> None:
        """A PATH_NEW_CONNECTION_ID for a path ID other than 0 (path 0 shares NEW_CONNECTION_ID's space)."""
        records = self._mp_peer_cids.setdefault(path_id, [])
        if any(r.seq == seq for r in records):
            return  # duplicate
        keep = []
        for record in records:
            if record.seq < retire_prior_to and not record.in_use:
                self._mp_retire_pending.append((path_id, record.seq))
                self._reset_tokens.discard(record.reset_token)
            else:
                keep.append(record)
        if seq < retire_prior_to:
            self._mp_retire_pending.append((path_id, seq))
        else:
            keep.append(CidRecord(cid, seq, token, path_id))
            self._reset_tokens.add(token)
        self._mp_peer_cids[path_id] = keep
        if len(keep) > self.configuration.active_connection_id_limit:
            raise QuicProtocolError(QuicErrorCode.CONNECTION_ID_LIMIT_ERROR, "too many connection IDs for a path",
                                    frame_type)

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
        elif self._multipath and path.state != PathState.ABANDONED:
            # a failed validation still consumes the path ID: abandon it (draft-ietf-quic-multipath §3.1)
            self._abandon(path, PATH_UNSTABLE_OR_POOR, announce=True)

    # --- multipath: opening paths (draft-ietf-quic-multipath §3.1) -------------------------------------------

    def open_path(self, local_addr, remote_addr, now: float) -> int | None:
        """Client: open a new path from ``local_addr`` (the key of the socket it uses) to ``remote_addr``.

        Takes the lowest unused path ID for which both sides have issued CIDs; the path is validated with
        PATH_CHALLENGE and carries DATAGRAMs once the response arrives. Returns the path ID, or None when
        multipath was not negotiated or no path ID / CID is available yet.
        """
        if not (self.is_client and self._multipath and self._handshake_confirmed):
            return None
        self._now = now
        for path_id in range(1, min(self._local_max_path_id, self._peer_max_path_id) + 1):
            if path_id in self._paths or path_id in self._abandoned_path_ids:
                continue
            peer = next((r for r in self._mp_peer_cids.get(path_id, ()) if not r.in_use), None)
            if peer is None or not self._mp_host_cids.get(path_id):
                continue
            return self._start_path(path_id, peer, local_addr, remote_addr)
        return None

    def _start_path(self, path_id: int, peer: CidRecord, local_addr, remote_addr) -> int:
        path = self._new_path(path_id, local_addr, remote_addr)
        peer.in_use = True
        path.peer_cid = peer
        path.state = PathState.VALIDATING
        path.validated = False
        path.challenge = os.urandom(8)
        path.challenge_sent_at = None
        path.challenge_tries = 0
        if self.is_client:
            self._scheduler.on_path_opened(path)
        return path_id

    def _accept_path(self, path_id: int, local_addr, remote_addr) -> Path | None:
        """Server: the first packet for a CID of a path ID not open yet opens that path (the client chose it)."""
        if path_id in self._abandoned_path_ids or path_id > self._local_max_path_id:
            return None
        peer = next((r for r in self._mp_peer_cids.get(path_id, ()) if not r.in_use), None)
        if peer is None:
            return None  # we could not answer on it: the client opened a path we hold no CID for
        self._start_path(path_id, peer, local_addr, remote_addr)
        return self._paths[path_id]

    def abandon_path(self, path_id: int, error_code: int = 0) -> bool:
        """Stop using a path (its uplink went away): PATH_ABANDON goes out on another path and the path ID is never
        used again. The connection lives on while another path does. False if there is no such live path."""
        path = self._paths.get(path_id)
        if not self._multipath or path is None or path.state == PathState.ABANDONED:
            return False
        self._abandon(path, error_code, announce=True)
        return True

    def _abandon(self, path: Path, error_code: int, announce: bool, by_peer: bool = False) -> None:
        """Stop sending on ``path``. Its packet number state and our CIDs for it stay 3 PTO (late packets are
        still acknowledged, on another path, and draw no stateless reset); then ``_forget_path`` (§3.4)."""
        path.state = PathState.ABANDONED
        path.usable = False
        self._abandoned_path_ids.add(path.path_id)
        if announce:
            self._path_abandon_pending.append((path.path_id, error_code))
        # the peer's CIDs for the path count as retired at once; nothing more is sent on it
        self._events.append(ev.PathAbandoned(path.path_id, error_code, by_peer))
        rec = path.recovery
        # what was in flight goes back for retransmission on the other paths (stream data, control frames);
        # the records stay for late acknowledgements until the path is forgotten
        rec.reschedule(path.space.sent)
        path.space.probes = 0
        path.challenge = None
        path.challenge_sent_at = None
        path.forget_at = self._now + 3 * self._max_pto()
        self._update_datagram_room()
        self._scheduler.refresh(self._now)  # its queued DATAGRAMs move to the paths left
        if not any(p.state != PathState.ABANDONED for p in self._paths.values()):
            # the last path: nothing can carry the connection any more (§3.4)
            self._terminate_now("last path abandoned", QuicErrorCode.NO_VIABLE_PATH)

    def _forget_path(self, path: Path) -> None:
        """3 PTO after abandoning: drop the path's state, retire our CIDs for it, and let the peer open another
        path ID in its place (MAX_PATH_ID), so paths can come and go for the whole life of the connection."""
        path.forget_at = None
        path_id = path.path_id
        path.recovery.discard_space(path.space.sent)
        if path_id == 0:
            for record in list(self._host_cids.values()):
                self._retire_host_cid(record)
            self._peer_cids = []
        else:
            for record in list(self._mp_host_cids.get(path_id, {}).values()):
                self._retire_host_cid(record)
            self._mp_host_cids.pop(path_id, None)
            for record in self._mp_peer_cids.pop(path_id, ()):
                self._reset_tokens.discard(record.reset_token)
            del self._paths[path_id]
        self.paths_forgotten += 1
        if self._multipath:
            self._local_max_path_id += 1
            self._max_path_id_pending = True
            self._replenish_host_cids()
