"""mqvpn's QUIC against independent implementations (aioquic 1.7.2, qh3 2.1.0), both directions, over real UDP on
loopback with certificate verification on. Pairs are named client-server.
"""

from __future__ import annotations

import asyncio

import pytest

from . import mqvpn_peer  # noqa: F401  (registers the "mqvpn" kind)
from .peers import (
    EchoStats,
    InteropError,
    Result,
    echo_server,
    measure_idle_timeout,
    run,
    run_client,
    wait_until,
)
from .relay import LossyRelay

pytestmark = pytest.mark.interop

MB = 2**20
PAIRS = [("mqvpn", "aioquic"), ("aioquic", "mqvpn"), ("mqvpn", "qh3"), ("qh3", "mqvpn")]
IDS = [f"{c}-{s}" for c, s in PAIRS]


def server_ok(stats: EchoStats, result: Result) -> None:
    stats.check(result)
    assert stats.datagrams_echoed == stats.datagrams


@pytest.mark.parametrize("client,server", PAIRS + [("mqvpn", "mqvpn")], ids=IDS + ["mqvpn-mqvpn"])
def test_clean_transfer_with_key_update(client, server, test_pki):
    """10 MB stream echo (sha256) + 10,000 DATAGRAMs concurrently, client key update half-way, graceful close."""

    async def main():
        async with echo_server(server, cert=test_pki.cert, key=test_pki.key) as srv:
            r = await run_client(client, *srv, test_pki.ca, key_update=True)
            stats = (await srv.handle.wait_all_terminated(5))[0]
            return r, stats

    r, stats = run(main(), 60)
    print(r.summary())
    assert r.alpn == "mqvpn-test"
    assert r.stream_ok and r.stream_bytes == 10 * MB
    assert r.datagrams_sent == 10_000 and r.datagram_ratio >= 0.99 and r.datagrams_corrupt == 0
    assert r.key_update_requested and r.key_phases_after[0] == 1 and r.rx_bytes_after_key_update > 0
    assert r.closed and r.close_error is not None and r.close_error[0] == 0
    server_ok(stats, r)
    assert stats.key_phases == (1, 1)  # the server followed, exactly once
    assert stats.send_phase_changes == stats.recv_phase_changes == 1


@pytest.mark.parametrize("client,server", PAIRS, ids=IDS)
def test_server_initiated_key_update(client, server, test_pki):
    n, window = 2000, 64
    # aioquic keeps no old read keys: packets in flight under the old keys are lost when it initiates
    min_ratio = 1 - (window + 8) / n if server == "aioquic" else 0.99

    async def main():
        async with echo_server(server, cert=test_pki.cert, key=test_pki.key, key_update_after=1 * MB) as srv:
            r = await run_client(client, *srv, test_pki.ca, stream_bytes=3 * MB, datagrams=n, datagram_window=window,
                                 min_datagram_ratio=min_ratio)
            stats = (await srv.handle.wait_all_terminated(5))[0]
            return r, stats

    r, stats = run(main(), 30)
    print(r.summary())
    assert stats.key_updates_requested == 1
    assert stats.key_phases == (1, 1)
    assert r.key_phases_end == (1, 1)  # the client followed
    server_ok(stats, r)


LOSSY = {
    "loss1": dict(loss=0.01),
    "loss5-reorder-dup": dict(loss=0.05, reorder=0.05, duplicate=0.03),
}


@pytest.mark.parametrize("impair", list(LOSSY), ids=list(LOSSY))
@pytest.mark.parametrize("client,server", PAIRS, ids=IDS)
def test_lossy_transfer(client, server, impair, test_pki):
    """10 MB echoed intact through a lossy, reordering, duplicating relay; DATAGRAMs are lost, never duplicated."""
    params = LOSSY[impair]

    async def main():
        async with echo_server(server, cert=test_pki.cert, key=test_pki.key) as srv:
            async with LossyRelay(upstream=srv, seed=7, **params) as relay:
                r = await run_client(client, *relay.address, test_pki.ca, datagrams=2000, check=False,
                                     stall_timeout=20)
                try:
                    stats = (await srv.handle.wait_all_terminated(5))[0]
                except InteropError:
                    # the client's one CONNECTION_CLOSE can be lost on a lossy path (RFC 9000 §10.2: it is not
                    # retransmitted); the server then ends at its idle timeout, which this test does not wait for
                    stats = srv.handle.stats[0]
                return r, stats, relay

    r, stats, relay = run(main(), 90)
    print(r.summary())
    print("relay c2s", relay.c2s.as_dict(), "s2c", relay.s2c.as_dict())
    loss = params["loss"]
    r.check(min_datagram_ratio=(1 - loss) ** 2 - 0.05)
    assert r.stream_ok and r.stream_bytes == 10 * MB
    assert r.datagrams_duplicate == 0 and r.datagrams_corrupt == 0
    for st in (relay.c2s, relay.s2c):
        assert st.dropped > 0
        if params.get("duplicate"):
            assert st.duplicated > 0 and st.reordered > 0
    stats.check(r, expect_graceful_close=stats.terminated is not None)
    assert stats.datagrams_echoed == stats.datagrams


@pytest.mark.parametrize("client,server", PAIRS, ids=IDS)
def test_idle_timeout_from_peer(client, server, test_pki):
    """Client idle_timeout 30 s, server 1 s: both ends give up ~1 s after the last packet (min of the two)."""
    idle = 1.0

    async def main():
        async with echo_server(server, cert=test_pki.cert, key=test_pki.key, idle_timeout=idle) as srv:
            res = await measure_idle_timeout(client, *srv, test_pki.ca, idle_timeout=30.0, max_wait=5)
            stats = (await srv.handle.wait_all_terminated(3))[0]
            return res, stats

    res, stats = run(main(), 20)
    print(res)
    assert idle * 0.95 <= res.since_last_rx <= idle + 0.5
    assert "idle" in (res.reason or "").lower()
    assert stats.terminated is not None and "idle" in stats.terminated[2].lower()


@pytest.mark.parametrize("server", ["aioquic", "qh3"])
def test_our_client_rejects_unknown_ca(server, test_pki, other_pki):
    async def main():
        async with echo_server(server, cert=test_pki.cert, key=test_pki.key) as srv:
            with pytest.raises(InteropError, match="handshake failed"):
                await run_client("mqvpn", *srv, other_pki.ca, stream_bytes=0, datagrams=0)

    run(main(), 20)


@pytest.mark.parametrize("server", ["aioquic", "qh3"])
def test_our_client_rejects_wrong_name(server, test_pki):
    async def main():
        async with echo_server(server, cert=test_pki.cert, key=test_pki.key) as srv:
            with pytest.raises(InteropError, match="handshake failed"):
                await run_client("mqvpn", *srv, test_pki.ca, server_name="example.com", stream_bytes=0,
                                 datagrams=0)

    run(main(), 20)


@pytest.mark.parametrize("client,server", PAIRS, ids=IDS)
def test_alpn_mismatch_fails(client, server, test_pki):
    async def main():
        async with echo_server(server, cert=test_pki.cert, key=test_pki.key, alpn=["other"]) as srv:
            with pytest.raises(InteropError):
                await run_client(client, *srv, test_pki.ca, stream_bytes=0, datagrams=0)

    run(main(), 20)


@pytest.mark.parametrize("client,server", [("aioquic", "mqvpn"), ("mqvpn", "aioquic"), ("mqvpn", "mqvpn")],
                         ids=["aioquic-mqvpn", "mqvpn-aioquic", "mqvpn-mqvpn"])
def test_retry(client, server, test_pki):
    """Server sends Retry first; the client answers with the token and the connection works."""

    async def main():
        async with echo_server(server, cert=test_pki.cert, key=test_pki.key, retry=True) as srv:
            r = await run_client(client, *srv, test_pki.ca, stream_bytes=1 * MB, datagrams=500)
            stats = (await srv.handle.wait_all_terminated(5))[0]
            return r, stats

    r, stats = run(main(), 30)
    assert r.stream_ok
    server_ok(stats, r)


@pytest.mark.parametrize("client,server", [("aioquic", "mqvpn"), ("mqvpn", "aioquic")],
                         ids=["aioquic-mqvpn", "mqvpn-aioquic"])
def test_ipv6_loopback(client, server, test_pki):
    async def main():
        async with echo_server(server, "::1", cert=test_pki.cert, key=test_pki.key) as srv:
            return await run_client(client, "::1", srv[1], test_pki.ca, stream_bytes=1 * MB, datagrams=500)

    r = run(main(), 30)
    assert r.stream_ok


@pytest.mark.parametrize("suite", [0x1301, 0x1302, 0x1303], ids=["aes128gcm", "aes256gcm", "chacha20"])
@pytest.mark.parametrize("client,server", [("mqvpn", "aioquic"), ("aioquic", "mqvpn")],
                         ids=["mqvpn-aioquic", "aioquic-mqvpn"])
def test_each_cipher_suite(client, server, suite, test_pki):
    """The handshake negotiates the one suite both offer; streams and datagrams work under it."""
    from aioquic.tls import CipherSuite

    extra = {"cipher_suites": [suite] if client == "mqvpn" else [CipherSuite(suite)]}

    async def main():
        async with echo_server(server, cert=test_pki.cert, key=test_pki.key) as srv:
            from .peers import ClientOptions
            options = ClientOptions(cafile=test_pki.ca, extra=extra)
            r = await run_client(client, *srv, test_pki.ca, stream_bytes=256 * 1024, datagrams=200, options=options)
            quic = srv.handle.protocols[0]
            return r, quic

    r, server_side = run(main(), 30)
    assert r.stream_ok
    if server == "mqvpn":
        assert server_side.quic._send_key[3].cipher_suite == suite


def test_server_accepts_client_hello_without_sni(test_pki):
    """A client dialling an IP literal sends no SNI (RFC 6066); our server must still serve it."""

    async def main():
        async with echo_server("mqvpn", cert=test_pki.cert, key=test_pki.key) as srv:
            return await run_client("aioquic", *srv, test_pki.ca, server_name="127.0.0.1", stream_bytes=64 * 1024,
                                    datagrams=50)

    assert run(main(), 30).stream_ok
