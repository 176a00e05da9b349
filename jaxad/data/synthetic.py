"""Procedural MVTec-AD-layout dataset, so the pipeline and the tests run with no download.

Textures (woven fabric, wire mesh, wood grain) and objects at random pose (screw, gear, capsule),
with normal variation in lighting, colour, pattern phase and sensor noise. Every defect is drawn on
top of the defect-free rendering of the same image, so its mask covers exactly the changed pixels.
One seed gives byte-identical PNGs on a given platform and numpy version.

    python -m jaxad.data.synthetic [ROOT] [--seed 0] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from jaxad.errors import DataError

VERSION = 1
MARKER = ".complete.json"


@dataclass(frozen=True)
class Category:
    """What a category is: a texture (defects anywhere) or an object (pose varies, defects on it)."""

    kind: str  # "texture" or "object"
    defects: tuple[str, ...]


CATEGORIES: dict[str, Category] = {
    "weave": Category("texture", ("hole", "stain", "contamination", "scratch")),
    "mesh": Category("texture", ("hole", "missing", "stain", "contamination")),
    "grain": Category("texture", ("scratch", "crack", "hole", "stain", "contamination")),
    "screw": Category("object", ("scratch", "stain", "missing", "extra")),
    "gear": Category("object", ("crack", "scratch", "missing", "extra")),
    "capsule": Category("object", ("crack", "stain", "missing", "extra")),
}
SURFACE_DEFECTS = ("scratch", "crack", "hole", "stain", "contamination")
PART_DEFECTS = ("missing", "extra")  # drawn by a category's renderer; "extra" (a stray nut) is logical


class Example(NamedTuple):
    image: np.ndarray  # [S, S, 3] float32 in [0, 1]
    mask: np.ndarray | None  # [S, S] bool; None for a good image
    normal: np.ndarray  # the same image without its defect


# --------------------------------------------------------------------------- shared helpers


@lru_cache(maxsize=16)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), read-only because every renderer shares them."""
    y, x = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5, indexing="ij")
    y.flags.writeable = x.flags.writeable = False
    return y, x


@lru_cache(maxsize=64)
def _taps(n: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """First grid index [n] and 4 cubic B-spline weights [4, n] for upsampling cells+3 knots to n."""
    t = (np.arange(n) + 0.5) / n * cells + 1.0
    first = np.floor(t).astype(np.int64) - 1
    d = np.abs(t[None, :] - (first[None, :] + np.arange(4)[:, None]))
    w = np.where(d < 1, 2 / 3 - d**2 + d**3 / 2, (2 - d) ** 3 / 6)
    return first, w.astype(np.float32)


def _noise(rng: np.random.Generator, shape: tuple[int, int], cells_y: int, cells_x: int | None = None) -> np.ndarray:
    """Smooth zero-mean noise of about unit std with features of shape/cells pixels.

    Separable B-spline upsampling by gathers, not matmuls: exact same floats on any BLAS.
    """
    cells_x = cells_y if cells_x is None else cells_x
    g = rng.standard_normal((cells_y + 3, cells_x + 3), dtype=np.float32)
    (iy, wy), (ix, wx) = _taps(shape[0], cells_y), _taps(shape[1], cells_x)
    rows = sum(g[:, ix + j] * wx[j] for j in range(4))
    return np.float32(2.1) * sum(rows[iy + j] * wy[j][:, None] for j in range(4))


def _fractal(rng: np.random.Generator, shape: tuple[int, int], cells: int, octaves: int) -> np.ndarray:
    out = sum(0.5**o * _noise(rng, shape, cells * 2**o) for o in range(octaves))
    return out / float(np.sqrt(sum(0.25**o for o in range(octaves))))


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0, 1)
    return t * t * (3 - 2 * t)


def _cover(sdf: np.ndarray) -> np.ndarray:
    """Antialiased coverage of the region sdf < 0 (sdf in pixels)."""
    return np.clip(0.5 - sdf, 0, 1)


def _over(dst: np.ndarray, colour: np.ndarray, cover: np.ndarray) -> np.ndarray:
    return dst + (colour - dst) * cover[..., None]


def _frame(size: int, cx: float, cy: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Object coordinates (u along the object's axis, v across it), in pixels."""
    y, x = _grid(size, size)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    dx, dy = x - np.float32(cx), y - np.float32(cy)
    return dx * c + dy * s, dy * c - dx * s


def _box(u: np.ndarray, v: np.ndarray, hu: float, hv: float, r: float = 0.0) -> np.ndarray:
    """Signed distance to a box of half sizes (hu, hv) centred at the origin, corners rounded by r."""
    qu, qv = np.abs(u) - (hu - r), np.abs(v) - (hv - r)
    return np.hypot(np.maximum(qu, 0), np.maximum(qv, 0)) + np.minimum(np.maximum(qu, qv), 0) - r


def _jitter(rng: np.random.Generator, rgb: Sequence[float], sd: float) -> np.ndarray:
    """A colour varied mostly in brightness (sd) and a little in hue (sd / 4 per channel)."""
    return (np.asarray(rgb) * (1 + rng.normal(0, sd)) * (1 + rng.normal(0, sd / 4, 3))).astype(np.float32)


def _lum(image: np.ndarray) -> np.ndarray:
    return 0.299 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2]


# --------------------------------------------------------------------------- scenes


class _Scene(NamedTuple):
    clean: np.ndarray  # [S, S, 3] before lighting and sensor noise
    cover: np.ndarray  # [S, S] where the object is (all ones for a texture)
    light: np.ndarray  # [S, S, 3] multiplicative illumination and white balance
    noise: np.ndarray  # [S, S, 3] additive sensor noise

    def finish(self, clean: np.ndarray | None = None) -> np.ndarray:
        return np.clip((self.clean if clean is None else clean) * self.light + self.noise, 0, 1).astype(np.float32)


def _scene(
    rng: np.random.Generator, clean: np.ndarray, cover: np.ndarray | None = None, sigma: float = 0.012
) -> _Scene:
    """Add illumination (gain, gradient, vignette, colour balance) and noise drawn from rng."""
    size = clean.shape[0]
    y, x = _grid(size, size)
    a = rng.uniform(0, 2 * np.pi)
    ramp = ((x - size / 2) * np.float32(np.cos(a)) + (y - size / 2) * np.float32(np.sin(a))) / size
    r2 = ((x - size / 2) ** 2 + (y - size / 2) ** 2) / (size / 2) ** 2
    field = rng.uniform(0.9, 1.08) * (1 + rng.uniform(0, 0.16) * ramp) * (1 - rng.uniform(0, 0.08) * r2)
    light = field[..., None] * _jitter(rng, (1, 1, 1), 0.02)
    noise = rng.standard_normal(clean.shape, dtype=np.float32) * np.float32(sigma)
    cover = np.ones((size, size), np.float32) if cover is None else cover
    return _Scene(*(a.astype(np.float32, copy=False) for a in (clean, cover, light)), noise)


def _lattice(
    rng: np.random.Generator, size: int, period: float, tilt_deg: float, wobble: float
) -> tuple[np.ndarray, np.ndarray]:
    """Lattice coordinates (u, v) in cells, randomly rotated, shifted and slightly warped."""
    y, x = _grid(size, size)
    a = np.deg2rad(rng.uniform(-tilt_deg, tilt_deg))
    c, s = np.float32(np.cos(a)), np.float32(np.sin(a))
    u = (x * c + y * s) / period + rng.uniform(0, 2) + wobble * _noise(rng, (size, size), 3)
    v = (y * c - x * s) / period + rng.uniform(0, 2) + wobble * _noise(rng, (size, size), 3)
    return u, v


def _weave(rng: np.random.Generator, size: int) -> _Scene:
    """Plain-weave fabric: rounded threads passing alternately over and under each other."""
    u, v = _lattice(rng, size, size * rng.uniform(0.045, 0.05), 3, 0.2)
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    iu, iv = iu.astype(np.int64), iv.astype(np.int64)
    over = ((iu + iv) & 1) == 0
    tone_u, tone_v = rng.normal(0, 0.05, 97).astype(np.float32), rng.normal(0, 0.05, 97).astype(np.float32)
    profile_u = np.sqrt(np.clip(1 - (2 * fu - 1) ** 2, 0, 1)) * (0.6 + 0.4 * np.sin(np.pi * fv)) * (1 + tone_u[iu % 97])
    profile_v = np.sqrt(np.clip(1 - (2 * fv - 1) ** 2, 0, 1)) * (0.6 + 0.4 * np.sin(np.pi * fu)) * (1 + tone_v[iv % 97])
    shade = np.where(over, profile_u, profile_v) + 0.05 * _noise(rng, (size, size), size // 3)
    warp = _jitter(rng, (0.62, 0.55, 0.42), 0.03)
    weft = warp * np.float32([0.9, 0.94, 1.04])
    clean = np.where(over[..., None], warp, weft) * (0.25 + 0.75 * shade)[..., None]
    return _scene(rng, clean)


def _mesh(rng: np.random.Generator, size: int, missing: np.random.Generator | None = None) -> _Scene:
    """Woven metal wire mesh in front of a dark background; missing: a wire broken between crossings."""
    period = size * rng.uniform(0.085, 0.095)
    u, v = _lattice(rng, size, period, 4, 0.05)
    hw = np.float32(0.13 * period)
    top_u = ((np.floor(u) + np.floor(v)) % 2) == 0
    h0 = rng.uniform(-0.4, 0.4)
    metal = _jitter(rng, (0.74, 0.73, 0.7), 0.03)
    broken = -1 if missing is None else int(missing.integers(2))
    wires = []
    for family, (across, along, on_top) in enumerate(((u, v, top_u), (v, u, ~top_u))):
        d_across = (across - np.floor(across) - 0.5) * period
        d_along = (along - np.floor(along) - 0.5) * period
        n = d_across / hw
        body = 0.3 + 0.5 * np.sqrt(np.clip(1 - n**2, 0, 1)) + 0.45 * np.exp(-(((n - h0) / 0.3) ** 2))
        dip = np.exp(-((d_along / (1.3 * hw)) ** 2)) * ~on_top
        cov = _cover(np.abs(d_across) - hw)
        if family == broken:
            c = size // 2
            wire = float(np.floor(across[c, c]) + missing.integers(-2, 3))
            mid = float(np.floor(along[c, c]) + missing.integers(-2, 3) + 1 + missing.uniform(-0.1, 0.1))
            gap = _cover((np.abs(along - mid) - missing.uniform(0.35, 1.1)) * period)
            cov = cov * (1 - gap * (np.floor(across) == wire))
        wires.append((metal * (body * (1 - 0.5 * dip))[..., None], cov))
    bg = _jitter(rng, (0.1, 0.1, 0.11), 0.05) * (1 + 0.25 * _fractal(rng, (size, size), 4, 2))[..., None]
    (col_u, cov_u), (col_v, cov_v) = wires
    under = np.where(top_u[..., None], col_v, col_u), np.where(top_u, cov_v, cov_u)
    upper = np.where(top_u[..., None], col_u, col_v), np.where(top_u, cov_u, cov_v)
    return _scene(rng, _over(_over(bg, *under), *upper))


def _grain(rng: np.random.Generator, size: int) -> _Scene:
    """Wood: vertical growth rings warped by fractal noise, with fibre streaks along the grain."""
    y, x = _grid(size, size)
    shape = (size, size)
    warp = _fractal(rng, shape, 2, 3)
    bend = rng.uniform(-0.3, 0.3) * ((y / size - rng.uniform(0.2, 0.8)) ** 2)
    rings = (x + size * (0.06 * warp + bend)) / (size * rng.uniform(0.06, 0.08)) + rng.uniform(0, 1)
    f = rings - np.floor(rings)
    late = _smoothstep(0.5, 0.8, f) * (1 - _smoothstep(0.86, 1.0, f))
    streaks = _noise(rng, shape, 6, size // 2)
    t = np.clip(0.65 * late + 0.08 * _fractal(rng, shape, 8, 2) + 0.1 * streaks, 0, 1)
    light, dark = _jitter(rng, (0.8, 0.62, 0.42), 0.03), _jitter(rng, (0.52, 0.35, 0.22), 0.04)
    clean = (light + (dark - light) * t[..., None]) * (1 + 0.04 * _noise(rng, shape, 8, size // 3))[..., None]
    return _scene(rng, clean)


def _plate(rng: np.random.Generator, size: int, rgb: Sequence[float]) -> np.ndarray:
    """A matte background plate with faint low-frequency blotches."""
    return _jitter(rng, rgb, 0.02) * (1 + 0.03 * _fractal(rng, (size, size), 3, 3))[..., None]


def _pose(rng: np.random.Generator, size: int, shift: float) -> tuple[float, float, float]:
    cx, cy = size * (0.5 + rng.uniform(-shift, shift, 2))
    return float(cx), float(cy), rng.uniform(0, 2 * np.pi)


def _screw(rng: np.random.Generator, size: int, missing: np.random.Generator | None = None) -> _Scene:
    """A machine screw lying at random position and angle; missing: its head or tip broken off."""
    k = size / 256
    bg = _plate(rng, size, (0.8, 0.8, 0.78))
    cx, cy, theta = _pose(rng, size, 0.1)
    half = 75 * k * rng.uniform(0.97, 1.03)
    w, head_len, head_w, tip_len, pitch = 9 * k, 22 * k, 17 * k, 24 * k, 7 * k * rng.uniform(0.95, 1.05)
    metal = _jitter(rng, (0.62, 0.62, 0.65), 0.03)
    h0 = 0.4 * float(np.cos(theta - rng.uniform(0.6, 1.0)))
    u, v = _frame(size, cx, cy, theta)
    neck, tip0 = -half + head_len, half - tip_len
    radius = np.maximum(np.where(u > tip0, w * (half - u) / tip_len, w), 1e-3)
    n = np.clip(v / radius, -1, 1)
    thread = _smoothstep(neck + 8 * k, neck + 12 * k, u) * (0.5 + 0.5 * np.sin(2 * np.pi * (u - 0.45 * v) / pitch))
    body = (0.35 + 0.5 * np.sqrt(1 - n**2) + 0.45 * np.exp(-(((n - h0) / 0.18) ** 2))) * (1 - 0.3 * thread)
    nh = np.clip(v / head_w, -1, 1)
    head = (0.4 + 0.45 * np.sqrt(1 - nh**2) + 0.4 * np.exp(-(((nh - h0) / 0.2) ** 2))) * (
        1 - 0.35 * np.exp(-(((u - neck) / (1.5 * k)) ** 2))
    )
    sdf = {
        "shank": _box(u - (neck + tip0) / 2, v, (tip0 - neck) / 2 + 1, w, 0.5 * k),
        "tip": np.maximum((np.abs(v) - w * (half - u) / tip_len) / float(np.hypot(1, w / tip_len)), tip0 - 2 - u),
        "head": _box(u - (neck - head_len / 2), v, head_len / 2, head_w, 4 * k),
    }
    if missing is not None:
        sdf[str(missing.choice(["head", "tip"]))] = np.full_like(u, np.inf)
    clean, cover = bg, np.zeros_like(u)
    for part in ("shank", "tip", "head"):
        c = _cover(sdf[part])
        clean = _over(clean, metal * (head if part == "head" else body)[..., None], c)
        cover = cover + c * (1 - cover)
    return _scene(rng, clean, cover)


def _gear(rng: np.random.Generator, size: int, missing: np.random.Generator | None = None) -> _Scene:
    """A spur gear with keyed bore and lightening holes, at random angle; missing: a broken tooth."""
    k = size / 256
    teeth, r_out, r_root, r_bore, r_hub = 16, 96 * k, 82 * k, 19 * k, 34 * k
    bg = _plate(rng, size, (0.2, 0.22, 0.25))
    cx, cy, theta = _pose(rng, size, 0.05)
    u, v = _frame(size, cx, cy, theta)
    r = np.hypot(u, v)
    a = (np.arctan2(v, u) % (2 * np.pi)) * (teeth / (2 * np.pi))
    tooth = np.floor(a)
    rim = r_root + (r_out - r_root) * np.clip((0.32 - np.abs(a - tooth - 0.5)) / 0.12, 0, 1)
    if missing is not None:
        rim = np.where(tooth == missing.integers(teeth), r_root - missing.uniform(0, 3) * k, rim)
    holes = np.zeros_like(r)
    for j in range(5):
        ang = (j + 0.5) * 2 * np.pi / 5
        hu, hv = float(56 * k * np.cos(ang)), float(56 * k * np.sin(ang))
        holes = np.maximum(holes, _cover(np.hypot(u - hu, v - hv) - 11 * k))
    bore = np.maximum(_cover(r - r_bore), _cover(_box(u - r_bore, v, 5 * k, 4 * k)))
    cover = _cover(r - rim) * (1 - holes) * (1 - bore)
    y, x = _grid(size, size)
    world = np.arctan2(y - cy, x - cx)
    rings = 0.03 * np.sin(r * (2 * np.pi / max(2.5 * k, 2.0)) + 2 * _noise(rng, (size, size), 8))
    shade = 0.55 + 0.2 * np.cos(2 * (world - rng.uniform(0.5, 1.0))) + rings
    shade = np.where(r < r_hub, shade + 0.12, shade) * (1 - 0.35 * np.exp(-(((r - r_hub) / (1.5 * k)) ** 2)))
    shade = shade * (1 - 0.3 * _smoothstep(rim - 4 * k, rim, r))
    clean = _over(bg, _jitter(rng, (0.72, 0.7, 0.66), 0.03) * shade[..., None], cover)
    return _scene(rng, clean, cover)


def _capsule(rng: np.random.Generator, size: int, missing: np.random.Generator | None = None) -> _Scene:
    """A two-coloured capsule at random pose; missing: a chip broken out of its rim."""
    k = size / 256
    bg = _plate(rng, size, (0.86, 0.86, 0.83))
    cx, cy, theta = _pose(rng, size, 0.1)
    half, radius, seam = 80 * k, 30 * k, rng.uniform(-6, 6) * k
    u, v = _frame(size, cx, cy, theta)
    axis = np.clip(u, -(half - radius), half - radius)
    dist = np.hypot(u - axis, v)
    sdf = dist - np.where(u < seam, np.float32(radius + 0.8 * k), np.float32(radius))
    edge = np.ones_like(u)
    if missing is not None:
        s, side = missing.uniform(-(half - radius), half - radius), float(missing.choice([-1.0, 1.0]))
        r_chip = missing.uniform(8, 14) * k
        d_chip = np.hypot(u - s, v - side * radius) - r_chip
        sdf = np.maximum(sdf, -d_chip)
        edge = 1 - 0.4 * np.clip(1 - d_chip / (3 * k), 0, 1)
    n = np.clip(dist / radius, 0, 1)
    h0 = 0.4 * float(np.cos(theta - rng.uniform(0.6, 1.0)))
    diffuse = (0.45 + 0.5 * np.sqrt(1 - n**2)) * (1 - 0.3 * np.exp(-(((u - seam) / (1.2 * k)) ** 2))) * edge
    spec = 0.35 * np.exp(-(((np.clip(v / radius, -1, 1) - h0) / 0.15) ** 2)) * np.sqrt(1 - n**2)
    cap, body = _jitter(rng, (0.62, 0.1, 0.12), 0.04), _jitter(rng, (0.92, 0.88, 0.78), 0.02)
    shell = np.where((u < seam)[..., None], cap, body)
    cover = _cover(sdf)
    clean = _over(bg, shell * diffuse[..., None] + spec[..., None], cover)
    return _scene(rng, clean, cover)


# (rng, size) -> scene; those with a "missing" defect also take missing=Generator to leave a part out.
_RENDER: dict[str, Callable[..., _Scene]] = {
    "weave": _weave,
    "mesh": _mesh,
    "grain": _grain,
    "screw": _screw,
    "gear": _gear,
    "capsule": _capsule,
}


def _extra_nut(clean: np.ndarray, cover: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw a loose hex nut on free background (a logical anomaly: a part that does not belong)."""
    size = clean.shape[0]
    k = size / 256
    r_nut = rng.uniform(13, 17) * k
    y, x = _grid(size, size)
    for _ in range(50):
        cy, cx = rng.uniform(r_nut + 4, size - r_nut - 4, 2)
        if cover[np.hypot(x - cx, y - cy) < r_nut + 4 * k].max(initial=0) < 1e-3:
            break
    u, v = _frame(size, cx, cy, rng.uniform(0, np.pi / 3))
    hexagon = np.max([np.abs(u * float(np.cos(a)) + v * float(np.sin(a))) for a in np.arange(3) * np.pi / 3], axis=0)
    r = np.hypot(u, v)
    cov = _cover(hexagon - r_nut * float(np.cos(np.pi / 6))) * (1 - _cover(r - 0.45 * r_nut))
    face = np.arctan2(v, u) + rng.uniform(0, 2 * np.pi)
    shade = 0.55 + 0.15 * np.cos(face) - 0.25 * np.exp(-(((r - 0.45 * r_nut) / (2 * k)) ** 2))
    return _over(clean, _jitter(rng, (0.7, 0.7, 0.72), 0.03) * shade[..., None], cov)


# --------------------------------------------------------------------------- surface defects


def _stroke(shape: tuple[int, int], pts: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Antialiased coverage of a polyline pts [M, 2] (y, x) whose width varies along it."""
    h, w = shape
    out = np.zeros(shape, np.float32)
    pad = widths.max() + 2
    y0, x0 = np.maximum(np.floor(pts.min(0) - pad).astype(int), 0)
    y1, x1 = np.minimum(np.ceil(pts.max(0) + pad).astype(int), (h, w))
    if y1 <= y0 or x1 <= x0:
        return out
    gy, gx = _grid(h, w)
    p = np.stack([gy[y0:y1, x0:x1].ravel(), gx[y0:y1, x0:x1].ravel()], -1)[:, None, :]
    a, ab = pts[:-1], pts[1:] - pts[:-1]
    t = np.clip(np.sum((p - a) * ab, -1) / np.maximum(np.sum(ab * ab, -1), 1e-9), 0, 1)
    d = np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)
    half = (widths[:-1] + t * (widths[1:] - widths[:-1])) / 2
    out[y0:y1, x0:x1] = np.clip(half + 0.5 - d, 0, 1).max(1).reshape(y1 - y0, x1 - x0)
    return out


def _walk(rng: np.random.Generator, start: np.ndarray, heading: float, steps: int, step: float) -> np.ndarray:
    """A jagged path: the heading drifts slowly and zigzags around the drift at every step."""
    headings = heading + np.cumsum(rng.normal(0, 0.12, steps)) + rng.normal(0, 0.5, steps)
    moves = step * np.stack([np.sin(headings), np.cos(headings)], -1)
    return start + np.concatenate([np.zeros((1, 2)), np.cumsum(moves, 0)])


def _blob(
    shape: tuple[int, int], centre: np.ndarray, radius: float, rng: np.random.Generator, rough: float
) -> np.ndarray:
    """Distance from centre relative to an irregular radius: < 1 inside the blob."""
    y, x = _grid(*shape)
    dy, dx = y - np.float32(centre[0]), x - np.float32(centre[1])
    ang = np.arctan2(dy, dx)
    rr = np.ones_like(ang)
    for f, amp in ((2, 0.5), (3, 0.35), (5, 0.2), (7, 0.1)):
        rr = rr + rough * amp * rng.uniform(0.5, 1) * np.sin(f * ang + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) / (radius * rr)


def _scratch(
    image: np.ndarray, centre: np.ndarray, rng: np.random.Generator, k: float, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A thin bowed line, bright (metal exposed) or dark, tapering at both ends."""
    length = rng.uniform(0.15, 0.35) * min(image.shape[:2])
    a = rng.uniform(0, np.pi)
    d, n = np.array([np.sin(a), np.cos(a)]), np.array([np.cos(a), -np.sin(a)])
    t = np.linspace(-0.5, 0.5, 25)[:, None]
    bow = rng.uniform(-0.25, 0.25) * length * (1 - 4 * t**2) + rng.normal(0, 0.3 * k, t.shape)
    pts = centre + t * length * d + bow * n
    widths = np.maximum(rng.uniform(1.0, 2.2) * k, 1.0) * (0.35 + 0.65 * np.sin(np.pi * (t[:, 0] + 0.5)) ** 0.5)
    alpha = _stroke(image.shape[:2], pts, widths) * rng.uniform(0.6, 0.9)
    target = image + (0.95 - image) * 0.8 if rng.random() < 0.6 else image * 0.35
    return target, alpha


def _crack(
    image: np.ndarray, centre: np.ndarray, rng: np.random.Generator, k: float, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A dark jagged line with one to three branches."""
    step = 2.5 * k
    n = int(rng.uniform(0.07, 0.15) * min(image.shape[:2]) / step) + 2
    h0 = rng.uniform(0, 2 * np.pi)
    main = np.concatenate([_walk(rng, centre, h0 + np.pi, n, step)[::-1], _walk(rng, centre, h0, n, step)[1:]])
    taper = 0.8 + 1.4 * (1 - np.abs(np.linspace(-1, 1, len(main))))
    alpha = _stroke(image.shape[:2], main, taper * max(k, 0.6))
    for _ in range(rng.integers(1, 4)):
        i = rng.integers(1, len(main) - 1)
        ahead = main[i + 1] - main[i - 1]
        heading = np.arctan2(ahead[0], ahead[1]) + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0)
        branch = _walk(rng, main[i], heading, max(2, int(n * rng.uniform(0.3, 0.6))), step)
        alpha = np.maximum(alpha, _stroke(image.shape[:2], branch, np.linspace(1.2, 0.5, len(branch)) * max(k, 0.6)))
    return image * rng.uniform(0.15, 0.35), alpha


def _hole(
    image: np.ndarray, centre: np.ndarray, rng: np.random.Generator, k: float, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A dark irregular disc with a lighter torn rim."""
    radius = rng.uniform(0.03, 0.055) * min(image.shape[:2])
    q = _blob(image.shape[:2], centre, radius, rng, 0.15)
    d = (q - 1) * radius
    rim_w = rng.uniform(0.25, 0.45) * radius + 1.5 * k
    lit = np.clip(image * (1 + 0.45 * np.clip(1 - d / rim_w, 0, 1))[..., None], 0, 1)
    dark = image * 0.12 + 0.03 * (1 + 0.3 * rng.standard_normal(image.shape[:2], dtype=np.float32))[..., None]
    return _over(lit, dark, _cover(d)), (d < rim_w).astype(np.float32)


_TINTS = np.float32([(0.55, 0.33, 0.15), (0.25, 0.22, 0.2), (0.4, 0.36, 0.12), (0.85, 0.8, 0.55), (0.8, 0.5, 0.25)])


def _stain(
    image: np.ndarray, centre: np.ndarray, rng: np.random.Generator, k: float, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A soft-edged mottled blob in a colour that contrasts with what lies under it."""
    q = _blob(image.shape[:2], centre, rng.uniform(0.05, 0.1) * min(image.shape[:2]), rng, 0.3)
    mottle = np.clip(0.75 + 0.25 * _noise(rng, image.shape[:2], 12), 0, 1)
    alpha = _smoothstep(1.0, 0.45, q) * rng.uniform(0.45, 0.8) * mottle
    weight = alpha * allowed
    under = float(np.sum(_lum(image) * weight) / max(float(weight.sum()), 1e-6))
    visible = np.flatnonzero(np.abs(_lum(_TINTS) - under) > 0.2)  # a stain that stands out
    tint = _TINTS[rng.choice(visible)] if visible.size else _TINTS[rng.integers(len(_TINTS))]
    return tint * (0.55 + 0.6 * _lum(image))[..., None], alpha


def _contamination(
    image: np.ndarray,
    centre: np.ndarray,
    rng: np.random.Generator,
    k: float,
    allowed: np.ndarray,
    foreign: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A patch of foreign texture pasted with an irregular, sharp-edged outline."""
    q = _blob(image.shape[:2], centre, rng.uniform(0.05, 0.1) * min(image.shape[:2]), rng, 0.4)
    alpha = _cover((q - 1) * 0.05 * min(image.shape[:2]))
    if foreign is None:
        shape = image.shape[:2]
        fibres = _noise(rng, shape, max(shape[0] // 4, 1), max(shape[1] // 16, 1))
        foreign = rng.uniform(0.1, 0.9, 3).astype(np.float32) * (0.75 + 0.2 * fibres)[..., None]
    return np.clip(foreign, 0, 1).astype(np.float32), alpha


# Each returns (target, alpha): the defect's colour and how much of it replaces the image.
_SURFACE = {"scratch": _scratch, "crack": _crack, "hole": _hole, "stain": _stain, "contamination": _contamination}


def add_defect(
    image: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    region: np.ndarray | None = None,
    foreign: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a surface defect on an [H, W, 3] float image in [0, 1]; returns (image, bool mask).

    The defect is centred inside ``region`` (coverage in [0, 1], default everywhere) and fades
    out with it, so defects stay on an object. ``foreign`` is the texture pasted by
    "contamination" (default: a random fibrous one). Pixels outside the mask are unchanged.
    """
    if kind not in _SURFACE:
        raise ValueError(f"unknown surface defect {kind!r}; choose from {', '.join(_SURFACE)}")
    image = np.asarray(image, np.float32)
    h, w = image.shape[:2]
    allowed = np.ones((h, w), np.float32) if region is None else np.clip(region, 0, 1).astype(np.float32)
    m = int(0.1 * min(h, w))
    inner = np.zeros_like(allowed)
    inner[m : h - m, m : w - m] = allowed[m : h - m, m : w - m]
    candidates = np.flatnonzero(inner > 0.99)
    if candidates.size == 0:
        candidates = np.flatnonzero(allowed == allowed.max())
    centre = np.array(np.unravel_index(rng.choice(candidates), (h, w)), np.float64) + 0.5
    extra = {"foreign": foreign} if kind == "contamination" else {}
    target, alpha = _SURFACE[kind](image, centre, rng, min(h, w) / 256, allowed, **extra)
    alpha = np.clip(alpha, 0, 1).astype(np.float32) * allowed
    out = np.clip(_over(image, target, alpha), 0, 1).astype(np.float32)
    return out, alpha > 0


# --------------------------------------------------------------------------- public rendering


def _check_category(category: str) -> Category:
    if category not in CATEGORIES:
        raise DataError(f"unknown synthetic category {category!r}; choose from {', '.join(CATEGORIES)}")
    return CATEGORIES[category]


def render_normal(category: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One defect-free [size, size, 3] float32 image of a category."""
    return render_example(category, rng, size).image


def render_example(category: str, rng: np.random.Generator, size: int = 256, defect: str | None = None) -> Example:
    """One image of a category, with the given defect (None: good) and its defect-free twin."""
    info = _check_category(category)
    if defect is not None and defect not in SURFACE_DEFECTS + info.defects:
        choices = ", ".join(SURFACE_DEFECTS + info.defects)
        raise ValueError(f"{category} has no {defect!r} defect; choose from {choices}")
    scene_seed, defect_seed = (int(s) for s in rng.integers(0, 2**63, 2))
    scene = _RENDER[category](np.random.default_rng(scene_seed), size)
    normal = scene.finish()
    if defect is None:
        return Example(normal, None, normal)
    drng = np.random.default_rng(defect_seed)
    if defect in PART_DEFECTS:
        if defect == "missing":
            clean = _RENDER[category](np.random.default_rng(scene_seed), size, missing=drng).clean
        else:
            clean = _extra_nut(scene.clean, scene.cover, drng)
        return Example(scene.finish(clean), np.any(clean != scene.clean, axis=-1), normal)
    foreign = None
    if defect == "contamination":
        others = [c for c, i in CATEGORIES.items() if i.kind == "texture" and c != category]
        foreign = render_normal(others[drng.integers(len(others))], drng, size)
    region = None if info.kind == "texture" else scene.cover
    image, mask = add_defect(normal, defect, drng, region=region, foreign=foreign)
    return Example(image, mask, normal)


def image_rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    """The generator behind image ``index`` of ``split`` ("train/good", "test/good", "test/<defect>");
    keyed by name, so every image is reproducible on its own and in any order."""
    return np.random.default_rng([seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index])


# --------------------------------------------------------------------------- files on disk


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _layout(settings: dict) -> dict[str, dict[str, int]]:
    """Image count per split folder of every category."""
    counts = {"train/good": settings["n_train"], "test/good": settings["n_test_good"]}
    per_defect = settings["n_per_defect"]
    return {c: counts | {f"test/{d}": per_defect for d in CATEGORIES[c].defects} for c in settings["categories"]}


def _write_image(root: Path, seed: int, size: int, category: str, split: str, index: int, width: int) -> str:
    defect = None if split.endswith("/good") else split.removeprefix("test/")
    example = render_example(category, image_rng(seed, category, split, index), size, defect)
    stem = f"{index:0{width}d}"
    Image.fromarray(_to_uint8(example.image)).save(root / category / split / f"{stem}.png", compress_level=1)
    if example.mask is not None:
        mask = Image.fromarray(np.where(example.mask, 255, 0).astype(np.uint8), mode="L")
        mask.save(root / category / "ground_truth" / defect / f"{stem}_mask.png", compress_level=1)
    return category


def _settings(
    seed: int, categories: Sequence[str] | None, image_size: int, n_train: int, n_test_good: int, n_per_defect: int
) -> dict:
    names = list(CATEGORIES) if categories is None else list(dict.fromkeys(categories))
    for name in names:
        _check_category(name)
    if seed < 0 or image_size < 32 or min(n_train, n_test_good, n_per_defect) < 1:
        raise DataError("synthetic data needs seed >= 0, image_size >= 32 and at least one image per split")
    return {
        "generator": "jaxad.data.synthetic",
        "version": VERSION,
        "seed": seed,
        "image_size": image_size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_per_defect": n_per_defect,
        "categories": names,
    }


def _readme(settings: dict) -> str:
    lines = [
        f"Synthetic anomaly-detection dataset: jaxad.data.synthetic v{settings['version']}, seed {settings['seed']}.",
        "Procedurally rendered (no real photographs); regenerate byte-identically (same platform) with",
        f"    python -m jaxad.data.synthetic DIR --seed {settings['seed']} --size {settings['image_size']} "
        f"--n-train {settings['n_train']} --n-test-good {settings['n_test_good']} "
        f"--n-per-defect {settings['n_per_defect']} "
        f"--categories {','.join(settings['categories'])}",
        "",
        "Layout (MVTec AD): CATEGORY/train/good, CATEGORY/test/good, CATEGORY/test/DEFECT,",
        "CATEGORY/ground_truth/DEFECT/NNN_mask.png (0/255, same size as the image).",
        f"{settings['image_size']}x{settings['image_size']} RGB PNG; {settings['n_train']} train, "
        f"{settings['n_test_good']} test good and {settings['n_per_defect']} per defect type per category.",
        "",
    ]
    for name in settings["categories"]:
        info = CATEGORIES[name]
        lines.append(f"{name:8s} {info.kind:8s} defects: {', '.join(info.defects)}")
    lines += [
        "",
        "Masks cover exactly the pixels a defect changed. 'missing' leaves out a part (screw head or tip,",
        "gear tooth, capsule chip, mesh wire); 'extra' (a stray nut beside the object) is a logical anomaly.",
    ]
    return "\n".join(lines) + "\n"


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def generate(
    root: str | os.PathLike,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    image_size: int = 256,
    n_train: int = 60,
    n_test_good: int = 12,
    n_per_defect: int = 6,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the dataset to ``root`` (replacing an earlier generation there) and return ``root``.

    Everything is written into a sibling temporary folder that is renamed into place with its
    completion marker, so an interrupted run never leaves a dataset that looks complete.
    """
    root = Path(root).expanduser()
    settings = _settings(seed, categories, image_size, n_train, n_test_good, n_per_defect)
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and _read_marker(root) is None)):
        raise DataError(f"{root} exists and is not a jaxad synthetic dataset; give a new or empty folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.{os.getpid()}-{time.time_ns()}.partial"
    tmp.mkdir()
    try:
        layout, jobs = _layout(settings), []
        for category, splits in layout.items():
            for split, count in splits.items():
                (tmp / category / split).mkdir(parents=True)
                if not split.endswith("/good"):
                    (tmp / category / "ground_truth" / split.removeprefix("test/")).mkdir(parents=True)
                jobs += [(category, split, i, max(3, len(str(count - 1)))) for i in range(count)]
        left = {c: sum(splits.values()) for c, splits in layout.items()}
        start = time.perf_counter()
        # Threads, not processes: numpy and PNG coding release the GIL, and forking a process that
        # already runs JAX can deadlock.
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        try:
            for category in pool.map(lambda job: _write_image(tmp, seed, image_size, *job), jobs):
                left[category] -= 1
                if left[category] == 0 and progress is not None:
                    total = sum(layout[category].values())
                    progress(f"synthetic {category}: {total} images ({time.perf_counter() - start:.1f}s)")
        finally:
            pool.shutdown(cancel_futures=True)  # an interrupt stops at once instead of finishing the queue
        (tmp / "README.txt").write_text(_readme(settings))
        (tmp / MARKER).write_text(json.dumps(settings, indent=1) + "\n")
        _move_into_place(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _move_into_place(tmp: Path, root: Path) -> None:
    """Rename tmp to root; an earlier generation at root is moved aside first, then deleted."""
    old = None
    if root.exists():
        if any(root.iterdir()):
            old = root.with_name(f".{root.name}.{os.getpid()}.old")
            os.replace(root, old)
        else:
            root.rmdir()
    try:
        os.replace(tmp, root)
    except OSError:
        if _read_marker(root) is None:  # a concurrent run that finished first is as good as ours
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def default_root(seed: int = 0) -> Path:
    """Where ``ensure`` caches the dataset: $JAXAD_CACHE, else ~/.cache/jaxad."""
    cache = os.environ.get("JAXAD_CACHE")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "jaxad"
    return base / f"synthetic-v{VERSION}-seed{seed}"


def ensure(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    image_size: int = 256,
    n_train: int = 60,
    n_test_good: int = 12,
    n_per_defect: int = 6,
    progress: Callable[[str], None] | None = print,
) -> Path:
    """The dataset at ``root`` (default: the cache), generated only when no complete one with
    these settings (or a superset of these categories) is there yet."""
    root = default_root(seed) if root is None else Path(root).expanduser()
    counts = dict(image_size=image_size, n_train=n_train, n_test_good=n_test_good, n_per_defect=n_per_defect)
    want = _settings(seed, categories, **counts)
    have = _read_marker(root)
    if have is not None and set(want["categories"]) <= set(have.get("categories", [])):
        if {k: v for k, v in have.items() if k != "categories"} == {k: v for k, v in want.items() if k != "categories"}:
            return root
    if progress is not None:
        progress(f"generating the synthetic dataset in {root}")
    return generate(root, seed, categories, progress=progress, **counts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaxad.data.synthetic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", nargs="?", type=Path, help="output folder (default: the jaxad cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--categories", help=f"comma-separated subset of {','.join(CATEGORIES)}")
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--n-test-good", type=int, default=12)
    parser.add_argument("--n-per-defect", type=int, default=6)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        root = generate(
            args.root if args.root is not None else default_root(args.seed),
            seed=args.seed,
            categories=args.categories.split(",") if args.categories else None,
            image_size=args.size,
            n_train=args.n_train,
            n_test_good=args.n_test_good,
            n_per_defect=args.n_per_defect,
            progress=print,
        )
    except DataError as err:
        parser.error(str(err))
    print(f"wrote {root} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
