"""Watch the client's uplink interfaces over rtnetlink and report when each becomes usable or not.

An interface is *usable* when it exists, is administratively up (IFF_UP), has carrier and is operationally up
(IFF_RUNNING and IFF_LOWER_UP), and has an IPv4 address or a global-scope IPv6 address that is not tentative
(an optimistic one counts, a DAD-failed one does not). The kernel sets IFF_RUNNING exactly when operstate is UP
or UNKNOWN, so virtual devices without operstate support (tun, wireguard) pass; IFF_LOWER_UP is the raw carrier
bit. A veth whose peer goes down loses carrier (``NO-CARRIER``, operstate LOWERLAYERDOWN) and stays IFF_UP.
Setting an interface down flushes its IPv6 addresses unless ``keep_addr_on_down`` is set (IPv4 ones stay), so an
IPv6-only uplink set down and up again stays "no address" until something configures it again.

Design. ``start`` opens two plain ``AF_NETLINK`` sockets in the calling thread's network namespace: a
non-blocking one bound to RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR for events, registered with
``loop.add_reader``, and a blocking one (2 s timeout) for RTM_GETLINK / RTM_GETADDR dumps, kept open so that a
later ``resync`` dumps the same namespace whichever thread calls it. Requests are built
and every message is decoded by pyroute2's marshal (``MarshalRtnl``, ``ifinfmsg``, ``ifaddrmsg``) without its
``IPRoute`` socket classes, which drive their own asyncio loop and cannot run inside one (see netlink.py). The
event socket is subscribed before the initial dump, so no change falls between the two; events queued behind
the dump only replay history that ends in the dumped state.

The state is a table of every link by index (name, flags) and of every address by index; link messages of
other families (AF_BRIDGE port events, whose RTM_DELLINK does not delete the interface) are ignored. Names are
resolved through the table at evaluation time, so renames, deletions and re-creation under a new index need
no special cases. Each wake-up drains every pending message, then compares the watched names with what was
last reported and calls ``on_change`` once per changed name: bursts coalesce, and a callback never repeats the
previous value. A receive-queue overrun (ENOBUFS) or an undecodable message triggers ``resync``: a fresh dump
replaces the table. Everything runs on the loop's thread; the class is not thread-safe.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Sequence
from typing import NamedTuple

from pyroute2.netlink import (
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
)
from pyroute2.netlink.rtnl.ifaddrmsg import (
    IFA_F_DADFAILED,
    IFA_F_OPTIMISTIC,
    IFA_F_TENTATIVE,
    ifaddrmsg,
)
from pyroute2.netlink.rtnl.ifinfmsg import IFF_RUNNING, IFF_UP, ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

__all__ = ["LinkWatcher"]

_log = logging.getLogger(__name__)

IFF_LOWER_UP = 0x10000  # carrier (netif_carrier_ok)
RT_SCOPE_UNIVERSE = 0
SO_RCVBUFFORCE = 33
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
RCVBUF = 1 << 20  # event socket receive queue; an overrun costs a resync, nothing else
RECV_SIZE = 1 << 18  # larger than any one rtnetlink message or dump chunk
DUMP_TIMEOUT = 2.0
DUMP_ATTEMPTS = 5  # a dump interrupted by concurrent changes (NLM_F_DUMP_INTR) is retried
RETRY_DELAY = 1.0  # after a failed resync from the event handler


class _Link(NamedTuple):
    name: str
    flags: int


class _Table:
    """Every link (by index) and every address (by index, then address key) of the namespace."""

    def __init__(self) -> None:
        self.links: dict[int, _Link] = {}
        self.addrs: dict[int, dict[tuple, bool]] = {}  # address key -> counts towards "usable"

    def apply(self, msg) -> None:
        mtype = msg["header"]["type"]
        if mtype in (RTM_NEWLINK, RTM_DELLINK):
            if msg["family"] != socket.AF_UNSPEC:
                return  # AF_BRIDGE port info: its RTM_DELLINK means "left the bridge", not "deleted"
            index = msg["index"]
            if mtype == RTM_DELLINK:
                self.links.pop(index, None)
                self.addrs.pop(index, None)
            else:
                old = self.links.get(index)
                name = msg.get("IFLA_IFNAME") or (old.name if old else "")
                self.links[index] = _Link(name, msg["flags"])
        elif mtype in (RTM_NEWADDR, RTM_DELADDR):
            family = msg["family"]
            if family not in (socket.AF_INET, socket.AF_INET6):
                return
            key = (family, msg["prefixlen"], msg.get("IFA_LOCAL"), msg.get("IFA_ADDRESS"))
            table = self.addrs.setdefault(msg["index"], {})
            if mtype == RTM_DELADDR:
                table.pop(key, None)
            else:
                table[key] = _address_counts(msg)

    def why_not(self, name: str) -> str | None:
        """None when ``name`` is usable, else the reason it is not."""
        index = next((i for i, link in self.links.items() if link.name == name), None)
        if index is None:
            return "missing"
        flags = self.links[index].flags
        if not flags & IFF_UP:
            return "down"
        if flags & (IFF_RUNNING | IFF_LOWER_UP) != IFF_RUNNING | IFF_LOWER_UP:
            return "no carrier"
        if not any(self.addrs.get(index, {}).values()):
            return "no address"
        return None


def _address_counts(msg) -> bool:
    if msg["family"] == socket.AF_INET:
        return True
    flags = msg.get("IFA_FLAGS")  # the full 32-bit set; the header's ifa_flags is its low byte
    if flags is None:
        flags = msg["flags"]
    if msg["scope"] != RT_SCOPE_UNIVERSE or flags & IFA_F_DADFAILED:
        return False
    return not (flags & IFA_F_TENTATIVE and not flags & IFA_F_OPTIMISTIC)


class LinkWatcher:
    """Tracks whether each of ``ifnames`` is usable; ``on_change(ifname, usable)`` fires on every transition."""

    def __init__(self, ifnames: Sequence[str], on_change: Callable[[str, bool], None]) -> None:
        self._names = list(dict.fromkeys(ifnames))
        self._on_change = on_change
        self._marshal = MarshalRtnl()
        self._table = _Table()
        self._reported = dict.fromkeys(self._names, False)
        self._events: socket.socket | None = None
        self._dumper: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._seq = 0
        self._closed = False

    # --- public API -------------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Subscribe, take the initial state (no callbacks) and watch on ``loop`` (default: the running one).

        Call it from the loop's thread; the watcher acts in that thread's network namespace.
        """
        if self._closed or self._events is not None:
            raise RuntimeError("LinkWatcher.start: already started or closed")
        if loop is None:
            loop = asyncio.get_running_loop()
        events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        dumper = None
        try:
            events.setblocking(False)
            try:
                events.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)  # root: beyond net.core.rmem_max
            except OSError:
                events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            events.bind((0, GROUPS))
            dumper = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
            dumper.settimeout(DUMP_TIMEOUT)
            dumper.bind((0, 0))
            self._dumper = dumper
            self._table = self._dump()
            loop.add_reader(events.fileno(), self._on_readable)
        except BaseException:
            events.close()
            if dumper is not None:
                dumper.close()
            self._dumper = None
            raise
        self._events, self._loop = events, loop
        for name in self._names:
            reason = self._table.why_not(name)
            self._reported[name] = reason is None
            _log.debug("link %s: initially %s", name, "usable" if reason is None else f"not usable ({reason})")

    def usable(self, ifname: str) -> bool:
        """The last reported state of a watched name; for any other name, the current one."""
        if ifname in self._reported:
            return self._reported[ifname]
        return self._events is not None and self._table.why_not(ifname) is None

    def state(self) -> dict[str, bool]:
        return dict(self._reported)

    def resync(self) -> None:
        """Replace the state with a fresh dump and fire callbacks for what changed (raises when the dump fails)."""
        if self._events is None:
            raise RuntimeError("LinkWatcher.resync: not started" if not self._closed else "LinkWatcher is closed")
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._drain(apply=False)  # the dump supersedes whatever is queued
        self._table = self._dump()
        self._publish()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._events is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._events.fileno())
            self._events.close()
            self._events = None
        if self._dumper is not None:
            self._dumper.close()
            self._dumper = None

    # --- internals --------------------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            overrun = self._drain(apply=True)
        except Exception:  # noqa: BLE001 - keep watching whatever went wrong
            _log.exception("link watch: reading rtnetlink events failed; resynchronising")
            overrun = True
        if overrun:
            self._resync_or_retry()
        else:
            self._publish()

    def _resync_or_retry(self) -> None:
        if self._closed:
            return
        try:
            self.resync()
        except Exception:  # noqa: BLE001 - keep watching whatever went wrong
            _log.exception("link watch: resync failed; retrying in %.0f s", RETRY_DELAY)
            if self._loop is not None and not self._closed:
                self._retry = self._loop.call_later(RETRY_DELAY, self._resync_or_retry)

    def _drain(self, apply: bool) -> bool:
        """Read every pending event (applying it to the table or not); True when some were lost (ENOBUFS)."""
        overrun = False
        while self._events is not None:
            try:
                data, (sender, _groups) = self._events.recvfrom(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                overrun = True
                continue
            if not apply or sender != 0:  # only the kernel speaks here
                continue
            for msg in self._marshal.parse(data):
                if msg["header"].get("error") is not None and msg["header"]["type"] != NLMSG_ERROR:
                    overrun = True  # undecodable: do not guess, re-dump
                    continue
                self._table.apply(msg)
        if overrun:
            _log.warning("link watch: rtnetlink events lost (receive queue overrun); resynchronising")
        return overrun

    def _dump(self) -> _Table:
        for _ in range(DUMP_ATTEMPTS):
            table = _Table()
            consistent = True
            for msg_class, mtype in ((ifinfmsg, RTM_GETLINK), (ifaddrmsg, RTM_GETADDR)):
                for msg in self._request(msg_class, mtype):
                    consistent &= not msg["header"]["flags"] & NLM_F_DUMP_INTR
                    table.apply(msg)
            if consistent:
                return table
        _log.warning("link watch: rtnetlink dump kept changing; using the last one")
        return table

    def _request(self, msg_class, mtype: int) -> list:
        """One dump request (all families) on the dump socket; the messages of its reply."""
        assert self._dumper is not None
        self._seq += 1
        request = msg_class()
        request["family"] = socket.AF_UNSPEC
        request["header"]["type"] = mtype
        request["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
        request["header"]["sequence_number"] = self._seq
        request.encode()
        self._dumper.send(request.data)
        out = []
        while True:
            for msg in self._marshal.parse(self._dumper.recv(RECV_SIZE)):
                header = msg["header"]
                if header["sequence_number"] != self._seq:
                    continue  # the late reply of an abandoned request
                if header["type"] == NLMSG_DONE:
                    return out
                if header["type"] == NLMSG_ERROR:
                    if header.get("error") is not None:
                        raise header["error"]
                    continue
                out.append(msg)

    def _publish(self) -> None:
        """Fire ``on_change`` for every watched name whose state differs from the last report."""
        for name in self._names:
            if self._closed:
                return
            reason = self._table.why_not(name)
            now = reason is None
            if now == self._reported[name]:
                continue
            self._reported[name] = now
            _log.info("link %s: %s", name, "usable" if now else f"not usable ({reason})")
            try:
                self._on_change(name, now)
            except Exception:  # noqa: BLE001 - a faulty callback must not stop the watcher
                _log.exception("link watch: on_change(%r, %r) raised", name, now)
