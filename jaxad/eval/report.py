"""Pictures and tables a person looks at: map overlays, ROC and benchmark plots, markdown tables.

Drawn with Pillow alone (no plotting library is a dependency). Files go into directories that
jaxad creates for its runs, so a rerun overwrites its own earlier outputs.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jaxad import checkpoint
from jaxad.eval import metrics

# Jet-like colour ramp: (position, RGB) anchors, linearly interpolated per channel.
_RAMP = np.array([
    (0.000, 0.0, 0.0, 0.5),
    (0.125, 0.0, 0.0, 1.0),
    (0.375, 0.0, 1.0, 1.0),
    (0.625, 1.0, 1.0, 0.0),
    (0.875, 1.0, 0.0, 0.0),
    (1.000, 0.5, 0.0, 0.0),
])
_SERIES_COLOURS = [(29, 105, 190), (220, 60, 40), (40, 150, 70), (240, 150, 20), (130, 80, 180), (110, 110, 110), (0, 170, 170), (200, 60, 150)]
_MIN_SIDE = 160  # overlay panels are upscaled (integer factor) to at least this, so small maps stay readable
_HEADER, _FOOTER, _GAP = 24, 30, 4
PREDICTED = (255, 255, 255)  # outline of a predicted defect; ground truth is green


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def heatmap(map2d: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """[H, W] scores → [H, W, 3] uint8 colours; ``vmin`` is dark blue, ``vmax`` dark red, clipped."""
    m = np.asarray(map2d, dtype=np.float32)
    scale = 1.0 / (vmax - vmin) if vmax > vmin else 0.0
    t = np.clip((m - vmin) * scale, 0.0, 1.0)
    rgb = np.stack([np.interp(t, _RAMP[:, 0], _RAMP[:, c]) for c in (1, 2, 3)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def _rgb_uint8(image: np.ndarray) -> np.ndarray:
    """uint8, or float in [0, 1]; greyscale or RGB → [H, W, 3] uint8."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.dtype != np.uint8:
        a = np.round(np.clip(a.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
    return a


def _resize(a: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize a 2-D float or uint8 array, or an RGB uint8 image, to (height, width)."""
    if a.shape[:2] == size:
        return a
    src = a.astype(np.float32) if a.ndim == 2 and a.dtype != np.uint8 else a
    return np.asarray(Image.fromarray(src).resize((size[1], size[0]), resample))


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` (4-neighbour) steps of its outside."""
    inner = mask.copy()
    for _ in range(width):
        p = np.pad(inner, 1)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font) -> None:
    """White text on a dark box, readable over any image."""
    x0, y0, x1, y1 = draw.textbbox(xy, text, font=font)
    draw.rectangle((x0 - 3, y0 - 2, x1 + 3, y1 + 2), fill=(0, 0, 0))
    draw.text(xy, text, font=font, fill=(255, 255, 255))


def panel(image: np.ndarray, map2d: np.ndarray, mask: np.ndarray | None, title: str, vmin: float, vmax: float,
          threshold: float | None = None) -> Image.Image:
    """One image's [input | map overlay | ground truth] strip with caption and colour bar. With a
    ``threshold``, the map's region at or above it (the predicted defect) is outlined in white and
    the threshold is marked on the bar."""
    h, w = image.shape[:2]
    k = max(1, math.ceil(_MIN_SIDE / min(h, w)))
    size = (h * k, w * k)
    rgb = _resize(_rgb_uint8(image), size, Image.Resampling.BICUBIC)
    resized = _resize(np.asarray(map2d, np.float32), size, Image.Resampling.BILINEAR)
    overlay = np.round(0.5 * rgb + 0.5 * heatmap(resized, vmin, vmax)).astype(np.uint8)
    if threshold is not None:
        overlay[outline(resized >= threshold, max(1, k))] = PREDICTED
    tiles = [(rgb, "input"), (overlay, "anomaly map")]
    if mask is not None:
        m = _resize(np.asarray(mask, bool).astype(np.uint8) * 255, size, Image.Resampling.NEAREST) > 127
        truth = rgb.copy()
        truth[m] = np.round(0.6 * truth[m] + 0.4 * np.array([0, 255, 0])).astype(np.uint8)
        truth[outline(m, max(2, k))] = (0, 255, 0)
        tiles.append((truth, "ground truth"))
    out = Image.new("RGB", (len(tiles) * size[1] + (len(tiles) - 1) * _GAP, _HEADER + size[0] + _FOOTER), "white")
    draw = ImageDraw.Draw(out)
    font = _font(13)
    for i, (tile, name) in enumerate(tiles):
        x = i * (size[1] + _GAP)
        out.paste(Image.fromarray(tile), (x, _HEADER))
        _label(draw, (x + 5, _HEADER + 4), name, font)
    draw.text((4, 5), title, font=_font(14), fill=(0, 0, 0))
    x0, x1 = size[1] + _GAP + 4, 2 * size[1] + _GAP - 4
    bar = heatmap(np.linspace(vmin, vmax, max(x1 - x0, 2))[None].repeat(8, 0), vmin, vmax)
    y = _HEADER + size[0] + 4
    out.paste(Image.fromarray(bar), (x0, y))
    small = _font(11)
    draw.text((x0, y + 10), f"{vmin:.4g}", font=small, fill=(0, 0, 0))
    draw.text((x1, y + 10), f"{vmax:.4g}", font=small, fill=(0, 0, 0), anchor="ra")
    if threshold is not None and vmax > vmin:
        x = round(x0 + (x1 - x0) * min(max((threshold - vmin) / (vmax - vmin), 0.0), 1.0))
        draw.line((x, y - 2, x, y + 9), fill=(0, 0, 0), width=2)
        draw.text((x, y + 10), f"{threshold:.4g} threshold", font=small, fill=(0, 0, 0), anchor="ma")
    return out


def file_stems(names: Sequence[str]) -> list[str]:
    """Distinct file-name stems for ``names``: characters other than letters, digits, ``.``, ``_``
    and ``-`` become ``_``; a repeat gets a trailing ``_``."""
    stems, used = [], set()
    for i, name in enumerate(names):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)) or f"{i:04d}"
        while stem in used:
            stem += "_"
        used.add(stem)
        stems.append(stem)
    return stems


def save_overlays(
    out_dir: str | Path,
    images: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray | None = None,
    names: Sequence[str] | None = None,
    scores: Sequence[float] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    max_images: int | None = None,
) -> list[Path]:
    """One PNG per image: input | heat map blended at 50 % | ground truth (when masks are given).

    Images are uint8 or floats in [0, 1]; maps of another size are resized to the image. All
    images share one colour scale (default: the maps' 1st and 99.9th percentiles) so that their
    maps can be compared. ``max_images`` keeps that many, evenly spread over the set.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    maps = np.asarray(maps)
    n = len(maps)
    if vmin is None or vmax is None:
        lo, hi = np.percentile(maps, [1.0, 99.9]) if n else (0.0, 1.0)
        vmin = float(lo) if vmin is None else vmin
        vmax = float(hi) if vmax is None else vmax
    keep = range(n) if max_images is None or max_images >= n else np.unique(np.linspace(0, n - 1, max_images).round().astype(int))
    shown = [names[i] if names is not None else f"{i:04d}" for i in keep]
    paths = []
    for i, name, stem in zip(keep, shown, file_stems(shown)):
        title = str(name) if scores is None else f"{name}   score {float(scores[i]):.4g}"
        path = out_dir / f"{stem}.png"
        with checkpoint.replacing(path) as tmp:
            panel(images[i], maps[i], None if masks is None else masks[i], title, vmin, vmax).save(tmp)
        paths.append(path)
    return paths


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    """Round tick positions (in axis units: log10 of the value on a log axis)."""
    if log:
        per_decade = (1,) if hi - lo >= 4 else (1, 2, 5)
        ticks = [math.log10(m) + d for d in range(math.floor(lo), math.ceil(hi) + 1) for m in per_decade]
        return [t for t in ticks if lo - 1e-9 <= t <= hi + 1e-9]
    raw = (hi - lo) / 6
    mag = 10 ** math.floor(math.log10(raw))
    step = mag * next(m for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _limits(values: np.ndarray, fixed: tuple[float, float] | None, log: bool) -> tuple[float, float]:
    """Axis range in axis units: the given limits, or the data's with a 3 % margin."""
    if fixed is not None:
        return (math.log10(fixed[0]), math.log10(fixed[1])) if log else (float(fixed[0]), float(fixed[1]))
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        return lo - (0.5 if log else max(abs(lo), 1.0) * 0.1), hi + (0.5 if log else max(abs(hi), 1.0) * 0.1)
    pad = 0.03 * (hi - lo)
    return lo - pad, hi + pad


def _tick_text(t: float, log: bool, step: float) -> str:
    if log:
        v = 10 ** t
        return f"{v:.6g}" if 1e-3 <= v < 1e6 else f"{v:.0e}"
    digits = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{t:.{digits}f}"


def _dashed(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], fill, width: int, dash: float) -> None:
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        length = math.hypot(x1 - x0, y1 - y0)
        for s in np.arange(0.0, length, 2 * dash):
            a, b = s / length, min(s + dash, length) / length
            draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))], fill=fill, width=width)


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    logy: bool = False,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    dashed: Sequence[str] = (),
    size: tuple[int, int] = (640, 480),
) -> Image.Image:
    """A line plot with axes, grid, ticks, labels and a legend; ``dashed`` names grey dashed lines.

    Points that a log axis cannot show (≤ 0) are left out. Series of up to 30 points get markers.
    """
    s = 2  # drawn at twice the size, then downsampled: smooth lines without an antialiasing API
    width, height = size[0] * s, size[1] * s
    left, right, top, bottom = 78 * s, 20 * s, 40 * s, 58 * s
    data = {}
    for name, (x, y) in series.items():
        x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
        ok = np.isfinite(x) & np.isfinite(y) & (x > 0 if logx else True) & (y > 0 if logy else True)
        x, y = x[ok], y[ok]
        data[name] = (np.log10(x) if logx else x, np.log10(y) if logy else y)
    xs = np.concatenate([d[0] for d in data.values()] + [np.zeros(0)])
    ys = np.concatenate([d[1] for d in data.values()] + [np.zeros(0)])
    if xs.size == 0:
        raise ValueError(f"nothing to plot in {title!r}: every series is empty or off the log axes")
    (x_lo, x_hi), (y_lo, y_hi) = _limits(xs, xlim, logx), _limits(ys, ylim, logy)

    def to_px(x: np.ndarray, y: np.ndarray) -> list[tuple[float, float]]:
        px = left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)
        py = height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)
        return list(zip(px.tolist(), py.tolist()))

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, big = _font(12 * s), _font(15 * s)
    box = (left, top, width - right, height - bottom)
    xt, yt = _ticks(x_lo, x_hi, logx), _ticks(y_lo, y_hi, logy)
    xstep = xt[1] - xt[0] if len(xt) > 1 else 1.0
    ystep = yt[1] - yt[0] if len(yt) > 1 else 1.0
    for t in xt:
        (px, _), = to_px(np.array([t]), np.array([y_lo]))
        draw.line([(px, top), (px, height - bottom)], fill=(228, 228, 228), width=s)
        draw.line([(px, height - bottom), (px, height - bottom + 5 * s)], fill="black", width=s)
        draw.text((px, height - bottom + 8 * s), _tick_text(t, logx, xstep), font=font, fill="black", anchor="ma")
    for t in yt:
        (_, py), = to_px(np.array([x_lo]), np.array([t]))
        draw.line([(left, py), (width - right, py)], fill=(228, 228, 228), width=s)
        draw.line([(left - 5 * s, py), (left, py)], fill="black", width=s)
        draw.text((left - 8 * s, py), _tick_text(t, logy, ystep), font=font, fill="black", anchor="rm")
    draw.rectangle(box, outline="black", width=s)
    draw.text(((left + width - right) / 2, 10 * s), title, font=big, fill="black", anchor="ma")
    draw.text(((left + width - right) / 2, height - 8 * s), xlabel, font=font, fill="black", anchor="md")
    label = Image.new("RGBA", (int(draw.textlength(ylabel, font=font)) + 4 * s, 18 * s), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((2 * s, 0), ylabel, font=font, fill="black")
    label = label.rotate(90, expand=True)
    img.paste(label, (6 * s, int((top + height - bottom - label.height) / 2)), label)

    plot = Image.new("RGB", (width, height), "white")  # lines clipped to the axes box
    pdraw = ImageDraw.Draw(plot)
    colours = iter(_SERIES_COLOURS * (len(data) // len(_SERIES_COLOURS) + 1))
    legend = []
    for name, (x, y) in data.items():
        pts = to_px(x, y)
        if name in dashed:
            colour = (120, 120, 120)
            _dashed(pdraw, pts, colour, 2 * s, 6 * s)
        else:
            colour = next(colours)
            if len(pts) > 1:
                pdraw.line(pts, fill=colour, width=3 * s, joint="curve")
            if len(pts) <= 30:
                for px, py in pts:
                    pdraw.ellipse((px - 4 * s, py - 4 * s, px + 4 * s, py + 4 * s), fill=colour)
        legend.append((name, colour, name in dashed))
    inner = (box[0] + s, box[1] + s, box[2] - s + 1, box[3] - s + 1)
    img.paste(plot.crop(inner), inner[:2])

    row = 20 * s
    lw = max(int(draw.textlength(n, font=font)) for n, _, _ in legend) + 44 * s
    lh = row * len(legend) + 8 * s
    corners = [(box[2] - lw - 8 * s, box[3] - lh - 8 * s), (box[0] + 8 * s, box[1] + 8 * s),
               (box[2] - lw - 8 * s, box[1] + 8 * s), (box[0] + 8 * s, box[3] - lh - 8 * s)]
    every = np.array([p for x, y in data.values() for p in to_px(x, y)] or [(0.0, 0.0)])

    def crowding(corner: tuple[int, int]) -> int:
        cx, cy = corner
        return int(np.sum((every[:, 0] >= cx) & (every[:, 0] <= cx + lw) & (every[:, 1] >= cy) & (every[:, 1] <= cy + lh)))

    lx, ly = min(corners, key=crowding)
    draw.rectangle((lx, ly, lx + lw, ly + lh), fill="white", outline=(150, 150, 150), width=s)
    for i, (name, colour, is_dashed) in enumerate(legend):
        y = ly + 4 * s + i * row + row / 2
        if is_dashed:
            _dashed(draw, [(lx + 8 * s, y), (lx + 34 * s, y)], colour, 2 * s, 6 * s)
        else:
            draw.line([(lx + 8 * s, y), (lx + 34 * s, y)], fill=colour, width=3 * s)
        draw.text((lx + 40 * s, y), name, font=font, fill="black", anchor="lm")

    return img.resize(size, Image.Resampling.LANCZOS)


def save_line_plot(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                   xlabel: str, ylabel: str, title: str, **options: Any) -> Path:
    """:func:`line_plot` (``options``: its keyword arguments) written to the PNG file ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.replacing(path) as tmp:
        line_plot(series, xlabel, ylabel, title, **options).save(tmp)
    return path


def roc_plot(scores: Sequence[float], labels: Sequence[int], title: str) -> Image.Image:
    """ROC curve of image scores with the chance diagonal; the AUROC is in the legend."""
    fpr, tpr, _ = metrics.roc_curve(scores, labels)
    auroc = metrics.image_auroc(scores, labels)
    return line_plot(
        {f"AUROC {auroc:.4f}": (fpr, tpr), "chance": ([0.0, 1.0], [0.0, 1.0])},
        "false positive rate", "true positive rate", title,
        xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), dashed=["chance"],
    )


def save_roc_curve(path: str | Path, scores: Sequence[float], labels: Sequence[int], title: str) -> Path:
    """:func:`roc_plot` written to the PNG file ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.replacing(path) as tmp:
        roc_plot(scores, labels, title).save(tmp)
    return path


def pr_plot(scores: Sequence[float], labels: Sequence[int], title: str) -> Image.Image:
    """Precision against recall of image scores, with the share of anomalous images (a random
    ranking's precision) dashed; the AP is in the legend."""
    fpr, tpr, _ = metrics.roc_curve(scores, labels)
    t = np.asarray(labels) != 0
    tp, fp = tpr * t.sum(), fpr * (~t).sum()
    flagged = tp + fp > 0  # the curve's first point flags no image: no precision there
    ap = metrics.image_ap(scores, labels)
    return line_plot(
        {f"AP {ap:.4f}": (tpr[flagged], tp[flagged] / (tp + fp)[flagged]), "random": ([0.0, 1.0], [t.mean()] * 2)},
        "recall", "precision", title, xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), dashed=["random"],
    )


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else format(float(value), floatfmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def code_span(text: str) -> str:
    """Markdown inline code for ``text``, fenced with one backtick more than its longest run of
    backticks, so a command whose arguments contain backticks still renders as one span."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence, pad = "`" * (longest + 1), " " if longest else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def provenance(command: str, machine: str) -> list[str]:
    """The lines under a benchmark heading that say how to rerun it, where and when it ran."""
    return [f"Command: {code_span(command)}  ", f"Machine: {machine}  ", f"Date: {time.strftime('%Y-%m-%d')}"]


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                   floatfmt: str | Mapping[str, str] = ".4f") -> str:
    """A GitHub markdown table; numbers right-aligned, NaN as n/a, missing cells empty.

    ``floatfmt`` formats every float, or (a mapping) the floats of the columns it names, others ``.4f``."""
    formats = [floatfmt.get(c, ".4f") if isinstance(floatfmt, Mapping) else floatfmt for c in columns]
    numeric = [
        all(isinstance(r[c], (int, float, np.number)) and not isinstance(r[c], (bool, np.bool_)) for r in rows if r.get(c) is not None)
        and any(r.get(c) is not None for r in rows)
        for c in columns
    ]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(_cell(r.get(c), f) for c, f in zip(columns, formats)) + " |" for r in rows]
    return "\n".join(lines)
