"""icmp: TTL decrement, ICMP error builders, rate limiter; checked against an independent checksum, against the
RFC rules on when not to answer, with hypothesis on arbitrary bytes, and by the kernel itself (errors written
into a TUN reach the socket whose packet they quote)."""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqvpn.linux import icmp
from mqvpn.linux.icmp import RateLimiter, decrement_ttl, dest_unreachable, packet_too_big, time_exceeded
from tests.linux.conftest import needs_root, needs_tun

A4 = "192.0.2.1"
B4 = "198.51.100.7"
ME4 = "10.8.0.1"
A6 = "2001:db8::1"
B6 = "2001:db8:1::7"
ME6 = "fd00:8::1"


# --- independent references -----------------------------------------------------------------------------------
def ref_checksum(data: bytes) -> int:
    """RFC 1071, the slow obvious way (big-endian words)."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(
    src=A4, dst=B4, *, proto=17, ttl=64, payload=b"x" * 32, flags_frag=0x4000, ident=0x1234, tos=0, options=b""
) -> bytes:
    ihl = 5 + len(options) // 4
    header = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            tos,
            ihl * 4 + len(payload),
            ident,
            flags_frag,
            ttl,
            proto,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )
        + options
    )
    check = ref_checksum(header)
    return header[:10] + struct.pack("!H", check) + header[12:] + payload


def ipv6(src=A6, dst=B6, *, nh=17, hops=64, payload=b"y" * 32) -> bytes:
    return (
        struct.pack("!IHBB", 0x60000000, len(payload), nh, hops)
        + socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + payload
    )


def icmp4(icmp_type: int, code: int = 0, body: bytes = b"\0" * 4 + b"q" * 20) -> bytes:
    msg = bytes([icmp_type, code, 0, 0]) + body
    check = ref_checksum(msg)
    return msg[:2] + struct.pack("!H", check) + msg[4:]


def icmp6_check(src: bytes, dst: bytes, msg: bytes) -> int:
    pseudo = src + dst + struct.pack("!I3xB", len(msg), 58)
    return ref_checksum(pseudo + msg)


def check_icmp4_error(reply: bytes, original: bytes, me: str, icmp_type: int, code: int) -> bytes:
    """Every field of an ICMPv4 error; returns the 4 type-specific bytes."""
    assert len(reply) <= 576
    assert reply[0] == 0x45 and reply[9] == 1
    assert struct.unpack("!H", reply[2:4])[0] == len(reply)
    assert ref_checksum(reply[:20]) == 0
    assert reply[12:16] == socket.inet_aton(me)
    assert reply[16:20] == original[12:16]
    msg = reply[20:]
    assert ref_checksum(msg) == 0
    assert (msg[0], msg[1]) == (icmp_type, code)
    assert msg[8:] == original[: 576 - 28]
    return msg[4:8]


def check_icmp6_error(reply: bytes, original: bytes, me: str, icmp_type: int, code: int) -> bytes:
    assert len(reply) <= 1280
    assert reply[0] >> 4 == 6 and reply[6] == 58
    assert struct.unpack("!H", reply[4:6])[0] == len(reply) - 40
    assert reply[8:24] == socket.inet_pton(socket.AF_INET6, me)
    assert reply[24:40] == original[8:24]
    msg = reply[40:]
    assert icmp6_check(reply[8:24], reply[24:40], msg) == 0
    assert (msg[0], msg[1]) == (icmp_type, code)
    assert msg[8:] == original[: 1280 - 48]
    return msg[4:8]


# --- checksum -----------------------------------------------------------------------------------------------------
@given(st.binary(max_size=3000))
def test_internet_checksum_matches_reference(data):
    assert icmp.internet_checksum(data) == ref_checksum(data)


# --- decrement_ttl ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ttl", [2, 3, 64, 128, 255])
def test_decrement_ttl_ipv4(ttl):
    packet = ipv4(ttl=ttl)
    out = decrement_ttl(packet)
    assert out[8] == ttl - 1
    assert ref_checksum(out[:20]) == 0
    assert out[:8] == packet[:8] and out[9] == packet[9] and out[12:] == packet[12:]


@given(
    st.integers(2, 255),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.binary(min_size=8, max_size=8),
    st.sampled_from([b"", b"\x01\x01\x01\x00", b"\x94\x04\x00\x00\x01\x01\x01\x00"]),
)
def test_decrement_ttl_ipv4_checksum_always_valid(ttl, proto, ident, addrs, options):
    """RFC 1624 incremental update == recomputation, including the 0x0000 / 0xFFFF corner cases."""
    packet = ipv4(
        socket.inet_ntoa(addrs[:4]), socket.inet_ntoa(addrs[4:]), ttl=ttl, proto=proto, ident=ident, options=options
    )
    out = decrement_ttl(packet)
    header_len = 20 + len(options)
    assert ref_checksum(out[:header_len]) == 0
    expected = bytearray(packet)
    expected[8] -= 1
    expected[10:12] = b"\0\0"
    expected[10:12] = struct.pack("!H", ref_checksum(bytes(expected[:header_len])))
    # the one's complement zero has two spellings; the kernel accepts either, the RFC 1624 form never yields -0
    assert out[:10] == bytes(expected[:10]) and out[12:] == bytes(expected[12:])


def test_decrement_ttl_ipv6():
    packet = ipv6(hops=64)
    out = decrement_ttl(packet)
    assert out[7] == 63 and out[:7] == packet[:7] and out[8:] == packet[8:]


@pytest.mark.parametrize("packet", [ipv4(ttl=1), ipv4(ttl=0), ipv6(hops=1), ipv6(hops=0)])
def test_decrement_ttl_expired(packet):
    assert decrement_ttl(packet) is None


@pytest.mark.parametrize("packet", [b"", b"\x45", ipv4()[:19], ipv6()[:39], b"\x20" * 40, b"\x44" + bytes(39)])
def test_decrement_ttl_not_ip(packet):
    assert decrement_ttl(packet) is None


# --- error builders -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("me", [ME4, ipaddress.ip_address(ME4), socket.inet_aton(ME4)])
def test_time_exceeded_ipv4(me):
    packet = ipv4(ttl=1, payload=b"z" * 1400)
    reply = time_exceeded(packet, me)
    assert len(reply) == 576
    assert check_icmp4_error(reply, packet, ME4, 11, 0) == b"\0\0\0\0"


def test_time_exceeded_ipv4_short_packet_quoted_whole():
    packet = ipv4(ttl=1, payload=b"abc")
    reply = time_exceeded(packet, ME4)
    assert reply[28:] == packet
    check_icmp4_error(reply, packet, ME4, 11, 0)


@pytest.mark.parametrize("me", [ME6, ipaddress.ip_address(ME6), socket.inet_pton(socket.AF_INET6, ME6)])
def test_time_exceeded_ipv6(me):
    packet = ipv6(hops=1, payload=b"z" * 1400)
    reply = time_exceeded(packet, me)
    assert len(reply) == 1280
    assert check_icmp6_error(reply, packet, ME6, 3, 0) == b"\0\0\0\0"


def test_packet_too_big():
    packet4 = ipv4(payload=b"p" * 1500)
    rest = check_icmp4_error(packet_too_big(packet4, 1380, ME4), packet4, ME4, 3, 4)
    assert struct.unpack("!HH", rest) == (0, 1380)
    packet6 = ipv6(payload=b"p" * 1500)
    rest = check_icmp6_error(packet_too_big(packet6, 1400, ME6), packet6, ME6, 2, 0)
    assert struct.unpack("!I", rest) == (1400,)
    # IPv6 cannot go below 1280, IPv4 not below 68
    assert struct.unpack("!I", packet_too_big(packet6, 1000, ME6)[44:48]) == (1280,)
    assert struct.unpack("!H", packet_too_big(packet4, 10, ME4)[26:28]) == (68,)


def test_dest_unreachable_admin_prohibited():
    packet4 = ipv4()
    check_icmp4_error(dest_unreachable(packet4, ME4), packet4, ME4, 3, 13)
    check_icmp4_error(dest_unreachable(packet4, ME4, code=1), packet4, ME4, 3, 1)
    packet6 = ipv6()
    check_icmp6_error(dest_unreachable(packet6, ME6), packet6, ME6, 1, 1)


def test_wrong_family_source_gives_nothing():
    assert time_exceeded(ipv4(ttl=1), ME6) is None
    assert packet_too_big(ipv6(), 1280, ME4) is None


ALL_BUILDERS = [
    lambda p, me: time_exceeded(p, me),
    lambda p, me: packet_too_big(p, 1280, me),
    lambda p, me: dest_unreachable(p, me),
]


@pytest.mark.parametrize("build", ALL_BUILDERS)
@pytest.mark.parametrize(
    "packet",
    [
        ipv4(proto=1, payload=icmp4(3, 1)),  # an ICMP error
        ipv4(proto=1, payload=icmp4(11)),
        ipv4(proto=1, payload=icmp4(5)),  # redirect
        ipv4(proto=1, payload=b""),  # cannot tell: stay quiet
        ipv4(dst="224.0.0.5"),  # multicast
        ipv4(dst="255.255.255.255"),  # broadcast
        ipv4(src="0.0.0.0"),
        ipv4(src="127.0.0.1"),
        ipv4(src="224.1.1.1"),
        ipv4(flags_frag=0x2000 | 185),  # a later fragment
        ipv4(flags_frag=185),  # the last fragment
        ipv6(nh=58, payload=bytes([1, 4]) + bytes(30)),  # ICMPv6 dest unreachable
        ipv6(nh=58, payload=bytes([3, 0]) + bytes(30)),  # ICMPv6 time exceeded
        ipv6(nh=58, payload=b""),
        ipv6(src="::"),
        ipv6(src="ff02::1"),
        ipv6(src="::1"),
        ipv6(nh=44, payload=bytes([17, 0, 0x05, 0x01, 0, 0, 0, 1]) + bytes(16)),  # a later fragment
        ipv6(nh=0, payload=bytes([44, 0, 1, 4, 0, 0, 0, 0]) + bytes([17, 0, 0, 8, 0, 0, 0, 1])),  # hbh, later frag
        ipv6(nh=60, payload=bytes([58, 0]) + bytes(6) + bytes([1, 0]) + bytes(6)),  # dest opts, then ICMPv6 error
    ],
)
def test_never_answers(build, packet):
    me = ME4 if packet[0] >> 4 == 4 else ME6
    assert build(packet, me) is None


@pytest.mark.parametrize(
    "packet",
    [
        ipv4(proto=1, payload=icmp4(8)),  # echo request
        ipv4(flags_frag=0x2000),  # the first fragment
        ipv4(flags_frag=0),  # DF clear
        ipv6(nh=58, payload=bytes([128, 0]) + bytes(30)),  # echo request
        ipv6(nh=44, payload=bytes([17, 0, 0, 1, 0, 0, 0, 1]) + bytes(16)),  # first fragment
        ipv6(nh=0, payload=bytes([60, 0]) + bytes(6) + bytes([17, 0]) + bytes(6) + bytes(8)),  # hbh + dest opts
    ],
)
def test_answers(packet):
    if packet[0] >> 4 == 4:
        check_icmp4_error(time_exceeded(packet, ME4), packet, ME4, 11, 0)
    else:
        check_icmp6_error(time_exceeded(packet, ME6), packet, ME6, 3, 0)


def test_ipv6_multicast_destination_gets_only_packet_too_big():
    packet = ipv6(dst="ff0e::1")
    assert time_exceeded(packet, ME6) is None
    assert dest_unreachable(packet, ME6) is None
    check_icmp6_error(packet_too_big(packet, 1280, ME6), packet, ME6, 2, 0)


# --- fuzz: arbitrary bytes never raise, and what comes out is well formed ------------------------------------------
def _check_any_reply(reply: bytes | None, packet: bytes) -> None:
    if reply is None:
        return
    if reply[0] >> 4 == 4:
        assert len(reply) <= 576 and ref_checksum(reply[:20]) == 0 and ref_checksum(reply[20:]) == 0
        assert reply[28:] == packet[:548]
    else:
        assert len(reply) <= 1280 and icmp6_check(reply[8:24], reply[24:40], reply[40:]) == 0
        assert reply[48:] == packet[:1232]


def _ip_like():
    """Arbitrary bytes, and arbitrary bytes behind a plausible IPv4/IPv6 first byte (to get past the version)."""
    return st.one_of(
        st.binary(max_size=200),
        st.tuples(st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x6F]), st.binary(max_size=1600)).map(
            lambda t: bytes([t[0]]) + t[1]
        ),
    )


@settings(max_examples=400)
@given(_ip_like(), st.integers(-10, 1 << 33))
def test_fuzz_builders(packet, mtu):
    out = decrement_ttl(packet)
    assert out is None or (len(out) == len(packet) and out[0] == packet[0])
    for me in (ME4, ME6):
        _check_any_reply(time_exceeded(packet, me), packet)
        _check_any_reply(packet_too_big(packet, mtu, me), packet)
        _check_any_reply(dest_unreachable(packet, me), packet)


@settings(max_examples=200)
@given(st.binary(min_size=20, max_size=20), st.binary(max_size=1500))
def test_fuzz_decrement_valid_ipv4(header, payload):
    """A header that parses (version 4, IHL 5, valid checksum) keeps a valid checksum after the decrement."""
    header = bytearray(header)
    header[0] = 0x45
    header[10:12] = b"\0\0"
    header[10:12] = struct.pack("!H", ref_checksum(bytes(header)))
    out = decrement_ttl(bytes(header) + payload)
    if header[8] <= 1:
        assert out is None
    else:
        assert ref_checksum(out[:20]) == 0 and out[8] == header[8] - 1 and out[20:] == payload


# --- rate limiter -------------------------------------------------------------------------------------------------
def test_rate_limiter():
    now = [100.0]
    limiter = RateLimiter(8, 3, clock=lambda: now[0])
    assert [limiter.allow() for _ in range(5)] == [True, True, True, False, False]
    now[0] += 0.125  # one token
    assert limiter.allow() and not limiter.allow()
    now[0] += 10.0  # refills to the burst, not beyond
    assert [limiter.allow() for _ in range(4)] == [True, True, True, False]
    assert (limiter.allowed, limiter.refused) == (7, 4)
    now[0] -= 5.0  # a clock going back gives nothing
    assert not limiter.allow()


def test_rate_limiter_rejects_bad_parameters():
    with pytest.raises(ValueError):
        RateLimiter(10, 0)


# --- the kernel's opinion: an error written into a TUN reaches the socket that sent the quoted packet -------------
IP_RECVERR = 11
IPV6_RECVERR = 25
IP_MTU = 14
IPV6_MTU = 24
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3


@pytest.fixture
def tun_pair(netns):
    from mqvpn.linux.netlink import Netlink
    from mqvpn.linux.tun import Tun

    with Netlink() as nl:
        tun = Tun.open("mqt0", mtu=1500, netlink=nl)
        nl.add_address("mqt0", "10.9.0.1/24")
        nl.add_address("mqt0", "fd00:9::1/64")
    yield tun
    tun.close()


def _read_one(tun, timeout=2.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([tun.fd], [], [], 0.2)
        for packet in tun.read_batch():
            if packet[0] >> 4 == 4 and packet[9] == 17 or packet[0] >> 4 == 6 and packet[6] == 17:
                return packet
    raise AssertionError("nothing read from the TUN")


def _errqueue(sock, level, kind, timeout=2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, ancdata, _, _ = sock.recvmsg(2048, 1024, socket.MSG_ERRQUEUE)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        for cmsg_level, cmsg_type, data in ancdata:
            if (cmsg_level, cmsg_type) == (level, kind):
                return struct.unpack("=IBBBBII", data[:16])  # sock_extended_err
    raise AssertionError("no ICMP error reached the socket")


def _icmp_counters(version: int) -> dict:
    with open("/proc/thread-self/net/snmp" if version == 4 else "/proc/thread-self/net/snmp6") as f:
        text = f.read()
    if version == 4:
        lines = [line.split() for line in text.splitlines() if line.startswith("Icmp:")]
        return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))
    return {k: int(v) for k, v in (line.split() for line in text.splitlines()) if k.startswith("Icmp6")}


@needs_root
@needs_tun
@pytest.mark.parametrize("kind", ["ttl", "mtu", "admin"])
def test_kernel_accepts_ipv4_errors(tun_pair, kind):
    tun = tun_pair
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    sock.connect(("10.9.0.7", 5000))
    before = _icmp_counters(4)
    sock.send(b"m" * 1400)
    packet = _read_one(tun)
    if kind == "ttl":
        reply, want = time_exceeded(packet, "10.9.0.7"), (errno.EHOSTUNREACH, 11, 0)
    elif kind == "mtu":
        reply, want = packet_too_big(packet, 1200, "10.9.0.7"), (errno.EMSGSIZE, 3, 4)
    else:
        reply, want = dest_unreachable(packet, "10.9.0.7"), (errno.EHOSTUNREACH, 3, 13)
    assert tun.write(reply)
    err, origin, icmp_type, code, _pad, info, _data = _errqueue(sock, socket.IPPROTO_IP, IP_RECVERR)
    assert origin == SO_EE_ORIGIN_ICMP
    assert (icmp_type, code) == want[1:]
    after = _icmp_counters(4)
    assert after["InMsgs"] == before["InMsgs"] + 1 and after["InCsumErrors"] == before["InCsumErrors"]
    if kind == "mtu":
        assert err == errno.EMSGSIZE and info == 1200
        assert sock.getsockopt(socket.IPPROTO_IP, IP_MTU) == 1200  # the kernel learned the path MTU
    sock.close()


@needs_root
@needs_tun
@pytest.mark.parametrize("kind", ["ttl", "mtu", "admin"])
def test_kernel_accepts_ipv6_errors(tun_pair, kind):
    tun = tun_pair
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    sock.connect(("fd00:9::7", 5000))
    before = _icmp_counters(6)
    sock.send(b"m" * 1400)
    packet = _read_one(tun)
    if kind == "ttl":
        reply, want = time_exceeded(packet, "fd00:9::7"), (3, 0)
    elif kind == "mtu":
        reply, want = packet_too_big(packet, 1300, "fd00:9::7"), (2, 0)
    else:
        reply, want = dest_unreachable(packet, "fd00:9::7"), (1, 1)
    assert tun.write(reply)
    err, origin, icmp_type, code, _pad, info, _data = _errqueue(sock, socket.IPPROTO_IPV6, IPV6_RECVERR)
    assert origin == SO_EE_ORIGIN_ICMP6
    assert (icmp_type, code) == want
    after = _icmp_counters(6)
    assert after["Icmp6InMsgs"] == before["Icmp6InMsgs"] + 1
    assert after["Icmp6InCsumErrors"] == before["Icmp6InCsumErrors"]
    if kind == "mtu":
        assert err == errno.EMSGSIZE and info == 1300
        assert sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU) == 1300
    sock.close()


def test_hot_path_speed():
    """Not a benchmark gate, a sanity bound: decrement_ttl must stay well under the per-packet budget."""
    packet = ipv4(payload=b"x" * 1380)
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        decrement_ttl(packet)
    per = (time.perf_counter() - start) / n * 1e6
    assert per < 20, f"decrement_ttl {per:.2f} µs"
    if os.environ.get("MQVPN_BENCH"):
        print(f"\ndecrement_ttl: {per:.3f} µs/packet")
