"""UdpBatchSocket and open_udp_socket over real loopback sockets (127.0.0.1 and ::1)."""

from __future__ import annotations

import errno
import select
import socket

import pytest

from mqvpn.linux import udp
from mqvpn.linux.udp import UdpBatchSocket, open_udp_socket


def _has_ipv6() -> bool:
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.bind(("::1", 0))
        s.close()
    except OSError:
        return False
    return True


HOSTS = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback"))]


@pytest.fixture(params=HOSTS)
def host(request):
    return request.param


@pytest.fixture
def sockets():
    opened: list = []

    def make(host: str, **kw) -> UdpBatchSocket:
        opts = {k: kw.pop(k) for k in ("gso", "gro") if k in kw}
        s = UdpBatchSocket(open_udp_socket((host, 0), **kw), **opts)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def numbered(count: int, size: int, start: int = 0) -> list[bytes]:
    """Distinct datagrams: the index in the first 4 bytes, so order and content are both checked."""
    return [(start + i).to_bytes(4, "big") + bytes([(start + i) & 0xFF]) * (size - 4) for i in range(count)]


def drain(sock: UdpBatchSocket, expected: int, timeout: float = 2.0) -> list[bytes]:
    """Everything that arrives until ``expected`` datagrams came or nothing more shows up."""
    got: list[bytes] = []
    while len(got) < expected:
        if not select.select([sock.sock], [], [], timeout)[0]:
            break
        got.extend(data for data, _ in sock.recv_batch(64))
    return got


# --- open_udp_socket ----------------------------------------------------------------------------------------------


def test_open_udp_socket_ipv4_options():
    s = open_udp_socket(("127.0.0.1", 0), rcvbuf=1 << 20, sndbuf=1 << 20)
    try:
        assert s.family == socket.AF_INET and not s.getblocking()
        assert s.getsockopt(socket.IPPROTO_IP, udp.IP_MTU_DISCOVER) == udp.IP_PMTUDISC_PROBE
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 1 << 20  # the kernel doubles it
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 1 << 20
        assert s.getsockname()[1] != 0
    finally:
        s.close()


def test_open_udp_socket_ipv6_only_by_default_and_dual_stack_on_request():
    if not _has_ipv6():
        pytest.skip("no IPv6")
    s = open_udp_socket(("::", 0))
    d = open_udp_socket(("::", 0), dual_stack=True)
    try:
        assert s.family == socket.AF_INET6
        assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert s.getsockopt(socket.IPPROTO_IPV6, udp.IPV6_MTU_DISCOVER) == udp.IPV6_PMTUDISC_PROBE
        assert s.getsockopt(socket.IPPROTO_IPV6, udp.IPV6_DONTFRAG) == 1
        assert d.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        # an IPv4 peer reaches the dual-stack socket and shows up v4-mapped
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.sendto(b"hi", ("127.0.0.1", d.getsockname()[1]))
        select.select([d], [], [], 2)
        data, addr = d.recvfrom(100)
        assert data == b"hi" and addr[0] == "::ffff:127.0.0.1"
    finally:
        s.close()
        d.close()


def test_open_udp_socket_bind_device_and_reuse_port():
    a = open_udp_socket(("127.0.0.1", 0), reuse_port=True, bind_device="lo")
    try:
        b = open_udp_socket(a.getsockname(), reuse_port=True, bind_device="lo")
        b.close()
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0") == b"lo"
    finally:
        a.close()


def test_open_udp_socket_empty_host_is_ipv4_any():
    s = open_udp_socket(("", 0))
    try:
        assert s.family == socket.AF_INET and s.getsockname()[0] == "0.0.0.0"
    finally:
        s.close()


# --- send_batch ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "plain"])
def test_batch_of_equal_datagrams_plus_short_one_arrives_in_order(sockets, host, gso):
    rx = sockets(host, gro=False)
    tx = sockets(host, gso=gso)
    batch = numbered(40, 1300) + [b"\xff" * 200]
    assert tx.send_batch(batch, rx.getsockname()) == 41
    assert drain(rx, 41) == batch
    assert (tx.sent, tx.send_drops, rx.received) == (41, 0, 41)
    if gso:
        if not tx.gso_enabled:
            pytest.skip("kernel without UDP GSO")
        assert tx.gso_batches == 1
    else:
        assert tx.gso_batches == 0


def test_gro_receive_splits_a_gso_batch(sockets, host):
    rx = sockets(host, gro=True)
    tx = sockets(host, gso=True)
    if not (rx.gro_enabled and tx.gso_enabled):
        pytest.skip("kernel without UDP GSO/GRO")
    batch = numbered(30, 1200) + [b"tail"]
    tx.send_batch(batch, rx.getsockname())
    got = rx.recv_batch(64)
    assert [d for d, _ in got] == batch
    assert all(addr[:2] == tx.getsockname()[:2] for _, addr in got)
    assert rx.gro_batches == 1 and rx.received == 31


def test_gro_socket_also_takes_single_datagrams(sockets, host):
    rx = sockets(host, gro=True)
    tx = sockets(host, gso=False)
    batch = numbered(5, 700) + numbered(3, 300, start=5)
    tx.send_batch(batch, rx.getsockname())
    assert drain(rx, 8) == batch


@pytest.mark.parametrize("gro", [True, False], ids=["gro", "plain"])
def test_mixed_sizes_and_oversized_runs(sockets, host, gro):
    rx = sockets(host, gro=gro, rcvbuf=16 << 20)
    tx = sockets(host, gso=True)
    batch = (
        numbered(60, 1300)  # 78,000 bytes: split at GSO_MAX_BYTES (50 x 1300 = 65,000)
        + numbered(100, 100, start=60)  # 100 segments: split at GSO_MAX_SEGMENTS
        + numbered(2, 500, start=160)
        + numbered(3, 1400, start=162)  # larger after smaller: a new run
        + [b"x"]
        + numbered(1, 1400, start=165)
    )
    assert tx.send_batch(batch, rx.getsockname()) == len(batch)
    assert drain(rx, len(batch)) == batch
    if tx.gso_enabled:
        # runs: 50, 10, 64, 36, 2, 3+"x", lone 1400 (plain)
        assert tx.gso_batches == 6


def test_gso_never_joins_runs_longer_than_the_limits(sockets, host):
    rx = sockets(host, gro=False)
    calls: list[int] = []

    class Spy(socket.socket):
        def sendmsg(self, buffers, ancdata=(), flags=0, address=None):
            calls.append(sum(map(len, buffers)))
            assert len(buffers) <= udp.GSO_MAX_SEGMENTS
            return super().sendmsg(buffers, ancdata, flags, address)

    spy = Spy(rx.family, socket.SOCK_DGRAM)
    spy.bind((host, 0))
    tx2 = UdpBatchSocket(spy)
    if not tx2.gso_enabled:
        tx2.close()
        pytest.skip("kernel without UDP GSO")
    try:
        batch = numbered(200, 1000)
        tx2.send_batch(batch, rx.getsockname())
        assert all(total <= udp.GSO_MAX_BYTES for total in calls)
        assert sum(calls) == 200 * 1000
        assert drain(rx, 200) == batch
    finally:
        tx2.close()


# --- failures: never raise, never block, count --------------------------------------------------------------------


class FlakySocket(socket.socket):
    """A real UDP socket whose sendmsg/sendto fail on demand."""

    sendmsg_errno: int | None = None
    sendto_errno: int | None = None
    sendto_ok_before_failing = 0
    sendto_calls = 0

    def sendmsg(self, buffers, ancdata=(), flags=0, address=None):
        if self.sendmsg_errno is not None:
            raise OSError(self.sendmsg_errno, "injected")
        return super().sendmsg(buffers, ancdata, flags, address)

    def sendto(self, data, address):
        self.sendto_calls += 1
        if self.sendto_errno is not None and self.sendto_calls > self.sendto_ok_before_failing:
            raise OSError(self.sendto_errno, "injected")
        return super().sendto(data, address)


def flaky(host: str) -> FlakySocket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = FlakySocket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    return s


def test_gso_turned_off_for_good_on_eio_and_batch_still_delivered(sockets, host):
    rx = sockets(host, gro=False)
    s = flaky(host)
    s.sendmsg_errno = errno.EIO
    tx = UdpBatchSocket(s)
    if not tx.gso_enabled:
        pytest.skip("kernel without UDP GSO")
    try:
        batch = numbered(20, 1300) + numbered(20, 900, start=20)
        assert tx.send_batch(batch, rx.getsockname()) == 40
        assert not tx.gso_enabled and tx.gso_batches == 0
        assert drain(rx, 40) == batch
        assert tx.send_batch(batch, rx.getsockname()) == 40  # plain from now on
        assert drain(rx, 40) == batch
    finally:
        tx.close()


def test_einval_from_an_oversized_segment_keeps_gso_on(sockets, host):
    rx = sockets(host, gro=False)
    s = flaky(host)
    s.sendmsg_errno = errno.EINVAL  # what the kernel says when gso_size exceeds the device MTU
    s.sendto_errno = errno.EMSGSIZE
    tx = UdpBatchSocket(s)
    if not tx.gso_enabled:
        pytest.skip("kernel without UDP GSO")
    try:
        assert tx.send_batch(numbered(4, 1300), rx.getsockname()) == 0
        assert tx.gso_enabled and tx.send_drops == 4 and tx.last_send_errno == errno.EMSGSIZE
    finally:
        tx.close()


@pytest.mark.parametrize("code", [errno.EAGAIN, errno.ENOBUFS])
def test_full_buffer_drops_rest_of_batch_and_counts(sockets, host, code):
    rx = sockets(host, gro=False)
    s = flaky(host)
    s.sendto_errno = code
    s.sendto_ok_before_failing = 3
    tx = UdpBatchSocket(s, gso=False)
    try:
        batch = numbered(10, 500)
        assert tx.send_batch(batch, rx.getsockname()) == 3
        assert (tx.sent, tx.send_drops, tx.last_send_errno) == (3, 7, code)
        assert s.sendto_calls == 4  # gave up on the rest at once
        assert drain(rx, 3) == batch[:3]
    finally:
        tx.close()


def test_full_buffer_during_gso_drops_rest(sockets, host):
    rx = sockets(host, gro=False)
    s = flaky(host)
    s.sendmsg_errno = errno.EAGAIN
    tx = UdpBatchSocket(s, gso=True)
    if not tx.gso_enabled:
        pytest.skip("kernel without UDP GSO")
    try:
        assert tx.send_batch(numbered(100, 1300), rx.getsockname()) == 0
        assert (tx.sent, tx.send_drops) == (0, 100) and tx.gso_enabled
    finally:
        tx.close()


def test_per_datagram_errors_skip_only_that_datagram(sockets, host):
    rx = sockets(host, gro=False)
    tx = sockets(host, gso=False)
    batch = [b"a" * 100, b"b" * 70000, b"c" * 100]  # the middle one cannot be a UDP datagram: EMSGSIZE
    assert tx.send_batch(batch, rx.getsockname()) == 2
    assert tx.send_drops == 1 and tx.last_send_errno == errno.EMSGSIZE
    assert drain(rx, 2) == [batch[0], batch[2]]


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "plain"])
def test_tiny_peer_buffer_never_blocks_or_raises(sockets, host, gso):
    rx = sockets(host, gro=False, rcvbuf=4096)
    tx = sockets(host, gso=gso, sndbuf=4096)
    for _ in range(20):  # bounded: 20 x 64 datagrams into a ~8 KiB receive buffer
        tx.send_batch(numbered(64, 1300), rx.getsockname())
    assert tx.sent + tx.send_drops == 20 * 64
    got = drain(rx, 20 * 64, timeout=0.2)
    assert 0 < len(got) < 20 * 64  # the receiver dropped most; nothing blocked
    assert rx.received == len(got)


def test_recv_batch_respects_max_and_returns_empty_when_idle(sockets, host):
    rx = sockets(host, gro=False)
    tx = sockets(host, gso=False)
    assert rx.recv_batch() == []
    batch = numbered(100, 200)
    tx.send_batch(batch, rx.getsockname())
    select.select([rx.sock], [], [], 2)
    first = rx.recv_batch(10)
    assert [d for d, _ in first] == batch[:10]
    assert [d for d, _ in first][0] is not [d for d, _ in rx.recv_batch(1)][0]  # no shared buffer leaks out
    rest = drain(rx, 89)
    assert rest == batch[11:]


def test_received_bytes_are_immutable_copies(sockets, host):
    rx = sockets(host, gro=False)
    tx = sockets(host, gso=False)
    tx.send_batch([b"one", b"two"], rx.getsockname())
    select.select([rx.sock], [], [], 2)
    got = drain(rx, 2)
    assert got == [b"one", b"two"] and all(type(d) is bytes for d in got)
