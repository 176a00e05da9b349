"""A procedural MVTec-LOCO-layout category: a tray holding 3 hex nuts and 2 washers in fixed slots.

Normal images vary in lighting, sensor noise, part pose (position jitter, nut rotation) and part
tone. Logical anomalies use only normal-looking parts: a part missing from its slot, an extra part
lying on the tray, a slot holding the wrong kind of part (wrong count of each kind), or a nut and
a washer swapped (right counts, wrong arrangement). Structural anomalies damage one part: a
scratch or a dent. Masks cover the affected region: the slot of a missing, wrong or swapped part,
the extra part, the damaged pixels. One seed gives the same PNGs on a given platform.

Layout written (as MVTec LOCO, read by :func:`jaxad.data.open_dataset`)::

    ROOT/tray/train/good/000.png            ROOT/tray/validation/good/000.png
    ROOT/tray/test/{good,logical_anomalies,structural_anomalies}/000.png
    ROOT/tray/ground_truth/{logical_anomalies,structural_anomalies}/000/000.png

    python -m jaxad.data.synthetic_loco ROOT [--seed 0] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from jaxad.data.synthetic import add_defect
from jaxad.errors import DataError

NAME = "tray"
MARKER = ".synthetic_loco.json"
LOGICAL = ("missing", "extra", "wrong_part", "swapped")
STRUCTURAL = ("scratch", "dent")
# Slot centres as fractions of the image side, and the part each slot holds in a normal tray.
SLOTS = (((0.27, 0.36), "nut"), ((0.5, 0.36), "nut"), ((0.73, 0.36), "nut"),
         ((0.385, 0.66), "washer"), ((0.615, 0.66), "washer"))
RADIUS = {"nut": 0.075, "washer": 0.07}  # outer radius as a fraction of the image side


@dataclass(frozen=True)
class Part:
    kind: str  # "nut" or "washer"
    cx: float  # centre in pixels
    cy: float
    angle: float  # nut rotation (radians)
    tone: float  # brightness factor


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), shared read-only by every renderer call."""
    y, x = np.meshgrid(np.arange(size, dtype=np.float32) + 0.5, np.arange(size, dtype=np.float32) + 0.5, indexing="ij")
    y.flags.writeable = x.flags.writeable = False
    return y, x


def _cover(sdf: np.ndarray) -> np.ndarray:
    """Antialiased coverage of the region where the signed distance (pixels) is negative."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _part(rng: np.random.Generator, kind: str, cx: float, cy: float) -> Part:
    return Part(kind, cx, cy, float(rng.uniform(0, np.pi / 3)), float(rng.uniform(0.93, 1.07)))


def _normal_parts(rng: np.random.Generator, size: int) -> list[Part]:
    """The five parts in their slots, each shifted by up to 2 % of the side."""
    return [_part(rng, kind, (fx + rng.uniform(-0.02, 0.02)) * size, (fy + rng.uniform(-0.02, 0.02)) * size)
            for (fx, fy), kind in SLOTS]


def _shape(part: Part, size: int, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage [S, S], shade [S, S]) of one part."""
    dx, dy = x - part.cx, y - part.cy
    r = np.hypot(dx, dy)
    radius = RADIUS[part.kind] * size
    if part.kind == "nut":
        a = np.arctan2(dy, dx) - part.angle
        sector = np.floor(a / (np.pi / 3) + 0.5) * (np.pi / 3)  # the facet each pixel faces
        apothem = r * np.cos(a - sector)
        cover = _cover(apothem - radius * np.cos(np.pi / 6)) * _cover(0.42 * radius - r)
        shade = 0.5 + 0.18 * np.cos(sector + part.angle - 0.8) - 0.25 * np.exp(-((r - 0.42 * radius) / 2.0) ** 2)
    else:
        cover = _cover(r - radius) * _cover(0.45 * radius - r)
        shade = 0.72 + 0.12 * np.cos(np.arctan2(dy, dx) - 0.8) * (r / radius) - 0.1 * np.exp(-((r - radius) / 2.0) ** 2)
    return cover, shade * part.tone


def _render(rng: np.random.Generator, parts: Sequence[Part], size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Image [S, S, 3] float32 in [0, 1] and each part's coverage; lighting and noise from rng."""
    y, x = _grid(size)
    lo = 0.1 * size
    q = np.maximum(np.abs(x - size / 2) - (size / 2 - lo - 8), 0) ** 2 + np.maximum(np.abs(y - size / 2) - (size / 2 - lo - 8), 0) ** 2
    tray_sdf = np.sqrt(q) - 8.0
    tray = _cover(tray_sdf)
    image = np.empty((size, size, 3), np.float32)
    image[:] = np.float32([0.22, 0.2, 0.18])
    base = np.float32([0.46, 0.55, 0.66]) * (1 + 0.03 * rng.standard_normal(3)).astype(np.float32)
    rim = 1 - 0.35 * np.exp(-((tray_sdf + 3) / 3.0) ** 2)
    image = image + (base * rim[..., None] - image) * tray[..., None]
    for (fx, fy), kind in SLOTS:  # shallow recesses: an empty slot stays visible
        ring = np.exp(-((np.hypot(x - fx * size, y - fy * size) - (RADIUS[kind] * size + 3)) / 1.5) ** 2)
        image = image * (1 - 0.25 * ring)[..., None]
    covers = []
    metal = {"nut": np.float32([0.72, 0.7, 0.66]), "washer": np.float32([0.8, 0.8, 0.82])}
    for part in parts:
        cover, shade = _shape(part, size, y, x)
        image = image + (metal[part.kind] * shade[..., None] * 1.3 - image) * cover[..., None]
        covers.append(cover)
    ramp = 1 + rng.uniform(-0.06, 0.06) * (x - size / 2) / size + rng.uniform(-0.06, 0.06) * (y - size / 2) / size
    image = image * (rng.uniform(0.93, 1.05) * ramp)[..., None]
    image = image + rng.normal(0, 0.01, image.shape).astype(np.float32)
    return np.clip(image, 0, 1).astype(np.float32), covers


def _disc(size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    y, x = _grid(size)
    return np.hypot(x - cx, y - cy) <= radius


def _free_spot(rng: np.random.Generator, parts: Sequence[Part], size: int, radius: float) -> tuple[float, float]:
    """A tray position whose part of ``radius`` clears every other part and slot by 1.5 % of the side."""
    gap = 0.015 * size
    taken = [(p.cx, p.cy, RADIUS[p.kind] * size) for p in parts]
    taken += [(fx * size, fy * size, RADIUS[k] * size) for (fx, fy), k in SLOTS]
    for _ in range(200):
        cx, cy = rng.uniform(0.1 * size + radius + gap, 0.9 * size - radius - gap, 2)
        if all(np.hypot(cx - tx, cy - ty) > radius + tr + gap for tx, ty, tr in taken):
            return float(cx), float(cy)
    raise DataError(f"synthetic_loco: no free spot for an extra part at size {size}")


def _logical(rng: np.random.Generator, kind: str, parts: list[Part], size: int) -> tuple[list[Part], np.ndarray]:
    """Parts with logical anomaly ``kind`` and its mask (slot discs or the extra part)."""
    def slot_mask(i: int) -> np.ndarray:
        (fx, fy), k = SLOTS[i]
        return _disc(size, fx * size, fy * size, max(RADIUS[k], RADIUS[parts[i].kind]) * size + 6)

    if kind == "missing":
        i = int(rng.integers(len(parts)))
        return parts[:i] + parts[i + 1:], slot_mask(i)
    if kind == "extra":
        what = str(rng.choice(["nut", "washer"]))
        cx, cy = _free_spot(rng, parts, size, RADIUS[what] * size)
        return parts + [_part(rng, what, cx, cy)], _disc(size, cx, cy, RADIUS[what] * size + 3)
    if kind == "wrong_part":
        i = int(rng.integers(len(parts)))
        other = "washer" if parts[i].kind == "nut" else "nut"
        return [replace(p, kind=other) if j == i else p for j, p in enumerate(parts)], slot_mask(i)
    i, j = int(rng.integers(3)), int(3 + rng.integers(2))  # a nut slot and a washer slot
    swapped = list(parts)
    swapped[i], swapped[j] = replace(parts[i], kind="washer"), replace(parts[j], kind="nut")
    return swapped, slot_mask(i) | slot_mask(j)


def _dent(image: np.ndarray, cover: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark pressed-in ellipse with a lit rim, on one part; mask = where it changed the part."""
    size = image.shape[0]
    ys, xs = np.nonzero(cover > 0.99)
    k = int(rng.integers(len(ys)))
    y, x = _grid(size)
    a, r1, r2 = rng.uniform(0, np.pi), rng.uniform(0.025, 0.035) * size, rng.uniform(0.012, 0.02) * size
    u = ((x - xs[k]) * np.cos(a) + (y - ys[k]) * np.sin(a)) / r1
    v = (-(x - xs[k]) * np.sin(a) + (y - ys[k]) * np.cos(a)) / r2
    q = np.hypot(u, v)
    alpha = (np.clip(1.3 - q, 0, 1) * cover).astype(np.float32)
    target = image * np.where(q < 1, 0.45, 1.5)[..., None]
    out = np.clip(image + (target - image) * alpha[..., None], 0, 1).astype(np.float32)
    return out, alpha > 0.05


def render(rng: np.random.Generator, size: int = 256, anomaly: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """One tray image [S, S, 3] float32 and its mask [S, S] bool (None when normal)."""
    parts = _normal_parts(rng, size)
    if anomaly is None:
        return _render(rng, parts, size)[0], None
    if anomaly in LOGICAL:
        parts, mask = _logical(rng, anomaly, parts, size)
        return _render(rng, parts, size)[0], mask
    if anomaly not in STRUCTURAL:
        raise DataError(f"unknown tray anomaly {anomaly!r}; choose from {', '.join(LOGICAL + STRUCTURAL)}")
    image, covers = _render(rng, parts, size)
    cover = covers[int(rng.integers(len(covers)))]
    if anomaly == "scratch":
        return add_defect(image, "scratch", rng, region=cover)
    return _dent(image, cover, rng)


def _files(n_train: int, n_val: int, n_test_good: int, n_per_kind: int) -> list[tuple[str, int, str | None]]:
    """(split folder, index, anomaly) of every image; the anomaly kinds take turns in each folder."""
    jobs = [("train/good", i, None) for i in range(n_train)]
    jobs += [("validation/good", i, None) for i in range(n_val)]
    jobs += [("test/good", i, None) for i in range(n_test_good)]
    for folder, kinds in (("test/logical_anomalies", LOGICAL), ("test/structural_anomalies", STRUCTURAL)):
        jobs += [(folder, i, kinds[i % len(kinds)]) for i in range(n_per_kind * len(kinds))]
    return jobs


def generate(root: str | os.PathLike, seed: int = 0, image_size: int = 256, n_train: int = 60, n_val: int = 10,
             n_test_good: int = 20, n_per_kind: int = 5) -> Path:
    """Write the ``tray`` category under ``root`` (replacing an earlier one written here); returns
    ``root/tray``. ``n_per_kind`` images of each of the 4 logical and 2 structural anomaly kinds."""
    if image_size < 64 or min(n_train, n_val, n_test_good, n_per_kind) < 1 or seed < 0:
        raise DataError("synthetic_loco needs image_size >= 64, seed >= 0 and at least one image per split")
    out = Path(root).expanduser() / NAME
    if out.exists():
        if not (out / MARKER).is_file():
            raise DataError(f"{out} exists and was not written by jaxad.data.synthetic_loco; choose another root")
        shutil.rmtree(out)
    jobs = _files(n_train, n_val, n_test_good, n_per_kind)
    for folder, index, anomaly in jobs:
        rng = np.random.default_rng([seed, zlib.crc32(folder.encode()), index])
        image, mask = render(rng, image_size, anomaly)
        (out / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 + 0.5).astype(np.uint8)).save(out / folder / f"{index:03d}.png", compress_level=1)
        if mask is not None:
            gt = out / "ground_truth" / folder.removeprefix("test/") / f"{index:03d}"
            gt.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(gt / "000.png", compress_level=1)
    settings = {"generator": "jaxad.data.synthetic_loco", "seed": seed, "image_size": image_size, "n_train": n_train,
                "n_val": n_val, "n_test_good": n_test_good, "n_per_kind": n_per_kind,
                "anomalies": {f"{folder}/{i:03d}.png": a for folder, i, a in jobs if a is not None}}
    (out / MARKER).write_text(json.dumps(settings, indent=1) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxad.data.synthetic_loco", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--n-val", type=int, default=10)
    parser.add_argument("--n-test-good", type=int, default=20)
    parser.add_argument("--n-per-kind", type=int, default=5)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = generate(args.root, args.seed, args.size, args.n_train, args.n_val, args.n_test_good, args.n_per_kind)
    except DataError as err:
        parser.error(str(err))
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
