"""A tiny line-plot writer producing PNG files with nothing but the standard library (zlib + struct).

    from pngplot import plot_lines
    plot_lines("out.png", [("tunnel", xs, ys), ("path A", xs, ys_a)], title="Failover", xlabel="t (s)",
               ylabel="Mbit/s", vlines=[(4.0, "fault"), (9.0, "heal")])

RGB, 8 bits per channel, every scanline with filter 0 (none).  Axes with tick marks and labels, light grid
lines, a legend, dashed vertical marker lines, a distinct colour per series, and a built-in 5x7 bitmap font
(digits, ASCII letters and a few symbols; anything else is drawn as "?").  Non-finite values (NaN, inf,
None) are skipped: the line breaks there; a point with no finite neighbour is drawn as a small square.
:func:`plot_lines` returns the :class:`Frame` it used, whose :meth:`Frame.px` maps data to pixel coordinates.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Colours (tab10-like), in the order series get them; then they repeat.
PALETTE: list[tuple[int, int, int]] = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (23, 190, 207), (188, 189, 34), (127, 127, 127),
]
WHITE, BLACK, GRID, VLINE = (255, 255, 255), (0, 0, 0), (225, 225, 225), (90, 90, 90)

# 5x7 glyphs: a character, then its 7 rows as base-32 digits (bit 4 = leftmost pixel).
_FONT_DATA = (
    "0ehjlphe14c4444e2eh1248v3v2421he426aiv225vgu11he668guhhe7v1248888ehhehhe9ehhf12cAehhvhhhBuhhuhhu"
    "CehgggheDsihhhisEvgguggvFvggugggGehgnhhfHhhhvhhhIe44444eJ72222icKhikokihLggggggvMhrllhhhNhhpljhh"
    "OehhhhhePuhhugggQehhhlidRuhhukihSfgge11uTv444444UhhhhhheVhhhhha4WhhhlllaXhha4ahhYhha4444Zv1248gv"
    "a00e1fhfbggmphhuc00egghed11djhhfe00ehvgef698s888gfhhjd1ehggmphhhi40c444ej20622ickggikokilc44444e"
    "m00qllhhn00mphhho00ehhhepuhhhuggqfhhhf11r00mpgggs00ege1ut88s8896u00hhhjdv00hhha4w00hhllax00ha4ah"
    "yhhhhf1ez00v248v.00000cc-000v000+044v440:0cc0cc0/01248g0%op248j3(2488842)8422248,0000c48_000000v"
    "=00v0v00<248g842>8421248[e88888e]e22222e#aavavaa*04lel40?eh12404!4444404'4480000|4444444"
)
FONT: dict[str, list[int]] = {
    _FONT_DATA[i]: [int(c, 32) for c in _FONT_DATA[i + 1 : i + 8]] for i in range(0, len(_FONT_DATA), 8)
}
FONT[" "] = [0] * 7
DESCENDERS = "gpqy"  # drawn 2 pixels lower (their 7 rows start at the x-height)
CHAR_W, CHAR_H, ADVANCE = 5, 7, 6


class Canvas:
    def __init__(self, width: int, height: int, bg: tuple[int, int, int] = WHITE):
        self.width, self.height = width, height
        self.pix = bytearray(bytes(bg) * (width * height))
        self.clip = (0, 0, width - 1, height - 1)  # left, top, right, bottom (inclusive)

    def set(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        left, top, right, bottom = self.clip
        if left <= x <= right and top <= y <= bottom:
            i = 3 * (y * self.width + x)
            self.pix[i : i + 3] = bytes(color)

    def get(self, x: int, y: int) -> tuple[int, int, int]:
        i = 3 * (y * self.width + x)
        return tuple(self.pix[i : i + 3])  # type: ignore[return-value]

    def rect(self, x0: int, y0: int, x1: int, y1: int, color, fill: bool = True) -> None:
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                if fill or y in (y0, y1) or x in (x0, x1):
                    self.set(x, y, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color, thick: bool = False, dash: int = 0) -> None:
        """Bresenham; ``thick``: a plus-shaped brush (so the pixel nearest to any point of the segment is
        painted); ``dash`` n: n pixels on, n off."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err, n = dx + dy, 0
        while True:
            if not dash or (n // dash) % 2 == 0:
                self.set(x0, y0, color)
                if thick:
                    for ox, oy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        self.set(x0 + ox, y0 + oy, color)
            if x0 == x1 and y0 == y1:
                return
            n += 1
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, color=BLACK, scale: int = 1, vertical: bool = False) -> None:
        """Text with its top-left corner at (x, y); ``vertical``: rotated 90 degrees counter-clockwise,
        reading bottom to top, (x, y) being the bottom-left corner."""
        for k, ch in enumerate(s):
            rows = FONT.get(ch, FONT["?"])
            drop = 2 if ch in DESCENDERS else 0
            for r, bits in enumerate(rows):
                for c in range(CHAR_W):
                    if bits & (1 << (CHAR_W - 1 - c)):
                        u, v = (k * ADVANCE + c) * scale, (r + drop) * scale  # along / across the text
                        for i in range(scale):
                            for j in range(scale):
                                if vertical:
                                    self.set(x + v + j, y - u - i, color)
                                else:
                                    self.set(x + u + i, y + v + j, color)

    def png(self) -> bytes:
        row = 3 * self.width
        raw = b"".join(b"\x00" + bytes(self.pix[y * row : (y + 1) * row]) for y in range(self.height))
        return encode_png(self.width, self.height, raw)


def text_width(s: str, scale: int = 1) -> int:
    return max(0, len(s) * ADVANCE - 1) * scale


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(width: int, height: int, filtered_rows: bytes) -> bytes:
    """A PNG of 8-bit RGB from the scanlines, each already prefixed with its filter byte."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(filtered_rows, 6))
            + _chunk(b"IEND", b""))


def nice_step(span: float, target: int = 6) -> float:
    raw = span / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def ticks(lo: float, hi: float, target: int = 6) -> tuple[list[float], int]:
    """Tick values in [lo, hi] at a nice step, and the decimals their labels need."""
    step = nice_step(hi - lo, target)
    decimals = next((d for d in range(12) if abs(round(step, d) - step) < step * 1e-6), 12)
    first = math.ceil(lo / step - 1e-9)
    values = [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]
    return values, decimals


def _fmt(v: float, decimals: int) -> str:
    s = f"{v:.{decimals}f}"
    return "0" if s.strip("-0.") == "" else s


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


@dataclass
class Frame:
    """The plot area in pixels (inclusive) and the data range it shows."""

    left: int
    top: int
    right: int
    bottom: int
    x0: float
    x1: float
    y0: float
    y1: float

    def px(self, x: float, y: float) -> tuple[int, int]:
        """Pixel (column, row) of the data point (x, y)."""
        col = self.left + (x - self.x0) / (self.x1 - self.x0) * (self.right - self.left)
        row = self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)
        return round(col), round(row)


def _range(values: Iterable[float], pad_zero: bool) -> tuple[float, float]:
    vals = [v for v in values if _finite(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    if pad_zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - max(0.5, abs(lo) * 0.1), hi + max(0.5, abs(hi) * 0.1)
    return float(lo), float(hi)


def plot_lines(
    path: str,
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    vlines: Sequence[tuple[float, str]] = (),
    width: int = 900,
    height: int = 500,
) -> Frame:
    """Write a line plot of ``series`` (label, xs, ys) to the PNG file ``path``; returns the Frame used.
    The y axis includes 0 and ends on ticks; the x axis spans the data and the vlines."""
    if width < 200 or height < 150:
        raise ValueError("the plot needs at least 200x150 pixels")
    pts = [[(x, y) for x, y in zip(xs, ys, strict=False)] for _, xs, ys in series]
    x0, x1 = _range([x for s in pts for x, y in s if _finite(y)] + [x for x, _ in vlines], pad_zero=False)
    y0, y1 = _range([y for s in pts for x, y in s if _finite(x)], pad_zero=True)
    step = nice_step(y1 - y0)
    y0, y1 = min(y0, math.floor(y0 / step + 1e-9) * step), max(y1, math.ceil(y1 / step - 1e-9) * step)
    yt, ydec = ticks(y0, y1)
    xt, xdec = ticks(x0, x1, 8)
    ylabels = [_fmt(v, ydec) for v in yt]
    left = (16 if ylabel else 4) + max(text_width(s) for s in ylabels) + 10
    f = Frame(left, 34 if title else 14, width - 20, height - (42 if xlabel else 26), x0, x1, y0, y1)
    cv = Canvas(width, height)
    if title:
        cv.text((width - text_width(title, 2)) // 2, 8, title, scale=2)
    for v, s in zip(yt, ylabels, strict=True):  # y ticks, labels, grid
        _, r = f.px(x0, v)
        cv.line(f.left + 1, r, f.right, r, GRID)
        cv.line(f.left - 5, r, f.left - 1, r, BLACK)
        cv.text(f.left - 8 - text_width(s), r - 3, s)
    for v in xt:
        c, _ = f.px(v, y0)
        cv.line(c, f.bottom + 1, c, f.bottom + 5, BLACK)
        s = _fmt(v, xdec)
        cv.text(c - text_width(s) // 2, f.bottom + 8, s)
    if xlabel:
        cv.text((f.left + f.right - text_width(xlabel)) // 2, height - 14, xlabel)
    if ylabel:
        cv.text(4, (f.top + f.bottom + text_width(ylabel)) // 2, ylabel, vertical=True)
    cv.clip = (f.left + 1, f.top, f.right, f.bottom - 1)
    for k, (x, label) in enumerate(vlines):
        if _finite(x):
            c, _ = f.px(x, y0)
            cv.line(c, f.top, c, f.bottom, VLINE, dash=4)
            cv.text(c + 3, f.top + 2 + 9 * (k % 3), label, VLINE)
    for k, s in enumerate(pts):
        color = PALETTE[k % len(PALETTE)]
        prev = None
        for i, (x, y) in enumerate(s):
            if not (_finite(x) and _finite(y)):
                prev = None
                continue
            p = f.px(x, y)
            if prev is not None:
                cv.line(*prev, *p, color, thick=True)
            else:
                nxt = s[i + 1] if i + 1 < len(s) else (None, None)
                if not (_finite(nxt[0]) and _finite(nxt[1])):
                    cv.rect(p[0] - 1, p[1] - 1, p[0] + 1, p[1] + 1, color)  # isolated point
            prev = p
    cv.clip = (0, 0, width - 1, height - 1)
    cv.line(f.left, f.top, f.left, f.bottom, BLACK)  # axes
    cv.line(f.left, f.bottom, f.right, f.bottom, BLACK)
    if series:  # legend, top right inside the plot
        lw = max(text_width(label) for label, _, _ in series) + 30
        lx, ly = f.right - lw - 6, f.top + 6
        cv.rect(lx, ly, lx + lw, ly + 10 * len(series) + 5, WHITE)
        cv.rect(lx, ly, lx + lw, ly + 10 * len(series) + 5, (160, 160, 160), fill=False)
        for k, (label, _, _) in enumerate(series):
            yy = ly + 4 + 10 * k
            cv.rect(lx + 5, yy + 2, lx + 19, yy + 4, PALETTE[k % len(PALETTE)])
            cv.text(lx + 24, yy, label)
    with open(path, "wb") as fh:
        fh.write(cv.png())
    return f
