"""Tun: open/configure/close, read and write round trips with the kernel as the peer, drops, speed."""

from __future__ import annotations

import os
import select
import socket
import struct
import time

import pytest

from mqvpn.linux.netlink import Netlink
from mqvpn.linux.tun import Tun
from tests.linux.conftest import needs_tun
from tests.linux.test_icmp import ipv4, ipv6, ref_checksum

pytestmark = needs_tun


@pytest.fixture
def nl(netns):
    with Netlink() as nl:
        yield nl


@pytest.fixture
def tun(nl):
    tun = Tun.open("mqt0", mtu=1400, netlink=nl)
    nl.add_address("mqt0", "10.9.0.1/24")
    nl.add_address("mqt0", "fd00:9::1/64")
    yield tun
    tun.close()


def read_until(tun: Tun, want, timeout: float = 2.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([tun.fd], [], [], 0.1)
        for packet in tun.read_batch():
            if want(packet):
                return packet
    raise AssertionError("expected packet never came out of the TUN")


def echo4(src: str, dst: str, ident: int, seq: int, data: bytes = b"ping" * 8) -> bytes:
    msg = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    msg = msg[:2] + struct.pack("!H", ref_checksum(msg)) + msg[4:]
    return ipv4(src, dst, proto=1, payload=msg)


def test_open_configures_the_interface(nl, tun):
    info = nl.link_info("mqt0")
    assert tun.name == "mqt0"
    assert info.up and info.mtu == 1400 and info.txqueuelen == 1000
    assert os.get_blocking(tun.fd) is False
    tun.set_mtu(1280, netlink=nl)
    assert nl.link_info("mqt0").mtu == 1280
    tun.set_mtu(1300)  # with its own short-lived Netlink
    assert nl.link_info("mqt0").mtu == 1300


def test_close_removes_the_interface(nl):
    tun = Tun.open("mqt1", txqueuelen=77, netlink=nl)
    assert nl.link_info("mqt1").txqueuelen == 77
    tun.close()
    tun.close()  # idempotent
    assert nl.link_index("mqt1") is None


def test_persistent_tun_outlives_the_descriptor(nl):
    tun = Tun.open("mqt2", persist=True, netlink=nl)
    tun.close()
    assert nl.link_index("mqt2") is not None
    again = Tun.open("mqt2", persist=True, netlink=nl)  # attach to it again
    again.close()
    assert nl.del_link("mqt2") is True
    assert nl.link_index("mqt2") is None


def test_kernel_picks_the_number(nl):
    with Tun.open("mqx%d", netlink=nl) as tun:
        assert tun.name.startswith("mqx") and tun.name[3:].isdigit()
        assert nl.link_index(tun.name) is not None


def test_bad_names(netns):
    with pytest.raises(ValueError):
        Tun.open("")
    with pytest.raises(ValueError):
        Tun.open("x" * 16)


def test_read_what_the_kernel_routes_into_the_tun(tun):
    tun.read_batch()  # IPv6 router solicitations and the like: never blocks, whatever is (not) there
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"hello tun", ("10.9.0.5", 4000))
    packet = read_until(tun, lambda p: p[0] >> 4 == 4 and p[9] == 17)
    assert packet[12:16] == socket.inet_aton("10.9.0.1") and packet[16:20] == socket.inet_aton("10.9.0.5")
    assert packet[20 + 8 :] == b"hello tun"
    assert tun.rx_packets >= 1


def test_write_a_ping_and_read_the_kernels_answer(tun):
    assert tun.write(echo4("10.9.0.2", "10.9.0.1", 0x4242, 7))
    reply = read_until(tun, lambda p: p[0] >> 4 == 4 and p[9] == 1 and p[20] == 0)
    assert reply[12:16] == socket.inet_aton("10.9.0.1") and reply[16:20] == socket.inet_aton("10.9.0.2")
    assert struct.unpack("!HH", reply[24:28]) == (0x4242, 7)
    assert tun.tx_packets == 1


def test_write_ipv6_to_a_local_socket(tun):
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("fd00:9::1", 6000))
        sock.settimeout(2)
        payload = b"over ipv6"
        udp = struct.pack("!HHHH", 6001, 6000, 8 + len(payload), 0) + payload
        pseudo = socket.inet_pton(socket.AF_INET6, "fd00:9::2") + socket.inet_pton(socket.AF_INET6, "fd00:9::1")
        check = ref_checksum(pseudo + struct.pack("!I3xB", len(udp), 17) + udp)
        udp = udp[:6] + struct.pack("!H", check) + udp[8:]
        assert tun.write(ipv6("fd00:9::2", "fd00:9::1", payload=udp))
        data, addr = sock.recvfrom(100)
        assert data == payload and addr[0] == "fd00:9::2" and addr[1] == 6001


def test_write_batch_and_counters(tun):
    packets = [echo4("10.9.0.2", "10.9.0.1", 1, seq) for seq in range(10)]
    assert tun.write_batch(packets) == 10
    seen = set()
    deadline = time.monotonic() + 2
    while len(seen) < 10 and time.monotonic() < deadline:
        select.select([tun.fd], [], [], 0.1)
        for p in tun.read_batch(4):  # a small batch size: read_batch stops at max_packets
            if p[9] == 1 and p[20] == 0:
                seen.add(struct.unpack("!H", p[26:28])[0])
    assert seen == set(range(10))
    assert tun.tx_packets == 10


def test_garbage_is_dropped_not_raised(tun):
    assert tun.write(b"\x00" * 40) is False
    assert tun.write(b"") is False
    assert tun.write_batch([b"\x10" * 30, echo4("10.9.0.2", "10.9.0.1", 2, 2)]) == 1
    assert tun.tx_dropped == 3 and tun.tx_packets == 1 and tun.last_errno != 0


def test_write_to_a_down_interface_is_dropped(nl, tun):
    nl.set_link("mqt0", up=False)
    assert tun.write(echo4("10.9.0.2", "10.9.0.1", 3, 3)) is False
    assert tun.tx_dropped == 1


def test_closed_tun_raises(tun):
    tun.close()
    with pytest.raises(OSError):
        tun.write(echo4("10.9.0.2", "10.9.0.1", 3, 3))


def test_speed(tun):
    """µs per packet for read_batch and write (1400-byte UDP packets). Printed with MQVPN_BENCH=1."""
    rounds, batch = 200, 64
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
    rx.bind(("10.9.0.1", 7000))
    rx.setblocking(False)
    payload = b"w" * (1400 - 28)
    udp = struct.pack("!HHHH", 7001, 7000, 8 + len(payload), 0) + payload  # checksum 0: none (IPv4)
    packet = ipv4("10.9.0.2", "10.9.0.1", payload=udp)
    write_time = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(batch):
            tun.write(packet)
        write_time += time.perf_counter() - start
        while True:
            try:
                rx.recv(2048)
            except BlockingIOError:
                break
    assert tun.tx_dropped == 0
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 24)
    read_time = 0.0
    got = 0
    for _ in range(rounds):
        for _ in range(batch):
            tx.sendto(payload, ("10.9.0.5", 7000))
        start = time.perf_counter()
        got += len(tun.read_batch(batch))
        read_time += time.perf_counter() - start
    rx.close()
    tx.close()
    assert got >= rounds * batch * 0.9
    per_write = write_time / (rounds * batch) * 1e6
    per_read = read_time / got * 1e6
    assert per_write < 100 and per_read < 100
    if os.environ.get("MQVPN_BENCH"):
        print(f"\nTUN write {per_write:.2f} µs/packet, read_batch {per_read:.2f} µs/packet")
