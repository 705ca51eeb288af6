"""Capsule Protocol (RFC 9297 §3.2) and the CONNECT-IP capsules (RFC 9484 §4.7), sans-I/O.

A capsule on the data stream is ``Type (i) | Length (i) | Value (Length bytes)``. ``CapsuleParser`` turns stream
bytes into decoded capsule objects as they arrive; ``encode_capsule`` does the reverse.

Receive rules (all of them raise ``CapsuleError``; the caller aborts the request stream with H3_MESSAGE_ERROR,
``CapsuleError.error_code``). Nothing else escapes the parser or ``decode_capsule``:

- a value with missing or extra bytes; a truncated capsule at FIN (``CapsuleParser.finish``);
- a known capsule longer than the parser's ``max_capsule_size`` (we never buffer more than that; unknown capsule
  types are skipped byte by byte, whatever their length, as RFC 9297 requires);
- an IP Version other than 4 or 6; a prefix length above the address length; host bits set below the prefix
  (ADDRESS_ASSIGN and ADDRESS_REQUEST; see ``lenient_host_bits`` for the reference server);
- an ADDRESS_REQUEST with no entries, a zero Request ID, or one Request ID twice in the same capsule (reuse across
  capsules is for the session to track: ``AddressRequest.request_ids``);
- a ROUTE_ADVERTISEMENT range with Start > End, ranges out of order (version, then protocol, then End(A) < Start(B)
  strictly), or a protocol-0 range overlapping a protocol-N range of the same family.

Encoding checks the same rules and raises ``ValueError`` (a local bug, not a peer's): we never send what we would
reject.

Interop: the reference C server (mqvpn) sends IPv4 and IPv6 state in separate ADDRESS_ASSIGN / ROUTE_ADVERTISEMENT
capsules, each of which replaces the previous one under RFC 9484; ``merge_per_family`` recombines them. It also
assigns its IPv6 address with the pool's prefix length and the host bits set (e.g. ``fd00::2/112``); a parser made
with ``lenient_host_bits=True`` reads such an entry as the single address (``fd00::2/128``) instead of failing.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from itertools import pairwise
from typing import ClassVar

from ..quic.buffer import UINT_VAR_MAX, encode_uint_var

H3_MESSAGE_ERROR = 0x10E
DEFAULT_MAX_CAPSULE_SIZE = 64 * 1024

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

_ADDRESS_LENGTH = {4: 4, 6: 16}  # IP Version byte -> address bytes
_ADDRESS_CLASS = {4: IPv4Address, 6: IPv6Address}
_NETWORK_CLASS = {4: IPv4Network, 6: IPv6Network}


class CapsuleType(IntEnum):
    DATAGRAM = 0x00  # RFC 9297 §3.5
    ADDRESS_ASSIGN = 0x01  # RFC 9484 §4.7.1
    ADDRESS_REQUEST = 0x02  # RFC 9484 §4.7.2
    ROUTE_ADVERTISEMENT = 0x03  # RFC 9484 §4.7.3


class CapsuleError(Exception):
    """The capsule stream is malformed: abort the request stream with ``error_code`` (H3_MESSAGE_ERROR)."""

    error_code = H3_MESSAGE_ERROR

    def __init__(self, reason: str, capsule_type: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.capsule_type = capsule_type


# --------------------------------------------------------------------------------------------------------------
# Capsule values


@dataclass(frozen=True)
class AssignedAddress:
    """One ADDRESS_ASSIGN entry. ``request_id`` is 0 when unsolicited; an all-zero /32 or /128 with a nonzero id is
    a refused request."""

    request_id: int
    prefix: IPNetwork

    def __post_init__(self) -> None:
        _check_entry(self.request_id, self.prefix, zero_id_ok=True)


@dataclass(frozen=True)
class RequestedAddress:
    """One ADDRESS_REQUEST entry: a nonzero id; the all-zero address means "any address of this family" and the
    prefix length is the preferred size."""

    request_id: int
    prefix: IPNetwork

    def __post_init__(self) -> None:
        _check_entry(self.request_id, self.prefix, zero_id_ok=False)


@dataclass(frozen=True)
class IpRange:
    """One ROUTE_ADVERTISEMENT entry: addresses ``start``..``end`` inclusive, one family, ``protocol`` 0 = all."""

    start: IPAddress
    end: IPAddress
    protocol: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.start, (IPv4Address, IPv6Address)) or not isinstance(
            self.end, (IPv4Address, IPv6Address)
        ):
            raise TypeError("IpRange start and end must be IPv4Address or IPv6Address")
        if self.start.version != self.end.version:
            raise ValueError(f"IpRange mixes families: {self.start} .. {self.end}")
        if self.start > self.end:
            raise ValueError(f"IpRange start {self.start} is above end {self.end}")
        if not 0 <= self.protocol <= 255:
            raise ValueError(f"IpRange protocol {self.protocol} is not 0..255")

    @property
    def version(self) -> int:
        return self.start.version

    @classmethod
    def from_network(cls, network: IPNetwork | str, protocol: int = 0) -> IpRange:
        """The range covering ``network`` (e.g. ``"0.0.0.0/0"`` for every IPv4 address)."""
        if isinstance(network, str):
            network = ip_network(network)
        return cls(network.network_address, network.broadcast_address, protocol)


@dataclass
class DatagramCapsule:
    """An HTTP Datagram carried on the stream; ``payload`` is ``Context ID (i) | Payload`` for CONNECT-IP."""

    capsule_type: ClassVar[int] = CapsuleType.DATAGRAM
    payload: bytes


@dataclass
class AddressAssign:
    """The full current set of addresses assigned to the receiver (an empty list withdraws all)."""

    capsule_type: ClassVar[int] = CapsuleType.ADDRESS_ASSIGN
    addresses: list[AssignedAddress] = field(default_factory=list)


@dataclass
class AddressRequest:
    """One or more address requests (never empty on the wire)."""

    capsule_type: ClassVar[int] = CapsuleType.ADDRESS_REQUEST
    addresses: list[RequestedAddress] = field(default_factory=list)

    @property
    def request_ids(self) -> list[int]:
        """The ids in this capsule, for the session's never-reused check across the connection."""
        return [a.request_id for a in self.addresses]


@dataclass
class RouteAdvertisement:
    """The full set of routes the sender reaches through the tunnel (supersedes every earlier one)."""

    capsule_type: ClassVar[int] = CapsuleType.ROUTE_ADVERTISEMENT
    ranges: list[IpRange] = field(default_factory=list)


Capsule = DatagramCapsule | AddressAssign | AddressRequest | RouteAdvertisement


def _check_entry(request_id: int, prefix: IPNetwork, *, zero_id_ok: bool) -> None:
    if not isinstance(request_id, int):
        raise TypeError(f"request ID must be an int, not {type(request_id).__name__}")
    if not 0 <= request_id <= UINT_VAR_MAX:
        raise ValueError(f"request ID {request_id!r} is not a QUIC varint")
    if request_id == 0 and not zero_id_ok:
        raise ValueError("an ADDRESS_REQUEST request ID must be nonzero")
    if not isinstance(prefix, (IPv4Network, IPv6Network)):
        raise TypeError(f"prefix must be an IPv4Network or IPv6Network, not {type(prefix).__name__}")


# --------------------------------------------------------------------------------------------------------------
# Encoding


def encode_raw_capsule(capsule_type: int, value: bytes) -> bytes:
    """``Type | Length | Value`` for any capsule type (unknown ones included)."""
    return encode_uint_var(capsule_type) + encode_uint_var(len(value)) + bytes(value)


def encode_capsule(capsule: Capsule) -> bytes:
    """Serialise ``capsule``. Raises ValueError if it breaks an RFC 9484 rule, TypeError for a non-capsule."""
    if isinstance(capsule, DatagramCapsule):
        return encode_raw_capsule(CapsuleType.DATAGRAM, capsule.payload)
    if isinstance(capsule, AddressAssign):
        value = b"".join(_encode_address(a) for a in capsule.addresses)
    elif isinstance(capsule, AddressRequest):
        try:
            _check_request(capsule.addresses)
        except CapsuleError as exc:
            raise ValueError(exc.reason) from None
        value = b"".join(_encode_address(a) for a in capsule.addresses)
    elif isinstance(capsule, RouteAdvertisement):
        try:
            _check_routes(capsule.ranges)
        except CapsuleError as exc:
            raise ValueError(exc.reason) from None
        value = b"".join(
            bytes((r.version,)) + r.start.packed + r.end.packed + bytes((r.protocol,)) for r in capsule.ranges
        )
    else:
        raise TypeError(f"not a capsule: {type(capsule).__name__}")
    return encode_raw_capsule(capsule.capsule_type, value)


def _encode_address(entry: AssignedAddress | RequestedAddress) -> bytes:
    prefix = entry.prefix
    return (
        encode_uint_var(entry.request_id)
        + bytes((prefix.version,))
        + prefix.network_address.packed
        + bytes((prefix.prefixlen,))
    )


# --------------------------------------------------------------------------------------------------------------
# Decoding


def _pull_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it), or (0, -1) when the varint runs past ``end``."""
    if pos >= end:
        return 0, -1
    first = data[pos]
    size = 1 << (first >> 6)
    if pos + size > end:
        return 0, -1
    if size == 1:
        return first, pos + 1
    return int.from_bytes(data[pos : pos + size], "big") & ((1 << (8 * size - 2)) - 1), pos + size


def decode_capsule(capsule_type: int, value: bytes, *, lenient_host_bits: bool = False) -> Capsule | None:
    """Decode one capsule value; None for a type this module does not know (skip it).

    Raises only CapsuleError (see the module docstring for the rules).
    """
    decoder = _DECODERS.get(capsule_type)
    if decoder is None:
        return None
    try:
        return decoder(value, lenient_host_bits)
    except CapsuleError as exc:
        exc.capsule_type = capsule_type
        raise
    except ValueError as exc:  # belt and braces: a dataclass check we did not anticipate
        raise CapsuleError(f"malformed capsule: {exc}", capsule_type) from None


def _decode_datagram(value: bytes, lenient: bool) -> DatagramCapsule:
    return DatagramCapsule(bytes(value))


def _decode_address_entries(value: bytes, lenient: bool) -> list[tuple[int, IPNetwork]]:
    entries = []
    pos, end = 0, len(value)
    while pos < end:
        request_id, pos = _pull_varint(value, pos, end)
        if pos < 0:
            raise CapsuleError("address entry truncated in its Request ID")
        if pos >= end:
            raise CapsuleError("address entry truncated before its IP Version")
        version = value[pos]
        size = _ADDRESS_LENGTH.get(version)
        if size is None:
            raise CapsuleError(f"IP Version {version} is neither 4 nor 6")
        pos += 1
        if pos + size + 1 > end:
            raise CapsuleError(f"IPv{version} address entry truncated")
        address = int.from_bytes(value[pos : pos + size], "big")
        prefix_len = value[pos + size]
        pos += size + 1
        bits = 8 * size
        if prefix_len > bits:
            raise CapsuleError(f"prefix length {prefix_len} exceeds the IPv{version} address length {bits}")
        if address & ((1 << (bits - prefix_len)) - 1):
            if not lenient:
                raise CapsuleError(f"host bits set below the prefix: {_ADDRESS_CLASS[version](address)}/{prefix_len}")
            prefix_len = bits  # the reference server's "address/pool-prefix": keep the address itself
        entries.append((request_id, _NETWORK_CLASS[version]((address, prefix_len))))
    return entries


def _decode_address_assign(value: bytes, lenient: bool) -> AddressAssign:
    return AddressAssign([AssignedAddress(rid, net) for rid, net in _decode_address_entries(value, lenient)])


def _decode_address_request(value: bytes, lenient: bool) -> AddressRequest:
    entries = _decode_address_entries(value, False)  # a request's prefix is ours to honour: no leniency
    # Check before building RequestedAddress, whose own check (zero id) raises ValueError.
    _check_request_ids([rid for rid, _ in entries])
    return AddressRequest([RequestedAddress(rid, net) for rid, net in entries])


def _decode_route_advertisement(value: bytes, lenient: bool) -> RouteAdvertisement:
    ranges = []
    pos, end = 0, len(value)
    while pos < end:
        version = value[pos]
        size = _ADDRESS_LENGTH.get(version)
        if size is None:
            raise CapsuleError(f"IP Version {version} is neither 4 nor 6")
        pos += 1
        if pos + 2 * size + 1 > end:
            raise CapsuleError(f"IPv{version} range truncated")
        start = int.from_bytes(value[pos : pos + size], "big")
        stop = int.from_bytes(value[pos + size : pos + 2 * size], "big")
        protocol = value[pos + 2 * size]
        pos += 2 * size + 1
        cls = _ADDRESS_CLASS[version]
        if start > stop:
            raise CapsuleError(f"range start {cls(start)} is above its end {cls(stop)}")
        ranges.append(IpRange(cls(start), cls(stop), protocol))
    _check_routes(ranges)
    return RouteAdvertisement(ranges)


_DECODERS = {
    CapsuleType.DATAGRAM: _decode_datagram,
    CapsuleType.ADDRESS_ASSIGN: _decode_address_assign,
    CapsuleType.ADDRESS_REQUEST: _decode_address_request,
    CapsuleType.ROUTE_ADVERTISEMENT: _decode_route_advertisement,
}


# --------------------------------------------------------------------------------------------------------------
# Capsule-level rules, shared by both directions (raise CapsuleError; encode turns it into ValueError)


def _check_request_ids(request_ids: list[int]) -> None:
    if not request_ids:
        raise CapsuleError("ADDRESS_REQUEST with no entries")
    if 0 in request_ids:
        raise CapsuleError("ADDRESS_REQUEST with request ID 0")
    if len(set(request_ids)) != len(request_ids):
        raise CapsuleError("ADDRESS_REQUEST repeats a request ID")


def _check_request(addresses: list[RequestedAddress]) -> None:
    _check_request_ids([a.request_id for a in addresses])


def _check_routes(ranges: list[IpRange]) -> None:
    """RFC 9484 §4.7.3 ordering and the proto-0 overlap rule. Ranges themselves are already start <= end."""
    for a, b in pairwise(ranges):
        if a.version > b.version:
            raise CapsuleError(f"route ranges out of order: IPv{a.version} before IPv{b.version}")
        if a.version == b.version:
            if a.protocol > b.protocol:
                raise CapsuleError(f"route ranges out of order: protocol {a.protocol} before {b.protocol}")
            if a.protocol == b.protocol and not a.end < b.start:
                raise CapsuleError(
                    f"route ranges overlap or are out of order: {a.start}-{a.end} then {b.start}-{b.end}"
                )
    # Ordering makes each family's protocol-0 ranges a sorted, disjoint run: binary-search each other range.
    for version in (4, 6):
        zero = [r for r in ranges if r.version == version and r.protocol == 0]
        if not zero:
            continue
        starts = [r.start for r in zero]
        for r in ranges:
            if r.version != version or r.protocol == 0:
                continue
            i = bisect_right(starts, r.end) - 1  # last protocol-0 range starting at or below r.end
            if i >= 0 and zero[i].end >= r.start:
                raise CapsuleError(
                    f"protocol-{r.protocol} range {r.start}-{r.end} overlaps protocol-0 range "
                    f"{zero[i].start}-{zero[i].end}"
                )


# --------------------------------------------------------------------------------------------------------------
# Stream parser


class CapsuleParser:
    """Incremental capsule parser for one request stream's data (the concatenated DATA frame payloads).

    ``feed`` returns the capsules completed by ``data``, decoded; unknown types are skipped without buffering
    (``skipped`` counts them). A known capsule longer than ``max_capsule_size`` is an error as soon as its header
    arrives, so at most that much (plus a header) is ever buffered. ``finish`` is called at FIN. After an error
    the parser stays failed: every later call raises the same CapsuleError (capsules completed earlier in the
    failing ``feed`` call are not returned: the stream is being aborted anyway).
    """

    def __init__(self, max_capsule_size: int = DEFAULT_MAX_CAPSULE_SIZE, *, lenient_host_bits: bool = False) -> None:
        self.max_capsule_size = max_capsule_size
        self.lenient_host_bits = lenient_host_bits
        self.skipped = 0  # unknown capsules skipped so far
        self._buffer = bytearray()
        self._skip = 0  # bytes of an unknown capsule's value still to drop
        self._error: CapsuleError | None = None
        self._finished = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[Capsule]:
        if self._error is not None:
            raise self._error
        if self._finished:
            self._fail(CapsuleError("capsule data after the end of the stream"))
        out: list[Capsule] = []
        buf = self._buffer
        if self._skip and not buf:  # inside an unknown capsule: drop without copying
            taken = min(self._skip, len(data))
            self._skip -= taken
            data = memoryview(data)[taken:]
        buf += data
        pos, end = 0, len(buf)
        try:
            while pos < end:
                if self._skip:
                    taken = min(self._skip, end - pos)
                    self._skip -= taken
                    pos += taken
                    continue
                capsule_type, after_type = _pull_varint(buf, pos, end)
                if after_type < 0:
                    break
                length, value_at = _pull_varint(buf, after_type, end)
                if value_at < 0:
                    break
                if capsule_type not in _DECODERS:
                    self.skipped += 1
                    self._skip = length
                    pos = value_at
                    continue
                if length > self.max_capsule_size:
                    raise CapsuleError(
                        f"capsule of {length} bytes exceeds the {self.max_capsule_size}-byte limit", capsule_type
                    )
                if end - value_at < length:
                    break  # wait for the rest; the header is parsed again then
                value = bytes(buf[value_at : value_at + length])
                pos = value_at + length
                out.append(decode_capsule(capsule_type, value, lenient_host_bits=self.lenient_host_bits))
        except CapsuleError as exc:
            self._fail(exc)
        del buf[:pos]
        return out

    def finish(self) -> None:
        """The stream ended (FIN): a capsule cut short is an error."""
        if self._error is not None:
            raise self._error
        self._finished = True
        if self._skip or self._buffer:
            self._fail(CapsuleError("stream ended inside a capsule"))

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete capsule (bounded by ``max_capsule_size`` plus a header)."""
        return len(self._buffer)

    def _fail(self, error: CapsuleError) -> None:
        self._error = error
        self._buffer.clear()
        raise error


# --------------------------------------------------------------------------------------------------------------
# Reference-server compatibility


def merge_per_family(
    previous: AddressAssign | RouteAdvertisement | None, new: AddressAssign | RouteAdvertisement
) -> AddressAssign | RouteAdvertisement:
    """Liberal receive for peers that send IPv4 and IPv6 state in separate capsules (the reference C server).

    The families present in ``new`` replace those in ``previous``; a family absent from ``new`` keeps its entries
    from ``previous``. An empty ``new`` still withdraws everything (RFC semantics). The result lists IPv4 entries
    before IPv6 ones, so merged routes stay in RFC order.
    """
    if previous is None:
        return new
    if type(previous) is not type(new):
        raise TypeError(f"cannot merge {type(previous).__name__} into {type(new).__name__}")
    if isinstance(new, AddressAssign):
        old_items: Iterable = previous.addresses
        new_items: list = new.addresses

        def family(item):
            return item.prefix.version

    elif isinstance(new, RouteAdvertisement):
        old_items = previous.ranges
        new_items = new.ranges

        def family(item):
            return item.version

    else:
        raise TypeError(f"merge_per_family takes AddressAssign or RouteAdvertisement, not {type(new).__name__}")
    if not new_items:
        return new
    present = {family(item) for item in new_items}
    merged = sorted([item for item in old_items if family(item) not in present] + list(new_items), key=family)
    return type(new)(merged)


__all__ = [
    "DEFAULT_MAX_CAPSULE_SIZE",
    "H3_MESSAGE_ERROR",
    "AddressAssign",
    "AddressRequest",
    "AssignedAddress",
    "Capsule",
    "CapsuleError",
    "CapsuleParser",
    "CapsuleType",
    "DatagramCapsule",
    "IpRange",
    "RequestedAddress",
    "RouteAdvertisement",
    "decode_capsule",
    "encode_capsule",
    "encode_raw_capsule",
    "merge_per_family",
]
