"""Constants and tunables of the QUIC transport, in one place."""

from __future__ import annotations

from enum import IntEnum

from aioquic import tls

from mqvpn.quic import frames as F
from mqvpn.quic.packet import PacketType

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
MIN_AMPLIFICATION_SEND = 64  # below this much anti-amplification credit, wait for the peer to send more
DEAD_PATH_PTOS = 3  # consecutive PTOs after which a path is dead (not used, probed), if another path is active
DEAD_PROBE_INTERVAL = 1.0  # seconds: the PTO backoff of a multipath path stops growing here (dead-path probing)
DEAD_PATH_ABANDON = 60.0  # seconds a path may stay dead before it is abandoned (PATH_UNSTABLE_OR_POOR)
PATH_UNSTABLE_OR_POOR = 0x3E76  # PATH_ABANDON error code (draft-ietf-quic-multipath-21 §4.2.1)
KEEPALIVE_PING = -1  # ping uid of keep-alive PINGs (no PingAcknowledged event)


class ConnectionState(IntEnum):
    FIRSTFLIGHT = 0
    CONNECTED = 1
    CLOSING = 2
    DRAINING = 3
    TERMINATED = 4
