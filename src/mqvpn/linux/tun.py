"""The TUN device: layer-3 packets in and out of the kernel through one non-blocking file descriptor.

Opened with ``IFF_TUN | IFF_NO_PI`` (bare IP packets, no 4-byte protocol header), so every read is one IPv4 or
IPv6 packet and every write must be one. The kernel never blocks a write to a TUN (the packet goes straight into
the receive path), so only a read can see EAGAIN; it means "drained".

The hot path is ``read_batch`` and ``write``: one syscall per packet (there is no batch syscall for a TUN without
virtio-net headers), nothing else. 1400-byte UDP packets in a network namespace, µs per packet (Linux 6.18,
CPython 3.11): read_batch 1.2-1.4; write 2.0-2.5 when the kernel drops the packet at routing, 2.8-3.1 when it
delivers it to a local socket (the kernel's receive path runs inside the write). os.read with a 64 KiB size is
as fast as a reused buffer (readv + copy: 1.4). See tests/linux/test_tun.py::test_speed (MQVPN_BENCH=1 prints).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from contextlib import nullcontext

from mqvpn.linux.netlink import Netlink

__all__ = ["Tun", "TUN_READ_SIZE", "DEFAULT_TXQUEUELEN"]

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16

TUN_READ_SIZE = 65535  # the largest IP packet: a read never truncates whatever the MTU is
DEFAULT_TXQUEUELEN = 1000

# A write refused for one of these reasons drops that packet (counted); anything else is a bug or a dead device.
# EINVAL: not an IPv4/IPv6 packet; EIO: the interface is down; EAGAIN/ENOBUFS: no room right now.
_DROP_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.EINVAL, errno.EIO, errno.EMSGSIZE})


class Tun:
    """An open TUN interface. Counters are plain ints: ``rx_packets`` (read), ``tx_packets`` (written),
    ``tx_dropped`` (writes refused); ``last_errno`` keeps the errno of the most recent refused write."""

    __slots__ = ("fd", "name", "persist", "rx_packets", "tx_packets", "tx_dropped", "last_errno")

    def __init__(self, fd: int, name: str, *, persist: bool = False) -> None:
        self.fd = fd
        self.name = name
        self.persist = persist
        self.rx_packets = 0
        self.tx_packets = 0
        self.tx_dropped = 0
        self.last_errno = 0

    @classmethod
    def open(
        cls,
        name: str,
        *,
        mtu: int | None = None,
        txqueuelen: int = DEFAULT_TXQUEUELEN,
        persist: bool = False,
        netlink: Netlink | None = None,
    ) -> Tun:
        """Create (or attach to a persistent) TUN ``name``, non-blocking, and bring it up with ``mtu`` and
        ``txqueuelen`` (set through ``netlink``, or a short-lived ``Netlink`` when None).

        ``name`` may hold a ``%d`` (``"mqvpn%d"``): the kernel picks the number; ``.name`` is the real name.
        ``persist``: the interface outlives the descriptor (TUNSETPERSIST); delete it with ``Netlink.del_link``.
        """
        encoded = name.encode()
        if not encoded or len(encoded) >= IFNAMSIZ:
            raise ValueError(f"bad interface name {name!r} (1..{IFNAMSIZ - 1} bytes)")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", encoded, IFF_TUN | IFF_NO_PI)
            ifr = fcntl.ioctl(fd, TUNSETIFF, ifr)
            real = ifr[:IFNAMSIZ].split(b"\0", 1)[0].decode()
            if persist:
                fcntl.ioctl(fd, TUNSETPERSIST, 1)
            tun = cls(fd, real, persist=persist)
            tun.configure(mtu=mtu, txqueuelen=txqueuelen, up=True, netlink=netlink)
        except BaseException:
            os.close(fd)
            raise
        return tun

    def configure(
        self,
        *,
        mtu: int | None = None,
        txqueuelen: int | None = None,
        up: bool | None = None,
        netlink: Netlink | None = None,
    ) -> None:
        """Change the interface (one netlink request). The MTU is the largest IP packet the tunnel carries."""
        with nullcontext(netlink) if netlink is not None else Netlink() as nl:
            nl.set_link(self.name, up=up, mtu=mtu, txqueuelen=txqueuelen)

    def set_mtu(self, mtu: int, netlink: Netlink | None = None) -> None:
        """Follow the tunnel's room (PMTUD found a smaller or larger path)."""
        self.configure(mtu=mtu, netlink=netlink)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Close the descriptor; a non-persistent interface disappears with it (routes and addresses too)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Tun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Tun {self.name} fd={self.fd} rx={self.rx_packets} tx={self.tx_packets} drop={self.tx_dropped}>"

    # --- hot path -----------------------------------------------------------------------------------------------
    def read_batch(self, max_packets: int = 64) -> list[bytes]:
        """The packets waiting, up to ``max_packets``; an empty list when there are none."""
        out: list[bytes] = []
        append = out.append
        read = os.read
        fd = self.fd
        try:
            for _ in range(max_packets):
                append(read(fd, TUN_READ_SIZE))
        except (BlockingIOError, InterruptedError):
            pass
        self.rx_packets += len(out)
        return out

    def write(self, packet: bytes) -> bool:
        """Hand one IP packet to the kernel; False (and counted in ``tx_dropped``) when it refused it."""
        try:
            os.write(self.fd, packet)
        except OSError as exc:
            if exc.errno not in _DROP_ERRNOS:
                raise
            self.last_errno = exc.errno
            self.tx_dropped += 1
            return False
        self.tx_packets += 1
        return True

    def write_batch(self, packets: list[bytes]) -> int:
        """Write each packet in order; returns how many the kernel took."""
        write = os.write
        fd = self.fd
        done = 0
        for packet in packets:
            try:
                write(fd, packet)
            except OSError as exc:
                if exc.errno not in _DROP_ERRNOS:
                    self.tx_packets += done
                    raise
                self.last_errno = exc.errno
                self.tx_dropped += 1
                continue
            done += 1
        self.tx_packets += done
        return done
