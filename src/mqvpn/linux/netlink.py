"""Links, addresses, routes and /proc/sys settings: thin, idempotent wrappers over one pyroute2 ``IPRoute``.

Nothing here forks ``ip``: every change is one rtnetlink request through pyroute2.

Threading. pyroute2's synchronous ``IPRoute`` drives its own asyncio loop with ``run_until_complete``, which
raises inside a thread that already runs a loop (the daemons). So a ``Netlink`` owns one worker thread that
creates the ``IPRoute`` and runs every request; the methods block the caller for one netlink round trip (tens of
µs) and work the same from plain code and from a coroutine. The worker is started in ``__init__`` and a new
thread inherits its creator's network namespace, so a ``Netlink`` (socket and /proc/sys access alike) acts in
the namespace its creator was in when it was made, even if that thread changes namespace later.

Idempotence: adding what is already there returns False (an address, or a route identical in destination,
table, metric, device and gateway; a different route under the same key is an error), deleting what is not
there returns False. Changes that did happen return True.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

__all__ = ["Netlink", "NetlinkError", "RouteInfo", "LinkInfo", "read_sysctl", "write_sysctl", "sysctl_path"]

RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255
IP6_RT_PRIO_USER = 1024  # the metric the kernel gives an IPv6 route added without one
IFF_UP = 0x1
PROC_SYS = "/proc/sys"

_GONE_ROUTE = frozenset({errno.ESRCH, errno.ENOENT})
_GONE_ADDRESS = frozenset({errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV})
_GONE_LINK = frozenset({errno.ENODEV, errno.ENOENT})


class RouteInfo(NamedTuple):
    """The kernel's answer to "how would a packet to this address leave?" (RTM_GETROUTE)."""

    gateway: str | None
    dev: str | None
    src: str | None
    family: int


class LinkInfo(NamedTuple):
    index: int
    name: str
    mtu: int
    txqueuelen: int
    up: bool  # administratively up (IFF_UP)


class Netlink:
    """One rtnetlink socket (pyroute2 ``IPRoute``) on a private worker thread; a context manager.

    ``cidr`` arguments are ``"10.0.0.1/24"`` / ``"fd00::1/64"`` strings (a bare address means /32 or /128);
    ``dst`` arguments of routes are networks (``"0.0.0.0/1"``, ``"::/1"``, ``"192.0.2.7/32"``, ``"default"``).
    """

    def __init__(self) -> None:
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mqvpn-netlink")
        try:
            self._ipr: IPRoute = self._worker.submit(IPRoute).result()
        except BaseException:
            self._worker.shutdown(wait=True)
            raise
        self._closed = False

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._worker.submit(self._ipr.close).result()
        finally:
            self._worker.shutdown(wait=True)

    def _call(self, func, /, *args, **kwargs):
        """Run ``func`` on the worker thread and return its result (or raise its exception) here."""
        if self._closed:
            raise ValueError("Netlink is closed")
        return self._worker.submit(func, *args, **kwargs).result()

    # --- links ------------------------------------------------------------------------------------------------
    def link_index(self, name: str) -> int | None:
        """The interface index of ``name``, or None when there is no such interface."""
        found = self._call(self._ipr.link_lookup, ifname=name)
        return found[0] if found else None

    def link_info(self, name: str) -> LinkInfo | None:
        index = self.link_index(name)
        if index is None:
            return None
        try:
            msg = self._call(self._ipr.link, "get", index=index)[0]
        except NetlinkError as exc:
            if exc.code in _GONE_LINK:
                return None
            raise
        return LinkInfo(
            index=index,
            name=msg.get("IFLA_IFNAME"),
            mtu=msg.get("IFLA_MTU"),
            txqueuelen=msg.get("IFLA_TXQLEN"),
            up=bool(msg["flags"] & IFF_UP),
        )

    def set_link(
        self, name: str, up: bool | None = True, mtu: int | None = None, txqueuelen: int | None = None
    ) -> None:
        """Set what is given in one request (``up=None`` leaves the state alone); raises when ``name`` is gone."""
        index = self._require_link(name)
        changes: dict = {}
        if mtu is not None:
            changes["mtu"] = mtu
        if txqueuelen is not None:
            changes["txqlen"] = txqueuelen
        if up is not None:
            changes["state"] = "up" if up else "down"
        if changes:
            self._call(self._ipr.link, "set", index=index, **changes)

    def del_link(self, name: str) -> bool:
        """Delete an interface (a persistent TUN, a veth); False when it was not there."""
        index = self.link_index(name)
        if index is None:
            return False
        try:
            self._call(self._ipr.link, "del", index=index)
        except NetlinkError as exc:
            if exc.code in _GONE_LINK:
                return False
            raise
        return True

    def _require_link(self, name: str) -> int:
        index = self.link_index(name)
        if index is None:
            raise NetlinkError(errno.ENODEV, f"no interface {name!r}")
        return index

    # --- addresses --------------------------------------------------------------------------------------------
    def addresses(self, name: str) -> list[str]:
        """The addresses on ``name`` as ``"addr/prefixlen"`` strings (IPv4 first, then IPv6, kernel order)."""
        index = self.link_index(name)
        if index is None:
            return []
        out = []
        for msg in self._call(self._ipr.get_addr, index=index):
            addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            out.append((msg["family"] != socket.AF_INET, f"{addr}/{msg['prefixlen']}"))
        return [cidr for _, cidr in sorted(out, key=lambda item: item[0])]

    def add_address(self, name: str, cidr: str) -> bool:
        """Add ``cidr`` to ``name``; False when it is already there. IPv6 addresses skip DAD (usable at once)."""
        index = self._require_link(name)
        iface = ipaddress.ip_interface(cidr)
        extra = {"flags": 0x02} if iface.version == 6 else {}  # IFA_F_NODAD
        try:
            self._call(
                self._ipr.addr, "add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen, **extra
            )
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise
        return True

    def del_address(self, name: str, cidr: str) -> bool:
        """Remove ``cidr`` from ``name``; False when it (or the interface) is not there."""
        index = self.link_index(name)
        if index is None:
            return False
        iface = ipaddress.ip_interface(cidr)
        try:
            self._call(self._ipr.addr, "del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except NetlinkError as exc:
            if exc.code in _GONE_ADDRESS:
                return False
            raise
        return True

    # --- routes -----------------------------------------------------------------------------------------------
    def add_route(
        self,
        dst_cidr: str,
        *,
        dev: str | None = None,
        gateway: str | None = None,
        metric: int | None = None,
        table: int | None = None,
    ) -> bool:
        """Add a unicast route; False when the identical route exists, NetlinkError(EEXIST) on a different one.

        IPv4 routes without a gateway get link scope (as ``ip route add ... dev X`` does).
        """
        spec = self._route_spec(dst_cidr, dev, gateway, metric, table, must_have_dev=True)
        if spec is None:
            raise NetlinkError(errno.ENODEV, f"no interface {dev!r}")
        if spec["family"] == socket.AF_INET and gateway is None:
            spec["scope"] = RT_SCOPE_LINK
        try:
            self._call(self._ipr.route, "add", **spec)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST and self._find_route(spec):
                return False
            raise
        return True

    def del_route(
        self,
        dst_cidr: str,
        *,
        dev: str | None = None,
        gateway: str | None = None,
        metric: int | None = None,
        table: int | None = None,
    ) -> bool:
        """Delete the route matching what is given; False when there is none (or its device is gone)."""
        spec = self._route_spec(dst_cidr, dev, gateway, metric, table, must_have_dev=True)
        if spec is None:
            return False
        if spec["family"] == socket.AF_INET:
            spec["scope"] = RT_SCOPE_NOWHERE  # match a route of any scope (as ``ip route del`` does)
        try:
            self._call(self._ipr.route, "del", **spec)
        except NetlinkError as exc:
            if exc.code in _GONE_ROUTE:
                return False
            raise
        return True

    def has_route(
        self,
        dst_cidr: str,
        *,
        dev: str | None = None,
        gateway: str | None = None,
        metric: int | None = None,
        table: int | None = None,
    ) -> bool:
        """True when a route with this destination, table and metric exists (and ``dev`` / ``gateway`` match)."""
        spec = self._route_spec(dst_cidr, dev, gateway, metric, table, must_have_dev=True)
        return spec is not None and self._find_route(spec)

    def route_to(self, ip: str) -> RouteInfo | None:
        """The kernel's route lookup for ``ip`` (RTM_GETROUTE), or None when it is unreachable."""
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            msg = self._call(self._ipr.route, "get", dst=ip, family=family)[0]
        except NetlinkError as exc:
            if exc.code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL, errno.EACCES):
                return None
            raise
        oif = msg.get("RTA_OIF")
        dev = None
        if oif is not None:
            links = self._call(self._ipr.get_links, oif)
            dev = links[0].get("IFLA_IFNAME") if links else None
        return RouteInfo(gateway=msg.get("RTA_GATEWAY"), dev=dev, src=msg.get("RTA_PREFSRC"), family=family)

    def _route_spec(
        self,
        dst_cidr: str,
        dev: str | None,
        gateway: str | None,
        metric: int | None,
        table: int | None,
        *,
        must_have_dev: bool,
    ) -> dict | None:
        if dst_cidr == "default":
            dst_cidr = "::/0" if gateway and ":" in gateway else "0.0.0.0/0"
        net = ipaddress.ip_network(dst_cidr, strict=True)
        family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
        spec: dict = {"family": family, "dst": str(net.network_address), "dst_len": net.prefixlen}
        spec["table"] = RT_TABLE_MAIN if table is None else table
        if dev is not None:
            index = self.link_index(dev)
            if index is None:
                return None if must_have_dev else spec
            spec["oif"] = index
        if gateway is not None:
            spec["gateway"] = gateway
        if metric is not None:
            spec["priority"] = metric
        return spec

    def _find_route(self, spec: dict) -> bool:
        family = spec["family"]
        metric = spec.get("priority")
        if metric is None and family == socket.AF_INET6:
            metric = IP6_RT_PRIO_USER
        gateway = spec.get("gateway")
        if gateway is not None:
            gateway = str(ipaddress.ip_address(gateway))  # the kernel's spelling
        for msg in self._call(self._ipr.get_routes, family=family, table=spec["table"]):
            if msg["dst_len"] != spec["dst_len"] or msg.get("RTA_TABLE", msg["table"]) != spec["table"]:
                continue
            if (msg.get("RTA_DST") or _any_address(family)) != spec["dst"]:
                continue
            if msg.get("RTA_PRIORITY", 0) != (metric or 0):
                continue
            if "oif" in spec and msg.get("RTA_OIF") != spec["oif"]:
                continue
            if msg.get("RTA_GATEWAY") != gateway:
                continue
            return True
        return False

    # --- /proc/sys --------------------------------------------------------------------------------------------
    def get_sysctl(self, path: str) -> str:
        """Read a /proc/sys setting in this Netlink's network namespace (see ``sysctl_path`` for ``path``)."""
        return self._call(read_sysctl, path)

    def set_sysctl(self, path: str, value: str | int) -> str:
        """Write a /proc/sys setting in this Netlink's network namespace; returns the previous value."""
        return self._call(write_sysctl, path, value)


def _any_address(family: int) -> str:
    return "::" if family == socket.AF_INET6 else "0.0.0.0"


def sysctl_path(path: str) -> str:
    """``"/proc/sys/net/ipv4/ip_forward"``, ``"net/ipv4/ip_forward"`` and ``"net.ipv4.ip_forward"`` are one file.

    The dotted form only when there is no ``/`` (an interface name may contain dots: ``net/ipv6/conf/eth0.7/...``).
    """
    if path.startswith("/"):
        full = os.path.normpath(path)
    else:
        full = os.path.normpath(os.path.join(PROC_SYS, path if "/" in path else path.replace(".", "/")))
    if not full.startswith(PROC_SYS + "/"):
        raise ValueError(f"not a /proc/sys setting: {path!r}")
    return full


def read_sysctl(path: str) -> str:
    """A /proc/sys value as the kernel prints it, without the trailing newline (calling thread's namespace)."""
    with open(sysctl_path(path)) as f:
        return f.read().strip()


def write_sysctl(path: str, value: str | int) -> str:
    """Write a /proc/sys value (calling thread's namespace); returns the previous one."""
    full = sysctl_path(path)
    previous = read_sysctl(full)
    with open(full, "w") as f:
        f.write(f"{value}\n")
    return previous
