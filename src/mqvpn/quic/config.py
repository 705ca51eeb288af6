"""Configuration of a QUIC connection (one dataclass; every tunable of the transport in one place)."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from typing import Any, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization

# RFC 9000 §14: every path must carry 1200-byte UDP payloads.
MIN_UDP_PAYLOAD = 1200
# The largest DATAGRAM frame we accept. One well-known peer stores the peer's value in 16 bits and silently drops
# everything above, so never advertise more than 65535.
MAX_DATAGRAM_FRAME_SIZE = 65535


@dataclass
class QuicConfiguration:
    is_client: bool = True
    alpn_protocols: list[str] | None = None

    # TLS
    server_name: str | None = None  # client: SNI and the name the certificate must carry
    verify_peer: bool = True  # client: verify the server certificate (off only by explicit request)
    cafile: str | None = None
    capath: str | None = None
    cadata: bytes | None = None
    certificate: Any = None  # server: x509.Certificate
    certificate_chain: list = field(default_factory=list)
    private_key: Any = None
    cipher_suites: list[int] | None = None
    secrets_log_file: TextIO | None = None  # NSS key log format, for Wireshark

    # transport parameters we announce
    idle_timeout: float = 30.0  # seconds
    keepalive_interval: float | None = None  # send a PING after this long without receiving (NAT bindings, idle)
    max_datagram_frame_size: int | None = MAX_DATAGRAM_FRAME_SIZE  # None: no DATAGRAM support
    initial_max_data: int = 16 << 20
    initial_max_stream_data: int = 4 << 20
    initial_max_streams_bidi: int = 128
    initial_max_streams_uni: int = 128
    max_ack_delay: float = 0.025
    ack_delay_exponent: int = 3
    active_connection_id_limit: int = 4
    max_udp_payload_size: int = 65527  # announced (what we accept); sending follows DPLPMTUD
    disable_active_migration: bool = False
    initial_max_path_id: int | None = None  # multipath (draft-ietf-quic-multipath); None: not offered

    # local behaviour
    connection_id_length: int = 8
    congestion_control: str = "cubic"
    initial_rtt: float = 0.333
    pmtud: bool = True
    pmtud_max_payload: int = 1452  # DPLPMTUD search ceiling (1500-byte links over IPv6)
    datagram_queue_limit: int = 256  # DATAGRAM frames waiting to be sent (per queue); beyond: dropped and counted
    scheduler: str = "wlb"  # multipath DATAGRAM scheduler: wlb, minrtt or backup (quic/scheduler.py)
    retry: bool = False  # server: send Retry before accepting a connection
    stateless_reset_key: bytes = field(default_factory=lambda: os.urandom(32))
    key_update_after_packets: int = 1 << 22  # AEAD confidentiality limit margin (RFC 9001 §6.6)
    qlog: Any = None  # a qlog.QlogTrace, or None (costs nothing when off)

    def load_cert_chain(self, certfile: str, keyfile: str | None = None, password: bytes | None = None) -> None:
        with open(certfile, "rb") as f:
            pem = f.read()
        certs = x509.load_pem_x509_certificates(pem)
        self.certificate = certs[0]
        self.certificate_chain = certs[1:]
        if keyfile is None:
            key_pem = pem
        else:
            with open(keyfile, "rb") as f:
                key_pem = f.read()
        self.private_key = serialization.load_pem_private_key(key_pem, password=password)

    def load_verify_locations(self, cafile: str | None = None, capath: str | None = None,
                              cadata: bytes | None = None) -> None:
        self.cafile, self.capath, self.cadata = cafile, capath, cadata

    @property
    def tls_verify_mode(self) -> int:
        if self.is_client and self.verify_peer:
            return ssl.CERT_REQUIRED
        return ssl.CERT_NONE

    def ca_locations(self) -> tuple[str | None, str | None, bytes | None]:
        """The CA store to verify against: the configured one, else the system store."""
        if self.cafile or self.capath or self.cadata:
            return self.cafile, self.capath, self.cadata
        paths = ssl.get_default_verify_paths()
        if paths.cafile and os.path.exists(paths.cafile):
            return paths.cafile, None, None
        if paths.capath and os.path.isdir(paths.capath):
            return None, paths.capath, None
        return None, None, None  # aioquic.tls falls back to certifi
