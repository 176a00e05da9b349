"""Metrics: agreement with scikit-learn, hand-computed AUPRO cases and a slow reference AUPRO."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from jaxad.errors import DataError
from jaxad.eval import metrics


def _tied_data(rng: np.random.Generator, n: int, decimals: int = 1) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.random(n) < 0.3
    scores = (rng.random(n) + 0.4 * labels).round(decimals)  # rounding makes many ties
    return scores, labels


@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_match_sklearn(seed):
    scores, labels = _tied_data(np.random.default_rng(seed), 300)
    assert metrics.image_auroc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-6)
    assert metrics.image_ap(scores, labels) == pytest.approx(skm.average_precision_score(labels, scores), abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_pixel_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((4, 16, 16)) < 0.1
    maps = (rng.random((4, 16, 16)) + 0.5 * masks).round(2).astype(np.float32)
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-6)
    assert metrics.pixel_ap(maps, masks) == pytest.approx(skm.average_precision_score(masks.ravel(), maps.ravel()), abs=1e-6)


def test_roc_curve_matches_sklearn_without_dropping_points():
    scores, labels = _tied_data(np.random.default_rng(7), 200)
    fpr, tpr, thr = metrics.roc_curve(scores, labels)
    ref_fpr, ref_tpr, ref_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    np.testing.assert_array_equal(thr[1:], ref_thr[1:])
    assert thr[0] == np.inf


def test_f1_max_matches_a_threshold_sweep():
    scores, labels = _tied_data(np.random.default_rng(3), 400)
    best = max((skm.f1_score(labels, scores >= t), t) for t in np.unique(scores))
    f1, threshold = metrics.f1_max(scores, labels)
    assert f1 == pytest.approx(best[0], abs=1e-12)
    assert skm.f1_score(labels, scores >= threshold) == pytest.approx(f1, abs=1e-12)


def test_f1_max_on_pixel_maps():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = True
    maps = masks * 1.0
    assert metrics.f1_max(maps, masks) == (1.0, 1.0)


# ---- AUPRO: hand-computed cases ------------------------------------------------------------------


def test_aupro_perfect_separation():
    # Defects score 1, background 0: the curve is (0,0) → (0,1) → (1,1), so the area is 1.
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:4, 2:5] = True
    masks[1, 6:, :] = True
    assert metrics.aupro(masks * 1.0, masks) == pytest.approx(1.0)


def test_aupro_diagonal_touch_is_one_region():
    # 5×5: defects at (0,0) and (1,1) touch diagonally → ONE region {A} of 2 px; (4,4) is region B.
    # 2 regions, 22 background px. Scores: (0,0)=(4,4)=0.9, (1,1)=0.5; 11 background px 0.7, rest 0.
    #   t=0.9: PRO = (1/2 + 1)/2 = 0.75, FPR 0;  t=0.7: FPR = 11/22 = 0.5;
    #   t=0.5: PRO = 1;                          t=0: FPR = 1.
    # Limit 1: 0.75·0.5 + 1·0.5 = 0.875.  Limit 0.3: the curve is flat at 0.75 there → 0.75.
    # (4-connectivity would give 3 regions, PRO 2/3 at t=0.9, area 0.8333 with limit 1.)
    masks = np.zeros((1, 5, 5), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 4, 4] = True
    maps = np.zeros((1, 5, 5))
    maps[0, 0, 0] = maps[0, 4, 4] = 0.9
    maps[0, 1, 1] = 0.5
    background = np.flatnonzero(~masks.ravel())
    maps.ravel()[background[:11]] = 0.7
    assert metrics.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.875)
    assert metrics.aupro(maps, masks) == pytest.approx(0.75)


def test_aupro_nested_regions():
    # 7×7: a ring (perimeter of the 5×5 square at rows/cols 1..5, 16 px) around a hole with one
    # defect pixel at its centre (3,3): two regions, 49 − 17 = 32 background px.
    # Scores: centre 1.0; 4 ring px 0.8, the other 12 ring px 0.2; 16 background px 0.6, 16 at 0.
    #   t=1.0: PRO = 1/2;  t=0.8: PRO = (1 + 4/16)/2 = 0.625;  t=0.6: FPR = 0.5;
    #   t=0.2: PRO = 1;    t=0: FPR = 1.
    # Limit 1: 0.625·0.5 + 1·0.5 = 0.8125.  Limit 0.3: flat at 0.625 → 0.625.
    masks = np.zeros((1, 7, 7), bool)
    masks[0, 1:6, 1:6] = True
    masks[0, 2:5, 2:5] = False
    masks[0, 3, 3] = True
    maps = np.zeros((1, 7, 7))
    maps[0, 3, 3] = 1.0
    ring = [p for p in np.argwhere(masks[0]) if tuple(p) != (3, 3)]
    for k, (y, x) in enumerate(ring):
        maps[0, y, x] = 0.8 if k < 4 else 0.2
    background = np.flatnonzero(~masks.ravel())
    maps.ravel()[background[:16]] = 0.6
    assert metrics.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.8125)
    assert metrics.aupro(maps, masks) == pytest.approx(0.625)


def test_aupro_normal_images_add_background():
    # Defect image 2×2: one defect px scoring 1, three background px scoring 0 → AUPRO 1 alone.
    # A normal 2×2 image with scores [2, 0, 0, 0] adds 4 background px (7 in all), one above the
    # defect: (0,0) → (1/7, 0) → (1/7, 1) → (1, 1). Area to 0.3: (0.3 − 1/7)·1 / 0.3 = 11/21.
    masks = np.zeros((2, 2, 2), bool)
    masks[0, 0, 0] = True
    maps = np.zeros((2, 2, 2))
    maps[0, 0, 0] = 1.0
    assert metrics.aupro(maps[:1], masks[:1]) == pytest.approx(1.0)
    maps[1, 0, 0] = 2.0
    assert metrics.aupro(maps, masks) == pytest.approx(11 / 21)


def test_aupro_all_scores_tied():
    # One threshold: the curve is the diagonal (0,0) → (1,1); cut at 0.3: 0.3·0.3/2 / 0.3 = 0.15.
    masks = np.zeros((3, 6, 6), bool)
    masks[0, 1:3, 1:3] = True
    masks[2, 4:, :] = True
    assert metrics.aupro(np.full(masks.shape, 0.5, np.float32), masks) == pytest.approx(0.15)


def test_aupro_partly_detected_region():
    # One 4-px region, 2 px at 1 and 2 px at 0; 12 background px at 0.
    # (0,0) → (0, 0.5) → (1, 1): PRO(0.3) = 0.65, area (0.5 + 0.65)/2 · 0.3 / 0.3 = 0.575.
    masks = np.zeros((1, 4, 4), bool)
    masks[0, :2, :2] = True
    maps = np.zeros((1, 4, 4))
    maps[0, 0, :2] = 1.0
    assert metrics.aupro(maps, masks) == pytest.approx(0.575)


def test_aupro_nan_without_defects_or_background():
    maps = np.random.default_rng(0).random((2, 5, 5))
    assert math.isnan(metrics.aupro(maps, np.zeros(maps.shape, bool)))
    assert math.isnan(metrics.aupro(maps, np.ones(maps.shape, bool)))


def test_aupro_rejects_a_bad_limit():
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(np.zeros((1, 2, 2)), np.eye(2)[None], fpr_limit=0.0)


# ---- AUPRO: independent slow reference -------------------------------------------------------------


def _regions(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components by flood fill."""
    seen = np.zeros(mask.shape, bool)
    out = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, region = [start], []
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    q = (y + dy, x + dx)
                    if 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q] and not seen[q]:
                        seen[q] = True
                        stack.append(q)
        out.append(region)
    return out


def _reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """Threshold sweep: mean per-region overlap vs FPR at every distinct score, then integrate."""
    regions = [(i, r) for i in range(len(masks)) for r in _regions(masks[i])]
    background = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        hit = maps >= t
        pro = np.mean([np.mean([hit[i][p] for p in r]) for i, r in regions])
        points.append((hit[background].sum() / background.sum(), pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("seed", range(12))
def test_aupro_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n, h, w = 3, 9, 11
    masks = rng.random((n, h, w)) < rng.uniform(0.05, 0.4)
    masks[rng.integers(n)] = False  # one normal image
    maps = (rng.random((n, h, w)) + rng.uniform(0, 0.6) * masks).round(1)  # ties
    for limit in (0.3, 0.05, 1.0):
        assert metrics.aupro(maps, masks, limit) == pytest.approx(_reference_aupro(maps, masks, limit), abs=1e-6)


# ---- evaluate, groups, edge cases and scale ----------------------------------------------------------


def test_evaluate_reports_every_metric():
    rng = np.random.default_rng(0)
    masks = rng.random((6, 12, 12)) < 0.05
    masks[::2] = False
    maps = rng.random((6, 12, 12)).astype(np.float32) + masks
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    out = metrics.evaluate(scores, labels, maps, masks)
    assert 0.0 < out["image_auroc"] == metrics.image_auroc(scores, labels)
    assert out["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(maps, masks))
    assert out["pixel_ap"] == pytest.approx(metrics.pixel_ap(maps, masks))
    assert out["aupro"] == pytest.approx(metrics.aupro(maps, masks))
    assert (out["pixel_f1_max"], out["pixel_f1_threshold"]) == pytest.approx(metrics.f1_max(maps, masks))
    assert (out["image_f1_max"], out["image_f1_threshold"]) == pytest.approx(metrics.f1_max(scores, labels))
    assert set(metrics.evaluate(scores, labels)) == {"image_auroc", "image_ap", "image_f1_max", "image_f1_threshold"}


def test_evaluate_by_group_against_all_normal_images():
    # Normal [0, 1, 2]. Group a [3, 4] beats all → 1. Group b [0.5, 1]: 0.5 beats 1 normal,
    # 1 beats 1 and ties 1 → (1 + 1.5) / 6.
    scores = [0, 1, 2, 3, 4, 0.5, 1]
    labels = [0, 0, 0, 1, 1, 1, 1]
    groups = ["good", "good", "good", "a", "a", "b", "b"]
    assert metrics.evaluate_by_group(scores, labels, groups) == pytest.approx({"a": 1.0, "b": 2.5 / 6})


def test_pixel_metrics_by_group_against_all_normal_images():
    # One pixel per image. Normal maps [0, 1, 2] (no defect pixels). Group a: its defect pixels
    # score [3, 4] → AUROC 1, AP 1. Group b: [0.5, 1] → AUROC 2.5 / 6 as in the image case.
    maps = np.array([0, 1, 2, 3, 4, 0.5, 1], np.float32).reshape(7, 1, 1)
    labels = [0, 0, 0, 1, 1, 1, 1]
    masks = np.array(labels, bool).reshape(7, 1, 1)
    groups = ["good", "good", "good", "a", "a", "b", "b"]
    out = metrics.pixel_metrics_by_group(maps, masks, labels, groups)
    assert set(out) == {"a", "b"}
    assert out["a"] == pytest.approx({"pixel_auroc": 1.0, "pixel_ap": 1.0, "defect_pixels": 2})
    assert out["b"]["pixel_auroc"] == pytest.approx(2.5 / 6)
    b_only = metrics.pixel_ap(maps[[0, 1, 2, 5, 6]], masks[[0, 1, 2, 5, 6]])
    assert out["b"]["pixel_ap"] == pytest.approx(b_only) and b_only < 1


def test_single_class_gives_nan():
    out = metrics.evaluate(np.arange(4.0), np.zeros(4))
    assert all(math.isnan(v) for v in out.values())
    assert math.isnan(metrics.pixel_auroc(np.ones((1, 3, 3)), np.ones((1, 3, 3))))
    with pytest.raises(DataError, match="both normal and anomalous"):
        metrics.roc_curve([1.0, 2.0], [1, 1])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_scores_raise(bad):
    with pytest.raises(DataError, match="NaN or infinite"):
        metrics.image_auroc([0.1, bad, 0.3], [0, 1, 1])
    maps = np.zeros((1, 3, 3))
    maps[0, 1, 1] = bad
    with pytest.raises(DataError, match="anomaly maps"):
        metrics.evaluate([0.0, 1.0], [0, 1], maps, maps == 0)


def test_shape_mismatch_raises():
    with pytest.raises(DataError, match="shape"):
        metrics.pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


@pytest.mark.slow
def test_ten_million_pixels():
    rng = np.random.default_rng(0)
    masks = np.zeros((40, 500, 500), bool)
    masks[::2, 200:260, 100:180] = True
    maps = rng.standard_normal(masks.shape, dtype=np.float32)
    maps[masks] += 2.0
    out = metrics.evaluate(maps.max(axis=(1, 2)), masks.any(axis=(1, 2)), maps, masks)
    assert 0.9 < out["pixel_auroc"] < 1.0 and 0.0 < out["aupro"] < 1.0
