"""Choose one setting on held-out training images with synthetic anomalies, never on test data.

For each candidate value of one config key, the method is fitted on the training images minus a
seeded held-out fraction; the held-out images are scored as they are (normal) and with one
synthetic anomaly pasted into each (:func:`jaxad.pipeline.synthetic_defects`, the pastes threshold
calibration uses). Image AUROC separates the two copies; pixel AUROC, AUPRO and pixel AP score the
pasted regions against every clean pixel. The chosen value maximises image AUROC + AUPRO (the image
decision and the localisation count alike); a tie goes to the value listed first. The dataset's
test split is never opened.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from jaxad import pipeline
from jaxad.bench import harness
from jaxad.config import apply_overrides
from jaxad.data import open_dataset
from jaxad.errors import ConfigError
from jaxad.eval import metrics, report
from jaxad.train import loop

HELDOUT = 0.2  # fraction of the training images held out to score the candidates
SCORES = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")  # reported as synthetic_* (not test numbers)


def parse(spec: str) -> tuple[str, list[str]]:
    """``'feature_sigma=0,4,8'`` → ``('feature_sigma', ['0', '4', '8'])``."""
    return harness.parse_values("--select", spec)


def held_out_scores(config: ml_collections.ConfigDict, category: Path, heldout: float = HELDOUT) -> dict[str, Any]:
    """Fit ``config`` on the training images of ``category`` less a seeded ``heldout`` fraction and
    score those held-out images clean and with pasted anomalies; the test split stays unread."""
    dataset = open_dataset(category)
    kept, held = loop.hold_out(len(dataset.train), heldout, config.seed)
    if not len(held):
        raise ConfigError(f"{category}: {len(dataset.train)} training image(s) leave none to hold out for --select")
    fitted = dataclasses.replace(dataset, train=tuple(dataset.train[i] for i in kept), validation=(), test=())
    samples = tuple(dataset.train[i] for i in held)
    backbone = pipeline.load_backbone(config)
    state, fit_seconds = pipeline.fit(config, fitted, backbone)
    saved = {k: v for k, v in state.items() if k not in pipeline.RUNTIME_KEYS}
    predictor = pipeline.make_predictor(config, backbone, saved)
    s_normal, m_normal, _ = pipeline.scores_and_maps(config, predictor, samples, "select normal")
    s_pasted, m_pasted, masks = pipeline.scores_and_maps(config, predictor, samples, "select pasted",
                                                         pipeline.synthetic_defects(config))
    labels = np.concatenate([np.zeros(len(samples), np.int32), masks.any(axis=(1, 2)).astype(np.int32)])
    found = metrics.evaluate(np.concatenate([s_normal, s_pasted]), labels, np.concatenate([m_normal, m_pasted]),
                             np.concatenate([np.zeros_like(masks), masks]))
    return {**{f"synthetic_{k}": found[k] for k in SCORES}, "n_fit": len(kept), "n_heldout": len(held),
            "fit_seconds": fit_seconds}


def chosen(rows: Sequence[dict[str, Any]]) -> int:
    """Index of the row with the largest image AUROC + AUPRO (the first among equals; NaN never wins)."""
    totals = [np.nan_to_num(r["synthetic_image_auroc"] + r["synthetic_aupro"], nan=-np.inf) for r in rows]
    return int(np.argmax(totals))


def sweep(configs: dict[tuple[str, str], ml_collections.ConfigDict], datasets: Sequence[Path], key: str,
          values: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (method, variant, dataset, value), the chosen value of each series flagged."""
    rows = []
    for (method, variant), base in configs.items():
        if key not in base:
            raise ConfigError(f"--select {key}: {method} has no config key {key!r}")
        for data in datasets:
            series = []
            for value in values:
                config = apply_overrides(base, [f"--config.{key}={value}"])
                series.append({"dataset": data.name, "method": method, "variant": variant, key: value,
                               **held_out_scores(config, data)})
            series[chosen(series)]["chosen"] = "✓"
            rows += series
    return rows


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def write_selection(out: Path, section: str, command: str, configs: dict[tuple[str, str], ml_collections.ConfigDict],
                    datasets: Sequence[Path], spec: str, note: str = "") -> None:
    """Run :func:`sweep` for ``spec`` (``KEY=V1,V2,...``) and write the section ``section`` of
    ``out``: the table, the chosen value per series, and (numeric values) a plot per dataset."""
    key, values = parse(spec)
    start = time.perf_counter()
    rows = sweep(configs, datasets, key, values)
    folder = Path(out).parent / "benchmarks" / section
    plots = []
    if all(_number(v) is not None for v in values):
        for data in datasets:
            series = {}
            for (method, variant) in configs:
                mine = [r for r in rows if (r["dataset"], r["method"], r["variant"]) == (data.name, method, variant)]
                for score in ("synthetic_image_auroc", "synthetic_aupro"):
                    name = f"{method}/{variant} {score.removeprefix('synthetic_')}"
                    series[name] = ([_number(r[key]) for r in mine], [r[score] for r in mine])
            plots.append(report.save_line_plot(folder / f"{data.name}_{key}.png", series, key,
                                               "on held-out images with synthetic anomalies", f"{key}: {data.name}"))
    picks = [f"{r['method']}/{r['variant']} {r['dataset']}: {key} = {r[key]}" for r in rows if r.get("chosen")]
    columns = ["dataset", "method", "variant", key, *[f"synthetic_{k}" for k in SCORES], "n_fit", "n_heldout",
               "fit_seconds", "chosen"]
    lines = [f"## Selecting {key} on held-out training images with synthetic anomalies", "",
             *report.provenance(command, harness.machine()), "", report.markdown_table(rows, columns), "",
             f"Chosen (largest image AUROC + AUPRO on the held-out images): {'; '.join(picks)}. "
             f"Fitted on the training images less a seeded {HELDOUT:.0%}, scored on those held out, clean and with "
             f"one pasted synthetic anomaly each; no test image was read ({time.perf_counter() - start:.0f} s in all). "
             + " ".join(f"![{p.stem}]({os.path.relpath(p, Path(out).parent)})" for p in plots), ""]
    if note:
        lines += [note, ""]
    harness.write_section(out, section, "\n".join(lines))
