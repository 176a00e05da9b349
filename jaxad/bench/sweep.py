"""Accuracy against λ for CRD: every candidate from one eigendecomposition, in one compiled call.

All candidate λ share the spectrum of G: with z = Vᵀy, ||M_λ y||² = Σ_j (λ / (w_j + λ))² z_j²
(:func:`jaxad.distances.crd.candidate_scores`). So a sweep streams each category's statistics once,
takes one eigendecomposition, and scores every test batch for all K candidates in one compiled
program (features, the projection on V, K small contractions). Categories whose statistics have
the same shapes (one config: the same d, groups and grid) are vmapped into the same call, one test
batch of each side by side, so one program serves the whole sweep.

The curve is measured on the test set: it shows how sensitive a distance is to λ, and is never a
way to choose λ (``lam='auto'`` chooses on synthetic anomalies in held-out training images).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad import pipeline, postprocess
from jaxad.backbones import Backbone
from jaxad.bench import harness
from jaxad.data import Batch, Dataset, iterate_batches, open_dataset
from jaxad.distances import crd, protocol
from jaxad.errors import ConfigError
from jaxad.eval import metrics, report
from jaxad.methods import crd as crd_method
from jaxad.runtime import compilation, parallel

# "config", not "variant": the summary of BENCHMARKS.md reads tables with a variant column as method rows,
# and a curve on the test set must never stand there for a default
COLUMNS = ["dataset", "config", "lam", "image_auroc", "pixel_auroc", "aupro", "pixel_ap"]
NOTE = ("Measured on the test set, so a research curve of accuracy against λ (in `lam_mode`): it is not used "
        "to choose λ or any default; `lam=auto` chooses λ on synthetic anomalies pasted into held-out training images.")


def parse(spec: str) -> list[float]:
    """``lam=V,V,...`` → the candidates, largest first (positive numbers; only λ is swept)."""
    key, values = harness.parse_values("--sweep", spec)
    if key != "lam":
        raise ConfigError(f"--sweep {spec}: expected lam=V,V,... (only λ is swept in one program)")
    try:
        candidates = sorted({float(v) for v in values}, reverse=True)
    except ValueError:
        raise ConfigError(f"--sweep {spec}: every value must be a number") from None
    if not candidates or min(candidates) <= 0 or not np.isfinite(candidates).all():
        raise ConfigError(f"--sweep {spec}: every λ must be a positive number")
    return candidates


class Fitted(NamedTuple):
    """One category's statistics, reduced to what every candidate shares."""

    dataset: Dataset  # its test split is scored; its train split was fitted
    context: dict  # the distance's context (cell → group map, random features)
    w: np.ndarray  # eigenvalues [P, D]
    V: np.ndarray  # eigenvectors [P, D, D]
    lams: np.ndarray  # effective λ of every candidate and group [K, P]


def check(config: ml_collections.ConfigDict) -> None:
    if config.method != "crd" or config.distance not in crd_method.LAM_DISTANCES:
        raise ConfigError(f"--sweep: needs --method crd with a distance that reads λ ({', '.join(crd_method.LAM_DISTANCES)}); "
                          f"got method {config.method}, distance {config.get('distance')}")


def fit(config: ml_collections.ConfigDict, backbone: Backbone, data: Path, candidates: Sequence[float]) -> Fitted:
    """Stream the category's statistics (on the training images a pipeline fit would use: without its
    calibration images) and take the eigendecomposition every candidate shares."""
    crd_method.check_config(config, backbone)
    dataset = pipeline.split_for_calibration(config, open_dataset(data))[0]
    distance = protocol.get(config.distance)
    extract = lambda v, x: crd_method.patch_features(config, backbone, v, x)
    batches = iterate_batches(dataset.train, pipeline.image_size(config), config.batch_size)
    stats = protocol.stream(distance, config, extract, backbone.variables, batches, parallel.batch_mesh())
    w, V = crd.spectrum(stats.sums["G"])
    lams = np.stack([crd.group_lambda(stats, c, config.lam_mode) for c in candidates])
    return Fitted(dataset, jax.tree.map(np.asarray, stats.context), w, V, lams)


def candidate_program(config: ml_collections.ConfigDict, backbone: Backbone):
    """Jitted ``(variables, contexts, w, V, lams, ids [C], images [C, B, H, W, 3]) -> patch scores [C, K, B, h, w]``:
    C test batches, each of the category ``ids`` picks from the stacked spectra, every candidate λ, one call."""

    def one_batch(variables, context, w, V, lams, images):
        f = crd_method.patch_features(config, backbone, variables, images)
        return crd.candidate_scores(context, w, V, lams, f)

    def program(variables, contexts, w, V, lams, ids, images):
        picked = jax.tree.map(lambda x: x[ids], (contexts, w, V, lams))
        return jax.vmap(one_batch, in_axes=(None, 0, 0, 0, 0, 0))(variables, *picked, images)

    return compilation.jit(program)


def _stacked(fits: Sequence[Fitted]) -> tuple:
    return (jax.tree.map(lambda *xs: jnp.stack(xs), *[f.context for f in fits]),
            *(jnp.asarray(np.stack([getattr(f, k) for f in fits]), jnp.float32) for k in ("w", "V", "lams")))


def _shape_key(fit: Fitted) -> tuple:
    return (tuple((k, np.shape(v)) for k, v in sorted(fit.context.items())), fit.V.shape, fit.lams.shape)


def _interleaved(streams: dict[int, Iterator[Batch]]) -> Iterator[tuple[int, Batch]]:
    """(category, batch) taking one batch of each category in turn until all are spent."""
    while streams:
        for i in list(streams):
            batch = next(streams[i], None)
            if batch is None:
                del streams[i]
            else:
                yield i, batch


def patch_scores(config: ml_collections.ConfigDict, backbone: Backbone, fits: Sequence[Fitted]
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(patch scores [K, N, h, w], masks [N, H, W]) of every category's test images, for every candidate.

    Categories of the same shapes are scored together, C at a time (C: how many there are): each
    call takes the next C test batches of the categories in turn, so a category with fewer test
    images leaves no idle slot until the last call."""
    size = pipeline.image_size(config)
    program = candidate_program(config, backbone)
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(fits):
        groups.setdefault(_shape_key(f), []).append(i)
    kept: dict[int, tuple[list, list]] = {i: ([], []) for i in range(len(fits))}
    for members in groups.values():
        spectra = _stacked([fits[i] for i in members])
        work = _interleaved({j: iterate_batches(fits[i].dataset.test, size, config.batch_size, mask_size=size)
                             for j, i in enumerate(members)})
        while chunk := list(itertools.islice(work, len(members))):
            padded = chunk + [chunk[-1]] * (len(members) - len(chunk))  # the last call may have idle slots
            ids = jnp.asarray([j for j, _ in padded])
            images = jnp.asarray(np.stack([b.images for _, b in padded]))
            scores = np.asarray(program(backbone.variables, *spectra, ids, images))
            for (j, b), per_batch in zip(chunk, scores):
                scores_of, masks_of = kept[members[j]]
                scores_of.append(per_batch[:, b.valid])
                masks_of.append(np.asarray(b.masks)[b.valid] > 0.5)
    return [(np.concatenate(s, axis=1), np.concatenate(m)) for s, m in kept.values()]


def candidate_metrics(config: ml_collections.ConfigDict, scores: np.ndarray, masks: np.ndarray,
                      labels: np.ndarray) -> list[dict[str, float]]:
    """Image AUROC, pixel AUROC, AUPRO and pixel AP of each candidate's patch scores [K, N, h, w],
    through the method's own image score and pixel maps."""
    size = pipeline.image_size(config)
    to_maps = compilation.jit(lambda s: postprocess.anomaly_maps(s, size, config.blur_sigma))
    to_images = compilation.jit(lambda s: crd_method.image_scores(config, s))
    rows = []
    for per_patch in scores:
        maps = np.concatenate([np.asarray(m) for m in compilation.in_fixed_batches(to_maps, per_patch, config.batch_size)])
        result = metrics.evaluate(np.asarray(to_images(per_patch)), labels, maps, masks)
        rows.append({k: result[k] for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")})
    return rows


def sweep(config: ml_collections.ConfigDict, datasets: Sequence[Path], candidates: Sequence[float]
          ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Rows (dataset, lam, metrics) of every candidate on every dataset, and the seconds the fits,
    the scoring of all candidates and the metrics took."""
    check(config)
    backbone = pipeline.load_backbone(config)
    start = time.perf_counter()
    fits = [fit(config, backbone, data, candidates) for data in datasets]
    fitted = time.perf_counter()
    scored = patch_scores(config, backbone, fits)
    swept = time.perf_counter()
    rows = []
    for f, (scores, masks) in zip(fits, scored):
        labels = np.array([s.label for s in f.dataset.test])
        for lam, result in zip(candidates, candidate_metrics(config, scores, masks, labels)):
            rows.append({"dataset": f.dataset.name, "lam": lam, **result})
    seconds = {"fit_s": fitted - start, "score_s": swept - fitted, "metrics_s": time.perf_counter() - swept}
    return rows, seconds


def write_sweep(out: Path, command: str, section: str, spec: str,
                configs: dict[tuple[str, str], ml_collections.ConfigDict], datasets: Sequence[Path], note: str = "") -> str:
    """Sweep λ for every config on every dataset; writes section ``section`` of ``out`` with a table and
    one accuracy-vs-λ plot per (variant, dataset) in ``benchmarks/SECTION``."""
    candidates = parse(spec)
    for config in configs.values():
        check(config)
    folder = Path(out).parent / "benchmarks" / section
    rows, plots, timings = [], [], []
    for (_, variant), config in configs.items():
        found, seconds = sweep(config, datasets, candidates)
        rows += [{**r, "config": variant} for r in found]
        timings.append(f"{variant}: fits {seconds['fit_s']:.1f} s, all {len(candidates)} candidates scored in "
                       f"{seconds['score_s']:.1f} s, metrics {seconds['metrics_s']:.1f} s")
        for data in datasets:
            mine = [r for r in found if r["dataset"] == data.name]
            series = {name: ([r["lam"] for r in mine], [r[key] for r in mine])
                      for name, key in (("image AUROC", "image_auroc"), ("pixel AUROC", "pixel_auroc"), ("AUPRO", "aupro"))}
            plots.append(report.save_line_plot(folder / f"{variant}-{data.name}_lam.png", series,
                                               f"lambda ({config.lam_mode})", "test metric", f"{variant}: {data.name}", logx=True))
    lines = [f"## λ sweep: crd on {', '.join(d.name for d in datasets)}", "",
             *report.provenance(command, harness.machine()), "",
             report.markdown_table(sorted(rows, key=lambda r: (r["dataset"], r["config"], r["lam"])), COLUMNS,
                                   {"lam": "g"}), "",
             "Time: " + "; ".join(timings) + ".", "",
             "Plots: " + " · ".join(f"[{p.stem}]({os.path.relpath(p, Path(out).parent)})" for p in plots), "",
             NOTE, ""]
    if note:
        lines += [note, ""]
    harness.write_section(out, section, "\n".join(lines))
    return section
