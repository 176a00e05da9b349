"""Anomaly-detection metrics, exact and vectorised for ~10^8 pixels.

Every curve comes from one sort per class: the normal (or background) scores and the anomalous
(or defect) scores are sorted separately and counted at every distinct score, so tied scores form a
single curve point, as in scikit-learn. Scores keep their float dtype (float32 maps stay float32).

A set holding only one class has no ROC: the scalar metrics then return NaN (reported as n/a)
instead of failing, since test sets with only good images are common in practice. Non-finite
scores raise :class:`~jaxad.errors.DataError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from jaxad.errors import DataError

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class _Split(NamedTuple):
    """Scores of each class in ascending order; ``weight`` (optional) is aligned with ``pos``."""

    pos: np.ndarray
    neg: np.ndarray
    weight: np.ndarray | None = None


class _Curve(NamedTuple):
    """Counts at every distinct score, highest first: ``tp``/``fp`` count scores ≥ ``thresholds``."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_pos: float
    n_neg: int


def _scores(scores: Any, what: str) -> np.ndarray:
    """Float array of scores, rejecting NaN/inf, which would make any ranking meaningless."""
    a = np.asarray(scores)
    if not np.issubdtype(a.dtype, np.floating) or a.dtype == np.float16:
        a = a.astype(np.float32 if a.dtype == np.float16 else np.float64)
    bad = a.size - int(np.count_nonzero(np.isfinite(a)))
    if bad:
        raise DataError(f"{what} contain {bad} NaN or infinite values (of {a.size}); the model produced non-finite output")
    return a


def _targets(labels: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Boolean targets (nonzero = anomalous) of the same shape as the scores."""
    t = np.asarray(labels)
    if t.shape != shape:
        raise DataError(f"{what} have shape {t.shape} but the scores have shape {shape}")
    return t.astype(bool, copy=False)


def _split(scores: Any, labels: Any, names: tuple[str, str] = ("scores", "labels")) -> _Split:
    """Sort each class's scores: two sorts of the class sizes, no n-sized index arrays."""
    s = _scores(scores, names[0])
    t = _targets(labels, s.shape, names[1])
    pos, neg = s[t], s[~t]
    pos.sort()
    neg.sort()
    return _Split(pos, neg)


def _split_regions(maps: Any, masks: Any) -> tuple[_Split, int]:
    """Defect pixels weighted by 1/|their 8-connected region| (per 2-D mask); the region count."""
    m = _scores(maps, "anomaly maps")
    t = _targets(masks, m.shape, "masks")
    if m.ndim < 2:
        raise DataError(f"anomaly maps must be [..., H, W] images, got shape {m.shape}")
    m2, t2 = m.reshape(-1, *m.shape[-2:]), t.reshape(-1, *t.shape[-2:])
    pos, weight, n_regions = [], [], 0
    for image, mask in zip(m2, t2):
        if not mask.any():
            continue
        regions, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        ids = regions[mask]
        weight.append(1.0 / np.bincount(ids)[ids])
        pos.append(image[mask])
        n_regions += n
    neg = m[~t]
    neg.sort()
    if not pos:
        return _Split(m[:0], neg, np.zeros(0)), 0
    pos_all = np.concatenate(pos)
    order = np.argsort(pos_all)
    return _Split(pos_all[order], neg, np.concatenate(weight)[order]), n_regions


def _runs(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of an ascending array and how often each occurs, without sorting again."""
    if a.size == 0:
        return a, np.zeros(0, dtype=np.int64)
    change = np.empty(a.size, dtype=bool)
    change[0] = True
    np.not_equal(a[1:], a[:-1], out=change[1:])
    starts = np.flatnonzero(change)
    return a[starts], np.diff(starts, append=a.size)


def _curve(split: _Split) -> _Curve:
    """Cumulative positives and negatives at each distinct score, highest first (unweighted).

    The two classes' distinct values are merged by a stable sort of two ascending runs (a single
    merge pass); the first entry of each tie group then sees exactly the counts strictly below it.
    """
    (vp, cp), (vn, cn) = _runs(split.pos), _runs(split.neg)
    merged = np.concatenate([vp, vn])
    order = np.argsort(merged, kind="stable")
    values = merged[order]
    first = np.empty(values.size, dtype=bool)
    first[:1] = True
    np.not_equal(values[1:], values[:-1], out=first[1:])
    counts = []
    for c in (np.concatenate([cp, np.zeros_like(cn)])[order], np.concatenate([np.zeros_like(cp), cn])[order]):
        below = np.cumsum(c)
        below -= c
        counts.append(below[first])
    below_pos, below_neg = counts
    tp = (split.pos.size - below_pos[::-1]).astype(np.float64)
    fp = (split.neg.size - below_neg[::-1]).astype(np.float64)
    return _Curve(values[first][::-1], tp, fp, float(split.pos.size), int(split.neg.size))


def _weighted(c: _Curve, split: _Split) -> _Curve:
    """The same curve with each positive counting its weight instead of 1."""
    at_or_above = np.zeros(split.pos.size + 1)
    np.cumsum(split.weight[::-1], out=at_or_above[-2::-1])
    below_pos = (c.n_pos - c.tp).astype(np.int64)
    return c._replace(tp=at_or_above[below_pos], n_pos=float(at_or_above[0]))


def _one_class(split: _Split) -> bool:
    return split.pos.size == 0 or split.neg.size == 0


def _auroc(c: _Curve) -> float:
    """Trapezoid under the ROC curve from (0, 0): ties count one half, as Mann–Whitney."""
    tp = np.concatenate([[0.0], c.tp])
    fp = np.concatenate([[0.0], c.fp])
    return float(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])) / (2.0 * c.n_pos * c.n_neg))


def _ap(c: _Curve) -> float:
    """Step-wise average precision: Σ (R_k − R_{k−1}) · P_k, as scikit-learn."""
    recall_step = np.diff(c.tp, prepend=0.0) / c.n_pos
    return float(np.sum(recall_step * (c.tp / (c.tp + c.fp))))


def _f1_max(c: _Curve) -> tuple[float, float]:
    """Best F1 over all thresholds (predict anomalous when score ≥ threshold)."""
    f1 = 2.0 * c.tp / (c.tp + c.fp + c.n_pos)
    k = int(np.argmax(f1))
    return float(f1[k]), float(c.thresholds[k])


def _pro_area(c: _Curve, n_regions: int, fpr_limit: float) -> float:
    """Area under PRO(FPR) from (0, 0) up to ``fpr_limit``, linearly interpolated there, / limit."""
    fpr = np.concatenate([[0.0], c.fp / c.n_neg])
    pro = np.concatenate([[0.0], c.tp / n_regions])
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))
    if k < fpr.size:
        t = (fpr_limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
        fpr = np.append(fpr[:k], fpr_limit)
        pro = np.append(pro[:k], pro[k - 1] + t * (pro[k] - pro[k - 1]))
    return float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / (2.0 * fpr_limit))


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), starting at (0, 0) with threshold +inf; one point per distinct score.

    Unlike scikit-learn, collinear points are kept. Raises DataError when a class is missing.
    """
    split = _split(scores, labels)
    if _one_class(split):
        raise DataError("a ROC curve needs both normal and anomalous samples")
    c = _curve(split)
    return (
        np.concatenate([[0.0], c.fp / c.n_neg]),
        np.concatenate([[0.0], c.tp / c.n_pos]),
        np.concatenate([[np.inf], c.thresholds.astype(np.float64)]),
    )


def image_auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC of image scores (label nonzero = anomalous); NaN with one class."""
    split = _split(scores, labels)
    return float("nan") if _one_class(split) else _auroc(_curve(split))


def image_ap(scores: Any, labels: Any) -> float:
    """Average precision of image scores; NaN with one class."""
    split = _split(scores, labels)
    return float("nan") if _one_class(split) else _ap(_curve(split))


def f1_max(scores: Any, labels: Any) -> tuple[float, float]:
    """(best F1, its threshold) for any shape of scores (images or pixel maps); NaNs with one class."""
    split = _split(scores, labels)
    return (float("nan"), float("nan")) if _one_class(split) else _f1_max(_curve(split))


def pixel_auroc(maps: Any, masks: Any) -> float:
    """ROC area over all pixels of all images (mask nonzero = defect); NaN with one class."""
    split = _split(maps, masks, ("anomaly maps", "masks"))
    return float("nan") if _one_class(split) else _auroc(_curve(split))


def pixel_ap(maps: Any, masks: Any) -> float:
    """Average precision over all pixels of all images; NaN with one class."""
    split = _split(maps, masks, ("anomaly maps", "masks"))
    return float("nan") if _one_class(split) else _ap(_curve(split))


def aupro(maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (the tables' PRO).

    Regions are the 8-connected components of each [H, W] mask; every pixel outside them, normal
    images included, is background. NaN when there is no defect or no background pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    split, n_regions = _split_regions(maps, masks)
    if _one_class(split):
        return float("nan")
    return _pro_area(_weighted(_curve(split), split), n_regions, fpr_limit)


def evaluate(image_scores: Any, labels: Any, maps: Any = None, masks: Any = None, fpr_limit: float = 0.3) -> dict[str, float]:
    """Every image metric, plus the pixel ones when maps and masks are given; one sort per class."""
    split = _split(image_scores, labels)
    out: dict[str, float] = dict.fromkeys(["image_auroc", "image_ap", "image_f1_max", "image_f1_threshold"], float("nan"))
    if not _one_class(split):
        c = _curve(split)
        out["image_auroc"], out["image_ap"] = _auroc(c), _ap(c)
        out["image_f1_max"], out["image_f1_threshold"] = _f1_max(c)
    if maps is None:
        return out
    if masks is None:
        raise DataError("pixel metrics need ground-truth masks alongside the anomaly maps")
    pixel_keys = ["pixel_auroc", "pixel_ap", "aupro", "pixel_f1_max", "pixel_f1_threshold"]
    out.update(dict.fromkeys(pixel_keys, float("nan")))
    split, n_regions = _split_regions(maps, masks)
    if not _one_class(split):
        c = _curve(split)
        out["pixel_auroc"], out["pixel_ap"] = _auroc(c), _ap(c)
        out["pixel_f1_max"], out["pixel_f1_threshold"] = _f1_max(c)
        out["aupro"] = _pro_area(_weighted(c, split), n_regions, fpr_limit)
    return out


def _groups(labels: Any, groups: Sequence[str], n: int) -> dict[str, np.ndarray]:
    """For each anomalous group (defect type): which of the ``n`` items are it or normal."""
    t = _targets(labels, (n,), "labels")
    g = np.array([str(x) for x in groups])
    if g.shape != t.shape:
        raise DataError(f"groups have shape {g.shape} but there are {n} scores")
    return {name: ~t | (g == name) for name in sorted(set(g[t].tolist()))}


def evaluate_by_group(image_scores: Any, labels: Any, groups: Sequence[str]) -> dict[str, float]:
    """Image AUROC of each anomalous group (defect type) against all normal images, by group name."""
    s = _scores(image_scores, "scores")
    t = _targets(labels, s.shape, "labels")
    return {name: image_auroc(s[chosen], t[chosen]) for name, chosen in _groups(t, groups, s.size).items()}


def pixel_metrics_by_group(maps: Any, masks: Any, labels: Any, groups: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Pixel AUROC and AP of each anomalous group's images together with all normal images, and
    the group's number of defect pixels.

    A dataset's pixel metrics are dominated by the defect type with the largest masks; this shows
    which type a method localises and which it misses, and how much each type weighs.
    """
    m = _scores(maps, "anomaly maps")
    k = _targets(masks, m.shape, "masks")
    out = {}
    for name, chosen in _groups(labels, groups, len(m)).items():
        split = _split(m[chosen], k[chosen])
        out[name] = {"pixel_auroc": float("nan"), "pixel_ap": float("nan"), "defect_pixels": int(k[chosen].sum())}
        if not _one_class(split):
            c = _curve(split)
            out[name].update(pixel_auroc=_auroc(c), pixel_ap=_ap(c))
    return out
