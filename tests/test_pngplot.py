"""bench/pngplot.py: the dependency-free PNG line plot writer used by the benches."""

from __future__ import annotations

import importlib.util
import math
import struct
import sys
import zlib
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("bench_pngplot", Path(__file__).resolve().parents[1] / "bench" / "pngplot.py")
pngplot = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_pngplot"] = pngplot  # dataclasses look their module up there
_SPEC.loader.exec_module(pngplot)


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """Check the file's structure (signature, chunk CRCs, IHDR, filter bytes) and return width, height, rows."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, ctype, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width)
    stride = 1 + 3 * width
    rows = [raw[y * stride : (y + 1) * stride] for y in range(height)]
    assert all(row[0] == 0 for row in rows)  # filter type 0 everywhere
    return width, height, [row[1:] for row in rows]


def pixel(rows: list[bytes], x: int, y: int) -> tuple[int, int, int]:
    return tuple(rows[y][3 * x : 3 * x + 3])


def test_valid_png_with_requested_size(tmp_path):
    out = tmp_path / "p.png"
    pngplot.plot_lines(str(out), [("a", [0, 1, 2], [0, 1, 4])], title="Title 1", xlabel="t (s)", ylabel="Mbit/s",
                       vlines=[(1.5, "fault")], width=640, height=360)
    width, height, rows = read_png(out)
    assert (width, height) == (640, 360)
    assert len(rows) == 360 and all(len(r) == 3 * 640 for r in rows)


def test_series_pixels_in_their_colour_where_expected(tmp_path):
    out = tmp_path / "lines.png"
    flat = ("flat", [0, 10], [5, 5])
    diag = ("diag", [0, 10], [0, 10])
    frame = pngplot.plot_lines(str(out), [flat, diag], title="known", xlabel="x", ylabel="y")
    _, _, rows = read_png(out)
    blue, orange = pngplot.PALETTE[0], pngplot.PALETTE[1]
    assert blue != orange
    for x in (1, 3, 7, 9):  # the flat line y=5 (legend is top right, far from it)
        assert pixel(rows, *frame.px(x, 5)) == blue
    for v in (1, 2, 3, 4, 6, 8):  # the diagonal, drawn after (on top)
        assert pixel(rows, *frame.px(v, v)) == orange
    # nowhere near the lines: neither colour
    for x, y in ((2, 8), (8, 1.5), (5, 1)):
        assert pixel(rows, *frame.px(x, y)) not in (blue, orange)
    # the axes: left edge of the plot area is black along its height
    c, r = frame.px(0, 0)
    assert pixel(rows, c, r - 20) == (0, 0, 0)
    assert frame.y0 <= 0 and frame.y1 >= 10


def test_vertical_marker_line_drawn(tmp_path):
    out = tmp_path / "v.png"
    frame = pngplot.plot_lines(str(out), [("a", [0, 10], [1, 1])], vlines=[(4, "fault")])
    _, _, rows = read_png(out)
    c, _ = frame.px(4, 0)
    column = [pixel(rows, c, y) for y in range(frame.top, frame.bottom)]
    assert column.count(pngplot.VLINE) > (frame.bottom - frame.top) // 3  # dashed


@pytest.mark.parametrize(
    "series",
    [
        [],
        [("empty", [], [])],
        [("one", [3], [7])],
        [("flat", [0, 1, 2], [2, 2, 2])],
        [("all nan", [0, 1], [math.nan, math.nan])],
        [("none", [0, 1, 2], [None, 1, None])],
        [("inf", [0, 1, 2], [1, math.inf, -math.inf])],
        [("neg", [-5, -1], [-3, -8]), ("empty", [], [])],
    ],
)
def test_degenerate_series_do_not_crash(tmp_path, series):
    out = tmp_path / "d.png"
    pngplot.plot_lines(str(out), series, title="degenerate", vlines=[(1, "x")])
    width, height, _ = read_png(out)
    assert (width, height) == (900, 500)


def test_single_point_drawn_as_marker(tmp_path):
    out = tmp_path / "one.png"
    frame = pngplot.plot_lines(str(out), [("one", [3], [7])])
    _, _, rows = read_png(out)
    assert pixel(rows, *frame.px(3, 7)) == pngplot.PALETTE[0]


def test_nan_values_are_skipped(tmp_path):
    out = tmp_path / "nan.png"
    xs = list(range(11))
    ys = [5.0] * 11
    ys[5] = math.nan  # the line breaks around x=5: segments 4-5 and 5-6 are missing
    frame = pngplot.plot_lines(str(out), [("gap", xs, ys), ("nan x", [math.nan, 1, 2], [1, 1, 1])])
    _, _, rows = read_png(out)
    blue = pngplot.PALETTE[0]
    assert pixel(rows, *frame.px(2.5, 5)) == blue
    assert pixel(rows, *frame.px(8.5, 5)) == blue
    assert pixel(rows, *frame.px(4.5, 5)) != blue
    assert pixel(rows, *frame.px(5.5, 5)) != blue
    assert pixel(rows, *frame.px(1.5, 1)) == pngplot.PALETTE[1]  # the finite part of the second series
    assert math.isfinite(frame.y1) and math.isfinite(frame.x1)


def test_font_covers_digits_letters_and_symbols():
    for ch in "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-+:/%()_=<>[],#*?!'| ":
        assert len(pngplot.FONT[ch]) == 7 and all(0 <= r < 32 for r in pngplot.FONT[ch])
    assert any(pngplot.FONT["8"])


def test_ticks_are_nice():
    values, decimals = pngplot.ticks(0, 97)
    assert values[0] == 0 and all(v % 10 == 0 for v in values) and decimals == 0
    values, decimals = pngplot.ticks(-1, 1)
    assert 0 in [round(v, 9) for v in values] and decimals >= 1
