import struct
import sys
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mqvpn.masque.pool import AddressPool, SessionTable, packet_addresses


def drain(pool):
    out = []
    while (a := pool.allocate()) is not None:
        out.append(a)
    return out


# ---------------------------------------------------------------------------------------------------------------
# AddressPool


def test_slash24_holds_253_clients_and_the_server():
    pool = AddressPool("10.0.0.0/24")
    assert pool.server_address == IPv4Address("10.0.0.1")
    assert pool.capacity == 253
    got = drain(pool)
    assert len(got) == 253 == pool.in_use
    assert got[0] == IPv4Address("10.0.0.2") and got[-1] == IPv4Address("10.0.0.254")
    assert len(set(got)) == 253
    assert pool.allocate() is None and pool.available == 0
    assert {IPv4Address("10.0.0.0"), IPv4Address("10.0.0.1"), IPv4Address("10.0.0.255")}.isdisjoint(got)


def test_slash22_more_than_a_thousand():
    pool = AddressPool(IPv4Network("10.8.0.0/22"))
    got = drain(pool)
    assert len(got) == 1021 == pool.capacity  # 1024 - network - broadcast - server
    assert IPv4Address("10.8.3.255") not in got and IPv4Address("10.8.1.0") in got  # .0 inside the /22 is a host


def test_large_prefixes_cost_no_memory():
    for prefix in ("10.0.0.0/8", "fd00::/64", "2001:db8::/32", "::/0"):
        pool = AddressPool(prefix)
        assert sys.getsizeof(pool._free) < 1000 and not pool._used
        a = pool.allocate()
        assert a == pool.network.network_address + 2
    assert AddressPool("fd00::/64").capacity == 2**64 - 2
    assert AddressPool("10.0.0.0/8").capacity == 2**24 - 3


def test_ipv6_112():
    pool = AddressPool("fd00:1::/112")
    assert pool.server_address == IPv6Address("fd00:1::1")
    assert pool.capacity == 65534  # ::0 (anycast) and ::1 (server) are out; ::ffff is a host in IPv6
    got = drain(pool)
    assert len(got) == 65534 and len(set(got)) == 65534
    assert got[-1] == IPv6Address("fd00:1::ffff")
    assert IPv6Address("fd00:1::") not in got and IPv6Address("fd00:1::1") not in got


def test_ipv6_64_allocate_and_release():
    pool = AddressPool("2001:db8:1:2::/64")
    addrs = [pool.allocate() for _ in range(1000)]
    assert addrs[0] == IPv6Address("2001:db8:1:2::2")
    for a in addrs[::2]:
        pool.release(a)
    assert pool.in_use == 500
    again = [pool.allocate() for _ in range(500)]
    assert again == addrs[::2]  # oldest released first


@pytest.mark.parametrize(
    "prefix, reserve, server, hosts",
    [
        ("10.0.0.0/30", True, "10.0.0.1", ["10.0.0.2"]),
        ("10.0.0.0/30", False, None, ["10.0.0.1", "10.0.0.2"]),
        ("10.0.0.0/31", True, "10.0.0.0", ["10.0.0.1"]),
        ("10.0.0.0/31", False, None, ["10.0.0.0", "10.0.0.1"]),
        ("10.0.0.7/32", True, "10.0.0.7", []),
        ("10.0.0.7/32", False, None, ["10.0.0.7"]),
        ("fd00::/126", True, "fd00::1", ["fd00::2", "fd00::3"]),
        ("fd00::/127", True, "fd00::", ["fd00::1"]),
        ("fd00::5/128", False, None, ["fd00::5"]),
    ],
)
def test_small_prefixes(prefix, reserve, server, hosts):
    pool = AddressPool(prefix, reserve_first=reserve)
    assert pool.server_address == (ip_address(server) if server else None)
    assert drain(pool) == [ip_address(h) for h in hosts]
    assert pool.capacity == len(hosts)


def test_release_errors():
    pool = AddressPool("10.0.0.0/24")
    a = pool.allocate()
    assert a in pool
    pool.release(a)
    assert a not in pool
    with pytest.raises(ValueError, match="double release"):
        pool.release(a)
    with pytest.raises(ValueError, match="double release"):
        pool.release("10.0.0.77")  # in the prefix, never handed out
    for foreign in ("10.0.1.5", "192.168.0.1", "fd00::2", b"\x0a\x00\x01\x05"):
        with pytest.raises(ValueError, match="not in the pool"):
            pool.release(foreign)
    with pytest.raises(ValueError, match="server"):
        pool.release("10.0.0.1")
    for reserved in ("10.0.0.0", "10.0.0.255"):
        with pytest.raises(ValueError, match="reserved"):
            pool.release(reserved)
    with pytest.raises(ValueError):
        pool.release("not an address")
    with pytest.raises(ValueError):
        pool.release(b"\x01\x02\x03")
    with pytest.raises(ValueError):
        AddressPool("10.0.0.1/24")  # host bits set: say what you mean
    assert "10.0.0.1" not in pool and "junk" not in pool


def test_release_accepts_every_address_form():
    pool = AddressPool("10.0.0.0/24")
    for form in (str, lambda a: a.packed, lambda a: memoryview(a.packed), lambda a: a):
        a = pool.allocate()
        pool.release(form(a))
        assert pool.in_use == 0


def test_reserve_specific_addresses():
    pool = AddressPool("10.0.0.0/29")  # hosts .2-.6 for clients
    assert pool.reserve("10.0.0.4")
    assert not pool.reserve("10.0.0.4")
    assert pool.allocate() == IPv4Address("10.0.0.2")
    assert pool.allocate() == IPv4Address("10.0.0.3")
    assert pool.allocate() == IPv4Address("10.0.0.5")  # .4 skipped
    pool.release("10.0.0.3")
    assert pool.reserve("10.0.0.3")  # a released one: its free-list entry goes stale
    assert pool.allocate() == IPv4Address("10.0.0.6")
    assert pool.allocate() is None
    pool.release("10.0.0.4")
    assert pool.allocate() == IPv4Address("10.0.0.4")
    with pytest.raises(ValueError):
        pool.reserve("10.0.0.1")
    # reserved ahead of the counter, then released before the counter got there: handed out exactly once
    pool = AddressPool("10.0.0.0/29")
    pool.reserve("10.0.0.5")
    pool.release("10.0.0.5")
    assert drain(pool) == [IPv4Address(f"10.0.0.{i}") for i in range(2, 7)]


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "release", "reserve"]), st.integers(0, 10**6)), max_size=300))
def test_churn_on_a_slash16(ops):
    pool = AddressPool("172.16.0.0/16")
    held: list[IPv4Address] = []
    held_set: set[IPv4Address] = set()
    for op, x in ops:
        if op == "alloc":
            a = pool.allocate()
            assert a is not None and a not in held_set
            assert a.packed[2:] not in (b"\x00\x00", b"\x00\x01", b"\xff\xff")
            held.append(a)
            held_set.add(a)
        elif op == "release" and held:
            a = held.pop(x % len(held))
            held_set.remove(a)
            pool.release(a)
        elif op == "reserve":
            a = IPv4Address(int(IPv4Address("172.16.0.2")) + x % 200)
            assert pool.reserve(a) == (a not in held_set)
            if a not in held_set:
                held.append(a)
                held_set.add(a)
        assert pool.in_use == len(held_set)


class PoolMachine(RuleBasedStateMachine):
    """A tiny pool driven to full and back: never a duplicate, never a reserved address, full means None."""

    def __init__(self):
        super().__init__()
        self.pool = AddressPool("10.1.2.0/28")  # hosts .2 .. .14: 13 clients
        self.held: set[IPv4Address] = set()

    @rule()
    def allocate(self):
        a = self.pool.allocate()
        if len(self.held) == 13:
            assert a is None
        else:
            assert a is not None and a not in self.held
            assert 2 <= int(a) - int(IPv4Address("10.1.2.0")) <= 14
            self.held.add(a)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        a = data.draw(st.sampled_from(sorted(self.held)))
        self.pool.release(a)
        self.held.remove(a)
        with pytest.raises(ValueError):
            self.pool.release(a)

    @rule(i=st.integers(2, 14))
    def reserve(self, i):
        a = IPv4Address("10.1.2.0") + i
        assert self.pool.reserve(a) == (a not in self.held)
        self.held.add(a)

    @invariant()
    def counts(self):
        assert self.pool.in_use == len(self.held)
        assert self.pool.available == 13 - len(self.held)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=100, stateful_step_count=60)


def test_allocate_and_release_are_constant_time():
    """A /8's worth of address space, a million operations: no slowdown with pool size or churn."""
    pool = AddressPool("10.0.0.0/8")
    start = time.perf_counter()
    addrs = [pool.allocate() for _ in range(200_000)]
    for a in addrs[:100_000]:
        pool.release(a)
    for _ in range(100_000):
        pool.allocate()
    assert time.perf_counter() - start < 10  # generous; it is well under a second
    assert pool.in_use == 200_000


# ---------------------------------------------------------------------------------------------------------------
# SessionTable and packet_addresses


def ipv4_packet(src, dst, payload=b"x" * 8, ihl=5, total=None):
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        total if total is not None else ihl * 4 + len(payload),
        0,
        0,
        64,
        17,
        0,
        IPv4Address(src).packed,
        IPv4Address(dst).packed,
    )
    return header + b"\x00" * (ihl * 4 - 20) + payload


def ipv6_packet(src, dst, payload=b"y" * 8, plen=None):
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(payload) if plen is None else plen,
        17,
        64,
        IPv6Address(src).packed,
        IPv6Address(dst).packed,
    )
    return header + payload


def test_session_table_by_raw_bytes():
    table: SessionTable[str] = SessionTable()
    table.add("10.0.0.2", "s1")
    table.add(IPv6Address("fd00::2"), "s1")
    table.add(IPv4Address("10.0.0.3").packed, "s2")
    assert len(table) == 3
    packet = ipv4_packet("8.8.8.8", "10.0.0.2")
    version, src, dst = packet_addresses(packet)
    assert (version, src, dst) == (4, IPv4Address("8.8.8.8").packed, IPv4Address("10.0.0.2").packed)
    assert table.lookup_raw(dst) == "s1" == table.lookup(dst)
    assert table.lookup_raw(src) is None
    _, _, dst6 = packet_addresses(ipv6_packet("2001:db8::1", "fd00::2"))
    assert table.lookup_raw(dst6) == "s1"
    assert table.lookup(b"\x0a\x00\x00\x03") == "s2"
    assert table.lookup(memoryview(b"\x0a\x00\x00\x03")) == "s2"
    assert table.lookup_raw(memoryview(b"\x0a\x00\x00\x03")) == "s2"  # read-only memoryviews hash like bytes
    assert table.lookup("10.0.0.3") == "s2" and table.lookup(IPv4Address("10.0.0.3")) == "s2"
    assert table.lookup(b"\x0a\x00\x00") is None and table.lookup("nonsense") is None
    assert "10.0.0.2" in table and "10.9.9.9" not in table and "nonsense" not in table
    with pytest.raises(ValueError):
        table.add("10.0.0.2", "s3")
    assert table.remove("10.0.0.2") == "s1"
    assert table.remove("10.0.0.2") is None
    assert table.lookup_raw(dst) is None
    assert sorted(str(a) for a, _ in table.items()) == ["10.0.0.3", "fd00::2"]


def test_session_table_with_pool():
    pool = AddressPool("10.0.0.0/22")
    table = SessionTable()
    sessions = {}
    for i in range(1021):
        a = pool.allocate()
        sessions[a] = object()
        table.add(a, sessions[a])
    for a, s in sessions.items():
        assert table.lookup_raw(a.packed) is s
    assert pool.allocate() is None


def test_packet_addresses_ipv4():
    p = ipv4_packet("192.0.2.1", "198.51.100.7")
    assert packet_addresses(p) == (4, bytes([192, 0, 2, 1]), bytes([198, 51, 100, 7]))
    assert packet_addresses(bytearray(p)) == packet_addresses(memoryview(p)) == packet_addresses(p)
    assert packet_addresses(ipv4_packet("1.1.1.1", "2.2.2.2", ihl=7))[2] == b"\x02\x02\x02\x02"
    assert packet_addresses(p + b"trailer") is not None  # padding after the packet is tolerated
    assert packet_addresses(ipv4_packet("1.1.1.1", "2.2.2.2", payload=b"")) is not None


def test_packet_addresses_ipv6():
    p = ipv6_packet("2001:db8::1", "fd00::2")
    assert packet_addresses(p) == (6, IPv6Address("2001:db8::1").packed, IPv6Address("fd00::2").packed)
    assert packet_addresses(ipv6_packet("::1", "::2", payload=b"")) is not None


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x45",
        ipv4_packet("1.1.1.1", "2.2.2.2")[:19],  # short header
        ipv4_packet("1.1.1.1", "2.2.2.2", ihl=4),  # IHL below 5
        ipv4_packet("1.1.1.1", "2.2.2.2", ihl=15, payload=b"")[:40],  # claims 60 bytes of header, has 40
        ipv4_packet("1.1.1.1", "2.2.2.2", total=100),  # claims more bytes than it has
        ipv4_packet("1.1.1.1", "2.2.2.2", total=10),  # total below the header
        ipv6_packet("::1", "::2")[:39],
        ipv6_packet("::1", "::2", plen=9),
        b"\x00" * 60,
        b"\x50" + b"\x00" * 59,
        b"\xf0" * 60,
    ],
)
def test_packet_addresses_malformed(packet):
    assert packet_addresses(packet) is None


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_packet_addresses_fuzz(blob):
    result = packet_addresses(blob)
    if result is not None:
        version, src, dst = result
        assert version in (4, 6) and len(src) == len(dst) == (4 if version == 4 else 16)
        assert type(src) is bytes and type(dst) is bytes
