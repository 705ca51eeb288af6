"""Fixtures of the namespace testbed (tests/netns/lab.py)."""

from __future__ import annotations

import pytest

from tests.netns.lab import Lab, unavailable


def pytest_configure(config):
    config.addinivalue_line("markers", "netns: needs root and network namespaces (tests/netns/lab.py)")


@pytest.fixture
def lab():
    """A fresh lab with one transparent uplink (A)."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with Lab(1) as lab:
        yield lab


@pytest.fixture
def mlab():
    """A fresh lab with the two shaped uplinks of the issues: A 300 Mbit/s 10 ms, B 80 Mbit/s 30 ms."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with Lab(2, shaped=True) as lab:
        yield lab


@pytest.fixture
def lab2():
    """A fresh lab with two transparent uplinks (A, B)."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with Lab(2) as lab:
        yield lab
