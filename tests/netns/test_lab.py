"""The namespace testbed itself: topology, delay line impairments, rate limits, teardown."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.netns import lab as labmod
from tests.netns.lab import Lab, cleanup_stale, list_namespaces, pids_in, unavailable

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# helpers


def ping(lab: Lab, *args: str, count: int = 3, interval: float = 0.05, ns: str = "cli", wait: float = 1):
    """ping; returns (received, list of RTTs in ms, output)."""
    res = lab.run(ns, "ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(wait), *args, check=False,
                  timeout=count * interval + wait + 10)  # fmt: skip
    received = int(re.search(r"(\d+) received", res.stdout).group(1)) if "received" in res.stdout else 0
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", res.stdout)]
    return received, rtts, res.stdout + res.stderr


def pings_ok(lab: Lab, *args: str, ns: str = "cli") -> bool:
    return ping(lab, *args, count=2, interval=0.05, ns=ns)[0] == 2


UDP_RECV = r"""
import hashlib, json, select, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((host, port))
print("ready", flush=True)
def payload(seq, size=200):
    head = seq.to_bytes(4, "big")
    return head + (hashlib.sha256(head).digest() * 7)[: size - 4]
got, wait = [], 5.0
while select.select([s], [], [], wait)[0]:
    d = s.recv(65535)
    seq = int.from_bytes(d[:4], "big")
    got.append([seq, d == payload(seq)])
    wait = 0.5
print(json.dumps(got), flush=True)
"""

UDP_SEND = r"""
import hashlib, socket, sys, time
host, port, count, gap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
def payload(seq, size=200):
    head = seq.to_bytes(4, "big")
    return head + (hashlib.sha256(head).digest() * 7)[: size - 4]
data = [payload(i) for i in range(count)]
print("go", flush=True)
t0 = time.monotonic()
for seq in range(count):
    while time.monotonic() < t0 + seq * gap:
        pass
    s.sendto(data[seq], (host, port))
"""


def udp_flow(lab: Lab, count: int, gap: float, *, v6: bool = False, port: int = 9000, during=None):
    """Send ``count`` numbered 200-byte datagrams cli -> srv, ``gap`` seconds apart; returns the
    received [(seq, intact)] in arrival order. ``during`` is called once the sender runs."""
    host = lab.server_addr6 if v6 else lab.server_addr
    recv = lab.py_popen("srv", ["-c", UDP_RECV, host, str(port)], stdout=subprocess.PIPE, text=True)
    assert recv.stdout.readline().strip() == "ready"
    send = lab.py_popen(
        "cli", ["-c", UDP_SEND, host, str(port), str(count), str(gap)], stdout=subprocess.PIPE, text=True
    )
    assert send.stdout.readline().strip() == "go"
    if during:
        during()
    send.wait(timeout=30)
    out, _ = recv.communicate(timeout=30)
    return [(seq, ok and seq < count) for seq, ok in json.loads(out)]


_ports = iter(range(5201, 5300))


def iperf(lab: Lab, *args: str, seconds: int = 3, bind: str | None = None) -> subprocess.Popen:
    """Start one bounded iperf3 TCP run cli -> srv (a one-off server on a fresh port per run)."""
    port = next(_ports)
    lab.popen("srv", "iperf3", "-s", "-1", "-p", str(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while f":{port}" not in lab.run("srv", "ss", "-Hltn").stdout:
        assert time.monotonic() < deadline, "iperf3 server did not start"
        time.sleep(0.02)
    argv = ["iperf3", "-c", lab.server_addr, "-p", str(port), "-t", str(seconds), "-O", "1", "-J",
            "--connect-timeout", "3000", *(["-B", bind] if bind else []), *args]  # fmt: skip
    return lab.popen("cli", *argv, stdout=subprocess.PIPE, text=True)


def iperf_result(proc: subprocess.Popen) -> float:
    out, _ = proc.communicate(timeout=30)
    j = json.loads(out)
    assert "error" not in j, j["error"]
    return j["end"]["sum_received"]["bits_per_second"] / 1e6


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


# ---------------------------------------------------------------------------------------------
# topology


def test_topology_and_routing(lab2):
    lab = lab2
    a, b = lab.client_uplinks
    sa, sb = lab.path("A"), lab.path("B")
    # default route: uplink A
    sa.reset_stats(), sb.reset_stats()
    assert pings_ok(lab, lab.server_addr)
    assert sa.stats()["up"]["rx"] >= 2 and sb.stats()["up"]["rx"] == 0
    # SO_BINDTODEVICE to ethB, and source address of B (policy rule): through B
    for args in (("-I", b.dev), ("-I", b.addr)):
        sa.reset_stats(), sb.reset_stats()
        assert pings_ok(lab, *args, lab.server_addr), args
        assert sb.stats()["up"]["rx"] >= 2 and sb.stats()["down"]["tx"] >= 2 and sa.stats()["up"]["rx"] == 0, args
    # bound to A explicitly
    assert pings_ok(lab, "-I", a.dev, lab.server_addr)
    # IPv6 on both uplinks
    sb.reset_stats()
    assert pings_ok(lab, "-6", lab.server_addr6)
    assert pings_ok(lab, "-6", "-I", b.dev, lab.server_addr6)
    assert pings_ok(lab, "-6", "-I", b.addr6, lab.server_addr6)
    assert sb.stats()["up"]["rx"] >= 4
    # server <-> internet
    assert pings_ok(lab, lab.inet_addr, ns="srv")
    assert pings_ok(lab, "-6", lab.inet_addr6, ns="srv")
    # the client reaches the internet host only through a VPN; inet has no route back
    assert ping(lab, lab.inet_addr, count=1, wait=0.3)[0] == 0
    assert ping(lab, "-6", lab.inet_addr6, count=1, wait=0.3)[0] == 0
    assert "10.10." not in lab.run("inet", "ip", "route").stdout
    assert ping(lab, a.addr, count=1, wait=0.3, ns="inet")[0] == 0
    # the delay line's frames are wire-sized with complete checksums (offloads off)
    st = sa.stats()
    assert st["up"]["oversize"] == st["down"]["oversize"] == 0


def test_rtt_is_twice_the_delay(mlab):
    lab = mlab
    for args, lo, hi in ((("-I", "ethA"), 17, 23), (("-I", "ethB"), 55, 65), (("-6", "-I", "ethB"), 55, 65)):
        received, rtts, out = ping(lab, *args, lab.server_addr6 if "-6" in args else lab.server_addr,
                                   count=10, interval=0.02)  # fmt: skip
        assert received == 10, out
        avg = sum(rtts) / len(rtts)
        assert lo <= avg <= hi, (args, rtts)
        assert max(rtts) - min(rtts) < 3, (args, rtts)  # a steady delay


def test_delay_changes_at_run_time(lab):
    path = lab.path("A")
    path.set(delay_ms=5)
    assert 8 <= sum(ping(lab, lab.server_addr, count=5)[1]) / 5 <= 13
    path.set("up", delay_ms=20)  # asymmetric: 20 up + 5 down
    rtts = ping(lab, lab.server_addr, count=5)[1]
    assert 22 <= sum(rtts) / len(rtts) <= 28, rtts
    assert path.params()["up"]["delay"] == 20 and path.params()["down"]["delay"] == 5
    path.clear()
    assert max(ping(lab, lab.server_addr, count=3)[1]) < 3


def test_jitter_keeps_order(lab):
    lab.path("A").set("up", delay_ms=10, jitter_ms=5)
    got = udp_flow(lab, 300, 0.0005)
    seqs = [s for s, _ in got]
    assert seqs == sorted(seqs) and len(seqs) == 300


# ---------------------------------------------------------------------------------------------
# loss and friends


def test_random_loss_10_percent(lab):
    path = lab.path("A")
    path.set("up", loss=0.1, seed=7)
    received, _, out = ping(lab, lab.server_addr, count=500, interval=0.01, wait=1)
    lost = 500 - received
    assert 25 <= lost <= 75, out[-300:]  # 10 % +- 5 %
    st = path.stats()["up"]
    assert st["drop_loss"] >= lost  # (a stray IPv6 multicast report may be dropped too)
    assert path.stats()["down"]["drop_loss"] == 0


def test_drop_next_is_one_exact_burst(lab):
    path = lab.path("A")
    got = udp_flow(lab, 400, 0.001, during=lambda: (time.sleep(0.1), path.drop_next(7, "up")))
    missing = sorted(set(range(400)) - {s for s, _ in got})
    assert len(missing) == 7 and missing == list(range(missing[0], missing[0] + 7)), missing
    assert path.stats()["up"]["drop_next"] == 7


def test_loss_bursts(lab):
    path = lab.path("A")
    path.set("up", burst_p=0.01, burst_len=5, seed=3)
    got = udp_flow(lab, 3000, 0.0001)
    have = {s for s, _ in got}
    runs, run = [], 0
    for seq in range(3000):
        if seq in have:
            if run:
                runs.append(run)
            run = 0
        else:
            run += 1
    lost = 3000 - len(have)
    assert path.stats()["up"]["drop_burst"] >= lost > 0
    assert len(runs) >= 10 and 3 <= lost / len(runs) <= 8, runs  # mean burst about 5


def test_reorder_duplicate_corrupt(lab):
    path = lab.path("A")
    # reordering: a held packet arrives after later ones
    path.set("up", reorder=0.2, reorder_ms=5, seed=1)
    got = udp_flow(lab, 300, 0.001)
    late, top = 0, -1
    for seq, _ in got:
        late += seq < top
        top = max(top, seq)
    held = path.stats()["up"]["reorder"]
    assert len(got) == 300 and held > 20 and late >= 0.8 * held, (late, held)
    # duplication
    path.clear()
    path.reset_stats()
    path.set("up", duplicate=0.2)
    got = udp_flow(lab, 300, 0.0005, port=9001)
    assert len({s for s, _ in got}) == 300
    assert len(got) - 300 == path.stats()["up"]["dup"] > 20
    # corruption: delivered (checksum patched), content damaged
    path.clear()
    path.reset_stats()
    path.set("up", corrupt=0.2)
    got = udp_flow(lab, 300, 0.0005, port=9002)
    assert len(got) == 300
    assert sum(not ok for _, ok in got) == path.stats()["up"]["corrupt"] > 20


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_corrupted_packets_carry_valid_checksums(lab, v6):
    lab.path("A").set("up", corrupt=1.0)
    dump = lab.popen("srv", "tcpdump", "-l", "-n", "-vv", "-i", lab.server_dev, "-c", "50", "udp", "port", "9003",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 5
    while "listening" not in dump.stderr.readline():
        assert time.monotonic() < deadline
    got = udp_flow(lab, 50, 0.001, v6=v6, port=9003)
    out, _ = dump.communicate(timeout=10)
    assert len(got) == 50 and not any(ok for _, ok in got)
    assert out.count("udp sum ok") == 50, out[-500:]


def test_queue_limit(lab):
    path = lab.path("A")
    path.set("up", delay_ms=50, limit=20)
    got = udp_flow(lab, 100, 0.0001)  # all sent within ~10 ms, long before the first leaves
    st = path.stats()["up"]
    assert len(got) == 20 and st["drop_limit"] == 80 and st["qmax"] == 20, st


def test_blackhole_keeps_the_link_up(lab):
    path = lab.path("A")
    assert pings_ok(lab, lab.server_addr)
    path.blackhole()
    assert ping(lab, lab.server_addr, count=5, interval=0.05, wait=0.3)[0] == 0
    assert lab.carrier("A")
    assert "NO-CARRIER" not in lab.run("cli", "ip", "link", "show", "ethA").stdout
    assert path.stats()["up"]["drop_blackhole"] >= 5
    path.blackhole(False)
    assert pings_ok(lab, lab.server_addr)


def test_link_down_is_carrier_loss(lab2):
    lab = lab2
    assert lab.run("cli", "cat", "/sys/class/net/ethA/carrier").stdout.strip() == "1"
    lab.link_down("A")
    assert lab.run("cli", "cat", "/sys/class/net/ethA/carrier").stdout.strip() == "0"
    assert "NO-CARRIER" in lab.run("cli", "ip", "link", "show", "ethA").stdout
    assert ping(lab, "-I", "ethA", lab.server_addr, count=2, wait=0.3)[0] == 0
    # unbound traffic falls back to B (routes over a link without carrier are ignored)
    lab.path("B").reset_stats()
    assert pings_ok(lab, lab.server_addr)
    assert lab.path("B").stats()["up"]["rx"] >= 2
    lab.link_up("A")
    assert lab.run("cli", "cat", "/sys/class/net/ethA/carrier").stdout.strip() == "1"
    assert pings_ok(lab, "-I", "ethA", lab.server_addr)


# ---------------------------------------------------------------------------------------------
# rate limits


def test_rate_limits_with_delay(mlab, capsys):
    """TCP through A (300 Mbit/s, 10 ms) and B (80 Mbit/s, 30 ms), one at a time then together.
    iperf3 reports goodput: about 95.6 % of the wire rate with 1448-byte segments in 1514-byte frames."""
    lab = mlab
    results = {}
    for name, bind, rate in (("A", None, 300), ("B", lab.uplink("B").addr, 80)):
        path = lab.path(name)
        path.reset_stats()
        c0, t0 = cpu_seconds(path.pid), time.monotonic()
        mbit = iperf_result(iperf(lab, bind=bind))
        up = path.stats()["up"]
        late = up["late_sum_us"] / up["tx"] / 1000
        results[name] = (mbit, 100 * (cpu_seconds(path.pid) - c0) / (time.monotonic() - t0), late)
        # the limiter is in force (never above the rate) and the path carries traffic; how close to the rate a
        # shared CI machine gets is printed below, never asserted (DEVELOPERS.md: no speed in a test)
        assert 0 < mbit <= 1.15 * rate, (name, mbit)
        assert up["oversize"] == 0
    pa = iperf(lab)
    pb = iperf(lab, bind=lab.uplink("B").addr)
    both = iperf_result(pa), iperf_result(pb)
    assert all(b > 0 for b in both) and both[0] <= 1.15 * 300 and both[1] <= 1.15 * 80, both
    with capsys.disabled():
        print(
            f"\n[lab] iperf3 TCP goodput: A {results['A'][0]:.1f} Mbit/s (delay line CPU {results['A'][1]:.0f} %,"
            f" mean lateness {results['A'][2]:.2f} ms), B {results['B'][0]:.1f} Mbit/s (CPU {results['B'][1]:.0f} %,"
            f" {results['B'][2]:.2f} ms),"
            f" A+B together {both[0]:.1f} + {both[1]:.1f} = {sum(both):.1f} Mbit/s"
        )


# ---------------------------------------------------------------------------------------------
# lifecycle


def test_teardown_leaves_nothing():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    lab = Lab(2)
    sleeper = lab.popen("srv", "sleep", "600")
    lab.popen("inet", "sh", "-c", "sleep 600 & sleep 600")  # a grandchild too
    names = set(lab.ns.values())
    inodes = {labmod.namespace_inode(n) for n in names}
    helpers = lab.helper_pids()
    deadline = time.monotonic() + 5
    while len(pids_in(inodes)) < 6:  # 2 delay lines, sleep, sh and its 2 sleeps
        assert time.monotonic() < deadline, pids_in(inodes)
        time.sleep(0.02)
    lab.close()
    assert not names & set(list_namespaces())
    assert sleeper.returncode is not None
    assert pids_in(inodes) == []
    for pid in helpers:
        assert not Path(f"/proc/{pid}").exists(), pid
    assert not (labmod.RECORDS / f"{lab.prefix[:-1]}.json").exists()


def test_two_labs_at_once():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with Lab(1) as one, Lab(1) as two:
        assert one.prefix != two.prefix and not set(one.ns.values()) & set(two.ns.values())
        one.path("A").blackhole()
        assert ping(one, one.server_addr, count=1, wait=0.3)[0] == 0
        assert pings_ok(two, two.server_addr)
        two.path("A").set(delay_ms=15)
        one.path("A").blackhole(False)
        assert max(ping(one, one.server_addr, count=3)[1]) < 5
        assert min(ping(two, two.server_addr, count=3)[1]) >= 29


def test_stale_cleanup_only_touches_dead_runs():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    dead = subprocess.Popen(["true"])
    dead.wait()
    prefixes = []
    try:
        for pid in (dead.pid, os.getpid()):
            prefix, rec = labmod._claim_prefix()
            rec.write_text(json.dumps({"pid": pid, "start": labmod._start_time(pid), "prefix": prefix}))
            subprocess.run(["ip", "netns", "add", prefix + "cli"], check=True)
            prefixes.append((prefix, rec))
        removed = cleanup_stale()
        (dead_prefix, dead_rec), (live_prefix, live_rec) = prefixes
        assert dead_prefix + "cli" in removed and not dead_rec.exists()
        assert not any(ns.startswith(live_prefix) for ns in removed)
        assert live_prefix + "cli" in list_namespaces() and live_rec.exists()
    finally:
        for prefix, rec in prefixes:
            subprocess.run(["ip", "netns", "del", prefix + "cli"], check=False, capture_output=True)
            rec.unlink(missing_ok=True)
