"""The server's inner-address pool, and the table that maps an inner address to its session.

``AddressPool`` hands out the host addresses of one prefix, of any size the family allows (a /16, an IPv6 /64),
in O(1) time and with memory proportional to the addresses handed out, never to the prefix: a counter walks the
never-used addresses and released ones wait in a FIFO free list (the oldest released is reused first, which keeps
an address idle as long as possible before a new client gets it).

Which addresses are handed out:

- IPv4 up to /30: not the network or broadcast address; /31 (RFC 3021) and /32 use every address;
- IPv6 up to /126: not the all-zero Subnet-Router anycast address; /127 (RFC 6164) and /128 use every address;
- with ``reserve_first`` (the default), the first of those is the server's own TUN address (``server_address``)
  and is never handed out either.

``SessionTable`` is the per-packet lookup: a dict keyed by the raw 4- or 16-byte address, so the data path does
``table.lookup_raw(dst)`` with the bytes ``packet_addresses`` sliced out of the header, and no ipaddress objects.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Generic, TypeVar

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
AddressLike = IPAddress | str | bytes | bytearray | memoryview

S = TypeVar("S")


def _to_address(addr: AddressLike) -> IPAddress:
    """An ipaddress object from an address object, its text, or its 4/16 packed bytes (ValueError otherwise)."""
    if isinstance(addr, (IPv4Address, IPv6Address)):
        return addr
    if isinstance(addr, (bytes, bytearray, memoryview)):
        raw = bytes(addr)
        if len(raw) == 4:
            return IPv4Address(raw)
        if len(raw) == 16:
            return IPv6Address(raw)
        raise ValueError(f"a packed address is 4 or 16 bytes, not {len(raw)}")
    if isinstance(addr, str):
        return ip_address(addr)
    raise ValueError(f"not an IP address: {addr!r}")


class AddressPool:
    """Host addresses of ``prefix`` for clients: O(1) ``allocate`` / ``release``, no per-prefix memory."""

    def __init__(self, prefix: str | IPNetwork, *, reserve_first: bool = True) -> None:
        network = prefix if isinstance(prefix, (IPv4Network, IPv6Network)) else ip_network(prefix)  # strict
        self.network = network
        self._address_class = IPv4Address if network.version == 4 else IPv6Address
        base = int(network.network_address)
        size = network.num_addresses
        point_to_point = network.max_prefixlen - network.prefixlen <= 1  # /31, /32, /127, /128
        first = base if point_to_point else base + 1
        last = base + size - 1 if point_to_point or network.version == 6 else base + size - 2
        self._server = first if reserve_first else None
        self._first = first + 1 if reserve_first else first
        self._last = last
        self._next = self._first  # lowest address never handed out (addresses reserved ahead of it are skipped)
        self._free: deque[int] = deque()  # released addresses, oldest first; may hold stale entries
        self._free_set: set[int] = set()  # the truth about which released addresses are free
        self._used: set[int] = set()

    # -- sizes ----------------------------------------------------------------------------------------------

    @property
    def server_address(self) -> IPAddress | None:
        """The server's own address in the prefix (None without ``reserve_first``)."""
        return None if self._server is None else self._address_class(self._server)

    @property
    def capacity(self) -> int:
        """How many clients the pool can hold at once."""
        return max(0, self._last - self._first + 1)

    @property
    def in_use(self) -> int:
        return len(self._used)

    @property
    def available(self) -> int:
        return self.capacity - len(self._used)

    # -- allocation -----------------------------------------------------------------------------------------

    def allocate(self) -> IPAddress | None:
        """A free address, or None when the pool is full."""
        free, free_set = self._free, self._free_set
        while free:
            n = free.popleft()
            if n in free_set:  # else a stale entry: reserved since it was released
                free_set.remove(n)
                self._used.add(n)
                return self._address_class(n)
        n = self._next
        used = self._used
        while n <= self._last and n in used:  # skip addresses taken with reserve()
            n += 1
        if n > self._last:
            self._next = n
            return None
        self._next = n + 1
        used.add(n)
        return self._address_class(n)

    def reserve(self, addr: AddressLike) -> bool:
        """Take one specific address (e.g. a client's preferred one); False if it is already in use.
        ValueError if the pool never hands that address out."""
        n = self._index(addr)
        if n in self._used:
            return False
        if n < self._next:
            self._free_set.discard(n)  # its deque entry goes stale
        self._used.add(n)
        return True

    def release(self, addr: AddressLike) -> None:
        """Return an address. ValueError if it is not currently allocated from this pool."""
        n = self._index(addr)
        if n not in self._used:
            raise ValueError(f"{self._address_class(n)} is not allocated (double release?)")
        self._used.remove(n)
        if n < self._next:
            self._free.append(n)
            self._free_set.add(n)
        # else: reserved ahead of the counter, which will reach it in turn

    def __contains__(self, addr: object) -> bool:
        """Is ``addr`` currently allocated?"""
        try:
            return self._index(addr) in self._used  # type: ignore[arg-type]
        except ValueError:
            return False

    def _index(self, addr: AddressLike) -> int:
        address = _to_address(addr)
        if address.version != self.network.version or address not in self.network:
            raise ValueError(f"{address} is not in the pool {self.network}")
        n = int(address)
        if n == self._server:
            raise ValueError(f"{address} is the server's own address")
        if not self._first <= n <= self._last:
            raise ValueError(f"{address} is reserved in {self.network} (network or broadcast)")
        return n

    def __repr__(self) -> str:
        return f"AddressPool({self.network}, in_use={self.in_use}, capacity={self.capacity})"


class SessionTable(Generic[S]):
    """Inner address -> session, O(1). Keys are the raw 4- or 16-byte addresses.

    ``lookup_raw(dst)`` is the bound ``dict.get`` itself: pass ``bytes`` (or a read-only ``memoryview``) of 4 or
    16 bytes; anything else simply finds nothing.
    """

    def __init__(self) -> None:
        self._by_address: dict[bytes, S] = {}
        self.lookup_raw = self._by_address.get

    @staticmethod
    def _key(addr: AddressLike) -> bytes:
        if type(addr) is bytes and len(addr) in (4, 16):
            return addr
        return _to_address(addr).packed

    def add(self, addr: AddressLike, session: S) -> None:
        """Bind ``addr`` to ``session``. ValueError if it is already bound (release it first)."""
        key = self._key(addr)
        if key in self._by_address:
            raise ValueError(f"{_to_address(key)} is already bound to a session")
        self._by_address[key] = session

    def remove(self, addr: AddressLike) -> S | None:
        """Unbind ``addr``; the session it had, or None."""
        return self._by_address.pop(self._key(addr), None)

    def lookup(self, addr: AddressLike) -> S | None:
        """The session for ``addr`` (raw bytes, address object or text), or None."""
        if type(addr) is bytes:
            return self._by_address.get(addr)
        try:
            return self._by_address.get(self._key(addr))
        except ValueError:
            return None

    def __len__(self) -> int:
        return len(self._by_address)

    def __contains__(self, addr: object) -> bool:
        try:
            return self._key(addr) in self._by_address  # type: ignore[arg-type]
        except ValueError:
            return False

    def items(self) -> Iterator[tuple[IPAddress, S]]:
        for key, session in list(self._by_address.items()):
            yield _to_address(key), session


def packet_addresses(packet: bytes | bytearray | memoryview) -> tuple[int, bytes, bytes] | None:
    """``(version, source, destination)`` of an IPv4 or IPv6 packet, the addresses as raw ``bytes``; None if the
    packet is too short for its header, claims more bytes than it has, or is neither version."""
    n = len(packet)
    if n == 0:
        return None
    first = packet[0]
    version = first >> 4
    if version == 4:
        header = (first & 0x0F) * 4
        if header < 20 or n < header:
            return None
        total = (packet[2] << 8) | packet[3]
        if total < header or total > n:
            return None
        return 4, bytes(packet[12:16]), bytes(packet[16:20])
    if version == 6:
        if n < 40 or 40 + ((packet[4] << 8) | packet[5]) > n:
            return None
        return 6, bytes(packet[8:24]), bytes(packet[24:40])
    return None


__all__ = ["AddressPool", "SessionTable", "packet_addresses"]
