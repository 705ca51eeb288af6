"""`make demo`: show what works today on this one machine.

Current stage: our own QUIC transport. A server and a client (both mqvpn's QUIC) talk over UDP on 127.0.0.1 with
certificate verification against a throw-away CA: handshake, a 4 MB stream echoed and checked, DATAGRAM frames
both ways, a key update, a graceful close. (The VPN demo in network namespaces replaces this once the tunnel lands.)
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import os
import sys
import tempfile
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mqvpn.endpoint import QuicEndpoint
from mqvpn.quic import events as ev
from mqvpn.quic.config import QuicConfiguration

ALPN = "mqvpn-demo"


def _make_pki(directory: str) -> tuple[str, str, str]:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mqvpn demo CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = [os.path.join(directory, n) for n in ("ca.pem", "cert.pem", "key.pem")]
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths[0], paths[1], paths[2]


async def _demo(directory: str) -> None:
    ca, cert, key = _make_pki(directory)
    server_cfg = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    server_cfg.load_cert_chain(cert, key)

    def on_connection(handle) -> None:
        def on_event(event) -> None:
            if isinstance(event, ev.StreamDataReceived):
                handle.send_stream_data(event.stream_id, event.data, event.end_stream)

        handle.event_handler = on_event
        handle.datagram_handler = handle.send_datagram_frame  # echo

    server = await QuicEndpoint.serve(("127.0.0.1", 0), server_cfg, on_connection)
    port = server.local_addr[1]
    print(f"server listening on 127.0.0.1:{port} (UDP)")

    client_cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name="localhost", cafile=ca)
    t0 = time.perf_counter()
    client = await QuicEndpoint.connect(("127.0.0.1", port), client_cfg)
    quic = client.quic
    print(f"handshake done in {(time.perf_counter() - t0) * 1000:.1f} ms, certificate verified, "
          f"ALPN {quic.alpn_protocol!r}")

    echoed: list[bytes] = []
    client.datagram_handler = echoed.append
    payload = os.urandom(4 << 20)
    sid = quic.get_next_available_stream_id()
    t0 = time.perf_counter()
    client.send_stream_data(sid, payload, end_stream=True)
    back = bytearray()
    while True:
        event = await client.next_event()
        if isinstance(event, ev.StreamDataReceived):
            back += event.data
            if event.end_stream:
                break
    elapsed = time.perf_counter() - t0
    ok = hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
    print(f"stream: 4 MiB echoed in {elapsed:.2f} s ({len(payload) * 16 / elapsed / 1e6:.0f} Mbit/s both ways), "
          f"sha256 {'matches' if ok else 'MISMATCH'}")

    quic.request_key_update()
    for i in range(1000):
        client.send_datagram_frame(i.to_bytes(4, "big") + bytes(996))
        if i % 50 == 0:
            await asyncio.sleep(0.005)
    deadline = time.monotonic() + 3
    while len(echoed) < 1000 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    print(f"datagrams: {len(echoed)}/1000 echoed back (unreliable by design), key updates: {quic.key_updates}, "
          f"datagram room now {quic.datagram_room} bytes (path MTU {quic.paths[0].mtu})")
    client.close(0, "demo done")
    await client.wait_closed()
    server.close()
    print("closed gracefully")
    if not ok or len(echoed) < 900:
        raise SystemExit("demo failed")


def main() -> int:
    print("mqvpn demo — stage 1: our QUIC transport over UDP on 127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(asyncio.wait_for(_demo(tmp), 60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
