"""Per-path state (multipath-first: everything that differs between paths lives here)."""

from __future__ import annotations

from collections import deque
from enum import IntEnum

from mqvpn.quic.rangeset import RangeSet
from mqvpn.quic.recovery import Recovery, SentSpace

# RFC 9000 §13.2.1: ack every second ack-eliciting packet.
ACK_ELICITING_THRESHOLD = 2
MAX_ACK_RANGES = 32


class PathState(IntEnum):
    VALIDATING = 0
    ACTIVE = 1
    STANDBY = 2
    ABANDONED = 3


class CidRecord:
    """A connection ID issued by us (host) or by the peer, with its sequence number and reset token."""

    __slots__ = ("cid", "seq", "reset_token", "path_id", "retired", "in_use")

    def __init__(self, cid: bytes, seq: int, reset_token: bytes | None, path_id: int = 0) -> None:
        self.cid = cid
        self.seq = seq
        self.reset_token = reset_token
        self.path_id = path_id
        self.retired = False
        self.in_use = False


class PacketSpace:
    """One packet number space: what we received (for ACKs) and what we sent (for recovery)."""

    __slots__ = (
        "name", "epoch", "ack_queue", "largest_received", "largest_received_time", "ack_eliciting_pending",
        "ack_at", "ack_now", "next_pn", "sent", "discarded", "probes", "rx_floor", "path_id",
    )

    def __init__(self, name: str, epoch: int, path_id: int | None = None) -> None:
        self.name = name
        self.epoch = epoch
        self.path_id = path_id  # None for the Initial and Handshake spaces
        self.ack_queue = RangeSet()
        self.largest_received = -1
        self.largest_received_time = 0.0
        self.ack_eliciting_pending = 0  # ack-eliciting packets received since our last ACK
        self.ack_at: float | None = None  # deadline of a delayed ACK
        self.ack_now = False  # an ACK must go out with the next packet
        self.next_pn = 0
        self.sent = SentSpace(name)
        self.discarded = False
        self.probes = 0  # PTO probe packets still to send in this space
        self.rx_floor = 0  # packet numbers below this are no longer tracked: treated as duplicates

    def on_ack_of_ack(self, delivered: bool, largest: int) -> None:
        """The peer got an ACK of ours covering up to ``largest``: stop repeating those ranges (RFC 9000 §13.2.4)."""
        if delivered and self.ack_queue and largest >= self.rx_floor:
            self.ack_queue.trim_below(largest + 1)
            self.rx_floor = largest + 1
            # keep at least the largest received so later ACKs still carry a valid Largest Acknowledged
            if not self.ack_queue and self.largest_received >= 0:
                self.ack_queue.add(self.largest_received)
                self.rx_floor = min(self.rx_floor, self.largest_received)

    def forget_oldest_range(self) -> None:
        """Bound the ACK state: drop the oldest range; everything below it counts as seen."""
        _start, stop = self.ack_queue.shift()
        self.rx_floor = max(self.rx_floor, stop)

    def is_duplicate(self, pn: int) -> bool:
        return pn < self.rx_floor or pn in self.ack_queue


class Path:
    """One network path: a 4-tuple, a packet number space, its own recovery, congestion control and PMTU."""

    __slots__ = (
        "path_id", "local_addr", "remote_addr", "state", "validated", "bytes_received", "bytes_sent",
        "space", "recovery", "peer_cid", "mtu", "challenge", "challenge_sent_at", "challenge_tries",
        "responses", "pmtud_probe", "pmtud_low", "pmtud_high", "pmtud_fails", "pmtud_next_at",
        "key_phase_start_pn", "packets_sent", "packets_received", "datagrams_sent", "datagrams_received",
        "dgrams", "usable", "dead_since", "forget_at", "local_backup", "peer_backup", "last_rx_at", "ping_due",
        "app_rtt_sampled",
    )

    def __init__(self, path_id: int, local_addr, remote_addr, recovery: Recovery, mtu: int) -> None:
        self.path_id = path_id
        self.local_addr = local_addr
        self.remote_addr = remote_addr
        self.state = PathState.ACTIVE
        self.validated = False
        self.bytes_received = 0
        self.bytes_sent = 0
        self.space = PacketSpace(f"app{path_id}", 3, path_id)
        self.recovery = recovery
        self.peer_cid: CidRecord | None = None
        self.mtu = mtu  # largest UDP payload known to work on this path
        self.challenge: bytes | None = None  # outstanding PATH_CHALLENGE data
        self.challenge_sent_at: float | None = None
        self.challenge_tries = 0
        self.responses: list[bytes] = []  # PATH_RESPONSE payloads to send
        self.pmtud_probe = 0  # size of the probe in flight (0: none)
        self.pmtud_low = 0  # 0: the next probe is the first of a search (tries the ceiling)
        self.pmtud_high = 0  # largest size not yet ruled out (0: search not started)
        self.pmtud_fails = 0
        self.pmtud_next_at: float | None = None
        self.key_phase_start_pn = 0
        self.packets_sent = 0
        self.packets_received = 0
        self.datagrams_sent = 0
        self.datagrams_received = 0
        # multipath
        self.dgrams: deque[bytes] = deque()  # DATAGRAMs the scheduler assigned to this path
        self.usable = False  # the scheduler may give it new DATAGRAMs, control frames and stream data
        self.dead_since: float | None = None  # its PTOs piled up: probed (about once a second), not used
        self.forget_at: float | None = None  # abandoned: its state goes at this time (3 PTO after)
        self.local_backup = False  # we asked the peer (PATH_STATUS_BACKUP) to use it only as a backup
        self.peer_backup = False  # the peer asked us the same
        self.last_rx_at = 0.0  # multipath keep-alive: a PING goes on a path silent for the keep-alive interval
        self.ping_due = False
        self.app_rtt_sampled = False  # path 0: RTT samples of the handshake are dropped at the first 1-RTT one

    @property
    def backup(self) -> bool:
        return self.local_backup or self.peer_backup
