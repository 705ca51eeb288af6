"""Independent QUIC peers for interop tests (aioquic 1.7.2 and qh3 2.1.0), plus the reusable traffic logic.

Two halves, deliberately separate so that our own transport can be plugged into either side later:

* application logic, independent of any QUIC library -- it only needs a connection object with
  ``send_stream_data(stream_id, data, end_stream)``, ``send_datagram_frame(data)`` and ``request_key_update()``
  (aioquic's, qh3's and mqvpn's QuicConnection all have these) and it consumes events by class name
  (``dispatch_event``):
    - ``EchoApp``: the server side.  Echoes every bidirectional stream (FIN when the client's FIN arrives) and every
      DATAGRAM frame; can initiate a key update after N echoed bytes.  Counters in ``EchoApp.stats``.
    - ``TrafficClient`` + ``Result``: the client side.  One bidi stream of random bytes checked by sha256, numbered
      DATAGRAMs sent with a window (never more than `datagram_window` un-echoed), optional key update half-way,
      graceful close.  ``Result.check()`` is the one place where pass/fail is decided.

* drivers for aioquic / qh3 over real UDP sockets (their asyncio layers are near-identical):
    - ``aioquic_server(...)`` / ``qh3_server(...)`` / ``echo_server(kind, ...)``: async context managers yielding a
      ``ServerAddress`` -- a ``(host, port)`` tuple with a ``.handle`` (``ServerHandle``: per-connection EchoApps,
      ``request_key_update()``, wait helpers).
    - ``run_client(kind, host, port, cafile, ...)`` -> ``Result`` and ``measure_idle_timeout(...)`` -> ``IdleResult``.

Plugging in another implementation:
    register_server_kind("mqvpn", my_echo_server)   # same signature as aioquic_server, yields a ServerAddress
    register_client_kind("mqvpn", MyClientSession)  # factory(host, port, options: ClientOptions, sink) -> ClientSession
after which echo_server("mqvpn", ...) and run_client("mqvpn", ...) work.  See ``ClientSession`` for the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import ssl
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any, AsyncIterator, Callable, Protocol, Sequence

__all__ = [
    "ALPN",
    "ClientOptions",
    "ClientSession",
    "EchoApp",
    "EchoStats",
    "IdleResult",
    "InteropError",
    "Result",
    "ServerAddress",
    "ServerHandle",
    "TrafficClient",
    "aioquic_server",
    "dispatch_event",
    "echo_server",
    "key_phases",
    "measure_idle_timeout",
    "qh3_server",
    "register_client_kind",
    "register_server_kind",
    "run",
    "run_client",
    "wait_until",
]

ALPN = "mqvpn-test"
DEFAULT_ALPN: tuple[str, ...] = (ALPN,)
DEFAULT_MAX_DATA = 16 * 1024 * 1024  # aioquic's own default is 1 MiB, which throttles a 10 MB echo
DEFAULT_MAX_STREAM_DATA = 8 * 1024 * 1024
DGRAM_HEADER = 8  # every test DATAGRAM starts with its 64-bit sequence number


class InteropError(AssertionError):
    """A peer misbehaved or a check failed.  `.result` carries whatever was measured (may be None)."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


def run(coro: Any, timeout: float = 60.0) -> Any:
    """Run a coroutine to completion in a fresh event loop, failing with TimeoutError after `timeout` seconds.
    (pytest-asyncio is not a dependency; sync tests call this.)"""
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ==================================================================================================== event plumbing


class EventSink(Protocol):
    """What dispatch_event() feeds.  EchoApp and TrafficClient implement it."""

    def on_handshake(self, alpn_protocol: str | None) -> None: ...
    def on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None: ...
    def on_datagram(self, data: bytes) -> None: ...
    def on_stream_reset(self, stream_id: int, error_code: int) -> None: ...
    def on_terminated(self, error_code: int, frame_type: int | None, reason_phrase: str) -> None: ...


def dispatch_event(event: Any, sink: EventSink) -> None:
    """Route one QUIC event (aioquic, qh3 or mqvpn -- matched by class name) to `sink`. Unknown events are ignored."""
    name = type(event).__name__
    if name == "StreamDataReceived":
        sink.on_stream_data(event.stream_id, event.data, event.end_stream)
    elif name == "DatagramFrameReceived":
        sink.on_datagram(event.data)
    elif name == "HandshakeCompleted":
        sink.on_handshake(event.alpn_protocol)
    elif name == "ConnectionTerminated":
        sink.on_terminated(event.error_code, event.frame_type, event.reason_phrase)
    elif name == "StreamReset":
        sink.on_stream_reset(event.stream_id, event.error_code)
    elif name == "KeyUpdated" and hasattr(sink, "on_key_updated"):
        sink.on_key_updated(event.key_phase, event.initiated_locally)


_aioquic_one_rtt: Any = None  # aioquic.tls.Epoch.ONE_RTT, imported on first use


def key_phases(quic: Any) -> tuple[int | None, int | None]:
    """(send, receive) 1-RTT key phase bits of a connection; None where the implementation doesn't tell.

    Reaches into private state (test-only): qh3 keeps it in its native core, aioquic in `_cryptos`.  An
    implementation can also offer a public `key_phases()` method.
    """
    try:
        own = getattr(quic, "key_phases", None)
        if callable(own):
            return tuple(own())  # type: ignore[return-value]
        core = getattr(quic, "_core", None)
        if core is not None and hasattr(core, "send_key_phase"):
            return core.send_key_phase, core.receive_key_phase  # properties of qh3's native core
        cryptos = getattr(quic, "_cryptos", None)
        if cryptos:
            global _aioquic_one_rtt
            if _aioquic_one_rtt is None:
                from aioquic.tls import Epoch

                _aioquic_one_rtt = Epoch.ONE_RTT
            pair = cryptos.get(_aioquic_one_rtt)
            if pair is not None and pair.send.is_valid():
                # aioquic flips both directions when it sends the first packet of the new phase
                return pair.send.key_phase, pair.recv.key_phase
    except Exception:
        pass
    return None, None


def _peer_max_datagram_frame_size(quic: Any) -> int | None:
    for attr in ("peer_max_datagram_frame_size", "_remote_max_datagram_frame_size"):
        value = getattr(quic, attr, None)
        if value is not None:
            return value
    return None


# ==================================================================================================== server app


@dataclass
class EchoStats:
    alpn: str | None = None
    streams: int = 0  # bidirectional streams seen
    stream_bytes: int = 0  # received (and echoed) on bidi streams
    fins: int = 0
    uni_bytes: int = 0  # received on unidirectional streams (not echoable; counted only)
    stream_resets: int = 0
    datagrams: int = 0  # DATAGRAM frames received
    datagram_bytes: int = 0
    datagrams_echoed: int = 0
    datagrams_refused: int = 0  # echo attempts the local stack refused (False returned or exception raised)
    key_updates_requested: int = 0
    key_phases: tuple[int | None, int | None] = (None, None)  # (send, recv), sampled by after_receive() and at FIN
    send_phase_changes: int = 0  # how often the sampled send / receive phase bit flipped
    recv_phase_changes: int = 0
    terminated: tuple[int, int | None, str] | None = None  # (error_code, frame_type, reason) once terminated
    terminated_at: float | None = None  # time.monotonic()
    local_errors: int = 0  # exceptions raised by the local QUIC stack while transmitting (caught by the driver)
    last_error: str | None = None

    def problems(
        self,
        result: "Result | None" = None,
        *,
        alpn: str | None = ALPN,
        expect_graceful_close: bool = True,
        allow_local_errors: bool = False,
    ) -> list[str]:
        """What is wrong with this server-side view (cross-checked against the client's Result if given)."""
        out = []
        if alpn is not None and self.alpn != alpn:
            out.append(f"server ALPN {self.alpn!r}, expected {alpn!r}")
        if self.datagrams_refused:
            out.append(f"server refused to echo {self.datagrams_refused} DATAGRAMs ({self.last_error})")
        if self.local_errors and not allow_local_errors:
            out.append(f"server stack raised {self.local_errors} errors, last: {self.last_error}")
        if self.stream_resets:
            out.append(f"{self.stream_resets} streams reset by the client")
        if result is not None:
            if self.stream_bytes != result.stream_bytes:
                out.append(f"server got {self.stream_bytes} stream bytes, client sent {result.stream_bytes}")
            if self.fins != (1 if result.stream_bytes else 0):
                out.append(f"server saw {self.fins} FINs")
            if self.datagrams < result.datagrams_received or self.datagrams > result.datagrams_sent:
                out.append(
                    f"server got {self.datagrams} DATAGRAMs: client sent {result.datagrams_sent}, "
                    f"got {result.datagrams_received} echoes"
                )
        if expect_graceful_close:
            if self.terminated is None:
                out.append("server connection not terminated")
            elif self.terminated[0] != 0:
                out.append(f"server connection terminated with {self.terminated}")
        return out

    def check(self, result: "Result | None" = None, **kwargs) -> "EchoStats":
        """Raise InteropError listing every problem (see problems()); return self when all is well."""
        problems = self.problems(result, **kwargs)
        if problems:
            raise InteropError("echo server: " + "; ".join(problems) + f"\n{self}", result)
        return self


class EchoApp:
    """Server-side echo logic for one connection (sans-I/O: the caller transmits after feeding events).

    conn: anything with send_stream_data / send_datagram_frame / request_key_update.
    transmit: called after a key update requested out of band (request_key_update()); optional.
    key_update_after: initiate one key update once this many stream bytes have been echoed.

    Feed it with dispatch_event(event, app) for every event; an implementation with a DATAGRAM hot path (mqvpn's
    conn.datagram_handler) can point that straight at app.on_datagram.  Call app.after_receive() after each
    received UDP datagram if key-phase tracking is wanted.
    """

    def __init__(
        self,
        conn: Any,
        *,
        transmit: Callable[[], None] | None = None,
        key_update_after: int | None = None,
        echo_datagrams: bool = True,
    ) -> None:
        self.conn = conn
        self.transmit = transmit
        self.key_update_after = key_update_after
        self.echo_datagrams = echo_datagrams
        self.stats = EchoStats()
        self._streams: set[int] = set()

    @property
    def terminated(self) -> bool:
        return self.stats.terminated is not None

    def request_key_update(self) -> None:
        self.stats.key_updates_requested += 1
        self.conn.request_key_update()
        if self.transmit is not None:
            self.transmit()

    # -- EventSink

    def on_handshake(self, alpn_protocol: str | None) -> None:
        self.stats.alpn = alpn_protocol

    def on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        st = self.stats
        if stream_id & 2:  # unidirectional: nothing to echo on
            st.uni_bytes += len(data)
            return
        if stream_id not in self._streams:
            self._streams.add(stream_id)
            st.streams += 1
        st.stream_bytes += len(data)
        if data or end_stream:
            self.conn.send_stream_data(stream_id, data, end_stream)
        if end_stream:
            st.fins += 1
            self._sample_phases()
        if (
            self.key_update_after is not None
            and st.key_updates_requested == 0
            and st.stream_bytes >= self.key_update_after
        ):
            st.key_updates_requested += 1
            self.conn.request_key_update()  # the driver transmits after the event batch

    def after_receive(self) -> None:
        """Drivers call this after each received UDP datagram has been processed (optional hook)."""
        self._sample_phases()

    def _sample_phases(self) -> None:
        st = self.stats
        phases = key_phases(self.conn)
        old = st.key_phases
        if phases != old and phases != (None, None):
            st.send_phase_changes += None not in (old[0], phases[0]) and old[0] != phases[0]
            st.recv_phase_changes += None not in (old[1], phases[1]) and old[1] != phases[1]
            st.key_phases = phases

    def on_datagram(self, data: bytes) -> None:
        st = self.stats
        st.datagrams += 1
        st.datagram_bytes += len(data)
        if not self.echo_datagrams:
            return
        try:
            ok = self.conn.send_datagram_frame(data)
        except Exception as exc:  # e.g. a frame too large for the peer
            ok = False
            st.last_error = f"send_datagram_frame: {exc!r}"
        if ok is False:  # aioquic/qh3 return None; mqvpn returns False when it drops
            st.datagrams_refused += 1
        else:
            st.datagrams_echoed += 1

    def on_stream_reset(self, stream_id: int, error_code: int) -> None:
        self.stats.stream_resets += 1

    def on_local_error(self, message: str) -> None:
        self.stats.local_errors += 1
        self.stats.last_error = message

    def on_terminated(self, error_code: int, frame_type: int | None, reason_phrase: str) -> None:
        st = self.stats
        if st.terminated is None:
            self._sample_phases()
            st.terminated = (error_code, frame_type, reason_phrase)
            st.terminated_at = time.monotonic()


# ==================================================================================================== client app


@dataclass
class Result:
    kind: str
    alpn_expected: str | None = None
    alpn: str | None = None
    peer_max_datagram_frame_size: int | None = None
    # timings (seconds)
    handshake_time: float = 0.0
    stream_time: float | None = None  # first byte queued -> echoed FIN received
    datagram_time: float | None = None  # first DATAGRAM sent -> last one echoed or given up on
    close_time: float | None = None  # close() -> terminated
    total_time: float = 0.0
    # stream
    stream_bytes: int = 0  # sent
    stream_rx_bytes: int = 0  # echoed back
    stream_fin: bool = False
    stream_sha256_sent: str = ""
    stream_sha256_echoed: str = ""
    stream_unexpected: int = 0  # data on streams we did not open
    stream_resets: int = 0
    # datagrams
    datagrams_sent: int = 0
    datagrams_refused: int = 0  # the local stack refused to queue them (returned False or raised)
    datagram_refused_reason: str | None = None  # the first exception, if it raised
    datagrams_received: int = 0  # distinct sequence numbers echoed back intact
    datagrams_duplicate: int = 0
    datagrams_corrupt: int = 0
    datagrams_expired: int = 0  # given up waiting for (window slot released); may still arrive later
    datagram_size: int = 0
    datagram_rtt_median: float | None = None
    datagram_rtt_max: float | None = None
    # key update
    key_update_requested: bool = False
    key_update_at_bytes: int | None = None  # stream bytes echoed when requested
    key_phases_before: tuple[int | None, int | None] = (None, None)
    key_phases_after: tuple[int | None, int | None] = (None, None)
    rx_bytes_after_key_update: int = 0  # stream + datagram payload bytes received after the request
    key_phases_end: tuple[int | None, int | None] = (None, None)  # sampled when all echoes are in (before close)
    # close
    closed: bool = False
    close_error: tuple[int, int | None, str] | None = None
    # exceptions the local QUIC stack raised while transmitting (caught by the driver; the first one kept)
    local_errors: int = 0
    first_local_error: str | None = None

    @property
    def stream_ok(self) -> bool:
        return (
            self.stream_fin
            and self.stream_rx_bytes == self.stream_bytes
            and self.stream_sha256_echoed == self.stream_sha256_sent
        )

    @property
    def datagram_ratio(self) -> float:
        return self.datagrams_received / self.datagrams_sent if self.datagrams_sent else 1.0

    def problems(
        self,
        *,
        min_datagram_ratio: float = 0.99,
        expect_graceful_close: bool = True,
        expect_key_update: bool | None = None,
    ) -> list[str]:
        """Everything wrong with this result (empty list: all good)."""
        out = []
        if self.alpn_expected is not None and self.alpn != self.alpn_expected:
            out.append(f"ALPN {self.alpn!r}, expected {self.alpn_expected!r}")
        if self.stream_bytes and not self.stream_ok:
            out.append(
                f"stream echo mismatch: sent {self.stream_bytes} sha256 {self.stream_sha256_sent[:16]}, "
                f"echoed {self.stream_rx_bytes} sha256 {self.stream_sha256_echoed[:16]} fin={self.stream_fin}"
            )
        if self.local_errors:
            out.append(f"{self.local_errors} local stack errors, first: {self.first_local_error}")
        if self.stream_unexpected:
            out.append(f"{self.stream_unexpected} bytes on unexpected streams")
        if self.stream_resets:
            out.append(f"{self.stream_resets} stream resets")
        if self.datagrams_refused:
            out.append(f"{self.datagrams_refused} DATAGRAMs refused locally ({self.datagram_refused_reason})")
        if self.datagrams_corrupt:
            out.append(f"{self.datagrams_corrupt} corrupt DATAGRAM echoes")
        if self.datagrams_sent and self.datagram_ratio < min_datagram_ratio:
            out.append(
                f"DATAGRAMs echoed {self.datagrams_received}/{self.datagrams_sent} "
                f"= {self.datagram_ratio:.4f} < {min_datagram_ratio}"
            )
        want_ku = self.key_update_requested if expect_key_update is None else expect_key_update
        if want_ku:
            if not self.key_update_requested:
                out.append("key update was never requested")
            else:
                before, after = self.key_phases_before[0], self.key_phases_after[0]
                if before is not None and after is not None and before == after:
                    out.append(f"send key phase did not change ({before} -> {after})")
                if self.rx_bytes_after_key_update == 0:
                    out.append("nothing received after the key update")
        if expect_graceful_close:
            if not self.closed:
                out.append("connection did not close")
            elif self.close_error is not None and self.close_error[0] != 0:
                out.append(f"close with error {self.close_error}")
        return out

    def check(self, **kwargs) -> "Result":
        """Raise InteropError listing every problem (see problems()); return self when all is well."""
        problems = self.problems(**kwargs)
        if problems:
            raise InteropError(f"{self.kind} client: " + "; ".join(problems) + f"\n{self.summary()}", self)
        return self

    def summary(self) -> str:
        d = asdict(self)
        d["datagram_ratio"] = round(self.datagram_ratio, 4)
        return " ".join(f"{k}={v}" for k, v in d.items() if k not in ("stream_sha256_sent", "stream_sha256_echoed"))


class TrafficClient:
    """Client-side traffic generator and checker (EventSink).  Drive it with run(session)."""

    def __init__(
        self,
        *,
        stream_bytes: int,
        datagrams: int,
        datagram_size: int,
        datagram_window: int = 64,
        seed: int | None = None,
        stall_timeout: float = 15.0,
        stream_chunk: int = 256 * 1024,
    ) -> None:
        if datagrams and datagram_size < DGRAM_HEADER:
            raise ValueError(f"datagram_size must be >= {DGRAM_HEADER}")
        rng = random.Random(seed)
        self.stream_data = rng.randbytes(stream_bytes)
        self.datagram_tail = rng.randbytes(max(0, datagram_size - DGRAM_HEADER))
        self.n_datagrams = datagrams
        self.datagram_size = datagram_size
        self.datagram_window = max(1, datagram_window)
        self.stall_timeout = stall_timeout
        self.stream_chunk = stream_chunk

        self.result = Result(kind="?", stream_bytes=stream_bytes, datagram_size=datagram_size)
        self.result.stream_sha256_sent = hashlib.sha256(self.stream_data).hexdigest()
        self.stream_id: int | None = None
        self._rx_hash = hashlib.sha256()
        self._dg_seen = bytearray(datagrams)
        self._dg_sent_at = [0.0] * datagrams
        self._dg_outstanding: OrderedDict[int, float] = OrderedDict()
        self._dg_rtts: list[float] = []
        self._dg_last_echo = 0.0
        self._srtt = 0.05
        self._ku_mark: int | None = None  # rx bytes counter at key update request
        self._rx_total = 0
        self.terminated: tuple[int, int | None, str] | None = None
        self.progress = asyncio.Event()  # set on anything received / terminated
        self.halfway = asyncio.Event()
        self._loop_time = asyncio.get_running_loop().time
        self._t_stream0: float | None = None

    # -- EventSink

    def on_handshake(self, alpn_protocol: str | None) -> None:
        self.result.alpn = alpn_protocol

    def on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        r = self.result
        if stream_id != self.stream_id:
            r.stream_unexpected += len(data)
            return
        if data:
            self._rx_hash.update(data)
            r.stream_rx_bytes += len(data)
            self._rx_total += len(data)
        if end_stream and not r.stream_fin:
            r.stream_fin = True
            r.stream_sha256_echoed = self._rx_hash.hexdigest()
            if self._t_stream0 is not None:
                r.stream_time = self._loop_time() - self._t_stream0
        if not self.halfway.is_set() and r.stream_bytes and r.stream_rx_bytes * 2 >= r.stream_bytes:
            self.halfway.set()
        self.progress.set()

    def on_datagram(self, data: bytes) -> None:
        r = self.result
        seq = int.from_bytes(data[:DGRAM_HEADER], "big")
        if (
            len(data) != self.datagram_size
            or seq >= self.n_datagrams
            or data[DGRAM_HEADER:] != self.datagram_tail
        ):
            r.datagrams_corrupt += 1
            return
        self._rx_total += len(data)
        if self._dg_seen[seq]:
            r.datagrams_duplicate += 1
            return
        self._dg_seen[seq] = 1
        r.datagrams_received += 1
        rtt = self._loop_time() - self._dg_sent_at[seq]
        self._dg_rtts.append(rtt)
        self._dg_last_echo = self._loop_time()
        self._srtt += (rtt - self._srtt) / 8
        self._dg_outstanding.pop(seq, None)
        if not self.halfway.is_set() and not r.stream_bytes and r.datagrams_received * 2 >= self.n_datagrams:
            self.halfway.set()
        self.progress.set()

    def on_stream_reset(self, stream_id: int, error_code: int) -> None:
        self.result.stream_resets += 1
        self.progress.set()

    def on_local_error(self, message: str) -> None:
        r = self.result
        r.local_errors += 1
        if r.first_local_error is None:
            r.first_local_error = message

    def on_terminated(self, error_code: int, frame_type: int | None, reason_phrase: str) -> None:
        if self.terminated is None:
            self.terminated = (error_code, frame_type, reason_phrase)
        self.progress.set()
        self.halfway.set()

    # -- driving

    def _alive(self, what: str) -> None:
        if self.terminated is not None:
            raise InteropError(f"connection terminated during {what}: {self.terminated}", self.result)

    async def _wait_until(self, cond: Callable[[], bool], what: str) -> None:
        while not cond():
            self._alive(what)
            self.progress.clear()
            try:
                await asyncio.wait_for(self.progress.wait(), self.stall_timeout)
            except asyncio.TimeoutError:
                raise InteropError(
                    f"{what}: no progress for {self.stall_timeout}s\n{self.result.summary()}", self.result
                ) from None

    async def _stream(self, session: "ClientSession") -> None:
        r = self.result
        if not r.stream_bytes:
            return
        sid = session.open_bidi_stream()
        self.stream_id = sid
        self._t_stream0 = self._loop_time()
        data, n, chunk = self.stream_data, len(self.stream_data), self.stream_chunk
        for off in range(0, n, chunk):
            self._alive("stream send")
            session.send_stream_data(sid, data[off : off + chunk], off + chunk >= n)
            session.transmit()
            await asyncio.sleep(0)
        await self._wait_until(lambda: r.stream_fin, "stream echo")

    async def _datagrams(self, session: "ClientSession") -> None:
        r = self.result
        n = self.n_datagrams
        if not n:
            return
        loop_time = self._loop_time
        outstanding = self._dg_outstanding
        tail = self.datagram_tail
        t0 = loop_time()
        seq = 0
        while seq < n:
            self._alive("datagram send")
            now = loop_time()
            self._datagram_stall(now, t0)
            self._expire(now)
            free = self.datagram_window - len(outstanding)
            if free <= 0:
                oldest = next(iter(outstanding.values()))
                self.progress.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.progress.wait(), max(0.001, oldest + self._expiry() - now))
                continue
            for _ in range(min(free, n - seq, 16)):
                try:
                    ok = session.send_datagram(seq.to_bytes(DGRAM_HEADER, "big") + tail)
                except Exception as exc:  # qh3: ValueError("datagram is too large") beyond the peer's limit
                    ok = False
                    r.datagram_refused_reason = r.datagram_refused_reason or repr(exc)
                if ok is False:
                    r.datagrams_refused += 1
                else:
                    outstanding[seq] = now
                self._dg_sent_at[seq] = now
                seq += 1
                r.datagrams_sent += 1
            session.transmit()
            await asyncio.sleep(0)
        # drain: until every datagram is echoed or given up on
        while outstanding:
            self._alive("datagram drain")
            now = loop_time()
            self._datagram_stall(now, t0)
            self._expire(now)
            if not outstanding:
                break
            oldest = next(iter(outstanding.values()))
            self.progress.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.progress.wait(), max(0.001, oldest + self._expiry() - now))
        r.datagram_time = loop_time() - t0

    def _datagram_stall(self, now: float, t0: float) -> None:
        if now - max(self._dg_last_echo, t0) > self.stall_timeout:
            raise InteropError(
                f"datagrams: no echo for {self.stall_timeout}s\n{self.result.summary()}", self.result
            )

    def _expiry(self) -> float:
        return min(1.0, max(0.1, 4 * self._srtt))

    def _expire(self, now: float) -> None:
        limit = now - self._expiry()
        outstanding = self._dg_outstanding
        while outstanding:
            seq, sent = next(iter(outstanding.items()))
            if sent > limit:
                break
            del outstanding[seq]
            self.result.datagrams_expired += 1

    async def _key_update(self, session: "ClientSession") -> None:
        r = self.result
        if r.stream_bytes or self.n_datagrams:
            await self.halfway.wait()
        else:
            await asyncio.sleep(0.05)
        self._alive("key update")
        r.key_phases_before = session.key_phases()
        r.key_update_at_bytes = r.stream_rx_bytes
        self._ku_mark = self._rx_total
        session.request_key_update()
        session.transmit()
        r.key_update_requested = True

    async def run(self, session: "ClientSession", *, key_update: bool = False, concurrent: bool = True) -> None:
        """Stream + DATAGRAMs (+ key update); returns when all echoes are in. Does not close."""
        tasks = []
        if key_update:
            tasks.append(asyncio.ensure_future(self._key_update(session)))
        try:
            if concurrent:
                work = [asyncio.ensure_future(self._stream(session)), asyncio.ensure_future(self._datagrams(session))]
                tasks += work
                await asyncio.gather(*work)
            else:
                await self._stream(session)
                await self._datagrams(session)
            if key_update:
                await tasks[0]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._finish(session)

    def _finish(self, session: "ClientSession") -> None:
        r = self.result
        r.key_phases_end = session.key_phases()
        if self._dg_rtts:
            rtts = sorted(self._dg_rtts)
            r.datagram_rtt_median = rtts[len(rtts) // 2]
            r.datagram_rtt_max = rtts[-1]
        if r.key_update_requested:
            r.key_phases_after = session.key_phases()
            r.rx_bytes_after_key_update = self._rx_total - (self._ku_mark or 0)


# ==================================================================================================== sessions


@dataclass
class ClientOptions:
    cafile: str | None
    server_name: str | None = "localhost"
    alpn: Sequence[str] = DEFAULT_ALPN
    idle_timeout: float = 30.0
    max_datagram_frame_size: int | None = 65536
    max_data: int = DEFAULT_MAX_DATA
    max_stream_data: int = DEFAULT_MAX_STREAM_DATA
    verify: bool = True
    connect_timeout: float = 10.0
    extra: dict = field(default_factory=dict)  # implementation-specific knobs


class ClientSession(Protocol):
    """What run_client() / measure_idle_timeout() need from a client implementation.

    Created by a factory(host, port, options: ClientOptions, sink: EventSink); it must feed every event to
    `sink` (dispatch_event() does the mapping) -- for DATAGRAMs a direct sink.on_datagram(data) is fine.
    send_* only queue: the caller calls transmit() afterwards.
    """

    last_rx: float | None  # loop time of the last UDP datagram received

    async def connect(self) -> None: ...  # handshake complete (certificate verified) or raise InteropError
    @property
    def alpn_protocol(self) -> str | None: ...
    @property
    def peer_max_datagram_frame_size(self) -> int | None: ...
    def open_bidi_stream(self) -> int: ...
    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None: ...
    def send_datagram(self, data: bytes) -> bool | None: ...  # False: refused locally
    def transmit(self) -> None: ...
    def request_key_update(self) -> None: ...
    def key_phases(self) -> tuple[int | None, int | None]: ...
    def close(self) -> None: ...  # CONNECTION_CLOSE(NO_ERROR)
    async def wait_closed(self) -> None: ...  # until terminated
    async def aclose(self) -> None: ...  # release everything (idempotent; bounded time)


def _lib(kind: str) -> SimpleNamespace:
    if kind == "aioquic":
        import aioquic.asyncio as aio
        from aioquic.quic.configuration import QuicConfiguration

        return SimpleNamespace(
            kind=kind, connect=aio.connect, serve=aio.serve, Protocol=aio.QuicConnectionProtocol,
            Configuration=QuicConfiguration,
        )  # fmt: skip
    if kind == "qh3":
        import qh3.asyncio as aio
        from qh3 import QuicConfiguration

        return SimpleNamespace(
            kind=kind, connect=aio.connect, serve=aio.serve, Protocol=aio.QuicConnectionProtocol,
            Configuration=QuicConfiguration,
        )  # fmt: skip
    raise ValueError(f"unknown library {kind!r}")


_PROTOCOL_CLASSES: dict[str, type] = {}


def _protocol_class(kind: str) -> type:
    """QuicConnectionProtocol subclass of the given library that feeds events to a sink and notes receive times."""
    cls = _PROTOCOL_CLASSES.get(kind)
    if cls is not None:
        return cls
    base = _lib(kind).Protocol

    class SinkProtocol(base):  # type: ignore[misc, valid-type]
        def __init__(self, quic, stream_handler=None, *, make_sink: Callable[[Any], EventSink]):
            self.transmit_errors: list[str] = []
            super().__init__(quic, stream_handler=stream_handler)
            self.last_rx: float | None = None
            self.sink = make_sink(self)
            self._after_receive = getattr(self.sink, "after_receive", None)

        def datagram_received(self, data, addr) -> None:
            self.last_rx = self._loop.time()
            super().datagram_received(data, addr)
            if self._after_receive is not None:
                self._after_receive()

        if hasattr(base, "datagrams_received"):  # qh3: batched receive (GRO)

            def datagrams_received(self, data, addr) -> None:
                self.last_rx = self._loop.time()
                super().datagrams_received(data, addr)
                if self._after_receive is not None:
                    self._after_receive()

        def quic_event_received(self, event) -> None:
            # No super(): the base class would buffer stream data in asyncio.StreamReaders.
            dispatch_event(event, self.sink)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            enlarge_socket_buffers(transport.get_extra_info("socket"))

        def transmit(self) -> None:
            # An exception escaping here would be logged by asyncio from a callback and the datagrams still queued
            # would be lost; record it instead (qh3 2.1.0 raises "packet builder capacity exhausted" while
            # building its first flight for a small ClientHello; see test_harness.py).
            try:
                super().transmit()
            except Exception as exc:
                self.transmit_errors.append(repr(exc))
                on_error = getattr(self.sink, "on_local_error", None)
                if on_error is not None:
                    on_error(repr(exc))

    SinkProtocol.__name__ = SinkProtocol.__qualname__ = f"{kind}SinkProtocol"
    _PROTOCOL_CLASSES[kind] = SinkProtocol
    return SinkProtocol


SOCKET_BUFFER = 4 * 1024 * 1024


def enlarge_socket_buffers(sock: Any, size: int = SOCKET_BUFFER) -> None:
    """Ask for big UDP socket buffers (the kernel caps them at net.core.[rw]mem_max).

    Client, server and relay share one event loop in these tests, so a socket may not be read for a while; with the
    default ~208 KB SO_RCVBUF (about 90 full-size datagrams of skb truesize) the kernel drops bursts
    (RcvbufErrors in /proc/net/snmp), which shows up as DATAGRAM loss on a loss-free path.
    """
    if sock is None:
        return
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except (OSError, AttributeError):
            pass


def _cancel_timer(protocol: Any) -> None:
    timer = getattr(protocol, "_timer", None)
    if timer is not None:
        timer.cancel()
        protocol._timer = None


class LibClientSession:
    """ClientSession over aioquic's or qh3's asyncio client (`kind` = "aioquic" | "qh3")."""

    def __init__(self, kind: str, host: str, port: int, options: ClientOptions, sink: EventSink) -> None:
        self.kind = kind
        self.host, self.port = host, port
        self.options = options
        self.sink = sink
        self.protocol: Any = None
        self._cm: Any = None
        self._alpn: str | None = None
        self._terminated: tuple | None = None

    # the protocol's sink: record ALPN / termination here, forward everything to the real sink
    def on_handshake(self, alpn_protocol):
        self._alpn = alpn_protocol
        self.sink.on_handshake(alpn_protocol)

    def on_stream_data(self, stream_id, data, end_stream):
        self.sink.on_stream_data(stream_id, data, end_stream)

    def on_datagram(self, data):
        self.sink.on_datagram(data)

    def on_stream_reset(self, stream_id, error_code):
        self.sink.on_stream_reset(stream_id, error_code)

    def on_local_error(self, message):
        on_error = getattr(self.sink, "on_local_error", None)
        if on_error is not None:
            on_error(message)

    def on_terminated(self, error_code, frame_type, reason_phrase):
        if self._terminated is None:
            self._terminated = (error_code, frame_type, reason_phrase)
        self.sink.on_terminated(error_code, frame_type, reason_phrase)

    def _configuration(self) -> Any:
        lib = _lib(self.kind)
        o = self.options
        config = lib.Configuration(
            is_client=True,
            alpn_protocols=list(o.alpn),
            idle_timeout=o.idle_timeout,
            max_datagram_frame_size=o.max_datagram_frame_size,
            max_data=o.max_data,
            max_stream_data=o.max_stream_data,
            server_name=o.server_name,
            verify_mode=ssl.CERT_REQUIRED if o.verify else ssl.CERT_NONE,
        )
        if o.cafile:
            config.load_verify_locations(cafile=o.cafile)
        for name, value in o.extra.items():
            setattr(config, name, value)
        return config

    async def connect(self) -> None:
        lib = _lib(self.kind)
        cls = _protocol_class(self.kind)
        self._cm = lib.connect(
            self.host,
            self.port,
            configuration=self._configuration(),
            create_protocol=lambda quic, stream_handler=None: cls(quic, stream_handler, make_sink=lambda p: self),
            wait_connected=True,
        )
        try:
            self.protocol = await asyncio.wait_for(self._cm.__aenter__(), self.options.connect_timeout)
        except ConnectionError as exc:
            self._cm = None
            raise InteropError(f"{self.kind} client: handshake failed: {self._terminated or exc!r}") from exc
        except asyncio.TimeoutError as exc:
            self._cm = None
            raise InteropError(f"{self.kind} client: no handshake within {self.options.connect_timeout}s") from exc

    @property
    def quic(self) -> Any:
        return self.protocol._quic

    @property
    def last_rx(self) -> float | None:
        return None if self.protocol is None else self.protocol.last_rx

    @property
    def alpn_protocol(self) -> str | None:
        return self._alpn

    @property
    def peer_max_datagram_frame_size(self) -> int | None:
        return _peer_max_datagram_frame_size(self.quic)

    def open_bidi_stream(self) -> int:
        opener = getattr(self.quic, "_open_stream", None)  # qh3 must allocate in its native core
        if opener is not None:
            return opener(False)
        return self.quic.get_next_available_stream_id(is_unidirectional=False)

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        self.quic.send_stream_data(stream_id, data, end_stream)

    def send_datagram(self, data: bytes) -> bool | None:
        return self.quic.send_datagram_frame(data)

    def transmit(self) -> None:
        self.protocol.transmit()

    def request_key_update(self) -> None:
        self.quic.request_key_update()

    def key_phases(self) -> tuple[int | None, int | None]:
        return key_phases(self.quic)

    def close(self) -> None:
        self.protocol.close()

    async def wait_closed(self) -> None:
        await self.protocol.wait_closed()

    async def aclose(self) -> None:
        cm, self._cm = self._cm, None
        if cm is None:
            return
        try:
            await asyncio.wait_for(cm.__aexit__(None, None, None), 5.0)
        except (asyncio.TimeoutError, OSError):
            pass
        finally:
            _cancel_timer(self.protocol)
            transport = getattr(self.protocol, "_transport", None)
            if transport is not None:
                transport.close()


# ==================================================================================================== servers


class ServerAddress(tuple):
    """(host, port) of a running echo server; `.handle` is its ServerHandle."""

    def __new__(cls, host: str, port: int, handle: "ServerHandle") -> "ServerAddress":
        self = super().__new__(cls, (host, port))
        self.handle = handle
        return self

    @property
    def host(self) -> str:
        return self[0]

    @property
    def port(self) -> int:
        return self[1]


class ServerHandle:
    """Live view of an echo server: one EchoApp per accepted connection, in accept order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.apps: list[EchoApp] = []
        self.protocols: list[Any] = []  # driver objects, parallel to apps (library protocol instances for libs)

    @property
    def stats(self) -> list[EchoStats]:
        return [app.stats for app in self.apps]

    @property
    def live(self) -> list[EchoApp]:
        return [app for app in self.apps if not app.terminated]

    def request_key_update(self) -> int:
        """Ask every live connection to update its keys now; returns how many were asked."""
        live = self.live
        for app in live:
            app.request_key_update()
        return len(live)

    async def wait_for_connections(self, n: int = 1, timeout: float = 10.0) -> list[EchoApp]:
        await wait_until(lambda: len(self.apps) >= n, timeout, f"{self.kind} server: {n} connection(s)")
        return self.apps

    async def wait_all_terminated(self, timeout: float = 10.0) -> list[EchoStats]:
        await wait_until(lambda: not self.live, timeout, f"{self.kind} server: all connections terminated")
        return self.stats


async def wait_until(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> None:
    """Poll `cond` every `interval` s; InteropError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise InteropError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def _lib_echo_server(
    kind: str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    cert: str,
    key: str,
    alpn: Sequence[str] = DEFAULT_ALPN,
    max_datagram_frame_size: int | None = 65536,
    idle_timeout: float = 30.0,
    key_update_after: int | None = None,
    max_data: int = DEFAULT_MAX_DATA,
    max_stream_data: int = DEFAULT_MAX_STREAM_DATA,
    retry: bool = False,
    extra: dict | None = None,
) -> AsyncIterator[ServerAddress]:
    lib = _lib(kind)
    config = lib.Configuration(
        is_client=False,
        alpn_protocols=list(alpn),
        idle_timeout=idle_timeout,
        max_datagram_frame_size=max_datagram_frame_size,
        max_data=max_data,
        max_stream_data=max_stream_data,
    )
    config.load_cert_chain(cert, key)
    for name, value in (extra or {}).items():
        setattr(config, name, value)
    handle = ServerHandle(kind)
    cls = _protocol_class(kind)

    def create_protocol(quic, stream_handler=None):
        def make_sink(protocol):
            app = EchoApp(quic, transmit=protocol.transmit, key_update_after=key_update_after)
            handle.apps.append(app)
            handle.protocols.append(protocol)
            return app

        return cls(quic, stream_handler, make_sink=make_sink)

    server = await lib.serve(host, port, configuration=config, create_protocol=create_protocol, retry=retry)
    try:
        sockname = server._transport.get_extra_info("sockname")
        yield ServerAddress(sockname[0], sockname[1], handle)
    finally:
        for app, protocol in zip(handle.apps, handle.protocols):
            if not app.terminated:
                with contextlib.suppress(Exception):
                    protocol.close()
        with contextlib.suppress(InteropError):
            await wait_until(lambda: not handle.live, 1.0, "server connections to close")
        server.close()
        for protocol in handle.protocols:
            _cancel_timer(protocol)


def aioquic_server(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    cert: str,
    key: str,
    alpn: Sequence[str] = DEFAULT_ALPN,
    max_datagram_frame_size: int | None = 65536,
    idle_timeout: float = 30.0,
    key_update_after: int | None = None,
    max_data: int = DEFAULT_MAX_DATA,
    max_stream_data: int = DEFAULT_MAX_STREAM_DATA,
    retry: bool = False,
    extra: dict | None = None,
) -> contextlib.AbstractAsyncContextManager[ServerAddress]:
    """aioquic echo server: `async with aioquic_server(cert=..., key=...) as (host, port):` (see module doc)."""
    return _lib_echo_server(
        "aioquic", host, port, cert=cert, key=key, alpn=alpn, max_datagram_frame_size=max_datagram_frame_size,
        idle_timeout=idle_timeout, key_update_after=key_update_after, max_data=max_data,
        max_stream_data=max_stream_data, retry=retry, extra=extra,
    )  # fmt: skip


def qh3_server(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    cert: str,
    key: str,
    alpn: Sequence[str] = DEFAULT_ALPN,
    max_datagram_frame_size: int | None = 65536,
    idle_timeout: float = 30.0,
    key_update_after: int | None = None,
    max_data: int = DEFAULT_MAX_DATA,
    max_stream_data: int = DEFAULT_MAX_STREAM_DATA,
    retry: bool = False,
    extra: dict | None = None,
) -> contextlib.AbstractAsyncContextManager[ServerAddress]:
    """qh3 echo server, same behaviour and signature as aioquic_server."""
    return _lib_echo_server(
        "qh3", host, port, cert=cert, key=key, alpn=alpn, max_datagram_frame_size=max_datagram_frame_size,
        idle_timeout=idle_timeout, key_update_after=key_update_after, max_data=max_data,
        max_stream_data=max_stream_data, retry=retry, extra=extra,
    )  # fmt: skip


# ==================================================================================================== registries

SERVER_KINDS: dict[str, Callable[..., contextlib.AbstractAsyncContextManager[ServerAddress]]] = {
    "aioquic": aioquic_server,
    "qh3": qh3_server,
}
CLIENT_KINDS: dict[str, Callable[[str, int, ClientOptions, EventSink], ClientSession]] = {
    "aioquic": lambda host, port, options, sink: LibClientSession("aioquic", host, port, options, sink),
    "qh3": lambda host, port, options, sink: LibClientSession("qh3", host, port, options, sink),
}


def register_server_kind(kind: str, factory: Callable[..., Any]) -> None:
    SERVER_KINDS[kind] = factory


def register_client_kind(kind: str, factory: Callable[[str, int, ClientOptions, EventSink], ClientSession]) -> None:
    CLIENT_KINDS[kind] = factory


def echo_server(kind: str, host: str = "127.0.0.1", port: int = 0, **kwargs) -> Any:
    """`async with echo_server("qh3", cert=..., key=...) as addr:` -- any registered server kind."""
    try:
        factory = SERVER_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown server kind {kind!r}; known: {sorted(SERVER_KINDS)}") from None
    return factory(host, port, **kwargs)


def _client_session(kind: str, host: str, port: int, options: ClientOptions, sink: EventSink) -> ClientSession:
    try:
        factory = CLIENT_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown client kind {kind!r}; known: {sorted(CLIENT_KINDS)}") from None
    return factory(host, port, options, sink)


# ==================================================================================================== clients


async def run_client(
    kind: str,
    host: str,
    port: int,
    cafile: str | None,
    server_name: str | None = "localhost",
    *,
    stream_bytes: int = 10 * 2**20,
    datagrams: int = 10_000,
    datagram_size: int = 1000,
    key_update: bool = False,
    alpn: Sequence[str] = DEFAULT_ALPN,
    idle_timeout: float = 30.0,
    max_datagram_frame_size: int | None = 65536,
    datagram_window: int = 64,
    concurrent: bool = True,
    seed: int | None = 0,
    stall_timeout: float = 15.0,
    close_timeout: float = 5.0,
    check: bool = True,
    min_datagram_ratio: float = 0.99,
    options: ClientOptions | None = None,
) -> Result:
    """Connect (certificate verified against `cafile`), check ALPN, echo `stream_bytes` on one bidi stream and
    `datagrams` DATAGRAMs of `datagram_size` bytes (stream and DATAGRAMs concurrently unless concurrent=False),
    optionally request a key update when half the echo is back, close gracefully.

    check=True: raise InteropError (with .result) unless Result.check(min_datagram_ratio=...) passes.
    Raises InteropError on handshake failure, unexpected termination or a stall (no stream progress / no DATAGRAM
    echo for stall_timeout).

    DATAGRAMs go out at most `datagram_window` un-echoed at a time (a slot is given up after ~4 echo RTTs, 0.1..1 s).
    Keep datagram_size <= ~1150 for cross-stack runs: aioquic fits at most 1170 payload bytes in its 1200-byte
    packets and silently parks a bigger DATAGRAM at the head of its queue forever (later ones never leave either);
    qh3 fits 1250 before PMTU discovery, and a bigger one makes every transmit raise "packet builder capacity
    exhausted" (the whole connection stops sending).
    """
    if options is None:
        options = ClientOptions(
            cafile=cafile,
            server_name=server_name,
            alpn=tuple(alpn),
            idle_timeout=idle_timeout,
            max_datagram_frame_size=max_datagram_frame_size,
        )
    traffic = TrafficClient(
        stream_bytes=stream_bytes,
        datagrams=datagrams,
        datagram_size=datagram_size,
        datagram_window=datagram_window,
        seed=seed,
        stall_timeout=stall_timeout,
    )
    r = traffic.result
    r.kind = kind
    r.alpn_expected = options.alpn[0] if options.alpn else None
    loop_time = asyncio.get_running_loop().time
    t0 = loop_time()
    session = _client_session(kind, host, port, options, traffic)
    try:
        await session.connect()
        r.handshake_time = loop_time() - t0
        r.alpn = session.alpn_protocol
        if r.alpn_expected is not None and r.alpn != r.alpn_expected:
            raise InteropError(f"{kind} client: ALPN {r.alpn!r}, expected {r.alpn_expected!r}", r)
        r.peer_max_datagram_frame_size = session.peer_max_datagram_frame_size
        if datagrams and r.peer_max_datagram_frame_size is None:
            raise InteropError(f"{kind} client: peer did not offer max_datagram_frame_size", r)
        await traffic.run(session, key_update=key_update, concurrent=concurrent)
        t_close = loop_time()
        session.close()
        try:
            await asyncio.wait_for(session.wait_closed(), close_timeout)
        except asyncio.TimeoutError:
            raise InteropError(f"{kind} client: not closed {close_timeout}s after close()", r) from None
        r.close_time = loop_time() - t_close
        r.closed = True
        r.close_error = traffic.terminated
    finally:
        await session.aclose()
    r.total_time = loop_time() - t0
    if check:
        r.check(min_datagram_ratio=min_datagram_ratio)
    return r


@dataclass
class IdleResult:
    kind: str
    handshake_time: float
    silent_for: float  # from going silent (after `settle`) to termination
    since_last_rx: float | None  # from the last UDP datagram received to termination
    error_code: int | None
    reason: str | None


async def measure_idle_timeout(
    kind: str,
    host: str,
    port: int,
    cafile: str | None,
    server_name: str | None = "localhost",
    *,
    alpn: Sequence[str] = DEFAULT_ALPN,
    idle_timeout: float = 30.0,
    settle: float = 0.3,
    on_silent: Callable[[], None] | None = None,
    poke: bytes | None = None,
    max_wait: float = 30.0,
    options: ClientOptions | None = None,
) -> IdleResult:
    """Connect, let the handshake settle, call on_silent() (e.g. turn a relay's blackhole on), then send nothing
    (or only `poke` on a new stream -- with a blackhole its retransmissions go unanswered) and wait for the
    connection to die of idleness.  With a short server idle_timeout and a long client one, this measures the
    peer's advertised max_idle_timeout (the effective timeout is the minimum of both; RFC 9000 §10.1: sending
    ack-eliciting packets restarts the timer only for the first one after a receipt, so `poke` must not extend it).
    Raises InteropError if the connection is still up after max_wait.
    """
    if options is None:
        options = ClientOptions(cafile=cafile, server_name=server_name, alpn=tuple(alpn), idle_timeout=idle_timeout)
    traffic = TrafficClient(stream_bytes=0, datagrams=0, datagram_size=0)
    loop_time = asyncio.get_running_loop().time
    t0 = loop_time()
    session = _client_session(kind, host, port, options, traffic)
    try:
        await session.connect()
        handshake_time = loop_time() - t0
        await asyncio.sleep(settle)
        if traffic.terminated is not None:
            raise InteropError(f"{kind} client: terminated during settle: {traffic.terminated}")
        if on_silent is not None:
            on_silent()
        t_silent = loop_time()
        if poke is not None:
            session.send_stream_data(session.open_bidi_stream(), poke, True)
            session.transmit()
        try:
            await asyncio.wait_for(session.wait_closed(), max_wait)
        except asyncio.TimeoutError:
            raise InteropError(f"{kind} client: connection still alive {max_wait}s after going silent") from None
        t_end = loop_time()
        last_rx = session.last_rx
        term = traffic.terminated
        return IdleResult(
            kind=kind,
            handshake_time=handshake_time,
            silent_for=t_end - t_silent,
            since_last_rx=None if last_rx is None else t_end - last_rx,
            error_code=None if term is None else term[0],
            reason=None if term is None else term[2],
        )
    finally:
        await session.aclose()
