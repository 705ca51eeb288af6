"""Connection IDs and paths of the QUIC connection: issuing and retiring CIDs, peer CIDs, address changes.

A mixin of ``QuicConnection`` (connection.py), split out by concern; it shares the connection's state."""

from __future__ import annotations

import os

from mqvpn.quic import events as ev
from mqvpn.quic.config import MIN_UDP_PAYLOAD
from mqvpn.quic.crypto import (
    stateless_reset_token,
)
from mqvpn.quic.errors import QuicErrorCode, QuicProtocolError
from mqvpn.quic.path import CidRecord, Path
from mqvpn.quic.recovery import Recovery


class CidMixin:

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
        while sum(1 for r in self._host_cids.values() if not r.retired) < limit:
            self._new_host_cid()
        if self._multipath:
            # CIDs for every path ID both sides allow, without gaps, so the client can open paths (§3.2); the
            # active_connection_id_limit counts per path
            per_path = min(limit, 2)
            for path_id in range(1, min(self._local_max_path_id, self._peer_max_path_id) + 1):
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

