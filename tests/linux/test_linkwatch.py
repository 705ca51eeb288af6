"""LinkWatcher: usable / not usable transitions of veth interfaces in a throw-away namespace.

Each test runs in a fresh namespace (the ``netns`` fixture moves the test's thread there) with its own asyncio
loop, which runs only inside ``run_until`` / ``settle``: changes made between those calls queue up on the
watcher's socket exactly as they would while the daemon's loop is busy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import pytest

from mqvpn.linux.linkwatch import LinkWatcher
from mqvpn.linux.netlink import Netlink
from tests.linux.conftest import needs_root

pytestmark = [pytest.mark.netns, needs_root]

IFA_F_NODAD = 0x02


class Env:
    def __init__(self, loop: asyncio.AbstractEventLoop, nl: Netlink) -> None:
        self.loop = loop
        self.nl = nl
        self.events: list[tuple[str, bool]] = []
        self.watchers: list[LinkWatcher] = []

    def record(self, name: str, usable: bool) -> None:
        self.events.append((name, usable))

    def watch(self, *names: str) -> LinkWatcher:
        watcher = LinkWatcher(names, self.record)
        self.watchers.append(watcher)
        watcher.start(self.loop)
        return watcher

    def run_until(self, predicate, timeout: float = 3.0) -> None:
        async def poll() -> None:
            deadline = time.monotonic() + timeout
            while not predicate():
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out; events so far: {self.events}")
                await asyncio.sleep(0.005)

        self.loop.run_until_complete(poll())

    def settle(self, seconds: float = 0.3) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    # --- set-up helpers (Netlink's worker thread lives in the test's namespace) ---
    def veth(self, name: str, peer: str, cidr: str | None = "10.77.0.1/24") -> None:
        self.nl._call(self.nl._ipr.link, "add", ifname=name, kind="veth", peer=peer)
        self.nl.set_link(name, up=True)
        self.nl.set_link(peer, up=True)
        if cidr:
            self.nl.add_address(name, cidr)

    def add_address_with_dad(self, name: str, ip: str, prefixlen: int) -> None:
        index = self.nl.link_index(name)
        self.nl._call(self.nl._ipr.addr, "add", index=index, address=ip, prefixlen=prefixlen)


@pytest.fixture
def env(netns):
    loop = asyncio.new_event_loop()
    nl = Netlink()
    e = Env(loop, nl)
    try:
        yield e
    finally:
        for watcher in e.watchers:
            watcher.close()
        nl.close()
        loop.close()


def no_repeats(events: list[tuple[str, bool]], initial: dict[str, bool]) -> bool:
    """Every callback is a transition: it differs from the previous value reported for that name."""
    last = dict(initial)
    for name, usable in events:
        if last[name] == usable:
            return False
        last[name] = usable
    return True


def test_initial_state_inside_running_loop(env):
    env.veth("lw0", "lw1")  # lw0 has an address, lw1 none
    watcher = LinkWatcher(["lw0", "lw1", "nope0", "lw0"], env.record)
    env.watchers.append(watcher)

    async def main() -> None:
        watcher.start()  # the running loop; pyroute2's IPRoute could not be used here
        await asyncio.sleep(0.1)

    env.loop.run_until_complete(main())
    assert watcher.state() == {"lw0": True, "lw1": False, "nope0": False}
    assert watcher.usable("lw0") and not watcher.usable("lw1") and not watcher.usable("nope0")
    assert not watcher.usable("never-heard-of")
    assert watcher.usable("lo")  # not watched: the current state (lo is up with 127.0.0.1)
    assert env.events == []  # no callbacks for the initial state


def test_peer_down_and_up(env, caplog):
    caplog.set_level(logging.INFO, logger="mqvpn")
    env.veth("lw0", "lw1")
    watcher = env.watch("lw0")
    assert watcher.usable("lw0")

    env.nl.set_link("lw1", up=False)  # lw0 stays IFF_UP but loses carrier
    env.run_until(lambda: env.events)
    env.settle()
    assert env.events == [("lw0", False)]
    assert not watcher.usable("lw0")
    assert "link lw0: not usable (no carrier)" in caplog.text

    env.nl.set_link("lw1", up=True)
    env.run_until(lambda: len(env.events) == 2)
    env.settle()
    assert env.events == [("lw0", False), ("lw0", True)]
    assert "link lw0: usable" in caplog.text

    env.nl.set_link("lw0", up=False)
    env.run_until(lambda: len(env.events) == 3)
    assert env.events[-1] == ("lw0", False)
    assert "link lw0: not usable (down)" in caplog.text


def test_address_removed_and_readded(env, caplog):
    caplog.set_level(logging.INFO, logger="mqvpn")
    env.veth("lw0", "lw1")
    env.nl.add_address("lw0", "10.78.0.1/24")  # a second address: removing one leaves the link usable
    watcher = env.watch("lw0")

    env.nl.del_address("lw0", "10.77.0.1/24")
    env.settle()
    assert env.events == [] and watcher.usable("lw0")

    env.nl.del_address("lw0", "10.78.0.1/24")
    env.run_until(lambda: env.events)
    env.settle()
    assert env.events == [("lw0", False)]
    assert "link lw0: not usable (no address)" in caplog.text

    env.nl.add_address("lw0", "10.78.0.1/24")
    env.run_until(lambda: len(env.events) == 2)
    env.settle()
    assert env.events == [("lw0", False), ("lw0", True)]


def test_link_deleted_and_recreated(env, caplog):
    caplog.set_level(logging.INFO, logger="mqvpn")
    env.veth("lw0", "lw1")
    old_index = env.nl.link_index("lw0")
    watcher = env.watch("lw0")

    env.nl.del_link("lw0")
    env.run_until(lambda: env.events)
    env.settle()
    assert env.events == [("lw0", False)]
    assert "link lw0: not usable (missing)" in caplog.text

    env.veth("lw0", "lw1", cidr=None)
    assert env.nl.link_index("lw0") != old_index  # the kernel hands out interface indexes cyclically
    env.settle(0.1)
    assert env.events == [("lw0", False)]  # up with carrier, but no address yet
    env.nl.add_address("lw0", "10.77.0.1/24")
    env.run_until(lambda: len(env.events) == 2)
    env.settle()
    assert env.events == [("lw0", False), ("lw0", True)]
    assert watcher.usable("lw0")


def test_rename(env):
    env.veth("lw0", "lw1")
    watcher = env.watch("lw0", "up9")
    assert watcher.state() == {"lw0": True, "up9": False}

    env.nl.set_link("lw0", up=False)  # a running interface cannot be renamed
    env.nl._call(env.nl._ipr.link, "set", index=env.nl.link_index("lw0"), ifname="up9")
    env.nl.set_link("up9", up=True)
    env.run_until(lambda: watcher.state() == {"lw0": False, "up9": True})
    env.settle()
    assert env.events == [("lw0", False), ("up9", True)]


def test_ipv6_only(env):
    env.veth("lw0", "lw1", cidr=None)
    # fast DAD: no random initial delay, 100 ms per probe
    env.nl.set_sysctl("net/ipv6/conf/lw0/router_solicitation_delay", 0)
    env.nl.set_sysctl("net/ipv6/neigh/lw0/retrans_time_ms", 100)
    watcher = env.watch("lw0")
    assert not watcher.usable("lw0")  # only a link-local address

    env.add_address_with_dad("lw0", "fd00:77::1", 64)
    env.settle(0.03)
    assert not watcher.usable("lw0")  # tentative while DAD runs
    env.run_until(lambda: env.events, timeout=5)
    env.settle()
    assert env.events == [("lw0", True)]

    env.nl.del_address("lw0", "fd00:77::1/64")
    env.run_until(lambda: len(env.events) == 2)
    env.nl.add_address("lw0", "fd00:77::2/64")  # IFA_F_NODAD: usable at once
    env.run_until(lambda: len(env.events) == 3)
    env.settle()
    assert env.events == [("lw0", True), ("lw0", False), ("lw0", True)]

    env.nl.set_link("lw1", up=False)
    env.run_until(lambda: len(env.events) == 4)
    assert env.events[-1] == ("lw0", False)


def test_interface_appears_later(env):
    watcher = env.watch("lw0")
    assert not watcher.usable("lw0")
    env.veth("lw0", "lw1")
    env.run_until(lambda: env.events)
    env.settle()
    assert env.events == [("lw0", True)]


def test_bridge_port_events_do_not_count_as_deletion(env):
    env.veth("lw0", "lw1")
    env.nl._call(env.nl._ipr.link, "add", ifname="br9", kind="bridge")
    env.nl.set_link("br9", up=True)
    watcher = env.watch("lw0")
    bridge = env.nl.link_index("br9")
    env.nl._call(env.nl._ipr.link, "set", index=env.nl.link_index("lw0"), master=bridge)
    env.settle(0.1)
    env.nl._call(env.nl._ipr.link, "set", index=env.nl.link_index("lw0"), master=0)  # AF_BRIDGE RTM_DELLINK
    env.settle()
    assert env.events == [] and watcher.usable("lw0")


def test_rapid_flaps_coalesce(env):
    env.veth("lw0", "lw1")
    env.veth("lw2", "lw3", cidr="10.79.0.1/24")
    watcher = env.watch("lw0", "lw2")
    initial = watcher.state()

    # while the loop does not run: everything queues up and is drained in one go
    for _ in range(30):
        env.nl.set_link("lw1", up=False)
        env.nl.set_link("lw1", up=True)
        env.nl.del_address("lw2", "10.79.0.1/24")
        env.nl.add_address("lw2", "10.79.0.1/24")
    env.nl.set_link("lw1", up=False)
    env.run_until(lambda: not watcher.usable("lw0"))
    env.settle()
    assert no_repeats(env.events, initial), env.events
    assert watcher.state() == {"lw0": False, "lw2": True}
    assert len(env.events) <= 5, env.events

    # interleaved with short runs of the loop
    for i in range(40):
        env.nl.set_link("lw1", up=i % 2 == 1)
        env.nl.del_address("lw2", "10.79.0.1/24")
        if i % 3:
            env.settle(0.002)
        env.nl.add_address("lw2", "10.79.0.1/24")
        env.settle(0.001)
    env.run_until(lambda: watcher.usable("lw0"))
    env.settle()
    assert no_repeats(env.events, initial), env.events
    assert watcher.state() == {"lw0": True, "lw2": True}
    assert [e for e in env.events if e[0] == "lw0"][-1] == ("lw0", True)


def test_overrun_resyncs(env, caplog):
    env.veth("lw0", "lw1")
    watcher = env.watch("lw0")
    watcher._events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the minimum: a few messages
    for _ in range(50):
        env.nl.del_address("lw0", "10.77.0.1/24")
        env.nl.add_address("lw0", "10.77.0.1/24")
    env.nl.del_address("lw0", "10.77.0.1/24")
    env.run_until(lambda: env.events)
    env.settle()
    assert env.events == [("lw0", False)]
    assert "receive queue overrun" in caplog.text


def test_resync_without_running_loop(env):
    env.veth("lw0", "lw1")
    watcher = env.watch("lw0")
    env.nl.set_link("lw1", up=False)
    time.sleep(0.2)  # the carrier change is processed by the kernel's linkwatch work, asynchronously
    watcher.resync()  # the loop is not running: resync alone must see and report the change
    assert env.events == [("lw0", False)]
    env.settle()  # the queued events must not report it again
    assert env.events == [("lw0", False)]
    watcher.resync()
    assert env.events == [("lw0", False)]


def test_callback_exception_is_logged(env, caplog):
    env.veth("lw0", "lw1")
    calls: list[tuple[str, bool]] = []

    def explode(name: str, usable: bool) -> None:
        calls.append((name, usable))
        raise RuntimeError("boom")

    watcher = LinkWatcher(["lw0"], explode)
    env.watchers.append(watcher)
    watcher.start(env.loop)
    env.nl.set_link("lw1", up=False)
    env.run_until(lambda: calls)
    env.nl.set_link("lw1", up=True)
    env.run_until(lambda: len(calls) == 2)
    assert calls == [("lw0", False), ("lw0", True)]
    assert "boom" in caplog.text and watcher.usable("lw0")


def test_close_is_idempotent_and_releases_fds(env):
    env.veth("lw0", "lw1")
    LinkWatcher(["lw0"], env.record).close()  # never started
    before = len(os.listdir("/proc/self/fd"))
    watcher = LinkWatcher(["lw0"], env.record)
    watcher.start(env.loop)
    fd = watcher._events.fileno()
    assert len(os.listdir("/proc/self/fd")) == before + 2  # event socket + dump socket
    watcher.close()
    watcher.close()
    assert len(os.listdir("/proc/self/fd")) == before
    assert env.loop.remove_reader(fd) is False  # the reader is gone
    env.nl.set_link("lw1", up=False)
    env.settle(0.1)
    assert env.events == []
    with pytest.raises(RuntimeError):
        watcher.start(env.loop)
    with pytest.raises(RuntimeError):
        watcher.resync()
