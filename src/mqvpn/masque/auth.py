"""Pre-shared-key Bearer authentication, compatible with the reference C implementation.

A key is ``generate_key()``'s 44-character padded base64 text of 32 random bytes, and it is used verbatim as a
string (never base64-decoded): the client sends ``authorization: Bearer <key>``. The server holds one optional
global key plus any number of named user keys.

``KeyStore.authenticate`` returns who the presented key belongs to:

- a user name (non-empty ``str``) for a user key,
- ``GLOBAL_USER`` (the empty string ``""``) for the global key; user names are never empty, so this is unambiguous,
- ``None`` on any failure (missing header, wrong scheme, empty token, unknown key, or no keys configured at all:
  an empty store admits nobody; the daemon decides separately whether it runs without authentication).

The check hashes the presented token with SHA-256 and compares that digest with the digest of *every* stored key
using ``hmac.compare_digest``, with no early exit, so neither which key matched nor the key lengths show in the
time taken. Only the number of configured keys does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping

GLOBAL_USER = ""
BEARER_PREFIX = b"Bearer "  # exact, case-sensitive, one space: what the reference server accepts
KEY_BYTES = 32

_compare = hmac.compare_digest  # module-level so tests can count the comparisons


def generate_key() -> str:
    """32 random bytes as padded base64 (44 characters), like ``mqvpn --genkey``."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def _check_key(key: str) -> None:
    if not isinstance(key, str):
        raise TypeError("key must be a str")
    if not key:
        raise ValueError("key is empty")
    if key != key.strip():
        raise ValueError("key has leading or trailing whitespace (HTTP would strip it)")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise ValueError("key holds a control character")


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError("user name must be a str")
    if not name:
        raise ValueError("user name is empty")
    if ":" in name:
        raise ValueError(f"user name {name!r} contains ':'")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ValueError(f"user name {name!r} contains whitespace or a control character")


def parse_user_spec(spec: str) -> tuple[str, str]:
    """``"NAME:KEY"`` (as given to ``--user`` or ``User=``) -> ``(name, key)``; the key may itself contain ':'."""
    if not isinstance(spec, str):
        raise TypeError("user spec must be a str of the form NAME:KEY")
    name, colon, key = spec.partition(":")
    if not colon:
        raise ValueError(f"user spec {spec!r} has no ':' (expected NAME:KEY)")
    if not name:
        raise ValueError("user spec has an empty NAME (expected NAME:KEY)")
    if not key:
        raise ValueError(f"user spec for {name!r} has an empty KEY (expected NAME:KEY)")
    _check_name(name)
    _check_key(key)
    return name, key


class KeyStore:
    """The server's keys: an optional global key and named user keys. No two entries may share a key."""

    def __init__(self, global_key: str | None = None, users: Mapping[str, str] | None = None) -> None:
        self._entries: dict[str, bytes] = {}  # identity (GLOBAL_USER for the global key) -> SHA-256 of the key
        if global_key is not None:
            _check_key(global_key)
            self._entries[GLOBAL_USER] = _digest(global_key.encode("utf-8"))
        for name, key in (users or {}).items():
            self.add_user(name, key)

    @property
    def auth_required(self) -> bool:
        """True when at least one key is configured."""
        return bool(self._entries)

    @property
    def has_global_key(self) -> bool:
        return GLOBAL_USER in self._entries

    def add_user(self, name: str, key: str) -> None:
        """Add a user, or replace an existing user's key. ValueError on a bad name or key, or on a key that
        another entry (user or global) already uses: identities must be unambiguous."""
        _check_name(name)
        _check_key(key)
        digest = _digest(key.encode("utf-8"))
        for other, other_digest in self._entries.items():
            if other != name and other_digest == digest:
                holder = "the global key" if other == GLOBAL_USER else f"user {other!r}"
                raise ValueError(f"key for {name!r} is already used by {holder}")
        self._entries[name] = digest

    def remove_user(self, name: str) -> bool:
        """Remove a user; False if there was none by that name. The global key is not a user."""
        if name == GLOBAL_USER or name not in self._entries:
            return False
        del self._entries[name]
        return True

    def list_users(self) -> list[str]:
        """User names, sorted (the global key is not listed)."""
        return sorted(name for name in self._entries if name != GLOBAL_USER)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, authorization: bytes | str | None) -> str | None:
        """The identity owning the ``authorization`` header value (see the module docstring), else None."""
        if authorization is None:
            return None
        if isinstance(authorization, str):
            try:
                authorization = authorization.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: no key can match
                return None
        elif not isinstance(authorization, (bytes, bytearray, memoryview)):
            return None
        authorization = bytes(authorization)
        if not authorization.startswith(BEARER_PREFIX) or len(authorization) == len(BEARER_PREFIX):
            return None
        presented = _digest(authorization[len(BEARER_PREFIX) :])
        found = None
        for name, digest in self._entries.items():  # every entry, always: no early exit
            if _compare(presented, digest):
                found = name
        return found


__all__ = ["BEARER_PREFIX", "GLOBAL_USER", "KeyStore", "generate_key", "parse_user_spec"]
