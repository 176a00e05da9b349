"""fit → save → evaluate → report, for one category or a folder of categories.

What ``scripts/fit.py``, ``scripts/evaluate.py`` and ``scripts/predict.py`` call. A workdir of a
single category holds ``config.json``, ``state/``, ``calibration.json``, ``metrics.json``,
``roc.png`` and ``maps/*.png``; a folder of categories gets one such workdir per category plus
``summary.json``.

Calibration (:mod:`jaxad.eval.calibration`) needs images the model was not fitted on and that are
not test images. In order of preference: the dataset's ``validation/`` split (MVTec LOCO); the
validation split a method already holds out of its training images and only chooses settings on
(:data:`VALIDATING_METHODS`); else a seeded ``calibration_fraction`` of the training images, which
the method is then fitted without. ``train_images`` (few-shot) draws from the images left.

Over several processes (:mod:`jaxad.runtime.distributed`) each fits on its share of the training
images, every one ends with the same state, and process 0 alone saves, evaluates and writes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from jaxad import backbones, checkpoint, methods
from jaxad.config import require_at_least, require_memory
from jaxad.data import (
    Dataset,
    Sample,
    anomalies,
    find_categories,
    image_files,
    iterate_batches,
    open_dataset,
)
from jaxad.errors import ConfigError, DataError
from jaxad.eval import calibration, metrics, overlay, report, run_report
from jaxad.runtime import compilation, distributed, memory
from jaxad.train import loop

RUNTIME_KEYS = ("backbone",)  # state entries rebuilt at load time, never saved
MULTI_HOST_METHODS = ("crd",)  # methods whose fit reduces its statistics over every process's devices
CALIBRATION_FILE = "calibration.json"
# Settings a fit chooses itself and metrics.json reports beside the accuracy: CRD's λ (in its
# lam_mode), its median effective value over groups, and λ / G's smallest eigenvalue (near 0: inactive).
CHOSEN_KEYS = ("lam", "lam_effective", "lam_ratio")
# Methods that hold out ``loop.hold_out(n, config.val_fraction, config.seed)[1]`` of the n images
# they are given and only choose settings on them (normalising quantiles, z statistics, the best
# step): calibration reuses that split instead of holding out more. CPR is not one: its held-out
# images stay in its reference bank, where they would score as perfectly normal.
VALIDATING_METHODS = ("efficientad", "puad", "simplenet")


def image_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """The (H, W) images are resized to for ``config``."""
    size = config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def check_shared_settings(config: ml_collections.ConfigDict) -> None:
    """ConfigError for a setting several methods share that none can run with: a batch or image
    size, an even or empty aggregation window, a negative blur (each method checks its own keys)."""
    require_at_least(config, 1, "batch_size")
    if min(image_size(config)) < 1:
        raise ConfigError(f"--config.image_size={config.image_size}: must be at least 1 pixel")
    if "aggregate" in config and (config.aggregate < 1 or config.aggregate % 2 == 0):
        raise ConfigError(f"--config.aggregate={config.aggregate}: must be odd and positive (1: no aggregation)")
    require_at_least(config, 0, *[k for k in ("blur_sigma", "num_overlays") if k in config])
    calibration.check_settings(config)
    if config.threshold_rule == "f1" and len(set(image_size(config))) > 1:
        raise ConfigError(f"--config.threshold_rule=f1 pastes defects into square images only; image_size={config.image_size}")


def _progress(desc: str, total: int) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_backbone(config: ml_collections.ConfigDict) -> backbones.Backbone:
    """The config's backbone and weights, computing in ``compute_dtype``, holding
    only the layers up to the deepest tap the method reads."""
    name = config.compute_dtype
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"--config.compute_dtype={name}: choose one of {', '.join(COMPUTE_DTYPES)}")
    return backbones.load(config.backbone, config.weights or None, dtype=COMPUTE_DTYPES[name],
                          taps=methods.backbone_taps(config))


def fit(config: ml_collections.ConfigDict, dataset: Dataset, backbone: backbones.Backbone) -> tuple[dict, float]:
    """Fit ``config.method`` on the dataset's training images; returns (state, seconds).

    Over several processes this process reads only its share of the images, and the batch of one
    step is ``batch_size`` images from each process."""
    method = methods.get(config.method)
    train = distributed.process_share(dataset.train)
    if not train:
        raise DataError(f"{dataset.root}: {len(dataset.train)} training images for {jax.process_count()} "
                        "processes; every process needs at least one")
    if hasattr(method, "memory_need"):  # refuse a fit too large for this process before any image is read
        require_memory(*method.memory_need(config, backbone, len(train)))
    batches = iterate_batches(train, image_size(config), config.batch_size,
                              batches=distributed.batches_per_process(len(dataset.train), config.batch_size),
                              first=distributed.share_start(len(dataset.train)))
    start = time.perf_counter()
    with _progress(f"fit {dataset.name}", len(train)) as bar:
        state = method.fit(config, batches, backbone, progress=bar.update)
    state = jax.block_until_ready(state)
    return state, time.perf_counter() - start


def make_predictor(config: ml_collections.ConfigDict, backbone: backbones.Backbone, saved: dict):
    """A jitted ``images -> (scores, maps)`` closing over the fitted state.

    The state (read back as numpy) is put on the device here, once: numpy arguments of a jitted
    call are copied to the device on every call, which for a CPR reference bank of gigabytes costs
    more than the prediction itself."""
    method = methods.get(config.method)
    state = jax.device_put({"backbone": backbone.variables, **saved})
    predict = compilation.jit(partial(method.predict, config, backbone))
    return lambda images: predict(state, images)


def evaluate(config: ml_collections.ConfigDict, predictor, dataset: Dataset, workdir: Path,
             calibrated: dict | None = None) -> dict[str, Any]:
    """Score the test split, compute every metric, write metrics-side images; returns the metrics.
    With ``calibrated`` thresholds, also how well their decisions do (:func:`decision_metrics`)."""
    size = image_size(config)
    test = dataset.test
    keep = set(np.linspace(0, len(test) - 1, min(config.num_overlays, len(test))).round().astype(int).tolist())
    scores, maps, masks, kept_images = [], [], [], []
    model_seconds, timed_images, seen = 0.0, 0, 0
    with _progress(f"evaluate {dataset.name}", len(test)) as bar:
        for i, batch in enumerate(iterate_batches(test, size, config.batch_size, mask_size=size)):
            start = time.perf_counter()
            s, m = jax.block_until_ready(predictor(batch.images))
            if i > 0:  # the first call compiles
                model_seconds += time.perf_counter() - start
                timed_images += len(batch.valid)
            valid = np.asarray(batch.valid)
            scores.append(np.asarray(s)[valid])
            maps.append(np.asarray(m)[valid])
            masks.append(np.asarray(batch.masks)[valid] > 0.5)
            kept_images += [batch.images[j] for j in range(int(valid.sum())) if seen + j in keep]
            seen += int(valid.sum())
            bar.update(int(valid.sum()))
    if timed_images == 0:  # a single batch: time it once more, compiled
        start = time.perf_counter()
        jax.block_until_ready(predictor(batch.images))
        model_seconds, timed_images = time.perf_counter() - start, len(batch.valid)
    scores, maps, masks = np.concatenate(scores), np.concatenate(maps), np.concatenate(masks)
    labels = np.array([s.label for s in test])
    result = metrics.evaluate(scores, labels, maps, masks)
    defects = [s.defect for s in test]
    result["per_defect_image_auroc"] = metrics.evaluate_by_group(scores, labels, defects)
    result["per_defect_pixel"] = metrics.pixel_metrics_by_group(maps, masks, labels, defects)
    result["predict_images_per_second"] = timed_images / model_seconds
    result["n_test"] = len(test)
    if calibrated is not None:
        result.update(decision_metrics(calibrated, scores, labels, maps, masks))
        result["image_threshold"] = calibrated["image_threshold"]
    idx = sorted(keep)
    names = [f"{test[i].defect}_{Path(test[i].path).stem}" for i in idx]
    if idx and calibrated is not None:  # the calibration's fixed scale, the predicted defect outlined
        overlay.save_decisions(workdir / "maps", calibrated, np.stack(kept_images), scores[idx], maps[idx], names,
                               masks[idx])
    elif idx:  # no calibration, no fixed scale: the test maps' own percentiles
        report.save_overlays(workdir / "maps", np.stack(kept_images), maps[idx], masks[idx], names=names,
                             scores=scores[idx], vmin=float(np.percentile(maps, 1)), vmax=float(np.percentile(maps, 99.9)))
    if len(set(labels.tolist())) == 2:
        report.save_roc_curve(workdir / "roc.png", scores, labels, title=f"{config.method} on {dataset.name}")
    run_report.write(workdir / "report.html", f"{config.method} on {dataset.name}", result, scores, maps, masks, test,
                     size, calibrated)
    return result


def decision_metrics(calibrated: dict, scores: np.ndarray, labels: np.ndarray, maps: np.ndarray,
                     masks: np.ndarray) -> dict[str, dict]:
    """Accuracy, precision, recall (and confusion counts) of the stored thresholds' decisions on
    the labelled test images: per image, and per pixel against the defect masks."""
    known = labels >= 0
    return {
        "image_decisions": calibration.decision_metrics(scores[known] >= calibrated["image_threshold"], labels[known] == 1),
        "pixel_decisions": calibration.decision_metrics(maps[known] >= calibrated["pixel_threshold"], masks[known]),
    }


def subsample_train(dataset: Dataset, count: int, seed: int) -> Dataset:
    """The dataset with ``count`` training images drawn at random (seeded), for few-shot runs;
    ``count`` ≤ 0 or ≥ the training set keeps every image."""
    if count <= 0 or count >= len(dataset.train):
        return dataset
    picked = np.sort(np.random.default_rng(seed).choice(len(dataset.train), count, replace=False))
    return dataclasses.replace(dataset, train=tuple(dataset.train[i] for i in picked))


def split_for_calibration(config: ml_collections.ConfigDict, dataset: Dataset) -> tuple[Dataset, tuple[Sample, ...], str]:
    """(the dataset to fit on, the calibration images, where they come from); see the module's
    docstring for the order. No calibration images when none of the three sources has any."""
    if dataset.validation:
        return subsample_train(dataset, config.train_images, config.seed), dataset.validation, "validation split"
    if config.method in VALIDATING_METHODS:
        fitted = subsample_train(dataset, config.train_images, config.seed)
        held = loop.hold_out(len(fitted.train), config.val_fraction, config.seed)[1]
        if len(held):
            return fitted, tuple(fitted.train[i] for i in held), f"{config.method}'s validation split (val_fraction)"
    kept, held = loop.hold_out(len(dataset.train), config.calibration_fraction, config.seed)
    if config.calibration_fraction > 0 and not len(held):
        raise DataError(f"{dataset.root}: {len(dataset.train)} training image(s) leave none for calibration; "
                        "add normal images or set --config.calibration_fraction=0 (no thresholds)")
    rest = dataclasses.replace(dataset, train=tuple(dataset.train[i] for i in kept))
    return subsample_train(rest, config.train_images, config.seed), tuple(dataset.train[i] for i in held), \
        "held-out training images (calibration_fraction)"


def scores_and_maps(config: ml_collections.ConfigDict, predictor, samples: tuple[Sample, ...], desc: str,
                     transform=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(scores [N], maps [N, H, W], masks [N, H, W] or None) of ``samples``, streamed in batches;
    ``transform(i, images) -> (images, masks)`` alters each batch first (synthetic defects)."""
    scores, maps, masks = [], [], []
    with _progress(desc, len(samples)) as bar:
        for i, batch in enumerate(iterate_batches(samples, image_size(config), config.batch_size)):
            images, batch_masks = (batch.images, None) if transform is None else transform(i, batch.images)
            s, m = jax.device_get(predictor(images))
            scores.append(s[batch.valid])
            maps.append(m[batch.valid])
            if batch_masks is not None:
                masks.append(np.asarray(batch_masks)[batch.valid] > 0.5)
            bar.update(int(batch.valid.sum()))
    return np.concatenate(scores), np.concatenate(maps), np.concatenate(masks) if masks else None


def synthetic_defects(config: ml_collections.ConfigDict):
    """``(i, images) -> (images with a pasted defect each, masks)``: seeded per batch ``i``
    (:func:`jaxad.data.anomalies.synthesize`, always a defect, half from procedural textures)."""
    size = image_size(config)
    key, texture_key = jax.random.split(jax.random.key(config.seed + 1))
    textures = anomalies.texture_bank(texture_key, 8, size[0])
    everywhere = jnp.ones(size, bool)
    paste = compilation.jit(jax.vmap(lambda k, im: anomalies.synthesize(k, im, everywhere, textures, 1.0, 0.5)))
    return lambda i, images: paste(jax.random.split(jax.random.fold_in(key, i), len(images)), jnp.asarray(images))


def calibrate(config: ml_collections.ConfigDict, predictor, samples: tuple[Sample, ...], source: str) -> dict:
    """Thresholds and normalisations (:func:`jaxad.eval.calibration.calibrate`) from the calibration
    images, taken to be normal; with ``threshold_rule=f1`` also from copies with synthetic defects."""
    normal_scores, normal_maps, _ = scores_and_maps(config, predictor, samples, "calibrate")
    defects = {}
    if config.threshold_rule == "f1":
        s, m, masks = scores_and_maps(config, predictor, samples, "calibrate defects", synthetic_defects(config))
        defects = {"defect_scores": s, "defect_maps": m, "defect_masks": masks}
    found = calibration.calibrate(config.threshold_rule, config.threshold_quantile, normal_scores, normal_maps, **defects)
    return {**found, "source": source, "n_images": len(samples), "images": [str(s.path) for s in samples]}


def load_calibration(workdir: str | Path) -> dict:
    """The thresholds and normalisations a fit stored in ``workdir``."""
    path = Path(workdir).expanduser() / CALIBRATION_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: this model has no thresholds (fitted without calibration images, "
                          "or before jaxad calibrated); fit it again")
    return json.loads(path.read_text())


def run_category(config: ml_collections.ConfigDict, category: Path, workdir: Path, backbone: backbones.Backbone) -> dict:
    """Fit, save, calibrate and (when there is a test split) evaluate one category into ``workdir``;
    over several processes all fit, process 0 alone saves, calibrates and evaluates."""
    workdir = checkpoint.prepare_workdir(workdir) if distributed.is_main() else Path(workdir).expanduser().resolve()
    dataset, calibration_set, source = split_for_calibration(config, open_dataset(category))
    config = ml_collections.ConfigDict(config.to_dict())
    config.data = str(Path(category).resolve())
    config.workdir = str(workdir)  # trained methods keep resumable checkpoints in workdir/train
    memory.reset_peak_rss()
    state, fit_seconds = fit(config, dataset, backbone)
    saved = {k: v for k, v in state.items() if k not in RUNTIME_KEYS}
    result: dict[str, Any] = {"category": dataset.name, "method": config.method, "n_train": len(dataset.train),
                              "fit_seconds": fit_seconds, "peak_rss_mb": memory.peak_rss() / 2**20}
    result.update({k: float(state[k]) for k in CHOSEN_KEYS if k in state})
    if not distributed.is_main():
        return result
    checkpoint.save(workdir, config, saved)
    (workdir / CALIBRATION_FILE).unlink(missing_ok=True)
    predictor = make_predictor(config, backbone, saved)
    calibrated = None
    if calibration_set:
        calibrated = calibrate(config, predictor, calibration_set, source)
        _write_json(workdir / CALIBRATION_FILE, calibrated)
        result["calibration"] = {k: v for k, v in calibrated.items() if k != "images"}
    if dataset.test:
        result.update(evaluate(config, predictor, dataset, workdir, calibrated))
    _write_json(workdir / "metrics.json", result)
    return result


def run(config: ml_collections.ConfigDict, data: Path, workdir: Path) -> list[dict]:
    """Fit and evaluate every category found under ``data``; one workdir each when several."""
    check_shared_settings(config)
    if jax.process_count() > 1 and config.method not in MULTI_HOST_METHODS:
        raise ConfigError(f"--method {config.method} fits in one process only; over several processes: "
                          f"{', '.join(MULTI_HOST_METHODS)}")
    categories = find_categories(data)
    backbone = load_backbone(config)
    if len(categories) == 1:
        return [run_category(config, categories[0], workdir, backbone)]
    top = checkpoint.prepare_workdir(workdir) if distributed.is_main() else Path(workdir)
    results = [run_category(config, c, top / c.name, backbone) for c in categories]
    if distributed.is_main():
        _write_json(top / "summary.json", results)
    return results


def reevaluate(workdir: Path, data: Path | None = None) -> dict:
    """Reload a fitted workdir and evaluate it again (on ``data`` or the data it was fitted on),
    with the decisions of its stored thresholds when it has them."""
    config, saved = checkpoint.load(workdir)
    dataset = open_dataset(data if data is not None else Path(config.data))
    backbone = load_backbone(config)
    calibrated = load_calibration(workdir) if (Path(workdir) / CALIBRATION_FILE).is_file() else None
    return evaluate(config, make_predictor(config, backbone, saved), dataset, Path(workdir), calibrated)


def input_images(paths: list[Path]) -> list[Path]:
    """The image files named on a command line, each folder replaced by the images under it."""
    return [found for p in paths for found in (image_files(p) if Path(p).is_dir() else [Path(p)])]


def distinct_names(paths: list[Path]) -> list[str]:
    """Names for the maps of ``paths``: each file's stem, led by as many of its folders as it takes
    to tell it from the others (``good/000.png`` and ``crack/000.png`` → ``good_000``, ``crack_000``)."""
    stems = [Path(p).with_suffix("").parts for p in paths]
    depth = 1
    while depth < max(map(len, stems), default=1) and len({s[-depth:] for s in stems}) < len(stems):
        depth += 1
    return ["_".join(s[-depth:]) for s in stems]


class Prediction(NamedTuple):
    path: Path
    score: float  # normalised to [0, 1]; the threshold is 0.5
    anomalous: bool
    raw_score: float  # the method's own score


def predict_files(workdir: Path, paths: Sequence[Path], out_dir: Path | None) -> Iterator[Prediction]:
    """Decide on image files with a fitted, calibrated workdir, one :class:`Prediction` per image
    as its batch is done. Images stream in batches (memory does not grow with their number);
    overlays go to ``out_dir`` (None: none), which must be new, empty or jaxad's own (a map must
    never replace a user's file, such as an input)."""
    config, saved = checkpoint.load(workdir)
    calibrated = load_calibration(workdir)
    if out_dir is not None:
        out_dir = checkpoint.prepare_workdir(out_dir, "--out")
    predictor = make_predictor(config, load_backbone(config), saved)
    decide = compilation.jit(partial(calibration.decide, calibrated))
    names = distinct_names(paths)
    samples = [Sample(Path(p), -1, "unknown") for p in paths]
    seen = 0
    with tqdm(total=len(samples), desc="predict", unit="img", dynamic_ncols=True) as bar:
        for batch in iterate_batches(samples, image_size(config), config.batch_size):
            raw, maps = predictor(batch.images)
            scores, labels, maps = jax.device_get(decide(raw, maps))
            raw = np.asarray(raw)
            for j in np.flatnonzero(batch.valid):
                i = seen + j
                if out_dir is not None:
                    verdict = "anomalous" if labels[j] else "normal"
                    overlay.save_decision(out_dir / f"{names[i]}.png", batch.images[j], maps[j],
                                          f"{names[i]}: {verdict} {scores[j]:.3f}")
                yield Prediction(Path(paths[i]), float(scores[j]), bool(labels[j]), float(raw[j]))
            seen += int(batch.valid.sum())
            bar.update(int(batch.valid.sum()))


def _write_json(path: Path, obj: Any) -> None:
    checkpoint.write_text(path, json.dumps(obj, indent=2, default=float) + "\n")
