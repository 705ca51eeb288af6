#!/usr/bin/env python3
"""DATAGRAM throughput over loopback: mqvpn's QUIC (client -> server) vs aioquic (client -> server), one run.

Each server runs in its own process (so client and server get a core each); the client sends DATAGRAM frames of
``--size`` bytes as fast as congestion control lets it for ``--seconds``; the server counts what it received and
reports it over a stream at the end. Prints packets/s received for each implementation and the ratio.

    python bench/datagram_throughput.py [--seconds 5] [--size 1100] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, os.path.join(HERE, ".."))

ALPN = "bench"
QUEUE = 256  # datagrams waiting in the sender at most (both implementations)


def make_pki(directory: str):
    from tests.interop.pki import make_test_pki

    return make_test_pki(directory)


# ---------------------------------------------------------------------------------------------------------------
# servers (run in a child process; print the port, then serve until the parent sends "stats" on a stream)
# ---------------------------------------------------------------------------------------------------------------

async def serve_mqvpn(cert: str, key: str) -> None:
    from mqvpn.endpoint import QuicEndpoint
    from mqvpn.quic import events as ev
    from mqvpn.quic.config import QuicConfiguration

    cfg = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    cfg.load_cert_chain(cert, key)
    count = [0]
    done = asyncio.get_running_loop().create_future()

    def on_connection(handle) -> None:
        def on_datagram(data: bytes) -> None:
            count[0] += 1

        def on_event(event) -> None:
            if isinstance(event, ev.StreamDataReceived) and event.end_stream:
                handle.send_stream_data(event.stream_id, str(count[0]).encode(), end_stream=True)
                asyncio.get_running_loop().call_later(0.5, lambda: done.done() or done.set_result(None))

        handle.datagram_handler = on_datagram
        handle.event_handler = on_event

    endpoint = await QuicEndpoint.serve(("127.0.0.1", 0), cfg, on_connection)
    print(endpoint.local_addr[1], flush=True)
    await done
    endpoint.close()


async def serve_aioquic(cert: str, key: str) -> None:
    from aioquic.asyncio import QuicConnectionProtocol, serve
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import DatagramFrameReceived, StreamDataReceived

    cfg = QuicConfiguration(is_client=False, alpn_protocols=[ALPN], max_datagram_frame_size=65536,
                            max_datagram_size=1452)
    cfg.load_cert_chain(cert, key)
    count = [0]
    done = asyncio.get_running_loop().create_future()

    class Proto(QuicConnectionProtocol):
        def quic_event_received(self, event) -> None:
            if isinstance(event, DatagramFrameReceived):
                count[0] += 1
            elif isinstance(event, StreamDataReceived) and event.end_stream:
                self._quic.send_stream_data(event.stream_id, str(count[0]).encode(), end_stream=True)
                self.transmit()
                asyncio.get_running_loop().call_later(0.5, lambda: done.done() or done.set_result(None))

    server = await serve("127.0.0.1", 0, configuration=cfg, create_protocol=Proto)
    print(server._transport.get_extra_info("sockname")[1], flush=True)
    await done
    server.close()


# ---------------------------------------------------------------------------------------------------------------
# clients
# ---------------------------------------------------------------------------------------------------------------

async def client_mqvpn(port: int, ca: str, seconds: float, size: int) -> tuple[int, int]:
    from mqvpn.endpoint import QuicEndpoint
    from mqvpn.quic import events as ev
    from mqvpn.quic.config import QuicConfiguration

    cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name="localhost", cafile=ca,
                            datagram_queue_limit=QUEUE)
    handle = await QuicEndpoint.connect(("127.0.0.1", port), cfg)
    quic = handle.quic
    payload = os.urandom(size)
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        while quic.send_datagram_frame(payload):
            sent += 1
        quic.datagrams_dropped = 0
        handle.transmit()
        await asyncio.sleep(0)
    sid = quic.get_next_available_stream_id()
    handle.send_stream_data(sid, b"stats", end_stream=True)
    received = b""
    while True:
        event = await handle.next_event()
        if isinstance(event, ev.StreamDataReceived):
            received += event.data
            if event.end_stream:
                break
    handle.close()
    return sent, int(received)


async def client_aioquic(port: int, ca: str, seconds: float, size: int) -> tuple[int, int]:
    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration

    cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], max_datagram_frame_size=65536, max_datagram_size=1452,
                            server_name="localhost")
    cfg.load_verify_locations(ca)
    async with connect("127.0.0.1", port, configuration=cfg) as client:
        quic = client._quic
        payload = os.urandom(size)
        sent = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            while len(quic._datagrams_pending) < QUEUE:
                quic.send_datagram_frame(payload)
                sent += 1
            client.transmit()
            await asyncio.sleep(0)
        reader, writer = await client.create_stream()
        writer.write(b"stats")
        writer.write_eof()
        received = await reader.read()
        return sent, int(received)


def run_one(impl: str, pki, seconds: float, size: int) -> float:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", impl, "--cert", pki.cert, "--key", pki.key],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        client = client_mqvpn if impl == "mqvpn" else client_aioquic
        sent, received = asyncio.run(asyncio.wait_for(client(port, pki.ca, seconds, size), seconds + 30))
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    rate = received / seconds
    print(f"  {impl:8s} sent {sent:9d}  received {received:9d}  {rate:10.0f} packets/s "
          f"({rate * size * 8 / 1e6:7.1f} Mbit/s of payload)", flush=True)
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=1100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", choices=["mqvpn", "aioquic"], help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run((serve_mqvpn if args.serve == "mqvpn" else serve_aioquic)(args.cert, args.key))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(tmp)
        rates: dict[str, list[float]] = {"mqvpn": [], "aioquic": []}
        print(f"DATAGRAM throughput over loopback, {args.size}-byte payloads, {args.seconds:.0f} s per run")
        for r in range(args.rounds):
            order = ["mqvpn", "aioquic"] if r % 2 == 0 else ["aioquic", "mqvpn"]
            print(f"round {r + 1}")
            for impl in order:
                rates[impl].append(run_one(impl, pki, args.seconds, args.size))
    ours = sorted(rates["mqvpn"])[len(rates["mqvpn"]) // 2]
    theirs = sorted(rates["aioquic"])[len(rates["aioquic"]) // 2]
    print(f"median: mqvpn {ours:.0f} packets/s, aioquic {theirs:.0f} packets/s, ratio {ours / theirs:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
