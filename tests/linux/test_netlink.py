"""Netlink: links, addresses, routes (idempotent add/del), route lookups and sysctls, in a throw-away namespace."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading

import pytest

from mqvpn.linux.netlink import Netlink, NetlinkError, RouteInfo, read_sysctl, sysctl_path, write_sysctl
from mqvpn.linux.tun import Tun
from tests.linux.conftest import inside, needs_tun


@pytest.fixture
def nl(netns):
    with Netlink() as nl:
        yield nl


@pytest.fixture
def veth(nl):
    """veth pair mqv0 (10.20.0.1/24, fd00:20::1/64) <-> mqv1, both up."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:  # creating the pair is test set-up, not something Netlink offers
        ipr.link("add", ifname="mqv0", kind="veth", peer="mqv1")
    nl.set_link("mqv0", up=True)
    nl.set_link("mqv1", up=True)
    nl.add_address("mqv0", "10.20.0.1/24")
    nl.add_address("mqv0", "fd00:20::1/64")
    return "mqv0"


def route_table(nl: Netlink, family: int) -> list[tuple]:
    """A comparable snapshot of the main table."""
    rows = []
    for msg in nl._call(nl._ipr.get_routes, family=family, table=254):
        rows.append(
            (msg.get("RTA_DST"), msg["dst_len"], msg.get("RTA_OIF"), msg.get("RTA_GATEWAY"), msg.get("RTA_PRIORITY"))
        )
    return sorted(rows, key=repr)


def test_links(nl, veth):
    assert nl.link_index("mqv0") > 0
    assert nl.link_index("nope0") is None
    assert nl.link_info("nope0") is None
    nl.set_link("mqv0", mtu=1400, txqueuelen=321)
    info = nl.link_info("mqv0")
    assert (info.name, info.mtu, info.txqueuelen, info.up) == ("mqv0", 1400, 321, True)
    nl.set_link("mqv0", up=False)
    assert nl.link_info("mqv0").up is False
    nl.set_link("mqv0", up=None, mtu=1300)  # state left alone
    assert nl.link_info("mqv0").up is False and nl.link_info("mqv0").mtu == 1300
    with pytest.raises(NetlinkError):
        nl.set_link("nope0", mtu=1400)


def test_del_link(nl, veth):
    assert nl.del_link("mqv0") is True
    assert nl.link_index("mqv1") is None  # the peer goes with it
    assert nl.del_link("mqv0") is False


def test_addresses_idempotent(nl, veth):
    assert "10.20.0.1/24" in nl.addresses("mqv0")
    assert nl.add_address("mqv0", "10.20.0.1/24") is False
    assert nl.add_address("mqv0", "10.21.0.9/16") is True
    assert nl.add_address("mqv0", "fd00:21::9/64") is True
    got = nl.addresses("mqv0")
    assert {"10.20.0.1/24", "10.21.0.9/16", "fd00:20::1/64", "fd00:21::9/64"} <= set(got)
    assert got.index("10.21.0.9/16") < got.index("fd00:21::9/64")  # IPv4 first
    assert nl.del_address("mqv0", "10.21.0.9/16") is True
    assert nl.del_address("mqv0", "10.21.0.9/16") is False
    assert nl.del_address("mqv0", "fd00:21::9/64") is True
    assert nl.del_address("mqv0", "fd00:21::9/64") is False
    assert nl.del_address("nope0", "10.0.0.1/8") is False
    assert nl.addresses("nope0") == []
    with pytest.raises(NetlinkError):
        nl.add_address("nope0", "10.0.0.1/8")


def test_routes_idempotent(nl, veth):
    before4 = route_table(nl, socket.AF_INET)
    before6 = route_table(nl, socket.AF_INET6)
    assert nl.add_route("0.0.0.0/1", dev="mqv0") is True
    assert nl.add_route("0.0.0.0/1", dev="mqv0") is False
    assert nl.add_route("192.0.2.7/32", dev="mqv0", gateway="10.20.0.254") is True
    assert nl.add_route("192.0.2.7/32", dev="mqv0", gateway="10.20.0.254") is False
    assert nl.has_route("192.0.2.7/32", gateway="10.20.0.254")
    with pytest.raises(NetlinkError) as info:  # same key, different route: a conflict, not "already there"
        nl.add_route("192.0.2.7/32", dev="mqv0", gateway="10.20.0.253")
    assert info.value.code == errno.EEXIST
    assert nl.add_route("198.51.100.0/24", gateway="10.20.0.254", metric=50) is True
    assert nl.add_route("198.51.100.0/24", gateway="10.20.0.254", metric=50) is False
    assert nl.add_route("198.51.100.0/24", gateway="10.20.0.254", metric=60) is True  # another metric: another
    assert nl.add_route("203.0.113.0/24", dev="mqv0", table=100) is True
    assert nl.add_route("203.0.113.0/24", dev="mqv0", table=100) is False
    assert nl.add_route("::/1", dev="mqv0") is True
    assert nl.add_route("::/1", dev="mqv0") is False
    assert nl.add_route("8000::/1", dev="mqv0") is True
    assert nl.add_route("2001:db8::/32", gateway="fd00:20::fe", dev="mqv0") is True
    assert nl.add_route("2001:db8::/32", gateway="fd00:20::fe", dev="mqv0") is False
    assert nl.has_route("0.0.0.0/1", dev="mqv0") and nl.has_route("8000::/1", dev="mqv0")

    for dst, kw in [
        ("0.0.0.0/1", {"dev": "mqv0"}),
        ("192.0.2.7/32", {"dev": "mqv0", "gateway": "10.20.0.254"}),
        ("198.51.100.0/24", {"gateway": "10.20.0.254", "metric": 50}),
        ("198.51.100.0/24", {"gateway": "10.20.0.254", "metric": 60}),
        ("203.0.113.0/24", {"dev": "mqv0", "table": 100}),
        ("::/1", {"dev": "mqv0"}),
        ("8000::/1", {"dev": "mqv0"}),
        ("2001:db8::/32", {"gateway": "fd00:20::fe", "dev": "mqv0"}),
    ]:
        assert nl.del_route(dst, **kw) is True, dst
        assert nl.del_route(dst, **kw) is False, dst
    assert nl.del_route("10.99.0.0/16", dev="nope0") is False
    assert route_table(nl, socket.AF_INET) == before4
    assert route_table(nl, socket.AF_INET6) == before6


def test_route_to(nl, veth):
    assert nl.route_to("10.20.0.9") == RouteInfo(gateway=None, dev="mqv0", src="10.20.0.1", family=socket.AF_INET)
    assert nl.route_to("192.0.2.1") is None  # no default route in a fresh namespace
    nl.add_route("default", gateway="10.20.0.254")
    got = nl.route_to("192.0.2.1")
    assert (got.gateway, got.dev, got.src) == ("10.20.0.254", "mqv0", "10.20.0.1")
    nl.add_route("192.0.2.0/24", gateway="10.20.0.253")  # more specific wins, as in the kernel
    assert nl.route_to("192.0.2.1").gateway == "10.20.0.253"
    assert nl.route_to("fd00:20::9").dev == "mqv0"
    assert nl.route_to("fd00:20::9").family == socket.AF_INET6
    assert nl.route_to("2001:db8::1") is None


@needs_tun
def test_split_routes_through_a_tun(nl, veth):
    """The client's layout: server pinned via the original gateway, the rest via two /1s on the TUN."""
    nl.add_route("default", gateway="10.20.0.254")
    with Tun.open("mqt0", netlink=nl):
        nl.add_address("mqt0", "10.8.0.2/24")
        pin = nl.route_to("192.0.2.50")
        assert nl.add_route("192.0.2.50/32", dev=pin.dev, gateway=pin.gateway)
        assert nl.add_route("0.0.0.0/1", dev="mqt0") and nl.add_route("128.0.0.0/1", dev="mqt0")
        assert nl.route_to("8.8.8.8").dev == "mqt0"
        assert nl.route_to("200.1.1.1").dev == "mqt0"
        assert nl.route_to("192.0.2.50") == pin
    assert nl.route_to("8.8.8.8").dev == "mqv0"  # routes via the TUN went with it


def test_sysctl(nl, netns):
    assert sysctl_path("net.ipv4.ip_forward") == "/proc/sys/net/ipv4/ip_forward"
    assert sysctl_path("net/ipv6/conf/eth0.7/forwarding") == "/proc/sys/net/ipv6/conf/eth0.7/forwarding"
    assert sysctl_path("/proc/sys/net/ipv4/ip_forward") == "/proc/sys/net/ipv4/ip_forward"
    with pytest.raises(ValueError):
        sysctl_path("/etc/passwd")
    with pytest.raises(ValueError):
        sysctl_path("../../etc/passwd")
    assert nl.get_sysctl("net/ipv4/ip_forward") == "0"
    assert nl.set_sysctl("net/ipv4/ip_forward", 1) == "0"
    assert nl.get_sysctl("net.ipv4.ip_forward") == "1"
    assert read_sysctl("net/ipv4/ip_forward") == "1"  # this thread is in the same namespace
    assert write_sysctl("net/ipv4/ip_forward", "0") == "1"
    with pytest.raises(FileNotFoundError):
        nl.get_sysctl("net/ipv6/conf/nope0/disable_ipv6")


def test_bound_to_the_creators_namespace(nl, make_netns):
    """A Netlink made in namespace B keeps acting in B after its creator left B (and vice versa)."""
    other = make_netns()
    with inside(other):
        nl_other = Netlink()
    try:
        assert nl_other.link_index("lo") is not None
        assert nl_other.set_sysctl("net/ipv4/ip_forward", 1) == "0"
        assert nl.get_sysctl("net/ipv4/ip_forward") == "0"  # the test's namespace did not change
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("add", ifname="mqv9", kind="veth", peer="mqv8")
        assert nl.link_index("mqv9") is not None and nl_other.link_index("mqv9") is None
    finally:
        nl_other.close()


def test_usable_inside_a_running_event_loop(nl):
    async def main():
        with Netlink() as inner:
            return inner.link_index("lo"), threading.current_thread() is threading.main_thread()

    index, on_main = asyncio.run(main())
    assert index == nl.link_index("lo") and on_main


def test_closed(netns):
    nl = Netlink()
    nl.close()
    nl.close()
    with pytest.raises(ValueError):
        nl.link_index("lo")
