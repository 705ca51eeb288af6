import ipaddress

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.packet import (
    QuicPreferredAddress,
    QuicTransportParameters,
    pull_quic_transport_parameters,
    push_quic_transport_parameters,
)
from hypothesis import given, strategies as st

from mqvpn.quic.buffer import encode_uint_var
from mqvpn.quic.errors import QuicErrorCode, QuicProtocolError
from mqvpn.quic.tparams import (
    PreferredAddress,
    TransportParameters,
    decode_transport_parameters,
    encode_transport_parameters,
)

KNOWN_IDS = {*range(0x11), 0x20, 0x3E, 0x2AB2}
TOKEN = bytes(range(16))


def tp(param_id: int, value: bytes) -> bytes:
    return encode_uint_var(param_id) + encode_uint_var(len(value)) + value


def var(n: int) -> bytes:
    return encode_uint_var(n)


def H(s: str) -> bytes:
    return bytes.fromhex(s)


def rejected(data: bytes, sent_by_server: bool = True) -> None:
    with pytest.raises(QuicProtocolError) as info:
        decode_transport_parameters(data, sent_by_server=sent_by_server)
    assert info.value.error_code == QuicErrorCode.TRANSPORT_PARAMETER_ERROR


def preferred_address_bytes(cid: bytes = b"\x01" * 8, token: bytes = TOKEN) -> bytes:
    return bytes((10, 0, 0, 1)) + (443).to_bytes(2, "big") + bytes(18) + bytes((len(cid),)) + cid + token


# --- Basics --------------------------------------------------------------------------------------------------------

def test_empty_is_defaults():
    assert decode_transport_parameters(b"", sent_by_server=False) == TransportParameters()
    assert encode_transport_parameters(TransportParameters()) == b""


def test_encoding_is_in_id_order_and_skips_defaults():
    params = TransportParameters(
        grease_quic_bit=True, initial_max_data=1000, max_idle_timeout=30_000, initial_source_connection_id=b"",
        max_datagram_frame_size=0, ack_delay_exponent=3, disable_active_migration=True, initial_max_path_id=4,
    )
    assert encode_transport_parameters(params) == b"".join((
        tp(0x01, var(30_000)), tp(0x04, var(1000)), tp(0x0C, b""), tp(0x0F, b""), tp(0x20, var(0)),
        tp(0x3E, var(4)), tp(0x2AB2, b""),
    ))


def test_decode_all_kinds():
    data = b"".join((
        tp(0x00, b"odcid"), tp(0x02, TOKEN), tp(0x03, var(1500)), tp(0x0B, H("4005")), tp(0x0C, b""),
        tp(0x0D, preferred_address_bytes()), tp(0x0F, b"iscid"), tp(0x10, b"rscid"), tp(27, b"grease"),
        tp(0x2AB2, b""),
    ))
    params = decode_transport_parameters(data, sent_by_server=True)
    assert params.original_destination_connection_id == b"odcid"
    assert params.stateless_reset_token == TOKEN
    assert params.max_udp_payload_size == 1500
    assert params.max_ack_delay == 5  # non-minimal varint encoding is fine
    assert params.disable_active_migration and params.grease_quic_bit
    assert params.preferred_address == PreferredAddress(("10.0.0.1", 443), None, b"\x01" * 8, TOKEN)
    assert (params.initial_source_connection_id, params.retry_source_connection_id) == (b"iscid", b"rscid")
    assert params.unknown == [(27, b"grease")]


def test_unknown_and_reserved_ids_are_skipped():
    reserved = [31 * n + 27 for n in (0, 1, 1000, 2**40)]
    data = b"".join(tp(i, b"x" * (i % 7)) for i in reserved) + tp(0x11, b"\x00\x00\x00\x01") + tp(0x04, var(9))
    params = decode_transport_parameters(data, sent_by_server=False)
    assert params.initial_max_data == 9
    assert params.unknown == [(i, b"x" * (i % 7)) for i in reserved] + [(0x11, b"\x00\x00\x00\x01")]


# --- Validation ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"\x40",  # truncated id
    b"\x04",  # missing length
    b"\x04\x02\x01",  # value beyond the end
    tp(0x04, b"\x40"),  # truncated varint value
    tp(0x04, b""),  # empty integer value
    tp(0x04, b"\x01\x00"),  # overlong integer value
    tp(0x0C, b"\x00"),  # flag with a value
    tp(0x2AB2, b"\x01"),
])
def test_malformed_values(data):
    rejected(data)


def test_duplicates():
    rejected(tp(0x04, var(1)) + tp(0x04, var(1)))
    rejected(tp(0x04, var(1)) + tp(0x05, var(1)) + tp(0x04, var(2)))
    rejected(tp(27, b"") + tp(27, b""))  # unknown ids too


@pytest.mark.parametrize("name,param_id,bad,good", [
    ("max_udp_payload_size", 0x03, 1199, 1200),
    ("ack_delay_exponent", 0x0A, 21, 20),
    ("max_ack_delay", 0x0B, 2**14, 2**14 - 1),
    ("active_connection_id_limit", 0x0E, 1, 2),
    ("active_connection_id_limit", 0x0E, 0, 2**62 - 1),
    ("initial_max_streams_bidi", 0x08, 2**60 + 1, 2**60),
    ("initial_max_streams_uni", 0x09, 2**60 + 1, 2**60),
    ("initial_max_path_id", 0x3E, 2**32, 2**32 - 1),
])
def test_integer_limits(name, param_id, bad, good):
    rejected(tp(param_id, var(bad)))
    assert getattr(decode_transport_parameters(tp(param_id, var(good)), sent_by_server=True), name) == good


@pytest.mark.parametrize("param_id,value", [
    (0x00, b"odcid"), (0x02, TOKEN), (0x0D, preferred_address_bytes()), (0x10, b"rscid"),
])
def test_server_only_parameters(param_id, value):
    rejected(tp(param_id, value), sent_by_server=False)
    decode_transport_parameters(tp(param_id, value), sent_by_server=True)


@pytest.mark.parametrize("length", [0, 15, 17])
def test_stateless_reset_token_length(length):
    rejected(tp(0x02, bytes(length)))


@pytest.mark.parametrize("param_id", [0x00, 0x0F, 0x10])
def test_connection_id_length(param_id):
    rejected(tp(param_id, b"c" * 21))
    decode_transport_parameters(tp(param_id, b"c" * 20), sent_by_server=True)
    decode_transport_parameters(tp(param_id, b""), sent_by_server=True)


def test_preferred_address_validation():
    rejected(tp(0x0D, preferred_address_bytes(cid=b"")))
    rejected(tp(0x0D, preferred_address_bytes(cid=b"c" * 21)))
    rejected(tp(0x0D, preferred_address_bytes()[:-1]))
    rejected(tp(0x0D, preferred_address_bytes() + b"\x00"))
    rejected(tp(0x0D, preferred_address_bytes()[:24]))


def test_preferred_address_families():
    addr = PreferredAddress(None, ("2001:db8::1", 8443), b"cid", TOKEN)
    data = encode_transport_parameters(TransportParameters(preferred_address=addr))
    assert decode_transport_parameters(data, sent_by_server=True).preferred_address == addr


# --- Property tests ------------------------------------------------------------------------------------------------

varints = st.integers(0, 2**62 - 1)
cid_values = st.binary(max_size=20)
ports = st.integers(0, 65535)
ipv4s = st.tuples(st.integers(1, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n))), ports)
ipv6s = st.tuples(st.integers(1, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))), ports)
preferred_addresses = st.builds(
    PreferredAddress, st.none() | ipv4s, st.none() | ipv6s, st.binary(min_size=1, max_size=20),
    st.binary(min_size=16, max_size=16),
)
unknown_params = st.lists(
    st.tuples(varints.filter(lambda i: i not in KNOWN_IDS), st.binary(max_size=30)),
    max_size=4, unique_by=lambda entry: entry[0],
).map(lambda entries: sorted(entries))

all_params = st.builds(
    TransportParameters,
    original_destination_connection_id=st.none() | cid_values,
    max_idle_timeout=varints,
    stateless_reset_token=st.none() | st.binary(min_size=16, max_size=16),
    max_udp_payload_size=st.integers(1200, 2**62 - 1),
    initial_max_data=varints,
    initial_max_stream_data_bidi_local=varints,
    initial_max_stream_data_bidi_remote=varints,
    initial_max_stream_data_uni=varints,
    initial_max_streams_bidi=st.integers(0, 2**60),
    initial_max_streams_uni=st.integers(0, 2**60),
    ack_delay_exponent=st.integers(0, 20),
    max_ack_delay=st.integers(0, 2**14 - 1),
    disable_active_migration=st.booleans(),
    preferred_address=st.none() | preferred_addresses,
    active_connection_id_limit=st.integers(2, 2**62 - 1),
    initial_source_connection_id=st.none() | cid_values,
    retry_source_connection_id=st.none() | cid_values,
    max_datagram_frame_size=st.none() | varints,
    initial_max_path_id=st.none() | st.integers(0, 2**32 - 1),
    grease_quic_bit=st.booleans(),
    unknown=unknown_params,
)


@given(all_params)
def test_round_trip(params):
    assert decode_transport_parameters(encode_transport_parameters(params), sent_by_server=True) == params


@given(all_params)
def test_round_trip_client(params):
    params.original_destination_connection_id = params.stateless_reset_token = None
    params.preferred_address = params.retry_source_connection_id = None
    assert decode_transport_parameters(encode_transport_parameters(params), sent_by_server=False) == params


@given(st.binary(max_size=200), st.booleans())
def test_fuzz(data, sent_by_server):
    try:
        params = decode_transport_parameters(data, sent_by_server=sent_by_server)
    except QuicProtocolError as exc:
        assert exc.error_code == QuicErrorCode.TRANSPORT_PARAMETER_ERROR
        return
    assert isinstance(params, TransportParameters)


@given(st.lists(st.tuples(st.sampled_from(sorted(KNOWN_IDS) + [27]), st.binary(max_size=45)), max_size=6),
       st.booleans())
def test_fuzz_known_ids(entries, sent_by_server):
    data = b"".join(tp(i, v) for i, v in entries)
    try:
        decode_transport_parameters(data, sent_by_server=sent_by_server)
    except QuicProtocolError as exc:
        assert exc.error_code == QuicErrorCode.TRANSPORT_PARAMETER_ERROR


# --- Interop with aioquic as an independent encoder/decoder ------------------------------------------------------

def aioquic_encode(params: QuicTransportParameters) -> bytes:
    buf = Buffer(capacity=4096)
    push_quic_transport_parameters(buf, params)
    return buf.data


def test_decode_aioquic_client_hello_parameters():
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    client = QuicConnection(configuration=QuicConfiguration(is_client=True, max_datagram_frame_size=65536))
    client.connect(("127.0.0.1", 4433), now=0.0)
    blob = client._serialize_transport_parameters()  # the extension aioquic puts in its ClientHello
    theirs = pull_quic_transport_parameters(Buffer(data=blob))
    ours = decode_transport_parameters(blob, sent_by_server=False)
    for name in (
        "max_idle_timeout", "initial_max_data", "initial_max_stream_data_bidi_local",
        "initial_max_stream_data_bidi_remote", "initial_max_stream_data_uni", "initial_max_streams_bidi",
        "initial_max_streams_uni", "ack_delay_exponent", "max_ack_delay", "active_connection_id_limit",
        "initial_source_connection_id", "max_datagram_frame_size",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.initial_source_connection_id and ours.max_datagram_frame_size == 65536
    assert [i for i, _ in ours.unknown] == [0x11]  # version_information (RFC 9368) is not ours to interpret


def test_decode_aioquic_server_parameters():
    theirs = QuicTransportParameters(
        original_destination_connection_id=b"\x83\x94\xc8\xf0>QW\x08", max_idle_timeout=10_000,
        stateless_reset_token=TOKEN, max_udp_payload_size=1452, initial_max_data=1 << 20,
        initial_max_stream_data_bidi_local=1 << 18, initial_max_stream_data_bidi_remote=1 << 17,
        initial_max_stream_data_uni=1 << 16, initial_max_streams_bidi=100, initial_max_streams_uni=3,
        ack_delay_exponent=10, max_ack_delay=50, disable_active_migration=True,
        preferred_address=QuicPreferredAddress(("192.0.2.1", 4433), ("2001:db8::2", 4434), b"pref-cid", TOKEN),
        active_connection_id_limit=4, initial_source_connection_id=b"server-cid",
        retry_source_connection_id=b"retry-cid", max_datagram_frame_size=1200,
    )
    ours = decode_transport_parameters(aioquic_encode(theirs), sent_by_server=True)
    assert ours.preferred_address == PreferredAddress(("192.0.2.1", 4433), ("2001:db8::2", 4434), b"pref-cid", TOKEN)
    for name in (
        "original_destination_connection_id", "max_idle_timeout", "stateless_reset_token", "max_udp_payload_size",
        "initial_max_data", "initial_max_stream_data_bidi_local", "initial_max_stream_data_bidi_remote",
        "initial_max_stream_data_uni", "initial_max_streams_bidi", "initial_max_streams_uni", "ack_delay_exponent",
        "max_ack_delay", "disable_active_migration", "active_connection_id_limit", "initial_source_connection_id",
        "retry_source_connection_id", "max_datagram_frame_size",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name


@given(all_params)
def test_aioquic_decodes_ours(params):
    params.unknown = []
    theirs = pull_quic_transport_parameters(Buffer(data=encode_transport_parameters(params)))
    defaults = TransportParameters()
    for name in (
        "original_destination_connection_id", "max_idle_timeout", "stateless_reset_token", "max_udp_payload_size",
        "initial_max_data", "initial_max_stream_data_bidi_local", "initial_max_stream_data_bidi_remote",
        "initial_max_stream_data_uni", "initial_max_streams_bidi", "initial_max_streams_uni", "ack_delay_exponent",
        "max_ack_delay", "disable_active_migration", "active_connection_id_limit", "initial_source_connection_id",
        "retry_source_connection_id", "max_datagram_frame_size",
    ):
        value = getattr(theirs, name)  # aioquic: None when absent
        assert (getattr(defaults, name) if value is None else value) == getattr(params, name), name
    if params.preferred_address is None:
        assert theirs.preferred_address is None
    else:
        assert theirs.preferred_address.connection_id == params.preferred_address.connection_id
        assert theirs.preferred_address.ipv4_address == params.preferred_address.ipv4
        assert theirs.preferred_address.ipv6_address == params.preferred_address.ipv6
