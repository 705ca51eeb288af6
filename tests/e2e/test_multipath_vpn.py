"""Multipath end to end (first steps): a client with two uplinks (--path ethA --path ethB) brings the tunnel up
over both, and when uplink A silently dies (100 % loss, link up) the tunnel carries on over B without
reconnecting."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.e2e.vpnlab import VpnLab

pytestmark = [pytest.mark.netns, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]


@pytest.fixture
def vpn2(tmp_path):
    v = VpnLab(tmp_path, uplinks=2)
    try:
        yield v
    finally:
        v.close()


def test_two_paths_and_failover_by_blackhole(vpn2):
    vpn = vpn2
    lab = vpn.lab
    lab.shape("A", mbit=None, delay_ms=5)
    lab.shape("B", mbit=None, delay_ms=15)
    vpn.start_server()
    client = vpn.start_client("cli", "--path", "ethA", "--path", "ethB")
    vpn.wait_tunnel()
    vpn.wait_for(lambda: "path 1 over ethB: up" in vpn.log("client.log"), 10, "path B validated")
    res = vpn.run("cli", "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", lab.inet_addr, timeout=20)
    assert res.returncode == 0, res.stdout + vpn.log("client.log")
    assert lab.path("A").stats()["up"]["rx"] > 0 and lab.path("B").stats()["up"]["rx"] > 0  # both paths carried
    # uplink A goes silent (carrier stays up): after a few PTOs the client abandons it and B carries the tunnel
    lab.path("A").blackhole(True)
    t0 = time.monotonic()
    ok = False
    while time.monotonic() - t0 < 10:
        if vpn.run("cli", "ping", "-n", "-c", "1", "-W", "1", lab.inet_addr, timeout=10).returncode == 0:
            ok = True
            break
    assert ok, vpn.log("client.log")[-3000:]
    res = vpn.run("cli", "ping", "-n", "-c", "5", "-i", "0.2", "-W", "2", lab.inet_addr, timeout=20)
    assert res.returncode == 0
    log = vpn.log("client.log")
    assert "path 0 over ethA: down" in log  # noticed by the client (PTOs) or the server (PATH_ABANDON)
    assert "reconnecting" not in log and "tunnel lost" not in log  # the same connection, never re-established
    assert vpn.stop(client, signal.SIGTERM) == 0
