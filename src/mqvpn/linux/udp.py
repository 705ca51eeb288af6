"""Fast UDP socket I/O for Linux: socket setup, GSO batch send, GRO batch receive.

QUIC sends many equal-size datagrams to one peer in a burst; Linux can take such a run in one ``sendmsg`` call
(UDP_SEGMENT, "GSO") and hand a run of received segments up in one ``recvmsg`` call (UDP_GRO). From Python the
per-datagram syscall dominates, so both offloads pay. Loopback, 1300-byte datagrams, runs of 64, µs per datagram
(Linux 6.18, CPython 3.11): send_batch 0.39 with GSO vs 3.5 plain; recv_batch 0.35 with GRO vs 1.9 plain.

Nothing here blocks or raises on the data path: a datagram the kernel will not take is dropped and counted, and
QUIC's loss recovery resends what mattered.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys

__all__ = ["open_udp_socket", "UdpBatchSocket", "GSO_MAX_SEGMENTS", "GSO_MAX_BYTES", "RECV_BUFFER_SIZE"]

# Linux constants (not all of them are exported by the Python 3.11 socket module).
SOL_UDP = 17
UDP_SEGMENT = 103  # cmsg / sockopt: GSO segment size (u16)
UDP_GRO = 104  # sockopt: enable GRO; cmsg on receive: segment size (int)
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
IP_MTU_DISCOVER = 10
IP_PMTUDISC_PROBE = 3
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_PROBE = 3
IPV6_DONTFRAG = 62

# Tunables. The kernel accepts up to UDP_MAX_SEGMENTS (64 on older kernels, 128 since 6.x) segments and an IP
# datagram of at most 64 KiB per GSO send; stay under both on every kernel.
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
RECV_BUFFER_SIZE = 65535  # one UDP payload, or one GRO super-buffer, always fits

_log = logging.getLogger(__name__)

_DROP_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS})  # the queue is full: drop the rest of this batch
_GSO_OFF_ERRNOS = frozenset({errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT})
_GSO_CMSG_CACHE: dict[int, list] = {}


def _gso_cmsg(segment_size: int) -> list:
    """The ancillary data for one GSO send; cached per size (QUIC uses a handful of sizes)."""
    cmsg = _GSO_CMSG_CACHE.get(segment_size)
    if cmsg is None:
        cmsg = [(SOL_UDP, UDP_SEGMENT, segment_size.to_bytes(2, sys.byteorder))]
        if len(_GSO_CMSG_CACHE) < 4096:
            _GSO_CMSG_CACHE[segment_size] = cmsg
    return cmsg


def _set_buffer(sock: socket.socket, force_opt: int, opt: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)  # root (CAP_NET_ADMIN): ignores net.core.*mem_max
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)  # capped by net.core.rmem_max / wmem_max


def open_udp_socket(
    local_addr: tuple,
    *,
    family: int | None = None,
    reuse_port: bool = False,
    bind_device: str | None = None,
    rcvbuf: int = 4 << 20,
    sndbuf: int = 4 << 20,
    dual_stack: bool = False,
) -> socket.socket:
    """A bound, non-blocking UDP socket set up for QUIC.

    - ``family``: taken from ``local_addr``'s host when None (``""`` means IPv4 any).
    - IPv6 sockets are IPv6-only unless ``dual_stack`` (then IPv4 peers appear as ``::ffff:a.b.c.d``).
    - Buffers: SO_RCVBUFFORCE/SO_SNDBUFFORCE when privileged, else SO_RCVBUF/SO_SNDBUF (capped by sysctl).
    - ``bind_device``: SO_BINDTODEVICE (policy routing per path; needs CAP_NET_RAW on older kernels).
    - Fragmentation: QUIC datagrams must never be fragmented (RFC 9000 §14) and QUIC finds the path MTU itself
      (DPLPMTUD, RFC 8899). IPv4: IP_MTU_DISCOVER = IP_PMTUDISC_PROBE sets DF on every packet but ignores the
      kernel's cached path MTU, so a probe larger than a learned (possibly spoofed) ICMP MTU still leaves; only
      the device MTU limits a send (EMSGSIZE). IPv6: IPV6_MTU_DISCOVER = IPV6_PMTUDISC_PROBE likewise, plus
      IPV6_DONTFRAG so the kernel never fragments at the source.
    """
    host = local_addr[0]
    if family is None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if host and ":" not in host and not _is_ipv4_literal(host):
            family = socket.getaddrinfo(host, local_addr[1], type=socket.SOCK_DGRAM)[0][0]
    sock = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setblocking(False)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if bind_device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, bind_device.encode())
        if rcvbuf:
            _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, 1)
            if dual_stack:
                _try_setsockopt(sock, socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)  # v4-mapped traffic
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
        if family == socket.AF_INET6 and not host:
            local_addr = ("::", *local_addr[1:])
        sock.bind(local_addr)
    except BaseException:
        sock.close()
        raise
    return sock


def _is_ipv4_literal(host: str) -> bool:
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def _try_setsockopt(sock: socket.socket, level: int, opt: int, value: int) -> bool:
    try:
        sock.setsockopt(level, opt, value)
    except OSError:
        return False
    return True


class UdpBatchSocket:
    """One UDP socket with batched, never-blocking, never-raising send and receive.

    ``gso`` / ``gro`` False force the plain path. Detection happens here: GSO when the kernel knows UDP_SEGMENT
    (it can still fail per route, e.g. EIO on a device without checksum offload: then it is turned off for good),
    GRO when UDP_GRO can be enabled.

    Counters (plain ints): ``sent``, ``send_drops`` (datagrams the kernel refused: full buffer, unreachable,
    too big ...), ``received``, ``gso_batches`` (sendmsg calls carrying >1 segment), ``gro_batches`` (recvmsg
    calls that returned >1 segment). ``last_send_errno`` keeps the errno of the most recent refused send.
    """

    __slots__ = (
        "sock",
        "family",
        "gso_enabled",
        "gro_enabled",
        "sent",
        "send_drops",
        "received",
        "gso_batches",
        "gro_batches",
        "last_send_errno",
        "_buf",
        "_view",
    )

    def __init__(self, sock: socket.socket, *, gso: bool = True, gro: bool = True) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.family = sock.family
        self.gso_enabled = gso and _gso_supported(sock)
        self.gro_enabled = gro and _try_setsockopt(sock, SOL_UDP, UDP_GRO, 1)
        self.sent = 0
        self.send_drops = 0
        self.received = 0
        self.gso_batches = 0
        self.gro_batches = 0
        self.last_send_errno = 0
        self._buf = bytearray(RECV_BUFFER_SIZE)
        self._view = memoryview(self._buf)

    # --- plumbing ---------------------------------------------------------------------------------------------
    def fileno(self) -> int:
        return self.sock.fileno()

    def getsockname(self) -> tuple:
        return self.sock.getsockname()

    def close(self) -> None:
        self.sock.close()

    def __repr__(self) -> str:
        return (
            f"<UdpBatchSocket {self.sock.getsockname() if self.sock.fileno() >= 0 else 'closed'}"
            f" gso={self.gso_enabled} gro={self.gro_enabled}>"
        )

    # --- send ---------------------------------------------------------------------------------------------------
    def send_batch(self, datagrams: list[bytes], addr: tuple) -> int:
        """Send ``datagrams`` to ``addr`` in order; returns how many the kernel took (the rest are counted drops).

        With GSO, each maximal run of equal-size datagrams (the run's last one may be shorter; at most
        GSO_MAX_SEGMENTS segments and GSO_MAX_BYTES bytes) goes out in one sendmsg; lone datagrams use sendto.
        """
        n = len(datagrams)
        if not self.gso_enabled or n == 1:
            return self._send_plain(datagrams, 0, n, addr)
        sent = 0
        i = 0
        while i < n:
            if not self.gso_enabled:  # turned off by a failure below
                return sent + self._send_plain(datagrams, i, n, addr)
            size = len(datagrams[i])
            j = i + 1
            total = size
            limit = min(n, i + GSO_MAX_SEGMENTS) if size else j
            while j < limit:
                length = len(datagrams[j])
                if length > size or total + length > GSO_MAX_BYTES:
                    break
                total += length
                j += 1
                if length < size:  # a shorter datagram may only end a run
                    break
            if j - i == 1:
                k = self._send_plain(datagrams, i, j, addr)
            else:
                k = self._send_gso(datagrams, i, j, size, addr)
            sent += k
            if k < j - i and self.last_send_errno in _DROP_ERRNOS:
                # the socket buffer is full: everything after this is refused too, do not try
                self.send_drops += n - j
                return sent
            i = j
        return sent

    def _send_gso(self, datagrams: list[bytes], i: int, j: int, size: int, addr: tuple) -> int:
        try:
            self.sock.sendmsg(datagrams[i:j], _gso_cmsg(size), 0, addr)
        except OSError as exc:
            code = exc.errno
            if code in _GSO_OFF_ERRNOS:
                # No GSO on this route/device, or the segment exceeds the device MTU (EINVAL too). Resend the run
                # one by one; if that fails only with EMSGSIZE it was the size, and GSO stays on.
                self.gso_enabled = False
                self.last_send_errno = 0
                k = self._send_plain(datagrams, i, j, addr)
                if self.last_send_errno == errno.EMSGSIZE:
                    self.gso_enabled = True
                else:
                    _log.info("UDP GSO turned off on %r: %s", self, errno.errorcode.get(code, code))
                return k
            self.last_send_errno = code or 0
            self.send_drops += j - i
            return 0
        self.gso_batches += 1
        self.sent += j - i
        return j - i

    def _send_plain(self, datagrams: list[bytes], i: int, j: int, addr: tuple) -> int:
        sendto = self.sock.sendto
        k = i
        drops = 0
        while k < j:
            try:
                while k < j:
                    sendto(datagrams[k], addr)
                    k += 1
            except OSError as exc:
                self.last_send_errno = code = exc.errno or 0
                if code in _DROP_ERRNOS:  # buffer full: the rest would be refused too
                    drops += j - k
                    break
                # an error about this datagram (EMSGSIZE, unreachable, EPERM ...): drop it, go on with the rest
                drops += 1
                k += 1
        self.send_drops += drops
        self.sent += j - i - drops
        return j - i - drops

    # --- receive ------------------------------------------------------------------------------------------------
    def recv_batch(self, max_datagrams: int = 64) -> list[tuple[bytes, tuple]]:
        """Read what is ready, up to ``max_datagrams`` (a GRO buffer is never cut, so it may return a few more)."""
        if self.gro_enabled:
            return self._recv_gro(max_datagrams)
        out: list[tuple[bytes, tuple]] = []
        append = out.append
        recvfrom_into = self.sock.recvfrom_into
        view = self._view
        count = 0
        while count < max_datagrams:
            try:
                size, addr = recvfrom_into(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # an ICMP error queued on the socket (connected use): consumed, go on
                count += 1
                continue
            append((view[:size].tobytes(), addr))
            count += 1
        self.received += len(out)
        return out

    def _recv_gro(self, max_datagrams: int) -> list[tuple[bytes, tuple]]:
        out: list[tuple[bytes, tuple]] = []
        append = out.append
        recvmsg = self.sock.recvmsg
        count = 0
        calls = 0
        while count < max_datagrams and calls < max_datagrams:
            calls += 1
            try:
                data, ancdata, _flags, addr = recvmsg(RECV_BUFFER_SIZE, 64)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            segment = 0
            for level, kind, cdata in ancdata:
                if level == SOL_UDP and kind == UDP_GRO:
                    segment = int.from_bytes(cdata[:4], sys.byteorder)
            length = len(data)
            if segment and length > segment:
                for off in range(0, length, segment):
                    append((data[off : off + segment], addr))
                count += (length + segment - 1) // segment
                self.gro_batches += 1
            else:
                append((data, addr))
                count += 1
        self.received += count
        return out


def _gso_supported(sock: socket.socket) -> bool:
    """True when the kernel knows UDP_SEGMENT (Linux ≥ 4.18). Route support is found out on the first send."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True
