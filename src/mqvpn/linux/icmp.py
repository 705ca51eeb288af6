"""What a router does to a forwarded packet, in pure Python: TTL / hop limit - 1, and the ICMP errors it sends.

The tunnel endpoints are routers (RFC 9484 §4.3): a packet entering the tunnel has its TTL (IPv4) or hop limit
(IPv6) decremented, and one that cannot go on is answered with an ICMP error sent back into the TUN:
  - TTL / hop limit expired: Time Exceeded (ICMPv4 type 11 / ICMPv6 type 3), code 0;
  - larger than the tunnel carries: Fragmentation Needed (ICMPv4 type 3 code 4, next-hop MTU) / Packet Too Big
    (ICMPv6 type 2);
  - refused by policy: Destination Unreachable, administratively prohibited (ICMPv4 3/13, ICMPv6 1/1).
An error quotes as much of the offending packet as fits in 576 bytes (IPv4, RFC 1812 §4.3.2.3) or 1280 bytes
(IPv6, RFC 4443 §2.4 (c)). No error answers an ICMP error, a packet whose source is not one host (unspecified,
loopback, multicast, broadcast), a packet to a multicast or broadcast address (except Packet Too Big for IPv6,
RFC 4443 §2.4 (e.3)), or a fragment other than the first (RFC 1812 §4.3.2.7, RFC 4443 §2.4 (e)). Builders return
None in those cases and for anything that is not a well-formed IP header; they never raise on packet bytes.
Callers rate-limit errors with ``RateLimiter``.

Checksums are computed with one big-integer remainder (see ``internet_checksum``); the TTL decrement patches the
IPv4 header checksum incrementally (RFC 1624).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Callable

__all__ = [
    "decrement_ttl",
    "time_exceeded",
    "packet_too_big",
    "dest_unreachable",
    "internet_checksum",
    "RateLimiter",
    "IPV4_ERROR_LIMIT",
    "IPV6_ERROR_LIMIT",
]

IPV4_ERROR_LIMIT = 576  # an ICMPv4 error (IP header included) is at most this long
IPV6_ERROR_LIMIT = 1280  # an ICMPv6 error (IPv6 header included) is at most this long
ERROR_TTL = 64
IPV6_MIN_MTU = 1280
IPV4_MIN_MTU = 68

PROTO_ICMP = 1
PROTO_ICMPV6 = 58
_ICMP4_ERRORS = frozenset({3, 4, 5, 11, 12})  # unreachable, source quench, redirect, time exceeded, param problem
# IPv6 extension headers walked to find the upper layer: hop-by-hop, routing, destination options (length in
# 8-octet units past the first 8), AH (length in 4-octet units past the first 8); fragment is handled apart.
_EXT_8 = frozenset({0, 43, 60})
_EXT_AH = 51
_EXT_FRAGMENT = 44
_EXT_MAX = 8  # give up (and send nothing) on longer chains


# --- checksums --------------------------------------------------------------------------------------------------
def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 checksum of ``data`` plus ``initial`` (a partial sum, e.g. of a pseudo-header), as an int.

    2**16 = 1 (mod 0xFFFF), so ``data`` read as one big-endian integer is, modulo 0xFFFF, the end-around-carry
    sum of its 16-bit words: one remainder in C instead of a loop over words. The one case the remainder cannot
    tell (0 for a sum of 0xFFFF) is told apart by whether any input is non-zero.
    """
    if len(data) & 1:
        data = bytes(data) + b"\0"
    total = (int.from_bytes(data, "big") + initial) % 0xFFFF
    if total == 0 and (initial or any(data)):
        total = 0xFFFF
    return ~total & 0xFFFF


def _pseudo_sum6(src: bytes, dst: bytes, length: int, next_header: int) -> int:
    """The IPv6 pseudo-header's contribution (RFC 8200 §8.1), as an unfolded network-order sum."""
    words = struct.unpack("!16H", src + dst)
    return sum(words) + (length >> 16) + (length & 0xFFFF) + next_header


# --- TTL / hop limit ----------------------------------------------------------------------------------------------
def decrement_ttl(packet: bytes) -> bytes | None:
    """The packet with its TTL (IPv4) or hop limit (IPv6) one lower, or None when it must not be forwarded:
    the value was 0 or 1 (answer with ``time_exceeded``), or the bytes are not an IPv4/IPv6 header."""
    n = len(packet)
    if not n:
        return None
    version = packet[0] >> 4
    if version == 4:
        if n < 20 or (packet[0] & 0x0F) < 5 or n < (packet[0] & 0x0F) * 4:
            return None
        ttl = packet[8]
        if ttl <= 1:
            return None
        # RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'); the word m = TTL<<8 | protocol drops by 0x0100, so
        # ~m + m' = 0xFEFF in ones' complement arithmetic.
        total = (~((packet[10] << 8) | packet[11]) & 0xFFFF) + 0xFEFF
        total = (total & 0xFFFF) + (total >> 16)
        check = ~total & 0xFFFF
        out = bytearray(packet)
        out[8] = ttl - 1
        out[10] = check >> 8
        out[11] = check & 0xFF
        return bytes(out)
    if version == 6:
        if n < 40:
            return None
        hops = packet[7]
        if hops <= 1:
            return None
        out = bytearray(packet)
        out[7] = hops - 1
        return bytes(out)
    return None


# --- ICMP errors --------------------------------------------------------------------------------------------------
def time_exceeded(packet: bytes, from_addr) -> bytes | None:
    """ICMP Time Exceeded in transit (v4 11/0, v6 3/0) from ``from_addr`` to the packet's source, or None."""
    version = packet[0] >> 4 if packet else 0
    if version == 4:
        return _icmp4_error(packet, 11, 0, b"\0\0\0\0", from_addr)
    if version == 6:
        return _icmp6_error(packet, 3, 0, b"\0\0\0\0", from_addr, to_multicast=False)
    return None


def packet_too_big(packet: bytes, mtu: int, from_addr) -> bytes | None:
    """ICMPv4 Fragmentation Needed (3/4, next-hop MTU; RFC 1191) or ICMPv6 Packet Too Big (2/0), or None.

    ``mtu`` is the largest packet the tunnel carries now, clamped to 68..65535 (IPv4) or 1280..2**32-1 (IPv6:
    below 1280 IPv6 cannot run at all, RFC 8200 §5). For IPv4 the message is built whatever the DF bit says; a
    caller that wants to fragment non-DF packets instead checks ``packet[6] & 0x40`` first.
    """
    version = packet[0] >> 4 if packet else 0
    if version == 4:
        mtu = min(max(mtu, IPV4_MIN_MTU), 0xFFFF)
        return _icmp4_error(packet, 3, 4, struct.pack("!HH", 0, mtu), from_addr)
    if version == 6:
        mtu = min(max(mtu, IPV6_MIN_MTU), 0xFFFFFFFF)
        return _icmp6_error(packet, 2, 0, struct.pack("!I", mtu), from_addr, to_multicast=True)
    return None


def dest_unreachable(packet: bytes, from_addr, *, code: int | None = None) -> bytes | None:
    """ICMP Destination Unreachable, by default "administratively prohibited" (v4 3/13, v6 1/1), or None."""
    version = packet[0] >> 4 if packet else 0
    if version == 4:
        return _icmp4_error(packet, 3, 13 if code is None else code, b"\0\0\0\0", from_addr)
    if version == 6:
        return _icmp6_error(packet, 1, 1 if code is None else code, b"\0\0\0\0", from_addr, to_multicast=False)
    return None


def _address_bytes(addr, size: int) -> bytes | None:
    """``from_addr`` as packed bytes of ``size`` (4 or 16), or None when it is of the other family."""
    if isinstance(addr, (bytes, bytearray)):
        return bytes(addr) if len(addr) == size else None
    if isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        packed = addr.packed
        return packed if len(packed) == size else None
    try:
        return socket.inet_pton(socket.AF_INET if size == 4 else socket.AF_INET6, str(addr))
    except OSError:
        return None


def _bad_source4(a: bytes) -> bool:
    # 0.0.0.0/8 "this network", 127/8 loopback, 224/4 multicast, 240/4 reserved (and 255.255.255.255 broadcast)
    return a[0] == 0 or a[0] == 127 or a[0] >= 224


def _icmp4_error(packet: bytes, icmp_type: int, code: int, rest: bytes, from_addr) -> bytes | None:
    n = len(packet)
    ihl = (packet[0] & 0x0F) * 4
    if n < 20 or ihl < 20 or n < ihl:
        return None
    if (packet[6] & 0x1F) or packet[7]:  # fragment offset != 0: not the first fragment
        return None
    src = packet[12:16]
    dst = packet[16:20]
    if _bad_source4(src) or dst[0] >= 224:  # multicast, reserved and limited broadcast destinations
        return None
    if packet[9] == PROTO_ICMP and (n < ihl + 1 or packet[ihl] in _ICMP4_ERRORS):
        return None  # an ICMP error (or we cannot tell): never answer
    me = _address_bytes(from_addr, 4)
    if me is None:
        return None
    quote = packet[: IPV4_ERROR_LIMIT - 28]
    body = bytearray(8 + len(quote))
    body[0] = icmp_type
    body[1] = code
    body[4:8] = rest
    body[8:] = quote
    check = internet_checksum(body)
    body[2] = check >> 8
    body[3] = check & 0xFF
    header = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, 20 + len(body), 0, 0, ERROR_TTL, PROTO_ICMP, 0, me, src)
    )
    check = internet_checksum(header)
    header[10] = check >> 8
    header[11] = check & 0xFF
    return bytes(header + body)


def _upper_layer6(packet: bytes) -> tuple[int, int] | None:
    """(next header, offset) of the upper-layer header, or None for a non-first fragment or an unreadable
    chain. A first fragment is walked on (its upper-layer header is in it)."""
    n = len(packet)
    nh = packet[6]
    off = 40
    for _ in range(_EXT_MAX):
        if nh in _EXT_8:
            if off + 2 > n:
                return None
            nh, off = packet[off], off + (packet[off + 1] + 1) * 8
        elif nh == _EXT_AH:
            if off + 2 > n:
                return None
            nh, off = packet[off], off + (packet[off + 1] + 2) * 4
        elif nh == _EXT_FRAGMENT:
            if off + 8 > n:
                return None
            if ((packet[off + 2] << 8) | packet[off + 3]) & 0xFFF8:  # fragment offset != 0
                return None
            nh, off = packet[off], off + 8
        else:
            return nh, off
    return None


def _icmp6_error(
    packet: bytes, icmp_type: int, code: int, rest: bytes, from_addr, *, to_multicast: bool
) -> bytes | None:
    if len(packet) < 40:
        return None
    src = packet[8:24]
    dst = packet[24:40]
    if src[0] == 0xFF or src == bytes(16) or src == _LOOPBACK6:
        return None
    if dst[0] == 0xFF and not to_multicast:
        return None
    upper = _upper_layer6(packet)
    if upper is None:
        return None
    nh, off = upper
    if nh == PROTO_ICMPV6 and (off >= len(packet) or packet[off] < 128):  # an error, or cannot tell
        return None
    me = _address_bytes(from_addr, 16)
    if me is None:
        return None
    quote = packet[: IPV6_ERROR_LIMIT - 48]
    length = 8 + len(quote)
    body = bytearray(length)
    body[0] = icmp_type
    body[1] = code
    body[4:8] = rest
    body[8:] = quote
    check = internet_checksum(body, _pseudo_sum6(me, src, length, PROTO_ICMPV6))
    body[2] = check >> 8
    body[3] = check & 0xFF
    header = struct.pack("!IHBB16s16s", 0x60000000, length, PROTO_ICMPV6, ERROR_TTL, me, src)
    return header + bytes(body)


_LOOPBACK6 = bytes(15) + b"\x01"


# --- rate limiting ------------------------------------------------------------------------------------------------
class RateLimiter:
    """Token bucket: ``rate_per_s`` tokens a second, at most ``burst`` saved; ``allow()`` spends one if it can.

    ``clock`` (seconds, monotonic) is injectable for tests; the bucket starts full.
    """

    __slots__ = ("rate", "burst", "tokens", "_last", "_clock", "allowed", "refused")

    def __init__(self, rate_per_s: float, burst: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s < 0 or burst < 1:
            raise ValueError("rate_per_s must be >= 0 and burst >= 1")
        self.rate = float(rate_per_s)
        self.burst = float(burst)
        self.tokens = float(burst)
        self._clock = clock
        self._last = clock()
        self.allowed = 0
        self.refused = 0

    def allow(self) -> bool:
        now = self._clock()
        elapsed = now - self._last
        self._last = now
        if elapsed > 0:
            tokens = self.tokens + elapsed * self.rate
            self.tokens = tokens if tokens < self.burst else self.burst
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.allowed += 1
            return True
        self.refused += 1
        return False
