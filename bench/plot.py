"""Log-log line charts drawn with Pillow (no matplotlib): one or more panels side by side."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from stvit.files import atomic_path

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
PANEL_W, PANEL_H = 560, 420
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 70, 20, 40, 55


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]  # (x, y), both > 0; non-positive points are skipped
    dashed: bool = False
    colour: int | None = None  # index into COLOURS; default: the series' position


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)


def save_loglog(panels: Sequence[Panel], path: str | os.PathLike, title: str = "") -> None:
    """Draw ``panels`` side by side with log10 axes and a legend each; write a PNG atomically.

    Pillow's default font covers ASCII only: keep titles and labels ASCII."""
    top = 30 if title else 0
    img = Image.new("RGB", (PANEL_W * len(panels), PANEL_H + top), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    if title:
        draw.text((10, 8), title, fill="black", font=font)
    for i, panel in enumerate(panels):
        _draw_panel(draw, font, panel, i * PANEL_W, top)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def _decades(lo: float, hi: float) -> tuple[int, int]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    return a, max(b, a + 1)


def _draw_panel(draw: ImageDraw.ImageDraw, font, panel: Panel, x0: int, y0: int) -> None:
    pts = [p for s in panel.series for p in s.points if p[0] > 0 and p[1] > 0]
    left, right = x0 + MARGIN_L, x0 + PANEL_W - MARGIN_R
    top, bottom = y0 + MARGIN_T, y0 + PANEL_H - MARGIN_B
    draw.text((left, y0 + 12), panel.title, fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) // 2 - 3 * len(panel.xlabel), bottom + 30), panel.xlabel, fill="black", font=font)
    draw.text((x0 + 4, top - 14), panel.ylabel, fill="black", font=font)
    if not pts:
        draw.text((left + 10, top + 10), "no data", fill="black", font=font)
        return
    (xa, xb), (ya, yb) = _decades(min(p[0] for p in pts), max(p[0] for p in pts)), \
        _decades(min(p[1] for p in pts), max(p[1] for p in pts))

    def to_px(x: float, y: float) -> tuple[float, float]:
        fx = (math.log10(x) - xa) / (xb - xa)
        fy = (math.log10(y) - ya) / (yb - ya)
        return left + fx * (right - left), bottom - fy * (bottom - top)

    for d in range(xa, xb + 1):  # decade grid lines and labels
        px = to_px(10.0 ** d, 10.0 ** ya)[0]
        draw.line([px, top, px, bottom], fill=(225, 225, 225))
        draw.text((px - 10, bottom + 6), f"1e{d}", fill="black", font=font)
    for d in range(ya, yb + 1):
        py = to_px(10.0 ** xa, 10.0 ** d)[1]
        draw.line([left, py, right, py], fill=(225, 225, 225))
        draw.text((left - 38, py - 6), f"1e{d}", fill="black", font=font)

    for k, s in enumerate(panel.series):
        colour = COLOURS[(k if s.colour is None else s.colour) % len(COLOURS)]
        xy = [to_px(x, y) for x, y in s.points if x > 0 and y > 0]
        for a, b in zip(xy, xy[1:]):
            _line(draw, a, b, colour, s.dashed)
        for px, py in xy:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = top + 8 + 14 * k  # legend, top-left inside the axes
        _line(draw, (left + 8, ly + 6), (left + 30, ly + 6), colour, s.dashed)
        draw.text((left + 36, ly), s.label, fill=colour, font=font)


def _line(draw, a, b, colour, dashed: bool) -> None:
    if not dashed:
        draw.line([a, b], fill=colour, width=2)
        return
    n = max(1, int(math.dist(a, b) // 8))
    for i in range(0, n, 2):
        t0, t1 = i / n, min(1.0, (i + 1) / n)
        draw.line([(a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0),
                   (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)], fill=colour, width=2)
