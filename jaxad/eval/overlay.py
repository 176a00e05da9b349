"""Decisions drawn on images: anomaly maps on the colour scale the calibration fixes, with the
predicted defect outlined.

Normalised maps (:mod:`jaxad.eval.calibration`) put every method's pixel threshold at 0.5, so the
scale runs from 0 to 1 for every image and every run: the same colour means the same raw map value
of the same fitted model, whatever else is drawn with it, and the outline is where the colour
crosses the middle of the bar. Nothing here looks at more than the one image being drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from jaxad import checkpoint
from jaxad.eval import calibration, report

THRESHOLD = 0.5  # of normalised scores and maps


def normalised(calibrated: Mapping, scores: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw (scores, maps) → their normalised values in [0, 1], by the stored calibration alone."""
    return (np.asarray(calibration.normalise(scores, calibrated["image_threshold"], calibrated["image_span"])),
            np.asarray(calibration.normalise(maps, calibrated["pixel_threshold"], calibrated["pixel_span"])))


def decision_panel(image: np.ndarray, normalised_map: np.ndarray, title: str, truth: np.ndarray | None = None) -> Image.Image:
    """[input | map overlay, predicted defect (normalised map ≥ 0.5) outlined in white | ground truth
    when ``truth`` is given], a colour bar from 0 to 1 with the threshold marked."""
    return report.panel(image, normalised_map, truth, title, 0.0, 1.0, threshold=THRESHOLD)


def save_decision(path: str | Path, image: np.ndarray, normalised_map: np.ndarray, title: str,
                  truth: np.ndarray | None = None) -> Path:
    """Write :func:`decision_panel` as a PNG."""
    path = Path(path)
    with checkpoint.replacing(path) as tmp:
        decision_panel(image, normalised_map, title, truth).save(tmp)
    return path


def save_decisions(out_dir: str | Path, calibrated: Mapping, images: np.ndarray, scores: np.ndarray, maps: np.ndarray,
                   names: Sequence[str], truths: np.ndarray | None = None) -> list[Path]:
    """One :func:`decision_panel` PNG per image in ``out_dir``, from raw ``scores`` [N] and ``maps``
    [N, h, w]; titled with the name, the decision and the normalised score."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    norm_scores, norm_maps = normalised(calibrated, np.asarray(scores), np.asarray(maps))
    paths = []
    for i, (name, stem) in enumerate(zip(names, report.file_stems(names))):
        verdict = "anomalous" if scores[i] >= calibrated["image_threshold"] else "normal"
        paths.append(save_decision(out_dir / f"{stem}.png", images[i], norm_maps[i],
                                   f"{name}: {verdict} {norm_scores[i]:.3f}", None if truths is None else truths[i]))
    return paths
