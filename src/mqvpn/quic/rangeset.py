"""Sorted, disjoint, half-open integer ranges: received packet numbers and ACK ranges."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator


class RangeSet:
    """Ranges ``[start, stop)`` kept sorted ascending and merged.

    Optimised for the common case of packet numbers arriving in order (append to / extend the last range).
    """

    __slots__ = ("_starts", "_stops")

    def __init__(self, ranges: list[tuple[int, int]] | None = None) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        if ranges:
            for start, stop in ranges:
                self.add(start, stop)

    def add(self, start: int, stop: int | None = None) -> None:
        """Add ``[start, stop)`` (``stop`` defaults to ``start + 1``)."""
        if stop is None:
            stop = start + 1
        if stop <= start:
            return
        starts, stops = self._starts, self._stops
        # fast path: at or after the end of the last range
        if not starts or start > stops[-1]:
            starts.append(start)
            stops.append(stop)
            return
        if start >= starts[-1]:
            if stop > stops[-1]:
                stops[-1] = stop
            return
        # general case: find the first range whose stop >= start
        i = bisect_left(stops, start)
        j = i
        new_start, new_stop = start, stop
        while j < len(starts) and starts[j] <= stop:
            if starts[j] < new_start:
                new_start = starts[j]
            if stops[j] > new_stop:
                new_stop = stops[j]
            j += 1
        starts[i:j] = [new_start]
        stops[i:j] = [new_stop]

    def subtract(self, start: int, stop: int) -> None:
        """Remove ``[start, stop)``."""
        if stop <= start or not self._starts:
            return
        new_starts: list[int] = []
        new_stops: list[int] = []
        for s, e in zip(self._starts, self._stops):
            if e <= start or s >= stop:
                new_starts.append(s)
                new_stops.append(e)
                continue
            if s < start:
                new_starts.append(s)
                new_stops.append(start)
            if e > stop:
                new_starts.append(stop)
                new_stops.append(e)
        self._starts, self._stops = new_starts, new_stops

    def shift(self) -> tuple[int, int]:
        """Remove and return the lowest range."""
        return self._starts.pop(0), self._stops.pop(0)

    def __contains__(self, value: int) -> bool:
        i = bisect_left(self._stops, value + 1)
        return i < len(self._starts) and self._starts[i] <= value

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._stops)

    def __reversed__(self) -> Iterator[tuple[int, int]]:
        return zip(reversed(self._starts), reversed(self._stops))

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return self._starts[index], self._stops[index]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"RangeSet({list(self)!r})"

    @property
    def smallest(self) -> int:
        return self._starts[0]

    @property
    def largest(self) -> int:
        """Largest value contained (stop - 1 of the last range)."""
        return self._stops[-1] - 1

    def trim_below(self, value: int) -> None:
        """Forget everything below ``value`` (bounds the state an ACK frame describes)."""
        while self._starts and self._stops[0] <= value:
            self._starts.pop(0)
            self._stops.pop(0)
        if self._starts and self._starts[0] < value:
            self._starts[0] = value
