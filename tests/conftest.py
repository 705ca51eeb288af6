"""Fixtures for the interop tests: a session-wide test PKI."""

from __future__ import annotations

import pytest

from tests.interop.pki import TestPKI, make_test_pki


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory) -> TestPKI:
    """CA + server certificate (DNS:localhost, IP:127.0.0.1, IP:::1); paths in .ca, .cert, .key."""
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory) -> TestPKI:
    """An unrelated CA (and certificate): a client trusting only this CA must reject servers using test_pki."""
    return make_test_pki(tmp_path_factory.mktemp("other-pki"))
