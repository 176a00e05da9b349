"""fit → save → evaluate → report, for one category or a folder of categories.

What ``scripts/fit.py``, ``scripts/evaluate.py`` and ``scripts/predict.py`` call. A workdir of a
single category holds ``config.json``, ``state/``, ``metrics.json``, ``roc.png`` and
``maps/*.png``; a folder of categories gets one such workdir per category plus ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from jaxad import backbones, checkpoint, methods
from jaxad.config import require_at_least
from jaxad.data import (
    Dataset,
    find_categories,
    image_files,
    iterate_batches,
    open_dataset,
    read_image,
    resize_image,
)
from jaxad.errors import ConfigError
from jaxad.eval import metrics, report
from jaxad.runtime import compilation

RUNTIME_KEYS = ("backbone",)  # state entries rebuilt at load time, never saved


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
    """Fit ``config.method`` on the dataset's training images; returns (state, seconds)."""
    method = methods.get(config.method)
    batches = iterate_batches(dataset.train, image_size(config), config.batch_size)
    start = time.perf_counter()
    with _progress(f"fit {dataset.name}", len(dataset.train)) as bar:
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


def evaluate(config: ml_collections.ConfigDict, predictor, dataset: Dataset, workdir: Path) -> dict[str, Any]:
    """Score the test split, compute every metric, write metrics-side images; returns the metrics."""
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
    idx = sorted(keep)
    names = [f"{test[i].defect}_{Path(test[i].path).stem}" for i in idx]
    report.save_overlays(
        workdir / "maps", np.stack(kept_images), maps[idx], masks[idx], names=names, scores=scores[idx],
        vmin=float(np.percentile(maps, 1)), vmax=float(np.percentile(maps, 99.9)),
    )
    if len(set(labels.tolist())) == 2:
        report.save_roc_curve(workdir / "roc.png", scores, labels, title=f"{config.method} on {dataset.name}")
    return result


def subsample_train(dataset: Dataset, count: int, seed: int) -> Dataset:
    """The dataset with ``count`` training images drawn at random (seeded), for few-shot runs;
    ``count`` ≤ 0 or ≥ the training set keeps every image."""
    if count <= 0 or count >= len(dataset.train):
        return dataset
    picked = np.sort(np.random.default_rng(seed).choice(len(dataset.train), count, replace=False))
    return dataclasses.replace(dataset, train=tuple(dataset.train[i] for i in picked))


def run_category(config: ml_collections.ConfigDict, category: Path, workdir: Path, backbone: backbones.Backbone) -> dict:
    """Fit, save and (when there is a test split) evaluate one category into ``workdir``."""
    workdir = checkpoint.prepare_workdir(workdir)
    dataset = subsample_train(open_dataset(category), config.train_images, config.seed)
    config = ml_collections.ConfigDict(config.to_dict())
    config.data = str(Path(category).resolve())
    config.workdir = str(workdir.resolve())  # trained methods keep resumable checkpoints in workdir/train
    state, fit_seconds = fit(config, dataset, backbone)
    saved = {k: v for k, v in state.items() if k not in RUNTIME_KEYS}
    checkpoint.save(workdir, config, saved)
    result: dict[str, Any] = {"category": dataset.name, "method": config.method, "n_train": len(dataset.train), "fit_seconds": fit_seconds}
    if dataset.test:
        result.update(evaluate(config, make_predictor(config, backbone, saved), dataset, workdir))
    _write_json(workdir / "metrics.json", result)
    return result


def run(config: ml_collections.ConfigDict, data: Path, workdir: Path) -> list[dict]:
    """Fit and evaluate every category found under ``data``; one workdir each when several."""
    check_shared_settings(config)
    categories = find_categories(data)
    backbone = load_backbone(config)
    if len(categories) == 1:
        return [run_category(config, categories[0], workdir, backbone)]
    top = checkpoint.prepare_workdir(workdir)
    results = [run_category(config, c, top / c.name, backbone) for c in categories]
    _write_json(top / "summary.json", results)
    return results


def reevaluate(workdir: Path, data: Path | None = None) -> dict:
    """Reload a fitted workdir and evaluate it again (on ``data`` or the data it was fitted on)."""
    config, saved = checkpoint.load(workdir)
    dataset = open_dataset(data if data is not None else Path(config.data))
    backbone = load_backbone(config)
    return evaluate(config, make_predictor(config, backbone, saved), dataset, Path(workdir))


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


def predict_files(workdir: Path, paths: list[Path], out_dir: Path) -> list[float]:
    """Score image files with a fitted workdir; one score per image. Maps go to ``out_dir``, which
    must be new, empty or jaxad's own (a map must never replace a user's file, such as an input)."""
    config, saved = checkpoint.load(workdir)
    out_dir = checkpoint.prepare_workdir(out_dir, "--out")
    backbone = load_backbone(config)
    predictor = make_predictor(config, backbone, saved)
    size = image_size(config)
    images, scores, maps = [], [], []
    for start in range(0, len(paths), config.batch_size):
        chunk = np.stack([resize_image(read_image(p), size) for p in paths[start:start + config.batch_size]])
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], config.batch_size - len(chunk), 0)])
        s, m = predictor(padded)
        images.append(chunk)
        scores.append(np.asarray(s)[: len(chunk)])
        maps.append(np.asarray(m)[: len(chunk)])
    scores, maps = np.concatenate(scores), np.concatenate(maps)
    report.save_overlays(out_dir, np.concatenate(images), maps, None, names=distinct_names(paths), scores=scores)
    return scores.tolist()


def _write_json(path: Path, obj: Any) -> None:
    checkpoint.write_text(path, json.dumps(obj, indent=2, default=float) + "\n")
