"""From scores to decisions: thresholds set on calibration images, and scores mapped to [0, 1].

A method's scores have no common scale (6e-6 for one, 40 for another), so a fitted model is
calibrated on images it was not fitted on and that are not test images: a held-out part of the
normal training images, or a dataset's ``validation/`` split. Rules (``--config.threshold_rule``):

- ``max``: the largest score on the normal calibration images (CRD, §3.4); no free parameter.
- ``quantile``: the ``threshold_quantile`` quantile of those scores (1 − q of normal images flagged).
- ``f1``: the F1-optimal threshold with labelled defects beside the normal images (synthetic ones
  pasted into the calibration images by :mod:`jaxad.data.anomalies`).

Pixel thresholds follow the same rule on each normal image's largest map value (so that ``max``
flags no pixel of any normal calibration image and ``quantile`` flags some pixel in 1 − q of
them); ``f1`` uses every pixel against the defect masks. The normalisation is linear: the lowest
normal score maps to 0, the threshold to 0.5, clipped to [0, 1], so a normalised 0.5 is the
decision boundary for every method.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad.config import require_between
from jaxad.errors import ConfigError, NumericsError
from jaxad.eval import metrics

RULES = ("max", "quantile", "f1")


def check_settings(config: ml_collections.ConfigDict) -> None:
    """ConfigError for an unknown rule, a quantile outside (0, 1] or a held-out fraction outside [0, 1)."""
    if config.threshold_rule not in RULES:
        raise ConfigError(f"--config.threshold_rule={config.threshold_rule}: choose one of {', '.join(RULES)}")
    require_between(config, "threshold_quantile", 0.0, 1.0, high_closed=True)
    require_between(config, "calibration_fraction", 0.0, 1.0, low_closed=True)


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values, np.float64)
    if not np.isfinite(values).all():
        raise NumericsError(f"calibration: {np.sum(~np.isfinite(values))} non-finite {what}; the model's scores are broken")
    return values


def _threshold(rule: str, quantile: float, normal: np.ndarray, defect: np.ndarray | None, targets: np.ndarray | None) -> float:
    """The rule's threshold; ``normal`` holds one value per normal image (``max``/``quantile``)."""
    if rule == "max":
        return float(normal.max())
    if rule == "quantile":
        return float(np.quantile(normal, quantile))
    return float(metrics.f1_max(defect, targets)[1])


def _span(threshold: float, low: float) -> float:
    """Distance from the lowest normal score to the threshold, the unit of the normalisation.
    When no normal score lies below the threshold (one calibration image, or all scores equal),
    the threshold's own magnitude: 0 then maps to 0 for the non-negative scores of distances."""
    span = threshold - low
    return span if span > 0 else abs(threshold) if threshold != 0 else 1.0


def calibrate(
    rule: str,
    quantile: float,
    normal_scores: np.ndarray,
    normal_maps: np.ndarray,
    defect_scores: np.ndarray | None = None,
    defect_maps: np.ndarray | None = None,
    defect_masks: np.ndarray | None = None,
) -> dict[str, Any]:
    """Image and pixel thresholds and normalisations from calibration scores and maps.

    ``normal_*``: [N] and [N, H, W] of normal images; ``defect_*`` (rule ``f1`` only): the same
    for images with defects, and their [M, H, W] masks. Returns a JSON-able dict."""
    normal_scores = _finite(normal_scores, "image scores")
    normal_maps = _finite(normal_maps, "map values")
    if rule == "f1":
        if defect_scores is None or len(defect_scores) == 0:
            raise ConfigError("--config.threshold_rule=f1 needs calibration images with defects")
        image_values = np.concatenate([normal_scores, _finite(defect_scores, "image scores")])
        image_targets = np.r_[np.zeros(len(normal_scores)), np.ones(len(defect_scores))]
        pixel_values = np.concatenate([normal_maps.ravel(), _finite(defect_maps, "map values").ravel()])
        pixel_targets = np.concatenate([np.zeros(normal_maps.size), np.asarray(defect_masks, bool).ravel()])
    else:
        image_values = image_targets = pixel_values = pixel_targets = None
    image_t = _threshold(rule, quantile, normal_scores, image_values, image_targets)
    pixel_t = _threshold(rule, quantile, normal_maps.reshape(len(normal_maps), -1).max(1), pixel_values, pixel_targets)
    image_low, pixel_low = float(normal_scores.min()), float(normal_maps.min())
    return {
        "rule": rule,
        "quantile": float(quantile) if rule == "quantile" else None,
        "image_threshold": image_t, "image_low": image_low, "image_span": _span(image_t, image_low),
        "pixel_threshold": pixel_t, "pixel_low": pixel_low, "pixel_span": _span(pixel_t, pixel_low),
    }


def normalise(values: jax.Array, threshold: float, span: float) -> jax.Array:
    """Scores → [0, 1]: ``threshold`` ↦ 0.5, ``threshold − span`` (the lowest normal score) ↦ 0."""
    return jnp.clip(0.5 + 0.5 * (values - threshold) / span, 0.0, 1.0).astype(jnp.float32)


def decide(calibration: dict, scores: jax.Array, maps: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Raw (scores [B], maps [B, H, W]) → (normalised scores, anomalous [B] bool, normalised maps).

    An image is anomalous when its raw score reaches the threshold (normalised ≥ 0.5); a pixel is
    part of the predicted defect when its normalised value reaches 0.5."""
    labels = scores >= calibration["image_threshold"]
    return (normalise(scores, calibration["image_threshold"], calibration["image_span"]), labels,
            normalise(maps, calibration["pixel_threshold"], calibration["pixel_span"]))


def decision_metrics(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float | int]:
    """Accuracy, precision, recall and F1 of boolean decisions against boolean truth, with the
    confusion counts; a ratio with an empty denominator is NaN."""
    predicted, truth = np.asarray(predicted, bool).ravel(), np.asarray(truth, bool).ravel()
    tp, fp = int(np.sum(predicted & truth)), int(np.sum(predicted & ~truth))
    fn, tn = int(np.sum(~predicted & truth)), int(np.sum(~predicted & ~truth))

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return {"accuracy": ratio(tp + tn, tp + tn + fp + fn), "precision": ratio(tp, tp + fp),
            "recall": ratio(tp, tp + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}
