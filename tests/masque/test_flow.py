"""The flow key of inner packets (masque/flow.py): TCP only, per 5-tuple, 0 for everything else."""

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from mqvpn.masque.flow import flow_hash


TCP_REST = bytes(8) + b"\x50\x10" + bytes(6)  # seq, ack, data offset, flags (ACK), window, checksum, urgent


def v4(proto=6, src="10.0.0.2", dst="10.0.0.1", sport=1000, dport=80, options=b"", frag=0, payload=b"x" * 20):
    ihl = 5 + len(options) // 4
    total = ihl * 4 + 20 + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, frag, 64, proto, 0,
                         ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + options
    return header + struct.pack("!HH", sport, dport) + TCP_REST + payload


def v6(nh=6, src="fd00::2", dst="fd00::1", sport=1000, dport=80):
    return (struct.pack("!IHBB", 0x60000000, 40, nh, 64) + ipaddress.ip_address(src).packed
            + ipaddress.ip_address(dst).packed + struct.pack("!HH", sport, dport) + TCP_REST + b"x" * 20)


def test_tcp_flows_get_a_stable_nonzero_key_per_5_tuple():
    a = flow_hash(v4())
    assert a != 0 and a == flow_hash(v4(payload=b"other payload"))
    assert flow_hash(v4(sport=1001)) != a
    assert flow_hash(v4(dst="10.0.0.9")) != a
    assert flow_hash(v4(options=b"\x01\x01\x01\x01")) == a  # options do not move the ports
    b = flow_hash(v6())
    assert b != 0 and b == flow_hash(v6()) and flow_hash(v6(dport=81)) != b


def test_non_tcp_fragments_and_junk_are_unpinned():
    assert flow_hash(v4(proto=17)) == 0 and flow_hash(v4(proto=1)) == 0
    assert flow_hash(v4(frag=0x2000)) == 0 and flow_hash(v4(frag=5)) == 0  # MF, offset
    assert flow_hash(v6(nh=17)) == 0 and flow_hash(v6(nh=0)) == 0  # UDP, hop-by-hop header first
    assert flow_hash(b"") == 0 and flow_hash(b"\x45" * 10) == 0 and flow_hash(v4()[:22]) == 0
    assert flow_hash(b"\x00" * 60) == 0


@given(st.binary(max_size=80))
def test_never_raises(data):
    assert isinstance(flow_hash(data), int)
    assert isinstance(flow_hash(memoryview(data)), int)


def test_fin_and_rst_give_the_negated_key():
    def with_flags(packet, flags, header=20):
        b = bytearray(packet)
        b[header + 13] = flags
        return bytes(b)

    key = flow_hash(v4())
    assert key > 0
    assert flow_hash(with_flags(v4(), 0x11)) == -key  # FIN+ACK
    assert flow_hash(with_flags(v4(), 0x04)) == -key  # RST
    assert flow_hash(with_flags(v4(), 0x10)) == key  # a plain ACK
    assert flow_hash(with_flags(v6(), 0x01, header=40)) == -flow_hash(v6())
