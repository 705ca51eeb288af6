"""qlog writer (draft-ietf-quic-qlog-main-schema, JSON-SEQ serialisation, QUIC event names).

One ``QlogTrace`` per connection. The connection only calls it behind ``if qlog is not None``, so a disabled qlog
costs one attribute test on the paths that log.
"""

from __future__ import annotations

import json
from typing import IO, Any

RECORD_SEPARATOR = "\x1e"


class QlogTrace:
    def __init__(self, stream: IO[str], *, vantage_point: str, odcid: bytes = b"", title: str = "mqvpn",
                 start_time: float = 0.0) -> None:
        self._stream = stream
        self._start = start_time
        header = {
            "file_schema": "urn:ietf:params:qlog:file:sequential",
            "serialization_format": "application/qlog+json-seq",
            "qlog_version": "0.4",
            "qlog_format": "JSON-SEQ",
            "title": title,
            "trace": {
                "vantage_point": {"type": vantage_point},
                "common_fields": {"ODCID": odcid.hex(), "time_format": "relative_to_epoch",
                                  "reference_time": {"clock_type": "monotonic", "epoch": "unknown"}},
                "event_schemas": ["urn:ietf:params:qlog:events:quic", "urn:ietf:params:qlog:events:recovery"],
            },
        }
        self._write(header)

    def set_start_time(self, now: float) -> None:
        self._start = now

    def event(self, now: float, name: str, data: dict[str, Any]) -> None:
        self._write({"time": round((now - self._start) * 1000.0, 3), "name": name, "data": data})

    def _write(self, record: dict) -> None:
        self._stream.write(RECORD_SEPARATOR + json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        try:
            self._stream.flush()
        finally:
            self._stream.close()


def read_qlog(text: str) -> list[dict]:
    """Parse a JSON-SEQ qlog (used by tests and tools)."""
    return [json.loads(chunk) for chunk in text.split(RECORD_SEPARATOR) if chunk.strip()]
