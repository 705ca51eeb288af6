"""The flow key the multipath scheduler pins by: a hash of an inner TCP packet's addresses and ports.

Only TCP is pinned (its congestion control and loss detection suffer from reordering); anything else, fragments
and malformed packets get 0 ("no flow": the scheduler may send each packet on any path). The hash is Python's
``hash`` of the key bytes (made positive): fast, and stable for the life of the process, which is all a pin
needs. A segment with FIN or RST gets the negated key: the flow is ending and no longer counts as load.
"""

from __future__ import annotations

TCP = 6
FIN_RST = 0x05
POSITIVE = (1 << 63) - 1


def flow_hash(packet: bytes | bytearray | memoryview) -> int:
    n = len(packet)
    if n < 20:
        return 0
    first = packet[0]
    version = first >> 4
    if version == 4:
        if packet[9] != TCP or (packet[6] & 0x3F) or packet[7]:
            return 0  # not TCP, or a fragment (more-fragments flag or an offset): no ports to hash
        header = (first & 0x0F) * 4
        if header == 20:
            if n < 24:
                return 0
            key = bytes(packet[12:24])  # source, destination, source port, destination port
        else:
            if header < 20 or n < header + 4:
                return 0
            key = bytes(packet[12:20]) + bytes(packet[header:header + 4])
        flags = header + 13
    elif version == 6:
        if n < 44 or packet[6] != TCP:
            return 0  # extension headers are not walked: such packets are not pinned
        key = bytes(packet[8:44])
        flags = 53
    else:
        return 0
    h = (hash(key) & POSITIVE) or 1
    if n > flags and packet[flags] & FIN_RST:
        return -h
    return h


__all__ = ["flow_hash"]
