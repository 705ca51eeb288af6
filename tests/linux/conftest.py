"""Throw-away network namespaces for the tests that change links, routes, sysctls and nftables.

``netns`` creates a namespace, moves the test's thread into it (pyroute2 ``pushns``; the rest of the process
stays where it was), brings ``lo`` up, and removes it afterwards: everything the test does to the network dies
with it. ``make_netns`` creates more (not entered; use ``inside(name)``). Both skip when not root.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil

import pytest

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (network namespaces)")
needs_tun = pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun")
needs_nft = pytest.mark.skipif(shutil.which("nft") is None, reason="nft (nftables) not installed")

_counter = itertools.count()


def _new_name() -> str:
    return f"mqvpn-t{os.getpid()}-{next(_counter)}"


def _create(name: str) -> None:
    from pyroute2 import netns as pr_netns

    from mqvpn.linux.netlink import Netlink

    pr_netns.create(name)
    with inside(name), Netlink() as nl:
        nl.set_link("lo", up=True)


def _remove(name: str) -> None:
    from pyroute2 import netns as pr_netns

    with contextlib.suppress(OSError):
        pr_netns.remove(name)


@contextlib.contextmanager
def inside(name: str):
    """Run the block with this thread in namespace ``name`` (sockets and Netlinks made here stay there)."""
    from pyroute2 import netns as pr_netns

    pr_netns.pushns(name)
    try:
        yield
    finally:
        pr_netns.popns()


@pytest.fixture
def netns():
    """The test runs inside a fresh network namespace; yields its name."""
    if not IS_ROOT:
        pytest.skip("needs root (network namespaces)")
    name = _new_name()
    _create(name)
    try:
        with inside(name):
            yield name
    finally:
        _remove(name)


@pytest.fixture
def make_netns():
    """A factory of further namespaces (not entered), all removed at the end."""
    if not IS_ROOT:
        pytest.skip("needs root (network namespaces)")
    made: list[str] = []

    def make() -> str:
        name = _new_name()
        _create(name)
        made.append(name)
        return name

    yield make
    for name in made:
        _remove(name)
