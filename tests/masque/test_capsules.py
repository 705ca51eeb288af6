from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqvpn.masque.capsules import (
    H3_MESSAGE_ERROR,
    AddressAssign,
    AddressRequest,
    AssignedAddress,
    CapsuleError,
    CapsuleParser,
    CapsuleType,
    DatagramCapsule,
    IpRange,
    RequestedAddress,
    RouteAdvertisement,
    decode_capsule,
    encode_capsule,
    encode_raw_capsule,
    merge_per_family,
)
from mqvpn.quic.buffer import UINT_VAR_MAX, encode_uint_var

H = bytes.fromhex


def decode_wire(wire: bytes, **kw):
    """Decode one whole capsule from its wire bytes through the stream parser (which also checks FIN)."""
    parser = CapsuleParser(**kw)
    out = parser.feed(wire)
    parser.finish()
    assert len(out) == 1
    return out[0]


def value_error(capsule_type: int, value_hex: str) -> CapsuleError:
    with pytest.raises(CapsuleError) as info:
        decode_capsule(capsule_type, H(value_hex.replace(" ", "")))
    assert info.value.error_code == H3_MESSAGE_ERROR
    assert info.value.capsule_type == capsule_type
    return info.value


# ---------------------------------------------------------------------------------------------------------------
# Byte-exact examples (masque-wire.md §1.5)

V4_ALL = IpRange(IPv4Address("0.0.0.0"), IPv4Address("255.255.255.255"), 0)
V6_ALL = IpRange(IPv6Address("::"), IPv6Address("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), 0)

EXAMPLES = [
    ("01 07 00 04 c0 00 02 0a 20", AddressAssign([AssignedAddress(0, IPv4Network("192.0.2.10/32"))])),
    (
        "01 13 00 06 20010db8000000000000000000000010 80",
        AddressAssign([AssignedAddress(0, IPv6Network("2001:db8::10/128"))]),
    ),
    ("02 07 01 04 00000000 20", AddressRequest([RequestedAddress(1, IPv4Network("0.0.0.0/32"))])),
    ("03 2c 04 00000000 ffffffff 00 06" + "00" * 16 + "ff" * 16 + "00", RouteAdvertisement([V4_ALL, V6_ALL])),
    ("01 00", AddressAssign([])),
    ("03 00", RouteAdvertisement([])),
    ("00 03 00 45 00", DatagramCapsule(H("004500"))),
]


@pytest.mark.parametrize("wire_hex, capsule", EXAMPLES)
def test_examples_round_trip_byte_for_byte(wire_hex, capsule):
    wire = H(wire_hex.replace(" ", ""))
    assert encode_capsule(capsule) == wire
    assert decode_wire(wire) == capsule


def test_range_sizes():
    assert len(encode_capsule(RouteAdvertisement([V4_ALL]))) == 2 + 10
    assert len(encode_capsule(RouteAdvertisement([V6_ALL]))) == 2 + 34
    assert IpRange.from_network("0.0.0.0/0") == V4_ALL
    assert IpRange.from_network(IPv6Network("::/0")) == V6_ALL
    assert IpRange.from_network("10.0.0.0/8", 17) == IpRange(ip_address("10.0.0.0"), ip_address("10.255.255.255"), 17)


def test_reference_server_sequence():
    # What the reference C server sends after its 200: v4 ASSIGN, v6 ASSIGN (/112 with host bits set), v4 and v6
    # ROUTE_ADVERTISEMENT, as four capsules.
    v6_assign = "01 13 00 06 fd000000000000000000000000000002 70"
    stream = H(
        "01 07 00 04 0a000002 20".replace(" ", "")
        + v6_assign.replace(" ", "")
        + "03 0a 04 00000000 ffffffff 00".replace(" ", "")
        + ("03 22 06" + "00" * 16 + "ff" * 16 + "00").replace(" ", "")
    )
    with pytest.raises(CapsuleError, match="host bits"):
        CapsuleParser().feed(stream)
    out = CapsuleParser(lenient_host_bits=True).feed(stream)
    assert [type(c) for c in out] == [AddressAssign, AddressAssign, RouteAdvertisement, RouteAdvertisement]
    assign = merge_per_family(out[0], out[1])
    assert assign == AddressAssign(
        [AssignedAddress(0, IPv4Network("10.0.0.2/32")), AssignedAddress(0, IPv6Network("fd00::2/128"))]
    )
    routes = merge_per_family(out[2], out[3])
    assert routes == RouteAdvertisement([V4_ALL, V6_ALL])
    assert decode_wire(encode_capsule(routes)) == routes  # the merge is itself a valid capsule


# ---------------------------------------------------------------------------------------------------------------
# Strategies

varints = st.integers(0, UINT_VAR_MAX)


@st.composite
def networks(draw, version=None):
    version = draw(st.sampled_from([4, 6])) if version is None else version
    bits = 32 if version == 4 else 128
    plen = draw(st.integers(0, bits))
    addr = draw(st.integers(0, (1 << bits) - 1)) >> (bits - plen) << (bits - plen) if plen else 0
    return (IPv4Network if version == 4 else IPv6Network)((addr, plen))


assigned = st.builds(AssignedAddress, varints, networks())
requested = st.builds(RequestedAddress, st.integers(1, UINT_VAR_MAX), networks())


@st.composite
def address_requests(draw):
    entries = draw(st.lists(requested, min_size=1, max_size=8, unique_by=lambda a: a.request_id))
    return AddressRequest(entries)


@st.composite
def route_advertisements(draw):
    """Random ranges, then the greedy subset that obeys every RFC 9484 rule, in RFC order."""
    candidates = []
    for _ in range(draw(st.integers(0, 12))):
        version = draw(st.sampled_from([4, 6]))
        bits = 32 if version == 4 else 128
        small = draw(st.booleans())  # cluster some ranges so that overlaps actually happen
        top = 1000 if small else (1 << bits) - 1
        a, b = sorted((draw(st.integers(0, top)), draw(st.integers(0, top))))
        proto = draw(st.sampled_from([0, 0, 1, 6, 17, 255]))
        cls = IPv4Address if version == 4 else IPv6Address
        candidates.append(IpRange(cls(a), cls(b), proto))
    candidates.sort(key=lambda r: (r.version, r.protocol, r.start))
    accepted: list[IpRange] = []
    for r in candidates:
        if any(
            x.version == r.version
            and (x.protocol == r.protocol or x.protocol == 0)
            and not (x.end < r.start or r.end < x.start)
            for x in accepted
        ):
            continue
        accepted.append(r)
    return RouteAdvertisement(accepted)


capsules = st.one_of(
    st.builds(DatagramCapsule, st.binary(max_size=200)),
    st.builds(AddressAssign, st.lists(assigned, max_size=8)),
    address_requests(),
    route_advertisements(),
)


@given(capsules)
def test_round_trip(capsule):
    wire = encode_capsule(capsule)
    assert decode_wire(wire) == capsule
    assert encode_capsule(decode_wire(wire)) == wire


@given(st.lists(capsules, max_size=6), st.data())
def test_round_trip_sequence_in_random_chunks(caps, data):
    wire = b"".join(encode_capsule(c) for c in caps)
    parser = CapsuleParser()
    out = []
    pos = 0
    while pos < len(wire):
        n = data.draw(st.integers(1, max(1, len(wire) - pos)))
        out += parser.feed(wire[pos : pos + n])
        pos += n
    parser.finish()
    assert out == caps


# ---------------------------------------------------------------------------------------------------------------
# Validation rules, one by one


def test_ip_version_must_be_4_or_6():
    value_error(1, "00 05 c0000201 20")
    value_error(1, "00 00 c0000201 20")
    value_error(2, "01 07 c0000201 20")
    value_error(3, "05 00000000 ffffffff 00")
    err = value_error(3, "04 00000000 ffffffff 00 08 00000000 ffffffff 00")
    assert "neither 4 nor 6" in err.reason


@pytest.mark.parametrize(
    "capsule",
    [
        AddressAssign(
            [AssignedAddress(7, IPv4Network("192.0.2.0/24")), AssignedAddress(300, IPv6Network("2001:db8::/32"))]
        ),
        AddressRequest(
            [RequestedAddress(1, IPv6Network("::/128")), RequestedAddress(1 << 40, IPv4Network("0.0.0.0/32"))]
        ),
        RouteAdvertisement([V4_ALL, IpRange(ip_address("2001:db8::"), ip_address("2001:db8::ff"), 6)]),
    ],
)
def test_exact_lengths(capsule):
    wire = encode_capsule(capsule)
    value = wire[2:]  # one-byte type and length in every case here
    assert wire[1] == len(value)
    assert decode_capsule(wire[0], value) == capsule
    items = capsule.addresses if hasattr(capsule, "addresses") else capsule.ranges
    boundaries, total = {0}, 0
    for item in items:  # where each entry ends: a cut there is a shorter valid capsule
        total += len(encode_capsule(type(capsule)([item]))) - 2
        boundaries.add(total)
    for cut in set(range(len(value))) - boundaries:
        with pytest.raises(CapsuleError):  # missing bytes
            decode_capsule(wire[0], value[:cut])
    for extra in (b"\x00", b"\x04", b"\x06", b"\x04" + b"\x00" * 5, b"\x01\x04\x00\x00\x00"):
        with pytest.raises(CapsuleError):  # extra bytes
            decode_capsule(wire[0], value + extra)


def test_truncated_request_id_varint():
    value_error(1, "40")  # a two-byte varint with one byte
    value_error(1, "c0 00 00")
    value_error(1, "05")  # request id, then nothing


def test_prefix_length_at_most_address_length():
    assert decode_capsule(1, H("00 04 00000000 00".replace(" ", ""))) == AddressAssign(
        [AssignedAddress(0, IPv4Network("0.0.0.0/0"))]
    )
    value_error(1, "00 04 c0000201 21")
    value_error(2, "01 04 00000000 ff")
    value_error(1, "00 06" + "20010db8" + "00" * 12 + "81")
    value_error(2, "01 06" + "00" * 16 + "81")


def test_host_bits_must_be_zero():
    err = value_error(1, "00 04 c000020a 18")  # 192.0.2.10/24
    assert "host bits" in err.reason
    value_error(2, "01 04 c000020a 18")
    value_error(1, "00 06 20010db8" + "00" * 11 + "01" + "40")  # 2001:db8::1/64
    value_error(1, "00 04 00000001 00")  # 0.0.0.1/0
    # the lenient reading keeps the address as a single-address assignment, ASSIGN only
    lenient = decode_capsule(1, H("0004c000020a18"), lenient_host_bits=True)
    assert lenient == AddressAssign([AssignedAddress(0, IPv4Network("192.0.2.10/32"))])
    with pytest.raises(CapsuleError):
        decode_capsule(2, H("0104c000020a18"), lenient_host_bits=True)


def test_address_request_rules():
    err = value_error(2, "")
    assert "no entries" in err.reason
    value_error(2, "00 04 00000000 20")  # request id 0
    value_error(2, "01 04 00000000 20 02 06" + "00" * 16 + "80 01 04 00000000 20")  # id 1 twice
    ok = decode_capsule(2, H("0104000000002002060000000000000000000000000000000080"))
    assert ok.request_ids == [1, 2]
    with pytest.raises(ValueError):
        encode_capsule(AddressRequest([]))
    with pytest.raises(ValueError):
        encode_capsule(AddressRequest([RequestedAddress(3, IPv4Network("0.0.0.0/32"))] * 2))
    with pytest.raises(ValueError):
        RequestedAddress(0, IPv4Network("0.0.0.0/32"))
    # ASSIGN may carry id 0 several times (unsolicited entries)
    assert len(decode_capsule(1, H("0004000000012000040000000220")).addresses) == 2


def r(start, end, proto=0):
    return IpRange(ip_address(start), ip_address(end), proto)


def route_hex(*ranges):
    return "".join(f"{x.version:02x}{x.start.packed.hex()}{x.end.packed.hex()}{x.protocol:02x}" for x in ranges)


def raw_range(version, start, end, proto):
    """A range as hex without IpRange's own checks (for start > end)."""
    size = 4 if version == 4 else 16
    return f"{version:02x}{start:0{2 * size}x}{end:0{2 * size}x}{proto:02x}"


def test_route_start_not_above_end():
    err = value_error(3, raw_range(4, 10, 9, 0))
    assert "above" in err.reason
    value_error(3, raw_range(6, 1 << 100, 5, 17))
    assert decode_capsule(3, H(raw_range(4, 10, 10, 0))).ranges == [r("0.0.0.10", "0.0.0.10")]
    with pytest.raises(ValueError):
        r("10.0.0.2", "10.0.0.1")
    with pytest.raises(ValueError):
        IpRange(ip_address("10.0.0.1"), ip_address("::1"), 0)  # a range is one family
    with pytest.raises(TypeError):
        IpRange("10.0.0.1", "10.0.0.2", 0)
    with pytest.raises(ValueError):
        r("10.0.0.1", "10.0.0.2", 256)


@pytest.mark.parametrize(
    "ranges",
    [
        [r("::", "::1"), r("10.0.0.0", "10.0.0.1")],  # version(A) > version(B)
        [r("10.0.0.0", "10.0.0.1", 17), r("10.0.1.0", "10.0.1.1", 6)],  # same version, proto(A) > proto(B)
        [r("10.0.0.5", "10.0.0.9"), r("10.0.0.0", "10.0.0.1")],  # same version and proto, B before A
        [r("10.0.0.0", "10.0.0.9"), r("10.0.0.9", "10.0.0.20")],  # touching: End(A) == Start(B)
        [r("10.0.0.0", "10.0.0.9"), r("10.0.0.5", "10.0.0.20")],  # overlapping
        [r("10.0.0.0", "10.0.0.9", 6), r("10.0.0.0", "10.0.0.9", 6)],  # duplicate
        [r("10.0.0.0", "10.0.0.255"), r("10.0.0.7", "10.0.0.7", 17)],  # proto-0 overlaps proto-17
        [r("10.0.0.0", "10.0.0.9"), r("10.0.1.0", "10.0.1.9"), r("10.0.1.9", "10.0.2.0", 6)],  # edge overlap
        [r("::", "::ff"), r("::1:0", "::2:0"), r("::80", "::1:0", 1)],  # v6, overlaps the second proto-0 range
        [r("0.0.0.0", "255.255.255.255"), r("::", "::"), r("1.2.3.4", "1.2.3.4", 6)],  # v4 after v6
    ],
)
def test_route_ordering_violations(ranges):
    wire_value = route_hex(*ranges)
    with pytest.raises(CapsuleError):
        decode_capsule(3, H(wire_value))
    with pytest.raises(ValueError):
        encode_capsule(RouteAdvertisement(ranges))


@pytest.mark.parametrize(
    "ranges",
    [
        [r("10.0.0.0", "10.0.0.8"), r("10.0.0.9", "10.0.0.20")],  # End(A) + 1 == Start(B): fine
        [r("10.0.0.0", "10.0.0.9", 6), r("10.0.0.0", "10.0.0.9", 17)],  # same addresses, different protocols
        [r("10.0.0.0", "10.0.0.9"), r("10.0.0.10", "10.0.0.20", 6)],  # proto-0 and proto-6 side by side
        [r("10.0.0.0", "10.0.0.9"), r("::a00:0", "::a00:9", 6)],  # "overlap" across families is none
        [r("10.0.0.0", "10.0.0.0"), r("::", "::")],
        [r("10.0.0.0", "10.0.0.9", 6), r("10.0.0.20", "10.0.0.30", 6), r("10.0.0.0", "10.0.0.5", 17)],
    ],
)
def test_route_ordering_accepted(ranges):
    cap = RouteAdvertisement(ranges)
    assert decode_capsule(3, H(route_hex(*ranges))) == cap
    assert decode_wire(encode_capsule(cap)) == cap


@given(
    st.lists(st.tuples(st.sampled_from([4, 6]), st.integers(0, 40), st.integers(0, 40), st.sampled_from([0, 6, 17])))
)
def test_route_validation_matches_brute_force(raw):
    """decode accepts exactly the lists a direct reading of RFC 9484 §4.7.3 accepts."""
    value = "".join(raw_range(v, a, b, p) for v, a, b, p in raw)

    def valid():
        if any(a > b for _, a, b, _ in raw):
            return False
        for i, (va, sa, ea, pa) in enumerate(raw):
            for vb, sb, eb, pb in raw[i + 1 :]:
                if va > vb or (va == vb and pa > pb) or (va == vb and pa == pb and not ea < sb):
                    return False
        for va, sa, ea, pa in raw:
            for vb, sb, eb, pb in raw:
                if va == vb and pa == 0 and pb != 0 and not (ea < sb or eb < sa):
                    return False
        return True

    if valid():
        assert len(decode_capsule(3, H(value)).ranges) == len(raw)
    else:
        with pytest.raises(CapsuleError):
            decode_capsule(3, H(value))


def test_encode_rejects_non_capsules():
    with pytest.raises(TypeError):
        encode_capsule(b"\x00")
    with pytest.raises(ValueError):
        AssignedAddress(-1, IPv4Network("10.0.0.0/8"))
    with pytest.raises(TypeError):
        AssignedAddress(0, "10.0.0.0/8")
    with pytest.raises(TypeError):
        AssignedAddress("0", IPv4Network("10.0.0.0/8"))


# ---------------------------------------------------------------------------------------------------------------
# Stream parser


SEQUENCE = [
    AddressAssign([AssignedAddress(0, IPv4Network("10.0.0.2/32"))]),
    DatagramCapsule(H("00") + bytes(range(200))),  # two-byte length varint
    RouteAdvertisement([V4_ALL, V6_ALL]),
    DatagramCapsule(b""),
    AddressRequest([RequestedAddress(9, IPv6Network("::/64"))]),
]


def sequence_wire():
    parts = [encode_capsule(c) for c in SEQUENCE]
    unknown = [
        encode_raw_capsule(0x2B, b"x" * 70),  # unknown, two-byte length
        encode_raw_capsule(0x1234567, b""),  # unknown, four-byte type, empty
        encode_raw_capsule(0x04, b"\xff" * 3),  # the next codepoint, still unknown here
    ]
    return parts[0] + unknown[0] + parts[1] + unknown[1] + parts[2] + parts[3] + unknown[2] + parts[4]


def test_unknown_types_skipped_silently():
    parser = CapsuleParser()
    assert parser.feed(sequence_wire()) == SEQUENCE
    parser.finish()
    assert parser.skipped == 3
    assert parser.buffered == 0
    assert decode_capsule(0x2B, b"whatever") is None


def test_split_at_every_byte():
    wire = sequence_wire()
    for cut in range(len(wire) + 1):
        parser = CapsuleParser()
        out = parser.feed(wire[:cut]) + parser.feed(wire[cut:])
        parser.finish()
        assert out == SEQUENCE, cut
    for cut1 in range(0, len(wire), 7):
        for cut2 in range(cut1, len(wire), 11):
            parser = CapsuleParser()
            out = parser.feed(wire[:cut1]) + parser.feed(wire[cut1:cut2]) + parser.feed(wire[cut2:])
            assert out == SEQUENCE


def test_one_byte_at_a_time():
    wire = sequence_wire()
    parser = CapsuleParser()
    out = []
    for i in range(len(wire)):
        out += parser.feed(memoryview(wire)[i : i + 1])
        assert parser.buffered <= 2 + 8 + 211
    parser.finish()
    assert out == SEQUENCE


@pytest.mark.parametrize(
    "tail",
    [
        "01",  # half a header (type only)
        "00 40",  # type and half a length varint
        "00 05 00 45",  # a value cut short
        "2b 05 00",  # an unknown capsule cut short
    ],
)
def test_truncated_at_fin(tail):
    parser = CapsuleParser()
    parser.feed(encode_capsule(SEQUENCE[0]) + H(tail.replace(" ", "")))
    with pytest.raises(CapsuleError, match="ended inside"):
        parser.finish()
    with pytest.raises(CapsuleError):  # the error sticks
        parser.feed(b"")


def test_empty_stream_and_data_after_fin():
    parser = CapsuleParser()
    assert parser.feed(b"") == []
    parser.finish()
    with pytest.raises(CapsuleError, match="after the end"):
        parser.feed(b"\x00\x00")


def test_max_capsule_size():
    parser = CapsuleParser(max_capsule_size=100)
    assert parser.feed(encode_capsule(DatagramCapsule(b"a" * 100))) == [DatagramCapsule(b"a" * 100)]
    # the header alone is enough to refuse: nothing of the value needs to arrive
    with pytest.raises(CapsuleError, match="exceeds"):
        parser.feed(b"\x00" + encode_uint_var(101))
    with pytest.raises(CapsuleError):
        parser.feed(b"")
    # default 64 KiB
    parser = CapsuleParser()
    with pytest.raises(CapsuleError):
        parser.feed(b"\x01" + encode_uint_var(64 * 1024 + 1))
    with pytest.raises(CapsuleError):
        CapsuleParser().feed(b"\x00" + encode_uint_var(UINT_VAR_MAX))


def test_huge_unknown_capsule_is_streamed_not_buffered():
    parser = CapsuleParser(max_capsule_size=100)
    size = 10 * 1024 * 1024
    assert parser.feed(encode_uint_var(0x2B) + encode_uint_var(size)) == []
    chunk = b"z" * 65536
    for _ in range(size // len(chunk)):
        assert parser.feed(chunk) == []
        assert parser.buffered == 0
    assert parser.feed(encode_capsule(SEQUENCE[0])) == [SEQUENCE[0]]
    parser.finish()


def test_invalid_capsule_in_stream_fails_the_parser():
    parser = CapsuleParser()
    with pytest.raises(CapsuleError) as info:
        parser.feed(encode_capsule(SEQUENCE[0]) + H("0200"))  # empty ADDRESS_REQUEST
    assert info.value.capsule_type == CapsuleType.ADDRESS_REQUEST
    with pytest.raises(CapsuleError):
        parser.finish()


@settings(max_examples=500)
@given(st.binary(max_size=300), st.data())
def test_fuzz_arbitrary_bytes_only_capsule_error(blob, data):
    parser = CapsuleParser(
        max_capsule_size=data.draw(st.sampled_from([0, 16, 1000, 65536])), lenient_host_bits=data.draw(st.booleans())
    )
    try:
        pos = 0
        while pos < len(blob):
            n = data.draw(st.integers(1, len(blob) - pos))
            for c in parser.feed(blob[pos : pos + n]):
                assert decode_wire(encode_capsule(c)) == c  # whatever we accept, we can send back
            pos += n
        parser.finish()
    except CapsuleError as exc:
        assert exc.error_code == H3_MESSAGE_ERROR


@settings(max_examples=500)
@given(st.sampled_from([0, 1, 2, 3]), st.binary(max_size=120), st.booleans())
def test_fuzz_known_types_only_capsule_error(capsule_type, value, lenient):
    try:
        capsule = decode_capsule(capsule_type, value, lenient_host_bits=lenient)
    except CapsuleError:
        return
    assert decode_wire(encode_capsule(capsule)) == capsule


@settings(max_examples=300)
@given(
    st.lists(st.tuples(st.sampled_from([1, 2, 3]), st.lists(st.sampled_from([0, 4, 6, 0x20, 0x80, 0xFF]), max_size=40)))
)
def test_fuzz_structured_values(items):
    """Values built from the bytes that matter (version, prefix lengths) hit the validation paths harder."""
    wire = b"".join(encode_raw_capsule(t, bytes(v)) for t, v in items)
    parser = CapsuleParser()
    try:
        parser.feed(wire)
        parser.finish()
    except CapsuleError:
        pass


# ---------------------------------------------------------------------------------------------------------------
# merge_per_family


def test_merge_per_family_addresses():
    v4 = AddressAssign([AssignedAddress(0, IPv4Network("10.0.0.2/32"))])
    v6 = AddressAssign([AssignedAddress(0, IPv6Network("fd00::2/128"))])
    v4b = AddressAssign([AssignedAddress(0, IPv4Network("10.0.0.3/32"))])
    both = merge_per_family(v4, v6)
    assert both.addresses == v4.addresses + v6.addresses
    assert merge_per_family(v6, v4) == both  # IPv4 first regardless of arrival order
    assert merge_per_family(both, v4b).addresses == v4b.addresses + v6.addresses  # v4 replaced, v6 kept
    assert merge_per_family(both, AddressAssign([])) == AddressAssign([])  # empty withdraws all
    assert merge_per_family(None, v4) is v4
    dual = AddressAssign(v4b.addresses + v6.addresses)
    assert merge_per_family(v4, dual) == dual


def test_merge_per_family_routes():
    v4 = RouteAdvertisement([V4_ALL])
    v6 = RouteAdvertisement([V6_ALL])
    v4_split = RouteAdvertisement([r("0.0.0.0", "127.255.255.255"), r("128.0.0.0", "255.255.255.255")])
    assert merge_per_family(v4, v6) == RouteAdvertisement([V4_ALL, V6_ALL])
    assert merge_per_family(v6, v4) == RouteAdvertisement([V4_ALL, V6_ALL])
    merged = merge_per_family(merge_per_family(v4, v6), v4_split)
    assert merged == RouteAdvertisement(v4_split.ranges + [V6_ALL])
    assert decode_wire(encode_capsule(merged)) == merged
    with pytest.raises(TypeError):
        merge_per_family(v4, AddressAssign([]))


@given(route_advertisements(), route_advertisements())
def test_merge_routes_always_valid(a, b):
    merged = merge_per_family(a, b)
    assert decode_wire(encode_capsule(merged)) == merged
    if b.ranges:
        for version in {x.version for x in b.ranges}:
            assert [x for x in merged.ranges if x.version == version] == [x for x in b.ranges if x.version == version]
