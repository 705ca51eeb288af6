"""Multipath end to end (first steps): a client with two uplinks (--path ethA --path ethB) brings the tunnel up
over both, and when uplink A silently dies (100 % loss, link up) the tunnel carries on over B without
reconnecting."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
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


# --- the failover requirements: a TCP transfer through the tunnel while uplink A (or B) fails ---------

LIGHT = {"A": (100, 10), "B": (40, 30)}  # Mbit/s, one-way ms: rates the 2-vCPU CI box carries with room to spare


def _shape(lab, profile=LIGHT):
    for name, (mbit, delay) in profile.items():
        lab.shape(name, mbit=mbit, delay_ms=delay)


def _uplink_bytes(lab, name):
    return lab.path(name).stats()["up"]["rx_bytes"]


def _transfer_with_fault(vpn, victim: str, fault: str, seconds: float = 9.0, fault_at: float = 2.5,
                         heal_at: float = 5.0, flows: int = 1):
    """One TCP upload through the tunnel; ``victim`` fails at ``fault_at`` and heals at ``heal_at``. Returns the
    100 ms intervals (Mbit/s), and the victim's uplink bytes seen after the heal."""
    lab = vpn.lab
    srv = subprocess.Popen(["ip", "netns", "exec", lab.nsname("inet"), "iperf3", "-s", "-1", "-p", "5202"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        cli = subprocess.Popen(["ip", "netns", "exec", lab.nsname("cli"), "iperf3", "-c", lab.inet_addr, "-p",
                                "5202", "-t", str(seconds), "-i", "0.1", "-P", str(flows), "-J"], stdout=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        time.sleep(fault_at)
        if fault == "carrier":
            lab.link_down(victim)
        else:
            lab.path(victim).blackhole(True)
        time.sleep(max(0.0, heal_at - (time.monotonic() - t0)))
        if fault == "carrier":
            lab.link_up(victim)
        else:
            lab.path(victim).blackhole(False)
        at_heal = _uplink_bytes(lab, victim)
        out, _ = cli.communicate(timeout=seconds + 20)
        after_heal = _uplink_bytes(lab, victim) - at_heal
        assert cli.returncode == 0, out[-2000:]
    finally:
        srv.kill()
        srv.wait()
    report = json.loads(out)
    rates = [iv["sum"]["bits_per_second"] / 1e6 for iv in report["intervals"]]
    return rates, after_heal


def _longest_gap(rates, start: int, floor: float) -> float:
    """Seconds of the longest run of 100 ms intervals below ``floor`` Mbit/s from interval ``start`` on."""
    longest = run = 0
    for r in rates[start:]:
        run = run + 1 if r < floor else 0
        longest = max(longest, run)
    return longest * 0.1


@pytest.mark.parametrize("victim,fault,flows", [("A", "blackhole", 1), ("A", "carrier", 1), ("B", "blackhole", 4),
                                               ("B", "carrier", 4)])
def test_failover_mid_transfer(vpn2, victim, fault, flows):
    """The transfer completes, the tunnel never reconnects, delivery stalls under a second, and the uplink is
    used again within a few seconds of coming back. (One flow stays on the faster A; with four, one is on B.)"""
    vpn = vpn2
    lab = vpn.lab
    _shape(lab)
    vpn.start_server()
    client = vpn.start_client("cli", "--path", "ethA", "--path", "ethB")
    vpn.wait_tunnel()
    vpn.wait_for(lambda: "path 1 over ethB: up" in vpn.log("client.log"), 10, "path B validated")
    rates, after_heal = _transfer_with_fault(vpn, victim, fault, flows=flows)
    before = sorted(rates[5:25])
    floor = 0.1 * before[len(before) // 2]
    gap = _longest_gap(rates, 25, floor)
    log = vpn.log("client.log")
    assert gap < 1.0, f"{gap:.1f} s without delivery: {[round(r) for r in rates]}\n{log[-3000:]}"
    assert "reconnecting" not in log and "tunnel lost" not in log
    assert f"over eth{victim}: down" in log, log[-3000:]
    assert after_heal > 200_000, f"eth{victim} unused after it came back ({after_heal} bytes)\n{log[-3000:]}"
    assert vpn.stop(client, signal.SIGTERM) == 0


@pytest.mark.parametrize("fault", ["blackhole", "carrier"])
def test_a_dead_first_path_does_not_block_the_connect(vpn2, fault):
    vpn = vpn2
    lab = vpn.lab
    _shape(lab, {"A": (None, 5), "B": (None, 15)})
    if fault == "carrier":
        lab.link_down("A")
    else:
        lab.path("A").blackhole(True)
    vpn.start_server()
    t0 = time.monotonic()
    client = vpn.start_client("cli", "--path", "ethA", "--path", "ethB")
    vpn.wait_tunnel(timeout=20)
    took = time.monotonic() - t0
    log = vpn.log("client.log")
    assert "over ethB, address" in log, log[-2000:]
    assert took < (9 if fault == "blackhole" else 5), f"{took:.1f} s to connect"
    res = vpn.run("cli", "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", lab.inet_addr, timeout=20)
    assert res.returncode == 0, log[-2000:]
    # A comes back: the client adds it as a path of the running connection
    if fault == "carrier":
        lab.link_up("A")
    else:
        lab.path("A").blackhole(False)
    vpn.wait_for(lambda: re.search(r"path \d+ over ethA: up", vpn.log("client.log")), 10, "path over ethA")
    assert "reconnecting" not in vpn.log("client.log")
    assert vpn.stop(client, signal.SIGTERM) == 0


def _fds_and_rss(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return fds, rss


def test_twenty_down_up_cycles_leak_nothing(vpn2):
    vpn = vpn2
    lab = vpn.lab
    _shape(lab, {"A": (None, 5), "B": (None, 15)})
    vpn.start_server()
    client = vpn.start_client("cli", "--path", "ethA", "--path", "ethB")
    vpn.wait_tunnel()
    vpn.wait_for(lambda: "path 1 over ethB: up" in vpn.log("client.log"), 10, "path B validated")

    def ping_ok() -> bool:
        return vpn.run("cli", "ping", "-n", "-c", "1", "-W", "2", lab.inet_addr, timeout=10).returncode == 0

    def cycle() -> None:
        lab.link_down("A")
        time.sleep(0.4)
        assert ping_ok()
        lab.link_up("A")
        n = vpn.log("client.log").count("over ethA: up")
        vpn.wait_for(lambda: vpn.log("client.log").count("over ethA: up") > n, 8, "path over ethA back")

    cycle()  # warm-up: the first cycle creates what steady state keeps (caches, the replacement path ID)
    time.sleep(1.0)
    fds0, rss0 = _fds_and_rss(client.pid)
    for _ in range(20):
        cycle()
    time.sleep(2.0)  # sockets of abandoned paths close 1 s after, path state 3 PTO after
    fds1, rss1 = _fds_and_rss(client.pid)
    log = vpn.log("client.log")
    assert fds1 <= fds0, f"file descriptors {fds0} -> {fds1}"
    assert rss1 - rss0 < 8 * 1024, f"RSS grew {rss1 - rss0} kB over 20 cycles"
    assert "reconnecting" not in log and "tunnel lost" not in log
    last = [line for line in log.splitlines() if "DEBUG paths:" in line][-1]
    assert last.count(";") <= 3, last  # path 0 (kept for its handshake state) and a few live/grace paths
    assert ping_ok()
    assert vpn.stop(client, signal.SIGTERM) == 0
