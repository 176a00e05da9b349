"""``W/report.html``: one evaluated run on one self-contained page.

What a person needs to judge a fitted model without the run's other files or a server: the
metrics, ROC and precision-recall curves, results per defect type, the decision threshold with
its confusion matrix, and the test images the model ranks worst, each with its anomaly map.
Pictures are PNGs inlined as base64 ``data:`` URIs, so the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxad import checkpoint
from jaxad.data import Sample, read_image, resize_image
from jaxad.eval import overlay, report

SHOWN = 6  # images in each gallery

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
.meta, .note { color: #555; } table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; } th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.curves img { width: 48%; min-width: 360px; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.6em; } .gallery img { max-width: 100%; }
"""


def decision_threshold(result: Mapping[str, Any], calibrated: Mapping[str, Any] | None) -> tuple[float, str]:
    """The image-score threshold of the report's decisions and a sentence saying where it comes from.

    The threshold calibrated at fit time when the model has one; else the best-F1 threshold, which
    is chosen with the test labels and so flatters the decisions it makes."""
    if calibrated is not None:
        return float(calibrated["image_threshold"]), "the threshold stored with the model at fit time"
    return float(result["image_f1_threshold"]), (
        "the best-F1 threshold on this test set: chosen with the test labels, so these decisions are "
        "optimistic; the model stores no calibrated threshold")


def _number(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.4f}" if value == 0.0 or 0.01 <= abs(value) <= 1.0 else f"{value:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table; numbers right-aligned, text escaped."""
    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return f'<td class="num">{_number(float(v))}</td>'
        if isinstance(v, (int, np.integer)):
            return f'<td class="num">{int(v)}</td>'
        return f"<td>{html.escape(str(v))}</td>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(image: Image.Image, alt: str) -> str:
    """An <img> holding ``image`` as an inlined PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _metrics_table(result: Mapping[str, Any]) -> str:
    """Every scalar entry of the metrics, in their order (nested per-defect entries have their own table)."""
    rows = [(k, float(v) if isinstance(v, float) else v) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return _table(["metric", "value"], rows)


def _confusion(flagged: np.ndarray, anomalous: np.ndarray) -> str:
    """Counts of actual × predicted class, then accuracy, precision and recall of the decisions."""
    tp, fp = int(np.sum(flagged & anomalous)), int(np.sum(flagged & ~anomalous))
    fn, tn = int(np.sum(~flagged & anomalous)), int(np.sum(~flagged & ~anomalous))
    matrix = _table(["actual \\ predicted", "normal", "anomalous"], [("normal", tn, fp), ("anomalous", fn, tp)])
    nan = float("nan")
    rates = _table(["accuracy", "precision", "recall"], [(
        (tp + tn) / max(tp + tn + fp + fn, 1), tp / (tp + fp) if tp + fp else nan, tp / (tp + fn) if tp + fn else nan)])
    return matrix + rates


def _per_defect(result: Mapping[str, Any], defects: np.ndarray, flagged: np.ndarray) -> str:
    """One row per test folder: its images, how many the threshold flags, and its AUROC / AP."""
    image_auroc = result.get("per_defect_image_auroc", {})
    pixel = result.get("per_defect_pixel", {})
    rows = []
    for name in sorted(set(defects.tolist()), key=lambda d: (d != "good", d)):
        chosen = defects == name
        p = pixel.get(name, {})
        rows.append((name, int(chosen.sum()), int(flagged[chosen].sum()), image_auroc.get(name, ""),
                     p.get("pixel_auroc", ""), p.get("pixel_ap", ""), p.get("defect_pixels", "")))
    header = ["type", "images", "flagged anomalous", "image AUROC", "pixel AUROC", "pixel AP", "defect pixels"]
    return _table(header, rows)


def _gallery(indices: Sequence[int], samples: Sequence[Sample], scores: np.ndarray, maps: np.ndarray,
             masks: np.ndarray, flagged: np.ndarray, size: tuple[int, int], calibrated: Mapping[str, Any] | None,
             scale: tuple[float, float]) -> str:
    """Input | map overlay | ground truth of each chosen test image, read again from its file: on the
    calibration's fixed scale with the predicted defect outlined, or without one on ``scale``."""
    out = []
    for i in indices:
        name = f"{samples[i].defect}/{Path(samples[i].path).name}"
        title = f"{name}   score {scores[i]:.4g}, called {'anomalous' if flagged[i] else 'normal'}"
        image = resize_image(read_image(samples[i].path), size)
        mask = masks[i] if masks[i].any() else None
        if calibrated is not None:
            drawn = overlay.decision_panel(image, overlay.normalised(calibrated, scores[i], maps[i])[1], title, mask)
        else:
            drawn = report.panel(image, maps[i], mask, title, *scale)
        out.append(_png(drawn, name))
    return f'<div class="gallery">{"".join(out)}</div>' if out else '<p class="note">none in the test set</p>'


def write(path: str | Path, title: str, result: Mapping[str, Any], scores: np.ndarray, maps: np.ndarray,
          masks: np.ndarray, samples: Sequence[Sample], size: tuple[int, int],
          calibrated: Mapping[str, Any] | None = None) -> Path:
    """Write the report of one evaluated run to ``path``.

    ``result`` is the run's metrics (as in metrics.json); ``scores``, ``maps`` and ``masks`` are the
    test split's image scores, anomaly maps and ground-truth masks, in the order of ``samples``;
    ``size`` is the (H, W) the model saw, to which the shown images are resized; ``calibrated`` the
    model's stored calibration (:mod:`jaxad.eval.calibration`), if it has one.
    """
    scores, maps, masks = np.asarray(scores, np.float64), np.asarray(maps, np.float32), np.asarray(masks, bool)
    anomalous = np.array([s.label != 0 for s in samples])
    defects = np.array([s.defect for s in samples])
    value, source = decision_threshold(result, calibrated)
    flagged = scores >= value  # the rule of every threshold in jaxad.eval.metrics
    both = anomalous.any() and (~anomalous).any()
    scale = tuple(float(v) for v in np.percentile(maps, [1.0, 99.9]))
    colours = ("Maps share the colour scale the calibration fixed: normalised map values from 0 (blue) to 1 (red), "
               "the pixel threshold at 0.5; the predicted defect is outlined in white." if calibrated is not None else
               f"Maps share one colour scale, from {scale[0]:.4g} (blue) to {scale[1]:.4g} (red), the test maps' "
               "1st and 99.9th percentiles (the model stores no calibration).")
    normal, defective = np.flatnonzero(~anomalous), np.flatnonzero(anomalous)
    worst_normal = normal[np.argsort(-scores[normal], kind="stable")][:SHOWN]
    worst_defects = defective[np.argsort(scores[defective], kind="stable")][:SHOWN]
    curves = (_png(report.roc_plot(scores, anomalous, f"ROC: {title}"), "ROC curve")
              + _png(report.pr_plot(scores, anomalous, f"precision-recall: {title}"), "precision-recall curve")
              if both else '<p class="note">The curves need both normal and defective test images.</p>')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">{len(samples)} test images: {len(normal)} normal, {len(defective)} defective ·
written {time.strftime('%Y-%m-%d %H:%M')}</p>
<h2>Metrics</h2>
{_metrics_table(result)}
<h2>Decisions at threshold {_number(value)}</h2>
<p>An image is called anomalous when its score is at least {_number(value)}, {html.escape(source)}.</p>
{_confusion(flagged, anomalous)}
<h2>Curves</h2>
<div class="curves">{curves}</div>
<h2>Per defect type</h2>
<p class="note">Image AUROC and pixel metrics of each type's images together with all normal test images.</p>
{_per_defect(result, defects, flagged)}
<h2>Normal images with the highest scores</h2>
<p class="note">The false alarms, if any, come first. {html.escape(colours)}</p>
{_gallery(worst_normal, samples, scores, maps, masks, flagged, size, calibrated, scale)}
<h2>Defective images with the lowest scores</h2>
<p class="note">The missed defects, if any, come first; ground truth outlined in green.</p>
{_gallery(worst_defects, samples, scores, maps, masks, flagged, size, calibrated, scale)}
</body></html>
"""
    path = Path(path)
    checkpoint.write_text(path, page)
    return path
