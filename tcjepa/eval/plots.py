"""Small PNG charts drawn with PIL alone (matplotlib is not a dependency): line plots for
training curves, grouped bars for accuracies, confusion matrices and segmentation maps.

Each function takes plain Python numbers, writes one PNG and returns its path; none keeps state.
They are deliberately plain (axes, ticks, a legend) so that a report reads the same on any
machine without a plotting stack.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
MARGIN = (70, 40, 20, 56)  # left, top, right, bottom


def _font(size: int = 13):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (1, 2, 5 x 10^k steps)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], start
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 12))
        v += step
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """Round ticks for a log axis over [lo, hi]: powers of ten, with 2 and 5 (or every digit)
    in between when the range spans too few decades to show three ticks."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks: list[float] = []
    for mantissas in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = [m * 10.0 ** e for e in decades for m in mantissas if lo <= m * 10.0 ** e <= hi]
        if len(ticks) >= 3:
            break
    return ticks


def tick_label(v: float) -> str:
    """A tick's text: steps in full (``1,500``: one significant digit turned 1,500 into 2e+03),
    other large and small values in three significant digits."""
    if v == 0:
        return "0"
    if 1000 <= abs(v) < 1e6 and float(v).is_integer():
        return f"{int(v):,}"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.3g}"
    return f"{v:.4g}"


class _Axes:
    """Maps data coordinates to pixels inside the plot area of a canvas and draws the frame."""

    def __init__(self, size: tuple[int, int], xlim: tuple[float, float], ylim: tuple[float, float], log_y: bool = False):
        from PIL import Image, ImageDraw

        self.image = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.image)
        self.left, self.top = MARGIN[0], MARGIN[1]
        self.right, self.bottom = size[0] - MARGIN[2], size[1] - MARGIN[3]
        self.log_y = log_y
        self.xlim = xlim if xlim[1] > xlim[0] else (xlim[0] - 0.5, xlim[0] + 0.5)
        lo, hi = (math.log10(v) for v in ylim) if log_y else ylim
        self.ylim = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)

    def x(self, v: float) -> float:
        lo, hi = self.xlim
        return self.left + (v - lo) / (hi - lo) * (self.right - self.left)

    def y(self, v: float) -> float:
        v = math.log10(v) if self.log_y else v
        lo, hi = self.ylim
        return self.bottom - (v - lo) / (hi - lo) * (self.bottom - self.top)

    def frame(self, title: str, xlabel: str, ylabel: str, xticks: bool = True) -> None:
        d, f = self.draw, _font(12)
        d.rectangle([self.left, self.top, self.right, self.bottom], outline=(60, 60, 60))
        yt = log_ticks(10 ** self.ylim[0], 10 ** self.ylim[1]) if self.log_y else nice_ticks(*self.ylim)
        for t in yt:
            lt = math.log10(t) if self.log_y else t
            if not self.ylim[0] - 1e-9 <= lt <= self.ylim[1] + 1e-9:
                continue
            py = self.y(t)
            d.line([self.left, py, self.right, py], fill=(230, 230, 230))
            d.line([self.left - 4, py, self.left, py], fill=(60, 60, 60))
            label = tick_label(t)
            w = d.textlength(label, font=f)
            d.text((self.left - 6 - w, py - 7), label, fill="black", font=f)
        if xticks:
            for t in nice_ticks(*self.xlim, n=6):
                px = self.x(t)
                if self.left - 1e-6 <= px <= self.right + 1e-6:
                    d.line([px, self.bottom, px, self.bottom + 4], fill=(60, 60, 60))
                    label = tick_label(t)
                    d.text((px - d.textlength(label, font=f) / 2, self.bottom + 6), label, fill="black", font=f)
        tf = _font(15)
        d.text(((self.left + self.right - d.textlength(title, font=tf)) / 2, 12), title, fill="black", font=tf)
        d.text(((self.left + self.right - d.textlength(xlabel, font=f)) / 2, self.bottom + 24), xlabel, fill="black", font=f)
        d.text((6, self.top - 18), ylabel, fill="black", font=f)

    def legend(self, names: Sequence[str], line_entry: str = "") -> None:
        """Colour swatches for ``names`` (palette order), then ``line_entry`` with a black line."""
        d, f = self.draw, _font(12)
        entries = list(names) + ([line_entry] if line_entry else [])
        width = max((d.textlength(n, font=f) for n in entries), default=0) + 30
        x0, y0 = self.right - width - 8, self.top + 8
        d.rectangle([x0, y0, self.right - 8, y0 + 18 * len(entries) + 6], fill="white", outline=(180, 180, 180))
        for i, name in enumerate(entries):
            y = y0 + 6 + 18 * i
            if i < len(names):
                d.rectangle([x0 + 6, y + 3, x0 + 20, y + 11], fill=PALETTE[i % len(PALETTE)])
            else:
                d.line([x0 + 5, y + 7, x0 + 21, y + 7], fill="black", width=2)
            d.text((x0 + 25, y - 1), name, fill="black", font=f)


def _wrap(text: str, width: float, draw, font) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` pixels wide."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, title: str,
              xlabel: str = "step", ylabel: str = "", log_y: bool = False, size: tuple[int, int] = (760, 440)) -> Path:
    """One line per entry of ``series`` (name -> (xs, ys)); non-finite (and, on a log axis,
    non-positive) points are left out."""
    clean = {}
    for name, (xs, ys) in series.items():
        pts = [(float(x), float(y)) for x, y in zip(xs, ys)
               if math.isfinite(float(x)) and math.isfinite(float(y)) and (not log_y or float(y) > 0)]
        if pts:
            clean[name] = pts
    allx = [p[0] for pts in clean.values() for p in pts] or [0.0, 1.0]
    ally = [p[1] for pts in clean.values() for p in pts] or [1.0, 2.0]
    lo, hi = min(ally), max(ally)
    if not log_y:
        pad = 0.05 * (hi - lo or abs(hi) or 1.0)
        lo, hi = lo - pad, hi + pad
    ax = _Axes(size, (min(allx), max(allx)), (lo, hi), log_y)
    ax.frame(title, xlabel, ylabel)
    for i, pts in enumerate(clean.values()):
        c = PALETTE[i % len(PALETTE)]
        xy = [(ax.x(x), ax.y(y)) for x, y in pts]
        if len(xy) == 1:
            ax.draw.ellipse([xy[0][0] - 3, xy[0][1] - 3, xy[0][0] + 3, xy[0][1] + 3], fill=c)
        else:
            ax.draw.line(xy, fill=c, width=2)
    ax.legend(list(clean))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ax.image.save(path)
    return path


def bar_plot(categories: Sequence[str], series: dict[str, Sequence[float | None]], path: str | Path, title: str,
             ylabel: str = "accuracy", ylim: tuple[float, float] = (0.0, 1.0),
             markers: Sequence[float | None] | None = None, marker_name: str = "") -> Path:
    """Grouped bars: one group per category, one bar per series (None = no bar). ``markers``
    draws a black tick per category (e.g. the majority-class accuracy) named ``marker_name``."""
    n = max(len(series), 1)
    width = max(760, MARGIN[0] + MARGIN[2] + len(categories) * (22 * n + 30))
    ax = _Axes((width, 460), (0.0, float(max(len(categories), 1))), ylim)
    ax.frame(title, "", ylabel, xticks=False)
    d, f = ax.draw, _font(12)
    group = (ax.right - ax.left) / max(len(categories), 1)
    bar = min(40.0, 0.8 * group / n)
    for ci, cat in enumerate(categories):
        x0 = ax.left + ci * group + (group - bar * n) / 2
        for si, values in enumerate(series.values()):
            v = values[ci]
            if v is None or not math.isfinite(v):
                continue
            top = ax.y(min(max(v, ylim[0]), ylim[1]))
            d.rectangle([x0 + si * bar, top, x0 + (si + 1) * bar - 2, ax.bottom], fill=PALETTE[si % len(PALETTE)])
        if markers is not None and markers[ci] is not None:
            my = ax.y(markers[ci])
            d.line([x0 - 4, my, x0 + bar * n + 2, my], fill="black", width=2)
        for li, line in enumerate(_wrap(cat, group - 4, d, f)[:2]):
            d.text((ax.left + ci * group + (group - d.textlength(line, font=f)) / 2, ax.bottom + 6 + 14 * li), line,
                   fill="black", font=f)
    ax.legend(list(series), marker_name if markers is not None else "")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ax.image.save(path)
    return path


def confusion_plot(matrix: Sequence[Sequence[int]], names: Sequence[str], path: str | Path, title: str) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted) as a heat map,
    with the row-normalised value printed in each cell while cells are large enough to read."""
    from PIL import Image, ImageDraw

    k = len(matrix)
    cell = max(2, min(48, 640 // max(k, 1)))
    show_names = cell >= 10
    f = _font(11 if cell >= 24 else 9)
    label_w = int(max((ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=f) for n in names), default=0)) + 10
    label_w = label_w if show_names else 10
    left, top = label_w + 24, 40 + (label_w if show_names else 10)
    footer = "columns: predicted class; rows: true class (row-normalised)"
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(probe.textlength(footer, font=_font(11)), probe.textlength(title, font=_font(14)))
    size = (int(max(left + k * cell + 20, text_w + 30)), top + k * cell + 30)
    image = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(image)
    tf = _font(14)
    d.text((10, 10), title, fill="black", font=tf)
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        for j, v in enumerate(row):
            frac = v / total
            shade = int(255 * (1 - frac))
            colour = (shade, shade, 255) if i != j else (shade, 255, shade)
            x0, y0 = left + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=(220, 220, 220) if cell >= 6 else None)
            if cell >= 24 and v:
                text = f"{frac:.2f}"
                d.text((x0 + (cell - d.textlength(text, font=f)) / 2, y0 + cell / 2 - 6), text,
                       fill="white" if frac > 0.6 else "black", font=f)
    if show_names:
        for i, name in enumerate(names):
            d.text((left - 6 - d.textlength(name, font=f), top + i * cell + cell / 2 - 6), name, fill="black", font=f)
            col = Image.new("RGB", (label_w, cell), "white")
            ImageDraw.Draw(col).text((4, cell / 2 - 6), name, fill="black", font=f)
            col = col.rotate(90, expand=True)
            image.paste(col, (left + i * cell, top - label_w - 2))
    d.text((10, top + k * cell + 8), footer, fill="black", font=_font(11))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def class_colour(c: int) -> tuple[int, int, int]:
    """The fixed colour of segmentation class ``c``: black for 0 (background), the palette for
    1-10, golden-ratio hues beyond, white for 255 (ignore), so every plot colours a class alike."""
    import colorsys

    if c == 255:
        return (255, 255, 255)
    if c == 0:
        return (0, 0, 0)
    if c <= len(PALETTE):
        return PALETTE[c - 1]
    r, g, b = colorsys.hsv_to_rgb((c * 0.618034) % 1.0, 0.65, 0.9)
    return (int(r * 255), int(g * 255), int(b * 255))


def _coloured(label_map: Any, scale: int):
    """A [H, W] array of class ids -> an RGB PIL image ``scale`` times larger (nearest)."""
    import numpy as np
    from PIL import Image

    ids = np.asarray(label_map, dtype=np.uint8)
    lut = np.array([class_colour(c) for c in range(256)], dtype=np.uint8)
    image = Image.fromarray(lut[ids])
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def segmentation_plot(images: Sequence[Any], predictions: Sequence[Any], truths: Sequence[Any], names: Sequence[str],
                      path: str | Path, title: str) -> Path:
    """One row per sample: the image ([H, W, 3] uint8), the predicted and the true map ([H, W]
    class ids, coloured by :func:`class_colour`), and a legend of the classes they show."""
    import numpy as np
    from PIL import Image, ImageDraw

    h, w = np.asarray(truths[0]).shape
    scale = max(1, math.ceil(128 / max(h, w)))
    tile_w, tile_h, gap, top = w * scale, h * scale, 8, 56
    shown = sorted({int(c) for m in (*predictions, *truths) for c in np.unique(np.asarray(m)) if c < len(names)})
    legend_rows = math.ceil(len(shown) / 4)
    size = (max(3 * tile_w + 4 * gap, 520), top + len(images) * (tile_h + gap) + 20 * legend_rows + 16)
    canvas = Image.new("RGB", size, "white")
    d, f = ImageDraw.Draw(canvas), _font(12)
    d.text((gap, 10), title, fill="black", font=_font(14))
    for col, header in enumerate(("image", "prediction", "ground truth")):
        d.text((gap + col * (tile_w + gap), top - 18), header, fill="black", font=f)
    for row, (image, pred, truth) in enumerate(zip(images, predictions, truths)):
        y = top + row * (tile_h + gap)
        picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((tile_w, tile_h), Image.NEAREST)
        for col, tile in enumerate((picture, _coloured(pred, scale), _coloured(truth, scale))):
            canvas.paste(tile, (gap + col * (tile_w + gap), y))
    y0 = top + len(images) * (tile_h + gap) + 4
    column = (size[0] - 2 * gap) / 4
    for i, c in enumerate(shown):
        x, y = gap + (i % 4) * column, y0 + 20 * (i // 4)
        d.rectangle([x, y + 2, x + 12, y + 14], fill=class_colour(c), outline=(120, 120, 120))
        d.text((x + 18, y), names[c], fill="black", font=f)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def caption_plot(images: Sequence[Any], lines: Sequence[Sequence[tuple[str, str]]], path: str | Path,
                 title: str) -> Path:
    """One row per sample: the image ([H, W, 3] uint8, scaled to >= 128 px) and, beside it, its
    ``(label, text)`` lines (the captions written, then references), each wrapped to the column."""
    import numpy as np
    from PIL import Image, ImageDraw

    h, w = np.asarray(images[0]).shape[:2]
    scale = max(1, math.ceil(128 / max(h, w)))
    tile_w, tile_h, gap, top, text_w, line_h = w * scale, h * scale, 8, 40, 520, 15
    f = _font(12)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [[_wrap(f"{label}: {text}", text_w, measure, f) for label, text in sample] for sample in lines]
    heights = [max(tile_h, sum(len(block) for block in blocks) * line_h + 4 * len(blocks)) for blocks in wrapped]
    size = (max(tile_w + text_w + 3 * gap, int(measure.textlength(title, font=_font(14))) + 2 * gap),
            top + sum(heights) + gap * len(heights) + gap)
    canvas = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(canvas)
    d.text((gap, 12), title, fill="black", font=_font(14))
    y = top
    for image, blocks, height in zip(images, wrapped, heights):
        picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((tile_w, tile_h), Image.NEAREST)
        canvas.paste(picture, (gap, y))
        ty = y
        for i, block in enumerate(blocks):
            colour = PALETTE[i % len(PALETTE)] if not block[0].startswith("reference:") else (60, 60, 60)
            for line in block:
                d.text((tile_w + 2 * gap, ty), line, fill=colour, font=f)
                ty += line_h
            ty += 4
        y += height + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
