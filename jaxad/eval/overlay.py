"""A decision drawn on an image: the normalised anomaly map on a fixed colour scale, with the
predicted defect outlined.

Normalised maps (:mod:`jaxad.eval.calibration`) put every method's threshold at 0.5, so the scale
runs from 0 to 1 for every image and every run: the same colour means the same thing, and the
outline is where the colour crosses the middle of the bar.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jaxad import checkpoint
from jaxad.eval.report import heatmap

_MIN_SIDE = 160  # panels are upscaled (integer factor) to at least this
_HEADER, _FOOTER, _GAP = 24, 30, 4
OUTLINE = (255, 255, 255)


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` (4-neighbour) steps of its outside."""
    inner = mask.copy()
    for _ in range(width):
        p = np.pad(inner, 1)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def decision_panel(image: np.ndarray, normalised_map: np.ndarray, title: str) -> Image.Image:
    """[input | map overlay with the predicted defect (normalised map ≥ 0.5) outlined], a colour bar
    from 0 to 1 with the threshold marked. ``image`` [H, W, 3] float in [0, 1]; the map at its size."""
    h, w = image.shape[:2]
    k = max(1, math.ceil(_MIN_SIDE / min(h, w)))
    size = (w * k, h * k)
    rgb = np.asarray(Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC))
    m = np.asarray(Image.fromarray(np.asarray(normalised_map, np.float32)).resize(size, Image.Resampling.BILINEAR))
    overlay = np.round(0.5 * rgb + 0.5 * heatmap(m, 0.0, 1.0)).astype(np.uint8)
    overlay[outline(m >= 0.5, max(1, k))] = OUTLINE
    out = Image.new("RGB", (2 * size[0] + _GAP, _HEADER + size[1] + _FOOTER), "white")
    out.paste(Image.fromarray(rgb), (0, _HEADER))
    out.paste(Image.fromarray(overlay), (size[0] + _GAP, _HEADER))
    draw = ImageDraw.Draw(out)
    draw.text((4, 5), title, font=ImageFont.load_default(size=14), fill=(0, 0, 0))
    x0, x1 = size[0] + _GAP + 4, 2 * size[0] + _GAP - 4
    bar = heatmap(np.linspace(0.0, 1.0, max(x1 - x0, 2))[None].repeat(8, 0), 0.0, 1.0)
    y = _HEADER + size[1] + 4
    out.paste(Image.fromarray(bar), (x0, y))
    draw.line(((x0 + x1) // 2, y - 2, (x0 + x1) // 2, y + 9), fill=(0, 0, 0), width=2)
    small = ImageFont.load_default(size=11)
    for x, text, anchor in ((x0, "0", "la"), ((x0 + x1) // 2, "0.5 threshold", "ma"), (x1, "1", "ra")):
        draw.text((x, y + 10), text, font=small, fill=(0, 0, 0), anchor=anchor)
    return out


def save_decision(path: str | Path, image: np.ndarray, normalised_map: np.ndarray, title: str) -> Path:
    """Write :func:`decision_panel` as a PNG."""
    path = Path(path)
    with checkpoint.replacing(path) as tmp:
        decision_panel(image, normalised_map, title).save(tmp)
    return path
