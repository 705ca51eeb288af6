"""An impairing UDP relay for tests: loss, duplication, reordering, fixed delay, blackhole.

    async with LossyRelay(upstream=(host, port), loss=0.01, seed=1) as relay:
        client connects to relay.address ...
        relay.c2s.dropped, relay.s2c.forwarded, ...

Client -> relay (listen socket) -> per-client upstream socket -> upstream; replies come back the same way.  Each client
address gets its own upstream socket (so the upstream sees distinct source ports), up to `max_clients` (LRU).

Everything is bounded: sockets are non-blocking raw sockets (no asyncio write buffers; a send that would block is an
`overflow` drop), at most one packet per flow and direction is held back for reordering, at most `max_pending`
packets wait in delay timers, reads are done in bursts of at most 64 datagrams.  close() cancels every timer and
closes every socket; after close() nothing runs any more.

Impairment parameters are plain attributes and may be changed while the relay runs (e.g. `relay.blackhole = True`).
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections import OrderedDict
from dataclasses import dataclass, fields

__all__ = ["DirectionStats", "LossyRelay"]

_READ_BURST = 64
_MAX_UDP = 65535
_SOCKBUF = 4 * 1024 * 1024  # asked for; the kernel caps it at net.core.[rw]mem_max


@dataclass
class DirectionStats:
    received: int = 0  # datagrams that entered the relay in this direction
    forwarded: int = 0  # datagrams sent on (a duplicate counts twice)
    dropped: int = 0  # all drops: random loss + blackhole + overflow
    blackholed: int = 0  # ... of which dropped because blackhole was on
    overflow: int = 0  # ... of which dropped because a bound was hit or the send would block / failed
    duplicated: int = 0  # extra copies made
    reordered: int = 0  # packets held back and sent after a later one (or after a random hold time)
    bytes_received: int = 0
    bytes_forwarded: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Held:
    __slots__ = ("data", "timer")

    def __init__(self, data: bytes, timer: asyncio.TimerHandle) -> None:
        self.data = data
        self.timer = timer


class _Flow:
    """One client address and its upstream socket."""

    __slots__ = ("client", "sock", "held")

    def __init__(self, client, sock: socket.socket) -> None:
        self.client = client
        self.sock = sock
        self.held: dict[str, _Held | None] = {"c2s": None, "s2c": None}


def _resolve(host: str, port: int) -> tuple[int, tuple]:
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    return family, sockaddr


def _raise_bufs(sock: socket.socket) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKBUF)
        except OSError:
            pass


class LossyRelay:
    def __init__(
        self,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        upstream: tuple[str, int] | None = None,
        loss: float = 0.0,
        reorder: float = 0.0,
        duplicate: float = 0.0,
        delay: float = 0.0,
        seed: int | None = 0,
        *,
        blackhole: bool = False,
        reorder_hold: float = 0.005,
        max_clients: int = 16,
        max_pending: int = 4096,
    ) -> None:
        """
        loss, duplicate, reorder: per-packet probabilities, applied independently in each direction.
        delay: fixed extra one-way latency (seconds) for every forwarded packet.
        reorder_hold: a held-back packet goes out after the next packet of its flow and direction, or after a random
            time in [0, reorder_hold] if none comes.
        blackhole: drop everything (counted in dropped and blackholed).
        """
        if upstream is None:
            raise ValueError("upstream=(host, port) is required")
        for name, p in (("loss", loss), ("reorder", reorder), ("duplicate", duplicate)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability, got {p!r}")
        self.listen = listen
        self.upstream = upstream
        self.loss = loss
        self.reorder = reorder
        self.duplicate = duplicate
        self.delay = delay
        self.blackhole = blackhole
        self.reorder_hold = reorder_hold
        self.max_clients = max_clients
        self.max_pending = max_pending
        self.seed = seed
        # one generator per direction, so that the decisions in one direction don't depend on how packets of the
        # two directions interleave: the same seed and the same packet sequence give the same drops.
        self.rngs = {d: random.Random(None if seed is None else f"{seed}/{d}") for d in ("c2s", "s2c")}
        self.stats = {"c2s": DirectionStats(), "s2c": DirectionStats()}

        self._loop: asyncio.AbstractEventLoop | None = None
        self._listen_sock: socket.socket | None = None
        self._upstream_family = 0
        self._upstream_addr: tuple | None = None
        self._flows: OrderedDict[object, _Flow] = OrderedDict()
        self._by_fd: dict[int, _Flow] = {}
        self._delayed: set[asyncio.TimerHandle] = set()
        self._closed = False
        self.address: tuple[str, int] | None = None

    # ---------------------------------------------------------------- public API

    @property
    def c2s(self) -> DirectionStats:
        return self.stats["c2s"]

    @property
    def s2c(self) -> DirectionStats:
        return self.stats["s2c"]

    @property
    def clients(self) -> list:
        return list(self._flows)

    def reset_stats(self) -> None:
        self.stats = {"c2s": DirectionStats(), "s2c": DirectionStats()}

    def start(self) -> tuple[str, int]:
        """Bind and start relaying (call from inside a running event loop). Returns the (host, port) to connect to."""
        if self._listen_sock is not None:
            raise RuntimeError("relay already started")
        if self._closed:
            raise RuntimeError("relay is closed")
        self._loop = asyncio.get_running_loop()
        self._upstream_family, self._upstream_addr = _resolve(*self.upstream)
        family, addr = _resolve(*self.listen)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            _raise_bufs(sock)
            sock.bind(addr)
        except BaseException:
            sock.close()
            raise
        self._listen_sock = sock
        self._loop.add_reader(sock.fileno(), self._on_listen_readable)
        host, port = sock.getsockname()[:2]
        self.address = (host, port)
        return self.address

    def close(self) -> None:
        """Stop: cancel every timer, close every socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for handle in self._delayed:
            handle.cancel()
        self._delayed.clear()
        for flow in list(self._flows.values()):
            self._close_flow(flow)
        self._flows.clear()
        if self._listen_sock is not None:
            self._remove_reader(self._listen_sock)
            self._listen_sock.close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> "LossyRelay":
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"LossyRelay({self.address} -> {self.upstream}, loss={self.loss}, reorder={self.reorder}, "
            f"duplicate={self.duplicate}, delay={self.delay}, blackhole={self.blackhole}, "
            f"c2s={self.c2s.as_dict()}, s2c={self.s2c.as_dict()})"
        )

    # ---------------------------------------------------------------- sockets

    def _remove_reader(self, sock: socket.socket) -> None:
        try:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
        except (ValueError, OSError):
            pass

    def _close_flow(self, flow: _Flow) -> None:
        for held in flow.held.values():
            if held is not None:
                held.timer.cancel()
        flow.held = {"c2s": None, "s2c": None}
        self._by_fd.pop(flow.sock.fileno(), None)
        self._remove_reader(flow.sock)
        flow.sock.close()

    def _flow_for(self, client) -> _Flow | None:
        flow = self._flows.get(client)
        if flow is not None:
            self._flows.move_to_end(client)
            return flow
        if len(self._flows) >= self.max_clients:
            _, oldest = self._flows.popitem(last=False)
            self._close_flow(oldest)
        sock = socket.socket(self._upstream_family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            _raise_bufs(sock)
            sock.connect(self._upstream_addr)
        except OSError:
            sock.close()
            return None
        flow = _Flow(client, sock)
        self._flows[client] = flow
        fd = sock.fileno()
        self._by_fd[fd] = flow
        self._loop.add_reader(fd, self._on_upstream_readable, fd)
        return flow

    def _on_listen_readable(self) -> None:
        sock = self._listen_sock
        for _ in range(_READ_BURST):
            if self._closed:
                return
            try:
                data, client = sock.recvfrom(_MAX_UDP)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. ICMP errors reported on the socket
            flow = self._flow_for(client)
            if flow is None:
                st = self.stats["c2s"]
                st.received += 1
                st.dropped += 1
                st.overflow += 1
                continue
            self._process(flow, "c2s", data)

    def _on_upstream_readable(self, fd: int) -> None:
        flow = self._by_fd.get(fd)
        if flow is None:
            return
        for _ in range(_READ_BURST):
            if self._closed or flow.sock.fileno() < 0:
                return
            try:
                data = flow.sock.recv(_MAX_UDP)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # ECONNREFUSED: the upstream is gone for now
            self._process(flow, "s2c", data)

    def _send(self, flow: _Flow, direction: str, data: bytes) -> None:
        st = self.stats[direction]
        if self._closed or flow.sock.fileno() < 0:
            st.dropped += 1
            st.overflow += 1
            return
        try:
            if direction == "c2s":
                flow.sock.send(data)
            else:
                self._listen_sock.sendto(data, flow.client)
        except OSError:  # would block, or refused: a bounded relay drops
            st.dropped += 1
            st.overflow += 1
            return
        st.forwarded += 1
        st.bytes_forwarded += len(data)

    # ---------------------------------------------------------------- impairments

    def _process(self, flow: _Flow, direction: str, data: bytes) -> None:
        st = self.stats[direction]
        st.received += 1
        st.bytes_received += len(data)
        if self.blackhole:
            st.dropped += 1
            st.blackholed += 1
            return
        # A fixed number of draws per packet keeps the decision sequence independent of timing (whether the
        # reorder slot happens to be busy, for instance).
        rnd = self.rngs[direction].random
        u_loss, u_dup, u_re1, u_hold1, u_re2, u_hold2 = rnd(), rnd(), rnd(), rnd(), rnd(), rnd()
        if u_loss < self.loss:
            st.dropped += 1
            return
        copies = ((u_re1, u_hold1),)
        if u_dup < self.duplicate:
            copies = ((u_re1, u_hold1), (u_re2, u_hold2))
            st.duplicated += 1
        for u_re, u_hold in copies:
            if u_re < self.reorder and flow.held[direction] is None:
                st.reordered += 1
                timer = self._loop.call_later(u_hold * self.reorder_hold, self._release_held, flow, direction)
                flow.held[direction] = _Held(data, timer)
                continue
            self._deliver(flow, direction, data)
            held = flow.held[direction]
            if held is not None:  # the held packet goes out right after this later one
                flow.held[direction] = None
                held.timer.cancel()
                self._deliver(flow, direction, held.data)

    def _release_held(self, flow: _Flow, direction: str) -> None:
        held = flow.held.get(direction)
        if self._closed or held is None:
            return
        flow.held[direction] = None
        self._deliver(flow, direction, held.data)

    def _deliver(self, flow: _Flow, direction: str, data: bytes) -> None:
        if self.delay <= 0:
            self._send(flow, direction, data)
            return
        if len(self._delayed) >= self.max_pending:
            st = self.stats[direction]
            st.dropped += 1
            st.overflow += 1
            return
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            self._delayed.discard(handle)
            self._send(flow, direction, data)

        handle = self._loop.call_later(self.delay, fire)
        self._delayed.add(handle)
