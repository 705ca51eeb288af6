"""Real UDP on loopback: a restarted server (same reset key, state lost) makes the client give up at once through a
stateless reset instead of waiting for its idle timeout."""

import asyncio
import time

from mqvpn.endpoint import QuicEndpoint
from mqvpn.quic import events as ev
from mqvpn.quic.config import QuicConfiguration

from tests.interop.peers import run


def test_server_restart_triggers_stateless_reset(test_pki):
    async def main():
        cfg = QuicConfiguration(is_client=False, alpn_protocols=["t"])
        cfg.load_cert_chain(test_pki.cert, test_pki.key)
        server = await QuicEndpoint.serve(("127.0.0.1", 0), cfg, lambda h: None)
        port = server.local_addr[1]
        client_cfg = QuicConfiguration(is_client=True, alpn_protocols=["t"], server_name="localhost",
                                       cafile=test_pki.ca, idle_timeout=30)
        client = await QuicEndpoint.connect(("127.0.0.1", port), client_cfg)
        terminated = []
        client.event_handler = lambda e: terminated.append(e) if isinstance(e, ev.ConnectionTerminated) else None
        server.close()  # the server process "dies": all connection state is gone
        await asyncio.sleep(0.05)
        restarted = await QuicEndpoint.serve(("127.0.0.1", port), cfg, lambda h: None)  # same key, same port
        t0 = time.monotonic()
        client.send_datagram_frame(b"x" * 100)
        await asyncio.wait_for(client.wait_closed(), 5)
        elapsed = time.monotonic() - t0
        restarted.close()
        return terminated, elapsed, restarted.stateless_resets_sent

    terminated, elapsed, sent = run(main(), 20)
    assert sent >= 1
    assert terminated and "reset" in terminated[0].reason_phrase
    assert elapsed < 5.0  # not the 30 s idle timeout
