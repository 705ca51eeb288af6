"""QUIC streams (RFC 9000 §2–4): send/receive halves, reassembly, stream-level flow control, stream states.

Sans-I/O and frame-codec free: the connection parses STREAM / RESET_STREAM / STOP_SENDING / MAX_STREAM_DATA /
STREAM_DATA_BLOCKED frames and calls into these objects; when building packets it asks them what to send and later
reports, per frame, whether the packet carrying it was acknowledged (``delivered=True``) or declared lost (``False``).

Bulk efficiency:

* the sender keeps unacknowledged data in one ``bytearray`` whose first byte is stream offset ``_buf_start``; an ACK
  of the lowest outstanding range trims the front (``del buf[:n]`` is O(1) amortised in CPython); lost ranges are
  kept in a ``RangeSet`` and resent before new data;
* the receiver keeps not-yet-read data in one ``bytearray`` whose first byte is the read offset; received ranges are
  a ``RangeSet``; in-order data is appended; the whole contiguous prefix is handed to the application at once.
"""

from __future__ import annotations

from .errors import QuicErrorCode, QuicProtocolError
from .rangeset import RangeSet

# frame types reported in QuicProtocolError (the connection may override with the exact STREAM type bits)
_FRAME_RESET_STREAM = 0x04
_FRAME_STREAM = 0x08


def stream_is_client_initiated(stream_id: int) -> bool:
    """RFC 9000 §2.1: the least significant bit is 0 for client-initiated streams."""
    return not stream_id & 1


def stream_is_unidirectional(stream_id: int) -> bool:
    """RFC 9000 §2.1: the second least significant bit is 1 for unidirectional streams."""
    return bool(stream_id & 2)


class StreamClosedError(ValueError):
    """The application wrote to a stream whose sending part is already finished (FIN written) or reset."""


# ---------------------------------------------------------------------------------------------------------------
# receiving part
# ---------------------------------------------------------------------------------------------------------------


class StreamReceiver:
    """The receiving part of a stream (RFC 9000 §3.2).

    States map as: Recv = ``final_size is None``; Size Known = final size known, not all received;
    Data Recvd = all received, FIN not yet read; Data Read = ``is_finished`` via FIN; Reset Recvd/Read = ``is_reset``.
    """

    __slots__ = (
        "stream_id",
        "_window",
        "_max_stream_data",
        "_msd_retransmit",
        "_buffer",
        "_ranges",
        "_read_offset",
        "_highest_offset",
        "_final_size",
        "_fin_delivered",
        "reset_error_code",
        "stop_error_code",
        "_stop_pending",
    )

    def __init__(self, stream_id: int, max_stream_data: int) -> None:
        self.stream_id = stream_id
        self._window = max_stream_data  # size of the window we keep open ahead of the read offset
        self._max_stream_data = max_stream_data  # highest limit announced (enforced)
        self._msd_retransmit = False
        self._buffer = bytearray()  # data from _read_offset on (gaps zero-filled)
        self._ranges = RangeSet()  # received ranges at or above _read_offset
        self._read_offset = 0  # bytes handed to the application (or skipped after stop())
        self._highest_offset = 0
        self._final_size: int | None = None
        self._fin_delivered = False
        self.reset_error_code: int | None = None  # set by handle_reset
        self.stop_error_code: int | None = None  # set by stop()
        self._stop_pending = False

    # -- properties ------------------------------------------------------------------------------------------------

    @property
    def highest_offset(self) -> int:
        """Highest stream offset received (the flow control credit the peer consumed on this stream)."""
        return self._highest_offset

    @property
    def final_size(self) -> int | None:
        return self._final_size

    @property
    def max_stream_data(self) -> int:
        """The current limit we enforce (the highest MAX_STREAM_DATA value produced, initially the window)."""
        return self._max_stream_data

    @property
    def read_offset(self) -> int:
        return self._read_offset

    @property
    def is_reset(self) -> bool:
        return self.reset_error_code is not None

    @property
    def is_finished(self) -> bool:
        """FIN delivered to the application, RESET_STREAM received, or (after stop()) everything up to FIN received."""
        if self._fin_delivered or self.reset_error_code is not None:
            return True
        return self.stop_error_code is not None and self._final_size == self._read_offset

    @property
    def buffered(self) -> int:
        """Bytes held for reassembly / not yet pulled (gaps count)."""
        return len(self._buffer)

    # -- incoming frames -------------------------------------------------------------------------------------------

    def _check_final_size(self, end: int, fin: bool, frame_type: int) -> None:
        final_size = self._final_size
        if final_size is not None:
            if end > final_size:
                raise QuicProtocolError(QuicErrorCode.FINAL_SIZE_ERROR, "data beyond the final size", frame_type)
            if fin and end != final_size:
                raise QuicProtocolError(QuicErrorCode.FINAL_SIZE_ERROR, "final size changed", frame_type)
        elif fin and end < self._highest_offset:
            raise QuicProtocolError(
                QuicErrorCode.FINAL_SIZE_ERROR, "final size below data already received", frame_type
            )
        if end > self._max_stream_data:
            raise QuicProtocolError(QuicErrorCode.FLOW_CONTROL_ERROR, "stream flow control limit exceeded", frame_type)

    def handle_frame(self, offset: int, data: bytes, fin: bool) -> int:
        """Process a STREAM frame; return the growth of the highest received offset (connection flow control)."""
        end = offset + len(data)
        self._check_final_size(end, fin, _FRAME_STREAM)
        growth = 0
        if end > self._highest_offset:
            growth = end - self._highest_offset
            self._highest_offset = end
        if fin:
            self._final_size = end
        if self.reset_error_code is not None or self._fin_delivered:
            return growth
        read = self._read_offset
        if end <= read:
            return growth
        if offset < read:
            data = memoryview(data)[read - offset :]
            offset = read
        ranges = self._ranges
        ranges.add(offset, end)
        if self.stop_error_code is not None:
            # the application does not want the data: only track what arrived so the FIN can finish the stream
            if ranges.smallest == read:
                self._read_offset = ranges.shift()[1]
            return growth
        buf = self._buffer
        pos = offset - read
        blen = len(buf)
        if pos == blen:
            buf += data
        elif pos > blen:
            buf += bytes(pos - blen)
            buf += data
        elif pos + len(data) <= blen:
            buf[pos : pos + len(data)] = data
        else:
            buf[pos:] = data
        return growth

    def handle_reset(self, final_size: int, error_code: int) -> int:
        """Process RESET_STREAM; return the growth of the highest received offset. Pending data is discarded."""
        self._check_final_size(final_size, True, _FRAME_RESET_STREAM)
        growth = final_size - self._highest_offset
        self._highest_offset = final_size
        self._final_size = final_size
        if self.reset_error_code is None and not self._fin_delivered:
            self.reset_error_code = error_code
        self._buffer = bytearray()
        self._ranges = RangeSet()
        self._stop_pending = False
        self._msd_retransmit = False
        return growth

    # -- application side ------------------------------------------------------------------------------------------

    def pull_data(self) -> tuple[bytes, bool] | None:
        """Contiguous data ready for the application and whether it ends the stream; None when nothing new."""
        if self._fin_delivered or self.reset_error_code is not None or self.stop_error_code is not None:
            return None
        ranges = self._ranges
        if ranges and ranges.smallest == self._read_offset:
            start, stop = ranges.shift()
            n = stop - start
            buf = self._buffer
            if n == len(buf):
                data = bytes(buf)
                self._buffer = bytearray()
            else:
                data = bytes(buf[:n])
                del buf[:n]
            self._read_offset = stop
            fin = stop == self._final_size
            if fin:
                self._fin_delivered = True
            return data, fin
        if self._final_size is not None and self._final_size == self._read_offset:
            self._fin_delivered = True
            return b"", True
        return None

    def stop(self, error_code: int) -> None:
        """The application is no longer interested: queue STOP_SENDING (once) and discard incoming data."""
        if self.stop_error_code is not None or self.is_finished:
            return
        self.stop_error_code = error_code
        self._stop_pending = True
        self._msd_retransmit = False
        # drop buffered data; keep the received ranges so a FIN completing the stream is still recognised
        self._buffer = bytearray()
        if self._ranges and self._ranges.smallest == self._read_offset:
            self._read_offset = self._ranges.shift()[1]

    # -- frames to send --------------------------------------------------------------------------------------------

    @property
    def control_pending(self) -> bool:
        """A STOP_SENDING or MAX_STREAM_DATA frame is waiting (a peek: nothing is consumed)."""
        if self._stop_pending or self._msd_retransmit:
            return True
        if self._final_size is not None or self.reset_error_code is not None or self.stop_error_code is not None:
            return False
        return 2 * (self._read_offset + self._window - self._max_stream_data) > self._window

    def stop_sending_frame(self) -> int | None:
        """Error code for a STOP_SENDING frame to send now, or None."""
        if not self._stop_pending:
            return None
        self._stop_pending = False
        if self.reset_error_code is not None or self.is_finished:
            return None
        return self.stop_error_code

    def on_stop_sending_delivered(self, delivered: bool) -> None:
        if not delivered and self.stop_error_code is not None and not self.is_finished:
            self._stop_pending = True

    def max_stream_data_frame(self) -> int | None:
        """A new limit to announce in MAX_STREAM_DATA, or None.

        A new limit (read offset + window) is produced once the application consumed more than half the window since
        the last announcement; a lost announcement of the current limit is repeated. Nothing once the final size is
        known, after a reset or after stop().
        """
        if self._final_size is not None or self.reset_error_code is not None or self.stop_error_code is not None:
            self._msd_retransmit = False
            return None
        new_limit = self._read_offset + self._window
        if 2 * (new_limit - self._max_stream_data) > self._window:
            self._max_stream_data = new_limit
            self._msd_retransmit = False
            return new_limit
        if self._msd_retransmit:
            self._msd_retransmit = False
            return self._max_stream_data
        return None

    def on_max_stream_data_delivered(self, delivered: bool, value: int) -> None:
        if not delivered and value == self._max_stream_data:
            self._msd_retransmit = True


# ---------------------------------------------------------------------------------------------------------------
# sending part
# ---------------------------------------------------------------------------------------------------------------


class StreamSender:
    """The sending part of a stream (RFC 9000 §3.1).

    States map as: Ready/Send = FIN not written; Data Sent = FIN written; Data Recvd = ``is_finished`` via FIN;
    Reset Sent/Recvd = ``is_reset`` (``is_finished`` once the RESET_STREAM is acknowledged).
    """

    __slots__ = (
        "stream_id",
        "_max_stream_data",
        "_buffer",
        "_buf_start",
        "_send_offset",
        "_write_offset",
        "_acked",
        "_retx",
        "_fin_written",
        "_fin_pending",
        "_fin_acked",
        "_blocked_sent_at",
        "_blocked_pending",
        "reset_error_code",
        "_reset_final_size",
        "_reset_pending",
        "_reset_acked",
        "new_bytes_sent_by_last_frame",
    )

    def __init__(self, stream_id: int, max_stream_data: int) -> None:
        self.stream_id = stream_id
        self._max_stream_data = max_stream_data  # the peer's limit for this stream
        self._buffer = bytearray()  # unacknowledged / unsent data; first byte is at stream offset _buf_start
        self._buf_start = 0
        self._send_offset = 0  # next new byte to send (= highest offset sent)
        self._write_offset = 0  # bytes written by the application
        self._acked = RangeSet()  # acknowledged ranges above _buf_start (out of order ACKs)
        self._retx = RangeSet()  # lost ranges to send again
        self._fin_written = False
        self._fin_pending = False  # a FIN still has to be (re)sent
        self._fin_acked = False
        self._blocked_sent_at: int | None = None  # stream limit for which STREAM_DATA_BLOCKED was produced
        self._blocked_pending = False
        self.reset_error_code: int | None = None
        self._reset_final_size = 0
        self._reset_pending = False
        self._reset_acked = False
        self.new_bytes_sent_by_last_frame = 0  # new (not retransmitted) bytes in the last next_frame() result

    # -- properties ------------------------------------------------------------------------------------------------

    @property
    def max_stream_data(self) -> int:
        return self._max_stream_data

    @property
    def highest_offset(self) -> int:
        """Highest offset sent (stream flow control credit consumed)."""
        return self._send_offset

    @property
    def write_offset(self) -> int:
        return self._write_offset

    @property
    def buffered(self) -> int:
        """Bytes written but not yet acknowledged (includes unsent data)."""
        return len(self._buffer)

    @property
    def is_reset(self) -> bool:
        return self.reset_error_code is not None

    @property
    def is_finished(self) -> bool:
        """All data and the FIN acknowledged, or the RESET_STREAM acknowledged."""
        if self.reset_error_code is not None:
            return self._reset_acked
        return self._fin_acked and self._buf_start == self._write_offset

    @property
    def has_data_to_send(self) -> bool:
        """A STREAM frame could be produced now (ignoring connection credit). Control frames are not included:
        poll reset_frame() / blocked_frame() for those."""
        if self.reset_error_code is not None:
            return False
        if self._retx:
            return True
        send = self._send_offset
        if send < self._write_offset:
            return send < self._max_stream_data
        return self._fin_pending

    # -- application side ------------------------------------------------------------------------------------------

    def write(self, data: bytes, end_stream: bool = False) -> None:
        if self.reset_error_code is not None:
            raise StreamClosedError(f"stream {self.stream_id} was reset")
        if self._fin_written:
            raise StreamClosedError(f"stream {self.stream_id} is closed for writing (FIN already written)")
        if data:
            self._buffer += data
            self._write_offset += len(data)
        if end_stream:
            self._fin_written = True
            self._fin_pending = True

    def reset(self, error_code: int) -> None:
        """Abandon sending: drop pending data, queue RESET_STREAM (final size = highest offset sent).

        Ignored when already reset or when everything (FIN included) has been acknowledged.
        """
        if self.reset_error_code is not None or self.is_finished:
            return
        self.reset_error_code = error_code
        self._reset_final_size = self._send_offset
        self._reset_pending = True
        self._buffer = bytearray()
        self._buf_start = self._write_offset = self._send_offset
        self._acked = RangeSet()
        self._retx = RangeSet()
        self._fin_pending = False
        self._blocked_pending = False

    def handle_stop_sending(self, error_code: int) -> None:
        """STOP_SENDING from the peer: reset with the same error code (RFC 9000 §3.5)."""
        self.reset(error_code)

    # -- STREAM frames ---------------------------------------------------------------------------------------------

    def next_frame(self, max_data_len: int, connection_credit: int) -> tuple[int, bytes, bool] | None:
        """(offset, data, fin) for the next STREAM frame, or None.

        Lost ranges go first (they consume no connection credit); then new data limited by ``max_data_len``, the
        peer's stream limit and ``connection_credit``. ``new_bytes_sent_by_last_frame`` tells how many new bytes
        the frame carries (to be charged to connection-level flow control).
        """
        self.new_bytes_sent_by_last_frame = 0
        if self.reset_error_code is not None:
            return None
        retx = self._retx
        if retx:
            if max_data_len <= 0:
                return None
            start, stop = retx.shift()
            if stop - start > max_data_len:
                retx.add(start + max_data_len, stop)
                stop = start + max_data_len
            pos = start - self._buf_start
            data = bytes(self._buffer[pos : pos + stop - start])
            fin = self._fin_pending and stop == self._write_offset
            if fin:
                self._fin_pending = False
            return start, data, fin
        send = self._send_offset
        n = min(self._write_offset - send, max_data_len, self._max_stream_data - send, connection_credit)
        if n > 0:
            pos = send - self._buf_start
            data = bytes(self._buffer[pos : pos + n])
            self._send_offset = stop = send + n
            self.new_bytes_sent_by_last_frame = n
            fin = self._fin_pending and stop == self._write_offset
            if fin:
                self._fin_pending = False
            return send, data, fin
        if self._fin_pending and send == self._write_offset:
            self._fin_pending = False
            return send, b"", True
        return None

    def on_data_delivered(self, delivered: bool, offset: int, length: int, fin: bool) -> None:
        """A STREAM frame (offset, length, fin) was acknowledged (True) or declared lost (False)."""
        end = offset + length
        if delivered:
            if fin:
                self._fin_acked = True
                self._fin_pending = False
            if self.reset_error_code is not None:
                return
            buf_start = self._buf_start
            if end <= buf_start:
                return
            start = offset if offset > buf_start else buf_start
            if self._retx:
                self._retx.subtract(start, end)
            if start == buf_start:
                acked = self._acked
                new_start = end
                while acked and acked.smallest <= new_start:
                    stop = acked.shift()[1]
                    if stop > new_start:
                        new_start = stop
                del self._buffer[: new_start - buf_start]
                self._buf_start = new_start
            else:
                self._acked.add(start, end)
            return
        # lost
        if self.reset_error_code is not None:
            return
        if fin and not self._fin_acked:
            self._fin_pending = True
        start = offset if offset > self._buf_start else self._buf_start
        if end <= start:
            return
        retx = self._retx
        if not self._acked:
            retx.add(start, end)
            return
        cur = start
        for s, e in self._acked:
            if e <= cur:
                continue
            if s >= end:
                break
            if s > cur:
                retx.add(cur, s)
            cur = e
            if cur >= end:
                break
        if cur < end:
            retx.add(cur, end)

    # -- flow control ----------------------------------------------------------------------------------------------

    def update_max_stream_data(self, value: int) -> None:
        """MAX_STREAM_DATA from the peer (decreases are ignored, RFC 9000 §4.1)."""
        if value > self._max_stream_data:
            self._max_stream_data = value
            self._blocked_pending = False

    @property
    def control_pending(self) -> bool:
        """A RESET_STREAM or STREAM_DATA_BLOCKED frame is waiting (a peek: nothing is consumed)."""
        if self._reset_pending:
            return True
        if self.reset_error_code is not None:
            return False
        limit = self._max_stream_data
        return (self._send_offset >= limit and self._write_offset > self._send_offset
                and (self._blocked_sent_at != limit or self._blocked_pending))

    def blocked_frame(self) -> int | None:
        """Limit for a STREAM_DATA_BLOCKED frame when data waits on the peer's stream limit (once per limit)."""
        if self.reset_error_code is not None:
            return None
        limit = self._max_stream_data
        if self._send_offset >= limit and self._write_offset > self._send_offset:
            if self._blocked_sent_at != limit or self._blocked_pending:
                self._blocked_sent_at = limit
                self._blocked_pending = False
                return limit
        return None

    def on_blocked_delivered(self, delivered: bool, value: int) -> None:
        """Optional: repeat a lost STREAM_DATA_BLOCKED if still blocked at that limit."""
        if not delivered and value == self._max_stream_data and self.reset_error_code is None:
            self._blocked_pending = True

    # -- RESET_STREAM ----------------------------------------------------------------------------------------------

    def reset_frame(self) -> tuple[int, int] | None:
        """(error_code, final_size) for a RESET_STREAM frame to send now, or None."""
        if not self._reset_pending:
            return None
        self._reset_pending = False
        return self.reset_error_code, self._reset_final_size  # type: ignore[return-value]

    def on_reset_delivered(self, delivered: bool) -> None:
        if delivered:
            self._reset_acked = True
            self._reset_pending = False
        elif not self._reset_acked:
            self._reset_pending = True


# ---------------------------------------------------------------------------------------------------------------
# stream
# ---------------------------------------------------------------------------------------------------------------


class QuicStream:
    """A stream: a sending part, a receiving part, or both (RFC 9000 §2, §3)."""

    __slots__ = ("stream_id", "is_local", "sender", "receiver")

    def __init__(
        self, stream_id: int, *, is_local: bool, max_stream_data_local: int, max_stream_data_remote: int
    ) -> None:
        """``max_stream_data_local``: the limit we advertise for this stream (receiving part);
        ``max_stream_data_remote``: the peer's limit for it (sending part)."""
        self.stream_id = stream_id
        self.is_local = is_local
        uni = stream_is_unidirectional(stream_id)
        self.sender: StreamSender | None = (
            StreamSender(stream_id, max_stream_data_remote) if not uni or is_local else None
        )
        self.receiver: StreamReceiver | None = (
            StreamReceiver(stream_id, max_stream_data_local) if not uni or not is_local else None
        )

    @property
    def is_unidirectional(self) -> bool:
        return stream_is_unidirectional(self.stream_id)

    @property
    def is_finished(self) -> bool:
        """Both existing halves are done: the connection may forget the stream."""
        sender, receiver = self.sender, self.receiver
        return (sender is None or sender.is_finished) and (receiver is None or receiver.is_finished)

    def __repr__(self) -> str:
        return f"QuicStream({self.stream_id}, local={self.is_local})"
